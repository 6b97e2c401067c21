"""NIfTI maps of a fit: each written atomically to its own file.

:func:`save_map`, :func:`save_maps`, :func:`save_permeability` and
:func:`save_predicted` write a search fit's images, :func:`save_posterior` a
posterior fit's (each with its unit in the header's ``descrip``), each
atomically (a temporary file beside it, then a rename: an interrupted run
never leaves a half-written image); :func:`describe_status` counts the
status map's codes. Meshes are written by :mod:`dipy_spinverse.io.surfaces`.
"""

import os

import numpy as np

from ..files import save_image, save_voxels
from ..geometry import UNITS, WHITE_MATTER_UNITS
from ..reconst import FITTED, STATUS_CODES

__all__ = [
    "MAPS",
    "SEARCH_MAPS",
    "MESH_MAPS",
    "DESCRIPTOR_UNITS",
    "MAP_UNITS",
    "save_map",
    "save_maps",
    "save_permeability",
    "save_predicted",
    "save_posterior",
    "describe_status",
]

#: Scalar maps of a volume fit and their NIfTI data types.
MAPS = {
    "restricted_fraction": np.float32,
    "surface_to_volume": np.float32,
    "membrane_permeability": np.float32,
    "n_compartments": np.float32,
    "residual": np.float32,
    "status": np.int16,
    "S0": np.float32,
}

#: Maps of the smooth meshes (``refine_mesh=True``): :func:`save_map` writes
#: them too (NaN where a voxel's mesh was not refined).
MESH_MAPS = {
    "mesh_volume": np.float32,
    "mesh_surface_to_volume": np.float32,
    "mesh_radius": np.float32,
}

#: Maps of the label search (preset ``"default"``): written for fits that
#: have them.
SEARCH_MAPS = {"uncertainty": np.float32}

#: What a fit without one of these maps lacks, and how to get it.
_MISSING = {
    **{name: "build the model with refine_mesh=True" for name in MESH_MAPS},
    **{
        name: "it comes from the label search (preset='default', search_steps > 0)"
        for name in SEARCH_MAPS
    },
}


def save_maps(
    fit,
    out_dir,
    *,
    affine=None,
    reference=None,
    names=None,
    prefix="",
    suffix=".nii.gz",
):
    """Write scalar maps of a volume fit as NIfTI images.

    Parameters
    ----------
    fit : SpinverseFit
    out_dir : str or os.PathLike
        Created if needed.
    affine : ndarray (4, 4), optional
        Voxel-to-world affine (default identity).
    reference : nibabel image or Nifti1Header, optional
        The image the data came from, whose space the output keeps
        (:func:`save_image`).
    names : dict or sequence of str, optional
        Maps to write (keys of :data:`MAPS`, and of :data:`SEARCH_MAPS` and
        :data:`MESH_MAPS` for a fit that has them), or ``{map: file name}``.
        Default: every map the fit has, named ``<prefix><map><suffix>``.
    prefix, suffix : str

    Returns
    -------
    dict
        ``{map: path}``.
    """
    if names is None:
        extra = {**SEARCH_MAPS, **MESH_MAPS}
        names = list(MAPS) + [n for n in extra if getattr(fit, n) is not None]
    if not isinstance(names, dict):
        names = {name: f"{prefix}{name}{suffix}" for name in names}
    _check_map_names(names)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, fname in names.items():
        path = os.path.join(os.fspath(out_dir), os.fspath(fname))
        paths[name] = save_map(fit, name, path, affine=affine, reference=reference)
    return paths


def save_map(fit, name, path, *, affine=None, reference=None):
    """Write one scalar map of a volume fit as a NIfTI image, atomically.

    Parameters
    ----------
    fit : SpinverseFit
    name : str
        A key of :data:`MAPS` (``"restricted_fraction"``, ``"S0"``, ...) or,
        for a fit that has them, of :data:`SEARCH_MAPS` (``"uncertainty"``)
        and :data:`MESH_MAPS` (smooth meshes).
    path : str or os.PathLike
        The image (its folder is created if needed).
    affine : ndarray (4, 4), optional
        Voxel-to-world affine (default identity).
    reference : nibabel image or Nifti1Header, optional
        The image the data came from, whose space the output keeps
        (:func:`save_image`).

    Returns
    -------
    str
        The path written.
    """
    _check_map_names([name])
    values = getattr(fit, name)
    if values is None:
        raise ValueError(f"this fit has no {name} map: {_MISSING[name]}.")
    values = np.asarray(values).astype(_MAP_TYPES[name])
    return save_image(
        path, _image(fit, values), affine, reference, description=MAP_UNITS[name]
    )


_MAP_TYPES = {**MAPS, **SEARCH_MAPS, **MESH_MAPS}

#: What each map holds and its unit: the images' ``descrip`` header field.
MAP_UNITS = {
    "restricted_fraction": "restricted fraction (volume in cells / water)",
    "surface_to_volume": "membrane surface / cell volume (1/um)",
    "membrane_permeability": "mean membrane permeability (m/s)",
    "n_compartments": "number of compartments",
    "residual": "RMS misfit / mean b=0 signal",
    "status": "fit status (0 ok; dipy_spinverse.reconst.STATUS_CODES)",
    "S0": "mean b=0 signal (data units)",
    "uncertainty": "expected 1 - IoU of the labellings within the noise",
    "mesh_volume": "smooth mesh volume (um^3)",
    "mesh_surface_to_volume": "smooth mesh surface / volume (1/um)",
    "mesh_radius": "smooth mesh radius (um)",
}


def _check_map_names(names):
    unknown = sorted(set(names) - set(_MAP_TYPES))
    if unknown:
        raise ValueError(f"Unknown map(s) {unknown}; choose from {sorted(_MAP_TYPES)}.")


def _image(fit, values):
    """``values`` of ``fit`` as an image: a fit of one voxel is a volume of
    1 x 1 x 1 voxels (its values on the fourth axis), not a 1-D image."""
    return values.reshape((1, 1, 1) + values.shape) if fit.shape == () else values


def save_permeability(fit, path, *, affine=None, reference=None):
    """Write the per-face permeability (..., n_faces) as a 4-D NIfTI image.

    Values are m/s; NaN where the voxel has no outputs (status not in
    :data:`~dipy_spinverse.reconst.FITTED`) and outside the mask.
    The faces are those of ``fit.model.grid`` in order.

    Parameters
    ----------
    fit : SpinverseFit
    path : str or os.PathLike
    affine : ndarray (4, 4), optional
    reference : nibabel image or Nifti1Header, optional
        The image the data came from, whose space the output keeps
        (:func:`save_image`).

    Returns
    -------
    str
    """
    if fit.shape == ():
        data = np.where(fit.fitted, fit.permeability, np.nan)
        return save_image(path, _image(fit, data.astype(np.float32)), affine, reference)
    # Written a face at a time from the mask's rows: never the volume times
    # the faces in memory (15 GB for a brain-sized volume).
    fitted = np.isin(fit.params["status"], FITTED)[:, None]
    rows = np.where(fitted, fit.params["permeability"], np.nan).astype(np.float32)
    return save_voxels(path, rows, fit.mask, affine, reference, fill=np.nan)


def save_predicted(fit, path, *, affine=None, reference=None, gtab=None):
    """Write the predicted signal (fitted S0) as a 4-D NIfTI image.

    Parameters
    ----------
    fit : SpinverseFit
    path : str or os.PathLike
    affine : ndarray (4, 4), optional
    reference : nibabel image or Nifti1Header, optional
        The image the data came from, whose space the output keeps
        (:func:`save_image`).
    gtab : GradientTable or Protocol, optional
        Acquisitions to predict (default: the fitted ones).

    Returns
    -------
    str
    """
    if fit.shape == ():
        predicted = fit.predict(gtab).astype(np.float32)
        return save_image(path, _image(fit, predicted), affine, reference)
    rows = fit.predict_mask(gtab, dtype=np.float32)
    return save_voxels(path, rows, fit.mask, affine, reference)


#: Every posterior's descriptors and their units: the tissue prior's and the
#: white-matter priors' (maps, tables and the report's figures).
DESCRIPTOR_UNITS = {**UNITS, **WHITE_MATTER_UNITS}

#: The files of a posterior descriptor (but orientation): suffix -> the
#: columns of the stored quantiles (0.05, 0.25, 0.5, 0.75, 0.95) it holds,
#: and what they are.
_SUMMARIES = {
    "": (2, "median"),
    "_ci50": ([1, 3], "50% interval"),
    "_ci90": ([0, 4], "90% interval"),
}


def save_posterior(fit, folder, *, affine=None, reference=None):
    """Write a posterior fit's maps as NIfTI images, one per file, in ``folder``.

    For each scalar descriptor the fit holds ``<name>.nii.gz`` (the
    posterior median) and ``<name>_ci50.nii.gz`` / ``<name>_ci90.nii.gz``
    (4-D, the low and high bounds of the 50 % and 90 % central credible
    intervals), then, where the fit has it (not a protocol-free fit's),
    ``orientation.nii.gz`` (4-D, the mean principal axis), and
    ``posterior_status.nii.gz``. Each header's ``descrip`` names the
    quantity and its unit (:data:`dipy_spinverse.geometry.UNITS`, and
    ``WHITE_MATTER_UNITS`` for a white-matter prior's); values are
    0 outside the mask and NaN where the status is not ``OK``. Written a
    volume at a time from the mask's voxels.

    Parameters
    ----------
    fit : PosteriorFit or ProtocolFreeFit
    folder : str or os.PathLike
    affine : ndarray (4, 4), optional
    reference : nibabel image or Nifti1Header, optional
        As in :func:`save_image`.

    Returns
    -------
    dict
        ``{name: path}`` of the files written.
    """
    os.makedirs(folder, exist_ok=True)
    mask = fit.mask if fit.shape else np.ones((1, 1, 1), bool)
    params = fit.params
    space = dict(affine=affine, reference=reference)
    paths = {}

    def write(name, rows, what):
        path = os.path.join(os.fspath(folder), f"{name}.nii.gz")
        paths[name] = save_voxels(
            path, np.asarray(rows, np.float32), mask, description=what, **space
        )

    for name in (n for n in DESCRIPTOR_UNITS if n in params):
        unit = f" ({DESCRIPTOR_UNITS[name]})" if DESCRIPTOR_UNITS[name] else ""
        if name == "orientation":
            write(name, params[name], "posterior mean principal axis (unit vector)")
            continue
        for suffix, (columns, what) in _SUMMARIES.items():
            write(
                name + suffix,
                params[name][:, columns],
                f"{name} posterior {what}{unit}",
            )
    path = os.path.join(os.fspath(folder), "posterior_status.nii.gz")
    paths["posterior_status"] = save_voxels(
        path,
        params["status"].astype(np.int16),
        mask,
        fill=-2,
        description="posterior status (0 ok, 6 out of prior, -2 masked)",
        **space,
    )
    return paths


def posterior_map_files(folder):
    """The maps :func:`save_posterior` writes that are in ``folder`` (an
    earlier posterior fit's, which another fit's outputs replace).

    Only files named as :func:`save_posterior` names them are listed.

    Parameters
    ----------
    folder : str or os.PathLike

    Returns
    -------
    list of str
        Their paths.
    """
    names = ["posterior_status"]
    for name in DESCRIPTOR_UNITS:
        suffixes = ("",) if name == "orientation" else tuple(_SUMMARIES)
        names += [name + suffix for suffix in suffixes]
    paths = [os.path.join(os.fspath(folder), f"{name}.nii.gz") for name in names]
    return [path for path in paths if os.path.isfile(path)]


def remove_posterior_maps(folder):
    """Remove the maps :func:`save_posterior` writes from ``folder``
    (:func:`posterior_map_files`).

    Parameters
    ----------
    folder : str or os.PathLike

    Returns
    -------
    list of str
        The paths removed.
    """
    removed = posterior_map_files(folder)
    for path in removed:
        os.remove(path)
    return removed


def describe_status(status):
    """Count voxels per status code, e.g. ``{"ok": 5, "outside the mask": 1}``.

    The codes are :data:`~dipy_spinverse.reconst.STATUS_CODES`.
    The warning codes (:data:`~dipy_spinverse.reconst.FLAGGED`: a residual
    far above the noise, an undetermined surface, impossible data, a
    protocol that cannot determine the membranes) keep the voxel's outputs
    and fill its maps, but say they are not to be trusted. Every other code
    but ``"ok"`` (0) leaves the voxel's maps NaN.

    Parameters
    ----------
    status : array_like of int

    Returns
    -------
    dict
    """
    status = np.asarray(status)
    return {
        STATUS_CODES[int(code)]: int(np.sum(status == code))
        for code in np.unique(status)
        if int(code) in STATUS_CODES
    }
