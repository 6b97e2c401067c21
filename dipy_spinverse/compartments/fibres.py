"""The fibre populations of the multi-fibre models (NODDI, ActiveAx, ZCD).

Sub-models built once per fibre count and kept on the model
(``built_once``, ``per_fibre_submodel``: the fits ``fibres="auto"``
compares), the learned estimators' fibre order (``fic_plus_fee``,
``sorted_fibres``) and the parameter blocks of absent fibres
(``fill_absent``).
"""

import numpy as np
import torch

from .base import canonical_directions

__all__ = [
    "built_once",
    "per_fibre_submodel",
    "fic_plus_fee",
    "sorted_fibres",
    "fill_absent",
]


def built_once(model, store, key, build):
    """``build()``, made once per ``key`` and kept on ``model`` (in the dict
    ``model.<store>``): the sub-models a fit uses per fibre count.

    Parameters
    ----------
    model : CompartmentModel
        The model that keeps what is built.
    store : str
        Name of the dict attribute of ``model`` that holds them.
    key : hashable
        What tells the built objects apart (a fibre count).
    build : callable
        Builds the object, without arguments.

    Returns
    -------
    object
        ``build()``'s result for ``key``, built on first use.
    """
    cache = model.__dict__.setdefault(store, {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def per_fibre_submodel(model, n_fibres, build):
    """``model`` with ``n_fibres`` fibres in the per-fibre layout (built
    once by ``build()`` and kept on the model): the fits that
    ``fibres="auto"`` compares.

    Parameters
    ----------
    model : CompartmentModel
        The model with ``fibres="auto"``.
    n_fibres : hashable
        The fibre count (with ActiveAx, the pair of count and dot).
    build : callable
        Builds the sub-model, without arguments.

    Returns
    -------
    CompartmentModel
        The sub-model in the per-fibre layout.
    """

    def per_fibre():
        sub = build()
        sub._set_layout(True)
        return sub

    return built_once(model, "_submodels", n_fibres, per_fibre)


def fic_plus_fee(model, targets, groups):
    """Each fibre's weight ``fic_k + fee_k`` (V, F) from regression outputs
    (its first two targets): ActiveAx's and ZCD's learned fibre order.

    A model's ``_fibre_weights`` method, hence the ``model`` argument.

    Parameters
    ----------
    model : CompartmentModel
        The model (unused).
    targets : torch.Tensor
        Regression outputs (V, T).
    groups : torch.Tensor
        Each fibre's target columns (F, W).

    Returns
    -------
    torch.Tensor
        Fibre weights (V, F).
    """
    return targets[:, groups[:, 0]] + targets[:, groups[:, 1]]


def sorted_fibres(per, dirs, weight):
    """Per-fibre scalars (B, F, W) and directions (B, F, 3), fibres sorted by
    decreasing ``weight`` (B, F), flattened to (B, F (W + 3)).

    Parameters
    ----------
    per : torch.Tensor
        Per-fibre scalars (B, F, W).
    dirs : torch.Tensor
        Fibre directions (B, F, 3), either sign.
    weight : torch.Tensor
        Weights (B, F) that order the fibres.

    Returns
    -------
    torch.Tensor
        (B, F (W + 3)): each fibre's scalars then its z >= 0 direction.
    """
    order = weight.argsort(dim=-1, descending=True)[..., None]
    per = torch.take_along_dim(per, order, 1)
    dirs = torch.take_along_dim(canonical_directions(dirs), order, 1)
    return torch.cat([per, dirs], dim=-1).reshape(per.shape[0], -1)


def fill_absent(params, model, *, head, absent_fibre):
    """Parameters (..., P) with the NaN blocks of absent fibres (per-voxel
    counts) replaced by ``absent_fibre``, a fibre of weight 0.

    Parameters
    ----------
    params : ndarray
        Parameters (..., P) in ``model``'s layout.
    model : CompartmentModel
        The multi-fibre model.
    head : int
        Parameters before the first fibre's block.
    absent_fibre : tuple of float
        The block of a fibre of weight 0.

    Returns
    -------
    ndarray
        A copy of ``params`` with absent fibres filled (``params`` itself
        for a single-fibre model).
    """
    if not model._multi:
        return params
    params = params.copy()
    fitted = np.isfinite(params[..., 0])
    W = model._per_fibre_params
    for k in range(model.n_fibres):
        block = params[..., head + W * k : head + W * (k + 1)]
        absent = fitted & np.isnan(block[..., 0])
        block[absent] = absent_fibre
    return params
