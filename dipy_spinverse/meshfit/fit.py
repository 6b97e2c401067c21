"""Fit a cell's smooth mesh to its diffusion signal: :func:`fit_mesh`.

The shape code of a template (:mod:`.shape`) is optimised by
back-propagation through the finite-element simulator (:mod:`.fem`), with
the package's one data loss (:func:`dipy_spinverse.signals.data_loss`:
Gaussian or Rician, noise level ``sigma``). The eigenbasis is recomputed
every ``basis_every`` iterations at the current vertices and held fixed in
between (its derivative is not taken, see :mod:`.fem`).
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.spatial import cKDTree

from ..checks import (
    check_choice,
    check_diffusivity,
    check_int,
    check_number,
    check_positive,
)
from ..interface import write_mesh
from ..sequences import as_protocol
from ..signals import data_loss, normalise_b0
from .autoencoder import ShapeAutoencoder, load_or_train_autoencoder
from .fem import mesh_basis, mesh_signal
from .mesh import TetMesh, ball_mesh, tube_mesh
from .shape import DIRECTIONS, SpectralShape, spectral_shape

__all__ = [
    "MeshFit",
    "fit_mesh",
    "fit_surface",
    "surface_chamfer",
    "TEMPLATES",
    "NOISE_MODELS",
    "CODES",
]

#: Built-in templates: a ball (radius 4 um) and a closed tube (radius 3 um,
#: 20 um long), coarse enough for a fit of a few minutes on 2 cores.
TEMPLATES = {
    "ball": lambda: ball_mesh(4.0, resolution=3),
    "tube": lambda: tube_mesh(3.0, 20.0, resolution=3, layers=10),
}
NOISE_MODELS = ("gaussian", "rician")
#: What :func:`fit_mesh` optimises: the spectral coefficients themselves, or
#: the latent code of a shape autoencoder trained on axon families
#: (:mod:`.autoencoder`), decoded into coefficients.
CODES = ("spectral", "latent")


@dataclass(frozen=True, eq=False)
class MeshFit:
    """Result of :func:`fit_mesh`.

    Attributes
    ----------
    mesh : TetMesh
        The fitted cell (um).
    shape_code : ndarray (n_code,)
        Coefficients of the spectral shape (rms normal displacement, um).
    predicted_signal : ndarray (n_acquisitions,)
        b0-normalised signal of the fitted mesh.
    loss_history : ndarray (n_iterations,)
        Data loss (plus the code penalty) at each iteration.
    kind : str
        ``"ball"``, ``"tube"`` or ``"mesh"`` (a user template): what
        :attr:`radius` means.
    n_inverted : int
        Tetrahedra inverted at the solution (0 for a valid mesh; the best
        valid iterate is returned when one exists).
    latent_code : ndarray (n_latent,) or None
        The autoencoder's latent code of the solution (``code="latent"``).
    """

    mesh: TetMesh
    shape_code: np.ndarray
    predicted_signal: np.ndarray
    loss_history: np.ndarray
    kind: str = "mesh"
    n_inverted: int = 0
    shape: SpectralShape = field(default=None, repr=False)
    latent_code: np.ndarray = None

    @property
    def vertices(self):
        """Vertex positions (V, 3), um."""
        return self.mesh.vertices

    @property
    def faces(self):
        """Outward boundary triangles (F, 3): the cell's surface."""
        return self.mesh.boundary_faces

    @property
    def surface_vertices(self):
        """The surface as (vertices, triangles) with only the surface vertices."""
        used = self.mesh.boundary_vertices
        renumber = np.full(self.mesh.n_vertices, -1, dtype=np.int64)
        renumber[used] = np.arange(len(used))
        return self.mesh.vertices[used], renumber[self.faces]

    @property
    def volume(self):
        """Cell volume, um^3."""
        return self.mesh.volume

    @property
    def surface_area(self):
        """Membrane area, um^2."""
        return self.mesh.surface_area

    @property
    def surface_to_volume(self):
        """Surface-to-volume ratio, 1/um."""
        return self.surface_area / self.volume

    @property
    def radius(self):
        """Equivalent radius (um): of the ball of the same volume for a ball,
        the mean distance of the side vertices from the mesh's principal axis
        for a tube, ``3 V / A`` otherwise."""
        if self.kind == "ball":
            return (3.0 * self.volume / (4.0 * np.pi)) ** (1.0 / 3.0)
        if self.kind == "tube":
            return axis_radius(self.mesh)
        return 3.0 * self.volume / self.surface_area

    def save(self, path, **kwargs):
        """Write the surface like the other interface meshes (.ply, .vtp, ...)."""
        vertices, triangles = self.surface_vertices
        return write_mesh(path, vertices, triangles, **kwargs)


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


def fit_mesh(
    signal,
    protocol,
    *,
    template="tube",
    start=None,
    n_modes=12,
    directions="normal",
    diffusivity=2e-3,
    sigma=0.0,
    noise="gaussian",
    loss_scale=100.0,
    max_iter=60,
    learning_rate=0.1,
    penalty=1e-4,
    length_scale=2.0,
    basis_every=5,
    background=None,
    box_volume=None,
    code="spectral",
    autoencoder=None,
    verbose=False,
):
    """Fit a smooth cell mesh to a b0-normalisable signal.

    Parameters
    ----------
    signal : array_like (n_acquisitions,)
        One cell's signal in protocol order (normalised here by its b = 0
        volumes, :func:`dipy_spinverse.signals.normalise_b0`).
    protocol : Protocol or dipy.core.gradients.GradientTable
    template : {"ball", "tube"}, TetMesh or SpectralShape
        Starting shape (built-in: :data:`TEMPLATES`).
    start : array_like (n_code,), optional
        Starting shape code (default zeros: the template itself).
    n_modes : int
        Laplace-Beltrami modes of the shape code (ignored for a
        SpectralShape).
    directions : {"normal", "xyz"}
        Displacement directions of the code (ignored for a SpectralShape).
    diffusivity : float
        Intrinsic diffusivity, mm^2/s.
    sigma : float
        Noise level relative to the b = 0 signal (1 / SNR); 0 if unknown.
    noise : {"gaussian", "rician"}
        Noise model of the data loss.
    loss_scale : float
        Scale of the data loss (the package's default 100).
    max_iter : int
        Adam iterations.
    learning_rate : float
        Adam step (um of rms displacement per coefficient).
    penalty : float
        Weight of ``sum_k lambda_k code_k^2`` (Laplace-Beltrami eigenvalues as
        a smoothness prior; the swelling mode is free).
    length_scale : float
        Cut-off of the eigenbasis (um); 2 um is the published setting.
    basis_every : int
        Iterations between basis recomputations.
    background : array_like (n_acquisitions,), optional
        b0-normalised signal of the rest of a voxel of volume ``box_volume``
        (e.g. the grid simulator's, :func:`.refine.refine_cell`): the model
        is then ``f S_mesh + (1 - f) background``, ``f`` the mesh's volume
        over ``box_volume`` (differentiable). Default: the cell alone.
    box_volume : float, optional
        Volume of that voxel (um^3); needed with ``background``, larger than
        the cell.
    code : {"spectral", "latent"}
        What is optimised (:data:`CODES`): the spectral coefficients, or the
        latent code of a shape autoencoder over them (axon families, tube
        templates only; ``start`` is then encoded, and ``learning_rate`` is
        in units of the latent's spread over the training shapes).
    autoencoder : ShapeAutoencoder, optional
        With ``code="latent"``: trained for this template's shape code.
        Default: :func:`.autoencoder.load_or_train_autoencoder` of the shape
        with default settings (trained once, ~10-30 s, then cached).
    verbose : bool
        Print the loss every 10 iterations.

    Returns
    -------
    MeshFit
    """
    protocol = as_protocol(protocol)
    measured = np.asarray(signal, dtype=np.float64)
    if measured.shape != (len(protocol),):
        raise ValueError(
            f"signal must have shape ({len(protocol)},) (one cell, protocol order), "
            f"got {measured.shape}; fit voxels one at a time."
        )
    if not np.all(np.isfinite(measured)):
        raise ValueError("signal must be finite.")
    if protocol.bvals.min() == 0 and np.any(measured[protocol.bvals == 0] <= 0):
        raise ValueError("the b = 0 signal must be > 0 to normalise by it.")
    diffusivity = check_diffusivity(diffusivity)
    sigma = check_number(sigma, "sigma", minimum=0.0, maximum=1.0)
    noise = check_choice(noise, "noise", NOISE_MODELS)
    loss_scale = check_positive(loss_scale, "loss_scale")
    max_iter = check_int(max_iter, "max_iter", 1)
    learning_rate = check_positive(learning_rate, "learning_rate", "um")
    penalty = check_number(penalty, "penalty", minimum=0.0)
    length_scale = check_positive(length_scale, "length_scale", "um")
    basis_every = check_int(basis_every, "basis_every", 1)
    check_choice(directions, "directions", DIRECTIONS)
    background, box_volume = _check_background(background, box_volume, len(protocol))
    code = check_choice(code, "code", CODES)
    shape, kind = _shape(template, n_modes, directions)
    code0 = np.zeros(shape.n_code) if start is None else np.asarray(start, float)
    if code0.shape != (shape.n_code,):
        raise ValueError(
            f"start must be a shape code of shape ({shape.n_code},), got {code0.shape}."
        )
    if shape.n_inverted(code0):
        raise ValueError("start inverts tetrahedra of the template; shrink it.")
    autoencoder = _autoencoder(code, autoencoder, shape)
    if autoencoder is None:
        decode, variable0 = None, code0
    else:
        decode, variable0 = autoencoder.decode, autoencoder.encode(code0)
        if shape.n_inverted(decode(variable0)):
            raise ValueError(
                "the autoencoder's reconstruction of start inverts tetrahedra; "
                "start from a smaller code or use code='spectral'."
            )

    target = torch.tensor(normalise_b0(measured, protocol))
    tets = torch.tensor(shape.template.tets)
    weights = _penalty_weights(shape)
    variable = torch.tensor(variable0, requires_grad=True)
    optimiser = torch.optim.Adam([variable], lr=learning_rate)
    history, best = [], (np.inf, variable0, None)
    basis = None
    for it in range(max_iter):
        coefficients = variable if decode is None else decode(variable)
        vertices = shape.vertices(coefficients)
        current = vertices.detach().numpy()
        if shape.n_inverted(coefficients.detach().numpy()):
            # A step inverted the mesh: halve the step back toward the last
            # valid code and keep the learning rate smaller.
            with torch.no_grad():
                halfway = (variable.detach().numpy() + best[1]) / 2
                variable.copy_(torch.as_tensor(halfway))
            for group in optimiser.param_groups:
                group["lr"] *= 0.5
            continue
        if basis is None or it % basis_every == 0:
            basis = mesh_basis(shape.template.moved(current), length_scale=length_scale)
        predicted = mesh_signal(
            shape.template,
            protocol,
            vertices=vertices,
            basis=basis,
            diffusivity=diffusivity,
        )
        if background is not None:
            fraction = _volume(vertices, tets) / box_volume
            predicted = fraction * predicted + (1.0 - fraction) * background
        loss = (
            data_loss(
                predicted, target, loss_scale=loss_scale, sigma=sigma, noise=noise
            )
            + penalty * (weights * coefficients**2).sum()
        )
        history.append(loss.item())
        if history[-1] < best[0]:
            best = (history[-1], variable.detach().numpy().copy(), predicted.detach())
        if verbose and it % 10 == 0:
            print(f"fit_mesh: iteration {it}, loss {history[-1]:.4g}")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    _, variable_best, predicted = best
    if decode is None:
        code_best, latent_best = variable_best, None
    else:
        code_best, latent_best = decode(variable_best), variable_best
    mesh = shape.mesh(code_best)
    if predicted is None:
        predicted = mesh_signal(mesh, protocol, diffusivity=diffusivity).detach()
        if background is not None:
            fraction = mesh.volume / box_volume
            predicted = fraction * predicted + (1.0 - fraction) * background
    return MeshFit(
        mesh=mesh,
        shape_code=code_best,
        predicted_signal=predicted.numpy(),
        loss_history=np.asarray(history),
        kind=kind,
        n_inverted=shape.n_inverted(code_best),
        shape=shape,
        latent_code=latent_best,
    )


def _autoencoder(code, autoencoder, shape):
    """The checked autoencoder of ``code="latent"``, None for ``"spectral"``."""
    if code == "spectral":
        if autoencoder is not None:
            raise ValueError(
                "autoencoder is used with code='latent' only; pass code='latent' "
                "or leave autoencoder out."
            )
        return None
    if autoencoder is None:
        autoencoder = load_or_train_autoencoder(shape)
    elif not isinstance(autoencoder, ShapeAutoencoder):
        raise ValueError(
            f"autoencoder must be a ShapeAutoencoder, got {type(autoencoder).__name__}."
        )
    autoencoder.check_shape(shape)
    return autoencoder


def _check_background(background, box_volume, n_acquisitions):
    """The background as a tensor and the checked box volume (or None, None)."""
    if background is None and box_volume is None:
        return None, None
    if background is None or box_volume is None:
        raise ValueError(
            "background and box_volume go together: pass both (the rest of the "
            "voxel's signal and the voxel's volume in um^3) or neither."
        )
    box_volume = check_positive(box_volume, "box_volume", "um^3")
    background = np.asarray(background, dtype=np.float64)
    if background.shape != (n_acquisitions,) or not np.all(np.isfinite(background)):
        raise ValueError(
            f"background must be a finite signal of shape ({n_acquisitions},), "
            f"got shape {background.shape}."
        )
    return torch.tensor(background), box_volume


def _volume(vertices, tets):
    """Volume of a mesh (um^3) from vertex positions, differentiable."""
    p = vertices[tets]
    return torch.linalg.det(p[:, 1:] - p[:, :1]).sum() / 6.0


def _shape(template, n_modes, directions):
    if isinstance(template, SpectralShape):
        return template, "mesh"
    if isinstance(template, str):
        check_choice(template, "template", tuple(TEMPLATES))
        mesh, kind = TEMPLATES[template](), template
    elif isinstance(template, TetMesh):
        mesh, kind = template, "mesh"
    else:
        raise ValueError(
            f"template must be one of {tuple(TEMPLATES)}, a TetMesh or a "
            f"SpectralShape, got {type(template).__name__}."
        )
    return spectral_shape(mesh, n_modes=n_modes, directions=directions), kind


def _penalty_weights(shape):
    per_mode = torch.as_tensor(shape.eigenvalues, dtype=torch.float64)
    if shape.directions == "xyz":
        per_mode = per_mode.repeat_interleave(3)
    return per_mode


def surface_points(vertices, triangles):
    """Vertices and triangle centroids of a surface: points to compare."""
    vertices = np.asarray(vertices, dtype=np.float64)
    return np.concatenate([vertices, vertices[np.asarray(triangles)].mean(1)])


def surface_chamfer(vertices_a, triangles_a, vertices_b, triangles_b):
    """Symmetric mean nearest-point distance between two surfaces (um).

    Both surfaces are sampled at their vertices and triangle centroids; the
    distance is the mean of the two one-sided means (no centring).
    """
    a = surface_points(vertices_a, triangles_a)
    b = surface_points(vertices_b, triangles_b)
    there = cKDTree(b).query(a)[0].mean()
    back = cKDTree(a).query(b)[0].mean()
    return float(0.5 * (there + back))


def fit_surface(
    vertices, triangles, *, template="ball", n_modes=12, directions="xyz", max_iter=150
):
    """Shape code whose surface best matches a given surface (a start).

    The template is moved to the surface's centroid, then its code fitted by
    Adam to a one-sided-each-way Chamfer loss (nearest points recomputed each
    iteration): the refinement start from a Spinverse label surface
    (:func:`dipy_spinverse.interface.barrier_mesh` of a fitted labelling).

    Parameters
    ----------
    vertices : array_like (V, 3)
        Target surface vertices (um).
    triangles : array_like of int (F, 3)
    template : {"ball", "tube"} or TetMesh
    n_modes : int
    directions : {"normal", "xyz"}
    max_iter : int

    Returns
    -------
    shape : SpectralShape
        The moved template's shape code (pass as ``template`` to
        :func:`fit_mesh`).
    code : ndarray (n_code,)
        The fitted code (pass as ``start``).
    """
    target = surface_points(vertices, triangles)
    if len(target) < 4:
        raise ValueError("the target surface needs at least 4 points.")
    max_iter = check_int(max_iter, "max_iter", 1)
    mesh = (
        TEMPLATES[check_choice(template, "template", tuple(TEMPLATES))]()
        if (isinstance(template, str))
        else template
    )
    if not isinstance(mesh, TetMesh):
        raise ValueError(f"template must be a name or a TetMesh, got {template!r}.")
    mesh = mesh.moved(mesh.vertices - mesh.vertices.mean(0) + target.mean(0))
    shape = spectral_shape(mesh, n_modes=n_modes, directions=directions)
    surface = mesh.boundary_vertices
    tree = cKDTree(target)
    target_t = torch.tensor(target)
    code = torch.zeros(shape.n_code, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([code], lr=0.2)
    for _ in range(max_iter):
        points = shape.vertices(code)[surface]
        current = points.detach().numpy()
        nearest_target = target_t[tree.query(current)[1]]
        nearest_points = points[cKDTree(current).query(target)[1]]
        loss = ((points - nearest_target) ** 2).sum(1).mean() + (
            (nearest_points - target_t) ** 2
        ).sum(1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if shape.n_inverted(code.detach().numpy()):
            with torch.no_grad():
                code.mul_(0.9)
    return shape, code.detach().numpy()
