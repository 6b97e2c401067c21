"""Fit the built-in phantom dataset from Python, the way DIPY models are used
==============================================================================

Writes the demo dataset (six voxels: cylinders of different radii,
orientations and permeabilities, and a sphere), builds a DIPY gradient table
with the per-volume timing, fits ``SpinverseModel`` to the whole volume,
compares the maps with the ground truth, and saves the maps, the meshes and
the resumable fit state::

    python examples/fit_phantom_dataset.py --out out/phantom

The same fit from the command line is ``dipy_fit_spinverse`` (see README).
"""

import argparse
import json
import os

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.io.gradients import read_bvals_bvecs
from dipy.io.image import load_nifti, load_nifti_data

from dipy_spinverse.data import make_phantom_dataset
from dipy_spinverse.io.fits import save_fit
from dipy_spinverse.io.gradients import read_timing
from dipy_spinverse.io.maps import save_maps
from dipy_spinverse.io.surfaces import save_interface, volume_surface
from dipy_spinverse.reconst import SpinverseModel

MAPS = ("restricted_fraction", "surface_to_volume", "n_compartments")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/phantom", help="output folder")
    parser.add_argument(
        "--max_iter", type=int, default=None, help="iterations (default: the preset's)"
    )
    parser.add_argument("--engine", default="serial", help="serial or joblib")
    parser.add_argument(
        "--sigma",
        type=float,
        default=10.0,
        help="noise standard deviation in the data's units (the demo's: "
        "S0 1000 / SNR 100; 0: unknown)",
    )
    args = parser.parse_args(argv)

    paths = make_phantom_dataset(os.path.join(args.out, "data"), tissue_voxels=False)
    data, affine = load_nifti(paths["data"])
    mask = load_nifti_data(paths["mask"]).astype(bool)
    bvals, bvecs = read_bvals_bvecs(paths["bvals"], paths["bvecs"])
    small_delta, big_delta = read_timing(paths["timing"])
    gtab = gradient_table(
        bvals, bvecs=bvecs, big_delta=big_delta, small_delta=small_delta
    )

    model = SpinverseModel(gtab, max_iter=args.max_iter, sigma=args.sigma)
    fit = model.fit(data, mask=mask, engine=args.engine, verbose=True)
    print(fit)

    with open(paths["truth_json"]) as f:
        truth = json.load(f)
    print(f"{'voxel':>10} {'substrate':>22}  " + "  ".join(f"{m:>24}" for m in MAPS))
    for voxel in truth["voxels"]:
        index = tuple(voxel["index"])
        name = f"{voxel['shape']} {voxel['kappa']:.0e} m/s"
        values = "  ".join(
            f"{getattr(fit, m)[index]:>11.3g} (true {voxel[m]:>5.3g})" for m in MAPS
        )
        print(f"{str(index):>10} {name:>22}  {values}")

    # Predictions use each voxel's fitted S0, as DIPY users expect.
    residual = fit.predict()[mask] - data[mask]
    print(f"RMS misfit of the predicted signal: {np.sqrt(np.mean(residual**2)):.3g}")

    fit_dir = os.path.join(args.out, "fit")
    maps = save_maps(fit, fit_dir, affine=affine)
    meshes = save_interface(fit, os.path.join(fit_dir, "meshes"))  # um, .vtp
    # All voxels' membranes as one surface in scanner coordinates (mm).
    surface = volume_surface(fit, affine=affine)
    if surface.n_triangles:
        print(f"surface: {surface.save(os.path.join(fit_dir, 'barriers.gii'))}")
    state = save_fit(fit, os.path.join(fit_dir, "spinverse_fit.npz"))
    print(f"maps: {sorted(maps.values())[0]} ... ({len(maps)} files)")
    print(f"meshes: {len(meshes)} in {os.path.join(fit_dir, 'meshes')}")
    print(f"fit state (dipy_spinverse.io.load_fit): {state}")


if __name__ == "__main__":
    main()
