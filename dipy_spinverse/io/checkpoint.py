"""The checkpoint of a volume fit: an HDF5 store written a chunk at a time.

:class:`Checkpoint` is the ``checkpoint`` hook of the fits that resume
(:meth:`SpinverseModel.fit <dipy_spinverse.reconst.SpinverseModel.fit>`,
the protocol-free model's); a partly finished fit is read back by
:func:`~dipy_spinverse.io.fits.load_fit` (status ``PENDING`` on the voxels
still to fit), and :func:`resume_fit` continues a label search's.
"""

import errno
import json
import os
import shutil
import zlib

import numpy as np
import torch

from ..checks import check_device
from ..files import WriteError, atomic_write
from ..reconst import SpinverseFit
from .fits import (
    CHECKSUM,
    CRC_PREFIX,
    UNFITTED,
    fit_header,
    load_fit,
    read_fit_file,
    row_checksums,
)
from .specs import model_from_spec, model_spec

__all__ = ["Checkpoint", "checkpoint_for", "store_path", "resume_fit"]


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
        fix=f"{kept}: free space and run again to resume the fit from them (or "
        "fit again into another folder).",
    )


#: Bytes written at a time when a store is created (a volume's parameters
#: are never copied whole to bytes).
_WRITE_BYTES = 1 << 26


def _stored(fit):
    """The parameters ``fit``'s store holds, status last: the label search's
    in the order of :data:`~dipy_spinverse.io.fits.UNFITTED`, any other
    fit's in its own order."""
    order = [*UNFITTED, *fit.params]
    names = sorted(
        (name for name, values in fit.params.items() if values is not None),
        key=lambda name: (name == "status", order.index(name)),
    )
    return names


def _store_contents(fit):
    """The datasets of ``fit``'s store (the mask apart): each parameter and
    the CRC32 of each of its rows, status last."""
    contents = {}
    for name in _stored(fit):
        values = fit.params[name]
        contents[CRC_PREFIX + name] = row_checksums(values)
        contents[name] = np.ascontiguousarray(values)
    return contents


def _create_store(fit, path):
    """A store for ``fit`` at ``path``: the existing one when it holds this
    very fit (a resumed run writes on where it stopped), else a new one
    written whole to a temporary file and renamed. Returns its layout."""
    header = dict(fit_header(fit), checksum=CHECKSUM, layout=_LAYOUT)
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
        stored, arrays = read_fit_file(path)
        layout = _store_layout(path)
    except Exception:  # noqa: BLE001 - any store not readable is not this fit's
        return None
    names = _stored(fit)
    same = (
        json.dumps(stored, sort_keys=True) == json.dumps(header, sort_keys=True)
        and np.array_equal(arrays["mask"], fit.mask)
        and np.array_equal(arrays["status"], fit.params["status"])
        and set(layout) == {*names, *(CRC_PREFIX + name for name in names)}
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
                        crcs = row_checksums(block)
                        _write_block(f, layout[CRC_PREFIX + name], first, crcs)
                        _write_block(f, layout[name], first, block)
                f.flush()
                os.fsync(f.fileno())
    except OSError as err:
        failure = err.with_traceback(None)
    if failure is not None:
        raise _store_error(path, failure, span)


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
            noise_level=state.noise_level,
        )
    return state.model.fit(
        data,
        mask=mask,
        checkpoint=Checkpoint(checkpoint_for(path)) if checkpoint else None,
        resume=state,
        **fit_options,
    )
