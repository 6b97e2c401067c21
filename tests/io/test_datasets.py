"""Real tissue from the dmipy 1.0.5 files: the cat spinal cord and ISBI 2015.

The readers' tests need the files (``pip install --no-deps dmipy==1.0.5`` or
the wheel in the cache, see :mod:`dipy_spinverse.io.datasets`) and skip
without them; the rest runs everywhere.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import stats

from dipy_spinverse.data import read_cat_spinal_cord, read_isbi2015
from dipy_spinverse.io.datasets import dmipy_data_folder, effective_diameter
from dipy_spinverse.sim.sequences import Protocol


@pytest.fixture(scope="module")
def dmipy_data():
    try:
        return dmipy_data_folder()
    except FileNotFoundError:
        pytest.skip("the dmipy 1.0.5 files are not here (pip install --no-deps ...)")


def test_a_missing_dataset_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DIPY_SPINVERSE_DMIPY", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps dmipy==1.0.5"):
        read_cat_spinal_cord(path=tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_isbi2015(path=tmp_path)
    with pytest.raises(ValueError, match="acquisition must be one of"):
        read_cat_spinal_cord("axcaliber", path=tmp_path)


@pytest.mark.parametrize("mean, std", [(3.0, 1.1), (1.0, 0.2), (5.0, 3.0)])
def test_effective_diameter_is_the_gamma_moment_ratio(mean, std):
    """(<d^6>/<d^2>)^(1/4) of the gamma distribution of that mean and std,
    against scipy's moments (to rounding), above the mean; no spread gives
    the mean, no axon 0."""
    k, scale = (mean / std) ** 2, std**2 / mean
    law = stats.gamma(k, scale=scale)
    expected = (law.moment(6) / law.moment(2)) ** 0.25
    assert_allclose(effective_diameter(mean, std), expected, rtol=1e-10)
    assert effective_diameter(mean, std) > mean
    assert_array_equal(effective_diameter([2.0, 0.0], [0.0, 0.0]), [2.0, 0.0])


def test_cat_spinal_cord(dmipy_data):
    """The AxCaliber set: 1,791 volumes in nine timings, each with its own
    b = 0 volumes, gradients across the cord (z), the 968 voxels with axons,
    the histology in um (diameter median ~3 um); the multi-shell set the same
    slice."""
    cord = read_cat_spinal_cord(path=dmipy_data)
    assert cord.data.shape == (64, 64, 1, 1791)
    assert cord.mask.sum() == 968
    assert len(cord.protocol.groups()) == 9
    for _, rows in cord.protocol.groups():
        assert (cord.protocol.bvals[rows] == 0).sum() == 4
        assert np.ptp(cord.echo_times[rows]) < 2e-4
    assert_allclose(cord.protocol.bvecs[:, 2], 0.0, atol=1e-12)
    assert cord.gtab.bvals.max() > 1e5 and cord.gtab.b0s_mask.sum() == 36
    assert_array_equal(Protocol.from_gtab(cord.gtab).waveforms, cord.protocol.waveforms)
    echo = np.array([w.echo_time for w in cord.protocol.waveforms])
    assert np.all(cord.echo_times >= echo)
    diameter = cord.histology["axon_diameter"][cord.mask]
    assert 2.5 < np.median(diameter) < 3.5 and cord.units["axon_diameter"] == "um"
    effective = cord.histology["axon_diameter_effective"][cord.mask]
    assert np.all(effective >= diameter - 1e-12)
    fraction = cord.histology["intra_axonal_fraction"][cord.mask]
    known = np.isfinite(fraction)
    assert known.sum() >= 960
    assert np.all(fraction[known] >= cord.histology["axon_fraction"][cord.mask][known])
    assert np.all(fraction[known] < 1)
    multi = read_cat_spinal_cord("3d", path=dmipy_data)
    assert multi.data.shape == (64, 64, 1, 796)
    assert_array_equal(multi.mask, cord.mask)


def test_isbi2015(dmipy_data):
    """Twelve voxels of 3,612 measurements; the b = 0 rows (DELTA = delta =
    0 in the file) take their echo time's timing, so each of the twelve
    sequences has its own b = 0 volumes."""
    isbi = read_isbi2015(path=dmipy_data)
    assert isbi.data.shape == (12, 1, 1, 3612)
    assert_array_equal(isbi.histology["region"].ravel(), [0] * 6 + [1] * 6)
    groups = isbi.protocol.groups()
    assert len(groups) == 12
    for _, rows in groups:
        assert (isbi.protocol.bvals[rows] == 0).any()
        assert np.ptp(isbi.echo_times[rows]) == 0
    assert 45_000 < isbi.protocol.bvals.max() < 46_000


def test_a_thinned_axcaliber_set_keeps_timings_q_range_and_b0():
    """Every b = 0, and per timing and direction axis every 5th strength
    from the strongest down (one sign): the q range and the nine timings
    stay, about a fifth of the volumes go to the posterior."""
    from dipy_spinverse.io.datasets import thin_qspace

    try:
        cord = read_cat_spinal_cord()
    except FileNotFoundError:
        pytest.skip("the dmipy 1.0.5 files are not here")
    rows, gtab = thin_qspace(cord, 5)
    assert gtab.b0s_mask.sum() == cord.gtab.b0s_mask.sum() == 36
    strength = cord.protocol.gradient_strength
    for _, group in cord.protocol.groups():
        kept = np.intersect1d(rows, group)
        assert strength[kept].max() == strength[group].max()
        assert 18 <= (cord.protocol.bvals[kept] > 0).sum() <= 22
    assert 200 < len(rows) < 260
    assert_allclose(gtab.bvals, cord.gtab.bvals[rows])


def test_the_cord_noise_comes_from_the_repeated_b0():
    """Each voxel's noise from the repeated b = 0 volumes of each timing
    (SNR a few hundred on the cord)."""
    try:
        cord = read_cat_spinal_cord()
    except FileNotFoundError:
        pytest.skip("the dmipy 1.0.5 files are not here")
    sigma, levels = cord.repeated_b0_noise(cord.mask)
    assert sigma.shape == (968,) and levels.shape == (968, len(cord.protocol))
    snr = levels[:, cord.gtab.b0s_mask].mean(-1) / sigma
    assert 100 < np.median(snr) < 1000


def test_drift_between_runs_of_b0_is_not_noise():
    """The cord's 3-D set opens each shell with a run of four b = 0 volumes,
    and the runs' means differ by up to 5 %: with ``drift`` the noise is the
    spread within runs (below the whole set's), each run's mean is the
    level at its centre, a volume between two centres takes the linear
    interpolation of theirs, and one before the first or after the last the
    nearest run's."""
    try:
        cord = read_cat_spinal_cord("3d")
    except FileNotFoundError:
        pytest.skip("the dmipy 1.0.5 files are not here")
    sigma, _ = cord.repeated_b0_noise(cord.mask)
    within, levels = cord.repeated_b0_noise(cord.mask, drift=True)
    assert np.median(within / sigma) < 0.5
    data = cord.data[cord.mask]
    runs = [np.arange(i, i + 4) for i in (0, 199, 398, 597)]
    assert_allclose(levels[:, 0], data[:, runs[0]].mean(1))
    centres = [run.mean() for run in runs]
    middle = 300
    weight = (middle - centres[1]) / (centres[2] - centres[1])
    expected = (1 - weight) * data[:, runs[1]].mean(1) + weight * data[:, runs[2]].mean(
        1
    )
    assert_allclose(levels[:, middle], expected)
    assert_allclose(levels[:, -1], data[:, runs[3]].mean(1))


@pytest.mark.parametrize("held_out", ["middle", "strongest"])
def test_the_isbi_split_holds_out_one_strength_per_timing(held_out):
    """Per timing, its middle (or strongest) gradient strength is held out;
    every b = 0 stays in the fit, and each voxel's noise comes from its
    b = 0 spread within each echo time."""
    from dipy_spinverse.io.datasets import held_out_shells, subset_table

    try:
        isbi = read_isbi2015()
    except FileNotFoundError:
        pytest.skip("the dmipy 1.0.5 files are not here")
    test = held_out_shells(isbi, held_out)
    assert not (test & isbi.gtab.b0s_mask).any()
    strength = np.round(isbi.protocol.gradient_strength, 4)
    for _, rows in isbi.protocol.groups():
        held = np.unique(strength[rows][test[rows]])
        weighted = np.unique(strength[rows][strength[rows] > 0])
        assert len(held) == 1
        expected = weighted[-1] if held_out == "strongest" else weighted[1]
        assert held[0] == expected
    assert len(subset_table(isbi.gtab, test).bvals) == test.sum()
    sigma, levels = isbi.repeated_b0_noise()
    assert sigma.shape == (12,) and levels.shape == isbi.data.reshape(12, -1).shape
    snr = levels[:, isbi.gtab.b0s_mask].mean(-1) / sigma
    assert np.all((5 < snr) & (snr < 200))
    with pytest.raises(ValueError, match="held_out must be"):
        held_out_shells(isbi, "weakest")
