"""Steady-state signals of clinical MR sequences, differentiable in torch.

Each sequence is a small frozen dataclass holding its timing (seconds) and
flip angles (degrees); ``sequence.signal(t1, t2, pd)`` returns the signal of
tissue with those relaxation times (seconds) and proton density, as a torch
tensor that back-propagates to ``t1``, ``t2`` and ``pd``. The formulas assume
ideal RF pulses and ideal spoiling (no transverse coherence survives to the
next excitation) and are checked against a Bloch simulation in
``tests/test_tissue.py``.

Signals are *signed*: the transverse magnetisation just after the read-out
pulse, which is negative when the longitudinal magnetisation has not yet
recovered through zero after an inversion. Scanners usually store the
magnitude; :class:`~dipy_spinverse.tissue.model.TissueMapModel` takes the
magnitude of the (partial-volume) sum itself.

``exp(-te / t2)`` is the transverse decay at the echo: ``t2`` is T2 for spin
echoes and stands for T2* in gradient echoes (as in the formula of the
issue; give T2* values there if they matter).
"""

import dataclasses
import math

import torch

from ..checks import (
    check_choice,
    check_int,
    check_number,
    check_seconds,
)

__all__ = [
    "Flash",
    "SpinEcho",
    "InversionRecovery",
    "Mprage",
    "SEQUENCES",
    "sequence_from_string",
    "kspace_sample",
]


def _as_tensors(*values):
    """Tensors of one floating dtype and device (float64 unless given)."""
    tensors = [v for v in values if torch.is_tensor(v)]
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
    dtype = dtype or torch.float64
    device = tensors[0].device if tensors else None
    return [torch.as_tensor(v, dtype=dtype, device=device) for v in values]


def _recovery(t, t1):
    """``exp(-t / t1)``, the fraction of longitudinal magnetisation not yet
    recovered after ``t`` seconds."""
    return torch.exp(-t / t1)


# Longest plausible timings (s): echo times stay well below a second,
# repetition, inversion times and echo spacings below 15 s (CSF's T1 is
# about 4 s).
_MAX_TIMING = {"te": 1.0, "tr": 15.0, "ti": 15.0, "echo_spacing": 15.0}


def _timing(value, name, example):
    return check_seconds(value, name, example, _MAX_TIMING[name])


def _angle(value, name):
    return check_number(value, name, minimum=0, maximum=180, hint=" (degrees, e.g. 30)")


@dataclasses.dataclass(frozen=True)
class Flash:
    """Spoiled gradient echo (FLASH, SPGR) in its steady state.

    ``pd * sin(a) * (1 - E1) / (1 - cos(a) * E1) * exp(-te / t2)`` with
    ``E1 = exp(-tr / t1)`` (the Ernst formula).

    Parameters
    ----------
    tr : float
        Repetition time, seconds (e.g. 0.02).
    te : float
        Echo time, seconds (< tr).
    flip_angle : float
        Flip angle, degrees.
    """

    tr: float
    te: float
    flip_angle: float

    def __post_init__(self):
        object.__setattr__(self, "tr", _timing(self.tr, "tr", 0.02))
        object.__setattr__(self, "te", _timing(self.te, "te", 0.004))
        object.__setattr__(self, "flip_angle", _angle(self.flip_angle, "flip_angle"))
        if self.te >= self.tr:
            raise ValueError(
                f"te must be shorter than tr, got te={self.te:g} s, tr={self.tr:g} s."
            )

    def signal(self, t1, t2, pd):
        """Steady-state signal of tissue (t1, t2 in seconds; pd)."""
        t1, t2, pd = _as_tensors(t1, t2, pd)
        alpha = math.radians(self.flip_angle)
        e1 = _recovery(self.tr, t1)
        steady = math.sin(alpha) * (1 - e1) / (1 - math.cos(alpha) * e1)
        return pd * steady * torch.exp(-self.te / t2)


@dataclasses.dataclass(frozen=True)
class SpinEcho:
    """Spin echo (90-180) repeated every ``tr``, spoiled before each 90.

    ``pd * (1 - 2 exp(-(tr - te/2) / t1) + exp(-tr / t1)) * exp(-te / t2)``:
    the 180 at ``te/2`` inverts what recovered since the 90.

    Parameters
    ----------
    tr : float
        Repetition time, seconds (e.g. 3.0).
    te : float
        Echo time, seconds (< tr).
    """

    tr: float
    te: float

    def __post_init__(self):
        object.__setattr__(self, "tr", _timing(self.tr, "tr", 3.0))
        object.__setattr__(self, "te", _timing(self.te, "te", 0.1))
        if self.te >= self.tr:
            raise ValueError(
                f"te must be shorter than tr, got te={self.te:g} s, tr={self.tr:g} s."
            )

    def signal(self, t1, t2, pd):
        """Steady-state signal of tissue (t1, t2 in seconds; pd)."""
        t1, t2, pd = _as_tensors(t1, t2, pd)
        recovered = (
            1 - 2 * _recovery(self.tr - self.te / 2, t1) + _recovery(self.tr, t1)
        )
        return pd * recovered * torch.exp(-self.te / t2)


@dataclasses.dataclass(frozen=True)
class InversionRecovery:
    """Inversion recovery: 180, wait ``ti``, 90 read-out; repeated every ``tr``.

    ``pd * (1 - 2 exp(-ti / t1) + exp(-tr / t1)) * exp(-te / t2)`` (the
    read-out 90 saturates, so the next inversion starts from what recovered
    in ``tr - ti``). Signed: negative for tissue still before its null.

    Parameters
    ----------
    ti : float
        Inversion time, seconds (e.g. 0.9).
    tr : float
        Repetition time, seconds (> ti).
    te : float
        Echo time of the read-out, seconds.
    """

    ti: float
    tr: float
    te: float

    def __post_init__(self):
        object.__setattr__(self, "ti", _timing(self.ti, "ti", 0.9))
        object.__setattr__(self, "tr", _timing(self.tr, "tr", 2.3))
        object.__setattr__(self, "te", _timing(self.te, "te", 0.003))
        if self.ti + self.te >= self.tr:
            raise ValueError(
                f"ti + te must be shorter than tr, got ti={self.ti:g} s, "
                f"te={self.te:g} s, tr={self.tr:g} s."
            )

    def signal(self, t1, t2, pd):
        """Steady-state signal of tissue (t1, t2 in seconds; pd)."""
        t1, t2, pd = _as_tensors(t1, t2, pd)
        recovered = 1 - 2 * _recovery(self.ti, t1) + _recovery(self.tr, t1)
        return pd * recovered * torch.exp(-self.te / t2)


@dataclasses.dataclass(frozen=True)
class Mprage:
    """MPRAGE-like: inversion, then a train of spoiled low-angle read-outs.

    Each cycle of length ``tr`` (the inversion-to-inversion time) is: an
    ideal inversion; a delay; ``n_echoes`` pulses of ``flip_angle`` every
    ``echo_spacing``, the transverse magnetisation spoiled between them; a
    delay to the next inversion. ``ti`` is the time from the inversion to the
    pulse of the centre of k-space (pulse ``n_echoes // 2``, linear
    ordering). The longitudinal magnetisation is an affine map of its value
    one step earlier, so the steady state and the signal of the centre pulse
    follow in closed form (geometric series over the train).

    Parameters
    ----------
    ti : float
        Inversion to k-space-centre time, seconds (e.g. 0.9).
    tr : float
        Inversion repetition time, seconds (e.g. 2.3).
    te : float
        Echo time of each read-out, seconds.
    flip_angle : float
        Read-out flip angle, degrees (e.g. 9).
    echo_spacing : float
        Time between read-out pulses, seconds (e.g. 0.007).
    n_echoes : int
        Read-out pulses per inversion (e.g. 160).
    """

    ti: float
    tr: float
    te: float
    flip_angle: float = 9.0
    echo_spacing: float = 0.007
    n_echoes: int = 160

    def __post_init__(self):
        object.__setattr__(self, "ti", _timing(self.ti, "ti", 0.9))
        object.__setattr__(self, "tr", _timing(self.tr, "tr", 2.3))
        object.__setattr__(self, "te", _timing(self.te, "te", 0.003))
        object.__setattr__(self, "flip_angle", _angle(self.flip_angle, "flip_angle"))
        spacing = _timing(self.echo_spacing, "echo_spacing", 0.007)
        object.__setattr__(self, "echo_spacing", spacing)
        object.__setattr__(self, "n_echoes", check_int(self.n_echoes, "n_echoes", 1))
        if self.te >= self.echo_spacing:
            raise ValueError(
                f"te must be shorter than echo_spacing, got te={self.te:g} s, "
                f"echo_spacing={self.echo_spacing:g} s."
            )
        if self.delay_before_train <= 0:
            raise ValueError(
                f"ti={self.ti:g} s leaves no time before the read-out train: the "
                f"centre pulse is {self.n_echoes // 2} x echo_spacing into it; "
                f"use ti > {self.n_echoes // 2 * self.echo_spacing:g} s."
            )
        if self.delay_after_train < 0:
            raise ValueError(
                f"tr={self.tr:g} s is shorter than the inversion, the delay and "
                f"the read-out train; use tr >= "
                f"{self.tr - self.delay_after_train:g} s."
            )

    @property
    def delay_before_train(self):
        """Seconds from the inversion to the first read-out pulse."""
        return self.ti - (self.n_echoes // 2) * self.echo_spacing

    @property
    def delay_after_train(self):
        """Seconds from the last read-out interval to the next inversion."""
        return self.tr - self.delay_before_train - self.n_echoes * self.echo_spacing

    def signal(self, t1, t2, pd):
        """Steady-state signal of the centre read-out (t1, t2 in seconds; pd)."""
        t1, t2, pd = _as_tensors(t1, t2, pd)
        alpha = math.radians(self.flip_angle)
        # Each step maps m -> a m + b (m: Mz / M0); an n-fold step is
        # m -> a^n m + b (1 - a^n) / (1 - a).
        e_before = _recovery(self.delay_before_train, t1)
        e_after = _recovery(self.delay_after_train, t1)
        e_spacing = _recovery(self.echo_spacing, t1)
        a_echo = math.cos(alpha) * e_spacing  # pulse, then relax one spacing
        b_echo = 1 - e_spacing

        def steps(n):
            a_n = a_echo**n
            return a_n, b_echo * (1 - a_n) / (1 - a_echo)

        a_train, b_train = steps(self.n_echoes)
        # One cycle from just before the inversion: invert (m -> -m), relax,
        # read-out train, relax to the next inversion.
        a_cycle = -e_before * a_train * e_after
        b_cycle = ((1 - e_before) * a_train + b_train) * e_after + (1 - e_after)
        steady = b_cycle / (1 - a_cycle)
        a_head, b_head = steps(self.n_echoes // 2)
        before_train = -steady * e_before + (1 - e_before)
        at_centre = a_head * before_train + b_head
        return pd * at_centre * math.sin(alpha) * torch.exp(-self.te / t2)


#: Sequence classes by name (the workflow's sequence file uses these names).
SEQUENCES = {
    "flash": Flash,
    "spinecho": SpinEcho,
    "inversionrecovery": InversionRecovery,
    "mprage": Mprage,
}


def sequence_from_string(text):
    """A sequence from ``"Flash tr=0.02 te=0.004 flip_angle=30"``.

    The first word names the class (case-insensitive, see
    :data:`SEQUENCES`); the others are its ``name=value`` parameters.
    """
    words = str(text).split()
    if not words:
        raise ValueError(
            "sequence text is empty; e.g. 'Flash tr=0.02 te=0.004 flip_angle=30'."
        )
    kind = check_choice(words[0].lower(), "sequence", tuple(SEQUENCES))
    options = {}
    for word in words[1:]:
        name, sep, value = word.partition("=")
        if not sep:
            raise ValueError(
                f"sequence parameter {word!r} in {text!r} must be name=value."
            )
        if name in options:
            raise ValueError(f"sequence parameter {name!r} is given twice in {text!r}.")
        try:
            options[name] = float(value)
        except ValueError as err:
            raise ValueError(
                f"sequence parameter {name} in {text!r} must be a number, got "
                f"{value!r}."
            ) from err
    if "n_echoes" in options:
        options["n_echoes"] = check_int(options["n_echoes"], "n_echoes", 1)
    fields = {f.name for f in dataclasses.fields(SEQUENCES[kind])}
    unknown = set(options) - fields
    if unknown:
        raise ValueError(
            f"{words[0]} has no parameter {sorted(unknown)}; its parameters are "
            f"{sorted(fields)}."
        )
    try:
        return SEQUENCES[kind](**options)
    except TypeError as err:
        raise ValueError(f"{text!r}: {err}") from err


def kspace_sample(
    image, *, axes=(0, 1), resolution=1.0, partial_fourier=1.0, magnitude=True
):
    """An image as an MR scanner samples it: FFT, truncate, zero-fill, iFFT.

    Models the partial-volume blurring and Gibbs ringing of a finite k-space
    (``resolution``: the central fraction of k-space kept along every axis
    of ``axes``) and partial-Fourier acquisition (``partial_fourier``: the
    fraction of the lines kept along the first axis of ``axes``; the missing
    high-frequency lines of one side are zero-filled, no homodyne
    reconstruction). Differentiable.

    Parameters
    ----------
    image : tensor or array
        Real or complex image; ``axes`` are its spatial axes.
    axes : tuple of int
        Spatial axes to transform.
    resolution : float
        Central fraction of k-space kept, in (0, 1].
    partial_fourier : float
        Fraction of k-space lines acquired along ``axes[0]``, in [0.5, 1].
    magnitude : bool
        Return the magnitude (as a scanner stores it) or the complex image.
    """
    resolution = check_number(resolution, "resolution", minimum=1e-6, maximum=1.0)
    partial_fourier = check_number(
        partial_fourier, "partial_fourier", minimum=0.5, maximum=1.0
    )
    image = torch.as_tensor(image)
    axes = tuple(int(a) % image.ndim for a in axes)
    if len(set(axes)) != len(axes) or not axes:
        raise ValueError(f"axes must be distinct axes of the image, got {axes}.")
    kspace = torch.fft.fftshift(torch.fft.fftn(image, dim=axes), dim=axes)
    keep = torch.ones(kspace.shape, dtype=torch.bool, device=kspace.device)
    for i, axis in enumerate(axes):
        n = image.shape[axis]
        index = torch.arange(n, device=kspace.device)
        frequency = index - n // 2  # fftshift puts frequency 0 at n // 2
        kept = frequency.abs() <= resolution * n / 2
        if i == 0 and partial_fourier < 1:
            # keep the lowest frequencies and one side up to the fraction
            highest = n // 2 - 1 if n % 2 == 0 else n // 2
            kept &= frequency <= max(0, highest - round((1 - partial_fourier) * n))
        shape = [1] * image.ndim
        shape[axis] = n
        keep = keep & kept.reshape(shape)
    kspace = kspace * keep
    out = torch.fft.ifftn(torch.fft.ifftshift(kspace, dim=axes), dim=axes)
    return out.abs() if magnitude else out
