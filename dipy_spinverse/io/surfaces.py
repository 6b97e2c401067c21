"""The meshes of a fit: in each voxel's box, or placed in the scanner's space.

:func:`save_interface` and :func:`save_smooth_mesh` write a fit's barrier
surfaces and smooth cell surfaces as its voxels' boxes hold them (um); the
fit computes the meshes, this module writes them.

Each voxel's inversion recovers its barrier surface in a local box of side
``size`` um (the simulated grid, corners at 0 and ``size``).
:func:`volume_surface` places every voxel's surface into that voxel, as DIPY
places ODF glyphs: the box is mapped onto the voxel's extent (voxel
coordinates ``index - 1/2`` to ``index + 1/2``, the voxel centre at
``index``) and then through the image affine into scanner coordinates (mm).
The whole volume's barriers are then one surface (:class:`VolumeSurface`)
that overlays the NIfTI maps in any viewer; it is saved as GIFTI or PLY
(or ``.vtp``). :func:`save_voxel_meshes` writes the voxels' surfaces in
micrometres, one ``.vtp`` file each, for a closer look.

Voxels whose fit has no barrier have no surface: no file is written for
them and the combined surface skips them (an empty mesh file breaks meshio
and VTK). The box is scaled to the voxel's shape, so a 27 um box drawn in a
2 mm voxel is magnified about 74 times: the surfaces show where each voxel's
membranes are, not their size in millimetres.
"""

import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..checks import check_affine
from ..geometry.topology import barrier_regions
from ..reconst import MESH_OK, MESH_STATUS_CODES, STATUS_CODES
from .meshes import MESH_FORMATS, save_mesh, write_mesh

__all__ = [
    "VolumeSurface",
    "place_in_voxel",
    "volume_surface",
    "surface_slabs",
    "save_voxel_meshes",
    "save_interface",
    "save_smooth_mesh",
    "remove_voxel_meshes",
]

#: File names :func:`save_voxel_meshes` writes (and :func:`remove_voxel_meshes`
#: removes): ``voxel_<i>_<j>_<k>.<ext>``.
VOXEL_MESH = re.compile(r"voxel(_\d+)+(" + "|".join(map(re.escape, MESH_FORMATS)) + ")")


def place_in_voxel(vertices, index, *, size, affine=None):
    """Map points of a voxel's local box (um) into scanner coordinates.

    Parameters
    ----------
    vertices : array_like (V, 3)
        Points in the local box, um (the box spans 0 to ``size``).
    index : tuple of int
        The voxel (up to 3 indices; missing trailing ones are 0).
    size : float
        Side of the local box, um.
    affine : ndarray (4, 4), optional
        Voxel-to-scanner affine of the image (default identity).

    Returns
    -------
    ndarray (V, 3)
        Scanner coordinates: the box's corners go to the voxel's corners
        (``index -/+ 1/2`` in voxel coordinates), its centre to the voxel
        centre.
    """
    return _to_scanner(vertices, index, size, check_affine(affine))


def _to_scanner(vertices, index, size, affine):
    """:func:`place_in_voxel` with ``affine`` already checked (once per
    volume, not once per voxel)."""
    index = np.zeros(3) + np.pad(np.asarray(index, float), (0, 3 - len(index)))
    voxel = index - 0.5 + np.asarray(vertices, dtype=float) / size
    return voxel @ affine[:3, :3].T + affine[:3, 3]


@dataclass(frozen=True, eq=False)
class VolumeSurface:
    """The barrier surfaces of a volume fit as one triangle mesh.

    Parameters
    ----------
    vertices : ndarray (V, 3)
        Scanner coordinates (mm), or um for one voxel's mesh.
    triangles : ndarray of int (T, 3)
        Outward normals (the winding is flipped for affines that mirror).
    vertex_data : dict of ndarray (V,)
        ``voxel``: the voxel of each vertex (flat C-order index into the
        volume, ``np.unravel_index(voxel, shape)``); ``permeability``: the
        mean permeability (m/s) of the membrane triangles around the vertex
        (NaN on the outer wall).
    face_data : dict of ndarray (T,)
        ``voxel``; ``compartment``: which enclosed compartment of its voxel
        the triangle bounds (1 to the voxel's ``n_compartments``, 0 for a
        membrane that encloses nothing); ``permeability`` (m/s, NaN for the
        outer wall); ``wall``: 1 for the outer wall of the simulated box,
        which closes a compartment cut by it (not a membrane).
    """

    vertices: np.ndarray
    triangles: np.ndarray
    vertex_data: dict = field(default_factory=dict)
    face_data: dict = field(default_factory=dict)

    @property
    def n_vertices(self):
        return len(self.vertices)

    @property
    def n_triangles(self):
        return len(self.triangles)

    def save(self, path, *, binary=True):
        """Write the surface; the extension picks the format.

        Parameters
        ----------
        path : str or os.PathLike
            ``.gii`` (GIFTI surface: the geometry, coordinates marked as
            scanner space, and ``vertex_data`` as named data arrays),
            ``.ply`` (with ``vertex_data``) or ``.vtp`` (with ``vertex_data``
            and ``face_data``), each stating the space as RAS where Slicer
            reads it. Written atomically.
        binary : bool
            Binary PLY.

        Returns
        -------
        str

        Raises
        ------
        ValueError
            The surface is empty: no file is written.
        """
        return write_mesh(
            path,
            self.vertices,
            self.triangles,
            vertex_data=self.vertex_data,
            face_data=self.face_data,
            binary=binary,
            # Scanner RAS+: GIFTI's scanner space, and the SPACE=RAS tag
            # without which Slicer reads the mesh as LPS (mirrored).
            scanner=True,
            comment="dipy_spinverse barrier surfaces, scanner coordinates (mm)",
        )

    def __repr__(self):
        return (
            f"VolumeSurface(n_vertices={self.n_vertices}, "
            f"n_triangles={self.n_triangles})"
        )


def volume_surface(fit, *, affine=None, within=None):
    """One surface for every voxel of a volume fit, in scanner coordinates.

    Parameters
    ----------
    fit : SpinverseFit
        A volume fit (up to 3 spatial dimensions).
    affine : ndarray (4, 4), optional
        The image's voxel-to-scanner affine (default identity: voxel
        coordinates).
    within : ndarray of bool (fit.shape), optional
        Only these voxels (e.g. a slab: :func:`surface_slabs`).

    Returns
    -------
    VolumeSurface
        With no triangles when no voxel has a barrier (check
        ``n_triangles`` before saving).
    """
    if fit.shape == () or len(fit.shape) > 3:
        raise ValueError(
            f"volume_surface needs a volume fit of 1 to 3 dimensions, got shape "
            f"{fit.shape}; for one voxel use fit.interface_mesh."
        )
    affine = check_affine(affine)
    size = fit.model.grid.size
    pieces, n_vertices = [], 0
    for index, piece in _voxel_pieces(fit, within):
        voxel = np.ravel_multi_index(index, fit.shape)
        vertices = _to_scanner(piece.vertices, index, size, affine)
        pieces.append((vertices, piece.triangles + n_vertices, piece, voxel))
        n_vertices += len(vertices)
    if not pieces:
        return VolumeSurface(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    triangles = np.concatenate([p[1] for p in pieces])
    if np.linalg.det(affine[:3, :3]) < 0:
        # A mirroring affine turns the winding inside out: keep normals outward.
        triangles = triangles[:, [0, 2, 1]]

    def joined(part, name):
        return np.concatenate([getattr(p[2], part)[name] for p in pieces])

    face_voxel = np.concatenate([np.full(len(p[1]), p[3]) for p in pieces])
    vertex_voxel = np.concatenate([np.full(len(p[0]), p[3]) for p in pieces])
    return VolumeSurface(
        np.concatenate([p[0] for p in pieces]),
        triangles,
        vertex_data=dict(
            voxel=vertex_voxel, permeability=joined("vertex_data", "permeability")
        ),
        face_data=dict(
            voxel=face_voxel,
            compartment=joined("face_data", "compartment"),
            permeability=joined("face_data", "permeability"),
            wall=joined("face_data", "wall"),
        ),
    )


def surface_slabs(fit, max_voxels):
    """Slabs of whole slices (along the last axis) of at most ``max_voxels``
    fitted voxels each, so that a brain's barriers are written in pieces.

    A slice that alone holds more than ``max_voxels`` fitted voxels is a
    slab of its own.

    Parameters
    ----------
    fit : SpinverseFit
        A volume fit.
    max_voxels : int

    Returns
    -------
    list of (int, int)
        ``(first, last)`` slice of each slab (inclusive), in order; slabs
        with no fitted voxel are left out.
    """
    fitted = np.asarray(fit.fitted, bool)
    if fitted.ndim < 3:
        fitted = fitted.reshape(fitted.shape + (1,) * (3 - fitted.ndim))
    counts = fitted.reshape(-1, fitted.shape[-1]).sum(0)
    slabs, first, held = [], None, 0
    for k, count in enumerate(counts):
        if first is not None and held + count > max_voxels:
            slabs.append((first, k - 1))
            first, held = None, 0
        if count and first is None:
            first = k
        held += count
    if first is not None:
        slabs.append((first, len(counts) - 1))
    return [(a, b) for a, b in slabs if counts[a : b + 1].any()]


def save_voxel_meshes(fit, folder, *, ext=".vtp"):
    """Write each voxel's barrier surface in micrometres, one file per voxel.

    Parameters
    ----------
    fit : SpinverseFit
        A volume fit.
    folder : str or os.PathLike
        Created if needed; receives ``voxel_<i>_<j>_<k><ext>`` for every
        fitted voxel with a barrier (none for the others: no empty files).
    ext : {".vtp", ".ply", ".gii"}
        ``.vtp`` (VTK XML PolyData, with the per-triangle and per-vertex data
        of :class:`VolumeSurface`), PLY (binary, per-vertex data) or GIFTI.

    Returns
    -------
    dict
        ``{voxel index: path}``.
    """
    if ext not in (".vtp", ".ply", ".gii"):
        raise ValueError(f"ext must be '.vtp', '.ply' or '.gii', got {ext!r}.")
    paths = {}
    for index, piece in _voxel_pieces(fit):
        name = "voxel_" + "_".join(map(str, index)) + ext
        write_mesh(
            os.path.join(os.fspath(folder), name),
            piece.vertices,
            piece.triangles,
            vertex_data=piece.vertex_data,
            face_data=None if ext == ".ply" else piece.face_data,
            comment=f"dipy_spinverse barrier surface of voxel {index} (um)",
        )
        paths[index] = os.path.join(os.fspath(folder), name)
    return paths


def save_interface(fit, path, *, ext=".vtp", binary=True):
    """Write a fit's interface meshes (um, in the voxel's local box).

    No file is written for a voxel without a barrier (an empty mesh file
    breaks meshio and VTK). For the meshes of a volume in scanner
    coordinates, see :func:`volume_surface`.

    Parameters
    ----------
    fit : SpinverseFit
        One voxel or a volume.
    path : str or os.PathLike
        One voxel: the mesh file; its extension picks the format
        (``.vtp``, ``.ply``, ``.gii`` or legacy ``.vtk``). A volume: a
        folder (created if needed) that receives
        ``voxel_<i>_<j>_<k><ext>`` per fitted voxel with a barrier.
    ext : {".vtp", ".ply", ".gii", ".vtk"}
        File type of a volume's meshes (``.vtp``: VTK XML PolyData, read
        by VTK, ParaView and PyVista; legacy ``.vtk`` is not read by
        meshio or trimesh).
    binary : bool
        Binary PLY (``.ply`` only).

    Returns
    -------
    str, None or dict
        The path (None when the voxel has no barrier), or ``{voxel index:
        path}`` for a volume's voxels with a barrier.
    """
    if fit.shape == ():
        mesh = fit.interface_mesh
        if mesh is None:
            raise ValueError(
                f"this voxel has no fitted interface (status {fit.status}: "
                f"{STATUS_CODES[fit.status]})."
            )
        if mesh.n_triangles == 0:
            return None
        return save_mesh(mesh, path, binary=binary and str(path).endswith(".ply"))
    os.makedirs(path, exist_ok=True)
    paths = {}
    for index in zip(*np.nonzero(fit.fitted), strict=True):
        index = tuple(int(i) for i in index)
        name = "voxel_" + "_".join(map(str, index)) + ext
        written = save_interface(
            fit[index], os.path.join(os.fspath(path), name), binary=binary
        )
        if written is not None:
            paths[index] = written
    return paths


def save_smooth_mesh(fit, path, *, ext=".vtp", binary=True):
    """Write a fit's smooth cell surfaces (um, in the voxel's local box).

    The surfaces of ``SpinverseModel(..., refine_mesh=True)``'s meshes
    (:attr:`~dipy_spinverse.reconst.SpinverseFit.smooth_mesh`).

    Parameters
    ----------
    fit : SpinverseFit
        One voxel or a volume, of a model with ``refine_mesh=True``.
    path : str or os.PathLike
        As in :func:`save_interface`: one voxel, the file; a volume, a
        folder receiving ``voxel_<i>_<j>_<k><ext>`` per refined voxel.
    ext : {".vtp", ".ply", ".gii", ".vtk"}
        File type of a volume's meshes.
    binary : bool
        Binary PLY (``.ply`` only).

    Returns
    -------
    str or dict
        The path, or ``{voxel index: path}`` for a volume.
    """
    if fit.mesh_vertices is None:
        raise ValueError(
            "this fit has no smooth meshes: build the model with refine_mesh=True."
        )
    if fit.shape == ():
        mesh = fit.smooth_mesh
        if mesh is None:
            raise ValueError(
                f"this voxel has no smooth mesh (mesh status {fit.mesh_status}: "
                f"{MESH_STATUS_CODES[fit.mesh_status]})."
            )
        return save_mesh(mesh, path, binary=binary and str(path).endswith(".ply"))
    os.makedirs(path, exist_ok=True)
    paths = {}
    for index in zip(*np.nonzero(fit.mesh_status == MESH_OK), strict=True):
        index = tuple(int(i) for i in index)
        name = "voxel_" + "_".join(map(str, index)) + ext
        paths[index] = save_smooth_mesh(
            fit[index], os.path.join(os.fspath(path), name), binary=binary
        )
    return paths


def remove_voxel_meshes(folder):
    """Remove the per-voxel mesh files a previous run left in ``folder``.

    Only files named as :func:`save_voxel_meshes` names them are removed.

    Returns
    -------
    list of str
        The paths removed.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if VOXEL_MESH.fullmatch(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed


def _voxel_pieces(fit, within=None):
    """(index, VolumeSurface in um) of every fitted voxel with a barrier
    (of those ``within``, when given)."""
    grid = fit.model.grid
    wall_cells = _wall_cell_lookup(grid)
    chosen = fit.fitted if within is None else fit.fitted & np.asarray(within, bool)
    for index in zip(*np.nonzero(chosen), strict=True):
        index = tuple(int(i) for i in index)
        voxel = fit[index]
        mesh = voxel.interface_mesh
        if mesh is None or mesh.n_triangles == 0:
            continue
        yield index, _piece(grid, voxel, mesh, wall_cells)


def _piece(grid, voxel, mesh, wall_cells):
    """One voxel's mesh with its per-triangle and per-vertex data."""
    faces = mesh.face_ids
    wall = faces < 0
    permeability = np.full(len(faces), np.nan)
    permeability[~wall] = voxel.permeability[faces[~wall]]
    # The cell on the enclosed side of each triangle, then its compartment.
    region, outside = barrier_regions(grid, voxel.barrier)
    cells = np.empty(len(faces), dtype=np.int64)
    sides = grid.face_cells[faces[~wall]]
    cells[~wall] = np.where(region[sides[:, 0]] != outside, sides[:, 0], sides[:, 1])
    corners = np.sort(mesh.vertex_ids[mesh.triangles[wall]], axis=1)
    cells[wall] = [wall_cells[tuple(c)] for c in corners]
    enclosed = np.unique(region[region != outside])
    compartment = np.searchsorted(enclosed, region[cells]) + 1
    compartment[region[cells] == outside] = 0
    # Vertex permeability: the mean over the membrane triangles around it.
    membrane = mesh.triangles[~wall].reshape(-1)
    weights = np.repeat(permeability[~wall], 3)
    total = np.bincount(membrane, weights, minlength=mesh.n_vertices)
    count = np.bincount(membrane, minlength=mesh.n_vertices)
    with np.errstate(invalid="ignore", divide="ignore"):
        vertex_permeability = np.where(count > 0, total / count, np.nan)
    return VolumeSurface(
        mesh.vertices,
        mesh.triangles,
        vertex_data=dict(permeability=vertex_permeability),
        face_data=dict(compartment=compartment, permeability=permeability, wall=wall),
    )


def _wall_cell_lookup(grid):
    """{sorted vertex ids of an outer-wall face: the cell inside it}."""
    faces = np.sort(grid.boundary_faces, axis=1)
    return {tuple(f): int(c) for f, c in zip(faces, grid.boundary_cells, strict=True)}
