"""Smooth-mesh refinement of a Spinverse fit (meshfit.refine, refine_mesh=True).

Tiny settings throughout (48-cell grid, 6 volumes, resolution-2 meshes, a
few iterations): these tests check the plumbing and the physics of the
mixture, not the accuracy of a converged fit (doc/validation/mesh_inversion.md).
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from dipy_spinverse import SpinverseModel
from dipy_spinverse.inverse import resolve_config
from dipy_spinverse.meshfit import ball_mesh, fit_mesh, mesh_signal
from dipy_spinverse.meshfit.refine import (
    check_refine_options,
    largest_cell,
    refine_cell,
    refine_template,
)
from dipy_spinverse.reconst import MESH_FAILED, MESH_OK, refinement

TINY = dict(resolution=2, n_modes=1, max_iter=3, surface_iter=20)


def test_refine_options_are_checked():
    assert check_refine_options()["template"] == "ball"
    with pytest.raises(ValueError, match="unknown mesh_options"):
        check_refine_options(dict(modes=3))
    with pytest.raises(ValueError, match="Invalid template"):
        check_refine_options(dict(template="torus"))
    with pytest.raises(ValueError, match="resolution"):
        check_refine_options(dict(resolution=1))
    with pytest.raises(ValueError, match="add template='tube'"):
        check_refine_options(dict(code="axon"))
    with pytest.raises(ValueError, match="Invalid code"):
        check_refine_options(dict(code="latent"))
    with pytest.raises(ValueError, match="axon_periods"):
        check_refine_options(dict(template="tube", code="axon", axon_periods=[0]))


def test_model_checks_refine_mesh(gtab, grid):
    with pytest.raises(ValueError, match=r"label search \(search_steps > 0\)"):
        SpinverseModel(gtab, grid=grid, preset="paper", refine_mesh=True)
    with pytest.raises(ValueError, match="refine_mesh=True with them"):
        SpinverseModel(gtab, grid=grid, preset="paper", mesh_options=TINY)
    with pytest.raises(ValueError, match="refine_mesh must be True or False"):
        SpinverseModel(
            gtab,
            grid=grid,
            preset=resolve_config("default", search_steps=3),
            refine_mesh="yes",
        )
    plain = SpinverseModel(gtab, grid=grid, preset="paper")
    assert plain.refine_mesh is False and plain.mesh_tets is None


def test_tube_template_follows_the_label_axis():
    # Points of a 3 x 3 x 12 um box along (1, 1, 0) / sqrt 2: the tube lies
    # along that axis, as long as the points' extent, of the given volume.
    rng = np.random.default_rng(0)
    axis = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    points = rng.uniform(-1, 1, (400, 3)) * [1.5, 1.5, 6.0]
    basis = np.stack([[1, -1, 0] / np.sqrt(2), [0, 0, 1], axis])
    points = points @ basis + 5.0
    tube = refine_template("tube", points, 100.0, resolution=2, layers=4)
    assert_allclose(tube.volume, 100.0, rtol=1e-9)
    _, _, vt = np.linalg.svd(tube.vertices - tube.vertices.mean(0))
    _, _, principal = np.linalg.svd(points - points.mean(0))
    # Exactly the points' principal axis (which is the box's to 0.03%).
    assert abs(vt[0] @ principal[0]) == pytest.approx(1.0, abs=1e-9)
    assert abs(vt[0] @ axis) == pytest.approx(1.0, abs=1e-3)
    assert_allclose(tube.vertices.mean(0), points.mean(0), atol=0.3)


def test_background_mixture_weighs_by_volume():
    # With a background signal the model is f S_mesh + (1 - f) background,
    # f = mesh volume / box volume: at the first iteration (the template
    # itself) the prediction is that mixture exactly.
    from dipy_spinverse.sim.sequences import Protocol

    protocol = Protocol.pgse(
        [0.0, 1000.0, 3000.0],
        [[0, 0, 0], [1, 0, 0], [0, 1, 0]],
        small_delta=0.005,
        big_delta=0.02,
    )
    mesh = ball_mesh(3.0, resolution=2)
    cell = mesh_signal(mesh, protocol, length_scale=2.0).numpy()  # fit_mesh's
    background = np.array([1.0, 0.3, 0.05])
    box = 4.0 * mesh.volume
    fit = fit_mesh(
        np.ones(3),
        protocol,
        template=mesh,
        n_modes=1,
        max_iter=1,
        background=background,
        box_volume=box,
    )
    assert_allclose(fit.predicted_signal, 0.25 * cell + 0.75 * background, rtol=1e-10)
    with pytest.raises(ValueError, match="go together"):
        fit_mesh(np.ones(3), protocol, template=mesh, background=background)


def test_refine_cell_starts_from_the_label_surface(grid, truth, signal, gtab):
    inside, permeability = truth
    labels = inside.astype(int)
    assert largest_cell(grid, labels) == 1
    fit = refine_cell(grid, labels, permeability, signal * 1000.0, gtab, options=TINY)
    # The mesh is placed on the label (box centre 4, 4, 4) with about its
    # volume (the label's 128 um^3, from a start matched to its surface).
    assert_allclose(fit.vertices.mean(0), 4.0, atol=0.5)
    assert fit.volume == pytest.approx(grid.cell_volumes[inside].sum(), rel=0.3)
    assert fit.n_inverted == 0 and fit.kind == "ball"
    with pytest.raises(ValueError, match="no cell with label 2"):
        refine_cell(grid, labels, permeability, signal, gtab, label=2)


@pytest.fixture(scope="module")
def refined(gtab, grid, signal):
    model = SpinverseModel(
        gtab,
        grid=grid,
        max_iter=4,
        preset=resolve_config("default", search_steps=3, search_starts=2),
        refine_mesh=True,
        mesh_options=TINY,
    )
    return model, model.fit(np.stack([signal * 1000.0] * 2)[:, None, None])


def test_spinverse_fit_exposes_the_smooth_mesh(refined, tmp_path):
    model, fit = refined
    assert fit.shape == (2, 1, 1)
    n_vertices = int(model.mesh_tets.max()) + 1
    assert fit.mesh_vertices.shape == (2, 1, 1, n_vertices, 3)
    assert np.all(fit.mesh_status == MESH_OK)
    one = fit[0, 0, 0]
    mesh = one.smooth_mesh
    assert mesh.n_tets == len(model.mesh_tets)
    # The derived maps are the mesh's own measures.
    assert one.mesh_volume == pytest.approx(mesh.volume)
    assert one.mesh_surface_to_volume == pytest.approx(mesh.surface_area / mesh.volume)
    radius = (3 * mesh.volume / (4 * np.pi)) ** (1 / 3)
    assert one.mesh_radius == pytest.approx(radius)
    assert_allclose(fit.mesh_volume[:, 0, 0], one.mesh_volume)
    from dipy_spinverse.io.meshes import load_mesh
    from dipy_spinverse.io.surfaces import save_smooth_mesh

    paths = save_smooth_mesh(fit, tmp_path / "meshes", ext=".ply")
    assert sorted(paths) == [(0, 0, 0), (1, 0, 0)]

    loaded = load_mesh(paths[(0, 0, 0)])
    assert len(loaded.triangles) == len(one.mesh_faces)


def test_smooth_meshes_are_saved_and_loaded(refined, tmp_path):
    from dipy_spinverse.io.fits import load_fit, save_fit

    model, fit = refined
    loaded = load_fit(save_fit(fit, tmp_path / "fit.npz"))
    assert loaded.model.refine_mesh and loaded.model.mesh_options == model.mesh_options
    assert_allclose(loaded.mesh_vertices, fit.mesh_vertices)
    assert_allclose(loaded.mesh_volume, fit.mesh_volume)
    assert np.array_equal(loaded.mesh_status, fit.mesh_status)
    # The refinement is a setting of the model: a fit started without it is
    # not continued with it (the voxels left would have meshes, the others
    # not), nor with other mesh options.
    assert loaded.model.differences(model) == []
    plain = SpinverseModel(
        model.gtab,
        grid=model.grid,
        max_iter=4,
        preset=resolve_config("default", search_steps=3, search_starts=2),
    )
    assert plain.differences(model) == ["refine_mesh", "mesh_options"]
    other = SpinverseModel(
        model.gtab,
        grid=model.grid,
        max_iter=4,
        preset=resolve_config("default", search_steps=3, search_starts=2),
        refine_mesh=True,
        mesh_options={**TINY, "n_modes": TINY["n_modes"] + 1},
    )
    assert other.differences(model) == ["mesh_options"]


def test_a_failing_refinement_flags_the_mesh_only(refined, signal, monkeypatch):
    model, _ = refined

    def broken(*args, **kwargs):
        raise RuntimeError("mesh blew up")

    monkeypatch.setattr(refinement, "refine_cell", broken)
    with pytest.warns(RuntimeWarning, match="mesh blew up"):
        fit = model.fit(signal * 1000.0)
    # The voxel keeps its fit (its status is the search's: without sigma,
    # UNCERTAIN_SURFACE); only its mesh is flagged.
    assert fit.fitted
    assert fit.mesh_status == MESH_FAILED
    assert fit.smooth_mesh is None and np.isnan(fit.mesh_volume)
    assert np.isfinite(fit.permeability).all()


def test_axon_code_refines_a_tilted_label_in_its_frame():
    # A rod of cells along a tilted axis (1, 1, 1) / sqrt 3: the axon code
    # (a straight tube along z) is fitted in the label's principal frame,
    # with the gradients rotated into it, and the mesh moved back. Checked:
    # the mesh lies along the label's axis, and its signal under the
    # original protocol, mixed with the rest of the box as the fit mixes
    # it, is the fit's predicted signal (to rounding): the frame's rotation
    # is applied to the gradients the right way round.
    from dipy_spinverse import TetGrid, simulate
    from dipy_spinverse.meshfit.refine import _principal_frame
    from dipy_spinverse.sim.sequences import Protocol, fibonacci_sphere
    from dipy_spinverse.sim.signals import normalise_b0

    grid = TetGrid.bcc(12.0, 3)
    axis = np.ones(3) / np.sqrt(3.0)
    offset = grid.cell_centroids - 6.0
    radial = offset - np.outer(offset @ axis, axis)
    inside = (np.linalg.norm(radial, axis=1) < 2.6) & (np.abs(offset @ axis) < 5.0)
    permeability = np.where(grid.interface_faces(inside), 1e-5, 0.1)
    dirs = fibonacci_sphere(6)
    protocol = Protocol.pgse(
        np.r_[0.0, [2000.0] * 6],
        np.r_[[[0.0, 0.0, 0.0]], dirs],
        small_delta=0.005,
        big_delta=0.02,
    )
    signal = simulate(grid, permeability, protocol).numpy()
    options = dict(TINY, template="tube", code="axon", axon_periods=(), layers=4)
    options.pop("n_modes")
    fit = refine_cell(
        grid, inside.astype(int), permeability, signal, protocol, options=options
    )
    assert fit.kind == "tube" and fit.n_inverted == 0
    assert fit.axon_parameters is not None
    points = fit.mesh.vertices[fit.mesh.boundary_vertices]
    label_axis = _principal_frame(grid.cell_centroids[inside])[0][2]
    mesh_axis = _principal_frame(points)[0][2]
    assert abs(mesh_axis @ label_axis) == pytest.approx(1.0, abs=1e-2)
    assert abs(label_axis @ axis) == pytest.approx(1.0, abs=0.05)
    rest = simulate(grid, permeability, protocol, initial=~inside).numpy()
    cell = mesh_signal(fit.mesh, protocol, length_scale=2.0).numpy()
    fraction = fit.volume / grid.volume
    mixed = fraction * cell + (1.0 - fraction) * normalise_b0(rest, protocol)
    assert_allclose(fit.predicted_signal, mixed, atol=1e-6)


def test_a_tangled_start_is_halved_towards_the_template():
    # A label's surface can ask for more displacement than the template's
    # tetrahedra take; the refinement then starts part of the way there
    # instead of failing (fit_mesh refuses an inverting start).
    from dipy_spinverse.meshfit import spectral_shape
    from dipy_spinverse.meshfit.refine import _untangled_start

    shape = spectral_shape(ball_mesh(4.0, resolution=2), n_modes=4)
    wild = np.r_[40.0, -35.0, 30.0, 25.0]
    assert shape.n_inverted(wild) > 0
    start = _untangled_start(shape, wild)
    assert shape.n_inverted(start) == 0
    ratio = start / wild
    assert np.all(ratio == ratio[0]) and 0 < ratio[0] < 1
    # A start that inverts nothing is kept as it is.
    assert_allclose(_untangled_start(shape, start), start)


def test_a_cell_filling_the_box_is_refined_alone():
    # Every grid cell in the one cell: there is no background to mix with,
    # and the fit runs on the cell alone (it raised before: "background and
    # box_volume go together").
    from dipy.core.gradients import gradient_table

    from dipy_spinverse import TetGrid, simulate

    bvals = np.array([0, 1000, 3000, 0, 1000, 3000], float)
    bvecs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]] * 2, float)
    gtab = gradient_table(
        bvals,
        bvecs=bvecs,
        big_delta=np.array([0.04] * 3 + [0.01] * 3),
        small_delta=0.005,
    )
    grid = TetGrid.bcc(8.0, 2)
    permeability = np.full(grid.n_faces, 1e-5)
    signal = simulate(grid, permeability, gtab).numpy() * 1000
    options = dict(resolution=2, n_modes=1, max_iter=2, surface_iter=10)
    fit = refine_cell(
        grid, np.ones(grid.n_cells, int), permeability, signal, gtab, options=options
    )
    assert 0 < fit.volume <= 1.1 * grid.volume


def test_the_box_must_hold_the_cell():
    from dipy_spinverse.sim.sequences import Protocol

    protocol = Protocol.pgse(
        [0.0, 2000.0], [[0, 0, 0], [1, 0, 0]], small_delta=0.01, big_delta=0.03
    )
    with pytest.raises(ValueError, match="box_volume=10 um\\^3 is not larger"):
        fit_mesh(
            [1.0, 0.9],
            protocol,
            template=ball_mesh(3.0, resolution=2),
            background=[1.0, 0.5],
            box_volume=10.0,
        )
