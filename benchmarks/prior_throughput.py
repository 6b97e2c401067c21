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

``--device cuda`` (and a larger ``--batch_size``) simulates on a GPU: the
GPU rows of doc/validation/sections.md.

``--compare_old N``: the old engine against the new, in the same run, on the
same draws (issue 58, item 3). The first ``N`` draws of each patch side are
simulated again, each twice more:

- new: as the prior simulates them (a periodic section, the side's measured
  Magnus sub-steps), and its converged reference (the sub-steps doubled on
  from the kept multiple until the signals move by less than
  ``--reference_tolerance``, at most :attr:`PriorSimulator.MAX_SUBSTEPS`);
- old: the same tissue as a 3-D periodic patch, ``TetGrid.bcc(side,
  resolution, boundary="periodic")``, simulated as the former default prior
  simulated its tetrahedral patches (``simulate``'s Chebyshev engine at the
  prior's coarse phase step, the Magnus sub-steps doubled from 1 until the
  signals move by at most ``--time_tolerance``), and its reference (doubled
  on, as the new one's, up to ``--old_max_substeps``: the finest affordable).

The same tissue: the section's fibres (their in-plane seeds, size factors and
permeabilities) run along z of the cubic patch, filled to the section's
realised restricted fraction, and the protocol's directions are turned into
the fibres' frame (``fibre_frame(axis)``), so that the cubic lattice holds
the fibres along one of its axes (its best case: straight prisms, a
staircase only across). Each old draw has its own turned protocol, so it is
simulated alone (the former prior batched a side's draws). Prints, per
patch side, seconds a substrate of each (the call at the kept multiple; the
pilots apart), the speed-up, each engine's largest signal error against its
own reference, and the largest old - new difference of the references (the
2-D section against the 3-D patch's rasterisation: a discretisation
difference, not a time error); the mean row weights the sides by their
draws among the ``--n``.
"""

import platform
import time

import harness
import numpy as np
import torch

from dipy_spinverse.data import _protocol
from dipy_spinverse.geometry.substrates.packed import _fill
from dipy_spinverse.geometry.substrates.substrate import substrate_from_labels
from dipy_spinverse.io.datasets import read_cat_spinal_cord, read_isbi2015
from dipy_spinverse.posterior import TissuePrior
from dipy_spinverse.posterior.simulator import _boxes
from dipy_spinverse.sim.forward import converged_substeps, simulate
from dipy_spinverse.sim.grid import TetGrid
from dipy_spinverse.sim.sections import fibre_frame
from dipy_spinverse.sim.sequences import Protocol, hcp_protocol, published_protocol

TIMINGS = ((0.005, 0.006), (0.010, 0.020), (0.010, 0.060))
BVALS = (1000.0, 2500.0, 4000.0)


def main(argv=None):
    parser = harness.parser(
        __doc__,
        seed=1,
        quick="4 draws at resolution 3, one of each side compared, the old "
        "engine to 2 sub-steps (a smoke test)",
    )
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--n_directions", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=6)
    parser.add_argument("--cell_diameter", type=float, nargs=2, default=(1.0, 25.0))
    parser.add_argument("--min_spacings", type=float, default=3.0)
    parser.add_argument("--time_tolerance", type=float, default=1e-3)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--n_train", type=int, default=3000)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--families", nargs="+", default=None, help="default: the prior's default"
    )
    parser.add_argument(
        "--protocol",
        choices=("demo", "published", "hcp", "cord", "isbi"),
        default="demo",
    )
    parser.add_argument(
        "--compare_old",
        type=int,
        default=0,
        metavar="N",
        help="simulate the first N draws of each patch side with the old engine "
        "(3-D tetrahedral patch) too, and both against converged references",
    )
    parser.add_argument("--old_max_substeps", type=int, default=16)
    parser.add_argument("--reference_tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.resolution = 4, 3
        args.compare_old = args.compare_old or 1
        args.old_max_substeps = min(args.old_max_substeps, 2)
    if args.compare_old and args.time_tolerance is None:
        parser.error("--compare_old needs a --time_tolerance (measured sub-steps)")
    protocol = {
        "demo": lambda: _protocol(TIMINGS, BVALS, args.n_directions, 3),
        "published": published_protocol,
        "hcp": hcp_protocol,
        # The real datasets' whole schemes (dmipy's files, read by path).
        "cord": lambda: read_cat_spinal_cord("2d").protocol,
        "isbi": lambda: read_isbi2015().protocol,
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
        device=args.device,
        batch_size=args.batch_size,
    )
    plain = simulator._simulate, simulator._measure_substeps
    regular, pilot = _timed(simulator)
    start = time.perf_counter()
    simulator.sample(args.n, seed=args.seed)
    total = time.perf_counter() - start
    compared = None
    if args.compare_old:
        # The same draws again: draw i depends only on the seed and i.
        draws, _ = simulator._draws(args.n, args.seed, None, False)
        simulator._simulate, simulator._measure_substeps = plain
        start = time.perf_counter()
        compared = _compare(simulator, draws, args)
        compare_wall = time.perf_counter() - start
    print(
        f"{machine(simulator.device)}, {args.dtype}, batches of {args.batch_size}; "
        f"{len(protocol)} volumes; {prior!r}; time_tolerance {args.time_tolerance}"
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
    if compared is not None:
        _print_comparison(compared, args, compare_wall)


def machine(device):
    """Where a benchmark ran: the processor, its threads, torch, the device."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, device {device} ({name})"
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


def _compare(simulator, draws, args):
    """Per patch side: the new and the old engine on its first
    ``args.compare_old`` draws, each against its converged reference."""
    prior = simulator.prior
    by_box = _boxes(draws)
    out = []
    for box in sorted(by_box):
        side, _, section = box
        if not section:
            continue  # a 3-D family's draw: already on the old engine
        rows = by_box[box][: args.compare_old]
        grid = prior.grid(side, section=True)
        kept = simulator.measured_substeps[box][0]
        new = _Memo(
            lambda n, g=grid, r=rows: simulator._simulate(g, draws, r, substeps=n)
        )
        new_signals = new(kept)
        new_ref = _reference(
            new, kept, args.reference_tolerance, simulator.MAX_SUBSTEPS
        )
        old = [_old(simulator, draws[i], args) for i in rows]
        old = [o for o in old if o is not None]
        row = dict(
            side=side,
            spacing=side / prior.resolution,
            share=len(by_box[box]) / len(draws),
            rows=len(rows),
            new_substeps=kept,
            new_seconds=new.seconds[kept] / len(rows),
            new_reference=new_ref[:2],
            new_error=float(np.abs(new_signals - new_ref[2]).max()),
            old_rows=len(old),
        )
        if old:
            row.update(
                old_substeps=max(o["substeps"] for o in old),
                old_seconds=float(np.mean([o["seconds"] for o in old])),
                old_reference=max((o["reference"] for o in old), key=lambda r: r[1]),
                old_error=float(np.max([o["error"] for o in old])),
                old_cells=old[0]["cells"],
                difference=max(
                    float(np.abs(o["signal"] - new_ref[2][k]).max())
                    for k, o in enumerate(old)
                ),
            )
        out.append(row)
        print(f"compared side {side:.2f} um ({len(rows)} draws)", flush=True)
    return out


class _Memo:
    """``signals(n)`` computed once per multiple ``n``, with its seconds."""

    def __init__(self, signals):
        self.signals, self.cache, self.seconds = signals, {}, {}

    def __call__(self, n):
        if n not in self.cache:
            start = time.perf_counter()
            self.cache[n] = np.asarray(self.signals(n))
            self.seconds[n] = time.perf_counter() - start
        return self.cache[n]


def _reference(signals, start, tolerance, max_substeps):
    """Double the multiple from ``start`` (its doubling already known to the
    pilot) until the signals move by less than ``tolerance`` or the multiple
    would pass ``max_substeps``: (multiple, last change, signals), the finest
    computed."""
    n, previous, change = start, signals(start), float("nan")
    while 2 * n <= max_substeps:
        finer = signals(2 * n)
        change, n, previous = float(np.abs(finer - previous).max()), 2 * n, finer
        if change < tolerance:
            break
    return n, change, previous


def _old(simulator, draw, args):
    """One draw on the former engine: the same fibres along z of a 3-D
    periodic BCC patch, the protocol turned into their frame; None where a
    fibre is empty on the cubic grid."""
    prior = simulator.prior
    grid = _bcc(float(draw.side), prior.resolution)
    frame = fibre_frame(np.asarray(draw.axis, dtype=float))
    params = draw.substrate.params
    # The section's seeds in its plane's coordinates, as the cube's (x, y).
    seeds = np.array([frame[:2] @ np.asarray(p["seed"]) for p in params]) % draw.side
    factors = np.array([p["size"] for p in params])
    xy = np.mod(grid.cell_centroids[:, :2], draw.side)
    images = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)]) * draw.side
    distance = np.stack(
        [
            np.linalg.norm(xy[None] - (seed + images)[:, None], axis=-1).min(0)
            for seed in seeds
        ]
    )
    try:
        labels = _fill(
            grid,
            distance / factors[:, None],
            draw.descriptors["restricted_fraction"],
            len(seeds),
        )
    except ValueError:
        return None
    substrate = substrate_from_labels(
        grid,
        labels,
        kappa=np.asarray(draw.substrate.permeability, dtype=float),
        kinds=["fibre"] * len(seeds),
        params=params,
    )
    protocol = simulator.protocol
    turned = Protocol(
        waveforms=protocol.waveforms,
        bvals=protocol.bvals,
        bvecs=protocol.bvecs @ frame.T,
    )

    def run(n):
        with torch.no_grad():
            return simulate(
                grid,
                substrate.face_permeability[None],
                turned,
                diffusivity=np.full((1, grid.n_cells), draw.diffusivity),
                dtype=simulator.dtype,
                method=simulator.method,
                phase_step=simulator.PHASE_STEP,
                substeps=n,
            )[0].numpy()

    old = _Memo(run)
    kept, signal, _ = converged_substeps(
        old, args.time_tolerance, max_substeps=args.old_max_substeps
    )
    reference = _reference(old, kept, args.reference_tolerance, args.old_max_substeps)
    # No finer multiple affordable: no error to state (nan, printed as such).
    error = np.abs(signal - reference[2]).max() if reference[0] > kept else np.nan
    return dict(
        substeps=kept,
        seconds=old.seconds[kept],
        reference=reference[:2],
        error=float(error),
        signal=reference[2],
        cells=grid.n_cells,
    )


def _bcc(side, resolution):
    return TetGrid.bcc(side, resolution, boundary="periodic")


def _print_comparison(rows, args, wall):
    """The old engine against the new, per patch side, and the prior's mean."""
    print(
        f"old engine (3-D BCC patch, Chebyshev) against new (section), first "
        f"{args.compare_old} draw(s) of each side; references: sub-steps doubled "
        f"until the signals move < {args.reference_tolerance:g} (old: at most "
        f"{args.old_max_substeps}); {wall:.0f} s"
    )
    print(
        f"{'side um':>8} {'draws':>5} {'new sub':>7} {'new s':>7} {'new err':>8} "
        f"{'ref (move)':>14} {'old sub':>7} {'old s':>8} {'old err':>8} "
        f"{'ref (move)':>14} {'speed-up':>8} {'old-new':>8}"
    )
    mean_new = mean_old = share_old = 0.0
    worst_new = worst_old = 0.0
    for r in rows:
        mean_new += r["share"] * r["new_seconds"]
        worst_new = max(worst_new, r["new_error"])
        line = (
            f"{r['side']:8.2f} {r['rows']:5d} {r['new_substeps']:7d} "
            f"{r['new_seconds']:7.3f} {r['new_error']:8.1e} "
            f"{_ref(r['new_reference']):>14}"
        )
        if r["old_rows"]:
            mean_old += r["share"] * r["old_seconds"]
            share_old += r["share"]
            worst_old = float(np.fmax(worst_old, r["old_error"]))
            line += (
                f" {r['old_substeps']:7d} {r['old_seconds']:8.2f} "
                f"{r['old_error']:8.1e} {_ref(r['old_reference']):>14} "
                f"{r['old_seconds'] / r['new_seconds']:8.1f} "
                f"{r['difference']:8.1e}"
            )
        else:
            line += "  (no fibre survives the cubic grid's rasterisation)"
        print(line)
    share_new = sum(r["share"] for r in rows)
    mean_new /= share_new
    mean_old = mean_old / share_old if share_old else float("nan")
    print(
        f"{'mean':>8} {'':5} {'':7} {mean_new:7.3f} {worst_new:8.1e} {'':>14} "
        f"{'':7} {mean_old:8.2f} {worst_old:8.1e} {'':>14} "
        f"{mean_old / mean_new:8.1f}"
    )


def _ref(reference):
    n, change = reference
    return f"{n} ({change:.0e})"


if __name__ == "__main__":
    main()
