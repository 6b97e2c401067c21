"""
Compartment models versus Spinverse on the same simulated voxels
================================================================

Three synthetic voxels the inversion has never seen -- held-out random
substrates (:mod:`dipy_spinverse.geometry.substrates`): a capsule, a bent tube and
two touching cells, each cell with its own membrane permeability -- are drawn
and simulated with the package's own Bloch-Torrey solver
(:func:`dipy_spinverse.simulate`) on a grid twice as fine as the fit's, inside
a reflecting outer wall, so that the extracellular water stays in the voxel.
The same noisy signals (published three-sequence PGSE protocol, Rician noise
at SNR 100) are fitted by NODDI, ActiveAx and the Karger exchange model
(:mod:`dipy_spinverse.compartments`) and inverted by Spinverse
(:func:`dipy_spinverse.reconstruct`) on the published 576-cell grid. Every
estimate is set beside the ground truth of the substrate: intracellular
volume fraction, diameter, surface-to-volume ratio, per-cell membrane
permeability and exchange rate, plus the face F1 and IoU of the recovered
interface against the substrate carried to the fit's grid.

Run ``python examples/compare_compartment_models.py --out compare_output``
(250 s on 2 CPU cores, of which 48 s estimating the fit grid's approximation
error the first time, cached on disk afterwards);
``--quick`` runs a tiny version in seconds whose numbers mean nothing (a smoke
test). The measured table and its discussion are in
``doc/validation/compare_compartment_models.md``.
"""

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from dipy.core.gradients import gradient_table  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from dipy_spinverse import (  # noqa: E402
    ActiveAxModel,
    ExchangeModel,
    NoddiModel,
    TetGrid,
    all_metrics,
    cell_overlap,
    published_protocol,
    reconstruct,
    simulate,
)
from dipy_spinverse.geometry.metrics import cell_inversion, inversion_twin  # noqa: E402
from dipy_spinverse.geometry.substrates import random_substrate  # noqa: E402
from dipy_spinverse.geometry.topology import cell_table, enclosed_cells  # noqa: E402
from dipy_spinverse.inverse.proposal import TRAINING_SEED  # noqa: E402
from dipy_spinverse.sim.analytic import exchange_rates  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
parser.add_argument("--out", default="compare_output", help="output directory")
parser.add_argument("--seed", type=int, default=0, help="seed of the Rician noise")
parser.add_argument(
    "--substrate-seed",
    type=int,
    default=1,
    help="seed of the random substrates (never the proposal's training seed)",
)
parser.add_argument(
    "--quick",
    action="store_true",
    help="tiny grid, few directions and iterations (smoke test only)",
)
args, _ = parser.parse_known_args()
if args.substrate_seed == TRAINING_SEED:
    parser.error(
        f"--substrate-seed {TRAINING_SEED} is the learned proposal's training seed; "
        "pick another so that the voxels are held out."
    )
os.makedirs(args.out, exist_ok=True)
wall_start = time.perf_counter()

# %%
# Three held-out substrates on a fine grid
# ----------------------------------------
# The fit's grid is the published one: a 26.7 um box cut into 4^3 cubes, 576
# tetrahedra of about 6.7 um. With ``boundary="reflecting"`` the outer wall is
# impermeable (only whole octahedra are kept, so the wall is jagged). The
# targets are drawn and simulated on the same box cut twice as finely (8^3
# cubes, 5,376 cells of about 3.3 um), so their membranes are staircases the
# fit's grid cannot draw exactly -- as in a real voxel, where no membrane
# follows the fit's grid.
#
# :func:`~dipy_spinverse.geometry.substrates.random_substrate` draws cells of a given
# kind at random size, orientation and position, one seed per call
# (``--substrate-seed``, 1 by default, the same for all three voxels). The
# learned proposal is trained on substrates drawn from ``TRAINING_SEED``
# (20260; the script refuses it), so these voxels are held out from it; the
# label-search dictionary holds none of these shapes either. Each cell must
# fill at least 4 % of the voxel (about 27 of the fit's cells), since a
# smaller one is a handful of coarse cells that no method can size. The
# permeabilities are drawn log-uniformly in 1e-5 to 1e-4 m/s: inside the
# published range (1e-6 to 1e-4 m/s), restricted to where the default
# preset's permeability grid (1e-5 to 2e-4 m/s) reaches.
if args.quick:
    size, n_cubes = 8.0, 2
else:
    size, n_cubes = 80 / 3, 4
grid = TetGrid.bcc(size, n_cubes, boundary="reflecting")
fine = TetGrid.bcc(size, 2 * n_cubes, boundary="reflecting")
draw = dict(
    rng=args.substrate_seed,
    permeability_range=(1e-5, 1e-4),
    min_cell_volume=0.04 * fine.volume,
)
voxels = {
    "capsule": random_substrate(fine, n_cells=1, kinds="capsule", **draw),
    "bent tube": random_substrate(fine, n_cells=1, kinds="bent_tube", **draw),
    "two touching cells": random_substrate(
        fine, n_cells=2, kinds=("ellipsoid", "capsule"), touching=True, **draw
    ),
}
names = list(voxels)
DIFFUSIVITY = 2e-3  # mm^2/s, the simulator's default, everywhere in the voxel


def carry_labels(source, target, labels):
    """Labels of ``source`` at the cell centroids of ``target``.

    Each cell of ``target`` takes the label of the ``source`` cell whose
    centroid is nearest its own (``benchmarks/generalisation.py`` scores the
    same way).

    Parameters
    ----------
    source, target : TetGrid
    labels : ndarray of int (source.n_cells,)

    Returns
    -------
    ndarray of int (target.n_cells,)
    """
    _, nearest = cKDTree(source.cell_centroids).query(target.cell_centroids)
    return np.asarray(labels)[nearest]


def label_barrier(on_grid, labels):
    """Faces between cells of different labels (the membranes)."""
    a, b = labels[on_grid.face_cells].T
    return a != b


def exchange_rate(on_grid, labels, permeability):
    """Barrier-limited intra -> extracellular exchange rate, 1/s.

    ``k_ie = sum(kappa A) / V_in`` over the faces between a cell and the
    extracellular space (:func:`~dipy_spinverse.sim.analytic.exchange_rates` with
    the area-weighted mean permeability of those faces); faces between two
    touching cells do not reach the extracellular water and do not count.
    """
    labels = np.asarray(labels)
    a, b = labels[on_grid.face_cells].T
    outer = (a > 0) != (b > 0)
    area = on_grid.face_areas[outer]
    if not area.size:
        return np.nan
    kappa = np.average(np.asarray(permeability, float)[outer], weights=area)
    volumes = on_grid.cell_volumes
    inside = float(volumes[labels > 0].sum())
    k_ie, _ = exchange_rates(kappa, area.sum(), inside, volumes.sum() - inside)
    return float(k_ie) * 1e6  # 1/us -> 1/s


# %%
# Ground truth of each voxel, from the fine-grid substrate: the intracellular
# volume fraction (cell volumes over the grid's volume), the diameter the
# capsule and the tube were drawn with (twice their ``params`` radius; the
# touching pair mixes an ellipsoid and a capsule, so it has none), the
# surface-to-volume ratio of the fine staircase membrane (each cell's
# membrane area, a face between two touching cells counting for both cells
# since each has its own membrane, over the cells' volume; the staircase of a
# tetrahedral grid has more area than the smooth shape), each cell's
# membrane permeability and the barrier-limited exchange rate
# ``k_ie = kappa A / V_in`` (valid here since ``kappa R / D << 1``). The
# capsule is straight, so its orientation dispersion (ODI) is 0.
truth, carried = {}, {}
for name, sub in voxels.items():
    params = sub.params[0]
    truth[name] = dict(
        intra=float(sub.volumes.sum() / fine.volume),
        diameter=2 * params["radius"] if sub.n_cells == 1 else np.nan,
        s_to_v=float(sub.surface_areas.sum() / sub.volumes.sum()),
        odi=0.0 if sub.kinds == ("capsule",) else np.nan,
        kappa=np.asarray(sub.permeability, float),
        rate=exchange_rate(fine, sub.labels, sub.face_permeability),
        cells=sub.n_cells,
    )
    carried[name] = carry_labels(fine, grid, sub.labels)
    print(
        f"{name}: {sub!r}; on the fit's grid {int((carried[name] > 0).sum())} "
        f"inside cells of {grid.n_cells}"
    )

# %%
# Signals
# -------
# The published protocol: PGSE with (delta, Delta) = (5, 6), (10, 20) and
# (10, 60) ms, b = 0 to 5000 s/mm^2, 30 directions per shell (540
# acquisitions) -- several diffusion times, which ActiveAx and the exchange
# model need. One batched :func:`~dipy_spinverse.simulate` call on the fine
# grid (float32: its error, about 1e-6, is far below the noise, and it is
# twice as fast as float64 here), then Rician noise: the magnitude of the
# signal plus complex Gaussian noise of standard deviation 1 / SNR (S0 = 1).
protocol = published_protocol(n_directions=6 if args.quick else 30)
field = np.stack([sub.face_permeability for sub in voxels.values()])
start = time.perf_counter()
with torch.no_grad():
    clean = simulate(
        fine, field, protocol, diffusivity=DIFFUSIVITY, dtype=torch.float32
    ).numpy()
clean = clean.astype(float)
print(f"targets simulated on the fine grid in {time.perf_counter() - start:.0f} s")
sigma = 1 / 100
rng = np.random.default_rng(args.seed)
noise = sigma * rng.standard_normal((2, *clean.shape))
signal = np.hypot(clean + noise[0], noise[1])

# %%
# The compartment models take a DIPY gradient table; the timing of each
# volume comes from the protocol's waveforms (seconds). Every model is given
# the true intrinsic diffusivity (2e-3 mm^2/s) instead of its in-vivo default,
# and ActiveAx a diameter range up to 40 um (its default stops at 20 um); the
# Karger model fits its diffusivities itself.
gtab = gradient_table(
    protocol.bvals,
    bvecs=protocol.bvecs,
    big_delta=np.array([w.big_delta for w in protocol.waveforms]),
    small_delta=np.array([w.small_delta for w in protocol.waveforms]),
    b0_threshold=0,
)
TAU_BOUNDS = (2e-3, 2.0)  # s, the Karger model's default range
few = dict(max_iter=10) if args.quick else {}
grid_dirs = dict(n_grid_directions=20) if args.quick else {}
models = {
    "NODDI": NoddiModel(gtab, d_par=DIFFUSIVITY, d_iso=DIFFUSIVITY, **few, **grid_dirs),
    "ActiveAx": ActiveAxModel(
        gtab,
        d_par=DIFFUSIVITY,
        d_iso=DIFFUSIVITY,
        diameter_bounds=(0.2, 40.0),
        **few,
        **grid_dirs,
    ),
    "Karger": ExchangeModel(gtab, exchange_time_bounds=TAU_BOUNDS, **few),
}
fits, seconds, predicted = {}, {}, {}
for key, model in models.items():
    start = time.perf_counter()
    fits[key] = model.fit(signal)
    seconds[key] = time.perf_counter() - start
    predicted[key] = fits[key].predict()

# %%
# What each model calls the intracellular compartment: NODDI's neurites
# (``(1 - fiso) ndi`` of the voxel), ActiveAx's cylinders (``fic``), the
# Karger model's slow compartment (``f_intra``). ActiveAx's diameter implies a
# surface-to-volume ratio ``4 / d`` (a cylinder's, whatever the shape), and
# the Karger exchange time ``tau`` a rate ``1 / tau``; its default range of
# tau ends at 2 s, and an estimate at that end means "no exchange seen".
noddi, activeax, karger = fits["NODDI"], fits["ActiveAx"], fits["Karger"]
estimates = {
    "NODDI": dict(intra=(1 - noddi.fiso) * noddi.ndi, odi=noddi.odi),
    "ActiveAx": dict(
        intra=activeax.fic, diameter=activeax.diameter, s_to_v=4 / activeax.diameter
    ),
    "Karger": dict(intra=karger.f_intra, rate=karger.exchange_rate),
}
tau_at_bound = karger.exchange_time >= 0.99 * TAU_BOUNDS[1]

# %%
# Spinverse
# ---------
# :func:`~dipy_spinverse.reconstruct` on the fit's (coarse) grid with its
# ``"default"`` preset (the one meant for realistic voxels; the script prints
# its curriculum and the number of label-search steps) and the known noise
# level ``sigma``, all three voxels in one batched call. The label search that
# ends the default preset returns integer labels (touching cells stay separate
# compartments) and one membrane permeability per cell, started from the
# preset's grid ``search_kappas`` (1e-5 to 2e-4 m/s), moved cell by cell with
# the labels (down to 1e-7 m/s) and refined at the end;
# :func:`~dipy_spinverse.geometry.topology.cell_table` reads each cell's
# volume, membrane area and permeability off them.
#
# The targets come from a grid twice as fine, as tissue does not come from the
# fit's grid: the coarse grid's own discretisation error (0.02-0.04 of b = 0)
# is several times the noise at SNR 100. ``approximation_error=32`` estimates
# that error once over 32 random substrates (cached on disk, minutes the first
# time) and takes it into the fit: its mean is removed from the data, its
# spread added to each acquisition's noise (doc/generalisation.md).
overrides = {"approximation_error": 0 if args.quick else 32}
if args.quick:
    overrides["stages"] = (
        dict(iterations=2, sequences=(0,)),
        dict(iterations=2, sequences="all"),
    )
    overrides["search_steps"] = 0  # seconds per step even on the tiny grid

result = reconstruct(
    grid,
    signal,
    protocol,
    preset="default",
    diffusivity=DIFFUSIVITY,
    sigma=sigma,
    **overrides,
)
seconds["Spinverse"] = result.time_s
config = result.config
print(
    "Spinverse: stages",
    [(s.iterations, s.sequences) for s in config.face.stages],
    "label-search steps",
    config.search.steps,
)


def found_labels(i):
    """Spinverse's cell labels of voxel ``i`` (0 outside, k in cell k)."""
    if result.labels is not None:
        return np.asarray(result.labels[i])
    # Without a label search (``--quick``): one label for the enclosed cells.
    return enclosed_cells(grid, result.barrier[i]).astype(int)


def matched_permeability(truth_labels, labels, kappa_found, n_true):
    """Permeability of the recovered cell that best overlaps each true cell.

    Parameters
    ----------
    truth_labels, labels : ndarray of int (n_cells,)
        True (carried) and recovered labels on the fit's grid.
    kappa_found : ndarray (n_found,)
        Recovered permeability of each recovered cell (``cell_table``).
    n_true : int
        Number of true cells.

    Returns
    -------
    ndarray (n_true,)
        NaN for a true cell no recovered cell overlaps.
    """
    out = np.full(n_true, np.nan)
    for k in range(1, n_true + 1):
        cell = truth_labels == k
        iou = [
            np.sum(cell & (labels == j)) / np.sum(cell | (labels == j))
            for j in range(1, len(kappa_found) + 1)
        ]
        if iou and max(iou) > 0:
            out[k - 1] = kappa_found[int(np.argmax(iou))]
    return out


# Scores are twin-aware: magnitude data cannot tell a substrate from its
# inversion through the voxel centre, so the recovered surface is scored
# against the carried truth or its twin, whichever fits better
# (``all_metrics(..., twin=True)``); per-cell permeabilities are matched to
# the true cells in the same frame.
spin = dict(intra=[], s_to_v=[], kappa=[], rate=[], cells=[])
scores, shown_barrier = [], []
for i, name in enumerate(names):
    labels = found_labels(i)
    barrier = label_barrier(grid, labels)
    true_labels = carried[name]
    score = all_metrics(
        grid,
        barrier,
        true_barrier=label_barrier(grid, true_labels),
        true_labels=true_labels,
        twin=True,
    )
    scores.append(score)
    shown_barrier.append(inversion_twin(grid, barrier) if score["twin"] else barrier)
    frame = true_labels[cell_inversion(grid)] if score["twin"] else true_labels
    # The recovered cells against the true ones (1 for a perfect answer; the
    # barrier's enclosure would also count water trapped between cells).
    score["iou_cells"] = cell_overlap(grid, labels > 0, frame > 0)["iou"]
    cells = cell_table(grid, labels, result.permeability[i])
    volume = cells["volume"].sum()
    spin["intra"].append(volume / grid.volume)
    spin["s_to_v"].append(cells["surface_area"].sum() / volume if volume else np.nan)
    spin["kappa"].append(
        matched_permeability(frame, labels, cells["permeability"], truth[name]["cells"])
    )
    spin["rate"].append(exchange_rate(grid, labels, result.permeability[i]))
    spin["cells"].append(len(cells["volume"]))
estimates["Spinverse"] = {
    key: (value if key == "kappa" else np.array(value)) for key, value in spin.items()
}

# %%
# Signal misfit: root-mean-square difference between each model's predicted
# signal and the noisy data it was fitted to (Spinverse works on signals
# normalised per sequence by their b = 0 mean, so its misfit is taken on
# those). The "truth" column is the noise-free simulated signal: the noise
# floor, about sigma = 0.01.


def per_sequence_normalised(values):
    """Divide each sequence by its mean b = 0 signal, as reconstruct does."""
    out = np.array(values, dtype=float)
    for _, idx in protocol.groups():
        b0 = idx[protocol.bvals[idx] == 0]
        out[..., idx] /= out[..., b0].mean(-1, keepdims=True)
    return out


rmse = {"truth": np.sqrt(np.mean((clean - signal) ** 2, axis=-1))}
for key in models:
    rmse[key] = np.sqrt(np.mean((predicted[key] - signal) ** 2, axis=-1))
normalised = per_sequence_normalised(signal)
rmse["Spinverse"] = np.sqrt(np.mean((result.predicted - normalised) ** 2, axis=-1))

# %%
# The table
# ---------
# One row per voxel and quantity; "-" where a method has no such parameter.
# A Karger rate marked ``*`` sits at the end of its range (no exchange seen).
# Only Spinverse counts cells and gives each its own permeability; a true
# cell's row shows the permeability of the recovered cell that overlaps it
# best.
METHODS = ("NODDI", "ActiveAx", "Karger", "Spinverse")
QUANTITIES = (
    ("intra", "intracellular volume fraction"),
    ("diameter", "diameter (um)"),
    ("s_to_v", "surface / volume (1/um)"),
    ("odi", "ODI"),
    ("rate", "exchange rate k_ie (1/s)"),
    ("cells", "number of cells"),
)


def cell(value, star=False):
    """Format one table entry (3 significant digits, '-' for missing)."""
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:.3g}" + ("*" if star else "")


rows = []
for i, name in enumerate(names):
    for key, label in QUANTITIES:
        row = [name, label, cell(truth[name].get(key, np.nan))]
        for method in METHODS:
            value = estimates[method].get(key)
            star = method == "Karger" and key == "rate" and bool(tau_at_bound[i])
            row.append(cell(None if value is None else value[i], star))
        rows.append(row)
    for k, kappa in enumerate(truth[name]["kappa"]):
        label = f"permeability, cell {k + 1} (m/s)"
        found = estimates["Spinverse"]["kappa"][i][k]
        rows.append([name, label, cell(kappa), "-", "-", "-", cell(found)])
    for key in ("f1", "iou_cells"):
        label = {"f1": "face F1", "iou_cells": "IoU (cells)"}[key]
        rows.append([name, label, "1", "-", "-", "-", cell(scores[i][key])])
    misfit = [cell(rmse[m][i]) for m in ("truth", *METHODS)]
    rows.append([name, "signal RMSE", *misfit])
rows.append(
    ["all 3", "fit wall time (s)", "-"] + [f"{seconds[m]:.3g}" for m in METHODS]
)
header = ["voxel", "quantity", "truth", *METHODS]
lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
lines += ["| " + " | ".join(row) + " |" for row in rows]
table = "\n".join(lines)
print(table)
with open(os.path.join(args.out, "table.md"), "w") as handle:
    handle.write(table + "\n")
# The labels on the fit's grid (0 outside, k in cell k), recovered and true
# (carried from the fine grid), for any further scoring.
np.savez_compressed(
    os.path.join(args.out, "labels.npz"),
    cell_centroids=grid.cell_centroids,
    **{f"found {name}": found_labels(i) for i, name in enumerate(names)},
    **{f"true {name}": carried[name] for name in names},
)

# %%
# Figures
# -------
# Estimates beside the truth: one column per voxel, one row per quantity the
# methods share (intracellular fraction, surface-to-volume ratio, exchange
# rate on a log axis). A missing bar means the method has no such parameter.
colours = {
    "truth": "k",
    "NODDI": "tab:blue",
    "ActiveAx": "tab:orange",
    "Karger": "tab:green",
    "Spinverse": "tab:red",
}
shared = (
    ("intra", "intracellular fraction", False),
    ("s_to_v", "surface / volume (1/um)", False),
    ("rate", "exchange rate (1/s)", True),
)
fig, axes = plt.subplots(
    len(shared), len(names), figsize=(4 * len(names), 3 * len(shared)), squeeze=False
)
for col, name in enumerate(names):
    for row, (key, label, log) in enumerate(shared):
        ax = axes[row, col]
        bars = [truth[name][key]]
        bars += [
            estimates[m][key][col] if key in estimates[m] else np.nan for m in METHODS
        ]
        bars = np.asarray(bars, dtype=float)
        labels = ["truth", *METHODS]
        shown = np.isfinite(bars) & (bars > 0)
        x = np.arange(len(labels))
        ax.bar(
            x[shown],
            bars[shown],
            color=[colours[k] for k, s in zip(labels, shown, strict=True) if s],
        )
        ax.axhline(truth[name][key], color="k", ls=":", lw=1)
        ax.set_xticks(x, labels, rotation=30, fontsize=8)
        if log:
            ax.set_yscale("log")
        if col == 0:
            ax.set_ylabel(label)
        if row == 0:
            ax.set_title(name)
fig.tight_layout()
fig.savefig(os.path.join(args.out, "estimates_vs_truth.png"), dpi=120)

# %%
# True and recovered interfaces on the fit's grid: the centroids of the
# membrane faces, grey for the substrate carried to the fit's grid and red for
# Spinverse's labels (inverted through the centre where its twin was scored).
fig = plt.figure(figsize=(4.5 * len(names), 4.5))
for i, name in enumerate(names):
    ax = fig.add_subplot(1, len(names), i + 1, projection="3d")
    true_points = grid.face_centroids[label_barrier(grid, carried[name])]
    found = grid.face_centroids[shown_barrier[i]]
    ax.scatter(*true_points.T, s=25, c="0.4", alpha=0.6, label="true membrane")
    ax.scatter(*found.T, s=10, c="tab:red", marker="x", label="Spinverse")
    for setter in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
        setter(0, grid.size)
    ax.set_title(
        f"{name}\nF1 = {scores[i]['f1']:.2f}, IoU = {scores[i]['iou_cells']:.2f}",
        fontsize=10,
    )
    if i == 0:
        ax.legend(fontsize=8, loc="upper left")
fig.tight_layout()
fig.savefig(os.path.join(args.out, "interfaces.png"), dpi=120)

# %%
# How well each method explains the data: predicted against measured signal
# (b0-normalised per sequence for Spinverse). A perfect model scatters around
# the diagonal by the noise (0.01).
fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4.2))
for i, (ax, name) in enumerate(zip(np.atleast_1d(axes), names, strict=True)):
    for method in METHODS:
        measured = normalised[i] if method == "Spinverse" else signal[i]
        model = result.predicted[i] if method == "Spinverse" else predicted[method][i]
        ax.scatter(measured, model, s=4, alpha=0.5, c=colours[method], label=method)
    ax.plot([0, 1.05], [0, 1.05], "k:", lw=1)
    ax.set_xlabel("measured signal")
    ax.set_title(name)
np.atleast_1d(axes)[0].set_ylabel("predicted signal")
np.atleast_1d(axes)[0].legend(fontsize=8, markerscale=3)
fig.tight_layout()
fig.savefig(os.path.join(args.out, "signal_fits.png"), dpi=120)
print(
    "saved estimates_vs_truth.png, interfaces.png, signal_fits.png, table.md and "
    f"labels.npz in {args.out}; "
    f"total wall time {time.perf_counter() - wall_start:.0f} s"
)
