"""Outputs: atomic files, mesh formats (PLY, VTK XML, GIFTI), the combined
surface of a volume in scanner coordinates, and the workflow's outputs."""

import os

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import TetGrid
from dipy_spinverse.files import atomic_write
from dipy_spinverse.interface import barrier_mesh, load_mesh, write_mesh
from dipy_spinverse.phantoms import sphere


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
    read = meshio.read(tmp_path / "a.ply")
    assert_array_equal(read.cell_data["face"][0], mesh.face_ids)
    assert_array_equal(read.cell_data["wall"][0], mesh.face_ids < 0)


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
