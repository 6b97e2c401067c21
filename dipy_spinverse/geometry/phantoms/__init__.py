"""Ground-truth substrates placed in a fixed tetrahedral grid.

A :class:`Phantom` is what the inversion tries to recover: one permeability
per interior face of a :class:`~dipy_spinverse.sim.grid.TetGrid` (membrane faces
carry ``kappa``, every other face ``inf``, i.e. no membrane) and one label per
cell (0 for the extracellular space, ``k`` for the k-th cell).

Shapes are placed by *membership*: a grid cell belongs to a shape when its
centroid lies inside (``membership="centroid"``, the default) or when all four
of its vertices do (``membership="vertices"``, which reproduces the published
Spinverse targets: 48-112 inside cells of 576 on the 80/3 um grid, see
:func:`published_phantoms`). The membrane is then exactly the set of faces
between cells of different labels, so it is always a closed staircase surface
made of grid faces (closed by the outer wall where a shape runs into it).

Coordinates are in um in the grid's box ``[0, size]^3``; the default centre
is the box centre. On periodic grids a point is tested with its
minimum-image displacement from the shape's centre, so a shape that crosses
the box wraps around, and a straight cylinder along a box axis running through
the voxel is the periodic infinite cylinder; a shape larger than half the box
(or not aligned with the lattice, such as a tilted or bent tube running through
the voxel) is cut where the minimum image flips.

Staircase error: a cell whose membership differs from the exact partition of
space lies within ``delta`` of the shape's surface, ``delta`` being the
largest distance from a cell's centroid to its vertices (``"centroid"``;
``sqrt(5)/4 * spacing`` on BCC grids) or the largest cell diameter
(``"vertices"``; one spacing). So ``|V_cells - V_shape| <= area * delta`` to
first order (:func:`staircase_bound`). With centroid membership the errors on
the two sides of the surface largely cancel (a few per cent once a shape is
several cells across); ``"vertices"`` keeps only cells entirely inside and
always underestimates the volume.

One module per idea, re-exported here: :mod:`.inputs` (the shape builders'
checked inputs and coordinates), :mod:`.phantom` (the :class:`Phantom`,
membership and the staircase bound), :mod:`.solids`
(cylinder, sphere, torus, the published targets), :mod:`.axons` (bent and
beaded tubes), :mod:`.packings` (several cells).
"""

from .axons import beaded_axon, bent_axon, circular_arc
from .inputs import axial_coordinates
from .packings import cells_of_sizes, packed_cylinders
from .phantom import MEMBERSHIPS, Phantom, from_function, staircase_bound
from .solids import cylinder, published_phantoms, sphere, torus

__all__ = [
    "Phantom",
    "MEMBERSHIPS",
    "from_function",
    "cylinder",
    "sphere",
    "torus",
    "bent_axon",
    "circular_arc",
    "beaded_axon",
    "packed_cylinders",
    "cells_of_sizes",
    "published_phantoms",
    "staircase_bound",
    "axial_coordinates",
]
