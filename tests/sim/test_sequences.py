"""Tests for dipy_spinverse.sim.sequences: waveforms, b-factors and protocols."""

import numpy as np
import numpy.testing as npt
import pytest
from dipy.core.gradients import WATER_GYROMAGNETIC_RATIO, gradient_table

from dipy_spinverse.sim.sequences import (
    Protocol,
    as_protocol,
    check_bvals,
    fibonacci_sphere,
    published_protocol,
)
from dipy_spinverse.sim.waveforms import (
    PGSE,
    CosineOGSE,
    DoublePGSE,
    PiecewiseConstant,
    SineOGSE,
)

GAMMA = WATER_GYROMAGNETIC_RATIO  # rad/(s T)


def brute_force_bfactor(waveform, n=400_000):
    """int_0^TE F^2 by sampling f on a fine grid (independent of the module)."""
    durations, amplitudes = waveform.segments
    edges = np.cumsum(durations)
    dt = edges[-1] / n
    t_mid = (np.arange(n) + 0.5) * dt
    f = amplitudes[np.searchsorted(edges, t_mid)]
    F = np.concatenate([[0.0], np.cumsum(f) * dt])
    # trapezoid rule on F^2 at the grid nodes
    return float(np.sum(F[:-1] ** 2 + F[1:] ** 2) * dt / 2), t_mid, F


def asymmetric_waveform():
    return PiecewiseConstant(
        durations=(0.004, 0.002, 0.008, 0.004), amplitudes=(1.0, 0.0, -0.25, -0.5)
    )


# -- b-factors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "small_delta, big_delta", [(0.005, 0.006), (0.01, 0.02), (0.01, 0.06), (0.01, 0.01)]
)
def test_pgse_bfactor_closed_form(small_delta, big_delta):
    waveform = PGSE(small_delta=small_delta, big_delta=big_delta)
    d, big_d = small_delta * 1e6, big_delta * 1e6
    npt.assert_allclose(waveform.bfactor_us3, d**2 * (big_d - d / 3), rtol=1e-12)
    npt.assert_allclose(
        waveform.closed_form_bfactor_us3, waveform.bfactor_us3, rtol=1e-12
    )
    npt.assert_allclose(waveform.echo_time, big_delta + small_delta, rtol=1e-12)
    npt.assert_allclose(waveform.diffusion_time, big_delta - small_delta / 3)


@pytest.mark.parametrize("mixing_time", [0.0, 0.015])
def test_double_pgse_is_twice_pgse(mixing_time):
    single = PGSE(small_delta=0.01, big_delta=0.03)
    double = DoublePGSE(small_delta=0.01, big_delta=0.03, mixing_time=mixing_time)
    npt.assert_allclose(double.bfactor_us3, 2 * single.bfactor_us3, rtol=1e-12)
    npt.assert_allclose(double.closed_form_bfactor_us3, double.bfactor_us3, rtol=1e-12)
    npt.assert_allclose(double.echo_time, 2 * 0.04 + mixing_time, rtol=1e-12)


@pytest.mark.parametrize("cls", [CosineOGSE, SineOGSE])
def test_ogse_bfactor_converges_quadratically(cls):
    def rel_error(steps):
        waveform = cls(0.02, 0.03, 2, steps_per_period=steps)
        return abs(waveform.bfactor_us3 / waveform.closed_form_bfactor_us3 - 1)

    errors = np.array([rel_error(s) for s in (16, 32, 64, 128)])
    npt.assert_allclose(errors[:-1] / errors[1:], 4.0, rtol=0.05)
    # piece means keep F exact at piece boundaries; the remaining O(h^2) error
    # is the F^2 of a piecewise-linear F between them
    assert errors[1] < 1e-2
    assert errors[3] < 1e-3


def test_ogse_closed_forms():
    d, n = 0.02, 3
    cos = CosineOGSE(d, 0.025, n)
    sin = SineOGSE(d, 0.025, n)
    d_us = d * 1e6
    npt.assert_allclose(cos.closed_form_bfactor_us3, d_us**3 / (4 * np.pi**2 * n**2))
    npt.assert_allclose(sin.closed_form_bfactor_us3, 3 * cos.closed_form_bfactor_us3)
    assert cos.segments[0].size == 2 * n * 32 + 1
    npt.assert_allclose(cos.frequency, n / d)


def test_piecewise_pgse_equals_pgse():
    pgse = PGSE(small_delta=0.01, big_delta=0.02)
    # the first lobe split in two: the same waveform
    piecewise = PiecewiseConstant(
        durations=(0.004, 0.006, 0.01, 0.01), amplitudes=(1, 1, 0, -1)
    )
    npt.assert_allclose(piecewise.bfactor_us3, pgse.bfactor_us3, rtol=1e-12)
    npt.assert_allclose(piecewise.closed_form_bfactor_us3, piecewise.bfactor_us3)
    npt.assert_allclose(piecewise.echo_time, pgse.echo_time)
    assert piecewise.is_antisymmetric


@pytest.mark.parametrize(
    "waveform",
    [
        PGSE(small_delta=0.01, big_delta=0.02),
        DoublePGSE(small_delta=0.005, big_delta=0.01, mixing_time=0.004),
        CosineOGSE(0.02, 0.025, 2, steps_per_period=8),
        SineOGSE(0.02, 0.025, 1, steps_per_period=8),
        asymmetric_waveform(),
    ],
    ids=lambda w: type(w).__name__,
)
def test_bfactor_against_brute_force(waveform):
    expected, t_mid, F = brute_force_bfactor(waveform)
    npt.assert_allclose(waveform.bfactor_us3, expected, rtol=1e-4)
    # F_at agrees with the cumulative sum at the grid nodes; each piece
    # boundary inside a grid cell can shift the sum by up to one cell width
    dt = t_mid[1] - t_mid[0]
    t_nodes = np.concatenate([[0.0], t_mid + dt / 2])
    atol = dt * waveform.segments[0].size
    npt.assert_allclose(waveform.F_at(t_nodes[::997]), F[::997], rtol=0, atol=atol)


def test_F_at_pgse_values():
    waveform = PGSE(small_delta=0.01, big_delta=0.03)
    d = 1e4
    npt.assert_allclose(
        waveform.F_at([-1.0, 0.0, d / 2, d, 2 * d, 3.5 * d, 4 * d, 5 * d]),
        [0, 0, d / 2, d, d, d / 2, 0, 0],
        atol=1e-9,
    )
    assert isinstance(waveform.F_at(d), float)


def test_segments_are_read_only_float64():
    durations, amplitudes = PGSE(small_delta=0.01, big_delta=0.02).segments
    assert durations.dtype == amplitudes.dtype == np.float64
    npt.assert_allclose(durations, [1e4, 1e4, 1e4])
    with pytest.raises(ValueError):
        durations[0] = 1.0


def test_waveforms_hashable_and_equal():
    assert PGSE(0.01, 0.02) == PGSE(small_delta=0.01, big_delta=0.02)
    assert hash(PGSE(0.01, 0.02)) == hash(PGSE(np.float64(0.01), 0.02))
    assert PGSE(0.01, 0.02) != PGSE(0.01, 0.03)
    assert len({CosineOGSE(0.02, 0.03, 2), CosineOGSE(0.02, 0.03, 2)}) == 1
    assert hash(asymmetric_waveform()) == hash(asymmetric_waveform())


# -- symmetry and validation ---------------------------------------------------


@pytest.mark.parametrize(
    "waveform, expected",
    [
        (PGSE(0.01, 0.02), True),
        (PGSE(0.01, 0.01), True),
        (DoublePGSE(0.01, 0.02, 0.005), True),
        (CosineOGSE(0.02, 0.03, 3), True),
        (CosineOGSE(0.02, 0.03, 1, steps_per_period=1000), True),
        # sine OGSE is time-symmetric, f(TE - t) = +f(t)
        (SineOGSE(0.02, 0.03, 3), False),
        (asymmetric_waveform(), False),
    ],
)
def test_is_antisymmetric(waveform, expected):
    assert waveform.is_antisymmetric is expected


def test_refocusing_check():
    with pytest.raises(ValueError, match="not refocused"):
        PiecewiseConstant(durations=(0.01, 0.01, 0.005), amplitudes=(1, 0, -1))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: PGSE(small_delta=-0.01, big_delta=0.02), "small_delta"),
        (lambda: PGSE(small_delta=np.nan, big_delta=0.02), "small_delta"),
        (lambda: PGSE(small_delta=0.02, big_delta=0.01), "big_delta"),
        (lambda: PGSE(small_delta=0.01, big_delta=20.0), "big_delta.*seconds"),
        (lambda: PGSE(small_delta=5.0, big_delta=6.0), "small_delta.*milliseconds"),
        (lambda: DoublePGSE(0.01, 0.02, -0.001), "mixing_time"),
        (lambda: CosineOGSE(0.02, 0.03, 1.5), "n_periods"),
        (lambda: CosineOGSE(0.02, 0.03, 0), "n_periods"),
        (lambda: SineOGSE(0.02, 0.03, 2, steps_per_period=2), "steps_per_period"),
        (lambda: PiecewiseConstant((0.01, 0.01), (2.0, -2.0)), "amplitudes"),
        (lambda: PiecewiseConstant((0.01, 0.0), (1.0, -1.0)), "durations"),
        (lambda: PiecewiseConstant((0.01, 0.01), (1.0,)), "same length"),
    ],
)
def test_bad_waveform_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_ogse_n_periods_keyword_only_steps():
    with pytest.raises(TypeError):
        CosineOGSE(0.02, 0.03, 2, 16)


# -- Protocol ------------------------------------------------------------------


def test_gradient_rate_reproduces_b():
    waveforms = (
        PGSE(0.01, 0.02),
        CosineOGSE(0.02, 0.03, 2),
        SineOGSE(0.02, 0.03, 1),
        DoublePGSE(0.005, 0.01, 0.002),
        asymmetric_waveform(),
        PGSE(0.01, 0.02),
    )
    bvals = np.array([1000.0, 500.0, 2000.0, 3000.0, 800.0, 0.0])
    bvecs = fibonacci_sphere(6)
    protocol = Protocol.from_arrays(bvals, bvecs, waveforms)
    rate = protocol.gradient_rate
    assert rate.shape == (6, 3)
    bfactors = np.array([w.bfactor_us3 for w in waveforms])
    npt.assert_allclose(np.sum(rate**2, axis=1) * bfactors, bvals, rtol=1e-12)
    npt.assert_allclose(rate[:5] / np.linalg.norm(rate[:5], axis=1)[:, None], bvecs[:5])
    npt.assert_array_equal(rate[5], 0)
    npt.assert_array_equal(protocol.bvecs[5], 0)


def test_gradient_strength_known_case():
    # b = gamma^2 G^2 delta^2 (Delta - delta / 3), b = 1000 s/mm^2 = 1e9 s/m^2
    small_delta, big_delta = 0.01, 0.02
    expected = np.sqrt(
        1e9 / (GAMMA**2 * small_delta**2 * (big_delta - small_delta / 3))
    )
    protocol = Protocol.pgse(
        [1000.0], [[0, 0, 1.0]], small_delta=small_delta, big_delta=big_delta
    )
    npt.assert_allclose(protocol.gradient_strength, [expected], rtol=1e-12)
    npt.assert_allclose(expected, 0.0915653, rtol=1e-6)  # T/m, by hand
    # 1 T/m x gamma = 2.67513e-4 rad/(um us)
    npt.assert_allclose(
        np.linalg.norm(protocol.gradient_rate), expected * 2.67513e-4, rtol=1e-12
    )


@pytest.mark.parametrize(
    "bvals, bvecs, match",
    [
        ([1000.0], [[0.0, 0.0, 0.9]], "bvecs.*normalise"),
        ([-1.0], [[0.0, 0.0, 1.0]], "bvals"),
        ([np.inf], [[0.0, 0.0, 1.0]], "bvals"),
        ([1000.0, 0.0], [[0.0, 0.0, 1.0]], "bvecs"),
        ([1000.0, 1000.0], [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], "transpose"),
    ],
)
def test_protocol_validation(bvals, bvecs, match):
    with pytest.raises(ValueError, match=match):
        Protocol.from_arrays(bvals, bvecs, PGSE(0.01, 0.02))


def test_protocol_rejects_mismatched_waveforms():
    with pytest.raises(ValueError, match="waveforms"):
        Protocol.from_arrays([0.0, 1000.0], [[0, 0, 0], [1, 0, 0]], [PGSE(0.01, 0.02)])
    with pytest.raises(TypeError, match="Waveform"):
        Protocol(waveforms=("PGSE",), bvals=[0.0], bvecs=[[0, 0, 0]])


def test_bvecs_are_normalised_and_b0_zeroed():
    protocol = Protocol.pgse(
        [0.0, 1000.0],
        [[0.3, 0.2, 0.1], [0.0, 0.0, 1.0005]],
        small_delta=0.01,
        big_delta=0.02,
    )
    npt.assert_array_equal(protocol.bvecs[0], 0)
    npt.assert_allclose(protocol.bvecs[1], [0, 0, 1], rtol=0, atol=1e-15)


def test_groups_in_order_of_first_appearance():
    a, b = PGSE(0.01, 0.06), PGSE(0.01, 0.02)
    protocol = Protocol.from_arrays(
        [1000.0] * 5, fibonacci_sphere(5), [a, b, PGSE(0.01, 0.06), b, a]
    )
    groups = protocol.groups()
    assert [g[0] for g in groups] == [a, b]
    npt.assert_array_equal(groups[0][1], [0, 2, 4])
    npt.assert_array_equal(groups[1][1], [1, 3])


def test_slicing_keeps_timing():
    bvals = np.array([0.0, 1000.0, 2000.0, 0.0, 1000.0])
    protocol = Protocol.pgse(
        bvals,
        np.vstack([[0, 0, 0], fibonacci_sphere(4)]),
        small_delta=0.01,
        big_delta=[0.02, 0.02, 0.02, 0.06, 0.06],
    )
    sub = protocol[np.array([4, 1])]
    assert isinstance(sub, Protocol) and len(sub) == 2
    npt.assert_array_equal(sub.bvals, [1000.0, 1000.0])
    npt.assert_allclose(sub.echo_times, [0.07, 0.03])
    npt.assert_array_equal(sub.bvecs, protocol.bvecs[[4, 1]])
    assert protocol[1:3].n_acquisitions == 2
    assert protocol[bvals > 0].waveforms == protocol.waveforms[1:3] + (
        protocol.waveforms[4],
    )
    single = protocol[3]
    assert len(single) == 1 and single.waveforms[0] == PGSE(0.01, 0.06)


def test_concatenate_and_add():
    p1 = Protocol.pgse([1000.0], [[1, 0, 0]], small_delta=0.01, big_delta=0.02)
    p2 = Protocol.from_arrays([500.0, 0.0], [[0, 1, 0], [0, 0, 0]], PGSE(0.005, 0.06))
    joined = p1 + p2
    assert len(joined) == 3
    npt.assert_array_equal(joined.bvals, [1000.0, 500.0, 0.0])
    assert joined.waveforms == p1.waveforms + p2.waveforms
    assert len(Protocol.concatenate(p1, p2, p1)) == 4
    npt.assert_allclose(joined.gradient_rate[1:], p2.gradient_rate)


# -- DIPY gradient tables ------------------------------------------------------


def _table_arrays():
    bvals = np.array([0.0, 1000.0, 1000.0, 2000.0, 5.0, 2000.0])
    bvecs = np.vstack([[0, 0, 0], fibonacci_sphere(5)])
    return bvals, bvecs


def test_from_gtab_scalar_timing():
    bvals, bvecs = _table_arrays()
    gtab = gradient_table(bvals, bvecs=bvecs, big_delta=0.02, small_delta=0.01)
    protocol = Protocol.from_gtab(gtab)
    assert len(protocol) == 6
    assert set(protocol.waveforms) == {PGSE(0.01, 0.02)}
    # b = 5 is below gtab.b0_threshold (50): treated as b = 0
    npt.assert_array_equal(protocol.bvals, [0, 1000, 1000, 2000, 0, 2000])
    npt.assert_array_equal(protocol.bvecs[4], 0)
    assert as_protocol(gtab).n_acquisitions == 6
    assert as_protocol(protocol) is protocol


def test_from_gtab_per_volume_timing():
    bvals, bvecs = _table_arrays()
    big_delta = np.array([0.02, 0.02, 0.06, 0.02, 0.06, 0.06])
    gtab = gradient_table(bvals, bvecs=bvecs, big_delta=big_delta, small_delta=0.01)
    protocol = Protocol.from_gtab(gtab)
    groups = protocol.groups()
    assert [g[0] for g in groups] == [PGSE(0.01, 0.02), PGSE(0.01, 0.06)]
    npt.assert_array_equal(groups[0][1], [0, 1, 3])
    npt.assert_array_equal(groups[1][1], [2, 4, 5])
    npt.assert_allclose(protocol.echo_times, big_delta + 0.01)
    # the same b with a longer Delta needs a weaker gradient
    assert protocol.gradient_strength[2] < protocol.gradient_strength[1]


def test_from_gtab_waveform_override():
    bvals, bvecs = _table_arrays()
    gtab = gradient_table(bvals, bvecs=bvecs)
    waveform = CosineOGSE(0.02, 0.03, 2)
    protocol = Protocol.from_gtab(gtab, waveform=waveform)
    assert set(protocol.waveforms) == {waveform}
    with pytest.raises(ValueError, match="waveforms"):
        Protocol.from_gtab(gtab, waveform=[waveform, waveform])


@pytest.mark.parametrize("missing", ["big_delta", "small_delta"])
def test_from_gtab_missing_timing(missing):
    bvals, bvecs = _table_arrays()
    timing = {"big_delta": 0.02, "small_delta": 0.01}
    del timing[missing]
    gtab = gradient_table(bvals, bvecs=bvecs, **timing)
    with pytest.raises(ValueError, match=f"{missing}.*gradient_table"):
        Protocol.from_gtab(gtab)
    with pytest.raises(ValueError, match=missing):
        as_protocol(gtab)


def test_from_gtab_milliseconds():
    bvals, bvecs = _table_arrays()
    gtab = gradient_table(bvals, bvecs=bvecs, big_delta=20.0, small_delta=0.01)
    with pytest.raises(ValueError, match="big_delta.*milliseconds.*seconds"):
        Protocol.from_gtab(gtab)
    gtab = gradient_table(bvals, bvecs=bvecs, big_delta=60.0, small_delta=10.0)
    with pytest.raises(ValueError, match="milliseconds"):
        Protocol.from_gtab(gtab)
    # Microseconds: the hint must not suggest milliseconds, which are refused
    # too; it names the value in seconds.
    gtab = gradient_table(bvals, bvecs=bvecs, big_delta=3e4, small_delta=1e4)
    with pytest.raises(ValueError, match=r"microseconds.*small_delta=0\.01 for"):
        Protocol.from_gtab(gtab)
    with pytest.raises(ValueError, match="not a time in seconds"):
        PGSE(small_delta=1e9, big_delta=2e9)


def test_from_gtab_wrong_timing_length():
    bvals, bvecs = _table_arrays()
    gtab = gradient_table(bvals, bvecs=bvecs, big_delta=[0.02, 0.06], small_delta=0.01)
    with pytest.raises(ValueError, match="big_delta.*one value per"):
        Protocol.from_gtab(gtab)


@pytest.mark.parametrize(
    "bvals, threshold, match",
    [
        # A sign error: DIPY alone would count -1000 as b = 0.
        ([0, -1000, 1000], 50, "negative.*-1000 at volume 1.*>= 0 in s/mm\\^2"),
        # s/m^2: no shell below 30,000 s/mm^2.
        ([0, 1e9, 3e9], 50, "no diffusion-weighted shell.*s/m\\^2.*divide.*1e6"),
        # ms/um^2: every b under the b = 0 threshold ...
        ([0, 1, 3], 50, "no diffusion-weighted volume.*ms/um\\^2.*multiply.*1,000"),
        # ... or, without a threshold, no shell above 50 s/mm^2.
        ([0, 1, 3], 0, "no diffusion-weighted shell.*ms/um\\^2.*3000 s/mm\\^2"),
        ([0, 0, 0], 50, "no diffusion-weighted volume.*at least one"),
        # Mixed units: a shell in s/mm^2 beside one in s/m^2.
        ([0, 1000, 3e9], 50, "above 1e\\+06 s/mm\\^2.*3e\\+09 at volume 2.*mixes"),
    ],
)
def test_from_gtab_refuses_bvals_in_the_wrong_unit(bvals, threshold, match):
    bvecs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], float)
    gtab = gradient_table(
        np.array(bvals, float),
        bvecs=bvecs,
        big_delta=0.02,
        small_delta=0.01,
        b0_threshold=threshold,
    )
    with pytest.raises(ValueError, match=r"gtab\.bvals has .*" + match):
        Protocol.from_gtab(gtab)


def test_check_bvals_accepts_plausible_tables():
    # Small tables (tests), IVIM's low b beside a normal shell, ex vivo b.
    for bvals in ([0, 1000, 3000], [0, 10, 20, 800], [0, 5, 25_000], [0, 1e3, 1e5]):
        npt.assert_array_equal(check_bvals(bvals, b0_threshold=0), bvals)


def test_as_protocol_type_error():
    with pytest.raises(TypeError, match="protocol"):
        as_protocol({"bvals": [0]})


# -- directions and the published protocol -------------------------------------


@pytest.mark.parametrize("hemisphere", [False, True])
def test_fibonacci_sphere(hemisphere):
    dirs = fibonacci_sphere(30, hemisphere=hemisphere)
    assert dirs.shape == (30, 3)
    npt.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, rtol=1e-12)
    npt.assert_array_equal(dirs, fibonacci_sphere(30, hemisphere=hemisphere))
    cosines = dirs @ dirs.T - 2 * np.eye(30)
    assert np.degrees(np.arccos(cosines.max())) > 20  # evenly spread
    if hemisphere:
        assert np.all(dirs[:, 2] >= 0)


def test_published_protocol():
    protocol = published_protocol()
    assert len(protocol) == 540
    groups = protocol.groups()
    assert [g[0] for g in groups] == [
        PGSE(0.005, 0.006),
        PGSE(0.01, 0.02),
        PGSE(0.01, 0.06),
    ]
    assert all(len(idx) == 180 for _, idx in groups)
    npt.assert_array_equal(np.unique(protocol.bvals), np.arange(6) * 1000.0)
    assert np.count_nonzero(protocol.bvals == 0) == 90
    assert len(published_protocol(b0_per_direction=False)) == 453
    assert all(w.is_antisymmetric for w, _ in groups)
