"""How much of a voxel's geometry do its signals determine?

For held-out substrates of ``generalisation.py`` in realistic physics (a
reflecting voxel with its extracellular water; the cells drawn on the fine
grid and carried to the fit's grid), the true labelling on the fit's grid
and each of its 14 shortest lattice translations (the whole truth moved by
one cube side, 6.7 um, or half a cube diagonal, 5.8 um) are simulated on the
fit's grid, noise-free, at the true per-cell permeabilities, on the
published protocol. The squared distance of a translation's signals from
the truth's, in units of the noise at a given SNR,

    D = SNR^2 sum_i (S_moved,i - S_true,i)^2

(b0-normalised signals, every sequence with noise 1 / SNR of its own b = 0
signal, as ``generalisation.py`` draws it) is the expected chi-square gap
between the two labellings: where D is of order 1, noise decides which of
the two fits better, so no estimator, however good its search, tells them
apart in that voxel. Each translation is scored against the truth as the
evaluation scores an answer (IoU of the cells, twin-aware).

Prints, for SNR 100 and 30, the fraction of voxels that have a translation
scoring IoU < 0.5 (and < 0.85) within D <= 1 and D <= 4 of the truth, and
the median number of such translations; then the per-voxel rows with
``--rows``. This measures the data, not the search: the same numbers hold
for any inversion of these voxels. Only translations are tried, so the
ambiguity it finds is a lower bound.

    python benchmarks/ambiguity.py --n 200
"""

import argparse
import platform
import time

import numpy as np
import torch
from generalisation import DIFFUSIVITY, HELD_OUT_SEED, score, targets
from search_landscape import lattice_translations

from dipy_spinverse import simulate
from dipy_spinverse.inverse.fields import label_field
from dipy_spinverse.sim.signals import normalise_b0

OPEN_KAPPA = 0.1  # m/s: faces without a membrane, as generalisation.py's truth
SNRS = (100.0, 30.0)


def distances(grid, protocol, labels, kappas, *, batch=15):
    """Squared signal distance (sum over acquisitions, b0-normalised) of
    each lattice translation of ``labels`` from ``labels``, and its IoU."""
    moved = lattice_translations(grid, labels)
    fields = np.array(
        [label_field(grid, one, kappas, OPEN_KAPPA) for one in [labels, *moved]]
    )
    out = []
    with torch.no_grad():
        for i in range(0, len(fields), batch):
            pred = simulate(
                grid, fields[i : i + batch], protocol, diffusivity=DIFFUSIVITY
            )
            out.append(normalise_b0(pred, protocol).numpy())
    signals = np.concatenate(out)
    gap = ((signals[1:] - signals[0]) ** 2).sum(-1)
    iou = np.array(
        [
            score(grid, labels, kappas, one, field)["iou"]
            for one, field in zip(moved, fields[1:], strict=True)
        ]
    )
    return gap, iou


def summary(gaps, ious, snr):
    """Fractions of voxels with a far translation within D <= 1 and <= 4."""
    rows = []
    for worst in (0.5, 0.85):
        for bound in (1.0, 4.0):
            near = [
                np.sum((g * snr**2 <= bound) & (i < worst))
                for g, i in zip(gaps, ious, strict=True)
            ]
            rows.append((worst, bound, np.mean(np.array(near) > 0), np.median(near)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="held-out substrates")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--rows", action="store_true", help="print every voxel")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1.")
    tic = time.perf_counter()
    grid, protocol, labels, kappas, _, _, kinds = targets("snr100", args.n, args.seed)
    gaps, ious = [], []
    for v in range(args.n):
        gap, iou = distances(grid, protocol, labels[v], kappas[v])
        gaps.append(gap)
        ious.append(iou)
    seconds = time.perf_counter() - tic
    print(
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; {args.n} held-out substrates (seed "
        f"{args.seed}), realistic physics on the fit's grid ({grid.n_cells} "
        f"cells), {len(protocol)} acquisitions; {seconds:.0f} s"
    )
    print()
    print(
        "| SNR | translations scoring IoU below | within D <= | voxels with one "
        "| median number per voxel |"
    )
    print("|---:|---:|---:|---:|---:|")
    for snr in SNRS:
        for worst, bound, fraction, median in summary(gaps, ious, snr):
            print(
                f"| {snr:g} | {worst:g} | {bound:g} | {100 * fraction:.1f} % "
                f"| {median:g} |"
            )
    closest = np.array(
        [
            g[np.argmin(np.where(i < 0.5, g, np.inf))] if np.any(i < 0.5) else np.nan
            for g, i in zip(gaps, ious, strict=True)
        ]
    )
    print()
    print(
        "Closest translation scoring IoU < 0.5: median D "
        f"{np.nanmedian(closest) * 100**2:.3g} at SNR 100, "
        f"{np.nanmedian(closest) * 30**2:.3g} at SNR 30 "
        f"({np.sum(np.isfinite(closest))} of {args.n} voxels have one)."
    )
    if args.rows:
        print()
        print(
            "| voxel | kind | cells | grid cells | IoU of each translation "
            "| D at SNR 100 |"
        )
        print("|---:|:---|---:|---:|:---|:---|")
        for v in range(args.n):
            print(
                f"| {v} | {kinds[v]} | {labels[v].max()} | {np.sum(labels[v] > 0)} "
                f"| {' '.join(f'{x:.2f}' for x in ious[v])} "
                f"| {' '.join(f'{x * 1e4:.2g}' for x in gaps[v])} |"
            )


if __name__ == "__main__":
    main()
