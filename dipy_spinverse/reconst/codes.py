"""The status codes of a fitted voxel and of its smooth mesh, in one place.

Every voxel of a fit has one status (:data:`STATUS_CODES`); the codes of the
label search's fits (:class:`~dipy_spinverse.reconst.fit.SpinverseFit`) are
these, and the posterior's (:mod:`~dipy_spinverse.reconst.posterior`) adds
``OUT_OF_PRIOR`` (6).

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

The voxels with outputs
(:attr:`~dipy_spinverse.reconst.fit.SpinverseFit.fitted`) are those with
status ``OK``, ``POOR_FIT``, ``UNCERTAIN_SURFACE``, ``IMPOSSIBLE_SIGNAL`` or
``UNDERDETERMINED`` (:data:`FITTED`); maps, meshes and predictions are NaN
or None for the others inside the mask.

With ``SpinverseModel(..., refine_mesh=True)`` each fitted voxel's largest
cell is also refined into a smooth mesh
(:func:`dipy_spinverse.meshfit.refine_cell`), with its own status
(:data:`MESH_STATUS_CODES`): a refinement that fails flags the voxel's mesh,
never the voxel's fit.
"""

from .. import masked
from ..masked import BAD_B0, COMMON_CODES, DIVERGED, MASKED, NONFINITE, OK

__all__ = [
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
    "MESH_STATUS_CODES",
    "MESH_OK",
    "MESH_NO_CELL",
    "MESH_FAILED",
    "MESH_NOT_REFINED",
    "status_counts",
]

# OK (0), NONFINITE (1), BAD_B0 (2), DIVERGED (4) and MASKED (-2) are every
# fit's (dipy_spinverse.masked); 6 is the posterior's OUT_OF_PRIOR
# (reconst.posterior): one code, one meaning.
FAILED, POOR_FIT = 3, 5
UNCERTAIN_SURFACE, IMPOSSIBLE_SIGNAL, UNDERDETERMINED = 7, 8, 9
PENDING = -1

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
    OK: COMMON_CODES[OK],
    NONFINITE: COMMON_CODES[NONFINITE],
    BAD_B0: COMMON_CODES[BAD_B0],
    FAILED: "the inversion raised an error",
    DIVERGED: COMMON_CODES[DIVERGED],
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
    MASKED: COMMON_CODES[MASKED],
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


def status_counts(status):
    """How many voxels have each status (by its meaning), MASKED left out.

    Parameters
    ----------
    status : array_like of int

    Returns
    -------
    dict
        ``{STATUS_CODES[code]: count}`` of the codes present.
    """
    return masked.status_counts(status, STATUS_CODES)
