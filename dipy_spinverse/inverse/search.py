"""The label search: closed cell labellings, one membrane permeability per cell.

The face fit's permeabilities are thresholded into a barrier that need not
be closed. The label search instead looks for a labelling of the cells
(0 outside, ``k`` inside cell ``k``) whose interface -- closed by
construction -- carries each cell's membrane permeability, and which fits
the data best:

1. **Starts**: the regions the thresholded face field suggests, and the
   generic shapes of :func:`~dipy_spinverse.inverse.shapes.shape_search`
   screened on a few directions (ranked again on the search directions when
   noise makes the screen unable to tell them apart).
2. **Descent**: a lazy greedy descent over label moves and per-cell
   permeability moves (:func:`greedy_labels`) from the best starts, at
   ``search_kappas``' best value for every cell, while a move lowers the
   data loss by more than the noise explains (``search_min_gain``
   chi-square units). The generic shapes screened at every permeability are
   a reserve: descended from only when one of them beats the answer
   (:func:`_screen_reserve`).
3. **Permeability**: each cell's refined from the descent's, by a 1-D
   search for one cell (:func:`refine_kappa`), jointly for several.
4. **Uncertainty**: the labellings scored within the noise of the answer
   are weighed by their likelihood (:meth:`Recorder.posterior`), and the
   answer is no surer than half its disagreement with any of them that is
   another surface
   (:meth:`Recorder.ambiguity`); optionally
   the whole search is repeated on wild-bootstrap replicates of the data
   (:func:`bootstrap_search`), which also sees answers in other basins.

Every candidate is scored by the simulator through the one data loss of the
package (:func:`dipy_spinverse.sim.signals.data_loss`). Each voxel's search is a
generator of score requests; :func:`search_labels` drives the searches of
all voxels together and scores their pending requests in shared, batched
simulator calls (:class:`BatchScorer`), so a volume keeps the simulator busy
on CPU and GPU alike.
"""

import hashlib
import math
import threading
import zlib
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.stats import chi2

from ..geometry.metrics import cell_inversion, grid_symmetries
from ..geometry.topology import (
    barrier_regions,
    enclosed_cells,
    graph_components,
    odd_depth_cells,
)
from ..sim.forward import simulate, update_digest
from ..sim.operators import face_conductance
from ..sim.signals import data_loss, normalise_b0
from .proposal import ProposalSettings, load_or_train_proposal, proposal_starts
from .shapes import run_steps, shape_search_steps

__all__ = [
    "search_labels",
    "bootstrap_search",
    "LabelSearch",
    "learned_proposal",
    "label_field",
    "membrane_rows",
    "membrane_fields",
    "cell_labels",
    "BatchScorer",
    "SignalCache",
    "SIGNAL_CACHE",
    "Recorder",
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
# L-BFGS iterations of the joint per-cell refinement (each one simulation
# with its gradient, plus line-search steps).
REFINE_ITERATIONS = 60
# A split move (label_moves) leaves at least this many grid cells on each side:
# smaller pieces are a single move's business.
SPLIT_MIN_CELLS = 4
# Memory for simulated signals shared between voxels (SignalCache): at 540
# acquisitions in float64 this holds about 60,000 labellings, more than the
# generic-shape screen and the descents of a chunk of voxels request.
SIGNAL_CACHE_BYTES = 256 * 2**20
# Random label moves of one kick of the iterated local search
# (_kicked_descents): enough to leave a local minimum's basin, few enough
# that the descent from there still starts near it.
KICK_MOVES = 3
# A permeability move changes one cell's membrane by one of these many decades
# (1.8 and 1.12 times): the coarse step crosses ``search_kappas``' spacing,
# the fine one leaves a misfit small enough that no label move mimics it;
# the final refinement (refine_kappa, _refine_cells) resolves 1 %.
KAPPA_STEPS = (0.25, 0.05)
# Permeability of the search's faces without a membrane (m/s): so high that
# such a face conducts as free water does (A kappa / (kappa R + 1) is within
# 1e-5 of A / R where kappa R > 1e5: R, the diffusive resistance across the
# face, is at least 786 us/um on the default 6.7 um grid at 3e-3 mm^2/s and
# about 120 on a 1 um one), and finite, so that fields stay finite arrays.
# The face fit's upper bound (0.1 m/s), used before, left every open face a
# faint membrane: the exact labelling of the demo's cylinders misfit their
# own signals by 0.0013 of S0 (a chi-square of 7 at SNR 200, 170 at 1,000).
OPEN_KAPPA = 1e3
# Labellings scored within this chi-square of a voxel's best are kept for
# its uncertainty: their likelihood weight exp(-chi2 / 2) is then above
# 3e-4, so dropping the rest changes no probability by more than that.
KEEP_CHI2 = 16.0
# A kept labelling sharing less than this IoU with the answer is another
# surface (the line between a wrong and a right answer): it sets the
# answer's ambiguity floor (Recorder.ambiguity). Nearer ones differ by a
# layer of boundary tetrahedra, which the likelihood weights already count;
# on the README demo's cylinders at SNR 67 such one-layer variants (IoU
# 0.76-0.79) would have floored exact answers at 0.10-0.12.
RIVAL_IOU = 0.5
# Labellings whose own chi-square is below the noise's (1 - this) quantile
# fit the data within the noise: the level of the misfit test that an answer
# must pass to be vouched for (reconst.runner.SURFACE_MISFIT_FALSE_ALARM is
# this). They are kept too, however far behind the best, so that a rival
# the data do not reject sets the ambiguity floor (Recorder.ambiguity).
WITHIN_NOISE_FALSE_ALARM = 0.05


class LabelSearch(NamedTuple):
    """What :func:`search_labels` found, per voxel.

    Attributes
    ----------
    labels : ndarray of int (n_voxels, n_cells)
        0 outside, ``k`` inside cell ``k`` (1, 2, ... by decreasing volume).
    permeability : ndarray (n_voxels, n_faces)
        Each cell's membrane permeability on its interface with the outside,
        two membranes in series between touching cells, the upper bound
        elsewhere.
    predicted : torch.Tensor (n_voxels, n_acquisitions)
        b0-normalised signal of that field.
    inside_probability : ndarray (n_voxels, n_cells)
        Probability that each grid cell is inside a cell, over the
        labellings the search scored within the noise of the best
        (likelihood weights ``exp(-delta chi2 / 2)``).
    uncertainty : ndarray (n_voxels,)
        Expected ``1 - IoU`` of those labellings against the result (the
        better of a labelling and its point inversion), and at least half
        the largest ``1 - IoU`` of another surface among them
        (:meth:`Recorder.ambiguity`): 0
        when every labelling the data allow agrees with it.
    proposal_probability : ndarray (n_voxels, n_cells) or None
        The learned proposal's occupancy (None without a proposal).
    """

    labels: np.ndarray
    permeability: np.ndarray
    predicted: torch.Tensor
    inside_probability: np.ndarray
    uncertainty: np.ndarray
    proposal_probability: np.ndarray | None


def search_labels(
    grid,
    data,
    protocol,
    config,
    *,
    sim,
    face_kappa,
    labels=None,
    precision=None,
    callback=None,
    seeds=None,
):
    """Search cell labels and membrane permeabilities per voxel.

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
    precision : torch.Tensor (n_voxels, n_acquisitions), optional
        Noise precision of each acquisition relative to ``1 / sigma^2``
        (:func:`~dipy_spinverse.sim.signals.noise_precision`; default 1).
    callback : callable, optional
        ``callback(step, None, {"search": loss, "voxel": index})`` after every
        descent step, and ``callback(-1, None, {"voxel_done": index})`` when
        a voxel's descent ends.
    seeds : sequence of ndarray, optional
        More starts, labellings (m_i, n_cells) for each voxel (not with
        ``labels``).

    Returns
    -------
    LabelSearch
    """
    search = direction_subset(protocol, config.search.directions)
    screen = direction_subset(protocol, SCREEN_DIRECTIONS)
    # The data term of the truth under noise: loss_scale * sigma^2 (mean
    # squared residual). A move must lower chi-square by search_min_gain, and
    # the screened loss spreads by sqrt(2 / n) of it over n acquisitions.
    noise = config.loss.loss_scale * config.loss.sigma**2
    min_gain = config.search.min_gain * noise / len(search)
    spread = noise * math.sqrt(2 / len(screen))
    recorder = Recorder(
        BatchScorer(grid, data, protocol, search, config, sim, precision),
        len(data),
        noise,
        len(search),
    )
    scorers = {
        "search": recorder,
        "gradient": recorder.scorer.opening_gains,
        "screen": BatchScorer(grid, data, protocol, screen, config, sim, precision),
    }
    occupancy = None
    if config.uses_proposal and labels is None:
        proposal = learned_proposal(grid, protocol, config, **sim)
        occupancy, _ = proposal.predict(data.cpu())

    def voxel(v):
        if labels is None:
            barrier = face_kappa[v] < config.face.threshold
            starts = [face_field_starts(grid, barrier)]
            if config.search.dictionary:
                starts.append((yield from _screened_shapes(grid, config, spread)))
            if occupancy is not None:
                # Seeded by the voxel's own proposal: the samples do not
                # depend on which other voxels share the call.
                rng = np.random.default_rng(zlib.crc32(occupancy[v].tobytes()))
                starts.append(
                    proposal_starts(
                        grid, occupancy[v], config.search.proposal_samples, rng
                    )
                )
            if seeds is not None and len(seeds[v]):
                starts.append(np.asarray(seeds[v], dtype=int))
            starts = np.unique(np.concatenate(starts), axis=0)
            if not len(starts):
                # No closed region in the face field, no dictionary and no
                # proposal sample: the answer is no cell at all (free water;
                # no label move starts from it), scored like any labelling.
                starts = np.zeros((1, grid.n_cells), dtype=int)
        else:
            starts = labels[v][None]

        def report(step, loss):
            if callback is not None:
                callback(step, None, {"search": float(loss), "voxel": v})

        found = yield from _descend(grid, starts, config, min_gain, report)
        if labels is None and config.search.dictionary:
            found = yield from _screen_reserve(
                grid, found, config, spread, min_gain, report
            )
        if callback is not None:  # the runner's progress bar counts voxels
            callback(-1, None, {"voxel_done": v})
        return found

    found = drive([voxel(v) for v in range(len(data))], scorers)
    out_labels = np.array([cell_labels(grid, labels) for labels, _ in found])
    out_labels = out_labels.reshape(len(data), grid.n_cells)
    # Stay below the barrier threshold so the membranes remain barriers.
    bounds = _kappa_bounds(config)
    # The permeabilities are refined on every acquisition, not the search's
    # subset of directions: their error at the Cramer-Rao bound halves (the
    # published bent axon at SNR 100: 10 % on 10 directions, 5.7 % on all).
    everything = BatchScorer(
        grid, data, protocol, np.arange(len(protocol)), config, sim, precision
    )
    fields = []
    for v, (labels, membrane) in enumerate(found):
        # Each cell starts from the membrane of the descent's label it is a
        # piece of.
        pieces = [
            labels[out_labels[v] == k][0] for k in range(1, out_labels[v].max() + 1)
        ]
        kappas = _refine_cells(
            grid,
            everything,
            v,
            out_labels[v],
            membrane[np.array(pieces, int) - 1],
            bounds,
        )
        fields.append(label_field(grid, out_labels[v], kappas, OPEN_KAPPA))
    field = np.array(fields).reshape(len(data), grid.n_faces)
    with torch.no_grad():
        predicted = normalise_b0(simulate(grid, field, protocol, **sim), protocol)
    inside, spread = recorder.posterior(grid, out_labels)
    uncertainty = np.maximum(spread, recorder.ambiguity(grid, out_labels))
    return LabelSearch(out_labels, field, predicted, inside, uncertainty, occupancy)


def bootstrap_search(
    grid,
    data,
    found,
    protocol,
    config,
    *,
    sim,
    face_kappa,
    labels=None,
    precision=None,
    callback=None,
    seeds=None,
):
    """Repeat the search on wild-bootstrap replicates: how far does it move?

    The uncertainty of :func:`search_labels` weighs only labellings near
    its answer, so it cannot see a better basin that the descent never
    visited, and on held-out substrates it called wrong answers certain
    (``doc/validation/generalisation.md``). Here the whole search runs again on
    ``config.search.bootstrap`` replicates of each voxel: its prediction
    plus its residuals with random signs (the wild bootstrap, as used for
    the uncertainty of diffusion tensor fits; Whitcher et al. 2008, Jones
    2008). The residuals hold the noise and whatever of the data the answer
    misses, so an answer that fits only by the accident of one noise draw,
    or a local minimum among many, comes back elsewhere, while a well
    determined one comes back the same. Each replicate costs about one
    more search.

    Parameters
    ----------
    grid : TetGrid
    data : torch.Tensor (n_voxels, n_acquisitions)
        The b0-normalised signals the search was run on.
    found : LabelSearch
        Its result on ``data``.
    protocol, config, sim, face_kappa, labels, precision, seeds
        As given to :func:`search_labels` (the replicates start from the
        same face field and seeds; they are searched in one driven call).
    callback : callable, optional
        As in :func:`search_labels`, with the voxel index of the replicate
        ``r * n_voxels + v``.

    Returns
    -------
    inside_probability : ndarray (n_voxels, n_cells)
        Mean of the answer's and the replicates' inside probabilities, each
        replicate's turned into its point inversion where that matches the
        answer better (magnitude data cannot tell the two apart).
    uncertainty : ndarray (n_voxels,)
        The larger of the answer's own uncertainty and the mean ``1 - IoU``
        of the replicates' labellings against it.
    """
    k, n = config.search.bootstrap, len(data)
    predicted = found.predicted.to(data)
    voxels = data.cpu().numpy()
    residual = voxels - predicted.cpu().numpy()
    # Seeded by each voxel's data: a voxel's replicates do not depend on
    # which other voxels share the call.
    rngs = [np.random.default_rng(zlib.crc32(row.tobytes())) for row in voxels]
    signs = np.stack([rng.choice([-1.0, 1.0], (k, data.shape[1])) for rng in rngs], 1)
    replicates = predicted + torch.as_tensor(signs * residual).to(data)
    again = search_labels(
        grid,
        replicates.reshape(k * n, -1),
        protocol,
        config,
        sim=sim,
        face_kappa=np.tile(face_kappa, (k, 1)),
        labels=None if labels is None else np.tile(labels, (k, 1)),
        precision=None if precision is None else precision.repeat(k, 1),
        callback=callback,
        seeds=None if seeds is None else list(seeds) * k,
    )
    twin = cell_inversion(grid, exact=False)
    answer = found.labels > 0
    inside = found.inside_probability.copy()
    spread = np.zeros(n)
    for r in range(k):
        rows = slice(r * n, (r + 1) * n)
        cells = again.labels[rows] > 0
        direct = _iou(cells, answer)
        flipped = _iou(cells[:, twin], answer)
        use_twin = flipped > direct
        probability = again.inside_probability[rows]
        inside += np.where(use_twin[:, None], probability[:, twin], probability)
        spread += 1 - np.maximum(direct, flipped)
    return inside / (k + 1), np.maximum(found.uncertainty, spread / k)


def learned_proposal(
    grid, protocol, config, *, diffusivity, dtype, device, progress=True
):
    """The label search's learned proposal (read from the cache or trained).

    Trained on ``config.search.proposal`` random substrates for this grid,
    protocol and diffusivity, with progress bars if ``progress``; see
    :func:`~dipy_spinverse.inverse.proposal.load_or_train_proposal`.
    """
    return load_or_train_proposal(
        grid,
        protocol,
        diffusivity=diffusivity,
        settings=ProposalSettings(n_substrates=config.search.proposal),
        dtype=dtype,
        device=device,
        progress=progress,
    )


def label_field(grid, labels, kappas, open_kappa):
    """The permeability field of a labelling with one permeability per cell.

    Parameters
    ----------
    grid : TetGrid
    labels : ndarray of int (n_cells,)
        0 outside, ``k`` in cell ``k``.
    kappas : array_like (n_labels,)
        Membrane permeability of cell ``k`` at entry ``k - 1``, m/s.
    open_kappa : float
        Permeability of faces without a membrane.

    Returns
    -------
    ndarray (n_faces,)
        ``kappas[k - 1]`` between cell ``k`` and the outside, the two
        membranes in series between touching cells (as
        :mod:`dipy_spinverse.geometry.substrates` builds them), ``open_kappa``
        elsewhere.
    """
    rows = np.asarray(kappas, float).reshape(1, -1)
    return membrane_fields(grid, np.asarray(labels)[None], rows, open_kappa)[0]


def cell_labels(grid, labels):
    """Canonical cell labels: every connected piece of a label is a cell.

    Pieces (connected through faces with the same label) are numbered 1, 2,
    ... by decreasing volume; 0 stays outside.
    """
    a, b = grid.face_cells.T
    same = (labels[a] == labels[b]) & (labels[a] > 0)
    _, piece = graph_components(grid.n_cells, a[same], b[same])
    inside = labels > 0
    parts = np.unique(piece[inside])
    volumes = np.array([grid.cell_volumes[piece == p].sum() for p in parts])
    out = np.zeros(grid.n_cells, int)
    for k, i in enumerate(np.argsort(-volumes, kind="stable"), start=1):
        out[piece == parts[i]] = k
    return out


def _refine_cells(grid, scorer, v, labels, kappas, bounds):
    """Each cell's membrane permeability, refined from the descent's.

    One cell: a 1-D search (:func:`refine_kappa`) near its value. Several:
    all cells' together by L-BFGS through the simulator's gradients (log10
    kappa mapped into ``bounds`` by a sigmoid): touching cells trade
    permeability along a curved valley of the loss, which one cell at a time
    crosses slowly. The joint result is kept only if it lowers the loss.
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
        membranes = _stack_rows(
            [pending[i][1] for i in group], [pending[i][2] for i in group]
        )
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
    ``owners[r]`` on the acquisitions ``subset`` (with each acquisition's
    noise ``precision``, default 1).
    """

    def __init__(
        self, grid, data, protocol, subset, config, sim, precision=None, cache=None
    ):
        self.grid, self.config, self.sim = grid, config, sim
        self.protocol = protocol[subset]
        self.target = data[:, subset]
        if precision is None:
            precision = torch.ones_like(data)
        self.precision = precision[:, subset]
        self.open_kappa = OPEN_KAPPA
        self.cache = SIGNAL_CACHE if cache is None else cache
        self.context = update_digest(
            hashlib.sha256(),
            grid,
            self.protocol,
            diffusivity=float(sim["diffusivity"]),
            dtype=str(sim["dtype"]),
            device=str(sim["device"]),
            open_kappa=self.open_kappa,
        ).digest()

    def __call__(self, owners, candidates, membranes):
        owner = torch.as_tensor(owners, device=self.target.device)
        return self._loss(self.signals(candidates, membranes), owner).cpu().numpy()

    def signals(self, candidates, membranes):
        """b0-normalised signals (n, n_acquisitions) of labellings.

        ``membranes`` as in :func:`membrane_rows`. The field
        (:func:`membrane_fields`) is the cache key: identical fields requested
        by different voxels (every voxel screens the same generic shapes), or
        again later, are simulated once.
        """
        if len(candidates) == 0:
            sim = self.sim
            shape = (0, len(self.protocol))
            return torch.zeros(shape, dtype=sim["dtype"], device=sim["device"])
        fields = membrane_fields(self.grid, candidates, membranes, self.open_kappa)
        keys = [
            self.context + hashlib.blake2b(row.tobytes(), digest_size=20).digest()
            for row in fields
        ]
        found = self.cache.get_many(keys)
        first = {}
        for row, key in enumerate(keys):
            if key not in found:
                first.setdefault(key, row)
        missing = list(first)
        for i in range(0, len(missing), SCORE_BATCH):
            batch = missing[i : i + SCORE_BATCH]
            rows = [first[k] for k in batch]
            with torch.no_grad():
                pred = simulate(self.grid, fields[rows], self.protocol, **self.sim)
                pred = normalise_b0(pred, self.protocol)
            found.update(zip(batch, pred, strict=True))
            self.cache.put_many(zip(batch, pred, strict=True))
        return torch.stack([found[k] for k in keys])

    def opening_gains(self, owners, candidates, membranes):
        """First-order loss change of opening each face, per labelling.

        ``dL/dw_f * (w_open - w_membrane)``: the gradient of the loss with
        respect to each face's conductance ``w_f`` (the diffusion operator
        is linear in it, :func:`~dipy_spinverse.sim.operators.face_conductance`,
        so this linearisation follows the physics across the decades between
        a membrane and an open face, where one in log permeability saturates
        at both ends), at the field of each row, times the conductance that
        opening a membrane face adds (``membranes`` as in
        :func:`membrane_rows`). Same rows as :meth:`__call__`; returns
        (n, n_faces); not cached (only the move ranking uses it).
        """
        out = []
        owner = torch.as_tensor(owners, device=self.target.device)
        dtype, device = self.sim["dtype"], self.sim["device"]
        diffusivity = torch.as_tensor(self.sim["diffusivity"], dtype=dtype)
        diffusivity = diffusivity.expand(1, self.grid.n_cells).to(device)
        membranes = membrane_rows(candidates, membranes)
        for i in range(0, len(candidates), SCORE_BATCH):
            rows = slice(i, i + SCORE_BATCH)
            barrier = _barriers(self.grid, candidates[rows])
            field = membrane_fields(
                self.grid, candidates[rows], membranes[rows], self.open_kappa
            )
            # A face that a move closes gets a membrane of the cells' typical
            # permeability (which cell it joins is the move's business).
            typical = np.exp(np.nanmean(np.log(membranes[rows]), axis=1))
            closing = np.where(barrier, field, typical[:, None])
            kappa = torch.as_tensor(field, dtype=dtype, device=device)
            kappa.requires_grad_(True)
            pred = simulate(self.grid, kappa, self.protocol, **self.sim)
            # Each row's loss depends on its own field only: one backward
            # pass of the sum gives every row's gradient.
            self._loss(normalise_b0(pred, self.protocol), owner[rows]).sum().backward()
            with torch.no_grad():
                w = face_conductance(self.grid, kappa, diffusivity)
                w_open = face_conductance(
                    self.grid, torch.full_like(kappa, self.open_kappa), diffusivity
                )
                w_membrane = face_conductance(
                    self.grid,
                    torch.as_tensor(closing, dtype=dtype, device=device),
                    diffusivity,
                )
                # w = A kappa / (kappa R + 1): dw/dkappa = (w / kappa)^2 / A.
                area = torch.tensor(self.grid.face_areas, dtype=dtype, device=device)
                dw_dkappa = (w / kappa) ** 2 / area
                gain = kappa.grad / dw_dkappa * (w_open - w_membrane)
            out.append(gain.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.grid.n_faces))

    def score_field(self, v, field):
        """Data loss of one permeability field (n_faces,) against voxel ``v``.

        ``NaN`` entries of ``field`` mean no membrane (the upper bound).
        """
        field = np.where(np.isnan(field), self.open_kappa, field)
        with torch.no_grad():
            return float(self.field_loss(v, torch.as_tensor(field)))

    def field_loss(self, v, field):
        """Differentiable data loss of a field tensor (n_faces,) for voxel ``v``."""
        pred = simulate(self.grid, field[None], self.protocol, **self.sim)
        return self._loss(normalise_b0(pred, self.protocol), slice(v, v + 1))[0]

    def _loss(self, pred, owners):
        return data_loss(
            pred,
            self.target[owners],
            loss_scale=self.config.loss.loss_scale,
            sigma=self.config.loss.sigma,
            noise=self.config.loss.noise,
            precision=self.precision[owners],
        )


def _barriers(grid, labels):
    """Faces between different labels, (n, n_faces) bool."""
    a, b = grid.face_cells.T
    return labels[:, a] != labels[:, b]


def membrane_rows(candidates, membranes):
    """Membrane permeability per label, (n, width) with ``width >= max label``.

    ``membranes`` is one value per candidate (every cell of a labelling
    shares it) or already a row per candidate: entry ``k - 1`` is cell
    ``k``'s permeability (m/s); entries of labels a labelling does not use
    are ignored (NaN where rows of different widths are stacked).
    """
    membranes = np.asarray(membranes, dtype=float)
    if membranes.ndim == 2:
        return membranes
    width = max(1, int(np.max(candidates, initial=0)))
    shared = np.broadcast_to(membranes, (len(candidates),))
    return np.repeat(shared[:, None], width, axis=1)


def membrane_fields(grid, candidates, membranes, open_kappa):
    """Permeability fields (n, n_faces) of labellings with per-cell membranes.

    A face between cell ``k`` and the outside carries cell ``k``'s membrane,
    one between touching cells ``j`` and ``k`` both membranes in series (as
    :mod:`dipy_spinverse.geometry.substrates` builds them), every other face
    ``open_kappa``. ``membranes`` as in :func:`membrane_rows`.
    """
    rows = membrane_rows(candidates, membranes)
    resistance = np.concatenate([np.zeros((len(rows), 1)), 1 / rows], axis=1)
    a, b = candidates[:, grid.face_cells[:, 0]], candidates[:, grid.face_cells[:, 1]]
    series = np.take_along_axis(resistance, a, 1) + np.take_along_axis(resistance, b, 1)
    with np.errstate(divide="ignore"):  # outside-outside faces: masked below
        return np.where(a != b, 1 / series, open_kappa)


def _stack_rows(candidates, membranes):
    """One (n, width) array of the membrane rows of several requests."""
    if all(np.ndim(m) < 2 for m in membranes):
        return np.concatenate([np.atleast_1d(m) for m in membranes])
    rows = [membrane_rows(c, m) for c, m in zip(candidates, membranes, strict=True)]
    return _padded(rows)


def _padded(rows):
    """2-D membrane rows of different widths, stacked and padded with NaN."""
    width = max(r.shape[1] for r in rows)
    return np.concatenate(
        [
            np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=np.nan)
            for r in rows
        ]
    )


class SignalCache:
    """Least-recently-used store of simulated signals, thread-safe.

    Keys are bytes (:meth:`BatchScorer.signals` builds them from a digest of
    the grid, protocol and simulation settings, the barrier faces and the
    membrane), values tensors. Holds at most ``max_bytes`` of tensors.
    """

    def __init__(self, max_bytes=SIGNAL_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.n_bytes = 0
        self._store = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._store)

    def get_many(self, keys):
        """The stored values of ``keys`` (a dict; absent keys are left out)."""
        with self._lock:
            found = {}
            for key in keys:
                if key in self._store and key not in found:
                    self._store.move_to_end(key)
                    found[key] = self._store[key]
            return found

    def put_many(self, items):
        """Store ``(key, tensor)`` pairs, dropping the least recently used."""
        with self._lock:
            for key, value in items:
                if key in self._store:
                    continue
                self._store[key] = value
                self.n_bytes += value.element_size() * value.nelement()
            while self.n_bytes > self.max_bytes and self._store:
                _, old = self._store.popitem(last=False)
                self.n_bytes -= old.element_size() * old.nelement()

    def clear(self):
        with self._lock:
            self._store.clear()
            self.n_bytes = 0


#: The process's shared store: the generic-shape screen asks every voxel of a
#: volume (every chunk) for the same ~1,000 shapes.
SIGNAL_CACHE = SignalCache()


class Recorder:
    """A scorer that remembers the labellings scored within the noise.

    Wraps a :class:`BatchScorer`; for each voxel it keeps every distinct
    (labelling, permeability) whose chi-square is within ``KEEP_CHI2`` of
    the best seen, to weigh them afterwards (:meth:`posterior`), and every
    one that fits the data within the noise (chi-square below the
    ``1 - WITHIN_NOISE_FALSE_ALARM`` quantile of ``n`` degrees of freedom),
    which the data do not reject however far behind the best
    (:meth:`ambiguity`). Chi-square
    is ``n * loss / noise`` with ``noise`` the loss of pure noise
    (``loss_scale * sigma^2``), or the voxel's best loss where that is
    larger or ``sigma`` is unknown (a fit that explains the data leaves only
    noise; one that does not, a misfit that spreads the answer as noise
    would: :meth:`_scale`).
    """

    def __init__(self, scorer, n_voxels, noise, n_acquisitions):
        self.scorer = scorer
        self.noise, self.n = noise, n_acquisitions
        self.kept = [dict() for _ in range(n_voxels)]
        self.best = np.full(n_voxels, np.inf)
        # The largest loss of a fit within the noise (0 without sigma: then
        # only the margin around the best keeps labellings).
        quantile = chi2.isf(WITHIN_NOISE_FALSE_ALARM, n_acquisitions)
        self.within_noise = noise * quantile / n_acquisitions

    def __call__(self, owners, candidates, membranes):
        losses = self.scorer(owners, candidates, membranes)
        per_label = membrane_rows(candidates, membranes)
        for v in np.unique(owners):
            rows = np.flatnonzero(owners == v)
            self.best[v] = min(self.best[v], losses[rows].min())
            limit = max(self.best[v] + KEEP_CHI2 * self._scale(v), self.within_noise)
            kept = self.kept[v]
            for r in rows[losses[rows] <= limit]:
                kept[_field_key(candidates[r], per_label[r])] = float(losses[r])
            for key in [k for k, loss in kept.items() if loss > limit]:
                del kept[key]
        return losses

    def _scale(self, v):
        """Loss per unit chi-square of voxel ``v``.

        The noise's, or the voxel's best loss where that is larger: a best
        fit that the noise cannot explain leaves a model error (a grid too
        coarse for the data, a search stuck in a local minimum), and weighing
        the labellings by the noise alone would call the one it stopped at
        certain. Scaling the variance by the best fit's chi-square per
        acquisition (the Birge ratio) weighs them by the misfit that is
        actually there; without ``sigma`` the best loss is the only scale.
        """
        return max(self.noise, self.best[v], 1e-12) / self.n

    def posterior(self, grid, labels):
        """Inside probability per grid cell, and expected ``1 - IoU``.

        Weights ``exp(-delta chi2 / 2)`` over the kept labellings; the IoU
        of a labelling against ``labels[v]`` is the better of it and its
        point inversion's (magnitude data cannot tell them apart), and the
        inside probability counts whichever of the two is nearer the answer.
        """
        twin = cell_inversion(grid, exact=False)
        inside = np.zeros((len(self.kept), grid.n_cells))
        spread = np.zeros(len(self.kept))
        for v, kept in enumerate(self.kept):
            if not kept:  # nothing scored (e.g. start labels given)
                inside[v] = labels[v] > 0
                continue
            cells = _kept_cells(kept)
            loss = np.array(list(kept.values()))
            weights = np.exp(-(loss - loss.min()) / (2 * self._scale(v)))
            weights /= weights.sum()
            best = labels[v] > 0
            direct, mirrored = _iou(cells, best), _iou(cells[:, twin], best)
            # Each labelling as the one of it and its twin nearer the answer,
            # as the bootstrap's replicates are: the data weigh both alike.
            aligned = np.where((mirrored > direct)[:, None], cells[:, twin], cells)
            inside[v] = weights @ aligned
            spread[v] = weights @ (1 - np.maximum(direct, mirrored))
        return inside, spread

    def ambiguity(self, grid, labels):
        """Half the largest ``1 - IoU`` between the answer and a kept rival.

        A rival is a kept labelling whose IoU with the answer is below
        ``RIVAL_IOU``: another surface. Two kinds of labelling are kept, and
        neither is set apart from the answer by the data:

        - those within ``KEEP_CHI2`` of the best. Their likelihood weights
          trust the differences within that margin, but the scorer's own
          model errs by several chi-square units between labellings (the
          grid's discretisation, the search's subset of directions), so the
          order of labellings this close is not the data's;
        - those that fit within the noise (``WITHIN_NOISE_FALSE_ALARM``):
          the goodness-of-fit test that vouches for the answer
          (:func:`~dipy_spinverse.reconst.runner.vouch_for_surfaces`) passes
          them too, so they lie in the same confidence set of labellings.
          Where the stated noise exceeds the data's, the best fits far
          better than the noise and the margin alone would call it certain.

        Where one of them is a different surface, the answer is at best one
        of two the data cannot tell apart: at even odds its expected
        ``1 - IoU`` is half their disagreement. This sees a rival the
        likelihood weights drown among the many neighbours of the answer
        (held-out substrates, ``doc/validation/surface_check.md``). IoU
        after the grid's signal symmetries
        (:func:`~dipy_spinverse.geometry.metrics.grid_symmetries`): a
        translated or inverted copy of the answer is the answer.
        """
        maps, _ = grid_symmetries(grid)
        out = np.zeros(len(self.kept))
        for v, kept in enumerate(self.kept):
            if not kept:
                continue
            cells = _kept_cells(kept)
            best = labels[v] > 0
            aligned = np.max([_iou(cells[:, m], best) for m in maps], axis=0)
            if aligned.min() < RIVAL_IOU:
                out[v] = (1 - aligned.min()) / 2
        return out


def _kept_cells(kept):
    """Inside masks (n_kept, n_cells) of a voxel's kept labellings, from
    their :func:`_field_key` keys."""
    return np.array([np.frombuffer(k, np.int8) for k, _ in kept]) > 0


def _field_key(labels, membranes):
    """A key of the permeability field of ``labels`` with per-label
    ``membranes``: only the entries of the labels present, so that rows
    padded to the batch's widest labelling (which depends on the voxels
    scored with it) give the same key."""
    present = np.unique(labels[labels > 0]) - 1
    return labels.astype(np.int8).tobytes(), membranes[present].tobytes()


def _iou(cells, best):
    """IoU of each row of ``cells`` with ``best`` (one row, or one per row)."""
    union = (cells | best).sum(1)
    return np.where(union > 0, (cells & best).sum(1) / np.maximum(union, 1), 1.0)


def _best_kappa(kind, candidates, kappas):
    """Best (candidate, membrane permeability) over ``kappas``, and all losses.

    A generator step: yields one ``(kind, labels, membranes)`` request.
    """
    rows = np.repeat(candidates, len(kappas), axis=0)
    values = np.tile(kappas, len(candidates))
    losses = yield kind, rows, values
    best = int(np.argmin(losses))
    return rows[best], values[best], losses.reshape(len(candidates), -1)


def _screened_shapes(grid, config, spread, kappas=None):
    """The ``search_starts`` generic shapes that best fit a voxel (generator).

    Shapes are screened on ``SCREEN_DIRECTIONS`` directions at two
    permeabilities (the smallest and the middle of ``search_kappas``). With
    noise, the few screening directions cannot rank shapes whose losses
    differ by less than the screen's own ``spread``: those are ranked again
    on the search directions. ``kappas``: screen at these instead.
    """
    if kappas is None:
        kappas = np.asarray(config.search.kappas)
        pair = kappas[[0, len(kappas) // 2]]
    else:
        pair = np.asarray(kappas, dtype=float)
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
    shapes = shapes[: max(config.search.starts, n_close)]
    if len(shapes) > config.search.starts:
        losses = (yield from _best_kappa("search", shapes, pair))[2].min(1)
        shapes = shapes[np.argsort(losses, kind="stable")]
    return shapes[: config.search.starts]


def _screen_reserve(grid, found, config, spread, min_gain, report):
    """The descent's answer, or a better one from a wider screen (generator).

    The screen that picks the descent's starts (:func:`_screened_shapes`)
    scores shapes at the smallest and the middle of ``search_kappas`` only;
    a cell far from both can rank below shapes that mimic it there (the
    README demo's 1e-4 m/s cylinder came back at IoU 0.59, chi-square 137
    against the truth's 108). Screening at every permeability to pick the
    starts instead admitted starts that out-scored the right one before any
    descent (the published bent axon at SNR 100 was lost). So the shapes of
    the screen at every permeability are a reserve: they are descended from
    only when one of them, as screened, already fits better than the
    descent's answer by more than ``min_gain``, and the better of the two
    answers is kept. A descended answer that is right is rarely beaten by
    an undescended shape, so the reserve is seldom descended from.
    """
    kappas = np.asarray(config.search.kappas)
    labels, membrane = found
    reserve = yield from _screened_shapes(grid, config, spread, kappas=kappas)
    answer = (yield "search", labels[None], membrane[None])[0]
    _, _, losses = yield from _best_kappa("search", reserve, kappas)
    if not losses.min() < answer - min_gain:
        return found
    other = yield from _descend(grid, reserve, config, min_gain, report)
    other_loss = (yield "search", other[0][None], other[1][None])[0]
    return other if other_loss < answer else found


def _descend(grid, starts, config, min_gain, report):
    """Greedy descent from the best ``search_restarts`` starts (generator).

    Every start is scored at each of ``search_kappas``; from the best ones the
    descent runs with that permeability for every cell, which the descent's
    own moves then change cell by cell. If one shared grid value beats the
    descended cells' permeabilities, the descent is repeated once from it.
    Each descent is then kicked ``search_kicks`` times
    (:func:`_kicked_descents`). Returns the labels with the lowest final loss
    and their membrane row (:func:`membrane_rows`).
    """
    kappas = np.asarray(config.search.kappas)
    _, _, losses = yield from _best_kappa("search", starts, kappas)
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
            _, shared, grid_losses = yield from _best_kappa(
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

    See :func:`_greedy_steps`, which it runs (label moves only: ``score``
    sees no permeabilities).
    """
    steps = _greedy_steps(grid, labels, config, report, min_gain, membrane=None)
    return run_steps(steps, lambda request: score(request[1]))[0]


def _greedy_steps(grid, labels, config, report, min_gain, membrane):
    """Lazy greedy descent over cell labels (generator of score requests).

    A move (:func:`label_moves`) gives one cell the label of a neighbour
    across a barrier face, or moves a whole group at once, which lets the
    search leave minima that single cells cannot. With a ``membrane`` row
    (:func:`membrane_rows`) there are also permeability moves: one cell's
    membrane up or down by ``KAPPA_STEPS`` decades within the bounds
    (:func:`_kappa_moves`), so cells of different permeability are fitted
    as such while their shapes are searched (a permeability shared by all
    cells made the truth of held-out multi-cell voxels fit 5-50 times worse
    than their true permeabilities). Moves are scored exactly in batches of
    ``search_batch``: never-scored moves first, then by their last known
    loss (a move's effect is local, so a stale score is a good guess). With
    ``search_ranking="gradient"``, half of each batch are instead the label
    moves of best first-order gain (:func:`_first_order_gains`, one gradient
    of the loss per step). The best move of a batch is taken if it lowers
    the loss by more than ``min_gain``; the search stops at a local minimum
    (every current move scored since the last step, none improves) or after
    ``search_steps`` steps. ``report(step, loss)`` is called after every
    step. Returns the labels and the membrane row (None without one).
    """
    if membrane is None:
        membrane = np.full(max(1, int(labels.max())), np.nan)
        kappa_bounds = None
    else:
        membrane = np.asarray(membrane, float)
        kappa_bounds = _kappa_bounds(config)

    def score(candidates, rows):
        return (yield "search", candidates, rows)

    ranked = kappa_bounds is not None and config.search.ranking == "gradient"
    current = (yield from score(labels[None], membrane[None]))[0]
    known, fresh, gains = {}, set(), None
    for step in range(config.search.steps):
        moves = label_moves(grid, labels)
        if ranked and gains is None:
            gains = yield from _first_order_gains(grid, labels, moves, membrane)
        pending = [m for m in moves if m not in fresh]
        permeability = []
        if kappa_bounds is not None:
            permeability = _kappa_moves(labels, membrane, kappa_bounds)
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
    return labels, (membrane if kappa_bounds is not None else None)


def _kappa_bounds(config):
    """log10 bounds of a cell's membrane: the lower bound up to the threshold."""
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
    return candidates, _padded([m[None] for _, m in applied])


def _first_order_gains(grid, labels, moves, membrane):
    """Predicted loss change of each label move, {move: gain} (generator step).

    Yields one ``("gradient", labels, membrane)`` request for the
    first-order gain of opening each face (:meth:`BatchScorer.opening_gains`);
    a move opens some faces and closes others, and its gain is the sum. The
    search uses it only to order moves; each is scored exactly before it is
    taken.
    """
    opening = (yield "gradient", labels[None], membrane[None])[0]
    before = _barriers(grid, labels[None])[0]
    after = _barriers(grid, _apply_moves(labels, membrane, moves)[0])
    opened = before.astype(float) - after  # +1 opened, -1 closed
    return dict(zip(moves, (opened @ opening).tolist(), strict=True))


def label_moves(grid, labels):
    """((cells...), new label) moves: single cells next to a barrier, groups.

    Single moves give a cell on a barrier the label across it. Group moves,
    per cell label ``k``: erode or dilate cell ``k`` by one layer (its rim
    cells go outside; the outside cells along its rim join it), delete one
    of its pieces when it has several; and with several cells, delete cell
    ``k`` or merge it into a cell it touches; and split cell ``k`` in two
    across each of its principal axes (:func:`_split_moves`).
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
