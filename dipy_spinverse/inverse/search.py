"""The label search: closed cell labellings and one membrane permeability.

The face fit's permeabilities are thresholded into a barrier that need not
be closed. The label search instead looks for a labelling of the cells
(0 outside, 1 inside) whose interface -- closed by construction -- carries
one membrane permeability, and which fits the data best:

1. **Starts**: the regions the thresholded face field suggests, and the
   generic shapes of :func:`~dipy_spinverse.inverse.shapes.shape_search`
   screened on a few directions (ranked again on the search directions when
   noise makes the screen unable to tell them apart).
2. **Descent**: a lazy greedy descent over label moves (:func:`greedy_labels`)
   from the best starts, while a move lowers the data loss by more than the
   noise explains (``search_min_gain`` chi-square units).
3. **Permeability**: chosen from ``search_kappas`` with the labels, then
   refined between those values by a 1-D search (:func:`refine_kappa`).

Every candidate is scored by the simulator through the one data loss of the
package (:func:`dipy_spinverse.signals.data_loss`).
"""

import math

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from ..forward import simulate
from ..interface import barrier_regions, enclosed_cells, odd_depth_cells
from ..signals import data_loss, normalise_b0
from .shapes import shape_search

__all__ = [
    "search_labels",
    "label_scorer",
    "greedy_labels",
    "label_moves",
    "refine_kappa",
    "direction_subset",
    "face_field_starts",
]

# Directions per sequence when screening the generic shapes: 3 (the fewest
# that see anisotropy along every axis) keeps the screen of ~1,000 shapes
# cheap; the survivors are scored on ``search_directions``.
SCREEN_DIRECTIONS = 3
# At most this many screened shapes within the screen's noise of the best are
# ranked again on the search directions (at SNR 30 the true shape ranked
# 40th-184th of ~1,000 in the screen; doc/inversion_results.md).
RESCREEN_MAX = 256
# Candidates scored per simulator call when picking a permeability: bounds
# the batch's memory on the published grid.
SCORE_BATCH = 64
# Largest regions of the face field offered as starts (a field that walls
# off a corner of the box makes its enclosed set nearly everything, so each
# large region is also tried alone).
FACE_FIELD_REGIONS = 8
# The 1-D permeability refinement searches this many decades either side of
# the grid pick, to 0.005 decades (about 1 %).
REFINE_SPAN = 0.5
REFINE_TOLERANCE = 0.005


def search_labels(
    grid, data, protocol, config, *, sim, face_kappa, labels=None, callback=None
):
    """Search cell labels and one membrane permeability per voxel.

    Parameters
    ----------
    grid : TetGrid
    data : torch.Tensor (n_voxels, n_acquisitions)
        b0-normalised signals.
    protocol : Protocol
    config : InversionConfig
    sim : dict
        ``diffusivity``, ``dtype``, ``device`` for :func:`simulate`.
    face_kappa : ndarray (n_voxels, n_faces)
        The face fit's permeabilities (their regions are starts).
    labels : ndarray of int (n_voxels, n_cells), optional
        Start from these labels alone (the cell parametrisation's).
    callback : callable, optional
        ``callback(step, None, {"search": loss, "voxel": index})`` after every
        descent step.

    Returns
    -------
    labels : ndarray of int (n_voxels, n_cells)
    permeability : ndarray (n_voxels, n_faces)
        ``membrane`` on the labels' interface, the upper bound elsewhere.
    predicted : torch.Tensor (n_voxels, n_acquisitions)
        b0-normalised signal of that field.
    """
    lo, hi = config.log_kappa_bounds
    search = direction_subset(protocol, config.search_directions)
    screen = direction_subset(protocol, SCREEN_DIRECTIONS)
    # The data term of the truth under noise: loss_scale * sigma^2 (mean
    # squared residual). A move must lower chi-square by search_min_gain, and
    # the screened loss spreads by sqrt(2 / n) of it over n acquisitions.
    noise = config.loss_scale * config.sigma**2
    min_gain = config.search_min_gain * noise / len(search)
    spread = noise * math.sqrt(2 / len(screen))
    out_labels = np.zeros((len(data), grid.n_cells), dtype=int)
    out_kappa = np.zeros(len(data))
    for v in range(len(data)):
        score = label_scorer(grid, data[v], protocol, search, config, sim)
        if labels is None:
            quick = label_scorer(grid, data[v], protocol, screen, config, sim)
            shapes = _screened_shapes(grid, score, quick, config, spread)
            barrier = face_kappa[v] < config.threshold
            starts = np.unique(
                np.concatenate([face_field_starts(grid, barrier), shapes]), axis=0
            )
        else:
            starts = labels[v][None]

        def report(step, loss, v=v):
            if callback is not None:
                callback(step, None, {"search": float(loss), "voxel": v})

        out_labels[v], membrane = _descend(
            grid, starts, score, config, min_gain, report
        )
        # Stay below the barrier threshold so the membranes remain barriers.
        bounds = (lo, math.log10(config.threshold) - 1e-3)
        out_kappa[v] = refine_kappa(
            lambda k, c=out_labels[v], s=score: s(c[None], k)[0], membrane, bounds
        )
    barrier = (
        out_labels[:, grid.face_cells[:, 0]] != out_labels[:, grid.face_cells[:, 1]]
    )
    field = np.where(barrier, out_kappa[:, None], 10.0**hi)
    with torch.no_grad():
        predicted = normalise_b0(simulate(grid, field, protocol, **sim), protocol)
    return out_labels, field, predicted


def _best_kappa(candidates, score, kappas):
    """Best (candidate, membrane permeability) over ``kappas``, and all losses."""
    rows = np.repeat(candidates, len(kappas), axis=0)
    values = np.tile(kappas, len(candidates))
    losses = np.concatenate(
        [
            score(rows[i : i + SCORE_BATCH], values[i : i + SCORE_BATCH])
            for i in range(0, len(rows), SCORE_BATCH)
        ]
    )
    best = int(np.argmin(losses))
    return rows[best], values[best], losses.reshape(len(candidates), -1)


def _screened_shapes(grid, score, quick, config, spread):
    """The ``search_starts`` generic shapes that best fit a voxel.

    Shapes are screened with ``quick`` at two permeabilities (the smallest and
    the middle of ``search_kappas``). With noise, the few screening
    directions cannot rank shapes whose losses differ by less than the
    screen's own ``spread``: those are ranked again with ``score``.
    """
    kappas = np.asarray(config.search_kappas)
    pair = kappas[[0, len(kappas) // 2]]
    shapes, quick_losses = shape_search(
        grid, lambda c: _best_kappa(c, quick, pair)[2].min(1), RESCREEN_MAX
    )
    best = quick_losses[0] if len(quick_losses) else np.inf
    n_close = np.searchsorted(quick_losses, best + spread, "right")
    shapes = shapes[: max(config.search_starts, n_close)]
    if len(shapes) > config.search_starts:
        losses = _best_kappa(shapes, score, pair)[2].min(1)
        shapes = shapes[np.argsort(losses, kind="stable")]
    return shapes[: config.search_starts]


def _descend(grid, starts, score, config, min_gain, report):
    """Greedy descent from the best ``search_restarts`` starts.

    Every start is scored at each of ``search_kappas``; from the best ones the
    descent runs at their best permeability, which is chosen again on the
    final labels (and the descent repeated once if it changed). Returns the
    labels with the lowest final loss and their permeability.
    """
    kappas = np.asarray(config.search_kappas)
    _, _, losses = _best_kappa(starts, score, kappas)
    found = []
    for i in np.argsort(losses.min(1))[: config.search_restarts]:
        current, membrane = starts[i], kappas[np.argmin(losses[i])]
        for _ in range(2):
            current = greedy_labels(
                grid,
                current,
                lambda c, m=membrane: score(c, m),
                config,
                report,
                min_gain=min_gain,
            )
            current, refitted, final = _best_kappa(current[None], score, kappas)
            if refitted == membrane:
                break
            membrane = refitted
        found.append((final.min(), current, membrane))
    _, labels, membrane = min(found, key=lambda item: item[0])
    return labels, membrane


def label_scorer(grid, target, protocol, subset, config, sim):
    """``score(labels (B, n_cells), membrane (B,)) -> data loss (B,)``.

    The field of a labelling: ``membrane`` on the faces between different
    labels, the upper bound elsewhere; scored on the acquisitions ``subset``.
    """
    search = protocol[subset]
    open_kappa = 10.0 ** config.log_kappa_bounds[1]
    target = target[subset]
    ones = torch.ones(len(subset), dtype=target.dtype, device=target.device)

    def score(candidates, membrane):
        barrier = (
            candidates[:, grid.face_cells[:, 0]] != candidates[:, grid.face_cells[:, 1]]
        )
        field = np.where(barrier, np.reshape(membrane, (-1, 1)), open_kappa)
        with torch.no_grad():
            pred = normalise_b0(simulate(grid, field, search, **sim), search)
        loss = data_loss(
            pred,
            target.expand_as(pred),
            loss_scale=config.loss_scale,
            sigma=config.sigma,
            noise=config.noise,
            weights=ones,
        )
        return loss.cpu().numpy()

    return score


def refine_kappa(loss, start, bounds, *, span=REFINE_SPAN):
    """Continuous membrane permeability near a grid pick, by a 1-D search.

    Minimises ``loss(kappa)`` over log10 kappa within ``span`` decades of
    ``start`` and inside ``bounds`` (log10; bounded Brent to
    ``REFINE_TOLERANCE`` decades), and keeps ``start`` unless the search finds
    a lower loss. The labels were searched at the grid value, so a
    permeability far from every grid value can still bias them.
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


def face_field_starts(grid, barrier, n_regions=FACE_FIELD_REGIONS):
    """Closed labellings the thresholded face field suggests.

    The cells it encloses, the cells at odd barrier depth, and each of its
    ``n_regions`` largest regions alone.
    """
    region, outside = barrier_regions(grid, barrier)
    volume = np.bincount(region, weights=grid.cell_volumes)
    volume[outside] = 0
    largest = [r for r in np.argsort(volume)[::-1][:n_regions] if volume[r] > 0]
    candidates = [enclosed_cells(grid, barrier), odd_depth_cells(grid, barrier)]
    candidates += [region == r for r in largest]
    candidates = np.unique(np.array(candidates, dtype=int), axis=0)
    return candidates[(candidates.sum(1) > 0) & (candidates.sum(1) < grid.n_cells)]


def greedy_labels(grid, labels, score, config, report=None, *, min_gain=0.0):
    """Lazy greedy descent over cell labels.

    A move (:func:`label_moves`) gives one cell the label of a neighbour
    across a barrier face, or moves a whole group at once, which lets the
    search leave minima that single cells cannot. Moves are scored exactly in
    batches of ``search_batch``: never-scored moves first, then by their last
    known loss (a move's effect is local, so a stale score is a good guess).
    The best move of a batch is taken if it lowers the loss by more than
    ``min_gain``; the search stops at a local minimum (every current move
    scored since the last step, none improves) or after ``search_steps``
    steps. ``report(step, loss)`` is called after every step.
    """
    current = score(labels[None])[0]
    known, fresh = {}, set()
    for step in range(config.search_steps):
        pending = [m for m in label_moves(grid, labels) if m not in fresh]
        if not pending:
            break
        pending.sort(key=lambda m: known.get(m, -np.inf))
        batch = pending[: config.search_batch]
        candidates = np.repeat(labels[None], len(batch), axis=0)
        for row, (cells, label) in enumerate(batch):
            candidates[row, list(cells)] = label
        losses = score(candidates)
        known.update(zip(batch, losses, strict=True))
        fresh.update(batch)
        best = int(np.argmin(losses))
        # The relative margin keeps rounding noise from counting as progress.
        if losses[best] < current * (1 - 1e-9) - min_gain:
            labels, current, fresh = candidates[best], losses[best], set()
        if report is not None:
            report(step, current)
    return labels


def label_moves(grid, labels):
    """((cells...), new label) moves: single cells next to a barrier, groups.

    Group moves of binary labels: erode or dilate the inside by one layer,
    or delete one of several inside components.
    """
    a, b = grid.face_cells.T
    cut = labels[a] != labels[b]
    cells = np.concatenate([a[cut], b[cut]])
    new = np.concatenate([labels[b[cut]], labels[a[cut]]])
    moves = {((c,), n) for c, n in zip(cells.tolist(), new.tolist(), strict=True)}
    if labels.max() == 1:
        rim = np.unique(cells)
        moves.add((tuple(rim[labels[rim] == 1].tolist()), 0))  # erode
        moves.add((tuple(rim[labels[rim] == 0].tolist()), 1))  # dilate
        region, _ = barrier_regions(grid, cut)
        parts = np.unique(region[labels == 1])
        if len(parts) > 1:
            for part in parts:
                moves.add((tuple(np.flatnonzero(region == part).tolist()), 0))
    return sorted(moves)


def direction_subset(protocol, n_directions):
    """Acquisitions of at most ``n_directions`` directions per sequence.

    Keeps every b = 0 volume and every b-value of the chosen directions
    (evenly spaced in order of first appearance); None keeps everything.
    """
    if n_directions is None:
        return np.arange(len(protocol))
    keep = []
    for _, idx in protocol.sequences():
        weighted = idx[protocol.bvals[idx] > 0]
        dirs = np.round(protocol.bvecs[weighted], 6)
        _, first, which = np.unique(
            dirs, axis=0, return_index=True, return_inverse=True
        )
        rank = np.argsort(np.argsort(first))  # unique direction -> appearance
        n = len(first)
        chosen = np.unique(np.linspace(0, n - 1, min(n_directions, n)).round())
        keep.append(idx[protocol.bvals[idx] == 0])
        keep.append(weighted[np.isin(rank[which.ravel()], chosen)])
    return np.sort(np.concatenate(keep))
