"""Tetrahedral cell meshes: the built-in templates and their checks.

A cell is a conforming tetrahedral mesh of its inside (:class:`TetMesh`).
The templates need no external mesher: a ball and a tube are cut from a cubic
lattice split into Kuhn tetrahedra (six per cube, the same diagonal in every
cube, so the split is conforming), then mapped onto the curved shape. The map
is an "O-grid": an inner core keeps the lattice's shape and the outer layers
blend from the core's boundary to the curved surface. Lattice tetrahedra with
two faces on a curved boundary would be flattened by the map (the surface is
smooth where the lattice has an edge), so they are cut away first.

Axon-like families (bent, beaded, swollen tubes) are smooth maps of the tube
template: the true meshes of the experiments and the training shapes of the
shape code.

Lengths are in um.
"""

import itertools
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..checks import check_int, check_number, check_positive
from ..sim.grid import signed_volumes as tet_signed_volumes

__all__ = [
    "TetMesh",
    "ball_mesh",
    "tube_mesh",
    "axon_mesh",
    "axon_deformation",
    "surface_tet_mesh",
    "signed_volumes",
    "OUTWARD_FACES",
]

#: Local vertex triples of the four faces of a positively oriented tetrahedron,
#: each ordered so that its normal ``(b - a) x (c - a)`` points outwards.
OUTWARD_FACES = np.array([[1, 2, 3], [0, 3, 2], [0, 1, 3], [0, 2, 1]])

# Fraction of the radius kept as the undeformed lattice core of the O-grid
# map. Measured on the ball (R 5 um, 4 to 16 cells across): 0.3 keeps every
# tetrahedron positive with a quality (volume over rms edge cubed, 1 for a
# regular one) >= 0.08; 0.5 already inverts tetrahedra at the core's corners.
_CORE = 0.3


@dataclass(frozen=True, eq=False)
class TetMesh:
    """A conforming tetrahedral mesh of one cell (um).

    Parameters
    ----------
    vertices : array_like (V, 3)
        Vertex positions in um.
    tets : array_like of int (T, 4)
        Vertex indices of each tetrahedron, positively oriented (checked).
    """

    vertices: np.ndarray
    tets: np.ndarray

    def __post_init__(self):
        vertices = np.array(self.vertices, dtype=np.float64)
        if vertices.ndim != 2 or vertices.shape[1] != 3:
            raise ValueError(
                f"vertices must be an array (V, 3) of positions in um, got shape "
                f"{vertices.shape}."
            )
        raw = np.asarray(self.tets)
        if raw.ndim != 2 or raw.shape[1] != 4:
            raise ValueError(
                f"tets must be an array (T, 4) of vertex indices, got shape "
                f"{raw.shape}."
            )
        tets = raw.astype(np.int64)
        if not np.array_equal(tets, raw):
            raise ValueError("tets must hold integer vertex indices.")
        if len(tets) == 0:
            raise ValueError("a TetMesh needs at least one tetrahedron.")
        if tets.min() < 0 or tets.max() >= len(vertices):
            raise ValueError("tets refer to vertices that do not exist.")
        if not np.all(np.isfinite(vertices)):
            raise ValueError("vertices must be finite (um).")
        vertices.flags.writeable = False
        tets.flags.writeable = False
        object.__setattr__(self, "vertices", vertices)
        object.__setattr__(self, "tets", tets)
        n_bad = int(np.sum(self.volumes <= 0))
        if n_bad:
            raise ValueError(
                f"{n_bad} of {len(tets)} tetrahedra have volume <= 0; orient them "
                "positively (swap two vertices) or fix the inverted ones."
            )

    @property
    def n_vertices(self):
        """Number of vertices."""
        return len(self.vertices)

    @property
    def n_tets(self):
        """Number of tetrahedra."""
        return len(self.tets)

    @cached_property
    def volumes(self):
        """Signed volume of each tetrahedron (um^3)."""
        return signed_volumes(self.vertices, self.tets)

    @property
    def volume(self):
        """Volume of the cell (um^3)."""
        return float(self.volumes.sum())

    @cached_property
    def boundary_faces(self):
        """Outward-oriented boundary triangles, (F, 3) vertex indices."""
        return boundary_triangles(self.tets)

    @cached_property
    def boundary_vertices(self):
        """Indices of the vertices on the boundary, sorted."""
        return np.unique(self.boundary_faces)

    @property
    def surface_area(self):
        """Area of the boundary (um^2)."""
        return float(triangle_areas(self.vertices, self.boundary_faces).sum())

    def quality(self):
        """Shape quality of each tetrahedron: 1 regular, 0 flat.

        ``6 sqrt(2) V / l_rms^3`` with ``l_rms`` the rms edge length; negative
        for an inverted tetrahedron.
        """
        return tet_quality(self.vertices, self.tets)

    def moved(self, vertices):
        """The same connectivity with new vertex positions."""
        return TetMesh(vertices=vertices, tets=self.tets)


def signed_volumes(vertices, tets):
    """Signed volumes ``det(b - a, c - a, d - a) / 6`` of tetrahedra (numpy).

    Parameters
    ----------
    vertices : array_like (V, 3)
        Vertex positions.
    tets : array_like of int (T, 4)
        Tetrahedra as vertex indices ``(a, b, c, d)``.

    Returns
    -------
    ndarray (T,)
        The signed volumes, in the cube of the vertices' unit.
    """
    return tet_signed_volumes(np.asarray(vertices)[np.asarray(tets)])


def tet_quality(vertices, tets):
    """``6 sqrt(2) V / l_rms^3`` per tetrahedron (1 regular, <= 0 inverted)."""
    p = np.asarray(vertices)[np.asarray(tets)]
    pairs = list(itertools.combinations(range(4), 2))
    lengths2 = np.stack(
        [np.sum((p[:, i] - p[:, j]) ** 2, axis=1) for i, j in pairs], axis=1
    )
    rms = np.sqrt(lengths2.mean(axis=1))
    return 6.0 * np.sqrt(2.0) * signed_volumes(vertices, tets) / rms**3


def triangle_areas(vertices, triangles):
    """Areas of triangles (um^2)."""
    p = np.asarray(vertices)[np.asarray(triangles)]
    return 0.5 * np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1)


def boundary_triangles(tets):
    """Faces that belong to one tetrahedron only, outward oriented."""
    tets = np.asarray(tets)
    faces = tets[:, OUTWARD_FACES].reshape(-1, 3)
    _, inverse, counts = np.unique(
        np.sort(faces, axis=1), axis=0, return_inverse=True, return_counts=True
    )
    return faces[counts[inverse.ravel()] == 1]


# --------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------
def ball_mesh(radius=5.0, *, resolution=5, centre=(0.0, 0.0, 0.0), match_volume=True):
    """A tetrahedral ball.

    Parameters
    ----------
    radius : float
        Radius in um.
    resolution : int
        Lattice cells per radius (>= 2). 5 gives 5,496 tetrahedra (1,164
        vertices), the default of the simulator's tests and benchmark.
    centre : array_like (3,)
        Centre in um.
    match_volume : bool
        Scale the mesh so that its volume is the ball's (the boundary
        vertices then lie slightly outside the sphere, 0.4% at resolution 5).
        The inscribed polyhedron misses volume near the surface, where the
        second moment of position (the signal's long-time limit) weighs most;
        matching the volume corrects that moment to first order too (5/3
        times the volume deficit on both sides). Else the boundary vertices
        lie on the sphere.

    Returns
    -------
    TetMesh
    """
    radius = check_positive(radius, "radius", "um")
    n = check_int(resolution, "resolution", 2)
    points, tets = _kuhn_lattice((2 * n, 2 * n, 2 * n), (-n, -n, -n))
    curved = np.ones(3, dtype=bool)
    tets = _cut_doubly_exposed(points, tets, curved, n)
    unit = _o_grid(points / n, curved)
    if match_volume:
        ratio = 4.0 / 3.0 * np.pi / signed_volumes(unit, tets).sum()
        unit = unit * ratio ** (1.0 / 3.0)
    centre = np.asarray(centre, dtype=float)
    if centre.shape != (3,):
        raise ValueError(f"centre must be a point (x, y, z) in um, got {centre!r}.")
    return _compact(unit * radius + centre, tets)


def tube_mesh(radius=4.0, length=20.0, *, resolution=4, layers=None, match_volume=True):
    """A closed cylinder segment (a tube with flat caps) along z, centred at 0.

    Parameters
    ----------
    radius : float
        Radius in um; the side vertices lie on the cylinder.
    length : float
        Length in um between the caps.
    resolution : int
        Lattice cells per radius across the section (>= 2).
    layers : int, optional
        Lattice layers along the axis (default: cubes about as long as wide).
    match_volume : bool
        Scale the section so that its area is the disc's (see
        :func:`ball_mesh`; the section's second moment weighs 2 times the
        area deficit, corrected to first order by the same scaling).

    Returns
    -------
    TetMesh
    """
    radius = check_positive(radius, "radius", "um")
    length = check_positive(length, "length", "um")
    n = check_int(resolution, "resolution", 2)
    if layers is None:
        layers = max(2, int(round(length / (radius / n))))
    layers = check_int(layers, "layers", 1)
    points, tets = _kuhn_lattice((2 * n, 2 * n, layers), (-n, -n, 0))
    curved = np.array([True, True, False])
    tets = _cut_doubly_exposed(points, tets, curved, n)
    section = _o_grid(points[:, :2] / n, np.ones(2, dtype=bool))
    if match_volume:
        flat = np.column_stack([section, points[:, 2]])
        ratio = np.pi * layers / signed_volumes(flat, tets).sum()
        section = section * np.sqrt(ratio)
    z = (points[:, 2] / layers - 0.5) * length
    return _compact(np.column_stack([section * radius, z]), tets)


def axon_mesh(
    radius=4.0,
    length=20.0,
    *,
    curvature=0.0,
    beading_amplitude=0.0,
    beading_period=10.0,
    swelling=0.0,
    fanning=0.0,
    beading_phase=0.0,
    bend_azimuth=0.0,
    resolution=4,
    layers=None,
):
    """An axon-like tube: bent, beaded, swollen or fanning.

    The tube of :func:`tube_mesh` (axis z, from ``-length / 2`` to
    ``length / 2``) is mapped smoothly, so every member of the family has the
    same connectivity: radius ``radius * (1 + beading_amplitude * cos(2 pi z /
    beading_period + beading_phase) + swelling * (1 - (2 z / length)^2)) * (1
    + fanning * 2 z / length)``, then the axis bent into a circular arc of the
    given curvature in the plane of z and the direction at ``bend_azimuth``
    from x (arc length preserved): :func:`axon_deformation`.

    Parameters
    ----------
    radius, length : float
        Mean radius and axis length in um.
    curvature : float
        Curvature of the axis in 1/um (0: straight); ``curvature * length``
        is the bend angle in radians, below pi.
    beading_amplitude : float
        Relative amplitude of a periodic radius modulation, in [0, 0.8].
    beading_period : float
        Period of the beading in um.
    swelling : float
        Relative radius excess at the middle (a parabolic profile), > -0.8.
    fanning : float
        Relative radius change from the middle to each end (a cone), in
        (-0.8, 0.8).
    beading_phase : float
        Phase of the beading at z = 0, radians.
    bend_azimuth : float
        Direction of the bend across the axis, radians from x.
    resolution, layers : int
        As :func:`tube_mesh`.

    Returns
    -------
    TetMesh
    """
    tube = tube_mesh(radius, length, resolution=resolution, layers=layers)
    vertices = axon_deformation(
        tube.vertices,
        length,
        curvature=curvature,
        beading_amplitude=beading_amplitude,
        beading_period=beading_period,
        swelling=swelling,
        fanning=fanning,
        beading_phase=beading_phase,
        bend_azimuth=bend_azimuth,
    )
    return TetMesh(vertices=vertices, tets=tube.tets)


def axon_deformation(
    vertices,
    length,
    *,
    curvature=0.0,
    beading_amplitude=0.0,
    beading_period=10.0,
    swelling=0.0,
    fanning=0.0,
    beading_phase=0.0,
    bend_azimuth=0.0,
):
    """The smooth map of :func:`axon_mesh` applied to a straight tube's vertices.

    Parameters
    ----------
    vertices : array_like (V, 3)
        A tube along z centred at 0 (um), e.g. :func:`tube_mesh`'s.
    length : float
        The tube's length (um): the swelling and fanning profiles span it.
    curvature, beading_amplitude, beading_period, swelling, fanning,
    beading_phase, bend_azimuth
        As :func:`axon_mesh`.

    Returns
    -------
    ndarray (V, 3)
    """
    length = check_positive(length, "length", "um")
    curvature = check_number(curvature, "curvature", minimum=0.0)
    if curvature * length >= np.pi:
        raise ValueError(
            f"curvature * length must be < pi (a bend below 180 degrees), got "
            f"{curvature * length:g}; shorten the axon or lower the curvature."
        )
    amp = check_number(beading_amplitude, "beading_amplitude", minimum=0, maximum=0.8)
    period = check_positive(beading_period, "beading_period", "um")
    swelling = check_number(swelling, "swelling", minimum=-0.8, maximum=5.0)
    fanning = check_number(fanning, "fanning", minimum=-0.8, maximum=0.8)
    phase = check_number(beading_phase, "beading_phase")
    azimuth = check_number(bend_azimuth, "bend_azimuth")
    x, y, z = np.asarray(vertices, dtype=np.float64).T
    s = 2.0 * z / length
    wave = np.cos(2.0 * np.pi * z / period + phase)
    scale = 1.0 + amp * wave + swelling * (1.0 - s * s)
    scale = scale * (1.0 + fanning * s)
    x, y = x * scale, y * scale
    if curvature > 0:
        # Bend the axis into an arc of radius 1/curvature in the plane of z
        # and u (the direction at the azimuth), centred on u = 1/curvature;
        # u is the distance from the axis towards the arc's centre, negated.
        c, n = np.cos(azimuth), np.sin(azimuth)
        u, w = c * x + n * y, -n * x + c * y
        rc = 1.0 / curvature
        angle = z * curvature
        r = rc - u
        u, z = rc - r * np.cos(angle), r * np.sin(angle)
        x, y = c * u - n * w, n * u + c * w
    return np.column_stack([x, y, z])


def surface_tet_mesh(vertices, triangles, *, max_volume=None, min_ratio=1.5):
    """Tetrahedral mesh of the inside of a closed surface, with TetGen.

    Needs the optional ``tetgen`` package (``pip install
    "dipy_spinverse[mesh]"``); the built-in templates need no mesher.

    Parameters
    ----------
    vertices : array_like (V, 3)
        Surface vertices (um).
    triangles : array_like of int (F, 3)
        A closed, manifold, non-self-intersecting triangle surface.
    max_volume : float, optional
        Largest tetrahedron volume (um^3); default: no bound.
    min_ratio : float
        Radius-edge ratio bound of TetGen's quality refinement (> 1; lower
        is better-shaped tetrahedra and more of them).

    Returns
    -------
    TetMesh
        Positively oriented tetrahedra; its surface holds the input surface's
        vertices (TetGen may add points on it).
    """
    try:
        import tetgen
    except ImportError as err:
        raise ImportError(
            "surface_tet_mesh needs the tetgen package: pip install "
            '"dipy_spinverse[mesh]" (or pip install tetgen).'
        ) from err
    vertices = np.asarray(vertices, dtype=np.float64)
    triangles = np.asarray(triangles, dtype=np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) < 4:
        raise ValueError(f"vertices must be (V >= 4, 3), got {vertices.shape}.")
    if triangles.ndim != 2 or triangles.shape[1] != 3:
        raise ValueError(f"triangles must be (F, 3), got {triangles.shape}.")
    min_ratio = check_number(min_ratio, "min_ratio", minimum=1.0)
    bound = -1.0 if max_volume is None else check_positive(max_volume, "max_volume")
    try:
        nodes, tets, *_ = tetgen.TetGen(vertices, triangles).tetrahedralize(
            order=1,
            quality=True,
            minratio=min_ratio,
            fixedvolume=max_volume is not None,
            maxvolume=bound,
        )
    except RuntimeError as err:
        raise ValueError(
            f"TetGen could not mesh the surface ({err}); it must be closed, "
            "manifold and free of self-intersections."
        ) from err
    tets = np.asarray(tets, dtype=np.int64)
    if len(tets) == 0:
        raise ValueError("TetGen returned no tetrahedra: is the surface closed?")
    # TetGen's orientation convention is not this package's: make every
    # tetrahedron positive by swapping two of its vertices.
    flip = signed_volumes(nodes, tets) < 0
    tets[flip] = tets[flip][:, [1, 0, 2, 3]]
    return _compact(np.asarray(nodes, dtype=np.float64), tets)


def _kuhn_lattice(cells, origin):
    """Integer lattice points and six Kuhn tetrahedra per cube."""
    nx, ny, nz = cells
    axes = [np.arange(c + 1) + o for c, o in zip(cells, origin, strict=True)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    index = np.arange(len(points)).reshape(nx + 1, ny + 1, nz + 1)
    corner = index[:-1, :-1, :-1].ravel()
    stride = np.array([(ny + 1) * (nz + 1), nz + 1, 1])
    tets = []
    for perm in itertools.permutations(range(3)):
        path = [np.zeros(3, dtype=int)]
        for axis in perm:
            step = path[-1].copy()
            step[axis] = 1
            path.append(step)
        tets.append(np.stack([corner + step @ stride for step in path], axis=1))
    tets = np.concatenate(tets)
    points = points.astype(np.float64)
    negative = signed_volumes(points, tets) < 0
    tets[negative] = tets[negative][:, [0, 2, 1, 3]]
    return points, tets


def _cut_doubly_exposed(points, tets, curved, n):
    """Drop tetrahedra with two faces on the curved boundary, until none is left."""
    while True:
        faces = tets[:, OUTWARD_FACES]  # (T, 4, 3)
        flat = np.sort(faces.reshape(-1, 3), axis=1)
        _, inverse, counts = np.unique(
            flat, axis=0, return_inverse=True, return_counts=True
        )
        exposed = (counts[inverse.ravel()] == 1).reshape(-1, 4)
        corners = points[faces][..., curved]  # (T, 4, 3, k)
        on_curved = np.abs(corners).max(axis=-1) >= n - 0.5  # sup norm = n
        on_curved = on_curved.all(axis=-1) & exposed
        bad = on_curved.sum(axis=1) >= 2
        if not bad.any():
            return tets
        tets = tets[~bad]


def _o_grid(unit, curved):
    """Map the unit cube (sup norm <= 1) onto the unit ball in the curved axes."""
    sup = np.abs(unit).max(axis=1, keepdims=True)
    safe = np.where(sup > 0, sup, 1.0)
    direction = unit / safe  # on the cube's surface (the centre stays at 0)
    norm = np.linalg.norm(direction, axis=1, keepdims=True)
    on_sphere = direction / np.where(norm > 0, norm, 1.0)
    blend = np.clip((sup - _CORE) / (1.0 - _CORE), 0.0, 1.0)
    outer = direction * _CORE * (1.0 - blend) + on_sphere * blend
    mapped = np.where(sup <= _CORE, unit, outer)
    return mapped if curved.all() else np.where(curved, mapped, unit)


def _compact(vertices, tets):
    """Drop unused vertices and renumber."""
    used = np.unique(tets)
    renumber = np.full(len(vertices), -1, dtype=np.int64)
    renumber[used] = np.arange(len(used))
    return TetMesh(vertices=vertices[used], tets=renumber[tets])
