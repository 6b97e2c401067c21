"""Data no tissue produces, and protocols that cannot determine the membranes.

Two checks that hold whatever the fit returns, so that neither a fit that
happens to match impossible data nor one of the many answers an
underdetermined protocol allows passes as ``OK``:

:func:`impossible_signal`
    Per voxel, both fit methods, with or without a noise model: the
    attenuation of a sequence above 1 beyond the noise (status
    ``IMPOSSIBLE_SIGNAL``).
:func:`protocol_problems`
    Per protocol (``fit_method="search"``): diffusion-weighted directions
    that do not span 3-D, or a single diffusion time (status
    ``UNDERDETERMINED`` for every fitted voxel).
"""

import numpy as np
from scipy.stats import norm, t

from .codes import POOR_FIT_FALSE_ALARM

__all__ = [
    "DIRECTION_TOLERANCE",
    "ROUNDING",
    "impossible_signal",
    "protocol_problems",
]

#: Smallest eigenvalue, over the trace, of the mean outer product of the
#: diffusion-weighted unit directions below which they do not span 3-D. The
#: eigenvalue is the mean squared component of the directions along the
#: least-encoded axis: at 1e-3 their RMS component along it is 3 % (within
#: about 2 degrees of a plane), so that axis is encoded by about a thousandth
#: of the b-value (3 s/mm^2 at b = 3000), which no restriction shows
#: through. Directions spread over the sphere give 1/3; a plane or a line
#: of b-vectors stored to four decimals, about 1e-9.
DIRECTION_TOLERANCE = 1e-3

#: Excess over 1 of a mean attenuation that float64 rounding cannot make: a
#: ratio and a mean of thousands of volumes err by about 1e-13; a signal
#: above 1 by less is taken as 1, so that noise-free data (no spread at
#: all) equal to their b = 0 are not flagged.
ROUNDING = 1e-9


def impossible_signal(
    signals, protocol, *, sigma=0.0, false_alarm=POOR_FIT_FALSE_ALARM
):
    """Whether each voxel's attenuation exceeds 1 beyond the noise.

    No tissue attenuates the diffusion-weighted signal above its b = 0
    signal: each spin's magnetisation is its b = 0 magnetisation times a
    phase factor of modulus 1 (and the same relaxation and wall losses), so
    the magnitude of their sum is at most the b = 0 signal of the same echo
    time. A sequence whose mean attenuation is above 1 beyond the noise
    comes from mislabelled b = 0 volumes, volumes in another order than the
    gradient table, or scaling that differs between volumes.

    Parameters
    ----------
    signals : VoxelSignals
        The voxels, each sequence normalised by its own b = 0 signal
        (:class:`~dipy_spinverse.sim.signals.VoxelSignals`).
    protocol : Protocol
        Their acquisitions.
    sigma : float or array_like (n,)
        Each voxel's noise relative to its mean b = 0 signal (1/SNR), or 0
        when not known.
    false_alarm : float
        Largest share of voxels of true attenuations at most 1 that are
        flagged (Bonferroni: each of the m sequences tested is tested at
        ``false_alarm / m``).

    Returns
    -------
    ndarray of bool (n,)
        False where a signal is not finite (flagged elsewhere).

    Notes
    -----
    Each sequence whose normalisation has the same or a shorter echo time
    than its own (its own b = 0 volumes, or all of them, see
    :func:`~dipy_spinverse.sim.signals.b0_scale`: a b = 0 of a longer echo
    time would lift a true attenuation above 1 by T2 decay) is tested with
    the mean ``m`` of its ``n_dw`` diffusion-weighted attenuations, one
    sided, against ``1 + ROUNDING``. Its standard error counts the noise of
    the b = 0 mean (of ``n_b0`` volumes) that every attenuation is divided
    by (delta method): ``s * sqrt(1 / n_dw + m^2 / n_b0)``.

    With ``sigma`` the test is a z-test, ``s`` the sequence's relative noise
    (``sigma`` over its relative b = 0 signal when echo times differ:
    :func:`~dipy_spinverse.sim.signals.noise_precision`). The Rician floor
    of magnitude data does not lift a true attenuation above 1: the mean
    magnitude grows with the signal, so a diffusion-weighted mean is at most
    the b = 0 mean; the ratio's own bias (about ``sigma^2 / n_b0``) is far
    inside the margin (at least ``sigma / sqrt(n_b0)`` times the critical
    value, about 5 at the default rate).

    Without ``sigma`` it is a t-test with ``n_dw - 1`` degrees of freedom,
    ``s`` the sample standard deviation of the sequence's attenuations. It
    is conservative: ``s`` holds the noise and the spread of the true
    attenuations over b-values and directions, so it over-estimates the
    noise, the statistic is smaller than the t-test's of the noise alone,
    and a tissue with attenuations up to 1 is flagged at most at
    ``false_alarm``; the price is power, where the signal varies much or a
    sequence has few volumes. With ``s == 0`` (noise-free data) any mean
    above ``1 + ROUNDING`` is flagged; a sequence of one diffusion-weighted
    volume has no spread and is not tested.
    """
    normalised = np.asarray(signals.normalised, dtype=np.float64)
    flagged = np.zeros(len(normalised), dtype=bool)
    sigma = np.asarray(sigma, dtype=np.float64)
    known = bool(np.all(sigma > 0))
    tests = [
        (dw, n_b0) for dw, n_b0 in _testable_sequences(protocol) if known or len(dw) > 1
    ]
    if not tests or not len(normalised):
        return flagged
    alpha = false_alarm / len(tests)
    for dw, n_b0 in tests:
        attenuation = normalised[:, dw]
        mean = attenuation.mean(axis=1)
        if known:
            # The sequence's own relative noise: its b = 0 is smaller
            # than the mean b = 0 under T2 decay.
            precision = np.asarray(signals.precision, dtype=np.float64)[:, dw[0]]
            noise = sigma / np.sqrt(precision)
            critical = norm.isf(alpha)
        else:
            noise = attenuation.std(axis=1, ddof=1)
            critical = t.isf(alpha, len(dw) - 1)
        error = noise * np.sqrt(1.0 / len(dw) + mean**2 / n_b0)
        with np.errstate(invalid="ignore"):  # NaN voxels compare False
            flagged |= mean - (1.0 + ROUNDING) > critical * error
    return flagged


def _testable_sequences(protocol):
    """``(diffusion-weighted indices, b = 0 volumes of its normalisation)``
    of each sequence whose b = 0 normalisation keeps a true attenuation at
    or below 1 (see :func:`impossible_signal`)."""
    b0 = protocol.bvals == 0
    if not b0.any():  # no normalisation: the data are taken as normalised
        return []
    echo = protocol.echo_times
    out = []
    for _, idx in protocol.sequences():
        dw = idx[~b0[idx]]
        own = idx[b0[idx]]
        used = own if len(own) else np.flatnonzero(b0)
        if len(dw) and echo[used].max() <= echo[dw].min():
            out.append((dw, len(used)))
    return out


def protocol_problems(protocol):
    """Why ``protocol`` cannot determine the membranes of a label search.

    Parameters
    ----------
    protocol : Protocol

    Returns
    -------
    tuple of str
        One sentence per problem, each naming its fix; empty when none.

    Notes
    -----
    Two properties of the diffusion-weighted acquisitions are checked:

    * Their unit directions must span 3-D: the smallest eigenvalue of their
      mean outer product is at least :data:`DIRECTION_TOLERANCE` of its
      trace. A gradient sees restriction only along itself, and the grid
      of membranes is 3-D: along an axis no gradient encodes, any membranes
      give the same signal.
    * They must have more than one timing (waveform; for PGSE, one
      ``(small_delta, big_delta)`` pair). At one diffusion time restriction,
      permeability and size trade off: a smaller cell of leakier membranes
      attenuates as a larger tighter one. How the signal changes with the
      diffusion time is what the method inverts (its curriculum fits the
      sequences from the longest diffusion time to the shortest).
    """
    weighted = protocol.bvals > 0
    if not weighted.any():
        return ()
    problems = []
    directions = protocol.bvecs[weighted]
    dyadic = directions.T @ directions / len(directions)
    eigenvalues = np.linalg.eigvalsh(dyadic)
    flat = eigenvalues < DIRECTION_TOLERANCE * np.trace(dyadic)
    if flat[0]:
        shape = "one axis" if flat[1] else "one plane"
        problems.append(
            f"the diffusion-weighted gradient directions lie along {shape} "
            f"(smallest eigenvalue of their mean outer product "
            f"{eigenvalues[0]:.2g}, below {DIRECTION_TOLERANCE:g} of its trace), "
            "so restriction across it is never measured; acquire directions "
            "spread over the sphere (e.g. dipy.core.sphere.disperse_charges)"
        )
    timings = [w for w, idx in protocol.groups() if weighted[idx].any()]
    if len(timings) == 1:
        problems.append(
            f"every diffusion-weighted volume has one timing ({timings[0]!r}), "
            "and at one diffusion time restriction, permeability and cell size "
            "trade off; acquire two or more diffusion times (big_delta), or use "
            "fit_method='posterior', whose calibrated intervals say what one "
            "diffusion time leaves open"
        )
    return tuple(problems)
