"""Fit files: a volume fit saved whole (``.npz``) and read back.

A fitted volume is saved as one ``.npz`` file that holds every per-voxel
array of the fit (``fit.saved_arrays()``: a
:class:`~dipy_spinverse.reconst.SpinverseFit`'s status, per-face
permeability, cell labels, predicted signal, S0, loss; a
:class:`~dipy_spinverse.reconst.PosteriorFit`'s or
:class:`~dipy_spinverse.reconst.ProtocolFreeFit`'s quantiles; a
:class:`~dipy_spinverse.compartments.CompartmentFit`'s fitted parameters,
status and b = 0 levels) and a JSON header: its method's file format
(:mod:`dipy_spinverse.reconst.methods`) and a description of the model
(:func:`~dipy_spinverse.io.specs.model_spec`), from which :func:`load_fit`
rebuilds it and its method's ``restored_fit`` the fit. :func:`load_fit`
also reads the HDF5 store of a
:class:`~dipy_spinverse.io.checkpoint.Checkpoint` (a fit saved a chunk at a
time, the voxels still to fit with status ``PENDING``), checking each row
against its checksum. The header, the values of a voxel not fitted
yet and the row checksums are shared with the checkpoint, which writes
them.
"""

import json
import os
import zipfile
import zlib

import numpy as np

from ..files import atomic_write
from ..reconst import MESH_NOT_REFINED, PENDING
from ..reconst.methods import (
    SAVED_KINDS,
    method_of,
    method_of_fit,
    method_of_format,
)
from .specs import model_from_spec, model_spec

__all__ = ["save_fit", "load_fit"]

#: What a store holds for a voxel of a label search not fitted yet (status
#: last: see :class:`~dipy_spinverse.io.checkpoint.Checkpoint`).
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

#: A store's checksums (its header's ``checksum``): the CRC32 of each row
#: (mask voxel) of each parameter, in the dataset ``crc32.<parameter>``,
#: written with the row and verified when the store is read. Stores written
#: before have no ``checksum`` and are read unverified.
CHECKSUM = "crc32 of each row of each parameter"
#: The name of a parameter's checksum dataset is this, then the parameter's.
CRC_PREFIX = "crc32."


def fit_header(fit):
    """The header a fit file keeps: format, version, model and the fit's
    own fields its method's format names (for a search fit the fitted
    data's fingerprint and the relative noise level its losses are measured
    in, ``noise_level``).

    Parameters
    ----------
    fit : MaskedFit
        A fit of a registered method
        (:func:`~dipy_spinverse.reconst.methods.method_of` its model).

    Returns
    -------
    dict
        JSON-ready; :func:`read_fit_file` checks its format and version.
    """
    file_format = method_of(fit.model).file_format
    header = dict(
        format=file_format.name,
        version=file_format.version,
        model=model_spec(fit.model),
    )
    header.update({name: getattr(fit, name) for name in file_format.header})
    return header


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
    fit : SpinverseFit, PosteriorFit, ProtocolFreeFit or CompartmentFit
        A volume fit (``fit.shape != ()``) of any registered method
        (:mod:`dipy_spinverse.reconst.methods`), or of a compartment model.
        A posterior fit keeps its maps and its model's settings; its
        estimator is found again by their key (the cache or the package)
        when it is needed. A protocol-free fit keeps its maps, its voxels'
        tokens and noise (new intervals are drawn from them) and its
        model's noise, draws and protocol. A compartment fit keeps its
        parameters, status and b = 0 levels, and its model's class,
        gradient table and settings; a learned model's network is found
        again by its key when it is needed.
    path : str or os.PathLike
        Output file; ``.npz`` is appended when missing.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    ValueError
        For a fit of one voxel, or of a method that is not registered.
    """
    method = method_of_fit(fit)
    if method is None or fit.shape == ():
        got = type(fit).__name__
        if method is not None:
            got = f"a {got} of one voxel"
        kinds = ", ".join(m.fit.__name__ for m in SAVED_KINDS.values())
        raise ValueError(
            f"save_fit saves volume fits (a {kinds.replace(', ', ', a ')} of a "
            f"volume), got {got}; fit a volume, e.g. data[None] for one voxel."
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
    SpinverseFit, PosteriorFit, ProtocolFreeFit or CompartmentFit
        The fit of the method its file's format names
        (:func:`~dipy_spinverse.reconst.methods.method_of_format`);
        ``fit.n_pending > 0`` for a partial fit read from a checkpoint.

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
    # The fit's own arrays: the header and a store's checksums apart.
    own = {
        name: values
        for name, values in arrays.items()
        if name != "header" and not name.startswith(CRC_PREFIX)
    }
    try:
        return method_of_format(header["format"]).restore(model, own, header)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


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
    found = header.get("format") if isinstance(header, dict) else None
    # A format of another type (a list is not even hashable) is no format.
    method = method_of_format(found) if isinstance(found, str) else None
    if method is None:
        raise ValueError(f"{path} is not a Spinverse fit (format {found!r}).")
    _check_header_types(path, header)
    newest, required = method.file_format.version, method.file_format.arrays
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


def _verify_store(path, header, arrays):
    """Refuse a store whose rows do not match their checksums (values
    overwritten or corrupted on disk); stores without checksums pass."""
    if header.get("checksum") != CHECKSUM:
        return
    fix = "Delete the checkpoint to fit those voxels again, or restore an intact copy."
    mask = np.asarray(arrays["mask"], dtype=bool)
    if zlib.crc32(np.ascontiguousarray(mask)) != header.get("mask_crc32"):
        raise ValueError(
            f"checkpoint {path}: its mask does not match its checksum: the file "
            f"was modified or corrupted after it was written. {fix}"
        )
    # Voxels still PENDING are fitted again, whatever they hold.
    written = np.flatnonzero(np.asarray(arrays["status"]) != PENDING)
    # The status first (written last): a voxel counts as written by it.
    names = sorted(
        (name[len(CRC_PREFIX) :] for name in arrays if name.startswith(CRC_PREFIX)),
        key=lambda name: name != "status",
    )
    for name in names:
        crcs = arrays[CRC_PREFIX + name]
        if name not in arrays:
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
