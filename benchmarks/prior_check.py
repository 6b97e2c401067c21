"""Regenerates the tables of doc/validation/white_matter.md.

"Does a prior hold the data? The prior predictive check": does a prior
hold the data, before any training is spent on it? The public check
(:meth:`TissuePrior.check <dipy_spinverse.posterior.TissuePrior.check>`:
:func:`~dipy_spinverse.posterior.envelope.prior_predictive_check`) on the cat
spinal cord's white matter (694 voxels, the 486 volumes of
``benchmarks/cord_white_matter.py``: every b = 0 and one in-plane direction
per timing and gradient strength; each voxel's noise from the repeated b = 0
volumes), against each prior's own held-out draws with the same noise (the
check's calibration: a level's share of them should lie inside):

- ``default``: ``TissuePrior()``, the default prior (straight axons of
  1-25 um along any direction, one diffusivity, no myelin);
- ``default_z``: the same with the fibres along the cord (z);
- ``mixture_fixed``: :meth:`MixturePrior.fixed
  <dipy_spinverse.posterior.MixturePrior.fixed>`, voxels mixed from a
  library of simulated myelinated bundles, free water and dots, every range
  from the fixed-tissue literature (its library simulated once per
  protocol and kept in ``--out``);
- ``mixture_fixed_z``: the same with the fibres about the cord's axis (z).

``--set 3d`` checks the cord's other acquisition (796 volumes: 16 b = 0
and four shells of 195 directions, every volume) instead. ``--probe``
checks the mixing prior's mechanisms one at a time: its bundles along the
cord alone, with each of dispersion, free water and dots, then all.

What the fluid around the cord says of the acquisition
(``benchmarks/cord_fluid.py``) enters as a measurement model, one part at
a time:

- ``--run_gains G ...``: each acquisition run's diffusion-weighted volumes
  (a run: a timing's volumes from one run of b = 0 volumes to the next,
  each shell of the 3-D set, each timing of the 2-D set) scaled by a gain
  uniform in ``1 +- G``, drawn per draw and run, on the draws and the
  held-out draws alike (the fluid needs 5.4 % on the 3-D set);
- ``mixture_fixed_z_fluid``: free water at the fluid's diffusivity in
  these scans (1.40-1.51 um^2/ms over the 2-D timings but the shortest,
  1.41 on the 3-D set: 1.3-1.6), not room temperature's 1.8-2.3;
- ``mixture_fixed_z_cold``: that, with every bundle diffusivity's lower
  bound scaled by the fluid's 1.41 over free water's 2.05 at the preset's
  temperature (0.7): a colder sample than the literature's.

It also gives the share the posterior fit's ``OUT_OF_PRIOR`` leaves
inside (the 99.9 % region of ``reconst.posterior.PREDICTIVE_LEVEL``).
The simulations are kept in ``--out`` and resumed.

    python benchmarks/prior_check.py --n 2000
    python benchmarks/prior_check.py --set 3d --n 1000
    python benchmarks/prior_check.py --set 3d --n 1000 --probe

``--quick``: 24 draws of each prior; its numbers mean nothing.
"""

import argparse
import itertools
import pathlib
import time
from dataclasses import replace

import numpy as np
import torch
from cord_histology import white_matter
from cord_white_matter import simulated_volumes

from dipy_spinverse.data import read_cat_spinal_cord
from dipy_spinverse.posterior import TissuePrior
from dipy_spinverse.posterior.envelope import prior_predictive_check, shell_layout
from dipy_spinverse.posterior.mixture_prior import MixturePrior
from dipy_spinverse.posterior.noise import add_noise

LEVELS = (0.95, 0.99, 0.999)
PRIORS = {
    "default": TissuePrior,
    "default_z": lambda: TissuePrior(fibre_axis=(0.0, 0.0, 1.0)),
    "mixture_fixed": MixturePrior.fixed,
    "mixture_fixed_z": lambda: MixturePrior.fixed(fibre_axis=(0.0, 0.0, 1.0)),
    "mixture_fixed_z_fluid": lambda: MixturePrior.fixed(
        fibre_axis=(0.0, 0.0, 1.0), free_diffusivity=FLUID_DIFFUSIVITY
    ),
    "mixture_fixed_z_cold": lambda: colder(
        MixturePrior.fixed(
            fibre_axis=(0.0, 0.0, 1.0), free_diffusivity=FLUID_DIFFUSIVITY
        )
    ),
}
#: The fluid's diffusivity in the cord's scans (mm^2/s; cord_fluid.py).
FLUID_DIFFUSIVITY = (1.3e-3, 1.6e-3)
#: The fluid's diffusivity over free water's at the fixed preset's temperature.
TEMPERATURE_SCALE = 0.7


def colder(prior):
    """``prior`` with its bundles' diffusivities' lower bounds scaled by
    :data:`TEMPERATURE_SCALE` (their upper bounds kept: a wider range)."""
    bundles = prior.bundles
    scaled = {
        name: (TEMPERATURE_SCALE * getattr(bundles, name)[0], getattr(bundles, name)[1])
        for name in ("intra_diffusivity", "extra_diffusivity", "myelin_diffusivity")
    }
    return replace(prior, bundles=replace(bundles, **scaled))


def acquisition_runs(protocol):
    """Each volume's acquisition run: within its timing, the run of
    consecutive b = 0 volumes last before it (the first, before any)."""
    b0 = protocol.bvals == 0
    run = np.empty(len(protocol), dtype=np.intp)
    label = 0
    for _, rows in protocol.groups():
        own = rows[b0[rows]]
        starts = own[np.r_[0, np.flatnonzero(np.diff(own) > 1) + 1]]
        run[rows] = label + np.maximum(np.searchsorted(starts, rows, "right") - 1, 0)
        label += len(starts)
    return run


def with_run_gains(signals, runs, weighted, gain, seed):
    """``signals`` with each run's diffusion-weighted volumes (``weighted``)
    scaled by a gain uniform in ``1 +- gain``, per draw and run."""
    rng = np.random.default_rng(seed)
    gains = rng.uniform(1 - gain, 1 + gain, (len(signals), runs.max() + 1))
    factor = np.where(weighted, gains[:, runs], 1.0)
    return signals * factor


_Z = (0.0, 0.0, 1.0)
_NONE = (0.0, 0.0)
#: The mechanisms one at a time (``--probe``): the fixed preset's bundles
#: along the cord alone, then with each of dispersion, free water and dots;
#: all of them are ``mixture_fixed_z``. One library serves them all.
PROBES = {
    "bundles_z": lambda: MixturePrior.fixed(
        fibre_axis=_Z,
        orientation_dispersion=_NONE,
        free_water_fraction=_NONE,
        dot_fraction=_NONE,
    ),
    "bundles_z+dispersion": lambda: MixturePrior.fixed(
        fibre_axis=_Z, free_water_fraction=_NONE, dot_fraction=_NONE
    ),
    "bundles_z+free_water": lambda: MixturePrior.fixed(
        fibre_axis=_Z, orientation_dispersion=_NONE, dot_fraction=_NONE
    ),
    "bundles_z+dots": lambda: MixturePrior.fixed(
        fibre_axis=_Z, orientation_dispersion=_NONE, free_water_fraction=_NONE
    ),
}
PRIORS.update(PROBES)


def simulated(name, protocol, n, seed, out, *, quick=False):
    """``n`` noise-free draws of prior ``name`` on ``protocol``, resumed
    from (and kept in) ``out``."""
    path = pathlib.Path(out) / f"{name}-{len(protocol)}v-{n}-{seed}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prior = PRIORS[name]()
    if isinstance(prior, MixturePrior) and quick:
        prior = replace(prior, n_library=2)
    if isinstance(prior, MixturePrior):
        # The library is simulated once (kept in ``out``); mixing is cheap.
        simulator = prior.simulator(protocol, cache_dir=out, progress=True)
        signals, _ = simulator.sample(n, seed=seed)
    else:
        simulator = prior.simulator(protocol)
        signals, _ = simulator.sample(n, seed=seed, checkpoint=path)
    print(f"{name}: {n} draws in {time.perf_counter() - start:.0f} s", flush=True)
    return signals


def cord_set(name, *, drift=False, noise="b0"):
    """The cord's set ``name`` (``"2d"``, ``"3d"``) as these benchmarks read
    it: ``(cord, kept, data, sigma)``, the volumes kept (the 2-D set's
    benchmark subset, every volume of the 3-D set: its shells are read on all
    their directions), the white-matter voxels' signals on them and their
    noise in the signals' units (:func:`cord_voxels`)."""
    cord = read_cat_spinal_cord(name)
    if name == "2d":
        kept = simulated_volumes(cord, 1)
    else:
        kept = np.arange(len(cord.protocol))
    return (cord, kept, *cord_voxels(cord, kept, drift=drift, noise=noise))


def cord_voxels(cord, kept, *, drift=False, noise="b0"):
    """The cord's white-matter signals on the volumes ``kept`` and each
    voxel's noise in their units.

    With ``drift`` each volume is divided by its timing's b = 0 at its place
    in the acquisition (the cord's 3-D set drifts by up to 5 % between the
    runs of b = 0 volumes that open each shell), so the signals are b0
    levels, 1 at b = 0. ``noise="lowest_shell"`` takes the spread of the
    lowest shell over its directions (noise and that shell's little
    anisotropy: an upper bound) instead of the repeated b = 0 volumes',
    which on the 3-D set is drift between runs (2.1 % of b = 0) or, within a
    run, 0.3 %, four times below the spread between neighbouring volumes of
    the lowest shell (1.3 %).
    """
    sigma, levels = cord.repeated_b0_noise(cord.mask, drift=drift)
    wm, _ = white_matter(cord)
    data = cord.data[cord.mask][wm][:, kept]
    sigma = np.broadcast_to(np.asarray(sigma, dtype=float), (int(cord.mask.sum()),))
    sigma = sigma[wm]
    if drift:
        scale = levels[wm][:, kept]
        sigma = sigma / scale[:, cord.protocol.bvals[kept] == 0].mean(1)
        data = data / scale
    if noise == "lowest_shell":
        protocol = cord.protocol[kept]
        shells, _ = shell_layout(protocol)
        lowest = min(shells, key=lambda s: protocol.bvals[s].mean())
        if len(lowest) < 6:
            raise ValueError("--noise lowest_shell needs a shell of 6 directions.")
        sigma = data[:, lowest].std(1, ddof=1)
    return data, sigma


def held_out(signals, protocol, relative_sigma, seed):
    """Held-out draws with the cord's noise: each at the relative noise of
    a cord voxel drawn at random, in units of its b = 0."""
    rng = np.random.default_rng(seed)
    sigma = rng.choice(relative_sigma, size=len(signals))
    # In units of each draw's own mean b = 0, as the cord's noise is.
    signals = signals / signals[:, protocol.bvals == 0].mean(1, keepdims=True)
    generator = torch.Generator().manual_seed(seed)
    noisy = add_noise(torch.as_tensor(signals), torch.as_tensor(sigma), generator)
    return noisy.numpy(), sigma


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="draws of each prior")
    parser.add_argument("--n_held_out", type=int, default=300)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", default="prior_check")
    parser.add_argument("--set", choices=("2d", "3d"), default="2d")
    parser.add_argument("--priors", nargs="+", choices=tuple(PRIORS), default=None)
    parser.add_argument(
        "--probe",
        action="store_true",
        help="the mixing prior's mechanisms one at a time (PROBES), then all",
    )
    parser.add_argument(
        "--drift",
        action="store_true",
        help="each volume over its timing's b = 0 at its place in the "
        "acquisition (RealDataset.repeated_b0_noise(drift=True))",
    )
    parser.add_argument(
        "--noise",
        choices=("b0", "lowest_shell"),
        default="b0",
        help="each voxel's noise: the repeated b = 0 volumes' spread, or the "
        "spread of its lowest shell over its directions (an upper bound)",
    )
    parser.add_argument(
        "--run_gains",
        type=float,
        nargs="+",
        default=[0.0],
        help="gain errors of the runs' diffusion-weighted volumes (fractions)",
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.probe:
        args.priors = [*PROBES, "mixture_fixed_z"]
    if args.quick:
        args.n, args.n_held_out = 24, 20
    cord, kept, data, sigma = cord_set(args.set, drift=args.drift, noise=args.noise)
    protocol = cord.protocol[kept]
    relative = sigma / data[:, protocol.bvals == 0].mean(1)
    print(
        f"cord: {len(kept)} of {len(cord.protocol)} volumes; white matter "
        f"{len(data)} voxels, SNR median {np.median(1 / relative):.0f}"
    )
    runs = acquisition_runs(cord.protocol)[kept]
    weighted = protocol.bvals > 0
    rows = []
    for name, gain in itertools.product(args.priors or PRIORS, args.run_gains):
        signals = simulated(
            name, protocol, args.n, args.seed, args.out, quick=args.quick
        )
        extra = simulated(
            name, protocol, args.n_held_out, args.seed + 1, args.out, quick=args.quick
        )
        if gain:
            signals = with_run_gains(signals, runs, weighted, gain, args.seed)
            extra = with_run_gains(extra, runs, weighted, gain, args.seed + 1)
            name = f"{name}, run gains {gain:.1%}"
        own, own_sigma = held_out(extra, protocol, relative, args.seed)
        for level in LEVELS:

            def check(voxels, noise, level=level, signals=signals):
                return prior_predictive_check(
                    lambda p, s: signals,
                    voxels,
                    protocol,
                    sigma=noise,
                    level=level,
                    seed=args.seed,
                )

            cord_check, own_check = check(data, sigma), check(own, own_sigma)
            worst = cord_check.features_outside[0]
            # How far outside: the cord's median distance over its limit.
            ratio = np.nanmedian(cord_check.distance / cord_check.limit)
            rows.append(
                (
                    name,
                    level,
                    cord_check.share_inside,
                    own_check.share_inside,
                    ratio,
                    worst,
                )
            )
    print(
        "\n| prior | level | cord white matter inside | held-out draws inside "
        "| cord median distance / limit "
        "| feature most outside (share of the cord outside the draws' 1-99 %; "
        "cord median) |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for name, level, cord_inside, own_inside, ratio, worst in rows:
        label, share, median, low, high = worst
        print(
            f"| {name} | {level:.1%} | {cord_inside:.1%} | {own_inside:.1%} | "
            f"{ratio:.2f} | "
            f"{label}: {share:.0%} outside [{low:.3f}, {high:.3f}] "
            f"({median:.3f}) |"
        )


if __name__ == "__main__":
    main()
