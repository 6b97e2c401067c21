"""Sub-grid pools: water a section's grid does not resolve, as extra unknowns.

A straight fibre much thinner than the grid's spacing (a small axon, its
myelin sheath) needs a very fine and stiff grid to be resolved, yet diffusion
MRI sees it as a *stick*: its water barely moves across the fibres. A
:class:`PooledSection` keeps such water as *pools* (a double-porosity,
sub-grid finite-volume model): each pool is one more unknown of the
:class:`~dipy_spinverse.sim.sections.SectionGrid`, a "cell" whose "volume"
is the pool's area (per um of fibre), joined to grid cells or to other
pools by *links*: "faces" whose "area" is a membrane's length (per um of
fibre) and whose distances are the diffusion paths on its two sides. The
operators of :mod:`~dipy_spinverse.sim.operators` then apply unchanged:

- a link conducts ``w = A / (d_a / (D_a rho_a) + d_b / (D_b rho_b) + 1 /
  (kappa max(rho_a, rho_b)))`` like any face (``kappa = inf``: only the
  diffusion paths; ``kappa = 0``: closed);
- a pool has no in-plane flux but through its links, so it is a stick: it
  decays along the fibres at its own ``D k_a(t)^2`` (the section engine's
  per-cell term) and relaxes at its own T2;
- a pool sits at a position of its own (by default its host cell's
  circumcentre): a link carries the gradient's phase across the
  displacement between its two unknowns (nearest periodic image), as an
  edge does, so water crossing a pool from one side to the other moves
  across the section (a permeable fibre is a path, not only a store).
  The link's distances are resistances, not its length: its "normal" is
  its displacement over the sum of its distances (not a unit vector), so
  that the operators' slot displacement, distances times normal, is the
  displacement.

Grid cells may also be *removed* (those a sub-grid fibre covers: its water
is the pools', and the extra-axonal water flows around it) and the kept
cells' volumes changed (so that the water of the section is conserved when
the removed cells' area differs from the pools'). Face and cell arrays keep
:class:`~dipy_spinverse.sim.sections.SectionGrid`'s names: the kept grid
cells first, then the pools; the kept edges first, then the links.

Cost. The section engine's Magnus sub-steps follow the largest phase
across any slot, links included: a link as long as a fibre's radius on a
grid much finer than that fibre sets the steps (a step criterion weighed
by the slots' conductances would not; not done). The Chebyshev plan
bounds the spectrum by Gershgorin's discs of the symmetrised operator,
which sink below zero where a small pool is linked fast (``kappa = inf``)
to a much larger cell: more sub-steps and terms, and numpy's overflow
warnings in the plan (harmless: the signals still match the dense engine,
``tests/sim/test_subgrid.py``). Membrane-limited links, as in tissue, do
neither.

Units: um, us; volumes per um of fibre (um^2), areas per um of fibre (um).
"""

import dataclasses
from typing import NamedTuple

import numpy as np

from .grid import cell_adjacency
from .sections import SectionGrid

__all__ = ["PooledSection", "Pools", "Links"]


class Pools(NamedTuple):
    """The pools of a :class:`PooledSection`, numbered as in
    :meth:`PooledSection.attach`.

    Attributes
    ----------
    hosts : ndarray of int (n_pools,)
        Each pool's host cell of the section.
    volumes : ndarray (n_pools,)
        Each pool's area per um of fibre (um^2).
    places : ndarray (n_pools, 2)
        Each pool's place in the section's plane coordinates ``(u, v)`` (um).
    """

    hosts: np.ndarray
    volumes: np.ndarray
    places: np.ndarray


class Links(NamedTuple):
    """Links between unknowns, numbered as in :meth:`PooledSection.attach`:
    the "faces" of pools (module documentation).

    Attributes
    ----------
    cells : ndarray of int (n_links, 2)
        The two unknowns each link joins.
    areas : ndarray (n_links,)
        The membrane's length in the section (um per um of fibre).
    distances : ndarray (n_links, 2)
        The diffusion path on each side of the membrane (um).
    """

    cells: np.ndarray
    areas: np.ndarray
    distances: np.ndarray

    @classmethod
    def joined(cls, *parts):
        """The links of ``parts`` (each a :class:`Links`), in their order."""
        return cls(*(np.concatenate(column) for column in zip(*parts, strict=True)))


class PooledSection(SectionGrid):
    """A :class:`~dipy_spinverse.sim.sections.SectionGrid` with sub-grid
    pools attached to its cells (module documentation). Build one with
    :meth:`attach`, which checks its inputs; :func:`~dipy_spinverse.simulate`
    takes it as a section.

    Its unknowns are the kept grid cells first, in order, then the pools;
    its faces the kept edges first, then the links. The lattice and its
    frame (``vertices``, ``extent``, ``axis``, ``plane``, ``spacing``,
    ``row_height``, ``boundary``) are the section's.

    Parameters
    ----------
    section : SectionGrid
        The grid the pools are attached to.
    removed : ndarray of bool (section.n_cells,)
        Its cells removed.
    cell_volumes : ndarray (section.n_cells,)
        Its cells' volumes (um^2 per um of fibre; the removed ones' unread).
    pools : Pools
        The pools.
    links : Links
        The links.

    Attributes
    ----------
    section : SectionGrid
        The grid the pools are attached to.
    kept_cells : ndarray of int (n_grid_cells,)
        The section's cells kept, in order (the first ``n_grid_cells`` cells).
    kept_faces : ndarray of int (n_grid_faces,)
        The section's edges kept (both their cells kept), in order: a
        permeability field of the section maps to the first ``n_grid_faces``
        faces as ``field[kept_faces]``.
    pool_hosts : ndarray of int (n_pools,)
        Each pool's host: its grid cell (in this grid's numbering).
    """

    def __init__(self, section, *, removed, cell_volumes, pools, links):
        n, n_pools = section.n_cells, len(pools.hosts)
        # This grid's number of each unknown of the given numbering: the
        # kept cells, then the pools (-1: removed).
        kept_cells = np.flatnonzero(~removed)
        number = np.full(n + n_pools, -1, dtype=np.int64)
        number[kept_cells] = np.arange(len(kept_cells))
        number[n:] = len(kept_cells) + np.arange(n_pools)
        edges = section.face_cells
        kept_faces = np.flatnonzero(~removed[edges[:, 0]] & ~removed[edges[:, 1]])
        face_cells = np.concatenate([number[edges[kept_faces]], number[links.cells]])
        # Every unknown's place in the plane, and each link's displacement
        # from its first unknown to its second (nearest periodic image).
        where = np.concatenate([section.section_positions, pools.places])
        start, end = where[links.cells[:, 0]], where[links.cells[:, 1]]
        step = section.displacement2(end, start)
        pool_points = pools.places @ section.plane
        width = max(3, int(np.bincount(face_cells.ravel()).max()))
        cell_faces, cell_neighbours = cell_adjacency(
            face_cells, len(kept_cells) + n_pools, width
        )
        built = dict(
            triangles=section.triangles[kept_cells],
            tri_coords=section.tri_coords[kept_cells],
            cell_volumes=np.concatenate([cell_volumes[kept_cells], pools.volumes]),
            cell_centroids=np.concatenate(
                [section.cell_centroids[kept_cells], pool_points]
            ),
            cell_circumcentres=np.concatenate(
                [section.cell_circumcentres[kept_cells], pool_points]
            ),
            faces=np.concatenate(
                [section.faces[kept_faces], np.full((len(step), 2), -1, np.int64)]
            ),
            face_cells=face_cells,
            face_areas=np.concatenate([section.face_areas[kept_faces], links.areas]),
            face_centroids=np.concatenate(
                [
                    section.face_centroids[kept_faces],
                    section.wrap2(start + step / 2) @ section.plane,
                ]
            ),
            # Distances times normal is the displacement (module
            # documentation).
            face_normals=np.concatenate(
                [
                    section.face_normals[kept_faces],
                    (step / links.distances.sum(1)[:, None]) @ section.plane,
                ]
            ),
            face_distances=np.concatenate(
                [section.face_distances[kept_faces], links.distances]
            ),
            cell_faces=cell_faces,
            cell_neighbours=cell_neighbours,
        )
        lattice = {name: getattr(section, name) for name in _LATTICE}
        _set_fields(self, {**lattice, **built})
        _set(self, "section", section)
        _set(self, "kept_cells", kept_cells)
        _set(self, "kept_faces", kept_faces)
        _set(self, "pool_hosts", number[pools.hosts])
        for value in vars(self).values():
            if isinstance(value, np.ndarray):
                value.setflags(write=False)

    @classmethod
    def attach(
        cls,
        section,
        *,
        pool_hosts,
        pool_volumes,
        links,
        link_areas,
        link_distances,
        pool_positions=None,
        removed=None,
        cell_volumes=None,
    ):
        """``section`` with pools attached.

        Cells are named in one numbering: ``0 .. section.n_cells - 1`` the
        section's cells, ``section.n_cells + p`` pool ``p``.

        Parameters
        ----------
        section : SectionGrid
        pool_hosts : array_like of int (n_pools,)
            Each pool's host cell of ``section`` (kept): where it sits
            unless ``pool_positions`` says otherwise.
        pool_volumes : array_like (n_pools,)
            Each pool's area per um of fibre (um^2), > 0 (its water is this
            times its density, as a cell's).
        links : array_like of int (n_links, 2)
            The two unknowns each link joins: a pool and a kept cell, or two
            pools.
        link_areas : array_like (n_links,)
            The membrane's length in the section (um per um of fibre), > 0.
        link_distances : array_like (n_links, 2)
            The diffusion path on each side of the link's membrane (um),
            >= 0, at least one > 0 (so that an open link, ``kappa = inf``,
            conducts finitely).
        pool_positions : array_like (n_pools, 2), optional
            Each pool's place in the section's plane coordinates ``(u, v)``
            (um); default its host's circumcentre.
        removed : array_like of bool (section.n_cells,), optional
            Cells of ``section`` to remove (their edges go with them: the
            water around them flows past).
        cell_volumes : array_like (section.n_cells,), optional
            The section's cells' volumes (default its own); those of removed
            cells are not read.

        Returns
        -------
        PooledSection
        """
        if not isinstance(section, SectionGrid) or isinstance(section, cls):
            raise TypeError(
                f"section must be a plain SectionGrid, got {type(section).__name__}."
            )
        n = section.n_cells
        removed = _bools(removed, n)
        volumes = _array(
            section.cell_volumes if cell_volumes is None else cell_volumes,
            "cell_volumes",
            (n,),
        )
        hosts = np.asarray(pool_hosts, dtype=np.int64).reshape(-1)
        n_pools = len(hosts)
        pool_volumes = _array(pool_volumes, "pool_volumes", (n_pools,))
        links = np.asarray(links, dtype=np.int64).reshape(-1, 2)
        areas = _array(link_areas, "link_areas", (len(links),))
        distances = _array(link_distances, "link_distances", (len(links), 2))
        if np.any((hosts < 0) | (hosts >= n)) or np.any(removed[hosts]):
            raise ValueError(
                "pool_hosts must be kept cells of the section (0 .. n_cells - 1, "
                "not removed)."
            )
        if np.any(pool_volumes <= 0) or np.any(volumes[~removed] <= 0):
            raise ValueError(
                "pool_volumes and the kept cell_volumes must be > 0 (um^2 per um "
                "of fibre); a cell without water is removed instead."
            )
        if np.any(areas <= 0) or np.any(distances < 0):
            raise ValueError("link_areas must be > 0 and link_distances >= 0 (um).")
        if np.any(distances.sum(1) <= 0):
            raise ValueError(
                "each link needs a diffusion path (a link_distances > 0) so that "
                "an open membrane (kappa = inf) conducts finitely."
            )
        if np.any((links < 0) | (links >= n + n_pools)):
            raise ValueError(
                f"links must name cells 0 .. {n - 1} or pools {n} .. {n + n_pools - 1}."
            )
        if np.any(np.all(links < n, axis=1)):
            raise ValueError("a link joins a pool; two grid cells share an edge.")
        if np.any(links[:, 0] == links[:, 1]):
            raise ValueError("a link joins two different unknowns.")
        if np.any(removed[links[links < n]]):
            raise ValueError("links must join kept cells (not removed ones).")
        if pool_positions is None:
            places = section.section_positions[hosts]
        else:
            places = section.wrap2(
                _array(pool_positions, "pool_positions", (n_pools, 2))
            )
        return cls(
            section,
            removed=removed,
            cell_volumes=volumes,
            pools=Pools(hosts=hosts, volumes=pool_volumes, places=places),
            links=Links(cells=links, areas=areas, distances=distances),
        )

    @property
    def n_cells(self):
        """Number of unknowns: the kept grid cells and the pools."""
        return len(self.cell_volumes)

    @property
    def n_grid_cells(self):
        """Number of kept grid cells (the first ones)."""
        return len(self.kept_cells)

    @property
    def n_pools(self):
        """Number of pools (the last cells)."""
        return len(self.pool_hosts)

    @property
    def n_grid_faces(self):
        """Number of kept edges (the first faces); the links follow."""
        return len(self.kept_faces)

    def oriented(self, axis):
        """The same grid and pools with the fibres along ``axis``
        (:meth:`SectionGrid.oriented`).

        Parameters
        ----------
        axis : array_like (3,)

        Returns
        -------
        PooledSection
        """
        out = super().oriented(axis)
        _set(out, "section", self.section.oriented(axis))
        return out

    def __repr__(self):
        return (
            f"PooledSection(extent={self.extent[0]:g} x {self.extent[1]:g} um, "
            f"n_grid_cells={self.n_grid_cells}, n_pools={self.n_pools}, "
            f"axis={np.round(self.axis, 4).tolist()})"
        )


def _bools(mask, n):
    if mask is None:
        return np.zeros(n, dtype=bool)
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != (n,):
        raise ValueError(f"removed must be a boolean mask of the section's {n} cells.")
    return mask


def _array(value, name, shape):
    out = np.asarray(value, dtype=float)
    try:
        out = np.broadcast_to(out, shape).copy()
    except ValueError as err:
        raise ValueError(f"{name} must have shape {shape}, got {out.shape}.") from err
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} must be finite.")
    return out


#: The fields of a section its pooled section keeps as they are: the lattice
#: and its frame (the other fields are built from them and the pools).
_LATTICE = ("vertices", "extent", "axis", "plane", "spacing", "row_height", "boundary")


def _set_fields(obj, values):
    """Set every field of :class:`SectionGrid` on ``obj`` from ``values``; a
    field added to the section is refused here, not left unset."""
    fields = [field.name for field in dataclasses.fields(SectionGrid)]
    if sorted(values) != sorted(fields):
        unset = sorted(set(fields) - set(values))
        raise TypeError(
            f"PooledSection sets {sorted(values)}, but SectionGrid's fields are "
            f"{fields} (unset: {unset}); build each one in PooledSection.__init__."
        )
    for name in fields:
        _set(obj, name, values[name])


def _set(obj, name, value):
    if isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value)
    object.__setattr__(obj, name, value)
