"""The fit-method registry (issue 83, item 1): every method registered with
all its parts, found by lookup, its model rebuilt from its settings and
from its description."""

import dataclasses

import numpy as np
import pytest

import dipy_spinverse.io  # noqa: F401 -- registers the compartment models' fits
from dipy_spinverse import Protocol
from dipy_spinverse.reconst import IMPOSSIBLE_SIGNAL, SpinverseModel
from dipy_spinverse.reconst.methods import (
    FIT_METHODS,
    SAVED_KINDS,
    Command,
    FitFormat,
    method_named,
    method_of,
    method_of_format,
    missing_parts,
    register,
)
from dipy_spinverse.sim.sequences import fibonacci_sphere
from dipy_spinverse.workflows.flags import command_part

#: The keywords of a cheap model of each method of the command.
KEYWORDS = {
    "search": dict(grid=dict(resolution=2), max_iter=2, sigma=5.0),
    "posterior": dict(sigma=5.0),
    "protocol_free": dict(sigma=5.0, n_posterior_samples=20),
}


def _protocol():
    """Two timings, two shells of 7 directions that are no axes (their
    normalisation is not exact: a description read back may move them by
    a unit in the last place), one b = 0 each: 30 volumes."""
    dirs = fibonacci_sphere(7, hemisphere=True)
    parts = [
        Protocol.pgse(
            np.r_[0.0, np.full(7, 1000.0), np.full(7, 2500.0)],
            np.vstack([[[1.0, 0, 0]], dirs, dirs]),
            small_delta=0.01,
            big_delta=big,
        )
        for big in (0.02, 0.06)
    ]
    return parts[0] + parts[1]


@pytest.fixture(scope="module")
def models():
    protocol = _protocol()
    return {
        name: SpinverseModel(protocol, fit_method=name, **KEYWORDS[name])
        for name in FIT_METHODS
    }


def test_the_command_offers_the_registered_methods():
    assert set(FIT_METHODS) == {"search", "posterior", "protocol_free"}
    assert set(KEYWORDS) == set(FIT_METHODS), "a new method needs a case here"
    assert set(FIT_METHODS) < set(SAVED_KINDS)
    assert "compartment" in SAVED_KINDS


@pytest.mark.parametrize("name", sorted(SAVED_KINDS))
def test_every_registered_method_has_every_part(name):
    method = SAVED_KINDS[name]
    assert missing_parts(method) == []
    assert method_named(name) is method
    assert method_of_format(method.file_format.name) is method
    if method.command is None:
        return
    for part in ("flags", "outputs"):
        assert callable(command_part(name, part)), part
    assert method.command.interrupted.format(folder="F", checkpoint="C", cache="K")


@pytest.mark.parametrize("name", sorted(FIT_METHODS))
def test_a_model_is_rebuilt_from_its_settings_and_its_description(models, name):
    """``type(model)(model.protocol, **model.settings())`` and the class's
    ``from_description(model.description())`` are the same model: no
    setting differs (the directions read back to rounding)."""
    model = models[name]
    method = method_of(model)
    assert method is FIT_METHODS[name] and isinstance(model, method.model)
    again = type(model)(model.protocol, **model.settings())
    read = method.rebuild(method.describe(model))
    for other in (again, read):
        assert type(other) is type(model)
        assert _same(other.description(), model.description())
    if hasattr(model, "differences"):  # the methods whose fits resume
        assert model.differences(read) == []


def _same(a, b):
    """Two descriptions equal, their arrays to rounding."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, np.ndarray | float):
        return np.allclose(a, b, rtol=0, atol=1e-12)
    return a == b


# -- incomplete methods are refused -------------------------------------------------
def _entry(**changes):
    """The protocol-free method's entry, under another name, with ``changes``."""
    entry = dataclasses.replace(FIT_METHODS["protocol_free"], name="other")
    return dataclasses.replace(entry, **changes)


class _NoDescription:
    """A model class with settings only."""

    impossible_outputs = "kept"

    def settings(self):
        return {}


@pytest.mark.parametrize(
    ("changes", "missing"),
    [
        (dict(model=_NoDescription, describe=None), r"_NoDescription.description\(\)"),
        (
            dict(model=_NoDescription, restore=None, rebuild=None),
            r"_NoDescription.from_description\(\).*_NoDescription.restored_fit\(\)",
        ),
        (dict(fit=object), r"a fit class with saved_arrays\(\)"),
        (dict(file_format=FitFormat("x", 0, ("mask", "status"))), "version"),
        (dict(file_format=FitFormat("x", 1, ("status",))), "mask and status"),
        (
            dict(command=Command("flags_without_module", "m:f", "kept")),
            "the command's flags",
        ),
        (dict(command=Command("m:f", "m:f", "")), "interrupted wording"),
    ],
    ids=["description", "rebuild and restore", "fit", "version", "arrays",
         "entry point", "wording"],
)  # fmt: skip
def test_a_method_without_one_of_its_parts_is_refused(changes, missing):
    # A part given as None is the model class's own (there: none).
    method = _entry(**changes)
    with pytest.raises(ValueError, match=f"cannot be registered without.*{missing}"):
        register(method)
    assert "other" not in SAVED_KINDS


def test_a_command_method_without_its_status_wording_is_refused():
    class Quiet(FIT_METHODS["protocol_free"].model):
        impossible_outputs = ""

    with pytest.raises(ValueError, match="Quiet.impossible_outputs"):
        register(_entry(model=Quiet))
    assert "other" not in SAVED_KINDS


def test_a_name_or_format_of_another_method_is_refused():
    class Twin(FIT_METHODS["protocol_free"].model):
        pass

    with pytest.raises(ValueError, match="its name is 'search'"):
        register(
            _entry(
                model=Twin,
                name="search",
                file_format=FitFormat("t", 1, ("mask", "status")),
            )
        )
    with pytest.raises(ValueError, match="its file format is 'posterior'"):
        register(_entry(model=Twin, file_format=FIT_METHODS["posterior"].file_format))
    assert set(FIT_METHODS) == {"search", "posterior", "protocol_free"}


def test_lookups_name_what_is_registered():
    with pytest.raises(ValueError, match="no fit method 'ivim'.*'search'"):
        method_named("ivim")
    assert method_of(object()) is None
    assert method_of_format("dipy_spinverse.Other") is None


# -- the once-a-fit warnings of every method -----------------------------------------
def test_a_protocol_free_fit_warns_of_impossible_signals(models):
    """Its IMPOSSIBLE_SIGNAL voxels are said once a fit, in its wording, as
    the posterior's are (they were set without a warning)."""
    model = models["protocol_free"]
    data = np.full((2, len(model.protocol)), 300.0)  # no decay at all ...
    data[:, model.protocol.bvals > 0] = 900.0  # ... but three times b = 0
    with pytest.warns(RuntimeWarning, match="IMPOSSIBLE_SIGNAL.*maps are NaN"):
        fit = model.fit(data)
    assert (fit.status == IMPOSSIBLE_SIGNAL).all()
    assert np.isnan(fit.cell_diameter).all()
