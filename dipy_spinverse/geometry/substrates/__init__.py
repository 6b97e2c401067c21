"""Seeded random substrates: cells nobody hand-picked, for training and tests.

:func:`random_substrate` draws 1-4 (by default) cells of random kinds, sizes,
orientations and positions into any :class:`~dipy_spinverse.sim.grid.TetGrid`
(any size, resolution and wall) and returns a :class:`Substrate`: one label
per grid cell, one membrane permeability per cell, and the per-face
permeability field :func:`dipy_spinverse.simulate` takes. The same seed gives
the same substrate on every machine; :func:`random_substrates` draws many.

Cell kinds (:data:`KINDS`), each sized relative to the box and the lattice
(a characteristic radius ``r`` drawn log-uniformly between about
``max(0.6 spacing, 0.1 size)`` and ``0.35 size / n_cells**(1/3)``):

``"ellipsoid"``
    Three semi-axes drawn independently in ``[0.6 r, 1.7 r]`` (up to ~3:1),
    any orientation.
``"capsule"``
    A cylinder of radius ``0.6-1.0 r`` with hemispherical caps, axis length
    ``1-4 r``, any direction.
``"bent_tube"``
    A tube of radius ``0.5-0.8 r`` along a circular arc (curvature radius
    0.3-0.8 box sides, arc length 0.6-1.4 box sides, at most 3/4 of a
    circle) with hemispherical ends; often runs through the voxel.
``"beaded_tube"``
    A straight tube of length 0.6-1.5 box sides (flat ends) whose radius is
    modulated along the axis, ``r0 (1 + a cos(2 pi s / period + phase))``,
    ``a`` in ``[0.25, 0.5]``, a period of at least 2.5 lattice spacings.
``"fanning_tube"``
    A tube that widens along its length: a rounded cone whose radius grows
    1.6-2.5 fold from the root to the tip, or (half the draws) a root that
    splits into two widening branches diverging by 30-70 degrees.
``"torus"``
    A ring torus (tube radius ``0.45-0.7 r``, ring radius 1.6-2.5 tube
    radii), any orientation.
``"blob"``
    A smooth random blob: white noise on a regular 24^3 grid, smoothed by a
    Gaussian (scipy.ndimage), pulled down away from the centre, thresholded;
    the largest connected component is kept and its holes filled. Its
    signed distance (Euclidean distance transforms) is interpolated at the
    grid's cell centroids.

Placement and overlaps. Every kind is a level function of space (an exact or
approximate signed distance in um: negative inside). A grid cell takes the
label of the shape whose level is lowest at the cell's centroid, provided it
is negative (``"centroid"`` membership of :mod:`dipy_spinverse.geometry.phantoms`): a
nearest-level-set partition, so overlapping shapes become *touching* cells
(distinct labels with a membrane between them, packed against each other),
never overlapping ones. A shape cut into pieces by its neighbours keeps its
largest piece; the others go to the extracellular space. On periodic grids
every offset is the nearest periodic image (``TetGrid.displacement``), so
cells wrap through the box; a shape longer than half the box along a box axis
is cut where the nearest image flips. On walled grids cells that reach the
wall are closed by it.

A draw is rejected and redrawn (up to ``max_tries`` times) when a cell covers
less than ``min_cell_volume`` (an empty cell on a coarse grid), when less
than ``min_extracellular_fraction`` of the volume is left outside every cell
(a cell filling the box), or when the draw does not meet ``touching``. A
substrate is never returned with a lost or empty label.

Permeabilities. Each cell gets one membrane permeability drawn log-uniformly
in ``permeability_range`` (m/s = um/us). On a face between cell ``k`` and
the extracellular space the permeability is cell ``k``'s. Two touching cells
are separated by *two* membranes in series (each cell's own), so the face
between cells ``a`` and ``b`` carries ``1 / (1 / kappa_a + 1 / kappa_b)``;
every other face carries ``inf`` (no membrane). The outer wall is the
grid's (``grid.boundary``), not a membrane of the substrate.

One module per idea, re-exported here: :mod:`.substrate` (the
:class:`Substrate` and the partition of the grid cells), :mod:`.kinds` (the
cell kinds' level functions), :mod:`.random_cells` (random substrates),
:mod:`.packed` (packed cells and fibres), :mod:`.bundle` (myelinated
axons of gamma-distributed diameters in a section).
"""

from .bundle import AxonBundle, axon_bundle, bundle_side, effective_diameter_of
from .packed import FIBRE_DIRECTIONS, packed_substrate
from .random_cells import random_substrate, random_substrates
from .substrate import KINDS, PACKED_KINDS, Substrate

__all__ = [
    "Substrate",
    "KINDS",
    "PACKED_KINDS",
    "FIBRE_DIRECTIONS",
    "random_substrate",
    "random_substrates",
    "packed_substrate",
    "AxonBundle",
    "axon_bundle",
    "bundle_side",
    "effective_diameter_of",
]
