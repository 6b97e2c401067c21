"""Regenerates the tables of doc/validation/compartments.md.

``--quick``: a quarter of the voxels of each table (-m slow).

The compartment models' fitting speed and parameter recovery. For each
model, voxels with known parameters are simulated on a fixed protocol,
Rician noise at SNR 50 is added (``--seed``), all are fitted in one
``model.fit`` call on ``--threads`` torch threads and the voxels per second
and median absolute errors of the main parameters are printed as markdown;
``--write-doc`` replaces the block of each section in the page (between its
``<!-- name:start -->`` and ``<!-- name:end -->`` markers). Sections:

    (default)   the main table (``--no-fits`` skips it)
    --learned   fit_method="learned" beside the fitted estimates, polished
                by 0, 1 and 2 iterations (training time, voxels per second,
                errors and their ratio)
    --fibres    fibre count per voxel (fibres="auto") at SNR 30, 0-3 fibres
                crossing at >= 45 degrees, ``--fibre-seed`` voxels pooled;
                2-fibre angle errors at SNR 50 (NODDI; ``--fibre-protocol``
                hcp: 90 directions per shell, multishell: also b = 5000)
    --axon-fibres  the same for ActiveAx (0-3 fibres) and ZCD (1-3) on the
                axon protocol, and their 2-fibre errors at SNR 50
    --amico     AMICO's NODDI (pip package dmri-amico, the ``benchmark``
                extra; skipped when absent) on the same voxels as ours at 1,
                2 and 3 fibres

    PYTHONPATH=. python benchmarks/compartments.py --write-doc
"""

import math
import os
import platform
import re
import time
from pathlib import Path

# Passive OpenMP waiting must be set before torch is imported (see
# dipy_spinverse/__init__.py): spinning threads make every small kernel slow
# when other processes share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import harness  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from dipy.core.gradients import gradient_table  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

import dipy_spinverse  # noqa: E402
from dipy_spinverse.compartments import (  # noqa: E402
    ActiveAxModel,
    ExchangeModel,
    IvimCompartmentModel,
    NoddiModel,
    ZcdModel,
)
from dipy_spinverse.sim.sequences import Protocol, fibonacci_sphere  # noqa: E402

SNR = 50.0
S0 = 100.0
DOC = Path(__file__).resolve().parents[1] / "doc" / "validation" / "compartments.md"


# Protocols
def shells(timings, n_dirs=30, n_b0=3):
    """Per-volume timing: for each (delta, Delta, shells) n_b0 b0s + shells."""
    dirs = fibonacci_sphere(n_dirs)
    bvals, bvecs, small, big = [], [], [], []
    for delta, Delta, bs in timings:
        bvals += [0.0] * n_b0
        bvecs += [[1.0, 0.0, 0.0]] * n_b0
        for b in bs:
            bvals += [float(b)] * n_dirs
            bvecs += list(dirs)
        small += [delta] * (n_b0 + n_dirs * len(bs))
        big += [Delta] * (n_b0 + n_dirs * len(bs))
    return gradient_table(
        np.array(bvals),
        bvecs=np.array(bvecs),
        small_delta=np.array(small),
        big_delta=np.array(big),
    )


def protocols():
    noddi = shells([(0.01, 0.03, (1000, 2000, 3000))])
    axon = shells(
        [(0.008, 0.02, (1000, 2500, 4000)), (0.008, 0.05, (1000, 3000, 6000))]
    )
    bvals, small, big = [], [], []
    for Delta in (0.015, 0.03, 0.06, 0.1):
        for b in (0, 500, 1000, 1500, 2000, 3000):
            bvals += [b] * 3
            small += [0.005] * 3
            big += [Delta] * 3
    exchange = gradient_table(
        np.array(bvals, float),
        bvecs=np.tile(np.eye(3), (len(bvals) // 3, 1)),
        small_delta=np.array(small),
        big_delta=np.array(big),
    )
    b = [0, 10, 20, 30, 40, 60, 80, 100, 120, 140, 160, 180, 200]
    b = np.array(b + [300, 400, 500, 600, 700, 800, 900, 1000], float)
    ivim = gradient_table(b, bvecs=np.tile([1.0, 0, 0], (b.size, 1)), b0_threshold=0)
    return {"noddi": noddi, "axon": axon, "exchange": exchange, "ivim": ivim}


def describe(gtab):
    """Short protocol description: volumes, b-values, timings, max gradient."""
    parts = [f"{len(gtab.bvals)} vol", f"b <= {gtab.bvals.max():.0f}"]
    if gtab.big_delta is not None:
        timings = sorted(
            {
                (round(d * 1e3, 1), round(D * 1e3, 1))
                for d, D in zip(
                    np.broadcast_to(gtab.small_delta, gtab.bvals.shape),
                    np.broadcast_to(gtab.big_delta, gtab.bvals.shape),
                    strict=True,
                )
            }
        )
        parts.append("(d, D) ms " + " ".join(f"({d:g},{D:g})" for d, D in timings))
        g = Protocol.from_gtab(gtab).gradient_strength.max() * 1e3
        parts.append(f"G <= {g:.0f} mT/m")
    return ", ".join(parts)


# Cases: model, true parameters, errors to report
def unit(rng, n):
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def angle_deg(a, b):
    return np.degrees(np.arccos(np.clip(np.abs(np.sum(a * b, -1)), 0, 1)))


def match_fibres(got, true):
    """One-to-one matching of true fibres to fitted ones, per voxel.

    ``got`` (n, F, 3) fitted and ``true`` (n, K, 3) true directions, K <= F.
    Returns the angle (deg) between each true fibre and its fitted one
    (n, K) and that fitted fibre's index (n, K): the assignment of least
    total angle, so that no fitted fibre stands for two true ones (and the
    fibres' other parameters are compared in the same pairs, whatever order
    the weights sort them in). A missing fitted direction (NaN) is 90 degrees
    off every true one.
    """
    angles = angle_deg(got[:, None, :, :], true[:, :, None, :])  # (n, K, F)
    angles = np.where(np.isnan(angles), 90.0, angles)
    index = np.empty(angles.shape[:2], dtype=int)
    for v, cost in enumerate(angles):
        rows, cols = linear_sum_assignment(cost)
        index[v, rows] = cols
    return np.take_along_axis(angles, index[..., None], -1)[..., 0], index


def noddi_case(gtab, n, rng, n_fibres=1):
    """NODDI voxels: weights Dirichlet(5) sorted, ODI 0.05-0.6 (one fibre)
    or 0.05-0.25, NDI 0.3-0.8, fiso 0-0.3; the fibres mutually perpendicular
    (90-degree crossings)."""
    model = NoddiModel(gtab, n_fibres=n_fibres)
    mus = [unit(rng, n)]
    if n_fibres > 1:
        v = np.cross(mus[0], unit(rng, n))
        mus.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    if n_fibres > 2:
        mus.append(np.cross(mus[0], mus[1]))
    w = -np.sort(-rng.dirichlet(np.full(n_fibres, 5.0), n), axis=1)
    odi = rng.uniform(0.05, 0.6 if n_fibres == 1 else 0.25, (n, n_fibres))
    ndi = rng.uniform(0.3, 0.8, (n, n_fibres))
    fiso = rng.uniform(0.0, 0.3, n)
    cols = [np.full(n, S0), fiso]
    for k in range(n_fibres):
        cols += [w[:, k], ndi[:, k], odi[:, k], mus[k]]
    params = np.column_stack(cols)

    def errors(fit):
        fit_odi = fit.odi.reshape(n, n_fibres)
        fit_ndi = fit.ndi.reshape(n, n_fibres)
        dirs = fit.direction.reshape(n, n_fibres, 3)
        # Each true fibre against the fitted fibre matched to it one to one
        # (the two weight orders often differ).
        ang, pick = match_fibres(dirs, np.stack(mus, axis=1))
        errs = {
            "odi": np.abs(np.take_along_axis(fit_odi, pick, 1) - odi),
            "ndi": np.abs(np.take_along_axis(fit_ndi, pick, 1) - ndi),
            "fiso": np.abs(fit.fiso - fiso),
            "angle (deg)": ang.mean(1),
        }
        if n_fibres > 1:
            # The voxel's one NDI, sum_k w_k ndi_k: what AMICO estimates.
            errs["tissue ndi"] = np.abs(fit.tissue_ndi - np.sum(w * ndi, axis=1))
        return errs

    return model, params, errors


def activeax_case(gtab, n, rng):
    model = ActiveAxModel(gtab)
    mu = unit(rng, n)
    diameter = rng.uniform(2.0, 10.0, n)
    fiso = rng.uniform(0.0, 0.2, n)
    icvf = rng.uniform(0.4, 0.8, n)
    fic, fee = (1 - fiso) * icvf, (1 - fiso) * (1 - icvf)
    params = np.column_stack(
        [np.full(n, S0), fic, fee, fiso, np.zeros(n), diameter, mu]
    )

    def errors(fit):
        return {
            "diameter (um)": np.abs(fit.diameter - diameter),
            "fic": np.abs(fit.fic - fic),
            "fiso": np.abs(fit.fiso - fiso),
            "angle (deg)": angle_deg(fit.direction, mu),
        }

    return model, params, errors


def zcd_case(gtab, n, rng):
    model = ZcdModel(gtab)
    mu = unit(rng, n)
    diameter = rng.uniform(2.0, 10.0, n)
    fic = rng.uniform(0.4, 0.7, n)
    fdot = rng.uniform(0.0, 0.1, n)
    d_par = rng.uniform(1.2e-3, 2.2e-3, n)
    d_perp = d_par * rng.uniform(0.2, 0.6, n)
    params = np.column_stack(
        [np.full(n, S0), fic, 1 - fic - fdot, fdot, diameter, d_par, d_perp, mu]
    )

    def errors(fit):
        return {
            "diameter (um)": np.abs(fit.diameter - diameter),
            "fic": np.abs(fit.fic - fic),
            "fdot": np.abs(fit.fdot - fdot),
            "d_par (um2/ms)": np.abs(fit.d_par - d_par) * 1e3,
            "d_perp (um2/ms)": np.abs(fit.d_perp - d_perp) * 1e3,
            "angle (deg)": angle_deg(fit.direction, mu),
        }

    return model, params, errors


def ivim_case(gtab, n, rng):
    model = IvimCompartmentModel(gtab)
    f = rng.uniform(0.05, 0.2, n)
    d_star = rng.uniform(0.01, 0.05, n)
    D = rng.uniform(0.5e-3, 1.5e-3, n)
    params = np.column_stack([np.full(n, S0), f, d_star, D])

    def errors(fit):
        return {
            "f": np.abs(fit.perfusion_fraction - f),
            "D* (um2/ms)": np.abs(fit.D_star - d_star) * 1e3,
            "D (um2/ms)": np.abs(fit.D - D) * 1e3,
        }

    return model, params, errors


def exchange_case(gtab, n, rng):
    model = ExchangeModel(gtab)
    f = rng.uniform(0.4, 0.7, n)
    d_extra = rng.uniform(1.5e-3, 2.5e-3, n)
    d_intra = d_extra * rng.uniform(0.1, 0.4, n)
    tau = 10 ** rng.uniform(np.log10(0.02), np.log10(0.2), n)
    params = np.column_stack([np.full(n, S0), f, d_intra, d_extra, tau])

    def errors(fit):
        return {
            "f_intra": np.abs(fit.f_intra - f),
            "d_intra (um2/ms)": np.abs(fit.d_intra - d_intra) * 1e3,
            "d_extra (um2/ms)": np.abs(fit.d_extra - d_extra) * 1e3,
            "exchange_time (rel.)": np.abs(fit.exchange_time / tau - 1),
        }

    return model, params, errors


def cases(quick):
    scale = 0.25 if quick else 1.0
    return [
        ("NoddiModel", "noddi", lambda g, n, r: noddi_case(g, n, r), 1000),
        (
            "NoddiModel(n_fibres=2)",
            "noddi",
            lambda g, n, r: noddi_case(g, n, r, 2),
            100,
        ),
        ("NoddiModel(n_fibres=3)", "noddi", lambda g, n, r: noddi_case(g, n, r, 3), 40),
        ("ActiveAxModel", "axon", activeax_case, 1000),
        ("ZcdModel", "axon", zcd_case, 500),
        ("IvimCompartmentModel", "ivim", ivim_case, 10000),
        ("ExchangeModel", "exchange", exchange_case, 300),
    ], scale


# Run
def simulate(model, params):
    """Noiseless signals of the true parameters. NODDI's are computed with
    the exact Watson kernels: the table the fit uses by default is its
    approximation, not the truth."""
    if isinstance(model, NoddiModel) and model.kernels != "exact":
        model = NoddiModel(
            model.gtab, n_fibres=model.n_fibres, fibres=model.fibres, kernels="exact"
        )
    return model._fit_class(model, params).predict()


def rician(signal, rng):
    sigma = S0 / SNR
    noise = rng.normal(0, sigma, signal.shape) + 1j * rng.normal(0, sigma, signal.shape)
    return np.abs(signal + noise)


def noisy_cases(quick, seed):
    """Per case of :func:`cases`: its name, protocol, voxels, model, noisy
    signals (from ``seed``) and error function."""
    gtabs = protocols()
    specs, scale = cases(quick)
    for name, proto, make, n in specs:
        n = max(8, int(n * scale))
        rng = np.random.default_rng(seed)
        model, params, errors = make(gtabs[proto], n, rng)
        yield name, proto, n, model, rician(simulate(model, params), rng), errors


def run(quick, seed):
    rows = []
    for name, proto, n, model, data, errors in noisy_cases(quick, seed):
        start_cpu, start = time.process_time(), time.perf_counter()
        fit = model.fit(data)
        wall = time.perf_counter() - start
        cpu = time.process_time() - start_cpu
        medians = {k: float(np.median(v)) for k, v in errors(fit).items()}
        rows.append((name, proto, n, wall, cpu, medians))
        print(f"{name}: {n} voxels in {wall:.2f} s ({n / wall:.1f} vox/s)", flush=True)
    return protocols(), rows


def table(gtabs, rows):
    titles = ["model", "protocol", "voxels", "wall (s)", "voxels/s", "CPU s/voxel"]
    lines = [harness.head([*titles, "median abs. error (SNR 50)"], "llrrrrl")]
    for name, proto, n, wall, cpu, medians in rows:
        errs = ", ".join(f"{k} {v:.3g}" for k, v in medians.items())
        cells = [name, proto, n, f"{wall:.2f}", f"{n / wall:.1f}", f"{cpu / n:.3g}"]
        lines.append(harness.row([*cells, errs]))
    lines.append("")
    lines.append("Protocols:")
    lines.append("")
    for key, gtab in gtabs.items():
        lines.append(f"- {key}: {describe(gtab)}")
    return "\n".join(lines)


def main_noise(seed, calls="one model.fit call per row"):
    """The header's noise line of the blocks drawn at SNR 50 from ``seed``."""
    return (
        f"Rician noise at SNR {SNR:g} (sigma = S0 / {SNR:g}), seed {seed}; "
        f"default model options; {calls}"
    )


#: The header's noise line of the blocks whose tables state their own.
OWN_NOISE = "noise level, seeds and voxels: as each table below states"


def header(threads, noise=OWN_NOISE):
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.platform()}\n"
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}, dipy_spinverse {dipy_spinverse.__version__}\n"
        f"- torch threads: {threads}, float64, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"1-min load average at the end: {load:.1f}\n"
        f"- {noise}"
    )


# Learned estimators beside the fitted ones
# Voxels per second of a learned estimator are measured on at least this many
# voxels (the case's voxels repeated): one network pass has a fixed cost.
LEARNED_SPEED_VOXELS = 20000
# Training budget of the benchmark's networks: the defaults (100,000 voxels
# x 30 epochs, a new noise draw every batch), a few minutes per network on 2
# cores; the smaller budget of the first version (50,000 x 10) cost 2x in
# diameter errors.
LEARNED_OPTIONS = {"n_train": 100_000, "epochs": 30}
#: The --learned rows: the network alone, then polished by 1 and 2
#: Levenberg-Marquardt iterations.
POLISHES = (0, 1, 2)


def ratio(a, b):
    return f"{a / b:.2f}x" if b > 0 else "-"


def learned_twin(model, cache, polish=0):
    """The same model with fit_method="learned" at the benchmark's SNR, its
    estimates polished by ``polish`` Levenberg-Marquardt iterations (the
    same network for every ``polish``: it is not in the cache key)."""
    kwargs = {"n_fibres": model.n_fibres} if isinstance(model, NoddiModel) else {}
    return type(model)(
        model.gtab,
        fit_method="learned",
        snr=SNR,
        learned_options={**LEARNED_OPTIONS, "polish": polish},
        cache_dir=cache,
        **kwargs,
    )


def run_learned(quick, cache, seed):
    rows = []
    for name, _, n, model, data, errors in noisy_cases(quick, seed):
        fitted = {k: float(np.median(v)) for k, v in errors(model.fit(data)).items()}
        reps = max(1, -(-LEARNED_SPEED_VOXELS // n))
        big = np.tile(data, (reps, 1))
        for polish in POLISHES:
            learned = learned_twin(model, cache, polish)
            start = time.perf_counter()
            learned.regressor  # noqa: B018 (trains, or loads from the cache)
            train = time.perf_counter() - start
            # Best of three (the first call also builds lookup tables): a
            # shared machine's load spikes only slow calls down. The CPU
            # time of the process (all its threads) is kept beside the wall
            # time: on a loaded machine it is the steadier measure.
            wall = cpu = math.inf
            for _ in range(3):
                start_cpu, start = time.process_time(), time.perf_counter()
                learned.fit(big)
                wall = min(wall, time.perf_counter() - start)
                cpu = min(cpu, time.process_time() - start_cpu)
            got = {k: float(np.median(v)) for k, v in errors(learned.fit(data)).items()}
            label = f"{name}, polish {polish}" if polish else name
            speeds = (big.shape[0] / wall, big.shape[0] / cpu)
            rows.append((label, speeds, train, fitted, got))
            print(
                f"{label}: learned {speeds[0]:.0f} vox/s, "
                f"{speeds[1]:.0f} vox per CPU-s",
                flush=True,
            )
    titles = ["model", "learned voxels/s", "voxels per CPU-s"]
    titles += ["training or loading (s)", "median abs. error: learned / fitted (ratio)"]
    lines = [harness.head(titles, "lrrrl")]
    for name, (speed, per_cpu), train, fitted, got in rows:
        errs = ", ".join(
            f"{k} {got[k]:.3g} / {fitted[k]:.3g} ({ratio(got[k], fitted[k])})"
            for k in fitted
        )
        lines.append(
            harness.row([name, f"{speed:.0f}", f"{per_cpu:.0f}", f"{train:.1f}", errs])
        )
    return "\n".join(lines)


# Fibre count per voxel
MIN_CROSSING_DEG = 45.0


def separated_directions(rng, n, k, min_angle=MIN_CROSSING_DEG):
    """(n, k, 3) unit vectors, pairwise at least ``min_angle`` degrees apart
    (uniform directions, rejected until they are)."""
    cos_max = np.cos(np.radians(min_angle))
    out = np.zeros((n, k, 3))
    for i in range(n):
        chosen = []
        while len(chosen) < k:
            v = unit(rng, 1)[0]
            if all(abs(v @ u) <= cos_max for u in chosen):
                chosen.append(v)
        out[i] = chosen
    return out


def crossing_voxels(gtab, counts, rng, snr):
    """Noisy NODDI voxels with the given fibre counts (0-3): free water for
    0; else weights Dirichlet(5) sorted, ODI 0.05-0.25, NDI 0.3-0.8, fiso
    0-0.3, directions >= 45 degrees apart. Returns data, params, dirs."""
    model = NoddiModel(gtab, fibres="auto", kernels="exact")
    n = len(counts)
    dirs = separated_directions(rng, n, 3)
    params = np.full((n, 20), np.nan)
    params[:, 0] = S0
    for i, k in enumerate(counts):
        params[i, 1] = 1.0 if k == 0 else rng.uniform(0.0, 0.3)
        w = -np.sort(-rng.dirichlet(np.full(k, 5.0))) if k else []
        for j in range(k):
            block = [w[j], rng.uniform(0.3, 0.8), rng.uniform(0.05, 0.25)]
            params[i, 2 + 6 * j : 8 + 6 * j] = block + list(dirs[i, j])
    clean = model._fit_class(model, params).predict()
    sigma = S0 / snr
    noise = rng.normal(0, sigma, (2,) + clean.shape)
    return np.abs(clean + noise[0] + 1j * noise[1]), params, dirs


def hcp_like():
    """A denser protocol: 90 directions on each of b = 1000, 2000, 3000 and
    6 b = 0 (the HCP young-adult scheme's sampling, not its timing)."""
    return shells([(0.0106, 0.0431, (1000, 2000, 3000))], n_dirs=90, n_b0=6)


def fibre_protocol(name):
    """The --fibres protocols: "noddi" (30 directions per shell), "hcp" (90)
    and "multishell" (90 directions on b = 1000, 2000, 3000 and 5000, 366
    volumes: how the count grows with the data; not used in tuning)."""
    if name == "noddi":
        return protocols()["noddi"]
    if name == "hcp":
        return hcp_like()
    return shells([(0.0106, 0.0431, (1000, 2000, 3000, 5000))], n_dirs=90, n_b0=6)


def count_table(label, gtab, counts, found, wall, seed):
    """Markdown lines: overall accuracy and the confusion matrix (rows: true
    count, columns: count found, last column: correct per true count) of
    the voxels of ``seed`` (one, or several pooled)."""
    seeds = np.atleast_1d(seed)
    confusion = np.zeros((4, 4), dtype=int)
    np.add.at(confusion, (counts, found), 1)
    per = len(counts) // len(np.unique(counts))
    lines = [
        f"{label}, {describe(gtab)}, SNR 30, "
        f"{'seeds' if seeds.size > 1 else 'seed'} {', '.join(map(str, seeds))}, "
        f"{len(counts)} voxels "
        f"({per} per count), crossings >= {MIN_CROSSING_DEG:g} degrees: "
        f"**{np.mean(found == counts):.1%} correct** ({len(counts) / wall:.2f} "
        "voxels/s). Rows: true count, columns: count found.",
        "",
        harness.head(["true \\ found", 0, 1, 2, 3, "correct"], "rrrrrr"),
    ]
    for k in np.unique(counts):
        correct = f"{confusion[k, k] / confusion[k].sum():.0%}"
        lines.append(harness.row([k, *confusion[k], correct]))
    return lines


def pooled_counts(label, gtab, make_model, draw, counts, seeds):
    """Count table of ``fibres="auto"`` over the voxels of several seeds
    pooled (markdown lines): one model and one fit per seed, as a run of
    that seed alone (its own CSD response). ``draw(model, counts, rng)``
    returns the seed's signals."""
    found, wall, correct = [], 0.0, []
    for seed in seeds:
        model = make_model()
        data = draw(model, counts, np.random.default_rng(seed))
        start = time.perf_counter()
        fit = model.fit(data)
        wall += time.perf_counter() - start
        found.append(fit.n_fibres)
        correct.append(f"{np.mean(fit.n_fibres == counts):.1%}")
    truth = np.tile(counts, len(seeds))
    lines = count_table(label, gtab, truth, np.concatenate(found), wall, seeds)
    if len(seeds) > 1:
        seed_text = ", ".join(map(str, seeds))
        lines += ["", f"Per seed ({seed_text}): {', '.join(correct)} correct."]
    return lines


def run_fibres(quick, protocol, seeds, seed):
    gtab = fibre_protocol(protocol)
    n = 40 if quick else 200
    lines = pooled_counts(
        f"NoddiModel(fibres='auto'), protocol {protocol}",
        gtab,
        lambda: NoddiModel(gtab, fibres="auto"),
        lambda _, counts, rng: crossing_voxels(gtab, counts, rng, 30.0)[0],
        np.repeat(np.arange(4), n // 4),
        seeds,
    )
    if protocol != "noddi":
        return "\n".join(lines)
    # Two fibres at SNR 50, crossings 45-90 degrees: fixed n_fibres=2 and
    # the count map. Their own seed, --seed + 1 (not --fibre-seed, which is
    # the count rule's): the CSD response needs a voxel of FA > 0.7 among
    # these crossings, which seed 1 has.
    m = 20 if quick else 100
    rng = np.random.default_rng(seed + 1)
    two = np.full(m, 2)
    data, params, dirs = crossing_voxels(gtab, two, rng, SNR)
    crossing = angle_deg(dirs[:, 0], dirs[:, 1])
    lines += [
        "",
        "Two fibres at SNR 50, crossings 45-90 degrees "
        f"(median {np.median(crossing):.0f}), {m} voxels:",
        "",
        harness.head(
            ["fit", "median angle error (deg)", "90th percentile", "voxels/s"], "lrrr"
        ),
    ]
    for label, mdl, kwargs in (
        ("NoddiModel(n_fibres=2)", NoddiModel(gtab, n_fibres=2), {}),
        (
            "NoddiModel(fibres='auto'), count map",
            NoddiModel(gtab, fibres="auto"),
            {"fibres": two},
        ),
    ):
        start = time.perf_counter()
        fit = mdl.fit(data, **kwargs)
        wall = time.perf_counter() - start
        got = fit.direction.reshape(m, -1, 3)[:, :2]
        err = match_fibres(got, dirs[:, :2])[0].mean(1)
        cells = [label, f"{np.median(err):.2f}", f"{np.percentile(err, 90):.2f}"]
        lines.append(harness.row([*cells, f"{m / wall:.1f}"]))
    return "\n".join(lines)


def axon_crossing_voxels(model, counts, rng, snr):
    """Noisy ActiveAx or ZCD voxels in ``model``'s per-fibre layout: weights
    Dirichlet(5) sorted, diameters 2-10 um, intra-axonal fraction of each
    population 0.4-0.8, directions >= 45 degrees apart; ActiveAx: fiso
    0-0.2 (1 without fibres); ZCD: fdot 0-0.1, d_par 1.5-2.2e-3 mm^2/s,
    d_perp / d_par 0.2-0.6. Returns data, params, dirs."""
    zcd = isinstance(model, ZcdModel)
    head, width = (2, 8) if zcd else (3, 6)
    n = len(counts)
    dirs = separated_directions(rng, n, 3)
    params = np.full((n, len(model.param_names)), np.nan)
    params[:, 0] = S0
    for i, k in enumerate(counts):
        free = (
            rng.uniform(0.0, 0.1) if zcd else (1.0 if k == 0 else rng.uniform(0, 0.2))
        )
        params[i, 1] = free
        if not zcd:
            params[i, 2] = 0.0
        w = -np.sort(-rng.dirichlet(np.full(k, 5.0))) * (1 - free) if k else []
        for j in range(k):
            icvf = rng.uniform(0.4, 0.8)
            block = [w[j] * icvf, w[j] * (1 - icvf), rng.uniform(2.0, 10.0)]
            if zcd:
                d_par = rng.uniform(1.5e-3, 2.2e-3)
                block += [d_par, d_par * rng.uniform(0.2, 0.6)]
            params[i, head + width * j : head + width * (j + 1)] = block + list(
                dirs[i, j]
            )
    clean = model._fit_class(model, params).predict()
    noise = rng.normal(0, S0 / snr, (2,) + clean.shape)
    return np.abs(clean + noise[0] + 1j * noise[1]), params, dirs


def matched_fibre_errors(fit, params, dirs, head, width, n_fibres=2):
    """Per voxel: mean angle error (each true fibre against the fitted one
    matched to it one to one) and the mean diameter and fic errors of those
    fitted fibres."""
    got = fit.directions.reshape(len(params), -1, 3)
    ang, pick = match_fibres(got, dirs[:, :n_fibres])
    diam = np.take_along_axis(fit.diameter.reshape(len(params), -1), pick, 1)
    fic = np.take_along_axis(fit.fic.reshape(len(params), -1), pick, 1)
    true = params[:, head : head + width * n_fibres].reshape(len(params), n_fibres, -1)
    d_err = np.abs(diam - true[..., 2]).mean(1)
    f_err = np.abs(fic - true[..., 0]).mean(1)
    return ang.mean(1), d_err, f_err


def run_axon_fibres(quick, seeds=(1,)):
    gtab = protocols()["axon"]
    lines = []
    n = 12 if quick else 25
    for cls, first in ((ActiveAxModel, 0), (ZcdModel, 1)):
        lines += pooled_counts(
            f"{cls.__name__}(fibres='auto')",
            gtab,
            lambda cls=cls: cls(gtab, fibres="auto"),
            lambda model, counts, rng: axon_crossing_voxels(model, counts, rng, 30.0)[
                0
            ],
            np.repeat(np.arange(first, 4), n),
            seeds,
        ) + [""]
    seed = seeds[0]
    m = 10 if quick else 50
    lines += [
        f"Two fibres at SNR 50, crossings >= {MIN_CROSSING_DEG:g} degrees, {m} "
        "voxels, count map (fibres=2):",
        "",
        harness.head(
            ["fit", "median angle error (deg)", "90th percentile"]
            + ["median diameter error (um)", "median fic error", "voxels/s"],
            "lrrrrr",
        ),
    ]
    for cls, head, width in ((ActiveAxModel, 3, 6), (ZcdModel, 2, 8)):
        model = cls(gtab, fibres="auto")
        rng = np.random.default_rng(seed + 1)
        two = np.full(m, 2)
        data, params, dirs = axon_crossing_voxels(model, two, rng, SNR)
        start = time.perf_counter()
        fit = model.fit(data, fibres=two)
        wall = time.perf_counter() - start
        ang, d_err, f_err = matched_fibre_errors(fit, params, dirs, head, width)
        cells = [f"{cls.__name__}(fibres='auto'), count map", f"{np.median(ang):.2f}"]
        cells += [f"{np.percentile(ang, 90):.2f}", f"{np.median(d_err):.2f}"]
        lines.append(
            harness.row([*cells, f"{np.median(f_err):.3f}", f"{m / wall:.1f}"])
        )
    return "\n".join(lines)


# AMICO's NODDI on the same voxels
class _Maps:
    """Attribute view of AMICO's maps for the cases' error functions."""

    def __init__(self, ndi, odi, fiso, direction, n_fibres):
        self.ndi = np.repeat(ndi[:, None], n_fibres, 1)
        self.tissue_ndi = ndi
        self.odi = np.repeat(odi[:, None], n_fibres, 1)
        self.fiso = fiso
        # One direction, repeated: each population is compared with it.
        self.direction = np.repeat(direction[:, None], n_fibres, 1)


def amico_noddi(gtab, data, workdir, threads, repeats=1):
    """AMICO's NODDI on voxels (V, N): maps, fit seconds (directions
    included, kernels and file I/O not; the best of ``repeats`` fits),
    kernel seconds. Fit seconds are (wall, CPU): AMICO's threads count in
    the process's CPU time, which a loaded machine distorts less."""
    import amico
    import nibabel as nib

    V = data.shape[0]
    d = Path(workdir)
    nib.save(
        nib.Nifti1Image(data.reshape(V, 1, 1, -1).astype(np.float32), np.eye(4)),
        d / "dwi.nii.gz",
    )
    nib.save(
        nib.Nifti1Image(np.ones((V, 1, 1), np.uint8), np.eye(4)), d / "mask.nii.gz"
    )
    np.savetxt(d / "bvals", gtab.bvals[None])
    np.savetxt(d / "bvecs", gtab.bvecs.T)
    amico.util.fsl2scheme(str(d / "bvals"), str(d / "bvecs"), str(d / "dwi.scheme"))
    amico.setup()
    amico.set_verbose(1)
    ae = amico.Evaluation(study_path=str(d), subject=".", output_path=str(d / "out"))
    ae.set_config("nthreads", threads)
    ae.set_config("BLAS_nthreads", 1)
    ae.load_data(
        str(d / "dwi.nii.gz"),
        str(d / "dwi.scheme"),
        mask_filename=str(d / "mask.nii.gz"),
        b0_thr=0,
    )
    ae.set_model("NODDI")
    start = time.perf_counter()
    ae.generate_kernels(regenerate=True)
    ae.load_kernels()
    kernels = time.perf_counter() - start
    wall = cpu = math.inf
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        ae.fit()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    names = list(ae.model.maps_name)
    maps = ae.RESULTS["MAPs"].reshape(V, -1)
    out = {name: maps[:, names.index(name)].astype(np.float64) for name in names}
    out["direction"] = ae.RESULTS["DIRs"].reshape(V, 3).astype(np.float64)
    return out, (wall, cpu), kernels


AMICO_REPEATS = 2
# One-fibre voxels of further seeds for the pooled error comparison with
# AMICO: the median of 1000 absolute errors moves by ~3 % between seeds, as
# much as the NDI errors of the two methods differ.
AMICO_POOLED_SEEDS = (0, 1, 2, 3)


#: Voxels per seed of the pooled comparison, per fibre count (the crossing
#: fits are slower; the tissue NDI needs the pooled sample to compare).
AMICO_POOLED_VOXELS = {1: 1000, 2: 250, 3: 100}


def amico_pooled(gtab, threads, quick, n_fibres=1):
    """Median absolute errors, ours / AMICO, ``n_fibres`` fibres, pooled
    over ``AMICO_POOLED_SEEDS`` (``AMICO_POOLED_VOXELS`` each), with a
    paired bootstrap of the probability that our median is the lower one."""
    import tempfile

    n = AMICO_POOLED_VOXELS[n_fibres] // (4 if quick else 1)
    ours, theirs = {}, {}
    for seed in AMICO_POOLED_SEEDS:
        rng = np.random.default_rng(seed)
        model, params, errors = noddi_case(gtab, n, rng, n_fibres)
        data = rician(simulate(model, params), rng)
        fit = NoddiModel(gtab, n_fibres=n_fibres).fit(data)
        for key, value in errors(fit).items():
            ours.setdefault(key, []).append(value.ravel())
        with tempfile.TemporaryDirectory() as tmp:
            maps, _, _ = amico_noddi(gtab, data, tmp, threads)
        found = _Maps(
            maps["NDI"], maps["ODI"], maps["FWF"], maps["direction"], n_fibres
        )
        for key, value in errors(found).items():
            theirs.setdefault(key, []).append(value.ravel())
    boot = np.random.default_rng(0)
    parts = []
    for key in ours:
        a, b = np.concatenate(ours[key]), np.concatenate(theirs[key])
        idx = boot.integers(0, a.size, (1000, a.size))
        lower = np.mean(np.median(a[idx], 1) < np.median(b[idx], 1))
        parts.append(
            f"{key} {np.median(a):.4g} / {np.median(b):.4g} (ours lower in "
            f"{lower:.0%} of bootstrap resamples)"
        )
    seeds = ", ".join(str(s) for s in AMICO_POOLED_SEEDS)
    count = "One fibre" if n_fibres == 1 else f"{n_fibres} fibres"
    return (
        f"{count}, seeds {seeds} pooled ({len(AMICO_POOLED_SEEDS) * n} voxels), "
        "median abs. error ours / AMICO: " + "; ".join(parts) + "."
    )


def run_amico(quick, threads, seed):
    try:
        import amico  # noqa: F401
    except ImportError:
        return None  # skipped: the stored block stays as it is
    import tempfile

    gtab = protocols()["noddi"]
    titles = ["fibres", "voxels", "ours: voxels/s", "AMICO: voxels/s"]
    titles += ["ours: voxels per CPU s", "AMICO: voxels per CPU s"]
    titles += ["median abs. error: ours / AMICO"]
    lines = [harness.head(titles, "rrrrrrl")]
    kernel_times = []
    for k, n in ((1, 10000), (2, 100), (3, 40)):
        n = max(8, int(n * (0.25 if quick else 1.0)))
        rng = np.random.default_rng(seed)
        model, params, errors = noddi_case(gtab, n, rng, k)
        data = rician(simulate(model, params), rng)
        # Best of AMICO_REPEATS for both, each of ours with a new model (the
        # first builds the process's Watson table, the next reuse it, as
        # AMICO reuses its kernels), so that a load spike on the shared
        # machine penalises neither.
        wall = cpu = math.inf
        for _ in range(AMICO_REPEATS):
            model = NoddiModel(gtab, n_fibres=k)
            start, start_cpu = time.perf_counter(), time.process_time()
            ours = errors(model.fit(data))
            wall = min(wall, time.perf_counter() - start)
            cpu = min(cpu, time.process_time() - start_cpu)
        with tempfile.TemporaryDirectory() as tmp:
            maps, (amico_wall, amico_cpu), kernels = amico_noddi(
                gtab, data, tmp, threads, repeats=AMICO_REPEATS
            )
        kernel_times.append(kernels)
        theirs = errors(
            _Maps(maps["NDI"], maps["ODI"], maps["FWF"], maps["direction"], k)
        )
        errs = ", ".join(
            f"{key} {np.median(ours[key]):.3g} / {np.median(theirs[key]):.3g}"
            for key in ours
        )
        speeds = [n / wall, n / amico_wall, n / cpu, n / amico_cpu]
        lines.append(harness.row([k, n, *(f"{v:.1f}" for v in speeds), errs]))
        print(lines[-1], flush=True)
    lines += [
        "",
        f"AMICO {amico.__version__ if hasattr(amico, '__version__') else ''}: "
        f"NODDI kernels generated in {np.mean(kernel_times):.1f} s per run (not "
        "in its voxels/s; our Watson table is built in the first of our timed "
        "calls and reused by the next, as AMICO reuses its kernels). Best of "
        f"{AMICO_REPEATS} calls each. "
        "AMICO fits one direction per voxel (from DTI), so at 2 and 3 fibres "
        "its ODI and NDI are compared with every population's and its angle "
        "error is the mean over populations of the angle to its one direction; "
        "'tissue ndi' compares its NDI and our fits' sum_k w_k ndi_k "
        "(`NoddiFit.tissue_ndi`) with the voxel's.",
    ]
    for k in (1, 2, 3):
        lines += ["", amico_pooled(gtab, threads, quick, k)]
        print(lines[-1], flush=True)
    return "\n".join(lines)


def write_block(name, text):
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    doc = DOC.read_text()
    pattern = re.escape(start) + ".*?" + re.escape(end)
    if not re.search(pattern, doc, flags=re.S):
        raise SystemExit(f"{DOC}: no {start} ... {end} block")
    DOC.write_text(
        re.sub(pattern, lambda _: f"{start}\n{text}\n{end}", doc, flags=re.S)
    )
    print(f"\nwrote the {name} block of {DOC}")


def main(argv=None):
    parser = harness.parser(
        __doc__,
        seed=0,
        seed_help="the voxels' seed (main, learned, AMICO)",
        quick="fewer voxels (a quarter of most tables, 40 of 200 for --fibres)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--write-doc", action="store_true", help=f"update {DOC.name} in doc/validation/"
    )
    parser.add_argument(
        "--no-fits", action="store_true", help="skip the main table of fits"
    )
    parser.add_argument("--learned", action="store_true", help="learned estimators")
    parser.add_argument("--fibres", action="store_true", help="fibre counts")
    parser.add_argument(
        "--fibre-protocol",
        choices=("noddi", "hcp", "multishell"),
        default="noddi",
        help="protocol of --fibres (hcp: 90 directions per shell; multishell: "
        "also b = 5000)",
    )
    parser.add_argument(
        "--fibre-seed",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        help="seeds of the --fibres and --axon-fibres counts, pooled (the count "
        "rule was tuned on 0); --axon-fibres' 2-fibre table uses the first",
    )
    parser.add_argument(
        "--axon-fibres", action="store_true", help="ActiveAx and ZCD fibre counts"
    )
    parser.add_argument("--amico", action="store_true", help="AMICO's NODDI")
    parser.add_argument(
        "--cache", default=None, help="cache folder of the learned estimators"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = []

    def add(name, text, noise=OWN_NOISE):
        # The header after the run: its load average is the run's.
        sections.append((name, header(args.threads, noise) + "\n\n" + text))

    if not args.no_fits:
        add("benchmark", table(*run(args.quick, args.seed)), main_noise(args.seed))
    if args.learned:
        calls = "speeds: the best of 3 calls on the voxels repeated"
        text = run_learned(args.quick, args.cache, args.seed)
        add("learned", text, main_noise(args.seed, calls))
    if args.fibres:
        # Doc blocks: "fibres" for the NODDI protocol, "fibres-hcp" for hcp, ...
        protocol = args.fibre_protocol
        text = run_fibres(args.quick, protocol, args.fibre_seed, args.seed)
        add("fibres" + ("" if protocol == "noddi" else f"-{protocol}"), text)
    if args.axon_fibres:
        add("axon-fibres", run_axon_fibres(args.quick, args.fibre_seed))
    if args.amico:
        text = run_amico(args.quick, args.threads, args.seed)
        if text is None:
            print("AMICO (dmri-amico) is not installed: `pip install .[benchmark]`.")
        else:
            add("amico", text)
    for name, text in sections:
        print()
        print(text)
        if args.write_doc:
            write_block(name, text)


if __name__ == "__main__":
    main()
