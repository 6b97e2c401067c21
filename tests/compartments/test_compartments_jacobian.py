"""Closed-form derivatives of NODDI's tabulated neurite signal.

``blocks.WatsonStickTable.with_derivatives`` and
``blocks.noddi_neurite_derivatives`` feed the Levenberg-Marquardt Jacobian of
``NoddiModel`` (table kernels, tensor-averaged extra-neurite compartment).
They are checked in float64 against central differences of the very
functions they differentiate, whose truncation error (step 1e-6, third
derivatives of order 1-10) is about 1e-11; the tolerance 1e-8 leaves room for
rounding (1e-16 / 1e-6 = 1e-10 per evaluation, amplified by the table's
node spacing) and fails for any wrong term (their sizes are 1e-3 to 1).
"""

import numpy as np
import pytest
import torch
from dipy.core.gradients import gradient_table
from numpy.testing import assert_allclose

from dipy_spinverse.compartments import NoddiModel, blocks
from dipy_spinverse.compartments.acquisition import Acquisition
from dipy_spinverse.compartments.base import CompartmentModel
from dipy_spinverse.sim.sequences import fibonacci_sphere

STEP = 1e-6
TOL = 1e-8


@pytest.fixture(scope="module")
def gtab():
    dirs = fibonacci_sphere(20)
    bvals = np.r_[0.0, 0.0, np.full(20, 1000.0), np.full(20, 2500.0)]
    bvecs = np.r_[np.eye(3)[:2], dirs, dirs]
    return gradient_table(bvals, bvecs=bvecs)


def _points(n, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, 3))
    mu = torch.tensor(v / np.linalg.norm(v, axis=1, keepdims=True))
    # ODI inside the table's range, away from its ends (the interpolant is
    # constant beyond them) and NDI over (0, 1).
    odi = torch.tensor(rng.uniform(0.02, 0.95, n))
    ndi = torch.tensor(rng.uniform(0.0, 1.0, n))
    return mu, odi, ndi


def _central(f, x, step=STEP):
    return (f(x + step) - f(x - step)) / (2 * step)


def test_table_slopes_match_central_differences(gtab):
    acq = Acquisition.from_gtab(gtab, timing=False)
    table = blocks.WatsonStickTable(acq, d_par=1.7e-3, odi_range=(0.01, 0.99))
    mu, odi, _ = _points(40)
    value, d_odi, d_t = table.with_derivatives(mu, odi)
    assert_allclose(value, table(mu, odi), atol=1e-15)
    assert_allclose(d_odi, _central(lambda o: table(mu, o), odi), atol=TOL)
    # t = (g . mu)^2: move mu along a unit tangent w and divide the change of
    # E by that of t.
    w = torch.linalg.cross(
        mu, torch.tensor([0.3, -0.5, 0.8], dtype=mu.dtype).expand_as(mu)
    )
    w = w / w.norm(dim=-1, keepdim=True)

    def along(s):
        m = mu + s * w
        return m / m.norm(dim=-1, keepdim=True)

    c, dc = mu @ acq.bvecs.T, w @ acq.bvecs.T
    dE = _central(lambda s: table(along(s), odi), torch.zeros(40, 1, dtype=mu.dtype))
    assert_allclose(d_t * 2 * c * dc, dE, atol=TOL)


def test_neurite_derivatives_match_central_differences(gtab):
    model = NoddiModel(gtab)
    acq, table = model._acq, model._stick_table
    mu, odi, ndi = _points(40, seed=1)
    d_par = model.d_par

    def neurite(mu, odi, ndi):
        return model._fibre_columns(acq, {}, {"odi": odi, "ndi": ndi}, mu)[..., 0]

    value, d_odi, d_ndi, d_mu = blocks.noddi_neurite_derivatives(
        acq, table, direction=mu, odi=odi, ndi=ndi, d_par=d_par
    )
    assert_allclose(value, neurite(mu, odi, ndi), atol=1e-14)
    assert_allclose(d_odi, _central(lambda o: neurite(mu, o, ndi), odi), atol=TOL)
    assert_allclose(d_ndi, _central(lambda n: neurite(mu, odi, n), ndi), atol=TOL)
    for k in range(3):
        e = torch.zeros(3, dtype=mu.dtype)
        e[k] = 1.0
        # The unnormalised components of mu, at unit mu.
        numeric = _central(lambda s, e=e: neurite(mu + s * e, odi, ndi), 0.0)
        assert_allclose(d_mu[..., k], numeric, atol=TOL)


def test_tau_slope_matches_closed_form():
    # tau = 1 / (2 sqrt(k) F(sqrt k)) - 1 / (2 k) (Dawson F); its derivative
    # by central differences of the closed form (scipy's Dawson function).
    from scipy.special import dawsn

    def tau(k):
        r = np.sqrt(k)
        return 1 / (2 * r * dawsn(r)) - 1 / (2 * k)

    kappa = np.array([0.5, 2.0, 8.0, 30.0])
    numeric = (tau(kappa + 1e-5) - tau(kappa - 1e-5)) / 2e-5
    assert_allclose(blocks.watson_tau_slope(torch.tensor(kappa)), numeric, rtol=1e-6)


@pytest.mark.parametrize("n_fibres", [1, 2])
def test_model_jacobian_matches_forward_differences(gtab, n_fibres):
    model = NoddiModel(gtab, n_fibres=n_fibres)
    g = torch.Generator().manual_seed(2)
    x = model._renormalise(
        torch.randn(30, 5 * n_fibres, dtype=torch.float64, generator=g)
    )
    Phi = model._columns_x(x)
    c = torch.rand(30, n_fibres + 1, dtype=torch.float64, generator=g)
    analytic = model._derivatives(x, Phi, c)

    def signal(x):
        return (model._columns_x(x) @ c[..., None])[..., 0]

    eye = torch.eye(x.shape[1], dtype=x.dtype)
    numeric = torch.stack(
        [_central(lambda s, e=e: signal(x + s * e), 0.0) for e in eye], dim=-1
    )
    assert_allclose(analytic, numeric, atol=TOL)
    # The generic forward differences agree to their own accuracy (~1e-7).
    fd = CompartmentModel._derivatives(model, x, Phi, c)
    assert_allclose(analytic, fd, atol=1e-6)
