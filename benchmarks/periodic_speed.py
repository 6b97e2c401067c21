"""Speed and time-stepping accuracy of ``simulate`` on periodic grids.

Times ``simulate`` batched over random substrates
(:func:`dipy_spinverse.geometry.substrates.random_substrates`) on the README demo's
protocol (``make_phantom_dataset`` defaults: PGSE (delta, Delta) = (5, 6),
(10, 20), (10, 60) ms; b = 0, 1000, 2500, 4000 s/mm^2; 10 directions and
3 b = 0 per timing; 99 volumes) and prints one row per configuration: grid,
boundary, dtype, ms per substrate (wall and process CPU time, the minimum of
``--repeat`` runs), and the number of exponentials and of Chebyshev
matrix-vector products per acquisition chunk of each PGSE timing.

With ``--reference PHASE_STEP`` it also simulates the periodic grids with
that (much finer) Magnus phase step and prints the largest absolute signal
difference over all substrates and volumes: the time-discretisation error of
the default step. Run from the repository root::

    PYTHONPATH=. python benchmarks/periodic_speed.py
    PYTHONPATH=. python benchmarks/periodic_speed.py --grid 4 5 --reference 0.01
"""

import argparse
import platform
import time

import numpy as np
import torch

from dipy_spinverse import TetGrid, simulate
from dipy_spinverse.data import _protocol
from dipy_spinverse.geometry.substrates import random_substrates
from dipy_spinverse.sim import forward, solvers

TIMINGS = ((0.005, 0.006), (0.010, 0.020), (0.010, 0.060))
BVALS = (1000.0, 2500.0, 4000.0)
SIZE = 80.0 / 3.0  # um: the demo grid, TetGrid.bcc(80 / 3, 4)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class _Counter:
    """Counts exponentials (steps) and Chebyshev products per propagate call."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self._propagate, self._plan = forward.propagate, solvers._chebyshev_plan

        def propagate(op, steps, u, rate, **kwargs):
            self.calls.append([len(steps), 0, u.shape[-1]])
            return self._propagate(op, steps, u, rate, **kwargs)

        def plan(*args, **kwargs):
            n_sub, coeffs = self._plan(*args, **kwargs)
            if self.calls:
                self.calls[-1][1] += n_sub * (coeffs.shape[0] - 1)
            return n_sub, coeffs

        forward.propagate, solvers._chebyshev_plan = propagate, plan
        return self

    def __exit__(self, *exc):
        forward.propagate, solvers._chebyshev_plan = self._propagate, self._plan


def _time(fn, repeat):
    wall, cpu, out = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, nargs="+", default=[4], help="BCC n")
    parser.add_argument("--boundary", nargs="+", default=["periodic", "reflecting"])
    parser.add_argument("--dtype", nargs="+", default=["float64", "float32"])
    parser.add_argument("--substrates", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", default="auto")
    parser.add_argument(
        "--phase-step", type=float, default=None, help="override forward._PHASE_STEP"
    )
    parser.add_argument(
        "--reference",
        type=float,
        default=None,
        help="finer phase step (rad) for the accuracy check of periodic grids",
    )
    args = parser.parse_args(argv)
    if args.phase_step is not None:
        forward._PHASE_STEP = args.phase_step
    protocol = _protocol(TIMINGS, BVALS, 10, 3)
    print(
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{args.substrates} substrates, {len(protocol)} volumes, phase step "
        f"{forward._PHASE_STEP} rad; times: minimum of {args.repeat} runs"
    )
    head = (
        f"{'grid':>12} {'boundary':>10} {'dtype':>8} {'wall ms':>9} {'cpu ms':>9}"
        "  exps/chunk (5/6, 10/20, 10/60)  products/chunk"
    )
    print(head)
    for n in args.grid:
        for boundary in args.boundary:
            grid = TetGrid.bcc(SIZE, n, boundary=boundary)
            subs = random_substrates(grid, args.substrates, seed=args.seed)
            kappa = np.stack([s.face_permeability for s in subs])
            for name in args.dtype:

                def run(dtype=DTYPES[name], grid=grid, kappa=kappa):
                    return simulate(
                        grid, kappa, protocol, dtype=dtype, method=args.method
                    )

                wall, cpu, signal = _time(run, args.repeat)
                with _Counter() as count:
                    run()
                per = np.array(count.calls)
                thirds = np.array_split(per, len(TIMINGS))
                exps = [tuple(int(v) for v in t[:, 0]) for t in thirds]
                products = [int(t[:, 1].sum()) for t in thirds]
                ms = 1e3 / args.substrates
                print(
                    f"{grid.n_cells:>6} cells {boundary:>10} {name:>8} "
                    f"{wall * ms:9.1f} {cpu * ms:9.1f}  {exps}  {products}",
                    flush=True,
                )
                if args.reference is not None and grid.periodic:
                    default = forward._PHASE_STEP
                    forward._PHASE_STEP = args.reference
                    try:
                        ref = simulate(grid, kappa, protocol, dtype=torch.float64)
                    finally:
                        forward._PHASE_STEP = default
                    err = (signal.double() - ref).abs()
                    per_timing = [float(e.max()) for e in err.chunk(len(TIMINGS), -1)]
                    print(
                        f"{'':>12} max |S - S(phase step {args.reference})| = "
                        f"{float(err.max()):.2e} (per timing "
                        + ", ".join(f"{e:.1e}" for e in per_timing)
                        + ")",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
