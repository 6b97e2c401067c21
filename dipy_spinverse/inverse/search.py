"""The label search: closed cell labellings, one membrane permeability per cell.

The face fit's permeabilities are thresholded into a barrier that need not
be closed. The label search instead looks for a labelling of the cells
(0 outside, ``k`` inside cell ``k``) whose interface -- closed by
construction -- carries each cell's membrane permeability, and which fits
the data best. :func:`search_labels` only orchestrates its steps, each a
module of its own:

1. **Starts** (:mod:`~dipy_spinverse.inverse.starts`): the regions the
   thresholded face field suggests, the generic shapes of
   :func:`~dipy_spinverse.inverse.shapes.shape_search` screened on a few
   directions, and the learned proposal's samples.
2. **Descent** (:mod:`~dipy_spinverse.inverse.moves`): a lazy greedy descent
   over label moves and per-cell permeability moves from the best starts,
   while a move lowers the data loss by more than the noise explains
   (``search_min_gain`` chi-square units).
3. **Permeability** (:mod:`~dipy_spinverse.inverse.refine`): each cell's
   refined from the descent's, on every acquisition.
4. **Uncertainty** (:mod:`~dipy_spinverse.inverse.uncertainty`): the
   labellings scored within the noise of the answer, weighed by their
   likelihood; optionally the whole search is repeated on wild-bootstrap
   replicates of the data (:mod:`~dipy_spinverse.inverse.bootstrap`).

Each voxel's search is a generator of score requests, scored for all voxels
together (:mod:`~dipy_spinverse.inverse.scorer`).
"""

import math
import zlib
from typing import NamedTuple

import numpy as np
import torch

from .fields import OPEN_KAPPA, cell_labels, label_field
from .moves import descend, kappa_bounds
from .noise import UNKNOWN
from .prediction import predict_signal
from .proposal import ProposalSettings, load_or_train_proposal, proposal_starts
from .refine import refine_cells
from .scorer import BatchScorer, drive
from .starts import face_field_starts, screen_reserve, screened_shapes
from .uncertainty import Recorder

__all__ = [
    "SCREEN_DIRECTIONS",
    "PROPOSAL_SAMPLES",
    "LabelSearch",
    "search_labels",
    "learned_proposal",
    "direction_subset",
]

# Directions per sequence when screening the generic shapes: 3 (the fewest
# that see anisotropy along every axis) keeps the screen of ~1,000 shapes
# cheap; the survivors are scored on ``search_directions``.
SCREEN_DIRECTIONS = 3
# Labellings drawn from a voxel's learned proposal as starts (at most; as
# many as the generic shapes kept by default). Every validation run used 16
# and none varied it, so it is no option.
PROPOSAL_SAMPLES = 16


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
        (:meth:`~dipy_spinverse.inverse.uncertainty.Recorder.ambiguity`): 0
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
    noise=UNKNOWN,
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
        ``diffusivity``, ``dtype``, ``device`` for
        :func:`~dipy_spinverse.inverse.prediction.predict_signal`.
    face_kappa : ndarray (n_voxels, n_faces)
        The face fit's permeabilities (their regions are starts).
    labels : ndarray of int (n_voxels, n_cells), optional
        Start from these labels alone (the cell parametrisation's).
    noise : Noise, optional
        The voxels' noise (:class:`~dipy_spinverse.inverse.noise.Noise`);
        default unknown (level 0, every precision 1).
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
    # The data term of the truth under noise: loss_scale * level^2 (mean
    # squared residual). A move must lower chi-square by search_min_gain, and
    # the screened loss spreads by sqrt(2 / n) of it over n acquisitions.
    pure = noise.pure_noise_loss(config.loss.loss_scale)
    min_gain = config.search.min_gain * pure / len(search)
    spread = pure * math.sqrt(2 / len(screen))
    recorder = Recorder(
        BatchScorer(grid, data, protocol, search, config, sim=sim, noise=noise),
        len(data),
        pure,
        len(search),
    )
    scorers = {
        "search": recorder,
        "gradient": recorder.scorer.opening_gains,
        "screen": BatchScorer(
            grid, data, protocol, screen, config, sim=sim, noise=noise
        ),
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
                starts.append((yield from screened_shapes(grid, config, spread=spread)))
            if occupancy is not None:
                # Seeded by the voxel's own proposal: the samples do not
                # depend on which other voxels share the call.
                rng = np.random.default_rng(zlib.crc32(occupancy[v].tobytes()))
                starts.append(
                    proposal_starts(grid, occupancy[v], PROPOSAL_SAMPLES, rng)
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

        found = yield from descend(
            grid, starts, config, min_gain=min_gain, report=report
        )
        if labels is None and config.search.dictionary:
            found = yield from screen_reserve(
                grid, found, config, spread=spread, min_gain=min_gain, report=report
            )
        if callback is not None:  # the runner's progress bar counts voxels
            callback(-1, None, {"voxel_done": v})
        return found

    found = drive([voxel(v) for v in range(len(data))], scorers)
    out_labels = np.array([cell_labels(grid, labels) for labels, _ in found])
    out_labels = out_labels.reshape(len(data), grid.n_cells)
    # Stay below the barrier threshold so the membranes remain barriers.
    bounds = kappa_bounds(config)
    # The permeabilities are refined on every acquisition, not the search's
    # subset of directions: their error at the Cramer-Rao bound halves (the
    # published bent axon at SNR 100: 10 % on 10 directions, 5.7 % on all).
    everything = BatchScorer(
        grid,
        data,
        protocol,
        np.arange(len(protocol)),
        config,
        sim=sim,
        noise=noise,
    )
    fields = []
    for v, (labels, membrane) in enumerate(found):
        # Each cell starts from the membrane of the descent's label it is a
        # piece of.
        pieces = [
            labels[out_labels[v] == k][0] for k in range(1, out_labels[v].max() + 1)
        ]
        kappas = refine_cells(
            grid,
            everything,
            v,
            out_labels[v],
            membrane[np.array(pieces, int) - 1],
            bounds=bounds,
        )
        fields.append(label_field(grid, out_labels[v], kappas, OPEN_KAPPA))
    field = np.array(fields).reshape(len(data), grid.n_faces)
    with torch.no_grad():
        predicted = predict_signal(grid, field, protocol, **sim)
    inside, spread = recorder.posterior(grid, out_labels)
    uncertainty = np.maximum(spread, recorder.ambiguity(grid, out_labels))
    return LabelSearch(out_labels, field, predicted, inside, uncertainty, occupancy)


def learned_proposal(
    grid, protocol, config, *, diffusivity, dtype, device, progress=True
):
    """The label search's learned proposal (read from the cache or trained).

    Trained on ``config.search.proposal`` random substrates for this grid,
    protocol and diffusivity, with progress bars if ``progress``; see
    :func:`~dipy_spinverse.inverse.proposal.load_or_train_proposal`.

    Parameters
    ----------
    grid : TetGrid
    protocol : Protocol
    config : InversionConfig
    diffusivity : float
        Intrinsic diffusivity, mm^2/s.
    dtype : torch.dtype
    device : str or torch.device
    progress : bool
        Show progress bars while training.

    Returns
    -------
    LearnedProposal
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


def direction_subset(protocol, n_directions):
    """Acquisitions of at most ``n_directions`` directions per sequence.

    Keeps every b = 0 volume and every b-value of the chosen directions
    (evenly spaced in order of first appearance); None keeps everything.

    Parameters
    ----------
    protocol : Protocol
    n_directions : int or None

    Returns
    -------
    ndarray of int
        Acquisition indices, sorted.
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
