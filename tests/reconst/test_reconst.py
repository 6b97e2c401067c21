"""SpinverseModel / SpinverseFit: DIPY conformance, bad input, save/load/resume.

Tiny settings throughout (48-cell grid, 6 volumes, a few iterations): these
tests check the DIPY layer, which must be right whatever the inversion
returns, not the quality of the recovery.
"""

import inspect
import warnings

import numpy as np
import pytest
import torch
from conftest import BIG, BVALS, BVECS, FAST, SMALL, T2_WEIGHT  # noqa: E402
from dipy.core.gradients import gradient_table
from numpy.testing import assert_allclose, assert_array_equal
from scipy.stats import chi2

import dipy_spinverse.reconst.runner as runner
from dipy_spinverse import Protocol, TetGrid
from dipy_spinverse.geometry.phantoms import sphere
from dipy_spinverse.geometry.topology import InterfaceMesh
from dipy_spinverse.inverse import Noise, reconstruct, resolve_config
from dipy_spinverse.io.fits import load_fit, save_fit
from dipy_spinverse.io.maps import describe_status
from dipy_spinverse.io.meshes import load_mesh
from dipy_spinverse.io.surfaces import save_interface
from dipy_spinverse.reconst import (
    BAD_B0,
    DIVERGED,
    FAILED,
    IMPOSSIBLE_SIGNAL,
    MASKED,
    NONFINITE,
    OK,
    POOR_FIT,
    STATUS_CODES,
    UNCERTAIN_SURFACE,
    UNDERDETERMINED,
    SpinverseFit,
    SpinverseModel,
    SpinverseSearchModel,
)
from dipy_spinverse.reconst.progress import chunk_progress
from dipy_spinverse.reconst.status import poor_fit_bound
from dipy_spinverse.reconst.surfaces import (
    SURFACE_MISFIT_FALSE_ALARM,
    flag_uncertain_surfaces,
    vouch_for_surfaces,
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
    # The stored loss is the inversion's own data term (no second, different
    # recomputation): the same fit through reconstruct() gives it.
    rec = reconstruct(
        model.grid, raw, model.protocol, preset=model.config, dtype=model.dtype
    )
    assert_allclose(fit.loss, rec.loss, rtol=1e-5)
    assert len(fit.history["total"]) == 4
    # predict() uses the FITTED S0, sequence by sequence (T2 weighting).
    predicted = fit.predict()
    assert predicted.shape == (6,)
    assert_allclose(predicted[[0, 3]], raw[[0, 3]])
    assert_allclose(fit.predict(S0=1.0)[[0, 3]], 1.0)
    # Re-simulating the same acquisitions matches the stored prediction.
    assert_allclose(fit.predict(model.gtab), predicted, rtol=1e-8)
    # sigma unknown: the fit's misfit is the b0-normalised signal's,
    # unweighted (each sequence over its own b = 0).
    own_b0 = np.repeat(raw[[0, 3]], 3)
    rms = np.sqrt(np.mean(((predicted - raw) / own_b0) ** 2))
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


def test_model_predict_is_dipys_predict_of_permeability_fields(model, signal):
    """model.predict(params, S0) as DIPY's models have it: the fit's own
    prediction from its permeability, any batch shape, S0 per field."""
    raw = 700.0 * T2_WEIGHT * signal
    fit = model.fit(np.stack([raw, raw]))
    normalised = model.predict(fit.permeability)
    assert normalised.shape == (2, len(BVALS))
    assert_allclose(normalised, fit.predict(S0=1.0), rtol=1e-10)
    one = model.predict(fit.permeability[0], S0=700.0)
    assert_allclose(one, 700.0 * normalised[0], rtol=1e-12)
    batch = np.broadcast_to(fit.permeability[0], (3, 1, model.grid.n_faces))
    scaled = model.predict(batch, S0=np.array([1.0, 2.0, 3.0])[:, None])
    assert scaled.shape == (3, 1, len(BVALS))
    assert_allclose(scaled[2, 0], 3.0 * normalised[0], rtol=1e-12)
    other = gradient_table(
        np.array([0, 2000]),
        bvecs=np.array([[0, 0, 0], [0, 0, 1.0]]),
        big_delta=0.03,
        small_delta=SMALL,
    )
    assert model.predict(fit.permeability, other).shape == (2, 2)
    with pytest.raises(ValueError, match=r"grid's \d+ faces in its last axis"):
        model.predict(fit.permeability[:, :-1])
    with pytest.raises(ValueError, match="S0 must be a number or one per field"):
        model.predict(fit.permeability, S0=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="S0 must be finite"):
        model.predict(fit.permeability, S0=-1.0)
    with pytest.raises(ValueError, match="permeability must be in"):
        model.predict(-fit.permeability)


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
        loss=0.25 * model.config.loss.loss_scale,
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
        save_interface(fit, tmp_path / f"mesh{ext}")
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
        save_interface(failed, tmp_path / "x.ply")


def test_single_voxel_problems_do_not_raise(model, signal):
    bad = signal.copy()
    bad[2] = np.nan
    fit = model.fit(bad)
    assert fit.status == NONFINITE
    assert np.all(np.isnan(fit.permeability)) and np.isnan(fit.S0)
    assert np.all(np.isnan(fit.predict()))
    assert np.isnan(fit.restricted_fraction) and fit.interface_mesh is None
    with pytest.warns(UserWarning, match="1 of 1 voxels have negative samples"):
        assert model.fit(-signal).status == BAD_B0


def test_a_signal_that_overflows_once_normalised_is_flagged(gtab, grid, signal):
    """b = 0 of 1e-310 (or 1e-40 with float32 fits) against diffusion-weighted
    values of 1: finite data whose normalised signal is not; flagged
    NONFINITE before the inversion, without a retry or a warning naming the
    permeability, and the other voxels fitted."""
    model = SpinverseModel(gtab, grid=grid, **FAST)  # float32
    b0 = model.protocol.bvals == 0
    tiny = [np.where(b0, scale, 1.0) for scale in (1e-310, 1e-40)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no retry of the batch, no warning
        fit = model.fit(np.stack([signal, *tiny, signal]))
    assert_array_equal(fit.status, [OK, NONFINITE, NONFINITE, OK])
    with pytest.raises(ValueError, match=r"voxel\(s\) \[0\] overflows .*b = 0"):
        reconstruct(model.grid, tiny[0][None], model.protocol)


def test_negative_samples_are_fitted_as_given_with_a_warning(gtab, grid, signal):
    """Denoised data can dip below 0: counted, named, never clipped."""
    data = np.stack([signal, signal, signal])
    data[1, 1] = -0.01  # one diffusion-weighted sample of one voxel
    model = SpinverseModel(gtab, grid=grid, **FAST)
    with pytest.warns(UserWarning, match="1 of 3 voxels have negative") as caught:
        fit = model.fit(data)
    assert caught[0].filename == __file__  # points at the user's fit call
    assert np.all(fit.status == OK)
    # The Rician floor describes magnitude data: said where it is used.
    rician = SpinverseModel(
        gtab,
        grid=grid,
        preset=resolve_config("default", search_steps=1, search_starts=1),
        sigma=0.01,
        max_iter=2,
    )
    with pytest.warns(UserWarning, match="noise='gaussian'"):
        rician.fit(data[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(signal)


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
    for bad, match in ((np.ones(3), "S0 has shape"), (-5.0, "S0 must be finite")):
        with pytest.raises(ValueError, match=match):
            fit.predict(S0=bad)
    # Only the predicted voxels' S0 matter: a map NaN outside the mask (the
    # fit's own S0 map, or another model's) is taken.
    s0_map[~mask] = np.nan
    assert_allclose(fit.predict(S0=s0_map)[mask][:, 0], 3.0)
    s0_map[mask.nonzero()[0][0], mask.nonzero()[1][0], 0] = np.nan
    with pytest.raises(ValueError, match=r"got nan at voxel \("):
        fit.predict(S0=s0_map)


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
    assert fit[1, 1, 0].status == MASKED  # masked, as DIPY's MultiVoxelFit
    # Negative indices count from the end, as numpy's; outside is IndexError.
    assert_array_equal(fit[-1, 0, -1].permeability, fit.permeability[1, 0, 0])
    with pytest.raises(IndexError, match="out of bounds for axis 0"):
        fit[2, 0, 0]
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
def test_parallel_engines_agree_with_serial(
    model, volume, volume_fit, engine, monkeypatch
):
    """DIPY's multi_voxel_fit: joblib, and dask on local threads (without the
    distributed package; clusters are tested in tests/test_clusters.py)."""
    pytest.importorskip(engine)
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "distributed" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    data, mask = volume
    fit = model.fit(data, mask=mask, engine=engine, n_jobs=2, vox_per_chunk=2)
    assert_array_equal(fit.status, volume_fit.status)
    assert_allclose(fit.permeability, volume_fit.permeability, rtol=1e-6)
    assert_allclose(fit.predict(), volume_fit.predict(), rtol=1e-8)


def test_verbose_progress_bar(model, volume, capsys):
    data, mask = volume
    model.fit(data[:1], mask=mask[:1], verbose=True)
    err = capsys.readouterr().err
    assert "Fitting Spinverse" in err and "2.0/2" in err


def test_progress_moves_within_a_chunk(gtab, grid):
    """Not 0/6 until a chunk of 6 ends: the face fit moves the bar iteration by
    iteration; with the label search, half of a voxel's share is its search,
    added when the search reports that voxel done; search steps are counted."""
    import io

    from tqdm import tqdm

    searching = SpinverseModel(
        gtab, grid=grid, max_iter=4, preset=resolve_config("default", search_steps=3)
    )
    face_only = SpinverseModel(gtab, grid=grid, **FAST)
    for model, after_face in ((face_only, 6.0), (searching, 3.0)):
        bar = tqdm(total=6, file=io.StringIO())
        shown = [0.0]
        callback = chunk_progress(bar, model.config, 6, shown)
        callback(0, None, {"data": 0.1})
        assert_allclose(bar.n, after_face / model.n_iterations)
        for i in range(1, model.n_iterations):
            callback(i, None, {"data": 0.1})
        assert_allclose(bar.n, after_face)
        callback(0, None, {"search": 0.2, "voxel": 4})
        callback(1, None, {"search": 0.1, "voxel": 4})
        assert "label search: 2 steps" in bar.postfix
        callback(-1, None, {"voxel_done": 4})
        assert_allclose(bar.n, min(6.0, after_face + 0.5))
        assert shown[0] == bar.n


def test_per_voxel_problems_never_stop_a_volume(model, signal, monkeypatch):
    data = np.stack([signal * 100.0] * 6).reshape(3, 2, 1, 6)
    data[0, 0, 0, 1] = np.nan
    data[0, 1, 0, 4] = np.inf
    data[1, 0, 0, [0, 3]] = 0.0
    data[1, 1, 0, 2] = 123.0  # marker: this voxel's inversion raises
    data[2, 0, 0, 2] = 321.0  # marker: this voxel diverges
    real = runner.reconstruct

    def flaky(grid, signal, protocol, **kwargs):
        # The runner passes the voxels normalised once (b = 0 of 100).
        marker = signal.normalised[:, 2]
        if np.any(np.isclose(marker, 1.23)):
            raise RuntimeError("solver blew up")
        result = real(grid, signal, protocol, **kwargs)
        result.permeability[np.isclose(marker, 3.21)] = np.nan
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
        (dict(options=dict(contnuity=1.0)), "Unknown option"),
        (
            dict(
                max_iter=1,
                options=dict(stages=(dict(iterations=3, sequences=(0,)),) * 2),
            ),
            "fewer than the 2 curriculum stages given",
        ),
        (dict(max_iter=2.5), "max_iter must be an integer"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(diffusivity=-1.0), "diffusivity must be finite and > 0"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(grid=dict(boundary="sticky")), "Invalid grid boundary"),
        (dict(grid=dict(resolution=0)), "grid resolution must be an integer"),
        (dict(grid=dict(resolution=1)), "grid resolution must be an integer >= 2"),
        (
            dict(grid=dict(wall_permeability=0.5)),
            "grid wall_permeability applies to.*absorbing",
        ),
        (dict(grid=dict(size=float("nan"))), "grid size must be finite"),
        # float() would read these as numbers.
        (dict(grid=dict(size="10")), "grid size must be a number"),
        (dict(grid=dict(size=True)), "grid size must be a number"),
        (dict(grid=dict(n=4)), r"unknown setting\(s\) \['n'\].*'size', 'resolution'"),
        (dict(grid="bcc"), "grid must be a TetGrid or a dict"),
        (dict(dtype=None), "dtype must be one of"),
        (dict(refine_mesh=True, mesh_options="ball"), "mesh_options must be a dict"),
        (
            dict(options=dict(stages=(dict(iterations=3, sequences=(2,)),))),
            "sequence rank 2",
        ),
        (dict(options=dict(noise="poisson")), "Invalid noise"),
        # Options the configuration would ignore are refused, not dropped.
        (dict(preset="paper", sigma=0.5), "sigma.*no effect"),
        (
            dict(preset="paper", options=dict(search_starts=4)),
            "search_starts.*no effect",
        ),
        (
            dict(preset="paper", options=dict(search_bootstrap=2)),
            "search_bootstrap.*no effect",
        ),
        (
            dict(options=dict(search_bootstrap=-1)),
            "search_bootstrap must be an integer >= 0",
        ),
        # The keywords of earlier versions: where each now belongs.
        (
            dict(search_steps=0),
            r"pass preset=resolve_config\('default', search_steps=\.\.\.\)",
        ),
        (dict(grid_size=10.0), r"pass grid=dict\(size=\.\.\.\)"),
        (
            dict(n_posterior_samples=10),
            r"use fit_method='posterior' or 'protocol_free' if they are its",
        ),
        (dict(device="mps"), "device"),
        (dict(sigma=-30.0), "sigma must be"),
    ],
)
def test_bad_model_options(gtab, kwargs, match):
    # grid: the BCC grid's settings; options: the inversion's, in the
    # configuration that ``preset`` takes.
    grid = kwargs.pop("grid", {})
    grid = {"resolution": 2, **grid} if isinstance(grid, dict) else grid
    options = kwargs.pop("options", None)
    with pytest.raises(ValueError, match=match):
        if options is not None:
            kwargs["preset"] = resolve_config(
                kwargs.pop("preset", "default"), **options
            )
        SpinverseModel(gtab, grid=grid, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_says_so_in_words_a_flag_also_fits(gtab):
    # The same message reaches the command line's --device: no "device='cpu'".
    with pytest.raises(ValueError, match="no CUDA device is available here; use "):
        SpinverseModel(gtab, grid=dict(resolution=2), device="cuda")


def test_default_preset_keeps_the_search_labels(gtab, grid, signal):
    """Smoke test of the label search through the DIPY layer (a few steps)."""
    model = SpinverseModel(
        gtab,
        grid=grid,
        max_iter=4,
        preset=resolve_config("default", search_steps=3, search_starts=2),
    )
    assert model.has_labels
    one = model.fit(signal * 1000.0)
    assert one.labels.shape == (grid.n_cells,)
    # Labels 0 .. n_cells, each a cell; membranes between different labels
    # (closed by construction).
    assert set(np.unique(one.labels)) == set(range(int(one.n_cells) + 1))
    labels = one.labels
    between = labels[grid.face_cells[:, 0]] != labels[grid.face_cells[:, 1]]
    assert_array_equal(one.barrier, between)
    volume = model.fit(np.stack([signal * 1000.0] * 2))
    assert_array_equal(volume.labels[0], one.labels)
    # Per-cell tables: volumes add up to the labelled cells, areas to the
    # membranes; the probabilities and the uncertainty are probabilities.
    n = int(one.n_cells)
    assert one.cell_volumes.shape == (n,) and volume.cell_volumes.shape == (2, n)
    assert_allclose(one.cell_volumes.sum(), grid.cell_volumes[labels > 0].sum())
    assert one.cell_surface_areas.sum() >= grid.face_areas[between].sum()
    assert np.all((one.cell_permeability > 0) & (one.cell_permeability < 1e-3))
    assert one.inside_probability.shape == (grid.n_cells,)
    assert np.all((one.inside_probability >= 0) & (one.inside_probability <= 1))
    assert 0 <= one.uncertainty <= 1 and volume.uncertainty.shape == (2,)
    assert one.proposal_probability is None  # no learned proposal asked for
    # A masked voxel has no cells: empty tables of the same rank.
    masked = model.fit(signal * 1000.0, mask=False)
    for name in ("cell_volumes", "cell_surface_areas", "cell_permeability"):
        assert getattr(masked, name).shape == (0,)
    # With labels, the compartment maps are the labelled cells'.
    assert one.n_compartments == one.n_cells
    assert_allclose(
        one.restricted_fraction, grid.cell_volumes[labels > 0].sum() / grid.volume
    )
    # Cell counts are integers: 0 outside the mask, -1 where not fitted.
    assert isinstance(one.n_cells, int) and masked.n_cells == 0
    assert volume.n_cells.dtype.kind == "i"
    partial = model.fit(np.stack([signal * 1000.0, np.nan * signal]))
    assert_array_equal(partial.n_cells, [one.n_cells, -1])
    # ... and so are the labels: all 0 outside the mask, -1 where not fitted.
    assert np.all(partial.labels[1] == -1)
    outside = model.fit(np.stack([signal, signal]) * 1000.0, mask=[True, False])
    assert_array_equal(outside.n_cells, [one.n_cells, 0])
    assert np.all(outside.labels[1] == 0)
    assert_array_equal(outside.labels.max(-1), outside.n_cells)
    # numpy's reading of a bool index (a new axis), not voxel (1, ...).
    assert volume[True, 0].shape == (1,)
    # Per-cell maps of a masked voxel are NaN, in a volume or alone.
    assert np.isnan(masked.inside_probability).all()
    assert masked.inside_probability.shape == (grid.n_cells,)


def test_one_diffusion_time(grid, signal):
    """Most DIPY datasets: one big_delta / small_delta for the whole table."""
    table = gradient_table(
        BVALS[:3], bvecs=BVECS[:3], big_delta=0.04, small_delta=SMALL
    )
    for preset in ("paper", "default"):
        model = SpinverseModel(table, grid=grid, preset=preset, max_iter=4)
        assert len(model.sequences) == 1 and len(model.config.face.stages) == 1
    fit = SpinverseModel(table, grid=grid, **FAST).fit(500.0 * signal[:3])
    # Fitted, and flagged: one diffusion time cannot determine the membranes.
    assert fit.status == UNDERDETERMINED and fit.predict().shape == (3,)


def test_grid_is_a_tetgrid_or_the_bcc_grids_settings(gtab, grid):
    assert SpinverseModel(gtab, grid=grid).grid is grid
    coarse = SpinverseModel(gtab, grid=dict(size=10.0, resolution=2)).grid
    assert coarse.size == 10.0 and coarse.n_cells == 48
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
        SpinverseModel(table, grid=dict(resolution=2))


def test_not_a_gradient_table():
    with pytest.raises(ValueError, match="GradientTable"):
        SpinverseModel(BVALS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_device(gtab):
    with pytest.raises(ValueError, match="no CUDA device"):
        SpinverseModel(gtab, grid=dict(resolution=2), device="cuda")


@pytest.mark.gpu
def test_volume_fit_on_cuda_matches_cpu(volume_fit, volume, gtab, grid):
    """The same fit on the GPU: float64 throughout, so only the order of the
    floating-point sums differs (reductions on the GPU are reordered); 4 Adam
    steps amplify a 1e-15 difference to ~1e-9 at most, hence rtol 1e-6."""
    data, mask = volume
    on_gpu = SpinverseModel(gtab, grid=grid, dtype="float64", device="cuda", **FAST)
    fit = on_gpu.fit(data, mask=mask)
    assert_array_equal(fit.status, volume_fit.status)
    assert_allclose(fit.permeability, volume_fit.permeability, rtol=1e-6)
    assert_allclose(fit.S0, volume_fit.S0, rtol=1e-12)


@pytest.mark.gpu
def test_label_search_on_cuda_matches_cpu(gtab, grid, signal):
    """The label search scores its candidates on the GPU; in float64 every
    loss agrees with the CPU's to ~1e-12, far below the gaps between
    candidates, so the labels found are the same."""
    config = resolve_config("default", search_steps=3, search_starts=2)
    options = dict(grid=grid, dtype="float64", max_iter=4, preset=config)
    cpu = SpinverseModel(gtab, **options).fit(signal * 1000.0)
    gpu = SpinverseModel(gtab, device="cuda", **options).fit(signal * 1000.0)
    assert_array_equal(gpu.labels, cpu.labels)
    assert_allclose(gpu.cell_permeability, cpu.cell_permeability, rtol=1e-6)


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
    with pytest.raises(ValueError, match="complex.*np.abs"):
        model.fit(data.astype(complex))
    with pytest.raises(ValueError, match="vox_per_chunk"):
        model.fit(data, vox_per_chunk=0)
    with pytest.raises(ValueError, match="n_jobs=2 is for the parallel engines"):
        model.fit(data, n_jobs=2)
    with pytest.raises(ValueError, match="mask holds NaN"):
        model.fit(data, mask=np.where(mask, 1.0, np.nan))
    with pytest.raises(ValueError, match="mask holds fractions"):
        model.fit(data, mask=np.where(mask, 1.0, 0.4))


def test_one_voxel_checks_the_volume_options(model, volume, capsys):
    """Options of a volume fit are checked for one voxel too (not ignored),
    and a checkpoint or resume, which need a volume, is refused."""
    voxel = volume[0][0, 0, 0]
    with pytest.raises(ValueError, match="Invalid engine"):
        model.fit(voxel, engine="spark")
    with pytest.raises(ValueError, match="n_jobs must be"):
        model.fit(voxel, engine="joblib", n_jobs=0)
    with pytest.raises(ValueError, match="vox_per_chunk"):
        model.fit(voxel, vox_per_chunk=-3)
    with pytest.raises(ValueError, match="address.*engine='ray'"):
        model.fit(voxel, address="auto")
    with pytest.raises(ValueError, match=r"volume fits.*data\[None\]"):
        model.fit(voxel, checkpoint=lambda fit: None)
    with pytest.raises(ValueError, match="volume fits"):
        model.fit(voxel, resume=object())
    fit = model.fit(voxel, verbose=True)
    assert fit.status == OK
    assert "Fitting Spinverse" in capsys.readouterr().err


def test_joblib_moves_the_bar_one_round_of_workers_at_a_time(
    model, volume, monkeypatch
):
    """Without a checkpoint too, the joblib engine fits one chunk per worker
    per call, so that the progress bar moves while the volume is fitted."""
    pytest.importorskip("joblib")
    data, mask = volume
    sizes = []
    real = runner._fit_parallel

    def counted(model, data, **kwargs):
        sizes.append(len(data))
        return real(model, data, **kwargs)

    monkeypatch.setattr(runner, "_fit_parallel", counted)
    fit = model.fit(data, mask=mask, engine="joblib", n_jobs=1, vox_per_chunk=1)
    assert sizes == [1, 1, 1]
    assert fit.n_pending == 0


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
    model = SpinverseModel(gtab, grid=dict(resolution=2), max_iter=31)
    stages = model.config.face.stages
    assert sum(s.iterations for s in stages) == 31 == model.n_iterations
    assert [s.iterations for s in stages] == [16, 15]
    assert model.config.face.warmup == 4  # 25 of 200 iterations, scaled
    stages = (dict(iterations=30, sequences=(0,)), dict(iterations=10, sequences="all"))
    # A warm-up of its own is kept when the configuration is scaled with it;
    # the model's max_iter scales the configuration's whole curriculum.
    config = resolve_config("default", warmup=3, stages=stages, max_iter=10)
    custom = SpinverseModel(gtab, grid=dict(resolution=2), preset=config)
    assert [s.iterations for s in custom.config.face.stages] == [7, 3]
    assert custom.config.face.warmup == 3
    config = resolve_config("default", warmup=8, stages=stages)
    scaled = SpinverseModel(gtab, grid=dict(resolution=2), preset=config, max_iter=10)
    assert [s.iterations for s in scaled.config.face.stages] == [7, 3]
    assert scaled.config.face.warmup == 2  # 8 of 40 iterations, scaled
    assert SpinverseModel(gtab, grid=dict(resolution=2)).n_iterations == 200
    # Fewer iterations than the preset's stages: one stage over everything,
    # as on a protocol of one diffusion time.
    one = SpinverseModel(gtab, grid=dict(resolution=2), max_iter=1)
    assert [(s.iterations, s.sequences) for s in one.config.face.stages] == [(1, "all")]
    paper = SpinverseModel(gtab, grid=dict(resolution=2), preset="paper")
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


# -- bad input, refused when the model is built or the voxel fitted -------------------
@pytest.mark.parametrize(
    "bvals, threshold, match",
    [
        ([0, -1000, 3000] * 2, 50, r"negative.*Fix the b-value file"),
        ([0, 1e9, 3e9] * 2, 50, r"look like s/m\^2 .*: divide them by 1e6"),
        ([0, 1, 3] * 2, 50, r"no diffusion-weighted volume.*multiply them by 1,000"),
        ([0, 1, 3] * 2, 0, r"look like ms/um\^2 .*: multiply them by 1,000"),
        ([0, 0, 0] * 2, 50, r"no diffusion-weighted volume"),
    ],
)
def test_bvals_in_the_wrong_unit_fail_when_the_model_is_built(bvals, threshold, match):
    table = gradient_table(
        np.array(bvals, float),
        bvecs=BVECS,
        big_delta=BIG,
        small_delta=SMALL,
        b0_threshold=threshold,
    )
    with pytest.raises(ValueError, match=r"gtab\.bvals has .*" + match):
        SpinverseModel(table, grid=dict(resolution=2), **FAST)


def test_protocol_bvals_in_the_wrong_unit_fail_when_the_model_is_built():
    for bvals, match in (([0, 1e9, 3e9], r"s/m\^2"), ([0, 0, 0], "no diffusion")):
        protocol = Protocol.pgse(bvals, BVECS[:3], small_delta=SMALL, big_delta=0.04)
        with pytest.raises(ValueError, match=match):
            SpinverseModel(protocol, grid=dict(resolution=2), **FAST)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        # A device torch cannot use.
        (dict(device="mps"), "device 'mps' is not supported; use device 'cpu'"),
        (dict(device="xpu"), "device 'xpu' is not supported; use device 'cpu'"),
        # The optimiser: negative or non-numeric.
        (dict(lr=-0.1), "lr must be a finite number and >= 0, got -0.1"),
        (dict(lr=0.0), "lr must be > 0, got 0"),
        (dict(lr="0.1"), "lr must be a finite number"),
        # Iterations.
        (dict(max_iter=0), "max_iter must be an integer >= 1"),
        (dict(max_iter="4"), "max_iter must be an integer >= 1"),
        (dict(warmup=-1), "warmup must be an integer >= 0"),
        (dict(stages=[dict(iterations=0)]), "stage iterations must be an integer"),
        (dict(stages=[dict(iterations=2.5)]), "stage iterations must be an integer"),
        # Malformed stages.
        (dict(stages=[5]), r"each stage must be a Stage or a dict\(iterations="),
        (dict(stages=[dict(iters=3)]), "each stage must be a Stage or a dict"),
        (dict(stages=[dict(iterations=3, order=1)]), r"unknown key\(s\) \['order'\]"),
        (dict(stages=[dict(iterations=3, sequences=5)]), "'all' or a tuple of"),
        (dict(stages=[dict(iterations=3, sequences=(-1,))]), "sequence rank must"),
        (dict(stages=[dict(iterations=3, sequences=())]), "at least one rank"),
        (dict(stages=[dict(iterations=3, sequences=(5,))]), "uses sequence rank 5"),
        # The initial permeability (log10 m/s) outside its bounds.
        (dict(init_log_kappa=0.0), "init_log_kappa must lie strictly inside"),
        (dict(init_log_kappa=-6.0), "init_log_kappa must lie strictly inside"),
        (dict(init_log_kappa=1e-3), "init_log_kappa must lie strictly inside"),
        # sigma: of the wrong type or shape (in the data's units, any size).
        (dict(preset="default", sigma="0.03"), "sigma must be a finite number"),
        (dict(preset="default", sigma=True), "sigma must be a finite number"),
        (dict(preset="default", sigma=[[5.0]]), r"sigma must be .*data's units"),
        # A diffusivity in another unit than mm^2/s.
        (dict(diffusivity=2e-9), r"diffusivity=2e-09 .*m\^2/s: pass diffusivity=0.002"),
        (dict(diffusivity=2.0), r"um\^2/ms: pass diffusivity=0.002"),
        (dict(diffusivity=2000.0), r"um\^2/s: pass diffusivity=0.002"),
        (dict(diffusivity="2e-3"), r"diffusivity must be a number in mm\^2/s"),
    ],
)
def test_options_that_cannot_work_fail_when_the_model_is_built(gtab, kwargs, match):
    # The inversion's options go into the configuration (preset).
    takes = inspect.signature(SpinverseSearchModel).parameters
    options = {**FAST, **{k: v for k, v in kwargs.items() if k in takes}}
    inversion = {k: v for k, v in kwargs.items() if k not in takes}
    with pytest.raises(ValueError, match=match):
        if inversion:
            options["preset"] = resolve_config(options["preset"], **inversion)
        SpinverseModel(gtab, grid=dict(resolution=2), **options)


def test_plausible_diffusivities_are_accepted(gtab):
    # Fixed tissue at room temperature and free water at body temperature.
    for diffusivity in (1e-4, 3e-3):
        model = SpinverseModel(gtab, grid=dict(resolution=2), diffusivity=diffusivity)
        assert model.diffusivity == diffusivity


def test_mask_of_one_voxel_is_honoured(model, signal):
    raw = 700.0 * T2_WEIGHT * signal
    masked = model.fit(raw, mask=False)
    assert masked.shape == () and masked.status == MASKED
    assert masked.S0 == 0 and masked.restricted_fraction == 0
    assert np.all(np.isnan(masked.permeability)) and masked.interface_mesh is None
    assert_array_equal(masked.predict(), 0)  # outside the mask, as DIPY
    assert model.fit(raw, mask=np.bool_(True)).status == OK
    with pytest.raises(ValueError, match=r"mask has shape \(1,\).*a single bool"):
        model.fit(raw, mask=[True])


def test_a_masked_voxel_has_the_labels_of_a_masked_voxel_of_a_volume(
    gtab, grid, signal
):
    """0 outside the mask, one voxel or a volume; -1 means "not fitted"."""
    model = SpinverseModel(
        gtab,
        grid=grid,
        max_iter=2,
        preset=resolve_config("default", search_steps=2, search_starts=2),
    )
    raw = 700.0 * T2_WEIGHT * signal
    one = model.fit(raw, mask=False)
    volume = model.fit(np.stack([raw, raw]), mask=[False, False])
    assert one.n_cells == volume.n_cells[0] == 0
    assert_array_equal(one.labels, volume.labels[0])
    assert_array_equal(one.labels, np.zeros(grid.n_cells))


def test_absurd_fit_is_flagged_and_keeps_its_maps(grid, gtab, signal):
    """A voxel the model cannot produce: no attenuation at the long
    diffusion time, none left at the short one."""
    sigma = 0.1  # relative to the b = 0 signal, 700: 70 in the data's units
    options = dict(
        preset=resolve_config("paper", noise="rician"), max_iter=4, dtype="float64"
    )
    model = SpinverseModel(gtab, grid=grid, sigma=700.0 * sigma, **options)
    absurd = np.where(BVALS > 0, np.where(gtab.big_delta > 0.02, 1.0, 0.0), 1.0)
    data = 700.0 * np.stack([signal, absurd])
    fit = model.fit(data)
    assert_array_equal(fit.status, [OK, POOR_FIT])
    # chi-square with one degree of freedom per acquisition, false alarm 1e-6.
    bound = poor_fit_bound(len(BVALS), sigma)
    assert_allclose(bound, sigma**2 * chi2.isf(1e-6, len(BVALS)) / len(BVALS))
    assert fit.residual[0] ** 2 < bound < fit.residual[1] ** 2
    # A warning: the voxel keeps its outputs, and its maps are filled.
    assert np.isfinite(fit.permeability[1]).all() and fit.fitted.all()
    assert not fit.ok[1]
    for name in ("residual", "S0", "restricted_fraction", "surface_to_volume"):
        assert np.isfinite(getattr(fit, name)[1]), name
    assert np.isfinite(fit.predict()[1]).all()
    assert fit[1].interface_mesh is not None
    assert describe_status(fit.status) == {
        "ok": 1,
        "residual far above the noise": 1,
    }
    # Without a noise level (sigma 0: unknown) there is no bound to exceed.
    blind = SpinverseModel(gtab, grid=grid, preset="paper", max_iter=4)
    assert_array_equal(blind.fit(data).status, [OK, OK])
    # Diffusion weighting that raises the signal is impossible, with or
    # without a noise level: flagged, the outputs kept.
    rising = np.where(BVALS > 0, 2.5, signal)
    for sigma_given in (model, blind):
        fit = sigma_given.fit(700.0 * rising)
        assert fit.status == IMPOSSIBLE_SIGNAL and np.isfinite(fit.residual)


def test_the_misfit_test_is_the_noises_chi_square_quantile():
    """An answer is rejected when its mean squared misfit is above sigma^2
    chi2.isf(0.05, n) / n: of fits that explain the data (Gaussian noise of
    sigma on every acquisition) 5 % are, within sampling error (50,000
    draws: standard error 0.1 %, asserted within 0.4 %)."""
    n, sigma = 40, 0.02
    bound = poor_fit_bound(n, sigma, false_alarm=SURFACE_MISFIT_FALSE_ALARM)
    assert_allclose(bound, sigma**2 * chi2.isf(0.05, n) / n, rtol=1e-12)
    residual = sigma * np.random.default_rng(5).standard_normal((50_000, n))
    rejected = np.mean((residual**2).mean(1) > bound)
    assert abs(rejected - 0.05) < 0.004


def test_answers_the_data_reject_are_not_vouched_for(gtab, grid):
    """An answer whose misfit is beyond the noise gets uncertainty 1 (the
    labelling that made the data was not found), POOR_FIT ones included
    (they keep their status); within the noise the search's own stays."""
    sigma = 0.02
    model = SpinverseModel(
        gtab,
        grid=grid,
        max_iter=2,
        preset=resolve_config("default", search_steps=2),
        sigma=sigma,
    )
    # A fit of data of b = 0 signal 1: its level is sigma.
    bound = poor_fit_bound(len(BVALS), sigma, false_alarm=SURFACE_MISFIT_FALSE_ALARM)
    loss = model.config.loss.loss_scale * bound * np.array([0.5, 0.99, 1.01, 3, 3])
    result = dict(
        uncertainty=np.array([0.02, 0.3, 0.02, 0.05, 0.05]),
        loss=loss,
        status=np.array([OK, OK, OK, OK, POOR_FIT]),
    )
    vouch_for_surfaces(model.search_settings(), result, np.arange(5), level=sigma)
    assert_array_equal(result["uncertainty"], [0.02, 0.3, 1.0, 1.0, 1.0])
    flag_uncertain_surfaces(result, np.arange(5))
    assert_array_equal(
        result["status"],
        [OK, UNCERTAIN_SURFACE, UNCERTAIN_SURFACE, UNCERTAIN_SURFACE, POOR_FIT],
    )


def test_without_sigma_the_search_vouches_for_no_surface(gtab, grid, signal):
    """Without a noise level no misfit can be tested: the model says so when
    it is made, and every answer has uncertainty 1 and status
    UNCERTAIN_SURFACE (its maps kept)."""
    with pytest.warns(UserWarning, match="vouches for no surface.*Pass sigma"):
        model = SpinverseModel(
            gtab,
            grid=grid,
            max_iter=2,
            preset=resolve_config("default", search_steps=2),
        )
    fit = model.fit(700.0 * T2_WEIGHT * np.stack([signal, signal]))
    assert_array_equal(fit.uncertainty, [1.0, 1.0])
    assert_array_equal(fit.status, [UNCERTAIN_SURFACE, UNCERTAIN_SURFACE])
    assert fit.fitted.all() and np.isfinite(fit.restricted_fraction).all()
    # No label search, no surface to vouch for: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SpinverseModel(gtab, grid=grid, preset="paper", max_iter=2)


def test_cell_parametrisation_keeps_the_search_uncertainty(gtab, grid, signal):
    """The label search runs from the cell fit's labels: its uncertainty and
    inside probability are kept, as with the face fit's starts."""
    model = SpinverseModel(
        gtab,
        grid=grid,
        preset=resolve_config(
            "default", parametrisation="cell", search_steps=2, search_starts=1
        ),
        max_iter=3,
        sigma=10.0,  # SNR 100 of the b = 0 signal, 1000
    )
    fit = model.fit(np.stack([signal * 1000.0] * 2))
    assert fit.uncertainty is not None and fit.uncertainty.shape == (2,)
    assert np.all((fit.uncertainty >= 0) & (fit.uncertainty <= 1))
    assert fit.inside_probability.shape == (2, grid.n_cells)


def test_float32_fit_does_not_depend_on_the_raw_scale(gtab, grid, signal):
    """The signals are normalised in float64 and then cast: raw scales that
    float32 cannot hold (b = 0 of 1e-100 or 1e40; they failed the voxel)
    are fitted as the unit scale is."""
    model = SpinverseModel(
        gtab,
        grid=grid,
        max_iter=3,
        preset=resolve_config("default", search_steps=2, search_starts=1),
        dtype="float32",
    )
    fit = model.fit(np.stack([signal * s for s in (1e-100, 1.0, 1e40)]))
    assert fit.fitted.all()
    assert_array_equal(fit.status, fit.status[1])
    assert_array_equal(fit.labels[0], fit.labels[1])
    assert_array_equal(fit.labels[2], fit.labels[1])


def test_model_params_are_the_permeabilities_predict_takes(volume_fit):
    """DIPY's ``fit.model_params``: the per-face permeability field, which
    ``model.predict`` turns back into the fitted signal."""
    params = volume_fit.model_params
    assert params.shape == volume_fit.shape + (volume_fit.model.grid.n_faces,)
    index = tuple(int(i) for i in np.argwhere(volume_fit.fitted)[0])
    # b0-normalised (each sequence's own S0 is the fit's, not a parameter).
    predicted = volume_fit.model.predict(params[index], S0=1.0)
    assert np.allclose(predicted, volume_fit[index].params["predicted"], rtol=1e-5)


def test_mesh_refinement_gets_the_fits_noise_weights(monkeypatch):
    """refine_meshes hands each voxel's VoxelSignals, with the fit's noise
    precisions and level, to the mesh fit (whose loss weighs them:
    tests/meshfit)."""
    from types import SimpleNamespace

    import dipy_spinverse.reconst.refinement as refinement
    from dipy_spinverse.sim.signals import VoxelSignals

    prot = Protocol.pgse(
        np.r_[0.0, 0.0, 1000.0, 1000.0],
        np.r_[[[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]]],
        small_delta=0.01,
        big_delta=0.03,
    )
    signals = VoxelSignals.from_raw([[900.0, 800.0, 500.0, 400.0]] * 2, prot)
    noise = Noise(0.02, np.array([[1, 2, 3, 4.0]] * 2))
    seen = []

    def refine_cell(grid, labels, permeability, signal, protocol, **kwargs):
        seen.append((signal, kwargs["sigma"]))
        raise ValueError("seen")

    monkeypatch.setattr(refinement, "refine_cell", refine_cell)
    settings = SimpleNamespace(
        grid=None,
        protocol=prot,
        diffusivity=2e-3,
        mesh_options={},
        config=SimpleNamespace(loss=SimpleNamespace(noise="gaussian")),
    )
    result = dict(
        labels=np.array([[0, 1], [1, 1]]),
        permeability=np.zeros((2, 3)),
        mesh_status=np.zeros(2, np.int16),
    )
    with pytest.warns(RuntimeWarning, match="seen"):
        refinement.refine_meshes(settings, signals, noise, result, np.array([1]))
    ((signal, level),) = seen
    assert isinstance(signal, VoxelSignals) and level == 0.02
    assert_array_equal(signal.precision, noise.precision[[1]])
    assert_array_equal(signal.normalised, signals.normalised[[1]])
