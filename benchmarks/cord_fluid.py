"""Regenerates the tables of doc/validation/white_matter.md.

"What the fluid around the cord says of the acquisition": the fixed cat
cord lies in fluid, and free fluid is a reference that needs no tissue
model. Whatever its diffusivity, a pool of free water, or any mix of
Gaussian pools, gives a powder-averaged signal whose logarithm is convex in
b (a falling or constant apparent diffusivity, kurtosis >= 0), that tends
to its b = 0 volumes as b -> 0, and that is the same for a gradient and its
opposite. This script measures each on the fluid voxels of both of the
cord's sets (voxels outside the cord, two voxels clear of it, brighter at
b = 0 than 95 % of the cord), and the cord's white matter beside them:

- per timing of the 2-D set: the fluid's diffusivity, and the diffusion-
  weighted series extrapolated to b = 0 over the timing's b = 0 volumes
  (1 where the b = 0 volumes belong to the series), fitted as
  ``log S = log g - b D + c b^2`` over the b-values whose signal is above
  0.3, and the kurtosis ``K = 6 c / D^2`` (0 for free water, >= 0 for any
  mix of Gaussian pools);
- per shell of the 3-D set: the apparent diffusivity between consecutive
  shells (it cannot rise with b in free fluid), and the part of the signal
  that changes sign with the gradient (an ``l = 1`` harmonic over its 195
  directions, relative to the shell's mean), which diffusion cannot make
  and cross-terms with background or imaging gradients do (their amplitude
  grows as sqrt(b));
- for the 3-D set, whose shells each come from their own run: the smallest
  gain error per run that makes the fluid one free pool, and that pool's
  diffusivity (``min over D of max over shells |log S + b D|``, over the
  shells whose signal is above 0.05).

Each volume is divided by its timing's b = 0 at its place in the
acquisition (``RealDataset.repeated_b0_noise(drift=True)``). The numbers
need no simulation: a few seconds.

    python benchmarks/cord_fluid.py
"""

import harness
import numpy as np
from cord_histology import white_matter
from scipy.ndimage import binary_dilation
from scipy.optimize import minimize_scalar

from dipy_spinverse.data import read_cat_spinal_cord

#: Signals below this share of b = 0 are left out of the fits (the noise
#: floor and non-Gaussian decay are below it).
LOWEST_SIGNAL = 0.3


def fluid_mask(cord):
    """Fluid voxels: outside the cord's mask, two voxels clear of it, and
    brighter at b = 0 than 95 % of the cord's voxels."""
    mask = np.asarray(cord.mask, dtype=bool)
    b0 = cord.data[..., cord.protocol.bvals == 0].mean(-1)
    clear = ~binary_dilation(mask, iterations=2)
    return clear & (b0 > np.percentile(b0[mask], 95))


def relative_signals(cord, mask):
    """Each voxel's volumes over their timing's b = 0 at their place in the
    acquisition."""
    _, levels = cord.repeated_b0_noise(mask, drift=True)
    return cord.data[mask].astype(float) / levels


def shells(bvals, rows):
    """``rows`` split into shells: runs of sorted b-values without a gap of
    more than 10 % (and 5 s/mm^2)."""
    rows = rows[np.argsort(bvals[rows], kind="stable")]
    b = bvals[rows]
    return np.split(rows, np.where(np.diff(b) > 0.1 * b[1:] + 5)[0] + 1)


def series_fit(b, mean):
    """``log g``, ``D``, ``c`` and their standard errors of ``log mean =
    log g - b D + c b^2`` (least squares over the shells given)."""
    design = np.column_stack([np.ones_like(b), -b, b**2])
    coef, residual, *_ = np.linalg.lstsq(design, np.log(mean), rcond=None)
    dof = len(b) - 3
    variance = residual[0] / dof if dof > 0 and len(residual) else np.nan
    errors = np.sqrt(np.diag(np.linalg.inv(design.T @ design)) * variance)
    return coef, errors


def timing_rows(cord, signals, label):
    """The table's rows of each timing: the series' gain at b -> 0, the
    fluid diffusivity and the kurtosis, from the voxels' median signal."""
    protocol = cord.protocol
    out = []
    for waveform, rows in protocol.groups():
        weighted = rows[protocol.bvals[rows] > 0]
        groups = shells(protocol.bvals, weighted)
        b = np.array([protocol.bvals[g].mean() for g in groups])
        mean = np.array([np.median(signals[:, g].mean(1)) for g in groups])
        kept = mean > LOWEST_SIGNAL
        if kept.sum() < 5:
            continue
        (log_g, d, c), (e_g, e_d, e_c) = series_fit(b[kept], mean[kept])
        first = mean[0] / np.exp(-b[0] * d)  # the first shell over free decay
        out.append(
            harness.row(
                [
                    label,
                    f"{1e3 * waveform.small_delta:g} / {1e3 * waveform.big_delta:g}",
                    f"{b[kept].min():.0f}-{b[kept].max():.0f} ({kept.sum()})",
                    f"{1e3 * d:.3f} +- {1e3 * e_d:.3f}",
                    f"{np.exp(log_g):.4f} +- {np.exp(log_g) * e_g:.4f}",
                    f"{b[0]:.1f}: {first:.4f}",
                    f"{6 * c / d**2:+.2f} +- {6 * e_c / d**2:.2f}",
                ]
            )
        )
    return out


def odd_part(bvecs, values):
    """Amplitude of the ``l = 1`` harmonic of ``values`` (n_voxels,
    n_directions) over the unit ``bvecs``, fitted beside the ``l = 0, 2``
    ones, relative to each voxel's mean; and its direction (the voxels'
    median unit vector)."""
    x, y, z = bvecs.T
    even = [np.ones_like(x), x * x, y * y, z * z, x * y, x * z, y * z]
    design = np.column_stack([*even, x, y, z])
    coef, *_ = np.linalg.lstsq(design, (values / values.mean(1, keepdims=True)).T)
    dipole = coef[-3:].T
    amplitude = np.linalg.norm(dipole, axis=1)
    direction = np.median(dipole / amplitude[:, None], axis=0)
    return amplitude, direction / np.linalg.norm(direction)


def shell_rows(cord, signals, label):
    """The table's rows of each shell: the apparent diffusivity from the
    shell below, and the sign-changing part over its directions."""
    protocol = cord.protocol
    groups = shells(protocol.bvals, np.arange(len(protocol)))
    out, below = [], (0.0, 1.0)
    for group in groups[1:]:
        b = protocol.bvals[group].mean()
        mean = np.median(signals[:, group].mean(1))
        adc = np.log(below[1] / mean) / (b - below[0])
        amplitude, direction = odd_part(protocol.bvecs[group], signals[:, group])
        out.append(
            harness.row(
                [
                    label,
                    f"{b:.0f}",
                    f"{mean:.4f}",
                    f"{1e3 * adc:.3f}",
                    f"{np.median(amplitude):.4f}",
                    f"{np.median(amplitude) / np.sqrt(b):.5f}",
                    np.array2string(direction, precision=2),
                ]
            )
        )
        below = (b, mean)
    return out


def run_gains(cord, signals):
    """The smallest per-run gain error (a fraction) that makes the fluid's
    shells one free pool, and its diffusivity (um^2/ms)."""
    protocol = cord.protocol
    groups = shells(protocol.bvals, np.arange(len(protocol)))[1:]
    b = np.array([protocol.bvals[g].mean() for g in groups])
    mean = np.array([np.median(signals[:, g].mean(1)) for g in groups])
    b, log_mean = b[mean > 0.05], np.log(mean[mean > 0.05])
    worst = minimize_scalar(
        lambda d: np.abs(log_mean + b * d).max(), bounds=(1e-4, 5e-3), method="bounded"
    )
    return np.expm1(worst.fun), 1e3 * worst.x


def main(argv=None):
    parser = harness.parser(__doc__, seed=0, quick="the same run: it takes seconds")
    parser.parse_args(argv)
    sets = {}
    for name in ("2d", "3d"):
        cord = read_cat_spinal_cord(name)
        fluid = fluid_mask(cord)
        wm, _ = white_matter(cord)
        sets[name] = (
            cord,
            {
                f"fluid ({fluid.sum()})": relative_signals(cord, fluid),
                f"white matter ({wm.sum()})": relative_signals(cord, cord.mask)[wm],
            },
        )
    print("2-D set, each timing (the voxels' median signal; b in s/mm^2):\n")
    print(
        harness.head(
            [
                "voxels",
                "delta / Delta (ms)",
                "b fitted (shells)",
                "D (um^2/ms)",
                "series at b -> 0 / b = 0 volumes",
                "first b: signal / exp(-b D)",
                "kurtosis",
            ],
            "lllrrrr",
        )
    )
    cord, groups = sets["2d"]
    for label, signals in groups.items():
        print("\n".join(timing_rows(cord, signals, label)))
    print("\n3-D set, each shell (Delta 30 / delta 3 ms):\n")
    print(
        harness.head(
            [
                "voxels",
                "b (s/mm^2)",
                "mean signal",
                "D from the shell below (um^2/ms)",
                "sign-changing part",
                "its amplitude / sqrt(b)",
                "its direction",
            ],
            "lrrrrrl",
        )
    )
    cord, groups = sets["3d"]
    for label, signals in groups.items():
        print("\n".join(shell_rows(cord, signals, label)))
    gain, diffusivity = run_gains(cord, next(iter(groups.values())))
    print(
        f"\n3-D fluid as one free pool: every run's gain within {gain:.1%} "
        f"at the least, its diffusivity {diffusivity:.2f} um^2/ms"
    )


if __name__ == "__main__":
    main()
