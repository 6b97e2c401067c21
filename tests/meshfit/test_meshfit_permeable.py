"""A cell and the water around it joined by a permeable membrane
(dipy_spinverse.meshfit.permeable).

The meshes are a BCC grid's own tetrahedra (a sphere voxelised on it, and the
rest of the box), so the grid simulator (finite volumes, one value per
tetrahedron) sees the same domain and membrane: the two differ only in how
they discretise it. References: the two limits (kappa = 0: the regions' own
signals, volume-weighted; kappa -> inf: the unsplit mesh), the grid
simulator between them, and finite differences for the gradients.
"""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from dipy_spinverse import TetGrid, simulate
from dipy_spinverse.geometry.phantoms import sphere
from dipy_spinverse.meshfit import mesh_signal
from dipy_spinverse.meshfit.mesh import _compact, signed_volumes
from dipy_spinverse.meshfit.permeable import (
    membrane_matrix,
    permeable_signal,
    split_regions,
)
from dipy_spinverse.sim.sequences import Protocol, fibonacci_sphere
from dipy_spinverse.sim.signals import normalise_b0


def _box(n, radius=9.0):
    """(grid, box mesh, regions: 1 inside a sphere) on the published box."""
    grid = TetGrid.bcc(80 / 3, n)
    tets = grid.tets.copy()
    negative = signed_volumes(grid.vertices, tets) < 0
    tets[negative] = tets[negative][:, [0, 2, 1, 3]]
    mesh = _compact(grid.vertices, tets)
    inside = sphere(grid, radius=radius, kappa=1e-5).inside
    return grid, mesh, inside.astype(int)


def _part(mesh, keep):
    return _compact(mesh.vertices, mesh.tets[keep])


def _protocol():
    # Long pulses and low b (q <= 0.14 rad/um, a wavelength of 45 um or more
    # against the grids' 3-7 um spacing), two diffusion times.
    dirs = fibonacci_sphere(4, hemisphere=True)
    bvals = np.r_[0.0, np.repeat([250.0, 500.0], len(dirs))]
    bvecs = np.r_[[[0.0, 0.0, 0.0]], np.tile(dirs, (2, 1))]
    return Protocol.concatenate(
        *(
            Protocol.pgse(bvals, bvecs, small_delta=0.010, big_delta=big)
            for big in (0.030, 0.060)
        )
    )


@pytest.fixture(scope="module")
def box():
    grid, mesh, regions = _box(4)
    return grid, mesh, regions, split_regions(mesh, regions)


def test_the_membrane_is_the_grids_interface(box):
    grid, mesh, regions, split = box
    barrier = grid.interface_faces(regions)
    assert len(split.membrane) == barrier.sum()
    membrane_vertices = np.unique(split.source[split.membrane[:, 0]])
    assert split.mesh.n_vertices == mesh.n_vertices + len(membrane_vertices)
    # Each triangle's two sides are copies of the same vertices.
    assert_allclose(
        split.source[split.membrane[:, 0]], split.source[split.membrane[:, 1]]
    )
    # J's row sums vanish (a uniform magnetisation does not cross) and its
    # trace is twice the membrane area (A / 6 per vertex pair, two sides).
    J = membrane_matrix(split)
    assert_allclose(J.sum(1), 0.0, atol=1e-12)
    assert J.diagonal().sum() == pytest.approx(
        2 * 3 * grid.face_areas[barrier].sum() / 6, rel=1e-12
    )
    assert split.mesh.volume == pytest.approx(mesh.volume, rel=1e-12)


def test_limits(box):
    # kappa = 0: the two regions do not exchange, and the operator is block
    # diagonal: the volume-weighted sum of each region's own signal, to
    # round-off. kappa -> inf (100 m/s, kappa / D = 5e4 / um): the jump
    # across the membrane is ~ D / (kappa h) = 3e-6 of the magnetisation, so
    # the unsplit mesh's signal within 1e-5.
    _, mesh, regions, split = box
    protocol = _protocol()
    closed = permeable_signal(split, protocol, permeability=0.0).numpy()
    inner, outer = _part(mesh, regions == 1), _part(mesh, regions == 0)
    vi, vo = inner.volume, outer.volume
    separate = vi * mesh_signal(inner, protocol) + vo * mesh_signal(outer, protocol)
    assert_allclose(closed, separate.numpy() / (vi + vo), atol=1e-10)
    open_ = permeable_signal(split, protocol, permeability=100.0).numpy()
    assert_allclose(open_, mesh_signal(mesh, protocol).numpy(), atol=1e-5)
    # In between, the signal moves monotonically from one to the other.
    middle = permeable_signal(split, protocol, permeability=1e-4).numpy()
    low, high = np.minimum(closed, open_), np.maximum(closed, open_)
    assert np.all((middle >= low - 1e-9) & (middle <= high + 1e-9))
    assert np.abs(middle - closed).max() > 0.01


@pytest.mark.slow
def test_exchange_matches_the_grid_simulator():
    # The change of the signal from kappa = 0 that the membrane makes, mesh
    # against grid on the same tetrahedra. Their difference is the
    # discretisation's (finite volumes against P1), O(h): 16 / 11 / 8 % of
    # the change at 4.4 / 3.3 / 2.7 um spacing (measured, kappa 1e-6 to
    # 1e-3 m/s). Bounds: 20 % at 4.4 um, 14 % at 3.3 um, and smaller at the
    # finer grid.
    protocol = _protocol()
    errors = []
    for n, bound in ((6, 0.20), (8, 0.14)):
        grid, mesh, regions = _box(n)
        split = split_regions(mesh, regions)
        barrier = grid.interface_faces(regions)
        closed = permeable_signal(split, protocol, permeability=0.0).numpy()
        field = np.where(barrier, 0.0, np.inf)
        grid_closed = normalise_b0(simulate(grid, field, protocol).numpy(), protocol)
        worst = 0.0
        for kappa in (1e-5, 1e-4):
            mesh_open = permeable_signal(split, protocol, permeability=kappa)
            mesh_change = mesh_open.numpy() - closed
            field = np.where(barrier, kappa, np.inf)
            grid_open = normalise_b0(simulate(grid, field, protocol).numpy(), protocol)
            grid_change = grid_open - grid_closed
            scale = np.abs(grid_change).max()
            assert scale > 0.005
            worst = max(worst, np.abs(mesh_change - grid_change).max() / scale)
        assert worst < bound
        errors.append(worst)
    assert errors[1] < errors[0]


def test_gradients_match_finite_differences(box):
    # float64, the basis held fixed (what is differentiated, as in fem.py):
    # d S / d kappa and d S / d (vertices along a random direction), against
    # central differences. Measured: 1e-7 and 1.1e-6 relative; the vertex
    # step also moves the propagators' spectral bounds and with them the
    # Chebyshev truncation (1e-10 per propagator), hence 1e-5 there.
    _, mesh, _, split = box
    protocol = _protocol()
    from dipy_spinverse.meshfit.permeable import _basis

    kappa0 = 2e-5
    basis = _basis(split, torch.tensor(split.mesh.vertices), kappa0, 2e-3, 1.0)
    kappa = torch.tensor(kappa0, dtype=torch.float64, requires_grad=True)
    vertices = torch.tensor(mesh.vertices, requires_grad=True)
    weights = torch.linspace(0.5, 1.5, len(protocol), dtype=torch.float64)

    def loss(k, v):
        s = permeable_signal(split, protocol, permeability=k, vertices=v, basis=basis)
        return (weights * s).sum()

    loss(kappa, vertices).backward()
    h = 1e-7
    with torch.no_grad():
        v0 = vertices.detach()
        fd = (loss(kappa0 + h, v0) - loss(kappa0 - h, v0)) / (2 * h)
        assert float(kappa.grad) == pytest.approx(float(fd), rel=1e-6)
        direction = torch.randn(v0.shape, generator=torch.Generator().manual_seed(0))
        d = 1e-6
        fd = (loss(kappa0, v0 + d * direction) - loss(kappa0, v0 - d * direction)) / (
            2 * d
        )
        analytic = float((vertices.grad * direction).sum())
        assert analytic == pytest.approx(float(fd), rel=1e-5)


def test_bad_inputs(box):
    _, mesh, regions, split = box
    protocol = _protocol()
    for bad in (-1e-5, "1e-5", [1e-5, 2e-5]):
        with pytest.raises(ValueError, match="permeability must be a finite scalar"):
            permeable_signal(split, protocol, permeability=bad)
    with pytest.raises(ValueError, match="regions"):
        split_regions(mesh, regions[:-1])
    with pytest.raises(ValueError, match="original"):
        permeable_signal(split, protocol, permeability=1e-5, vertices=torch.zeros(3, 3))
    with pytest.raises(TypeError, match="split_regions"):
        permeable_signal(mesh, protocol, permeability=1e-5)


def test_three_regions_touching(box):
    # Two touching cells (the sphere cut in half) in the water: a vertex on
    # the line where all three meet gets three copies. The limits hold as
    # for two regions.
    grid, mesh, regions, _ = box
    centroids = mesh.vertices[mesh.tets].mean(1)
    three = np.where(regions == 1, np.where(centroids[:, 0] < grid.size / 2, 1, 2), 0)
    split = split_regions(mesh, three)
    assert len(split.membrane) == grid.interface_faces(three).sum()
    protocol = _protocol()
    parts = [_part(mesh, three == r) for r in range(3)]
    volumes = np.array([p.volume for p in parts])
    separate = sum(
        v * mesh_signal(p, protocol).numpy()
        for v, p in zip(volumes, parts, strict=True)
    )
    closed = permeable_signal(split, protocol, permeability=0.0).numpy()
    assert_allclose(closed, separate / volumes.sum(), atol=1e-10)
    open_ = permeable_signal(split, protocol, permeability=100.0).numpy()
    assert_allclose(open_, mesh_signal(mesh, protocol).numpy(), atol=1e-5)
