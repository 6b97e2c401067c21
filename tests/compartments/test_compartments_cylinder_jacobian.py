"""Closed-form derivatives of the GPA cylinder and of ActiveAx's and ZCD's
Levenberg-Marquardt Jacobians.

``blocks.cylinder_derivatives`` (and the kernel and mode-sum slopes under
it) and ``blocks.zeppelin_derivatives`` replace forward differences in the
fits and in the polishing of learned estimates of ``ActiveAxModel`` and
``ZcdModel``. They are checked in float64 against central differences of the
very functions they differentiate. With a relative step of 1e-6 the
truncation error is (step^2 / 6) times a third derivative; in the scaled
variables used here (R and D relative, the fits' unconstrained variables)
third derivatives are at most of order (b D)^3 ~ 10^3, i.e. ~1e-10, and
rounding adds 1e-16 / 1e-6 = 1e-10 per evaluation. The tolerances (1e-8
absolute on signals of order 1, 1e-7 relative on the kernel slope) leave
room for both and fail for any wrong or missing term (sizes 1e-3 to 10).
"""

import numpy as np
import pytest
import torch
from dipy.core.gradients import gradient_table
from numpy.testing import assert_allclose

from dipy_spinverse.compartments import ActiveAxModel, ZcdModel, blocks
from dipy_spinverse.compartments.acquisition import Acquisition
from dipy_spinverse.compartments.base import CompartmentModel
from dipy_spinverse.compartments.blocks import restricted
from dipy_spinverse.sim.sequences import fibonacci_sphere

STEP = 1e-6
TOL = 1e-8


@pytest.fixture(scope="module")
def gtab():
    """Two PGSE timings (as the benchmark's axon protocol), b up to 6000."""
    dirs = fibonacci_sphere(12)
    bvals, bvecs, big = [], [], []
    for Delta, shells in ((0.020, (1000.0, 3000.0)), (0.050, (2000.0, 6000.0))):
        bvals += [0.0] + [b for b in shells for _ in dirs]
        bvecs += [np.eye(3)[0]] + [d for _ in shells for d in dirs]
        big += [Delta] * (1 + len(shells) * len(dirs))
    return gradient_table(
        np.array(bvals),
        bvecs=np.array(bvecs),
        big_delta=np.array(big),
        small_delta=0.008,
    )


@pytest.fixture(scope="module")
def acq(gtab):
    return Acquisition.from_gtab(gtab, timing=True)


def _central(f, x, step):
    return (f(x + step) - f(x - step)) / (2 * step)


def _assert_axis_derivative(signal, mu, d_mu):
    """``d_mu`` against central differences in each unnormalised component
    of the axis, at the unit axis ``mu``."""
    for k in range(3):
        e = torch.zeros(3, dtype=mu.dtype)
        e[k] = 1.0
        numeric = _central(lambda s, e=e: signal(mu + s * e), 0.0, STEP)
        assert_allclose(d_mu[..., k], numeric, atol=TOL)


def _axes(n, seed):
    v = np.random.default_rng(seed).standard_normal((n, 3))
    return torch.tensor(v / np.linalg.norm(v, axis=1, keepdims=True))


def test_kernel_slope_matches_central_differences(acq):
    # Mode rates from 1e-7 to 10 per us: small (x = lam tau << 1, the
    # Taylor branch of phi) to large (x >> 1) arguments, on both waveforms
    # (the cylinder's slowest mode, R = 10 um and D = 1e-4 mm^2/s, has 3e-6).
    lam = torch.logspace(-7, 1, 40, dtype=torch.float64)[:, None, None]
    kernel, slope = restricted._waveform_kernel_slope(
        lam, acq.durations, acq.amplitudes
    )
    assert_allclose(
        kernel,
        restricted._waveform_kernel(lam, acq.durations, acq.amplitudes),
        rtol=1e-14,
    )

    # At small lam the kernel's pieces (size tau^2) cancel to ~lam tau^3, so
    # the reference itself carries ~1e-12 relative rounding: a relative step
    # of 1e-3 keeps that at ~1e-9 after the division, and Richardson
    # extrapolation of two central differences (h, h / 2) brings the
    # truncation error from ~h^2 = 1e-6 to ~h^4 = 1e-12.
    def central(step):
        h = step * lam

        def at(s):
            return restricted._waveform_kernel(
                lam + s * h, acq.durations, acq.amplitudes
            )

        return (at(1.0) - at(-1.0)) / (2 * h)

    numeric = (4 * central(0.5e-3) - central(1e-3)) / 3
    assert_allclose(slope, numeric, rtol=1e-7)


def test_cylinder_derivatives_match_central_differences(acq):
    n = 30
    rng = np.random.default_rng(1)
    mu = _axes(n, 2)
    radius = torch.tensor(rng.uniform(0.1, 10.0, n))
    diff = torch.tensor(rng.uniform(0.1e-3, 3.0e-3, n))

    def cyl(mu=mu, radius=radius, diff=diff):
        return blocks.cylinder(acq, direction=mu, radius=radius, diffusivity=diff)

    value, d_radius, d_diff, d_cos = blocks.cylinder_derivatives(
        acq, direction=mu, radius=radius, diffusivity=diff
    )
    d_mu = d_cos[..., None] * acq.bvecs
    assert_allclose(value, cyl(), atol=1e-15)
    # Steps relative to the parameters; derivatives compared in the same
    # scaled form (d/d log R, d/d log D).
    num_r = _central(lambda s: cyl(radius=radius * (1 + s)), 0.0, STEP)
    assert_allclose(d_radius * radius[:, None], num_r, atol=TOL)
    num_d = _central(lambda s: cyl(diff=diff * (1 + s)), 0.0, STEP)
    assert_allclose(d_diff * diff[:, None], num_d, atol=TOL)
    _assert_axis_derivative(lambda m: cyl(mu=m), mu, d_mu)
    # Every term matters: derivatives of order 1e-3 to 1 (so a missing one
    # would fail by far more than TOL).
    assert (d_radius * radius[:, None]).abs().max() > 0.1


def test_zeppelin_derivatives_match_central_differences(acq):
    n = 20
    rng = np.random.default_rng(3)
    mu = _axes(n, 4)
    d_par = torch.tensor(rng.uniform(0.5e-3, 3e-3, n))
    d_perp = d_par * torch.tensor(rng.uniform(0.0, 1.0, n))

    def zep(mu=mu, d_par=d_par, d_perp=d_perp):
        return blocks.zeppelin(acq, direction=mu, d_par=d_par, d_perp=d_perp)

    value, s_par, s_perp, d_cos = blocks.zeppelin_derivatives(
        acq, direction=mu, d_par=d_par, d_perp=d_perp
    )
    d_mu = d_cos[..., None] * acq.bvecs
    assert_allclose(value, zep(), atol=1e-15)
    num = _central(lambda s: zep(d_par=d_par + s), 0.0, 1e-9)
    assert_allclose(s_par * 1e-3, num * 1e-3, atol=TOL)
    num = _central(lambda s: zep(d_perp=d_perp + s), 0.0, 1e-9)
    assert_allclose(s_perp * 1e-3, num * 1e-3, atol=TOL)
    _assert_axis_derivative(lambda m: zep(mu=m), mu, d_mu)


def test_gpa_table_matches_the_exact_sum(acq):
    # Radii 0.05-12 um and diffusivities 1e-5 to 4e-3 mm^2/s (beyond the
    # models' bounds), plus points outside the table (computed exactly).
    rng = np.random.default_rng(6)
    radius = torch.tensor(np.r_[rng.uniform(0.05, 12.0, 200), 1e-4, 1e4])
    diff = torch.tensor(np.r_[10 ** rng.uniform(-5, np.log10(4e-3), 200), 3e-3, 3e-3])
    table = blocks.GpaTable(acq)
    factor, f_r, f_d = table.with_derivatives(radius, diff)
    exact = restricted._gpa_factor_slopes(acq, radius, diff, "cylinder", blocks.N_ROOTS)
    # Hermite interpolation on nodes 0.01 apart in ln(D / R^2): the value to
    # ~h^4 / 384 (3e-11, measured below 1e-10) relative, its derivatives to
    # ~h^3 = 1e-6 relative to G. In the scaled forms R dF/dR = 2 F - 2 R^2
    # dG/du and D dF/dD = R^2 dG/du, the error is therefore ~1e-6 of F
    # (measured 3e-7), while relative to themselves it is not bounded where
    # dG/du changes sign. The fits need the interpolant's own derivatives,
    # which these are exactly (checked on the models below).
    assert_allclose(factor, exact[0], rtol=1e-10)
    R, D = radius[:, None], diff[:, None]
    err_r = ((f_r - exact[1]) * R).abs() / exact[0]
    err_d = ((f_d - exact[2]) * D).abs() / exact[0]
    assert err_r.max() < 1e-6 and err_d.max() < 1e-6
    mu = _axes(len(radius), 7)
    assert_allclose(
        blocks.cylinder(
            acq, direction=mu, radius=radius, diffusivity=diff, table=table
        ),
        blocks.cylinder(acq, direction=mu, radius=radius, diffusivity=diff),
        atol=1e-12,
    )


@pytest.mark.parametrize(
    "make, n_fibres, width",
    [
        (lambda g, f: ActiveAxModel(g, n_fibres=f), 1, 1),
        (lambda g, f: ActiveAxModel(g, n_fibres=f), 2, 1),
        (lambda g, f: ActiveAxModel(g, n_fibres=f, dot=True), 3, 1),
        (lambda g, f: ZcdModel(g, n_fibres=f), 1, 2),
        (lambda g, f: ZcdModel(g, n_fibres=f), 2, 2),
    ],
)
def test_model_jacobian_matches_central_differences(gtab, make, n_fibres, width):
    model = make(gtab, n_fibres)
    g = torch.Generator().manual_seed(5)
    P = n_fibres * (len(model._fibre) + 3)
    # Unconstrained points well inside the sigmoid range (as the fits keep
    # them) and directions of any norm near 1.
    x = model._renormalise(2.0 * torch.randn(20, P, dtype=torch.float64, generator=g))
    x = x * torch.where(
        torch.arange(P) % (len(model._fibre) + 3) >= len(model._fibre), 1.3, 1.0
    ).to(x.dtype)
    Phi = model._columns_x(x)
    c = torch.rand(20, Phi.shape[-1], dtype=torch.float64, generator=g)
    analytic = model._derivatives(x, Phi, c)

    def signal(x):
        return (model._columns_x(x) @ c[..., None])[..., 0]

    eye = torch.eye(P, dtype=x.dtype)
    numeric = torch.stack(
        [_central(lambda s, e=e: signal(x + s * e), 0.0, STEP) for e in eye], dim=-1
    )
    assert analytic.shape == (20, len(model._acq), P)
    assert_allclose(analytic, numeric, atol=TOL)
    # The generic forward differences it replaces agree to their own
    # accuracy (relative step 1e-7: ~1e-7 times the second derivative).
    fd = CompartmentModel._derivatives(model, x, Phi, c)
    assert_allclose(analytic, fd, atol=1e-5)
