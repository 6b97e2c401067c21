"""Regenerates the tables of doc/validation/inversion_results.md.

``--quick``: 2 voxels, 3 steps; still about ten minutes on 2 shared cores: the
search's fixed cost, its screen of the generic shapes on the 540-volume
protocol, stays (-m slow).

Throughput of the label search: voxels one at a time versus all together.

The label search of every voxel is a generator of score requests;
``search_labels`` drives all voxels together and scores their pending
requests in shared simulator calls. This script times the search alone (the
face fit is skipped: starts from the published shapes' regions are the
generic shapes) on ``--voxels`` noisy voxels of the published grid, run one
voxel per call and all voxels in one call, and prints a table. The
process's cache of simulated signals (``SIGNAL_CACHE``) is emptied before
each of the two runs, so that neither reuses the other's simulations; within
a run it is kept, as in a volume fit (the generic shapes every voxel screens
are simulated once).

    python benchmarks/label_search.py --voxels 8 --device cpu
"""

import argparse
import platform
import time

import numpy as np
import torch

from dipy_spinverse import TetGrid, published_protocol, simulate
from dipy_spinverse.geometry.phantoms import published_phantoms
from dipy_spinverse.inverse import resolve_config
from dipy_spinverse.inverse.cache import SIGNAL_CACHE
from dipy_spinverse.inverse.search import search_labels
from dipy_spinverse.sim.signals import normalise_b0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--voxels", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=100, help="search_steps")
    parser.add_argument(
        "--quick", action="store_true", help="2 voxels, 3 steps (a smoke test)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.voxels, args.steps = 2, 3

    grid = TetGrid.bcc(80 / 3, 4)
    protocol = published_protocol()
    shapes = list(published_phantoms(grid).values())
    rng = np.random.default_rng(0)
    fields = [
        np.where(shapes[v % len(shapes)].barrier, 1e-5, 0.1) for v in range(args.voxels)
    ]
    clean = simulate(grid, np.stack(fields), protocol).numpy()
    noisy = np.hypot(
        clean + rng.normal(0, 0.01, clean.shape), rng.normal(0, 0.01, clean.shape)
    )
    sim = dict(diffusivity=2e-3, dtype=torch.float32, device=args.device)
    data = normalise_b0(
        torch.as_tensor(noisy, dtype=torch.float32, device=args.device), protocol
    )
    config = resolve_config("default", sigma=0.01, search_steps=args.steps)
    face = np.full((args.voxels, grid.n_faces), 0.1)  # no face-field starts

    def run(rows):
        return search_labels(
            grid, data[rows], protocol, config, sim=sim, face_kappa=face[rows]
        )

    SIGNAL_CACHE.clear()
    start = time.perf_counter()
    alone = [run(slice(v, v + 1))[0][0] for v in range(args.voxels)]
    t_alone = time.perf_counter() - start
    SIGNAL_CACHE.clear()  # the second run must not reuse the first's signals
    start = time.perf_counter()
    together = run(slice(None))[0]
    t_together = time.perf_counter() - start
    same = sum(np.array_equal(a, b) for a, b in zip(alone, together, strict=True))
    print(
        f"{args.voxels} voxels, published grid and protocol, search_steps "
        f"{args.steps}, {args.device}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| run | wall (s) | voxels / minute |")
    print("| --- | ---: | ---: |")
    for name, t in (
        ("one voxel per call", t_alone),
        ("all voxels together", t_together),
    ):
        print(f"| {name} | {t:.1f} | {60 * args.voxels / t:.1f} |")
    print(f"same labels both ways: {same} of {args.voxels} voxels")


if __name__ == "__main__":
    main()
