"""Restricted compartments in the Gaussian phase approximation (GPA).

Impermeable cylinders and spheres for any piecewise-constant waveform:
the torch versions of :func:`dipy_spinverse.sim.analytic.cylinder_gpa` and
:func:`~dipy_spinverse.sim.analytic.sphere_gpa` (same roots, same kernel),
with the cylinder's closed-form derivatives and a table of its GPA sum
(:class:`GpaTable`) on a model's own acquisitions.

Van Gelderen et al., J. Magn. Reson. B 103, 255 (1994) (cylinder, GPA).
Murday and Cotts, J. Chem. Phys. 48, 4938 (1968) (sphere, GPA).
"""

import functools
import math

import torch

from ...sim import analytic
from .gaussian import as_like, column_like, cosines

__all__ = [
    "N_ROOTS",
    "GpaTable",
    "cylinder",
    "cylinder_derivatives",
    "sphere",
]

# Eigenmodes kept in the GPA sums. The modes are evaluated per distinct
# waveform, not per acquisition, so they cost little. Against analytic.py's 60
# modes, 30 leave < 1e-9 in the signal for R <= 10 um and b <= 6000 s/mm^2
# (measured 6.5e-10; 15 modes leave 2e-8).
N_ROOTS = 30


# Below this argument x - 1 + exp(-x) is evaluated by its Taylor series.
_PHI_SERIES_X = 1e-3


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
    x = as_like(roots, acq.bvals)
    R = as_like(radius, acq.bvals)[..., None, None]
    D = as_like(diffusivity, acq.bvals)[..., None, None]
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
    R = as_like(radius, acq.bvals)[..., None]
    D = as_like(diffusivity, acq.bvals)[..., None]
    d_radius = 2.0 / R * torch.sum(weights * (kernel - lam * slope), dim=-1)
    d_diff = torch.sum(weights * lam * slope, dim=-1) / D
    return factor, d_radius, d_diff


def _gpa_factor_slopes(acq, radius, diffusivity, geometry, n_roots):
    """:func:`_gpa_factor` and its derivatives in R and D, each (..., M)."""
    acq.require_timing(f"the restricted {geometry}")
    R, D = torch.broadcast_tensors(
        as_like(radius, acq.bvals), as_like(diffusivity, acq.bvals)
    )
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
        x = as_like(roots, acq.bvals)
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
        R = as_like(radius, self.acq.bvals)
        D = as_like(diffusivity, self.acq.bvals)
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
    D = column_like(diffusivity, acq.bvals)
    across = acq.g2 * (1.0 - t)
    value = torch.exp(-acq.bvals * D * t - across * factor)
    d_radius = -value * across * f_radius
    d_diff = -value * (acq.bvals * t + across * f_diff)
    d_cos = 2.0 * value * cos * (acq.g2 * factor - acq.bvals * D)
    return value, d_radius, d_diff, d_cos


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
    along = acq.bvals * column_like(diffusivity, acq.bvals) * c2
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
