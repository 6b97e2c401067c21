"""
Grey matter, white matter and CSF maps from three MR contrasts
==============================================================

A BMapEst-style fit (Gupta et al.): each tissue's T1, T2 and proton density
(literature values at 3 T) give its signal in each known sequence; the
tissue proportions of every voxel are fitted to the images.

Ground truth is the MNI152 2009a anatomy that nilearn ships (no download;
``pip install dipy_spinverse[tissue]``): a slab of 12 axial slices at 2 mm.
Three 3 T scans -- MPRAGE, FLAIR and a 30 degree FLASH -- are simulated with
Rician noise at SNR 50 and an unknown receive gain, then fitted with
:class:`dipy_spinverse.tissue.TissueMapModel`. Without nilearn (or with
``--phantom``) a small synthetic phantom of nested smooth shells is used.

Run ``python examples/tissue_maps.py --out tissue_output`` (a few seconds);
the figure ``tissue_maps.png`` shows the true and fitted maps. The full
evaluation is ``benchmarks/tissue_maps.py`` (doc/validation/tissue_maps.md).
"""

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dipy_spinverse.tissue import (  # noqa: E402
    Flash,
    InversionRecovery,
    Mprage,
    TissueMapModel,
)
from dipy_spinverse.tissue.data import simulate_scans  # noqa: E402

TISSUES = ("csf", "gm", "wm")


def phantom(shape=(64, 64, 4)):
    """Nested shells: WM core, GM ring, CSF rim, smooth partial volumes."""
    x, y = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape[:2]), indexing="ij")
    radius = np.hypot(x, y)[..., None] * np.ones(shape)

    def step(r, width=0.04):
        return 1 / (1 + np.exp((radius - r) / width))

    inside, brain, core = step(0.9), step(0.75), step(0.45)
    probabilities = np.stack([inside - brain, brain - core, core], axis=-1)
    mask = inside > 0.5
    probabilities[mask] /= probabilities[mask].sum(axis=-1, keepdims=True)
    return probabilities * mask[..., None], mask


def ground_truth(use_phantom):
    if not use_phantom:
        try:
            from dipy_spinverse.tissue.data import mni152_tissue_maps

            probabilities, mask, _ = mni152_tissue_maps(resolution=2)
            slab = slice(50, 62)  # 12 axial slices through the ventricles
            return probabilities[:, :, slab], mask[:, :, slab], "MNI152 2009a slab"
        except ImportError:
            print("nilearn is not installed: using the synthetic phantom.")
    probabilities, mask = phantom()
    return probabilities, mask, "synthetic phantom"


def main():
    parser = argparse.ArgumentParser(description="Tissue maps from 3 contrasts")
    parser.add_argument("--out", default="tissue_output")
    parser.add_argument("--phantom", action="store_true", help="skip nilearn")
    parser.add_argument("--snr", type=float, default=50.0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    truth, mask, name = ground_truth(args.phantom)
    sequences = [
        Mprage(ti=0.9, tr=2.3, te=0.003, flip_angle=9),
        InversionRecovery(ti=2.5, tr=9.0, te=0.1),
        Flash(tr=0.02, te=0.004, flip_angle=30),
    ]
    model = TissueMapModel(sequences, field_strength=3.0)
    images = simulate_scans(model, truth, mask, snr=args.snr, gain=1000.0, rng=0)

    start = time.perf_counter()
    fit = model.fit(images, mask=mask)
    seconds = time.perf_counter() - start
    error = np.abs(fit.probabilities[mask] - truth[mask]).mean()
    true_labels = truth[mask].argmax(axis=-1) + 1
    dice = [
        2
        * ((fit.labels[mask] == k) & (true_labels == k)).sum()
        / ((fit.labels[mask] == k).sum() + (true_labels == k).sum())
        for k in (1, 2, 3)
    ]
    print(f"{name}: {int(mask.sum())} voxels fitted in {seconds:.2f} s")
    print(f"fitted gain {fit.gain:.1f} (true 1000)")
    print(f"mean absolute probability error {error:.4f}")
    print(
        "Dice " + ", ".join(f"{t} {d:.3f}" for t, d in zip(TISSUES, dice, strict=True))
    )

    z = truth.shape[2] // 2
    fig, axes = plt.subplots(3, 4, figsize=(10, 7.5))
    for k, tissue in enumerate(TISSUES):
        panels = [
            ("image: " + ("MPRAGE", "FLAIR", "FLASH 30")[k], images[:, :, z, k], None),
            (f"true {tissue}", truth[:, :, z, k], 1),
            (f"fitted {tissue}", fit.probabilities[:, :, z, k], 1),
            ("|error|", np.abs(fit.probabilities - truth)[:, :, z, k], 0.3),
        ]
        for j, (title, panel, vmax) in enumerate(panels):
            axes[k, j].imshow(np.rot90(panel), cmap="gray", vmin=0, vmax=vmax)
            axes[k, j].set_title(title, fontsize=9)
            axes[k, j].axis("off")
    fig.suptitle(f"{name}, SNR {args.snr:g}: mean |error| {error:.3f}")
    fig.tight_layout()
    path = os.path.join(args.out, "tissue_maps.png")
    fig.savefig(path, dpi=100)
    print(f"figure saved to {path}")


if __name__ == "__main__":
    main()
