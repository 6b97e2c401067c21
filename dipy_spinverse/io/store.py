"""Saving, loading and resuming Spinverse fits.

A fitted volume is saved as one ``.npz`` file that holds every per-voxel
array of a :class:`~dipy_spinverse.reconst.SpinverseFit` (status, per-face
permeability, cell labels, predicted signal, S0, loss) and a JSON
description of the model (:func:`model_spec`), from which :func:`load_fit`
rebuilds it -- no pickles. A partly finished fit
(``SpinverseModel.fit(..., checkpoint=Checkpoint(path))``) is saved the same
way, with status ``PENDING`` on the voxels still to fit; :func:`resume_fit`
continues it. :func:`save_map`, :func:`save_maps`, :func:`save_permeability`
and :func:`save_predicted` write NIfTI images, each atomically (a temporary
file beside it, then a rename: an interrupted run never leaves a half-written
image); barrier meshes are written by :mod:`dipy_spinverse.io.surfaces`.
"""

import copy
import errno
import json
import os
import shutil
import zipfile
import zlib
from dataclasses import asdict

import numpy as np
import torch
from dipy.core.gradients import gradient_table

from ..checks import check_device
from ..files import WriteError, atomic_write, save_image, save_voxels
from ..geometry import DESCRIPTORS, UNITS
from ..inverse import InversionConfig
from ..reconst import (
    FITTED,
    MESH_NOT_REFINED,
    MESH_PARAMETERS,
    OPTIONAL_PARAMETERS,
    PENDING,
    STATUS_CODES,
    SpinverseFit,
    SpinverseModel,
)
from ..sim import sequences
from ..sim.grid import TetGrid

__all__ = [
    "MAPS",
    "SEARCH_MAPS",
    "MESH_MAPS",
    "Checkpoint",
    "checkpoint_for",
    "store_path",
    "model_spec",
    "model_from_spec",
    "save_fit",
    "load_fit",
    "resume_fit",
    "save_map",
    "save_maps",
    "save_permeability",
    "save_predicted",
    "save_image",
    "describe_status",
    "save_posterior",
    "MAP_UNITS",
]

_FORMAT = "dipy_spinverse.SpinverseFit"
# Version 2: one SpinverseFit class, S0_sequences columns in rank order
# (Protocol.sequences), the label search's options named search_*, no seed.
# Version 3: the parameters of the voxels in the mask only, (n_mask, ...).
_VERSION = 3
_ARRAYS = ("mask", "status", "permeability", "predicted", "S0", "S0_sequences", "loss")
#: What a store holds for a voxel not fitted yet (status last: see
#: :class:`Checkpoint`).
_FILL = dict(
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
_CHECKSUM = "crc32 of each row of each parameter"
_CRC_PREFIX = "crc32."

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


class Checkpoint:
    """``checkpoint`` hook of :meth:`SpinverseModel.fit`: an HDF5 store.

    The first call (``rows`` None) creates the store: the model, the mask,
    the data's fingerprint, and one dataset per parameter over the voxels of
    the mask, holding the values of a voxel not yet fitted (status
    ``PENDING``) -- or, when a fit is resumed, the voxels it has. Each later
    call writes only the rows of the chunk just fitted, status last, so its
    cost does not depend on the size of the volume and a fit interrupted at
    any moment keeps every chunk written before: :func:`load_fit` reads the
    store (the voxels still ``PENDING`` included) and :func:`resume_fit`
    continues it.

    Why a failed write cannot corrupt it: the store is created whole, at its
    full size, in a temporary file renamed into place, after checking that
    the disk has room for it; afterwards HDF5 never writes to it again. The
    datasets are contiguous, so a row lies at a fixed byte offset, and each
    chunk's rows are written there with plain file writes, their bytes and
    checksums first, then (after ``fsync``) their status. HDF5's own
    metadata is never touched after creation, so a full disk, a quota or a
    lost mount (which once left h5py's metadata cache broken, a traceback
    and a segmentation fault) can only fail the chunk being written: the
    voxels written before stay readable and a rerun continues from them.

    Each row of each parameter is stored with its CRC32, checked when the
    store is read: values overwritten or corrupted on disk are refused
    (a ValueError naming the file, the parameter and the voxels), not
    resumed. A write that fails raises a :class:`~dipy_spinverse.files.
    WriteError` (an ``OSError``) naming the store and the cause.

    Parameters
    ----------
    path : str or os.PathLike
        The store (``.h5`` is appended when the name has no ``.h5``).
    """

    def __init__(self, path):
        self.path = store_path(path)
        self._layout = None

    def __call__(self, fit, rows=None):
        if rows is None:
            self._layout = _create_store(fit, self.path)
        else:
            if self._layout is None:
                self._layout = _store_layout(self.path)
            _write_rows(fit, self.path, np.asarray(rows), self._layout)


def checkpoint_for(path):
    """The checkpoint store of a fit saved at ``path``.

    ``path`` itself when it is a store (``.h5``), else ``<name>.partial.h5``
    beside it (``fit.npz`` -> ``fit.partial.h5``).
    """
    path = os.fspath(path)
    if path.endswith((".h5", ".hdf5")):
        return path
    stem = path[: -len(".npz")] if path.endswith(".npz") else path
    return stem + ".partial.h5"


def store_path(path):
    """``path`` as the name of an HDF5 store (``.h5`` appended if missing)."""
    path = os.fspath(path)
    return path if path.endswith((".h5", ".hdf5")) else path + ".h5"


def _header(fit):
    return dict(
        format=_FORMAT,
        version=_VERSION,
        model=model_spec(fit.model),
        fingerprint=fit.fingerprint,
    )


def _row_crcs(values):
    """CRC32 of the bytes of each row of ``values`` (uint32, one per row)."""
    values = np.ascontiguousarray(values)
    if not len(values):
        return np.zeros(0, dtype=np.uint32)
    rows = values.reshape(len(values), -1).view(np.uint8)
    return np.fromiter(
        (zlib.crc32(row) for row in rows), dtype=np.uint32, count=len(values)
    )


def _store_error(path, err, what, *, created=True):
    """The WriteError of a failed store write, naming the file and the fix
    (``created``: whether the store at ``path`` is this fit's)."""
    kept = (
        "The voxels stored before are kept in it"
        if created
        else "A checkpoint there before (if any) is unchanged"
    )
    return WriteError.of(
        path,
        err,
        what="the checkpoint",
        during=what,
        fix=f"{kept}: free space (or pass another --out_dir) and run again to "
        "resume the fit from them.",
    )


#: Bytes written at a time when a store is created (a volume's parameters
#: are never copied whole to bytes).
_WRITE_BYTES = 1 << 26


def _stored(fit):
    """The parameters ``fit``'s store holds, status last."""
    return [name for name in _FILL if fit.params.get(name) is not None]


def _store_contents(fit):
    """The datasets of ``fit``'s store (the mask apart): each parameter and
    the CRC32 of each of its rows, status last."""
    contents = {}
    for name in _stored(fit):
        values = fit.params[name]
        contents[_CRC_PREFIX + name] = _row_crcs(values)
        contents[name] = np.ascontiguousarray(values)
    return contents


def _create_store(fit, path):
    """A store for ``fit`` at ``path``: the existing one when it holds this
    very fit (a resumed run writes on where it stopped), else a new one
    written whole to a temporary file and renamed. Returns its layout."""
    header = dict(_header(fit), checksum=_CHECKSUM, layout=_LAYOUT)
    mask = np.ascontiguousarray(fit.mask, dtype=bool)
    header["mask_crc32"] = zlib.crc32(mask)
    reused = _same_store(path, header, fit)
    if reused is not None:
        return reused
    contents = _store_contents(fit)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # HDF5's metadata: the header, about 2 KiB a dataset, with margin.
    metadata = len(json.dumps(header)) + 4096 * (len(contents) + 1) + (1 << 16)
    _check_room(path, mask.nbytes + sum(a.nbytes for a in contents.values()) + metadata)
    failure = None
    try:
        with atomic_write(path) as tmp:
            layout = _allocate(tmp, header, mask, contents)
            with open(tmp, "r+b") as f:
                for name, values in contents.items():
                    _write_block(f, layout[name], 0, values)
                f.flush()
                os.fsync(f.fileno())
    except Exception as err:  # noqa: BLE001 - h5py raises RuntimeError too
        # The store's own message, with the cause atomic_write wrapped.
        cause = err.__cause__ if isinstance(err, WriteError) else None
        failure = (cause or err).with_traceback(None)
    if failure is not None:
        # Raised outside the except clause: the traceback keeps no h5py
        # object alive until interpreter teardown.
        raise _store_error(path, failure, "creating it", created=False)
    return layout


#: How a store's datasets lie in its file (its header's ``layout``): each
#: contiguous at a fixed offset, written by plain file writes after creation.
#: Stores without it (chunked, written through HDF5) are read, never written.
_LAYOUT = "contiguous"


def _allocate(path, header, mask, contents):
    """Create the HDF5 file: header, mask, and every dataset of ``contents``
    contiguous and allocated (not written). Returns the layout
    ``{name: (offset, dtype, shape)}``."""
    import h5py

    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    # Space at creation, at a fixed offset; the values are ours to write.
    plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    plist.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    layout = {}
    with h5py.File(path, "w") as store:
        store.attrs["header"] = json.dumps(header)
        store.create_dataset("mask", data=mask, compression="gzip")
        for name, values in contents.items():
            dataset = store.create_dataset(
                name, shape=values.shape, dtype=values.dtype, dcpl=plist
            )
            layout[name] = (dataset.id.get_offset(), values.dtype, values.shape)
    return layout


def _store_layout(path):
    """The layout of an existing store (as :func:`_allocate` returns it)."""
    import h5py

    with h5py.File(path, "r") as store:
        header = json.loads(store.attrs["header"])
        if header.get("layout") != _LAYOUT:
            raise ValueError(
                f"checkpoint {path} was written by an earlier dipy_spinverse and "
                "is read-only: resume it (dipy_spinverse.io.resume_fit), which "
                "writes a new store."
            )
        return {
            name: (store[name].id.get_offset(), store[name].dtype, store[name].shape)
            for name in store
            if name != "mask"
        }


def _same_store(path, header, fit):
    """The layout of the store at ``path`` if it holds ``fit`` as it stands
    (same header and statuses, values intact), else None."""
    if not os.path.isfile(path):
        return None
    try:
        stored, arrays = _read_fit(path)
        layout = _store_layout(path)
    except Exception:  # noqa: BLE001 - any store not readable is not this fit's
        return None
    names = _stored(fit)
    same = (
        json.dumps(stored, sort_keys=True) == json.dumps(header, sort_keys=True)
        and np.array_equal(arrays["mask"], fit.mask)
        and np.array_equal(arrays["status"], fit.params["status"])
        and set(layout) == {*names, *(_CRC_PREFIX + name for name in names)}
    )
    return layout if same else None


def _check_room(path, n_bytes):
    """Refuse to create a store the disk has no room for, before HDF5
    writes anything (HDF5 left with a full disk mid-write can crash)."""
    folder = os.path.dirname(os.path.abspath(path))
    need = int(n_bytes)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise _store_error(
            path,
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
            f"creating it needs {need / 1e6:.2f} MB, {folder} has "
            f"{free / 1e6:.2f} MB free",
            created=False,
        )


def _write_block(f, entry, first, values):
    """Write ``values`` as rows ``first, first + 1, ...`` of the dataset
    ``entry`` (offset, dtype, shape) of the open store file ``f``."""
    offset, dtype, shape = entry
    values = np.ascontiguousarray(values, dtype=dtype)
    if not values.size:
        return
    row_bytes = values[:1].nbytes
    step = max(1, _WRITE_BYTES // max(1, row_bytes))
    for start in range(0, len(values), step):
        f.seek(offset + (first + start) * row_bytes)
        f.write(values[start : start + step].data)


def _write_rows(fit, path, rows, layout):
    """Write the ``rows`` of ``fit.params`` to the store, each row with its
    CRC32, by plain file writes at the rows' offsets (``layout``).

    A write that fails (a full disk) raises a WriteError naming the store;
    the rows written before are intact: a voxel's values and checksums are
    on disk (``fsync``) before its status is written, so a voxel whose write
    failed stays ``PENDING``."""
    if not len(rows):
        return
    rows = np.sort(rows)
    span = f"rows {int(rows[0])}-{int(rows[-1])} of the mask's voxels"
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
    names = _stored(fit)
    failure = None
    try:
        with open(path, "r+b") as f:
            # Status last: a voxel is marked fitted only once its outputs
            # are in (its checksum just before: a voxel still PENDING is not
            # checked).
            for final in (False, True):
                for name in names:
                    if (name == "status") != final:
                        continue
                    for run in runs:
                        block = fit.params[name][run[0] : run[-1] + 1]
                        first = int(run[0])
                        crcs = _row_crcs(block)
                        _write_block(f, layout[_CRC_PREFIX + name], first, crcs)
                        _write_block(f, layout[name], first, block)
                f.flush()
                os.fsync(f.fileno())
    except OSError as err:
        failure = err.with_traceback(None)
    if failure is not None:
        raise _store_error(path, failure, span)


def _verify_store(path, header, arrays):
    """Refuse a store whose rows do not match their checksums (values
    overwritten or corrupted on disk); stores without checksums pass."""
    if header.get("checksum") != _CHECKSUM:
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
    for name in [*_FILL][::-1]:
        crcs = arrays.get(_CRC_PREFIX + name)
        if crcs is None or name not in arrays:
            continue
        bad = written[_row_crcs(arrays[name][written]) != crcs[written]]
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


def model_spec(model):
    """JSON-ready description of ``model``; :func:`model_from_spec` rebuilds it.

    The acquisitions are saved as the model's protocol (waveforms, b-values,
    directions), which is all a fit depends on.
    """
    configured = not isinstance(model.preset, str)
    spec = dict(
        grid=_grid_spec(model.grid),
        diffusivity=model.diffusivity,
        # A preset given as a configuration is saved whole, as options.
        preset=None if configured else model.preset,
        max_iter=None if configured else model.max_iter,
        batch_size=model.batch_size,
        device=str(model.device),
        dtype=str(model.dtype).replace("torch.", ""),
        options=model.config.as_dict() if configured else model.options,
        refine_mesh=model.refine_mesh,
        mesh_options=model.mesh_options,
        protocol=dict(
            bvals=model.protocol.bvals,
            bvecs=model.protocol.bvecs,
            waveforms=[_waveform_spec(w) for w in model.protocol.waveforms],
        ),
    )
    return json.loads(json.dumps(spec, default=_jsonable))


def model_from_spec(spec):
    """Rebuild the model that :func:`model_spec` described.

    A model saved on ``cuda`` is rebuilt on ``cpu`` when CUDA is absent (to
    inspect a fit; :func:`resume_fit` refuses to continue it there unless
    told ``device="cpu"``).
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
    grid = _grid_from_spec(spec["grid"])
    device = spec["device"]
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    options, preset = spec["options"], spec["preset"]
    if preset is None:  # a whole configuration was saved
        preset, options = InversionConfig.from_options(**options), {}
    return SpinverseModel(
        table,
        grid=grid,
        diffusivity=spec["diffusivity"],
        preset=preset,
        max_iter=spec["max_iter"],
        batch_size=spec["batch_size"],
        device=device,
        dtype=spec["dtype"],
        refine_mesh=spec.get("refine_mesh", False),
        mesh_options=spec.get("mesh_options"),
        **options,
    )


def _grid_spec(grid):
    """A grid's description: the BCC grid's parameters, and the geometry
    itself (vertices, tetrahedra, unwrapped corners) when ``grid`` is not
    the BCC grid of those parameters (a grid built by hand)."""
    spec = dict(
        size=grid.size,
        n=int(round(grid.size / grid.spacing)),
        boundary=grid.boundary,
        wall_permeability=grid.wall_permeability,
    )
    try:
        bcc = TetGrid.bcc(
            grid.size,
            spec["n"],
            boundary=grid.boundary,
            wall_permeability=grid.wall_permeability,
        )
    except ValueError:  # parameters no BCC grid has
        bcc = None
    same = bcc is not None and all(
        np.array_equal(getattr(bcc, name), getattr(grid, name))
        for name in ("vertices", "tets", "tet_coords")
    )
    if not same:
        spec.update(
            spacing=grid.spacing,
            vertices=grid.vertices,
            tets=grid.tets,
            tet_coords=grid.tet_coords,
        )
    return spec


def _grid_from_spec(spec):
    """The grid :func:`_grid_spec` described."""
    if "vertices" not in spec:
        return TetGrid.bcc(
            spec["size"],
            spec["n"],
            boundary=spec["boundary"],
            wall_permeability=spec["wall_permeability"],
        )
    return TetGrid(
        vertices=np.asarray(spec["vertices"], float).reshape(-1, 3),
        tets=np.asarray(spec["tets"], np.int64).reshape(-1, 4),
        size=float(spec["size"]),
        boundary=spec["boundary"],
        wall_permeability=float(spec["wall_permeability"]),
        spacing=float(spec["spacing"]),
        tet_coords=np.asarray(spec["tet_coords"], float).reshape(-1, 4, 3),
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
    for name in _SAVED_IF_PRESENT:
        if fit.params.get(name) is not None:
            arrays[name] = fit.params[name]
    arrays["header"] = np.array(json.dumps(_header(fit)))
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
    SpinverseFit
        ``fit.n_pending > 0`` for a partial fit; continue it with
        :func:`resume_fit`.

    Raises
    ------
    ValueError
        Naming ``path``: a missing, truncated or corrupted file, or one not
        written by :func:`save_fit` or :class:`Checkpoint`.
    """
    path = os.fspath(path)
    header, arrays = _read_fit(path)
    try:
        model = model_from_spec(header["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path}: the saved model cannot be rebuilt ({type(err).__name__}: "
            f"{err}); the file is damaged or was not written by save_fit."
        ) from err
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


def _read_fit(path):
    """The header and arrays of a fit file; a ValueError naming it if damaged."""
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
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise ValueError(f"{path} is not a Spinverse fit (format {found!r}).")
    if header.get("version", 0) > _VERSION:
        raise ValueError(
            f"{path} was written by a newer dipy_spinverse (format version "
            f"{header['version']} > {_VERSION}); upgrade dipy_spinverse."
        )
    missing = [name for name in _ARRAYS if name not in arrays]
    if missing or not isinstance(header.get("model"), dict):
        what = f"the arrays {missing}" if missing else "the model description"
        raise ValueError(f"{path} lacks {what}; the file is damaged.")
    _verify_store(path, header, arrays)
    return header, arrays


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


def resume_fit(path, data, *, mask=None, device=None, checkpoint=True, **fit_options):
    """Continue a partly finished volume fit saved at ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        The HDF5 store of a :class:`Checkpoint` (``.h5``), or a file from
        :func:`save_fit` (``.npz``).
    data : array_like (..., n_volumes)
        The same data the fit was started on.
    mask : array_like of bool, optional
        Must equal the saved mask when given.
    device : str, optional
        Run on another device than the saved one (e.g. ``"cuda"``, or
        ``"cpu"`` to continue a fit saved on ``cuda`` on a machine without
        CUDA). Default: the saved device.
    checkpoint : bool
        Keep saving progress: to ``path`` when it is a store, else to the
        store :func:`checkpoint_for` names beside it.
    **fit_options
        ``engine``, ``address``, ``n_jobs``, ``verbose``, ``vox_per_chunk``:
        as in :meth:`SpinverseModel.fit`.

    Returns
    -------
    SpinverseFit

    Raises
    ------
    ValueError
        The fit was saved on ``cuda`` and this machine has none (and
        ``device`` is not given): it is not continued on the CPU silently.
    """
    state = load_fit(path)
    saved = state.saved_device
    if device is None and torch.device(saved).type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{os.fspath(path)} was saved with device={saved!r}, but no CUDA "
                "device is available here; pass device='cpu' to resume_fit to "
                "continue on the CPU (slower), or resume on a machine with CUDA."
            )
        device = saved
    if device is not None:
        # Not model_from_spec's CPU fallback: a device asked for must exist.
        device = check_device(device)
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
        checkpoint=Checkpoint(checkpoint_for(path)) if checkpoint else None,
        resume=state,
        **fit_options,
    )


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


def save_posterior(fit, folder, *, affine=None, reference=None):
    """Write a posterior fit's maps as NIfTI images, one per file, in ``folder``.

    For each scalar descriptor ``<name>.nii.gz`` (the posterior median) and
    ``<name>_ci50.nii.gz`` / ``<name>_ci90.nii.gz`` (4-D, the low and high
    bounds of the 50 % and 90 % central credible intervals), then
    ``orientation.nii.gz`` (4-D, the mean principal axis) and
    ``posterior_status.nii.gz``. Each header's ``descrip`` names the
    quantity and its unit (:data:`dipy_spinverse.geometry.UNITS`); values are
    0 outside the mask and NaN where the status is not ``OK``. Written a
    volume at a time from the mask's voxels.

    Parameters
    ----------
    fit : PosteriorFit
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

    # File suffix: the columns of the stored quantiles (0.05, 0.25, 0.5,
    # 0.75, 0.95) it holds, and what they are.
    summaries = {
        "": (2, "median"),
        "_ci50": ([1, 3], "50% interval"),
        "_ci90": ([0, 4], "90% interval"),
    }
    for name in DESCRIPTORS:
        unit = f" ({UNITS[name]})" if UNITS[name] else ""
        if name == "orientation":
            write(name, params[name], "posterior mean principal axis (unit vector)")
            continue
        for suffix, (columns, what) in summaries.items():
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
