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
package (:func:`dipy_spinverse.signals.data_loss`). Each voxel's search is a
generator of score requests; :func:`search_labels` drives the searches of
all voxels together and scores their pending requests in shared, batched
simulator calls (:class:`BatchScorer`), so a volume keeps the simulator busy
on CPU and GPU alike.
"""

import math

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from ..forward import simulate
from ..interface import barrier_regions, enclosed_cells, odd_depth_cells
from ..signals import data_loss, normalise_b0
from .shapes import run_steps, shape_search_steps

__all__ = [
    "search_labels",
    "BatchScorer",
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
# Candidates (of any voxels) scored per simulator call: bounds the batch's
# memory (64 fields x 576 cells x 540 acquisitions, complex64: 20 MB a state).
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
    scorers = {
        "search": BatchScorer(grid, data, protocol, search, config, sim),
        "screen": BatchScorer(grid, data, protocol, screen, config, sim),
    }

    def voxel(v):
        if labels is None:
            shapes = yield from _screened_shapes(grid, config, spread)
            barrier = face_kappa[v] < config.threshold
            starts = np.unique(
                np.concatenate([face_field_starts(grid, barrier), shapes]), axis=0
            )
        else:
            starts = labels[v][None]

        def report(step, loss):
            if callback is not None:
                callback(step, None, {"search": float(loss), "voxel": v})

        return (yield from _descend(grid, starts, config, min_gain, report))

    found = drive([voxel(v) for v in range(len(data))], scorers)
    out_labels = np.array([labels for labels, _ in found], dtype=int)
    out_labels = out_labels.reshape(len(data), grid.n_cells)
    # Stay below the barrier threshold so the membranes remain barriers.
    bounds = (lo, math.log10(config.threshold) - 1e-3)
    out_kappa = np.array(
        [
            refine_kappa(
                lambda k, v=v: scorers["search"](
                    np.array([v]), out_labels[v][None], np.array([k])
                )[0],
                membrane,
                bounds,
            )
            for v, (_, membrane) in enumerate(found)
        ]
    )
    barrier = (
        out_labels[:, grid.face_cells[:, 0]] != out_labels[:, grid.face_cells[:, 1]]
    )
    field = np.where(barrier, out_kappa[:, None], 10.0**hi)
    with torch.no_grad():
        predicted = normalise_b0(simulate(grid, field, protocol, **sim), protocol)
    return out_labels, field, predicted


def drive(searches, scorers):
    """Run many searches together, scoring their requests in shared batches.

    Each search is a generator that yields ``(kind, candidates, membranes)``
    requests and receives the losses; ``scorers[kind](owners, candidates,
    membranes)`` scores the pending requests of all searches of one kind at
    once (``owners``: the search each row belongs to). Returns the searches'
    return values, in order.
    """
    results = [None] * len(searches)
    pending = {}

    def advance(i, losses):
        try:
            pending[i] = searches[i].send(losses)
        except StopIteration as stop:
            pending.pop(i, None)
            results[i] = stop.value

    for i in range(len(searches)):
        advance(i, None)
    while pending:
        kind = next(iter(pending.values()))[0]
        group = [i for i, request in pending.items() if request[0] == kind]
        sizes = [len(pending[i][1]) for i in group]
        owners = np.repeat(group, sizes)
        candidates = np.concatenate([pending[i][1] for i in group])
        membranes = np.concatenate([pending[i][2] for i in group])
        losses = np.split(
            scorers[kind](owners, candidates, membranes), np.cumsum(sizes)[:-1]
        )
        for i, loss in zip(group, losses, strict=True):
            advance(i, loss)
    return results


class BatchScorer:
    """Data loss of labellings of many voxels, ``SCORE_BATCH`` per simulation.

    ``scorer(owners, candidates, membranes) -> losses``: row ``r`` is the
    field of ``candidates[r]`` (``membranes[r]`` on the faces between
    different labels, the upper bound elsewhere) scored against voxel
    ``owners[r]`` on the acquisitions ``subset``.
    """

    def __init__(self, grid, data, protocol, subset, config, sim):
        self.grid, self.config, self.sim = grid, config, sim
        self.protocol = protocol[subset]
        self.target = data[:, subset]
        self.open_kappa = 10.0 ** config.log_kappa_bounds[1]
        self.ones = torch.ones(len(subset), dtype=data.dtype, device=data.device)

    def __call__(self, owners, candidates, membranes):
        face_cells = self.grid.face_cells
        losses = []
        for i in range(0, len(candidates), SCORE_BATCH):
            rows = slice(i, i + SCORE_BATCH)
            labels = candidates[rows]
            barrier = labels[:, face_cells[:, 0]] != labels[:, face_cells[:, 1]]
            field = np.where(
                barrier, np.reshape(membranes[rows], (-1, 1)), self.open_kappa
            )
            with torch.no_grad():
                pred = simulate(self.grid, field, self.protocol, **self.sim)
                pred = normalise_b0(pred, self.protocol)
            target = self.target[
                torch.as_tensor(owners[rows], device=self.target.device)
            ]
            loss = data_loss(
                pred,
                target,
                loss_scale=self.config.loss_scale,
                sigma=self.config.sigma,
                noise=self.config.noise,
                weights=self.ones,
            )
            losses.append(loss.cpu().numpy())
        return np.concatenate(losses) if losses else np.zeros(0)


def _best_kappa(kind, candidates, kappas):
    """Best (candidate, membrane permeability) over ``kappas``, and all losses.

    A generator step: yields one ``(kind, labels, membranes)`` request.
    """
    rows = np.repeat(candidates, len(kappas), axis=0)
    values = np.tile(kappas, len(candidates))
    losses = yield kind, rows, values
    best = int(np.argmin(losses))
    return rows[best], values[best], losses.reshape(len(candidates), -1)


def _screened_shapes(grid, config, spread):
    """The ``search_starts`` generic shapes that best fit a voxel (generator).

    Shapes are screened on ``SCREEN_DIRECTIONS`` directions at two
    permeabilities (the smallest and the middle of ``search_kappas``). With
    noise, the few screening directions cannot rank shapes whose losses
    differ by less than the screen's own ``spread``: those are ranked again
    on the search directions.
    """
    kappas = np.asarray(config.search_kappas)
    pair = kappas[[0, len(kappas) // 2]]
    steps = shape_search_steps(grid, RESCREEN_MAX)
    try:
        request = next(steps)
        while True:
            losses = (yield from _best_kappa("screen", request, pair))[2].min(1)
            request = steps.send(losses)
    except StopIteration as stop:
        shapes, quick_losses = stop.value
    best = quick_losses[0] if len(quick_losses) else np.inf
    n_close = np.searchsorted(quick_losses, best + spread, "right")
    shapes = shapes[: max(config.search_starts, n_close)]
    if len(shapes) > config.search_starts:
        losses = (yield from _best_kappa("search", shapes, pair))[2].min(1)
        shapes = shapes[np.argsort(losses, kind="stable")]
    return shapes[: config.search_starts]


def _descend(grid, starts, config, min_gain, report):
    """Greedy descent from the best ``search_restarts`` starts (generator).

    Every start is scored at each of ``search_kappas``; from the best ones the
    descent runs at their best permeability, which is chosen again on the
    final labels (and the descent repeated once if it changed). Returns the
    labels with the lowest final loss and their permeability.
    """
    kappas = np.asarray(config.search_kappas)
    _, _, losses = yield from _best_kappa("search", starts, kappas)
    found = []
    for i in np.argsort(losses.min(1))[: config.search_restarts]:
        current, membrane = starts[i], kappas[np.argmin(losses[i])]
        for _ in range(2):
            current = yield from _greedy_steps(
                grid, current, config, report, min_gain, membrane
            )
            current, refitted, final = yield from _best_kappa(
                "search", current[None], kappas
            )
            if refitted == membrane:
                break
            membrane = refitted
        found.append((final.min(), current, membrane))
    _, labels, membrane = min(found, key=lambda item: item[0])
    return labels, membrane


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
    """Lazy greedy descent over cell labels, scored by ``score(candidates)``.

    See :func:`_greedy_steps`, which it runs.
    """
    steps = _greedy_steps(grid, labels, config, report, min_gain, membrane=None)
    return run_steps(steps, lambda request: score(request[1]))


def _greedy_steps(grid, labels, config, report, min_gain, membrane):
    """Lazy greedy descent over cell labels (generator of score requests).

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

    def score(candidates):
        membranes = np.full(len(candidates), np.nan if membrane is None else membrane)
        return (yield "search", candidates, membranes)

    current = (yield from score(labels[None]))[0]
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
        losses = yield from score(candidates)
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
