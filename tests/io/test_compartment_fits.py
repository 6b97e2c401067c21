"""io: compartment models' fits saved and loaded as the other fits are.

``save_fit`` / ``load_fit`` take every compartment model's volume fit: its
arrays (dtypes kept), its model rebuilt from its class, gradient table and
settings, its maps, status and prediction; a learned model's network is
found again by its key, and a fit whose network this code would not find is
refused (issue 73: compartment fits could not be saved).
"""

import json
import zipfile

import numpy as np
import pytest
import torch
from conftest import shells_gtab
from dipy.reconst.csdeconv import AxSymShResponse
from numpy.testing import assert_array_equal

from dipy_spinverse.compartments import (
    ActiveAxModel,
    CompartmentFit,
    ExchangeModel,
    IvimCompartmentModel,
    NoddiModel,
    ZcdModel,
)
from dipy_spinverse.io.fits import load_fit, save_fit
from dipy_spinverse.io.specs import COMPARTMENT_MODELS, model_from_spec, model_spec
from dipy_spinverse.masked import MASKED, NONFINITE, OK

#: Every compartment model, each with settings other than its defaults (a
#: setting lost on the way back fails the settings' comparison).
MODELS = [
    (NoddiModel, dict(n_fibres=2, d_par=1.5e-3, extra_average="signal")),
    (NoddiModel, dict(n_fibres=0, d_iso=2.5e-3, kernels="exact")),
    (ActiveAxModel, dict(dot=True, diameter_bounds=(0.5, 12.0), n_starts=1)),
    (ZcdModel, dict(d_par_bounds=(0.2e-3, 2.5e-3), n_starts=1)),
    (IvimCompartmentModel, dict(d_bounds=(0.0, 3e-3), d_star_bounds=(5e-3, 0.2))),
    (ExchangeModel, dict(f_bounds=(0.05, 0.95), exchange_time_bounds=(5e-3, 1.0))),
]
#: Fast fits: the round trip is tested, not the fit.
FAST = dict(max_iter=4, chunk_size=64, snr=30.0)
TINY = {"n_train": 2000, "epochs": 2, "hidden": (32, 32), "batch_size": 256}


@pytest.fixture(scope="module")
def gtab_two_echoes():
    """Two pulse timings, two shells each, a b = 0 per timing."""
    timings = [(0.008, 0.02, (1000, 2500)), (0.008, 0.05, (1000, 3000))]
    return shells_gtab(timings, n_dirs=20, n_b0=2)


def _model(cls, gtab, **kwargs):
    if cls is not IvimCompartmentModel and cls is not ExchangeModel:
        kwargs.setdefault("n_grid_directions", 20)
    return cls(gtab, **FAST, **kwargs)


def _volume(model, *, b0_levels=None, seed=0):
    """A 2 x 2 x 2 volume of the model's own signals: one voxel outside the
    mask, one of NaN signals; with ``b0_levels``, each timing's signal
    scaled by its level (echo times that differ)."""
    rng = np.random.default_rng(seed)
    x, c = model._sample_training(6, rng)
    with torch.no_grad():
        shared, fibre, dirs = model._unpack(x)
        s0 = torch.full((6,), 100.0, dtype=x.dtype)
        params = model._to_params(shared, fibre, dirs, c, s0).numpy()
    signals = model._fit_class(model, params).predict()
    if b0_levels is not None:
        signals = signals * np.asarray(b0_levels)[model._sequences]
    data = np.zeros((8, signals.shape[-1]))
    data[:6] = signals
    data[6] = np.nan
    mask = np.ones(8, bool)
    mask[7] = False
    return data.reshape(2, 2, 2, -1), mask.reshape(2, 2, 2)


def _assert_same_fit(loaded, fit):
    """Every array (and dtype), map and prediction of ``fit``."""
    assert isinstance(loaded, CompartmentFit) and type(loaded) is type(fit)
    assert type(loaded.model) is type(fit.model)
    settings = fit.model.settings()
    if settings["cache_dir"] is not None:  # a folder, kept as its path
        settings["cache_dir"] = str(settings["cache_dir"])
    assert loaded.model.settings() == settings
    assert model_spec(loaded.model) == model_spec(fit.model)
    saved, again = fit.saved_arrays(), loaded.saved_arrays()
    assert sorted(again) == sorted(saved)
    for name, value in saved.items():
        assert again[name].dtype == value.dtype, name
        assert_array_equal(again[name], value, err_msg=name)
    assert_array_equal(loaded.status, fit.status)
    assert_array_equal(loaded.model_params, fit.model_params)
    assert_array_equal(loaded.S0, fit.S0)
    assert_array_equal(loaded.directions, fit.directions)
    assert_array_equal(loaded.n_fibres, fit.n_fibres)
    for name in fit.model.param_names[1:]:
        assert_array_equal(loaded._param(name), fit._param(name), err_msg=name)
    if fit.sequence_levels is None:
        assert loaded.sequence_levels is None
    else:
        assert_array_equal(loaded.sequence_levels, fit.sequence_levels)
    assert_array_equal(loaded.predict(), fit.predict())
    assert_array_equal(loaded[0, 1, 0].predict(), fit[0, 1, 0].predict())


def test_every_compartment_model_is_tested():
    """A compartment model added to the package is added here too."""
    assert {cls.__name__ for cls, _ in MODELS} == set(COMPARTMENT_MODELS)


@pytest.mark.parametrize(
    ("cls", "kwargs"), MODELS, ids=lambda v: getattr(v, "__name__", "")
)
def test_a_compartment_fit_saves_and_loads(gtab_two_echoes, tmp_path, cls, kwargs):
    model = _model(cls, gtab_two_echoes, **kwargs)
    data, mask = _volume(model)
    fit = model.fit(data, mask=mask)
    assert fit.status[1, 1, 0] == NONFINITE and fit.status[1, 1, 1] == MASKED
    assert (fit.status[mask & ~np.isnan(data[..., 0])] == OK).all()
    path = save_fit(fit, tmp_path / "fit")
    assert path.endswith(".npz")
    loaded = load_fit(path)
    _assert_same_fit(loaded, fit)
    # The model rebuilt fits as the saved one did.
    assert_array_equal(loaded.model.fit(data, mask=mask).model_params, fit.model_params)


def test_b0_levels_of_each_timing_come_back(gtab_two_echoes, tmp_path):
    """A fit that normalised each timing by its own b = 0 (sequence_levels)
    predicts the data's levels after loading as before."""
    model = _model(ActiveAxModel, gtab_two_echoes, n_starts=1)
    data, mask = _volume(model, b0_levels=[1.0, 0.7])
    fit = model.fit(data, mask=mask)
    assert fit.sequence_levels is not None
    loaded = load_fit(save_fit(fit, tmp_path / "fit.npz"))
    _assert_same_fit(loaded, fit)
    assert loaded.params["sequence_levels"].shape == (7, 2)


@pytest.mark.parametrize(
    "response",
    [((1.7e-3, 3e-4, 3e-4), 100.0), AxSymShResponse(100.0, np.array([2.0, -0.5, 0.1]))],
    ids=["evals", "AxSymShResponse"],
)
def test_the_csd_response_of_fibres_auto_is_kept(gtab_two_echoes, response):
    model = NoddiModel(gtab_two_echoes, fibres="auto", n_fibres=2, response=response)
    spec = model_spec(model)
    json.dumps(spec)  # JSON, no pickle
    again = model_from_spec(spec)
    assert model_spec(again) == spec
    assert again.fibres == "auto" and again.n_fibres == 2
    if isinstance(response, AxSymShResponse):
        assert_array_equal(again.response.dwi_response, response.dwi_response)
        assert again.response.S0 == response.S0
    else:
        assert again.response == response


def test_noddi_keeps_n_starts_as_given(gtab_two_echoes):
    """NODDI chooses n_starts by its fibre count when it is not given: the
    rebuilt model (and its siblings of other counts) choose it again."""
    model = NoddiModel(gtab_two_echoes, n_fibres=2)
    assert model.settings()["n_starts"] is None and model.n_starts == 3
    again = model_from_spec(model_spec(model))
    assert again.n_starts == 3 and again._with_fibres(1).n_starts == 1


def test_a_learned_fit_finds_its_network_again(gtab_two_echoes, tmp_path, capsys):
    """A learned model's fit loads with its network's key; its rebuilt
    model reads that network from the cache (no training) and fits alike."""
    model = _model(
        NoddiModel,
        gtab_two_echoes,
        fit_method="learned",
        learned_options=TINY,
        cache_dir=tmp_path / "cache",
    )
    data, mask = _volume(model)
    fit = model.fit(data, mask=mask)
    assert "trained the" in capsys.readouterr().out
    path = save_fit(fit, tmp_path / "learned.npz")
    loaded = load_fit(path)
    _assert_same_fit(loaded, fit)
    assert loaded.model.network_key() == model.network_key() is not None
    assert_array_equal(loaded.model.fit(data, mask=mask).model_params, fit.model_params)
    assert "trained the" not in capsys.readouterr().out
    # A fit whose network has another key (the training code changed since)
    # is refused, with the fix.
    _rewrite(path, lambda header: header["model"].update(network_key="0" * 20))
    with pytest.raises(ValueError, match="learned network of key 0{20}") as err:
        load_fit(path)
    assert str(path) in str(err.value) and "fit the data again" in str(err.value)


def _rewrite(path, change=None, *, drop=(), arrays=None):
    """The fit file ``path`` written again with its header changed by
    ``change``, the arrays ``drop`` left out and ``arrays`` replaced."""
    with np.load(path) as archive:
        content = {k: archive[k] for k in archive.files if k not in drop}
    header = json.loads(str(content["header"]))
    if change is not None:
        change(header)
    content["header"] = np.array(json.dumps(header))
    content.update(arrays or {})
    np.savez(path, **content)


@pytest.fixture(scope="module")
def saved(gtab_two_echoes, tmp_path_factory):
    """A saved ZCD fit and the fit."""
    model = _model(ZcdModel, gtab_two_echoes, n_starts=1)
    data, mask = _volume(model)
    fit = model.fit(data, mask=mask)
    folder = tmp_path_factory.mktemp("saved")
    return save_fit(fit, folder / "zcd.npz"), fit


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(drop=("model_params",)), r"lacks the arrays \['model_params'\]"),
        (
            dict(change=lambda h: h.update(version=99)),
            "newer dipy_spinverse .*upgrade",
        ),
        (
            dict(change=lambda h: h["model"].update(model="BallStickModel")),
            "no compartment model 'BallStickModel'",
        ),
        (
            dict(change=lambda h: h["model"]["settings"].update(n_fibres=7)),
            "cannot be rebuilt .*n_fibres",
        ),
        (
            dict(arrays=dict(model_params=np.zeros((7, 3)))),
            r"model_params has shape \(7, 3\).* damaged",
        ),
        (
            dict(arrays=dict(status=np.zeros(7))),
            "status has dtype float64.* damaged",
        ),
    ],
    ids=["no params", "newer", "unknown model", "bad setting", "shape", "dtype"],
)
def test_a_damaged_or_newer_file_is_refused_by_name(saved, tmp_path, change, message):
    path = tmp_path / "fit.npz"
    path.write_bytes(open(saved[0], "rb").read())
    _rewrite(path, **change)
    with pytest.raises(ValueError, match=message) as err:
        load_fit(path)
    assert str(path) in str(err.value)


def test_a_truncated_or_other_file_is_refused_by_name(saved, tmp_path):
    data = open(saved[0], "rb").read()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupted or another file"):
        load_fit(truncated)
    other = tmp_path / "other.npz"
    with zipfile.ZipFile(other, "w"):
        pass
    with pytest.raises(ValueError, match=f"{other}"):
        load_fit(other)
    with pytest.raises(ValueError, match="no such file"):
        load_fit(tmp_path / "missing.npz")


def test_save_fit_refuses_one_voxel_and_models_outside_the_package(
    saved, gtab_two_echoes, tmp_path
):
    fit = saved[1]
    with pytest.raises(ValueError, match="a ZcdFit of one voxel"):
        save_fit(fit[0, 0, 0], tmp_path / "voxel.npz")

    class MyModel(ZcdModel):
        pass

    mine = MyModel(gtab_two_echoes)
    part = fit[0]
    part.model = mine
    with pytest.raises(ValueError, match="package's compartment models .*MyModel"):
        save_fit(part, tmp_path / "mine.npz")
    assert not (tmp_path / "mine.npz").exists()


def test_settings_refuse_an_option_the_model_does_not_keep(gtab_two_echoes):
    """A subclass option kept under no attribute cannot be saved unnoticed."""

    class Tuned(IvimCompartmentModel):
        def __init__(self, gtab, *, knob=1, **kwargs):
            super().__init__(gtab, **kwargs)

    with pytest.raises(TypeError, match="keeps no attribute 'knob'.*self.knob"):
        Tuned(gtab_two_echoes).settings()
