"""Tests of the analytic reference signals (dipy_spinverse.sim.analytic).

Each check states its tolerance. The "independent" checks recompute a quantity
by a route that shares nothing with the implementation: images of the 1-D
propagator for the plates, a finite-volume radial diffusion solve plus adaptive
quadrature for the Gaussian phase approximation, an adaptive ODE solve and a
dense matrix exponential for the Karger model.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy.integrate import quad, solve_ivp
from scipy.linalg import eigh_tridiagonal, expm
from scipy.special import jvp, spherical_jn

from dipy_spinverse.sim import analytic as an

D_WATER = 2e-3  # um^2/us


# --------------------------------------------------------------------------
# Helpers: independent brute-force references
# --------------------------------------------------------------------------
def _plates_by_images(q, L, D, Delta, *, n_quad=200, n_images=10):
    """Narrow-pulse plates signal from the image-sum propagator, 2-D quadrature.

    ``E = (1/L) int int P(x' | x, Delta) cos(q (x' - x)) dx dx'`` with the
    reflecting propagator on [0, L] written as a sum of Gaussian images.
    """
    x, w = np.polynomial.legendre.leggauss(n_quad)
    x, w = 0.5 * L * (x + 1.0), 0.5 * L * w
    X, Xp = np.meshgrid(x, x, indexing="ij")
    var = 2.0 * D * Delta
    k = np.arange(-n_images, n_images + 1)[:, None, None]

    def gauss(u):
        return np.exp(-(u**2) / (2 * var)) / np.sqrt(2 * np.pi * var)

    P = np.sum(gauss(Xp - X - 2 * k * L) + gauss(Xp + X - 2 * k * L), axis=0)
    W = np.outer(w, w) * P / L
    return np.array([np.sum(W * np.cos(qq * (Xp - X))) for qq in np.atleast_1d(q)])


def _radial_correlation(R, D, dim, n_cells):
    """Position autocorrelation ``<x(t) x(0)> = sum_k amp_k exp(-lam_k t)``.

    Finite volumes (cell-centred, uniform in r) for the l = 1 radial problem
    ``h_t = D (r^{1-d} (r^{d-1} h_r)_r - (d - 1) h / r^2)``, ``h_r(R) = 0``,
    ``h(r, 0) = r``, in a d-ball (d = 3 sphere, d = 2 cylinder cross-section);
    then ``<x(t) x(0)> = R^-d int_0^R r^d h(r, t) dr``. Second order in 1/n.
    No Bessel roots, no analytic weights.
    """
    edges = np.linspace(0.0, R, n_cells + 1)
    r = 0.5 * (edges[1:] + edges[:-1])
    vol = (edges[1:] ** dim - edges[:-1] ** dim) / dim  # int r^{d-1} dr
    cond = D * edges[1:-1] ** (dim - 1) / (R / n_cells)
    diag = D * (dim - 1) * vol / r**2
    diag[:-1] += cond
    diag[1:] += cond
    s = 1.0 / np.sqrt(vol)
    lam, Q = eigh_tridiagonal(diag * s * s, -cond * s[:-1] * s[1:])
    amp = (Q.T @ (np.sqrt(vol) * r)) ** 2 / R**dim
    return lam, amp


def _phase_variance(durations, amplitudes, lam, amp):
    """``int int f(t1) f(t2) C(|t1 - t2|)`` by adaptive quadrature in t2 - t1.

    For pieces j, k the double integral is ``int ell_jk(s) C(|s|) ds`` with
    ``ell_jk`` the (trapezoidal) length of the set of t1 in piece j with
    t1 + s in piece k.
    """
    starts = np.concatenate([[0.0], np.cumsum(durations)[:-1]])
    ends = starts + durations

    def corr(s):
        return np.sum(amp * np.exp(-lam * abs(s)))

    total = 0.0
    for j, fj in enumerate(amplitudes):
        for k, fk in enumerate(amplitudes):
            if fj == 0 or fk == 0:
                continue
            lo, hi = starts[k] - ends[j], ends[k] - starts[j]

            def ell(s, j=j, k=k):
                return max(
                    0.0, min(ends[j], ends[k] - s) - max(starts[j], starts[k] - s)
                )

            kinks = [starts[k] - starts[j], ends[k] - ends[j], 0.0]
            val, _ = quad(
                lambda s, ell=ell: ell(s) * corr(s),
                lo,
                hi,
                points=[p for p in kinks if lo < p < hi] or None,
                epsabs=0.0,
                epsrel=1e-13,
                limit=200,
            )
            total += fj * fk * val
    return total


def _gpa_log_signal_fv(durations, amplitudes, g, R, D, dim):
    """``ln E = -g^2 <phi^2> / 2``, FV at 400 and 800 cells, Richardson."""
    values = []
    for n in (400, 800):
        lam, amp = _radial_correlation(R, D, dim, n)
        values.append(-(g**2) * _phase_variance(durations, amplitudes, lam, amp) / 2)
    return (4.0 * values[1] - values[0]) / 3.0


def _karger_by_ode(durations, amplitudes, g, *, D1, D2, f1, k12):
    """Karger signal by an adaptive 8th-order Runge-Kutta solve, piece by piece."""
    k21 = k12 * f1 / (1 - f1)
    K = np.array([[k12, -k21], [-k12, k21]])
    Dm = np.diag([D1, D2])
    M, F0 = np.array([f1, 1 - f1]), 0.0
    for tau, f in zip(durations, amplitudes, strict=True):

        def rhs(t, y, F0=F0, f=f):
            return -((g * (F0 + f * t)) ** 2 * Dm + K) @ y

        sol = solve_ivp(rhs, (0.0, tau), M, method="DOP853", rtol=1e-13, atol=1e-30)
        M, F0 = sol.y[:, -1], F0 + f * tau
    return M.sum()


# A refocused, non-PGSE waveform (us, normalised amplitudes).
_ODD_DURATIONS = np.array([3000.0, 2000.0, 5000.0, 4000.0, 3000.0])
_ODD_AMPLITUDES = np.array([1.0, 0.0, -0.6, 0.5, -2.0 / 3.0])


# --------------------------------------------------------------------------
# Free diffusion, waveforms
# --------------------------------------------------------------------------
def test_free_signal():
    # Definition; exact up to rounding (1e-15).
    b = np.array([0.0, 1000.0, 3000.0])
    assert_allclose(an.free_signal(b, D_WATER), np.exp(-b * D_WATER), rtol=1e-15)
    assert an.free_signal(b[:, None], [1e-3, 2e-3]).shape == (3, 2)


def test_pgse_bvalue():
    # b = g^2 delta^2 (Delta - delta/3), rtol 1e-13.
    tau, f = an.pgse_waveform(10000.0, 30000.0)
    g = np.array([1e-5, 3e-5])
    assert_allclose(
        an.waveform_bvalue(tau, f, g), g**2 * 1e8 * (30000.0 - 10000.0 / 3), rtol=1e-13
    )


def test_waveform_checks():
    with pytest.raises(ValueError, match="refocused"):
        an.waveform_bvalue([10.0, 10.0], [1.0, -0.5], 1.0)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        an.sphere_gpa([10.0, 10.0], [2.0, -2.0], 1e-5, 5.0, D_WATER)
    with pytest.raises(ValueError, match="equal length"):
        an.cylinder_gpa([10.0, 10.0], [1.0, 0.0, -1.0], 1e-5, 5.0, D_WATER)
    with pytest.raises(ValueError, match="delta"):
        an.pgse_waveform(20.0, 10.0)
    with pytest.raises(ValueError, match="delta"):
        an.sphere_gpa_pgse(1e-5, 20.0, 10.0, 5.0, D_WATER)
    with pytest.raises(ValueError, match="radius"):
        an.cylinder_adc_gpa(10.0, 20.0, 0.0, D_WATER)


# --------------------------------------------------------------------------
# Roots
# --------------------------------------------------------------------------
# Literature values (Neuman 1974; Balinov et al. 1993), confirmed with mpmath at
# 30 digits. Note 5.9403699906: "5.9403258" sometimes quoted is a typo.
SPHERE_ROOTS = [2.0815759778, 5.9403699906, 9.2058401429, 12.4044450219, 15.5792364104]
CYLINDER_ROOTS = [1.8411837813, 5.3314427735, 8.5363163663, 11.7060049026]


def _sign_changes(fn, x_max):
    t = np.linspace(1e-3, x_max + 0.1, 200_001)
    return int(np.count_nonzero(np.diff(np.sign(fn(t)))))


def test_sphere_roots():
    # Literature, atol 1e-8 (the values are given to 1e-10).
    x = an.sphere_roots(40)
    assert_allclose(x[:5], SPHERE_ROOTS, rtol=0, atol=1e-8)
    # Each is a root of j_1' to rounding, and none is skipped: j_1' changes sign
    # exactly 40 times on a fine grid up to just past the last one.
    assert_allclose(spherical_jn(1, x, derivative=True), 0.0, atol=1e-14)
    assert _sign_changes(lambda t: spherical_jn(1, t, derivative=True), x[-1]) == 40


def test_cylinder_roots():
    # Literature, atol 1e-8.
    x = an.cylinder_roots(40)
    assert_allclose(x[:4], CYLINDER_ROOTS, rtol=0, atol=1e-8)
    assert_allclose(jvp(1, x), 0.0, atol=1e-14)
    assert _sign_changes(lambda t: jvp(1, t), x[-1]) == 40


def test_roots_cache_returns_copies():
    x = an.sphere_roots(3)
    x[:] = 0.0
    assert an.sphere_roots(3)[0] == pytest.approx(SPHERE_ROOTS[0], abs=1e-8)
    with pytest.raises(ValueError):
        an.cylinder_roots(0)


# --------------------------------------------------------------------------
# Plates, narrow pulses
# --------------------------------------------------------------------------
def test_plates_small_q():
    # qL -> 0 gives 1, atol 1e-12; E is even in q.
    E = an.plates_narrow_pulse(np.array([0.0, 1e-10, -1e-10]), 10.0, D_WATER, 20000.0)
    assert_allclose(E, 1.0, atol=1e-12)


def test_plates_long_time():
    # Delta -> inf: 2 (1 - cos qL) / (qL)^2, atol 1e-12 (qL away from 0, where
    # this closed form itself is exact to rounding).
    L = 10.0
    q = np.array([0.05, 0.2, np.pi / L, 1.0, 2.0, 5.0])
    x = q * L
    E = an.plates_narrow_pulse(q, L, D_WATER, 1e9)
    assert_allclose(E, 2 * (1 - np.cos(x)) / x**2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("Delta", [2000.0, 10000.0, 50000.0])
def test_plates_against_images(Delta):
    # Independent: image-sum propagator + 200x200 Gauss-Legendre; atol 1e-12.
    # q L passes through pi and 2 pi, the removable singularities.
    L = 10.0
    q = np.array([0.0, 0.1, np.pi / L, 2 * np.pi / L, 1.0, 3.0])
    E = an.plates_narrow_pulse(q, L, D_WATER, Delta)
    assert_allclose(E, _plates_by_images(q, L, D_WATER, Delta), rtol=0, atol=1e-12)


def test_plates_continuous_at_singularities():
    # qL = n pi is removable: within 1e-9 of the limit 1e-9 away from it.
    L = 10.0
    for n in (1, 2, 3):
        q0 = n * np.pi / L
        E = an.plates_narrow_pulse(
            q0 * (1 + np.array([-1e-9, 0.0, 1e-9])), L, 2e-3, 5e3
        )
        assert_allclose(E, E[1], rtol=1e-8)


# --------------------------------------------------------------------------
# Gaussian phase approximation
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pgse", "generic"),
    [(an.sphere_gpa_pgse, an.sphere_gpa), (an.cylinder_gpa_pgse, an.cylinder_gpa)],
)
@pytest.mark.parametrize(
    ("delta", "Delta"), [(10000.0, 20000.0), (5000.0, 6000.0), (100.0, 2e5), (1.0, 1.0)]
)
def test_gpa_waveform_equals_pgse(pgse, generic, delta, Delta):
    # The piecewise closed form reduces to Murday-Cotts / Van Gelderen, rtol 1e-10
    # on ln E, vectorised over g and R.
    g = np.array([1e-5, 5e-5, 1e-4])[:, None]
    R = np.array([2.0, 5.0, 10.0])
    tau, f = an.pgse_waveform(delta, Delta)
    a = np.log(pgse(g, delta, Delta, R, D_WATER))
    b = np.log(generic(tau, f, g, R, D_WATER))
    assert a.shape == b.shape == (3, 3)
    assert_allclose(a, b, rtol=1e-10)


@pytest.mark.parametrize(
    ("fn", "moment"), [(an.sphere_gpa_pgse, 1 / 5), (an.cylinder_gpa_pgse, 1 / 4)]
)
def test_gpa_long_time_narrow_pulse(fn, moment):
    # delta << R^2/D << Delta: -ln E -> q^2 <x^2> = q^2 R^2 / 5 (sphere), / 4
    # (cylinder). The first correction is ~ (5/3) D delta / R^2 = 1.3e-4; rtol 1e-3.
    R, q, delta = 5.0, np.array([0.1, 0.3]), 1.0
    logE = np.log(fn(q / delta, delta, 1e6, R, D_WATER))
    assert_allclose(-logE, q**2 * R**2 * moment, rtol=1e-3)


@pytest.mark.parametrize("fn", [an.sphere_adc_gpa, an.cylinder_adc_gpa])
def test_gpa_large_radius_is_free(fn):
    # R -> inf: ADC -> D. The deficit falls as 1/R (Mitra): 2.6e-4 at R = 1e4 um
    # for (delta, Delta) = (2, 5) ms; bound 5e-4, and 10x larger at R = 1e3.
    kw = {"delta": 2000.0, "Delta": 5000.0, "D": D_WATER, "n_roots": 2500}
    deficit = [1 - fn(R=R, **kw) / D_WATER for R in (1e3, 1e4)]
    assert 0 < deficit[1] < 5e-4
    assert_allclose(deficit[0] / deficit[1], 10.0, rtol=1e-2)


@pytest.mark.parametrize("fn", [an.sphere_adc_gpa, an.cylinder_adc_gpa])
def test_gpa_short_time_mitra(fn):
    # Short times, narrow pulses: 1 - ADC/D = 4/(3 sqrt(pi)) sqrt(D Delta) / R
    # (Mitra et al. 1992; S/V projected on the gradient is 1/R for both shapes),
    # up to O(sqrt(D Delta)/R, delta/Delta) ~ 1%: rtol 1e-2.
    R, delta, Delta = 1000.0, 100.0, 20000.0
    adc = fn(delta, Delta, R, D_WATER, n_roots=2500)
    mitra = 4 / (3 * np.sqrt(np.pi)) * np.sqrt(D_WATER * Delta) / R
    assert_allclose(1 - adc / D_WATER, mitra, rtol=1e-2)


@pytest.mark.parametrize(
    ("adc", "generic", "dim"),
    [(an.sphere_adc_gpa, an.sphere_gpa, 3), (an.cylinder_adc_gpa, an.cylinder_gpa, 2)],
)
@pytest.mark.parametrize("R", [5.0, 10.0])
def test_gpa_against_finite_volumes(adc, generic, dim, R):
    # Independent: the second cumulant of the phase, -ln E = g^2/2 int int f f C,
    # with C(t) = <x(t) x(0)> from a finite-volume radial solve (no Bessel roots,
    # no analytic weights) and the double integral by adaptive quadrature (not the
    # closed form). FV is second order; Richardson over 400/800 cells leaves
    # ~1e-10. rtol 1e-8.
    delta, Delta, g = 10000.0, 20000.0, 1e-5
    tau, f = an.pgse_waveform(delta, Delta)
    b = an.waveform_bvalue(tau, f, g)
    adc_fv = -_gpa_log_signal_fv(tau, f, g, R, D_WATER, dim) / b
    assert_allclose(adc(delta, Delta, R, D_WATER), adc_fv, rtol=1e-8)
    # A waveform that is not a PGSE.
    logE = np.log(generic(_ODD_DURATIONS, _ODD_AMPLITUDES, g, R, D_WATER))
    logE_fv = _gpa_log_signal_fv(_ODD_DURATIONS, _ODD_AMPLITUDES, g, R, D_WATER, dim)
    assert_allclose(logE, logE_fv, rtol=1e-8)


def test_gpa_quadratic_in_g():
    # GPA: ln E is exactly quadratic in g; the ADC does not depend on it. rtol 1e-13.
    g = np.array([1e-5, 2e-5])
    logE = np.log(an.sphere_gpa_pgse(g, 10000.0, 20000.0, 5.0, D_WATER))
    assert_allclose(logE[1], 4 * logE[0], rtol=1e-13)
    b = g[0] ** 2 * 1e8 * (20000.0 - 10000.0 / 3)
    assert_allclose(
        an.sphere_adc_gpa(10000.0, 20000.0, 5.0, D_WATER), -logE[0] / b, rtol=1e-13
    )


# --------------------------------------------------------------------------
# Karger exchange
# --------------------------------------------------------------------------
def _pgse_g_for(bD, D, delta, Delta):
    tau, f = an.pgse_waveform(delta, Delta)
    return tau, f, np.sqrt(bD / D / an.waveform_bvalue(tau, f, 1.0))


def test_karger_no_exchange():
    # k12 = 0: f1 exp(-b D1) + (1 - f1) exp(-b D2), rtol 1e-12.
    tau, f = an.pgse_waveform(10000.0, 30000.0)
    g = np.array([0.0, 1e-5, 3e-5, 6e-5])
    b = an.waveform_bvalue(tau, f, g)
    E = an.karger_signal(tau, f, g, D1=2e-3, D2=0.5e-3, f1=0.3, k12=0.0)
    assert_allclose(E, 0.3 * np.exp(-b * 2e-3) + 0.7 * np.exp(-b * 0.5e-3), rtol=1e-12)


@pytest.mark.parametrize("k12", [1e-6, 1e-4, 1e-3])
def test_karger_equal_diffusivities(k12):
    # D1 = D2 = D: exp(-b D) whatever the exchange, rtol 1e-12, any waveform.
    tau, f = _ODD_DURATIONS, _ODD_AMPLITUDES
    g = np.array([1e-5, 4e-5])
    E = an.karger_signal(tau, f, g, D1=1.5e-3, D2=1.5e-3, f1=0.4, k12=k12)
    assert_allclose(E, np.exp(-an.waveform_bvalue(tau, f, g) * 1.5e-3), rtol=1e-12)


def test_karger_zero_b_detailed_balance():
    # b = 0: populations stay (f1, 1 - f1) (detailed balance) and E = 1; atol 1e-14.
    tau, f = an.pgse_waveform(10000.0, 30000.0)
    M1, M2 = an.karger_signal(
        tau, f, 0.0, D1=2e-3, D2=0.5e-3, f1=0.3, k12=1e-3, return_compartments=True
    )
    assert_allclose([M1, M2], [0.3, 0.7], atol=1e-14)
    k12, k21 = an.exchange_rates(1e-5, 100.0, 50.0, 200.0)
    assert_allclose(k12 * 50.0, k21 * 200.0, rtol=1e-15)
    assert_allclose(k12, 1e-5 * 100.0 / 50.0, rtol=1e-15)


@pytest.mark.parametrize(
    ("bD", "kTE"), [(1.0, 1.0), (10.0, 5.0), (30.0, 30.0), (30.0, 0.1)]
)
def test_karger_against_ode(bD, kTE):
    # Independent: adaptive DOP853 at rtol 1e-13. The Magnus integrator is
    # claimed to 1e-8; measured ~1e-13. rtol 1e-10.
    tau, f, g = _pgse_g_for(bD, 2e-3, 10000.0, 30000.0)
    kw = {"D1": 2e-3, "D2": 0.5e-3, "f1": 0.3, "k12": kTE / tau.sum()}
    E = an.karger_signal(tau, f, g, **kw)
    assert_allclose(E, _karger_by_ode(tau, f, g, **kw), rtol=1e-10)


def test_karger_generic_waveform_against_ode():
    # As above for a non-PGSE waveform with fast exchange; rtol 1e-10.
    tau, f = _ODD_DURATIONS, _ODD_AMPLITUDES
    g = np.sqrt(10.0 / 2e-3 / an.waveform_bvalue(tau, f, 1.0))
    kw = {"D1": 2e-3, "D2": 0.3e-3, "f1": 0.6, "k12": 1e-3}
    E = an.karger_signal(tau, f, np.array([g / 2, g]), **kw)
    ref = [_karger_by_ode(tau, f, gg, **kw) for gg in (g / 2, g)]
    assert_allclose(E, ref, rtol=1e-10)


def test_karger_narrow_against_expm():
    # Closed form against a dense matrix exponential, rtol 1e-12.
    kw = {"D1": 2e-3, "D2": 0.5e-3, "f1": 0.3, "k12": 2e-5}
    q, Delta = np.array([0.0, 0.05, 0.1, 0.2]), 30000.0
    k21 = kw["k12"] * 0.3 / 0.7
    K = np.array([[kw["k12"], -k21], [-kw["k12"], k21]])
    ref = [
        np.sum(expm(-(qq**2 * np.diag([2e-3, 0.5e-3]) + K) * Delta) @ [0.3, 0.7])
        for qq in q
    ]
    assert_allclose(an.karger_pgse_narrow(q, Delta, **kw), ref, rtol=1e-12)


def test_karger_narrow_degenerate_eigenvalues():
    # k12 = 0 and D1 = D2: coinciding eigenvalues; exp(-q^2 D Delta), rtol 1e-13.
    q = np.array([0.0, 0.1, 0.3])
    E = an.karger_pgse_narrow(q, 20000.0, D1=1e-3, D2=1e-3, f1=0.5, k12=0.0)
    assert_allclose(E, np.exp(-(q**2) * 1e-3 * 20000.0), rtol=1e-13)


def test_karger_narrow_pulse_limit():
    # delta -> 0 at fixed q = g delta: karger_signal -> karger_pgse_narrow. The
    # error is first order in delta (9e-6 at delta = 1 us here): rtol 2e-5 at
    # delta = 1 us, and it falls 10x (rtol 1e-2) from delta = 10 us.
    kw = {"D1": 2e-3, "D2": 0.5e-3, "f1": 0.3, "k12": 2e-5}
    q, Delta = np.array([0.05, 0.1, 0.2]), 30000.0
    ref = an.karger_pgse_narrow(q, Delta, **kw)
    err = []
    for delta in (10.0, 1.0):
        tau, f = an.pgse_waveform(delta, Delta)
        err.append(an.karger_signal(tau, f, q / delta, **kw) / ref - 1)
    assert_allclose(err[1], 0.0, atol=2e-5)
    assert_allclose(err[0] / err[1], 10.0, rtol=1e-2)


def test_karger_checks():
    tau, f = an.pgse_waveform(10.0, 20.0)
    with pytest.raises(ValueError, match="f1"):
        an.karger_signal(tau, f, 1e-5, D1=1e-3, D2=1e-3, f1=1.5, k12=0.0)
    with pytest.raises(ValueError, match="k12"):
        an.karger_pgse_narrow(0.1, 1e4, D1=1e-3, D2=1e-3, f1=1.0, k12=1e-4)


# --------------------------------------------------------------------------
# Periodic membranes
# --------------------------------------------------------------------------
def test_periodic_membrane_diffusivity():
    # Series resistances; limits kappa -> inf (D) and kappa = 0 (0). rtol 1e-15.
    D, L = 2e-3, 10.0
    kappa = np.array([0.0, 1e-5, 2e-4, np.inf])
    Dinf = an.periodic_membrane_diffusivity(D, kappa, L)
    assert_allclose(Dinf, [0.0, 1 / (1 / D + 1 / (1e-5 * L)), D / 2, D], rtol=1e-15)
