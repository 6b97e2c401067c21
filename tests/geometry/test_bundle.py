"""axon_bundle: myelinated axons of gamma-distributed diameters packed in a
periodic section, their membranes and their histology-style descriptors."""

import numpy as np
import pytest
import torch
from conftest import BUNDLE_SETTINGS as SETTINGS
from numpy.testing import assert_allclose

from dipy_spinverse import Protocol, simulate
from dipy_spinverse.geometry.substrates.bundle import (
    axon_bundle,
    bundle_side,
    effective_diameter_of,
)
from dipy_spinverse.sim import analytic as an
from dipy_spinverse.sim.operators import face_conductance
from dipy_spinverse.sim.pools import PooledSection
from dipy_spinverse.sim.sections import SectionGrid


def _bundle(seed=0, n=64, **changes):
    settings = {**SETTINGS, **changes}
    side = bundle_side(
        settings["n_axons"],
        settings["mean_diameter"],
        settings["shape"],
        settings["g_ratio"],
        settings["fibre_fraction"],
    )
    grid = SectionGrid.triangular(side, n)
    return grid, axon_bundle(grid, rng=np.random.default_rng(seed), **settings)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_discs_are_packed_apart_and_fill_the_fibre_fraction(seed):
    """No two outer discs overlap (nearest periodic images; tolerance 1e-6
    of the smallest radius, the packing's), their areas fill exactly the
    fraction asked for, and the rasterised fibre fraction follows within the
    staircase of the lattice (spacing 0.17 um against radii of 0.5-2 um:
    3 %)."""
    grid, bundle = _bundle(seed)
    c = bundle.centres
    d = c[:, None] - c[None]
    d -= grid.extent * np.round(d / grid.extent)
    dist = np.linalg.norm(d, axis=-1)
    reach = (bundle.outer_diameters[:, None] + bundle.outer_diameters[None]) / 2
    apart = dist[np.triu_indices(len(c), 1)] - reach[np.triu_indices(len(c), 1)]
    assert apart.min() > -1e-6 * bundle.outer_diameters.min() / 2
    drawn = np.pi / 4 * np.sum(bundle.outer_diameters**2) / grid.volume
    assert_allclose(drawn, 0.7, rtol=1e-12)
    described = bundle.descriptors(grid.volume)
    assert_allclose(described["fibre_fraction"], 0.7, rtol=0.03)
    assert_allclose(bundle.diameters, bundle.inner_diameters, rtol=0.15)
    assert described["n_axons"] == 12


def test_descriptors_follow_their_definitions():
    """d_eff = (<d^6> / <d^2>)^(1/4) above the mean for any spread, the
    aggregate g-ratio sqrt(1 - MVF / FVF) between the axons' own, the
    intra-axonal fraction the axons' share outside myelin."""
    assert_allclose(effective_diameter_of([2.0, 2.0]), 2.0)
    assert_allclose(effective_diameter_of([1.0, 3.0]), (365 / 5) ** 0.25)
    grid, bundle = _bundle(1)
    got = bundle.descriptors(grid.volume)
    assert got["effective_diameter"] > got["mean_diameter"]
    assert bundle.g_ratios.min() < got["g_ratio"] < bundle.g_ratios.max()
    axons = bundle.axon_areas.sum()
    myelin = bundle.sheath_areas.sum()
    assert_allclose(got["intra_axonal_fraction"], axons / (grid.volume - myelin))
    assert_allclose(got["myelin_fraction"], myelin / grid.volume)
    cells = grid.cell_volumes
    assert_allclose(myelin, cells[bundle.compartment == 2].sum())


def test_membranes_lie_on_both_sides_of_every_sheath():
    """An axon's inside meets only its own sheath (a fine grid holds every
    sheath), through one membrane of its permeability; a sheath meets the
    outside or another sheath through its outer membrane (two in series
    between sheaths); no membrane within a compartment."""
    grid, bundle = _bundle(2, n=96)
    a, b = grid.face_cells.T
    comp, axon, kappa = bundle.compartment, bundle.axon, bundle.face_permeability
    same = (comp[a] == comp[b]) & (axon[a] == axon[b])
    assert np.all(np.isinf(kappa[same]))
    intra_faces = ~same & ((comp[a] == 1) | (comp[b] == 1))
    inner = np.where(comp[a] == 1, axon[a], axon[b])[intra_faces]
    other = np.where(comp[a] == 1, b, a)[intra_faces]
    assert np.all((comp[other] == 2) & (axon[other] == inner))
    assert_allclose(kappa[intra_faces], bundle.permeability[inner - 1])
    outer = ~same & (comp[a] == 2) & (comp[b] == 0)
    outer |= ~same & (comp[b] == 2) & (comp[a] == 0)
    k = np.maximum(axon[a], axon[b])[outer]
    assert_allclose(kappa[outer], bundle.permeability[k - 1])
    between = ~same & (comp[a] == 2) & (comp[b] == 2)
    ka = bundle.permeability[axon[a][between] - 1]
    kb = bundle.permeability[axon[b][between] - 1]
    assert_allclose(kappa[between], ka * kb / (ka + kb))


def test_an_axon_without_room_for_its_sheath_crosses_two_membranes():
    """On a coarse grid a thin sheath is missing in places: where an axon's
    inside meets the outside, the edge holds both membranes in series
    (kappa / 2)."""
    grid, bundle = _bundle(0, n=36, g_ratio=(0.85, 0.9))
    a, b = grid.face_cells.T
    comp, axon = bundle.compartment, bundle.axon
    bare = ((comp[a] == 1) & (comp[b] == 0)) | ((comp[a] == 0) & (comp[b] == 1))
    assert bare.any()
    k = np.maximum(axon[a], axon[b])[bare]
    assert_allclose(bundle.face_permeability[bare], bundle.permeability[k - 1] / 2)


def test_a_closed_myelinated_axon_against_the_cylinder():
    """One axon (R = 2 um, g = 0.7) closed on both sides of its sheath:
    the intra-axonal signal across the fibre is the Gaussian phase cylinder
    at the axon's own diffusivity (5 %, the staircase's, as
    tests/sim/test_sections.py), and along it exp(-b D_in) (1e-7)."""
    grid = SectionGrid.triangular(7.0, 28, axis=(0.0, 0.0, 1.0))
    rng = np.random.default_rng(0)
    bundle = axon_bundle(
        grid,
        rng=rng,
        n_axons=1,
        mean_diameter=4.0,
        shape=1e6,  # the mean itself
        g_ratio=0.7,
        fibre_fraction=np.pi / 4 * (4.0 / 0.7) ** 2 / 49.0,
        permeability=1e-9,
    )
    closed = np.where(np.isinf(bundle.face_permeability), np.inf, 0.0)
    inside = bundle.compartment == 1
    d_in = 1.2e-3
    delta, Delta, b = 0.01, 0.03, 1000.0
    prot = Protocol.pgse(
        [b, b], [[1, 0, 0], [0, 0, 1]], small_delta=delta, big_delta=Delta
    )
    signal = simulate(
        grid,
        closed,
        prot,
        initial=inside,
        diffusivity=bundle.per_cell(2e-3, d_in, 3e-4),
        density=bundle.per_cell(1.0, 1.0, 0.45),
        substeps=32,
    ).numpy()
    r_eff = np.sqrt(bundle.axon_areas[0] / np.pi)
    adc = -np.log(signal[0]) / b
    reference = an.cylinder_adc_gpa(delta * 1e6, Delta * 1e6, r_eff, d_in)
    assert abs(adc / reference - 1) < 0.05
    assert_allclose(-np.log(signal[1]) / b, d_in, rtol=1e-7)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(fibre_fraction=0.9), "fibre_fraction must lie in"),
        (dict(g_ratio=1.2), "g_ratio must lie in"),
        (dict(g_ratio=(0.8, 0.6)), "g_ratio must be a finite value"),
        (dict(n_axons=0), "n_axons"),
        (dict(mean_diameter=-1.0), "mean_diameter"),
        (dict(resolve_above=-1.0), "resolve_above"),
        (dict(resolve_above=0.0), "resolve_above"),
        (dict(resolve_above=np.nan), "resolve_above"),
    ],
)
def test_bad_arguments_are_named(changes, match):
    grid = SectionGrid.triangular(10.0, 24)
    settings = {**SETTINGS, **changes}
    with pytest.raises(ValueError, match=match):
        axon_bundle(grid, rng=np.random.default_rng(0), **settings)


def test_axons_finer_than_the_grid_are_refused():
    grid = SectionGrid.triangular(10.0, 4)  # 24 triangles for 40 axons
    settings = {**SETTINGS, "n_axons": 40}
    with pytest.raises(ValueError, match="hold no cell"):
        axon_bundle(grid, rng=np.random.default_rng(0), **settings)


# -- sub-grid axons (resolve_above) ---------------------------------------------


def test_without_resolve_above_the_bundle_is_todays():
    """resolve_above=None: every axon rasterised on the section itself, the
    same arrays as before (the grid is the section, no axon sub-grid);
    with resolve_above the same draw (the same discs and permeabilities)."""
    grid, bundle = _bundle(0, n=48)
    assert bundle.grid is grid
    assert not bundle.subgrid.any()
    assert bundle.compartment.shape == (grid.n_cells,)
    _, pooled = _bundle(0, n=48, resolve_above=2.0)
    for name in ("centres", "inner_diameters", "outer_diameters", "permeability"):
        assert_allclose(getattr(pooled, name), getattr(bundle, name), rtol=0)
    assert_allclose(pooled.subgrid, bundle.inner_diameters < 2.0)
    assert 0 < pooled.subgrid.sum() < 12


@pytest.mark.parametrize("resolve_above", [1.5, 10.0])
def test_subgrid_axons_keep_the_water_and_count_in_the_descriptors(resolve_above):
    """The pooled grid holds the section's area exactly (1e-12: removed
    cells' staircase given back by the cells around each fibre); a
    sub-grid axon's areas are its drawn discs'; the descriptors count
    every axon; b = 0 without relaxation gives 1 (1e-12)."""
    grid, bundle = _bundle(1, n=32, resolve_above=resolve_above)
    pooled = bundle.grid
    assert isinstance(pooled, PooledSection)
    assert_allclose(pooled.volume, grid.volume, rtol=1e-12)
    sub = bundle.subgrid
    assert sub.any()
    r_i, r_o = bundle.inner_diameters / 2, bundle.outer_diameters / 2
    assert_allclose(bundle.axon_areas[sub], np.pi * r_i[sub] ** 2, rtol=1e-12)
    assert_allclose(
        bundle.sheath_areas[sub], np.pi * (r_o[sub] ** 2 - r_i[sub] ** 2), rtol=1e-12
    )
    assert_allclose(bundle.diameters[sub], bundle.inner_diameters[sub], rtol=1e-12)
    described = bundle.descriptors(grid.volume)
    assert described["n_axons"] == 12
    assert_allclose(described["fibre_fraction"], 0.7, rtol=0.03)
    # Every cell's water per compartment: the pools hold the sub-grid axons'.
    cells = pooled.cell_volumes
    intra = cells[bundle.compartment == 1]
    assert_allclose(intra.sum(), bundle.axon_areas.sum(), rtol=1e-12)
    prot = Protocol.pgse([0], [[1, 0, 0]], small_delta=0.005, big_delta=0.02)
    got = simulate(
        pooled,
        bundle.face_permeability,
        prot,
        diffusivity=bundle.per_cell(2e-3, 1.7e-3, 3e-4),
        density=bundle.per_cell(1.0, 1.0, 0.45),
    )
    assert_allclose(got.numpy(), 1.0, atol=1e-12)


def test_a_subgrid_axon_exchanges_through_its_sheath_in_series():
    """A sub-grid axon's links (the extra-axonal cells it touches -> its
    sheath -> its axon) conduct in series the sheath's exact
    cylindrical-shell conductance (:meth:`AxonBundle.sheath_conductance`:
    both membranes and the sheath's radial diffusion) plus the axon's
    inside (path r_i / 4, the linear-driving-force rate 8 D / r_i^2): the
    outer membrane's perimeter is shared among the cells it touches
    (in parallel), whose own extra-axonal paths are made negligible here
    (D_extra 1e12), and the axon's inside pools are in parallel; equal
    densities inside and out, so the membranes pass kappa: rtol 1e-12."""
    grid, bundle = _bundle(1, n=32, resolve_above=10.0)
    pooled = bundle.grid
    d_in, d_my, rho_my = 1.7e-3, 3e-4, 0.45
    conductance = face_conductance(
        pooled,
        torch.as_tensor(bundle.face_permeability)[None],
        torch.as_tensor(bundle.per_cell(1e12, d_in, d_my))[None],
        torch.as_tensor(bundle.per_cell(1.0, 1.0, rho_my))[None],
    )[0].numpy()
    m = bundle.n_axons
    # The links: contacts -> sheaths, sheaths -> their axons' inside pools
    # (four quarters on a ring, or one), and round each ring (open).
    a, b = pooled.face_cells[pooled.n_grid_faces :].T
    kind = bundle.compartment[a] * 3 + bundle.compartment[b]
    owner = bundle.axon[b] - 1
    link = conductance[pooled.n_grid_faces :]
    outer = np.bincount(owner, weights=link * (kind == 2), minlength=m)
    inner = np.bincount(owner, weights=link * (kind == 7), minlength=m)
    assert set(kind) == {2, 7, 4}
    assert np.all(np.isinf(bundle.face_permeability[pooled.n_grid_faces :][kind == 4]))
    series = 1 / (1 / outer + 1 / inner)
    sheath = bundle.sheath_conductance(myelin_diffusivity=d_my, myelin_density=rho_my)
    r_i = bundle.inner_diameters / 2
    inside = 2 * np.pi * r_i * d_in / (r_i / 4)
    assert_allclose(series, 1 / (1 / sheath + 1 / inside), rtol=1e-12)
    # Each contact's displacement is its cell's to the fibre's centre.
    links = pooled.n_grid_faces + np.flatnonzero(kind == 2)
    myelin = owner[kind == 2]
    touching = pooled.face_cells[links, 0]
    step = grid.displacement2(
        bundle.centres[myelin], pooled.section_positions[touching]
    )
    moved = pooled.face_distances[links].sum(1)[:, None] * pooled.face_normals[links]
    assert_allclose(moved @ grid.plane.T, step, atol=1e-12)


def _one_axon(d_in, *, drawn=None, **changes):
    """One myelinated axon of inner diameter ``d_in`` (g = 0.7) filling 0.35
    of a 16-edge section (its drawn diameter, ``drawn``, is scaled to
    ``d_in``)."""
    g, fraction = 0.7, 0.35
    side = np.sqrt(np.pi / 4 * (d_in / g) ** 2 / fraction)
    grid = SectionGrid.triangular(side, 16)
    bundle = axon_bundle(
        grid,
        rng=np.random.default_rng(0),
        n_axons=1,
        mean_diameter=d_in if drawn is None else drawn,
        shape=1e6,
        g_ratio=g,
        fibre_fraction=fraction,
        permeability=1e-5,
        **changes,
    )
    return grid, bundle


def _ring_gpa(rate, delta, big_delta, r2, diffusivity, n_t=4000):
    """Gaussian phase attenuation of water on a ring of mean square radius
    ``r2`` (its one angular mode that a gradient sees: <x(t) x(t')> =
    r2 / 2 exp(-D |t - t'| / r2)), PGSE, by quadrature on ``n_t`` points."""
    out = []
    for g, big in zip(rate, big_delta, strict=True):
        te = big + delta
        t = (np.arange(n_t) + 0.5) * te / n_t
        f = (t < delta).astype(float) - ((t >= big) & (t < big + delta))
        corr = r2 / 2 * np.exp(-diffusivity * np.abs(t[:, None] - t[None]) / r2)
        out.append(np.exp(-0.5 * g**2 * (f @ corr @ f) * (te / n_t) ** 2))
    return np.array(out)


@pytest.mark.slow
def test_a_stick_differs_from_the_resolved_axon_by_its_restriction():
    """One axon of 0.8 um (g = 0.7), closed, rasterised on a fine grid
    (spacing 0.107 um), against the same axon as two sub-grid pools of
    the same water on the same grid (the same cells removed), b up to
    3000 s/mm^2, Delta 20 and 40 ms, delta 10 ms, gradients across and
    oblique. A pool does not move across the fibres, so the difference
    is the in-plane attenuation of the resolved axon's water: its inside's
    (the Gaussian phase cylinder, at most 6e-6 here: the axon is a stick)
    and its sheath's (water going round a ring: 3e-4 at b = 3000 across,
    1e-4 at b = 1000; D_myelin 0.27 um^2/ms). Measured: the difference is
    that prediction to 1 % at b = 3000 across, 1.3-1.5 x it at the
    smallest attenuations (the staircase annulus is a longer, rougher
    path than the ring: its angular mode is slower); tolerance 35 % of the
    prediction plus 2e-5."""
    d_in = 0.8
    grid, bundle = _one_axon(d_in, drawn=1.0)
    removed = bundle.compartment > 0
    r = np.linalg.norm(
        grid.displacement2(grid.section_positions, bundle.centres[0]), axis=1
    )
    host = int(np.flatnonzero(~removed)[np.argmin(r[~removed])])
    a_in, a_my = bundle.axon_areas[0], bundle.sheath_areas[0]
    n = grid.n_cells
    stick = PooledSection.attach(
        grid,
        pool_hosts=[host, host],
        pool_volumes=[a_my, a_in],
        links=[[host, n], [n, n + 1]],
        link_areas=[1.0, 1.0],
        link_distances=[[0.0, 0.1], [0.1, 0.1]],
        removed=removed,
    )
    d_ex, d_ax, d_my, rho_my = 1.7e-3, 2.2e-3, 0.27e-3, 0.45
    big_delta = np.repeat([0.02, 0.04], 5)
    prot = Protocol.pgse(
        np.tile([0, 1000, 3000, 1000, 3000], 2),
        np.tile(
            [[1, 0, 0], [1, 0, 0], [1, 0, 0], [0.6, 0, 0.8], [0.6, 0, 0.8]], (2, 1)
        ),
        small_delta=0.01,
        big_delta=big_delta,
    )
    closed = np.where(np.isfinite(bundle.face_permeability), 0.0, np.inf)
    with torch.no_grad():
        resolved = simulate(
            grid,
            closed,
            prot,
            diffusivity=bundle.per_cell(d_ex, d_ax, d_my),
            density=bundle.per_cell(1.0, 1.0, rho_my),
        ).numpy()
        sticks = simulate(
            stick,
            np.r_[closed[stick.kept_faces], 0.0, 0.0],
            prot,
            diffusivity=np.r_[np.full(stick.n_grid_cells, d_ex), d_my, d_ax],
            density=np.r_[np.ones(stick.n_grid_cells), rho_my, 1.0],
        ).numpy()
    water = grid.volume - a_my + rho_my * a_my
    rate = np.linalg.norm(prot.gradient_rate, axis=1)
    across = rate * np.hypot(prot.bvecs[:, 0], prot.bvecs[:, 1])
    along = prot.bvals * prot.bvecs[:, 2] ** 2
    cylinder = an.cylinder_gpa_pgse(
        across, 10000.0, big_delta * 1e6, np.sqrt(a_in / np.pi), d_ax
    )
    sheath = bundle.compartment == 2
    r2 = np.average(r[sheath] ** 2, weights=grid.cell_volumes[sheath])
    ring = _ring_gpa(across, 10000.0, big_delta * 1e6, r2, d_my)
    predicted = (
        a_in * (1 - cylinder) * np.exp(-along * d_ax)
        + rho_my * a_my * (1 - ring) * np.exp(-along * d_my)
    ) / water
    assert predicted.max() > 2e-4  # the restriction is seen
    assert np.all(np.abs(sticks - resolved - predicted) <= 0.35 * predicted + 2e-5)


@pytest.mark.slow
def test_a_subgrid_axon_moves_across_as_the_cylinders_first_mode():
    """A closed sub-grid axon (d = 2 um, D 2 um^2/ms) held as four pools
    on a ring: PGSE across the fibre, short and long pulses, b up to
    30,000 s/mm^2. The ring's Gaussian phase attenuation is the cylinder
    series' first term (its eigenvalue and its share of <x^2>, both
    exact by construction): the log-signal to 2e-3 (measured 3.4e-4 at
    these 24 sub-steps, 2.4e-4 at 64: Magnus steps). The whole series
    differs from that term by 0.13 % here (both pulses are long against
    R^2 / D = 0.5 ms; at most 1.26 % in the narrow-pulse limit, where the
    first mode holds 98.74 % of <x^2>): within 4e-3 of it, that gap plus
    the steps'. A stick's log-signal is zero."""
    diffusivity = 2e-3
    _, bundle = _one_axon(2.0, resolve_above=10.0)
    assert bundle.subgrid.all()
    closed = np.where(np.isfinite(bundle.face_permeability), 0.0, np.inf)
    radius = bundle.inner_diameters[0] / 2
    for delta, big_delta in [(0.01, 0.02), (0.003, 0.05)]:
        prot = Protocol.pgse(
            [1000, 30000], [[1, 0, 0]] * 2, small_delta=delta, big_delta=big_delta
        )
        signal = simulate(
            bundle.grid,
            closed,
            prot,
            initial=bundle.compartment == 1,
            diffusivity=bundle.per_cell(2e-3, diffusivity, 3e-4),
            density=bundle.per_cell(1.0, 1.0, 0.45),
            substeps=24,
        ).numpy()
        rate = np.linalg.norm(prot.gradient_rate, axis=1)
        timing = (rate, delta * 1e6, big_delta * 1e6, radius, diffusivity)
        first = an.cylinder_gpa_pgse(*timing, n_roots=1)
        series = an.cylinder_gpa_pgse(*timing)
        assert np.all(np.log(first) < -4e-4)  # the restriction is seen
        assert_allclose(np.log(signal), np.log(first), rtol=2e-3)
        assert_allclose(np.log(signal), np.log(series), rtol=4e-3)


def test_an_axon_whose_ring_would_outpace_the_grid_is_a_stick():
    """A sub-grid axon is four pools on a ring when the ring's angular mode
    (D root^2 / r^2) is no faster than the grid's fastest cell (sum_f A_f
    / L_f / V, D = 1; 12 / h^2 on the equilateral lattice: r >= 0.53 h),
    one pool at its centre otherwise: the thinnest axons of an
    exponential spread (mean 1 um) are sticks, more of them on a coarse
    grid (h 0.46 um) than a fine one (0.08 um); the inside's water is its
    disc's either way (1e-12)."""
    root = an.cylinder_roots(1)[0]
    sticks = []
    for n in (16, 96):
        grid, bundle = _bundle(1, n=n, mean_diameter=1.0, shape=1.0, resolve_above=10)
        pooled = bundle.grid
        faces = grid.face_areas / grid.face_distances.sum(1)
        fastest = np.max(
            np.bincount(grid.face_cells.ravel(), np.repeat(faces, 2))
            / grid.cell_volumes
        )
        r_i = bundle.inner_diameters / 2
        intra = bundle.compartment == 1
        owner = bundle.axon[intra] - 1
        parts = np.bincount(owner, minlength=bundle.n_axons)
        assert_allclose(parts, np.where(root**2 / r_i**2 <= fastest, 4, 1))
        sticks.append((parts == 1).sum())
        water = np.bincount(owner, pooled.cell_volumes[intra], minlength=len(r_i))
        assert_allclose(water, np.pi * r_i**2, rtol=1e-12)
        cells = pooled.face_cells[pooled.n_grid_faces :]
        ring = np.all(bundle.compartment[cells] == 1, axis=1)
        assert ring.sum() == 4 * (parts == 4).sum()
    assert sticks[0] > sticks[1] > 0
