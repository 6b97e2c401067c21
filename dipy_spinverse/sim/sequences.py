"""Diffusion-encoding gradient waveforms and acquisition protocols.

Public API units follow DIPY: times in seconds, b-values in s/mm^2, gradient
directions as unit vectors. Internally the simulator works in micrometres and
microseconds; then b in us/um^2 is numerically equal to b in s/mm^2, times are
``seconds * 1e6`` and the gradient "rate" gamma * G is in rad/(um us).

A waveform is a normalised time profile f(t) in [-1, 1] on [0, TE], refocused
(its integral over [0, TE] is 0). The applied gradient is ``G * f(t) * g`` for a
unit direction g. With F(t) = int_0^t f, the waveform's b-factor is
``bfactor = int_0^TE F(t)^2 dt`` and ``b = (gamma G)^2 * bfactor``.
"""

import abc
from dataclasses import KW_ONLY, dataclass
from functools import cached_property

import numpy as np
from dipy.core.gradients import WATER_GYROMAGNETIC_RATIO, GradientTable

from ..checks import check_int

__all__ = [
    "Waveform",
    "PGSE",
    "DoublePGSE",
    "CosineOGSE",
    "SineOGSE",
    "PiecewiseConstant",
    "Protocol",
    "as_protocol",
    "check_bvals",
    "check_linear_encoding",
    "unit_rows",
    "BVALUE_RANGE",
    "GAMMA_UM_US",
    "UNIT_ATOL",
    "fibonacci_sphere",
    "published_protocol",
    "hcp_protocol",
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


def _readonly(arr):
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
        return _readonly(durations[keep]), _readonly(amplitudes[keep])

    @cached_property
    def _knots(self):
        """Piece boundaries (us) and the values of F there (us)."""
        durations, amplitudes = self.segments
        times = np.concatenate([[0.0], np.cumsum(durations)])
        values = np.concatenate([[0.0], np.cumsum(durations * amplitudes)])
        return _readonly(times), _readonly(values)

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


class _OGSE(Waveform):
    """Shared parts of oscillating-gradient spin echoes.

    Lobe 1 is ``p(2 pi n t / delta)`` on [0, delta] and lobe 2 is
    ``-p(2 pi n (t - Delta) / delta)`` on [Delta, Delta + delta], with p = cos or
    sin and n an integer number of periods per lobe.
    """

    _profile = None  # np.cos or np.sin, set by subclasses
    _closed_form_factor = None  # b = factor * delta^3 / (4 pi^2 n^2)

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

    small_delta: float
    big_delta: float
    n_periods: int
    _: KW_ONLY
    steps_per_period: int = 32

    _profile = staticmethod(np.cos)
    _closed_form_factor = 1.0

    def __post_init__(self):
        self._validate()

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

    small_delta: float
    big_delta: float
    n_periods: int
    _: KW_ONLY
    steps_per_period: int = 32

    _profile = staticmethod(np.sin)
    _closed_form_factor = 3.0

    def __post_init__(self):
        self._validate()


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


def _pgse_waveforms(small_delta, big_delta, n):
    """One PGSE per acquisition; equal timings share one instance."""
    small = _broadcast_timing(small_delta, "small_delta", n, max_s=_MAX_PULSE_S)
    big = _broadcast_timing(big_delta, "big_delta", n)
    cache = {}
    return tuple(
        cache.setdefault((d, big_d), PGSE(small_delta=d, big_delta=big_d))
        for d, big_d in zip(small.tolist(), big.tolist(), strict=True)
    )


def _broadcast_waveforms(waveforms, n):
    """Return a tuple of n waveforms from one waveform or a sequence of n."""
    if isinstance(waveforms, Waveform):
        return (waveforms,) * n
    waveforms = tuple(waveforms)
    if len(waveforms) != n:
        raise ValueError(
            f"waveforms has {len(waveforms)} entries but there are {n} "
            "acquisitions; give one waveform or one per acquisition"
        )
    return waveforms


def check_linear_encoding(btens, bvals):
    """Reject b-tensors that a single gradient direction cannot produce.

    Parameters
    ----------
    btens : ndarray, shape (N, 3, 3) or None
        ``gtab.btens``; None (DIPY's default, linear encoding) passes.
    bvals : ndarray, shape (N,)
        b-values, 0 for the b = 0 volumes (their b-tensor is not checked).
    """
    if btens is None:
        return
    btens = np.asarray(btens, dtype=np.float64)
    eigvals = np.linalg.eigvalsh(btens[bvals > 0])
    # A linear (rank-1) b-tensor has a single non-zero eigenvalue.
    if np.any(eigvals[:, 1] > 1e-3 * eigvals[:, 2]):
        raise ValueError(
            "gtab has planar or spherical b-tensors (btens); only linear "
            "encoding is supported (gradient_table(..., btens=None or 'LTE')). "
            "Protocol.from_gtab also takes waveform= with a suitable waveform "
            "per volume"
        )


def unit_rows(bvecs):
    """``bvecs`` (N, 3) with its non-zero rows normalised to unit length.

    DIPY accepts gradient directions within ``atol`` of unit length, as
    scanners write them; the simulator and the fits need unit vectors.
    """
    bvecs = np.array(bvecs, dtype=np.float64)
    norms = np.linalg.norm(bvecs, axis=1, keepdims=True)
    return np.divide(bvecs, norms, out=np.zeros_like(bvecs), where=norms > 0)


#: b-values (s/mm^2) of plausible diffusion-weighted shells: clinical shells
#: are 300-3,000, preclinical and ex vivo ones up to 20,000-30,000. A table
#: whose weighted shells all lie outside has its b-values in another unit:
#: s/m^2 (1 s/mm^2 = 1e6 s/m^2) above, ms/um^2 (1 ms/um^2 = 1,000 s/mm^2)
#: below.
BVALUE_RANGE = (50.0, 30_000.0)

#: Above this no b-value is in s/mm^2 (the strongest ex vivo gradients reach
#: about 1e5): a table with such volumes among plausible ones mixes units
#: (two acquisitions joined, one of them in s/m^2).
BVALUE_MAX = 1e6


def check_bvals(bvals, *, b0_threshold=0.0, name="gtab.bvals"):
    """b-values (s/mm^2) that can be fitted, as a float64 array.

    Parameters
    ----------
    bvals : array_like, shape (n,)
        b-values in s/mm^2.
    b0_threshold : float, optional
        b-values at or below it count as b = 0 (DIPY's ``gtab.b0_threshold``).
    name : str, optional
        Argument name used in error messages.

    Returns
    -------
    bvals : ndarray, shape (n,)

    Raises
    ------
    ValueError
        A negative or non-finite b-value, no diffusion-weighted volume
        (b > ``b0_threshold``), no diffusion-weighted shell within
        :data:`BVALUE_RANGE` (b-values in s/m^2 or ms/um^2), or b-values
        above :data:`BVALUE_MAX` beside plausible ones (mixed units), with
        the fix.
    """
    try:
        bvals = np.asarray(bvals, dtype=np.float64).ravel()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numbers in s/mm^2, got {bvals!r}") from err
    bad = ~np.isfinite(bvals) | (bvals < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} has a negative or non-finite b-value ({bvals[i]:g} at volume "
            f"{i}); b-values are >= 0 in s/mm^2. Fix the b-value file (DIPY would "
            "silently count a negative b as b = 0)."
        )
    low, high = BVALUE_RANGE
    weighted = bvals[bvals > b0_threshold]
    if weighted.size == 0:
        largest = float(bvals.max()) if bvals.size else 0.0
        hint = (
            " If your b-values are in ms/um^2 (1 ms/um^2 = 1,000 s/mm^2), multiply "
            "them by 1,000."
            if 0 < largest <= low
            else " Pass a table with at least one diffusion-weighted shell."
        )
        raise ValueError(
            f"{name} has no diffusion-weighted volume: every b-value is <= "
            f"b0_threshold {b0_threshold:g} s/mm^2 (largest {largest:g}); the "
            f"signal decay of diffusion-weighted volumes is what is fitted.{hint}"
        )
    if not np.any((weighted >= low) & (weighted <= high)):
        if weighted.min() > high:
            unit = (
                "these look like s/m^2 (1 s/mm^2 = 1e6 s/m^2): divide them by 1e6, "
                f"e.g. {weighted.min():g} s/m^2 = {weighted.min() * 1e-6:g} s/mm^2"
            )
        elif weighted.max() < low:
            unit = (
                "these look like ms/um^2 (1 ms/um^2 = 1,000 s/mm^2): multiply them "
                f"by 1,000, e.g. {weighted.max():g} ms/um^2 = "
                f"{weighted.max() * 1e3:g} s/mm^2"
            )
        else:
            unit = "check the unit of the b-value file"
        raise ValueError(
            f"{name} has no diffusion-weighted shell between {low:g} and {high:g} "
            f"s/mm^2 (weighted b-values {weighted.min():g} to {weighted.max():g}); "
            f"b-values must be in s/mm^2 (DIPY's unit): {unit}."
        )
    if weighted.max() > BVALUE_MAX:
        i = int(np.argmax(bvals))
        raise ValueError(
            f"{name} has b-values above {BVALUE_MAX:g} s/mm^2, which no scanner "
            f"reaches ({bvals[i]:g} at volume {i}), beside plausible ones: the "
            "table mixes units. Volumes in s/m^2 must be divided by 1e6 "
            f"(e.g. {bvals[i]:g} s/m^2 = {bvals[i] * 1e-6:g} s/mm^2)."
        )
    return bvals


_MISSING_TIMING = (
    "gtab.{name} is None: the simulator needs the gradient timing. Build the "
    "table with gradient_table(bvals, bvecs=bvecs, big_delta=..., "
    "small_delta=...) with times in seconds (e.g. big_delta=0.02, "
    "small_delta=0.01; scalars or one value per volume), or pass waveform= to "
    "Protocol.from_gtab"
)


@dataclass(frozen=True, eq=False)
class Protocol:
    """Ordered set of acquisitions (waveform, unit direction, b-value).

    Parameters
    ----------
    waveforms : sequence of Waveform
        One waveform per acquisition (length n).
    bvals : array_like, shape (n,)
        b-values in s/mm^2 (>= 0).
    bvecs : array_like, shape (n, 3)
        Gradient directions. Rows with b > 0 must have unit length within
        1e-3 (they are then normalised exactly); rows with b = 0 are ignored
        and stored as zeros.

    Notes
    -----
    The gradient amplitude of each acquisition follows from its b-value and
    its waveform's b-factor, see :attr:`gradient_rate`. Unlike DIPY's
    ``GradientTable``, slicing a Protocol also slices the timing.
    """

    waveforms: tuple
    bvals: np.ndarray
    bvecs: np.ndarray

    def __post_init__(self):
        waveforms = tuple(self.waveforms)
        for i, waveform in enumerate(waveforms):
            if not isinstance(waveform, Waveform):
                raise TypeError(
                    f"waveforms[{i}] is a {type(waveform).__name__}; expected a "
                    "Waveform such as PGSE(small_delta=..., big_delta=...)"
                )
        n = len(waveforms)
        bvals = self._checked_bvals(self.bvals, n)
        bvecs = self._checked_bvecs(self.bvecs, bvals)
        object.__setattr__(self, "waveforms", waveforms)
        object.__setattr__(self, "bvals", _readonly(bvals))
        object.__setattr__(self, "bvecs", _readonly(bvecs))
        for waveform, idx in self.groups():
            if waveform.bfactor_us3 <= 0 and np.any(bvals[idx] > 0):
                raise ValueError(
                    f"{waveform!r} has zero b-factor but is used with b > 0 "
                    f"(acquisitions {idx[bvals[idx] > 0].tolist()})"
                )

    @staticmethod
    def _checked_bvals(bvals, n):
        bvals = np.array(bvals, dtype=np.float64)
        if bvals.shape != (n,):
            raise ValueError(
                f"bvals has shape {bvals.shape} but there are {n} waveforms; "
                "give one b-value per acquisition"
            )
        if not np.all(np.isfinite(bvals) & (bvals >= 0)):
            raise ValueError("bvals must be finite and >= 0 (in s/mm^2)")
        return bvals

    @staticmethod
    def _checked_bvecs(bvecs, bvals):
        n = bvals.size
        bvecs = np.array(bvecs, dtype=np.float64)
        if bvecs.size == 0 and n == 0:
            bvecs = bvecs.reshape(0, 3)
        if bvecs.shape != (n, 3):
            hint = "; transpose it (bvecs.T)" if bvecs.shape == (3, n) else ""
            raise ValueError(f"bvecs must have shape ({n}, 3), got {bvecs.shape}{hint}")
        weighted = bvals > 0
        norms = np.linalg.norm(bvecs[weighted], axis=1)
        bad = ~(np.abs(norms - 1.0) <= UNIT_ATOL)
        if bad.any():
            i = int(np.flatnonzero(weighted)[bad][0])
            raise ValueError(
                f"bvecs[{i}] has length {norms[bad][0]:.6g}, but directions with "
                "b > 0 must be unit vectors (within 1e-3); normalise them with "
                "bvecs / np.linalg.norm(bvecs, axis=1, keepdims=True)"
            )
        out = np.zeros_like(bvecs)
        out[weighted] = bvecs[weighted] / norms[:, None]
        return out

    # -- constructors -------------------------------------------------------

    @classmethod
    def from_arrays(cls, bvals, bvecs, waveforms):
        """Build a protocol from b-values, directions and waveform(s).

        Parameters
        ----------
        bvals : array_like, shape (n,)
            b-values in s/mm^2.
        bvecs : array_like, shape (n, 3)
            Unit directions (ignored where b = 0).
        waveforms : Waveform or sequence of Waveform
            One waveform for all acquisitions, or one per acquisition.

        Returns
        -------
        protocol : Protocol
        """
        n = np.size(bvals)
        return cls(
            waveforms=_broadcast_waveforms(waveforms, n), bvals=bvals, bvecs=bvecs
        )

    @classmethod
    def pgse(cls, bvals, bvecs, *, small_delta, big_delta):
        """Build a PGSE protocol.

        Parameters
        ----------
        bvals : array_like, shape (n,)
            b-values in s/mm^2.
        bvecs : array_like, shape (n, 3)
            Unit directions (ignored where b = 0).
        small_delta, big_delta : float or array_like, shape (n,)
            Pulse duration and separation in seconds, scalars or one value per
            acquisition.

        Returns
        -------
        protocol : Protocol
        """
        n = np.size(bvals)
        return cls(
            waveforms=_pgse_waveforms(small_delta, big_delta, n),
            bvals=bvals,
            bvecs=bvecs,
        )

    @classmethod
    def from_gtab(cls, gtab, *, waveform=None):
        """Build a protocol from a DIPY gradient table.

        Parameters
        ----------
        gtab : dipy.core.gradients.GradientTable
            Table with ``big_delta`` and ``small_delta`` in seconds (scalars or
            one value per volume), unless ``waveform`` is given.
        waveform : Waveform or sequence of Waveform, optional
            Overrides the table's timing: one waveform for all volumes or one
            per volume.

        Returns
        -------
        protocol : Protocol
            One PGSE acquisition per volume (or the given waveforms).

        Notes
        -----
        b-values at or below ``gtab.b0_threshold`` are treated as b = 0, as
        DIPY does for ``gtab.b0s_mask``. Directions with b > 0 are renormalised,
        since DIPY accepts directions within ``atol`` of unit length. The
        b-values are checked by :func:`check_bvals`: none negative, at least
        one diffusion-weighted volume, and a shell in s/mm^2.
        """
        threshold = 0.0 if gtab.b0_threshold is None else gtab.b0_threshold
        bvals = check_bvals(gtab.bvals, b0_threshold=threshold)
        bvals = np.where(bvals <= threshold, 0.0, bvals)
        check_linear_encoding(gtab.btens, bvals)
        n = bvals.size
        if waveform is None:
            for name in ("big_delta", "small_delta"):
                if getattr(gtab, name) is None:
                    raise ValueError(_MISSING_TIMING.format(name=name))
            waveforms = _pgse_waveforms(gtab.small_delta, gtab.big_delta, n)
        else:
            waveforms = _broadcast_waveforms(waveform, n)
        # DIPY checked the directions against the table's own tolerance
        # (gradient_table's atol) when it built the table; only rows that
        # cannot be normalised are refused here.
        norms = np.linalg.norm(np.asarray(gtab.bvecs, dtype=np.float64), axis=1)
        bad = (bvals > 0) & ~(norms > 0)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"gtab.bvecs has no direction (|bvec| = {norms[first]:g}) for volume "
                f"{first}, whose b-value {bvals[first]:g} s/mm^2 is above "
                f"b0_threshold {threshold:g}; fix the b-vectors or the b-values."
            )
        bvecs = unit_rows(gtab.bvecs)
        return cls(waveforms=waveforms, bvals=bvals, bvecs=bvecs)

    @classmethod
    def concatenate(cls, *protocols):
        """Join protocols, in order, into one.

        Parameters
        ----------
        *protocols : Protocol
            At least one protocol.

        Returns
        -------
        protocol : Protocol
        """
        if not protocols:
            raise ValueError("concatenate needs at least one Protocol")
        for p in protocols:
            if not isinstance(p, Protocol):
                raise TypeError(
                    f"concatenate takes Protocol objects, got {type(p).__name__}"
                )
        return cls(
            waveforms=sum((p.waveforms for p in protocols), ()),
            bvals=np.concatenate([p.bvals for p in protocols]),
            bvecs=np.concatenate([p.bvecs for p in protocols]),
        )

    def __add__(self, other):
        if not isinstance(other, Protocol):
            return NotImplemented
        return Protocol.concatenate(self, other)

    # -- views --------------------------------------------------------------

    def __len__(self):
        return len(self.waveforms)

    @property
    def n_acquisitions(self):
        """Number of acquisitions."""
        return len(self.waveforms)

    def __getitem__(self, key):
        """Sub-protocol from an int, slice, index array or boolean mask.

        An int gives a protocol with one acquisition.
        """
        idx = np.atleast_1d(np.arange(len(self))[key])
        return Protocol(
            waveforms=tuple(self.waveforms[i] for i in idx),
            bvals=self.bvals[idx],
            bvecs=self.bvecs[idx],
        )

    def __repr__(self):
        if len(self) == 0:
            return "Protocol(n_acquisitions=0)"
        return (
            f"Protocol(n_acquisitions={len(self)}, "
            f"n_waveforms={len(self.groups())}, "
            f"b={self.bvals.min():g}..{self.bvals.max():g} s/mm^2)"
        )

    def groups(self):
        """Group acquisitions that share a waveform.

        Returns
        -------
        groups : list of (Waveform, ndarray of int)
            Each distinct waveform (by equality) with the indices of its
            acquisitions, in order of first appearance.
        """
        index = {}
        for i, waveform in enumerate(self.waveforms):
            index.setdefault(waveform, []).append(i)
        return [(w, np.asarray(idx, dtype=np.intp)) for w, idx in index.items()]

    def sequences(self):
        """The protocol's sequences in the package's one order.

        A sequence is the set of acquisitions sharing a waveform
        (:meth:`groups`). They are ranked by decreasing diffusion time (echo
        time for waveforms without one), ties in order of first appearance:
        rank 0 is the longest diffusion time. Curriculum stages, per-sequence
        S0 and reports all use this order.

        Returns
        -------
        sequences : list of (Waveform, ndarray of int)
        """

        def diffusion_time(group):
            waveform = group[0]
            t = waveform.diffusion_time
            return t if t is not None else waveform.echo_time

        return sorted(self.groups(), key=diffusion_time, reverse=True)

    @cached_property
    def _bfactors_us3(self):
        bfactors = np.empty(len(self))
        for waveform, idx in self.groups():
            bfactors[idx] = waveform.bfactor_us3
        return bfactors

    @cached_property
    def gradient_rate(self):
        """gamma G times the direction, in rad/(um us), shape (n, 3).

        Chosen so that ``|rate|^2 * waveform.bfactor_us3`` equals b (us/um^2,
        numerically s/mm^2) for the simulated, piecewise-constant waveform.
        """
        bfactors = self._bfactors_us3
        magnitude = np.sqrt(
            np.divide(
                self.bvals,
                bfactors,
                out=np.zeros(len(self)),
                where=self.bvals > 0,
            )
        )
        return _readonly(magnitude[:, None] * self.bvecs)

    @property
    def gradient_strength(self):
        """Gradient amplitude G in T/m, shape (n,)."""
        return np.linalg.norm(self.gradient_rate, axis=1) / GAMMA_UM_US

    @property
    def echo_times(self):
        """Echo time of each acquisition in seconds, shape (n,)."""
        return np.array([w.echo_time for w in self.waveforms], dtype=np.float64)


def as_protocol(protocol):
    """Return ``protocol`` as a :class:`Protocol`.

    Parameters
    ----------
    protocol : Protocol or dipy.core.gradients.GradientTable
        A protocol (returned as is) or a gradient table with timing
        (converted with :meth:`Protocol.from_gtab`).

    Returns
    -------
    protocol : Protocol
    """
    if isinstance(protocol, Protocol):
        return protocol
    if isinstance(protocol, GradientTable):
        return Protocol.from_gtab(protocol)
    raise TypeError(
        f"protocol must be a Protocol or a dipy GradientTable, got "
        f"{type(protocol).__name__}"
    )


def fibonacci_sphere(n, *, hemisphere=False):
    """Deterministic, evenly spread unit vectors (golden-angle spiral).

    Parameters
    ----------
    n : int
        Number of directions (>= 1).
    hemisphere : bool, optional
        Place all points on the z >= 0 hemisphere. Diffusion signal magnitudes
        are symmetric under g -> -g, so this spreads n directions better.

    Returns
    -------
    directions : ndarray, shape (n, 3)
    """
    n = check_int(n, "n", 1)
    i = np.arange(n) + 0.5
    z = 1.0 - i / n if hemisphere else 1.0 - 2.0 * i / n
    radius = np.sqrt(1.0 - z * z)
    golden_angle = np.pi * (3.0 - np.sqrt(5.0))
    phi = golden_angle * np.arange(n)
    return np.column_stack([radius * np.cos(phi), radius * np.sin(phi), z])


#: (small_delta, big_delta) in seconds of the published Spinverse protocol.
_PUBLISHED_TIMINGS = ((0.005, 0.006), (0.010, 0.020), (0.010, 0.060))
_PUBLISHED_BVALS = (0.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0)


def published_protocol(*, b0_per_direction=True, n_directions=30):
    """The PGSE protocol of the Spinverse paper.

    PGSE (delta, Delta) = (5, 6), (10, 20), (10, 60) ms; b = 0, 1000, ...,
    5000 s/mm^2; ``n_directions`` directions from :func:`fibonacci_sphere`
    per shell. Acquisitions are ordered by sequence, then b, then direction.

    Parameters
    ----------
    b0_per_direction : bool, optional
        Repeat the b = 0 acquisition once per direction, as in the paper
        (3 x 6 x 30 = 540 acquisitions). If False, one b = 0 per sequence
        (3 x (1 + 5 x 30) = 453).
    n_directions : int, optional
        Directions per shell.

    Returns
    -------
    protocol : Protocol
    """
    directions = fibonacci_sphere(n_directions)
    waveforms, bvals, bvecs = [], [], []
    for small_delta, big_delta in _PUBLISHED_TIMINGS:
        waveform = PGSE(small_delta=small_delta, big_delta=big_delta)
        for bval in _PUBLISHED_BVALS:
            dirs = directions if bval > 0 or b0_per_direction else np.zeros((1, 3))
            waveforms.extend([waveform] * len(dirs))
            bvals.extend([bval] * len(dirs))
            bvecs.append(dirs)
    return Protocol(waveforms=tuple(waveforms), bvals=bvals, bvecs=np.vstack(bvecs))


#: PGSE timing (small_delta, big_delta) in seconds of the WU-Minn HCP
#: diffusion protocol (Sotiropoulos et al. 2013, NeuroImage 80:125).
_HCP_TIMING = (0.0106, 0.0431)
_HCP_BVALS = (1000.0, 2000.0, 3000.0)


def _rotation_z(angle):
    """Rotation matrix by ``angle`` (radians) about the z axis."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def hcp_protocol(*, n_directions=90, n_b0=18):
    """The WU-Minn Human Connectome Project's diffusion protocol (PGSE).

    PGSE with the published timing of the HCP (Sotiropoulos et al. 2013,
    NeuroImage 80:125): delta = 10.6 ms, Delta = 43.1 ms (diffusion time
    Delta - delta / 3 = 39.6 ms); shells b = 1000, 2000, 3000 s/mm^2 of
    ``n_directions`` directions each and ``n_b0`` b = 0 volumes: 18 + 3 x 90
    = 288 acquisitions by default, the volumes of the HCP's released
    diffusion data.

    Parameters
    ----------
    n_directions : int, optional
        Directions per shell (>= 1).
    n_b0 : int, optional
        Number of b = 0 acquisitions (>= 0).

    Returns
    -------
    protocol : Protocol
        One :class:`PGSE` waveform for every acquisition. The weighted
        acquisitions come shell by shell (b = 1000, then 2000, then 3000),
        and the b = 0 ones are interspersed evenly among them: acquisition
        ``k * n // n_b0`` is the k-th b = 0 (n acquisitions in all), which
        is the first of every 16 by default (0, 16, ..., 272), as the HCP
        spread 6 b = 0 volumes over each run of 96.

    Notes
    -----
    What is reproduced: the nominal b-values, the number of volumes per
    shell and of b = 0 volumes, and the published PGSE timing, so that the
    simulated diffusion time and b-values are the HCP's. At b = 3000 the
    implied gradient amplitude is 97 mT/m, within the 100 mT/m of the HCP's
    Connectome Skyra.

    What is not: the scanner's gradient tables (the HCP's directions, with
    the three shells interleaved within each run, and b-values that differ
    slightly from the nominal ones), the order of its volumes, the
    acquisition of each table twice with opposite phase encoding (RL and
    LR; the 288 volumes here are one copy), and the details of its
    monopolar encoding: the lobes here are rectangular (no gradient ramps),
    and the echo time of the waveform is Delta + delta = 53.7 ms, not the
    scanner's 89.5 ms (which matters only for a T2 given to the simulator).

    The directions of each shell are :func:`fibonacci_sphere` ``(n_directions,
    hemisphere=True)``, evenly spread with g and -g counted as one (which
    the signal cannot tell apart), rotated about z by 0, 120 and 240
    degrees for the three shells: every shell has its own set, and together
    they cover the sphere more finely than one set repeated. The protocol is
    deterministic.

    All weighted acquisitions share one diffusion time, so
    :func:`~dipy_spinverse.reconst.plausibility.protocol_problems` reports
    that restriction, permeability and cell size trade off at it: with
    ``fit_method="search"``, :class:`~dipy_spinverse.reconst.SpinverseModel`
    warns and every fitted voxel has status ``UNDERDETERMINED``.
    ``fit_method="posterior"`` is the method for such a protocol: its
    calibrated intervals say what one diffusion time leaves open.

    Examples
    --------
    As a DIPY gradient table (:meth:`Protocol.from_gtab` reads it back):

    >>> from dipy.core.gradients import gradient_table
    >>> protocol = hcp_protocol()
    >>> len(protocol)
    288
    >>> gtab = gradient_table(protocol.bvals, bvecs=protocol.bvecs,
    ...                       small_delta=0.0106, big_delta=0.0431)
    """
    n_directions = check_int(n_directions, "n_directions", 1)
    n_b0 = check_int(n_b0, "n_b0", 0)
    base = fibonacci_sphere(n_directions, hemisphere=True)
    turns = np.arange(len(_HCP_BVALS)) * (2.0 * np.pi / len(_HCP_BVALS))
    weighted_bvecs = np.vstack([base @ _rotation_z(angle).T for angle in turns])
    weighted_bvals = np.repeat(_HCP_BVALS, n_directions)
    n = n_b0 + weighted_bvals.size
    is_b0 = np.zeros(n, dtype=bool)
    is_b0[np.arange(n_b0) * n // max(n_b0, 1)] = True
    bvals = np.zeros(n)
    bvals[~is_b0] = weighted_bvals
    bvecs = np.zeros((n, 3))
    bvecs[~is_b0] = weighted_bvecs
    small_delta, big_delta = _HCP_TIMING
    waveform = PGSE(small_delta=small_delta, big_delta=big_delta)
    return Protocol(waveforms=(waveform,) * n, bvals=bvals, bvecs=bvecs)
