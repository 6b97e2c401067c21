"""Regenerates the tables of doc/validation/modes.md.

``--quick``: the sphere in its box, 16 and 32 modes.

How many Laplace modes a signal needs, in each frame (issue 58).

Prints the largest signal error of the matrix formalism with K modes
against the Chebyshev engine on the same grid, and the time of each, for a
permeable sphere and for draws of the default prior's reflecting variant:

* laboratory frame (reflecting boxes), ``simulate(..., method="modes")``'s
  basis: the operator's K lowest modes and the projected positions;
* periodic patches, the K lowest modes of the k = 0 operator, with the
  wavevector's coupling projected onto them exactly (the couplings' phases
  take a few values: 12 circumcentre displacements on the BCC grid) and
  fourth-order Magnus in time, in two frames: the phase-unwrapped one
  (``M = m exp(-i k . x)``) and a frame per compartment (the laboratory
  frame inside the cell, the phase frame outside), with the water inside
  and outside an impermeable cell apart.

Usage: ``python benchmarks/modes_probe.py [--draws 3]`` (about ten minutes
on 2 cores). Results: doc/validation/modes.md.
"""

import argparse
import math
import time

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import eigsh

from dipy_spinverse.data import _protocol
from dipy_spinverse.posterior.prior import TissuePrior
from dipy_spinverse.sim.forward import simulate
from dipy_spinverse.sim.grid import TetGrid
from dipy_spinverse.sim.modes import _signals, _sparse_operator, lowest_modes, project
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
        projected = project(vectors[:, :k], positions, u0, u0)
        signal = _signals(values, projected, float(u0 @ u0), protocol, k)
        rows.append(
            (k, np.abs(signal - reference.numpy()).max(), time.perf_counter() - start)
        )
    return seconds, rows


def frame_errors(
    grid,
    permeability,
    diffusivity,
    protocol,
    ks,
    *,
    offsets=None,
    initial=None,
    phase_step=0.05,
):
    """As :func:`lab_errors`, on a periodic patch, in the frame ``M = m
    exp(-i k . (x - offsets))``: the phase-unwrapped frame (offsets 0), or
    a frame per compartment (offsets ``x - centre`` in a cell: the
    laboratory frame there)."""
    start = time.perf_counter()
    reference = simulate(
        grid, permeability, protocol, diffusivity=diffusivity, initial=initial
    )
    seconds = time.perf_counter() - start
    op = _operator(grid, permeability, diffusivity)
    offsets = np.zeros((grid.n_cells, 3)) if offsets is None else offsets
    u0 = op.sqrt_volumes.numpy() * (1.0 if initial is None else initial.astype(float))
    values, vectors = lowest_modes(op, 0, max(ks))
    rows = []
    for k in ks:
        start = time.perf_counter()
        signal = _frame_signals(
            op, np.diag(values[:k]), vectors[:, :k], offsets, u0, protocol, phase_step
        )
        error = np.abs(signal - reference.numpy()).max()
        rows.append((k, error, time.perf_counter() - start))
    return seconds, rows


def bloch_errors(
    grid, permeability, diffusivity, protocol, sizes, phase_step=0.05, substeps=1
):
    """As :func:`frame_errors` in the phase frame, in a basis per gradient
    direction: the lowest modes of the operator at ``n_k`` wavevectors
    along it, from 0 to the largest the protocol reaches (``m`` modes each,
    ``K0`` at k = 0), orthonormalised. ``sizes``: ``(n_k, m, K0)``;
    ``substeps``: the Chebyshev reference's (fine grids need more)."""
    start = time.perf_counter()
    reference = simulate(
        grid, permeability, protocol, diffusivity=diffusivity, substeps=substeps
    )
    seconds = time.perf_counter() - start
    op = _operator(grid, permeability, diffusivity)
    u0 = op.sqrt_volumes.numpy()
    k0 = _sparse_operator(op, 0)
    rows = []
    for n_k, m, k_zero in sizes:
        start = time.perf_counter()
        signal, dims = np.ones(len(protocol)), []
        for g, idx in _directions(protocol):
            kmax = _largest_wavevector(protocol[idx])
            vectors = _bloch_basis(op, g, kmax, n_k, m, k_zero)
            dims.append(vectors.shape[1])
            base = vectors.conj().T @ (k0 @ vectors)
            zero = np.zeros((grid.n_cells, 3))
            signal[idx] = _frame_signals(
                op, base, vectors, zero, u0, protocol[idx], phase_step
            )
        error = np.abs(signal - reference.numpy()).max()
        label = f"{n_k} x {m} + {k_zero} (basis {int(np.mean(dims))})"
        rows.append((label, error, time.perf_counter() - start))
    return seconds, rows


def _directions(protocol):
    """(unit direction, indices) of the weighted acquisitions, by direction."""
    weighted = np.flatnonzero(protocol.bvals > 0)
    keys = np.round(protocol.bvecs[weighted], 6)
    for key in np.unique(keys, axis=0):
        yield key / np.linalg.norm(key), weighted[(keys == key).all(1)]


def _largest_wavevector(protocol):
    """The largest |k(t)| (rad/um) an acquisition of ``protocol`` reaches."""
    rates = np.linalg.norm(protocol.gradient_rate, axis=1)
    return max(
        float(np.abs(np.cumsum(np.prod(w.segments, axis=0))).max() * rates[i].max())
        for w, i in protocol.groups()
    )


def _bloch_basis(op, g, kmax, n_k, m, k_zero):
    """Orthonormal lowest modes of the phase-frame operator at wavevectors
    ``kappa g``, kappa in [0, kmax] (``n_k`` of them)."""
    matrix = _sparse_operator(op, 0)
    n, slots = op.weights.shape[1:]
    rows = np.repeat(np.arange(n), slots)
    cols = op.neighbours.numpy().ravel()
    weights = op.weights[0].numpy().ravel()
    keep = weights != 0
    shift = op.displacement.numpy().reshape(-1, 3)[keep] @ g
    coupling = sp.csr_matrix((weights[keep], (rows[keep], cols[keep])), shape=(n, n))
    vectors = []
    for kappa in np.linspace(0.0, kmax, n_k):
        phases = sp.csr_matrix(
            (
                weights[keep] * np.exp(-1j * kappa * shift),
                (rows[keep], cols[keep]),
            ),
            shape=(n, n),
        )
        operator = (matrix + coupling - phases).tocsc()
        count = k_zero if kappa == 0 else m
        _, v = eigsh(operator, k=count, sigma=-1e-4, which="LM")
        vectors.append(v)
    u, singular, _ = np.linalg.svd(np.hstack(vectors), full_matrices=False)
    return u[:, singular > 1e-8 * singular[0]]


def _frame_signals(op, base, vectors, offsets, u0, protocol, phase_step):
    """Signals in the frame of :func:`frame_errors`, in the orthonormal
    (complex) basis ``vectors`` where the k = 0 operator is ``base``: the
    couplings carry the phases ``exp(-i k . s)``, ``s = d + r_i - r_j``
    (grouped by value, each group projected once), and the offsets add
    ``i k'(t) . r``."""
    n, slots = op.weights.shape[1:]
    rows = np.repeat(np.arange(n), slots)
    cols = op.neighbours.numpy().ravel()
    weights = op.weights[0].numpy().ravel()
    keep = weights != 0
    rows, cols, weights = rows[keep], cols[keep], weights[keep]
    shift = op.displacement.numpy().reshape(-1, 3)[keep]
    shift = shift + offsets[rows] - offsets[cols]
    classes, which = np.unique(np.round(shift, 7), axis=0, return_inverse=True)
    which = which.ravel()
    projected = np.stack(
        [
            vectors[rows[which == c]].conj().T
            @ (weights[which == c, None] * vectors[cols[which == c]])
            for c in range(len(classes))
        ]
    )
    as_complex = dict(dtype=torch.complex128)
    base = torch.as_tensor(base, **as_complex)
    mats = torch.as_tensor(projected, **as_complex)
    moved = torch.as_tensor(
        np.einsum("nk,nd,nl->dkl", vectors.conj(), offsets, vectors), **as_complex
    )
    d = torch.as_tensor(classes)
    reach = float(np.linalg.norm(classes, axis=1).max())
    c0 = torch.as_tensor(vectors.conj().T @ u0, **as_complex)
    read = torch.as_tensor(vectors.T @ op.sqrt_volumes.numpy(), **as_complex)
    out = np.empty(len(protocol))
    nodes = (0.5 - math.sqrt(3) / 6, 0.5 + math.sqrt(3) / 6)
    a, b = 0.5 + math.sqrt(3) / 3, 0.5 - math.sqrt(3) / 3
    for waveform, idx in protocol.groups():
        rate = torch.as_tensor(np.array(protocol.gradient_rate[idx]))
        proj = rate @ d.T
        drift = torch.einsum("ad,dkl->akl", rate.to(torch.complex128), moved)

        def generator(F, f, proj=proj, drift=drift):
            phase = torch.polar(torch.ones_like(proj), -F * proj)
            coupled = torch.einsum("ac,ckl->akl", 1 - phase, mats)
            return base + coupled + 1j * f * drift

        c, F = c0.expand(len(idx), -1), 0.0
        for tau, f in zip(*waveform.segments, strict=True):
            if tau <= 0:
                continue
            rise = abs(f) * tau * float(rate.norm(dim=1).max()) * reach
            n_sub = 1 if f == 0 else max(1, math.ceil(rise / phase_step))
            h = tau / n_sub
            for s in range(n_sub):
                g1, g2 = (generator(F + f * h * (s + x), f) for x in nodes)
                for w1, w2 in ((a, b), (b, a)):
                    step = torch.linalg.matrix_exp(-h / 2 * (w1 * g1 + w2 * g2))
                    c = torch.einsum("akl,al->ak", step, c)
            F += f * tau
        # k(TE) = 0: the frame is the laboratory's at the echo.
        out[idx] = (c @ read).abs().numpy() / float(u0 @ op.sqrt_volumes.numpy())
    return out


def _sphere(grid, radius=2.5, kappa=1e-5):
    """A permeable sphere at the centre of ``grid``: (inside, permeability)."""
    inside = np.linalg.norm(grid.cell_centroids - grid.size / 2, axis=1) < radius
    return inside, np.where(grid.interface_faces(inside), kappa, np.inf)


def _print(title, seconds, rows):
    print(f"{title}: Chebyshev {seconds:.2f} s")
    for k, error, time_k in rows:
        print(f"  K = {k!s:>4}   max |error| {error:.1e}   {time_k:6.2f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument(
        "--periodic-draws",
        type=int,
        default=0,
        help="draws of the default prior (periodic) in per-direction bases "
        "(minutes each)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test, not a measurement"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    protocol = _protocol(**DEMO)
    grid = TetGrid.bcc(8.0, 4)
    inside, kappa = _sphere(grid)
    _print(
        "sphere R 2.5 um, 8 um reflecting box, 768 cells",
        *lab_errors(
            grid, kappa, 2e-3, protocol, (16, 32) if args.quick else (16, 32, 64, 128)
        ),
    )
    if args.quick:
        return
    grid = TetGrid.bcc(8.0, 4, boundary="periodic")
    inside, kappa = _sphere(grid)
    _print(
        "the same sphere in an 8 um periodic patch, phase frame",
        *frame_errors(grid, kappa, 2e-3, protocol, (32, 64, 128)),
    )
    centred = grid.cell_circumcentres - 4.0
    offsets = np.where(inside[:, None], centred, 0.0)
    _print(
        "the same, a frame per compartment",
        *frame_errors(grid, kappa, 2e-3, protocol, (16, 32, 64), offsets=offsets),
    )
    _print(
        "the same, phase frame, a basis per gradient direction (Bloch modes)",
        *bloch_errors(grid, kappa, 2e-3, protocol, ((2, 8, 16), (4, 8, 16))),
    )
    impermeable = np.where(grid.interface_faces(inside), 0.0, np.inf)
    for name, initial in (("inside", inside), ("outside", ~inside)):
        _print(
            f"impermeable, a frame per compartment, the water {name} only",
            *frame_errors(
                grid,
                impermeable,
                2e-3,
                protocol,
                (16, 32, 64),
                offsets=offsets,
                initial=initial,
            ),
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
    _periodic_draws(args.periodic_draws, protocol)


def _periodic_draws(n, protocol):
    """The default prior's draws in per-direction bases (``--periodic-draws``)."""
    prior = TissuePrior()
    rng = np.random.default_rng(3)
    for _ in range(n):
        draw = prior.draw(rng)
        grid = TetGrid.bcc(draw.side, prior.resolution, boundary="periodic")
        title = (
            f"default prior draw, {draw.side:.2f} um periodic patch, "
            f"{grid.n_cells} cells, cell diameter "
            f"{draw.descriptors['cell_diameter']:.2f} um, per-direction bases"
        )
        sizes = ((4, 8, 16), (6, 12, 24))
        errors = bloch_errors(
            grid,
            draw.substrate.face_permeability,
            draw.diffusivity,
            protocol,
            sizes,
            substeps=4,
        )
        _print(title, *errors)


if __name__ == "__main__":
    main()
