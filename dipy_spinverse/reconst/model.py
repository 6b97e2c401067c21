"""``SpinverseModel(gtab, fit_method=...)``: one name, three fitting methods.

As DIPY's ``IvimModel(gtab, fit_method=...)`` returns ``IvimModelTRR`` or
``IvimModelVP``, :func:`SpinverseModel` returns the model of the method
asked for (its class registered in :mod:`~dipy_spinverse.reconst.methods`);
each takes only its own keywords:

``"search"``
    :class:`~dipy_spinverse.reconst.search_model.SpinverseSearchModel`: the
    face fit and label search (membranes, meshes and per-face
    permeabilities; :class:`~dipy_spinverse.reconst.fit.SpinverseFit`).
``"posterior"``
    :class:`~dipy_spinverse.reconst.posterior_model.SpinversePosteriorModel`:
    the amortised posterior of the tissue descriptors, with credible
    intervals and an ``OUT_OF_PRIOR`` status
    (:class:`~dipy_spinverse.reconst.posterior.PosteriorFit`).
``"protocol_free"``
    :class:`~dipy_spinverse.reconst.protocol_free_model.SpinverseProtocolFreeModel`:
    the default prior's posterior from the shipped protocol-free estimator,
    for any protocol of its design, without training
    (:class:`~dipy_spinverse.reconst.protocol_free_model.ProtocolFreeFit`).
"""

import inspect

from ..checks import OptionError, about, check_choice
from .methods import FIT_METHODS
from .search_model import misplaced_options

__all__ = ["FIT_METHODS", "SpinverseModel", "check_fit_method"]


def SpinverseModel(gtab, *, fit_method="search", **kwargs):
    """Spinverse's DIPY model of ``fit_method`` for the gradient table ``gtab``.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable or Protocol
        Gradient table whose ``big_delta`` and ``small_delta`` hold the pulse
        timing in seconds, or a :class:`~dipy_spinverse.sim.sequences.Protocol`.
    fit_method : {"search", "posterior", "protocol_free"}
        ``"search"``: the label search and face fit
        (:class:`~dipy_spinverse.reconst.search_model.SpinverseSearchModel`).
        ``"posterior"``: the amortised posterior of the tissue descriptors
        (:class:`~dipy_spinverse.reconst.posterior_model.SpinversePosteriorModel`;
        needs ``sigma``), trained once per protocol.
        ``"protocol_free"``: the default prior's posterior without a
        training, for protocols of its design
        (:class:`~dipy_spinverse.reconst.protocol_free_model.SpinverseProtocolFreeModel`;
        needs ``sigma``).
    **kwargs
        The keywords of that model's class.

    Returns
    -------
    SpinverseSearchModel, SpinversePosteriorModel or SpinverseProtocolFreeModel

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


def check_fit_method(fit_method, keywords=()):
    """The model class of ``fit_method``, which must take ``keywords``.

    :func:`SpinverseModel` calls it before building the model.

    Parameters
    ----------
    fit_method : str
        A key of :data:`FIT_METHODS`.
    keywords : iterable of str
        The keywords the model is to be built with.

    Returns
    -------
    type
        The model class of ``fit_method``'s entry in :data:`FIT_METHODS`
        (:mod:`~dipy_spinverse.reconst.methods`).

    Raises
    ------
    OptionError
        An unknown ``fit_method``, or keywords its model does not take, each
        named with where it belongs: the other method, the label search's
        configuration (``preset=resolve_config(...)``) or its grid
        (``grid=dict(...)``).
    """
    with about("fit_method"):
        name = check_choice(fit_method, "fit_method", FIT_METHODS)
    model = FIT_METHODS[name].model
    takes = _keywords(model)
    foreign = sorted(set(keywords) - set(takes))
    if not foreign:
        return model
    # The label search's configuration and grid are keywords of the model
    # that takes a preset and a grid.
    hints, rest = misplaced_options(foreign, searching={"preset", "grid"} <= set(takes))
    if rest:
        takers = [
            repr(m)
            for m, other in FIT_METHODS.items()
            if m != name and set(rest) <= set(_keywords(other.model))
        ]
        use = f", or use fit_method={' or '.join(takers)} if they are its"
        hints.append(f"leave {rest} out" + (use if takers else ""))
    raise OptionError(
        f"option(s) {foreign} are not options of fit_method={fit_method!r} "
        f"({model.__name__} takes {', '.join(takes)}); {'; '.join(hints)}",
        options=["fit_method", *foreign],
    )


def _keywords(model):
    """The named keyword arguments of a model class's constructor."""
    parameters = inspect.signature(model.__init__).parameters.values()
    return [p.name for p in parameters if p.kind is p.KEYWORD_ONLY]
