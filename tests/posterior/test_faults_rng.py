"""Issue 84: a posterior fit leaves the caller's random generators alone
(case 3), a voxel's posterior is its own, whatever it is fitted with (also
noted), and a script that would have its own Dask workers run it again is
refused at once (case 5).

The models read shipped estimators (the README demo's protocol for
``fit_method="posterior"``, the protocol-free one): nothing is trained.
"""

import os
import random
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal

import dipy_spinverse.posterior as posterior
import dipy_spinverse.reconst.posterior as reconst_posterior
from dipy_spinverse import Protocol, SpinverseModel
from dipy_spinverse.posterior import TissuePrior
from dipy_spinverse.posterior.estimator import normal_points
from dipy_spinverse.reconst import OK
from dipy_spinverse.sim.sequences import fibonacci_sphere

#: The data's b = 0 signal and its noise (SNR 50).
S0, SIGMA = 300.0, 6.0
N_VOXELS = 6


def _free_protocol():
    parts = []
    for b, big_delta in ((1000, 0.03), (2500, 0.03), (2500, 0.07)):
        dirs = fibonacci_sphere(12, hemisphere=True)
        parts.append(
            Protocol.pgse(
                np.r_[0.0, 0.0, np.full(12, b)],
                np.vstack([np.zeros((2, 3)), dirs]),
                small_delta=0.01,
                big_delta=big_delta,
            )
        )
    return Protocol.concatenate(*parts)


def _noisy(protocol, n, seed):
    """``n`` noisy voxels (n, n_volumes) of the default prior."""
    signals, _ = TissuePrior().simulator(protocol).sample(n, seed=seed)
    rng = np.random.default_rng(seed)
    clean = S0 * signals
    return np.hypot(
        clean + SIGMA * rng.standard_normal(clean.shape),
        SIGMA * rng.standard_normal(clean.shape),
    )


@pytest.fixture(scope="module")
def demo(demo_gradients):
    """The demo's gradient table and its cache folder."""
    return demo_gradients


@pytest.fixture(scope="module")
def free_data():
    return _noisy(_free_protocol(), N_VOXELS, seed=1)


@pytest.fixture(scope="module")
def demo_data(demo):
    model = SpinverseModel(demo[0], fit_method="posterior", sigma=SIGMA)
    return _noisy(model.protocol, N_VOXELS, seed=2)


def _model(method, demo, **options):
    """A new model, whose estimator is read on its first fit."""
    if method == "posterior":
        table, cache = demo
        model = SpinverseModel(
            table, fit_method="posterior", sigma=SIGMA, cache_dir=cache, **options
        )
        return model
    return SpinverseModel(
        _free_protocol(), fit_method="protocol_free", sigma=SIGMA, **options
    )


def _data(method, request):
    return request.getfixturevalue(
        "demo_data" if method == "posterior" else "free_data"
    )


def _states():
    legacy = np.random.get_state()  # noqa: NPY002 -- checked as it is
    return torch.get_rng_state(), legacy, random.getstate()


def _assert_same_states(before, after):
    assert torch.equal(before[0], after[0]), "torch's global generator moved"
    for a, b in zip(before[1], after[1], strict=True):
        assert_array_equal(a, b, err_msg="numpy's global generator moved")
    assert before[2] == after[2], "Python's random moved"


@pytest.mark.parametrize("method", ["posterior", "protocol_free"])
def test_a_fit_leaves_the_callers_generators_as_they_were(method, demo, request):
    """The case as filed: two fits after two different seeds left torch's
    generator in one state. Here: every generator as it was before the fit
    (the estimator read on this first fit too), and the fit's answer the
    same whatever the caller's state."""
    data = _data(method, request)
    model = _model(method, demo)
    torch.manual_seed(123)
    np.random.seed(5)  # noqa: NPY002 -- the legacy global is what is checked
    random.seed(7)
    before = _states()
    first = model.fit(data)
    if method == "posterior":
        assert model.estimator_path.parent == posterior.SHIPPED, "would train"
    _assert_same_states(before, _states())
    expected = torch.rand(3)
    torch.manual_seed(999)
    second = model.fit(data)
    assert not torch.equal(torch.rand(3), expected)
    assert_array_equal(first.status, second.status)
    assert (first.status == OK).all(), first.status
    assert_array_equal(first.cell_diameter, second.cell_diameter)
    low, high = first.credible_interval("cell_diameter", 0.8)
    before = _states()
    again = first.credible_interval("cell_diameter", 0.8)
    samples = first.posterior_samples("restricted_fraction", 5, seed=3)
    _assert_same_states(before, _states())
    assert_array_equal(again[0], low)
    assert_array_equal(again[1], high)
    assert_array_equal(
        first.posterior_samples("restricted_fraction", 5, seed=3), samples
    )


def test_seeded_draws_leave_torch_alone():
    """The estimators' ``sample(..., generator_seed=s)`` draws from generators
    of its own."""
    torch.manual_seed(4)
    keys = (torch.rand(3, 5),)
    before = torch.get_rng_state()
    first = normal_points(8, 3, 4, seed=11, voxel_data=keys)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(normal_points(8, 3, 4, seed=11, voxel_data=keys), first)
    assert not torch.equal(normal_points(8, 3, 4, seed=12, voxel_data=keys), first)


@pytest.mark.parametrize("method", ["posterior", "protocol_free"])
def test_a_voxels_answer_is_its_own(method, demo, request, monkeypatch):
    """A voxel fitted alone, among others in any order, or in another batch
    (one voxel a batch) has the same posterior: its draws are seeded by its
    data, not by its place in a batch."""
    data = _data(method, request)
    model = _model(method, demo, n_posterior_samples=64)
    alone = [model.fit(row) for row in data]
    together = model.fit(data)
    backwards = model.fit(data[::-1])
    if method == "posterior":
        monkeypatch.setattr(reconst_posterior, "_DRAWS_PER_BATCH", 64)
    else:
        monkeypatch.setattr(
            "dipy_spinverse.reconst.protocol_free_model._VOXELS_PER_BATCH", 1
        )
    apart = model.fit(data)
    for name in ("cell_diameter", "restricted_fraction"):
        single = np.array([getattr(fit, name) for fit in alone])
        # The flow evaluated on a batch rounds as on one voxel, to float32
        # (before: 1 % of the interval's width apart).
        low, high = together.credible_interval(name, 0.9)
        tolerance = 1e-4 * (high - low).min()
        for fit in (together, apart):
            np.testing.assert_allclose(getattr(fit, name), single, atol=tolerance)
        np.testing.assert_allclose(
            getattr(backwards, name)[::-1], single, atol=tolerance
        )


# -- case 5: Dask's spawned workers run the main script again ------------------
# Dask's local workers are spawned processes: each runs the script's top level
# again as it starts. Training from a script without the guard hung for
# minutes, the workers waiting on the build lock their parent held. Each
# script here runs in its own interpreter, with a timeout well below the hang.

GUARD = 'if __name__ == "__main__":'


def _run_script(tmp_path, source, *args, timeout=60):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return done, time.perf_counter() - start


def test_a_local_dask_cluster_from_an_unguarded_script_is_refused(tmp_path):
    """Refused in the script's own process, before any worker starts: a
    RuntimeError naming the script, its line and the guard (before: the
    workers re-ran the script, and a training waited on its own lock)."""
    pytest.importorskip("distributed")
    done, seconds = _run_script(
        tmp_path,
        """
        from dipy_spinverse.clusters import open_cluster

        with open_cluster("dask", n_workers=1) as cluster:
            print("started", cluster.slots)
        """,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "RuntimeError" in done.stderr
    assert GUARD in done.stderr and "script.py" in done.stderr, done.stderr
    assert "line 4" in done.stderr, done.stderr
    assert "started" not in done.stdout
    assert "bootstrapping phase" not in done.stderr  # no worker was started
    assert seconds < 30


def test_only_code_outside_the_guard_is_refused(tmp_path):
    """What the refusal looks at: the line of the script's top level that
    runs (one inside a function called from the top level counts as that
    call), inside or outside a guard."""
    done, _ = _run_script(
        tmp_path,
        """
        from dipy_spinverse.clusters import unguarded_main_line


        def work():
            return unguarded_main_line()


        print("outside", work())
        if __name__ == "__main__":
            print("inside", work())
        """,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("outside (") and lines[0].endswith("script.py', 9)")
    assert lines[1] == "inside None"


def test_a_spawned_worker_does_not_wait_on_its_parents_lock(tmp_path):
    """The child side: a spawned process that runs its parent's unguarded
    script again and reaches a build lock its parent holds raises the same
    RuntimeError at once instead of waiting for ever (before: this child
    never ended)."""
    done, seconds = _run_script(
        tmp_path,
        """
        import multiprocessing
        import pathlib

        from dipy_spinverse import files

        with files._build_lock(pathlib.Path("built.npz"), "test file"):
            if __name__ == "__main__":
                context = multiprocessing.get_context("spawn")
                child = context.Process(target=print, args=("child ran",))
                child.start()
                child.join(25)
                print("exit code", child.exitcode)
                if child.exitcode is None:
                    child.kill()
        """,
    )
    assert done.returncode == 0, done.stderr
    assert "exit code 1" in done.stdout, done.stdout + done.stderr
    assert "RuntimeError" in done.stderr and GUARD in done.stderr, done.stderr
    assert seconds < 25
