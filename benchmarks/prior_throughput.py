"""Regenerates the tables of doc/validation/sections.md.

``--quick``: 4 draws at resolution 3.

Simulation throughput of the posterior's prior (substrates a second).

Draws ``--n`` substrates from a :class:`~dipy_spinverse.posterior.TissuePrior`
(default: the default prior) on the README demo's protocol and simulates them
with :class:`~dipy_spinverse.posterior.PriorSimulator` at ``--time_tolerance``
(the Magnus sub-steps of each patch side doubled until the signals move by
less than it). Prints one row per patch side: spacing, draws, the sub-step
multiplier kept and its measured time error, and seconds a substrate (the
pilot that measured the error apart), then the prior's mean and the time a
training set of ``--n_train`` substrates would take on this machine.
``--protocol``: ``demo`` (the README demo's 99 volumes, ``--n_directions``
per shell), ``published`` (the Spinverse paper's 540) or ``hcp`` (the
HCP-style 288, :func:`~dipy_spinverse.sim.sequences.hcp_protocol`)::

    python benchmarks/prior_throughput.py --n 48 --families axon --protocol hcp
"""

import argparse
import platform
import time

import torch

from dipy_spinverse.data import _protocol
from dipy_spinverse.posterior import TissuePrior
from dipy_spinverse.sim.sequences import hcp_protocol, published_protocol

TIMINGS = ((0.005, 0.006), (0.010, 0.020), (0.010, 0.060))
BVALS = (1000.0, 2500.0, 4000.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--n_directions", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=6)
    parser.add_argument("--cell_diameter", type=float, nargs=2, default=(1.0, 25.0))
    parser.add_argument("--min_spacings", type=float, default=3.0)
    parser.add_argument("--time_tolerance", type=float, default=1e-3)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--n_train", type=int, default=3000)
    parser.add_argument(
        "--families", nargs="+", default=None, help="default: the prior's default"
    )
    parser.add_argument(
        "--protocol", choices=("demo", "published", "hcp"), default="demo"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="4 draws at resolution 3 (a smoke test)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.resolution = 4, 3
    protocol = {
        "demo": lambda: _protocol(TIMINGS, BVALS, args.n_directions, 3),
        "published": published_protocol,
        "hcp": hcp_protocol,
    }[args.protocol]()
    families = {} if args.families is None else dict(families=tuple(args.families))
    prior = TissuePrior(
        resolution=args.resolution,
        cell_diameter=args.cell_diameter,
        min_spacings=args.min_spacings,
        **families,
    )
    simulator = prior.simulator(
        protocol,
        dtype=getattr(torch, args.dtype),
        time_tolerance=args.time_tolerance,
    )
    regular, pilot = _timed(simulator)
    start = time.perf_counter()
    simulator.sample(args.n, seed=args.seed)
    total = time.perf_counter() - start
    print(
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, {args.dtype}; {len(protocol)} volumes; {prior!r}; "
        f"time_tolerance {args.time_tolerance}"
    )
    print(
        f"{'grid':>8} {'side um':>9} {'h um':>7} {'draws':>6} {'substeps':>9} "
        f"{'time err':>9} {'s/substrate':>12} {'pilot s':>8}"
    )
    mean = 0.0
    for box in sorted(simulator.measured_substeps):
        side, _, section = box
        count, error = simulator.measured_substeps[box]
        spent, rows = regular.get(box, (0.0, 0))
        p_spent, p_rows = pilot[box]
        # A side drawn only for its pilot: its cost is about half the pilot's
        # (two counts simulated, the second twice the first's sub-steps).
        per = spent / rows if rows else p_spent / (3 * p_rows)
        mean += (rows + p_rows) / args.n * per
        error = float("nan") if error is None else error
        print(
            f"{'section' if section else 'bcc':>8} {side:9.2f} "
            f"{side / args.resolution:7.3f} {rows + p_rows:6d} "
            f"{count:9d} {error:9.1e} {per:12.2f} {p_spent:8.1f}"
        )
    print(
        f"mean {total / args.n:.2f} s a substrate with pilots ({args.n} draws), "
        f"{mean:.2f} s without: {1 / mean:.2f} substrates a second; "
        f"{args.n_train} substrates ~ {args.n_train * mean / 60:.0f} min"
    )


def _timed(simulator):
    """Seconds and rows per patch side of the simulations after each side's
    pilot, and of the pilots."""
    regular, pilot = {}, {}
    simulate, choose = simulator._simulate, simulator._measure_substeps

    def run(grid, draws, rows, side=None, **kwargs):
        start = time.perf_counter()
        out = simulate(grid, draws, rows, side, **kwargs)
        if side is not None:
            spent = regular.setdefault(side, [0.0, 0])
            spent[0] += time.perf_counter() - start
            spent[1] += len(rows)
        return out

    def measure(side, grid, draws, rows):
        start = time.perf_counter()
        out = choose(side, grid, draws, rows)
        pilot[side] = (time.perf_counter() - start, len(rows))
        return out

    simulator._simulate, simulator._measure_substeps = run, measure
    return regular, pilot


if __name__ == "__main__":
    main()
