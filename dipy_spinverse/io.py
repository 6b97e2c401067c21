"""Saving, loading and resuming Spinverse volume fits.

A fitted volume is saved as one ``.npz`` file that holds every per-voxel
array of a :class:`~dipy_spinverse.reconst.SpinverseVolumeFit` (status,
per-face permeability, predicted signal, S0, loss) and a JSON description of
the model, from which :func:`load_fit` rebuilds it -- no pickles. A partly
finished fit (``SpinverseModel.fit(..., checkpoint=path)``) is saved the same
way, with status ``PENDING`` on the voxels still to fit; :func:`resume_fit`
continues it. :func:`save_maps`, :func:`save_permeability` and
:func:`save_predicted` write NIfTI images; per-voxel meshes are written by
``SpinverseVolumeFit.save_interface``.
"""

import json
import os

import numpy as np
from dipy.io.image import save_nifti

from .reconst import STATUS_CODES, SpinverseModel, SpinverseVolumeFit

__all__ = [
    "MAPS",
    "save_fit",
    "load_fit",
    "resume_fit",
    "save_maps",
    "save_permeability",
    "save_predicted",
    "describe_status",
]

_FORMAT = "dipy_spinverse.SpinverseVolumeFit"
_VERSION = 1
_ARRAYS = ("mask", "status", "permeability", "predicted", "S0", "S0_sequences", "loss")

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


def save_fit(fit, path):
    """Save a (possibly partial) volume fit to a ``.npz`` file.

    The file is written to a temporary name and then renamed, so an
    interrupted save never leaves a broken file behind.

    Parameters
    ----------
    fit : SpinverseVolumeFit
    path : str or os.PathLike
        Output file; ``.npz`` is appended when missing.

    Returns
    -------
    str
        The path written.
    """
    if not isinstance(fit, SpinverseVolumeFit):
        raise ValueError(
            f"save_fit saves volume fits (SpinverseVolumeFit), got "
            f"{type(fit).__name__}; fit a volume, e.g. data[None] for one voxel."
        )
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    arrays = {name: fit.params[name] for name in _ARRAYS if name != "mask"}
    arrays["mask"] = fit.mask
    if fit.params.get("labels") is not None:
        arrays["labels"] = fit.params["labels"]
    header = dict(
        format=_FORMAT,
        version=_VERSION,
        model=fit.model._spec(),
        fingerprint=fit.fingerprint,
    )
    arrays["header"] = np.array(json.dumps(header))
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
    return path


def load_fit(path):
    """Load a volume fit saved by :func:`save_fit`, with its model.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    SpinverseVolumeFit
        ``fit.n_pending > 0`` for a partial fit; continue it with
        :func:`resume_fit`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file; pass the .npz written by save_fit.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            header = json.loads(str(archive["header"]))
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"{path} is not a Spinverse fit saved by dipy_spinverse.io.save_fit "
            f"({err})."
        ) from err
    if header.get("format") != _FORMAT:
        raise ValueError(
            f"{path} is not a Spinverse fit (format {header.get('format')!r})."
        )
    if header.get("version", 0) > _VERSION:
        raise ValueError(
            f"{path} was written by a newer dipy_spinverse (format version "
            f"{header['version']} > {_VERSION}); upgrade dipy_spinverse."
        )
    model = SpinverseModel._from_spec(header["model"])
    missing = [name for name in _ARRAYS if name not in arrays]
    if missing:
        raise ValueError(f"{path} lacks the arrays {missing}; the file is damaged.")
    params = {name: np.array(arrays[name]) for name in _ARRAYS if name != "mask"}
    params["labels"] = np.array(arrays["labels"]) if "labels" in arrays else None
    if params["permeability"].shape[-1] != model.grid.n_faces:
        raise ValueError(
            f"{path}: the permeability has {params['permeability'].shape[-1]} faces "
            f"but the saved grid has {model.grid.n_faces}; the file is damaged."
        )
    return SpinverseVolumeFit(
        model,
        params,
        arrays["mask"].astype(bool),
        fingerprint=header.get("fingerprint"),
    )


def resume_fit(
    path,
    data,
    *,
    mask=None,
    engine="serial",
    n_jobs=None,
    verbose=False,
    vox_per_chunk=None,
    device=None,
    checkpoint=True,
):
    """Continue a partly finished volume fit saved at ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        A checkpoint from ``SpinverseModel.fit(..., checkpoint=path)`` or a
        file from :func:`save_fit`.
    data : array_like (..., n_volumes)
        The same data the fit was started on.
    mask : array_like of bool, optional
        Must equal the saved mask when given.
    engine, n_jobs, verbose, vox_per_chunk
        As in :meth:`SpinverseModel.fit`.
    device : str, optional
        Run on another device than the saved one (e.g. ``"cuda"``).
    checkpoint : bool
        Keep saving progress to ``path``.

    Returns
    -------
    SpinverseVolumeFit
    """
    state = load_fit(path)
    if device is not None:
        spec = state.model._spec()
        spec["device"] = str(device)
        state = SpinverseVolumeFit(
            SpinverseModel._from_spec(spec),
            state.params,
            state.mask,
            fingerprint=state.fingerprint,
        )
    return state.model.fit(
        data,
        mask=mask,
        engine=engine,
        n_jobs=n_jobs,
        verbose=verbose,
        vox_per_chunk=vox_per_chunk,
        checkpoint=os.fspath(path) if checkpoint else None,
        resume=state,
    )


def save_maps(fit, out_dir, *, affine=None, names=None, prefix="", suffix=".nii.gz"):
    """Write scalar maps of a volume fit as NIfTI images.

    Parameters
    ----------
    fit : SpinverseVolumeFit
    out_dir : str or os.PathLike
        Created if needed.
    affine : ndarray (4, 4), optional
        Voxel-to-world affine (default identity).
    names : dict or sequence of str, optional
        Maps to write (keys of :data:`MAPS`), or ``{map: file name}``.
        Default: all, named ``<prefix><map><suffix>``.
    prefix, suffix : str

    Returns
    -------
    dict
        ``{map: path}``.
    """
    if names is None:
        names = list(MAPS)
    if not isinstance(names, dict):
        names = {name: f"{prefix}{name}{suffix}" for name in names}
    unknown = sorted(set(names) - set(MAPS))
    if unknown:
        raise ValueError(f"Unknown map(s) {unknown}; choose from {sorted(MAPS)}.")
    affine = np.eye(4) if affine is None else np.asarray(affine)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, fname in names.items():
        path = os.path.join(os.fspath(out_dir), os.fspath(fname))
        save_nifti(path, np.asarray(getattr(fit, name)).astype(MAPS[name]), affine)
        paths[name] = path
    return paths


def save_permeability(fit, path, *, affine=None):
    """Write the per-face permeability (..., n_faces) as a 4-D NIfTI image.

    Values are m/s; NaN where the status is not 0 (and outside the mask).
    The faces are those of ``fit.model.grid`` in order.

    Parameters
    ----------
    fit : SpinverseVolumeFit
    path : str or os.PathLike
    affine : ndarray (4, 4), optional

    Returns
    -------
    str
    """
    affine = np.eye(4) if affine is None else np.asarray(affine)
    data = np.where(fit.ok[..., None], fit.permeability, np.nan).astype(np.float32)
    save_nifti(os.fspath(path), data, affine)
    return os.fspath(path)


def save_predicted(fit, path, *, affine=None, gtab=None):
    """Write the predicted signal (fitted S0) as a 4-D NIfTI image.

    Parameters
    ----------
    fit : SpinverseVolumeFit
    path : str or os.PathLike
    affine : ndarray (4, 4), optional
    gtab : GradientTable or Protocol, optional
        Acquisitions to predict (default: the fitted ones).

    Returns
    -------
    str
    """
    affine = np.eye(4) if affine is None else np.asarray(affine)
    save_nifti(os.fspath(path), fit.predict(gtab).astype(np.float32), affine)
    return os.fspath(path)


def describe_status(status):
    """Count voxels per status code, e.g. ``{"ok": 5, "outside the mask": 1}``.

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
