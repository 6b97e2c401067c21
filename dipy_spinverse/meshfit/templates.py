"""The fits' template cells and their sizes: the built-in ball and tube
(:data:`TEMPLATES`, :data:`AXON_TUBE`), a mesh's equivalent radius
(:func:`template_radius`, :func:`axis_radius`), templates scaled to a radius
and the size screen of :func:`~.fit.fit_mesh` (:func:`screen_size`), and the
differentiable cell volume the fits keep inside the voxel.
"""

import math

import numpy as np
import torch
from scipy import optimize

from ..checks import (
    check_choice,
)
from .fem import mesh_signal
from .mesh import TetMesh, ball_mesh, tube_mesh
from .shape import (
    AxonShape,
    axon_shape,
)

__all__ = [
    "TEMPLATES",
    "AXON_TUBE",
    "SCREEN_RADII",
    "axis_radius",
    "template_radius",
    "scaled_template",
    "screen_size",
    "axon_template",
    "template_mesh",
    "mesh_volume",
    "check_box",
]

#: Built-in templates: a ball (radius 4 um) and a closed tube (radius 3 um,
#: 20 um long), coarse enough for a fit of a few minutes on 2 cores.
TEMPLATES = {
    "ball": lambda: ball_mesh(4.0, resolution=3),
    "tube": lambda: tube_mesh(3.0, 20.0, resolution=3, layers=10),
}


#: The tube of ``template="tube"`` with ``code="axon"``: the built-in tube
#: with 1 um layers along the axis instead of 2 um. Beads of 10 um period on
#: 2 um layers are five straight pieces a period: the fitted amplitude of a
#: held-out beaded axon came out 27% high (noise free, reduced protocol),
#: 1.2% on 1 um layers (period -1.7% and -0.6%).
AXON_TUBE = {"radius": 3.0, "length": 20.0, "resolution": 3, "layers": 20}


def axis_radius(mesh):
    """Mean distance of surface vertices from the principal axis (um).

    Cap vertices (within 5% of the length of either end along the axis) are
    left out.
    """
    points = mesh.vertices[mesh.boundary_vertices]
    centre = points.mean(0)
    _, _, vt = np.linalg.svd(points - centre, full_matrices=False)
    axis = vt[0]
    along = (points - centre) @ axis
    span = along.max() - along.min()
    side = (along > along.min() + 0.05 * span) & (along < along.max() - 0.05 * span)
    radial = (points - centre) - np.outer(along, axis)
    return float(np.linalg.norm(radial[side], axis=1).mean())


def axon_template(template):
    """The :class:`AxonShape` of a tube template (name or TetMesh).

    Parameters
    ----------
    template : str, TetMesh or AxonShape
        ``"tube"`` (the built-in :data:`AXON_TUBE`), a straight tube mesh, or
        an axon family already built.

    Returns
    -------
    AxonShape
    """
    if isinstance(template, AxonShape):
        return template
    if isinstance(template, str):
        check_choice(template, "template", tuple(TEMPLATES))
        if template != "tube":
            raise ValueError(
                "code='axon' needs a tube template (template='tube' or a "
                "meshfit.tube_mesh), got template='ball'."
            )
        template = tube_mesh(**AXON_TUBE)
    if not isinstance(template, TetMesh):
        raise ValueError(
            "code='axon' needs template='tube', a straight tube TetMesh or an "
            f"AxonShape, got {type(template).__name__}."
        )
    return axon_shape(template)


def check_box(cell_volume, box_volume):
    """The voxel (``box_volume``) must hold the start's cell: the background
    weighs ``1 - cell / box``, which would turn negative.

    Parameters
    ----------
    cell_volume : float
        The start's cell volume in um^3.
    box_volume : float or None
        The voxel's volume in um^3 (None: no background, nothing to check).
    """
    if box_volume is not None and not cell_volume < box_volume:
        raise ValueError(
            f"box_volume={box_volume:g} um^3 is not larger than the start's cell "
            f"({cell_volume:g} um^3); box_volume is the whole voxel's volume, "
            "cell and background together."
        )


def mesh_volume(vertices, tets):
    """Volume of a mesh (um^3) from vertex positions, differentiable.

    Parameters
    ----------
    vertices : torch.Tensor, shape (V, 3)
        Vertex positions in um.
    tets : torch.Tensor, shape (T, 4)
        Tetrahedra, positively oriented.

    Returns
    -------
    torch.Tensor
        The volume, a scalar.
    """
    p = vertices[tets]
    return torch.linalg.det(p[:, 1:] - p[:, :1]).sum() / 6.0


def template_mesh(template):
    """A template's mesh and kind.

    Parameters
    ----------
    template : str or TetMesh
        A name of :data:`TEMPLATES` or a user's mesh.

    Returns
    -------
    mesh : TetMesh
    kind : str
        The template's name, or ``"mesh"`` for a user's mesh.
    """
    if isinstance(template, str):
        check_choice(template, "template", tuple(TEMPLATES))
        return TEMPLATES[template](), template
    if isinstance(template, TetMesh):
        return template, "mesh"
    raise ValueError(
        f"template must be one of {tuple(TEMPLATES)}, a TetMesh or a "
        f"SpectralShape, got {type(template).__name__}."
    )


#: Radii (um) of the size screen of :func:`fit_mesh` (ratio 1.26).
SCREEN_RADII = tuple(np.geomspace(1.0, 16.0, 13))


# Tolerance of the screen's refinement in log r: 0.2 % of the radius.
_LOG_TOL = 2e-3


def template_radius(mesh, kind):
    """The radius (um) of a cell mesh, as :attr:`MeshFit.radius` reports it:
    the ball of the same volume for ``"ball"``, the mean distance of the side
    vertices from the principal axis for ``"tube"`` (:func:`axis_radius`),
    ``3 V / A`` otherwise.

    Parameters
    ----------
    mesh : Mesh
        The cell mesh (um).
    kind : str
        The template's kind: ``"ball"``, ``"tube"`` or another.

    Returns
    -------
    float
        The radius, um.
    """
    if kind == "ball":
        return (3.0 * mesh.volume / (4.0 * np.pi)) ** (1.0 / 3.0)
    if kind == "tube":
        return axis_radius(mesh)
    return 3.0 * mesh.volume / mesh.surface_area


def scaled_template(mesh, kind, radius):
    """``(mesh, kind)`` with the mesh scaled to ``radius`` (um): across the
    axis for a tube (its length kept), about the centroid otherwise.

    Parameters
    ----------
    mesh : Mesh
        The template mesh (um).
    kind : str
        The template's kind: ``"ball"``, ``"tube"`` or another.
    radius : float
        The radius wanted, um (as :func:`template_radius` measures it).

    Returns
    -------
    mesh : Mesh
        The scaled mesh.
    kind : str
        ``kind`` unchanged.
    """
    factor = np.full(3, radius / template_radius(mesh, kind))
    if kind == "tube":
        factor[2] = 1.0
    centre = mesh.vertices.mean(0)
    return mesh.moved(centre + (mesh.vertices - centre) * factor), kind


def screen_size(
    mesh,
    signal,
    protocol,
    *,
    kind="mesh",
    diffusivity=2e-3,
    length_scale=2.0,
    background=None,
    box_volume=None,
    radii=SCREEN_RADII,
):
    """The template radius (um) whose simulated signal best fits ``signal``.

    Scans ``radii``, then refines the best by Brent's bounded search in
    ``log r`` between its neighbours (``scipy.optimize.minimize_scalar``;
    unimodal there for the cells tried). The loss is the squared misfit of the
    b0-normalised signals (with ``background``, of the voxel's).

    Parameters
    ----------
    mesh : TetMesh
    signal : array_like or Tensor (n_acquisitions,)
        b0-normalised.
    protocol : Protocol
    kind : {"ball", "tube", "mesh"}
        How the mesh is scaled (:func:`scaled_template`).
    diffusivity : float
        Intrinsic diffusivity, mm^2/s.
    length_scale : float
        Cut-off of the mesh eigenbasis (um), as in :func:`fit_mesh`.
    background : array_like (n_acquisitions,), optional
        b0-normalised signal of the rest of a voxel of ``box_volume``.
    box_volume : float, optional
        Volume of that voxel (um^3); larger radii are skipped.
    radii : sequence of float
        The scanned radii (um).

    Returns
    -------
    float
    """
    target = torch.as_tensor(signal, dtype=torch.float64)

    def misfit(log_r):
        scaled, _ = scaled_template(mesh, kind, math.exp(log_r))
        if box_volume is not None and scaled.volume >= box_volume:
            return math.inf  # larger than the voxel: not a candidate
        with torch.no_grad():
            predicted = mesh_signal(
                scaled, protocol, diffusivity=diffusivity, length_scale=length_scale
            )
            if background is not None:
                fraction = scaled.volume / box_volume
                predicted = fraction * predicted + (1.0 - fraction) * background
        return float(((predicted - target) ** 2).sum())

    radii = np.asarray(radii, dtype=float)
    if kind == "tube":
        # Wider than long, a tube's principal axis turns across it.
        length = np.ptp(mesh.vertices[:, 2])
        radii = radii[radii <= length / 2]
    logs = np.log(radii)
    losses = [misfit(x) for x in logs]
    best = int(np.argmin(losses))
    low, high = logs[max(best - 1, 0)], logs[min(best + 1, len(logs) - 1)]
    refined = optimize.minimize_scalar(
        misfit, bounds=(low, high), method="bounded", options={"xatol": _LOG_TOL}
    )
    if refined.fun < losses[best]:
        return float(math.exp(refined.x))
    return float(math.exp(logs[best]))
