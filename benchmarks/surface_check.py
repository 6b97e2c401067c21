"""Regenerates the tables of doc/validation/surface_check.md.

``--quick``: one substrate, a short search, the shipped surface-check
estimator; minutes, not seconds: the demo's data are simulated and the search
screens its shape dictionary (-m slow).

Does the label search's uncertainty predict its error? (issue 46, item 2)

Draws ``--n`` held-out substrates in the label search's own closed box (the
default grid, 26.7 um, reflecting walls; 1-4 random cells of
:func:`~dipy_spinverse.geometry.substrates.random_substrates`) from
``--seed``, which no training used; ``--published`` adds the six closed
boxes of the README demo, which the search finds exactly (an uncertainty
that flags them is a false alarm). Simulates them on the demo's protocol,
noise-free and with Rician noise at ``--snr``, fits each through
``SpinverseModel(fit_method="search")`` and scores two uncertainties:
the search's own (``own``), and with the demo's surface check
(``checked``: at least the shipped posterior's volume bound,
:func:`~dipy_spinverse.reconst.posterior.surface_volume_bound`, computed
from the same answers as ``SpinverseModel(..., prior=)`` computes it).

Each answer is scored by the aligned IoU of its cells against the truth
(:func:`~dipy_spinverse.geometry.metrics.aligned_overlap`). Prints, per
noise level and uncertainty, the calibration table of issue 46 and its
targets: of the voxels with uncertainty < 0.1, the share with aligned IoU
>= 0.8 (target 90 %); of those with aligned IoU < 0.5, the share with
uncertainty >= 0.25 (target 90 %); confident wrong answers (IoU < 0.5,
uncertainty < 0.1, status OK; target none).

    python benchmarks/surface_check.py --n 12 --snr 100 --published
"""

import tempfile
import time
from types import SimpleNamespace

import harness
import numpy as np
import torch

from dipy_spinverse import SpinverseModel, simulate
from dipy_spinverse.data import (
    PHANTOM_VOXELS,
    demo_phantoms,
    make_phantom_dataset,
)
from dipy_spinverse.geometry.metrics import aligned_overlap
from dipy_spinverse.geometry.substrates import random_substrates
from dipy_spinverse.inverse import resolve_config
from dipy_spinverse.io.gradients import read_gradients
from dipy_spinverse.reconst import OK
from dipy_spinverse.reconst.noise import relative_noise
from dipy_spinverse.reconst.posterior import surface_volume_bound
from dipy_spinverse.reconst.surfaces import flag_uncertain_surfaces
from dipy_spinverse.sim.signals import VoxelSignals
from dipy_spinverse.workflows.spinverse import parse_posterior_options

BINS = (0.0, 0.1, 0.25, 0.5, 1.0 + 1e-9)


#: The label search's options of a ``--quick`` run: a few iterations, a
#: few steps (a smoke test of the script, not a measurement).
QUICK_SEARCH = dict(max_iter=2, search_steps=2, search_restarts=1)


def main(argv=None):
    parser = harness.parser(__doc__, seed=4601)
    parser.add_argument(
        "--n", type=int, default=24, help="held-out substrates (0: none)"
    )
    parser.add_argument("--snr", type=float, default=100.0)
    parser.add_argument(
        "--noise_free_sigma",
        type=float,
        default=0.005,
        help="sigma given to the models for the noise-free data (the check's "
        "posterior needs one; 0.005 is SNR 200)",
    )
    parser.add_argument(
        "--published",
        action="store_true",
        help="also fit the six closed boxes of the README demo",
    )
    parser.add_argument(
        "--restarts",
        type=int,
        default=None,
        help="descents of the label search (search_restarts; default the preset's)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.published = 1, False
    torch.set_num_threads(2)
    protocol, posterior = _demo_protocol()
    grid = SpinverseModel(protocol, preset="paper").grid
    substrates, clean, noisy = held_out_voxels(
        grid, protocol, args.n, seed=args.seed, snr=args.snr, published=args.published
    )
    cases = {
        "noise-free": (clean, args.noise_free_sigma),
        f"SNR {args.snr:g}": (noisy, 1.0 / args.snr),
    }
    options = {} if args.restarts is None else dict(search_restarts=args.restarts)
    search = {}
    if args.quick:
        search["max_iter"] = QUICK_SEARCH["max_iter"]
        options.update({k: v for k, v in QUICK_SEARCH.items() if k != "max_iter"})
    if options:
        search["preset"] = resolve_config("default", **options)
    for name, (signals, given) in cases.items():
        model = SpinverseModel(protocol, sigma=given, **search)
        start = time.perf_counter()
        fit = model.fit(1000 * signals[:, None, None], verbose=False)
        seconds = (time.perf_counter() - start) / len(substrates)
        own = _score(grid, substrates, fit)
        checked = _checked(
            SpinverseModel(protocol, sigma=given, **posterior), signals, own
        )
        _print(name, "own", own, seconds)
        _print(name, "checked", checked, seconds)


def held_out_voxels(grid, protocol, n, *, seed, snr, published):
    """The benchmark's voxels: ``n`` held-out substrates drawn from ``seed``
    (and the demo's six closed boxes if ``published``), their noise-free
    b0-normalised signals and one Rician draw at ``snr`` (seeded by ``seed``
    too)."""
    substrates = random_substrates(grid, n, seed=seed) if n else []
    if published:
        substrates += _published(grid)
    kappa = np.stack([s.face_permeability for s in substrates])
    clean = simulate(grid, kappa, protocol, diffusivity=2e-3).numpy()
    rng = np.random.default_rng(seed)
    sigma = 1.0 / snr
    noise = sigma * (
        rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape)
    )
    return substrates, clean, np.abs(clean + noise)


def _demo_protocol():
    """The demo's gradient table and surface-check options, read from its
    files as ``dipy_fit_spinverse`` reads them (the shipped posterior's
    key)."""
    with tempfile.TemporaryDirectory() as folder:
        paths = make_phantom_dataset(folder, tissue_voxels=False)
        table = read_gradients(
            paths["bvals"], paths["bvecs"], n_volumes=99, timing_file=paths["timing"]
        )
        with open(paths["surface_check"]) as f:
            posterior = parse_posterior_options(f.read(), 2e-3)
    return table, posterior


def _published(grid):
    """The demo's closed boxes, as substrates of one cell."""
    return [
        SimpleNamespace(
            labels=phantom.labels,
            face_permeability=phantom.permeability,
            n_cells=1,
            kinds=(f"published {shape}",),
            volumes=np.array([grid.cell_volumes[phantom.inside].sum()]),
        )
        for (_, shape, _, _), phantom in zip(
            PHANTOM_VOXELS, demo_phantoms(grid), strict=True
        )
    ]


def _checked(model, signals, rows):
    """The rows with the surface check's uncertainty and status."""
    fractions = np.array([r["found_fraction"] for r in rows])
    voxels = VoxelSignals.from_raw(signals, model.protocol)
    bound, outside = surface_volume_bound(
        model.estimator,
        voxels,
        fractions,
        relative=relative_noise(model.sigma, voxels.s0),
        n_samples=model.n_posterior_samples,
    )
    # The model's own rule (reconst.surfaces), on the search's answers.
    result = dict(
        status=np.array([r["status"] for r in rows]),
        uncertainty=np.fmax([r["uncertainty"] for r in rows], bound),
    )
    flag_uncertain_surfaces(result, np.arange(len(rows)))
    return [
        dict(row, uncertainty=float(u), status=int(s), bound=float(b), outside=bool(o))
        for row, u, s, b, o in zip(
            rows, result["uncertainty"], result["status"], bound, outside, strict=True
        )
    ]


def _score(grid, substrates, fit):
    labels = np.asarray(fit.labels)[:, 0, 0]
    uncertainty = np.asarray(fit.uncertainty)[:, 0, 0]
    status = np.asarray(fit.status)[:, 0, 0]
    rows = []
    for i, sub in enumerate(substrates):
        iou = aligned_overlap(grid, labels[i] > 0, sub.labels > 0)["iou"]
        rows.append(
            dict(
                iou=float(iou),
                uncertainty=float(uncertainty[i]),
                status=int(status[i]),
                n_cells=int(sub.n_cells),
                kind=sub.kinds[0] if sub.n_cells == 1 else "multi",
                true_fraction=float(sub.volumes.sum() / grid.volume),
                found_fraction=float(
                    grid.cell_volumes[labels[i] > 0].sum() / grid.volume
                ),
            )
        )
    return rows


def summary(rows):
    iou = np.array([r["iou"] for r in rows])
    u = np.array([r["uncertainty"] for r in rows])
    ok = np.array([r["status"] == OK for r in rows])
    sure, wrong = u < 0.1, iou < 0.5
    return dict(
        n=len(rows),
        iou_median=float(np.median(iou)),
        sure=int(sure.sum()),
        sure_right=float(np.mean(iou[sure] >= 0.8)) if sure.any() else float("nan"),
        wrong=int(wrong.sum()),
        wrong_flagged=float(np.mean(u[wrong] >= 0.25)) if wrong.any() else float("nan"),
        confident_wrong=int(np.sum(wrong & sure & ok)),
        bins=[
            dict(
                low=lo,
                high=min(hi, 1.0),
                n=int(np.sum((u >= lo) & (u < hi))),
                iou_median=float(np.median(iou[(u >= lo) & (u < hi)]))
                if np.any((u >= lo) & (u < hi))
                else float("nan"),
                expected=float(np.mean(1 - iou[(u >= lo) & (u < hi)]))
                if np.any((u >= lo) & (u < hi))
                else float("nan"),
            )
            for lo, hi in zip(BINS[:-1], BINS[1:], strict=True)
        ],
    )


def _print(name, check, rows, seconds):
    s = summary(rows)
    print(f"\n{name}, {check} uncertainty ({s['n']} voxels, {seconds:.1f} s a voxel)")
    titles = ["uncertainty", "voxels", "median aligned IoU", "mean 1 - IoU"]
    print(harness.head(titles, "-rrr", spaced=True))
    for b in s["bins"]:
        cells = [f"{b['low']:.2f}-{b['high']:.2f}", b["n"], f"{b['iou_median']:.2f}"]
        print(harness.row([*cells, f"{b['expected']:.2f}"]))
    print(
        f"uncertainty < 0.1: {s['sure']} voxels, {100 * s['sure_right']:.0f} % with "
        f"IoU >= 0.8 (target 90 %); IoU < 0.5: {s['wrong']} voxels, "
        f"{100 * s['wrong_flagged']:.0f} % with uncertainty >= 0.25 (target 90 %); "
        f"confident wrong (IoU < 0.5, uncertainty < 0.1, status ok): "
        f"{s['confident_wrong']}; median aligned IoU {s['iou_median']:.2f}"
    )
    for r in rows:
        if r["kind"].startswith("published"):
            print(
                f"  {r['kind']}: aligned IoU {r['iou']:.2f}, uncertainty "
                f"{r['uncertainty']:.2f}, status {r['status']}"
            )


if __name__ == "__main__":
    main()
