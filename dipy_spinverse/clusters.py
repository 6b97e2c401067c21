"""Ray and Dask clusters: one task per chunk of work (voxels of a volume
fit, draws of a posterior's training set).

:func:`open_cluster` connects to a running cluster (a Ray address or
``"auto"``, a ``dask.distributed`` scheduler address or ``Client``), or
starts a local one, and returns a :class:`Cluster` that submits tasks and
reports them as they finish. :func:`run_chunks` keeps a bounded number of
chunks in flight, so an interrupted fit loses at most those, and hands each
finished chunk back at once (progress bar, checkpoint).

Each task runs where the cluster puts it; on a cluster with GPUs a model on
``cuda`` runs every task on its worker's own GPU: Ray gives each task one GPU
(``num_gpus=1``, it sets ``CUDA_VISIBLE_DEVICES``), a Dask worker uses the
GPU of its rank among the workers of its host (:func:`worker_device`).

DIPY's ``paramap`` runs Dask on local threads only and Ray only inside the
user's own ``ray.init``; here the cluster is used as it is.

A local Dask cluster's workers are processes that multiprocessing *spawns*:
each runs the main script's top level again as it starts (Python's "safe
importing of the main module"). A script that starts one from code outside
``if __name__ == "__main__":`` is refused before any worker starts
(:func:`refuse_unguarded_main`), and a spawned process that would wait on a
lock its parent holds raises instead (:func:`refuse_spawned_main_import`).
"""

import ast
import os
import pathlib
import socket
import sys

import torch

from .checks import check_int
from .files import MAIN_GUARD_HINT, refuse_spawned_main_import

__all__ = [
    "CLUSTER_ENGINES",
    "INSTALL_HINT",
    "Cluster",
    "checked_engine",
    "open_cluster",
    "refuse_spawned_main_import",
    "refuse_unguarded_main",
    "run_chunks",
    "unguarded_main_line",
    "worker_device",
]

#: Engines that run on a cluster, and the package each needs.
CLUSTER_ENGINES = {"ray": "ray", "dask": "distributed"}

#: How to install both cluster engines.
INSTALL_HINT = 'pip install "dipy_spinverse[parallel]"'

#: Seconds to wait for a Dask scheduler before calling it unreachable.
CONNECT_TIMEOUT = 10


def checked_engine(engine, address, n_workers):
    """Where simulations run, checked.

    Parameters
    ----------
    engine : {"serial", "ray", "dask"}
        This process, or a cluster of :data:`CLUSTER_ENGINES`.
    address : str or distributed.Client, optional
        The cluster (:func:`open_cluster`); only with a cluster engine.
    n_workers : int, optional
        Workers of a local cluster; default every core.

    Returns
    -------
    engine, address, n_workers

    Raises
    ------
    ValueError
        Naming the argument: an engine other than ``"serial"`` and
        :data:`CLUSTER_ENGINES`, an address without a cluster engine, fewer
        than one worker.
    """
    engines = ("serial", *CLUSTER_ENGINES)
    if engine not in engines:
        raise ValueError(
            f"engine must be one of {engines} (where the simulations run), "
            f"got {engine!r}."
        )
    if address is not None and engine == "serial":
        raise ValueError(
            f"address={address!r} is the cluster of engine='ray' or 'dask'; "
            "pass one of those engines, or leave address out."
        )
    n_workers = os.cpu_count() if n_workers is None else n_workers
    return engine, address, check_int(n_workers, "n_workers", 1)


def require(engine, address=None):
    """Import the package ``engine`` needs; a ValueError naming the install."""
    package = CLUSTER_ENGINES[engine]
    try:
        return __import__(package)
    except ImportError as err:
        where = f" (address={address!r})" if address is not None else ""
        raise ValueError(
            f"engine={engine!r}{where} needs the {package} package: "
            f"{INSTALL_HINT} (or pip install {package}), or use engine='serial'."
        ) from err


class Cluster:
    """A connection to a Ray or Dask cluster (see :func:`open_cluster`).

    Attributes
    ----------
    slots : int
        Tasks the cluster runs at once (its CPUs or worker threads).
    gpus : int
        GPUs of the cluster (0 when it has none or does not say).
    """

    slots = 1
    gpus = 0

    def share(self, obj):
        """Put ``obj`` (the model) on the cluster once; a handle to pass."""
        raise NotImplementedError

    def submit(self, function, *args, gpu=False):
        """Start ``function(*args)``; ``gpu``: the task needs its own GPU."""
        raise NotImplementedError

    def wait_any(self, futures):
        """The futures of ``futures`` that have finished (at least one)."""
        raise NotImplementedError

    def result(self, future):
        raise NotImplementedError

    def cancel(self, futures):
        raise NotImplementedError

    def close(self):
        """Stop what :func:`open_cluster` started; leave the user's cluster."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RayCluster(Cluster):
    """Ray: an existing ``ray.init``, ``address``, ``RAY_ADDRESS`` or local."""

    def __init__(self, address=None, *, n_workers=1):
        ray = require("ray", address)
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            options = dict(include_dashboard=False, log_to_driver=False)
            target = address
            if target is None:
                # RAY_ADDRESS names the user's cluster; without it, a local
                # instance of n_workers CPUs. Resources are only given when
                # starting one (Ray refuses them when connecting).
                target = os.environ.get("RAY_ADDRESS") or "local"
            if target == "local":
                options["num_cpus"] = n_workers
            source = "RAY_ADDRESS" if address is None else "address"
            try:
                # Ray retries an unreachable address for minutes: look first.
                probe(target)
                ray.init(address=target, **options)
            except Exception as err:  # ConnectionError, RuntimeError, ...
                raise ValueError(
                    f"cannot connect to the Ray cluster at {source}={target!r} "
                    f"({type(err).__name__}: {err}). Start it (ray start --head), "
                    "pass the address of a running one, or address='local' for a "
                    "local instance."
                ) from err
            self.started = True
        resources = ray.cluster_resources()
        self.slots = max(1, int(resources.get("CPU", 1)))
        self.gpus = int(resources.get("GPU", 0))
        self._remote = {}

    def share(self, obj):
        return self.ray.put(obj)

    def submit(self, function, *args, gpu=False):
        if function not in self._remote:
            self._remote[function] = self.ray.remote(function)
        remote = self._remote[function]
        if gpu:
            remote = remote.options(num_gpus=1)
        return remote.remote(*args)

    def wait_any(self, futures):
        ready, _ = self.ray.wait(list(futures), num_returns=1)
        return ready

    def result(self, future):
        return self.ray.get(future)

    def cancel(self, futures):
        for future in futures:
            self.ray.cancel(future, force=True)

    def close(self):
        if self.started:
            self.ray.shutdown()
            self.started = False


class DaskCluster(Cluster):
    """Dask: a ``distributed.Client``, a scheduler address, or a local cluster."""

    def __init__(self, address=None, *, n_workers=1):
        distributed = require("dask", address)
        self.distributed = distributed
        self.owned = []
        if isinstance(address, distributed.Client):
            client = address
        elif address is None:
            try:
                client = distributed.get_client()
            except ValueError:  # no client yet: a local cluster of processes
                refuse_unguarded_main(
                    "a Dask engine without an address (engine='dask', "
                    "training_engine='dask')"
                )
                cluster = distributed.LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                )
                client = distributed.Client(cluster)
                self.owned = [client, cluster]
        else:
            try:
                client = distributed.Client(
                    address, timeout=CONNECT_TIMEOUT, set_as_default=False
                )
            except (OSError, TimeoutError) as err:
                raise ValueError(
                    f"cannot connect to the Dask scheduler at address={address!r} "
                    f"({type(err).__name__}: {err}). Start it (dask scheduler, then "
                    "dask worker <address>), pass the address of a running one "
                    "(tcp://host:port), or address=None for a local cluster."
                ) from err
            self.owned = [client]
        self.client = client
        workers = client.scheduler_info(n_workers=-1)["workers"]
        self.slots = max(1, sum(w.get("nthreads", 1) for w in workers.values()))
        self.gpus = sum(
            int(w.get("resources", {}).get("GPU", 0)) for w in workers.values()
        )
        self.ranks = _host_ranks(workers)
        self._completed = None

    def share(self, obj):
        return self.client.scatter(obj, broadcast=True, hash=False)

    def submit(self, function, *args, gpu=False):
        # pure=False: two chunks with equal arguments are still two tasks.
        future = self.client.submit(
            _on_dask_worker,
            function,
            self.ranks,
            gpu,
            os.getpid(),
            *args,
            pure=False,
        )
        # distributed.wait would need a default client; as_completed follows
        # the futures' own client (one passed with set_as_default=False).
        if self._completed is None:
            self._completed = self.distributed.as_completed(
                [future], loop=self.client.loop
            )
        else:
            self._completed.add(future)
        return future

    def wait_any(self, futures):
        return [next(self._completed)]

    def result(self, future):
        return future.result()

    def cancel(self, futures):
        self.client.cancel(list(futures))

    def close(self):
        for owned in self.owned:
            owned.close()
        self.owned = []


def unguarded_main_line():
    """The main script and its line now running outside an ``if __name__ ==
    "__main__":`` block: code that a spawned process runs again.

    The line is that of the script's top level (a call of a function that
    led here counts as that call). None when the main module is not run
    again by spawned processes (an interactive session, ``python -c``, a
    package's ``__main__``), when no frame of its top level led here (another
    thread), when its source cannot be read, or when the line lies inside an
    ``if`` that tests ``__name__``.

    Returns
    -------
    tuple of (str, int) or None
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    # multiprocessing's spawn does not run these again (spawn.py).
    if path is None or name == "__main__" or name.endswith(".__main__"):
        return None
    frame = sys._getframe(1)
    while frame is not None and not (
        frame.f_code.co_name == "<module>" and frame.f_globals is vars(main)
    ):
        frame = frame.f_back
    if frame is None:
        return None
    line = frame.f_lineno
    try:
        tree = ast.parse(pathlib.Path(frame.f_code.co_filename).read_text())
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.If)
            and node.lineno <= line <= node.end_lineno
            and any(
                isinstance(n, ast.Name) and n.id == "__name__"
                for n in ast.walk(node.test)
            )
        ):
            return None
    return frame.f_code.co_filename, line


def refuse_unguarded_main(what):
    """Refuse to start a local Dask cluster whose spawned workers would run
    the main script's unguarded work again (:func:`unguarded_main_line`).

    Parameters
    ----------
    what : str
        What starts the cluster, for the message.

    Raises
    ------
    RuntimeError
        Naming the script, its line and the guard.
    """
    if _start_method() == "fork":
        return
    found = unguarded_main_line()
    if found is not None:
        path, line = found
        raise RuntimeError(
            f"{what} starts a local Dask cluster, whose worker processes run "
            f"{path} again as they start, and line {line} of it runs outside "
            '`if __name__ == "__main__":`: every worker would start this work '
            f"again (a training waits for ever on its own lock). Fix: "
            f"{MAIN_GUARD_HINT}."
        )


def _start_method():
    """How Dask starts a local cluster's workers."""
    import dask

    return dask.config.get("distributed.worker.multiprocessing-method", "spawn")


def probe(address, timeout=CONNECT_TIMEOUT):
    """Raise ConnectionError unless ``host:port`` of ``address`` answers.

    Addresses without a port (``"auto"``, ``"local"``) are left to Ray.
    """
    if not isinstance(address, str) or address in ("auto", "local"):
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(f"nothing answers at {host}:{port} ({err})") from err


def _host_ranks(workers):
    """Rank of each worker address among the workers of its host."""
    ranks, seen = {}, {}
    for address in sorted(workers):
        host = workers[address].get("host", address)
        ranks[address] = seen.get(host, 0)
        seen[host] = ranks[address] + 1
    return ranks


def _on_dask_worker(function, ranks, gpu, client_pid, *args):
    """Run ``function(*args, device=...)`` with this worker's device and threads."""
    from distributed import get_worker

    worker = get_worker()
    if os.getpid() != client_pid:  # a worker process: its own threads only
        torch.set_num_threads(max(1, int(getattr(worker.state, "nthreads", 1))))
    device = worker_device(ranks.get(worker.address, 0)) if gpu else None
    return function(*args, device=device)


def worker_device(rank):
    """The GPU of the worker of ``rank`` on its host: ``cuda:<rank % count>``.

    A worker that sees one GPU (``CUDA_VISIBLE_DEVICES`` set per worker, as
    ``dask-cuda`` does) uses it whatever its rank.
    """
    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError(
            f"the model is on cuda but the Dask worker on {socket.gethostname()} "
            "sees no CUDA device; use device='cpu' or workers with GPUs."
        )
    return torch.device("cuda", int(rank) % count)


def open_cluster(engine, address=None, *, n_workers=1):
    """Connect to (or start) the cluster of ``engine``.

    Parameters
    ----------
    engine : {"ray", "dask"}
    address : str or distributed.Client, optional
        Ray: a running cluster's address, ``"auto"`` (the cluster on this
        machine) or ``"local"`` (a new local instance); default: the one
        already initialised in this process, else ``RAY_ADDRESS``, else a
        local instance of ``n_workers`` CPUs. Dask: a scheduler address
        (``"tcp://host:port"``) or a ``distributed.Client``; default: the
        current client, else a local cluster of ``n_workers`` processes.
    n_workers : int
        Workers of a local instance started here.

    Returns
    -------
    Cluster
        Close it (or use it as a context manager) to stop what was started.
    """
    refuse_spawned_main_import()
    if engine == "ray":
        return RayCluster(address, n_workers=n_workers)
    if engine == "dask":
        return DaskCluster(address, n_workers=n_workers)
    raise ValueError(
        f"engine must be one of {sorted(CLUSTER_ENGINES)}, got {engine!r}."
    )


def run_chunks(
    cluster, function, shared, chunks, *, load, done, gpu=False, window=None
):
    """Run ``function(shared, load(chunk), device=...)`` for every chunk.

    At most ``window`` chunks (default twice the cluster's slots) are in
    flight; ``done(chunk, result)`` is called as each finishes, in the order
    they finish. On an error or an interrupt the chunks in flight are
    cancelled.

    Parameters
    ----------
    cluster : Cluster
    function : callable
        A module-level function (workers import it by name).
    shared : object
        Passed to every task, put on the cluster once (the model).
    chunks : iterable
    load : callable
        ``load(chunk)``: the task's data, read when the chunk is submitted.
    done : callable
    gpu : bool
        Give each task its own GPU.
    window : int, optional
    """
    window = window or 2 * cluster.slots
    handle = cluster.share(shared)
    chunks = iter(chunks)
    pending = {}

    def submit_next():
        chunk = next(chunks, None)
        if chunk is not None:
            pending[cluster.submit(function, handle, load(chunk), gpu=gpu)] = chunk

    try:
        for _ in range(window):
            submit_next()
        while pending:
            for future in cluster.wait_any(pending):
                chunk = pending.pop(future)
                done(chunk, cluster.result(future))
                submit_next()
    finally:
        if pending:
            cluster.cancel(pending)
