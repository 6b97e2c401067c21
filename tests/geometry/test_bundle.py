"""axon_bundle: myelinated axons of gamma-distributed diameters packed in a
periodic section, their membranes and their histology-style descriptors."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from dipy_spinverse import Protocol, simulate
from dipy_spinverse.geometry.substrates.bundle import (
    axon_bundle,
    bundle_side,
    effective_diameter_of,
)
from dipy_spinverse.sim import analytic as an
from dipy_spinverse.sim.sections import SectionGrid

SETTINGS = dict(
    n_axons=12,
    mean_diameter=2.0,
    shape=4.0,
    g_ratio=(0.6, 0.8),
    fibre_fraction=0.7,
    permeability=(1e-5, 1e-4),
)


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
