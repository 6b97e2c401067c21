"""
White matter at the HCP's protocol: axon maps and what the data leave open
==========================================================================

The default posterior, ``SpinverseModel(gtab, fit_method="posterior",
sigma=s)``, is trained on white matter: packed straight axons of 1-25 um
along any direction, their membranes permeable, simulated as 2-D sections
(:class:`~dipy_spinverse.posterior.TissuePrior`). This example makes a
slice of such tissue with the package's own substrates, acquires it with
the WU-Minn HCP protocol (b = 1000, 2000, 3000 s/mm^2, 90 directions each,
18 b = 0; delta / Delta = 10.6 / 43.1 ms:
:func:`~dipy_spinverse.sim.sequences.hcp_protocol`) at SNR 40, fits it, and
shows maps of the posterior median and of the 90 % interval's width.

The slice (8 x 8 voxels):

* columns: axon diameters from 1.2 to 5 um (packing fractions 0.55-0.75);
* rows 0-2: one bundle along x;
* rows 3-4: two bundles crossing at 90 degrees (x and y, half each);
* rows 5-7: one bundle along y, dispersed (von Mises-Fisher, kappa 16, 6
  and 3; four sub-populations each).

Crossing and dispersed voxels are outside the prior, whose voxels hold one
straight bundle: the example shows what the posterior then says.

Each voxel's tissue is a draw of the default prior restricted to its
diameter, simulated on a section twice as fine as the training grid
(resolution 12, the grid the training's error model refers to); the
populations of a voxel share the draw, turned to their directions.

The first run trains the estimator for this protocol, once (cached
afterwards; it announces its time before it starts): its 11,000
simulations take about 25 minutes on 2 idle CPU cores (0.13 s a section,
``benchmarks/prior_throughput.py --protocol hcp``), then the calibration
pairs and 60 epochs; on shared cores several times that. The slice itself
is 152 simulations of sections at resolution 12 (each new patch side
first measures its time step). ``--quick`` trains a tiny, uncalibrated
network on a thinned protocol in about a minute to check that the script
runs.
"""

import argparse
import os
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from dipy.core.gradients import gradient_table
from dipy.io.image import save_nifti
from scipy.stats import vonmises_fisher

from dipy_spinverse import SpinverseModel
from dipy_spinverse.posterior import TissuePrior, TrainingOptions
from dipy_spinverse.reconst.posterior import OUT_OF_PRIOR
from dipy_spinverse.sim.limits import diameter_resolution_limit
from dipy_spinverse.sim.sequences import hcp_protocol

parser = argparse.ArgumentParser(description="White matter at the HCP's protocol.")
parser.add_argument("--out", default=".", help="output directory")
parser.add_argument("--cache", default=None, help="cache folder of the estimator")
parser.add_argument("--quick", action="store_true", help="tiny smoke test")
parser.add_argument("--snr", type=float, default=40.0, help="b = 0 signal / noise")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)
rng = np.random.default_rng(2026)

prior = TissuePrior()  # the default: white matter
options = None  # the default prior's training (posterior.default_training)
protocol = hcp_protocol()
n, resolution, n_dispersed, n_prior = 8, 12, 4, 400
if args.quick:
    protocol = hcp_protocol(n_directions=6, n_b0=2)
    options = TrainingOptions(
        n_simulations=96,
        epochs=2,
        hidden=16,
        embedding=8,
        transforms=1,
        reference_resolution=7,
        n_reference=4,
        n_calibration=16,
    )
    n, resolution, n_dispersed, n_prior = 3, 7, 2, 30

###############################################################################
# The slice
# ---------
# A voxel: one draw of the default prior at its diameter (+-10 %), the same
# tissue on the finer section, and its populations' directions.
X, Y = np.eye(3)[0], np.eye(3)[1]
diameters = np.geomspace(1.2, 5.0, n)
single = range(0, 3 * n // 8)
crossing = range(3 * n // 8, 5 * n // 8)
dispersed = range(5 * n // 8, n)
kappas = np.geomspace(16.0, 3.0, len(dispersed))


def populations(row):
    """(axes (k, 3), weights (k,)) of the voxels of a row."""
    if row in single:
        return X[None], np.ones(1)
    if row in crossing:
        return np.stack([X, Y]), np.full(2, 0.5)
    kappa = kappas[row - dispersed.start]
    axes = vonmises_fisher(Y, kappa).rvs(n_dispersed, random_state=rng)
    return axes, np.full(n_dispersed, 1 / n_dispersed)


fine = replace(prior, resolution=resolution).simulator(protocol)
signals = np.empty((n, n, len(protocol)))
truth = {k: np.empty((n, n)) for k in ("cell_diameter", "restricted_fraction")}
for column, d in enumerate(diameters):
    voxel_prior = replace(
        prior, cell_diameter=(d / 1.1, d * 1.1), restricted_fraction=(0.55, 0.75)
    )
    for row in range(n):
        _, tissue = voxel_prior.draw_pair(rng, reference_resolution=resolution)
        axes, weights = populations(row)
        turned = [tissue._replace(axis=a / np.linalg.norm(a)) for a in axes]
        signals[column, row] = weights @ fine.simulate_draws(turned)
        for name in truth:
            truth[name][column, row] = tissue.descriptors[name]
noise = rng.standard_normal((2,) + signals.shape) / args.snr
data = np.sqrt((signals + noise[0]) ** 2 + noise[1] ** 2)[:, :, None]

###############################################################################
# The fit
# -------
# A DIPY gradient table of the HCP's protocol, and the default posterior.
gtab = gradient_table(
    protocol.bvals, bvecs=protocol.bvecs, small_delta=0.0106, big_delta=0.0431
)
model = SpinverseModel(
    gtab,
    fit_method="posterior",
    sigma=1 / args.snr,
    posterior_options=options,
    cache_dir=args.cache,
)
fit = model.fit(data)
ok = fit.status[:, :, 0] == 0
print(f"{ok.sum()} of {n * n} voxels fitted, {np.sum(~ok)} OUT_OF_PRIOR or flagged")

###############################################################################
# What the protocol determines
# ----------------------------
# The 90 % interval's width against the prior's own 90 % range (from its
# draws: no simulation): near 1, the data say nothing beyond the prior.
draws = [prior.draw(rng).descriptors for _ in range(n_prior)]
DESCRIBED = ("cell_diameter", "restricted_fraction", "exchange_time", "anisotropy")
regions = {"single": single, "crossing": crossing, "dispersed": dispersed}
rows = [
    "| descriptor | region | median abs. error | 90 % width / prior's |",
    "| --- | --- | --- | --- |",
]
affine = np.diag([2.0, 2.0, 2.0, 1.0])
for name in DESCRIBED:
    low, high = fit.credible_interval(name, level=0.9)
    median = getattr(fit, name)[:, :, 0]
    width = (high - low)[:, :, 0]
    save_nifti(os.path.join(args.out, f"{name}.nii.gz"), median[..., None], affine)
    save_nifti(
        os.path.join(args.out, f"{name}_ci90_width.nii.gz"), width[..., None], affine
    )
    spread = np.subtract(*np.quantile([d[name] for d in draws], [0.95, 0.05]))
    for region, span in regions.items():
        inside = ok[:, span.start : span.stop]
        if not inside.any():
            rows.append(f"| {name} | {region} | no voxel fitted | - |")
            continue
        ratio = np.median(width[:, span.start : span.stop][inside]) / spread
        error = "-"
        if name in truth:
            errors = np.abs(median - truth[name])[:, span.start : span.stop][inside]
            error = f"{np.median(errors):.3g}"
        rows.append(f"| {name} | {region} | {error} | {ratio:.2f} |")
table = "\n".join(rows)
print(table)

###############################################################################
# Diameters below the resolution limit
# ------------------------------------
# Nilsson et al. (2017): below d_min the signal of an axon cannot be told
# from a line's at this SNR. The posterior's upper bound of such axons should
# sit near d_min, and its lower bound at the prior's floor.
d_min = diameter_resolution_limit(protocol, snr=args.snr)
low, high = fit.credible_interval("cell_diameter", level=0.9)
small = ok & (truth["cell_diameter"] < d_min)
large = ok & (truth["cell_diameter"] >= d_min)
limit_lines = [
    f"resolution limit (Nilsson et al. 2017) at SNR {args.snr:g}: {d_min:.2f} um"
]
for label, where in (("below", small), ("above", large)):
    if where.any():
        limit_lines.append(
            f"axons {label} it ({where.sum()} voxels): median 90 % interval "
            f"[{np.median(low[:, :, 0][where]):.2f}, "
            f"{np.median(high[:, :, 0][where]):.2f}] um"
        )
print("\n".join(limit_lines))
with open(os.path.join(args.out, "white_matter_hcp.md"), "w") as f:
    f.write(table + "\n\n" + "\n".join(limit_lines) + "\n")

###############################################################################
# Maps
# ----
# Truth, posterior median and 90 % width; OUT_OF_PRIOR voxels are blank.
fig, axes = plt.subplots(2, 3, figsize=(9, 6))
for r, name in enumerate(("cell_diameter", "restricted_fraction")):
    low, high = fit.credible_interval(name, level=0.9)
    panels = (
        (truth[name], f"true {name}"),
        (getattr(fit, name)[:, :, 0], "posterior median"),
        ((high - low)[:, :, 0], "90 % interval width"),
    )
    limits = np.nanpercentile(truth[name], [0, 100])
    for c, (image, title) in enumerate(panels):
        shown = np.where(fit.status[:, :, 0] == OUT_OF_PRIOR, np.nan, image)
        kwargs = dict(vmin=limits[0], vmax=limits[1]) if c < 2 else {}
        im = axes[r, c].imshow(shown.T, origin="lower", cmap="viridis", **kwargs)
        axes[r, c].set_title(title, fontsize=9)
        axes[r, c].set_xlabel("diameter class", fontsize=8)
        axes[r, c].set_ylabel("single | crossing | dispersed", fontsize=7)
        fig.colorbar(im, ax=axes[r, c], shrink=0.8)
fig.tight_layout()
fig.savefig(os.path.join(args.out, "white_matter_hcp.png"), dpi=90)
