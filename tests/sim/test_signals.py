"""signals: the one b0 normalisation and the one data loss; Protocol.sequences."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import Protocol
from dipy_spinverse.sim.signals import (
    VoxelSignals,
    b0_scale,
    data_loss,
    noise_precision,
    normalise_b0,
    sequence_index,
)

BVECS = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], float)


@pytest.fixture
def protocol():
    """Short diffusion time first, so rank order differs from appearance order."""
    short = Protocol.pgse([0, 1000, 2000], BVECS, small_delta=0.005, big_delta=0.01)
    long = Protocol.pgse([0, 1000, 2000], BVECS, small_delta=0.005, big_delta=0.04)
    return short + long


def test_sequences_rank_by_decreasing_diffusion_time(protocol):
    ranked = protocol.sequences()
    assert [w.big_delta for w, _ in ranked] == [0.04, 0.01]
    assert_array_equal(ranked[0][1], [3, 4, 5])
    assert_array_equal(sequence_index(protocol), [1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_each_sequence_is_divided_by_its_own_b0(protocol, kind):
    signal = np.array([[600.0, 300, 150, 900, 300, 100]])
    if kind == "torch":
        signal = torch.as_tensor(signal)
    scale = b0_scale(signal, protocol)
    # Rank order: the long sequence (b0 900) first. Exact: one division.
    assert_array_equal(np.asarray(scale), [[900.0, 600.0]])
    out = np.asarray(normalise_b0(signal, protocol))
    assert_array_equal(out, [[1.0, 0.5, 0.25, 1.0, 1 / 3, 1 / 9]])


def test_voxel_signals_hold_one_normalisation(protocol):
    """VoxelSignals is what the functions above give, computed once; its rows
    index every field alike; a voxel with b = 0 of 0 is not an error."""
    raw = np.array(
        [
            [600.0, 300, 150, 900, 300, 100],
            [60.0, 30, 15, 80, 40, 20],
            [0, 1, 1, 0, 1, 1],
        ]
    )
    signals = VoxelSignals.from_raw(raw, protocol)
    assert len(signals) == 3
    good = raw[:2]
    assert_array_equal(signals.normalised[:2], normalise_b0(good, protocol))
    assert_array_equal(signals.scale[:2], b0_scale(good, protocol))
    assert_array_equal(signals.precision[:2], noise_precision(good, protocol))
    assert_allclose(signals.s0, [750.0, 70.0, 0.0])
    assert not np.isfinite(signals.normalised[2]).any()
    second = signals[[1]]
    assert_array_equal(second.normalised, signals.normalised[[1]])
    assert_array_equal(second.scale, [[80.0, 60.0]])
    assert_array_equal(second.s0, [70.0])
    with pytest.raises(ValueError, match="n_voxels, 6"):
        VoxelSignals.from_raw(raw[:, :5], protocol)


def test_sequence_without_b0_takes_the_mean_of_all_b0(protocol):
    third = Protocol.pgse([1000, 2000], BVECS[1:], small_delta=0.005, big_delta=0.02)
    signal = np.array([600.0, 300, 150, 900, 300, 100, 500, 250])
    scale = b0_scale(signal, protocol + third)
    assert_allclose(scale, [900.0, 750.0, 600.0])  # ranks: 40, 20, 10 ms


def test_no_b0_at_all_is_taken_as_normalised():
    prot = Protocol.pgse([1000, 2000], BVECS[1:], small_delta=0.005, big_delta=0.02)
    signal = np.array([0.5, 0.25])
    assert_array_equal(normalise_b0(signal, prot), signal)


def test_data_loss_gaussian_and_rician_floor():
    pred = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64)
    data = torch.tensor([[1.0, 0.4, 0.1]], dtype=torch.float64)
    gauss = data_loss(pred, data, loss_scale=100.0)
    assert_allclose(gauss.numpy(), [100 * (0.01 + 0.01) / 3], rtol=1e-15)
    # The Rician floor sqrt(S^2 + sigma^2) lifts a zero prediction to sigma.
    rician = data_loss(pred, data, loss_scale=1.0, sigma=0.1, noise="rician")
    expected = (
        (np.sqrt(1.01) - 1) ** 2 + (np.sqrt(0.26) - 0.4) ** 2 + (0.1 - 0.1) ** 2
    ) / 3
    assert_allclose(rician.numpy(), [expected], rtol=1e-12)
    # Gaussian noise ignores sigma; weights give a weighted mean.
    same = data_loss(pred, data, loss_scale=100.0, sigma=0.1)
    assert_array_equal(same.numpy(), gauss.numpy())
    weights = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    weighted = data_loss(pred, data, loss_scale=1.0, weights=weights)
    assert_allclose(weighted.numpy(), [(0.01 + 3 * 0.01) / 4], rtol=1e-15)


def test_noise_precision_follows_each_sequence_b0(protocol):
    # b0 900 (long sequence) and 600 (short one), mean of all b0 750: the
    # long sequence's normalised noise is sigma * 750 / 900, its precision
    # (900 / 750)^2. Exact: a few divisions.
    signal = np.array([[600.0, 300, 150, 900, 300, 100]])
    precision = noise_precision(signal, protocol)
    assert_allclose(precision, [[0.64] * 3 + [1.44] * 3], rtol=1e-15)
    same_echo = Protocol.pgse([0, 1000, 2000], BVECS, small_delta=0.005, big_delta=0.02)
    flat = noise_precision(signal, same_echo + same_echo)
    assert_array_equal(flat, np.ones_like(signal))  # b0s differ by noise only


def test_precision_weighted_loss_is_the_likelihood_at_the_truth(protocol):
    # Two sequences whose b0 differ 1.5-fold under T2 decay, one noise level
    # in signal units: after normalisation their relative noise differs
    # 1.5-fold. With the precision, the loss of the truth averages
    # loss_scale * sigma^2 (sigma relative to the mean b0), as for one
    # sequence. 20,000 x 6 draws: the mean of (x^2) has relative standard
    # error sqrt(2 / 120,000) = 0.4 %, so 2 % is five standard errors.
    rng = np.random.default_rng(0)
    clean = np.array([600.0, 300, 150, 900, 300, 100])
    noise_sd = 15.0  # signal units; the mean b0 is 750, so sigma = 0.02
    noisy = clean + noise_sd * rng.standard_normal((20_000, 6))
    # The precision of the clean b0 scales (the loss's definition); the
    # measured ones differ by noise only.
    precision = torch.as_tensor(noise_precision(clean, protocol)).expand(20_000, 6)
    truth = torch.as_tensor(normalise_b0(clean, protocol)).expand(20_000, 6)
    measured = torch.as_tensor(
        noisy / b0_scale(clean, protocol)[sequence_index(protocol)]
    )
    loss = data_loss(truth, measured, loss_scale=1.0, precision=precision)
    assert_allclose(float(loss.mean()), 0.02**2, rtol=0.02)
    # Without it the noisier sequence dominates: 0.02^2 * (1.25^2 + 0.833^2) / 2.
    plain = data_loss(truth, measured, loss_scale=1.0)
    assert_allclose(float(plain.mean()), 0.02**2 * 1.1285, rtol=0.02)
    # The Rician floor uses each acquisition's own level sigma / sqrt(p).
    zero = torch.zeros(1, 6, dtype=torch.float64)
    floor = data_loss(
        zero,
        zero,
        loss_scale=1.0,
        sigma=0.02,
        noise="rician",
        precision=precision[:1],
    )
    assert_allclose(float(floor[0]), 0.02**2, rtol=1e-12)
