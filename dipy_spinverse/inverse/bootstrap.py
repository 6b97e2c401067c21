"""The label search repeated on wild-bootstrap replicates of the data.

:func:`bootstrap_search` sees answers in other basins than the one the
search's own uncertainty (:mod:`~dipy_spinverse.inverse.uncertainty`) weighs.
"""

import zlib

import numpy as np
import torch

from ..geometry.metrics import cell_inversion
from .noise import UNKNOWN
from .search import search_labels
from .uncertainty import iou

__all__ = ["bootstrap_search"]


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
    noise=UNKNOWN,
    callback=None,
    seeds=None,
):
    """Repeat the search on wild-bootstrap replicates: how far does it move?

    The uncertainty of
    :func:`~dipy_spinverse.inverse.search.search_labels` weighs only
    labellings near its answer, so it cannot see a better basin that the descent never
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
    protocol, config, sim, face_kappa, labels, noise, seeds
        As given to :func:`~dipy_spinverse.inverse.search.search_labels`
        (the replicates start from the same face field and seeds; they are
        searched in one driven call).
    callback : callable, optional
        As in :func:`~dipy_spinverse.inverse.search.search_labels`, with the
        voxel index of the replicate ``r * n_voxels + v``.

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
        noise=noise.repeat(k),
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
        direct = iou(cells, answer)
        flipped = iou(cells[:, twin], answer)
        use_twin = flipped > direct
        probability = again.inside_probability[rows]
        inside += np.where(use_twin[:, None], probability[:, twin], probability)
        spread += 1 - np.maximum(direct, flipped)
    return inside / (k + 1), np.maximum(found.uncertainty, spread / k)
