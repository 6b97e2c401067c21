"""``SpinverseModel(gtab, fit_method=...)``: one name, two fitting methods.

As DIPY's ``IvimModel(gtab, fit_method=...)`` returns ``IvimModelTRR`` or
``IvimModelVP``, :func:`SpinverseModel` returns the model of the method
asked for; each takes only its own keywords:

``"search"``
    :class:`~dipy_spinverse.reconst.search_model.SpinverseSearchModel`: the
    face fit and label search (membranes, meshes and per-face
    permeabilities; :class:`~dipy_spinverse.reconst.fit.SpinverseFit`).
``"posterior"``
    :class:`~dipy_spinverse.reconst.posterior_model.SpinversePosteriorModel`:
    the amortised posterior of the tissue descriptors, with credible
    intervals and an ``OUT_OF_PRIOR`` status
    (:class:`~dipy_spinverse.reconst.posterior.PosteriorFit`).
"""

import inspect

from ..checks import check_choice, option_name, option_setting
from ..inverse.config import OPTIONS
from .posterior_model import SpinversePosteriorModel
from .search_model import SpinverseSearchModel

__all__ = ["FIT_METHODS", "SpinverseModel", "check_fit_method"]

#: The fitting methods and the model class of each.
FIT_METHODS = {"search": SpinverseSearchModel, "posterior": SpinversePosteriorModel}


def SpinverseModel(gtab, *, fit_method="search", **kwargs):
    """Spinverse's DIPY model of ``fit_method`` for the gradient table ``gtab``.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable or Protocol
        Gradient table whose ``big_delta`` and ``small_delta`` hold the pulse
        timing in seconds, or a :class:`~dipy_spinverse.sim.sequences.Protocol`.
    fit_method : {"search", "posterior"}
        ``"search"``: the label search and face fit
        (:class:`~dipy_spinverse.reconst.search_model.SpinverseSearchModel`).
        ``"posterior"``: the amortised posterior of the tissue descriptors
        (:class:`~dipy_spinverse.reconst.posterior_model.SpinversePosteriorModel`;
        needs ``sigma``).
    **kwargs
        The keywords of that model's class.

    Returns
    -------
    SpinverseSearchModel or SpinversePosteriorModel

    Raises
    ------
    ValueError
        An unknown ``fit_method``, or a keyword the chosen model does not
        take (named, with the method that takes it).

    Examples
    --------
    >>> import numpy as np
    >>> from dipy.core.gradients import gradient_table
    >>> bvals = np.array([0, 1000, 1000, 1000] * 2)
    >>> bvecs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]] * 2)
    >>> gtab = gradient_table(bvals, bvecs=bvecs, small_delta=0.01,
    ...                       big_delta=np.repeat([0.03, 0.015], 4))
    >>> from dipy_spinverse.inverse import resolve_config
    >>> config = resolve_config("paper", stages=[dict(iterations=5)])
    >>> model = SpinverseModel(gtab, grid=dict(resolution=2), preset=config)
    >>> type(model).__name__, model.grid.n_cells
    ('SpinverseSearchModel', 48)
    >>> fit = model.fit(np.array([1000.0, 600, 610, 590, 1000, 800, 810, 790]))
    >>> fit.status, fit.permeability.shape, fit.predict().shape
    (0, (72,), (8,))
    """
    return check_fit_method(fit_method, kwargs)(gtab, **kwargs)


def check_fit_method(fit_method, keywords=(), *, names=None):
    """The model class of ``fit_method``, which must take ``keywords``.

    :func:`SpinverseModel` calls it; a command can call it before reading
    any data, with its own names for the options.

    Parameters
    ----------
    fit_method : str
        A key of :data:`FIT_METHODS`.
    keywords : iterable of str
        The keywords the model is to be built with.
    names : mapping, optional
        How the caller calls the options, used in the messages: e.g. a
        command's ``{"fit_method": "--fit_method", "max_iter": "--max_iter"}``
        (:func:`~dipy_spinverse.checks.option_name`; default the keywords).

    Returns
    -------
    type
        :class:`~dipy_spinverse.reconst.search_model.SpinverseSearchModel`
        or :class:`~dipy_spinverse.reconst.posterior_model.SpinversePosteriorModel`.

    Raises
    ------
    ValueError
        An unknown ``fit_method``, or keywords its model does not take
        (named, with the method that takes them).
    """
    fit_method = check_choice(
        fit_method, option_name("fit_method", names), tuple(FIT_METHODS)
    )
    model = FIT_METHODS[fit_method]
    foreign = sorted(set(keywords) - set(_keywords(model)))
    if not foreign:
        return model
    named = [option_name(k, names) for k in foreign]
    (other,) = (name for name, kind in FIT_METHODS.items() if kind is not model)
    if names is None:
        _refuse_python_keywords(model, fit_method, other, foreign)
    # A command's flags are not the class's keywords: those only for Python.
    raise ValueError(
        f"option(s) {named} are not options of "
        f"{option_setting('fit_method', fit_method, names)}; leave them out, or "
        f"use {option_setting('fit_method', other, names)} if they are its."
    )


#: The default BCC grid's keywords of earlier versions, now keys of ``grid``.
_GRID_KEYWORDS = {
    "grid_size": "size",
    "grid_resolution": "resolution",
    "boundary": "boundary",
    "wall_permeability": "wall_permeability",
}


def _refuse_python_keywords(model, fit_method, other, foreign):
    """Refuse keywords ``model`` does not take, saying where each belongs
    (``other``: the other fit method)."""
    takes = f"{model.__name__} takes {', '.join(_keywords(model))}"
    hints = []
    inversion = [k for k in foreign if k in OPTIONS]
    if inversion:
        example = ", ".join(f"{k}=..." for k in inversion)
        where = "" if model is SpinverseSearchModel else "fit_method='search' with "
        hints.append(
            f"{inversion} are settings of the label search's configuration: pass "
            f"{where}preset=resolve_config('default', {example}) "
            "(dipy_spinverse.inverse.resolve_config)"
        )
    grid = [k for k in foreign if k in _GRID_KEYWORDS]
    if grid and model is SpinverseSearchModel:
        example = ", ".join(f"{_GRID_KEYWORDS[k]}=..." for k in grid)
        hints.append(f"{grid} are settings of the grid: pass grid=dict({example})")
    rest = [k for k in foreign if k not in inversion and not (grid and k in grid)]
    if rest:
        hints.append(f"leave {rest} out, or use fit_method={other!r} if they are its")
    raise ValueError(
        f"option(s) {foreign} are not options of fit_method={fit_method!r} "
        f"({takes}); " + "; ".join(hints) + "."
    )


def _keywords(model):
    """The named keyword arguments of a model class's constructor."""
    parameters = inspect.signature(model.__init__).parameters.values()
    return [p.name for p in parameters if p.kind is p.KEYWORD_ONLY]
