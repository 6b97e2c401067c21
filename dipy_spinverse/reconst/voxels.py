"""The label search's per-voxel parameters (:data:`PARAMETERS`) as the rows
of a mask, and the one voxel a :class:`~dipy_spinverse.reconst.SpinverseFit`
of shape ``()`` holds.

A volume fit holds the parameters of the voxels of its mask only, as rows
``(n_mask, ...)`` in C order (``volume[mask]``); the maps of the whole
volume are built from them when asked for. The machinery of the rows (the
mask, indexing, status, maps) is every fit's:
:class:`dipy_spinverse.masked.MaskedFit`.
"""

import numpy as np

from .codes import MASKED, MESH_NOT_REFINED

__all__ = [
    "PARAMETERS",
    "OPTIONAL_PARAMETERS",
    "MESH_PARAMETERS",
    "mask_params",
    "masked_voxel",
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
