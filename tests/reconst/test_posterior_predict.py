"""The posterior fit's predictive signal (``PosteriorFit.predict``).

References, each independent of the flow:

* a tissue realised from a draw's own descriptors
  (:func:`~dipy_spinverse.posterior.predictive.realise_draws`) reproduces the
  draw's signal where the descriptors fix the tissue: one axon in a periodic
  patch (its position is no property of a periodic patch), within the
  scatter of rasterising the same section twice;
* the fit's predictive mean is closer to the noise-free truth than the prior
  predictive is (the data inform it), and within a bound stated from the
  noise;
* the per-sequence S0 of the data scales the prediction, as the search
  fit's does.

The default prior's estimator for the README demo's protocol ships with the
package: nothing is trained. Each simulation of the default prior's
sections takes about 0.1 s.
"""

import numpy as np
import pytest
from conftest import DEMO_S0, DEMO_SIGMA
from numpy.testing import assert_allclose

from dipy_spinverse.posterior.predictive import predictive_signals, realise_draws
from dipy_spinverse.posterior.targets import encode
from dipy_spinverse.reconst import OK

#: The data's b = 0 signal and noise in its units (SNR 50).
S0, SIGMA = DEMO_S0, DEMO_SIGMA


@pytest.fixture(scope="module")
def model(demo_posterior):
    return demo_posterior


def _draws(model, n, seed, **fixed):
    """Draws of the model's prior with some settings fixed."""
    from dataclasses import replace

    prior = replace(model.prior.prior, **fixed) if fixed else model.prior.prior
    rng = np.random.default_rng(seed)
    return [prior.draw(rng) for _ in range(n)]


def _truth(draws):
    keys = [k for k in draws[0].descriptors if k != "orientation"]
    return {k: np.array([d.descriptors[k] for d in draws]) for k in keys}


def test_a_single_axon_realised_from_its_descriptors_gives_its_signal(model):
    """One axon a patch: the descriptors (diameter, fraction, permeability,
    axis) fix the tissue up to its rasterisation. A tissue realised from a
    draw's descriptors differs from the draw as two realisations of the same
    settings differ from each other, no more: median RMS over six draws at
    most twice theirs plus 0.01 (the patch side's ladder, ~10 % a step), and
    below 0.1. The scatter itself is the prior grid's (measured medians
    0.03 to the draw, 0.07 between realisations, single values up to 0.2:
    a gap under one grid spacing between a cell and its periodic image, open
    or shut as the raster falls)."""
    draws = _draws(model, 6, seed=11, n_cells=(1, 1))
    signals = model.prior.simulate_draws(draws)
    values = encode(_truth(draws))
    prior = model.prior.prior
    first = predictive_signals(prior, model.protocol, values, seed=3)
    second = predictive_signals(prior, model.protocol, values, seed=4)
    to_truth = np.sqrt(np.mean((first - signals) ** 2, axis=1))
    to_each_other = np.sqrt(np.mean((first - second) ** 2, axis=1))
    assert np.median(to_truth) < 2 * np.median(to_each_other) + 0.01, (
        to_truth,
        to_each_other,
    )
    assert np.median(to_truth) < 0.1, to_truth


def test_realised_draws_hold_the_settings_asked_for(model):
    draws = _draws(model, 4, seed=5)
    truth = _truth(draws)
    realised = realise_draws(model.prior.prior, encode(truth), np.random.default_rng(0))
    for draw, asked in zip(realised, draws, strict=True):
        got = draw.descriptors
        assert got["n_cells"] == asked.descriptors["n_cells"]
        # The realised diameter and fraction scatter about the settings as
        # the prior's draws scatter about theirs (rasterisation, the
        # snapped side): 15 % and 0.06, a few grid spacings' worth.
        d = asked.descriptors["cell_diameter"]
        assert abs(got["cell_diameter"] - d) < 0.15 * d
        f = asked.descriptors["restricted_fraction"]
        assert abs(got["restricted_fraction"] - f) < 0.06
        assert_allclose(got["permeability"], asked.descriptors["permeability"], 0.02)
        assert abs(abs(draw.axis @ asked.axis) - 1) < 1e-9


def test_a_tissue_outside_the_grid_is_no_draw(model):
    prior = model.prior.prior
    # Cells of 0.1 um are not min_spacings grid spacings across.
    assert (
        prior.draw_with(
            np.random.default_rng(0),
            family="axon",
            cell_diameter=0.1,
            restricted_fraction=0.5,
            n_cells=1,
            permeability=1e-5,
        )
        is None
    )
    with pytest.raises(ValueError, match="family must be one of"):
        prior.draw_with(
            np.random.default_rng(0),
            family="torus",
            cell_diameter=5.0,
            restricted_fraction=0.5,
            n_cells=1,
            permeability=1e-5,
        )


@pytest.mark.slow
def test_the_predictive_mean_is_informed_by_the_data(model):
    """Four voxels of the prior at SNR 50, in data units (S0 300, the
    long-diffusion-time sequence T2-weighted by 0.8).

    * The predictive mean is closer to the truth than prior draws are: the
      prior predictive's RMS error (over 8 draws) is the yardstick, and the
      posterior's must be at most 0.6 of it on average over the voxels
      (measured: 0.26; 0.12-0.47 a voxel).
    * Each voxel's RMS error is below 0.15 of S0: 7.5 times the noise,
      which the descriptor posterior's width and the prior grid's
      rasterisation scatter allow (measured 0.035-0.124).
    * The prediction is in data units, each sequence scaled by its own
      b = 0 signal.
    """
    draws = _draws(model, 4, seed=5)
    clean = model.prior.simulate_draws(draws)
    scale = np.full(len(model.protocol), S0)
    scale[model.sequences[0][1]] *= 0.8
    rng = np.random.default_rng(0)
    # Magnitudes (Rician), as the estimator is trained on and a scanner
    # writes: Gaussian noise at the high-b shells of a voxel of few cells
    # reads as outside the prior's predictive region.
    data = np.hypot(
        clean * scale + SIGMA * rng.standard_normal(clean.shape),
        SIGMA * rng.standard_normal(clean.shape),
    )
    fit = model.fit(data)
    assert np.all(fit.status == OK)
    predicted = fit.predict(n=8, seed=1) / scale
    error = np.sqrt(np.mean((predicted - clean) ** 2, axis=1))
    prior_signals = model.prior.simulate_draws(_draws(model, 8, seed=99))
    prior_error = np.sqrt(
        np.mean((prior_signals[None] - clean[:, None]) ** 2, axis=(1, 2))
    )
    assert np.mean(error / prior_error) < 0.6, (error, prior_error)
    assert np.all(error < 0.15), error
    # b = 0 volumes: each sequence's own S0.
    b0 = model.protocol.bvals == 0
    assert_allclose(fit.predict(n=1, seed=1)[:, b0], data[:, b0], rtol=0.1)


def test_predictive_samples_spread_and_a_new_protocol(model):
    """Samples of a subset of the acquisitions (a new gradient table) are
    the same draws' signals there; S0 given replaces the fitted one."""
    draws = _draws(model, 1, seed=7, n_cells=(1, 1))
    clean = model.prior.simulate_draws(draws)[0]
    noise = SIGMA * np.random.default_rng(2).standard_normal((2, 99))
    fit = model.fit(np.hypot(S0 * clean + noise[0], noise[1]))
    samples = fit.predictive_samples(n=4, seed=3, S0=1.0)
    assert samples.shape == (4, 99)
    subset = model.protocol[np.arange(0, 99, 3)]
    part = fit.predictive_samples(subset, n=4, seed=3, S0=1.0)
    # The time steps are measured per protocol: equal to within their
    # tolerance (1e-3 a signal), twice.
    assert_allclose(part, samples[:, ::3], atol=2e-3)
    assert np.all(np.std(samples, axis=0) < 0.2)


def test_a_bad_s0_is_refused_before_any_simulation(model, monkeypatch):
    """predict(S0=bad) names S0 at once: the simulations (seconds a voxel)
    never start (probe case 12 of issue 73: 16 s, then the error)."""
    draws = _draws(model, 1, seed=8, n_cells=(1, 1))
    fit = model.fit(S0 * model.prior.simulate_draws(draws)[0])
    assert fit.status == OK

    def never(*args, **kwargs):
        raise AssertionError("simulated before S0 was checked")

    monkeypatch.setattr("dipy_spinverse.reconst.posterior.predictive_signals", never)
    for bad in (-1.0, np.nan, [1.0, 2.0]):
        with pytest.raises(ValueError, match="S0"):
            fit.predict(S0=bad)
