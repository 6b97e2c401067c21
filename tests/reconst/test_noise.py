"""One noise convention, DIPY's (issue 61, item 4): ``sigma`` in the data's
units for both fit methods, each voxel's relative noise ``sigma`` over its
own b = 0 signal.

The checks are exact invariances: data and ``sigma`` scaled together give
the same fit, and a voxel's relative noise follows its own b = 0 signal.
"""

import json
import logging
import warnings

import numpy as np
import pytest
from conftest import T2_WEIGHT
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import SpinverseModel
from dipy_spinverse.data import make_phantom_dataset
from dipy_spinverse.inverse import resolve_config
from dipy_spinverse.io.gradients import read_gradients
from dipy_spinverse.posterior.calibration import SCALARS
from dipy_spinverse.reconst import runner
from dipy_spinverse.reconst.gate import admit
from dipy_spinverse.reconst.noise import (
    SUSPECT_SNR,
    CheckedSigma,
    check_sigma,
    relative_noise,
    warn_noise,
)
from dipy_spinverse.workflows.flags import parse_noise
from dipy_spinverse.workflows.spinverse import parse_posterior_options


# -- the convention ------------------------------------------------------------------
def test_sigma_is_one_number_in_the_data_units(caplog):
    assert check_sigma(None) == 0.0
    assert check_sigma(12) == 12.0
    # One per volume, as estimate_sigma returns for 4-D data: their RMS.
    with caplog.at_level(logging.INFO, logger="dipy"):
        assert check_sigma([3.0, 4.0]) == pytest.approx(np.sqrt(12.5))
    assert "root mean square" in caplog.text


@pytest.mark.parametrize(
    "bad", ["10", True, -1.0, np.nan, np.inf, [], [[1.0, 2.0]], [1.0, -2.0]]
)
def test_a_bad_sigma_names_the_argument_and_its_units(bad):
    with pytest.raises(ValueError, match=r"sigma must be .*data's units"):
        check_sigma(bad)


def test_a_sigma_per_volume_of_other_data_is_refused(gtab):
    """A sigma per volume whose length is not the table's (98 for 99
    volumes) belongs to other data: refused by both fit methods, naming the
    counts (it was taken as its RMS)."""
    n = len(gtab.bvals)
    with pytest.raises(ValueError, match=f"holds {n - 1} noise levels but the "):
        check_sigma(np.full(n - 1, 5.0), n_volumes=n)
    for method in ("search", "posterior"):
        with pytest.raises(ValueError, match=f"table has {n} volumes"):
            SpinverseModel(gtab, fit_method=method, sigma=np.full(n - 1, 5.0))
    assert check_sigma(np.full(n, 5.0), n_volumes=n) == pytest.approx(5.0)


def test_sigma_is_checked_once_per_model(gtab, grid, monkeypatch):
    """The model checks its sigma once (a sigma per volume is logged as its
    RMS once), and holds it in the data's units only: no relative
    placeholder in its configuration."""
    import dipy_spinverse.reconst.search_model as search_model

    calls = []

    def counted(sigma, **kwargs):
        calls.append(sigma)
        return check_sigma(sigma, **kwargs)

    monkeypatch.setattr(search_model, "check_sigma", counted)
    model = _search(gtab, grid, np.full(len(gtab.bvals), 5.0))
    assert len(calls) == 1 and model.sigma == pytest.approx(5.0)
    assert model.config.loss.sigma == 0.0


def test_a_sigma_the_command_checked_is_not_checked_again(gtab, grid, caplog):
    """The command checks a numeric --sigma before any data are read
    (parse_noise); the model takes that checked value as it is. A sigma per
    volume would log its RMS at each check: once here."""
    kind, value = parse_noise("20", None)
    assert kind == "sigma" and isinstance(value, CheckedSigma)
    model = _search(gtab, grid, value)
    assert model.sigma is value  # taken as it is, not checked again
    per_volume = check_sigma(np.full(len(gtab.bvals), 5.0))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dipy"):
        _search(gtab, grid, per_volume)
    assert "root mean square" not in caplog.text
    # Made by hand, it still holds only a level check_sigma would accept.
    for bad in (-1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="make it with check_sigma"):
            CheckedSigma(bad)


def test_each_voxel_has_the_noise_of_its_own_b0():
    assert_allclose(relative_noise(10.0, [1000.0, 500.0]), [0.01, 0.02])
    assert_array_equal(relative_noise(0.0, [1000.0, 500.0]), [0.0, 0.0])
    assert np.isnan(relative_noise(10.0, [0.0])).all()


def test_the_gate_gives_each_voxel_its_relative_noise(gtab, signal):
    data = np.stack([1000.0 * signal, 250.0 * signal, 0.0 * signal])
    gate = admit(data, gtab_protocol(gtab), sigma=5.0)
    assert_allclose(gate.relative[:2], [0.005, 0.02])
    assert_array_equal(gate.sigma[:2], [5.0, 5.0])  # in the data's units
    assert np.isnan(gate.relative[2]) and np.isnan(gate.sigma[2])  # BAD_B0
    # Without the fit's level the precisions are the sequences' own.
    assert_array_equal(gate.precision, gate.signals.precision)
    assert gate.noise.level == 0.0 and gate.noise.precision is gate.precision


def gtab_protocol(gtab):
    from dipy_spinverse.reconst.gate import gradient_tables

    return gradient_tables(gtab)[1]


def test_a_relative_sigma_in_data_units_is_called_out():
    with pytest.warns(UserWarning, match="in the data's units"):
        warn_noise(np.full(4, 0.5 / SUSPECT_SNR))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_noise(np.full(4, 0.02))


def test_voxels_outside_the_training_noise_are_counted():
    with pytest.warns(UserWarning, match="3 voxels above and 1 below"):
        warn_noise(np.array([1e-3, 1e-3, 2e-3, 0.02, 0.5]), snr_range=(10, 300))


# -- the posterior -------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README demo's tissue voxels, its posterior (shipped: no training)
    and its noise in the data's units."""
    import nibabel as nib

    folder = tmp_path_factory.mktemp("demo")
    paths = make_phantom_dataset(folder / "demo")
    table = read_gradients(
        paths["bvals"], paths["bvecs"], n_volumes=99, timing_file=paths["timing"]
    )
    with open(paths["posterior"]) as f:
        options = parse_posterior_options(f.read(), 2e-3)
    with open(paths["truth_json"]) as f:
        truth = json.load(f)
    data = nib.load(paths["data"]).get_fdata()
    voxels = np.stack([data[tuple(v["index"])] for v in truth["tissue_voxels"]])
    return dict(table=table, options=options, sigma=truth["sigma"], voxels=voxels)


def _posterior(demo, sigma, tmp_path):
    return SpinverseModel(
        demo["table"],
        fit_method="posterior",
        sigma=sigma,
        cache_dir=tmp_path,
        **demo["options"],
    )


@pytest.mark.slow
def test_the_posterior_is_the_same_in_any_units(demo, tmp_path):
    """Data and sigma in other units (x 1/1000: a normalised image) give
    the same posterior: the convention has no hidden scale."""
    scale = 1e-3
    fit = _posterior(demo, demo["sigma"], tmp_path).fit(demo["voxels"])
    scaled = _posterior(demo, demo["sigma"] * scale, tmp_path).fit(
        demo["voxels"] * scale
    )
    assert_array_equal(fit.status, scaled.status)
    assert_allclose(fit.params["sigma"], scaled.params["sigma"], rtol=1e-6)
    for name in SCALARS:
        # float32 inputs: the normalised signals agree to ~1e-7.
        assert_allclose(getattr(fit, name), getattr(scaled, name), rtol=1e-4)


@pytest.mark.slow
def test_the_posterior_gives_each_voxel_its_own_noise(demo, tmp_path):
    fit = _posterior(demo, demo["sigma"], tmp_path).fit(demo["voxels"])
    assert_allclose(fit.params["sigma"], demo["sigma"] / fit.S0, rtol=1e-6)
    # A voxel four times as dark is four times as noisy, relative to it.
    dark = _posterior(demo, demo["sigma"], tmp_path).fit(demo["voxels"] / 4)
    assert_allclose(dark.params["sigma"], 4 * fit.params["sigma"], rtol=1e-6)


@pytest.mark.parametrize("fit_method", ["posterior", "protocol_free"])
@pytest.mark.parametrize("sigma", [None, 0.0])
def test_both_posterior_models_refuse_an_unknown_sigma_by_one_check(
    gtab, fit_method, sigma
):
    """One refusal (issue 83: each model repeated it), an OptionError in
    Python's words that a command rewords in its flags."""
    import traceback

    from dipy_spinverse.checks import OptionError
    from dipy_spinverse.workflows.flags import reword

    with pytest.raises(OptionError) as err:
        SpinverseModel(gtab, fit_method=fit_method, sigma=sigma)
    assert traceback.extract_tb(err.value.__traceback__)[-1].name == "require_sigma"
    assert str(err.value).startswith(
        f"fit_method={fit_method!r} needs the noise level: pass sigma (the noise "
        "standard deviation in the data's units"
    )
    assert reword(err.value).startswith(
        f"--fit_method {fit_method} needs the noise level: pass --sigma/--snr ("
    )


def test_a_posterior_needs_sigma_in_data_units(demo, tmp_path):
    with pytest.raises(ValueError, match="needs the noise level.*data's units"):
        _posterior(demo, None, tmp_path)
    with pytest.warns(UserWarning, match="in the data's units"):
        _posterior(demo, 1 / 67, tmp_path).fit(demo["voxels"])


# -- the label search ----------------------------------------------------------------
def _search(gtab, grid, sigma):
    config = resolve_config("default", search_steps=2, search_starts=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny protocol's warnings
        return SpinverseModel(
            gtab, grid=grid, max_iter=3, preset=config, sigma=sigma, dtype="float64"
        )


def test_the_search_is_the_same_in_any_units(gtab, grid, signal):
    """Two voxels of different b = 0 (700, 350) fitted together: scaling
    data and sigma by 1/700 changes nothing, losses included."""
    rng = np.random.default_rng(0)
    clean = T2_WEIGHT * signal * np.array([[700.0], [350.0]])
    data = clean + 7.0 * rng.standard_normal(clean.shape)
    model = _search(gtab, grid, 7.0)
    fit = model.fit(data)
    scaled = _search(gtab, grid, 7.0 / 700).fit(data / 700)
    assert_array_equal(fit.status, scaled.status)
    assert_allclose(fit.loss, scaled.loss, rtol=1e-6)
    assert_allclose(fit.permeability, scaled.permeability, rtol=1e-6)
    # The fit's noise refers to the median b = 0; the model holds settings
    # only, and the fit's is the model as built.
    reference = np.median(fit.S0)
    assert runner.fit_noise(model.search_settings(), data) == pytest.approx(
        7.0 / reference
    )
    assert fit.model is model and model.sigma == 7.0
    assert model.config.loss.sigma == 0.0  # no placeholder noise
    assert not hasattr(model, "s0_reference")


def test_the_search_weighs_each_voxel_by_its_own_noise(gtab, grid, signal):
    """Every acquisition's variance, reference noise^2 / precision, is the
    voxel's own: (sigma / its b = 0)^2 over its sequence's precision."""
    data = T2_WEIGHT * signal * np.array([[800.0], [400.0]])
    model = _search(gtab, grid, 4.0)
    noise = runner.fit_noise(model.search_settings(), data)
    assert noise == pytest.approx(4.0 / np.median(data[:, [0, 3]].mean(1)))
    assert model.config.loss.sigma == 0.0  # the settings hold no noise
    plain = admit(data, model.protocol, sigma=model.sigma)
    gate = admit(data, model.protocol, sigma=model.sigma, level=noise)
    # The inversion's one noise form: the fit's level and the precisions.
    assert gate.noise.level == noise
    variance = gate.noise.level**2 / gate.noise.precision
    own = gate.relative[:, None] ** 2 / plain.precision
    assert_allclose(variance, own, rtol=1e-12)
    assert_allclose(gate.relative, 4.0 / data[:, [0, 3]].mean(1), rtol=1e-12)


def test_sigma_above_the_b0_signal_is_refused(gtab, grid, signal):
    model = _search(gtab, grid, 5000.0)
    with pytest.raises(ValueError, match="not below the median b=0 signal"):
        model.fit(700.0 * T2_WEIGHT * signal)
