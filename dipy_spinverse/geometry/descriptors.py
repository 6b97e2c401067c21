"""Per-voxel tissue descriptors of a labelled grid: the single definition.

:func:`describe` turns a labelling of a :class:`~dipy_spinverse.sim.grid.TetGrid`
(0 outside, ``k`` inside cell ``k``) and its membrane permeabilities into the
nine numbers of :data:`DESCRIPTORS` that fits, benchmarks, tests and the
amortised posterior all share. Lengths in um, volumes in um^3, permeability in
m/s (= um/us), the exchange time in seconds; :data:`UNITS` lists them.

Definitions
-----------
``restricted_fraction``
    Volume inside cells over the voxel's water volume, ``grid.volume`` (the
    box on periodic grids; on walled grids the whole octahedra the grid
    keeps, less than the box).
``n_cells``
    Number of labelled cells.
``cell_volume``
    Mean cell volume ``sum_k V_k / n`` (um^3).
``cell_diameter``
    Equivalent-sphere diameter ``(6 V_k / pi)^(1/3)`` of each cell, averaged
    with weights ``V_k`` (um). On a
    :class:`~dipy_spinverse.sim.sections.SectionGrid` (straight fibres), the
    fibres' own diameter, ``sqrt(4 A_k / pi)`` of each cross-section of area
    ``A_k``, averaged with weights ``A_k``: the axon diameter that AxCaliber
    and ActiveAx estimate. (A fibre of a periodic TetGrid keeps the
    equivalent sphere of its piece in the box.)

Sections
    A section's fibres are described as the segments of length ``grid.size``
    of the cube of tissue the section stands for: ``cell_volume`` is the
    segment's volume, the membrane area its side's, the position covariance
    along the axis ``L^2 / 12`` (as a 3-D periodic fibre's), so that the
    fractions, ``surface_to_volume`` (perimeter over area), the exchange
    time (``d / (4 kappa)`` for a round fibre) and the orientation (the
    axis) mean what they mean for any cell.
``surface_to_volume``
    ``sum_k A_k / sum_k V_k`` (1/um), ``A_k`` the area of the *smooth*
    membrane of cell ``k`` (:func:`membrane_areas`).
``permeability``
    ``sum_k V_k kappa_k / sum_k V_k`` (m/s); NaN when a cell's permeability
    is unknown.
``exchange_time``
    ``sum_k V_k / sum_k kappa_k A_k`` in seconds: the mean residence time of
    intracellular water (``r / (3 kappa)`` for a sphere). ``A_k`` is the whole
    smooth membrane of cell ``k``, including any part it shares with a
    touching cell.
``anisotropy``, ``orientation``
    From the cells' second moments (:func:`cell_covariances`): the voxel's
    tensor is the volume-weighted mean ``T = sum_k V_k C_k / sum_k V_k`` of
    the cells' position covariances; ``anisotropy`` is the fractional
    anisotropy of ``T`` (the DTI formula on its eigenvalues: 0 for a sphere,
    ``-> 1`` for a long thin cylinder) and ``orientation`` its principal
    eigenvector (unit, first nonzero component positive; arbitrary when the
    anisotropy is ~0). As crossing fibres lower the DTI FA, cells elongated
    along different directions lower ``anisotropy`` and ``orientation`` is
    their volume-weighted compromise.

A voxel with no cell has ``restricted_fraction`` 0, ``n_cells`` 0, NaN for
the other scalars and a NaN ``orientation``.

The smooth membrane area
------------------------
A membrane made of grid faces is a staircase: its area (the summed face
areas) overstates the smooth surface it approximates (measured: spheres
1.17-1.88x, periodic cylinders 1.13-1.55x, ellipsoids 1.42-1.58x on BCC grids
of 6-32 cubes per side) and does not converge under refinement, because the
faces keep their lattice orientations however fine the grid is.
:func:`membrane_areas` projects each membrane face on a smooth normal instead,

    ``A_k = sum_f A_f n_f . s_k(x_f)``,

with ``n_f`` the face's unit normal pointing out of cell ``k`` and ``s_k`` the
unit vector of the Gaussian-weighted vector area of cell ``k``'s membrane,
``s_k(x) ~ sum_g A_g n_g exp(-|x - x_g|^2 / (2 sigma^2))``, the sum over cell
``k``'s membrane faces ``g`` within ``3 sigma`` of ``x`` (periodic images on
periodic grids). That vector is, up to the quadrature of each face at its
centroid, minus the gradient of the cell's indicator smoothed by a Gaussian,
so ``s_k`` is the classical smoothed-indicator normal; ``sigma`` is
:data:`SMOOTHING` lattice spacings. Why it converges: by the divergence
theorem the flux of a smooth unit field through the staircase equals its flux
through the smooth surface up to the volume between the two (``O(h)``), and the
estimated normal's error enters only at second order (a patch's faces sum to
its smooth vector area). The projection is exact for a plane at any angle.
Measured against the smooth sphere enclosing the same (labelled) volume, the
error is -1.8 % at a radius of 1.2 spacings, within 1 % from 1.5 spacings and
0.1-0.3 % from 2.5 spacings on (0.25 % for a periodic cylinder of 3.2
spacings), against +17 to +90 % for the staircase. Against the shape placed
(``4 pi r^2``) the labelling's own volume error dominates: -4.3 % and +0.5 %
for a sphere of 2.4 and 4.8 spacings radius; an ellipsoid of semi-axes
(9, 14, 6) um is within -0.7 % and +0.5 % of its exact area at 5 and 2.5 um
spacing (see ``tests/test_descriptors.py``). Faces on the outer wall of a walled
grid are not membrane and are never counted.

Permeability of a cell
----------------------
From ``cell_permeability`` when given. Otherwise from ``face_permeability``:
the median over the faces between cell ``k`` and the extracellular space
(label 0). A cell that only touches other cells is recovered from the series
rule of :class:`~dipy_spinverse.geometry.substrates.Substrate` (touching cells ``a``,
``b`` share ``1 / (1 / kappa_a + 1 / kappa_b)``): ``kappa_k = 1 / (1 / f -
1 / kappa_j)`` with ``f`` the median over the faces it shares with a
neighbour ``j`` of known permeability, layer by layer inwards; NaN where
neither exists (or the rule gives a non-positive value).
"""

import math

import numpy as np
from scipy.spatial import cKDTree

from ..sim.grid import TetGrid
from ..sim.sections import SectionGrid

__all__ = [
    "DESCRIPTORS",
    "UNITS",
    "WHITE_MATTER_UNITS",
    "SMOOTHING",
    "describe",
    "describe_substrate",
    "membrane_areas",
    "cell_covariances",
]

#: Names of the descriptors, in the order :func:`describe` returns them.
DESCRIPTORS = (
    "restricted_fraction",
    "n_cells",
    "cell_volume",
    "cell_diameter",
    "surface_to_volume",
    "permeability",
    "exchange_time",
    "anisotropy",
    "orientation",
)

#: Unit of each descriptor ("" for dimensionless).
UNITS = {
    "restricted_fraction": "",
    "n_cells": "",
    "cell_volume": "um^3",
    "cell_diameter": "um",
    "surface_to_volume": "1/um",
    "permeability": "m/s",
    "exchange_time": "s",
    "anisotropy": "",
    "orientation": "",
}

#: Unit of each descriptor of the white-matter priors' posteriors (bundles'
#: histology, their compartments and a mixed voxel's shares) that
#: :data:`UNITS` does not hold.
WHITE_MATTER_UNITS = {
    "effective_diameter": "um",
    "mean_diameter": "um",
    "intra_axonal_fraction": "",
    "myelin_fraction": "",
    "g_ratio": "",
    "intra_diffusivity": "mm^2/s",
    "extra_diffusivity": "mm^2/s",
    "free_water_fraction": "",
    "dot_fraction": "",
    "orientation_dispersion": "",
}

#: Width (standard deviation) of the Gaussian that smooths membrane normals,
#: in lattice spacings. One spacing averages over enough faces to remove the
#: staircase pattern (the errors hardly change from 1 to 1.33 spacings, and
#: grow below ~0.7 where too few faces are averaged) while keeping the
#: curvature bias small for cells a few spacings across.
SMOOTHING = 1.0
# Neighbours are summed out to this many sigmas (weight exp(-4.5) = 1 %).
_CUTOFF = 3.0
_US_PER_S = 1e6


def describe(grid, labels, face_permeability=None, *, cell_permeability=None):
    """Tissue descriptors of one voxel: a labelled grid and its membranes.

    See the module documentation for every definition, the smooth membrane
    area and how a cell's permeability is read.

    Parameters
    ----------
    grid : TetGrid
        The voxel's grid (any wall).
    labels : array_like of int (grid.n_cells,)
        0 outside every cell, ``k`` inside cell ``k``; the cells are numbered
        1 .. n with none missing. A bool array is one cell.
    face_permeability : array_like (grid.n_faces,), optional
        Permeability of every interior face in m/s (``inf`` where there is
        no membrane), e.g. ``Substrate.face_permeability`` or a
        ``Phantom.permeability``.
    cell_permeability : array_like (n,), optional
        Membrane permeability of each cell in m/s (entry ``k - 1`` is cell
        ``k``'s), e.g. ``Substrate.permeability``; instead of
        ``face_permeability``. Without either, ``permeability`` and
        ``exchange_time`` are NaN.

    Returns
    -------
    dict
        One entry per name of :data:`DESCRIPTORS`, in that order: floats,
        ``n_cells`` an int, ``orientation`` an ndarray (3,).

    Examples
    --------
    >>> from dipy_spinverse.sim.grid import TetGrid
    >>> from dipy_spinverse.geometry.phantoms import sphere
    >>> grid = TetGrid.bcc(40.0, 8, boundary="periodic")
    >>> ball = sphere(grid, radius=12.0, kappa=1e-5)
    >>> d = describe(grid, ball.labels, ball.permeability)
    >>> d["n_cells"], round(d["surface_to_volume"] * 12.0 / 3, 2)
    (1, 1.03)
    """
    labels, n = _check_labels(grid, labels)
    kappa_faces, kappa_cells = _check_permeability(
        grid, n, face_permeability, cell_permeability
    )
    out = dict.fromkeys(DESCRIPTORS, math.nan)
    out["restricted_fraction"] = 0.0
    out["n_cells"] = n
    out["orientation"] = np.full(3, np.nan)
    if n == 0:
        return out
    volumes, _, covariances = cell_covariances(grid, labels)
    areas = membrane_areas(grid, labels)
    v_in = volumes.sum()
    weights = volumes / v_in
    out["restricted_fraction"] = float(v_in / _tissue_volume(grid))
    out["cell_volume"] = float(v_in / n)
    out["cell_diameter"] = float(weights @ _diameters(grid, volumes))
    out["surface_to_volume"] = float(areas.sum() / v_in)
    if kappa_cells is None and kappa_faces is not None:
        kappa_cells = _cell_permeability(grid, labels, n, kappa_faces)
    if kappa_cells is not None and not np.any(np.isnan(kappa_cells)):
        out["permeability"] = float(weights @ kappa_cells)
        conductance = float(np.sum(kappa_cells * areas))
        with np.errstate(divide="ignore"):
            out["exchange_time"] = float(np.divide(v_in, conductance) / _US_PER_S)
    tensor = np.einsum("k,kij->ij", weights, covariances)
    evals, evecs = np.linalg.eigh(tensor)
    out["anisotropy"] = _fractional_anisotropy(evals)
    out["orientation"] = _fix_sign(evecs[:, -1])
    return out


def describe_substrate(grid, substrate):
    """:func:`describe` of a :class:`~dipy_spinverse.geometry.substrates.Substrate`.

    Parameters
    ----------
    grid : TetGrid
        The grid the substrate was drawn into.
    substrate : Substrate
        Its ``labels`` and per-cell ``permeability`` are used.

    Returns
    -------
    dict
        As :func:`describe`.
    """
    for name in ("labels", "permeability"):
        if not hasattr(substrate, name):
            raise ValueError(
                f"substrate must be a Substrate (with .labels and .permeability), "
                f"got {type(substrate).__name__}; for a bare labelling call "
                "describe(grid, labels, face_permeability)."
            )
    return describe(grid, substrate.labels, cell_permeability=substrate.permeability)


def membrane_areas(grid, labels, *, smooth=True):
    """Membrane area of each cell of a labelling (um^2).

    Parameters
    ----------
    grid : TetGrid
        The grid.
    labels : array_like of int (grid.n_cells,)
        0 outside, ``k`` inside cell ``k`` (1 .. n).
    smooth : bool
        True: the area of the smooth membrane, each face projected on the
        Gaussian-smoothed normal of its cell (see the module documentation).
        False: the raw staircase, the summed areas of the interior faces
        between the cell and any other label (as ``Substrate.surface_areas``),
        which overstates the smooth area (1.1-1.9x) and does not converge.

    Returns
    -------
    ndarray (n,)
        Entry ``k - 1`` is cell ``k``'s; faces on the outer wall of a walled
        grid are not counted.
    """
    labels, n = _check_labels(grid, labels)
    face, cell, normal = _membrane_sides(grid, labels)
    area = grid.face_areas[face] * _segment(grid)
    if smooth and len(face):
        area = area * _projection(grid, face, cell, normal)
    return np.bincount(cell, weights=area, minlength=n + 1)[1:]


def cell_covariances(grid, labels):
    """Volume, centre and position covariance of each cell of a labelling.

    Exact for the union of tetrahedra: a tetrahedron with corners ``v_i`` and
    centroid ``c`` contributes its volume times ``(c - m)(c - m)^T`` plus its
    own second moment about ``c``, ``(V / 20) sum_i (v_i - c)(v_i - c)^T``.
    On periodic grids each cell is unwrapped around its circular mean
    (per axis, weighted by volume) with ``grid.displacement``, so cells that
    cross the box stay whole; a cell that runs through the box (an infinite
    cylinder) gets the box's variance ``L^2 / 12`` along it.

    Parameters
    ----------
    grid : TetGrid
        The grid.
    labels : array_like of int (grid.n_cells,)
        0 outside, ``k`` inside cell ``k`` (1 .. n).

    Returns
    -------
    volumes : ndarray (n,)
        um^3.
    centres : ndarray (n, 3)
        Centres of mass in um (wrapped into the box on periodic grids).
    covariances : ndarray (n, 3, 3)
        um^2. A uniform ellipsoid of semi-axes ``(a, b, c)`` has
        ``diag(a^2, b^2, c^2) / 5``; the equivalent ellipsoid of a cell has
        semi-axes ``sqrt(5 * eigvalsh(C_k))``.
    """
    labels, n = _check_labels(grid, labels)
    if isinstance(grid, SectionGrid):
        return _section_covariances(grid, labels, n)
    inside = np.flatnonzero(labels > 0)
    k = labels[inside] - 1
    vol = grid.cell_volumes[inside]
    coords = grid.tet_coords[inside]
    local = coords - coords.mean(axis=1, keepdims=True)
    own = np.einsum("tia,tib->tab", local, local) / 20.0
    centroids = grid.cell_centroids[inside]
    box = grid.size if grid.periodic else None
    volumes, centres, covariances = _moments(
        k, n, vol, centroids, own, box, grid.displacement
    )
    return volumes, grid.wrap(centres), covariances


# -- internals ---------------------------------------------------------------
def _section_covariances(grid, labels, n):
    """:func:`cell_covariances` of a section's fibres, as the segments of
    length ``grid.size`` of the cube of tissue the section represents:
    exact in the plane (a triangle of centroid ``c`` adds its own second
    moment ``(A / 12) sum_i (v_i - c)(v_i - c)^T``), ``L^2 / 12`` along the
    axis, as a 3-D periodic fibre through a box of side ``L`` has."""
    inside = np.flatnonzero(labels > 0)
    k = labels[inside] - 1
    area = grid.cell_volumes[inside]
    coords = grid.tri_coords[inside]
    centroids = coords.mean(axis=1)
    local = coords - centroids[:, None]
    own = np.einsum("tia,tib->tab", local, local) / 12.0
    areas, centres, planar = _moments(
        k, n, area, centroids, own, grid.extent, grid.displacement2
    )
    plane, axis, length = grid.plane, grid.axis, grid.size
    covariances = np.einsum("ai,kab,bj->kij", plane, planar, plane)
    covariances += length**2 / 12 * np.outer(axis, axis)
    return areas * length, grid.wrap2(centres) @ plane, covariances


def _moments(k, n, weight, centroids, own, box, displacement):
    """Total weight, centre and position covariance of each of ``n`` cells
    made of pieces (cell ``k``, ``weight``, centroid, own second moment
    about it). On a periodic box (``box``: its side or sides) each cell is
    unwrapped around its circular mean per axis, weighted, with
    ``displacement``; the centre is returned unwrapped."""
    dim = centroids.shape[1]
    totals = np.bincount(k, weights=weight, minlength=n)
    if box is None:
        ref = np.zeros((n, dim))
    else:
        angle = 2 * np.pi * centroids / box
        sums = [
            np.stack(
                [
                    np.bincount(k, weights=weight * f(angle[:, a]), minlength=n)
                    for a in range(dim)
                ],
                axis=1,
            )
            for f in (np.sin, np.cos)
        ]
        ref = np.mod(np.arctan2(*sums) * box / (2 * np.pi), box)
    d = displacement(centroids, ref[k])
    first = np.zeros((n, dim))
    np.add.at(first, k, weight[:, None] * d)
    second = np.zeros((n, dim, dim))
    np.add.at(second, k, weight[:, None, None] * (own + d[:, :, None] * d[:, None, :]))
    mean = first / totals[:, None]
    covariances = second / totals[:, None, None] - mean[:, :, None] * mean[:, None]
    return totals, ref + mean, covariances


def _diameters(grid, volumes):
    """Equivalent-sphere diameters of closed cells; on a section, the
    fibres' own diameters (the circle of each cross-section's area)."""
    if isinstance(grid, SectionGrid):
        return np.sqrt(4 * volumes / (np.pi * _segment(grid)))
    return np.cbrt(6 * volumes / np.pi)


def _segment(grid):
    """Length (um) of the fibres a grid's cells stand for: a section's
    cells are per um of fibre, described as segments of its width."""
    return grid.size if isinstance(grid, SectionGrid) else 1.0


def _tissue_volume(grid):
    return grid.volume * _segment(grid)


def _check_labels(grid, labels):
    if not isinstance(grid, (TetGrid, SectionGrid)):
        raise ValueError(
            f"grid must be a TetGrid (e.g. TetGrid.bcc(size, n)) or a "
            f"SectionGrid, got {type(grid).__name__}."
        )
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.int64)
    if labels.shape != (grid.n_cells,) or labels.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be a 1-D integer array with one label per grid cell "
            f"({grid.n_cells},), got dtype {labels.dtype} and shape "
            f"{labels.shape}; label the grid's cells (grid.n_cells), not its "
            "faces or vertices."
        )
    labels = labels.astype(np.int64, copy=False)
    if labels.size and labels.min() < 0:
        raise ValueError(
            f"labels must be >= 0 (0 outside, k inside cell k), got {labels.min()}."
        )
    n = int(labels.max(initial=0))
    counts = np.bincount(labels, minlength=n + 1)
    missing = np.flatnonzero(counts[1:] == 0) + 1
    if len(missing):
        raise ValueError(
            f"labels must number the cells 1 .. n with none missing; labels "
            f"{missing[:10].tolist()} are absent. Renumber them, e.g. "
            "np.unique(labels, return_inverse=True)[1] (with 0 kept first)."
        )
    return labels, n


def _check_permeability(grid, n, face_permeability, cell_permeability):
    if face_permeability is not None and cell_permeability is not None:
        raise ValueError(
            "give face_permeability or cell_permeability, not both: the cells' "
            "permeabilities are read from the faces only when not given."
        )
    checked = []
    for name, values, length, what in (
        ("face_permeability", face_permeability, grid.n_faces, "grid.n_faces"),
        ("cell_permeability", cell_permeability, n, "the number of cells"),
    ):
        if values is None:
            checked.append(None)
            continue
        values = np.asarray(values, dtype=float)
        if values.shape != (length,):
            raise ValueError(
                f"{name} must have one value per entry of {what} ({length},), "
                f"got shape {values.shape}."
            )
        if np.any(np.isnan(values)) or np.any(values < 0):
            raise ValueError(
                f"{name} must be >= 0 m/s (inf for no membrane), got "
                f"{values[np.isnan(values) | (values < 0)][:5]}."
            )
        checked.append(values)
    return checked


def _membrane_sides(grid, labels):
    """Every (membrane face, cell) pair with the face's normal out of the cell."""
    a = labels[grid.face_cells[:, 0]]
    b = labels[grid.face_cells[:, 1]]
    cut = np.flatnonzero(a != b)
    a, b = a[cut], b[cut]
    normals = grid.face_normals[cut]  # from face_cells[:, 0] to [:, 1]
    face = np.concatenate([cut[a > 0], cut[b > 0]])
    cell = np.concatenate([a[a > 0], b[b > 0]])
    normal = np.concatenate([normals[a > 0], -normals[b > 0]])
    return face, cell, normal


def _projection(grid, face, cell, normal):
    """``n_f . s(x_f)`` for every membrane side (see the module docstring)."""
    sigma = SMOOTHING * grid.spacing
    points = grid.face_centroids[face]
    box = grid.size
    if isinstance(grid, SectionGrid):
        # In the plane's own coordinates, where the periodic box is the
        # square (the normals lie in the plane).
        points, normal, box = points @ grid.plane.T, normal @ grid.plane.T, grid.extent
    if grid.periodic:
        points = np.mod(points, box)
        points[points >= box] = 0.0  # mod can round up to the size
        tree = cKDTree(points, boxsize=box)
    else:
        tree = cKDTree(points)
    pairs = tree.query_pairs(_CUTOFF * sigma, output_type="ndarray")
    i, j = pairs[cell[pairs[:, 0]] == cell[pairs[:, 1]]].T
    gap = points[j] - points[i]
    if grid.periodic:
        gap -= box * np.round(gap / box)
    kernel = np.exp(np.einsum("pa,pa->p", gap, gap) / (-2 * sigma**2))
    weighted = grid.face_areas[face][:, None] * normal  # A_g n_g
    vector = weighted.copy()  # each face's own term
    for axis in range(points.shape[1]):
        vector[:, axis] += np.bincount(
            i, weights=kernel * weighted[j, axis], minlength=len(face)
        ) + np.bincount(j, weights=kernel * weighted[i, axis], minlength=len(face))
    norm = np.linalg.norm(vector, axis=1)
    dot = np.einsum("pa,pa->p", vector, normal)
    return np.where(norm > 0, dot / np.where(norm > 0, norm, 1.0), 1.0)


def _group_median(groups, values, n):
    """Median of ``values`` per group 0 .. n-1 (NaN for an empty group)."""
    order = np.lexsort((values, groups))
    groups, values = groups[order], values[order]
    counts = np.bincount(groups, minlength=n)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.full(n, np.nan)
    has = counts > 0
    lo = start[has] + (counts[has] - 1) // 2
    hi = start[has] + counts[has] // 2
    with np.errstate(invalid="ignore"):  # inf + inf is fine, inf - inf cannot occur
        out[has] = 0.5 * (values[lo] + values[hi])
    return out


def _cell_permeability(grid, labels, n, field):
    """Each cell's permeability from a face field (module docstring)."""
    a = labels[grid.face_cells[:, 0]]
    b = labels[grid.face_cells[:, 1]]
    outside = (a == 0) != (b == 0)
    kappa = _group_median(np.maximum(a, b)[outside] - 1, field[outside], n)
    touch = (a != b) & (a > 0) & (b > 0)
    if not np.any(np.isnan(kappa)) or not touch.any():
        return kappa
    a, b, f = a[touch], b[touch], field[touch]
    # Inwards, one layer of cells nested in known ones per pass (few cells).
    tried = set()
    while True:
        known = np.flatnonzero(~np.isnan(kappa)) + 1
        reach = {}
        for k in set(np.flatnonzero(np.isnan(kappa)) + 1) - tried:
            for j in known:
                shared = ((a == k) & (b == j)) | ((a == j) & (b == k))
                if shared.any():
                    with np.errstate(divide="ignore"):
                        inverse = 1 / np.median(f[shared]) - 1 / kappa[j - 1]
                    reach[k] = 1 / inverse if inverse > 0 else math.nan
                    break
        if not reach:
            return kappa
        for k, value in reach.items():
            kappa[k - 1] = value
        tried.update(reach)


def _fractional_anisotropy(evals):
    """DTI fractional anisotropy of three eigenvalues."""
    evals = np.asarray(evals, dtype=float)
    norm = np.sqrt(np.sum(evals**2))
    if norm == 0:
        return math.nan
    spread = np.sum((evals - np.roll(evals, 1)) ** 2)
    return float(np.sqrt(0.5 * spread) / norm)


def _fix_sign(vector):
    """``vector`` with its first nonzero component positive."""
    vector = np.asarray(vector, dtype=float)
    nonzero = np.flatnonzero(np.abs(vector) > 1e-12)
    if len(nonzero) and vector[nonzero[0]] < 0:
        vector = -vector
    return vector + 0.0  # no negative zeros
