"""A :class:`Substrate` (labels, per-cell and per-face permeabilities) and
how drawn level functions become one: the nearest-level-set partition of
the grid cells, the permeabilities of the faces (two membranes in series
between touching cells), log-uniform draws and the checked random inputs.
"""

from dataclasses import dataclass, field

import numpy as np

from ...checks import check_generator, check_number
from ..phantoms import Phantom
from ..topology import graph_components

__all__ = [
    "KINDS",
    "PACKED_KINDS",
    "Substrate",
    "partition",
    "substrate_from_labels",
    "log_uniform",
    "check_rng",
    "check_permeability_range",
    "random_unit",
]

#: The cell kinds :func:`random_substrate` draws from.
KINDS = (
    "ellipsoid",
    "capsule",
    "bent_tube",
    "beaded_tube",
    "fanning_tube",
    "torus",
    "blob",
)


#: The kinds of :func:`packed_substrate`: finite cells, and fibres that run
#: through the periodic box (infinite cylinders of the tissue).
PACKED_KINDS = ("packed", "fibre")


# Centroids closer than this (relative to the lattice spacing) to a surface
# count as outside, as in phantoms: BCC centroids sit on a rational lattice
# and exact ties are resolved the same way on every machine.
_TIE_TOL = 1e-9


@dataclass(frozen=True, eq=False)
class Substrate:
    """Cells drawn into a grid, with their membranes.

    Built by :func:`random_substrate`; all arrays are read-only.

    Parameters
    ----------
    labels : ndarray of int (n_grid_cells,)
        0 outside every cell, ``k`` inside cell ``k`` (1 .. ``n_cells``,
        every label present).
    permeability : ndarray (n_cells,)
        Membrane permeability of each cell in m/s (= um/us); entry ``k - 1``
        is cell ``k``'s.
    face_permeability : ndarray (grid.n_faces,)
        Permeability of every interior face of the grid in m/s, ready for
        :func:`dipy_spinverse.simulate`: ``permeability[k - 1]`` between cell
        ``k`` and the extracellular space, ``1 / (1 / kappa_a + 1 / kappa_b)``
        (two membranes in series) between touching cells ``a`` and ``b``,
        ``inf`` (no membrane) elsewhere.
    volumes : ndarray (n_cells,)
        Volume of each cell in um^3 (sum of its grid cells' volumes).
    surface_areas : ndarray (n_cells,)
        Membrane area of each cell in um^2: the summed area of the interior
        faces between the cell and any other label. Where a cell meets the
        outer wall it is closed by the wall, which is not counted.
    kinds : tuple of str
        Kind of each cell (one of :data:`KINDS`).
    params : tuple of dict
        The geometry each cell was drawn with (um, radians, unit vectors).

    Attributes
    ----------
    n_cells : int
        Number of cells.
    inside : ndarray of bool (n_grid_cells,)
        Grid cells inside any cell.
    """

    labels: np.ndarray
    permeability: np.ndarray
    face_permeability: np.ndarray
    volumes: np.ndarray
    surface_areas: np.ndarray
    kinds: tuple
    params: tuple = field(repr=False)

    def __post_init__(self):
        n = len(self.kinds)
        for name in ("permeability", "volumes", "surface_areas"):
            if np.shape(getattr(self, name)) != (n,):
                raise ValueError(
                    f"{name} must have one value per cell ({n},), got shape "
                    f"{np.shape(getattr(self, name))}."
                )
        _check_contents(self, n)
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                value = np.array(value)
                value.setflags(write=False)
                object.__setattr__(self, name, value)
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "params", tuple(dict(p) for p in self.params))

    @property
    def n_cells(self):
        """Number of cells."""
        return len(self.kinds)

    @property
    def inside(self):
        """Grid cells inside any cell (``labels > 0``)."""
        return self.labels > 0

    def with_permeability(self, grid, permeability):
        """The same cells with other membrane permeabilities.

        Parameters
        ----------
        grid : TetGrid or SectionGrid
            The grid the substrate was drawn into.
        permeability : array_like (n_cells,)
            Each cell's membrane permeability, m/s.

        Returns
        -------
        Substrate
        """
        return substrate_from_labels(
            grid,
            self.labels,
            kappa=np.asarray(permeability, dtype=float),
            kinds=self.kinds,
            params=self.params,
        )

    def phantom(self, *, name="random_substrate"):
        """The substrate as a :class:`~dipy_spinverse.geometry.phantoms.Phantom`.

        Parameters
        ----------
        name : str
            Name of the phantom.

        Returns
        -------
        Phantom
            With ``face_permeability`` and ``labels``; ``params`` holds the
            kinds, permeabilities and geometry.
        """
        params = dict(
            kinds=self.kinds,
            permeability=tuple(float(k) for k in self.permeability),
            cells=self.params,
        )
        return Phantom(self.face_permeability, self.labels, name=name, params=params)

    def __repr__(self):
        kappas = ", ".join(f"{k:.2g}" for k in self.permeability)
        return (
            f"Substrate(n_cells={self.n_cells}, kinds={self.kinds}, "
            f"permeability=[{kappas}] m/s, "
            f"inside_cells={int(self.inside.sum())})"
        )


def _check_contents(substrate, n):
    """What a :class:`Substrate` promises: labels 0 .. n with every cell
    present, kinds of :data:`KINDS`, membranes > 0 m/s, no face without a
    permeability, cells of positive volume."""
    labels = np.asarray(substrate.labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            "labels must be a 1-D integer array (one label per grid cell), got "
            f"dtype {labels.dtype} and shape {labels.shape}."
        )
    present = np.unique(labels)
    if present.min(initial=0) < 0 or not np.array_equal(
        present[present > 0], np.arange(1, n + 1)
    ):
        raise ValueError(
            f"labels must be 0 outside and 1 .. {n} (one per kind, every one "
            f"present), got the labels {present.tolist()[:10]}."
        )
    unknown = [k for k in substrate.kinds if k not in KINDS + PACKED_KINDS]
    if unknown:
        raise ValueError(
            f"kinds: {unknown} are not kinds; use some of {KINDS + PACKED_KINDS}."
        )
    checks = (
        ("permeability", substrate.permeability, "finite and > 0 m/s", np.isfinite),
        ("face_permeability", substrate.face_permeability, "> 0 m/s or inf", None),
        ("volumes", substrate.volumes, "finite and > 0 um^3", np.isfinite),
    )
    for name, values, what, finite in checks:
        values = np.asarray(values, dtype=float)
        good = values > 0
        if finite is not None:
            good &= finite(values)
        if not np.all(good):
            raise ValueError(f"{name} must be {what}, got {values[~good][:5]}.")


def check_permeability_range(permeability_range):
    """A ``(low, high)`` permeability range in m/s, checked.

    Parameters
    ----------
    permeability_range : (float, float)
        The range as given, ``0 < low <= high``.

    Returns
    -------
    low, high : float
    """
    try:
        low, high = permeability_range
    except (TypeError, ValueError) as err:
        raise ValueError(
            "permeability_range must be (low, high) in m/s, e.g. (1e-6, 1e-4), "
            f"got {permeability_range!r}."
        ) from err
    hint = " m/s, e.g. (1e-6, 1e-4)"
    low = check_number(low, "permeability_range[0]", minimum=0, hint=hint)
    high = check_number(high, "permeability_range[1]", minimum=0, hint=hint)
    if not 0 < low <= high:
        raise ValueError(
            "permeability_range must be (low, high) with 0 < low <= high m/s, "
            f"e.g. (1e-6, 1e-4), got {permeability_range!r}."
        )
    return float(low), float(high)


def check_rng(rng):
    """A numpy random generator from what the user gave.

    Parameters
    ----------
    rng : None, int, array_like of int, SeedSequence, BitGenerator or Generator
        Anything :func:`numpy.random.default_rng` takes
        (:func:`~dipy_spinverse.checks.check_generator`); a Generator is
        used as it is.

    Returns
    -------
    numpy.random.Generator
    """
    return check_generator(rng, "rng")


def log_uniform(rng, bounds, *, n):
    """``n`` values log-uniform in ``bounds``, exactly ``low`` where ``low ==
    high`` and never outside them. ``high / low`` overflows beyond about
    1e308 (bounds of 1e-300 and 1e10): the draw is then taken in
    logarithms, which would change the last bit of the other draws.

    Parameters
    ----------
    rng : numpy.random.Generator
        The generator drawn from.
    bounds : (float, float)
        ``(low, high)``, ``0 < low <= high``.
    n : int
        Number of values.

    Returns
    -------
    ndarray, shape (n,)
    """
    low, high = bounds
    u = rng.uniform(size=n)
    ratio = high / low
    if np.isfinite(ratio):
        values = low * ratio**u
    else:
        values = np.exp(np.log(low) + u * (np.log(high) - np.log(low)))
    return np.clip(values, low, high)


def partition(grid, levels, *, apart):
    """Nearest-level-set labels; pieces cut off a cell go to the outside.

    ``apart``: where two cells meet, the grid cell nearer its own surface (the
    higher level) goes to the extracellular space, so that no two cells share
    a face.

    Parameters
    ----------
    grid : TetGrid
        The grid.
    levels : ndarray, shape (n, n_grid_cells)
        Each cell's level at the grid cells' centroids (negative inside).
    apart : bool
        Whether touching cells are kept apart.

    Returns
    -------
    ndarray, shape (n_grid_cells,)
        Labels: 0 outside, k for the k-th cell.
    """
    best = np.argmin(levels, axis=0)
    lowest = np.take_along_axis(levels, best[None], axis=0)[0]
    labels = np.where(lowest < -_TIE_TOL * grid.spacing, best + 1, 0)
    a, b = grid.face_cells.T
    if apart:
        contact = (labels[a] != labels[b]) & (labels[a] > 0) & (labels[b] > 0)
        a_out = lowest[a[contact]] >= lowest[b[contact]]
        labels[np.where(a_out, a[contact], b[contact])] = 0
    same = (labels[a] == labels[b]) & (labels[a] > 0)
    _, component = graph_components(grid.n_cells, a[same], b[same])
    volume = np.bincount(component, weights=grid.cell_volumes)
    for k in range(1, len(levels) + 1):
        mine = labels == k
        if not mine.any():
            continue
        pieces = np.unique(component[mine])
        if len(pieces) > 1:
            keep = pieces[np.argmax(volume[pieces])]
            labels[mine & (component != keep)] = 0
    return labels


def substrate_from_labels(grid, labels, *, kappa, kinds, params):
    """The :class:`Substrate` of a labelling: face permeabilities (two
    membranes in series between touching cells), volumes and areas.

    Parameters
    ----------
    grid : TetGrid
        The grid.
    labels : ndarray, shape (n_grid_cells,)
        0 outside, k for the k-th cell.
    kappa : ndarray, shape (n,)
        Each cell's membrane permeability in m/s.
    kinds : sequence of str
        Each cell's kind.
    params : sequence of dict
        Each cell's shape parameters.

    Returns
    -------
    Substrate
    """
    n = len(kinds)
    a, b = labels[grid.face_cells.T]
    cell_kappa = np.concatenate([[np.inf], kappa])
    ka, kb = cell_kappa[a], cell_kappa[b]
    with np.errstate(divide="ignore"):
        series = 1.0 / (1.0 / ka + 1.0 / kb)
    face = np.where(a == b, np.inf, series)
    # Series with the extracellular "membrane" 1/inf = 0 is the cell's own.
    face = np.where((a == 0) & (b > 0), kb, face)
    face = np.where((b == 0) & (a > 0), ka, face)
    volumes = np.bincount(labels, weights=grid.cell_volumes, minlength=n + 1)
    differ = a != b
    areas = np.bincount(
        a[differ], weights=grid.face_areas[differ], minlength=n + 1
    ) + np.bincount(b[differ], weights=grid.face_areas[differ], minlength=n + 1)
    return Substrate(
        labels=labels.astype(np.int64),
        permeability=kappa,
        face_permeability=face,
        volumes=volumes[1:],
        surface_areas=areas[1:],
        kinds=tuple(kinds),
        params=tuple(params),
    )


def random_unit(rng):
    """A uniformly random unit vector.

    Parameters
    ----------
    rng : numpy.random.Generator
        The generator drawn from.

    Returns
    -------
    ndarray, shape (3,)
    """
    v = rng.standard_normal(3)
    return v / max(np.linalg.norm(v), 1e-12)
