"""A bundle of myelinated axons in a periodic cross-section.

White matter as histology sees it: tens of axons whose inner diameters
follow a right-skewed (gamma) distribution, each wrapped in a myelin sheath
of its own g-ratio (inner over outer diameter), packed in the space between
them. :func:`axon_bundle` draws one into a
:class:`~dipy_spinverse.sim.sections.SectionGrid`; the :class:`AxonBundle`
it returns holds each grid cell's compartment (the extra-axonal space, an
axon's inside, a sheath), the permeability of every edge, and the
descriptors histology reports (the MR-effective diameter, the mean
diameter, the fractions, the aggregate g-ratio). With per-compartment
diffusivities, T2s and water densities (:meth:`AxonBundle.per_cell`) it is
what :func:`dipy_spinverse.simulate` takes.

Packing. The outer discs (axon and sheath) are placed uniformly at random
in a square whose side makes their areas fill the drawn fibre fraction,
then pushed apart pair by pair (the nearest periodic images) until no two
overlap: a soft-disc relaxation, which reaches the fibre fractions of white
matter (0.5-0.8) where random sequential addition jams near 0.55.

Membranes. Every sheath has a membrane on each side: the axon's (inner)
and the sheath's outer surface, both of the axon's drawn permeability.
Water crossing an edge passes every membrane between the two regions: from
an axon into its own sheath one, from a sheath to the extra-axonal space
one, from an axon straight into the extra-axonal space (where the grid is
too coarse to hold the sheath there) two, in series.

Descriptors are those of the rasterised tissue (the simulated one): an
axon's diameter is its cells' equivalent-circle diameter, its sheath's
g-ratio ``sqrt(A_axon / (A_axon + A_sheath))``; a sub-grid axon's are its
drawn discs'.

Sub-grid axons (``resolve_above``). Resolving the smallest axons and their
sheaths needs a fine, stiff grid, yet their water barely moves across the
fibres. An axon thinner than ``resolve_above`` is not rasterised: the grid
cells whose circumcentre its outer disc covers are removed (the
extra-axonal water flows around it), and its water becomes pools of a
:class:`~dipy_spinverse.sim.pools.PooledSection`, each with its
compartment's diffusivity (along the fibres, and within its links), T2
and density: the sheath's (area ``pi (r_o^2 - r_i^2)``, compartment
``myelin``, at the fibre's centre) and the axon's inside, as four pools
(its quarters, ``intra``) on a ring around the centre. The myelin is a
pool of its own, not folded into the links, so that its water and its
fast T2 count exactly.

The ring is the inside's restricted diffusion across the fibre, reduced
to the one mode a gradient sees most. In a disc of radius ``R`` the
gradient couples the uniform magnetisation to the first angular Neumann
modes (``J_1(a r / R) cos(theta)``, ``a = 1.8412`` the first root of
``J_1'``) with weight ``2 R^2 / (a^2 (a^2 - 1))``, 98.74 % of ``<x^2> =
R^2 / 4``, and they relax at ``D a^2 / R^2``. Four pools of a quarter of
the water each, at radius ``rho = R sqrt(4 / (a^2 (a^2 - 1)))`` (0.703 R)
so that their ``<x^2> = rho^2 / 2`` is that weight, joined round the ring
by open links whose conductance makes the ring's angular mode relax at
``D a^2 / R^2``, have exactly that mode: their Gaussian-phase attenuation
is the cylinder series' first term (Neuman 1974, van Gelderen 1994),
within 1.26 % of the whole series' log-signal for narrow pulses and 0.13 %
for long ones (``tests/geometry/test_bundle.py``). Their other modes do
not couple to the gradient at second order; beyond the Gaussian phase
(``q R`` near 1) the ring is a four-site jump model, not the cylinder's
diffraction. An axon whose ring would relax faster than the grid's
fastest cell exchanges (``a^2 / R^2`` above the largest ``sum_f (A_f /
L_f) / V`` over the grid's cells, at unit diffusivity: ``R`` below about
half the spacing of the triangular grid) stays one pool at its centre, a
stick: its ring would set the solver's stiffness (a cord draw took ten
times longer), and what the stick leaves out, the cylinder's attenuation,
falls as ``R^4`` (``(7 / 96) R^4 q^2 / (D delta)`` for long pulses: 1e-4
of the axon's signal at R = 0.25 um, q = 1.8 um^-1, delta 8 ms, D 1.2
um^2/ms, the cat cord's strongest). The links:

- every kept extra-axonal cell across an edge of the fibre's removed cells
  (its *contacts*; the nearest extra-axonal cell when it covers none) ->
  sheath: the extra-axonal path from the cell's circumcentre to the fibre's
  surface, the outer membrane over the cell's share of the perimeter ``2
  pi r_o`` (in proportion to its edges' length along the fibre: the
  circle's perimeter, not the staircase's, which is 1.2-1.35 times longer
  at any refinement), then the sheath's radial diffusion from ``r_o`` in to
  ``r_m = sqrt(r_i r_o)``: distance ``r_o ln(r_o / r_m)`` (the exact steady
  resistance of that shell, ``ln(r_o / r_m) / (2 pi D_m rho_m)``, over the
  whole perimeter);
- sheath -> each quarter of the axon (or its one pool): the shell from
  ``r_m`` in to ``r_i`` (distance ``r_i ln(r_m / r_i)``), the inner
  membrane over a quarter of ``2 pi r_i`` (the whole), then the axon's
  inside: distance ``r_i / 4``, the linear-driving-force resistance of a
  cylinder (exchange rate ``8 D / r_i^2``, Glueckauf's; its slowest
  radial mode relaxes at ``14.7 D / r_i^2``);
- each quarter -> the next round the ring (no membrane).

In series (the contacts in parallel) the links give
:meth:`AxonBundle.sheath_conductance` plus that inner term and the
extra-axonal paths, at equal densities inside and out. Each contact's link
carries the displacement from its cell to the fibre's centre, so water
that enters the fibre on one side and leaves on another has crossed it: a
permeable fibre is a path across the section, as a resolved one is (in a
bundle of fibre fraction 0.7 that path matters: without it the sub-grid
bundle's signal was 0.07 above the resolved one on the demo protocol).
The sheath -> quarter links carry the displacement from the fibre's
centre to each quarter (0.7 ``r_i``), where the water crosses near the
membrane: an exchange-driven phase of the order of ``(q r_i)^2`` times
the fraction exchanged during the sequence. What the model leaves out:
the axon's other in-plane modes (above), the sheath's in-plane diffusion
(its water going round the ring: ~3e-4 of the signal for a 0.8 um axon at
b = 3000 s/mm^2 and D_myelin 0.27 um^2/ms; T2_myelin removes most of it
by the echo), and the sheath's resistance to water going round it (the
sheath pool is well mixed: a short circuit between contacts through the
outer membrane). The removed cells' area differs from the fibre's disc
(staircase); the difference is taken from the extra-axonal cells near the
fibre (within ``r_o`` plus 1.5 cells, and its contacts), in proportion to
their areas, so that the section's water is the drawn tissue's exactly.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ...checks import check_generator, check_int, check_number, check_positive
from ...sim.analytic import cylinder_roots
from ...sim.pools import Links, PooledSection
from ...sim.sections import SectionGrid

__all__ = [
    "COMPARTMENTS",
    "MAX_FIBRE_FRACTION",
    "AxonBundle",
    "UnheldBundleError",
    "axon_bundle",
    "bundle_side",
    "effective_diameter_of",
]

#: The compartments of a bundle, by their index in :attr:`AxonBundle.compartment`.
COMPARTMENTS = ("extra", "intra", "myelin")

#: The largest fibre fraction :func:`axon_bundle` packs (the soft-disc
#: relaxation packs no denser); the docstrings here and in
#: :class:`~dipy_spinverse.posterior.white_matter.WhiteMatterPrior` say 0.85.
MAX_FIBRE_FRACTION = 0.85

# Relaxation of the soft-disc packing: iterations, and the overlap (relative
# to the smallest outer radius) below which two discs count as apart.
_PUSH_ITERATIONS = 4000
_PUSH_TOL = 1e-6
# Sub-grid axons: the extra-axonal cells near a fibre (within its outer
# radius plus this many spacings) give or take the area its removed cells
# lack or exceed; no kept cell may keep less than this share of its area.
_RING_SPACINGS = 1.5
_MIN_AREA_SHARE = 0.25
# A sub-grid axon's inside is this many pools on a ring (its quarters): the
# fewest whose first angular mode is isotropic in the plane. The disc's
# first angular Neumann mode: the first root of J_1', and the ring's radius
# over the disc's that gives the ring the mode's share of <x^2>.
_QUADRANTS = 4
_ROOT = float(cylinder_roots(1)[0])
_RING_RADIUS = float(np.sqrt(4 / (_ROOT**2 * (_ROOT**2 - 1))))


class UnheldBundleError(ValueError):
    """A drawn bundle the grid cannot hold (an axon on no cell, discs that
    cannot be packed apart, a sub-grid fibre whose area its neighbours
    cannot give): a fault of this draw on this grid, which another draw or
    a finer grid may not have; not a bad argument."""


@dataclass(frozen=True, eq=False)
class AxonBundle:
    """Myelinated axons drawn into a section (built by :func:`axon_bundle`).

    Attributes
    ----------
    centres : ndarray (n_axons, 2)
        Axon centres in the section's plane coordinates, um.
    inner_diameters, outer_diameters : ndarray (n_axons,)
        The drawn discs' diameters (axon; axon and sheath), um.
    axon : ndarray of int (grid.n_cells,)
        ``k`` in axon ``k``'s inside or sheath (1 .. n_axons), 0 outside
        (a sub-grid axon's pools too).
    compartment : ndarray of int (grid.n_cells,)
        Index into :data:`COMPARTMENTS`: 0 extra-axonal, 1 intra-axonal,
        2 myelin.
    permeability : ndarray (n_axons,)
        Each axon's membrane permeability, m/s (both sides of its sheath).
    face_permeability : ndarray (grid.n_faces,)
        Every edge's (and link's) permeability for
        :func:`dipy_spinverse.simulate` (``inf``: no membrane).
    axon_areas, sheath_areas : ndarray (n_axons,)
        Rasterised areas of each axon's inside and sheath, um^2 (per um of
        fibre); a sub-grid axon's are its drawn discs'.
    grid : SectionGrid or PooledSection
        What to simulate on: the section the bundle was drawn in, or, with
        sub-grid axons, that section with their cells removed and their
        pools attached (:class:`~dipy_spinverse.sim.pools.PooledSection`).
    subgrid : ndarray of bool (n_axons,)
        The axons held as pools (thinner than ``resolve_above``).
    """

    centres: np.ndarray
    inner_diameters: np.ndarray
    outer_diameters: np.ndarray
    axon: np.ndarray
    compartment: np.ndarray
    permeability: np.ndarray
    face_permeability: np.ndarray
    axon_areas: np.ndarray
    sheath_areas: np.ndarray
    grid: object = None
    subgrid: np.ndarray = None

    @property
    def n_axons(self):
        """Number of axons (each holds at least one grid cell)."""
        return len(self.permeability)

    def per_cell(self, extra, intra, myelin):
        """One value per grid cell from one per compartment (diffusivity,
        T2, water density, ...).

        Parameters
        ----------
        extra, intra, myelin : float

        Returns
        -------
        ndarray (grid.n_cells,)
        """
        return np.array([extra, intra, myelin], dtype=float)[self.compartment]

    @property
    def diameters(self):
        """Each axon's rasterised inner diameter (equivalent circle), um."""
        return 2 * np.sqrt(self.axon_areas / np.pi)

    @property
    def g_ratios(self):
        """Each axon's rasterised g-ratio, ``sqrt(A_axon / (A_axon +
        A_sheath))``."""
        return np.sqrt(self.axon_areas / (self.axon_areas + self.sheath_areas))

    def descriptors(self, area):
        """What histology reports of the bundle (rasterised).

        Parameters
        ----------
        area : float
            The section's area, um^2.

        Returns
        -------
        dict
            ``effective_diameter`` (:func:`effective_diameter_of`, um),
            ``mean_diameter`` (um), ``intra_axonal_fraction`` (axons' share
            of the space outside myelin, histology's ``fr / (1 - MVF)``),
            ``myelin_fraction`` (MVF, the sheaths' share of the section),
            ``fibre_fraction`` (axons and sheaths), ``g_ratio`` (aggregate,
            ``sqrt(1 - MVF / FVF)``), ``n_axons``.
        """
        inside = self.axon_areas.sum()
        myelin = self.sheath_areas.sum()
        fibre = (inside + myelin) / area
        return dict(
            effective_diameter=effective_diameter_of(self.diameters),
            mean_diameter=float(self.diameters.mean()),
            intra_axonal_fraction=float(inside / (area - myelin)),
            myelin_fraction=float(myelin / area),
            fibre_fraction=float(fibre),
            g_ratio=float(np.sqrt(1 - (myelin / area) / fibre)),
            n_axons=self.n_axons,
        )

    def sheath_conductance(self, *, myelin_diffusivity, myelin_density):
        """Each axon's water conductance through its sheath (um^2/us).

        Per um of fibre, to the extra-axonal space: the inner membrane, the
        sheath's radial diffusion and the outer membrane in series, for the
        drawn discs (the exact steady flux through a cylindrical shell)::

            1 / G = 1 / (2 pi r_i kappa) + ln(r_o / r_i) / (2 pi D_m rho_m)
                    + 1 / (2 pi r_o kappa)

        Parameters
        ----------
        myelin_diffusivity : float
            mm^2/s.
        myelin_density : float
            The sheath's water density relative to free water.

        Returns
        -------
        ndarray (n_axons,)
        """
        r_i = self.inner_diameters / 2
        r_o = self.outer_diameters / 2
        kappa = self.permeability
        with np.errstate(divide="ignore"):
            resistance = (
                1 / (2 * np.pi * r_i * kappa)
                + np.log(r_o / r_i) / (2 * np.pi * myelin_diffusivity * myelin_density)
                + 1 / (2 * np.pi * r_o * kappa)
            )
        return 1 / resistance


def effective_diameter_of(diameters):
    """The MR-effective diameter ``(<d^6> / <d^2>)^(1/4)`` (Burcaw 2015):
    what the diffusion signal of a spread of axon diameters weighs (the
    tail).

    Parameters
    ----------
    diameters : array_like

    Returns
    -------
    float
    """
    d = np.asarray(diameters, dtype=float)
    return float((np.mean(d**6) / np.mean(d**2)) ** 0.25)


def bundle_side(n_axons, mean_diameter, shape, g_ratio, fibre_fraction):
    """The side (um) of the square in which ``n_axons`` myelinated axons of
    gamma-distributed inner diameters (mean, shape ``k``) and g-ratio
    ``g_ratio`` fill ``fibre_fraction`` on average: ``E[d^2] = mean^2 (1 +
    1 / k)``, outer diameters ``d / g``.

    Parameters
    ----------
    n_axons : int
    mean_diameter : float
        Mean inner diameter, um.
    shape : float
        The gamma distribution's shape.
    g_ratio : float or (float, float)
        A value or a range (its mean is used).
    fibre_fraction : float

    Returns
    -------
    float
    """
    outer_sq = mean_diameter**2 * (1 + 1 / shape) / np.mean(g_ratio) ** 2
    return float(np.sqrt(n_axons * np.pi / 4 * outer_sq / fibre_fraction))


def axon_bundle(
    grid,
    *,
    rng,
    n_axons,
    mean_diameter,
    shape,
    g_ratio,
    fibre_fraction,
    permeability,
    resolve_above=None,
):
    """Myelinated axons of gamma-distributed diameters packed in a section.

    The discs are drawn, then scaled together so that they fill
    ``fibre_fraction`` of ``grid`` exactly: a section of :func:`bundle_side`
    keeps their diameters near the drawn ones.

    Parameters
    ----------
    grid : SectionGrid
        A periodic section (:meth:`SectionGrid.triangular
        <dipy_spinverse.sim.sections.SectionGrid.triangular>`), without pools.
    rng : None, int, SeedSequence, BitGenerator or numpy.random.Generator
        Anything :func:`numpy.random.default_rng` takes; a Generator is
        drawn from (it advances).
    n_axons : int
    mean_diameter : float
        Mean inner (axon) diameter of the gamma distribution, um.
    shape : float
        The gamma distribution's shape ``k`` (its coefficient of variation
        is ``1 / sqrt(k)``; histology of white matter gives about 2-6).
    g_ratio : float or (float, float)
        Inner over outer diameter: one value, or a range each axon's is
        drawn from uniformly.
    fibre_fraction : float
        Axons and sheaths' share of the section, in (0, 0.85].
    permeability : float or (float, float)
        Membrane permeability, m/s: one value, or a range each axon's is
        drawn from log-uniformly.
    resolve_above : float, optional
        Inner diameter (um) below which an axon is not rasterised but held
        as sub-grid pools (its sheath, and its inside on a ring: module
        documentation);
        None (the default), or no axon thinner: every axon is rasterised.
        The draw is the same either way (same ``rng``: same discs).

    Returns
    -------
    AxonBundle

    Raises
    ------
    ValueError
        Bad arguments (named, with the value given).
    UnheldBundleError
        A bundle the grid does not hold (a rasterised axon on no grid cell:
        use fewer or larger axons, a finer grid, or a larger
        ``resolve_above``; a sub-grid fibre whose area the cells around it
        cannot give: a finer grid; discs that cannot be packed apart: a
        lower ``fibre_fraction``). A ``ValueError``.
    """
    grid = _check_section(grid)
    rng = check_generator(rng)
    n = check_int(n_axons, "n_axons", 1)
    mean = check_positive(mean_diameter, "mean_diameter", "um", example="2.0")
    shape = check_positive(shape, "shape", example="4.0")
    fraction = check_number(fibre_fraction, "fibre_fraction")
    if not (0 < fraction <= MAX_FIBRE_FRACTION):
        raise ValueError(
            f"fibre_fraction must lie in (0, {MAX_FIBRE_FRACTION:g}] (discs pack "
            f"no denser here), got {fibre_fraction!r}."
        )
    if resolve_above is not None:
        resolve_above = check_positive(
            resolve_above, "resolve_above", "um", example="2.0 (or None)"
        )
    # Every argument is checked as given before anything is drawn or
    # transformed (a logarithm of 0 would report -inf, not the 0 passed).
    g_bounds = _value_or_range(g_ratio, "g_ratio", (0.0, 1.0), "(0.6, 0.8)")
    kappa_bounds = _value_or_range(
        permeability, "permeability", (0.0, np.inf), "(1e-5, 1e-4) m/s"
    )
    inner = rng.gamma(shape, mean / shape, n)
    g = _uniform(rng, g_bounds, n)
    kappa = np.exp(_uniform(rng, np.log(kappa_bounds), n))
    outer = inner / g
    # The drawn discs scaled together to fill the fraction in this section.
    scale = np.sqrt(fraction * grid.volume / (np.pi / 4 * np.sum(outer**2)))
    inner, outer = inner * scale, outer * scale
    centres = _packed_centres(grid, rng, outer / 2)
    thin = inner < (0.0 if resolve_above is None else resolve_above)
    if thin.any():
        return _with_subgrid(grid, centres, inner, outer, kappa, thin)
    axon, compartment = _rasterised(grid, centres, inner / 2, outer / 2)
    areas, sheaths = _areas(grid, axon, compartment, n)
    if np.any(areas == 0):
        raise UnheldBundleError(
            f"{int(np.sum(areas == 0))} of the {n} axons hold no cell of {grid!r} "
            "(their diameter is below its spacing); use fewer or larger axons or "
            "a finer grid."
        )
    return AxonBundle(
        centres=centres,
        inner_diameters=inner,
        outer_diameters=outer,
        axon=axon,
        compartment=compartment,
        permeability=kappa,
        face_permeability=_face_permeability(grid, axon, compartment, kappa),
        axon_areas=areas,
        sheath_areas=sheaths,
        grid=grid,
        subgrid=np.zeros(n, dtype=bool),
    )


def _areas(grid, axon, compartment, n):
    """Each of the ``n`` axons' rasterised inner and sheath areas (um^2)."""

    def area(of):
        weights = grid.cell_volumes * (compartment == of)
        return np.bincount(axon, weights=weights, minlength=n + 1)[1:]

    return area(1), area(2)


class _Covered(NamedTuple):
    """The grid cells the sub-grid fibres' outer discs cover: removed, their
    water the fibres' pools (module documentation)."""

    #: bool (n_cells,): covered by a fibre.
    removed: np.ndarray
    #: int (n_cells,): the axon whose disc covers each cell (-1: none).
    fibre: np.ndarray
    #: Per fibre, each cell's distance from its centre (um, nearest image).
    distances: list


class _Contacts(NamedTuple):
    """A sub-grid fibre's contacts: the kept extra-axonal cells its sheath
    exchanges water with (module documentation)."""

    #: The kept extra-axonal cell nearest the fibre's centre: its pools'
    #: host.
    host: int
    #: The contact cells, ascending.
    cells: np.ndarray
    #: Each contact's share of the fibre's perimeter (they sum to 1).
    shares: np.ndarray


class _Inside(NamedTuple):
    """The pools of sub-grid axons' insides and their links
    (:func:`_inside_pools`)."""

    #: Each pool's axon (an index into the sub-grid axons).
    axon: np.ndarray
    #: Each pool's area (um^2 per um of fibre).
    volumes: np.ndarray
    #: Each pool's place in the section's plane coordinates (um).
    places: np.ndarray
    #: Each pool to its axon's sheath pool, through the inner membrane.
    to_sheath: Links
    #: Each pool of a ring to the next one round it (open).
    round_ring: Links


def _with_subgrid(grid, centres, inner, outer, kappa, subgrid):
    """The bundle with the axons ``subgrid`` held as pools (module
    documentation); the others rasterised as without."""
    n = len(inner)
    inner_radius, outer_radius = inner / 2, outer / 2
    resolved = np.flatnonzero(~subgrid)
    axon, compartment = _rasterised(
        grid, centres[resolved], inner_radius[resolved], outer_radius[resolved]
    )
    axon = np.concatenate([[0], resolved + 1])[axon]  # the drawn axons' numbers
    areas, sheaths = _areas(grid, axon, compartment, n)
    lost = ~subgrid & (areas == 0)
    if np.any(lost):
        raise UnheldBundleError(
            f"{int(lost.sum())} of the {n} rasterised axons hold no cell of "
            f"{grid!r} (their diameter is below its spacing); use fewer or larger "
            "axons, a finer grid, or a larger resolve_above."
        )
    face_kappa = _face_permeability(grid, axon, compartment, kappa)
    fibres = np.flatnonzero(subgrid)
    covered = _covered_cells(grid, centres, outer_radius, compartment, fibres)
    extra = (compartment == 0) & ~covered.removed
    if not extra.any():
        raise UnheldBundleError(
            f"no extra-axonal cell of {grid!r} is left around the sub-grid axons; "
            "use a finer grid."
        )
    volumes = grid.cell_volumes.astype(float).copy()
    contacts = []
    for k, distance in zip(fibres, covered.distances, strict=True):
        mine = covered.fibre == k
        contacts.append(_contacts(grid, mine, distance, extra))
        _give_area(grid, volumes, outer_radius[k], mine, distance, extra, contacts[-1])
    kept = ~covered.removed
    if np.any(volumes[kept] < _MIN_AREA_SHARE * grid.cell_volumes[kept]):
        raise UnheldBundleError(
            f"the cells of {grid!r} around a sub-grid axon cannot give its area "
            "(its staircase differs from its disc by more than they hold); use a "
            "finer grid."
        )
    fibre_inner, fibre_outer = inner_radius[fibres], outer_radius[fibres]
    # The sheath's middle radius: its shell's resistance splits there
    # between the outer and the inner membranes' links.
    middle = np.sqrt(fibre_inner * fibre_outer)
    sheath_pools = grid.n_cells + np.arange(len(fibres))
    to_sheaths = _contact_links(
        grid, centres[fibres], fibre_outer, middle, contacts, sheath_pools
    )
    # Each axon's inside: its quarters on a ring (the disc's first angular
    # mode), or one pool (a stick) where that ring would be stiffer than the
    # grid it joins (module documentation).
    parts = np.where(_ROOT**2 / fibre_inner**2 <= _stiffest_rate(grid), _QUADRANTS, 1)
    inside = _inside_pools(
        fibre_inner,
        middle,
        centres[fibres],
        parts,
        sheath_pools,
        first=grid.n_cells + len(fibres),
    )
    hosts = np.array([contact.host for contact in contacts])
    links = Links.joined(to_sheaths, inside.to_sheath, inside.round_ring)
    pooled = PooledSection.attach(
        grid,
        pool_hosts=np.concatenate([hosts, hosts[inside.axon]]),
        pool_volumes=np.concatenate(
            [np.pi * (fibre_outer**2 - fibre_inner**2), inside.volumes]
        ),
        pool_positions=np.concatenate([centres[fibres], inside.places]),
        links=links.cells,
        link_areas=links.areas,
        link_distances=links.distances,
        removed=covered.removed,
        cell_volumes=volumes,
    )
    areas[fibres] = np.pi * fibre_inner**2
    sheaths[fibres] = np.pi * (fibre_outer**2 - fibre_inner**2)
    inside_axon = fibres[inside.axon]
    # The pooled grid's unknowns: its kept cells, the sheaths' pools (myelin,
    # 2), the insides' pools (intra, 1); its faces: the kept edges, then the
    # links in the order of `links`.
    return AxonBundle(
        centres=centres,
        inner_diameters=inner,
        outer_diameters=outer,
        axon=np.concatenate([axon[pooled.kept_cells], fibres + 1, inside_axon + 1]),
        compartment=np.concatenate(
            [
                compartment[pooled.kept_cells],
                np.full(len(fibres), 2),
                np.full(len(inside_axon), 1),
            ]
        ),
        permeability=kappa,
        face_permeability=np.concatenate(
            [
                face_kappa[pooled.kept_faces],
                np.repeat(kappa[fibres], [len(c.cells) for c in contacts]),
                kappa[inside_axon],
                np.full(len(inside.round_ring.cells), np.inf),
            ]
        ),
        axon_areas=areas,
        sheath_areas=sheaths,
        grid=pooled,
        subgrid=subgrid,
    )


def _covered_cells(grid, centres, outer_radius, compartment, fibres):
    """The extra-axonal cells whose circumcentre lies within the outer disc of
    a sub-grid axon of ``fibres`` (the first one's, where two discs reach
    it)."""
    removed = np.zeros(grid.n_cells, dtype=bool)
    fibre = np.full(grid.n_cells, -1)
    distances = []
    for k in fibres:
        distance = np.linalg.norm(
            grid.displacement2(grid.section_positions, centres[k]), axis=1
        )
        covered = (distance < outer_radius[k]) & (compartment == 0) & ~removed
        removed |= covered
        fibre[covered] = k
        distances.append(distance)
    return _Covered(removed=removed, fibre=fibre, distances=distances)


def _contacts(grid, mine, distance, extra):
    """A fibre's contacts (module documentation): the kept extra-axonal cells
    (``extra``) across an edge of its removed cells (``mine``), each with its
    share of those edges' length; the nearest one (``distance`` from its
    centre) when it covers none."""
    host = int(np.flatnonzero(extra)[np.argmin(distance[extra])])
    one, other = grid.face_cells.T
    # Edges out of the fibre: its cell on one side, a kept one on the other.
    out_of_one = mine[one] & extra[other]
    out_of_other = mine[other] & extra[one]
    touching = np.concatenate([other[out_of_one], one[out_of_other]])
    lengths = np.concatenate(
        [grid.face_areas[out_of_one], grid.face_areas[out_of_other]]
    )
    if len(touching) == 0:  # a fibre within one cell: its host
        touching, lengths = np.array([host]), np.array([1.0])
    cells, which = np.unique(touching, return_inverse=True)
    shares = np.bincount(which, weights=lengths) / lengths.sum()
    return _Contacts(host=host, cells=cells, shares=shares)


def _give_area(grid, volumes, radius, mine, distance, extra, contacts):
    """Take from ``volumes`` (in place) the area a fibre of outer ``radius``
    lacks, its disc less its removed cells' (``mine``) area (a negative lack
    is given), from the extra-axonal cells near it (within ``radius`` plus
    :data:`_RING_SPACINGS` spacings of its centre, and its ``contacts``), in
    proportion to their areas: the section's water is the drawn tissue's."""
    missing = np.pi * radius**2 - grid.cell_volumes[mine].sum()
    reach = radius + _RING_SPACINGS * grid.spacing
    near = extra & (distance < reach)
    near[contacts.cells] = True
    volumes[near] -= missing * grid.cell_volumes[near] / grid.cell_volumes[near].sum()


def _contact_links(grid, centres, outer, middle, contacts, sheath_pools):
    """Each fibre's contacts linked to its sheath's pool: the extra-axonal
    path from the contact's circumcentre to the fibre's surface, the outer
    membrane over the contact's share of the perimeter, then the sheath
    from ``outer`` in to ``middle`` (module documentation)."""
    counts = [len(contact.cells) for contact in contacts]
    cells = np.concatenate([contact.cells for contact in contacts])
    shares = np.concatenate([contact.shares for contact in contacts])
    radius = np.repeat(outer, counts)
    from_centre = np.linalg.norm(
        grid.displacement2(
            grid.section_positions[cells], np.repeat(centres, counts, 0)
        ),
        axis=1,
    )
    return Links(
        cells=np.stack([cells, np.repeat(sheath_pools, counts)], axis=1),
        areas=2 * np.pi * radius * shares,
        distances=np.stack(
            [
                np.maximum(from_centre - radius, 0.0),
                radius * np.log(radius / np.repeat(middle, counts)),
            ],
            axis=1,
        ),
    )


def _stiffest_rate(grid):
    """The grid's fastest exchange at unit diffusivity (um^-2): the largest
    ``sum_f (A_f / L_f) / V`` over its cells (open faces, path ``L_f``)."""
    per_face = grid.face_areas / grid.face_distances.sum(1)
    total = np.bincount(
        grid.face_cells.ravel(), np.repeat(per_face, 2), minlength=grid.n_cells
    )
    return float(np.max(total / grid.cell_volumes))


def _inside_pools(radius, middle, centres, parts, sheath_pools, *, first):
    """The pools of the insides of sub-grid axons of ``radius`` (um), each
    ``parts`` pools (one at its centre, or :data:`_QUADRANTS` on a ring),
    numbered from ``first``, and their links: to their sheath's pool
    (``sheath_pools``; the shell from ``middle`` in, the inner membrane,
    the inside's ``r / 4``) and round the ring (open; module
    documentation).

    Returns
    -------
    _Inside
    """
    axon = np.repeat(np.arange(len(radius)), parts)
    pool = first + np.arange(len(axon))
    on_ring = parts[axon]  # the pools of each one's axon (1: a stick)
    ringed = on_ring > 1
    # Each pool's place round its ring (0 .. on_ring - 1).
    place = np.arange(len(axon)) - np.repeat(np.cumsum(parts) - parts, parts)
    axon_radius = radius[axon]
    ring_radius = np.where(ringed, _RING_RADIUS * axon_radius, 0.0)
    angle = 2 * np.pi * (place + 0.5) / on_ring
    volume = np.pi * axon_radius**2 / on_ring
    following = np.where(place == on_ring - 1, pool - on_ring + 1, pool + 1)
    # A ring of n (on_ring) pools of volume V, rho (ring_radius) from the
    # centre, joined to its neighbours by conductance w, relaxes its first
    # angular mode at 2 w (1 - cos(2 pi / n)) / V, the disc of radius r at
    # D root^2 / r^2; an open link of path L (half the chord each side)
    # conducts D A / L.
    chord = (2 * ring_radius * np.sin(np.pi / on_ring))[ringed]
    cosine = np.cos(2 * np.pi / on_ring[ringed])
    return _Inside(
        axon=axon,
        volumes=volume,
        places=centres[axon]
        + ring_radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], -1),
        to_sheath=Links(
            cells=np.stack([sheath_pools[axon], pool], axis=1),
            areas=2 * np.pi * axon_radius / on_ring,
            distances=np.stack(
                [axon_radius * np.log(middle[axon] / axon_radius), axon_radius / 4],
                axis=1,
            ),
        ),
        round_ring=Links(
            cells=np.stack([pool[ringed], following[ringed]], axis=1),
            areas=_ROOT**2
            * volume[ringed]
            * chord
            / (2 * axon_radius[ringed] ** 2 * (1 - cosine)),
            distances=np.stack([chord, chord], axis=1) / 2,
        ),
    )


def _check_section(grid):
    """``grid``, which must be a periodic section without pools."""
    if isinstance(grid, SectionGrid) and not isinstance(grid, PooledSection):
        return grid
    pooled = (
        " (it holds sub-grid pools already: draw into the section it was built on)"
        if isinstance(grid, PooledSection)
        else ""
    )
    raise ValueError(
        "grid must be a periodic section, a SectionGrid without pools, e.g. "
        "SectionGrid.triangular(bundle_side(...), 48) from "
        f"dipy_spinverse.sim.sections; got {type(grid).__name__}{pooled}."
    )


def _value_or_range(value, name, limits, example):
    """``value`` (a number, or a ``(low, high)`` range) as ``(low, high)``
    floats strictly within ``limits``; the error shows ``value`` as given."""
    try:
        given = np.asarray(value)
        pair = np.broadcast_to(given.astype(float), (2,))
    except (TypeError, ValueError):
        pair = None  # not numbers, or not one or two of them
    # A string or a bool would convert to a number; neither is one here.
    if pair is None or given.dtype.kind not in "iuf":
        ok = False
    else:
        ok = bool(np.all(np.isfinite(pair)) and pair[0] <= pair[1])
    if not ok:
        raise ValueError(
            f"{name} must be a finite value or (low, high) with low <= high, e.g. "
            f"{example}, got {value!r}."
        )
    low, high = float(pair[0]), float(pair[1])
    if not (limits[0] < low and high < limits[1]):
        where = (
            f"be > {limits[0]:g}"
            if np.isinf(limits[1])
            else f"lie in ({limits[0]:g}, {limits[1]:g}) (exclusive)"
        )
        raise ValueError(f"{name} must {where}, e.g. {example}, got {value!r}.")
    return low, high


def _uniform(rng, bounds, n):
    """``n`` values: ``low`` repeated, or uniform in ``(low, high)``."""
    low, high = bounds
    return rng.uniform(low, high, n) if high > low else np.full(n, low)


def _packed_centres(grid, rng, radii):
    """Centres of non-overlapping discs of ``radii`` in the periodic square:
    uniform random, then overlapping pairs pushed apart along the line
    joining them (the nearest images), largest moves first, until none
    overlap."""
    n = len(radii)
    centres = rng.uniform(0, 1, (n, 2)) * grid.extent
    if n == 1:
        return centres
    reach = radii[:, None] + radii[None, :]
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    tol = _PUSH_TOL * radii.min()
    for _ in range(_PUSH_ITERATIONS):
        d = centres[None, :, :] - centres[:, None, :]  # (i, j): i -> j
        d -= grid.extent * np.round(d / grid.extent)
        dist = np.linalg.norm(d, axis=-1)
        overlap = np.where(upper, reach - dist, 0.0)
        if overlap.max() <= tol:
            return grid.wrap2(centres)
        # Each overlapping pair moves apart by its overlap (and a little
        # more, so the relaxation ends), split by the discs' areas.
        push = np.clip(overlap, 0, None) * 1.01
        push = push + push.T
        direction = d / np.where(dist > 0, dist, 1.0)[..., None]
        weight = radii[None, :] ** 2 / (radii[:, None] ** 2 + radii[None, :] ** 2)
        centres = centres - np.einsum("ij,ij,ijk->ik", push, weight, direction)
    raise UnheldBundleError(
        f"{n} discs could not be packed apart in the {grid.extent[0]:g} um "
        "section; lower fibre_fraction."
    )


def _rasterised(grid, centres, inner, outer):
    """Each grid cell's axon (0: none) and compartment, by its circumcentre."""
    points = grid.section_positions
    axon = np.zeros(grid.n_cells, dtype=np.int64)
    compartment = np.zeros(grid.n_cells, dtype=np.int64)
    for k, centre in enumerate(centres):
        r = np.linalg.norm(grid.displacement2(points, centre), axis=1)
        sheath = r < outer[k]
        axon[sheath] = k + 1
        compartment[sheath] = np.where(r[sheath] < inner[k], 1, 2)
    return axon, compartment


def _face_permeability(grid, axon, compartment, kappa):
    """Every edge's permeability: the membranes between its two regions in
    series (module documentation), ``inf`` within one region."""
    a, b = grid.face_cells.T
    resistance = _side(axon[a], compartment[a], axon[b], compartment[b], kappa)
    resistance = resistance + _side(
        axon[b], compartment[b], axon[a], compartment[a], kappa
    )
    with np.errstate(divide="ignore"):
        return np.where(resistance > 0, 1 / resistance, np.inf)


def _side(axon, compartment, other_axon, other_compartment, kappa):
    """The resistance (1 / kappa) of the membranes on one side of an edge:
    an axon's inside crosses its inner membrane, and its outer one too
    unless the other side is its own sheath; a sheath crosses its outer
    membrane unless the other side is its own axon (whose side counts the
    inner one)."""
    own = axon == other_axon
    inv = np.where(axon > 0, 1 / kappa[np.maximum(axon, 1) - 1], 0.0)
    intra = compartment == 1
    myelin = compartment == 2
    into_own_sheath = own & (other_compartment == 2)
    count = np.where(intra, np.where(into_own_sheath, 1, np.where(own, 0, 2)), 0)
    count = count + np.where(myelin & ~own, 1, 0)
    return count * inv
