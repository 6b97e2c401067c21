"""The protocol-free estimator's design: the protocols it reads, what it estimates.

:data:`DESIGN` bounds the shells it is trained on and reads (b, delta and
Delta of each, and a protocol's volumes); :func:`random_union` draws a
protocol of the design's shells, as the training's. The flow's coordinates
(:data:`FREE_TARGETS`) are the rotation-invariant descriptors': the
per-protocol flow's scalar coordinates
(:data:`~dipy_spinverse.posterior.targets.SCALAR_TARGETS`, encoded by
:mod:`~dipy_spinverse.posterior.targets`) and the logit of the anisotropy,
in place of the shape tensor (whose axis no rotation invariant tells).
"""

import numpy as np

from ...sim.sequences import Protocol, fibonacci_sphere
from ..calibration import SCALARS
from ..targets import SCALAR_TARGETS, decode_scalars, encode_scalars, logistic, logit
from ..training import TrainingOptions

__all__ = [
    "DESIGN",
    "MAX_SHELLS",
    "DIRECTIONS",
    "L4_DIRECTIONS",
    "B_TOLERANCE",
    "SNR_RANGE",
    "FREE_TARGETS",
    "FREE_SCALARS",
    "encode_free",
    "decode_free",
    "random_union",
]

#: The design the estimator is trained on: b (s/mm^2), delta and Delta
#: (seconds; Delta at least delta + 1 ms) of each shell, and the volumes of
#: a protocol (b = 0 included).
DESIGN = {
    "b": (200.0, 10_000.0),
    "small_delta": (3e-3, 40e-3),
    "big_delta": (10e-3, 120e-3),
    "volumes": (30, 3000),
}
#: The most shells a voxel is read through (each training union's count).
MAX_SHELLS = 16
#: The fewest directions a shell needs (a rank-2 tensor's six), and the most
#: the training saw (more are read as this many).
DIRECTIONS = (6, 20)
#: Directions from which a shell's l = 4 invariant is estimated (its 15
#: coefficients with l <= 4).
L4_DIRECTIONS = 15
#: b-values of one shell differ by at most this (s/mm^2; DIPY's tolerance).
B_TOLERANCE = 20.0
#: The relative noise levels trained on (b = 0 SNR), as the per-protocol
#: estimators' default (:class:`~dipy_spinverse.posterior.TrainingOptions`).
SNR_RANGE = TrainingOptions.snr_range

#: The flow's coordinates: the rotation-invariant descriptors, transformed
#: (the scalar coordinates of :mod:`~dipy_spinverse.posterior.targets`, and
#: the anisotropy's logit).
FREE_TARGETS = SCALAR_TARGETS + ("logit_anisotropy",)
#: The descriptors it estimates (every scalar one; not ``orientation``).
FREE_SCALARS = SCALARS


def encode_free(truth, *, rng=None):
    """Descriptors (dict of arrays of length n) as flow coordinates (n, 8).

    Parameters
    ----------
    truth : dict
        Each of :data:`FREE_SCALARS` (arrays of length n), as
        :meth:`~dipy_spinverse.posterior.PriorSimulator.sample` returns them.
    rng : numpy.random.Generator, optional
        Dequantises ``n_cells`` by a uniform jitter in [-1/2, 1/2) (as
        :func:`~dipy_spinverse.posterior.targets.encode`); default none.

    Returns
    -------
    ndarray (n, len(FREE_TARGETS))

    Raises
    ------
    ValueError
        If an ``anisotropy`` is not strictly inside (0, 1).
    """
    a = np.asarray(truth["anisotropy"], dtype=float)
    if not ((a > 0) & (a < 1)).all():
        raise ValueError(
            "anisotropy must lie strictly inside (0, 1) for the protocol-free "
            "flow (its logit); the prior holds a sphere or a line."
        )
    scalars = encode_scalars(truth, rng=rng)
    return np.concatenate([scalars, logit(a)[..., None]], axis=-1)


def decode_free(values):
    """Flow coordinates (..., 8) as descriptors (dict of arrays (...))."""
    values = np.asarray(values, dtype=float)
    out = decode_scalars(values)
    out["anisotropy"] = logistic(values[..., len(SCALAR_TARGETS)])
    return out


def random_union(rng, n_shells, n_directions):
    """A protocol of shells drawn from :data:`DESIGN`.

    Parameters
    ----------
    rng : numpy.random.Generator
    n_shells : int
    n_directions : int
        Directions a shell: evenly spread (:func:`fibonacci_sphere`), turned
        at random.

    Returns
    -------
    protocol : Protocol
        Without b = 0 volumes (the simulations are normalised already).
    shell : ndarray of int (n_acquisitions,)
        Each acquisition's shell.
    """
    bvals, bvecs, small, big, shell = [], [], [], [], []
    for s in range(n_shells):
        delta = rng.uniform(*DESIGN["small_delta"])
        lo = max(DESIGN["big_delta"][0], delta + 1e-3)
        Delta = rng.uniform(lo, max(lo, DESIGN["big_delta"][1]))
        b = rng.uniform(*DESIGN["b"])
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        rotation = q * np.sign(np.diag(r))
        bvals.append(np.full(n_directions, b))
        bvecs.append(fibonacci_sphere(n_directions, hemisphere=True) @ rotation.T)
        small.append(np.full(n_directions, delta))
        big.append(np.full(n_directions, Delta))
        shell.append(np.full(n_directions, s))
    protocol = Protocol.pgse(
        np.concatenate(bvals),
        np.concatenate(bvecs),
        small_delta=np.concatenate(small),
        big_delta=np.concatenate(big),
    )
    return protocol, np.concatenate(shell)
