"""White matter as a voxel mixed from simulated bundles, free water and dots.

A voxel's domains that exchange no water within the experiment add up
(:mod:`.mixture`): bundles some tens of um apart, free water (vacuoles,
fluid the fixation left, CSF) and water that does not move ("dots"). A
:class:`MixturePrior` draws a voxel as:

- ``k`` bundles (``k`` uniform in ``bundles_per_voxel``) taken from a library
  of ``n_library`` bundles of its bundle prior (a
  :class:`~.white_matter.WhiteMatterPrior`), their shares of the voxel's
  tissue flat-Dirichlet: together a wider diameter spread than one section
  holds;
- one mean fibre direction (uniform on the sphere, or ``fibre_axis``) and a
  Watson dispersion about it, drawn as NODDI's orientation dispersion index
  ``ODI = (2 / pi) arctan(1 / kappa)``, uniform in ``orientation_dispersion``;
- free water and dots, each a share of the voxel's volume uniform in its
  range, free water with its own diffusivity and T2, dots with a T2.

Only the library needs the Bloch-Torrey solver: each bundle is tabulated
once per protocol by shell and cosine to its axis
(:class:`~.library.BundleLibrary`, kept in the cache), so any number of
voxels costs the library once. :meth:`MixturePrior.simulator` binds the prior
to a protocol (:class:`MixtureSimulator`), as :meth:`TissuePrior.simulator
<dipy_spinverse.posterior.TissuePrior.simulator>` does, and
:meth:`MixturePrior.check` is the same prior predictive check.

The presets :meth:`MixturePrior.fixed` and :meth:`MixturePrior.in_vivo` take
every range from the literature (doc/validation/white_matter.md, "A voxel
mixed from bundles"), none from a dataset they are scored on.
"""

import math
import time
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from ..checks import check_generator, check_int, check_range
from ..sim.sequences import as_protocol
from ..sim.signals import per_mean_b0
from .envelope import PredictiveCheck
from .library import BundleLibrary
from .mixture import (
    bundle_water,
    dot_signal,
    free_water_signal,
    mixed_signal,
    voxel_descriptors,
)
from .prior import plain_value, unit_fibre_axis
from .white_matter import (
    WhiteMatterPrior,
    descriptor_targets,
    log_uniform,
    single_values,
    whole_range,
)

__all__ = ["MIXTURE_DESCRIPTORS", "MixtureDraw", "MixturePrior", "MixtureSimulator"]

#: The descriptors of a mixed voxel (:func:`~.mixture.voxel_descriptors`
#: and its orientation).
MIXTURE_DESCRIPTORS = (
    "effective_diameter",
    "mean_diameter",
    "intra_axonal_fraction",
    "myelin_fraction",
    "g_ratio",
    "exchange_time",
    "free_water_fraction",
    "dot_fraction",
    "orientation_dispersion",
    "cell_diameter",
    "restricted_fraction",
)


class MixtureDraw(NamedTuple):
    """One voxel of a :class:`MixturePrior`.

    Attributes
    ----------
    bundles : ndarray of int
        Library indices of the voxel's bundles.
    shares : ndarray
        Each bundle's share of the voxel's volume.
    free_water, dot : float
        The free water's and the dots' shares of the voxel's volume.
    free_diffusivity : float
        mm^2/s.
    free_t2, dot_t2 : float
        Seconds.
    axis : ndarray (3,)
        The mean fibre direction.
    odi : float
        Orientation dispersion index (0: none).
    """

    bundles: np.ndarray
    shares: np.ndarray
    free_water: float
    dot: float
    free_diffusivity: float
    free_t2: float
    dot_t2: float
    axis: np.ndarray
    odi: float

    @property
    def kappa(self):
        """The Watson concentration of :attr:`odi` (inf at 0)."""
        return math.inf if self.odi == 0 else 1 / math.tan(math.pi * self.odi / 2)


@dataclass(frozen=True)
class MixturePrior(PredictiveCheck):
    """What a voxel of white matter may hold, mixed (module documentation).

    Use :meth:`fixed` or :meth:`in_vivo`. Shares are of the voxel's volume,
    diffusivities in mm^2/s, T2s in s; ranges are ``(low, high)``.

    Parameters
    ----------
    bundles : WhiteMatterPrior
        Draws the library's bundles (their axons, myelin, compartments and
        exchange).
    n_library : int
        Bundles in the library.
    library_seed : int
        Seed of the library's bundles.
    bundles_per_voxel : (int, int)
        Whole numbers, ``1 <= low <= high``.
    free_water_fraction, dot_fraction : (float, float)
        Within [0, 1); the two highs sum to below 1.
    free_diffusivity : (float, float)
    free_t2 : (float, float)
    dot_t2 : (float, float), optional
        Default the bundles' ``intra_t2``.
    orientation_dispersion : (float, float)
        NODDI's orientation dispersion index, within [0, 1).
    fibre_axis : (3,) array_like, optional
        The mean fibre direction in the gradient table's frame (a spinal
        cord's axis); default uniform on the sphere.
    n_azimuths : int
        In-plane directions averaged in each bundle's table
        (:meth:`~.mixture.BundleResponse.tabulate`).
    """

    bundles: WhiteMatterPrior = WhiteMatterPrior()
    n_library: int = 64
    library_seed: int = 0
    bundles_per_voxel: tuple = (1, 4)
    free_water_fraction: tuple = (0.0, 0.3)
    dot_fraction: tuple = (0.0, 0.05)
    free_diffusivity: tuple = (2.8e-3, 3.2e-3)
    free_t2: tuple = (0.3, 2.0)
    dot_t2: tuple | None = None
    orientation_dispersion: tuple = (0.01, 0.3)
    fibre_axis: tuple | None = None
    n_azimuths: int = 4

    #: The code that makes its estimators (:data:`.shipped.ESTIMATOR_ROOTS`).
    estimator_kind = "mixture"

    @property
    def simulator_class(self):
        """What :meth:`simulator` returns (:class:`MixtureSimulator`)."""
        return MixtureSimulator

    @property
    def targets(self):
        """Its descriptors as the posterior's flow models them
        (:class:`~.targets.DescriptorTargets`): the fractions (the
        orientation dispersion index among them) through the logit, the
        diameters and exchange time through the logarithm; free water or
        dots that the prior never holds, a dispersion or g-ratio of one
        value, are constants. The mean fibre direction is not modelled (the
        diffusion tensor's principal axis reads it)."""
        constants = single_values(
            g_ratio=self.bundles.g_ratio,
            orientation_dispersion=self.orientation_dispersion,
        )
        # A share drawn in (0, high] gives a fraction of the water that
        # varies with the bundles'; only none at all is one value.
        for name in ("free_water_fraction", "dot_fraction"):
            if getattr(self, name)[1] == 0:
                constants[name] = 0.0
        return descriptor_targets(
            fractions=(
                "intra_axonal_fraction",
                "myelin_fraction",
                "g_ratio",
                "free_water_fraction",
                "dot_fraction",
                "orientation_dispersion",
            ),
            positives=("effective_diameter", "mean_diameter", "exchange_time"),
            constants=constants,
        )

    def __post_init__(self):
        if not isinstance(self.bundles, WhiteMatterPrior):
            raise ValueError(
                "bundles must be a WhiteMatterPrior (e.g. WhiteMatterPrior.fixed()), "
                f"got {type(self.bundles).__name__}."
            )
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("n_library", check_int(self.n_library, "n_library", 1))
        set_("library_seed", check_int(self.library_seed, "library_seed", 0))
        set_("n_azimuths", check_int(self.n_azimuths, "n_azimuths", 1))
        low, high = whole_range(self.bundles_per_voxel, "bundles_per_voxel")
        set_("bundles_per_voxel", (low, high))
        for name in ("free_water_fraction", "dot_fraction", "orientation_dispersion"):
            set_(name, _share_range(getattr(self, name), name))
        highest = self.free_water_fraction[1] + self.dot_fraction[1]
        if highest >= 1:
            raise ValueError(
                "free_water_fraction and dot_fraction must leave the bundles a share: "
                f"their highs sum to {highest:g}; lower one so that they sum below 1."
            )
        for name in ("free_diffusivity", "free_t2"):
            set_(name, check_range(getattr(self, name), name))
        dot_t2 = self.bundles.intra_t2 if self.dot_t2 is None else self.dot_t2
        set_("dot_t2", check_range(dot_t2, "dot_t2"))
        if self.fibre_axis is not None:
            set_("fibre_axis", unit_fibre_axis(self.fibre_axis, ("axon",)))

    @classmethod
    def in_vivo(cls, **changes):
        """Human white matter in vivo at 37 C and 3 T: the bundles of
        :meth:`WhiteMatterPrior.in_vivo`, CSF-like free water, few dots
        (doc/validation/white_matter.md gives each range's source)."""
        return replace(cls(), **changes)

    @classmethod
    def fixed(cls, **changes):
        """Formalin-fixed white matter scanned near room temperature
        (doc/validation/white_matter.md gives each range's source).

        The bundles are :meth:`WhiteMatterPrior.fixed` with what fixation
        changes: a fibre fraction below histology's (conventional electron
        microscopy loses most of the extracellular space), membranes that
        exchange down to a few ms, myelin water of a longer T2 and a larger
        density (delamination, vacuoles); free water at room temperature's
        diffusivity with a T2 the fixative may shorten, and dots.
        """
        bundles = WhiteMatterPrior.fixed(
            fibre_fraction=(0.3, 0.7),
            permeability=(1e-6, 1e-3),
            myelin_diffusivity=(0.02e-3, 0.6e-3),
            myelin_t2=(0.005, 0.04),
            myelin_density=(0.35, 0.75),
        )
        preset = cls(
            bundles=bundles,
            free_water_fraction=(0.0, 0.4),
            dot_fraction=(0.0, 0.2),
            free_diffusivity=(1.8e-3, 2.3e-3),
            free_t2=(0.05, 1.0),
        )
        return replace(preset, **changes)

    # -- drawing -----------------------------------------------------------------
    def draw(self, rng):
        """One voxel (:class:`MixtureDraw`).

        Parameters
        ----------
        rng : None, int, SeedSequence, BitGenerator or numpy.random.Generator
            Anything :func:`numpy.random.default_rng` takes; a Generator is
            drawn from (it advances).
        """
        rng = check_generator(rng)
        k = int(rng.integers(self.bundles_per_voxel[0], self.bundles_per_voxel[1] + 1))
        chosen = rng.choice(self.n_library, size=k, replace=k > self.n_library)
        free = rng.uniform(*self.free_water_fraction)
        dot = rng.uniform(*self.dot_fraction)
        shares = rng.dirichlet(np.ones(k)) * (1 - free - dot)
        return MixtureDraw(
            bundles=np.sort(chosen),
            shares=shares[np.argsort(chosen, kind="stable")],
            free_water=float(free),
            dot=float(dot),
            free_diffusivity=log_uniform(rng, self.free_diffusivity),
            free_t2=log_uniform(rng, self.free_t2),
            dot_t2=log_uniform(rng, self.dot_t2),
            axis=self._axis(rng),
            odi=float(rng.uniform(*self.orientation_dispersion)),
        )

    def _axis(self, rng):
        if self.fibre_axis is not None:
            return np.array(self.fibre_axis)
        axis = rng.standard_normal(3)
        return axis / np.linalg.norm(axis)

    # -- binding to a protocol ---------------------------------------------------
    def simulator(self, protocol, **options):
        """This prior bound to an acquisition protocol
        (:class:`MixtureSimulator`; ``options`` go to it, ``cache_dir``
        among them: also :meth:`check`'s). The first binding to a protocol
        simulates the library (kept in the cache); any later one only
        mixes."""
        return MixtureSimulator(self, protocol, **options)

    def description(self):
        """The prior's fields as plain values (cache keys, reports)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                value.description()
                if isinstance(value, WhiteMatterPrior)
                else plain_value(value)
            )
        return out

    @classmethod
    def from_description(cls, description):
        """The prior :meth:`description` described."""
        bundles = WhiteMatterPrior.from_description(description["bundles"])
        return cls(**{**description, "bundles": bundles})


class MixtureSimulator:
    """Mixed voxels of a :class:`MixturePrior` on one protocol.

    Parameters
    ----------
    prior : MixturePrior
    protocol : Protocol or GradientTable
    cache_dir : path-like, optional
        Where the library is kept.
    progress : bool
        A progress bar while the library is simulated.
    substeps : int, optional
        Magnus sub-step multiple of the library's simulations (default:
        measured per section).
    engine, address, n_workers
        Where the library's bundles are simulated: here (``"serial"``) or
        each bundle a task on a Ray or Dask cluster
        (:class:`~.library.BundleLibrary`).
        Mixing runs here: a voxel takes milliseconds.

    Attributes
    ----------
    library : BundleLibrary
    """

    def __init__(
        self,
        prior,
        protocol,
        *,
        cache_dir=None,
        progress=False,
        substeps=None,
        engine="serial",
        address=None,
        n_workers=None,
    ):
        if not isinstance(prior, MixturePrior):
            raise TypeError(
                f"prior must be a MixturePrior, got {type(prior).__name__}."
            )
        self.prior = prior
        self.protocol = as_protocol(protocol)
        self.library = BundleLibrary(
            prior.bundles,
            self.protocol,
            n_bundles=prior.n_library,
            seed=prior.library_seed,
            n_azimuths=prior.n_azimuths,
            substeps=substeps,
            cache_dir=cache_dir,
            progress=progress,
            engine=engine,
            address=address,
            n_workers=n_workers,
        )
        self._rows = None

    def sample(self, n, *, seed, progress=False, checkpoint=None):
        """``n`` voxels' noise-free signals and descriptors.

        Parameters
        ----------
        n : int
        seed : int
            Voxel ``i`` depends on ``seed`` and ``i`` alone.
        progress : bool
        checkpoint : path-like, optional
            Not written: a voxel is mixed in milliseconds. What costs, the
            library, is kept in its store as it is simulated and resumes
            there (:class:`~.library.BundleLibrary`).

        Returns
        -------
        signals : ndarray (n, n_acquisitions)
            Relative to the voxel's mean b = 0 signal (as a noise level is;
            :meth:`signals` gives them relative to its water at zero echo
            time).
        truth : dict of ndarray (n,)
            :data:`MIXTURE_DESCRIPTORS`, and ``orientation`` (n, 3).
        """
        n = check_int(n, "n", 1)
        children = np.random.SeedSequence(check_int(seed, "seed", 0)).spawn(n)
        signals = np.empty((n, len(self.protocol)))
        truth = {name: np.empty(n) for name in MIXTURE_DESCRIPTORS}
        truth["orientation"] = np.empty((n, 3))
        for i, child in enumerate(tqdm(children, desc="Mixing", disable=not progress)):
            draw = self.prior.draw(np.random.default_rng(child))
            signals[i] = self.signals(draw)
            described = self.descriptors(draw)
            for name in MIXTURE_DESCRIPTORS:
                truth[name][i] = described[name]
            truth["orientation"][i] = draw.axis
        return per_mean_b0(signals, self.protocol), truth

    def seconds_per_draw(self, *, seed, n_draws=50):
        """The mean time to mix a voxel, in seconds, timed on ``n_draws`` of
        ``seed`` (the library simulated first, where it is not stored)."""
        self.library.responses  # noqa: B018 - built (or read) before timing
        start = time.perf_counter()
        self.sample(n_draws, seed=seed)
        return (time.perf_counter() - start) / n_draws

    def signals(self, draw):
        """One voxel's noise-free signals (n_acquisitions,)."""
        responses = self.library.responses
        # Every bundle of the library shares one shell layout: its rows once.
        if self._rows is None:
            self._rows = responses[0].shell_rows(self.protocol)
        bundles = [
            responses[b].signals(self.protocol, draw.axis, draw.kappa, rows=self._rows)
            for b in draw.bundles
        ]
        free = free_water_signal(
            self.protocol, diffusivity=draw.free_diffusivity, t2=draw.free_t2
        )
        dot = dot_signal(self.protocol, t2=draw.dot_t2)
        waters = [
            v * bundle_water(self.library.draws[b])
            for v, b in zip(draw.shares, draw.bundles, strict=True)
        ]
        return mixed_signal(
            np.stack(bundles + [free, dot]),
            np.array(waters + [draw.free_water, draw.dot]),
        )

    def descriptors(self, draw):
        """One voxel's :data:`MIXTURE_DESCRIPTORS` (dict)."""
        out = voxel_descriptors(
            [self.library.draws[b] for b in draw.bundles],
            draw.shares,
            free_water=draw.free_water,
            dot=draw.dot,
        )
        out["orientation_dispersion"] = draw.odi
        return out


def _share_range(value, name):
    """``(low, high)`` with ``0 <= low <= high < 1``, as floats."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a (low, high) range, got {value!r}.") from err
    if not 0 <= low <= high < 1:
        raise ValueError(
            f"{name} must be a range (low, high) with 0 <= low <= high < 1, got "
            f"{value!r}."
        )
    return low, high
