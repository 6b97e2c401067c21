"""``SpinverseModel(gtab, fit_method="posterior")``: calibrated descriptor maps.

Each voxel's b0-normalised signal and its noise level go through the
amortised posterior (:mod:`dipy_spinverse.posterior`); the fit holds, per
voxel of the mask, the posterior median and the 50 % and 90 % central
credible intervals of every descriptor, and draws more samples on demand.

=================  ====  =====================================================
name               code  meaning
=================  ====  =====================================================
OK                 0     posterior computed
NONFINITE          1     the data contain NaN or inf, or overflow once
                         b0-normalised
BAD_B0             2     the mean b = 0 signal (of some sequence) is <= 0
OUT_OF_PRIOR       6     the signal lies outside the prior: beyond the
                         :data:`PREDICTIVE_LEVEL` predictive region of the
                         training signals with the voxel's noise (the prior
                         predictive check, :mod:`~dipy_spinverse.posterior.
                         envelope`), or no simulation of the prior explains
                         it within the noise
                         (:meth:`PosteriorEstimator.support_statistic` above
                         its 99.9 % in-prior level): the tissue, the
                         diffusivity or the protocol lies outside what the
                         posterior was trained on. Maps are NaN: a posterior
                         there would be a confident guess.
IMPOSSIBLE_SIGNAL  8     the attenuation of some sequence is above 1 beyond
                         the noise (``reconst.plausibility.impossible_signal``):
                         no tissue produces it. Maps are NaN, as outside the
                         prior, which holds tissue only. It outranks
                         ``OUT_OF_PRIOR``: it says why the signal is out of
                         reach.
MASKED             -2    outside the mask
=================  ====  =====================================================

A protocol that cannot determine the membranes (one diffusion time,
directions that do not span 3-D; ``UNDERDETERMINED`` of the label search) is
no status here: the posterior's calibrated intervals widen to what the
protocol leaves open.
"""

import numbers
import warnings

import numpy as np
import torch
from dipy.utils.logging import logger

from ..checks import check_int, check_s0
from ..masked import COMMON_CODES, MaskedFit
from ..posterior.calibration import calibrated_draws
from ..posterior.predictive import predictive_signals
from ..posterior.targets import TISSUE_TARGETS
from .codes import BAD_B0, IMPOSSIBLE_SIGNAL, MASKED, NONFINITE, OK
from .fit import SpinverseFit
from .gate import admit, gradient_tables, s0_per_acquisition
from .noise import warn_noise

__all__ = [
    "PosteriorFit",
    "fit_posterior",
    "volume_iou_bound",
    "surface_volume_bound",
    "OUT_OF_PRIOR",
    "PREDICTIVE_LEVEL",
    "POSTERIOR_STATUS_CODES",
    "KEPT",
    "kept_index",
    "check_level",
    "interval_rows",
    "noisiest_sequence",
    "flow_draws",
]


OUT_OF_PRIOR = 6

#: The prior predictive region beyond which a voxel is ``OUT_OF_PRIOR``:
#: one in a thousand of the prior's own noisy signals lies beyond it (as
#: the support statistic's; the grid's approximation error, which the
#: training models, is not in the training signals).
PREDICTIVE_LEVEL = 0.999

#: Status codes of a posterior fit and their meaning.
POSTERIOR_STATUS_CODES = {
    OK: COMMON_CODES[OK],
    NONFINITE: COMMON_CODES[NONFINITE],
    BAD_B0: COMMON_CODES[BAD_B0],
    OUT_OF_PRIOR: "signal outside the prior's support",
    IMPOSSIBLE_SIGNAL: "attenuation above 1 beyond the noise: no tissue produces it",
    MASKED: COMMON_CODES[MASKED],
}

#: Quantiles kept per voxel and descriptor: the median and the bounds of the
#: 50 % and 90 % central credible intervals.
KEPT = (0.05, 0.25, 0.5, 0.75, 0.95)
#: Posterior draws simulated per voxel by :meth:`PosteriorFit.predict`.
N_PREDICTIVE = 16
# Flow draws made together (voxels x samples): bounds the memory of a batch
# (about 50 MB of activations at the default network's width).
_DRAWS_PER_BATCH = 1 << 16


def _voxels_per_batch(n_samples):
    return max(1, _DRAWS_PER_BATCH // int(n_samples))


def fit_posterior(model, rows, *, n_samples, seed=0):
    """Posterior summaries of the voxels ``rows`` (n, n_volumes) of ``model``.

    Parameters
    ----------
    model : SpinversePosteriorModel
        The model (protocol, ``sigma`` in the data's units, trained
        estimator).
    rows : ndarray (n, n_volumes)
        The voxels' raw signals.
    n_samples : int
        Posterior draws per voxel.
    seed : int, optional
        Seed of the draws.

    Returns
    -------
    dict
        ``status`` (n,), ``inputs`` (n, n_volumes) b0-normalised signals,
        ``sigma`` (n,), ``S0`` (n,), ``S0_sequences`` (n, n_sequences), per
        scalar descriptor of the prior's ``targets`` its quantiles (n, 5)
        at :data:`KEPT`, and, where they have one, ``orientation`` (n, 3).
    """
    gate = admit(rows, model.protocol, sigma=model.sigma)
    n = len(gate.status)
    status = gate.status.copy()
    # Outside every prior: no tissue attenuates above its b = 0 signal.
    status[gate.impossible] = IMPOSSIBLE_SIGNAL
    good = status == OK
    inputs = np.full((n, len(model.protocol)), np.nan, dtype=np.float32)
    inputs[good] = gate.signals.normalised[good]
    sigma = gate.relative.astype(np.float32)
    warn_noise(sigma[good], snr_range=model.posterior_options.snr_range)
    targets = model.prior.prior.targets
    summary = {name: np.full((n, len(KEPT)), np.nan) for name in targets.scalars}
    if targets.orientation:
        summary["orientation"] = np.full((n, 3), np.nan)
    estimator = model.estimator
    rows = np.flatnonzero(good)
    # The prior predictive check of the training signals: a voxel whose
    # signal lies beyond them as a whole is outside the prior even where
    # some training signal lies near it acquisition by acquisition.
    distance, limit = model.predictive_envelope.distance(
        inputs[rows], noisiest_sequence(gate, rows)
    )
    far = np.zeros(n, dtype=bool)
    far[rows] = ~(distance <= limit)  # a NaN distance is outside
    batches = _posterior_draws(estimator, inputs, sigma, rows, n_samples, seed, far=far)
    for outside, keep, values in batches:
        status[outside] = OUT_OF_PRIOR
        if not len(keep):
            continue
        for name in targets.scalars:
            levels = estimator.quantile_levels(name, KEPT)
            summary[name][keep] = np.quantile(values[name], levels, axis=0).T
        if targets.orientation:
            summary["orientation"][keep] = _mean_axis(values["orientation"])
    return dict(
        status=status,
        inputs=inputs,
        sigma=sigma,
        S0=gate.S0,
        S0_sequences=gate.S0_sequences,
        **summary,
    )


def noisiest_sequence(gate, rows):
    """Each voxel's relative noise in its noisiest sequence: the noise over
    its smallest per-sequence b = 0 scale (a longer echo time, a smaller b =
    0 and more noise once normalised). The predictive region is measured at
    it: never narrower than any sequence's noise allows.

    Parameters
    ----------
    gate : Admitted
        :func:`~dipy_spinverse.reconst.gate.admit`'s voxels.
    rows : ndarray of int
        Admitted rows.

    Returns
    -------
    ndarray (len(rows),)
    """
    smallest = gate.S0_sequences[rows].min(axis=1)
    return gate.relative[rows] * gate.S0[rows] / smallest


def flow_draws(sample, inputs, sigma, rows, *, per_batch, outside=None):
    """The flow draws of the voxels ``rows``, a batch at a time: the one loop
    of the posterior fits' draws (their maps, intervals, samples and
    predictions; the protocol-free fit's too).

    Parameters
    ----------
    sample : callable
        ``sample(x, s)``: the estimator's draws (a tensor ``(n_samples,
        len(x), ...)``) for a batch's inputs ``x`` and relative noise ``s``
        (tensors). Every batch is drawn with the same seed: a voxel's draws
        are seeded by its own data, not by its batch.
    inputs : ndarray (n, ...)
        The voxels' inputs to the estimator.
    sigma : ndarray (n,)
        Their relative noise.
    rows : ndarray of int
        The voxels drawn from, in order.
    per_batch : int
        Voxels drawn from together (it bounds the network's memory).
    outside : callable, optional
        ``outside(part, x, s)``: a boolean array of the batch's voxels not
        to draw from (default none).

    Yields
    ------
    part : ndarray of int
        A batch of ``rows``.
    drawn : ndarray of bool (len(part),)
        Those drawn from.
    draws : ndarray (n_samples, drawn.sum(), ...) or None
        Their draws; None where none is drawn from.
    """
    for start in range(0, len(rows), per_batch):
        part = rows[start : start + per_batch]
        x = torch.as_tensor(inputs[part])
        s = torch.as_tensor(sigma[part])
        if outside is None:
            yield part, np.ones(len(part), dtype=bool), sample(x, s).numpy()
            continue
        out = outside(part, x, s)
        if out.all():
            yield part, ~out, None
            continue
        yield part, ~out, sample(x[~out], s[~out]).numpy()


def _posterior_draws(estimator, inputs, sigma, rows, n_samples, seed, *, far=None):
    """Batches of ``rows``: ``(rows outside the prior's support, rows inside,
    their decoded flow draws (n_samples, len(inside)))``; outside are those
    no training signal explains within the noise and, where given, the rows
    ``far`` (a mask over ``inputs``: beyond the prior predictive region)."""
    if far is None:
        far = np.zeros(len(inputs), dtype=bool)

    def outside(part, x, s):
        statistic = estimator.support_statistic(x, s)
        return (statistic > estimator.support_limit(s)).numpy() | far[part]

    def sample(x, s):
        return estimator.sample(x, s, n_samples, generator_seed=seed)

    batches = flow_draws(
        sample,
        inputs,
        sigma,
        rows,
        per_batch=_voxels_per_batch(n_samples),
        outside=outside,
    )
    for part, drawn, draws in batches:
        values = {} if draws is None else estimator.targets.decode(draws)
        yield part[~drawn], part[drawn], values


def volume_iou_bound(fraction_draws, fraction):
    """Expected ``1 - IoU`` that the restricted volume alone implies.

    Two sets of volumes ``a <= b`` overlap by at most ``a`` and join to at
    least ``b``, so ``IoU <= a / b`` whatever their shapes and positions
    (translations and point inversions of the truth included). Averaged over
    posterior draws of the true restricted fraction, ``1 - min / max`` is a
    lower bound on the answer's expected ``1 - IoU``: an answer whose volume
    the posterior does not support cannot be trusted, however well its
    search converged.

    Parameters
    ----------
    fraction_draws : ndarray (n_samples, n)
        Posterior draws of each voxel's restricted fraction.
    fraction : ndarray (n,)
        The answer's restricted fraction (its cells' volume over the box's).

    Returns
    -------
    ndarray (n,)
        In [0, 1]: 0 only when every draw equals the answer's volume; 1 for
        an answer without cells.
    """
    draws = np.asarray(fraction_draws, dtype=np.float64)
    fraction = np.asarray(fraction, dtype=np.float64)
    low, high = np.minimum(draws, fraction), np.maximum(draws, fraction)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(high > 0, low / high, 1.0)
    return 1.0 - ratio.mean(axis=0)


def surface_volume_bound(estimator, signals, fractions, *, relative, n_samples, seed=0):
    """The surface check of the label search's answers (``prior=`` with
    ``fit_method="search"``).

    Parameters
    ----------
    estimator : PosteriorEstimator
        The surface check's posterior
        (:attr:`~dipy_spinverse.reconst.search_settings.SurfaceCheck.estimator`).
    signals : VoxelSignals
        The voxels, normalised once upstream.
    fractions : ndarray (n,)
        Each answer's restricted fraction.
    relative : ndarray (n,)
        The voxels' relative noise, as the gate gives it
        (:attr:`~dipy_spinverse.reconst.gate.Admitted.relative`).
    n_samples : int
        Posterior draws per voxel.
    seed : int, optional

    Returns
    -------
    bound : ndarray (n,)
        :func:`volume_iou_bound` under the recalibrated posterior of the
        restricted fraction; 1 where the signal lies outside the prior's
        support (nothing vouches for the surface there).
    outside : ndarray of bool (n,)
        Those voxels.
    """
    inputs = np.asarray(signals.normalised, dtype=np.float32)
    sigma = np.asarray(relative).astype(np.float32)
    bound = np.ones(len(inputs))
    outside = np.zeros(len(inputs), dtype=bool)
    table = estimator.level_table("restricted_fraction")
    rng = np.random.default_rng(seed)
    rows = np.arange(len(inputs))
    for out, keep, values in _posterior_draws(
        estimator, inputs, sigma, rows, n_samples, seed
    ):
        outside[out] = True
        if len(keep):
            draws = calibrated_draws(values["restricted_fraction"], table, rng)
            bound[keep] = volume_iou_bound(draws, fractions[keep])
    return bound, outside


def _log_unrealised(signals):
    """Log the posterior draws that no tissue of the prior realised."""
    failed = np.isnan(signals).all(axis=-1)
    if failed.any():
        logger.warning(
            "%d of %d posterior draws (%d voxels) are realised by no tissue of "
            "the prior at its resolution; their voxels' predictions average "
            "the rest (NaN where none is left).",
            failed.sum(),
            failed.size,
            failed.any(axis=1).sum(),
        )


def _mean_axis(axes):
    """The principal axis of the mean dyadic of sampled axes (n_samples, n, 3)."""
    dyadic = np.einsum("svi,svj->vij", axes, axes) / len(axes)
    axis = np.linalg.eigh(dyadic)[1][..., :, -1]
    sign = np.where(axis[:, [0]] < 0, -1.0, 1.0)
    return axis * sign


class PosteriorFit(MaskedFit):
    """Posterior of the tissue descriptors of one voxel or a volume.

    Maps (the posterior median of each descriptor; ``orientation`` is the
    mean axis, ``(..., 3)``) are attributes named as the prior's descriptors
    (:attr:`descriptors`: :data:`~dipy_spinverse.geometry.DESCRIPTORS` for a
    :class:`~dipy_spinverse.posterior.TissuePrior`). Outside the mask they are
    0; inside, NaN where the status is not ``OK``
    (:data:`POSTERIOR_STATUS_CODES`).

    Index a volume fit like an array, as a
    :class:`~dipy_spinverse.reconst.fit.SpinverseFit`: ``fit[i, j, k]`` is
    the fit of that voxel (shape ``()``; status ``MASKED`` and the volume's
    0 maps outside the mask), any other index a smaller volume fit. Their
    medians and 50 % and 90 % intervals are the volume's; samples, and
    intervals at other levels, are new draws of the same posterior.

    :meth:`predict` gives the posterior predictive signal, simulated from
    posterior draws realised as the prior's tissue (:meth:`predictive_samples`).

    Parameters
    ----------
    model : SpinverseModel
    params : dict
        As :func:`fit_posterior` returns, for the voxels of ``mask`` in C
        order.
    mask : ndarray of bool
    """

    status_codes = POSTERIOR_STATUS_CODES

    @property
    def descriptors(self):
        """The descriptors of this fit's prior, ``orientation`` last where
        its posterior draws one (:mod:`dipy_spinverse.posterior.targets`)."""
        targets = self.model.prior.prior.targets
        return targets.scalars + (("orientation",) if targets.orientation else ())

    @property
    def S0(self):
        """Mean b = 0 signal of each voxel."""
        return self._volume(self.params["S0"], 0.0)

    def __getattr__(self, name):
        # Reached only when normal lookup fails. Private and special names
        # (copy, pickle and hasattr probe them, maybe before __init__ has
        # run) get the plain error without reading self.params.
        params = self.__dict__.get("params", {})
        if not name.startswith("_") and name in params:
            if name == "orientation":
                return self._volume(params["orientation"], 0.0)
            if np.ndim(params[name]) == 2 and name in self.descriptors:
                return self._volume(self._quantile(name, 0.5), 0.0)
        raise AttributeError(
            _no_attribute(type(self).__name__, name, self.__dict__.get("model")),
            name=name,
            obj=self,
        )

    def _quantile(self, name, q):
        return self.params[name][:, kept_index(q)]

    # -- intervals and samples -------------------------------------------------------
    def credible_interval(self, name, level=0.9):
        """The central credible interval of a descriptor: (low, high) maps.

        Parameters
        ----------
        name : str
            One of :attr:`descriptors` but ``orientation`` (units:
            :data:`~dipy_spinverse.geometry.UNITS`).
        level : float
            Probability mass inside, in (0, 1), e.g. 0.9 for the central
            90 % interval. 0.5 and 0.9 are stored; other levels draw samples
            again (seeded, so repeatable).

        Returns
        -------
        low, high : ndarray
            Maps of the fit's shape (0 outside the mask, NaN where the status
            is not ``OK``).
        """
        _check_scalar(name, self.model.prior.prior.targets.scalars)
        low, high = interval_rows(
            self.params, name, level, lambda: self.model.estimator, self._draws
        )
        return self._volume(low, 0.0), self._volume(high, 0.0)

    def posterior_samples(self, name, n=100, *, seed=0):
        """``n`` posterior draws of a descriptor per voxel.

        Scalar descriptors are drawn from the recalibrated posterior whose
        quantiles :meth:`credible_interval` gives
        (:mod:`dipy_spinverse.posterior.calibration`); ``orientation`` from
        the flow.

        Parameters
        ----------
        name : str
            One of :attr:`descriptors`.
        n : int
            Draws per voxel, at least 1.
        seed : int
            Seeds the draws (non-negative), so that they repeat.

        Returns
        -------
        ndarray (n,) + shape (+ (3,) for ``orientation``)
            NaN where the status is not ``OK``, 0 outside the mask.
        """
        if name not in self.descriptors:
            raise ValueError(
                f"Unknown descriptor {name!r}; this fit's prior has {self.descriptors}."
            )
        n = check_int(n, "n", 1, hint=" (the draws per voxel), e.g. n=100")
        seed = check_int(seed, "seed", 0, hint=" (it seeds the draws), e.g. seed=0")
        draws = self._draws(name, n, seed=seed)
        if name != "orientation":
            # The recalibrated posterior (the intervals' own), per voxel.
            table = self.model.estimator.level_table(name)
            draws = calibrated_draws(draws, table, np.random.default_rng(seed))
        return np.moveaxis(
            self._volume(np.moveaxis(draws, 0, 1), 0.0), self.mask.ndim, 0
        )

    def _draws(self, name, n, *, seed=1):
        tail = (3,) if name == "orientation" else ()
        out = np.full((n, len(self.params["status"])) + tail, np.nan)
        ok = np.flatnonzero(self.params["status"] == OK)
        if len(ok):
            values = self._flow_values(ok, n, seed)
            decode = self.model.prior.prior.targets.decode
            out[:, ok] = decode(np.moveaxis(values, 0, 1))[name]
        return out

    # -- prediction ------------------------------------------------------------------
    def predict(self, gtab=None, *, S0=None, n=N_PREDICTIVE, seed=0, progress=False):
        """The posterior predictive mean of the signal of every voxel.

        The mean over ``n`` posterior draws realised as the prior's tissue
        and simulated (:meth:`predictive_samples`): the signal the data
        predict, averaged over what they leave open.

        Parameters
        ----------
        gtab : GradientTable or Protocol, optional
            Acquisitions to predict (default: the fitted ones). A gradient
            table needs ``big_delta`` and ``small_delta``.
        S0 : float or array_like (shape), optional
            Unweighted signal. Default: each voxel's fitted S0, per
            sequence as :meth:`SpinverseFit.predict
            <dipy_spinverse.reconst.fit.SpinverseFit.predict>` takes it.
        n : int
            Posterior draws simulated per voxel (the mean's Monte Carlo
            error falls as ``1 / sqrt(n)``).
        seed : int
            Seeds the draws and their tissue.
        progress : bool
            Progress bars over the simulations.

        Returns
        -------
        ndarray (..., n_volumes)
            0 outside the mask, NaN where the status is not ``OK``.
        """
        samples = self.predictive_samples(gtab, n, S0=S0, seed=seed, progress=progress)
        with warnings.catch_warnings():
            # A voxel whose every draw failed is NaN, as a failed voxel is.
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(samples, axis=0)

    def predictive_samples(
        self, gtab=None, n=N_PREDICTIVE, *, S0=None, seed=0, progress=False
    ):
        """``n`` draws of the posterior predictive signal of every voxel.

        Each is one joint draw of the flow (every descriptor, the
        orientation included) realised as the prior's tissue with those
        settings and simulated on ``gtab``
        (:mod:`dipy_spinverse.posterior.predictive`): noise-free signals of
        tissue the data allow, on the prior's grid. Their spread is what the
        posterior leaves open about the signal; add the measurement noise
        for the spread of a new measurement. A draw that no tissue of the
        prior realises (at the prior's resolution) is NaN, with a log line.

        Parameters
        ----------
        gtab : GradientTable or Protocol, optional
            As :meth:`predict`'s.
        n : int
            Draws per voxel.
        S0 : float or array_like (shape), optional
            As :meth:`predict`'s.
        seed : int
            Seeds the draws and their tissue.
        progress : bool
            Progress bars over the simulations.

        Returns
        -------
        ndarray (n,) + shape + (n_volumes,)
            0 outside the mask, NaN where the status is not ``OK``.

        Raises
        ------
        NotImplementedError
            For a prior whose descriptors determine no tissue to simulate
            (:class:`~dipy_spinverse.posterior.WhiteMatterPrior`,
            :class:`~dipy_spinverse.posterior.MixturePrior`).
        """
        prior = self.model.prior.prior
        if prior.targets is not TISSUE_TARGETS:
            raise NotImplementedError(
                "posterior predictive signals realise the flow's draws as the "
                "prior's tissue: a TissuePrior's descriptors determine one, a "
                f"{type(prior).__name__}'s (bundles' averages) do not. Compare "
                "the data with the prior itself instead: prior.check(data, gtab, "
                "sigma=...)."
            )
        n = check_int(n, "n", 1, hint=" (the draws per voxel), e.g. n=16")
        seed = check_int(seed, "seed", 0, hint=" (it seeds the draws), e.g. seed=0")
        protocol = self.model.protocol if gtab is None else gradient_tables(gtab)[1]
        ok = np.flatnonzero(self.params["status"] == OK)
        out = np.full((len(self.params["status"]), n, len(protocol)), np.nan)
        if len(ok):
            # S0 checked before the simulations (which take seconds a voxel).
            scale = self._scale(protocol, ok, S0)
            values = self._flow_values(ok, n, seed)
            signals = predictive_signals(
                prior,
                protocol,
                values.reshape(-1, values.shape[-1]),
                seed=seed,
                progress=progress,
            ).reshape(len(ok), n, len(protocol))
            _log_unrealised(signals)
            out[ok] = signals * scale[:, None]
        return np.moveaxis(self._volume(out, 0.0), self.mask.ndim, 0)

    def _flow_values(self, rows, n, seed):
        """Joint flow draws (len(rows), n, n_targets) of the voxels ``rows``."""

        def sample(x, s):
            return self.model.estimator.sample(x, s, n, generator_seed=seed)

        batches = flow_draws(
            sample,
            self.params["inputs"],
            self.params["sigma"],
            rows,
            per_batch=_voxels_per_batch(n),
        )
        return np.concatenate([np.moveaxis(draws, 0, 1) for _, _, draws in batches])

    def _scale(self, protocol, rows, S0):
        """The S0 (len(rows), n_acquisitions) of each predicted row."""
        if S0 is not None:
            ok = self.status == OK
            S0 = check_s0(S0, self.shape, where=ok)
            return np.repeat(
                np.reshape(S0[self.mask], -1)[rows, None], len(protocol), 1
            )
        s0 = self.params["S0"][rows]
        # Fits saved before the per-sequence S0 was kept scale by the mean.
        per_sequence = self.params.get("S0_sequences")
        if per_sequence is None:
            return np.repeat(s0[:, None], len(protocol), axis=1)
        return s0_per_acquisition(
            self.model.sequences, protocol, s0, per_sequence[rows]
        )

    def _repr_items(self):
        return [f"prior={self.model.prior.prior!r}"]


def _no_attribute(owner, name, model=None):
    """The message of ``AttributeError`` for ``name`` on a fit of class
    ``owner`` and ``model``: what it has, and where a search fit's attribute
    lives."""
    message = f"{owner!r} object has no attribute {name!r}"
    if name.startswith("_"):
        return message
    targets = TISSUE_TARGETS if model is None else model.prior.prior.targets
    axis = " and orientation (the mean axis)" if targets.orientation else ""
    message += (
        f". It has the posterior median maps {', '.join(targets.scalars)}{axis}; "
        "status, ok, fitted, S0, shape, mask, params, model; "
        "credible_interval(name, level), posterior_samples(name, n, seed=0), "
        "status_counts(), voxel_data(data, index); fit[i, j, k] for one voxel."
    )
    if hasattr(SpinverseFit, name):
        message += (
            f" {name!r} belongs to the search's fits (SpinverseFit): fit with "
            'SpinverseModel(gtab, fit_method="search").'
        )
    return message


def _check_scalar(name, scalars):
    if name not in scalars:
        extra = " (orientation is a unit vector: see posterior_samples)"
        raise ValueError(
            f"credible_interval takes one of {scalars}, got {name!r}"
            + (extra if name == "orientation" else "")
            + "."
        )


def kept_index(q):
    """The column of the stored quantile ``q`` (:data:`KEPT`), or None.

    Matched to 1e-6: a level given in float32 (``np.float32(0.9)``, whose
    bounds are 0.04999999702 and 0.95000000298) is the stored 90 %
    interval, not another one drawn again; stored levels are 0.05 apart.
    """
    close = np.flatnonzero(np.abs(np.asarray(KEPT) - q) < 1e-6)
    return int(close[0]) if len(close) else None


def interval_rows(params, name, level, estimator, draws):
    """The central credible interval of ``name`` at ``level``, per row.

    Parameters
    ----------
    params : dict
        A fit's rows: ``params[name]`` (n_rows, len(KEPT)) holds the
        stored quantiles (:data:`KEPT`), which give the bounds where they
        can.
    name : str
        The descriptor.
    level : float
        In (0, 1).
    estimator : callable
        ``estimator()``: the PosteriorEstimator or ProtocolFreeEstimator
        whose ``quantile_levels`` recalibrate new draws' bounds; called
        only when the level is not stored (reading a fit's stored intervals
        loads no estimator, and trains none).
    draws : callable
        ``draws(name, n)``: n new flow draws per row, (n, n_rows).

    Returns
    -------
    low, high : ndarray (n_rows,)
    """
    level = check_level(level)
    lo, hi = (1 - level) / 2, (1 + level) / 2
    stored = [kept_index(q) for q in (lo, hi)]
    if None not in stored:
        return tuple(params[name][:, i] for i in stored)
    levels = estimator().quantile_levels(name, [lo, hi])
    low, high = np.quantile(draws(name, 1000), levels, axis=0)
    return low, high


def check_level(level):
    """``level`` as a float in (0, 1), or ValueError naming it."""
    # Strings and sequences are refused before float() reads "0.9" as a
    # number or fails on "high" with a message that names no argument.
    number = isinstance(level, numbers.Real) and not isinstance(level, bool)
    if not (number and 0 < float(level) < 1):
        raise ValueError(
            "level must be a number in (0, 1), the probability inside the "
            f"interval: e.g. level=0.9 for the central 90 % interval; got {level!r}."
        )
    return float(level)
