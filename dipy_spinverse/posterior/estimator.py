"""The amortised posterior: a normalising flow from a voxel's signal to its tissue.

Neural posterior estimation (as in muGUIDE, Jallais & Palombo 2024): a
network embeds the voxel's b0-normalised signal and its noise level, and a
neural spline flow (``zuko.flows.NSF``, Durkan et al. 2019) conditioned on
that embedding is the density of the descriptors' flow coordinates
(:mod:`.targets`), each standardised by the training set's mean and
standard deviation. Both are trained together on simulations of the prior
(:mod:`.training`).

Why zuko: flows written in plain torch with two dependencies (numpy, torch);
``sbi`` brings the same flows (through nflows or zuko) with a training
loop, tensorboard and skorch this package does not need.

The estimator also carries, as buffers saved with it, what its use needs
besides the flow: the prior's support (the training signals and the
thresholds of the out-of-prior test, :mod:`.support`) and the credible
bounds' recalibration (a level table per descriptor, :mod:`.calibration`):
a bound of level ``p`` is the flow's quantile at the level where held-out
truths fell below it a fraction ``p`` of the time.
"""

import contextlib
import random

import numpy as np
import torch

from . import support
from .calibration import LEVELS, calibrated_levels
from .targets import TISSUE_TARGETS

__all__ = [
    "PosteriorEstimator",
    "normal_points",
    "flushed_denormals",
    "kept_generators",
]


class PosteriorEstimator(torch.nn.Module):
    """Embedding network and conditional flow; see the module documentation.

    Parameters
    ----------
    n_inputs : int
        Acquisitions per voxel.
    options : TrainingOptions
    targets : TissueTargets or DescriptorTargets
        The prior's descriptors as the flow models them (its ``targets``;
        default the cells' :data:`~.targets.TISSUE_TARGETS`).
    fast_sampling : bool
        Build the flow's coupling transforms in the sampling direction (an
        inverse autoregressive flow, Kingma et al. 2016): a draw costs one
        network evaluation per transform and a density two (measured on 2
        cores: 2.1-2.9x faster sampling, 2.7x slower training steps; the
        maps need many draws per voxel, training few densities per tissue).
        False: the density direction, as estimators trained before 2026-11
        were built (:func:`dipy_spinverse.posterior.load_or_train` reads
        the direction from a saved estimator's parameters).
    """

    def __init__(
        self, n_inputs, options, *, targets=TISSUE_TARGETS, fast_sampling=True
    ):
        import zuko
        from zuko.lazy import LazyInverse

        super().__init__()
        #: The descriptors as the flow models them (:mod:`.targets`).
        self.targets = targets
        width = options.hidden
        self.embed = torch.nn.Sequential(
            torch.nn.Linear(n_inputs + 1, 2 * width),
            torch.nn.SiLU(),
            torch.nn.Linear(2 * width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, options.embedding),
        )
        n_targets = len(targets.coordinates)
        self.flow = zuko.flows.NSF(
            n_targets,
            context=options.embedding,
            transforms=options.transforms,
            hidden_features=(width, width),
            # Coupling transforms (two passes): a transform's inverse costs
            # two network evaluations instead of one per coordinate, its
            # forward one.
            passes=2,
        )
        if fast_sampling:
            self.flow.transform = LazyInverse(self.flow.transform)
        for name, size in (("x_mean", n_inputs + 1), ("y_mean", n_targets)):
            self.register_buffer(name, torch.zeros(size))
        for name, size in (("x_std", n_inputs + 1), ("y_std", n_targets)):
            self.register_buffer(name, torch.ones(size))
        # The support check: training signals and the threshold per noise level.
        self.register_buffer("support_signals", torch.zeros(0, n_inputs))
        self.register_buffer("support_log_sigma", torch.zeros(0))
        self.register_buffer("support_threshold", torch.zeros(0))
        # The recalibration (identity until measured after training).
        self.register_buffer(
            "level_tables",
            torch.as_tensor(
                np.tile(LEVELS, (len(targets.calibrated), 1)), dtype=torch.float32
            ),
        )

    @property
    def device(self):
        """The device the network runs on (``estimator.to(device)`` moves it)."""
        return self.x_mean.device

    def _context(self, signal, sigma):
        x = torch.cat([signal, torch.log(sigma)[:, None]], dim=-1)
        return self.embed((x - self.x_mean) / self.x_std)

    def log_prob(self, signal, sigma, coordinates):
        """Log density of flow coordinates (standardised inside) given signals."""
        y = (coordinates - self.y_mean) / self.y_std
        return (
            self.flow(self._context(signal, sigma)).log_prob(y)
            - torch.log(self.y_std).sum()
        )

    @torch.no_grad()
    def sample(self, signal, sigma, n, *, generator_seed=None):
        """``n`` posterior draws of the flow coordinates, (n, n_voxels,
        len(targets.coordinates)).

        Parameters
        ----------
        signal : Tensor (n_voxels, n_inputs)
            b0-normalised signals, on any device: the draws are made on the
            estimator's (:attr:`device`) and returned on ``signal``'s.
        sigma : Tensor (n_voxels,)
            Noise standard deviation relative to the b = 0 signal.
        n : int
        generator_seed : int, optional
            Seeds the draws, from generators of their own: torch's global
            generator is neither read nor moved. A voxel's draws depend on
            the seed and its own signal and sigma only, not on the voxels
            drawn with it nor its place among them. The base points are
            drawn on the CPU, so that a seed gives the same draws on every
            device, to rounding. None: a seed drawn from torch's global
            generator.

        Notes
        -----
        The flow's base draws are randomised quasi-Monte Carlo
        (:func:`normal_points`): each draw has the posterior's distribution,
        and the quantiles of ``n`` of them are as accurate as those of about
        ``4 n`` independent draws (measured on the default estimator: the
        level error of a median is 0.022 with 128 such draws and with 500
        independent ones; of a 5 % bound 0.014 against 0.010).
        """
        base = normal_points(
            n,
            len(signal),
            self.y_mean.numel(),
            seed=generator_seed,
            voxel_data=(signal, sigma),
        ).to(self.device)
        with flushed_denormals():
            context = self._context(signal.to(self.device), sigma.to(self.device))
            y = self.flow(context).transform.inv(base)
        return (y * self.y_std + self.y_mean).to(signal.device)

    def level_table(self, name):
        """``name``'s recalibration: the flow's level at each of
        :data:`.calibration.LEVELS` (ndarray)."""
        row = self.targets.calibrated.index(self.targets.table_name(name))
        return self.level_tables[row].cpu().numpy()

    def quantile_levels(self, name, levels):
        """The flow's quantile levels that give ``name``'s credible bounds at
        ``levels`` (:func:`.calibration.calibrated_levels`)."""
        return calibrated_levels(levels, self.level_table(name))

    def support_statistic(self, signal, sigma, *, chunk=256):
        """Mean squared distance to the nearest training signal over sigma^2
        (:func:`.support.support_statistic`).

        Parameters
        ----------
        signal : Tensor (n_voxels, n_inputs)
            On any device (computed on the estimator's, returned on
            ``signal``'s).
        sigma : Tensor (n_voxels,)
        chunk : int
            Voxels compared at once.

        Returns
        -------
        Tensor (n_voxels,)
        """
        return support.support_statistic(
            signal, sigma, self.support_signals, chunk=chunk
        )

    def support_limit(self, sigma):
        """The support statistic's threshold at noise levels ``sigma``
        (:func:`.support.support_limit`)."""
        return support.support_limit(
            sigma, self.support_log_sigma, self.support_threshold
        )


def normal_points(n, n_voxels, dimension, *, seed=None, voxel_data=None):
    """Standard normal base points (n, n_voxels, dimension), randomised QMC.

    One scrambled Sobol sequence of ``n`` points (Owen 1998), shifted modulo 1
    by a uniform vector per voxel (Cranley and Patterson 1976) and mapped
    through the normal quantile. Each point is exactly standard normal, the
    voxels' point sets are independent, and within a voxel the points fill
    the cube evenly, so sample quantiles converge nearly as 1/n instead of
    1/sqrt(n).

    Parameters
    ----------
    n : int
        Points per voxel.
    n_voxels : int
    dimension : int
    seed : int, optional
        Seeds the sequence's scrambling and the shifts, through generators of
        their own: torch's global generator is neither read nor moved. None:
        a seed drawn from torch's global generator.
    voxel_data : sequence of Tensor or ndarray (n_voxels, ...), optional
        What each voxel is (its signal, its noise level): a voxel's shift
        is a hash of ``seed`` and its rows, so that its points are the same
        whatever voxels it is drawn with and wherever among them (voxels of
        identical data have identical points). None: a hash of ``seed`` and
        the voxel's index.

    Returns
    -------
    Tensor (n, n_voxels, dimension)
    """
    if seed is None:
        seed = int(torch.randint(2**31 - 1, ()))
    if voxel_data is None:
        voxel_data = (np.arange(n_voxels),)
    # One scrambling for every voxel, the seed's (not the batch's), and a
    # shift per voxel from its own data.
    engine = torch.quasirandom.SobolEngine(
        dimension, scramble=True, seed=_seed_word(seed)
    )
    shift = _uniforms(_voxel_keys(seed, n_voxels, voxel_data), dimension)
    uniform = torch.frac(engine.draw(n)[:, None, :] + shift)
    # A shifted point can land on 0 exactly: kept inside the open cube.
    tiny = torch.finfo(uniform.dtype).eps
    return torch.special.ndtri(uniform.clamp(tiny, 1 - tiny))


#: splitmix64's increment (Steele et al. 2014), 2^64 over the golden ratio.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x):
    """splitmix64's finaliser, elementwise on a uint64 array (wrapping)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _seed_word(seed):
    """A non-negative 63-bit seed mixed from ``seed`` (any int)."""
    word = np.array([int(seed) % 2**64], dtype=np.uint64)
    return int(_mix(word + _GOLDEN)[0] >> np.uint64(1))


def _voxel_keys(seed, n_voxels, voxel_data):
    """A 64-bit hash per voxel of ``seed`` and the bytes of its rows of each
    array of ``voxel_data`` (uint64, (n_voxels,))."""
    keys = np.full(n_voxels, _seed_word(seed), dtype=np.uint64)
    for data in voxel_data:
        if isinstance(data, torch.Tensor):
            data = data.detach().cpu().numpy()
        data = np.ascontiguousarray(data)
        # Explicit widths: no voxels is no error.
        rows = data.reshape(n_voxels, data[0].size if n_voxels else 0)
        raw = rows.view(np.uint8).reshape(n_voxels, rows.shape[1] * data.itemsize)
        # Padded to whole 8-byte words.
        raw = np.pad(raw, ((0, 0), (0, -raw.shape[1] % 8)))
        for word in np.ascontiguousarray(raw).view(np.uint64).T:
            keys = _mix((keys ^ word) + _GOLDEN)
    return keys


def _uniforms(keys, dimension):
    """Uniforms in [0, 1) (len(keys), dimension): a splitmix64 stream per key,
    24 bits each (exact in float32)."""
    steps = np.arange(1, dimension + 1, dtype=np.uint64) * _GOLDEN
    bits = _mix(keys[:, None] + steps) >> np.uint64(40)
    return torch.from_numpy(bits.astype(np.float32) * np.float32(2.0**-24))


@contextlib.contextmanager
def kept_generators():
    """torch's CPU generator, numpy's legacy global one and Python's
    ``random`` as they were on entering, restored on leaving: what runs
    inside (a network's initialisation when an estimator is read, a seeded
    training) leaves the caller's random sequences as they were. Also a
    decorator (``@kept_generators()``)."""
    # The legacy global generator is the caller's to keep, so it is read.
    states = np.random.get_state(), random.getstate()  # noqa: NPY002
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(states[0])  # noqa: NPY002
            random.setstate(states[1])


@contextlib.contextmanager
def flushed_denormals():
    """Denormal floats flushed to zero inside the block (torch's default, off,
    restored after). A trained flow's spline inverse meets denormals that
    make sampling 5-8x slower on x86 CPUs (measured: 5.3 against 0.70 s for
    5,000 draws on one core); values below 1e-38 do not change a sample."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
