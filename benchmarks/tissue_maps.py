"""Regenerates the tables of doc/validation/tissue_maps.md.

``--quick``: one axial slice, SNR 20, no baselines (-m slow).

Tissue probability maps on the MNI152 2009a anatomy (issue 15).

Ground truth: nilearn's bundled MNI152 2009a GM and WM probability maps at
2 mm, CSF the rest of its brain mask (``tissue.data.mni152_tissue_maps``;
no download). Scans: up to four 3 T contrasts, Rician noise at SNR 20, 50
and 100 (the brightest pure tissue of each image over the noise sigma),
unknown receive gain (1000). Fits: ``TissueMapModel`` (signal mixing,
global gain found by the fit), DIPY's ``TissueClassifierHMRF`` on the
T1-weighted image (MPRAGE), and a Gaussian mixture (scikit-learn) on all
the contrasts given, its components named by matching their means to the
noise-free pure-tissue signals. Scores inside the brain mask: mean
absolute probability error, Dice of the arg-max labels per tissue, PSNR
and SSIM (scikit-image, data range 1) of each probability map. ``--seed``
draws the noise and starts the Gaussian mixture.

    python benchmarks/tissue_maps.py --out doc/validation/tissue_maps_table.md \\
        --figure doc/validation/tissue_maps.png
"""

import os
import platform
import time
import warnings

import harness
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dipy_spinverse.tissue import (
    Flash,
    InversionRecovery,
    Mprage,
    SpinEcho,
    TissueMapModel,
)
from dipy_spinverse.tissue.data import mni152_tissue_maps, simulate_scans

TISSUES = ("csf", "gm", "wm")
GAIN = 1000.0
#: 3 T protocol, in the order contrasts are added (1, 2, 3, 4).
PROTOCOL = (
    ("MPRAGE", Mprage(ti=0.9, tr=2.3, te=0.003, flip_angle=9)),
    ("FLAIR", InversionRecovery(ti=2.5, tr=9.0, te=0.1)),
    ("FLASH 30", Flash(tr=0.02, te=0.004, flip_angle=30)),
    ("T2w SE", SpinEcho(tr=4.0, te=0.1)),
)


def scores(probabilities, truth, mask):
    """Mean absolute error, and per tissue Dice, PSNR and SSIM."""
    estimate, reference = probabilities[mask], truth[mask]
    labels, true_labels = estimate.argmax(axis=1), reference.argmax(axis=1)
    out = {"mae": float(np.abs(estimate - reference).mean())}
    for k, name in enumerate(TISSUES):
        hit = labels == k
        true = true_labels == k
        out[f"dice_{name}"] = 2 * (hit & true).sum() / (hit.sum() + true.sum())
        volume, true_volume = probabilities[..., k], truth[..., k]
        out[f"psnr_{name}"] = peak_signal_noise_ratio(
            true_volume, volume, data_range=1.0
        )
        out[f"ssim_{name}"] = structural_similarity(true_volume, volume, data_range=1.0)
    return out


def fit_hmrf(t1w, mask):
    """DIPY's HMRF on the T1-weighted image; its classes (by increasing
    intensity) are csf, gm, wm on a T1-weighted scan."""
    from dipy.segment.tissue import TissueClassifierHMRF

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, pve = TissueClassifierHMRF(verbose=False).classify(
            t1w, 3, 0.1, max_iter=10
        )
    return pve * mask[..., None]


def fit_gmm(images, mask, model, seed):
    """Gaussian-mixture posteriors on the contrasts; components named by
    the pure-tissue signals they are nearest to (Hungarian matching)."""
    from sklearn.mixture import GaussianMixture

    data = images[mask]
    scale = data.std(axis=0)
    mixture = GaussianMixture(3, covariance_type="full", random_state=seed)
    mixture.fit(data / scale)
    pure = GAIN * model.design.abs().T.cpu().numpy() / scale  # (tissues, seq)
    cost = ((mixture.means_[:, None, :] - pure[None]) ** 2).sum(axis=-1)
    components, tissues = linear_sum_assignment(cost)
    posterior = mixture.predict_proba(data / scale)
    out = np.zeros(mask.shape + (3,))
    out[mask] = posterior[:, components[np.argsort(tissues)]]
    return out


def timed_fit(model, images, mask):
    start = time.perf_counter()
    fit = model.fit(images, mask=mask)
    return fit, time.perf_counter() - start


#: The table's columns (``row`` writes one line).
TITLES = ["SNR", "contrasts", "method", "MAE", "Dice csf / gm / wm"]
TITLES += ["PSNR csf / gm / wm (dB)", "SSIM csf / gm / wm", "fit (s)"]


def row(method, snr, contrasts, result, seconds=None):
    dice = " / ".join(f"{result[f'dice_{t}']:.3f}" for t in TISSUES)
    psnr = " / ".join(f"{result[f'psnr_{t}']:.1f}" for t in TISSUES)
    ssim = " / ".join(f"{result[f'ssim_{t}']:.3f}" for t in TISSUES)
    time_text = f"{seconds:.1f}" if seconds is not None else ""
    cells = [f"{snr:g}", contrasts, method, f"{result['mae']:.4f}"]
    return harness.row([*cells, dice, psnr, ssim, time_text])


def figure(path, truth, fits, mask):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = truth.shape[2] // 2 + 5
    columns = [("truth", truth), *fits]
    fig, axes = plt.subplots(3, len(columns), figsize=(2.6 * len(columns), 8))
    for j, (title, volume) in enumerate(columns):
        for k, name in enumerate(TISSUES):
            ax = axes[k, j]
            ax.imshow(np.rot90(volume[:, :, z, k]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel(name.upper())
    fig.suptitle("MNI152 2009a, 2 mm, SNR 50 (axial slice)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = harness.parser(__doc__, seed=0)
    parser.add_argument("--snr", type=float, nargs="+", default=[20, 50, 100])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--figure", help="save true vs fitted maps (PNG)")
    parser.add_argument("--no-baselines", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    truth, mask, _ = mni152_tissue_maps(resolution=2)
    if args.quick:  # one axial slice, SNR 20, no baselines
        args.snr, args.no_baselines = [20.0], True
        slice_ = np.zeros_like(mask)
        slice_[:, :, mask.shape[2] // 2] = True
        mask = mask & slice_
    sequences = [seq for _, seq in PROTOCOL]
    simulator = TissueMapModel(sequences)
    lines = [
        f"MNI152 2009a at 2 mm: {int(mask.sum())} brain voxels; Rician noise; "
        f"torch threads {args.threads}; {platform.processor() or platform.machine()}"
        f", {os.cpu_count()} cores (shared with other jobs: times are upper "
        "bounds).",
        "",
        harness.head(TITLES, spaced=True),
    ]
    print("\n".join(lines), flush=True)
    figure_fits = None
    for snr in args.snr:
        images = simulate_scans(
            simulator, truth, mask, snr=snr, gain=GAIN, rng=args.seed
        )
        for n in range(1, len(PROTOCOL) + 1):
            names = " + ".join(name for name, _ in PROTOCOL[:n])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # one contrast: ill-posed
                model = TissueMapModel(sequences[:n])
            fit, seconds = timed_fit(model, images[..., :n], mask)
            result = scores(fit.probabilities, truth, mask)
            lines.append(row("TissueMapModel", snr, names, result, seconds))
            print(lines[-1], flush=True)
            if n == 4:
                plain = TissueMapModel(sequences, noise_weighting=False)
                fit_p, seconds = timed_fit(plain, images, mask)
                result = scores(fit_p.probabilities, truth, mask)
                lines.append(row("noise_weighting=False", snr, names, result, seconds))
                print(lines[-1], flush=True)
            if args.no_baselines:
                continue
            start = time.perf_counter()
            gmm = fit_gmm(images[..., :n], mask, model, args.seed)
            result = scores(gmm, truth, mask)
            lines.append(
                row("Gaussian mixture", snr, names, result, time.perf_counter() - start)
            )
            print(lines[-1], flush=True)
            if n == 1:
                start = time.perf_counter()
                hmrf = fit_hmrf(images[..., 0], mask)
                result = scores(hmrf, truth, mask)
                seconds = time.perf_counter() - start
                lines.append(row("DIPY HMRF (T1w)", snr, names, result, seconds))
                print(lines[-1], flush=True)
            if snr == 50 and n == 3:
                figure_fits = [
                    ("TissueMapModel, 3 contrasts", fit.probabilities),
                    ("Gaussian mixture, 3 contrasts", gmm),
                ]
        if snr == 50 and not args.no_baselines:
            figure_fits.append(("DIPY HMRF, T1w", hmrf))
    if figure_fits and args.figure:
        figure(args.figure, truth, figure_fits, mask)
    # BMapEst's parameter mixing, on scans simulated with it (3 contrasts),
    # on a slab of 20 axial slices (its Levenberg-Marquardt is ~30x the cost
    # of the exact signal-mixing fit)
    if 50 in args.snr:
        slab = np.zeros_like(mask)
        slab[:, :, 40:60] = True
        mixed = TissueMapModel(sequences[:3], mixing="parameters", max_iter=100)
        images = simulate_scans(mixed, truth, mask, snr=50, gain=GAIN, rng=args.seed)
        fit, seconds = timed_fit(mixed, images, mask & slab)
        result = scores(fit.probabilities, truth * slab[..., None], mask & slab)
        names = " + ".join(name for name, _ in PROTOCOL[:3])
        method = f"mixing='parameters' (own data; {int((mask & slab).sum())} voxels)"
        lines.append(row(method, 50, names, result, seconds))
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
