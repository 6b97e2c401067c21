"""Regenerates the tables of doc/validation/protocols.md.

``--quick``: the sphere on the 60 ms subset, a short search; minutes, not
seconds (-m slow).

How recovery depends on the protocol: diffusion times, maximum b, directions.

Simulates published shapes on the published grid (reflecting wall, membrane
1e-5 m/s, open faces 0.1 m/s), adds Rician noise at SNR 100 relative to each
sequence's b = 0 signal, and reconstructs each with the ``"default"`` preset
(``sigma`` given) on subsets of the published protocol. Prints a markdown
table (and writes it with ``--out``; the table in doc/validation/protocols.md was
pasted from its output).

    python benchmarks/protocols.py --out protocols_table.md
"""

import platform
import time

import harness
import numpy as np
import torch

from dipy_spinverse import TetGrid, published_protocol, reconstruct, simulate
from dipy_spinverse.geometry.metrics import all_metrics
from dipy_spinverse.geometry.phantoms import published_phantoms
from dipy_spinverse.sim.sequences import fibonacci_sphere

SNR = 100.0


def protocols():
    """(name, protocol) pairs: subsets of the published 540-volume protocol."""
    full = published_protocol()
    ranked = full.sequences()  # 60, 20, 6 ms

    def keep(mask):
        return full[np.flatnonzero(mask)]

    seq = np.empty(len(full), int)
    for rank, (_, idx) in enumerate(ranked):
        seq[idx] = rank
    ten = fibonacci_sphere(30)[np.round(np.linspace(0, 29, 10)).astype(int)]
    ten_dirs = (full.bvals == 0) | np.isin(
        np.round(full.bvecs, 9).view([("", float)] * 3).ravel(),
        np.round(ten, 9).view([("", float)] * 3).ravel(),
    )
    return [
        ("3 diffusion times (published)", full),
        ("2 diffusion times (60, 20 ms)", keep(seq < 2)),
        ("1 diffusion time (60 ms)", keep(seq == 0)),
        ("1 diffusion time (20 ms)", keep(seq == 1)),
        ("3 diffusion times, b <= 2000", keep(full.bvals <= 2000)),
        ("3 diffusion times, 10 directions", keep(ten_dirs)),
    ]


def noisy(signal, protocol, rng):
    """Rician magnitude noise at SNR relative to each sequence's b = 0."""
    sigma = np.empty_like(signal)
    for _, idx in protocol.groups():
        sigma[idx] = signal[idx[protocol.bvals[idx] == 0]].mean() / SNR
    noise = rng.normal(size=(2, len(signal))) * sigma
    return np.hypot(signal + noise[0], noise[1])


def main(argv=None):
    parser = harness.parser(__doc__, seed=0)
    parser.add_argument("--shapes", nargs="+", default=["sphere", "cylinder"])
    parser.add_argument("--out", default=None, help="markdown file for the table")
    args = parser.parse_args(argv)
    chosen = protocols()
    options = {}
    if args.quick:
        args.shapes, chosen = ["sphere"], chosen[2:3]
        options = dict(max_iter=2, search_steps=2, search_restarts=1)

    grid = TetGrid.bcc(80 / 3, 4)
    phantoms = published_phantoms(grid)
    lines = [
        f"Published grid (576 cells, reflecting), membrane 1e-5 m/s, SNR {SNR:g}, "
        f'"default" preset with sigma; {platform.machine()}, '
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}.",
        "",
        harness.head(
            ["protocol", "volumes", "shape", "F1", "IoU", "membrane (m/s)", "time (s)"],
            "-r-rrrr",
            spaced=True,
        ),
    ]
    print("\n".join(lines), flush=True)
    for name, protocol in chosen:
        for shape in args.shapes:
            phantom = phantoms[shape]
            truth = np.where(phantom.barrier, 1e-5, 0.1)
            clean = simulate(grid, truth, protocol, dtype=torch.float64).numpy()
            signal = noisy(clean, protocol, np.random.default_rng(args.seed))
            start = time.perf_counter()
            result = reconstruct(grid, signal, protocol, sigma=1 / SNR, **options)
            seconds = time.perf_counter() - start
            scores = all_metrics(grid, result.barrier, phantom)
            membrane = result.permeability[result.barrier]
            kappa = f"{np.median(membrane):.2g}" if membrane.size else "--"
            line = harness.row(
                [name, len(protocol), shape, f"{scores['f1']:.2f}"]
                + [f"{scores['iou']:.2f}", kappa, f"{seconds:.0f}"]
            )
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
