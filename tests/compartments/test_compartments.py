"""Tests of the compartment models (dipy_spinverse.compartments).

Building blocks are checked against references that share no code with them:
closed forms and limits, ``dipy_spinverse.sim.analytic`` (numpy, 60 modes, exact
Magnus integration) and brute-force quadrature over the sphere. Models are
checked by recovering known parameters from simulated signals with Rician
noise at SNR 50 (fixed seeds), by fit -> predict round trips and by the DIPY
contract (single voxel, masks, NaN voxels, bad input). Tolerances are stated
next to each check; the recovery ones are about twice the medians measured.
"""

import warnings

import numpy as np
import pytest
import torch
from conftest import shells_gtab
from dipy.core.gradients import gradient_table
from dipy.reconst.ivim import ivim_prediction
from numpy.testing import assert_allclose, assert_array_equal
from scipy.optimize import nnls as scipy_nnls
from scipy.special import dawsn, erf

from dipy_spinverse.compartments import (
    Acquisition,
    ActiveAxModel,
    ExchangeModel,
    IvimCompartmentModel,
    NoddiModel,
    ZcdModel,
    blocks,
)
from dipy_spinverse.compartments.fitting import Bound, nnls
from dipy_spinverse.masked import BAD_B0, COMMON_CODES, MASKED, NONFINITE, OK
from dipy_spinverse.sim import analytic as an
from dipy_spinverse.sim.sequences import Protocol, fibonacci_sphere
from dipy_spinverse.sim.waveforms import CosineOGSE

T = torch.float64
SNR = 50.0
S0 = 100.0


# --------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gtab_noddi():
    # A clinical multi-shell protocol (timing unused by NODDI).
    return shells_gtab([(0.01, 0.03, (1000, 2000, 3000))])


@pytest.fixture(scope="module")
def gtab_axon():
    # Two diffusion times, up to 225 mT/m (a Connectom-like scanner).
    return shells_gtab(
        [(0.008, 0.02, (1000, 2500, 4000)), (0.008, 0.05, (1000, 3000, 6000))]
    )


@pytest.fixture(scope="module")
def gtab_exchange():
    # Four diffusion times, three orthogonal directions per b-value.
    bvals, small, big = [], [], []
    for Delta in (0.015, 0.03, 0.06, 0.1):
        for b in (0, 500, 1000, 1500, 2000, 3000):
            bvals += [b] * 3
            small += [0.005] * 3
            big += [Delta] * 3
    bvecs = np.tile(np.eye(3), (len(bvals) // 3, 1))
    return gradient_table(
        np.array(bvals, float),
        bvecs=bvecs,
        small_delta=np.array(small),
        big_delta=np.array(big),
    )


@pytest.fixture(scope="module")
def gtab_ivim():
    b = [0, 10, 20, 30, 40, 60, 80, 100, 120, 140, 160, 180, 200]
    b += [300, 400, 500, 600, 700, 800, 900, 1000]
    b = np.array(b, float)
    return gradient_table(b, bvecs=np.tile([1.0, 0, 0], (b.size, 1)), b0_threshold=0)


def _acq(gtab):
    return Acquisition.from_gtab(gtab)


def _unit(rng, n):
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _rician(signal, rng, snr=SNR):
    sigma = S0 / snr
    noise = rng.normal(0, sigma, signal.shape) + 1j * rng.normal(0, sigma, signal.shape)
    return np.abs(signal + noise)


def _simulate(model, params):
    return model._fit_class(model, params).predict()


def _one_fibre_noddi(rng, V):
    """One-fibre NODDI parameters of V voxels: S0, fiso 0-0.3, weight 1, NDI
    0.3-0.8, ODI 0.05-0.6, a uniform direction."""
    return np.column_stack(
        [
            np.full(V, S0),
            rng.uniform(0, 0.3, V),
            np.ones(V),
            rng.uniform(0.3, 0.8, V),
            rng.uniform(0.05, 0.6, V),
            _unit(rng, V),
        ]
    )


def _angle_deg(a, b):
    return np.degrees(np.arccos(np.clip(np.abs(np.sum(a * b, -1)), 0, 1)))


# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------
def test_gaussian_blocks_closed_forms(gtab_axon):
    acq = _acq(gtab_axon)
    b, g = gtab_axon.bvals, gtab_axon.bvecs
    n = np.array([0.6, 0.0, 0.8])
    c2 = (g @ n) ** 2
    tn = torch.tensor(n)
    # Closed forms, to rounding (1e-14).
    assert_allclose(blocks.ball(acq, diffusivity=2e-3), np.exp(-b * 2e-3), rtol=1e-14)
    assert_allclose(
        blocks.stick(acq, direction=tn, d_par=1.7e-3),
        np.exp(-b * 1.7e-3 * c2),
        rtol=1e-14,
    )
    zep = blocks.zeppelin(acq, direction=tn, d_par=2e-3, d_perp=0.5e-3)
    assert_allclose(zep, np.exp(-b * (0.5e-3 + 1.5e-3 * c2)), rtol=1e-14)
    # Limits: a zeppelin with d_perp = d_par is a ball, with d_perp = 0 a stick.
    iso = blocks.zeppelin(acq, direction=tn, d_par=1e-3, d_perp=1e-3)
    assert_allclose(iso, blocks.ball(acq, diffusivity=1e-3), rtol=1e-14)
    flat = blocks.zeppelin(acq, direction=tn, d_par=1e-3, d_perp=0.0)
    assert_allclose(flat, blocks.stick(acq, direction=tn, d_par=1e-3), rtol=1e-14)
    assert_allclose(blocks.dot(acq, shape=(2,)), np.ones((2, b.size)))


def test_restricted_blocks_match_analytic(gtab_axon):
    acq = _acq(gtab_axon)
    protocol = Protocol.from_gtab(gtab_axon)
    g = np.linalg.norm(protocol.gradient_rate, axis=1)
    delta = gtab_axon.small_delta * 1e6
    Delta = gtab_axon.big_delta * 1e6
    n = np.array([0.3, 0.4, np.sqrt(0.75)])
    c = gtab_axon.bvecs @ n
    D = 1.7e-3
    # Batched over three radii at once: shape (3, M).
    radii = np.array([0.5, 3.0, 8.0])
    cyl = blocks.cylinder(
        acq, direction=torch.tensor(np.tile(n, (3, 1))), radius=radii, diffusivity=D
    ).numpy()
    sph = blocks.sphere(acq, radius=radii, diffusivity=D).numpy()
    for i, R in enumerate(radii):
        across = an.cylinder_gpa_pgse(g * np.sqrt(1 - c**2), delta, Delta, R, D)
        ref = np.exp(-gtab_axon.bvals * D * c**2) * across
        # 30 modes here against 60 in analytic.py: 1e-9 (measured 4e-10 at 8 um).
        assert_allclose(cyl[i], ref, atol=1e-9, rtol=0)
        assert_allclose(sph[i], an.sphere_gpa_pgse(g, delta, Delta, R, D), atol=1e-9)
    # Along the axis the cylinder is free diffusion (to rounding).
    along = blocks.cylinder(
        acq, direction=torch.tensor([1.0, 0, 0]), radius=3.0, diffusivity=D
    ).numpy()
    x_axis = np.abs(gtab_axon.bvecs[:, 0]) > 1 - 1e-12
    assert_allclose(along[x_axis], np.exp(-gtab_axon.bvals[x_axis] * D), rtol=1e-12)


def test_restricted_blocks_any_waveform():
    # A cosine OGSE (many pieces) against analytic.py's piecewise kernel.
    waveform = CosineOGSE(small_delta=0.02, big_delta=0.03, n_periods=2)
    bvals = np.array([0.0, 500.0, 1500.0])
    bvecs = np.array([[0, 0, 0], [0, 0, 1.0], [0, 0, 1.0]])
    protocol = Protocol.from_arrays(bvals, bvecs, waveform)
    acq = Acquisition.from_protocol(protocol)
    g = np.linalg.norm(protocol.gradient_rate, axis=1)
    tau, f = waveform.segments
    got = blocks.sphere(acq, radius=5.0, diffusivity=2e-3).numpy()
    assert_allclose(got, an.sphere_gpa(tau, f, g, 5.0, 2e-3), atol=1e-9)
    got = blocks.cylinder(
        acq, direction=torch.tensor([1.0, 0, 0]), radius=4.0, diffusivity=2e-3
    ).numpy()
    assert_allclose(got, an.cylinder_gpa(tau, f, g, 4.0, 2e-3), atol=1e-9)


def _watson_average_by_quadrature(beta, c, kappa, n_theta=300, n_phi=120):
    """``<exp(-beta (g . n)^2)>`` under Watson(mu = z, kappa), g = (s, 0, c),
    by a Gauss-Legendre x uniform product rule on the sphere."""
    x, w = np.polynomial.legendre.leggauss(n_theta)
    phi = (np.arange(n_phi) + 0.5) * 2 * np.pi / n_phi
    gn = np.sqrt(1 - c**2) * np.sqrt(1 - x**2)[:, None] * np.cos(phi) + c * x[:, None]
    density = w[:, None] * np.exp(kappa * (x**2 - 1))[:, None]
    return np.sum(density * np.exp(-beta * gn**2)) / (np.sum(density) * n_phi)


def _watson_stick_cases(kappas, betas):
    """Every (kappa, beta, c) of ``kappas`` x ``betas`` x four cosines, one
    acquisition each (b = beta with d_par = 1, g at angle acos(c) from mu =
    z), and the sticks' signal of each case: (cases, kappa, beta, c, got)."""
    cases = [(k, bd, c) for k in kappas for bd in betas for c in (0.0, 0.5, 0.9, 1.0)]
    kappa, beta, c = (np.array(v) for v in zip(*cases, strict=True))
    bvecs = np.column_stack([np.sqrt(1 - c**2), np.zeros_like(c), c])
    acq = Acquisition(bvals=torch.tensor(beta), bvecs=torch.tensor(bvecs))
    mu = torch.tensor([[0.0, 0.0, 1.0]] * len(cases), dtype=torch.float64)
    got = blocks.watson_stick(acq, direction=mu, kappa=kappa, d_par=1.0).numpy()
    return cases, kappa, beta, c, np.diagonal(got)


def test_watson_stick_against_sphere_quadrature():
    cases, kappa, beta, c, got = _watson_stick_cases(
        (0.0, 1.0, 10.0, 64.0), (0.5, 3.0, 10.0)
    )
    ref = np.array([_watson_average_by_quadrature(bd, cc, k) for k, bd, cc in cases])
    # 32 nodes: 2e-9 at kappa = 64 (measured), 1e-13 below.
    assert_allclose(got, ref, atol=3e-8, rtol=0)
    # kappa = 0 is the powder average, sqrt(pi) erf(sqrt(x)) / (2 sqrt(x)).
    iso = kappa == 0
    x = beta[iso]
    assert_allclose(
        got[iso], np.sqrt(np.pi) * erf(np.sqrt(x)) / (2 * np.sqrt(x)), rtol=1e-12
    )


def test_watson_zeppelin_and_hindered():
    bvecs = fibonacci_sphere(20)
    bvals = np.full(20, 2500.0)
    acq = Acquisition(bvals=torch.tensor(bvals), bvecs=torch.tensor(bvecs))
    mu = np.array([0.0, 0.0, 1.0])
    c = bvecs @ mu
    got = blocks.watson_zeppelin(
        acq, direction=torch.tensor(mu), kappa=8.0, d_par=2e-3, d_perp=0.6e-3
    ).numpy()
    ref = [
        np.exp(-2500 * 0.6e-3) * _watson_average_by_quadrature(2500 * 1.4e-3, ci, 8)
        for ci in c
    ]
    assert_allclose(got, ref, atol=1e-9)
    # <(mu . n)^2> against its Dawson-function closed form; 1/3 at kappa = 0.
    kappa = np.array([0.0, 0.3, 4.0, 30.0, 64.0])
    tau = blocks.watson_tau(torch.tensor(kappa)).numpy()
    sk = np.sqrt(kappa[1:])
    assert_allclose(tau[1:], 1 / (2 * sk * dawsn(sk)) - 1 / (2 * kappa[1:]), rtol=1e-10)
    assert_allclose(tau[0], 1 / 3, rtol=1e-14)
    # The hindered (tensor-averaged) zeppelin: kappa -> 0 is the mean
    # diffusivity (d_par + 2 d_perp) / 3 in every direction.
    hindered = blocks.watson_hindered(
        acq, direction=torch.tensor(mu), kappa=0.0, d_par=2e-3, d_perp=0.5e-3
    ).numpy()
    assert_allclose(hindered, np.exp(-bvals * 1e-3), rtol=1e-12)


def _watson_average_at_the_pole(beta, c, kappa, n_v=120, n_phi=120):
    """The same average for concentrated Watson densities (kappa >= 100): a
    composite Gauss-Legendre rule in ``v = kappa (1 - |x|)`` over [0, 60]
    (six panels of 20 nodes; the density is below exp(-120) of its peak
    beyond), both poles, a uniform rule in the azimuth."""
    x, w = np.polynomial.legendre.leggauss(n_v // 6)
    v = np.concatenate([10 * k + 5 * (x + 1) for k in range(6)])
    wv = np.tile(5 * w, 6)
    phi = (np.arange(n_phi) + 0.5) * 2 * np.pi / n_phi
    total = norm = 0.0
    for pole in (1.0, -1.0):
        t = pole * (1 - v / kappa)
        density = wv * np.exp(-v * (2 - v / kappa))  # exp(kappa (t^2 - 1))
        gn = (
            np.sqrt(1 - c**2) * np.sqrt(1 - t**2)[:, None] * np.cos(phi)
            + c * t[:, None]
        )
        total += np.sum(density[:, None] * np.exp(-beta * gn**2)) / n_phi
        norm += np.sum(density)
    return total / norm


def test_watson_blocks_without_much_dispersion():
    """Concentrated Watson densities (kappa 100 to 1e8, ODI 6e-3 to 6e-9) and
    none (kappa = inf, ODI = 0): the quadrature's window at the pole keeps
    1e-12 (the whole-interval rule had tau 2.7e-3 off at kappa = 1e5 and
    NaN at inf), and kappa = inf is the stick along mu."""
    cases, kappa, beta, c, got = _watson_stick_cases(
        (100.0, 1e3, 1e5, 1e8), (0.5, 5.0, 20.0)
    )
    bvecs = np.column_stack([np.sqrt(1 - c**2), np.zeros_like(c), c])
    acq = Acquisition(bvals=torch.tensor(beta), bvecs=torch.tensor(bvecs))
    mu = torch.tensor([[0.0, 0.0, 1.0]] * len(cases), dtype=torch.float64)
    ref = np.array([_watson_average_at_the_pole(bd, cc, k) for k, bd, cc in cases])
    # The reference's own error is ~1e-14 (its panels resolve exp(-2 v)).
    assert_allclose(got, ref, atol=1e-12, rtol=0)
    big = np.array([100.0, 1e3, 1e5, 1e8])
    sk = np.sqrt(big)
    tau = blocks.watson_tau(torch.tensor(big)).numpy()
    assert_allclose(tau, 1 / (2 * sk * dawsn(sk)) - 1 / (2 * big), rtol=1e-13)
    # No dispersion: sticks, tau = 1, both extra-neurite conventions the
    # zeppelin along mu, and no NaN in the gradients of the other entries.
    inf = torch.tensor(np.inf, dtype=torch.float64)
    stick = blocks.watson_stick(acq, direction=mu, kappa=inf, d_par=1.0)
    assert_allclose(np.diagonal(stick.numpy()), np.exp(-beta * c**2), rtol=1e-14)
    assert (
        float(blocks.watson_tau(inf)) == 1 and float(blocks.watson_tau_slope(inf)) == 0
    )
    zeppelin = blocks.zeppelin(acq, direction=mu[0], d_par=2e-3, d_perp=0.6e-3)
    for average in (blocks.watson_hindered, blocks.watson_zeppelin):
        got = average(acq, direction=mu[0], kappa=inf, d_par=2e-3, d_perp=0.6e-3)
        assert_allclose(got.numpy(), zeppelin.numpy(), rtol=1e-14)
    assert float(blocks.odi_to_kappa(torch.tensor(0.0))) == np.inf
    k = torch.tensor([np.inf, 1e3, 50.0], dtype=torch.float64, requires_grad=True)
    blocks.watson_stick(acq, direction=mu[:3], kappa=k, d_par=1.0).sum().backward()
    assert torch.isfinite(k.grad).all() and k.grad[0] == 0

    def total(value):
        kappa = torch.tensor(value, dtype=torch.float64)
        return blocks.watson_stick(acq, direction=mu[0], kappa=kappa, d_par=1.0).sum()

    # Gradients inside the window against central differences (float64).
    for value in (1e3, 1e5):
        kappa = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        blocks.watson_stick(
            acq, direction=mu[0], kappa=kappa, d_par=1.0
        ).sum().backward()
        h = 1e-4 * value
        numeric = (total(value + h) - total(value - h)) / (2 * h)
        assert_allclose(float(kappa.grad), float(numeric), rtol=1e-6)
        slope = blocks.watson_tau_slope(torch.tensor(value, dtype=torch.float64))
        rise = blocks.watson_tau(
            torch.tensor([value - h, value + h], dtype=torch.float64)
        )
        assert_allclose(float(slope), float(rise[1] - rise[0]) / (2 * h), rtol=1e-5)


def test_watson_stick_table_against_exact(gtab_noddi):
    """The tabulated Watson stick (NODDI's default kernels) against the exact
    quadrature, over the whole ODI range of the model (bounds included), every
    direction, and an irregular set of b-values (not only shells)."""
    rng = np.random.default_rng(7)
    bvals = np.concatenate([gtab_noddi.bvals, [5.0, 700.0, 4321.0, 6000.0]])
    bvecs = np.concatenate([gtab_noddi.bvecs, _unit(rng, 4)])
    acq = Acquisition(bvals=torch.tensor(bvals), bvecs=torch.tensor(bvecs))
    d_par = 1.7e-3
    table = blocks.WatsonStickTable(acq, d_par=d_par, odi_range=(0.01, 0.99))
    V = 3000
    mu = torch.tensor(_unit(rng, V))
    odi = torch.tensor(np.concatenate([[0.01, 0.99], rng.uniform(0.01, 0.99, V - 2)]))
    got = table(mu, odi)
    exact = blocks.watson_stick(
        acq, direction=mu, kappa=blocks.odi_to_kappa(odi), d_par=d_par, n_nodes=64
    )
    # Cubic convolution on 160 x 96 nodes: the error is O(h^3), largest at
    # the lowest ODI (kappa = 64, where the signal varies fastest); measured
    # 8.3e-6 here (b up to 6000, b d_par = 10), 3.5e-6 for b <= 3000. 1e-5 is
    # 1 / 2000 of the noise at SNR 50.
    assert float((got - exact).abs().max()) < 1e-5
    # Exactly 1 at b = 0 (every table entry is), and derivatives of the
    # interpolant against central differences in float64.
    assert_allclose(got[:, bvals == 0].numpy(), 1.0, rtol=0, atol=1e-14)
    x = (mu[:5].clone().requires_grad_(), odi[2:7].clone().requires_grad_())
    assert torch.autograd.gradcheck(table, x, eps=1e-7, atol=1e-6)


def test_noddi_predicts_below_the_tables_odi_range(gtab_noddi):
    """Parameters from elsewhere (ODI < 0.01, the fits' bound, or 0): the
    model's own table clamps ODI, so those voxels are predicted exactly, as
    on any other table (they differed by 1.4 % of S0 at ODI 0.001); at ODI
    0 the prediction is free water + sticks + the zeppelin along mu."""
    model = NoddiModel(gtab_noddi)
    copy = gradient_table(gtab_noddi.bvals.copy(), bvecs=gtab_noddi.bvecs.copy())
    odi = np.array([0.3, 0.005, 0.001, 0.0])
    params = np.column_stack(
        [np.full(4, S0), np.full(4, 0.1), np.ones(4), np.full(4, 0.5), odi]
        + [np.tile([0.0, 0.0, 1.0], (4, 1))]
    )
    fit = model._fit_class(model, params)
    own, exact = fit.predict(), fit.predict(copy)
    assert_allclose(own[1:], exact[1:], rtol=1e-12)
    b, c = gtab_noddi.bvals, gtab_noddi.bvecs[:, 2]
    d = model.d_par
    stick = np.exp(-b * d * c**2)
    zeppelin = np.exp(-b * (d * c**2 + 0.5 * d * (1 - c**2)))
    free = np.exp(-b * model.d_iso)
    assert_allclose(own[3], S0 * (0.1 * free + 0.9 * (0.5 * stick + 0.5 * zeppelin)))


def test_noddi_table_and_exact_kernels_agree(gtab_noddi):
    rng = np.random.default_rng(8)
    V = 40
    exact = NoddiModel(gtab_noddi, kernels="exact")
    table = NoddiModel(gtab_noddi)
    params = _one_fibre_noddi(rng, V)
    signal = _simulate(exact, params)
    # Predictions: within 5e-6 of S0 (3.5e-6 measured for b <= 3000, above).
    assert np.abs(_simulate(table, params) - signal).max() < 5e-6 * S0
    data = _rician(signal, rng)
    a, b = exact.fit(data), table.fit(data)
    # Fits of the same noisy voxels: a model error of 1e-6 moves the
    # least-squares optimum by ~1e-6 / sigma (0.02) of the noise-driven
    # scatter; 1e-3 leaves room for the few voxels whose optimum is flat.
    for name in ("odi", "ndi", "fiso"):
        assert np.median(np.abs(getattr(a, name) - getattr(b, name))) < 1e-4
    assert np.median(_angle_deg(a.direction, b.direction)) < 0.01


def test_odi_kappa_round_trip():
    odi = torch.tensor([0.01, 0.1, 0.5, 0.99], dtype=T)
    assert_allclose(blocks.kappa_to_odi(blocks.odi_to_kappa(odi)), odi, rtol=1e-12)
    assert_allclose(blocks.odi_to_kappa(torch.tensor(0.5, dtype=T)), 1.0, rtol=1e-12)


@pytest.mark.parametrize("k12", [0.0, 1e-5, 1e-4, 1e-3])
def test_karger_matches_analytic(gtab_exchange, k12):
    acq = _acq(gtab_exchange)
    protocol = Protocol.from_gtab(gtab_exchange)
    g = np.linalg.norm(protocol.gradient_rate, axis=1)
    got = blocks.karger(acq, d1=0.5e-3, d2=2.2e-3, f1=0.6, k12=k12).numpy()
    ref = [
        an.karger_signal(
            *an.pgse_waveform(d * 1e6, D * 1e6),
            gg,
            D1=0.5e-3,
            D2=2.2e-3,
            f1=0.6,
            k12=k12,
        )
        for d, D, gg in zip(
            gtab_exchange.small_delta, gtab_exchange.big_delta, g, strict=True
        )
    ]
    # Sixth-order Magnus, 4+ steps per pulse: 3e-8 absolute (measured 1.4e-8).
    assert_allclose(got, ref, atol=3e-8, rtol=0)
    if k12 == 0.0:
        b = gtab_exchange.bvals
        assert_allclose(
            got, 0.6 * np.exp(-b * 0.5e-3) + 0.4 * np.exp(-b * 2.2e-3), rtol=1e-12
        )


def test_blocks_are_differentiable(gtab_axon):
    # Autograd against central differences, in float64 (gradcheck).
    acq = _acq(gtab_axon)
    keep = slice(0, None, 20)
    small = Acquisition(
        bvals=acq.bvals[keep],
        bvecs=acq.bvecs[keep],
        g2=acq.g2[keep],
        waveform_index=acq.waveform_index[keep],
        durations=acq.durations,
        amplitudes=acq.amplitudes,
    )
    mu = torch.tensor([0.3, 0.5, 0.8], dtype=T)
    mu = mu / mu.norm()
    radius = torch.tensor(2.5, dtype=T, requires_grad=True)
    kappa = torch.tensor(5.0, dtype=T, requires_grad=True)
    k12 = torch.tensor(3e-5, dtype=T, requires_grad=True)
    direction = mu.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda r, n: blocks.cylinder(small, direction=n, radius=r, diffusivity=2e-3),
        (radius, direction),
    )
    assert torch.autograd.gradcheck(
        lambda k, n: blocks.watson_stick(small, direction=n, kappa=k, d_par=2e-3),
        (kappa, direction),
    )
    assert torch.autograd.gradcheck(
        lambda k: blocks.karger(small, d1=1e-3, d2=2e-3, f1=0.5, k12=k), (k12,)
    )


def test_restricted_blocks_need_timing(gtab_ivim):
    acq = Acquisition.from_gtab(gtab_ivim, timing=False)
    with pytest.raises(ValueError, match="timing"):
        blocks.sphere(acq, radius=2.0, diffusivity=2e-3)


# --------------------------------------------------------------------------
# Fitting machinery
# --------------------------------------------------------------------------
def test_nnls_matches_scipy():
    rng = np.random.default_rng(0)
    for K in (1, 2, 4):
        Phi = rng.random((50, 20, K))
        y = rng.standard_normal((50, 20)) + rng.random((50, 20))
        got = nnls(torch.tensor(Phi), torch.tensor(y)).numpy()
        ref = np.array([scipy_nnls(P, v)[0] for P, v in zip(Phi, y, strict=True)])
        assert_allclose(got, ref, atol=1e-10)


def test_bound_round_trip():
    for bound in (Bound("a", 0.0, 1.0), Bound("b", 0.2, 20.0, log=True)):
        values = torch.tensor([bound.lower * 1.01 + 1e-3, 0.5, bound.upper * 0.99])
        u = bound.unconstrained(values)
        assert_allclose(bound.value(u), values, rtol=1e-9)
    with pytest.raises(ValueError, match="lower < upper"):
        Bound("c", 1.0, 1.0)


# --------------------------------------------------------------------------
# Parameter recovery at SNR 50
# --------------------------------------------------------------------------
def test_noddi_recovery(gtab_noddi):
    rng = np.random.default_rng(1)
    V = 200
    model = NoddiModel(gtab_noddi)
    mu = _unit(rng, V)
    odi = rng.uniform(0.05, 0.6, V)
    ndi = rng.uniform(0.3, 0.8, V)
    fiso = rng.uniform(0.0, 0.3, V)
    params = np.column_stack([np.full(V, S0), fiso, np.ones(V), ndi, odi, mu])
    fit = model.fit(_rician(_simulate(model, params), rng))
    # Measured medians: 0.009, 0.016, 0.018, 1.9 degrees.
    assert np.median(np.abs(fit.odi - odi)) < 0.02
    assert np.median(np.abs(fit.ndi - ndi)) < 0.035
    assert np.median(np.abs(fit.fiso - fiso)) < 0.035
    assert np.median(_angle_deg(fit.direction, mu)) < 4.0


def test_noddi_two_fibres_noiseless_and_noisy(gtab_noddi):
    rng = np.random.default_rng(2)
    V = 24
    model = NoddiModel(gtab_noddi, n_fibres=2)
    mu0 = _unit(rng, V)
    mu1 = np.cross(mu0, _unit(rng, V))
    mu1 /= np.linalg.norm(mu1, axis=1, keepdims=True)  # 90-degree crossings
    w = np.column_stack([np.full(V, 0.6), np.full(V, 0.4)])
    odi = rng.uniform(0.05, 0.2, (V, 2))
    ndi = rng.uniform(0.4, 0.7, (V, 2))
    fiso = rng.uniform(0.0, 0.2, V)
    params = np.column_stack(
        [
            np.full(V, S0),
            fiso,
            w[:, 0],
            ndi[:, 0],
            odi[:, 0],
            mu0,
            w[:, 1],
            ndi[:, 1],
            odi[:, 1],
            mu1,
        ]
    )
    clean = _simulate(model, params)
    fit = model.fit(clean[:8])
    # Noiseless: exact recovery (fibres sorted by weight) to 1e-6.
    assert_allclose(fit.odi, odi[:8], atol=1e-6)
    assert_allclose(fit.ndi, ndi[:8], atol=1e-6)
    assert_allclose(fit.fibre_fractions, w[:8], atol=1e-6)
    assert_allclose(fit.tissue_ndi, np.sum(w * ndi, axis=1)[:8], atol=1e-6)
    assert np.all(_angle_deg(fit.direction[:, 0], mu0[:8]) < 1e-4)
    assert np.all(_angle_deg(fit.direction[:, 1], mu1[:8]) < 1e-4)
    fit = model.fit(_rician(clean, rng))
    # Measured medians (100 voxels): 1.3 and 2.5 degrees, 0.025 ODI, 0.07 NDI.
    assert np.median(_angle_deg(fit.direction[:, 0], mu0)) < 4.0
    assert np.median(_angle_deg(fit.direction[:, 1], mu1)) < 6.0
    assert np.median(np.abs(fit.odi - odi)) < 0.06
    # The tissue's NDI (sum of w_k ndi_k) is far better determined than each
    # population's: measured medians 0.012-0.016 against 0.08-0.09 per fibre
    # (seeds 2, 5, 7 of this design).
    tissue_error = np.median(np.abs(fit.tissue_ndi - np.sum(w * ndi, axis=1)))
    assert tissue_error < 0.03
    assert tissue_error < np.median(np.abs(fit.ndi - ndi)) / 3


def test_activeax_recovery(gtab_axon):
    rng = np.random.default_rng(3)
    V = 200
    model = ActiveAxModel(gtab_axon)
    mu = _unit(rng, V)
    diameter = rng.uniform(2.0, 10.0, V)
    fiso = rng.uniform(0.0, 0.2, V)
    icvf = rng.uniform(0.4, 0.8, V)
    fic, fee = (1 - fiso) * icvf, (1 - fiso) * (1 - icvf)
    params = np.column_stack(
        [np.full(V, S0), fic, fee, fiso, np.zeros(V), diameter, mu]
    )
    fit = model.fit(_rician(_simulate(model, params), rng))
    # Measured medians: 0.19 um, 0.006, 0.010, 0.25 degrees.
    assert np.median(np.abs(fit.diameter - diameter)) < 0.4
    assert np.median(np.abs(fit.fic - fic)) < 0.015
    assert np.median(np.abs(fit.fiso - fiso)) < 0.02
    assert np.median(_angle_deg(fit.direction, mu)) < 0.6


def test_each_sequence_is_normalised_by_its_own_b0(gtab_axon):
    """Two timings at different echo times: the longer one's signals, its
    b = 0 included, are 0.6 of what one T2 would give (T2 decay). Each
    sequence is divided by its own b = 0 (as the ISBI 2015 voxels need;
    with one mean b = 0 ActiveAx read restricted water where there is T2
    decay), so the fit is that of data without T2 weighting: diameter and
    fractions to the noise-free recovery test's tolerances. A sequence
    without its own b = 0 is warned about."""
    rng = np.random.default_rng(13)
    V = 120
    model = ActiveAxModel(gtab_axon)
    diameter = rng.uniform(2.0, 10.0, V)
    icvf = rng.uniform(0.4, 0.8, V)
    params = np.column_stack(
        [
            np.full(V, S0),
            icvf,
            1 - icvf,
            np.zeros(V),
            np.zeros(V),
            diameter,
            _unit(rng, V),
        ]
    )
    clean = _simulate(model, params)
    long_echo = np.asarray(gtab_axon.big_delta) == 0.05
    decayed = np.where(long_echo, 0.6, 1.0) * clean
    fit = model.fit(_rician(decayed, rng))
    assert np.median(np.abs(fit.diameter - diameter)) < 0.5
    assert np.median(np.abs(fit.fic - icvf)) < 0.02
    # Its prediction of its own table carries each timing's b = 0 level (the
    # T2 weighting): within the b = 0 noise (SNR 50, 3 b = 0: ~1.2 %) of
    # the data's, also for a voxel taken out by indexing.
    assert_allclose(
        np.median(fit.sequence_levels, axis=0), [1 / 0.8, 0.6 / 0.8], rtol=0.01
    )
    ratio = fit.predict()[:, gtab_axon.b0s_mask] / decayed[:, gtab_axon.b0s_mask]
    assert_allclose(np.median(ratio, axis=0), 1.0, atol=0.01)
    assert_allclose(fit[3].predict(), fit.predict()[3], rtol=1e-12)

    keep = ~(long_echo & gtab_axon.b0s_mask)
    no_own_b0 = gradient_table(
        gtab_axon.bvals[keep],
        bvecs=gtab_axon.bvecs[keep],
        small_delta=np.asarray(gtab_axon.small_delta)[keep],
        big_delta=np.asarray(gtab_axon.big_delta)[keep],
    )
    with pytest.warns(UserWarning, match="1 of 2 sequences .* no b = 0"):
        ActiveAxModel(no_own_b0)


def test_zcd_recovery(gtab_axon):
    rng = np.random.default_rng(4)
    V = 150
    model = ZcdModel(gtab_axon)
    mu = _unit(rng, V)
    diameter = rng.uniform(2.0, 10.0, V)
    fic = rng.uniform(0.4, 0.7, V)
    fdot = rng.uniform(0.0, 0.1, V)
    d_par = rng.uniform(1.2e-3, 2.2e-3, V)
    d_perp = d_par * rng.uniform(0.2, 0.6, V)
    params = np.column_stack(
        [np.full(V, S0), fic, 1 - fic - fdot, fdot, diameter, d_par, d_perp, mu]
    )
    fit = model.fit(_rician(_simulate(model, params), rng))
    # Measured medians: 0.26 um, 0.011, 0.005, 2.4e-5 and 2.9e-5 mm^2/s.
    assert np.median(np.abs(fit.diameter - diameter)) < 0.5
    assert np.median(np.abs(fit.fic - fic)) < 0.025
    assert np.median(np.abs(fit.fdot - fdot)) < 0.012
    assert np.median(np.abs(fit.d_par - d_par)) < 6e-5
    assert np.median(np.abs(fit.d_perp - d_perp)) < 6e-5
    assert np.median(_angle_deg(fit.direction, mu)) < 0.6


def test_ivim_recovery_and_dipy_agreement(gtab_ivim):
    rng = np.random.default_rng(5)
    V = 300
    model = IvimCompartmentModel(gtab_ivim)
    f = rng.uniform(0.05, 0.2, V)
    d_star = rng.uniform(0.01, 0.05, V)
    D = rng.uniform(0.5e-3, 1.5e-3, V)
    params = np.column_stack([np.full(V, S0), f, d_star, D])
    clean = _simulate(model, params)
    # Same model as DIPY's: identical predictions for identical parameters.
    for i in range(3):
        assert_allclose(clean[i], ivim_prediction(params[i], gtab_ivim), rtol=1e-12)
    fit = model.fit(_rician(clean, rng))
    # Measured medians: 0.016, 0.0075 mm^2/s, 3e-5 mm^2/s.
    assert np.median(np.abs(fit.perfusion_fraction - f)) < 0.03
    assert np.median(np.abs(fit.D_star - d_star)) < 0.015
    assert np.median(np.abs(fit.D - D)) < 6e-5
    assert_allclose(fit.S0_predicted, fit.S0)


def test_exchange_recovery(gtab_exchange):
    rng = np.random.default_rng(6)
    V = 100
    model = ExchangeModel(gtab_exchange)
    f = rng.uniform(0.4, 0.7, V)
    d_extra = rng.uniform(1.5e-3, 2.5e-3, V)
    d_intra = d_extra * rng.uniform(0.1, 0.4, V)
    tau = 10 ** rng.uniform(np.log10(0.02), np.log10(0.2), V)
    params = np.column_stack([np.full(V, S0), f, d_intra, d_extra, tau])
    clean = _simulate(model, params)
    fit = model.fit(clean[:10])
    # Noiseless: exact (1e-6 relative on the exchange time).
    assert_allclose(fit.exchange_time, tau[:10], rtol=1e-6)
    assert_allclose(fit.f_intra, f[:10], atol=1e-6)
    fit = model.fit(_rician(clean, rng))
    # Measured medians: 0.09, 7e-5 and 2.8e-4 mm^2/s, 29 % on the exchange time.
    assert np.median(np.abs(fit.f_intra - f)) < 0.18
    assert np.median(np.abs(fit.d_intra - d_intra)) < 1.5e-4
    assert np.median(np.abs(fit.d_extra - d_extra)) < 5e-4
    assert np.median(np.abs(fit.exchange_time / tau - 1)) < 0.5


# --------------------------------------------------------------------------
# DIPY contract
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def activeax_case(gtab_axon):
    model = ActiveAxModel(gtab_axon, n_starts=2)
    params = np.array([S0, 0.5, 0.35, 0.15, 0.0, 6.0, 0.0, 0.6, 0.8])
    return model, params


def test_single_voxel_round_trip(activeax_case):
    model, params = activeax_case
    signal = _simulate(model, params)
    assert signal.shape == (len(model.gtab.bvals),)
    fit = model.fit(signal)
    assert fit.shape == ()
    assert_allclose(fit.model_params, params, atol=1e-6)
    assert_allclose(fit.predict(), signal, rtol=1e-8)
    assert_allclose(fit.predict(model.gtab, S0=1.0), signal / S0, rtol=1e-8)
    assert_allclose(fit.diameter, 6.0, rtol=1e-6)
    with pytest.raises(ValueError, match="S0 has shape"):
        fit.predict(S0=np.ones(2))


def test_volume_mask_and_nan(activeax_case):
    model, params = activeax_case
    signal = _simulate(model, params)
    data = np.tile(signal, (2, 3, 2, 1)) * np.arange(1, 13).reshape(2, 3, 2, 1)
    mask = np.ones((2, 3, 2), bool)
    mask[0, 0, 0] = False
    data[1, 2, 1, 5] = np.nan
    fit = model.fit(data, mask=mask)
    assert fit.shape == (2, 3, 2)
    assert np.all(fit.model_params[0, 0, 0] == 0)
    assert np.all(np.isnan(fit.model_params[1, 2, 1]))
    good = mask & ~np.isnan(data).any(-1)
    assert_allclose(fit.diameter[good], 6.0, rtol=1e-5)
    assert_allclose(
        fit.S0[good], S0 * np.arange(1, 13).reshape(2, 3, 2)[good], rtol=1e-6
    )
    pred = fit.predict()
    assert pred.shape == data.shape
    assert_allclose(pred[good], data[good], rtol=1e-6)
    assert fit[1, 2].shape == (2,)
    # Ellipsis, slices and boolean masks index voxels, never parameters.
    assert fit[..., 0].shape == (2, 3)
    assert_allclose(fit[..., 0].diameter, fit.diameter[..., 0])
    assert fit[:, ::2].shape == (2, 2, 2) and fit[good].shape == (int(good.sum()),)
    assert_allclose(fit[good].S0, fit.S0[good])
    with pytest.raises(IndexError):
        fit[0, 0, 0, 0]


def test_voxel_with_a_vanishing_b0_does_not_stop_the_fit(gtab_noddi):
    # A positive b = 0 signal so small (denormal) that the normalised signals
    # overflow: that voxel gets NaN, as a non-finite one does; it used to
    # stop NODDI's whole fit (its tensor starts cannot take infinities).
    model = NoddiModel(gtab_noddi)
    params = np.array([[S0, 0.1, 1.0, 0.6, 0.1, 0.0, 0.0, 1.0]] * 3)
    data = _simulate(model, params)
    data[1, model.gtab.b0s_mask] = 1e-320
    fit = model.fit(data)
    assert np.all(np.isnan(fit.model_params[1]))
    assert_allclose(fit.model_params[[0, 2]], params[[0, 2]], atol=1e-6)
    assert_array_equal(fit.n_fibres, [1, 0, 1])
    # Smaller than 1 but normal (signals near 1e160, finite; their squares,
    # the tensor starts' weights, were not): the voxel is fitted, the others
    # are unchanged.
    data[1, model.gtab.b0s_mask] = 1e-160
    fit = model.fit(data)
    assert np.all(np.isfinite(fit.model_params[1]))
    assert_allclose(fit.model_params[[0, 2]], params[[0, 2]], atol=1e-6)
    # predict(S0=...) checks the voxels it predicts only: the NaN S0 of a
    # voxel without parameters is no error.
    data[1] = np.nan
    fit = model.fit(data)
    assert np.isnan(fit.S0[1])
    assert_allclose(fit.predict(S0=fit.S0)[[0, 2]], fit.predict()[[0, 2]])


def test_compartment_fits_say_why_a_voxel_has_no_parameters(gtab_noddi):
    """The status of every fit class (issue 73, item 2): the gate's codes,
    MASKED outside the mask, kept by the parts of a volume fit."""
    model = NoddiModel(gtab_noddi)
    params = np.array([[S0, 0.1, 1.0, 0.6, 0.1, 0.0, 0.0, 1.0]] * 5)
    data = _simulate(model, params)
    data[1, 3] = np.nan
    data[2, model.gtab.b0s_mask] = 0.0
    data[3, model.gtab.b0s_mask] = 1e-320  # overflows once divided by it
    mask = np.array([True, True, True, True, False])
    fit = model.fit(data, mask=mask)
    assert_array_equal(fit.status, [OK, NONFINITE, BAD_B0, NONFINITE, MASKED])
    assert_array_equal(fit.ok, [True, False, False, False, False])
    assert fit.status_counts() == {
        COMMON_CODES[OK]: 1,
        COMMON_CODES[NONFINITE]: 2,
        COMMON_CODES[BAD_B0]: 1,
    }
    assert fit[2].status == BAD_B0 and fit[4].status == MASKED
    assert_array_equal(fit[4].model_params, 0.0)  # as the volume's there
    assert_array_equal(fit[1:3].status, fit.status[1:3])
    # The maps say the same: NaN parameters where the status is not OK.
    assert_array_equal(np.isnan(fit.S0), ~fit.ok & fit.mask)
    # A fit built from parameters: OK where S0 is finite.
    built = model._fit_class(model, fit.model_params)
    assert_array_equal(built.status, [OK, NONFINITE, NONFINITE, NONFINITE, MASKED])
    assert "status={'ok': 1" in repr(fit)


def test_exchange_predict_masked_and_nan_voxels(gtab_exchange):
    model = ExchangeModel(gtab_exchange, n_starts=1)
    params = np.array(
        [[S0, 0.5, 0.4e-3, 2e-3, 0.05], [0.5 * S0, 0.6, 0.3e-3, 2.2e-3, 0.1]]
    )
    signal = _simulate(model, params)
    data = np.stack([signal, signal[::-1]])  # (2, 2, M)
    data[0, 1, 3] = np.nan
    mask = np.array([[True, True], [False, True]])
    fit = model.fit(data, mask=mask)
    pred = fit.predict()
    assert pred.shape == data.shape
    assert np.all(pred[1, 0] == 0)  # outside the mask: 0, as DIPY's fits
    assert np.all(np.isnan(pred[0, 1]))  # a NaN voxel: NaN, and no error
    assert_allclose(pred[0, 0], signal[0], rtol=1e-6)
    assert_allclose(pred[1, 1], signal[0], rtol=1e-6)
    scaled = fit.predict(S0=1.0)
    assert np.all(scaled[1, 0] == 0) and np.all(np.isnan(scaled[0, 1]))
    assert_allclose(scaled[0, 0], signal[0] / S0, rtol=1e-6)
    assert np.all(fit[1, 0].predict() == 0) and np.all(fit[1].predict()[0] == 0)


def test_exchange_does_not_depend_on_chunking(gtab_exchange):
    # A fast-exchanging voxel needs more Magnus steps than slow ones; each
    # voxel's steps are its own, not those of the voxels chunked with it.
    params = np.array(
        [
            [S0, 0.5, 0.4e-3, 2e-3, 0.5],
            [S0, 0.95, 0.3e-3, 2.2e-3, 0.0025],
            [S0, 0.4, 0.5e-3, 1.8e-3, 0.03],
        ]
    )
    signals, fits = [], []
    for chunk_size in (1, 2, 3):
        model = ExchangeModel(
            gtab_exchange, n_starts=1, max_iter=5, chunk_size=chunk_size
        )
        signals.append(_simulate(model, params))
        fits.append(model.fit(signals[0]).model_params)
    for other in signals[1:]:
        assert_allclose(other, signals[0], rtol=1e-12, atol=0)
    for other in fits[1:]:
        assert_allclose(other, fits[0], rtol=1e-12, atol=0)


def test_chunks_on_threads_give_the_same_fit(gtab_noddi, monkeypatch):
    # Chunks are fitted two at a time on threads; each voxel's fit
    # is its own, so neither the chunking nor the thread count changes it
    # beyond rounding (batched BLAS sums in another order: 1e-13 measured).
    # The exact kernels take torch's forward mode, whose first use
    # filters a torch warning: threads must not leave that filter (or drop
    # the user's) in the process's filter list.
    from dipy_spinverse.compartments import chunks, fitting

    monkeypatch.setattr(chunks, "_MIN_THREADED_CHUNK", 1)  # small chunks threaded
    rng = np.random.default_rng(5)
    V = 8
    params = _one_fibre_noddi(rng, V)
    data = _rician(_simulate(NoddiModel(gtab_noddi), params), rng)
    threads = torch.get_num_threads()
    fits = []
    try:
        for n_threads, chunk_size in ((1, V), (2, 1), (2, 3)):
            torch.set_num_threads(n_threads)
            fitting._FORWARD_MODE_READY.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)
                before = list(warnings.filters)
                model = NoddiModel(
                    gtab_noddi, kernels="exact", n_starts=1, chunk_size=chunk_size
                )
                fits.append(model.fit(data).model_params)
                assert warnings.filters == before
    finally:
        torch.set_num_threads(threads)
    for other in fits[1:]:
        assert_allclose(other, fits[0], rtol=1e-10, atol=1e-12)


def test_predict_outside_the_mask_is_zero(activeax_case):
    model, params = activeax_case
    volume = np.stack([params, np.zeros_like(params), np.full_like(params, np.nan)])
    pred = model._fit_class(model, volume).predict()
    assert_allclose(pred[0], _simulate(model, params))
    assert np.all(pred[1] == 0) and np.all(np.isnan(pred[2]))


def test_bad_inputs(gtab_axon, gtab_ivim):
    model = ActiveAxModel(gtab_axon, n_starts=1)
    n = len(gtab_axon.bvals)
    with pytest.raises(ValueError, match="data"):
        model.fit(np.ones((4, n + 1)))
    with pytest.raises(ValueError, match="mask"):
        model.fit(np.ones((4, n)), mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="big_delta"):
        ActiveAxModel(gtab_ivim)  # no timing
    with pytest.raises(ValueError, match="n_fibres"):
        NoddiModel(gtab_ivim, n_fibres=4)
    with pytest.raises(ValueError, match="d_star_bounds"):
        IvimCompartmentModel(gtab_ivim, d_bounds=(0, 5e-3), d_star_bounds=(4e-3, 0.3))
    with pytest.raises(ValueError, match="diameter_bounds"):
        ZcdModel(gtab_axon, diameter_bounds=(5.0, 1.0))
    with pytest.raises(ValueError, match="gtab"):
        NoddiModel(np.zeros(3))
    # Models without timing check the b-values as those with timing do:
    # b in ms/um^2 or no weighted volume would be fitted silently.
    in_ms = gradient_table(gtab_ivim.bvals / 1000, bvecs=gtab_ivim.bvecs)
    only_b0 = gradient_table(np.zeros(4), bvecs=np.zeros((4, 3)))
    for cls in (NoddiModel, IvimCompartmentModel):
        with pytest.raises(ValueError, match=r"gtab.bvals .*ms/um\^2"):
            cls(in_ms)
        with pytest.raises(ValueError, match="no diffusion-weighted volume"):
            cls(only_b0)
    # ... and the encoding: a spherical b-tensor is not one direction.
    spherical = gradient_table(gtab_ivim.bvals, bvecs=gtab_ivim.bvecs, btens="STE")
    with pytest.raises(ValueError, match="linear encoding"):
        NoddiModel(spherical)
    # Diffusivities in another unit name the unit they look like.
    with pytest.raises(ValueError, match="d_par.*um\\^2/ms"):
        NoddiModel(gtab_ivim, d_par=1.7)
    with pytest.raises(ValueError, match="d_iso.*m\\^2/s"):
        ActiveAxModel(gtab_axon, d_iso=3e-9)
    with pytest.raises(ValueError, match="d_par_bounds.*um\\^2/ms"):
        ZcdModel(gtab_axon, d_par_bounds=(0.1, 3.0))
    with pytest.raises(ValueError, match="d_bounds.*um\\^2/ms"):
        IvimCompartmentModel(gtab_ivim, d_bounds=(0.0, 3.0), d_star_bounds=(4.0, 300.0))
    with pytest.raises(ValueError, match="exchange_time_bounds.*seconds"):
        ExchangeModel(gtab_axon, exchange_time_bounds=(2.0, 2000.0))
    with pytest.raises(ValueError, match="dot must be True or False"):
        ActiveAxModel(gtab_axon, dot="no")
    # Data that are not numbers, options of the wrong kind.
    for bad in (np.full((2, n), "a"), np.ones((2, n), bool)):
        with pytest.raises(ValueError, match="data must hold numbers"):
            model.fit(bad)
    with pytest.raises(ValueError, match="learned_options must be a dict"):
        IvimCompartmentModel(gtab_ivim, learned_options="fast")
    with pytest.raises(ValueError, match="cache_dir must be a folder"):
        IvimCompartmentModel(gtab_ivim, cache_dir=12)


# --------------------------------------------------------------------------
# NODDI extra-neurite convention: tensor- vs signal-averaged
# --------------------------------------------------------------------------
def _watson_sphere_rule(mu, kappa, n_theta=200, n_phi=96):
    """Points (Q, 3) and Watson(mu, kappa) weights (Q,) summing to 1: a
    Gauss-Legendre x uniform product rule around mu, independent of
    ``blocks``."""
    x, w = np.polynomial.legendre.leggauss(n_theta)
    phi = (np.arange(n_phi) + 0.5) * 2 * np.pi / n_phi
    e1 = np.cross(mu, [1.0, 0.0, 0.0] if abs(mu[0]) < 0.9 else [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(mu, e1)
    s = np.sqrt(1 - x**2)[:, None]
    n = (
        x[:, None, None] * mu
        + (s * np.cos(phi))[..., None] * e1
        + (s * np.sin(phi))[..., None] * e2
    ).reshape(-1, 3)
    weight = (w[:, None] * np.exp(kappa * (x**2 - 1))[:, None]).repeat(n_phi, 1)
    weight = weight.ravel()
    return n, weight / weight.sum()


def _noddi_reference(bvals, bvecs, mu, kappa, ndi, d_par, average):
    """One NODDI fibre (no free water) by brute-force Watson averaging."""
    n, wt = _watson_sphere_rule(mu, kappa)
    gn2 = (bvecs @ n.T) ** 2  # (M, Q)
    intra = np.exp(-bvals[:, None] * d_par * gn2) @ wt
    d_perp = d_par * (1 - ndi)
    if average == "signal":
        extra = np.exp(-bvals[:, None] * (d_perp + (d_par - d_perp) * gn2)) @ wt
    else:
        nn = np.einsum("q,qi,qj->ij", wt, n, n)  # <n n^T>
        D = d_perp * np.eye(3) + (d_par - d_perp) * nn
        extra = np.exp(-bvals * np.einsum("mi,ij,mj->m", bvecs, D, bvecs))
    return ndi * intra + (1 - ndi) * extra


@pytest.mark.parametrize("average", ["tensor", "signal"])
def test_noddi_extra_average_against_sphere_quadrature(gtab_noddi, average):
    # The exact kernels: the table is checked against them separately.
    model = NoddiModel(gtab_noddi, extra_average=average, kernels="exact")
    mu = np.array([0.3, -0.5, 0.8])
    mu /= np.linalg.norm(mu)
    bvals = gtab_noddi.bvals * 1.0
    bvecs = gtab_noddi.bvecs
    d_par = model.d_par
    for odi, ndi in ((0.05, 0.6), (0.3, 0.4), (0.7, 0.5)):
        kappa = 1 / np.tan(np.pi * odi / 2)
        params = np.concatenate([[1.0, 0.0, 1.0, ndi, odi], mu])
        got = model._fit_class(model, params).predict()
        ref = _noddi_reference(bvals, bvecs, mu, kappa, ndi, d_par, average)
        # 32-node Watson rule against a 200 x 96 product rule: 1e-9 measured.
        assert_allclose(got, ref, atol=1e-8)


def test_noddi_extra_average_limits(gtab_noddi):
    """The conventions agree where they must (a single orientation; no
    extra-neurite water, ndi = 1; an isotropic extra-neurite zeppelin, ndi = 0
    where the tortuosity gives d_perp = d_par) and differ otherwise; checked
    on the brute-force reference, independent of the model."""
    bvals, bvecs = gtab_noddi.bvals * 1.0, gtab_noddi.bvecs
    mu = np.array([0.0, 0.6, 0.8])
    d_par = 1.7e-3

    def gap(kappa, ndi):
        t = _noddi_reference(bvals, bvecs, mu, kappa, ndi, d_par, "tensor")
        s = _noddi_reference(bvals, bvecs, mu, kappa, ndi, d_par, "signal")
        return np.abs(t - s).max()

    # Single orientation: both are the zeppelin, so the gap falls with kappa
    # like the variance of (g . n)^2, ~1/kappa (x4 kappa -> about / 4).
    gaps = [gap(k, 0.5) for k in (16.0, 64.0, 256.0, 1024.0)]
    assert np.all(np.diff(gaps) < 0)
    assert gaps[-1] < 1e-3
    assert_allclose(gaps[-1] / gaps[-2], 0.25, rtol=0.15)
    # ndi = 1: no extra-neurite water; ndi = 0: both are the same ball.
    assert gap(2.0, 1.0) < 1e-15
    assert gap(2.0, 0.0) < 1e-14
    # Dispersed (kappa 2, ODI 0.3): they differ by 0.6 % of S0 (measured);
    # 20x the quadrature error of either side.
    assert gap(2.0, 0.5) > 3e-3
    # And the model follows its reference in both (see the test above);
    # at ODI 0.3 its two conventions differ as the references do.
    fits = []
    for average in ("tensor", "signal"):
        model = NoddiModel(gtab_noddi, extra_average=average, kernels="exact")
        params = np.concatenate([[1.0, 0.0, 1.0, 0.5, 0.3], mu])
        fits.append(model._fit_class(model, params).predict())
    kappa = 1 / np.tan(np.pi * 0.3 / 2)
    assert_allclose(np.abs(fits[0] - fits[1]).max(), gap(kappa, 0.5), rtol=1e-6)


def test_noddi_extra_average_choice(gtab_noddi):
    with pytest.raises(ValueError, match="extra_average"):
        NoddiModel(gtab_noddi, extra_average="mean")


# --------------------------------------------------------------------------
# Fibre count per voxel (fibres="auto" or a count map)
# --------------------------------------------------------------------------
def _noddi_voxels(counts, rng, *, odi=0.1, ndi=0.6, fiso=0.1):
    """Parameters in the 3-fibre layout, NaN beyond each voxel's count;
    populations 90 degrees apart, weights 0.5/0.3/0.2 renormalised."""
    V = len(counts)
    out = np.full((V, 2 + 18), np.nan)
    out[:, 0] = S0
    a = _unit(rng, V)
    b = np.cross(a, _unit(rng, V))
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    dirs = np.stack([a, b, np.cross(a, b)], axis=1)
    for i, k in enumerate(counts):
        out[i, 1] = 1.0 if k == 0 else fiso
        w = np.array([0.5, 0.3, 0.2][:k])
        for j in range(k):
            out[i, 2 + 6 * j : 8 + 6 * j] = [w[j] / w.sum(), ndi, odi, *dirs[i, j]]
    return out


def test_fibre_count_map(gtab_noddi):
    rng = np.random.default_rng(5)
    counts = np.array([0, 1, 2, 1, 2, 0])
    model = NoddiModel(gtab_noddi, fibres="auto")
    assert model.n_fibres == 3 and len(model.param_names) == 20
    params = _noddi_voxels(counts, rng)
    clean = _simulate(model, params)
    assert np.isfinite(clean).all()
    # A (2, 3) volume with one voxel masked out.
    data = clean.reshape(2, 3, -1)
    mask = np.ones((2, 3), bool)
    mask[1, 2] = False
    fit = model.fit(data, mask=mask, fibres=counts.reshape(2, 3))
    assert_array_equal(fit.n_fibres, np.where(mask, counts.reshape(2, 3), 0))
    flat = fit.model_params.reshape(6, -1)
    # Per-fibre maps are (..., 3), NaN beyond each voxel's count.
    assert fit.odi.shape == (2, 3, 3)
    assert_array_equal(
        np.isnan(fit.odi.reshape(6, 3)[:5]), np.arange(3) >= counts[:5, None]
    )
    # Noiseless: the given counts are fitted exactly (1e-6, as with a fixed
    # n_fibres); fibres sorted by weight in both.
    for i in np.flatnonzero(mask.ravel()):
        k = counts[i]
        assert_allclose(flat[i, 1], params[i, 1], atol=1e-6)
        for j in range(k):
            got, want = flat[i, 2 + 6 * j : 8 + 6 * j], params[i, 2 + 6 * j : 8 + 6 * j]
            assert_allclose(got[:3], want[:3], atol=1e-6)
            assert _angle_deg(got[3:], want[3:]) < 1e-3
    # directions: DIPY's layout (..., F, 3), zero rows where there is no fibre.
    dirs = fit.directions
    assert dirs.shape == (2, 3, 3, 3)
    norms = np.linalg.norm(dirs, axis=-1)
    assert_allclose(norms, (np.arange(3) < fit.n_fibres[..., None]).astype(float))
    # Predictions: the data inside the mask (absent fibres weigh 0), 0 outside.
    pred = fit.predict()
    assert_allclose(pred[mask], data[mask], rtol=1e-6)
    assert_array_equal(pred[~mask], 0.0)


def test_fibre_count_auto(gtab_noddi):
    rng = np.random.default_rng(6)
    counts = np.array([0, 1, 2, 2, 1])
    model = NoddiModel(gtab_noddi, fibres="auto")
    data = _rician(_simulate(model, _noddi_voxels(counts, rng, odi=0.08)), rng, 200)
    fit = model.fit(data)
    # SNR 200, 90-degree crossings, weights 0.6/0.4: every count is found.
    assert_array_equal(fit.n_fibres, counts)
    single = NoddiModel(gtab_noddi, fibres="auto", response=None)
    with pytest.warns(UserWarning, match="FA > 0.7.*generic"):
        # No voxel to estimate a CSD response from (free water, crossings):
        # the peaks only start the fits, so a generic response serves.
        few = single.fit(data[counts != 1])
    assert_array_equal(few.n_fibres, counts[counts != 1])


def test_fibre_count_bad_input(gtab_noddi):
    fixed = NoddiModel(gtab_noddi, n_fibres=2)
    data = np.ones((2, len(gtab_noddi.bvals)))
    with pytest.raises(ValueError, match="fibres='auto'"):
        fixed.fit(data, fibres=np.array([1, 2]))
    auto = NoddiModel(gtab_noddi, fibres="auto")
    with pytest.raises(ValueError, match="one count per voxel"):
        auto.fit(data, fibres=np.array([1, 2, 1]))
    with pytest.raises(ValueError, match="0..3"):
        auto.fit(data, fibres=np.array([1, 4]))
    with pytest.raises(ValueError, match="integers.*astype"):
        auto.fit(data, fibres=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="Invalid fibres 'AUTO'"):
        auto.fit(data, fibres="AUTO")
    with pytest.raises(ValueError, match="fibres"):
        NoddiModel(gtab_noddi, fibres="all")
    good = ((1.7e-3, 3e-4, 3e-4), 100.0)
    assert NoddiModel(gtab_noddi, fibres="auto", response=good).response is good
    for response in ((1, 2, 3), ((1.7e-3, 3e-4), 100.0), ((1.7e-3, 3e-4, 0), 1)):
        with pytest.raises(ValueError, match=r"response must be \(evals, S0\)"):
            NoddiModel(gtab_noddi, fibres="auto", response=response)
    # n_fibres caps the count: layout and accepted map follow it.
    two = NoddiModel(gtab_noddi, fibres="auto", n_fibres=2)
    assert len(two.param_names) == 2 + 6 * 2
    with pytest.raises(ValueError, match="0..2"):
        two.fit(data, fibres=np.array([1, 3]))
    with pytest.raises(ValueError, match="largest count"):
        NoddiModel(gtab_noddi, fibres="auto", n_fibres=0)


def test_noddi_kappa_map_outside_the_mask(gtab_noddi):
    """Watson kappa is 0 outside the mask as every map, not inf with a
    divide-by-zero warning; inside it is 1 / tan(pi ODI / 2)."""
    model = NoddiModel(gtab_noddi)
    params = np.array([[100.0, 0.1, 1.0, 0.6, 0.2, 0.0, 0.0, 1.0]] * 2)
    params[1] = 0.0
    fit = model._fit_class(model, params, mask=np.array([True, False]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kappa = fit.kappa
    assert_allclose(kappa, [1 / np.tan(np.pi * 0.1), 0.0])


@pytest.mark.parametrize("model_class", [NoddiModel, ActiveAxModel, ZcdModel])
def test_a_table_without_b0_is_refused(model_class):
    """Without a b = 0 volume S0 is extrapolated and trades off against the
    fast compartments (ActiveAx diameters at their bound, NODDI's ndi a third
    low): the models refuse the table, naming gtab and the fixes."""
    timings = [(0.008, 0.02, (1000, 2500)), (0.008, 0.05, (3000,))]
    gtab = shells_gtab(timings, n_b0=0)
    with pytest.raises(ValueError, match=r"gtab has no b = 0 volume.*b0_threshold"):
        model_class(gtab)
    # A b = 0 volume stored as b = 5 is one once the threshold says so.
    bvals = gtab.bvals.copy()
    bvecs = gtab.bvecs.copy()
    bvals[0] = 5.0
    with pytest.raises(ValueError, match=r"b0_threshold=5"):
        model_class(
            gradient_table(
                bvals,
                bvecs=bvecs,
                big_delta=gtab.big_delta,
                small_delta=gtab.small_delta,
                b0_threshold=0,
            )
        )
    assert (
        model_class(
            gradient_table(
                bvals,
                bvecs=bvecs,
                big_delta=gtab.big_delta,
                small_delta=gtab.small_delta,
                b0_threshold=5,
            )
        )._b0s.sum()
        == 1
    )
