"""The fit grid's approximation error, estimated once and taken into the fit.

Measured signals come from tissue, not from the fit's grid. On the published
grid (6.7 um spacing) the finite-volume signal of a voxel differs from that
of the same voxel on a grid twice as fine by 0.02-0.04 of the b = 0 signal
(the gradient turns the phase by about 1 rad per spacing at b = 1000 s/mm^2
and Delta = 60 ms; doc/validation/generalisation.md), several times the noise at
SNR 100. A fit that ignores it chases the grid's error instead of the cells.

Following the Bayesian approximation error approach (Kaipio and Somersalo,
*Statistical and Computational Inverse Problems*, 2005; J. Comput. Appl.
Math. 198, 2007), the error ``e = S_fine - S_grid`` is drawn over the prior:
random substrates (:mod:`dipy_spinverse.geometry.substrates`) are simulated on a grid
``refine`` times finer and on the fit's grid (the fine labels carried to the
fit's cells), per acquisition. Its mean is a bias, subtracted from the data;
its spread is noise the grid adds, added to the measurement noise in each
acquisition's precision. Measured on the published grid and protocol (32
substrates): the bias is 0.041 (mean absolute, b0-normalised), the spread
0.0096; the carried truth's chi-square per acquisition at SNR 100 fell from
10-37 to 1.2-3.7.

The estimate depends on the grid, protocol, diffusivity and the membrane
permeability of open faces, and on the code that simulates it; it is cached
on disk under a hash of those (as the learned proposal is; the code's by
:func:`~dipy_spinverse.provenance.code_digest`).
"""

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from ..checks import check_int
from ..files import cache_root, load_or_build
from ..geometry.substrates import random_substrates
from ..provenance import code_digest
from ..sim.forward import update_digest
from ..sim.grid import TetGrid
from .fields import OPEN_KAPPA, label_field
from .prediction import predict_signal

__all__ = [
    "ApproximationError",
    "approximation_error",
    "approximation_key",
    "APPROXIMATION_SEED",
]

#: Seed of the substrates the error is estimated on (not the proposal's, not
#: the benchmark's held-out seed).
APPROXIMATION_SEED = 31415
#: Substrates simulated per call on the fine grid (8 x the cells of the fit's
#: grid at refine 2: memory, not speed, sets it).
SIMULATE_BATCH = 8


@dataclass(frozen=True)
class ApproximationError:
    """Mean and spread of ``S_fine - S_grid`` per acquisition (b0-normalised).

    Attributes
    ----------
    mean, std : ndarray (n_acquisitions,)
    n_substrates : int
    key : str
        The cache key it was stored under.
    seconds : float
        Wall time of the estimate (also when read from the cache).
    """

    mean: np.ndarray
    std: np.ndarray
    n_substrates: int
    key: str
    seconds: float = 0.0

    def apply(self, data, precision, sigma):
        """Data without the bias, and precisions with the grid's spread.

        Parameters
        ----------
        data : torch.Tensor (n_voxels, n_acquisitions)
            b0-normalised signals.
        precision : torch.Tensor (n_voxels, n_acquisitions)
            Noise precision relative to ``1 / sigma^2``.
        sigma : float
            Noise relative to b = 0; 0 (unknown) leaves the precisions.

        Returns
        -------
        data, precision : torch.Tensor
            ``data - mean``; ``p / (1 + p std^2 / sigma^2)``: the variance
            of each acquisition becomes ``sigma^2 / p + std^2``. (The Rician
            floor of :func:`~dipy_spinverse.sim.signals.data_loss` is then
            computed with that variance too, which overstates it by
            ``std^2``: at most 0.2 sigma in the signal at SNR 100.)
        """
        mean = torch.as_tensor(self.mean, dtype=data.dtype, device=data.device)
        data = data - mean
        if sigma > 0:
            var = torch.as_tensor(self.std**2, dtype=data.dtype, device=data.device)
            precision = precision / (1 + precision * var / sigma**2)
        return data, precision


def approximation_key(grid, protocol, *, diffusivity, open_kappa, n_substrates, refine):
    """SHA-256 (32 hex digits) of everything the estimate depends on.

    The settings below and the code that makes the estimate (this module and
    every module of the package it imports,
    :func:`~dipy_spinverse.provenance.code_digest`): an estimate made by
    other code is never read.

    Parameters
    ----------
    grid : TetGrid
        The fit's grid (its geometry enters the key).
    protocol : Protocol
        The acquisition (waveforms, b-values, directions).
    diffusivity : float
        Intrinsic diffusivity, mm^2/s.
    open_kappa : float
        Permeability of faces without a membrane, m/s.
    n_substrates : int
        Random substrates the error is drawn over.
    refine : int
        Cubes per side of the fine grid per cube of ``grid``.

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
        open_kappa=float(open_kappa),
        n_substrates=int(n_substrates),
        refine=int(refine),
        seed=APPROXIMATION_SEED,
    )
    return digest.hexdigest()[:32]


def approximation_error(
    grid,
    protocol,
    *,
    n_substrates,
    diffusivity=2e-3,
    open_kappa=OPEN_KAPPA,
    refine=2,
    cache_dir=None,
    device="cpu",
    progress=True,
):
    """The grid's approximation error, read from the cache or estimated.

    Parameters
    ----------
    grid : TetGrid
        The fit's grid; a body-centred-cubic grid (:meth:`TetGrid.bcc`), so
        that a finer one of the same box exists.
    protocol : Protocol
    n_substrates : int
        Random substrates to draw the error over (at least 2).
    diffusivity : float
        Intrinsic diffusivity, mm^2/s.
    open_kappa : float
        Permeability the fit gives faces without a membrane (m/s).
    refine : int
        The fine grid has ``refine`` times the cubes per side (at least 2).
    cache_dir : str or Path, optional
        Default: ``approximation`` beside the proposals' cache folder
        (:func:`~dipy_spinverse.inverse.proposal.proposal_cache_dir`).
    device : str
        Of the simulations (float64 both).
    progress : bool
        Show a progress bar while estimating.

    Returns
    -------
    ApproximationError
    """
    n_substrates = check_int(n_substrates, "n_substrates", 2)
    refine = check_int(refine, "refine", 2)
    fine = _finer_grid(grid, refine)
    key = approximation_key(
        grid,
        protocol,
        diffusivity=diffusivity,
        open_kappa=open_kappa,
        n_substrates=n_substrates,
        refine=refine,
    )
    folder = cache_root(cache_dir) if cache_dir else cache_root() / "approximation"

    def load(path):
        with np.load(path) as saved:
            seconds = float(saved["seconds"]) if "seconds" in saved else 0.0
            return ApproximationError(
                saved["mean"], saved["std"], n_substrates, key, seconds
            )

    def build():
        start = time.perf_counter()
        errors = _errors(
            grid,
            fine,
            protocol,
            n_substrates,
            diffusivity,
            open_kappa,
            device,
            progress,
        )
        seconds = round(time.perf_counter() - start, 1)
        return ApproximationError(
            errors.mean(0), errors.std(0, ddof=1), n_substrates, key, seconds
        )

    def save(error, tmp):
        np.savez(tmp, mean=error.mean, std=error.std, seconds=error.seconds)

    return load_or_build(
        folder / f"{key}.npz",
        load=load,
        build=build,
        save=save,
        what="approximation-error estimate",
    )


def _finer_grid(grid, refine):
    """The same box with ``refine`` times the cubes per side."""
    n = int(round(grid.size / grid.spacing))
    same = TetGrid.bcc(
        grid.size, n, boundary=grid.boundary, wall_permeability=grid.wall_permeability
    )
    if same.n_cells != grid.n_cells or not np.allclose(same.vertices, grid.vertices):
        raise ValueError(
            "the approximation error needs a grid made by TetGrid.bcc (a finer "
            "grid of the same box is simulated); set approximation_error=0 for "
            "other grids."
        )
    return TetGrid.bcc(
        grid.size,
        refine * n,
        boundary=grid.boundary,
        wall_permeability=grid.wall_permeability,
    )


def _errors(grid, fine, protocol, n, diffusivity, open_kappa, device, progress):
    """``S_fine - S_grid`` (n, n_acquisitions) over random substrates."""
    substrates = random_substrates(fine, n, seed=APPROXIMATION_SEED)
    # Each cell of the fit's grid takes the label of the fine cell at its
    # centroid.
    _, nearest = cKDTree(fine.cell_centroids).query(grid.cell_centroids)
    sim = dict(diffusivity=diffusivity, dtype=torch.float64, device=device)
    errors = []
    bar = tqdm(
        total=n,
        desc="Estimating the grid's approximation error",
        unit="substrate",
        disable=not progress,
    )
    for i in range(0, n, SIMULATE_BATCH):
        batch = substrates[i : i + SIMULATE_BATCH]
        fine_field = np.stack([s.face_permeability for s in batch])
        coarse_field = np.stack(
            [
                label_field(
                    grid, s.labels[nearest], np.asarray(s.permeability), open_kappa
                )
                for s in batch
            ]
        )
        with torch.no_grad():
            truth = predict_signal(fine, fine_field, protocol, **sim)
            model = predict_signal(grid, coarse_field, protocol, **sim)
        errors.append((truth - model).cpu().numpy())
        bar.update(len(batch))
    bar.close()
    return np.concatenate(errors)
