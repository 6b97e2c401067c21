"""The prior of the amortised posterior: what tissue a voxel may hold.

A :class:`TissuePrior` says what tissue a voxel may hold (cell sizes, counts,
restricted fractions, membrane permeabilities, diffusivities, cell shapes)
and draws it: a substrate on its patch's grid, described with
:func:`dipy_spinverse.geometry.describe` (a :class:`Draw`).
:meth:`TissuePrior.simulator` binds it to an acquisition protocol: the
:class:`~dipy_spinverse.posterior.PriorSimulator` (:mod:`.simulator`)
simulates the draws' noise-free signals, the training set of the posterior
and anyone's calibration check.

One draw
--------
1. A family, uniformly from ``families``: ``"packed"`` and ``"fibre"``
   (:func:`~dipy_spinverse.geometry.substrates.packed_substrate`: cells packed to a
   chosen fraction, finite or running through the box as axons do), or one
   of :data:`~dipy_spinverse.geometry.substrates.KINDS` (single shapes of
   :func:`~dipy_spinverse.geometry.substrates.random_substrate`: ellipsoids, tori,
   fanning tubes, ...; their fraction stays below about 0.3). ``"axon"``
   (the default of a periodic prior, :data:`WHITE_MATTER`): straight fibres
   packed as ``"fibre"``'s, along a direction uniform on the sphere,
   simulated as the periodic cross-section they are
   (:class:`~dipy_spinverse.sim.sections.SectionGrid`, ``resolution``
   triangle edges across the patch): exact along the fibres and a tenth of
   the cost of the tetrahedral patch or less
   (``benchmarks/prior_throughput.py``); always in a periodic patch.
2. A cell count uniform in ``n_cells``, a target restricted fraction uniform
   in ``restricted_fraction`` and a target cell diameter log-uniform in
   ``cell_diameter``.
3. The box. With ``boundary="periodic"`` (the default) the simulated piece
   of tissue is not the MRI voxel but a representative periodic patch whose
   side follows the cells (the box in which ``n`` cells of that diameter
   fill that fraction), rounded to the nearest of ``n_box_sizes`` sides
   spaced geometrically between the smallest and largest the ranges allow,
   so that substrates on the same grid are simulated together. The grid is
   ``TetGrid.bcc(side, resolution, boundary="periodic")``: extracellular
   water continues past the box, as tissue does. With
   ``boundary="reflecting"`` the box is a closed one of ``box_side`` um
   whose impermeable walls restrict the extracellular water too: the
   physics of the published phantoms and of the label search's default
   grid, where the cells' size follows from the count and fraction drawn
   (fibres then run from wall to wall). ``"either"`` draws each voxel's box
   from the two, half and half: for data whose physics is not known, the
   posterior then shows what the signal cannot tell apart (a closed box
   holding a small cell signals much like tissue of large cells).
4. The substrate, with one membrane permeability per cell, log-uniform in
   ``permeability``, and a diffusivity log-uniform in ``diffusivity`` (or
   fixed).
5. Rejection: a draw whose cells are not at least ``min_spacings`` grid
   spacings across (the equivalent ellipsoid's shortest axis), whose
   realised cell diameter or restricted fraction falls outside the ranges,
   or whose descriptors are not all finite (a cell without a membrane face),
   is drawn again. The prior is the distribution of the accepted draws.
"""

import functools
import math
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import numpy as np

from ..checks import check_diffusivity, check_int, check_number, check_range
from ..geometry.descriptors import cell_covariances, describe
from ..geometry.substrates import (
    FIBRE_DIRECTIONS,
    KINDS,
    PACKED_KINDS,
    packed_substrate,
    random_substrate,
)
from ..sim.grid import TetGrid
from ..sim.sections import SectionGrid
from .envelope import PredictiveCheck
from .simulator import PriorSimulator
from .targets import TISSUE_TARGETS

__all__ = [
    "TissuePrior",
    "Draw",
    "FAMILIES",
    "ALL_FAMILIES",
    "WHITE_MATTER",
    "BOUNDARIES",
]

#: The 3-D families, simulated on tetrahedral patches (the default of a
#: closed box and of ``"either"``).
FAMILIES = PACKED_KINDS + KINDS
#: Every family a prior can draw from: :data:`FAMILIES` and ``"axon"``
#: (straight fibres at any orientation, simulated as periodic sections).
ALL_FAMILIES = FAMILIES + ("axon",)
#: The default families of a periodic prior: white matter's straight axons.
#: White matter is the tissue most DIPY users image, and bundles of axons
#: are what its membranes are; a straight fibre's signal is a 2-D section's
#: times free diffusion along it, exactly, so a patch of axons of 1-5 um
#: costs 0.1-0.2 s to simulate where the tetrahedral patch of the same
#: cells took 4-60 s (``benchmarks/prior_throughput.py``, doc/validation/
#: posterior.md): the default posterior can be trained on a laptop. Cells
#: of other shapes (:data:`FAMILIES`: packed cells, ellipsoids, tori, ...)
#: are a choice, ``TissuePrior(families=FAMILIES)``, at their cost.
WHITE_MATTER = ("axon",)
#: The boxes a prior can simulate its tissue in (see the module documentation).
BOUNDARIES = ("periodic", "reflecting", "either")

# A shape of random_substrate is about half the box across (its radii are
# 0.1-0.35 box sides): the box side per unit of target diameter.
_SHAPE_BOX = 2.0
# Descriptors every accepted draw has, finite and > 0.
_POSITIVE = (
    "cell_volume",
    "cell_diameter",
    "surface_to_volume",
    "permeability",
    "exchange_time",
)
# Fields added after estimators were shipped: described (and so in the
# estimators' keys) only when set, so that the shipped keys stay valid.
_KEYED_WHEN_SET = ("fibre_axis",)
# Draws tried per accepted sample before the prior is declared unsatisfiable.
_MAX_TRIES = 200


class Draw(NamedTuple):
    """One accepted draw of a :class:`TissuePrior`.

    Attributes
    ----------
    side : float
        Side of the simulated box, um.
    substrate : Substrate
        The cells, on the box's grid.
    diffusivity : float
        mm^2/s.
    descriptors : dict
        :func:`~dipy_spinverse.geometry.describe` of the substrate, with
        ``shape_tensor`` and ``min_width``.
    boundary : str
        ``"periodic"`` or ``"reflecting"``: the box's walls.
    axis : ndarray (3,) or None
        The fibres' direction of an ``"axon"`` draw (simulated on a
        :class:`~dipy_spinverse.sim.sections.SectionGrid`); None otherwise.
    """

    side: float
    substrate: object
    diffusivity: float
    descriptors: dict
    boundary: str = "periodic"
    axis: object = None


@dataclass(frozen=True)
class TissuePrior(PredictiveCheck):
    """What tissue a voxel may hold: the prior of the amortised posterior.

    See the module documentation for how one voxel is drawn.

    Parameters
    ----------
    cell_diameter : (float, float)
        Range of the cells' equivalent-sphere diameter, um (log-uniform).
    n_cells : (int, int)
        Inclusive range of the number of cells in the simulated patch.
    restricted_fraction : (float, float)
        Range of the fraction of water in cells.
    permeability : (float, float)
        Range of the membrane permeability, m/s (log-uniform).
    diffusivity : float or (float, float)
        Intrinsic diffusivity, mm^2/s: fixed, or a range (log-uniform).
    families : tuple of str, optional
        Cell families drawn (uniformly), from :data:`ALL_FAMILIES`. Default:
        :data:`WHITE_MATTER` (straight axons) in a periodic patch, and
        :data:`FAMILIES` in a closed box or ``"either"`` (a closed box holds
        no periodic section). Why axons: see :data:`WHITE_MATTER`.
    resolution : int
        BCC cubes per side of the simulated patch (``12 resolution^3``
        tetrahedra on the periodic grid); for ``"axon"`` draws, triangle
        edges across the section (about ``4 resolution^2 / sqrt 3``
        triangles).
    min_spacings : float
        Smallest cell width, in grid spacings.
    n_box_sizes : int
        Number of patch sides (see the module documentation).
    boundary : {"periodic", "reflecting", "either"}
        The box the tissue is simulated in (see the module documentation):
        a periodic patch of tissue, a closed box of ``box_side`` um (the
        published phantoms' physics), or either, half and half.
    box_side : float, optional
        Side of the closed box, um; needed by ``"reflecting"`` and
        ``"either"``, e.g. the label search's grid size (80 / 3).
    fibre_axis : (3,) array_like, optional
        The direction of every ``"axon"`` draw's fibres, in the gradient
        table's frame (normalised here); default None: uniform on the
        sphere. For tissue whose fibres' direction is known from the anatomy,
        e.g. ``(0, 0, 1)`` for a spinal cord along the scanner's z axis: the
        posterior then spends no simulations on orientations the voxel does
        not have.
    """

    cell_diameter: tuple = (1.0, 25.0)
    n_cells: tuple = (1, 4)
    restricted_fraction: tuple = (0.05, 0.85)
    permeability: tuple = (1e-6, 1e-3)
    diffusivity: object = 2e-3
    families: tuple | None = None
    resolution: int = 6
    min_spacings: float = 3.0
    n_box_sizes: int = 12
    boundary: str = "periodic"
    box_side: float | None = None
    fibre_axis: tuple | None = None
    _boxes: tuple = field(init=False, repr=False, compare=False)

    #: Its descriptors as the posterior's flow models them (:mod:`.targets`).
    targets = TISSUE_TARGETS
    #: The code that makes its estimators (:data:`.shipped.ESTIMATOR_ROOTS`).
    estimator_kind = "per_protocol"
    #: What :meth:`simulator` returns.
    simulator_class = PriorSimulator

    def __post_init__(self):
        set_ = object.__setattr__
        set_(
            self, "cell_diameter", check_range(self.cell_diameter, "cell_diameter", 0.0)
        )
        low, high = check_range(self.n_cells, "n_cells", 1.0)
        if low != int(low) or high != int(high):
            raise ValueError(f"n_cells must be whole numbers, got {self.n_cells!r}.")
        set_(self, "n_cells", (int(low), int(high)))
        fraction = check_range(self.restricted_fraction, "restricted_fraction", 0.0)
        if fraction[1] >= 1.0:
            raise ValueError(
                "restricted_fraction must lie in (0, 1), e.g. (0.05, 0.85), got "
                f"{self.restricted_fraction!r}."
            )
        set_(self, "restricted_fraction", fraction)
        set_(self, "permeability", check_range(self.permeability, "permeability", 0.0))
        if np.ndim(self.diffusivity) == 0:
            set_(self, "diffusivity", check_diffusivity(self.diffusivity))
        else:
            low, high = check_range(self.diffusivity, "diffusivity", 0.0)
            set_(self, "diffusivity", (check_diffusivity(low), check_diffusivity(high)))
        families = self.families
        if families is None:
            families = WHITE_MATTER if self.boundary == "periodic" else FAMILIES
        families = (families,) if isinstance(families, str) else families
        unknown = [f for f in families if f not in ALL_FAMILIES]
        if unknown or not families:
            raise ValueError(
                f"families: {unknown or 'none'} given; choose some of {ALL_FAMILIES}."
            )
        set_(self, "families", tuple(families))
        set_(self, "resolution", check_int(self.resolution, "resolution", 2))
        if "axon" in self.families and self.resolution < 3:
            raise ValueError(
                f"resolution must be >= 3 with the 'axon' family (triangle edges "
                f"across its section), got {self.resolution}."
            )
        if "axon" in self.families and self.boundary == "reflecting":
            raise ValueError(
                "families: 'axon' fibres are simulated as periodic sections; use "
                "boundary='periodic' or 'either' (where they are periodic), or "
                "the 'fibre' family in a closed box."
            )
        set_(
            self,
            "min_spacings",
            check_number(self.min_spacings, "min_spacings", minimum=0.0),
        )
        set_(self, "n_box_sizes", check_int(self.n_box_sizes, "n_box_sizes", 1))
        if self.fibre_axis is not None:
            set_(self, "fibre_axis", unit_fibre_axis(self.fibre_axis, self.families))
        self._check_box()
        set_(self, "_boxes", self._box_ladder())

    def _check_box(self):
        if self.boundary not in BOUNDARIES:
            raise ValueError(
                f"boundary must be one of {BOUNDARIES}, got {self.boundary!r}."
            )
        if self.boundary == "periodic":
            if self.box_side is not None:
                raise ValueError(
                    "box_side is the side of a closed box: it applies to "
                    "boundary='reflecting' or 'either', and the boundary is "
                    "'periodic' (whose patch sides follow the cells); remove it."
                )
            return
        if self.box_side is None:
            raise ValueError(
                f"boundary={self.boundary!r} needs box_side, the closed box's side "
                "in um (e.g. 80 / 3, the label search's default grid)."
            )
        side = check_number(self.box_side, "box_side", minimum=0.0)
        if not side > 0:
            raise ValueError(f"box_side must be > 0 um, got {self.box_side!r}.")
        object.__setattr__(self, "box_side", side)

    # -- the patch ---------------------------------------------------------------
    def _box_side(self, family, diameter, n, fraction, axis=None):
        """The patch side in which ``n`` cells of ``diameter`` fill ``fraction``."""
        if family == "packed":
            return diameter * (math.pi * n / (6 * fraction)) ** (1 / 3)
        if family in ("fibre", "axon"):
            # n cylinders of length |axis| L in a box of volume L^3 (a
            # section's fibres run along its own axis: length L).
            length = 1.0 if family == "axon" else np.linalg.norm(axis)
            return diameter * math.sqrt(math.pi * n * length / (4 * fraction))
        return _SHAPE_BOX * diameter

    def _box_ladder(self):
        """The patch sides, geometric between the extremes of the ranges."""
        if self.boundary == "reflecting":
            return ()
        (d_lo, d_hi), (n_lo, n_hi) = self.cell_diameter, self.n_cells
        f_lo, f_hi = self.restricted_fraction
        sides = []
        for family in self.families:
            for d, n, f in ((d_lo, n_lo, f_hi), (d_hi, n_hi, f_lo)):
                for axis in ((1, 0, 0), (1, 1, 1)) if family == "fibre" else (None,):
                    sides.append(self._box_side(family, d, n, f, axis))
        return tuple(np.geomspace(min(sides), max(sides), self.n_box_sizes))

    def grid(self, side, boundary="periodic", *, section=False):
        """The grid of a box of ``side`` um (``boundary``: of a draw); with
        ``section``, the triangular lattice of an ``"axon"`` draw (its fibres
        along z; :meth:`PriorSimulator.simulate_draws` turns it to each
        draw's axis)."""
        if section:
            return section_grid(float(side), self.resolution)
        return _box_grid(float(side), self.resolution, boundary)

    # -- drawing -------------------------------------------------------------------
    def draw(self, rng):
        """One accepted draw (:class:`Draw`).

        Parameters
        ----------
        rng : numpy.random.Generator

        Raises
        ------
        ValueError
            When no draw is accepted in a few hundred tries (ranges that the
            resolution cannot hold), naming what to change.
        """
        return self.draw_pair(rng)[0]

    def draw_pair(self, rng, reference_resolution=None):
        """One accepted draw, and the same tissue on a finer grid.

        The cells are drawn in um, so the same random state rasterises the
        same tissue on the patch's grid and on a grid of
        ``reference_resolution`` cubes per side: what the two grids' signals
        differ by is the discretisation error of the prior's grid.

        Parameters
        ----------
        rng : numpy.random.Generator
        reference_resolution : int, optional

        Returns
        -------
        draw : Draw
            As :meth:`draw`.
        reference : Draw or None
            The same tissue on the finer grid (None without
            ``reference_resolution``).
        """
        for _ in range(_MAX_TRIES):
            boundary = self.boundary
            if boundary == "either":
                boundary = ("periodic", "reflecting")[int(rng.integers(2))]
            family = self.families[rng.integers(len(self.families))]
            if family == "axon":
                boundary = "periodic"
            n = int(rng.integers(self.n_cells[0], self.n_cells[1] + 1))
            fraction = rng.uniform(*self.restricted_fraction)
            diameter = math.exp(rng.uniform(*np.log(self.cell_diameter)))
            axis = self._axis_with(family, None, rng)
            side = self._side(boundary, family, diameter, n, fraction, axis)
            box = (side, family, n, fraction, axis, boundary)
            state = rng.bit_generator.state
            tissue = self._tissue(self.resolution, *box, rng)
            if tissue is None:
                continue
            grid, substrate, truth = tissue
            if not self._accepted(grid, truth):
                continue
            draw = Draw(
                side,
                substrate,
                self._diffusivity(rng),
                truth,
                boundary,
                axis if family == "axon" else None,
            )
            if reference_resolution is None:
                return draw, None
            after = rng.bit_generator.state
            rng.bit_generator.state = state
            fine = self._tissue(reference_resolution, *box, rng)
            rng.bit_generator.state = after
            # The prior holds the tissue as the finer grid describes it: a
            # cell that only the coarse grid makes large enough is not in it.
            if fine is not None and self._in_ranges(fine[2]):
                return draw, draw._replace(substrate=fine[1], descriptors=fine[2])
        raise ValueError(
            f"no draw of {self!r} was accepted in {_MAX_TRIES} tries: its cells "
            f"are not {self.min_spacings} grid spacings across at resolution "
            f"{self.resolution}, or miss the ranges; raise resolution, lower "
            "min_spacings, or widen cell_diameter / restricted_fraction."
        )

    def draw_with(
        self,
        rng,
        *,
        family,
        cell_diameter,
        restricted_fraction,
        n_cells,
        permeability,
        axis=None,
    ):
        """A draw whose cells are drawn with the given settings, not the
        prior's random ones: this prior's tissue conditioned on them.

        The box side, the cells' arrangement and size spread, and the
        diffusivity are drawn as :meth:`draw` draws them, and the draw is
        accepted by the same test, so that the realised descriptors scatter
        about the settings as the prior's own draws do (rasterisation, the
        snapped patch side).

        Parameters
        ----------
        rng : numpy.random.Generator
        family : str
            One of the prior's ``families``.
        cell_diameter : float
            Target equivalent diameter, um.
        restricted_fraction : float
            Target fraction of water in cells.
        n_cells : int
            Cells in the patch.
        permeability : float
            The cells' volume-weighted mean membrane permeability (the
            ``permeability`` descriptor), m/s; each cell's scatters about it
            as the prior's draws do.
        axis : (3,) array_like, optional
            Fibres' direction of an ``"axon"`` or ``"fibre"`` draw (a
            ``"fibre"`` draw takes the nearest of its directions; a prior
            with ``fibre_axis`` keeps its own); default: drawn as
            :meth:`draw` does.

        Returns
        -------
        Draw or None
            None when no draw is accepted in :data:`_MAX_TRIES` tries (the
            settings lie outside what the grid can hold).
        """
        if family not in self.families:
            raise ValueError(
                f"family must be one of the prior's families {self.families}, "
                f"got {family!r}."
            )
        n = int(n_cells)
        for _ in range(_MAX_TRIES):
            boundary = self.boundary
            if boundary == "either":
                boundary = ("periodic", "reflecting")[int(rng.integers(2))]
            if family == "axon":
                boundary = "periodic"
            direction = self._axis_with(family, axis, rng)
            side = self._side(
                boundary, family, cell_diameter, n, restricted_fraction, direction
            )
            box = (side, family, n, restricted_fraction, direction, boundary)
            tissue = self._tissue(self.resolution, *box, rng)
            if tissue is None:
                continue
            grid, substrate = tissue[:2]
            substrate = self._with_mean_permeability(grid, substrate, permeability)
            truth = _described(grid, substrate)
            if not self._accepted(grid, truth):
                continue
            axis_kept = direction if family == "axon" else None
            diffusivity = self._diffusivity(rng)
            return Draw(side, substrate, diffusivity, truth, boundary, axis_kept)
        return None

    def _with_mean_permeability(self, grid, substrate, permeability):
        """``substrate`` with its cells' permeabilities scaled to the
        volume-weighted mean ``permeability`` (the descriptor), within the
        prior's range: the cells keep the prior's scatter about the mean,
        which the signal depends on (one leaky cell among tight ones is not
        their mean)."""
        kappa = np.asarray(substrate.permeability, dtype=float)
        scale = permeability / np.average(kappa, weights=substrate.volumes)
        return substrate.with_permeability(
            grid, np.clip(kappa * scale, *self.permeability)
        )

    def _axis_with(self, family, axis, rng):
        """The fibres' direction of a draw: ``axis`` where given (a
        ``"fibre"`` draw takes the nearest of its lattice directions),
        otherwise drawn; None for cells that are not fibres."""
        if family not in ("axon", "fibre"):
            return None
        if family == "axon" and self.fibre_axis is not None:
            return np.array(self.fibre_axis)  # the prior holds no other
        if axis is None:
            if family == "fibre":
                return np.asarray(FIBRE_DIRECTIONS[rng.integers(len(FIBRE_DIRECTIONS))])
            axis = rng.standard_normal(3)
        axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
        if family == "axon":
            return axis
        # A 3-D patch holds its fibres along a few lattice directions only.
        directions = np.asarray(FIBRE_DIRECTIONS, dtype=float)
        cosines = np.abs(directions @ axis) / np.linalg.norm(directions, axis=1)
        return directions[int(np.argmax(cosines))]

    def _side(self, boundary, family, diameter, n, fraction, axis):
        """The patch side of a draw: the closed box's, or the side in which
        its cells fill ``fraction``, snapped to the ladder (so that draws
        share grids)."""
        if boundary == "reflecting":
            return self.box_side
        wanted = self._box_side(family, diameter, n, fraction, axis)
        return self._boxes[
            int(np.argmin(np.abs(np.log(self._boxes) - math.log(wanted))))
        ]

    def _tissue(self, resolution, side, family, n, fraction, axis, boundary, rng):
        """(grid, substrate, descriptors) on the box's grid of
        ``resolution``, or None when a cell is empty on that grid."""
        if family == "axon":
            # Built along the draw's axis, so that the descriptors'
            # orientation is the fibres'; its lattice is the prior's section.
            grid = section_grid(float(side), resolution).oriented(axis)
        else:
            grid = _box_grid(float(side), resolution, boundary)
        try:
            substrate = self._substrate(grid, family, n, fraction, axis, rng)
        except ValueError:
            return None  # an empty cell on this grid: draw again
        return grid, substrate, _described(grid, substrate)

    def _substrate(self, grid, family, n, fraction, axis, rng):
        if family in PACKED_KINDS or family == "axon":
            # An axon's grid is its section, which packs fibres along axis.
            fibres = family != "packed"
            return packed_substrate(
                grid,
                rng=rng,
                n_cells=n,
                fraction=fraction,
                fibres=fibres,
                axis=axis,
                elongation=1.0 if fibres else math.exp(rng.uniform(0, math.log(3))),
                size_spread=1.5,
                permeability_range=self.permeability,
            )
        return random_substrate(
            grid,
            rng=rng,
            n_cells=n,
            kinds=(family,),
            permeability_range=self.permeability,
        )

    def _accepted(self, grid, truth):
        width = truth["min_width"] / grid.spacing
        return self._in_ranges(truth) and width >= self.min_spacings

    def _in_ranges(self, truth):
        """Whether a tissue is fully described and its cell diameter and
        restricted fraction lie in the prior's ranges."""
        if truth["n_cells"] == 0 or not _described_fully(truth):
            return False  # e.g. a cell without membrane: nothing to describe
        return _within(truth["cell_diameter"], self.cell_diameter) and _within(
            truth["restricted_fraction"], self.restricted_fraction
        )

    def _diffusivity(self, rng):
        if np.ndim(self.diffusivity) == 0:
            return self.diffusivity
        return math.exp(rng.uniform(*np.log(self.diffusivity)))

    def simulator(self, protocol, **options):
        """This prior bound to an acquisition protocol (:class:`PriorSimulator`)."""
        return PriorSimulator(self, protocol, **options)

    @classmethod
    def from_description(cls, description):
        """The prior :meth:`description` described."""
        return cls(**description)

    def description(self):
        """The prior's fields as a dict of plain values (cache keys, reports)."""
        described = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.init and not (f.name in _KEYED_WHEN_SET and value is None):
                described[f.name] = plain_value(value)
        return described


def _described_fully(truth):
    """Whether every descriptor of :data:`_POSITIVE` is finite and > 0."""
    return all(math.isfinite(truth[name]) and truth[name] > 0 for name in _POSITIVE)


def _described(grid, substrate):
    """:func:`describe` of a substrate, with the voxel's shape tensor (the
    volume-weighted mean of its cells' second moments, um^2) and the width
    of its thinnest cell (the equivalent ellipsoid's shortest axis, um)."""
    truth = describe(grid, substrate.labels, cell_permeability=substrate.permeability)
    volumes, _, covariances = cell_covariances(grid, substrate.labels)
    truth["shape_tensor"] = np.einsum("k,kij->ij", volumes, covariances) / volumes.sum()
    smallest = np.linalg.eigvalsh(covariances)[:, 0]
    truth["min_width"] = float(2 * np.sqrt(5 * np.clip(smallest, 0, None)).min())
    return truth


@functools.lru_cache(maxsize=64)
def _box_grid(side, resolution, boundary):
    return TetGrid.bcc(side, resolution, boundary=boundary)


@functools.lru_cache(maxsize=64)
def section_grid(side, resolution):
    """The triangular section of ``side`` um and ``resolution`` edges
    across, built once (the priors' draws share their grids)."""
    return SectionGrid.triangular(side, resolution)


def unit_fibre_axis(axis, families):
    """``fibre_axis`` as a tuple of 3 floats of unit length, or an error
    naming the fix."""
    if "axon" not in families:
        raise ValueError(
            f"fibre_axis sets the direction of 'axon' fibres, and families "
            f"{families} has none; add 'axon' or remove fibre_axis."
        )
    try:
        vector = np.asarray(axis, dtype=np.float64).reshape(3)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"fibre_axis must be a direction (x, y, z), got {axis!r}."
        ) from err
    norm = float(np.linalg.norm(vector))
    if not (np.all(np.isfinite(vector)) and norm > 0):
        raise ValueError(
            f"fibre_axis must be a finite, non-zero direction (x, y, z), got {axis!r}."
        )
    return tuple(float(v) for v in vector / norm)


def _within(value, bounds):
    return bounds[0] * (1 - 1e-9) <= value <= bounds[1] * (1 + 1e-9)


def plain_value(value):
    """A setting as a plain value (tuples as lists, numpy scalars as
    Python's) for descriptions and cache keys."""
    if isinstance(value, tuple):
        return [plain_value(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value
