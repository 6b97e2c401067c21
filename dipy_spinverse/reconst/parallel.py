"""How a volume fit is spread: the engines (:data:`PARALLEL_ENGINES`), their
options checked once (:func:`check_engine_options`), the workers and the
voxels per chunk.

``"serial"`` fits ``batch_size`` voxels at a time on one device;
``"joblib"`` and ``"dask"`` (on local threads, without ``distributed``) run
chunks through DIPY's :func:`~dipy.reconst.multi_voxel.multi_voxel_fit`;
``"ray"`` and ``"dask"`` with ``distributed`` run them on a cluster
(:mod:`.engines`).
"""

import math
import numbers
import os

import torch

from .. import clusters
from ..checks import check_int

__all__ = [
    "PARALLEL_ENGINES",
    "check_engine_options",
    "worker_count",
    "share_cores",
    "chunks",
    "chunk_share",
]

#: Ways to spread a volume fit: one device, joblib processes (DIPY's
#: ``multi_voxel_fit``), or a Ray or Dask cluster (:mod:`.engines`).
PARALLEL_ENGINES = ("serial", "joblib", "dask", "ray")


def check_engine_options(engine, address, n_jobs, vox_per_chunk):
    """Check the options that spread a fit (see :meth:`SpinverseModel.fit`).

    Parameters
    ----------
    engine : {"serial", "joblib", "dask", "ray"}
        How the fit is spread.
    address : str or distributed.Client or None
        The cluster of the Ray or Dask engine.
    n_jobs : int or None
        Workers of a parallel engine (negative counts back from all cores);
        must be None for ``"serial"``.
    vox_per_chunk : int or None
        Voxels per chunk (>= 1), or None for the default.

    Returns
    -------
    on_cluster : bool
        Whether ``engine`` runs on a Ray or Dask cluster.
    n_workers : int
        The workers ``n_jobs`` asks for.
    vox_per_chunk : int or None
        The checked ``vox_per_chunk``.

    Raises
    ------
    ValueError
        For an unknown engine, ``n_jobs`` with ``"serial"``, or an invalid
        ``n_jobs`` or ``vox_per_chunk``.
    """
    if engine not in PARALLEL_ENGINES:
        raise ValueError(
            f"Invalid engine {engine!r}. Must be one of {PARALLEL_ENGINES}."
        )
    on_cluster = _check_engine_installed(engine, address)
    if engine == "serial" and n_jobs is not None:
        raise ValueError(
            f"n_jobs={n_jobs!r} is for the parallel engines (joblib, dask, ray); "
            "engine='serial' fits batch_size voxels at a time on one device. "
            "Pass a parallel engine, or leave n_jobs out."
        )
    n_workers = worker_count(n_jobs)
    if vox_per_chunk is not None:
        vox_per_chunk = check_int(vox_per_chunk, "vox_per_chunk", 1)
    return on_cluster, n_workers, vox_per_chunk


def _check_engine_installed(engine, address):
    """Whether ``engine`` runs on a cluster; a ValueError if it cannot run.

    Ray always runs on a cluster (a local one by default). Dask does when
    ``distributed`` is installed or an ``address`` is given; without both it
    runs on local threads through DIPY's ``multi_voxel_fit``.
    """
    import importlib.util

    if engine == "serial":
        if address is not None:
            raise ValueError(
                f"address={address!r} is for engine='ray' or engine='dask'; "
                "pass one of those engines, or leave address out."
            )
        return False
    if engine == "joblib":
        if address is not None:
            raise ValueError(
                "engine='joblib' runs on this machine and takes no address; use "
                "engine='ray' or engine='dask' for a cluster."
            )
        if importlib.util.find_spec("joblib") is None:
            raise ValueError(
                "engine='joblib' needs the joblib package: pip install joblib, "
                "or use engine='serial'."
            )
        return False
    package = clusters.CLUSTER_ENGINES[engine]
    if importlib.util.find_spec(package) is not None:
        return True
    if engine == "dask" and address is None:
        if importlib.util.find_spec("dask") is not None:
            return False
    raise ValueError(
        f"engine={engine!r} needs the {package} package: "
        f"{clusters.INSTALL_HINT} (or pip install {package}), or use "
        "engine='serial'."
    )


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def worker_count(n_jobs):
    if n_jobs is None:
        n_jobs = -1
    if not isinstance(n_jobs, numbers.Integral) or n_jobs == 0:
        raise ValueError(
            f"n_jobs must be a non-zero integer (negative counts back from all "
            f"cores) or None, got {n_jobs!r}."
        )
    return int(n_jobs) if n_jobs > 0 else max(1, _cores() + int(n_jobs) + 1)


def share_cores(n_workers, main_pid):
    """In a worker process, use this worker's share of the cores.

    Parameters
    ----------
    n_workers : int or None
        The number of worker processes; None or 0: leave the threads alone.
    main_pid : int
        The main process's id (which keeps all cores).

    Returns
    -------
    None
        Torch's thread count is set in a worker process.
    """
    if os.getpid() == main_pid or not n_workers:
        return
    torch.set_num_threads(max(1, _cores() // int(n_workers)))


def chunks(rows, size):
    """Consecutive pieces of ``rows`` of at most ``size``.

    Parameters
    ----------
    rows : sequence or ndarray
        What is split.
    size : int
        The largest piece.

    Returns
    -------
    generator
        The pieces, in order.
    """
    return (rows[start : start + size] for start in range(0, len(rows), size))


def chunk_share(settings, n_voxels, n_workers):
    """Voxels per chunk: ``batch_size``, or an equal share of each worker.

    Parameters
    ----------
    settings : SearchSettings
        The fit's settings (its ``batch_size``).
    n_voxels : int
        The voxels to fit.
    n_workers : int
        The workers sharing them.

    Returns
    -------
    int
        Voxels per chunk, at least 1.
    """
    return max(1, min(settings.batch_size, math.ceil(n_voxels / n_workers)))
