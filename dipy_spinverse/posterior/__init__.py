"""Amortised posteriors of tissue descriptors (``fit_method="posterior"``).

:class:`TissuePrior` (what tissue a voxel may hold) and its
:class:`PriorSimulator` (signals simulated by the package and their true
descriptors), the flow that maps a voxel's signal to the posterior of its
descriptors (:class:`PosteriorEstimator`), and :func:`load_or_train`, which
trains it once per protocol, prior, options and code and caches it (or reads
one shipped with the package, :mod:`.shipped`).
"""

import hashlib
import shutil
import time
import warnings

import numpy as np
import torch
from dipy.utils.logging import logger

from ..files import StaleCacheError, cache_root, load_or_build
from ..provenance import StaleEstimatorWarning
from ..sim.forward import update_digest
from ..sim.grid import TetGrid
from .estimator import PosteriorEstimator, TrainingOptions, train_estimator
from .prior import ALL_FAMILIES, FAMILIES, WHITE_MATTER, PriorSimulator, TissuePrior
from .shipped import SHIPPED, estimator_code, refusal, shipped_name
from .targets import TARGETS, decode, encode, shape_descriptors

__all__ = [
    "WHITE_MATTER_TRAINING",
    "default_training",
    "ALL_FAMILIES",
    "FAMILIES",
    "WHITE_MATTER",
    "TARGETS",
    "PosteriorEstimator",
    "PriorSimulator",
    "TissuePrior",
    "TrainingOptions",
    "decode",
    "encode",
    "estimator_key",
    "load_or_train",
    "shape_descriptors",
    "train_estimator",
]


# load_or_train reads the shipped estimators' folder as this module's
# SHIPPED (from .shipped), which tests and benchmarks point elsewhere.


def estimator_key(prior, protocol, options):
    """Hash of everything a trained estimator depends on.

    The prior, the protocol's b-values, directions and waveforms, every
    training option (hyperparameters included), then the code that simulates
    and trains it (:func:`.shipped.estimator_code`, computed from its source:
    no version number to bump by hand).

    Parameters
    ----------
    prior : TissuePrior
        The prior the estimator is trained on.
    protocol : Protocol
        The acquisition.
    options : TrainingOptions
        Every training option.

    Returns
    -------
    str
        ``<settings>-<code>``: the first 20 hex digits of the SHA-256 digest
        of the settings (the name of a shipped estimator's file), then the
        code's digest.
    """
    return f"{_settings_key(prior, protocol, options)}-{estimator_code()}"


def _settings_key(prior, protocol, options):
    """The first 20 hex digits of the SHA-256 digest of the prior, the
    protocol and the options (the code apart: :func:`estimator_key`)."""
    digest = hashlib.sha256()
    probe = TetGrid.bcc(1.0, 2, boundary="periodic")
    update_digest(
        digest,
        probe,
        protocol,
        prior=prior.description(),
        options=options.description(),
    )
    return digest.hexdigest()[:20]


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
    prior : TissuePrior

    Returns
    -------
    TrainingOptions
    """
    if set(prior.families) == {"axon"}:
        return WHITE_MATTER_TRAINING
    return TrainingOptions()


def load_or_train(
    prior,
    protocol,
    options=None,
    *,
    cache_dir=None,
    progress=True,
    device="cpu",
    engine="serial",
    address=None,
):
    """The posterior estimator of ``prior`` on ``protocol``, trained if absent.

    Before training it logs how long the simulations will take (measured on
    a few draws) and shows progress bars; the result is saved under
    ``<cache>/posterior-<key>.pt`` (:func:`estimator_key`: the settings and
    the code) and read from there on later calls; a cached file another code
    wrote is trained again. An estimator of the same settings shipped with
    the package (:data:`SHIPPED`) is read instead of training when its
    manifest accepts the current code (:mod:`.shipped`; else a
    :class:`~dipy_spinverse.provenance.StaleEstimatorWarning`, and the cache
    serves); a shipped file that cannot be read is never used nor rebuilt
    there (a warning; the cache serves). Two processes that train one key
    train it once: the second waits for the first and reads its estimator
    (:func:`~dipy_spinverse.files.load_or_build`).

    Parameters
    ----------
    prior : TissuePrior
    protocol : Protocol
    options : TrainingOptions, optional
        Default :func:`default_training` of the prior.
    cache_dir : path-like, optional
        Default :func:`dipy_spinverse.files.cache_root`.
    progress : bool
    device : str or torch.device
        Where a training set is simulated (:class:`PriorSimulator`); the
        network is trained on the CPU and returned there.
    engine : {"serial", "ray", "dask"}
        Where a training set's batches of draws are simulated: this process,
        or the workers of a cluster (:class:`PriorSimulator`); the estimator
        is the same either way (same key, identical signals).
    address : str or distributed.Client, optional
        The cluster of ``engine`` (default: this process's, else
        ``RAY_ADDRESS``, else a local one of every core).

    Returns
    -------
    estimator : PosteriorEstimator
    path : pathlib.Path
        The cache file.
    """
    options = default_training(prior) if options is None else options
    settings, code = _settings_key(prior, protocol, options), estimator_code()
    key = f"{settings}-{code}"
    shipped = SHIPPED / shipped_name(settings)
    refused = shipped.exists() and refusal(shipped.name, code, folder=SHIPPED)
    if refused:
        warnings.warn(
            f"{refused} Until then it is not used: the estimator is trained "
            "into the cache.",
            StaleEstimatorWarning,
            stacklevel=2,
        )
    elif shipped.exists():
        try:
            return _load(shipped, len(protocol), options), shipped
        except Exception as err:  # noqa: BLE001 - a damaged file is never used
            # Never rebuilt in the package's folder (often read-only): the
            # user's cache takes the new one.
            warnings.warn(
                f"the shipped posterior estimator {shipped} cannot be read "
                f"({type(err).__name__}); reinstall dipy_spinverse. Until then "
                "it is trained into the cache.",
                stacklevel=2,
            )
    path = cache_root(cache_dir) / f"posterior-{key}.pt"
    net = load_or_build(
        path,
        load=lambda path: _load(path, len(protocol), options, code=code),
        build=lambda: _train(
            prior,
            protocol,
            options,
            path,
            progress,
            prior.simulator(protocol, device=device, engine=engine, address=address),
        ),
        save=lambda net, tmp: torch.save(
            {"state": net.state_dict(), "key": key, "code": code}, tmp
        ),
        what="posterior estimator",
    )
    # The estimator is saved: its simulations are no longer needed.
    shutil.rmtree(_partial_folder(path), ignore_errors=True)
    return net, path


def _partial_folder(path):
    """The folder beside an estimator's cache file ``path`` that keeps its
    training simulations while it trains (``posterior-<key>.partial``);
    removed once the estimator is saved.

    Parameters
    ----------
    path : pathlib.Path

    Returns
    -------
    pathlib.Path
    """
    return path.with_suffix(".partial")


def _train(prior, protocol, options, path, progress, simulator):
    """Simulate the training set (after logging how long it will take) and
    train the estimator on it; the simulations are kept as they are made in
    ``posterior-<key>.partial``, so that an interrupted training resumes."""
    n_draws = options.n_simulations + options.n_calibration
    partial = _partial_folder(path)
    logger.info(
        f"Training the Spinverse posterior for this protocol and prior (once; "
        f"cached in {path}): {n_draws} simulations, then {options.epochs} "
        f"training epochs; simulations are kept in {partial} as they are made, "
        "so an interrupted run resumes. Timing the patch sizes first."
    )
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
        reference_resolution=options.reference_resolution,
        checkpoint=partial / "training.npz",
    )
    coordinates = encode(truth, rng=np.random.default_rng(options.seed))
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
            reference_resolution=options.reference_resolution,
            checkpoint=partial / "calibration.npz",
        )
        calibration = (held_signals, encode(held_truth))
    model_error = None
    if options.reference_resolution is not None:
        logger.info(
            f"Measuring the prior grid's discretisation error: {options.n_reference} "
            f"draws also simulated at resolution {options.reference_resolution}."
        )
        coarse, fine, _ = simulator.sample_pairs(
            options.n_reference,
            reference_resolution=options.reference_resolution,
            seed=options.seed + 2 * 10**6,
            progress=progress,
            checkpoint=partial / "grid-error.npz",
        )
        model_error = fine - coarse
    return train_estimator(
        signals,
        coordinates,
        protocol,
        options,
        model_error=model_error,
        calibration=calibration,
        progress=progress,
    )


def _load(path, n_inputs, options, *, code=None):
    """The estimator saved at ``path``; with ``code``, only if that code
    trained it (else :class:`~dipy_spinverse.files.StaleCacheError`: a file
    renamed or copied by hand is trained again, never served)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if code is not None and saved.get("code") != code:
        raise StaleCacheError(
            f"it was trained by other code (digest {saved.get('code')}, this "
            f"code's {code})"
        )
    state = saved["state"]
    # The inverse-autoregressive flow's parameters sit one level deeper.
    fast = any(key.startswith("flow.transform.transform.") for key in state)
    net = PosteriorEstimator(n_inputs, options, fast_sampling=fast)
    for name in ("support_signals", "support_log_sigma", "support_threshold"):
        setattr(net, name, torch.empty_like(state[name]))
    net.load_state_dict(state)
    net.eval()
    return net
