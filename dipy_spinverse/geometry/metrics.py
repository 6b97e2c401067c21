"""How well a recovered barrier matches the ground truth.

A barrier is a boolean field over the interior faces of a
:class:`~dipy_spinverse.sim.grid.TetGrid` (True on membrane faces), e.g. a
thresholded recovered permeability or :attr:`Phantom.barrier
<dipy_spinverse.geometry.phantoms.Phantom.barrier>`. Every metric compares two such
fields on the same grid:

- face classification: precision, recall, F1 and the fraction of misclassified
  faces (the published metric);
- enclosed volume: IoU and Dice of the cells each barrier encloses
  (:func:`~dipy_spinverse.geometry.topology.enclosed_cells`);
- surface distances in um between the barrier surfaces, sampled at the barrier
  faces' centroids: Chamfer (mean of the two mean nearest-neighbour
  distances) and Hausdorff (largest nearest-neighbour distance), uncentred,
  and optionally the published centred Chamfer;
- topology of the recovered surface (capped by the outer wall where it runs
  into it, see :func:`~dipy_spinverse.geometry.topology.barrier_mesh`): the fraction
  of its edges shared by exactly two triangles, closed, manifold, and the
  number of connected components.

Magnitude signals cannot tell a barrier from its point inversion through the
voxel centre (:func:`inversion_twin`): inverting the field conjugates the
transverse magnetisation. An off-centre cell and its twin fit the data
equally well, so score both (``twin=True`` in :func:`all_metrics`).

Empty surfaces: a distance to or from an empty surface is ``inf`` (and 0
between two empty surfaces); the edge fraction of an empty surface is
``nan``; precision is 0 when nothing is recovered but something was to be
found, and every score is 1 when both are empty.
"""

import numpy as np
from scipy.spatial import cKDTree

from .topology import barrier_mesh, check_barrier, enclosed_cells

__all__ = [
    "face_scores",
    "volume_overlap",
    "cell_overlap",
    "surface_points",
    "chamfer_distance",
    "hausdorff_distance",
    "edge_degree_fraction",
    "n_components",
    "inversion_twin",
    "cell_inversion",
    "grid_symmetries",
    "aligned_overlap",
    "all_metrics",
]


def face_scores(recovered, true):
    """Precision, recall and F1 of the barrier faces.

    Parameters
    ----------
    recovered, true : array_like of bool (n_faces,)
        Recovered and true barrier faces.

    Returns
    -------
    dict
        ``precision`` (recovered faces that are true), ``recall`` (true faces
        recovered), ``f1`` and ``face_error`` (fraction of all faces
        misclassified). With no recovered face precision is 0 (1 if there was
        no true face either); with no true face recall is 1.
    """
    recovered = _as_bool("recovered", recovered)
    true = _as_bool("true", true)
    if recovered.shape != true.shape:
        raise ValueError(
            f"recovered and true barriers differ in shape: {recovered.shape} vs "
            f"{true.shape}."
        )
    tp = int(np.sum(recovered & true))
    n_rec, n_true = int(recovered.sum()), int(true.sum())
    precision = tp / n_rec if n_rec else float(n_true == 0)
    recall = tp / n_true if n_true else 1.0
    total = precision + recall
    f1 = 2 * precision * recall / total if total else 0.0
    error = float(np.mean(recovered != true)) if true.size else 0.0
    return dict(precision=precision, recall=recall, f1=f1, face_error=error)


def volume_overlap(grid, recovered, true_inside):
    """IoU and Dice of the cells enclosed by a recovered barrier.

    Parameters
    ----------
    grid : TetGrid
    recovered : array_like of bool (n_faces,)
        Recovered barrier faces; their enclosed cells are those of
        :func:`~dipy_spinverse.geometry.topology.enclosed_cells`.
    true_inside : array_like of bool (n_cells,)
        True inside cells, e.g. ``phantom.labels > 0`` or the cells enclosed
        by the true barrier.

    Returns
    -------
    dict
        ``iou`` and ``dice``, weighted by cell volume; both 1 when neither
        encloses anything.
    """
    return cell_overlap(grid, enclosed_cells(grid, recovered), true_inside)


def cell_overlap(grid, inside, true_inside):
    """IoU and Dice of two sets of cells (e.g. two labellings' ``labels > 0``).

    Parameters
    ----------
    grid : TetGrid
    inside, true_inside : array_like of bool (n_cells,)

    Returns
    -------
    dict
        ``iou`` and ``dice``, weighted by cell volume; both 1 when both are
        empty.
    """
    inside, true_inside = (
        _cells(grid, inside, "inside"),
        _cells(grid, true_inside, "true_inside"),
    )
    v = grid.cell_volumes
    both = v[inside & true_inside].sum()
    either = v[inside | true_inside].sum()
    total = v[inside].sum() + v[true_inside].sum()
    if either == 0:
        return dict(iou=1.0, dice=1.0)
    return dict(iou=float(both / either), dice=float(2 * both / total))


def _cells(grid, values, name):
    values = np.asarray(values, dtype=bool)
    if values.shape != (grid.n_cells,):
        raise ValueError(
            f"{name} must have one value per cell ({grid.n_cells},), got shape "
            f"{values.shape}."
        )
    return values


def surface_points(grid, barrier):
    """Points sampling a barrier surface: its faces' centroids (um).

    Parameters
    ----------
    grid : TetGrid
    barrier : array_like of bool (n_faces,)

    Returns
    -------
    ndarray (n_barrier_faces, 3)
        Wrapped into ``[0, size)`` on periodic grids.
    """
    return grid.face_centroids[check_barrier(grid, barrier)]


def chamfer_distance(grid, recovered, true, *, centre=False):
    """Chamfer distance between two barrier surfaces in um.

    The mean of the two mean nearest-neighbour distances between the faces'
    centroids (periodic distances on periodic grids); 0 for identical
    barriers.

    Parameters
    ----------
    grid : TetGrid
    recovered, true : array_like of bool (n_faces,)
    centre : bool
        Subtract each point set's mean first (the published metric, blind to
        position errors); not defined on periodic grids.

    Returns
    -------
    float
        ``inf`` when exactly one surface is empty, 0 when both are.
    """
    d_rt, d_tr = _nearest_both(grid, recovered, true, centre=centre)
    if d_rt is None:
        return _empty_distance(d_tr)
    return float(0.5 * (d_rt.mean() + d_tr.mean()))


def hausdorff_distance(grid, recovered, true):
    """Hausdorff distance between two barrier surfaces in um.

    The largest distance from a face centroid of either surface to the nearest
    face centroid of the other (periodic distances on periodic grids).

    Parameters
    ----------
    grid : TetGrid
    recovered, true : array_like of bool (n_faces,)

    Returns
    -------
    float
        ``inf`` when exactly one surface is empty, 0 when both are.
    """
    d_rt, d_tr = _nearest_both(grid, recovered, true, centre=False)
    if d_rt is None:
        return _empty_distance(d_tr)
    return float(max(d_rt.max(), d_tr.max()))


def edge_degree_fraction(grid, barrier):
    """Fraction of the surface's edges shared by exactly two triangles.

    The surface is the barrier capped by the outer wall where it encloses
    cells against it (``barrier_mesh(..., cap_wall=True)``), so a cylinder
    running into the wall is not penalised. 1 for a closed surface; the
    published metric is the complement (edges of degree 1 or > 2).

    Parameters
    ----------
    grid : TetGrid
    barrier : array_like of bool (n_faces,)

    Returns
    -------
    float
        ``nan`` for an empty barrier.
    """
    degrees = barrier_mesh(grid, barrier, cap_wall=True).edge_degrees
    return float(np.mean(degrees == 2)) if len(degrees) else float("nan")


def n_components(grid, barrier):
    """Number of edge-connected components of the (wall-capped) surface.

    Parameters
    ----------
    grid : TetGrid
    barrier : array_like of bool (n_faces,)

    Returns
    -------
    int
        0 for an empty barrier.
    """
    return barrier_mesh(grid, barrier, cap_wall=True).n_components


def inversion_twin(grid, barrier):
    """The barrier inverted through the centre of the voxel, ``x -> -x``.

    For any gradient waveform, the Bloch-Torrey solution of the inverted
    field is the complex conjugate of the original's (the gradient term
    ``-i gamma g.x`` changes sign with ``x``), so the two give the same signal
    magnitude: magnitude data cannot tell them apart.

    Parameters
    ----------
    grid : TetGrid
        A grid symmetric under the inversion (``TetGrid.bcc`` is).
    barrier : array_like of bool (n_faces,)

    Returns
    -------
    ndarray of bool (n_faces,)
    """
    barrier = check_barrier(grid, barrier)
    return barrier[_inverted(grid, grid.face_centroids, exact=True)]


def cell_inversion(grid, *, exact=True):
    """The cell each cell maps to under inversion through the voxel centre.

    ``labels[cell_inversion(grid)]`` is the labelling inverted through the
    centre, which gives the same signal magnitude as ``labels`` (see
    :func:`inversion_twin`).

    Parameters
    ----------
    grid : TetGrid
    exact : bool
        Require a grid symmetric under the inversion (``TetGrid.bcc`` is);
        ``False`` maps each cell to the cell nearest its inverted centroid
        on any grid.

    Returns
    -------
    ndarray of int (n_cells,)
    """
    return _inverted(grid, grid.cell_centroids, exact=exact)


def _inverted(grid, points, *, exact):
    """Index of the point nearest each point's inversion through the centre."""
    tree = cKDTree(points, boxsize=grid.size if grid.periodic else None)
    distance, index = tree.query(grid.wrap(grid.size - points))  # about size / 2
    if exact and np.any(distance > 1e-6 * grid.spacing):
        raise ValueError(
            "grid is not symmetric under inversion through its centre; use a "
            "grid such as TetGrid.bcc (or exact=False for the nearest cells)."
        )
    return index


def grid_symmetries(grid):
    """Cell maps under which the signal of magnitude data cannot change.

    On a periodic grid, every translation by a vector of its BCC lattice
    (cube edges and the half body diagonal) moves a labelling to one with
    the same signal: the voxel has no origin. Inversion through the centre
    conjugates the solution (:func:`inversion_twin`). The maps are those of
    the group these generate that the grid holds exactly (each candidate is
    checked cell by cell), the identity first.

    Parameters
    ----------
    grid : TetGrid

    Returns
    -------
    maps : ndarray of int (n_maps, n_cells)
        ``labels[maps[k]]`` is the labelling moved by symmetry ``k``.
    names : list of str
        ``"identity"``, ``"translation (x, y, z) um"``, ``"inversion"``, ...
    """
    centroids = grid.cell_centroids
    tree = cKDTree(centroids, boxsize=grid.size if grid.periodic else None)
    tolerance = 1e-6 * grid.spacing
    vectors = [np.zeros(3)]
    if grid.periodic:
        size = np.broadcast_to(np.asarray(grid.size, dtype=float), (3,))
        n = np.round(size / grid.spacing).astype(int)
        steps = np.stack(np.meshgrid(*[np.arange(k) for k in n], indexing="ij"), -1)
        steps = steps.reshape(-1, 3) * grid.spacing
        vectors = list(steps) + list(steps + grid.spacing / 2)
    maps, names = [], []
    for t in vectors:
        # The map sends cell i to the cell at its moved position.
        distance, index = tree.query(grid.wrap(centroids + t))
        if np.all(distance <= tolerance):
            maps.append(index)
            shift = ", ".join(f"{v:.3g}" for v in t)
            names.append(f"translation ({shift}) um" if np.any(t) else "identity")
    try:
        inversion = cell_inversion(grid)
    except ValueError:  # not symmetric under inversion: translations only
        return np.array(maps), names
    # Translating the inverted cell i: the cell at (size - x_i) + t.
    maps += [m[inversion] for m in maps]
    names += [("inversion + " + n).replace(" + identity", "") for n in names]
    return np.array(maps), names


def aligned_overlap(grid, inside, true_inside):
    """IoU and Dice after the best of the grid's signal symmetries.

    The truth is moved by each map of :func:`grid_symmetries` (lattice
    translations on periodic grids, inversion through the centre) and the
    best overlap is kept: a fit is not blamed for what magnitude data cannot
    tell apart.

    Parameters
    ----------
    grid : TetGrid
    inside, true_inside : array_like of bool (n_cells,)

    Returns
    -------
    dict
        ``iou``, ``dice`` (volume weighted) and ``symmetry`` (its name).
    """
    true_inside = _cells(grid, true_inside, "true_inside")
    maps, names = grid_symmetries(grid)
    overlaps = [cell_overlap(grid, inside, true_inside[m]) for m in maps]
    best = max(range(len(maps)), key=lambda k: overlaps[k]["iou"])
    return dict(overlaps[best], symmetry=names[best])


def all_metrics(
    grid, recovered, phantom=None, *, true_barrier=None, true_labels=None, twin=False
):
    """Every metric of a recovered barrier against the ground truth.

    Parameters
    ----------
    grid : TetGrid
    recovered : array_like of bool (n_faces,)
        Recovered barrier faces (threshold a permeability first).
    phantom : Phantom, optional
        The ground truth (its ``barrier`` and ``labels``).
    true_barrier : array_like of bool (n_faces,), optional
        The true barrier, instead of ``phantom``.
    true_labels : array_like of int (n_cells,), optional
        True cell labels (0 outside), with ``true_barrier``.
    twin : bool
        Score the recovered barrier or its :func:`inversion_twin`, whichever
        has the higher F1 (magnitude data cannot tell them apart); ``twin``
        in the result says which was scored.

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f1``, ``face_error``; ``iou`` and
        ``dice`` of the enclosed cells against the cells the true barrier
        encloses (by the same rule, so that a perfect recovery scores 1 even
        where the truth traps extracellular pockets against the wall, as the
        published torus does); ``aligned_iou`` and ``aligned_symmetry``, the
        same after the best signal symmetry (:func:`aligned_overlap`); and
        ``iou_labels``/``dice_labels`` against ``labels > 0`` when labels are
        known; ``chamfer_um``,
        ``hausdorff_um`` and ``centred_chamfer_um`` (``nan`` on periodic
        grids); ``edge_degree2_fraction``, ``n_components``, ``is_closed``,
        ``is_manifold`` of the recovered surface capped by the wall;
        ``n_recovered_faces``, ``n_true_faces``.
    """
    if phantom is not None:
        if true_barrier is not None or true_labels is not None:
            raise ValueError("give either phantom or true_barrier/true_labels.")
        true_barrier, true_labels = phantom.barrier, phantom.labels
    if true_barrier is None:
        raise ValueError("all_metrics needs a phantom or a true_barrier.")
    recovered = check_barrier(grid, recovered)
    true_barrier = check_barrier(grid, true_barrier)
    use_twin = False
    if twin:
        mirrored = inversion_twin(grid, recovered)
        use_twin = (
            face_scores(mirrored, true_barrier)["f1"]
            > face_scores(recovered, true_barrier)["f1"]
        )
        recovered = mirrored if use_twin else recovered
    out = face_scores(recovered, true_barrier)
    out["twin"] = use_twin
    true_cells = enclosed_cells(grid, true_barrier)
    out.update(volume_overlap(grid, recovered, true_cells))
    aligned = aligned_overlap(grid, enclosed_cells(grid, recovered), true_cells)
    out["aligned_iou"], out["aligned_symmetry"] = aligned["iou"], aligned["symmetry"]
    if true_labels is not None:
        labels = np.asarray(true_labels)
        if labels.shape != (grid.n_cells,):
            raise ValueError(
                f"true_labels must have one value per cell ({grid.n_cells},), got "
                f"shape {labels.shape}."
            )
        labelled = volume_overlap(grid, recovered, labels > 0)
        out.update(iou_labels=labelled["iou"], dice_labels=labelled["dice"])
    out["chamfer_um"] = chamfer_distance(grid, recovered, true_barrier)
    out["hausdorff_um"] = hausdorff_distance(grid, recovered, true_barrier)
    out["centred_chamfer_um"] = (
        float("nan")
        if grid.periodic
        else chamfer_distance(grid, recovered, true_barrier, centre=True)
    )
    mesh = barrier_mesh(grid, recovered, cap_wall=True)
    degrees = mesh.edge_degrees
    out["edge_degree2_fraction"] = (
        float(np.mean(degrees == 2)) if len(degrees) else float("nan")
    )
    out["n_components"] = mesh.n_components
    out["is_closed"] = mesh.is_closed
    out["is_manifold"] = mesh.is_manifold
    out["n_recovered_faces"] = int(recovered.sum())
    out["n_true_faces"] = int(true_barrier.sum())
    return out


# -- internals ------------------------------------------------------------------
def _as_bool(name, barrier):
    barrier = np.asarray(barrier)
    if barrier.dtype != bool:
        if not np.issubdtype(barrier.dtype, np.integer) or np.any(
            (barrier != 0) & (barrier != 1)
        ):
            raise ValueError(
                f"{name} must be a boolean barrier; threshold a permeability first, "
                "e.g. permeability < 1e-3."
            )
        barrier = barrier.astype(bool)
    return barrier


def _nearest_both(grid, recovered, true, *, centre):
    """Nearest-neighbour distances both ways, or (None, n_empty) if any empty."""
    a = surface_points(grid, recovered)
    b = surface_points(grid, true)
    if len(a) == 0 or len(b) == 0:
        return None, int(len(a) == 0) + int(len(b) == 0)
    if centre:
        if grid.periodic:
            raise ValueError(
                "a centred Chamfer distance is not defined on a periodic grid (a "
                "surface has no unique mean position there)."
            )
        a = a - a.mean(axis=0)
        b = b - b.mean(axis=0)
    return _nearest(grid, a, b), _nearest(grid, b, a)


def _nearest(grid, points, targets):
    if grid.periodic:
        # cKDTree's periodic mode needs coordinates in [0, size); np.mod can
        # round a tiny negative value up to exactly size.
        size = grid.size
        points = np.mod(points, size)
        targets = np.mod(targets, size)
        points[points >= size] = 0.0
        targets[targets >= size] = 0.0
        tree = cKDTree(targets, boxsize=size)
    else:
        tree = cKDTree(targets)
    return tree.query(points)[0]


def _empty_distance(n_empty):
    return 0.0 if n_empty == 2 else float("inf")
