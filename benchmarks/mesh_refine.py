"""Refinement of a grid label surface into a smooth mesh (issue 14).

A sphere (or, ``--shape cylinder``, a cylinder along z running through the
reflecting box: a closed tube as long as the box) in a voxel of the
published grid (26.7 um box, 6.7 um spacing): its label is the staircase
of grid cells whose centroid is inside
(:func:`dipy_spinverse.geometry.phantoms.sphere`), the labelling a perfect label
search would return. :func:`dipy_spinverse.meshfit.refine_cell` starts a
ball from that label's surface and fits it to the voxel's signal.

The voxel's signal: the true sphere (a resolution-4 ball mesh, eigenbasis
1 um) weighted by its volume fraction, plus the rest of the box simulated by
the grid simulator with the label's membrane (1e-5 m/s) and started outside
the label. The rest is the one the refinement assumes (its model has the
same background term): what is held out is the cell's shape, not the
background.

Prints the radius and the Chamfer distance to the true sphere of the label
surface, of the start (the ball matched to it) and of the refined mesh,
noise free and at SNR 100 (Rician). With ``--search`` the label is not
given: Spinverse's label search (:func:`dipy_spinverse.inverse.reconstruct`,
``preset="default"``, ``sigma`` told) finds it from the same signal, and the
refinement starts from the largest cell it finds: the grid surface and the
smooth mesh of one fit, compared on the same signals.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/mesh_refine.py [--radius 9] [--search]
"""

import argparse
import time

import numpy as np
import torch
from dipy.sims.voxel import add_noise
from mesh_experiments import reduced_protocol

from dipy_spinverse import TetGrid, simulate
from dipy_spinverse.geometry.phantoms import cylinder, sphere
from dipy_spinverse.inverse import reconstruct
from dipy_spinverse.meshfit import (
    ball_mesh,
    mesh_signal,
    surface_chamfer,
    tube_mesh,
)
from dipy_spinverse.meshfit.refine import (
    label_surface,
    largest_cell,
    refine_cell,
    refine_template,
)
from dipy_spinverse.meshfit.surface import fit_surface
from dipy_spinverse.meshfit.templates import axis_radius
from dipy_spinverse.sim.signals import normalise_b0


def voxel_signal(grid, phantom, truth, protocol):
    inside = phantom.labels > 0
    with torch.no_grad():
        rest = simulate(grid, phantom.permeability, protocol, initial=~inside)
    rest = normalise_b0(rest.numpy(), protocol)
    cell = mesh_signal(truth, protocol).numpy()
    fraction = truth.volume / grid.volume
    return fraction * cell + (1.0 - fraction) * rest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("sphere", "cylinder"), default="sphere")
    parser.add_argument("--radius", type=float, default=None)
    parser.add_argument("--max-iter", type=int, default=40)
    parser.add_argument("--n-modes", type=int, default=4)
    parser.add_argument(
        "--search", action="store_true", help="labels from the label search"
    )
    args = parser.parse_args()
    grid = TetGrid.bcc(80 / 3, 4)
    centre = np.full(3, grid.size / 2)
    kind = "ball" if args.shape == "sphere" else "tube"
    if args.radius is None:
        args.radius = 9.0 if kind == "ball" else 6.0
    if kind == "ball":
        phantom = sphere(grid, radius=args.radius, kappa=1e-5)
        truth = ball_mesh(args.radius, resolution=4, centre=centre)
    else:
        phantom = cylinder(grid, radius=args.radius, kappa=1e-5)
        tube = tube_mesh(args.radius, grid.size, resolution=4)
        truth = tube.moved(tube.vertices + centre)
    protocol = reduced_protocol()
    clean = voxel_signal(grid, phantom, truth, protocol)
    tv, tf = truth.vertices, truth.boundary_faces
    inside = phantom.labels > 0
    label = label_surface(grid, inside)
    options = dict(n_modes=args.n_modes, max_iter=args.max_iter, template=kind)
    start_template = refine_template(
        kind, label.vertices, grid.cell_volumes[inside].sum()
    )
    shape, code = fit_surface(
        label.vertices,
        label.triangles,
        template=start_template,
        n_modes=args.n_modes,
        directions="normal",
    )
    start = shape.mesh(code)

    def radius_of(surface, volume):
        """Ball: of the same volume; tube: its side's distance from the axis
        (the label: of the cylinder of its volume and the box's length)."""
        if kind == "ball":
            return (3 * volume / (4 * np.pi)) ** (1 / 3)
        if surface is None:
            return np.sqrt(volume / (np.pi * grid.size))
        return axis_radius(surface)

    rows = [
        (
            "grid label surface",
            radius_of(None, label.volume),
            surface_chamfer(label.vertices, label.triangles, tv, tf),
            0.0,
        ),
        (
            f"start ({kind} matched to it)",
            radius_of(start, start.volume),
            surface_chamfer(start.vertices, start.boundary_faces, tv, tf),
            0.0,
        ),
    ]
    rng = np.random.default_rng(0)
    for snr in (None, 100):
        signal = (
            clean
            if snr is None
            else add_noise(clean, snr, 1.0, noise_type="rician", rng=rng)
        )
        labels, permeability = phantom.labels, phantom.permeability
        t0 = time.perf_counter()
        if args.search:
            found = reconstruct(
                grid, signal, protocol, sigma=0.0 if snr is None else 1.0 / snr
            )
            labels, permeability = found.labels, found.permeability
            cell = labels == largest_cell(grid, labels)
            surface = label_surface(grid, cell)
            rows.append(
                (
                    f"label search, SNR {snr or 'inf'} ({labels.max()} cells)",
                    radius_of(None, surface.volume),
                    surface_chamfer(surface.vertices, surface.triangles, tv, tf),
                    time.perf_counter() - t0,
                )
            )
            t0 = time.perf_counter()
        name = f"refined{' from it' if args.search else ''}, SNR {snr or 'inf'}"
        try:
            fit = refine_cell(
                grid,
                labels,
                permeability,
                signal,
                protocol,
                sigma=0.0 if snr is None else 1.0 / snr,
                noise="gaussian" if snr is None else "rician",
                options=options,
            )
        except ValueError as err:  # as SpinverseModel flags MESH_FAILED
            rows.append((f"{name}: failed ({err})", np.nan, np.nan, np.nan))
            continue
        rows.append(
            (
                name,
                radius_of(fit.mesh, fit.volume),
                surface_chamfer(fit.vertices, fit.faces, tv, tf),
                time.perf_counter() - t0,
            )
        )
    print(
        f"{args.shape} radius {args.radius} um; grid spacing {grid.spacing:.2f} um; "
        f"label {int(inside.sum())} cells; {len(protocol)} acquisitions; "
        f"{args.n_modes} modes, {args.max_iter} iterations"
    )
    print("| surface | radius (um) | error | Chamfer to truth (um) | time (s) |")
    print("| --- | --- | --- | --- | --- |")
    for name, radius, chamfer, seconds in rows:
        print(
            f"| {name} | {radius:.3f} | {100 * (radius / args.radius - 1):+.1f}% "
            f"| {chamfer:.2f} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
