"""The shape autoencoder (dipy_spinverse.meshfit.autoencoder) and latent fits.

A tiny budget throughout: a resolution-2 tube (161 vertices), 8 normal
modes, 600 training shapes, 100 epochs (a few seconds on a quiet core).
"""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from dipy_spinverse.meshfit import autoencoder as ae
from dipy_spinverse.meshfit.fem import mesh_signal
from dipy_spinverse.meshfit.fit import fit_mesh
from dipy_spinverse.meshfit.mesh import axon_mesh, ball_mesh, tube_mesh
from dipy_spinverse.meshfit.shape import spectral_shape
from dipy_spinverse.meshfit.templates import axis_radius
from dipy_spinverse.sim.sequences import Protocol, fibonacci_sphere

TINY = ae.AutoencoderSettings(
    n_latent=6, n_train=600, epochs=100, hidden=(32, 32), batch_size=50
)
TEMPLATE = dict(radius=3.0, length=20.0, resolution=2, layers=6)


@pytest.fixture(scope="module")
def shape():
    return spectral_shape(tube_mesh(**TEMPLATE), n_modes=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("autoencoder_cache")


@pytest.fixture(scope="module")
def trained(shape, cache):
    return ae.load_or_train_autoencoder(shape, TINY, directory=cache, progress=False)


def test_family_members_are_the_axon_meshes(shape):
    # The template moved onto a family member is axon_mesh's tube of the
    # same connectivity (the template is axon_mesh's straight tube).
    params = dict(radius=1.1, curvature=0.05, bend_azimuth=0.7, fanning=0.1)
    moved = ae.family_vertices(shape, params)
    truth = axon_mesh(
        3.3, 20.0, curvature=0.05, bend_azimuth=0.7, fanning=0.1, resolution=2, layers=6
    )
    assert_allclose(moved, truth.vertices, atol=1e-9)
    # The code of the template itself is 0; of a uniform swelling, mode 0.
    assert_allclose(ae.project_code(shape, shape.template.vertices), 0, atol=1e-12)
    swollen = shape.vertices(np.r_[0.4, np.zeros(shape.n_code - 1)])
    assert_allclose(
        ae.project_code(shape, swollen), np.eye(shape.n_code)[0] * 0.4, atol=1e-12
    )
    with pytest.raises(ValueError, match="must be a tube"):
        ae.train_autoencoder(spectral_shape(ball_mesh(3.0, resolution=2), n_modes=4))


def test_held_out_members_are_reconstructed(shape, trained):
    # Shapes of seeds never used in training. A code difference's norm is
    # the rms surface displacement in um (the fields are orthonormal in the
    # surface's mass): the reconstruction must be within 0.15 um rms, under
    # a third of the 0.5 um Chamfer target, and under a quarter of
    # the held-out codes' own rms (0.70 um), so that it is not met by
    # decoding everything to the template. Measured: 0.07 um.
    held_out, _ = ae.family_codes(shape, 200, seed=1)
    assert ae.TRAINING_SEED != 1
    error = np.sqrt(((trained.decode(trained.encode(held_out)) - held_out) ** 2).sum(1))
    spread = np.sqrt((held_out**2).sum(1).mean())
    assert np.sqrt((error**2).mean()) < min(0.15, 0.25 * spread)
    assert trained.metadata["val_rms_um"] < 0.15
    # Decoding torch float64 is differentiable and agrees with numpy.
    latent = torch.tensor(trained.encode(held_out[0]), requires_grad=True)
    decoded = trained.decode(latent)
    decoded.sum().backward()
    assert latent.grad is not None and torch.isfinite(latent.grad).all()
    assert_allclose(decoded.detach().numpy(), trained.decode(latent.detach().numpy()))


def test_cache_reload_skips_training(shape, trained, cache, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(ae, "train_autoencoder", no_training)
    again = ae.load_or_train_autoencoder(shape, TINY, directory=cache)
    assert again.key == trained.key
    assert again.metadata == trained.metadata and again.metadata["train_s"] > 0
    codes, _ = ae.family_codes(shape, 5, seed=3)
    assert_allclose(
        again.decode(again.encode(codes)), trained.decode(trained.encode(codes))
    )
    # Other settings or another shape code: another key.
    other = ae.AutoencoderSettings(n_latent=5, n_train=600, epochs=100)
    assert ae.autoencoder_key(shape, other) != trained.key
    fewer = spectral_shape(shape.template, n_modes=7)
    assert ae.autoencoder_key(fewer, TINY) != trained.key
    with pytest.raises(ValueError, match="another shape code"):
        trained.check_shape(fewer)


def _protocol():
    dirs = fibonacci_sphere(6)
    bvals = np.r_[0.0, np.repeat([1000.0, 3000.0], 6)]
    bvecs = np.r_[[[0.0, 0.0, 0.0]], np.tile(dirs, (2, 1))]
    short = Protocol.pgse(bvals, bvecs, small_delta=0.010, big_delta=0.030)
    return short + Protocol.pgse(bvals, bvecs, small_delta=0.010, big_delta=0.060)


def test_latent_fit_recovers_a_bent_axon_radius(shape, trained):
    # A held-out bent axon (parameters not drawn in training; the same mesh
    # resolution as the template, noise free: a cheap case) fitted from the
    # straight 3 um template in the latent code, 20 iterations. Measured
    # (doc/mesh_inversion.md): radius error +6.2% against the template's
    # -9.2%; the spectral code with the same budget gets +6.0% (learning
    # rate 0.1; the latent at 0.1: +8.0%), so the issue's "at least as well
    # as the raw coefficients" is NOT met here and not asserted. Asserted:
    # the latent fit moves the radius toward the truth (error below 0.8 of
    # the template's) and lowers the loss by 5x.
    protocol = _protocol()
    truth = axon_mesh(
        3.4, 20.0, curvature=0.05, bend_azimuth=1.0, resolution=2, layers=6
    )
    signal = mesh_signal(truth, protocol).numpy()
    true_radius = axis_radius(truth)
    fit = fit_mesh(
        signal,
        protocol,
        template=shape,
        code="latent",
        autoencoder=trained,
        max_iter=20,
        learning_rate=0.3,
    )
    assert fit.n_inverted == 0
    error = abs(axis_radius(fit.mesh) / true_radius - 1)
    template_error = abs(axis_radius(shape.template) / true_radius - 1)
    assert error < 0.8 * template_error, (error, template_error)
    assert fit.loss_history.min() < 0.2 * fit.loss_history[0]
    assert fit.latent_code.shape == (TINY.n_latent,)
    assert_allclose(fit.shape_code, trained.decode(fit.latent_code))


def test_latent_code_options_are_checked(shape, trained):
    protocol = _protocol()
    signal = np.ones(len(protocol))
    with pytest.raises(ValueError, match="Invalid code"):
        fit_mesh(signal, protocol, template=shape, code="pca")
    with pytest.raises(ValueError, match="with code='latent' only"):
        fit_mesh(signal, protocol, template=shape, autoencoder=trained)
    with pytest.raises(ValueError, match="another shape code"):
        fit_mesh(
            signal,
            protocol,
            template=spectral_shape(shape.template, n_modes=7),
            code="latent",
            autoencoder=trained,
        )
    with pytest.raises(ValueError, match="unknown families"):
        ae.AutoencoderSettings(families=("twisting",))


def test_a_ball_is_not_a_tube(cache):
    # Its length equals its width to rounding; it used to pass the tube test
    # (a strict <) and, once cached, was never tested again.
    ball = spectral_shape(ball_mesh(4.0, resolution=2), n_modes=4)
    with pytest.raises(ValueError, match="tube longer than it is wide"):
        ae.load_or_train_autoencoder(ball, directory=cache)
