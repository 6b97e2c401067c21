"""The masked-fit base (dipy_spinverse.masked): what every fit class shares.

A toy fit of one scalar per voxel checks the volume machinery alone: shape,
mask, rows, status, maps, indexing as numpy and DIPY's fits do, and the
arrays a fit file keeps. The fit classes' own tests (tests/reconst,
tests/compartments, tests/io) check that each reads through it.
"""

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from dipy_spinverse.compartments import CompartmentFit
from dipy_spinverse.masked import (
    COMMON_CODES,
    MASKED,
    NONFINITE,
    OK,
    MaskedFit,
    mask_rows,
    status_counts,
)
from dipy_spinverse.reconst import PosteriorFit, SpinverseFit


class ToyFit(MaskedFit):
    """One value per voxel, as a subclass keeps only what is its own."""

    label = "volume"  # what a part does not inherit: a class default

    @property
    def value(self):
        return self._map(self.params["value"])


@pytest.fixture
def toy():
    mask = np.array([[True, False, True], [True, True, False]])
    status = np.array([OK, OK, NONFINITE, OK])
    params = dict(value=np.array([1.0, 2.0, 3.0, 4.0]), status=status, extra=None)
    fit = ToyFit(None, params, mask)
    fit.label = "mine"
    return fit


def test_the_volume_is_the_masks(toy):
    assert toy.shape == (2, 3)
    assert_array_equal(toy.status, [[OK, MASKED, OK], [NONFINITE, OK, MASKED]])
    # 0 outside the mask, NaN where not fitted.
    assert_array_equal(toy.value, [[1.0, 0.0, 2.0], [np.nan, 4.0, 0.0]])
    assert_array_equal(toy.ok, toy.status == OK)
    assert_array_equal(toy.fitted, toy.status == OK)
    assert toy.status_counts() == {"ok": 3, COMMON_CODES[NONFINITE]: 1}
    assert (
        repr(toy)
        == "ToyFit(shape=(2, 3), status={'ok': 3, "
        + repr(COMMON_CODES[NONFINITE])
        + ": 1})"
    )


def test_one_voxel_reads_as_the_volume_there(toy):
    voxel = toy[0, 2]
    assert isinstance(voxel, ToyFit) and voxel.shape == ()
    assert voxel.value == 2.0 and voxel.status == OK
    assert type(voxel.value) is float and type(voxel.status) is int
    assert voxel.label == "volume"  # a part is built from rows, not copied
    outside = toy[0, 1]
    assert outside.value == 0.0 and outside.status == MASKED
    assert outside.params["value"].shape == (0,)  # no row of the mask
    assert outside.status_counts() == {}
    assert repr(outside) == "ToyFit(status=-2 (outside the mask))"
    assert toy[-1, -2].value == toy.value[1, 1]
    assert toy[1, 0].params["extra"] is None


@pytest.mark.parametrize(
    "index",
    [np.s_[:, 1:], np.s_[1], np.s_[..., 0], np.s_[::-1], np.s_[[1, 0], [0, 2]]],
)
def test_parts_are_numpys(toy, index):
    part = toy[index]
    assert part.shape == toy.status[index].shape
    assert_array_equal(part.status, toy.status[index])
    assert_array_equal(part.value, toy.value[index])


def test_a_boolean_mask_picks_voxels(toy):
    part = toy[toy.mask]
    assert part.shape == (4,) and part.mask.all()
    assert_array_equal(part.value, toy.value[toy.mask])


@pytest.mark.parametrize(
    "index, match",
    [
        ((2, 0), r"out of bounds for axis 0 with size 2 .*shape \(2, 3\)"),
        ((0, 0, 0), r"too many indices .*shape \(2, 3\)"),
    ],
)
def test_bad_indices_name_the_fits_shape(toy, index, match):
    with pytest.raises(IndexError, match=match):
        toy[index]
    with pytest.raises(IndexError, match=r"single-voxel fit \(shape \(\)\)"):
        toy[0, 0][0]


def test_a_fit_file_keeps_the_mask_and_the_rows(toy):
    arrays = toy.saved_arrays()
    assert set(arrays) == {"mask", "value", "status"}  # None is not saved
    assert_array_equal(arrays["mask"], toy.mask)
    assert_array_equal(arrays["value"], toy.params["value"])


def test_voxel_data_reads_a_volume_or_the_masks_rows(toy):
    volume = np.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    assert_array_equal(toy.voxel_data(volume, (1, 1)), volume[1, 1])
    assert_array_equal(toy.voxel_data(volume[toy.mask], (1, 1)), volume[1, 1])
    with pytest.raises(IndexError, match="outside the fit's mask"):
        toy.voxel_data(volume[toy.mask], (0, 1))


def test_helpers():
    assert_array_equal(mask_rows([[True, False], [False, True]]), [0, -1, -1, 1])
    counts = status_counts([OK, MASKED, NONFINITE, OK])
    assert counts == {"ok": 2, COMMON_CODES[NONFINITE]: 1}


@pytest.mark.parametrize("cls", [SpinverseFit, PosteriorFit, CompartmentFit])
def test_every_fit_class_is_a_masked_fit(cls):
    assert issubclass(cls, MaskedFit)
    # Subclasses keep only what is theirs: the volume machinery is the base's.
    for name in ("shape", "status", "__getitem__", "_part", "status_counts"):
        assert name not in vars(cls), (cls.__name__, name)


def test_the_voxels_of_a_fit_are_read_here():
    """``masked_rows`` (issue 83: it lived in reconst.resume, beside the
    search's resuming, and both posterior models imported it from there):
    one voxel, a volume, or the rows of its mask, and the mask checked."""
    from dipy_spinverse import masked
    from dipy_spinverse.reconst import posterior_model, protocol_free_model, resume

    volume = np.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    mask = np.array([[True, False, True], [False, True, False]])
    rows, checked = masked.masked_rows(volume, mask)
    assert_array_equal(rows, volume[mask])
    assert_array_equal(checked, mask)
    rows, _ = masked.masked_rows(volume[mask], mask)  # the mask's rows given
    assert_array_equal(rows, volume[mask])
    assert masked.is_mask_rows(volume[mask], mask)
    assert masked.volume_shape(volume[mask], mask) == (2, 3)
    rows, checked = masked.masked_rows(volume[0, 0], False)  # one voxel, out
    assert rows.shape == (0, 4) and checked.shape == ()
    with pytest.raises(ValueError, match="mask has shape"):
        masked.masked_rows(volume, mask[0])
    # Both posterior models start their fit from it (voxels_to_fit).
    assert posterior_model.masked_rows is masked.masked_rows
    assert protocol_free_model.voxels_to_fit is posterior_model.voxels_to_fit
    assert not hasattr(resume, "masked_rows")
