"""Regenerates the tables of doc/validation/mesh_inversion.md.

``--quick``: one coarse mesh, once, no fits.

Benchmark of the mesh-shape inversion (issue 14): timing and small fits.

Prints two tables:

1. Forward + gradient time of :func:`dipy_spinverse.meshfit.mesh_signal` on
   a ball mesh of about 5,000 tetrahedra with the 540-acquisition published
   protocol (target <= 2 s on 2 cores), with the eigenbasis time apart.
2. (``--fits``) Recovered radius of a sphere and of a straight axon, noise
   free and at SNR 100 (Rician), with a reduced protocol.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/meshfit.py [--fits] [--repeats 3]
"""

import argparse
import time

import numpy as np
import torch
from dipy.sims.voxel import add_noise

from dipy_spinverse.meshfit import (
    axon_mesh,
    ball_mesh,
    fit_mesh,
    mesh_basis,
    mesh_signal,
)
from dipy_spinverse.sim.sequences import Protocol, fibonacci_sphere, published_protocol


def time_forward(resolution, length_scale, repeats):
    mesh = ball_mesh(5.0, resolution=resolution)
    protocol = published_protocol()
    t0 = time.perf_counter()
    basis = mesh_basis(mesh, length_scale=length_scale)
    t_basis = time.perf_counter() - t0
    best = np.inf
    for _ in range(repeats):
        vertices = torch.tensor(mesh.vertices, requires_grad=True)
        t0 = time.perf_counter()
        signal = mesh_signal(mesh, protocol, vertices=vertices, basis=basis)
        signal.sum().backward()
        best = min(best, time.perf_counter() - t0)
    return mesh.n_tets, basis.n_modes, t_basis, best


def reduced_protocol():
    dirs = fibonacci_sphere(8, hemisphere=True)
    parts = []
    for small_delta, big_delta in ((0.010, 0.020), (0.010, 0.060)):
        bvals = np.r_[0.0, np.repeat([1000.0, 3000.0, 5000.0], len(dirs))]
        bvecs = np.r_[[[0.0, 0.0, 0.0]], np.tile(dirs, (3, 1))]
        parts.append(
            Protocol.pgse(bvals, bvecs, small_delta=small_delta, big_delta=big_delta)
        )
    return Protocol.concatenate(*parts)


def fits(snr_values, seed=0):
    protocol = reduced_protocol()
    cases = [
        ("sphere r 4.6", ball_mesh(4.6, resolution=4), "ball", 4.6),
        ("axon r 3.6", axon_mesh(3.6, 20.0, resolution=4), "tube", 3.6),
    ]
    rows = []
    rng = np.random.default_rng(seed)
    for name, truth, template, radius in cases:
        clean = mesh_signal(truth, protocol).numpy()
        for snr in snr_values:
            signal = clean
            if snr is not None:
                signal = add_noise(clean, snr, 1.0, noise_type="rician", rng=rng)
            t0 = time.perf_counter()
            fit = fit_mesh(
                signal,
                protocol,
                template=template,
                n_modes=1,
                max_iter=40,
                sigma=0.0 if snr is None else 1.0 / snr,
                noise="gaussian" if snr is None else "rician",
            )
            seconds = time.perf_counter() - t0
            rows.append(
                (name, "inf" if snr is None else snr, radius, fit.radius, seconds)
            )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fits", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one coarse mesh, once, no fits (a smoke test)",
    )
    args = parser.parse_args(argv)
    sizes = ((5, 2.0), (5, 1.0))
    if args.quick:
        args.repeats, args.fits, sizes = 1, False, ((3, 2.0),)
    print(f"torch threads: {torch.get_num_threads()}")
    print("| mesh tets | modes | length scale (um) | basis (s) | forward+grad (s) |")
    print("| --- | --- | --- | --- | --- |")
    for resolution, length_scale in sizes:
        n_tets, n_modes, t_basis, t_fb = time_forward(
            resolution, length_scale, args.repeats
        )
        print(
            f"| {n_tets} | {n_modes} | {length_scale:g} | {t_basis:.2f} | {t_fb:.2f} |"
        )
    if args.fits:
        print()
        print("| cell | SNR | true radius (um) | fitted (um) | error | time (s) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, snr, truth, fitted, seconds in fits([None, 100]):
            print(
                f"| {name} | {snr} | {truth:.2f} | {fitted:.3f} | "
                f"{100 * (fitted / truth - 1):+.1f}% | {seconds:.0f} |"
            )


if __name__ == "__main__":
    main()
