"""Tests for sim.sequences.hcp_protocol: the WU-Minn HCP PGSE protocol."""

import numpy as np
import numpy.testing as npt
import pytest
from dipy.core.gradients import gradient_table

from dipy_spinverse import TetGrid, simulate
from dipy_spinverse.reconst.plausibility import protocol_problems
from dipy_spinverse.sim.sequences import Protocol, hcp_protocol
from dipy_spinverse.sim.waveforms import PGSE

D = 2e-3  # mm^2/s, simulate's default diffusivity
SHELLS = (1000.0, 2000.0, 3000.0)


@pytest.fixture(scope="module")
def protocol():
    return hcp_protocol()


def _min_angle_deg(dirs):
    """Smallest angle between two directions, g and -g counted as one."""
    cosines = np.abs(dirs @ dirs.T) - 2 * np.eye(len(dirs))
    return np.degrees(np.arccos(min(cosines.max(), 1.0)))


def test_counts_and_bvalues(protocol):
    assert isinstance(protocol, Protocol)
    assert len(protocol) == 18 + 3 * 90 == 288
    npt.assert_array_equal(np.unique(protocol.bvals), [0.0, *SHELLS])
    assert np.count_nonzero(protocol.bvals == 0) == 18
    for bval in SHELLS:
        assert np.count_nonzero(protocol.bvals == bval) == 90
    npt.assert_array_equal(protocol.bvecs[protocol.bvals == 0], 0.0)


def test_b0_interspersed_one_every_16(protocol):
    npt.assert_array_equal(np.flatnonzero(protocol.bvals == 0), np.arange(18) * 16)
    weighted = protocol.bvals[protocol.bvals > 0]
    npt.assert_array_equal(weighted, np.repeat(SHELLS, 90))  # shell by shell


def test_timing_in_seconds(protocol):
    groups = protocol.groups()
    assert len(groups) == 1
    waveform, idx = groups[0]
    assert waveform == PGSE(small_delta=0.0106, big_delta=0.0431)
    assert len(idx) == 288
    npt.assert_allclose(waveform.diffusion_time, 0.0431 - 0.0106 / 3, rtol=1e-12)
    npt.assert_allclose(protocol.echo_times, 0.0537, rtol=1e-12)
    # b = 3000 with rectangular lobes needs 97 mT/m, within the 100 mT/m of
    # the HCP's Connectome Skyra.
    npt.assert_allclose(protocol.gradient_strength.max(), 0.0971, rtol=1e-3)


def test_directions_unit_and_spread(protocol):
    shells = [protocol.bvecs[protocol.bvals == b] for b in SHELLS]
    for dirs in shells:
        npt.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, rtol=1e-12)
        eigenvalues = np.linalg.eigvalsh(dirs.T @ dirs / len(dirs))
        npt.assert_allclose(eigenvalues, 1 / 3, atol=5e-3)
        assert _min_angle_deg(dirs) > 10.0  # about 15 for an ideal set of 90
    # Each shell has its own set: no direction repeated across shells.
    assert _min_angle_deg(np.vstack(shells)) > 3.0
    assert protocol_problems(protocol)[0].startswith(
        "every diffusion-weighted volume has one timing"
    )
    assert len(protocol_problems(protocol)) == 1  # directions span 3-D


def test_deterministic(protocol):
    again = hcp_protocol()
    npt.assert_array_equal(again.bvals, protocol.bvals)
    npt.assert_array_equal(again.bvecs, protocol.bvecs)
    assert again.waveforms == protocol.waveforms


def test_options_and_bad_input():
    small = hcp_protocol(n_directions=6, n_b0=2)
    assert len(small) == 2 + 3 * 6
    npt.assert_array_equal(np.flatnonzero(small.bvals == 0), [0, 10])
    assert np.count_nonzero(hcp_protocol(n_b0=0).bvals == 0) == 0
    for kwargs, name in (
        (dict(n_directions=0), "n_directions"),
        (dict(n_directions=2.5), "n_directions"),
        (dict(n_b0=-1), "n_b0"),
    ):
        with pytest.raises(ValueError, match=name):
            hcp_protocol(**kwargs)
    with pytest.raises(TypeError):
        hcp_protocol(90)  # keyword-only


def test_gradient_table_round_trip(protocol):
    gtab = gradient_table(
        protocol.bvals, bvecs=protocol.bvecs, small_delta=0.0106, big_delta=0.0431
    )
    back = Protocol.from_gtab(gtab)
    npt.assert_array_equal(back.bvals, protocol.bvals)
    npt.assert_allclose(back.bvecs, protocol.bvecs, atol=1e-15)
    assert back.waveforms == protocol.waveforms


def test_simulate_free_diffusion(protocol):
    """All faces open in a periodic cell: S = exp(-b D) in every direction.

    As in test_validation.test_free_diffusion_isotropic_and_second_order,
    the error is the dispersion of the discrete Laplacian, O((q a)^2), here
    at a = 5 um: measured ADC/D - 1 = -0.41 %, -0.82 %, -1.25 % at b =
    1000, 2000, 3000 (2 % allowed: that test measured -1.8 % at this
    spacing), spread over directions 3e-4 (6e-3 allowed, as there).
    """
    grid = TetGrid.bcc(10.0, 2, boundary="periodic")
    signal = simulate(grid, np.full(grid.n_faces, np.inf), protocol).numpy()
    assert signal.shape == (288,)
    npt.assert_allclose(signal[protocol.bvals == 0], 1.0, atol=1e-9)
    for bval in SHELLS:
        adc = -np.log(signal[protocol.bvals == bval]) / bval
        assert np.abs(adc / D - 1).max() < 0.02
        assert np.ptp(adc) / D < 6e-3
