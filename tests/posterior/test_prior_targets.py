"""Every prior through one door: the white-matter priors' descriptors as flow
targets, their simulators as a training takes them, and a mixing prior's
posterior trained, fitted, saved and loaded through SpinverseModel."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import Protocol, SpinverseModel
from dipy_spinverse.posterior import (
    MixturePrior,
    TissuePrior,
    TrainingOptions,
    WhiteMatterPrior,
    default_training,
)
from dipy_spinverse.posterior.cache import estimator_key
from dipy_spinverse.posterior.simulator import bound_simulator
from dipy_spinverse.posterior.targets import TISSUE_TARGETS, DescriptorTargets
from dipy_spinverse.reconst import OK
from dipy_spinverse.reconst.posterior import PosteriorFit

#: Coarse, small bundles: cheap sections (as the mixing prior's tests).
SMALL = WhiteMatterPrior.fixed(
    n_axons=(4, 6), mean_diameter=(2.0, 4.0), fibre_fraction=(0.5, 0.7)
)
PROTOCOL = Protocol.pgse(
    np.r_[0.0, 0.0, [1000.0] * 6, [3000.0] * 6],
    np.r_[np.zeros((2, 3)), np.tile(np.eye(3), (4, 1))],
    small_delta=0.01,
    big_delta=0.03,
)
TINY = TrainingOptions(
    n_simulations=300,
    n_calibration=60,
    epochs=8,
    hidden=32,
    embedding=16,
    transforms=2,
    batch_size=32,
)


# -- the targets -------------------------------------------------------------------
def test_descriptor_targets_round_trip_with_constants_and_aliases():
    targets = DescriptorTargets(
        fractions=("a",),
        positives=("b",),
        constants=(("c", 0.25),),
        aliases=(("d", "b"),),
    )
    assert targets.coordinates == ("logit_a", "log_b")
    assert targets.scalars == ("a", "b", "c", "d")
    truth = {"a": np.array([0.1, 0.7]), "b": np.array([2e-3, 5.0])}
    coordinates = targets.encode(truth)
    assert_allclose(coordinates[:, 0], np.log(truth["a"] / (1 - truth["a"])))
    assert_allclose(coordinates[:, 1], np.log(truth["b"]))
    back = targets.decode(coordinates)
    assert_allclose(back["a"], truth["a"])
    assert_allclose(back["b"], truth["b"])
    assert_array_equal(back["c"], [0.25, 0.25])
    assert_array_equal(back["d"], back["b"])


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(), "at least one"),
        (dict(fractions=("a",), positives=("a",)), "named twice"),
        (dict(fractions=("a",), aliases=(("d", "e"),)), "not targets"),
    ],
)
def test_bad_descriptor_targets_are_named(fields, match):
    with pytest.raises(ValueError, match=match):
        DescriptorTargets(**fields)


def test_a_range_of_one_value_is_a_constant_not_a_coordinate():
    """A flow coordinate without spread has no density: a diffusivity or
    g-ratio of one value, free water the prior never holds, are constants."""
    wm = WhiteMatterPrior.fixed(intra_diffusivity=(1e-3, 1e-3)).targets
    assert "log_intra_diffusivity" not in wm.coordinates
    assert dict(wm.constants) == {"intra_diffusivity": 1e-3}
    assert "intra_diffusivity" in wm.scalars
    mixed = MixturePrior.fixed(
        free_water_fraction=(0.0, 0.0), orientation_dispersion=(0.1, 0.1)
    ).targets
    assert dict(mixed.constants) == {
        "free_water_fraction": 0.0,
        "orientation_dispersion": 0.1,
    }
    # A share of one value still gives a fraction of the water that varies.
    assert (
        "logit_dot_fraction"
        in MixturePrior.fixed(dot_fraction=(0.1, 0.1)).targets.coordinates
    )
    assert TissuePrior().targets is TISSUE_TARGETS


def test_each_prior_has_its_own_estimator_code():
    """A change to white_matter.py moves no key of the cells' estimators."""
    keys = {
        estimator_key(prior, PROTOCOL, TINY).split("-")[1]
        for prior in (TissuePrior(), WhiteMatterPrior(), MixturePrior())
    }
    assert len(keys) == 3


# -- the simulators, as a training calls them -------------------------------------
def test_binding_refuses_a_cluster_a_simulator_cannot_use():
    with pytest.raises(ValueError, match="engine='ray' cannot be used"):
        bound_simulator(SMALL, PROTOCOL, engine="ray")
    simulator = bound_simulator(SMALL, PROTOCOL, device="cpu", cache_dir=None)
    assert simulator.prior == SMALL


def test_a_grid_error_is_refused_for_a_prior_without_one():
    from dipy_spinverse.posterior.training import simulate_and_train

    with pytest.raises(ValueError, match="reference_resolution"):
        simulate_and_train(
            SMALL.simulator(PROTOCOL),
            TrainingOptions(reference_resolution=8),
            progress=False,
        )
    assert default_training(SMALL) == TrainingOptions()


def test_white_matter_draws_resume_from_their_checkpoint(tmp_path, monkeypatch):
    """Interrupted after its first chunk, a sample resumes from the file and
    gives the signals of an uninterrupted one, relative to the mean b = 0."""
    from dipy_spinverse.posterior.white_matter import WhiteMatterSimulator

    monkeypatch.setattr(WhiteMatterSimulator, "CHUNK", 2)
    simulator = SMALL.simulator(PROTOCOL, substeps=2)
    whole, truth = simulator.sample(4, seed=3)
    assert_allclose(whole[:, :2].mean(1), 1.0, rtol=1e-12)
    calls = []
    simulate = WhiteMatterPrior.simulate

    def interrupted(self, draws, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(draws))
        return simulate(self, draws, *args, **kwargs)

    path = tmp_path / "wm.npz"
    monkeypatch.setattr(WhiteMatterPrior, "simulate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        simulator.sample(4, seed=3, checkpoint=path)
    assert path.exists()
    monkeypatch.setattr(WhiteMatterPrior, "simulate", simulate)
    calls.clear()
    resumed, again = simulator.sample(4, seed=3, checkpoint=path)
    assert_allclose(resumed, whole, rtol=1e-12)
    assert_array_equal(again["g_ratio"], truth["g_ratio"])


# -- a mixing prior's posterior through SpinverseModel -----------------------------
@pytest.fixture(scope="module")
def mixture_model(tmp_path_factory):
    """A mixing prior of three small bundles, its posterior trained in
    seconds (plumbing, not calibration)."""
    prior = MixturePrior.fixed(bundles=SMALL, n_library=3, bundles_per_voxel=(1, 2))
    return SpinverseModel(
        PROTOCOL,
        fit_method="posterior",
        prior=prior,
        posterior_options=TINY,
        sigma=20.0,  # SNR 50 for data of b = 0 at 1000
        n_posterior_samples=64,
        cache_dir=tmp_path_factory.mktemp("cache"),
    )


def test_a_mixing_prior_trains_and_fits_through_the_model(mixture_model):
    targets = mixture_model.prior.prior.targets
    signals, truth = mixture_model.prior.sample(6, seed=41)
    rng = np.random.default_rng(0)
    data = 1000 * np.abs(signals + 0.02 * rng.standard_normal(signals.shape))
    fit = mixture_model.fit(data.reshape(2, 3, -1))
    assert isinstance(fit, PosteriorFit) and fit.shape == (2, 3)
    assert fit.descriptors == targets.scalars
    assert "orientation" not in fit.params
    ok = fit.status == OK
    assert ok.sum() >= 3
    g = fit.g_ratio
    low, high = fit.credible_interval("g_ratio", 0.9)
    assert np.all((low[ok] <= g[ok]) & (g[ok] <= high[ok]))
    assert np.all((0 < g[ok]) & (g[ok] < 1))
    assert_array_equal(fit.cell_diameter, fit.effective_diameter)
    draws = fit.posterior_samples("free_water_fraction", 5)
    assert draws.shape == (5, 2, 3)
    with pytest.raises(ValueError, match="this fit's prior has"):
        fit.posterior_samples("permeability")
    with pytest.raises(ValueError, match="credible_interval takes one of"):
        fit.credible_interval("orientation")
    with pytest.raises(AttributeError, match="g_ratio"):
        fit.permeability  # noqa: B018 - not a descriptor of this prior
    with pytest.raises(NotImplementedError, match="prior.check"):
        fit.predictive_samples(n=2)


def test_a_mixing_prior_fit_saves_and_loads(mixture_model, tmp_path, monkeypatch):
    from dipy_spinverse.io import load_fit, save_fit
    from dipy_spinverse.io.maps import save_posterior

    signals, _ = mixture_model.prior.sample(4, seed=43)
    fit = mixture_model.fit(1000 * signals.reshape(2, 2, 1, -1))
    path = save_fit(fit, tmp_path / "mixture_fit")
    monkeypatch.setenv("DIPY_SPINVERSE_CACHE", str(mixture_model.cache_dir))
    loaded = load_fit(path)
    assert loaded.model.prior.prior == mixture_model.prior.prior
    assert_array_equal(loaded.status, fit.status)
    assert_array_equal(loaded.g_ratio, fit.g_ratio)
    for a, b in zip(
        loaded.credible_interval("myelin_fraction", 0.8),
        fit.credible_interval("myelin_fraction", 0.8),
        strict=True,
    ):
        assert_allclose(a, b)
    paths = save_posterior(fit, tmp_path / "maps", affine=np.eye(4))
    assert {"g_ratio", "g_ratio_ci90", "posterior_status"} <= set(paths)
    assert "orientation" not in paths


@pytest.mark.slow  # 60 bundles simulated: ~1 min on 2 cores
def test_a_white_matter_prior_trains_and_fits_through_the_model(tmp_path):
    """The bundles' prior alone, as the mixing prior: its descriptors are the
    fit's maps, with intervals that hold the median."""
    model = SpinverseModel(
        PROTOCOL,
        fit_method="posterior",
        prior=SMALL,
        posterior_options=TrainingOptions(
            **{**TINY.description(), "n_simulations": 40, "n_calibration": 20}
        ),
        sigma=20.0,
        n_posterior_samples=32,
        cache_dir=tmp_path,
    )
    signals, _ = model.prior.sample(2, seed=7)
    fit = model.fit(1000 * signals)
    assert fit.descriptors == SMALL.targets.scalars
    ok = fit.status == OK
    low, high = fit.credible_interval("intra_diffusivity", 0.9)
    median = fit.intra_diffusivity
    assert np.all((low[ok] <= median[ok]) & (median[ok] <= high[ok]))
