"""Models as JSON: the description a fit file keeps of its model.

:func:`model_spec` describes a model of any registered method
(:mod:`dipy_spinverse.reconst.methods`) in JSON-ready values, no pickles:
its kind and its own description (``model.description()``: a
:class:`~dipy_spinverse.reconst.SpinverseModel`'s grid, protocol waveforms
and options, a posterior model's prior, training options and noise); its
class rebuilds it (:func:`model_from_spec`). The compartment models are a
kind of saved fit registered here: their gradient table and constructor
settings (:meth:`~dipy_spinverse.compartments.CompartmentModel.settings`),
rebuilt by their class (:func:`compartment_description`,
:func:`compartment_from_description`), and their fits read back by
:meth:`~dipy_spinverse.compartments.CompartmentModel.restored_fit`
(:func:`restored_compartment_fit`).
"""

import copy
import json
import os
from dataclasses import asdict

import numpy as np
import torch
from dipy.reconst.csdeconv import AxSymShResponse

from .. import compartments
from ..checks import readable_device
from ..compartments import CompartmentFit, CompartmentModel
from ..reconst.descriptions import gtab_description, table_from_description
from ..reconst.methods import (
    DEFAULT_METHOD,
    SAVED_KINDS,
    FitFormat,
    FitMethod,
    method_named,
    method_of,
    register,
)

__all__ = ["model_spec", "model_from_spec"]

#: The compartment models a description can name, by class name.
COMPARTMENT_MODELS = tuple(
    name
    for name in compartments.__all__
    if isinstance(getattr(compartments, name), type)
    and issubclass(getattr(compartments, name), CompartmentModel)
    and getattr(compartments, name) is not CompartmentModel
)


def model_spec(model):
    """JSON-ready description of ``model``; :func:`model_from_spec` rebuilds it.

    The model's method is looked up in the registry
    (:func:`~dipy_spinverse.reconst.methods.method_of`): the description is
    its ``kind`` (the method's name) and the model's own
    ``description()``. A posterior model is saved as its settings (its
    prior, training options, noise and draws): its estimator is found again
    by their key, in the cache or the package. A compartment model is saved
    as its gradient table and constructor settings, and, with
    ``fit_method="learned"``, the cache key of its network
    (``network_key``).

    Raises
    ------
    ValueError
        A model of no registered method, or a compartment model of another
        package.
    """
    method = method_of(model)
    if method is None:
        kinds = ", ".join(m.model.__name__ for m in SAVED_KINDS.values())
        raise ValueError(
            f"save_fit describes the models of the registered fit methods "
            f"({kinds}), not {type(model).__module__}.{type(model).__name__}; "
            "register its method (dipy_spinverse.reconst.methods.register), or "
            "save this fit's arrays (fit.saved_arrays()) with numpy.savez."
        )
    spec = dict(kind=method.name, **method.describe(model))
    return json.loads(json.dumps(spec, default=_jsonable))


def model_from_spec(spec):
    """Rebuild the model that :func:`model_spec` described.

    A model saved on ``cuda`` is rebuilt on ``cpu`` when CUDA is absent (to
    inspect a fit; :func:`resume_fit` refuses to continue it there unless
    told ``device="cpu"``). A description without a ``kind`` is the label
    search's (files written before there were others).
    """
    spec = copy.deepcopy(spec)
    method = method_named(spec.get("kind", DEFAULT_METHOD))
    return method.rebuild(spec)


def _response_spec(response):
    """A CSD response option as JSON: None, ``(evals, S0)`` or DIPY's
    ``AxSymShResponse`` (its S0, coefficients and b-value)."""
    if isinstance(response, AxSymShResponse):
        return dict(
            type="AxSymShResponse",
            S0=response.S0,
            dwi_response=response.dwi_response,
            bvalue=response.bvalue,
        )
    return response


def _response_from_spec(response):
    """The CSD response option :func:`_response_spec` described."""
    if isinstance(response, dict):
        return AxSymShResponse(
            response["S0"],
            np.asarray(response["dwi_response"], float),
            bvalue=response["bvalue"],
        )
    return None if response is None else (tuple(response[0]), response[1])


def compartment_description(model):
    """A compartment model's description: its class, gradient table and
    settings, and its network's key (None without one).

    Parameters
    ----------
    model : CompartmentModel
        One of the package's models (:data:`COMPARTMENT_MODELS`).

    Returns
    -------
    dict
    """
    name = type(model).__name__
    if getattr(compartments, name, None) is not type(model):
        raise ValueError(
            f"save_fit describes the package's compartment models "
            f"({', '.join(COMPARTMENT_MODELS)}), not {type(model).__module__}."
            f"{name}; save a fit of one of them, or save this fit's arrays "
            "(fit.saved_arrays()) with numpy.savez."
        )
    settings = model.settings()
    if "response" in settings:
        settings["response"] = _response_spec(settings["response"])
    if settings.get("cache_dir") is not None:
        settings["cache_dir"] = os.fspath(settings["cache_dir"])
    return dict(
        model=name,
        settings=settings,
        gtab=gtab_description(model.gtab),
        network_key=model.network_key(),
    )


def compartment_from_description(description):
    """The compartment model :func:`compartment_description` described (a
    learned network on ``cuda`` is run on ``cpu`` where CUDA is absent).

    Parameters
    ----------
    description : dict

    Returns
    -------
    CompartmentModel
    """
    name = description["model"]
    if name not in COMPARTMENT_MODELS:
        raise ValueError(
            f"no compartment model {name!r}; this dipy_spinverse has "
            f"{', '.join(COMPARTMENT_MODELS)}"
        )
    settings = dict(description["settings"])
    if "response" in settings:
        settings["response"] = _response_from_spec(settings["response"])
    options = settings.get("learned_options")
    if options is not None:
        options["hidden"] = tuple(options["hidden"])
        options["device"] = readable_device(options["device"])
    table = table_from_description(description)
    return getattr(compartments, name)(table, **settings)


def restored_compartment_fit(model, arrays, header):
    """The compartment fit of a file's ``arrays``
    (:meth:`~dipy_spinverse.compartments.CompartmentModel.restored_fit`); a
    learned model's only if its network's key is the one ``header``'s model
    description saved.

    Parameters
    ----------
    model : CompartmentModel
        The model rebuilt from the header.
    arrays : dict of ndarray
    header : dict

    Returns
    -------
    CompartmentFit

    Raises
    ------
    ValueError
        A network this package would not find, or damaged arrays.
    """
    spec = header["model"]
    saved, key = spec.get("network_key"), model.network_key()
    if saved != key:
        raise ValueError(
            f"its {spec['model']} was fitted by the learned network of key "
            f"{saved}, which this dipy_spinverse would not find (it looks for "
            f"key {key}: the code or settings that train the network changed "
            "since the fit was saved). Load the file with the dipy_spinverse "
            "version that wrote it, or fit the data again; its arrays stay "
            "readable with numpy.load."
        )
    try:
        return model.restored_fit(arrays)
    except ValueError as err:
        raise ValueError(
            f"{err}; the file is damaged or was not written by save_fit"
        ) from err


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if hasattr(value, "__dataclass_fields__"):  # a curriculum Stage
        return asdict(value)
    raise TypeError(f"cannot describe {type(value).__name__} in JSON")


register(
    FitMethod(
        name="compartment",
        model=CompartmentModel,
        fit=CompartmentFit,
        # The parameters' rows, status and (where the fit has them) b = 0
        # levels; the model's class, table and settings in the header.
        file_format=FitFormat(
            name="dipy_spinverse.CompartmentFit",
            version=1,
            arrays=("mask", "status", "model_params"),
        ),
        describe=compartment_description,
        rebuild=compartment_from_description,
        restore=restored_compartment_fit,
    )
)
