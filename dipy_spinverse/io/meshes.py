"""Triangle-mesh files: PLY, VTK XML PolyData, GIFTI and legacy VTK.

:func:`write_mesh` writes a mesh atomically (never an empty one), with
optional per-vertex and per-face data; :func:`read_mesh` reads its vertices
and triangles back. The geometry that gives them meaning (barrier surfaces of
a grid, :class:`~dipy_spinverse.geometry.topology.InterfaceMesh`) lives in
:mod:`dipy_spinverse.geometry`; this module knows only files, so the layers
below the DIPY layer can write meshes without importing it.
"""

import base64
import os
import xml.etree.ElementTree as ET

import numpy as np

from ..files import atomic_write

__all__ = ["MESH_FORMATS", "read_mesh", "write_mesh"]

#: Mesh file types :func:`write_mesh` writes and :func:`read_mesh` reads.
#: ``.vtp`` (VTK XML) is read by VTK, ParaView and PyVista; meshio 5 reads
#: neither it nor legacy POLYDATA ``.vtk`` (kept for old files only; trimesh
#: does not read it either): for meshio or trimesh, write ``.ply``.
MESH_FORMATS = (".ply", ".vtp", ".gii", ".vtk")

_PLY_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}


def write_mesh(
    path,
    vertices,
    triangles,
    *,
    vertex_data=None,
    face_data=None,
    binary=True,
    scanner=False,
    comment="dipy_spinverse mesh",
):
    """Write a triangle mesh atomically; the extension picks the format.

    Parameters
    ----------
    path : str or os.PathLike
        ``.ply`` (binary little-endian or ASCII), ``.vtp`` (VTK XML PolyData,
        base64 binary), ``.gii`` (GIFTI surface: a ``NIFTI_INTENT_POINTSET``
        and a ``NIFTI_INTENT_TRIANGLE`` array) or legacy ASCII ``.vtk``.
        Written to a temporary file in the same folder, then renamed.
    vertices : array_like (V, 3)
    triangles : array_like of int (T, 3)
    vertex_data : dict of array_like (V,), optional
        Per-vertex values, written as PLY vertex properties, VTK
        ``PointData`` (integers as 32-bit ints, booleans as bytes, the rest
        as doubles) and GIFTI data arrays (``NIFTI_INTENT_NONE``, named by
        their ``Name`` metadata; int32 or float32); left out of legacy
        ``.vtk``.
    face_data : dict of array_like (T,), optional
        Per-triangle values, written as PLY face properties and VTK
        ``CellData``; left out of GIFTI and legacy ``.vtk``. meshio 5 reads
        PLY face properties from ASCII files only (its binary reader fails on
        them; trimesh reads both): put data meant for meshio in
        ``vertex_data`` of a binary PLY.
    binary : bool
        Binary PLY (the other formats ignore it).
    scanner : bool
        The vertices are scanner coordinates (mm): GIFTI's coordinate system
        says so (``NIFTI_XFORM_SCANNER_ANAT``), else it is unknown.
    comment : str
        One line of description, at most 255 characters (PLY comment, VTK
        and GIFTI metadata; in VTK XML ``--`` is written ``- -``).

    Returns
    -------
    str
        The path written.

    Raises
    ------
    ValueError
        No triangles (an empty mesh file breaks meshio and VTK, so none is
        written), an unknown extension, or face data of the wrong length.
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
    comment = _check_comment(comment)
    data = _columns(face_data, len(triangles), "face_data", "triangle")
    points = _columns(vertex_data, len(vertices), "vertex_data", "vertex")
    with atomic_write(path) as tmp:
        if ext == ".ply":
            _write_ply(
                tmp,
                vertices,
                triangles,
                binary=binary,
                data=data,
                points=points,
                comment=comment,
            )
        elif ext == ".vtp":
            _write_vtp(
                tmp, vertices, triangles, data=data, points=points, comment=comment
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
            _write_vtk(tmp, vertices, triangles, comment=comment)
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
            values = values.astype(np.int32)
        else:
            values = values.astype(np.float64)
        columns[str(name)] = values
    return columns


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


_PLY_NAMES = {np.dtype(np.int32): "int", np.dtype(np.uint8): "uchar"}


def _write_ply(
    path, vertices, triangles, *, binary, data=None, points=None, comment=""
):
    data, points = data or {}, points or {}

    def props(columns):
        return "".join(
            f"property {_PLY_NAMES.get(v.dtype, 'double')} {k}\n"
            for k, v in columns.items()
        )

    fmt = "binary_little_endian" if binary else "ascii"
    header = (
        f"ply\nformat {fmt} 1.0\ncomment {comment}\n"
        f"element vertex {len(vertices)}\nproperty double x\nproperty double y\n"
        f"property double z\n{props(points)}element face {len(triangles)}\n"
        f"property list uchar int vertex_indices\n{props(data)}end_header\n"
    )
    vertex_columns = [*vertices.T, *points.values()]
    face_columns = [np.full(len(triangles), 3), *triangles.T, *data.values()]
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        if binary:
            fields = [(k, "<f8") for k in "xyz"]
            fields += [(k, v.dtype.newbyteorder("<")) for k, v in points.items()]
            f.write(_records(fields, vertex_columns).tobytes())
            fields = [("n", "u1"), *((f"v{i}", "<i4") for i in range(3))]
            fields += [(k, v.dtype.newbyteorder("<")) for k, v in data.items()]
            f.write(_records(fields, face_columns).tobytes())
        else:
            _write_rows(f, vertex_columns, ["%.17g"] * 3)
            _write_rows(f, face_columns, ["%d"] * 4)


def _records(fields, columns):
    """A packed record array (the PLY binary layout) of the given columns."""
    rec = np.zeros(len(columns[0]), dtype=fields)
    for (name, _), column in zip(fields, columns, strict=True):
        rec[name] = column
    return rec


def _write_rows(f, columns, fmts):
    """ASCII rows: the leading columns with ``fmts``, then the data columns
    (integers as integers, floats to full precision)."""
    fmts = fmts + [
        "%.17g" if c.dtype == np.float64 else "%d" for c in columns[len(fmts) :]
    ]
    rows = np.empty((len(columns[0]), len(columns)), dtype=object)
    for i, column in enumerate(columns):
        rows[:, i] = column
    np.savetxt(f, rows, fmt=fmts)


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
    array.text = base64.b64encode(np.uint64(len(raw)).tobytes() + raw).decode()
    return array


def _check_comment(comment):
    """One line of at most 255 characters: a PLY comment and the legacy VTK
    title are one header line (VTK reads 256 bytes of it)."""
    comment = str(comment)
    if "\n" in comment or "\r" in comment or len(comment) > 255:
        raise ValueError(
            "comment must be one line of at most 255 characters (a PLY comment "
            f"and the VTK title are one header line), got {comment[:40]!r}..."
        )
    return comment


def _write_vtp(path, vertices, triangles, *, data=None, points=None, comment=""):
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
    piece = ET.SubElement(
        ET.SubElement(root, "PolyData"),
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
    points = ET.SubElement(piece, "Points")
    _vtk_array(points, vertices.astype(np.float64), name="Points", components=3)
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
    connectivity = read(polys["connectivity"]).astype(np.int64)
    offsets = read(polys["offsets"]).astype(np.int64)
    if np.any(np.diff(np.r_[0, offsets]) != 3):
        raise ValueError(f"{path}: only triangle meshes are supported.")
    return vertices, connectivity.reshape(-1, 3)


def _write_gifti(path, vertices, triangles, *, scanner, comment="", points=None):
    import nibabel as nib
    from nibabel.gifti import GiftiCoordSystem, GiftiDataArray, GiftiImage

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
    for name, values in (points or {}).items():
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


def _read_ply(path):
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise ValueError(f"{path} is not a PLY file.")
        fmt, elements = None, []
        while True:
            line = f.readline()
            if not line:
                raise ValueError(f"{path}: PLY header has no end_header.")
            words = line.decode("ascii", "replace").split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "end_header":
                break
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                elements.append((words[1], int(words[2]), []))
            elif words[0] == "property":
                elements[-1][2].append(words[1:])
        body = f.read()
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"{path}: unsupported PLY format {fmt!r}.")
    data = {}
    if fmt == "ascii":
        lines = iter(body.decode("ascii").splitlines())
        for name, count, props in elements:
            rows = [next(lines).split() for _ in range(count)]
            data[name] = (props, rows)
        vertices, triangles = _ply_ascii_arrays(path, data)
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        offset = 0
        for name, count, props in elements:
            dtype = _ply_dtype(path, props, order)
            rec = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
            offset += count * dtype.itemsize
            data[name] = rec
        vertices = np.stack(
            [data["vertex"][k].astype(float) for k in ("x", "y", "z")], axis=1
        )
        faces = data.get("face")
        if faces is None:
            triangles = np.zeros((0, 3), dtype=np.int64)
        else:
            if np.any(faces["n"] != 3):
                raise ValueError(f"{path}: only triangle meshes are supported.")
            triangles = faces["v"].astype(np.int64)
    return vertices, triangles


def _ply_dtype(path, props, order):
    """Structured dtype of one binary PLY element; lists must hold triangles."""
    fields = []
    for prop in props:
        if prop[0] == "list":
            # Every list is read as a triangle: count then three indices; the
            # counts are checked afterwards.
            fields += [("n", order + _PLY_TYPES[prop[1]])]
            fields += [("v", order + _PLY_TYPES[prop[2]], (3,))]
        else:
            if prop[0] not in _PLY_TYPES:
                raise ValueError(f"{path}: unknown PLY type {prop[0]!r}.")
            fields.append((prop[1], order + _PLY_TYPES[prop[0]]))
    return np.dtype(fields)


def _ply_ascii_arrays(path, data):
    props, rows = data["vertex"]
    names = [p[-1] for p in props]
    cols = [names.index(k) for k in ("x", "y", "z")]
    vertices = np.array([[float(r[c]) for c in cols] for r in rows]).reshape(-1, 3)
    triangles = []
    if "face" in data:
        props, rows = data["face"]
        # Scalar properties take one column each, so the list starts at its
        # property index.
        start = next((i for i, p in enumerate(props) if p[0] == "list"), None)
        if start is None:
            raise ValueError(f"{path}: PLY faces have no vertex list.")
        for r in rows:
            if int(r[start]) != 3:
                raise ValueError(f"{path}: only triangle meshes are supported.")
            triangles.append([int(v) for v in r[start + 1 : start + 4]])
    return vertices, np.array(triangles, dtype=np.int64).reshape(-1, 3)


def _write_vtk(path, vertices, triangles, *, comment=""):
    with open(path, "w") as f:
        f.write(
            f"# vtk DataFile Version 3.0\n{comment}\nASCII\n"
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
