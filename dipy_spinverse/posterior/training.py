"""Training the amortised posterior on simulations of its prior.

Every setting of a training is one :class:`TrainingOptions` (all in the
estimator's cache key); a prior without any is trained with
:func:`default_training`'s.
:func:`simulate_and_train` simulates the training set with a
:class:`~dipy_spinverse.posterior.PriorSimulator` (kept as it is made, so
that an interrupted training resumes), with held-out draws to calibrate on
and, where modelled, the grid's error, then trains on it:
:func:`train_estimator` fits the embedding and the flow of a
:class:`~dipy_spinverse.posterior.PosteriorEstimator` together, minimising
the negative log density of the true flow coordinates of noisy inputs
(:func:`.noise.noisy_inputs`: fresh noise every batch), keeps the epoch
best on the validation part (:func:`optimise`: Adam, a cosine-annealed
rate, the best state; the protocol-free estimator trains in it too), then
recalibrates its credible bounds (:func:`.calibration.measure_level_tables`)
and measures the prior's support (:func:`.support.measure_support`) on
simulations it did not train on. A training is reproducible: the same
options and seed give the same estimator, to float tolerance. Caching it
is :mod:`.cache`'s.
"""

import functools
import math
import pathlib
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from dipy.utils.logging import logger
from tqdm.auto import tqdm

from ..checks import check_int, check_number
from .calibration import measure_level_tables
from .estimator import PosteriorEstimator
from .noise import add_model_error, noisy_inputs
from .prior import TissuePrior
from .support import measure_support
from .targets import TISSUE_TARGETS

__all__ = [
    "TrainingOptions",
    "WHITE_MATTER_TRAINING",
    "default_training",
    "simulate_and_train",
    "train_estimator",
    "optimise",
]


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


#: How a prior of axons alone (the default :class:`TissuePrior`) is trained
#: when no options are given: 10,000 simulations (at ~0.1 s a section on 2
#: cores, the training set of the README demo's protocol takes about 20
#: minutes), and the sections' grid error modelled against resolution 12
#: (at resolution 6 the largest signal change per draw has a median of
#: 0.05: thin channels between packed fibres and wavevectors the coarse
#: spacing does not resolve; doc/validation/sections.md).
WHITE_MATTER_TRAINING = TrainingOptions(n_simulations=10_000, reference_resolution=12)


def default_training(prior):
    """The :class:`TrainingOptions` a prior is trained with when none are
    given: :data:`WHITE_MATTER_TRAINING` for a prior of axons alone (whose
    finer reference grid is affordable), ``TrainingOptions()`` otherwise.

    Parameters
    ----------
    prior : TissuePrior, WhiteMatterPrior or MixturePrior

    Returns
    -------
    TrainingOptions
    """
    if isinstance(prior, TissuePrior) and set(prior.families) == {"axon"}:
        return WHITE_MATTER_TRAINING
    return TrainingOptions()


def simulate_and_train(simulator, options, *, checkpoints=None, progress=True):
    """Simulate a training set of a prior and train an estimator on it.

    After logging how long the simulations will take (every patch size
    timed), ``options.n_simulations`` draws are simulated to train on,
    ``options.n_calibration`` more to calibrate the credible bounds on, and,
    with ``options.reference_resolution``, ``options.n_reference`` pairs
    whose difference is the prior grid's error (each set from its own seed,
    :meth:`~dipy_spinverse.posterior.PriorSimulator.sample` and
    ``sample_pairs``); then :func:`train_estimator`.

    The descriptors are encoded as the prior's ``targets`` say
    (:mod:`.targets`); a grid error (``options.reference_resolution``) is
    modelled for a simulator that draws pairs (``sample_pairs``, a
    :class:`~dipy_spinverse.posterior.TissuePrior`'s).

    Parameters
    ----------
    simulator : PriorSimulator, WhiteMatterSimulator or MixtureSimulator
        The prior bound to the protocol, where and how it simulates.
    options : TrainingOptions
    checkpoints : path-like, optional
        A folder that keeps the simulations as they are made
        (``training.npz``, ``calibration.npz``, ``grid-error.npz``), so
        that an interrupted training resumes; default none kept.
    progress : bool

    Returns
    -------
    PosteriorEstimator
    """
    n_draws = options.n_simulations + options.n_calibration
    targets = simulator.prior.targets
    pairs = options.reference_resolution is not None
    if pairs and not hasattr(simulator, "sample_pairs"):
        raise ValueError(
            "TrainingOptions(reference_resolution=...) models the grid error of a "
            f"TissuePrior; {type(simulator.prior).__name__} has none to model: "
            "leave reference_resolution as None."
        )
    extra = {"reference_resolution": options.reference_resolution} if pairs else {}

    def kept(name):
        return None if checkpoints is None else pathlib.Path(checkpoints) / name

    # Every patch size timed and weighted by how often the prior draws it
    # (the time steps measured first, once per simulator): 16 timed draws
    # announced 27 min for the default prior on the HCP protocol, whose
    # small patches took over 1 s a draw (3,561 draws in 35 min).
    start = time.perf_counter()
    per_draw = simulator.seconds_per_draw(seed=options.seed + 10**6)
    setup = time.perf_counter() - start
    logger.info(
        f"About {per_draw * n_draws / 60:.1f} min of simulation at "
        f"{per_draw * 1e3:.0f} ms a draw (every patch size timed, in {setup:.0f} s)."
    )
    signals, truth = simulator.sample(
        options.n_simulations,
        seed=options.seed,
        progress=progress,
        checkpoint=kept("training.npz"),
        **extra,
    )
    coordinates = targets.encode(truth, rng=np.random.default_rng(options.seed))
    calibration = None
    if options.n_calibration:
        logger.info(
            f"Simulating {options.n_calibration} more draws to calibrate the "
            "credible intervals on."
        )
        held_signals, held_truth = simulator.sample(
            options.n_calibration,
            seed=options.seed + 3 * 10**6,
            progress=progress,
            checkpoint=kept("calibration.npz"),
            **extra,
        )
        calibration = (held_signals, targets.encode(held_truth))
    model_error = None
    if pairs:
        logger.info(
            f"Measuring the prior grid's discretisation error: {options.n_reference} "
            f"draws also simulated at resolution {options.reference_resolution}."
        )
        coarse, fine, _ = simulator.sample_pairs(
            options.n_reference,
            reference_resolution=options.reference_resolution,
            seed=options.seed + 2 * 10**6,
            progress=progress,
            checkpoint=kept("grid-error.npz"),
        )
        model_error = fine - coarse
    return train_estimator(
        signals,
        coordinates,
        simulator.protocol,
        options,
        model_error=model_error,
        calibration=calibration,
        targets=targets,
        progress=progress,
    )


def train_estimator(
    signals,
    coordinates,
    protocol,
    options,
    *,
    model_error=None,
    calibration=None,
    targets=TISSUE_TARGETS,
    progress=True,
):
    """Train a :class:`PosteriorEstimator` on simulations.

    Parameters
    ----------
    signals : ndarray (n, n_acquisitions)
        Noise-free simulated signals (1 at b = 0).
    coordinates : ndarray (n, len(targets.coordinates))
        Their descriptors' flow coordinates (``targets.encode``).
    protocol : Protocol
    options : TrainingOptions
    model_error : ndarray (m, n_acquisitions), optional
        Samples of the simulator's approximation error (reference minus
        prior-grid signals, :meth:`PriorSimulator.sample_pairs`), drawn from
        into every training and validation input (:func:`.noise.add_model_error`).
    calibration : (ndarray, ndarray), optional
        More held-out ``(signals, coordinates)``, not trained on, on which
        the credible bounds are recalibrated with the validation part.
    targets : TissueTargets or DescriptorTargets
        How the descriptors are modelled (the prior's ``targets``; default
        the cells' :data:`~.targets.TISSUE_TARGETS`).
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
        net = PosteriorEstimator(x.shape[1], options, targets=targets)
    inputs, sigma = noisy(x[train])
    stats = torch.cat([inputs, torch.log(sigma)[:, None]], -1)
    net.x_mean.copy_(stats.mean(0))
    net.x_std.copy_(stats.std(0).clamp_min(1e-6))
    net.y_mean.copy_(y[train].mean(0))
    net.y_std.copy_(y[train].std(0).clamp_min(1e-6))
    val_x, val_sigma = noisy(x[val])

    def batch_losses(epoch):
        batches = torch.randperm(len(train), generator=generator)
        for batch in batches.split(options.batch_size):
            rows = train[batch]
            inputs, s = noisy(x[rows])
            yield -net.log_prob(inputs, s, y[rows]).mean()

    optimise(
        net,
        batch_losses,
        lambda: -net.log_prob(val_x, val_sigma, y[val]).mean().item(),
        epochs=options.epochs,
        learning_rate=options.learning_rate,
        steps_per_epoch=math.ceil(len(train) / options.batch_size),
        clip_norm=5.0,
        fix="lower learning_rate in TrainingOptions",
        progress=progress,
    )
    held_x, held_y = x[val], y[val]
    if calibration is not None:
        more_x, more_y = (torch.as_tensor(a, dtype=torch.float32) for a in calibration)
        held_x, held_y = torch.cat([held_x, more_x]), torch.cat([held_y, more_y])
    net.level_tables = torch.as_tensor(
        measure_level_tables(net, held_x, held_y, noisy, seed=options.seed),
        dtype=torch.float32,
    )
    held_out = add_model_error(x[val], model_error, generator)
    measure_support(net, x[train], held_out, protocol, options, generator)
    return net


def optimise(
    net,
    batch_losses,
    validation_loss,
    *,
    epochs,
    learning_rate,
    steps_per_epoch=None,
    clip_norm=None,
    fix="lower the learning rate",
    name="posterior",
    progress=True,
):
    """Adam on a network's batch losses, its learning rate cosine-annealed,
    and the epoch of least validation loss kept: every estimator's loop.

    Parameters
    ----------
    net : torch.nn.Module
    batch_losses : callable
        ``batch_losses(epoch)``: the epoch's batch losses (scalar tensors),
        each computed when it is reached (so on inputs drawn afresh), with
        the network in training mode.
    validation_loss : callable
        ``validation_loss()``: the validation loss (float), the network in
        evaluation mode, without gradients.
    epochs : int
    learning_rate : float
        Adam's initial rate.
    steps_per_epoch : int, optional
        Batches an epoch: the rate is annealed batch by batch over
        ``epochs * steps_per_epoch`` steps; default: epoch by epoch.
    clip_norm : float, optional
        Each step's gradients clipped to this norm; default none.
    fix : str
        What to do when the training diverges (in the error's message).
    name : str
        What is trained (in the progress bar and the error's message).
    progress : bool

    Returns
    -------
    float
        The least validation loss; ``net`` holds its epoch's state, in
        evaluation mode.

    Raises
    ------
    RuntimeError
        When no epoch has a finite validation loss (the training diverged).
    """
    optimiser = torch.optim.Adam(net.parameters(), lr=learning_rate)
    steps = epochs if steps_per_epoch is None else epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    best, best_state = math.inf, None
    bar = tqdm(range(epochs), desc=f"Training the {name}", disable=not progress)
    for epoch in bar:
        net.train()
        for loss in batch_losses(epoch):
            optimiser.zero_grad()
            loss.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip_norm)
            optimiser.step()
            if steps_per_epoch is not None:
                schedule.step()
        if steps_per_epoch is None:
            schedule.step()
        net.eval()
        with torch.no_grad():
            score = validation_loss()
        if score < best:
            best = score
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        bar.set_postfix_str(f"validation -log p {score:.3f}")
    if best_state is None:
        raise RuntimeError(
            f"the {name}'s training diverged (no finite validation loss at "
            f"learning rate {learning_rate!r}); {fix}."
        )
    net.load_state_dict(best_state)
    net.eval()
    return best
