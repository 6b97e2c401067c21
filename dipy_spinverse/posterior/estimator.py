"""The amortised posterior: a normalising flow from a voxel's signal to its tissue.

Neural posterior estimation (as in muGUIDE, Jallais & Palombo 2024): a
network embeds the voxel's b0-normalised signal and its noise level, and a
neural spline flow (``zuko.flows.NSF``, Durkan et al. 2019) conditioned on
that embedding is the density of the descriptors' flow coordinates
(:mod:`.targets`). Both are trained together on simulations of the prior
(:class:`~dipy_spinverse.posterior.PriorSimulator`), minimising the
negative log density of the true coordinates; the noise is drawn afresh for
every batch (Rician, at a signal-to-noise ratio log-uniform in
``snr_range``) and the noise level is an input, so one network serves every
noise level.

Why zuko: flows written in plain torch with two dependencies (numpy, torch);
``sbi`` brings the same flows (through nflows or zuko) with a training
loop, tensorboard and skorch this package does not need.

A voxel whose signal no simulation of the prior explains gets the status
``OUT_OF_PRIOR``: the mean squared difference to the nearest training
signal, in units of the noise variance, is above the 99.9th percentile of
what held-out simulations of the prior give at that noise level
(:meth:`PosteriorEstimator.support_statistic`).

The credible bounds are recalibrated per descriptor on the held-out
simulations (:mod:`.calibration`): a bound of level ``p`` is the flow's
quantile at the level where held-out truths fell below it a fraction ``p``
of the time.
"""

import contextlib
import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checks import check_int, check_number
from ..sim.signals import normalise_b0
from . import targets
from .calibration import LEVELS, SCALARS, calibrated_levels, measure_level_tables

__all__ = ["TrainingOptions", "PosteriorEstimator", "train_estimator"]

#: Quantile of the held-out support statistic above which a voxel is out of
#: the prior (one in-prior voxel in a thousand is flagged).
SUPPORT_QUANTILE = 0.999


@dataclass(frozen=True)
class TrainingOptions:
    """How the posterior network is built and trained (all in its cache key).

    Parameters
    ----------
    n_simulations : int
        Simulated substrates of the training set.
    snr_range : (float, float)
        Signal-to-noise ratios (b = 0 signal over sigma) of the training
        noise, log-uniform.
    embedding : int
        Width of the signal's embedding.
    hidden : int
        Width of the embedding network's and the flow's hidden layers.
    transforms : int
        Spline transforms of the flow.
    epochs : int
        Passes over the training set (the best on the validation part is
        kept).
    batch_size : int
    learning_rate : float
    validation : float
        Fraction of the simulations held out for early stopping and the
        support thresholds.
    seed : int
        Seed of the simulations and of the training.
    reference_resolution : int or None
        Model the prior grid's discretisation error. The same tissue is
        simulated on a grid of this many cubes per side and on the prior's
        (``n_reference`` draws, :meth:`PriorSimulator.sample_pairs`), and
        every training signal gets a draw of a Gaussian of their
        differences' mean and covariance before its noise (the approximation
        error of Kaipio and Somersalo); the training descriptors are those
        of the tissue on the reference grid. The intervals then hold for
        tissue that the reference grid resolves, and widen by what the
        coarse grid cannot tell. None: no error model (the intervals hold
        for signals of the prior's own grid only).
    n_reference : int
        Draws simulated on both grids (with ``reference_resolution``).
    n_calibration : int
        Simulations, besides the validation part, on which the credible
        bounds are recalibrated (:mod:`.calibration`). A level's table
        entry is a quantile over the tissues: its standard error is about
        ``sqrt(p (1 - p) / n)``, 0.013 at the 25 % level with the default
        and the validation part of 2,000.
    """

    n_simulations: int = 20_000
    snr_range: tuple = (10.0, 300.0)
    embedding: int = 64
    hidden: int = 128
    transforms: int = 4
    epochs: int = 60
    batch_size: int = 256
    learning_rate: float = 1e-3
    validation: float = 0.1
    seed: int = 0
    reference_resolution: int | None = None
    n_reference: int = 64
    n_calibration: int = 1000

    def __post_init__(self):
        check_int(self.n_simulations, "n_simulations", 16)
        low, high = self.snr_range
        check_number(low, "snr_range[0]", minimum=0.0)
        if not 0 < low <= high:
            raise ValueError(
                f"snr_range must be (low, high) > 0, got {self.snr_range!r}."
            )
        object.__setattr__(self, "snr_range", (float(low), float(high)))
        for name in ("embedding", "hidden", "transforms", "epochs", "batch_size"):
            check_int(getattr(self, name), name, 1)
        check_number(self.learning_rate, "learning_rate", minimum=0.0)
        if self.reference_resolution is not None:
            check_int(self.reference_resolution, "reference_resolution", 2)
        check_int(self.n_reference, "n_reference", 2)
        check_int(self.n_calibration, "n_calibration", 0)
        if not 0 < self.validation < 0.5:
            raise ValueError(
                f"validation must be in (0, 0.5), got {self.validation!r}."
            )

    def description(self):
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
        }


class PosteriorEstimator(torch.nn.Module):
    """Embedding network and conditional flow; see the module documentation.

    Parameters
    ----------
    n_inputs : int
        Acquisitions per voxel.
    options : TrainingOptions
    fast_sampling : bool
        Build the flow's coupling transforms in the sampling direction (an
        inverse autoregressive flow, Kingma et al. 2016): a draw costs one
        network evaluation per transform and a density two (measured on 2
        cores: 2.1-2.9x faster sampling, 2.7x slower training steps; the
        maps need many draws per voxel, training few densities per tissue).
        False: the density direction, as estimators trained before 2026-11
        were built (:func:`dipy_spinverse.posterior.load_or_train` reads
        the direction from a saved estimator's parameters).
    """

    def __init__(self, n_inputs, options, *, fast_sampling=True):
        import zuko
        from zuko.lazy import LazyInverse

        super().__init__()
        width = options.hidden
        self.embed = torch.nn.Sequential(
            torch.nn.Linear(n_inputs + 1, 2 * width),
            torch.nn.SiLU(),
            torch.nn.Linear(2 * width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, options.embedding),
        )
        n_targets = len(targets.TARGETS)
        self.flow = zuko.flows.NSF(
            n_targets,
            context=options.embedding,
            transforms=options.transforms,
            hidden_features=(width, width),
            # Coupling transforms (two passes): a transform's inverse costs
            # two network evaluations instead of one per coordinate, its
            # forward one.
            passes=2,
        )
        if fast_sampling:
            self.flow.transform = LazyInverse(self.flow.transform)
        for name, size in (("x_mean", n_inputs + 1), ("y_mean", n_targets)):
            self.register_buffer(name, torch.zeros(size))
        for name, size in (("x_std", n_inputs + 1), ("y_std", n_targets)):
            self.register_buffer(name, torch.ones(size))
        # The support check: training signals and the threshold per noise level.
        self.register_buffer("support_signals", torch.zeros(0, n_inputs))
        self.register_buffer("support_log_sigma", torch.zeros(0))
        self.register_buffer("support_threshold", torch.zeros(0))
        # The recalibration (identity until measured after training).
        self.register_buffer(
            "level_tables",
            torch.as_tensor(np.tile(LEVELS, (len(SCALARS), 1)), dtype=torch.float32),
        )

    @property
    def device(self):
        """The device the network runs on (``estimator.to(device)`` moves it)."""
        return self.x_mean.device

    def _context(self, signal, sigma):
        x = torch.cat([signal, torch.log(sigma)[:, None]], dim=-1)
        return self.embed((x - self.x_mean) / self.x_std)

    def log_prob(self, signal, sigma, coordinates):
        """Log density of flow coordinates (standardised inside) given signals."""
        y = (coordinates - self.y_mean) / self.y_std
        return (
            self.flow(self._context(signal, sigma)).log_prob(y)
            - torch.log(self.y_std).sum()
        )

    @torch.no_grad()
    def sample(self, signal, sigma, n, *, generator_seed=None):
        """``n`` posterior draws of the flow coordinates, (n, n_voxels, 12).

        Parameters
        ----------
        signal : Tensor (n_voxels, n_inputs)
            b0-normalised signals, on any device: the draws are made on the
            estimator's (:attr:`device`) and returned on ``signal``'s.
        sigma : Tensor (n_voxels,)
            Noise standard deviation relative to the b = 0 signal.
        n : int
        generator_seed : int, optional
            Seeds torch's generator for reproducible draws (the base points
            are drawn on the CPU, so that a seed gives the same draws on
            every device, to rounding).

        Notes
        -----
        The flow's base draws are randomised quasi-Monte Carlo
        (:func:`normal_points`): each draw has the posterior's distribution,
        and the quantiles of ``n`` of them are as accurate as those of about
        ``4 n`` independent draws (measured on the default estimator: the
        level error of a median is 0.022 with 128 such draws and with 500
        independent ones; of a 5 % bound 0.014 against 0.010).
        """
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        base = normal_points(n, len(signal), self.y_mean.numel()).to(self.device)
        with _flushed_denormals():
            context = self._context(signal.to(self.device), sigma.to(self.device))
            y = self.flow(context).transform.inv(base)
        return (y * self.y_std + self.y_mean).to(signal.device)

    def level_table(self, name):
        """``name``'s recalibration: the flow's level at each of
        :data:`.calibration.LEVELS` (ndarray)."""
        return self.level_tables[SCALARS.index(name)].cpu().numpy()

    def quantile_levels(self, name, levels):
        """The flow's quantile levels that give ``name``'s credible bounds at
        ``levels`` (:func:`.calibration.calibrated_levels`)."""
        return calibrated_levels(levels, self.level_table(name))

    @torch.no_grad()
    def support_statistic(self, signal, sigma, *, chunk=256):
        """Mean squared distance to the nearest training signal over sigma^2.

        Parameters
        ----------
        signal : Tensor (n_voxels, n_inputs)
            On any device (computed on the estimator's, returned on
            ``signal``'s).
        sigma : Tensor (n_voxels,)

        Returns
        -------
        Tensor (n_voxels,)
        """
        reference = self.support_signals
        ref_sq = (reference**2).sum(-1)
        out = []
        for start in range(0, len(signal), chunk):
            x = signal[start : start + chunk].to(self.device)
            d2 = (x**2).sum(-1, keepdim=True) - 2 * x @ reference.T + ref_sq
            out.append(d2.min(-1).values.clamp_min(0).to(signal.device) / x.shape[-1])
        d2 = torch.cat(out) if out else signal.new_zeros(0)
        return d2 / sigma**2

    @torch.no_grad()
    def support_limit(self, sigma):
        """The support statistic's threshold at noise levels ``sigma``."""
        grid = self.support_log_sigma.cpu().numpy()
        limit = self.support_threshold.cpu().numpy()
        return torch.as_tensor(
            np.interp(np.log(sigma.cpu().numpy()), grid, limit), dtype=sigma.dtype
        )


def normal_points(n, n_voxels, dimension):
    """Standard normal base points (n, n_voxels, dimension), randomised QMC.

    One scrambled Sobol sequence of ``n`` points (Owen 1998), shifted modulo 1
    by an independent uniform vector per voxel (Cranley and Patterson 1976)
    and mapped through the normal quantile. Each point is exactly standard
    normal, the voxels' point sets are independent, and within a voxel the
    points fill the cube evenly, so sample quantiles converge nearly as 1/n
    instead of 1/sqrt(n). Seeded by torch's global generator.
    """
    seed = int(torch.randint(2**31 - 1, ()))
    engine = torch.quasirandom.SobolEngine(dimension, scramble=True, seed=seed)
    shift = torch.rand(n_voxels, dimension)
    uniform = torch.frac(engine.draw(n)[:, None, :] + shift)
    # A shifted point can land on 0 exactly: kept inside the open cube.
    tiny = torch.finfo(uniform.dtype).eps
    return torch.special.ndtri(uniform.clamp(tiny, 1 - tiny))


@contextlib.contextmanager
def _flushed_denormals():
    """Denormal floats flushed to zero inside the block (torch's default, off,
    restored after). A trained flow's spline inverse meets denormals that
    make sampling 5-8x slower on x86 CPUs (measured: 5.3 against 0.70 s for
    5,000 draws on one core); values below 1e-38 do not change a sample."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def add_noise(signal, sigma, generator=None):
    """Rician magnitude of ``signal`` (B, n) with noise ``sigma`` (B,)."""
    shape = (2,) + tuple(signal.shape)
    noise = torch.randn(shape, generator=generator, dtype=signal.dtype) * sigma[:, None]
    return torch.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2)


def _draw_sigma(n, snr_range, generator, dtype):
    low, high = math.log(snr_range[0]), math.log(snr_range[1])
    u = torch.rand(n, generator=generator, dtype=dtype)
    return torch.exp(-(low + (high - low) * u))


def add_model_error(signal, errors, generator=None):
    """``signal`` (B, n) plus draws of a Gaussian of the mean and covariance
    of ``errors`` (m, n): the simulator's approximation error.

    Each draw is ``mean + z @ (errors - mean) / sqrt(m - 1)`` with ``z``
    standard normal (B, m): exactly the errors' sample covariance, without
    factorising it.
    """
    if errors is None:
        return signal
    errors = errors.to(signal.dtype)
    mean = errors.mean(0)
    z = torch.randn(
        (len(signal), len(errors)), generator=generator, dtype=signal.dtype
    ) / math.sqrt(len(errors) - 1)
    return signal + mean + z @ (errors - mean)


def noisy_inputs(signal, protocol, snr_range, generator, model_error=None):
    """Noisy, b0-normalised training inputs and their sigma (relative to the
    b = 0 signal of 1), as a fit would see them (with the simulator's
    approximation error, when given: :func:`add_model_error`)."""
    sigma = _draw_sigma(len(signal), snr_range, generator, signal.dtype)
    signal = add_model_error(signal, model_error, generator)
    noisy = normalise_b0(add_noise(signal, sigma, generator), protocol)
    return noisy, sigma


def train_estimator(
    signals,
    coordinates,
    protocol,
    options,
    *,
    model_error=None,
    calibration=None,
    progress=True,
):
    """Train a :class:`PosteriorEstimator` on simulations.

    Parameters
    ----------
    signals : ndarray (n, n_acquisitions)
        Noise-free simulated signals (1 at b = 0).
    coordinates : ndarray (n, 12)
        Their descriptors' flow coordinates (:func:`.targets.encode`).
    protocol : Protocol
    options : TrainingOptions
    model_error : ndarray (m, n_acquisitions), optional
        Samples of the simulator's approximation error (reference minus
        prior-grid signals, :meth:`PriorSimulator.sample_pairs`), drawn from
        into every training and validation input (:func:`add_model_error`).
    calibration : (ndarray, ndarray), optional
        More held-out ``(signals, coordinates)``, not trained on, on which
        the credible bounds are recalibrated with the validation part.
    progress : bool

    Returns
    -------
    PosteriorEstimator
        In evaluation mode, with the support thresholds and the credible
        bounds' recalibration set.
    """
    bad = ~(np.isfinite(signals).all(-1) & np.isfinite(coordinates).all(-1))
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {len(bad)} training simulations have non-finite "
            "signals or descriptors (rows "
            f"{np.flatnonzero(bad)[:5].tolist()}); the prior must give finite "
            "values: check its ranges."
        )
    generator = torch.Generator().manual_seed(options.seed)
    if model_error is not None:
        model_error = torch.as_tensor(model_error, dtype=torch.float32)
    noisy = functools.partial(
        noisy_inputs,
        protocol=protocol,
        snr_range=options.snr_range,
        generator=generator,
        model_error=model_error,
    )
    x = torch.as_tensor(signals, dtype=torch.float32)
    y = torch.as_tensor(coordinates, dtype=torch.float32)
    n = len(x)
    order = torch.randperm(n, generator=generator)
    n_val = max(1, int(round(options.validation * n)))
    val, train = order[:n_val], order[n_val:]
    # The initial weights from the seed, not from whatever torch's global
    # generator holds (three trainings of one key gave restricted fractions
    # 0.5097, 0.5078, 0.5160 on one voxel); the caller's generator is left as
    # it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        net = PosteriorEstimator(x.shape[1], options)
    inputs, sigma = noisy(x[train])
    stats = torch.cat([inputs, torch.log(sigma)[:, None]], -1)
    net.x_mean.copy_(stats.mean(0))
    net.x_std.copy_(stats.std(0).clamp_min(1e-6))
    net.y_mean.copy_(y[train].mean(0))
    net.y_std.copy_(y[train].std(0).clamp_min(1e-6))
    val_x, val_sigma = noisy(x[val])
    optimiser = torch.optim.Adam(net.parameters(), lr=options.learning_rate)
    steps = options.epochs * math.ceil(len(train) / options.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    best, best_state = math.inf, None
    bar = tqdm(
        range(options.epochs), desc="Training the posterior", disable=not progress
    )
    for _ in bar:
        net.train()
        for batch in torch.randperm(len(train), generator=generator).split(
            options.batch_size
        ):
            rows = train[batch]
            inputs, s = noisy(x[rows])
            loss = -net.log_prob(inputs, s, y[rows]).mean()
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            optimiser.step()
            schedule.step()
        net.eval()
        with torch.no_grad():
            score = -net.log_prob(val_x, val_sigma, y[val]).mean().item()
        if score < best:
            best = score
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        bar.set_postfix_str(f"validation -log p {score:.3f}")
    if best_state is None:
        raise RuntimeError(
            "the posterior's training diverged (no finite validation loss); "
            "lower learning_rate in TrainingOptions."
        )
    net.load_state_dict(best_state)
    net.eval()
    held_x, held_y = x[val], y[val]
    if calibration is not None:
        more_x, more_y = (torch.as_tensor(a, dtype=torch.float32) for a in calibration)
        held_x, held_y = torch.cat([held_x, more_x]), torch.cat([held_y, more_y])
    net.level_tables = torch.as_tensor(
        measure_level_tables(net, held_x, held_y, noisy, seed=options.seed),
        dtype=torch.float32,
    )
    held_out = add_model_error(x[val], model_error, generator)
    _set_support(net, x[train], held_out, protocol, options, generator)
    return net


def _set_support(net, train, held_out, protocol, options, generator):
    """Training signals and, per noise level, the SUPPORT_QUANTILE of the
    support statistic of held-out simulations (noisy, b0-normalised; with
    their approximation error, when modelled)."""
    net.support_signals = train.clone()
    snrs = np.geomspace(options.snr_range[0] / 2, options.snr_range[1] * 2, 9)
    limits = []
    for snr in snrs:
        sigma = torch.full((len(held_out),), 1.0 / snr)
        noisy = normalise_b0(add_noise(held_out, sigma, generator), protocol)
        statistic = net.support_statistic(noisy, sigma)
        limits.append(float(torch.quantile(statistic, SUPPORT_QUANTILE)))
    net.support_log_sigma = torch.as_tensor(
        np.log(1.0 / snrs[::-1]).copy(), dtype=torch.float32
    )
    net.support_threshold = torch.as_tensor(limits[::-1], dtype=torch.float32)
