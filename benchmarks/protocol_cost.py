"""Regenerates the tables of doc/validation/sections.md.

Its protocol table: what a substrate of the default prior costs to
simulate, protocol by protocol, with this checkout's engine and, with
``--old REV``, with the engine of git revision ``REV`` on the same draws,
in one run.

For each protocol (``demo``: the README demo's 99 volumes; ``hcp``:
:func:`~dipy_spinverse.sim.sequences.hcp_protocol`'s 288; ``cord``: the cat
spinal cord's whole 1,791-volume AxCaliber scheme; ``isbi``: the ISBI 2015
challenge's whole 3,612-measurement scheme; the last two need dmipy 1.0.5's
files and are skipped without them) ``--n`` draws of the default
:class:`~dipy_spinverse.posterior.TissuePrior` are simulated by its
:class:`~dipy_spinverse.posterior.PriorSimulator`, patch side by patch side:
the first draws of a side measure its Magnus sub-steps (the pilot, timed
apart: a training pays it once per side), then every draw of the side is
timed at those sub-steps. The mean weights each side by its draws.
``--old REV`` checks ``REV`` out into a temporary git worktree and runs
the same measurement there in a child process, with the sub-steps this
checkout measured (the two engines' signals agree to rounding, so they would
measure the same), and prints both, the
speed-up, and the largest difference of the two engines' signals::

    python benchmarks/protocol_cost.py --n 24 --old a938364

``--quick``: 2 draws at resolution 3 on the demo protocol, no ``--old``.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import harness
import numpy as np
import torch

from dipy_spinverse.posterior import TissuePrior
from dipy_spinverse.posterior.simulator import _boxes

PROTOCOLS = ("demo", "hcp", "cord", "isbi")
_ROOT = pathlib.Path(__file__).resolve().parents[1]


def protocol_named(name):
    """The protocol of a row (raises FileNotFoundError for a dataset's
    scheme without its files)."""
    if name == "demo":
        from dipy_spinverse.data import _protocol

        timings = ((0.005, 0.006), (0.010, 0.020), (0.010, 0.060))
        return _protocol(timings, (1000.0, 2500.0, 4000.0), 10, 3)
    if name == "hcp":
        from dipy_spinverse.sim.sequences import hcp_protocol

        return hcp_protocol()
    from dipy_spinverse.io.datasets import read_cat_spinal_cord, read_isbi2015

    return {"cord": lambda: read_cat_spinal_cord("2d"), "isbi": read_isbi2015}[
        name
    ]().protocol


def measure(name, n, seed, resolution, substeps=None):
    """Seconds per draw of each patch side (after its pilot), the pilots'
    seconds, the sub-steps and the signals of ``n`` draws on protocol
    ``name``; ``substeps`` (side -> count) skips the pilots."""
    prior = TissuePrior(resolution=resolution)
    simulator = prior.simulator(protocol_named(name))
    draws, _ = simulator._draws(n, seed, None, False)
    signals = np.empty((n, len(simulator.protocol)))
    sides = []
    for box, rows in sorted(_boxes(draws).items()):
        pilot_s = 0.0
        if substeps is not None:
            simulator.measured_substeps[box] = (substeps[str(box[0])], None)
        else:
            start = time.perf_counter()
            simulator.simulate_draws([draws[i] for i in rows[: simulator._PILOT]])
            pilot_s = time.perf_counter() - start
        # Every draw of the side, its pilots again: timed at the kept
        # sub-steps, as a training simulates all but the pilots.
        start = time.perf_counter()
        signals[rows] = simulator.simulate_draws([draws[i] for i in rows])
        spent = time.perf_counter() - start
        count, error = simulator.measured_substeps[box]
        sides.append(
            dict(
                side=float(box[0]),
                draws=len(rows),
                seconds=spent / len(rows),
                pilot=pilot_s,
                substeps=int(count),
                error=error,
            )
        )
    return dict(volumes=len(simulator.protocol), sides=sides), signals


def _mean(sides):
    """Seconds a substrate, the sides weighted by their draws."""
    weights = np.array([s["draws"] for s in sides], dtype=float)
    return float(np.average([s["seconds"] for s in sides], weights=weights))


def _run_old(rev, name, args, substeps):
    """``measure`` in a worktree of ``rev`` (a child process)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = pathlib.Path(tmp) / "old"
        subprocess.run(
            ["git", "-C", str(_ROOT), "worktree", "add", "--detach", str(tree), rev],
            check=True,
            capture_output=True,
        )
        try:
            out = pathlib.Path(tmp) / "old.npz"
            env = dict(os.environ, PYTHONPATH=str(tree))
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    name,
                    "--n",
                    str(args.n),
                    "--seed",
                    str(args.seed),
                    "--resolution",
                    str(args.resolution),
                    "--substeps",
                    json.dumps(substeps),
                    "--save",
                    str(out),
                ],
                check=True,
                env=env,
                cwd=tmp,
            )
            saved = np.load(out)
            return json.loads(str(saved["result"])), saved["signals"]
        finally:
            subprocess.run(
                ["git", "-C", str(_ROOT), "worktree", "remove", "--force", str(tree)],
                check=False,
                capture_output=True,
            )


def main(argv=None):
    parser = harness.parser(
        __doc__, seed=1, quick="2 draws at resolution 3 on the demo protocol"
    )
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=PROTOCOLS)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=6)
    parser.add_argument("--old", default=None, help="git revision of the old engine")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--substeps", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        substeps = json.loads(args.substeps) if args.substeps else None
        result, signals = measure(
            args.worker, args.n, args.seed, args.resolution, substeps
        )
        np.savez(args.save, result=json.dumps(result), signals=signals)
        return
    if args.quick:
        args.protocols, args.n, args.resolution, args.old = ["demo"], 2, 3, None
    print(
        f"{os.uname().machine}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; default prior at resolution {args.resolution}, "
        f"{args.n} draws (seed {args.seed}); old engine: {args.old or 'not run'}"
    )
    print(
        f"{'protocol':>9} {'volumes':>8} {'new s':>7} {'ms/vol':>7} {'pilots s':>9}"
        + (
            f" {'old s':>7} {'ms/vol':>7} {'speed-up':>9} {'max diff':>9}"
            if args.old
            else ""
        )
    )
    for name in args.protocols:
        try:
            result, signals = measure(name, args.n, args.seed, args.resolution)
        except FileNotFoundError as err:
            print(f"{name:>9} skipped: {err}")
            continue
        new = _mean(result["sides"])
        volumes = result["volumes"]
        pilots = sum(s["pilot"] for s in result["sides"])
        row = f"{name:>9} {volumes:8d} {new:7.3f} {1e3 * new / volumes:7.3f}"
        row += f" {pilots:9.1f}"
        if args.old:
            substeps = {str(s["side"]): s["substeps"] for s in result["sides"]}
            old_result, old_signals = _run_old(args.old, name, args, substeps)
            old = _mean(old_result["sides"])
            diff = float(np.abs(signals - old_signals).max())
            row += (
                f" {old:7.3f} {1e3 * old / volumes:7.3f} {old / new:8.1f}x {diff:9.1e}"
            )
        print(row, flush=True)
        for s in result["sides"]:
            error = "pilot skipped" if s["error"] is None else f"{s['error']:.1e}"
            print(
                f"{'':>9} side {s['side']:6.2f} um: {s['draws']} draws, "
                f"{s['substeps']} sub-steps (time error {error}), "
                f"{s['seconds']:.3f} s a draw"
            )


if __name__ == "__main__":
    main()
