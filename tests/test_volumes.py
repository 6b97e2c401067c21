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
