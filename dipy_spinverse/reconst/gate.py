"""The one gate a voxel's data pass on their way to either fit method.

Gradient tables are turned into protocols (:func:`gradient_tables`), data
arrays checked for shape and type (:func:`check_data`), and each chunk of
voxels cast to float64, normalised by its b = 0 signal and given its
statuses and its own noise once (:func:`admit`: the noise in the data's units,
relative to the voxel's b = 0 signal, and as the inversion's one noise form,
a :class:`~dipy_spinverse.inverse.noise.Noise`). Below the gate the inversion and the
posterior trust their inputs: finite, normalised signals with a positive
b = 0 in every sequence.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from dipy.core.gradients import GradientTable, gradient_table

from ..inverse.noise import Noise
from ..sim.sequences import Protocol, check_bvals
from ..sim.signals import VoxelSignals
from ..sim.waveforms import PGSE
from .codes import BAD_B0, NONFINITE, OK, POOR_FIT_FALSE_ALARM
from .noise import relative_noise
from .plausibility import impossible_signal

__all__ = [
    "Admitted",
    "admit",
    "check_data",
    "gradient_tables",
    "require_b0",
    "s0_per_acquisition",
]


def gradient_tables(gtab):
    """(GradientTable, Protocol) from a gradient table or a protocol.

    The one gatekeeper of gradient tables: DIPY has checked the b-vectors
    against the table's own tolerance when it built the table, and
    :meth:`Protocol.from_gtab` checks the timing and the b-values
    (:func:`~dipy_spinverse.sim.sequences.check_bvals`; a protocol's b-values
    are checked by the same function).

    Parameters
    ----------
    gtab : GradientTable or Protocol
        With the pulse timing (``big_delta``, ``small_delta`` in seconds).

    Returns
    -------
    GradientTable, Protocol
    """
    if isinstance(gtab, Protocol):
        timing = {}
        if all(type(w) is PGSE for w in gtab.waveforms):
            timing = dict(
                big_delta=np.array([w.big_delta for w in gtab.waveforms]),
                small_delta=np.array([w.small_delta for w in gtab.waveforms]),
            )
        check_bvals(gtab.bvals)
        table = gradient_table(gtab.bvals, bvecs=gtab.bvecs, b0_threshold=0, **timing)
        return table, gtab
    if not isinstance(gtab, GradientTable):
        raise ValueError(
            "gtab must be a dipy GradientTable (with big_delta and small_delta in "
            f"seconds) or a dipy_spinverse Protocol, got {type(gtab).__name__}."
        )
    return gtab, Protocol.from_gtab(gtab)


def require_b0(protocol):
    """Refuse a protocol without b = 0 volumes; warn of sequences without
    their own (normalised by the mean of all, which assumes one echo time).

    Parameters
    ----------
    protocol : Protocol
        The model's acquisitions.
    """
    b0 = protocol.bvals == 0
    if not b0.any():
        raise ValueError(
            "gtab has no b=0 volume (b <= gtab.b0_threshold); Spinverse "
            "normalises each voxel by its b=0 signal. Acquire at least one "
            "b=0 volume, or raise b0_threshold in gradient_table(...) if your "
            "b=0 volumes have small nominal b-values."
        )
    sequences = protocol.sequences()
    missing = [r for r, (_, idx) in enumerate(sequences) if not b0[idx].any()]
    if missing:
        warnings.warn(
            f"sequence(s) of rank {missing} (0 = longest diffusion time) have "
            "no b=0 volume of their own; they are normalised by the mean of all "
            "b=0 volumes, which assumes the same T2 weighting (echo time).",
            UserWarning,
            stacklevel=4,  # the user's model constructor
        )


def check_data(data, n_volumes):
    """``data`` as an array of its own numeric dtype, its last axis checked.

    A volume is not copied to float64 here: :func:`admit` casts each chunk
    of voxels as it is fitted. One voxel (1-D) is cast at once.

    Parameters
    ----------
    data : array_like (..., n_volumes)
        Raw magnitude signals.
    n_volumes : int
        Volumes of the model's gradient table.

    Returns
    -------
    ndarray
    """
    data = np.asarray(data)
    if data.dtype.kind == "c":
        raise ValueError(
            "data is complex; the fit takes magnitude signals: pass "
            "np.abs(data) (or the real part, if the phase is corrected)."
        )
    if data.dtype.kind not in "biuf":
        try:
            data = np.asarray(data, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"data must be a numeric array (..., {n_volumes}), "
                f"got {type(data).__name__} of {data.dtype}."
            ) from err
    if data.ndim == 0 or data.shape[-1] != n_volumes:
        raise ValueError(
            f"data has shape {data.shape} but the gradient table has "
            f"{n_volumes} volumes; the last axis of data must hold "
            f"one value per volume, in the order of gtab (shape (..., "
            f"{n_volumes}))."
        )
    if data.ndim == 1:
        data = data.astype(np.float64)
    return data


@dataclass(frozen=True)
class Admitted:
    """Voxels past the gate, with their own noise.

    Attributes
    ----------
    signals : VoxelSignals
        Each sequence divided by its own b = 0 signal (float64), with its
        sequences' own precisions
        (:func:`~dipy_spinverse.sim.signals.noise_precision`).
    status : ndarray of int8 (n,)
        ``OK``, ``NONFINITE`` (NaN or inf, or a normalised signal beyond the
        model's floating-point range) or ``BAD_B0`` (a sequence's b = 0
        signal at most 0).
    impossible : ndarray of bool (n,)
        Admitted voxels whose attenuation exceeds 1 beyond the noise
        (:func:`~dipy_spinverse.reconst.plausibility.impossible_signal`);
        each method decides what that costs them.
    S0 : ndarray (n,)
        The mean b = 0 signal (NaN where the voxel is not admitted): the one
        S0 of both methods.
    S0_sequences : ndarray (n, n_sequences)
        Each sequence's b = 0 scale (NaN where not admitted).
    sigma : ndarray (n,)
        Each voxel's noise in the data's units (0 when it is not known, NaN
        where not admitted).
    relative : ndarray (n,)
        Each voxel's noise over its mean b = 0 signal
        (:func:`~dipy_spinverse.reconst.noise.relative_noise`; 0 when the
        noise is not known, NaN where not admitted): the posterior's input.
    noise : Noise
        The voxels' noise as the inversion reads it: the fit's relative
        level (:func:`~dipy_spinverse.reconst.runner.fit_noise`; 0: unknown)
        and each acquisition's precision in units of ``1 / level^2``, its
        variance ``level^2 / precision`` the voxel's own ``relative^2`` over
        its sequence's :func:`~dipy_spinverse.sim.signals.noise_precision`
        (the sequences' own precisions where ``sigma`` or the level is not
        given).
    """

    signals: VoxelSignals
    status: np.ndarray
    impossible: np.ndarray
    S0: np.ndarray
    S0_sequences: np.ndarray
    sigma: np.ndarray
    relative: np.ndarray
    noise: Noise

    @property
    def ok(self):
        """Whether each voxel is admitted (status ``OK``)."""
        return self.status == OK

    @property
    def precision(self):
        """ndarray (n, n_acquisitions): :attr:`noise`'s precisions, each
        acquisition's weight in the inversion's loss."""
        return self.noise.precision


def admit(data, protocol, *, sigma=0.0, level=0.0, dtype=torch.float32):
    """Cast, normalise and give statuses and noise to raw voxels, once.

    Parameters
    ----------
    data : array_like (n, n_volumes)
        Raw signals, any real dtype.
    protocol : Protocol
        Their acquisitions.
    sigma : float
        Noise standard deviation in the data's units (0: unknown; the
        impossible-signal test then uses each voxel's own spread).
    level : float
        The fit's relative noise level
        (:func:`~dipy_spinverse.reconst.runner.fit_noise`): with
        ``sigma``, each voxel's precisions are scaled by ``(level /
        relative)^2``, so that every chi-square, misfit test and Rician
        floor of the inversion uses the voxel's own noise. 0 leaves the
        sequences' own precisions (the posterior, which takes
        :attr:`Admitted.relative`).
    dtype : torch.dtype
        The precision the signals are fitted in: a normalised signal beyond
        its range (a b = 0 of 1e-310) is ``NONFINITE``.

    Returns
    -------
    Admitted
    """
    data = np.asarray(data, dtype=np.float64)
    signals = VoxelSignals.from_raw(data, protocol)
    status = np.full(len(data), OK, dtype=np.int8)
    finite = np.isfinite(data).all(axis=1)
    status[~finite] = NONFINITE
    positive = (signals.s0 > 0) & (signals.scale > 0).all(axis=1)
    status[finite & ~positive] = BAD_B0
    # One such voxel would make its whole batch's loss non-finite.
    largest = torch.finfo(dtype).max
    overflows = ~(np.abs(signals.normalised) <= largest).all(axis=1)
    status[(status == OK) & overflows] = NONFINITE
    ok = status == OK
    relative = np.where(ok, relative_noise(sigma, signals.s0), np.nan)
    impossible = np.zeros(len(data), dtype=bool)
    impossible[ok] = impossible_signal(
        signals[ok], protocol, sigma=relative[ok], false_alarm=POOR_FIT_FALSE_ALARM
    )
    S0 = np.where(ok, signals.s0, np.nan)
    S0_sequences = np.where(ok[:, None], signals.scale, np.nan)
    absolute = np.where(ok, float(sigma), np.nan)
    precision = signals.precision
    if sigma > 0 and level > 0:
        with np.errstate(invalid="ignore", divide="ignore"):
            weight = (level / relative) ** 2
        precision = precision * weight[:, None]
    noise = Noise(level, precision)
    return Admitted(
        signals, status, impossible, S0, S0_sequences, absolute, relative, noise
    )


def s0_per_acquisition(sequences, protocol, s0, s0_sequences):
    """The fitted S0 of each acquisition of ``protocol``, shape (n, n_acq).

    Acquisitions sharing a waveform with a fitted sequence take that
    sequence's own b = 0 signal (its echo time's T2 weighting); the others
    the voxel's mean b = 0 signal, the one S0 both methods report.

    Parameters
    ----------
    sequences : list of (Waveform, ndarray)
        The fitted protocol's sequences in rank order
        (:meth:`Protocol.sequences`).
    protocol : Protocol
        The acquisitions to scale.
    s0 : array_like (n,)
        Each voxel's mean b = 0 signal (:attr:`Admitted.S0`).
    s0_sequences : array_like (n, len(sequences))
        Each voxel's per-sequence b = 0 signal (:attr:`Admitted.S0_sequences`).

    Returns
    -------
    ndarray (n, len(protocol))
    """
    out = np.repeat(np.asarray(s0, float)[:, None], len(protocol), axis=1)
    fitted = {waveform: rank for rank, (waveform, _) in enumerate(sequences)}
    s0_sequences = np.asarray(s0_sequences, float)
    for waveform, idx in protocol.groups():
        if waveform in fitted:
            out[:, idx] = s0_sequences[:, fitted[waveform], None]
    return out
