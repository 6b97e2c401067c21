"""Regenerates the tables of doc/validation/white_matter.md.

"Can any mixture fit the cord? An oracle": the prior predictive check asks
whether the mixing prior's *draws* reach the cord; this asks whether any
voxel the library can make does, whatever the prior's ranges. Each of the
cord's white-matter voxels (3-D set) is fitted by non-negative least
squares with every bundle of the fixed preset's library (fibres along z,
or along the voxel's own diffusion-tensor axis), each at six Watson
dispersions (ODI 0-0.45), free water at eight diffusivities (0.5-3.0
um^2/ms) and a dot: a superset of every draw of ``MixturePrior.fixed``.
Its residual is set against a fit that holds any smooth profile: even
spherical harmonics of order 6 on each shell, which leaves the noise (and
anything diffusion cannot make, as the fit does). A ratio of residual
variances near 1 says the library spans the voxel; well above 1, that no
range of the prior can bring the voxel in.

``--gains`` also lets each diffusion-weighted shell (each acquired in its
own run, whose b = 0 levels differ by up to 5 %) carry a free gain within
that bound, fitted with the mixture: how much of the misfit a run-level
scale error would explain.

    python benchmarks/mixture_span.py --axes z tensor --gains 0 0.02 0.05

The library is read from (or simulated into) ``--out``: 64 bundles, about
50 core-minutes on 2 cores when not kept.
"""

import sys
import time

import harness
import numpy as np
from cord_fluid import shells
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel
from dipy.reconst.shm import real_sh_descoteaux_from_index, sph_harm_ind_list
from prior_check import cord_set
from scipy.optimize import nnls

from dipy_spinverse.posterior import MixturePrior
from dipy_spinverse.posterior.mixture import dot_signal, free_water_signal

ODIS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.45)
FREE_DIFFUSIVITIES = (0.5, 1.0, 1.5, 1.8, 2.0, 2.3, 2.6, 3.0)  # um^2/ms
SH_ORDER = 6
#: Rounds of the gains' and the weights' alternating fit.
GAIN_ROUNDS = 30


def smooth_floor(data, protocol, groups):
    """Residual variance of each voxel after even spherical harmonics of
    order ``SH_ORDER`` on each diffusion-weighted shell and a mean on b = 0."""
    residual, n_parameters = np.empty_like(data), 0
    m, n = sph_harm_ind_list(SH_ORDER)
    for group in groups:
        if protocol.bvals[group].mean() < 1:
            values = data[:, group]
            residual[:, group] = values - values.mean(1, keepdims=True)
            n_parameters += 1
            continue
        x, y, z = protocol.bvecs[group].T
        theta, phi = np.arccos(np.clip(z, -1, 1)), np.arctan2(y, x)
        design = real_sh_descoteaux_from_index(m, n, theta[:, None], phi[:, None])
        coef, *_ = np.linalg.lstsq(design, data[:, group].T, rcond=None)
        residual[:, group] = data[:, group] - (design @ coef).T
        n_parameters += design.shape[1]
    return (residual**2).sum(1) / (data.shape[1] - n_parameters)


def tensor_axes(data, protocol):
    """Each voxel's principal diffusion direction from its b <= 2000 volumes."""
    kept = protocol.bvals <= 2000
    gtab = gradient_table(
        protocol.bvals[kept], bvecs=protocol.bvecs[kept], b0_threshold=1
    )
    return TensorModel(gtab).fit(data[:, kept]).evecs[..., 0]


def atoms(simulator, protocol, axes):
    """The dictionary (n_voxels, n_acquisitions, n_atoms) and each atom's
    kind: every bundle at every ODI about each voxel's axis, free water at
    each diffusivity, a dot."""
    responses = simulator.library.responses
    rows = responses[0].shell_rows(protocol)
    columns, kinds = [], []
    for response in responses:
        for odi in ODIS:
            kappa = np.inf if odi == 0 else 1 / np.tan(np.pi * odi / 2)
            kappas = np.full(len(axes), kappa)
            columns.append(response.signals(protocol, axes, kappas, rows=rows))
            kinds.append("bundle")
    for diffusivity in FREE_DIFFUSIVITIES:
        free = free_water_signal(protocol, diffusivity=diffusivity * 1e-3, t2=np.inf)
        columns.append(np.broadcast_to(free, (len(axes), len(protocol))))
        kinds.append(f"free {diffusivity}")
    dot = dot_signal(protocol, t2=np.inf)
    columns.append(np.broadcast_to(dot, (len(axes), len(protocol))))
    kinds.append("dot")
    return np.stack(columns, -1), np.array(kinds)


def fit_voxel(dictionary, signal, weighted, gain):
    """Non-negative weights, and each diffusion-weighted shell's (of
    ``weighted``) gain within ``1 +- gain`` (b = 0 sets the scale):
    alternating, each step exact (a bounded scalar least squares
    per shell, then NNLS). Returns the weights and the fitted signal's
    residual."""
    target = signal.copy()
    for _ in range(GAIN_ROUNDS if gain > 0 else 1):
        weights, _ = nnls(dictionary, target, maxiter=20 * dictionary.shape[1])
        model = dictionary @ weights
        for group in weighted if gain > 0 else ():
            scale = (signal[group] @ model[group]) / (signal[group] @ signal[group])
            target[group] = np.clip(scale, 1 - gain, 1 + gain) * signal[group]
    return weights, target - dictionary @ weights


def main(argv=None):
    parser = harness.parser(__doc__, seed=0, out="prior_check")
    parser.add_argument("--axes", nargs="+", choices=("z", "tensor"), default=["z"])
    parser.add_argument("--gains", type=float, nargs="+", default=[0.0])
    parser.add_argument("--n_library", type=int, default=64)
    parser.add_argument(
        "--n_voxels", type=int, default=None, help="a random subset of the cord's"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n_library, args.n_voxels = 2, 8
    cord, kept, data, _ = cord_set("3d", drift=True)
    protocol = cord.protocol[kept]
    if args.n_voxels is not None:
        rng = np.random.default_rng(args.seed)
        data = data[rng.choice(len(data), args.n_voxels, replace=False)]
    groups = shells(protocol.bvals, np.arange(len(protocol)))
    floor = smooth_floor(data, protocol, groups)
    prior = MixturePrior.fixed(fibre_axis=(0.0, 0.0, 1.0), n_library=args.n_library)
    simulator = prior.simulator(protocol, cache_dir=args.out, progress=True)
    b0 = protocol.bvals < 1
    print(
        f"{len(data)} white-matter voxels, {len(protocol)} volumes; library of "
        f"{args.n_library} bundles"
    )
    titles = [
        "axes",
        "shell gain bound",
        "residual variance / smooth fit (p10-p90)",
        *[f"mean residual b={protocol.bvals[g].mean():.0f}" for g in groups[1:]],
        "bundles / free / dot (signal share)",
        "free water D (um^2/ms)",
    ]
    print(harness.head(titles, "ll" + "r" * (len(titles) - 2)))
    for axes_kind in args.axes:
        start = time.perf_counter()
        if axes_kind == "z":
            axes = np.tile([0.0, 0.0, 1.0], (len(data), 1))
        else:
            axes = tensor_axes(data, protocol)
        dictionary, kinds = atoms(simulator, protocol, axes)
        for gain in args.gains:
            weights, residuals = zip(
                *(
                    fit_voxel(dictionary[v], data[v], groups[1:], gain)
                    for v in range(len(data))
                ),
                strict=True,
            )
            weights, residuals = np.array(weights), np.array(residuals)
            active = (weights > 0).sum(1)
            ratio = (residuals**2).sum(1) / (len(protocol) - active) / floor
            # Signal shares at b = 0 (every atom's b = 0 signal is its water).
            shares = weights * dictionary[:, b0].mean(1)
            shares /= shares.sum(1, keepdims=True)
            free = np.char.startswith(kinds, "free")
            diffusivity = np.array([float(k.split()[1]) for k in kinds[free]])
            free_d = (shares[:, free] * diffusivity).sum(1) / np.maximum(
                shares[:, free].sum(1), 1e-12
            )
            print(
                harness.row(
                    [
                        axes_kind,
                        f"{gain:.0%}",
                        f"{np.median(ratio):.2f} ({np.percentile(ratio, 10):.2f}-"
                        f"{np.percentile(ratio, 90):.2f})",
                        *[
                            f"{np.median(residuals[:, g].mean(1)):+.4f}"
                            for g in groups[1:]
                        ],
                        " / ".join(
                            f"{np.median(shares[:, sel].sum(1)):.2f}"
                            for sel in (kinds == "bundle", free, kinds == "dot")
                        ),
                        f"{np.median(free_d):.2f}",
                    ]
                ),
                flush=True,
            )
        print(f"({axes_kind}: {time.perf_counter() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
