"""The posterior predictive signal: posterior draws realised as tissue.

A posterior of descriptors holds no tissue, but its prior draws tissue from
a few settings: a family, a cell diameter, a restricted fraction, a cell
count, a membrane permeability and, for fibres, an axis
(:meth:`TissuePrior.draw_with`). Each joint draw of the flow is realised as
the prior's tissue with the draw's settings and simulated on the
acquisitions asked for. The signals sample

    p(S_new | x) = int S_new(tissue) p(tissue | theta) q(theta | x) dtheta,

the posterior predictive under the estimator's own premise: the signal
depends on the tissue through the descriptors the flow was trained to
recover. What else the prior draws (the cells' arrangement and their
rasterisation on the grid, their sizes and permeabilities about the
settings) is drawn again, once a flow draw, so that the predictive holds its
scatter. A prior of several families realises each flow draw in every family
and keeps the one whose descriptors lie nearest the draw's in the flow's
coordinates (the family is no descriptor).

The signals are those of the prior's grid (its ``resolution``), noise-free:
add the noise for the predictive distribution of a measurement.

That scatter is large where the prior's grid cannot hold the tissue: at
resolution 6 a cell nearly as wide as its patch leaves an extracellular gap
under one grid spacing, open or shut as the rasterisation falls, and two
tissues of the same descriptors differ by up to ~0.2 in signal (measured on
single axons at fractions 0.6-0.74; ``tests/reconst/
test_posterior_predict.py``). The predictive's spread then holds it; its
mean is what such tissue signals on average.
"""

from dataclasses import replace

import numpy as np

from .targets import decode, encode

__all__ = ["realise_draws", "predictive_signals"]

#: How many times finer than the prior's the ladder of patch sides of the
#: realised tissue is (:func:`predictive_signals`).
LADDER_REFINEMENT = 4

#: Settings of :meth:`TissuePrior.draw_with` read from a flow draw, with the
#: prior's range that bounds each.
_SETTINGS = (
    ("cell_diameter", "cell_diameter"),
    ("restricted_fraction", "restricted_fraction"),
    ("n_cells", "n_cells"),
    ("permeability", "permeability"),
)


def realise_draws(prior, values, rng):
    """Tissue of ``prior`` for each flow draw.

    Parameters
    ----------
    prior : TissuePrior
    values : ndarray (n, len(TARGETS))
        Flow draws in the flow's coordinates
        (:meth:`PosteriorEstimator.sample`).
    rng : numpy.random.Generator

    Returns
    -------
    list of Draw or None
        None where no tissue of the prior holds the draw's settings at the
        prior's resolution.
    """
    values = np.asarray(values, dtype=float)
    descriptors = decode(values)
    draws = []
    for i in range(len(values)):
        # A flow draw may spill past the prior's ranges, where the posterior
        # has no mass: its settings are taken at the nearest bound.
        settings = {
            name: float(np.clip(descriptors[name][i], *getattr(prior, bound)))
            for name, bound in _SETTINGS
        }
        settings["n_cells"] = int(round(settings["n_cells"]))
        # A fibre's shape tensor is longest along it (the patch's length
        # against a section narrower than the patch): its principal axis.
        axis = descriptors["orientation"][i]
        candidates = [
            prior.draw_with(rng, family=family, axis=axis, **settings)
            for family in prior.families
        ]
        candidates = [c for c in candidates if c is not None]
        draws.append(_nearest(candidates, values[i]) if candidates else None)
    return draws


def _nearest(candidates, value):
    """The candidate whose descriptors lie nearest ``value`` in the flow's
    coordinates."""
    if len(candidates) == 1:
        return candidates[0]
    truth = {
        name: np.array([c.descriptors[name] for c in candidates])
        for name in candidates[0].descriptors
        if name != "orientation"
    }
    distance = np.linalg.norm(encode(truth) - value, axis=1)
    return candidates[int(np.argmin(distance))]


def predictive_signals(prior, protocol, values, *, seed=0, progress=False):
    """Noise-free signals of flow draws realised as tissue.

    Parameters
    ----------
    prior : TissuePrior
        The prior the estimator was trained on.
    protocol : Protocol or GradientTable
        The acquisitions to simulate.
    values : ndarray (n, len(TARGETS))
        Flow draws (:meth:`PosteriorEstimator.sample`).
    seed : int
        Seeds the tissue's random parts.
    progress : bool
        Progress bars over the simulations.

    Returns
    -------
    ndarray (n, n_acquisitions)
        Each acquisition over its sequence's b = 0 signal; NaN rows where a
        draw is realised by no tissue (:func:`realise_draws`).
    """
    # The prior's patch sides are a geometric ladder (n_box_sizes steps,
    # ~1.4x apart by default) so that its draws share grids; a single cell
    # of a given fraction then takes the diameter of the side it snaps to.
    # A ladder LADDER_REFINEMENT times finer realises a draw's diameter to
    # within ~5 % and still lets draws of similar cells share a grid.
    fine = replace(prior, n_box_sizes=LADDER_REFINEMENT * prior.n_box_sizes)
    draws = realise_draws(fine, values, np.random.default_rng(seed))
    kept = [i for i, draw in enumerate(draws) if draw is not None]
    simulator = fine.simulator(protocol)
    out = np.full((len(draws), len(simulator.protocol)), np.nan)
    if kept:
        out[kept] = simulator.simulate_draws(
            [draws[i] for i in kept], progress=progress
        )
    return out
