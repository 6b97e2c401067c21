"""A label search's fit predicting its voxels' signal: the fitted
prediction, or the permeabilities simulated on other acquisitions, scaled
by each voxel's fitted S0 (or a given one)."""

import numpy as np

from .gate import s0_per_acquisition

__all__ = ["PREDICTION_PARAMETERS", "predict_rows"]

#: The per-voxel parameters a prediction reads.
PREDICTION_PARAMETERS = ("predicted", "permeability", "S0", "S0_sequences")


def predict_rows(model, rows, fitted, gtab=None, S0=None, dtype=np.float64):
    """Predicted signal of the rows of a mask, ``(n, n_volumes)``.

    Parameters
    ----------
    model : SpinverseSearchModel
    rows : dict of ndarray
        The rows' ``predicted``, ``permeability``, ``S0`` and
        ``S0_sequences`` parameters.
    fitted : ndarray of bool (n,)
        The rows with outputs; the others are NaN.
    gtab : GradientTable or Protocol, optional
        Acquisitions to predict (default: the fitted ones, whose prediction
        the fit holds).
    S0 : ndarray (n,), optional
        Unweighted signal of each row, checked; default: each voxel's
        fitted S0 (:func:`.gate.s0_per_acquisition`).
    dtype : data type

    Returns
    -------
    ndarray (n, n_volumes)
    """
    protocol = model.protocol if gtab is None else model.protocol_for(gtab)
    out = np.full((len(fitted), len(protocol)), np.nan, dtype=dtype)
    if not fitted.any():
        return out
    if gtab is None:
        normalised = rows["predicted"][fitted]
    else:
        normalised = model.predict_normalised(rows["permeability"][fitted], protocol)
    if S0 is None:
        scale = s0_per_acquisition(
            model.sequences, protocol, rows["S0"][fitted], rows["S0_sequences"][fitted]
        )
    else:
        scale = S0[fitted][:, None]
    out[fitted] = normalised * scale
    return out
