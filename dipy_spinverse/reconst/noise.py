"""The one noise convention of the models: ``sigma`` in the data's units.

DIPY's noise estimates (:func:`~dipy.denoise.noise_estimate.estimate_sigma`,
:func:`~dipy.denoise.noise_estimate.piesno`) give the noise standard
deviation in the units of the image, and both fit methods take it so
(``SpinverseModel(gtab, sigma=s)``). Each voxel's relative noise is then
``sigma`` over its own mean b = 0 signal (:func:`relative_noise`, computed
once by the gate): a voxel of bright b = 0 is less noisy, relative to its
signal, than a dark one. Below the DIPY layer the fits work in relative
units: the posterior takes each voxel's relative noise, and the inversion
one relative level per fit (:func:`reference_noise`, its
:class:`~dipy_spinverse.inverse.config.LossConfig`'s ``sigma``) with each
voxel's own noise in its precisions (:func:`~dipy_spinverse.reconst.gate.admit`).
"""

import warnings

import numpy as np
from dipy.utils.logging import logger

from ..checks import OptionError

__all__ = [
    "CheckedSigma",
    "NOISE_HINT",
    "SUSPECT_SNR",
    "check_below_b0",
    "check_sigma",
    "require_sigma",
    "reference_noise",
    "relative_noise",
    "warn_noise",
]

#: What ``sigma`` is, in the models' error messages (the workflow, whose
#: flags are named otherwise, puts its own words here).
NOISE_HINT = (
    "(the noise standard deviation in the data's units, as DIPY's noise "
    "estimates give it: e.g. np.median(dipy.denoise.noise_estimate."
    "estimate_sigma(data)), or the mean b=0 signal over its SNR)"
)

#: A median SNR above this (sigma below 1/1000 of the b = 0 signal) is no
#: MR image's: the likeliest cause is a noise level relative to the b = 0
#: signal (1/SNR) given as if it were in the data's units, and the fit says
#: so (the data are fitted as given).
SUSPECT_SNR = 1000.0


class CheckedSigma(float):
    """A noise level :func:`check_sigma` has checked, in the data's units.

    :func:`check_sigma` returns one and takes one back as it is, so that a
    value checked where it was given (the command line, before any data
    are read) is not checked again by the model it is handed to. Made
    directly, it still holds only a finite level >= 0.
    """

    __slots__ = ()

    def __new__(cls, value):
        level = float.__new__(cls, value)
        if not (np.isfinite(level) and level >= 0):
            raise ValueError(
                f"CheckedSigma holds a finite noise level >= 0, got {value!r}; "
                "make it with check_sigma."
            )
        return level


def check_sigma(sigma, *, name="sigma", n_volumes=None):
    """``sigma`` in the data's units as one float (0 when None: unknown).

    A :class:`CheckedSigma` (what this function returns) is returned as it
    is: every value is checked once.

    Parameters
    ----------
    sigma : float, array_like (n_volumes,) or None
        The noise standard deviation in the data's units; one per volume
        (as :func:`~dipy.denoise.noise_estimate.estimate_sigma` returns it
        for 4-D data) is taken as its root mean square, and the log says so.
    name : str
        The argument's name in the messages.
    n_volumes : int, optional
        The volumes of the gradient table: a ``sigma`` per volume must hold
        that many (one of another length belongs to other data).

    Returns
    -------
    CheckedSigma
        At least 0; 0 for None.

    Raises
    ------
    ValueError
        Not a finite, non-negative number (or 1-D array of them).
    """
    if isinstance(sigma, CheckedSigma):
        return sigma
    if sigma is None:
        return CheckedSigma(0.0)
    try:
        value = np.asarray(sigma, dtype=np.float64)
    except (TypeError, ValueError):
        value = None
    if (
        value is None
        or isinstance(sigma, (bool, np.bool_, str, bytes))
        or value.ndim > 1
        or value.size == 0
        or not np.isfinite(value).all()
        or (value < 0).any()
    ):
        raise ValueError(
            f"{name} must be a finite number >= 0, or one per volume {NOISE_HINT}, "
            f"got {sigma!r}."
        )
    if value.ndim == 1 and n_volumes is not None and value.size != n_volumes:
        raise ValueError(
            f"{name} holds {value.size} noise levels but the gradient table has "
            f"{n_volumes} volumes: give one value {NOISE_HINT}, or one per "
            "volume of these data."
        )
    if value.ndim == 1:
        rms = float(np.sqrt(np.mean(value**2)))
        logger.info(
            f"{name}: {value.size} noise levels (one per volume; "
            f"{value.min():.4g}-{value.max():.4g}) taken as their root mean "
            f"square, {rms:.4g}, in the data's units."
        )
        return CheckedSigma(rms)
    return CheckedSigma(value)


def require_sigma(sigma, *, fit_method, n_volumes):
    """``sigma`` checked (:func:`check_sigma`) and known: the posterior
    methods need the noise level, above 0.

    Parameters
    ----------
    sigma : float, array_like (n_volumes,) or None
        As :func:`check_sigma` takes it.
    fit_method : str
        The method that needs it, named in the refusal.
    n_volumes : int
        The volumes of the gradient table.

    Returns
    -------
    CheckedSigma
        Above 0.

    Raises
    ------
    OptionError
        ``sigma`` None or 0, naming ``fit_method`` and ``sigma``; a
        ValueError (:func:`check_sigma`) for a value that is no noise level.
    """
    sigma = check_sigma(sigma, n_volumes=n_volumes)
    if not sigma > 0:
        raise OptionError(
            f"fit_method={fit_method!r} needs the noise level: pass sigma {NOISE_HINT}",
            options=("fit_method", "sigma"),
        )
    return sigma


def check_below_b0(sigma, median, *, name="sigma", voxels="of the voxels", hint=None):
    """Refuse a noise level not below the median b = 0 signal.

    The one check of it, for every caller: the models' (through
    :func:`reference_noise`, in Python's names) and the command's (its
    dataset's noise, in its flags' names, given by the arguments).

    Parameters
    ----------
    sigma : float
        The noise in the data's units.
    median : float
        The median b = 0 signal of the voxels it refers to.
    name : str, optional
        The argument that gave ``sigma``, as the caller names it.
    voxels : str, optional
        Whose median it is, as the caller says it (``"of the voxels"``).
    hint : str, optional
        What to pass instead, as the caller says it; default what ``sigma``
        is in the models' words (:data:`NOISE_HINT`).

    Returns
    -------
    None

    Raises
    ------
    OptionError
        ``sigma`` is not below ``median``; the message names ``name`` (its
        option) and the fix.
    """
    if sigma < median:
        return
    hint = NOISE_HINT[1:-1] if hint is None else hint
    raise OptionError(
        f"{name} {sigma:.4g} is not below the median b=0 signal {median:.4g} "
        f"{voxels}: a noise level cannot be as large as the signal; pass {hint}",
        options=(name,),
    )


def relative_noise(sigma, s0):
    """Each voxel's noise over its own mean b = 0 signal.

    Parameters
    ----------
    sigma : float
        The noise in the data's units (0: unknown).
    s0 : array_like (n,)
        Each voxel's mean b = 0 signal.

    Returns
    -------
    ndarray (n,)
        ``sigma / s0``; 0 everywhere when ``sigma`` is 0, NaN where ``s0`` is
        not positive (the gate flags those voxels).
    """
    s0 = np.asarray(s0, dtype=np.float64)
    if not sigma > 0:
        return np.zeros(s0.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s0 > 0, sigma / s0, np.nan)


def reference_noise(sigma, s0):
    """The relative noise one fit's losses are measured in.

    ``sigma`` over the median of the voxels' mean b = 0 signals: one level
    for the whole fit, so that its losses compare from chunk to chunk; each
    voxel's own noise enters its precisions
    (:func:`~dipy_spinverse.reconst.gate.admit`).

    Parameters
    ----------
    sigma : float
        The noise in the data's units (0: unknown).
    s0 : array_like (n,)
        The fitted voxels' mean b = 0 signals; those not finite and positive
        (the gate flags them) are left out.

    Returns
    -------
    float
        0 when ``sigma`` is 0 or no voxel has a positive b = 0 signal.

    Raises
    ------
    OptionError
        ``sigma`` is not below the median b = 0 signal
        (:func:`check_below_b0`).
    """
    if not sigma > 0:
        return 0.0
    s0 = np.asarray(s0, dtype=np.float64).ravel()
    s0 = s0[np.isfinite(s0) & (s0 > 0)]
    if not len(s0):
        return 0.0  # every voxel is flagged by the gate (BAD_B0)
    median = float(np.median(s0))
    check_below_b0(sigma, median)
    return sigma / median


def warn_noise(relative, *, snr_range=None):
    """Log the fitted voxels' SNR; warn where ``sigma`` cannot be right.

    Parameters
    ----------
    relative : array_like (n,)
        The fitted voxels' relative noise (:func:`relative_noise`).
    snr_range : (float, float), optional
        The SNR an estimator was trained on: voxels outside it are counted
        in a warning (its intervals are not calibrated there).

    Returns
    -------
    None
    """
    relative = np.asarray(relative, dtype=np.float64)
    relative = relative[np.isfinite(relative) & (relative > 0)]
    if not len(relative):
        return
    snr = 1.0 / relative
    median = float(np.median(snr))
    logger.info(
        f"Noise: SNR of the b=0 signal {median:.3g} (median of {len(snr)} "
        f"voxels; {snr.min():.3g}-{snr.max():.3g})."
    )
    if median > SUSPECT_SNR:
        warnings.warn(
            f"sigma gives these voxels a median SNR of {median:.3g}: sigma is "
            "the noise in the data's units (DIPY's convention), not relative to "
            "the b=0 signal. If you passed 1/SNR, pass sigma = (mean b=0 "
            "signal) / SNR instead.",
            UserWarning,
            stacklevel=4,  # the user's model.fit call
        )
    if snr_range is None:
        return
    low, high = snr_range
    above, below = int((snr > high).sum()), int((snr < low).sum())
    if above or below:
        warnings.warn(
            f"{above} voxels above and {below} below the SNR the posterior is "
            f"trained on ({low:g}-{high:g}; of {len(snr)} fitted): their "
            "intervals are not calibrated. On data of higher SNR pass the "
            "largest noise the model's own errors allow (sigma = b=0 signal / "
            f"{high:g}); or train with posterior_options=dict(snr_range=...).",
            UserWarning,
            stacklevel=4,  # the user's model.fit call
        )
