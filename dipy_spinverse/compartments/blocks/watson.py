"""Watson-dispersed sticks and zeppelins (NODDI's neurites and hindered
water), by Gauss-Legendre rules laid where the Watson density lives.

Zhang et al., NeuroImage 61, 1000 (2012) (NODDI, Watson dispersion).
"""

import functools

import numpy as np
import torch

from .gaussian import as_like, ball, column_like, cosines, zeppelin

__all__ = [
    "N_WATSON_NODES",
    "WATSON_WINDOW",
    "odi_to_kappa",
    "kappa_to_odi",
    "watson_stick",
    "watson_stick_from_beta",
    "watson_zeppelin",
    "watson_hindered",
    "watson_tau",
    "watson_tau_slope",
    "watson_legendre_moments",
]

# Gauss-Legendre nodes on [0, 1] for the Watson integrals. The integrand
# exp(lam (t^2 - 1)) narrows to a width ~1 / (2 lam) at t = 1, where the nodes
# cluster ~1 / n^2 apart. Measured against a 800 x 400 product rule on the
# sphere for b d_par <= 30: error < 1e-13 up to kappa = 16 and 2e-9 at
# kappa = 64 (ODI = 0.01, the models' lower bound); 48 nodes are needed for
# 1e-11 at kappa = 128.
N_WATSON_NODES = 32


def odi_to_kappa(odi):
    """Watson concentration from the orientation dispersion index.

    ``ODI = (2 / pi) arctan(1 / kappa)`` (Zhang et al. 2012), so
    ``kappa = 1 / tan(pi ODI / 2)``; ODI in (0, 1].
    """
    return 1.0 / torch.tan(torch.pi * torch.as_tensor(odi) / 2.0)


def kappa_to_odi(kappa):
    """Orientation dispersion index ``(2 / pi) arctan(1 / kappa)``."""
    return 2.0 / torch.pi * torch.atan(1.0 / torch.as_tensor(kappa))


@functools.lru_cache(maxsize=8)
def _watson_nodes(n_nodes):
    t, w = np.polynomial.legendre.leggauss(n_nodes)
    return (t + 1.0) / 2.0, w / 2.0


#: Concentration above which the Watson rules are laid on a window at the
#: pole instead of the whole of t in [0, 1]: a density ``exp(-c (1 - t^2))``
#: has a peak of width about ``1 / (2 c)`` at t = 1, which 32 nodes on [0, 1]
#: resolve to 1e-13 up to c = 32 but not beyond (the Watson mean tau was off
#: by 2.7e-3 at kappa = 1e5 and NaN at kappa = inf). On ``1 - t in [0, 32 /
#: c]`` the density falls to ``exp(-64) = 1.6e-28`` of its peak at the far
#: end and looks like the c = 32 density on [0, 1] to the rule.
WATSON_WINDOW = 32.0


def _watson_rule(c, n_nodes):
    """Nodes ``s = 1 - t^2`` (..., n_nodes) and weights (n_nodes,) of
    ``int_0^1 f(t) dt`` for integrands peaked like ``exp(-c (1 - t^2))``,
    and the window's length ``h`` (...): the integral is ``h sum w f``.

    Up to :data:`WATSON_WINDOW` the Gauss-Legendre rule on [0, 1] (the same
    nodes, bit for bit, as before the window existed); beyond it the rule on
    ``1 - t`` in ``[0, WATSON_WINDOW / c]``, with ``s = u (2 - u)`` for
    ``u = 1 - t`` (no cancellation at the pole).
    """
    t, w = (as_like(a, c) for a in _watson_nodes(n_nodes))
    h = _window(c)
    u = h[..., None] * (1.0 - t)
    s = torch.where(h[..., None] < 1.0, u * (2.0 - u), 1.0 - t**2)
    return s, w, h


def _window(c):
    """Length of :func:`_watson_rule`'s window for concentration ``c``."""
    return WATSON_WINDOW / c.detach().clamp_min(WATSON_WINDOW)


def _bingham_integral(lam_plus, lam_minus, n_nodes):
    """``int_0^1 exp(lam_plus (t^2 - 1)) i0e(lam_minus (1 - t^2) / 2) dt``
    divided by the length of its rule's window (:func:`_watson_rule`).

    ``exp(lam_plus) * this`` is the uniform average over the sphere of
    ``exp(n^T A n)`` for a symmetric A with eigenvalues (lam_plus, lam_minus,
    0), lam_minus <= 0 <= lam_plus: t is the coordinate along the first
    eigenvector and the angle around it is integrated exactly (a Bessel I0).
    Its derivatives are written out (:class:`_BinghamIntegral`), so that
    forward-mode differentiation costs one extra pass over the nodes however
    many directions are differentiated, and autograd never stores the
    (..., n_nodes) intermediates.
    """
    return _BinghamIntegral.apply(lam_plus, lam_minus, n_nodes)


def _bingham_terms(lam_plus, lam_minus, n_nodes):
    # The integrand is at most exp(-lam_plus s): the window follows lam_plus.
    # Its length is the caller's (:func:`_bingham_integral`); here the sums
    # are over the window's nodes only.
    s, w, _ = _watson_rule(lam_plus, n_nodes)
    decay = torch.exp(-lam_plus[..., None] * s)
    return decay, lam_minus[..., None] * (s / 2.0), s, w


def _bingham_value(lam_plus, lam_minus, n_nodes):
    decay, z, _, w = _bingham_terms(lam_plus, lam_minus, n_nodes)
    return (decay * torch.special.i0e(z)) @ w


def _bingham_partials(lam_plus, lam_minus, n_nodes):
    """Derivatives of :func:`_bingham_value` with respect to both arguments.

    d/dz i0e(z) = i1e(z) - sign(z) i0e(z), and z <= 0 here.
    """
    decay, z, s, w = _bingham_terms(lam_plus, lam_minus, n_nodes)
    i0 = torch.special.i0e(z)
    d_plus = (-s * decay * i0) @ w
    d_minus = (s / 2.0 * decay * (torch.special.i1e(z) + i0)) @ w
    return d_plus, d_minus


class _BinghamIntegral(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(lam_plus, lam_minus, n_nodes):
        return _bingham_value(lam_plus, lam_minus, n_nodes)

    @staticmethod
    def setup_context(ctx, inputs, output):
        lam_plus, lam_minus, n_nodes = inputs
        ctx.n_nodes = n_nodes
        ctx.save_for_backward(lam_plus, lam_minus)
        ctx.save_for_forward(lam_plus, lam_minus)

    @staticmethod
    def backward(ctx, grad):
        lam_plus, lam_minus = ctx.saved_tensors
        d_plus, d_minus = _bingham_partials(lam_plus, lam_minus, ctx.n_nodes)
        return grad * d_plus, grad * d_minus, None

    @staticmethod
    def jvp(ctx, t_plus, t_minus, _):
        lam_plus, lam_minus = ctx.saved_tensors
        d_plus, d_minus = _bingham_partials(lam_plus, lam_minus, ctx.n_nodes)
        return d_plus * t_plus + d_minus * t_minus


def watson_stick_from_beta(beta, c, kappa, n_nodes):
    """Watson average of ``exp(-beta (g . n)^2)``; ``c = g . mu``.

    The average is ``<exp(n^T A n)>_uniform / <exp(kappa (mu . n)^2)>_uniform``
    with ``A = kappa mu mu^T - beta g g^T``, whose non-zero eigenvalues solve
    ``l^2 - (kappa - beta) l - kappa beta (1 - c^2) = 0``.

    Parameters
    ----------
    beta : torch.Tensor
        ``b d_par`` of each measurement.
    c : torch.Tensor
        Cosines ``g . mu`` of the gradients with the mean direction.
    kappa : torch.Tensor
        Watson concentration.
    n_nodes : int
        Gauss-Legendre nodes of the integrals.

    Returns
    -------
    torch.Tensor
        The stick signal, broadcast over the arguments.
    """
    s2 = (1.0 - c**2).clamp_min(0.0)
    tr = kappa - beta
    det = -kappa * beta * s2  # <= 0: one root of each sign
    # The tiny offset keeps the square root differentiable where both roots
    # vanish (kappa = beta with g along mu); it moves no value.
    disc = torch.sqrt(tr**2 - 4.0 * det + 1e-300)
    # The larger-magnitude root from the sum, the other from the product:
    # no cancellation when |tr| >> |det|.
    big = torch.where(tr >= 0, tr + disc, tr - disc) / 2.0
    safe_big = torch.where(big == 0, torch.ones_like(big), big)
    other = torch.where(big == 0, torch.zeros_like(big), det / safe_big)
    lam_plus = torch.where(tr >= 0, big, other)
    lam_minus = torch.where(tr >= 0, other, big)
    numerator = _bingham_integral(lam_plus, lam_minus, n_nodes)
    norm, window = _watson_norm(kappa, n_nodes)
    # Each integral is its window's length times its sum: their ratio.
    windows = _window(lam_plus) / window
    # lam_plus - kappa <= 0, so nothing overflows; where tr >= 0 it is
    # (disc - kappa - beta) / 2, written without the cancellation that left
    # 3e-6 errors at kappa = 1e12: disc^2 - (kappa + beta)^2 = -4 kappa beta c^2.
    excess = torch.where(
        tr >= 0,
        -2.0 * kappa * beta * (1.0 - s2) / (disc + kappa + beta),
        lam_plus - kappa,
    )
    return torch.exp(excess) * windows * numerator / norm


def _watson_norm(kappa, n_nodes):
    """``int_0^1 exp(kappa (t^2 - 1)) dt``, the Watson normalisation / e^kappa,
    divided by the length of its rule's window, and that length.

    The same rule as the numerator's at b = 0 (where ``lam_plus = kappa``),
    so that the signal is exactly 1 there.
    """
    s, w, h = _watson_rule(kappa, n_nodes)
    return torch.exp(-kappa[..., None] * s) @ w, h


def _without_dispersion(kappa, value, limit):
    """``value(kappa)``, and ``limit`` where kappa is infinite (ODI = 0,
    no dispersion): the quadrature's window shrinks to nothing there. The
    infinite entries are evaluated at kappa = 1 and discarded, so that no
    NaN reaches the gradients."""
    infinite = torch.isinf(kappa)
    if not infinite.any():
        return value(kappa)
    finite = torch.where(infinite, torch.ones_like(kappa), kappa)
    return torch.where(infinite, limit, value(finite))


def watson_stick(acq, *, direction, kappa, d_par, n_nodes=N_WATSON_NODES):
    """Sticks with Watson-distributed axes (the NODDI intra-neurite signal).

    ``E = int W(n) exp(-b d_par (g . n)^2) dn`` with
    ``W(n) ~ exp(kappa (mu . n)^2)``. Evaluated as a ratio of Bingham
    normalising constants, one 1-D Gauss-Legendre integral each (see Notes).

    Parameters
    ----------
    acq : Acquisition
    direction : array_like, shape (..., 3)
        Mean axis mu (unit).
    kappa : float or array_like, shape (...)
        Watson concentration (>= 0, inf for no dispersion: the sticks along
        mu); see :func:`odi_to_kappa`.
    d_par : float or array_like, shape (...)
        Diffusivity along each stick in um^2/us.
    n_nodes : int, optional
        Quadrature nodes on [0, 1].

    Notes
    -----
    ``W(n) exp(-beta (g . n)^2) ~ exp(n^T A n)`` with ``A = kappa mu mu^T -
    beta g g^T``, a Bingham density with eigenvalues (lam+, lam-, 0). With t
    the coordinate along the lam+ eigenvector the azimuthal integral is
    ``exp(lam- (1 - t^2) / 2) I0(lam- (1 - t^2) / 2)``, leaving a smooth 1-D
    integral over t. Exact (to quadrature accuracy) at every b, unlike the
    truncated spherical-harmonic series of the NODDI toolbox, and at every
    concentration: above :data:`WATSON_WINDOW` the rule is laid on the
    window at the pole where the density lives (1e-12 against an independent
    quadrature up to kappa = 1e8, ``tests/test_compartments.py``).
    """
    beta = acq.bvals * column_like(d_par, acq.bvals)
    c = cosines(acq, direction)
    kappa, c = torch.broadcast_tensors(column_like(kappa, acq.bvals), c)
    return _without_dispersion(
        kappa,
        lambda k: watson_stick_from_beta(beta, c, k, n_nodes),
        torch.exp(-beta * c * c),  # sticks along mu
    )


def watson_zeppelin(acq, *, direction, kappa, d_par, d_perp, n_nodes=N_WATSON_NODES):
    """Watson average of zeppelin signals (exact signal average).

    ``exp(-b d_perp) x`` :func:`watson_stick` with ``d_par - d_perp``.

    Parameters
    ----------
    acq : Acquisition
    direction : array_like, shape (..., 3)
    kappa : float or array_like, shape (...)
    d_par, d_perp : float or array_like, shape (...)
        Diffusivities in um^2/us along and across each zeppelin, d_perp <= d_par.
    n_nodes : int, optional
    """
    d_perp = as_like(d_perp, acq.bvals)
    delta = as_like(d_par, acq.bvals) - d_perp
    sticks = watson_stick(
        acq, direction=direction, kappa=kappa, d_par=delta, n_nodes=n_nodes
    )
    return ball(acq, diffusivity=d_perp) * sticks


def watson_tau(kappa, *, n_nodes=N_WATSON_NODES):
    """``<(mu . n)^2>`` under a Watson distribution (1/3 at kappa = 0, -> 1).

    Equal to ``1 / (2 sqrt(kappa) F(sqrt(kappa))) - 1 / (2 kappa)`` with F
    Dawson's function; evaluated with the Watson quadrature so that it is
    smooth in kappa (including 0).

    Parameters
    ----------
    kappa : float or array_like
        Watson concentration (dimensionless, >= 0).
    n_nodes : int, optional
        Nodes of the Watson quadrature.

    Returns
    -------
    torch.Tensor
        ``tau`` per kappa, float64, in [1/3, 1).
    """
    kappa = torch.as_tensor(kappa, dtype=torch.float64)
    return _without_dispersion(
        kappa, lambda k: _watson_moments(k, n_nodes)[0], torch.ones_like(kappa)
    )


def _watson_moments(kappa, n_nodes):
    """``<(mu . n)^2>`` and ``<(mu . n)^4> - <(mu . n)^2>^2`` (finite kappa)."""
    s, w, _ = _watson_rule(kappa, n_nodes)
    density = w * torch.exp(-kappa[..., None] * s)
    norm = density.sum(-1)
    t2 = 1.0 - s
    tau = (density * t2).sum(-1) / norm
    return tau, (density * t2 * t2).sum(-1) / norm - tau**2


def watson_tau_slope(kappa, *, n_nodes=N_WATSON_NODES):
    """``d tau / d kappa`` of :func:`watson_tau`, on the same quadrature:
    the Watson variance of ``(mu . n)^2``, ``<(mu . n)^4> - tau^2``.

    Parameters
    ----------
    kappa : float or array_like
        Watson concentration (dimensionless, >= 0).
    n_nodes : int, optional
        Nodes of the Watson quadrature.

    Returns
    -------
    torch.Tensor
        ``d tau / d kappa`` per kappa, float64.
    """
    kappa = torch.as_tensor(kappa, dtype=torch.float64)
    return _without_dispersion(
        kappa, lambda k: _watson_moments(k, n_nodes)[1], torch.zeros_like(kappa)
    )


def watson_hindered(acq, *, direction, kappa, d_par, d_perp):
    """NODDI's extra-neurite signal: the zeppelin of the Watson-averaged tensor.

    Zhang et al. (2012) average the diffusion tensor, not the signal:
    ``D = d_perp I + (d_par - d_perp) <n n^T>``, i.e. a zeppelin along mu with
    ``d_par' = d_perp + (d_par - d_perp) tau`` and
    ``d_perp' = d_perp + (d_par - d_perp) (1 - tau) / 2``,
    ``tau = <(mu . n)^2>`` (:func:`watson_tau`).

    Parameters
    ----------
    acq : Acquisition
    direction : array_like, shape (..., 3)
    kappa : float or array_like, shape (...)
    d_par, d_perp : float or array_like, shape (...)
        Diffusivities of each (undispersed) zeppelin in um^2/us.
    """
    tau = watson_tau(as_like(kappa, acq.bvals))
    d_par = as_like(d_par, acq.bvals)
    d_perp = as_like(d_perp, acq.bvals)
    spread = d_par - d_perp
    return zeppelin(
        acq,
        direction=direction,
        d_par=d_perp + spread * tau,
        d_perp=d_perp + spread * (1.0 - tau) / 2.0,
    )


#: Nodes of :func:`watson_legendre_moments`: its integrands carry a Legendre
#: polynomial of degree up to 2 (n_terms - 1) besides the density, so the
#: rule has twice the stick's nodes (1e-13 against adaptive quadrature up to
#: l = 30 at every concentration, ``tests/compartments/test_zonal.py``).
N_MOMENT_NODES = 64


def watson_legendre_moments(kappa, n_terms, *, n_nodes=N_MOMENT_NODES):
    """Even Legendre moments ``<P_l(mu . n)>`` of Watson distributions.

    ``p_l = int P_l(t) exp(kappa t^2) dt / int exp(kappa t^2) dt`` over t
    in [0, 1] (the density is even in t; the odd moments vanish). With
    them an axially symmetric response dispersed about mu is a sum of
    Legendre polynomials in ``g . mu`` (Funk-Hecke;
    :func:`~.zonal.dispersed_response`).

    Parameters
    ----------
    kappa : float or array_like, shape (...)
        Watson concentration, >= 0; inf for no dispersion (every moment 1).
    n_terms : int
        Moments of l = 0, 2, ..., 2 (n_terms - 1).
    n_nodes : int, optional
        Nodes of the Watson rule (:data:`N_MOMENT_NODES`).

    Returns
    -------
    torch.Tensor, shape (..., n_terms)
        float64; ``p_0 = 1``; at kappa = 0 every other moment is 0.
    """
    kappa = torch.as_tensor(kappa, dtype=torch.float64)
    if torch.any(torch.isnan(kappa) | (kappa < 0)):
        raise ValueError(
            f"kappa must be >= 0 (inf: no dispersion), got {kappa.tolist()}; "
            "a Watson concentration of 0 is isotropic."
        )
    infinite = torch.isinf(kappa)
    finite = torch.where(infinite, torch.ones_like(kappa), kappa)
    s, w, _ = _watson_rule(finite, n_nodes)
    density = w * torch.exp(-finite[..., None] * s)
    t = torch.sqrt((1.0 - s).clamp_min(0.0))
    moments = density[..., None, :] * even_legendre(t, n_terms).movedim(-1, -2)
    moments = moments.sum(-1) / density.sum(-1)[..., None]
    return torch.where(infinite[..., None], torch.ones_like(moments), moments)


def even_legendre(x, n_terms):
    """``P_l(x)`` for l = 0, 2, ..., 2 (n_terms - 1), by Bonnet's recurrence.

    Parameters
    ----------
    x : torch.Tensor, shape (...)
    n_terms : int

    Returns
    -------
    torch.Tensor, shape (..., n_terms)
    """
    previous, current = torch.ones_like(x), x
    even = [previous]
    for degree in range(1, 2 * (n_terms - 1)):
        previous, current = (
            current,
            ((2 * degree + 1) * x * current - degree * previous) / (degree + 1),
        )
        if degree % 2 == 1:
            even.append(current)
    return torch.stack(even[:n_terms], dim=-1)
