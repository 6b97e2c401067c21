"""Models as JSON: the description a fit file keeps of its model.

:func:`model_spec` describes a :class:`~dipy_spinverse.reconst.SpinverseModel`
(its grid, protocol waveforms and options) or a compartment model (its
gradient table and constructor settings,
:meth:`~dipy_spinverse.compartments.CompartmentModel.settings`) in
JSON-ready values, no pickles; :func:`model_from_spec` rebuilds the model
from it. The grid is kept as the BCC grid's parameters, or as its geometry
when it was built by hand.
"""

import copy
import json
from dataclasses import asdict

import numpy as np
import torch
from dipy.core.gradients import gradient_table
from dipy.reconst.csdeconv import AxSymShResponse

from .. import compartments
from ..compartments import CompartmentModel
from ..inverse import InversionConfig, resolve_config
from ..posterior import TissuePrior, TrainingOptions
from ..reconst import SpinverseModel
from ..sim import sequences, waveforms
from ..sim.grid import TetGrid

__all__ = ["model_spec", "model_from_spec"]

#: The ``kind`` of a posterior model's description.
POSTERIOR = "posterior"
#: The ``kind`` of a compartment model's description.
COMPARTMENT = "compartment"
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

    The acquisitions are saved as the model's protocol (waveforms, b-values,
    directions), which is all a fit depends on. A posterior model is saved
    as its settings (its prior, training options, noise and draws): its
    estimator is found again by their key, in the cache or the package. A
    compartment model is saved as its gradient table and constructor
    settings, and, with ``fit_method="learned"``, the cache key of its
    network (``network_key``).
    """
    if isinstance(model, CompartmentModel):
        return _compartment_spec(model)
    if model.fit_method == POSTERIOR:
        spec = dict(
            kind=POSTERIOR,
            sigma=model.sigma,
            diffusivity=model.diffusivity,
            prior=model.prior.prior.description(),
            posterior_options=model.posterior_options.description(),
            n_posterior_samples=model.n_posterior_samples,
            device=str(model.device),
            protocol=_protocol_spec(model.protocol),
        )
        return json.loads(json.dumps(spec, default=_jsonable))
    spec = dict(
        grid=_grid_spec(model.grid),
        diffusivity=model.diffusivity,
        # The configuration is saved whole, as options (preset None): the
        # model reloads with the same one, whatever preset it was built from.
        preset=None,
        max_iter=None,
        batch_size=model.batch_size,
        device=str(model.device),
        dtype=str(model.dtype).replace("torch.", ""),
        options=model.config.as_dict(),
        sigma=model.sigma,
        refine_mesh=model.refine_mesh,
        mesh_options=model.mesh_options,
        protocol=_protocol_spec(model.protocol),
    )
    return json.loads(json.dumps(spec, default=_jsonable))


def _protocol_spec(protocol):
    return dict(
        bvals=protocol.bvals,
        bvecs=protocol.bvecs,
        waveforms=[_waveform_spec(w) for w in protocol.waveforms],
    )


def _posterior_from_spec(spec, table):
    """The posterior model :func:`model_spec` described (its estimator is
    read, or trained, when first needed)."""
    return SpinverseModel(
        table,
        fit_method=POSTERIOR,
        sigma=spec["sigma"],
        diffusivity=spec["diffusivity"],
        prior=TissuePrior(**spec["prior"]),
        posterior_options=TrainingOptions(**spec["posterior_options"]),
        n_posterior_samples=spec["n_posterior_samples"],
        device=_saved_device(spec),
    )


def _compartment_spec(model):
    """A compartment model's description: its class, gradient table and
    settings, and its network's key (None without one)."""
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
        settings["cache_dir"] = str(settings["cache_dir"])
    g = model.gtab
    spec = dict(
        kind=COMPARTMENT,
        model=name,
        settings=settings,
        gtab=dict(
            bvals=g.bvals,
            bvecs=g.bvecs,
            big_delta=g.big_delta,
            small_delta=g.small_delta,
            b0_threshold=g.b0_threshold,
        ),
        network_key=model.network_key(),
    )
    return json.loads(json.dumps(spec, default=_jsonable))


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


def _compartment_from_spec(spec, table):
    """The compartment model :func:`_compartment_spec` described (a learned
    network on ``cuda`` is run on ``cpu`` where CUDA is absent)."""
    name = spec["model"]
    if name not in COMPARTMENT_MODELS:
        raise ValueError(
            f"no compartment model {name!r}; this dipy_spinverse has "
            f"{', '.join(COMPARTMENT_MODELS)}"
        )
    settings = dict(spec["settings"])
    response = settings.get("response")
    if isinstance(response, dict):
        settings["response"] = AxSymShResponse(
            response["S0"],
            np.asarray(response["dwi_response"], float),
            bvalue=response["bvalue"],
        )
    elif response is not None:
        settings["response"] = (tuple(response[0]), response[1])
    options = settings.get("learned_options")
    if options is not None:
        options["hidden"] = tuple(options["hidden"])
        options["device"] = _saved_device(options)
    return getattr(compartments, name)(table, **settings)


def _saved_device(spec):
    """The saved model's device, or ``cpu`` when CUDA is absent here."""
    device = spec["device"]
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return "cpu"
    return device


def model_from_spec(spec):
    """Rebuild the model that :func:`model_spec` described.

    A model saved on ``cuda`` is rebuilt on ``cpu`` when CUDA is absent (to
    inspect a fit; :func:`resume_fit` refuses to continue it there unless
    told ``device="cpu"``).
    """
    spec = copy.deepcopy(spec)
    if "protocol" in spec:
        p = spec["protocol"]
        table = sequences.Protocol(
            waveforms=tuple(_waveform_from_spec(w) for w in p["waveforms"]),
            bvals=np.asarray(p["bvals"], float),
            bvecs=np.asarray(p["bvecs"], float).reshape(-1, 3),
        )
    else:  # compartment models, and version 1 files of models built from a table
        g = spec["gtab"]
        table = gradient_table(
            np.asarray(g["bvals"], float),
            bvecs=np.asarray(g["bvecs"], float).reshape(-1, 3),
            big_delta=_array_or_scalar(g["big_delta"]),
            small_delta=_array_or_scalar(g["small_delta"]),
            b0_threshold=g["b0_threshold"],
        )
    if spec.get("kind") == POSTERIOR:
        return _posterior_from_spec(spec, table)
    if spec.get("kind") == COMPARTMENT:
        return _compartment_from_spec(spec, table)
    grid = _grid_from_spec(spec["grid"])
    device = _saved_device(spec)
    options, preset = spec["options"], spec["preset"]
    if preset is None:  # a whole configuration was saved
        config = InversionConfig.from_options(**options)
    else:  # files of earlier versions: a preset, its options and max_iter
        config = resolve_config(preset, max_iter=spec["max_iter"], **options)
    # Files before the noise convention of issue 61 hold the relative noise
    # in the configuration alone (the model then uses it as it is). Their
    # "s0_reference" (the b = 0 signal a fit's noise referred to) is not
    # read: each fit takes its noise level from its data
    # (reconst.runner.fit_noise).
    sigma = spec.get("sigma") or None
    return SpinverseModel(
        table,
        sigma=sigma,
        grid=grid,
        diffusivity=spec["diffusivity"],
        preset=config,
        batch_size=spec["batch_size"],
        device=device,
        dtype=spec["dtype"],
        refine_mesh=spec.get("refine_mesh", False),
        mesh_options=spec.get("mesh_options"),
    )


def _grid_spec(grid):
    """A grid's description: the BCC grid's parameters, and the geometry
    itself (vertices, tetrahedra, unwrapped corners) when ``grid`` is not
    the BCC grid of those parameters (a grid built by hand)."""
    spec = dict(
        size=grid.size,
        n=int(round(grid.size / grid.spacing)),
        boundary=grid.boundary,
        wall_permeability=grid.wall_permeability,
    )
    try:
        bcc = TetGrid.bcc(
            grid.size,
            spec["n"],
            boundary=grid.boundary,
            wall_permeability=grid.wall_permeability,
        )
    except ValueError:  # parameters no BCC grid has
        bcc = None
    same = bcc is not None and all(
        np.array_equal(getattr(bcc, name), getattr(grid, name))
        for name in ("vertices", "tets", "tet_coords")
    )
    if not same:
        spec.update(
            spacing=grid.spacing,
            vertices=grid.vertices,
            tets=grid.tets,
            tet_coords=grid.tet_coords,
        )
    return spec


def _grid_from_spec(spec):
    """The grid :func:`_grid_spec` described."""
    if "vertices" not in spec:
        return TetGrid.bcc(
            spec["size"],
            spec["n"],
            boundary=spec["boundary"],
            wall_permeability=spec["wall_permeability"],
        )
    return TetGrid(
        vertices=np.asarray(spec["vertices"], float).reshape(-1, 3),
        tets=np.asarray(spec["tets"], np.int64).reshape(-1, 4),
        size=float(spec["size"]),
        boundary=spec["boundary"],
        wall_permeability=float(spec["wall_permeability"]),
        spacing=float(spec["spacing"]),
        tet_coords=np.asarray(spec["tet_coords"], float).reshape(-1, 4, 3),
    )


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


def _array_or_scalar(value):
    if value is None:
        return None
    return np.asarray(value, float) if isinstance(value, list) else float(value)


def _waveform_spec(waveform):
    if isinstance(waveform, waveforms.SpinEcho):  # a waveform inside: its own
        return dict(
            type="SpinEcho",
            encoding=_waveform_spec(waveform.encoding),
            echo_time=waveform.echo_time,
        )
    return dict(type=type(waveform).__name__, **asdict(waveform))


def _waveform_from_spec(spec):
    spec = dict(spec)
    cls = getattr(waveforms, spec.pop("type"))
    if cls is waveforms.SpinEcho:
        spec["encoding"] = _waveform_from_spec(spec["encoding"])
    return cls(**spec)
