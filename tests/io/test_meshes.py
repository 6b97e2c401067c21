"""Mesh files (io.meshes): each format read back by read_mesh and by the
readers users have (meshio and trimesh for PLY, nibabel for GIFTI, VTK where
installed), with the space stated where 3D Slicer reads it.

Slicer (vtkMRMLModelStorageNode::ReadDataInternal) takes the space from the
first PLY comment holding ``SPACE=RAS``, from the title (second) line of a
legacy .vtk, and from a string array named ``SPACE`` in the field data of a
.vtp; without one it reads the mesh as LPS (mirrored).
"""

import base64
import os
import xml.etree.ElementTree as ET

import nibabel as nib
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from dipy_spinverse.geometry.phantoms import published_phantoms
from dipy_spinverse.geometry.topology import barrier_mesh
from dipy_spinverse.io.meshes import (
    MESH_FORMATS,
    load_mesh,
    read_mesh,
    save_mesh,
    write_mesh,
)
from dipy_spinverse.sim.grid import TetGrid

FORMATS = [("m.ply", True), ("m.ply", False), ("m.vtp", True), ("m.gii", True)]
FORMATS += [("m.vtk", True)]


@pytest.fixture(scope="module")
def ico():
    """A closed icosahedron (12 vertices, 20 outward triangles) in scanner
    coordinates (mm, not on a float32 grid), with per-vertex and per-face
    data of each type the writers know."""
    t = (1 + 5**0.5) / 2
    vertices = np.array(
        [
            [-1, t, 0],
            [1, t, 0],
            [-1, -t, 0],
            [1, -t, 0],
            [0, -1, t],
            [0, 1, t],
            [0, -1, -t],
            [0, 1, -t],
            [t, 0, -1],
            [t, 0, 1],
            [-t, 0, -1],
            [-t, 0, 1],
        ]
    )
    vertices = 10.3 * vertices + [-31.7, 12.1, 5.3]
    triangles = np.array(
        [
            [0, 11, 5],
            [0, 5, 1],
            [0, 1, 7],
            [0, 7, 10],
            [0, 10, 11],
            [1, 5, 9],
            [5, 11, 4],
            [11, 10, 2],
            [10, 7, 6],
            [7, 1, 8],
            [3, 9, 4],
            [3, 4, 2],
            [3, 2, 6],
            [3, 6, 8],
            [3, 8, 9],
            [4, 9, 5],
            [2, 4, 11],
            [6, 2, 10],
            [8, 6, 7],
            [9, 8, 1],
        ]
    )
    vertex_data = dict(
        voxel=np.arange(12) * 1000,
        value=np.linspace(0, 1, 12) ** 2,
        wall=np.arange(12) % 3 == 0,
    )
    face_data = dict(
        face=np.arange(20) - 5,
        permeability=np.where(np.arange(20) < 4, np.nan, 1e-5 * np.arange(20)),
        wall=np.arange(20) % 2 == 0,
    )
    return vertices, triangles, vertex_data, face_data


def _write(ico, path, **kwargs):
    vertices, triangles, vertex_data, face_data = ico
    return write_mesh(
        path,
        vertices,
        triangles,
        vertex_data=vertex_data,
        face_data=face_data,
        **kwargs,
    )


def _ply_header(path):
    with open(path, "rb") as f:
        return f.read().split(b"end_header\n")[0].decode("ascii").splitlines()


def _vtp_arrays(element):
    """The named base64 (UInt64 header) DataArrays of a .vtp element."""
    arrays = {}
    for array in element.findall("DataArray"):
        raw = base64.b64decode(array.text.strip())
        kind = np.dtype(array.get("type").lower()).newbyteorder("<")
        size = int(np.frombuffer(raw[:8], "<u8")[0])
        arrays[array.get("Name")] = np.frombuffer(raw[8 : 8 + size], kind)
    return arrays


def _vtp_space(path):
    """The space as Slicer reads it from a .vtp: the first string of the
    ``SPACE`` array in the dataset's field data (ASCII: character codes,
    each string ended by 0), or None."""
    root = ET.parse(path).getroot()
    arrays = root.findall("PolyData/FieldData/Array[@Name='SPACE']")
    if not arrays:
        return None
    (array,) = arrays
    assert array.get("type") == "String" and array.get("format") == "ascii"
    codes = bytes(int(c) for c in array.text.split())
    return codes.split(b"\0")[0].decode("ascii")


# -- every format through read_mesh ------------------------------------------------
@pytest.mark.parametrize("name, binary", FORMATS)
def test_read_mesh_gives_the_mesh_back(tmp_path, ico, name, binary):
    vertices, triangles, _, _ = ico
    path = _write(ico, tmp_path / name, binary=binary, scanner=True)
    back_vertices, back_triangles = read_mesh(path)
    if name.endswith(".gii"):
        # GIFTI stores float32 coordinates: exactly their rounding.
        vertices = vertices.astype(np.float32)
    assert_array_equal(back_vertices, vertices)
    assert_array_equal(back_triangles, triangles)
    assert back_triangles.dtype == np.int64
    assert os.listdir(tmp_path) == [name]  # no temporary left


# -- PLY: meshio writes, meshio and trimesh read -----------------------------------
@pytest.mark.parametrize("binary", [True, False])
def test_ply_is_read_by_meshio_and_trimesh(tmp_path, ico, binary):
    meshio = pytest.importorskip("meshio")
    trimesh = pytest.importorskip("trimesh")
    vertices, triangles, vertex_data, _ = ico
    path = _write(ico, tmp_path / "m.ply", binary=binary, space="RAS")
    read = meshio.read(path)
    assert_array_equal(read.points, vertices)
    assert_array_equal(read.cells_dict["triangle"], triangles)
    for name, values in vertex_data.items():
        assert_array_equal(read.point_data[name], values, err_msg=name)
    assert read.point_data["voxel"].dtype == np.int32
    assert read.point_data["wall"].dtype == np.uint8
    # meshio 5 writes no PLY face properties: face data go to .vtp only.
    assert read.cell_data == {}
    loaded = trimesh.load(path, process=False)
    assert_array_equal(loaded.vertices, vertices)
    assert_array_equal(loaded.faces, triangles)
    raw = loaded.metadata["_ply_raw"]["vertex"]["data"]  # trimesh's PLY properties
    for name, values in vertex_data.items():
        # (n, 1) columns from ASCII, a record array from binary
        assert_array_equal(np.ravel(raw[name]), values, err_msg=name)
    assert loaded.is_watertight and loaded.volume > 0  # closed, normals outward


@pytest.mark.parametrize("binary", [True, False])
def test_ply_header_states_the_space_and_comment(tmp_path, ico, binary):
    path = _write(ico, tmp_path / "m.ply", binary=binary, scanner=True)
    header = _ply_header(path)
    assert header[:2] == [
        "ply",
        "format " + ("binary_little_endian" if binary else "ascii") + " 1.0",
    ]
    comments = [line for line in header if line.startswith("comment ")]
    # Slicer reads the space from the first comment that holds SPACE=RAS or
    # SPACE=LPS; meshio's own time-stamped comment is gone.
    assert comments == ["comment dipy_spinverse mesh", "comment SPACE=RAS"]
    first = open(path, "rb").read()
    _write(ico, tmp_path / "m.ply", binary=binary, scanner=True)
    assert open(path, "rb").read() == first  # the same mesh, the same bytes
    path = _write(ico, tmp_path / "u.ply", binary=binary, comment="um box")
    comments = [line for line in _ply_header(path) if line.startswith("comment ")]
    assert comments == ["comment um box"]  # no space stated: none written


# -- VTK XML PolyData --------------------------------------------------------------
def test_vtp_holds_data_and_the_space_field(tmp_path, ico):
    vertices, triangles, vertex_data, face_data = ico
    path = _write(ico, tmp_path / "m.vtp", space="RAS")
    assert _vtp_space(path) == "RAS"
    root = ET.parse(path).getroot()
    # The field data comes first in the dataset element, as VTK writes it.
    assert [child.tag for child in root.find("PolyData")] == ["FieldData", "Piece"]
    piece = root.find("PolyData/Piece")
    points = _vtp_arrays(piece.find("Points"))["Points"].reshape(-1, 3)
    assert_array_equal(points, vertices)
    polys = _vtp_arrays(piece.find("Polys"))
    assert_array_equal(polys["connectivity"].reshape(-1, 3), triangles)
    assert_array_equal(polys["offsets"], 3 * np.arange(1, 21))
    for element, data in (("PointData", vertex_data), ("CellData", face_data)):
        arrays = _vtp_arrays(piece.find(element))
        assert list(arrays) == list(data), element
        for name, values in data.items():
            assert_array_equal(arrays[name], values, err_msg=f"{element} {name}")
    assert _vtp_space(_write(ico, tmp_path / "u.vtp")) is None


def test_meshes_are_placed_by_vtk_as_slicer_reads_them(tmp_path, ico):
    """Slicer's own look-ups, through VTK's readers (where VTK is installed):
    vtkPLYReader's comments, vtkPolyDataReader's header, and the SPACE
    string array of vtkXMLPolyDataReader's field data."""
    pytest.importorskip("vtkmodules")
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkCommonCore import vtkStringArray
    from vtkmodules.vtkIOLegacy import vtkPolyDataReader
    from vtkmodules.vtkIOPLY import vtkPLYReader
    from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

    vertices, triangles, vertex_data, face_data = ico
    path = _write(ico, tmp_path / "m.ply", scanner=True)
    reader = vtkPLYReader()
    reader.SetFileName(path)
    reader.Update()
    comments = reader.GetComments()
    found = [comments.GetValue(i) for i in range(comments.GetNumberOfValues())]
    assert "SPACE=RAS" in found
    polydata = reader.GetOutput()
    # vtkPLYReader reads points as float32.
    assert_array_equal(
        vtk_to_numpy(polydata.GetPoints().GetData()), vertices.astype(np.float32)
    )

    path = _write(ico, tmp_path / "m.vtk", scanner=True)
    reader = vtkPolyDataReader()
    reader.SetFileName(path)
    assert reader.IsFilePolyData()
    reader.Update()
    assert "SPACE=RAS" in reader.GetHeader()
    polydata = reader.GetOutput()
    assert_array_equal(vtk_to_numpy(polydata.GetPoints().GetData()), vertices)

    path = _write(ico, tmp_path / "m.vtp", scanner=True)
    reader = vtkXMLPolyDataReader()
    reader.SetFileName(path)
    reader.Update()
    polydata = reader.GetOutput()
    space = polydata.GetFieldData().GetAbstractArray("SPACE")
    assert vtkStringArray.SafeDownCast(space).GetValue(0) == "RAS"
    assert_array_equal(vtk_to_numpy(polydata.GetPoints().GetData()), vertices)
    connectivity = vtk_to_numpy(polydata.GetPolys().GetConnectivityArray())
    assert_array_equal(connectivity.reshape(-1, 3), triangles)
    for attributes, data in (
        (polydata.GetPointData(), vertex_data),
        (polydata.GetCellData(), face_data),
    ):
        for name, values in data.items():
            assert_array_equal(vtk_to_numpy(attributes.GetArray(name)), values)


# -- GIFTI: nibabel ----------------------------------------------------------------
def test_gifti_is_read_by_nibabel_with_vertex_data(tmp_path, ico):
    vertices, triangles, vertex_data, _ = ico
    path = _write(ico, tmp_path / "m.gii", scanner=True, comment="barriers")
    image = nib.load(path)
    intents = [nib.nifti1.intent_codes.label[a.intent] for a in image.darrays]
    assert intents == ["pointset", "triangle", "none", "none", "none"]
    coords, faces = image.darrays[:2]
    assert_array_equal(coords.data, vertices.astype(np.float32))
    assert_array_equal(faces.data, triangles)
    # Scanner space (NIfTI's RAS+) for both the data and the transformed space.
    assert coords.coordsys.dataspace == coords.coordsys.xformspace == 1
    named = {a.meta["Name"]: a.data for a in image.darrays[2:]}
    assert list(named) == list(vertex_data)
    assert_array_equal(named["voxel"], vertex_data["voxel"])
    assert named["voxel"].dtype == np.int32 and named["wall"].dtype == np.int32
    assert_array_equal(named["wall"], vertex_data["wall"])
    assert_array_equal(named["value"], vertex_data["value"].astype(np.float32))
    assert image.meta["Description"] == "barriers"
    image = nib.load(_write(ico, tmp_path / "u.gii"))
    assert image.darrays[0].coordsys.dataspace == 0  # NIFTI_XFORM_UNKNOWN


# -- legacy VTK --------------------------------------------------------------------
def test_legacy_vtk_title_states_the_space(tmp_path, ico):
    path = _write(ico, tmp_path / "m.vtk", space="RAS", comment="barriers (mm)")
    lines = open(path).read().splitlines()
    assert lines[0].startswith("# vtk DataFile Version")
    assert lines[1] == "barriers (mm) SPACE=RAS"  # the title Slicer reads
    assert lines[3] == "DATASET POLYDATA"
    path = _write(ico, tmp_path / "u.vtk", comment="um box")
    assert open(path).read().splitlines()[1] == "um box"


# -- the space and the comment -----------------------------------------------------
@pytest.mark.parametrize("name", ["m.ply", "m.vtp", "m.vtk", "m.gii"])
def test_space_and_comment_are_checked(tmp_path, ico, name):
    with pytest.raises(ValueError, match="space must be one of"):
        _write(ico, tmp_path / name, space="LPS")
    with pytest.raises(ValueError, match="state the space with space="):
        _write(ico, tmp_path / name, comment="mesh SPACE=RAS")
    with pytest.raises(ValueError, match="comment must be one line"):
        _write(ico, tmp_path / name, comment="a\nb")
    with pytest.raises(ValueError, match="ASCII"):
        _write(ico, tmp_path / name, comment="1 µm")
    # 255 characters fit a header line; the space takes 10 of them.
    _write(ico, tmp_path / name, comment="c" * 255)
    with pytest.raises(ValueError, match="at most 245"):
        _write(ico, tmp_path / name, comment="c" * 246, space="RAS")
    assert os.listdir(tmp_path) == [name]


# -- what no file is written for ---------------------------------------------------
def test_empty_and_unknown_meshes_raise(tmp_path, ico):
    vertices, triangles, _, _ = ico
    for ext in MESH_FORMATS:
        with pytest.raises(ValueError, match="has no triangles; no file is written"):
            write_mesh(tmp_path / f"e{ext}", np.zeros((0, 3)), np.zeros((0, 3)))
        with pytest.raises(ValueError, match="index vertices 0 to 12, but there are"):
            write_mesh(tmp_path / f"i{ext}", vertices, np.r_[triangles, [[0, 1, 12]]])
    with pytest.raises(ValueError, match=r"unknown mesh format '\.stl'"):
        write_mesh(tmp_path / "m.stl", vertices, triangles)
    with pytest.raises(ValueError, match=r"unknown mesh format '\.obj'"):
        read_mesh(tmp_path / "m.obj")
    with pytest.raises(ValueError, match="one value per triangle"):
        write_mesh(tmp_path / "m.vtp", vertices, triangles, face_data=dict(a=[1]))
    with pytest.raises(ValueError, match="32-bit"):
        big = dict(a=np.full(len(vertices), 2**40))
        write_mesh(tmp_path / "m.ply", vertices, triangles, vertex_data=big)
    assert os.listdir(tmp_path) == []


def test_read_mesh_rejects_what_is_not_a_triangle_mesh(tmp_path):
    meshio = pytest.importorskip("meshio")
    (tmp_path / "bad.ply").write_text("not a mesh\n")
    with pytest.raises(ValueError, match="not a PLY file that meshio reads"):
        read_mesh(tmp_path / "bad.ply")
    quad = meshio.Mesh(np.eye(4, 3), [("quad", np.array([[0, 1, 2, 3]]))])
    meshio.write(tmp_path / "quad.ply", quad, binary=False)
    with pytest.raises(ValueError, match=r"only triangle meshes.*\['quad'\]"):
        read_mesh(tmp_path / "quad.ply")


# -- the package's meshes: save_mesh and load_mesh ---------------------------


@pytest.fixture(scope="module")
def barrier_grid():
    return TetGrid.bcc(80 / 3, 4)


@pytest.fixture(scope="module")
def published(barrier_grid):
    return published_phantoms(barrier_grid)


@pytest.mark.parametrize("name, binary", [("m.ply", False), ("m.ply", True)])
def test_save_mesh_ply_round_trip(tmp_path, barrier_grid, published, name, binary):
    mesh = barrier_mesh(barrier_grid, published["sphere"].barrier)
    save_mesh(mesh, tmp_path / name, binary=binary)
    back = load_mesh(tmp_path / name)
    assert_array_equal(back.vertices, mesh.vertices)
    assert_array_equal(back.triangles, mesh.triangles)
    assert back.is_closed and back.is_manifold


def test_save_mesh_vtk_round_trip(tmp_path, barrier_grid, published):
    mesh = barrier_mesh(barrier_grid, published["torus"].barrier, cap_wall=True)
    save_mesh(mesh, tmp_path / "m.vtk")
    text = (tmp_path / "m.vtk").read_text()
    assert "DATASET POLYDATA" in text and "POLYGONS" in text
    back = load_mesh(tmp_path / "m.vtk")
    assert_array_equal(back.vertices, mesh.vertices)
    assert_array_equal(back.triangles, mesh.triangles)


def test_save_and_load_mesh_errors(tmp_path, barrier_grid, published):
    mesh = barrier_mesh(barrier_grid, published["sphere"].barrier)
    with pytest.raises(ValueError, match="format"):
        save_mesh(mesh, tmp_path / "m.stl")
    with pytest.raises(ValueError, match="binary"):
        save_mesh(mesh, tmp_path / "m.vtk", binary=True)
    (tmp_path / "bad.ply").write_text("not a mesh\n")
    with pytest.raises(ValueError, match="PLY"):
        load_mesh(tmp_path / "bad.ply")
