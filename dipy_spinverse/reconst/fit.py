"""The result of a Spinverse fit: :class:`SpinverseFit` and the voxel statuses.

One class serves one voxel and any volume shape, as DIPY's fits do: it holds
a dict of per-voxel parameter arrays of shape ``fit.shape + (...)`` and
derives every map from them. For a single voxel ``fit.shape`` is ``()`` and
the scalar maps are Python numbers.

===========  ====  ==========================================================
name         code  meaning
===========  ====  ==========================================================
OK           0     fitted
NONFINITE    1     the voxel's data contain NaN or inf, or overflow (in the
                   model's dtype) once divided by their b = 0 signal
BAD_B0       2     the mean b = 0 signal (of some sequence) is <= 0
FAILED       3     the inversion raised an error for this voxel
DIVERGED     4     the fit returned non-finite permeabilities or signals
POOR_FIT     5     fitted, but the residual is far above the noise ``sigma``
                   (:data:`POOR_FIT_FALSE_ALARM`): the data are not what the
                   model can produce. A warning: the voxel keeps its outputs
                   and every map is filled
UNCERTAIN_   7     fitted, but the surface is not determined:
SURFACE            ``uncertainty`` (expected 1 - IoU of the answer's cells
                   against the truth's) is at least
                   :data:`UNCERTAIN_SURFACE_LEVEL`; it is 1 where the answer
                   misfits the data beyond the noise or ``sigma`` is not
                   given (``reconst.surfaces.vouch_for_surfaces``). A warning:
                   the voxel keeps its outputs; the workflow writes its
                   barriers apart from the trusted ones
IMPOSSIBLE_  8     fitted, but the attenuation of some sequence is above 1
SIGNAL             beyond the noise, with or without ``sigma``
                   (:func:`~dipy_spinverse.reconst.plausibility.impossible_signal`,
                   at :data:`POOR_FIT_FALSE_ALARM`): no tissue produces it
                   (mislabelled b = 0 volumes, volumes out of order, ...).
                   A warning: the voxel keeps its outputs, which fit data
                   that no membranes made
UNDER-       9     fitted, but the protocol cannot determine the membranes
DETERMINED         (``fit_method="search"``): its diffusion-weighted
                   directions do not span 3-D, or it has one diffusion time
                   (:func:`~dipy_spinverse.reconst.plausibility.protocol_problems`).
                   Every fitted voxel of such a protocol has it; a warning:
                   the voxel keeps its outputs, one of many answers the data
                   allow
PENDING      -1    inside the mask but not fitted yet (partial fits)
MASKED       -2    outside the mask
===========  ====  ==========================================================

A voxel has one status; where several apply, the first of this order wins:
``NONFINITE`` and ``BAD_B0`` (the voxel is not fitted), ``FAILED`` and
``DIVERGED`` (no outputs), ``IMPOSSIBLE_SIGNAL`` (the data, not the fit, are
wrong: a misfit or an uncertain surface follows from it),
``UNDERDETERMINED`` (the protocol, whatever the voxel: a misfit or a surface
test means little where many answers fit), ``POOR_FIT``,
``UNCERTAIN_SURFACE``, ``OK``. The statuses with outputs come after those
without, so that a status always says whether the voxel has outputs.

The voxels with outputs (:attr:`SpinverseFit.fitted`) are those with status
``OK``, ``POOR_FIT``, ``UNCERTAIN_SURFACE``, ``IMPOSSIBLE_SIGNAL`` or
``UNDERDETERMINED`` (:data:`FITTED`); maps, meshes and predictions are NaN or
None for the others inside the mask.

With ``SpinverseModel(..., refine_mesh=True)`` each fitted voxel's largest
cell is also refined into a smooth mesh
(:func:`dipy_spinverse.meshfit.refine_cell`), with its own status
(:data:`MESH_STATUS_CODES`): a refinement that fails flags the voxel's mesh,
never the voxel's fit.
"""

from functools import cached_property

import numpy as np
from dipy.reconst.base import ReconstFit

from ..checks import check_s0
from ..geometry.topology import barrier_mesh, barrier_regions, cell_table
from ..meshfit.fit import axis_radius
from ..meshfit.mesh import TetMesh, boundary_triangles, signed_volumes, triangle_areas

__all__ = [
    "SpinverseFit",
    "STATUS_CODES",
    "OK",
    "NONFINITE",
    "BAD_B0",
    "FAILED",
    "DIVERGED",
    "POOR_FIT",
    "UNCERTAIN_SURFACE",
    "UNCERTAIN_SURFACE_LEVEL",
    "IMPOSSIBLE_SIGNAL",
    "UNDERDETERMINED",
    "POOR_FIT_FALSE_ALARM",
    "PENDING",
    "MASKED",
    "FITTED",
    "FLAGGED",
    "PARAMETERS",
    "OPTIONAL_PARAMETERS",
    "MESH_PARAMETERS",
    "MESH_STATUS_CODES",
    "MESH_OK",
    "MESH_NO_CELL",
    "MESH_FAILED",
    "MESH_NOT_REFINED",
]

OK, NONFINITE, BAD_B0, FAILED, DIVERGED, POOR_FIT = 0, 1, 2, 3, 4, 5
# 6 is the posterior's OUT_OF_PRIOR (reconst.posterior): one code, one meaning.
UNCERTAIN_SURFACE, IMPOSSIBLE_SIGNAL, UNDERDETERMINED = 7, 8, 9
PENDING, MASKED = -1, -2

#: Statuses of the voxels that have outputs (maps, meshes, predictions).
FITTED = (OK, POOR_FIT, UNCERTAIN_SURFACE, IMPOSSIBLE_SIGNAL, UNDERDETERMINED)

#: The warning statuses: fitted, outputs kept, but not to be trusted (the
#: model does not explain the data, the surface is not determined, the data
#: are impossible, or the protocol cannot determine the membranes). Their
#: barriers are written apart from the trusted ones.
FLAGGED = tuple(code for code in FITTED if code != OK)

#: False-alarm rate of the ``POOR_FIT`` status, and of ``IMPOSSIBLE_SIGNAL``'s
#: test. Where the model explains a voxel, its n b0-normalised acquisitions
#: differ from the fit by noise of standard deviation sigma, so
#: n * mse / sigma^2 (mse: the mean squared misfit, ``loss / loss_scale``)
#: follows a chi-square distribution with at most n degrees of freedom
#: (fewer, as the fit absorbs part of the noise; the Rician magnitude varies
#: less than sigma): the chi-square(n) quantile at this rate flags one voxel
#: in a million that the model does explain. A fit above it is not noise
#: around a signal the model can produce.
POOR_FIT_FALSE_ALARM = 1e-6

#: A surface whose ``uncertainty`` (expected 1 - IoU) reaches this is not
#: trusted (status ``UNCERTAIN_SURFACE``): below it, the targets of issue 46
#: ask that nine in ten answers overlap the truth by IoU 0.8 or more.
UNCERTAIN_SURFACE_LEVEL = 0.1

#: Per-voxel status codes of a fit and their meaning.
STATUS_CODES = {
    OK: "ok",
    NONFINITE: "data contain NaN or inf, or overflow once b0-normalised",
    BAD_B0: "mean b=0 signal <= 0",
    FAILED: "the inversion raised an error",
    DIVERGED: "the fit returned non-finite values",
    POOR_FIT: "residual far above the noise",
    UNCERTAIN_SURFACE: (
        "surface not determined by the data (uncertainty >= 0.1, 1 where the "
        "answer misfits beyond the noise)"
    ),
    IMPOSSIBLE_SIGNAL: "attenuation above 1 beyond the noise: no tissue produces it",
    UNDERDETERMINED: (
        "the protocol cannot determine the membranes: diffusion-weighted "
        "directions not spanning 3-D, or one diffusion time"
    ),
    PENDING: "not fitted yet",
    MASKED: "outside the mask",
}

#: Statuses of a voxel's smooth mesh (``refine_mesh=True``).
MESH_OK, MESH_NO_CELL, MESH_FAILED, MESH_NOT_REFINED = 0, 1, 2, -1

#: Meaning of the smooth mesh's status codes.
MESH_STATUS_CODES = {
    MESH_OK: "refined",
    MESH_NO_CELL: "no labelled cell to refine",
    MESH_FAILED: "the mesh refinement raised an error",
    MESH_NOT_REFINED: "not refined (the voxel has no outputs)",
}

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

#: The per-cell columns of :func:`~dipy_spinverse.geometry.topology.cell_table`.
CELL_COLUMNS = ("volume", "surface_area", "permeability")

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


def index_volume_fit(fit, index):
    """``fit[index]`` for the volume fits of both methods: ``fit._part``
    with the checks a user of DIPY's fits expects.

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


class SpinverseFit(ReconstFit):
    """Spinverse fit of one voxel or a volume.

    Index a volume fit like an array: an index of one voxel gives that
    voxel's fit (of status ``MASKED`` outside the mask: :meth:`__getitem__`),
    any other index a smaller volume fit.

    A volume fit holds the parameters of the voxels in its mask only, so its
    memory grows with the mask, not with the volume; the maps and arrays of
    the whole volume (``permeability``, ``labels``, ``status``, ...) are
    built when asked for.

    Parameters
    ----------
    model : SpinverseModel
    params : dict of ndarray
        Per-voxel arrays: ``permeability`` (n_faces,), ``labels``
        (n_cells,) or None, ``predicted`` (n_volumes,) b0-normalised signal,
        ``S0``, ``S0_sequences`` (n_sequences,), ``loss``, ``status`` (see
        :data:`STATUS_CODES`). Either of the whole volume, shape
        ``mask.shape + (...)``, or of the voxels in the mask only, shape
        ``(n_mask, ...)`` in C order (``data[mask]``); a volume fit keeps
        the latter (:attr:`params`).
    mask : array_like of bool, optional
        Voxels of the fit (default: all).
    history : dict, optional
        The inversion's loss curves (single-voxel fits).
    fingerprint : str, optional
        Checksum of the fitted data, to check that a partial fit is resumed
        on the same data.
    saved_device : str, optional
        The device a fit loaded from a file was saved with
        (:func:`dipy_spinverse.io.load_fit`), which may differ from
        ``model.device`` (a ``cuda`` fit inspected on a machine without
        CUDA).

    Attributes
    ----------
    params : dict of ndarray
        One voxel: its arrays. A volume: the arrays of the voxels in the
        mask, ``(n_mask, ...)`` in C order.

    Notes
    -----
    Scalar maps are 0 outside the mask (as DIPY's maps) and NaN inside it
    where the voxel has no outputs (status other than ``OK`` or
    ``POOR_FIT``; a ``POOR_FIT`` voxel keeps its maps).
    """

    def __init__(
        self,
        model,
        params,
        mask=None,
        *,
        history=None,
        fingerprint=None,
        saved_device=None,
    ):
        self.model = model
        params = {
            k: None if params.get(k) is None else np.asarray(params[k])
            for k in PARAMETERS
        }
        status_shape = params["status"].shape
        mask = np.ones(status_shape, bool) if mask is None else np.asarray(mask, bool)
        self.mask = mask
        n_mask = int(mask.sum())
        if mask.ndim == 0 or status_shape == (n_mask,):
            pass  # one voxel, or the voxels of the mask: kept as they are
        elif status_shape == mask.shape:
            # Parameters of the whole volume: keep the voxels of the mask.
            params = {k: None if v is None else v[mask] for k, v in params.items()}
        else:
            raise ValueError(
                f"params['status'] has shape {status_shape}; a fit with a mask of "
                f"shape {mask.shape} needs {mask.shape} (the whole volume) or "
                f"({n_mask},) (the voxels in the mask)."
            )
        self.params = params
        self.history = history
        self.fingerprint = fingerprint
        self.saved_device = saved_device

    # -- the voxels of the mask and the whole volume -----------------------------
    def _rows(self, name):
        """``params[name]`` of the voxels in the mask, (n_mask, ...)."""
        values = self.params[name]
        if values is None or self.shape != ():
            return values
        return values[None] if self.mask else values[None][:0]

    def _volume(self, rows, fill):
        """Per-voxel ``rows`` (n_mask, ...) spread over the volume, ``fill`` out."""
        rows = np.asarray(rows)
        out = np.full(self.shape + rows.shape[1:], fill, dtype=rows.dtype)
        out[self.mask] = rows
        return out

    @cached_property
    def _rank(self):
        """Row of each voxel of the volume in :attr:`params` (-1 outside)."""
        return mask_rows(self.mask)

    @property
    def _fitted_rows(self):
        return np.isin(self._rows("status"), FITTED)

    # -- per-voxel parameters ------------------------------------------------------
    @property
    def shape(self):
        """Shape of the fitted volume, ``()`` for one voxel."""
        return self.mask.shape

    @property
    def status(self):
        """Status map (0 = ok; see :data:`STATUS_CODES`)."""
        if self.shape == ():
            return _scalar(self.params["status"])
        return self._volume(self.params["status"], MASKED)

    @property
    def ok(self):
        """Voxels fitted without problems (status ``OK``)."""
        return np.asarray(self.status) == OK

    @property
    def fitted(self):
        """Voxels with outputs: status ``OK``, ``POOR_FIT`` or
        ``UNCERTAIN_SURFACE`` (:data:`FITTED`)."""
        return np.isin(np.asarray(self.status), FITTED)

    @property
    def n_pending(self):
        """Voxels of the mask still to fit (a partial fit to resume)."""
        return int(np.sum(self._rows("status") == PENDING))

    @property
    def permeability(self):
        """Per-face permeability (..., n_faces), m/s; NaN where not fitted."""
        if self.shape == ():
            return self.params["permeability"]
        return self._volume(self.params["permeability"], np.nan)

    @property
    def model_params(self):
        """The fitted parameters, as DIPY's fits name them: the per-face
        permeability (..., n_faces), m/s, that
        :meth:`SpinverseModel.predict` takes back. A volume of them; the
        voxels of the mask alone are ``fit.params["permeability"]``."""
        return self.permeability

    @property
    def barrier(self):
        """Faces below the barrier threshold (..., n_faces): the membranes."""
        if self.shape == ():
            return self._barrier_of(self.params["permeability"])
        return self._volume(self._barrier_of(self.params["permeability"]), False)

    def _barrier_of(self, permeability):
        with np.errstate(invalid="ignore"):
            permeability = np.nan_to_num(permeability, nan=np.inf)
            return permeability < self.model.config.face.threshold

    @property
    def labels(self):
        """Cell labels (..., n_cells): 0 outside, ``k`` in cell ``k``; all 0
        outside the mask and -1 where the voxel was not fitted (as
        :attr:`n_cells`).

        Kept whenever the inversion produces labels (the label search, or the
        cell parametrisation); None otherwise.
        """
        labels = self.params["labels"]
        if labels is None:
            return None
        if self.shape == ():  # a voxel outside the mask is all 0, as in a volume
            return labels if self.mask else np.zeros_like(labels)
        return self._volume(labels, 0)

    @property
    def n_cells(self):
        """Number of cells per voxel (labels 1 .. n): an integer map, 0 outside
        the mask and -1 where the voxel was not fitted (as :attr:`labels`;
        :attr:`status` says why); None without labels."""
        labels = self._rows("labels")
        if labels is None:
            return None
        counts = np.max(labels, axis=-1, initial=0).astype(np.int64)
        counts = np.where(self._fitted_rows, counts, -1)
        if self.shape == ():
            return int(counts[0]) if self.mask else 0
        return self._volume(counts, 0)

    @property
    def cell_volumes(self):
        """Volume of each cell (..., max cells), um^3; NaN past a voxel's cells.

        None without labels. See :func:`~dipy_spinverse.geometry.topology.cell_table`.
        """
        return self._cell_table("volume")

    @property
    def cell_surface_areas(self):
        """Membrane area of each cell (..., max cells), um^2; NaN padded."""
        return self._cell_table("surface_area")

    @property
    def cell_permeability(self):
        """Membrane permeability of each cell (..., max cells), m/s; NaN padded."""
        return self._cell_table("permeability")

    @cached_property
    def _cell_tables(self):
        """Per-voxel :func:`cell_table` rows, (n_mask, max cells) per column."""
        labels, kappa = self._rows("labels"), self._rows("permeability")
        fitted = self._fitted_rows
        n = int(np.max(labels[fitted], initial=0)) if fitted.any() else 0
        out = {k: np.full((len(labels), n), np.nan) for k in CELL_COLUMNS}
        for row in np.flatnonzero(fitted):
            table = cell_table(self.model.grid, labels[row], kappa[row])
            for name, values in table.items():
                out[name][row, : len(values)] = values
        return out

    def _cell_table(self, name):
        if self._rows("labels") is None:
            return None
        rows = self._cell_tables[name]
        if self.shape == ():
            # A masked voxel has no cells: an empty table, (0,) as a fitted
            # voxel's is (k,).
            return rows[0] if self.mask else np.zeros(0)
        return self._volume(rows, np.nan)

    @property
    def inside_probability(self):
        """Probability that each grid cell is inside a cell (..., n_cells).

        Over the labellings the label search scored within the noise of its
        result (likelihood weights), averaged with the same for each
        wild-bootstrap replicate when ``search_bootstrap > 0``; None without
        the label search.
        """
        return self._per_voxel("inside_probability")

    @property
    def uncertainty(self):
        """Expected ``1 - IoU`` of the labellings within the noise (map).

        0: the data allow no other surface; near 1: the surface is a guess.
        Alone it weighs the labellings near the answer by their likelihood,
        and is at least half the largest ``1 - IoU`` between the answer and
        any of them (:meth:`~dipy_spinverse.inverse.uncertainty.Recorder.ambiguity`):
        a lower bound, blind to surfaces the search never visited. It is 1
        where the answer misfits the data beyond the noise (chi-square above
        its 95 % quantile,
        :func:`~dipy_spinverse.reconst.surfaces.vouch_for_surfaces`) and,
        without ``sigma``, everywhere. With ``search_bootstrap=k`` it is at
        least the mean ``1 - IoU`` of the answers of k wild-bootstrap
        replicates of the search
        (:func:`~dipy_spinverse.inverse.bootstrap.bootstrap_search`), which
        also sees answers in other basins. With a surface check
        (``SpinverseModel(..., fit_method="search", prior=...)``) it is at
        least the posterior's bound from the restricted volume
        (:func:`~dipy_spinverse.reconst.posterior.volume_iou_bound`), and 1
        where the signal lies outside that prior. At
        :data:`UNCERTAIN_SURFACE_LEVEL` or more a fitted voxel has status
        ``UNCERTAIN_SURFACE``. None without the label search.
        """
        if self.params["uncertainty"] is None:
            return None
        return self._map(self._rows("uncertainty"))

    @property
    def proposal_probability(self):
        """The learned proposal's occupancy (..., n_cells); None without one."""
        return self._per_voxel("proposal_probability")

    def _per_voxel(self, name):
        rows = self._rows(name)
        if rows is None:
            return None
        rows = np.where(self._fitted_rows[:, None], rows, np.nan)
        if self.shape == ():
            # A masked voxel: NaN, as a masked voxel of a volume.
            return rows[0] if len(rows) else np.full(rows.shape[1:], np.nan, rows.dtype)
        return self._volume(rows, np.nan)

    @property
    def S0(self):
        """Fitted S0 map (mean b = 0 signal)."""
        return self._map(self._rows("S0"))

    @property
    def loss(self):
        """Final data loss (:func:`dipy_spinverse.sim.signals.data_loss`)."""
        return self._map(self._rows("loss"))

    @property
    def residual(self):
        """RMS of the misfit the fit minimised, ``sqrt(loss / loss_scale)``.

        The misfit of the b0-normalised signal (each sequence over its own
        b = 0 signal). With ``sigma`` given and echo times that differ, each
        sequence is weighted by its noise precision
        (:func:`dipy_spinverse.sim.signals.noise_precision`), which makes it
        the misfit of the raw signal over the voxel's mean b = 0 signal;
        about ``sigma`` where the model explains the data.
        """
        return self._map(
            np.sqrt(self._rows("loss") / self.model.config.loss.loss_scale)
        )

    # -- derived maps --------------------------------------------------------------
    @property
    def surface_to_volume(self):
        """Barrier area per box volume, 1/um."""
        grid = self.model.grid
        barrier = self._barrier_of(self._rows("permeability"))
        return self._map((barrier @ grid.face_areas) / grid.volume)

    @property
    def membrane_permeability(self):
        """Mean permeability over the barrier faces, m/s (NaN without any)."""
        permeability = self._rows("permeability")
        barrier = self._barrier_of(permeability)
        count = barrier.sum(-1)
        total = np.where(barrier, permeability, 0.0).sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return self._map(np.where(count > 0, total / np.maximum(count, 1), np.nan))

    @cached_property
    def _compartments(self):
        """(restricted fraction, enclosed compartments) per voxel of the mask."""
        permeability = self._rows("permeability")
        labels = self._rows("labels")
        out = np.full((len(permeability), 2), np.nan)
        grid = self.model.grid
        for row in np.flatnonzero(self._fitted_rows):
            if labels is not None:
                # The labels say which side is inside; the regions below
                # guess it (the largest region at the wall is the outside,
                # wrong for a cell larger than its extracellular space).
                inside = labels[row] > 0
                out[row] = (
                    grid.cell_volumes[inside].sum() / grid.volume,
                    labels[row].max(initial=0),
                )
                continue
            barrier = self._barrier_of(permeability[row])
            region, outside = barrier_regions(grid, barrier)
            enclosed = region != outside
            out[row] = (
                grid.cell_volumes[enclosed].sum() / grid.volume,
                len(np.unique(region[enclosed])),
            )
        return out

    @property
    def restricted_fraction(self):
        """Volume fraction of the cells enclosed by barriers (of the labelled
        cells where the fit has labels)."""
        return self._map(self._compartments[:, 0])

    @property
    def n_compartments(self):
        """Number of enclosed compartments (:attr:`n_cells` where the fit has
        labels; otherwise the regions the barriers close off from the
        largest region at the wall, extracellular pockets included)."""
        return self._map(self._compartments[:, 1])

    # -- meshes --------------------------------------------------------------------
    @property
    def interface_mesh(self):
        """The barrier faces as an :class:`InterfaceMesh` (um), wall-capped.

        One voxel: its mesh, or None unless it has outputs (:attr:`fitted`).
        A volume: an object array of the voxels' meshes.
        """
        if self.shape == ():
            return self._mesh
        meshes = np.empty(self.shape, dtype=object)
        for index in zip(*np.nonzero(self.fitted), strict=True):
            meshes[index] = self[index].interface_mesh
        return meshes

    @cached_property
    def _mesh(self):
        if not self.fitted:
            return None
        labels = self.labels
        if labels is not None and np.any(labels < 0):
            labels = None
        return barrier_mesh(self.model.grid, self.barrier, labels=labels, cap_wall=True)

    # -- smooth meshes (refine_mesh=True) ----------------------------------------
    @property
    def mesh_status(self):
        """Status of each voxel's smooth mesh (:data:`MESH_STATUS_CODES`);
        ``MESH_NOT_REFINED`` outside the mask; None without ``refine_mesh``."""
        status = self._rows("mesh_status")
        if status is None:
            return None
        if self.shape == ():
            return _scalar(status[0]) if self.mask else MESH_NOT_REFINED
        return self._volume(status, MESH_NOT_REFINED)

    @property
    def _mesh_rows(self):
        """Rows (voxels of the mask) with a refined mesh."""
        status = self._rows("mesh_status")
        if status is None:
            return np.zeros(len(self._rows("status")), bool)
        return status == MESH_OK

    @property
    def mesh_vertices(self):
        """Smooth mesh vertices (..., V, 3), um in the voxel's box; NaN where
        not refined; None without ``refine_mesh``. Tetrahedra:
        ``model.mesh_tets``; surface triangles: :attr:`mesh_faces`."""
        if self.params["mesh_vertices"] is None:
            return None
        if self.shape == ():
            return self.params["mesh_vertices"]
        return self._volume(self.params["mesh_vertices"], np.nan)

    @property
    def mesh_faces(self):
        """Outward surface triangles (F, 3) of every smooth mesh (shared)."""
        if self.model.mesh_tets is None:
            return None
        return boundary_triangles(self.model.mesh_tets)

    @property
    def smooth_mesh(self):
        """The smooth cell mesh as a :class:`~dipy_spinverse.meshfit.TetMesh`.

        One voxel: its mesh, or None unless refined (``mesh_status`` 0). A
        volume: an object array of them. None without ``refine_mesh``.
        """
        if self.params["mesh_vertices"] is None:
            return None
        if self.shape == ():
            if not (self.mask and self._mesh_rows[0]):
                return None
            return TetMesh(self.params["mesh_vertices"], self.model.mesh_tets)
        meshes = np.empty(self.shape, dtype=object)
        rows = self._rank.reshape(self.shape)
        for index in zip(*np.nonzero(self.mask), strict=True):
            row = rows[index]
            if self._mesh_rows[row]:
                meshes[index] = TetMesh(
                    self.params["mesh_vertices"][row], self.model.mesh_tets
                )
        return meshes

    @cached_property
    def _mesh_measures(self):
        """(volume, area, radius) per voxel of the mask, NaN where not refined."""
        vertices = self._rows("mesh_vertices")
        out = np.full((len(self._rows("status")), 3), np.nan)
        tets, faces = self.model.mesh_tets, self.mesh_faces
        for row in np.flatnonzero(self._mesh_rows):
            v = vertices[row]
            volume = signed_volumes(v, tets).sum()
            if self.model.mesh_options["template"] == "tube":
                radius = axis_radius(TetMesh(v, tets))
            else:
                radius = (3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0)
            out[row] = volume, triangle_areas(v, faces).sum(), radius
        return out

    def _mesh_map(self, column):
        if self.params["mesh_status"] is None:
            return None
        values = self._mesh_measures[:, column]
        if self.shape == ():
            return float(values[0]) if self.mask else 0.0
        return self._volume(values, 0.0)

    @property
    def mesh_volume(self):
        """Volume of the smooth cell mesh (um^3): NaN where not refined."""
        return self._mesh_map(0)

    @property
    def mesh_surface_to_volume(self):
        """Membrane area over the smooth cell's own volume (1/um).

        Not :attr:`surface_to_volume` (barrier area per box volume).
        """
        if self.params["mesh_status"] is None:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = self._mesh_measures[:, 1] / self._mesh_measures[:, 0]
        if self.shape == ():
            return float(ratio[0]) if self.mask else 0.0
        return self._volume(ratio, 0.0)

    @property
    def mesh_radius(self):
        """Radius of the smooth cell (um): of the ball of the same volume
        (``template="ball"``), or the mean distance of the side from the
        principal axis (``"tube"``)."""
        return self._mesh_map(2)

    # -- prediction ----------------------------------------------------------------
    def predict(self, gtab=None, *, S0=None):
        """Predict the signal of every voxel.

        Parameters
        ----------
        gtab : GradientTable or Protocol, optional
            Acquisitions to predict (default: the fitted ones). A gradient
            table needs ``big_delta`` and ``small_delta``. A model with
            ``approximation_error`` adds the grid's mean error for these
            acquisitions, as for the fitted ones (estimated on first use of
            a new table, then cached).
        S0 : float or array_like (shape), optional
            Unweighted signal. Default: each voxel's FITTED S0 -- for
            acquisitions sharing a waveform with a fitted sequence that
            sequence's own b = 0 signal, otherwise the voxel's mean b = 0
            signal (unlike DIPY's ``MultiVoxelFit``, which predicts with
            S0 = 1).

        Returns
        -------
        ndarray (..., n_volumes)
            0 outside the mask, NaN where the voxel has no outputs (status
            not in :data:`FITTED`). :meth:`predict_mask` gives
            the voxels of the mask alone, without the whole volume.
        """
        rows = self.predict_mask(gtab, S0=S0)
        if self.shape == ():
            return rows[0] if self.mask else np.zeros(rows.shape[1:])
        return self._volume(rows, 0.0)

    def predict_mask(self, gtab=None, *, S0=None, dtype=np.float64):
        """Predicted signal of the voxels of the mask, ``(n_mask, n_volumes)``.

        As :meth:`predict`, in the C order of the mask (``volume[mask]``):
        memory grows with the mask, not with the volume.

        Parameters
        ----------
        gtab, S0
            As in :meth:`predict`.
        dtype : data type
            Of the result (float32 halves it for writing images).

        Returns
        -------
        ndarray (n_mask, n_volumes)
            NaN where the voxel has no outputs.
        """
        model = self.model
        protocol = model.protocol if gtab is None else model.protocol_for(gtab)
        fitted = self._fitted_rows
        out = np.full((len(fitted), len(protocol)), np.nan, dtype=dtype)
        if not fitted.any():
            return out
        if gtab is None:
            normalised = self._rows("predicted")[fitted]
        else:
            normalised = model.predict_normalised(
                self._rows("permeability")[fitted], protocol
            )
        if S0 is None:
            scale = model.s0_for(
                protocol, self._rows("S0")[fitted], self._rows("S0_sequences")[fitted]
            )
        else:
            # A broadcast view of the volume: only the mask's rows are read.
            scale = check_s0(S0, self.shape, where=self.fitted)[self.mask]
            scale = scale[fitted][:, None]
        out[fitted] = normalised * scale
        return out

    def voxel_data(self, data, index):
        """The signal of voxel ``index`` in ``data``, the fitted data.

        Parameters
        ----------
        data : ndarray (..., n_volumes) or (n_mask, n_volumes)
            The volume, or the voxels of the mask (``volume[mask]``), as
            :meth:`SpinverseModel.fit` takes them.
        index : tuple of int
            A voxel of the mask.

        Returns
        -------
        ndarray (n_volumes,)
        """
        if np.shape(data)[:-1] == self.shape:
            return np.asarray(data[index])
        row = self._rank[np.ravel_multi_index(_wrapped(index, self.shape), self.shape)]
        if row < 0:
            raise IndexError(f"voxel {index} is outside the fit's mask.")
        return np.asarray(data[row])

    # -- indexing ------------------------------------------------------------------
    def __getitem__(self, index):
        """The fit of one voxel, or of a part of the volume, indexed as numpy.

        Integers naming one voxel, ``fit[i, j, k]`` (negative ones count from
        the end), give that voxel's single-voxel fit. A voxel outside the
        mask gives a fit of status ``MASKED`` that reads as the volume's maps
        there, as ``model.fit(data, mask=False)`` does: scalar maps 0,
        ``permeability`` and ``inside_probability`` NaN, labels 0 and no
        cells, no interface mesh, a prediction of 0. Any other index
        (slices, ``...``, a boolean mask) gives a smaller volume fit.

        Raises
        ------
        IndexError
            For an index outside the fit's shape or with too many entries
            (the message gives the shape), and for any index of a
            single-voxel fit.
        """
        return index_volume_fit(self, index)

    def _part(self, index):
        """:meth:`__getitem__` without its checks."""
        if _is_voxel(index, self.shape):
            row = self._rank[
                np.ravel_multi_index(_wrapped(index, self.shape), self.shape)
            ]
            if row < 0:
                # Not None (DIPY's MultiVoxelFit): ``fit[i, j, k].S0`` reads
                # the volume's map there, and ``status`` says why it is 0.
                return SpinverseFit(self.model, _masked_voxel(self.params), False)
            params = {k: None if v is None else v[row] for k, v in self.params.items()}
            return SpinverseFit(self.model, params, True)
        ids = np.arange(self.mask.size).reshape(self.shape)[index]
        inside = self.mask.reshape(-1)[ids]
        if np.ndim(ids) == 0:
            return self._part(np.unravel_index(int(ids), self.shape))
        rows = self._rank[ids[inside]]
        params = {k: None if v is None else v[rows] for k, v in self.params.items()}
        return SpinverseFit(self.model, params, inside)

    def _map(self, rows):
        """Map of per-voxel ``rows`` (n_mask,): NaN where not fitted, 0 outside."""
        values = np.where(self._fitted_rows, rows, np.nan)
        if self.shape == ():
            return _scalar(values[0]) if self.mask else 0.0
        return self._volume(values.astype(float), 0.0)

    def __repr__(self):
        if self.shape == ():
            return (
                f"SpinverseFit(status={self.status} ({STATUS_CODES[self.status]}), "
                f"barrier_faces={int(self.barrier.sum())}, loss={self.loss:.3g})"
            )
        status = self._rows("status")
        counts = {
            STATUS_CODES[c]: int(np.sum(status == c))
            for c in STATUS_CODES
            if c != MASKED and np.any(status == c)
        }
        return f"SpinverseFit(shape={self.shape}, status={counts})"


def _masked_voxel(params):
    """One voxel's parameters outside the mask, shaped as a row of ``params``
    (the voxels of a mask): status ``MASKED``, the rest as an unfitted
    voxel's (NaN, labels -1, mesh not refined), as ``model.fit(data,
    mask=False)`` holds them; the fit's maps read 0 there."""
    fills = {"status": MASKED, "labels": -1, "mesh_status": MESH_NOT_REFINED}
    return {
        k: None if v is None else np.full(v.shape[1:], fills.get(k, np.nan), v.dtype)
        for k, v in params.items()
    }


def _is_voxel(index, shape):
    """Whether ``index`` names one voxel by integers, e.g. ``(1, 0, 2)``."""
    return (
        isinstance(index, tuple)
        and len(index) == len(shape)
        # bool is an int, but numpy reads fit[True, 0, 0] as a new axis.
        and all(
            isinstance(i, int | np.integer) and not isinstance(i, bool) for i in index
        )
    )


def _wrapped(index, shape):
    """A voxel's integer index with negative entries counted from the end, as
    numpy does; IndexError (numpy's message) outside the volume."""
    for axis, (i, n) in enumerate(zip(index, shape, strict=True)):
        if not -n <= i < n:
            raise IndexError(
                f"index {i} is out of bounds for axis {axis} with size {n}"
            )
    return tuple(int(i) % n for i, n in zip(index, shape, strict=True))


def _scalar(values):
    """0-d arrays as Python numbers (one voxel), other arrays as they are."""
    values = np.asarray(values)
    return values.item() if values.ndim == 0 else values
