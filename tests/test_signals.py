"""signals: the one b0 normalisation and the one data loss; Protocol.sequences."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import Protocol
from dipy_spinverse.signals import b0_scale, data_loss, normalise_b0, sequence_index

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
