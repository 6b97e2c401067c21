"""Regenerates the tables of doc/validation/protocol_free.md.

Its first part, the shipped protocol-free estimator (``SpinverseModel(gtab,
fit_method="protocol_free", sigma=s)``) on protocols it never saw, through
the public API, against a per-protocol estimator of the same prior
(``fit_method="posterior"``):

- ``union1x20``: the first shell of the held-out union below (a single
  shell of 20 directions, 2 b = 0 volumes: 22 volumes, fewer than the
  design's 30, named);
- ``union8x10``: the held-out union of doc/validation/protocol_free.md
  (``random_union``, index ``held_out`` of the shipped settings: its shells
  and draws were never trained on), its first 8 shells at 10 of their 20
  directions, 2 b = 0 volumes a timing (an echo time each);
- ``union16x20``: all 16 of its shells at 20 directions, 2 b = 0 a timing;
- ``demo``: the README demo's 99 volumes (three timings, one of them, Delta
  6 ms, outside the design and not read by the protocol-free estimator);
- ``demo_long``: the demo without its Delta = 6 ms sequence (66 volumes:
  what the protocol-free estimator reads of it), its reference trained on
  2,400 draws of it;
- ``hcp``: the HCP-style 288 volumes (``hcp_protocol()``: 90 directions a
  shell, read as 20).

References: for the union protocols, the package's per-protocol estimator
(:func:`~dipy_spinverse.posterior.train_estimator`, ``TrainingOptions()``)
trained on the union's first 2,400 draws (the protocol-free estimator saw
400 draws on each of its training unions); for ``demo``, the shipped
per-protocol estimator of the default prior (10,000 draws, its grid error
modelled); for ``hcp``, the package's per-protocol estimator of 10,000
draws without the grid-error model (:data:`HCP_TRAINING`; trained into the
cache on first use, about 40 minutes on one core).

Test: ``--test`` draws of the default prior on each protocol (the union's
last 400; simulated and kept in ``--out`` for ``demo`` and ``hcp``), S0 =
1,000 with Rician noise at b = 0 SNR ``--snr``. Reported per descriptor:
the 90 % intervals' coverage and median width in the flow's coordinates
(log or logit units), and the width ratio, protocol-free / per-protocol.

Run::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python \\
        benchmarks/protocol_free_shipped.py --out protocol_free

(``--union_folder``: where the held-out union's draws are, as
``benchmarks/protocol_free.py --out`` keeps them.) ``--quick``: the demo
protocol alone, 16 draws, no meaning.
"""

import pathlib
import time

import harness
import numpy as np

from dipy_spinverse import Protocol, SpinverseModel
from dipy_spinverse.data import make_phantom_dataset
from dipy_spinverse.io.gradients import read_gradients
from dipy_spinverse.posterior import TissuePrior, TrainingOptions, encode
from dipy_spinverse.posterior import protocol_free as pf
from dipy_spinverse.posterior.simulator import draws_truth
from dipy_spinverse.posterior.training import train_estimator
from dipy_spinverse.sim.sequences import as_protocol, hcp_protocol

S0 = 1000.0
PROTOCOLS = ("union1x20", "union8x10", "union16x20", "demo", "demo_long", "hcp")
#: The HCP-style protocol's per-protocol reference: the default prior's
#: 10,000 draws without the grid-error model (the protocol-free estimator
#: has none either); trained into the cache once (about 40 minutes of
#: simulation on one core).
HCP_TRAINING = TrainingOptions(n_simulations=10_000)
LOGIT = ("restricted_fraction", "anisotropy")


def demo_table(out):
    """The README demo's gradient table, read from its files as the README
    reads it (so that the shipped per-protocol estimator is found)."""
    folder = pathlib.Path(out) / "demo"
    names = ("dwi.bval", "dwi.bvec", "timing.txt")
    if not all((folder / n).exists() for n in names):
        make_phantom_dataset(folder, tissue_voxels=False)
    bval, bvec, timing = (str(folder / n) for n in names)
    return as_protocol(read_gradients(bval, bvec, n_volumes=99, timing_file=timing))


def union_protocol(union, shell, shells, n_directions, n_b0=2):
    """The held-out union's ``shells`` at ``n_directions`` each (every
    other direction of 20 for 10), with ``n_b0`` b = 0 volumes a timing;
    and the union's acquisition of each column (-1 for b = 0)."""
    parts, columns = [], []
    for s in shells:
        rows = np.flatnonzero(shell == s)
        rows = rows[:: len(rows) // n_directions][:n_directions]
        w = union.waveforms[rows[0]]
        parts.append(
            Protocol.pgse(
                np.concatenate([np.zeros(n_b0), union.bvals[rows]]),
                np.vstack([np.zeros((n_b0, 3)), union.bvecs[rows]]),
                small_delta=w.small_delta,
                big_delta=w.big_delta,
            )
        )
        columns += [-1] * n_b0 + list(rows)
    return Protocol.concatenate(*parts), np.array(columns)


def with_b0(signals, columns):
    """Union signals as the columns of a protocol with b = 0 volumes."""
    out = np.ones((len(signals), len(columns)))
    out[:, columns >= 0] = signals[:, columns[columns >= 0]]
    return out


def raw(signals, snr, rng):
    sigma = S0 / snr
    real = S0 * signals + sigma * rng.standard_normal(signals.shape)
    return np.hypot(real, sigma * rng.standard_normal(signals.shape)), sigma


def transformed(name, values):
    values = np.asarray(values, dtype=float)
    if name in LOGIT:
        return np.log(values) - np.log1p(-values)
    return np.log(values)


def scored(fit, truth):
    """Per descriptor: (coverage, median width) of the 90 % intervals over
    the voxels fitted (status OK), and how many were."""
    ok = np.asarray(fit.status) == 0
    out = {}
    for name in pf.FREE_SCALARS:
        lo, hi = fit.credible_interval(name, 0.9)
        t = np.asarray(truth[name], dtype=float)[ok]
        inside = (t >= lo[ok]) & (t <= hi[ok])
        width = transformed(name, hi[ok]) - transformed(name, lo[ok])
        out[name] = (inside.mean(), np.median(width))
    return out, int(ok.sum())


def test_draws(out, name, protocol, n, seed):
    path = pathlib.Path(out) / f"test-{name}-{n}-{seed}.npz"
    simulator = TissuePrior().simulator(protocol)
    if path.exists():
        return np.load(path)["signals"], draws_truth(simulator.draws(n, seed=seed))
    start = time.perf_counter()
    signals, truth = simulator.sample(n, seed=seed)
    print(f"{name}: {n} test draws in {time.perf_counter() - start:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, signals=signals)
    return signals, truth


def held_out_union(folder, settings):
    rng = np.random.default_rng(settings["seed"])
    for _ in range(settings["held_out"] + 1):
        union, shell = pf.random_union(rng, settings["shells"], settings["directions"])
    seed = settings["seed"] + 1 + settings["held_out"]
    files = sorted(
        pathlib.Path(folder).glob(f"union{settings['held_out']}-*-{seed}.npz")
    )
    if not files:
        raise SystemExit(
            f"no held-out union draws in {folder}: run benchmarks/protocol_free.py "
            f"--out {folder} first (it simulates them)."
        )
    signals = np.load(files[-1])["signals"]
    draws = TissuePrior().simulator(union).draws(len(signals), seed=seed)
    return union, shell, signals, draws_truth(draws)


def take(truth, rows):
    return {k: v[rows] for k, v in truth.items()}


def main(argv=None):
    parser = harness.parser(
        __doc__,
        seed=0,
        quick="the demo protocol alone, 16 draws, no meaning",
        out="protocol_free",
    )
    parser.add_argument("--union_folder", default=None)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--snr", type=float, default=50.0)
    parser.add_argument(
        "--protocols",
        nargs="+",
        default=list(PROTOCOLS),
        choices=PROTOCOLS,
        help="the hidden protocols to score (default: all)",
    )
    args = parser.parse_args(argv)
    cases = {}
    demo = demo_table(args.out)
    if args.quick:
        args.test = 16
    else:
        union, shell, signals, truth = held_out_union(
            args.union_folder or args.out, pf.SHIPPED_SETTINGS
        )
        train, test = slice(0, len(signals) - args.test), slice(-args.test, None)
        subsets = (
            ("union1x20", range(1), 20),
            ("union8x10", range(8), 10),
            ("union16x20", range(16), 20),
        )
        for name, shells, k in subsets:
            if name not in args.protocols:
                continue
            protocol, columns = union_protocol(union, shell, shells, k)
            cases[name] = (
                protocol,
                with_b0(signals[test], columns),
                take(truth, test),
                (with_b0(signals[train], columns), take(truth, train)),
            )
    if "demo" in args.protocols:
        signals, truth = test_draws(args.out, "demo", demo, args.test, args.seed + 100)
        cases["demo"] = (demo, signals, truth, "shipped")
    if "demo_long" in args.protocols and not args.quick:
        # The demo without its Delta = 6 ms sequence (outside the design):
        # what both estimators read of it, the reference trained on it.
        long = demo[np.array([w.big_delta >= 0.01 for w in demo.waveforms])]
        n = 6 * args.test + args.test
        signals, truth = test_draws(args.out, "demo_long", long, n, args.seed + 102)
        train, test = slice(0, 6 * args.test), slice(6 * args.test, None)
        cases["demo_long"] = (
            long,
            signals[test],
            take(truth, test),
            (signals[train], take(truth, train)),
        )
    if "hcp" in args.protocols and not args.quick:
        hcp = hcp_protocol()
        signals, truth = test_draws(args.out, "hcp", hcp, args.test, args.seed + 101)
        cases["hcp"] = (hcp, signals, truth, HCP_TRAINING)

    rows, ratios = [], {}
    for name, (protocol, signals, truth, reference) in cases.items():
        rng = np.random.default_rng([args.seed, PROTOCOLS.index(name)])
        data, sigma = raw(signals, args.snr, rng)
        start = time.perf_counter()
        free = SpinverseModel(protocol, fit_method="protocol_free", sigma=sigma)
        scores, n_ok = scored(free.fit(data), truth)
        seconds = time.perf_counter() - start
        rows.append((name, len(protocol), "protocol-free", scores, n_ok, seconds))
        if reference is None:
            continue
        start = time.perf_counter()
        options = reference if isinstance(reference, TrainingOptions) else None
        own = SpinverseModel(
            protocol, fit_method="posterior", sigma=sigma, posterior_options=options
        )
        if isinstance(reference, tuple):
            ref_signals, ref_truth = reference
            own._estimator = train_estimator(
                ref_signals,
                encode(ref_truth, rng=np.random.default_rng(0)),
                protocol,
                TrainingOptions(n_simulations=len(ref_signals)),
                progress=False,
            )
        ref_scores, ref_ok = scored(own.fit(data), truth)
        seconds = time.perf_counter() - start
        rows.append((name, len(protocol), "per-protocol", ref_scores, ref_ok, seconds))
        ratios[name] = [scores[n][1] / ref_scores[n][1] for n in pf.FREE_SCALARS]

    print(f"\nSNR {args.snr:g}, {args.test} test draws a protocol:\n")
    titles = ["protocol", "volumes", "estimator", "voxels", "seconds"]
    titles += [t for n in pf.FREE_SCALARS for t in (f"{n}: coverage", "width")]
    print(harness.head(titles, "-r-rr" + "rr" * len(pf.FREE_SCALARS)))
    for name, volumes, which, scores, n_ok, seconds in rows:
        cells = [f"{v:.2f}" for pair in scores.values() for v in pair]
        print(harness.row([name, volumes, which, n_ok, f"{seconds:.0f}", *cells]))
    print("\nWidth ratio, protocol-free / per-protocol:\n")
    print(
        harness.head(["protocol", *pf.FREE_SCALARS], "-" + "r" * len(pf.FREE_SCALARS))
    )
    for name, ratio in ratios.items():
        print(harness.row([name, *(f"{r:.2f}" for r in ratio)]))


if __name__ == "__main__":
    main()
