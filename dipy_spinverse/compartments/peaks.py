"""Fibre directions and counts per voxel from DIPY's constrained spherical
deconvolution (CSD), the starts of the multi-fibre compartment fits.

CSD needs one shell: the highest shell with enough directions is used
(with the b = 0 volumes). The response is DIPY's single-fibre response from
the voxels of highest FA unless one is given (a generic fibre's, with a
warning, where no voxel is anisotropic enough).

References
----------
Tournier et al., NeuroImage 35, 1459 (2007) (constrained spherical
deconvolution).
"""

import warnings

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.data import default_sphere
from dipy.direction import peaks_from_model
from dipy.reconst.csdeconv import (
    ConstrainedSphericalDeconvModel,
    response_from_mask_ssst,
)
from dipy.reconst.dti import TensorModel
from dipy.reconst.shm import descoteaux07_legacy_msg

from ..sim.sequences import unit_rows

__all__ = ["CSDUnavailableError", "csd_peaks", "select_shell"]

# Shells are told apart to this precision (s/mm^2).
_SHELL_ROUNDING = 100.0
# CSD's spherical-harmonic order is capped at 8 (45 coefficients), the usual
# choice; lower where the shell has fewer directions than coefficients.
_MAX_SH_ORDER = 8
# Voxels used for the automatic response: FA above this (DIPY's default).
_RESPONSE_FA = 0.7
# Response eigenvalues (mm^2/s) where no voxel is that anisotropic (a few
# crossing or free-water voxels): a coherent white-matter fibre's. The peaks
# only start the fits, which choose the count, so a generic response serves.
_DEFAULT_RESPONSE_EVALS = (1.7e-3, 0.2e-3, 0.2e-3)


class CSDUnavailableError(ValueError):
    """CSD cannot run on these data: the gradient table has no b = 0 volume
    or no shell with enough directions, or no voxel to estimate the response
    from. A ``ValueError``; callers for which the peaks are only starts
    catch it."""


def select_shell(gtab, *, min_directions=15):
    """Indices of the b = 0 volumes and of the highest shell with at least
    ``min_directions`` volumes.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable
        The acquisition's gradient table.
    min_directions : int, optional
        The fewest volumes a shell needs to be chosen.

    Returns
    -------
    index : ndarray of int
        The volumes of the b = 0 images and of the shell, sorted.
    bval : float
        The shell's (rounded) b-value in s/mm^2.

    Raises
    ------
    CSDUnavailableError
        If there is no b = 0 volume or no shell with ``min_directions``
        volumes.
    """
    bvals = np.asarray(gtab.bvals, dtype=np.float64)
    b0s = np.asarray(gtab.b0s_mask, dtype=bool)
    rounded = np.round(bvals / _SHELL_ROUNDING) * _SHELL_ROUNDING
    shells = [
        b
        for b in np.unique(rounded[~b0s])
        if np.sum(rounded[~b0s] == b) >= min_directions
    ]
    if not shells or not b0s.any():
        raise CSDUnavailableError(
            "fibres='auto' counts fibres from CSD peaks, which need b = 0 "
            f"volumes and a shell with at least {min_directions} directions; "
            f"the gradient table has {int(b0s.sum())} b = 0 volumes and the "
            f"shells {_shell_counts(rounded[~b0s])}. Give the fibre counts "
            "instead: model.fit(data, fibres=counts)."
        )
    shell = max(shells)
    return np.flatnonzero(b0s | (rounded == shell)), float(shell)


def _shell_counts(rounded):
    """``"b = 1000: 14 directions, ..."`` for the rounded weighted b-values."""
    values, counts = np.unique(rounded, return_counts=True)
    return ", ".join(
        f"b = {b:g}: {n} directions" for b, n in zip(values, counts, strict=True)
    )


def _sh_order(n_directions):
    order = _MAX_SH_ORDER
    while order > 2 and (order + 1) * (order + 2) // 2 > n_directions:
        order -= 2
    return order


def csd_peaks(
    gtab,
    signals,
    *,
    response=None,
    max_peaks=3,
    relative_peak_threshold=0.25,
    min_separation_angle=25.0,
):
    """CSD fibre directions of every voxel, strongest first.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable
    signals : ndarray, shape (V, N)
        One row per voxel, columns following ``gtab``.
    response : tuple or AxSymShResponse, optional
        Single-fibre response for :class:`ConstrainedSphericalDeconvModel`
        (e.g. ``(evals, S0)``), for the selected shell. Default: estimated
        from the voxels of FA > 0.7 (``response_from_mask_ssst``); without
        any, a generic fibre's (evals 1.7e-3, 0.2e-3, 0.2e-3 mm^2/s, S0 the
        median b = 0 signal), with a warning.
    max_peaks : int, optional
    relative_peak_threshold : float, optional
        Peaks below this fraction of the largest are dropped.
    min_separation_angle : float, optional
        Degrees; closer peaks are merged.

    Returns
    -------
    directions : ndarray, shape (V, max_peaks, 3)
        Unit vectors, zero rows beyond a voxel's peaks (DIPY's convention).
    values : ndarray, shape (V, max_peaks)
        Peak heights of the fibre orientation distribution (0 beyond).
    """
    signals = np.asarray(signals, dtype=np.float64)
    index, _ = select_shell(gtab)
    # The fits accept a table built with a loose ``atol`` (b-vectors a few
    # per cent off unit length, as scanners write them) and normalise it;
    # DIPY's default check here would refuse what the fits accepted.
    sub = gradient_table(
        np.asarray(gtab.bvals)[index],
        bvecs=unit_rows(gtab.bvecs)[index],
        b0_threshold=gtab.b0_threshold,
    )
    data = signals[:, index][:, None, None, :]
    if response is None:
        response = _auto_response(sub, data)
    n_dirs = int(np.sum(~sub.b0s_mask))
    with warnings.catch_warnings():
        # CSD builds its own basis in DIPY's legacy convention and uses it
        # consistently; the warning is about the convention, not the peaks.
        warnings.filterwarnings(
            "ignore",
            message=descoteaux07_legacy_msg,
            category=PendingDeprecationWarning,
        )
        model = ConstrainedSphericalDeconvModel(
            sub, response, sh_order_max=_sh_order(n_dirs)
        )
        pam = peaks_from_model(
            model,
            data,
            default_sphere,
            relative_peak_threshold,
            min_separation_angle,
            return_sh=False,
            legacy=False,
            npeaks=max_peaks,
        )
    dirs = pam.peak_dirs.reshape(-1, max_peaks, 3)
    values = pam.peak_values.reshape(-1, max_peaks)
    return dirs, np.where(np.isfinite(values), values, 0.0)


def _auto_response(gtab, data):
    fa = TensorModel(gtab).fit(data).fa
    mask = np.nan_to_num(fa) > _RESPONSE_FA
    if mask.any():
        response, _ = response_from_mask_ssst(gtab, data, mask)
        return response
    b0 = data[..., gtab.b0s_mask].mean(-1).ravel()
    b0 = b0[np.isfinite(b0) & (b0 > 0)]
    if not b0.size:
        raise CSDUnavailableError(
            "no voxel has a positive b = 0 signal to scale a CSD response; "
            "give response=(evals, S0)"
        )
    warnings.warn(
        f"no voxel has FA > {_RESPONSE_FA} to estimate the CSD response from; "
        f"the peaks (starts of the fits) use a generic fibre's, evals "
        f"{_DEFAULT_RESPONSE_EVALS} mm^2/s. Give response=(evals, S0) (e.g. from "
        "dipy.reconst.csdeconv.auto_response_ssst on the whole volume) to choose",
        stacklevel=8,  # the caller of CompartmentModel.fit
    )
    return np.array(_DEFAULT_RESPONSE_EVALS), float(np.median(b0))
