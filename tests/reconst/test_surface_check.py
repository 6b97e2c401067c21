"""The label search's surface check: posterior volume bound and UNCERTAIN_SURFACE."""

import os
from dataclasses import replace

import numpy as np
import pytest
from conftest import SMALL_PRIOR, SMALL_TRAINING
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import SpinverseModel, TetGrid
from dipy_spinverse.data import _protocol
from dipy_spinverse.geometry.metrics import aligned_overlap
from dipy_spinverse.inverse import resolve_config
from dipy_spinverse.posterior import TissuePrior, TrainingOptions
from dipy_spinverse.reconst import (
    OK,
    POOR_FIT,
    STATUS_CODES,
    UNCERTAIN_SURFACE,
    UNCERTAIN_SURFACE_LEVEL,
    SpinverseFit,
)
from dipy_spinverse.reconst.noise import relative_noise
from dipy_spinverse.reconst.posterior import surface_volume_bound, volume_iou_bound
from dipy_spinverse.sim.signals import VoxelSignals
from dipy_spinverse.workflows.outputs import save_surface

# Two diffusion times, 2 b = 0 and 6 directions on 2 shells each: 28 volumes.
PROTOCOL = _protocol(((0.010, 0.020), (0.010, 0.060)), (1000.0, 2500.0), 6, 2)
BOX = 80 / 3
GRID = TetGrid.bcc(BOX, 2)
# The search's own physics: cells in the closed box of the grid.
WALLED = replace(SMALL_PRIOR, boundary="reflecting", box_side=BOX)
# A poor, small posterior trained in seconds: the check's plumbing, not its
# calibration (benchmarks/surface_check.py measures that).
OPTIONS = TrainingOptions(**SMALL_TRAINING)
SIGMA = 0.02
SEARCH = dict(
    grid=GRID,
    max_iter=4,
    preset=resolve_config("default", search_steps=2, search_starts=1),
)


# -- the bound ------------------------------------------------------------------
def test_volume_bound_is_one_minus_the_volume_ratio():
    draws = np.array([[0.2, 0.4, 0.3], [0.2, 0.1, 0.3]])
    answer = np.array([0.2, 0.2, 0.0])
    assert_allclose(volume_iou_bound(draws, answer), [0.0, 0.5, 1.0], atol=1e-15)
    # No cells in the answer nor in the draws: the same (empty) volume.
    assert_allclose(volume_iou_bound(np.zeros((3, 1)), np.zeros(1)), [0.0])


def test_volume_bound_holds_for_the_aligned_iou():
    """IoU <= min(V) / max(V) for any two labellings, after the grid's
    symmetries too (aligned IoU: lattice translations of a periodic grid
    and the point inversion): 60 random pairs of cell sets on a periodic
    grid, from one grid cell to most of the box."""
    grid = TetGrid.bcc(10.0, 2, boundary="periodic")
    rng = np.random.default_rng(0)
    volumes = grid.cell_volumes
    for _ in range(60):
        a = rng.uniform(size=grid.n_cells) < rng.uniform(0.05, 0.9)
        b = rng.uniform(size=grid.n_cells) < rng.uniform(0.05, 0.9)
        if not (a.any() and b.any()):
            continue
        iou = aligned_overlap(grid, a, b)["iou"]
        bound = volume_iou_bound(
            np.array([[volumes[b].sum() / grid.volume]]),
            np.array([volumes[a].sum() / grid.volume]),
        )[0]
        assert iou <= 1 - bound + 1e-12


# -- the model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """Search fits of four noisy draws of the prior, with and without the
    check, and a voxel without attenuation (outside the prior's support)."""
    cache = tmp_path_factory.mktemp("cache")
    model = SpinverseModel(
        PROTOCOL,
        **SEARCH,
        prior=WALLED,
        posterior_options=OPTIONS,
        sigma=1000 * SIGMA,  # in the data's units: b = 0 of 1000
        cache_dir=cache,
    )
    signals, _ = model.prior.sample(4, seed=3)
    rng = np.random.default_rng(0)
    noise = SIGMA * (rng.standard_normal((4, 28)) + 1j * rng.standard_normal((4, 28)))
    flat = np.ones((1, len(PROTOCOL)))
    data = 1000 * np.concatenate([np.abs(signals + noise), flat])
    fit = model.fit(data[:, None, None])
    plain = SpinverseModel(PROTOCOL, **SEARCH, sigma=1000 * SIGMA).fit(
        data[:, None, None]
    )
    return model, data, fit, plain


def test_uncertainty_is_at_least_the_posteriors_volume_bound(checked):
    """The checked uncertainty is the larger of the search's own and the
    bound of the recalibrated posterior of the restricted fraction
    (recomputed here from the same signals and answers)."""
    model, data, fit, plain = checked
    labels = np.asarray(fit.labels)[:, 0, 0]
    assert_array_equal(labels, np.asarray(plain.labels)[:, 0, 0])
    fractions = (labels > 0) @ GRID.cell_volumes / GRID.volume
    signals = VoxelSignals.from_raw(data, PROTOCOL)
    bound, outside = surface_volume_bound(
        model.estimator,
        signals,
        fractions,
        relative=relative_noise(model.sigma, signals.s0),
        n_samples=model.n_posterior_samples,
    )
    assert outside[-1] and not outside[:-1].any()
    own = np.asarray(plain.uncertainty)[:, 0, 0]
    uncertainty = np.asarray(fit.uncertainty)[:, 0, 0]
    assert_allclose(uncertainty, np.maximum(own, bound), rtol=1e-12)
    assert uncertainty[-1] == 1.0
    assert np.all((bound >= 0) & (bound <= 1))


def test_uncertain_surfaces_get_their_status(checked):
    """OK voxels whose uncertainty reaches the level become
    UNCERTAIN_SURFACE (fitted: they keep their maps); POOR_FIT stays."""
    _, _, fit, plain = checked
    status = np.asarray(fit.status)[:, 0, 0]
    before = np.asarray(plain.status)[:, 0, 0]
    uncertainty = np.asarray(fit.uncertainty)[:, 0, 0]
    want = np.where(
        (before == OK) & (uncertainty >= UNCERTAIN_SURFACE_LEVEL),
        UNCERTAIN_SURFACE,
        before,
    )
    assert_array_equal(status, want)
    assert status[-1] in (UNCERTAIN_SURFACE, POOR_FIT)
    assert np.all(np.isfinite(np.asarray(fit.restricted_fraction)))
    assert np.all(fit.fitted)
    assert "surface not determined" in STATUS_CODES[UNCERTAIN_SURFACE]
    assert "surface check: TissuePrior(" in repr(fit.model)
    # Without the check the search's own uncertainty sets the status too.
    own = np.asarray(plain.uncertainty)[:, 0, 0]
    flagged = (before == UNCERTAIN_SURFACE) | (before == POOR_FIT)
    assert np.all(flagged[own >= UNCERTAIN_SURFACE_LEVEL])


def test_uncertain_barriers_are_written_apart(checked, tmp_path):
    """The trusted voxels' barriers (status ok) go to the main mesh files,
    the uncertain and poorly fitted ones' to ``*_uncertain`` beside them:
    together they hold every fitted voxel's barrier, once."""
    model, _, fit, _ = checked
    params = {k: None if v is None else v.copy() for k, v in fit.params.items()}
    params["status"][:] = OK
    params["status"][[1, 2]] = UNCERTAIN_SURFACE, POOR_FIT
    split = SpinverseFit(model, params, fit.mask)
    out = dict(
        out_mesh_gifti=str(tmp_path / "barriers.gii"),
        out_mesh_ply=str(tmp_path / "barriers.ply"),
    )
    written = save_surface(split, out, affine=np.eye(4))
    names = sorted(os.path.basename(p) for p in written)
    assert "barriers_uncertain.gii" in names and "barriers_uncertain.ply" in names
    trusted = _voxel_ids(str(tmp_path / "barriers.gii"))
    uncertain = _voxel_ids(str(tmp_path / "barriers_uncertain.gii"))
    assert uncertain == {1, 2}
    assert not trusted & uncertain
    assert trusted <= {0, 3, 4}


def _voxel_ids(path):
    """The voxels of a barrier GIFTI's vertices (its data array ``voxel``)."""
    import nibabel as nib

    image = nib.load(path)
    for array in image.darrays:
        if array.meta.get("Name") == "voxel":
            return set(np.unique(array.data).astype(int).tolist())
    raise AssertionError(f"{path} has no voxel data array")


# -- refusals -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(prior=WALLED), "needs the noise level"),
        (dict(prior=TissuePrior(), sigma=SIGMA), "must simulate the search's box"),
        (
            dict(prior=TissuePrior(boundary="reflecting", box_side=20.0), sigma=SIGMA),
            "box_side=26.6",
        ),
        (
            dict(prior=TissuePrior(boundary="either", box_side=BOX), sigma=SIGMA),
            "boundary='reflecting'",
        ),
        (dict(posterior_options=OPTIONS, sigma=SIGMA), "pass fit_method='posterior'"),
        (dict(prior="walled", sigma=SIGMA), "prior must be one of"),
    ],
)
def test_surface_check_refuses_a_prior_of_another_box(options, message):
    with pytest.raises(ValueError, match=message):
        SpinverseModel(PROTOCOL, **SEARCH, **options)


def test_surface_check_needs_the_search():
    with pytest.raises(ValueError, match="turn the search on"):
        SpinverseModel(PROTOCOL, grid=GRID, preset="paper", prior=WALLED)
    periodic = TetGrid.bcc(BOX, 2, boundary="periodic")
    with pytest.raises(ValueError, match="boundary='periodic'"):
        SpinverseModel(
            PROTOCOL, **{**SEARCH, "grid": periodic}, prior=WALLED, sigma=SIGMA
        )
