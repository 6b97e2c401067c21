"""Unit tests of dipy_spinverse.sim.operators (finite-volume Bloch-Torrey operators).

Everything here is float64 on tiny grids: 2 x 2 x 2-cube BCC lattices (48
cells walled, 96 periodic) with jittered vertices, so that cells differ in
volume and distances. The operator is rebuilt as a dense matrix by a helper
that only reads the documented ELL layout (``diag``, ``weights``,
``neighbours``), and compared with quantities recomputed from the grid
geometry in numpy. Each tolerance is stated and justified where it is used;
"rounding" means a few ulps of the largest entry involved (entries are ~1e-2
/us, so 1e-15 absolute is ~100 ulps).
"""

import numpy as np
import pytest
import torch
from conftest import jittered_grid  # noqa: E402
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse.sim.operators import (
    DiffusionOperator,
    diffusion_operator,
    face_conductance,
)

D_WATER = 2e-3  # um^2/us
BOUNDARIES = ["reflecting", "periodic", "absorbing"]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _kappa(grid, batch=1, seed=0):
    """Membranes of 1e-5..1e-1 m/s, with some open (inf) and closed (0) faces."""
    rng = np.random.default_rng(seed)
    kappa = 10 ** rng.uniform(-5, -1, (batch, grid.n_faces))
    kappa[:, ::7] = np.inf
    kappa[:, 3::11] = 0.0
    return torch.tensor(kappa)


def _diffusivity(grid, batch=1, seed=1):
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.uniform(1e-3, 3e-3, (batch, grid.n_cells)))


def _dense(op):
    """Dense (B, N, N) matrix of ``(A u)_i = diag_i u_i - sum_k w_ik u_nbr_ik``."""
    diag = op.diag.detach().numpy()
    weights = op.weights.detach().numpy()
    nbr = op.neighbours.numpy()
    b, n, k = weights.shape
    out = np.zeros((b, n, n))
    rows = np.repeat(np.arange(n), k)
    for i in range(b):
        out[i][np.arange(n), np.arange(n)] = diag[i]
        np.subtract.at(out[i], (rows, nbr.ravel()), weights[i].ravel())
    return out


def _operator(grid, kappa=None, diff=None, relaxation=None):
    kappa = _kappa(grid) if kappa is None else kappa
    diff = _diffusivity(grid) if diff is None else diff
    return diffusion_operator(grid, kappa, diff, relaxation)


# --------------------------------------------------------------------------
# face_conductance
# --------------------------------------------------------------------------
def test_face_conductance_is_the_series_resistance():
    """w_f = A_f / (d_a / D_a + d_b / D_b + 1 / kappa_f), recomputed in numpy.

    Open faces (inf) take the membrane-free value, closed faces (0) give
    exactly 0. rtol 1e-13: the two sides differ only by the order of a handful
    of floating-point operations.
    """
    grid = jittered_grid()
    kappa, diff = _kappa(grid, batch=2), _diffusivity(grid, batch=2)
    w = face_conductance(grid, kappa, diff).numpy()
    assert w.shape == (2, grid.n_faces)
    a, b = grid.face_cells.T
    k, d = kappa.numpy(), diff.numpy()
    resistance = (
        grid.face_distances[:, 0] / d[:, a] + grid.face_distances[:, 1] / d[:, b]
    )
    with np.errstate(divide="ignore"):
        expected = grid.face_areas / (resistance + 1.0 / k)
    assert_allclose(w, expected, rtol=1e-13, atol=0)
    assert np.all(w[k == 0] == 0.0)  # closed faces: exactly no flux
    open_ = np.isinf(k)
    assert open_.any() and (k == 0).any()
    assert_allclose(w[open_], (grid.face_areas / resistance)[open_], rtol=1e-13)


def test_conductance_limits_in_kappa():
    """kappa -> inf tends to the open face like 1/kappa; kappa -> 0 to 0.

    w(inf) - w(kappa) = w(inf) / (kappa R + 1) exactly, R = (d_a + d_b) / D
    (rtol 1e-6: the gap is a difference of nearly equal numbers and loses
    ~|log10 gap| digits; at kappa = 1e4 the gap is ~2e-7 of w, leaving ~9
    good digits). Near 0, w is
    kappa * A to first order (rtol 1e-6 at kappa = 1e-12: the next term is
    kappa R ~ 1e-9 relative).
    """
    grid = jittered_grid()
    diff = torch.full((1, grid.n_cells), D_WATER, dtype=torch.float64)

    def w(value):
        k = torch.full((1, grid.n_faces), value, dtype=torch.float64)
        return face_conductance(grid, k, diff)[0].numpy()

    w_open = w(np.inf)
    resistance = grid.face_distances.sum(1) / D_WATER
    for kappa in (1e2, 1e3, 1e4):
        gap = w_open - w(kappa)
        assert np.all(gap > 0)  # a membrane always adds resistance
        assert_allclose(gap, w_open / (kappa * resistance + 1.0), rtol=1e-6)
    assert_allclose(w(1e-12), 1e-12 * grid.face_areas, rtol=1e-6)
    assert np.all(w(0.0) == 0.0)
    # Monotone in kappa over the whole physical range.
    values = np.array([w(k) for k in (0.0, 1e-5, 1e-3, 1e-1, 1e1, np.inf)])
    assert np.all(np.diff(values, axis=0) > 0)


def test_conductance_gradients_finite_at_zero_and_inf():
    """dw/dkappa = A_f at kappa = 0 and 0 (no NaN) at kappa = inf.

    The first is the analytic derivative of A kappa / (kappa R + 1) at 0
    (rtol 1e-14: a single multiply); the second is the documented reason for
    the placeholder branch: a NaN there would poison every gradient.
    """
    grid = jittered_grid()
    kappa = torch.zeros(1, grid.n_faces, dtype=torch.float64)
    kappa[0, ::2] = np.inf
    kappa.requires_grad_(True)
    diff = torch.full(
        (1, grid.n_cells), D_WATER, dtype=torch.float64, requires_grad=True
    )
    grad_k, grad_d = torch.autograd.grad(
        face_conductance(grid, kappa, diff).sum(), (kappa, diff)
    )
    assert torch.all(torch.isfinite(grad_k)) and torch.all(torch.isfinite(grad_d))
    assert_allclose(grad_k[0, 1::2].numpy(), grid.face_areas[1::2], rtol=1e-14)
    assert_array_equal(grad_k[0, ::2].numpy(), 0.0)
    # Only the open faces conduct, so only cells touching one see a gradient.
    touched = np.zeros(grid.n_cells, bool)
    touched[grid.face_cells[::2].ravel()] = True
    assert np.all(grad_d[0, touched].numpy() > 0)
    assert_array_equal(grad_d[0, ~touched].numpy(), 0.0)


# --------------------------------------------------------------------------
# diffusion_operator: algebraic structure
# --------------------------------------------------------------------------
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_operator_layout(boundary):
    grid = jittered_grid(boundary)
    op = _operator(grid, _kappa(grid, batch=2), _diffusivity(grid, batch=2))
    assert isinstance(op, DiffusionOperator)
    n = grid.n_cells
    assert op.diag.shape == (2, n) and op.weights.shape == (2, n, 4)
    assert op.neighbours.shape == (n, 4) and op.displacement.shape == (n, 4, 3)
    assert op.positions.shape == (n, 3) and op.sqrt_volumes.shape == (n,)
    assert op.diag.dtype == op.weights.dtype == torch.float64
    pad = grid.cell_faces < 0
    assert pad.any() == (boundary != "periodic")
    # Padding slots carry no coupling and no displacement.
    assert np.all(op.weights.numpy()[:, pad] == 0.0)
    assert np.all(op.displacement.numpy()[pad] == 0.0)
    assert_allclose(op.sqrt_volumes.numpy() ** 2, grid.cell_volumes, rtol=1e-15)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_operator_entries_from_geometry(boundary):
    """Each off-diagonal entry is w_f / sqrt(V_a V_b) of its face.

    Checked on the dense matrix against face_conductance: rtol 1e-13 (a few
    roundings in the product and the square roots).
    """
    grid = jittered_grid(boundary)
    kappa, diff = _kappa(grid), _diffusivity(grid)
    dense = _dense(_operator(grid, kappa, diff))[0]
    w = face_conductance(grid, kappa, diff)[0].numpy()
    a, b = grid.face_cells.T
    scale = np.sqrt(grid.cell_volumes[a] * grid.cell_volumes[b])
    assert_allclose(-dense[a, b], w / scale, rtol=1e-13, atol=0)
    # No coupling between cells that share no face.
    pattern = np.zeros_like(dense, dtype=bool)
    pattern[a, b] = pattern[b, a] = True
    np.fill_diagonal(pattern, True)
    assert np.all(dense[~pattern] == 0.0)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_operator_is_symmetric(boundary):
    """The symmetrised operator is symmetric: both slots of a face hold the
    same w_f / sqrt(V_a V_b). atol 1e-17 absolute is ~20 ulps of the entries
    (~2e-3 /us): room for the two slots to round differently, nothing more."""
    grid = jittered_grid(boundary)
    dense = _dense(_operator(grid, _kappa(grid, batch=2)))
    assert_allclose(dense, dense.transpose(0, 2, 1), rtol=0, atol=1e-17)


@pytest.mark.parametrize("boundary", ["reflecting", "periodic"])
def test_constant_field_is_in_the_kernel(boundary):
    """Reflecting or periodic: A sqrt(V) = 0, so M = const is stationary and
    total magnetisation sum V M = <sqrt(V), u> is conserved (sqrt(V)^T A = 0).

    atol 1e-16 against entries up to ~1e-2 /us: row sums cancel to rounding.
    """
    grid = jittered_grid(boundary)
    op = _operator(grid, _kappa(grid, batch=2), _diffusivity(grid, batch=2))
    dense = _dense(op)
    s = op.sqrt_volumes.numpy()
    assert np.abs(dense).max() > 1e-3  # the check below is not vacuous
    assert_allclose(dense @ s, 0.0, atol=1e-16)
    assert_allclose(s @ dense, 0.0, atol=1e-16)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_operator_is_positive_semidefinite(boundary):
    """Eigenvalues >= 0 (to -1e-15: rounding of eigvalsh on entries ~1e-2).

    Reflecting/periodic: exactly one zero mode per connected component, here
    one (all faces permeable). Absorbing: strictly positive (the wall drains
    every mode), smallest eigenvalue well above rounding.
    """
    grid = jittered_grid(boundary)
    kappa = torch.tensor(
        10 ** np.random.default_rng(2).uniform(-4, -1, (1, grid.n_faces))
    )
    eig = np.linalg.eigvalsh(_dense(_operator(grid, kappa))[0])
    assert eig[0] > -1e-15
    if boundary == "absorbing":
        assert eig[0] > 1e-6
    else:
        assert abs(eig[0]) < 1e-15
        assert eig[1] > 1e-6


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_spectral_bounds_enclose_the_spectrum(boundary):
    """Gershgorin interval [lo, hi] contains every eigenvalue, and scaling the
    off-diagonal part by s widens the radius by exactly s (rtol 1e-14).

    The containment is checked to 1e-15 absolute: with reflecting or periodic
    walls lo = 0 = the smallest eigenvalue, which eigvalsh and the row sums
    both only reach to rounding (~1e-17 here).
    """
    grid = jittered_grid(boundary)
    op = _operator(grid, _kappa(grid, batch=2), _diffusivity(grid, batch=2))
    lo, hi = op.spectral_bounds()
    assert lo.shape == hi.shape == (2,)
    eig = np.linalg.eigvalsh(_dense(op))
    assert np.all(lo.numpy() <= eig[:, 0] + 1e-15)
    assert np.all(eig[:, -1] <= hi.numpy() + 1e-15)
    # A and its Gershgorin interval have the same maximum order of magnitude:
    # the bound is not vacuous.
    assert np.all(hi.numpy() < 2.5 * eig[:, -1])
    lo2, hi2 = op.spectral_bounds(offdiag_scale=2.0)
    radius = op.weights.abs().sum(-1)
    assert_allclose(lo2.numpy(), (op.diag - 2.0 * radius).amin(-1).numpy(), rtol=1e-14)
    assert_allclose(hi2.numpy(), (op.diag + 2.0 * radius).amax(-1).numpy(), rtol=1e-14)
    assert np.all(lo2.numpy() < lo.numpy()) and np.all(hi2.numpy() > hi.numpy())


def test_relaxation_only_shifts_the_diagonal():
    """relaxation r adds diag(r): weights identical, diag + r (rtol 1e-15)."""
    grid = jittered_grid()
    rate = torch.tensor(np.random.default_rng(3).uniform(0, 1e-4, (1, grid.n_cells)))
    plain = _operator(grid)
    relaxed = _operator(grid, relaxation=rate)
    assert_array_equal(relaxed.weights.numpy(), plain.weights.numpy())
    assert_allclose(relaxed.diag.numpy(), (plain.diag + rate).numpy(), rtol=1e-15)


def test_open_operator_is_linear_in_diffusivity():
    """Without membranes every entry is proportional to D (rtol 1e-14); with
    finite membranes it is not (the 1/kappa resistance does not scale)."""
    grid = jittered_grid("periodic")
    open_ = torch.full((1, grid.n_faces), np.inf, dtype=torch.float64)
    d1 = torch.full((1, grid.n_cells), D_WATER, dtype=torch.float64)
    a1 = _dense(_operator(grid, open_, d1))
    a3 = _dense(_operator(grid, open_, 3 * d1))
    assert_allclose(a3, 3 * a1, rtol=1e-14, atol=0)
    membrane = torch.full((1, grid.n_faces), 1e-3, dtype=torch.float64)
    m1 = _dense(_operator(grid, membrane, d1))
    m3 = _dense(_operator(grid, membrane, 3 * d1))
    assert np.abs(m3 - 3 * m1).max() > 0.1 * np.abs(m1).max()


# --------------------------------------------------------------------------
# Permeability limits
# --------------------------------------------------------------------------
def test_large_kappa_tends_to_the_membrane_free_operator():
    """kappa -> inf: A(kappa) -> A(inf) with a gap shrinking like 1/kappa.

    At kappa = 1e6 um/us the relative gap is 1/(kappa R) ~ 1e-9 (R ~ 1e3
    us/um); halving the gap per doubled kappa is checked to 1 %.
    """
    grid = jittered_grid()
    diff = _diffusivity(grid)

    def dense(value):
        k = torch.full((1, grid.n_faces), value, dtype=torch.float64)
        return _dense(_operator(grid, k, diff))[0]

    open_ = dense(np.inf)
    gap1 = np.abs(dense(1e6) - open_).max()
    gap2 = np.abs(dense(2e6) - open_).max()
    assert gap1 < 1e-8 * np.abs(open_).max()
    assert_allclose(gap1 / gap2, 2.0, rtol=1e-2)


def test_zero_kappa_decouples_the_two_sides():
    """kappa = 0 on the faces of a surface splits A into two blocks.

    No entry couples the sides, and each side's uniform field is
    separately in the kernel (its magnetisation is conserved on its own).
    Exact zeros for the coupling; 1e-16 (rounding) for the kernel.
    """
    grid = jittered_grid()
    inside = grid.cell_circumcentres[:, 0] < 4.0
    assert 0 < inside.sum() < grid.n_cells
    interface = grid.interface_faces(inside)
    kappa = _kappa(grid)
    kappa[0, interface] = 0.0
    kappa[0, ~interface] = torch.where(
        kappa[0, ~interface] == 0,
        torch.tensor(1e-3, dtype=torch.float64),
        kappa[0, ~interface],
    )
    op = _operator(grid, kappa)
    dense = _dense(op)[0]
    assert np.all(dense[np.ix_(inside, ~inside)] == 0.0)
    assert np.all(dense[np.ix_(~inside, inside)] == 0.0)
    s = op.sqrt_volumes.numpy()
    for side in (inside, ~inside):
        assert_allclose(dense @ (s * side), 0.0, atol=1e-16)
    # With a small but finite kappa the sides are coupled again.
    kappa[0, interface] = 1e-5
    leaky = _dense(_operator(grid, kappa))[0]
    assert np.any(leaky[np.ix_(inside, ~inside)] < 0)
    assert np.abs(leaky @ (s * inside)).max() > 1e-10


def test_all_closed_reflecting_operator_is_zero():
    """kappa = 0 everywhere with a reflecting wall: no transport at all."""
    grid = jittered_grid()
    kappa = torch.zeros(1, grid.n_faces, dtype=torch.float64)
    assert np.all(_dense(_operator(grid, kappa)) == 0.0)


# --------------------------------------------------------------------------
# Absorbing wall
# --------------------------------------------------------------------------
def test_absorbing_wall_only_drains():
    """Absorbing - reflecting = diag(sink / V), sink >= 0 on wall cells only.

    sink_i = sum over the wall faces of i of A / (d / D + 1 / kappa_wall),
    recomputed in numpy (rtol 1e-13). Then d/dt sum V M = -<sqrt(V), A u>
    = -sum_i sink_i M_i <= 0 for any non-negative magnetisation.
    """
    walled = jittered_grid("reflecting")
    absorbing = jittered_grid("absorbing")
    kappa, diff = _kappa(walled), _diffusivity(walled)
    a_ref = _dense(_operator(walled, kappa, diff))[0]
    op = _operator(absorbing, kappa, diff)
    a_abs = _dense(op)[0]
    extra = a_abs - a_ref
    assert_allclose(extra - np.diag(np.diag(extra)), 0.0, atol=0)
    d = diff[0].numpy()
    cells = absorbing.boundary_cells
    per_face = absorbing.boundary_areas / (
        absorbing.boundary_distances / d[cells] + 1.0 / absorbing.wall_permeability
    )
    sink = np.bincount(cells, per_face, minlength=absorbing.n_cells)
    assert_allclose(np.diag(extra), sink / absorbing.cell_volumes, rtol=1e-13)
    assert np.all(sink[cells] > 0)
    s = op.sqrt_volumes.numpy()
    # Loss rate of the uniform field = total wall conductance.
    assert_allclose(s @ a_abs @ s, sink.sum(), rtol=1e-13)
    # Any non-negative magnetisation loses mass, never gains it.
    m = np.random.default_rng(4).uniform(0, 1, absorbing.n_cells)
    assert s @ a_abs @ (s * m) > 0


# --------------------------------------------------------------------------
# Geometry of the gradient term
# --------------------------------------------------------------------------
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_displacements_join_circumcentres(boundary):
    """displacement[i, k] = x_nbr - x_i (minimum image on a periodic cell),
    antisymmetric between the two slots of a face; positions have zero mean.
    atol 1e-13 um: coordinates ~10 um, a few roundings."""
    grid = jittered_grid(boundary)
    op = _operator(grid)
    disp = op.displacement.numpy()
    nbr = op.neighbours.numpy()
    x = grid.cell_circumcentres
    expected = x[nbr] - x[:, None]
    if grid.periodic:
        expected -= grid.size * np.round(expected / grid.size)
    pad = grid.cell_faces < 0
    expected[pad] = 0.0
    assert_allclose(disp, expected, atol=1e-13)
    # Antisymmetry: slot (i -> j) is minus slot (j -> i).
    faces = grid.cell_faces
    for i in range(grid.n_cells):
        for k in np.flatnonzero(faces[i] >= 0):
            j = nbr[i, k]
            back = np.flatnonzero(faces[j] == faces[i, k])
            assert len(back) == 1
            assert_allclose(disp[j, back[0]], -disp[i, k], atol=1e-13)
    assert_allclose(op.positions.numpy().mean(0), 0.0, atol=1e-13)
    assert_allclose(op.positions.numpy() - (x - x.mean(0)), 0.0, atol=1e-13)


def test_phase_frame_generator_gives_the_free_diffusivity():
    """Periodic open cell: <1, G(k) 1> / V = D |k|^2 (1 + O(k^2 h^2)).

    G(k) = diag - W exp(-i k.d) is the phase-unwrapped generator assembled
    from the operator's weights and displacements. With circumcentre
    unknowns, sum_f A_f |d_f| n_f n_f^T = V I exactly on any periodic tiling
    (divergence theorem in each cell; the in-face parts cancel between the
    two cells of a face), which NOTES.md states for BCC; the jittered grid
    checks the general case. So the Rayleigh quotient of the uniform field
    is D |k|^2 up to the (k.d)^2 / 12 ~ 3e-7 relative term at |k| = 1e-3 /um
    (|d| <= 2 um): rtol 1e-6, in three directions. The quotient must also be
    real (G Hermitian): imaginary part below 1e-20 absolute (~1e-11 of it).
    """
    grid = jittered_grid("periodic")
    kappa = torch.full((1, grid.n_faces), np.inf, dtype=torch.float64)
    diff = torch.full((1, grid.n_cells), D_WATER, dtype=torch.float64)
    op = _operator(grid, kappa, diff)
    s = op.sqrt_volumes.numpy().astype(complex)
    w = op.weights[0].numpy()
    nbr = op.neighbours.numpy()
    disp = op.displacement.numpy()
    for direction in ([1, 0, 0], [0.6, 0.8, 0], [1, 1, 1]):
        k = 1e-3 * np.asarray(direction, float) / np.linalg.norm(direction)
        gu = op.diag[0].numpy() * s - np.sum(
            w * np.exp(-1j * disp @ k) * s[nbr], axis=1
        )
        quotient = np.vdot(s, gu) / grid.volume
        assert abs(quotient.imag) < 1e-20
        assert_allclose(quotient.real, D_WATER * (k @ k), rtol=1e-6)


# --------------------------------------------------------------------------
# Differentiability
# --------------------------------------------------------------------------
def test_operator_gradcheck():
    """torch.autograd.gradcheck of (diag, weights) w.r.t. kappa, D and 1/T2.

    On the absorbing grid, so that the wall sink's dependence on D is covered
    too (it contains the reflecting operator).

    kappa in [1e-4, 1e-1] plus exact zeros (the derivative at 0 is finite);
    central differences with eps 1e-8 on entries ~1e-2 have truncation
    error ~ eps^2 f''' ~ 1e-9 and rounding ~ 1e-16 * 1e-2 / 1e-8 ~ 1e-10,
    hence atol 1e-7, rtol 1e-5. fast_mode compares v^T J u for random u, v
    (one directional difference, one backward pass): a wrong entry of the
    Jacobian passes only on a measure-zero set of (u, v).
    """
    grid = jittered_grid("absorbing")
    rng = np.random.default_rng(5)
    kappa = 10 ** rng.uniform(-4, -1, (1, grid.n_faces))
    kappa[:, ::9] = 0.0
    kappa = torch.tensor(kappa, requires_grad=True)
    diff = _diffusivity(grid).requires_grad_(True)
    relax = torch.full((1, grid.n_cells), 1e-5, dtype=torch.float64)
    relax.requires_grad_(True)

    def entries(k, d, r):
        op = diffusion_operator(grid, k, d, r)
        return op.diag, op.weights

    assert torch.autograd.gradcheck(
        entries, (kappa, diff, relax), eps=1e-8, atol=1e-7, rtol=1e-5, fast_mode=True
    )
