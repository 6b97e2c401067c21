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
    for checking in (
        "posterior/envelope.py",
        "posterior/simulator.py",
        "posterior/checkpoint.py",
    ):
        assert checking not in sources


class _LastFirst:
    """A cluster stand-in that runs each task as it is submitted and hands
    the tasks in flight back newest first: bundles finish out of order.
    ``stop_at``: the task whose result raises, as an interrupt would."""

    slots = 2

    def __init__(self, stop_at=None):
        self.results, self.stop_at = {}, stop_at

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def share(self, obj):
        return obj

    def submit(self, function, *args, gpu=False):
        future = len(self.results)
        self.results[future] = function(*args)
        return future

    def wait_any(self, futures):
        return [max(futures)]

    def result(self, future):
        if future == self.stop_at:
            raise KeyboardInterrupt
        return self.results[future]

    def cancel(self, futures):
        pass


def test_bundles_finished_out_of_order_are_stored_in_order(tmp_path, monkeypatch):
    """On a cluster the bundles finish in any order: the library is the
    serial one, and a stop keeps only the bundles before the first one
    unfinished (the store holds bundle i at place i)."""
    import dipy_spinverse.posterior.library as library

    serial = _library(tmp_path / "serial").responses
    monkeypatch.setattr(library, "open_cluster", lambda *a, **k: _LastFirst(0))
    stopped = _library(tmp_path / "cluster", engine="ray")
    with pytest.raises(KeyboardInterrupt):
        stopped.responses  # noqa: B018
    assert not stopped.store.exists()  # bundles 1 and 2 came back, not 0
    monkeypatch.setattr(library, "open_cluster", lambda *a, **k: _LastFirst())
    resumed = _library(tmp_path / "cluster", engine="ray").responses
    for a, b in zip(serial, resumed, strict=True):
        assert_allclose(a.coefficients, b.coefficients, atol=1e-12)
    assert len(np.load(stopped.store).files) == 3


@pytest.mark.slow  # Ray's worker processes import torch: about a minute on 2 cores
def test_a_library_on_ray_is_the_serial_one(tmp_path):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    serial = _library(tmp_path / "serial").responses
    on_ray = _library(
        tmp_path / "ray", engine="ray", address="local", n_workers=2
    ).responses
    assert not ray.is_initialized()  # the local instance stopped again
    for a, b in zip(serial, on_ray, strict=True):
        assert_allclose(a.coefficients, b.coefficients, atol=1e-12)


def test_bad_engines_are_named(tmp_path):
    with pytest.raises(ValueError, match="engine must be one of"):
        _library(tmp_path, engine="spark")
    with pytest.raises(ValueError, match="address='auto' is the cluster of"):
        _library(tmp_path, address="auto")
    with pytest.raises(ValueError, match="n_workers"):
        _library(tmp_path, engine="ray", n_workers=0)
