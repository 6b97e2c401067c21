"""A fit's voxels: its per-voxel parameters (:data:`PARAMETERS`) as the
rows of a mask, one voxel's index, and the volume spread from the rows,
shared by the fits of both methods.

A volume fit holds the parameters of the voxels of its mask only, as rows
``(n_mask, ...)`` in C order (``volume[mask]``); the maps of the whole
volume are built from them when asked for (:func:`spread`).
"""

import numpy as np

from .codes import MASKED, MESH_NOT_REFINED

__all__ = [
    "PARAMETERS",
    "OPTIONAL_PARAMETERS",
    "MESH_PARAMETERS",
    "mask_params",
    "part_params",
    "masked_voxel",
    "take",
    "mask_rows",
    "spread",
    "scalar",
    "is_voxel",
    "wrapped",
    "voxel_row",
    "voxel_signal",
    "index_volume_fit",
]


#: Per-voxel parameters of the smooth mesh (None unless ``refine_mesh``):
#: vertex positions (V, 3) in um (the faces are the model's,
#: ``model.mesh_tets``), final loss and status. Saved and checkpointed by
#: :mod:`dipy_spinverse.io`; :func:`dipy_spinverse.io.surfaces.save_smooth_mesh`
#: writes the surfaces.
MESH_PARAMETERS = ("mesh_vertices", "mesh_loss", "mesh_status")

#: The per-voxel parameters a fit holds (``labels`` may be None).
PARAMETERS = (
    "permeability",
    "labels",
    "predicted",
    "S0",
    "S0_sequences",
    "loss",
    "status",
    "inside_probability",
    "uncertainty",
    "proposal_probability",
    *MESH_PARAMETERS,
)

#: Parameters only some fits hold (None otherwise): labels from the label
#: search or the cell parametrisation; the search's inside probability and
#: uncertainty; the learned proposal's occupancy.
OPTIONAL_PARAMETERS = (
    "labels",
    "inside_probability",
    "uncertainty",
    "proposal_probability",
)


def mask_rows(mask):
    """Row of each voxel of ``mask``'s volume (flat, C order) among the
    mask's voxels, -1 outside: where a fit's per-voxel ``params`` hold it."""
    mask = np.asarray(mask, dtype=bool)
    rank = np.full(mask.size, -1, dtype=np.int64)
    rank[mask.reshape(-1)] = np.arange(int(mask.sum()))
    return rank


def spread(rows, mask, fill):
    """Per-voxel ``rows`` (n_mask, ...) over the volume of ``mask``, ``fill``
    outside it.

    Parameters
    ----------
    rows : array_like (n_mask, ...)
        One entry per voxel of ``mask``.
    mask : ndarray of bool
        The volume's mask.
    fill : scalar
        The value outside the mask.

    Returns
    -------
    ndarray (mask.shape + rows.shape[1:])
        In ``rows``' dtype.
    """
    rows = np.asarray(rows)
    out = np.full(mask.shape + rows.shape[1:], fill, dtype=rows.dtype)
    out[mask] = rows
    return out


def scalar(values):
    """0-d arrays as Python numbers (one voxel), other arrays as they are."""
    values = np.asarray(values)
    return values.item() if values.ndim == 0 else values


def is_voxel(index, shape):
    """Whether ``index`` names one voxel by integers, e.g. ``(1, 0, 2)``.

    Parameters
    ----------
    index : object
        An index.
    shape : tuple of int
        The volume's shape.

    Returns
    -------
    bool
        True for a tuple of ``len(shape)`` integers (no bools).
    """
    return (
        isinstance(index, tuple)
        and len(index) == len(shape)
        # bool is an int, but numpy reads fit[True, 0, 0] as a new axis.
        and all(
            isinstance(i, int | np.integer) and not isinstance(i, bool) for i in index
        )
    )


def wrapped(index, shape):
    """A voxel's integer index with negative entries counted from the end, as
    numpy does; IndexError (numpy's message) outside the volume.

    Parameters
    ----------
    index : tuple of int
        The voxel's index.
    shape : tuple of int
        The volume's shape.

    Returns
    -------
    tuple of int
        The index with every entry in ``[0, n)``.

    Raises
    ------
    IndexError
        If an entry is outside its axis.
    """
    for axis, (i, n) in enumerate(zip(index, shape, strict=True)):
        if not -n <= i < n:
            raise IndexError(
                f"index {i} is out of bounds for axis {axis} with size {n}"
            )
    return tuple(int(i) % n for i, n in zip(index, shape, strict=True))


def voxel_row(rank, index, shape):
    """The row of voxel ``index`` (integers) among a mask's voxels, -1
    outside the mask (``rank``: :func:`mask_rows`).

    Parameters
    ----------
    rank : ndarray of int (mask.size,)
        Row of each voxel (:func:`mask_rows`).
    index : tuple of int
        The voxel's index.
    shape : tuple of int
        The volume's shape.

    Returns
    -------
    int
        The row, or -1 outside the mask.
    """
    return rank[np.ravel_multi_index(wrapped(index, shape), shape)]


def voxel_signal(data, index, mask, rank):
    """The signal of voxel ``index`` of ``mask``'s volume in ``data``.

    Parameters
    ----------
    data : ndarray (..., n_volumes) or (n_mask, n_volumes)
        The volume, or the voxels of the mask (``volume[mask]``), as
        :meth:`SpinverseSearchModel.fit` takes them.
    index : tuple of int
        A voxel of the mask.
    mask : ndarray of bool
    rank : ndarray of int
        :func:`mask_rows` of ``mask``.

    Returns
    -------
    ndarray (n_volumes,)
    """
    if np.shape(data)[:-1] == mask.shape:
        return np.asarray(data[index])
    row = voxel_row(rank, index, mask.shape)
    if row < 0:
        raise IndexError(f"voxel {index} is outside the fit's mask.")
    return np.asarray(data[row])


def index_volume_fit(fit, index):
    """``fit[index]`` for the volume fits of both methods: ``fit._part``
    with the checks a user of DIPY's fits expects.

    Parameters
    ----------
    fit : SpinverseFit or PosteriorFit
        A volume fit.
    index : object
        Any numpy index of the fit's shape.

    Returns
    -------
    object
        The fit of the voxels indexed (``fit._part(index)``).

    Raises
    ------
    IndexError
        For any index of a single-voxel fit, and for an index outside the
        fit's shape or with too many entries (numpy's message, with the
        fit's shape: numpy names the axis, not the array indexed).
    """
    if fit.shape == ():
        raise IndexError(
            "a single-voxel fit (shape ()) cannot be indexed; index the "
            "volume's fit, e.g. fit[i, j, k]."
        )
    try:
        return fit._part(index)
    except IndexError as err:
        raise IndexError(f"{err} (the fit has shape {fit.shape})") from None


def mask_params(params, mask):
    """A fit's parameters (:data:`PARAMETERS`, as arrays) and mask:
    ``params`` of the whole volume (``mask.shape + (...)``) reduced to the
    voxels of the mask, those of the mask's voxels (``(n_mask, ...)``) or
    of one voxel kept as they are.

    Parameters
    ----------
    params : dict of array_like or None
        With a ``status`` entry; a missing entry is None.
    mask : array_like of bool or None
        Default: every voxel of ``params["status"]``.

    Returns
    -------
    params : dict
    mask : ndarray of bool
    """
    params = {
        k: None if params.get(k) is None else np.asarray(params[k]) for k in PARAMETERS
    }
    status_shape = params["status"].shape
    mask = np.ones(status_shape, bool) if mask is None else np.asarray(mask, bool)
    n_mask = int(mask.sum())
    if mask.ndim == 0 or status_shape == (n_mask,):
        return params, mask
    if status_shape == mask.shape:
        return {k: None if v is None else v[mask] for k, v in params.items()}, mask
    raise ValueError(
        f"params['status'] has shape {status_shape}; a fit with a mask of "
        f"shape {mask.shape} needs {mask.shape} (the whole volume) or "
        f"({n_mask},) (the voxels in the mask)."
    )


def masked_voxel(params):
    """One voxel's parameters outside the mask, shaped as a row of ``params``
    (the voxels of a mask): status ``MASKED``, the rest as an unfitted
    voxel's (NaN, labels -1, mesh not refined), as ``model.fit(data,
    mask=False)`` holds them; the fit's maps read 0 there."""
    fills = {"status": MASKED, "labels": -1, "mesh_status": MESH_NOT_REFINED}
    return {
        k: None if v is None else np.full(v.shape[1:], fills.get(k, np.nan), v.dtype)
        for k, v in params.items()
    }


def part_params(params, mask, rank, index):
    """The parameters and mask of ``fit[index]`` (no checks: see
    :func:`index_volume_fit`) from a volume fit's ``params`` (the rows of
    ``mask``; ``rank``: :func:`mask_rows`).

    One voxel named by integers gives its row and mask True, or a masked
    voxel's (:func:`masked_voxel`) and mask False; any other index the rows
    of the part and its mask.

    Parameters
    ----------
    params : dict
        The volume fit's parameters, one row per voxel of ``mask``.
    mask : ndarray of bool
        The fit's mask.
    rank : ndarray of int (mask.size,)
        Row of each voxel (:func:`mask_rows`).
    index : object
        Any numpy index of ``mask.shape``.

    Returns
    -------
    params : dict
        The part's parameters.
    mask : ndarray of bool or bool
        The part's mask (a bool for one voxel).
    """
    shape = mask.shape
    if not is_voxel(index, shape):
        ids = np.arange(mask.size).reshape(shape)[index]
        if np.ndim(ids) != 0:
            inside = mask.reshape(-1)[ids]
            rows = rank[ids[inside]]
            return take(params, rows), inside
        index = np.unravel_index(int(ids), shape)
    row = voxel_row(rank, index, shape)
    if row < 0:
        # Not None (DIPY's MultiVoxelFit): ``fit[i, j, k].S0`` reads the
        # volume's map there, and ``status`` says why it is 0.
        return masked_voxel(params), False
    return take(params, row), True


def take(params, rows):
    """The entries ``rows`` of each parameter (None stays None).

    Parameters
    ----------
    params : dict
        Per parameter an array (or None).
    rows : int or array_like of int
        The entries to take.

    Returns
    -------
    dict
        The same keys, with the entries taken.
    """
    return {k: None if v is None else v[rows] for k, v in params.items()}
