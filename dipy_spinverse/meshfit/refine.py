"""Refine a Spinverse label surface into a smooth cell mesh.

The label search gives each cell as a set of grid cells: a staircase with
the grid's spacing. :func:`refine_cell` starts a template mesh from that
surface (:func:`~dipy_spinverse.meshfit.surface.fit_surface`: sized and placed
from the label's volume and principal axis, then matched to its surface),
then fits the shape code to the voxel's signal
(:func:`~dipy_spinverse.meshfit.fit.fit_mesh`).

The voxel holds more than the cell: the rest of the box (extracellular
water, other cells) is the grid simulator's signal of the fitted
permeability started outside the cell (:func:`dipy_spinverse.sim.forward.simulate`
with ``initial``), held fixed, and the voxel signal is ``f S_mesh + (1 - f)
S_rest`` with ``f`` the mesh's volume over the box's: the cell's volume is
fitted through the signal's weights too. Both signals are magnitudes, added
as real numbers (exact when neither changes sign, as for PGSE below the
first diffraction minimum; the slow exchange through a membrane of 1e-5 m/s
is left out of the mixture).
"""

import dataclasses

import numpy as np
import torch

from ..checks import (
    check_choice,
    check_int,
    check_number,
    check_options,
    check_positive,
)
from ..geometry.topology import barrier_mesh
from ..sim.forward import simulate
from ..sim.sequences import as_protocol
from ..sim.signals import normalise_b0
from .axonfit import AXON_START_PERIODS, check_axon_periods
from .fit import fit_mesh
from .mesh import ball_mesh, tube_mesh
from .result import MeshFit
from .shape import DIRECTIONS
from .surface import fit_surface

__all__ = [
    "REFINE_TEMPLATES",
    "REFINE_DEFAULTS",
    "check_refine_options",
    "refine_template",
    "refine_topology",
    "refine_cell",
    "largest_cell",
    "label_surface",
]

#: Templates of the refinement: a ball, or a closed tube along the label's
#: principal axis (an axon crossing a reflecting box is a closed tube).
REFINE_TEMPLATES = ("ball", "tube")
#: Shape codes of the refinement: the template's Laplace-Beltrami
#: coefficients, or (tube only) the axon family's eight parameters (radius,
#: bend, beads, swelling, fanning; ``fit_mesh(code="axon")``).
REFINE_CODES = ("spectral", "axon")

#: Options of :func:`refine_cell` and their defaults: small enough for a
#: voxel in about a minute on one core (a resolution-3 ball has 1,200
#: tetrahedra).
REFINE_DEFAULTS = dict(
    template="ball",
    resolution=3,
    layers=10,
    n_modes=8,
    directions="normal",
    surface_iter=100,
    max_iter=30,
    learning_rate=0.05,
    penalty=1e-4,
    length_scale=2.0,
    basis_every=5,
    code="spectral",
    axon_periods=AXON_START_PERIODS,
)


def check_refine_options(options=None):
    """Refinement options with their defaults, each checked.

    Parameters
    ----------
    options : dict, optional
        Keys of :data:`REFINE_DEFAULTS`.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        An unknown key (naming the known ones) or a value out of range.
    """
    options = check_options(
        options, "mesh_options", f"its keys: {sorted(REFINE_DEFAULTS)}"
    )
    unknown = sorted(set(options) - set(REFINE_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown mesh_options {unknown}; known: {sorted(REFINE_DEFAULTS)}."
        )
    out = {**REFINE_DEFAULTS, **options}
    out["template"] = check_choice(out["template"], "template", REFINE_TEMPLATES)
    out["directions"] = check_choice(out["directions"], "directions", DIRECTIONS)
    out["resolution"] = check_int(out["resolution"], "resolution", 2)
    for name in ("layers", "n_modes", "surface_iter", "max_iter", "basis_every"):
        out[name] = check_int(out[name], name, 1)
    out["learning_rate"] = check_positive(out["learning_rate"], "learning_rate", "um")
    out["penalty"] = check_number(out["penalty"], "penalty", minimum=0.0)
    out["length_scale"] = check_positive(out["length_scale"], "length_scale", "um")
    out["code"] = check_choice(out["code"], "code", REFINE_CODES)
    if out["code"] == "axon" and out["template"] != "tube":
        raise ValueError(
            "mesh_options code='axon' fits the axon family of a tube; add "
            "template='tube'."
        )
    out["axon_periods"] = tuple(check_axon_periods(out["axon_periods"]).tolist())
    return out


def label_surface(grid, cell):
    """The surface of the grid cells ``cell`` (bool, n_cells), capped where
    it meets the voxel's wall: the surface a refinement starts from.

    Parameters
    ----------
    grid : TetGrid
        The voxel's grid.
    cell : ndarray of bool (n_cells,)
        The grid cells inside.

    Returns
    -------
    InterfaceMesh
        The barrier surface of ``cell``, capped at the wall.
    """
    return barrier_mesh(
        grid, grid.interface_faces(cell), labels=cell.astype(int), cap_wall=True
    )


def largest_cell(grid, labels):
    """Label (>= 1) of the largest cell, 0 when there is none.

    Parameters
    ----------
    grid : TetGrid
        The grid (its cell volumes).
    labels : array_like of int (n_cells,)
        Cell labels, 0 outside.

    Returns
    -------
    int
        The label of largest volume, or 0.
    """
    labels = np.asarray(labels)
    if labels.max(initial=0) < 1:
        return 0
    volumes = np.bincount(
        np.maximum(labels, 0), weights=grid.cell_volumes, minlength=labels.max() + 1
    )
    return int(np.argmax(volumes[1:]) + 1)


def refine_topology(options=None):
    """Tetrahedra (T, 4) shared by every refined mesh of these options.

    The templates' connectivity depends on their resolution (and a tube's
    layers) only, not on their size or place.
    """
    options = check_refine_options(options)
    if options["template"] == "ball":
        return ball_mesh(1.0, resolution=options["resolution"]).tets
    return tube_mesh(
        1.0, 1.0, resolution=options["resolution"], layers=options["layers"]
    ).tets


def refine_template(kind, points, volume, *, resolution=3, layers=10):
    """Template mesh sized and placed from a label surface.

    Parameters
    ----------
    kind : {"ball", "tube"}
    points : ndarray (P, 3)
        Points of the label surface (um).
    volume : float
        The label's volume (um^3).
    resolution, layers : int
        Of :func:`~dipy_spinverse.meshfit.mesh.ball_mesh` /
        :func:`~dipy_spinverse.meshfit.mesh.tube_mesh` (the vertex count
        depends on them only, so every voxel's mesh has the same faces).

    Returns
    -------
    TetMesh
        A ball of the label's volume at its centroid, or a tube along its
        principal axis, as long as its extent along it, of its volume.
    """
    kind = check_choice(kind, "kind", REFINE_TEMPLATES)
    if kind == "ball":
        radius = (3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0)
        return ball_mesh(radius, resolution=resolution, centre=points.mean(0))
    tube, rotation, middle = _label_tube(points, volume, resolution, layers)
    return tube.moved(tube.vertices @ rotation + middle)


def _label_tube(points, volume, resolution, layers):
    """A straight tube along z, centred at the origin, as long as the label's
    extent along its principal axis and of its volume, with the frame
    (:func:`_principal_frame`) that places it on the label."""
    rotation, middle, length = _principal_frame(points)
    radius = np.sqrt(volume / (np.pi * length))
    tube = tube_mesh(radius, length, resolution=resolution, layers=layers)
    return tube, rotation, middle


def _principal_frame(points):
    """Frame of a label surface along its principal axis.

    Returns
    -------
    rotation : ndarray (3, 3)
        Orthonormal rows, the last the principal axis: a point ``v`` of a
        frame along z is ``v @ rotation + middle`` in the grid.
    middle : ndarray (3,)
        The middle of the points' extent along the axis.
    length : float
        That extent (um).
    """
    centre = points.mean(0)
    _, _, vt = np.linalg.svd(points - centre, full_matrices=False)
    along = (points - centre) @ vt[0]
    rotation = np.stack([vt[1], np.cross(vt[0], vt[1]), vt[0]])
    middle = centre + 0.5 * (along.max() + along.min()) * vt[0]
    return rotation, middle, float(along.max() - along.min())


def refine_cell(
    grid,
    labels,
    permeability,
    signal,
    protocol,
    *,
    label=None,
    diffusivity=2e-3,
    sigma=0.0,
    noise="gaussian",
    options=None,
):
    """Smooth mesh of one labelled cell, fitted to the voxel's signal.

    Parameters
    ----------
    grid : TetGrid
        The voxel's grid (the label surface and the mesh share its
        coordinates, um).
    labels : array_like of int (n_cells,)
        Cell labels of the fit (0 outside, ``k`` in cell ``k``).
    permeability : array_like (n_faces,)
        The fitted permeability (m/s): the rest of the box is simulated with
        it.
    signal : array_like (n_acquisitions,) or VoxelSignals
        The voxel's raw signal in protocol order (normalised by its b = 0
        volumes in :func:`fit_mesh`), or a one-voxel
        :class:`~dipy_spinverse.sim.signals.VoxelSignals`, normalised once
        upstream; with ``sigma`` its noise precisions weigh the mesh fit's
        misfit as they weigh the face fit's.
    protocol : Protocol or GradientTable
    label : int, optional
        The cell to refine (default: the largest, :func:`largest_cell`).
    diffusivity : float
        Intrinsic diffusivity, mm^2/s.
    sigma : float
        Noise relative to the b = 0 signal (0: unknown).
    noise : {"gaussian", "rician"}
    options : dict, optional
        :data:`REFINE_DEFAULTS` keys (:func:`check_refine_options`).

    Returns
    -------
    MeshFit
        ``kind`` is the template's (``"ball"`` or ``"tube"``), so that
        :attr:`MeshFit.radius` is that of the template's family;
        ``predicted_signal`` is the whole voxel's.

    Raises
    ------
    ValueError
        No cell with that label.
    """
    options = check_refine_options(options)
    protocol = as_protocol(protocol)
    labels = np.asarray(labels)
    label = largest_cell(grid, labels) if label is None else int(label)
    cell = labels == label
    if label < 1 or not cell.any():
        raise ValueError(f"no cell with label {label} to refine.")
    surface = label_surface(grid, cell)
    points = surface.vertices
    volume = float(grid.cell_volumes[cell].sum())
    rest = ~cell
    background = None
    if rest.any():
        with torch.no_grad():
            outside = simulate(
                grid,
                np.asarray(permeability, dtype=np.float64),
                protocol,
                diffusivity=diffusivity,
                initial=rest,
            ).numpy()
        background = normalise_b0(outside, protocol)
    settings = dict(
        diffusivity=diffusivity,
        sigma=sigma,
        noise=noise,
        max_iter=options["max_iter"],
        length_scale=options["length_scale"],
        background=background,
        # A cell that fills the whole box has no background to mix with.
        box_volume=None if background is None else grid.volume,
    )
    if options["code"] == "axon":
        return _refine_axon(points, volume, signal, protocol, options, settings)
    template = refine_template(
        options["template"],
        points,
        volume,
        resolution=options["resolution"],
        layers=options["layers"],
    )
    shape, start = fit_surface(
        surface.vertices,
        surface.triangles,
        template=template,
        n_modes=options["n_modes"],
        directions=options["directions"],
        max_iter=options["surface_iter"],
    )
    fit = fit_mesh(
        signal,
        protocol,
        template=shape,
        start=_untangled_start(shape, start),
        learning_rate=options["learning_rate"],
        penalty=options["penalty"],
        basis_every=options["basis_every"],
        **settings,
    )
    return MeshFit(
        mesh=fit.mesh,
        shape_code=fit.shape_code,
        predicted_signal=fit.predicted_signal,
        loss_history=fit.loss_history,
        kind=options["template"],
        n_inverted=fit.n_inverted,
        shape=fit.shape,
    )


def _untangled_start(shape, code, *, halvings=20):
    """``code`` halved towards the template (code 0) until no tetrahedron
    of ``shape.mesh(code)`` is inverted.

    A label found by the search can be a ragged staircase whose surface
    asks for more displacement than the template's tetrahedra take (a
    cylinder's label at SNR 100 did: ``fit_mesh`` refused the start). The
    template itself is placed and sized on the label already, so a smaller
    step towards the label's surface is still a start on it.
    """
    code = np.asarray(code, dtype=np.float64)
    for _ in range(halvings):
        if not shape.n_inverted(code):
            return code
        code = code / 2
    return np.zeros_like(code)


def _refine_axon(points, volume, signal, protocol, options, settings):
    """:func:`refine_cell` with ``code="axon"``.

    The axon code describes a tube along z centred at the origin, so the
    fit runs in the label's principal frame (:func:`_principal_frame`): a
    straight tube of the label's length and volume, and the protocol's
    gradient directions rotated into that frame (the magnitude signal of a
    cell moved by ``v @ rotation + middle`` under direction ``g`` is that of
    the unmoved cell under ``rotation @ g``). The fitted mesh is moved back
    into the grid.
    """
    tube, rotation, middle = _label_tube(
        points, volume, options["resolution"], options["layers"]
    )
    in_frame = dataclasses.replace(protocol, bvecs=protocol.bvecs @ rotation.T)
    fit = fit_mesh(
        signal,
        in_frame,
        template=tube,
        code="axon",
        axon_periods=options["axon_periods"],
        **settings,
    )
    return dataclasses.replace(
        fit,
        mesh=fit.mesh.moved(fit.mesh.vertices @ rotation + middle),
        kind="tube",
        shape=None,  # the AxonShape lives in the label's frame
    )
