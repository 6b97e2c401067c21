"""
What the signal says about tissue: posterior intervals, and where they widen
============================================================================

``SpinverseModel(gtab, fit_method="posterior")`` returns, for every voxel,
the posterior of its tissue descriptors: a median and credible intervals from
a normalising flow trained on the package's own simulations of a
:class:`~dipy_spinverse.posterior.TissuePrior`.

1. Voxels no dictionary holds: the README demo's third row -- an ellipsoid,
   two touching cells and a blob (``dipy_spinverse.data.TISSUE_VOXELS``),
   simulated and described on a grid of resolution 6, twice as fine as the
   training grid (resolution 3). The demo's estimator
   (``data.DEMO_PRIOR`` trained with ``data.DEMO_TRAINING``) models the
   training grid's error and ships with the package: the table gives the
   truth against the median [90 % interval].
2. A real brain: DIPY's bundled ``small_101D`` (6 x 10 x 10 voxels, 102
   volumes, one diffusion time). Its timing is not in the files: this
   example assumes ``small_delta = 30 ms`` and ``big_delta = 45 ms`` (a
   diffusion-spectrum acquisition on a clinical scanner); say yours with
   ``--small_delta`` / ``--big_delta``. Brain tissue continues past the
   voxel: its prior is the demo's with periodic patches only (the demo's
   also holds closed boxes, for its first two rows). It holds cells of 8-25
   um, far larger than axons, so white-matter voxels should come out
   ``OUT_OF_PRIOR`` rather than with a confident wrong number.

The brain's protocol needs its own estimator: about half an hour of
training on 2 CPU cores (cached afterwards); ``--quick`` trains tiny,
uncalibrated networks in seconds to check that the script runs.
"""

import argparse
import json
import os
from dataclasses import replace

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.data import get_fnames
from dipy.denoise.noise_estimate import estimate_sigma
from dipy.io.gradients import read_bvals_bvecs
from dipy.io.image import load_nifti

from dipy_spinverse import SpinverseModel
from dipy_spinverse.data import DEMO_PRIOR, DEMO_TRAINING, make_phantom_dataset
from dipy_spinverse.posterior import TrainingOptions
from dipy_spinverse.reconst.posterior import OUT_OF_PRIOR

parser = argparse.ArgumentParser(description="Posterior intervals of tissue.")
parser.add_argument("--out", default=".", help="output directory")
parser.add_argument("--cache", default=None, help="cache folder of the estimators")
parser.add_argument("--quick", action="store_true", help="tiny smoke test")
parser.add_argument("--small_delta", type=float, default=0.030, help="s")
parser.add_argument("--big_delta", type=float, default=0.045, help="s")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)

DESCRIBED = ("restricted_fraction", "cell_diameter", "exchange_time", "anisotropy")
prior, options, reference = DEMO_PRIOR, DEMO_TRAINING, 6
if args.quick:
    options = TrainingOptions(
        n_simulations=96,
        epochs=2,
        hidden=16,
        embedding=8,
        transforms=1,
        reference_resolution=4,
        n_reference=4,
        n_calibration=16,
    )
    reference = 4


def model_for(gtab, sigma, prior=prior):
    """The posterior of ``prior`` for this protocol (shipped, or trained once
    and cached)."""
    return SpinverseModel(
        gtab,
        fit_method="posterior",
        prior=prior,
        posterior_options=options,
        sigma=sigma,
        cache_dir=args.cache,
    )


###############################################################################
# Voxels that no dictionary holds
# -------------------------------
# The demo dataset, read from its files as a user would; its third row holds
# the tissue voxels, their truth in truth.json.
demo = make_phantom_dataset(os.path.join(args.out, "demo"), tissue_resolution=reference)
data, _ = load_nifti(demo["data"])
bvals, bvecs = read_bvals_bvecs(demo["bvals"], demo["bvecs"])
small_delta, big_delta = np.loadtxt(demo["timing"]).T
gtab = gradient_table(bvals, bvecs=bvecs, small_delta=small_delta, big_delta=big_delta)
with open(demo["truth_json"]) as f:
    truth = json.load(f)
# The noise in the data's units (truth.json's), as the model takes it.
sigma = truth["sigma"]
tissue = truth["tissue_voxels"]
fit = model_for(gtab, sigma).fit(np.stack([data[tuple(v["index"])] for v in tissue]))

rows = [
    "| voxel | descriptor | truth | median [90 % interval] |",
    "| --- | --- | --- | --- |",
]
for i, voxel in enumerate(tissue):
    for descriptor in DESCRIBED:
        low, high = fit.credible_interval(descriptor, level=0.9)
        median = getattr(fit, descriptor)
        if fit.status[i] == OUT_OF_PRIOR:
            shown = "OUT_OF_PRIOR"
        else:
            shown = f"{median[i]:.3g} [{low[i]:.3g}, {high[i]:.3g}]"
        rows.append(
            f"| {voxel['name']} | {descriptor} | {voxel[descriptor]:.3g} | {shown} |"
        )
table = "\n".join(rows)
print(table)

###############################################################################
# A brain: DIPY's small_101D
# --------------------------
# One diffusion time, assumed (the files hold none).
data_file, bval_file, bvec_file = get_fnames(name="small_101D")
data, affine = load_nifti(data_file)
bvals, bvecs = read_bvals_bvecs(str(bval_file), str(bvec_file))
brain = gradient_table(
    bvals, bvecs=bvecs, small_delta=args.small_delta, big_delta=args.big_delta
)
mask = data[..., bvals < 50].mean(-1) > 0.5 * np.percentile(data[..., bvals < 50], 90)
if args.quick:
    mask[:, :, 3:] = False
# The noise level: DIPY's estimator, the median over the volumes (the b = 0
# volume alone has the most anatomical contrast, which it reads as noise),
# in the data's units.
b0 = data[..., bvals < 50].mean(-1)
sigma = float(np.median(estimate_sigma(data, N=1)))
snr = float(np.median(b0[mask])) / sigma
print(f"small_101D: sigma {sigma:.1f} (data units), SNR of the b = 0 {snr:.1f}")
tissue_prior = replace(prior, boundary="periodic", box_side=None)
brain_fit = model_for(brain, sigma, tissue_prior).fit(data, mask=mask)
status = brain_fit.status[mask]
counts = {
    name: int(np.sum(status == code))
    for name, code in (("ok", 0), ("OUT_OF_PRIOR", OUT_OF_PRIOR))
}
ok = status == 0
low, high = brain_fit.credible_interval("restricted_fraction", level=0.9)
brain_lines = [
    f"small_101D: {int(mask.sum())} voxels in the mask; status ok "
    f"{counts['ok']}, OUT_OF_PRIOR {counts['OUT_OF_PRIOR']}",
]
if ok.any():
    width = (high - low)[mask][ok]
    brain_lines.append(
        f"restricted fraction where ok: median "
        f"{np.median(brain_fit.restricted_fraction[mask][ok]):.2f}, "
        f"median 90 % interval width {np.median(width):.2f}"
    )
    low, high = brain_fit.credible_interval("cell_diameter", level=0.9)
    brain_lines.append(
        f"cell diameter where ok: median 90 % interval "
        f"[{np.median(low[mask][ok]):.1f}, {np.median(high[mask][ok]):.1f}] um "
        f"(the prior's cells: {prior.cell_diameter[0]:g}-{prior.cell_diameter[1]:g} um)"
    )
print("\n".join(brain_lines))
with open(os.path.join(args.out, "posterior_tissue.md"), "w") as f:
    f.write(table + "\n\n" + "\n".join(brain_lines) + "\n")
