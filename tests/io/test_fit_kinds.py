"""save_fit and load_fit of every registered kind of fit (issue 83, item 1):
a fit of each is saved, loaded and saved again whole; its checkpoint store
reads back as the same fit; a kind registered without a case here fails.

The posterior fits are made of made-up summaries (saving and loading read
no estimator); the protocol-free one's parts are its own class's, so that
its file keeps what a fit holds."""

import json

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from dipy_spinverse import Protocol
from dipy_spinverse.compartments import IvimCompartmentModel
from dipy_spinverse.io import Checkpoint, load_fit, save_fit
from dipy_spinverse.io.specs import model_spec
from dipy_spinverse.posterior.calibration import SCALARS
from dipy_spinverse.posterior.protocol_free import FREE_SCALARS, N_TOKEN
from dipy_spinverse.reconst import (
    NONFINITE,
    OK,
    PENDING,
    PosteriorFit,
    ProtocolFreeFit,
    SpinverseModel,
)
from dipy_spinverse.reconst.methods import SAVED_KINDS, method_of
from dipy_spinverse.sim.sequences import fibonacci_sphere

MASK = np.array([[True, False], [True, True]])[..., None]


def _protocol():
    """Two timings, two shells of 7 directions, one b = 0 each (30 volumes)."""
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


def _quantiles(rng, status, names, params):
    for name in names:
        # Sorted quantiles at 5, 25, 50, 75, 95 %, NaN where not OK.
        quantiles = np.sort(rng.random((len(status), 5)), axis=1)
        params[name] = np.where((status == OK)[:, None], quantiles, np.nan)
    return params


def _search(request):
    return request.getfixturevalue("volume_fit")


def _posterior(request):
    model = SpinverseModel(_protocol(), fit_method="posterior", sigma=5.0)
    n, rng = int(MASK.sum()), np.random.default_rng(0)
    status = np.array([OK, NONFINITE, OK])
    params = dict(
        status=status,
        inputs=rng.random((n, len(model.protocol))).astype(np.float32),
        sigma=np.full(n, 0.02, np.float32),
        S0=np.array([500.0, np.nan, 700.0]),
        S0_sequences=rng.random((n, len(model.sequences))) + 1,
        orientation=np.tile([0.0, 0.0, 1.0], (n, 1)),
    )
    return PosteriorFit(model, _quantiles(rng, status, SCALARS, params), MASK)


def _protocol_free(request):
    model = SpinverseModel(_protocol(), fit_method="protocol_free", sigma=5.0)
    n, rng = int(MASK.sum()), np.random.default_rng(1)
    status = np.array([OK, NONFINITE, OK])
    tokens = rng.random((n, len(model.shells.shells), N_TOKEN)).astype(np.float32)
    params = dict(
        status=status,
        tokens=np.where((status == OK)[:, None, None], tokens, np.nan),
        sigma=np.full(n, 0.02, np.float32),
        S0=np.array([500.0, np.nan, 700.0]),
    )
    fit = ProtocolFreeFit(model, _quantiles(rng, status, FREE_SCALARS, params), MASK)
    fit.fingerprint = "made up"
    return fit


def _compartment(request):
    model = IvimCompartmentModel(request.getfixturevalue("gtab_ivim"))
    rng = np.random.default_rng(2)
    f, d_star, d = 0.1, 0.02, 1e-3
    b = model.gtab.bvals
    signal = 800.0 * (f * np.exp(-b * d_star) + (1 - f) * np.exp(-b * d))
    data = signal * (1 + 0.01 * rng.standard_normal((2, 2, 1, len(b))))
    return model.fit(data, mask=MASK)


#: A fit of each registered kind, by its name.
FITS = {
    "search": _search,
    "posterior": _posterior,
    "protocol_free": _protocol_free,
    "compartment": _compartment,
}


def test_every_registered_kind_has_a_case():
    assert set(FITS) == set(SAVED_KINDS)


def _same(a, b):
    """Two descriptions equal, their numbers to rounding (a protocol read
    back normalises its directions again)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float):
        return np.isclose(a, b, rtol=0, atol=1e-12)
    return a == b


def _assert_same(loaded, fit):
    assert type(loaded) is type(fit) and loaded.shape == fit.shape
    assert_array_equal(loaded.mask, fit.mask)
    assert _same(model_spec(loaded.model), model_spec(fit.model))
    saved = fit.saved_arrays()
    again = loaded.saved_arrays()
    assert set(again) == set(saved)
    for key, value in saved.items():
        assert_array_equal(again[key], value, err_msg=key)
        assert again[key].dtype == value.dtype, key
    assert_array_equal(loaded.status, fit.status)
    header = method_of(fit.model).file_format.header
    for name in header:
        assert getattr(loaded, name) == getattr(fit, name), name


@pytest.mark.parametrize("kind", sorted(FITS))
def test_a_fit_of_every_kind_saves_and_loads(kind, request, tmp_path):
    fit = FITS[kind](request)
    assert method_of(fit.model).name == kind
    loaded = load_fit(save_fit(fit, tmp_path / kind))
    _assert_same(loaded, fit)
    # Saved again, the same fit.
    _assert_same(load_fit(save_fit(loaded, tmp_path / "again.npz")), fit)
    with np.load(tmp_path / f"{kind}.npz") as archive:
        header = json.loads(str(archive["header"]))
    assert header["format"] == method_of(fit.model).file_format.name
    assert header["model"]["kind"] == kind


def test_a_protocol_free_checkpoint_reads_back_as_its_fit(request, tmp_path):
    """A store of a partial protocol-free fit: its fitted rows, the others
    PENDING, read back by load_fit as a partial fit with its fingerprint."""
    fit = _protocol_free(request)
    params = {k: v.copy() for k, v in fit.params.items()}
    params["status"] = params["status"].astype(np.int16)
    params["status"][1:] = PENDING
    partial = ProtocolFreeFit(fit.model, params, MASK)
    partial.fingerprint = fit.fingerprint
    store = Checkpoint(tmp_path / "fit.partial.h5")
    store(partial, None)
    partial.params["status"][1] = OK
    store(partial, np.array([1]))
    loaded = load_fit(tmp_path / "fit.partial.h5")
    assert isinstance(loaded, ProtocolFreeFit) and loaded.n_pending == 1
    assert loaded.fingerprint == fit.fingerprint
    for key, value in partial.params.items():
        assert_array_equal(loaded.params[key], value, err_msg=key)


def test_a_damaged_protocol_free_file_is_refused_by_name(request, tmp_path):
    path = save_fit(_protocol_free(request), tmp_path / "fit.npz")
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["tokens"] = arrays["tokens"][:, :1]
    np.savez_compressed(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=r"bad.npz: tokens has shape .* damaged"):
        load_fit(tmp_path / "bad.npz")
