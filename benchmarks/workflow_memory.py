"""Regenerates the tables of doc/validation/volumes.md.

``--quick``: a 12^3 volume, 6 voxels, one iteration (-m slow: the command runs
in a child process).

Peak memory of ``dipy_fit_spinverse`` on a large volume with a small mask.

The demo's six voxels (``python -m dipy_spinverse.data demo``) are placed in a
volume of brain size (145 x 174 x 145, an HCP-sized grid) whose other voxels
are zero, with a mask of ``--n_mask`` voxels (the six demo voxels repeated).
The workflow runs in a child process with fast settings (the published face
fit, ``--max_iter`` iterations, no label search), writing its default outputs;
its peak resident set size (``ru_maxrss`` of the child) is printed against the
size of the volume's data and of the mask's.

The target (issue 45): under 1.5 GB for a 1,000-voxel mask of a 145 x 174 x 145
volume; memory grows with the mask, not with the volume.

Run: ``python benchmarks/workflow_memory.py`` (about two minutes on 2 CPU
cores); ``--shape 40 48 40 --n_mask 50`` for a quick check.
"""

import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

import harness
import nibabel as nib
import numpy as np


def make_volume(folder, shape, n_mask, *, seed=0):
    """A ``shape`` volume holding the demo voxels at ``n_mask`` places; paths.

    Run in a process of its own (:func:`made_volume`): Linux counts the
    resident memory a process had when it started the workflow's child
    into that child's peak (``ru_maxrss`` survives ``fork`` and ``exec``),
    so this process stays small.
    """
    from dipy_spinverse.data import make_phantom_dataset

    demo = make_phantom_dataset(os.path.join(folder, "demo"), tissue_voxels=False)
    image = nib.load(demo["data"])
    voxels = np.asarray(image.dataobj, dtype=np.float32).reshape(-1, image.shape[-1])
    rng = np.random.default_rng(seed)
    flat = rng.choice(int(np.prod(shape)), size=n_mask, replace=False)
    mask = np.zeros(int(np.prod(shape)), np.uint8)
    mask[flat] = 1
    mask = mask.reshape(shape)
    data = np.zeros(shape + (image.shape[-1],), np.float32)
    data[mask.astype(bool)] = voxels[np.arange(n_mask) % len(voxels)]
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = {
        "data": os.path.join(folder, "dwi.nii.gz"),
        "mask": os.path.join(folder, "mask.nii.gz"),
    }
    nib.save(nib.Nifti1Image(data, affine), paths["data"])
    nib.save(nib.Nifti1Image(mask, affine), paths["mask"])
    del data
    return {**demo, **paths}


def made_volume(folder, shape, n_mask, seed):
    """:func:`make_volume` in a fresh interpreter; its paths."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(make_volume, (folder, shape, n_mask), dict(seed=seed))


def run_workflow(paths, out_dir, *, max_iter):
    """Run the command in a child process; (seconds, peak RSS in bytes)."""
    command = [
        sys.executable,
        "-c",
        "from dipy_spinverse.workflows import main; main()",
        paths["data"],
        paths["bvals"],
        paths["bvecs"],
        paths["mask"],
        "--timing_file",
        paths["timing"],
        "--preset",
        "paper",
        "--max_iter",
        str(max_iter),
        "--n_report",
        "0",
        "--out_dir",
        out_dir,
        "--force",
    ]
    start = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    errors = child.stderr.read()
    # wait4: this child's own resource use (ru_maxrss in KiB on Linux).
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"the workflow failed:\n{errors[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def main(argv=None):
    parser = harness.parser(__doc__, seed=0, seed_help="the mask's places")
    parser.add_argument("--shape", type=int, nargs=3, default=(145, 174, 145))
    parser.add_argument("--n_mask", type=int, default=1000)
    parser.add_argument("--max_iter", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.n_mask, args.max_iter = (12, 12, 12), 6, 1
    # The same mask in a volume just large enough to hold it, then in the
    # one asked for: what the second costs more grows with the volume.
    side = int(np.ceil(args.n_mask ** (1 / 3))) + 1
    rows = []
    for shape in ((side,) * 3, tuple(args.shape)):
        with tempfile.TemporaryDirectory() as folder:
            paths = made_volume(folder, shape, args.n_mask, args.seed)
            n_volumes = nib.load(paths["data"]).shape[-1]
            seconds, peak = run_workflow(
                paths, os.path.join(folder, "fit"), max_iter=args.max_iter
            )
        rows.append((shape, n_volumes, seconds, peak))
    gib = 1024**3
    print(f"{'volume':>16} {'mask':>6} {'data f32':>9} {'peak RSS':>9} {'wall':>7}")
    for shape, n_volumes, seconds, peak in rows:
        volume = np.prod(shape) * n_volumes * 4 / gib
        print(
            f"{'x'.join(map(str, shape)) + f'x{n_volumes}':>16} {args.n_mask:>6} "
            f"{volume:>7.2f} G {peak / gib:>7.2f} G {seconds:>6.0f} s"
        )
    return rows


if __name__ == "__main__":
    main()
