"""Whole volumes: what a volume fit holds grows with its mask, not the volume."""

import tracemalloc

import numpy as np
from numpy.testing import assert_array_equal

from dipy_spinverse.reconst import MASKED, OK


def test_memory_grows_with_the_mask_not_the_volume(model, signal):
    """A 2,000,000-voxel float32 volume (48 MB; 96 MB as float64) with a
    2-voxel mask: the fit traces far less than one float64 copy of the data
    (the fingerprint hashes 16 MiB slabs) and holds 2 rows of parameters.
    Before, the per-voxel arrays of every voxel (about 1.4 GB here) were
    allocated, and the data were copied to float64 twice."""
    shape = (200, 200, 50)
    data = np.zeros(shape + (len(signal),), np.float32)
    mask = np.zeros(shape, bool)
    voxels = [(3, 4, 5), (150, 20, 49)]
    for index in voxels:
        data[index] = 900.0 * signal
        mask[index] = True
    model.fit(900.0 * signal)  # first fit: torch's lazy imports, not traced
    tracemalloc.start()
    try:
        fit = model.fit(data, mask=mask)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    float64_copy = data.size * 8
    assert peak < 0.4 * float64_copy, (peak, float64_copy)
    assert fit.params["permeability"].shape == (2, model.grid.n_faces)
    status = fit.status
    assert_array_equal([status[i] for i in voxels], OK)
    assert (status == MASKED).sum() == mask.size - 2
    assert fit[voxels[1]].S0 == fit.S0[voxels[1]]


_WRITER = """
import sys
import numpy as np
from dipy_spinverse.io import Checkpoint
from dipy_spinverse.reconst import SpinverseFit
from dipy_spinverse.reconst.runner import empty_params
from dipy_spinverse import SpinverseModel, TetGrid, Protocol
protocol = Protocol.pgse([0, 1000, 1000], np.eye(3), small_delta=0.005,
                         big_delta=0.02)
model = SpinverseModel(protocol, grid=TetGrid.bcc(8.0, 2), preset="paper",
                       max_iter=2)
n = 50_000
params = empty_params(model.search_settings(), n)
fit = SpinverseFit(model, params, np.ones(n, bool))
store = Checkpoint(sys.argv[1])
store(fit)
for start in range(0, n, 32):
    rows = np.arange(start, min(n, start + 32))
    params["permeability"][rows] = 0.05
    params["status"][rows] = 0
    store(fit, rows)
    if start == 320:
        print("writing", flush=True)
"""


def test_a_killed_run_keeps_every_chunk_written(tmp_path):
    """SIGKILL while chunks are being written: the store stays readable, and
    every voxel marked done has its outputs (the status is written last)."""
    import signal
    import subprocess
    import sys
    import time

    from dipy_spinverse.io.fits import load_fit

    path = tmp_path / "killed.h5"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        time.sleep(0.2)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    fit = load_fit(path)
    done = fit.params["status"] == OK
    assert 320 < done.sum() < 50_000
    assert np.all(fit.params["permeability"][done] == 0.05)
    assert fit.n_pending == 50_000 - done.sum()
