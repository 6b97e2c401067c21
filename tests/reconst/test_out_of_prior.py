"""OUT_OF_PRIOR agrees with the prior predictive check (issue 82, item 7).

A posterior fit flags a voxel whose signal lies beyond the predictive
region of the estimator's training signals with the voxel's noise
(``SpinversePosteriorModel.predictive_envelope``), not only one that no
single training signal explains. References: held-out draws of the prior
itself (at most 5 % flagged; the region holds 99.9 %), and water the prior
cannot make (free water at 3 um^2/ms, a stationary pool): flagged.

The default prior's estimator for the README demo's protocol ships with the
package: nothing is trained.
"""

import numpy as np
import pytest
import torch
from conftest import DEMO_S0, DEMO_SIGMA
from numpy.testing import assert_allclose

from dipy_spinverse.posterior.noise import add_noise
from dipy_spinverse.reconst import OK
from dipy_spinverse.reconst.posterior import OUT_OF_PRIOR

#: The data's b = 0 signal and noise in its units (SNR 50).
S0, SIGMA = DEMO_S0, DEMO_SIGMA


@pytest.fixture(scope="module")
def model(demo_posterior):
    return demo_posterior


def _noisy(signals, seed):
    generator = torch.Generator().manual_seed(seed)
    sigma = torch.full((len(signals),), SIGMA / S0, dtype=torch.float64)
    return S0 * add_noise(torch.as_tensor(signals), sigma, generator).numpy()


def test_held_out_draws_of_the_prior_are_read(model):
    """40 draws the estimator never saw (seed 2026), at SNR 50: at most 2
    flagged (5 %; 0.2 % expected from the two tests' levels)."""
    signals, _ = model.prior.prior.simulator(model.protocol).sample(40, seed=2026)
    fit = model.fit(_noisy(signals, seed=1))
    assert np.count_nonzero(fit.status == OUT_OF_PRIOR) <= 2
    assert np.count_nonzero(fit.status == OK) >= 38


def test_water_the_prior_cannot_make_is_out_of_prior(model, caplog):
    """Free water at 3 um^2/ms and a stationary pool: the default prior's
    water diffuses at 2 um^2/ms behind membranes, so neither is held; the
    fit flags both and warns once, naming the check to run."""
    b = model.protocol.bvals
    free = np.exp(-b * 3e-3)
    dot = np.ones_like(b)
    fit = model.fit(_noisy(np.stack([free, free, dot, dot]), seed=2))
    assert np.all(fit.status == OUT_OF_PRIOR)
    assert np.isnan(fit.restricted_fraction).all()
    assert "prior.check(" in caplog.text


def test_the_envelope_is_built_once_and_a_voxel_is_its_own(model):
    """The same voxel alone or among others gets the same distance (its
    noise rung, not the batch's, sets the limit)."""
    envelope = model.predictive_envelope
    assert model.predictive_envelope is envelope
    signals, _ = model.prior.prior.simulator(model.protocol).sample(3, seed=7)
    rows = _noisy(signals, seed=3) / S0
    sigma = np.array([0.02, 0.005, 0.08])
    alone = envelope.distance(rows[:1], sigma[:1])
    together = envelope.distance(rows, sigma)
    # Equal but for the order of a matrix product's sums (1e-12).
    assert_allclose(
        [alone[0][0], alone[1][0]], [together[0][0], together[1][0]], rtol=1e-12
    )


def test_the_posterior_fits_draw_through_one_batched_loop():
    """``flow_draws``, the one loop of the posterior fits' draws (issue 83:
    the posterior's fit and samples and the protocol-free fit repeated it):
    ``rows`` in batches of ``per_batch``, in order, each batch's inputs and
    noise as tensors, the voxels ``outside`` not drawn from (and a batch
    of none of them not drawn at all)."""
    from dipy_spinverse.reconst.posterior import flow_draws

    inputs = np.arange(14.0).reshape(7, 2)
    sigma = np.arange(7.0) / 10
    calls = []

    def sample(x, s):
        calls.append(len(x))
        return torch.stack([x.sum(1) + s] * 3)  # (n_samples, len(x))

    rows = np.array([6, 0, 2, 4, 5])
    batches = list(
        flow_draws(
            sample, inputs, sigma, rows, per_batch=2, outside=lambda p, x, s: p >= 5
        )
    )
    assert [part.tolist() for part, _, _ in batches] == [[6, 0], [2, 4], [5]]
    assert [drawn.tolist() for _, drawn, _ in batches] == [
        [False, True],
        [True, True],
        [False],
    ]
    assert calls == [1, 2]  # the batch of voxel 5 alone: not drawn
    assert batches[2][2] is None
    assert_allclose(batches[1][2], [[9.2, 17.4]] * 3)
    everyone = list(flow_draws(sample, inputs, sigma, rows, per_batch=5))
    assert len(everyone) == 1 and everyone[0][1].all()
    assert_allclose(everyone[0][2][0], inputs[rows].sum(1) + sigma[rows])
