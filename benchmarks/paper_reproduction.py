"""Reproduce the published Spinverse ablation on the published phantoms.

Paper physics (absorbing wall, kappa_wall = 0.1 m/s, open faces 0.1 m/s,
membranes 1e-5 m/s, noise-free), the published grid and protocol, and the
``"paper"`` preset with its prior arms switched on and off. Prints a table of
every metric and the time of each reconstruction; ``--write-doc`` also writes
``doc/inversion_results.md``.

Usage::

    python benchmarks/paper_reproduction.py --arms baseline manifold --shapes sphere
"""

import argparse
import os
import platform

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dipy_spinverse import TetGrid, published_protocol, simulate  # noqa: E402
from dipy_spinverse.inverse import reconstruct  # noqa: E402
from dipy_spinverse.metrics import all_metrics  # noqa: E402
from dipy_spinverse.phantoms import published_phantoms  # noqa: E402

ARMS = {
    "baseline": dict(continuity=0.0, manifold=0.0),
    "continuity": dict(manifold=0.0),
    "manifold": dict(continuity=0.0),
    "both": dict(),
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
)


def run(shapes, arms, threads):
    torch.set_num_threads(threads)
    grid = TetGrid.bcc(80 / 3, 4, boundary="absorbing", wall_permeability=0.1)
    protocol = published_protocol()
    phantoms = published_phantoms(grid, kappa=1e-5)
    rows = []
    for shape in shapes:
        phantom = phantoms[shape]
        truth = np.where(phantom.barrier, 1e-5, 0.1)  # paper: open faces 0.1 m/s
        signal = simulate(grid, truth, protocol).numpy()
        for arm in arms:
            result = reconstruct(grid, signal, protocol, preset="paper", **ARMS[arm])
            scores = all_metrics(grid, result.barrier, phantom)
            rows.append(dict(shape=shape, arm=arm, time_s=result.time_s, **scores))
            print(_row(rows[-1]), flush=True)
    return rows


def _row(row):
    values = [f"{row['shape']:<16}", f"{row['arm']:<11}"]
    for col in COLUMNS:
        v = row[col]
        values.append(f"{v:>8.3f}" if isinstance(v, float) else f"{v!s:>8}")
    values.append(f"{row['time_s']:>7.1f}")
    return " ".join(values)


def _header():
    cols = [f"{'shape':<16}", f"{'arm':<11}"] + [f"{c[:8]:>8}" for c in COLUMNS]
    return " ".join(cols + [f"{'time s':>7}"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=None)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write-doc", action="store_true")
    args = parser.parse_args()
    grid = TetGrid.bcc(80 / 3, 4, boundary="absorbing")
    shapes = args.shapes or list(published_phantoms(grid))
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads"
    )
    print(_header())
    rows = run(shapes, args.arms, args.threads)
    if args.write_doc:
        lines = [
            "| " + " | ".join(["shape", "arm", *COLUMNS, "time s"]) + " |",
            "|" + "---|" * (len(COLUMNS) + 3),
        ]
        for r in rows:
            cells = (
                [r["shape"], r["arm"]]
                + [
                    f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                    for c in COLUMNS
                ]
                + [f"{r['time_s']:.1f}"]
            )
            lines.append("| " + " | ".join(cells) + " |")
        path = os.path.join(
            os.path.dirname(__file__), "..", "doc", "inversion_results.md"
        )
        with open(path, "w") as f:
            f.write("# Paper reproduction (noise-free, paper physics)\n\n")
            f.write(
                "`python benchmarks/paper_reproduction.py --write-doc`, "
                f"{platform.machine()}, {args.threads} threads; the machine "
                "was shared with other jobs, so times are upper bounds.\n\n"
            )
            f.write("\n".join(lines) + "\n")
        print(f"wrote {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
