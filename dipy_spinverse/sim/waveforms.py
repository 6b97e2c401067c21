"""Diffusion-encoding gradient waveforms: the time profile of one sequence.

Public API units follow DIPY: times in seconds. Internally the simulator
works in micrometres and microseconds; times are ``seconds * 1e6`` and the
gradient "rate" gamma * G is in rad/(um us).

A waveform is a normalised time profile f(t) in [-1, 1] on [0, TE], refocused
(its integral over [0, TE] is 0). The applied gradient is ``G * f(t) * g`` for a
unit direction g. With F(t) = int_0^t f, the waveform's b-factor is
``bfactor = int_0^TE F(t)^2 dt`` and ``b = (gamma G)^2 * bfactor``.
:mod:`.sequences` pairs waveforms with b-values and directions.
"""

import abc
from dataclasses import KW_ONLY, dataclass
from functools import cached_property

import numpy as np
from dipy.core.gradients import WATER_GYROMAGNETIC_RATIO

from ..checks import check_int

__all__ = [
    "Waveform",
    "PGSE",
    "DoublePGSE",
    "CosineOGSE",
    "SineOGSE",
    "PiecewiseConstant",
    "SpinEcho",
    "with_echo_times",
    "GAMMA_UM_US",
    "UNIT_ATOL",
    "readonly",
    "pgse_waveforms",
    "broadcast_waveforms",
]

#: gamma in rad/(T um us): rad/(s T) x 1e-6 (per us) x 1e-6 (per um).
GAMMA_UM_US = WATER_GYROMAGNETIC_RATIO * 1e-12
_S_TO_US = 1e6
# Gradient pulses longer than 1 s or sequence times longer than 10 s do not
# occur in diffusion MRI; such values are almost surely milliseconds.
_MAX_PULSE_S = 1.0
_MAX_TIME_S = 10.0
_ANTISYMMETRY_RTOL = 1e-12
_REFOCUS_RTOL = 1e-9
#: How far from unit length a direction with b > 0 may be (then normalised).
UNIT_ATOL = 1e-3


def _check_seconds(value, name, *, allow_zero=False, max_s=_MAX_TIME_S):
    """Validate a time (or array of times) given in seconds.

    Parameters
    ----------
    value : float or array_like
        Time(s) in seconds.
    name : str
        Argument name used in error messages.
    allow_zero : bool, optional
        Accept 0 (e.g. a mixing time).
    max_s : float, optional
        Largest plausible value; larger ones are reported as milliseconds.

    Returns
    -------
    values : float or ndarray
        ``float`` for scalar input, float64 array otherwise.
    """
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number in seconds, got {value!r}") from err
    flat = arr.ravel()
    bad = ~np.isfinite(flat) | ((flat < 0) if allow_zero else (flat <= 0))
    if bad.any():
        need = "non-negative" if allow_zero else "positive"
        value = float(flat[bad][0])  # 0.0, not np.float64(0.0)
        raise ValueError(
            f"{name} must be finite and {need} (in seconds), got {value!r}"
        )
    if (flat > max_s).any():
        big = float(flat[flat > max_s][0])
        for unit, symbol, factor in (("milli", "ms", 1e-3), ("micro", "us", 1e-6)):
            if big * factor <= max_s:
                raise ValueError(
                    f"{name}={big:g} looks like {unit}seconds; times are in "
                    f"seconds (e.g. {name}={big * factor:g} for {big:g} {symbol})"
                )
        raise ValueError(
            f"{name}={big:g} is not a time in seconds (at most {max_s:g} s here)"
        )
    return float(arr) if arr.ndim == 0 else arr


def readonly(arr):
    arr = np.array(arr, dtype=np.float64)
    arr.flags.writeable = False
    return arr


def _merge_equal_pieces(durations, amplitudes, atol):
    """Merge adjacent pieces whose amplitudes agree within ``atol``.

    Splitting a piece in two does not change the waveform, so comparisons
    between waveforms are made on this canonical form.
    """
    starts = np.flatnonzero(np.r_[True, np.abs(np.diff(amplitudes)) > atol])
    return np.add.reduceat(durations, starts), amplitudes[starts]


class Waveform(abc.ABC):
    """Normalised, refocused gradient time profile (abstract base).

    Subclasses are frozen dataclasses (hashable, so a :class:`Protocol` can
    group acquisitions by waveform) and implement :meth:`_pieces`. Everything
    else derives from the piecewise-constant representation :attr:`segments`,
    which is exactly what the simulator integrates.
    """

    @abc.abstractmethod
    def _pieces(self):
        """Return ``(durations_s, amplitudes)`` sequences of the pieces."""

    @cached_property
    def segments(self):
        """Piecewise-constant representation ``(durations_us, amplitudes)``.

        Two read-only 1-D float64 arrays; durations are in microseconds and
        strictly positive, amplitudes in [-1, 1] (0 for gaps).
        """
        durations, amplitudes = self._pieces()
        durations = np.asarray(durations, dtype=np.float64) * _S_TO_US
        amplitudes = np.asarray(amplitudes, dtype=np.float64)
        # Zero-length pieces (e.g. no gap when big_delta == small_delta) carry
        # nothing and would make the knots of F non-increasing.
        keep = durations > 0
        return readonly(durations[keep]), readonly(amplitudes[keep])

    @cached_property
    def _knots(self):
        """Piece boundaries (us) and the values of F there (us)."""
        durations, amplitudes = self.segments
        times = np.concatenate([[0.0], np.cumsum(durations)])
        values = np.concatenate([[0.0], np.cumsum(durations * amplitudes)])
        return readonly(times), readonly(values)

    @property
    def echo_time_us(self):
        """Echo time in us: the end of the last piece."""
        return float(self._knots[0][-1])

    @property
    def echo_time(self):
        """Echo time in seconds (end of the last lobe)."""
        return self.echo_time_us / _S_TO_US

    @cached_property
    def bfactor_us3(self):
        """Exact int_0^TE F(t)^2 dt of the piecewise representation, in us^3.

        F is linear on each piece, from F0 to F1 over a duration h, where the
        integral of F^2 is h (F0^2 + F0 F1 + F1^2) / 3.
        """
        durations = self.segments[0]
        values = self._knots[1]
        f0, f1 = values[:-1], values[1:]
        return float(np.sum(durations * (f0 * f0 + f0 * f1 + f1 * f1)) / 3.0)

    @property
    def closed_form_bfactor_us3(self):
        """b-factor of the continuous waveform, in us^3.

        Equal to :attr:`bfactor_us3` unless the waveform is smooth and had to
        be discretised (OGSE).
        """
        return self.bfactor_us3

    @property
    def diffusion_time(self):
        """Effective diffusion time in seconds, or None where not defined."""
        return None

    @cached_property
    def is_antisymmetric(self):
        """Whether f(TE - t) = -f(t), checked on :attr:`segments`.

        The simulator uses this to compute the second half of the sequence
        from the first.
        """
        durations, amplitudes = self.segments
        amp_tol = _ANTISYMMETRY_RTOL * float(np.abs(amplitudes).max())
        durations, amplitudes = _merge_equal_pieces(durations, amplitudes, amp_tol)
        time_tol = _ANTISYMMETRY_RTOL * self.echo_time_us
        return bool(
            np.allclose(durations[::-1], durations, rtol=0, atol=time_tol)
            and np.allclose(amplitudes[::-1], -amplitudes, rtol=0, atol=amp_tol)
        )

    def F_at(self, t_us):
        """Evaluate F(t) = int_0^t f at times in microseconds (vectorised).

        F is piecewise linear; it is 0 before the sequence and held at its
        final value (0 up to rounding) after the echo time.

        Parameters
        ----------
        t_us : float or array_like
            Times in us.

        Returns
        -------
        F : float or ndarray
            F(t) in us, same shape as ``t_us``.
        """
        times, values = self._knots
        result = np.interp(np.asarray(t_us, dtype=np.float64), times, values)
        return float(result) if result.ndim == 0 else result


def _check_lobes(small_delta, big_delta):
    """Validate PGSE-like lobe timing; return both as floats (seconds)."""
    small_delta = _check_seconds(small_delta, "small_delta", max_s=_MAX_PULSE_S)
    big_delta = _check_seconds(big_delta, "big_delta")
    if np.ndim(small_delta) or np.ndim(big_delta):
        raise ValueError("small_delta and big_delta must be scalars for a waveform")
    if big_delta < small_delta:
        raise ValueError(
            f"big_delta ({big_delta:g} s) must be >= small_delta "
            f"({small_delta:g} s): the second lobe starts at big_delta, after the "
            "first one ends"
        )
    return small_delta, big_delta


@dataclass(frozen=True)
class PGSE(Waveform):
    """Pulsed-gradient spin echo (Stejskal-Tanner), rectangular lobes.

    f = +1 on [0, delta], -1 on [Delta, Delta + delta] (the 180 degree pulse is
    folded into the sign); TE = Delta + delta.

    Parameters
    ----------
    small_delta : float
        Pulse duration delta in seconds.
    big_delta : float
        Time between the starts of the two pulses, Delta >= delta, in seconds.
    """

    small_delta: float
    big_delta: float

    def __post_init__(self):
        small_delta, big_delta = _check_lobes(self.small_delta, self.big_delta)
        object.__setattr__(self, "small_delta", small_delta)
        object.__setattr__(self, "big_delta", big_delta)

    def _pieces(self):
        d, big_d = self.small_delta, self.big_delta
        return (d, big_d - d, d), (1.0, 0.0, -1.0)

    @property
    def closed_form_bfactor_us3(self):
        """delta^2 (Delta - delta / 3), in us^3."""
        d, big_d = self.small_delta * _S_TO_US, self.big_delta * _S_TO_US
        return d * d * (big_d - d / 3.0)

    @property
    def diffusion_time(self):
        """Delta - delta / 3, in seconds."""
        return self.big_delta - self.small_delta / 3.0


@dataclass(frozen=True)
class DoublePGSE(Waveform):
    """Two identical PGSE blocks along the same direction.

    The second block starts ``mixing_time`` after the end of the first, so
    TE = 2 (Delta + delta) + mixing_time and b is twice the PGSE b.

    Parameters
    ----------
    small_delta : float
        Pulse duration in seconds.
    big_delta : float
        Pulse separation within each block (Delta >= delta), in seconds.
    mixing_time : float
        Gap between the blocks (>= 0), in seconds.
    """

    small_delta: float
    big_delta: float
    mixing_time: float

    def __post_init__(self):
        small_delta, big_delta = _check_lobes(self.small_delta, self.big_delta)
        mixing_time = _check_seconds(self.mixing_time, "mixing_time", allow_zero=True)
        object.__setattr__(self, "small_delta", small_delta)
        object.__setattr__(self, "big_delta", big_delta)
        object.__setattr__(self, "mixing_time", mixing_time)

    def _pieces(self):
        d, big_d = self.small_delta, self.big_delta
        block_d, block_a = (d, big_d - d, d), (1.0, 0.0, -1.0)
        return (
            block_d + (self.mixing_time,) + block_d,
            block_a + (0.0,) + block_a,
        )

    @property
    def closed_form_bfactor_us3(self):
        """2 delta^2 (Delta - delta / 3), in us^3 (F is 0 between blocks)."""
        d, big_d = self.small_delta * _S_TO_US, self.big_delta * _S_TO_US
        return 2.0 * d * d * (big_d - d / 3.0)

    @property
    def diffusion_time(self):
        """Delta - delta / 3 of each block, in seconds."""
        return self.big_delta - self.small_delta / 3.0


@dataclass(frozen=True)
class _OGSE(Waveform):
    """Shared parts of oscillating-gradient spin echoes: their fields and
    checks (the subclasses' Parameters).

    Lobe 1 is ``p(2 pi n t / delta)`` on [0, delta] and lobe 2 is
    ``-p(2 pi n (t - Delta) / delta)`` on [Delta, Delta + delta], with p = cos or
    sin and n an integer number of periods per lobe.
    """

    small_delta: float
    big_delta: float
    n_periods: int
    _: KW_ONLY
    steps_per_period: int = 32

    _profile = None  # np.cos or np.sin, set by subclasses
    _closed_form_factor = None  # b = factor * delta^3 / (4 pi^2 n^2)

    def __post_init__(self):
        self._validate()

    def _validate(self):
        small_delta, big_delta = _check_lobes(self.small_delta, self.big_delta)
        object.__setattr__(self, "small_delta", small_delta)
        object.__setattr__(self, "big_delta", big_delta)
        object.__setattr__(self, "n_periods", check_int(self.n_periods, "n_periods", 1))
        # Fewer than 4 pieces per period can average a cosine lobe to zero.
        object.__setattr__(
            self,
            "steps_per_period",
            check_int(self.steps_per_period, "steps_per_period", 4),
        )

    def _lobe_means(self):
        """Mean of the profile over each piece of lobe 1 (exact integral).

        The mean of p(w t) over [a, a + h] is p(w (a + h / 2)) sinc(w h / 2), and
        here w h = 2 pi / steps_per_period; one period is tiled n times so every
        period is bit-identical.
        """
        steps = self.steps_per_period
        phase = 2.0 * np.pi * (np.arange(steps) + 0.5) / steps
        period = self._profile(phase) * np.sinc(1.0 / steps)
        return np.tile(period, self.n_periods)

    def _pieces(self):
        n_pieces = self.n_periods * self.steps_per_period
        lobe = self._lobe_means()
        piece = np.full(n_pieces, self.small_delta / n_pieces)
        gap = self.big_delta - self.small_delta
        return (
            np.concatenate([piece, [gap], piece]),
            np.concatenate([lobe, [0.0], -lobe]),
        )

    @property
    def frequency(self):
        """Oscillation frequency n / delta in Hz."""
        return self.n_periods / self.small_delta

    @property
    def closed_form_bfactor_us3(self):
        """b-factor of the continuous waveform, in us^3.

        :attr:`bfactor_us3` converges to it as O(1 / steps_per_period^2).
        """
        d = self.small_delta * _S_TO_US
        return self._closed_form_factor * d**3 / (4.0 * np.pi**2 * self.n_periods**2)


@dataclass(frozen=True)
class CosineOGSE(_OGSE):
    """Cosine oscillating-gradient spin echo.

    Lobe 1 is cos(2 pi n t / delta) on [0, delta]; lobe 2 is its negative
    shifted by Delta. Closed form b = gamma^2 G^2 delta^3 / (4 pi^2 n^2).

    Parameters
    ----------
    small_delta : float
        Duration of each oscillating lobe, in seconds.
    big_delta : float
        Time between the starts of the two lobes (>= small_delta), in seconds.
    n_periods : int
        Number of periods per lobe (>= 1).
    steps_per_period : int, optional
        Constant pieces per period in :attr:`segments` (>= 4); each carries the
        mean of the cosine over the piece.
    """

    _profile = staticmethod(np.cos)
    _closed_form_factor = 1.0

    @property
    def diffusion_time(self):
        """Effective diffusion time delta / (4 n) in seconds (Does et al. 2003)."""
        return self.small_delta / (4.0 * self.n_periods)


@dataclass(frozen=True)
class SineOGSE(_OGSE):
    """Sine oscillating-gradient spin echo.

    Lobe 1 is sin(2 pi n t / delta) on [0, delta]; lobe 2 is its negative
    shifted by Delta. Closed form b = 3 gamma^2 G^2 delta^3 / (4 pi^2 n^2).
    Unlike the cosine version this waveform is time-symmetric,
    f(TE - t) = +f(t), so :attr:`is_antisymmetric` is False.

    Parameters
    ----------
    small_delta : float
        Duration of each oscillating lobe, in seconds.
    big_delta : float
        Time between the starts of the two lobes (>= small_delta), in seconds.
    n_periods : int
        Number of periods per lobe (>= 1).
    steps_per_period : int, optional
        Constant pieces per period in :attr:`segments` (>= 4); each carries the
        mean of the sine over the piece.
    """

    _profile = staticmethod(np.sin)
    _closed_form_factor = 3.0


@dataclass(frozen=True)
class PiecewiseConstant(Waveform):
    """Arbitrary piecewise-constant, refocused waveform.

    Parameters
    ----------
    durations : sequence of float
        Durations of the pieces in seconds (positive).
    amplitudes : sequence of float
        Normalised amplitude of each piece, in [-1, 1].

    Notes
    -----
    The waveform must be refocused: ``|sum(durations * amplitudes)|`` may not
    exceed 1e-9 times the echo time ``sum(durations)``. Both fields are
    stored as tuples of floats so the waveform stays hashable.
    """

    durations: tuple
    amplitudes: tuple

    def __post_init__(self):
        durations = np.atleast_1d(_check_seconds(self.durations, "durations"))
        amplitudes = np.asarray(self.amplitudes, dtype=np.float64)
        if (
            durations.ndim != 1
            or durations.size == 0
            or (durations.shape != amplitudes.shape)
        ):
            raise ValueError(
                "durations and amplitudes must be non-empty 1-D sequences of the "
                f"same length, got shapes {durations.shape} and {amplitudes.shape}"
            )
        if durations.sum() > _MAX_TIME_S:
            _check_seconds(durations.sum(), "sum(durations)")
        if not np.all(np.abs(amplitudes) <= 1.0):
            raise ValueError(
                "amplitudes must be finite and within [-1, 1]; scale the waveform "
                "so that its largest |amplitude| is 1 (the b-value sets G)"
            )
        _check_refocused(durations, amplitudes)
        object.__setattr__(self, "durations", tuple(durations.tolist()))
        object.__setattr__(self, "amplitudes", tuple(amplitudes.tolist()))

    def _pieces(self):
        return self.durations, self.amplitudes


@dataclass(frozen=True)
class SpinEcho(Waveform):
    """A diffusion encoding inside a spin echo of a longer echo time.

    A scanner's echo time is longer than its encoding: the gradients sit
    symmetrically about the refocusing pulse, and water relaxes before the
    first lobe and after the last. ``SpinEcho(encoding, echo_time)`` is
    ``encoding`` with ``(echo_time - encoding.echo_time) / 2`` without
    gradient before it and after it: the same b-value and diffusion time,
    and an antisymmetric encoding stays antisymmetric. With one T2 the b = 0
    signal is ``exp(-echo_time / T2)``; with a T2 per compartment
    (``simulate(..., t2=per_cell)``) the compartments are weighted by their
    own decay over the whole echo time, exchange included.

    Parameters
    ----------
    encoding : Waveform
        The gradient waveform (not itself a ``SpinEcho``).
    echo_time : float
        Echo time in seconds, at least ``encoding.echo_time``.
    """

    encoding: Waveform
    # A field with a default: it then shadows the base class's echo_time
    # property (a property has no setter for the dataclass to use).
    echo_time: float = None

    def __post_init__(self):
        if self.echo_time is None:
            raise ValueError("SpinEcho needs echo_time, in seconds.")
        if not isinstance(self.encoding, Waveform) or isinstance(
            self.encoding, SpinEcho
        ):
            raise ValueError(
                f"encoding must be a gradient waveform (PGSE, ...), not "
                f"{type(self.encoding).__name__}."
            )
        echo_time = _check_seconds(self.echo_time, "echo_time")
        if echo_time < self.encoding.echo_time * (1 - 1e-9):
            raise ValueError(
                f"echo_time ({echo_time:g} s) must be at least the encoding's "
                f"end, {self.encoding.echo_time:g} s (big_delta + small_delta "
                "for a PGSE); check its units (seconds) and the timing."
            )
        object.__setattr__(self, "echo_time", max(echo_time, self.encoding.echo_time))

    def _pieces(self):
        pad = 0.5 * (self.echo_time - self.encoding.echo_time)
        durations, amplitudes = self.encoding._pieces()
        return (pad, *durations, pad), (0.0, *amplitudes, 0.0)

    @property
    def closed_form_bfactor_us3(self):
        """The encoding's (no gradient while F is 0)."""
        return self.encoding.closed_form_bfactor_us3

    @property
    def diffusion_time(self):
        """The encoding's, in seconds."""
        return self.encoding.diffusion_time

    def __getattr__(self, name):
        # small_delta, big_delta, ...: the encoding's timing.
        if name.startswith("_") or name == "encoding":
            raise AttributeError(name)
        return getattr(self.encoding, name)


def with_echo_times(waveforms, echo_time):
    """Waveforms in spin echoes of ``echo_time``.

    Parameters
    ----------
    waveforms : sequence of Waveform
    echo_time : float or array_like or None
        Seconds: one for all, or one per waveform; ``None`` leaves the
        waveforms as they are.

    Returns
    -------
    tuple of Waveform
    """
    waveforms = tuple(waveforms)
    if echo_time is None:
        return waveforms
    times = np.atleast_1d(_check_seconds(echo_time, "echo_time"))
    if times.ndim != 1 or times.size not in (1, len(waveforms)):
        raise ValueError(
            f"echo_time has {times.size} values for {len(waveforms)} volumes; "
            "give one echo time (seconds) or one per volume."
        )
    times = np.broadcast_to(times, (len(waveforms),))
    return tuple(SpinEcho(w, float(t)) for w, t in zip(waveforms, times, strict=True))


def _check_refocused(durations, amplitudes):
    """Raise ValueError unless int f = sum(durations * amplitudes) is ~0."""
    moment = float(np.dot(durations, amplitudes))
    echo_time = float(durations.sum())
    if abs(moment) > _REFOCUS_RTOL * echo_time:
        raise ValueError(
            f"amplitudes are not refocused: sum(durations * amplitudes) = "
            f"{moment:.3g} s, but it must be 0 (within {_REFOCUS_RTOL:g} x TE) so "
            "that the spins are rephased at the echo; include the sign flip of "
            "the refocusing pulse in the amplitudes"
        )


def _broadcast_timing(values, name, n, *, max_s=_MAX_TIME_S):
    """Check a scalar or per-acquisition timing array and broadcast it to (n,)."""
    values = np.atleast_1d(_check_seconds(values, name, max_s=max_s))
    if values.ndim != 1 or values.size not in (1, n):
        raise ValueError(
            f"{name} has shape {values.shape}, but there are {n} acquisitions; "
            "give a scalar or one value per acquisition"
        )
    return np.broadcast_to(values, (n,))


def pgse_waveforms(small_delta, big_delta, n):
    """One PGSE per acquisition; equal timings share one instance.

    Parameters
    ----------
    small_delta : float or array_like (n,)
        Pulse duration(s), s.
    big_delta : float or array_like (n,)
        Pulse separation(s), s.
    n : int
        The number of acquisitions.

    Returns
    -------
    tuple of PGSE
        ``n`` waveforms.

    Raises
    ------
    ValueError
        If a timing is not a valid time or not one value or ``n`` values.
    """
    small = _broadcast_timing(small_delta, "small_delta", n, max_s=_MAX_PULSE_S)
    big = _broadcast_timing(big_delta, "big_delta", n)
    cache = {}
    return tuple(
        cache.setdefault((d, big_d), PGSE(small_delta=d, big_delta=big_d))
        for d, big_d in zip(small.tolist(), big.tolist(), strict=True)
    )


def broadcast_waveforms(waveforms, n):
    """Return a tuple of n waveforms from one waveform or a sequence of n.

    Parameters
    ----------
    waveforms : Waveform or sequence of Waveform
        One waveform for all acquisitions, or one per acquisition.
    n : int
        The number of acquisitions.

    Returns
    -------
    tuple of Waveform
        ``n`` waveforms.

    Raises
    ------
    ValueError
        If a sequence does not hold ``n`` waveforms.
    """
    if isinstance(waveforms, Waveform):
        return (waveforms,) * n
    waveforms = tuple(waveforms)
    if len(waveforms) != n:
        raise ValueError(
            f"waveforms has {len(waveforms)} entries but there are {n} "
            "acquisitions; give one waveform or one per acquisition"
        )
    return waveforms
