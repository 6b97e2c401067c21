r"""The protocol-free posterior: one estimator for every protocol of its design.

A per-protocol estimator (:class:`~.estimator.PosteriorEstimator`) embeds
every acquisition's signal and so serves one protocol: a new protocol costs
a training. This estimator is conditioned on the acquisition itself and
trained once on protocols drawn from a stated design (:data:`DESIGN`), so a
new protocol in that design needs none (issue 72; measured in
doc/validation/protocol_free.md).

- A protocol is read as *shells* (:class:`ProtocolShells`): the
  acquisitions of one PGSE timing (and echo time) and one b-value. Each
  shell becomes a token: its b, delta and Delta, the rotation invariants
  ``sqrt(p_l)``, ``p_l = sum_m c_lm^2``, of its b0-normalised signal's even
  spherical harmonics (l = 0, 2, and 4 where it has 15 directions or more),
  how many directions they rest on, and the signal's Legendre
  coefficients ``a_2``, ``a_4`` about the voxel's common axis (the most
  distinct axis of the sum of the shells' l = 2 parts: the fibres'
  direction, which every shell shares). None of these depends on the
  tissue's orientation, so neither does anything estimated here:
  ``orientation`` is not.
- A small Set Transformer (Lee et al. 2019) turns any number of tokens, in
  any order, into the context of a neural spline flow (zuko) over the
  rotation-invariant descriptors (:data:`FREE_TARGETS`): one network per
  token (with the voxel's noise level), one self-attention layer across the
  shells, two learned queries attending over them, with the log of the
  number of shells, then a second network.
- Training (:func:`train_protocol_free`): protocols of 16 random shells
  ("unions") drawn from :data:`DESIGN` (:func:`random_union`), draws of the
  default prior simulated on each; every epoch each draw is seen through a
  random subset of its union's shells (1 to 16), each through all its 20
  directions or (half the time) a random 6 to 19, with fresh Rician noise and the error
  of a b = 0 normalisation by a few noisy b = 0 volumes. The credible
  bounds are recalibrated on held-out draws (:mod:`.calibration`), over the
  design: an interval is calibrated on average over the design's protocols,
  not on each.

What lies outside the design is not read: a shell outside :data:`DESIGN`
(b, delta, Delta, too few directions, not PGSE, no b = 0 at its echo time)
and volumes on no shell (b-values spread beyond :data:`B_TOLERANCE`, a
ramp) are dropped and named (:attr:`ProtocolShells.dropped`), and a protocol
left without shells is refused. A PGSE inside a longer spin echo
(``Protocol.from_gtab(gtab, echo_time=TE)``) is read as PGSE, normalised by
the b = 0 volumes at its echo time. More than 16 shells are thinned to 16
spread over b and Delta (named too); more than 20 directions read as 20
(the trained most; on the HCP-style 90 directions the 90 % intervals held
0.83-0.89 of the truths, doc/validation/protocol_free.md).
"""

import copy
import functools
import hashlib
import json
import math
from typing import NamedTuple

import numpy as np
import torch
from dipy.core.sphere import cart2sphere
from dipy.reconst.shm import real_sh_descoteaux

from ..sim.sequences import PGSE, Protocol, fibonacci_sphere
from ..sim.waveforms import SpinEcho
from .calibration import LEVELS, SCALARS, calibrated_levels, level_table, rank_transform
from .estimator import flushed_denormals, kept_generators, normal_points

__all__ = [
    "DESIGN",
    "FREE_TARGETS",
    "FREE_SCALARS",
    "MAX_SHELLS",
    "DIRECTIONS",
    "ProtocolShells",
    "ProtocolFreeEstimator",
    "encode_free",
    "decode_free",
    "random_union",
    "train_protocol_free",
    "settings_key",
]

#: The design the estimator is trained on: b (s/mm^2), delta and Delta
#: (seconds; Delta at least delta + 1 ms) of each shell, and the volumes of
#: a protocol (b = 0 included).
DESIGN = {
    "b": (200.0, 10_000.0),
    "small_delta": (3e-3, 40e-3),
    "big_delta": (10e-3, 120e-3),
    "volumes": (30, 3000),
}
#: The most shells a voxel is read through (each training union's count).
MAX_SHELLS = 16
#: The fewest directions a shell needs (a rank-2 tensor's six), and the most
#: the training saw (more are read as this many).
DIRECTIONS = (6, 20)
#: Directions from which a shell's l = 4 invariant is estimated (its 15
#: coefficients with l <= 4).
L4_DIRECTIONS = 15
#: b-values of one shell differ by at most this (s/mm^2; DIPY's tolerance).
B_TOLERANCE = 20.0
#: The relative noise levels trained on (b = 0 SNR), as the per-protocol
#: estimators' default (:class:`~.training.TrainingOptions`).
SNR_RANGE = (10.0, 300.0)

#: The flow's coordinates: the rotation-invariant descriptors, transformed.
FREE_TARGETS = (
    "logit_restricted_fraction",
    "log_n_cells",
    "log_cell_volume",
    "log_cell_diameter",
    "log_surface_to_volume",
    "log_permeability",
    "log_exchange_time",
    "logit_anisotropy",
)
#: The descriptors it estimates (every scalar one; not ``orientation``).
FREE_SCALARS = SCALARS
_LOGS = ("cell_volume", "cell_diameter", "surface_to_volume", "permeability")
_LOGS += ("exchange_time",)
#: Token features: b / 1000, delta / 10 ms, Delta / 100 ms, sqrt p_0,
#: sqrt p_2, sqrt p_4, directions read (0 at 6, 1 at 20, log scale), l = 4
#: estimated (0 or 1), and the signal's Legendre coefficients a_2, a_4 about
#: the voxel's common axis (estimated from all the shells read).
N_TOKEN = 10


def encode_free(truth, *, rng=None):
    """Descriptors (dict of arrays of length n) as flow coordinates (n, 8).

    Parameters
    ----------
    truth : dict
        Each of :data:`FREE_SCALARS` (arrays of length n), as
        :meth:`~.simulator.PriorSimulator.sample` returns them.
    rng : numpy.random.Generator, optional
        Dequantises ``n_cells`` by a uniform jitter in [-1/2, 1/2) (as
        :func:`~.targets.encode`); default none.

    Returns
    -------
    ndarray (n, len(FREE_TARGETS))

    Raises
    ------
    ValueError
        If an ``anisotropy`` is not strictly inside (0, 1).
    """
    f = np.asarray(truth["restricted_fraction"], dtype=float)
    n = np.asarray(truth["n_cells"], dtype=float)
    if rng is not None:
        n = n + rng.uniform(-0.5, 0.5, size=n.shape)
    a = np.asarray(truth["anisotropy"], dtype=float)
    if not ((a > 0) & (a < 1)).all():
        raise ValueError(
            "anisotropy must lie strictly inside (0, 1) for the protocol-free "
            "flow (its logit); the prior holds a sphere or a line."
        )
    columns = [np.log(f) - np.log1p(-f), np.log(n)]
    columns += [np.log(np.asarray(truth[name], dtype=float)) for name in _LOGS]
    columns.append(np.log(a) - np.log1p(-a))
    return np.stack(columns, axis=-1)


def decode_free(values):
    """Flow coordinates (..., 8) as descriptors (dict of arrays (...))."""
    values = np.asarray(values, dtype=float)
    out = {"restricted_fraction": 1 / (1 + np.exp(-values[..., 0]))}
    out["n_cells"] = np.maximum(1, np.rint(np.exp(values[..., 1]))).astype(np.int64)
    for i, name in enumerate(_LOGS, start=2):
        out[name] = np.exp(values[..., i])
    out["anisotropy"] = 1 / (1 + np.exp(-values[..., 7]))
    return out


# -- shells ---------------------------------------------------------------------
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
    """The :class:`Shell` of ``protocol``'s acquisitions ``rows`` (one PGSE
    timing and b), normalised by its b = 0 volumes ``b0_rows``; None when
    their directions do not determine a rank-2 spherical harmonic fit."""
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


def shell_token_features(shells, signals, present=None):
    """Tokens (n, len(shells), :data:`N_TOKEN`) of b0-normalised ``signals``
    (n, n_acquisitions), float32.

    ``present`` (n, len(shells)) of bool says which shells a voxel is read
    through (default all): the common axis is estimated from those alone.
    """
    n = len(signals)
    present = np.ones((n, len(shells)), bool) if present is None else present
    coefs = [signals[:, shell.rows] @ shell.pinv.T for shell in shells]
    axis_sh = _axis_harmonics(shells, coefs, present)
    out = np.zeros((n, len(shells), N_TOKEN), dtype=np.float32)
    lo, hi = DIRECTIONS
    for s, (shell, coef) in enumerate(zip(shells, coefs, strict=True)):
        power = [np.sqrt((coef[:, shell.order == lv] ** 2).sum(1)) for lv in (0, 2, 4)]
        along = coef * axis_sh[:, : coef.shape[1]]
        read = min(len(shell.rows), hi)
        out[:, s, 0] = shell.b / 1e3
        out[:, s, 1] = shell.small_delta / 1e-2
        out[:, s, 2] = shell.big_delta / 1e-1
        out[:, s, 3:6] = np.column_stack(power)
        out[:, s, 6] = math.log(read / lo) / math.log(hi / lo)
        out[:, s, 7] = float((shell.order == 4).any())
        out[:, s, 8] = along[:, shell.order == 2].sum(1)
        out[:, s, 9] = along[:, shell.order == 4].sum(1)
    return out


def _axis_harmonics(shells, coefs, present):
    """The spherical harmonics (n, 15) at each voxel's common axis: the
    most distinct eigenvector of the sum of its shells' l = 2 parts (as
    traceless quadratic forms), over the shells ``present``."""
    total = np.zeros((len(present), 5))
    for s, (shell, coef) in enumerate(zip(shells, coefs, strict=True)):
        total += coef[:, shell.order == 2] * present[:, s, None]
    entries = total @ _quadratic_map().T
    xx, yy, zz, xy, xz, yz = entries.T
    forms = np.stack(
        [
            np.stack([xx, xy, xz], -1),
            np.stack([xy, yy, yz], -1),
            np.stack([xz, yz, zz], -1),
        ],
        -2,
    )
    values, vectors = np.linalg.eigh(forms)
    pick = np.argmax(np.abs(values), axis=1)
    axis = np.take_along_axis(vectors, pick[:, None, None], axis=2)[..., 0]
    _, theta, phi = cart2sphere(*axis.T)
    return real_sh_descoteaux(4, theta, phi, legacy=False)[0]


@functools.cache
def _quadratic_map():
    """The linear map (6, 5) from l = 2 coefficients to the entries (xx, yy,
    zz, xy, xz, yz) of the traceless quadratic form they are."""
    g = fibonacci_sphere(60)
    _, theta, phi = cart2sphere(*g.T)
    basis, _, order = real_sh_descoteaux(2, theta, phi, legacy=False)
    x, y, z = g.T
    design = np.column_stack([x * x, y * y, z * z, 2 * x * y, 2 * x * z, 2 * y * z])
    return np.linalg.pinv(design) @ basis[:, order == 2]


class ProtocolShells:
    """A protocol read as the estimator's shells, what it drops and why.

    A shell is the acquisitions of one PGSE timing, one echo time and one
    b-value: b-values within :data:`B_TOLERANCE` of each other, the spread
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
        The shells read (at most :data:`MAX_SHELLS`).
    dropped : list of (str, str)
        Each shell (or set of volumes on no shell) not read, described with
        its timing and echo time, and the reason.
    problems : list of str
        What of the protocol as a whole lies outside :data:`DESIGN` (its
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
    """``rows`` as shells, each of b-values within :data:`B_TOLERANCE` of
    each other, and the rows on no shell.

    Returns
    -------
    shells : list of ndarray
        Each shell's rows, sorted.
    loose : list of ndarray
        Rows whose b-values spread beyond the tolerance with fewer than
        :data:`DIRECTIONS` ``[0]`` of them within it (a ramp): one array per
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
    while they hold :data:`DIRECTIONS` ``[0]`` directions; and the rest."""
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


# -- the estimator --------------------------------------------------------------
class ProtocolFreeEstimator(torch.nn.Module):
    """Set encoder over shell tokens and conditional flow; see the module
    documentation.

    Parameters
    ----------
    width : int
        Hidden units of every network.
    context : int
        The flow's context size.
    transforms : int
        The flow's spline transforms.
    """

    def __init__(self, *, width=96, context=32, transforms=4):
        import zuko

        super().__init__()
        self.phi = _mlp(N_TOKEN + 1, width, width)
        self.mix = torch.nn.TransformerEncoderLayer(
            width, 4, 2 * width, dropout=0.0, batch_first=True
        )
        self.queries = torch.nn.Parameter(0.1 * torch.randn(2, width))
        self.attend = torch.nn.MultiheadAttention(width, 4, batch_first=True)
        self.rho = _mlp(2 * width + 2, width, context)
        self.flow = zuko.flows.NSF(
            len(FREE_TARGETS),
            context=context,
            transforms=transforms,
            hidden_features=(width, width),
            passes=2,
        )
        self.register_buffer("token_mean", torch.zeros(N_TOKEN))
        self.register_buffer("token_std", torch.ones(N_TOKEN))
        self.register_buffer("y_mean", torch.zeros(len(FREE_TARGETS)))
        self.register_buffer("y_std", torch.ones(len(FREE_TARGETS)))
        self.register_buffer(
            "level_tables",
            torch.as_tensor(
                np.tile(LEVELS, (len(FREE_SCALARS), 1)), dtype=torch.float32
            ),
        )

    def context(self, tokens, mask, sigma):
        """The flow's context of ``tokens`` (B, S, N_TOKEN) with ``mask``
        (B, S) of the shells present and relative noise ``sigma`` (B,)."""
        log_sigma = torch.log(sigma)
        x = (tokens - self.token_mean) / self.token_std
        noise = log_sigma[:, None, None].expand(*x.shape[:2], 1)
        present = mask > 0.5
        h = self.phi(torch.cat([x, noise], -1)) * mask[..., None]
        h = self.mix(h, src_key_padding_mask=~present) * mask[..., None]
        queries = self.queries.expand(len(h), -1, -1)
        pooled, _ = self.attend(queries, h, h, key_padding_mask=~present)
        count = torch.log(mask.sum(1, keepdim=True))
        return self.rho(torch.cat([pooled.flatten(1), count, log_sigma[:, None]], -1))

    def log_prob(self, tokens, mask, sigma, coordinates):
        """Log density of flow coordinates (standardised inside)."""
        y = (coordinates - self.y_mean) / self.y_std
        return (
            self.flow(self.context(tokens, mask, sigma)).log_prob(y)
            - torch.log(self.y_std).sum()
        )

    @torch.no_grad()
    def sample(self, tokens, mask, sigma, n, *, generator_seed=None):
        """``n`` posterior draws of the flow coordinates, (n, n_voxels, 8),
        randomised quasi-Monte Carlo as
        :meth:`~.estimator.PosteriorEstimator.sample` draws them."""
        base = normal_points(
            n,
            len(tokens),
            len(FREE_TARGETS),
            seed=generator_seed,
            voxel_data=(tokens, mask, sigma),
        )
        with flushed_denormals():
            flow = self.flow(self.context(tokens, mask, sigma))
            y = flow.transform.inv(base)
        return y * self.y_std + self.y_mean

    def level_table(self, name):
        """``name``'s recalibration table (:mod:`.calibration`)."""
        return self.level_tables[FREE_SCALARS.index(name)].cpu().numpy()

    def quantile_levels(self, name, levels):
        """The flow's levels that give ``name``'s calibrated bounds."""
        return calibrated_levels(levels, self.level_table(name))


def _mlp(n_in, width, n_out):
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, width),
        torch.nn.SiLU(),
        torch.nn.Linear(width, width),
        torch.nn.SiLU(),
        torch.nn.Linear(width, n_out),
    )


# -- the design's protocols -------------------------------------------------------
def random_union(rng, n_shells, n_directions):
    """A protocol of shells drawn from :data:`DESIGN`.

    Parameters
    ----------
    rng : numpy.random.Generator
    n_shells : int
    n_directions : int
        Directions a shell: evenly spread (:func:`fibonacci_sphere`), turned
        at random.

    Returns
    -------
    protocol : Protocol
        Without b = 0 volumes (the simulations are normalised already).
    shell : ndarray of int (n_acquisitions,)
        Each acquisition's shell.
    """
    bvals, bvecs, small, big, shell = [], [], [], [], []
    for s in range(n_shells):
        delta = rng.uniform(*DESIGN["small_delta"])
        lo = max(DESIGN["big_delta"][0], delta + 1e-3)
        Delta = rng.uniform(lo, max(lo, DESIGN["big_delta"][1]))
        b = rng.uniform(*DESIGN["b"])
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        rotation = q * np.sign(np.diag(r))
        bvals.append(np.full(n_directions, b))
        bvecs.append(fibonacci_sphere(n_directions, hemisphere=True) @ rotation.T)
        small.append(np.full(n_directions, delta))
        big.append(np.full(n_directions, Delta))
        shell.append(np.full(n_directions, s))
    protocol = Protocol.pgse(
        np.concatenate(bvals),
        np.concatenate(bvecs),
        small_delta=np.concatenate(small),
        big_delta=np.concatenate(big),
    )
    return protocol, np.concatenate(shell)


# -- training ---------------------------------------------------------------------
class _Union(NamedTuple):
    protocol: Protocol
    shell: np.ndarray
    signals: np.ndarray
    coordinates: np.ndarray


def settings_key(settings):
    """The 20-hex-digit key of training settings (a JSON-able dict)."""
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _epoch_tokens(unions, rows, rng):
    """Tokens (n, MAX_SHELLS, N_TOKEN), relative noise (n,), coordinates
    and the shells read (n, MAX_SHELLS) of the draws ``rows`` (per union,
    an index array), with fresh noise, shells and direction subsets."""
    tokens, sigmas, ys, masks = [], [], [], []
    for union, idx in zip(unions, rows, strict=True):
        if not len(idx):
            continue
        clean = union.signals[idx]
        log_snr = rng.uniform(*np.log(SNR_RANGE), size=(len(idx), 1))
        sigma = np.exp(-log_snr)
        noisy = np.hypot(
            clean + sigma * rng.standard_normal(clean.shape),
            sigma * rng.standard_normal(clean.shape),
        )
        shells = []
        for s in range(MAX_SHELLS):
            members = np.flatnonzero(union.shell == s)
            shell = None
            while shell is None:  # a subset on one great circle is drawn again
                # Half the shells whole: most protocols have 20 directions or
                # more a shell (read as 20); the others 6 to 19.
                whole = rng.random() < 0.5
                k = len(members) if whole else rng.integers(DIRECTIONS[0], len(members))
                picked = np.sort(rng.choice(members, size=k, replace=False))
                shell = make_shell(union.protocol, picked)
            # The b = 0 normalisation of a real voxel: divided by the mean
            # of a few noisy b = 0 volumes of its sequence.
            n_b0 = rng.integers(1, 7)
            b0 = np.hypot(
                1 + sigma[:, 0] * rng.standard_normal(len(idx)) / np.sqrt(n_b0),
                sigma[:, 0] * rng.standard_normal(len(idx)) / np.sqrt(n_b0),
            )
            noisy[:, picked] /= b0[:, None]
            shells.append(shell)
        mask = _random_masks(rng, len(idx))
        tokens.append(shell_token_features(shells, noisy, mask > 0.5))
        sigmas.append(sigma[:, 0])
        ys.append(union.coordinates[idx])
        masks.append(mask)
    return tuple(np.concatenate(a) for a in (tokens, sigmas, ys, masks))


def _random_masks(rng, n, n_shells=MAX_SHELLS):
    k = rng.integers(1, n_shells + 1, size=n)
    return (rng.random((n, n_shells)).argsort(1) < k[:, None]).astype(np.float32)


@kept_generators()  # it seeds torch's generator
def train_protocol_free(
    unions,
    *,
    epochs=60,
    seed=0,
    batch=256,
    lr=2e-3,
    validation=0.1,
    calibration=0.1,
    progress=False,
):
    """Train and recalibrate a :class:`ProtocolFreeEstimator`.

    Parameters
    ----------
    unions : list of (Protocol, ndarray, ndarray, dict)
        Each union's protocol (:func:`random_union`: :data:`MAX_SHELLS`
        shells), each acquisition's shell index, its draws' noise-free
        signals (n, n_acquisitions) and their true descriptors (as
        :meth:`~.simulator.PriorSimulator.sample` returns them).
    epochs : int
        Passes over the training draws (fresh noise, shells and directions
        each); the state of least validation loss is kept.
    seed : int
        Seeds the split, the noise, the subsets and the network.
    batch, lr : int, float
        Adam's batch size and initial learning rate (cosine annealed).
    validation, calibration : float
        Fractions of every union's draws held out for early stopping and
        for the recalibration of the credible bounds.
    progress : bool
        A progress bar over the epochs.

    Returns
    -------
    ProtocolFreeEstimator
        In evaluation mode, on the CPU.
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    prepared, splits = [], []
    for protocol, shell, signals, truth in unions:
        coordinates = encode_free(truth, rng=rng)
        prepared.append(_Union(protocol, shell, np.asarray(signals), coordinates))
        order = rng.permutation(len(signals))
        n_val = max(1, int(round(validation * len(order))))
        n_cal = max(1, int(round(calibration * len(order))))
        splits.append(
            (order[n_val + n_cal :], order[:n_val], order[n_val : n_val + n_cal])
        )
    train_rows = [s[0] for s in splits]
    net = ProtocolFreeEstimator()
    tokens, sigma, y, mask = _epoch_tokens(prepared, train_rows, rng)
    flat = tokens[mask > 0.5]
    net.token_mean.copy_(torch.as_tensor(flat.mean(0)))
    net.token_std.copy_(torch.as_tensor(flat.std(0) + 1e-6))
    net.y_mean.copy_(torch.as_tensor(y.mean(0), dtype=torch.float32))
    net.y_std.copy_(torch.as_tensor(y.std(0), dtype=torch.float32))
    check = _epoch_tokens(prepared, [s[1] for s in splits], rng)
    check = [torch.as_tensor(a, dtype=torch.float32) for a in check]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    best, state = np.inf, None
    bar = tqdm(
        range(epochs),
        desc="Training the protocol-free posterior",
        disable=not progress,
    )
    for epoch in bar:
        if epoch:
            tokens, sigma, y, mask = _epoch_tokens(prepared, train_rows, rng)
        net.train()
        order = rng.permutation(len(y))
        for lo in range(0, len(y), batch):
            part = order[lo : lo + batch]
            loss = -net.log_prob(
                *(
                    torch.as_tensor(a[part], dtype=torch.float32)
                    for a in (tokens, mask, sigma, y)
                ),
            ).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        net.eval()
        with torch.no_grad():
            t, s, yy, m = check
            score = -float(net.log_prob(t, m, s, yy).mean())
        bar.set_postfix_str(f"validation -log p {score:.3f}")
        if score < best:
            best, state = score, copy.deepcopy(net.state_dict())
    net.load_state_dict(state)
    net.eval()
    tables = _level_tables(net, prepared, [s[2] for s in splits], rng, seed)
    net.level_tables.copy_(torch.as_tensor(tables, dtype=torch.float32))
    return net


def _level_tables(net, unions, rows, rng, seed, *, repeats=3, n_draws=64):
    """Recalibration tables (len(FREE_SCALARS), len(LEVELS)) from held-out
    draws, each seen ``repeats`` times through random shells, directions
    and noise."""
    transforms = {name: [] for name in FREE_SCALARS}
    for repeat in range(repeats):
        tokens, sigma, y, mask = _epoch_tokens(unions, rows, rng)
        draws = net.sample(
            *(torch.as_tensor(a, dtype=torch.float32) for a in (tokens, mask, sigma)),
            n_draws,
            generator_seed=seed + repeat,
        )
        values, truth = decode_free(draws.numpy()), decode_free(y)
        for name in FREE_SCALARS:
            transforms[name].append(rank_transform(values[name], truth[name], rng))
    return np.stack([level_table(np.concatenate(transforms[n])) for n in FREE_SCALARS])


# -- the shipped estimator ----------------------------------------------------------
#: How the shipped estimator is made (``python -m
#: dipy_spinverse.posterior.protocol_free train``): the default prior's draws
#: on ``unions`` random unions of ``shells`` shells of ``directions``
#: directions, ``draws`` a union; union ``held_out`` (of the same random
#: stream) is kept for doc/validation/protocol_free.md's test.
SHIPPED_SETTINGS = {
    "estimator": "protocol_free",
    "prior": "TissuePrior()",
    "unions": 30,
    "held_out": 6,
    "shells": MAX_SHELLS,
    "directions": DIRECTIONS[1],
    "draws": 400,
    "seed": 0,
    "epochs": 80,
}


def union_protocols(settings=SHIPPED_SETTINGS):
    """The training unions' protocols and shell indices, in order, and
    their simulation seeds: ``[(index, protocol, shell, seed), ...]`` (the
    held-out union is left out)."""
    rng = np.random.default_rng(settings["seed"])
    out = []
    for u in range(settings["unions"] + 1):
        protocol, shell = random_union(rng, settings["shells"], settings["directions"])
        if u != settings["held_out"]:
            out.append((u, protocol, shell, settings["seed"] + 1 + u))
    return out


def simulated_unions(folder, settings=SHIPPED_SETTINGS, *, progress=False):
    """Each training union's protocol, shells, signals and truth.

    The signals are simulated once (:class:`~.simulator.PriorSimulator` of
    the default prior) and kept in ``folder`` as ``union<u>-<n>-<seed>.npz``
    (resumed from there); the truth is drawn again from the seed (cheap:
    the draws depend on the seed alone).
    """
    import pathlib

    from .prior import TissuePrior
    from .simulator import draws_truth

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = settings["draws"]
    out = []
    for u, protocol, shell, seed in union_protocols(settings):
        simulator = TissuePrior().simulator(protocol)
        path = folder / f"union{u}-{n}-{seed}.npz"
        draws = simulator.draws(n, seed=seed)
        if path.exists():
            signals = np.load(path)["signals"]
        else:
            signals = simulator.simulate_draws(draws, progress=progress)
            np.savez(path, signals=signals)
        out.append((protocol, shell, signals, draws_truth(draws)))
    return out


def shipped_key():
    """The settings key of the shipped estimator."""
    return settings_key(SHIPPED_SETTINGS)


@kept_generators()  # building the network draws from torch's generator
def load_protocol_free(folder=None):
    """The shipped protocol-free estimator, if the current code accepts it.

    Parameters
    ----------
    folder : path-like, optional
        Default: the package's shipped estimators
        (:data:`~.shipped.SHIPPED`).

    Returns
    -------
    ProtocolFreeEstimator
        In evaluation mode, on the CPU.

    Raises
    ------
    RuntimeError
        When its manifest does not accept the code (the message says how to
        retrain or re-key it), or the file is missing or cannot be read as
        this estimator (truncated, overwritten, another network's: the
        message names the file and says to reinstall or retrain).
    """
    import pathlib

    from .shipped import SHIPPED, refusal, shipped_name

    folder = pathlib.Path(SHIPPED if folder is None else folder)
    name = shipped_name(shipped_key())
    why = refusal(name, folder=folder)
    if why is not None:
        raise RuntimeError(f"{why} {_RETRAIN}")
    path = folder / name
    net = ProtocolFreeEstimator()
    # Retraining takes hours (unlike a per-protocol estimator's minutes):
    # a damaged file is refused, never retrained in the user's fit.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - a damaged file is never used
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise RuntimeError(
            f"the shipped protocol-free estimator {path} cannot be read "
            f"({type(err).__name__}: {detail}): the file is missing, truncated "
            "or not this estimator. Reinstall dipy_spinverse to restore it. "
            f"{_RETRAIN}"
        ) from err
    return net.eval()


_RETRAIN = (
    "(To make it again: `python -m dipy_spinverse.posterior.protocol_free "
    "train --out DIR`, then ship the file it writes: `python -m "
    "dipy_spinverse.posterior ship PATH --about TEXT`.)"
)


def main(argv=None):
    """``python -m dipy_spinverse.posterior.protocol_free train --out DIR``:
    simulate the training unions into ``DIR`` (resumed; about 3 minutes a
    union on one core of a 2-core x86_64, 90 minutes for the 30), train
    (about 10 minutes), and write ``DIR/posterior-<key>-<code>.pt`` for
    ``python -m dipy_spinverse.posterior ship``."""
    import argparse
    import pathlib

    from .shipped import estimator_code

    parser = argparse.ArgumentParser(
        prog="python -m dipy_spinverse.posterior.protocol_free",
        description="Train the shipped protocol-free posterior estimator.",
    )
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--out", required=True, type=pathlib.Path)
    args = parser.parse_args(argv)
    unions = simulated_unions(args.out, progress=True)
    net = train_protocol_free(
        unions,
        epochs=SHIPPED_SETTINGS["epochs"],
        seed=SHIPPED_SETTINGS["seed"],
        progress=True,
    )
    code = estimator_code("protocol_free")
    path = args.out / f"posterior-{shipped_key()}-{code}.pt"
    torch.save(net.state_dict(), path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
