"""Tests of the per-voxel signal frames of the learned estimators
(:mod:`dipy_spinverse.compartments.frames`)."""

import numpy as np
import pytest
import torch
from conftest import shells_gtab
from numpy.testing import assert_allclose
from scipy.spatial.transform import Rotation

from dipy_spinverse.compartments import ExchangeModel, IvimCompartmentModel, NoddiModel
from dipy_spinverse.compartments.frames import SignalFrame, rotate_outer


@pytest.fixture(scope="module")
def gtab_dense():
    """Two shells of 60 directions (degree-6 fits) and 3 b = 0."""
    return shells_gtab([(0.01, 0.03, (1000, 2500))], n_dirs=60, n_b0=3)


def _noddi_signals(gtab, directions, *, odi=0.1, n_fibres=1, weights=None):
    """Noiseless NODDI signals (V, M), S0 = 1, one voxel per row of
    ``directions`` (V, n_fibres, 3); equal fibre weights by default."""
    if weights is None:
        weights = [0.9 / n_fibres] * n_fibres
    model = NoddiModel(gtab, n_fibres=n_fibres, kernels="exact")
    V = directions.shape[0]
    cols = [np.ones(V), np.full(V, 0.1)]
    for k in range(n_fibres):
        cols += [np.full(V, weights[k]), np.full(V, 0.6), np.full(V, odi)]
        cols += [directions[:, k]]
    return model._fit_class(model, np.column_stack(cols)).predict()


def _angle_deg(a, b):
    return np.degrees(np.arccos(np.clip(np.abs(np.sum(a * b, -1)), 0, 1)))


def test_shells_are_split_by_b_value_and_diffusion_time(gtab_shells, gtab_ivim):
    frame = SignalFrame.from_gtab(gtab_shells)
    # Five (b, timing) shells of 20 directions; the 6 b = 0 volumes raw.
    assert [len(s.index) for s in frame.shells] == [20] * 5
    assert len(frame.raw) == int(gtab_shells.b0s_mask.sum()) == 6
    assert frame.n_features == 6 + 5 * 15 + 3  # degree 4 from 20 directions
    shells = np.concatenate([s.index.numpy() for s in frame.shells])
    assert len(set(shells)) == len(shells) == 100
    # One direction per b-value: no shell, no frame. Shells of 15
    # directions would be fitted at degree 2, which cannot hold a crossing:
    # they stay raw, and with no other shell there is no frame.
    assert SignalFrame.from_gtab(gtab_ivim) is None
    sparse = shells_gtab([(0.01, 0.03, (1000, 2000))], n_dirs=15, n_b0=2)
    assert SignalFrame.from_gtab(sparse) is None


def test_shell_fit_is_exact_for_an_even_polynomial(gtab_dense):
    # A degree-4 signal on each shell is fitted exactly up to the ridge's
    # bias (RIDGE = 1e-3 of the mean eigenvalue: ~1e-3 of the coefficients,
    # measured 6.9e-4 on a signal of ~0.5), so its resampled values equal
    # the polynomial at the frame's points.
    frame = SignalFrame.from_gtab(gtab_dense)
    g = torch.as_tensor(gtab_dense.bvecs)
    u = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    u = u / u.norm()

    def poly(x):
        c = x @ u
        return 0.5 + 0.2 * c**2 - 0.15 * c**4 + 0.1 * x[..., 0] ** 2 * x[..., 1] ** 2

    y = poly(g)[None].clone()
    y[0, torch.as_tensor(gtab_dense.b0s_mask)] = 1.0
    features, frames = frame.features(y)
    start = len(frame.raw)
    for shell in frame.shells:
        lab = shell.points @ frames[0].T
        got = features[0, start : start + len(shell.points)]
        assert_allclose(got, poly(lab), atol=1.5e-3)
        start += len(shell.points)


def test_frame_follows_the_fibres(gtab_dense):
    # One narrow fibre population (ODI 0.1): the axis of least signal is
    # the fibre; two crossing at 90 degrees: the normal of their plane is
    # the axis of most signal. Exact moments of the fits leave only the
    # fit's own error (measured <= 0.006 degrees; 0.05 allowed).
    rng = np.random.default_rng(3)
    u = rng.standard_normal((8, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = np.cross(u, rng.standard_normal((8, 3)))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    frame = SignalFrame.from_gtab(gtab_dense)
    one = _noddi_signals(gtab_dense, u[:, None])
    _, frames = frame.features(torch.as_tensor(one))
    assert np.all(_angle_deg(frames[:, :, 0].numpy(), u) < 0.05)
    two = _noddi_signals(gtab_dense, np.stack([u, v], 1), n_fibres=2)
    _, frames = frame.features(torch.as_tensor(two))
    assert np.all(_angle_deg(frames[:, :, 2].numpy(), np.cross(u, v)) < 0.05)
    # Right-handed rotations.
    assert_allclose(torch.linalg.det(frames), 1.0, rtol=1e-12)
    assert_allclose(frames.mT @ frames, torch.eye(3).expand(8, 3, 3), atol=1e-12)


@pytest.mark.parametrize("weights", [(0.45, 0.45), (0.6, 0.3)])
def test_features_do_not_depend_on_the_tissue_orientation(gtab_dense, weights):
    # The same two-fibre tissue turned by random rotations: the network's
    # inputs change only by the protocol's own anisotropy (60 directions,
    # degree 6; measured <= 5e-4 on signals of ~0.5), while the lab signals
    # change by up to 0.4. Unequal weights make the tissue chiral in its
    # frame: the axes' signs must then be chosen the same way every time.
    rng = np.random.default_rng(4)
    u = np.array([0.0, 0.0, 1.0])
    v = np.array([np.sin(1.2), 0.0, np.cos(1.2)])
    turns = Rotation.random(6, random_state=rng).as_matrix()
    dirs = np.stack([turns @ u, turns @ v], 1)
    signals = _noddi_signals(gtab_dense, dirs, n_fibres=2, weights=weights)
    signals = torch.as_tensor(signals)
    features, frames = SignalFrame.from_gtab(gtab_dense).features(signals)
    assert (signals - signals[0]).abs().max() > 0.2
    assert_allclose(features, features[:1].expand_as(features), atol=2e-3)
    # The fibres seen from the frame are the same axes every time (as a
    # set where the weights are equal: a mirror image then swaps them).
    seen = np.einsum("vji,vkj->vki", frames.numpy(), dirs)  # R^T n, (V, 2, 3)
    outer = seen[..., :, None] * seen[..., None, :]
    if weights[0] == weights[1]:
        outer = outer.sum(1)
    assert_allclose(outer, np.broadcast_to(outer[0], outer.shape), atol=1e-3)


def test_rotate_outer_round_trip():
    rng = np.random.default_rng(5)
    n = rng.standard_normal((10, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    iu = np.triu_indices(3)
    entries = torch.as_tensor((n[:, :, None] * n[:, None, :])[:, iu[0], iu[1]])
    frames = torch.as_tensor(Rotation.random(10, random_state=rng).as_matrix())
    inside = rotate_outer(entries, frames, to_frame=True)
    m = np.einsum("vji,vj->vi", frames.numpy(), n)  # R^T n
    assert_allclose(
        inside, (m[:, :, None] * m[:, None, :])[:, iu[0], iu[1]], atol=1e-14
    )
    back = rotate_outer(inside, frames, to_frame=False)
    assert_allclose(back, entries, atol=1e-14)


def test_models_without_directions_have_no_frame(gtab_shells, gtab_ivim):
    assert IvimCompartmentModel(gtab_ivim, fit_method="learned")._signal_frame is None
    assert ExchangeModel(gtab_shells, fit_method="learned")._signal_frame is None
    off = NoddiModel(
        gtab_shells, fit_method="learned", learned_options={"frame": False}
    )
    assert off._signal_frame is None
    assert NoddiModel(gtab_shells, fit_method="learned")._signal_frame is not None
    with pytest.raises(ValueError, match=r"learned_options\['frame'\]"):
        NoddiModel(gtab_shells, learned_options={"frame": "yes"})


def test_frame_constants_follow_the_signals_device(gtab_shells):
    # A network trained on a GPU gets its batches' features there: every
    # constant tensor of the frame is moved to the signals' device, once.
    frame = SignalFrame.from_gtab(gtab_shells)
    meta = torch.device("meta")
    shells, raw = frame._constants(meta)
    assert raw.device == meta
    assert all(t.device == meta for s in shells for t in vars(s).values())
    assert frame._constants(meta)[0] is shells
    assert all(t.device.type == "cpu" for t in vars(frame.shells[0]).values())


def test_frame_definition_is_in_the_cache_key(gtab_shells, monkeypatch):
    # A network trained on other inputs (another degree, frame off) is
    # never loaded for these.
    from dipy_spinverse.compartments import frames

    key = NoddiModel(gtab_shells, fit_method="learned")._learned_key()
    off = {"frame": False}
    assert NoddiModel(gtab_shells, learned_options=off)._learned_key() != key
    monkeypatch.setattr(frames, "MIN_SHELL_DIRECTIONS", 10)
    monkeypatch.setattr(frames, "MAX_DEGREE", 2)
    assert NoddiModel(gtab_shells, fit_method="learned")._learned_key() != key
