"""Axially symmetric responses and their orientation dispersion, in zonal
harmonics (the standard model's kernel: Jespersen et al. 2007; Novikov et
al. 2019).

A straight fibre whose cross-section is isotropic on average gives a signal
``E(x)`` that depends on the gradient only through ``x = g . n``, the cosine
to its axis, and is even in x (a magnitude: ``g`` and ``-g`` read alike).
Tabulated at the ``n`` positive nodes of the ``2 n``-point Gauss-Legendre
rule on [-1, 1] (:func:`axial_nodes`), its even Legendre coefficients

    e_l = (2 l + 1) / 2 int_{-1}^{1} E(x) P_l(x) dx,   l = 0, 2, ..., 2 n - 2,

are exact when ``E`` is an even polynomial of degree ``2 n - 2`` or less
(the rule integrates degree ``4 n - 1``), and then ``sum_l e_l P_l(x)``
gives ``E`` back everywhere. For a smooth response the error falls
geometrically with ``n``.

Fibres whose axes follow an orientation distribution that is axially
symmetric about ``mu``, with moments ``p_l = <P_l(n . mu)>``, give (the
Funk-Hecke theorem)

    S(g) = int f(n) E(g . n) dn = sum_l e_l p_l P_l(g . mu),

so one table of a fibre serves every dispersion and every mean axis: a
Watson distribution's moments are
:func:`~.watson.watson_legendre_moments`. At ``p_l = 1`` (no dispersion)
the sum is the table's interpolant; at ``p_l = 0`` for l > 0 (isotropic) it
is the powder average ``e_0``.
"""

import functools

import numpy as np
import torch

from .watson import even_legendre, watson_legendre_moments

__all__ = [
    "axial_nodes",
    "zonal_coefficients",
    "dispersed_response",
    "watson_dispersed",
]


@functools.lru_cache(maxsize=16)
def _rule(n_nodes):
    x, w = np.polynomial.legendre.leggauss(2 * n_nodes)
    keep = x > 0
    return x[keep], w[keep]


def axial_nodes(n_nodes):
    """Cosines where an axially symmetric response is tabulated.

    Parameters
    ----------
    n_nodes : int
        How many (>= 1).

    Returns
    -------
    ndarray, shape (n_nodes,)
        The positive nodes of the ``2 n_nodes``-point Gauss-Legendre rule on
        [-1, 1], increasing.
    """
    if int(n_nodes) != n_nodes or n_nodes < 1:
        raise ValueError(f"n_nodes must be a whole number >= 1, got {n_nodes!r}.")
    return _rule(int(n_nodes))[0].copy()


def zonal_coefficients(values):
    """Even Legendre coefficients of a response tabulated at :func:`axial_nodes`.

    Parameters
    ----------
    values : array_like, shape (..., n_nodes)
        The response at ``axial_nodes(n_nodes)``.

    Returns
    -------
    torch.Tensor, shape (..., n_nodes)
        float64 ``e_l`` for l = 0, 2, ..., 2 n_nodes - 2 (module
        documentation): ``(2 l + 1) sum_j w_j E(x_j) P_l(x_j)`` over the
        positive nodes (the negative half mirrors them).
    """
    values = torch.as_tensor(values, dtype=torch.float64)
    n_nodes = values.shape[-1]
    x, w = (torch.as_tensor(a) for a in _rule(n_nodes))
    legendre = even_legendre(x, n_nodes)  # (n_nodes, n_terms)
    degrees = torch.arange(0, 2 * n_nodes, 2, dtype=torch.float64)
    return (values * w) @ legendre * (2 * degrees + 1)


def dispersed_response(coefficients, cosines, moments):
    """``sum_l e_l p_l P_l(g . mu)``: a tabulated response dispersed about mu.

    Parameters
    ----------
    coefficients : array_like, shape (..., n_terms)
        :func:`zonal_coefficients` of the response.
    cosines : array_like, shape (...)
        ``g . mu`` for each acquisition.
    moments : array_like, shape (..., n_terms)
        ``<P_l(n . mu)>`` of the orientation distribution (all ones: no
        dispersion).

    Returns
    -------
    torch.Tensor, shape (...)
        The arguments broadcast against each other.
    """
    coefficients = torch.as_tensor(coefficients, dtype=torch.float64)
    cosines = torch.as_tensor(cosines, dtype=torch.float64)
    moments = torch.as_tensor(moments, dtype=torch.float64)
    legendre = even_legendre(cosines, coefficients.shape[-1])
    return (coefficients * moments * legendre).sum(-1)


def watson_dispersed(coefficients, cosines, kappa):
    """A tabulated response dispersed by a Watson distribution.

    Parameters
    ----------
    coefficients : array_like, shape (..., n_terms)
        :func:`zonal_coefficients` of the response.
    cosines : array_like, shape (...)
        ``g . mu`` for each acquisition.
    kappa : float or array_like, shape (...)
        Watson concentration (>= 0; inf: no dispersion).

    Returns
    -------
    torch.Tensor, shape (...)
    """
    coefficients = torch.as_tensor(coefficients, dtype=torch.float64)
    moments = watson_legendre_moments(kappa, coefficients.shape[-1])
    return dispersed_response(coefficients, cosines, moments)
