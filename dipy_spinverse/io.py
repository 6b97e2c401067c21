"""Saving, loading and resuming Spinverse fits.

A fitted volume is saved as one ``.npz`` file that holds every per-voxel
array of a :class:`~dipy_spinverse.reconst.SpinverseFit` (status, per-face
permeability, cell labels, predicted signal, S0, loss) and a JSON
description of the model (:func:`model_spec`), from which :func:`load_fit`
rebuilds it -- no pickles. A partly finished fit
(``SpinverseModel.fit(..., checkpoint=Checkpoint(path))``) is saved the same
way, with status ``PENDING`` on the voxels still to fit; :func:`resume_fit`
continues it. :func:`save_maps`, :func:`save_permeability` and
:func:`save_predicted` write NIfTI images; per-voxel meshes are written by
``SpinverseFit.save_interface``.
"""

import copy
import json
import os
from dataclasses import asdict

import numpy as np
import torch
from dipy.core.gradients import gradient_table
from dipy.io.image import save_nifti

from . import sequences
from .grid import TetGrid
from .inverse import InversionConfig
from .reconst import STATUS_CODES, SpinverseFit, SpinverseModel

__all__ = [
    "MAPS",
    "Checkpoint",
    "model_spec",
    "model_from_spec",
    "save_fit",
    "load_fit",
    "resume_fit",
    "save_maps",
    "save_permeability",
    "save_predicted",
    "describe_status",
]

_FORMAT = "dipy_spinverse.SpinverseFit"
# Version 2: one SpinverseFit class, S0_sequences columns in rank order
# (Protocol.sequences), the label search's options named search_*, no seed.
_VERSION = 2
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


class Checkpoint:
    """``checkpoint`` hook of :meth:`SpinverseModel.fit` that saves to a file.

    Each call saves the partial fit with :func:`save_fit` (atomically), so an
    interrupted fit can be continued with :func:`resume_fit`.

    Parameters
    ----------
    path : str or os.PathLike
    """

    def __init__(self, path):
        self.path = os.fspath(path)

    def __call__(self, fit):
        save_fit(fit, self.path)


def model_spec(model):
    """JSON-ready description of ``model``; :func:`model_from_spec` rebuilds it.

    The acquisitions are saved as the model's protocol (waveforms, b-values,
    directions), which is all a fit depends on.
    """
    grid = model.grid
    configured = not isinstance(model.preset, str)
    spec = dict(
        grid=dict(
            size=grid.size,
            n=int(round(grid.size / grid.spacing)),
            boundary=grid.boundary,
            wall_permeability=grid.wall_permeability,
        ),
        diffusivity=model.diffusivity,
        # A preset given as a configuration is saved whole, as options.
        preset=None if configured else model.preset,
        max_iter=None if configured else model.max_iter,
        batch_size=model.batch_size,
        device=str(model.device),
        dtype=str(model.dtype).replace("torch.", ""),
        options=model.config.as_dict() if configured else model.options,
        protocol=dict(
            bvals=model.protocol.bvals,
            bvecs=model.protocol.bvecs,
            waveforms=[_waveform_spec(w) for w in model.protocol.waveforms],
        ),
    )
    return json.loads(json.dumps(spec, default=_jsonable))


def model_from_spec(spec):
    """Rebuild the model that :func:`model_spec` described.

    A model saved on ``cuda`` is rebuilt on ``cpu`` when CUDA is absent.
    """
    spec = copy.deepcopy(spec)
    if "protocol" in spec:
        p = spec["protocol"]
        table = sequences.Protocol(
            waveforms=tuple(_waveform_from_spec(w) for w in p["waveforms"]),
            bvals=np.asarray(p["bvals"], float),
            bvecs=np.asarray(p["bvecs"], float).reshape(-1, 3),
        )
    else:  # version 1 files of models built from a gradient table
        g = spec["gtab"]
        table = gradient_table(
            np.asarray(g["bvals"], float),
            bvecs=np.asarray(g["bvecs"], float).reshape(-1, 3),
            big_delta=_array_or_scalar(g["big_delta"]),
            small_delta=_array_or_scalar(g["small_delta"]),
            b0_threshold=g["b0_threshold"],
        )
    grid = TetGrid.bcc(
        spec["grid"]["size"],
        spec["grid"]["n"],
        boundary=spec["grid"]["boundary"],
        wall_permeability=spec["grid"]["wall_permeability"],
    )
    device = spec["device"]
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    options, preset = spec["options"], spec["preset"]
    if preset is None:  # a whole configuration was saved
        preset, options = InversionConfig(**options), {}
    return SpinverseModel(
        table,
        grid=grid,
        diffusivity=spec["diffusivity"],
        preset=preset,
        max_iter=spec["max_iter"],
        batch_size=spec["batch_size"],
        device=device,
        dtype=spec["dtype"],
        **options,
    )


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if hasattr(value, "__dataclass_fields__"):  # a curriculum Stage
        return asdict(value)
    raise TypeError(f"cannot describe {type(value).__name__} in JSON")


def _array_or_scalar(value):
    if value is None:
        return None
    return np.asarray(value, float) if isinstance(value, list) else float(value)


def _waveform_spec(waveform):
    return dict(type=type(waveform).__name__, **asdict(waveform))


def _waveform_from_spec(spec):
    spec = dict(spec)
    cls = getattr(sequences, spec.pop("type"))
    return cls(**spec)


def save_fit(fit, path):
    """Save a (possibly partial) volume fit to a ``.npz`` file.

    The file is written to a temporary name and then renamed, so an
    interrupted save never leaves a broken file behind.

    Parameters
    ----------
    fit : SpinverseFit
        A volume fit (``fit.shape != ()``).
    path : str or os.PathLike
        Output file; ``.npz`` is appended when missing.

    Returns
    -------
    str
        The path written.
    """
    if not isinstance(fit, SpinverseFit) or fit.shape == ():
        raise ValueError(
            "save_fit saves volume fits (a SpinverseFit of a volume), got "
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
        model=model_spec(fit.model),
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
    SpinverseFit
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
    model = model_from_spec(header["model"])
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
    return SpinverseFit(
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
        A checkpoint saved by :class:`Checkpoint` or a file from
        :func:`save_fit`.
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
    SpinverseFit
    """
    state = load_fit(path)
    if device is not None:
        spec = model_spec(state.model)
        spec["device"] = str(device)
        state = SpinverseFit(
            model_from_spec(spec),
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
        checkpoint=Checkpoint(path) if checkpoint else None,
        resume=state,
    )


def save_maps(fit, out_dir, *, affine=None, names=None, prefix="", suffix=".nii.gz"):
    """Write scalar maps of a volume fit as NIfTI images.

    Parameters
    ----------
    fit : SpinverseFit
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
    fit : SpinverseFit
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
    fit : SpinverseFit
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
