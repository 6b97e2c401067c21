"""SpinverseModel / SpinverseFit: DIPY conformance, bad input, save/load/resume.

Tiny settings throughout (48-cell grid, 6 volumes, a few iterations): these
tests check the DIPY layer, which must be right whatever the inversion
returns, not the quality of the recovery.
"""

import numpy as np
import pytest
import torch
from conftest import BIG, BVALS, BVECS, FAST, SMALL, T2_WEIGHT  # noqa: E402
from dipy.core.gradients import gradient_table
from numpy.testing import assert_allclose, assert_array_equal

import dipy_spinverse.reconst.runner as runner
from dipy_spinverse import Protocol, TetGrid
from dipy_spinverse.interface import InterfaceMesh, load_mesh
from dipy_spinverse.io import (
    load_fit,
    save_fit,
)
from dipy_spinverse.phantoms import sphere
from dipy_spinverse.reconst import (
    BAD_B0,
    DIVERGED,
    FAILED,
    MASKED,
    NONFINITE,
    OK,
    STATUS_CODES,
    SpinverseFit,
    SpinverseModel,
)


# -- single voxel ------------------------------------------------------------------
def test_single_voxel_fit(model, grid, signal):
    raw = 700.0 * T2_WEIGHT * signal
    fit = model.fit(raw)
    assert isinstance(fit, SpinverseFit)
    assert fit.status == OK and fit.shape == ()
    assert fit.permeability.shape == (grid.n_faces,)
    assert fit.barrier.dtype == bool and fit.barrier.shape == (grid.n_faces,)
    assert_allclose(fit.S0, raw[[0, 3]].mean())
    assert np.isfinite(fit.loss) and fit.residual >= 0
    assert len(fit.history["total"]) == 4
    # predict() uses the FITTED S0, sequence by sequence (T2 weighting).
    predicted = fit.predict()
    assert predicted.shape == (6,)
    assert_allclose(predicted[[0, 3]], raw[[0, 3]])
    assert_allclose(fit.predict(S0=1.0)[[0, 3]], 1.0)
    # Re-simulating the same acquisitions matches the stored prediction.
    assert_allclose(fit.predict(model.gtab), predicted, rtol=1e-8)
    scale = raw[[0, 0, 0, 3, 3, 3]]
    rms = np.sqrt(np.mean(((predicted - raw) / scale) ** 2))
    assert_allclose(fit.residual, rms, rtol=1e-8, atol=1e-12)


def test_predict_new_gtab_uses_matching_sequence_s0(model, signal):
    raw = 700.0 * T2_WEIGHT * signal
    fit = model.fit(raw)
    other = gradient_table(
        np.array([0, 2000, 0]),
        bvecs=np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0]]),
        big_delta=np.array([0.01, 0.01, 0.03]),
        small_delta=SMALL,
    )
    predicted = fit.predict(other)
    # Same timing as the fitted second sequence: its own b=0; unknown: mean b=0.
    assert_allclose(predicted[0], raw[3])
    assert_allclose(predicted[2], raw[[0, 3]].mean())
    assert 0 < predicted[1] < raw[3]


@pytest.fixture(scope="module")
def sphere_fit(gtab):
    """A fit holding a known field: a sphere on the published 576-cell grid."""
    grid = TetGrid.bcc(80 / 3, 4)
    model = SpinverseModel(gtab, grid=grid, **FAST)
    phantom = sphere(grid, radius=9.0, kappa=2e-5)
    params = dict(
        permeability=np.where(phantom.barrier, phantom.permeability, 0.1),
        labels=None,
        predicted=np.ones(6),
        S0=100.0,
        S0_sequences=np.array([60.0, 90.0]),
        loss=0.25 * model.config.loss_scale,
        status=OK,
    )
    return SpinverseFit(model, params), phantom


def test_maps_of_known_permeability(sphere_fit):
    """Maps computed from a known field, independently of the inversion."""
    fit, phantom = sphere_fit
    grid = fit.model.grid
    assert_array_equal(fit.barrier, phantom.barrier)
    inside = phantom.inside
    assert_allclose(
        fit.restricted_fraction, grid.cell_volumes[inside].sum() / grid.volume
    )
    assert fit.n_compartments == 1
    area = grid.face_areas[phantom.barrier].sum()
    assert_allclose(fit.surface_to_volume, area / grid.volume)
    assert_allclose(fit.membrane_permeability, 2e-5)
    assert_allclose(fit.residual, 0.5)
    assert_allclose(fit.predict(), [60, 60, 60, 90, 90, 90])
    mesh = fit.interface_mesh
    assert isinstance(mesh, InterfaceMesh) and mesh.is_closed
    assert mesh.n_triangles == phantom.barrier.sum()


def test_save_interface(sphere_fit, tmp_path):
    fit, _ = sphere_fit
    for ext in (".ply", ".vtk"):
        fit.save_interface(tmp_path / f"mesh{ext}")
        loaded = load_mesh(tmp_path / f"mesh{ext}")
        assert loaded.n_triangles == fit.interface_mesh.n_triangles
    failed = SpinverseFit(
        fit.model,
        dict(
            permeability=fit.permeability,
            predicted=np.ones(6),
            S0=1.0,
            S0_sequences=np.ones(2),
            loss=0.0,
            status=FAILED,
        ),
    )
    assert failed.interface_mesh is None
    with pytest.raises(ValueError, match="no fitted interface"):
        failed.save_interface(tmp_path / "x.ply")


def test_single_voxel_problems_do_not_raise(model, signal):
    bad = signal.copy()
    bad[2] = np.nan
    fit = model.fit(bad)
    assert fit.status == NONFINITE
    assert np.all(np.isnan(fit.permeability)) and np.isnan(fit.S0)
    assert np.all(np.isnan(fit.predict()))
    assert np.isnan(fit.restricted_fraction) and fit.interface_mesh is None
    assert model.fit(-signal).status == BAD_B0


# -- volumes -------------------------------------------------------------------------
def test_volume_with_mask(volume_fit, volume, grid):
    data, mask = volume
    fit = volume_fit
    assert isinstance(fit, SpinverseFit)
    assert fit.shape == (2, 2, 1)
    assert_array_equal(fit.status[..., 0], [[OK, OK], [OK, MASKED]])
    assert fit.permeability.shape == (2, 2, 1, grid.n_faces)
    for name in (
        "restricted_fraction",
        "surface_to_volume",
        "membrane_permeability",
        "n_compartments",
        "residual",
        "S0",
        "loss",
    ):
        value = getattr(fit, name)
        assert value.shape == (2, 2, 1), name
        assert value[1, 1, 0] == 0, name  # 0 outside the mask, as DIPY
    assert_allclose(fit.S0[mask], data[mask][:, [0, 3]].mean(-1))
    # Volume predictions use each voxel's fitted S0 (not 1 as MultiVoxelFit).
    predicted = fit.predict()
    assert predicted.shape == data.shape
    assert_allclose(predicted[mask][:, [0, 3]], data[mask][:, [0, 3]])
    assert_array_equal(predicted[1, 1, 0], 0)
    assert_allclose(fit.predict(S0=1.0)[mask][:, [0, 3]], 1.0)
    s0_map = np.full((2, 2, 1), 3.0)
    assert_allclose(fit.predict(S0=s0_map)[mask][:, 0], 3.0)
    assert_allclose(fit.predict(fit.model.gtab), predicted, rtol=1e-8, atol=1e-12)


def test_volume_matches_single_voxel_fits(model, volume_fit, volume):
    data, _ = volume
    single = model.fit(data[0, 1, 0])
    assert_allclose(volume_fit[0, 1, 0].permeability, single.permeability, rtol=1e-7)
    assert_allclose(volume_fit[0, 1, 0].S0, single.S0)


def test_slicing_a_volume_fit(volume_fit):
    fit = volume_fit
    voxel = fit[1, 0, 0]
    assert isinstance(voxel, SpinverseFit)
    assert_array_equal(voxel.permeability, fit.permeability[1, 0, 0])
    assert voxel.S0 == fit.S0[1, 0, 0]
    assert fit[1, 1, 0] is None  # masked, as DIPY's MultiVoxelFit
    column = fit[:, 0]
    assert isinstance(column, SpinverseFit) and column.shape == (2, 1)
    assert_array_equal(column.status, fit.status[:, 0])
    assert_array_equal(column.restricted_fraction, fit.restricted_fraction[:, 0])
    assert_allclose(column.predict(), fit.predict()[:, 0])
    assert fit[..., 0].shape == (2, 2)
    assert fit[fit.mask].shape == (3,)
    meshes = fit.interface_mesh
    assert meshes.shape == (2, 2, 1) and meshes[1, 1, 0] is None


@pytest.mark.parametrize("engine", ["joblib", "dask"])
def test_parallel_engines_agree_with_serial(model, volume, volume_fit, engine):
    pytest.importorskip(engine)
    data, mask = volume
    fit = model.fit(data, mask=mask, engine=engine, n_jobs=2, vox_per_chunk=2)
    assert_array_equal(fit.status, volume_fit.status)
    assert_allclose(fit.permeability, volume_fit.permeability, rtol=1e-6)
    assert_allclose(fit.predict(), volume_fit.predict(), rtol=1e-8)


def test_verbose_progress_bar(model, volume, capsys):
    data, mask = volume
    model.fit(data[:1], mask=mask[:1], verbose=True)
    assert "Fitting Spinverse" in capsys.readouterr().err


def test_per_voxel_problems_never_stop_a_volume(model, signal, monkeypatch):
    data = np.stack([signal * 100.0] * 6).reshape(3, 2, 1, 6)
    data[0, 0, 0, 1] = np.nan
    data[0, 1, 0, 4] = np.inf
    data[1, 0, 0, [0, 3]] = 0.0
    data[1, 1, 0, 2] = 123.0  # marker: this voxel's inversion raises
    data[2, 0, 0, 2] = 321.0  # marker: this voxel diverges
    real = runner.reconstruct

    def flaky(grid, signal, protocol, **kwargs):
        raw = np.asarray(signal)
        if np.any(np.isclose(raw[:, 2], 123.0 / 100.0)):
            raise RuntimeError("solver blew up")
        result = real(grid, signal, protocol, **kwargs)
        result.permeability[np.isclose(raw[:, 2], 321.0 / 100.0)] = np.nan
        return result

    monkeypatch.setattr(runner, "reconstruct", flaky)
    with pytest.warns(RuntimeWarning, match="solver blew up"):
        fit = model.fit(data)
    assert_array_equal(
        fit.status[..., 0], [[NONFINITE, NONFINITE], [BAD_B0, FAILED], [DIVERGED, OK]]
    )
    bad = fit.status != OK
    assert np.all(np.isnan(fit.permeability[bad]))
    assert np.all(np.isnan(fit.restricted_fraction[bad]))
    assert np.all(np.isnan(fit.predict()[bad]))
    assert np.isfinite(fit.restricted_fraction[2, 1, 0])
    assert set(STATUS_CODES) >= set(np.unique(fit.status))


# -- bad input ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(preset="nope"), "Invalid preset"),
        (dict(contnuity=1.0), "Unknown option"),
        (dict(max_iter=1), "fewer than the 2 curriculum stages"),
        (dict(max_iter=2.5), "max_iter must be an integer"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(diffusivity=-1.0), "diffusivity must be finite and > 0"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(boundary="sticky"), "Invalid boundary"),
        (dict(grid_resolution=0), "grid_resolution must be an integer"),
        (dict(grid_size=float("nan")), "grid_size must be finite"),
        (dict(stages=(dict(iterations=3, sequences=(2,)),)), "sequence rank 2"),
        (dict(noise="poisson"), "Invalid noise"),
        # Options the configuration would ignore are refused, not dropped.
        (dict(preset="paper", sigma=0.5), "sigma.*no effect"),
        (dict(preset="paper", search_starts=4), "search_starts.*no effect"),
        (dict(seed=1), "seed is now init_seed"),
        (dict(preset="paper", init_seed=1), "init_seed.*no effect"),
        (dict(device="mps"), "device"),
        (dict(sigma=30.0), "sigma must be"),
    ],
)
def test_bad_model_options(gtab, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpinverseModel(gtab, grid_resolution=kwargs.pop("grid_resolution", 2), **kwargs)


def test_default_preset_keeps_the_search_labels(gtab, grid, signal):
    """Smoke test of the label search through the DIPY layer (a few steps)."""
    model = SpinverseModel(gtab, grid=grid, max_iter=4, search_steps=3, search_starts=2)
    assert model.has_labels
    one = model.fit(signal * 1000.0)
    assert one.labels.shape == (grid.n_cells,)
    assert set(np.unique(one.labels)) <= {0, 1}
    # The membranes are the interface of the labels: closed by construction.
    assert_array_equal(one.barrier, grid.interface_faces(one.labels > 0))
    volume = model.fit(np.stack([signal * 1000.0] * 2))
    assert_array_equal(volume.labels[0], one.labels)


def test_one_diffusion_time(grid, signal):
    """Most DIPY datasets: one big_delta / small_delta for the whole table."""
    table = gradient_table(
        BVALS[:3], bvecs=BVECS[:3], big_delta=0.04, small_delta=SMALL
    )
    for preset in ("paper", "default"):
        model = SpinverseModel(table, grid=grid, preset=preset, max_iter=4)
        assert len(model.sequences) == 1 and len(model.config.stages) == 1
    fit = SpinverseModel(table, grid=grid, **FAST).fit(500.0 * signal[:3])
    assert fit.status == OK and fit.predict().shape == (3,)


def test_grid_and_grid_options_are_exclusive(gtab, grid):
    with pytest.raises(ValueError, match="mutually exclusive"):
        SpinverseModel(gtab, grid=grid, grid_size=10.0)
    with pytest.raises(ValueError, match="grid must be a TetGrid"):
        SpinverseModel(gtab, grid="bcc")


def test_missing_timing():
    table = gradient_table(BVALS, bvecs=BVECS)
    with pytest.raises(ValueError, match="big_delta is None.*gradient timing"):
        SpinverseModel(table)


def test_bvecs_honour_the_tables_own_tolerance():
    """DIPY checked |bvec| against the table's atol; the model only renormalises.

    (The workflow's --bvecs_tol reaches gradient_table's atol and is not
    overridden by a tolerance of the model's own.)
    """
    table = gradient_table(
        BVALS, bvecs=1.5 * BVECS, atol=1.0, big_delta=BIG, small_delta=SMALL
    )
    model = SpinverseModel(table, **FAST)
    weighted = model.protocol.bvals > 0
    assert_allclose(np.linalg.norm(model.protocol.bvecs[weighted], axis=1), 1.0)
    bvecs = BVECS.copy()
    bvecs[1] = 0.0  # b = 1000 with no direction
    table = gradient_table(
        BVALS, bvecs=bvecs, atol=1.0, big_delta=BIG, small_delta=SMALL
    )
    with pytest.raises(ValueError, match="no direction.*volume 1"):
        SpinverseModel(table, **FAST)


def test_no_b0():
    table = gradient_table(
        BVALS + 500,
        bvecs=np.tile([1.0, 0, 0], (6, 1)),
        big_delta=BIG,
        small_delta=SMALL,
        b0_threshold=50,
    )
    with pytest.raises(ValueError, match="no b=0 volume"):
        SpinverseModel(table)


def test_sequence_without_b0_warns():
    bvals = BVALS.copy()
    bvals[3] = 1000
    bvecs = BVECS.copy()
    bvecs[3] = [1, 0, 0]
    table = gradient_table(bvals, bvecs=bvecs, big_delta=BIG, small_delta=SMALL)
    with pytest.warns(UserWarning, match="no b=0 volume of their own"):
        SpinverseModel(table, grid_resolution=2)


def test_not_a_gradient_table():
    with pytest.raises(ValueError, match="GradientTable"):
        SpinverseModel(BVALS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_device(gtab):
    with pytest.raises(ValueError, match="no CUDA device"):
        SpinverseModel(gtab, grid_resolution=2, device="cuda")


def test_bad_fit_input(model, volume):
    data, mask = volume
    with pytest.raises(ValueError, match="last axis of data"):
        model.fit(data[..., :5])
    with pytest.raises(ValueError, match="mask has shape"):
        model.fit(data, mask=mask[:1])
    with pytest.raises(ValueError, match="Invalid engine"):
        model.fit(data, engine="spark")
    with pytest.raises(ValueError, match="n_jobs must be"):
        model.fit(data, engine="joblib", n_jobs=0)
    with pytest.raises(ValueError, match="numeric array"):
        model.fit(np.array(["a"] * 6))
    with pytest.raises(ValueError, match="vox_per_chunk"):
        model.fit(data, vox_per_chunk=0)


def test_missing_engine_package(model, volume, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "ray" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match="needs the ray package"):
        model.fit(volume[0], engine="ray")


# -- options ------------------------------------------------------------------------
def test_max_iter_scales_the_curriculum(gtab):
    model = SpinverseModel(gtab, grid_resolution=2, max_iter=31)
    stages = model.config.stages
    assert sum(s.iterations for s in stages) == 31 == model.n_iterations
    assert [s.iterations for s in stages] == [16, 15]
    assert model.config.warmup == 4  # 25 of 200 iterations, scaled
    stages = (dict(iterations=30, sequences=(0,)), dict(iterations=10, sequences="all"))
    custom = SpinverseModel(
        gtab, grid_resolution=2, max_iter=10, warmup=3, stages=stages
    )
    assert [s.iterations for s in custom.config.stages] == [7, 3]
    assert custom.config.warmup == 3
    assert SpinverseModel(gtab, grid_resolution=2).n_iterations == 200
    paper = SpinverseModel(gtab, grid_resolution=2, preset="paper")
    assert paper.n_iterations == 400


def test_explicit_protocol(grid, signal, tmp_path):
    protocol = Protocol.pgse(BVALS[:3], BVECS[:3], small_delta=SMALL, big_delta=0.04)
    protocol = protocol + Protocol.pgse(
        BVALS[3:], BVECS[3:], small_delta=SMALL, big_delta=0.01
    )
    model = SpinverseModel(protocol, grid=grid, **FAST)
    assert_allclose(model.gtab.bvals, BVALS)
    fit = model.fit(np.stack([signal, 2 * signal]))
    assert_array_equal(fit.status, [OK, OK])
    path = save_fit(fit, tmp_path / "protocol_fit")
    assert path.endswith(".npz")
    loaded = load_fit(path)
    assert loaded.model.protocol.waveforms == protocol.waveforms
    assert_allclose(loaded.predict(), fit.predict())
