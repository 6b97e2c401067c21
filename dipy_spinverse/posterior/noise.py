"""The noise a fit sees, put on simulations: the posterior's training inputs.

A simulation of the prior is noise-free, 1 at b = 0 and on the prior's grid.
The network is trained on what a fit would give it (:func:`noisy_inputs`):
a Rician magnitude (:func:`add_noise`) at a noise level drawn afresh for
every batch, log-uniform in the training's signal-to-noise range, then
b0-normalised as the data are; where the grid's approximation error is
modelled, a draw of it first (:func:`add_model_error`). The noise level is
an input of the network, so one network serves every noise level.
"""

import math

import torch

from ..sim.signals import normalise_b0

__all__ = ["add_noise", "add_model_error", "noisy_inputs"]


def add_noise(signal, sigma, generator=None):
    """Rician magnitude of ``signal`` (B, n) with noise ``sigma`` (B,).

    Parameters
    ----------
    signal : Tensor (B, n)
    sigma : Tensor (B,)
        Noise standard deviation of each row.
    generator : torch.Generator, optional

    Returns
    -------
    Tensor (B, n)
    """
    shape = (2,) + tuple(signal.shape)
    noise = torch.randn(shape, generator=generator, dtype=signal.dtype) * sigma[:, None]
    return torch.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2)


def _draw_sigma(n, snr_range, generator, dtype):
    low, high = math.log(snr_range[0]), math.log(snr_range[1])
    u = torch.rand(n, generator=generator, dtype=dtype)
    return torch.exp(-(low + (high - low) * u))


def add_model_error(signal, errors, generator=None):
    """``signal`` (B, n) plus draws of a Gaussian of the mean and covariance
    of ``errors`` (m, n): the simulator's approximation error.

    Each draw is ``mean + z @ (errors - mean) / sqrt(m - 1)`` with ``z``
    standard normal (B, m): exactly the errors' sample covariance, without
    factorising it.

    Parameters
    ----------
    signal : Tensor (B, n)
    errors : Tensor (m, n) or None
        Samples of the error (reference minus prior-grid signals); None
        returns ``signal`` as it is.
    generator : torch.Generator, optional

    Returns
    -------
    Tensor (B, n)
    """
    if errors is None:
        return signal
    errors = errors.to(signal.dtype)
    mean = errors.mean(0)
    z = torch.randn(
        (len(signal), len(errors)), generator=generator, dtype=signal.dtype
    ) / math.sqrt(len(errors) - 1)
    return signal + mean + z @ (errors - mean)


def noisy_inputs(signal, protocol, snr_range, generator, model_error=None):
    """Noisy, b0-normalised training inputs and their sigma (relative to the
    b = 0 signal of 1), as a fit would see them (with the simulator's
    approximation error, when given: :func:`add_model_error`).

    Parameters
    ----------
    signal : Tensor (B, n_acquisitions)
        Noise-free simulated signals.
    protocol : Protocol
    snr_range : (float, float)
        Signal-to-noise ratios of the noise, log-uniform.
    generator : torch.Generator
    model_error : Tensor (m, n_acquisitions), optional
        Samples of the simulator's approximation error.

    Returns
    -------
    noisy : Tensor (B, n_acquisitions)
    sigma : Tensor (B,)
    """
    sigma = _draw_sigma(len(signal), snr_range, generator, signal.dtype)
    signal = add_model_error(signal, model_error, generator)
    noisy = normalise_b0(add_noise(signal, sigma, generator), protocol)
    return noisy, sigma
