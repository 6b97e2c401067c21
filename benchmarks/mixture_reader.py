"""Regenerates the tables of doc/validation/white_matter.md.

"Gate 2: the untrained reader" (issue 82 item 5): does the mixing prior
(:meth:`MixturePrior.fixed <dipy_spinverse.posterior.MixturePrior.fixed>`,
fibres about the cord's axis z) carry the cat spinal cord's axon diameters?
A ridge regression is trained on mixed voxels only, never on the histology:
``--n`` voxels of the prior on the cord's own protocol (its library of
bundles simulated once and kept in ``--out``, shared with
``benchmarks/prior_check.py``), Rician noise at the relative noise of cord
white-matter voxels drawn at random, and each shell's features: the
envelope's (:func:`~dipy_spinverse.posterior.envelope.shell_features`: the
arcsinh of the mean b0-normalised signal and the relative spread over the
directions) and the mean over the directions within 0.3 of perpendicular,
between, and within 0.3 of parallel to z in cosine. The penalty is chosen
by 5-fold cross-validation on the simulations. The regression then reads
each white-matter voxel's ``d_eff`` and intra-axonal fraction, scored
against the histology (Spearman, median absolute error); its score on
held-out simulations is what the protocol and noise carry.

    python benchmarks/mixture_reader.py --set 3d --n 4000 --out prior_check --drift

``--drift`` and ``--noise`` read the cord as ``prior_check.py`` does;
``--prior`` and ``--run_gain`` train on its mixing priors and its
measurement model of the acquisition (``mixture_fixed_z_cold --run_gain
0.054``: what the fluid around the cord says).

``--quick``: two bundles, 60 voxels; its numbers mean nothing.
"""

import argparse
from dataclasses import replace

import numpy as np
import torch
from cord_histology import ridge_predictions, white_matter
from cord_white_matter import trained_ridge
from prior_check import PRIORS, acquisition_runs, cord_set, with_run_gains
from scipy import stats

from dipy_spinverse.posterior.envelope import shell_features, shell_layout
from dipy_spinverse.posterior.noise import add_noise
from dipy_spinverse.sim.signals import normalise_b0

#: Cosine bands to the cord's axis whose mean signal is a feature.
BANDS = ((0.0, 0.3), (0.3, 0.7), (0.7, 1.01))
#: What is read, the histology map it is scored on, and the flow-free
#: transform the ridge regresses (log of a size, logit of a fraction).
QUANTITIES = (
    ("d_eff (um)", "effective_diameter", "axon_diameter_effective", "log"),
    (
        "intra-axonal fraction",
        "intra_axonal_fraction",
        "intra_axonal_fraction",
        "logit",
    ),
)


def features(signals, protocol):
    """Each shell's envelope features and its mean in each cosine band."""
    normalised = normalise_b0(signals, protocol)
    shells, _ = shell_layout(protocol)
    cosines = np.abs(protocol.bvecs[:, 2])
    banded = []
    for shell in shells:
        for low, high in BANDS:
            rows = shell[(cosines[shell] >= low) & (cosines[shell] < high)]
            if len(rows):
                banded.append(normalised[:, rows].mean(1))
    return np.column_stack([shell_features(normalised, shells), *banded])


def transformed(values, kind):
    values = np.asarray(values, dtype=float)
    return np.log(values) if kind == "log" else np.log(values / (1 - values))


def back(values, kind):
    return np.exp(values) if kind == "log" else 1 / (1 + np.exp(-values))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=("2d", "3d"), default="3d")
    parser.add_argument("--n", type=int, default=4000, help="mixed voxels")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", default="prior_check")
    parser.add_argument("--drift", action="store_true", help="as prior_check.py")
    parser.add_argument("--noise", choices=("b0", "lowest_shell"), default="b0")
    parser.add_argument(
        "--prior",
        choices=[name for name in PRIORS if name.startswith("mixture")],
        default="mixture_fixed_z",
    )
    parser.add_argument(
        "--run_gain", type=float, default=0.0, help="as prior_check.py --run_gains"
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    prior = PRIORS[args.prior]()
    if args.quick:
        args.n, prior = 60, replace(prior, n_library=2)
    cord, kept, data, sigma = cord_set(args.set, drift=args.drift, noise=args.noise)
    protocol = cord.protocol[kept]
    relative = sigma / data[:, protocol.bvals == 0].mean(1)
    wm, _ = white_matter(cord)
    simulator = prior.simulator(protocol, cache_dir=args.out, progress=True)
    signals, truth = simulator.sample(args.n, seed=args.seed, progress=True)
    if args.run_gain:
        runs = acquisition_runs(cord.protocol)[kept]
        weighted = protocol.bvals > 0
        signals = with_run_gains(signals, runs, weighted, args.run_gain, args.seed)
    rng = np.random.default_rng(args.seed)
    # The cord's noise is relative to each voxel's mean b = 0: so is theirs.
    signals = signals / signals[:, protocol.bvals == 0].mean(1, keepdims=True)
    noise = torch.as_tensor(rng.choice(relative, size=len(signals)))
    generator = torch.Generator().manual_seed(args.seed)
    noisy = add_noise(torch.as_tensor(signals), noise, generator).numpy()
    x, x_cord = features(noisy, protocol), features(data, protocol)
    print(
        f"cord {args.set}: {len(kept)} volumes, {len(data)} white-matter voxels; "
        f"{args.n} mixed voxels of {prior.n_library} bundles; {x.shape[1]} features"
    )
    print(
        "\n| quantity | simulations (held out) Spearman | the same within the "
        "cord's 10-90 % | cord Spearman | "
        "cord median abs error | cord median read / histology |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, name, histology_name, kind in QUANTITIES:
        y = transformed(truth[name], kind)
        folds = rng.permutation(len(y)) % 5
        held = np.empty(len(y))
        for k in range(5):
            test = folds == k
            alpha = trained_ridge(x[~test], y[~test], rng)
            held[test] = ridge_predictions(x[~test], y[~test], x[test], [alpha])[:, 0]
        alpha = trained_ridge(x, y, rng)
        read = back(ridge_predictions(x, y, x_cord, [alpha])[:, 0], kind)
        histology = cord.histology[histology_name][cord.mask][wm]
        good = np.isfinite(histology) & np.isfinite(read)
        rho = stats.spearmanr(read[good], histology[good]).statistic
        # The ceiling on the cord: held-out simulations within the span of
        # the cord's own histology (its 10-90 %), where a narrower range
        # leaves less to rank.
        low, high = np.percentile(histology[good], [10, 90])
        truth_values = back(y, kind)
        inside = (truth_values >= low) & (truth_values <= high)
        ceiling = stats.spearmanr(held[inside], y[inside]).statistic
        error = np.median(np.abs(read[good] - histology[good]))
        print(
            f"| {label} | {stats.spearmanr(held, y).statistic:.2f} | "
            f"{ceiling:.2f} | {rho:.2f} | "
            f"{error:.2f} | {np.median(read[good]):.2f} / "
            f"{np.median(histology[good]):.2f} |"
        )


if __name__ == "__main__":
    main()
