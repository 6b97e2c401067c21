"""Smooth mesh refinement of a volume fit's voxels (``refine_mesh=True``):
each fitted voxel's largest cell refined into a smooth mesh fitted to its
signal, with the same noise as the fit (the voxel's
:class:`~dipy_spinverse.inverse.noise.Noise` from the gate). A refinement that fails
flags the voxel's mesh, never its fit."""

import warnings
from dataclasses import replace

import numpy as np

from ..meshfit.refine import refine_cell
from .codes import MESH_FAILED, MESH_NO_CELL, MESH_OK

__all__ = ["refine_meshes"]


def refine_meshes(settings, signals, noise, result, rows):
    """Smooth meshes of the largest cell of ``rows`` (``refine_mesh=True``).

    Fills ``result``'s mesh parameters in place. A voxel without a labelled
    cell gets ``MESH_NO_CELL``; a refinement that raises gets
    ``MESH_FAILED`` and a warning, and the voxel's fit is kept.

    Parameters
    ----------
    settings : SearchSettings
        The fit's settings (grid, protocol, diffusivity, mesh options).
    signals : VoxelSignals
        The voxels, normalised by the gate.
    noise : Noise
        Their noise (:attr:`~dipy_spinverse.reconst.gate.Admitted.noise`):
        the fit's level and each voxel's precisions in its units.
    result : dict of ndarray
        The per-voxel parameters (updated in place).
    rows : ndarray of int
        The fitted voxels to refine.

    Returns
    -------
    None
    """
    for row in rows:
        labels = result["labels"][row]
        if labels.max(initial=0) < 1:
            result["mesh_status"][row] = MESH_NO_CELL
            continue
        try:
            fit = refine_cell(
                settings.grid,
                labels,
                result["permeability"][row],
                replace(signals[[row]], precision=noise.precision[[row]]),
                settings.protocol,
                diffusivity=settings.diffusivity,
                sigma=noise.level,
                noise=settings.config.loss.noise,
                options=settings.mesh_options,
            )
            vertices, loss = fit.vertices, float(np.min(fit.loss_history))
            if not np.all(np.isfinite(vertices)) or fit.n_inverted:
                raise ValueError("the fitted mesh is not a valid mesh")
        except Exception as err:  # one mesh must never stop the volume
            warnings.warn(
                f"smooth mesh refinement of a voxel failed ({type(err).__name__}: "
                f"{err}); its mesh status is {MESH_FAILED} (MESH_FAILED), its "
                "Spinverse fit is kept.",
                RuntimeWarning,
                stacklevel=2,
            )
            result["mesh_status"][row] = MESH_FAILED
            continue
        result["mesh_vertices"][row] = vertices
        result["mesh_loss"][row] = loss
        result["mesh_status"][row] = MESH_OK
