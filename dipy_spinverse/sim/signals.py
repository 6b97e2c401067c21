"""Measured and simulated signals on a common footing: b0 scaling and misfit.

Every part of the package that compares a signal with a prediction -- the face
fit, the label search, the DIPY fit's residual map and the reports -- goes
through the functions here, so that they all normalise and score alike. A
batch of measured voxels is normalised once, into :class:`VoxelSignals` (the
normalised signals, their b = 0 scales and noise precisions), which is
passed down to the fits.

The simulator predicts the b0-normalised signal (``S(b = 0) = 1``); a voxel
is brought to that scale by dividing each sequence by its own mean b = 0
signal, which cancels T2 weighting that differs between echo times.
"""

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "VoxelSignals",
    "b0_scale",
    "normalise_b0",
    "per_mean_b0",
    "noise_precision",
    "sequence_index",
    "data_loss",
]


def b0_scale(signal, protocol):
    """Mean b = 0 signal per sequence, shape (..., n_sequences).

    Parameters
    ----------
    signal : ndarray or torch.Tensor (..., n_acquisitions)
        Signals in protocol order.
    protocol : Protocol

    Returns
    -------
    scale : same type as ``signal``, shape (..., n_sequences)
        In :meth:`Protocol.sequences` order. A sequence without b = 0
        volumes of its own takes the mean of all b = 0 volumes (which assumes
        the same T2 weighting); a protocol without any b = 0 volume gives 1
        (the signal is taken as already normalised).
    """
    b0 = protocol.bvals == 0
    if not b0.any():
        ones = (torch.ones_like if isinstance(signal, torch.Tensor) else np.ones_like)(
            signal[..., :1]
        )
        return _cat([ones] * len(protocol.sequences()), signal)
    overall = signal[..., np.flatnonzero(b0)].mean(-1, keepdims=True)
    scales = []
    for _, idx in protocol.sequences():
        own = idx[b0[idx]]
        scales.append(signal[..., own].mean(-1, keepdims=True) if len(own) else overall)
    return _cat(scales, signal)


def normalise_b0(signal, protocol):
    """Divide each sequence by its b = 0 scale (:func:`b0_scale`).

    Parameters
    ----------
    signal : ndarray or torch.Tensor (..., n_acquisitions)
    protocol : Protocol

    Returns
    -------
    normalised : same type and shape as ``signal``
    """
    scale = b0_scale(signal, protocol)
    return signal / scale[..., sequence_index(protocol)]


def per_mean_b0(signal, protocol):
    """Divide each signal by its mean b = 0 over every sequence: the scale
    a voxel's noise is relative to (its relaxation between echo times kept).

    Parameters
    ----------
    signal : ndarray (..., n_acquisitions)
    protocol : Protocol

    Returns
    -------
    ndarray
        ``signal`` as it is for a protocol without b = 0 volumes.
    """
    b0 = protocol.bvals == 0
    if not b0.any():
        return signal
    return signal / signal[..., b0].mean(-1, keepdims=True)


def noise_precision(signal, protocol):
    """Precision of each b0-normalised acquisition relative to ``sigma``.

    Magnitude images carry one noise level in signal units for every volume.
    After :func:`normalise_b0` a sequence's relative noise is that level over
    its own b = 0 scale, so sequences with a longer echo time (a smaller
    b = 0 signal under T2 decay) are noisier. With ``sigma`` the noise
    relative to the voxel's mean b = 0 signal (over all b = 0 volumes),
    sequence ``s`` has relative noise ``sigma * b0_mean / b0_s``: precision
    ``(b0_s / b0_mean)^2`` in units of ``1 / sigma^2``.

    Parameters
    ----------
    signal : ndarray or torch.Tensor (..., n_acquisitions)
        Signals in protocol order, *before* normalisation.
    protocol : Protocol

    Returns
    -------
    precision : same type as ``signal``, shape (..., n_acquisitions)
        Ones when every sequence has the same echo time (their b = 0 scales
        then differ by noise only, not by T2 decay) or there is no b = 0
        volume.
    """
    b0 = np.flatnonzero(protocol.bvals == 0)
    overall = signal[..., b0].mean(-1, keepdims=True) if len(b0) else None
    scale = b0_scale(signal, protocol)[..., sequence_index(protocol)]
    return _precision(scale, overall, protocol)


def _precision(scale, overall, protocol):
    """:func:`noise_precision` from each acquisition's b = 0 scale (..., n)
    and the mean b = 0 signal (..., 1; unused without b = 0 volumes),
    computed once by the caller."""
    if not (protocol.bvals == 0).any() or np.ptp(protocol.echo_times) == 0:
        return (torch.ones_like if isinstance(scale, torch.Tensor) else np.ones_like)(
            scale
        )
    return (scale / overall) ** 2


def sequence_index(protocol):
    """Rank (in :meth:`Protocol.sequences` order) of each acquisition's sequence."""
    index = np.empty(len(protocol), dtype=np.intp)
    for rank, (_, idx) in enumerate(protocol.sequences()):
        index[idx] = rank
    return index


def data_loss(
    predicted,
    measured,
    *,
    loss_scale,
    sigma=0.0,
    noise="gaussian",
    weights=None,
    precision=None,
):
    """Weighted signal misfit per voxel, the data term of every fit.

    ``loss_scale * sum(w * p * (E[S] - y)^2) / sum(w)``, where ``E[S]`` is
    the predicted signal, or with ``noise="rician"`` and ``sigma > 0`` its
    Rician floor ``sqrt(S^2 + sigma^2 / p)``: the magnitude of a signal plus
    complex Gaussian noise of relative level ``sigma / sqrt(p)`` has about
    that mean above the noise floor. The precision ``p``
    (:func:`noise_precision`) makes this the Gaussian log-likelihood when
    sequences differ in relative noise, and keeps the expected loss of the
    truth at ``loss_scale * sigma^2`` whatever ``p``.

    Parameters
    ----------
    predicted, measured : torch.Tensor (..., n)
        b0-normalised signals.
    loss_scale : float
    sigma : float
        Noise level relative to the (mean) b = 0 signal (1/SNR; 0 if
        unknown).
    noise : {"gaussian", "rician"}
    weights : torch.Tensor (n,), optional
        Per-acquisition weights (default 1).
    precision : torch.Tensor (..., n), optional
        Noise precision of each acquisition relative to ``1 / sigma^2``
        (default 1: every acquisition has relative noise ``sigma``).

    Returns
    -------
    loss : torch.Tensor (...)
    """
    if noise == "rician" and sigma > 0:
        floor = sigma**2 if precision is None else sigma**2 / precision
        predicted = torch.sqrt(predicted**2 + floor)
    residual = (predicted - measured) ** 2
    if precision is not None:
        residual = residual * precision
    if weights is None:
        return loss_scale * residual.mean(-1)
    return loss_scale * (residual * weights).sum(-1) / weights.sum()


@dataclass(frozen=True)
class VoxelSignals:
    """Measured voxels normalised once: what every fit of them needs.

    Build it with :meth:`from_raw`; index it with rows (``signals[rows]``) to
    pass a subset on. The fits read :attr:`normalised` and
    :attr:`precision`; the DIPY layer reads :attr:`s0` and :attr:`scale`.

    Attributes
    ----------
    normalised : ndarray (n, n_acquisitions)
        Each sequence divided by its b = 0 scale (:func:`normalise_b0`),
        float64.
    scale : ndarray (n, n_sequences)
        The b = 0 scale of each sequence (:func:`b0_scale`), in
        :meth:`Protocol.sequences` order.
    s0 : ndarray (n,)
        Mean of all b = 0 volumes (1 without any: the signal is taken as
        normalised already).
    precision : ndarray (n, n_acquisitions)
        Noise precision of each normalised acquisition relative to
        ``1 / sigma^2`` (:func:`noise_precision`).
    """

    normalised: np.ndarray
    scale: np.ndarray
    s0: np.ndarray
    precision: np.ndarray

    @classmethod
    def from_raw(cls, signal, protocol):
        """Normalise raw signals (n, n_acquisitions) in protocol order.

        Voxels whose b = 0 signal is 0 or not finite get non-finite
        normalised values (no error, no warning): the caller flags them.
        """
        signal = np.asarray(signal, dtype=np.float64)
        if signal.ndim != 2 or signal.shape[1] != len(protocol):
            raise ValueError(
                f"signal must have shape (n_voxels, {len(protocol)}) (one value "
                f"per acquisition of the protocol), got {signal.shape}."
            )
        b0 = protocol.bvals == 0
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            scale = b0_scale(signal, protocol)
            per_volume = scale[:, sequence_index(protocol)]
            # Mean of all b = 0 volumes; 1 without any (b0_scale's choice).
            overall = (
                signal[:, b0].mean(axis=1, keepdims=True)
                if b0.any()
                else np.ones((len(signal), 1))
            )
            normalised = signal / per_volume
            precision = _precision(per_volume, overall, protocol)
        return cls(normalised, scale, overall[:, 0], precision)

    def __len__(self):
        return len(self.normalised)

    def __getitem__(self, rows):
        return VoxelSignals(
            self.normalised[rows], self.scale[rows], self.s0[rows], self.precision[rows]
        )


def _cat(parts, like):
    if isinstance(like, torch.Tensor):
        return torch.cat(parts, dim=-1)
    return np.concatenate(parts, axis=-1)
