"""The published face fit: permeabilities by back-propagation through the simulator.

The permeability field of a fixed grid is parametrised (per-face logits, as
published, or a per-cell occupancy whose jumps set the faces), the simulator
predicts the b0-normalised signals, and Adam minimises the data loss
(:func:`dipy_spinverse.sim.signals.data_loss`) plus geometric priors through a
staged multi-sequence curriculum.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .noise import UNKNOWN
from .prediction import predict_signal

__all__ = ["FaceFit", "fit_faces", "barrier_probability", "schedule", "TERMS"]

# Soft barrier indicator of the published method: p = sigmoid((-3 - log10 k)/0.5).
_P_CENTRE, _P_WIDTH = -3.0, 0.5
# Softness of the manifold prior's min(k^2, (k - 2)^2) (barrier faces per edge).
_MANIFOLD_TEMPERATURE = 0.25
# Loss terms, in the order the history records them.
TERMS = ("data", "continuity", "manifold")
# The published optimiser's cosine decay ends at a tenth of its rate (0.6),
# and its gradient norm is clipped to 1 per voxel; no validation varied them.
_LR_FINAL = 0.06
_CLIP = 1.0


@dataclass
class FaceFit:
    """Result of :func:`fit_faces`.

    Attributes
    ----------
    permeability : torch.Tensor (n_voxels, n_faces)
        Fitted permeability per interior face, m/s.
    labels : ndarray of int (n_voxels, n_cells) or None
        Occupancy labels of the cell parametrisation; None for faces.
    history : dict of list
        Mean loss per term per iteration, ``"total"`` and ``"lr"``.
    """

    permeability: torch.Tensor
    labels: np.ndarray | None
    history: dict = field(repr=False)


def barrier_probability(log_kappa):
    """Soft barrier indicator ``sigmoid((-3 - log10 kappa) / 0.5)``.

    Parameters
    ----------
    log_kappa : torch.Tensor
        log10 permeability, m/s.

    Returns
    -------
    torch.Tensor
        Same shape, in (0, 1): 0.5 at 1e-3 m/s.
    """
    return torch.sigmoid((_P_CENTRE - log_kappa) / _P_WIDTH)


def fit_faces(grid, data, protocol, config, *, sim, noise=UNKNOWN, callback=None):
    """Run the face fit on b0-normalised ``data`` (n_voxels, n_acquisitions).

    Parameters
    ----------
    grid : TetGrid
    data : torch.Tensor (n_voxels, n_acquisitions)
    protocol : Protocol
    config : InversionConfig
    sim : dict
        ``diffusivity``, ``dtype``, ``device`` for :func:`predict_signal`.
    noise : Noise, optional
        The voxels' noise (:class:`~dipy_spinverse.inverse.noise.Noise`);
        default unknown (level 0, every precision 1).
    callback : callable, optional
        ``callback(iteration, permeability_tensor, losses_dict)`` every step.

    Returns
    -------
    FaceFit
    """
    dtype, device = sim["dtype"], sim["device"]
    geometry = _Geometry(grid, dtype, device)
    param = _initial_parameters(grid, config, len(data), dtype, device)
    history = {k: [] for k in (*TERMS, "total", "lr")}
    optimiser = torch.optim.Adam([param], lr=config.face.lr)
    for n, step in enumerate(schedule(config, protocol)):
        for group in optimiser.param_groups:
            group["lr"] = step.lr
        optimiser.zero_grad()
        log_kappa = _log_kappa(param, config, geometry)
        kappa = 10.0**log_kappa
        pred = predict_signal(grid, kappa, step.protocol, **sim)
        losses = _losses(
            pred,
            data[:, step.index],
            noise.columns(step.index),
            step,
            log_kappa,
            geometry,
            config,
        )
        total = sum(losses.values())
        total.sum().backward()
        _clip_per_voxel(param, _CLIP)
        optimiser.step()
        means = {k: float(v.detach().mean()) for k, v in losses.items()}
        for key, value in means.items():
            history[key].append(value)
        history["total"].append(float(total.detach().mean()))
        history["lr"].append(step.lr)
        if callback is not None:
            callback(n, kappa.detach(), means)
    with torch.no_grad():
        kappa = 10.0 ** _log_kappa(param, config, geometry)
    labels = None
    if config.face.parametrisation == "cell":
        labels = (param.detach() > 0).cpu().numpy().astype(int)
    return FaceFit(kappa, labels, history)


# -- curriculum -------------------------------------------------------------------
@dataclass
class Step:
    """One iteration of the curriculum: its learning rate and acquisitions."""

    lr: float
    ramp: float
    index: np.ndarray
    protocol: object


def schedule(config, protocol):
    """The curriculum of ``config`` on ``protocol``: one :class:`Step` per iteration.

    Stages name sequence ranks (:meth:`Protocol.sequences`); a step fits the
    acquisitions of its stage's sequences, each with weight 1.

    Parameters
    ----------
    config : InversionConfig
    protocol : Protocol

    Returns
    -------
    list of Step
    """
    sequences = protocol.sequences()
    n_seq = len(sequences)
    config = config.for_protocol(n_seq)
    per_iteration = []
    for stage in config.face.stages:
        used = sorted(set(stage.ranks(n_seq)))
        index = np.concatenate([sequences[r][1] for r in used])
        for i in range(stage.iterations):
            lr = _learning_rate(config, i, stage.iterations)
            per_iteration.append((lr, index))
    steps = []
    for n, (lr, index) in enumerate(per_iteration):
        ramp = (n + 1) / len(per_iteration) if config.face.manifold_ramp else 1.0
        steps.append(Step(lr, ramp, index, protocol[index]))
    return steps


def _learning_rate(config, i, n_iter):
    """Linear warm-up to ``lr``, then cosine decay ending at ``_LR_FINAL``."""
    warm = config.face.warmup
    if i < warm:
        return config.face.lr * (i + 1) / warm
    progress = (i - warm) / max(n_iter - warm - 1, 1)
    low, high = _LR_FINAL, config.face.lr
    return low + 0.5 * (high - low) * (1 + math.cos(math.pi * progress))


# -- parametrisations ------------------------------------------------------------
class _Geometry:
    """Grid incidence as tensors, built once per fit."""

    def __init__(self, grid, dtype, device):
        self.face_cells = torch.tensor(grid.face_cells, device=device)
        self.pairs = torch.tensor(grid.face_pairs, device=device)
        edge_faces = torch.tensor(grid.edge_faces, device=device)
        self.edge_mask = edge_faces >= 0
        self.edge_faces = edge_faces.clamp(min=0)
        self.edge_degree = torch.tensor(
            grid.edge_face_counts, dtype=dtype, device=device
        ).clamp(min=1)


def _initial_parameters(grid, config, n_batch, dtype, device):
    # The same start for every voxel: a voxel's result must not depend on the
    # batch it is fitted in (serial, chunked or parallel engines agree).
    if config.face.parametrisation == "face":
        lo, hi = config.face.log_kappa_bounds
        frac = (config.face.init_log_kappa - lo) / (hi - lo)
        logit = math.log(frac / (1 - frac))
        param = torch.full((n_batch, grid.n_faces), logit, dtype=dtype)
    else:
        param = torch.zeros(n_batch, grid.n_cells, dtype=dtype)  # occupancy 0.5
    return param.to(device).requires_grad_(True)


def _log_kappa(param, config, geometry):
    lo, hi = config.face.log_kappa_bounds
    if config.face.parametrisation == "face":
        return lo + (hi - lo) * torch.sigmoid(param)
    # Cell occupancy o in (0, 1): a face is a barrier where o jumps, so the
    # recovered barriers are level sets of o -- closed by construction.
    occ = torch.sigmoid(param)
    jump = (occ[:, geometry.face_cells[:, 0]] - occ[:, geometry.face_cells[:, 1]]) ** 2
    return hi - (hi - lo) * jump


# -- losses and priors -------------------------------------------------------------
def _losses(pred, data, noise, step, log_kappa, geometry, config):
    data_term = noise.data_loss(pred, data, config.loss)
    p = barrier_probability(log_kappa)
    zero = torch.zeros_like(data_term)

    def term(weight, value):
        return weight * value() if weight else zero

    return dict(
        data=data_term,
        continuity=term(
            config.face.continuity, lambda: _continuity(log_kappa, p, geometry, config)
        ),
        manifold=term(config.face.manifold * step.ramp, lambda: _manifold(p, geometry)),
    )


def _continuity(log_kappa, p, geometry, config):
    """Huber of log10-kappa jumps between faces sharing an edge.

    Weighted by 1 - |p_i - p_j| (detached) so that the boundary of a barrier,
    where the indicator must jump, is not smoothed away.
    """
    i, j = geometry.pairs[:, 0], geometry.pairs[:, 1]
    diff = log_kappa[:, i] - log_kappa[:, j]
    huber = torch.nn.functional.huber_loss(
        diff,
        torch.zeros_like(diff),
        reduction="none",
        delta=config.face.continuity_delta,
    )
    weight = (1 - (p[:, i] - p[:, j]).abs()).detach()
    return (weight * huber).mean(-1)


def _manifold(p, geometry):
    """Each grid edge should touch 0 or 2 barrier faces (soft count k)."""
    k = (p[:, geometry.edge_faces] * geometry.edge_mask).sum(-1)
    both = torch.stack([k**2, (k - 2) ** 2], dim=-1)
    t = _MANIFOLD_TEMPERATURE
    softmin = -t * torch.logsumexp(-both / t, dim=-1)
    return (softmin / geometry.edge_degree).mean(-1)


def _clip_per_voxel(param, max_norm):
    """Gradient-norm clipping per voxel (each row is an independent fit)."""
    grad = param.grad
    norm = grad.norm(dim=-1, keepdim=True)
    grad.mul_(torch.clamp(max_norm / (norm + 1e-12), max=1.0))
