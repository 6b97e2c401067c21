"""Measured and simulated signals on a common footing: b0 scaling and misfit.

Every part of the package that compares a signal with a prediction -- the face
fit, the label search, the DIPY fit's residual map and the reports -- goes
through the two functions here, so that they all normalise and score alike.

The simulator predicts the b0-normalised signal (``S(b = 0) = 1``); a voxel
is brought to that scale by dividing each sequence by its own mean b = 0
signal, which cancels T2 weighting that differs between echo times.
"""

import numpy as np
import torch

__all__ = ["b0_scale", "normalise_b0", "sequence_index", "data_loss"]


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


def sequence_index(protocol):
    """Rank (in :meth:`Protocol.sequences` order) of each acquisition's sequence."""
    index = np.empty(len(protocol), dtype=np.intp)
    for rank, (_, idx) in enumerate(protocol.sequences()):
        index[idx] = rank
    return index


def data_loss(
    predicted, measured, *, loss_scale, sigma=0.0, noise="gaussian", weights=None
):
    """Weighted signal misfit per voxel, the data term of every fit.

    ``loss_scale * sum(w * (E[S] - y)^2) / sum(w)``, where ``E[S]`` is the
    predicted signal, or with ``noise="rician"`` and ``sigma > 0`` its Rician
    floor ``sqrt(S^2 + sigma^2)``: the magnitude of a signal plus complex
    Gaussian noise of relative level ``sigma`` has about that mean above the
    noise floor.

    Parameters
    ----------
    predicted, measured : torch.Tensor (..., n)
        b0-normalised signals.
    loss_scale : float
    sigma : float
        Noise level relative to the b = 0 signal (1/SNR; 0 if unknown).
    noise : {"gaussian", "rician"}
    weights : torch.Tensor (n,), optional
        Per-acquisition weights (default 1).

    Returns
    -------
    loss : torch.Tensor (...)
    """
    if noise == "rician" and sigma > 0:
        predicted = torch.sqrt(predicted**2 + sigma**2)
    residual = (predicted - measured) ** 2
    if weights is None:
        return loss_scale * residual.mean(-1)
    return loss_scale * (residual * weights).sum(-1) / weights.sum()


def _cat(parts, like):
    if isinstance(like, torch.Tensor):
        return torch.cat(parts, dim=-1)
    return np.concatenate(parts, axis=-1)
