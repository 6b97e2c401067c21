"""The prior of the amortised posterior: random tissue, simulated by the package.

A :class:`TissuePrior` says what tissue a voxel may hold (cell sizes, counts,
restricted fractions, membrane permeabilities, diffusivities, cell shapes);
:meth:`TissuePrior.simulator` binds it to an acquisition protocol, and the
:class:`PriorSimulator` draws substrates from it, simulates their noise-free
signals with :func:`dipy_spinverse.simulate` and describes them with
:func:`dipy_spinverse.geometry.describe`: the training set of the posterior
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

import copy
import functools
import math
import os
import pathlib
import time
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import numpy as np
import torch
from dipy.utils.logging import logger
from tqdm.auto import tqdm

from ..checks import (
    check_device,
    check_diffusivity,
    check_int,
    check_number,
    check_range,
)
from ..clusters import open_cluster, run_chunks
from ..geometry.descriptors import DESCRIPTORS, cell_covariances, describe
from ..geometry.substrates import (
    FIBRE_DIRECTIONS,
    KINDS,
    PACKED_KINDS,
    packed_substrate,
    random_substrate,
)
from ..sim.forward import converged_substeps, simulate
from ..sim.grid import TetGrid
from ..sim.sections import SectionGrid
from ..sim.sequences import as_protocol
from .checkpoint import SimulationCheckpoint

__all__ = [
    "TissuePrior",
    "PriorSimulator",
    "Draw",
    "FAMILIES",
    "ALL_FAMILIES",
    "WHITE_MATTER",
    "BOUNDARIES",
    "SIMULATION_ENGINES",
    "simulate_batch",
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
#: Where a :class:`PriorSimulator` simulates: this process or a cluster.
SIMULATION_ENGINES = ("serial", "ray", "dask")
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
class TissuePrior:
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
            set_(self, "fibre_axis", _unit_axis(self.fibre_axis, self.families))
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
            return _section_grid(float(side), self.resolution)
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
            grid = _section_grid(float(side), resolution).oriented(axis)
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

    def description(self):
        """The prior's fields as a dict of plain values (cache keys, reports)."""
        described = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.init and not (f.name in _KEYED_WHEN_SET and value is None):
                described[f.name] = _plain(value)
        return described


class PriorSimulator:
    """Signals and descriptors of tissue drawn from a :class:`TissuePrior`.

    Parameters
    ----------
    prior : TissuePrior
    protocol : Protocol or GradientTable
        The acquisitions (with timing), in the order of the data.
    dtype : torch.dtype
        Of the simulation (float64 default).
    method : str
        The simulator's engine (:func:`dipy_spinverse.simulate`).
    batch_size : int
        Substrates simulated in one call.
    time_tolerance : float or None
        Largest time-discretisation error allowed in a signal (a fraction of
        the b = 0 signal). On periodic patches the Magnus sub-steps are then
        chosen per patch side by measurement: the first substrates of a side
        are simulated with the sub-steps of a coarse phase step (3.2 rad),
        then with twice, four times, ... as many, and the first count whose
        signals differ from the next one's by less than ``time_tolerance`` is
        kept (the error falls ~8x per doubling, so the difference bounds it).
        The phase criterion alone cannot do this: it does not see stiffness,
        and on patches of 1-2 um cells its default erred by ~1e-2. Default
        1e-3, a tenth of the noise at SNR 100. ``None``: the simulator's
        default sub-steps everywhere.
    device : str or torch.device
        Where the simulations run: ``"cpu"`` (default) or ``"cuda"``
        (``"cuda:1"``, ...). The signals come back as numpy arrays either
        way, and do not depend on the device beyond rounding.
    engine : {"serial", "ray", "dask"}
        ``"serial"`` simulates in this process. ``"ray"`` and ``"dask"``
        send each batch of ``batch_size`` draws to a worker of a cluster
        (:func:`~dipy_spinverse.clusters.open_cluster`): the time steps of
        each patch side are measured here first, on its first draws, then
        the batches run on the workers, the same batches a serial run
        simulates, so the signals are identical to a serial run's with the
        same draws; the checkpoint of :meth:`simulate_draws` takes each batch
        as it comes back. A training too large for one machine runs so on a
        multi-node cluster (``ray start --head`` on one node, ``ray start
        --address=<head>:6379`` on the others, then ``address``).
    address : str or distributed.Client, optional
        The cluster of ``engine`` (as
        :func:`~dipy_spinverse.clusters.open_cluster`: a Ray address,
        ``"auto"`` or ``"local"``; a Dask scheduler address or ``Client``);
        default: the one of this process, else ``RAY_ADDRESS`` (Ray), else a
        local one of ``n_workers``.
    n_workers : int, optional
        Workers of a local cluster started here (default: every core).
    """

    # The coarse phase step (rad) whose sub-steps are doubled until converged.
    PHASE_STEP = 3.2
    MAX_SUBSTEPS = 256
    # Substrates of a patch side simulated twice to measure the error.
    _PILOT = 2

    def __init__(
        self,
        prior,
        protocol,
        *,
        dtype=torch.float64,
        method="auto",
        batch_size=64,
        time_tolerance=1e-3,
        device="cpu",
        engine="serial",
        address=None,
        n_workers=None,
    ):
        if not isinstance(prior, TissuePrior):
            raise TypeError(f"prior must be a TissuePrior, got {type(prior).__name__}.")
        self.prior = prior
        self.protocol = as_protocol(protocol)
        self.dtype = dtype
        self.method = method
        self.batch_size = check_int(batch_size, "batch_size", 1)
        if time_tolerance is not None:
            time_tolerance = check_number(time_tolerance, "time_tolerance", minimum=0.0)
        self.time_tolerance = time_tolerance
        self.device = check_device(device)
        if engine not in SIMULATION_ENGINES:
            raise ValueError(
                f"engine must be one of {SIMULATION_ENGINES} (where the draws are "
                f"simulated), got {engine!r}."
            )
        if address is not None and engine == "serial":
            raise ValueError(
                f"address={address!r} is the cluster of engine='ray' or 'dask'; "
                "pass one of those engines, or leave address out."
            )
        self.engine, self.address = engine, address
        self.n_workers = check_int(
            os.cpu_count() if n_workers is None else n_workers, "n_workers", 1
        )
        #: Per box (side, boundary, section): (Magnus sub-step multiplier,
        #: measured time error).
        self.measured_substeps = {}

    def sample(
        self, n, *, seed, progress=False, reference_resolution=None, checkpoint=None
    ):
        """``n`` noise-free signals and their true descriptors.

        Draw ``i`` depends only on ``seed`` and ``i`` (the ``i``-th child of
        ``numpy.random.SeedSequence(seed)``), not on ``n``. Its signal does
        too, to within ``time_tolerance``: the sub-steps of a patch side are
        measured on the first draws of that side and then kept by this
        simulator (``measured_substeps``).

        Parameters
        ----------
        n : int
        seed : int
        progress : bool
            A progress bar over the draws and the simulations.
        reference_resolution : int, optional
            Describe the tissue as a grid of this many cubes per side
            rasterises it (:meth:`TissuePrior.draw_pair`), closer to the
            tissue the cells were drawn as than the prior's own grid; the
            signals stay the prior grid's.
        checkpoint : path-like, optional
            Keep the signals in this ``.npz`` file as they are simulated, and
            resume from it (:meth:`simulate_draws`).

        Returns
        -------
        signals : ndarray (n, n_acquisitions)
            Normalised to the signal at time 0 (1 at b = 0), in protocol
            order.
        truth : dict of ndarray
            Each of :data:`~dipy_spinverse.geometry.DESCRIPTORS` (length
            ``n``; ``orientation`` (n, 3)), ``shape_tensor`` (n, 3, 3),
            ``diffusivity`` (mm^2/s), ``box_size`` (um), ``boundary`` and
            ``family``.
        """
        draws, references = self._draws(n, seed, reference_resolution, progress)
        signals = self.simulate_draws(draws, progress=progress, checkpoint=checkpoint)
        return signals, _truth(draws if references is None else references)

    def sample_pairs(
        self, n, *, reference_resolution, seed, progress=False, checkpoint=None
    ):
        """Draws simulated on the prior's grid and on a finer one.

        Each draw is rasterised on its patch's grid and on a grid of
        ``reference_resolution`` cubes per side
        (:meth:`TissuePrior.draw_pair`) and simulated on both (each grid
        with its own measured time steps). The difference of the signals is
        the prior grid's approximation error (Kaipio and Somersalo), which
        :class:`~dipy_spinverse.posterior.TrainingOptions` can model; the
        finer signals are held-out data closer to tissue than the training
        set's.

        Parameters
        ----------
        n : int
        reference_resolution : int
            Cubes per side of the reference grid, above the prior's.
        seed : int
        progress : bool
        checkpoint : path-like, optional
            Keep the prior grid's signals in this ``.npz`` file as they are
            simulated (the reference grid's beside it, ``<stem>-reference.npz``),
            and resume from them (:meth:`simulate_draws`).

        Returns
        -------
        signals : ndarray (n, n_acquisitions)
            On the prior's grid.
        reference_signals : ndarray (n, n_acquisitions)
            The same tissue on the reference grid.
        reference_truth : dict of ndarray
            Its descriptors on the reference grid (as :meth:`sample`).
        """
        draws, references = self._draws(n, seed, reference_resolution, progress)
        reference = PriorSimulator(
            replace(self.prior, resolution=reference_resolution),
            self.protocol,
            dtype=self.dtype,
            method=self.method,
            batch_size=self.batch_size,
            time_tolerance=self.time_tolerance,
            device=self.device,
        )
        fine_checkpoint = None
        if checkpoint is not None:
            checkpoint = pathlib.Path(checkpoint)
            fine_checkpoint = checkpoint.with_name(f"{checkpoint.stem}-reference.npz")
        signals = self.simulate_draws(draws, progress=progress, checkpoint=checkpoint)
        fine = reference.simulate_draws(
            references, progress=progress, checkpoint=fine_checkpoint
        )
        return signals, fine, _truth(references)

    def _draws(self, n, seed, reference_resolution, progress):
        """Draws of the prior, and of the same tissue at a finer resolution."""
        n = check_int(n, "n", 1)
        if reference_resolution is not None:
            reference_resolution = check_int(
                reference_resolution,
                "reference_resolution",
                self.prior.resolution + 1,
            )
        children = np.random.SeedSequence(int(seed)).spawn(n)
        pairs = [
            self.prior.draw_pair(np.random.default_rng(child), reference_resolution)
            for child in tqdm(children, desc="Drawing substrates", disable=not progress)
        ]
        draws = [p[0] for p in pairs]
        if reference_resolution is None:
            return draws, None
        return draws, [p[1] for p in pairs]

    def seconds_per_draw(self, *, seed, n_draws=200, per_box=2):
        """The mean simulation time of a draw of the prior, in seconds.

        A draw's cost depends on its patch (small patches are stiff: up to
        ~50x a large one's), so a few timed draws say little. ``n_draws``
        draws (no simulation) count how often each patch comes; each patch
        is timed on ``per_box`` of its draws, after its sub-steps are
        measured (kept by this simulator, as a training would measure them
        on its first draws). On a GPU a batch costs about as much whatever
        its size up to ``batch_size`` (its kernels are launch-bound), so
        there each patch is timed on all its draws up to ``batch_size``:
        timed on 2 draws a patch, the default prior's training set was
        announced at 23.9 min on an H200 and simulated in 2 min; timed so,
        11.8 ms a draw are announced for 6.3 measured.

        Parameters
        ----------
        seed : int
        n_draws, per_box : int

        Returns
        -------
        float
        """
        draws, _ = self._draws(n_draws, seed, None, False)
        if self.device.type == "cuda":
            per_box = max(per_box, self.batch_size)
        total = 0.0
        for rows in _boxes(draws).values():
            timed = [draws[i] for i in rows[:per_box]]
            if self.time_tolerance is not None:
                self.simulate_draws(timed)  # measures the box's sub-steps
            start = time.perf_counter()
            self.simulate_draws(timed)
            total += (time.perf_counter() - start) / len(timed) * len(rows)
        return total / len(draws)

    def simulate_draws(self, draws, *, progress=False, checkpoint=None):
        """Noise-free signals (n, n_acquisitions) of draws of the prior
        (:meth:`TissuePrior.draw`), patch side by patch side.

        The time steps of each patch side are measured on its first draws
        (:attr:`time_tolerance`), then its draws are simulated in batches of
        ``batch_size``, here or on the workers of ``engine``.

        Parameters
        ----------
        draws : sequence of Draw
        progress : bool
        checkpoint : path-like, optional
            An ``.npz`` file that keeps the signals as they are simulated
            (:class:`~dipy_spinverse.posterior.checkpoint.SimulationCheckpoint`,
            written every minute, when interrupted and when done); a later
            call on the same draws resumes from it.
        """
        n = len(draws)
        signals = np.empty((n, len(self.protocol)))
        done = np.zeros(n, dtype=bool)
        kept, n_restored = None, 0
        if checkpoint is not None:
            kept = SimulationCheckpoint(checkpoint, draws, len(self.protocol))
            n_restored = kept.restore(signals, done, self.measured_substeps)
        bar = tqdm(total=n, initial=n_restored, desc="Simulating", disable=not progress)

        def finished(rows, result):
            signals[rows] = result
            done[rows] = True
            bar.update(len(rows))
            if kept is not None:
                kept.save(signals, done, self.measured_substeps)

        try:
            batches = []
            for box, rows in _boxes(draws).items():
                rows = [i for i in rows if not done[i]]
                if (
                    rows
                    and self.time_tolerance is not None
                    and box not in self.measured_substeps
                ):
                    grid = self.prior.grid(box[0], box[1], section=box[2])
                    pilot = rows[: self._PILOT]
                    finished(pilot, self._measure_substeps(box, grid, draws, pilot))
                    rows = rows[len(pilot) :]
                for start in range(0, len(rows), self.batch_size):
                    batches.append((box, rows[start : start + self.batch_size]))
            self._run(batches, draws, finished)
        finally:
            bar.close()
            if kept is not None and n_restored < n:
                # Also when complete: a training that fails after its
                # simulations reruns without them.
                kept.save(signals, done, self.measured_substeps, force=True)
        return signals

    def _run(self, batches, draws, finished):
        """Simulate ``batches`` of (box, rows) here or on the cluster,
        calling ``finished(rows, signals)`` as each comes back."""
        if self.engine == "serial":
            for box, rows in batches:
                finished(rows, simulate_batch(self, self._task(box, draws, rows)))
            return
        with open_cluster(
            self.engine, self.address, n_workers=self.n_workers
        ) as cluster:
            run_chunks(
                cluster,
                simulate_batch,
                self,
                batches,
                load=lambda batch: self._task(batch[0], draws, batch[1]),
                done=lambda batch, result: finished(batch[1], result),
                gpu=self.device.type == "cuda",
            )

    def _task(self, box, draws, rows):
        """What a worker needs to simulate ``rows``: the box, their draws
        and the box's sub-steps."""
        substeps = self.measured_substeps.get(box, (1, None))[0]
        return box, [draws[i] for i in rows], substeps

    def _simulate(self, grid, draws, rows, box=None, *, substeps=None):
        if substeps is None:
            substeps = self.measured_substeps.get(box, (1, None))[0]
        kappa = np.stack([draws[i].substrate.face_permeability for i in rows])
        diffusivity = np.array([draws[i].diffusivity for i in rows])[:, None]
        axes = None
        if isinstance(grid, SectionGrid):
            axes = np.stack([draws[i].axis for i in rows])
        with torch.no_grad():
            out = simulate(
                grid,
                kappa,
                self.protocol,
                diffusivity=np.repeat(diffusivity, grid.n_cells, axis=1),
                dtype=self.dtype,
                method=self.method,
                phase_step=None if self.time_tolerance is None else self.PHASE_STEP,
                substeps=substeps,
                axes=axes,
                device=self.device,
            )
        return out.cpu().numpy()

    def _measure_substeps(self, box, grid, draws, rows):
        """Double the Magnus sub-steps of ``rows`` until their signals change
        by less than ``time_tolerance`` (:func:`~dipy_spinverse.sim.forward.
        converged_substeps`); keep that count for the box (side, boundary)
        and return the rows' signals at it (as every other row of the box)."""
        substeps, signals, error = converged_substeps(
            lambda n: self._simulate(grid, draws, rows, substeps=n),
            self.time_tolerance,
            max_substeps=self.MAX_SUBSTEPS,
        )
        self.measured_substeps[box] = (substeps, error)
        if error > self.time_tolerance:
            logger.warning(
                "Prior boxes of side %.3g um (%s): time steps still change the "
                "signals by %.2g at %d Magnus sub-steps, above time_tolerance "
                "%.2g; simulate in float64 or raise cell_diameter's lower bound.",
                box[0],
                box[1],
                error,
                substeps,
                self.time_tolerance,
            )
        return signals

    def __repr__(self):
        return f"PriorSimulator({self.prior!r}, n_acquisitions={len(self.protocol)})"


def simulate_batch(simulator, task, device=None):
    """Signals of one batch of draws (a task of :meth:`PriorSimulator.
    simulate_draws`, run in this process or on a cluster's worker).

    Parameters
    ----------
    simulator : PriorSimulator
    task : tuple
        The patch (side, boundary, section), the draws, and the Magnus
        sub-step multiple of that patch.
    device : torch.device, optional
        A worker's own GPU (Dask); default the simulator's device.

    Returns
    -------
    ndarray (len(draws), n_acquisitions)
    """
    box, draws, substeps = task
    if device is not None:
        simulator = copy.copy(simulator)
        simulator.device = torch.device(device)
    grid = simulator.prior.grid(box[0], box[1], section=box[2])
    return simulator._simulate(grid, draws, range(len(draws)), box, substeps=substeps)


def _described_fully(truth):
    """Whether every descriptor of :data:`_POSITIVE` is finite and > 0."""
    return all(math.isfinite(truth[name]) and truth[name] > 0 for name in _POSITIVE)


def _boxes(draws):
    """Indices of ``draws`` by patch (side, boundary, section): the draws one
    grid simulates."""
    by_box = {}
    for i, draw in enumerate(draws):
        by_box.setdefault((draw.side, draw.boundary, draw.axis is not None), []).append(
            i
        )
    return by_box


def _truth(draws):
    """The descriptors of draws, stacked, with what else a draw holds."""
    truth = _stack([d.descriptors for d in draws])
    truth["diffusivity"] = np.array([d.diffusivity for d in draws])
    truth["box_size"] = np.array([d.side for d in draws])
    truth["boundary"] = np.array([d.boundary for d in draws])
    truth["family"] = np.array(
        ["axon" if d.axis is not None else d.substrate.kinds[0] for d in draws]
    )
    return truth


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
def _section_grid(side, resolution):
    return SectionGrid.triangular(side, resolution)


def _stack(rows):
    keys = [k for k in rows[0] if k in DESCRIPTORS or k == "shape_tensor"]
    return {k: np.array([r[k] for r in rows]) for k in keys}


def _unit_axis(axis, families):
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


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value
