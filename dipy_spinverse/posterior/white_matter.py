"""White matter as histology and relaxometry describe it: a prior of
myelinated axon bundles, with a diffusivity, a T2 and a water density per
compartment.

A :class:`WhiteMatterPrior` draws one voxel's tissue as a periodic section
of tens of straight axons (:func:`~dipy_spinverse.geometry.substrates.
axon_bundle`): inner diameters from a gamma distribution, each axon in a
myelin sheath of its own g-ratio, membranes on both sides of every sheath,
packed to a fibre fraction. Each compartment (intra-axonal, extra-axonal,
myelin) has its own diffusivity, T2 and water density. Every range is from
the literature, never from a dataset it is scored on; the sources are in
doc/validation/white_matter.md and the presets :meth:`WhiteMatterPrior.
in_vivo` and :meth:`WhiteMatterPrior.fixed` differ where in vivo and
fixed tissue differ (diffusivities, T2s).

One draw: the axon count uniform in ``n_axons``, the mean diameter
log-uniform in ``mean_diameter``, the gamma shape uniform in
``diameter_shape``, the g-ratios uniform in a sub-range of ``g_ratio``, the
fibre fraction uniform in ``fibre_fraction``, the permeability (one per
voxel, every membrane) log-uniform in ``permeability``, each diffusivity,
T2 and the myelin water density uniform (T2s and diffusivities
log-uniform) in their ranges; the section's side is the one in which the
drawn axons fill the fibre fraction, snapped to a ladder of sides so that
draws share grids, and its spacing resolves the mean axon's sheath with
``cells_per_sheath`` triangles (axons the grid cannot hold are drawn
again). With ``resolve_above``, axons thinner than it are sub-grid pools
(:func:`~dipy_spinverse.geometry.substrates.axon_bundle`) and the spacing
resolves the sheath of an axon of ``max(mean, resolve_above)``: each
draw then has a grid of its own, simulated alone.

The descriptors (:data:`DESCRIPTORS`) are the rasterised tissue's, the one
simulated: ``effective_diameter`` (``(<d^6> / <d^2>)^(1/4)``, what the
diffusion signal weighs; also ``cell_diameter``, the name the other priors
use), ``mean_diameter``, ``intra_axonal_fraction`` (the axons' share of the
space outside myelin: histology's ``fr / (1 - MVF)``; also
``restricted_fraction``), ``myelin_fraction`` (MVF), ``g_ratio``
(aggregate, ``sqrt(1 - MVF / FVF)``), ``intra_diffusivity``,
``extra_diffusivity``, and ``exchange_time``: the intra-axonal water's
mean residence time, ``sum_k A_k / sum_k G_k`` over the axons (areas
``A_k``, conductances through the sheath ``G_k``: both membranes and the
sheath's radial diffusion in series, :meth:`~dipy_spinverse.geometry.
substrates.AxonBundle.sheath_conductance`).
"""

import hashlib
import math
import time
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checks import check_generator, check_int, check_positive, check_range
from ..geometry.substrates import axon_bundle, bundle_side
from ..geometry.substrates.bundle import MAX_FIBRE_FRACTION, UnheldBundleError
from ..sim.forward import simulate
from ..sim.sequences import as_protocol
from ..sim.signals import per_mean_b0
from .checkpoint import SimulationCheckpoint
from .envelope import PredictiveCheck
from .prior import plain_value, section_grid, unit_fibre_axis
from .targets import DescriptorTargets

__all__ = ["DESCRIPTORS", "WhiteMatterDraw", "WhiteMatterPrior", "WhiteMatterSimulator"]

#: The descriptors of a white-matter draw (module documentation).
DESCRIPTORS = (
    "effective_diameter",
    "mean_diameter",
    "intra_axonal_fraction",
    "myelin_fraction",
    "g_ratio",
    "intra_diffusivity",
    "extra_diffusivity",
    "exchange_time",
    "cell_diameter",
    "restricted_fraction",
)

# Draws tried for one accepted draw (an axon finer than the grid is redrawn).
_MAX_TRIES = 50
# The ladder of section sides: this many, geometric between the extremes.
_N_SIDES = 12
# A g-ratio sub-range of this width is drawn per voxel (axons of one voxel
# scatter about its own mean, as histology's do: sd ~0.05).
_G_SPREAD = 0.1


class WhiteMatterDraw(NamedTuple):
    """One accepted draw of a :class:`WhiteMatterPrior`.

    Attributes
    ----------
    side : float
        The section's side, um.
    resolution : int
        Triangle edges across it.
    bundle : AxonBundle
    tissue : dict
        Per compartment (``"extra"``, ``"intra"``, ``"myelin"``): its
        ``diffusivity`` (mm^2/s), ``t2`` (s) and ``density``.
    descriptors : dict
        :data:`DESCRIPTORS`.
    axis : ndarray (3,)
        The fibres' direction.
    """

    side: float
    resolution: int
    bundle: object
    tissue: dict
    descriptors: dict
    axis: np.ndarray


@dataclass(frozen=True)
class WhiteMatterPrior(PredictiveCheck):
    """What white matter a voxel may hold (module documentation).

    Use :meth:`in_vivo` or :meth:`fixed`; the defaults are the in vivo
    ranges. Diffusivities in mm^2/s, T2s in s, lengths in um, permeability in
    m/s; ranges are ``(low, high)``.

    Parameters
    ----------
    n_axons : (int, int)
        Whole numbers, ``1 <= low <= high``.
    mean_diameter : (float, float)
        Mean inner diameter of the voxel's gamma distribution.
    diameter_shape : (float, float)
        The gamma distribution's shape ``k`` (coefficient of variation
        ``1 / sqrt(k)``).
    g_ratio : (float, float)
        Within (0, 1).
    fibre_fraction : (float, float)
        Axons and sheaths' share of the section, within (0, 0.85] (the
        densest :func:`~dipy_spinverse.geometry.substrates.axon_bundle`
        packs).
    permeability : (float, float)
        Of every membrane (both sides of each sheath).
    intra_diffusivity, extra_diffusivity, myelin_diffusivity : (float, float)
    intra_t2, extra_t2, myelin_t2 : (float, float)
    myelin_density : (float, float)
        Myelin's water per unit volume relative to the axons' and the
        extra-axonal space's, below 1.
    cells_per_sheath : int
        Triangles across the mean axon's sheath.
    fibre_axis : (3,) array_like, optional
        The fibres' direction in the gradient table's frame; default uniform
        on the sphere.
    resolve_above : float, optional
        Inner diameter (um) below which axons are sub-grid pools (module
        documentation); None (the default): every axon rasterised.
    """

    n_axons: tuple = (8, 24)
    mean_diameter: tuple = (0.6, 4.0)
    diameter_shape: tuple = (2.0, 8.0)
    g_ratio: tuple = (0.6, 0.8)
    fibre_fraction: tuple = (0.4, 0.8)
    permeability: tuple = (3e-7, 3e-4)
    intra_diffusivity: tuple = (1.8e-3, 2.6e-3)
    extra_diffusivity: tuple = (1.2e-3, 2.2e-3)
    myelin_diffusivity: tuple = (0.05e-3, 0.5e-3)
    intra_t2: tuple = (0.06, 0.11)
    extra_t2: tuple = (0.045, 0.08)
    myelin_t2: tuple = (0.008, 0.02)
    myelin_density: tuple = (0.35, 0.55)
    cells_per_sheath: int = 1
    fibre_axis: tuple | None = None
    resolve_above: float | None = None

    #: Draws of a prior predictive check (:meth:`check`): seconds each.
    CHECK_DRAWS = 200
    #: The code that makes its estimators (:data:`.shipped.ESTIMATOR_ROOTS`).
    estimator_kind = "white_matter"

    @property
    def simulator_class(self):
        """What :meth:`simulator` returns (:class:`WhiteMatterSimulator`)."""
        return WhiteMatterSimulator

    @property
    def targets(self):
        """Its descriptors as the posterior's flow models them
        (:class:`~.targets.DescriptorTargets`): the fractions through the
        logit, the diameters, diffusivities and exchange time through the
        logarithm; a diffusivity or g-ratio whose range is one value is a
        constant."""
        return descriptor_targets(
            fractions=("intra_axonal_fraction", "myelin_fraction", "g_ratio"),
            positives=(
                "effective_diameter",
                "mean_diameter",
                "exchange_time",
                "intra_diffusivity",
                "extra_diffusivity",
            ),
            constants=single_values(
                g_ratio=self.g_ratio,
                intra_diffusivity=self.intra_diffusivity,
                extra_diffusivity=self.extra_diffusivity,
            ),
        )

    def __post_init__(self):
        object.__setattr__(self, "n_axons", whole_range(self.n_axons, "n_axons"))
        for f in fields(self):
            if f.name in ("n_axons", "cells_per_sheath", "fibre_axis", "resolve_above"):
                continue
            given = getattr(self, f.name)
            value = check_range(given, f.name, 0.0)
            # The ranges axon_bundle takes, checked here once (none of its
            # draws is then refused for the range, and none redrawn).
            if f.name == "fibre_fraction" and value[1] > MAX_FIBRE_FRACTION:
                raise ValueError(
                    f"fibre_fraction must lie in (0, {MAX_FIBRE_FRACTION:g}] (the "
                    f"densest axon_bundle packs), got {given!r}."
                )
            if f.name in ("g_ratio", "myelin_density") and value[1] >= 1.0:
                raise ValueError(f"{f.name} must lie below 1, got {given!r}.")
            object.__setattr__(self, f.name, value)
        object.__setattr__(
            self,
            "cells_per_sheath",
            check_int(self.cells_per_sheath, "cells_per_sheath", 1),
        )
        if self.fibre_axis is not None:
            axis = unit_fibre_axis(self.fibre_axis, ("axon",))
            object.__setattr__(self, "fibre_axis", axis)
        if self.resolve_above is not None:
            above = check_positive(
                self.resolve_above, "resolve_above", "um", example="2.0 (or None)"
            )
            object.__setattr__(self, "resolve_above", above)

    @classmethod
    def in_vivo(cls, **changes):
        """Human white matter in vivo at 37 C and 3 T (the defaults;
        doc/validation/white_matter.md gives each range's source)."""
        return replace(cls(), **changes)

    @classmethod
    def fixed(cls, **changes):
        """Fixed tissue (formalin, scanned near room temperature):
        diffusivities about half those in vivo, shorter T2s, larger axons
        (spinal cord); doc/validation/white_matter.md."""
        preset = cls(
            mean_diameter=(1.0, 6.0),
            intra_diffusivity=(0.8e-3, 1.6e-3),
            extra_diffusivity=(0.5e-3, 1.3e-3),
            myelin_diffusivity=(0.02e-3, 0.3e-3),
            intra_t2=(0.03, 0.08),
            extra_t2=(0.02, 0.06),
            myelin_t2=(0.005, 0.015),
        )
        return replace(preset, **changes)

    # -- drawing -----------------------------------------------------------------
    def draw(self, rng):
        """One accepted draw (:class:`WhiteMatterDraw`).

        Parameters
        ----------
        rng : None, int, SeedSequence, BitGenerator or numpy.random.Generator
            Anything :func:`numpy.random.default_rng` takes; a Generator is
            drawn from (it advances).

        Raises
        ------
        ValueError
            When no draw is accepted in a few tens of tries (a bundle its
            grid cannot hold is drawn again; the last refusal is given).
        """
        rng = check_generator(rng)
        refused = None
        for _ in range(_MAX_TRIES):
            n = int(rng.integers(self.n_axons[0], self.n_axons[1] + 1))
            mean = log_uniform(rng, self.mean_diameter)
            shape = rng.uniform(*self.diameter_shape)
            g_low = rng.uniform(
                self.g_ratio[0], max(self.g_ratio[1] - _G_SPREAD, self.g_ratio[0])
            )
            g = (g_low, min(g_low + _G_SPREAD, self.g_ratio[1]))
            fibre = rng.uniform(*self.fibre_fraction)
            kappa = log_uniform(rng, self.permeability)
            side = self._snapped_side(bundle_side(n, mean, shape, g, fibre))
            thinnest = (
                mean if self.resolve_above is None else max(mean, self.resolve_above)
            )
            sheath = thinnest * (1 / np.mean(g) - 1) / 2
            resolution = _snapped_resolution(side * self.cells_per_sheath / sheath)
            grid = section_grid(side, resolution)
            try:
                bundle = axon_bundle(
                    grid,
                    rng=rng,
                    n_axons=n,
                    mean_diameter=mean,
                    shape=shape,
                    g_ratio=g,
                    fibre_fraction=fibre,
                    permeability=kappa,
                    resolve_above=self.resolve_above,
                )
            except UnheldBundleError as err:
                refused = err
                continue
            tissue = self._tissue(rng)
            described = self._described(grid, bundle, tissue)
            return WhiteMatterDraw(
                side, resolution, bundle, tissue, described, self._axis(rng)
            )
        raise ValueError(
            f"no draw of {self!r} was accepted in {_MAX_TRIES} tries; the last "
            f"was refused as: {refused} Raise cells_per_sheath or mean_diameter "
            "(axons finer than the grid), or lower fibre_fraction (discs that "
            "cannot be packed apart)."
        ) from refused

    def _tissue(self, rng):
        log = log_uniform
        return {
            "intra": dict(
                diffusivity=log(rng, self.intra_diffusivity),
                t2=log(rng, self.intra_t2),
                density=1.0,
            ),
            "extra": dict(
                diffusivity=log(rng, self.extra_diffusivity),
                t2=log(rng, self.extra_t2),
                density=1.0,
            ),
            "myelin": dict(
                diffusivity=log(rng, self.myelin_diffusivity),
                t2=log(rng, self.myelin_t2),
                density=rng.uniform(*self.myelin_density),
            ),
        }

    def _axis(self, rng):
        if self.fibre_axis is not None:
            return np.array(self.fibre_axis)
        axis = rng.standard_normal(3)
        return axis / np.linalg.norm(axis)

    def _snapped_side(self, side):
        """``side`` snapped to the nearest of the prior's ladder of sides."""
        ladder = self._sides()
        return float(ladder[int(np.argmin(np.abs(np.log(ladder) - math.log(side))))])

    def _sides(self):
        (n_lo, n_hi), (d_lo, d_hi) = self.n_axons, self.mean_diameter
        (k_lo, _), (g_lo, g_hi) = self.diameter_shape, self.g_ratio
        (f_lo, f_hi) = self.fibre_fraction
        small = bundle_side(n_lo, d_lo, 1e6, g_hi, f_hi)
        large = bundle_side(n_hi, d_hi, k_lo, g_lo, f_lo)
        return np.geomspace(small, large, _N_SIDES)

    @staticmethod
    def _described(grid, bundle, tissue):
        described = bundle.descriptors(grid.volume)
        myelin = tissue["myelin"]
        conductance = bundle.sheath_conductance(
            myelin_diffusivity=myelin["diffusivity"],
            myelin_density=myelin["density"],
        )
        exchange = bundle.axon_areas.sum() / conductance.sum()  # us
        out = {name: described[name] for name in DESCRIPTORS[:5]}
        out["intra_diffusivity"] = tissue["intra"]["diffusivity"]
        out["extra_diffusivity"] = tissue["extra"]["diffusivity"]
        out["exchange_time"] = float(exchange) * 1e-6  # s
        out["cell_diameter"] = out["effective_diameter"]
        out["restricted_fraction"] = out["intra_axonal_fraction"]
        return out

    # -- simulating --------------------------------------------------------------
    def simulate(self, draws, protocol, *, dtype=torch.float64, substeps=None):
        """Noise-free signals of ``draws`` (n, n_acquisitions), normalised by
        the voxel's water at zero echo time (so that b = 0 holds the T2
        weighting of every compartment).

        Parameters
        ----------
        draws : sequence of WhiteMatterDraw
        protocol : Protocol or GradientTable
            With echo times where the data have them
            (:meth:`~dipy_spinverse.sim.sequences.Protocol.from_gtab`).
        dtype : torch.float64 or torch.float32
        substeps : int, optional
            Magnus sub-step multiple (default: measured per section, by
            :func:`~dipy_spinverse.simulate`).

        Returns
        -------
        ndarray (n, n_acquisitions)
        """
        protocol = as_protocol(protocol)
        out = np.empty((len(draws), len(protocol)))
        by_grid = {}
        for i, draw in enumerate(draws):
            # A bundle with sub-grid axons has a grid of its own.
            key = (draw.side, draw.resolution)
            if draw.bundle.subgrid is not None and draw.bundle.subgrid.any():
                key = ("pooled", i)
            by_grid.setdefault(key, []).append(i)
        for key, rows in by_grid.items():
            chosen = [draws[i] for i in rows]
            grid = chosen[0].bundle.grid if key[0] == "pooled" else section_grid(*key)
            values = {
                name: np.stack([_per_cell(d, name) for d in chosen])
                for name in ("diffusivity", "t2", "density")
            }
            with torch.no_grad():
                signals = simulate(
                    grid,
                    np.stack([d.bundle.face_permeability for d in chosen]),
                    protocol,
                    axes=np.stack([d.axis for d in chosen]),
                    dtype=dtype,
                    substeps=substeps,
                    **values,
                )
            out[rows] = signals.cpu().numpy()
        return out

    def simulator(self, protocol, **options):
        """This prior bound to an acquisition protocol
        (:class:`WhiteMatterSimulator`; ``options``, ``dtype`` and
        ``substeps``, go to it). A bundle costs seconds on a long protocol,
        so :meth:`check` simulates :attr:`CHECK_DRAWS` (200) in float32 by
        default, within 1e-5 of float64."""
        return WhiteMatterSimulator(self, protocol, **options)

    def description(self):
        """The prior's fields as plain values (cache keys, reports)."""
        return {f.name: plain_value(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_description(cls, description):
        """The prior :meth:`description` described."""
        return cls(**description)


class WhiteMatterSimulator:
    """Bundles of a :class:`WhiteMatterPrior` simulated on one protocol.

    Parameters
    ----------
    prior : WhiteMatterPrior
    protocol : Protocol or GradientTable
    dtype : torch.float64 or torch.float32
        Default float32 (within 1e-5 of float64 on these sections).
    substeps : int, optional
        Magnus sub-step multiple (default: measured per section).
    """

    #: Draws simulated together between two checkpoints (a bundle costs
    #: seconds on a long protocol: a chunk is a minute or two).
    CHUNK = 32

    def __init__(self, prior, protocol, *, dtype=torch.float32, substeps=None):
        self.prior = prior
        self.protocol = as_protocol(protocol)
        self.dtype = dtype
        self.substeps = substeps

    def sample(self, n, *, seed, progress=False, checkpoint=None):
        """``n`` draws' noise-free signals and descriptors.

        Parameters
        ----------
        n : int
        seed : anything :func:`numpy.random.default_rng` takes
            The draws are made one after another from it.
        progress : bool
            A progress bar over the draws.
        checkpoint : path-like, optional
            An ``.npz`` file that keeps the signals as they are simulated
            (:class:`~.checkpoint.SimulationCheckpoint`, every
            :attr:`CHUNK` draws at most once a minute, and when
            interrupted); a later call on the same draws resumes from it.

        Returns
        -------
        signals : ndarray (n, n_acquisitions)
            Relative to the voxel's mean b = 0 signal (as a noise level is).
        truth : dict of ndarray (n,)
            :data:`DESCRIPTORS`, and ``orientation`` (n, 3).
        """
        draws = self.sample_draws(n, seed=seed)
        n = len(draws)
        signals = np.empty((n, len(self.protocol)))
        done = np.zeros(n, dtype=bool)
        kept = None
        if checkpoint is not None:
            kept = SimulationCheckpoint(
                checkpoint,
                draws,
                len(self.protocol),
                fingerprint=_fingerprint(self.prior, draws, self.protocol),
            )
            kept.restore(signals, done, {})
        bar = tqdm(
            total=n,
            initial=int(done.sum()),
            desc="Simulating bundles",
            disable=not progress,
        )
        try:
            for start in range(0, n, self.CHUNK):
                rows = [
                    i for i in range(start, min(n, start + self.CHUNK)) if not done[i]
                ]
                if not rows:
                    continue
                signals[rows] = self.prior.simulate(
                    [draws[i] for i in rows],
                    self.protocol,
                    dtype=self.dtype,
                    substeps=self.substeps,
                )
                done[rows] = True
                bar.update(len(rows))
                if kept is not None:
                    kept.save(signals, done, {})
        finally:
            bar.close()
            if kept is not None:
                kept.save(signals, done, {}, force=True)
        truth = {
            name: np.array([d.descriptors[name] for d in draws]) for name in DESCRIPTORS
        }
        truth["orientation"] = np.stack([d.axis for d in draws])
        return per_mean_b0(signals, self.protocol), truth

    def seconds_per_draw(self, *, seed, n_draws=2):
        """The mean simulation time of a draw, in seconds, timed on
        ``n_draws`` of ``seed``."""
        draws = self.sample_draws(n_draws, seed=seed)
        start = time.perf_counter()
        self.prior.simulate(
            draws, self.protocol, dtype=self.dtype, substeps=self.substeps
        )
        return (time.perf_counter() - start) / len(draws)

    def sample_draws(self, n, *, seed):
        """The first ``n`` draws of ``seed``, not simulated."""
        rng = check_generator(seed, "seed")
        return [self.prior.draw(rng) for _ in range(check_int(n, "n", 1))]


def _fingerprint(prior, draws, protocol):
    """A hash of what a list of draws' signals depend on: the prior and its
    draws' descriptors, tissue and axes, on the protocol's acquisitions."""
    digest = hashlib.sha256(repr(prior.description()).encode())
    digest.update(np.asarray(protocol.bvals, dtype=np.float64).tobytes())
    digest.update(np.asarray(protocol.bvecs, dtype=np.float64).tobytes())
    for draw in draws:
        digest.update(repr((draw.side, draw.resolution, draw.tissue)).encode())
        digest.update(repr(sorted(draw.descriptors.items())).encode())
        digest.update(np.asarray(draw.axis, dtype=np.float64).tobytes())
        digest.update(np.asarray(draw.bundle.face_permeability).tobytes())
    return digest.hexdigest()


def descriptor_targets(*, fractions, positives, constants):
    """The :class:`~.targets.DescriptorTargets` of a white-matter prior.

    Parameters
    ----------
    fractions, positives : tuple of str
        The descriptors in (0, 1) and those > 0.
    constants : dict
        ``{descriptor: value}``: those the prior holds at one value (not
        modelled).

    Returns
    -------
    DescriptorTargets
        With the aliases ``cell_diameter`` and ``restricted_fraction``.
    """
    return DescriptorTargets(
        fractions=tuple(n for n in fractions if n not in constants),
        positives=tuple(n for n in positives if n not in constants),
        constants=tuple((n, float(v)) for n, v in constants.items()),
        aliases=(
            ("cell_diameter", "effective_diameter"),
            ("restricted_fraction", "intra_axonal_fraction"),
        ),
    )


def single_values(**ranges):
    """``{name: low}`` of the ranges ``(low, high)`` with ``low == high``."""
    return {name: low for name, (low, high) in ranges.items() if low == high}


def whole_range(value, name):
    """``value`` as a ``(low, high)`` pair of ints, ``1 <= low <= high``
    (a ``ValueError`` naming ``name`` otherwise)."""
    try:
        low, high = value
        low = check_int(low, name, 1)
        high = check_int(high, name, low)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} must be a range (low, high) of whole numbers with 1 <= low "
            f"<= high, got {value!r}."
        ) from err
    return low, high


def _per_cell(draw, name):
    values = [draw.tissue[c][name] for c in ("extra", "intra", "myelin")]
    return draw.bundle.per_cell(*values)


def log_uniform(rng, bounds):
    """A draw of ``rng`` log-uniform in ``bounds`` (low, high > 0)."""
    return math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1])))


def _snapped_resolution(edges):
    """Triangle edges across a section, rounded up to a multiple of 4 (so
    that draws of nearby sizes share a grid)."""
    return int(4 * math.ceil(max(edges, 3) / 4))
