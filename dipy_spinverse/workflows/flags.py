"""The flags of ``dipy_fit_spinverse``, checked before any data is read.

Each fit method owns its flags: its registry entry
(:mod:`dipy_spinverse.reconst.methods`) names the function here that turns
them into its model's keywords (:func:`search_flags`,
:func:`posterior_flags`, :func:`protocol_free_flags`) and refuses the
flags of the other methods, naming them. The chosen model's options are
checked by the model's own checks
(:func:`~dipy_spinverse.reconst.model.check_fit_method`,
:func:`~dipy_spinverse.reconst.search_model.check_search_options`), which
speak in Python keywords: :func:`in_flags` rewords their
:class:`~dipy_spinverse.checks.OptionError` in the command's flags
(:data:`FLAGS`). The rest is the command's own: its JSON flags, the noise
flags, the outputs.
"""

import importlib
import json
import pathlib
from dataclasses import dataclass, field

from ..checks import check_choice, check_int, check_number
from ..inverse.config import PRESETS, resolve_config
from ..meshfit.refine import check_refine_options
from ..posterior import TissuePrior, TrainingOptions
from ..reconst.model import FIT_METHODS, check_fit_method
from ..reconst.noise import check_sigma
from ..reconst.protocol_free_model import PRIOR_DIFFUSIVITY
from ..reconst.search_model import check_search_options, make_grid
from .cli import flag_names, options_as_flags, reword_options
from .outputs import DEFAULT_METRICS, METRICS, SMOOTH_MESH_FORMATS

__all__ = [
    "FLAGS",
    "NOISE_FLAGS",
    "Flags",
    "check_flags",
    "command_flags",
    "command_part",
    "search_flags",
    "posterior_flags",
    "protocol_free_flags",
    "check_metrics",
    "in_flags",
    "reword",
    "parse_mesh_options",
    "parse_posterior_options",
    "parse_noise",
]

#: The command's flag for each option it sets, by the option's name in the
#: core's messages (:func:`reword`: the models', the gradient table's, the
#: files'). The posterior's options are keys of the one JSON flag
#: ``--posterior_options``; the grid's settings are named as
#: :data:`~dipy_spinverse.reconst.search_model.GRID_SETTINGS`.
FLAGS = {
    "fit_method": "--fit_method",
    "preset": "--preset",
    "max_iter": "--max_iter",
    "sigma": "--sigma/--snr",
    "search_bootstrap": "--search_bootstrap",
    "search_proposal": "--search_proposal",
    "refine_mesh": "--refine_mesh",
    "mesh_options": "--mesh_options",
    "prior": '"prior" in --posterior_options',
    "posterior_options": '"training" in --posterior_options',
    "n_posterior_samples": '"n_samples" in --posterior_options',
    "grid size": "--grid_size",
    "grid resolution": "--grid_resolution",
    "grid boundary": "--boundary",
    # The gradient table's (read_gradients'), the outputs' and the run's.
    **flag_names(
        "big_delta",
        "small_delta",
        "timing_file",
        "scheme_file",
        "b0_threshold",
        "bvecs_tol",
        "out_dir",
        "force",
        "resume",
    ),
}


def command_flags(*own):
    """The command's flag of each option: :data:`FLAGS`, and the options
    ``own`` by their names (``out_s0``: ``--out_s0``).

    Parameters
    ----------
    *own : str
        Options of the command's ``run`` that are flags by their names.

    Returns
    -------
    dict
    """
    return {**flag_names(*own), **FLAGS}


def reword(err, *own):
    """The message of ``err`` in the command's flags
    (:func:`~dipy_spinverse.workflows.cli.reword_options`).

    Parameters
    ----------
    err : OptionError
        A refusal of the core, naming options as keywords.
    *own : str
        Options it may name that are flags by their names
        (:func:`command_flags`).

    Returns
    -------
    str
        Its message with each option it names that has a flag written as
        the flag, a setting as the flag and its value (``max_iter=0``:
        ``--max_iter 0``; ``refine_mesh=True``: ``--refine_mesh``), and only
        the fixes a flag sets.
    """
    return reword_options(err, command_flags(*own))


def in_flags(*own):
    """Raise an :class:`~dipy_spinverse.checks.OptionError` of the block as
    a ``ValueError`` worded in the command's flags (:func:`reword`), and
    word the log lines that name options so
    (:func:`~dipy_spinverse.workflows.cli.options_as_flags`).

    Parameters
    ----------
    *own : str
        Options of the block that are flags by their names
        (:func:`command_flags`).
    """
    return options_as_flags(command_flags(*own))


#: How to give the noise level on the command line.
NOISE_FLAGS = (
    "--sigma/--snr (--sigma: in the data's units, or auto; --snr: of the mask's "
    "median b=0 signal, e.g. 50)"
)


@dataclass(frozen=True)
class Flags:
    """The command's flags, checked: what each step of a run reads.

    Parameters
    ----------
    fit_method : str
        A method of the command (a key of
        :data:`~dipy_spinverse.reconst.methods.FIT_METHODS`).
    model : dict
        The keywords of the chosen model
        (:func:`~dipy_spinverse.reconst.model.SpinverseModel`) but ``sigma``,
        known only with the data.
    gradients : dict
        The keywords of :func:`~dipy_spinverse.io.gradients.read_gradients`.
    noise : tuple or None
        The noise flags (:func:`parse_noise`).
    engine : dict
        The search fit's ``engine``, ``address`` and ``n_jobs``.
    resume : bool
        Whether ``--resume`` was given.
    metrics : list of str
        The outputs of ``--save_metrics``.
    voxel_meshes : bool
        Whether each voxel's mesh is written.
    mesh_ext : str
        The smooth meshes' file extension (``".vtp"``, ...).
    n_report : int
        Voxels in the PNG report (0: none).
    fit_options : dict
        The keywords of the model's ``fit`` (the search's engine, a
        progress bar).
    """

    fit_method: str
    model: dict
    gradients: dict
    noise: tuple | None
    engine: dict
    resume: bool
    metrics: list
    voxel_meshes: bool
    mesh_ext: str
    n_report: int
    fit_options: dict = field(default_factory=dict)


def command_part(fit_method, part):
    """A method's part in the command, imported from its entry point.

    Parameters
    ----------
    fit_method : str
        A key of :data:`~dipy_spinverse.reconst.methods.FIT_METHODS`.
    part : {"flags", "outputs"}
        The part (:class:`~dipy_spinverse.reconst.methods.Command`).

    Returns
    -------
    callable
    """
    module, name = getattr(FIT_METHODS[fit_method].command, part).split(":")
    return getattr(importlib.import_module(module), name)


def check_flags(arguments):
    """Check the flags of a run before any data is read.

    Parameters
    ----------
    arguments : dict
        :meth:`~dipy_spinverse.workflows.spinverse.SpinverseFlow.run`'s
        arguments by name.

    Returns
    -------
    Flags

    Raises
    ------
    ValueError
        A flag out of range, or one that the run would ignore, named as
        given on the command line.
    """
    args = arguments  # by flag name
    metrics = check_metrics(args["save_metrics"])
    n_report = check_int(args["n_report"], "--n_report", 0)
    refine_mesh = bool(args["refine_mesh"])
    mesh_options = parse_mesh_options(args["mesh_options"], refine_mesh=refine_mesh)
    noise = parse_noise(args["sigma"], args["snr"])
    fit_method = args["fit_method"]
    with in_flags():
        check_fit_method(fit_method)
    # The method's own flags, by its function (its registry entry's).
    model, fit_options = command_part(fit_method, "flags")(
        args, noise=noise, metrics=metrics, mesh_options=mesh_options
    )
    check_number(args["bvecs_tol"], "--bvecs_tol", minimum=0.0)
    ext = check_choice(
        args["smooth_mesh_format"], "--smooth_mesh_format", SMOOTH_MESH_FORMATS
    )
    return Flags(
        fit_method=fit_method,
        model=model,
        gradients={k: args[k] for k in _GRADIENT_FLAGS},
        noise=noise,
        engine={k: args[k] for k in ("engine", "address", "n_jobs")},
        resume=bool(args["resume"]),
        metrics=metrics,
        voxel_meshes=bool(args["voxel_meshes"]),
        mesh_ext="." + ext,
        n_report=n_report,
        fit_options=fit_options,
    )


def search_flags(args, *, noise, metrics, mesh_options):
    """``--fit_method search``: the label search's model keywords and fit
    options from the flags.

    Parameters
    ----------
    args : dict
        The run's arguments by flag name.
    noise : tuple or None
        The noise flags (:func:`parse_noise`).
    metrics : list of str
        The outputs of ``--save_metrics`` (:func:`check_metrics`).
    mesh_options : dict or None
        ``--mesh_options`` checked (:func:`parse_mesh_options`).

    Returns
    -------
    model : dict
        The keywords of the search's model but ``sigma``.
    fit_options : dict
        The fit's engine, its address and workers, and its progress bar.

    Raises
    ------
    ValueError
        A flag out of range, or one the run would ignore, named as given.
    """
    # The label search's configuration flags (the model takes them in its
    # configuration, ``preset``), where given (0 means off: left out, as
    # the models' defaults).
    configured = _given(
        search_bootstrap=args["search_bootstrap"],
        search_proposal=args["search_proposal"],
    )
    posterior = parse_posterior_options(args["posterior_options"], args["diffusivity"])
    model = _search_keywords(args, configured, posterior, mesh_options)
    with in_flags():
        checked = check_search_options(**search_options(model))
    if "prior" in posterior:
        _require_noise(
            args, noise, 'With a "prior" in --posterior_options, the surface check'
        )
    if (
        args["save_metrics"]
        and "uncertainty" in metrics
        and not checked.searches_labels
    ):
        raise ValueError(
            "--save_metrics uncertainty comes from the label search, which "
            f"--preset {args['preset']} does not run; use --preset default."
        )
    engine = {k: args[k] for k in ("engine", "address", "n_jobs")}
    return model, dict(engine, verbose=True)


def posterior_flags(args, *, noise, **_):
    """``--fit_method posterior``: the posterior's model keywords from the
    flags (no fit options: the posterior draws in this process).

    Parameters
    ----------
    args : dict
        The run's arguments by flag name.
    noise : tuple or None
        The noise flags: the posterior needs them.
    **_
        The other checked flags (:func:`search_flags`'), which it does not
        read.

    Returns
    -------
    model, fit_options : dict
    """
    posterior = parse_posterior_options(args["posterior_options"], args["diffusivity"])
    _refuse_search_flags(args, "posterior")
    model = dict(
        fit_method="posterior",
        diffusivity=args["diffusivity"],
        device=args["device"],
        **_training_cluster(args),
        **posterior,
    )
    _require_noise(args, noise, "--fit_method posterior")
    return model, {}


def protocol_free_flags(args, *, noise, **_):
    """``--fit_method protocol_free``: the protocol-free model's keywords
    from the flags (its draws, ``"n_samples"`` of ``--posterior_options``).

    Its estimator and prior are the package's (no training: no prior,
    training, diffusivity, device or cluster of its own); it fits in this
    process, continuing an interrupted fit from its checkpoint.

    Parameters
    ----------
    args : dict
        The run's arguments by flag name.
    noise : tuple or None
        The noise flags: the model needs them.
    **_
        The other checked flags, which it does not read.

    Returns
    -------
    model, fit_options : dict
    """
    posterior = parse_posterior_options(args["posterior_options"], args["diffusivity"])
    _refuse_search_flags(args, "protocol_free")
    # The posterior's own flags, as given (their values where they are not
    # the protocol-free model's own, which has no such setting).
    given = [FLAGS[k] for k in ("prior", "posterior_options") if k in posterior]
    given += [
        f"--{flag} {args[flag]}"
        for flag, own in (
            ("diffusivity", PRIOR_DIFFUSIVITY),
            ("device", "cpu"),
            ("engine", "serial"),
            ("address", None),
            ("n_jobs", None),
        )
        if args[flag] != own
    ]
    if given:
        raise ValueError(
            f"{given} are not options of --fit_method protocol_free, "
            "which reads the package's estimator of the default prior (straight "
            f"axons, diffusivity {PRIOR_DIFFUSIVITY} mm^2/s) on the CPU, without "
            "training; leave them out, or use --fit_method posterior, which "
            "trains for another prior, diffusivity, device or cluster."
        )
    _require_noise(args, noise, "--fit_method protocol_free")
    return dict(fit_method="protocol_free", **posterior), {}


def _refuse_search_flags(args, fit_method):
    """Refuse the label search's flags given with another method."""
    search = _given(
        max_iter=args["max_iter"],  # None by default: left out
        refine_mesh=bool(args["refine_mesh"]),
        search_bootstrap=args["search_bootstrap"],
        search_proposal=args["search_proposal"],
    )
    if search:
        raise ValueError(
            f"{[FLAGS[k] for k in sorted(search)]} are not options of --fit_method "
            f"{fit_method}; leave them out, or use --fit_method search if they "
            "are its."
        )


def _require_noise(args, noise, what):
    """Refuse a run without the noise level that ``what`` needs."""
    if noise is not None:
        return
    # --snr 0 or --sigma 0 say "unknown": named, so that the fix is not to
    # pass the flag that was passed.
    zero = next(
        (f"--{flag} 0" for flag in ("snr", "sigma") if args[flag] is not None),
        None,
    )
    given = f" ({zero} means unknown)" if zero else ""
    raise ValueError(
        f"{what} needs the noise level{given}: pass {NOISE_FLAGS} with a value above 0."
    )


#: The flags of the gradient table: keywords of
#: :func:`~dipy_spinverse.io.gradients.read_gradients`.
_GRADIENT_FLAGS = (
    "big_delta",
    "small_delta",
    "timing_file",
    "scheme_file",
    "b0_threshold",
    "bvecs_tol",
)

#: The search model's keywords that its option check does not take: those
#: of the grid, the simulator and the refinement
#: (:func:`~dipy_spinverse.reconst.search_model.check_search_options` takes
#: the rest).
_NOT_CHECKED = (
    "grid",
    "diffusivity",
    "batch_size",
    "device",
    "dtype",
    "mesh_options",
)


def search_options(model):
    """The keywords of the search model that its option check takes.

    Parameters
    ----------
    model : dict
        The search model's keywords (:attr:`Flags.model`).

    Returns
    -------
    dict
        Those of
        :func:`~dipy_spinverse.reconst.search_model.check_search_options`.
    """
    return {k: v for k, v in model.items() if k not in _NOT_CHECKED}


def _search_keywords(args, configured, posterior, mesh_options):
    """The label search's model keywords from the flags (``args``), its
    configuration built from ``--preset`` and the ``configured`` flags."""
    check_choice(args["preset"], "--preset", tuple(PRESETS))
    # One JSON flag holds the options of every method; with the search it is
    # the surface check's.
    if "n_posterior_samples" in posterior:
        raise ValueError(
            f"{FLAGS['n_posterior_samples']} is the number of draws of "
            "--fit_method posterior; leave it out with --fit_method search."
        )
    if "posterior_options" in posterior and "prior" not in posterior:
        raise ValueError(
            f"{FLAGS['posterior_options']} sets how a posterior is trained: "
            "pass --fit_method posterior, or with --fit_method search a "
            '"prior" in --posterior_options (the surface check), or leave '
            '"training" out.'
        )
    grid = {
        key: args[flag]
        for key, flag in (
            ("size", "grid_size"),
            ("resolution", "grid_resolution"),
            ("boundary", "boundary"),
        )
        if args[flag] is not None
    }
    # The preset's name is kept where no flag changes it, so that the log
    # names it.
    with in_flags():
        config = resolve_config(args["preset"], **configured)
        grid = make_grid(grid)
    return dict(
        grid=grid,
        diffusivity=args["diffusivity"],
        preset=config if configured else args["preset"],
        max_iter=args["max_iter"],
        batch_size=args["batch_size"],
        device=args["device"],
        dtype=args["dtype"],
        refine_mesh=bool(args["refine_mesh"]),
        mesh_options=mesh_options,
        **posterior,
    )


def _training_cluster(args):
    """The posterior model's training engine and address from ``--engine``
    and ``--address``: a posterior that must be trained simulates its
    training set on that cluster."""
    engine = args["engine"]
    if engine == "joblib":
        raise ValueError(
            "--engine joblib spreads a label search's voxels; --fit_method "
            "posterior trains on a cluster instead: use --engine ray or dask "
            "(with --address), or leave --engine out."
        )
    if args["n_jobs"] is not None and engine != "serial":
        raise ValueError(
            "--n_jobs sizes a label search's workers; --fit_method posterior "
            "trains on the whole local cluster it starts, or on --address: "
            "start one of the size you want (ray start --head --num-cpus N) and "
            "pass --address auto, or leave --n_jobs out."
        )
    return dict(training_engine=engine, training_address=args["address"])


def _given(**options):
    """The options set (0 means unknown or off: left out, so that presets
    without a noise model or a label search accept the defaults)."""
    return {name: value for name, value in options.items() if value}


def check_metrics(save_metrics):
    """The outputs ``--save_metrics`` asks for.

    Parameters
    ----------
    save_metrics : str, list of str or None
        Names among :data:`~dipy_spinverse.workflows.outputs.METRICS`.

    Returns
    -------
    list of str
        Those names (:data:`~dipy_spinverse.workflows.outputs.DEFAULT_METRICS`
        if none).
    """
    if not save_metrics:
        return list(DEFAULT_METRICS)
    if isinstance(save_metrics, str):
        save_metrics = [save_metrics]
    return [
        check_choice(name, "--save_metrics entry", METRICS) for name in save_metrics
    ]


def parse_mesh_options(mesh_options, *, refine_mesh=True):
    """The ``--mesh_options`` JSON object as checked refinement options.

    Parameters
    ----------
    mesh_options : str, dict or None
        A JSON object (or a dict) of
        :data:`dipy_spinverse.meshfit.refine.REFINE_DEFAULTS` keys.
    refine_mesh : bool
        Whether ``--refine_mesh`` was given: options without it are refused.

    Returns
    -------
    dict or None
        The options as given (the model fills in and keeps the defaults), or
        None when there are none.

    Raises
    ------
    ValueError
        Naming ``--mesh_options``: not JSON, not an object, an unknown key or
        a value out of range.
    """
    if mesh_options is None or mesh_options == "":
        return None
    if not refine_mesh:
        raise ValueError(
            "--mesh_options are the options of the smooth-mesh refinement; add "
            "--refine_mesh, or leave --mesh_options out."
        )
    example = "'{\"n_modes\": 8}'"
    if isinstance(mesh_options, str):
        try:
            mesh_options = json.loads(mesh_options)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"--mesh_options must be a JSON object such as {example}, got "
                f"{mesh_options!r} ({err})."
            ) from err
    if not isinstance(mesh_options, dict):
        raise ValueError(
            f"--mesh_options must be a JSON object such as {example}, got "
            f"{mesh_options!r}."
        )
    try:
        check_refine_options(mesh_options)
    except ValueError as err:
        raise ValueError(f"--mesh_options: {err}") from err
    return mesh_options


def parse_posterior_options(text, diffusivity):
    """``--posterior_options`` as model keywords.

    Parameters
    ----------
    text : str or None
        A JSON object, or the path of a file holding one, with keys among
        ``"prior"`` (fields of :class:`~dipy_spinverse.posterior.TissuePrior`),
        ``"training"`` (fields of
        :class:`~dipy_spinverse.posterior.TrainingOptions`) and
        ``"n_samples"``.
    diffusivity : float
        The prior's diffusivity unless it gives its own (mm^2/s).

    Returns
    -------
    dict
        ``prior``, ``posterior_options`` and ``n_posterior_samples``, those
        given.
    """
    if not text:
        return {}
    if not text.lstrip().startswith("{"):
        try:
            text = pathlib.Path(text).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(
                f"--posterior_options {text!r} is neither a JSON object nor a "
                f"readable JSON file ({err}); pass e.g. "
                '\'{"prior": {"cell_diameter": [1, 5]}}\' or demo/posterior.json.'
            ) from err
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--posterior_options is not valid JSON ({err}); e.g. "
            '\'{"prior": {"cell_diameter": [1, 5]}, "training": '
            '{"n_simulations": 5000}}\'.'
        ) from err
    known = {"prior", "training", "n_samples"}
    if not isinstance(options, dict) or set(options) - known:
        raise ValueError(
            f"--posterior_options must be a JSON object with keys among "
            f"{sorted(known)}, got {text!r}."
        )
    out = {}
    try:
        if "prior" in options:
            prior = {"diffusivity": diffusivity, **options["prior"]}
            out["prior"] = TissuePrior(**_tuples(prior))
        if "training" in options:
            out["posterior_options"] = TrainingOptions(**_tuples(options["training"]))
    except TypeError as err:
        raise ValueError(f"--posterior_options: {err}.") from err
    if "n_samples" in options:
        out["n_posterior_samples"] = options["n_samples"]
    return out


def _tuples(fields):
    """JSON lists as tuples (the dataclasses' ranges)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def parse_noise(sigma, snr):
    """The noise flags.

    Parameters
    ----------
    sigma : str, float or None
        ``--sigma``: in the data's units, or ``"auto"``.
    snr : float or None
        ``--snr``: of the b = 0 signal.

    Returns
    -------
    tuple or None
        ``None`` (unknown; 0 means unknown too), ``("snr", value)``,
        ``("sigma", value)`` or ``("auto", None)``.
    """
    if sigma is not None and snr is not None:
        raise ValueError("Give the noise once: --sigma or --snr, not both.")
    if snr is not None:
        snr = check_number(snr, "--snr", minimum=0.0)
        if snr == 0:
            return None
        if snr <= 1:
            raise ValueError(
                f"--snr {snr:g}: the SNR is the b=0 signal over the noise, and at "
                "or below 1 the noise is as large as the signal; pass the SNR of "
                "the b=0 images (e.g. 20 to 100), or leave --snr out if unknown."
            )
        return "snr", snr
    if sigma is None:
        return None
    if isinstance(sigma, str) and sigma.strip().lower() == "auto":
        return "auto", None
    try:
        value = float(sigma)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"--sigma must be a noise standard deviation in the data's units "
            f"(e.g. 20) or 'auto', got {sigma!r}."
        ) from err
    # The models' own check of sigma, early (before any data is read),
    # named as the flag; the model takes the checked value as it is.
    value = check_sigma(value, name="--sigma")
    return None if value == 0 else ("sigma", value)
