"""Recalibrated credible intervals: the flow's quantiles mapped by their coverage.

A trained flow can be slightly over- or under-confident for a descriptor
(for example the restricted fraction's 50 % intervals held the truth in
41-44 % of 1,000 held-out voxels). Quantile recalibration (Kuleshov, Fenner
and Ermon, ICML 2018) corrects that, per descriptor, from simulations the
network did not train on:

1. for every held-out simulation (with fresh noise, and the grid's modelled
   error when there is one), the rank of the true value among posterior
   draws gives its probability integral transform ``u = F(truth)`` (ties,
   as of the integer cell count, broken at random: uniform when
   calibrated);
2. the empirical quantiles of ``u`` form a table ``H^-1``: a credible bound
   of level ``p`` is the flow's quantile at ``H^-1(p)`` instead of ``p``.

The map is monotone and the identity for a calibrated flow, so it moves
intervals only as far as held-out simulations show they miss. It holds for
the tissue the training simulations describe (the prior, on its grid or
with its modelled error): it cannot correct what the simulations do not
hold. The bounds stay within the flow's draws: a flow so overconfident
that truths often fall beyond all its draws (about 2x too narrow, for the
few hundred draws a fit keeps) is only partly corrected. ``orientation`` (a
unit vector) is not recalibrated.
"""

import math

import numpy as np
import torch

from .targets import SCALARS, decode

__all__ = [
    "SCALARS",
    "LEVELS",
    "rank_transform",
    "level_table",
    "calibrated_levels",
    "calibrated_draws",
    "measure_level_tables",
    "recalibration_tables",
]

#: Nominal levels at which a table stores its calibrated level.
LEVELS = np.linspace(0.0, 1.0, 101)

# Held-out (simulation, noise) pairs and posterior draws each that measure a
# table: the 5 % level's quantile of 3,000 transforms has a standard error
# of 0.004, and 64 draws place each transform within 1/65.
_N_TRANSFORMS = 3000
_N_DRAWS = 64


def rank_transform(draws, truth, rng):
    """The probability integral transform of ``truth`` under ``draws``.

    Parameters
    ----------
    draws : ndarray (n_draws, n)
        Posterior draws per voxel.
    truth : ndarray (n,)
    rng : numpy.random.Generator
        Breaks ties (and places the truth between neighbouring draws).

    Returns
    -------
    ndarray (n,)
        ``(#draws below + U (#ties + 1)) / (n_draws + 1)`` with ``U``
        uniform: uniform on (0, 1) when ``truth`` is a draw of the same
        distribution.
    """
    below = (draws < truth).sum(0)
    ties = (draws == truth).sum(0)
    return (below + rng.uniform(size=below.shape) * (ties + 1)) / (len(draws) + 1)


def level_table(transforms):
    """The calibrated level of each nominal level of :data:`LEVELS`.

    The empirical quantiles of the transforms (``H^-1``), with the ends
    pinned at 0 and 1.
    """
    table = np.quantile(np.asarray(transforms, dtype=float), LEVELS)
    table[0], table[-1] = 0.0, 1.0
    return table


def calibrated_levels(levels, table):
    """The flow's quantile levels that give credible bounds at ``levels``.

    Parameters
    ----------
    levels : float or array_like
        The nominal levels wanted, in [0, 1].
    table : array_like (len(LEVELS),)
        The calibrated level at every one of :data:`LEVELS`.

    Returns
    -------
    float or ndarray
        The flow's levels, interpolated linearly (shape of ``levels``).
    """
    return np.interp(levels, LEVELS, np.asarray(table, dtype=float))


def calibrated_draws(values, table, rng):
    """Draws of the recalibrated posterior from draws of the flow.

    Each output draw is the flow's draw, per voxel, of rank nearest to
    ``H^-1(u) (n - 1)`` for ``u`` uniform (independent between voxels): a
    value the flow drew, so integer descriptors stay integers.

    Parameters
    ----------
    values : ndarray (n_draws, n_voxels)
    table : ndarray (len(LEVELS),)
    rng : numpy.random.Generator

    Returns
    -------
    ndarray (n_draws, n_voxels)
    """
    levels = calibrated_levels(rng.uniform(size=values.shape), table)
    rank = np.rint(levels * (len(values) - 1)).astype(int)
    return np.take_along_axis(np.sort(values, axis=0), rank, 0)


@torch.no_grad()
def measure_level_tables(net, signals, coordinates, noisy, *, seed, targets=None):
    """Level tables of a trained estimator from held-out simulations.

    Parameters
    ----------
    net : PosteriorEstimator
    signals : Tensor (n, n_acquisitions)
        Noise-free held-out signals.
    coordinates : Tensor (n, len(targets.coordinates))
        Their true flow coordinates.
    noisy : callable
        ``noisy(signals) -> (inputs, sigma)``: the noisy, b0-normalised
        inputs the network trains on (fresh noise at every call).
    seed : int
    targets : TissueTargets or DescriptorTargets, optional
        The estimator's (default ``net.targets``).

    Returns
    -------
    ndarray (len(targets.calibrated), len(LEVELS))
    """
    targets = net.targets if targets is None else targets
    return recalibration_tables(
        net,
        targets.decode(coordinates.numpy()),
        lambda: noisy(signals),
        repeats=max(1, math.ceil(_N_TRANSFORMS / len(signals))),
        seed=seed,
        rng=np.random.default_rng(seed),
        decode=targets.decode,
        scalars=targets.calibrated,
    )


@torch.no_grad()
def recalibration_tables(
    net, truth, inputs, *, repeats, seed, rng, decode=decode, scalars=SCALARS
):
    """Level tables of an estimator from held-out truths, seen ``repeats``
    times through fresh inputs: every estimator's recalibration.

    Parameters
    ----------
    net : torch.nn.Module
        ``net.sample(*inputs(), n, generator_seed=...)`` gives ``n`` flow
        draws a voxel (:class:`~.estimator.PosteriorEstimator`, or the
        protocol-free estimator).
    truth : dict
        The held-out descriptors (each of ``scalars``, arrays (n,)).
    inputs : callable
        ``inputs()``: the network's inputs of those voxels (a tuple of
        tensors), drawn afresh at every call (noise, and what else the
        estimator is trained to see).
    repeats : int
        Times the held-out truths are seen.
    seed : int
        The draws of repeat ``r`` are seeded ``seed + r``.
    rng : numpy.random.Generator
        Breaks the rank transforms' ties (:func:`rank_transform`).
    decode : callable
        Flow coordinates to descriptors (:func:`.targets.decode`).
    scalars : tuple of str
        The descriptors recalibrated, in the table's order (default the
        cells' :data:`SCALARS`).

    Returns
    -------
    ndarray (len(scalars), len(LEVELS))
    """
    transforms = {name: [] for name in scalars}
    for repeat in range(repeats):
        draws = net.sample(*inputs(), _N_DRAWS, generator_seed=seed + repeat)
        values = decode(draws.numpy())
        for name in scalars:
            transforms[name].append(rank_transform(values[name], truth[name], rng))
    return np.stack([level_table(np.concatenate(transforms[n])) for n in scalars])
