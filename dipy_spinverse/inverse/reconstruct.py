"""Spinverse inversion of one voxel or a batch: the face fit, then the search.

:func:`reconstruct` only orchestrates: it checks and normalises the signals,
runs the face fit (:mod:`~dipy_spinverse.inverse.facefit`), then, when the
configuration asks for it, the label search
(:mod:`~dipy_spinverse.inverse.search`), and packs a :class:`Reconstruction`.
"""

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..checks import check_diffusivity
from ..sim.sequences import as_protocol
from ..sim.signals import VoxelSignals
from .approximation import approximation_error
from .bootstrap import bootstrap_search
from .config import InversionConfig, resolve_config
from .facefit import fit_faces
from .fields import OPEN_KAPPA, cell_labels
from .noise import voxel_noise
from .prediction import predict_signal
from .search import learned_proposal, search_labels

__all__ = ["Reconstruction", "reconstruct", "prepare", "grid_error"]


@dataclass
class Reconstruction:
    """Result of :func:`reconstruct`.

    Attributes
    ----------
    permeability : ndarray (..., n_faces)
        Fitted permeability per interior face, m/s.
    barrier : ndarray of bool (..., n_faces)
        The recovered membranes: faces below the threshold, or, when there
        are labels, the faces between cells of different labels (closed
        surfaces by construction).
    labels : ndarray of int (..., n_cells) or None
        Cell labels from the cell parametrisation (0 outside, 1 inside) or
        the label search (0 outside, ``k`` in cell ``k``: touching cells stay
        separate compartments); None otherwise.
    predicted : ndarray (..., n_acquisitions)
        b0-normalised signal of the fitted field, protocol order.
    history : dict of ndarray
        Loss per term per iteration of the face fit (mean over voxels):
        ``"data"``, ``"continuity"``, ``"manifold"``, ``"total"``, and
        ``"lr"``.
    time_s : float
        Wall time of the fit.
    config : InversionConfig
        The configuration used.
    inside_probability : ndarray (..., n_cells) or None
        Label search: probability that each grid cell is inside a cell,
        over the labellings found within the noise (and those of the
        wild-bootstrap replicates with ``search_bootstrap > 0``).
    uncertainty : ndarray (...) or None
        Label search: expected ``1 - IoU`` of those labellings against
        ``labels`` (0: the data allow no other surface); with
        ``search_bootstrap > 0`` at least the replicates' mean ``1 - IoU``
        (:func:`~dipy_spinverse.inverse.bootstrap.bootstrap_search`).
    proposal_probability : ndarray (..., n_cells) or None
        The learned proposal's occupancy, when the search used one.
    precision : ndarray (..., n_acquisitions) or None
        The noise precision each acquisition was weighed with, relative to
        ``1 / noise_level^2`` (with the grid's approximation error, when
        used).
    loss : ndarray (...) or None
        Each voxel's data term (:func:`~dipy_spinverse.sim.signals.data_loss`)
        at the answer: the one the fit minimised, with its data, noise model
        and precisions (about ``loss_scale * noise_level^2`` where the model
        explains the data).
    noise_level : float
        The relative noise the losses are measured in (:attr:`Noise.level
        <dipy_spinverse.inverse.noise.Noise.level>`; 0: unknown).
    """

    permeability: np.ndarray
    barrier: np.ndarray
    labels: np.ndarray | None
    predicted: np.ndarray
    history: dict = field(repr=False)
    time_s: float = 0.0
    config: InversionConfig | None = field(default=None, repr=False)
    inside_probability: np.ndarray | None = field(default=None, repr=False)
    uncertainty: np.ndarray | None = field(default=None, repr=False)
    proposal_probability: np.ndarray | None = field(default=None, repr=False)
    precision: np.ndarray | None = field(default=None, repr=False)
    loss: np.ndarray | None = field(default=None, repr=False)
    noise_level: float = 0.0


def reconstruct(
    grid,
    signal,
    protocol,
    *,
    data_noise=None,
    preset="default",
    diffusivity=2e-3,
    dtype=torch.float32,
    device="cpu",
    callback=None,
    seeds=None,
    **options,
):
    """Recover the membrane permeability field of one voxel or a batch.

    Parameters
    ----------
    grid : TetGrid
    signal : array_like (..., n_acquisitions) or VoxelSignals
        Measurements in protocol order: raw (with b = 0 volumes) or already
        b0-normalised; see :func:`dipy_spinverse.sim.signals.normalise_b0`. Pass
        raw data when the sequences' echo times differ: their b = 0 scales
        set each sequence's noise precision
        (:func:`~dipy_spinverse.sim.signals.noise_precision`). Or voxels
        normalised once by the caller
        (:class:`~dipy_spinverse.sim.signals.VoxelSignals`, (n,) results).
    protocol : Protocol or GradientTable
    data_noise : Noise or float, optional
        The voxels' noise (:class:`~dipy_spinverse.inverse.noise.Noise`: the
        relative level the losses are measured in and each acquisition's
        precision, (n_voxels, n_acquisitions) with the voxels flattened), or
        its level alone (the precisions are then the sequences' own). Default
        the configuration's ``sigma``; given, it is the noise of the fit and
        the configuration's ``sigma`` is not read. Every loss of the fit reads
        it, and nothing else of the noise.
    preset : str or InversionConfig
        Starting configuration: ``"default"``, ``"paper"`` (see
        :data:`~dipy_spinverse.inverse.PRESETS`) or a configuration.
    diffusivity : float
        Intrinsic diffusivity, mm^2/s.
    dtype, device
        Passed to :func:`~dipy_spinverse.sim.forward.simulate`. float32 (the published
        precision) is 3-4 times faster than float64 here; its simulator error (~1e-6) is
        far below any measurement noise.
    callback : callable, optional
        ``callback(iteration, permeability_tensor, losses_dict)`` each step
        of the face fit; during the label search, after every step,
        ``callback(step, None, {"search": loss, "voxel": index})``.
    seeds : sequence of ndarray, optional
        More starts of the label search, one array of labellings (m_i,
        n_cells) per voxel (e.g. :func:`~dipy_spinverse.inverse.shapes.
        descriptor_starts` of the voxel's posterior draws), beside the face
        field's, the dictionary's and the proposal's.
    **options
        Options by name (:data:`dipy_spinverse.inverse.config.OPTIONS`), e.g.
        ``stages``, ``continuity``, ``parametrisation="cell"``, ``sigma``,
        ``search_steps``, and ``max_iter`` (see
        :func:`~dipy_spinverse.inverse.resolve_config`).

    Returns
    -------
    Reconstruction
    """
    start = time.perf_counter()
    config = resolve_config(preset, **options)
    diffusivity = check_diffusivity(diffusivity)
    protocol = as_protocol(protocol)
    signals, data, batch_shape = _voxel_signals(signal, protocol, dtype=dtype)
    noise = voxel_noise(data_noise, signals, config, dtype=dtype, device=device)
    data = data.to(device=device)
    sim = dict(diffusivity=diffusivity, dtype=dtype, device=device)
    bias = 0.0
    if config.approximation.n_substrates:
        error = grid_error(
            grid, protocol, config, diffusivity=diffusivity, device=device
        )
        data, precision = error.apply(data, noise.precision, noise.level)
        noise = replace(noise, precision=precision)
        bias = error.mean
    faces = fit_faces(
        grid, data, protocol, config, sim=sim, noise=noise, callback=callback
    )
    kappa, labels = faces.permeability.cpu().numpy(), faces.labels
    extras = {}
    if config.searches_labels:
        search = dict(
            sim=sim, face_kappa=kappa, labels=labels, noise=noise, seeds=seeds
        )
        first, replicates = _search_progress(callback, len(data), config)
        found = search_labels(grid, data, protocol, config, callback=first, **search)
        inside, uncertainty = found.inside_probability, found.uncertainty
        if config.search.bootstrap:
            inside, uncertainty = bootstrap_search(
                grid, data, found, protocol, config, callback=replicates, **search
            )
        labels, kappa, predicted = found.labels, found.permeability, found.predicted
        extras = dict(
            inside_probability=inside,
            uncertainty=uncertainty,
            proposal_probability=found.proposal_probability,
        )
        extras = {
            k: None if v is None else v.reshape(tuple(batch_shape) + v.shape[1:])
            for k, v in extras.items()
        }
    else:
        with torch.no_grad():
            predicted = predict_signal(grid, faces.permeability, protocol, **sim)
        if labels is not None:  # the cell parametrisation's 0/1: a cell per piece
            labels = np.array([cell_labels(grid, one) for one in labels])
    # The fit's own data term at its answer, with the data and precisions it
    # was fitted to (bias-corrected, approximation error included).
    loss = replace(noise, precision=noise.precision.double()).data_loss(
        predicted.detach().double(), data.double(), config.loss
    )
    if labels is None:
        barrier = kappa < config.face.threshold
    else:  # the interface of the labels: closed by construction
        barrier = labels[:, grid.face_cells[:, 0]] != labels[:, grid.face_cells[:, 1]]
        labels = labels.reshape(*batch_shape, grid.n_cells)
    return Reconstruction(
        permeability=kappa.reshape(*batch_shape, grid.n_faces),
        barrier=barrier.reshape(*batch_shape, grid.n_faces),
        labels=labels,
        # In the data's terms: the grid's signal plus its mean error.
        predicted=(predicted.cpu().numpy() + bias).reshape(*batch_shape, len(protocol)),
        history={k: np.asarray(v) for k, v in faces.history.items()},
        time_s=time.perf_counter() - start,
        config=config,
        precision=noise.precision.cpu().numpy().reshape(*batch_shape, len(protocol)),
        loss=loss.cpu().numpy().reshape(batch_shape),
        noise_level=noise.level,
        **extras,
    )


def _voxel_signals(signal, protocol, *, dtype):
    """Every check and cast of the voxels' signal, once: below this the fits
    trust their data.

    A raw signal is checked here (shape, finite, normalised by its b = 0,
    within ``dtype`` once normalised). A :class:`VoxelSignals` comes from a
    gate that has done so (:func:`dipy_spinverse.reconst.gate.admit`): it is
    only cast.

    Returns the voxels normalised (:class:`VoxelSignals`, float64), the
    normalised signals as a tensor of ``dtype`` (n_voxels, n_acquisitions),
    and the batch shape.
    """
    if isinstance(signal, VoxelSignals):
        if signal.normalised.shape[-1] != len(protocol):
            raise ValueError(
                f"signal holds {signal.normalised.shape[-1]} acquisitions; the "
                f"protocol has {len(protocol)}."
            )
        return (
            signal,
            torch.as_tensor(signal.normalised).to(dtype=dtype),
            (len(signal),),
        )
    raw = np.asarray(signal, dtype=float)
    if raw.ndim == 0 or raw.shape[-1] != len(protocol):
        raise ValueError(
            f"signal must have len(protocol) = {len(protocol)} values in its "
            f"last axis, got shape {tuple(raw.shape)}."
        )
    if not np.all(np.isfinite(raw)):
        raise ValueError("signal contains NaN or inf; mask or drop such voxels.")
    voxels = raw.reshape(-1, len(protocol))
    signals, batch_shape = VoxelSignals.from_raw(voxels, protocol), raw.shape[:-1]
    # Normalised in float64 on the CPU, then cast: float32 holds every
    # normalised signal but not every raw scale (b = 0 signals of 1e-100 or
    # 1e39 failed the voxel in float32; the fit is scale-free).
    data = torch.as_tensor(signals.normalised).to(dtype=dtype)
    if not torch.all(torch.isfinite(data)):
        bad = torch.nonzero(~torch.isfinite(data).all(-1)).flatten().tolist()
        raise ValueError(
            f"signal of voxel(s) {bad[:5]} overflows {dtype} once divided by its "
            "b = 0 signal (a b = 0 signal of 0 or near it); mask or drop such voxels."
        )
    return signals, data, batch_shape


def prepare(grid, protocol, config, *, diffusivity, dtype, device, progress=True):
    """Train (or read from the cache) what ``config`` needs once per grid and
    protocol: the learned proposal and the grid's approximation error.

    :func:`reconstruct` does it on first use; calling it first keeps these
    one-off costs out of timings, and lets a volume fit do them once before
    its voxels go to parallel workers (which would otherwise each do them).

    Parameters
    ----------
    grid : TetGrid
        The fit's grid.
    protocol : Protocol or object
        The acquisition, or anything :func:`as_protocol` reads.
    config : InversionConfig
        The fit's settings (whether it uses the proposal, the approximation
        error's substrates).
    diffusivity : float
        Intrinsic diffusivity, mm^2/s.
    dtype : torch.dtype
        Of the proposal's training simulations.
    device : str or torch.device
        Where the simulations run.
    progress : bool, optional
        Show progress bars while training or estimating.

    Returns
    -------
    None
        The products are cached on disk.
    """
    protocol = as_protocol(protocol)
    if config.uses_proposal:
        learned_proposal(
            grid,
            protocol,
            config,
            diffusivity=diffusivity,
            dtype=dtype,
            device=device,
            progress=progress,
        )
    grid_error(
        grid,
        protocol,
        config,
        diffusivity=diffusivity,
        device=device,
        progress=progress,
    )


def grid_error(grid, protocol, config, *, diffusivity, device="cpu", progress=True):
    """The grid's approximation error for ``protocol`` that ``config`` asks
    for (:func:`~.approximation.approximation_error`, cached on disk), or
    None where ``config.approximation.n_substrates`` is 0.

    A fit's prediction is in the data's terms: the grid's signal plus this
    error's mean, for whatever protocol is predicted.

    Parameters
    ----------
    grid : TetGrid
        The fit's grid.
    protocol : Protocol
        The acquisition.
    config : InversionConfig
        The fit's settings; ``config.approximation.n_substrates`` is used.
    diffusivity : float
        Intrinsic diffusivity, mm^2/s.
    device : str or torch.device, optional
        Where the simulations run.
    progress : bool, optional
        Show progress bars while estimating.

    Returns
    -------
    ApproximationError or None
        The error, or None where no substrates are asked for.
    """
    if not config.approximation.n_substrates:
        return None
    return approximation_error(
        grid,
        protocol,
        n_substrates=config.approximation.n_substrates,
        diffusivity=diffusivity,
        open_kappa=OPEN_KAPPA,
        device=device,
        progress=progress,
    )


def _search_progress(callback, n_voxels, config):
    """The callbacks of the search and of its bootstrap replicates.

    A voxel is reported done (``{"voxel_done": v}``) once, when its last
    search ends: the first one without replicates, else its last replicate.
    The replicates' steps are reported with their voxel's index.
    """
    if callback is None or not config.search.bootstrap:
        return callback, None
    left = np.full(n_voxels, config.search.bootstrap)

    def first(step, field, losses):
        if "voxel_done" not in losses:
            callback(step, field, losses)

    def replicate(step, field, losses):
        if "voxel_done" in losses:
            v = losses["voxel_done"] % n_voxels
            left[v] -= 1
            if left[v] == 0:
                callback(step, field, {"voxel_done": v})
            return
        callback(step, field, dict(losses, voxel=losses["voxel"] % n_voxels))

    return first, replicate
