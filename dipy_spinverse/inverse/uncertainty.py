"""The label search's uncertainty: the labellings scored within the noise.

:class:`Recorder` wraps the scorer and keeps, per voxel, the labellings that
the data do not set apart from the best; afterwards it weighs them by their
likelihood (:meth:`Recorder.posterior`), and the answer is no surer than
half its disagreement with any of them that is another surface
(:meth:`Recorder.ambiguity`).
"""

import numpy as np
from scipy.stats import chi2

from ..geometry.metrics import cell_inversion, grid_symmetries
from .fields import membrane_rows

__all__ = ["KEEP_CHI2", "RIVAL_IOU", "WITHIN_NOISE_FALSE_ALARM", "Recorder", "iou"]

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
# must pass to be vouched for (reconst.surfaces.SURFACE_MISFIT_FALSE_ALARM is
# this). They are kept too, however far behind the best, so that a rival
# the data do not reject sets the ambiguity floor (Recorder.ambiguity).
WITHIN_NOISE_FALSE_ALARM = 0.05


class Recorder:
    """A scorer that remembers the labellings scored within the noise.

    Wraps a :class:`~dipy_spinverse.inverse.scorer.BatchScorer`; for each voxel it keeps
    every distinct (labelling, permeability) whose chi-square is within ``KEEP_CHI2`` of
    the best seen, to weigh them afterwards (:meth:`posterior`), and every one that fits
    the data within the noise (chi-square below the ``1 - WITHIN_NOISE_FALSE_ALARM``
    quantile of ``n`` degrees of freedom), which the data do not reject however far
    behind the best (:meth:`ambiguity`). Chi-square is ``n * loss / noise`` with
    ``noise`` the loss of pure noise (``loss_scale * sigma^2``), or the voxel's best
    loss where that is larger or ``sigma`` is unknown (a fit that explains the data
    leaves only noise; one that does not, a misfit that spreads the answer as noise
    would: :meth:`_scale`).

    Parameters
    ----------
    scorer : BatchScorer
        Scores the requests.
    n_voxels : int
    noise : float
        The loss of pure noise, ``loss_scale * sigma^2`` (0 without sigma).
    n_acquisitions : int
        Acquisitions the scorer scores (the chi-square's degrees of freedom).
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
            direct, mirrored = iou(cells, best), iou(cells[:, twin], best)
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
          (:func:`~dipy_spinverse.reconst.surfaces.vouch_for_surfaces`) passes
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
            aligned = np.max([iou(cells[:, m], best) for m in maps], axis=0)
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


def iou(cells, best):
    """IoU of each row of ``cells`` with ``best`` (one row, or one per row).

    Parameters
    ----------
    cells : ndarray of bool (n, n_cells)
    best : ndarray of bool (n_cells,) or (n, n_cells)

    Returns
    -------
    ndarray (n,)
        1 where both are empty.
    """
    union = (cells | best).sum(1)
    return np.where(union > 0, (cells & best).sum(1) / np.maximum(union, 1), 1.0)
