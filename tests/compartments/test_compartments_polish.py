"""Tests of the polishing of learned estimates (``learned_options["polish"]``).

The polish is the fitting's own variable-projection Levenberg-Marquardt,
started from the network's estimates. Its checks do not depend on a trained
network: starts are the true parameters deliberately perturbed, on
noise-free signals of the model itself (so the truth is a zero-residual
minimum), plus one public-path check with a tiny network.
"""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from dipy_spinverse.compartments import (
    ActiveAxModel,
    ExchangeModel,
    IvimCompartmentModel,
    NoddiModel,
    ZcdModel,
)
from dipy_spinverse.compartments.learned import LearnedOptions

TINY = {"n_train": 2000, "epochs": 2, "hidden": (32, 32), "batch_size": 256}
S0 = 100.0


def unit(rng, n):
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def rotated(dirs, rng, degrees):
    """Unit vectors ``degrees`` away from ``dirs`` (n, 3), random azimuth."""
    side = np.cross(dirs, unit(rng, len(dirs)))
    side /= np.linalg.norm(side, axis=1, keepdims=True)
    a = np.radians(degrees)
    return np.cos(a) * dirs + np.sin(a) * side


def angle_deg(a, b):
    return np.degrees(np.arccos(np.clip(np.abs(np.sum(a * b, -1)), 0, 1)))


def noddi_truth(rng, n, n_fibres):
    cols = [np.full(n, S0), rng.uniform(0.05, 0.25, n)]
    w = [0.65, 0.35] if n_fibres == 2 else [1.0]
    first = unit(rng, n)
    dirs = [first, rotated(first, rng, 75.0)]
    for k in range(n_fibres):
        cols += [
            np.full(n, w[k]),
            rng.uniform(0.4, 0.7, n),
            rng.uniform(0.1, 0.3, n),
            dirs[k],
        ]
    return np.column_stack(cols)


def activeax_truth(rng, n):
    fiso = rng.uniform(0.05, 0.15, n)
    icvf = rng.uniform(0.5, 0.7, n)
    return np.column_stack(
        [
            np.full(n, S0),
            (1 - fiso) * icvf,
            (1 - fiso) * (1 - icvf),
            fiso,
            np.zeros(n),
            rng.uniform(4.0, 8.0, n),
            unit(rng, n),
        ]
    )


def zcd_truth(rng, n):
    fic, fdot = rng.uniform(0.45, 0.65, n), rng.uniform(0.02, 0.08, n)
    d_par = rng.uniform(1.4e-3, 2.0e-3, n)
    return np.column_stack(
        [
            np.full(n, S0),
            fic,
            1 - fic - fdot,
            fdot,
            rng.uniform(4.0, 8.0, n),
            d_par,
            d_par * rng.uniform(0.3, 0.5, n),
            unit(rng, n),
        ]
    )


def ivim_truth(rng, n):
    return np.column_stack(
        [
            np.full(n, S0),
            rng.uniform(0.08, 0.2, n),
            rng.uniform(0.015, 0.04, n),
            rng.uniform(0.6e-3, 1.4e-3, n),
        ]
    )


def perturbed(model, truth, rng):
    """The truth with every scalar moved by 10-20 % (relative, random sign;
    S0 left to the linear solve) and every direction turned by 8 degrees."""
    start = truth.copy()
    slots = model._direction_slots()
    in_dir = {s + j for s in slots for j in range(3)}
    for i in range(1, truth.shape[1]):
        if i in in_dir:
            continue
        sign = rng.choice([-1.0, 1.0], len(truth))
        start[:, i] *= 1.0 + sign * rng.uniform(0.1, 0.2, len(truth))
    for s in slots:
        start[:, s : s + 3] = rotated(truth[:, s : s + 3], rng, 8.0)
    return start


def errors(model, a, b):
    """Largest scalar difference relative to b's magnitude (S0 excluded) and
    the largest direction angle (degrees), per voxel."""
    slots = model._direction_slots()
    in_dir = {s + j for s in slots for j in range(3)}
    scalars = [i for i in range(1, a.shape[1]) if i not in in_dir]
    scale = np.maximum(np.abs(b[:, scalars]), 0.05)
    rel = (np.abs(a[:, scalars] - b[:, scalars]) / scale).max(1)
    ang = [angle_deg(a[:, s : s + 3], b[:, s : s + 3]) for s in slots]
    return rel, (np.max(ang, axis=0) if ang else np.zeros(len(a)))


CASES = {
    "noddi": (lambda g, gi: NoddiModel(g), lambda r, n: noddi_truth(r, n, 1)),
    "noddi-2": (
        lambda g, gi: NoddiModel(g, n_fibres=2),
        lambda r, n: noddi_truth(r, n, 2),
    ),
    "activeax": (lambda g, gi: ActiveAxModel(g), activeax_truth),
    "zcd": (lambda g, gi: ZcdModel(g), zcd_truth),
    "ivim": (lambda g, gi: IvimCompartmentModel(gi), ivim_truth),
}


@pytest.fixture(scope="module")
def models(gtab_shells, gtab_ivim):
    """One model per case, shared by the tests (lookup tables built once)."""
    return {label: build(gtab_shells, gtab_ivim) for label, (build, _) in CASES.items()}


@pytest.mark.parametrize("label", CASES)
def test_polish_recovers_the_truth_from_a_perturbed_start(models, label):
    model, draw = models[label], CASES[label][1]
    rng = np.random.default_rng(7)
    truth = draw(rng, 8)
    # Fibres in the layout's order (weight first), directions z >= 0.
    truth = model._fit_class(model, truth).model_params
    signals = model._fit_class(model, truth).predict()
    s0 = model._s0_estimate(signals)
    start = perturbed(model, truth, rng)
    rel0, ang0 = errors(model, start, truth)
    polished = model._polished(signals / s0[:, None], s0, start, 40)
    rel, ang = errors(model, polished, truth)
    # The start is far off (>= 10 % and 8 degrees); noise-free signals of the
    # model itself make the truth a zero-residual minimum, which
    # Levenberg-Marquardt reaches from inside its basin to the precision of
    # its Jacobian and stopping rule: 1e-4 relative and 0.01 degree are
    # 1,000x below the start's errors and far below any noise effect (at
    # SNR 50 the fitted errors are ~1e-2 and ~1 degree).
    assert rel0.min() >= 0.09
    assert ang0.min() > 7.9 or not model._direction_slots()
    assert rel.max() < 1e-4, rel.max()
    assert ang.max() < 1e-2, ang.max()
    assert_allclose(polished[:, 0], S0, rtol=1e-4)


def bounded_values(model, params):
    """Every bounded nonlinear parameter of the public params (V, P), as
    (bound, values) pairs, through the model's own conversion."""
    t = torch.as_tensor(params, dtype=torch.float64)
    shared, fibre, _, _, _ = model._from_params(t)
    out = [(b, shared[b.name].numpy()) for b in model._shared]
    return out + [(b, fibre[b.name].numpy()) for b in model._fibre]


@pytest.mark.parametrize("label", CASES)
def test_polish_respects_the_bounds(models, label):
    model, draw = models[label], CASES[label][1]
    rng = np.random.default_rng(8)
    truth = model._fit_class(model, draw(rng, 8)).model_params
    clean = model._fit_class(model, truth).predict()
    # Noisy signals (SNR 10), starts with every scalar pushed 3x out of
    # range in turn: outside their bounds, and the data pull anywhere.
    noisy = np.abs(clean + rng.normal(0, S0 / 10, clean.shape))
    s0 = model._s0_estimate(noisy)
    start = truth.copy()
    slots = model._direction_slots()
    in_dir = {s + j for s in slots for j in range(3)}
    scalars = [i for i in range(1, truth.shape[1]) if i not in in_dir]
    start[:, scalars] *= np.where(np.arange(len(truth)) % 2, 3.0, -3.0)[:, None]
    polished = model._polished(noisy / s0[:, None], s0, start, 10)
    assert np.isfinite(polished).all()
    for bound, values in bounded_values(model, polished):
        assert np.all(values >= bound.lower), bound
        assert np.all(values <= bound.upper), bound
    # Volume fractions by NNLS: non-negative.
    fractions = model._from_params(torch.as_tensor(polished))[3].numpy()
    assert np.all(fractions >= 0)
    for s in slots:
        assert_allclose(np.linalg.norm(polished[:, s : s + 3], axis=1), 1.0)


@pytest.mark.parametrize("n_fibres", [1, 2])
def test_polished_learned_fit_never_fits_worse(gtab_shells, tmp_path, n_fibres):
    # Public path: a tiny network, then its estimates polished. One fibre:
    # the volume fractions are re-solved at the network's nonlinear
    # parameters (never worse than the network's own fractions there) and a
    # step is taken only if it lowers the residual; two fibres: the
    # network's fractions are refined with the nonlinear parameters from
    # the network's own signal, by steps that lower the residual. Either
    # way every voxel's residual is at most the network's (up to rounding).
    options = {**TINY, "seed": 2}
    net = NoddiModel(
        gtab_shells,
        n_fibres=n_fibres,
        fit_method="learned",
        learned_options={**options, "polish": 0},
        cache_dir=tmp_path,
    )
    polish = NoddiModel(
        gtab_shells,
        n_fibres=n_fibres,
        fit_method="learned",
        learned_options={**options, "polish": 3},
        cache_dir=tmp_path,
    )
    # The polish does not enter the cache key: the same network.
    assert polish._learned_key() == net._learned_key()
    rng = np.random.default_rng(9)
    truth = noddi_truth(rng, 30, n_fibres)
    clean = net._fit_class(net, truth).predict()
    noisy = np.abs(clean + rng.normal(0, 2.0, clean.shape))
    rss = [
        ((f.predict() - noisy) ** 2).sum(-1)
        for f in (net.fit(noisy), polish.fit(noisy))
    ]
    assert np.all(rss[1] <= rss[0] * (1 + 1e-9))
    assert np.median(rss[1]) < np.median(rss[0])


def test_polish_option_is_checked_and_not_in_the_key(gtab_shells):
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match=r"learned_options\['polish'\]"):
            LearnedOptions.from_dict({"polish": bad})
    assert LearnedOptions.from_dict({"polish": 4}).polish == 4
    # Unset: each model's own default (one iteration; none for the exchange
    # model, whose network alone is within 1.5x of the fit).
    assert LearnedOptions().polish is None
    assert LearnedOptions.from_dict({"polish": None}).polish is None
    assert ExchangeModel.default_polish == 0
    assert ZcdModel.default_polish == 2  # one left the diameter 1.85x the fit's
    # NODDI's network in the voxels' frames needs no iteration; in the lab
    # frame it does.
    assert NoddiModel(gtab_shells, fit_method="learned").default_polish == 0
    off = {"frame": False}
    lab = NoddiModel(gtab_shells, fit_method="learned", learned_options=off)
    assert lab.default_polish == 1
    # The training description is the repr of the training fields (the
    # cache key's text): the polish and the device are not among them.
    assert LearnedOptions(polish=5, device="cpu").training_description() == (
        "LearnedOptions(n_train=100000, epochs=30, hidden=(256, 256, 256), "
        "batch_size=512, lr=0.002, seed=0, frame=True)"
    )
