"""How many Laplace modes a signal needs, in each frame (issue 58).

Prints, for a permeable sphere and for draws of the default prior's
reflecting variant, the largest signal error of the matrix formalism with K
modes against the Chebyshev engine on the same grid, and the time of each:

* laboratory frame (reflecting boxes), ``simulate(..., method="modes")``'s
  basis: the operator's K lowest modes and the projected positions;
* phase-unwrapped frame (periodic patches): the K lowest modes of the k = 0
  operator, the wavevector's coupling projected onto them exactly (the BCC
  grid's 12 circumcentre displacements: ``G_K(k) = Lambda + sum_c (1 -
  exp(-i k . d_c)) Phi^T W_c Phi``), fourth-order Magnus in time.

Usage: ``python benchmarks/modes_probe.py [--draws 3]`` (a few minutes on 2
cores). Results: doc/validation/modes.md.
"""

import argparse
import math
import time

import numpy as np
import scipy.sparse as sp
import torch

from dipy_spinverse.data import _protocol
from dipy_spinverse.posterior.prior import TissuePrior
from dipy_spinverse.sim.forward import simulate
from dipy_spinverse.sim.grid import TetGrid
from dipy_spinverse.sim.modes import _signals, _sparse_operator, lowest_modes
from dipy_spinverse.sim.operators import diffusion_operator

#: The README demo's protocol (99 volumes).
DEMO = dict(
    timings=((0.005, 0.006), (0.010, 0.020), (0.010, 0.060)),
    bvals=(1000.0, 2500.0, 4000.0),
    n_directions=10,
    n_b0=3,
)


def _operator(grid, permeability, diffusivity):
    return diffusion_operator(
        grid,
        torch.as_tensor(permeability, dtype=torch.float64)[None],
        torch.full((1, grid.n_cells), diffusivity, dtype=torch.float64),
    )


def lab_errors(grid, permeability, diffusivity, protocol, ks):
    """Largest error of K lab-frame modes against Chebyshev, and times."""
    start = time.perf_counter()
    reference = simulate(grid, permeability, protocol, diffusivity=diffusivity)
    seconds = time.perf_counter() - start
    op = _operator(grid, permeability, diffusivity)
    u0 = op.sqrt_volumes.numpy()
    positions = op.positions.numpy()
    values, vectors = lowest_modes(op, 0, max(ks))
    rows = []
    for k in ks:
        start = time.perf_counter()
        signal = _signals(values[:k], vectors[:, :k], positions, u0, u0, protocol)
        rows.append(
            (k, np.abs(signal - reference.numpy()).max(), time.perf_counter() - start)
        )
    return seconds, rows


def phase_errors(grid, permeability, diffusivity, protocol, ks, phase_step=0.05):
    """As :func:`lab_errors`, in the phase frame of a periodic patch."""
    start = time.perf_counter()
    reference = simulate(grid, permeability, protocol, diffusivity=diffusivity)
    seconds = time.perf_counter() - start
    op = _operator(grid, permeability, diffusivity)
    values, vectors = lowest_modes(op, 0, max(ks))
    rows = []
    for k in ks:
        start = time.perf_counter()
        signal = _phase_signals(op, values[:k], vectors[:, :k], protocol, phase_step)
        rows.append(
            (k, np.abs(signal - reference.numpy()).max(), time.perf_counter() - start)
        )
    return seconds, rows


def _phase_signals(op, values, vectors, protocol, phase_step):
    coupling = _sparse_operator(op, 0)
    coupling = sp.diags(coupling.diagonal()) - coupling  # the weights W
    rows, cols = coupling.nonzero()
    weights = np.asarray(coupling[rows, cols]).ravel()
    disp = _displacements(op, rows, cols)
    classes, which = np.unique(np.round(disp, 7), axis=0, return_inverse=True)
    projected = np.stack(
        [
            vectors[rows[which == c]].T
            @ (weights[which == c, None] * vectors[cols[which == c]])
            for c in range(len(classes))
        ]
    )
    lam = torch.as_tensor(values, dtype=torch.complex128)
    mats = torch.as_tensor(projected, dtype=torch.complex128)
    d = torch.as_tensor(classes)
    dmax = float(np.linalg.norm(classes, axis=1).max())
    u0 = op.sqrt_volumes.numpy()
    c0 = torch.as_tensor(vectors.T @ u0, dtype=torch.complex128)
    out = np.empty(len(protocol))
    for waveform, idx in protocol.groups():
        durations, amplitudes = _first_half(*waveform.segments)
        rate = torch.as_tensor(protocol.gradient_rate[idx])
        proj = rate @ d.T

        def generator(F, proj=proj):
            phase = torch.polar(torch.ones_like(proj), -F * proj)
            return torch.diag(lam) + torch.einsum("ac,ckl->akl", 1 - phase, mats)

        c, F = c0.expand(len(idx), -1), 0.0
        for tau, f in zip(durations, amplitudes, strict=True):
            if f == 0:
                c = torch.einsum(
                    "akl,al->ak", torch.linalg.matrix_exp(-tau * generator(F)), c
                )
                continue
            n = max(
                1,
                math.ceil(
                    abs(f) * tau * float(rate.norm(dim=1).max()) * dmax / phase_step
                ),
            )
            h = tau / n
            nodes = (0.5 - math.sqrt(3) / 6, 0.5 + math.sqrt(3) / 6)
            a, b = 0.5 + math.sqrt(3) / 3, 0.5 - math.sqrt(3) / 3
            for s in range(n):
                g1, g2 = (generator(F + f * h * (s + x)) for x in nodes)
                for w1, w2 in ((a, b), (b, a)):
                    step = torch.linalg.matrix_exp(-h / 2 * (w1 * g1 + w2 * g2))
                    c = torch.einsum("akl,al->ak", step, c)
            F += f * tau
        out[idx] = (c.abs() ** 2).sum(1).numpy() / float(u0 @ u0)
    return out


def _displacements(op, rows, cols):
    """Circumcentre displacement of each (row, col) coupling."""
    slots = {}
    neighbours = op.neighbours.numpy()
    disp = op.displacement.numpy()
    for i in range(neighbours.shape[0]):
        for s, j in enumerate(neighbours[i]):
            slots[(i, int(j))] = disp[i, s]
    return np.array([slots[(int(i), int(j))] for i, j in zip(rows, cols, strict=True)])


def _first_half(durations, amplitudes):
    ends = np.cumsum(durations)
    keep = ends - durations < ends[-1] / 2
    d = durations[keep].copy()
    d[-1] = ends[-1] / 2 - (ends[keep][-1] - d[-1])
    return d, amplitudes[keep]


def _print(title, seconds, rows):
    print(f"{title}: Chebyshev {seconds:.2f} s")
    for k, error, time_k in rows:
        print(f"  K = {k:4d}   max |error| {error:.1e}   {time_k:6.2f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    protocol = _protocol(**DEMO)
    for boundary in ("reflecting", "periodic"):
        grid = TetGrid.bcc(8.0, 4, boundary=boundary)
        inside = np.linalg.norm(grid.cell_centroids - 4.0, axis=1) < 2.5
        kappa = np.where(grid.interface_faces(inside), 1e-5, np.inf)
        probe = lab_errors if boundary == "reflecting" else phase_errors
        ks = (16, 32, 64, 128) if boundary == "reflecting" else (32, 128, 400)
        _print(
            f"sphere R 2.5 um, 8 um {boundary} box, 768 cells",
            *probe(grid, kappa, 2e-3, protocol, ks),
        )
    prior = TissuePrior(boundary="reflecting", box_side=80 / 3)
    rng = np.random.default_rng(5)
    for _ in range(args.draws):
        draw = prior.draw(rng)
        grid = TetGrid.bcc(draw.side, prior.resolution, boundary="reflecting")
        title = (
            f"prior draw, {draw.side:.1f} um reflecting box, {grid.n_cells} cells, "
            f"cell diameter {draw.descriptors['cell_diameter']:.1f} um"
        )
        _print(
            title,
            *lab_errors(
                grid,
                draw.substrate.face_permeability,
                draw.diffusivity,
                protocol,
                (32, 64, 128, 256),
            ),
        )


if __name__ == "__main__":
    main()
