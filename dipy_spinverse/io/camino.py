"""Camino scheme files (STEJSKALTANNER): a PGSE protocol with its echo times.

One row ``x y z |G| DELTA delta TE`` per acquisition, G in T/m and times in
seconds. :func:`read_scheme` returns the protocol and the TE column (the
protocol's waveforms end at DELTA + delta, so the echo times a dataset was
acquired at are read here, once); :func:`write_scheme` writes a PGSE
protocol back.
"""

import os

import numpy as np

from ..files import atomic_write
from ..sim.sequences import Protocol
from ..sim.waveforms import GAMMA_UM_US, PGSE, UNIT_ATOL

__all__ = ["read_scheme", "write_scheme"]

_VERSION = "STEJSKALTANNER"
# Camino's older, numbered name of this format (fsl2scheme's -version: 0
# wrote q-vectors with one diffusion time, 2 the b-vectors of BVECTOR).
_VERSION_ALIASES = ("1",)
_BVECTOR = ("BVECTOR", "2")
_COLUMNS = ("x", "y", "z", "|G|", "DELTA", "delta", "TE")


def read_scheme(path):
    """Read a Camino scheme file in STEJSKALTANNER format.

    The file starts with a ``VERSION: STEJSKALTANNER`` (or ``VERSION:
    1``) line, followed by one row ``x y z |G| DELTA delta TE`` per
    acquisition, with G in T/m and times in seconds. Comment lines
    (starting with ``#`` or ``%``, as in the ISBI 2015 challenge's file)
    and blank lines are skipped anywhere; a file without the VERSION line
    whose first row has these seven numbers is read as STEJSKALTANNER.
    A b = 0 row (zero gradient) may have ``DELTA = delta = 0``, as
    Camino writes them: it has no timing of its own and takes that of
    the weighted rows of its echo time (TE column), the sequence whose
    b = 0 signal it measures; or the scheme's one timing. Where its echo
    time is shared by several timings, or by none of several, the file
    must give the row its timing, and the error names the rows.

    Parameters
    ----------
    path : str or os.PathLike
        Scheme file.

    Returns
    -------
    protocol : Protocol
        PGSE acquisitions with b = gamma^2 G^2 delta^2 (DELTA - delta / 3)
        in s/mm^2; rows with a zero gradient are b = 0.
    echo_times : ndarray (n,)
        The TE column in seconds. Each is at least DELTA + delta, where the
        protocol's waveforms end.
    """
    rows = list(_rows(path))
    if not rows:
        raise ValueError(f"{path}: no acquisitions after the VERSION line")
    waveforms, bvals, bvecs = [], [], []
    for lineno, (x, y, z, strength, big_d, d, echo) in rows:
        waveform, bval, bvec = _acquisition(
            (x, y, z), strength, big_d, d, echo, where=f"{path}, line {lineno}"
        )
        waveforms.append(waveform)
        bvals.append(bval)
        bvecs.append(bvec)
    echoes = np.array([values[6] for _, values in rows])
    waveforms = _time_untimed_b0(waveforms, echoes, [r[0] for r in rows], path)
    return Protocol(waveforms=tuple(waveforms), bvals=bvals, bvecs=bvecs), echoes


def write_scheme(protocol, path):
    """Write a PGSE-only protocol as a Camino STEJSKALTANNER scheme file.

    The TE column is each waveform's end, DELTA + delta.

    Parameters
    ----------
    protocol : Protocol
        PGSE acquisitions only (the format has no other waveform).
    path : str or os.PathLike
        Output file, written atomically; :func:`read_scheme` reads it back.

    Returns
    -------
    str
        The path written.
    """
    # A PGSE in a longer spin echo is a PGSE row with its own TE.
    others = {
        type(w).__name__
        for w in protocol.waveforms
        if type(getattr(w, "encoding", w)) is not PGSE
    }
    if others:
        raise ValueError(
            "write_scheme writes PGSE protocols only (STEJSKALTANNER format); "
            f"this protocol also has {sorted(others)}"
        )
    lines = ["# written by dipy_spinverse", f"VERSION: {_VERSION}"]
    for waveform, bvec, strength in zip(
        protocol.waveforms, protocol.bvecs, protocol.gradient_strength, strict=True
    ):
        values = (
            *bvec,
            strength,
            waveform.big_delta,
            waveform.small_delta,
            waveform.echo_time,
        )
        lines.append(" ".join(f"{v:.17g}" for v in values))
    path = os.fspath(path)
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _time_untimed_b0(waveforms, echoes, linenos, path):
    """The waveforms of a scheme with its untimed b = 0 rows (None) given
    the timing of the weighted rows of their echo time (or the scheme's one
    timing); an error naming the rows where neither identifies one."""
    untimed = [i for i, w in enumerate(waveforms) if w is None]
    if not untimed:
        return waveforms
    timings = set(waveforms) - {None}
    # The timings of the weighted rows per echo time, written to the
    # microsecond.
    by_echo = {}
    for waveform, echo in zip(waveforms, echoes, strict=True):
        if waveform is not None:
            by_echo.setdefault(round(float(echo), 6), set()).add(waveform)
    unresolved = []
    waveforms = list(waveforms)
    for i in untimed:
        candidates = by_echo.get(round(float(echoes[i]), 6)) or timings
        if len(candidates) == 1:
            waveforms[i] = next(iter(candidates))
        else:
            unresolved.append(i)
    if unresolved:
        lines = ", ".join(str(linenos[i]) for i in unresolved[:8])
        raise ValueError(
            f"{path}, line(s) {lines}: b = 0 row(s) with DELTA = delta = 0 (no "
            f"timing) whose echo time (TE column) picks no single one of the "
            f"{len(timings)} timings of the "
            "weighted rows: give each b = 0 row the DELTA, delta and TE of the "
            "sequence it belongs to (its echo time weights the b = 0 signal by "
            "which that sequence is normalised)"
        )
    return waveforms


def _rows(path):
    """Yield ``(lineno, values)`` for the data rows of a Camino scheme file."""
    version_seen = False
    with open(os.fspath(path)) as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith(("#", "%")):
                continue
            if not version_seen:
                version_seen = True
                if _headerless_row(line):
                    yield lineno, _values(line, path, lineno)
                else:
                    _check_version(line, path, lineno)
                continue
            yield lineno, _values(line, path, lineno)
    if not version_seen:
        raise ValueError(
            f"{path}: no 'VERSION: {_VERSION}' header line; the first "
            "non-comment line of a Camino scheme file names its format"
        )


def _headerless_row(line):
    """Whether a scheme's first line is already a STEJSKALTANNER row (seven
    numbers), as in files written without the VERSION line."""
    fields = line.split()
    if len(fields) != len(_COLUMNS):
        return False
    try:
        [float(v) for v in fields]
    except ValueError:
        return False
    return True


def _check_version(line, path, lineno):
    key, sep, version = line.partition(":")
    if not sep or key.strip().upper() != "VERSION":
        fix = (
            "a line of column names must be a comment (start it with #)"
            if not _any_number(line.split())
            else f"add the line 'VERSION: {_VERSION}' before the rows"
        )
        raise ValueError(
            f"{path}, line {lineno}: expected a 'VERSION: {_VERSION}' "
            f"header before the data, got {line!r}; {fix}"
        )
    version = version.strip()
    if version.upper() not in (_VERSION, *_VERSION_ALIASES):
        bvector = (
            ". A BVECTOR scheme has b-values but no gradient timing: give its "
            "b-values and directions as .bval/.bvec files and the timing on its "
            "own"
            if version.upper() in _BVECTOR
            else ""
        )
        raise ValueError(
            f"{path}, line {lineno}: unsupported scheme version "
            f"{version!r}; only VERSION: {_VERSION} is supported "
            f"(columns x y z |G| DELTA delta TE, G in T/m, times in s){bvector}"
        )


def _any_number(fields):
    """Whether any of the text ``fields`` reads as a number."""
    for field in fields:
        try:
            float(field)
        except ValueError:
            continue
        return True
    return False


def _values(line, path, lineno):
    fields = line.split()
    if not _any_number(fields):
        raise ValueError(
            f"{path}, line {lineno}: {line!r} is not a row of numbers; a line of "
            "column names must be a comment (start it with #)"
        )
    if len(fields) != len(_COLUMNS):
        raise ValueError(
            f"{path}, line {lineno}: expected {len(_COLUMNS)} columns "
            f"({' '.join(_COLUMNS)}), got {len(fields)}"
        )
    try:
        return tuple(float(v) for v in fields)
    except ValueError as err:
        raise ValueError(
            f"{path}, line {lineno}: non-numeric value in {line!r}"
        ) from err


def _acquisition(direction, strength, big_delta, small_delta, echo, *, where):
    """Turn one STEJSKALTANNER row into (waveform, b in s/mm^2, direction);
    the waveform is None for a b = 0 row without timing."""
    no_gradient = (
        np.isfinite(strength) and strength >= 0 and not (strength and np.any(direction))
    )
    if no_gradient and big_delta == 0 and small_delta == 0:
        # Camino's convention for b = 0 rows: without gradient the timing
        # changes nothing in the signal; read_scheme gives them one.
        return None, 0.0, np.zeros(3)
    try:
        waveform = PGSE(small_delta=small_delta, big_delta=big_delta)
    except ValueError as err:
        hint = (
            " (a b = 0 row: give it DELTA = delta = 0, or the timing of its sequence)"
            if no_gradient
            else ""
        )
        raise ValueError(f"{where}: {err}{hint}") from err
    if not echo >= waveform.echo_time * (1.0 - 1e-9):
        raise ValueError(
            f"{where}: TE ({echo:g} s) is shorter than DELTA + delta "
            f"({waveform.echo_time:g} s)"
        )
    direction = np.asarray(direction, dtype=np.float64)
    norm = float(np.linalg.norm(direction))
    if not np.isfinite(strength) or strength < 0:
        raise ValueError(f"{where}: |G| must be finite and >= 0, got {strength!r}")
    if strength == 0 or norm == 0:
        return waveform, 0.0, np.zeros(3)
    if abs(norm - 1.0) > UNIT_ATOL:
        raise ValueError(
            f"{where}: direction (x, y, z) has length {norm:.6g}; it must be a "
            "unit vector"
        )
    # b = gamma^2 G^2 bfactor; with gamma in rad/(T um us) and bfactor in us^3
    # this is us/um^2, numerically s/mm^2.
    bval = (GAMMA_UM_US * strength) ** 2 * waveform.bfactor_us3
    return waveform, bval, direction / norm
