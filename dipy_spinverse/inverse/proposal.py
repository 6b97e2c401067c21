"""Learned proposals: where a voxel's cells probably are, from its signals.

A small network (:class:`ProposalNet`) maps a voxel's b0-normalised signals
to the probability that each grid cell lies inside some cell (occupancy)
and to the membrane permeability. It is trained on random substrates
(:mod:`dipy_spinverse.geometry.substrates`) simulated for the user's grid, protocol
and diffusivity, with Rician noise over a range of SNR, the first time that
combination is met; the trained weights are cached on disk under a hash of
everything they depend on (as AMICO caches its kernels) and reused
afterwards (:func:`load_or_train_proposal`). The label search starts from
labellings drawn from the proposal (:func:`proposal_starts`).

Magnitude data cannot tell a shape from its point inversion through the box
centre (:func:`~dipy_spinverse.geometry.metrics.cell_inversion`): the training loss
is the smaller of the losses against the truth and against its inversion,
so the network commits to one of the two instead of averaging them.
"""

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checks import check_int, check_number
from ..files import cache_root, load_or_build
from ..geometry.metrics import cell_inversion
from ..geometry.substrates import random_substrates
from ..geometry.topology import graph_components
from ..provenance import code_digest
from ..sim.forward import simulate, update_digest
from ..sim.signals import normalise_b0

__all__ = [
    "ProposalSettings",
    "ProposalNet",
    "Proposal",
    "train_proposal",
    "load_or_train_proposal",
    "proposal_key",
    "proposal_cache_dir",
    "proposal_starts",
    "TRAINING_SEED",
]

# Substrates for training are drawn from children of this seed; evaluations
# draw held-out substrates from any other seed.
TRAINING_SEED = 20260
# Fields simulated per call while building the training set (memory: 64
# fields x 576 cells x 540 acquisitions, complex64, is ~20 MB).
SIMULATE_BATCH = 64
# Share of the training substrates held back to report the proposal's
# accuracy (validation), and the thresholds at which its occupancy is cut
# into start labellings.
VALIDATION_SHARE = 0.1
START_LEVELS = (0.5, 0.3, 0.7, 0.2, 0.8)


@dataclass(frozen=True)
class ProposalSettings:
    """How a proposal network is trained (part of its cache key).

    Parameters
    ----------
    n_substrates : int
        Random substrates simulated for training (the cost: about 0.15 s
        each on the published grid and protocol on 2 CPU cores).
    snr_range : (float, float)
        Rician noise is drawn per sample and epoch with SNR (of the b = 0
        signal) log-uniform in this range; a quarter of the samples are
        noise-free.
    epochs : int
        Passes over the training set (fresh noise each pass).
    hidden : int
        Width of the network's two hidden layers.
    n_cells : (int, int)
        Range of cells per training substrate.
    permeability_range : (float, float)
        Membrane permeabilities of the training substrates, m/s.
    seed : int
        Seed of the substrates, the noise and the weights.
    """

    n_substrates: int = 4000
    snr_range: tuple = (20.0, 200.0)
    epochs: int = 150
    hidden: int = 512
    n_cells: tuple = (1, 4)
    permeability_range: tuple = (1e-6, 1e-4)
    seed: int = TRAINING_SEED

    def __post_init__(self):
        check_int(self.n_substrates, "n_substrates", minimum=10)
        check_int(self.epochs, "epochs", minimum=1)
        check_int(self.hidden, "hidden", minimum=1)
        check_int(self.seed, "seed", minimum=0)
        low, high = _pair(self.snr_range, "snr_range")
        if not 0 < low <= high < math.inf:
            # A quarter of the samples are noise-free already; an infinite
            # SNR would make the rest silently noise-free too.
            raise ValueError(
                f"snr_range must be (low, high) with 0 < low <= high < inf, got "
                f"{self.snr_range}; e.g. snr_range=(20, 200)."
            )
        object.__setattr__(self, "snr_range", (low, high))
        object.__setattr__(self, "n_cells", tuple(int(n) for n in self.n_cells))
        kappas = _pair(self.permeability_range, "permeability_range")
        object.__setattr__(self, "permeability_range", kappas)


class ProposalNet(torch.nn.Module):
    """Signals -> (occupancy logits per grid cell, log10 permeability).

    A multilayer perceptron on standardised signals; ``mean`` and ``scale``
    (the training signals' statistics) are buffers, saved with the weights.
    """

    def __init__(self, n_inputs, n_cells, hidden):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_inputs))
        self.register_buffer("scale", torch.ones(n_inputs))
        self.body = torch.nn.Sequential(
            torch.nn.Linear(n_inputs, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, n_cells + 1),
        )

    def forward(self, signals):
        out = self.body((signals - self.mean) / self.scale)
        return out[:, :-1], out[:, -1]


@dataclass
class Proposal:
    """A trained proposal network for one grid, protocol and diffusivity.

    Attributes
    ----------
    net : ProposalNet
    key : str
        The cache key (:func:`proposal_key`).
    metadata : dict
        Settings, training time (s), validation scores per noise level
        (``val_iou_clean``, ``val_iou_snr50``: median twin-aware IoU of the
        occupancy cut at 0.5; ``val_log_kappa_mae_clean``, ...).
    """

    net: ProposalNet
    key: str
    metadata: dict

    def predict(self, signals):
        """Occupancy (n_voxels, n_cells) and permeability (n_voxels,), m/s.

        Parameters
        ----------
        signals : array_like or torch.Tensor (n_voxels, n_acquisitions)
            b0-normalised signals in protocol order.
        """
        x = torch.as_tensor(np.asarray(signals, dtype=np.float32))
        with torch.no_grad():
            logits, log_kappa = self.net(x.reshape(-1, x.shape[-1]))
        return torch.sigmoid(logits).numpy(), 10.0 ** log_kappa.numpy()


def proposal_key(grid, protocol, diffusivity, settings):
    """SHA-256 of everything a proposal depends on (its cache key).

    The grid's geometry and wall, the protocol's waveforms, b-values and
    directions, the diffusivity, the training settings and the code that
    trains it (this module and every module of the package it imports,
    :func:`~dipy_spinverse.provenance.code_digest`).

    Parameters
    ----------
    grid : TetGrid
        The grid the proposal labels.
    protocol : Protocol
        The acquisition the proposal reads.
    diffusivity : float
        Intrinsic diffusivity, mm^2/s.
    settings : ProposalSettings
        The training settings.

    Returns
    -------
    str
        The first 32 hex digits of the digest.
    """
    digest = update_digest(
        hashlib.sha256(),
        grid,
        protocol,
        code=code_digest(__name__),
        diffusivity=float(diffusivity),
        settings=asdict(settings),
    )
    return digest.hexdigest()[:32]


def proposal_cache_dir():
    """Where trained proposals are cached.

    ``$DIPY_SPINVERSE_CACHE`` if set, else ``$XDG_CACHE_HOME/dipy_spinverse``
    (``~/.cache/dipy_spinverse``), subfolder ``proposals``.
    """
    return cache_root() / "proposals"


def load_or_train_proposal(
    grid,
    protocol,
    *,
    diffusivity=2e-3,
    settings=None,
    cache_dir=None,
    dtype=torch.float32,
    device="cpu",
    progress=True,
):
    """The cached proposal for this grid and protocol, trained if missing.

    Parameters
    ----------
    grid : TetGrid
    protocol : Protocol
    diffusivity : float
        Intrinsic diffusivity, mm^2/s.
    settings : ProposalSettings, optional
    cache_dir : str or Path, optional
        Default :func:`proposal_cache_dir`.
    dtype, device
        Of the training simulations (the network itself trains in float32
        on the CPU: it is small).
    progress : bool
        Progress bars while training.

    Returns
    -------
    Proposal
    """
    settings = ProposalSettings() if settings is None else settings
    key = proposal_key(grid, protocol, diffusivity, settings)
    folder = cache_root(cache_dir) if cache_dir else proposal_cache_dir()

    def load(path):
        saved = torch.load(path, weights_only=True)
        net = ProposalNet(len(protocol), grid.n_cells, settings.hidden)
        net.load_state_dict(saved["state"])
        return Proposal(net, key, json.loads(saved["metadata"]))

    def save(proposal, tmp):
        state = dict(
            state=proposal.net.state_dict(), metadata=json.dumps(proposal.metadata)
        )
        torch.save(state, tmp)

    return load_or_build(
        folder / f"{key}.pt",
        load=load,
        build=lambda: train_proposal(
            grid,
            protocol,
            diffusivity=diffusivity,
            settings=settings,
            dtype=dtype,
            device=device,
            progress=progress,
        ),
        save=save,
        what="learned proposal",
    )


def train_proposal(
    grid,
    protocol,
    *,
    diffusivity=2e-3,
    settings=None,
    dtype=torch.float32,
    device="cpu",
    progress=True,
):
    """Train a proposal network on simulated random substrates.

    See :func:`load_or_train_proposal` for the parameters; this one always
    trains and never touches the cache.

    Parameters
    ----------
    grid : TetGrid
        The grid the proposal labels.
    protocol : Protocol
        The acquisition the proposal reads.
    diffusivity : float, optional
        Intrinsic diffusivity, mm^2/s.
    settings : ProposalSettings, optional
        The training settings; None: the defaults.
    dtype : torch.dtype, optional
        Of the training simulations.
    device : str or torch.device, optional
        Of the training simulations.
    progress : bool, optional
        Show progress bars while training.

    Returns
    -------
    Proposal
        The trained network, its cache key and its training metadata.
    """
    settings = ProposalSettings() if settings is None else settings
    check_number(diffusivity, "diffusivity")
    start = time.perf_counter()
    signals, occupancy, log_kappa = _training_set(
        grid, protocol, diffusivity, settings, dtype, device, progress
    )
    simulated = time.perf_counter() - start
    net, scores = _fit_network(
        grid, protocol, signals, occupancy, log_kappa, settings, progress
    )
    metadata = dict(
        settings=asdict(settings),
        diffusivity=float(diffusivity),
        simulate_s=round(simulated, 1),
        train_s=round(time.perf_counter() - start, 1),
        **scores,
    )
    key = proposal_key(grid, protocol, diffusivity, settings)
    return Proposal(net, key, metadata)


def _training_set(grid, protocol, diffusivity, settings, dtype, device, progress):
    """Noise-free signals, occupancy and mean log10 permeability of substrates."""
    substrates = random_substrates(
        grid,
        settings.n_substrates,
        seed=settings.seed,
        n_cells=settings.n_cells,
        permeability_range=settings.permeability_range,
    )
    signals = []
    bar = tqdm(
        total=len(substrates),
        desc="Simulating proposal training set",
        unit="substrate",
        disable=not progress,
    )
    for i in range(0, len(substrates), SIMULATE_BATCH):
        batch = substrates[i : i + SIMULATE_BATCH]
        field = np.stack([s.face_permeability for s in batch])
        with torch.no_grad():
            signal = simulate(
                grid,
                field,
                protocol,
                diffusivity=diffusivity,
                dtype=dtype,
                device=device,
            )
        signals.append(signal.cpu().to(torch.float32))
        bar.update(len(batch))
    bar.close()
    occupancy = torch.as_tensor(np.stack([s.inside for s in substrates]), dtype=float)
    log_kappa = torch.tensor(
        [np.average(np.log10(s.permeability), weights=s.volumes) for s in substrates]
    )
    return torch.cat(signals), occupancy.float(), log_kappa.float()


def _fit_network(grid, protocol, signals, occupancy, log_kappa, settings, progress):
    """Adam on the twin-aware occupancy loss; returns the net and its scores."""
    generator = torch.Generator().manual_seed(settings.seed)
    n = len(signals)
    order = torch.randperm(n, generator=generator)
    n_val = max(1, int(VALIDATION_SHARE * n))
    val, train = order[:n_val], order[n_val:]
    twin = torch.as_tensor(cell_inversion(grid))
    # Seeded weights without reseeding the user's global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = ProposalNet(signals.shape[1], grid.n_cells, settings.hidden)
    clean = normalise_b0(signals[train], protocol)
    net.mean.copy_(clean.mean(0))
    net.scale.copy_(clean.std(0).clamp_min(1e-3))
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-5)
    steps_per_epoch = max(1, math.ceil(len(train) / 128))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=2e-3, total_steps=settings.epochs * steps_per_epoch
    )
    bar = tqdm(
        range(settings.epochs),
        desc="Training proposal",
        unit="epoch",
        disable=not progress,
    )
    for _ in bar:
        for rows in torch.randperm(len(train), generator=generator).split(128):
            idx = train[rows]
            x = _noisy(signals[idx], protocol, settings, generator)
            loss = _loss(net, x, occupancy[idx], log_kappa[idx], twin)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    return net, _scores(
        net, signals[val], occupancy[val], log_kappa[val], protocol, twin
    )


def _noisy(signals, protocol, settings, generator):
    """Rician noise (SNR log-uniform in the range; a quarter noise-free)."""
    low, high = settings.snr_range
    u = torch.rand(len(signals), 1, generator=generator)
    snr = torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    sigma = torch.where(
        torch.rand(len(signals), 1, generator=generator) < 0.25, 0, 1 / snr
    )
    return _rician(signals, sigma, protocol, generator)


def _rician(signals, sigma, protocol, generator):
    """b0-normalised magnitude of the signals with complex Gaussian noise."""
    real = signals + sigma * torch.randn(signals.shape, generator=generator)
    imag = sigma * torch.randn(signals.shape, generator=generator)
    return normalise_b0(torch.hypot(real, imag), protocol)


def _loss(net, x, occupancy, log_kappa, twin):
    logits, predicted_kappa = net(x)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    direct = bce(logits, occupancy, reduction="none").mean(1)
    inverted = bce(logits, occupancy[:, twin], reduction="none").mean(1)
    occupancy_loss = torch.minimum(direct, inverted).mean()
    return occupancy_loss + 0.1 * torch.mean((predicted_kappa - log_kappa) ** 2)


def _scores(net, signals, occupancy, log_kappa, protocol, twin):
    """Validation: median twin-aware IoU at 0.5 (noise-free and SNR 50)."""
    scores = {}
    for name, sigma in (("clean", 0.0), ("snr50", 1 / 50)):
        x = _rician(signals, sigma, protocol, torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits, predicted_kappa = net(x)
        inside = logits > 0
        truth = occupancy > 0.5
        iou = torch.maximum(_iou(inside, truth), _iou(inside, truth[:, twin]))
        scores[f"val_iou_{name}"] = round(float(iou.median()), 4)
        scores[f"val_log_kappa_mae_{name}"] = round(
            float((predicted_kappa - log_kappa).abs().median()), 4
        )
    return scores


def _iou(a, b):
    union = (a | b).sum(1).clamp_min(1)
    return (a & b).sum(1) / union


def proposal_starts(grid, occupancy, n_samples, rng):
    """Closed start labellings drawn from a proposal's occupancy.

    The occupancy cut at the levels ``START_LEVELS``, then Bernoulli samples
    (each cell inside with its probability) cleaned by one majority vote
    over face neighbours (an isolated cell flips). Each connected inside
    region becomes its own cell label (1, 2, ...), so separate cells start
    as separate compartments. Empty and full labellings are dropped.

    Parameters
    ----------
    grid : TetGrid
    occupancy : ndarray (n_cells,)
    n_samples : int
        Labellings returned at most (duplicates removed).
    rng : numpy.random.Generator

    Returns
    -------
    ndarray of int (n, n_cells)
    """
    binary = [occupancy > level for level in START_LEVELS]
    while len(binary) < 2 * n_samples:
        draw = rng.random(grid.n_cells) < occupancy
        binary.append(_majority(grid, draw))
    labelled = [_components(grid, inside) for inside in binary]
    # Cuts first (they are the proposal's best guess), then every distinct
    # labelling in sorted order; empty and full ones dropped.
    ordered = labelled[: len(START_LEVELS)] + list(np.unique(labelled, axis=0))
    starts = {}
    for labels in ordered:
        if 0 < np.count_nonzero(labels) < grid.n_cells:
            starts.setdefault(labels.tobytes(), labels)
    return np.array(list(starts.values())[:n_samples], dtype=int).reshape(
        -1, grid.n_cells
    )


def _majority(grid, inside):
    """One majority vote over the (up to 4) face neighbours of each cell."""
    neighbours = inside[grid.cell_neighbours]
    own = grid.cell_neighbours == np.arange(grid.n_cells)[:, None]
    votes = np.where(own, inside[:, None], neighbours).sum(1)
    return np.where(votes == 2, inside, votes > 2)


def _components(grid, inside):
    """Labels 1..m of the connected inside regions (face adjacency), 0 outside."""
    a, b = grid.face_cells.T
    joined = inside[a] & inside[b]
    _, component = graph_components(grid.n_cells, a[joined], b[joined])
    labels = np.zeros(grid.n_cells, int)
    parts = np.unique(component[inside])
    for k, part in enumerate(parts, start=1):
        labels[(component == part) & inside] = k
    return labels


def _pair(value, name):
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}.") from None
    return low, high
