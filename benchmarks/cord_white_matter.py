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

Run (the simulations are kept in ``--out`` and resumed; with
``OPENBLAS_NUM_THREADS=1``)::

    python benchmarks/cord_white_matter.py --n 200 --resolve_above 3 --directions 1

``--quick``: 4 draws of each prior, no scores.
"""

import argparse
import pathlib
import time

import numpy as np
import torch
from cord_histology import ridge_predictions, shell_features, white_matter
from scipy import stats

from dipy_spinverse.data import read_cat_spinal_cord
from dipy_spinverse.posterior import TissuePrior
from dipy_spinverse.posterior.white_matter import WhiteMatterPrior

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


def simulate_prior(name, cord, kept, n, seed, out, resolve_above=None):
    """(signals, truth) of ``n`` draws of prior ``name``, resumed from and
    saved to ``out``; the white-matter prior's axons thinner than
    ``resolve_above`` (um) held as sub-grid pools."""
    tag = (
        ""
        if name != "white_matter" or resolve_above is None
        else f"-{resolve_above:g}um"
    )
    path = pathlib.Path(out) / f"{name}{tag}-{len(kept)}v-{n}-{seed}.npz"
    if path.exists():
        saved = np.load(path)
        return saved["signals"], saved["diameter"], saved["fraction"]
    protocol = cord.protocol[kept]
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    if name == "white_matter":
        prior = WhiteMatterPrior.fixed(fibre_axis=AXIS, resolve_above=resolve_above)
        draws = [prior.draw(rng) for _ in range(n)]
        signals = simulated_in_chunks(prior, draws, protocol, path)
        diameter = np.array([d.descriptors["effective_diameter"] for d in draws])
        fraction = np.array([d.descriptors["intra_axonal_fraction"] for d in draws])
    else:
        simulator = TissuePrior(fibre_axis=AXIS).simulator(protocol)
        signals, truth = simulator.sample(n, seed=seed)
        diameter, fraction = truth["cell_diameter"], truth["restricted_fraction"]
    print(f"{name}: {n} draws in {time.perf_counter() - start:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, signals=signals, diameter=diameter, fraction=fraction)
    return signals, diameter, fraction


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


def score(name, features, cord_features, truth, histology, rng):
    """Spearman and median |error| of the ridge trained on simulations."""
    y = np.log(truth)
    alpha = trained_ridge(features, y, rng)
    predicted = np.exp(ridge_predictions(features, y, cord_features, [alpha])[:, 0])
    good = np.isfinite(histology)
    rho = stats.spearmanr(predicted[good], histology[good]).statistic
    error = np.median(np.abs(predicted[good] - histology[good]))
    return rho, error, alpha, np.median(predicted[good])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="cord_white_matter")
    parser.add_argument("--quick", action="store_true")
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
    print(
        "| prior | draws | quantity | Spearman | median abs error | penalty "
        "| median prediction |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for name in ("default", "white_matter"):
        signals, diameter, fraction = simulate_prior(
            name, cord, kept, args.n, args.seed, args.out, args.resolve_above
        )
        if args.quick:
            continue
        features = simulated_features(cord, kept, noisy(signals, snr, rng))
        for quantity, truth, histology in (
            ("d_eff (um)", diameter, h["axon_diameter_effective"]),
            ("intra-axonal fraction", fraction, h["intra_axonal_fraction"]),
        ):
            rho, error, alpha, median = score(
                name, features, cord_features, truth, histology, rng
            )
            print(
                f"| {name} | {args.n} | {quantity} | {rho:.2f} | {error:.2f} "
                f"| {alpha:.3g} | {median:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
