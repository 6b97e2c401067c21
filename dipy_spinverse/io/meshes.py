"""Triangle-mesh files: PLY, VTK XML PolyData, GIFTI and legacy VTK.

:func:`write_mesh` writes a mesh atomically (never an empty one), with
optional per-vertex and per-face data and, for coordinates in a scanner's
RAS+ space (``space="RAS"``), the tag with which 3D Slicer places the mesh;
:func:`read_mesh` reads its vertices and triangles back. The meshes of the
package (barrier surfaces of a grid,
:class:`~dipy_spinverse.geometry.topology.InterfaceMesh`, and the boundary of
a cell's tetrahedral mesh, :class:`~dipy_spinverse.meshfit.mesh.TetMesh`) are
written by :func:`save_mesh` and read back by :func:`load_mesh`: the layers
that make them return data and this module writes them.

What each format keeps:

========  ===========  =================  =============  ==========================
format    written by   ``vertex_data``    ``face_data``  ``space="RAS"`` states it
========  ===========  =================  =============  ==========================
``.ply``  meshio       vertex properties  left out       ``comment SPACE=RAS``
``.vtp``  this module  ``PointData``      ``CellData``   ``SPACE`` field data array
``.gii``  nibabel      named data arrays  left out       (``scanner``: see below)
``.vtk``  this module  left out           left out       ``SPACE=RAS`` in the title
========  ===========  =================  =============  ==========================

The space tags are where Slicer's model reader looks for them (its
``vtkMRMLModelStorageNode``: the PLY comments, the legacy VTK title line,
and a string array named ``SPACE`` in the field data of VTK XML files); a
mesh without one is read there as LPS, mirrored left-right and
front-back. FURY, ParaView, meshio, trimesh and nibabel take the
coordinates as written, which for scanner coordinates are RAS+ (NIfTI's and
DIPY's convention), so they need no tag. GIFTI states it with
``scanner=True``: its coordinate system is then
``NIFTI_XFORM_SCANNER_ANAT``, whose axes NIfTI defines as RAS+.

PLY goes through meshio (read and write), GIFTI through nibabel. meshio 5
writes neither VTK XML PolyData nor legacy ``POLYDATA`` (its legacy writer
makes ``UNSTRUCTURED_GRID`` files, which VTK's ``vtkPolyDataReader``, as
used by FURY 0.x and :mod:`dipy.io.surface`, does not read, and it reads no
``POLYDATA``), and
the ``vtk`` package is a 140 MB optional dependency, so ``.vtp`` and ``.vtk``
are written here: ``.vtp`` with inline base64 arrays and the ``SPACE`` field
array laid out as VTK's own writer lays them out, ``.vtk`` as ASCII.
meshio's PLY writer has no face properties, so ``face_data`` goes to
``.vtp`` only.
"""

import base64
import io
import os
import xml.etree.ElementTree as ET

import numpy as np

from ..files import atomic_write
from ..geometry.topology import InterfaceMesh
from ..meshfit.mesh import TetMesh

__all__ = ["MESH_FORMATS", "read_mesh", "write_mesh", "save_mesh", "load_mesh"]

#: Mesh file types :func:`write_mesh` writes and :func:`read_mesh` reads.
#: ``.vtp`` (VTK XML) is read by VTK, ParaView, Slicer and PyVista; meshio 5
#: reads neither it nor legacy POLYDATA ``.vtk`` (trimesh does not read them
#: either): for meshio or trimesh, write ``.ply``.
MESH_FORMATS = (".ply", ".vtp", ".gii", ".vtk")

#: The spaces :func:`write_mesh` can state (Slicer also knows ``"LPS"``, the
#: space it assumes for a mesh that states none).
_SPACES = ("RAS",)


def write_mesh(
    path,
    vertices,
    triangles,
    *,
    vertex_data=None,
    face_data=None,
    binary=True,
    scanner=False,
    space=None,
    comment="dipy_spinverse mesh",
):
    """Write a triangle mesh atomically; the extension picks the format.

    Parameters
    ----------
    path : str or os.PathLike
        ``.ply`` (binary or ASCII, through meshio), ``.vtp`` (VTK XML
        PolyData, base64 binary), ``.gii`` (GIFTI surface through nibabel: a
        ``NIFTI_INTENT_POINTSET`` and a ``NIFTI_INTENT_TRIANGLE`` array) or
        legacy ASCII ``.vtk`` (``POLYDATA``). Written to a temporary file in
        the same folder, then renamed.
    vertices : array_like (V, 3)
    triangles : array_like of int (T, 3)
        Indices into ``vertices``.
    vertex_data : dict of array_like (V,), optional
        Per-vertex values, written as PLY vertex properties (int32, uint8 or
        double), VTK ``PointData`` (integers as 32-bit ints, booleans as
        bytes, the rest as doubles) and GIFTI data arrays
        (``NIFTI_INTENT_NONE``, named by their ``Name`` metadata; int32 or
        float32); left out of legacy ``.vtk``.
    face_data : dict of array_like (T,), optional
        Per-triangle values, written as VTK ``CellData`` in ``.vtp``; left
        out of PLY (meshio 5 writes no face properties), GIFTI (its data
        arrays are per vertex) and legacy ``.vtk``.
    binary : bool
        Binary PLY (the other formats ignore it).
    scanner : bool
        The vertices are scanner coordinates (mm, RAS+): GIFTI's coordinate
        system says so (``NIFTI_XFORM_SCANNER_ANAT``, else it is unknown),
        and ``space`` defaults to ``"RAS"``.
    space : {None, "RAS"}
        The axes the vertices are given in, stated where 3D Slicer reads it
        (PLY comment ``SPACE=RAS``, ``SPACE`` string array in the ``.vtp``
        field data, legacy VTK title), so that Slicer places the mesh
        unmirrored (it reads a mesh that states no space as LPS). None (the
        default unless ``scanner``): no tag, for meshes in a local box (um).
    comment : str
        One line of description, at most 255 ASCII characters (245 with a
        ``space``, which joins it in the legacy VTK title): a PLY comment,
        an XML comment in ``.vtp`` (``--`` is written ``- -``), GIFTI
        ``Description`` metadata, the legacy VTK title. The space goes in
        ``space``, not here.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    ValueError
        No triangles (an empty mesh file breaks meshio and VTK, so none is
        written), an unknown extension, a triangle index out of range, data
        of the wrong length, an unknown space or a comment that is not one
        short ASCII line.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in MESH_FORMATS:
        raise ValueError(f"unknown mesh format {ext!r}; use one of {MESH_FORMATS}.")
    vertices = np.asarray(vertices, dtype=float).reshape(-1, 3)
    triangles = np.asarray(triangles, dtype=np.int64).reshape(-1, 3)
    if len(triangles) == 0:
        raise ValueError(
            f"the mesh for {path} has no triangles; no file is written (an empty "
            "mesh file breaks meshio and VTK)."
        )
    if triangles.min() < 0 or triangles.max() >= len(vertices):
        raise ValueError(
            f"the triangles of {path} index vertices {triangles.min()} to "
            f"{triangles.max()}, but there are {len(vertices)} vertices."
        )
    if space is None and scanner:
        space = "RAS"
    if space is not None and space not in _SPACES:
        raise ValueError(f"space must be one of {_SPACES} or None, got {space!r}.")
    comment = _check_comment(comment, space)
    data = _columns(face_data, len(triangles), "face_data", "triangle")
    points = _columns(vertex_data, len(vertices), "vertex_data", "vertex")
    with atomic_write(path) as tmp:
        if ext == ".ply":
            _write_ply(
                tmp,
                vertices,
                triangles,
                binary=binary,
                points=points,
                comment=comment,
                space=space,
            )
        elif ext == ".vtp":
            _write_vtp(
                tmp,
                vertices,
                triangles,
                data=data,
                points=points,
                comment=comment,
                space=space,
            )
        elif ext == ".gii":
            _write_gifti(
                tmp,
                vertices,
                triangles,
                scanner=scanner,
                comment=comment,
                points=points,
            )
        else:
            _write_vtk(tmp, vertices, triangles, comment=comment, space=space)
    return path


def _columns(data, n, argument, element):
    """Per-element arrays with the types the writers know (int32, uint8, float64)."""
    columns = {}
    for name, values in (data or {}).items():
        values = np.asarray(values)
        if values.shape != (n,):
            raise ValueError(
                f"{argument}[{name!r}] must hold one value per {element} ({n},), "
                f"got shape {values.shape}."
            )
        if not str(name).isidentifier() or name in ("x", "y", "z"):
            raise ValueError(
                f"{argument} names must be identifiers other than x, y, z; got "
                f"{name!r}."
            )
        if values.dtype == bool:
            values = values.astype(np.uint8)
        elif np.issubdtype(values.dtype, np.integer):
            info = np.iinfo(np.int32)
            if values.size and (values.min() < info.min or values.max() > info.max):
                raise ValueError(
                    f"{argument}[{name!r}] does not fit 32-bit integers, the "
                    "widest that PLY, VTK and GIFTI readers share."
                )
            values = values.astype(np.int32)
        else:
            values = values.astype(np.float64)
        columns[str(name)] = values
    return columns


def _check_comment(comment, space):
    """One ASCII line that leaves room for the space in the legacy VTK title
    (VTK reads 255 characters of it) and states no space of its own."""
    comment = str(comment)
    limit = 255 - (len(f" SPACE={space}") if space else 0)
    if (
        "\n" in comment
        or "\r" in comment
        or len(comment) > limit
        or not comment.isascii()
    ):
        raise ValueError(
            f"comment must be one line of at most {limit} ASCII characters (a PLY "
            f"comment and the VTK title are one header line), got {comment[:40]!r}..."
        )
    if "SPACE=" in comment:
        # A tag in the comment could contradict the one write_mesh writes, and
        # would reach the PLY and legacy VTK headers but not the .vtp field
        # data.
        raise ValueError(
            f"state the space with space='RAS', not in the comment; got {comment!r}."
        )
    return comment


def read_mesh(path):
    """Read a triangle mesh: .ply (ASCII or binary), .vtp, .gii or legacy .vtk.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    vertices : ndarray (V, 3)
    triangles : ndarray of int64 (T, 3)
        Per-vertex and per-face data are not read.

    Raises
    ------
    ValueError
        An unknown extension, a file that is not of its extension's format,
        or one whose faces are not all triangles.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    readers = {
        ".ply": _read_ply,
        ".vtp": _read_vtp,
        ".gii": _read_gifti,
        ".vtk": _read_vtk,
    }
    if ext not in readers:
        raise ValueError(f"unknown mesh format {ext!r}; use one of {MESH_FORMATS}.")
    return readers[ext](path)


def save_mesh(mesh, path, *, binary=False, face_data=None):
    """Write a mesh of the package (um) with :func:`write_mesh`.

    Parameters
    ----------
    mesh : InterfaceMesh or TetMesh
        A barrier surface
        (:class:`~dipy_spinverse.geometry.topology.InterfaceMesh`, e.g.
        ``fit.interface_mesh``), or a cell's tetrahedral mesh
        (:class:`~dipy_spinverse.meshfit.mesh.TetMesh`, e.g.
        ``fit.smooth_mesh`` or ``MeshFit.mesh``), of which the boundary
        surface is written, with only the surface's vertices.
    path : str or os.PathLike
        The extension picks the format (:data:`MESH_FORMATS`): ``.ply``,
        ``.vtp`` (VTK XML PolyData), ``.gii`` (GIFTI) or legacy ``.vtk``.
    binary : bool
        Binary PLY (``.ply`` only; ``.vtp`` and ``.gii`` are always
        base64-encoded binary, legacy ``.vtk`` always ASCII).
    face_data : dict of array_like, optional
        Per-triangle values, kept by ``.vtp`` only (VTK ``CellData``;
        meshio's PLY writer has no face properties), e.g. ``{"face":
        mesh.face_ids}``.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    ValueError
        The mesh has no triangles: no file is written (an empty mesh file
        breaks meshio and VTK).
    """
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() == ".vtk" and binary:
        raise ValueError("only ASCII legacy .vtk is written; use binary .ply.")
    if isinstance(mesh, TetMesh):
        # The surface alone: interior vertices would be points of no
        # triangle in the file.
        used = mesh.boundary_vertices
        renumber = np.full(mesh.n_vertices, -1, dtype=np.int64)
        renumber[used] = np.arange(len(used))
        vertices, triangles = mesh.vertices[used], renumber[mesh.boundary_faces]
        comment = "dipy_spinverse cell surface (um)"
    else:
        vertices, triangles = mesh.vertices, mesh.triangles
        comment = "dipy_spinverse interface mesh (um)"
    return write_mesh(
        path,
        vertices,
        triangles,
        face_data=face_data,
        binary=binary,
        comment=comment,
    )


def load_mesh(path):
    """Read a triangle mesh file into an :class:`InterfaceMesh`.

    Parameters
    ----------
    path : str or os.PathLike
        ``.ply`` (ASCII or binary), ``.vtp``, ``.gii`` or legacy ``.vtk``
        (:data:`MESH_FORMATS`).

    Returns
    -------
    InterfaceMesh
        Without grid ids (every vertex is its own); per-face data are not
        read.
    """
    return InterfaceMesh(*read_mesh(path))


# -- PLY (meshio) ------------------------------------------------------------------
def _write_ply(path, vertices, triangles, *, binary, points, comment, space):
    import meshio

    mesh = meshio.Mesh(
        vertices,
        # int32 indices: meshio casts int64 down itself, with a warning.
        [("triangle", triangles.astype(np.int32))],
        point_data=points,
    )
    buffer = io.BytesIO()
    meshio.write(buffer, mesh, file_format="ply", binary=binary)
    raw = buffer.getvalue()
    end = raw.index(b"end_header\n")
    lines = raw[:end].decode("ascii").splitlines()
    # meshio writes one comment of its own ("Created by meshio v..., <time>")
    # and takes none: its line is replaced by the caller's comment and the
    # space tag (Slicer reads the first comment holding SPACE=RAS or
    # SPACE=LPS; vtkPLYWriter writes it as a comment of its own as here).
    # Without meshio's time stamp the same mesh gives the same bytes.
    ours = [f"comment {comment}"] if comment else []
    if space:
        ours.append(f"comment SPACE={space}")
    kept = [line for line in lines[2:] if not line.startswith("comment Created by")]
    header = "\n".join([*lines[:2], *ours, *kept, ""]).encode("ascii")
    with open(path, "wb") as f:
        f.write(header)
        f.write(memoryview(raw)[end:])


def _read_ply(path):
    import meshio

    try:
        # The format's own reader: meshio.read prints the error and calls
        # sys.exit on a file it cannot parse.
        mesh = meshio.ply.read(path)
    except Exception as err:  # meshio raises many kinds on a file it cannot parse
        raise ValueError(
            f"{path}: not a PLY file that meshio reads ({type(err).__name__}: "
            f"{err}; meshio 5 reads no face properties in binary PLY)."
        ) from err
    kinds = sorted({block.type for block in mesh.cells} - {"triangle"})
    if kinds:
        raise ValueError(f"{path}: only triangle meshes are supported, found {kinds}.")
    triangles = [block.data for block in mesh.cells]
    triangles = np.concatenate(triangles) if triangles else np.zeros((0, 3))
    return mesh.points.astype(float), triangles.astype(np.int64).reshape(-1, 3)


# -- VTK XML PolyData ----------------------------------------------------------------
_VTK_TYPES = {
    np.dtype(np.float64): "Float64",
    np.dtype(np.int64): "Int64",
    np.dtype(np.int32): "Int32",
    np.dtype(np.uint8): "UInt8",
}


def _vtk_array(parent, values, *, name=None, components=1):
    """A base64 binary DataArray: a UInt64 byte count, then the data, encoded
    together (as VTK writes uncompressed inline binary)."""
    values = np.ascontiguousarray(values)
    values = values.astype(values.dtype.newbyteorder("<"))
    attrs = dict(type=_VTK_TYPES[values.dtype.newbyteorder("=")], format="binary")
    if name is not None:
        attrs["Name"] = name
    if components != 1:
        attrs["NumberOfComponents"] = str(components)
    raw = values.tobytes()
    array = ET.SubElement(parent, "DataArray", attrs)
    array.text = base64.b64encode(np.array(len(raw), "<u8").tobytes() + raw).decode()
    return array


def _write_vtp(path, vertices, triangles, *, data, points, comment, space):
    root = ET.Element(
        "VTKFile",
        type="PolyData",
        version="1.0",
        byte_order="LittleEndian",
        header_type="UInt64",
    )
    # "--" may not appear inside an XML comment.
    while "--" in comment:
        comment = comment.replace("--", "- -")
    root.append(ET.Comment(f" {comment} "))
    polydata = ET.SubElement(root, "PolyData")
    if space:
        # Slicer reads the space of a .vtp from a string array named SPACE in
        # the field data, not from a comment. VTK's XML writer puts field data
        # first in the dataset element, and writes a string in ASCII as its
        # character codes ended by 0 (Slicer writes "RAS" as "82 65 83 0").
        array = ET.SubElement(
            ET.SubElement(polydata, "FieldData"),
            "Array",
            type="String",
            Name="SPACE",
            NumberOfTuples="1",
            format="ascii",
        )
        array.text = " ".join(str(c) for c in space.encode("ascii") + b"\0")
    piece = ET.SubElement(
        polydata,
        "Piece",
        NumberOfPoints=str(len(vertices)),
        NumberOfVerts="0",
        NumberOfLines="0",
        NumberOfStrips="0",
        NumberOfPolys=str(len(triangles)),
    )
    if points:
        point_data = ET.SubElement(piece, "PointData")
        for name, values in points.items():
            _vtk_array(point_data, values, name=name)
    if data:
        cells = ET.SubElement(piece, "CellData")
        for name, values in data.items():
            _vtk_array(cells, values, name=name)
    _vtk_array(
        ET.SubElement(piece, "Points"),
        vertices.astype(np.float64),
        name="Points",
        components=3,
    )
    polys = ET.SubElement(piece, "Polys")
    _vtk_array(polys, triangles.reshape(-1), name="connectivity")
    offsets = 3 * np.arange(1, len(triangles) + 1, dtype=np.int64)
    _vtk_array(polys, offsets, name="offsets")
    ET.ElementTree(root).write(path, xml_declaration=True, encoding="utf-8")


def _read_vtp(path):
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{path} is not a VTK XML file ({err}).") from err
    piece = root.find("PolyData/Piece")
    if root.tag != "VTKFile" or piece is None:
        raise ValueError(f"{path}: expected a VTK XML PolyData file.")
    header = np.dtype(root.get("header_type", "UInt32").lower()).newbyteorder("<")
    little = root.get("byte_order", "LittleEndian") == "LittleEndian"

    def read(array):
        kind = np.dtype(array.get("type").lower())
        kind = kind.newbyteorder("<" if little else ">")
        text = (array.text or "").strip()
        if array.get("format") == "ascii":
            return np.array(text.split(), dtype=kind)
        if array.get("format") != "binary" or root.get("compressor"):
            raise ValueError(f"{path}: only ascii or uncompressed binary is read.")
        raw = base64.b64decode(text)
        return np.frombuffer(raw[header.itemsize :], dtype=kind)

    vertices = read(piece.find("Points/DataArray")).astype(float).reshape(-1, 3)
    polys = {a.get("Name"): a for a in piece.findall("Polys/DataArray")}
    if not polys:
        return vertices, np.zeros((0, 3), dtype=np.int64)
    connectivity = read(polys["connectivity"]).astype(np.int64)
    offsets = read(polys["offsets"]).astype(np.int64)
    if np.any(np.diff(np.r_[0, offsets]) != 3):
        raise ValueError(f"{path}: only triangle meshes are supported.")
    return vertices, connectivity.reshape(-1, 3)


# -- GIFTI (nibabel) -----------------------------------------------------------------
def _write_gifti(path, vertices, triangles, *, scanner, comment, points):
    import nibabel as nib
    from nibabel.gifti import GiftiCoordSystem, GiftiDataArray, GiftiImage

    # NIfTI's spaces are RAS+, so scanner space also says what space="RAS"
    # says; GIFTI has no field for RAS axes in an unknown frame.
    space = "NIFTI_XFORM_SCANNER_ANAT" if scanner else "NIFTI_XFORM_UNKNOWN"
    coords = GiftiDataArray(
        vertices.astype(np.float32),
        intent="NIFTI_INTENT_POINTSET",
        datatype="NIFTI_TYPE_FLOAT32",
        coordsys=GiftiCoordSystem(space, space, np.eye(4)),
    )
    faces = GiftiDataArray(
        triangles.astype(np.int32),
        intent="NIFTI_INTENT_TRIANGLE",
        datatype="NIFTI_TYPE_INT32",
    )
    # Per-vertex values: one data array each after the geometry, named in its
    # metadata (readers of the surface take the pointset and triangle
    # arrays by intent and ignore these).
    extra = []
    for name, values in points.items():
        integer = values.dtype.kind in "iub"
        array = GiftiDataArray(
            values.astype(np.int32 if integer else np.float32),
            intent="NIFTI_INTENT_NONE",
            datatype="NIFTI_TYPE_INT32" if integer else "NIFTI_TYPE_FLOAT32",
        )
        array.meta["Name"] = name
        extra.append(array)
    image = GiftiImage(darrays=[coords, faces, *extra])
    image.meta["Description"] = comment
    nib.save(image, path)


def _read_gifti(path):
    import nibabel as nib

    try:
        image = nib.load(path)
        points = image.get_arrays_from_intent("NIFTI_INTENT_POINTSET")
        faces = image.get_arrays_from_intent("NIFTI_INTENT_TRIANGLE")
    except Exception as err:  # nibabel raises many kinds on a damaged file
        raise ValueError(f"{path} is not a GIFTI surface ({err}).") from err
    if len(points) != 1 or len(faces) != 1:
        raise ValueError(f"{path}: expected one pointset and one triangle array.")
    return points[0].data.astype(float), faces[0].data.astype(np.int64)


# -- legacy VTK ------------------------------------------------------------------------
def _write_vtk(path, vertices, triangles, *, comment, space):
    # Slicer reads the space of a legacy .vtk from its title line (the second
    # line, of which VTK reads 255 characters), as Slicer writes it.
    title = " ".join(filter(None, [comment, space and f"SPACE={space}"]))
    with open(path, "w") as f:
        f.write(
            f"# vtk DataFile Version 3.0\n{title}\nASCII\n"
            f"DATASET POLYDATA\nPOINTS {len(vertices)} double\n"
        )
        np.savetxt(f, vertices, fmt="%.17g")
        f.write(f"POLYGONS {len(triangles)} {4 * len(triangles)}\n")
        np.savetxt(f, np.c_[np.full(len(triangles), 3), triangles], fmt="%d")


def _read_vtk(path):
    with open(path) as f:
        lines = f.read().splitlines()
    if len(lines) < 4 or not lines[0].startswith("# vtk DataFile"):
        raise ValueError(f"{path} is not a legacy VTK file.")
    if lines[2].strip().upper() != "ASCII":
        raise ValueError(f"{path}: only ASCII legacy VTK is supported.")
    tokens = " ".join(lines[3:]).split()
    upper = [t.upper() for t in tokens]
    if "POLYDATA" not in upper or "POINTS" not in upper:
        raise ValueError(f"{path}: expected DATASET POLYDATA with POINTS.")
    i = upper.index("POINTS")
    n = int(tokens[i + 1])
    vertices = np.array(tokens[i + 3 : i + 3 + 3 * n], dtype=float).reshape(n, 3)
    triangles = np.zeros((0, 3), dtype=np.int64)
    if "POLYGONS" in upper:
        j = upper.index("POLYGONS")
        count, size = int(tokens[j + 1]), int(tokens[j + 2])
        flat = np.array(tokens[j + 3 : j + 3 + size], dtype=np.int64)
        if size != 4 * count or np.any(flat[::4] != 3):
            raise ValueError(f"{path}: only triangle meshes are supported.")
        triangles = flat.reshape(count, 4)[:, 1:]
    return vertices, triangles
