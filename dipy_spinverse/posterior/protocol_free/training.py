"""Training the protocol-free estimator on unions of the design's shells.

Protocols of 16 random shells ("unions") are drawn from the design
(:func:`~.design.random_union`) and draws of the default prior simulated on
each (:func:`~.shipped.simulated_unions`). Every epoch each draw is seen
through a random subset of its union's shells (1 to 16), each through all
its 20 directions or (half the time) a random 6 to 19, with fresh Rician
noise and the error of a b = 0 normalisation by a few noisy b = 0 volumes
(:func:`_epoch_tokens`: numpy's generator, and a b = 0 error per shell,
where the per-protocol estimator's inputs are torch's,
:func:`~dipy_spinverse.posterior.noise.noisy_inputs`). The loop is the
per-protocol estimator's (:func:`~dipy_spinverse.posterior.training.optimise`:
Adam, a cosine-annealed rate, the state of least validation loss kept), and
so is the recalibration of the credible bounds on held-out draws
(:func:`~dipy_spinverse.posterior.calibration.recalibration_tables`), over
the design: an interval is calibrated on average over the design's
protocols, not on each.
"""

from typing import NamedTuple

import numpy as np
import torch

from ...sim.sequences import Protocol
from ..calibration import recalibration_tables
from ..estimator import kept_generators
from ..training import optimise
from .design import DIRECTIONS, MAX_SHELLS, SNR_RANGE, decode_free, encode_free
from .estimator import ProtocolFreeEstimator
from .shells import make_shell
from .tokens import shell_token_features

__all__ = ["train_protocol_free"]


class _Union(NamedTuple):
    protocol: Protocol
    shell: np.ndarray
    signals: np.ndarray
    coordinates: np.ndarray


def _epoch_tokens(unions, rows, rng):
    """Tokens (n, MAX_SHELLS, N_TOKEN), relative noise (n,), coordinates
    and the shells read (n, MAX_SHELLS) of the draws ``rows`` (per union,
    an index array), with fresh noise, shells and direction subsets."""
    tokens, sigmas, ys, masks = [], [], [], []
    for union, idx in zip(unions, rows, strict=True):
        if not len(idx):
            continue
        clean = union.signals[idx]
        log_snr = rng.uniform(*np.log(SNR_RANGE), size=(len(idx), 1))
        sigma = np.exp(-log_snr)
        noisy = np.hypot(
            clean + sigma * rng.standard_normal(clean.shape),
            sigma * rng.standard_normal(clean.shape),
        )
        shells = []
        for s in range(MAX_SHELLS):
            members = np.flatnonzero(union.shell == s)
            shell = None
            while shell is None:  # a subset on one great circle is drawn again
                # Half the shells whole: most protocols have 20 directions or
                # more a shell (read as 20); the others 6 to 19.
                whole = rng.random() < 0.5
                k = len(members) if whole else rng.integers(DIRECTIONS[0], len(members))
                picked = np.sort(rng.choice(members, size=k, replace=False))
                shell = make_shell(union.protocol, picked)
            # The b = 0 normalisation of a real voxel: divided by the mean
            # of a few noisy b = 0 volumes of its sequence.
            n_b0 = rng.integers(1, 7)
            b0 = np.hypot(
                1 + sigma[:, 0] * rng.standard_normal(len(idx)) / np.sqrt(n_b0),
                sigma[:, 0] * rng.standard_normal(len(idx)) / np.sqrt(n_b0),
            )
            noisy[:, picked] /= b0[:, None]
            shells.append(shell)
        mask = _random_masks(rng, len(idx))
        tokens.append(shell_token_features(shells, noisy, mask > 0.5))
        sigmas.append(sigma[:, 0])
        ys.append(union.coordinates[idx])
        masks.append(mask)
    return tuple(np.concatenate(a) for a in (tokens, sigmas, ys, masks))


def _random_masks(rng, n, n_shells=MAX_SHELLS):
    k = rng.integers(1, n_shells + 1, size=n)
    return (rng.random((n, n_shells)).argsort(1) < k[:, None]).astype(np.float32)


@kept_generators()  # it seeds torch's generator
def train_protocol_free(
    unions,
    *,
    epochs=60,
    seed=0,
    batch=256,
    lr=2e-3,
    validation=0.1,
    calibration=0.1,
    progress=False,
):
    """Train and recalibrate a :class:`~.estimator.ProtocolFreeEstimator`.

    Parameters
    ----------
    unions : list of (Protocol, ndarray, ndarray, dict)
        Each union's protocol (:func:`~.design.random_union`:
        :data:`~.design.MAX_SHELLS` shells), each acquisition's shell index,
        its draws' noise-free signals (n, n_acquisitions) and their true
        descriptors (as :meth:`~dipy_spinverse.posterior.PriorSimulator.sample`
        returns them).
    epochs : int
        Passes over the training draws (fresh noise, shells and directions
        each); the state of least validation loss is kept.
    seed : int
        Seeds the split, the noise, the subsets and the network.
    batch, lr : int, float
        Adam's batch size and initial learning rate (cosine annealed).
    validation, calibration : float
        Fractions of every union's draws held out for early stopping and
        for the recalibration of the credible bounds.
    progress : bool
        A progress bar over the epochs.

    Returns
    -------
    ProtocolFreeEstimator
        In evaluation mode, on the CPU.

    Raises
    ------
    RuntimeError
        When the training diverges (no finite validation loss).
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    prepared, splits = [], []
    for protocol, shell, signals, truth in unions:
        coordinates = encode_free(truth, rng=rng)
        prepared.append(_Union(protocol, shell, np.asarray(signals), coordinates))
        order = rng.permutation(len(signals))
        n_val = max(1, int(round(validation * len(order))))
        n_cal = max(1, int(round(calibration * len(order))))
        splits.append(
            (order[n_val + n_cal :], order[:n_val], order[n_val : n_val + n_cal])
        )
    train_rows, val_rows, cal_rows = ([s[i] for s in splits] for i in range(3))
    net = ProtocolFreeEstimator()
    first = _epoch_tokens(prepared, train_rows, rng)
    _standardise(net, *first)
    check = [
        torch.as_tensor(a, dtype=torch.float32)
        for a in _epoch_tokens(prepared, val_rows, rng)
    ]

    def batch_losses(epoch):
        # The first epoch's inputs are those the standardisation measured.
        fresh = _epoch_tokens(prepared, train_rows, rng) if epoch else first
        tokens, sigma, y, mask = fresh
        order = rng.permutation(len(y))
        for lo in range(0, len(y), batch):
            part = order[lo : lo + batch]
            inputs = (tokens, mask, sigma, y)
            yield -net.log_prob(
                *(torch.as_tensor(a[part], dtype=torch.float32) for a in inputs)
            ).mean()

    def validation_loss():
        tokens, sigma, y, mask = check
        return -float(net.log_prob(tokens, mask, sigma, y).mean())

    optimise(
        net,
        batch_losses,
        validation_loss,
        epochs=epochs,
        learning_rate=lr,
        fix="lower lr",
        name="protocol-free posterior",
        progress=progress,
    )

    def held_out_inputs():
        tokens, sigma, _, mask = _epoch_tokens(prepared, cal_rows, rng)
        return tuple(
            torch.as_tensor(a, dtype=torch.float32) for a in (tokens, mask, sigma)
        )

    truth = np.concatenate(
        [u.coordinates[r] for u, r in zip(prepared, cal_rows, strict=True)]
    )
    tables = recalibration_tables(
        net,
        decode_free(truth),
        held_out_inputs,
        repeats=3,
        seed=seed,
        rng=rng,
        decode=decode_free,
    )
    net.level_tables.copy_(torch.as_tensor(tables, dtype=torch.float32))
    return net


def _standardise(net, tokens, sigma, y, mask):
    """The network's standardisation of tokens and coordinates, from the
    first epoch's inputs (the tokens of the shells read)."""
    flat = tokens[mask > 0.5]
    net.token_mean.copy_(torch.as_tensor(flat.mean(0)))
    net.token_std.copy_(torch.as_tensor(flat.std(0) + 1e-6))
    net.y_mean.copy_(torch.as_tensor(y.mean(0), dtype=torch.float32))
    net.y_std.copy_(torch.as_tensor(y.std(0), dtype=torch.float32))
