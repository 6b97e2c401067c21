"""Gaussian compartments: ball, dot, stick and zeppelin (and the zeppelin's
derivatives), with the tensor helpers every block uses.

Behrens et al., Magn. Reson. Med. 50, 1077 (2003) (ball and stick).
"""

import torch

__all__ = [
    "ball",
    "dot",
    "stick",
    "zeppelin",
    "zeppelin_derivatives",
    "cosines",
    "as_like",
    "column_like",
]


def as_like(x, like):
    """``x`` as a tensor of ``like``'s dtype and device.

    Parameters
    ----------
    x : array_like or torch.Tensor
        A parameter as given.
    like : torch.Tensor
        The tensor whose dtype and device it takes (the b-values).

    Returns
    -------
    torch.Tensor
    """
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def column_like(x, like):
    """Scalar parameter of shape (...) as (..., 1), to broadcast over M.

    Parameters
    ----------
    x : array_like or torch.Tensor
        The parameter, shape (...).
    like : torch.Tensor
        The tensor whose dtype and device it takes (the b-values).

    Returns
    -------
    torch.Tensor
        Shape (..., 1).
    """
    return as_like(x, like)[..., None]


def cosines(acq, direction):
    """``g . n`` for every acquisition, shape (..., M).

    Parameters
    ----------
    acq : Acquisition
    direction : array_like, shape (..., 3)
        Unit vectors.
    """
    return as_like(direction, acq.bvals) @ acq.bvecs.T


def ball(acq, *, diffusivity):
    """Isotropic free diffusion, ``exp(-b D)``.

    Parameters
    ----------
    acq : Acquisition
    diffusivity : float or array_like, shape (...)
        D in um^2/us (== mm^2/s).
    """
    return torch.exp(-acq.bvals * column_like(diffusivity, acq.bvals))


def dot(acq, *, shape=()):
    """Stationary water (a "dot"): signal 1 for every acquisition.

    Parameters
    ----------
    acq : Acquisition
        The acquisitions (M of them).
    shape : tuple of int, optional
        The batch shape of the signals.

    Returns
    -------
    torch.Tensor, shape (*shape, M)
        Ones, in ``acq``'s dtype.
    """
    return torch.ones(tuple(shape) + (len(acq),), dtype=acq.dtype)


def stick(acq, *, direction, d_par):
    """Diffusion along a line, ``exp(-b d_par (g . n)^2)``.

    Parameters
    ----------
    acq : Acquisition
    direction : array_like, shape (..., 3)
        Unit axis n.
    d_par : float or array_like, shape (...)
        Diffusivity along n in um^2/us.
    """
    c = cosines(acq, direction)
    return torch.exp(-acq.bvals * column_like(d_par, acq.bvals) * c**2)


def zeppelin(acq, *, direction, d_par, d_perp):
    """Axially symmetric tensor, ``exp(-b (d_perp + (d_par - d_perp)(g . n)^2))``.

    Parameters
    ----------
    acq : Acquisition
    direction : array_like, shape (..., 3)
        Unit axis n.
    d_par, d_perp : float or array_like, shape (...)
        Diffusivities along and across n in um^2/us.
    """
    c = cosines(acq, direction)
    d_perp = column_like(d_perp, acq.bvals)
    d_par = column_like(d_par, acq.bvals)
    return torch.exp(-acq.bvals * (d_perp + (d_par - d_perp) * c**2))


def zeppelin_derivatives(acq, *, direction, d_par, d_perp):
    """:func:`zeppelin` and its derivatives in d_par, d_perp and ``g . n``.

    Parameters
    ----------
    acq : Acquisition
        The acquisitions (M of them).
    direction : array_like, shape (..., 3)
        Unit axis n.
    d_par, d_perp : float or array_like, shape (...)
        Diffusivities along and across n in um^2/us.

    Returns
    -------
    value, d_par_slope, d_perp_slope, d_cos : torch.Tensor, shape (..., M)
    """
    cos = cosines(acq, direction)
    t = cos * cos
    d_par, d_perp = column_like(d_par, acq.bvals), column_like(d_perp, acq.bvals)
    b = acq.bvals
    value = torch.exp(-b * (d_perp + (d_par - d_perp) * t))
    d_cos = -2.0 * b * (d_par - d_perp) * cos * value
    return value, -b * t * value, -b * (1.0 - t) * value, d_cos
