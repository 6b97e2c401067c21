"""The shipped protocol-free estimator: how it is made, and read.

:data:`SHIPPED_SETTINGS` say how (the default prior's draws on random
unions of the design's shells, :func:`simulated_unions`; the training's
epochs and seed), :func:`shipped_key` names the file by them, and
:func:`load_protocol_free` reads it when the manifest
(:mod:`dipy_spinverse.posterior.shipped`) accepts the current code.
:func:`train_shipped` makes it again (``python -m
dipy_spinverse.posterior.protocol_free train --out DIR``).
"""

import hashlib
import json
import pathlib

import numpy as np
import torch

from ..estimator import kept_generators
from .design import DIRECTIONS, MAX_SHELLS, random_union
from .estimator import ProtocolFreeEstimator
from .training import train_protocol_free

__all__ = [
    "SHIPPED_SETTINGS",
    "settings_key",
    "shipped_key",
    "union_protocols",
    "simulated_unions",
    "load_protocol_free",
    "train_shipped",
]

#: How the shipped estimator is made (``python -m
#: dipy_spinverse.posterior.protocol_free train``): the default prior's draws
#: on ``unions`` random unions of ``shells`` shells of ``directions``
#: directions, ``draws`` a union; union ``held_out`` (of the same random
#: stream) is kept for doc/validation/protocol_free.md's test.
SHIPPED_SETTINGS = {
    "estimator": "protocol_free",
    "prior": "TissuePrior()",
    "unions": 30,
    "held_out": 6,
    "shells": MAX_SHELLS,
    "directions": DIRECTIONS[1],
    "draws": 400,
    "seed": 0,
    "epochs": 80,
}


def settings_key(settings):
    """The 20-hex-digit key of training settings (a JSON-able dict)."""
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def union_protocols(settings=SHIPPED_SETTINGS):
    """The training unions' protocols and shell indices, in order, and
    their simulation seeds: ``[(index, protocol, shell, seed), ...]`` (the
    held-out union is left out)."""
    rng = np.random.default_rng(settings["seed"])
    out = []
    for u in range(settings["unions"] + 1):
        protocol, shell = random_union(rng, settings["shells"], settings["directions"])
        if u != settings["held_out"]:
            out.append((u, protocol, shell, settings["seed"] + 1 + u))
    return out


def simulated_unions(folder, settings=SHIPPED_SETTINGS, *, progress=False):
    """Each training union's protocol, shells, signals and truth.

    The signals are simulated once (:class:`~dipy_spinverse.posterior.
    PriorSimulator` of the default prior) and kept in ``folder`` as
    ``union<u>-<n>-<seed>.npz`` (resumed from there); the truth is drawn
    again from the seed (cheap: the draws depend on the seed alone).

    Parameters
    ----------
    folder : path-like
        Where the simulations are kept (made if needed).
    settings : dict
        As :data:`SHIPPED_SETTINGS`.
    progress : bool
        Progress bars of the simulations.

    Returns
    -------
    list of (Protocol, ndarray, ndarray, dict)
        As :func:`~.training.train_protocol_free` takes them.
    """
    from ..prior import TissuePrior
    from ..simulator import draws_truth

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = settings["draws"]
    out = []
    for u, protocol, shell, seed in union_protocols(settings):
        simulator = TissuePrior().simulator(protocol)
        path = folder / f"union{u}-{n}-{seed}.npz"
        draws = simulator.draws(n, seed=seed)
        if path.exists():
            signals = np.load(path)["signals"]
        else:
            signals = simulator.simulate_draws(draws, progress=progress)
            np.savez(path, signals=signals)
        out.append((protocol, shell, signals, draws_truth(draws)))
    return out


def shipped_key():
    """The settings key of the shipped estimator."""
    return settings_key(SHIPPED_SETTINGS)


@kept_generators()  # building the network draws from torch's generator
def load_protocol_free(folder=None):
    """The shipped protocol-free estimator, if the current code accepts it.

    Parameters
    ----------
    folder : path-like, optional
        Default: the package's shipped estimators
        (:data:`~dipy_spinverse.posterior.shipped.SHIPPED`).

    Returns
    -------
    ProtocolFreeEstimator
        In evaluation mode, on the CPU.

    Raises
    ------
    RuntimeError
        When its manifest does not accept the code (the message says how to
        retrain or re-key it), or the file is missing or cannot be read as
        this estimator (truncated, overwritten, another network's: the
        message names the file and says to reinstall or retrain).
    """
    # Read at the call: the folder may be pointed elsewhere (tests do).
    from ..shipped import SHIPPED, refusal, shipped_name

    folder = pathlib.Path(SHIPPED if folder is None else folder)
    name = shipped_name(shipped_key())
    why = refusal(name, folder=folder)
    if why is not None:
        raise RuntimeError(f"{why} {_RETRAIN}")
    path = folder / name
    net = ProtocolFreeEstimator()
    # Retraining takes hours (unlike a per-protocol estimator's minutes):
    # a damaged file is refused, never retrained in the user's fit.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - a damaged file is never used
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise RuntimeError(
            f"the shipped protocol-free estimator {path} cannot be read "
            f"({type(err).__name__}: {detail}): the file is missing, truncated "
            "or not this estimator. Reinstall dipy_spinverse to restore it. "
            f"{_RETRAIN}"
        ) from err
    return net.eval()


_RETRAIN = (
    "(To make it again: `python -m dipy_spinverse.posterior.protocol_free "
    "train --out DIR`, then ship the file it writes: `python -m "
    "dipy_spinverse.posterior ship PATH --about TEXT`.)"
)


def train_shipped(folder, *, progress=True):
    """Make the shipped estimator again: simulate the training unions into
    ``folder`` (resumed; about 3 minutes a union on one core of a 2-core
    x86_64, 90 minutes for the 30), train it (about 10 minutes) and write
    ``folder/posterior-<key>-<code>.pt`` for ``python -m
    dipy_spinverse.posterior ship``.

    Parameters
    ----------
    folder : path-like
    progress : bool
        Progress bars of the simulations and the training.

    Returns
    -------
    pathlib.Path
        The estimator's file.
    """
    from ..shipped import estimator_code

    folder = pathlib.Path(folder)
    unions = simulated_unions(folder, progress=progress)
    net = train_protocol_free(
        unions,
        epochs=SHIPPED_SETTINGS["epochs"],
        seed=SHIPPED_SETTINGS["seed"],
        progress=progress,
    )
    code = estimator_code("protocol_free")
    path = folder / f"posterior-{shipped_key()}-{code}.pt"
    torch.save(net.state_dict(), path)
    return path
