"""Issue 84, cases 2, 6 and 12: the protocol-free model's shells, its
shipped estimator's file and protocols with echo times."""

import re
import warnings

import numpy as np
import pytest
import torch
from dipy.core.gradients import gradient_table

from dipy_spinverse import Protocol, SpinverseModel
from dipy_spinverse.posterior import TissuePrior, shipped
from dipy_spinverse.posterior import protocol_free as pf
from dipy_spinverse.reconst import OK
from dipy_spinverse.sim.sequences import fibonacci_sphere, pgse_waveforms
from dipy_spinverse.sim.waveforms import with_echo_times


def _pgse(bvals, directions, delta=0.01, big_delta=0.03, n_b0=4):
    bvals = np.r_[np.zeros(n_b0), bvals]
    bvecs = np.vstack([np.zeros((n_b0, 3)), directions])
    return Protocol.pgse(bvals, bvecs, small_delta=delta, big_delta=big_delta)


def _ramp(n=60, low=500.0, high=1500.0):
    return _pgse(np.linspace(low, high, n), fibonacci_sphere(n, hemisphere=True))


def _shell(b, n=20, **timing):
    return _pgse(np.full(n, float(b)), fibonacci_sphere(n, hemisphere=True), **timing)


# -- case 2: a shell's b-values lie within B_TOLERANCE of each other --------------
def test_a_ramp_of_b_values_is_not_one_shell():
    """b 500 -> 1,500 over 60 directions (steps of 17 s/mm^2) was chained
    into one shell at b = 1,000; no 6 of its volumes lie within 20 s/mm^2,
    so it is no shell, and the protocol, left without one, is refused
    naming its volumes."""
    protocol = _ramp()
    with pytest.raises(ValueError, match="reads no shell") as info:
        SpinverseModel(protocol, fit_method="protocol_free", sigma=10.0)
    message = str(info.value)
    assert "b 500-1500 s/mm^2" in message and "volumes 4-63" in message, message
    assert "not a shell" in message, message


def test_a_ramp_beside_a_shell_is_named_out_of_design():
    protocol = Protocol.concatenate(_ramp(), _shell(2000, big_delta=0.05))
    with pytest.warns(UserWarning, match=r"b 500-1500 s/mm\^2.*volumes 4-63"):
        model = SpinverseModel(protocol, fit_method="protocol_free", sigma=10.0)
    assert [round(s.b) for s in model.shells.shells] == [2000]
    (entry,) = model.out_of_design
    assert "volumes 4-63" in entry and "not a shell" in entry, entry


def test_every_shell_spans_at_most_the_tolerance():
    """Shells of any b-values: no shell read spans more than B_TOLERANCE."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        bvals = np.sort(rng.uniform(500, 1500, 80))
        protocol = _pgse(bvals, fibonacci_sphere(80, hemisphere=True))
        try:
            shells = pf.ProtocolShells(protocol)
        except ValueError:
            continue
        for shell in shells.shells:
            assert np.ptp(protocol.bvals[shell.rows]) <= pf.B_TOLERANCE


def test_b_values_rounded_by_the_scanner_are_read_as_shells():
    """Every b jittered by up to +-5 s/mm^2 (scanner rounding): still three
    shells of 20 directions; two shells 30 s/mm^2 apart stay two."""
    rng = np.random.default_rng(0)
    parts = [_shell(b) for b in (1000, 2000, 3000)]
    protocol = Protocol.concatenate(*parts)
    bvals = protocol.bvals.copy()
    weighted = bvals > 0
    bvals[weighted] += rng.integers(-5, 6, weighted.sum())
    jittered = Protocol(protocol.waveforms, bvals, protocol.bvecs)
    shells = pf.ProtocolShells(jittered)
    assert shells.dropped == []
    assert sorted(len(s.rows) for s in shells.shells) == [20, 20, 20]
    assert sorted(round(s.b, -1) for s in shells.shells) == [1000, 2000, 3000]
    # Two shells 30 apart, each jittered by +-5: chained before, two now.
    close = Protocol.concatenate(_shell(1000), _shell(1030))
    bvals = close.bvals.copy()
    weighted = bvals > 0
    bvals[weighted] += rng.integers(-5, 6, weighted.sum())
    shells = pf.ProtocolShells(Protocol(close.waveforms, bvals, close.bvecs))
    assert sorted(len(s.rows) for s in shells.shells) == [20, 20]
    assert shells.dropped == []


def test_a_few_stray_volumes_next_to_a_shell_are_named():
    protocol = _pgse(
        # A shell spread over 995-1005, then 1022 and 1036: steps of 17 and
        # 14 s/mm^2 chain them, but 1022 lies 27 from 995.
        np.r_[np.linspace(995.0, 1005.0, 20), 1022.0, 1036.0],
        fibonacci_sphere(22, hemisphere=True),
    )
    shells = pf.ProtocolShells(protocol)
    assert [len(s.rows) for s in shells.shells] == [20]
    ((what, why),) = shells.dropped
    assert "2 directions, fewer than the 6" in why, why


# -- case 6: a damaged shipped protocol-free estimator ------------------------------
def _shipped_copy(tmp_path, content):
    """A folder of shipped estimators whose protocol-free file holds
    ``content`` (bytes, or None: no file), its manifest accepting this code."""
    import json

    name = shipped.shipped_name(pf.shipped_key())
    manifest = {
        "estimators": {
            name: {
                "about": "a test copy",
                "trained_under": shipped.estimator_code(),
                "accepted": [],
            }
        },
        "sources": {},
    }
    (tmp_path / shipped.MANIFEST_NAME).write_text(json.dumps(manifest))
    if content is not None:
        (tmp_path / name).write_bytes(content)
    return tmp_path / name


def _torch_bytes(tmp_path, obj):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    return path.read_bytes()


@pytest.mark.parametrize(
    "damage",
    ["truncated", "zero_bytes", "random_bytes", "other_state", "a_tensor", "missing"],
)
def test_a_damaged_shipped_estimator_is_refused_naming_the_file(
    damage, tmp_path, monkeypatch
):
    real = shipped.SHIPPED / shipped.shipped_name(pf.shipped_key())
    raw = real.read_bytes()
    contents = dict(
        truncated=raw[: len(raw) // 2],
        zero_bytes=b"",
        random_bytes=np.random.default_rng(0).bytes(1000),
        # A valid torch file of other content: another network's weights
        # (of the right key names but wrong shapes), or a bare tensor.
        other_state=_torch_bytes(
            tmp_path,
            {
                k: v[..., :1]
                for k, v in pf.ProtocolFreeEstimator(width=8).state_dict().items()
            },
        ),
        a_tensor=_torch_bytes(tmp_path, torch.zeros(3)),
        missing=None,
    )
    folder = tmp_path / "trained"
    folder.mkdir()
    path = _shipped_copy(folder, contents[damage])
    monkeypatch.setattr(shipped, "SHIPPED", folder)
    model = SpinverseModel(_shell(1000), fit_method="protocol_free", sigma=10.0)
    with pytest.raises(RuntimeError, match=re.escape(str(path))) as info:
        _ = model.estimator
    message = str(info.value)
    assert "reinstall dipy_spinverse" in message.lower(), message
    assert "python -m dipy_spinverse.posterior.protocol_free train" in message
    # The real file is untouched.
    assert real.read_bytes() == raw


# -- case 12: protocols with echo times -------------------------------------------
def _gtab(bvals, n_b0=3, delta=0.01, big_delta=0.03):
    n = len(bvals)
    bvecs = np.vstack([np.zeros((n_b0, 3)), fibonacci_sphere(n, hemisphere=True)])
    return gradient_table(
        np.r_[np.zeros(n_b0), bvals],
        bvecs=bvecs,
        small_delta=delta,
        big_delta=big_delta,
    )


def test_an_echo_time_leaves_the_encodings_pgse():
    """Protocol.from_gtab(gtab, echo_time=0.1) puts each PGSE in a spin echo
    of 100 ms: still PGSE shells, read, and fitted as without the echo
    time (its b = 0 has the same echo time)."""
    gtab = _gtab(np.r_[np.full(20, 1000.0), np.full(20, 2500.0)])
    plain = Protocol.from_gtab(gtab)
    echo = Protocol.from_gtab(gtab, echo_time=0.1)
    model = SpinverseModel(echo, fit_method="protocol_free", sigma=20.0)
    assert model.out_of_design == []
    assert sorted(round(s.b) for s in model.shells.shells) == [1000, 2500]
    signals, _ = TissuePrior().simulator(plain).sample(2, seed=0)
    reference = SpinverseModel(plain, fit_method="protocol_free", sigma=20.0)
    data = 1000.0 * signals
    fit, expected = model.fit(data), reference.fit(data)
    assert (fit.status == OK).all()
    np.testing.assert_array_equal(fit.cell_diameter, expected.cell_diameter)


def _b0(echo_time, timing=(0.01, 0.03), n=3):
    """``n`` b = 0 volumes of a PGSE ``timing`` in a spin echo of ``echo_time``."""
    waveforms = with_echo_times(pgse_waveforms(*timing, n), echo_time)
    return Protocol(waveforms, np.zeros(n), np.zeros((n, 3)))


def _echo_protocol(echo_b0=(True, True), b0_timing=(0.01, 0.03)):
    """Two b = 2500 shells of one PGSE timing (10, 30 ms) at echo times 80
    and 120 ms, each with (or without) its b = 0 volumes, of the PGSE
    timing ``b0_timing``."""
    parts = []
    for te, has_b0 in zip((0.08, 0.12), echo_b0, strict=True):
        parts.append(
            Protocol.from_gtab(_gtab(np.full(20, 2500.0), n_b0=0), echo_time=te)
        )
        if has_b0:
            parts.append(_b0(te, b0_timing))
    return Protocol.concatenate(*parts)


def test_each_echo_time_is_normalised_by_its_own_b0():
    """Two shells of one b and timing at two echo times, each with its
    b = 0 (even of another encoding timing): both read, each normalised by
    the b = 0 of its echo time."""
    for b0_timing in ((0.01, 0.03), (0.005, 0.02)):
        protocol = _echo_protocol(b0_timing=b0_timing)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the gate's per-sequence warning
            model = SpinverseModel(protocol, fit_method="protocol_free", sigma=20.0)
        assert model.out_of_design == []
        assert sorted(s.echo_time for s in model.shells.shells) == [0.08, 0.12]
        # T2 weighting: the b = 0 at 120 ms is half that at 80 ms; a voxel
        # whose every shell reads 0.3 of its own b = 0.
        echo = protocol.echo_times
        s0 = np.where(np.isclose(echo, 0.08), 1000.0, 500.0)
        data = np.where(protocol.bvals > 0, 0.3 * s0, s0)[None]
        normalised = model.shells.normalised(data)
        for shell in model.shells.shells:
            np.testing.assert_allclose(normalised[0, shell.rows], 0.3)


def test_an_echo_time_without_b0_is_named_with_its_timing():
    """A shell at an echo time with no b = 0: named with its timing and
    echo time (two b = 2500 shells read apart), and the fix offered is a
    b = 0 at that echo time."""
    protocol = _echo_protocol(echo_b0=(True, False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = SpinverseModel(protocol, fit_method="protocol_free", sigma=20.0)
    ((entry),) = model.out_of_design
    assert "b=2500 s/mm^2, delta=10 ms, Delta=30 ms, TE=120 ms" in entry, entry
    assert "no b = 0 volume at its echo time" in entry, entry
    assert [s.echo_time for s in model.shells.shells] == [0.08]
    # Neither with a b = 0: refused, saying what to acquire.
    protocol = _echo_protocol(echo_b0=(False, False))
    none = Protocol.concatenate(protocol, _b0(0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match="reads no shell") as info:
            SpinverseModel(none, fit_method="protocol_free", sigma=20.0)
    message = str(info.value)
    assert "TE=80 ms" in message and "TE=120 ms" in message, message
    assert "b = 0 volume at each echo time" in message, message


def test_the_fix_offered_for_pgse_without_echo_times_works():
    """Two PGSE timings, b = 0 volumes in one only, no echo time given:
    their echoes end with their encodings (40 and 70 ms), so the other
    timing has no b = 0 at its echo time. The message offers the scanner's
    one echo time, and that fix reads both shells."""
    bvals = np.r_[np.zeros(3), np.full(20, 1000.0), np.full(20, 2000.0)]
    dirs = fibonacci_sphere(20, hemisphere=True)
    gtab = gradient_table(
        bvals,
        bvecs=np.vstack([np.zeros((3, 3)), dirs, dirs]),
        small_delta=0.01,
        big_delta=np.r_[np.full(23, 0.03), np.full(20, 0.06)],
    )
    with pytest.warns(UserWarning, match="does not read these shells") as record:
        model = SpinverseModel(gtab, fit_method="protocol_free", sigma=20.0)
    # Not the gate's "normalised by the mean of all b=0 volumes": no shell
    # read here is.
    assert len(record) == 1
    ((entry),) = model.out_of_design
    assert "Delta=60 ms, TE=70 ms" in entry, entry
    assert "Protocol.from_gtab(gtab, echo_time=TE)" in entry, entry
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fix: nothing left to warn of
        fixed = SpinverseModel(
            Protocol.from_gtab(gtab, echo_time=0.1),
            fit_method="protocol_free",
            sigma=20.0,
        )
    assert fixed.out_of_design == []
    assert sorted(s.big_delta for s in fixed.shells.shells) == [0.03, 0.06]
