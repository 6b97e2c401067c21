"""Regenerates the tables of doc/validation/surface_check.md.

``--quick``: one substrate, a short search, one challenger; minutes, not
seconds: the demo's data are simulated and the search screens its shape
dictionary (run by the tests with -m slow).

Do descents from the answer's own descriptors find rivals? (issue 46, item 2)

A wrong answer that fits the data within the noise stays confident when the
search visits no other surface that fits as well
(``doc/validation/surface_check.md``). This measures whether challengers
would find such rivals: after ``SpinverseModel(fit_method="search")`` has
fitted the surface check's voxels (``--n`` held-out substrates of
``benchmarks/surface_check.py`` and the README demo's six closed boxes),
each answer's descriptors (restricted fraction, anisotropy, orientation;
its cell count and one more and one fewer) become
:func:`~dipy_spinverse.inverse.shapes.descriptor_starts` spheroids at
``--positions`` placements, and each is descended alone
(:func:`~dipy_spinverse.inverse.search.search_labels` with ``labels=``, the
answer's own permeability refinement on every acquisition). The answer is
descended the same way, so its chi-square is on the same footing.

Prints, per voxel: the answer's aligned IoU against the truth, its
uncertainty and chi-square over every acquisition, and each challenger's
chi-square / aligned IoU with the answer / with the truth. Two rival sets
are counted: challengers within the noise (chi-square below its 95 %
quantile) and within ``KEEP_CHI2`` of the better of answer and challengers
(a likelihood-ratio set), each a rival where its aligned IoU with the answer
is below ``RIVAL_IOU``.

    python benchmarks/challengers.py --case noise-free
"""

import argparse
import json
import time

import numpy as np
import torch
from scipy.stats import chi2
from surface_check import QUICK_SEARCH, _demo_protocol, held_out_voxels

from dipy_spinverse import SpinverseModel
from dipy_spinverse.geometry.descriptors import describe
from dipy_spinverse.geometry.metrics import aligned_overlap
from dipy_spinverse.inverse.search import search_labels
from dipy_spinverse.inverse.shapes import descriptor_starts
from dipy_spinverse.inverse.uncertainty import KEEP_CHI2, RIVAL_IOU
from dipy_spinverse.sim.signals import VoxelSignals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("noise-free", "snr"), default="noise-free")
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--seed", type=int, default=4601)
    parser.add_argument("--snr", type=float, default=100.0)
    parser.add_argument("--positions", type=int, default=3)
    parser.add_argument("--json", help="write the per-voxel rows here")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test, not a measurement"
    )
    args = parser.parse_args(argv)
    quick = {}
    if args.quick:
        args.n, args.positions, quick = 1, 1, QUICK_SEARCH
    torch.set_num_threads(2)
    protocol, _ = _demo_protocol()
    grid = SpinverseModel(protocol, preset="paper").grid
    truths, clean, noisy = held_out_voxels(
        grid, protocol, args.n, seed=args.seed, snr=args.snr, published=not args.quick
    )
    if args.case == "noise-free":
        signals, sigma = clean, 0.005
    else:  # the same noise draw as benchmarks/surface_check.py
        signals, sigma = noisy, 1.0 / args.snr
    model = SpinverseModel(protocol, sigma=sigma, **quick)
    start = time.perf_counter()
    fit = model.fit(1000 * signals[:, None, None], verbose=False)
    fit_seconds = (time.perf_counter() - start) / len(truths)
    answers = np.asarray(fit.labels)[:, 0, 0]
    uncertainty = np.asarray(fit.uncertainty)[:, 0, 0]

    voxels = VoxelSignals.from_raw(1000 * signals, model.protocol)
    data = torch.as_tensor(voxels.normalised, dtype=torch.float32)
    precision = torch.as_tensor(voxels.precision, dtype=torch.float32)
    owners, starts = _challengers(grid, answers, args.positions)
    owners = np.concatenate([np.arange(len(truths)), owners])
    starts = np.concatenate([answers, starts])
    start = time.perf_counter()
    found = search_labels(
        grid,
        data[owners],
        model.protocol,
        model.config,
        sim=dict(diffusivity=2e-3, dtype=torch.float32, device="cpu"),
        face_kappa=None,
        labels=starts,
        precision=precision[owners],
    )
    challenge_seconds = (time.perf_counter() - start) / len(truths)
    residual = found.predicted.numpy() - data[owners].numpy()
    chi_square = (residual**2 * precision[owners].numpy()).sum(1) / sigma**2
    within_noise = chi2.isf(0.05, data.shape[1])

    rows = []
    for v, truth in enumerate(truths):
        answer, inside = answers[v] > 0, truth.labels > 0
        others = np.flatnonzero(owners == v)[1:]
        challengers = [
            dict(
                chi2=float(chi_square[r]),
                iou_answer=_iou(grid, found.labels[r] > 0, answer),
                iou_truth=_iou(grid, found.labels[r] > 0, inside),
            )
            for r in others
        ]
        own = float(chi_square[v])
        best = min([own] + [c["chi2"] for c in challengers])
        rivals_noise = [
            c
            for c in challengers
            if c["chi2"] < within_noise and c["iou_answer"] < RIVAL_IOU
        ]
        rivals_ratio = [
            c
            for c in challengers
            if c["chi2"] <= best + KEEP_CHI2 and c["iou_answer"] < RIVAL_IOU
        ]
        rows.append(
            dict(
                kind=truth.kinds[0] if truth.n_cells == 1 else "multi",
                iou=_iou(grid, answer, inside),
                uncertainty=float(uncertainty[v]),
                chi2=own,
                answer_kept=bool(np.array_equal(found.labels[v] > 0, answer)),
                beaten=bool(best < own - KEEP_CHI2),
                rival_within_noise=len(rivals_noise) > 0,
                rival_likelihood_ratio=len(rivals_ratio) > 0,
                challengers=challengers,
            )
        )
        _print(v, rows[-1])
    print(
        f"\n{args.case}: fit {fit_seconds:.0f} s a voxel, challengers "
        f"{challenge_seconds:.0f} s a voxel ({len(owners) - len(truths)} descents); "
        f"chi-square within the noise below {within_noise:.0f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


def _challengers(grid, answers, positions):
    """Spheroid starts of each answer's descriptors, with one cell more and
    one fewer: (owner voxel, labelling) rows."""
    owners, starts = [], []
    for v, labels in enumerate(answers):
        d = describe(grid, labels)
        n = d["n_cells"]
        if n == 0:
            continue
        counts = np.array(sorted({n, n + 1, max(n - 1, 1)}), dtype=float)
        draws = dict(
            restricted_fraction=np.full(len(counts), d["restricted_fraction"]),
            n_cells=counts,
            anisotropy=np.full(len(counts), d["anisotropy"]),
            orientation=np.tile(d["orientation"], (len(counts), 1)),
        )
        shapes = descriptor_starts(grid, draws, n_positions=positions, seed=v)
        owners += [v] * len(shapes)
        starts.append(shapes)
    return np.array(owners, dtype=int), np.concatenate(starts)


def _iou(grid, inside, truth):
    return float(aligned_overlap(grid, inside, truth)["iou"])


def _print(v, row):
    best = sorted(row["challengers"], key=lambda c: c["chi2"])[:5]
    listed = " ".join(
        f"{c['chi2']:.0f}/{c['iou_answer']:.2f}/{c['iou_truth']:.2f}" for c in best
    )
    print(
        f"{v:2d} {row['kind'][:18]:18s} IoU {row['iou']:.2f} uncertainty "
        f"{row['uncertainty']:.2f} chi2 {row['chi2']:.0f} | rival within noise "
        f"{row['rival_within_noise']!s:5s} within {KEEP_CHI2:g} "
        f"{row['rival_likelihood_ratio']!s:5s} beaten {row['beaten']!s:5s} | "
        f"{listed}"
    )


if __name__ == "__main__":
    main()
