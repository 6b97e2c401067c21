"""The gradient table's messages speak the user's words (issue 59, item 5).

Errors met through :func:`read_gradients` name the option as its argument
(``b0_threshold``), and the command (``dipy_fit_spinverse``) rewords them
in the flag the user typed (``--b0_threshold``; issue 83: the core speaks
Python, the command its flags); values that look like another unit say
which unit is expected and the conversion.
"""

import numpy as np
import pytest
from conftest import SMALL_DEMO
from dipy.core.gradients import gradient_table
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse.data import make_phantom_dataset
from dipy_spinverse.io.camino import read_scheme
from dipy_spinverse.io.gradients import read_gradients
from dipy_spinverse.sim.sequences import Protocol, fibonacci_sphere
from dipy_spinverse.workflows.flags import in_flags, reword

#: Two b = 0 volumes and two shells of three directions.
BVALS = np.array([0.0, 0.0, 1000, 1000, 1000, 2500, 2500, 2500])
PULSES = dict(big_delta=0.02, small_delta=0.01)


def _bvecs(bvals):
    bvecs = np.zeros((len(bvals), 3))
    weighted = np.flatnonzero(np.asarray(bvals) > 0)
    bvecs[weighted] = np.resize(
        fibonacci_sphere(3, hemisphere=True), (len(weighted), 3)
    )
    return bvecs


def _files(tmp_path, bvals, bvecs=None):
    """A .bval/.bvec pair and the keyword arguments read_gradients needs."""
    bvals = np.asarray(bvals, dtype=float)
    bvecs = _bvecs(bvals) if bvecs is None else bvecs
    np.savetxt(tmp_path / "b.bval", bvals[None])
    np.savetxt(tmp_path / "b.bvec", bvecs.T)
    return (tmp_path / "b.bval", tmp_path / "b.bvec"), dict(n_volumes=len(bvals))


def _scheme(tmp_path, rows, header="VERSION: STEJSKALTANNER"):
    path = tmp_path / "s.scheme"
    lines = [header] if header is not None else []
    lines += [" ".join(f"{v:.10g}" for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_phantom_dataset(tmp_path_factory.mktemp("demo"), **SMALL_DEMO)


# -- No b = 0 volume: b0_threshold, not gradient_table ------------------------


def test_no_b0_names_b0_threshold_and_the_fix(tmp_path):
    """b = 0 volumes stored as b = 5 with the threshold at 0: the message
    names the option as the user gave it (the argument; the command's flag)
    and the value that fixes it."""
    files, options = _files(tmp_path, np.where(BVALS == 0, 5.0, BVALS))
    with pytest.raises(
        ValueError,
        match=r"b\.bval has no b = 0 volume: its smallest b-value is 5 s/mm\^2, "
        r"above b0_threshold 0 s/mm\^2.*pass b0_threshold=5;",
    ) as err:
        read_gradients(*files, **options, **PULSES, b0_threshold=0)
    assert "gradient_table" not in str(err.value) and "--" not in str(err.value)
    command = reword(err.value)
    assert "above --b0_threshold 0 s/mm^2" in command
    assert "pass --b0_threshold 5;" in command
    table = read_gradients(*files, **options, **PULSES, b0_threshold=5)
    assert_array_equal(table.b0s_mask, BVALS == 0)


def test_no_b0_acquired_is_not_fixed_by_the_threshold(tmp_path):
    """Only weighted shells: raising the threshold to a shell is no fix."""
    bvals = BVALS[BVALS > 0]
    files, options = _files(tmp_path, bvals)
    with pytest.raises(
        ValueError,
        match=r"smallest b-value is 1000 s/mm\^2, above b0_threshold "
        r"50 s/mm\^2.*diffusion-weighted shell.*add the b = 0 volumes",
    ) as err:
        read_gradients(*files, **options, **PULSES)
    assert "b0_threshold=1000" not in str(err.value)


def test_a_scheme_without_b0_row_is_refused_naming_it(tmp_path):
    """Its b = 0 rows are those without gradient; b0_threshold only maps the
    b-values file for the comparison."""
    protocol = Protocol.pgse(BVALS, _bvecs(BVALS), **PULSES)
    rows = np.column_stack(
        [
            protocol.bvecs,
            protocol.gradient_strength,
            np.full((len(BVALS), 3), [0.02, 0.01, 0.03]),
        ]
    )
    rows[BVALS == 0, :4] = [1.0, 0, 0, 1e-3]  # b of about 0.1 s/mm^2
    files, options = _files(tmp_path, BVALS)
    with pytest.raises(ValueError, match=r"s\.scheme has no b = 0 row \(\|G\| = 0"):
        read_gradients(*files, **options, scheme_file=_scheme(tmp_path, rows))


# -- b-values in another unit -------------------------------------------------


@pytest.mark.parametrize("b0_threshold", [50.0, 0.0])
def test_bvals_in_ms_per_um2_say_multiply_by_1000(tmp_path, b0_threshold):
    """1 ms/um^2 = 1000 s/mm^2: a largest b of 2.5 is no diffusion weighting
    in s/mm^2, so the table is refused, with the conversion."""
    files, options = _files(tmp_path, BVALS / 1000)
    with pytest.raises(
        ValueError,
        match=r"b-values file .*b\.bval.*ms/um\^2.*multipl.* 1,000",
    ):
        read_gradients(*files, **options, **PULSES, b0_threshold=b0_threshold)


def test_bvals_in_s_per_m2_say_divide_by_1e6(tmp_path):
    """1 s/mm^2 = 1e6 s/m^2: b = 1e9 s/mm^2 no scanner reaches."""
    files, options = _files(tmp_path, BVALS * 1e6)
    with pytest.raises(
        ValueError,
        match=r"b-values file .*b\.bval.*in s/mm\^2 \(DIPY's unit\): these look "
        r"like s/m\^2.*divide them by 1e6, e.g. 1e\+09 s/m\^2 = 1000 s/mm\^2",
    ):
        read_gradients(*files, **options, **PULSES)


@pytest.mark.parametrize("scale, unit", [(1e-3, r"ms/um\^2"), (1e6, r"s/m\^2")])
def test_the_demo_bvals_in_another_unit_are_refused(demo, tmp_path, scale, unit):
    bvals = np.loadtxt(demo["bvals"]) * scale
    np.savetxt(tmp_path / "b.bval", bvals[None])
    with pytest.raises(ValueError, match=unit):
        read_gradients(
            tmp_path / "b.bval",
            demo["bvecs"],
            n_volumes=len(bvals),
            timing_file=demo["timing"],
        )


# -- Times in milliseconds ----------------------------------------------------


@pytest.mark.parametrize(
    "small_delta, big_delta, option",
    [(10.0, 40.0, "small_delta=10"), (0.01, 40.0, "big_delta=40")],
)
def test_pulse_flags_in_ms_name_the_flags_and_seconds(
    tmp_path, small_delta, big_delta, option
):
    files, options = _files(tmp_path, BVALS)
    with pytest.raises(
        ValueError,
        match=rf"small_delta .* big_delta .*{option} looks like milliseconds.*"
        r"seconds.*Pass both in seconds: small_delta=0\.01 and big_delta=0\.04",
    ):
        read_gradients(*files, **options, small_delta=small_delta, big_delta=big_delta)
    # The command's words: its flags.
    with (
        pytest.raises(
            ValueError,
            match=rf"--small_delta .* --big_delta .*--{option.replace('=', ' ')} looks "
            r"like milliseconds.*Pass both in seconds: --small_delta 0\.01 and "
            r"--big_delta 0\.04",
        ),
        in_flags(),
    ):
        read_gradients(*files, **options, small_delta=small_delta, big_delta=big_delta)


def test_pulse_flags_in_the_wrong_order_name_the_flags(tmp_path):
    files, options = _files(tmp_path, BVALS)
    with pytest.raises(ValueError, match=r"small_delta 0\.02 and big_delta 0\.01:.*>="):
        read_gradients(*files, **options, small_delta=0.02, big_delta=0.01)
    with (
        pytest.raises(
            ValueError, match=r"--small_delta 0\.02 and --big_delta 0\.01:.*>="
        ),
        in_flags(),
    ):
        read_gradients(*files, **options, small_delta=0.02, big_delta=0.01)


def test_timing_file_in_ms_names_the_file_and_seconds(tmp_path):
    files, options = _files(tmp_path, BVALS)
    timing = tmp_path / "timing.txt"
    np.savetxt(timing, np.tile([10.0, 40.0], (len(BVALS), 1)))
    with pytest.raises(
        ValueError,
        match=r"timing file .*timing\.txt: volume\(s\) 0, 1, .*small_delta=10 looks "
        r"like milliseconds; times are in seconds \(e\.g\. small_delta=0\.01",
    ):
        read_gradients(*files, **options, timing_file=timing)


def test_scheme_file_in_ms_names_the_line(tmp_path):
    rows = [[0, 0, 0, 0, 30.0, 10.0, 50.0], [1, 0, 0, 0.05, 30.0, 10.0, 50.0]]
    with pytest.raises(
        ValueError, match=r"s\.scheme, line 2: small_delta=10 looks like milliseconds"
    ):
        read_scheme(_scheme(tmp_path, rows))


def test_gradient_table_in_ms_says_seconds():
    """The API's table: the model builds its protocol with from_gtab."""
    gtab = gradient_table(BVALS, bvecs=_bvecs(BVALS), big_delta=40.0, small_delta=0.01)
    with pytest.raises(
        ValueError,
        match=r"big_delta=40 looks like milliseconds; times are in seconds "
        r"\(e\.g\. big_delta=0\.04 for 40 ms\)",
    ):
        Protocol.from_gtab(gtab)


# -- Camino scheme files: b = 0 rows without timing, headers ------------------


def _one_timing_rows():
    """A one-timing scheme's rows, b = 0 rows with Camino's zero timing."""
    protocol = Protocol.pgse(BVALS, _bvecs(BVALS), **PULSES)
    rows = np.column_stack(
        [
            protocol.bvecs,
            protocol.gradient_strength,
            np.full((len(BVALS), 3), [0.02, 0.01, 0.03]),
        ]
    )
    rows[BVALS == 0, 3:] = 0.0
    return protocol, rows


def test_b0_rows_without_timing_take_the_scheme_timing(tmp_path):
    protocol, rows = _one_timing_rows()
    back, echo_times = read_scheme(_scheme(tmp_path, rows))
    assert_array_equal(echo_times, rows[:, 6])
    assert back.waveforms == protocol.waveforms
    assert_allclose(back.bvals, BVALS, rtol=1e-9)
    files, options = _files(tmp_path, BVALS)
    table = read_gradients(*files, **options, scheme_file=_scheme(tmp_path, rows))
    assert table.waveforms == protocol.waveforms


def test_b0_rows_without_timing_among_several_timings_are_refused(tmp_path):
    """Which sequence's echo time weights them cannot be told (their TE is
    none of the weighted rows')."""
    _, rows = _one_timing_rows()
    longer = rows.copy()
    longer[:, [4, 6]] = np.where(longer[:, 3:4] > 0, [0.05, 0.07], 0.0)
    path = _scheme(tmp_path, np.vstack([rows, longer]))
    with pytest.raises(
        ValueError,
        match=r"s\.scheme, line\(s\) 2, 3, 10, 11: b = 0 row\(s\) with DELTA = "
        r"delta = 0 \(no timing\) whose echo time \(TE column\) picks no single "
        r"one of the 2 timings.*give each b = 0 row the DELTA, delta and TE of the "
        "sequence",
    ):
        read_scheme(path)


def test_a_b0_row_with_half_a_timing_says_how_to_write_it(tmp_path):
    _, rows = _one_timing_rows()
    rows[0, 4] = 0.02  # DELTA given, delta 0
    with pytest.raises(
        ValueError,
        match=r"line 2: small_delta must be finite and positive.*a b = 0 row: "
        "give it DELTA = delta = 0, or the timing of its sequence",
    ):
        read_scheme(_scheme(tmp_path, rows))


def test_version_1_is_the_stejskal_tanner_format(tmp_path):
    protocol, rows = _one_timing_rows()
    back, _ = read_scheme(_scheme(tmp_path, rows, header="VERSION: 1"))
    assert back.waveforms == protocol.waveforms
    assert_allclose(back.bvals, BVALS, rtol=1e-9)


@pytest.mark.parametrize(
    "text, match",
    [
        # Column names before the header, or after it.
        (
            "x y z |G| DELTA delta TE\nVERSION: STEJSKALTANNER\n",
            r"s\.scheme, line 1: expected a 'VERSION: STEJSKALTANNER' header.*"
            "column names must be a comment",
        ),
        (
            "VERSION: STEJSKALTANNER\ng_x g_y g_z |G| DELTA delta TE\n",
            r"s\.scheme, line 2: 'g_x .* TE' is not a row of numbers; a line of "
            "column names must be a comment",
        ),
        # No header, and rows that are not STEJSKALTANNER's seven columns
        # (a headerless file of seven is read: the ISBI 2015 scheme).
        (
            "1 0 0 1000\n",
            r"s\.scheme, line 1: .*add the line 'VERSION: STEJSKALTANNER' before",
        ),
        # Another format, without timing.
        (
            "# from fsl2scheme\nVERSION: BVECTOR\n1 0 0 1000\n",
            r"s\.scheme, line 2: unsupported scheme version 'BVECTOR'.*no gradient "
            r"timing: give its b-values and directions as \.bval/\.bvec",
        ),
        (
            "VERSION: 2\n1 0 0 1000\n",
            r"s\.scheme, line 1: unsupported scheme version '2'",
        ),
    ],
)
def test_scheme_headers_name_the_file_and_line(tmp_path, text, match):
    path = tmp_path / "s.scheme"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_scheme(path)
    files, options = _files(tmp_path, BVALS)
    with pytest.raises(ValueError, match=match):
        read_gradients(*files, **options, scheme_file=path)


def test_comment_header_lines_are_skipped(tmp_path):
    protocol, rows = _one_timing_rows()
    path = _scheme(
        tmp_path, rows, header="#x y z |G| DELTA delta TE\nVERSION: STEJSKALTANNER"
    )
    assert read_scheme(path)[0].waveforms == protocol.waveforms


# -- The demo still reads -----------------------------------------------------


def test_the_demo_protocol_reads_from_every_timing_source(demo):
    bvals = np.loadtxt(demo["bvals"])
    files = (demo["bvals"], demo["bvecs"])
    from_timing = read_gradients(
        *files, n_volumes=len(bvals), timing_file=demo["timing"]
    )
    assert_array_equal(from_timing.bvals, bvals)
    assert set(from_timing.big_delta) == {0.06, 0.02}
    from_scheme = read_gradients(
        *files, n_volumes=len(bvals), scheme_file=demo["scheme"]
    )
    assert_allclose(from_scheme.bvals, bvals, rtol=1e-6, atol=1e-6)
    assert_array_equal(
        [w.big_delta for w in from_scheme.waveforms], from_timing.big_delta
    )
    one = read_gradients(*files, n_volumes=len(bvals), big_delta=0.02, small_delta=0.01)
    assert_array_equal(one.b0s_mask, bvals == 0)
