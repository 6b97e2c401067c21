"""Camino scheme files (io.camino): the reader's rows, echo times and
messages, and the writer's round trip."""

import numpy as np
import numpy.testing as npt
import pytest
from dipy.core.gradients import WATER_GYROMAGNETIC_RATIO

from dipy_spinverse.io.camino import read_scheme, write_scheme
from dipy_spinverse.sim.sequences import Protocol, fibonacci_sphere
from dipy_spinverse.sim.waveforms import PGSE, CosineOGSE

GAMMA = WATER_GYROMAGNETIC_RATIO  # rad/(s T)


def test_scheme_round_trip(tmp_path):
    bvals = np.array([0.0, 1000.0, 3000.0, 0.0, 2000.0])
    protocol = Protocol.pgse(
        bvals,
        np.vstack([[0, 0, 0], fibonacci_sphere(4)]),
        small_delta=[0.01, 0.01, 0.01, 0.005, 0.005],
        big_delta=[0.02, 0.02, 0.02, 0.006, 0.006],
    )
    path = tmp_path / "protocol.scheme"
    write_scheme(protocol, path)
    assert "VERSION: STEJSKALTANNER" in path.read_text()
    back, echo_times = read_scheme(path)
    npt.assert_array_equal(echo_times, protocol.echo_times)
    assert back.waveforms == protocol.waveforms
    npt.assert_allclose(back.bvals, protocol.bvals, rtol=1e-12)
    npt.assert_allclose(back.bvecs, protocol.bvecs, atol=1e-15)
    npt.assert_allclose(back.gradient_rate, protocol.gradient_rate, rtol=1e-12)


def test_read_scheme_formula(tmp_path):
    path = tmp_path / "one.scheme"
    path.write_text(
        "# a comment\nVERSION: STEJSKALTANNER\n\n0 0 1 0.05 0.03 0.01 0.05\n"
        "# zero gradient below\n1 0 0 0 0.03 0.01 0.05\n"
    )
    protocol = read_scheme(path)[0]
    expected = GAMMA**2 * 0.05**2 * 0.01**2 * (0.03 - 0.01 / 3) * 1e-6
    npt.assert_allclose(protocol.bvals, [expected, 0.0], rtol=1e-12)
    npt.assert_array_equal(protocol.bvecs[1], 0)


@pytest.mark.parametrize(
    "text, match",
    [
        ("0 0 1 1000\n", "line 1.*VERSION"),
        ("% x y z\n0 0 1 0.05 0.03 0.01\n", "line 2.*VERSION"),
        ("# only a comment\n", "VERSION"),
        ("VERSION: BVECTOR\n0 0 1 1000\n", "line 1.*unsupported.*BVECTOR"),
        ("VERSION: STEJSKALTANNER\n0 0 1 0.05 0.03 0.01\n", "line 2.*7 columns"),
        ("VERSION: STEJSKALTANNER\n0 0 1 0.05 0.03 0.01 x\n", "line 2.*non-numeric"),
        ("VERSION: STEJSKALTANNER\n0 0 2 0.05 0.03 0.01 0.05\n", "line 2.*unit"),
        ("VERSION: STEJSKALTANNER\n0 0 1 0.05 30 10 50\n", "line 2.*milliseconds"),
        ("VERSION: STEJSKALTANNER\n0 0 1 0.05 0.03 0.01 0.02\n", "line 2.*TE"),
    ],
)
def test_read_scheme_malformed(tmp_path, text, match):
    path = tmp_path / "bad.scheme"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_scheme(path)


def test_read_scheme_reads_the_isbi_layout(tmp_path):
    """The ISBI 2015 challenge's scheme: a ``%`` header line, no VERSION line,
    and b = 0 rows at DELTA = delta = 0 carrying only their echo time. Each
    b = 0 row takes the timing of the weighted rows of its TE, so that every
    sequence keeps its own b = 0 (its T2 weighting)."""
    path = tmp_path / "isbi.txt"
    path.write_text(
        "%--dir-x---dir-y----dir-z-----|G|-----DELTA---delta-----TE---\n"
        "0 0 0 0 0 0 0.049\n"
        "0 0 0 0 0 0 0.058\n"
        "1 0 0 0.061 0.022 0.003 0.049\n"
        "0 1 0 0.061 0.022 0.008 0.058\n"
        "0 0 1 0.030 0.022 0.008 0.058\n"
    )
    protocol, echo_times = read_scheme(path)
    npt.assert_array_equal(echo_times, [0.049, 0.058, 0.049, 0.058, 0.058])
    assert protocol.waveforms[0] == PGSE(0.003, 0.022)
    assert protocol.waveforms[1] == PGSE(0.008, 0.022)
    npt.assert_array_equal(protocol.bvals[:2], 0.0)
    assert len(protocol.groups()) == 2
    # A b = 0 row whose TE no weighted row has, with two timings: refused,
    # naming the line and the fix.
    path.write_text(
        "VERSION: STEJSKALTANNER\n0 0 0 0 0 0 0.070\n"
        "1 0 0 0.061 0.022 0.003 0.049\n0 1 0 0.061 0.022 0.008 0.058\n"
    )
    with pytest.raises(ValueError, match="line.* 2:.*give each b = 0 row"):
        read_scheme(path)


def test_write_scheme_rejects_non_pgse(tmp_path):
    protocol = Protocol.from_arrays([1000.0], [[1, 0, 0]], CosineOGSE(0.02, 0.03, 1))
    with pytest.raises(ValueError, match="PGSE"):
        write_scheme(protocol, tmp_path / "x.scheme")
