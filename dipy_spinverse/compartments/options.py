"""The constructor options every compartment model shares, checked once.

Bounds (``check_bounds``, ``check_diffusivity_bounds``), the CSD response and
fibre count of ``fibres="auto"`` (``check_response``, ``fibre_options``), the
keywords :meth:`~.base.CompartmentModel._setup` takes (``init_kwargs``),
the initialisation grid's log spacing (``log_grid``), the docstring of the
shared options (``with_common_parameters``) and the published defaults the
models start from.
"""

import math

import numpy as np
import torch
from dipy.reconst.csdeconv import AxSymShResponse

from ..checks import check_choice, check_diffusivity

__all__ = [
    "MAX_FIBRES",
    "D_PAR_INVIVO",
    "D_ISO",
    "DIAMETER_BOUNDS",
    "with_common_parameters",
    "check_bounds",
    "check_diffusivity_bounds",
    "check_response",
    "fibre_options",
    "init_kwargs",
    "log_grid",
]

# Most fibre populations per voxel (fibres="auto").
MAX_FIBRES = 3
# Zhang et al. (2012): in vivo intrinsic and free-water diffusivities (mm^2/s).
D_PAR_INVIVO = 1.7e-3
D_ISO = 3.0e-3
# Cylinder diameters (um) the fits may return. Below ~0.2 um the signal of any
# clinical or preclinical protocol is that of a stick.
DIAMETER_BOUNDS = (0.2, 20.0)

_COMMON_DOC = """
    n_starts : int, optional
        Levenberg-Marquardt starts per voxel, from the best grid points of the
        ``n_starts`` best combinations of scalar grid values.
    max_iter : int, optional
        Levenberg-Marquardt iterations per voxel.
    chunk_size : int, optional
        Voxels fitted together; memory grows linearly with it. Chunks of at
        least 512 voxels are fitted two at a time, on two threads, when
        torch has more than one (the memory of two chunks).
    fit_method : {"varpro", "learned"}, optional
        "varpro": variable-projection fitting (the default); "learned": a
        small MLP trained on signals simulated from this model for ``gtab``
        with Rician noise at ``snr`` (:mod:`.learned`), cached on disk and
        trained on first use (the training time is printed).
    snr : float, optional
        Signal-to-noise ratio (S0 / sigma) of the learned estimator's
        training signals.
    learned_options : dict, optional
        Training options (:class:`~.learned.LearnedOptions`: n_train,
        epochs, hidden, batch_size, lr, seed, polish, frame, device).
    cache_dir : path-like, optional
        Folder of the trained networks; default ``$DIPY_SPINVERSE_CACHE`` or
        ``~/.cache/dipy_spinverse``."""
_GRID_DIRECTIONS_DOC = """
    n_grid_directions : int, optional
        Directions on a half sphere in the initialisation grid."""


def with_common_parameters(doc, *, grid_directions=True):
    """``doc`` with the options every compartment model shares added at the
    end of its Parameters section (before Notes, where numpydoc reads them).

    Parameters
    ----------
    doc : str
        A model class's docstring.
    grid_directions : bool, optional
        Whether the model has fibre directions, and so the
        ``n_grid_directions`` option.

    Returns
    -------
    str
        The docstring with the shared options documented.
    """
    common = (_GRID_DIRECTIONS_DOC if grid_directions else "") + _COMMON_DOC
    parameters, notes, rest = doc.partition("\n\n    Notes\n    -----\n")
    return parameters.rstrip() + common + (notes + rest if notes else "\n    ")


def check_bounds(bounds, name, *, lower=0.0):
    """A ``(lower, upper)`` range option as two floats.

    Parameters
    ----------
    bounds : (float, float)
        The range as given.
    name : str
        The option's name, for the error message.
    lower : float, optional
        Smallest allowed lower end.

    Returns
    -------
    lo, hi : float
        The range, ``lower <= lo < hi < inf``.
    """
    try:
        lo, hi = (float(v) for v in bounds)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} must be a (lower, upper) pair, got {bounds!r}"
        ) from err
    if not (lower <= lo < hi and math.isfinite(hi)):
        raise ValueError(
            f"{name} must satisfy {lower} <= lower < upper < inf, got {bounds!r}"
        )
    return lo, hi


def check_diffusivity_bounds(bounds, name, *, lower=0.0):
    """:func:`check_bounds` of a diffusivity range in mm^2/s: its upper end is
    checked for the unit too (2 um^2/ms given as 2 would fit every voxel as
    free water without a word).

    Parameters
    ----------
    bounds : (float, float)
        The range as given, in mm^2/s.
    name : str
        The option's name, for the error message.
    lower : float, optional
        Smallest allowed lower end.

    Returns
    -------
    lo, hi : float
        The range in mm^2/s.
    """
    lo, hi = check_bounds(bounds, name, lower=lower)
    check_diffusivity(hi, f"the upper end of {name}")
    return lo, hi


def check_response(response):
    """The CSD response of ``fibres="auto"`` as given (None, DIPY's
    ``AxSymShResponse`` or an ``(evals, S0)`` pair), refused here rather
    than by DIPY in the middle of a fit.

    Parameters
    ----------
    response : None, AxSymShResponse or (array-like, float)
        The response option as given.

    Returns
    -------
    None, AxSymShResponse or (array-like, float)
        ``response`` unchanged, once checked.
    """
    if response is None or isinstance(response, AxSymShResponse):
        return response
    message = (
        "response must be (evals, S0): the three eigenvalues (mm^2/s, > 0) "
        "of the single-fibre tensor and its b = 0 signal (> 0), e.g. "
        f"((1.7e-3, 3e-4, 3e-4), 100.0), got {response!r}"
    )
    try:
        evals, s0 = response
        evals, s0 = np.asarray(evals, dtype=np.float64), float(s0)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    good = evals.shape == (3,) and np.all(np.isfinite(evals) & (evals > 0))
    if not (good and math.isfinite(s0) and s0 > 0):
        raise ValueError(message)
    return response


def fibre_options(n_fibres, fibres, *, default=1):
    """Checked ``(n_fibres, fibres)`` of a multi-fibre model: ``fibres`` None
    or "auto"; ``n_fibres`` 0-3, default ``default`` (``MAX_FIBRES`` with
    ``fibres="auto"``, where it is the largest count and must be >= 1).

    Parameters
    ----------
    n_fibres : int or None
        Fibre populations per voxel (the largest count with "auto").
    fibres : None or "auto"
        The model's ``fibres`` option.
    default : int, optional
        ``n_fibres`` when it is None and ``fibres`` is None.

    Returns
    -------
    n_fibres : int
    fibres : None or "auto"
    """
    if fibres is not None and np.ndim(fibres) > 0:
        raise ValueError(
            "fibres of the model must be None or 'auto'; a per-voxel count map "
            "is given to fit: model.fit(data, fibres=counts)."
        )
    if fibres is not None:
        check_choice(fibres, "fibres", ("auto",))
    if n_fibres is None:
        n_fibres = default if fibres is None else MAX_FIBRES
    if isinstance(n_fibres, bool) or np.ndim(n_fibres) or n_fibres not in (0, 1, 2, 3):
        raise ValueError(f"n_fibres must be 0, 1, 2 or 3, got {n_fibres!r}")
    if fibres is not None and n_fibres < 1:
        raise ValueError("fibres='auto' needs n_fibres (the largest count) >= 1")
    return int(n_fibres), fibres


def init_kwargs(*, n_starts, max_iter, n_grid_directions, chunk_size, **learned):
    """The keywords of :meth:`~.base.CompartmentModel._setup` that every
    model's constructor passes on.

    Parameters
    ----------
    n_starts, max_iter, n_grid_directions, chunk_size : int
        The fitting options every model documents.
    **learned
        ``fit_method``, ``snr``, ``learned_options``, ``cache_dir``.

    Returns
    -------
    dict
        All of them by name.
    """
    return {
        "n_starts": n_starts,
        "max_iter": max_iter,
        "n_grid_directions": n_grid_directions,
        "chunk_size": chunk_size,
        **learned,
    }


def log_grid(lo, hi, *, n):
    """``n`` values log-spaced strictly inside ``(lo, hi)``.

    Parameters
    ----------
    lo, hi : float
        The range (> 0).
    n : int
        Number of values.

    Returns
    -------
    list of float
    """
    return torch.logspace(math.log10(lo), math.log10(hi), n + 2)[1:-1].tolist()
