"""A protocol read as the protocol-free estimator's shells, and what it drops.

A shell (:class:`Shell`) is the acquisitions of one PGSE timing, one echo
time and one b-value, normalised by the b = 0 volumes of its echo time.
What lies outside the design (:data:`~.design.DESIGN`: b, delta, Delta, too
few directions, not PGSE, no b = 0 at its echo time) and volumes on no
shell (b-values spread beyond :data:`~.design.B_TOLERANCE`, a ramp) are
dropped and named (:attr:`ProtocolShells.dropped`), and a protocol left
without shells is refused. A PGSE inside a longer spin echo
(``Protocol.from_gtab(gtab, echo_time=TE)``) is read as PGSE, normalised by
the b = 0 volumes at its echo time. More than
:data:`~.design.MAX_SHELLS` shells are thinned to that many, spread over b
and Delta (named too).
"""

import math
from typing import NamedTuple

import numpy as np
from dipy.core.sphere import cart2sphere
from dipy.reconst.shm import real_sh_descoteaux

from ...sim.sequences import PGSE
from ...sim.waveforms import SpinEcho
from .design import B_TOLERANCE, DESIGN, DIRECTIONS, L4_DIRECTIONS, MAX_SHELLS
from .tokens import shell_token_features

__all__ = ["Shell", "ProtocolShells", "make_shell"]


class Shell(NamedTuple):
    """One shell: its acquisitions' rows, b (s/mm^2), delta and Delta (s),
    and the least-squares map from its signal to its even spherical
    harmonics (``pinv`` (n_coefficients, n_rows)) with each coefficient's
    order ``l``; its echo time (s) and the rows of the b = 0 volumes it is
    normalised by (those at its echo time)."""

    rows: np.ndarray
    b: float
    small_delta: float
    big_delta: float
    pinv: np.ndarray
    order: np.ndarray
    echo_time: float = math.nan
    b0_rows: np.ndarray = np.zeros(0, dtype=np.intp)

    def describe(self):
        return (
            f"b={self.b:.0f} s/mm^2, {_timing_words(self)}, "
            f"TE={self.echo_time * 1e3:.3g} ms ({len(self.rows)} directions)"
        )


def _pgse_encoding(waveform):
    """The PGSE encoding of ``waveform`` (itself, or the encoding of a
    :class:`~dipy_spinverse.sim.waveforms.SpinEcho`: an echo time longer
    than the encoding leaves it PGSE); None when it is not PGSE."""
    encoding = waveform.encoding if isinstance(waveform, SpinEcho) else waveform
    return encoding if isinstance(encoding, PGSE) else None


def _timing_words(encoding):
    return (
        f"delta={encoding.small_delta * 1e3:.3g} ms, "
        f"Delta={encoding.big_delta * 1e3:.3g} ms"
    )


def make_shell(protocol, rows, b0_rows=()):
    """The :class:`Shell` of some of a protocol's acquisitions.

    Parameters
    ----------
    protocol : Protocol
    rows : array_like of int
        The acquisitions, of one PGSE timing and b.
    b0_rows : array_like of int
        The b = 0 volumes they are normalised by.

    Returns
    -------
    Shell or None
        None when their directions do not determine a rank-2 spherical
        harmonic fit.
    """
    rows = np.asarray(rows, dtype=np.intp)
    waveform = protocol.waveforms[rows[0]]
    encoding = _pgse_encoding(waveform)
    sh_order = 4 if len(rows) >= L4_DIRECTIONS else 2
    _, theta, phi = cart2sphere(*protocol.bvecs[rows].T)
    basis, _, order = real_sh_descoteaux(sh_order, theta, phi, legacy=False)
    # Directions on one great circle (or fewer than the coefficients) leave
    # the fit undetermined: such a shell is dropped, not read.
    if np.linalg.matrix_rank(basis[:, order <= 2]) < 6:
        return None
    if sh_order == 4 and np.linalg.matrix_rank(basis) < basis.shape[1]:
        basis, order = basis[:, order <= 2], order[order <= 2]
    return Shell(
        rows=rows,
        b=float(protocol.bvals[rows].mean()),
        small_delta=float(encoding.small_delta),
        big_delta=float(encoding.big_delta),
        pinv=np.linalg.pinv(basis),
        order=np.asarray(order),
        echo_time=float(waveform.echo_time),
        b0_rows=np.asarray(b0_rows, dtype=np.intp),
    )


class ProtocolShells:
    """A protocol read as the estimator's shells, what it drops and why.

    A shell is the acquisitions of one PGSE timing, one echo time and one
    b-value: b-values within :data:`~.design.B_TOLERANCE` of each other, the spread
    of a shell bounded (a ramp of b-values is no shell, however small its
    steps). Each shell is normalised by the b = 0 volumes of its sequence,
    else by those at its echo time (the same T2 weighting).

    Parameters
    ----------
    protocol : Protocol
        The acquisitions, b = 0 included.

    Attributes
    ----------
    shells : list of Shell
        The shells read (at most :data:`~.design.MAX_SHELLS`).
    dropped : list of (str, str)
        Each shell (or set of volumes on no shell) not read, described with
        its timing and echo time, and the reason.
    problems : list of str
        What of the protocol as a whole lies outside :data:`~.design.DESIGN` (its
        volume count).

    Raises
    ------
    ValueError
        When no shell is left to read, naming every reason.
    """

    def __init__(self, protocol):
        self.protocol = protocol
        self.dropped = []
        self.problems = []
        low, high = DESIGN["volumes"]
        if not low <= len(protocol) <= high:
            self.problems.append(
                f"{len(protocol)} volumes, outside the design's {low}-{high}"
            )
        candidates = []
        b0 = protocol.bvals == 0
        for waveform, idx in protocol.sequences():
            weighted = idx[~b0[idx]]
            if not len(weighted):
                continue
            b0_rows = _b0_rows(protocol, idx)
            groups, loose = _b_groups(protocol.bvals, weighted)
            for rows in loose:
                what = _describe_loose(protocol, rows)
                self.dropped.append((what, _loose_words(protocol.bvals[rows])))
            for rows in groups:
                reason = self._outside(waveform, protocol.bvals[rows], len(rows))
                if reason is None and not len(b0_rows):
                    reason = _no_b0_words(protocol, waveform)
                shell = make_shell(protocol, rows, b0_rows) if reason is None else None
                if reason is None and shell is None:
                    reason = "its directions do not span the sphere (rank < 6)"
                if reason is None:
                    candidates.append(shell)
                else:
                    self.dropped.append((_describe(protocol, rows), reason))
        self.shells = self._thinned(candidates)
        if not self.shells:
            raise ValueError(
                "the protocol-free estimator reads no shell of this protocol: "
                + "; ".join(f"{d}: {r}" for d, r in self.dropped)
                + f". It reads {_design_words()}, with a b = 0 volume at each "
                "echo time. " + self._fixes()
            )

    def _fixes(self):
        """What to do with a protocol of no shell read, from the reasons."""
        fixes = []
        if any(why.startswith("no b = 0 volume") for _, why in self.dropped):
            fixes.append("acquire a b = 0 volume at each echo time")
        fixes.append(
            'fit this protocol with fit_method="posterior" (a per-protocol '
            "estimator, trained once for it), which reads every volume"
        )
        text = ", or ".join(fixes)
        return text[0].upper() + text[1:] + "."

    @staticmethod
    def _outside(waveform, bvals, n_rows):
        encoding = _pgse_encoding(waveform)
        if encoding is None:
            inner = getattr(waveform, "encoding", waveform)
            return f"a {type(inner).__name__} encoding, not PGSE"
        checks = (
            ("b", float(bvals.mean()), 1.0, " s/mm^2"),
            ("small_delta", encoding.small_delta, 1e3, " ms"),
            ("big_delta", encoding.big_delta, 1e3, " ms"),
        )
        for name, value, scale, unit in checks:
            lo, hi = DESIGN[name]
            if not lo <= value <= hi:
                return (
                    f"{name} {value * scale:.4g}{unit} outside the design's "
                    f"{lo * scale:.4g}-{hi * scale:.4g}{unit}"
                )
        if encoding.big_delta < encoding.small_delta + 1e-3:
            return "Delta below delta + 1 ms, outside the design"
        if n_rows < DIRECTIONS[0]:
            return f"{n_rows} directions, fewer than the {DIRECTIONS[0]} needed"
        return None

    def _thinned(self, shells):
        if len(shells) <= MAX_SHELLS:
            return shells
        # Spread over (Delta, b): every timing and b range keeps a voice.
        order = sorted(
            range(len(shells)), key=lambda i: (shells[i].big_delta, shells[i].b)
        )
        keep = set(np.unique(np.linspace(0, len(shells) - 1, MAX_SHELLS).round()))
        kept = []
        for rank, i in enumerate(order):
            if rank in keep:
                kept.append(shells[i])
            else:
                self.dropped.append(
                    (shells[i].describe(), f"beyond the {MAX_SHELLS} shells read")
                )
        return kept

    def normalised(self, signals):
        """Raw ``signals`` (n, n_acquisitions) divided, shell by shell, by
        the mean of the shell's b = 0 volumes (:attr:`Shell.b0_rows`).

        Returns
        -------
        ndarray (n, n_acquisitions)
            NaN off the shells' rows, and on a shell whose b = 0 mean is
            not positive and finite.
        """
        signals = np.asarray(signals, dtype=np.float64)
        out = np.full(signals.shape, np.nan)
        for shell in self.shells:
            scale = signals[:, shell.b0_rows].mean(axis=1, keepdims=True)
            scale = np.where(np.isfinite(scale) & (scale > 0), scale, np.nan)
            out[:, shell.rows] = signals[:, shell.rows] / scale
        return out

    def tokens(self, normalised):
        """The shells' tokens (n, len(shells), N_TOKEN) of b0-normalised
        signals (n, n_acquisitions)."""
        return shell_token_features(self.shells, np.asarray(normalised, dtype=float))

    def report(self):
        """What is read and what is not, in words (one line each)."""
        lines = [f"reads {len(self.shells)} shell(s)"]
        lines += [f"drops {d}: {r}" for d, r in self.dropped]
        lines += [f"outside the design: {p}" for p in self.problems]
        return lines


def _echo_key(times):
    """Echo times (s) compared to the nanosecond."""
    return np.round(np.asarray(times, dtype=np.float64), 9)


def _b0_rows(protocol, idx):
    """The b = 0 volumes that normalise the sequence of acquisitions
    ``idx``: its own (as the gate normalises it), else those at its echo
    time, whatever their encoding's timing (a b = 0 has no diffusion
    weighting, only its echo time's T2 weighting); none when no b = 0 has
    its echo time."""
    b0 = protocol.bvals == 0
    own = idx[b0[idx]]
    if len(own):
        return own
    echo = _echo_key(protocol.echo_times)
    return np.flatnonzero(b0 & (echo == echo[idx[0]]))


def _no_b0_words(protocol, waveform):
    """Why a shell at an echo time without b = 0 volumes is not read."""
    b0 = protocol.bvals == 0
    others = sorted(set(_echo_key(protocol.echo_times[b0])))
    at = ", ".join(f"{t * 1e3:.3g}" for t in others)
    te = f"TE={waveform.echo_time * 1e3:.3g} ms"
    words = (
        f"no b = 0 volume at its echo time ({te}; the b = 0 volumes are at "
        f"TE={at} ms), so its T2 weighting is not known: acquire a b = 0 "
        f"volume at {te}"
    )
    if not isinstance(waveform, SpinEcho):
        # Without an echo time given, a PGSE's echo ends with its encoding
        # (delta + Delta): a scanner's one echo time for every volume is
        # given to the protocol instead.
        words += (
            ", or, if the scanner's echo time was one for all volumes, give "
            "it: Protocol.from_gtab(gtab, echo_time=TE)"
        )
    return words


def _b_groups(bvals, rows):
    """``rows`` as shells, each of b-values within :data:`~.design.B_TOLERANCE` of
    each other, and the rows on no shell.

    Returns
    -------
    shells : list of ndarray
        Each shell's rows, sorted.
    loose : list of ndarray
        Rows whose b-values spread beyond the tolerance with fewer than
        :data:`~.design.DIRECTIONS` ``[0]`` of them within it (a ramp): one array per
        run of b-values (steps of at most the tolerance).
    """
    order = rows[np.argsort(bvals[rows], kind="stable")]
    # Runs of steps within the tolerance. A run spanning no more than the
    # tolerance is a shell; a longer one (a ramp, or shells closer than the
    # tolerance's chain) is split, never chained into one shell.
    runs = np.split(order, np.flatnonzero(np.diff(bvals[order]) > B_TOLERANCE) + 1)
    shells, loose = [], []
    for run in runs:
        found, rest = _dense_windows(bvals, run)
        shells += found
        if len(rest) and np.ptp(bvals[rest]) <= B_TOLERANCE:
            shells.append(rest)  # a few directions: named as too few
        elif len(rest):
            loose.append(rest)
    return [np.sort(g) for g in shells], [np.sort(g) for g in loose]


def _dense_windows(bvals, run):
    """The shells of ``run`` (rows sorted by b): a run within the tolerance
    whole, else the fullest windows of b-values within it, fullest first,
    while they hold :data:`~.design.DIRECTIONS` ``[0]`` directions; and the rest."""
    if np.ptp(bvals[run]) <= B_TOLERANCE:
        return [run], run[:0]
    found = []
    while len(run):
        b = bvals[run]
        ends = np.searchsorted(b, b + B_TOLERANCE, side="right")
        counts = ends - np.arange(len(b))
        first = int(np.argmax(counts))
        if counts[first] < DIRECTIONS[0]:
            break
        found.append(run[first : ends[first]])
        run = np.delete(run, np.arange(first, ends[first]))
    return found, run


def _describe(protocol, rows):
    waveform = protocol.waveforms[rows[0]]
    b = protocol.bvals[rows].mean()
    return f"b={b:.0f} s/mm^2{_waveform_words(waveform)} ({len(rows)} directions)"


def _describe_loose(protocol, rows):
    waveform = protocol.waveforms[rows[0]]
    b = protocol.bvals[rows]
    return (
        f"b {b.min():.0f}-{b.max():.0f} s/mm^2{_waveform_words(waveform)} "
        f"(volumes {_index_runs(rows)}, {len(rows)} in all)"
    )


def _loose_words(bvals):
    return (
        f"b-values spread over {np.ptp(bvals):.0f} s/mm^2 with fewer than "
        f"{DIRECTIONS[0]} within {B_TOLERANCE:.0f} s/mm^2 of each other: not a "
        "shell (a shell's b-values differ by at most that)"
    )


def _waveform_words(waveform):
    """``", delta=.. ms, Delta=.. ms, TE=.. ms"``: what tells shells of one
    b apart (no delta and Delta for an encoding other than PGSE)."""
    encoding = _pgse_encoding(waveform)
    timing = f", {_timing_words(encoding)}" if encoding is not None else ""
    return f"{timing}, TE={waveform.echo_time * 1e3:.3g} ms"


def _index_runs(rows):
    """``"4-63, 70"``: sorted volume indices as runs."""
    rows = np.sort(np.asarray(rows))
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


def _design_words():
    b, d, big = DESIGN["b"], DESIGN["small_delta"], DESIGN["big_delta"]
    return (
        f"PGSE shells of b {b[0]:.0f}-{b[1]:.0f} s/mm^2, delta "
        f"{d[0] * 1e3:.0f}-{d[1] * 1e3:.0f} ms, Delta {big[0] * 1e3:.0f}-"
        f"{big[1] * 1e3:.0f} ms, at least {DIRECTIONS[0]} directions each"
    )
