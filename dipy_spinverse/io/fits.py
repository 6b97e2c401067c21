"""Fit files: a volume fit saved whole (``.npz``) and read back.

A fitted volume is saved as one ``.npz`` file that holds every per-voxel
array of a :class:`~dipy_spinverse.reconst.SpinverseFit` (status, per-face
permeability, cell labels, predicted signal, S0, loss), a
:class:`~dipy_spinverse.reconst.PosteriorFit` or a
:class:`~dipy_spinverse.compartments.CompartmentFit` (its fitted
parameters, status and b = 0 levels) and a JSON description of the model
(:func:`~dipy_spinverse.io.specs.model_spec`), from which :func:`load_fit`
rebuilds it. :func:`load_fit` also reads the HDF5
store of a :class:`~dipy_spinverse.io.checkpoint.Checkpoint` (a fit saved a
chunk at a time, the voxels still to fit with status ``PENDING``), checking
each row against its checksum. The header, the values of a voxel not fitted
yet and the row checksums are shared with the checkpoint, which writes
them.
"""

import json
import os
import zipfile
import zlib

import numpy as np

from ..compartments import CompartmentFit
from ..files import atomic_write
from ..reconst import (
    MESH_NOT_REFINED,
    MESH_PARAMETERS,
    OPTIONAL_PARAMETERS,
    PENDING,
    PosteriorFit,
    ProtocolFreeFit,
    SpinverseFit,
)
from .specs import model_from_spec, model_spec

__all__ = ["save_fit", "load_fit"]

_FORMAT = "dipy_spinverse.SpinverseFit"
#: A posterior fit's file: its maps' arrays and its model's settings.
_POSTERIOR_FORMAT = "dipy_spinverse.PosteriorFit"
_POSTERIOR_VERSION = 1
_POSTERIOR_ARRAYS = ("mask", "status", "inputs", "sigma", "S0")
#: A compartment model's fit: its parameters' rows, status and (where the
#: fit has them) b = 0 levels, and its model's class, table and settings.
_COMPARTMENT_FORMAT = "dipy_spinverse.CompartmentFit"
_COMPARTMENT_VERSION = 1
_COMPARTMENT_ARRAYS = ("mask", "status", "model_params")
#: The fit classes save_fit takes.
_SAVED_FITS = (SpinverseFit, PosteriorFit, CompartmentFit)
#: Why a protocol-free fit (of a volume or a voxel) is refused, and what
#: keeps its results meanwhile.
_PROTOCOL_FREE_UNSAVED = (
    "a protocol-free fit (ProtocolFreeFit, of fit_method='protocol_free') "
    "cannot be saved yet: save_fit has no file format for it. Save "
    "its maps instead: for each name in dipy_spinverse.posterior.protocol_free."
    "FREE_SCALARS, nib.save(nib.Nifti1Image(getattr(fit, name), affine), "
    "f'{name}.nii.gz'), and likewise the bounds of fit.credible_interval(name, "
    "0.9) and fit.status; or fit with fit_method='posterior', whose fits "
    "save_fit keeps."
)
# Version 2: one SpinverseFit class, S0_sequences columns in rank order
# (Protocol.sequences), the label search's options named search_*, no seed.
# Version 3: the parameters of the voxels in the mask only, (n_mask, ...).
_VERSION = 3
_ARRAYS = ("mask", "status", "permeability", "predicted", "S0", "S0_sequences", "loss")
#: What a store holds for a voxel not fitted yet (status last: see
#: :class:`~dipy_spinverse.io.checkpoint.Checkpoint`).
UNFITTED = dict(
    permeability=np.nan,
    labels=-1,
    predicted=np.nan,
    S0=np.nan,
    S0_sequences=np.nan,
    loss=np.nan,
    inside_probability=np.nan,
    uncertainty=np.nan,
    proposal_probability=np.nan,
    mesh_vertices=np.nan,
    mesh_loss=np.nan,
    mesh_status=MESH_NOT_REFINED,
    status=PENDING,
)
#: Per-voxel arrays saved when the fit holds them (None otherwise): the
#: optional parameters and the smooth meshes of ``refine_mesh=True``.
_SAVED_IF_PRESENT = OPTIONAL_PARAMETERS + MESH_PARAMETERS

#: A store's checksums (its header's ``checksum``): the CRC32 of each row
#: (mask voxel) of each parameter, in the dataset ``crc32.<parameter>``,
#: written with the row and verified when the store is read. Stores written
#: before have no ``checksum`` and are read unverified.
CHECKSUM = "crc32 of each row of each parameter"
#: The name of a parameter's checksum dataset is this, then the parameter's.
CRC_PREFIX = "crc32."


def fit_header(fit):
    """The header a fit file keeps: format, version, model (and, for a
    search fit, the fitted data's fingerprint and the relative noise level
    its losses are measured in, ``noise_level``).

    Parameters
    ----------
    fit : SpinverseFit, PosteriorFit or CompartmentFit

    Returns
    -------
    dict
        JSON-ready; :func:`read_fit_file` checks its format and version.
    """
    if isinstance(fit, CompartmentFit):
        return dict(
            format=_COMPARTMENT_FORMAT,
            version=_COMPARTMENT_VERSION,
            model=model_spec(fit.model),
        )
    if isinstance(fit, PosteriorFit):
        return dict(
            format=_POSTERIOR_FORMAT,
            version=_POSTERIOR_VERSION,
            model=model_spec(fit.model),
        )
    return dict(
        format=_FORMAT,
        version=_VERSION,
        model=model_spec(fit.model),
        fingerprint=fit.fingerprint,
        noise_level=fit.noise_level,
    )


def row_checksums(values):
    """CRC32 of the bytes of each row of ``values``.

    Parameters
    ----------
    values : array_like (n, ...)
        One row per voxel of the mask.

    Returns
    -------
    ndarray of uint32 (n,)
    """
    values = np.ascontiguousarray(values)
    if not len(values):
        return np.zeros(0, dtype=np.uint32)
    rows = values.reshape(len(values), -1).view(np.uint8)
    return np.fromiter(
        (zlib.crc32(row) for row in rows), dtype=np.uint32, count=len(values)
    )


def save_fit(fit, path):
    """Save a (possibly partial) volume fit to a ``.npz`` file.

    The file is written to a temporary name and then renamed, so an
    interrupted save never leaves a broken file behind.

    Parameters
    ----------
    fit : SpinverseFit, PosteriorFit or CompartmentFit
        A volume fit (``fit.shape != ()``) of either method, or of a
        compartment model. A posterior fit keeps its maps and its model's
        settings; its estimator is found again by their key (the cache or
        the package) when it is needed. A compartment fit keeps its
        parameters, status and b = 0 levels, and its model's class, gradient
        table and settings; a learned model's network is found again by its
        key when it is needed.
    path : str or os.PathLike
        Output file; ``.npz`` is appended when missing.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    ValueError
        For a fit of one voxel, of another class, or a protocol-free fit
        (:class:`~dipy_spinverse.reconst.ProtocolFreeFit`, not saved yet: the
        message says how to keep its maps).
    """
    if isinstance(fit, ProtocolFreeFit):
        raise ValueError(_PROTOCOL_FREE_UNSAVED)
    if not isinstance(fit, _SAVED_FITS) or fit.shape == ():
        got = type(fit).__name__
        if isinstance(fit, _SAVED_FITS):
            got = f"a {got} of one voxel"
        raise ValueError(
            "save_fit saves volume fits (a SpinverseFit, PosteriorFit or "
            f"CompartmentFit of a volume), got {got}; fit a volume, e.g. "
            "data[None] for one voxel."
        )
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    # The fit's own arrays (MaskedFit.saved_arrays): the mask and the rows
    # of every parameter it holds, the same path for every fit class.
    arrays = fit.saved_arrays()
    arrays["header"] = np.array(json.dumps(fit_header(fit)))
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


def load_fit(path):
    """Load a volume fit saved by :func:`save_fit` or a :class:`Checkpoint`.

    A fit saved on ``cuda`` loads on a machine without CUDA, with its model
    on ``cpu``, for inspection; ``fit.saved_device`` keeps the saved device,
    and :func:`resume_fit` refuses to continue such a fit unless told
    ``device="cpu"``.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.npz`` from :func:`save_fit` or an HDF5 store (``.h5``) from
        :class:`Checkpoint`.

    Returns
    -------
    SpinverseFit, PosteriorFit or CompartmentFit
        ``fit.n_pending > 0`` for a partial search fit; continue it with
        :func:`resume_fit`.

    Raises
    ------
    ValueError
        Naming ``path``: a missing, truncated or corrupted file, or one not
        written by :func:`save_fit` or :class:`Checkpoint`; a learned
        compartment model's fit whose network this version would not find
        (its key changed with the code that trains it).
    """
    path = os.fspath(path)
    header, arrays = read_fit_file(path)
    try:
        model = model_from_spec(header["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path}: the saved model cannot be rebuilt ({type(err).__name__}: "
            f"{err}); the file is damaged or was not written by save_fit."
        ) from err
    if header["format"] == _COMPARTMENT_FORMAT:
        return _compartment_fit(path, header["model"], model, arrays)
    if header["format"] == _POSTERIOR_FORMAT:
        params = {k: v for k, v in arrays.items() if k not in ("mask", "header")}
        return PosteriorFit(model, params, arrays["mask"].astype(bool))
    params = {name: arrays[name] for name in _ARRAYS if name != "mask"}
    for name in _SAVED_IF_PRESENT:
        params[name] = arrays.get(name)
    mask = arrays["mask"].astype(bool)
    # Up to version 2 the parameters of the whole volume were saved.
    rows = mask.shape if header.get("version", 0) < 3 else (int(mask.sum()),)
    _check_arrays(path, model, rows, params)
    return SpinverseFit(
        model,
        params,
        mask,
        fingerprint=header.get("fingerprint"),
        saved_device=str(header["model"].get("device", model.device)),
        # Files before it have none: not recorded (None).
        noise_level=header.get("noise_level"),
    )


#: What a damaged ``.npz`` raises while it is read: zipfile's errors for a
#: truncated or overwritten archive, zlib's and EOFError for a broken
#: compressed member, ValueError and OSError from numpy and json,
#: RuntimeError from h5py on a damaged HDF5 file.
_READ_ERRORS = (
    OSError,
    RuntimeError,
    ValueError,
    KeyError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
)


def read_fit_file(path):
    """The header and arrays of a fit file, its checksums verified.

    Parameters
    ----------
    path : str
        A ``.npz`` from :func:`save_fit` or the HDF5 store of a checkpoint.

    Returns
    -------
    header : dict
    arrays : dict of ndarray
        Every array of the file, the checksums of a store's rows included.

    Raises
    ------
    ValueError
        Naming ``path``: missing, truncated, corrupted, of another format or
        of a newer version, or rows that do not match their checksums.
    """
    import h5py

    if not os.path.isfile(path):
        raise ValueError(
            f"{path}: no such file; pass the .npz written by save_fit or the .h5 "
            "store of a Checkpoint."
        )
    try:
        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as store:
                header = json.loads(store.attrs["header"])
                arrays = {name: store[name][()] for name in store}
        else:
            with np.load(path, allow_pickle=False) as archive:
                header = json.loads(str(archive["header"]))
                arrays = {name: np.array(archive[name]) for name in archive.files}
    except _READ_ERRORS as err:
        raise ValueError(
            f"{path} is not a Spinverse fit saved by dipy_spinverse.io.save_fit: "
            f"it is truncated, corrupted or another file ({type(err).__name__}: "
            f"{err}). Fit again, or load an intact copy."
        ) from err
    formats = {_FORMAT: (_VERSION, _ARRAYS)}
    formats[_POSTERIOR_FORMAT] = (_POSTERIOR_VERSION, _POSTERIOR_ARRAYS)
    formats[_COMPARTMENT_FORMAT] = (_COMPARTMENT_VERSION, _COMPARTMENT_ARRAYS)
    found = header.get("format") if isinstance(header, dict) else None
    # A format of another type (a list is not even hashable) is no format.
    if not isinstance(found, str) or found not in formats:
        raise ValueError(f"{path} is not a Spinverse fit (format {found!r}).")
    _check_header_types(path, header)
    newest, required = formats[found]
    if header.get("version", 0) > newest:
        raise ValueError(
            f"{path} was written by a newer dipy_spinverse (format version "
            f"{header['version']} > {newest}); upgrade dipy_spinverse."
        )
    missing = [name for name in required if name not in arrays]
    if missing or not isinstance(header.get("model"), dict):
        what = f"the arrays {missing}" if missing else "the model description"
        raise ValueError(f"{path} lacks {what}; the file is damaged.")
    _verify_store(path, header, arrays)
    return header, arrays


def _check_header_types(path, header):
    """Refuse header fields of the wrong type before they are compared or
    converted (a version of "1" or null would fail as a TypeError)."""
    version = header.get("version", 0)  # absent: the earliest files
    if "version" in header and not (_is_whole(version) and version >= 1):
        _refuse_field(path, "version", version, "a whole number of 1 or more")
    # Only the type: the value is the fit's own (NaN where it had no b = 0).
    noise_level = header.get("noise_level")
    if noise_level is not None and not _is_real(noise_level):
        _refuse_field(path, "noise_level", noise_level, "a number or null")
    fingerprint = header.get("fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        _refuse_field(path, "fingerprint", fingerprint, "a string or null")
    # Absent, it is named below with the arrays the file lacks.
    if "model" in header and not isinstance(header["model"], dict):
        _refuse_field(path, "model", header["model"], "a table describing the model")


def _is_whole(value):
    # JSON's true and false are Python bools, an int subclass: not numbers.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _refuse_field(path, name, value, expected):
    raise ValueError(
        f"{path}: its header's {name} is {value!r}, not {expected}; the file is "
        "damaged or was not written by save_fit. Load an intact copy, or fit "
        "again."
    )


def _compartment_fit(path, spec, model, arrays):
    """The compartment fit of ``arrays``, its model rebuilt; a learned
    model's only if its network's key is the saved one."""
    saved, key = spec.get("network_key"), model.network_key()
    if saved != key:
        raise ValueError(
            f"{path}: its {spec['model']} was fitted by the learned network of "
            f"key {saved}, which this dipy_spinverse would not find (it looks "
            f"for key {key}: the code or settings that train the network "
            "changed since the fit was saved). Load the file with the "
            "dipy_spinverse version that wrote it, or fit the data again; its "
            "arrays stay readable with numpy.load."
        )
    try:
        return model.restored_fit(arrays)
    except ValueError as err:
        raise ValueError(
            f"{path}: {err}; the file is damaged or was not written by save_fit."
        ) from err


def _check_arrays(path, model, shape, params):
    """Refuse arrays whose shapes do not fit ``shape`` (voxels) and the model."""
    trailing = dict(
        permeability=(model.grid.n_faces,),
        labels=(model.grid.n_cells,),
        predicted=(len(model.protocol),),
        S0=(),
        S0_sequences=(len(model.sequences),),
        loss=(),
        status=(),
        inside_probability=(model.grid.n_cells,),
        uncertainty=(),
        proposal_probability=(model.grid.n_cells,),
        mesh_loss=(),
        mesh_status=(),
    )
    if model.mesh_tets is not None:
        trailing["mesh_vertices"] = (int(model.mesh_tets.max()) + 1, 3)
    for name, tail in trailing.items():
        if params.get(name) is None:
            continue
        if params[name].shape != tuple(shape) + tail:
            raise ValueError(
                f"{path}: {name} has shape {params[name].shape} but the saved "
                f"volume and model need {tuple(shape) + tail}; the file is "
                "damaged."
            )


def _verify_store(path, header, arrays):
    """Refuse a store whose rows do not match their checksums (values
    overwritten or corrupted on disk); stores without checksums pass."""
    if header.get("checksum") != CHECKSUM:
        return
    fix = (
        "Delete the checkpoint (or run again with --force) to fit those voxels "
        "again, or restore an intact copy."
    )
    mask = np.asarray(arrays["mask"], dtype=bool)
    if zlib.crc32(np.ascontiguousarray(mask)) != header.get("mask_crc32"):
        raise ValueError(
            f"checkpoint {path}: its mask does not match its checksum: the file "
            f"was modified or corrupted after it was written. {fix}"
        )
    # Voxels still PENDING are fitted again, whatever they hold.
    written = np.flatnonzero(np.asarray(arrays["status"]) != PENDING)
    for name in [*UNFITTED][::-1]:
        crcs = arrays.get(CRC_PREFIX + name)
        if crcs is None or name not in arrays:
            continue
        bad = written[row_checksums(arrays[name][written]) != crcs[written]]
        if not bad.size:
            continue
        voxel = tuple(int(i) for i in np.argwhere(mask)[bad[0]])
        ranges = _row_ranges(bad)
        raise ValueError(
            f"checkpoint {path}: {name} of {bad.size} stored voxel(s) does not "
            f"match its checksum (rows {ranges} of the mask's voxels; the first "
            f"is voxel {voxel}): the file was modified or corrupted after it was "
            f"written, and resuming would carry those values to the outputs. {fix}"
        )


def _row_ranges(rows, limit=4):
    """``"3-7, 12, ..."``: the first ``limit`` runs of consecutive rows."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = np.split(rows, breaks)
    text = [f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs[:limit]]
    return ", ".join(text) + (", ..." if len(runs) > limit else "")
