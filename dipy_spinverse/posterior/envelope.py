"""Whether a prior holds a signal: the prior predictive check.

Before any inference (Gelman et al., "Bayesian workflow", 2020) simulate
the prior on the data's own protocol, put the data's noise on the
simulations, and ask whether the data could have come from them. A prior
that holds none of the data gives a calibrated posterior of the wrong
tissue.

The signals are compared through a few features of each shell (the
acquisitions of one sequence and one b-value): the logarithm of the mean
b0-normalised signal over the shell's directions (linear below 1 % of b =
0, so that the negative means of Gaussian noise are read too) and, where it has
several, their standard deviation relative to that mean, with the noise's
variance taken out (how anisotropic the tissue reads, not the noise).
They are computed the same way on the data and on the simulations, on the
same directions, so that no feature needs to be rotation invariant. A
signal whose features are not finite lies outside.

A :class:`PredictiveEnvelope` standardises the features on noisy
simulations, keeps their first principal components, and measures a
signal's distance as its Mahalanobis distance in those components plus
what lies off them (each feature's residual in units of the simulations'
residual in it), a distance that grows both where a signal lies beyond
what the prior spreads over and where it leaves the directions the prior
varies in. Its limit at a level (0.95: the 95 % predictive region) is that
quantile of the distances of held-out simulations, at the same noise.
Shells whose simulated mean lies within :data:`SIGNAL_FLOOR` noise levels
of 0 are not compared: there a magnitude's noise floor sets the mean, not
the tissue. The noise differs between voxels; the envelope is built at a fixed ladder
of noise levels (powers of :data:`LEVEL_RATIO`) and each signal is
measured at the lowest rung at or above its own noise (a little wider an
envelope than its own noise would give, never narrower).

:func:`prior_predictive_check` is the public check (each prior's
``check`` calls it); the posterior fits flag ``OUT_OF_PRIOR`` with the same
envelope, built on their training signals (:func:`prior_envelope` for the
protocol-free fit).
"""

from dataclasses import dataclass

import numpy as np
import torch
from dipy.utils.logging import logger

from ..checks import check_int
from ..files import cache_key, cache_root, load_or_build
from ..provenance import code_digest
from ..sim.sequences import as_protocol
from ..sim.signals import normalise_b0, per_mean_b0, sequence_index
from .noise import add_noise

__all__ = [
    "N_COMPONENTS",
    "shell_layout",
    "shell_features",
    "PredictiveEnvelope",
    "PriorCheck",
    "prior_predictive_check",
    "PredictiveCheck",
    "prior_envelope",
]

#: Principal components of the standardised features in the distance.
N_COMPONENTS = 10
#: A shell's b-values lie within this fraction (plus 5 s/mm^2) of its lowest.
SHELL_SPREAD = 0.05
#: The ladder of noise levels an envelope is built at: powers of this.
LEVEL_RATIO = 1.25
#: Noise draws of each held-out simulation that set a limit.
HELD_OUT_REPEATS = 4
#: Shells whose median simulated mean lies below this many noise levels
#: are not compared (module documentation).
SIGNAL_FLOOR = 3.0
#: A shell's mean enters as ``arcsinh(mean / LOG_FLOOR)``: its logarithm
#: (plus ``log(2 / LOG_FLOOR)``) well above 1 % of b = 0, linear below.
LOG_FLOOR = 0.01


def shell_layout(protocol):
    """The shells of a protocol: acquisitions of one sequence and b-value.

    Within each sequence the b-values above 0 are sorted and a shell holds
    those within :data:`SHELL_SPREAD` (plus 5 s/mm^2) of its lowest: a
    bounded spread, never a chain of small steps.

    Parameters
    ----------
    protocol : Protocol

    Returns
    -------
    shells : list of ndarray of int
        Each shell's acquisitions.
    labels : list of str
        Each shell named by its timing and mean b-value.
    """
    rank = sequence_index(protocol)
    waveforms = [w for w, _ in protocol.sequences()]
    shells, labels = [], []
    for r, waveform in enumerate(waveforms):
        rows = np.flatnonzero((rank == r) & (protocol.bvals > 0))
        rows = rows[np.argsort(protocol.bvals[rows], kind="stable")]
        start = 0
        for i in range(1, len(rows) + 1):
            b_low = protocol.bvals[rows[start]]
            if (
                i == len(rows)
                or protocol.bvals[rows[i]] > b_low * (1 + SHELL_SPREAD) + 5
            ):
                shell = np.sort(rows[start:i])
                shells.append(shell)
                labels.append(
                    f"{_timing(waveform)}, b {protocol.bvals[shell].mean():.0f}"
                )
                start = i
    return shells, labels


def _timing(waveform):
    delta, big = (getattr(waveform, n, None) for n in ("small_delta", "big_delta"))
    if delta is None or big is None:
        return f"TE {waveform.echo_time * 1e3:g} ms"
    return f"delta {delta * 1e3:g} / Delta {big * 1e3:g} ms"


def shell_features(normalised, shells, sigma=None):
    """Each shell's mean signal, and the spread over its directions.

    Parameters
    ----------
    normalised : ndarray (n, n_acquisitions)
        b0-normalised signals.
    shells : list of ndarray of int
        :func:`shell_layout`'s.
    sigma : ndarray (n,), optional
        Each signal's noise (relative to b = 0): its variance is taken out
        of the spreads (module documentation). Default none taken out.

    Returns
    -------
    ndarray (n, n_features)
        ``arcsinh(mean / LOG_FLOOR)`` of each shell's mean (its logarithm
        but for a constant, above 1 % of b = 0; defined for any mean), then
        the standard deviations over the directions of the shells of more
        than one direction, less the noise's, relative to their means.
    """
    means = [normalised[:, s].mean(1) for s in shells]
    noise = 0.0 if sigma is None else np.asarray(sigma, dtype=np.float64) ** 2
    # Nearly logarithms: a decay is linear in them, and a mean far below
    # every draw's is far in them too; near and below 0 (Gaussian noise,
    # denoised data) they turn linear instead of failing. A spread is the
    # anisotropy with the noise's variance taken out: over 195 directions a
    # raw spread is known to 5 %, so a noise level a quarter too high (the
    # envelope's ladder) or a noise estimate a little off would set every
    # low shell's spread apart, whatever the tissue.
    spreads = [
        np.sqrt(np.clip(normalised[:, s].var(1) - noise, 0, None))
        / np.hypot(m, LOG_FLOOR)
        for s, m in zip(shells, means, strict=True)
        if len(s) > 1
    ]
    return np.stack([np.arcsinh(m / LOG_FLOOR) for m in means] + spreads, axis=1)


def feature_labels(shells, labels):
    """The names of :func:`shell_features`' columns."""
    spread = [
        f"{name}: spread" for s, name in zip(shells, labels, strict=True) if len(s) > 1
    ]
    return [f"{name}: log mean" for name in labels] + spread


class _Level:
    """The envelope at one noise level: standardisation, components, limit."""

    def __init__(self, fit, held_out, level, columns):
        self.columns = columns
        fit = fit[:, columns]
        self.centre = fit.mean(0)
        self.scale = fit.std(0)
        # A feature the prior never varies (a noise-free b = 0, a shell of
        # one direction) is compared by its distance to the simulations'.
        self.scale[self.scale == 0] = (
            1e-12 + np.abs(self.centre[self.scale == 0]) * 1e-6
        )
        z = (fit - self.centre) / self.scale
        _, singular, axes = np.linalg.svd(z, full_matrices=False)
        k = min(N_COMPONENTS, len(singular) - 1) if len(singular) > 1 else 1
        self.axes = axes[:k]
        self.spread = singular[:k] / np.sqrt(len(z)) + 1e-12
        residual = z - (z @ self.axes.T) @ self.axes
        # Each feature's residual in units of its own: a few features far
        # off are not diluted by the many that only hold noise.
        self.residual = residual.std(0) + 1e-12
        self.limit = float(np.quantile(self.distance(held_out), level))

    def distance(self, features):
        return np.sqrt(self.terms(features).sum(1))

    def terms(self, features):
        """Each compared feature's term of the squared distance (n,
        n_compared): ``z_j sum_k a_kj (z . a_k) / s_k^2`` along the
        components plus its own residual term; they sum to the squared
        distance exactly. A term is the feature's part of the distance as
        the prior correlates it with the others (negative where the feature
        pulls the signal toward the prior), so features each within the
        prior's range but together outside it carry the distance between
        them."""
        z = (features[:, self.columns] - self.centre) / self.scale
        along = z @ self.axes.T
        residual = z - along @ self.axes
        inside = z * ((along / self.spread**2) @ self.axes)
        return inside + (residual / self.residual) ** 2


class PredictiveEnvelope:
    """Where noisy simulations of a prior lie (module documentation).

    Built lazily at the noise levels asked for, each on the fixed ladder
    ``LEVEL_RATIO ** k`` (a signal is measured at the lowest rung at or
    above its noise), so that a signal's distance and limit depend on it
    alone, not on the other signals measured with it.

    Parameters
    ----------
    signals : ndarray (n, n_acquisitions)
        Noise-free simulations of the prior on ``protocol``; at least 20.
        Each is scaled to a mean b = 0 of 1 (the noise levels are relative
        to it). Half build the envelope, half set its limit (each with
        :data:`HELD_OUT_REPEATS` noise draws).
    protocol : Protocol
    level : float
        The predictive region's probability (0.95: 95 %).
    seed : int
        Seed of the noise put on the simulations (each rung's its own).
    """

    def __init__(self, signals, protocol, *, level=0.95, seed=0):
        signals = np.asarray(signals, dtype=np.float64)
        if signals.ndim != 2 or len(signals) < 20:
            raise ValueError(
                "signals must be (n, n_acquisitions) simulations with n >= 20, "
                f"got shape {signals.shape}."
            )
        if not 0 < level < 1:
            raise ValueError(f"level must lie in (0, 1), e.g. 0.95; got {level!r}.")
        # Scaled to a mean b = 0 of 1, the signal a noise level is relative
        # to (the data's convention): a prior with T2 gives b = 0 below 1 at
        # its echo times, and its noise would otherwise be 1 / b0 too large.
        signals = per_mean_b0(signals, protocol)
        self.protocol = protocol
        self.shells, names = shell_layout(protocol)
        if not self.shells:
            raise ValueError("the protocol has no diffusion-weighted volume to check.")
        self.labels = feature_labels(self.shells, names)
        # Each feature's shell: its mean's column, then its spread's.
        several = [i for i, shell in enumerate(self.shells) if len(shell) > 1]
        self._shell_of = np.array(list(range(len(self.shells))) + several)
        self.level = level
        self.seed = int(seed)
        self._clean = torch.as_tensor(signals)
        self._rungs = {}

    def features(self, normalised, sigma=None):
        """:func:`shell_features` of b0-normalised signals (n, n_acquisitions)
        with noise ``sigma`` (n,) relative to b = 0."""
        normalised = np.asarray(normalised, dtype=np.float64)
        return shell_features(normalised, self.shells, sigma)

    def _rung(self, k):
        """The envelope at noise ``LEVEL_RATIO ** k``: its fit, and the
        noisy simulations' features."""
        if k not in self._rungs:
            generator = torch.Generator().manual_seed(self.seed * 1000 + k % 1000)
            half = len(self._clean) // 2

            def noisy(clean):
                sigma = torch.full((len(clean),), LEVEL_RATIO**k)
                signals = add_noise(clean, sigma, generator)
                normalised = normalise_b0(signals, self.protocol).numpy()
                return self.features(normalised, sigma.numpy())

            built = noisy(self._clean[:half])
            # The limit, a high quantile, from several noise draws of each
            # held-out simulation: steadier than one.
            held_out = noisy(self._clean[half:].repeat(HELD_OUT_REPEATS, 1))
            # Shells the prior leaves within a few noise levels of 0 are not
            # compared: there the magnitude's noise floor, not the tissue,
            # sets the mean, and data of another noise model (Gaussian,
            # denoised) would read as outside.
            n_shells = len(self.shells)
            means = np.sinh(built[:, :n_shells]) * LOG_FLOOR
            above = np.median(means, axis=0) > SIGNAL_FLOOR * LEVEL_RATIO**k
            fit = _Level(built, held_out, self.level, above[self._shell_of])
            self._rungs[k] = (fit, np.concatenate([built, held_out[: len(built)]]))
        return self._rungs[k]

    @staticmethod
    def _rung_index(sigma):
        sigma = np.atleast_1d(np.asarray(sigma, dtype=np.float64))
        if not np.all(np.isfinite(sigma) & (sigma > 0)):
            raise ValueError("sigma must be finite and > 0 for every signal.")
        return np.ceil(np.log(sigma) / np.log(LEVEL_RATIO) - 1e-9).astype(int)

    def distance(self, normalised, sigma):
        """Each signal's distance and the limit of its noise level.

        Parameters
        ----------
        normalised : ndarray (n, n_acquisitions)
            b0-normalised signals.
        sigma : ndarray (n,)
            Their noise relative to the mean b = 0 signal.

        Returns
        -------
        distance, limit : ndarray (n,)
            A signal is inside the prior's predictive region where
            ``distance <= limit`` (a NaN distance is outside).
        """
        features = self.features(normalised, _per_signal(sigma, len(normalised)))
        distance, limit = np.empty(len(features)), np.empty(len(features))
        for rows, fit, _ in self._by_rung(sigma):
            distance[rows] = fit.distance(features[rows])
            limit[rows] = fit.limit
        return distance, limit

    def _by_rung(self, sigma):
        """``(rows, fit, simulated features)`` of each noise rung the signals
        of noise ``sigma`` are measured at (the rows a mask over them)."""
        index = self._rung_index(sigma)
        for k in np.unique(index):
            fit, simulated = self._rung(int(k))
            yield index == k, fit, simulated

    def features_carrying(self, normalised, sigma, *, n=3):
        """The features that carry most of the signals' distance: each
        feature's share of a signal's squared distance (its term over the
        sum of the terms, which is that square), its median over the signals
        outside the region (all signals where none is).

        Where signals are outside jointly (every feature within the prior's
        range, their combination not), :meth:`features_outside` finds no
        feature; these name the ones that make up the distance.

        Parameters
        ----------
        normalised : ndarray (n, n_acquisitions)
        sigma : ndarray (n,)
        n : int
            How many features.

        Returns
        -------
        list of (str, float)
            Label and median share, the ``n`` largest first.
        """
        features = self.features(normalised, _per_signal(sigma, len(normalised)))
        shares = np.zeros(features.shape)
        outside = np.zeros(len(features), dtype=bool)
        for rows, fit, _ in self._by_rung(sigma):
            terms = fit.terms(features[rows])
            total = terms.sum(1, keepdims=True)
            part = np.zeros((int(rows.sum()), features.shape[1]))
            part[:, fit.columns] = terms / np.where(total > 0, total, 1.0)
            shares[rows] = part
            outside[rows] = ~(np.sqrt(total[:, 0]) <= fit.limit)
        typical = np.median(shares[outside] if outside.any() else shares, axis=0)
        typical = np.nan_to_num(typical, nan=0.0)
        order = np.argsort(-typical)[:n]
        return [(self.labels[k], float(typical[k])) for k in order]

    def features_outside(self, normalised, sigma, *, n=3):
        """The features where most signals fall outside the simulations'
        1-99 % range (at each signal's noise level).

        Parameters
        ----------
        normalised : ndarray (n, n_acquisitions)
        sigma : ndarray (n,)
        n : int
            How many features.

        Returns
        -------
        list of (str, float, float, float, float)
            Label, share outside, the signals' median, the range's ends (at
            the noisiest level); the ``n`` largest shares first, ties by how
            far outside the median lies.
        """
        features = self.features(normalised, _per_signal(sigma, len(normalised)))
        outside = np.zeros(features.shape, dtype=bool)
        for rows, _, simulated in self._by_rung(sigma):
            low, high = np.percentile(simulated, [1, 99], axis=0)
            outside[rows] = (features[rows] < low) | (features[rows] > high)
        share = outside.mean(0)
        median = np.median(features, 0)
        # Ties (every voxel outside several features) go to the feature the
        # data's median leaves farthest, in widths of the range.
        beyond = np.maximum(low - median, median - high) / (high - low + 1e-12)
        order = np.lexsort((-beyond, -share))[:n]
        return [
            (self.labels[k], float(share[k]), float(median[k]), low[k], high[k])
            for k in order
        ]


@dataclass
class PriorCheck:
    """What a prior predictive check found (:func:`prior_predictive_check`).

    Attributes
    ----------
    inside : ndarray of bool
        Per voxel (the data's spatial shape): inside the prior's
        predictive region. False outside the mask and where the data could
        not be checked (``checked``).
    distance : ndarray
        Per voxel, the envelope's distance (NaN where not checked).
    limit : ndarray
        Per voxel, the distance's limit at its noise (NaN where not
        checked).
    checked : ndarray of bool
        Voxels of the mask with finite data and a positive b = 0 signal.
    share_inside : float
        Of the checked voxels.
    level : float
        The predictive region's probability.
    features_outside : list of (str, float, float, float, float)
        :meth:`PredictiveEnvelope.features_outside`.
    n_draws : int
    features_carrying : list of (str, float)
        :meth:`PredictiveEnvelope.features_carrying`: the features that
        make up the distance of the voxels outside, with their median share
        of it.
    """

    inside: np.ndarray
    distance: np.ndarray
    limit: np.ndarray
    checked: np.ndarray
    share_inside: float
    level: float
    features_outside: list
    n_draws: int
    features_carrying: list = ()

    def summary(self):
        """One line: the share inside and the features most outside."""
        worst = "; ".join(
            f"{label}: {share:.0%} outside [{low:.3g}, {high:.3g}] "
            f"(data median {median:.3g})"
            for label, share, median, low, high in self.features_outside
            if share > 0
        )
        carrying = ", ".join(
            f"{label} ({share:.0%})"
            for label, share in self.features_carrying
            if share > 0
        )
        return (
            f"{self.share_inside:.0%} of {int(self.checked.sum())} voxels lie inside "
            f"the prior's {self.level:.0%} predictive region ({self.n_draws} "
            f"draws)"
            + (f"; most outside: {worst}" if worst else "")
            + (f"; their distance is carried by {carrying}" if carrying else "")
        )


def prior_predictive_check(
    simulate, data, protocol, *, mask=None, sigma, level=0.95, seed=0
):
    """Prior predictive check of a volume (or of rows of voxels).

    Parameters
    ----------
    simulate : callable
        ``simulate(protocol, seed)`` -> noise-free simulations (n,
        n_acquisitions) of the prior on ``protocol`` (each prior's
        ``check`` passes its own).
    data : ndarray (..., n_volumes)
    protocol : Protocol
        The data's, with echo times where they matter.
    mask : ndarray of bool, optional
        The data's spatial shape; default every voxel.
    sigma : float or ndarray
        The noise standard deviation in the data's units (one value, or
        one per voxel of the data's spatial shape).
    level : float
        The predictive region's probability.
    seed : int

    Returns
    -------
    PriorCheck
    """
    data = np.asarray(data, dtype=np.float64)
    if data.ndim < 1 or data.shape[-1] != len(protocol):
        raise ValueError(
            f"data must end in one value per volume ({len(protocol)}), got shape "
            f"{data.shape}."
        )
    shape = data.shape[:-1]
    mask = np.ones(shape, dtype=bool) if mask is None else np.asarray(mask)
    if mask.shape != shape or mask.dtype != bool:
        raise ValueError(
            f"mask must be a boolean array of the data's spatial shape {shape}, "
            f"got {mask.dtype} of shape {mask.shape}."
        )
    sigma = _checked_sigma(sigma, shape)
    rows = data[mask]
    b0 = protocol.bvals == 0
    scale = rows[:, b0].mean(1) if b0.any() else np.ones(len(rows))
    ok = np.isfinite(rows).all(1) & (scale > 0) & np.isfinite(sigma[mask])
    relative = sigma[mask][ok] / scale[ok]
    if not ok.any():
        raise ValueError(
            "no voxel of the mask has finite data and a positive b = 0 signal to check."
        )
    simulated = np.asarray(simulate(protocol, seed))
    envelope = PredictiveEnvelope(simulated, protocol, level=level, seed=seed)
    normalised = normalise_b0(rows[ok], protocol)
    distance, limit = envelope.distance(normalised, relative)
    result = PriorCheck(
        inside=_spread(distance <= limit, mask, ok, False),
        distance=_spread(distance, mask, ok, np.nan),
        limit=_spread(limit, mask, ok, np.nan),
        checked=_spread(np.ones(int(ok.sum()), bool), mask, ok, False),
        share_inside=float(np.mean(distance <= limit)),
        level=level,
        features_outside=envelope.features_outside(normalised, relative),
        n_draws=len(simulated),
        features_carrying=envelope.features_carrying(normalised, relative),
    )
    logger.info(result.summary())
    return result


class PredictiveCheck:
    """The prior predictive check as a method of every prior.

    A prior that binds itself to a protocol (``simulator(protocol,
    **options)``, whose ``sample(n, seed=...)`` returns the noise-free
    signals first) gets :meth:`check`; :attr:`CHECK_DRAWS` is its default
    number of draws.
    """

    #: Draws simulated for a check, unless ``n_draws`` says otherwise.
    CHECK_DRAWS = 1000

    def check(
        self,
        data,
        gtab,
        *,
        mask=None,
        sigma,
        n_draws=None,
        level=0.95,
        seed=0,
        **options,
    ):
        """Whether this prior holds the data: the prior predictive check.

        Simulates ``n_draws`` of the prior on the data's protocol, puts the
        data's noise on them, and asks which voxels lie inside the draws'
        ``level`` predictive region (:mod:`~dipy_spinverse.posterior.
        envelope`); logs the share inside and the features most outside. Run
        it before spending a training on the prior.

        Parameters
        ----------
        data : ndarray (..., n_volumes)
        gtab : GradientTable or Protocol
            With ``big_delta`` and ``small_delta``; a Protocol carries echo
            times where the data's differ.
        mask : ndarray of bool, optional
        sigma : float or ndarray
            Noise standard deviation in the data's units (one, or one per
            voxel).
        n_draws : int, optional
            Default :attr:`CHECK_DRAWS`.
        level : float
        seed : int
        **options
            Passed to the prior's ``simulator`` (e.g. ``dtype``,
            ``cache_dir``).

        Returns
        -------
        PriorCheck
        """
        n_draws = self.CHECK_DRAWS if n_draws is None else n_draws
        n_draws = check_int(n_draws, "n_draws", 20)

        def simulate(protocol, seed):
            return self.simulator(protocol, **options).sample(n_draws, seed=seed)[0]

        return prior_predictive_check(
            simulate,
            data,
            as_protocol(gtab),
            mask=mask,
            sigma=sigma,
            level=level,
            seed=seed,
        )


def _per_signal(sigma, n):
    """``sigma`` (one, or one per signal) as one per signal."""
    return np.broadcast_to(np.atleast_1d(np.asarray(sigma, dtype=np.float64)), (n,))


def _checked_sigma(sigma, shape):
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.ndim == 0:
        sigma = np.full(shape, float(sigma))
    if sigma.shape != shape:
        raise ValueError(
            "sigma must be one noise level in the data's units or one per voxel "
            f"(shape {shape}), got shape {sigma.shape}."
        )
    if not np.all(np.isfinite(sigma) & (sigma > 0)):
        raise ValueError(
            "sigma must be finite and > 0 (the noise standard deviation in the "
            "data's units; dipy.denoise.noise_estimate.estimate_sigma estimates it)."
        )
    return sigma


def _spread(values, mask, ok, fill):
    out = np.full(mask.shape, fill, dtype=np.asarray(values).dtype)
    rows = np.full(int(mask.sum()), fill, dtype=out.dtype)
    rows[ok] = values
    out[mask] = rows
    return out


def prior_envelope(prior, protocol, *, n_draws, level, seed=0, cache_dir=None):
    """The envelope of ``n_draws`` simulations of ``prior`` on ``protocol``,
    simulated once and kept in the cache.

    Parameters
    ----------
    prior : TissuePrior
        Anything with ``description()`` and ``simulator(protocol)``.
    protocol : Protocol
    n_draws : int
    level : float
    seed : int
    cache_dir : path-like, optional
        Default :func:`~dipy_spinverse.files.cache_root`.

    Returns
    -------
    PredictiveEnvelope
    """
    description = {
        "prior": prior.description(),
        "n_draws": int(n_draws),
        "seed": int(seed),
        "waveforms": [repr(w) for w in protocol.waveforms],
        "code": code_digest("posterior.prior"),
    }
    key = cache_key(description, [protocol.bvals, protocol.bvecs])
    path = cache_root(cache_dir) / f"prior-draws-{key}.npz"

    def build():
        simulator = prior.simulator(protocol)
        return simulator.sample(int(n_draws), seed=int(seed))[0]

    def save(signals, tmp):
        with open(tmp, "wb") as f:
            np.savez(f, signals=signals)

    def load(path):
        with np.load(path) as saved:
            signals = saved["signals"]
        if signals.shape != (int(n_draws), len(protocol)):
            raise ValueError(f"it holds signals of shape {signals.shape}")
        return signals

    signals = load_or_build(
        path, load=load, build=build, save=save, what="prior's simulations"
    )
    return PredictiveEnvelope(signals, protocol, level=level, seed=seed)
