"""Fibres in a SectionGrid: packed into its rectangle, and described as the
cylinder segments they stand for."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from dipy_spinverse.geometry import describe, describe_substrate, membrane_areas
from dipy_spinverse.geometry.substrates import packed_substrate
from dipy_spinverse.sim.sections import SectionGrid

AXIS = np.array([1.0, 2.0, 2.0]) / 3.0


def _disc(grid, radius):
    offset = grid.displacement2(grid.section_positions, grid.extent / 2)
    return np.linalg.norm(offset, axis=1) < radius


def test_packed_fibres_fill_the_fraction_along_the_axis():
    grid = SectionGrid.triangular(4.0, 16, axis=AXIS)
    for fraction in (0.2, 0.5, 0.8):
        substrate = packed_substrate(
            grid, rng=1, n_cells=4, fraction=fraction, fibres=True, size_spread=1.5
        )
        assert substrate.kinds == ("fibre",) * 4
        assert_allclose(substrate.params[0]["axis"], AXIS)
        truth = describe_substrate(grid, substrate)
        # The radius that fills the fraction is found on the grid's own
        # triangles: within one triangle (1/384 of the area here).
        assert abs(truth["restricted_fraction"] - fraction) <= 1 / grid.n_cells
        assert_allclose(abs(truth["orientation"] @ AXIS), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="fibres=True"):
        packed_substrate(grid, rng=1, n_cells=2, fibres=False)
    with pytest.raises(ValueError, match="section's axis"):
        packed_substrate(grid, rng=1, n_cells=2, fibres=True, axis=(1, 0, 0))


@pytest.mark.parametrize("n", [12, 24, 48])
def test_fibre_descriptors_are_those_of_the_cylinder(n):
    """A disc of radius R in a section of width L is described as the
    cylinder segment of length L it stands for (the 3-D periodic fibre's
    definitions) with the fibre's own diameter: fraction, volume and
    diameter exact for the labelled area; the
    smooth perimeter within 1.5 % of the circle of that area (measured
    +0.9 %, +0.6 %, +0.9 % at a = 0.67, 0.33, 0.17 um; the staircase is
    21-31 % over); exchange time R / (2 kappa); orientation the axis."""
    grid = SectionGrid.triangular(8.0, n, axis=AXIS)
    inside = _disc(grid, 2.0)
    area = grid.cell_volumes[inside].sum()
    radius = np.sqrt(area / np.pi)
    truth = describe(grid, inside, cell_permeability=[1e-5])
    length = grid.size
    assert_allclose(truth["restricted_fraction"], area / grid.volume, rtol=1e-12)
    assert_allclose(truth["cell_volume"], area * length, rtol=1e-12)
    assert_allclose(truth["cell_diameter"], 2 * radius, rtol=1e-12)
    perimeter = membrane_areas(grid, inside)[0] / length
    assert abs(perimeter / (2 * np.pi * radius) - 1) < 0.015
    assert_allclose(truth["surface_to_volume"], perimeter / area, rtol=1e-12)
    assert_allclose(truth["exchange_time"] * 1e6, area / (1e-5 * perimeter), rtol=1e-12)
    assert_allclose(abs(truth["orientation"] @ AXIS), 1.0, atol=1e-12)
