"""Compartment signals in torch: differentiable, batched over voxels.

Every block takes an :class:`~.acquisition.Acquisition` of M measurements and
parameters with any common leading shape ``(...)`` (voxels, atoms of a
dictionary, fibre populations); it returns normalised signals of shape
``(..., M)`` (1 at b = 0). Directions have shape ``(..., 3)`` and unit length.

Units (internal, as everywhere in ``dipy_spinverse``): lengths in um, times in
us, diffusivities in um^2/us (numerically mm^2/s), b in us/um^2 (numerically
s/mm^2), exchange rates in 1/us. The restricted blocks use the Gaussian phase
approximation (GPA) and accept any piecewise-constant waveform; they are the
torch versions of :func:`dipy_spinverse.sim.analytic.cylinder_gpa` and
:func:`~dipy_spinverse.sim.analytic.sphere_gpa` (same roots, same kernel).

References
----------
Behrens et al., Magn. Reson. Med. 50, 1077 (2003) (ball and stick).
Van Gelderen et al., J. Magn. Reson. B 103, 255 (1994) (cylinder, GPA).
Murday and Cotts, J. Chem. Phys. 48, 4938 (1968) (sphere, GPA).
Zhang et al., NeuroImage 61, 1000 (2012) (NODDI, Watson dispersion).
Karger, Adv. Magn. Reson. 21, 1 (1988); Fieremans et al., NMR Biomed. 23, 711
(2010) (two-compartment exchange).
"""

import functools
import math

import numpy as np
import torch

from ..sim import analytic

__all__ = [
    "ball",
    "dot",
    "stick",
    "zeppelin",
    "cylinder",
    "cylinder_derivatives",
    "zeppelin_derivatives",
    "GpaTable",
    "sphere",
    "watson_stick",
    "watson_zeppelin",
    "watson_hindered",
    "watson_tau",
    "WatsonStickTable",
    "odi_to_kappa",
    "kappa_to_odi",
    "karger",
]

# Eigenmodes kept in the GPA sums. The modes are evaluated per distinct
# waveform, not per acquisition, so they cost little. Against analytic.py's 60
# modes, 30 leave < 1e-9 in the signal for R <= 10 um and b <= 6000 s/mm^2
# (measured 6.5e-10; 15 modes leave 2e-8).
N_ROOTS = 30
# Gauss-Legendre nodes on [0, 1] for the Watson integrals. The integrand
# exp(lam (t^2 - 1)) narrows to a width ~1 / (2 lam) at t = 1, where the nodes
# cluster ~1 / n^2 apart. Measured against a 800 x 400 product rule on the
# sphere for b d_par <= 30: error < 1e-13 up to kappa = 16 and 2e-9 at
# kappa = 64 (ODI = 0.01, the models' lower bound); 48 nodes are needed for
# 1e-11 at kappa = 128.
N_WATSON_NODES = 32
# Below this argument x - 1 + exp(-x) is evaluated by its Taylor series.
_PHI_SERIES_X = 1e-3
# Magnus steps per waveform piece in karger(); see its Notes.
N_MAGNUS_STEPS = 4
# |s^2| below which the 2 x 2 exponential uses its Taylor series.
_EXPM_SERIES = 1e-6
_GAUSS3 = (0.5 - math.sqrt(15) / 10, 0.5, 0.5 + math.sqrt(15) / 10)


def _as(x, like):
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def _col(x, like):
    """Scalar parameter of shape (...) as (..., 1), to broadcast over M."""
    return _as(x, like)[..., None]


def cosines(acq, direction):
    """``g . n`` for every acquisition, shape (..., M).

    Parameters
    ----------
    acq : Acquisition
    direction : array_like, shape (..., 3)
        Unit vectors.
    """
    return _as(direction, acq.bvals) @ acq.bvecs.T


# --------------------------------------------------------------------------
# Gaussian compartments
# --------------------------------------------------------------------------
def ball(acq, *, diffusivity):
    """Isotropic free diffusion, ``exp(-b D)``.

    Parameters
    ----------
    acq : Acquisition
    diffusivity : float or array_like, shape (...)
        D in um^2/us (== mm^2/s).
    """
    return torch.exp(-acq.bvals * _col(diffusivity, acq.bvals))


def dot(acq, *, shape=()):
    """Stationary water (a "dot"): signal 1 for every acquisition."""
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
    return torch.exp(-acq.bvals * _col(d_par, acq.bvals) * c**2)


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
    d_perp = _col(d_perp, acq.bvals)
    d_par = _col(d_par, acq.bvals)
    return torch.exp(-acq.bvals * (d_perp + (d_par - d_perp) * c**2))


# --------------------------------------------------------------------------
# Restricted compartments, Gaussian phase approximation
# --------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _modes(geometry, n_roots):
    """Roots x_m and the constant c of the weights 1 / (x^2 (x^2 - c))."""
    if geometry == "cylinder":
        return analytic.cylinder_roots(n_roots), 1.0
    return analytic.sphere_roots(n_roots), 2.0


def _phi(x):
    """``x - 1 + exp(-x)``, by its Taylor series for small x (both finite)."""
    series = x**2 / 2.0 * (1.0 - x / 3.0 * (1.0 - x / 4.0 * (1.0 - x / 5.0)))
    return torch.where(x < _PHI_SERIES_X, series, x + torch.expm1(-x))


def _waveform_kernel(lam, durations, amplitudes):
    """``I(lam) = int int f(t1) f(t2) exp(-lam |t1 - t2|)`` per waveform.

    The torch form of ``analytic._waveform_kernel``: one pass over the pieces,
    carrying the decayed sum of the earlier pieces.

    Parameters
    ----------
    lam : torch.Tensor, shape (..., 1, K)
        Mode rates in 1/us.
    durations, amplitudes : torch.Tensor, shape (W, P)

    Returns
    -------
    kernel : torch.Tensor, shape (..., W, K), in us^2.
    """
    total = torch.zeros((), dtype=lam.dtype)
    carry = torch.zeros((), dtype=lam.dtype)
    for tau, f in zip(durations.T, amplitudes.T, strict=True):
        x = lam * tau[:, None]
        f = f[:, None]
        one_minus = -torch.expm1(-x)
        total = total + f**2 * 2.0 * _phi(x) + 2.0 * f * one_minus * carry
        carry = torch.exp(-x) * carry + f * one_minus
    return total / lam**2


def _per_measurement(per_waveform, acq):
    """Values per waveform (..., W) -> per measurement (..., M).

    A product with the (W, M) one-hot matrix of ``acq.waveform_index``:
    exact (one non-zero term per entry) and about ten times faster than
    advanced indexing along the last axis (measured)."""
    W = per_waveform.shape[-1]
    spread = torch.nn.functional.one_hot(acq.waveform_index, W).T
    return per_waveform @ spread.to(per_waveform.dtype)


def _gpa_factor(acq, radius, diffusivity, geometry, n_roots):
    """``sum_m w_m I(lam_m)`` per acquisition (um^2 us^2), shape (..., M).

    ``-ln E = g^2 * factor`` for the gradient across the restriction.
    """
    acq.require_timing(f"the restricted {geometry}")
    weights, lam = _gpa_modes(acq, radius, diffusivity, geometry, n_roots)
    kernel = _waveform_kernel(lam, acq.durations, acq.amplitudes)
    per_waveform = torch.sum(weights * kernel, dim=-1)  # (..., W)
    return _per_measurement(per_waveform, acq)


def _gpa_modes(acq, radius, diffusivity, geometry, n_roots):
    """GPA mode weights ``w_m = R^2 / (x_m^2 (x_m^2 - c))`` and decay rates
    ``lam_m = x_m^2 D / R^2``, shape (..., 1, n_roots)."""
    roots, c = _modes(geometry, n_roots)
    x = _as(roots, acq.bvals)
    R = _as(radius, acq.bvals)[..., None, None]
    D = _as(diffusivity, acq.bvals)[..., None, None]
    return R**2 / (x**2 * (x**2 - c)), x**2 * D / R**2


def _waveform_kernel_slope(lam, durations, amplitudes):
    """``I(lam)`` of :func:`_waveform_kernel` and ``dI/dlam``, same shapes.

    The same pass over the pieces, differentiated by hand: with ``x = lam
    tau``, ``d phi / dx = 1 - exp(-x)`` and ``d(1 - exp(-x)) / dx =
    exp(-x)``; the carried sum's derivative is carried alongside.
    """
    total = torch.zeros((), dtype=lam.dtype)
    carry = torch.zeros((), dtype=lam.dtype)
    d_total = torch.zeros((), dtype=lam.dtype)
    d_carry = torch.zeros((), dtype=lam.dtype)
    for tau, f in zip(durations.T, amplitudes.T, strict=True):
        tau, f = tau[:, None], f[:, None]
        x = lam * tau
        decay = torch.exp(-x)
        one_minus = -torch.expm1(-x)
        d_total = (
            d_total
            + 2.0 * f**2 * one_minus * tau
            + 2.0 * f * (decay * tau * carry + one_minus * d_carry)
        )
        total = total + f**2 * 2.0 * _phi(x) + 2.0 * f * one_minus * carry
        d_carry = decay * (d_carry - tau * carry + f * tau)
        carry = decay * carry + f * one_minus
    kernel = total / lam**2
    return kernel, (d_total - 2.0 * total / lam) / lam**2


def _gpa_sums(acq, radius, diffusivity, geometry, n_roots):
    """The GPA sum and its derivatives in R and D per waveform, (..., W).

    With ``w_m = R^2 a_m`` and ``lam_m = x_m^2 D / R^2``: ``d/dR = (2 / R)
    sum_m w_m (I - lam_m I')`` and ``d/dD = (1 / D) sum_m w_m lam_m I'``.
    """
    weights, lam = _gpa_modes(acq, radius, diffusivity, geometry, n_roots)
    kernel, slope = _waveform_kernel_slope(lam, acq.durations, acq.amplitudes)
    factor = torch.sum(weights * kernel, dim=-1)
    R = _as(radius, acq.bvals)[..., None]
    D = _as(diffusivity, acq.bvals)[..., None]
    d_radius = 2.0 / R * torch.sum(weights * (kernel - lam * slope), dim=-1)
    d_diff = torch.sum(weights * lam * slope, dim=-1) / D
    return factor, d_radius, d_diff


def _gpa_factor_slopes(acq, radius, diffusivity, geometry, n_roots):
    """:func:`_gpa_factor` and its derivatives in R and D, each (..., M)."""
    acq.require_timing(f"the restricted {geometry}")
    R, D = torch.broadcast_tensors(_as(radius, acq.bvals), _as(diffusivity, acq.bvals))
    sums = _gpa_sums(acq, R, D, geometry, n_roots)
    return tuple(_per_measurement(v, acq) for v in sums)


class GpaTable:
    """The GPA sum of :func:`cylinder` (or :func:`sphere`) for one
    acquisition, tabulated.

    ``F(R, D) = sum_m w_m I(lam_m)`` with ``w_m = R^2 a_m`` and ``lam_m =
    x_m^2 D / R^2`` is ``R^2 G(s)`` with ``G(s) = sum_m a_m I(x_m^2 s)`` a
    function of ``s = D / R^2`` alone, one per waveform. ``G`` and ``dG/du``
    (``u = ln s``) are computed exactly (:func:`_waveform_kernel_slope`) on
    nodes uniform in u and interpolated by cubic Hermite polynomials, C1 and
    with an error ~ h^4 / 384 relative (h = ``step``; ``G`` behaves like
    ``exp(+-u)`` between its power-law ends): below 1e-10 for the default
    (measured in ``tests/test_compartments_cylinder_jacobian.py``). One
    lookup per voxel and waveform replaces the sum over the modes and
    waveform pieces, the bulk of a cylinder evaluation. Values of s outside
    the table are computed exactly.

    Parameters
    ----------
    acq : Acquisition
        With timing.
    geometry : {"cylinder", "sphere"}
    s_range : (float, float)
        Range of ``D / R^2`` in 1/us tabulated (default 1e-9 to 1e3: radii
        0.03-1000 um for D = 1e-3 um^2/us).
    step : float
        Node spacing in ``ln s``.
    n_roots : int
        Modes of the exact sum.
    """

    def __init__(
        self,
        acq,
        *,
        geometry="cylinder",
        s_range=(1e-9, 1e3),
        step=0.01,
        n_roots=N_ROOTS,
    ):
        acq.require_timing(f"the restricted {geometry}")
        self.acq, self.geometry, self.n_roots = acq, geometry, int(n_roots)
        self.u_lo = math.log(s_range[0])
        self.step = float(step)
        n = int(math.ceil((math.log(s_range[1]) - self.u_lo) / self.step)) + 1
        self.n = n
        s = torch.exp(self.u_lo + self.step * torch.arange(n, dtype=acq.dtype))
        roots, c = _modes(geometry, self.n_roots)
        x = _as(roots, acq.bvals)
        lam = (x**2 * s[:, None])[:, None, :]  # (n, 1, K)
        kernel, slope = _waveform_kernel_slope(lam, acq.durations, acq.amplitudes)
        a = 1.0 / (x**2 * (x**2 - c))
        # (W, n): G and dG/du = s dG/ds = sum_m a_m lam_m I'(lam_m).
        self.values = torch.sum(a * kernel, dim=-1).T.contiguous()
        self.slopes = torch.sum(a * lam * slope, dim=-1).T.contiguous()

    def _lookup(self, s):
        """G and dG/du per waveform, (..., W), by cubic Hermite
        interpolation in u = ln s (s inside the table)."""
        u = (torch.log(s) - self.u_lo) / self.step
        j = u.floor().clamp(0, self.n - 2)
        t = (u - j)[..., None]
        j = j.long()
        g0, g1 = self.values[:, j], self.values[:, j + 1]  # (W, ...)
        d0, d1 = self.slopes[:, j] * self.step, self.slopes[:, j + 1] * self.step
        g0, g1, d0, d1 = (v.movedim(0, -1) for v in (g0, g1, d0, d1))
        t2 = t * t
        t3 = t2 * t
        value = (
            (2 * t3 - 3 * t2 + 1) * g0
            + (t3 - 2 * t2 + t) * d0
            + (3 * t2 - 2 * t3) * g1
            + (t3 - t2) * d1
        )
        slope = (
            (6 * t2 - 6 * t) * (g0 - g1)
            + (3 * t2 - 4 * t + 1) * d0
            + (3 * t2 - 2 * t) * d1
        ) / self.step
        return value, slope

    def with_derivatives(self, radius, diffusivity):
        """``F``, ``dF/dR`` and ``dF/dD``, each (..., M), for radii and
        diffusivities of shape (...): with ``F = R^2 G(s)``, ``dF/dR = 2 R
        (G - dG/du)`` and ``dF/dD = R^2 (dG/du) / D``."""
        R = _as(radius, self.acq.bvals)
        D = _as(diffusivity, self.acq.bvals)
        R, D = torch.broadcast_tensors(R, D)
        s = D / R**2
        lo, hi = math.exp(self.u_lo), math.exp(self.u_lo + self.step * (self.n - 1))
        inside = (s >= lo) & (s <= hi)
        G, dG = self._lookup(s.clamp(lo, hi))
        R2 = (R**2)[..., None]
        factor = R2 * G
        d_radius = 2.0 * R[..., None] * (G - dG)
        d_diff = R2 * dG / D[..., None]
        if not bool(inside.all()):
            out = ~inside
            exact = _gpa_sums(self.acq, R[out], D[out], self.geometry, self.n_roots)
            for full, part in zip((factor, d_radius, d_diff), exact, strict=True):
                full[out] = part
        return tuple(_per_measurement(v, self.acq) for v in (factor, d_radius, d_diff))

    def __call__(self, radius, diffusivity):
        """``F`` (..., M)."""
        return self.with_derivatives(radius, diffusivity)[0]


def cylinder_derivatives(
    acq, *, direction, radius, diffusivity, n_roots=N_ROOTS, table=None
):
    """:func:`cylinder` and its derivatives in closed form.

    ``E = exp(-b D t - g^2 (1 - t) F(R, D))`` with ``t = (g . n)^2`` and
    ``F`` the GPA sum, so ``dE/dR = -E g^2 (1 - t) dF/dR``, ``dE/dD = -E (b t
    + g^2 (1 - t) dF/dD)`` and ``dE/d(g . n) = 2 E (g . n) (g^2 F - b D)``;
    ``dF/dR`` and ``dF/dD`` come from the mode sum differentiated term by
    term (:func:`_gpa_factor_slopes`) or from a :class:`GpaTable`. One
    evaluation instead of one per parameter for forward differences.

    Parameters
    ----------
    acq : Acquisition
        With timing.
    direction : torch.Tensor, shape (..., 3)
        Unit axes n.
    radius, diffusivity : torch.Tensor, shape (...)
        R in um, D in um^2/us.
    n_roots : int, optional
    table : GpaTable, optional
        The GPA sum of ``acq`` tabulated (default: the exact sum).

    Returns
    -------
    value, d_radius, d_diffusivity, d_cos : torch.Tensor, shape (..., M)
        ``d_cos`` is the derivative in ``g . n``: with respect to the
        (unnormalised) components of n at unit n the gradient is ``d_cos
        g``.
    """
    cos = cosines(acq, direction)
    t = cos * cos
    if table is None:
        factor, f_radius, f_diff = _gpa_factor_slopes(
            acq, radius, diffusivity, "cylinder", n_roots
        )
    else:
        factor, f_radius, f_diff = table.with_derivatives(radius, diffusivity)
    D = _col(diffusivity, acq.bvals)
    across = acq.g2 * (1.0 - t)
    value = torch.exp(-acq.bvals * D * t - across * factor)
    d_radius = -value * across * f_radius
    d_diff = -value * (acq.bvals * t + across * f_diff)
    d_cos = 2.0 * value * cos * (acq.g2 * factor - acq.bvals * D)
    return value, d_radius, d_diff, d_cos


def zeppelin_derivatives(acq, *, direction, d_par, d_perp):
    """:func:`zeppelin` and its derivatives in d_par, d_perp and ``g . n``.

    Returns
    -------
    value, d_par_slope, d_perp_slope, d_cos : torch.Tensor, shape (..., M)
    """
    cos = cosines(acq, direction)
    t = cos * cos
    d_par, d_perp = _col(d_par, acq.bvals), _col(d_perp, acq.bvals)
    b = acq.bvals
    value = torch.exp(-b * (d_perp + (d_par - d_perp) * t))
    d_cos = -2.0 * b * (d_par - d_perp) * cos * value
    return value, -b * t * value, -b * (1.0 - t) * value, d_cos


def cylinder(acq, *, direction, radius, diffusivity, n_roots=N_ROOTS, table=None):
    """Impermeable cylinder: free along the axis, GPA across it.

    ``E = exp(-b D (g . n)^2) exp(-g^2 (1 - (g . n)^2) sum_m w_m I(lam_m))``
    with ``w_m = R^2 / (x_m^2 (x_m^2 - 1))``, ``lam_m = x_m^2 D / R^2``,
    ``J_1'(x_m) = 0`` (Van Gelderen et al. 1994). Finite pulses and any
    piecewise-constant waveform.

    Parameters
    ----------
    acq : Acquisition
        With timing.
    direction : array_like, shape (..., 3)
        Unit axis n.
    radius : float or array_like, shape (...)
        R in um (the diameter is 2R).
    diffusivity : float or array_like, shape (...)
        Intrinsic diffusivity in um^2/us, along and across the axis.
    n_roots : int, optional
        Eigenmodes kept.
    table : GpaTable, optional
        The GPA sum of ``acq`` tabulated (default: the exact sum).
    """
    c2 = cosines(acq, direction) ** 2
    if table is None:
        factor = _gpa_factor(acq, radius, diffusivity, "cylinder", n_roots)
    else:
        factor = table(radius, diffusivity)
    along = acq.bvals * _col(diffusivity, acq.bvals) * c2
    return torch.exp(-along - acq.g2 * (1.0 - c2) * factor)


def sphere(acq, *, radius, diffusivity, n_roots=N_ROOTS):
    """Impermeable sphere, GPA: ``exp(-g^2 sum_m w_m I(lam_m))``.

    ``w_m = R^2 / (x_m^2 (x_m^2 - 2))``, ``j_1'(x_m) = 0`` (Murday and Cotts
    1968), for any piecewise-constant waveform.

    Parameters
    ----------
    acq : Acquisition
        With timing.
    radius : float or array_like, shape (...)
        R in um.
    diffusivity : float or array_like, shape (...)
        Intrinsic diffusivity in um^2/us.
    n_roots : int, optional
        Eigenmodes kept.
    """
    factor = _gpa_factor(acq, radius, diffusivity, "sphere", n_roots)
    return torch.exp(-acq.g2 * factor)


# --------------------------------------------------------------------------
# Watson dispersion
# --------------------------------------------------------------------------
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
    t, w = (_as(a, c) for a in _watson_nodes(n_nodes))
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


def _watson_stick_from_beta(beta, c, kappa, n_nodes):
    """Watson average of ``exp(-beta (g . n)^2)``; ``c = g . mu``.

    The average is ``<exp(n^T A n)>_uniform / <exp(kappa (mu . n)^2)>_uniform``
    with ``A = kappa mu mu^T - beta g g^T``, whose non-zero eigenvalues solve
    ``l^2 - (kappa - beta) l - kappa beta (1 - c^2) = 0``.
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
    beta = acq.bvals * _col(d_par, acq.bvals)
    c = cosines(acq, direction)
    kappa, c = torch.broadcast_tensors(_col(kappa, acq.bvals), c)
    return _without_dispersion(
        kappa,
        lambda k: _watson_stick_from_beta(beta, c, k, n_nodes),
        torch.exp(-beta * c * c),  # sticks along mu
    )


# Coefficients of the Catmull-Rom weights (rows) and of their slopes in the
# powers 1, f, f^2, f^3 (columns): one small product per evaluation instead
# of a dozen elementwise passes.
_CATMULL_ROM = (
    torch.tensor(
        [[0, -1, 2, -1], [2, 0, -5, 3], [0, 1, 4, -3], [0, 0, -1, 1]],
        dtype=torch.float64,
    )
    / 2.0
)
_CATMULL_ROM_SLOPES = (
    torch.tensor(
        [[-1, 4, -3, 0], [0, -10, 9, 0], [1, 8, -9, 0], [0, -2, 3, 0]],
        dtype=torch.float64,
    )
    / 2.0
)
_CATMULL_ROM_BOTH = torch.cat([_CATMULL_ROM, _CATMULL_ROM_SLOPES]).T.contiguous()


def _powers(f):
    return torch.stack([torch.ones_like(f), f, f * f, f * f * f], dim=-1)


def _catmull_rom(f):
    """Weights (..., 4) of the cubic convolution (Catmull-Rom) interpolant at
    the fraction f in [0, 1] between the 2nd and 3rd of 4 equispaced nodes.

    C1 and exact for quadratics; its derivative is that of a C1 piecewise
    cubic, so Levenberg-Marquardt sees a smooth model.
    """
    return _powers(f) @ _CATMULL_ROM.to(f.dtype).T


def _catmull_rom_with_slopes(f):
    """:func:`_catmull_rom` weights and their derivatives with respect to f,
    (..., 4) each, from one product."""
    both = _powers(f) @ _CATMULL_ROM_BOTH.to(f.dtype)
    return both[..., :4], both[..., 4:]


def _ghost_nodes(values, dim):
    """Pad ``values`` by one node at both ends of ``dim``, extrapolated by
    the cubic through the 4 nearest nodes (exact for cubics)."""
    v = values.movedim(dim, -1)
    lo = 4.0 * v[..., 0] - 6.0 * v[..., 1] + 4.0 * v[..., 2] - v[..., 3]
    hi = 4.0 * v[..., -1] - 6.0 * v[..., -2] + 4.0 * v[..., -3] - v[..., -4]
    return torch.cat([lo[..., None], v, hi[..., None]], dim=-1).movedim(-1, dim)


@functools.lru_cache(maxsize=8)
def _stick_table_values(beta, odi, n_t, n_nodes):
    """Exact Watson-stick signals on the table's nodes, (n_odi + 2,
    n_b (n_t + 2)), ODI-major (one row per ODI node, ghosts included).

    Cached per process, as AMICO keeps its kernels: models on the same
    b-values and d_par (the submodels of ``fibres="auto"``, repeated fits)
    share one table."""
    t = torch.linspace(0.0, 1.0, n_t, dtype=torch.float64)
    beta = torch.tensor(beta, dtype=torch.float64)
    odi = torch.tensor(odi, dtype=torch.float64)
    with torch.no_grad():
        exact = _watson_stick_from_beta(
            beta[:, None, None],
            torch.sqrt(t)[None, None, :],
            odi_to_kappa(odi)[None, :, None],
            n_nodes,
        )  # (n_b, n_odi + 2, n_t)
    values = _ghost_nodes(exact, 2).permute(1, 0, 2)
    return values.reshape(len(odi), -1).contiguous()


class WatsonStickTable:
    """:func:`watson_stick` for a fixed ``d_par``, tabulated per b-value.

    For one acquisition and one stick diffusivity the signal depends only on
    the measurement's b-value, the dispersion and ``t = (g . mu)^2``. As
    AMICO does with its rotated kernels, the exact signal is computed once on
    a grid (distinct b-values x ``n_odi`` ODI values x ``n_t`` values of t,
    uniform in ODI and in t, where it is smooth) and interpolated by
    separable cubic convolution: first in ODI per fibre (a (n_b, n_t) slice),
    then in t per measurement, four table entries each. The interpolant is a
    C1 piecewise cubic in both variables, differentiable by autograd and
    forward mode. Its error against the exact signal is below 1e-5 for the
    default grid on b d_par <= 10 (measured 8.3e-6 at b = 6000, 3.5e-6 for
    b <= 3000 s/mm^2 with d_par = 1.7e-3; ``tests/test_compartments.py``).
    The node values are cached per process for each set of b-values and
    d_par.

    Parameters
    ----------
    acq : Acquisition
    d_par : float
        Stick diffusivity in um^2/us.
    odi_range : (float, float)
        ODI range of the table (the model's bounds); ODI is clamped to it.
    n_odi, n_t : int
        Grid nodes in ODI and in t (ghost nodes are added at both ends).
    n_nodes : int
        Quadrature nodes of the exact signal at the grid nodes.
    """

    def __init__(
        self, acq, *, d_par, odi_range=(0.01, 0.99), n_odi=160, n_t=96, n_nodes=48
    ):
        self.bvals, self.shell_index = torch.unique(acq.bvals, return_inverse=True)
        self.bvecs_t = acq.bvecs.T
        self.odi_lo, self.odi_hi = (float(v) for v in odi_range)
        self.n_odi, self.n_t = int(n_odi), int(n_t)
        self.h_odi = (self.odi_hi - self.odi_lo) / (self.n_odi - 1)
        # One ghost node below and above the range in ODI (computed exactly:
        # ODI stays inside (0, 1) there), in t extrapolated (t is a cosine
        # squared: nothing exists beyond [0, 1]).
        odi = self.odi_lo + self.h_odi * torch.arange(
            -1, self.n_odi + 1, dtype=acq.dtype
        )
        if odi[0] <= 0 or odi[-1] >= 1:
            raise ValueError(
                f"odi_range {odi_range} leaves no room for the table's ghost "
                "nodes inside (0, 1); use a finer n_odi or a narrower range"
            )
        beta = tuple((self.bvals * float(d_par)).tolist())
        self.values = _stick_table_values(
            beta, tuple(odi.tolist()), self.n_t, int(n_nodes)
        ).to(acq.dtype)

    def _odi_interpolated(self, i, w):
        """Table rows interpolated in ODI: ``sum_a w[..., a] values[i + a]``
        for cell ``i`` (...) and cubic weights ``w`` (..., S, 4) of S
        stencils, shape (..., S, n_b (n_t + 2)). Nodes i - 1 .. i + 2 are
        rows i .. i + 3 (the ghost row first). Four row gathers per fibre:
        the dense product of a scattered stencil with the whole table costs
        n_odi + 2 rows (2.6x slower, measured for 2,048 fibres)."""
        n = i.numel()
        cells = (i.reshape(n, 1) + torch.arange(4, device=i.device)).reshape(-1)
        rows = self.values.index_select(0, cells).reshape(n, 4, -1)
        out = torch.bmm(w.reshape(n, -1, 4), rows)  # one small product per fibre
        return out.reshape(w.shape[:-1] + (-1,))

    def __call__(self, direction, odi):
        """Signals (..., M) for unit axes (..., 3) and ODI (...)."""
        odi = torch.as_tensor(odi, dtype=self.values.dtype)
        u = ((odi - self.odi_lo) / self.h_odi).clamp(0.0, self.n_odi - 1.0)
        i = u.detach().floor().clamp(max=self.n_odi - 2).long()
        w = _catmull_rom(u - i)  # (..., 4)
        flat = self._odi_interpolated(i, w[..., None, :]).squeeze(-2)
        c = direction @ self.bvecs_t
        v = (c * c).clamp(0.0, 1.0) * (self.n_t - 1)
        j = v.detach().floor().clamp(max=self.n_t - 2).long()
        wt = _catmull_rom(v - j)  # (..., M, 4)
        width = self.n_t + 2
        base = self.shell_index * width + j  # (..., M); node j is column j + 1
        index = (base[..., None] + torch.arange(4)).flatten(-2)
        picked = torch.gather(flat, -1, index).unflatten(-1, (-1, 4))
        return (picked * wt).sum(-1)

    def with_derivatives(self, direction, odi):
        """Signals E (..., M) and their derivatives dE/dODI (..., M) and
        dE/dt (..., M), t = (g . mu)^2, in closed form: the derivatives of
        the cubic-convolution weights (:func:`_catmull_rom_with_slopes`) on the
        same four table entries. Zero where ODI or t is clamped to the
        table's range (the interpolant is constant there)."""
        odi = torch.as_tensor(odi, dtype=self.values.dtype)
        u_raw = (odi - self.odi_lo) / self.h_odi
        u = u_raw.clamp(0.0, self.n_odi - 1.0)
        i = u.floor().clamp(max=self.n_odi - 2).long()
        inside = (u == u_raw).to(u.dtype)
        # Value and ODI-slope weights as two stencil rows: one interpolation.
        w, dw = _catmull_rom_with_slopes(u - i)
        w = torch.stack([w, dw * inside[..., None]], dim=-2)  # (..., 2, 4)
        flat = self._odi_interpolated(i, w)  # (..., 2, n_b (n_t + 2))
        c = direction @ self.bvecs_t
        v_raw = c * c * (self.n_t - 1)
        v = v_raw.clamp(0.0, self.n_t - 1.0)
        j = v.floor().clamp(max=self.n_t - 2).long()
        wt, dwt = _catmull_rom_with_slopes(v - j)  # (..., M, 4) each
        dwt = dwt * (v == v_raw).to(v.dtype)[..., None]
        width = self.n_t + 2
        base = self.shell_index * width + j
        index = (base[..., None] + torch.arange(4)).flatten(-2)
        index = index[..., None, :].expand(index.shape[:-1] + (2, index.shape[-1]))
        picked = torch.gather(flat, -1, index).unflatten(-1, (-1, 4))
        # Value and dE/dODI share the t weights: one pass over both rows.
        value, d_odi = (picked * wt[..., None, :, :]).sum(-1).unbind(-2)
        d_t = (picked[..., 0, :, :] * dwt).sum(-1) * (self.n_t - 1)
        return value, d_odi / self.h_odi, d_t


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
    d_perp = _as(d_perp, acq.bvals)
    delta = _as(d_par, acq.bvals) - d_perp
    sticks = watson_stick(
        acq, direction=direction, kappa=kappa, d_par=delta, n_nodes=n_nodes
    )
    return ball(acq, diffusivity=d_perp) * sticks


def watson_tau(kappa, *, n_nodes=N_WATSON_NODES):
    """``<(mu . n)^2>`` under a Watson distribution (1/3 at kappa = 0, -> 1).

    Equal to ``1 / (2 sqrt(kappa) F(sqrt(kappa))) - 1 / (2 kappa)`` with F
    Dawson's function; evaluated with the Watson quadrature so that it is
    smooth in kappa (including 0).
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
    the Watson variance of ``(mu . n)^2``, ``<(mu . n)^4> - tau^2``."""
    kappa = torch.as_tensor(kappa, dtype=torch.float64)
    return _without_dispersion(
        kappa, lambda k: _watson_moments(k, n_nodes)[1], torch.zeros_like(kappa)
    )


def noddi_neurite_derivatives(acq, table, *, direction, odi, ndi, d_par):
    """NODDI's neurite signal and its derivatives in closed form.

    ``N = ndi E + (1 - ndi) X``: ``E`` the Watson sticks from a
    :class:`WatsonStickTable` (``table``, built for ``acq`` and ``d_par``),
    ``X`` the zeppelin of the Watson-averaged tensor
    (:func:`watson_hindered`) with the tortuosity ``d_perp = d_par (1 -
    ndi)``. With ``t = (g . mu)^2`` and ``tau = <(mu . n)^2>``, ``X =
    exp(-b A)``, ``A = d_par (1 - ndi) + d_par ndi ((1 - tau) / 2 + t (3 tau
    - 1) / 2)``, so every derivative is elementary; the table's come from
    its interpolant (:meth:`WatsonStickTable.with_derivatives`). One
    evaluation instead of one per parameter for forward differences.

    Parameters
    ----------
    acq : Acquisition
    table : WatsonStickTable
    direction : torch.Tensor, shape (..., 3)
        Unit axes mu.
    odi, ndi : torch.Tensor, shape (...)
    d_par : float
        Intrinsic diffusivity in um^2/us (the table's).

    Returns
    -------
    value, d_odi, d_ndi : torch.Tensor, shape (..., M)
    d_mu : torch.Tensor, shape (..., M, 3)
        Gradient with respect to the (unnormalised) components of mu, at
        unit mu.
    """
    intra, intra_odi, intra_t = table.with_derivatives(direction, odi)
    kappa = odi_to_kappa(odi)
    tau = watson_tau(kappa)
    # d kappa / d ODI for kappa = 1 / tan(pi ODI / 2).
    kappa_odi = -(torch.pi / 2.0) / torch.sin(torch.pi * odi / 2.0) ** 2
    tau_odi = (watson_tau_slope(kappa) * kappa_odi)[..., None]
    c = cosines(acq, direction)
    t = c * c
    b = acq.bvals
    tau, ndi = tau[..., None], ndi[..., None]
    shape = (1.0 - tau) / 2.0 + t * (3.0 * tau - 1.0) / 2.0
    extra = torch.exp(-b * d_par * ((1.0 - ndi) + ndi * shape))
    # d(-b A)/d(parameter), times X below.
    rate_ndi = -b * d_par * (shape - 1.0)
    rate_tau = -b * d_par * ndi * (3.0 * t - 1.0) / 2.0
    rate_t = -b * d_par * ndi * (3.0 * tau - 1.0) / 2.0
    value = ndi * intra + (1.0 - ndi) * extra
    d_odi = ndi * intra_odi + (1.0 - ndi) * extra * rate_tau * tau_odi
    d_ndi = intra - extra + (1.0 - ndi) * extra * rate_ndi
    d_t = ndi * intra_t + (1.0 - ndi) * extra * rate_t
    d_mu = (2.0 * d_t * c)[..., None] * acq.bvecs
    return value, d_odi, d_ndi, d_mu


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
    tau = watson_tau(_as(kappa, acq.bvals))
    d_par = _as(d_par, acq.bvals)
    d_perp = _as(d_perp, acq.bvals)
    spread = d_par - d_perp
    return zeppelin(
        acq,
        direction=direction,
        d_par=d_perp + spread * tau,
        d_perp=d_perp + spread * (1.0 - tau) / 2.0,
    )


# --------------------------------------------------------------------------
# Two-compartment exchange (Karger)
# --------------------------------------------------------------------------
def _mul(x, y):
    """Product of 2 x 2 matrices stored as (a, b, c, d) tuples of tensors."""
    a, b, c, d = x
    e, f, g, h = y
    return (a * e + b * g, a * f + b * h, c * e + d * g, c * f + d * h)


def _comm(x, y):
    return tuple(p - q for p, q in zip(_mul(x, y), _mul(y, x), strict=True))


def _lin(*terms):
    """Linear combination sum(w * X) of (weight, matrix) pairs."""
    return tuple(sum(w * m[i] for w, m in terms) for i in range(4))


def _expm2(m):
    """Exact exponential of 2 x 2 matrices, smooth and differentiable.

    ``exp(M) = e^mu (ch I + sh (M - mu I))``, ``s2 = ((a - d) / 2)^2 + b c``:
    ``ch = cosh(sqrt(s2))``, ``sh = sinh(sqrt(s2)) / sqrt(s2)`` (cos/sin for
    s2 < 0). The exponentials are combined before scaling, so large opposite
    arguments (strong decay) do not overflow.
    """
    a, b, c, d = m
    mu = (a + d) / 2.0
    s2 = ((a - d) / 2.0) ** 2 + b * c
    small = s2.abs() < _EXPM_SERIES
    r = torch.sqrt(s2.abs().clamp_min(_EXPM_SERIES))
    pos = s2 > 0
    e_plus, e_minus = torch.exp(mu + r), torch.exp(mu - r)
    ch_big = torch.where(pos, (e_plus + e_minus) / 2.0, torch.exp(mu) * torch.cos(r))
    sh_big = torch.where(pos, (e_plus - e_minus) / 2.0, torch.exp(mu) * torch.sin(r))
    sh_big = sh_big / r
    em = torch.exp(mu)
    ch_small = em * (1.0 + s2 / 2.0 + s2**2 / 24.0 + s2**3 / 720.0)
    sh_small = em * (1.0 + s2 / 6.0 + s2**2 / 120.0 + s2**3 / 5040.0)
    ch = torch.where(small, ch_small, ch_big)
    sh = torch.where(small, sh_small, sh_big)
    return (ch + sh * (a - mu), sh * b, sh * c, ch + sh * (d - mu))


def karger(acq, *, d1, d2, f1, k12, n_steps=None):
    """Two exchanging Gaussian compartments (Karger), any waveform.

    Solves ``dM/dt = -(bdot(t) diag(D1, D2) + K) M``, ``M(0) = (f1, 1 - f1)``,
    ``bdot(t) = g^2 F(t)^2``, ``K = [[k12, -k21], [-k12, k21]]``,
    ``k21 = k12 f1 / (1 - f1)`` (detailed balance), and returns
    ``M1 + M2`` at the echo. The torch form of
    :func:`dipy_spinverse.sim.analytic.karger_signal`, for isotropic compartments.

    Parameters
    ----------
    acq : Acquisition
        With timing.
    d1, d2 : float or array_like, shape (...)
        Diffusivities in um^2/us.
    f1 : float or array_like, shape (...)
        Signal fraction of compartment 1, in [0, 1).
    k12 : float or array_like, shape (...)
        Exchange rate 1 -> 2 in 1/us (the inverse residence time in 1).
    n_steps : int, optional
        Magnus steps per waveform piece with a gradient; by default at least 4
        and enough that ``(k12 + k21) * step <= 1``, for each voxel's own
        rate rounded up to a power of two: voxels with rates in the same
        octave share their steps, and a voxel's signal does not depend on
        the other voxels of the batch (nor on how voxels are chunked).

    Notes
    -----
    Each piece (F linear, bdot quadratic) is split into ``n_steps`` steps of
    the sixth-order Magnus method on three Gauss-Legendre nodes (Blanes, Casas
    and Ros 2000) with exact 2 x 2 exponentials. A piece without gradient is
    integrated exactly in one step. With the default steps the absolute error
    against ``analytic.karger_signal`` stays below 3e-8 for b D <= 7 and
    residence times down to 1 ms (tested; measured 1.4e-8).
    """
    acq.require_timing("the Karger exchange model")
    like = acq.bvals
    d1, d2, f1, k12 = torch.broadcast_tensors(
        *(_as(v, like) for v in (d1, d2, f1, k12))
    )
    if n_steps is not None:
        return _karger(acq, d1, d2, f1, k12, n_steps=int(n_steps))
    rates = _step_rates(acq, k12.detach() / (1.0 - f1.detach()))
    values = torch.unique(rates)
    if values.numel() <= 1:
        rate = float(values[0]) if values.numel() else 0.0
        return _karger(acq, d1, d2, f1, k12, rate=rate)
    flat = [v.reshape(-1) for v in (d1, d2, f1, k12)]
    rates = rates.reshape(-1)
    parts, order = [], []
    for value in values:
        idx = torch.nonzero(rates == value).flatten()
        parts.append(_karger(acq, *(v[idx] for v in flat), rate=float(value)))
        order.append(idx)
    out = torch.cat(parts)[torch.argsort(torch.cat(order))]
    return out.reshape(d1.shape + out.shape[-1:])


def _step_rates(acq, rate):
    """Exchange rates (1/us) that set the Magnus steps, one per voxel.

    Each voxel's ``k12 + k21`` rounded up to a power of two, and at least the
    rate below which every piece takes ``N_MAGNUS_STEPS`` (so slow voxels all
    share one value); non-finite rates (unfitted voxels) take that floor too.
    """
    amplitudes = acq.amplitudes[acq.waveform_index]
    durations = acq.durations[acq.waveform_index][amplitudes != 0]
    if durations.numel() == 0:
        return torch.zeros_like(rate)
    floor = N_MAGNUS_STEPS / float(durations.max())
    octave = torch.exp2(torch.ceil(torch.log2(rate.clamp_min(floor))))
    return torch.where(torch.isfinite(rate) & (rate > floor), octave, floor)


def _karger(acq, d1, d2, f1, k12, *, rate=0.0, n_steps=None):
    """:func:`karger` with the Magnus steps set by ``rate`` (or ``n_steps``)."""
    like = acq.bvals
    d1, d2, f1, k12 = (v[..., None, None] for v in (d1, d2, f1, k12))
    k21 = k12 * f1 / (1.0 - f1)
    durations = acq.durations[acq.waveform_index]  # (M, P)
    areas = durations * acq.amplitudes[acq.waveform_index]
    starts = torch.cumsum(areas, dim=1) - areas  # F at the start of each piece
    amplitudes = acq.amplitudes[acq.waveform_index]
    prop = None
    for tau, f, F0 in zip(durations.T, amplitudes.T, starts.T, strict=True):
        n = _magnus_steps(tau, f, rate, n_steps)
        offsets = torch.arange(n, dtype=like.dtype)[:, None] + _as(_GAUSS3, like)
        h = (tau / n)[:, None]  # (M, 1)
        t = h[..., None] * offsets  # (M, n_steps, 3) node times in the piece
        F = F0[:, None, None] + f[:, None, None] * t
        bdot = acq.g2[:, None, None] * F**2
        A1, A2, A3 = (_generator(bdot[..., j], d1, d2, k12, k21) for j in range(3))
        # dM/dt = -A M: the Magnus series of -A.
        r = math.sqrt(15.0) / 3.0 * h
        a1 = _lin((-h, A2))
        a2 = _lin((-r, A3), (r, A1))
        a3 = _lin((-10.0 / 3.0 * h, A3), (20.0 / 3.0 * h, A2), (-10.0 / 3.0 * h, A1))
        c1 = _comm(a1, a2)
        c2 = _lin((-1.0 / 60.0, _comm(a1, _lin((2.0, a3), (1.0, c1)))))
        left = _lin((-20.0, a1), (-1.0, a3), (1.0, c1))
        right = _lin((1.0, a2), (1.0, c2))
        omega = _lin((1.0, a1), (1.0 / 12.0, a3), (1.0 / 240.0, _comm(left, right)))
        step = _expm2(omega)  # entries of shape (..., M, n_steps)
        for j in range(n):
            sj = tuple(e[..., j] for e in step)
            prop = sj if prop is None else _mul(sj, prop)
    f1, f2 = f1[..., 0], 1.0 - f1[..., 0]
    return (prop[0] + prop[2]) * f1 + (prop[1] + prop[3]) * f2


def _magnus_steps(tau, f, rate, n_steps):
    """Magnus steps for one piece (the same for every voxel and acquisition).

    A piece without gradient has a constant generator: one step is exact.
    Otherwise at least ``N_MAGNUS_STEPS``, and enough that the exchange
    rate (1/us, from :func:`_step_rates`) times the step stays below 1 (the
    error then stays below ~3e-8 of the signal; it falls 64x per halving of
    the step).
    """
    if not bool(torch.any(f != 0)):
        return 1
    if n_steps is not None:
        return int(n_steps)
    return max(N_MAGNUS_STEPS, math.ceil(float(tau.max()) * rate))


def _generator(bdot, d1, d2, k12, k21):
    """``A = bdot diag(d1, d2) + K`` as a 2 x 2 tuple."""
    zero = torch.zeros_like(bdot)
    return (bdot * d1 + k12, zero - k21, zero - k12, bdot * d2 + k21)
