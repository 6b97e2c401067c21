"""Regenerates the tables of doc/validation/sections.md.

Its cluster table: a posterior's training simulations on a Ray cluster
against this process. ``--n`` draws of the default
:class:`~dipy_spinverse.posterior.TissuePrior` on ``--protocol`` (as
``benchmarks/protocol_cost.py`` names them) are simulated serially, then by
:class:`~dipy_spinverse.posterior.PriorSimulator` with ``engine="ray"`` on a
local instance of 1 and of 2 workers, started before (its start printed
apart) and after the patch sides' time steps are measured, so that only the
batches are timed. Prints the seconds a draw, the draws a second, the
overhead a batch (the cluster's wall time less the serial time of the same
batches spread over the workers, over the number of batches: shipping the
simulator, the draws and the signals, scheduling, and the workers' first
import of the package) and whether the signals are identical to the serial
run's::

    python benchmarks/cluster_training.py --n 64 --protocol demo

``--quick``: 4 draws at resolution 3, 1 worker.
"""

import os
import time
from collections import Counter

import harness
import numpy as np
import ray
import torch
from protocol_cost import PROTOCOLS, protocol_named

from dipy_spinverse.posterior import TissuePrior


def timed(simulator, draws):
    start = time.perf_counter()
    signals = simulator.simulate_draws(draws)
    return signals, time.perf_counter() - start


def main(argv=None):
    parser = harness.parser(__doc__, seed=1, quick="4 draws at resolution 3, 1 worker")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="demo")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.resolution, args.workers, args.batch_size = 4, 3, [1], 2
    prior = TissuePrior(resolution=args.resolution)
    protocol = protocol_named(args.protocol)
    serial = prior.simulator(protocol, batch_size=args.batch_size)
    draws, _ = serial._draws(args.n, args.seed, None, False)
    serial.simulate_draws(draws)  # measures every side's time steps
    expected, serial_s = timed(serial, draws)
    sides = Counter((d.side, d.boundary, d.axis is not None) for d in draws)
    n_batches = sum(-(-count // args.batch_size) for count in sides.values())
    print(
        f"{os.uname().machine}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"{args.protocol} protocol ({len(protocol)} volumes), {args.n} draws in "
        f"{n_batches} batches of at most {args.batch_size}"
    )
    print(
        f"{'engine':>14} {'s/draw':>8} {'draws/s':>8} {'overhead/batch s':>17} "
        f"{'identical':>10}"
    )
    print(f"{'serial':>14} {serial_s / args.n:8.3f} {args.n / serial_s:8.2f}")
    for workers in args.workers:
        # The instance started first, as a user's cluster is, so that only
        # the batches are timed; its start is printed apart.
        start = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        started = time.perf_counter() - start
        try:
            cluster = prior.simulator(
                protocol, batch_size=args.batch_size, engine="ray"
            )
            cluster.measured_substeps.update(serial.measured_substeps)
            signals, spent = timed(cluster, draws)
        finally:
            ray.shutdown()
        # The serial run's work spread over the workers, the rest overhead.
        overhead = (spent - serial_s / min(workers, n_batches)) / n_batches
        same = bool(np.array_equal(signals, expected))
        label = f"ray, {workers} worker" + ("s" if workers > 1 else "")
        print(
            f"{label:>14} {spent / args.n:8.3f} {args.n / spent:8.2f} "
            f"{overhead:17.3f} {str(same):>10}   (instance started in "
            f"{started:.1f} s)"
        )


if __name__ == "__main__":
    main()
