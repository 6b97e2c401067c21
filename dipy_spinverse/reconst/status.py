"""The status policy of the label search's fits: which fitted voxels get a
warning status, and the warnings a fit gives once.

A fit whose residual is far above a known noise level (``sigma > 0``) keeps
its outputs with the warning status ``POOR_FIT`` (:func:`poor_fit_bound`,
:func:`poor_fits`). With or without ``sigma``, a voxel whose attenuation is
above 1 beyond the noise keeps its outputs with the warning status
``IMPOSSIBLE_SIGNAL``, and every fitted voxel of a protocol that cannot
determine the membranes with ``UNDERDETERMINED`` (:func:`flag_implausible`;
one warning per fit, :func:`warn_implausible`). Negative samples are fitted
as given, with one warning (:func:`warn_negative`). The codes themselves are
:mod:`~dipy_spinverse.reconst.codes`'s.
"""

import math
import warnings

import numpy as np
from scipy.stats import chi2

from ..checks import check_int
from .codes import IMPOSSIBLE_SIGNAL, POOR_FIT_FALSE_ALARM, UNDERDETERMINED

__all__ = [
    "poor_fit_bound",
    "poor_fits",
    "flag_implausible",
    "warn_implausible",
    "count_negative",
    "warn_negative",
]


def poor_fit_bound(n_acquisitions, sigma, *, false_alarm=POOR_FIT_FALSE_ALARM):
    """Largest mean squared misfit of a fit consistent with the noise.

    ``sigma^2 * chi2.isf(false_alarm, n) / n``, see
    :data:`POOR_FIT_FALSE_ALARM`; ``inf`` when ``sigma`` is 0 (unknown).

    Parameters
    ----------
    n_acquisitions : int
        Acquisitions in the misfit (n).
    sigma : float
        Noise relative to the b = 0 signal (1/SNR).
    false_alarm : float
        Share of the fits that explain the data which lie above the bound.

    Returns
    -------
    float
    """
    if not sigma > 0:
        return math.inf
    n = check_int(n_acquisitions, "n_acquisitions", 1)
    return float(sigma**2 * chi2.isf(false_alarm, n) / n)


def poor_fits(loss, config, n_acquisitions, *, level):
    """Whether each fit's data loss is beyond the noise (status ``POOR_FIT``).

    Parameters
    ----------
    loss : ndarray (n,)
        The fits' data terms (:attr:`Reconstruction.loss`).
    config : InversionConfig
        The fit's settings (its ``loss_scale``).
    n_acquisitions : int
    level : float
        The relative noise the losses are measured in
        (:attr:`Reconstruction.noise_level`; 0: unknown, no fit is poor).

    Returns
    -------
    ndarray of bool (n,)
        ``loss / loss_scale`` above :func:`poor_fit_bound`.
    """
    bound = poor_fit_bound(n_acquisitions, level)
    return np.isfinite(loss) & (loss / config.loss.loss_scale > bound)


def flag_implausible(settings, impossible, result, rows):
    """Statuses ``IMPOSSIBLE_SIGNAL`` and ``UNDERDETERMINED`` of the fitted
    voxels ``rows`` (in place), over the fit's own warning statuses.

    ``impossible``: whether each of those voxels' attenuation exceeds 1
    beyond the noise (the gate's test,
    :func:`~dipy_spinverse.reconst.plausibility.impossible_signal`, with the
    fit's ``sigma`` or, without it, the voxel's own spread); they get
    ``IMPOSSIBLE_SIGNAL``. Where the protocol cannot determine the membranes
    (``settings.protocol_problems``), every other fitted voxel gets
    ``UNDERDETERMINED``. Both outrank ``POOR_FIT`` and ``UNCERTAIN_SURFACE``,
    which follow from them (the precedence of
    :mod:`~dipy_spinverse.reconst.codes`); the voxels keep their outputs.

    Parameters
    ----------
    settings : SearchSettings
        The fit's settings (its ``protocol_problems``).
    impossible : ndarray of bool (len(rows),)
        Whether each voxel of ``rows`` has an impossible signal.
    result : dict of ndarray
        The per-voxel parameters (``status`` updated in place).
    rows : ndarray of int
        The fitted voxels.

    Returns
    -------
    None
    """
    if not len(rows):
        return
    status = result["status"]
    if settings.protocol_problems:
        status[rows] = UNDERDETERMINED
    status[rows[impossible]] = IMPOSSIBLE_SIGNAL


def warn_implausible(model, status):
    """Warn once per fit of its ``IMPOSSIBLE_SIGNAL`` and ``UNDERDETERMINED``
    voxels (``status``: the statuses of the voxels the fit ran on), naming
    the cause and the fix.

    Parameters
    ----------
    model : ReconstModel
        The model: what its ``IMPOSSIBLE_SIGNAL`` voxels keep
        (``impossible_outputs``, a sentence of each method's model) and,
        where voxels are ``UNDERDETERMINED``, its ``protocol_problems``.
    status : array_like of int
        The statuses of the voxels the fit ran on.

    Returns
    -------
    None

    Warns
    -----
    RuntimeWarning
        Where voxels are ``IMPOSSIBLE_SIGNAL`` or ``UNDERDETERMINED``.
    """
    status = np.asarray(status)
    impossible = int(np.count_nonzero(status == IMPOSSIBLE_SIGNAL))
    if impossible:
        kept = model.impossible_outputs
        warnings.warn(
            f"{impossible} of {status.size} voxels have an attenuation above 1 "
            "beyond the noise, which no tissue produces; they have status "
            f"{IMPOSSIBLE_SIGNAL} (IMPOSSIBLE_SIGNAL) and {kept}. Check that the "
            "data's volumes are in the order of the gradient table and that its "
            "b = 0 volumes are the data's (b-values, b0_threshold).",
            RuntimeWarning,
            stacklevel=4,  # the user's model.fit call
        )
    underdetermined = int(np.count_nonzero(status == UNDERDETERMINED))
    if underdetermined:
        warnings.warn(
            "the protocol cannot determine the membranes: "
            + "; ".join(model.protocol_problems)
            + f". {underdetermined} of {status.size} voxels have status "
            f"{UNDERDETERMINED} (UNDERDETERMINED): their outputs are one of many "
            "answers that fit the data.",
            RuntimeWarning,
            stacklevel=4,
        )


def count_negative(data):
    """How many voxels of (n, n_volumes) ``data`` have a sample below 0."""
    with np.errstate(invalid="ignore"):  # NaN voxels are counted elsewhere
        return int(np.count_nonzero((np.asarray(data) < 0).any(axis=-1)))


def warn_negative(model, n_negative, n_voxels, *, stacklevel=4):
    """Warn that ``n_negative`` of ``n_voxels`` fitted voxels hold values < 0.

    Magnitude images cannot be negative; denoised or real-valued
    (phase-corrected) data can. Such voxels are fitted as given, neither
    clipped nor flagged; the warning says so, and that the Rician noise
    floor (``noise="rician"``) describes magnitude data only.

    Parameters
    ----------
    model : SpinverseSearchModel or SpinversePosteriorModel
        The model (the search's noise model is named where it matters).
    n_negative : int
        Voxels holding values < 0.
    n_voxels : int
        Voxels fitted.
    stacklevel : int
        Frames from here to the user's ``fit`` call.

    Returns
    -------
    None

    Warns
    -----
    UserWarning
        Where ``n_negative`` is not 0.
    """
    if not n_negative:
        return
    floor = ""
    loss = getattr(getattr(model, "config", None), "loss", None)
    # The floor is on where the noise is known: the model's sigma, or its
    # configuration's own relative one.
    if loss is not None and loss.noise == "rician" and model.noise_known:
        floor = (
            "; the Rician noise floor of noise='rician' describes magnitude "
            "data: for real-valued data use noise='gaussian'"
        )
    warnings.warn(
        f"{n_negative} of {n_voxels} voxels have negative samples (magnitude "
        f"images cannot be negative: denoised or real-valued data?). Negative "
        f"samples are fitted as given, not clipped{floor}.",
        UserWarning,
        stacklevel=stacklevel,
    )
