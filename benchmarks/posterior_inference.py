"""Regenerates the tables of doc/validation/sections.md.

``--quick``: 100 voxels, 16 draws each, with the shipped estimators.

Inference speed of the shipped posterior estimators (issue 58: 10,000 voxels
a minute on 2 CPU cores).

Fits ``--n_voxels`` voxels with ``SpinverseModel(..., fit_method="posterior")``
on the README demo's protocol (read from the demo's files, the shipped
estimators' key) and prints voxels a minute for the fit and its stored
intervals (status checks, the support test, the flow's draws, the
recalibrated quantiles), per estimator and number of draws per voxel:

``default``
    the default posterior (white matter), a flow built in the sampling
    direction (one network pass per transform and draw);
``demo``
    the demo's posterior (``data.DEMO_PRIOR``), a flow trained before that
    change, built in the density direction (two passes per transform).

The voxels are the estimator's own training signals with Rician noise at
SNR 50, so that none is out of the prior. Run::

    python benchmarks/posterior_inference.py --n_voxels 3000
"""

import argparse
import platform
import time
import warnings

import numpy as np
import torch
from surface_check import _demo_protocol

from dipy_spinverse import SpinverseModel
from dipy_spinverse.data import DEMO_PRIOR, DEMO_TRAINING

SNR = 50.0


def voxels(model, n, rng):
    """``n`` noisy training signals of the model's estimator (b0 = 1)."""
    support = model.estimator.support_signals.numpy().astype(float)
    clean = support[rng.integers(len(support), size=n)]
    noise = rng.standard_normal((2,) + clean.shape) / SNR
    return np.sqrt((clean + noise[0]) ** 2 + noise[1] ** 2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_voxels", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, nargs="+", default=[128, 500])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="100 voxels, 16 draws each (a smoke test)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n_voxels, args.samples = 100, [16]
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)
    protocol = _demo_protocol()[0]
    estimators = {
        "default": {},
        "demo": dict(prior=DEMO_PRIOR, posterior_options=DEMO_TRAINING),
    }
    rng = np.random.default_rng(0)
    rows = []
    for name, options in estimators.items():
        for n in args.samples:
            model = SpinverseModel(
                protocol,
                fit_method="posterior",
                sigma=1 / SNR,
                n_posterior_samples=n,
                **options,
            )
            data = voxels(model, args.n_voxels, rng)
            model.fit(data[:50])  # load the estimator outside the timing
            start = time.perf_counter()
            fit = model.fit(data)
            seconds = time.perf_counter() - start
            ok = float(np.mean(fit.status == 0))
            rows.append((name, n, args.n_voxels / seconds * 60, ok))
    print(
        f"\n{platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, {args.n_voxels} voxels, SNR {SNR:g}"
    )
    print("| estimator | draws per voxel | voxels a minute | status ok |")
    print("| --- | ---: | ---: | ---: |")
    for name, n, per_minute, ok in rows:
        print(f"| {name} | {n} | {per_minute:,.0f} | {ok:.1%} |")


if __name__ == "__main__":
    main()
