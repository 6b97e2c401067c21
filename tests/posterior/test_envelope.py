"""The prior predictive check (posterior.envelope): calibrated on the prior's
own draws, blind to nothing the prior cannot make, and safe on bad voxels.

A ball-and-stick "prior" in closed form stands in for a simulator, so that
the check's statistics are tested on thousands of draws in a second; one
test runs TissuePrior.check itself."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import Protocol
from dipy_spinverse.posterior import TissuePrior, envelope
from dipy_spinverse.posterior.envelope import (
    PredictiveEnvelope,
    prior_predictive_check,
    shell_layout,
)
from dipy_spinverse.posterior.noise import add_noise

RNG = np.random.default_rng(0)
DIRS = RNG.normal(size=(12, 3))
DIRS /= np.linalg.norm(DIRS, axis=1, keepdims=True)
BVALS = np.r_[np.zeros(2), np.full(12, 1000.0), np.full(12, 3000.0)]
BVECS = np.r_[np.zeros((2, 3)), DIRS, DIRS]
PROTOCOL = Protocol.pgse(BVALS, BVECS, small_delta=0.01, big_delta=0.03)


def ball_and_stick(protocol, seed, n=2000):
    """Noise-free draws: a stick (fraction 0.3-0.7, D 1.5-2.5 um^2/ms, any
    axis) and a ball (D 0.5-1.0 um^2/ms)."""
    rng = np.random.default_rng(seed)
    f = rng.uniform(0.3, 0.7, (n, 1))
    d_stick = rng.uniform(1.5e-3, 2.5e-3, (n, 1))
    d_ball = rng.uniform(0.5e-3, 1.0e-3, (n, 1))
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    cos = axis @ protocol.bvecs.T
    b = protocol.bvals
    return f * np.exp(-b * d_stick * cos**2) + (1 - f) * np.exp(-b * d_ball)


def noisy(signals, sigma, seed):
    generator = torch.Generator().manual_seed(seed)
    sigma = torch.full((len(signals),), sigma, dtype=torch.float64)
    return add_noise(torch.as_tensor(signals), sigma, generator).numpy()


@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_held_out_draws_fall_inside_at_the_level(level):
    """Held-out draws with the data's noise: the share inside is the level
    within 3 binomial standard errors of 1,000 voxels (plus the limit's
    own error from 1,000 calibration draws: ~1 point at 0.95)."""
    data = noisy(ball_and_stick(PROTOCOL, seed=7, n=1000), 0.02, seed=1) * 300
    result = prior_predictive_check(
        ball_and_stick, data, PROTOCOL, sigma=0.02 * 300, level=level, seed=3
    )
    tolerance = 3 * np.sqrt(level * (1 - level) / 1000) + 0.015
    assert abs(result.share_inside - level) <= tolerance
    assert result.inside.shape == (1000,) and result.checked.all()


def test_water_the_prior_cannot_make_is_outside_and_named():
    """Free water (D 3 um^2/ms) decays faster than any draw: every voxel
    outside, and the log line names first a shell's mean, which it leaves
    farthest."""
    free = np.exp(-BVALS * 3e-3)[None].repeat(50, 0)
    data = noisy(free, 0.01, seed=2)
    result = prior_predictive_check(ball_and_stick, data, PROTOCOL, sigma=0.01, seed=0)
    assert not result.inside.any()
    label, share, *_ = result.features_outside[0]
    assert share == 1.0 and label.endswith(": log mean")
    assert "0% of 50 voxels" in result.summary()


def test_a_pairing_the_prior_never_makes_is_outside():
    """Each feature inside the draws' range, their pairing not: the voxels
    that decay least at b = 1000 given the b = 3000 shell of those that decay
    most (in the prior the two rise together). The Mahalanobis distance sees
    what no per-feature range does."""
    draws = ball_and_stick(PROTOCOL, seed=11, n=800)
    b1000, b3000 = BVALS == 1000, BVALS == 3000
    slow = np.argsort(draws[:, b1000].mean(1))[-100:]
    fast = np.argsort(draws[:, b3000].mean(1))[:100]
    paired = draws[slow].copy()
    paired[:, b3000] = draws[fast][:, b3000]
    result = prior_predictive_check(
        ball_and_stick, paired, PROTOCOL, sigma=0.005, seed=0
    )
    assert result.share_inside < 0.1
    assert max(share for _, share, *_ in result.features_outside) < 0.5
    # The distance's terms name what no range does: both shells, whose
    # pairing (means and spreads) the prior never makes, carry most of it.
    top = result.features_carrying
    shells = {label.split(",")[1].split(":")[0].strip() for label, _ in top}
    assert shells == {"b 1000", "b 3000"}, top
    assert sum(share for _, share in top) > 0.5
    assert "carried by" in result.summary()


def test_the_distance_terms_sum_to_its_square():
    """Each feature's term of the squared distance (the Mahalanobis distance
    split by feature, plus its own residual) sums to the squared distance."""
    draws = ball_and_stick(PROTOCOL, seed=11, n=400)
    built = envelope.PredictiveEnvelope(draws, PROTOCOL, level=0.95)
    data = noisy(ball_and_stick(PROTOCOL, seed=12, n=30), 0.01, seed=4)
    normalised = data / data[:, BVALS == 0].mean(1, keepdims=True)
    distance, _ = built.distance(normalised, np.full(30, 0.01))
    fit, _ = built._rung(int(built._rung_index(0.01)[0]))
    terms = fit.terms(built.features(normalised, np.full(30, 0.01)))
    assert_allclose(terms.sum(1), distance**2, rtol=1e-10)


def test_bad_voxels_are_flagged_not_fatal_and_the_mask_is_kept():
    data = noisy(ball_and_stick(PROTOCOL, seed=8, n=12), 0.02, seed=3).reshape(3, 4, -1)
    data[0, 0, 5] = np.nan
    data[0, 1, :2] = 0.0  # b = 0 of zero
    mask = np.ones((3, 4), bool)
    mask[2, 3] = False
    result = prior_predictive_check(
        ball_and_stick, data, PROTOCOL, mask=mask, sigma=0.02
    )
    assert not result.checked[0, 0] and not result.checked[0, 1]
    assert not result.checked[2, 3] and np.isnan(result.distance[2, 3])
    assert result.checked.sum() == 9
    assert_array_equal(result.inside & ~result.checked, False)


@pytest.mark.parametrize(
    "sigma, match",
    [(0.0, "sigma must be finite and > 0"), (np.ones(5), "one per voxel")],
)
def test_bad_sigma_is_named(sigma, match):
    data = ball_and_stick(PROTOCOL, seed=1, n=4)
    with pytest.raises(ValueError, match=match):
        prior_predictive_check(ball_and_stick, data, PROTOCOL, sigma=sigma)


def test_bad_data_and_mask_are_named():
    data = ball_and_stick(PROTOCOL, seed=1, n=4)
    with pytest.raises(ValueError, match="one value per volume"):
        prior_predictive_check(ball_and_stick, data[:, :5], PROTOCOL, sigma=0.1)
    with pytest.raises(ValueError, match="mask must be a boolean array"):
        prior_predictive_check(
            ball_and_stick, data, PROTOCOL, mask=np.ones(4), sigma=0.1
        )
    with pytest.raises(ValueError, match="n >= 20"):
        PredictiveEnvelope(data, PROTOCOL)


def test_shells_hold_a_bounded_spread_not_a_chain():
    """b-values ramping by 10 s/mm^2 from 500 to 1,500 are not one shell
    (each within 5 % + 5 s/mm^2 of its lowest)."""
    ramp = np.linspace(500, 1500, 101)
    protocol = Protocol.pgse(
        ramp, np.tile([1.0, 0, 0], (101, 1)), small_delta=0.01, big_delta=0.03
    )
    shells, labels = shell_layout(protocol)
    for rows in shells:
        b = protocol.bvals[rows]
        assert b.max() <= b.min() * 1.05 + 5
    assert len(shells) > 10 and "delta 10 / Delta 30 ms" in labels[0]


def test_tissue_prior_check_holds_its_own_draws():
    """TissuePrior.check end to end on a small protocol: its own held-out
    draws mostly inside, free water outside (200 draws: a coarse check)."""
    protocol = Protocol.pgse(
        np.r_[0, [1500.0] * 3, [4000.0] * 3],
        np.r_[[[0, 0, 0]], np.eye(3), np.eye(3)],
        small_delta=0.01,
        big_delta=0.03,
    )
    prior = TissuePrior()
    own = prior.simulator(protocol).sample(20, seed=50)[0]
    free = np.exp(-protocol.bvals * 3e-3)[None].repeat(5, 0)
    data = noisy(np.concatenate([own, free]), 0.01, seed=4)
    result = prior.check(data, protocol, sigma=0.01, n_draws=200, seed=0)
    assert result.inside[:20].mean() >= 0.75
    assert not result.inside[20:].any()


@pytest.mark.slow
def test_white_matter_prior_check_holds_its_own_draws():
    """WhiteMatterPrior.check: the same public check (24 small bundles): its
    own held-out draws inside, free water outside."""
    from dipy_spinverse.posterior.white_matter import WhiteMatterPrior

    prior = WhiteMatterPrior(
        n_axons=(4, 6), mean_diameter=(2.0, 4.0), fibre_fraction=(0.5, 0.7)
    )
    protocol = Protocol.pgse(
        np.r_[0, [1500.0] * 3, [4000.0] * 3],
        np.r_[[[0, 0, 0]], np.eye(3), np.eye(3)],
        small_delta=0.01,
        big_delta=0.03,
    )
    rng = np.random.default_rng(77)
    own = prior.simulate([prior.draw(rng) for _ in range(4)], protocol)
    free = np.exp(-protocol.bvals * 3e-3)[None].repeat(3, 0)
    data = noisy(np.concatenate([own, free]), 0.01, seed=4)
    result = prior.check(data, protocol, sigma=0.01, n_draws=24, seed=0)
    assert result.inside[:4].mean() >= 0.75
    assert not result.inside[4:].any()


def test_a_shell_mean_at_or_below_zero_is_read():
    """Gaussian noise (denoised or real-valued data) can leave a shell's
    mean at or below 0 at high b: the features stay finite (linear below
    1 % of b = 0), and such a voxel of the prior is read like the rest."""
    rng = np.random.default_rng(6)
    clean = ball_and_stick(PROTOCOL, seed=9, n=200)
    data = clean + 0.02 * rng.standard_normal(clean.shape)
    data[0, BVALS == 3000] = -0.01
    result = prior_predictive_check(ball_and_stick, data, PROTOCOL, sigma=0.02)
    assert np.isfinite(result.distance).all()
    assert result.share_inside > 0.85


def test_a_spread_is_the_tissues_not_the_noises():
    """Over 195 directions of an isotropic signal with noise sigma, the raw
    spread is sigma (known to 5 %) and the spread with the noise's variance
    taken out is near 0 (at most a third of sigma: the variance's sampling
    error, sqrt(2 / 195) sigma^2), so data whose noise is a little below
    the envelope's rung do not lie outside on that feature alone; a real
    anisotropy is kept (1e-3 against its closed form)."""
    rng = np.random.default_rng(0)
    sigma = 0.02
    shells = [np.arange(195)]
    flat = 0.9 + sigma * rng.standard_normal((400, 195))
    raw = envelope.shell_features(flat, shells)[:, 1]
    debiased = envelope.shell_features(flat, shells, np.full(400, sigma))[:, 1]
    assert abs(np.median(raw) * 0.9 / sigma - 1) < 0.05
    assert np.median(debiased) * 0.9 < sigma / 3
    ramp = np.linspace(0.8, 1.0, 195)[None, :]
    assert_allclose(
        envelope.shell_features(ramp, shells, np.zeros(1))[0, 1],
        ramp.std() / ramp.mean(),
        rtol=1e-3,
    )


def test_noise_is_relative_to_b0_when_the_prior_has_t2():
    """A prior whose signals carry T2 weighting (b = 0 of 0.4 at its echo
    time) is checked as the same prior without it: noise levels are relative
    to each signal's own b = 0, the data's convention. Before, its envelope
    put 1 / 0.4 times the noise on its draws, and the check of data at the
    stated noise held 0.95 of them at most by chance."""
    data = noisy(ball_and_stick(PROTOCOL, seed=7, n=400), 0.02, seed=1) * 300

    def weighted(protocol, seed):
        return 0.4 * ball_and_stick(protocol, seed)

    plain = prior_predictive_check(ball_and_stick, data, PROTOCOL, sigma=6.0, seed=3)
    with_t2 = prior_predictive_check(weighted, data, PROTOCOL, sigma=6.0, seed=3)
    assert_allclose(with_t2.distance, plain.distance, rtol=1e-9)
    assert_allclose(with_t2.limit, plain.limit, rtol=1e-9)
