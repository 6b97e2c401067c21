"""Fit a cell's smooth mesh to its diffusion signal: :func:`fit_mesh`.

The shape code of a template (:mod:`.shape`) is optimised by
back-propagation through the finite-element simulator (:mod:`.fem`), with
the package's one data loss (:func:`dipy_spinverse.sim.signals.data_loss`:
Gaussian or Rician, noise level ``sigma``). The eigenbasis is recomputed
every ``basis_every`` iterations at the current vertices and held fixed in
between (its derivative is not taken, see :mod:`.fem`).
"""

import numpy as np
import torch

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
from .axonfit import (
    AXON_START_PERIODS,
    check_axon_periods,
    fit_axon,
)
from .fem import mesh_basis, mesh_signal
from .result import (
    MeshFit,
)
from .shape import (
    DIRECTIONS,
    SpectralShape,
    spectral_shape,
)
from .templates import (
    axon_template,
    check_box,
    mesh_volume,
    scaled_template,
    screen_size,
    template_mesh,
)

__all__ = [
    "fit_mesh",
    "NOISE_MODELS",
    "CODES",
]

NOISE_MODELS = ("gaussian", "rician")


#: What :func:`fit_mesh` optimises: the spectral coefficients themselves, the
#: latent code of a shape autoencoder trained on axon families
#: (:mod:`.autoencoder`), decoded into coefficients, or the axon family's own
#: eight parameters (:class:`.shape.AxonShape`, tube templates).
CODES = ("spectral", "latent", "axon")


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
        return fit_axon(
            axon_template(template),
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
    check_box(shape.mesh(code0).volume, box_volume)
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
            fraction = mesh_volume(vertices, tets) / box_volume
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


def _shape(template, n_modes, directions):
    if isinstance(template, SpectralShape):
        return template, "mesh"
    if isinstance(template, tuple):  # (scaled mesh, kind) from scaled_template
        mesh, kind = template
    else:
        mesh, kind = template_mesh(template)
    return spectral_shape(mesh, n_modes=n_modes, directions=directions), kind


def _penalty_weights(shape):
    per_mode = torch.as_tensor(shape.eigenvalues, dtype=torch.float64)
    if shape.directions == "xyz":
        per_mode = per_mode.repeat_interleave(3)
    return per_mode
