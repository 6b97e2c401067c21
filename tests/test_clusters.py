"""Ray and Dask clusters: the same fit as the serial run, errors that say what to do.

A real ``dask.distributed`` cluster (in-process workers: worker processes
take tens of seconds to import torch on a shared 2-core machine) and a real
local Ray instance (its worker processes: marked slow). Chunks of the same
voxels give bit-identical results whichever process fits them, so the
cluster fits are compared to the serial fit with the same ``vox_per_chunk``
exactly.
"""

import importlib.util
import os
import socket

import numpy as np
import pytest
from conftest import SMALL_DEMO, T2_WEIGHT
from numpy.testing import assert_array_equal

from dipy_spinverse import clusters
from dipy_spinverse.io.checkpoint import Checkpoint
from dipy_spinverse.io.fits import load_fit
from dipy_spinverse.reconst import MASKED

CHUNK = 2


@pytest.fixture(scope="module")
def noisy_volume(signal):
    """A 3 x 2 x 1 volume of noisy copies of the signal, one voxel masked."""
    rng = np.random.default_rng(7)
    noise = 1 + 0.02 * rng.standard_normal((3, 2, 1, len(signal)))
    data = 800.0 * T2_WEIGHT * signal * noise
    mask = np.ones((3, 2, 1), bool)
    mask[2, 1, 0] = False
    return data, mask


@pytest.fixture(scope="module")
def serial_fit(model, noisy_volume):
    data, mask = noisy_volume
    return model.fit(data, mask=mask, vox_per_chunk=CHUNK)


def _assert_same_fit(fit, expected):
    assert_array_equal(fit.status, expected.status)
    assert_array_equal(fit.permeability, expected.permeability)
    assert_array_equal(fit.params["loss"], expected.params["loss"])
    assert_array_equal(fit.predict(), expected.predict())
    assert_array_equal(fit.restricted_fraction, expected.restricted_fraction)


@pytest.fixture(scope="module")
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    )
    yield cluster
    cluster.close()


def test_dask_cluster_by_address_equals_serial(
    model, noisy_volume, serial_fit, dask_cluster, tmp_path, capsys
):
    data, mask = noisy_volume
    path = tmp_path / "dask.h5"
    fit = model.fit(
        data,
        mask=mask,
        engine="dask",
        address=dask_cluster.scheduler_address,
        vox_per_chunk=CHUNK,
        verbose=True,
        checkpoint=Checkpoint(path),
    )
    _assert_same_fit(fit, serial_fit)
    assert fit.status[2, 1, 0] == MASKED
    # One bar over all workers, complete; every chunk checkpointed.
    assert "5.0/5" in capsys.readouterr().err
    _assert_same_fit(load_fit(path), serial_fit)


def test_dask_client_equals_serial(model, noisy_volume, serial_fit, dask_cluster):
    distributed = pytest.importorskip("distributed")
    data, mask = noisy_volume
    with distributed.Client(dask_cluster, set_as_default=False) as client:
        fit = model.fit(
            data, mask=mask, engine="dask", address=client, vox_per_chunk=CHUNK
        )
    _assert_same_fit(fit, serial_fit)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_dask_scheduler(model, noisy_volume, monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.setattr(clusters, "CONNECT_TIMEOUT", 1)
    address = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(ValueError, match="cannot connect to the Dask scheduler"):
        model.fit(noisy_volume[0], engine="dask", address=address)


def test_unreachable_ray_cluster(model, noisy_volume, monkeypatch):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    address = f"127.0.0.1:{_free_port()}"
    with pytest.raises(ValueError, match="cannot connect to the Ray cluster at addr"):
        model.fit(noisy_volume[0], engine="ray", address=address)
    # RAY_ADDRESS is honoured, and named when nothing answers there.
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ValueError, match="cluster at RAY_ADDRESS="):
        model.fit(noisy_volume[0], engine="ray")
    assert not ray.is_initialized()


@pytest.mark.parametrize("engine, package", [("ray", "ray"), ("dask", "distributed")])
def test_missing_cluster_package(model, noisy_volume, monkeypatch, engine, package):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == package else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    hint = r'pip install "dipy_spinverse\[parallel\]"'
    with pytest.raises(ValueError, match=f"needs the {package} package: {hint}"):
        model.fit(noisy_volume[0], engine=engine, address="tcp://127.0.0.1:1")


def test_address_needs_a_cluster_engine(model, noisy_volume):
    with pytest.raises(ValueError, match="address='auto' is for engine='ray'"):
        model.fit(noisy_volume[0], address="auto")
    with pytest.raises(ValueError, match="joblib.*takes no address"):
        model.fit(noisy_volume[0], engine="joblib", address="auto")


def test_worker_device_and_host_ranks(monkeypatch):
    import torch

    ranks = clusters._host_ranks(
        {
            "tcp://a:2": dict(host="a"),
            "tcp://a:1": dict(host="a"),
            "tcp://b:1": dict(host="b"),
        }
    )
    assert ranks == {"tcp://a:1": 0, "tcp://a:2": 1, "tcp://b:1": 0}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert clusters.worker_device(3) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="sees no CUDA device"):
        clusters.worker_device(0)


@pytest.mark.slow  # Ray's worker processes import torch: about a minute on 2 cores
def test_ray_equals_serial(model, noisy_volume, serial_fit, monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    data, mask = noisy_volume
    # A stale RAY_ADDRESS must not matter once an instance is running here.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    ray.init(num_cpus=2, include_dashboard=False, address="local")
    try:
        fit = model.fit(
            data, mask=mask, engine="ray", vox_per_chunk=CHUNK, verbose=True
        )
    finally:
        ray.shutdown()
    _assert_same_fit(fit, serial_fit)
    assert "5.0/5" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_local_instance_started_and_stopped(model, noisy_volume, serial_fit):
    ray = pytest.importorskip("ray")
    data, mask = noisy_volume
    os.environ.pop("RAY_ADDRESS", None)
    fit = model.fit(
        data, mask=mask, engine="ray", address="local", n_jobs=2, vox_per_chunk=CHUNK
    )
    _assert_same_fit(fit, serial_fit)
    assert not ray.is_initialized()


def test_workflow_on_a_dask_cluster(dask_cluster, tmp_path, monkeypatch):
    """--engine dask --address: the same fit state as the serial command."""
    from dipy_spinverse.data import make_phantom_dataset
    from dipy_spinverse.workflows.spinverse import SpinverseFlow

    demo = make_phantom_dataset(tmp_path / "demo", **SMALL_DEMO)
    # A stale RAY_ADDRESS is no concern of a Dask (or serial) run.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    states = []
    for name, options in (
        ("serial", {}),
        ("dask", dict(engine="dask", address=dask_cluster.scheduler_address)),
    ):
        flow = SpinverseFlow(force=True)
        flow.run(
            demo["data"],
            demo["bvals"],
            demo["bvecs"],
            demo["mask"],
            timing_file=demo["timing"],
            grid_size=12.0,
            grid_resolution=2,
            max_iter=2,
            preset="paper",
            batch_size=2,
            n_report=0,
            out_dir=str(tmp_path / name),
            **options,
        )
        states.append(load_fit(flow.last_generated_outputs["out_state"]))
    _assert_same_fit(*states)
