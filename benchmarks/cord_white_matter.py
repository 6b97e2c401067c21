"""Regenerates the tables of doc/validation/white_matter.md.

"The cord, read through simulations": does the white-matter prior's physics
(:class:`~dipy_spinverse.posterior.white_matter.WhiteMatterPrior`, fixed
tissue, fibres along the cord's axis z) carry the cat spinal cord's axon
diameters, where the default prior's did not?

A ridge regression is trained on simulated voxels only (never on the
histology): ``--n`` draws of the prior, simulated on the cord's own
AxCaliber scheme (every timing and gradient strength, ``--directions`` of
its four in-plane directions, two by default: the features average them),
Rician noise at the cord's white-matter SNR, the features of
``benchmarks/cord_histology.py --oracle`` (each timing's signal over its b
= 0, averaged per gradient strength, and their logarithms), the penalty
chosen by 5-fold cross-validation on the simulations. It then predicts
each cord voxel's ``d_eff`` and intra-axonal fraction, scored against the
histology in white matter (Spearman, median absolute error). The same
regression trained on the default prior's draws (one diffusivity, no
myelin, 1-4 axons; ``TissuePrior(fibre_axis=(0, 0, 1))``: its
``cell_diameter`` and ``restricted_fraction``) is the control. This bounds
what a posterior trained on either prior can read, short of training one.

Scores are means (and spreads) over ``--repeats`` draws of the simulated
noise. Three more tables say why a score is what it is:

- the same regression read on held-out *simulations* (5 folds): what the
  protocol and noise carry, the ceiling of any reader trained on that
  prior;
- the cord's score against the number of draws (quarter, half, all): a
  score that does not grow with the draws is not held back by them;
- a prior predictive check: the cord's voxels inside the simulations' 95 %
  region (Mahalanobis distance in the first ten principal components of
  the standardised features), and the feature where most cord voxels fall
  outside the simulations' 1-99 % range;
- what a two-compartment model (a Gaussian-phase cylinder, hindered water
  and a non-decaying pool) reads in the median signal of the cord and of
  each prior's simulations, and (``--probe``) in one draw as one tissue
  setting changes at a time; and the cord's tensor from its 3-D set.

Run (the simulations are kept in ``--out`` and resumed; with
``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1`` beside other work: two torch
threads on two shared cores made a draw eight times slower)::

    python benchmarks/cord_white_matter.py --n 200 --resolve_above 3 \\
        --directions 1 --probe

``--quick``: 4 draws of each prior, no scores.
"""

import pathlib
import time

import harness
import numpy as np
import torch
from cord_histology import ridge_predictions, shell_features, white_matter
from scipy import optimize, stats

from dipy_spinverse.data import read_cat_spinal_cord
from dipy_spinverse.posterior import TissuePrior
from dipy_spinverse.posterior.white_matter import WhiteMatterPrior
from dipy_spinverse.sim.analytic import cylinder_gpa_pgse

ALPHAS = np.geomspace(1e-3, 1e4, 29)
AXIS = (0.0, 0.0, 1.0)


def simulated_volumes(cord, n_directions=2):
    """The scheme's volumes simulated: every b = 0, and the first
    ``n_directions`` directions of each timing and gradient strength."""
    strength = np.round(cord.protocol.gradient_strength, 4)
    b0 = np.asarray(cord.gtab.b0s_mask)
    keep = [np.flatnonzero(b0)]
    for _, rows in cord.protocol.groups():
        rows = rows[~b0[rows]]
        for level in np.unique(strength[rows]):
            keep.append(rows[strength[rows] == level][:n_directions])
    return np.sort(np.concatenate(keep))


def simulated_features(cord, kept, signals):
    """:func:`shell_features` of simulated signals of the volumes ``kept``:
    each volume over its timing's simulated b = 0."""
    b0 = np.asarray(cord.gtab.b0s_mask)
    full = np.full((len(signals), len(b0)), np.nan)
    full[:, kept] = signals
    levels = np.empty_like(full)
    for _, rows in cord.protocol.groups():
        levels[:, rows] = np.nanmean(full[:, rows[b0[rows]]], axis=1)[:, None]

    class _Simulated:  # the attributes shell_features reads
        data = full
        mask = np.ones(len(full), dtype=bool)
        protocol = cord.protocol
        gtab = cord.gtab

    return shell_features(_Simulated, levels, keep=kept)


def simulate_prior(
    name, cord, kept, n, seed, out, resolve_above=None, fibre_fraction=None
):
    """(signals, truth) of ``n`` draws of prior ``name``, resumed from and
    saved to ``out``; the white-matter prior's axons thinner than
    ``resolve_above`` (um) held as sub-grid pools, its fibre fraction
    drawn from ``fibre_fraction`` (low, high) where given (a diagnostic:
    the preset's range is the literature's)."""
    tag = ""
    if name == "white_matter" and resolve_above is not None:
        tag += f"-{resolve_above:g}um"
    if name == "white_matter" and fibre_fraction is not None:
        tag += "-ff{:g}-{:g}".format(*fibre_fraction)
    path = pathlib.Path(out) / f"{name}{tag}-{len(kept)}v-{n}-{seed}.npz"

    def build():
        protocol = cord.protocol[kept]
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        if name == "white_matter":
            changes = {}
            if fibre_fraction is not None:
                changes["fibre_fraction"] = fibre_fraction
            prior = WhiteMatterPrior.fixed(
                fibre_axis=AXIS, resolve_above=resolve_above, **changes
            )
            draws = [prior.draw(rng) for _ in range(n)]
            signals = simulated_in_chunks(prior, draws, protocol, path)
            diameter = [d.descriptors["effective_diameter"] for d in draws]
            fraction = [d.descriptors["intra_axonal_fraction"] for d in draws]
            diameter, fraction = np.array(diameter), np.array(fraction)
        else:
            simulator = TissuePrior(fibre_axis=AXIS).simulator(protocol)
            signals, truth = simulator.sample(n, seed=seed)
            diameter, fraction = truth["cell_diameter"], truth["restricted_fraction"]
        print(f"{name}: {n} draws in {time.perf_counter() - start:.0f} s", flush=True)
        return dict(signals=signals, diameter=diameter, fraction=fraction)

    saved = harness.cached(path, build)
    return saved["signals"], saved["diameter"], saved["fraction"]


def simulated_in_chunks(prior, draws, protocol, path, chunk=10):
    """``prior.simulate(draws, protocol)``, ``chunk`` draws at a time, kept
    in a partial file beside ``path`` so that a stopped run resumes."""
    partial = path.with_suffix(".partial.npy")
    done = np.load(partial) if partial.exists() else np.empty((0, len(protocol)))
    for lo in range(len(done), len(draws), chunk):
        # float32: 2.4x faster than float64, within 1e-5 of it (the cord's
        # noise is 3e-3 of b = 0).
        signals = prior.simulate(draws[lo : lo + chunk], protocol, dtype=torch.float32)
        done = np.concatenate([done, signals])
        partial.parent.mkdir(parents=True, exist_ok=True)
        np.save(partial, done)
        print(f"  {len(done)} of {len(draws)} draws", flush=True)
    return done


def noisy(signals, snr, rng):
    """Rician magnitudes of ``signals`` at a b = 0 SNR drawn from ``snr``."""
    sigma = 1.0 / rng.choice(snr, size=(len(signals), 1))
    real = signals + sigma * rng.standard_normal(signals.shape)
    imag = sigma * rng.standard_normal(signals.shape)
    return np.hypot(real, imag)


def trained_ridge(x, y, rng, n_folds=5):
    """The penalty of least cross-validated error on the simulations."""
    folds = rng.permutation(len(y)) % n_folds
    errors = np.zeros(len(ALPHAS))
    for k in range(n_folds):
        test = folds == k
        predicted = ridge_predictions(x[~test], y[~test], x[test], ALPHAS)
        errors += ((predicted - y[test, None]) ** 2).sum(0)
    return ALPHAS[int(np.argmin(errors))]


def score(features, cord_features, truth, histology, rng):
    """Spearman and median |error| of the ridge trained on simulations."""
    y = np.log(truth)
    alpha = trained_ridge(features, y, rng)
    predicted = np.exp(ridge_predictions(features, y, cord_features, [alpha])[:, 0])
    good = np.isfinite(histology)
    rho = stats.spearmanr(predicted[good], histology[good]).statistic
    error = np.median(np.abs(predicted[good] - histology[good]))
    return rho, error, alpha, np.median(predicted[good])


def simulated_ceiling(features, truth, rng, n_folds=5):
    """Spearman of the ridge on held-out simulations (``n_folds`` folds)."""
    y = np.log(truth)
    folds = rng.permutation(len(y)) % n_folds
    predicted = np.empty(len(y))
    for k in range(n_folds):
        test = folds == k
        alpha = trained_ridge(features[~test], y[~test], rng)
        predicted[test] = ridge_predictions(
            features[~test], y[~test], features[test], [alpha]
        )[:, 0]
    return stats.spearmanr(predicted, y).statistic


def learning_curve(features, cord_features, truth, histology, rng, repeats=5):
    """The cord's Spearman trained on a quarter, half and all of the draws
    (means over ``repeats`` subsets)."""
    n = len(truth)
    curve = {}
    for size in (n // 4, n // 2, n):
        rhos = []
        for _ in range(repeats if size < n else 1):
            rows = rng.permutation(n)[:size]
            rhos.append(
                score(features[rows], cord_features, truth[rows], histology, rng)[0]
            )
        curve[size] = float(np.mean(rhos))
    return curve


def prior_predictive(features, cord_features, labels, n_components=10):
    """Where the cord's features lie against the simulations'.

    Returns
    -------
    inside : float
        Share of cord voxels whose Mahalanobis distance (first
        ``n_components`` principal components of the features standardised
        on the simulations) is within the simulations' 95th percentile.
    simulated, cord : float
        Median distances.
    worst : str
        The feature with the largest share of cord voxels outside the
        simulations' 1-99 % range, with that range and the cord's median.
    """
    centre, scale = features.mean(0), features.std(0) + 1e-12
    z, zc = (features - centre) / scale, (cord_features - centre) / scale
    _, singular, axes = np.linalg.svd(z, full_matrices=False)
    spread = singular[:n_components] / np.sqrt(len(z))

    def distance(x):
        return np.linalg.norm(x @ axes[:n_components].T / spread, axis=1)

    own, theirs = distance(z), distance(zc)
    inside = float(np.mean(theirs <= np.percentile(own, 95)))
    n = len(labels)  # the signals, then their logarithms
    low, high = np.percentile(features[:, :n], [1, 99], axis=0)
    outside = np.mean((cord_features[:, :n] < low) | (cord_features[:, :n] > high), 0)
    k = int(np.argmax(outside))
    worst = (
        f"{labels[k]}: {outside[k]:.0%} outside [{low[k]:.2f}, {high[k]:.2f}] "
        f"(cord median {np.median(cord_features[:, k]):.2f})"
    )
    return inside, float(np.median(own)), float(np.median(theirs)), worst


def feature_acquisitions(cord):
    """Each feature's label, gradient rate (rad/(um us)), delta and Delta
    (us) and b-value (ms/um^2), in ``shell_features``' order."""
    strength = np.round(cord.protocol.gradient_strength, 4)
    rate = np.linalg.norm(cord.protocol.gradient_rate, axis=1)
    b0 = np.asarray(cord.gtab.b0s_mask)
    labels, values = [], []
    for timing, rows in cord.protocol.groups():
        rows = rows[~b0[rows]]
        for level in np.unique(strength[rows]):
            at = rows[strength[rows] == level]
            b = cord.gtab.bvals[at].mean()
            labels.append(
                f"delta {timing.small_delta * 1e3:g} / Delta "
                f"{timing.big_delta * 1e3:g} ms, b {b:.0f} s/mm^2"
            )
            values.append(
                (rate[at].mean(), timing.small_delta * 1e6, timing.big_delta * 1e6, b)
            )
    g, delta, big_delta, b = np.array(values).T
    return labels, (g, delta, big_delta, b * 1e-3)


def two_compartment_reading(signal, acquisitions):
    """What a two-compartment model reads in a signal across the fibres:
    ``f_i S_cyl(R, D_i) + f_dot + (1 - f_i - f_dot) exp(-b D_e)`` (the
    Gaussian-phase cylinder, a non-decaying pool, hindered water), least
    squares from three starts.

    Returns
    -------
    dict
        f_i, R (um), D_i and D_e (um^2/ms), f_dot, and the RMS residual.
    """
    g, delta, big_delta, b = acquisitions

    def model(p):
        f_i, radius, d_i, d_e, f_dot = p
        inside = cylinder_gpa_pgse(g, delta, big_delta, radius, d_i * 1e-3)
        return f_i * inside + f_dot + (1 - f_i - f_dot) * np.exp(-b * d_e)

    bounds = ([0, 0.2, 0.2, 0.1, 0], [1, 8, 3, 3, 0.3])
    fits = [
        optimize.least_squares(lambda p: model(p) - signal, start, bounds=bounds)
        for start in (
            [0.4, 2.5, 1.0, 0.8, 0],
            [0.2, 3, 1.5, 1.5, 0],
            [0.6, 1.5, 0.8, 0.5, 0],
        )
    ]
    best = min(fits, key=lambda fit: fit.cost)
    rms = np.sqrt(2 * best.cost / len(signal))
    return dict(zip(("f_i", "R", "D_i", "D_e", "f_dot"), best.x, strict=True), rms=rms)


def cord_tensor(wm):
    """The cord's white-matter diffusion tensor from its 3-D set (b <=
    1,700 s/mm^2, delta 3 / Delta 30 ms): median AD, RD (um^2/ms), FA, and
    the median angle (degrees) of the principal direction to z."""
    import dipy.reconst.dti as dti
    from dipy.core.gradients import gradient_table

    cord = read_cat_spinal_cord("3d")
    low = cord.gtab.bvals <= 1800
    gtab = gradient_table(cord.gtab.bvals[low], bvecs=cord.gtab.bvecs[low])
    fit = dti.TensorModel(gtab).fit(cord.data[cord.mask][wm][:, low])
    angle = np.degrees(np.arccos(np.abs(fit.evecs[:, 2, 0])))
    return (
        np.median(fit.ad) * 1e3,
        np.median(fit.rd) * 1e3,
        np.median(fit.fa),
        np.median(angle),
    )


#: One draw's settings (seed 0): a dozen 4 um axons at the histology's
#: fibre fraction, then one setting changed at a time (``--probe``).
PROBE_BASE = dict(
    mean_diameter=(4.0, 4.0),
    n_axons=(12, 12),
    fibre_fraction=(0.65, 0.65),
    g_ratio=(0.6, 0.7),
    permeability=(1e-5, 1e-5),
)
PROBE_CHANGES = {
    "none": {},
    "permeability 3e-3 m/s": dict(permeability=(3e-3, 3e-3)),
    "permeability 3e-3 m/s, myelin D 1.0": dict(
        permeability=(3e-3, 3e-3), myelin_diffusivity=(1e-3, 1e-3)
    ),
    "fibre fraction 0.3": dict(fibre_fraction=(0.3, 0.3)),
    "extra-axonal D 2.0": dict(extra_diffusivity=(2e-3, 2e-3)),
}


def settings_probe(cord, kept, acquisitions, resolve_above):
    """The two-compartment reading of one draw's signal as one setting of
    the fixed preset changes at a time (:data:`PROBE_CHANGES`)."""
    protocol = cord.protocol[kept]
    n = len(acquisitions[0])
    titles = ["changed", "fibre fraction", "f_i", "D_e across (um^2/ms)"]
    print(
        "\nOne draw, one setting changed at a time (two-compartment reading):\n\n"
        + harness.head([*titles, "non-decaying"], "-rrrr")
    )
    for name, change in PROBE_CHANGES.items():
        prior = WhiteMatterPrior.fixed(
            fibre_axis=AXIS, resolve_above=resolve_above, **{**PROBE_BASE, **change}
        )
        draw = prior.draw(np.random.default_rng(0))
        signals = prior.simulate([draw], protocol, dtype=torch.float32)
        features = simulated_features(cord, kept, signals)[0, :n]
        r = two_compartment_reading(features, acquisitions)
        myelin, intra = (
            draw.descriptors[k] for k in ("myelin_fraction", "intra_axonal_fraction")
        )
        fibres = myelin + intra * (1 - myelin)  # as histology's fr + MVF
        cells = (fibres, r["f_i"], r["D_e"], r["f_dot"])
        print(harness.row([name, *(f"{v:.2f}" for v in cells)]), flush=True)


def main(argv=None):
    parser = harness.parser(
        __doc__,
        seed=0,
        quick="4 draws of each prior, no scores",
        out="cord_white_matter",
    )
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument(
        "--resolve_above",
        type=float,
        default=None,
        help="white-matter axons thinner than this (um) as sub-grid pools",
    )
    parser.add_argument(
        "--directions",
        type=int,
        default=2,
        help="in-plane directions simulated per timing and gradient strength",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="draws of the simulated noise"
    )
    parser.add_argument(
        "--fibre_fraction",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="draw the white-matter fibre fraction from this range (a "
        "diagnostic; the preset's is the literature's 0.4-0.8)",
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help="also read one draw with one tissue setting changed at a time",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n = 4
    cord = read_cat_spinal_cord("2d")
    sigma, levels = cord.repeated_b0_noise(cord.mask)
    wm, _ = white_matter(cord)
    snr = (levels.mean(1) / sigma)[wm]
    kept = simulated_volumes(cord, args.directions)
    cord_features = shell_features(cord, levels)[wm]
    h = {k: v[cord.mask][wm] for k, v in cord.histology.items()}
    rng = np.random.default_rng(args.seed)
    print(
        f"cord: {len(kept)} of {len(cord.protocol)} volumes simulated; white "
        f"matter {wm.sum()} voxels, SNR median {np.median(snr):.0f}"
    )
    read = {}
    for name in ("default", "white_matter"):
        signals, diameter, fraction = simulate_prior(
            name,
            cord,
            kept,
            args.n,
            args.seed,
            args.out,
            args.resolve_above,
            args.fibre_fraction,
        )
        if not args.quick:
            read[name] = (signals, diameter, fraction)
    if args.quick:
        return
    labels, acquisitions = feature_acquisitions(cord)
    quantities = (
        ("d_eff (um)", 1, h["axon_diameter_effective"]),
        ("intra-axonal fraction", 2, h["intra_axonal_fraction"]),
    )
    titles = ["prior", "draws", "quantity", "simulations (held out)"]
    titles += ["cord Spearman", "cord median abs error", "median prediction"]
    print(
        f"\nScores, mean (spread) over {args.repeats} draws of the noise:\n\n"
        + harness.head(titles, "-r-rrrr")
    )
    curves, checks = [], []
    for name, (signals, *truths) in read.items():
        runs = []
        for repeat in range(args.repeats):
            features = simulated_features(cord, kept, noisy(signals, snr, rng))
            runs.append(
                [
                    (
                        simulated_ceiling(features, truths[i - 1], rng),
                        *score(features, cord_features, truths[i - 1], hist, rng),
                    )
                    for _, i, hist in quantities
                ]
            )
            if repeat == 0:
                checks.append(
                    (
                        name,
                        prior_predictive(features, cord_features, labels),
                    )
                )
                for quantity, i, hist in quantities:
                    curve = learning_curve(
                        features, cord_features, truths[i - 1], hist, rng
                    )
                    curves.append((name, quantity, curve))
        runs = np.array(runs)  # (repeats, quantities, 5)
        for q, (quantity, _, _) in enumerate(quantities):
            mean, spread = runs[:, q].mean(0), runs[:, q].std(0)
            cells = [name, len(signals), quantity, f"{mean[0]:.2f}"]
            cells += [f"{mean[1]:.2f} ({spread[1]:.2f})", f"{mean[2]:.2f}"]
            print(harness.row([*cells, f"{mean[4]:.2f}"]), flush=True)
    print("\nThe cord's Spearman against the draws trained on:\n")
    sizes = list(curves[0][2])
    titles = ["prior", "quantity", *(f"{n} draws" for n in sizes)]
    print(harness.head(titles, "--" + "r" * len(sizes)))
    for name, quantity, curve in curves:
        print(harness.row([name, quantity, *(f"{curve[n]:.2f}" for n in sizes)]))
    titles = ["prior", "cord voxels inside the simulations' 95 % region"]
    titles += ["median distance, simulations", "median distance, cord"]
    titles += ["feature most outside"]
    print("\nPrior predictive check:\n\n" + harness.head(titles, "-rrr-"))
    for name, (inside, own, theirs, worst) in checks:
        cells = [name, f"{inside:.0%}", f"{own:.1f}", f"{theirs:.1f}", worst]
        print(harness.row(cells))
    titles = ["signal", "f_i", "R (um)", "D_i (um^2/ms)", "D_e across (um^2/ms)"]
    print(
        "\nA two-compartment reading of the median signal across the fibres "
        "(noise-free simulations):\n\n"
        + harness.head([*titles, "non-decaying", "rms"], "-rrrrrr")
    )
    n = len(labels)
    medians = {"cord white matter": np.median(cord_features[:, :n], 0)}
    for name, (signals, *_) in read.items():
        medians[name] = np.median(simulated_features(cord, kept, signals)[:, :n], 0)
    for name, median in medians.items():
        r = two_compartment_reading(median, acquisitions)
        cells = (r[k] for k in ("f_i", "R", "D_i", "D_e", "f_dot"))
        print(harness.row([name, *(f"{v:.2f}" for v in cells), f"{r['rms']:.3f}"]))
    if args.probe:
        settings_probe(cord, kept, acquisitions, args.resolve_above)
    ad, rd, fa, angle = cord_tensor(wm)
    print(
        f"\nThe cord's white-matter tensor (3-D set, b <= 1,700 s/mm^2): AD "
        f"{ad:.2f}, RD {rd:.2f} um^2/ms, FA {fa:.2f}; principal direction "
        f"{angle:.1f} degrees from z (medians)."
    )


if __name__ == "__main__":
    main()
