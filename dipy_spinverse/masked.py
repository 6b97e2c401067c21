"""The masked-fit base: :class:`MaskedFit`, the volume machinery of every fit.

A fit of any method (the label search's, the posterior's, a compartment
model's) is a volume of voxels of which a mask was fitted. What that takes
is the same for all, so it lives here once, as DIPY keeps it in
``dipy.reconst.multi_voxel``: the volume's shape and mask, the per-voxel
parameters held as the rows of the mask (``(n_mask, ...)`` in C order,
``volume[mask]``, so a fit's memory grows with its mask), the status of
every voxel, the maps spread from the rows over the volume (0 outside the
mask, NaN where a voxel was not fitted), voxel indexing (``fit[i, j, k]``
one voxel's fit, any other numpy index a smaller volume fit) and the arrays
that make up the fit's file. A subclass keeps only what is its own: its
parameters' names and meanings, its maps, its prediction.

The status codes every method shares are defined here (:data:`COMMON_CODES`);
a method adds its own (:data:`dipy_spinverse.reconst.STATUS_CODES`,
:data:`dipy_spinverse.reconst.posterior.POSTERIOR_STATUS_CODES`).

The mask of a fit's data is read here too (:func:`masked_rows`): its data
a volume or the rows of its mask only (:func:`is_mask_rows`).

It sits under every model package (``compartments`` included), so it
imports only the package's validators (:mod:`dipy_spinverse.checks`).
"""

from functools import cached_property

import numpy as np
from dipy.reconst.base import ReconstFit

from .checks import check_mask_values

__all__ = [
    "MaskedFit",
    "COMMON_CODES",
    "OK",
    "NONFINITE",
    "BAD_B0",
    "DIVERGED",
    "MASKED",
    "mask_rows",
    "is_mask_rows",
    "volume_shape",
    "check_mask",
    "masked_rows",
    "spread",
    "scalar",
    "take",
    "is_voxel",
    "wrapped",
    "voxel_row",
    "voxel_signal",
    "status_counts",
]

OK, NONFINITE, BAD_B0, DIVERGED, MASKED = 0, 1, 2, 4, -2

#: The status codes of every method's fits and their meaning: the gate's
#: (a voxel whose data cannot be fitted), a fit that returned non-finite
#: values, and outside the mask. Each method's table adds its own codes.
COMMON_CODES = {
    OK: "ok",
    NONFINITE: "data contain NaN or inf, or overflow once b0-normalised",
    BAD_B0: "mean b=0 signal <= 0",
    DIVERGED: "the fit returned non-finite values",
    MASKED: "outside the mask",
}


class MaskedFit(ReconstFit):
    """A fit of one voxel or a volume: per-voxel rows over a mask.

    Parameters
    ----------
    model : ReconstModel
    params : dict of ndarray or None
        Per-voxel parameters, each the rows of the voxels of ``mask``,
        ``(n_mask, ...)`` in C order (None where the fit has no such
        parameter); a ``status`` entry (:attr:`status_codes`). A fit of one
        voxel (``mask`` a bool) holds one row, or none outside the mask.
    mask : array_like of bool
        The fitted voxels of the volume; its shape is the fit's.

    Notes
    -----
    A subclass whose public constructor takes other arrays (a volume,
    one voxel's values) converts them and calls this one. The parts
    ``fit[index]`` are built from rows by :meth:`_from_rows`, bypassing the
    subclass's constructor: an attribute a part does not inherit is a class
    attribute's default.
    """

    #: The meaning of each status code of this class's fits.
    status_codes = COMMON_CODES
    #: The statuses of the voxels that have outputs (maps not NaN).
    fitted_codes = (OK,)

    def __init__(self, model, params, mask):
        ReconstFit.__init__(self, model, None)
        self.params = params
        self.mask = np.asarray(mask, dtype=bool)

    # -- the volume ----------------------------------------------------------------
    @property
    def shape(self):
        """Shape of the fitted volume, ``()`` for one voxel."""
        return self.mask.shape

    @cached_property
    def _rank(self):
        """Row of each voxel of the volume in :attr:`params` (-1 outside)."""
        return mask_rows(self.mask)

    def _rows(self, name):
        """``params[name]`` of the voxels in the mask, (n_mask, ...)."""
        return self.params[name]

    def _volume(self, rows, fill, outside=None):
        """Per-voxel ``rows`` (n_mask, ...) as the fit's: over the volume,
        ``fill`` outside the mask; one voxel: its row, or ``outside`` (default
        ``fill`` in the rows' trailing shape) outside the mask."""
        rows = np.asarray(rows)
        if self.shape != ():
            return spread(rows, self.mask, fill)
        if self.mask:
            return rows[0]
        if outside is not None:
            return outside
        # [()]: a number for a scalar map, as rows[0] of a voxel inside.
        return np.full(rows.shape[1:], fill, dtype=rows.dtype)[()]

    @property
    def _fitted_rows(self):
        """Rows (voxels of the mask) with outputs (:attr:`fitted_codes`)."""
        return np.isin(self._rows("status"), self.fitted_codes)

    def _map(self, rows):
        """Map of per-voxel ``rows`` (n_mask,): NaN where not fitted, 0
        outside the mask; a Python number for one voxel."""
        values = np.where(self._fitted_rows, rows, np.nan).astype(float)
        return scalar(self._volume(values, 0.0))

    # -- status --------------------------------------------------------------------
    @property
    def status(self):
        """Status map (0 = ok; :attr:`status_codes`), ``MASKED`` outside the
        mask; an int for one voxel."""
        return scalar(self._volume(self._rows("status"), MASKED))

    @property
    def ok(self):
        """Voxels fitted without problems (status ``OK``)."""
        return np.asarray(self.status) == OK

    @property
    def fitted(self):
        """Voxels with outputs (status in :attr:`fitted_codes`)."""
        return np.isin(np.asarray(self.status), self.fitted_codes)

    def status_counts(self):
        """Voxels of the mask per status, ``{meaning: count}``
        (:attr:`status_codes`), of the codes present."""
        return status_counts(self._rows("status"), self.status_codes)

    # -- voxels --------------------------------------------------------------------
    def voxel_data(self, data, index):
        """The signal of voxel ``index`` in the fitted ``data``, a volume or
        the rows of its mask (:func:`voxel_signal`)."""
        return voxel_signal(data, index, self.mask, self._rank)

    def __getitem__(self, index):
        """The fit of one voxel, or of a part of the volume, indexed as numpy.

        Integers naming one voxel, ``fit[i, j, k]`` (negative ones count from
        the end), give that voxel's fit, of shape ``()``: outside the mask
        its status is ``MASKED`` and it reads as the volume's maps there.
        Any other index (slices, ``...``, a boolean mask) gives a smaller
        volume fit; the parameter axes are never indexed.

        Raises
        ------
        IndexError
            For an index outside the fit's shape or with too many entries
            (numpy's message, with the fit's shape: numpy names the axis,
            not the array indexed), and for any index of a single-voxel fit.
        """
        if self.shape == ():
            raise IndexError(
                "a single-voxel fit (shape ()) cannot be indexed; index the "
                "volume's fit, e.g. fit[i, j, k]."
            )
        try:
            return self._part(index)
        except IndexError as err:
            raise IndexError(f"{err} (the fit has shape {self.shape})") from None

    def _part(self, index):
        """:meth:`__getitem__` without its checks."""
        shape = self.shape
        if not is_voxel(index, shape):
            # numpy indexes the map of voxels: its rules (negative indices,
            # bounds, slices, boolean masks), no copy of the volume.
            ids = np.arange(self.mask.size).reshape(shape)[index]
            if np.ndim(ids) != 0:
                inside = self.mask.reshape(-1)[ids]
                # rank[ids[inside]] runs over the part's mask in C order.
                rows = self._rank[ids[inside]]
                return self._from_rows(take(self.params, rows), inside)
            index = np.unravel_index(int(ids), shape)
        row = voxel_row(self._rank, index, shape)
        # One row, or none outside the mask: not None (DIPY's MultiVoxelFit),
        # so that the voxel reads as the volume's maps there.
        take_rows = slice(row, row + 1) if row >= 0 else slice(0, 0)
        return self._voxel_part(take(self.params, take_rows), row >= 0)

    def _voxel_part(self, rows, inside):
        """The fit of one voxel from its rows (one, or none outside the mask)."""
        return self._from_rows(rows, np.bool_(inside))

    def _from_rows(self, params, mask):
        """A fit of this class over ``params`` (rows of ``mask``), of this
        fit's model, without the subclass's constructor."""
        part = object.__new__(type(self))
        MaskedFit.__init__(part, self.model, params, mask)
        return part

    # -- saving --------------------------------------------------------------------
    def saved_arrays(self):
        """The arrays that make up a volume fit: ``mask`` and each per-voxel
        parameter the fit holds (its rows), as
        :func:`dipy_spinverse.io.save_fit` writes them.

        Returns
        -------
        dict of ndarray
        """
        arrays = {k: np.asarray(v) for k, v in self.params.items() if v is not None}
        arrays["mask"] = self.mask
        return arrays

    # -- repr ----------------------------------------------------------------------
    def _repr_items(self):
        """``name=value`` entries of the repr after the status (none here)."""
        return []

    def __repr__(self):
        if self.shape == ():
            status = self.status
            head = [f"status={status} ({self.status_codes[status]})"]
        else:
            head = [f"shape={self.shape}", f"status={self.status_counts()}"]
        return f"{type(self).__name__}({', '.join(head + self._repr_items())})"


def status_counts(status, meanings=COMMON_CODES):
    """How many voxels have each status (by its meaning), MASKED left out.

    Parameters
    ----------
    status : array_like of int
    meanings : dict
        The meaning of each code, in the order of the result.

    Returns
    -------
    dict
        ``{meanings[code]: count}`` of the codes present.
    """
    status = np.asarray(status)
    return {
        meanings[c]: int(np.sum(status == c))
        for c in meanings
        if c != MASKED and np.any(status == c)
    }


def mask_rows(mask):
    """Row of each voxel of ``mask``'s volume (flat, C order) among the
    mask's voxels, -1 outside: where a fit's per-voxel ``params`` hold it."""
    mask = np.asarray(mask, dtype=bool)
    rank = np.full(mask.size, -1, dtype=np.int64)
    rank[mask.reshape(-1)] = np.arange(int(mask.sum()))
    return rank


def is_mask_rows(data, mask):
    """Whether ``data`` holds the voxels of ``mask`` only, ``(n_mask, n_volumes)``
    (``volume[mask]``), rather than a volume of ``mask.shape``.

    Never ambiguous: when both readings fit, the mask selects every voxel of
    a 1-D volume and the two are the same array.

    Parameters
    ----------
    data : array_like
        A volume (..., n_volumes) or rows (n_mask, n_volumes).
    mask : array_like of bool or None
        The mask.

    Returns
    -------
    bool
    """
    if mask is None or np.ndim(mask) == 0:
        return False
    mask_shape = np.shape(mask)
    return (
        np.ndim(data) == 2
        and np.shape(data)[:-1] != mask_shape
        and len(data) == int(np.count_nonzero(mask))
    )


def volume_shape(data, mask=None):
    """The voxel shape of the volume ``data`` stands for (see :func:`is_mask_rows`).

    Parameters
    ----------
    data : array_like
        A volume (..., n_volumes) or the mask's rows (n_mask, n_volumes).
    mask : array_like of bool, optional
        The mask.

    Returns
    -------
    tuple of int
    """
    return np.shape(mask) if is_mask_rows(data, mask) else np.shape(data)[:-1]


def check_mask(mask, shape):
    """A boolean mask of ``shape`` (all True when None).

    Parameters
    ----------
    mask : array_like or None
        The mask (booleans, or numbers nonzero inside).
    shape : tuple of int
        The volume's voxel shape.

    Returns
    -------
    ndarray of bool
        The mask, of ``shape``.

    Raises
    ------
    ValueError
        If the mask's shape is not ``shape`` or its values are not a mask's.
    """
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != shape:
        one = " (for one voxel, 1-D data, a single bool)" if shape == () else ""
        raise ValueError(
            f"mask has shape {mask.shape} but data has {shape} voxels; pass a mask "
            f"of shape data.shape[:-1]{one}."
        )
    return check_mask_values(mask)


def masked_rows(data, mask):
    """The voxels to fit of checked ``data`` and their mask.

    Parameters
    ----------
    data : ndarray (n_volumes,), (..., n_volumes) or (n_mask, n_volumes)
        One voxel, a volume, or the mask's voxels only.
    mask : array_like of bool or None
        As the models' ``fit`` take it (a single bool for one voxel).

    Returns
    -------
    rows : ndarray (n, n_volumes)
        The voxels of the mask, in C order (none for one voxel outside it).
    mask : ndarray of bool
        The checked mask (shape ``()`` for one voxel).
    """
    if data.ndim == 1:
        mask = np.asarray(True if mask is None else mask, dtype=bool)
        return (data[None] if mask else data[None][:0]), mask
    mask = check_mask(mask, volume_shape(data, mask))
    return (data if is_mask_rows(data, mask) else data[mask]), mask


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


def take(params, rows):
    """The entries ``rows`` of each parameter (None stays None).

    Parameters
    ----------
    params : dict
        Per parameter an array (or None).
    rows : int, slice or array_like of int
        The entries to take.

    Returns
    -------
    dict
        The same keys, with the entries taken.
    """
    return {k: None if v is None else v[rows] for k, v in params.items()}


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
        The volume, or the voxels of the mask (``volume[mask]``), as the
        models' ``fit`` take them.
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
