"""Unit tests of dipy_spinverse.sim.solvers (time plans and propagation engines).

float64 throughout, on tiny grids: 2 x 2 x 2-cube BCC lattices (48 cells
walled, 96 periodic) with jittered vertices, so that cells differ in volume.
The references are built here from the operator's documented ELL arrays and
exponentiated with scipy.linalg.expm (or integrated with scipy's solve_ivp),
so they share no code with the engines. Each tolerance is stated where it is
used. Lengths um, times us, gradient rates rad/(um us).
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import jittered_grid  # noqa: E402
from numpy.testing import assert_allclose
from scipy import special
from scipy.integrate import solve_ivp
from scipy.linalg import expm

from dipy_spinverse.sim.grid import TetGrid
from dipy_spinverse.sim.operators import diffusion_operator
from dipy_spinverse.sim.solvers import (
    ENGINES,
    Step,
    _bernstein_rho,
    _bessel_terms,
    _chebyshev_plan,
    _field_of_values,
    propagate,
    time_plan,
)

D_WATER = 2e-3  # um^2/us
# A PGSE-like waveform: delta 1 ms, Delta 3 ms. With |rate| 3e-4 rad/(um us)
# the phase q x across the 8 um box is O(1) and b D ~ 0.5: a strong but
# resolvable attenuation, so wrong phases or wrong diffusion both show.
PGSE_DURATIONS = np.array([1000.0, 2000.0, 1000.0])
PGSE_AMPLITUDES = np.array([1.0, 0.0, -1.0])
RATE = 3e-4
PHASE_STEP = 0.05  # the simulator's default (forward._PHASE_STEP)
# Chebyshev truncation tolerance per step (the simulator's float64 default).
TOL = 1e-11


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _frame(grid):
    return "phase" if grid.periodic else "lab"


def _operator(grid, batch=1, seed=0, open_faces=False):
    rng = np.random.default_rng(seed)
    if open_faces:
        kappa = np.full((batch, grid.n_faces), np.inf)
    else:
        kappa = 10 ** rng.uniform(-4, -1, (batch, grid.n_faces))
        kappa[:, ::7] = np.inf
        kappa[:, 3::11] = 0.0
    diff = rng.uniform(1.5e-3, 2.5e-3, (batch, grid.n_cells))
    return diffusion_operator(grid, torch.tensor(kappa), torch.tensor(diff))


def _rates(n=3, seed=0, scale=RATE):
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1)[:, None]
    return torch.tensor(scale * dirs * np.linspace(0.5, 1.0, n)[:, None])


def _state(op, n_acq, seed=0):
    """A random complex state (B, N, A) around the uniform magnetisation."""
    rng = np.random.default_rng(seed)
    b, n = op.diag.shape
    noise = rng.normal(size=(b, n, n_acq)) + 1j * rng.normal(size=(b, n, n_acq))
    s = op.sqrt_volumes.numpy()[None, :, None]
    return torch.tensor(s * (1.0 + 0.3 * noise))


def _uniform(op, n_acq):
    b, n = op.diag.shape
    s = op.sqrt_volumes.to(torch.complex128)[None, :, None]
    return s.expand(b, n, n_acq).contiguous()


def _dense_a(op, b):
    """Real symmetric (N, N) diffusion matrix of batch element ``b``."""
    n, k = op.neighbours.shape
    a = np.diag(op.diag[b].detach().numpy()).astype(complex)
    rows = np.repeat(np.arange(n), k)
    weights = op.weights[b].detach().numpy().ravel()
    np.subtract.at(a, (rows, op.neighbours.numpy().ravel()), weights)
    return a


def _lab_generator(op, b, step, rate):
    """G = A + i f diag(x . rate) for one acquisition (rate (3,))."""
    phase = op.positions.numpy() @ rate
    return _dense_a(op, b) + 1j * step.amplitude * np.diag(phase)


def _phase_generator(op, b, step, rate):
    """G = diag - W o sum_j w_j exp(-i F_j rate . d), scattered to (N, N)."""
    n, k = op.neighbours.shape
    proj = op.displacement.numpy() @ rate  # (N, K)
    factor = sum(
        w * np.exp(-1j * f * proj)
        for w, f in zip(step.phase_weights, step.phase_F, strict=True)
    )
    g = np.diag(op.diag[b].detach().numpy()).astype(complex)
    rows = np.repeat(np.arange(n), k)
    coupling = (op.weights[b].detach().numpy() * factor).ravel()
    np.subtract.at(g, (rows, op.neighbours.numpy().ravel()), coupling)
    return g


def _reference(op, steps, u, rates, frame):
    """Product of scipy expm(-tau G) over the plan, per batch and acquisition."""
    build = _lab_generator if frame == "lab" else _phase_generator
    u = u.numpy().copy()
    b_count, _, a_count = u.shape
    for b in range(b_count):
        for a in range(a_count):
            rate = rates[a].numpy()
            for step in steps:
                u[b, :, a] = expm(-step.tau * build(op, b, step, rate)) @ u[b, :, a]
    return u


def _plan(
    grid,
    op,
    rates,
    durations=PGSE_DURATIONS,
    amplitudes=PGSE_AMPLITUDES,
    phase_step=PHASE_STEP,
):
    return time_plan(
        durations,
        amplitudes,
        frame=_frame(grid),
        phase_step=phase_step,
        dmax=float(op.displacement.norm(dim=-1).max()),
        rate=float(rates.norm(dim=-1).max()),
    )


def _rel_err(x, ref):
    """Largest error over (batch, acquisition) columns, relative to |ref|_2."""
    x, ref = np.asarray(x), np.asarray(ref)
    return float((np.linalg.norm(x - ref, axis=1) / np.linalg.norm(ref, axis=1)).max())


# --------------------------------------------------------------------------
# time_plan
# --------------------------------------------------------------------------
def test_lab_plan_is_one_step_per_piece():
    """Laboratory frame: one exact exponential per piece of positive length,
    amplitudes carried over, empty or negative pieces dropped."""
    steps = time_plan(
        np.array([100.0, 0.0, 50.0, -1.0, 30.0]),
        np.array([1.0, 5.0, 0.0, 2.0, -0.5]),
        frame="lab",
    )
    assert steps == [
        Step(100.0, amplitude=1.0),
        Step(50.0, amplitude=0.0),
        Step(30.0, amplitude=-0.5),
    ]


def test_phase_plan_without_gradient_keeps_the_running_integral():
    """Zero-amplitude pieces are single steps at F = int_0^t f (exact: the
    generator is constant there); so is everything when the rate is 0."""
    durations = np.array([100.0, 200.0, 300.0])
    amplitudes = np.array([0.0, 0.0, 0.0])
    steps = time_plan(
        durations, amplitudes, frame="phase", phase_step=0.05, dmax=2.0, rate=1.0
    )
    assert steps == [Step(t, phase_weights=(1.0,), phase_F=(0.0,)) for t in durations]
    steps = time_plan(
        durations,
        np.array([1.0, 0.0, -2.0]),
        frame="phase",
        phase_step=0.05,
        dmax=2.0,
        rate=0.0,
    )
    assert [s.tau for s in steps] == list(durations)
    assert [s.phase_F for s in steps] == [(0.0,), (100.0,), (100.0,)]


def test_phase_plan_magnus_substeps():
    """Gradient pieces: ceil(phase / phase_step) Magnus sub-steps of two
    exponentials each, on the Gauss nodes, with the Blanes-Moan weights.

    Per sub-step of length h: exp(-h(a1 G(t1) + a2 G(t2))) then
    exp(-h(a2 G(t1) + a1 G(t2))), a1 = 1/4 + sqrt3/6, a2 = 1/4 - sqrt3/6,
    t1,2 = h (1/2 -+ sqrt3/6) (first applied first). Checked to rtol 1e-14
    (each value is a couple of floating-point operations).
    """
    durations = np.array([100.0, 50.0, 80.0])
    amplitudes = np.array([0.0, 1.0, -0.5])
    rate, dmax, phase_step = 2e-3, 1.5, 0.01
    steps = time_plan(
        durations,
        amplitudes,
        frame="phase",
        phase_step=phase_step,
        dmax=dmax,
        rate=rate,
    )
    n1 = math.ceil(1.0 * 50.0 * rate * dmax / phase_step)  # 15
    n2 = math.ceil(0.5 * 80.0 * rate * dmax / phase_step)  # 12
    assert len(steps) == 1 + 2 * n1 + 2 * n2
    assert_allclose(sum(s.tau for s in steps), durations.sum(), rtol=1e-14)
    a1, a2 = 0.25 + math.sqrt(3) / 6, 0.25 - math.sqrt(3) / 6
    c1, c2 = 0.5 - math.sqrt(3) / 6, 0.5 + math.sqrt(3) / 6
    for piece, (start, n_sub, f, f_start) in enumerate(
        [(1, n1, 1.0, 0.0), (1 + 2 * n1, n2, -0.5, 50.0)]
    ):
        h = durations[piece + 1] / n_sub
        for s in range(n_sub):
            first, second = steps[start + 2 * s], steps[start + 2 * s + 1]
            nodes = (f_start + f * h * (s + c1), f_start + f * h * (s + c2))
            for step, weights in ((first, (a1, a2)), (second, (a2, a1))):
                assert_allclose(
                    step.tau * np.array(step.phase_weights),
                    h * np.array(weights),
                    rtol=1e-14,
                )
                assert_allclose(step.phase_F, nodes, rtol=1e-14)
                assert_allclose(sum(step.phase_weights), 1.0, rtol=1e-15)


# --------------------------------------------------------------------------
# propagate against independent dense exponentials
# --------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("boundary", ["reflecting", "absorbing", "periodic"])
def test_propagate_matches_scipy_expm(engine, boundary):
    """Every engine reproduces prod_steps expm(-tau G) u from scipy.

    Two batch elements (different fields), two acquisitions, a random
    initial state, the PGSE plan (exact in the lab frame; the Magnus steps of
    the phase frame are reproduced one by one). Dense engine: Pade to
    rounding over a few steps, 1e-12 relative. Chebyshev: truncation bounded
    by TOL = 1e-11 per step and per unit |u|, over <= 30 steps: 1e-9.
    """
    grid = jittered_grid(boundary)
    frame = _frame(grid)
    op = _operator(grid, batch=2)
    rates = _rates(n=2)
    # A coarse phase step keeps the periodic plan short (9 steps): the
    # reference reproduces the plan step by step, so its accuracy is moot.
    steps = _plan(grid, op, rates, phase_step=0.4)
    if frame == "phase":
        assert len(steps) > 4  # Magnus sub-steps are exercised
    u0 = _state(op, len(rates))
    out = propagate(op, steps, u0, rates, frame=frame, engine=engine, tol=TOL)
    assert out.shape == u0.shape and out.dtype == torch.complex128
    ref = _reference(op, steps, u0, rates, frame)
    assert _rel_err(u0.numpy(), ref) > 0.1  # the propagation did something
    atol = 1e-12 if engine == "dense" else 1e-9
    assert _rel_err(out.numpy(), ref) < atol


def test_magnus_bounds_hold_and_are_sharper_than_gershgorin():
    """The Weyl lower bound of a Magnus exponential's generator
    ``w1 G(k1) + w2 G(k2)`` (one weight negative) holds for every batch
    element and acquisition (dense eigenvalues, to 1e-12 of the row sums)
    and lies well above Gershgorin's ``-(|w1| + |w2| - 1)`` row sum: the
    growth factor that forced thousands of sub-steps on stiff grids."""
    grid = jittered_grid("periodic")
    op = _operator(grid, batch=2, seed=5)
    rates = _rates(n=3, seed=2)
    steps = _plan(grid, op, rates, phase_step=0.4)
    largest = float(torch.einsum("nkd,ad->nka", op.displacement, rates).abs().max())
    magnus = [s for s in steps if len(s.phase_weights) == 2]
    assert magnus
    rows = op.weights.abs().sum(-1).amax(-1).numpy()
    gershgorin = op.spectral_bounds(offdiag_scale=1 + math.sqrt(3) / 3)[0].numpy()
    for step in magnus:
        spread = (max(step.phase_F) - min(step.phase_F)) * largest
        lo, hi = _field_of_values(op, step, None, spread)
        assert np.all(lo > gershgorin + 0.05 * rows)
        for b in range(2):
            for rate in rates.numpy():
                eig = np.linalg.eigvalsh(_phase_generator(op, b, step, rate))
                assert eig[0] >= lo[b] - 1e-12 * rows[b]
                assert eig[-1] <= hi[b] + 1e-12 * rows[b]


def test_forward_only_substeps_match_the_differentiable_ones():
    """Without back-propagation a stiff step is taken in longer Chebyshev
    sub-steps (tau r up to 4000 instead of 200); both stay within TOL per
    sub-step of the exact exponential, so they agree to 1e-9 relative. The
    pieces are long (40 ms) on a 2 um grid: tau r ~ 10^3 per piece."""
    grid = TetGrid.bcc(2.0, 2, boundary="periodic")
    op = _operator(grid, batch=2, seed=4)
    rates = _rates(n=2, seed=3, scale=1e-5)
    steps = _plan(grid, op, rates, durations=PGSE_DURATIONS * 40)
    u0 = _uniform(op, len(rates))
    with torch.no_grad():
        fast = propagate(
            op, steps, u0, rates, frame="phase", engine="chebyshev", tol=TOL
        )
    weights = op.weights.clone().requires_grad_(True)
    tracked = dataclasses.replace(op, weights=weights)
    slow = propagate(
        tracked, steps, u0, rates, frame="phase", engine="chebyshev", tol=TOL
    )
    assert _rel_err(fast.numpy(), slow.detach().numpy()) < 1e-9
    assert _rel_err(u0.numpy(), fast.numpy()) > 0.1  # the propagation did something


@pytest.mark.parametrize("boundary", ["reflecting", "absorbing", "periodic"])
def test_engines_agree_and_batch_equals_loop(boundary):
    """dense vs chebyshev on the same plan (1e-9 relative, as above), and a
    batch of two fields equals the two fields alone. Dense: 1e-13 relative
    (the same arithmetic up to the order of batched reductions). Chebyshev:
    the degree and sub-steps follow the worst batch element, so a field alone
    may get a shorter expansion; both stay within TOL per step of the exact
    value, hence 2 n_steps TOL relative."""
    grid = jittered_grid(boundary)
    frame = _frame(grid)
    op = _operator(grid, batch=2, seed=3)
    rates = _rates(n=2, seed=1)
    steps = _plan(grid, op, rates, phase_step=0.4)
    u0 = _uniform(op, len(rates))
    out = {
        engine: propagate(op, steps, u0, rates, frame=frame, engine=engine, tol=TOL)
        for engine in ENGINES
    }
    for engine in ENGINES[1:]:
        assert _rel_err(out[engine].numpy(), out[ENGINES[0]].numpy()) < 1e-9
    for engine in ENGINES:
        for b in range(2):
            single = dataclasses.replace(
                op, diag=op.diag[b : b + 1], weights=op.weights[b : b + 1]
            )
            alone = propagate(
                single,
                steps,
                u0[b : b + 1],
                rates,
                frame=frame,
                engine=engine,
                tol=TOL,
            )
            rtol = 1e-13 if engine == "dense" else 2 * len(steps) * TOL
            assert _rel_err(alone[0].numpy()[None], out[engine][b].numpy()[None]) < rtol


@pytest.mark.parametrize("tol", [1e-3, 1e-6, 1e-9])
def test_chebyshev_honours_its_tolerance(tol):
    """The Chebyshev error bound is rigorous: per step the truncation error is
    at most tol |u| (2-norm; the lab-frame propagators are contractions, so
    errors do not grow), hence |u_cheb - u_exact| <= n_steps tol |u0|.
    The exact value is the dense engine (rounding ~1e-13, far below tol)."""
    grid = jittered_grid("reflecting")
    op = _operator(grid, seed=4)
    rates = _rates(seed=2, scale=3 * RATE)
    steps = _plan(grid, op, rates)
    u0 = _state(op, len(rates), seed=2)
    exact = propagate(op, steps, u0, rates, frame="lab", engine="dense", tol=tol)
    cheb = propagate(op, steps, u0, rates, frame="lab", engine="chebyshev", tol=tol)
    err = np.linalg.norm((cheb - exact).numpy(), axis=1)
    bound = len(steps) * tol * np.linalg.norm(u0.numpy(), axis=1)
    assert np.all(err <= bound)


def _exhaustive_plan(tau, lo, radius, imag_extent, tol, max_peak):
    """The Chebyshev plan with every Bessel term up to the a-priori order
    ``60 + 3 rho x + 40 sqrt(x)`` (the engine's first implementation, but
    for rho^k taken in logarithms: it overflowed to 0 x inf = NaN)."""
    b_rel = float(np.max(imag_extent / radius))
    rho = _bernstein_rho(b_rel)
    crouzeix = 1.0 if b_rel == 0 else 1.0 + math.sqrt(2.0)
    x_total = tau * radius
    n_sub = max(1, math.ceil(float(x_total.max()) / 200.0))
    while True:
        x = x_total / n_sub
        growth = np.exp(-tau / n_sub * lo)
        k_max = int(min(4000, 60 + 3 * x.max() * rho + 40 * math.sqrt(x.max())))
        k = np.arange(k_max + 1)
        terms = special.ive(k[:, None], x[None]) * growth
        with np.errstate(divide="ignore"):  # rho^k alone would overflow
            weighted = 2.0 * np.exp(np.log(terms) + k[:, None] * np.log(rho))
        if weighted.max() <= max_peak or n_sub >= 4096:
            break
        n_sub *= 2
    tail = np.cumsum(weighted[::-1], axis=0)[::-1]
    ok = np.all(tail <= tol / n_sub / crouzeix, axis=1)
    degree = max((int(np.argmax(ok)) if ok.any() else k_max) - 1, 1)
    sign = (-1.0) ** k[: degree + 1, None]
    return n_sub, sign * terms[: degree + 1] * np.where(k[: degree + 1] > 0, 2, 1)[
        :, None
    ]


@pytest.mark.parametrize("tol", [1e-3, 1e-9, 1e-13])
@pytest.mark.parametrize("imag", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("x_max", [1e-3, 0.7, 12.0, 180.0, 900.0])
def test_chebyshev_plan_equals_the_exhaustive_one(x_max, imag, tol):
    """Truncating the Bessel series where its rigorous tail bound is
    negligible gives the plan of the full series: same sub-steps, same
    degree, the same coefficients bit for bit (the same ``ive`` values)."""
    rng = np.random.default_rng(int(x_max * 1000) + int(imag * 10))
    tau = 100.0
    radius = x_max / tau * rng.uniform(0.2, 1.0, size=6)
    radius[0] = x_max / tau
    lo = rng.uniform(-1e-4, 1e-3, size=6) * radius
    for max_peak in (10.0, 1e4):
        # As the engine sets it: the radius covers the gradient's extent.
        extent = imag * radius.min()
        n_sub, coeffs = _chebyshev_plan(tau, lo, radius, extent, tol, max_peak)
        ref_sub, ref = _exhaustive_plan(tau, lo, radius, extent, tol, max_peak)
        assert n_sub == ref_sub
        assert coeffs.shape == ref.shape
        assert np.array_equal(coeffs, ref)


@pytest.mark.parametrize("rho", [1.0, 1.4, 3.0])
def test_bessel_tail_bound_is_an_upper_bound(rho):
    """The bound on the Bessel weights left out lies above their sum
    (the sum taken to order 4000, where the terms underflow)."""
    x = np.array([1e-2, 0.5, 5.0, 40.0, 200.0])
    growth = np.ones_like(x)
    terms, remainder = _bessel_terms(x, growth, rho, 1e-12)
    k = np.arange(len(terms), 4001)
    with np.errstate(divide="ignore"):  # log of the terms that underflow to 0
        log_terms = np.log(special.ive(k[:, None], x[None])) + k[:, None] * np.log(rho)
    rest = 2.0 * np.exp(log_terms).sum(0)
    assert np.all(rest <= remainder)
    assert np.all(remainder <= 1e-12)


# --------------------------------------------------------------------------
# Conservation and dissipation
# --------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("boundary", ["reflecting", "periodic"])
def test_zero_gradient_keeps_uniform_magnetisation(engine, boundary):
    """M = 1 (u = sqrt V) is stationary without gradient, for any membranes.

    A sqrt(V) = 0 to rounding, so the dense engine returns it to 1e-12
    relative (a few hundred roundings of entries ~1). The Chebyshev
    polynomial is not exact at eigenvalue 0 either: its truncation error,
    TOL per step, applies to this state too (3 steps: 3e-11).
    """
    grid = jittered_grid(boundary)
    frame = _frame(grid)
    op = _operator(grid, batch=2)
    rates = _rates(n=2)
    steps = _plan(grid, op, rates, amplitudes=np.zeros(3))
    u0 = _uniform(op, len(rates))
    out = propagate(op, steps, u0, rates, frame=frame, engine=engine, tol=TOL)
    atol = 1e-12 if engine == "dense" else len(steps) * TOL
    assert _rel_err(out.numpy(), u0.numpy()) < atol


@pytest.mark.parametrize("engine", ENGINES)
def test_total_magnetisation_is_conserved_and_equilibrates(engine):
    """Reflecting wall, no gradient, a random start.

    <sqrt V, u> is conserved: 1e-12 relative for the dense engine
    (rounding), 1e-10 for Chebyshev, whose truncation (TOL per unit |u|)
    also touches this mode. After a time long against the slowest mode
    (exp(-lambda_1 t) = e^-50, all faces open) the state is the uniform
    field carrying that total: 1e-10 relative (TOL over the few sub-steps
    of the long step; dense rounding is far below).
    """
    grid = jittered_grid("reflecting")
    op = _operator(grid, open_faces=True)
    rates = _rates(n=1)
    s = op.sqrt_volumes.numpy()
    u0 = _state(op, 1, seed=5)
    total0 = np.einsum("n,bna->ba", s, u0.numpy())
    short = propagate(op, [Step(300.0)], u0, rates, frame="lab", engine=engine, tol=TOL)
    total = np.einsum("n,bna->ba", s, short.numpy())
    rtol = 1e-12 if engine == "dense" else 1e-10
    assert_allclose(total, total0, rtol=rtol)
    assert _rel_err(short.numpy(), u0.numpy()) > 1e-2  # it did diffuse
    gap = np.linalg.eigvalsh(_dense_a(op, 0).real)[1]
    t_long = 50.0 / gap
    long = propagate(op, [Step(t_long)], u0, rates, frame="lab", engine=engine, tol=TOL)
    equilibrium = s[None, :, None] * total0[:, None, :] / grid.volume
    assert _rel_err(long.numpy(), equilibrium) < 1e-10


@pytest.mark.parametrize("engine", ENGINES)
def test_absorbing_wall_only_loses_magnetisation(engine):
    """Absorbing wall, no gradient, M = 1: the magnetisation stays
    non-negative (exp(-t A) of an M-matrix; -1e-14 for rounding) and its
    total strictly decreases step after step, at the initial rate
    <sqrt V, A sqrt V> = total wall conductance."""
    grid = jittered_grid("absorbing")
    op = _operator(grid)
    rates = _rates(n=1)
    s = op.sqrt_volumes.numpy()
    u = _uniform(op, 1)
    totals = [grid.volume]
    for _ in range(6):
        u = propagate(op, [Step(500.0)], u, rates, frame="lab", engine=engine, tol=TOL)
        assert u.real.min() > -1e-14 and np.abs(u.imag.numpy()).max() < 1e-14
        totals.append(float(np.einsum("n,bna->", s, u.real.numpy())))
    assert np.all(np.diff(totals) < 0) and totals[-1] > 0
    # Initial loss rate from a short step: (1 - total(dt)/V)/dt -> sink / V.
    dt = 1e-3
    u1 = propagate(
        op, [Step(dt)], _uniform(op, 1), rates, frame="lab", engine=engine, tol=TOL
    )
    rate = (grid.volume - float(np.einsum("n,bna->", s, u1.real.numpy()))) / dt
    sink = float(s @ _dense_a(op, 0).real @ s)
    # rtol 1e-4: the forward difference is off by ~dt |A| / 2 ~ 5e-6 relative
    # (|A| ~ 1e-2 /us); the Chebyshev truncation, ~TOL |u| ~ 2e-10 in the
    # total, becomes ~3e-6 of the rate (0.73 um^3/us) after division by dt.
    assert_allclose(rate, sink, rtol=1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_gradient_only_dissipates(engine):
    """Lab frame with gradient: G = A + i f P has Hermitian part A >= 0, so
    |u(t)|_2 never grows, and it strictly falls once the gradient dephases
    a uniform field (which no longer lies in the kernel). 1e-12 slack for
    rounding in the monotonicity check."""
    grid = jittered_grid("reflecting")
    op = _operator(grid)
    rates = _rates()
    steps = _plan(grid, op, rates)
    u = _uniform(op, len(rates))
    norms = [np.linalg.norm(u.numpy(), axis=1)]
    for step in steps:
        u = propagate(op, [step], u, rates, frame="lab", engine=engine, tol=TOL)
        norms.append(np.linalg.norm(u.numpy(), axis=1))
    norms = np.array(norms)
    assert np.all(np.diff(norms, axis=0) <= 1e-12 * norms[0])
    assert np.all(norms[-1] < 0.99 * norms[0])


# --------------------------------------------------------------------------
# Structure of the gradient term
# --------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_shifting_the_origin_is_a_global_phase(engine):
    """x -> x + c multiplies the lab-frame solution by exp(-i rate.c int f).

    The gradient term i f (rate . x) is diagonal, so it commutes with the
    shift; the sign and the scale of the imaginary term are both fixed by
    this phase. The waveform integral is nonzero on purpose (f = 1, 0, -0.5).
    1e-12 (dense) / 1e-9 (Chebyshev) relative as above.
    """
    grid = jittered_grid("reflecting")
    op = _operator(grid)
    rates = _rates()
    durations = np.array([800.0, 500.0, 600.0])
    amplitudes = np.array([1.0, 0.0, -0.5])
    steps = time_plan(durations, amplitudes, frame="lab")
    shift = np.array([6.0, -4.0, 8.0])
    moved = dataclasses.replace(op, positions=op.positions + torch.tensor(shift))
    u0 = _state(op, len(rates))
    kwargs = dict(frame="lab", engine=engine, tol=TOL)
    base = propagate(op, steps, u0, rates, **kwargs).numpy()
    out = propagate(moved, steps, u0, rates, **kwargs).numpy()
    integral = float(durations @ amplitudes)  # 500 us
    phase = np.exp(-1j * integral * (rates.numpy() @ shift))  # (A,)
    assert np.abs(phase - 1).min() > 0.1  # a visible phase
    atol = 1e-12 if engine == "dense" else 1e-9
    assert _rel_err(out, base * phase[None, None, :]) < atol


@pytest.mark.parametrize("engine", ENGINES)
def test_lab_propagator_is_complex_symmetric(engine):
    """G = A + i f P with A real symmetric and P real diagonal: exp(-t G) is
    complex symmetric (not Hermitian), a^T U b = b^T U a, while the
    Hermitian identity a^H U b = conj(b^H U a) fails (gradient on).
    1e-12 / 1e-9 relative to |a| |b|."""
    grid = jittered_grid("reflecting")
    op = _operator(grid)
    rates = _rates(n=1)
    step = Step(1500.0, amplitude=1.0)
    a, b = _state(op, 1, seed=6), _state(op, 1, seed=7)
    kwargs = dict(frame="lab", engine=engine, tol=TOL)
    ua = propagate(op, [step], a, rates, **kwargs).numpy().ravel()
    ub = propagate(op, [step], b, rates, **kwargs).numpy().ravel()
    a, b = a.numpy().ravel(), b.numpy().ravel()
    scale = np.linalg.norm(a) * np.linalg.norm(b)
    atol = 1e-12 if engine == "dense" else 1e-9
    assert abs(a @ ub - b @ ua) < atol * scale
    assert abs(np.vdot(a, ub) - np.conj(np.vdot(b, ua))) > 1e-3 * scale


@pytest.mark.parametrize("engine", ENGINES)
def test_phase_propagator_is_hermitian(engine):
    """Periodic cell, phase frame at fixed k != 0: G(k) = diag - W exp(-ik.d)
    is Hermitian (d antisymmetric across a face), so exp(-t G) is Hermitian:
    a^H U b = conj(b^H U a), while a^T U b != b^T U a. Tolerances as above."""
    grid = jittered_grid("periodic")
    op = _operator(grid)
    rates = _rates(n=1)
    step = Step(1500.0, phase_weights=(1.0,), phase_F=(2000.0,))
    a, b = _state(op, 1, seed=6), _state(op, 1, seed=7)
    kwargs = dict(frame="phase", engine=engine, tol=TOL)
    ua = propagate(op, [step], a, rates, **kwargs).numpy().ravel()
    ub = propagate(op, [step], b, rates, **kwargs).numpy().ravel()
    a, b = a.numpy().ravel(), b.numpy().ravel()
    scale = np.linalg.norm(a) * np.linalg.norm(b)
    atol = 1e-12 if engine == "dense" else 1e-9
    assert abs(np.vdot(a, ub) - np.conj(np.vdot(b, ua))) < atol * scale
    assert abs(a @ ub - b @ ua) > 1e-3 * scale


@pytest.mark.parametrize("engine", ENGINES)
def test_lab_plan_is_exact_under_step_splitting(engine):
    """The lab-frame generator is constant on a piece, so splitting a step
    (exp(-tG) = exp(-tG/3) exp(-2tG/3)) changes nothing: no time-stepping
    error to converge. 1e-12 / 1e-9 relative as above."""
    grid = jittered_grid("absorbing")
    op = _operator(grid)
    rates = _rates()
    u0 = _state(op, len(rates))
    kwargs = dict(frame="lab", engine=engine, tol=TOL)
    whole = propagate(op, [Step(1200.0, amplitude=0.7)], u0, rates, **kwargs)
    split = propagate(
        op,
        [Step(400.0, amplitude=0.7), Step(800.0, amplitude=0.7)],
        u0,
        rates,
        **kwargs,
    )
    atol = 1e-12 if engine == "dense" else 1e-9
    assert _rel_err(split.numpy(), whole.numpy()) < atol


# --------------------------------------------------------------------------
# Convergence of the phase-frame Magnus scheme
# --------------------------------------------------------------------------
def test_magnus_scheme_converges_at_fourth_order():
    """Periodic cell, one gradient pulse and a gap: the CF4 Magnus plan
    converges to the exact solution of m' = -G(k(t)) m at order 4.

    Reference: scipy solve_ivp (DOP853, rtol 1e-13; changing its tolerance
    by 10x moves it by ~1e-12, far below the errors measured here, >= 1e-6),
    independent of the plan. phase_step is chosen so that the pulse gets
    exactly 2, 4 and 8 sub-steps. Each halving must cut the error by 2^4:
    observed order accepted in [3.5, 4.5] (measured 3.87, 3.96; a
    2nd-order scheme, e.g. the two exponentials swapped, gives ~2).
    """
    grid = jittered_grid("periodic")
    op = _operator(grid, seed=8)
    rates = _rates(n=1, scale=2 * RATE)
    rate = rates[0].numpy()
    durations = np.array([1000.0, 500.0])
    amplitudes = np.array([1.0, 0.0])
    dmax = float(op.displacement.norm(dim=-1).max())
    u0 = _uniform(op, 1)

    # G(F) = diag - W o exp(-i F (rate . d)) as dense matrices, for the ODE.
    n, k = op.neighbours.shape
    rows, cols = np.repeat(np.arange(n), k), op.neighbours.numpy().ravel()
    weights = np.zeros((n, n))
    np.add.at(weights, (rows, cols), op.weights[0].numpy().ravel())
    proj = np.zeros((n, n))
    proj[rows, cols] = (op.displacement.numpy() @ rate).ravel()
    diag = np.diag(op.diag[0].numpy())

    def rhs(t, y):
        big_f = min(t, durations[0])  # F(t) = int_0^t f
        return -((diag - weights * np.exp(-1j * big_f * proj)) @ y)

    exact = u0[0, :, 0].numpy()
    for t0, t1 in ((0.0, durations[0]), (durations[0], durations.sum())):
        sol = solve_ivp(rhs, (t0, t1), exact, method="DOP853", rtol=1e-13, atol=1e-14)
        exact = sol.y[:, -1]

    pulse_phase = durations[0] * np.linalg.norm(rate) * dmax
    errors = []
    for n_sub in (2, 4, 8):
        steps = time_plan(
            durations,
            amplitudes,
            frame="phase",
            phase_step=pulse_phase / n_sub * (1 + 1e-9),
            dmax=dmax,
            rate=float(np.linalg.norm(rate)),
        )
        assert len(steps) == 2 * n_sub + 1
        # Chebyshev: its truncation (TOL per step, < 1e-9 here) is far below
        # the time-stepping errors measured (>= 5e-8 relative).
        out = propagate(
            op, steps, u0, rates, frame="phase", engine="chebyshev", tol=TOL
        )
        errors.append(np.linalg.norm(out[0, :, 0].numpy() - exact))
    errors = np.array(errors)
    assert errors[-1] < 1e-7 * np.linalg.norm(exact)
    order = np.log2(errors[:-1] / errors[1:])
    assert np.all((order > 3.5) & (order < 4.5)), order


# --------------------------------------------------------------------------
# Differentiability
# --------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("boundary", ["absorbing", "periodic"])
def test_propagate_gradcheck(engine, boundary):
    """torch.autograd.gradcheck through propagate, float64.

    Inputs: three log-permeability directions (kappa = kappa0 exp(M x) on
    every face), the log-diffusivity and two directions of the initial
    state: few inputs keep the finite differences cheap while every
    operator entry and every state entry carries gradient. Outputs: real
    and imaginary parts of two projections of the final state. Central
    differences with eps 1e-6 on O(1) outputs: truncation ~eps^2 ~1e-12,
    rounding ~1e-16/eps ~1e-10; the Chebyshev tolerance is set to 1e-13 so
    that a change of degree between the two evaluations costs at most
    1e-13/eps = 1e-7. Hence atol 1e-6, rtol 1e-5. fast_mode compares
    v^T J u for random u, v (one directional difference, one backward pass):
    a wrong Jacobian passes only on a measure-zero set of (u, v).
    """
    grid = jittered_grid(boundary)
    frame = _frame(grid)
    rng = np.random.default_rng(9)
    kappa0 = torch.tensor(10 ** rng.uniform(-4, -2, (1, grid.n_faces)))
    mix = torch.tensor(rng.normal(size=(grid.n_faces, 3)))
    rates = _rates(n=1)
    s = torch.tensor(np.sqrt(grid.cell_volumes))
    modes = torch.tensor(rng.normal(size=(2, grid.n_cells))) * s
    probe = torch.tensor(
        rng.normal(size=(grid.n_cells, 2)) + 1j * rng.normal(size=(grid.n_cells, 2))
    )
    diff0 = torch.full((1, grid.n_cells), D_WATER, dtype=torch.float64)
    plan_op = diffusion_operator(grid, kappa0, diff0)
    steps = _plan(grid, plan_op, rates, durations=PGSE_DURATIONS / 4, phase_step=0.5)
    if frame == "phase":
        assert any(len(step.phase_weights) == 2 for step in steps)

    def outputs(x, log_d, y):
        kappa = kappa0 * torch.exp(mix @ x)
        op = diffusion_operator(grid, kappa, diff0 * torch.exp(log_d))
        u0 = (s + y @ modes).to(torch.complex128)[None, :, None]
        u = propagate(op, steps, u0, rates, frame=frame, engine=engine, tol=1e-13)
        proj = (probe * u[0]).sum(0)  # two projections of the one state
        return torch.cat([proj.real, proj.imag])

    inputs = (
        torch.zeros(3, dtype=torch.float64, requires_grad=True),
        torch.zeros((), dtype=torch.float64, requires_grad=True),
        torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(
        outputs, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True
    )


@pytest.mark.gpu
def test_chebyshev_on_cuda_matches_cpu():
    """Sparse CSR products on the GPU: same result as on the CPU.

    1e-10 relative: reductions round differently on the GPU and the
    recurrence may amplify rounding by up to its peak bound (1e4 in float64):
    ~1e-12 per step; and a bound computed a hair differently may change the
    degree, which moves the result by up to TOL per step (3e-11 here).
    """
    grid = jittered_grid("reflecting")
    op = _operator(grid, batch=2)
    rates = _rates()
    steps = _plan(grid, op, rates)
    u0 = _state(op, len(rates))
    cpu = propagate(op, steps, u0, rates, frame="lab", engine="chebyshev", tol=TOL)
    cuda = dataclasses.replace(
        op, **{f.name: getattr(op, f.name).cuda() for f in dataclasses.fields(op)}
    )
    gpu = propagate(
        cuda, steps, u0.cuda(), rates.cuda(), frame="lab", engine="chebyshev", tol=TOL
    )
    assert gpu.device.type == "cuda"
    assert _rel_err(gpu.cpu().numpy(), cpu.numpy()) < 1e-10


def test_chebyshev_with_a_zero_width_spectrum():
    """Every face impermeable, reflecting wall: the diffusion operator is 0.

    The real extent of the field of values is then 0; the Chebyshev scale
    must come from the gradient term (it used to overflow and hang). The
    exact lab-frame solution is a pure phase per cell; 1e-10 is ten times
    the requested tolerance of 1e-11.
    """
    grid = TetGrid.bcc(8.0, 2)
    kappa = torch.zeros(1, grid.n_faces, dtype=torch.float64)
    diffusivity = torch.full((1, grid.n_cells), 2e-3, dtype=torch.float64)
    op = diffusion_operator(grid, kappa, diffusivity)
    rate = torch.tensor([[3e-4, 0.0, 0.0]], dtype=torch.float64)
    u0 = op.sqrt_volumes.to(torch.complex128)[None, :, None].contiguous()
    exact = u0 * torch.exp(-1j * 1000.0 * (op.positions @ rate.T))[None]
    u = propagate(
        op, [Step(1000.0, amplitude=1.0)], u0, rate, frame="lab",
        engine="chebyshev", tol=1e-11,
    )  # fmt: skip
    assert float((u - exact).abs().max()) < 1e-10
