"""Regenerates the tables of doc/validation/real_tissue.md.

``--quick``: ActiveAx alone (the posterior trains for minutes); needs the dmipy
1.0.5 files, and the tests skip it without them (-m slow). ``--oracle
--quick``: the oracle with fewer redrawn labels.

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
strongest down: the same q range and timings; ``--every 0``: all of them).

    python benchmarks/cord_histology.py --models activeax zcd noddi
    python benchmarks/cord_histology.py --models posterior --cache_dir DIR

Prints one table per quantity, over all 968 voxels and over the white
matter alone, and keeps each model's per-voxel estimates in ``--out_dir``
(``estimates_<model>.npz``): a later run with other ``--models`` joins them
into the same tables. ``--seed`` seeds torch's global generator (the fits
draw nothing else at random) and the oracle's folds and redrawn labels.

    python benchmarks/cord_histology.py --oracle

What the data allow (the page's "supervised oracle"): d_eff predicted from
each voxel's own signals (each timing over its own b = 0, averaged over the
in-plane directions per gradient strength, and their logarithms) by ridge
regression and k nearest neighbours trained on the histology, held out by
random folds and by folds of bands of the slice's rows (``--block_rows``,
no training voxel within ``--gap_rows`` rows of a test voxel), the
settings chosen by inner folds of the same kind; trained and scored within
all voxels, then within the white matter. Prints the oracle's table (its
Spearman correlation with a 90 % interval from resampling the bands; also
fed the nine b = 0 levels alone, and the histology's fibre and myelin
fractions alone: what confounds give), each confound's Spearman correlation with
d_eff, and the label's own noise: d_eff recomputed from each voxel's axon
count drawn from its gamma, from a log-normal instead, the database's
volume-corrected diameter, and the neighbouring voxel's d_eff; last, the
white matter's blocked ridge as the gap widens from 0 to 4 rows.
"""

import pathlib
import platform
import time

import harness
import numpy as np
import torch
from dipy.segment.threshold import otsu
from scipy import stats

from dipy_spinverse.data import read_cat_spinal_cord
from dipy_spinverse.io.datasets import effective_diameter, thin_qspace
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

    if every:
        rows, gtab = thin_qspace(dataset, every)
    else:  # the whole scheme
        rows, gtab = np.arange(len(dataset.protocol)), dataset.gtab
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
    titles = ["model", "n", "Spearman", "Pearson", "median abs error", "median"]
    print(harness.head([*titles, "90 % holds truth", "90 % width", "rho(S0)"]))
    for name, r in rows.items():
        cover = f"{100 * r['coverage_90']:.0f} %" if "coverage_90" in r else "--"
        width = f"{r['width_90']:.2f}" if "width_90" in r else "--"
        cells = [name, r["n"], f"{r['spearman']:.2f}", f"{r['pearson']:.2f}"]
        cells += [f"{r['median_abs_error']:.2f}", f"{r['median_estimate']:.2f}"]
        print(harness.row([*cells, cover, width, f"{r['spearman_s0']:.2f}"]))


# The supervised oracle (--oracle): what the signals could tell of d_eff
# given the histology as labels, and how far the label itself can be trusted.

#: Ridge penalties tried (features standardised) and kNN's neighbours.
ALPHAS = np.logspace(-2, 5, 15)
NEIGHBOURS = (3, 5, 10, 20, 40)
#: Principal components of the standardised features kNN measures distance in.
KNN_COMPONENTS = 10


def shell_features(dataset, levels, keep=None):
    """Each voxel's direction-averaged signal per timing and gradient strength.

    Every volume is divided by its own timing's b = 0 level, and the volumes
    of one timing and one gradient strength (the in-plane directions, all
    across the cord's axis z) are averaged.

    Parameters
    ----------
    dataset : RealDataset
        The cord (:func:`read_cat_spinal_cord`).
    levels : ndarray (n, N)
        Each masked voxel's b = 0 level of each volume
        (``RealDataset.repeated_b0_noise``).
    keep : ndarray of int, optional
        The volumes used (default all): e.g. the subset a posterior is
        trained for (:func:`~dipy_spinverse.io.datasets.thin_qspace`).

    Returns
    -------
    ndarray (n, 2 F)
        The F normalised signals, then their logarithms (floored at 1e-4).
    """
    signal = dataset.data[dataset.mask] / levels
    strength = np.round(dataset.protocol.gradient_strength, 4)
    b0 = np.asarray(dataset.gtab.b0s_mask)
    kept = np.ones(len(b0), dtype=bool)
    if keep is not None:
        kept = np.isin(np.arange(len(b0)), keep)
    columns = []
    for _, rows in dataset.protocol.groups():
        rows = rows[~b0[rows] & kept[rows]]
        for level in np.unique(strength[rows]):
            columns.append(signal[:, rows[strength[rows] == level]].mean(-1))
    shells = np.stack(columns, axis=-1)
    return np.concatenate([shells, np.log(np.clip(shells, 1e-4, None))], axis=-1)


def random_folds(n, n_folds, rng):
    """``n_folds`` (train, test) index pairs of a random partition of ``n``."""
    order = rng.permutation(n)
    return [
        (np.setdiff1d(order, test, assume_unique=True), np.sort(test))
        for test in np.array_split(order, n_folds)
    ]


def blocked_folds(rows, n_folds, block, gap):
    """(train, test) index pairs whose folds are bands of the slice's rows.

    Rows are cut into bands of ``block`` rows, dealt to the folds in turn;
    a fold's training set leaves out its test rows and the ``gap`` rows on
    either side of them, so that no training voxel lies within ``gap`` rows
    of a test voxel (neighbouring voxels share their histology and signal).

    Parameters
    ----------
    rows : ndarray of int (n,)
        Each voxel's row in the slice.
    n_folds, block, gap : int

    Returns
    -------
    list of (ndarray, ndarray)
        Indices into ``rows``; folds without a test voxel are dropped.
    """
    rows = np.asarray(rows)
    fold = ((rows - rows.min()) // block) % n_folds
    out = []
    for k in range(n_folds):
        test = np.flatnonzero(fold == k)
        if test.size == 0:
            continue
        near = np.abs(rows[:, None] - np.unique(rows[test])[None, :]).min(-1)
        out.append((np.flatnonzero(near > gap), test))
    return out


def _standardise(train, *others):
    mean, std = train.mean(0), train.std(0)
    std[std == 0] = 1.0
    return [(x - mean) / std for x in (train, *others)]


def _gram(x_train, x_test):
    """The standardised features' Gram matrix's eigenvectors and values
    (largest first), and the test voxels' products with the training ones:
    ridge and principal components in n x n, cheaper than p x p here."""
    x_train, x_test = _standardise(x_train, x_test)
    values, vectors = np.linalg.eigh(x_train @ x_train.T)
    return vectors[:, ::-1], np.clip(values[::-1], 0, None), x_test @ x_train.T


def ridge_predictions(x_train, y_train, x_test, alphas=ALPHAS):
    """Ridge regression's predictions of ``x_test`` for each penalty
    (features standardised on the training voxels; the dual form).

    Returns
    -------
    ndarray (n_test, len(alphas))
    """
    vectors, values, cross = _gram(x_train, x_test)
    centre = y_train.mean()
    uty = vectors.T @ (y_train - centre)
    weights = uty[:, None] / (values[:, None] + np.asarray(alphas)[None, :])
    return centre + cross @ vectors @ weights


def knn_predictions(x_train, y_train, x_test, neighbours=NEIGHBOURS):
    """k nearest neighbours' mean label for each k, in the first
    :data:`KNN_COMPONENTS` principal components of the standardised features.

    Returns
    -------
    ndarray (n_test, len(neighbours))
    """
    vectors, values, cross = _gram(x_train, x_test)
    top = min(KNN_COMPONENTS, np.count_nonzero(values > 1e-9 * values[0]))
    a = vectors[:, :top] * np.sqrt(values[:top])
    b = cross @ vectors[:, :top] / np.sqrt(values[:top])
    distance = ((b[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    ranked = y_train[np.argsort(distance, axis=1)]
    return np.stack([ranked[:, :k].mean(1) for k in neighbours], axis=-1)


def cross_validated(x, y, folds, make_folds, predictions):
    """Held-out predictions, each fold's setting chosen by inner folds.

    Parameters
    ----------
    x : ndarray (n, F)
    y : ndarray (n,)
    folds : list of (ndarray, ndarray)
        The outer (train, test) indices.
    make_folds : callable
        ``make_folds(train)`` gives the inner folds of a training set, as
        indices into it.
    predictions : callable
        ``predictions(x_train, y_train, x_test)`` -> (n_test, settings).

    Returns
    -------
    ndarray (n,)
        NaN where a voxel is in no test fold.
    """
    held_out = np.full(len(y), np.nan)
    for train, test in folds:
        errors = 0.0
        for inner_train, inner_test in make_folds(train):
            guess = predictions(
                x[train[inner_train]], y[train[inner_train]], x[train[inner_test]]
            )
            errors = errors + ((guess - y[train[inner_test], None]) ** 2).sum(0)
        best = int(np.argmin(errors))
        held_out[test] = predictions(x[train], y[train], x[test])[:, best]
    return held_out


def band_bootstrap(x, y, rows, block, rng, draws=1000, level=0.9):
    """A ``level`` interval of Spearman(x, y) from resampling bands of
    ``block`` rows with replacement (neighbouring voxels are not
    independent; the bands are the blocked folds')."""
    band = (rows - rows.min()) // block
    members = [np.flatnonzero(band == b) for b in np.unique(band)]
    values = []
    for _ in range(draws):
        take = np.concatenate(
            [members[i] for i in rng.integers(len(members), size=len(members))]
        )
        values.append(stats.spearmanr(x[take], y[take])[0])
    return tuple(np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2]))


def partial_spearman(x, y, covariates):
    """Spearman correlation of ``x`` and ``y`` with the ranks of
    ``covariates`` (n, C) regressed out of both."""
    design = np.column_stack(
        [np.ones(len(x))] + [stats.rankdata(c) for c in np.atleast_2d(covariates)]
    )
    residuals = []
    for v in (x, y):
        r = stats.rankdata(v)
        residuals.append(r - design @ np.linalg.lstsq(design, r, rcond=None)[0])
    return float(stats.pearsonr(*residuals)[0])


def label_resampled(mean, std, count, rng):
    """The label d_eff recomputed from ``count`` axons drawn per voxel from
    the gamma distribution its mean and std describe (the label's own
    sampling error; at least 2 axons a voxel)."""
    out = np.array(mean, dtype=float, copy=True)
    for i in np.flatnonzero((mean > 0) & (std > 0)):
        k = (mean[i] / std[i]) ** 2
        drawn = rng.gamma(k, std[i] ** 2 / mean[i], size=max(int(round(count[i])), 2))
        out[i] = effective_diameter(drawn.mean(), drawn.std(ddof=1))
    return out


def lognormal_effective_diameter(mean, std):
    """d_eff = (<d^6>/<d^2>)^(1/4) with log-normal diameters of the given mean
    and std: ``exp(mu + 4 s^2)`` (the gamma's alternative, for the label's
    dependence on its distribution)."""
    s2 = np.log1p((std / mean) ** 2)
    return np.exp(np.log(mean) - s2 / 2 + 4 * s2)


def oracle(
    cord, s0, levels, wm, *, seed, n_folds=5, block=5, gap=2, replicates=20, every=None
):
    """The supervised oracle's and the label's tables (see the page).

    Parameters
    ----------
    cord : RealDataset
    s0 : ndarray (n,)
        Each masked voxel's mean b = 0 level.
    levels : ndarray (n, N)
        Each masked voxel's b = 0 level per volume.
    wm : ndarray of bool (n,)
        The white matter.
    seed : int
        Seeds the random folds and the label's resampling.
    n_folds, block, gap : int
        The folds (:func:`blocked_folds`).
    replicates : int
        Resamplings of the label.
    every : int, optional
        Also fed the volumes of the posterior's subset
        (:func:`~dipy_spinverse.io.datasets.thin_qspace` of ``every``): what
        thinning the protocol costs.

    Returns
    -------
    dict
        The oracle's rows, the confounds' and the label's numbers.
    """
    h = {k: v[cord.mask] for k, v in cord.histology.items()}
    y = h["axon_diameter_effective"]
    rows = np.nonzero(cord.mask)[0]
    signals = shell_features(cord, levels)
    t2 = np.log(np.unique(levels, axis=1))  # the nine timings' b = 0 levels
    covariates = np.stack([h["axon_fraction"], h["myelin_fraction"]])
    inputs = {"signals": signals}
    if every:
        subset = thin_qspace(cord, every)[0]
        inputs[f"signals of {len(subset)} volumes"] = shell_features(
            cord, levels, keep=subset
        )
    inputs |= {
        "b = 0 levels": t2,
        "histology fr, MVF": np.column_stack(
            [h["axon_fraction"], h["myelin_fraction"]]
        ),
    }
    regressors = {"ridge": ridge_predictions, "kNN": knn_predictions}
    out = {"oracle": [], "confounds": [], "label": []}
    for region, where in (("all", np.ones_like(wm)), ("white matter", wm)):
        index = np.flatnonzero(where)
        rng = np.random.default_rng(seed)
        schemes = {
            "random": (
                random_folds(len(index), n_folds, rng),
                lambda train, rng=rng: random_folds(len(train), n_folds, rng),
            ),
            "blocked": (
                blocked_folds(rows[index], n_folds, block, gap),
                lambda train, at=rows[index]: blocked_folds(
                    at[train], n_folds, block, gap
                ),
            ),
        }
        for name, x in inputs.items():
            for scheme, (folds, inner) in schemes.items():
                for regressor, predictions in regressors.items():
                    guess = cross_validated(
                        x[index], y[index], folds, inner, predictions
                    )
                    ok = np.isfinite(guess)
                    out["oracle"].append(
                        {
                            "voxels": region,
                            "inputs": name,
                            "folds": scheme,
                            "regressor": regressor,
                            "n": int(ok.sum()),
                            "spearman": stats.spearmanr(guess[ok], y[index][ok])[0],
                            "pearson": stats.pearsonr(guess[ok], y[index][ok])[0],
                            "median_abs_error": np.median(
                                np.abs(guess[ok] - y[index][ok])
                            ),
                            "interval": band_bootstrap(
                                guess[ok],
                                y[index][ok],
                                rows[index][ok],
                                block,
                                np.random.default_rng(seed),
                            ),
                            "partial": partial_spearman(
                                guess[ok], y[index][ok], covariates[:, index][:, ok]
                            ),
                        }
                    )
        for name, value in (
            ("S0 (mean b = 0)", s0),
            ("fibre fraction fr", h["axon_fraction"]),
            ("myelin fraction", h["myelin_fraction"]),
            ("axon count", h["axon_count"]),
            ("g-ratio", h["g_ratio"]),
        ):
            out["confounds"].append(
                (region, name, stats.spearmanr(value[index], y[index])[0])
            )
    # The label's own uncertainty.
    rng = np.random.default_rng(seed)
    mean, std, count = h["axon_diameter"], h["axon_diameter_std"], h["axon_count"]
    draws = [label_resampled(mean, std, count, rng) for _ in range(replicates)]
    spread = np.std(draws, axis=0) / y
    lognormal = lognormal_effective_diameter(mean, std)
    image = np.full(cord.mask.shape, np.nan)
    image[cord.mask] = y
    image = image[..., 0]
    for region, where in (("all", np.ones_like(wm)), ("white matter", wm)):
        resampled = [stats.spearmanr(d[where], y[where])[0] for d in draws]
        retest = [
            stats.spearmanr(a[where], b[where])[0]
            for a, b in zip(draws[::2], draws[1::2], strict=False)
        ]
        neighbour = []
        for axis in (0, 1):
            mask2d = np.zeros(cord.mask.shape[:2], dtype=bool)
            mask2d[cord.mask[..., 0]] = where
            shifted = np.roll(image, 1, axis)
            both = mask2d & np.roll(mask2d, 1, axis)
            neighbour.append(stats.spearmanr(image[both], shifted[both])[0])
        out["label"].append(
            {
                "voxels": region,
                "relative_sd": float(np.median(spread[where])),
                "resampled": float(np.median(resampled)),
                "retest": float(np.median(retest)) if retest else float("nan"),
                "lognormal": stats.spearmanr(lognormal[where], y[where])[0],
                "volume_corrected": stats.spearmanr(
                    h["axon_diameter_volume"][where], y[where]
                )[0],
                "neighbour": float(np.mean(neighbour)),
            }
        )
    out["gaps"] = gap_sensitivity(cord, levels, wm, n_folds=n_folds, block=block)
    return out


def gap_sensitivity(cord, levels, wm, *, n_folds=5, block=5, gaps=range(5)):
    """The white matter's blocked ridge oracle as the gap between training
    and test rows widens: nested (the penalty chosen by inner folds, as in
    the oracle's table) and with the penalty that scores best on the
    held-out voxels themselves (chosen on the test: an upper bound).

    Returns
    -------
    list of dict
        Per gap: ``gap``, ``train`` (median training voxels a fold),
        ``nested`` and ``best`` (Spearman with d_eff), ``best_alpha``.
    """
    y = cord.histology["axon_diameter_effective"][cord.mask][wm]
    x = shell_features(cord, levels)[wm]
    rows = np.nonzero(cord.mask)[0][wm]
    out = []
    for gap in gaps:
        folds = blocked_folds(rows, n_folds, block, gap)
        every = np.full((len(y), len(ALPHAS)), np.nan)
        for train, test in folds:
            every[test] = ridge_predictions(x[train], y[train], x[test])
        rho = [stats.spearmanr(every[:, j], y)[0] for j in range(len(ALPHAS))]
        nested = cross_validated(
            x,
            y,
            folds,
            lambda train, gap=gap: blocked_folds(rows[train], n_folds, block, gap),
            ridge_predictions,
        )
        out.append(
            {
                "gap": gap,
                "train": int(np.median([len(train) for train, _ in folds])),
                "nested": stats.spearmanr(nested, y)[0],
                "best": float(np.max(rho)),
                "best_alpha": float(ALPHAS[int(np.argmax(rho))]),
            }
        )
    return out


def print_oracle(out, seconds):
    """The oracle's tables, as the page gives them."""
    print(
        "\nSupervised oracle: d_eff predicted from the voxel's own data, held out "
        "(trained and scored within the same voxels; 'partial': Spearman with fr "
        "and MVF partialled out)"
    )
    titles = ["voxels", "inputs", "folds", "regressor", "n"]
    titles += ["Spearman (90 %, bands resampled)", "Pearson", "median abs error (um)"]
    print(harness.head([*titles, "partial"]))
    for r in out["oracle"]:
        print(
            f"| {r['voxels']} | {r['inputs']} | {r['folds']} | {r['regressor']} | "
            f"{r['n']} | {r['spearman']:.2f} ({r['interval'][0]:.2f} to "
            f"{r['interval'][1]:.2f}) | {r['pearson']:.2f} | "
            f"{r['median_abs_error']:.2f} | {r['partial']:.2f} |"
        )
    print("\nOne quantity alone: its Spearman correlation with d_eff")
    print(harness.head(["voxels", "quantity", "Spearman"]))
    for region, name, rho in out["confounds"]:
        print(harness.row([region, name, f"{rho:.2f}"]))
    print(
        "\nThe label d_eff: its sampling error (axons redrawn from each voxel's "
        "gamma), its dependence on the distribution assumed and on the voxel"
    )
    titles = ["voxels", "median relative sd", "Spearman with a redrawn label"]
    titles += ["between two redrawn", "log-normal d_eff", "volume-corrected diameter"]
    print(harness.head([*titles, "one voxel over"]))
    for r in out["label"]:
        print(
            f"| {r['voxels']} | {100 * r['relative_sd']:.1f} % | {r['resampled']:.3f} "
            f"| {r['retest']:.3f} | {r['lognormal']:.2f} | "
            f"{r['volume_corrected']:.2f} | {r['neighbour']:.2f} |"
        )
    print(
        "\nWhite matter, blocked ridge on the signals, as the gap between training "
        "and test rows widens (best penalty: chosen on the test voxels, an upper "
        "bound)"
    )
    titles = ["gap (rows)", "training voxels a fold (median)", "Spearman, nested"]
    print(harness.head([*titles, "Spearman, best penalty", "its penalty"]))
    for r in out["gaps"]:
        cells = [r["gap"], r["train"], f"{r['nested']:.2f}", f"{r['best']:.2f}"]
        print(harness.row([*cells, f"{r['best_alpha']:.3g}"]))
    print(f"oracle: {seconds:.0f} s")


def main(argv=None):
    parser = harness.parser(__doc__, seed=0)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=None)
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="the supervised oracle and the label's noise (alone unless --models)",
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--block_rows", type=int, default=5)
    parser.add_argument("--gap_rows", type=int, default=2)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--dmipy", default=None, help="dmipy installation or wheel")
    parser.add_argument("--out_dir", default="cord_histology")
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = [] if args.oracle else list(MODELS)
    if args.quick and not args.oracle:  # ActiveAx; the posterior trains for minutes
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
    histology = {k: v[cord.mask] for k, v in cord.histology.items()}
    wm, threshold = white_matter(cord)
    if args.oracle:
        start = time.perf_counter()
        out = oracle(
            cord,
            s0,
            levels,
            wm,
            seed=args.seed,
            n_folds=args.folds,
            block=args.block_rows,
            gap=args.gap_rows,
            replicates=4 if args.quick else 20,
            every=args.every,
        )
        print_oracle(out, time.perf_counter() - start)
        if not args.models:
            return
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
