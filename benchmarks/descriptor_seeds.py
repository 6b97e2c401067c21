"""Regenerates the tables of doc/validation/surface_check.md.

``--quick``: one substrate, the truth's starts, a short search; minutes, not
seconds, for the same reasons as surface_check.py (-m slow).

Do starts shaped by tissue descriptors help the label search? (issue 46, item 3)

The held-out substrates of ``benchmarks/surface_check.py`` (``--seed``; 1-4
random cells in the search's closed 26.7 um box), simulated noise-free on the
demo's protocol, are searched as ``SpinverseModel(fit_method="search")``
searches them, with more starts (``reconstruct(..., seeds=)``) built by
:func:`~dipy_spinverse.inverse.shapes.descriptor_starts`:

- ``none``: no more starts (the search as it is);
- ``truth``: from the truth's own descriptors (cell count, restricted
  fraction, anisotropy, orientation), at ``--positions`` placements: an
  oracle, the most that descriptor-shaped starts can give;
- ``posterior``: from 16 draws of the demo's surface-check posterior
  (``demo/surface_check.json``), 4 placements each.

Prints each voxel's aligned IoU against the truth, the median and the time
a voxel (2 CPU threads).

    python benchmarks/descriptor_seeds.py --starts truth --n 12
"""

import argparse
import json
import time

import numpy as np
import torch
from surface_check import QUICK_SEARCH, _demo_protocol, held_out_voxels

from dipy_spinverse import SpinverseModel
from dipy_spinverse.geometry.descriptors import describe_substrate
from dipy_spinverse.geometry.metrics import aligned_overlap
from dipy_spinverse.inverse import reconstruct
from dipy_spinverse.inverse.shapes import descriptor_starts
from dipy_spinverse.posterior.targets import decode
from dipy_spinverse.sim.signals import VoxelSignals

DRAWN = ("restricted_fraction", "n_cells", "anisotropy", "orientation")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", choices=("none", "truth", "posterior"))
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--seed", type=int, default=4601)
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--json", help="write the per-voxel IoU here")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test, not a measurement"
    )
    args = parser.parse_args(argv)
    quick = {}
    if args.quick:
        args.n, args.positions, args.starts = 1, 2, "truth"
        quick = QUICK_SEARCH
    torch.set_num_threads(2)
    protocol, posterior = _demo_protocol()
    model = SpinverseModel(protocol, sigma=0.005, **posterior, **quick)
    grid = model.grid
    substrates, clean, _ = held_out_voxels(
        grid, protocol, args.n, seed=args.seed, snr=100.0, published=False
    )
    signals = VoxelSignals.from_raw(1000 * clean, model.protocol)
    seeds = None
    if args.starts == "truth":
        seeds = []
        for substrate in substrates:
            truth = describe_substrate(grid, substrate)
            draws = {name: np.array([truth[name]]) for name in DRAWN}
            seeds.append(descriptor_starts(grid, draws, n_positions=args.positions))
    elif args.starts == "posterior":
        estimator = model.estimator
        sigma = torch.full((len(clean),), 0.005)
        x = torch.as_tensor(signals.normalised, dtype=torch.float32)
        values = decode(estimator.sample(x, sigma, 16, generator_seed=0).numpy())
        seeds = [
            descriptor_starts(
                grid, {name: values[name][:, v] for name in DRAWN}, n_positions=4
            )
            for v in range(len(clean))
        ]
    start = time.perf_counter()
    found = reconstruct(
        grid, signals, protocol, preset=model.config, diffusivity=2e-3, seeds=seeds
    )
    seconds = (time.perf_counter() - start) / args.n
    iou = [
        float(aligned_overlap(grid, labels > 0, s.labels > 0)["iou"])
        for labels, s in zip(np.asarray(found.labels), substrates, strict=True)
    ]
    print(
        f"{args.starts}: aligned IoU {np.round(iou, 2).tolist()}, median "
        f"{np.median(iou):.2f}, {seconds:.0f} s a voxel"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), iou=iou, seconds=seconds), f, indent=1)


if __name__ == "__main__":
    main()
