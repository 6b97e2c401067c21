"""The library of simulated bundles (posterior.library): each bundle's
table simulated once, read back from the cache, resumed after a stop, and
the same as tabulating the bundle alone."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import Protocol
from dipy_spinverse.posterior.library import SIMULATING_CODE, BundleLibrary
from dipy_spinverse.posterior.mixture import BundleResponse
from dipy_spinverse.posterior.white_matter import WhiteMatterPrior
from dipy_spinverse.provenance import code_sources

#: A coarse, small prior: cheap sections.
SMALL = WhiteMatterPrior(
    n_axons=(4, 6), mean_diameter=(2.0, 4.0), fibre_fraction=(0.5, 0.7)
)
PROTOCOL = Protocol.pgse(
    [0.0, 1500.0, 1500.0, 4000.0],
    [[0, 0, 0], [1, 0, 0], [0, 0.6, 0.8], [0, 1, 0]],
    small_delta=0.01,
    big_delta=0.03,
)


def _library(tmp_path, **changes):
    options = dict(n_bundles=3, seed=4, substeps=2, cache_dir=tmp_path)
    return BundleLibrary(SMALL, PROTOCOL, **{**options, **changes})


def test_a_library_is_its_bundles_tabulated_alone(tmp_path):
    """Each entry is the table of its draw made alone (1e-12: the same
    simulations), its signals at the protocol finite."""
    built = _library(tmp_path)
    responses = built.responses
    assert len(responses) == 3 and len(built.draws) == 3
    alone = BundleResponse.tabulate(SMALL, built.draws[1], PROTOCOL, substeps=2)
    width = alone.coefficients.shape[1]
    assert_allclose(
        responses[1].coefficients[:, :width], alone.coefficients, atol=1e-12
    )
    assert not responses[1].coefficients[:, width:].any()
    signals = responses[0].signals(PROTOCOL, [0.0, 0.0, 1.0], 2.0)
    assert np.isfinite(signals).all() and signals[0] > 0


def test_a_library_is_read_back_not_simulated_again(tmp_path, monkeypatch):
    first = _library(tmp_path).responses
    assert _library(tmp_path).path.exists()

    def never(*args, **kwargs):
        raise AssertionError("simulated again")

    monkeypatch.setattr(BundleResponse, "tabulate", never)
    again = _library(tmp_path).responses
    for a, b in zip(first, again, strict=True):
        assert_array_equal(a.coefficients, b.coefficients)
    # Another seed, another library.
    assert _library(tmp_path, seed=5).path != _library(tmp_path).path


def test_a_stopped_library_resumes(tmp_path, monkeypatch):
    """Stopped after its second bundle, the next run simulates the third
    only and gives the library of an uninterrupted run."""
    calls = []
    tabulate = BundleResponse.tabulate.__func__

    def counted(cls, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return tabulate(cls, *args, **kwargs)

    monkeypatch.setattr(BundleResponse, "tabulate", classmethod(counted))
    with pytest.raises(KeyboardInterrupt):
        _ = _library(tmp_path).responses
    store = _library(tmp_path).store
    with np.load(store) as saved:
        assert len(saved.files) == 2
    calls.append(1)  # past the interrupt: count without raising
    resumed = _library(tmp_path).responses
    assert len(calls) == 5  # the third bundle only
    monkeypatch.setattr(BundleResponse, "tabulate", classmethod(tabulate))
    whole = _library(tmp_path / "other").responses
    for a, b in zip(resumed, whole, strict=True):
        assert_allclose(a.coefficients, b.coefficients, atol=1e-12)


def test_libraries_of_other_sizes_share_their_bundles(tmp_path, monkeypatch):
    """Bundle i is the same in a library of any size: a smaller library
    reads the first bundles of a larger one, a larger one simulates only
    the bundles it adds."""
    three = _library(tmp_path).responses
    calls = []
    tabulate = BundleResponse.tabulate.__func__

    def counted(cls, *args, **kwargs):
        calls.append(1)
        return tabulate(cls, *args, **kwargs)

    monkeypatch.setattr(BundleResponse, "tabulate", classmethod(counted))
    two = _library(tmp_path, n_bundles=2).responses
    assert not calls
    four = _library(tmp_path, n_bundles=4).responses
    assert len(calls) == 1
    for a, b, c in zip(two, three, four, strict=False):
        assert_array_equal(a.coefficients, b.coefficients)
        assert_array_equal(b.coefficients, c.coefficients)


def test_bad_sizes_are_named(tmp_path):
    with pytest.raises(ValueError, match="n_bundles"):
        _library(tmp_path, n_bundles=0)


def test_the_key_follows_what_simulates_a_bundle():
    """The library's code key covers the simulator and the tabulation, not
    the prior predictive check or the training's checkpoint, whose edits
    change no table (a bundle costs a minute to simulate again)."""
    sources = code_sources(
        *SIMULATING_CODE["roots"], exclude=SIMULATING_CODE["exclude"]
    )
    for simulating in (
        "sim/forward.py",
        "posterior/white_matter.py",
        "posterior/mixture.py",
        "geometry/substrates/bundle.py",
    ):
        assert simulating in sources
    for checking in ("posterior/envelope.py", "posterior/checkpoint.py"):
        assert checking not in sources
