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

Run::

    OPENBLAS_NUM_THREADS=1 python benchmarks/bundle_cost.py --protocols demo cord

``--quick``: one small row on the demo protocol.
"""

import argparse
import time

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
            bundles.append(
                axon_bundle(
                    grid,
                    rng=rng,
                    n_axons=n_axons,
                    mean_diameter=mean,
                    shape=SHAPE,
                    g_ratio=G_RATIO,
                    fibre_fraction=FIBRE,
                    permeability=KAPPA,
                )
            )
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocols", nargs="+", default=["demo", "cord"])
    parser.add_argument("--n", type=int, default=4, help="bundles a row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rows = ROWS
    if args.quick:
        args.protocols, args.n, rows = ["demo"], 1, ((3.0, 4, 1),)
    print(
        "| protocol | section | axons | mean d (um) | cells | spacing (um) "
        "| s a section | pilot s | sub-steps | x default |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.protocols:
        protocol = protocol_named(name)
        default = _mean(measure(name, max(args.n, 2), args.seed, 6)[0]["sides"])
        print(
            f"| {name} | default prior (1-4 axons, res. 6) | 1-4 | 1-25 | ~84 | "
            f"| {default:.3f} | | | 1.0 |"
        )
        for mean, n_axons, per_sheath in rows:
            got = bundle_row(protocol, mean, n_axons, per_sheath, args.n, args.seed)
            print(
                f"| {name} | bundle, {per_sheath} cell(s) a sheath | {n_axons} "
                f"| {mean:g} | {got['cells']} | {got['spacing']:.3f} "
                f"| {got['seconds']:.2f} | {got['pilot']:.1f} | {got['substeps']} "
                f"| {got['seconds'] / default:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
