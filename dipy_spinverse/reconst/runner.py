"""The voxel runner: fit many voxels, on one device or over parallel engines.

Voxels are fitted ``batch_size`` at a time through the batched inversion
(``engine="serial"``), or in chunks spread over processes by DIPY's
:func:`~dipy.reconst.multi_voxel.multi_voxel_fit` (``"joblib"``, ``"dask"``,
``"ray"``). A voxel's problem never stops the volume: it gets a status code
(:data:`~dipy_spinverse.reconst.fit.STATUS_CODES`) and NaN outputs; when the
inversion raises on a batch, its voxels are retried one by one. With a known
noise level (``sigma > 0``) a fit whose residual is far above the noise keeps
its outputs with the warning status ``POOR_FIT`` (:func:`poor_fit_bound`),
and one whose surface the data do not determine (``uncertainty`` of
:data:`~dipy_spinverse.reconst.fit.UNCERTAIN_SURFACE_LEVEL` or more, after
the surface check when the model has one; 1 for an answer that misfits
beyond the noise, :func:`vouch_for_surfaces`) with ``UNCERTAIN_SURFACE``.
With or without ``sigma``, a voxel whose attenuation is above 1 beyond the
noise keeps its outputs with the warning status ``IMPOSSIBLE_SIGNAL``, and
every fitted voxel of a protocol that cannot determine the membranes with
``UNDERDETERMINED`` (:func:`flag_implausible`; one warning per fit,
:func:`warn_implausible`). After every chunk an optional
``checkpoint(partial_fit)`` hook sees the fit so far.
"""

import copy
import hashlib
import inspect
import math
import numbers
import os
import warnings

import numpy as np
import torch
from dipy.utils.logging import logger
from scipy.stats import chi2
from tqdm import tqdm

from ..checks import check_int, check_mask_values
from ..inverse import reconstruct
from ..inverse.uncertainty import WITHIN_NOISE_FALSE_ALARM
from ..meshfit.refine import refine_cell
from . import engines
from .fit import (
    DIVERGED,
    FAILED,
    FITTED,
    IMPOSSIBLE_SIGNAL,
    MESH_FAILED,
    MESH_NO_CELL,
    MESH_NOT_REFINED,
    MESH_OK,
    OK,
    OPTIONAL_PARAMETERS,
    PENDING,
    POOR_FIT,
    POOR_FIT_FALSE_ALARM,
    UNCERTAIN_SURFACE,
    UNCERTAIN_SURFACE_LEVEL,
    UNDERDETERMINED,
    SpinverseFit,
)
from .gate import admit
from .posterior import surface_volume_bound

__all__ = [
    "PARALLEL_ENGINES",
    "POOR_FIT_FALSE_ALARM",
    "SURFACE_MISFIT_FALSE_ALARM",
    "fit_voxels",
    "fit_one",
    "fit_volume",
    "check_engine_options",
    "fit_chunk",
    "check_resume",
    "fingerprint",
    "is_mask_rows",
    "volume_shape",
    "poor_fit_bound",
    "poor_fits",
    "vouch_for_surfaces",
    "flag_uncertain_surfaces",
    "flag_implausible",
    "warn_implausible",
]

#: Ways to spread a volume fit: one device, joblib processes (DIPY's
#: ``multi_voxel_fit``), or a Ray or Dask cluster (:mod:`.engines`).
PARALLEL_ENGINES = ("serial", "joblib", "dask", "ray")

#: Bytes of float64 hashed at a time by :func:`fingerprint`.
FINGERPRINT_BYTES = 1 << 24

#: False-alarm rate of the misfit test that withholds trust from a label
#: search's surface (:func:`vouch_for_surfaces`). An answer whose misfit the
#: noise explains at this level is not rejected; one beyond it is not the
#: labelling that made the data, and the search did not find that one. On
#: the held-out random cells and published shapes of
#: ``benchmarks/surface_check.py`` at SNR 100 (before the search's open faces
#: were made free water), wrong answers' chi-square over 99 acquisitions ran
#: from 90 to 300 and exact answers' from 81 to 116; the conventional 5 %
#: level (123 for 99 acquisitions) is strict where a confident wrong surface
#: costs most. The label search keeps rivals that fit within the noise at
#: the same level
#: (:data:`~dipy_spinverse.inverse.uncertainty.WITHIN_NOISE_FALSE_ALARM`).
SURFACE_MISFIT_FALSE_ALARM = WITHIN_NOISE_FALSE_ALARM


def poor_fit_bound(n_acquisitions, sigma, *, false_alarm=POOR_FIT_FALSE_ALARM):
    """Largest mean squared misfit of a fit consistent with the noise.

    ``sigma^2 * chi2.isf(false_alarm, n) / n``, see
    :data:`POOR_FIT_FALSE_ALARM`; ``inf`` when ``sigma`` is 0 (unknown).

    Parameters
    ----------
    n_acquisitions : int
        Acquisitions in the misfit (n).
    sigma : float
        Noise relative to the b = 0 signal (1/SNR).
    false_alarm : float
        Share of the fits that explain the data which lie above the bound.

    Returns
    -------
    float
    """
    if not sigma > 0:
        return math.inf
    n = check_int(n_acquisitions, "n_acquisitions", 1)
    return float(sigma**2 * chi2.isf(false_alarm, n) / n)


def fit_voxels(model, data, *, callback=None):
    """Fit (n, n_volumes) raw voxels; per-voxel problems become statuses.

    Returns
    -------
    params : dict of ndarray
        The per-voxel parameters (:data:`~dipy_spinverse.reconst.fit.PARAMETERS`)
        of shape (n, ...).
    history : dict or None
        The inversion's loss curves, when it ran once over all voxels.
    """
    gate = admit(data, model.protocol, sigma=model.config.loss.sigma, dtype=model.dtype)
    result = empty_params(model, len(gate.status))
    failed = ~gate.ok
    result["status"][failed] = gate.status[failed]
    valid = np.flatnonzero(gate.ok)
    signals = gate.signals
    history = None
    if len(valid):
        part, history = _reconstruct(model, signals[valid], callback)
        for key, value in part.items():
            if value is not None:
                result[key][valid] = value
        ok = valid[np.isin(part["status"], FITTED)]
        result["S0"][ok] = gate.S0[ok]
        result["S0_sequences"][ok] = gate.S0_sequences[ok]
        if model.surface_check and len(ok):
            check_surfaces(model, signals[ok], result, ok)
        vouch_for_surfaces(model, result, ok)
        flag_uncertain_surfaces(result, ok)
        flag_implausible(model, gate.impossible[ok], result, ok)
        if model.refine_mesh:
            refine_meshes(model, signals, result, ok)
    return result, history


def check_surfaces(model, signals, result, rows):
    """The surface check (``prior=`` with the search): raise each answer's
    ``uncertainty`` to the posterior's volume bound
    (:func:`~dipy_spinverse.reconst.posterior.surface_volume_bound`), in
    place; 1 where the signal lies outside the check's prior."""
    grid = model.grid
    inside = result["labels"][rows] > 0
    fractions = inside @ grid.cell_volumes / grid.volume
    bound, outside = surface_volume_bound(
        model, signals, fractions, n_samples=model.n_posterior_samples
    )
    result["uncertainty"][rows] = np.fmax(result["uncertainty"][rows], bound)
    if outside.any():
        logger.warning(
            f"{int(outside.sum())} of {len(rows)} voxels lie outside the surface "
            f"check's prior ({model.prior.prior!r}): nothing vouches for their "
            "surfaces, whose uncertainty is set to 1."
        )


def vouch_for_surfaces(model, result, rows):
    """Uncertainty 1 for the label search's answers the data reject (in place).

    ``rows``: the fitted voxels (status OK or POOR_FIT).

    The search's own uncertainty weighs the labellings it scored near its
    answer; an answer in a wrong basin has no near rival and looks certain
    (on held-out random cells, 5 of 12 wrong answers had uncertainty below
    0.1). Its misfit gives it away: a labelling that made the data fits
    them within the noise, so an answer whose chi-square exceeds the noise's
    :data:`SURFACE_MISFIT_FALSE_ALARM` quantile is not that labelling, and
    the one that is was not found. Nothing vouches for such a surface: its
    uncertainty is 1, as outside the surface check's prior. Without
    ``sigma`` no misfit can be tested, and no surface is vouched for.
    """
    if result["uncertainty"] is None or not len(rows):
        return
    sigma = model.config.loss.sigma
    if not sigma > 0:  # the model warned when it was made
        result["uncertainty"][rows] = 1.0
        return
    bound = poor_fit_bound(
        len(model.protocol), sigma, false_alarm=SURFACE_MISFIT_FALSE_ALARM
    )
    # POOR_FIT answers are beyond this bound too: their maps are kept, not
    # their surfaces.
    mse = result["loss"][rows] / model.config.loss.loss_scale
    rejected = rows[mse > bound]
    result["uncertainty"][rejected] = 1.0
    if len(rejected):
        logger.warning(
            f"{len(rejected)} of {len(rows)} voxels: the label search's answer "
            "misfits the data beyond the noise (chi-square above its "
            f"{1 - SURFACE_MISFIT_FALSE_ALARM:.0%} quantile), so a better labelling "
            "exists that the search did not find; their surfaces are not vouched "
            f"for (uncertainty 1; status {UNCERTAIN_SURFACE} unless another "
            "warning status applies)."
        )


def flag_uncertain_surfaces(result, rows):
    """Status ``UNCERTAIN_SURFACE`` for the ``OK`` voxels of ``rows`` whose
    uncertainty reaches :data:`UNCERTAIN_SURFACE_LEVEL` (in place)."""
    if result["uncertainty"] is None or not len(rows):
        return
    ok = result["status"][rows] == OK
    uncertain = ok & (result["uncertainty"][rows] >= UNCERTAIN_SURFACE_LEVEL)
    result["status"][rows[uncertain]] = UNCERTAIN_SURFACE


def flag_implausible(model, impossible, result, rows):
    """Statuses ``IMPOSSIBLE_SIGNAL`` and ``UNDERDETERMINED`` of the fitted
    voxels ``rows`` (in place), over the fit's own warning statuses.

    ``impossible``: whether each of those voxels' attenuation exceeds 1
    beyond the noise (the gate's test,
    :func:`~dipy_spinverse.reconst.plausibility.impossible_signal`, with the
    model's ``sigma`` or, without it, the voxel's own spread); they get
    ``IMPOSSIBLE_SIGNAL``. Where the protocol cannot determine the membranes
    (``model.protocol_problems``), every other fitted voxel gets
    ``UNDERDETERMINED``. Both outrank ``POOR_FIT`` and ``UNCERTAIN_SURFACE``,
    which follow from them (the precedence of
    :mod:`~dipy_spinverse.reconst.fit`); the voxels keep their outputs.
    """
    if not len(rows):
        return
    status = result["status"]
    if model.protocol_problems:
        status[rows] = UNDERDETERMINED
    status[rows[impossible]] = IMPOSSIBLE_SIGNAL


def warn_implausible(model, status):
    """Warn once per fit of its ``IMPOSSIBLE_SIGNAL`` and ``UNDERDETERMINED``
    voxels (``status``: the statuses of the voxels the fit ran on), naming
    the cause and the fix."""
    status = np.asarray(status)
    impossible = int(np.count_nonzero(status == IMPOSSIBLE_SIGNAL))
    if impossible:
        kept = (
            "their maps are NaN, as outside the prior"
            if model.fit_method == "posterior"
            else "their outputs are kept, fitted to data no membranes made"
        )
        warnings.warn(
            f"{impossible} of {status.size} voxels have an attenuation above 1 "
            "beyond the noise, which no tissue produces; they have status "
            f"{IMPOSSIBLE_SIGNAL} (IMPOSSIBLE_SIGNAL) and {kept}. Check that the "
            "data's volumes are in the order of the gradient table and that its "
            "b = 0 volumes are the data's (b-values, b0_threshold).",
            RuntimeWarning,
            stacklevel=4,  # the user's model.fit call
        )
    underdetermined = int(np.count_nonzero(status == UNDERDETERMINED))
    if underdetermined:
        warnings.warn(
            "the protocol cannot determine the membranes: "
            + "; ".join(model.protocol_problems)
            + f". {underdetermined} of {status.size} voxels have status "
            f"{UNDERDETERMINED} (UNDERDETERMINED): their outputs are one of many "
            "answers that fit the data.",
            RuntimeWarning,
            stacklevel=4,
        )


def refine_meshes(model, signals, result, rows):
    """Smooth meshes of the largest cell of ``rows`` (``refine_mesh=True``).

    Fills ``result``'s mesh parameters in place. A voxel without a labelled
    cell gets ``MESH_NO_CELL``; a refinement that raises gets
    ``MESH_FAILED`` and a warning, and the voxel's fit is kept.
    """
    config = model.config
    for row in rows:
        labels = result["labels"][row]
        if labels.max(initial=0) < 1:
            result["mesh_status"][row] = MESH_NO_CELL
            continue
        try:
            fit = refine_cell(
                model.grid,
                labels,
                result["permeability"][row],
                signals[[row]],
                model.protocol,
                diffusivity=model.diffusivity,
                sigma=config.loss.sigma,
                noise=config.loss.noise,
                options=model.mesh_options,
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


def poor_fits(loss, config, n_acquisitions):
    """Whether each fit's data loss is beyond the noise (status ``POOR_FIT``).

    Parameters
    ----------
    loss : ndarray (n,)
        The fits' data terms (:attr:`Reconstruction.loss`).
    config : InversionConfig
    n_acquisitions : int

    Returns
    -------
    ndarray of bool (n,)
        ``loss / loss_scale`` above :func:`poor_fit_bound`.
    """
    bound = poor_fit_bound(n_acquisitions, config.loss.sigma)
    return np.isfinite(loss) & (loss / config.loss.loss_scale > bound)


def _reconstruct(model, signals, callback=None):
    """Run the inversion on valid voxels; retry one by one if it raises."""
    n = len(signals)
    try:
        rec = reconstruct(
            model.grid,
            signals,
            model.protocol,
            preset=model.config,
            diffusivity=model.diffusivity,
            dtype=model.dtype,
            device=model.device,
            callback=callback,
        )
    except Exception as err:  # a voxel must never stop the volume
        if n > 1:
            parts = [
                _reconstruct(model, signals[i : i + 1], callback)[0] for i in range(n)
            ]
            return _merge(parts, np.concatenate), None
        warnings.warn(
            f"Spinverse fit of a voxel failed ({type(err).__name__}: {err}); "
            f"it is flagged with status {FAILED} (FAILED) and NaN outputs.",
            RuntimeWarning,
            stacklevel=2,
        )
        part = empty_params(model, 1)
        part["status"][:] = FAILED
        return part, None
    permeability = np.asarray(rec.permeability, dtype=np.float64)
    predicted = np.asarray(rec.predicted, dtype=np.float64)
    loss = np.asarray(rec.loss, dtype=np.float64)
    poor = poor_fits(loss, model.config, len(model.protocol))
    good = (
        np.isfinite(permeability).all(-1)
        & np.isfinite(predicted).all(-1)
        & np.isfinite(loss)
    )
    poor &= good
    part = empty_params(model, n)
    part["status"][:] = np.where(good, np.where(poor, POOR_FIT, OK), DIVERGED)
    part["permeability"][good] = permeability[good]
    part["predicted"][good] = predicted[good]
    part["loss"][good] = loss[good]
    for name in OPTIONAL_PARAMETERS:
        value = getattr(rec, name)
        if part[name] is not None and value is not None:
            part[name][good] = value[good]
    return part, rec.history


def empty_params(model, shape):
    """Per-voxel parameters of ``shape`` (an int or a tuple), all PENDING."""
    shape = (shape,) if isinstance(shape, numbers.Integral) else tuple(shape)
    labels = None
    if model.has_labels:
        labels = np.full(shape + (model.grid.n_cells,), -1, dtype=np.int16)
    searched = model.config.searches_labels
    n_cells = model.grid.n_cells
    return dict(
        permeability=np.full(shape + (model.grid.n_faces,), np.nan),
        labels=labels,
        inside_probability=np.full(shape + (n_cells,), np.nan, np.float32)
        if searched
        else None,
        uncertainty=np.full(shape, np.nan) if searched else None,
        proposal_probability=np.full(shape + (n_cells,), np.nan, np.float32)
        if model.config.uses_proposal
        else None,
        predicted=np.full(shape + (len(model.protocol),), np.nan),
        S0=np.full(shape, np.nan),
        S0_sequences=np.full(shape + (len(model.sequences),), np.nan),
        loss=np.full(shape, np.nan),
        status=np.full(shape, PENDING, dtype=np.int16),
        **_empty_mesh_params(model, shape),
    )


def _empty_mesh_params(model, shape):
    """The smooth mesh's parameters (None unless ``refine_mesh``)."""
    if not model.refine_mesh:
        return dict(mesh_vertices=None, mesh_loss=None, mesh_status=None)
    n_vertices = int(model.mesh_tets.max()) + 1
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
    of the mask only (``data[mask]``, :func:`is_mask_rows`).
    """
    on_cluster, n_workers, vox_per_chunk = check_engine_options(
        engine, address, n_jobs, vox_per_chunk
    )
    hook = _checkpoint_hook(checkpoint)
    if resume is not None:
        check_resume(model, resume, data, mask)
        mask = resume.mask
        params = {
            k: (None if v is None else v.copy()) for k, v in resume.params.items()
        }
    else:
        mask = check_mask(mask, volume_shape(data, mask))
        params = empty_params(model, int(mask.sum()))
    digest = fingerprint(data, mask)
    shape = mask.shape
    partial = SpinverseFit(model, params, mask, fingerprint=digest)
    # The volume index of each row of params, or None for data given as
    # the rows of the mask already.
    voxels = None if is_mask_rows(data, mask) else np.flatnonzero(mask)
    todo = np.flatnonzero(params["status"] == PENDING)
    if hook is not None:
        hook(partial, None)
    bar = _bar(len(todo), verbose)

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
            size = vox_per_chunk or model.batch_size
            for rows in _chunks(todo, size):
                progress = None
                if verbose:
                    progress = _progress(bar, model, len(rows), bar_share)
                done(rows, fit_voxels(model, load(rows), callback=progress)[0])
        elif on_cluster:
            chunk = vox_per_chunk or _share(model, len(todo), n_workers)
            with engines.open_cluster(engine, address, n_workers=n_workers) as cluster:
                if vox_per_chunk is None and address is not None:
                    chunk = _share(model, len(todo), cluster.slots)
                engines.run_chunks(
                    cluster,
                    fit_chunk,
                    model,
                    _chunks(todo, chunk),
                    load=load,
                    done=done,
                    gpu=model.device.type == "cuda",
                )
        else:
            chunk = vox_per_chunk or _share(model, len(todo), n_workers)
            # One chunk per worker at a time, so that the bar and the
            # checkpoint move as the workers finish (the pool of processes
            # is reused between calls).
            size = chunk * n_workers
            for rows in _chunks(todo, size):
                result = _fit_parallel(
                    model, load(rows), engine=engine, n_jobs=n_workers, chunk=chunk
                )
                done(rows, result)
    finally:
        bar.close()
    warn_negative(model, negative[0], len(todo))
    warn_implausible(model, params["status"][todo])
    return partial


def fit_one(model, data, *, verbose=False):
    """Fit one raw voxel (n_volumes,); returns ``(params, history)``."""
    with _bar(1, verbose) as bar:
        progress = _progress(bar, model, 1, [0.0]) if verbose else None
        params, history = fit_voxels(model, data[None], callback=progress)
        bar.n = 1
    warn_negative(model, count_negative(data[None]), 1)
    warn_implausible(model, params["status"])
    return {k: None if v is None else v[0] for k, v in params.items()}, history


def count_negative(data):
    """How many voxels of (n, n_volumes) ``data`` have a sample below 0."""
    with np.errstate(invalid="ignore"):  # NaN voxels are counted elsewhere
        return int(np.count_nonzero((np.asarray(data) < 0).any(axis=-1)))


def warn_negative(model, n_negative, n_voxels):
    """Warn that ``n_negative`` of ``n_voxels`` fitted voxels hold values < 0.

    Magnitude images cannot be negative; denoised or real-valued
    (phase-corrected) data can. Such voxels are fitted as given, neither
    clipped nor flagged; the warning says so, and that the Rician noise
    floor (``noise="rician"``) describes magnitude data only.
    """
    if not n_negative:
        return
    floor = ""
    if model.config.loss.noise == "rician" and model.config.loss.sigma > 0:
        floor = (
            "; the Rician noise floor of noise='rician' describes magnitude "
            "data: for real-valued data use noise='gaussian'"
        )
    warnings.warn(
        f"{n_negative} of {n_voxels} voxels have negative samples (magnitude "
        f"images cannot be negative: denoised or real-valued data?). Negative "
        f"samples are fitted as given, not clipped{floor}.",
        UserWarning,
        stacklevel=4,  # the user's model.fit call
    )


def check_engine_options(engine, address, n_jobs, vox_per_chunk):
    """Check the options that spread a fit (see :meth:`SpinverseModel.fit`).

    Returns
    -------
    on_cluster : bool
        Whether ``engine`` runs on a Ray or Dask cluster.
    n_workers : int
        The workers ``n_jobs`` asks for.
    vox_per_chunk : int or None
    """
    if engine not in PARALLEL_ENGINES:
        raise ValueError(
            f"Invalid engine {engine!r}. Must be one of {PARALLEL_ENGINES}."
        )
    on_cluster = _check_engine_installed(engine, address)
    if engine == "serial" and n_jobs is not None:
        raise ValueError(
            f"n_jobs={n_jobs!r} is for the parallel engines (joblib, dask, ray); "
            "engine='serial' fits batch_size voxels at a time on one device. "
            "Pass a parallel engine, or leave n_jobs out."
        )
    n_workers = _n_workers(n_jobs)
    if vox_per_chunk is not None:
        vox_per_chunk = check_int(vox_per_chunk, "vox_per_chunk", 1)
    return on_cluster, n_workers, vox_per_chunk


def _bar(total, verbose):
    """The progress bar over ``total`` voxels (hidden unless ``verbose``)."""
    return tqdm(
        total=total,
        disable=not verbose,
        desc="Fitting Spinverse",
        unit="voxel",
        # Fractions of a voxel: a chunk moves on as its voxels are fitted.
        bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}{postfix}]",
    )


def fit_chunk(model, data, *, device=None):
    """Fit (n, n_volumes) raw voxels on a cluster worker (its ``device``).

    The task of the Ray and Dask engines
    (:func:`~dipy_spinverse.reconst.engines.run_chunks`): ``device`` is the
    worker's own GPU, or None to keep the model's.
    """
    if device is not None and torch.device(device) != model.device:
        model = copy.copy(model)
        model.device = torch.device(device)
    return fit_voxels(model, data)[0]


def _chunks(rows, size):
    """Consecutive pieces of ``rows`` of at most ``size``."""
    return (rows[start : start + size] for start in range(0, len(rows), size))


def _share(model, n_voxels, n_workers):
    """Voxels per chunk: ``batch_size``, or an equal share of each worker."""
    return max(1, min(model.batch_size, math.ceil(n_voxels / n_workers)))


def _checkpoint_hook(checkpoint):
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


def _fit_parallel(model, data, *, engine, n_jobs, chunk):
    """Fit (n, n_volumes) voxels over DIPY's ``multi_voxel_fit`` (joblib, dask)."""
    fits = model.fit_chunk(
        np.asarray(data, dtype=np.float64),
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


def share_cores(n_workers, main_pid):
    """In a worker process, use this worker's share of the cores."""
    if os.getpid() == main_pid or not n_workers:
        return
    torch.set_num_threads(max(1, _cores() // int(n_workers)))


def is_mask_rows(data, mask):
    """Whether ``data`` holds the voxels of ``mask`` only, ``(n_mask, n_volumes)``
    (``volume[mask]``), rather than a volume of ``mask.shape``.

    Never ambiguous: when both readings fit, the mask selects every voxel of
    a 1-D volume and the two are the same array.
    """
    if mask is None or np.ndim(mask) == 0:
        return False
    mask_shape = np.shape(mask)
    return (
        np.ndim(data) == 2
        and np.shape(data)[:-1] != mask_shape
        and len(data) == int(np.count_nonzero(mask))
    )


def volume_shape(data, mask=None):
    """The voxel shape of the volume ``data`` stands for (see :func:`is_mask_rows`)."""
    return np.shape(mask) if is_mask_rows(data, mask) else np.shape(data)[:-1]


def fingerprint(data, mask=None):
    """SHA-1 of the voxels of ``mask`` (float64, C order) and the volume's shape.

    ``data`` is a volume or the rows of the mask (:func:`is_mask_rows`);
    both give the same digest, which is that of ``data[mask]``'s bytes, so
    a fit started on a volume resumes on the mask's rows read from its file.
    Without a mask every voxel counts (the digest of the whole array).
    Hashed a slab of the first axis at a time (about ``FINGERPRINT_BYTES``
    as float64), so that the data are never copied whole to float64.
    """
    data = np.asarray(data)
    digest = hashlib.sha1()
    if data.ndim == 0:
        digest.update(np.float64(data).tobytes())
        return digest.hexdigest()
    rows = is_mask_rows(data, mask)
    shape = tuple(np.shape(mask)) + data.shape[-1:] if rows else data.shape
    whole = rows or mask is None
    if not whole:
        mask = np.asarray(mask, dtype=bool)
    per_row = max(1, data[:1].size * 8)
    step = max(1, FINGERPRINT_BYTES // per_row)
    for start in range(0, len(data), step):
        slab = data[start : start + step]
        if not whole:
            slab = slab[mask[start : start + step]]
        # The array's own buffer: no second copy of the slab as bytes.
        digest.update(np.ascontiguousarray(slab, dtype=np.float64).data)
    digest.update(str(shape).encode())
    return digest.hexdigest()


def check_mask(mask, shape):
    """A boolean mask of ``shape`` (all True when None)."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != shape:
        one = " (for one voxel, 1-D data, a single bool)" if shape == () else ""
        raise ValueError(
            f"mask has shape {mask.shape} but data has {shape} voxels; pass a mask "
            f"of shape data.shape[:-1]{one}."
        )
    return check_mask_values(mask)


def check_resume(model, resume, data, mask=None, *, digest=None):
    """Raise a ValueError unless ``model`` can continue ``resume`` on ``data``.

    ``resume`` must be a partial volume fit of the same data (shape and
    :func:`fingerprint`), mask (when given) and model settings
    (:meth:`SpinverseModel.differences`).

    Parameters
    ----------
    model : SpinverseModel
    resume : SpinverseFit
    data : ndarray (..., n_volumes) or (n_mask, n_volumes)
        The volume, or the rows of its mask (:func:`is_mask_rows`).
    mask : array_like of bool, optional
    digest : str, optional
        ``fingerprint(data, resume.mask)`` when already known.
    """
    if not isinstance(resume, SpinverseFit) or resume.shape == ():
        raise ValueError(
            "resume must be a partly finished volume SpinverseFit (load a saved "
            "one with dipy_spinverse.io.load_fit, or use dipy_spinverse.io."
            f"resume_fit), got {type(resume).__name__}."
        )
    shape = volume_shape(data, resume.mask if mask is None else mask)
    if resume.shape != shape:
        raise ValueError(
            f"resume is a fit of shape {resume.shape} but data has {shape} "
            "voxels; resume with the same data the fit was started on."
        )
    if resume.fingerprint is None:
        raise ValueError(
            "resume holds no record of the data it was fitted on (a part of a "
            "fit, fit[...], or a SpinverseFit built without fingerprint), so "
            "its data cannot be checked; resume the whole fit that "
            "dipy_spinverse.io.load_fit reads, or fit these voxels afresh."
        )
    # The mask first: data given as the rows of another mask cannot even be
    # hashed as the saved mask's voxels.
    if mask is not None and not np.array_equal(check_mask(mask, shape), resume.mask):
        raise ValueError(
            "mask differs from the mask of the fit being resumed; pass the "
            "same mask, or mask=None to reuse the saved one."
        )
    if np.ndim(data) == 2 and np.shape(data)[:-1] != shape:
        if not is_mask_rows(data, resume.mask):
            raise ValueError(
                f"data hold {len(data)} voxels, but the mask of the fit being "
                f"resumed selects {int(resume.mask.sum())}; resume with the same "
                "data and mask the fit was started on."
            )
    if digest is None:
        digest = fingerprint(data, resume.mask)
    if resume.fingerprint != digest:
        raise ValueError(
            "data differ from the data the fit being resumed was started on; "
            "resume with the same data (same values, same order)."
        )
    differ = model.differences(resume.model)
    if differ:
        raise ValueError(
            f"the fit being resumed was made with different model settings "
            f"({', '.join(differ)}); resume with the model it was started with "
            "(dipy_spinverse.io.resume_fit rebuilds it from the saved file)."
        )


def _progress(bar, model, n_rows, shown):
    """Inversion callback moving the bar through a chunk of ``n_rows`` voxels.

    The face fit moves the bar through its share of the chunk iteration by
    iteration (all of it, or half when the label search follows); the label
    search moves it by a voxel's other half when that voxel's search ends
    (when the search reports it, ``{"voxel_done": index}``) and counts its
    steps on the bar. ``shown[0]`` is what the bar shows of this chunk; the
    runner completes the chunk when it is stored.
    """
    config = model.config
    face_share = 0.5 if config.searches_labels else 1.0
    steps = [0, set()]  # search steps so far, voxels whose search ended

    base = bar.n  # voxels stored before this chunk

    def move(position):
        position = min(position, n_rows)
        if position > shown[0]:
            bar.update(position - shown[0])
            # Set, not summed: sums of fractions could pass the chunk's end.
            bar.n = base + position
            shown[0] = position

    def callback(iteration, permeability, losses):
        if "voxel_done" in losses:
            steps[1].add(losses["voxel_done"])
            move(n_rows * face_share + len(steps[1]) * (1 - face_share))
            return
        if "search" in losses:  # a step of one voxel's label search
            steps[0] += 1
            text = (
                f"label search: {steps[0]} steps, voxel {losses['voxel'] + 1}/"
                f"{n_rows} at step {iteration + 1}, loss {losses['search']:.3g}"
            )
            bar.set_postfix_str(text, refresh=steps[0] % 10 == 0)
            return
        text = (
            f"face fit: iteration {iteration + 1}/{config.face.n_iterations}, "
            f"data loss {losses.get('data', float('nan')):.3g}"
        )
        bar.set_postfix_str(text, refresh=False)
        move(n_rows * face_share * min(1.0, (iteration + 1) / config.face.n_iterations))

    return callback


def _check_engine_installed(engine, address):
    """Whether ``engine`` runs on a cluster; a ValueError if it cannot run.

    Ray always runs on a cluster (a local one by default). Dask does when
    ``distributed`` is installed or an ``address`` is given; without both it
    runs on local threads through DIPY's ``multi_voxel_fit``.
    """
    import importlib.util

    if engine == "serial":
        if address is not None:
            raise ValueError(
                f"address={address!r} is for engine='ray' or engine='dask'; "
                "pass one of those engines, or leave address out."
            )
        return False
    if engine == "joblib":
        if address is not None:
            raise ValueError(
                "engine='joblib' runs on this machine and takes no address; use "
                "engine='ray' or engine='dask' for a cluster."
            )
        if importlib.util.find_spec("joblib") is None:
            raise ValueError(
                "engine='joblib' needs the joblib package: pip install joblib, "
                "or use engine='serial'."
            )
        return False
    package = engines.CLUSTER_ENGINES[engine]
    if importlib.util.find_spec(package) is not None:
        return True
    if engine == "dask" and address is None:
        if importlib.util.find_spec("dask") is not None:
            return False
    raise ValueError(
        f"engine={engine!r} needs the {package} package: "
        f"{engines.INSTALL_HINT} (or pip install {package}), or use "
        "engine='serial'."
    )


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def _n_workers(n_jobs):
    if n_jobs is None:
        n_jobs = -1
    if not isinstance(n_jobs, numbers.Integral) or n_jobs == 0:
        raise ValueError(
            f"n_jobs must be a non-zero integer (negative counts back from all "
            f"cores) or None, got {n_jobs!r}."
        )
    return int(n_jobs) if n_jobs > 0 else max(1, _cores() + int(n_jobs) + 1)
