"""
Predicting held-out measurements: the ISBI 2015 white-matter voxels
===================================================================

The ISBI 2015 white-matter challenge (Ferizi et al., NMR Biomed 2017) gave
teams 3,612 measurements of six genu and six fornix voxels of one brain and
ranked their models by how well they predicted measurements they had not
seen. The measurements ship inside the dmipy 1.0.5 distribution
(:func:`~dipy_spinverse.data.read_isbi2015`): twelve echo times, each one
PGSE timing (delta 3-8 ms, Delta 22-120 ms) with three gradient strengths
and its own b = 0 volumes.

This example holds out each timing's middle gradient strength
(:func:`~dipy_spinverse.io.datasets.held_out_shells`), fits the package's
compartment models to the rest and predicts the held-out signals. Each
model normalises every echo time by its own b = 0 signal (their T2
weighting differs by a factor of ten across the echo times), and each
prediction is scaled back by it. The score is the challenge's: squared
errors between the measurements and the Rician expectation of the
prediction, over the noise variance, averaged over the held-out
measurements (1 is as good as the noise allows); the noise is each voxel's,
from its repeated b = 0 volumes
(:meth:`~dipy_spinverse.io.datasets.RealDataset.repeated_b0_noise`).
``benchmarks/isbi_prediction.py`` makes the table of
``doc/validation/real_tissue.md`` with more models and the harder split
(the strongest gradient held out).

``--quick`` fits ActiveAx alone.
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from dipy_spinverse.compartments import ActiveAxModel, ZcdModel
from dipy_spinverse.data import read_isbi2015
from dipy_spinverse.io.datasets import held_out_shells, subset_table

parser = argparse.ArgumentParser(description="ISBI 2015 held-out prediction.")
parser.add_argument("--out", default=".", help="output directory")
parser.add_argument("--dmipy", default=None, help="dmipy installation or wheel")
parser.add_argument("--quick", action="store_true", help="ActiveAx alone")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)

isbi = read_isbi2015(path=args.dmipy)
data = isbi.data.reshape(-1, isbi.data.shape[-1]).astype(np.float64)
region = isbi.histology["region"].ravel()  # 0 genu, 1 fornix
test = held_out_shells(isbi, "middle")
sigma, levels = isbi.repeated_b0_noise()
print(
    f"{len(data)} voxels; {int((~test).sum())} measurements fitted, "
    f"{int(test.sum())} held out; SNR of the b = 0 (median) "
    f"{np.median(levels[:, isbi.gtab.b0s_mask].mean(-1) / sigma):.0f}"
)

###############################################################################
# Fit on the rest, predict the held-out shells
# --------------------------------------------
models = {"ActiveAx": ActiveAxModel}
if not args.quick:
    models["ZCD"] = ZcdModel
train, held = subset_table(isbi.gtab, ~test), subset_table(isbi.gtab, test)
predictions = {}
lines = [
    "| model | genu | fornix | diameter genu / fornix (um) |",
    "| --- | --- | --- | --- |",
]
for name, model_class in models.items():
    fit = model_class(train).fit(data[:, ~test])
    shape = np.asarray(fit.predict(held, S0=1.0)).reshape(len(data), -1)
    predicted = shape * levels[:, test]
    predictions[name] = predicted
    expected = np.sqrt(predicted**2 + sigma[:, None] ** 2)  # Rician mean, roughly
    score = ((expected - data[:, test]) ** 2).mean(-1) / sigma**2
    d = np.asarray(fit.diameter, dtype=float).ravel()
    cells = [f"{np.median(score[region == r]):.1f}" for r in (0, 1)]
    diameters = " / ".join(f"{np.median(d[region == r]):.1f}" for r in (0, 1))
    lines.append(f"| {name} | {' | '.join(cells)} | {diameters} |")
print("\n".join(lines))
with open(os.path.join(args.out, "isbi_white_matter.md"), "w") as f:
    f.write("\n".join(lines) + "\n")

###############################################################################
# One genu and one fornix voxel
# -----------------------------
# Held-out measurements over their echo time's b = 0 against each model's
# prediction, by b-value: a model whose curve misses the points misses the
# tissue's restriction at that timing.
fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
bvals = isbi.gtab.bvals[test]
for ax, r, title in zip(axes, (0, 1), ("genu", "fornix"), strict=True):
    voxel = int(np.flatnonzero(region == r)[0])
    scale = levels[voxel, test]
    ax.plot(bvals, data[voxel, test] / scale, "k.", ms=2, label="measured")
    for name, predicted in predictions.items():
        ax.plot(bvals, predicted[voxel] / scale, ".", ms=2, label=name)
    ax.set_xlabel("b (s/mm^2)")
    ax.set_title(f"{title}: held-out shells", fontsize=10)
axes[0].set_ylabel("S / S0 of its echo time")
axes[0].legend(fontsize=8, markerscale=4)
fig.tight_layout()
fig.savefig(os.path.join(args.out, "isbi_white_matter.png"), dpi=90)
