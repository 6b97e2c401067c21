"""Data no tissue produces and protocols that cannot determine the membranes:
the ``IMPOSSIBLE_SIGNAL`` and ``UNDERDETERMINED`` statuses (issue 59).

The statistic is checked on many noise draws (its false alarms, its power on
a signal twice the b = 0), the protocol checks on protocols that lack an
axis or a second diffusion time, and the DIPY layer end to end with tiny
fits (48-cell grid, a few iterations): the statuses and the warnings, not
the quality of the recovery.
"""

import inspect
import warnings

import numpy as np
import pytest
from conftest import FAST, SMALL_PRIOR, SMALL_TRAINING
from dipy.core.gradients import gradient_table

from dipy_spinverse import Protocol, SpinverseModel, TetGrid, simulate
from dipy_spinverse.data import _protocol, make_phantom_dataset
from dipy_spinverse.inverse import resolve_config
from dipy_spinverse.posterior import TrainingOptions
from dipy_spinverse.reconst import (
    FITTED,
    IMPOSSIBLE_SIGNAL,
    OK,
    STATUS_CODES,
    UNCERTAIN_SURFACE,
    UNDERDETERMINED,
)
from dipy_spinverse.reconst.plausibility import (
    DIRECTION_TOLERANCE,
    impossible_signal,
    protocol_problems,
)
from dipy_spinverse.reconst.posterior import POSTERIOR_STATUS_CODES
from dipy_spinverse.sim.signals import VoxelSignals

# The demo dataset's protocol (make_phantom_dataset's own defaults: three
# timings, three shells of 10 directions, 3 b = 0 per sequence; 99 volumes).
_DEMO = {
    name: p.default
    for name, p in inspect.signature(make_phantom_dataset).parameters.items()
}
DEMO = _protocol(_DEMO["timings"], _DEMO["bvals"], _DEMO["n_directions"], _DEMO["n_b0"])
# Two diffusion times, 2 b = 0 and 6 directions on 2 shells each: 28 volumes.
PROTOCOL = _protocol(((0.010, 0.020), (0.010, 0.060)), (1000.0, 2500.0), 6, 2)
# The same volumes with every gradient along x, and its first sequence alone
# (one diffusion time).
ONE_AXIS = Protocol(
    PROTOCOL.waveforms,
    PROTOCOL.bvals,
    np.where(PROTOCOL.bvals[:, None] > 0, [1.0, 0.0, 0.0], 0.0),
)
ONE_TIME = PROTOCOL[PROTOCOL.sequences()[0][1]]


def _planar(protocol):
    """``protocol`` with its directions projected onto the xy-plane."""
    flat = protocol.bvecs * [1.0, 1.0, 0.0]
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    flat = np.divide(flat, norm, out=np.zeros_like(flat), where=norm > 0)
    return Protocol(protocol.waveforms, protocol.bvals, flat)


#: The slowest diffusivity the package accepts (mm^2/s): a free-diffusion
#: attenuation near 1 at every b-value (0.96 at b = 4000).
SLOW = 1e-5
T2 = 0.08


def _raw(protocol, attenuation, sigma, n, seed, *, rician=True):
    """``n`` voxels of ``attenuation`` (n_acquisitions,) with T2 decay over
    the echo times and noise ``sigma`` relative to the mean b = 0: magnitude
    (Rician) or real (Gaussian) data."""
    clean = 1000.0 * np.exp(-protocol.echo_times / T2) * attenuation
    level = sigma * clean[protocol.bvals == 0].mean()
    noise = level * np.random.default_rng(seed).standard_normal((2, n, len(protocol)))
    if not rician:
        return clean + noise[0]
    return np.abs(clean + noise[0] + 1j * noise[1])


def _flagged(protocol, raw, sigma, **kwargs):
    signals = VoxelSignals.from_raw(raw, protocol)
    return impossible_signal(signals, protocol, sigma=sigma, **kwargs)


# -- the statistic ------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [DEMO, PROTOCOL], ids=["demo", "small"])
@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("diffusivity", [0.0, SLOW], ids=["E=1", "slow"])
def test_noise_alone_never_makes_a_signal_impossible(protocol, sigma, diffusivity):
    """20,000 voxels of attenuation 1 (the worst case) or of free diffusion
    near 1, at SNR 100 to 5: at the default rate (1e-6) 0.02 false alarms
    are expected among them, with sigma or without."""
    attenuation = np.exp(-protocol.bvals * diffusivity)
    raw = _raw(protocol, attenuation, sigma, 20_000, seed=int(sigma * 100))
    assert not _flagged(protocol, raw, sigma).any()
    assert not _flagged(protocol, raw, 0.0).any()


@pytest.mark.parametrize("sigma", [0.01, 0.0], ids=["z-test", "t-test"])
def test_the_false_alarm_rate_is_the_one_asked_for(sigma):
    """At attenuation 1 and a rate of 5 % (Bonferroni over the 3 sequences)
    the tests flag about 5 % of 40,000 noisy voxels: the standard error
    counts the b = 0's noise, else more would be flagged; the test is not
    made safe by never flagging anything. Gaussian noise, the tests' own
    model; at SNR 100 the delta method is exact to a few per cent."""
    raw = _raw(DEMO, np.ones(len(DEMO)), 0.01, 40_000, seed=1, rician=False)
    rate = _flagged(DEMO, raw, sigma, false_alarm=0.05).mean()
    spread = 4 * np.sqrt(0.05 * 0.95 / 40_000)
    assert 0.035 < rate < 0.05 + spread


@pytest.mark.parametrize("protocol", [DEMO, PROTOCOL], ids=["demo", "small"])
def test_twice_the_b0_signal_is_impossible_with_and_without_sigma(protocol):
    """Every diffusion-weighted volume twice the b = 0 (the user's case (a)),
    at SNR 50: 2,000 noisy voxels all flagged, with sigma or without it
    (the voxel's own spread); noise-free too, where the spread is 0."""
    twice = np.where(protocol.bvals > 0, 2.0, 1.0)
    raw = _raw(protocol, twice, 0.02, 2_000, seed=2)
    assert _flagged(protocol, raw, 0.02).all()
    assert _flagged(protocol, raw, 0.0).all()
    clean = _raw(protocol, twice, 0.0, 1, seed=0)
    assert _flagged(protocol, clean, 0.0).all()
    # Noise-free data equal to their b = 0 are at 1, not above it.
    flat = _raw(protocol, np.ones(len(protocol)), 0.0, 1, seed=0)
    assert not _flagged(protocol, flat, 0.0).any()


def test_a_b0_of_a_longer_echo_time_is_not_a_signal_above_one():
    """A sequence without b = 0 volumes of its own is normalised by the b = 0
    of another; of a longer echo time, T2 decay lifts its attenuation above
    1 (here by 2.2 times): that sequence is not tested, the other is."""
    long = _protocol(((0.010, 0.060),), (1000.0,), 6, 3)
    short = Protocol.pgse(
        np.full(6, 1000.0), long.bvecs[3:9], small_delta=0.005, big_delta=0.006
    )
    protocol = long + short
    raw = _raw(protocol, np.exp(-protocol.bvals * SLOW), 0.02, 1_000, seed=3)
    assert not _flagged(protocol, raw, 0.02).any()
    assert not _flagged(protocol, raw, 0.0).any()
    raw[:, 3:9] *= 2.0  # the long sequence's own attenuation doubled
    assert _flagged(protocol, raw, 0.02).all()


# -- the protocol ----------------------------------------------------------------------
def test_protocols_that_determine_the_membranes_pass():
    assert protocol_problems(DEMO) == ()
    assert protocol_problems(PROTOCOL) == ()


@pytest.mark.parametrize(
    "protocol, reasons",
    [
        (ONE_AXIS, ["one axis"]),
        (_planar(PROTOCOL), ["one plane"]),
        (_planar(DEMO), ["one plane"]),
        (ONE_TIME, ["one timing"]),
        (ONE_AXIS[ONE_AXIS.sequences()[0][1]], ["one axis", "one timing"]),
    ],
    ids=["one direction", "planar", "planar demo", "one diffusion time", "both"],
)
def test_protocols_that_cannot_determine_the_membranes(protocol, reasons):
    problems = protocol_problems(protocol)
    assert len(problems) == len(reasons)
    for problem, reason in zip(problems, reasons, strict=True):
        assert reason in problem
    fixes = " ".join(problems)
    if "one axis" in reasons or "one plane" in reasons:
        assert "spread over the sphere" in fixes
    if "one timing" in reasons:
        assert "two or more diffusion times" in fixes
        assert "fit_method='posterior'" in fixes


@pytest.mark.parametrize("share, flat", [(2.0, False), (0.5, True)])
def test_the_direction_tolerance_is_the_least_encoded_axis_share(share, flat):
    """Eight directions around the equator, alternately tilted up and down
    by z: their mean outer product is diag((1 - z^2) / 2, (1 - z^2) / 2,
    z^2), so z^2 is the mean squared component along the least-encoded
    axis. At twice the tolerance they span 3-D, at half of it they do not."""
    z = np.sqrt(share * DIRECTION_TOLERANCE)
    angle = np.arange(8) * np.pi / 4
    bvecs = np.column_stack(
        [
            np.sqrt(1 - z**2) * np.cos(angle),
            np.sqrt(1 - z**2) * np.sin(angle),
            z * (-1.0) ** np.arange(8),
        ]
    )
    bvals = np.r_[0.0, np.full(8, 1000.0)]
    bvecs = np.vstack([np.zeros(3), bvecs])
    protocol = Protocol.pgse(bvals, bvecs, small_delta=0.01, big_delta=0.03)
    protocol += Protocol.pgse(bvals, bvecs, small_delta=0.01, big_delta=0.06)
    problems = protocol_problems(protocol)
    assert len(problems) == flat and all("one plane" in p for p in problems)


# -- the DIPY layer ------------------------------------------------------------------
GRID = TetGrid.bcc(8.0, 2)
# The default preset's label search, one short step: the statuses, fast.
SEARCH = dict(
    preset=resolve_config(
        "default", search_steps=1, search_starts=1, search_directions=2
    ),
    max_iter=4,
)


def _table(protocol):
    return gradient_table(
        protocol.bvals,
        bvecs=protocol.bvecs,
        small_delta=np.array([w.small_delta for w in protocol.waveforms]),
        big_delta=np.array([w.big_delta for w in protocol.waveforms]),
    )


def _volume(protocol):
    """Two voxels: a ball of 1e-5 m/s membrane in water (SNR 100), and a
    signal whose every diffusion-weighted volume is twice its b = 0."""
    inside = np.linalg.norm(GRID.cell_centroids - 4.0, axis=1) < 2.5
    truth = np.where(GRID.interface_faces(inside), 1e-5, np.inf)
    ball = simulate(GRID, truth, protocol).numpy()
    ball = _raw(protocol, ball, 0.01, 1, seed=4)[0]
    twice = _raw(protocol, np.where(protocol.bvals > 0, 2.0, 1.0), 0.01, 1, seed=5)
    return np.stack([ball, twice[0]])


def _our_warnings(record):
    """The messages of ``record`` about impossible data, and about the
    protocol."""
    messages = [str(w.message) for w in record]
    return (
        [m for m in messages if "no tissue produces" in m],
        [m for m in messages if "cannot determine the membranes" in m],
    )


@pytest.mark.parametrize(
    "options", [FAST, SEARCH], ids=["paper", "default without sigma"]
)
@pytest.mark.parametrize(
    "protocol, reason",
    [(PROTOCOL, None), (ONE_AXIS, "one axis"), (ONE_TIME, "one timing")],
    ids=["two diffusion times", "one direction", "one diffusion time"],
)
def test_impossible_data_and_protocols_are_flagged_end_to_end(
    options, protocol, reason
):
    """The user's cases: (a) signal twice the b = 0, (b) every gradient along
    one direction, (c) one diffusion time, fitted without sigma. Each gets
    its status and a warning naming the cause; the outputs are kept."""
    with warnings.catch_warnings(record=True) as built:
        warnings.simplefilter("always")
        model = SpinverseModel(_table(protocol), grid=GRID, **options)
    assert len(_our_warnings(built)[1]) == (reason is not None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit = model.fit(_volume(protocol))
    impossible, underdetermined = _our_warnings(record)
    # The impossible voxel outranks the protocol's status.
    assert fit.status[1] == IMPOSSIBLE_SIGNAL
    assert len(impossible) == 1 and "1 of 2 voxels" in impossible[0]
    if reason is None:
        plausible = OK if options is FAST else UNCERTAIN_SURFACE  # no sigma
        assert fit.status[0] == plausible and not underdetermined
    else:
        assert fit.status[0] == UNDERDETERMINED
        assert len(underdetermined) == 1 and reason in underdetermined[0]
        assert "1 of 2 voxels" in underdetermined[0]
    # Warning statuses: every map is filled.
    assert fit.fitted.all() and np.isfinite(fit.predict()).all()
    assert np.isfinite(fit.restricted_fraction).all()


def test_the_new_statuses_are_warning_statuses_with_meanings():
    assert {IMPOSSIBLE_SIGNAL, UNDERDETERMINED} <= set(FITTED)
    assert (IMPOSSIBLE_SIGNAL, UNDERDETERMINED) == (8, 9)
    assert "no tissue produces it" in STATUS_CODES[IMPOSSIBLE_SIGNAL]
    assert "cannot determine the membranes" in STATUS_CODES[UNDERDETERMINED]
    assert POSTERIOR_STATUS_CODES[IMPOSSIBLE_SIGNAL] == STATUS_CODES[IMPOSSIBLE_SIGNAL]
    assert UNDERDETERMINED not in POSTERIOR_STATUS_CODES


def test_the_posterior_flags_impossible_data_not_the_protocol(tmp_path):
    """fit_method='posterior': a signal twice its b = 0 gets
    ``IMPOSSIBLE_SIGNAL`` (NaN maps, as outside the prior) and a warning;
    one diffusion time is no status there (its intervals widen), and the
    model does not warn of it."""
    posterior = dict(
        fit_method="posterior",
        prior=SMALL_PRIOR,
        # The statuses need no quality: fewer simulations and epochs than
        # even the small posterior's.
        posterior_options=TrainingOptions(
            **{**SMALL_TRAINING, "n_simulations": 48, "epochs": 2, "n_calibration": 16}
        ),
        sigma=0.02,
        n_posterior_samples=50,
        cache_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UNDERDETERMINED warning
        SpinverseModel(ONE_TIME, **posterior)
    model = SpinverseModel(PROTOCOL, **posterior)
    signals, _ = model.prior.sample(2, seed=0)
    twice = np.where(PROTOCOL.bvals > 0, 2.0, 1.0)
    with pytest.warns(RuntimeWarning, match="IMPOSSIBLE_SIGNAL"):
        fit = model.fit(1000.0 * np.vstack([signals, twice]))
    assert fit.status[2] == IMPOSSIBLE_SIGNAL
    assert IMPOSSIBLE_SIGNAL not in fit.status[:2]
    assert np.isnan(fit.restricted_fraction[2]) and fit.S0[2] == 1000.0
