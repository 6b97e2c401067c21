"""Outputs: atomic files, mesh formats (PLY, VTK XML, GIFTI), the combined
surface of a volume in scanner coordinates, and the workflow's outputs."""

import os
import xml.etree.ElementTree as ET

import nibabel as nib
import numpy as np
import pytest
from conftest import SMALL_DEMO
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import TetGrid
from dipy_spinverse.data import make_phantom_dataset
from dipy_spinverse.files import atomic_write
from dipy_spinverse.geometry.phantoms import sphere
from dipy_spinverse.geometry.topology import InterfaceMesh, barrier_mesh
from dipy_spinverse.io.maps import save_map, save_permeability, save_predicted
from dipy_spinverse.io.meshes import load_mesh, write_mesh
from dipy_spinverse.io.surfaces import (
    place_in_voxel,
    remove_voxel_meshes,
    save_interface,
    save_voxel_meshes,
    volume_surface,
)
from dipy_spinverse.reconst import MASKED, OK, SpinverseFit
from dipy_spinverse.reconst.search_model import SpinverseSearchModel
from dipy_spinverse.workflows import outputs
from dipy_spinverse.workflows.report import write_report
from dipy_spinverse.workflows.spinverse import SpinverseFlow


@pytest.fixture(scope="module")
def mesh():
    grid = TetGrid.bcc(80 / 3, 4)
    return barrier_mesh(grid, sphere(grid, radius=8).barrier, cap_wall=True)


def _data(mesh):
    faces = dict(
        face=mesh.face_ids,
        permeability=np.where(mesh.face_ids < 0, np.nan, 1e-5),
        wall=mesh.face_ids < 0,
    )
    vertices = dict(voxel=np.arange(mesh.n_vertices), value=np.linspace(0, 1, 50))
    return faces, vertices


# -- atomic writes --------------------------------------------------------------
def test_atomic_write_replaces_whole_files_only(tmp_path):
    target = tmp_path / "sub" / "map.nii.gz"
    with atomic_write(target) as tmp:
        assert os.path.dirname(tmp) == str(target.parent)
        assert tmp.endswith("map.nii.gz")  # writers pick the format from it
        with open(tmp, "w") as f:
            f.write("new")
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "new"  # the old file, untouched
    assert os.listdir(target.parent) == ["map.nii.gz"]  # no temporary left
    with pytest.raises(OSError, match="nothing was written"):
        with atomic_write(tmp_path / "never.txt"):
            pass


# -- mesh formats ----------------------------------------------------------------
@pytest.mark.parametrize(
    "name, binary",
    [("m.ply", True), ("m.ply", False), ("m.vtp", True), ("m.gii", True)],
)
def test_mesh_formats_round_trip(tmp_path, mesh, name, binary):
    faces, vertices = _data(mesh)
    path = write_mesh(
        tmp_path / name,
        mesh.vertices,
        mesh.triangles,
        face_data=faces,
        vertex_data=vertices,
        binary=binary,
    )
    back = load_mesh(path)
    # GIFTI stores float32 coordinates: 1e-6 relative of a 27 um box.
    assert_allclose(back.vertices, mesh.vertices, atol=3e-5 if "gii" in name else 0)
    assert_array_equal(back.triangles, mesh.triangles)
    assert os.listdir(tmp_path) == [name]


@pytest.mark.parametrize("name", ["m.vtp", "m.vtk", "m.ply"])
def test_mesh_comments_keep_the_file_readable(tmp_path, mesh, name):
    # "--" cannot stand in an XML comment (it is written "- -" in .vtp), and
    # a PLY comment or a VTK title is one header line.
    path = write_mesh(
        tmp_path / name, mesh.vertices, mesh.triangles, comment="run --sigma 0.01"
    )
    assert_array_equal(load_mesh(path).triangles, mesh.triangles)
    with pytest.raises(ValueError, match="comment must be one line"):
        write_mesh(tmp_path / name, mesh.vertices, mesh.triangles, comment="a\nb")


def test_gifti_is_a_surface_in_scanner_space(tmp_path, mesh):
    nib = pytest.importorskip("nibabel")
    write_mesh(tmp_path / "s.gii", mesh.vertices, mesh.triangles, scanner=True)
    image = nib.load(tmp_path / "s.gii")
    intents = [nib.nifti1.intent_codes.label[a.intent] for a in image.darrays]
    assert intents == ["pointset", "triangle"]
    assert image.darrays[0].coordsys.dataspace == 1  # NIFTI_XFORM_SCANNER_ANAT
    write_mesh(tmp_path / "u.gii", mesh.vertices, mesh.triangles)
    assert nib.load(tmp_path / "u.gii").darrays[0].coordsys.dataspace == 0


def test_ply_is_read_by_meshio_and_trimesh(tmp_path, mesh):
    meshio = pytest.importorskip("meshio")
    trimesh = pytest.importorskip("trimesh")
    faces, vertices = _data(mesh)
    write_mesh(tmp_path / "b.ply", mesh.vertices, mesh.triangles, vertex_data=vertices)
    write_mesh(
        tmp_path / "a.ply",
        mesh.vertices,
        mesh.triangles,
        face_data=faces,
        vertex_data=vertices,
        binary=False,
    )
    for name in ("a.ply", "b.ply"):
        read = meshio.read(tmp_path / name)
        assert_allclose(read.points, mesh.vertices)
        assert_array_equal(read.cells_dict["triangle"], mesh.triangles)
        assert_array_equal(read.point_data["voxel"], vertices["voxel"])
        loaded = trimesh.load(tmp_path / name, process=False)
        assert_array_equal(loaded.faces, mesh.triangles)
    # meshio 5 writes no PLY face properties: face data goes to .vtp only.
    assert meshio.read(tmp_path / "a.ply").cell_data == {}


def test_vtp_is_read_by_vtk(tmp_path, mesh):
    pytest.importorskip("vtkmodules")
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

    faces, vertices = _data(mesh)
    write_mesh(
        tmp_path / "m.vtp",
        mesh.vertices,
        mesh.triangles,
        face_data=faces,
        vertex_data=vertices,
    )
    reader = vtkXMLPolyDataReader()
    reader.SetFileName(str(tmp_path / "m.vtp"))
    reader.Update()
    polydata = reader.GetOutput()
    assert_allclose(vtk_to_numpy(polydata.GetPoints().GetData()), mesh.vertices)
    connectivity = vtk_to_numpy(polydata.GetPolys().GetConnectivityArray())
    assert_array_equal(connectivity.reshape(-1, 3), mesh.triangles)
    cells = polydata.GetCellData()
    for name, values in faces.items():
        assert_array_equal(vtk_to_numpy(cells.GetArray(name)), values, err_msg=name)
    voxel = vtk_to_numpy(polydata.GetPointData().GetArray("voxel"))
    assert_array_equal(voxel, vertices["voxel"])


def test_no_empty_mesh_file(tmp_path, mesh):
    for ext in (".ply", ".vtp", ".gii", ".vtk"):
        with pytest.raises(ValueError, match="no triangles; no file"):
            write_mesh(tmp_path / f"e{ext}", np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="one value per triangle"):
        write_mesh(
            tmp_path / "x.vtp", mesh.vertices, mesh.triangles, face_data=dict(a=[1])
        )
    with pytest.raises(ValueError, match="unknown mesh format"):
        write_mesh(tmp_path / "x.stl", mesh.vertices, mesh.triangles)
    assert os.listdir(tmp_path) == []


# -- the combined surface of a volume, in scanner coordinates ---------------------
@pytest.fixture(scope="module")
def barrier_fit(model, truth):
    """A 2 x 2 x 1 volume fit without fitting: the ball in (0, 0, 0), a slab
    against the box's wall in (1, 0, 0), no barrier in (0, 1, 0), (1, 1, 0)
    outside the mask."""
    grid = model.grid
    permeability = np.broadcast_to(truth[1], (2, 2, 1, len(truth[1]))).copy()
    permeability[0, 1, 0] = 0.1
    slab = grid.cell_centroids[:, 0] < 3.0
    permeability[1, 0, 0] = np.where(grid.interface_faces(slab), 2e-5, 0.1)
    status = np.full((2, 2, 1), OK)
    status[1, 1, 0] = MASKED
    return _fit_of(model, permeability, status)


def _fit_of(model, permeability, status):
    """A SpinverseFit of given face fields and status (6 volumes, 2
    sequences; MASKED voxels outside the mask), without fitting."""
    shape = status.shape
    params = dict(
        permeability=permeability,
        labels=None,
        predicted=np.ones(shape + (6,)),
        S0=np.ones(shape),
        S0_sequences=np.ones(shape + (2,)),
        loss=np.zeros(shape),
        status=status,
    )
    return SpinverseFit(model, params, status != MASKED)


# A rotation, anisotropic voxels (1 x 2 x 3 mm) and a shift, as an oblique scan.
_ANGLE = 0.3
_ROTATION = np.array(
    [
        [np.cos(_ANGLE), -np.sin(_ANGLE), 0],
        [np.sin(_ANGLE), np.cos(_ANGLE), 0],
        [0, 0, 1],
    ]
)
AFFINE = np.eye(4)
AFFINE[:3, :3] = _ROTATION @ np.diag([1.0, 2.0, 3.0])
AFFINE[:3, 3] = [-90.0, 12.0, 30.0]


def test_place_in_voxel_maps_the_box_onto_the_voxel():
    size = 8.0
    corners = np.array([[0, 0, 0], [8, 8, 8], [4, 4, 4], [8, 0, 0]], float)
    placed = place_in_voxel(corners, (3, 1, 2), size=size, affine=AFFINE)
    # Reference: voxel coordinates of the corners (index -/+ 1/2, the centre
    # at the index) through the affine, written out.
    expected = [
        AFFINE @ [2.5, 0.5, 1.5, 1],
        AFFINE @ [3.5, 1.5, 2.5, 1],
        AFFINE @ [3, 1, 2, 1],
        AFFINE @ [3.5, 0.5, 1.5, 1],
    ]
    assert_allclose(placed, np.array(expected)[:, :3], atol=1e-12)
    # 2-D volumes: the missing index is 0.
    assert_allclose(place_in_voxel(corners[2:3], (3, 1), size=size), [[3, 1, 0]])


def test_volume_surface_places_each_voxel(barrier_fit):
    surface = volume_surface(barrier_fit, affine=AFFINE)
    size = barrier_fit.model.grid.size
    voxels = [(0, 0, 0), (1, 0, 0)]  # with a barrier, in index order
    flat = [np.ravel_multi_index(v, (2, 2, 1)) for v in voxels]
    assert_array_equal(np.unique(surface.face_data["voxel"]), flat)
    start = 0
    for index, voxel in zip(voxels, flat, strict=True):
        mesh = barrier_fit[index].interface_mesh
        rows = surface.vertex_data["voxel"] == voxel
        assert_allclose(
            surface.vertices[rows],
            place_in_voxel(mesh.vertices, index, size=size, affine=AFFINE),
        )
        faces = surface.face_data["voxel"] == voxel
        assert_array_equal(surface.triangles[faces], mesh.triangles + start)
        start += mesh.n_vertices
    # Inside the voxels' extent: voxel coordinates within index -/+ 1/2.
    voxel_coords = (surface.vertices - AFFINE[:3, 3]) @ np.linalg.inv(AFFINE[:3, :3]).T
    assert voxel_coords.min() >= -0.5 - 1e-9 and voxel_coords.max() <= 1.5 + 1e-9
    perm = surface.face_data["permeability"]
    wall = surface.face_data["wall"].astype(bool)
    ball = surface.face_data["voxel"] == flat[0]
    assert_allclose(perm[ball], 1e-5)
    assert_allclose(perm[~ball & ~wall], 2e-5)
    assert wall.any() and np.all(np.isnan(perm[wall]))
    assert np.all(~wall[ball])  # the ball does not reach the wall
    # The slab is one compartment, closed by the wall.
    assert_array_equal(surface.face_data["compartment"][~ball], 1)
    assert set(np.unique(surface.face_data["compartment"])) <= set(range(1, 13))


@pytest.mark.parametrize("mirror", [False, True])
def test_volume_surface_keeps_normals_outward(barrier_fit, mirror):
    affine = AFFINE @ np.diag([-1.0 if mirror else 1.0, 1, 1, 1])
    surface = volume_surface(barrier_fit, affine=affine)
    combined = InterfaceMesh(surface.vertices, surface.triangles)
    # Each voxel's closed surface, scaled by the affine's volume factor over
    # the box volume: the enclosed volume in mm^3, positive (outward normals)
    # whichever way the affine turns.
    size = barrier_fit.model.grid.size
    scale = abs(np.linalg.det(affine[:3, :3])) / size**3
    meshes = [barrier_fit[index].interface_mesh for index in [(0, 0, 0), (1, 0, 0)]]
    expected = sum(mesh.volume for mesh in meshes) * scale
    assert_allclose(combined.volume, expected, rtol=1e-10)
    assert expected > 0


def test_surface_files_and_no_empty_file(barrier_fit, tmp_path):
    meshio = pytest.importorskip("meshio")
    surface = volume_surface(barrier_fit, affine=AFFINE)
    for name in ("s.gii", "s.ply", "s.vtp"):
        back = load_mesh(surface.save(tmp_path / name))
        assert_allclose(back.vertices, surface.vertices, atol=1e-4)
        assert_array_equal(back.triangles, surface.triangles)
    read = meshio.read(tmp_path / "s.ply")
    assert_array_equal(read.point_data["voxel"], surface.vertex_data["voxel"])
    empty = barrier_fit[0:1, 1:2]  # the voxel without a barrier
    nothing = volume_surface(empty)
    assert nothing.n_triangles == 0
    with pytest.raises(ValueError, match="no triangles"):
        nothing.save(tmp_path / "e.gii")
    assert not os.path.exists(tmp_path / "e.gii")


def test_voxel_meshes_only_where_a_barrier_is(barrier_fit, tmp_path):
    folder = tmp_path / "voxels"
    paths = save_voxel_meshes(barrier_fit, folder)
    assert sorted(os.listdir(folder)) == ["voxel_0_0_0.vtp", "voxel_1_0_0.vtp"]
    mesh = barrier_fit[0, 0, 0].interface_mesh
    back = load_mesh(paths[(0, 0, 0)])
    assert_allclose(back.vertices, mesh.vertices)  # micrometres, as fitted
    (folder / "notes.txt").write_text("mine")
    (folder / "voxel_5_5_5.ply").write_text("stale")
    removed = remove_voxel_meshes(folder)
    assert len(removed) == 3 and os.listdir(folder) == ["notes.txt"]
    with pytest.raises(ValueError, match="ext must be"):
        save_voxel_meshes(barrier_fit, folder, ext=".vtk")


# -- NIfTI images and the report, atomically -----------------------------------------
def test_nifti_images_are_written_atomically(barrier_fit, tmp_path, monkeypatch):
    import nibabel as nib

    path = save_map(barrier_fit, "status", tmp_path / "status.nii.gz")
    before = open(path, "rb").read()
    real = nib.Nifti1Image.to_filename

    def interrupted(image, fname, **kwargs):
        real(image, fname, **kwargs)
        with open(fname, "r+b") as f:  # half written when the run dies
            f.truncate(100)
        raise KeyboardInterrupt

    real_header = nib.Nifti1Header.write_to

    def header_then_interrupted(header, fileobj):
        real_header(header, fileobj)  # images streamed a volume at a time
        raise KeyboardInterrupt

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", interrupted)
    monkeypatch.setattr(nib.Nifti1Header, "write_to", header_then_interrupted)
    for save in (
        lambda: save_map(barrier_fit, "status", path),
        lambda: save_predicted(barrier_fit, path),
        lambda: save_permeability(barrier_fit, path),
    ):
        with pytest.raises(KeyboardInterrupt):
            save()
        assert open(path, "rb").read() == before
        assert os.listdir(tmp_path) == ["status.nii.gz"]


def test_report_shows_the_maps(barrier_fit, tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    path = write_report(barrier_fit, None, tmp_path / "report.png", n_voxels=0)
    # The maps' row alone: 11 x 2.6 inches at 80 dpi.
    assert plt.imread(path).shape[:2] == (208, 880)
    assert os.listdir(tmp_path) == ["report.png"]


def test_report_shows_the_slice_with_the_most_fitted_voxels():
    """A whole-brain mask's middle slice can hold no fitted voxel (the
    report's maps were blank): the slice shown is the fullest one."""
    from types import SimpleNamespace

    from dipy_spinverse.workflows.report import _shown_slice, _slice

    fitted = np.zeros((4, 3, 5), bool)
    fitted[1:3, :, 1] = True
    fitted[0, 0, 4] = True
    picks = _shown_slice(SimpleNamespace(fitted=fitted))
    assert picks == [1]
    np.testing.assert_array_equal(_slice(fitted, picks), fitted[:, :, 1])
    assert _shown_slice(SimpleNamespace(fitted=np.zeros((2, 2, 5), bool))) == [2]
    assert _shown_slice(SimpleNamespace(fitted=np.ones((2, 3), bool))) == []


# -- the workflow's outputs ----------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_phantom_dataset(tmp_path_factory.mktemp("demo"), **SMALL_DEMO)


def _run(demo, out_dir, **kwargs):
    options = dict(
        timing_file=demo["timing"],
        grid_size=SMALL_DEMO["grid_size"],
        grid_resolution=SMALL_DEMO["grid_resolution"],
        max_iter=2,
        preset="paper",  # the face fit alone: fast
        n_report=0,
        out_dir=str(out_dir),
    )
    options.update(kwargs)
    flow = SpinverseFlow(force=True)
    flow.run(demo["data"], demo["bvals"], demo["bvecs"], demo["mask"], **options)
    return flow.last_generated_outputs


def test_every_output_goes_to_its_own_path(demo, tmp_path):
    paths = dict(
        out_status="maps/status_map.nii.gz",
        out_s0="other/s0_estimate.nii.gz",
        out_mesh_gifti="surf/cells.gii",
        out_mesh_ply="surf/cells.ply",
        out_report="figures/fit.png",
        out_state="state/fit.npz",
    )
    outputs = _run(demo, tmp_path, n_report=1, **paths)
    for key, name in paths.items():
        assert os.fspath(outputs[key]) == str(tmp_path / name)
        assert os.path.isfile(tmp_path / name), key
    names = set(os.listdir(tmp_path))
    assert "status.nii.gz" not in names and "s0.nii.gz" not in names
    assert {"restricted_fraction.nii.gz", "predicted.nii.gz"} <= names
    assert not any(
        name.startswith(".tmp-") for _, _, files in os.walk(tmp_path) for name in files
    )
    affine = nib.load(demo["data"]).affine
    surface = load_mesh(tmp_path / "surf/cells.gii")
    # Scanner coordinates: within the volume's extent through the affine.
    voxels = (surface.vertices - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    assert voxels.min() >= -0.5 - 1e-4
    assert np.all(voxels.max(0) <= np.array([3, 2, 1]) - 0.5 + 1e-4)


def test_save_metrics_chooses_the_outputs(demo, tmp_path):
    outputs = _run(demo, tmp_path, save_metrics=["s0", "status"])
    outputs_written = [
        name
        for name in os.listdir(tmp_path)
        if name.endswith((".nii.gz", ".gii", ".ply", ".png"))
    ]
    assert sorted(outputs_written) == ["s0.nii.gz", "status.nii.gz"]
    assert os.path.isfile(outputs["out_state"])  # always: it marks a finished run
    assert_array_equal(np.asanyarray(nib.load(outputs["out_status"]).dataobj), OK)
    with pytest.raises(ValueError, match="Invalid --save_metrics entry 'fa'"):
        _run(demo, tmp_path / "bad", save_metrics=["fa"])
    assert not os.path.exists(tmp_path / "bad")  # refused before fitting


def test_voxel_meshes_and_stale_meshes(demo, tmp_path, monkeypatch, caplog):
    folder = tmp_path / "voxel_meshes"
    folder.mkdir()
    (folder / "voxel_7_7_7.vtp").write_text("left by an earlier run")
    (folder / "voxel_7_7_7.ply").write_text("left by an earlier run")
    outputs = _run(demo, tmp_path, voxel_meshes=True, save_metrics=["mesh"])
    files = sorted(os.listdir(folder))
    assert files and all(f.endswith(".vtp") for f in files)
    assert "voxel_7_7_7.vtp" not in files
    for name in files:
        assert load_mesh(folder / name).n_triangles > 0
    assert os.path.isfile(outputs["out_mesh_gifti"])
    # A rerun where no voxel has a barrier: no mesh file at all, and the
    # previous run's meshes are gone.
    real = SpinverseSearchModel.fit

    def without_barriers(self, *args, **kwargs):
        fit = real(self, *args, **kwargs)
        fit.params["permeability"][...] = 1.0  # far above any barrier
        return fit

    monkeypatch.setattr(SpinverseSearchModel, "fit", without_barriers)
    caplog.set_level("INFO", logger="dipy")
    outputs = _run(demo, tmp_path, voxel_meshes=True, save_metrics=["mesh"])
    assert os.listdir(folder) == []
    assert not os.path.exists(outputs["out_mesh_gifti"])
    assert not os.path.exists(outputs["out_mesh_ply"])
    assert "no mesh file written" in caplog.text


def test_save_interface_writes_no_empty_file(barrier_fit, tmp_path):
    paths = save_interface(barrier_fit, tmp_path / "meshes")
    assert sorted(paths) == [(0, 0, 0), (1, 0, 0)]
    assert sorted(os.listdir(tmp_path / "meshes")) == [
        "voxel_0_0_0.vtp",
        "voxel_1_0_0.vtp",
    ]
    assert save_interface(barrier_fit[0, 1, 0], tmp_path / "none.ply") is None
    assert not os.path.exists(tmp_path / "none.ply")


def test_barriers_of_many_voxels_are_written_in_slabs(model, truth, tmp_path):
    """Beyond ``max_voxels`` fitted voxels the barrier surfaces go to one file
    per slab of slices, listed in a JSON index; together they hold every
    triangle of the single surface, and a rerun with one slab removes them."""
    import json

    from dipy_spinverse.io.surfaces import surface_slabs

    save_surface = outputs.save_surface  # the command's mesh output
    grid = model.grid
    n = len(truth[1])
    permeability = np.broadcast_to(truth[1], (1, 1, 3, n)).copy()
    fit = _fit_of(model, permeability, np.full((1, 1, 3), OK))
    assert surface_slabs(fit, 2) == [(0, 1), (2, 2)]
    assert surface_slabs(fit, 5) == [(0, 2)]
    out = {
        "out_mesh_gifti": str(tmp_path / "barriers.gii"),
        "out_mesh_ply": str(tmp_path / "barriers.ply"),
    }
    written = save_surface(fit, out, affine=np.eye(4), max_voxels=2)
    index = json.loads((tmp_path / "barriers.json").read_text())
    assert [s["slices"] for s in index["slabs"]] == [[0, 1], [2, 2]]
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["barriers.json"]
        + [f"barriers_z{a}.{e}" for a in ("000-001", "002-002") for e in ("gii", "ply")]
    )
    whole = volume_surface(fit, affine=np.eye(4))
    parts = [load_mesh(tmp_path / f"barriers_z{a}.ply") for a in ("000-001", "002-002")]
    assert sum(p.n_triangles for p in parts) == whole.n_triangles
    assert len(written) == 5
    save_surface(fit, out, affine=np.eye(4), max_voxels=10)
    assert sorted(os.listdir(tmp_path)) == ["barriers.gii", "barriers.ply"]
    assert grid.n_faces == n


def test_volume_surface_files_carry_vertex_data_and_ras(barrier_fit, tmp_path):
    """The GIFTI holds the per-vertex voxel index and permeability as named
    data arrays beside the geometry (read back with nibabel); the PLY and
    VTP files say SPACE=RAS where Slicer reads it (a PLY comment, a string
    array in the VTP field data), which it needs to place them unmirrored."""
    import nibabel as nib

    surface = volume_surface(barrier_fit, affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    gifti = nib.load(surface.save(tmp_path / "b.gii"))
    named = {a.meta.get("Name"): a.data for a in gifti.darrays if a.meta.get("Name")}
    assert_array_equal(named["voxel"], surface.vertex_data["voxel"])
    assert_allclose(
        named["permeability"], surface.vertex_data["permeability"], rtol=1e-6
    )
    back = load_mesh(tmp_path / "b.gii")  # the geometry by intent, as before
    assert back.n_triangles == surface.n_triangles
    head = open(surface.save(tmp_path / "b.ply"), "rb").read(2000)
    assert b"\ncomment SPACE=RAS\n" in head.split(b"end_header")[0]
    root = ET.parse(surface.save(tmp_path / "b.vtp")).getroot()
    (space,) = root.findall("PolyData/FieldData/Array[@Name='SPACE']")
    # "RAS" as VTK writes a string array in ASCII: character codes, then 0.
    assert space.get("type") == "String" and space.text.split() == "82 65 83 0".split()
