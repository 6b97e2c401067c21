"""Zonal harmonics of an axially symmetric response, and Watson dispersion of
it (compartments.blocks.zonal), against references that share no code with
them: adaptive quadrature (scipy), Dawson's closed form of <cos^2>, and the
Watson stick of the Bingham integral (compartments.blocks.watson_stick)."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from scipy import integrate, special

from dipy_spinverse import Protocol
from dipy_spinverse.compartments import Acquisition
from dipy_spinverse.compartments.blocks.watson import (
    watson_legendre_moments,
    watson_stick,
)
from dipy_spinverse.compartments.blocks.zonal import (
    axial_nodes,
    dispersed_response,
    watson_dispersed,
    zonal_coefficients,
)


@pytest.mark.parametrize("kappa", [0.0, 0.5, 4.0, 32.0, 33.0, 300.0])
def test_watson_moments_against_adaptive_quadrature(kappa):
    """<P_l(t)> for l <= 30 against scipy's quad (1e-12: the moment rule's
    64 nodes; quad's own error is below 1e-13 here)."""
    got = watson_legendre_moments(kappa, 16).numpy()
    # The density lives within ~1 / kappa of t = 1; quad is told where.
    points = [1 - 10 / kappa] if kappa > 10 else None

    def mean(f):
        density = lambda t: np.exp(kappa * (t * t - 1))  # noqa: E731
        num = integrate.quad(
            lambda t: f(t) * density(t), 0, 1, limit=400, points=points
        )[0]
        return num / integrate.quad(density, 0, 1, limit=400, points=points)[0]

    want = [
        mean(lambda t, degree=degree: special.eval_legendre(degree, t))
        for degree in range(0, 32, 2)
    ]
    assert_allclose(got, want, atol=1e-12)


def test_watson_second_moment_is_dawsons_closed_form():
    """p_2 = (3 <t^2> - 1) / 2 with <t^2> = 1 / (2 sqrt(k) F(sqrt(k))) - 1 / (2 k)
    (F: Dawson's function); the limits kappa = 0 and inf (1e-12)."""
    kappa = np.array([0.1, 1.0, 8.0, 64.0, 1e3, 1e5])
    t2 = 1 / (2 * np.sqrt(kappa) * special.dawsn(np.sqrt(kappa))) - 1 / (2 * kappa)
    got = watson_legendre_moments(kappa, 2).numpy()
    assert_allclose(got[:, 0], 1.0, atol=1e-14)
    assert_allclose(got[:, 1], (3 * t2 - 1) / 2, atol=1e-12)
    assert_allclose(
        watson_legendre_moments(0.0, 5).numpy(), [1, 0, 0, 0, 0], atol=1e-15
    )
    assert_allclose(watson_legendre_moments(np.inf, 5).numpy(), np.ones(5))


@pytest.mark.parametrize("bad", [-1.0, np.nan])
def test_a_bad_concentration_is_named(bad):
    with pytest.raises(ValueError, match="kappa must be >= 0"):
        watson_legendre_moments(bad, 3)


def test_an_even_polynomial_comes_back_exactly():
    """A response that is an even polynomial of degree 2 n - 2 is its own
    interpolant from n nodes (1e-13), and its powder average is e_0."""
    n = 6
    coefficients = np.random.default_rng(0).normal(size=n)
    x = np.linspace(-1, 1, 41)
    poly = sum(c * x ** (2 * k) for k, c in enumerate(coefficients))
    at_nodes = sum(c * axial_nodes(n) ** (2 * k) for k, c in enumerate(coefficients))
    e = zonal_coefficients(at_nodes)
    assert_allclose(dispersed_response(e, x, torch.ones(n)).numpy(), poly, atol=1e-13)
    powder = sum(c / (2 * k + 1) for k, c in enumerate(coefficients))
    assert_allclose(float(e[0]), powder, atol=1e-14)


@pytest.mark.parametrize("kappa", [0.0, 0.7, 5.0, 40.0, 1e4, np.inf])
def test_a_dispersed_stick_is_the_bingham_watson_stick(kappa):
    """The tabulated stick exp(-b d (g . n)^2), b d <= 8, dispersed in zonal
    harmonics against the Watson stick's Bingham integral (an independent
    quadrature): within 1e-7 (16 nodes interpolate exp(-8 x^2) to 1e-9)."""
    rng = np.random.default_rng(1)
    bvecs = rng.normal(size=(30, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvals = np.repeat([1000.0, 3000.0, 5000.0], 10)
    d_par = 1.6e-3  # um^2/us
    mu = np.array([0.3, -0.2, 0.93])
    mu /= np.linalg.norm(mu)
    protocol = Protocol.pgse(bvals, bvecs, small_delta=0.01, big_delta=0.03)
    acq = Acquisition.from_protocol(protocol)
    want = watson_stick(acq, direction=mu, kappa=kappa, d_par=d_par).numpy()
    x = axial_nodes(16)
    got = np.empty(len(bvals))
    for b in np.unique(bvals):
        rows = bvals == b
        e = zonal_coefficients(np.exp(-b * d_par * x**2))
        got[rows] = watson_dispersed(e, bvecs[rows] @ mu, kappa).numpy()
    assert_allclose(got, want, atol=1e-7)
