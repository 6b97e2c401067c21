"""Regenerates the tables of doc/validation/white_matter.md.

How many simulated bundles does a mixing prior's library need? For each
size ``N`` of ``--sizes``, the posterior of :meth:`MixturePrior.fixed
<dipy_spinverse.posterior.MixturePrior.fixed>` (fibres about the cord's
axis, ``n_library=N``) on the cat cord's 3-D protocol (796 volumes) is
trained through ``SpinverseModel(..., fit_method="posterior", prior=...)``
(the bundles are the first ``N`` of one stored library: simulated once,
kept in ``--out``). Every posterior is scored on the same held-out voxels,
mixed from the largest library (so a smaller library has not seen most of
their bundles), with Rician noise at each SNR: per descriptor, how often the
90 % interval holds the truth (target 85-95 %), its median width and the
median error of the posterior median, and the share flagged
``OUT_OF_PRIOR``. Where a larger library stops narrowing the intervals or
mending their coverage, more bundles stop helping.

    python benchmarks/library_size.py --sizes 8 16 32 64 --out prior_check_3d

``--quick``: two libraries of 2 and 3 bundles on 40 held-out voxels, a
network trained for 2 epochs on 200 voxels; its numbers mean nothing.
"""

import logging
import time
import warnings

import harness
import numpy as np
from posterior_calibration import rician

from dipy_spinverse import SpinverseModel
from dipy_spinverse.data import read_cat_spinal_cord
from dipy_spinverse.posterior import MixturePrior, TrainingOptions

SNRS = (20, 50, 200)
# Held-out voxels: a seed far from the trainings' (0) and their calibration's.
TEST_SEED = 424_242
Z = (0.0, 0.0, 1.0)


def prior(n_library):
    """The fixed-tissue mixing prior about the cord's axis, ``n_library``
    bundles."""
    return MixturePrior.fixed(fibre_axis=Z, n_library=n_library)


def score(fit, truth):
    """Per descriptor: 90 % coverage, median 90 % width and median |error|
    over the voxels not flagged; and the flagged share."""
    ok = fit.status == 0
    rows = {}
    for name in fit.descriptors:
        low, high = fit.credible_interval(name, 0.9)
        true = np.asarray(truth[name], dtype=float)[ok]
        low, high = low[ok], high[ok]
        rows[name] = (
            np.mean((true >= low) & (true <= high)),
            np.median(high - low),
            np.median(np.abs(getattr(fit, name)[ok] - true)),
        )
    return rows, 1 - ok.mean()


def main(argv=None):
    parser = harness.parser(__doc__, seed=TEST_SEED, out="library_size")
    parser.add_argument("--sizes", type=int, nargs="+", default=(8, 16, 32, 64))
    parser.add_argument("--n_train", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--n_test", type=int, default=400)
    args = parser.parse_args(argv)
    options = dict(n_simulations=args.n_train, epochs=args.epochs)
    if args.quick:
        args.sizes, args.n_test = (2, 3), 40
        options = dict(n_simulations=200, epochs=2, n_calibration=40)
    warnings.simplefilter("ignore", UserWarning)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cord = read_cat_spinal_cord("3d")
    protocol = cord.protocol[np.arange(len(cord.protocol))]
    sizes = sorted(args.sizes)

    def model(n_library, snr):
        return SpinverseModel(
            protocol,
            fit_method="posterior",
            prior=prior(n_library),
            posterior_options=TrainingOptions(**options),
            sigma=1.0 / snr,  # the held-out signals are relative to b = 0
            cache_dir=args.out,
        )

    start = time.perf_counter()
    simulator = model(sizes[-1], SNRS[0]).prior
    signals, truth = simulator.sample(args.n_test, seed=args.seed)
    print(
        f"{args.n_test} held-out voxels of the {sizes[-1]}-bundle library: "
        f"{time.perf_counter() - start:.0f} s (its library simulated or read)"
    )
    rng = np.random.default_rng(args.seed)
    noisy = {snr: rician(signals, snr, rng) for snr in SNRS}
    results = {}
    for size in sizes:
        start = time.perf_counter()
        model(size, SNRS[0]).estimator  # noqa: B018 - trained or read
        seconds = time.perf_counter() - start
        print(f"library of {size}: training (or cache) {seconds:.0f} s")
        for snr in SNRS:
            results[size, snr] = score(model(size, snr).fit(noisy[snr]), truth)
    names = next(iter(results.values()))[0]
    titles = ["descriptor", "SNR"]
    titles += [f"{n} bundles: 90 % cover, width, error" for n in sizes]
    rows = []
    for name in names:
        for snr in SNRS:
            cells = [name, snr]
            for size in sizes:
                cover, width, error = results[size, snr][0][name]
                cells.append(f"{cover:.0%}, {width:.3g}, {error:.3g}")
            rows.append(cells)
    for snr in SNRS:
        cells = ["OUT_OF_PRIOR", snr]
        rows.append(cells + [f"{results[n, snr][1]:.0%}" for n in sizes])
    print(harness.table(titles, rows))


if __name__ == "__main__":
    main()
