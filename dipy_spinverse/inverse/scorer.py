"""The label search's scorer: data loss of labellings, batched across voxels.

Each voxel's search is a generator of score requests; :func:`drive` runs the
searches of all voxels together and scores their pending requests in
shared, batched simulator calls (:class:`BatchScorer`), so a volume keeps
the simulator busy on CPU and GPU alike. Every candidate is scored through
the one data loss of the package
(:func:`dipy_spinverse.sim.signals.data_loss`).
"""

import hashlib

import numpy as np
import torch

from ..sim.forward import update_digest
from ..sim.operators import face_conductance
from .cache import SIGNAL_CACHE
from .fields import (
    OPEN_KAPPA,
    barrier_faces,
    membrane_fields,
    membrane_rows,
    padded_rows,
)
from .noise import UNKNOWN, Noise
from .prediction import predict_signal

__all__ = ["SCORE_BATCH", "drive", "BatchScorer"]

# Candidates (of any voxels) scored per simulator call: bounds the batch's
# memory (64 fields x 576 cells x 540 acquisitions, complex64: 20 MB a state).
SCORE_BATCH = 64


def drive(searches, scorers):
    """Run many searches together, scoring their requests in shared batches.

    Each search is a generator that yields ``(kind, candidates, membranes)``
    requests and receives the losses; ``scorers[kind](owners, candidates,
    membranes)`` scores the pending requests of all searches of one kind at
    once (``owners``: the search each row belongs to). Returns the searches'
    return values, in order.

    Parameters
    ----------
    searches : list of generator
    scorers : dict of callable
        A scorer per request kind.

    Returns
    -------
    list
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


def _stack_rows(candidates, membranes):
    """One (n, width) array of the membrane rows of several requests."""
    if all(np.ndim(m) < 2 for m in membranes):
        return np.concatenate([np.atleast_1d(m) for m in membranes])
    rows = [membrane_rows(c, m) for c, m in zip(candidates, membranes, strict=True)]
    return padded_rows(rows)


class BatchScorer:
    """Data loss of labellings of many voxels, ``SCORE_BATCH`` per simulation.

    ``scorer(owners, candidates, membranes) -> losses``: row ``r`` is the
    field of ``candidates[r]`` (``membranes[r]`` on the faces between
    different labels, the upper bound elsewhere) scored against voxel
    ``owners[r]`` on the acquisitions ``subset`` (with each acquisition's
    ``noise``, default unknown: every precision 1).

    Parameters
    ----------
    grid : TetGrid
    data : torch.Tensor (n_voxels, n_acquisitions)
        b0-normalised signals.
    protocol : Protocol
    subset : ndarray of int
        The acquisitions scored.
    config : InversionConfig
    sim : dict
        Keywords of :func:`~dipy_spinverse.inverse.prediction.predict_signal`.
    noise : Noise, optional
        The voxels' noise (:class:`~dipy_spinverse.inverse.noise.Noise`).
    cache : SignalCache, optional
        Where simulated signals are kept (default the process's
        :data:`~dipy_spinverse.inverse.cache.SIGNAL_CACHE`).
    """

    def __init__(
        self, grid, data, protocol, subset, config, *, sim, noise=UNKNOWN, cache=None
    ):
        self.grid, self.config, self.sim = grid, config, sim
        self.protocol = protocol[subset]
        self.target = data[:, subset]
        if noise.precision is None:
            noise = Noise(noise.level, torch.ones_like(data))
        self.noise = noise.columns(subset)
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

        ``membranes`` as in :func:`~dipy_spinverse.inverse.fields.membrane_rows`. The
        field (:func:`~dipy_spinverse.inverse.fields.membrane_fields`) is the cache key:
        identical fields requested by different voxels (every voxel screens the same
        generic shapes), or again later, are simulated once.
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
                pred = predict_signal(
                    self.grid, fields[rows], self.protocol, **self.sim
                )
            found.update(zip(batch, pred, strict=True))
            self.cache.put_many(zip(batch, pred, strict=True))
        return torch.stack([found[k] for k in keys])

    def opening_gains(self, owners, candidates, membranes):
        """First-order loss change of opening each face, per labelling.

        ``dL/dw_f * (w_open - w_membrane)``: the gradient of the loss with respect to
        each face's conductance ``w_f`` (the diffusion operator is linear in it,
        :func:`~dipy_spinverse.sim.operators.face_conductance`, so this linearisation
        follows the physics across the decades between a membrane and an open face,
        where one in log permeability saturates at both ends), at the field of each row,
        times the conductance that opening a membrane face adds (``membranes`` as in
        :func:`~dipy_spinverse.inverse.fields.membrane_rows`). Same rows as
        :meth:`__call__`; returns (n, n_faces); not cached (only the move ranking uses
        it).
        """
        out = []
        owner = torch.as_tensor(owners, device=self.target.device)
        dtype, device = self.sim["dtype"], self.sim["device"]
        diffusivity = torch.as_tensor(self.sim["diffusivity"], dtype=dtype)
        diffusivity = diffusivity.expand(1, self.grid.n_cells).to(device)
        membranes = membrane_rows(candidates, membranes)
        for i in range(0, len(candidates), SCORE_BATCH):
            rows = slice(i, i + SCORE_BATCH)
            barrier = barrier_faces(self.grid, candidates[rows])
            field = membrane_fields(
                self.grid, candidates[rows], membranes[rows], self.open_kappa
            )
            # A face that a move closes gets a membrane of the cells' typical
            # permeability (which cell it joins is the move's business).
            typical = np.exp(np.nanmean(np.log(membranes[rows]), axis=1))
            closing = np.where(barrier, field, typical[:, None])
            kappa = torch.as_tensor(field, dtype=dtype, device=device)
            kappa.requires_grad_(True)
            pred = predict_signal(self.grid, kappa, self.protocol, **self.sim)
            # Each row's loss depends on its own field only: one backward
            # pass of the sum gives every row's gradient.
            self._loss(pred, owner[rows]).sum().backward()
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
        pred = predict_signal(self.grid, field[None], self.protocol, **self.sim)
        return self._loss(pred, slice(v, v + 1))[0]

    def _loss(self, pred, owners):
        return self.noise.data_loss(
            pred, self.target[owners], self.config.loss, rows=owners
        )
