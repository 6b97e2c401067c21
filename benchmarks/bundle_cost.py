"""Regenerates the tables of doc/validation/white_matter.md.

"What a bundle costs": seconds to simulate one section of myelinated
axons (:func:`~dipy_spinverse.geometry.substrates.axon_bundle`) with the
white-matter physics (a diffusivity, a T2 and a water density per
compartment), against the default prior's section.

For each row: ``n_axons`` axons of gamma-distributed diameters (shape 4,
the row's mean), g-ratios 0.6-0.8, fibre fraction 0.7, permeability
1e-5-1e-4 m/s; the grid's spacing is the mean axon's sheath thickness over
``cells_per_sheath``. Compartments (fixed tissue, 37 C, literature values
of doc/validation/white_matter.md): D 1.7 / 2.0 / 0.3 um^2/ms (intra,
extra, myelin), T2 70 / 60 / 15 ms, myelin water density 0.45. The Magnus
sub-steps are measured on the first bundle (doubled until the signals
change by at most 1e-3, the prior's time tolerance), then the row's
bundles are simulated together at that count: seconds a bundle after the
pilot, and the pilot's seconds.

"Sub-grid axons" (``--subgrid``): 20 axons of mean 1 um (in vivo tissue,
the middles of the prior's in vivo ranges: D 2.2 / 1.7 / 0.27 um^2/ms,
T2 85 / 62 / 14 ms, myelin water density 0.45), fully resolved (one cell a
sheath, the reference) and with the axons thinner than ``resolve_above``
held as sub-grid pools (:mod:`~dipy_spinverse.sim.pools`) on the coarsest
grid that puts 3 cells across the thinnest kept axon, and on a grid twice
finer. The same draws (the same seed: the same discs) at every row;
sub-steps measured on each section (to 1e-3); seconds a section (its own
pilot apart), and the largest and the root-mean-square difference of its
signals from the resolved bundle at one cell a sheath (the cost table's),
and with ``--smooth`` from the resolved bundle at two cells a sheath with
every membrane's permeability scaled by its axon's smooth perimeter over
its staircase's (a staircase is 1.2-1.35 times longer than the circle it
follows, at any refinement, and exchanges that much faster; the sub-grid
links use the circles' perimeters).

Run::

    OPENBLAS_NUM_THREADS=1 python benchmarks/bundle_cost.py --protocols demo cord
    OPENBLAS_NUM_THREADS=1 python benchmarks/bundle_cost.py --subgrid --n 1

``--quick``: one small row of each table on the demo protocol.
"""

import time
from dataclasses import replace

import harness
import numpy as np
import torch
from protocol_cost import _mean, measure, protocol_named

from dipy_spinverse import simulate
from dipy_spinverse.geometry.substrates import axon_bundle, bundle_side
from dipy_spinverse.sim.forward import converged_substeps
from dipy_spinverse.sim.sections import SectionGrid

#: (mean inner diameter um, axons, cells across the mean axon's sheath)
ROWS = ((1.0, 20, 1), (3.0, 20, 1), (3.0, 20, 2), (3.0, 8, 1))
SHAPE, G_RATIO, FIBRE, KAPPA = 4.0, (0.6, 0.8), 0.7, (1e-5, 1e-4)
TIME_TOL = 1e-3
#: Sub-grid rows: (mean inner diameter um, axons), the resolve_above values
#: (um) and the grids' refinements over 3 cells across the thinnest kept axon.
SUBGRID = (1.0, 20)
RESOLVE_ABOVE = (1.5, 2.0, 3.0)
REFINE = (1, 2)
#: In vivo tissue (extra, intra, myelin): the middles of WhiteMatterPrior's.
IN_VIVO = dict(
    diffusivity=(1.7e-3, 2.2e-3, 0.27e-3),
    t2=(0.062, 0.085, 0.014),
    density=(1, 1, 0.45),
)


def bundle_row(protocol, mean, n_axons, cells_per_sheath, n, seed):
    """Seconds a bundle (after the pilot), the pilot's seconds, the grid and
    the sub-step count of one row."""
    side = bundle_side(n_axons, mean, SHAPE, G_RATIO, FIBRE)
    sheath = mean * (1 / np.mean(G_RATIO) - 1) / 2
    grid = SectionGrid.triangular(side, int(np.ceil(side * cells_per_sheath / sheath)))
    rng = np.random.default_rng(seed)
    bundles = []
    while len(bundles) < n:
        try:
            bundles.append(_draw(grid, rng, mean, n_axons, None))
        except ValueError:
            continue  # an axon finer than the grid: drawn again, as a prior does
    options = dict(
        diffusivity=np.stack([b.per_cell(2.0e-3, 1.7e-3, 0.3e-3) for b in bundles]),
        t2=np.stack([b.per_cell(0.06, 0.07, 0.015) for b in bundles]),
        density=np.stack([b.per_cell(1.0, 1.0, 0.45) for b in bundles]),
        axes=np.tile([0.0, 0.0, 1.0], (n, 1)),
    )
    kappa = np.stack([b.face_permeability for b in bundles])

    def run(rows, substeps):
        with torch.no_grad():
            return simulate(
                grid,
                kappa[rows],
                protocol,
                substeps=substeps,
                **{k: v[rows] for k, v in options.items()},
            ).numpy()

    start = time.perf_counter()
    substeps, _, error = converged_substeps(lambda k: run([0], k), TIME_TOL)
    pilot = time.perf_counter() - start
    start = time.perf_counter()
    run(slice(None), substeps)
    seconds = (time.perf_counter() - start) / n
    return dict(
        cells=grid.n_cells,
        spacing=grid.spacing,
        seconds=seconds,
        pilot=pilot,
        substeps=substeps,
        error=error,
    )


def _draws(grid, mean, n_axons, n, seed, resolve_above=None):
    """The first ``n`` bundles of ``seed`` that ``grid`` holds, each with
    its draw's index (a draw the grid cannot hold is skipped)."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(50 * n):
        state = rng.bit_generator.state
        try:
            bundle = _draw(grid, rng, mean, n_axons, resolve_above)
        except ValueError:
            continue
        out.append((index, state, bundle))
        if len(out) == n:
            break
    return out


def _redraw(grid, state, mean, n_axons, resolve_above):
    """The draw of ``state`` (a generator state) into ``grid``."""
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return _draw(grid, rng, mean, n_axons, resolve_above)


def _draw(grid, rng, mean, n_axons, resolve_above):
    """The table's bundle drawn from ``rng`` into ``grid``."""
    return axon_bundle(
        grid,
        rng=rng,
        n_axons=n_axons,
        mean_diameter=mean,
        shape=SHAPE,
        g_ratio=G_RATIO,
        fibre_fraction=FIBRE,
        permeability=KAPPA,
        resolve_above=resolve_above,
    )


def _smooth_membranes(grid, bundle):
    """``bundle``'s face permeabilities with each axon's inner and outer
    membranes scaled by its circle's perimeter over its staircase's (an
    edge on both, an axon bare of its sheath, takes both factors)."""
    a, b = grid.face_cells.T
    comp, axon = bundle.compartment, bundle.axon
    scale = np.ones(grid.n_faces)
    for k in range(1, bundle.n_axons + 1):
        in_a, in_b = axon[a] == k, axon[b] == k
        inner = (in_a & (comp[a] == 1)) != (in_b & (comp[b] == 1))
        outer = in_a != in_b
        for faces, diameter in (
            (inner, bundle.inner_diameters[k - 1]),
            (outer, bundle.outer_diameters[k - 1]),
        ):
            if faces.any():
                scale[faces] *= np.pi * diameter / grid.face_areas[faces].sum()
    kappa = bundle.face_permeability
    return np.where(np.isfinite(kappa), kappa * scale, kappa)


def _section_signals(bundle, protocol):
    """Signals of one section (in vivo tissue, fibres along z), the seconds
    after its pilot, the pilot's seconds and the sub-steps."""
    options = {k: bundle.per_cell(*v) for k, v in IN_VIVO.items()}

    def run(substeps):
        with torch.no_grad():
            return simulate(
                bundle.grid,
                bundle.face_permeability,
                protocol,
                substeps=substeps,
                **options,
            ).numpy()

    start = time.perf_counter()
    substeps, _, _ = converged_substeps(run, TIME_TOL)
    pilot = time.perf_counter() - start
    start = time.perf_counter()
    signals = run(substeps)
    return signals, time.perf_counter() - start, pilot, substeps


def subgrid_rows(protocol, mean, n_axons, n, seed, resolve_above, refine, smooth=False):
    """The reference (fully resolved) and each (resolve_above, refinement)
    row: dicts of cells, pools, spacing, seconds, pilot, sub-steps, and the
    signals' largest and root-mean-square difference from the reference
    (and, with ``smooth``, the largest from the two-cell reference with
    smooth membranes). Rows are yielded as they are measured."""
    side = bundle_side(n_axons, mean, SHAPE, G_RATIO, FIBRE)
    sheath = mean * (1 / np.mean(G_RATIO) - 1) / 2
    fine = SectionGrid.triangular(side, int(np.ceil(side / sheath)))
    finer = SectionGrid.triangular(side, int(np.ceil(2 * side / sheath)))
    draws = _draws(fine, mean, n_axons, n, seed)
    reference = [_section_signals(b, protocol) for _, _, b in draws]
    smooth_refs, smooth_bundles = [], []
    for _, state, _ in draws if smooth else ():
        bundle = _redraw(finer, state, mean, n_axons, None)
        bundle = replace(bundle, face_permeability=_smooth_membranes(finer, bundle))
        smooth_bundles.append(bundle)
        smooth_refs.append(_section_signals(bundle, protocol))

    def largest(diffs):
        return float(np.abs(diffs).max()) if len(diffs) else float("nan")

    def row(grid, above, factor, bundles, results):
        diffs = np.array([r[0] - f[0] for r, f in zip(results, reference, strict=True)])
        smooth_diffs = (
            [r[0] - f[0] for r, f in zip(results, smooth_refs or results, strict=True)]
            if smooth_refs
            else []
        )
        return dict(
            resolve_above=above,
            refine=factor,
            cells=np.mean(
                [getattr(b.grid, "n_grid_cells", grid.n_cells) for b in bundles]
            ),
            pools=np.mean([getattr(b.grid, "n_pools", 0) for b in bundles]),
            subgrid=np.mean([b.subgrid.mean() for b in bundles]),
            spacing=grid.spacing,
            seconds=np.mean([r[1] for r in results]),
            pilot=np.mean([r[2] for r in results]),
            substeps=results[0][3],
            max=largest(diffs),
            rms=float(np.sqrt(np.mean(diffs**2))),
            max_smooth=largest(smooth_diffs),
            label=None,
        )

    first = row(fine, None, None, [b for _, _, b in draws], reference)
    yield dict(first, label=1)
    if smooth:
        yield dict(row(finer, None, None, smooth_bundles, smooth_refs), label=2)
    for above in resolve_above:
        for factor in refine:
            grid = SectionGrid.triangular(side, int(np.ceil(factor * 3 * side / above)))
            bundles, results = [], []
            for _, state, _ in draws:
                try:
                    bundles.append(_redraw(grid, state, mean, n_axons, above))
                except ValueError:
                    break  # a kept axon finer than this grid: the row is left out
                results.append(_section_signals(bundles[-1], protocol))
            if len(results) == len(draws):
                yield row(grid, above, factor, bundles, results)


def _subgrid_table(args, default):
    mean, n_axons = SUBGRID
    above, refine = RESOLVE_ABOVE, REFINE
    if args.quick:
        mean, n_axons, above, refine = 3.0, 4, (3.0,), (1,)
    titles = ["protocol", "resolve_above (um)", "grid", "sub-grid axons"]
    titles += ["cells + pools", "spacing (um)", "s a section", "pilot s"]
    titles += ["sub-steps", "x default", "max diff (1 cell)", "rms diff (1 cell)"]
    print(
        "\n" + harness.head([*titles, "max diff (2 cells, smooth)"], "-r-" + "r" * 10)
    )
    for name in args.protocols:
        protocol = protocol_named(name)
        rows = subgrid_rows(
            protocol, mean, n_axons, args.n, args.seed, above, refine, args.smooth
        )
        for row in rows:
            label = (
                f"resolved, {row['label']} cell(s) a sheath"
                if row["refine"] is None
                else f"{row['refine']:g} x coarsest"
            )
            kept = "--" if row["resolve_above"] is None else f"{row['resolve_above']:g}"
            cells = [name, kept, label, f"{100 * row['subgrid']:.0f} %"]
            cells += [
                f"{row['cells']:.0f} + {row['pools']:.0f}",
                f"{row['spacing']:.3f}",
            ]
            cells += [f"{row['seconds']:.2f}", f"{row['pilot']:.1f}", row["substeps"]]
            cells += [f"{row['seconds'] / default[name]:.0f}", f"{row['max']:.4f}"]
            cells += [f"{row['rms']:.4f}", f"{row['max_smooth']:.4f}"]
            print(harness.row(cells), flush=True)


def main(argv=None):
    parser = harness.parser(
        __doc__, seed=0, quick="one small row of each table on the demo protocol"
    )
    parser.add_argument("--protocols", nargs="+", default=["demo", "cord"])
    parser.add_argument("--n", type=int, default=4, help="bundles a row")
    parser.add_argument(
        "--subgrid", action="store_true", help="only the sub-grid axons' table"
    )
    parser.add_argument(
        "--smooth",
        action="store_true",
        help="also the two-cell reference with smooth membranes (slow)",
    )
    args = parser.parse_args(argv)
    rows = ROWS
    if args.quick:
        args.protocols, args.n, rows = ["demo"], 1, ((3.0, 4, 1),)
    default = {}
    if args.subgrid:
        for name in args.protocols:
            default[name] = _mean(
                measure(name, max(args.n, 2), args.seed, 6)[0]["sides"]
            )
            print(f"default prior on {name}: {default[name]:.3f} s a section")
        _subgrid_table(args, default)
        return
    titles = ["protocol", "section", "axons", "mean d (um)", "cells", "spacing (um)"]
    titles += ["s a section", "pilot s", "sub-steps", "x default"]
    print(harness.head(titles, "--" + "r" * 8))
    for name in args.protocols:
        protocol = protocol_named(name)
        default[name] = _mean(measure(name, max(args.n, 2), args.seed, 6)[0]["sides"])
        print(
            f"| {name} | default prior (1-4 axons, res. 6) | 1-4 | 1-25 | ~84 | "
            f"| {default[name]:.3f} | | | 1.0 |"
        )
        for mean, n_axons, per_sheath in rows:
            got = bundle_row(protocol, mean, n_axons, per_sheath, args.n, args.seed)
            cells = [name, f"bundle, {per_sheath} cell(s) a sheath", n_axons]
            cells += [f"{mean:g}", got["cells"], f"{got['spacing']:.3f}"]
            cells += [f"{got['seconds']:.2f}", f"{got['pilot']:.1f}", got["substeps"]]
            cells += [f"{got['seconds'] / default[name]:.0f}"]
            print(harness.row(cells), flush=True)
    if args.quick:
        _subgrid_table(args, default)


if __name__ == "__main__":
    main()
