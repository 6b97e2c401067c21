"""The voxel runner: fit many voxels, on one device or over parallel engines.

Voxels are fitted ``batch_size`` at a time through the batched inversion
(``engine="serial"``), or in chunks spread over processes by DIPY's
:func:`~dipy.reconst.multi_voxel.multi_voxel_fit` (``"joblib"``, ``"dask"``,
``"ray"``). A voxel's problem never stops the volume: it gets a status code
(:data:`~dipy_spinverse.reconst.fit.STATUS_CODES`) and NaN outputs; when the
inversion raises on a batch, its voxels are retried one by one. With a known
noise level (``sigma > 0``) a fit whose residual is far above the noise keeps
its outputs with the warning status ``POOR_FIT`` (:func:`poor_fit_bound`).
After every chunk an optional ``checkpoint(partial_fit)`` hook sees the fit
so far.
"""

import hashlib
import math
import numbers
import os
import warnings

import numpy as np
import torch
from scipy.stats import chi2
from tqdm import tqdm

from ..checks import check_int
from ..inverse import reconstruct
from ..signals import b0_scale, data_loss, normalise_b0
from .fit import (
    BAD_B0,
    DIVERGED,
    FAILED,
    FITTED,
    MASKED,
    NONFINITE,
    OK,
    PENDING,
    POOR_FIT,
    SpinverseFit,
)

__all__ = [
    "PARALLEL_ENGINES",
    "POOR_FIT_FALSE_ALARM",
    "fit_voxels",
    "fit_volume",
    "fingerprint",
    "poor_fit_bound",
]

#: Ways to spread a volume fit: one device, or DIPY's parallel engines.
PARALLEL_ENGINES = ("serial", "joblib", "dask", "ray")

#: False-alarm rate of the ``POOR_FIT`` status. Where the model explains a
#: voxel, its n b0-normalised acquisitions differ from the fit by noise of
#: standard deviation sigma, so n * mse / sigma^2 (mse: the mean squared
#: misfit, ``loss / loss_scale``) follows a chi-square distribution with at
#: most n degrees of freedom (fewer, as the fit absorbs part of the noise;
#: the Rician magnitude varies less than sigma): the chi-square(n) quantile
#: at this rate flags one voxel in a million that the model does explain.
#: A fit above it is not noise around a signal the model can produce.
POOR_FIT_FALSE_ALARM = 1e-6


def poor_fit_bound(n_acquisitions, sigma):
    """Largest mean squared misfit of a fit consistent with the noise.

    ``sigma^2 * chi2.isf(POOR_FIT_FALSE_ALARM, n) / n``, see
    :data:`POOR_FIT_FALSE_ALARM`; ``inf`` when ``sigma`` is 0 (unknown).

    Parameters
    ----------
    n_acquisitions : int
        Acquisitions in the misfit (n).
    sigma : float
        Noise relative to the b = 0 signal (1/SNR).

    Returns
    -------
    float
    """
    if not sigma > 0:
        return math.inf
    n = check_int(n_acquisitions, "n_acquisitions", 1)
    return float(sigma**2 * chi2.isf(POOR_FIT_FALSE_ALARM, n) / n)


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
    n = len(data)
    result = empty_params(model, n)
    finite = np.isfinite(data).all(axis=1)
    result["status"][~finite] = NONFINITE
    s0 = np.full(n, np.nan)
    s0_seq = np.full((n, len(model.sequences)), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        s0[finite] = data[finite][:, model.protocol.bvals == 0].mean(axis=1)
        s0_seq[finite] = b0_scale(data[finite], model.protocol)
    bad_b0 = finite & ~((s0 > 0) & (s0_seq > 0).all(axis=1))
    result["status"][bad_b0] = BAD_B0
    valid = np.flatnonzero(result["status"] == PENDING)
    history = None
    if len(valid):
        normalised = normalise_b0(data[valid], model.protocol)
        part, history = _reconstruct(model, normalised, callback)
        for key, value in part.items():
            if value is not None:
                result[key][valid] = value
        ok = valid[np.isin(part["status"], FITTED)]
        result["S0"][ok] = s0[ok]
        result["S0_sequences"][ok] = s0_seq[ok]
    return result, history


def _reconstruct(model, normalised, callback=None):
    """Run the inversion on valid voxels; retry one by one if it raises."""
    n = len(normalised)
    try:
        rec = reconstruct(
            model.grid,
            normalised,
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
                _reconstruct(model, normalised[i : i + 1], callback)[0]
                for i in range(n)
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
    config = model.config
    loss = data_loss(
        torch.from_numpy(predicted),
        torch.from_numpy(normalised),
        loss_scale=config.loss_scale,
        sigma=config.sigma,
        noise=config.noise,
    ).numpy()
    good = (
        np.isfinite(permeability).all(-1)
        & np.isfinite(predicted).all(-1)
        & np.isfinite(loss)
    )
    bound = poor_fit_bound(normalised.shape[-1], config.sigma)
    poor = good & (loss / config.loss_scale > bound)
    part = empty_params(model, n)
    part["status"][:] = np.where(good, np.where(poor, POOR_FIT, OK), DIVERGED)
    part["permeability"][good] = permeability[good]
    part["predicted"][good] = predicted[good]
    part["loss"][good] = loss[good]
    if part["labels"] is not None and rec.labels is not None:
        part["labels"][good] = rec.labels[good]
    return part, rec.history


def empty_params(model, shape):
    """Per-voxel parameters of ``shape`` (an int or a tuple), all PENDING."""
    shape = (shape,) if isinstance(shape, numbers.Integral) else tuple(shape)
    labels = None
    if model.has_labels:
        labels = np.full(shape + (model.grid.n_cells,), -1, dtype=np.int16)
    return dict(
        permeability=np.full(shape + (model.grid.n_faces,), np.nan),
        labels=labels,
        predicted=np.full(shape + (len(model.protocol),), np.nan),
        S0=np.full(shape, np.nan),
        S0_sequences=np.full(shape + (len(model.sequences),), np.nan),
        loss=np.full(shape, np.nan),
        status=np.full(shape, PENDING, dtype=np.int16),
    )


def fit_volume(
    model,
    data,
    *,
    mask=None,
    engine="serial",
    n_jobs=None,
    verbose=False,
    vox_per_chunk=None,
    checkpoint=None,
    resume=None,
):
    """Fit a volume (..., n_volumes); see :meth:`SpinverseModel.fit`."""
    if engine not in PARALLEL_ENGINES:
        raise ValueError(
            f"Invalid engine {engine!r}. Must be one of {PARALLEL_ENGINES}."
        )
    _check_engine_installed(engine)
    if checkpoint is not None and not callable(checkpoint):
        raise ValueError(
            "checkpoint must be a callable checkpoint(partial_fit), e.g. "
            "dipy_spinverse.io.Checkpoint('fit.npz'), got "
            f"{type(checkpoint).__name__}."
        )
    n_workers = _n_workers(n_jobs)
    if vox_per_chunk is not None:
        vox_per_chunk = check_int(vox_per_chunk, "vox_per_chunk", 1)
    shape = data.shape[:-1]
    digest = fingerprint(data)
    if resume is not None:
        _check_resume(model, resume, shape, mask, digest)
        mask = resume.mask
        params = {
            k: (None if v is None else v.copy()) for k, v in resume.params.items()
        }
    else:
        mask = check_mask(mask, shape)
        params = empty_params(model, shape)
        params["status"][~mask] = MASKED
    partial = SpinverseFit(model, params, mask, fingerprint=digest)
    flat = data.reshape(-1, data.shape[-1])
    todo = np.flatnonzero(params["status"].reshape(-1) == PENDING)
    if checkpoint is not None:
        checkpoint(partial)
    bar = tqdm(total=len(todo), disable=not verbose, desc="Fitting Spinverse")
    progress = _progress(bar, model.config.n_iterations) if verbose else None
    try:
        if engine == "serial":
            chunk = vox_per_chunk or model.batch_size
            size = chunk
        else:
            chunk = vox_per_chunk or max(
                1, min(model.batch_size, math.ceil(len(todo) / n_workers))
            )
            size = chunk * n_workers if checkpoint is not None else len(todo)
        for start in range(0, len(todo), size):
            block = todo[start : start + size]
            if engine == "serial":
                result, _ = fit_voxels(model, flat[block], callback=progress)
            else:
                result = _fit_parallel(
                    model, flat[block], engine=engine, n_jobs=n_workers, chunk=chunk
                )
            index = np.unravel_index(block, shape)
            for key, value in result.items():
                if params[key] is not None and value is not None:
                    params[key][index] = value
            bar.update(len(block))
            if checkpoint is not None:
                checkpoint(partial)
    finally:
        bar.close()
    return partial


def _fit_parallel(model, data, *, engine, n_jobs, chunk):
    """Fit (n, n_volumes) voxels over a DIPY parallel engine."""
    fits = model.fit_chunk(
        data, engine=engine, n_jobs=n_jobs, vox_per_chunk=chunk, verbose=False
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


def fingerprint(data):
    """SHA-1 of the data (float64, C order) and their shape."""
    digest = hashlib.sha1(np.ascontiguousarray(data, dtype=np.float64).tobytes())
    digest.update(str(data.shape).encode())
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
    return mask.astype(bool)


def _check_resume(model, resume, shape, mask, digest):
    if not isinstance(resume, SpinverseFit) or resume.shape == ():
        raise ValueError(
            "resume must be a partly finished volume SpinverseFit (load a saved "
            "one with dipy_spinverse.io.load_fit, or use dipy_spinverse.io."
            f"resume_fit), got {type(resume).__name__}."
        )
    if resume.shape != shape:
        raise ValueError(
            f"resume is a fit of shape {resume.shape} but data has {shape} "
            "voxels; resume with the same data the fit was started on."
        )
    if resume.fingerprint is not None and resume.fingerprint != digest:
        raise ValueError(
            "data differ from the data the fit being resumed was started on; "
            "resume with the same data (same values, same order)."
        )
    if mask is not None and not np.array_equal(check_mask(mask, shape), resume.mask):
        raise ValueError(
            "mask differs from the mask of the fit being resumed; pass the "
            "same mask, or mask=None to reuse the saved one."
        )
    differ = model.differences(resume.model)
    if differ:
        raise ValueError(
            f"the fit being resumed was made with different model settings "
            f"({', '.join(differ)}); resume with the model it was started with "
            "(dipy_spinverse.io.resume_fit rebuilds it from the saved file)."
        )


def _progress(bar, n_iterations):
    """Inversion callback showing the current iteration on a progress bar."""

    def callback(iteration, permeability, losses):
        if "search" in losses:  # the label search, one voxel of the batch
            text = (
                f"label search, voxel {losses['voxel'] + 1}, step {iteration + 1}, "
                f"loss {losses['search']:.3g}"
            )
        else:
            text = (
                f"iteration {iteration + 1}/{n_iterations}, "
                f"data loss {losses.get('data', float('nan')):.3g}"
            )
        bar.set_postfix_str(text, refresh=iteration % 10 == 0)

    return callback


def _check_engine_installed(engine):
    if engine == "serial":
        return
    import importlib.util

    if importlib.util.find_spec(engine) is None:
        raise ValueError(
            f"engine={engine!r} needs the {engine} package: pip install {engine}, "
            "or use engine='serial'."
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
