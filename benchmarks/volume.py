"""Regenerates the tables of doc/validation/volumes.md.

``--quick``: one chunk of 4 voxels, one iteration (up to half a minute: the
96 x 96 x 60 volume is still built; -m slow).

Whole volumes: memory, checkpoint cost and throughput of a volume fit.

A 96 x 96 x 60 volume (552,960 voxels, float32, two diffusion times,
signals drawn from ``--seed``) with a 10,000-voxel mask, fitted with fast
settings (the published face fit, the default 576-tetrahedron grid,
``--max_iter`` iterations, no label search) and stopped after ``--chunks``
chunks of ``--batch`` voxels by the checkpoint hook. Prints three tables:
memory (the data, the peak traced Python/numpy allocations during the fit
(tracemalloc: not torch's own), the peak resident set size before and
after, and the per-voxel arrays of the mask against those of the whole
volume, the layout before); the checkpoint cost per chunk against the
voxels in the mask (the HDF5 store, :class:`dipy_spinverse.io.Checkpoint`,
against rewriting the whole state as one ``.npz``, the checkpoint before);
and the throughput, with the time of the whole mask extrapolated.

    python benchmarks/volume.py --chunks 2
"""

import os
import resource
import shutil
import tempfile
import time
import tracemalloc

import harness
import numpy as np
import torch
from dipy.core.gradients import gradient_table

from dipy_spinverse import SpinverseModel
from dipy_spinverse.io.checkpoint import Checkpoint
from dipy_spinverse.io.fits import save_fit
from dipy_spinverse.reconst import SpinverseFit
from dipy_spinverse.reconst.runner import empty_params

SHAPE = (96, 96, 60)
N_MASK = 10_000


class Stop(Exception):
    """Raised by the checkpoint hook to end the fit after a few chunks."""


def gradients():
    """Two diffusion times, b = 0, 1000, 2500 s/mm^2, 6 directions each."""
    dirs = np.array(
        [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], float
    )
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvals, bvecs, big = [], [], []
    for big_delta in (0.04, 0.015):
        bvals += [0.0] + [1000.0] * 6 + [2500.0] * 6
        bvecs += [np.zeros(3)] + list(dirs) * 2
        big += [big_delta] * 13
    return gradient_table(
        np.array(bvals),
        bvecs=np.array(bvecs),
        big_delta=np.array(big),
        small_delta=0.005,
    )


def ball_mask(shape, n_voxels):
    """The ``n_voxels`` voxels nearest the centre."""
    grid = np.indices(shape).reshape(3, -1).T - (np.array(shape) - 1) / 2
    order = np.argsort(np.linalg.norm(grid, axis=1), kind="stable")
    mask = np.zeros(int(np.prod(shape)), bool)
    mask[order[:n_voxels]] = True
    return mask.reshape(shape)


def volume_data(gtab, shape, mask, seed=0):
    """Float32 signal: a mono-exponential decay with noise, S0 = 1000."""
    rng = np.random.default_rng(seed)
    signal = np.exp(-gtab.bvals * 1e-3 * rng.uniform(0.6, 0.9))
    data = np.zeros(shape + (len(signal),), np.float32)
    n = int(mask.sum())
    noise = 1 + 0.02 * rng.standard_normal((n, len(signal)))
    data[mask] = (1000.0 * signal * noise).astype(np.float32)
    return data


def memory_and_throughput(model, data, mask, n_chunks):
    """Fit ``n_chunks`` chunks; memory peaks and the time per chunk."""
    times = []

    def stop_after(partial, rows):
        times.append(time.perf_counter())
        if len(times) > n_chunks:
            raise Stop

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    try:
        model.fit(data, mask=mask, checkpoint=stop_after)
    except Stop:
        pass
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_chunk = np.diff(times)  # times[0]: the store created, before chunk 1
    return traced / 2**20, rss_before, rss_after, per_chunk


def volume_layout_bytes(model, n_voxels):
    """Bytes of the per-voxel arrays for ``n_voxels`` voxels."""
    params = empty_params(model.search_settings(), 1)
    return n_voxels * sum(v.nbytes for v in params.values() if v is not None)


def checkpoint_costs(model, sizes, batch, repeats, folder, seed):
    """Seconds per chunk: the HDF5 store against rewriting the whole .npz."""
    rows = []
    for n_mask in sizes:
        params = empty_params(model.search_settings(), n_mask)
        rng = np.random.default_rng(seed)
        params["permeability"][:] = rng.uniform(1e-5, 0.1, params["permeability"].shape)
        params["predicted"][:] = rng.uniform(0, 1, params["predicted"].shape)
        params["S0"][:] = 1000.0
        params["S0_sequences"][:] = 1000.0
        params["loss"][:] = 1e-3
        params["status"][:] = -1  # PENDING
        mask = ball_mask(SHAPE, n_mask)
        fit = SpinverseFit(model, params, mask)
        store = Checkpoint(os.path.join(folder, f"store_{n_mask}.h5"))
        start = time.perf_counter()
        store(fit)
        create = time.perf_counter() - start
        chunks = [np.arange(i * batch, (i + 1) * batch) for i in range(repeats)]
        start = time.perf_counter()
        for chunk in chunks:
            params["status"][chunk] = 0
            store(fit, chunk)
        per_chunk = (time.perf_counter() - start) / repeats
        start = time.perf_counter()
        save_fit(fit, os.path.join(folder, f"whole_{n_mask}.npz"))
        whole = time.perf_counter() - start
        rows.append((n_mask, create, per_chunk, whole))
    return rows


def main(argv=None):
    parser = harness.parser(__doc__, seed=0)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max_iter", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    sizes = (1_000, 10_000, 100_000)
    if args.quick:
        args.chunks, args.batch, args.max_iter, sizes = 1, 4, 1, (1_000,)
    gtab = gradients()
    model = SpinverseModel(
        gtab,
        preset="paper",
        max_iter=args.max_iter,
        batch_size=args.batch,
        device=args.device,
    )
    mask = ball_mask(SHAPE, N_MASK)
    data = volume_data(gtab, SHAPE, mask, args.seed)
    print(
        f"volume {SHAPE}, {mask.size:,} voxels, mask {int(mask.sum()):,}; "
        f"{len(gtab.bvals)} volumes; grid {model.grid.n_cells} cells / "
        f"{model.grid.n_faces} faces; max_iter {args.max_iter}, batch {args.batch}; "
        f"device {args.device}, torch threads {torch.get_num_threads()}"
    )
    traced, rss_before, rss_after, per_chunk = memory_and_throughput(
        model, data, mask, args.chunks
    )
    memory = [
        ("the volume's data (float32, input)", f"{data.nbytes / 2**20:.0f}"),
        ("peak traced allocations during the fit (tracemalloc)", f"{traced:.0f}"),
        ("peak RSS before the fit (data, imports)", f"{rss_before:.0f}"),
        (f"peak RSS after {args.chunks} chunks", f"{rss_after:.0f}"),
        (
            f"per-voxel arrays of the {N_MASK:,} voxels of the mask (held)",
            f"{volume_layout_bytes(model, N_MASK) / 2**20:.0f}",
        ),
        (
            f"the same for all {mask.size:,} voxels (the layout before)",
            f"{volume_layout_bytes(model, mask.size) / 2**20:,.0f}",
        ),
    ]
    print("\n" + harness.table(["memory", "MiB"], memory, "-r"))
    folder = tempfile.mkdtemp()
    try:
        costs = checkpoint_costs(model, sizes, args.batch, 20, folder, args.seed + 1)
    finally:
        shutil.rmtree(folder)
    titles = ["voxels in the mask", "store created (s)"]
    titles += [f"HDF5 chunk of {args.batch} (ms)", "whole .npz rewrite (s)"]
    rows = [
        (f"{n:,}", f"{create:.3f}", f"{chunk * 1e3:.1f}", f"{whole:.2f}")
        for n, create, chunk, whole in costs
    ]
    print("\n" + harness.table(titles, rows, "rrrr"))
    seconds = float(np.mean(per_chunk))
    per_minute = args.batch / seconds * 60
    throughput = [
        ("chunks fitted", f"{len(per_chunk)} x {args.batch} voxels"),
        ("seconds per chunk (fit + checkpoint)", f"{seconds:.2f}"),
        ("voxels per minute", f"{per_minute:,.0f}"),
        (f"the {N_MASK:,}-voxel mask (extrapolated)", f"{N_MASK / per_minute:.0f} min"),
    ]
    print("\n" + harness.table(["throughput", "value"], throughput, "-r"))


if __name__ == "__main__":
    main()
