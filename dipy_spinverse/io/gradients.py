"""The gradient table of a dataset: b-values, b-vectors and pulse timings.

:func:`read_gradients` reads a dataset's ``.bval``/``.bvec`` files and its
timing (one ``big_delta``/``small_delta`` pair, a per-volume timing file or
a scheme file) into a DIPY ``GradientTable`` or a
:class:`~dipy_spinverse.sim.sequences.Protocol`, with the checks that name
the file at fault; :func:`read_timing` reads a timing file. Options are
named as its arguments: a refusal that names them is an
:class:`~dipy_spinverse.checks.OptionError`, and a log line that names
them carries them (``extra={"options": ...}``), so that a command rewords
both in its flags (:func:`dipy_spinverse.workflows.cli.options_as_flags`).
"""

import os

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.io.gradients import read_bvals_bvecs
from dipy.utils.logging import logger

from ..checks import OptionError, check_number
from ..sim.sequences import check_bvals, unit_rows
from ..sim.waveforms import PGSE
from .camino import read_scheme

__all__ = ["read_gradients", "read_timing", "B0_THRESHOLD", "BVECS_TOL"]

#: DIPY's defaults (``gradient_table``): b-values at or below this are b = 0
#: volumes (s/mm^2), and the b-vectors' unit norm is checked to this.
B0_THRESHOLD = 50.0
BVECS_TOL = 0.01

# Camino b-values are recomputed from G and the timing; allow this much
# disagreement with the bval file (relative, plus an absolute s/mm^2 slack).
_BVAL_RTOL, _BVAL_ATOL = 0.01, 5.0

# The options of the gradient timing, as the messages name them.
_PULSES = ("small_delta", "big_delta")
_TIMING = ("big_delta", "small_delta", "timing_file", "scheme_file")

#: Ratio between the b = 0 levels of two groups of volumes (medians over
#: the mask) above which one timing is doubted: noise moves a median over
#: the mask by far less, a longer echo time by far more (2x at TE 80 ms
#: -> 130 ms, T2 70 ms).
_B0_LEVEL_RATIO = 1.2


def read_gradients(
    bval,
    bvec,
    *,
    n_volumes,
    big_delta=None,
    small_delta=None,
    timing_file=None,
    scheme_file=None,
    b0_threshold=B0_THRESHOLD,
    bvecs_tol=BVECS_TOL,
    data=None,
):
    """GradientTable (or Protocol) with timing from exactly one source.

    Parameters
    ----------
    bval, bvec : str or path
        FSL-style b-values (s/mm^2) and b-vectors files.
    n_volumes : int
        Volumes of the data: the files must list as many.
    big_delta, small_delta : float, optional
        One pulse timing (s) for every volume.
    timing_file : str or path, optional
        One "small_delta big_delta" row (s) per volume.
    scheme_file : str or path, optional
        A Camino scheme file (its b-values and directions must match).
    b0_threshold : float
        b-values up to it are b = 0 volumes (:data:`B0_THRESHOLD`); the
        table must have one at least, since each voxel is normalised by its
        b = 0 signal.
    bvecs_tol : float
        Tolerance of the b-vectors' unit norm (:data:`BVECS_TOL`).
    data : ndarray (n_voxels, n_volumes), optional
        With one timing (``big_delta``, ``small_delta``), checked for b = 0
        volumes of several levels: the mark of several echo or diffusion
        times.

    Returns
    -------
    GradientTable or Protocol
        The table with ``big_delta`` and ``small_delta`` per volume (a
        :class:`~dipy_spinverse.sim.sequences.Protocol` from a scheme file).

    Raises
    ------
    ValueError
        Naming the file or the option at fault, with the fix: among others
        b-values in another unit than s/mm^2, times in milliseconds, no
        b = 0 volume. Where it names options (as these arguments), an
        :class:`~dipy_spinverse.checks.OptionError`.
    """
    try:
        bvals, bvecs = read_bvals_bvecs(os.fspath(bval), os.fspath(bvec))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot read the gradient files {bval} and {bvec} ({err}); pass "
            "the .bval and .bvec files of this dataset, one value and one "
            "direction per volume."
        ) from err
    b0_threshold = check_number(b0_threshold, "b0_threshold", minimum=0.0)
    # Checked here to name the file; the model checks them again as gtab.bvals.
    check_bvals(bvals, b0_threshold=b0_threshold, name=f"the b-values file {bval}")
    if len(bvals) != n_volumes:
        raise ValueError(
            f"{bval} lists {len(bvals)} b-values but the data have {n_volumes} "
            "volumes; pass the b-values file of this dataset."
        )
    pulses = big_delta is not None or small_delta is not None
    sources = [pulses, timing_file is not None, scheme_file is not None]
    if sum(sources) != 1:
        raise OptionError(
            "the gradient timing is needed, from exactly one source: "
            "big_delta and small_delta (seconds), timing_file (one "
            "'small_delta big_delta' row per volume) or scheme_file (Camino)",
            options=_TIMING,
        )
    if scheme_file is not None:
        try:
            protocol, _ = read_scheme(scheme_file)
        except OSError as err:
            raise ValueError(
                f"cannot read the scheme file {scheme_file}: {err}"
            ) from err
        if len(protocol) != n_volumes:
            raise ValueError(
                f"{scheme_file} has {len(protocol)} acquisitions but the data have "
                f"{n_volumes} volumes; pass the scheme of this dataset."
            )
        nominal = np.where(bvals <= b0_threshold, 0.0, bvals)
        if not np.allclose(protocol.bvals, nominal, rtol=_BVAL_RTOL, atol=_BVAL_ATOL):
            worst = int(np.argmax(np.abs(protocol.bvals - nominal)))
            raise ValueError(
                f"{scheme_file} and {bval} disagree: volume {worst} has b = "
                f"{protocol.bvals[worst]:.1f} s/mm^2 in the scheme and "
                f"{bvals[worst]:.1f} in the b-values file; pass files of the same "
                "acquisition."
            )
        _check_scheme_b0(protocol, scheme_file)
        _check_scheme_directions(protocol, bvecs, scheme_file, bvec)
        return protocol
    if pulses:
        if big_delta is None or small_delta is None:
            raise OptionError(
                "pass both big_delta and small_delta (seconds), e.g. "
                "big_delta=0.02 and small_delta=0.01",
                options=_PULSES,
            )
        _check_pulse_timing(small_delta, big_delta)
        if data is not None:
            _check_one_b0_level(data, bvals <= b0_threshold)
    else:
        small_delta, big_delta = read_timing(timing_file, n_volumes=n_volumes)
    _check_unit_bvecs(bvals, bvecs, bvec, b0_threshold, bvecs_tol)
    _check_b0(bvals, bval, b0_threshold)
    return gradient_table(
        bvals,
        bvecs=bvecs,
        big_delta=big_delta,
        small_delta=small_delta,
        b0_threshold=b0_threshold,
        atol=bvecs_tol,
    )


def _check_pulse_timing(small_delta, big_delta):
    """Refuse, naming both, a ``small_delta``/``big_delta`` pair that the
    model would refuse later (the checks of
    :class:`~dipy_spinverse.sim.waveforms.PGSE`: seconds,
    ``big_delta >= small_delta``), with the pair as given."""
    try:
        pairs = np.unique(
            np.column_stack(
                np.broadcast_arrays(
                    np.ravel(np.asarray(small_delta, dtype=float)),
                    np.ravel(np.asarray(big_delta, dtype=float)),
                )
            ),
            axis=0,
        )
    except (TypeError, ValueError) as err:
        raise OptionError(
            f"small_delta {small_delta!r} and big_delta {big_delta!r} must be "
            "numbers in seconds, e.g. small_delta=0.01 and big_delta=0.02",
            options=_PULSES,
        ) from err
    for small, big in pairs:
        try:
            PGSE(small_delta=float(small), big_delta=float(big))
        except ValueError as err:
            fix = ""
            if "milliseconds" in str(err):
                # One of the two is refused as milliseconds: the other was
                # most likely typed in the same unit, unless it is below 1
                # (lobes and separations are ms to tens of ms: under 1 in
                # seconds, rarely under 1 in milliseconds).
                small_s, big_s = (v / 1000 if v >= 1 else v for v in (small, big))
                fix = (
                    f" Pass both in seconds: small_delta={small_s:g} and "
                    f"big_delta={big_s:g}."
                )
            raise OptionError(
                f"small_delta {small:g} and big_delta {big:g}: {err}.{fix}",
                options=_PULSES,
            ) from err


def _check_b0(bvals, bval, b0_threshold):
    """Refuse, naming ``b0_threshold``, a table without b = 0 volume: every
    voxel is normalised by its b = 0 signal, and the model's own refusal
    speaks of ``gradient_table``, which a user of the command line never
    called."""
    lowest = float(np.min(bvals))
    if lowest <= b0_threshold:
        return
    if lowest <= B0_THRESHOLD:
        # Scanners store b = 0 volumes with a small nominal b (5 or 10
        # s/mm^2); DIPY's default threshold is set above those, so the
        # volumes at the lowest b are likely the b = 0 ones.
        fix = (
            f"If the volumes at b = {lowest:g} are the b = 0 ones (stored with "
            f"a small nominal b-value), pass b0_threshold={lowest:g}; otherwise "
            "add the b = 0 volumes of the acquisition."
        )
    else:
        fix = (
            f"b = {lowest:g} s/mm^2 is a diffusion-weighted shell (above DIPY's "
            f"default b0_threshold of {B0_THRESHOLD:g}), not b = 0 volumes: add "
            "the b = 0 volumes of the acquisition to the data and the gradient "
            "files."
        )
    raise OptionError(
        f"{bval} has no b = 0 volume: its smallest b-value is {lowest:g} s/mm^2, "
        f"above b0_threshold {b0_threshold:g} s/mm^2, and each voxel is "
        f"normalised by its b = 0 signal. {fix}",
        options=("b0_threshold",),
    )


def _check_scheme_b0(protocol, scheme_file):
    """Refuse a scheme without b = 0 row (``|G| = 0``): the b = 0 volumes of
    a scheme are its rows without gradient, whatever ``b0_threshold``."""
    if (protocol.bvals == 0).any():
        return
    raise OptionError(
        f"{scheme_file} has no b = 0 row (|G| = 0 or a zero direction): its "
        f"smallest b-value is {protocol.bvals.min():g} s/mm^2, and each voxel is "
        "normalised by its b = 0 signal. Write the b = 0 rows of the acquisition "
        "with |G| = 0 (b0_threshold applies to the b-values file, not to a "
        "scheme's rows)",
        options=("b0_threshold",),
    )


def _check_one_b0_level(data, b0s):
    """Warn (log) where the b = 0 volumes fall into groups whose levels
    differ by more than ``_B0_LEVEL_RATIO``: data of several echo or
    diffusion times, fitted with one timing."""
    b0s = np.flatnonzero(b0s)
    if b0s.size < 2:
        return
    levels = np.array([np.median(data[:, v]) for v in b0s], dtype=float)
    if not (np.isfinite(levels).all() and levels.min() > 0):
        return
    order = np.argsort(levels)
    jumps = levels[order][1:] / levels[order][:-1]
    cut = int(np.argmax(jumps))
    if jumps[cut] <= _B0_LEVEL_RATIO:
        return
    low, high = np.sort(b0s[order[: cut + 1]]), np.sort(b0s[order[cut + 1 :]])

    def named(volumes):
        return ", ".join(str(v) for v in volumes[:8]) + (
            ", ..." if len(volumes) > 8 else ""
        )

    logger.warning(
        f"the b = 0 volumes fall into groups of different levels: volume(s) "
        f"{named(low)} at a median of {np.median(levels[order[: cut + 1]]):.4g}, "
        f"volume(s) {named(high)} at {np.median(levels[order[cut + 1 :]]):.4g} "
        f"({jumps[cut]:.2f}x). The data look acquired with several echo or "
        "diffusion times, but one timing (big_delta, small_delta) is given: "
        "give each volume its timing with timing_file (one 'small_delta "
        "big_delta' row per volume), or fit each acquisition on its own.",
        extra={"options": _TIMING},
    )


def _check_unit_bvecs(bvals, bvecs, bvec, b0_threshold, bvecs_tol):
    """Refuse, naming the file and the volumes, the b-vectors of diffusion-
    weighted volumes that are not unit within ``bvecs_tol`` (DIPY's check,
    which names neither)."""
    weighted = np.flatnonzero(np.asarray(bvals) > b0_threshold)
    norms = np.linalg.norm(np.asarray(bvecs, dtype=float)[weighted], axis=1)
    off = ~(np.abs(norms - 1) <= bvecs_tol)
    if not off.any():
        return
    first = int(np.argmax(off))
    volume, length = int(weighted[first]), float(norms[first])
    hint = (
        " A zero vector on a volume above b0_threshold is a b = 0 volume "
        f"stored as b = {bvals[volume]:g}: raise b0_threshold above it."
        if length < bvecs_tol
        else " Renormalise the vectors, or raise bvecs_tol if they are known "
        "to be this far off."
    )
    raise OptionError(
        f"{bvec}: {int(off.sum())} diffusion-weighted volume(s) have a b-vector "
        f"that is not unit within bvecs_tol {bvecs_tol:g} (volume {volume}: "
        f"length {length:.4f}, b = {bvals[volume]:g} s/mm^2).{hint}",
        options=("b0_threshold", "bvecs_tol"),
    )


#: Largest angle (degrees) between a scheme's direction and the b-vector
#: file's: schemes are written with 4-6 decimals (0.01 degree).
_SCHEME_ANGLE_TOL = 2.0


def _check_scheme_directions(protocol, bvecs, scheme_file, bvec):
    """Refuse a scheme whose directions are not the b-vector file's."""
    weighted = protocol.bvals > 0
    # A zero direction (unit_rows leaves it zero) counts as 90 degrees off.
    cosine = np.abs(
        np.sum(unit_rows(protocol.bvecs[weighted]) * unit_rows(bvecs[weighted]), 1)
    )
    angle = np.degrees(np.arccos(np.clip(cosine, 0, 1)))
    if angle.size and angle.max() > _SCHEME_ANGLE_TOL:
        worst = int(np.flatnonzero(weighted)[np.argmax(angle)])
        raise ValueError(
            f"{scheme_file} and {bvec} disagree: volume {worst}'s direction "
            f"differs by {angle.max():.1f} degrees; pass files of the same "
            "acquisition (the fit uses the scheme's directions)."
        )


def read_timing(path, *, n_volumes=None):
    """Read a per-volume timing file.

    Parameters
    ----------
    path : str or os.PathLike
        Text with one ``small_delta big_delta`` row per volume, in seconds
        (two rows of ``n_volumes`` values are accepted too); ``#`` starts a
        comment.
    n_volumes : int, optional
        Expected number of volumes.

    Returns
    -------
    small_delta, big_delta : ndarray
    """
    try:
        table = np.loadtxt(os.fspath(path), ndmin=2)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the timing file {path}: {err}") from err
    if table.shape[1] != 2 and table.shape[0] == 2:
        table = table.T
    if table.shape[1] != 2 or (n_volumes is not None and len(table) != n_volumes):
        expected = n_volumes if n_volumes is not None else "n"
        message = (
            f"{path} must hold one 'small_delta big_delta' row per volume "
            f"({expected} rows of 2 values, seconds), got shape {table.shape}."
        )
        if len(table) == 1:
            raise OptionError(
                f"{message} For one diffusion time, give small_delta and "
                "big_delta instead of a file",
                options=_PULSES,
            )
        raise ValueError(message)
    bad = np.flatnonzero(~np.isfinite(table).all(axis=1))
    if bad.size:
        where = ", ".join(str(r) for r in bad[:8]) + (", ..." if bad.size > 8 else "")
        raise ValueError(
            f"timing file {path}: volume(s) {where} (rows, from 0) hold NaN or "
            "inf; give every volume, b = 0 ones included, the small_delta and "
            "big_delta (seconds) of the sequence it belongs to."
        )
    for small_delta, big_delta in np.unique(table, axis=0):
        try:  # the waveform's own checks (seconds, Delta >= delta), named here
            PGSE(small_delta=float(small_delta), big_delta=float(big_delta))
        except ValueError as err:
            rows = np.flatnonzero((table == (small_delta, big_delta)).all(axis=1))
            where = ", ".join(str(r) for r in rows[:8]) + (
                ", ..." if len(rows) > 8 else ""
            )
            raise ValueError(
                f"timing file {path}: volume(s) {where}: {err}. Every volume, "
                "b = 0 ones included, needs the timing of the sequence it "
                "belongs to."
            ) from err
    return table[:, 0], table[:, 1]
