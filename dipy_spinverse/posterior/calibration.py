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

The tables are measured per stratum of the flow's own median cell diameter
(:data:`STRATUM_EDGES`): a flow's miscalibration differs between axon-scale
cells, whose diameter the data barely resolve, and large ones (pooled, the
50 % intervals of cells under 5 um held 42-45 % where those of all cells
held 47-50 %). The stratum is read from each voxel's own draws, never from
the truth, so a fit applies the table its calibration measured for voxels
like it. A stratum with fewer than :data:`MIN_STRATUM` held-out transforms
takes the pooled table.
"""

import math

import numpy as np
import torch

from ..geometry.descriptors import DESCRIPTORS
from .targets import decode

__all__ = [
    "SCALARS",
    "LEVELS",
    "rank_transform",
    "level_table",
    "calibrated_levels",
    "calibrated_draws",
    "measure_level_tables",
    "STRATUM_EDGES",
    "MIN_STRATUM",
    "strata",
]

#: Descriptors with credible intervals (``orientation`` is a unit vector).
SCALARS = tuple(name for name in DESCRIPTORS if name != "orientation")

#: Nominal levels at which a table stores its calibrated level.
LEVELS = np.linspace(0.0, 1.0, 101)

# Held-out (simulation, noise) pairs and posterior draws each that measure a
# table: the 5 % level's quantile of 3,000 transforms has a standard error
# of 0.004, and 64 draws place each transform within 1/65.
_N_TRANSFORMS = 3000
_N_DRAWS = 64

#: The flow's median cell diameter (um) that separates the recalibration's
#: strata: axon-scale cells below it (the diameters most protocols leave
#: open), larger ones above.
STRATUM_EDGES = (5.0,)

#: Fewest held-out transforms a stratum's own table needs: its 5 % level's
#: quantile then has a standard error of about 0.009.
MIN_STRATUM = 600


def strata(diameter_draws):
    """Each voxel's recalibration stratum from its flow draws.

    Parameters
    ----------
    diameter_draws : ndarray (n_draws, n)
        The flow's draws of ``cell_diameter`` (um), not recalibrated.

    Returns
    -------
    ndarray of int (n,)
        The index of each voxel's median among :data:`STRATUM_EDGES`.
    """
    median = np.median(np.asarray(diameter_draws, dtype=float), axis=0)
    return np.searchsorted(STRATUM_EDGES, median, side="right")


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
def measure_level_tables(net, signals, coordinates, noisy, *, seed):
    """Level tables of a trained estimator from held-out simulations.

    Parameters
    ----------
    net : PosteriorEstimator
    signals : Tensor (n, n_acquisitions)
        Noise-free held-out signals.
    coordinates : Tensor (n, len(TARGETS))
        Their true flow coordinates.
    noisy : callable
        ``noisy(signals) -> (inputs, sigma)``: the noisy, b0-normalised
        inputs the network trains on (fresh noise at every call).
    seed : int

    Returns
    -------
    ndarray (len(STRATUM_EDGES) + 1, len(SCALARS), len(LEVELS))
        One table per stratum (:func:`strata`); the pooled one where a
        stratum has fewer than :data:`MIN_STRATUM` transforms.
    """
    rng = np.random.default_rng(seed)
    truth = decode(coordinates.numpy())
    repeats = max(1, math.ceil(_N_TRANSFORMS / len(signals)))
    transforms = {name: [] for name in SCALARS}
    stratum = []
    for repeat in range(repeats):
        inputs, sigma = noisy(signals)
        values = decode(
            net.sample(inputs, sigma, _N_DRAWS, generator_seed=seed + repeat).numpy()
        )
        stratum.append(strata(values["cell_diameter"]))
        for name in SCALARS:
            transforms[name].append(rank_transform(values[name], truth[name], rng))
    stratum = np.concatenate(stratum)
    transforms = {name: np.concatenate(t) for name, t in transforms.items()}
    pooled = np.stack([level_table(transforms[n]) for n in SCALARS])
    tables = []
    for s in range(len(STRATUM_EDGES) + 1):
        rows = stratum == s
        if rows.sum() < MIN_STRATUM:
            tables.append(pooled)
        else:
            tables.append(np.stack([level_table(transforms[n][rows]) for n in SCALARS]))
    return np.stack(tables)
