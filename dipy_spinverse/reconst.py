"""The DIPY reconstruction model: :class:`SpinverseModel` and its fits.

``SpinverseModel(gtab, ...)`` is used like DIPY's ``TensorModel`` or
``IvimModel``: build it once from a gradient table (with the gradient timing
in ``gtab.big_delta`` / ``gtab.small_delta``), then call ``fit`` on one voxel
or a whole volume. Each voxel is normalised by its own b = 0 signal and
handed to :func:`dipy_spinverse.inverse.reconstruct`, which recovers one
membrane permeability per interior face of a fixed tetrahedral grid.

On one device the voxels of a volume are fitted together, ``batch_size`` at
a time, through the batched simulator; ``engine="joblib"``, ``"dask"`` or
``"ray"`` spread chunks of voxels over processes with DIPY's
:func:`~dipy.reconst.multi_voxel.multi_voxel_fit`.

Problems of single voxels never stop a volume: the voxel gets a status code
(:data:`STATUS_CODES`) and NaN outputs, and the rest of the volume is kept.

===========  ====  ==========================================================
name         code  meaning
===========  ====  ==========================================================
OK           0     fitted
NONFINITE    1     the voxel's data contain NaN or inf
BAD_B0       2     the mean b = 0 signal (of some sequence) is <= 0
FAILED       3     the inversion raised an error for this voxel
DIVERGED     4     the fit returned non-finite permeabilities or signals
PENDING      -1    inside the mask but not fitted yet (partial fits)
MASKED       -2    outside the mask
===========  ====  ==========================================================
"""

import copy
import hashlib
import json
import math
import numbers
import os
import warnings
from dataclasses import asdict
from functools import cached_property

import numpy as np
import torch
from dipy.core.gradients import GradientTable, gradient_table
from dipy.reconst.base import ReconstFit, ReconstModel
from dipy.reconst.multi_voxel import multi_voxel_fit
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from . import sequences as _sequences
from .forward import simulate
from .grid import BOUNDARIES, TetGrid
from .interface import barrier_mesh, enclosed_cells
from .inverse import PRESETS, _resolve_config, reconstruct
from .sequences import Protocol

__all__ = [
    "SpinverseModel",
    "SpinverseFit",
    "SpinverseVolumeFit",
    "STATUS_CODES",
    "OK",
    "NONFINITE",
    "BAD_B0",
    "FAILED",
    "DIVERGED",
    "PENDING",
    "MASKED",
]

OK, NONFINITE, BAD_B0, FAILED, DIVERGED, PENDING, MASKED = 0, 1, 2, 3, 4, -1, -2

#: Per-voxel status codes of a fit and their meaning.
STATUS_CODES = {
    OK: "ok",
    NONFINITE: "data contain NaN or inf",
    BAD_B0: "mean b=0 signal <= 0",
    FAILED: "the inversion raised an error",
    DIVERGED: "the fit returned non-finite values",
    PENDING: "not fitted yet",
    MASKED: "outside the mask",
}

ENGINES = ("serial", "joblib", "dask", "ray")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}
# Default grid: the published BCC grid of 576 tetrahedra, 26.7 um across.
_DEFAULT_GRID = dict(size=80 / 3, n=4, boundary="reflecting", wall_permeability=0.1)
# DIPY accepts b-vectors within this distance of unit length (gradient_table).
_UNIT_ATOL = 1e-2
# Keys of the model spec that do not change the result of a fit.
_RUNTIME_KEYS = ("device", "batch_size")


class SpinverseModel(ReconstModel):
    """Spinverse: membranes and their permeability from diffusion MRI.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable or Protocol
        Gradient table whose ``big_delta`` and ``small_delta`` hold the pulse
        timing in seconds (scalars or one value per volume; several
        diffusion times are the normal case), or an explicit
        :class:`~dipy_spinverse.sequences.Protocol`. It needs at least one
        b = 0 volume (``b <= gtab.b0_threshold``).
    grid : TetGrid, optional
        The grid of one voxel. Default: ``TetGrid.bcc(grid_size,
        grid_resolution, boundary=boundary)``. Exclusive with the next three.
    grid_size : float, optional
        Side of the simulated box in um (default 80/3, the published grid).
    grid_resolution : int, optional
        BCC cubes per side (default 4: 576 tetrahedra, 1,008 faces).
    boundary : {"reflecting", "periodic", "absorbing"}, optional
        Outer boundary of the box (default ``"reflecting"``).
    wall_permeability : float, optional
        Wall permeability in m/s for ``boundary="absorbing"`` (default 0.1).
    diffusivity : float
        Intrinsic diffusivity in mm^2/s.
    preset : str
        Inversion configuration, a key of
        :data:`dipy_spinverse.inverse.PRESETS`.
    max_iter : int, optional
        Total number of iterations. The preset's curriculum stages (and its
        learning-rate warm-up, unless ``warmup`` is given) are scaled to this
        total, each stage keeping at least one iteration. Default: the
        preset's own total.
    batch_size : int
        Voxels fitted together in one batched call (memory grows linearly).
    device : str or torch.device
        ``"cpu"`` or ``"cuda"`` (``"cuda:1"``, ...).
    dtype : {"float32", "float64"} or torch.dtype
        Floating-point precision of the simulator (float32, the published
        precision, is 3-4 times faster).
    seed : int
        Seed of the inversion's initial noise.
    **options
        Any other key of the preset: priors (``continuity``, ``manifold``,
        ``binarise``, ``area``), curriculum (``stages``, ``blend``,
        ``sequence_weights``), optimiser (``lr``, ``lr_final``, ``warmup``,
        ``clip``), ``threshold``, ``parametrisation``, ``noise``, ``sigma``.

    Raises
    ------
    ValueError
        Missing gradient timing, non-unit b-vectors, no b = 0 volume,
        unknown options or out-of-range values.

    Notes
    -----
    Each voxel is divided by its own b = 0 signal, sequence by sequence (a
    sequence's own mean b = 0 signal when it has b = 0 volumes, else the mean
    of all b = 0 volumes), so that T2 weighting that differs between echo
    times cancels.

    Examples
    --------
    >>> import numpy as np
    >>> from dipy.core.gradients import gradient_table
    >>> bvals = np.array([0, 1000, 1000, 1000])
    >>> bvecs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    >>> gtab = gradient_table(bvals, bvecs=bvecs, big_delta=0.03,
    ...                       small_delta=0.01)
    >>> model = SpinverseModel(gtab, grid_resolution=2, max_iter=5)
    >>> model.grid.n_cells
    48
    >>> fit = model.fit(np.array([1000.0, 600.0, 610.0, 590.0]))
    >>> fit.status, fit.permeability.shape, fit.predict().shape
    (0, (72,), (4,))
    """

    def __init__(
        self,
        gtab,
        *,
        grid=None,
        grid_size=None,
        grid_resolution=None,
        boundary=None,
        wall_permeability=None,
        diffusivity=2e-3,
        preset="default",
        max_iter=None,
        batch_size=32,
        device="cpu",
        dtype="float32",
        seed=0,
        **options,
    ):
        self.gtab, self.protocol = _tables(gtab)
        self._source_is_protocol = isinstance(gtab, Protocol)
        self.grid = _make_grid(
            grid, grid_size, grid_resolution, boundary, wall_permeability
        )
        self.diffusivity = _positive_float(diffusivity, "diffusivity", "mm^2/s", 2e-3)
        self.preset = preset
        self.max_iter = None if max_iter is None else _int(max_iter, "max_iter", 1)
        self.batch_size = _int(batch_size, "batch_size", 1)
        self.device = _device(device)
        self.dtype = _dtype(dtype)
        self.seed = _int(seed, "seed", 0)
        self.options = copy.deepcopy(options)
        self._overrides = _scaled_overrides(preset, options, self.max_iter)
        self.config = _resolve_config(preset, self._overrides)
        self._groups = self.protocol.groups()
        _check_stages(self.config["stages"], len(self._groups))
        self._b0 = self.protocol.bvals == 0
        if not self._b0.any():
            raise ValueError(
                "gtab has no b=0 volume (b <= gtab.b0_threshold); Spinverse "
                "normalises each voxel by its b=0 signal. Acquire at least one "
                "b=0 volume, or raise b0_threshold in gradient_table(...) if your "
                "b=0 volumes have small nominal b-values."
            )
        self._group_b0 = [idx[self._b0[idx]] for _, idx in self._groups]
        missing = [i for i, b0 in enumerate(self._group_b0) if len(b0) == 0]
        if missing:
            warnings.warn(
                f"sequence(s) {missing} (in order of first appearance) have no "
                "b=0 volume of their own; they are normalised by the mean of all "
                "b=0 volumes, which assumes the same T2 weighting (echo time).",
                UserWarning,
                stacklevel=2,
            )
        self._group_of = np.empty(len(self.protocol), dtype=np.intp)
        for g, (_, idx) in enumerate(self._groups):
            self._group_of[idx] = g
        self._pid = os.getpid()

    # -- fitting ---------------------------------------------------------------
    def fit(
        self,
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
        """Fit one voxel or a volume.

        Parameters
        ----------
        data : array_like (..., n_volumes)
            One voxel (1-D) or a volume, raw signal in the order of ``gtab``.
        mask : array_like of bool (data.shape[:-1]), optional
            Voxels to fit (default: all).
        engine : {"serial", "joblib", "dask", "ray"}
            ``"serial"`` fits ``batch_size`` voxels at a time through the
            batched simulator on ``device``; the others spread chunks of
            ``vox_per_chunk`` voxels over ``n_jobs`` workers with DIPY's
            ``multi_voxel_fit``.
        n_jobs : int, optional
            Workers of a parallel engine (default: all cores; negative values
            count back from all cores, as in DIPY).
        verbose : bool
            Show a progress bar over voxels.
        vox_per_chunk : int, optional
            Voxels per batched call (default ``batch_size``; for parallel
            engines at most an equal share per worker).
        checkpoint : str or os.PathLike, optional
            Save the partly fitted volume to this .npz file after every chunk
            (serial) or round of chunks (parallel engines); resume with
            ``resume=checkpoint`` or :func:`dipy_spinverse.io.resume_fit`.
        resume : SpinverseVolumeFit or str or os.PathLike, optional
            A partly finished fit of the same data and model (or its saved
            file): only its voxels with status ``PENDING`` are fitted.

        Returns
        -------
        SpinverseFit
            For 1-D data.
        SpinverseVolumeFit
            For a volume.
        """
        data = self._check_data(data)
        if data.ndim == 1:
            result = self._fit_batch(data[None])
            history = result.pop("history")
            params = {k: (None if v is None else v[0]) for k, v in result.items()}
            return SpinverseFit(self, params, data=data, history=history)
        if engine not in ENGINES:
            raise ValueError(f"Invalid engine {engine!r}. Must be one of {ENGINES}.")
        _check_engine_installed(engine)
        n_workers = _n_workers(n_jobs)
        if vox_per_chunk is not None:
            vox_per_chunk = _int(vox_per_chunk, "vox_per_chunk", 1)
        shape = data.shape[:-1]
        fingerprint = _fingerprint(data)
        if resume is not None:
            state = self._check_resume(resume, shape, mask, fingerprint)
            mask = state.mask
            params = {
                k: (None if v is None else v.copy()) for k, v in state.params.items()
            }
        else:
            mask = _check_mask(mask, shape)
            params = self._empty_params(shape, mask)
        flat = data.reshape(-1, data.shape[-1])
        status = params["status"].reshape(-1)
        todo = np.flatnonzero(status == PENDING)
        partial = SpinverseVolumeFit(self, params, mask, fingerprint=fingerprint)
        if checkpoint is not None:
            _save_checkpoint(partial, checkpoint)
        bar = tqdm(total=len(todo), disable=not verbose, desc="Fitting Spinverse")
        progress = _progress(bar, self.n_iterations) if verbose else None
        try:
            if engine == "serial":
                chunk = vox_per_chunk or self.batch_size
                blocks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
            else:
                chunk = vox_per_chunk or max(
                    1, min(self.batch_size, math.ceil(len(todo) / n_workers))
                )
                size = chunk * n_workers if checkpoint is not None else len(todo)
                blocks = [todo[i : i + size] for i in range(0, len(todo), size)]
            for block in blocks:
                if engine == "serial":
                    result = self._fit_batch(flat[block], callback=progress)
                    result.pop("history")
                else:
                    result = self._fit_parallel(
                        flat[block], engine=engine, n_jobs=n_workers, chunk=chunk
                    )
                _store(params, block, result)
                bar.update(len(block))
                if checkpoint is not None:
                    _save_checkpoint(partial, checkpoint)
        finally:
            bar.close()
        return SpinverseVolumeFit(self, params, mask, fingerprint=fingerprint)

    @multi_voxel_fit(batched=True)
    def _fit_chunk(self, data, **kwargs):
        """Fit a (n_vox, n_volumes) chunk inside a DIPY multi_voxel_fit worker.

        DIPY 1.12.1 also passes its engine keywords (``engine``, ``n_jobs``,
        ``vox_per_chunk``, ``verbose``, ``_batched``) into this call; only
        ``n_jobs`` is used, to share the cores between worker processes.
        """
        self._share_cores(kwargs.get("n_jobs"))
        result = self._fit_batch(np.atleast_2d(data))
        result.pop("history")
        fits = np.empty(len(result["status"]), dtype=object)
        for i in range(len(fits)):
            fits[i] = SpinverseFit(
                self, {k: (None if v is None else v[i]) for k, v in result.items()}
            )
        return fits

    def _fit_parallel(self, data, *, engine, n_jobs, chunk):
        multi = self._fit_chunk(
            data, engine=engine, n_jobs=n_jobs, vox_per_chunk=chunk, verbose=False
        )
        fits = multi.fit_array
        keys = ("permeability", "labels", "predicted", "S0", "S0_sequences", "loss")
        result = {}
        for key in keys + ("status",):
            values = [getattr(f, "_" + key) for f in fits]
            result[key] = None if values[0] is None else np.stack(values)
        return result

    def _share_cores(self, n_workers):
        """In a worker process, use this worker's share of the cores."""
        if os.getpid() == self._pid or not n_workers:
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        torch.set_num_threads(max(1, cores // int(n_workers)))

    def _fit_batch(self, data, *, callback=None):
        """Fit (n, n_volumes) raw voxels; per-voxel problems become statuses."""
        n = len(data)
        result = self._empty_result(n)
        finite = np.isfinite(data).all(axis=1)
        result["status"][~finite] = NONFINITE
        s0 = np.full(n, np.nan)
        s0_seq = np.full((n, len(self._groups)), np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            s0[finite], s0_seq[finite] = self._s0(data[finite])
        bad_b0 = finite & ~((s0 > 0) & (s0_seq > 0).all(axis=1))
        result["status"][bad_b0] = BAD_B0
        valid = np.flatnonzero(result["status"] == PENDING)
        history = None
        if len(valid):
            normalised = data[valid] / s0_seq[valid][:, self._group_of]
            part, history = self._reconstruct(normalised, callback)
            for key, value in part.items():
                if value is not None:
                    result[key][valid] = value
            ok = valid[part["status"] == OK]
            result["S0"][ok] = s0[ok]
            result["S0_sequences"][ok] = s0_seq[ok]
        result["history"] = history
        return result

    def _reconstruct(self, normalised, callback=None):
        """Run the inversion on valid voxels; retry one by one if it raises."""
        n = len(normalised)
        try:
            rec = reconstruct(
                self.grid,
                normalised,
                self.protocol,
                preset=self.preset,
                diffusivity=self.diffusivity,
                seed=self.seed,
                dtype=self.dtype,
                device=self.device,
                callback=callback,
                **self._overrides,
            )
        except Exception as err:  # a voxel must never stop the volume
            if n > 1:
                parts = [
                    self._reconstruct(normalised[i : i + 1], callback)[0]
                    for i in range(n)
                ]
                merged = {}
                for key in parts[0]:
                    values = [p[key] for p in parts]
                    merged[key] = None if values[0] is None else np.concatenate(values)
                return merged, None
            warnings.warn(
                f"Spinverse fit of a voxel failed ({type(err).__name__}: {err}); "
                f"it is flagged with status {FAILED} (FAILED) and NaN outputs.",
                RuntimeWarning,
                stacklevel=2,
            )
            part = self._empty_result(1)
            part["status"][:] = FAILED
            return part, None
        permeability = np.asarray(rec.permeability, dtype=np.float64)
        predicted = np.asarray(rec.predicted, dtype=np.float64)
        loss = self.config["loss_scale"] * np.mean((predicted - normalised) ** 2, -1)
        good = (
            np.isfinite(permeability).all(-1)
            & np.isfinite(predicted).all(-1)
            & np.isfinite(loss)
        )
        part = self._empty_result(n)
        part["status"][:] = np.where(good, OK, DIVERGED)
        part["permeability"][good] = permeability[good]
        part["predicted"][good] = predicted[good]
        part["loss"][good] = loss[good]
        if part["labels"] is not None and rec.labels is not None:
            part["labels"][good] = rec.labels[good]
        return part, rec.history

    def _s0(self, data):
        """Mean b = 0 signal of all b = 0 volumes and of each sequence."""
        s0 = data[:, self._b0].mean(axis=1)
        per_seq = np.stack(
            [data[:, b0].mean(axis=1) if len(b0) else s0 for b0 in self._group_b0],
            axis=1,
        )
        return s0, per_seq

    def _empty_result(self, n):
        labels = None
        if self.config["parametrisation"] == "cell":
            labels = np.full((n, self.grid.n_cells), -1, dtype=np.int16)
        return dict(
            permeability=np.full((n, self.grid.n_faces), np.nan),
            labels=labels,
            predicted=np.full((n, len(self.protocol)), np.nan),
            S0=np.full(n, np.nan),
            S0_sequences=np.full((n, len(self._groups)), np.nan),
            loss=np.full(n, np.nan),
            status=np.full(n, PENDING, dtype=np.int16),
        )

    def _empty_params(self, shape, mask):
        flat = self._empty_result(int(np.prod(shape, dtype=int)))
        flat["status"][~mask.reshape(-1)] = MASKED
        return {
            k: None if v is None else v.reshape(shape + v.shape[1:])
            for k, v in flat.items()
        }

    # -- input checks ----------------------------------------------------------
    def _check_data(self, data):
        try:
            data = np.asarray(data, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"data must be a numeric array (..., {len(self.protocol)}), got "
                f"{type(data).__name__}."
            ) from err
        if data.ndim == 0 or data.shape[-1] != len(self.protocol):
            raise ValueError(
                f"data has shape {data.shape} but the gradient table has "
                f"{len(self.protocol)} volumes; the last axis of data must hold "
                f"one value per volume, in the order of gtab (shape (..., "
                f"{len(self.protocol)}))."
            )
        return data

    def _check_resume(self, resume, shape, mask, fingerprint):
        if isinstance(resume, str | os.PathLike):
            from .io import load_fit

            resume = load_fit(resume)
        if not isinstance(resume, SpinverseVolumeFit):
            raise ValueError(
                "resume must be a SpinverseVolumeFit or the path of a saved one, "
                f"got {type(resume).__name__}."
            )
        if resume.shape != shape:
            raise ValueError(
                f"resume is a fit of shape {resume.shape} but data has {shape} "
                "voxels; resume with the same data the fit was started on."
            )
        if resume.fingerprint is not None and resume.fingerprint != fingerprint:
            raise ValueError(
                "data differ from the data the fit being resumed was started on; "
                "resume with the same data (same values, same order)."
            )
        if mask is not None and not np.array_equal(
            _check_mask(mask, shape), resume.mask
        ):
            raise ValueError(
                "mask differs from the mask of the fit being resumed; pass the "
                "same mask, or mask=None to reuse the saved one."
            )
        mine, theirs = self._spec(), resume.model._spec()
        for key in _RUNTIME_KEYS:
            del mine[key], theirs[key]
        if mine != theirs:
            keys = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise ValueError(
                f"the fit being resumed was made with different model settings "
                f"({', '.join(keys)}); resume with the model it was started with "
                "(dipy_spinverse.io.resume_fit rebuilds it from the saved file)."
            )
        return resume

    # -- prediction helpers ------------------------------------------------------
    def _protocol_for(self, gtab):
        if gtab is None:
            return self.protocol
        return _tables(gtab)[1]

    def _s0_for(self, protocol, s0, s0_sequences):
        """Fitted S0 per acquisition of ``protocol``, shape (n, n_acq).

        Sequences with the same waveform as a fitted one use that sequence's
        S0 (its T2 weighting); other waveforms use the mean b = 0 signal.
        """
        out = np.repeat(np.asarray(s0, float)[:, None], len(protocol), axis=1)
        fitted = {w: g for g, (w, _) in enumerate(self._groups)}
        for waveform, idx in protocol.groups():
            if waveform in fitted:
                out[:, idx] = s0_sequences[:, fitted[waveform], None]
        return out

    def _simulate_normalised(self, permeability, protocol):
        """b0-normalised signals (n, n_acq), each sequence by its own b = 0."""
        groups = protocol.groups()
        b0 = Protocol(
            waveforms=tuple(w for w, _ in groups),
            bvals=np.zeros(len(groups)),
            bvecs=np.zeros((len(groups), 3)),
        )
        full = protocol + b0
        out = []
        with torch.no_grad():
            for i in range(0, len(permeability), self.batch_size):
                signal = simulate(
                    self.grid,
                    permeability[i : i + self.batch_size],
                    full,
                    diffusivity=self.diffusivity,
                    dtype=self.dtype,
                    device=self.device,
                )
                out.append(signal.cpu().numpy().astype(np.float64))
        signal = np.concatenate(out) if out else np.zeros((0, len(full)))
        n = len(protocol)
        result = signal[:, :n].copy()
        for g, (_, idx) in enumerate(groups):
            result[:, idx] /= signal[:, n + g, None]
        return result

    # -- description ----------------------------------------------------------
    def _spec(self):
        """JSON-ready description from which :meth:`_from_spec` rebuilds it."""
        grid = self.grid
        spec = dict(
            grid=dict(
                size=grid.size,
                n=int(round(grid.size / grid.spacing)),
                boundary=grid.boundary,
                wall_permeability=grid.wall_permeability,
            ),
            diffusivity=self.diffusivity,
            preset=self.preset,
            max_iter=self.max_iter,
            batch_size=self.batch_size,
            device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
            seed=self.seed,
            options=self.options,
        )
        if self._source_is_protocol:
            spec["protocol"] = dict(
                bvals=self.protocol.bvals,
                bvecs=self.protocol.bvecs,
                waveforms=[_waveform_spec(w) for w in self.protocol.waveforms],
            )
        else:
            spec["gtab"] = dict(
                bvals=self.gtab.bvals,
                bvecs=self.gtab.bvecs,
                big_delta=self.gtab.big_delta,
                small_delta=self.gtab.small_delta,
                b0_threshold=self.gtab.b0_threshold,
            )
        return json.loads(json.dumps(spec, default=_jsonable))

    @classmethod
    def _from_spec(cls, spec):
        spec = copy.deepcopy(spec)
        if "protocol" in spec:
            p = spec["protocol"]
            table = Protocol(
                waveforms=tuple(_waveform_from_spec(w) for w in p["waveforms"]),
                bvals=np.asarray(p["bvals"], float),
                bvecs=np.asarray(p["bvecs"], float).reshape(-1, 3),
            )
        else:
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
        return cls(
            table,
            grid=grid,
            diffusivity=spec["diffusivity"],
            preset=spec["preset"],
            max_iter=spec["max_iter"],
            batch_size=spec["batch_size"],
            device=device,
            dtype=spec["dtype"],
            seed=spec["seed"],
            **spec["options"],
        )

    def __repr__(self):
        return (
            f"SpinverseModel(n_volumes={len(self.protocol)}, "
            f"n_sequences={len(self._groups)}, grid={self.grid!r}, "
            f"preset={self.preset!r}, iterations={self.n_iterations})"
        )

    @property
    def n_iterations(self):
        """Total iterations of the inversion per voxel."""
        return sum(int(s["iterations"]) for s in self.config["stages"])


class SpinverseFit(ReconstFit):
    """Spinverse fit of one voxel.

    Parameters
    ----------
    model : SpinverseModel
    params : dict
        ``permeability`` (n_faces,), ``labels`` (n_cells,) or None,
        ``predicted`` (n_volumes,) b0-normalised signal, ``S0``,
        ``S0_sequences`` (n_sequences,), ``loss``, ``status``.
    data : ndarray, optional
        The voxel's signal.
    history : dict, optional
        The inversion's loss curves (single-voxel fits).
    """

    def __init__(self, model, params, *, data=None, history=None):
        self.model = model
        self.data = data
        self.history = history
        self._permeability = np.asarray(params["permeability"], dtype=np.float64)
        labels = params.get("labels")
        self._labels = None if labels is None else np.asarray(labels)
        self._predicted = np.asarray(params["predicted"], dtype=np.float64)
        self._S0 = float(params["S0"])
        self._S0_sequences = np.asarray(params["S0_sequences"], dtype=np.float64)
        self._loss = float(params["loss"])
        self._status = int(params["status"])

    @property
    def shape(self):
        """``()``: one voxel."""
        return ()

    @property
    def status(self):
        """Status code (0 = ok; see :data:`STATUS_CODES`)."""
        return self._status

    @property
    def permeability(self):
        """Fitted permeability per interior face of ``model.grid``, m/s."""
        return self._permeability

    @property
    def barrier(self):
        """Faces below the barrier threshold: the recovered membranes."""
        return _barrier(self._permeability, self.model.config["threshold"])

    @property
    def labels(self):
        """Cell occupancy labels (cell parametrisation) or None."""
        return self._labels

    @property
    def S0(self):
        """Mean b = 0 signal of the voxel (NaN unless status is 0)."""
        return self._S0

    @property
    def loss(self):
        """Final data term: ``loss_scale`` x mean squared normalised misfit."""
        return self._loss

    @property
    def residual(self):
        """RMS misfit of the b0-normalised signal (a fraction of S0)."""
        return float(np.sqrt(self._loss / self.model.config["loss_scale"]))

    @property
    def surface_to_volume(self):
        """Barrier area per box volume, 1/um."""
        if self._status != OK:
            return float("nan")
        return _surface_to_volume(self.model.grid, self.barrier[None])[0]

    @property
    def membrane_permeability(self):
        """Mean permeability over barrier faces in m/s (NaN without any)."""
        return _membrane_permeability(self._permeability[None], self.barrier[None])[0]

    @cached_property
    def _compartments(self):
        if self._status != OK:
            return float("nan"), float("nan")
        return _compartments(self.model.grid, self.barrier)

    @property
    def restricted_fraction(self):
        """Volume fraction of the cells enclosed by barriers."""
        return self._compartments[0]

    @property
    def n_compartments(self):
        """Number of enclosed compartments (NaN unless status is 0)."""
        return self._compartments[1]

    @cached_property
    def interface_mesh(self):
        """The barrier faces as an :class:`InterfaceMesh` (um), wall-capped.

        None unless the status is 0.
        """
        if self._status != OK:
            return None
        return barrier_mesh(
            self.model.grid, self.barrier, labels=self._labels_for_mesh, cap_wall=True
        )

    @property
    def _labels_for_mesh(self):
        if self._labels is None or np.any(self._labels < 0):
            return None
        return self._labels

    def save_interface(self, path, *, binary=False):
        """Write :attr:`interface_mesh` to a .ply or .vtk file.

        Parameters
        ----------
        path : str or os.PathLike
        binary : bool
            Binary PLY (``.ply`` only).
        """
        if self.interface_mesh is None:
            raise ValueError(
                f"this voxel has no fitted interface (status {self._status}: "
                f"{STATUS_CODES[self._status]})."
            )
        self.interface_mesh.save(path, binary=binary)

    def predict(self, gtab=None, *, S0=None):
        """Predict the voxel's signal.

        Parameters
        ----------
        gtab : GradientTable or Protocol, optional
            Acquisitions to predict (default: the fitted ones). A gradient
            table needs ``big_delta`` and ``small_delta``.
        S0 : float, optional
            Unweighted signal. Default: the FITTED S0 -- for acquisitions
            sharing a waveform with a fitted sequence that sequence's own
            b = 0 signal, otherwise the voxel's mean b = 0 signal.

        Returns
        -------
        ndarray (n_volumes,)
            NaN when the status is not 0.
        """
        protocol = self.model._protocol_for(gtab)
        if self._status != OK:
            return np.full(len(protocol), np.nan)
        if gtab is None:
            normalised = self._predicted[None]
        else:
            normalised = self.model._simulate_normalised(
                self._permeability[None], protocol
            )
        if S0 is None:
            scale = self.model._s0_for(protocol, [self._S0], self._S0_sequences[None])
        else:
            scale = float(S0)
        return (normalised * scale)[0]

    def __repr__(self):
        return (
            f"SpinverseFit(status={self._status} ({STATUS_CODES[self._status]}), "
            f"barrier_faces={int(self.barrier.sum())}, loss={self._loss:.3g})"
        )


class SpinverseVolumeFit(ReconstFit):
    """Spinverse fit of a volume: per-voxel arrays and scalar maps.

    Index it like an array: an index of one voxel gives its
    :class:`SpinverseFit` (None outside the mask, as DIPY's
    ``MultiVoxelFit``), any other index a smaller volume fit.

    Parameters
    ----------
    model : SpinverseModel
    params : dict of ndarray
        ``permeability`` (..., n_faces), ``labels`` (..., n_cells) or None,
        ``predicted`` (..., n_volumes), ``S0``, ``S0_sequences``
        (..., n_sequences), ``loss``, ``status`` (see :data:`STATUS_CODES`).
    mask : ndarray of bool
    fingerprint : str, optional
        Checksum of the fitted data, to check that a partial fit is resumed
        on the same data.

    Notes
    -----
    Scalar maps are 0 outside the mask (as DIPY's maps) and NaN inside it
    where the status is not 0.
    """

    def __init__(self, model, params, mask, *, fingerprint=None):
        self.model = model
        self.data = None
        self.params = params
        self.mask = np.asarray(mask, dtype=bool)
        self.fingerprint = fingerprint

    @property
    def shape(self):
        """Shape of the volume."""
        return self.mask.shape

    @property
    def status(self):
        """Status map (0 = ok; see :data:`STATUS_CODES`)."""
        return self.params["status"]

    @property
    def ok(self):
        """Voxels fitted without problems."""
        return self.status == OK

    @property
    def n_pending(self):
        """Voxels of the mask still to fit (a partial fit to resume)."""
        return int(np.sum(self.status == PENDING))

    @property
    def permeability(self):
        """Per-face permeability (..., n_faces), m/s; NaN where not fitted."""
        return self.params["permeability"]

    @property
    def barrier(self):
        """Barrier faces (..., n_faces)."""
        return _barrier(self.permeability, self.model.config["threshold"])

    @property
    def labels(self):
        """Cell occupancy labels (..., n_cells) or None."""
        return self.params["labels"]

    @property
    def S0(self):
        """Fitted S0 map (mean b = 0 signal)."""
        return self._map(self.params["S0"][self.ok])

    @property
    def loss(self):
        """Final data-term map (see :attr:`SpinverseFit.loss`)."""
        return self._map(self.params["loss"][self.ok])

    @property
    def residual(self):
        """RMS misfit of the b0-normalised signal (fraction of S0)."""
        loss = self.params["loss"][self.ok]
        return self._map(np.sqrt(loss / self.model.config["loss_scale"]))

    @property
    def surface_to_volume(self):
        """Barrier area per box volume, 1/um."""
        return self._map(_surface_to_volume(self.model.grid, self.barrier[self.ok]))

    @property
    def membrane_permeability(self):
        """Mean permeability over the barrier faces, m/s (NaN without any)."""
        ok = self.ok
        return self._map(
            _membrane_permeability(self.permeability[ok], self.barrier[ok])
        )

    @cached_property
    def _compartments(self):
        grid = self.model.grid
        values = [_compartments(grid, b) for b in self.barrier[self.ok]]
        return np.asarray(values, dtype=np.float64).reshape(-1, 2)

    @property
    def restricted_fraction(self):
        """Volume fraction of the cells enclosed by barriers."""
        return self._map(self._compartments[:, 0])

    @property
    def n_compartments(self):
        """Number of enclosed compartments."""
        return self._map(self._compartments[:, 1])

    @property
    def interface_mesh(self):
        """Object array of per-voxel :class:`InterfaceMesh` (None if not ok)."""
        meshes = np.empty(self.shape, dtype=object)
        for index in zip(*np.nonzero(self.ok), strict=True):
            meshes[index] = self[index].interface_mesh
        return meshes

    def save_interface(self, out_dir, *, ext=".ply", binary=False):
        """Write one mesh per fitted voxel, ``voxel_<i>_<j>_<k><ext>``.

        Parameters
        ----------
        out_dir : str or os.PathLike
            Created if needed.
        ext : {".ply", ".vtk"}
        binary : bool
            Binary PLY.

        Returns
        -------
        dict
            ``{voxel index: path}``.
        """
        os.makedirs(out_dir, exist_ok=True)
        paths = {}
        for index in zip(*np.nonzero(self.ok), strict=True):
            index = tuple(int(i) for i in index)
            name = "voxel_" + "_".join(map(str, index)) + ext
            path = os.path.join(os.fspath(out_dir), name)
            self[index].save_interface(path, binary=binary)
            paths[index] = path
        return paths

    def predict(self, gtab=None, *, S0=None):
        """Predict the signal of every voxel.

        Parameters
        ----------
        gtab : GradientTable or Protocol, optional
            Acquisitions to predict (default: the fitted ones).
        S0 : float or array_like (shape), optional
            Unweighted signal. Default: each voxel's FITTED S0 (per sequence,
            see :meth:`SpinverseFit.predict`) -- unlike DIPY's
            ``MultiVoxelFit``, which predicts with S0 = 1.

        Returns
        -------
        ndarray (..., n_volumes)
            0 outside the mask, NaN where the status is not 0.
        """
        protocol = self.model._protocol_for(gtab)
        out = np.zeros(self.shape + (len(protocol),))
        out[self.mask & ~self.ok] = np.nan
        ok = self.ok
        if not ok.any():
            return out
        if gtab is None:
            normalised = self.params["predicted"][ok]
        else:
            normalised = self.model._simulate_normalised(
                self.permeability[ok], protocol
            )
        if S0 is None:
            scale = self.model._s0_for(
                protocol, self.params["S0"][ok], self.params["S0_sequences"][ok]
            )
        else:
            scale = np.broadcast_to(np.asarray(S0, dtype=float), self.shape)[ok][
                :, None
            ]
        out[ok] = normalised * scale
        return out

    def __getitem__(self, index):
        ids = np.arange(self.mask.size).reshape(self.shape)[index]
        flat = {
            k: None if v is None else v.reshape((-1,) + v.shape[len(self.shape) :])
            for k, v in self.params.items()
        }
        if np.ndim(ids) == 0:
            if not self.mask.reshape(-1)[ids]:
                return None
            return SpinverseFit(
                self.model, {k: None if v is None else v[ids] for k, v in flat.items()}
            )
        params = {
            k: None
            if v is None
            else v[ids.reshape(-1)].reshape(ids.shape + v.shape[1:])
            for k, v in flat.items()
        }
        return SpinverseVolumeFit(self.model, params, self.mask.reshape(-1)[ids])

    def _map(self, values_ok):
        out = np.zeros(self.shape)
        out[self.mask] = np.nan
        out[self.ok] = values_ok
        return out

    def __repr__(self):
        counts = {
            STATUS_CODES[c]: int(np.sum(self.status == c))
            for c in STATUS_CODES
            if c != MASKED and np.any(self.status == c)
        }
        return f"SpinverseVolumeFit(shape={self.shape}, status={counts})"


# -- per-voxel maps --------------------------------------------------------------
def _barrier(permeability, threshold):
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(permeability, nan=np.inf) < threshold


def _surface_to_volume(grid, barrier):
    """Barrier area over box volume, 1/um, for (n, n_faces) barriers."""
    return (barrier @ grid.face_areas) / grid.volume


def _membrane_permeability(permeability, barrier):
    count = barrier.sum(-1)
    total = np.where(barrier, permeability, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _compartments(grid, barrier):
    """(restricted volume fraction, number of enclosed compartments)."""
    enclosed = enclosed_cells(grid, barrier)
    if not enclosed.any():
        return 0.0, 0
    fraction = float(grid.cell_volumes[enclosed].sum() / grid.volume)
    open_faces = grid.face_cells[~barrier]
    keep = enclosed[open_faces[:, 0]] & enclosed[open_faces[:, 1]]
    cells = np.flatnonzero(enclosed)
    index = np.full(grid.n_cells, -1)
    index[cells] = np.arange(len(cells))
    pairs = index[open_faces[keep]]
    graph = coo_matrix(
        (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
        shape=(len(cells), len(cells)),
    )
    n, _ = connected_components(graph, directed=False)
    return fraction, int(n)


def _store(params, block, result):
    """Write (n, ...) per-voxel results for flat voxel ids ``block``."""
    index = np.unravel_index(block, params["status"].shape)
    for key, value in result.items():
        if params.get(key) is not None and value is not None:
            params[key][index] = value


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


def _fingerprint(data):
    """SHA-1 of the data (float64, C order) and their shape."""
    digest = hashlib.sha1(np.ascontiguousarray(data, dtype=np.float64).tobytes())
    digest.update(str(data.shape).encode())
    return digest.hexdigest()


def _save_checkpoint(fit, path):
    from .io import save_fit

    save_fit(fit, path)


# -- construction helpers ---------------------------------------------------------
def _tables(gtab):
    """(GradientTable, Protocol) from a gradient table or a protocol."""
    if isinstance(gtab, Protocol):
        protocol = gtab
        timing = {}
        if all(type(w) is _sequences.PGSE for w in protocol.waveforms):
            timing = dict(
                big_delta=np.array([w.big_delta for w in protocol.waveforms]),
                small_delta=np.array([w.small_delta for w in protocol.waveforms]),
            )
        table = gradient_table(
            protocol.bvals, bvecs=protocol.bvecs, b0_threshold=0, **timing
        )
        return table, protocol
    if not isinstance(gtab, GradientTable):
        raise ValueError(
            "gtab must be a dipy GradientTable (with big_delta and small_delta in "
            f"seconds) or a dipy_spinverse Protocol, got {type(gtab).__name__}."
        )
    bvals = np.asarray(gtab.bvals, dtype=float)
    threshold = 0.0 if gtab.b0_threshold is None else gtab.b0_threshold
    norms = np.linalg.norm(np.asarray(gtab.bvecs, dtype=float), axis=1)
    bad = (bvals > threshold) & (np.abs(norms - 1) > _UNIT_ATOL)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"gtab.bvecs must be unit vectors where b > b0_threshold; volume "
            f"{first} has |bvec| = {norms[first]:.4g}. Normalise the b-vectors "
            "(bvecs / np.linalg.norm(bvecs, axis=1, keepdims=True)) before "
            "building the gradient table."
        )
    for name in ("big_delta", "small_delta"):
        if getattr(gtab, name) is None:
            raise ValueError(
                f"gtab.{name} is None: Spinverse needs the gradient timing. Build "
                "the table with gradient_table(bvals, bvecs=bvecs, big_delta=..., "
                "small_delta=...) in seconds (scalars or one value per volume), "
                "or pass a Protocol."
            )
    return gtab, Protocol.from_gtab(gtab)


def _make_grid(grid, size, resolution, boundary, wall_permeability):
    given = dict(
        grid_size=size,
        grid_resolution=resolution,
        boundary=boundary,
        wall_permeability=wall_permeability,
    )
    if grid is not None:
        clash = [k for k, v in given.items() if v is not None]
        if clash:
            raise ValueError(
                f"grid and {', '.join(clash)} are mutually exclusive: pass a TetGrid "
                "or the options to build one, not both."
            )
        if not isinstance(grid, TetGrid):
            raise ValueError(f"grid must be a TetGrid, got {type(grid).__name__}.")
        return grid
    boundary = _DEFAULT_GRID["boundary"] if boundary is None else boundary
    if boundary not in BOUNDARIES:
        raise ValueError(f"Invalid boundary {boundary!r}. Must be one of {BOUNDARIES}.")
    size = _positive_float(
        _DEFAULT_GRID["size"] if size is None else size, "grid_size", "um", 26.7
    )
    resolution = _int(
        _DEFAULT_GRID["n"] if resolution is None else resolution, "grid_resolution", 1
    )
    if wall_permeability is None:
        wall_permeability = _DEFAULT_GRID["wall_permeability"]
    wall_permeability = _positive_float(
        wall_permeability, "wall_permeability", "m/s", 0.1
    )
    return TetGrid.bcc(
        size, resolution, boundary=boundary, wall_permeability=wall_permeability
    )


def _scaled_overrides(preset, options, max_iter):
    if preset not in PRESETS:
        raise ValueError(f"Invalid preset {preset!r}. Must be one of {tuple(PRESETS)}.")
    unknown = sorted(set(options) - set(PRESETS[preset]))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for SpinverseModel; valid options are the "
            f"keyword arguments listed in its docstring and the preset keys "
            f"{sorted(PRESETS[preset])}."
        )
    overrides = copy.deepcopy(options)
    if max_iter is None:
        return overrides
    stages = list(overrides.get("stages", PRESETS[preset]["stages"]))
    if max_iter < len(stages):
        raise ValueError(
            f"max_iter={max_iter} is fewer than the {len(stages)} curriculum stages; "
            f"use max_iter >= {len(stages)} or fewer stages."
        )
    counts = [int(s["iterations"]) for s in stages]
    total = sum(counts)
    new = _split(max_iter, counts)
    overrides["stages"] = tuple(
        dict(stage, iterations=k) for stage, k in zip(stages, new, strict=True)
    )
    if "warmup" not in options:
        warmup = PRESETS[preset]["warmup"]
        overrides["warmup"] = max(1, round(warmup * max_iter / total))
    return overrides


def _split(total, weights):
    """Integers >= 1 proportional to ``weights`` summing to ``total``."""
    raw = np.asarray(weights, float) * (total - len(weights)) / sum(weights)
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - len(weights) - counts.sum()]] += 1
    return [int(c) + 1 for c in counts]


def _check_stages(stages, n_groups):
    for s, stage in enumerate(stages):
        ranks = stage.get("sequences", "all")
        if ranks == "all":
            continue
        if any(int(r) >= n_groups for r in ranks):
            raise ValueError(
                f"curriculum stage {s} uses sequence rank {max(ranks)}, but gtab has "
                f"only {n_groups} sequence(s) (distinct timings; rank 0 = the "
                "longest diffusion time). Pass stages= that use ranks < "
                f"{n_groups}, or acquire more diffusion times."
            )


def _check_mask(mask, shape):
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(
            f"mask has shape {mask.shape} but data has {shape} voxels; pass a mask "
            "of shape data.shape[:-1]."
        )
    return mask.astype(bool)


def _check_engine_installed(engine):
    package = {"joblib": "joblib", "dask": "dask", "ray": "ray"}.get(engine)
    if package is None:
        return
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ValueError(
            f"engine={engine!r} needs the {package} package: pip install {package}, "
            "or use engine='serial'."
        )


def _n_workers(n_jobs):
    if n_jobs is None:
        n_jobs = -1
    if not isinstance(n_jobs, numbers.Integral) or n_jobs == 0:
        raise ValueError(
            f"n_jobs must be a non-zero integer (negative counts back from all "
            f"cores) or None, got {n_jobs!r}."
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return int(n_jobs) if n_jobs > 0 else max(1, cores + int(n_jobs) + 1)


def _device(device):
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} but no CUDA device is available; use device='cpu'."
        )
    return device


def _dtype(dtype):
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    if not isinstance(dtype, str):
        try:
            dtype = np.dtype(dtype).name
        except TypeError:
            pass
    if dtype not in _DTYPES:
        raise ValueError(
            f"dtype must be one of {tuple(_DTYPES)} (or the torch dtypes), got "
            f"{dtype!r}."
        )
    return _DTYPES[dtype]


def _int(value, name, minimum):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _positive_float(value, name, unit, example):
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number in {unit}, got {value!r}.") from err
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{name} must be finite and > 0 in {unit} (e.g. {example}), got {value!r}."
        )
    return value


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    raise TypeError(f"cannot describe {type(value).__name__} in JSON")


def _array_or_scalar(value):
    if value is None:
        return None
    return np.asarray(value, float) if isinstance(value, list) else float(value)


def _waveform_spec(waveform):
    return dict(type=type(waveform).__name__, **asdict(waveform))


def _waveform_from_spec(spec):
    spec = dict(spec)
    cls = getattr(_sequences, spec.pop("type"))
    return cls(**spec)
