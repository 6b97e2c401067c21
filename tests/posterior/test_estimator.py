"""The flow's sampling: quasi-random base points and the sampling direction."""

import numpy as np
import torch
from numpy.testing import assert_allclose, assert_array_equal
from scipy import stats

from dipy_spinverse import posterior
from dipy_spinverse.posterior.estimator import PosteriorEstimator, normal_points
from dipy_spinverse.posterior.training import TrainingOptions

TINY = TrainingOptions(n_simulations=16, hidden=16, embedding=8, transforms=2)


def test_normal_points_are_standard_normal_and_even():
    """Every voxel's points are standard normal (KS test on 4,096 of them)
    and their quantiles far closer to the truth than independent draws':
    over 400 voxels, the rms error of the median of 128 points is below a
    third of an independent sample's (0.11, 1.2533 / sqrt(128); measured
    0.008)."""
    torch.manual_seed(0)
    points = normal_points(4096, 3, 12).numpy()
    assert points.shape == (4096, 3, 12) and np.isfinite(points).all()
    for voxel in range(3):
        for k in (0, 5, 11):
            assert stats.kstest(points[:, voxel, k], "norm").pvalue > 0.01
    # Independent between voxels: different points.
    assert not np.allclose(points[:, 0], points[:, 1])
    medians = np.median(normal_points(128, 400, 12).numpy(), axis=0)
    rms = np.sqrt(np.mean(medians**2))
    assert rms < 1.2533 / np.sqrt(128) / 3
    torch.manual_seed(1)
    again = normal_points(16, 2, 4)
    torch.manual_seed(1)
    assert_array_equal(normal_points(16, 2, 4), again)


def test_fast_sampling_inverts_the_density_direction():
    """The inverse autoregressive flow (fast_sampling=True) maps its base
    points to draws that its density direction maps back (float64 round
    trip to 1e-9), and its log density is finite."""
    torch.manual_seed(0)
    net = PosteriorEstimator(5, TINY).double().eval()
    context = net._context(
        torch.rand(3, 5, dtype=torch.float64), torch.full((3,), 0.02)
    )
    flow = net.flow(context)
    z = normal_points(7, 3, net.y_mean.numel()).double()
    x = flow.transform.inv(z)
    assert_allclose(flow.transform(x).detach().numpy(), z.numpy(), atol=1e-9)
    assert torch.isfinite(flow.log_prob(x)).all()


def test_an_estimator_loads_in_the_direction_it_was_trained(tmp_path):
    """A file of the former density-direction flow (estimators trained before
    fast sampling) loads as one, a new file as the fast one; each gives the
    draws it gave before saving."""
    signal, sigma = torch.rand(4, 5), torch.full((4,), 0.02)
    for fast in (False, True):
        torch.manual_seed(0)
        net = PosteriorEstimator(5, TINY, fast_sampling=fast).eval()
        path = tmp_path / f"posterior-{fast}.pt"
        torch.save({"state": net.state_dict(), "key": "k"}, path)
        loaded = posterior._load(path, 5, TINY)
        assert isinstance(loaded.flow.transform, type(net.flow.transform))
        assert_array_equal(
            loaded.sample(signal, sigma, 8, generator_seed=3),
            net.sample(signal, sigma, 8, generator_seed=3),
        )
