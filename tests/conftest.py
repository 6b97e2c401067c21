import os

# Set before torch is imported anywhere (see dipy_spinverse/__init__.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dipy_spinverse import Protocol, TetGrid, simulate  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def problem():
    """A 48-cell grid, a ball of 1e-5 m/s membrane, two 3-volume sequences."""
    grid = TetGrid.bcc(8.0, 2)
    inside = np.linalg.norm(grid.cell_centroids - 4.0, axis=1) < 2.5
    truth = np.where(grid.interface_faces(inside), 1e-5, 0.1)
    bvals = np.array([0, 1000, 3000, 0, 1000, 3000], float)
    dirs = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]] * 2, float)
    prot = Protocol.pgse(bvals[:3], dirs[:3], small_delta=0.005, big_delta=0.04)
    prot = prot + Protocol.pgse(bvals[3:], dirs[3:], small_delta=0.005, big_delta=0.01)
    signal = simulate(grid, truth, prot).numpy()
    return grid, prot, signal
