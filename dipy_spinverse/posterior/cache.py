"""The posterior estimators' cache: each trained once per settings and code.

:func:`load_or_train` returns the estimator of a prior on a protocol: the one
shipped with the package under the same settings (:mod:`.shipped`, when its
manifest accepts the current code), else the user's cache entry
``posterior-<key>.pt`` (:func:`estimator_key`: a hash of the settings, then
the digest of the code that trains it), else it trains one
(:func:`.training.simulate_and_train`) and saves it there. A file other
code wrote is never served, and two processes that ask for one key train
it once (:func:`~dipy_spinverse.files.load_or_build`).
"""

import hashlib
import shutil
import warnings

import torch
from dipy.utils.logging import logger

from ..files import StaleCacheError, cache_root, load_or_build
from ..provenance import StaleEstimatorWarning
from ..sim.forward import update_digest
from ..sim.grid import TetGrid
from .estimator import PosteriorEstimator, kept_generators
from .shipped import SHIPPED, estimator_code, refusal, shipped_name
from .simulator import bound_simulator
from .targets import TISSUE_TARGETS
from .training import default_training, simulate_and_train

__all__ = ["estimator_key", "load_estimator_file", "load_or_train"]

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
    prior : TissuePrior, WhiteMatterPrior or MixturePrior
        The prior the estimator is trained on (its ``estimator_kind`` names
        the code).
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
    code = estimator_code(prior.estimator_kind)
    return f"{_settings_key(prior, protocol, options)}-{code}"


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
    prior : TissuePrior, WhiteMatterPrior or MixturePrior
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
    settings = _settings_key(prior, protocol, options)
    code = estimator_code(prior.estimator_kind)
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
            return (
                load_estimator_file(
                    shipped, len(protocol), options, targets=prior.targets
                ),
                shipped,
            )
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
        load=lambda path: load_estimator_file(
            path, len(protocol), options, targets=prior.targets, code=code
        ),
        build=lambda: _train(
            bound_simulator(
                prior,
                protocol,
                device=device,
                engine=engine,
                address=address,
                cache_dir=cache_dir,
            ),
            options,
            path,
            progress,
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


def _train(simulator, options, path, progress):
    """Announce the training of the estimator cached at ``path`` and run it
    (:func:`.training.simulate_and_train`), its simulations kept as they are
    made in ``posterior-<key>.partial``, so that an interrupted training
    resumes."""
    partial = _partial_folder(path)
    logger.info(
        f"Training the Spinverse posterior for this protocol and prior (once; "
        f"cached in {path}): {options.n_simulations + options.n_calibration} "
        f"simulations, then {options.epochs} training epochs; simulations are "
        f"kept in {partial} as they are made, so an interrupted run resumes. "
        "Timing the patch sizes first."
    )
    return simulate_and_train(
        simulator, options, checkpoints=partial, progress=progress
    )


@kept_generators()  # building the network draws from torch's generator
def load_estimator_file(path, n_inputs, options, *, targets=TISSUE_TARGETS, code=None):
    """The per-protocol estimator saved at ``path``, as :func:`load_or_train`
    saves it (its ``state``, ``key`` and ``code``).

    Parameters
    ----------
    path : path-like
        The cache file, or a shipped one.
    n_inputs : int
        The protocol's measurements (the estimator's input width).
    options : TrainingOptions
        The options it was trained with (its widths: ``hidden``,
        ``embedding``, ``transforms``; any object with these attributes).
    targets : TissueTargets or DescriptorTargets
        Its prior's ``targets`` (default the cells').
    code : str, optional
        The code digest that must have trained it (default: not checked).

    Returns
    -------
    PosteriorEstimator
        In evaluation mode.

    Raises
    ------
    dipy_spinverse.files.StaleCacheError
        When ``code`` is given and other code trained it: a file renamed or
        copied by hand is trained again, never served.
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if code is not None and saved.get("code") != code:
        raise StaleCacheError(
            f"it was trained by other code (digest {saved.get('code')}, this "
            f"code's {code})"
        )
    state = saved["state"]
    # The inverse-autoregressive flow's parameters sit one level deeper.
    fast = any(key.startswith("flow.transform.transform.") for key in state)
    net = PosteriorEstimator(n_inputs, options, targets=targets, fast_sampling=fast)
    for name in ("support_signals", "support_log_sigma", "support_threshold"):
        setattr(net, name, torch.empty_like(state[name]))
    net.load_state_dict(state)
    net.eval()
    return net
