"""The label search's last step: each cell's membrane permeability refined.

The descent moves permeabilities by fixed steps; here they are refined on
every acquisition, continuously: a 1-D search for one cell
(:func:`refine_kappa`), L-BFGS through the simulator's gradients for
several (:func:`refine_cells`).
"""

import math

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from .fields import label_field

__all__ = [
    "REFINE_SPAN",
    "REFINE_TOLERANCE",
    "REFINE_ITERATIONS",
    "refine_kappa",
    "refine_cells",
]

# The 1-D permeability refinement searches this many decades either side of
# the grid pick, to 0.005 decades (about 1 %).
REFINE_SPAN = 0.5

REFINE_TOLERANCE = 0.005

# L-BFGS iterations of the joint per-cell refinement (each one simulation
# with its gradient, plus line-search steps).
REFINE_ITERATIONS = 60


def refine_kappa(loss, start, bounds, *, span=REFINE_SPAN):
    """Continuous membrane permeability near a grid pick, by a 1-D search.

    Minimises ``loss(kappa)`` over log10 kappa within ``span`` decades of
    ``start`` and inside ``bounds`` (log10; bounded Brent to
    ``REFINE_TOLERANCE`` decades), and keeps ``start`` unless the search finds
    a lower loss. The labels were searched at the grid value, so a
    permeability far from every grid value can still bias them.

    Parameters
    ----------
    loss : callable
        ``loss(kappa) -> float``, kappa in m/s.
    start : float
        The grid pick, m/s.
    bounds : tuple of float
        (low, high), log10 m/s.
    span : float
        Decades searched either side of ``start``.

    Returns
    -------
    float
        The refined permeability, m/s.
    """
    centre = math.log10(start)
    low, high = max(centre - span, bounds[0]), min(centre + span, bounds[1])
    found = minimize_scalar(
        lambda lk: loss(10.0**lk),
        bounds=(low, high),
        method="bounded",
        options=dict(xatol=REFINE_TOLERANCE),
    )
    return 10.0**found.x if found.fun < loss(start) else start


def refine_cells(grid, scorer, v, labels, kappas, *, bounds):
    """Each cell's membrane permeability, refined from the descent's.

    One cell: a 1-D search (:func:`refine_kappa`) near its value. Several:
    all cells' together by L-BFGS through the simulator's gradients (log10
    kappa mapped into ``bounds`` by a sigmoid): touching cells trade
    permeability along a curved valley of the loss, which one cell at a time
    crosses slowly. The joint result is kept only if it lowers the loss.

    Parameters
    ----------
    grid : TetGrid
    scorer : BatchScorer
        Scores voxel ``v`` on every acquisition.
    v : int
        The voxel.
    labels : ndarray of int (n_cells,)
        Canonical cell labels (:func:`~dipy_spinverse.inverse.fields.cell_labels`).
    kappas : ndarray (n_labels,)
        Each cell's permeability from the descent, m/s.
    bounds : tuple of float
        (low, high), log10 m/s.

    Returns
    -------
    ndarray (n_labels,)
        Each cell's permeability, m/s.
    """
    n = int(labels.max())
    if n == 0:
        return np.zeros(0)
    if n == 1:

        def loss(kappa):
            return scorer(np.array([v]), labels[None], np.array([kappa]))[0]

        return np.array([refine_kappa(loss, kappas[0], bounds)])
    low, high = bounds
    dtype, device = scorer.sim["dtype"], scorer.sim["device"]
    # A value may sit on a bound, where the sigmoid has no preimage.
    start = np.clip((np.log10(kappas) - low) / (high - low), 1e-6, 1 - 1e-6)
    z = torch.as_tensor(np.log(start / (1 - start)), dtype=dtype, device=device)
    z.requires_grad_(True)
    a, b = (torch.as_tensor(c, device=device) for c in labels[grid.face_cells].T)
    optimiser = torch.optim.LBFGS(
        [z],
        max_iter=REFINE_ITERATIONS,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def field():
        log_kappa = low + (high - low) * torch.sigmoid(z)
        inverse = torch.cat([torch.zeros_like(z[:1]), 10.0**-log_kappa])
        resistance = inverse[a] + inverse[b]  # two membranes in series
        return torch.where(
            a != b, 1 / resistance.clamp_min(1e-300), scorer.open_kappa
        ), log_kappa

    def closure():
        optimiser.zero_grad()
        loss = scorer.field_loss(v, field()[0])
        loss.backward()
        return loss

    before = scorer.score_field(v, label_field(grid, labels, kappas, np.nan))
    optimiser.step(closure)
    with torch.no_grad():
        refined, log_kappa = field()
        after = float(scorer.field_loss(v, refined))
    return 10.0 ** log_kappa.cpu().numpy() if after < before else kappas
