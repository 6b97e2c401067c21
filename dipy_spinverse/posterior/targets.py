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

A prior names how its descriptors are modelled (its ``targets``): the cells'
priors (:class:`~.prior.TissuePrior`) by :data:`TISSUE_TARGETS`, these
coordinates; the white-matter priors, whose descriptors are fractions and
positive quantities alone, by a :class:`DescriptorTargets`. A flow
(:class:`~.estimator.PosteriorEstimator`), its training and its fit read
the coordinates, the descriptors with credible intervals and the decoding
from it.
"""

from dataclasses import dataclass

import numpy as np

from ..geometry.descriptors import DESCRIPTORS

__all__ = [
    "TARGETS",
    "SCALAR_TARGETS",
    "SCALARS",
    "TISSUE_TARGETS",
    "TissueTargets",
    "DescriptorTargets",
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

#: The cells' descriptors with credible intervals (``orientation`` is a unit
#: vector).
SCALARS = tuple(name for name in DESCRIPTORS if name != "orientation")

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


class TissueTargets:
    """The cells' descriptors as a flow models them: :data:`TARGETS`
    (:func:`encode`, :func:`decode`), intervals for :data:`SCALARS` and an
    ``orientation``. Use :data:`TISSUE_TARGETS`."""

    #: The flow's coordinates, in order.
    coordinates = TARGETS
    #: The descriptors with credible intervals.
    scalars = SCALARS
    #: Those with a recalibration table of their own (all of them).
    calibrated = SCALARS
    #: Whether the draws decode to an ``orientation`` (unit vectors).
    orientation = True

    def encode(self, truth, *, rng=None):
        """:func:`encode`."""
        return encode(truth, rng=rng)

    def decode(self, values):
        """:func:`decode`."""
        return decode(values)

    def table_name(self, name):
        """The descriptor whose recalibration table ``name`` reads: its own."""
        return name

    def __repr__(self):
        return "TISSUE_TARGETS"


#: The targets of :class:`~.prior.TissuePrior`.
TISSUE_TARGETS = TissueTargets()


@dataclass(frozen=True)
class DescriptorTargets:
    """Scalar descriptors as flow coordinates: each fraction through the
    :func:`logit`, each positive quantity through the logarithm.

    A descriptor that the prior holds fixed is a constant (not modelled: a
    flow coordinate of no spread has no density), and an alias reads
    another descriptor's draws (the names the cells' priors use).

    Parameters
    ----------
    fractions : tuple of str
        Descriptors in (0, 1).
    positives : tuple of str
        Descriptors > 0.
    constants : tuple of (str, float)
        Descriptors of one value.
    aliases : tuple of (str, str)
        ``(alias, descriptor)`` pairs.
    """

    fractions: tuple = ()
    positives: tuple = ()
    constants: tuple = ()
    aliases: tuple = ()

    #: The draws decode to no ``orientation``.
    orientation = False

    def __post_init__(self):
        modelled = self.fractions + self.positives
        if not modelled:
            raise ValueError(
                "DescriptorTargets needs at least one descriptor in fractions or "
                "positives to model."
            )
        names = modelled + tuple(n for n, _ in self.constants)
        names += tuple(a for a, _ in self.aliases)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"descriptors named twice in DescriptorTargets: {repeated}."
            )
        unknown = [d for _, d in self.aliases if d not in names]
        if unknown:
            raise ValueError(f"aliases of descriptors that are not targets: {unknown}.")

    @property
    def coordinates(self):
        """The flow's coordinates, in order."""
        return tuple(f"logit_{n}" for n in self.fractions) + tuple(
            f"log_{n}" for n in self.positives
        )

    @property
    def scalars(self):
        """Every descriptor with credible intervals: the modelled ones, the
        constants, the aliases."""
        return (
            self.fractions
            + self.positives
            + tuple(n for n, _ in self.constants)
            + tuple(a for a, _ in self.aliases)
        )

    @property
    def calibrated(self):
        """The descriptors with a recalibration table of their own: all but
        the aliases, which read their descriptor's."""
        return self.scalars[: len(self.scalars) - len(self.aliases)]

    def table_name(self, name):
        """The descriptor whose recalibration table ``name`` reads."""
        return dict(self.aliases).get(name, name)

    def encode(self, truth, *, rng=None):
        """Descriptors (dict of arrays of length n) as flow coordinates
        (n, len(coordinates)); ``rng`` is unused (no count to dequantise)."""
        columns = [logit(truth[n]) for n in self.fractions]
        columns += [np.log(np.asarray(truth[n], dtype=float)) for n in self.positives]
        return np.stack(columns, axis=-1)

    def decode(self, values):
        """Flow coordinates (..., len(coordinates)) as each of :attr:`scalars`
        (dict of arrays (...))."""
        values = np.asarray(values, dtype=float)
        k = len(self.fractions)
        out = {n: logistic(values[..., i]) for i, n in enumerate(self.fractions)}
        out.update(
            {n: np.exp(values[..., k + i]) for i, n in enumerate(self.positives)}
        )
        out.update({n: np.full(values.shape[:-1], float(v)) for n, v in self.constants})
        out.update({a: out[d] for a, d in self.aliases})
        return out
