"""
Axon diameters of a cat spinal cord, against its histology
==========================================================

Real tissue with ground truth: the cat spinal cord slice of Duval et al.
(ISMRM 2016; White Matter Microscopy Database), whose every voxel has
histology (axon diameters, their spread, fibre and myelin fractions), and
its 2-D AxCaliber acquisition: nine timings (Delta 7-40 ms), gradients
across the cord up to 850 mT/m. The files ship inside the dmipy 1.0.5
distribution; :func:`~dipy_spinverse.data.read_cat_spinal_cord` reads
them without importing dmipy, and says how to bring them where they are
missing (``pip download --no-deps dmipy==1.0.5``).

The posterior's prior is chosen from the anatomy and the protocol, not the
histology: white matter's axons, along the cord (the slice normal, z), their
intrinsic diffusivity unknown (0.3-3 um^2/ms). It is trained once for the
protocol it fits, a fifth of the volumes (every b = 0 and every fifth
gradient strength of each timing, from the strongest down:
:func:`~dipy_spinverse.io.datasets.thin_qspace`), because a simulation of
all 1,791 volumes costs seconds. ActiveAx (fixed tissue, d_par 0.6
um^2/ms, with a dot compartment) fits all volumes beside it.

MRI weighs large axons: the diameter it measures is
``d_eff = (<d^6>/<d^2>)^(1/4)`` (Burcaw et al. 2015), computed from the
histology's mean and spread with gamma-distributed diameters
(:func:`~dipy_spinverse.io.datasets.effective_diameter`). The slice holds
grey matter as well; white matter is where the myelin fraction is above
Otsu's threshold. The tables of ``doc/validation/real_tissue.md`` are this
comparison over every voxel and model (``benchmarks/cord_histology.py``).

The first run trains the estimator (about an hour on 2 CPU cores; cached);
``--quick`` trains a tiny, uncalibrated one on fewer volumes and fits a
strip of voxels, to check that the script runs.
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from dipy.segment.threshold import otsu
from scipy.stats import spearmanr

from dipy_spinverse import SpinverseModel
from dipy_spinverse.compartments import ActiveAxModel
from dipy_spinverse.data import read_cat_spinal_cord
from dipy_spinverse.io.datasets import effective_diameter, thin_qspace
from dipy_spinverse.posterior import TissuePrior, TrainingOptions

parser = argparse.ArgumentParser(description="Cat spinal cord against histology.")
parser.add_argument("--out", default=".", help="output directory")
parser.add_argument("--cache", default=None, help="cache folder of the estimator")
parser.add_argument("--dmipy", default=None, help="dmipy installation or wheel")
parser.add_argument("--quick", action="store_true", help="tiny smoke test")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)

cord = read_cat_spinal_cord(path=args.dmipy)
mask = cord.mask.copy()
every, options = 5, None  # the default training of a prior of axons
if args.quick:
    every = 40
    options = TrainingOptions(
        n_simulations=32,
        epochs=2,
        hidden=16,
        embedding=8,
        transforms=1,
        reference_resolution=7,
        n_reference=2,
        n_calibration=8,
    )
    strip = np.zeros_like(mask)
    strip[30:34] = True
    mask &= strip

###############################################################################
# The noise
# ---------
# Each timing repeats its b = 0 volume: the spread of those repeats is the
# noise, per voxel, in the data's units.
data = cord.data[mask]
noise, levels = cord.repeated_b0_noise(mask)
s0 = np.median(levels[:, cord.gtab.b0s_mask].mean(-1))
snr = float(s0 / np.median(noise))
# The estimator is trained at SNR 10-300: above that the model's own errors,
# not the scanner's noise, limit what it can say. sigma is in the data's
# units, as DIPY's noise estimates give it.
sigma = max(float(np.median(noise)), s0 / TrainingOptions().snr_range[1])
print(f"{mask.sum()} voxels; SNR of the b = 0 signal {snr:.0f}; sigma {sigma:.4g}")

###############################################################################
# The fits
# --------
rows, gtab = thin_qspace(cord, every)
prior = TissuePrior(fibre_axis=(0, 0, 1), diffusivity=(0.3e-3, 3e-3))
model = SpinverseModel(
    gtab,
    fit_method="posterior",
    prior=prior,
    sigma=sigma,
    posterior_options=options,
    cache_dir=args.cache,
)
fit = model.fit(cord.data[..., rows], mask=mask)
low, high = fit.credible_interval("cell_diameter", level=0.9)
activeax = ActiveAxModel(cord.gtab, d_par=0.6e-3, dot=True).fit(data)

###############################################################################
# Against histology
# -----------------
histology = cord.histology
d_eff = effective_diameter(histology["axon_diameter"], histology["axon_diameter_std"])
myelin = histology["myelin_fraction"][mask]
white = myelin >= otsu(cord.histology["myelin_fraction"][cord.mask], nbins=64)
truth = d_eff[mask]
estimates = {
    "posterior median": fit.cell_diameter[mask],
    "ActiveAx": np.asarray(activeax.diameter, dtype=float),
}
inside = (truth >= low[mask]) & (truth <= high[mask])
lines = [
    "| estimate | voxels | Spearman with d_eff | median abs. error (um) |",
    "| --- | --- | --- | --- |",
]
for name, estimate in estimates.items():
    for label, where in (("all", np.ones_like(white)), ("white matter", white)):
        ok = where & np.isfinite(estimate) & np.isfinite(truth)
        rho = spearmanr(estimate[ok], truth[ok])[0] if ok.sum() > 2 else np.nan
        error = np.median(np.abs(estimate[ok] - truth[ok])) if ok.any() else np.nan
        lines.append(f"| {name} | {label} ({ok.sum()}) | {rho:.2f} | {error:.2f} |")
width = np.median((high - low)[mask])
lines.append(
    f"\nd_eff inside the posterior's 90 % interval: {inside.mean():.0%} of the "
    f"voxels (median width {width:.1f} um)"
)
print("\n".join(lines))
with open(os.path.join(args.out, "cat_spinal_cord.md"), "w") as f:
    f.write("\n".join(lines) + "\n")

###############################################################################
# Maps and scatter
# ----------------
# Histology's d_eff, the posterior median and its 90 % interval's width, and
# ActiveAx's diameter; outside the mask blank.


def image(values):
    out = np.full(mask.shape, np.nan)
    out[mask] = values
    return out[:, :, 0].T


fig, axes = plt.subplots(1, 5, figsize=(17, 3.4))
panels = (
    (truth, "histology d_eff (um)"),
    (estimates["posterior median"], "posterior median (um)"),
    ((high - low)[mask], "posterior 90 % width (um)"),
    (estimates["ActiveAx"], "ActiveAx diameter (um)"),
)
for ax, (values, title) in zip(axes[:4], panels, strict=True):
    # Diameters on one scale (the histology's range); the width on its own.
    limits = {} if "width" in title else {"vmin": 0.0, "vmax": np.nanmax(truth)}
    shown = ax.imshow(image(values), origin="lower", cmap="viridis", **limits)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    fig.colorbar(shown, ax=ax, shrink=0.8)
ax = axes[4]
median = estimates["posterior median"]
ax.plot(truth[white], median[white], ".", ms=3, alpha=0.4, label="posterior median")
shown = np.flatnonzero(white)[::15]  # a few intervals, readable
ax.errorbar(
    truth[shown],
    median[shown],
    yerr=[(median - low[mask])[shown], (high[mask] - median)[shown]],
    fmt="none",
    lw=0.6,
    alpha=0.5,
    label="its 90 % interval (1 in 15)",
)
ax.plot(truth[white], estimates["ActiveAx"][white], "x", ms=3, label="ActiveAx")
ax.plot([0, 10], [0, 10], "k--", lw=0.8)
ax.set_ylim(0, 25)
ax.set_xlabel("histology d_eff (um), white matter", fontsize=8)
ax.set_ylabel("estimate (um)", fontsize=8)
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(os.path.join(args.out, "cat_spinal_cord.png"), dpi=90)
