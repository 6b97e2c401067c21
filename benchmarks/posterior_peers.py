"""Regenerates the tables of doc/validation/posterior.md.

``--quick``: the shipped default estimator on 8 held-out draws (about a
minute: every compartment model is fitted too; -m slow).

The amortised posterior against the compartment models, on the same voxels.

Draws ``--n_test`` held-out voxels from the posterior's prior (``--seed``,
never used in training), adds Rician noise at SNR 100 and 30, and estimates
each voxel's tissue descriptors with the posterior median
(``SpinverseModel(..., fit_method="posterior")``) and with every peer that
estimates the same quantity from the same noisy signals: ActiveAx and ZCD
(``fic``, ``diameter``, a cylinder's ``4 / diameter``), NODDI
(``(1 - fiso) ndi``), Karger (``f_intra``, ``exchange_time``) and, where
the independent ``nexi`` package can be imported, NEXI (``f``, ``t_ex``,
through its file-based ``estimate_nexi``). The peers get the prior's
diffusivity where they fix one, and bounds wide enough for its diameters
and exchange times.

Prints, per descriptor and SNR, each method's median absolute error and, in
brackets, the median of ``|error| / truth``, over the voxels whose posterior
status is 0; then each method's mean |error| beside the posterior's Bayes
risk (its own expected |error| of its median, the least mean |error| any
estimator can reach where the posterior is calibrated). The options that
name the estimator are ``benchmarks/posterior_calibration.py``'s (the same
options read the same cached estimator); ``--left_out`` also scores
held-out draws of the families left out of training, ``--test_resolution
R`` simulates and describes the held-out tissue on a finer grid (no home
advantage), and ``--search N`` also fits the first N voxels with the label
search (``fit_method="search"``, the default preset and grid; 10-30 s a
voxel and SNR on 2 cores), its labelled cells described by
:func:`dipy_spinverse.geometry.describe`, the definition of the prior's
truth.

    python benchmarks/posterior_peers.py --resolution 2 --cell_diameter 8 25 \\
        --min_spacings 1 --n_directions 6 --n_train 1500 --epochs 40 \\
        --left_out torus fanning_tube --n_test 100
"""

import logging
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import harness
import numpy as np
import torch
from posterior_calibration import (
    add_estimator_arguments,
    add_test_arguments,
    held_out,
    rician,
    trained_model,
)

from dipy_spinverse import SpinverseModel
from dipy_spinverse.compartments import (
    ActiveAxModel,
    ExchangeModel,
    NoddiModel,
    ZcdModel,
)
from dipy_spinverse.geometry import describe
from dipy_spinverse.reconst.codes import FITTED
from dipy_spinverse.reconst.posterior import OUT_OF_PRIOR

SNRS = (100, 30)
# Never used in training (seed 0, probe 10**6) nor by posterior_calibration.
TEST_SEED = 123_457
#: Descriptors with at least one peer, and their units.
SCORED = {
    "restricted_fraction": "",
    "cell_diameter": "um",
    "surface_to_volume": "1/um",
    "permeability": "m/s",
    "exchange_time": "s",
}
# Fit bounds of the peers, wide enough for the prior's truths (cells up to
# 25 um; exchange times of 2 ms to 3.3 s in the 8-25 um prior).
DIAMETER_BOUNDS = (0.2, 30.0)
EXCHANGE_TIME_BOUNDS = (1e-3, 10.0)
POSTERIOR = "posterior"
SEARCH = "search"
# The posterior's own expected |error| of its median, per voxel: averaged
# over draws of the prior, the least mean |error| any estimator can reach
# (the posterior median is the Bayes estimator under absolute loss), where
# the posterior is calibrated.
BAYES_RISK = "Bayes risk"
RISK_DRAWS = 400


def expected_errors(fit):
    """Per voxel and descriptor, E|theta - median| under the fit's posterior
    (its recalibrated draws, those its intervals are quantiles of)."""
    out = {}
    for name in SCORED:
        draws = fit.posterior_samples(name, RISK_DRAWS, seed=7)
        out[name] = np.mean(np.abs(draws - np.median(draws, axis=0)), axis=0)
    return out


def compartment_peers(gtab, diffusivity):
    """``{name: (build, read)}``: each compartment model and how its maps
    become descriptors (``read(fit) -> {descriptor: (n,) array}``)."""
    # All of the prior's water diffuses with one D: the models that fix
    # their diffusivities get it (as examples/compare_compartment_models.py).
    fixed = {} if diffusivity is None else {"d_par": diffusivity, "d_iso": diffusivity}

    def activeax():
        return ActiveAxModel(gtab, diameter_bounds=DIAMETER_BOUNDS, **fixed)

    def zcd():
        return ZcdModel(gtab, diameter_bounds=DIAMETER_BOUNDS)

    def noddi():
        return NoddiModel(gtab, **fixed)

    def karger():
        return ExchangeModel(gtab, exchange_time_bounds=EXCHANGE_TIME_BOUNDS)

    def cylinders(fit):
        return {
            "restricted_fraction": fit.fic,
            "cell_diameter": fit.diameter,
            "surface_to_volume": 4.0 / fit.diameter,  # a cylinder's
        }

    def neurites(fit):
        return {"restricted_fraction": (1.0 - fit.fiso) * fit.ndi}

    def exchange(fit):
        return {
            "restricted_fraction": fit.f_intra,
            "exchange_time": fit.exchange_time,
        }

    return {
        "ActiveAx": (activeax, cylinders),
        "ZCD": (zcd, cylinders),
        "NODDI": (noddi, neurites),
        "Karger": (karger, exchange),
    }


def search_estimates(protocol, noisy, snr, n, diffusivity):
    """Descriptors of the label search's fit of the first ``n`` voxels (NaN
    for the others and where the search has no output): the default preset
    and grid, the prior's diffusivity."""
    options = {} if diffusivity is None else {"diffusivity": diffusivity}
    model = SpinverseModel(protocol, fit_method="search", sigma=1.0 / snr, **options)
    fit = model.fit(noisy[:n])
    out = {name: np.full(len(noisy), np.nan) for name in SCORED}
    labels, kappa = fit.labels, fit.permeability
    for i in np.flatnonzero(np.isin(fit.status, FITTED)):
        if labels is None:  # a face fit without labels: its enclosed regions
            out["restricted_fraction"][i] = fit.restricted_fraction[i]
            continue
        found = describe(model.grid, labels[i], kappa[i])
        for name in SCORED:
            out[name][i] = found[name]
    return out


def nexi_estimates(nexi, gtab, noisy, snr):
    """NEXI's exchange time (s) and neurite fraction through its public,
    file-based ``estimate_nexi`` (b in ms/um^2, diffusion times in ms)."""
    import nibabel as nib

    n = len(noisy)
    eye = np.eye(4)
    # nexi squeezes the mask: a volume with axes of length 1 loses them
    # there and not in the image, so the voxels go in (m, 2, 2), padded.
    m = max(2, -(-n // 4))
    shape = (m, 2, 2)
    padded = np.zeros((4 * m, noisy.shape[1]), dtype=np.float32)
    padded[:n] = noisy
    padded[n:] = noisy[0]  # fitted and dropped: the mask is 0 there
    inside = np.arange(4 * m) < n
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder)
        files = {k: str(path / f"{k}.nii.gz") for k in ("dwi", "sigma", "mask")}
        volume = padded.reshape(shape + (noisy.shape[1],))
        nib.save(nib.Nifti1Image(volume, eye), files["dwi"])
        noise = np.full(shape, 1.0 / snr, dtype=np.float32)
        nib.save(nib.Nifti1Image(noise, eye), files["sigma"])
        mask = inside.reshape(shape).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, eye), files["mask"])
        np.savetxt(path / "dwi.bval", gtab.bvals[None] / 1000.0)
        big_delta = np.broadcast_to(gtab.big_delta, gtab.bvals.shape)
        np.savetxt(path / "dwi.td", big_delta[None] * 1e3)
        nexi.estimate_nexi(
            dwi_path=files["dwi"],
            bvals_path=str(path / "dwi.bval"),
            td_path=str(path / "dwi.td"),
            lowb_noisemap_path=files["sigma"],
            out_path=str(path / "out"),
            mask_path=files["mask"],
        )

        def read(suffix):
            found = sorted((path / "out").glob(f"*{suffix}.nii.gz"))
            if not found:
                raise FileNotFoundError(f"no *{suffix}.nii.gz written by nexi")
            return np.asarray(nib.load(found[0]).get_fdata()).reshape(-1)[:n]

        return {
            "exchange_time": read("_t_ex") * 1e-3,  # ms -> s
            "restricted_fraction": read("_f"),
        }


class Record:
    """The time each method took (all SNRs together) and why any failed."""

    def __init__(self):
        self.seconds, self.failures = {}, {}

    def run(self, name, snr, estimates, function, *args):
        """``function(*args)`` into ``estimates[name]``, timed; a method
        that raises is reported, not fatal."""
        start = time.perf_counter()
        try:
            estimates[name] = function(*args)
        except Exception as err:
            self.failures.setdefault(name, f"SNR {snr}: {type(err).__name__}: {err}")
            return
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def peer_estimates(models, name, build, read, noisy):
    """A compartment model's descriptors (the model built once, reused)."""
    if name not in models:
        models[name] = build()
    return read(models[name].fit(noisy))


def compare(make_model, protocol, gtab, signals, rng, nexi, diffusivity, *, search):
    """Every method's estimates at each SNR, on the same noisy voxels; the
    label search's on the first ``search`` voxels.

    Returns ``(results, record)``: ``results[snr]`` is ``(status, {method:
    {descriptor: (n,) array}})``, ``status`` the posterior's.
    """
    peers = compartment_peers(gtab, diffusivity)
    models, results, record = {}, {}, Record()
    for snr in SNRS:
        noisy = rician(signals, snr, rng)
        start = time.perf_counter()
        fit = make_model(1.0 / snr).fit(noisy)
        seconds = record.seconds.get(POSTERIOR, 0.0) + time.perf_counter() - start
        record.seconds[POSTERIOR] = seconds
        status = np.asarray(fit.status)
        estimates = {POSTERIOR: {k: np.asarray(getattr(fit, k)) for k in SCORED}}
        estimates[BAYES_RISK] = expected_errors(fit)
        for name, (build, read) in peers.items():
            record.run(
                name, snr, estimates, peer_estimates, models, name, build, read, noisy
            )
        if nexi is not None:
            record.run("NEXI", snr, estimates, nexi_estimates, nexi, gtab, noisy, snr)
        if search:
            record.run(
                SEARCH,
                snr,
                estimates,
                search_estimates,
                protocol,
                noisy,
                snr,
                search,
                diffusivity,
            )
        results[snr] = status, estimates
    return results, record


def errors(estimated, true):
    """(median |error|, median |error| / |truth|, voxels) over finite pairs."""
    estimated = np.asarray(estimated, dtype=float)
    finite = np.isfinite(estimated) & np.isfinite(true)
    if not finite.any():
        return None
    error = np.abs(estimated[finite] - true[finite])
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = error / np.abs(true[finite])
    return float(np.median(error)), float(np.median(relative)), int(finite.sum())


def scored_voxels(status, estimates, name, voxels, common):
    """The voxels a descriptor is scored on: the posterior's status 0 among
    ``voxels``, and where ``common`` (a method) has a finite estimate of it,
    so that every method is scored on the same ones (the label search has
    no cell size, membrane or exchange time where it found no cell)."""
    ok = (status == 0) & voxels
    if common is not None:
        picked = estimates.get(common, {}).get(name, np.nan)
        ok &= np.isfinite(np.asarray(picked, dtype=float))
    return ok


def print_risk_table(title, results, truth, methods, *, voxels, common=None):
    """Mean |error| of every method against the posterior's Bayes risk, per
    descriptor and SNR, on the scored voxels (:func:`scored_voxels`): no
    estimator's mean |error| on draws of the prior is below that risk, so a
    peer within twice it cannot be halved."""
    width = 14
    print(f"\n{title}")
    print(
        f"{'descriptor':>26} {'SNR':>4} {'n':>4} {BAYES_RISK:>{width}} "
        + " ".join(f"{m:>{width}}" for m in methods)
    )
    for name, unit in SCORED.items():
        label = f"{name} ({unit})" if unit else name
        true = np.asarray(truth[name], dtype=float)
        for snr, (status, estimates) in results.items():
            ok = scored_voxels(status, estimates, name, voxels, common)
            risk = float(np.mean(estimates[BAYES_RISK][name][ok]))
            cells = [f"{risk:>{width}.3g}"]
            for method in methods:
                values = estimates.get(method, {}).get(name)
                finite = ok & np.isfinite(np.asarray(values, dtype=float))
                if values is None or not finite.any():
                    cells.append(f"{'-':>{width}}")
                    continue
                error = np.mean(np.abs(values[finite] - true[finite]))
                text = f"{error:.3g}" + (
                    f" n={finite.sum()}" if finite.sum() < ok.sum() else ""
                )
                cells.append(f"{text:>{width}}")
            print(f"{label:>26} {snr:>4} {int(ok.sum()):>4} " + " ".join(cells))


def print_table(title, results, truth, methods, record, *, voxels=None, common=None):
    """The errors of every method per descriptor and SNR; '-' where a
    method has no estimate of a descriptor. ``voxels``: a boolean mask of
    the voxels scored (default all); ``common``: see :func:`scored_voxels`."""
    width = 22
    print(f"\n{title}")
    flagged = {
        snr: int(np.sum(status == OUT_OF_PRIOR)) for snr, (status, _) in results.items()
    }
    whole = voxels is None
    if whole:
        voxels = np.ones(len(next(iter(results.values()))[0]), dtype=bool)
    for snr, (status, _) in results.items():
        print(
            f"  SNR {snr}: {int(np.sum((status == 0) & voxels))} of "
            f"{int(voxels.sum())} voxels scored "
            f"(posterior status 0); {flagged[snr]} OUT_OF_PRIOR excluded, "
            f"{int(np.sum((status != 0) & (status != OUT_OF_PRIOR)))} other"
        )
    header = f"{'descriptor':>26} {'SNR':>4} {'n':>4} "
    header += " ".join(f"{m:>{width}}" for m in methods)
    print(header)
    for name, unit in SCORED.items():
        label = f"{name} ({unit})" if unit else name
        true = np.asarray(truth[name], dtype=float)
        for snr, (status, estimates) in results.items():
            ok = scored_voxels(status, estimates, name, voxels, common)
            cells = []
            for method in methods:
                values = estimates.get(method, {}).get(name)
                if values is None:  # no counterpart (or the method failed)
                    cells.append(f"{'-':>{width}}")
                    continue
                got = errors(values[ok], true[ok])
                if got is None:  # no finite estimate on the scored voxels
                    cells.append(f"{'n=0':>{width}}")
                    continue
                error, relative, count = got
                text = f"{error:.3g} ({relative:.0%})"
                if count != ok.sum():
                    text += f" n={count}"
                cells.append(f"{text:>{width}}")
            print(f"{label:>26} {snr:>4} {int(ok.sum()):>4} " + " ".join(cells))
    if not whole:  # times and bounds are of the whole set, printed with it
        return
    print(
        "fit time, all SNRs: "
        + ", ".join(
            f"{m} {record.seconds[m]:.1f} s" for m in methods if m in record.seconds
        )
    )
    for snr, (status, estimates) in results.items():
        tau = estimates.get("Karger", {}).get("exchange_time")
        if tau is not None:
            top = np.sum(tau[status == 0] >= 0.99 * EXCHANGE_TIME_BOUNDS[1])
            print(
                f"Karger, SNR {snr}: {top} of {int(np.sum(status == 0))} exchange "
                f"times at the upper bound ({EXCHANGE_TIME_BOUNDS[1]:g} s: no "
                "exchange seen)"
            )
    for method, reason in record.failures.items():
        print(f"{method} failed ({reason}); its column is '-'")


def main(argv=None):
    parser = harness.parser(
        __doc__,
        seed=TEST_SEED,
        seed_help="held-out draws (the left-out families' from seed + 1)",
    )
    add_estimator_arguments(parser)
    parser.add_argument("--n_test", type=int, default=100)
    parser.add_argument(
        "--search",
        type=int,
        default=0,
        metavar="N",
        help="also fit the first N voxels with the label search (slow: a "
        "minute or more a voxel and SNR)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    add_test_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:  # the shipped default estimator on 8 held-out draws
        args.default, args.n_test, args.search = True, 8, 0
    warnings.simplefilter("ignore", UserWarning)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    argv = sys.argv[1:] if argv is None else list(argv)
    print("command: python benchmarks/posterior_peers.py " + shlex.join(argv))
    print(
        f"machine: {platform.machine()}, {platform.platform()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} on "
        f"{torch.get_num_threads()} threads; {date.today()}"
    )
    protocol, prior_of, make_model, model = trained_model(args)
    prior = model.prior.prior
    diffusivity = prior.diffusivity if np.ndim(prior.diffusivity) == 0 else None
    try:
        import nexi
    except ImportError as err:
        nexi = None
        print(f"nexi is not installed ({err}): no NEXI column (exchange time)")
    methods = [POSTERIOR, "ActiveAx", "ZCD", "NODDI", "Karger"]
    methods += ["NEXI"] * (nexi is not None) + [SEARCH] * (args.search > 0)
    sets = [("held-out draws of the training prior", model.prior, args.seed)]
    if args.left_out:
        left = prior_of(args.left_out)
        title = f"families left out of training: {list(args.left_out)}"
        sets.append((title, left.simulator(protocol), args.seed + 1))
    # The label search fits the first set's voxels only: a minute or more a
    # voxel and SNR.
    searches = [args.search, 0]
    for (title, simulator, seed), search in zip(sets, searches, strict=False):
        start = time.perf_counter()
        signals, truth, _ = held_out(
            simulator, args.n_test, seed=seed, resolution=args.test_resolution
        )
        print(
            f"\n{title}: {args.n_test} simulations in "
            f"{time.perf_counter() - start:.0f} s"
        )
        rng = np.random.default_rng(seed)
        results, record = compare(
            make_model,
            protocol,
            model.gtab,
            signals,
            rng,
            nexi,
            diffusivity,
            search=search,
        )
        shown = methods if search else [m for m in methods if m != SEARCH]
        # The peers target is for non-cylindrical tissue: every
        # family but straight fibres, the geometry ActiveAx, ZCD and NODDI's
        # sticks assume.
        other = np.asarray(truth["family"]) != "fibre"
        medians = [("", None, None)]
        risks = [("all voxels", np.ones(args.n_test, bool), None)]
        if other.any() and not other.all():
            cylinders = ", non-cylindrical voxels only (family not 'fibre')"
            medians.append((cylinders, other, None))
            risks.append(("non-cylindrical voxels", other, None))
        if search:  # the search's voxels alone: the same voxels for all
            searched = np.arange(args.n_test) < search
            medians += [
                (f", the {search} voxels the label search fitted", searched, None),
                (
                    ", of those the voxels where the label search estimates the "
                    "descriptor (it has no cell size, membrane or exchange time "
                    "where it found no cell)",
                    searched,
                    SEARCH,
                ),
            ]
            risks.insert(0, ("the same voxels", searched, SEARCH))
        for name, voxels, common in medians:
            print_table(
                f"{title}{name}: median |error| (median |error| / truth)",
                results,
                truth,
                shown,
                record,
                voxels=voxels,
                common=common,
            )
        for name, voxels, common in risks:
            print_risk_table(
                f"{title}, {name}: mean |error| against the posterior's Bayes "
                f"risk (its expected |error|, {RISK_DRAWS} draws a voxel)",
                results,
                truth,
                shown,
                voxels=voxels,
                common=common,
            )


if __name__ == "__main__":
    main()
