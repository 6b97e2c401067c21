"""reconstruct(): configuration, schedule, determinism, shapes, bad input."""

import dataclasses

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse.inverse import (
    PRESETS,
    InversionConfig,
    Stage,
    reconstruct,
    resolve_config,
)
from dipy_spinverse.inverse.fields import OPEN_KAPPA

STAGES = (dict(iterations=6, sequences=(0,)), dict(iterations=6, sequences=(1,)))


def test_shapes_history_and_determinism(problem):
    grid, prot, signal = problem
    batch = np.stack([signal, signal])
    kwargs = dict(preset="paper", stages=STAGES)
    a = reconstruct(grid, batch, prot, **kwargs)
    b = reconstruct(grid, batch, prot, **kwargs)
    assert a.permeability.shape == (2, grid.n_faces)
    assert a.barrier.dtype == bool and a.barrier.shape == (2, grid.n_faces)
    assert a.predicted.shape == (2, len(prot))
    assert a.labels is None and a.time_s > 0
    for key in ("data", "continuity", "manifold", "total", "lr"):
        assert len(a.history[key]) == 12
    assert_array_equal(a.permeability, b.permeability)
    lo, hi = PRESETS["paper"].face.log_kappa_bounds
    assert np.all((a.permeability >= 10**lo) & (a.permeability <= 10**hi))


def test_raw_and_normalised_signals_agree(problem):
    """Each sequence is divided by its own b = 0 mean, so S0 does not matter."""
    grid, prot, signal = problem
    raw = 1234.5 * signal
    kwargs = dict(preset="paper", stages=STAGES, dtype=torch.float64)
    a = reconstruct(grid, signal, prot, **kwargs)
    b = reconstruct(grid, raw, prot, **kwargs)
    assert_allclose(a.permeability, b.permeability, rtol=1e-8)


@pytest.mark.parametrize("sigma", [0.0, 0.02])
def test_loss_is_the_data_term_the_fit_minimised(problem, sigma):
    """``Reconstruction.loss`` is the fit's own data term: with sigma unknown
    the unweighted misfit it minimised (not one weighted by the sequences'
    b = 0 scales, which the old recomputation in the DIPY layer used), with
    sigma the precision-weighted one; normalised voxels passed in as
    VoxelSignals give the same fit as the raw array."""
    from dipy_spinverse.sim.signals import VoxelSignals, data_loss, noise_precision

    grid, prot, signal = problem
    raw = np.stack([700.0 * signal * np.repeat([0.6, 0.9], 3)] * 2)
    kwargs = dict(preset="paper", stages=STAGES, dtype=torch.float64)
    if sigma:
        kwargs.update(sigma=sigma, noise="rician")
    rec = reconstruct(grid, raw, prot, **kwargs)
    precision = noise_precision(raw, prot) if sigma else np.ones_like(raw)
    expected = data_loss(
        torch.as_tensor(rec.predicted),
        torch.as_tensor(VoxelSignals.from_raw(raw, prot).normalised),
        loss_scale=rec.config.loss.loss_scale,
        sigma=sigma,
        noise=rec.config.loss.noise,
        precision=torch.as_tensor(precision),
    ).numpy()
    assert rec.loss.shape == (2,)
    assert_allclose(rec.loss, expected, rtol=1e-10)
    assert_allclose(rec.precision, precision)
    again = reconstruct(grid, VoxelSignals.from_raw(raw, prot), prot, **kwargs)
    assert_allclose(again.loss, rec.loss, rtol=1e-12)
    assert_allclose(again.permeability, rec.permeability, rtol=1e-12)
    single = reconstruct(grid, raw[0], prot, **kwargs)
    assert single.loss.shape == ()
    assert rec.noise_level == sigma


def test_the_noise_reaches_the_fit_in_one_form(problem):
    """``data_noise``, a Noise (level and precisions) or its level alone,
    is the fit's noise: the same fit as the ``sigma`` option's, and the
    configuration is not read for it."""
    from dipy_spinverse.inverse import Noise
    from dipy_spinverse.sim.signals import noise_precision

    grid, prot, signal = problem
    raw = np.stack([700.0 * signal * np.repeat([0.6, 0.9], 3)] * 2)
    kwargs = dict(preset="paper", stages=STAGES, dtype=torch.float64, noise="rician")
    option = reconstruct(grid, raw, prot, sigma=0.02, **kwargs)
    level = reconstruct(grid, raw, prot, data_noise=0.02, **kwargs)
    form = Noise(0.02, noise_precision(raw, prot))
    given = reconstruct(grid, raw, prot, data_noise=form, **kwargs)
    for rec in (level, given):
        assert rec.config.loss.sigma == 0.0 and rec.noise_level == 0.02
        assert_array_equal(rec.loss, option.loss)
        assert_array_equal(rec.permeability, option.permeability)
    # Precisions of other voxels (one row for two) are refused.
    with pytest.raises(ValueError, match="one value per voxel"):
        reconstruct(grid, raw, prot, data_noise=form.voxels([0]), **kwargs)
    with pytest.raises(ValueError, match="noise level"):
        Noise(-0.1)


def test_paper_learning_rate_schedule(problem):
    grid, prot, signal = problem
    stages = (dict(iterations=60, sequences=(0,)), dict(iterations=60, sequences=(1,)))
    result = reconstruct(
        grid, signal, prot, preset="paper", stages=stages, continuity=0.0, manifold=0.0
    )
    lr = result.history["lr"]
    # 50-iteration linear warm-up to 0.6, cosine decay towards 0.06, restarted.
    assert_allclose(lr[49], 0.6)
    assert_allclose(lr[0], 0.6 / 50)
    assert_allclose(lr[59], 0.06)
    assert_allclose(lr[60], 0.6 / 50)


def test_data_loss_decreases(problem):
    grid, prot, signal = problem
    stages = (dict(iterations=40, sequences="all"),)
    result = reconstruct(
        grid, signal, prot, preset="paper", stages=stages, continuity=0.0, manifold=0.0
    )
    data = result.history["data"]
    assert data[-1] < 0.2 * data[0]


def test_cell_parametrisation_returns_labels(problem):
    grid, prot, signal = problem
    result = reconstruct(grid, signal, prot, parametrisation="cell", stages=STAGES)
    assert result.labels.shape == (grid.n_cells,)
    assert set(np.unique(result.labels)) <= {0, 1}


def test_cell_parametrisation_numbers_each_piece(problem, monkeypatch):
    """Two separate pieces of the fit's inside are two cells, as the label
    search numbers them (the largest first)."""
    import dataclasses
    import sys

    from dipy_spinverse.inverse import facefit

    grid, prot, signal = problem
    x = grid.cell_centroids[:, 0]
    inside = ((x < 3) | (x > 5)).astype(int)  # two slabs apart
    fitted = facefit.fit_faces

    def two_pieces(*args, **kwargs):
        return dataclasses.replace(fitted(*args, **kwargs), labels=inside[None])

    module = sys.modules["dipy_spinverse.inverse.reconstruct"]  # not the function
    monkeypatch.setattr(module, "fit_faces", two_pieces)
    result = reconstruct(
        grid, signal, prot, parametrisation="cell", stages=STAGES, search_steps=0
    )
    assert set(np.unique(result.labels)) == {0, 1, 2}
    assert_array_equal(result.labels > 0, inside > 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(preset="best"), "preset"),
        (dict(learning_rate=0.1), "Unknown option"),
        (dict(parametrisation="vertex"), "parametrisation"),
        (dict(noise="poisson"), "noise"),
        (dict(stages=(dict(iterations=2, sequences=(5,)),)), "rank"),
        (dict(log_kappa_bounds=(-1, -5)), "log_kappa_bounds"),
        (dict(search_steps=-1), "search_steps"),
        (dict(search_directions=0), "search_directions"),
        (dict(search_kappas=(1e-2,)), "search_kappas"),
        (dict(search_starts=0), "search_starts"),
        (dict(search_restarts=0), "search_restarts"),
        (dict(search_min_gain=-1.0), "search_min_gain"),
        (dict(polish=5), "search_"),
        (dict(lr=-0.1), "lr"),
        (dict(lr="fast"), "lr"),
        (dict(warmup=2.5), "warmup"),
        (dict(stages=(dict(iterations=0),)), "iterations"),
        (dict(stages=(dict(iters=3),)), "iterations"),
        (dict(stages=()), "stages"),
        (dict(init_log_kappa=0.0), "init_log_kappa"),
        (dict(sigma=30.0), "sigma"),
        (dict(sigma="0.1"), "sigma"),
        (dict(threshold=1.0), "threshold"),
        (dict(stages=5), "stages must be a list"),
        (dict(stages=[], max_iter=4), "at least one stage"),
        (dict(lr=0.0), "lr must be > 0, got 0.0"),
        (dict(sigma=-0.01), "sigma"),
        (dict(search_min_gain=float("nan")), "search_min_gain"),
        # A Huber width of 0 failed every voxel at fit time.
        (dict(continuity_delta=0.0), "continuity_delta must be > 0"),
        (dict(adapt_stages="no"), "adapt_stages must be True or False"),
        (dict(manifold_ramp=None), "manifold_ramp must be True or False"),
        (
            dict(preset="default", search_kappas="1e-5"),
            "search_kappas must be a flat sequence",
        ),
        (
            dict(preset="default", search_kappas=[[1e-5, 2e-5]]),
            "search_kappas must be a flat sequence",
        ),
    ],
)
def test_bad_options(problem, kwargs, match):
    grid, prot, signal = problem
    with pytest.raises(ValueError, match=match):
        reconstruct(grid, signal, prot, **kwargs)


def test_bad_signal(problem):
    grid, prot, signal = problem
    with pytest.raises(ValueError, match="len\\(protocol\\)"):
        reconstruct(grid, signal[:-1], prot)
    bad = signal.copy()
    bad[2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        reconstruct(grid, bad, prot)
    # m^2/s instead of mm^2/s: refused, as SpinverseModel refuses it.
    with pytest.raises(ValueError, match="diffusivity"):
        reconstruct(grid, signal, prot, diffusivity=2e-9)


def test_result_does_not_depend_on_batch(problem):
    """Serial, chunked and parallel fits must agree voxel by voxel."""
    grid, prot, signal = problem
    other = 0.9 * signal + 0.1
    kwargs = dict(preset="paper", stages=STAGES, dtype=torch.float64)
    alone = reconstruct(grid, signal, prot, **kwargs)
    batch = reconstruct(grid, np.stack([other, signal]), prot, **kwargs)
    assert_allclose(batch.permeability[1], alone.permeability, rtol=1e-10)


def test_label_search_returns_closed_surfaces(problem):
    grid, prot, signal = problem
    calls = []
    result = reconstruct(
        grid,
        signal,
        prot,
        preset="default",
        stages=STAGES,
        callback=lambda *args: calls.append(args),
    )
    face = [c for c in calls if c[1] is not None]
    search = [c for c in calls if c[1] is None]
    assert len(face) == 12 and "data" in face[0][2]
    assert search and set(search[0][2]) == {"search", "voxel"}
    labels = result.labels
    assert labels.shape == (grid.n_cells,) and set(np.unique(labels)) <= {0, 1}
    assert_array_equal(result.barrier, grid.interface_faces(labels > 0))
    lo, _ = PRESETS["default"].face.log_kappa_bounds
    membrane = result.permeability[result.barrier]
    assert np.all(membrane == membrane[0]) and 10.0**lo <= membrane[0] < 1e-3
    # Faces without a membrane conduct as free water (OPEN_KAPPA).
    assert np.all(result.permeability[~result.barrier] == OPEN_KAPPA)


def test_config_parts_take_options_by_name():
    """The four parts hold every option once; options by name go to their
    part and come back flat (the keys that fit stores and caches hold)."""
    from dipy_spinverse.inverse.config import OPTIONS

    config = InversionConfig.from_options(
        lr=0.3, sigma=0.02, search_steps=5, approximation_error=4
    )
    assert config.face.lr == 0.3 and config.loss.sigma == 0.02
    assert config.search.steps == 5 and config.approximation.n_substrates == 4
    flat = config.as_dict()
    assert set(flat) == set(OPTIONS) and len(OPTIONS) == 28
    assert InversionConfig.from_options(**flat) == config
    assert PRESETS["default"].replace() == PRESETS["default"]
    # Each part checks its own values, under the option's name.
    for options, match in (
        (dict(search_batch=0), "search_batch must be an integer >= 1"),
        (dict(approximation_error=1), "approximation_error .* 0 .off. or at least 2"),
        (dict(noise="poisson"), "noise"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(search_steps=1, search_bots=2), r"Unknown option\(s\) \['search_bots'\]"),
        # Across parts: the search's membranes within the face fit's bounds.
        (dict(search_kappas=(1e-6,)), "search_kappas must list .* lower bound 1e-05"),
        (dict(threshold=1.5e-5), "between the lower bound 1e-05 and the threshold"),
    ):
        with pytest.raises(ValueError, match=match):
            InversionConfig.from_options(**options)
    with pytest.raises(ValueError, match="must be a SearchConfig"):
        InversionConfig(search=dict(steps=3))


def test_config_is_frozen_validated_and_scaled():
    config = resolve_config("default", max_iter=31, sigma=0.02)
    assert isinstance(config, InversionConfig)
    assert [s.iterations for s in config.face.stages] == [16, 15]
    assert config.face.warmup == 4 and config.loss.sigma == 0.02
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.loss.sigma = 0.5
    # Dicts become Stages; a configuration can itself be the preset.
    custom = resolve_config(config, stages=[dict(iterations=3, sequences="all")])
    assert custom.face.stages == (Stage(3, "all"),) and custom.loss.sigma == 0.02
    assert PRESETS["paper"].search.steps == 0 and PRESETS["default"].search.steps > 0


@pytest.mark.parametrize(
    "preset, options, match",
    [
        ("paper", dict(sigma=0.5), "sigma.*no effect.*noise='gaussian'"),
        ("paper", dict(search_directions=3), "search_directions.*no effect"),
        ("default", dict(search_steps=0, search_kappas=(1e-5,)), "search_kappas"),
        ("paper", dict(continuity=0.0, continuity_delta=2.0), "continuity_delta"),
        ("paper", dict(manifold=0.0, manifold_ramp=False), "manifold_ramp"),
        ("paper", dict(parametrisation="cell", init_log_kappa=-2.0), "init_log_kappa"),
        # In units of the noise: without sigma it is 0 whatever its value.
        ("default", dict(search_min_gain=4.0), "search_min_gain.*give sigma"),
    ],
)
def test_options_without_effect_are_errors(preset, options, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(preset, **options)


def test_sigma_with_a_rician_paper_fit_is_used():
    config = resolve_config("paper", noise="rician", sigma=0.05)
    assert config.loss.sigma == 0.05


def test_presets_adapt_to_one_diffusion_time():
    """One sequence: the preset's two stages merge into one over everything."""
    for preset in ("paper", "default"):
        config = resolve_config(preset)
        adapted = config.for_protocol(1)
        assert adapted.face.stages == (Stage(config.face.n_iterations, "all"),)
        assert config.for_protocol(2) == config  # enough sequences: unchanged
    # Stages you give are used as given: missing ranks are an error.
    mine = resolve_config("paper", stages=[dict(iterations=5, sequences=(1,))])
    assert not mine.face.adapt_stages
    with pytest.raises(ValueError, match="rank 1.*only 1 sequence.*sequences='all'"):
        mine.for_protocol(1)


def test_one_diffusion_time_reconstructs(problem):
    grid, prot, signal = problem
    one = prot[:3]  # the 40 ms sequence alone
    result = reconstruct(grid, signal[:3], one, preset="paper", max_iter=6)
    assert len(result.history["lr"]) == 6
    assert np.all(np.isfinite(result.permeability))
