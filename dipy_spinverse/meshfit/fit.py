"""Fit a cell's smooth mesh to its diffusion signal: :func:`fit_mesh`.

The shape code of a template (:mod:`.shape`) is optimised by
back-propagation through the finite-element simulator (:mod:`.fem`), with
the package's one data loss (:func:`dipy_spinverse.sim.signals.data_loss`:
Gaussian or Rician, noise level ``sigma``). The eigenbasis is recomputed
every ``basis_every`` iterations at the current vertices and held fixed in
between (its derivative is not taken, see :mod:`.fem`).
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import optimize
from scipy.spatial import cKDTree

from ..checks import (
    check_choice,
    check_diffusivity,
    check_int,
    check_number,
    check_positive,
)
from ..sim.sequences import as_protocol
from ..sim.signals import VoxelSignals, data_loss, noise_precision, normalise_b0
from .autoencoder import ShapeAutoencoder, load_or_train_autoencoder
from .fem import mesh_basis, mesh_signal
from .mesh import TetMesh, ball_mesh, tube_mesh
from .shape import (
    DIRECTIONS,
    AxonShape,
    SpectralShape,
    axon_shape,
    spectral_shape,
)

__all__ = [
    "MeshFit",
    "fit_mesh",
    "fit_surface",
    "surface_chamfer",
    "TEMPLATES",
    "NOISE_MODELS",
    "CODES",
    "AXON_START_PERIODS",
    "AXON_TUBE",
    "check_axon_periods",
    "screen_size",
    "scaled_template",
    "template_radius",
    "SCREEN_RADII",
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
NOISE_MODELS = ("gaussian", "rician")
#: What :func:`fit_mesh` optimises: the spectral coefficients themselves, the
#: latent code of a shape autoencoder trained on axon families
#: (:mod:`.autoencoder`), decoded into coefficients, or the axon family's own
#: eight parameters (:class:`.shape.AxonShape`, tube templates).
CODES = ("spectral", "latent", "axon")
#: Beading periods (um) screened by ``code="axon"``: the loss is multimodal in
#: the period (a fit started at one period stays near an alias of it), so
#: beads of each period at four phases are tried on the unbeaded fit and the
#: best one is refined. A geometric ladder, neighbours 1.3 to 1.4 apart.
AXON_START_PERIODS = (5.0, 6.5, 8.5, 11.0, 14.5, 19.0, 25.0)
# Relative bead amplitude and curvature (1/um) of the screened starts: the
# signal is even in both about a straight, unbeaded tube, so a start at zero
# is a stationary point that the fit never leaves.
_AXON_START_AMPLITUDE = 0.15
_AXON_START_CURVATURE = 0.02
# Levenberg-Marquardt stops when a step lowers the loss by less than this
# fraction: at SNR 100 the loss is ~loss_scale sigma^2 and such a change moves
# no parameter by a tenth of its noise (measured on the bent and beaded
# axons: later iterations change the curvature and period by < 0.1%).
_AXON_TOLERANCE = 1e-4
# Largest bend of the fit (radians over the length): axon_deformation needs
# less than pi (the arc must not close).
_AXON_MAX_TURN = 0.9 * np.pi
# Beads are kept only when they lower chi^2 = n loss / (loss_scale sigma^2)
# by more than this (with sigma > 0): the 99.9% quantile of chi^2 with 3
# degrees of freedom (amplitude, phase, period) is 16.3, raised for the 28
# screened starts. Without it noise is fitted by beads: a held-out bent axon
# at SNR 100 (published protocol) came out with beads of amplitude 0.06 that
# lowered chi^2 by 9.7; true beads of amplitude 0.2 lower it by ~1,000.
_BEADING_EVIDENCE = 20.0
# Swelling and fanning are freed last, and kept only when they lower chi^2 by
# more than this: the 99.9% quantile of chi^2 with 2 degrees of freedom
# (13.8). Free from the start, they trade with the radius: a held-out beaded
# axon at SNR 100 (published protocol, a second noise draw) came out with
# swelling -0.17, its radius 3.7% low and a loss below the truth's.
_PROFILE_EVIDENCE = 14.0
# A bend (curvature and azimuth, 2 degrees of freedom) is kept only when it
# lowers chi^2 by more than this, the same 99.9% quantile. The fit starts
# bent (a straight tube is a stationary point of the bend) and never tested
# it: at SNR 100 a straight beaded axon (held out, published protocol) came
# out bent (curvature 0.023-0.029 1/um) for a chi^2 decrease of ~7, and the
# bend took a tenth of the beads' amplitude (-9 to -11 % in three noise
# draws; -9 to +6 % in four refitted straight).
_BEND_EVIDENCE = 14.0
# Beads longer than the axon (the period's upper bound is twice its length)
# are less than one bead on it: a taper, which fanning and swelling describe
# with one coefficient fewer. The beads are kept over the taper only if they
# lower chi^2 by more than this, Akaike's cost of one coefficient. Without
# it the held-out fanning axon (SNR 100, published protocol) was fitted
# with beads of period 26 and 40 um and no fanning.
_TAPER_EVIDENCE = 2.0
# Screened periods refined (the best phase of each, best first): the best
# start alone can be a local minimum (a 6 um bead screened at 4, 5.5, 7.5
# and 10 um: the 4 um start ranked first and stayed there; 5.5 um, second,
# refines to the truth).
_AXON_REFINED_PERIODS = 3
# Coefficients freed in turn (indices into AXON_CODE): radius and bend; then
# the beads too. Swelling and fanning (_PROFILE) are added to whichever of
# the two the fit ends in.
_AXON_STAGES = (np.arange(3), np.arange(6))
# Indices into AXON_CODE of the bend (bend_x, bend_y), the beads
# (beading_cos, beading_sin, beading_period) and the profile (swelling,
# fanning).
_BEND = np.array([1, 2])
_BEADS = np.array([3, 4, 5])
_PROFILE = np.array([6, 7])


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
    axon_parameters : dict or None
        With ``code="axon"``: the fitted family member as
        :func:`.mesh.axon_mesh`'s keywords (radius, curvature, bend_azimuth,
        beading_amplitude, beading_period, beading_phase, swelling,
        fanning); ``shape_code`` is then the :data:`.shape.AXON_CODE`.
    """

    mesh: TetMesh
    shape_code: np.ndarray
    predicted_signal: np.ndarray
    loss_history: np.ndarray
    kind: str = "mesh"
    n_inverted: int = 0
    shape: SpectralShape = field(default=None, repr=False)
    latent_code: np.ndarray = None
    axon_parameters: dict = None

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
        return template_radius(self.mesh, self.kind)


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


def _normalised_signal(signal, protocol):
    """One voxel's b0-normalised signal and its noise precisions
    (:func:`~dipy_spinverse.sim.signals.noise_precision`): a raw signal's,
    computed here, or the row of a one-voxel
    :class:`~dipy_spinverse.sim.signals.VoxelSignals` (normalised once,
    upstream: the weights the face fit used)."""
    if isinstance(signal, VoxelSignals):
        if len(signal) != 1 or signal.normalised.shape[1] != len(protocol):
            raise ValueError(
                f"signal: a VoxelSignals of one voxel and {len(protocol)} "
                f"acquisitions, got shape {signal.normalised.shape}; pass "
                "signals[[row]]."
            )
        measured = signal.normalised[0]
    else:
        measured = np.asarray(signal, dtype=np.float64)
        if measured.shape != (len(protocol),):
            raise ValueError(
                f"signal must have shape ({len(protocol)},) (one cell, protocol "
                f"order), got {measured.shape}; fit voxels one at a time."
            )
        if protocol.bvals.min() == 0 and np.any(measured[protocol.bvals == 0] <= 0):
            raise ValueError("the b = 0 signal must be > 0 to normalise by it.")
    if not np.all(np.isfinite(measured)):
        raise ValueError("signal must be finite.")
    if isinstance(signal, VoxelSignals):
        return measured, signal.precision[0]
    return normalise_b0(measured, protocol), noise_precision(measured, protocol)


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
    axon_periods=AXON_START_PERIODS,
    size="auto",
    verbose=False,
):
    """Fit a smooth cell mesh to a b0-normalisable signal.

    Parameters
    ----------
    signal : array_like (n_acquisitions,) or VoxelSignals
        One cell's signal in protocol order (normalised here by its b = 0
        volumes, :func:`dipy_spinverse.sim.signals.normalise_b0`), or a
        one-voxel :class:`~dipy_spinverse.sim.signals.VoxelSignals`, already
        normalised. With ``sigma > 0`` each acquisition's misfit is weighted
        by its noise precision (the signal's
        :func:`~dipy_spinverse.sim.signals.noise_precision`, or the
        VoxelSignals' ``precision``), as the face fit weighs it; with
        ``sigma`` unknown the misfit is unweighted, as there.
    protocol : Protocol or dipy.core.gradients.GradientTable
    template : {"ball", "tube"}, TetMesh or SpectralShape
        Starting shape (built-in: :data:`TEMPLATES`; with ``code="axon"``,
        ``"tube"`` is the finer :data:`AXON_TUBE`, and a TetMesh must be a
        straight tube along z centred at z = 0).
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
    code : {"spectral", "latent", "axon"}
        What is optimised (:data:`CODES`): the spectral coefficients, the
        latent code of a shape autoencoder over them (axon families, tube
        templates only; ``start`` is then encoded, and ``learning_rate`` is
        in units of the latent's spread over the training shapes), or the
        eight parameters of the axon family (:class:`.shape.AxonShape`,
        straight tube templates along z; ``start`` is then an axon code, the
        fit Levenberg-Marquardt with ``max_iter`` iterations per start and a
        screen of beading periods, ``axon_periods``; ``n_modes``,
        ``directions``, ``learning_rate``, ``penalty`` and ``basis_every``
        are not used: the basis is recomputed at every step).
    autoencoder : ShapeAutoencoder, optional
        With ``code="latent"``: trained for this template's shape code.
        Default: :func:`.autoencoder.load_or_train_autoencoder` of the shape
        with default settings (trained once, ~10-30 s, then cached).
    axon_periods : sequence of float
        With ``code="axon"``: beading periods (um) screened at four phases
        on the unbeaded fit (:data:`AXON_START_PERIODS`); empty: no screen.
    size : "auto", "screen", float or None
        Radius (um) the template is scaled to before the shape is fitted
        (``code="spectral"``; a ball scaled about its centre, a tube across
        its axis only, a user's TetMesh about its centroid; the radius as
        :attr:`MeshFit.radius` reports it). Adam moves the surface by
        about ``learning_rate`` a step, so a fit started at the template's
        4 um stalled near it whatever the cell (8 um came out 4.6 um).
        ``"screen"``: the radius whose signal fits best among
        :data:`SCREEN_RADII`, refined by a bounded Brent search in the log
        of the radius (:func:`screen_size`); a float: a size estimate of
        one's own (e.g. the posterior's ``cell_diameter / 2``); ``None``: the
        template as given. ``"auto"`` (default): ``"screen"`` for the
        built-in templates (``"ball"``, ``"tube"``), ``None`` for a mesh or
        shape of one's own (its size is taken as meant).
    verbose : bool
        Print the loss every 10 iterations.

    Returns
    -------
    MeshFit
    """
    protocol = as_protocol(protocol)
    normalised, precision = _normalised_signal(signal, protocol)
    diffusivity = check_diffusivity(diffusivity)
    sigma = check_number(sigma, "sigma", minimum=0.0, maximum=1.0)
    # The face fit's rule (inverse.reconstruct): per-acquisition noise
    # weights belong to the noise model, so none without sigma.
    precision = torch.as_tensor(precision) if sigma > 0 else None
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
    target = torch.tensor(normalised)
    if code == "axon":
        if autoencoder is not None:
            raise ValueError("autoencoder is used with code='latent' only.")
        return _fit_axon(
            _axon_template(template),
            target,
            protocol,
            start=start,
            periods=check_axon_periods(axon_periods),
            max_iter=max_iter,
            length_scale=length_scale,
            loss=dict(
                loss_scale=loss_scale, sigma=sigma, noise=noise, precision=precision
            ),
            diffusivity=diffusivity,
            background=background,
            box_volume=box_volume,
            verbose=verbose,
        )
    shape, kind = _shape(template, n_modes, directions)
    code0 = np.zeros(shape.n_code) if start is None else np.asarray(start, float)
    if code0.shape != (shape.n_code,):
        raise ValueError(
            f"start must be a shape code of shape ({shape.n_code},), got {code0.shape}."
        )
    if isinstance(size, str) and size == "auto":
        size = "screen" if isinstance(template, str) else None
    if (
        size is not None
        and code == "spectral"
        and not isinstance(template, SpectralShape)
    ):
        # Scale the template first: the spectral code then only reshapes it.
        mesh = shape.template
        if isinstance(size, str) and size == "screen":
            size = screen_size(
                mesh,
                target,
                protocol,
                kind=kind,
                diffusivity=diffusivity,
                length_scale=length_scale,
                background=background,
                box_volume=box_volume,
            )
        size = check_positive(size, "size", "um")
        shape, kind = _shape(scaled_template(mesh, kind, size), n_modes, directions)
    if shape.n_inverted(code0):
        raise ValueError("start inverts tetrahedra of the template; shrink it.")
    _check_box(shape.mesh(code0).volume, box_volume)
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
                predicted,
                target,
                loss_scale=loss_scale,
                sigma=sigma,
                noise=noise,
                precision=precision,
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


def _axon_template(template):
    """The :class:`AxonShape` of a tube template (name or TetMesh)."""
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


def check_axon_periods(periods):
    """``axon_periods`` as a float array: positive, finite beading periods
    (um); a ValueError naming the argument otherwise."""
    periods = np.asarray(periods, dtype=np.float64).ravel()
    if not np.all(np.isfinite(periods)) or np.any(periods <= 0):
        raise ValueError(
            f"axon_periods must be positive beading periods in um, got {periods}."
        )
    return periods


def _axon_bounds(shape):
    """Lower and upper bounds of the axon code, and the smallest period.

    The period is kept above 2.5 axial edge lengths of the template (shorter
    beads alias on its vertices) and below twice its length (longer ones are
    swelling and fanning); the bend below 0.9 half turns over the length
    (:func:`.mesh.axon_deformation` needs less than one, checked in
    ``valid``); the relative amplitudes as it allows.
    """
    tets = shape.template.vertices[shape.template.tets]
    dz = np.abs(tets[:, :, None, 2] - tets[:, None, :, 2]).max(axis=(1, 2))
    shortest = 2.5 * float(np.median(dz))
    kmax = _AXON_MAX_TURN / shape.length
    lower = np.array([0.1, -kmax, -kmax, -0.8, -0.8, shortest, -0.8, -0.8])
    upper = np.array([np.inf, kmax, kmax, 0.8, 0.8, 2 * shape.length, 5.0, 0.8])
    return lower, upper


class _AxonModel:
    """Residuals of the axon code, basis recomputed at each point."""

    def __init__(
        self,
        shape,
        target,
        protocol,
        loss,
        diffusivity,
        length_scale,
        background,
        box_volume,
    ):
        self.shape, self.target, self.protocol = shape, target, protocol
        self.loss, self.diffusivity = loss, diffusivity
        self.length_scale = length_scale
        self.background, self.box_volume = background, box_volume
        self.lower, self.upper = _axon_bounds(shape)
        self.n_evaluations = 0

    def valid(self, code):
        amplitude = np.hypot(code[3], code[4])
        turn = np.hypot(code[1], code[2]) * self.shape.length
        inside = np.all(code >= self.lower) and np.all(code <= self.upper)
        inside = inside and amplitude <= 0.8 and turn < _AXON_MAX_TURN
        return bool(inside and not self.shape.n_inverted(code))

    def basis(self, code):
        return mesh_basis(self.shape.mesh(code), length_scale=self.length_scale)

    def predicted(self, code, basis):
        vertices = torch.tensor(self.shape.vertices(code))
        with torch.no_grad():
            out = mesh_signal(
                self.shape.template,
                self.protocol,
                vertices=vertices,
                basis=basis,
                diffusivity=self.diffusivity,
            )
            if self.background is not None:
                fraction = float(
                    _volume(vertices, torch.tensor(self.shape.template.tets))
                )
                fraction /= self.box_volume
                out = fraction * out + (1.0 - fraction) * self.background
        self.n_evaluations += 1
        return out

    def residuals(self, code, basis):
        """Residuals r with ``r @ r`` the data loss (each acquisition weighted
        by its noise precision, as :func:`data_loss`), and the prediction."""
        predicted = self.predicted(code, basis)
        expected = predicted
        sigma, precision = self.loss["sigma"], self.loss.get("precision")
        if self.loss["noise"] == "rician" and sigma > 0:
            floor = sigma**2 if precision is None else sigma**2 / precision
            expected = torch.sqrt(predicted**2 + floor)
        scale = np.sqrt(self.loss["loss_scale"] / len(self.target))
        residuals = expected - self.target
        if precision is not None:
            residuals = residuals * torch.sqrt(precision)
        return (scale * residuals).numpy(), predicted

    def jacobian(self, code, basis, residuals, free):
        """Forward differences in the ``free`` coefficients, on the basis of
        ``code`` (held fixed)."""
        steps = 1e-4 * np.maximum(np.abs(code), [1.0, 0.1, 0.1, 1.0, 1.0, 10.0, 1, 1])
        columns = []
        for i in free:
            moved = code.copy()
            # Step inwards at an upper bound.
            step = steps[i] if code[i] + steps[i] <= self.upper[i] else -steps[i]
            moved[i] += step
            moved_residuals = self.residuals(moved, basis)[0]
            columns.append((moved_residuals - residuals) / step)
        return np.stack(columns, axis=1)


def _levenberg_marquardt(model, code, free, max_iter, history, verbose):
    """Damped Gauss-Newton in the ``free`` coefficients of the axon code from
    ``code`` (the others held); the best point."""
    basis = model.basis(code)
    residuals, predicted = model.residuals(code, basis)
    loss = float(residuals @ residuals)
    history.append(loss)
    damping = 1e-3
    for it in range(max_iter):
        jac = model.jacobian(code, basis, residuals, free)
        gradient = jac.T @ residuals
        normal = jac.T @ jac
        # Marquardt's scaling: each coefficient in its own units.
        scaling = np.maximum(np.diag(normal), 1e-12 * np.diag(normal).max() + 1e-30)
        improved = False
        while damping < 1e10:
            step = np.linalg.solve(normal + damping * np.diag(scaling), -gradient)
            trial = code.copy()
            trial[free] += step
            if not model.valid(trial):
                damping *= 10.0
                continue
            trial_basis = model.basis(trial)
            trial_residuals, trial_predicted = model.residuals(trial, trial_basis)
            trial_loss = float(trial_residuals @ trial_residuals)
            if trial_loss < loss:
                improved = loss - trial_loss > _AXON_TOLERANCE * loss
                code, basis, residuals = trial, trial_basis, trial_residuals
                loss, predicted = trial_loss, trial_predicted
                damping = max(damping / 3.0, 1e-7)
                break
            damping *= 4.0
        history.append(loss)
        if verbose:
            print(f"fit_mesh (axon): iteration {it}, loss {loss:.4g}")
        if not improved:
            break
    return code, loss, predicted


def _fit_axon(
    shape,
    target,
    protocol,
    *,
    start,
    periods,
    max_iter,
    length_scale,
    loss,
    diffusivity,
    background,
    box_volume,
    verbose,
):
    """``fit_mesh(..., code="axon")``: Levenberg-Marquardt with a period screen.

    1. From ``start`` (default: the template's radius, a small bend, no
       beads) the radius and bend are fitted, the rest held.
    2. Beads of each screened period at four phases added to it
       (:data:`AXON_START_PERIODS`); the best starts of the three best
       periods are refined (radius, bend and beads free); the best is kept
       if it is better by more than the noise explains (``sigma > 0``:
       chi^2 lower by ``_BEADING_EVIDENCE``).
    3. Swelling and fanning are freed too (the beads only if kept), kept
       under the same rule (``_PROFILE_EVIDENCE``).
    4. The result is refitted straight (bend 0 and held); the bend is kept
       only under the same rule (``_BEND_EVIDENCE``).
    5. Beads longer than the axon (less than one bead on it) are refitted
       as a taper (beads 0, swelling and fanning free) and kept only if
       they fit better by more than one coefficient's cost
       (``_TAPER_EVIDENCE``). Noise free, any decrease is kept.
    """
    model = _AxonModel(
        shape, target, protocol, loss, diffusivity, length_scale, background, box_volume
    )
    if start is None:
        bend = _AXON_START_CURVATURE / np.sqrt(2.0)
        start = shape.code(radius=shape.template_radius)
        start[1:3] = bend
    start = np.asarray(start, dtype=np.float64)
    if start.shape != (shape.n_code,):
        raise ValueError(
            f"start must be an axon code of shape ({shape.n_code},) "
            f"(meshfit.shape.AXON_CODE), got {start.shape}."
        )
    if not model.valid(start):
        raise ValueError(
            "start is outside the axon code's bounds or inverts tetrahedra."
        )
    _check_box(shape.mesh(start).volume, box_volume)
    history = []
    best = _levenberg_marquardt(
        model, start, _AXON_STAGES[0], max_iter, history, verbose
    )
    screened = []
    # The screen's starts are ranked on the unbeaded fit's basis (a bead of
    # amplitude 0.15 is a small change of the eigenmodes; the refinement
    # recomputes them).
    unbeaded_basis = model.basis(best[0])
    for period in periods:
        if not model.lower[5] <= period <= model.upper[5]:
            continue
        for phase in np.arange(4) * np.pi / 2:
            trial = best[0].copy()
            trial[3:6] = (
                _AXON_START_AMPLITUDE * np.cos(phase),
                _AXON_START_AMPLITUDE * np.sin(phase),
                period,
            )
            if model.valid(trial):
                residuals, _ = model.residuals(trial, unbeaded_basis)
                screened.append((float(residuals @ residuals), tuple(trial)))
    unbeaded = best
    for trial in _best_per_period(screened, _AXON_REFINED_PERIODS):
        beaded = _levenberg_marquardt(
            model, trial, _AXON_STAGES[1], max_iter, history, verbose
        )
        better = beaded[1] < best[1]
        if better and _significant(
            unbeaded[1] - beaded[1], len(target), loss, _BEADING_EVIDENCE
        ):
            best = beaded
    # Beads the rule dropped stay dropped: freeing them here would let them
    # in by the profile's rule (2 degrees of freedom for 5).
    stage = _AXON_STAGES[1] if best is not unbeaded else _AXON_STAGES[0]
    profile = np.union1d(stage, _PROFILE)
    profiled = _levenberg_marquardt(model, best[0], profile, max_iter, history, verbose)
    if _significant(best[1] - profiled[1], len(target), loss, _PROFILE_EVIDENCE):
        best, stage = profiled, profile
    best, stage = _simpler(
        model, best, stage, _BEND, _BEND_EVIDENCE, max_iter, history, verbose
    )
    if best[0][_BEADS[2]] > shape.length and np.any(best[0][_BEADS[:2]]):
        # Less than one bead on the axon: a taper, which swelling and
        # fanning describe with one coefficient fewer.
        best, stage = _simpler(
            model,
            best,
            np.union1d(stage, _PROFILE),
            _BEADS,
            _TAPER_EVIDENCE,
            max_iter,
            history,
            verbose,
        )
    code, _, predicted = best
    return MeshFit(
        mesh=shape.mesh(code),
        shape_code=code,
        predicted_signal=predicted.numpy(),
        loss_history=np.asarray(history),
        kind="tube",
        n_inverted=0,
        shape=shape,
        axon_parameters=shape.parameters(code),
    )


def _simpler(model, fit, free, dropped, evidence, max_iter, history, verbose):
    """``fit`` refitted with the ``dropped`` coefficients at their values of
    a straight, unbeaded, unswollen tube and held, if they do not lower
    chi^2 by more than ``evidence``; (fit, its free coefficients)."""
    start = fit[0].copy()
    start[dropped] = model.shape.code(radius=start[0])[dropped]
    if not model.valid(start):
        return fit, free
    kept = np.setdiff1d(free, dropped)
    simpler = _levenberg_marquardt(model, start, kept, max_iter, history, verbose)
    if _significant(simpler[1] - fit[1], len(model.target), model.loss, evidence):
        return fit, free
    return simpler, kept


def _best_per_period(screened, n):
    """The ``n`` best screened starts of distinct periods, best first."""
    chosen, periods = [], set()
    for _, trial in sorted(screened):
        if trial[5] not in periods:
            periods.add(trial[5])
            chosen.append(np.array(trial))
    return chosen[:n]


def _significant(decrease, n_acquisitions, loss, evidence):
    """Whether a loss decrease is evidence for more coefficients: chi^2
    lower by more than ``evidence`` (any decrease when noise free)."""
    if loss["sigma"] == 0:
        return decrease > 0  # noise free: any decrease is signal
    chi2 = decrease * n_acquisitions / (loss["loss_scale"] * loss["sigma"] ** 2)
    return chi2 > evidence


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


def _check_box(cell_volume, box_volume):
    """The voxel (``box_volume``) must hold the start's cell: the background
    weighs ``1 - cell / box``, which would turn negative."""
    if box_volume is not None and not cell_volume < box_volume:
        raise ValueError(
            f"box_volume={box_volume:g} um^3 is not larger than the start's cell "
            f"({cell_volume:g} um^3); box_volume is the whole voxel's volume, "
            "cell and background together."
        )


def _volume(vertices, tets):
    """Volume of a mesh (um^3) from vertex positions, differentiable."""
    p = vertices[tets]
    return torch.linalg.det(p[:, 1:] - p[:, :1]).sum() / 6.0


def _shape(template, n_modes, directions):
    if isinstance(template, SpectralShape):
        return template, "mesh"
    if isinstance(template, tuple):  # (scaled mesh, kind) from scaled_template
        mesh, kind = template
    else:
        mesh, kind = _template_mesh(template)
    return spectral_shape(mesh, n_modes=n_modes, directions=directions), kind


def _template_mesh(template):
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
    ``3 V / A`` otherwise."""
    if kind == "ball":
        return (3.0 * mesh.volume / (4.0 * np.pi)) ** (1.0 / 3.0)
    if kind == "tube":
        return axis_radius(mesh)
    return 3.0 * mesh.volume / mesh.surface_area


def scaled_template(mesh, kind, radius):
    """``(mesh, kind)`` with the mesh scaled to ``radius`` (um): across the
    axis for a tube (its length kept), about the centroid otherwise."""
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
    (:func:`dipy_spinverse.geometry.topology.barrier_mesh` of a fitted labelling).

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
