"""The label search's voxels read one frozen SearchSettings a fit, not the
model (issue 73: the model holds settings, the fit holds arrays)."""

import dataclasses

import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal

import dipy_spinverse.reconst.runner as runner
from dipy_spinverse.inverse import resolve_config
from dipy_spinverse.reconst import SpinverseModel
from dipy_spinverse.reconst.search_settings import SearchSettings


@pytest.fixture(scope="module")
def model(gtab, grid):
    search = resolve_config("default", search_steps=2)
    return SpinverseModel(gtab, grid=grid, sigma=2.0, max_iter=2, preset=search)


def _voxels(model, n=3, seed=0):
    rng = np.random.default_rng(seed)
    attenuation = np.exp(-model.protocol.bvals * 1e-3 * rng.uniform(0.5, 2.0, (n, 1)))
    return 100.0 * attenuation + rng.normal(0, 2.0, (n, len(model.protocol)))


def test_a_search_is_a_function_of_signals_noise_and_settings(model):
    """fit_voxels on the settings alone gives the model's own fit, array for
    array, and the settings say what the model said."""
    settings = model.search_settings()
    data = _voxels(model)
    noise = runner.fit_noise(settings, data)
    params, _ = runner.fit_voxels(settings, data, noise=noise)
    fit = model.fit(data)
    for name, value in params.items():
        if value is not None:
            assert_array_equal(value, fit.params[name], err_msg=name)
    assert isinstance(settings, SearchSettings)
    assert settings.noise_known == model.noise_known
    assert settings.has_labels == model.has_labels
    assert settings.protocol_problems == tuple(model.protocol_problems)
    assert settings.surface_check is None  # no prior= given


def test_the_settings_are_frozen_and_a_worker_gets_its_own_device(model):
    settings = model.search_settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.sigma = 1.0
    moved = settings.on_device("meta")
    assert moved.device == torch.device("meta")
    assert settings.device == model.device == torch.device("cpu")
    assert moved.grid is settings.grid and moved.config is settings.config


def test_a_fit_freezes_the_settings_it_started_with(model, monkeypatch):
    """Every chunk of one volume fit reads the settings made when it began."""
    seen = []
    real = runner.fit_voxels

    def spy(settings, data, **kwargs):
        seen.append(settings)
        return real(settings, data, **kwargs)

    monkeypatch.setattr(runner, "fit_voxels", spy)
    model.fit(_voxels(model, n=4), vox_per_chunk=2)
    assert len(seen) == 2 and seen[0] is seen[1]
