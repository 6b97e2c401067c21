"""Regenerates the tables of doc/validation/benchmarks_forward.md.

``--quick``: the published 576-cell grid, Chebyshev in float64, timed once.

Benchmark the forward model: time and memory of ``simulate`` and its gradient.

For the published configuration (``TetGrid.bcc(80 / 3, 4)``, 576 cells, the
540 acquisitions of ``published_protocol()``) and for grids of about 4x,
16x and 64x more cells at the same lattice spacing, this measures the
forward time of ``simulate``, the forward + gradient time
(``simulate(...).sum().backward()`` with respect to the permeabilities,
drawn from ``--seed``), the peak memory of each and the time per cell per
acquisition (flat if the cost is linear). Each configuration runs in a
fresh subprocess (this script with ``--single``), so that its peak memory
can be read from the operating system. The table is printed as markdown
and, with ``--write-doc``, written to
``doc/validation/benchmarks_forward.md`` (its hand-written sections kept)::

    PYTHONPATH=. python benchmarks/forward.py --write-doc
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness
import numpy as np
import torch

import dipy_spinverse
from dipy_spinverse import TetGrid, published_protocol, simulate

# Side of one BCC cube of the published grid, TetGrid.bcc(80 / 3, 4) (um).
# Every benchmark grid keeps it, so only the number of cells changes.
SPACING = 80.0 / 3.0 / 4.0
# Cubes per side. A reflecting BCC grid has 12 n^2 (n - 1) cells: 576, 2160
# (3.8x), 10800 (18.8x) and 37800 (65.6x), the closest to 1x, 4x, 16x, 64x.
GRID_N = (4, 6, 10, 15)
# Every k-th acquisition of the 540 (ordered by sequence, b, direction), so a
# subset keeps all three PGSE timings and all b-values. The two largest grids
# use subsets to keep the full run under 10 minutes on 2 CPU cores; the cost
# per cell per acquisition stays comparable.
STRIDE = {4: 1, 6: 1, 10: 6, 15: 18}
# The dense engine costs O(N^3) per acquisition (about 5 s per acquisition
# for forward + gradient on 576 cells and 2 cores), so it is timed on three:
# the first direction of the b = 5000 shell of each PGSE timing (the protocol
# is ordered by timing, 6 b-values, 30 directions).
DENSE_ACQUISITIONS = [180 * timing + 5 * 30 for timing in range(3)]
LOG10_KAPPA_RANGE = (-5.0, -1.0)  # permeability 10**U(-5, -1) m/s
DOC_PATH = (
    Path(__file__).resolve().parents[1] / "doc" / "validation" / "benchmarks_forward.md"
)

COLUMNS = (
    ("cells", "n_cells", "d"),
    ("acq", "n_acq", "d"),
    ("device", "device", "s"),
    ("method", "method", "s"),
    ("dtype", "dtype", "s"),
    ("fwd (s)", "fwd_s", "sig"),
    ("fwd+grad (s)", "grad_s", "sig"),
    ("peak MB fwd", "fwd_mb", ".0f"),
    ("peak MB fwd+grad", "grad_mb", ".0f"),
    ("fwd us/cell/acq", "fwd_us", "sig"),
    ("fwd+grad us/cell/acq", "grad_us", "sig"),
    ("fwd+grad / eigh(2304)", "grad_eigh", "sig"),
)
# The unit of the last column: one dense float64 eigendecomposition of the
# published grid's discontinuous-Galerkin size (576 tetrahedra x 4 nodes),
# what the published reference pays at every iteration. Timed in the same
# process and threads, it makes the forward's cost comparable across
# machines and loads (forward + gradient on the published grid measured
# 0.47-0.53 of it on 2 cores, 2026-11-28).
EIGH_SIZE = 2304


def main(argv=None):
    """Run the benchmark (or, with ``--single``, one configuration)."""
    args = _parse(argv)
    if args.single is not None:
        print(json.dumps(run_single(json.loads(args.single))))
        return
    sizes = (4,) if args.quick else tuple(args.sizes)
    if args.quick:
        args.repeats = 1
    configs = _configs(sizes, args.threads, args.repeats, args.devices, args.seed)
    if args.quick:  # one configuration, timed once
        configs = configs[:1]
    header = machine_info(args.threads)
    print("\n".join(header), flush=True)
    rows = []
    start = time.perf_counter()
    for config in configs:
        label = (
            f"{config['device']} {config['method']} {config['dtype']} "
            f"n={config['n']} protocol[{_select_text(config['select'])}]"
        )
        print(f"  running {label} ...", end="", flush=True)
        t0 = time.perf_counter()
        row = _run_subprocess(config)
        print(f" {time.perf_counter() - t0:.1f} s", flush=True)
        rows.append(row)
    notes = _notes(rows, args.repeats, time.perf_counter() - start, args.seed)
    document = format_markdown(header, rows, notes, argv)
    print("\n" + document)
    if args.write_doc:
        write_doc(DOC_PATH, document)
        print(f"\nwrote {DOC_PATH}")


def write_doc(path, generated):
    """Write ``generated`` (a document without ``## `` sections) to ``path``,
    keeping the hand-written sections of the file there: everything from
    its first ``## `` heading on (the engine comparison, measured apart)."""
    kept = ""
    if path.is_file():
        old = path.read_text()
        at = old.find("\n## ")
        kept = old[at:] if at >= 0 else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generated + kept)


def _parse(argv):
    parser = harness.parser(
        __doc__,
        seed=0,
        seed_help="the faces' permeabilities (default 0)",
        quick="only the published 576-cell grid",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (default 2)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per mode (median)"
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(GRID_N),
        choices=GRID_N,
        metavar="N",
        help=(
            "cubes per side to run, from 4 (576 cells), 6 (2160), 10 (10800), "
            "15 (37800); default all"
        ),
    )
    parser.add_argument(
        "--write-doc",
        action="store_true",
        help=f"also write the table as markdown to {DOC_PATH.name} in doc/validation/",
    )
    parser.add_argument(
        "--devices",
        nargs="+",
        choices=("cpu", "cuda"),
        default=None,
        help="devices to run (default: cpu, and cuda when present)",
    )
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    return args


def _configs(sizes, threads, repeats, devices, seed):
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    common = {"threads": threads, "repeats": repeats, "seed": seed}
    configs = []
    for device in devices:
        for n in sorted(set(sizes)):
            for dtype in ("float64", "float32"):
                configs.append(
                    dict(
                        common,
                        n=n,
                        select=STRIDE[n],
                        device=device,
                        method="chebyshev",
                        dtype=dtype,
                    )
                )
            if n == 4:
                configs.append(
                    dict(
                        common,
                        n=n,
                        select=DENSE_ACQUISITIONS,
                        device=device,
                        method="dense",
                        dtype="float64",
                    )
                )
    return configs


def _select_text(select):
    return str(select) if isinstance(select, list) else f"::{select}"


def _run_subprocess(config):
    """Run one configuration in a fresh interpreter and return its result row."""
    env = dict(os.environ)
    # The child must import the same copy of the package as this process.
    root = str(Path(dipy_spinverse.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, __file__, "--single", json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        print(f" FAILED: {tail[0]}", end="")
        return dict(config, n_cells=None, n_acq=None, error=tail[0])
    return json.loads(lines[-1])


def run_single(config):
    """Time and measure one configuration in this process.

    Parameters
    ----------
    config : dict
        ``n`` (cubes per side), ``select`` (acquisitions: a stride, or a list
        of indices into ``published_protocol()``), ``device``,
        ``method``, ``dtype`` (name), ``threads``, ``repeats``, ``seed``.

    Returns
    -------
    dict
        The configuration plus grid and protocol sizes, median times (s),
        peak memory (MB) and time per cell per acquisition (us).
    """
    torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    dtype = getattr(torch, config["dtype"])
    n = config["n"]
    grid = TetGrid.bcc(n * SPACING, n)
    select = config["select"]
    protocol = published_protocol()
    protocol = protocol[select] if isinstance(select, list) else protocol[::select]
    rng = np.random.default_rng(config["seed"])
    log_kappa = rng.uniform(*LOG10_KAPPA_RANGE, grid.n_faces)
    kappa = torch.tensor(10.0**log_kappa, dtype=dtype, device=device)
    cuda = device.type == "cuda"
    # On CPU the warm-up only has to trigger lazy initialisation (thread pool,
    # sparse kernels, scipy.special), which one acquisition does at a fraction
    # of the cost; on CUDA the caching allocator and the cuSPARSE workspaces
    # depend on the sizes, so the warm-up repeats the timed call.
    warm = protocol if cuda else protocol[[int(np.argmax(protocol.bvals))]]

    def forward(prot=protocol):
        return simulate(
            grid, kappa, prot, method=config["method"], dtype=dtype, device=device
        )

    def forward_grad(prot=protocol):
        leaf = kappa.clone().requires_grad_(True)
        signal = simulate(
            grid, leaf, prot, method=config["method"], dtype=dtype, device=device
        )
        signal.sum().backward()
        return leaf.grad

    # The baseline excludes the interpreter, torch and the inputs, so the
    # figures are the simulator's own working memory.
    mark = _memory_mark(cuda)
    forward(warm)
    fwd_s = _median_time(forward, config["repeats"], cuda)
    fwd_peak = _memory_peak(cuda, mark)
    # On CPU ru_maxrss never decreases, so the gradient's peak includes the
    # forward's; the backward pass needs at least as much anyway.
    mark = _memory_mark(cuda) if cuda else mark
    forward_grad(warm)
    grad_s = _median_time(forward_grad, config["repeats"], cuda)
    grad_peak = _memory_peak(cuda, mark)
    work = grid.n_cells * len(protocol)
    dense = torch.randn(EIGH_SIZE, EIGH_SIZE, dtype=torch.float64, device=device)
    dense = dense + dense.T
    eigh_s = _median_time(lambda: torch.linalg.eigh(dense), config["repeats"], cuda)
    return dict(
        config,
        n_cells=grid.n_cells,
        n_faces=grid.n_faces,
        n_acq=len(protocol),
        fwd_s=fwd_s,
        grad_s=grad_s,
        fwd_mb=fwd_peak / 2**20,
        grad_mb=grad_peak / 2**20,
        fwd_us=fwd_s / work * 1e6,
        grad_us=grad_s / work * 1e6,
        grad_eigh=grad_s / eigh_s,
    )


def _median_time(func, repeats, cuda):
    """Median wall time of ``repeats`` calls of ``func``."""
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        func()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _memory_mark(cuda):
    """Start a peak-memory measurement; returns the baseline in bytes."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _max_rss()


def _memory_peak(cuda, mark):
    """Peak memory (bytes) above ``mark`` since :func:`_memory_mark`."""
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - mark
    return _max_rss() - mark


def _max_rss():
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def machine_info(threads):
    """Lines describing the machine and software the benchmark ran on."""
    processor = platform.processor() or platform.machine()
    model = _cpu_model()
    if model:
        processor = f"{processor} ({model})" if processor else model
    lines = [
        f"machine: {processor}, {os.cpu_count()} CPUs, {platform.platform()}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}, dipy_spinverse {dipy_spinverse.__version__}",
        f"torch threads: {threads}, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset (active spinning)')}",
    ]
    if torch.cuda.is_available():
        lines.append(f"cuda: {torch.cuda.get_device_name(0)}")
    return lines


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cells(row):
    columns = []
    for _, key, fmt in COLUMNS:
        value = row.get(key)
        if value is None:
            columns.append("failed" if key == "fwd_s" else "-")
        else:
            columns.append(_format(value, fmt))
    return columns


def _format(value, fmt):
    # "sig": three significant digits, trailing zeros kept so that columns
    # line up, without switching to exponents for the slow dense rows.
    if fmt == "sig":
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:#.3g}"
    return format(value, fmt)


def format_markdown(header, rows, notes, argv):
    """The machine description, table and notes as a markdown document."""
    titles = [title for title, _, _ in COLUMNS]
    align = "".join("r" if fmt != "s" else "l" for _, _, fmt in COLUMNS)
    lines = [
        "# Forward-model benchmark",
        "",
        "Generated by `benchmarks/forward.py"
        + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
        + "`.",
        "",
    ]
    lines += [f"- {h}" for h in header]
    lines += ["", harness.table(titles, [_cells(r) for r in rows], align)]
    lines += ["", "Notes:", ""]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _notes(rows, repeats, total, seed):
    notes = [
        f"Grids: TetGrid.bcc(n * {SPACING:.4g}, n), reflecting, fixed cube side "
        f"{SPACING:.4g} um (the published grid is n = 4); permeability "
        f"10**U{LOG10_KAPPA_RANGE} m/s per face, seed {seed}; D = 2e-3 mm^2/s.",
        "Protocol: published_protocol() (540 acquisitions, PGSE (delta, Delta) = "
        "(5, 6), (10, 20), (10, 60) ms, b = 0..5000 s/mm^2, 30 directions), "
        "except where 'acq' is smaller (below).",
    ]
    seen = set()
    for r in rows:
        select = r["select"]
        key = (r["method"], r["n"], str(select))
        if select == 1 or key in seen:
            continue
        seen.add(key)
        if isinstance(select, list):
            notes.append(
                f"{r['method']} rows: only {len(select)} acquisitions, "
                f"published_protocol()[{select}] (the first direction of the "
                "b = 5000 shell of each PGSE timing), because the dense engine "
                "is O(N^3) per acquisition."
            )
        else:
            cells = 12 * r["n"] ** 2 * (r["n"] - 1)
            notes.append(
                f"{cells} cells: only {540 // select} acquisitions, "
                f"published_protocol()[::{select}] (all three timings and all "
                "b-values kept), so that forward + gradient fits the 10-minute "
                "budget of the whole run on 2 cores."
            )
    notes += [
        f"Times: median of {repeats} runs after one untimed warm-up (on CPU "
        "with one high-b acquisition, on CUDA the timed call itself); "
        "fwd+grad is simulate(...).sum().backward() w.r.t. the permeability "
        "tensor (float64/float32 as the row's dtype).",
        "Peak memory: on CPU the growth of the subprocess's max RSS "
        "(ru_maxrss) over its value after imports and building the inputs; the "
        "fwd+grad figure includes the forward's. On CUDA "
        "torch.cuda.max_memory_allocated() over what was allocated before.",
        "us/cell/acq = time / (cells x acquisitions); flat means linear "
        "scaling. It grows with the voxel because the gradient's phase range "
        "across a larger voxel widens the generator's spectrum, so each "
        "gradient pulse needs more Chebyshev products (sub-steps x degree).",
        "Forward memory stays flat because simulate() processes acquisitions "
        "in chunks sized to a fixed memory budget.",
        "The subprocesses inherit OMP_WAIT_POLICY (dipy_spinverse sets PASSIVE "
        "unless it is set): with active spinning, any other busy process or "
        "thread pool on the same cores can make each small torch kernel cost "
        "~20 ms and these times many-fold longer.",
        f"Total benchmark wall time: {total:.0f} s.",
    ]
    failed = [r for r in rows if r.get("error")]
    for r in failed:
        notes.append(
            f"FAILED {r['device']} {r['method']} {r['dtype']} n={r['n']}: {r['error']}"
        )
    return notes


if __name__ == "__main__":
    main()
