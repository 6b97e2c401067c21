"""Voxels in chunks: the compartment models' fits and polish, a chunk at a
time, two chunks in flight on threads, with a progress bar."""

from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

__all__ = ["map_chunks"]

# Smallest chunk fitted beside others on threads (see map_chunks). Below
# it the iterations' Python work dominates and threads contend for the GIL:
# 2-fibre NODDI on 100 voxels in two threads of 50 ran at 40-44 voxels/s
# against 68-75 in one, and on 512 voxels (threads of 256) at 109-156
# against 167-176; on 2,048 (1,024 each) threads won, 297 against 210.
_MIN_THREADED_CHUNK = 512
# Chunks in flight at once (with at least 2 torch threads). Two fill the
# gaps that one chunk's Python leaves; each chunk's torch calls use all of
# torch's intra-op threads, so more would multiply the threads on the
# cores (64 x 64 on a 64-core node) rather than fill them. Setting
# torch's thread count inside the workers is not an option: it changes
# the process-wide default that later threads start with.
_CHUNKS_IN_FLIGHT = 2


def map_chunks(work, n, *, step, desc):
    """``[work(start, stop), ...]`` over consecutive chunks of at most
    ``step`` of ``n`` voxels, in order, with a progress bar in voxels (shown
    on a terminal, for several chunks).

    Several chunks of at least ``_MIN_THREADED_CHUNK`` voxels are fitted
    ``_CHUNKS_IN_FLIGHT`` at a time on threads (if torch has more than one
    thread). Why: a Levenberg-Marquardt iteration is many torch calls with
    Python between them, during which torch's own threads wait. One-fibre
    NODDI on 10,000 voxels, one chunk at a time, kept 1.4 of 2 cores busy
    (4,000 voxels/s); two at a time keep 1.8 busy (5,700-6,000 voxels/s),
    with the same estimates (each voxel's fit is its own). Grad mode is per
    thread, so ``work`` sets its own.

    Parameters
    ----------
    work : callable
        ``work(start, stop)`` fits the voxels ``start:stop``.
    n : int
        Number of voxels.
    step : int
        Most voxels in a chunk.
    desc : str
        The progress bar's label.

    Returns
    -------
    list
        ``work``'s results, in the chunks' order.
    """
    bounds = [(i, min(i + step, n)) for i in range(0, n, step)]
    workers = min(_CHUNKS_IN_FLIGHT, torch.get_num_threads(), len(bounds))
    # A bar only for several chunks (a fit long enough to watch), and only
    # on a terminal (disable=None).
    quiet = True if len(bounds) < 2 else None
    with tqdm(total=n, desc=desc, unit="voxel", disable=quiet, leave=False) as bar:

        def one(bound):
            out = work(*bound)
            bar.update(bound[1] - bound[0])
            return out

        if workers < 2 or step < _MIN_THREADED_CHUNK:
            return [one(b) for b in bounds]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, bounds))
