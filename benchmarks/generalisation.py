"""Regenerates the tables of doc/validation/generalisation.md.

``--quick``: one paper-physics voxel, a short search; minutes, not seconds:
the search screens its shape dictionary (-m slow).

Recovery of held-out random substrates: does the inversion generalise?

Draws ``--n`` random substrates (:mod:`dipy_spinverse.geometry.substrates`;
1-4 cells of seven kinds) from ``--seed``, simulates their signals on the
published protocol, inverts them with the ``"default"`` preset (its
generic-shape dictionary and face field as the search's starts) and scores
every voxel against the truth and its point inversion through the voxel
centre (magnitude data cannot tell them apart; the better is kept).
Physics:

``paper``
    The published grid (576 cells, absorbing wall 0.1 m/s), targets on the
    same grid, noise-free.
``snr100``, ``snr30``
    A reflecting voxel with extracellular water; targets drawn and simulated
    on a grid twice as fine (5,376 cells) and carried to the fit's grid by
    the fine cell at each coarse centroid; Rician noise at that SNR
    (relative to each sequence's b = 0 signal), ``sigma`` given; with
    ``--approximation N`` the fit takes the fit grid's approximation error
    (:mod:`dipy_spinverse.inverse.approximation`) over N substrates into
    account.

Prints one table per physics: per family (the kind of a one-cell voxel;
"multi" when there are several cells) and overall, the median and 10th
percentile of IoU (the answer's cells against the true cells), the median
face F1 and Chamfer distance (um; infinite for a voxel without any cell),
the per-cell permeability error ``|found / true - 1|`` over the cells whose
best-matching found cell has IoU >= 0.9, the time per voxel (one-off caches
excluded, each physics from an empty signal cache) and, with noise, the
chi-square of the answer against the truth's, the share flagged
``POOR_FIT``, and how many wrong answers (IoU < 0.5) the uncertainty map
marks (>= 0.25).

``--rows FILE`` appends each batch's voxels to a JSON-lines file as they
are scored and reads the voxels already there (same physics and settings)
instead of fitting them again, so a long run resumes. The targets'
noise-free signals are kept in the package's cache folder
(``$DIPY_SPINVERSE_CACHE/generalisation``): a resumed run does not simulate
them again (18 minutes for the 200 fine-grid targets).

    python benchmarks/generalisation.py --n 200 --physics snr100 \\
        --approximation 32 --batch 8 --rows snr100_rows.jsonl
"""

import hashlib
import json
import os
import platform
import time
from collections import defaultdict

import harness
import numpy as np
import torch

import dipy_spinverse
from dipy_spinverse import TetGrid, published_protocol, simulate
from dipy_spinverse.files import atomic_write, cache_root, writable_folder
from dipy_spinverse.geometry.metrics import (
    aligned_overlap,
    all_metrics,
    cell_inversion,
    cell_overlap,
)
from dipy_spinverse.geometry.substrates import random_substrates
from dipy_spinverse.geometry.topology import cell_table
from dipy_spinverse.inverse import prepare, reconstruct, resolve_config
from dipy_spinverse.inverse.approximation import APPROXIMATION_SEED
from dipy_spinverse.inverse.cache import SIGNAL_CACHE
from dipy_spinverse.inverse.fields import label_field
from dipy_spinverse.reconst.status import poor_fits
from dipy_spinverse.sim.forward import update_digest
from dipy_spinverse.sim.signals import data_loss, noise_precision, normalise_b0

#: Part of the cache key of the targets' signals (:func:`simulated`), as the
#: package's own caches have one: bump it when the forward model's results
#: change, or the cached targets of the old model would be read back.
TARGETS_VERSION = 1

#: Intrinsic diffusivity of the targets and the fits (mm^2/s; the package's
#: default).
DIFFUSIVITY = 2e-3

SIZE, N = 80 / 3, 4  # the published box and lattice
PHYSICS = ("paper", "snr100", "snr30")
HELD_OUT_SEED = 7
# A reading of the uncertainty map, for the table only: an expected 1 - IoU
# of a quarter or more says "do not trust this surface".
FLAG = 0.25


def targets(physics, n, seed):
    """(grid, truth labels, true per-cell permeability, signals, sigma, kinds)."""
    if physics == "paper":
        grid = TetGrid.bcc(SIZE, N, boundary="absorbing", wall_permeability=0.1)
        fine = grid
    else:
        grid = TetGrid.bcc(SIZE, N)
        fine = TetGrid.bcc(SIZE, 2 * N)
    subs = random_substrates(fine, n, seed=seed)
    protocol = published_protocol()
    signal = simulated(fine, np.stack([s.face_permeability for s in subs]), protocol)
    sigma = 0.0
    if physics != "paper":
        snr = float(physics.removeprefix("snr"))
        sigma = 1 / snr
        rng = np.random.default_rng(seed)
        scale = np.empty_like(signal)
        for _, idx in protocol.groups():
            b0 = signal[:, idx[protocol.bvals[idx] == 0]].mean(1, keepdims=True)
            scale[:, idx] = b0 / snr
        noise = rng.normal(size=(2,) + signal.shape) * scale
        signal = np.hypot(signal + noise[0], noise[1])
    labels = np.stack([_carry(fine, grid, s.labels) for s in subs])
    kappas = [np.asarray(s.permeability) for s in subs]
    kinds = [
        s.kinds[int(np.argmax(s.volumes))] if s.n_cells == 1 else "multi" for s in subs
    ]
    return grid, protocol, labels, kappas, signal, sigma, kinds


def simulated(grid, field, protocol):
    """Noise-free signals of the face fields ``field`` on ``grid``, from the
    disk cache (``generalisation/`` in :func:`dipy_spinverse.files.cache_root`)
    when an earlier run simulated the same ones: the 200 fine-grid targets
    take about 18 minutes on 2 CPU cores, which every resumed ``--rows`` run
    paid again."""
    field = np.ascontiguousarray(field, dtype=np.float64)
    meta = dict(
        version=TARGETS_VERSION,
        package=dipy_spinverse.__version__,
        diffusivity=DIFFUSIVITY,
        torch=torch.__version__,
    )
    key = update_digest(hashlib.sha256(), grid, protocol, **meta)
    key.update(field.tobytes())
    path = cache_root() / "generalisation" / f"targets-{key.hexdigest()[:32]}.npy"
    if path.is_file():
        return np.load(path)
    with torch.no_grad():
        signal = simulate(grid, field, protocol, diffusivity=DIFFUSIVITY)
    signal = signal.numpy().astype(float)
    writable_folder(path.parent, "simulated targets")
    with atomic_write(path) as tmp:
        np.save(tmp, signal)
    return signal


def _carry(fine, grid, labels):
    """Labels of the fine grid at the coarse grid's cell centroids."""
    if fine is grid:
        return np.asarray(labels)
    from scipy.spatial import cKDTree

    _, nearest = cKDTree(fine.cell_centroids).query(grid.cell_centroids)
    return np.asarray(labels)[nearest]


def score(grid, labels, kappa_true, found, permeability):
    """IoU, face F1, Chamfer (um) and per-cell permeability errors.

    Twin-aware: the truth or its point inversion, whichever fits better
    (:func:`~dipy_spinverse.geometry.metrics.all_metrics` with ``twin=True``).
    """
    faces = grid.face_cells
    true_barrier = labels[faces[:, 0]] != labels[faces[:, 1]]
    barrier = found[faces[:, 0]] != found[faces[:, 1]]
    m = all_metrics(
        grid, barrier, true_barrier=true_barrier, true_labels=labels, twin=True
    )
    truth = labels[cell_inversion(grid)] if m["twin"] else labels
    # The answer's cells against the true cells, both labellings: a perfect
    # answer scores 1. (The enclosure of the answer's barrier against the true
    # labels, m["iou_labels"], also counts the water trapped between touching
    # cells or against the wall: 0.84-1.00, median 0.98, for perfect answers.)
    iou = cell_overlap(grid, found > 0, truth > 0)["iou"]
    # Beside it, forgiving what magnitude data cannot see: the truth moved by
    # any lattice translation of a periodic voxel, and inverted (issue 46).
    aligned = aligned_overlap(grid, found > 0, labels > 0)["iou"]
    kappa_found = cell_table(grid, found, permeability)["permeability"]
    errors = []
    for k, kappa in enumerate(kappa_true, start=1):
        cell = truth == k
        # A true cell too small for the fit's grid, or a label the answer
        # skips, has an empty union: no overlap (it was 0 / 0 = NaN, which
        # max() then ranked by its position in the list).
        overlaps = [
            np.sum(cell & (found == j)) / max(np.sum(cell | (found == j)), 1)
            for j in range(1, int(found.max()) + 1)
        ]
        if overlaps and max(overlaps) >= 0.9:
            errors.append(abs(kappa_found[int(np.argmax(overlaps))] / kappa - 1))
    return dict(
        iou=iou,
        aligned_iou=aligned,
        f1=m["f1"],
        chamfer=m["chamfer_um"],
        kappa_errors=errors,
    )


def _warm_caches(grid, protocol, options, device):
    """Estimate the approximation error (or read it from the cache) before
    the timer starts: a one-off cost, not per voxel."""
    config = resolve_config("default", **options)
    if not config.approximation.n_substrates:
        return
    start = time.perf_counter()
    prepare(
        grid,
        protocol,
        config,
        diffusivity=DIFFUSIVITY,
        dtype=torch.float32,
        device=device,
    )
    seconds = time.perf_counter() - start
    print(f"  caches ready in {seconds:.1f} s (not in the time per voxel)")


def run(physics, args):
    # Each physics starts with an empty signal cache: the realistic ones share
    # grid and protocol, and the second would reuse the first's simulations
    # (SNR 30 after SNR 100: 64 s per voxel against 150 s from cold).
    SIGNAL_CACHE.clear()
    grid, protocol, labels, kappas, signal, sigma, kinds = targets(
        physics, args.n, args.seed
    )
    options = {}
    if sigma:
        options["sigma"] = sigma
    if args.approximation and physics != "paper":
        options["approximation_error"] = args.approximation
    if getattr(args, "quick", False):
        options.update(max_iter=2, search_steps=2)
    _warm_caches(grid, protocol, options, args.device)
    key = _settings(physics, args)
    done = _stored_rows(args.rows, key, args.n)
    todo = [i for i in range(args.n) if i not in done]
    if done:
        print(f"  {physics}: {len(done)} voxels read from {args.rows}", flush=True)
    for batch in (todo[i : i + args.batch] for i in range(0, len(todo), args.batch)):
        start = time.perf_counter()
        result = reconstruct(
            grid,
            signal[batch],
            protocol,
            preset="default",
            diffusivity=DIFFUSIVITY,
            device=args.device,
            **options,
        )
        truth = [label_field(grid, labels[i], kappas[i], 0.1) for i in batch]
        # As SpinverseModel flags it: a misfit the noise cannot explain.
        poor = poor_fits(
            result.loss, result.config, len(protocol), level=result.noise_level
        )
        gaps = chi_square(grid, protocol, signal[batch], result.permeability, sigma)
        gaps -= chi_square(grid, protocol, signal[batch], np.array(truth), sigma)
        seconds = (time.perf_counter() - start) / len(batch)
        new = []
        for v, i in enumerate(batch):
            new.append(
                score(
                    grid, labels[i], kappas[i], result.labels[v], result.permeability[v]
                )
                | dict(
                    kind=kinds[i],
                    uncertainty=float(result.uncertainty[v]),
                    chi2_gap=float(gaps[v]),
                    poor_fit=bool(poor[v]),
                    index=i,
                    seconds=seconds,
                )
            )
        done.update((row["index"], row) for row in new)
        _append_rows(args.rows, key, new)
        print(f"  {physics}: {len(done)}/{args.n} voxels", flush=True)
    rows = [done[i] for i in range(args.n)]
    # Time per voxel: the mean over the voxels' batches (rows read from
    # --rows keep the time of the run that fitted them).
    return rows, float(np.mean([row["seconds"] for row in rows]))


def _settings(physics, args):
    """What a row's numbers depend on (rows of other settings are not mixed)."""
    key = dict(physics=physics, seed=args.seed, batch=args.batch)
    if physics != "paper":
        key["approximation"] = args.approximation
    return key


def _stored_rows(path, key, n):
    """{index: row} of the rows in the JSON-lines file ``path`` fitted with
    the settings ``key`` (substrates below ``n``); none without a file.
    Rows of the same physics with other settings are refused: their numbers
    are not comparable."""
    if path is None or not os.path.exists(path):
        return {}
    rows = {}
    with open(path) as f:
        for line in f:
            stored = json.loads(line)
            if stored["settings"]["physics"] != key["physics"]:
                continue
            if stored["settings"] != key:
                raise SystemExit(
                    f"--rows {path} holds {key['physics']} rows fitted with "
                    f"{stored['settings']}, not {key}; give another file."
                )
            row = stored["row"]
            if row["chamfer"] is None:
                row["chamfer"] = float("inf")  # stored as null
            if row["chi2_gap"] is None:
                row["chi2_gap"] = float("nan")
            if row["index"] < n:
                rows[row["index"]] = row
    return rows


def _append_rows(path, key, rows):
    """Append ``rows`` to the JSON-lines file ``path`` (if any), one line each,
    so that an interrupted run keeps its voxels."""
    if path is None:
        return
    with open(path, "a") as f:
        for row in rows:
            line = dict(settings=key, row=row)
            f.write(json.dumps(_finite_or_none(line), allow_nan=False) + "\n")


def chi_square(grid, protocol, signals, fields, sigma):
    """Chi-square of each voxel's fields against its signals (NaN without noise)."""
    if not sigma:
        return np.full(len(signals), np.nan)
    raw = torch.as_tensor(signals)
    with torch.no_grad():
        pred = simulate(grid, fields, protocol, diffusivity=DIFFUSIVITY)
        pred = normalise_b0(pred, protocol)
        loss = data_loss(
            pred,
            normalise_b0(raw, protocol),
            loss_scale=1.0,
            sigma=sigma,
            noise="rician",
            precision=noise_precision(raw, protocol),
        )
    return loss.numpy() * len(protocol) / sigma**2


def summary(rows, per_voxel):
    """The table's numbers for some rows (NaN where undefined)."""
    iou = np.array([r["iou"] for r in rows])
    gap = np.array([r["chi2_gap"] for r in rows])
    poor = np.array([r.get("poor_fit", False) for r in rows])
    errors = np.concatenate([r["kappa_errors"] for r in rows] + [[]])
    uncertainty = np.array([r["uncertainty"] for r in rows])
    wrong = iou < 0.5

    def stat(values, q):
        if not len(values):
            return float("nan")
        # np.median, not np.percentile(50): an infinite Chamfer distance of one
        # voxel (no cell) would turn the interpolation into NaN.
        return float(np.median(values) if q == 50 else np.percentile(values, q))

    noisy = not np.isnan(gap).all()  # no chi-square without noise
    return dict(
        n=len(rows),
        iou_median=stat(iou, 50),
        iou_p10=stat(iou, 10),
        aligned_iou_median=stat([r.get("aligned_iou", np.nan) for r in rows], 50),
        f1_median=stat([r["f1"] for r in rows], 50),
        # A voxel without any cell has an infinite Chamfer distance; the
        # median still says where most voxels are.
        chamfer_median_um=stat([r["chamfer"] for r in rows], 50),
        kappa_error_median=stat(errors, 50),
        kappa_error_p10=stat(errors, 10),
        kappa_error_p90=stat(errors, 90),
        kappa_cells_scored=len(errors),
        kappa_within_25_percent=float(np.mean(errors <= 0.25)) if len(errors) else None,
        uncertainty_median=stat(uncertainty, 50),
        chi2_gap_median=stat(gap, 50) if noisy else float("nan"),
        found_fits_as_well=float(np.mean(gap <= 0)) if noisy else float("nan"),
        poor_fit=float(np.mean(poor)) if noisy else float("nan"),
        iou_median_not_poor=stat(iou[~poor], 50) if noisy else float("nan"),
        wrong=int(wrong.sum()),
        wrong_flagged=int(np.sum(wrong & (uncertainty >= FLAG))),
        seconds_per_voxel=per_voxel,
        voxels_per_minute=60.0 / per_voxel,
    )


def families(rows, per_voxel):
    """Summaries per family (the kind of a one-cell voxel, else "multi"), then
    "all"."""
    groups = defaultdict(list)
    for row in rows:
        groups[row["kind"]].append(row)
    names = sorted(groups) + ["all"]
    groups["all"] = rows
    return {name: summary(groups[name], per_voxel) for name in names}


def table(physics, summaries):
    per_voxel = summaries["all"]["seconds_per_voxel"]
    print(
        f"\n{physics}: {summaries['all']['n']} held-out substrates, "
        f"{per_voxel:.1f} s per voxel ({60 / per_voxel:.2f} voxels per minute)"
    )
    columns = {
        "n": "n",
        "iou_median": "IoU median",
        "iou_p10": "IoU p10",
        "aligned_iou_median": "aligned IoU median",
        "f1_median": "F1 median",
        "chamfer_median_um": "Chamfer median (um)",
        "kappa_error_median": "kappa error median",
        "kappa_error_p10": "kappa error p10",
        "kappa_error_p90": "kappa error p90",
        "kappa_within_25_percent": "kappa within 25 % (cells of IoU >= 0.9)",
        "uncertainty_median": "uncertainty median",
        "chi2_gap_median": "chi2 found - truth median",
        "found_fits_as_well": "found fits >= truth",
        "poor_fit": "POOR_FIT",
        "iou_median_not_poor": "IoU median, not POOR_FIT",
    }
    titles = ["family", *columns.values()]
    titles += [f"wrong (IoU < 0.5) with uncertainty >= {FLAG}"]
    print(harness.head(titles, "-" + "r" * (len(columns) + 1), spaced=True))
    for name, numbers in summaries.items():
        cells = [_cell(numbers[key], key) for key in columns]
        flagged = f"{numbers['wrong_flagged']}/{numbers['wrong']}"
        print(harness.row([name, *cells, flagged]))


def _cell(value, key):
    """A table cell: "-" where a number is undefined (NaN, or None)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if key == "n":
        return str(value)
    return f"{value:.1f}" if key == "chi2_gap_median" else f"{value:.2f}"


def main(argv=None):
    parser = harness.parser(__doc__, seed=HELD_OUT_SEED)
    parser.add_argument("--n", type=int, default=200, help="substrates per physics")
    parser.add_argument("--physics", nargs="+", default=list(PHYSICS), choices=PHYSICS)
    parser.add_argument("--batch", type=int, default=8, help="voxels per call")
    parser.add_argument(
        "--approximation",
        type=int,
        default=0,
        help="approximation_error substrates (realistic physics only; 0: off)",
    )
    parser.add_argument("--device", default="cpu", help="torch device of the fits")
    parser.add_argument(
        "--rows",
        default=None,
        help="JSON-lines file: each batch's voxels are appended to it as they are "
        "scored, and voxels already in it (same physics and settings) are read, "
        "not fitted again, so an interrupted run resumes",
    )
    args = parser.parse_args(argv)
    if args.quick:  # one voxel, paper physics, a short search
        args.n, args.physics, args.batch = 1, ["paper"], 1
    if args.seed == APPROXIMATION_SEED:
        parser.error(
            f"--seed {args.seed} estimates the approximation error; pick another."
        )
    if args.n < 1 or args.batch < 1:
        parser.error("--n and --batch must be at least 1.")
    device = args.device
    if torch.device(device).type == "cuda":
        device = torch.cuda.get_device_name(torch.device(device))
    print(
        f"seed {args.seed}; {platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {device}"
    )
    for physics in args.physics:
        rows, per_voxel = run(physics, args)
        table(physics, families(rows, per_voxel))


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    main()
