"""Regenerates the tables of doc/validation/real_tissue.md.

``--quick``: ActiveAx alone (the posterior trains for minutes); needs the dmipy
1.0.5 files, and the tests skip it without them (-m slow).

Axon diameter and intra-axonal fraction against histology: the cat spinal cord.

The slice of Duval et al. (``dipy_spinverse.data.read_cat_spinal_cord``: 968
voxels with axons, the 2-D AxCaliber set) fitted by the package's
compartment models and its posterior, each compared with the per-voxel
histology (issue 61): the diameter MRI sees, ``d_eff = (<d^6>/<d^2>)^(1/4)``,
and the axons' share of the visible water, ``fr / (1 - MVF)``, over all
voxels and over the white matter (myelin fraction above Otsu's threshold);
"rho(S0)" is each estimate's Spearman correlation with the b = 0 signal.
The settings come from the anatomy and the protocol, not the histology
(the page gives them): ActiveAx and NODDI take fixed tissue's d_par (0.6
um^2/ms), ZCD fits its diffusivities, and the posterior's prior fixes the
cord's axis (z) and draws the diffusivity from 0.3-3 um^2/ms. The noise
comes from the repeated b = 0 volumes of each timing; the posterior is
given sigma = median b = 0 / 300 (in the data's units), the top of its
training noise. It is trained for the
protocol it fits, a subset of the 1,791 volumes (every b = 0 and every
``--every``-th gradient strength of each timing and direction, from the
strongest down: the same q range and timings).

    python benchmarks/cord_histology.py --models activeax zcd noddi
    python benchmarks/cord_histology.py --models posterior --cache_dir DIR

Prints one table per quantity, over all 968 voxels and over the white
matter alone, and keeps each model's per-voxel estimates in ``--out_dir``
(``estimates_<model>.npz``): a later run with other ``--models`` joins them
into the same tables. ``--seed`` seeds torch's global generator (the fits
draw nothing else at random).
"""

import argparse
import pathlib
import platform
import time

import numpy as np
import torch
from dipy.segment.threshold import otsu
from scipy import stats

from dipy_spinverse.data import read_cat_spinal_cord
from dipy_spinverse.io.datasets import thin_qspace
from dipy_spinverse.posterior import TrainingOptions
from dipy_spinverse.sim.limits import diameter_resolution_limit

MODELS = ("activeax", "zcd", "noddi", "posterior")
# Fixed tissue's intrinsic diffusivity given to ActiveAx and NODDI (mm^2/s),
# as ActiveAxModel's documentation suggests for fixed tissue.
D_FIXED = 0.6e-3


def white_matter(dataset):
    """Voxels of the mask above Otsu's threshold of the myelin fraction."""
    myelin = dataset.histology["myelin_fraction"][dataset.mask]
    threshold = otsu(myelin, nbins=64)
    return myelin >= threshold, float(threshold)


def fit_compartments(name, dataset):
    from dipy_spinverse.compartments import ActiveAxModel, NoddiModel, ZcdModel

    model = {
        "activeax": lambda g: ActiveAxModel(g, d_par=D_FIXED, dot=True),
        "zcd": ZcdModel,
        "noddi": lambda g: NoddiModel(g, d_par=D_FIXED),
    }[name](dataset.gtab)
    start = time.perf_counter()
    fit = model.fit(dataset.data[dataset.mask])
    seconds = time.perf_counter() - start
    out = {"seconds": seconds}
    if hasattr(fit, "diameter"):
        out["diameter"] = np.asarray(fit.diameter, dtype=float)
    fraction = getattr(fit, "fic", None)
    if fraction is None:
        fraction = getattr(fit, "ndi", None)
    if fraction is not None:
        out["restricted_fraction"] = np.asarray(fraction, dtype=float)
    return out


def fit_posterior(dataset, sigma, every, cache_dir):
    from dipy_spinverse import SpinverseModel
    from dipy_spinverse.posterior import TissuePrior

    rows, gtab = thin_qspace(dataset, every)
    prior = TissuePrior(fibre_axis=(0, 0, 1), diffusivity=(0.3e-3, 3e-3))
    start = time.perf_counter()
    model = SpinverseModel(
        gtab,
        fit_method="posterior",
        prior=prior,
        sigma=sigma,
        cache_dir=cache_dir,
    )
    trained = time.perf_counter() - start
    start = time.perf_counter()
    fit = model.fit(dataset.data[..., rows], mask=dataset.mask)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "training_seconds": trained, "n_volumes": len(rows)}
    out["status"] = np.asarray(fit.status)[dataset.mask]
    for name in ("cell_diameter", "restricted_fraction"):
        key = "diameter" if name == "cell_diameter" else name
        out[key] = np.asarray(getattr(fit, name))[dataset.mask]
        for level in (0.5, 0.9):
            low, high = fit.credible_interval(name, level)
            out[f"{key}_{level}"] = (low[dataset.mask], high[dataset.mask])
    return out


def compare(estimate, truth, s0, interval=None):
    """Agreement of ``estimate`` with ``truth`` over the voxels where both are
    finite, and the estimate's rank correlation with the b = 0 signal."""
    ok = np.isfinite(estimate) & np.isfinite(truth)
    row = {
        "n": int(ok.sum()),
        "spearman": float(stats.spearmanr(estimate[ok], truth[ok])[0]),
        "pearson": float(stats.pearsonr(estimate[ok], truth[ok])[0]),
        "median_abs_error": float(np.median(np.abs(estimate[ok] - truth[ok]))),
        "median_estimate": float(np.median(estimate[ok])),
        "spearman_s0": float(stats.spearmanr(estimate[ok], s0[ok])[0]),
    }
    if interval is not None:
        low, high = interval
        inside = ok & np.isfinite(low)
        row["coverage_90"] = float(
            np.mean((low[inside] <= truth[inside]) & (truth[inside] <= high[inside]))
        )
        row["width_90"] = float(np.median(high[inside] - low[inside]))
    return row


def flatten(result):
    """A model's result as flat arrays for ``np.savez`` (intervals split)."""
    flat = {}
    for key, value in result.items():
        if isinstance(value, tuple):
            flat[f"{key}_low"], flat[f"{key}_high"] = value
        else:
            flat[key] = np.asarray(value)
    return flat


def unflatten(arrays):
    """The inverse of :func:`flatten`."""
    result = {}
    for key in arrays.files:
        if key.endswith("_low"):
            stem = key[: -len("_low")]
            result[stem] = (arrays[key], arrays[f"{stem}_high"])
        elif not key.endswith("_high"):
            result[key] = arrays[key]
    return result


def print_table(title, rows):
    print(f"\n{title}")
    header = (
        "| model | n | Spearman | Pearson | median abs error | median | "
        "90 % holds truth | 90 % width | rho(S0) |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, r in rows.items():
        cover = f"{100 * r['coverage_90']:.0f} %" if "coverage_90" in r else "--"
        width = f"{r['width_90']:.2f}" if "width_90" in r else "--"
        print(
            f"| {name} | {r['n']} | {r['spearman']:.2f} | {r['pearson']:.2f} | "
            f"{r['median_abs_error']:.2f} | {r['median_estimate']:.2f} | {cover} | "
            f"{width} | {r['spearman_s0']:.2f} |"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--dmipy", default=None, help="dmipy installation or wheel")
    parser.add_argument("--out_dir", default="cord_histology")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test, not a measurement"
    )
    args = parser.parse_args(argv)
    if args.quick:  # ActiveAx alone; the posterior trains for minutes
        args.models = ["activeax"]
    torch.manual_seed(args.seed)
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    cord = read_cat_spinal_cord("2d", path=args.dmipy)
    sigma, levels = cord.repeated_b0_noise(cord.mask)
    s0 = levels[:, cord.gtab.b0s_mask].mean(-1)
    snr = float(np.median(s0 / sigma))
    limit = diameter_resolution_limit(cord.protocol, snr=snr, diffusivity=D_FIXED)
    print(
        f"{cord.name}: {int(cord.mask.sum())} voxels, {len(cord.protocol)} volumes; "
        f"SNR of the b = 0 (median, from the repeated b = 0): {snr:.0f}; "
        f"resolution limit at 850 mT/m (Nilsson 2017, D {D_FIXED * 1e3} um^2/ms): "
        f"{limit:.2f} um. Machine: {platform.machine()}, {platform.processor()}"
    )
    results = {}
    for name in args.models:
        if name == "posterior":
            # The estimator is trained on SNR 10-300: above that the model's
            # own errors (grid, T2 of the compartments) exceed the noise. In
            # the data's units, as the model takes it.
            top = TrainingOptions().snr_range[1]
            noise = max(float(np.median(sigma)), float(np.median(s0)) / top)
            results[name] = fit_posterior(cord, noise, args.every, args.cache_dir)
        else:
            results[name] = fit_compartments(name, cord)
        print(f"{name}: fitted in {results[name]['seconds']:.0f} s")
        # Kept as each model ends: a later failure loses none of them.
        np.savez(out_dir / f"estimates_{name}.npz", **flatten(results[name]))
    for name in MODELS:
        kept = out_dir / f"estimates_{name}.npz"
        if name not in results and kept.exists():
            results[name] = unflatten(np.load(kept))
            print(f"{name}: estimates of an earlier run read from {kept}")

    histology = {k: v[cord.mask] for k, v in cord.histology.items()}
    wm, threshold = white_matter(cord)
    print(
        f"white matter: {int(wm.sum())} of {wm.size} voxels "
        f"(myelin fraction >= {threshold:.3f}, Otsu)"
    )
    references = {
        "diameter_d_eff": ("diameter", "axon_diameter_effective"),
        "diameter_mean": ("diameter", "axon_diameter"),
        "restricted_fraction": ("restricted_fraction", "intra_axonal_fraction"),
    }
    titles = {
        "diameter_d_eff": "Axon diameter against histology d_eff (um)",
        "diameter_mean": "Axon diameter against the histology's mean diameter (um)",
        "restricted_fraction": "Restricted fraction against fr / (1 - MVF)",
    }
    for region, where in (("all", np.ones_like(wm)), ("white_matter", wm)):
        for key, (estimate, truth) in references.items():
            rows = {
                n: compare(
                    r[estimate][where],
                    histology[truth][where],
                    s0[where],
                    tuple(b[where] for b in r[f"{estimate}_0.9"])
                    if f"{estimate}_0.9" in r
                    else None,
                )
                for n, r in results.items()
                if estimate in r
            }
            print_table(f"{titles[key]}: {region.replace('_', ' ')}", rows)
    if "posterior" in results:
        status = results["posterior"]["status"]
        names, counts = np.unique(status, return_counts=True)
        print(f"posterior status counts: {dict(zip(names, counts, strict=True))}")


if __name__ == "__main__":
    main()
