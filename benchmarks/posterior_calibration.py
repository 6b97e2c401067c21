"""Regenerates the tables of doc/validation/posterior.md.

``--quick``: the shipped default estimator on 8 held-out draws (64 timed).

Calibration of the amortised posterior (``fit_method="posterior"``).

Trains (or reads from the cache) the posterior of a prior on a protocol,
draws ``--n_test`` held-out substrates from the same prior (``--seed``,
never used in training), adds Rician noise at each SNR, fits them through
the public API (printing voxels a minute) and prints, per descriptor and
SNR, how often the 50 % and 90 % central credible intervals contain the
truth (target: 45-55 % and 85-95 %), the median absolute error of the
posterior median and the fraction flagged ``OUT_OF_PRIOR``; then the cells
under ``--small_cells`` apart and the diameter intervals against the
protocol's resolution limit. ``--left_out`` trains without some families
and scores held-out voxels of those apart; ``--test_resolution R``
simulates and describes the held-out tissue on a finer grid;
``--fixed_permeability K`` fits draws whose membranes all have
permeability ``K`` and prints the width of the permeability's and exchange
time's intervals beside the prior's; ``--figure`` writes expected-coverage
curves and rank histograms.

    python benchmarks/posterior_calibration.py --resolution 2 \\
        --n_train 2000 --n_test 400 --epochs 30

``--default`` scores the default posterior (``TissuePrior()``, white
matter) on the README demo's protocol as ``dipy_fit_spinverse`` reads it
from the demo's files: the estimator that ships with the package (with
``--cache_dir DIR``, trained into ``DIR`` where the package ships none of
its key)::

    python benchmarks/posterior_calibration.py --default --n_test 1000

``--mixture in_vivo`` (or ``fixed``) scores the mixing prior
(:meth:`MixturePrior.in_vivo <dipy_spinverse.posterior.MixturePrior.in_vivo>`,
a library of ``--n_library`` simulated bundles, free water, dots and
dispersion) on the demo's timings and shells, its descriptors (diameters,
fractions, g-ratio, exchange time) in place of the cells'; the training's
time includes the library's::

    python benchmarks/posterior_calibration.py --mixture in_vivo --n_test 1000

``--device cuda`` simulates the held-out draws and draws from the posterior
on a GPU (the GPU rows of doc/validation/sections.md); ``--retrain
--cache_dir DIR`` trains into ``DIR`` even where the package ships the key
(the time from an empty cache); ``--throughput N`` times one fit of ``N``
voxels.
"""

import logging
import pathlib
import tempfile
import time
import warnings

import harness
import numpy as np
from prior_throughput import machine
from surface_check import _demo_protocol

from dipy_spinverse import SpinverseModel, posterior
from dipy_spinverse.data import _protocol
from dipy_spinverse.posterior import (
    FAMILIES,
    MixturePrior,
    TissuePrior,
    TrainingOptions,
)
from dipy_spinverse.sim.limits import diameter_resolution_limit

SNRS = (20, 50, 100, 200)
LEVELS = (0.5, 0.9)
# Held-out draws use seeds far from the training seed and its probe.
TEST_SEED = 987_654


def demo_protocol(n_directions):
    """The README demo's three PGSE timings and shells."""
    return _protocol(
        ((0.005, 0.006), (0.010, 0.020), (0.010, 0.060)),
        (1000.0, 2500.0, 4000.0),
        n_directions,
        3,
    )


def rician(signals, snr, rng):
    sigma = 1.0 / snr
    noise = rng.standard_normal((2,) + signals.shape) * sigma
    return np.sqrt((signals + noise[0]) ** 2 + noise[1] ** 2)


def print_throughput(make_model, signals, n_voxels, rng, *, snr=50):
    """Voxels a minute of one fit of ``n_voxels`` voxels (the held-out
    signals repeated, Rician noise at ``snr``), the estimator loaded (and on
    its device) before the clock starts."""
    data = rician(np.resize(signals, (n_voxels, signals.shape[1])), snr, rng)
    model = make_model(1.0 / snr)
    model.estimator  # noqa: B018 - loaded before timing
    start = time.perf_counter()
    model.fit(data)
    seconds = time.perf_counter() - start
    print(
        f"{n_voxels:,} voxels at SNR {snr}: {n_voxels / seconds * 60:,.0f} voxels "
        f"a minute ({seconds:.1f} s; fit, intervals and support check)"
    )


def score(make_model, signals, truth, snr, rng):
    """Coverage, error and out-of-prior rate of one SNR; the fit."""
    fit = make_model(1.0 / snr).fit(rician(signals, snr, rng))
    return (*coverage(fit, truth), fit)


def coverage(fit, truth, among=None):
    """Per descriptor (50 % coverage, 90 % coverage, median |error|) over the
    in-prior voxels (``among`` of them, a mask), and the flagged fraction."""
    ok = fit.status == 0
    if among is not None:
        ok, flagged = ok & among, 1 - ok[among].mean()
    else:
        flagged = 1 - ok.mean()
    rows = {}
    for name in (n for n in fit.descriptors if n != "orientation"):
        true = np.asarray(truth[name], dtype=float)
        cover = []
        for level in LEVELS:
            low, high = fit.credible_interval(name, level=level)
            cover.append(np.mean((true[ok] >= low[ok]) & (true[ok] <= high[ok])))
        error = np.median(np.abs(getattr(fit, name)[ok] - true[ok]))
        rows[name] = (*cover, error)
    return rows, flagged


def print_table(title, table, flagged):
    print(f"\n{title}")
    print(f"{'descriptor':>20} {'SNR':>4} {'50 %':>6} {'90 %':>6} {'median |err|':>13}")
    for snr, rows in table.items():
        for name, (c50, c90, err) in rows.items():
            print(f"{name:>20} {snr:>4} {c50:>6.1%} {c90:>6.1%} {err:>13.4g}")
        print(f"{'OUT_OF_PRIOR':>20} {snr:>4} {flagged[snr]:>6.1%}")


def figure(path, fits, truth, *, n_draws=200):
    """Expected-coverage curves (every SNR) and rank histograms (the highest),
    from ``n_draws`` posterior draws per voxel and descriptor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = np.linspace(0.05, 0.95, 19)
    fit = next(iter(fits.values()))
    names = [n for n in fit.descriptors if n != "orientation"]
    fig, axes = plt.subplots(2, len(names), figsize=(2.2 * len(names), 4.6))
    for col, name in enumerate(names):
        true = np.asarray(truth[name], dtype=float)
        for snr, fit in fits.items():
            ok = fit.status == 0
            draws = fit.posterior_samples(name, n_draws)[:, ok]
            low = np.quantile(draws, (1 - levels[:, None]) / 2, axis=0)
            high = np.quantile(draws, (1 + levels[:, None]) / 2, axis=0)
            inside = (true[ok] >= low.squeeze(1)) & (true[ok] <= high.squeeze(1))
            axes[0, col].plot(levels, inside.mean(-1), label=f"SNR {snr}")
            if snr == max(fits):
                ranks = np.sum(draws < true[ok], axis=0)
                axes[1, col].hist(ranks, bins=10, range=(0, n_draws), color="C0")
        axes[0, col].plot([0, 1], [0, 1], "k:", lw=0.8)
        axes[0, col].set_title(name.replace("_", " "), fontsize=8)
        axes[1, col].set_xlabel("rank of the truth", fontsize=7)
    axes[0, 0].set_ylabel("coverage", fontsize=8)
    axes[1, 0].set_ylabel(f"voxels (SNR {max(fits)})", fontsize=8)
    axes[0, -1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def add_estimator_arguments(parser):
    """The options that name a cached estimator: its prior, protocol and
    training (``posterior_peers.py`` takes them too, so that the same options
    reuse the same estimator)."""
    parser.add_argument("--resolution", type=int, default=4)
    parser.add_argument("--cell_diameter", type=float, nargs=2, default=(1.0, 25.0))
    parser.add_argument("--min_spacings", type=float, default=3.0)
    parser.add_argument("--n_directions", type=int, default=10)
    parser.add_argument("--n_train", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--left_out", nargs="*", default=(), choices=FAMILIES)
    parser.add_argument(
        "--reference_resolution",
        type=int,
        default=None,
        help="model the training grid's error against this finer grid",
    )
    parser.add_argument("--n_reference", type=int, default=64)
    parser.add_argument(
        "--n_calibration",
        type=int,
        default=1000,
        help="simulations the credible bounds are recalibrated on",
    )
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the held-out draws are simulated and the posterior draws "
        "(cpu or cuda; a training simulates there too)",
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train into --cache_dir even where the package ships an estimator "
        "of the key (the time from an empty cache)",
    )
    parser.add_argument(
        "--default",
        action="store_true",
        help="the default posterior: TissuePrior() and its default_training "
        "(the options above that name a prior or its training are ignored)",
    )
    parser.add_argument(
        "--mixture",
        choices=("in_vivo", "fixed"),
        default=None,
        help="the mixing prior's preset in place of a TissuePrior",
    )
    parser.add_argument(
        "--n_library", type=int, default=64, help="the mixing prior's bundles"
    )


def add_test_arguments(parser):
    """``--test_resolution``: where the held-out tissue is simulated
    (``posterior_peers.py`` takes it too)."""
    parser.add_argument(
        "--test_resolution",
        type=int,
        default=None,
        help="simulate and describe the held-out tissue on this finer grid",
    )


def held_out(simulator, n, *, seed, resolution=None):
    """Held-out signals and truth of a prior: on its own grid, or with
    ``resolution`` the same tissue simulated and described on a finer grid
    (then also the training grid's signals of it; else None)."""
    if resolution is None:
        return (*simulator.sample(n, seed=seed), None)
    coarse, signals, truth = simulator.sample_pairs(
        n, reference_resolution=resolution, seed=seed
    )
    return signals, truth, coarse


def trained_model(args):
    """The estimator the options name, trained here or read from the cache.

    Returns
    -------
    protocol : Protocol
    prior : callable
        ``prior(families=None, **fields)``: a TissuePrior of these options
        (the trained families by default), e.g. for left-out families.
    make_model : callable
        ``make_model(sigma)``: one model per noise level, all sharing the
        cached estimator.
    model : SpinverseModel
        ``make_model(0.01)``, its estimator loaded.
    """
    protocol = demo_protocol(args.n_directions)
    if args.default:
        # As dipy_fit_spinverse reads it from the demo's files: the shipped
        # default estimator's key.
        protocol = _demo_protocol()[0]
    if args.retrain:
        # No shipped file of the key: trained into the cache as a user's
        # would be where the package ships none.
        posterior.cache.SHIPPED = pathlib.Path(tempfile.mkdtemp())
    trained = tuple(f for f in FAMILIES if f not in args.left_out)

    def prior(families=None, **fields):
        if args.mixture:
            preset = getattr(MixturePrior, args.mixture)
            return preset(n_library=args.n_library, **fields)
        if args.default:
            return TissuePrior(**fields)
        return TissuePrior(
            families=trained if families is None else tuple(families),
            resolution=args.resolution,
            cell_diameter=tuple(args.cell_diameter),
            min_spacings=args.min_spacings,
            **fields,
        )

    options = (
        None
        if args.default
        else TrainingOptions(
            n_simulations=args.n_train,
            epochs=args.epochs,
            reference_resolution=args.reference_resolution,
            n_reference=args.n_reference,
            n_calibration=args.n_calibration,
        )
    )

    def make_model(sigma):
        return SpinverseModel(
            protocol,
            fit_method="posterior",
            prior=prior(),
            posterior_options=options,
            sigma=sigma,
            cache_dir=args.cache_dir,
            device=args.device,
        )

    model = make_model(0.01)
    start = time.perf_counter()
    estimator = model.estimator  # trained here, or read from the cache
    print(
        f"training (or cache): {time.perf_counter() - start:.0f} s; "
        f"{sum(p.numel() for p in estimator.parameters()):,} parameters, "
        f"{model.estimator_path}"
    )
    return protocol, prior, make_model, model


def main(argv=None):
    parser = harness.parser(
        __doc__,
        seed=TEST_SEED,
        seed_help="held-out draws (left-out families: seed + 1, "
        "--fixed_permeability: seed + 2)",
    )
    add_estimator_arguments(parser)
    parser.add_argument("--n_test", type=int, default=1000)
    parser.add_argument("--figure", default=None, help="PNG of the calibration")
    parser.add_argument("--fixed_permeability", type=float, default=None)
    parser.add_argument(
        "--small_cells",
        type=float,
        default=5.0,
        help="also score the voxels whose true cell diameter is below this (um)",
    )
    add_test_arguments(parser)
    parser.add_argument(
        "--throughput",
        type=int,
        default=0,
        metavar="N",
        help="also time one fit of N voxels (the held-out signals repeated)",
    )
    args = parser.parse_args(argv)
    if args.quick:  # the shipped default estimator on 8 held-out draws
        args.default, args.n_test = True, 8
        args.throughput = 64
    warnings.simplefilter("ignore", UserWarning)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    protocol, prior, make_model, model = trained_model(args)
    print(machine(model.device))
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    signals, truth, coarse = held_out(
        model.prior, args.n_test, seed=args.seed, resolution=args.test_resolution
    )
    if coarse is not None:
        error = signals - coarse
        print(
            f"held-out tissue on resolution {args.test_resolution}: its signals "
            f"differ from the training grid's by {np.sqrt(np.mean(error**2)):.3g} "
            f"rms (mean over draws {np.sqrt(np.mean(error.mean(0) ** 2)):.3g} rms, "
            f"largest {np.abs(error).max():.3g})"
        )
    simulate = time.perf_counter() - start
    print(f"held-out simulations: {simulate / args.n_test * 1e3:.0f} ms each")
    table, flagged, fits = {}, {}, {}
    for snr in SNRS:
        start = time.perf_counter()
        table[snr], flagged[snr], fits[snr] = score(
            make_model, signals, truth, snr, rng
        )
        per_minute = args.n_test / (time.perf_counter() - start) * 60
        print(f"SNR {snr}: {per_minute:,.0f} voxels a minute (fit and intervals)")
    if args.throughput:
        print_throughput(make_model, signals, args.throughput, rng)
    print_table(
        f"held-out draws of the training prior ({len(signals)})", table, flagged
    )
    small = np.asarray(truth["cell_diameter"]) < args.small_cells
    if small.any():
        parts = {snr: coverage(fits[snr], truth, small) for snr in SNRS}
        print_table(
            f"of which cells under {args.small_cells:g} um ({small.sum()})",
            {snr: rows for snr, (rows, _) in parts.items()},
            {snr: out for snr, (_, out) in parts.items()},
        )
    print_resolution_limit(fits, truth, protocol)
    if args.left_out:
        other = prior(args.left_out).simulator(protocol)
        signals, left = other.sample(args.n_test, seed=args.seed + 1)
        table, flagged = {}, {}
        for snr in SNRS:
            table[snr], flagged[snr], _ = score(make_model, signals, left, snr, rng)
        print_table(f"families left out of training: {args.left_out}", table, flagged)
    if args.fixed_permeability is not None:
        kappa = (args.fixed_permeability,) * 2
        fixed = prior(permeability=kappa)
        signals, _ = fixed.simulator(protocol).sample(args.n_test, seed=args.seed + 2)
        # The prior's spread from its held-out draws above (no new simulation).
        print_widths(make_model, truth, signals, args.fixed_permeability, rng)
    if args.figure:
        figure(args.figure, fits, truth)
        print(f"figure: {args.figure}")


def print_resolution_limit(fits, truth, protocol):
    """The diameter intervals of fibres below and above the protocol's
    resolution limit (Nilsson et al. 2017) at each SNR: below it the data
    cannot tell a fibre from a line, and the 90 % interval should reach
    from the prior's floor to about the limit."""
    diameter = np.asarray(truth["cell_diameter"])
    print("\ncell diameter against the resolution limit (Nilsson et al. 2017)")
    titles = ["SNR", "d_min (um)", "fibres below: n, median 90 % interval (um)"]
    titles += ["fibres of d_min-2 d_min: n, median interval / truth"]
    print(harness.head(titles, spaced=True))
    for snr, fit in fits.items():
        d_min = diameter_resolution_limit(protocol, snr=snr)
        low, high = fit.credible_interval("cell_diameter", level=0.9)
        ok = fit.status == 0
        below = ok & (diameter < d_min)
        above = ok & (diameter >= d_min) & (diameter < 2 * d_min)
        print(
            f"| {snr} | {d_min:.2f} | {below.sum()}, [{np.median(low[below]):.2f}, "
            f"{np.median(high[below]):.2f}] | {above.sum()}, "
            f"[{np.median(low[above] / diameter[above]):.2f}, "
            f"{np.median(high[above] / diameter[above]):.2f}] |"
        )


def print_widths(make_model, prior_truth, signals, kappa, rng):
    """Median width (decades) of the 90 % intervals of permeability and
    exchange time on voxels of one permeability, beside the prior's (the 5-95 %
    range of ``prior_truth``, descriptors of draws of the prior)."""
    print(f"\nmembranes of {kappa:g} m/s: 90 % interval width, decades")
    print(
        f"{'descriptor':>16} {'SNR':>4} {'posterior':>10} {'prior':>6} {'contains':>9}"
    )
    for snr in (100, 30):
        fit = make_model(1.0 / snr).fit(rician(signals, snr, rng))
        ok = fit.status == 0
        for name in ("permeability", "exchange_time"):
            low, high = fit.credible_interval(name, level=0.9)
            width = np.median(np.log10(high[ok] / low[ok]))
            spread = np.log10(np.quantile(prior_truth[name], [0.05, 0.95]))
            contains = np.mean((low[ok] <= kappa) & (high[ok] >= kappa))
            if name != "permeability":
                contains = float("nan")
            print(
                f"{name:>16} {snr:>4} {width:>10.2f} {np.ptp(spread):>6.2f} "
                f"{contains:>9.0%}"
            )


if __name__ == "__main__":
    main()
