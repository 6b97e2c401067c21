"""The prior's support: whether any simulation of the prior explains a signal.

A voxel whose signal no simulation of the prior explains gets the status
``OUT_OF_PRIOR``: the mean squared difference to the nearest training
signal, in units of the noise variance (:func:`support_statistic`), is
above the :data:`SUPPORT_QUANTILE` of what held-out simulations of the prior
give at that noise level (measured once, after training:
:func:`measure_support`; between the measured noise levels,
:func:`support_limit`). The training signals and the thresholds are the
estimator's buffers ``support_signals``, ``support_log_sigma`` and
``support_threshold``, saved with it
(:meth:`~dipy_spinverse.posterior.PosteriorEstimator.support_statistic`).
"""

import numpy as np
import torch

from ..sim.signals import normalise_b0
from .noise import add_noise

__all__ = [
    "SUPPORT_QUANTILE",
    "support_statistic",
    "support_limit",
    "measure_support",
]

#: Quantile of the held-out support statistic above which a voxel is out of
#: the prior (one in-prior voxel in a thousand is flagged).
SUPPORT_QUANTILE = 0.999


@torch.no_grad()
def support_statistic(signal, sigma, reference, *, chunk=256):
    """Mean squared distance to the nearest reference signal over sigma^2.

    Parameters
    ----------
    signal : Tensor (n_voxels, n_inputs)
        On any device (computed on ``reference``'s, returned on
        ``signal``'s).
    sigma : Tensor (n_voxels,)
    reference : Tensor (n_reference, n_inputs)
        The training signals.
    chunk : int
        Voxels compared at once.

    Returns
    -------
    Tensor (n_voxels,)
    """
    ref_sq = (reference**2).sum(-1)
    out = []
    for start in range(0, len(signal), chunk):
        x = signal[start : start + chunk].to(reference.device)
        d2 = (x**2).sum(-1, keepdim=True) - 2 * x @ reference.T + ref_sq
        out.append(d2.min(-1).values.clamp_min(0).to(signal.device) / x.shape[-1])
    d2 = torch.cat(out) if out else signal.new_zeros(0)
    return d2 / sigma**2


@torch.no_grad()
def support_limit(sigma, log_sigma, threshold):
    """The support statistic's threshold at noise levels ``sigma``.

    Parameters
    ----------
    sigma : Tensor (n_voxels,)
    log_sigma : Tensor (n_levels,)
        The log noise levels the threshold was measured at, increasing.
    threshold : Tensor (n_levels,)
        The threshold at each.

    Returns
    -------
    Tensor (n_voxels,)
        Interpolated linearly in log sigma (the ends held beyond them).
    """
    grid = log_sigma.cpu().numpy()
    limit = threshold.cpu().numpy()
    return torch.as_tensor(
        np.interp(np.log(sigma.cpu().numpy()), grid, limit), dtype=sigma.dtype
    )


def measure_support(net, train, held_out, protocol, options, generator):
    """Set an estimator's training signals and, per noise level, the
    :data:`SUPPORT_QUANTILE` of the support statistic of held-out
    simulations (noisy, b0-normalised; with their approximation error, when
    modelled).

    Parameters
    ----------
    net : PosteriorEstimator
        Its buffers ``support_signals``, ``support_log_sigma`` and
        ``support_threshold`` are set.
    train : Tensor (n, n_acquisitions)
        The noise-free training signals.
    held_out : Tensor (m, n_acquisitions)
        Noise-free simulations not trained on.
    protocol : Protocol
    options : TrainingOptions
        Its ``snr_range`` (widened 2x each way) spans the noise levels.
    generator : torch.Generator
    """
    net.support_signals = train.clone()
    snrs = np.geomspace(options.snr_range[0] / 2, options.snr_range[1] * 2, 9)
    limits = []
    for snr in snrs:
        sigma = torch.full((len(held_out),), 1.0 / snr)
        noisy = normalise_b0(add_noise(held_out, sigma, generator), protocol)
        statistic = net.support_statistic(noisy, sigma)
        limits.append(float(torch.quantile(statistic, SUPPORT_QUANTILE)))
    net.support_log_sigma = torch.as_tensor(
        np.log(1.0 / snrs[::-1]).copy(), dtype=torch.float32
    )
    net.support_threshold = torch.as_tensor(limits[::-1], dtype=torch.float32)
