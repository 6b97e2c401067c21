"""The descriptors in the flow's coordinates, and back.

The normalising flow models a density on R^k. Each descriptor is mapped to
an unbounded coordinate: fractions through the logit, positive quantities
through the logarithm, the cell count dequantised (a uniform draw in
``[n - 1/2, n + 1/2)``, then the logarithm), and the cells' shape through the
five free components of their normalised second-moment tensor
``T = C / trace(C)``, from which ``anisotropy`` (its fractional anisotropy)
and ``orientation`` (its principal axis) follow for every posterior sample.
Modelling the tensor, not the axis, keeps the sign ambiguity of an axis out
of the density.

The first seven coordinates (:data:`SCALAR_TARGETS`: the fraction, the
count and the five positive quantities; :func:`encode_scalars`,
:func:`decode_scalars`) are every flow's: the protocol-free flow
(:mod:`.protocol_free`) models them too, with the :func:`logit` of the
anisotropy in place of the tensor.
"""

import numpy as np

__all__ = [
    "TARGETS",
    "SCALAR_TARGETS",
    "encode",
    "decode",
    "encode_scalars",
    "decode_scalars",
    "logit",
    "logistic",
    "shape_descriptors",
]

#: The flow's coordinates, in order.
TARGETS = (
    "logit_restricted_fraction",
    "log_n_cells",
    "log_cell_volume",
    "log_cell_diameter",
    "log_surface_to_volume",
    "log_permeability",
    "log_exchange_time",
    "shape_xx",
    "shape_yy",
    "shape_xy",
    "shape_xz",
    "shape_yz",
)

#: The coordinates of the descriptors that every flow models alike (the
#: first seven of :data:`TARGETS`).
SCALAR_TARGETS = TARGETS[:7]

_LOGS = (
    "cell_volume",
    "cell_diameter",
    "surface_to_volume",
    "permeability",
    "exchange_time",
)


def encode(truth, *, rng=None):
    """Descriptors (dict of arrays of length n) as flow coordinates (n, 12).

    Parameters
    ----------
    truth : dict
        ``restricted_fraction``, ``n_cells``, the :data:`_LOGS` quantities
        and ``shape_tensor`` (n, 3, 3), as
        :meth:`~dipy_spinverse.posterior.PriorSimulator.sample` returns.
    rng : numpy.random.Generator, optional
        For the dequantisation of ``n_cells`` (default: no jitter, the
        count itself).

    Returns
    -------
    ndarray (n, len(TARGETS))
    """
    scalars = encode_scalars(truth, rng=rng)
    tensor = np.asarray(truth["shape_tensor"], dtype=float)
    tensor = tensor / np.trace(tensor, axis1=-2, axis2=-1)[..., None, None]
    shape = [
        tensor[:, 0, 0] - 1 / 3,
        tensor[:, 1, 1] - 1 / 3,
        tensor[:, 0, 1],
        tensor[:, 0, 2],
        tensor[:, 1, 2],
    ]
    return np.concatenate([scalars, np.stack(shape, axis=-1)], axis=-1)


def decode(values):
    """Flow coordinates (..., 12) as descriptors (dict of arrays (...)).

    ``n_cells`` is rounded to the nearest count (at least 1); ``orientation``
    has a last axis of 3.
    """
    values = np.asarray(values, dtype=float)
    out = decode_scalars(values)
    xx, yy, xy, xz, yz = (values[..., i] for i in range(7, 12))
    # The trace is 1: the third diagonal entry is what the first two leave.
    zz = 1 / 3 - xx - yy
    tensor = np.stack(
        [
            np.stack([xx + 1 / 3, xy, xz], -1),
            np.stack([xy, yy + 1 / 3, yz], -1),
            np.stack([xz, yz, zz], -1),
        ],
        -2,
    )
    out.update(shape_descriptors(tensor))
    return out


def encode_scalars(truth, *, rng=None):
    """The coordinates of :data:`SCALAR_TARGETS` (n, 7), as :func:`encode`'s
    first seven.

    Parameters
    ----------
    truth : dict
        ``restricted_fraction``, ``n_cells`` and the :data:`_LOGS`
        quantities (arrays of length n).
    rng : numpy.random.Generator, optional
        For the dequantisation of ``n_cells`` (default: no jitter).

    Returns
    -------
    ndarray (n, len(SCALAR_TARGETS))
    """
    n = np.asarray(truth["n_cells"], dtype=float)
    if rng is not None:
        n = n + rng.uniform(-0.5, 0.5, size=n.shape)
    columns = [logit(truth["restricted_fraction"]), np.log(n)]
    columns += [np.log(np.asarray(truth[name], dtype=float)) for name in _LOGS]
    return np.stack(columns, axis=-1)


def decode_scalars(values):
    """The descriptors of :data:`SCALAR_TARGETS` from coordinates (..., k),
    k >= 7 (the first seven read), as :func:`decode` gives them."""
    values = np.asarray(values, dtype=float)
    out = {"restricted_fraction": logistic(values[..., 0])}
    out["n_cells"] = np.maximum(1, np.rint(np.exp(values[..., 1]))).astype(np.int64)
    for i, name in enumerate(_LOGS, start=2):
        out[name] = np.exp(values[..., i])
    return out


def logit(p):
    """``log(p / (1 - p))`` of fractions in (0, 1): their flow coordinate."""
    p = np.asarray(p, dtype=float)
    return np.log(p) - np.log1p(-p)


def logistic(x):
    """The fraction of a flow coordinate (the inverse of :func:`logit`)."""
    return 1 / (1 + np.exp(-x))


def shape_descriptors(tensor):
    """``anisotropy`` and ``orientation`` of second-moment tensors (..., 3, 3).

    The fractional anisotropy of the eigenvalues (0 for a sphere, 1 for a
    line) and the principal eigenvector, its first nonzero component made
    positive. Eigenvalues of a sampled tensor below 0 (a draw outside the
    positive cone) are taken as 0.
    """
    values, vectors = np.linalg.eigh(np.asarray(tensor, dtype=float))
    values = np.clip(values, 0, None)
    mean = values.mean(-1, keepdims=True)
    norm = np.sqrt((values**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        fa = np.sqrt(1.5 * ((values - mean) ** 2).sum(-1)) / norm
    axis = vectors[..., :, -1]
    lead = np.take_along_axis(
        axis, np.argmax(np.abs(axis) > 1e-12, axis=-1)[..., None], axis=-1
    )
    axis = axis * np.where(lead < 0, -1.0, 1.0)
    return {"anisotropy": np.nan_to_num(fa), "orientation": axis}
