"""A library of simulated bundles: each bundle's table, simulated once.

A voxel mixed from bundles, free water and dots (:mod:`.mixture`) needs the
Bloch-Torrey solver for its bundles only, and a bundle tabulated by shell
and cosine to its axis (:class:`~.mixture.BundleResponse`) serves every
axis and dispersion. A :class:`BundleLibrary` draws ``n_bundles`` bundles of
a white-matter prior, tabulates each on a protocol's shells, and keeps the
tables in the cache under a key of everything they depend on (the prior,
the protocol, the draws' seed and the code that simulates them), so that any
number of mixed voxels costs the library once. Draw ``i`` depends on the
seed and ``i`` alone (the ``i``-th child of ``numpy.random.SeedSequence``):
the draws are made again on load, only the tables are stored, and every
bundle simulated is kept in a store of the prior, protocol and seed, so
that a library stopped part way resumes, a larger one extends a smaller,
and a smaller one reads the first bundles of a larger.

The bundles are independent: with ``engine="ray"`` or ``"dask"`` each is a
task on a cluster's worker (:func:`~dipy_spinverse.clusters.open_cluster`),
as a posterior's training simulations are. They finish in any order; the
store takes them in order, so a stop loses at most the bundles past the
first one still running.
"""

import os
import pathlib

import numpy as np
from tqdm.auto import tqdm

from ..checks import check_int
from ..clusters import checked_engine, open_cluster, run_chunks
from ..files import cache_key, cache_root, load_or_build
from ..provenance import code_digest
from ..sim.sequences import as_protocol
from .mixture import BundleResponse, shell_keys

__all__ = ["BundleLibrary", "SIMULATING_CODE", "tabulate_bundle"]

#: What a bundle's table is made by: the prior's draws and simulation and
#: the tabulation, with everything they import except what never touches a
#: table (the prior predictive check, the tissue prior's simulator, the
#: training's checkpoint of simulations, the flow's targets), so that
#: editing those keeps the library: a bundle costs about a minute of
#: Bloch-Torrey solves.
SIMULATING_CODE = {
    "roots": ("posterior.white_matter", "posterior.mixture"),
    "exclude": (
        "posterior.envelope",
        "posterior.simulator",
        "posterior.checkpoint",
        "posterior.targets",
    ),
}


class BundleLibrary:
    """Bundles of a prior tabulated on a protocol (module documentation).

    Parameters
    ----------
    prior : WhiteMatterPrior
        Draws the bundles (``draw(rng)``) and simulates them
        (``simulate``); ``description()`` keys the cache.
    protocol : Protocol or GradientTable
        The shells tabulated.
    n_bundles : int
    seed : int
    n_azimuths : int
        In-plane directions averaged at each node
        (:meth:`~.mixture.BundleResponse.tabulate`).
    substeps : int, optional
        Magnus sub-step multiple (default: measured per section).
    cache_dir : path-like, optional
        Default :func:`~dipy_spinverse.files.cache_root`.
    progress : bool
        A progress bar while the bundles are simulated.
    engine : {"serial", "ray", "dask"}
        ``"serial"`` simulates the bundles in this process, one after
        another; ``"ray"`` and ``"dask"`` make each bundle a task of a
        cluster. The tables are the same either way (to rounding: a worker
        may sum in another order on another number of threads).
    address : str or distributed.Client, optional
        The cluster of ``engine``, as
        :func:`~dipy_spinverse.clusters.open_cluster` takes it (default:
        this process's, else ``RAY_ADDRESS``, else a local one).
    n_workers : int, optional
        Workers of a local cluster started here (default: every core).

    Attributes
    ----------
    draws : list of WhiteMatterDraw
        The bundles, made again from the seed.
    """

    def __init__(
        self,
        prior,
        protocol,
        *,
        n_bundles,
        seed=0,
        n_azimuths=4,
        substeps=None,
        cache_dir=None,
        progress=False,
        engine="serial",
        address=None,
        n_workers=None,
    ):
        self.engine, self.address, self.n_workers = checked_engine(
            engine, address, n_workers
        )
        self.prior = prior
        self.progress = bool(progress)
        self.protocol = as_protocol(protocol)
        self.n_bundles = check_int(n_bundles, "n_bundles", 1)
        self.seed = check_int(seed, "seed", 0)
        self.n_azimuths = check_int(n_azimuths, "n_azimuths", 1)
        self.substeps = substeps
        self.cache_dir = cache_dir
        children = np.random.SeedSequence(self.seed).spawn(self.n_bundles)
        self.draws = [prior.draw(np.random.default_rng(c)) for c in children]
        self._responses = None

    @property
    def path(self):
        """The library's cache file."""
        return self._cache_file("bundle-library", n_bundles=self.n_bundles)

    @property
    def store(self):
        """Every bundle of this prior, protocol and seed simulated so far,
        whatever the library's size (bundle ``i`` is the same in a library
        of any size): a larger library extends it, a smaller one reads its
        first bundles, and a stopped one resumes from it."""
        return self._cache_file("bundle-store")

    def _cache_file(self, stem, **more):
        description = {
            "prior": self.prior.description(),
            **more,
            "seed": self.seed,
            "n_azimuths": self.n_azimuths,
            "substeps": self.substeps,
            "waveforms": [repr(w) for w in self.protocol.waveforms],
            "code": code_digest(
                *SIMULATING_CODE["roots"], exclude=SIMULATING_CODE["exclude"]
            ),
        }
        key = cache_key(description, [self.protocol.bvals, self.protocol.bvecs])
        return cache_root(self.cache_dir) / f"{stem}-{key}.npz"

    @property
    def responses(self):
        """Each bundle's :class:`~.mixture.BundleResponse` (simulated on
        first use, or read from the cache)."""
        if self._responses is None:
            shells = tuple(shell_keys(self.protocol)[0])
            self._responses = [
                BundleResponse(shells, t, self.n_azimuths)
                for t in self._load_or_build()
            ]
        return self._responses

    def _load_or_build(self):
        path = self.path

        def load(path):
            with np.load(path) as saved:
                tables = saved["coefficients"]
            if len(tables) != self.n_bundles:
                raise ValueError(f"it holds {len(tables)} bundles")
            return tables

        def save(tables, tmp):
            with open(tmp, "wb") as f:
                np.savez(f, coefficients=tables)

        return load_or_build(
            path,
            load=load,
            build=lambda: self._simulate(self.store),
            save=save,
            what="bundle library",
        )

    def _simulate(self, store):
        """The first ``n_bundles`` bundles' tables: those in ``store``, the
        rest simulated here or on a cluster and added to it in order (written
        whole and renamed, so that a stop leaves the store readable)."""
        done = _read_store(store)[: self.n_bundles]
        stored = len(done)
        waiting = {}  # finished out of order: kept until those before them
        bar = tqdm(
            desc="Simulating the bundle library",
            initial=len(done),
            total=self.n_bundles,
            disable=not self.progress,
        )

        def finished(i, table):
            bar.update()
            waiting[i] = table
            grew = len(done) in waiting
            while len(done) in waiting:
                done.append(waiting.pop(len(done)))
            if grew:
                tmp = store.with_suffix(f".{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.savez(f, *done)
                os.replace(tmp, store)

        setting = (self.prior, self.protocol, self.n_azimuths, self.substeps)
        todo = range(stored, self.n_bundles)
        try:
            if self.engine == "serial":
                for i in todo:
                    finished(i, tabulate_bundle(setting, self.draws[i]))
            else:
                with open_cluster(
                    self.engine, self.address, n_workers=self.n_workers
                ) as cluster:
                    run_chunks(
                        cluster,
                        tabulate_bundle,
                        setting,
                        todo,
                        load=lambda i: self.draws[i],
                        done=finished,
                    )
        finally:
            bar.close()
        return _padded(done)


def tabulate_bundle(setting, draw, device=None):
    """One bundle's table (a task of :class:`BundleLibrary`, run in this
    process or on a cluster's worker).

    Parameters
    ----------
    setting : tuple
        The bundles' prior, the protocol, ``n_azimuths`` and ``substeps``.
    draw : WhiteMatterDraw
    device : None
        Taken for the cluster's call; the bundles simulate on the CPU.

    Returns
    -------
    ndarray (n_shells, n_nodes)
        :attr:`~.mixture.BundleResponse.coefficients`.
    """
    prior, protocol, n_azimuths, substeps = setting
    return BundleResponse.tabulate(
        prior, draw, protocol, n_azimuths=n_azimuths, substeps=substeps
    ).coefficients


def _read_store(store):
    store = pathlib.Path(store)
    if not store.exists():
        return []
    with np.load(store) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def _padded(tables):
    """The tables as one array, each padded with zero coefficients to the
    widest (a coefficient beyond a shell's nodes is zero)."""
    width = max(t.shape[1] for t in tables)
    out = np.zeros((len(tables), tables[0].shape[0], width))
    for i, t in enumerate(tables):
        out[i, :, : t.shape[1]] = t
    return out
