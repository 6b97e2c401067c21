"""The voxel runner: fit many voxels, on one device or over parallel engines.

Voxels are fitted ``batch_size`` at a time through the batched inversion
(``engine="serial"``), or in chunks spread over processes or a cluster
(:mod:`.parallel`). A fit's noise level is found once from its data
(:func:`fit_noise`) and handed to every chunk, which passes the gate once
(:func:`.gate.admit`: each voxel's own noise, in the inversion's one form,
a :class:`~dipy_spinverse.inverse.noise.Noise` of that level and the voxels'
precisions, which :func:`~dipy_spinverse.inverse.reconstruct` reads).
A voxel's problem never stops the volume: it gets a status code
(:data:`~dipy_spinverse.reconst.codes.STATUS_CODES`) and NaN outputs; when the
inversion raises on a batch, its voxels are retried one by one. The fitted
voxels then get their warning statuses (:mod:`.status`, :mod:`.surfaces`)
and, with ``refine_mesh=True``, their smooth meshes (:mod:`.refinement`).
After every chunk an optional ``checkpoint(partial_fit, rows)`` hook sees
the fit so far; a partial fit resumes on the same data (:mod:`.resume`).
"""

import inspect
import numbers
import warnings

import numpy as np
import torch

from .. import clusters
from ..inverse import reconstruct
from ..masked import check_mask, is_mask_rows, volume_shape
from .codes import DIVERGED, FAILED, FITTED, MESH_NOT_REFINED, OK, PENDING, POOR_FIT
from .fit import SpinverseFit
from .gate import admit
from .noise import reference_noise, relative_noise, warn_noise
from .parallel import check_engine_options, chunk_share, chunks
from .progress import chunk_progress, progress_bar
from .refinement import refine_meshes
from .resume import check_resume, fingerprint
from .status import (
    count_negative,
    flag_implausible,
    poor_fits,
    warn_implausible,
    warn_negative,
)
from .surfaces import check_surfaces, flag_uncertain_surfaces, vouch_for_surfaces
from .voxels import OPTIONAL_PARAMETERS

__all__ = [
    "fit_noise",
    "fit_voxels",
    "fit_one",
    "fit_volume",
    "fit_chunk",
    "empty_params",
    "checkpoint_hook",
]


def fit_noise(settings, data, *, mask=None):
    """The relative noise level of a fit of ``data``
    (:func:`~dipy_spinverse.reconst.noise.reference_noise`), its SNR logged.

    Every loss of the fit is measured in it (the inversion's, its
    :attr:`~.fit.SpinverseFit.residual`; kept as
    :attr:`~.fit.SpinverseFit.noise_level`).

    Parameters
    ----------
    settings : SearchSettings
        The fit's settings (its ``sigma`` in the data's units).
    data : array_like
        The volume ``shape + (n_volumes,)``, the mask's rows, or (n,
        n_volumes) voxels.
    mask : array_like of bool, optional
        The voxels of the fit (default all).

    Returns
    -------
    float
        ``sigma`` over the median of the voxels' mean b = 0 signals; when
        ``sigma`` is not given, the configuration's own relative ``sigma``
        (0: unknown).

    Raises
    ------
    ValueError
        ``sigma`` is not below the median b = 0 signal.
    """
    if not settings.sigma > 0:
        return settings.config.loss.sigma
    b0 = np.flatnonzero(settings.protocol.bvals == 0)
    rows = np.asarray(data[..., b0], dtype=np.float64)  # b = 0 volumes only
    if mask is not None:
        mask = check_mask(mask, volume_shape(data, mask))
        rows = rows if is_mask_rows(data, mask) else rows[mask]
    s0 = rows.reshape(-1, len(b0)).mean(axis=-1)
    noise = reference_noise(settings.sigma, s0)
    if noise > 0:
        check = settings.surface_check
        snr_range = None if check is None else check.snr_range
        warn_noise(relative_noise(settings.sigma, s0), snr_range=snr_range)
    return noise


def fit_voxels(settings, data, *, noise, callback=None):
    """Fit (n, n_volumes) raw voxels; per-voxel problems become statuses.

    A function of the voxels, their noise and the fit's settings: it reads
    no model and returns arrays.

    Parameters
    ----------
    settings : SearchSettings
        The fit's settings (:meth:`SpinverseSearchModel.search_settings`).
    data : ndarray (n, n_volumes)
        The voxels' raw signals.
    noise : float
        The fit's relative noise level (:func:`fit_noise`, once per fit):
        the inversion's loss level, each voxel's own noise in its precisions
        (:func:`~dipy_spinverse.reconst.gate.admit`).
    callback : callable, optional
        The inversion's progress callback (:func:`chunk_progress`).

    Returns
    -------
    params : dict of ndarray
        The per-voxel parameters (:data:`~dipy_spinverse.reconst.voxels.PARAMETERS`)
        of shape (n, ...).
    history : dict or None
        The inversion's loss curves, when it ran once over all voxels.
    """
    gate = admit(
        data, settings.protocol, sigma=settings.sigma, level=noise, dtype=settings.dtype
    )
    result = empty_params(settings, len(gate.status))
    failed = ~gate.ok
    result["status"][failed] = gate.status[failed]
    valid = np.flatnonzero(gate.ok)
    signals = gate.signals
    history = None
    if len(valid):
        part, history = _reconstruct(
            settings, signals[valid], gate.noise.voxels(valid), callback
        )
        for key, value in part.items():
            if value is not None:
                result[key][valid] = value
        ok = valid[np.isin(part["status"], FITTED)]
        result["S0"][ok] = gate.S0[ok]
        result["S0_sequences"][ok] = gate.S0_sequences[ok]
        if settings.surface_check is not None and len(ok):
            check_surfaces(settings, signals[ok], gate.relative[ok], result, ok)
        vouch_for_surfaces(settings, result, ok, level=noise)
        flag_uncertain_surfaces(result, ok)
        flag_implausible(settings, gate.impossible[ok], result, ok)
        if settings.refine_mesh:
            refine_meshes(settings, signals, gate.noise, result, ok)
    return result, history


def _reconstruct(settings, signals, noise, callback=None):
    """Run the inversion on valid voxels (their :class:`Noise`); retry one by
    one if it raises."""
    n = len(signals)
    try:
        rec = reconstruct(
            settings.grid,
            signals,
            settings.protocol,
            data_noise=noise,
            preset=settings.config,
            diffusivity=settings.diffusivity,
            dtype=settings.dtype,
            device=settings.device,
            callback=callback,
        )
    except Exception as err:  # a voxel must never stop the volume
        if n > 1:
            one = [(signals[i : i + 1], noise.voxels([i])) for i in range(n)]
            parts = [_reconstruct(settings, *voxel, callback)[0] for voxel in one]
            return _merge(parts, np.concatenate), None
        warnings.warn(
            f"Spinverse fit of a voxel failed ({type(err).__name__}: {err}); "
            f"it is flagged with status {FAILED} (FAILED) and NaN outputs.",
            RuntimeWarning,
            stacklevel=2,
        )
        part = empty_params(settings, 1)
        part["status"][:] = FAILED
        return part, None
    permeability = np.asarray(rec.permeability, dtype=np.float64)
    predicted = np.asarray(rec.predicted, dtype=np.float64)
    loss = np.asarray(rec.loss, dtype=np.float64)
    poor = poor_fits(
        loss, settings.config, len(settings.protocol), level=rec.noise_level
    )
    good = (
        np.isfinite(permeability).all(-1)
        & np.isfinite(predicted).all(-1)
        & np.isfinite(loss)
    )
    poor &= good
    part = empty_params(settings, n)
    part["status"][:] = np.where(good, np.where(poor, POOR_FIT, OK), DIVERGED)
    part["permeability"][good] = permeability[good]
    part["predicted"][good] = predicted[good]
    part["loss"][good] = loss[good]
    for name in OPTIONAL_PARAMETERS:
        value = getattr(rec, name)
        if part[name] is not None and value is not None:
            part[name][good] = value[good]
    return part, rec.history


def empty_params(settings, shape):
    """Per-voxel parameters of ``shape`` (an int or a tuple), all PENDING.

    Parameters
    ----------
    settings : SearchSettings
        The fit's settings (its grid, protocol and options decide which
        parameters exist).
    shape : int or tuple of int
        The voxels' shape.

    Returns
    -------
    dict
        Per parameter an array of ``shape + (...)`` (NaN, -1 labels, status
        PENDING), or None where the settings do not produce it.
    """
    shape = (shape,) if isinstance(shape, numbers.Integral) else tuple(shape)
    labels = None
    if settings.has_labels:
        labels = np.full(shape + (settings.grid.n_cells,), -1, dtype=np.int16)
    searched = settings.config.searches_labels
    n_cells = settings.grid.n_cells
    return dict(
        permeability=np.full(shape + (settings.grid.n_faces,), np.nan),
        labels=labels,
        inside_probability=np.full(shape + (n_cells,), np.nan, np.float32)
        if searched
        else None,
        uncertainty=np.full(shape, np.nan) if searched else None,
        proposal_probability=np.full(shape + (n_cells,), np.nan, np.float32)
        if settings.config.uses_proposal
        else None,
        predicted=np.full(shape + (len(settings.protocol),), np.nan),
        S0=np.full(shape, np.nan),
        S0_sequences=np.full(shape + (settings.n_sequences,), np.nan),
        loss=np.full(shape, np.nan),
        status=np.full(shape, PENDING, dtype=np.int16),
        **_empty_mesh_params(settings, shape),
    )


def _empty_mesh_params(settings, shape):
    """The smooth mesh's parameters (None unless ``refine_mesh``)."""
    if not settings.refine_mesh:
        return dict(mesh_vertices=None, mesh_loss=None, mesh_status=None)
    n_vertices = int(settings.mesh_tets.max()) + 1
    return dict(
        mesh_vertices=np.full(shape + (n_vertices, 3), np.nan),
        mesh_loss=np.full(shape, np.nan),
        mesh_status=np.full(shape, MESH_NOT_REFINED, dtype=np.int16),
    )


def fit_volume(
    model,
    data,
    *,
    mask=None,
    engine="serial",
    address=None,
    n_jobs=None,
    verbose=False,
    vox_per_chunk=None,
    checkpoint=None,
    resume=None,
):
    """Fit a volume (..., n_volumes); see :meth:`SpinverseModel.fit`.

    Only the voxels of the mask are held: the parameters of the fit are
    ``(n_mask, ...)`` arrays, and each chunk of voxels is read from ``data``
    (any numeric dtype, never copied whole) and converted to float64 when it
    is fitted. ``data`` is the volume (``shape + (n_volumes,)``) or the rows
    of the mask only (``data[mask]``,
    :func:`~dipy_spinverse.masked.is_mask_rows`).

    Parameters
    ----------
    model : SpinverseSearchModel
        The model.
    data : array_like
        The volume ``shape + (n_volumes,)``, or the mask's rows.
    mask : array_like of bool, optional
        The voxels to fit; default all.
    engine : {"serial", "joblib", "dask", "ray"}, optional
        How the fit is spread.
    address : str or distributed.Client, optional
        The cluster of the Ray or Dask engine.
    n_jobs : int, optional
        Workers of a parallel engine.
    verbose : bool, optional
        Show a progress bar.
    vox_per_chunk : int, optional
        Voxels per chunk.
    checkpoint : callable, optional
        ``checkpoint(partial_fit, rows)`` at the start and after every chunk.
    resume : SpinverseFit, optional
        A partly finished fit of the same data and model to continue.

    Returns
    -------
    SpinverseFit
        Of shape ``mask.shape``.
    """
    on_cluster, n_workers, vox_per_chunk = check_engine_options(
        engine, address, n_jobs, vox_per_chunk
    )
    hook = checkpoint_hook(checkpoint)
    settings = model.search_settings()  # frozen once: every chunk reads these
    if resume is not None:
        check_resume(model, resume, data, mask)
        mask = resume.mask
        params = {
            k: (None if v is None else v.copy()) for k, v in resume.params.items()
        }
    else:
        mask = check_mask(mask, volume_shape(data, mask))
        params = empty_params(settings, int(mask.sum()))
    noise = fit_noise(settings, data, mask=mask)  # one level for the whole fit
    digest = fingerprint(data, mask)
    shape = mask.shape
    partial = SpinverseFit(model, params, mask, fingerprint=digest, noise_level=noise)
    # The volume index of each row of params, or None for data given as
    # the rows of the mask already.
    voxels = None if is_mask_rows(data, mask) else np.flatnonzero(mask)
    todo = np.flatnonzero(params["status"] == PENDING)
    if hook is not None:
        hook(partial, None)
    bar = progress_bar(len(todo), verbose)

    negative = [0]  # voxels of this call with a negative sample

    def load(rows):
        """The raw signal of ``rows`` of params, (len(rows), n_volumes)."""
        if voxels is None:
            chunk = data[rows]
        else:
            chunk = data[np.unravel_index(voxels[rows], shape)]
        negative[0] += count_negative(chunk)
        return chunk

    def done(rows, result):
        for key, value in result.items():
            if params[key] is not None and value is not None:
                params[key][rows] = value
        bar.update(len(rows) - bar_share[0])
        bar_share[0] = 0
        completed[0] += len(rows)
        bar.n = completed[0]  # whole voxels: no drift from the fractions
        if hook is not None:
            hook(partial, rows)

    bar_share = [0.0]  # the part of the current chunk already on the bar
    completed = [0]  # voxels stored
    try:
        if engine == "serial":
            size = vox_per_chunk or settings.batch_size
            for rows in chunks(todo, size):
                progress = None
                if verbose:
                    progress = chunk_progress(
                        bar, settings.config, len(rows), bar_share
                    )
                done(
                    rows,
                    fit_voxels(settings, load(rows), noise=noise, callback=progress)[0],
                )
        elif on_cluster:
            chunk = vox_per_chunk or chunk_share(settings, len(todo), n_workers)
            with clusters.open_cluster(engine, address, n_workers=n_workers) as cluster:
                if vox_per_chunk is None and address is not None:
                    chunk = chunk_share(settings, len(todo), cluster.slots)
                clusters.run_chunks(
                    cluster,
                    _fit_shared_chunk,
                    (settings, noise),
                    chunks(todo, chunk),
                    load=load,
                    done=done,
                    gpu=settings.device.type == "cuda",
                )
        else:
            chunk = vox_per_chunk or chunk_share(settings, len(todo), n_workers)
            # One chunk per worker at a time, so that the bar and the
            # checkpoint move as the workers finish (the pool of processes
            # is reused between calls).
            size = chunk * n_workers
            for rows in chunks(todo, size):
                result = _fit_parallel(
                    model,
                    load(rows),
                    noise=noise,
                    engine=engine,
                    n_jobs=n_workers,
                    chunk=chunk,
                )
                done(rows, result)
    finally:
        bar.close()
    warn_negative(model, negative[0], len(todo))
    warn_implausible(model, params["status"][todo])
    return partial


def fit_one(model, data, *, verbose=False):
    """Fit one raw voxel (n_volumes,); returns ``(params, history, noise)``.

    Parameters
    ----------
    model : SpinverseSearchModel
        The model.
    data : ndarray (n_volumes,)
        The voxel's raw signal.
    verbose : bool, optional
        Show a progress bar.

    Returns
    -------
    params : dict
        The voxel's parameters (each without the voxel axis).
    history : dict or None
        The inversion's loss curves.
    noise : float
        The fit's relative noise level (:func:`fit_noise`).
    """
    settings = model.search_settings()
    noise = fit_noise(settings, data[None])
    with progress_bar(1, verbose) as bar:
        progress = chunk_progress(bar, settings.config, 1, [0.0]) if verbose else None
        params, history = fit_voxels(
            settings, data[None], noise=noise, callback=progress
        )
        bar.n = 1
    warn_negative(model, count_negative(data[None]), 1)
    warn_implausible(model, params["status"])
    params = {k: None if v is None else v[0] for k, v in params.items()}
    return params, history, noise


def fit_chunk(settings, data, *, noise, device=None):
    """Fit (n, n_volumes) raw voxels on a cluster worker (its ``device``).

    The task of the Ray and Dask engines
    (:func:`~dipy_spinverse.clusters.run_chunks`): ``device`` is the
    worker's own GPU, or None to keep the settings'.

    Parameters
    ----------
    settings : SearchSettings
        The fit's settings.
    data : ndarray (n, n_volumes)
        The voxels' raw signals.
    noise : float
        The fit's relative noise level (:func:`fit_noise`).
    device : str or torch.device, optional
        The worker's device; None keeps the settings'.

    Returns
    -------
    dict of ndarray
        The per-voxel parameters, of shape (n, ...).
    """
    if device is not None and torch.device(device) != settings.device:
        settings = settings.on_device(device)
    return fit_voxels(settings, data, noise=noise)[0]


def _fit_shared_chunk(shared, data, *, device=None):
    """:func:`fit_chunk` of the cluster's shared ``(settings, noise)``: a
    task is a plain module-level function (Ray's ``remote`` takes no
    partial)."""
    settings, noise = shared
    return fit_chunk(settings, data, noise=noise, device=device)


def checkpoint_hook(checkpoint):
    """``hook(partial_fit, rows)`` calling ``checkpoint`` as it asks to be.

    A checkpoint takes ``(partial_fit, rows)``: ``rows`` are the rows of
    ``partial_fit.params`` fitted since the last call (None the first time:
    all of them), so that a store writes each chunk once
    (:class:`dipy_spinverse.io.Checkpoint`). A callable of one argument gets
    the partial fit alone.
    """
    if checkpoint is None:
        return None
    if not callable(checkpoint):
        raise ValueError(
            "checkpoint must be a callable checkpoint(partial_fit, rows), e.g. "
            "dipy_spinverse.io.Checkpoint('fit.h5'), got "
            f"{type(checkpoint).__name__}."
        )
    try:
        signature = inspect.signature(checkpoint)
        signature.bind(None, None)
    except TypeError:
        return lambda fit, rows: checkpoint(fit)
    except ValueError:  # no signature to inspect (a builtin): assume two
        pass
    return checkpoint


def _fit_parallel(model, data, *, noise, engine, n_jobs, chunk):
    """Fit (n, n_volumes) voxels over DIPY's ``multi_voxel_fit`` (joblib, dask)."""
    fits = model.fit_chunk(
        np.asarray(data, dtype=np.float64),
        noise=noise,
        engine=engine,
        n_jobs=n_jobs,
        vox_per_chunk=chunk,
        verbose=False,
    ).fit_array
    return _merge([fit.params for fit in fits], np.stack)


def _merge(parts, join):
    """One dict of per-voxel arrays from several, joined by ``join``."""
    return {
        key: None if parts[0][key] is None else join([p[key] for p in parts])
        for key in parts[0]
    }
