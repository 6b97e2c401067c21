"""Shared machinery of the compartment models: DIPY contract and batched fitting.

A model describes its signal as columns ``Phi`` (one per compartment, built
from the building blocks) weighted by non-negative volume fractions, and its
nonlinear parameters as :class:`~.fitting.Bound` s: some shared by the voxel,
some per fibre population, plus one unit direction per fibre.
:class:`CompartmentModel` holds what every model shares -- input checks, S0
normalisation, masks, NaN voxels, multi-start variable-projection
Levenberg-Marquardt, prediction -- and takes three parts from their own
modules: where fits start (:mod:`.starts`), the fibre count of each voxel
(:mod:`.counts`) and the learned estimator (:mod:`.amortised`).
"""

import inspect
import warnings
from dataclasses import asdict

import numpy as np
import torch
from dipy.reconst.base import ReconstModel
from dipy.testing.decorators import warning_for_keywords
from dipy.utils.logging import logger

from ..checks import (
    check_choice,
    check_int,
    check_mask_values,
    check_positive,
    check_s0,
)
from ..files import cache_root
from ..masked import BAD_B0, DIVERGED, MASKED, NONFINITE, OK, MaskedFit, spread
from .acquisition import Acquisition
from .amortised import LearnedMixin
from .chunks import map_chunks
from .counts import CountsMixin
from .fitting import (
    DTYPE,
    fd_steps,
    forward_differences,
    forward_mode,
    levenberg_marquardt,
    nnls,
)
from .learned import LearnedOptions
from .starts import StartsMixin

__all__ = ["CompartmentModel", "CompartmentFit", "FIT_METHODS"]

#: Estimators of every compartment model: variable-projection fitting or a
#: regressor trained on simulated signals (:mod:`.learned`).
FIT_METHODS = ("varpro", "learned")

# Levenberg-Marquardt iterations every start gets before all but the best are
# dropped.
_SCREEN_ITERATIONS = 3
# Largest |u| of the sigmoid reparametrisation: sigmoid'(8) = 3e-4, so a
# parameter stays within 3e-4 of the width of its range from each bound.
_SIGMOID_CAP = 8.0


def canonical_directions(dirs):
    """Flip unit vectors (..., 3) into the z >= 0 hemisphere (axes are +-);
    on its rim (z = 0) into y >= 0, and (1, 0, 0) on the x axis: one
    representative per axis, as noiseless fits along the equator need."""
    z, y, x = dirs[..., 2:3], dirs[..., 1:2], dirs[..., 0:1]
    first = torch.where(z != 0, z, torch.where(y != 0, y, x))
    return dirs * torch.where(first < 0, -1.0, 1.0).to(dirs.dtype)


#: Largest difference between a sequence's b = 0 level and the pooled one
#: (median over the voxels of their ratio) treated as noise: the sequences
#: then share the pooled b = 0. Noise moves that median by far less (a
#: voxel's ratio scatters ~3 % at SNR 20 with 3 b = 0 volumes, its median
#: over 100 voxels ~0.4 %); echo times 10 ms apart differ by 13 % at T2 70 ms.
B0_LEVEL_TOL = 0.02


def nnls_fractions(c):
    """Normalise NNLS coefficients to volume fractions and their sum.

    Parameters
    ----------
    c : torch.Tensor
        Non-negative coefficients (B, K).

    Returns
    -------
    fractions : torch.Tensor
        (B, K), summing to 1 (all 0 where ``c`` is).
    total : torch.Tensor
        (B,) the coefficients' sum.
    """
    total = c.sum(-1)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return c / safe[:, None], total


def _sequence_ids(gtab):
    """Which sequence (pulse timing) each volume of ``gtab`` belongs to.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable

    Returns
    -------
    ndarray of int (N,) or None
        None when the table has one timing, or none.
    """
    if gtab.small_delta is None or gtab.big_delta is None:
        return None
    n = len(gtab.bvals)
    timing = np.column_stack(
        [
            np.broadcast_to(np.asarray(gtab.small_delta, dtype=float), (n,)),
            np.broadcast_to(np.asarray(gtab.big_delta, dtype=float), (n,)),
        ]
    )
    # Timings written to the microsecond are one sequence.
    _, ids = np.unique(np.round(timing, 6), axis=0, return_inverse=True)
    return ids.ravel() if ids.max() > 0 else None


def _warn_shared_b0(model, sequences, b0s):
    """Warn when a sequence has no b = 0 of its own: it is normalised by the
    mean of the others', right only if the echo times are the same."""
    if sequences is None or not b0s.any():
        return
    lacking = [s for s in np.unique(sequences) if not b0s[sequences == s].any()]
    if lacking:
        warnings.warn(
            f"{model}: {len(lacking)} of {sequences.max() + 1} sequences (pulse "
            "timings) have no b = 0 volume of their own; their volumes are "
            "normalised by the mean of all b = 0 volumes, which is right only "
            "if they share the others' echo time. Acquire (or keep) a b = 0 "
            "per timing, or fit each echo time on its own.",
            stacklevel=4,
        )


def _no_b0_message(model, gtab):
    """Why ``model`` refuses the table ``gtab`` without b = 0 volume, and the
    fixes."""
    threshold = 0.0 if gtab.b0_threshold is None else float(gtab.b0_threshold)
    lowest = float(np.min(gtab.bvals))
    return (
        f"gtab has no b = 0 volume (no b-value <= gtab.b0_threshold = "
        f"{threshold:g} s/mm^2; the lowest is {lowest:g}): {model} takes S0 "
        "from the b = 0 volumes, and extrapolated from the weighted shells it "
        "trades off against the fast-decaying compartments (ActiveAx "
        "diameters go to their lower bound with S0 about doubled, NODDI's ndi "
        "drops). Include the b = 0 volumes of the acquisition in data and "
        "gtab; if the lowest shell is the b = 0 one stored as b = "
        f"{lowest:g}, build gtab with gradient_table(..., b0_threshold="
        f"{lowest:g})."
    )


class CompartmentModel(StartsMixin, LearnedMixin, CountsMixin, ReconstModel):
    """Base class: a multi-compartment model fitted by variable projection.

    Subclasses set, in ``__init__`` before calling :meth:`_setup`:
    ``_shared`` and ``_fibre`` (tuples of :class:`~.fitting.Bound`),
    ``_grid`` (name -> initial values, natural internal units),
    ``n_fibres`` and ``param_names``; and implement ``_shared_columns``
    (plus ``_fibre_columns`` when they have fibres), ``_to_params`` (fitted
    x and c -> public parameters) and ``_from_params`` (the inverse, for
    prediction).

    The options every model shares (``n_starts``, ``max_iter``,
    ``n_grid_directions``, ``chunk_size``, ``fit_method``, ``snr``,
    ``learned_options``, ``cache_dir``) are keywords of :meth:`_setup` and
    documented on each model.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable
    """

    #: Whether the model needs gradient timing (restricted or exchange blocks).
    _needs_timing = True
    #: Whether the model needs b = 0 volumes: its S0 is the sum of the
    #: fitted fractions times the mean b = 0 signal, and without a b = 0
    #: volume it is extrapolated from the weighted shells, where it trades
    #: off against the fast-decaying compartments (free water, small
    #: diameters): the fit converges, to the wrong tissue.
    _needs_b0 = False
    #: Columns per fibre population (Kf).
    _fibre_width = 1
    #: Jacobians by forward-mode autodiff instead of forward differences.
    _forward_mode = False
    #: Directions of single-fibre starts: "grid" (every grid direction scored
    #: against the data) or "tensor" (the tensor's principal direction, only
    #: the scalar grid values scored).
    _direction_starts = "grid"
    #: Polish iterations of learned estimates when ``learned_options`` leaves
    #: ``polish`` unset. One iteration brings the network's errors within
    #: 1.5x of the fitted ones (ActiveAx diameter 1.86x -> 1.26x) at >= 10,000
    #: voxels/s on 2 cores (doc/compartments.md, measured); ZCD takes 2.
    default_polish = 1
    _fit_class = None
    param_names = ()
    #: Constructor keywords the model keeps under another attribute than
    #: their own name (:meth:`settings`).
    _setting_attributes = {}

    def _setup(
        self,
        gtab,
        *,
        n_starts,
        max_iter,
        n_grid_directions,
        chunk_size,
        fit_method="varpro",
        snr=50.0,
        learned_options=None,
        cache_dir=None,
    ):
        ReconstModel.__init__(self, gtab)
        self._acq = Acquisition.from_gtab(gtab, timing=self._needs_timing)
        self.n_starts = check_int(n_starts, "n_starts", 1)
        self.max_iter = check_int(max_iter, "max_iter", 1)
        self.n_grid_directions = check_int(n_grid_directions, "n_grid_directions", 1)
        self.chunk_size = check_int(chunk_size, "chunk_size", 1)
        self._b0s = np.asarray(gtab.b0s_mask, dtype=bool)
        if self._needs_b0 and not self._b0s.any():
            raise ValueError(_no_b0_message(type(self).__name__, gtab))
        self._sequences = _sequence_ids(gtab)
        _warn_shared_b0(type(self).__name__, self._sequences, self._b0s)
        self.fit_method = check_choice(fit_method, "fit_method", FIT_METHODS)
        self.snr = check_positive(snr, "snr")
        self.learned_options = LearnedOptions.from_dict(learned_options)
        cache_root(cache_dir)  # a folder or None, checked before any fit
        self.cache_dir = cache_dir
        if self.fit_method == "learned" and self.fibres == "auto":
            raise ValueError(
                "fit_method='learned' needs a fixed n_fibres; fibres='auto' "
                "is fitted (fit_method='varpro')"
            )

    # -- settings and saved fits ---------------------------------------------
    def settings(self):
        """The constructor's keywords that rebuild this model, ``gtab`` aside.

        ``type(model)(model.gtab, **model.settings())`` is the same model:
        what :func:`dipy_spinverse.io.save_fit` keeps of it.

        Returns
        -------
        dict
            Every keyword-only argument of the model's constructor, as the
            model checked it; ``learned_options`` as a dict
            (:class:`~.learned.LearnedOptions`' fields).

        Raises
        ------
        TypeError
            A constructor keyword the model keeps no attribute of (a
            subclass's own option): keep it as ``self.<name>``, or name its
            attribute in ``_setting_attributes``.
        """
        settings = {}
        signature = inspect.signature(type(self).__init__)
        for name, parameter in signature.parameters.items():
            if parameter.kind is not parameter.KEYWORD_ONLY:
                continue
            attribute = self._setting_attributes.get(name, name)
            if not hasattr(self, attribute):
                raise TypeError(
                    f"{type(self).__name__} keeps no attribute {attribute!r} of "
                    f"its constructor's keyword {name!r}, so it cannot be "
                    f"described; keep it as self.{name} in __init__, or name its "
                    "attribute in _setting_attributes."
                )
            settings[name] = getattr(self, attribute)
        if "learned_options" in settings:
            settings["learned_options"] = asdict(self.learned_options)
        return settings

    def network_key(self):
        """The cache key its learned network is found by.

        Returns
        -------
        str or None
            The key (a hash of the model, its acquisitions, the training
            options and the code that trains it) of ``fit_method="learned"``;
            None for ``fit_method="varpro"``, which has no network.
        """
        return self._learned_key() if self.fit_method == "learned" else None

    def restored_fit(self, arrays):
        """The fit of this model whose arrays are ``arrays``.

        The counterpart of :meth:`CompartmentFit.saved_arrays
        <dipy_spinverse.masked.MaskedFit.saved_arrays>`, for
        :func:`dipy_spinverse.io.load_fit`.

        Parameters
        ----------
        arrays : dict of ndarray
            ``mask`` (the volume's), ``model_params`` and ``status`` (the
            rows of the mask's voxels) and, where the fit has them,
            ``sequence_levels``.

        Returns
        -------
        CompartmentFit subclass
            The model's fit class, holding the arrays as they are (dtypes
            kept).

        Raises
        ------
        ValueError
            An array missing, or of a shape or dtype this model's fits do
            not have (the arrays of another model, or damaged ones).
        """
        missing = [k for k in ("mask", "model_params", "status") if k not in arrays]
        if missing:
            raise ValueError(f"the arrays {missing} are missing")
        mask = np.asarray(arrays["mask"])
        if mask.dtype != bool or mask.ndim == 0:
            raise ValueError(
                f"mask must be a volume of bools, got {mask.dtype} of shape "
                f"{mask.shape}"
            )
        n = int(mask.sum())
        timings = None if self._sequences is None else int(self._sequences.max()) + 1
        params = {
            "model_params": np.asarray(arrays["model_params"]),
            "sequence_levels": arrays.get("sequence_levels"),
            "status": np.asarray(arrays["status"]),
        }
        shapes = {
            "model_params": (n, len(self.param_names)),
            "status": (n,),
            "sequence_levels": (n, timings),
        }
        for name, value in params.items():
            if value is None:
                continue
            value = params[name] = np.asarray(value)
            if value.shape != shapes[name]:
                raise ValueError(
                    f"{name} has shape {value.shape}, but {n} voxels of this "
                    f"{type(self).__name__} ({len(self.param_names)} parameters, "
                    f"{timings or 'no'} b = 0 levels) need {shapes[name]}"
                )
            kind = "iu" if name == "status" else "f"
            if value.dtype.kind not in kind:
                raise ValueError(f"{name} has dtype {value.dtype}")
        fit = object.__new__(self._fit_class)
        MaskedFit.__init__(fit, self, params, mask)
        return fit

    # -- parameter layout ---------------------------------------------------
    @property
    def _n_shared(self):
        return len(self._shared)

    def _unpack(self, x):
        """Unconstrained (B, P) -> shared {name: (B,)}, fibre {name: (B, F)},
        unit directions (B, F, 3). F follows from P."""
        S, Fs = self._n_shared, len(self._fibre)
        shared = {b.name: b.value(x[:, i]) for i, b in enumerate(self._shared)}
        per = x[:, S:].reshape(x.shape[0], -1, Fs + 3)
        fibre = {b.name: b.value(per[..., i]) for i, b in enumerate(self._fibre)}
        v = per[..., Fs:]
        dirs = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return shared, fibre, dirs

    def _renormalise(self, x):
        """Unit-length direction vectors (the columns do not see their norm)
        and bounded sigmoid arguments.

        A sigmoid that has run far into saturation has no gradient left, so
        a parameter pushed against a bound early on could never come back;
        capping its argument at +-_SIGMOID_CAP keeps a usable slope."""
        S, Fs = self._n_shared, len(self._fibre)
        per = x[:, S:].reshape(x.shape[0], -1, Fs + 3)
        v = per[..., Fs:]
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scalars = per[..., :Fs].clamp(-_SIGMOID_CAP, _SIGMOID_CAP)
        per = torch.cat([scalars, v], dim=-1)
        shared = x[:, :S].clamp(-_SIGMOID_CAP, _SIGMOID_CAP)
        return torch.cat([shared, per.reshape(x.shape[0], -1)], dim=1)

    def _columns_x(self, x, acq=None):
        shared, fibre, dirs = self._unpack(x)
        return self._columns(self._acq if acq is None else acq, shared, fibre, dirs)

    def _columns(self, acq, shared, fibre, dirs):
        """All columns (B, M, K): fibre columns, fibre-major, then shared ones.

        Subclasses with fibres implement ``_fibre_columns(acq, shared, fibre,
        dirs)`` -> (B, F, M, Kf); all implement ``_shared_columns(acq, shared,
        B)`` -> (B, M, Ke).
        """
        blk = self._fibre_columns(acq, shared, fibre, dirs) if dirs.shape[1] else None
        return self._assembled(acq, blk, shared, dirs.shape[0])

    def _assembled(self, acq, blk, shared, B):
        """Columns (B, M, K) from fibre columns (B, F, M, Kf) (or None)."""
        parts = []
        if blk is not None:
            parts.append(blk.permute(0, 2, 1, 3).reshape(B, len(acq), -1))
        parts.append(self._shared_columns(acq, shared, B))
        return torch.cat(parts, dim=-1)

    #: Whether the model implements ``_fibre_columns_and_jacobian(x)`` ->
    #: (fibre columns (B, F, M, Kf), ``jacobian(c)`` -> ``d(Phi c)/dx``):
    #: closed-form derivatives that evaluate the fibre columns on the way.
    _closed_form_jacobian = False

    def _columns_and_jacobian(self, x):
        """Columns (B, M, K) at x and ``jacobian(c)`` -> ``d(Phi c)/dx``
        there, from one evaluation of the fibre compartments (models with
        ``_closed_form_jacobian``; no shared nonlinear parameters)."""
        blk, jacobian = self._fibre_columns_and_jacobian(x)
        return self._assembled(self._acq, blk, {}, x.shape[0]), jacobian

    def _derivatives(self, x, Phi, c):
        """``d(Phi c)/dx`` (B, M, P): in closed form where the model has it
        (``_closed_form_jacobian``), by forward-mode autodiff where it asks
        for it (``_forward_mode``), else by forward differences.

        Without shared parameters, a fibre's parameters move only that fibre's
        columns: each parameter is perturbed in every fibre at once and only
        the fibre columns are recomputed, F times cheaper than perturbing the
        F (Fs + 3) parameters one by one.
        """
        if self._closed_form_jacobian:
            return self._fibre_columns_and_jacobian(x)[1](c)
        if self._forward_mode:
            return forward_mode(self._columns_x, x, Phi, c)
        S, Fs = self._n_shared, len(self._fibre)
        B, P = x.shape
        F = (P - S) // (Fs + 3)
        if S or not F:
            return forward_differences(self._columns_x, x, Phi, c)
        J = Fs + 3
        M, Kf = Phi.shape[1], self._fibre_width
        per = x.view(B, F, J)
        h = fd_steps(per)  # (B, F, J)
        # pert[b, j, k] = per[b, k] + h[b, k, j] e_j
        pert = per[:, None] + torch.diag_embed(h).permute(0, 2, 1, 3)
        _, fibre, dirs = self._unpack(pert.reshape(B * J, P))
        blk = self._fibre_columns(self._acq, {}, fibre, dirs).view(B, J, F, M, Kf)
        base = Phi[..., : F * Kf].reshape(B, M, F, Kf).permute(0, 2, 1, 3)
        cf = c[:, : F * Kf].reshape(B, F, Kf)
        d = ((blk - base[:, None]) @ cf[:, None, :, :, None])[..., 0]  # (B,J,F,M)
        d = d / h.permute(0, 2, 1)[..., None]
        return d.permute(0, 3, 2, 1).reshape(B, M, F * J)

    def _fibre_jacobian(self, x, d_scalars, d_cos):
        """``d(Phi c)/dx`` (B, M, P) from closed-form fibre derivatives.

        For models without shared nonlinear parameters. ``d_scalars`` is a
        sequence of Fs tensors (B, F, M): the derivatives of each fibre's
        weighted signal (its columns times their coefficients) in the values
        of its bounded parameters, in the order of ``_fibre``; ``d_cos``
        (B, F, M) those in ``g . mu`` for its unit axis mu. The bounds'
        slopes (:meth:`~.fitting.Bound.slope`) and the axis normalisation
        mu = v / |v| (``d(g . mu)/dv = (g - (g . mu) mu) / |v|``) are chained
        on here, each column written once into the layout of x.
        """
        B, P = x.shape
        Fs = len(self._fibre)
        per = x.view(B, -1, Fs + 3)
        F, M = per.shape[1], d_cos.shape[-1]
        # Filled row by row in (B, P, M) (contiguous writes) and returned
        # as its transposed view: the matrix products downstream take
        # either layout, and no copy is made.
        J = x.new_empty(B, F, Fs + 3, M)
        for i, (bound, d) in enumerate(zip(self._fibre, d_scalars, strict=True)):
            torch.mul(d, bound.slope(per[..., i])[..., None], out=J[:, :, i])
        v = per[..., Fs:]
        norm = v.norm(dim=-1, keepdim=True)
        mu = v / norm
        cos = mu @ self._acq.bvecs.T  # (B, F, M)
        scaled = d_cos / norm
        radial = scaled * cos
        for k in range(3):
            J[:, :, Fs + k] = (
                scaled * self._acq.bvecs[:, k] - radial * mu[..., k : k + 1]
            )
        return J.view(B, P, M).mT

    # -- fitting --------------------------------------------------------------
    def _directed_start(self, x, directions):
        """Start ``x`` (B, P) with its fibre directions replaced by the given
        ones (B, D, 3), strongest first; zero rows (no peak) keep the start's
        own direction."""
        S, Fs = self._n_shared, len(self._fibre)
        B = x.shape[0]
        per = x[:, S:].reshape(B, self.n_fibres, Fs + 3).clone()
        n = min(self.n_fibres, directions.shape[1])
        given = directions[:, :n]
        has = given.norm(dim=-1, keepdim=True) > 0
        per[:, :n, Fs:] = torch.where(has, given, per[:, :n, Fs:])
        return torch.cat([x[:, :S], per.reshape(B, -1)], dim=1)

    def _fit_normalised(self, y, *, directions=None):
        """Unconstrained parameters and NNLS coefficients for signals / S0.

        All starts take a few Levenberg-Marquardt iterations; only the best
        of each voxel is then iterated to convergence (starts rarely change
        rank once they have settled into their basins, and this divides the
        cost by about ``n_starts``). ``directions`` (B, D, 3), e.g. CSD peaks,
        add one start: the first grid start with those fibre directions.
        """
        if not self.n_fibres and not self._shared:
            # Nothing nonlinear (NODDI without fibres): one NNLS.
            x = y.new_zeros(y.shape[0], 0)
            return x, nnls(self._columns_x(x), y)
        if self.n_fibres > 1:
            starts = self._greedy_starts(y)
        elif self.n_fibres == 1 and self._direction_starts == "tensor":
            starts = self._tensor_starts(y)
        else:
            starts = self._grid_starts(y)
        if directions is not None:
            directed = self._directed_start(starts[:, 0], directions)
            starts = torch.cat([starts, directed[:, None]], dim=1)
        B, S, P = starts.shape
        x = starts.reshape(B * S, P)
        if S > 1:
            yy = y[:, None].expand(B, S, -1).reshape(B * S, -1)
            x, _, cost = levenberg_marquardt(
                self._columns_x,
                yy,
                x,
                max_iter=min(_SCREEN_ITERATIONS, self.max_iter),
                renormalise=self._renormalise,
                derivatives=self._derivatives,
            )
            x = x[torch.arange(B) * S + cost.view(B, S).argmin(1)]
        x, c, _ = levenberg_marquardt(
            self._columns_x,
            y,
            x,
            max_iter=self.max_iter,
            renormalise=self._renormalise,
            derivatives=self._derivatives,
        )
        return x, c

    def _check_data(self, data, mask):
        data = np.asarray(data)
        if np.iscomplexobj(data):
            raise ValueError(
                "data must be real: magnitude signals (np.abs(data)), or the real "
                "part of phase-corrected data (data.real)"
            )
        if data.dtype.kind not in "iuf":
            raise ValueError(
                f"data must hold numbers (signal magnitudes), got dtype "
                f"{data.dtype}; convert it, e.g. np.asarray(data, dtype=float)"
            )
        data = data.astype(np.float64, copy=False)
        n = len(self._acq)
        if data.ndim < 1 or data.shape[-1] != n:
            raise ValueError(
                f"data has shape {data.shape}, but gtab has {n} volumes; the last "
                "axis of data must hold one value per gradient-table volume"
            )
        spatial = data.shape[:-1]
        if mask is None:
            return data, np.ones(spatial, dtype=bool)
        mask = np.asarray(mask)
        if mask.shape != spatial:
            raise ValueError(
                f"mask has shape {mask.shape}, but data has spatial shape "
                f"{spatial}; give one mask value per voxel (data.shape[:-1])"
            )
        return data, check_mask_values(mask)

    def _s0_estimate(self, signals):
        """Mean b = 0 signal per voxel (the largest signal without b = 0)."""
        if self._b0s.any():
            return signals[:, self._b0s].mean(-1)
        return signals.max(-1)

    def _b0_scales(self, signals, s0):
        """The signal each volume is divided by (V, N), and each voxel's
        b = 0 level per pulse timing over ``s0`` (V, n_timings; None where
        one b = 0 serves every timing).

        Sequences (pulse timings) at different echo times have different
        b = 0 levels (T2 decay); each is then divided by the mean b = 0 of
        its own sequence, per voxel, as the ISBI 2015 voxels need (one mean
        b = 0 made ActiveAx read 0.2 um there). Where the b = 0 levels agree
        (the median over the voxels of each sequence's level is within
        :data:`B0_LEVEL_TOL` of the pooled one), the pooled mean ``s0`` is
        used: the same normalisation, less noisy. A sequence without b = 0
        (warned at construction) takes ``s0``.
        """
        scales = np.repeat(s0[:, None], signals.shape[-1], axis=1)
        if self._sequences is None or not self._b0s.any():
            return scales, None
        levels = np.ones((len(signals), self._sequences.max() + 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            for sequence in np.unique(self._sequences):
                b0 = (self._sequences == sequence) & self._b0s
                if b0.any():
                    levels[:, sequence] = signals[:, b0].mean(-1) / s0
            medians = np.nanmedian(levels, axis=0)
        if not np.any(np.abs(medians - 1.0) > B0_LEVEL_TOL):
            return scales, None
        logger.info(
            f"{type(self).__name__}: b = 0 levels differ between pulse timings "
            f"(median ratios to the pooled b = 0: "
            f"{', '.join(f'{v:.3f}' for v in medians)}); each timing is "
            "normalised by its own b = 0."
        )
        return scales * levels[:, self._sequences], levels

    @warning_for_keywords()
    def fit(self, data, *, mask=None, fibres=None):
        """Fit the model to every voxel in ``mask``.

        Parameters
        ----------
        data : array_like, shape (..., N)
            Signals; the last axis follows the gradient table.
        mask : array_like of bool, shape data.shape[:-1], optional
            Voxels to fit (default all). Parameters outside are 0.
        fibres : "auto" or array_like of int, shape data.shape[:-1], optional
            Only for models built with ``fibres="auto"``: the number of fibre
            populations of every voxel (0 to ``model.n_fibres``), or "auto"
            (the default of such models) to choose it from CSD peaks and a
            model-selection test.

        Returns
        -------
        fit : CompartmentFit subclass
            Voxels whose signals are not finite, or whose b = 0 signal is not
            positive (or so small that the signals divided by it overflow),
            get NaN parameters and the status ``NONFINITE`` or ``BAD_B0``
            (``fit.status``, as the search's and the posterior's fits); the
            others are fitted regardless (``OK``, or ``DIVERGED`` where the
            fit returned a non-finite S0).
        """
        data, mask = self._check_data(data, mask)
        counts = self._check_fibres(fibres, mask)
        n_params = len(self.param_names)
        params = np.zeros(mask.shape + (n_params,))
        signals = data[mask]  # (V, N)
        s0 = self._s0_estimate(signals)
        scales, levels = self._b0_scales(signals, s0)
        finite = np.isfinite(signals).all(-1)
        ok = finite & np.isfinite(scales).all(-1)
        ok &= np.isfinite(s0) & (s0 > 0) & (scales > 0).all(-1)
        with np.errstate(over="ignore"):
            y = signals / np.where(ok[:, None], scales, 1.0)
        # A b = 0 signal so small (e.g. denormal) that the normalised signals
        # overflow is no signal either: NaN for that voxel alone.
        overflow = ok & ~np.isfinite(y).all(-1)
        ok &= ~overflow
        # The gate's statuses, as the search's and the posterior's.
        status = np.where(finite & ~overflow, BAD_B0, NONFINITE)
        status[ok] = OK
        out = np.full((signals.shape[0], n_params), np.nan)
        y_ok = y[ok]
        s0_ok = s0[ok]
        if ok.any():
            if self.fit_method == "learned":
                out[ok] = self._fit_learned(y_ok, s0_ok)
            elif self.fibres == "auto":
                counts_ok = None if counts is None else counts[mask][ok]
                out[ok] = self._fit_variable(signals[ok], y_ok, s0_ok, counts_ok)
            else:
                out[ok] = self._fit_fixed(y_ok, s0_ok)
        params[mask] = out
        status[ok & ~np.isfinite(out[:, 0])] = DIVERGED
        sequence_levels = None
        if levels is not None:
            sequence_levels = np.ones(mask.shape + levels.shape[-1:])
            sequence_levels[mask] = np.where(ok[:, None], levels, np.nan)
        return self._fit_class(
            self,
            params,
            mask=mask,
            sequence_levels=sequence_levels,
            status=spread(status, mask, MASKED),
        )

    #: "auto" for models whose fibre count varies per voxel (set by
    #: subclasses that support it), else None.
    fibres = None
    #: "varpro" (variable-projection fitting) or "learned".
    fit_method = "varpro"

    def _check_fibres(self, fibres, mask):
        if isinstance(fibres, str):
            check_choice(fibres, "fibres", ("auto",))
        if fibres is None or isinstance(fibres, str):
            if fibres is not None and self.fibres != "auto":
                raise ValueError("fibres='auto' needs a model built with fibres='auto'")
            return None
        if self.fibres != "auto":
            raise ValueError(
                "a per-voxel fibre count map needs a model built with "
                "fibres='auto' (this one has a fixed n_fibres)"
            )
        counts = np.asarray(fibres)
        if counts.shape != mask.shape:
            raise ValueError(
                f"fibres has shape {counts.shape}, but data has spatial shape "
                f"{mask.shape}; give one count per voxel"
            )
        if not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(
                f"fibres must hold integers, got dtype {counts.dtype}; convert a "
                "count map read as floats with np.rint(counts).astype(int)"
            )
        inside = counts[mask]
        if inside.size and (inside.min() < 0 or inside.max() > self.n_fibres):
            raise ValueError(
                f"fibres must lie in 0..{self.n_fibres} inside the mask, got "
                f"{inside.min()}..{inside.max()}"
            )
        return counts.astype(np.int64)

    def _fit_fixed(self, y, s0, *, directions=None, with_cost=False):
        """Public parameters (V, n_params) of normalised signals ``y`` (V, M)
        with S0 ``s0`` (V,), at most ``chunk_size`` voxels at a time; with
        ``with_cost`` also the residual sums of squares (V,)."""

        # Not reconst's fit_chunk (a model's fit of a chunk of voxels): the
        # rows start:stop of this fit's own arrays.
        def fit_rows(start, stop):
            with torch.no_grad():
                yi = torch.tensor(y[start:stop], dtype=DTYPE)
                scale = torch.tensor(s0[start:stop], dtype=DTYPE)
                di = None
                if directions is not None:
                    di = torch.tensor(directions[start:stop], dtype=DTYPE)
                x, c = self._fit_normalised(yi, directions=di)
                shared, fibre, dirs = self._unpack(x)
                params = self._to_params(shared, fibre, dirs, c, scale).numpy()
                if not with_cost:
                    return params, None
                r = yi - (self._columns_x(x) @ c[..., None])[..., 0]
                return params, (r**2).sum(-1).numpy()

        parts = map_chunks(
            fit_rows,
            y.shape[0],
            step=self.chunk_size,
            desc=f"{type(self).__name__} fit",
        )
        params = np.concatenate([p for p, _ in parts])
        return (params, np.concatenate([c for _, c in parts])) if with_cost else params

    # -- prediction -----------------------------------------------------------
    def _fill_padding(self, params):
        """Parameters with the NaN of absent fibres (per-voxel counts)
        replaced by a fibre of weight 0, so that only unfitted voxels stay
        NaN."""
        return params

    def _predict_params(self, params, acq, S0=None, mask=None):
        """Signals (..., M) from public parameters (..., n_params).

        0 outside ``mask`` (default: where any parameter is non-zero; ``fit``
        writes zeros outside its mask), NaN where a parameter is not finite
        (voxels that could not be fitted); only the other voxels are
        simulated, ``chunk_size`` at a time.
        """
        params = self._fill_padding(np.asarray(params, dtype=np.float64))
        shape = params.shape[:-1]
        if mask is None:
            mask = np.any(params != 0, axis=-1)
        mask = np.broadcast_to(np.asarray(mask, dtype=bool), shape)
        finite = np.isfinite(params).all(-1)
        signal = np.zeros(shape + (len(acq),))
        signal[mask & ~finite] = np.nan
        todo = mask & finite
        flat = torch.tensor(params[todo], dtype=DTYPE)
        out = []
        with torch.no_grad():
            for i in range(0, flat.shape[0], self.chunk_size):
                shared, fibre, dirs, fractions, s0 = self._from_params(
                    flat[i : i + self.chunk_size]
                )
                Phi = self._columns(acq, shared, fibre, dirs)
                out.append(((Phi @ fractions[..., None])[..., 0] * s0[:, None]).numpy())
        if out:
            signal[todo] = np.concatenate(out)
        if S0 is not None:
            # The fitted S0 is replaced: divide it out, multiply by the new one.
            fitted = params[..., 0]
            new = check_s0(S0, shape, where=todo)
            with np.errstate(invalid="ignore", divide="ignore"):
                scaled = signal / fitted[..., None] * new[..., None]
            signal = np.where(todo[..., None], scaled, signal)
        return signal


class CompartmentFit(MaskedFit):
    """Fit of a :class:`CompartmentModel`: a view over one parameter array.

    The volume machinery (shape, mask, indexing, status) is every fit's
    (:class:`~dipy_spinverse.masked.MaskedFit`): the fit holds the
    parameters of the voxels of its mask, and :attr:`model_params` spreads
    them over the volume.

    Parameters
    ----------
    model : CompartmentModel
    model_params : ndarray, shape (..., n_params)
        Layout given by ``model.param_names``; ``model_params[..., 0]`` is S0.
        All zeros outside the mask, NaN where a voxel could not be fitted.
    mask : array_like of bool, shape (...), optional
        Voxels of the fit (default: those with any non-zero parameter).
    sequence_levels : ndarray, shape (..., n_timings), optional
        Each voxel's b = 0 level per pulse timing over its S0, where the fit
        normalised each timing by its own b = 0 (echo times that differ);
        :meth:`predict` on the model's own table applies it.
    status : ndarray of int, shape (...), optional
        Each voxel's status (:data:`~dipy_spinverse.masked.COMMON_CODES`), as
        :meth:`CompartmentModel.fit` gives it. Default: ``OK`` where S0 is
        finite, ``NONFINITE`` where it is not.
    """

    def __init__(
        self, model, model_params, *, mask=None, sequence_levels=None, status=None
    ):
        model_params = np.asarray(model_params)
        if mask is None:
            mask = np.any(model_params != 0, axis=-1)
        mask = np.broadcast_to(np.asarray(mask, dtype=bool), model_params.shape[:-1])
        # A boolean index of one voxel (a 0-d mask) keeps a row axis: one
        # row, or none outside the mask, as a volume's rows.
        rows = model_params[mask]
        if status is None:
            status = np.where(np.isfinite(rows[:, 0]), OK, NONFINITE)
        else:
            status = np.asarray(status)[mask]
        levels = None if sequence_levels is None else np.asarray(sequence_levels)
        params = dict(
            model_params=rows,
            sequence_levels=None if levels is None else levels[mask],
            status=status,
        )
        MaskedFit.__init__(self, model, params, mask)

    @property
    def model_params(self):
        """The fitted parameters (..., n_params) (``model.param_names``): 0
        outside the mask, NaN where a voxel could not be fitted."""
        return self._volume(self.params["model_params"], 0.0)

    @property
    def sequence_levels(self):
        """Each voxel's b = 0 level per pulse timing over its S0 (...,
        n_timings), 1 outside the mask; None where one b = 0 served every
        timing."""
        levels = self.params["sequence_levels"]
        return None if levels is None else self._volume(levels, 1.0)

    def _param(self, name):
        column = self.model.param_names.index(name)
        return self._volume(self.params["model_params"][:, column], 0.0)

    @property
    def S0(self):
        """Fitted signal without diffusion weighting (same units as data)."""
        return self._volume(self.params["model_params"][:, 0], 0.0)

    def _per_fibre(self, name):
        """Map of ``name``: (...) where the layout has one value per voxel,
        (..., F) where it has one per fibre (``name_0``, ``name_1``, ...)."""
        names = self.model.param_names
        if name in names:
            return self._param(name)
        F = self.model.n_fibres
        if F == 0:
            return np.zeros(self.shape + (0,))
        return np.stack([self._param(f"{name}_{k}") for k in range(F)], axis=-1)

    def _direction_stack(self):
        slots = self.model._direction_slots()
        if not slots:
            return np.zeros(self.shape + (0, 3))
        rows = self.params["model_params"]
        return self._volume(np.stack([rows[:, s : s + 3] for s in slots], 1), 0.0)

    @property
    def n_fibres(self):
        """Fibre populations of every voxel (int array, 0 outside the mask
        and where the voxel could not be fitted)."""
        dirs = self._direction_stack()
        present = np.isfinite(dirs).all(-1).sum(-1)
        return np.where(self.fitted, present, 0).astype(np.int64)

    @property
    def directions(self):
        """Fibre directions (..., F, 3), strongest first, as DIPY's
        ``TensorFit.directions`` (F = 1) and ``peak_dirs``: unit vectors,
        zero rows for absent fibres, outside the mask and in unfitted voxels,
        so they can seed and drive DIPY's tractography."""
        dirs = self._direction_stack()
        keep = np.isfinite(dirs).all(-1, keepdims=True) & self.mask[..., None, None]
        return np.where(keep, dirs, 0.0)

    @warning_for_keywords()
    def predict(self, gtab=None, *, S0=None):
        """Predict signals from the fitted parameters.

        Parameters
        ----------
        gtab : dipy.core.gradients.GradientTable, optional
            Acquisitions to predict (with timing where the model needs it);
            default the model's own table.
        S0 : float or array_like of shape ``self.shape``, optional
            Signal without diffusion weighting; default the fitted S0 (from
            the mean of all b = 0 volumes). Where the fit normalised each
            pulse timing by its own b = 0 (echo times that differ), the
            prediction of the model's own table (``gtab`` and ``S0`` not
            given) scales each timing by its b = 0 level
            (``sequence_levels``), as the data are; with another table or
            an ``S0`` one S0 serves every timing (the models do not describe
            T2 weighting).

        Returns
        -------
        signal : ndarray, shape self.shape + (N,)
            0 outside the mask (as DIPY's fits), NaN in voxels that could not
            be fitted (non-finite data or b = 0 signal <= 0).
        """
        model = self.model
        acq = (
            model._acq
            if gtab is None
            else Acquisition.from_gtab(gtab, timing=model._needs_timing)
        )
        signal = model._predict_params(self.model_params, acq, S0, self.mask)
        if gtab is None and S0 is None and self.sequence_levels is not None:
            signal = signal * self.sequence_levels[..., model._sequences]
        return signal
