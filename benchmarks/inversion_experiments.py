"""Regenerates the tables of doc/validation/inversion_tables.md.

``--quick``: one short realistic fit of the sphere, its tables written to a
temporary folder; minutes, not seconds (-m slow).

Spinverse inversion experiments: the published ablation and realistic voxels.

Two experiments on the published grid (576 cells) and protocol (540 PGSE
acquisitions), with the published targets plus a bent axon:

``paper``
    Paper physics (absorbing wall, kappa_wall = 0.1 m/s, open faces 0.1 m/s,
    membranes 1e-5 m/s, noise-free) and the ``"paper"`` preset with its prior
    arms (baseline, continuity, manifold, both), each with the published staged
    curriculum and with a joint one (both sequences from the start); and the
    ``"default"`` preset (the same face fit, then the search over cell labels).
``realistic``
    A reflecting voxel (extracellular water kept), Rician noise at SNR 100 and
    30, and both presets (``"paper"`` and ``"default"``).

Every finished reconstruction is appended to a JSON-lines file, so several
processes can share the work; ``--report`` turns the file into the tables of
``doc/validation/inversion_tables.md`` (quoted by
``doc/validation/inversion_results.md``) and a figure of true vs recovered surfaces.

Usage::

    python benchmarks/inversion_experiments.py paper --shapes sphere torus
    python benchmarks/inversion_experiments.py realistic --snr 100
    python benchmarks/inversion_experiments.py --report
"""

import argparse
import json
import os
import platform
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dipy_spinverse import TetGrid, published_protocol, simulate  # noqa: E402
from dipy_spinverse.geometry.metrics import all_metrics  # noqa: E402
from dipy_spinverse.geometry.phantoms import (
    beaded_axon,
    bent_axon,
    cylinder,
    published_phantoms,
    sphere,
    torus,
)
from dipy_spinverse.inverse import reconstruct  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DOC = os.path.join(HERE, "..", "doc", "validation")
ARMS = {
    "baseline": dict(continuity=0.0, manifold=0.0),
    "continuity": dict(manifold=0.0),
    "manifold": dict(continuity=0.0),
    "both": dict(),
}
CURRICULA = {
    "staged": {},  # the preset's own schedule
    "joint": dict(stages=(dict(iterations=400, sequences=(0, 1)),)),
}
COLUMNS = (
    "f1",
    "precision",
    "recall",
    "iou",
    "chamfer_um",
    "hausdorff_um",
    "edge_degree2_fraction",
    "n_components",
    "is_closed",
    "is_manifold",
    "f1_twin",
    "iou_twin",
)


def phantoms(grid):
    """The published targets, a bent axon, four shapes off the dictionary,
    and five centred shapes of other sizes and axes.

    The published targets are centred balls, cylinders and a torus, and the
    bent axon a circular arc, so the label search's dictionary of generic
    starts (or one bend of a tube) holds each of them exactly. The next four
    (centroid membership) are off-centre, at other radii and angles, or
    beaded, so no generic start matches them: they measure the search
    itself. The last five are centred like the published ones but with
    other radii, axes and lengths (``generalisation`` in the results).
    """
    centre = np.full(3, grid.size / 2)
    shapes = published_phantoms(grid, kappa=1e-5)
    shapes["bent_axon"] = bent_axon(grid, radius=4.5, curvature_radius=20.0)
    shapes["sphere_off_centre"] = sphere(
        grid, radius=8.0, centre=centre + [3.0, -2.5, 2.0]
    )
    shapes["capsule_111"] = cylinder(
        grid, radius=7.0, length=18.0, axis=(1, 1, 1), centre=centre + [-2, 1.5, 0]
    )
    shapes["tube_off_centre"] = cylinder(
        grid, radius=7.5, axis=(0, 1, 1), centre=centre + [2.5, 0, 0]
    )
    shapes["beaded_axon"] = beaded_axon(
        grid, radius=6.0, bead_amplitude=2.0, bead_period=20.0, axis=(1, 0, 0)
    )
    centroid = dict(membership="centroid")
    shapes["sphere_r8"] = sphere(grid, radius=8.0, **centroid)
    shapes["cylinder_r6_x"] = cylinder(grid, radius=6.0, axis=(1, 0, 0), **centroid)
    shapes["torus_r4_x"] = torus(
        grid, major=10.0, minor=4.0, axis=(1, 0, 0), **centroid
    )
    shapes["bent_axon_r5_y"] = bent_axon(
        grid, radius=5.0, curvature_radius=30.0, axis=(0, 1, 0)
    )
    shapes["capsule_011_l16"] = cylinder(
        grid, radius=7.0, length=16.0, axis=(0, 1, 1), **centroid
    )
    return shapes


def runs(experiment, snrs):
    """(arm label, preset, overrides, snr) of every reconstruction to run."""
    if experiment == "paper":
        return [
            (f"{arm}/{cur}", "paper", dict(ARMS[arm], **CURRICULA[cur]), None)
            for cur in CURRICULA
            for arm in ARMS
        ] + [("default", "default", {}, None)]
    return [
        (preset, preset, dict(sigma=1.0 / snr) if preset == "default" else {}, snr)
        for snr in snrs
        for preset in ("paper", "default")
    ]


def measure(experiment, grid, shape, phantom, arm, preset, overrides, snr, seed):
    """Simulate one voxel, reconstruct it and score the recovered surface."""
    protocol = published_protocol()
    truth = np.where(phantom.barrier, 1e-5, 0.1)  # paper: open faces 0.1 m/s
    signal = simulate(grid, truth, protocol, dtype=torch.float64).numpy()
    if snr is not None:
        # Rician magnitude noise relative to each sequence's b = 0 signal.
        rng = np.random.default_rng(seed)
        sigma = np.empty_like(signal)
        for _, idx in protocol.groups():
            b0 = signal[idx[protocol.bvals[idx] == 0]].mean()
            sigma[idx] = b0 / snr
        noise = rng.normal(size=(2, len(signal))) * sigma
        signal = np.hypot(signal + noise[0], noise[1])
    result = reconstruct(
        grid, signal, protocol, preset=preset, **overrides, **QUICK_OVERRIDES
    )
    scores = all_metrics(grid, result.barrier, phantom)
    # Magnitude data cannot tell a surface from its inversion through the
    # voxel centre (metrics.inversion_twin); score the better of the two too.
    twin = all_metrics(grid, result.barrier, phantom, twin=True)
    scores.update(f1_twin=twin["f1"], iou_twin=twin["iou"])
    row = dict(
        experiment=experiment,
        shape=shape,
        arm=arm,
        snr=snr,
        time_s=result.time_s,
        data_loss=float(result.history["data"][-1]),  # last face-fit iteration
        **{k: scores[k] for k in COLUMNS},
    )
    return row, result.barrier


def _format(row):
    values = [f"{row['shape']:<16}", f"{row['arm']:<20}", f"{row['snr']!s:>5}"]
    for col in COLUMNS:
        v = row[col]
        values.append(f"{v:>8.3f}" if isinstance(v, float) else f"{v!s:>8}")
    values.append(f"{row['time_s']:>7.1f}")
    return " ".join(values)


def _header():
    cols = [f"{'shape':<16}", f"{'arm':<20}", f"{'snr':>5}"]
    return " ".join(cols + [f"{c[:8]:>8}" for c in COLUMNS] + [f"{'time s':>7}"])


def run(args):
    torch.set_num_threads(args.threads)
    boundary = "absorbing" if args.experiment == "paper" else "reflecting"
    grid = TetGrid.bcc(80 / 3, 4, boundary=boundary, wall_permeability=0.1)
    targets = phantoms(grid)
    shapes = args.shapes or list(targets)[:5]  # published four and the bent axon
    os.makedirs(args.results, exist_ok=True)
    log = os.path.join(args.results, f"{args.experiment}.jsonl")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(_header(), flush=True)
    for arm, preset, overrides, snr in runs(args.experiment, args.snr):
        if args.arms and arm.split("/")[0] not in args.arms:
            continue
        for shape in shapes:
            row, barrier = measure(
                args.experiment, grid, shape, targets[shape], arm, preset,
                overrides, snr, args.seed,
            )  # fmt: skip
            print(_format(row), flush=True)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            name = f"{args.experiment}_{shape}_{arm.replace('/', '_')}_{snr}.npy"
            np.save(os.path.join(args.results, name), barrier)


def report(results=RESULTS, doc=DOC):
    """Tables from the JSON-lines results in ``results``, and the surface
    figure, written to ``doc``."""
    sections = []
    for experiment, title in (
        ("paper", "Paper physics, noise-free (published ablation)"),
        ("realistic", "Realistic physics: reflecting voxel, Rician noise"),
    ):
        path = os.path.join(results, f"{experiment}.jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows = {}
            for line in f:  # a repeated run replaces the earlier one
                row = json.loads(line)
                rows[row["shape"], row["arm"], row["snr"]] = row
            rows = list(rows.values())
        # Group by arm and noise level, shapes in their usual order.
        order = list(phantoms(TetGrid.bcc(80 / 3, 4)))
        rows.sort(key=lambda r: (-(r["snr"] or 1e9), r["arm"], order.index(r["shape"])))
        head = ["shape", "arm", "snr", *COLUMNS, "face-fit loss", "time s"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["shape"], r["arm"], str(r["snr"])]
            # Rows from before a column was added show "n/a".
            cells += [f"{r[c]:.3f}" if isinstance(r.get(c), float)
                      else str(r.get(c, "n/a")) for c in COLUMNS]  # fmt: skip
            cells += [f"{r['data_loss']:.2e}", f"{r['time_s']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        sections.append(f"## {title}\n\n" + "\n".join(lines) + "\n")
    figure = _figure(results, doc)
    with open(os.path.join(doc, "inversion_tables.md"), "w") as f:
        f.write(
            "# Inversion experiments (generated)\n\n"
            "`python benchmarks/inversion_experiments.py --report`; "
            f"{platform.machine()}, 2 shared cores, float32.\n\n"
        )
        f.write("\n".join(sections))
        if figure:
            f.write(f"\n![true vs recovered surfaces]({os.path.basename(figure)})\n")
    print("\n".join(sections))


def _figure(results, doc):
    """Face centroids of the true and recovered barriers, per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = TetGrid.bcc(80 / 3, 4, boundary="absorbing", wall_permeability=0.1)
    targets = dict(list(phantoms(grid).items())[:9])  # published, off-dictionary
    arms = [
        ("paper", "both/staged", None),
        ("paper", "default", None),
        ("realistic", "default", 100.0),
    ]
    fig = plt.figure(figsize=(3.2 * len(targets), 3.2 * (1 + len(arms))))
    found = False
    for col, (shape, phantom) in enumerate(targets.items()):
        panels = [(0, "truth", phantom.barrier)]
        for row, (experiment, arm, snr) in enumerate(arms, start=1):
            name = f"{experiment}_{shape}_{arm.replace('/', '_')}_{snr}.npy"
            path = os.path.join(results, name)
            if os.path.exists(path):  # a missing run leaves its panel blank
                panels.append((row, f"{experiment} {arm}", np.load(path)))
                found = True
        for row, label, barrier in panels:
            ax = fig.add_subplot(
                1 + len(arms), len(targets), row * len(targets) + col + 1,
                projection="3d",
            )  # fmt: skip
            points = grid.face_centroids[barrier]
            ax.scatter(*points.T, s=4, c=points[:, 2], cmap="viridis")
            lim = (grid.vertices.min(), grid.vertices.max())
            ax.set(xlim=lim, ylim=lim, zlim=lim, xticks=[], yticks=[], zticks=[])
            ax.set_title(f"{shape}\n{label}", fontsize=8)
    if not found:
        plt.close(fig)
        return None
    path = os.path.join(doc, "inversion_surfaces.png")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


#: Options added to every reconstruction (``--quick``: a short one).
QUICK_OVERRIDES = {}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", choices=("paper", "realistic"))
    parser.add_argument("--shapes", nargs="+", default=None)
    parser.add_argument(
        "--arms",
        nargs="+",
        default=None,
        help=f"prior arms to run: {', '.join(ARMS)} or default (the label "
        "search); each runs with the staged and the joint curriculum",
    )
    parser.add_argument("--snr", nargs="+", type=float, default=(100.0, 30.0))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true")
    parser.add_argument(
        "--results", default=RESULTS, help="folder of the JSON-lines results"
    )
    parser.add_argument(
        "--doc",
        default=DOC,
        help="folder of the --report tables and figure (default doc/validation/, "
        "what the docs quote; another folder for trial runs)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test, not a measurement"
    )
    args = parser.parse_args(argv)
    if args.quick:  # one short realistic fit, results and tables in a temp folder
        folder = tempfile.mkdtemp()
        args.experiment, args.shapes, args.snr = "realistic", ["sphere"], (100.0,)
        args.arms, args.report, args.results, args.doc = (
            ["default"],
            True,
            folder,
            folder,
        )
        QUICK_OVERRIDES.update(max_iter=2, search_steps=2)
    if args.experiment:
        run(args)
    if args.report:
        os.makedirs(args.doc, exist_ok=True)
        report(args.results, args.doc)


if __name__ == "__main__":
    main()
