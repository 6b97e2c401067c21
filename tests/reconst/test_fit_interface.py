"""One interface for the fits of both methods (issue 59, item 4).

``fit[i, j, k]`` and slices, a masked voxel that says so, ``predict`` and
unknown attributes that say what to use, and argument checks that name the
argument: for the search's :class:`SpinverseFit` and the posterior's
:class:`PosteriorFit`.
"""

import copy
import pickle
import warnings

import numpy as np
import pytest
from conftest import T2_WEIGHT
from numpy.testing import assert_allclose, assert_array_equal

import dipy_spinverse.posterior as posterior
from dipy_spinverse import SpinverseModel
from dipy_spinverse.data import make_phantom_dataset
from dipy_spinverse.inverse import resolve_config
from dipy_spinverse.io.gradients import read_gradients
from dipy_spinverse.io.surfaces import save_interface
from dipy_spinverse.posterior.calibration import SCALARS
from dipy_spinverse.reconst import MASKED, NONFINITE, OK, SpinverseFit
from dipy_spinverse.reconst.posterior import PosteriorFit
from dipy_spinverse.workflows.spinverse import parse_posterior_options

OUTSIDE = (1, 0, 0)  # the posterior volume's voxel outside the mask
BROKEN = (2, 1, 0)  # and its voxel with a NaN


# -- the search's fit ----------------------------------------------------------------
@pytest.fixture(scope="module")
def search_fit(gtab, grid, signal):
    """A label search of 3 voxels of a (2, 2, 1) volume, in about a second."""
    data = 700.0 * T2_WEIGHT * np.broadcast_to(signal, (2, 2, 1, len(signal)))
    mask = np.ones((2, 2, 1), bool)
    mask[1, 1, 0] = False
    # The tiny protocol and the missing sigma draw warnings that are not
    # what these tests are about.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SpinverseModel(
            gtab,
            grid=grid,
            max_iter=2,
            preset=resolve_config("default", search_steps=2, search_starts=2),
        )
        return model.fit(data, mask=mask)


def test_a_voxel_outside_the_mask_reads_as_the_volume_there(search_fit):
    fit = search_fit
    assert fit.model.has_labels and fit.status[1, 1, 0] == MASKED
    voxel = fit[1, 1, 0]
    assert isinstance(voxel, SpinverseFit) and voxel.shape == ()
    # The user's complaint: a NoneType error. Now the volume's 0, and why.
    assert voxel.restricted_fraction == fit.restricted_fraction[1, 1, 0] == 0.0
    assert voxel.status == MASKED and not voxel.fitted
    assert "outside the mask" in repr(voxel)
    for name in (
        "S0",
        "loss",
        "residual",
        "uncertainty",
        "surface_to_volume",
        "membrane_permeability",
        "n_compartments",
        "n_cells",
    ):
        assert getattr(voxel, name) == getattr(fit, name)[1, 1, 0] == 0, name
    for name in ("permeability", "labels", "barrier", "inside_probability"):
        assert_array_equal(getattr(voxel, name), getattr(fit, name)[1, 1, 0], name)
    assert np.isnan(voxel.permeability).all() and not voxel.labels.any()
    assert voxel.cell_volumes.shape == (0,)  # no cells
    # No mesh, a prediction of 0: as the volume's, and as a voxel fitted with
    # mask=False.
    assert voxel.interface_mesh is None and fit.interface_mesh[1, 1, 0] is None
    assert_array_equal(voxel.predict(), fit.predict()[1, 1, 0])
    assert_array_equal(voxel.predict(), 0)
    with pytest.raises(ValueError, match=r"status -2: outside the mask"):
        save_interface(voxel, "never.vtp")
    # Negative indices name the same voxel.
    assert fit[-1, -1, -1].status == MASKED


def test_a_voxel_inside_the_mask_is_the_volumes(search_fit):
    fit = search_fit
    voxel = fit[0, 1, 0]
    assert voxel.status == fit.status[0, 1, 0] and voxel.fitted
    assert voxel.restricted_fraction == fit.restricted_fraction[0, 1, 0]
    assert_array_equal(voxel.labels, fit.labels[0, 1, 0])
    assert_allclose(voxel.predict(), fit.predict()[0, 1, 0])


def test_slices_of_a_search_fit_keep_the_mask(search_fit):
    fit = search_fit
    row = fit[1]
    assert row.shape == (2, 1)
    assert_array_equal(row.status, fit.status[1])
    assert_array_equal(row.restricted_fraction, fit.restricted_fraction[1])
    assert row[1, 0].status == MASKED


@pytest.mark.parametrize(
    "index, match",
    [
        ((2, 0, 0), r"out of bounds for axis 0 with size 2 .*shape \(2, 2, 1\)"),
        ((0, 0, 0, 0), r"too many indices .*shape \(2, 2, 1\)"),
        ((0.5, 0, 0), r"shape \(2, 2, 1\)"),
    ],
)
def test_bad_indices_of_a_search_fit_name_its_shape(search_fit, index, match):
    with pytest.raises(IndexError, match=match):
        search_fit[index]


def test_a_single_voxel_fit_cannot_be_indexed(search_fit):
    with pytest.raises(IndexError, match=r"single-voxel fit \(shape \(\)\)"):
        search_fit[0, 0, 0][0]


# -- the posterior's fit -------------------------------------------------------------
@pytest.fixture(scope="module")
def posterior_fit(tmp_path_factory):
    """The README demo's posterior fit (its estimator ships with the
    package: nothing is trained) of a (3, 2, 1) volume with a voxel outside
    the mask and one with a NaN, in about a second."""
    import nibabel as nib

    folder = tmp_path_factory.mktemp("demo")
    paths = make_phantom_dataset(folder / "demo", tissue_voxels=False)
    table = read_gradients(
        paths["bvals"], paths["bvecs"], n_volumes=99, timing_file=paths["timing"]
    )
    with open(paths["posterior"]) as f:
        options = parse_posterior_options(f.read(), 2e-3)
    model = SpinverseModel(
        table,
        fit_method="posterior",
        diffusivity=2e-3,
        sigma=10.0,  # the demo's noise in its units (S0 1000, SNR 100)
        cache_dir=folder / "cache",
        **options,
    )
    model.estimator  # noqa: B018 -- read here, so that the check below holds
    assert model.estimator_path.parent == posterior.SHIPPED, "would train"
    data = nib.load(paths["data"]).get_fdata()
    data[BROKEN + (3,)] = np.nan
    mask = np.ones(data.shape[:-1], bool)
    mask[OUTSIDE] = False
    return model.fit(data, mask=mask)


def test_a_posterior_voxel_is_the_volumes(posterior_fit):
    fit = posterior_fit
    assert fit.shape == (3, 2, 1)
    voxel = fit[0, 1, 0]
    assert isinstance(voxel, PosteriorFit) and voxel.shape == ()
    assert voxel.status == fit.status[0, 1, 0] == OK
    assert voxel.S0 == fit.S0[0, 1, 0]
    for name in SCALARS:
        assert getattr(voxel, name) == getattr(fit, name)[0, 1, 0], name
    assert_array_equal(voxel.orientation, fit.orientation[0, 1, 0])
    # The stored intervals are the volume's; other levels, and samples, are
    # new draws of the same posterior.
    for level in (0.5, 0.9):
        low, high = fit.credible_interval("cell_diameter", level)
        assert voxel.credible_interval("cell_diameter", level) == (
            low[0, 1, 0],
            high[0, 1, 0],
        )
    low, high = voxel.credible_interval("cell_diameter", 0.8)
    wide = voxel.credible_interval("cell_diameter", 0.9)
    assert wide[0] <= low <= voxel.cell_diameter <= high <= wide[1]
    samples = voxel.posterior_samples("cell_diameter", 5)
    assert samples.shape == (5,) and np.isfinite(samples).all()
    assert voxel.posterior_samples("orientation", 2).shape == (2, 3)
    assert "status=0 (ok)" in repr(voxel)
    # Params stay per voxel of the mask: one row.
    assert voxel.params["status"].shape == (1,)


def test_a_posterior_voxel_outside_the_mask_says_so(posterior_fit):
    fit = posterior_fit
    voxel = fit[OUTSIDE]
    assert voxel.status == fit.status[OUTSIDE] == MASKED
    assert "outside the mask" in repr(voxel)
    # Medians, intervals and samples are 0, as the volume's maps there.
    for name in SCALARS:
        assert getattr(voxel, name) == getattr(fit, name)[OUTSIDE] == 0, name
    assert voxel.S0 == 0
    assert_array_equal(voxel.orientation, np.zeros(3))
    for level in (0.9, 0.8):  # stored, and drawn again
        assert voxel.credible_interval("cell_diameter", level) == (0, 0)
        low, high = fit.credible_interval("cell_diameter", level)
        assert low[OUTSIDE] == high[OUTSIDE] == 0
    assert_array_equal(voxel.posterior_samples("cell_diameter", 3), np.zeros(3))
    assert_array_equal(
        fit.posterior_samples("cell_diameter", 3)[(slice(None),) + OUTSIDE], 0
    )
    assert voxel.posterior_samples("orientation", 2).shape == (2, 3)
    assert voxel.params["status"].shape == (0,)  # no voxel of the mask
    assert voxel.status_counts() == {}


def test_a_posterior_voxel_without_a_posterior_is_nan(posterior_fit):
    voxel = posterior_fit[BROKEN]
    assert voxel.status == NONFINITE
    assert np.isnan(voxel.cell_diameter)
    assert np.isnan(voxel.credible_interval("cell_diameter", 0.8)).all()
    assert np.isnan(voxel.posterior_samples("cell_diameter", 2)).all()


def test_slices_of_a_posterior_fit(posterior_fit):
    fit = posterior_fit
    column = fit[:, 0]
    assert isinstance(column, PosteriorFit) and column.shape == (3, 1)
    assert_array_equal(column.status, fit.status[:, 0])
    assert_array_equal(column.restricted_fraction, fit.restricted_fraction[:, 0])
    assert_array_equal(
        column.credible_interval("restricted_fraction")[1],
        fit.credible_interval("restricted_fraction")[1][:, 0],
    )
    assert column.posterior_samples("cell_diameter", 4).shape == (4, 3, 1)
    assert column[1, 0].status == MASKED
    assert_array_equal(fit[..., 0].anisotropy, fit.anisotropy[..., 0])
    inside = fit[fit.mask]
    assert inside.shape == (5,) and inside.mask.all()
    assert_array_equal(inside.exchange_time, fit.exchange_time[fit.mask])
    assert fit[-1, -1, -1].status == fit.status[2, 1, 0]


@pytest.mark.parametrize(
    "index, match",
    [
        ((3, 0, 0), r"out of bounds for axis 0 with size 3 .*shape \(3, 2, 1\)"),
        ((0, 0, 0, 0), r"too many indices .*shape \(3, 2, 1\)"),
    ],
)
def test_bad_indices_of_a_posterior_fit_name_its_shape(posterior_fit, index, match):
    with pytest.raises(IndexError, match=match):
        posterior_fit[index]
    with pytest.raises(IndexError, match=r"single-voxel fit \(shape \(\)\)"):
        posterior_fit[0, 0, 0][0]


def test_a_posterior_fit_predicts_as_the_search_fit_does_outside_its_fitted_voxels(
    posterior_fit,
):
    """Nothing is simulated here: 0 outside the mask, NaN where the data
    hold a NaN, the shapes of the search fit's predictions (the simulated
    voxels: tests/reconst/test_posterior_predict.py)."""
    n_volumes = len(posterior_fit.model.protocol)
    assert_array_equal(posterior_fit[OUTSIDE].predict(), np.zeros(n_volumes))
    assert np.isnan(posterior_fit[BROKEN].predict()).all()
    samples = posterior_fit[OUTSIDE].predictive_samples(n=3)
    assert samples.shape == (3, n_volumes) and not samples.any()
    with pytest.raises(ValueError, match="n must"):
        posterior_fit[OUTSIDE].predict(n=0)


def test_unknown_attributes_say_what_a_posterior_fit_has(posterior_fit):
    with pytest.raises(AttributeError) as err:
        posterior_fit.cell_diametre  # noqa: B018
    message = str(err.value)
    assert message.startswith("'PosteriorFit' object has no attribute 'cell_diametre'")
    for name in ("cell_diameter", "orientation", "credible_interval", "status"):
        assert name in message
    assert err.value.name == "cell_diametre"
    # A search fit's attribute: where it lives.
    with pytest.raises(AttributeError, match=r"'interface_mesh' belongs to the sea"):
        posterior_fit.interface_mesh  # noqa: B018
    assert not hasattr(posterior_fit, "interface_mesh")


def test_private_names_stay_plain_and_copies_work(posterior_fit):
    with pytest.raises(AttributeError) as err:
        posterior_fit._nothing  # noqa: B018
    assert str(err.value) == "'PosteriorFit' object has no attribute '_nothing'"
    assert not hasattr(posterior_fit, "__array__")
    # copy and pickle build the object before its state: __getattr__ must
    # answer them without self.params.
    for other in (
        copy.copy(posterior_fit),
        copy.deepcopy(posterior_fit),
        pickle.loads(pickle.dumps(posterior_fit)),
    ):
        assert_array_equal(other.status, posterior_fit.status)
        assert_array_equal(other.cell_diameter, posterior_fit.cell_diameter)
    empty = PosteriorFit.__new__(PosteriorFit)
    with pytest.raises(AttributeError, match="no attribute 'params'"):
        empty.params  # noqa: B018


@pytest.mark.parametrize("level", ["high", "0.9", [0.9], None, True, 1.5, 0.0])
def test_credible_interval_level_is_checked(posterior_fit, level):
    with pytest.raises(ValueError, match=r"^level must be .*e\.g\. level=0\.9"):
        posterior_fit.credible_interval("cell_diameter", level=level)


def test_credible_interval_names_are_checked(posterior_fit):
    with pytest.raises(ValueError, match="credible_interval takes one of"):
        posterior_fit.credible_interval("diameter")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), r"^n must be an integer >= 1 .*e\.g\. n=100, got 0"),
        (dict(n=2.5), r"^n must be an integer >= 1"),
        (dict(n="10"), r"^n must be an integer >= 1"),
        (dict(n=True), r"^n must be an integer >= 1"),
        (dict(seed=-1), r"^seed must be an integer >= 0 .*e\.g\. seed=0, got -1"),
        (dict(seed=0.5), r"^seed must be an integer >= 0"),
        (dict(seed=None), r"^seed must be an integer >= 0"),
    ],
)
def test_posterior_samples_arguments_are_checked(posterior_fit, kwargs, match):
    with pytest.raises(ValueError, match=match):
        posterior_fit.posterior_samples("cell_diameter", **kwargs)


def test_posterior_samples_take_numpy_integers(posterior_fit):
    draws = posterior_fit.posterior_samples(
        "cell_diameter", np.int64(2), seed=np.int8(3)
    )
    assert draws.shape == (2, 3, 2, 1)
    again = posterior_fit.posterior_samples("cell_diameter", 2, seed=3)
    assert_array_equal(draws, again)
