"""The amortised posterior: packed substrates, the prior, the flow, the DIPY fit."""

import logging
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import SMALL_PRIOR, SMALL_TRAINING
from numpy.testing import assert_allclose, assert_array_equal

import dipy_spinverse.posterior.simulator as simulator_module
from dipy_spinverse import SpinverseModel, TetGrid, simulate
from dipy_spinverse.data import _protocol
from dipy_spinverse.geometry.substrates import FIBRE_DIRECTIONS, packed_substrate
from dipy_spinverse.posterior import (
    TissuePrior,
    TrainingOptions,
    decode,
    encode,
    shape_descriptors,
)
from dipy_spinverse.posterior.calibration import LEVELS, SCALARS
from dipy_spinverse.reconst import IMPOSSIBLE_SIGNAL
from dipy_spinverse.reconst.posterior import OUT_OF_PRIOR, PosteriorFit

# Two diffusion times, 2 b = 0 and 6 directions on 2 shells each: 28 volumes.
PROTOCOL = _protocol(((0.010, 0.020), (0.010, 0.060)), (1000.0, 2500.0), 6, 2)
# The small prior (tests/conftest.py) and its poor, small posterior, trained
# in seconds. Calibration at scale is benchmarks/posterior_calibration.py's.
SMALL_OPTIONS = TrainingOptions(**SMALL_TRAINING)
SIGMA = 0.02


# -- packed substrates -------------------------------------------------------------
@pytest.mark.parametrize("fibres", [False, True])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.85])
def test_packed_substrate_reaches_the_fraction(fibres, fraction):
    """The radius is the volume quantile of the seed distances, so the
    fraction is met to one grid cell (1/2592 of the volume) unless a piece
    cut off a cell is given to the outside: 0.01 allows that."""
    grid = TetGrid.bcc(20.0, 6, boundary="periodic")
    sub = packed_substrate(
        grid, rng=3, n_cells=3, fraction=fraction, fibres=fibres, size_spread=1.5
    )
    assert sub.n_cells == 3
    assert set(sub.kinds) == {"fibre" if fibres else "packed"}
    assert abs(sub.volumes.sum() / grid.volume - fraction) < 0.01
    assert np.all((sub.permeability >= 1e-6) & (sub.permeability <= 1e-4))


def test_packed_fibres_run_through_the_box():
    """A fibre along x has the same cross-section in every slab along x."""
    grid = TetGrid.bcc(20.0, 6, boundary="periodic")
    sub = packed_substrate(
        grid, rng=0, n_cells=1, fraction=0.3, fibres=True, axis=(1, 0, 0)
    )
    x = grid.cell_centroids[:, 0]
    inside = sub.labels > 0
    per_slab = [
        inside[(x >= a) & (x < a + 20 / 6)].mean() for a in np.arange(0, 20, 20 / 6)
    ]
    assert_allclose(per_slab, 0.3, atol=0.02)


def test_packed_fibres_in_a_walled_box_run_from_wall_to_wall():
    """In a closed box a fibre needs no periodic image: along a body
    diagonal (not a lattice axis of the box's faces) it has the same
    cross-section in every slab across the box's middle, as the published
    phantoms' cylinders. The slabs are 2 spacings thick and cut obliquely:
    0.03 allows their staircase."""
    grid = TetGrid.bcc(20.0, 8)
    axis = np.array([1.0, 1.0, 1.0]) / np.sqrt(3)
    sub = packed_substrate(grid, rng=0, n_cells=1, fraction=0.2, fibres=True, axis=axis)
    assert sub.kinds == ("fibre",)
    centred = grid.cell_centroids - 10.0
    along = centred @ axis
    # The part of the fibre within 4 um of the box centre, in 2 um slabs.
    near = np.linalg.norm(centred - np.outer(along, axis), axis=1) < 6.0
    inside = sub.labels > 0
    per_slab = [
        inside[near & (along >= a) & (along < a + 2)].mean() for a in (-4, -2, 0, 2)
    ]
    assert_allclose(per_slab, np.mean(per_slab), atol=0.03)


def test_packed_substrate_refuses_bad_arguments():
    grid = TetGrid.bcc(20.0, 4, boundary="periodic")
    with pytest.raises(ValueError, match="fraction"):
        packed_substrate(grid, fraction=1.0)
    with pytest.raises(ValueError, match="elongation"):
        packed_substrate(grid, elongation=0.5)
    with pytest.raises(ValueError, match="empty"):
        packed_substrate(
            TetGrid.bcc(20.0, 2, boundary="periodic"), n_cells=40, fraction=0.05
        )
    assert len(FIBRE_DIRECTIONS) == 13


# -- the flow's coordinates ------------------------------------------------------
def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    axes = rng.standard_normal((5, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    tensor = 0.2 * np.eye(3) + 3 * np.einsum("ni,nj->nij", axes, axes)
    truth = dict(
        restricted_fraction=rng.uniform(0.05, 0.85, 5),
        n_cells=rng.integers(1, 5, 5),
        cell_volume=rng.uniform(10, 1000, 5),
        cell_diameter=rng.uniform(1, 25, 5),
        surface_to_volume=rng.uniform(0.1, 3, 5),
        permeability=10 ** rng.uniform(-6, -3, 5),
        exchange_time=10 ** rng.uniform(-3, 1, 5),
        shape_tensor=tensor,
    )
    back = decode(encode(truth))
    for name in ("restricted_fraction", "cell_volume", "permeability", "exchange_time"):
        assert_allclose(back[name], truth[name], rtol=1e-12)
    assert_array_equal(back["n_cells"], truth["n_cells"])
    # Dequantised counts round back to themselves.
    jittered = decode(encode(truth, rng=rng))
    assert_array_equal(jittered["n_cells"], truth["n_cells"])
    # A prolate tensor: its axis (up to sign) and the closed-form FA.
    assert_allclose(np.abs(np.sum(back["orientation"] * axes, -1)), 1, atol=1e-12)
    lam = np.array([3.2, 0.2, 0.2])
    fa = np.sqrt(1.5 * ((lam - lam.mean()) ** 2).sum() / (lam**2).sum())
    assert_allclose(back["anisotropy"], fa, rtol=1e-10)
    assert_allclose(shape_descriptors(np.eye(3))["anisotropy"], 0.0, atol=1e-12)


# -- the prior -------------------------------------------------------------------------
def test_prior_draws_are_reproducible_and_in_range():
    simulator = SMALL_PRIOR.simulator(PROTOCOL)
    signals, truth = simulator.sample(6, seed=7)
    again, truth_again = simulator.sample(3, seed=7)
    assert_array_equal(again, signals[:3])
    assert_array_equal(truth_again["cell_diameter"], truth["cell_diameter"][:3])
    assert signals.shape == (6, len(PROTOCOL))
    assert_allclose(signals[:, PROTOCOL.bvals == 0], 1.0, atol=1e-9)
    assert np.all((signals > 0) & (signals <= 1 + 1e-9))
    low, high = SMALL_PRIOR.cell_diameter
    assert np.all((truth["cell_diameter"] >= low) & (truth["cell_diameter"] <= high))
    low, high = SMALL_PRIOR.restricted_fraction
    f = truth["restricted_fraction"]
    assert np.all((f >= low) & (f <= high))
    assert set(truth["family"]) <= {"packed", "fibre"}
    assert "TissuePrior(" in repr(simulator)


def test_prior_refuses_bad_settings():
    with pytest.raises(ValueError, match="families"):
        TissuePrior(families=("cube",))
    with pytest.raises(ValueError, match="restricted_fraction"):
        TissuePrior(restricted_fraction=(0.1, 1.0))
    with pytest.raises(ValueError, match="cell_diameter"):
        TissuePrior(cell_diameter=(5.0, 1.0))
    with pytest.raises(ValueError, match="diffusivity"):
        TissuePrior(diffusivity=2e-9)
    with pytest.raises(ValueError, match="boundary must be one of"):
        TissuePrior(boundary="absorbing", box_side=20.0)
    with pytest.raises(ValueError, match="needs box_side"):
        TissuePrior(boundary="reflecting")
    with pytest.raises(ValueError, match="box_side is the side of a closed box"):
        TissuePrior(box_side=20.0)
    with pytest.raises(ValueError, match="box_side must be > 0"):
        TissuePrior(boundary="either", box_side=0.0)


WALLED_PRIOR = replace(SMALL_PRIOR, boundary="reflecting", box_side=80 / 3)


def test_walled_prior_simulates_a_closed_box():
    """Draws of a walled prior live in the closed box of ``box_side`` (their
    fraction is of the box's volume) and their signals are those of
    :func:`simulate` on that reflecting grid (same time steps: equal to
    rounding). The walled grid's physics is the simulator's, validated in
    tests/sim against closed forms."""
    simulator = WALLED_PRIOR.simulator(PROTOCOL, time_tolerance=None)
    draws = [WALLED_PRIOR.draw(np.random.default_rng(seed)) for seed in range(4)]
    signals = simulator.simulate_draws(draws)
    walled = TetGrid.bcc(80 / 3, 2)
    for draw, signal in zip(draws, signals, strict=True):
        assert draw.boundary == "reflecting" and draw.side == 80 / 3
        labels = draw.substrate.labels
        assert_allclose(
            draw.descriptors["restricted_fraction"],
            walled.cell_volumes[labels > 0].sum() / walled.volume,
            rtol=1e-12,
        )
        kappa = draw.substrate.face_permeability
        direct = simulate(walled, kappa, PROTOCOL, diffusivity=2e-3)
        assert_allclose(signal, direct.numpy(), rtol=1e-10, atol=1e-12)


def test_either_prior_draws_both_boxes():
    """``boundary="either"`` draws closed boxes and periodic patches half and
    half (40 draws: 20 expected, 12-28 holds with probability 0.98), says
    which in the truth, and leaves a periodic prior's random stream as it
    was (the same draws as a prior without the new fields)."""
    prior = replace(SMALL_PRIOR, boundary="either", box_side=80 / 3)
    _, truth = prior.simulator(PROTOCOL).sample(40, seed=2)
    walled = truth["boundary"] == "reflecting"
    assert 12 <= walled.sum() <= 28
    assert set(truth["boundary"]) == {"periodic", "reflecting"}
    assert_allclose(truth["box_size"][walled], 80 / 3)
    for seed in range(3):
        draw = SMALL_PRIOR.draw(np.random.default_rng(seed))
        assert draw.boundary == "periodic"
        assert draw.side in SMALL_PRIOR._boxes


# -- the DIPY fit ------------------------------------------------------------------
def _small_model(cache_dir, **options):
    """The small prior's posterior model, trained into ``cache_dir``."""
    return SpinverseModel(
        PROTOCOL,
        fit_method="posterior",
        prior=SMALL_PRIOR,
        posterior_options=SMALL_OPTIONS,
        sigma=SIGMA,
        n_posterior_samples=200,
        cache_dir=cache_dir,
        **options,
    )


@pytest.fixture(scope="module")
def posterior_model(tmp_path_factory):
    return _small_model(tmp_path_factory.mktemp("cache"))


def _noisy(signals, seed):
    rng = np.random.default_rng(seed)
    noise = SIGMA * (
        rng.standard_normal(signals.shape) + 1j * rng.standard_normal(signals.shape)
    )
    return np.abs(signals + noise)


def test_posterior_fit_of_a_volume(posterior_model, caplog):
    signals, truth = posterior_model.prior.sample(8, seed=11)
    data = _noisy(signals, 0)  # b = 0 of 1: sigma is SIGMA in these units
    # No attenuation at any b (nothing in the prior), a NaN, b0 = 0, and a
    # signal that grows with b (no tissue: attenuation above 1).
    flat = np.full(len(PROTOCOL), 1.0)
    broken = np.full(len(PROTOCOL), np.nan)
    dark = data[0] * (PROTOCOL.bvals > 0)
    rising = np.linspace(1, 2, len(PROTOCOL))
    volume = np.stack([*data, flat, broken, dark, rising]).reshape(12, 1, 1, -1)
    mask = np.ones((12, 1, 1), bool)
    # DIPY's logger (the package logs through it) does not propagate.
    dipy_logger = logging.getLogger("dipy")
    dipy_logger.addHandler(caplog.handler)
    try:
        fit = posterior_model.fit(volume, mask=mask)
    finally:
        dipy_logger.removeHandler(caplog.handler)
    assert isinstance(fit, PosteriorFit)
    assert fit.status[8, 0, 0] == OUT_OF_PRIOR
    assert fit.status[9, 0, 0] == 1 and fit.status[10, 0, 0] == 2
    assert fit.status[11, 0, 0] == IMPOSSIBLE_SIGNAL
    assert "OUT_OF_PRIOR" in caplog.text
    for name in ("restricted_fraction", "cell_diameter", "exchange_time", "anisotropy"):
        median = getattr(fit, name)
        assert median.shape == (12, 1, 1)
        assert np.all(np.isnan(median[8:]))
        low, high = fit.credible_interval(name, level=0.9)
        inner_low, inner_high = fit.credible_interval(name, level=0.5)
        ok = fit.status == 0
        assert np.all(low[ok] <= inner_low[ok]) and np.all(inner_low[ok] <= median[ok])
        assert np.all(median[ok] <= inner_high[ok]) and np.all(
            inner_high[ok] <= high[ok]
        )
        other = fit.credible_interval(name, level=0.8)  # drawn again
        assert np.all(other[0][ok] >= low[ok] * 0.8)
        # A level in float32 is the stored interval, not one drawn again
        # (probe case 6 of issue 73).
        single = fit.credible_interval(name, level=np.float32(0.9))
        assert_array_equal(single[0], low)
        assert_array_equal(single[1], high)
    samples = fit.posterior_samples("cell_diameter", 7)
    assert samples.shape == (7, 12, 1, 1)
    assert fit.posterior_samples("orientation", 3).shape == (3, 12, 1, 1, 3)
    assert_allclose(np.linalg.norm(fit.orientation[:8], axis=-1), 1.0, atol=1e-9)
    with pytest.raises(ValueError, match="orientation is a unit vector"):
        fit.credible_interval("orientation")
    with pytest.raises(ValueError, match="level"):
        fit.credible_interval("cell_diameter", level=1.5)
    # The mask's rows alone give the same fit; a voxel alone too.
    rows = posterior_model.fit(volume[mask], mask=mask)
    assert_array_equal(rows.status, fit.status)
    one = posterior_model.fit(volume[0, 0, 0])
    assert one.status == fit.status[0, 0, 0]
    # The same posterior, other Monte Carlo draws (the batch differs): the
    # medians of 200 draws agree to a fraction of the interval's width.
    low, high = fit.credible_interval("cell_diameter", level=0.9)
    width = high[0, 0, 0] - low[0, 0, 0]
    assert abs(one.cell_diameter - fit.cell_diameter[0, 0, 0]) < 0.3 * width


@pytest.mark.parametrize("name", ["cell_diameter", "restricted_fraction"])
def test_fit_bounds_use_the_estimators_level_tables(posterior_model, name):
    """The trained estimator carries measured, monotone tables, and the fit's
    stored and redrawn bounds are the flow's quantiles at their levels: a
    table that moves every level to 0.5 collapses every interval onto the
    flow's median."""
    estimator = posterior_model.estimator
    tables = estimator.level_tables.numpy()
    assert tables.shape == (len(SCALARS), len(LEVELS))
    assert np.all(np.diff(tables, axis=1) >= 0)
    assert not np.allclose(tables, LEVELS, atol=1e-3)  # measured, not identity
    signals, _ = posterior_model.prior.sample(3, seed=21)
    saved = estimator.level_tables.clone()
    try:
        estimator.level_tables[SCALARS.index(name)] = torch.full((len(LEVELS),), 0.5)
        fit = posterior_model.fit(signals)
        ok = fit.status == 0
        assert ok.any()
        for level in (0.9, 0.8):
            low, high = fit.credible_interval(name, level=level)
            assert_allclose(low[ok], high[ok])
        assert_allclose(fit.credible_interval(name)[0][ok], getattr(fit, name)[ok])
        samples = fit.posterior_samples(name, 20)[:, ok]
        assert_allclose(samples, samples[:1].repeat(20, 0))
    finally:
        estimator.level_tables.copy_(saved)


def test_negative_samples_are_fitted_as_given_with_a_warning(posterior_model):
    """Magnitudes cannot be negative; denoised data can: the posterior fits
    them as given and says so, pointing at the user's call (probe case 5 of
    issue 73: status 0 and no word)."""
    signals, _ = posterior_model.prior.sample(3, seed=22)
    data = signals.copy()
    data[1, -1] = -0.005
    with pytest.warns(UserWarning, match="1 of 3 voxels have negative") as caught:
        fit = posterior_model.fit(data)
    assert caught[0].filename == __file__
    assert fit.status.shape == (3,)


def test_posterior_is_cached(posterior_model, monkeypatch):
    import dipy_spinverse.posterior as posterior

    assert posterior_model.estimator is not None  # trained on first use
    path = posterior_model.estimator_path
    assert path.exists()
    # Its simulations, kept while it trained, are gone with the estimator saved.
    assert not posterior._partial_folder(path).exists()
    monkeypatch.setattr(posterior.training, "train_estimator", lambda *a, **k: 1 / 0)
    again = SpinverseModel(
        PROTOCOL,
        fit_method="posterior",
        prior=SMALL_PRIOR,
        posterior_options=SMALL_OPTIONS,
        sigma=SIGMA,
        cache_dir=path.parent,
    )
    assert again.estimator is not None and again.estimator_path == path
    # Another training option is another network.
    other = TrainingOptions(**{**SMALL_OPTIONS.description(), "epochs": 14})
    assert posterior.estimator_key(SMALL_PRIOR, PROTOCOL, other) not in path.name


def test_a_damaged_shipped_estimator_is_never_used(
    posterior_model, tmp_path, monkeypatch
):
    """A shipped file of the key that cannot be read is left alone (the
    package's folder is often read-only) and the user's cache serves: here
    it already holds the estimator, so nothing is trained either."""
    import dipy_spinverse.posterior as posterior
    from dipy_spinverse.posterior import shipping

    assert posterior_model.estimator is not None  # trained on first use
    path = posterior_model.estimator_path
    shipped = tmp_path / "shipped"
    # Shipped under its settings' name, for this code, but damaged.
    damaged = shipping.ship(path, about="damaged", folder=shipped)
    damaged.write_bytes(b"not an estimator")
    monkeypatch.setattr(posterior.cache, "SHIPPED", shipped)
    monkeypatch.setattr(posterior.training, "train_estimator", lambda *a, **k: 1 / 0)
    with pytest.warns(UserWarning, match="shipped posterior estimator .* cannot"):
        net, used = posterior.load_or_train(
            SMALL_PRIOR, PROTOCOL, SMALL_OPTIONS, cache_dir=path.parent
        )
    assert used == path and net is not None
    assert damaged.read_bytes() == b"not an estimator"


def test_posterior_model_options_are_checked():
    with pytest.raises(ValueError, match="needs the noise level"):
        SpinverseModel(PROTOCOL, fit_method="posterior")
    # With the search a prior is the surface check's: of the search's box.
    with pytest.raises(ValueError, match="must simulate the search's box"):
        SpinverseModel(PROTOCOL, prior=SMALL_PRIOR, sigma=SIGMA)
    with pytest.raises(ValueError, match="fit_method"):
        SpinverseModel(PROTOCOL, fit_method="bayes")
    for sigma in (-0.02, np.nan, "0.02", [[0.02]]):
        with pytest.raises(ValueError, match="sigma must be"):
            SpinverseModel(PROTOCOL, fit_method="posterior", sigma=sigma)
    # The label search's options with the posterior are refused, not ignored.
    for search in (dict(search_bootstrap=2), dict(max_iter=5), dict(refine_mesh=True)):
        name = next(iter(search))
        with pytest.raises(ValueError, match=rf"\['{name}'\] are not options of"):
            SpinverseModel(PROTOCOL, fit_method="posterior", sigma=SIGMA, **search)


def test_model_options_are_checked_without_a_gradient_table():
    """check_search_options is the search model's own check (a command calls
    it before reading data): what it refuses, the model refuses; each
    method's model refuses the other's options by name."""
    from dipy_spinverse.reconst.search_model import check_search_options

    # No placeholder noise: each fit hands the inversion its data's noise
    # (inverse.Noise, reconst.gate.admit); the settings hold the preset's.
    assert check_search_options(sigma=SIGMA).loss.sigma == 0.0
    for options, message in (
        (dict(posterior_options=SMALL_OPTIONS), "pass a prior with them"),
        (dict(preset="paper", refine_mesh=True), "starts each mesh from a labelled"),
        (dict(preset="paper", prior=SMALL_PRIOR), "turn the search on"),
    ):
        for check in (check_search_options, lambda **o: SpinverseModel(PROTOCOL, **o)):
            with pytest.raises(ValueError, match=message):
                check(**options)
    with pytest.raises(ValueError, match="needs the noise level"):
        SpinverseModel(PROTOCOL, fit_method="posterior")
    with pytest.raises(ValueError, match="needs the noise level"):
        SpinverseModel(PROTOCOL, prior=SMALL_PRIOR)
    with pytest.raises(ValueError, match=r"\['max_iter'\] are not options of"):
        SpinverseModel(PROTOCOL, fit_method="posterior", sigma=SIGMA, max_iter=3)


def _fine_cells_prior():
    """One packed cell of 2-4 um on 3 um patches: stiff enough that the time
    steps matter."""
    return TissuePrior(
        resolution=3,
        cell_diameter=(2.0, 4.0),
        n_cells=(1, 1),
        families=("packed",),
        min_spacings=1.0,
    )


def test_prior_simulator_measures_its_time_error():
    """With ``time_tolerance`` the Magnus sub-steps of each patch side are
    doubled until the signals move by less than it; the kept signals then lie
    within about that tolerance of a 4x finer simulation (the error falls ~8x
    per doubling: 1.2x the tolerance allows the pilot's few substrates to
    under-represent the rest). Fine 3 um cells make the time steps matter."""
    prior = _fine_cells_prior()
    tolerance = 1e-3
    fast = prior.simulator(PROTOCOL, time_tolerance=tolerance)
    signals, _ = fast.sample(4, seed=3)
    assert fast.measured_substeps
    assert all(err <= tolerance for _, err in fast.measured_substeps.values())
    assert max(count for count, _ in fast.measured_substeps.values()) > 1
    reference = prior.simulator(PROTOCOL, time_tolerance=tolerance)
    reference.measured_substeps = {
        side: (4 * count, None) for side, (count, _) in fast.measured_substeps.items()
    }
    exact, _ = reference.sample(4, seed=3)
    assert np.abs(signals - exact).max() <= 1.2 * tolerance
    assert np.abs(signals - exact).max() > 0  # the steps differ
    with pytest.raises(ValueError, match="time_tolerance"):
        prior.simulator(PROTOCOL, time_tolerance=-1)


@pytest.mark.slow
def test_a_float32_prior_simulator_measures_its_steps_in_float64(monkeypatch):
    """float32's rounding grows with the steps, so a float32 simulator
    measures its Magnus sub-steps in float64: it keeps the multiples a
    float64 simulator keeps, and simulates in both precisions (float64 to
    measure, float32 for the rest of its draws)."""
    prior = _fine_cells_prior()
    calls = []
    simulate = simulator_module.simulate

    def spy(*args, dtype, substeps, **options):
        calls.append((dtype, substeps))
        return simulate(*args, dtype=dtype, substeps=substeps, **options)

    monkeypatch.setattr(simulator_module, "simulate", spy)
    single = prior.simulator(PROTOCOL, time_tolerance=1e-3, dtype=torch.float32)
    single.sample(12, seed=3)
    dtypes = {dtype for dtype, _ in calls}
    double = prior.simulator(PROTOCOL, time_tolerance=1e-3)
    double.sample(12, seed=3)
    assert {k: n for k, (n, _) in single.measured_substeps.items()} == {
        k: n for k, (n, _) in double.measured_substeps.items()
    }
    assert dtypes == {torch.float64, torch.float32}


# -- the prior grid's discretisation error ----------------------------------------
def test_draw_pairs_hold_the_same_tissue_on_a_finer_grid():
    """A pair leaves the prior's own draw unchanged (same random stream; when
    the finer grid accepts it too) and
    rasterises the same cells (drawn in um) on the finer grid: the same
    family, patch and diffusivity, and descriptors close to the coarse
    grid's (restricted fraction within 0.1: one coarse tetrahedron of a
    96-tetrahedron patch is 0.01 of it, and a 1-spacing cell's boundary
    layer a few of them)."""
    for seed in range(4):
        draw = SMALL_PRIOR.draw(np.random.default_rng(seed))
        (same, fine) = SMALL_PRIOR.draw_pair(np.random.default_rng(seed), 4)
        assert same[0] == draw[0] and same[2] == draw[2]
        assert_array_equal(same[1].labels, draw[1].labels)
        assert fine[0] == draw[0] and fine[2] == draw[2]
        assert fine[1].kinds == draw[1].kinds
        assert len(fine[1].labels) == 12 * 4**3 and len(draw[1].labels) == 12 * 2**3
        assert (
            abs(fine[3]["restricted_fraction"] - draw[3]["restricted_fraction"]) < 0.1
        )
    with pytest.raises(ValueError, match="reference_resolution"):
        SMALL_PRIOR.simulator(PROTOCOL).sample(2, seed=0, reference_resolution=2)


def test_pairs_hold_tissue_that_the_finer_grid_places_in_the_prior():
    """The prior holds the tissue as the finer grid describes it: a draw
    whose cells only the coarse grid makes large enough (an ellipsoid's
    staircase at 2 cubes a side) is drawn again. Measured: 8 of these 60
    seeds needed another draw, whose finer-grid diameter or fraction had
    been outside the ranges before the check."""
    prior = replace(SMALL_PRIOR, families=("packed", "fibre", "ellipsoid"))
    redrawn = 0
    for seed in range(60):
        draw = prior.draw(np.random.default_rng(seed))
        same, fine = prior.draw_pair(np.random.default_rng(seed), 4)
        redrawn += same[3]["restricted_fraction"] != draw[3]["restricted_fraction"]
        for name, bounds in (
            ("cell_diameter", prior.cell_diameter),
            ("restricted_fraction", prior.restricted_fraction),
        ):
            assert bounds[0] * (1 - 1e-9) <= fine[3][name] <= bounds[1] * (1 + 1e-9)
    assert redrawn > 0


def test_sample_pairs_measure_the_grid_error():
    """The same draws as ``sample`` on the prior's grid; the finer grid's
    signals differ by the discretisation error (0 at b = 0, nonzero at
    b > 0), and ``sample(reference_resolution=)`` labels the coarse signals
    with the finer grid's descriptors."""
    simulator = SMALL_PRIOR.simulator(PROTOCOL)
    coarse, fine, truth = simulator.sample_pairs(3, reference_resolution=3, seed=5)
    plain, plain_truth = simulator.sample(3, seed=5)
    assert_allclose(coarse, plain, atol=2e-3)  # time steps measured again: 1e-3
    b0 = PROTOCOL.bvals == 0
    assert_allclose(fine[:, b0], 1.0, atol=1e-9)
    assert np.abs(fine - coarse)[:, ~b0].max() > 1e-3
    labelled, described = simulator.sample(3, seed=5, reference_resolution=3)
    assert_allclose(labelled, plain, atol=2e-3)
    for name in ("restricted_fraction", "cell_volume", "surface_to_volume"):
        assert_allclose(described[name], truth[name], rtol=1e-12)
        assert not np.allclose(described[name], plain_truth[name], rtol=1e-6)


def test_model_error_draws_have_the_errors_mean_and_covariance():
    """add_model_error draws mean + z @ centred / sqrt(m - 1): over 40,000
    draws the sample mean is within 4 standard errors of the errors' mean
    and the covariance within 5 % (relative, on its largest entries)."""
    import torch

    from dipy_spinverse.posterior.noise import add_model_error

    rng = np.random.default_rng(0)
    errors = rng.standard_normal((12, 5)) @ rng.standard_normal((5, 5)) * 0.01 + 0.02
    errors = torch.as_tensor(errors)
    n = 40_000
    draws = add_model_error(
        torch.zeros(n, 5, dtype=torch.float64), errors, torch.Generator().manual_seed(1)
    ).numpy()
    mean, cov = errors.numpy().mean(0), np.cov(errors.numpy().T)
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(draws.mean(0) - mean) < 4 * se)
    assert_allclose(np.cov(draws.T), cov, atol=0.05 * np.abs(cov).max())
    assert add_model_error(torch.ones(2, 5), None) is not None


def test_training_with_a_reference_grid_models_its_error(tmp_path, monkeypatch, caplog):
    """``TrainingOptions(reference_resolution=)``: the training descriptors
    are the reference grid's, and the network is trained with the measured
    errors (reference minus prior-grid signals of ``n_reference`` pairs)."""
    import dipy_spinverse.posterior as posterior

    options = TrainingOptions(
        **{
            **SMALL_OPTIONS.description(),
            "n_simulations": 24,
            "epochs": 1,
            "reference_resolution": 3,
            "n_reference": 4,
        }
    )
    seen = {}

    def capture(signals, coordinates, protocol, options, **kwargs):
        seen.update(signals=signals, coordinates=coordinates, **kwargs)
        return 1 / 0  # stop before saving

    monkeypatch.setattr(posterior.training, "train_estimator", capture)
    with caplog.at_level(logging.INFO, logger="dipy"):
        with pytest.raises(ZeroDivisionError):
            posterior.load_or_train(
                SMALL_PRIOR, PROTOCOL, options, cache_dir=tmp_path, progress=False
            )
    # The plan is logged before the patches are timed, the estimate after.
    messages = [r.getMessage() for r in caplog.records]
    plan = next(i for i, m in enumerate(messages) if m.startswith("Training the"))
    estimate = next(i for i, m in enumerate(messages) if "min of simulation" in m)
    assert plan < estimate and ".partial" in messages[plan]
    # The simulations were kept: the rerun simulates nothing and trains on
    # the same set.
    first = dict(seen)
    monkeypatch.setattr(
        simulator_module.PriorSimulator, "_simulate", lambda *a, **k: 1 / 0
    )
    monkeypatch.setattr(
        simulator_module.PriorSimulator, "seconds_per_draw", lambda *a, **k: 0.1
    )
    with pytest.raises(ZeroDivisionError):
        posterior.load_or_train(
            SMALL_PRIOR, PROTOCOL, options, cache_dir=tmp_path, progress=False
        )
    assert_array_equal(seen["signals"], first["signals"])
    assert_array_equal(seen["model_error"], first["model_error"])
    monkeypatch.undo()
    simulator = SMALL_PRIOR.simulator(PROTOCOL)
    coarse, fine, _ = simulator.sample_pairs(
        4, reference_resolution=3, seed=options.seed + 2 * 10**6
    )
    assert_allclose(seen["model_error"], fine - coarse, atol=4e-3)
    _, truth = simulator.sample(24, seed=options.seed, reference_resolution=3)
    expected = encode(truth, rng=np.random.default_rng(options.seed))
    assert_allclose(seen["coordinates"], expected, rtol=1e-10)
    with pytest.raises(ValueError, match="reference_resolution"):
        TrainingOptions(reference_resolution=1)


# -- the "axon" family: straight fibres simulated as sections -----------------------
AXON_PRIOR = replace(SMALL_PRIOR, families=("axon",), resolution=4)


def test_axon_draws_are_fibres_along_their_own_axis():
    """An axon draw's tissue lies on the section lattice of its patch, along
    a direction of its own (not a lattice one), and its signal is the
    section's at that axis (simulate on the SectionGrid built along it;
    same time steps: equal to rounding)."""
    from dipy_spinverse.sim.sections import SectionGrid

    simulator = AXON_PRIOR.simulator(PROTOCOL, time_tolerance=None)
    draws = [AXON_PRIOR.draw(np.random.default_rng(seed)) for seed in range(4)]
    signals = simulator.simulate_draws(draws)
    for draw, signal in zip(draws, signals, strict=True):
        assert draw.boundary == "periodic" and draw.axis is not None
        assert_allclose(np.linalg.norm(draw.axis), 1.0)
        assert not any(
            abs(abs(draw.axis @ d) / np.linalg.norm(d) - 1) < 1e-6
            for d in FIBRE_DIRECTIONS
        )
        assert_allclose(
            abs(draw.descriptors["orientation"] @ draw.axis), 1.0, atol=1e-9
        )
        grid = SectionGrid.triangular(draw.side, AXON_PRIOR.resolution, axis=draw.axis)
        kappa = draw.substrate.face_permeability
        direct = simulate(grid, kappa, PROTOCOL, diffusivity=draw.diffusivity)
        assert_allclose(signal, direct.numpy(), rtol=1e-9, atol=1e-11)
    _, truth = simulator.sample(3, seed=1)
    assert set(truth["family"]) == {"axon"}


def test_axon_family_needs_a_periodic_patch():
    with pytest.raises(ValueError, match="resolution must be >= 3"):
        TissuePrior(families=("axon",), resolution=2)
    with pytest.raises(ValueError, match="'axon' fibres are simulated as periodic"):
        TissuePrior(families=("axon",), boundary="reflecting", box_side=20.0)
    prior = replace(AXON_PRIOR, boundary="either", box_side=20.0)
    draws = [prior.draw(np.random.default_rng(seed)) for seed in range(6)]
    assert {d.boundary for d in draws} == {"periodic"}


def test_default_families_follow_the_box():
    """A periodic prior defaults to white matter's axons; a closed box (or
    "either", whose closed half holds no section) to the 3-D families, and
    the demo's prior names its own (its shipped estimator's key)."""
    from dipy_spinverse.data import DEMO_PRIOR
    from dipy_spinverse.posterior.prior import ALL_FAMILIES, FAMILIES, WHITE_MATTER

    assert TissuePrior().families == WHITE_MATTER == ("axon",)
    closed = TissuePrior(boundary="reflecting", box_side=20.0)
    assert closed.families == FAMILIES
    assert TissuePrior(boundary="either", box_side=20.0).families == FAMILIES
    assert DEMO_PRIOR.families == FAMILIES
    assert ALL_FAMILIES == FAMILIES + ("axon",)


def test_the_default_prior_is_trained_with_its_grid_error_modelled():
    """A prior of axons alone trains with WHITE_MATTER_TRAINING (its finer
    reference grid is affordable on sections), any other prior with
    TrainingOptions(); the model picks the same when none are given."""
    from dipy_spinverse.data import DEMO_PRIOR
    from dipy_spinverse.posterior import WHITE_MATTER_TRAINING, default_training

    assert default_training(TissuePrior()) is WHITE_MATTER_TRAINING
    assert WHITE_MATTER_TRAINING.reference_resolution == 12
    assert default_training(DEMO_PRIOR) == TrainingOptions()
    model = SpinverseModel(PROTOCOL, fit_method="posterior", sigma=SIGMA)
    assert model.posterior_options is WHITE_MATTER_TRAINING
    closed = TissuePrior(boundary="reflecting", box_side=20.0)
    model = SpinverseModel(PROTOCOL, fit_method="posterior", sigma=SIGMA, prior=closed)
    assert model.posterior_options == TrainingOptions()


def test_the_time_per_draw_weighs_every_patch(monkeypatch):
    """The training's announcement: each patch size timed on a few of its
    draws (after its sub-steps are measured) and weighted by how often the
    prior draws it. With a clock that charges each draw 1 / side seconds,
    the estimate is the mean of 1 / side over the counted draws, exactly."""
    simulator = SMALL_PRIOR.simulator(_protocol(((0.005, 0.01),), (1000.0,), 3, 1))
    clock = [0.0]
    measured = []

    def fake(draws, *, progress=False):
        clock[0] += sum(1.0 / d.side for d in draws)
        measured.append(len(draws))
        return np.zeros((len(draws), len(simulator.protocol)))

    monkeypatch.setattr(simulator, "simulate_draws", fake)
    monkeypatch.setattr(simulator_module.time, "perf_counter", lambda: clock[0])
    estimate = simulator.seconds_per_draw(seed=5, n_draws=40, per_box=2)
    draws, _ = simulator._draws(40, 5, None, False)
    assert_allclose(estimate, np.mean([1.0 / d.side for d in draws]), rtol=1e-12)
    sides = {d.side for d in draws}
    # Two calls a patch (the sub-steps, then the timing), on two draws or fewer.
    assert len(measured) == 2 * len(sides) and max(measured) <= 2
    # On a GPU a batch costs about the same whatever its size: each patch is
    # timed on all its draws, up to a batch (the fake clock charges per draw,
    # so the estimate is unchanged).
    measured.clear()
    simulator.batch_size = 3
    monkeypatch.setattr(simulator, "device", torch.device("cuda"))
    estimate = simulator.seconds_per_draw(seed=5, n_draws=40, per_box=2)
    assert_allclose(estimate, np.mean([1.0 / d.side for d in draws]), rtol=1e-12)
    counts = [min(3, sum(d.side == side for d in draws)) for side in sorted(sides)]
    assert sorted(measured[1::2]) == sorted(counts)


def _interrupting(monkeypatch, after):
    """Make the simulator's batches raise KeyboardInterrupt after ``after``
    of them (pilots included), as a Ctrl-C does."""
    real = simulator_module.PriorSimulator._simulate
    calls = []

    def failing(self, grid, draws_, rows, box=None, **kw):
        calls.append(len(rows))
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(self, grid, draws_, rows, box, **kw)

    monkeypatch.setattr(simulator_module.PriorSimulator, "_simulate", failing)
    return real


def test_an_interrupted_simulation_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """Signals are kept as they are made: a simulation stopped half-way
    (here by an error after two batches) leaves a checkpoint, and the rerun
    on the same draws simulates only the missing ones and returns the
    uninterrupted run's signals exactly (the measured time steps are kept
    with them). Other draws never read it."""
    draws = [AXON_PRIOR.draw(np.random.default_rng(seed)) for seed in range(10)]
    simulator = AXON_PRIOR.simulator(PROTOCOL, batch_size=2)
    expected = simulator.simulate_draws(draws)

    checkpoint = tmp_path / "partial" / "training.npz"
    interrupted = AXON_PRIOR.simulator(PROTOCOL, batch_size=2)
    real = _interrupting(monkeypatch, after=6)
    with pytest.raises(KeyboardInterrupt):
        interrupted.simulate_draws(draws, checkpoint=checkpoint)
    assert checkpoint.exists()
    saved = np.load(checkpoint)
    n_done = int(saved["done"].sum())
    assert 0 < n_done < len(draws)

    monkeypatch.setattr(simulator_module.PriorSimulator, "_simulate", real)
    resumed = AXON_PRIOR.simulator(PROTOCOL, batch_size=2)
    simulated = []

    def counting(self, grid, draws_, rows, box=None, **kw):
        # The draws themselves: a batch is handed its own list of them.
        simulated.extend(id(draws_[i]) for i in rows)
        return real(self, grid, draws_, rows, box, **kw)

    monkeypatch.setattr(simulator_module.PriorSimulator, "_simulate", counting)
    signals = resumed.simulate_draws(draws, checkpoint=checkpoint)
    assert_array_equal(signals, expected)
    assert len(set(simulated)) == len(draws) - n_done
    assert resumed.measured_substeps == simulator.measured_substeps

    # Other draws: the file is ignored, all of them simulated (their own
    # pilots measure the time steps: equal to the time tolerance).
    simulated.clear()
    others = draws[::-1]
    fresh = AXON_PRIOR.simulator(PROTOCOL, batch_size=2)
    again = fresh.simulate_draws(others, checkpoint=checkpoint)
    assert_allclose(again, expected[::-1], atol=fresh.time_tolerance)
    assert len(set(simulated)) == len(others)


def test_a_fixed_fibre_axis_orients_every_axon_draw():
    """``fibre_axis`` (normalised) is every axon draw's direction and its
    fibres' orientation; it enters the estimator's key only when set (the
    shipped keys stand); bad values are refused with the fix."""
    from dipy_spinverse.posterior import estimator_key

    prior = replace(AXON_PRIOR, fibre_axis=(0, 0, 2))
    assert prior.fibre_axis == (0.0, 0.0, 1.0)
    for seed in range(3):
        draw = prior.draw(np.random.default_rng(seed))
        assert_allclose(draw.axis, [0, 0, 1])
        assert_allclose(abs(draw.descriptors["orientation"][2]), 1.0, atol=1e-9)
    assert "fibre_axis" not in AXON_PRIOR.description()
    options = TrainingOptions()
    assert estimator_key(prior, PROTOCOL, options) != estimator_key(
        AXON_PRIOR, PROTOCOL, options
    )
    with pytest.raises(ValueError, match="fibre_axis must be a finite, non-zero"):
        replace(AXON_PRIOR, fibre_axis=(0, 0, 0))
    with pytest.raises(ValueError, match=r"fibre_axis must be a direction \(x, y, z\)"):
        replace(AXON_PRIOR, fibre_axis=(1, 0))
    with pytest.raises(ValueError, match="add 'axon' or remove fibre_axis"):
        replace(SMALL_PRIOR, fibre_axis=(0, 0, 1))


def test_a_noise_level_outside_the_training_range_is_warned(posterior_model):
    """The estimator is trained on SNR in ``snr_range``; voxels whose noise
    (sigma over their b = 0) lies outside it (real data at SNR 377, say)
    would make it extrapolate: the fit warns, counting them and naming the
    fix. Inside the range: silent."""
    low, high = SMALL_OPTIONS.snr_range
    assert posterior_model.estimator is not None  # trained (cached) on first use
    signals, _ = posterior_model.prior.sample(2, seed=5)
    common = dict(
        fit_method="posterior",
        prior=SMALL_PRIOR,
        posterior_options=SMALL_OPTIONS,
        cache_dir=posterior_model.estimator_path.parent,
    )
    # b = 0 of 1: sigma in these units is the relative noise.
    with pytest.warns(UserWarning, match=rf"2 voxels above and 0 below .*{high:g}"):
        SpinverseModel(PROTOCOL, sigma=0.5 / high, **common).fit(signals)
    with pytest.warns(UserWarning, match="0 voxels above and 1 below"):
        SpinverseModel(PROTOCOL, sigma=2.0 / low, **common).fit(
            signals * np.array([[1.0], [4.0]])  # SNR low / 2 and 2 low
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SpinverseModel(PROTOCOL, sigma=2.0 / (low + high), **common).fit(signals)


def test_a_gradient_table_of_the_same_acquisitions_finds_the_same_estimator():
    """DIPY's gradient table renormalises its directions (changes of ~1e-16):
    the HCP protocol built by the package and read back from its gradient
    table keys one estimator (else a user retrains for an hour); a change of
    1e-6 in a direction is another protocol."""
    from dipy.core.gradients import gradient_table

    from dipy_spinverse.posterior import default_training, estimator_key
    from dipy_spinverse.reconst.gate import gradient_tables
    from dipy_spinverse.sim.sequences import Protocol, hcp_protocol

    protocol = hcp_protocol()
    table = gradient_table(
        protocol.bvals, bvecs=protocol.bvecs, small_delta=0.0106, big_delta=0.0431
    )
    read = gradient_tables(table)[1]
    assert not np.array_equal(read.bvecs, protocol.bvecs)  # the renormalisation
    prior = TissuePrior()
    options = default_training(prior)
    assert estimator_key(prior, read, options) == estimator_key(
        prior, protocol, options
    )
    moved = read.bvecs.copy()
    moved[3] = moved[3] + [1e-6, 0, 0]
    other = Protocol(waveforms=read.waveforms, bvals=read.bvals, bvecs=moved)
    assert estimator_key(prior, other, options) != estimator_key(
        prior, protocol, options
    )


# -- devices -----------------------------------------------------------------------
def test_a_device_that_cannot_be_used_is_refused_by_name():
    bad = "cuda:64" if torch.cuda.is_available() else "cuda"
    for device, message in ((bad, "cannot be used"), ("tpu", "device must be")):
        with pytest.raises(ValueError, match=message):
            SMALL_PRIOR.simulator(PROTOCOL, device=device)
        with pytest.raises(ValueError, match=message):
            SpinverseModel(PROTOCOL, fit_method="posterior", sigma=SIGMA, device=device)


def test_the_estimator_returns_draws_on_the_inputs_device(posterior_model):
    """The network runs on its own device (``estimator.device``); inputs on
    another are moved there and the draws come back on theirs."""
    estimator = posterior_model.estimator
    assert estimator.device == torch.device("cpu")
    signals, _ = posterior_model.prior.sample(3, seed=5)
    x = torch.as_tensor(signals, dtype=torch.float32)
    s = torch.full((3,), SIGMA)
    draws = estimator.sample(x, s, 16, generator_seed=0)
    assert draws.shape == (16, 3, len(estimator.y_mean)) and draws.device == x.device
    assert estimator.support_statistic(x, s).device == x.device


@pytest.mark.gpu
def test_a_gpu_simulates_and_draws_as_the_cpu(posterior_model):
    """Same draws and seeds on ``cuda`` as on the CPU: the prior's signals to
    1e-10 in float64 (the same operators and time steps, rounding only: the
    sub-steps are measured on the CPU and shared), the posterior's quantiles
    to 1e-4 (float32 network, 200 base points shared through the CPU seed)."""
    cpu = SMALL_PRIOR.simulator(PROTOCOL)
    expected, truth = cpu.sample(6, seed=21)
    gpu = SMALL_PRIOR.simulator(PROTOCOL, device="cuda")
    gpu.measured_substeps = dict(cpu.measured_substeps)
    signals, gpu_truth = gpu.sample(6, seed=21)
    assert_allclose(signals, expected, atol=1e-10)
    assert_array_equal(gpu_truth["restricted_fraction"], truth["restricted_fraction"])
    data = _noisy(expected, 3)
    on_cpu = posterior_model.fit(data)
    on_gpu = _small_model(posterior_model.cache_dir, device="cuda")
    assert on_gpu.estimator.device.type == "cuda"
    fit = on_gpu.fit(data)
    assert_array_equal(fit.status, on_cpu.status)
    for name in ("restricted_fraction", "cell_diameter"):
        assert_allclose(getattr(fit, name), getattr(on_cpu, name), atol=1e-4)
        assert_allclose(
            fit.credible_interval(name), on_cpu.credible_interval(name), atol=1e-4
        )


def test_a_dask_cluster_simulates_the_batches_as_a_serial_run(tmp_path, monkeypatch):
    """engine='dask': the pilots run here, every batch on a worker; the
    signals are identical to a serial run's on the same draws, the
    checkpoint takes the batches as they come back, and a run interrupted
    here resumes on the cluster to the same signals."""
    distributed = pytest.importorskip("distributed")
    draws = [AXON_PRIOR.draw(np.random.default_rng(seed)) for seed in range(9)]
    expected = AXON_PRIOR.simulator(PROTOCOL, batch_size=2).simulate_draws(draws)
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    )
    try:
        with distributed.Client(cluster, set_as_default=False) as client:
            simulator = AXON_PRIOR.simulator(
                PROTOCOL, batch_size=2, engine="dask", address=client
            )
            checkpoint = tmp_path / "training.npz"
            assert_array_equal(
                simulator.simulate_draws(draws, checkpoint=checkpoint), expected
            )
            saved = np.load(checkpoint)
            assert saved["done"].all()
            assert_array_equal(saved["signals"], expected)

            # Interrupted in this process (its pilots), resumed on the cluster.
            partial = tmp_path / "partial.npz"
            real = _interrupting(monkeypatch, after=3)
            with pytest.raises(KeyboardInterrupt):
                AXON_PRIOR.simulator(PROTOCOL, batch_size=2).simulate_draws(
                    draws, checkpoint=partial
                )
            monkeypatch.setattr(simulator_module.PriorSimulator, "_simulate", real)
            assert 0 < np.load(partial)["done"].sum() < len(draws)
            resumed = AXON_PRIOR.simulator(
                PROTOCOL, batch_size=2, engine="dask", address=client
            )
            assert_array_equal(
                resumed.simulate_draws(draws, checkpoint=partial), expected
            )
    finally:
        cluster.close()


def test_simulation_engine_options_are_checked():
    with pytest.raises(ValueError, match="engine must be one of"):
        AXON_PRIOR.simulator(PROTOCOL, engine="spark")
    with pytest.raises(ValueError, match="address='auto' is the cluster of"):
        AXON_PRIOR.simulator(PROTOCOL, address="auto")
    with pytest.raises(ValueError, match="n_workers"):
        AXON_PRIOR.simulator(PROTOCOL, engine="ray", n_workers=0)


@pytest.mark.slow  # Ray's worker processes import torch: about a minute on 2 cores
def test_a_local_ray_cluster_simulates_the_batches_as_a_serial_run():
    """engine='ray' on a local instance of 2 workers (one thread each, as
    Ray sets them): signals identical to a serial run's on the same draws."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    draws = [AXON_PRIOR.draw(np.random.default_rng(seed)) for seed in range(9)]
    expected = AXON_PRIOR.simulator(PROTOCOL, batch_size=2).simulate_draws(draws)
    simulator = AXON_PRIOR.simulator(
        PROTOCOL, batch_size=2, engine="ray", address="local", n_workers=2
    )
    assert_array_equal(simulator.simulate_draws(draws), expected)
    assert not ray.is_initialized()  # the instance started here is stopped


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_a_damaged_checkpoint_is_set_aside_naming_the_file(tmp_path, damage, caplog):
    """A checkpoint cut short (a full disk, a killed write) or overwritten
    is named in one warning and the draws are simulated from the start, as
    a rerun without it would (probe case 7 of issue 73: a truncated file
    raised BadZipFile with a traceback on every run)."""
    draws = [AXON_PRIOR.draw(np.random.default_rng(seed)) for seed in range(3)]
    path = tmp_path / "training.npz"
    expected = AXON_PRIOR.simulator(PROTOCOL).simulate_draws(draws, checkpoint=path)
    whole = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(whole[: len(whole) // 2])
    else:
        path.write_bytes(np.random.default_rng(0).bytes(len(whole)))
    caplog.set_level(logging.WARNING, logger="dipy")
    dipy_logger = logging.getLogger("dipy")
    dipy_logger.addHandler(caplog.handler)
    try:
        again = AXON_PRIOR.simulator(PROTOCOL).simulate_draws(draws, checkpoint=path)
    finally:
        dipy_logger.removeHandler(caplog.handler)
    assert f"Checkpoint {path} cannot be read" in caplog.text
    assert_allclose(again, expected, atol=1e-12)


def test_a_posterior_fit_saves_and_loads_as_a_search_fit_does(
    posterior_model, tmp_path, monkeypatch
):
    """save_fit / load_fit take a posterior volume fit: its maps, status and
    intervals come back, and its model's settings, whose key finds the same
    estimator (the cache given here by DIPY_SPINVERSE_CACHE); the command's
    state is that file (probe case 9 of issue 73: load_fit could not read
    it, and save_fit refused the fit with a wrong fix)."""
    from dipy_spinverse.io import load_fit, save_fit

    signals, _ = posterior_model.prior.sample(4, seed=23)
    volume = signals.reshape(2, 2, 1, -1)
    fit = posterior_model.fit(volume)
    path = save_fit(fit, tmp_path / "posterior_fit")
    assert path.endswith(".npz")
    monkeypatch.setenv("DIPY_SPINVERSE_CACHE", str(posterior_model.cache_dir))
    loaded = load_fit(path)
    assert isinstance(loaded, PosteriorFit) and loaded.shape == (2, 2, 1)
    assert_array_equal(loaded.status, fit.status)
    assert_array_equal(loaded.cell_diameter, fit.cell_diameter)
    assert loaded.model.prior.prior == posterior_model.prior.prior
    assert loaded.model.posterior_options == posterior_model.posterior_options
    for level in (0.9, 0.8):  # stored, and drawn again through the estimator
        for a, b in zip(
            loaded.credible_interval("restricted_fraction", level),
            fit.credible_interval("restricted_fraction", level),
            strict=True,
        ):
            assert_allclose(a, b)
    posterior_model.estimator  # noqa: B018 - trained (or read) above
    assert loaded.model.estimator_path == posterior_model.estimator_path
    with pytest.raises(ValueError, match="a PosteriorFit of one voxel"):
        save_fit(posterior_model.fit(volume[0, 0, 0]), tmp_path / "one")
