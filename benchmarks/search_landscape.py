"""Is the label search limited by its starts or by the landscape it descends?

Held-out paper voxels (:func:`generalisation.targets`: published grid,
absorbing wall, noise-free, targets on the fit's own grid, so the true
labels fit to float32 rounding) are started from an *oracle composition*:
for each true cell, the grid cells nearest its centroid, as many as it has
(the right number of cells, sizes and places; the shapes balls). From there:

``descent``
    The package's label search (``search_labels(..., labels=start)``,
    default preset: every move, per-cell permeabilities, final refinement).
``walk``
    A greedy walk that may only give grid cells their *true* label, with the
    true per-cell permeabilities: each step takes the best such flip (of one
    grid cell, or with ``pairs`` also of two face-adjacent grid cells), while
    one lowers the loss. No search can do better with moves of that size:
    where the walk stalls, every move towards the truth raises the loss.

For scale, ``shift`` is the truth moved whole by the lattice translation
(one cube side or half a cube diagonal, 14 in all) that fits best: how much
IoU a small displacement costs cells this size, and how little loss.

Prints one row per voxel: the truth's cell count and grid cells, the start's
IoU and loss, and for each method the enclosed-volume IoU and loss reached.
IoU is scored as in ``generalisation.py``: against the truth or its point
inversion, whichever has the higher face F1. Loss: mean squared residual of
the b0-normalised signals on the search's 10 directions per shell.

    python benchmarks/search_landscape.py --n 8             # walks only
    python benchmarks/search_landscape.py --n 8 --descent   # + ~190 s per voxel

The walks take minutes per voxel, growing with its grid cells: 274 s for
the first held-out voxel (129 grid cells in 2 cells; 2-core x86_64, torch
2.13 CPU, 2026-11-24), so ``--n 8`` takes about half an hour.
"""

import argparse
import platform
import time
from itertools import product

import numpy as np
import torch
from generalisation import HELD_OUT_SEED, targets
from scipy.spatial import cKDTree

from dipy_spinverse import simulate
from dipy_spinverse.geometry.metrics import all_metrics
from dipy_spinverse.inverse import resolve_config
from dipy_spinverse.inverse.fields import membrane_fields
from dipy_spinverse.inverse.search import direction_subset, search_labels
from dipy_spinverse.sim.signals import normalise_b0

OPEN_KAPPA = 1.0  # m/s: faces without a membrane


def oracle_start(grid, truth):
    """A ball per true cell: its volume in grid cells, about its centroid."""
    start = np.zeros_like(truth)
    x = grid.cell_centroids
    for k in range(1, truth.max() + 1):
        cell = truth == k
        distance = np.linalg.norm(x - x[cell].mean(0), axis=1)
        distance[start > 0] = np.inf  # cells placed first keep theirs
        start[np.argsort(distance)[: cell.sum()]] = k
    return start


def loss_function(grid, protocol, target, kappas):
    """``loss(labellings) -> mean squared residual`` at the true permeabilities."""

    def loss(candidates):
        candidates = np.atleast_2d(candidates)
        rows = np.repeat(np.asarray(kappas, float)[None], len(candidates), 0)
        field = membrane_fields(grid, candidates, rows, OPEN_KAPPA)
        with torch.no_grad():
            pred = simulate(grid, field, protocol, dtype=torch.float32)
        return ((normalise_b0(pred, protocol).numpy() - target) ** 2).mean(-1)

    return loss


def lattice_translations(grid, labels):
    """``labels`` moved whole by each of the 14 shortest translations of the
    BCC lattice (one cube side along an axis, half a cube diagonal), which
    map the grid's cells onto cells: (14, n_cells). Cells whose source lies
    outside the box are outside every cell (0)."""
    h = grid.spacing
    steps = [sign * h * axis for axis in np.eye(3) for sign in (1, -1)]
    steps += [h / 2 * np.array(signs) for signs in product((1, -1), repeat=3)]
    x = grid.cell_centroids
    tree = cKDTree(x)
    shifted = []
    for step in steps:
        distance, source = tree.query(x - step)
        shifted.append(np.where(distance < 1e-6 * h, labels[source], 0))
    return np.array(shifted)


def shifted_truth(grid, truth, loss):
    """The truth moved by the best-fitting lattice translation; (labels, loss)."""
    shifted = lattice_translations(grid, truth)
    losses = loss(shifted)
    best = int(np.argmin(losses))
    return shifted[best], losses[best]


def walk(grid, truth, start, loss, *, pairs):
    """Greedy walk by flips towards the truth; (labels, loss) where it stalls."""
    a, b = grid.face_cells.T
    current, value = start.copy(), loss(start)[0]
    while True:
        wrong = current != truth
        groups = [[c] for c in np.flatnonzero(wrong)]
        if pairs:
            both = wrong[a] & wrong[b]
            groups += [[i, j] for i, j in zip(a[both], b[both], strict=True)]
        if not groups:
            return current, value
        candidates = np.repeat(current[None], len(groups), 0)
        for row, group in zip(candidates, groups, strict=True):
            row[group] = truth[group]
        losses = loss(candidates)
        best = int(np.argmin(losses))
        if not losses[best] < value:
            return current, value
        current, value = candidates[best], losses[best]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8, help="held-out voxels")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument(
        "--descent", action="store_true", help="also run the package's search"
    )
    args = parser.parse_args()
    grid, protocol, truth, kappas, signal, _, _ = targets("paper", args.n, args.seed)
    data = normalise_b0(torch.as_tensor(signal), protocol)
    config = resolve_config("default")
    subset = direction_subset(protocol, config.search.directions)
    a, b = grid.face_cells.T

    def iou(found, true):
        """Enclosed-volume IoU, twin-aware, as ``generalisation.score`` scores."""
        barrier, true_barrier = found[a] != found[b], true[a] != true[b]
        metrics = all_metrics(
            grid, barrier, true_barrier=true_barrier, true_labels=true, twin=True
        )
        return metrics["iou"]

    starts = np.array([oracle_start(grid, t) for t in truth])
    descended, seconds = None, float("nan")
    if args.descent:
        tic = time.perf_counter()
        sim = dict(diffusivity=2e-3, dtype=torch.float32, device="cpu")
        descended = search_labels(
            grid,
            data,
            protocol,
            config,
            sim=sim,
            face_kappa=None,
            labels=starts,
        ).labels
        seconds = (time.perf_counter() - tic) / args.n
    print(
        f"{platform.machine()}, {torch.get_num_threads()} threads; "
        f"{args.n} held-out paper voxels (seed {args.seed}), oracle starts"
    )
    head = "| voxel | cells | grid cells | start IoU / loss | descent IoU (cells) "
    head += "| walk IoU / loss | walk + pairs IoU / loss | shift IoU / loss |"
    print(head)
    print("|" + "---:|" * 8)
    for v in range(args.n):
        loss = loss_function(grid, protocol[subset], data[v, subset].numpy(), kappas[v])
        singles = walk(grid, truth[v], starts[v], loss, pairs=False)
        doubles = walk(grid, truth[v], starts[v], loss, pairs=True)
        shifted = shifted_truth(grid, truth[v], loss)
        found = "-"
        if descended is not None:
            found = f"{iou(descended[v], truth[v]):.2f} ({descended[v].max()})"
        print(
            f"| {v} | {truth[v].max()} | {np.sum(truth[v] > 0)} "
            f"| {iou(starts[v], truth[v]):.2f} / {loss(starts[v])[0]:.1e} | {found} "
            f"| {iou(singles[0], truth[v]):.2f} / {singles[1]:.1e} "
            f"| {iou(doubles[0], truth[v]):.2f} / {doubles[1]:.1e} "
            f"| {iou(shifted[0], truth[v]):.2f} / {shifted[1]:.1e} |",
            flush=True,
        )
    if args.descent:
        print(f"descent: {seconds:.1f} s per voxel")


if __name__ == "__main__":
    main()
