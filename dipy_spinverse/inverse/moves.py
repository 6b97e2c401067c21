"""The label search's descent: greedy label and permeability moves.

From a start, a lazy greedy descent (:func:`greedy_labels`) takes the best of
a batch of moves -- a cell given the label across a barrier, a cell eroded,
dilated, deleted, merged or split (:func:`label_moves`), one cell's membrane
up or down -- while a move lowers the loss by more than the noise explains;
random kicks then leave the minimum it stops at. :func:`descend` runs it
from the best of many starts. Each function is a generator of score
requests (:func:`~dipy_spinverse.inverse.scorer.drive` scores them).
"""

import math
import zlib

import numpy as np

from ..geometry.topology import barrier_regions
from .fields import barrier_faces, membrane_rows, padded_rows
from .shapes import run_steps

__all__ = [
    "SPLIT_MIN_CELLS",
    "KICK_MOVES",
    "KAPPA_STEPS",
    "greedy_labels",
    "label_moves",
    "kappa_bounds",
    "best_kappa",
    "descend",
]

# A split move (label_moves) leaves at least this many grid cells on each side:
# smaller pieces are a single move's business.
SPLIT_MIN_CELLS = 4

# Random label moves of one kick of the iterated local search
# (_kicked_descents): enough to leave a local minimum's basin, few enough
# that the descent from there still starts near it.
KICK_MOVES = 3

# A permeability move changes one cell's membrane by one of these many decades
# (1.8 and 1.12 times): the coarse step crosses ``search_kappas``' spacing,
# the fine one leaves a misfit small enough that no label move mimics it;
# the final refinement (refine_kappa, refine_cells) resolves 1 %.
KAPPA_STEPS = (0.25, 0.05)


def greedy_labels(grid, labels, score, config, report=None, *, min_gain=0.0):
    """Lazy greedy descent over cell labels, scored by ``score(candidates)``.

    See :func:`_greedy_steps`, which it runs (label moves only: ``score``
    sees no permeabilities).

    Parameters
    ----------
    grid : TetGrid
    labels : ndarray of int (n_cells,)
        The start.
    score : callable
        ``score(candidates) -> losses`` for labellings (n, n_cells).
    config : InversionConfig
        ``search_steps`` and ``search_batch`` bound the descent.
    report : callable, optional
        ``report(step, loss)`` after every step.
    min_gain : float
        A move must lower the loss by more than this.

    Returns
    -------
    ndarray of int (n_cells,)
        The labels where the descent stopped.
    """
    steps = _greedy_steps(grid, labels, config, report, min_gain, membrane=None)
    return run_steps(steps, lambda request: score(request[1]))[0]


def _greedy_steps(grid, labels, config, report, min_gain, membrane):
    """Lazy greedy descent over cell labels (generator of score requests).

    A move (:func:`label_moves`) gives one cell the label of a neighbour across a
    barrier face, or moves a whole group at once, which lets the search leave minima
    that single cells cannot. With a ``membrane`` row
    (:func:`~dipy_spinverse.inverse.fields.membrane_rows`) there are also permeability
    moves: one cell's membrane up or down by ``KAPPA_STEPS`` decades within the bounds
    (:func:`_kappa_moves`), so cells of different permeability are fitted as such while
    their shapes are searched (a permeability shared by all cells made the truth of
    held-out multi-cell voxels fit 5-50 times worse than their true permeabilities).
    Moves are scored exactly in batches of ``search_batch``: never-scored moves first,
    then by their last known loss (a move's effect is local, so a stale score is a good
    guess). With ``search_ranking="gradient"``, half of each batch are instead the label
    moves of best first-order gain (:func:`_first_order_gains`, one gradient of the loss
    per step). The best move of a batch is taken if it lowers the loss by more than
    ``min_gain``; the search stops at a local minimum (every current move scored since
    the last step, none improves) or after ``search_steps`` steps. ``report(step,
    loss)`` is called after every step. Returns the labels and the membrane row (None
    without one).
    """
    if membrane is None:
        membrane = np.full(max(1, int(labels.max())), np.nan)
        bounds = None
    else:
        membrane = np.asarray(membrane, float)
        bounds = kappa_bounds(config)

    def score(candidates, rows):
        return (yield "search", candidates, rows)

    ranked = bounds is not None and config.search.ranking == "gradient"
    current = (yield from score(labels[None], membrane[None]))[0]
    known, fresh, gains = {}, set(), None
    for step in range(config.search.steps):
        moves = label_moves(grid, labels)
        if ranked and gains is None:
            gains = yield from _first_order_gains(grid, labels, moves, membrane)
        pending = [m for m in moves if m not in fresh]
        permeability = []
        if bounds is not None:
            permeability = _kappa_moves(labels, membrane, bounds)
            permeability = [m for m in permeability if m not in fresh]
        if not pending and not permeability:
            break
        pending.sort(key=lambda m: known.get(m, -np.inf))
        if ranked:
            # Half by first-order gain, half in the lazy order: the
            # linearisation spans decades of permeability and misjudges big
            # group moves, so it may pick moves but not hide any.
            chosen = sorted(pending, key=gains.__getitem__)
            chosen = chosen[: config.search.batch // 2]
            taken = set(chosen)
            pending = chosen + [m for m in pending if m not in taken]
        batch = permeability + pending[: config.search.batch]
        candidates, rows = _apply_moves(labels, membrane, batch)
        losses = yield from score(candidates, rows)
        known.update(zip(batch, losses, strict=True))
        fresh.update(batch)
        # A permeability move that helps is taken before any label move, so
        # that labels are judged at (nearly) their best permeabilities: at a
        # wrong one, label moves that mimic the right permeability win, and
        # a descent started at the true labels left them (IoU 0.64-0.87 on
        # held-out voxels).
        n_kappa = len(permeability)
        for part in (slice(0, n_kappa), slice(n_kappa, None)):
            if len(losses[part]) == 0:
                continue
            best = part.start + int(np.argmin(losses[part]))
            # The relative margin keeps rounding noise from counting as progress.
            if losses[best] < current * (1 - 1e-9) - min_gain:
                labels, membrane = candidates[best], rows[best]
                current, fresh, gains = losses[best], set(), None
                break
        if report is not None:
            report(step, current)
    return labels, (membrane if bounds is not None else None)


def label_moves(grid, labels):
    """((cells...), new label) moves: single cells next to a barrier, groups.

    Single moves give a cell on a barrier the label across it. Group moves,
    per cell label ``k``: erode or dilate cell ``k`` by one layer (its rim
    cells go outside; the outside cells along its rim join it), delete one
    of its pieces when it has several; and with several cells, delete cell
    ``k`` or merge it into a cell it touches; and split cell ``k`` in two
    across each of its principal axes (:func:`_split_moves`).

    Parameters
    ----------
    grid : TetGrid
    labels : ndarray of int (n_cells,)

    Returns
    -------
    list of tuple
        ``((cells...), new_label)``, sorted.
    """
    a, b = grid.face_cells.T
    cut = labels[a] != labels[b]
    cells = np.concatenate([a[cut], b[cut]])
    new = np.concatenate([labels[b[cut]], labels[a[cut]]])
    moves = {((c,), n) for c, n in zip(cells.tolist(), new.tolist(), strict=True)}
    rim = np.unique(cells)
    region, _ = barrier_regions(grid, cut)
    present = np.unique(labels[labels > 0])
    for k in present.tolist():
        moves.add((tuple(rim[labels[rim] == k].tolist()), 0))  # erode
        touching = np.unique(
            np.concatenate([a[cut & (labels[b] == k)], b[cut & (labels[a] == k)]])
        )
        grow = touching[labels[touching] == 0]
        if len(grow):
            moves.add((tuple(grow.tolist()), k))  # dilate
        parts = np.unique(region[labels == k])
        if len(parts) > 1:
            for part in parts:
                moves.add((tuple(np.flatnonzero(region == part).tolist()), 0))
        if len(present) > 1:
            cell = tuple(np.flatnonzero(labels == k).tolist())
            moves.add((cell, 0))  # delete
            neighbours = np.unique(labels[touching])
            moves.update((cell, int(j)) for j in neighbours if j > 0)  # merge
        moves.update(_split_moves(grid, labels, k))
    return sorted(m for m in moves if m[0])


def _split_moves(grid, labels, k):
    """Cell ``k`` cut in two across each of its principal axes (a new label).

    Nothing else creates a label, so without these two touching cells that a
    start merged (a proposal's occupancy cannot tell them apart) would stay
    one compartment; the descent then moves the cut to the membrane.
    """
    cells = np.flatnonzero(labels == k)
    if len(cells) < 2 * SPLIT_MIN_CELLS:
        return []
    centroids = grid.cell_centroids[cells]
    offsets = grid.displacement(centroids, centroids[0])
    offsets -= offsets.mean(0)
    _, _, axes = np.linalg.svd(offsets, full_matrices=False)
    new = int(labels.max()) + 1
    moves = []
    for axis in axes:
        # Cells on the plane stay (rounding must not decide their side).
        side = cells[offsets @ axis > 1e-9 * grid.spacing]
        if SPLIT_MIN_CELLS <= len(side) <= len(cells) - SPLIT_MIN_CELLS:
            moves.append((tuple(side.tolist()), new))
    return moves


def kappa_bounds(config):
    """log10 bounds of a cell's membrane: the lower bound up to the threshold.

    Parameters
    ----------
    config : InversionConfig

    Returns
    -------
    tuple of float
        (low, high), log10 m/s; ``high`` just below the barrier threshold, so
        that a membrane stays a barrier.
    """
    return config.face.log_kappa_bounds[0], math.log10(config.face.threshold) - 1e-3


def _kappa_moves(labels, membrane, bounds):
    """((), label, delta) moves: that cell's log10 membrane moved by delta."""
    moves = []
    for k in np.unique(labels[labels > 0]).tolist():
        log_kappa = math.log10(membrane[k - 1])
        for step in KAPPA_STEPS:
            for delta in (-step, step):
                if bounds[0] <= log_kappa + delta <= bounds[1]:
                    moves.append(((), k, delta))
    return moves


def _apply_move(labels, membrane, move):
    """The labels and membrane row after one label or permeability move."""
    labels, membrane = labels.copy(), np.asarray(membrane, float).copy()
    if len(move) == 3:  # ((), k, delta): a permeability step
        _, k, delta = move
        step = math.log10(membrane[k - 1]) + delta
        # Rounded, so that the same permeability reached along different
        # paths is the same field (and one cache entry).
        membrane[k - 1] = 10.0 ** round(step, 9)
        return labels, membrane
    cells, label = move
    if label > 0 and not np.any(labels == label):
        # A new cell (a split) keeps the membrane of the cell it came from.
        if label > len(membrane):
            membrane = np.pad(
                membrane, (0, label - len(membrane)), constant_values=np.nan
            )
        source = labels[cells[0]] if labels[cells[0]] > 0 else labels.max()
        membrane[label - 1] = membrane[source - 1]
    labels[list(cells)] = label
    return labels, membrane


def _apply_moves(labels, membrane, moves):
    """Labels (n, n_cells) and membrane rows (n, width) after each move."""
    applied = [_apply_move(labels, membrane, move) for move in moves]
    candidates = np.array([a for a, _ in applied])
    return candidates, padded_rows([m[None] for _, m in applied])


def _first_order_gains(grid, labels, moves, membrane):
    """Predicted loss change of each label move, {move: gain} (generator step).

    Yields one ``("gradient", labels, membrane)`` request for the first-order gain of
    opening each face
    (:meth:`~dipy_spinverse.inverse.scorer.BatchScorer.opening_gains`); a move opens
    some faces and closes others, and its gain is the sum. The search uses it only to
    order moves; each is scored exactly before it is taken.
    """
    opening = (yield "gradient", labels[None], membrane[None])[0]
    before = barrier_faces(grid, labels[None])[0]
    after = barrier_faces(grid, _apply_moves(labels, membrane, moves)[0])
    opened = before.astype(float) - after  # +1 opened, -1 closed
    return dict(zip(moves, (opened @ opening).tolist(), strict=True))


def best_kappa(kind, candidates, kappas):
    """Best (candidate, membrane permeability) over ``kappas``, and all losses.

    A generator step: yields one ``(kind, labels, membranes)`` request.

    Parameters
    ----------
    kind : str
        The scorer asked (``"search"`` or ``"screen"``).
    candidates : ndarray of int (n, n_cells)
    kappas : ndarray (m,)
        Permeabilities shared by every cell of a candidate, m/s.

    Returns
    -------
    labels : ndarray of int (n_cells,)
        The best candidate.
    kappa : float
        Its best permeability.
    losses : ndarray (n, m)
    """
    rows = np.repeat(candidates, len(kappas), axis=0)
    values = np.tile(kappas, len(candidates))
    losses = yield kind, rows, values
    best = int(np.argmin(losses))
    return rows[best], values[best], losses.reshape(len(candidates), -1)


def descend(grid, starts, config, *, min_gain, report):
    """Greedy descent from the best ``search_restarts`` starts (generator).

    Every start is scored at each of ``search_kappas``; from the best ones the
    descent runs with that permeability for every cell, which the descent's
    own moves then change cell by cell. If one shared grid value beats the
    descended cells' permeabilities, the descent is repeated once from it.
    Each descent is then kicked ``search_kicks`` times
    (:func:`_kicked_descents`).

    Parameters
    ----------
    grid : TetGrid
    starts : ndarray of int (n, n_cells)
        Start labellings.
    config : InversionConfig
    min_gain : float
        A move must lower the loss by more than this.
    report : callable
        ``report(step, loss)`` after every step.

    Returns
    -------
    labels : ndarray of int (n_cells,)
        The labels with the lowest final loss.
    membrane : ndarray (width,)
        Their membrane row (:func:`~dipy_spinverse.inverse.fields.membrane_rows`).
    """
    kappas = np.asarray(config.search.kappas)
    _, _, losses = yield from best_kappa("search", starts, kappas)
    found = []
    for i in np.argsort(losses.min(1))[: config.search.restarts]:
        current = starts[i]
        membrane = membrane_rows(current[None], kappas[np.argmin(losses[i])])[0]
        for _ in range(2):
            current, membrane = yield from _greedy_steps(
                grid, current, config, report, min_gain, membrane
            )
            current, membrane = yield from _kicked_descents(
                grid, current, config, report, min_gain, membrane
            )
            loss = (yield "search", current[None], membrane[None])[0]
            _, shared, grid_losses = yield from best_kappa(
                "search", current[None], kappas
            )
            if not grid_losses.min() < loss * (1 - 1e-9) - min_gain:
                break
            membrane, loss = membrane_rows(current[None], shared)[0], grid_losses.min()
        found.append((loss, current, membrane))
    _, labels, membrane = min(found, key=lambda item: item[0])
    return labels, membrane


def _kicked_descents(grid, labels, config, report, min_gain, membrane):
    """Iterated local search from a local minimum (generator).

    ``search_kicks`` times: apply ``KICK_MOVES`` random label moves to the
    best labels so far (a jump out of the minimum's basin that a single
    descent cannot make), descend again, and keep the result if its loss
    is lower by more than ``min_gain``. The random draws are seeded by the
    labels, so a voxel's result does not depend on the other voxels.
    Returns the labels and their membrane row.
    """
    if not config.search.kicks:
        return labels, membrane
    best = (yield "search", labels[None], membrane[None])[0]
    rng = np.random.default_rng(zlib.crc32(labels.astype(np.int8).tobytes()))
    for _ in range(config.search.kicks):
        moves = label_moves(grid, labels)
        kicked, row = labels, membrane
        for i in rng.choice(len(moves), min(KICK_MOVES, len(moves)), False):
            kicked, row = _apply_move(kicked, row, moves[i])
        kicked, row = yield from _greedy_steps(
            grid, kicked, config, report, min_gain, row
        )
        loss = (yield "search", kicked[None], row[None])[0]
        if loss < best * (1 - 1e-9) - min_gain:
            labels, membrane, best = kicked, row, loss
    return labels, membrane
