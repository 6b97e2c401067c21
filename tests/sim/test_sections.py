"""SectionGrid: the cross-section of straight fibres, and simulate() on it.

References are independent of the simulator (closed forms of
``dipy_spinverse.sim.analytic`` and a 2x2 matrix exponential); tolerances
are set by the discretisation and stated per test.
"""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from scipy.linalg import expm

from dipy_spinverse import Protocol, simulate
from dipy_spinverse.sim import analytic as an
from dipy_spinverse.sim.sections import SectionGrid
from dipy_spinverse.sim.sequences import fibonacci_sphere

D = 2e-3  # um^2/us
AXIS = np.array([1.0, 2.0, 2.0]) / 3.0  # an oblique fibre direction


def _open(grid):
    return np.full(grid.n_faces, np.inf)


def _membrane(grid, inside, kappa):
    return np.where(grid.interface_faces(inside), kappa, np.inf)


def _disc(grid, radius):
    """Triangles whose circumcentre lies within ``radius`` of the centre."""
    offset = grid.displacement2(grid.section_positions, grid.extent / 2)
    return np.linalg.norm(offset, axis=1) < radius


def _in_plane(grid, along):
    """A unit 3-D direction in the section's plane (``along`` of plane[0])."""
    return np.cos(along) * grid.plane[0] + np.sin(along) * grid.plane[1]


# -- the grid ------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 6, 7, 12])
def test_lattice_is_square_periodic_and_well_centred(n):
    grid = SectionGrid.triangular(5.0, n, axis=AXIS)
    a, h = grid.spacing, grid.row_height
    rows = 2 * max(1, round(n / np.sqrt(3)))
    assert grid.n_cells == 2 * n * rows
    assert grid.n_faces == 3 * grid.n_cells // 2  # every edge has two triangles
    assert_allclose(grid.extent, [5.0, 5.0])
    assert_allclose(h * rows, 5.0)
    assert_allclose(h / (a * np.sqrt(3) / 2), n / (np.sqrt(3) * rows / 2))
    assert_allclose(grid.cell_volumes, a * h / 2)
    assert_allclose(grid.volume, 25.0)
    # Isosceles triangles of base a and height h: every angle acute, so the
    # circumcentre lies strictly inside (both distances to each edge > 0).
    base_angle = np.degrees(np.arctan(2 * h / a))
    assert 45 < base_angle < 90 and 180 - 2 * base_angle < 90
    assert np.all(grid.face_distances > 0.2 * a)
    # The two-point flux is consistent: per triangle the divergence theorem
    # gives sum_e |e| d_e n_e n_e^T = |T| I (d_e the circumcentre's distance
    # to edge e, normal to it), so over the patch it is the area times I.
    flux = np.einsum(
        "f,fi,fj->ij",
        grid.face_areas * grid.face_distances.sum(1),
        grid.face_normals,
        grid.face_normals,
    )
    assert_allclose(grid.plane @ flux @ grid.plane.T, 25.0 * np.eye(2), atol=1e-12)
    assert np.all(
        np.sort(grid.cell_neighbours, axis=1) != np.arange(grid.n_cells)[:, None]
    )
    # In-plane frame: orthonormal, normal to the (normalised) axis.
    assert_allclose(grid.axis, AXIS)
    assert_allclose(grid.plane @ grid.plane.T, np.eye(2), atol=1e-15)
    assert_allclose(grid.plane @ grid.axis, 0.0, atol=1e-15)
    assert_allclose(grid.cell_circumcentres @ grid.axis, 0.0, atol=1e-12)
    assert_allclose(grid.face_normals @ grid.axis, 0.0, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(size=-1.0, n=6), "size"),
        (dict(size=4.0, n=2), "n"),
        (dict(size=4.0, n=6, axis=(0, 0, 0)), "axis"),
        (dict(size=4.0, n=6, axis=(1, 0)), "axis"),
    ],
)
def test_bad_grid_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SectionGrid.triangular(**kwargs)


# -- free water ----------------------------------------------------------------------
def test_free_water_along_the_axis_exact_and_across_second_order():
    """No membrane: S = exp(-b D) in every direction.

    Along the fibres the factor is analytic (exact to the Chebyshev
    truncation, 1e-11 a step). Across them
    the error is the dispersion of the discrete Laplacian in the phase frame,
    O((q a)^2): measured largest |ADC/D - 1| over 15 directions at b = 3000
    3.2e-3 (a = 1 um), 8.1e-4 (a = 0.5 um), 2.0e-4 (a = 0.25 um): ratio 4.
    Tolerances 4e-3 and 1e-3, and an observed order above 1.8.
    """
    dirs = fibonacci_sphere(15)
    prot = Protocol.pgse(np.full(15, 3000.0), dirs, small_delta=0.005, big_delta=0.02)
    errors = []
    for n in (8, 16):
        grid = SectionGrid.triangular(8.0, n, axis=AXIS)
        adc = -np.log(simulate(grid, _open(grid), prot).numpy()) / 3000.0
        errors.append(np.abs(adc / D - 1).max())
        along = Protocol.pgse([3000.0], [grid.axis], small_delta=0.005, big_delta=0.02)
        assert_allclose(
            simulate(grid, _open(grid), along).item(), np.exp(-6.0), rtol=1e-9
        )
    assert errors[0] < 4e-3 and errors[1] < 1e-3
    assert errors[0] / errors[1] > 3.5


# -- restricted water --------------------------------------------------------------
def _disc_adc(n, radius=2.0, size=6.0):
    grid = SectionGrid.triangular(size, n, axis=AXIS)
    inside = _disc(grid, radius)
    delta, Delta, b = 0.01, 0.03, 1000.0
    prot = Protocol.pgse(
        [b, b], [_in_plane(grid, 0.3), grid.axis], small_delta=delta, big_delta=Delta
    )
    # 64 Magnus sub-steps: the phase criterion gives one for this weak pulse,
    # which on a stiff grid errs by far more than this tiny attenuation
    # (measured -5.8 ADC/ADC; 16 and 64 sub-steps differ by 3e-3, 64 and
    # 256 by 8e-5).
    signal = simulate(
        grid, _membrane(grid, inside, 0.0), prot, initial=inside, substeps=64
    )
    across, along = (-np.log(signal.numpy()) / b).tolist()
    # The labelled disc's own radius: the area it holds.
    r_eff = np.sqrt(grid.cell_volumes[inside].sum() / np.pi)
    return across / an.cylinder_adc_gpa(delta * 1e6, Delta * 1e6, r_eff, D) - 1, along


def test_impermeable_fibre_against_the_cylinder():
    """Water inside an impermeable fibre (R = 2 um): across, the cylinder's
    Gaussian phase ADC (b ADC ~ 2e-3: exact to ~1e-4); along, free.

    The reference uses the radius of the area the triangles hold, so what
    remains is the staircase's shape. Measured ADC errors at a = 0.67, 0.33,
    0.17 um: +2.4 %, +0.01 %, +0.85 % (R = 2 um); -9.4 %, -0.6 %, +0.3 %
    (R = 2.5 um): first order and irregular, as the BCC grid's cylinder
    (-1.3 %, +1.3 %, +1.5 %). Tolerances 5 % at a = 0.67 um and 2 % at 0.33
    um (R = 2 um); along the axis exact.
    """
    for n, tolerance in ((12, 0.05), (24, 0.02)):
        across, along = _disc_adc(n)
        assert abs(across) < tolerance
        assert_allclose(along, D, rtol=1e-9)


def test_permeability_limits():
    """kappa -> 0 is the impermeable fibre, kappa -> inf no membrane."""
    grid = SectionGrid.triangular(6.0, 12, axis=AXIS)
    inside = _disc(grid, 2.0)
    prot = Protocol.pgse(
        [0, 1000, 3000],
        [_in_plane(grid, 0.0), _in_plane(grid, 1.0), AXIS],
        small_delta=0.005,
        big_delta=0.03,
    )
    signals = {
        kappa: simulate(grid, _membrane(grid, inside, kappa), prot).numpy()
        for kappa in (0.0, 1e-12, 1e9, np.inf)
    }
    # As for TetGrid: the conductance's relative change is ~ kappa R with
    # R ~ 1e2 us/um here, so 1e-12 and 1e9 are within ~1e-9 of the limits.
    assert_allclose(signals[1e-12], signals[0.0], atol=1e-9)
    assert_allclose(signals[1e9], signals[np.inf], atol=1e-8)
    assert np.abs(signals[0.0] - signals[np.inf]).max() > 0.05


def _layers(grid):
    """Triangles in the lower half of the rectangle: two flat membranes per
    period, along rows of edges (exact lines on this lattice)."""
    v = grid.section_positions[:, 1]
    return v < grid.extent[1] / 2


@pytest.mark.parametrize("kappa", [1e-4, 1e-3, 1e-2])
def test_flat_membranes_long_time_diffusivity(kappa):
    """Parallel membranes spaced L: D_inf = (1/D + 1/(kappa L))^-1.

    The membranes are rows of edges, flat and of the true length (no
    staircase factor, unlike the BCC grid). D_inf is extrapolated from two
    long diffusion times (ADC(t) = D_inf + c/t). Measured agreement 4.1e-7,
    4.0e-8, 2.2e-9 (kappa 1e-4, 1e-3, 1e-2 m/s); tolerance 1e-5.
    """
    grid = SectionGrid.triangular(8.0, 8, axis=AXIS)
    layer = _layers(grid)
    assert_allclose(
        grid.face_areas[grid.interface_faces(layer)].sum(), 2 * grid.extent[0]
    )
    across = grid.plane[1]
    times, adcs = [], []
    for big_delta in (0.2, 0.4):
        prot = Protocol.pgse([20.0], [across], small_delta=0.002, big_delta=big_delta)
        signal = simulate(grid, _membrane(grid, layer, kappa), prot).item()
        times.append(prot.waveforms[0].diffusion_time)
        adcs.append(-np.log(signal) / 20.0)
    d_inf = (times[1] * adcs[1] - times[0] * adcs[0]) / (times[1] - times[0])
    reference = an.periodic_membrane_diffusivity(D, kappa, grid.extent[1] / 2)
    assert_allclose(d_inf, reference, rtol=1e-5)


@pytest.mark.parametrize("kappa", [3e-6, 1e-5])
def test_exchange_rate_through_the_fibre_membrane(kappa):
    """b = 0, T2 of 30 ms inside and 300 ms outside: in the barrier-limited
    regime the signal is the two-site Karger / Bloch-McConnell 2x2
    exponential with k12 = kappa P / A (P the membrane's length, A the
    fibre's area, per um of fibre). Tolerance 2 % of the exchange effect
    (measured 0.28 % and 0.74 % at 3e-6 and 1e-5 m/s, growing with
    k12 R^2 / D as in 3-D)."""
    grid = SectionGrid.triangular(8.0, 16, axis=AXIS)
    inside = _disc(grid, 2.5)
    perimeter = grid.face_areas[grid.interface_faces(inside)].sum()
    v1 = grid.cell_volumes[inside].sum()
    v2 = grid.volume - v1
    t2 = np.where(inside, 0.03, 0.3)
    prot = Protocol.pgse([0], [[1, 0, 0]], small_delta=0.005, big_delta=0.1)
    te = prot.echo_times[0] * 1e6
    sim = simulate(grid, _membrane(grid, inside, kappa), prot, t2=t2).item()
    k12, k21 = an.exchange_rates(kappa, perimeter, v1, v2)
    rates = np.diag([1 / 0.03e6, 1 / 0.3e6]) + [[k12, -k21], [-k12, k21]]
    pops = np.array([v1, v2]) / grid.volume
    karger = (expm(-rates * te) @ pops).sum()
    no_exchange = (
        np.exp(-te * np.diag(rates) + te * np.array([k12, k21])) * pops
    ).sum()
    assert_allclose(no_exchange - sim, no_exchange - karger, rtol=0.02)


# -- engines, gradients, bad input ----------------------------------------------------
def test_dense_and_chebyshev_agree_on_a_section():
    grid = SectionGrid.triangular(3.0, 4, axis=AXIS)
    rng = np.random.default_rng(0)
    kappa = np.where(
        rng.random(grid.n_faces) < 0.4, 10 ** rng.uniform(-5, -3, grid.n_faces), np.inf
    )
    prot = Protocol.pgse(
        [0, 2000, 4000, 4000],
        [AXIS, _in_plane(grid, 0.2), _in_plane(grid, 1.3), [0.6, 0.0, 0.8]],
        small_delta=0.005,
        big_delta=0.02,
    )
    dense = simulate(grid, kappa, prot, method="dense", phase_step=0.01).numpy()
    cheb = simulate(grid, kappa, prot, method="chebyshev", phase_step=0.01).numpy()
    # Both integrate the same phase-frame Magnus steps; the remaining
    # difference is the Chebyshev truncation (1e-11 a step).
    assert_allclose(cheb, dense, atol=1e-9)


def test_gradient_matches_finite_differences_float64():
    """d S / d kappa and d S / d D through the section and the axial factor,
    against central differences (step 1e-6 relative: error ~1e-10)."""
    grid = SectionGrid.triangular(3.0, 4, axis=AXIS)
    inside = _disc(grid, 1.0)
    prot = Protocol.pgse(
        [2000, 2000],
        [_in_plane(grid, 0.4), [0.6, 0.0, 0.8]],
        small_delta=0.005,
        big_delta=0.02,
    )
    base = torch.tensor(np.where(grid.interface_faces(inside), 1e-4, 1e-2))
    kappa = base.clone().requires_grad_(True)
    diff = torch.tensor(2e-3, dtype=torch.float64, requires_grad=True)
    simulate(grid, kappa, prot, diffusivity=diff).sum().backward()

    def total(k, d):
        with torch.no_grad():
            return simulate(grid, k, prot, diffusivity=d).sum().item()

    for face in np.flatnonzero(grid.interface_faces(inside))[:3]:
        step = 1e-6 * base[face].item()
        up, down = base.clone(), base.clone()
        up[face] += step
        down[face] -= step
        numeric = (total(up, 2e-3) - total(down, 2e-3)) / (2 * step)
        assert_allclose(kappa.grad[face].item(), numeric, rtol=1e-5)
    step = 1e-9
    numeric = (total(base, 2e-3 + step) - total(base, 2e-3 - step)) / (2 * step)
    assert_allclose(diff.grad.item(), numeric, rtol=1e-5)


# -- a diffusivity per compartment ----------------------------------------------
D_IN, D_OUT = 1.0e-3, 2.5e-3  # um^2/us: intra- and extra-axonal, fixed-tissue-like


def _two_diffusivities(grid, inside):
    return np.where(inside, D_IN, D_OUT)


def test_impermeable_fibre_with_its_own_diffusivity():
    """An impermeable disc (R = 2 um) whose water diffuses at D_in = 1e-3
    inside and D_out = 2.5e-3 outside. Each compartment then decays along
    the fibres at its own rate, inside the section's generator:

    - inside, across: the Gaussian phase cylinder at D_in (exact to ~1e-4
      at b D ~ 1e-3; tolerance 5 % at a = 0.5 um, the staircase's, as
      ``test_impermeable_fibre_against_the_cylinder``); along: exp(-b D_in)
      exactly up to the Chebyshev truncation (1e-11 a step, ~260 steps at
      64 sub-steps: a few 1e-9 of the ADC; rtol 1e-7), the along-axis decay
      D_in k_a(t)^2 being integrated exactly by the Magnus steps' Gauss
      nodes;
    - the whole voxel, at any direction, equals the two compartments
      simulated apart, each with its own diffusivity everywhere (the
      validated single-diffusivity path, whose along-axis factor is
      exp(-b D (g . a)^2)), volume-weighted: 1e-9.
    """
    grid = SectionGrid.triangular(6.0, 12, axis=AXIS)
    inside = _disc(grid, 2.0)
    field = _membrane(grid, inside, 0.0)
    diffusivity = _two_diffusivities(grid, inside)
    delta, Delta, b = 0.01, 0.03, 1000.0
    across = _in_plane(grid, 0.3)
    oblique = (across + grid.axis) / np.sqrt(2)
    prot = Protocol.pgse(
        [b, b, 3 * b, 0],
        [across, grid.axis, oblique, across],
        small_delta=delta,
        big_delta=Delta,
    )
    signal = simulate(
        grid, field, prot, initial=inside, diffusivity=diffusivity, substeps=64
    ).numpy()
    r_eff = np.sqrt(grid.cell_volumes[inside].sum() / np.pi)
    adc = -np.log(signal[0]) / b
    assert (
        abs(adc / an.cylinder_adc_gpa(delta * 1e6, Delta * 1e6, r_eff, D_IN) - 1) < 0.05
    )
    assert_allclose(-np.log(signal[1]) / b, D_IN, rtol=1e-7)

    whole = simulate(grid, field, prot, diffusivity=diffusivity, substeps=8)
    parts = [
        simulate(grid, field, prot, initial=where, diffusivity=d, substeps=8)
        for where, d in ((inside, D_IN), (~inside, D_OUT))
    ]
    v_in = grid.cell_volumes[inside].sum() / grid.volume
    expected = v_in * parts[0] + (1 - v_in) * parts[1]
    assert_allclose(whole.numpy(), expected.numpy(), rtol=0, atol=1e-9)
    assert abs(whole[1].item() - expected[1].item()) < 1e-9
    assert_allclose(whole[3].item(), 1.0, atol=1e-12)  # b = 0


def test_dense_and_chebyshev_agree_with_a_diffusivity_per_cell():
    """Permeable membranes, a diffusivity per compartment, oblique
    gradients: both engines integrate the same Magnus steps with the
    along-axis diagonal; the Chebyshev plan must bound its range (1e-9)."""
    grid = SectionGrid.triangular(3.0, 4, axis=AXIS)
    inside = _disc(grid, 1.0)
    prot = Protocol.pgse(
        [0, 2000, 4000, 4000],
        [AXIS, _in_plane(grid, 0.2), [0.6, 0.0, 0.8], [0.0, 0.6, 0.8]],
        small_delta=0.005,
        big_delta=0.02,
    )
    options = dict(diffusivity=_two_diffusivities(grid, inside), phase_step=0.01)
    field = _membrane(grid, inside, 3e-4)
    dense = simulate(grid, field, prot, method="dense", **options).numpy()
    cheb = simulate(grid, field, prot, method="chebyshev", **options).numpy()
    assert_allclose(cheb, dense, atol=1e-9)


def test_gradient_of_a_diffusivity_per_cell_matches_finite_differences():
    """d S / d D_i through the along-axis diagonal and the section's
    conductances, against central differences (step 1e-9 um^2/us: error
    ~1e-10 relative to the derivative; rtol 1e-5)."""
    grid = SectionGrid.triangular(3.0, 4, axis=AXIS)
    inside = _disc(grid, 1.0)
    prot = Protocol.pgse(
        [2000, 2000], [[0.6, 0.0, 0.8], AXIS], small_delta=0.005, big_delta=0.02
    )
    field = torch.tensor(_membrane(grid, inside, 1e-4))
    base = torch.tensor(_two_diffusivities(grid, inside))
    diff = base.clone().requires_grad_(True)
    simulate(grid, field, prot, diffusivity=diff, substeps=2).sum().backward()

    def total(d):
        with torch.no_grad():
            return simulate(grid, field, prot, diffusivity=d, substeps=2).sum().item()

    for cell in (int(np.flatnonzero(inside)[0]), int(np.flatnonzero(~inside)[0])):
        step = 1e-9
        up, down = base.clone(), base.clone()
        up[cell] += step
        down[cell] -= step
        numeric = (total(up) - total(down)) / (2 * step)
        assert_allclose(diff.grad[cell].item(), numeric, rtol=1e-5)


def test_modes_engine_refuses_a_section():
    grid = SectionGrid.triangular(3.0, 4)
    prot = Protocol.pgse([1000], [[1, 0, 0]], small_delta=0.005, big_delta=0.02)
    with pytest.raises(ValueError, match="periodic"):
        simulate(grid, _open(grid), prot, method="modes")


@pytest.mark.slow
def test_batched_axes_equal_one_grid_per_axis():
    """``axes`` simulates one lattice at several orientations together: each
    row equals the SectionGrid built with that axis (PGSE, double PGSE and a
    waveform that is not antisymmetric), to the Chebyshev truncation."""
    from dipy_spinverse import PGSE, DoublePGSE, PiecewiseConstant
    from dipy_spinverse.geometry.substrates import packed_substrate

    rng = np.random.default_rng(3)
    axes = rng.normal(size=(3, 3))
    axes /= np.linalg.norm(axes, axis=1)[:, None]
    dirs = rng.normal(size=(4, 3))
    dirs /= np.linalg.norm(dirs, axis=1)[:, None]
    waves = [
        PGSE(0.005, 0.02),
        PGSE(0.01, 0.03),
        DoublePGSE(0.004, 0.01, 0.002),
        PiecewiseConstant([0.003, 0.002, 0.004, 0.001], [1.0, 0.0, -0.5, -1.0]),
    ]
    prot = Protocol.from_arrays([1000, 3000, 2000, 2500], dirs, waves)
    lattice = SectionGrid.triangular(3.0, 8)
    fibres = packed_substrate(lattice, rng=2, n_cells=2, fraction=0.5, fibres=True)
    kappa = np.stack([fibres.face_permeability] * 3)
    together = simulate(lattice, kappa, prot, axes=axes).numpy()
    for row, axis in zip(together, axes, strict=True):
        grid = SectionGrid.triangular(3.0, 8, axis=axis)
        assert_allclose(row, simulate(grid, fibres.face_permeability, prot), atol=1e-9)
    assert np.ptp(together, axis=0).max() > 0.05  # the orientations differ


def test_axes_are_checked():
    grid = SectionGrid.triangular(3.0, 4)
    prot = Protocol.pgse([1000], [[1, 0, 0]], small_delta=0.005, big_delta=0.02)
    kappa = np.stack([_open(grid)] * 2)
    with pytest.raises(ValueError, match="broadcasting"):
        simulate(grid, kappa, prot, axes=np.ones((3, 3)))
    with pytest.raises(ValueError, match="nonzero"):
        simulate(grid, kappa, prot, axes=[[0, 0, 0], [0, 0, 1]])
    from dipy_spinverse import TetGrid

    cube = TetGrid.bcc(4.0, 2, boundary="periodic")
    with pytest.raises(ValueError, match="remove axes"):
        simulate(cube, _open(cube), prot, axes=[0, 0, 1])


def test_oriented_lattice_equals_the_lattice_built_along_the_axis():
    lattice = SectionGrid.triangular(3.0, 7)
    turned = lattice.oriented(AXIS)
    built = SectionGrid.triangular(3.0, 7, axis=AXIS)
    for name in (
        "axis",
        "plane",
        "cell_centroids",
        "cell_circumcentres",
        "face_centroids",
        "face_normals",
        "face_distances",
        "cell_volumes",
    ):
        assert_allclose(getattr(turned, name), getattr(built, name), atol=1e-12)
    assert_allclose(turned.section_positions, built.section_positions, atol=1e-12)
    assert_allclose(lattice.axis, [0, 0, 1])  # the lattice itself is unchanged
