"""An autoencoder over the shape code: axon-like shapes in a few numbers.

The spectral code of a tube template (:mod:`.shape`, 16 coefficients by
default) can describe many shapes that no axon has; ReMiDi compresses it
further with an autoencoder trained on plausible shapes. Here the training
shapes are the axon families of :func:`.mesh.axon_deformation` (bending,
beading, swelling, fanning, and the radius), drawn at random from
:data:`FAMILY_RANGES` and applied to the template itself, so that each member
has the template's vertices: its code is the mass-weighted least-squares
projection of its surface displacement onto the code's fields
(:func:`project_code`).

A coefficient is an rms surface displacement in um and the fields are
orthonormal in the surface's (lumped) mass, so the Euclidean norm of a code
difference is the rms surface displacement between the two shapes, in um:
the training loss and :attr:`ShapeAutoencoder.metadata` ``val_rms_um`` are in
those units. The latent code is standardised over the training shapes (unit
spread per coordinate), so that a fit's step size means the same in every
coordinate (:func:`dipy_spinverse.meshfit.fit_mesh` with ``code="latent"``).

Networks are trained on demand and cached on disk (the package's cache
folder, :func:`dipy_spinverse.files.cache_root`) under a hash
of the template, its fields and the settings (:func:`autoencoder_key`).
"""

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checks import check_int, check_positive
from ..files import cache_key, cache_root, load_or_build
from ..provenance import code_digest
from .mesh import axon_deformation
from .shape import SpectralShape, surface_laplacian

__all__ = [
    "AutoencoderSettings",
    "ShapeAutoencoder",
    "FAMILIES",
    "FAMILY_RANGES",
    "TRAINING_SEED",
    "draw_family",
    "family_codes",
    "project_code",
    "autoencoder_key",
    "train_autoencoder",
    "load_or_train_autoencoder",
]

#: Training shapes are drawn from this seed; held-out shapes from others.
TRAINING_SEED = 14014
#: The axon families a training shape draws from (each one on or off).
FAMILIES = ("bending", "beading", "swelling", "fanning")
#: Ranges of the family parameters (:func:`.mesh.axon_deformation`), drawn
#: uniformly; ``radius`` scales the template's section. They hold the
#: experiments' held-out axons (radius 3.3-3.6 um on the 3 um tube, bend
#: 0.05 / um, beading 0.2 of 10 um, fanning 0.15).
FAMILY_RANGES = dict(
    radius=(0.75, 1.35),
    curvature=(0.0, 0.08),
    beading_amplitude=(0.0, 0.3),
    beading_period=(6.0, 16.0),
    swelling=(-0.2, 0.3),
    fanning=(-0.25, 0.25),
)
# Fraction of the training shapes held back to report the reconstruction
# error (validation).
_VALIDATION_SHARE = 0.1


@dataclass(frozen=True)
class AutoencoderSettings:
    """How a shape autoencoder is trained (part of its cache key).

    Parameters
    ----------
    n_latent : int
        Latent coordinates (8: the families have 9 parameters, of which the
        bend's azimuth and the beading's phase are angles).
    n_train : int
        Training shapes (a tenth held out for validation).
    epochs : int
        Passes over the training shapes.
    hidden : tuple of int
        Widths of the encoder's hidden layers (the decoder mirrors them).
    learning_rate : float
        Adam's step.
    batch_size : int
    families : tuple of str
        Subset of :data:`FAMILIES`.
    seed : int
        Seed of the training shapes and of the network's initialisation.
    """

    n_latent: int = 8
    n_train: int = 2000
    epochs: int = 200
    hidden: tuple = (64, 64)
    learning_rate: float = 3e-3
    batch_size: int = 100
    families: tuple = FAMILIES
    seed: int = TRAINING_SEED

    def __post_init__(self):
        for name in ("n_latent", "n_train", "epochs", "batch_size"):
            check_int(getattr(self, name), name, 1)
        check_positive(self.learning_rate, "learning_rate")
        hidden = tuple(check_int(h, "hidden width", 1) for h in self.hidden)
        object.__setattr__(self, "hidden", hidden)
        families = tuple(self.families)
        unknown = sorted(set(families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown families {unknown}; choose from {FAMILIES}.")
        object.__setattr__(self, "families", families)


class _Net(torch.nn.Module):
    """Encoder and decoder MLPs, standardised code and latent (buffers)."""

    def __init__(self, n_code, n_latent, hidden):
        super().__init__()
        self.encoder = _mlp(n_code, hidden, n_latent)
        self.decoder = _mlp(n_latent, hidden[::-1], n_code)
        for name, size in (("code_mean", n_code), ("latent_mean", n_latent)):
            self.register_buffer(name, torch.zeros(size))
        for name, size in (("code_std", n_code), ("latent_std", n_latent)):
            self.register_buffer(name, torch.ones(size))

    def encode(self, code):
        z = self.encoder((code - self.code_mean) / self.code_std)
        return (z - self.latent_mean) / self.latent_std

    def decode(self, latent):
        z = latent * self.latent_std + self.latent_mean
        return self.decoder(z) * self.code_std + self.code_mean


def _mlp(n_in, hidden, n_out):
    layers, width = [], n_in
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.SiLU()]
        width = h
    layers.append(torch.nn.Linear(width, n_out))
    return torch.nn.Sequential(*layers)


@dataclass(eq=False)
class ShapeAutoencoder:
    """A trained autoencoder of one spectral shape's code.

    Attributes
    ----------
    settings : AutoencoderSettings
    key : str
        The cache key (:func:`autoencoder_key`): the shape's fingerprint and
        the settings.
    metadata : dict
        ``train_s`` (training seconds), ``val_rms_um`` (validation rms
        surface displacement of the reconstruction, um), ``val_code_rms_um``
        (rms of the validation codes themselves, um), ``n_code``.
    """

    settings: AutoencoderSettings
    key: str
    metadata: dict
    net: _Net = field(repr=False)

    @property
    def n_latent(self):
        """Latent coordinates."""
        return self.settings.n_latent

    @property
    def n_code(self):
        """Coefficients of the spectral code it encodes."""
        return int(self.net.code_mean.shape[0])

    def encode(self, code):
        """Latent code(s) of spectral code(s) (..., n_code), numpy or torch."""
        return self._apply(self.net.encode, code)

    def decode(self, latent):
        """Spectral code(s) of latent code(s) (..., n_latent), numpy or torch.

        A float64 torch tensor is decoded in float64 (differentiable, for the
        fit).
        """
        return self._apply(self.net.decode, latent)

    def _apply(self, function, x):
        if isinstance(x, torch.Tensor):
            self.net.to(x.dtype)
            return function(x)
        with torch.no_grad():
            self.net.to(torch.float64)
            return function(torch.as_tensor(np.asarray(x, dtype=np.float64))).numpy()

    def check_shape(self, shape):
        """Raise unless this autoencoder was trained for ``shape``'s code."""
        if _shape_fingerprint(shape) != self.metadata.get("shape"):
            raise ValueError(
                "this autoencoder was trained for another shape code (template, "
                "n_modes or directions); train one for this shape with "
                "load_or_train_autoencoder(shape)."
            )


def _tube_frame(template):
    """Centre, rotation (rows: two across, the axis) and length of a tube."""
    points = template.vertices
    centre = points.mean(0)
    _, spread, vt = np.linalg.svd(points - centre, full_matrices=False)
    along = (points - centre) @ vt[0]
    across = np.linalg.norm((points - centre) @ vt[1:].T, axis=1)
    length = float(along.max() - along.min())
    # A ball's length equals its width to rounding: it must not pass.
    if length <= 2.0 * across.max() * (1.0 + 1e-6):
        raise ValueError(
            "the shape autoencoder's families are axons: the template must be "
            "a tube longer than it is wide (template='tube'), got length "
            f"{length:.3g} um and width {2 * across.max():.3g} um."
        )
    centre = centre + 0.5 * (along.max() + along.min()) * vt[0]
    # A frame fixed by the axis alone (the section's own principal
    # directions are arbitrary for a round tube): the axis points along its
    # largest coordinate, the first direction across is the coordinate axis
    # least aligned with it, projected (x and y for a tube along z).
    axis = vt[0] * np.sign(vt[0][np.argmax(np.abs(vt[0]))])
    first = np.eye(3)[np.argmin(np.abs(axis))]
    first = first - (first @ axis) * axis
    first /= np.linalg.norm(first)
    rotation = np.stack([first, np.cross(axis, first), axis])
    return centre, rotation, length


def draw_family(rng, families=FAMILIES):
    """Random family parameters: each family on with probability 1/2.

    Parameters
    ----------
    rng : numpy.random.Generator
    families : tuple of str
        Subset of :data:`FAMILIES`.

    Returns
    -------
    dict
        ``radius`` (relative) and :func:`.mesh.axon_deformation` keywords.
    """
    r = FAMILY_RANGES
    on = {name: name in families and rng.random() < 0.5 for name in FAMILIES}
    params = dict(radius=rng.uniform(*r["radius"]))
    if on["bending"]:
        params["curvature"] = rng.uniform(*r["curvature"])
        params["bend_azimuth"] = rng.uniform(0.0, 2.0 * np.pi)
    if on["beading"]:
        params["beading_amplitude"] = rng.uniform(*r["beading_amplitude"])
        params["beading_period"] = rng.uniform(*r["beading_period"])
        params["beading_phase"] = rng.uniform(0.0, 2.0 * np.pi)
    if on["swelling"]:
        params["swelling"] = rng.uniform(*r["swelling"])
    if on["fanning"]:
        params["fanning"] = rng.uniform(*r["fanning"])
    return params


def family_vertices(shape, params):
    """The template's vertices moved onto an axon of the families (V, 3).

    Parameters
    ----------
    shape : SpectralShape
        Of a tube template (any place and direction).
    params : dict
        :func:`draw_family`'s.
    """
    centre, rotation, length = _tube_frame(shape.template)
    local = (shape.template.vertices - centre) @ rotation.T
    params = dict(params)
    local[:, :2] *= params.pop("radius", 1.0)
    moved = axon_deformation(local, length, **params)
    return moved @ rotation + centre


class _Projector:
    """Mass-weighted least squares from surface displacements to codes."""

    def __init__(self, shape):
        template = shape.template
        surface = template.boundary_vertices
        local = np.full(template.n_vertices, -1, dtype=np.int64)
        local[surface] = np.arange(len(surface))
        _, mass = surface_laplacian(
            template.vertices[surface], local[template.boundary_faces]
        )
        self.surface = surface
        self.weights = mass / mass.sum()
        self.fields = shape.fields[:, surface].reshape(shape.n_code, -1)
        weighted = self.fields * np.repeat(self.weights, 3)[None]
        self.gram = weighted @ self.fields.T
        self.weighted = weighted
        self.base = template.vertices[surface]

    def __call__(self, vertices):
        displacement = (vertices[self.surface] - self.base).ravel()
        return np.linalg.solve(self.gram, self.weighted @ displacement)


def project_code(shape, vertices):
    """The code whose vertices best match ``vertices`` on the surface.

    Mass-weighted least squares over the template's surface vertices (the
    interior follows the code's harmonic extension).

    Parameters
    ----------
    shape : SpectralShape
    vertices : array_like (V, 3)
        Positions of the template's vertices (same numbering).

    Returns
    -------
    ndarray (n_code,)
    """
    return _Projector(shape)(np.asarray(vertices, dtype=np.float64))


def family_codes(shape, n, *, seed, families=FAMILIES):
    """Codes and parameters of ``n`` random members of the axon families.

    Parameters
    ----------
    shape : SpectralShape
        Of a tube template.
    n : int
    seed : int
        Members are a function of the seed (training: :data:`TRAINING_SEED`).
    families : tuple of str

    Returns
    -------
    codes : ndarray (n, n_code)
    params : list of dict
    """
    rng = np.random.default_rng(check_int(seed, "seed", 0))
    project = _Projector(shape)
    params = [draw_family(rng, families) for _ in range(check_int(n, "n", 1))]
    codes = np.stack([project(family_vertices(shape, p)) for p in params])
    return codes, params


def _shape_fingerprint(shape):
    return cache_key(
        dict(directions=shape.directions, n_code=shape.n_code),
        [shape.template.vertices, shape.template.tets, shape.fields],
    )


def autoencoder_key(shape, settings):
    """Hash of everything an autoencoder depends on (its cache key).

    The shape space, the settings, the families' ranges and the code that
    trains it (this module and every module of the package it imports,
    :func:`~dipy_spinverse.provenance.code_digest`).

    Parameters
    ----------
    shape : SpectralShape
        The shape space (its template, fields, directions and code size).
    settings : AutoencoderSettings
        The training settings.

    Returns
    -------
    str
        The first 20 hex digits of a SHA-256 digest.
    """
    description = dict(
        code=code_digest(__name__),
        shape=_shape_fingerprint(shape),
        settings=asdict(settings),
        ranges=FAMILY_RANGES,
    )
    return cache_key(description, [])


def train_autoencoder(shape, settings=None, *, progress=True):
    """Train an autoencoder on random members of the axon families.

    Always trains; :func:`load_or_train_autoencoder` caches.

    Parameters
    ----------
    shape : SpectralShape
        Of a tube template.
    settings : AutoencoderSettings, optional
    progress : bool
        A progress bar over the epochs and the training time printed.

    Returns
    -------
    ShapeAutoencoder
    """
    if not isinstance(shape, SpectralShape):
        raise TypeError(f"shape must be a SpectralShape, got {type(shape).__name__}.")
    settings = AutoencoderSettings() if settings is None else settings
    start = time.perf_counter()
    codes, _ = family_codes(
        shape, settings.n_train, seed=settings.seed, families=settings.families
    )
    n_val = max(1, int(round(_VALIDATION_SHARE * len(codes))))
    train, val = (
        torch.tensor(codes[n_val:], dtype=torch.float32),
        torch.tensor(codes[:n_val], dtype=torch.float32),
    )
    # Seeded weights without reseeding the user's global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = _Net(shape.n_code, settings.n_latent, settings.hidden)
    net.code_mean.copy_(train.mean(0))
    net.code_std.copy_(train.std(0).clamp_min(1e-6))
    optimiser = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings.epochs)
    generator = torch.Generator().manual_seed(settings.seed)
    bar = tqdm(
        range(settings.epochs), desc="Training shape autoencoder", disable=not progress
    )
    for _ in bar:
        order = torch.randperm(len(train), generator=generator)
        for i in range(0, len(train), settings.batch_size):
            batch = train[order[i : i + settings.batch_size]]
            z = net.encoder((batch - net.code_mean) / net.code_std)
            decoded = net.decoder(z) * net.code_std + net.code_mean
            # Squared code distance = mean squared surface displacement (um^2).
            loss = ((decoded - batch) ** 2).sum(1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        schedule.step()
        bar.set_postfix(rms_um=f"{loss.item() ** 0.5:.3f}")
    with torch.no_grad():
        z = net.encoder((train - net.code_mean) / net.code_std)
        net.latent_mean.copy_(z.mean(0))
        net.latent_std.copy_(z.std(0).clamp_min(1e-6))
        val_rms = ((net.decode(net.encode(val)) - val) ** 2).sum(1).mean().sqrt()
    seconds = time.perf_counter() - start
    if progress:
        print(
            f"Shape autoencoder trained in {seconds:.1f} s: {settings.n_train} "
            f"shapes, validation rms {val_rms.item():.3f} um"
        )
    metadata = dict(
        train_s=round(seconds, 2),
        val_rms_um=float(val_rms),
        val_code_rms_um=float(val.pow(2).sum(1).mean().sqrt()),
        n_code=shape.n_code,
        shape=_shape_fingerprint(shape),
    )
    net.eval()
    return ShapeAutoencoder(settings, autoencoder_key(shape, settings), metadata, net)


def load_or_train_autoencoder(shape, settings=None, *, directory=None, progress=True):
    """The cached autoencoder of this shape code, trained if missing.

    Parameters
    ----------
    shape : SpectralShape
        Of a tube template.
    settings : AutoencoderSettings, optional
    directory : path-like, optional
        Cache folder (default: the package's,
        :func:`dipy_spinverse.files.cache_root`).
    progress : bool

    Returns
    -------
    ShapeAutoencoder
    """
    settings = AutoencoderSettings() if settings is None else settings
    _tube_frame(shape.template)  # refuses a non-tube before the cache is read
    key = autoencoder_key(shape, settings)

    def load(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net = _Net(shape.n_code, settings.n_latent, settings.hidden)
        net.load_state_dict(saved["state"])
        net.eval()
        return ShapeAutoencoder(settings, key, json.loads(saved["metadata"]), net)

    def build():
        autoencoder = train_autoencoder(shape, settings, progress=progress)
        autoencoder.net.to(torch.float32)
        return autoencoder

    def save(autoencoder, tmp):
        state = autoencoder.net.state_dict()
        torch.save(dict(state=state, metadata=json.dumps(autoencoder.metadata)), tmp)

    return load_or_build(
        cache_root(directory) / f"shape-autoencoder-{key}.pt",
        load=load,
        build=build,
        save=save,
        what="shape autoencoder",
    )
