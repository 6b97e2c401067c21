"""Torch view of an acquisition protocol for the compartment models.

Units are the package's internal ones: b in us/um^2 (numerically s/mm^2), the
gradient rate ``gamma G`` in rad/(um us), waveform durations in us.
"""

from dataclasses import dataclass

import numpy as np
import torch
from dipy.core.gradients import GradientTable

from ..sim.sequences import Protocol, check_bvals, check_linear_encoding, unit_rows

__all__ = ["Acquisition"]

DTYPE = torch.float64


@dataclass(frozen=True, eq=False)
class Acquisition:
    """Acquisitions as torch tensors, shared by every building block.

    Parameters
    ----------
    bvals : torch.Tensor, shape (M,)
        b-values in us/um^2 (== s/mm^2).
    bvecs : torch.Tensor, shape (M, 3)
        Unit gradient directions (zero rows where b = 0).
    g2 : torch.Tensor, shape (M,) or None
        Squared gradient rate ``(gamma G)^2`` in rad^2/(um^2 us^2); ``b = g2 *
        bfactor`` of the acquisition's waveform. None without timing.
    waveform_index : torch.Tensor, shape (M,) or None
        Index of each acquisition's waveform in ``durations``.
    durations, amplitudes : torch.Tensor, shape (W, P) or None
        The W distinct piecewise-constant waveforms (effective gradient, us and
        normalised amplitudes), padded with zero-length pieces to P pieces.
    """

    bvals: torch.Tensor
    bvecs: torch.Tensor
    g2: torch.Tensor | None = None
    waveform_index: torch.Tensor | None = None
    durations: torch.Tensor | None = None
    amplitudes: torch.Tensor | None = None

    @property
    def has_timing(self):
        """Whether the waveforms are known (restricted and exchange blocks)."""
        return self.durations is not None

    @property
    def dtype(self):
        return self.bvals.dtype

    def __len__(self):
        return int(self.bvals.shape[0])

    @classmethod
    def from_protocol(cls, protocol, *, dtype=DTYPE):
        """Build from a :class:`~dipy_spinverse.sim.sequences.Protocol`."""
        groups = protocol.groups()
        n_pieces = max(len(w.segments[0]) for w, _ in groups)
        durations = np.zeros((len(groups), n_pieces))
        amplitudes = np.zeros((len(groups), n_pieces))
        index = np.zeros(len(protocol), dtype=np.int64)
        for j, (waveform, idx) in enumerate(groups):
            tau, f = waveform.segments
            # Zero-length pieces change nothing: no phase, no decay, no mixing.
            durations[j, : tau.size] = tau
            amplitudes[j, : f.size] = f
            index[idx] = j
        rate = np.asarray(protocol.gradient_rate)

        def tensor(a):
            return torch.tensor(np.array(a), dtype=dtype)

        return cls(
            bvals=tensor(protocol.bvals),
            bvecs=tensor(protocol.bvecs),
            g2=tensor(np.sum(rate**2, axis=1)),
            waveform_index=torch.as_tensor(index),
            durations=tensor(durations),
            amplitudes=tensor(amplitudes),
        )

    @classmethod
    def from_gtab(cls, gtab, *, timing=True, dtype=DTYPE):
        """Build from a DIPY gradient table.

        Parameters
        ----------
        gtab : dipy.core.gradients.GradientTable
            With ``big_delta`` and ``small_delta`` in seconds (scalars or one
            per volume) when ``timing`` is True.
        timing : bool, optional
            Require the timing (through :meth:`Protocol.from_gtab`, which maps
            b <= ``gtab.b0_threshold`` to 0). If False the table's b-values are
            used as they are and only b-value blocks (ball, stick, zeppelin,
            Watson) can be evaluated. Either way the b-values are checked as
            :func:`~dipy_spinverse.sim.sequences.check_bvals` does (in s/mm^2,
            with a diffusion-weighted shell).
        dtype : torch.dtype, optional

        Returns
        -------
        acq : Acquisition
        """
        if not isinstance(gtab, GradientTable):
            raise ValueError(
                f"gtab must be a dipy GradientTable, got {type(gtab).__name__}; "
                "build one with dipy.core.gradients.gradient_table(bvals, "
                "bvecs=..., big_delta=..., small_delta=...)"
            )
        if timing:
            return cls.from_protocol(Protocol.from_gtab(gtab), dtype=dtype)
        # As Protocol.from_gtab: b-values in another unit (ms/um^2) or no
        # weighted volume would otherwise be fitted silently.
        threshold = 0.0 if gtab.b0_threshold is None else gtab.b0_threshold
        bvals = check_bvals(gtab.bvals, b0_threshold=threshold)
        # The b-value blocks assume linear encoding too (a spherical b-tensor
        # would be fitted as if it were one direction).
        check_linear_encoding(gtab.btens, np.where(bvals <= threshold, 0.0, bvals))
        bvecs = unit_rows(gtab.bvecs)
        return cls(
            bvals=torch.as_tensor(bvals, dtype=dtype),
            bvecs=torch.as_tensor(bvecs, dtype=dtype),
        )

    def require_timing(self, what):
        """Raise ValueError if the waveforms are unknown."""
        if not self.has_timing:
            raise ValueError(
                f"{what} needs the gradient timing; build the Acquisition with "
                "timing=True from a gradient table with big_delta and "
                "small_delta (seconds)"
            )
