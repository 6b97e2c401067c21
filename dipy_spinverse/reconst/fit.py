"""The result of a label search's fit: :class:`SpinverseFit`, a thin view
over its per-voxel parameters.

One class serves one voxel and any volume shape, as DIPY's fits do: it
holds a dict of per-voxel parameter arrays (:data:`.voxels.PARAMETERS`) and
each map is a property that reads them. The volume machinery (shape, mask,
indexing, status, the maps spread from the rows) is every fit's
(:class:`~dipy_spinverse.masked.MaskedFit`); what is derived from the
parameters is computed by functions of their own modules: the maps
(:mod:`.fit_metrics`), the meshes (:mod:`.fit_meshes`); the status codes are
:mod:`.codes`'. For a single voxel ``fit.shape`` is ``()`` and the scalar
maps are Python numbers.
"""

from functools import cached_property

import numpy as np

from ..checks import check_s0
from ..masked import MaskedFit, scalar, spread, take
from ..meshfit.mesh import TetMesh, boundary_triangles
from . import codes, fit_meshes, fit_metrics, voxels
from .fit_prediction import PREDICTION_PARAMETERS, predict_rows

__all__ = ["SpinverseFit"]


class SpinverseFit(MaskedFit):
    """Spinverse fit of one voxel or a volume.

    Index a volume fit like an array (:meth:`__getitem__`): a voxel
    outside the mask gives a fit of status ``MASKED`` that reads as the
    volume's maps there (scalar maps 0, ``permeability`` NaN, labels 0, no
    interface mesh, a prediction of 0). A volume fit holds the parameters of
    the voxels in its mask only, so its memory grows with the mask; the
    arrays of the whole volume are built when asked for.

    Parameters
    ----------
    model : SpinverseSearchModel
    params : dict of ndarray
        Per-voxel arrays (:data:`.voxels.PARAMETERS`): ``permeability``
        (n_faces,), ``labels`` (n_cells,) or None, ``predicted``
        (n_volumes,) b0-normalised signal, ``S0``, ``S0_sequences``
        (n_sequences,), ``loss``, ``status`` (:data:`.codes.STATUS_CODES`).
        Of the whole volume, ``mask.shape + (...)``, or of the mask's
        voxels, ``(n_mask, ...)`` in C order (``data[mask]``), which a
        volume fit keeps (:attr:`params`). A fit of one voxel holds that
        voxel's own values (no row axis).
    mask : array_like of bool, optional
        Voxels of the fit (default: all).
    history : dict, optional
        The inversion's loss curves (single-voxel fits).
    fingerprint : str, optional
        Checksum of the fitted data, so that a partial fit resumes on them.
    saved_device : str, optional
        The device a fit loaded from a file was saved with
        (:func:`dipy_spinverse.io.load_fit`), which may differ from
        ``model.device``.
    noise_level : float, optional
        The relative noise (1/SNR) the fit's losses are measured in
        (:func:`~dipy_spinverse.reconst.runner.fit_noise`; 0: unknown), kept
        as :attr:`noise_level`; :attr:`residual` is about it where the model
        explains the data. None: not recorded (a file saved before it was).

    Notes
    -----
    Scalar maps are 0 outside the mask (as DIPY's maps) and NaN inside it
    where the voxel has no outputs (status not in :data:`.codes.FITTED`).
    """

    status_codes = codes.STATUS_CODES
    fitted_codes = codes.FITTED
    # What a part (fit[index]) does not inherit from its volume.
    history = fingerprint = saved_device = None
    #: The relative noise level the fit's losses and :attr:`residual` are
    #: measured in (0: unknown; None: not recorded); a part keeps its
    #: volume's.
    noise_level = None

    def __init__(
        self,
        model,
        params,
        mask=None,
        *,
        history=None,
        fingerprint=None,
        saved_device=None,
        noise_level=None,
    ):
        MaskedFit.__init__(self, model, *voxels.mask_params(params, mask))
        self.history = history
        self.fingerprint = fingerprint
        self.saved_device = saved_device
        self.noise_level = None if noise_level is None else float(noise_level)

    def _from_rows(self, params, mask):
        part = MaskedFit._from_rows(self, params, mask)
        part.noise_level = self.noise_level  # one level for the whole fit
        return part

    # -- one voxel's own values, the rows of a volume's mask --------------------------
    def _rows(self, name):
        """``params[name]`` of the voxels in the mask, (n_mask, ...): a fit of
        one voxel holds the voxel's own values, a row of them."""
        values = self.params[name]
        if values is None or self.shape != ():
            return values
        return values[None] if self.mask else values[None][:0]

    def _voxel_part(self, rows, inside):
        # One voxel's own values, or a masked voxel's (read as 0 maps).
        params = take(rows, 0) if inside else voxels.masked_voxel(rows)
        return self._from_rows(params, np.bool_(inside))

    def _array(self, name, fill):
        """A per-voxel array parameter as the volume's (one voxel: its own)."""
        if self.shape == () or self.params[name] is None:
            return self.params[name]
        return spread(self.params[name], self.mask, fill)

    def _per_voxel(self, name):
        """An array parameter, NaN where not fitted (and outside the mask)."""
        rows = self._rows(name)
        if rows is None:
            return None
        return self._volume(np.where(self._fitted_rows[:, None], rows, np.nan), np.nan)

    @property
    def _barrier_rows(self):
        return fit_metrics.barrier(
            self._rows("permeability"), self.model.config.face.threshold
        )

    # -- per-voxel parameters ------------------------------------------------------
    @property
    def n_pending(self):
        """Voxels of the mask still to fit (a partial fit to resume)."""
        return int(np.sum(self._rows("status") == codes.PENDING))

    @property
    def permeability(self):
        """Per-face permeability (..., n_faces), m/s; NaN where not fitted."""
        return self._array("permeability", np.nan)

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
            return fit_metrics.barrier(
                self.params["permeability"], self.model.config.face.threshold
            )
        return spread(self._barrier_rows, self.mask, False)

    @property
    def labels(self):
        """Cell labels (..., n_cells): 0 outside, ``k`` in cell ``k``; 0
        outside the mask, -1 where not fitted; None without labels."""
        labels = self.params["labels"]
        if labels is None or self.shape != ():
            return self._array("labels", 0)
        # A voxel outside the mask is all 0, as in a volume.
        return labels if self.mask else np.zeros_like(labels)

    @property
    def n_cells(self):
        """Cells per voxel (labels 1 .. n): 0 outside the mask, -1 where not
        fitted (as :attr:`labels`); None without labels."""
        labels = self._rows("labels")
        if labels is None:
            return None
        counts = np.max(labels, axis=-1, initial=0).astype(np.int64)
        return scalar(self._volume(np.where(self._fitted_rows, counts, -1), 0))

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
        return fit_metrics.cell_tables(
            self.model.grid,
            self._rows("labels"),
            self._rows("permeability"),
            self._fitted_rows,
        )

    def _cell_table(self, name):
        if self._rows("labels") is None:
            return None
        # A masked voxel has no cells: an empty table, (0,) as a fitted
        # voxel's is (k,).
        return self._volume(self._cell_tables[name], np.nan, np.zeros(0))

    @property
    def inside_probability(self):
        """Probability that each grid cell is inside a cell (..., n_cells):
        over the labellings the label search scored within the noise of its
        answer (and its bootstrap replicates'); None without the search."""
        return self._per_voxel("inside_probability")

    @property
    def uncertainty(self):
        """Expected ``1 - IoU`` of the labellings within the noise (map).

        0: the data allow no other surface; near 1: the surface is a guess.
        A lower bound from the labellings near the answer
        (:meth:`~dipy_spinverse.inverse.uncertainty.Recorder.ambiguity`),
        raised by wild-bootstrap replicates (``search_bootstrap``) and the
        surface check (``prior=``); 1 where the data reject the answer or
        without ``sigma`` (:mod:`.surfaces`). From
        :data:`.codes.UNCERTAIN_SURFACE_LEVEL` a fitted voxel has status
        ``UNCERTAIN_SURFACE``. None without the label search.
        """
        if self.params["uncertainty"] is None:
            return None
        return self._map(self._rows("uncertainty"))

    @property
    def proposal_probability(self):
        """The learned proposal's occupancy (..., n_cells); None without one."""
        return self._per_voxel("proposal_probability")

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
        """RMS of the misfit the fit minimised, ``sqrt(loss / loss_scale)``:
        of the b0-normalised signal, each sequence weighted by its noise
        precision (:func:`dipy_spinverse.sim.signals.noise_precision`) when
        the noise is known; about :attr:`noise_level` where the model
        explains the data.
        """
        scale = self.model.config.loss.loss_scale
        return self._map(np.sqrt(self._rows("loss") / scale))

    # -- derived maps (fit_metrics) ------------------------------------------------
    @property
    def surface_to_volume(self):
        """Barrier area per box volume, 1/um."""
        grid = self.model.grid
        return self._map(fit_metrics.surface_to_volume(grid, self._barrier_rows))

    @property
    def membrane_permeability(self):
        """Mean permeability over the barrier faces, m/s (NaN without any)."""
        kappa = self._rows("permeability")
        return self._map(fit_metrics.membrane_permeability(kappa, self._barrier_rows))

    @cached_property
    def _compartments(self):
        return fit_metrics.compartments(
            self.model.grid,
            self._rows("permeability"),
            self._rows("labels"),
            self._fitted_rows,
            self.model.config.face.threshold,
        )

    @property
    def restricted_fraction(self):
        """Volume fraction of the cells enclosed by barriers (or labelled)."""
        return self._map(self._compartments[:, 0])

    @property
    def n_compartments(self):
        """Enclosed compartments: :attr:`n_cells` with labels, otherwise the
        regions the barriers close off (:func:`.fit_metrics.compartments`)."""
        return self._map(self._compartments[:, 1])

    # -- meshes (fit_meshes) -------------------------------------------------------
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
        return fit_meshes.interface_mesh(self.model.grid, self.barrier, self.labels)

    @property
    def mesh_status(self):
        """Status of each voxel's smooth mesh
        (:data:`~dipy_spinverse.reconst.codes.MESH_STATUS_CODES`);
        ``MESH_NOT_REFINED`` outside the mask; None without ``refine_mesh``."""
        status = self._rows("mesh_status")
        if status is None:
            return None
        return scalar(self._volume(status, codes.MESH_NOT_REFINED))

    @property
    def _mesh_rows(self):
        """Rows (voxels of the mask) with a refined mesh."""
        status = self._rows("mesh_status")
        if status is None:
            return np.zeros(len(self._rows("status")), bool)
        return status == codes.MESH_OK

    @property
    def mesh_vertices(self):
        """Smooth mesh vertices (..., V, 3), um in the voxel's box; NaN where
        not refined; None without ``refine_mesh``. Tetrahedra:
        ``model.mesh_tets``; surface triangles: :attr:`mesh_faces`."""
        return self._array("mesh_vertices", np.nan)

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
        vertices, tets = self.params["mesh_vertices"], self.model.mesh_tets
        if vertices is None:
            return None
        if self.shape == ():
            refined = self.mask and self._mesh_rows[0]
            return TetMesh(vertices, tets) if refined else None
        rows = self._rank.reshape(self.shape)
        return fit_meshes.smooth_meshes(
            vertices, tets, self._mesh_rows, self.shape, rows
        )

    @cached_property
    def _mesh_measures(self):
        return fit_meshes.mesh_measures(
            self._rows("mesh_vertices"),
            self.model.mesh_tets,
            self.mesh_faces,
            self._mesh_rows,
            self.model.mesh_options["template"],
        )

    def _mesh_map(self, column):
        """Column ``column`` of the mesh measures (volume, area, radius,
        area / volume) as a map: 0 outside, NaN where not refined."""
        if self.params["mesh_status"] is None:
            return None
        return scalar(self._volume(self._mesh_measures[:, column], 0.0))

    @property
    def mesh_volume(self):
        """Volume of the smooth cell mesh (um^3): NaN where not refined."""
        return self._mesh_map(0)

    @property
    def mesh_surface_to_volume(self):
        """Membrane area over the smooth cell's own volume (1/um); not
        :attr:`surface_to_volume` (barrier area per box volume)."""
        return self._mesh_map(3)

    @property
    def mesh_radius(self):
        """Radius of the smooth cell (um): of the ball of the same volume
        (``template="ball"``), or the mean distance of the side from the
        principal axis (``"tube"``)."""
        return self._mesh_map(2)

    # -- prediction (fit_prediction) ---------------------------------------------------
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
            not in :data:`~dipy_spinverse.reconst.codes.FITTED`).
            :meth:`predict_mask` gives the voxels of the mask alone.
        """
        rows = self.predict_mask(gtab, S0=S0)
        return self._volume(rows, 0.0)

    def predict_mask(self, gtab=None, *, S0=None, dtype=np.float64):
        """Predicted signal of the voxels of the mask, ``(n_mask, n_volumes)``
        in C order (``volume[mask]``): as :meth:`predict`, in memory that
        grows with the mask. ``dtype``: of the result (float32 halves it for
        writing images); NaN where the voxel has no outputs."""
        if S0 is not None and self._fitted_rows.any():
            # A broadcast view of the volume: only the mask's rows are read.
            S0 = check_s0(S0, self.shape, where=self.fitted)[self.mask]
        rows = {k: self._rows(k) for k in PREDICTION_PARAMETERS}
        return predict_rows(self.model, rows, self._fitted_rows, gtab, S0, dtype)

    def _repr_items(self):
        if self.shape != ():
            return []
        return [f"barrier_faces={int(self.barrier.sum())}", f"loss={self.loss:.3g}"]
