"""The fit methods, each a plug-in registered once (:data:`FIT_METHODS`).

A method is its model's class and one :class:`FitMethod` entry here. The
class holds what the method is: its ``settings()`` (the constructor's
keywords, ``gtab`` aside) and ``description()`` (the same as JSON-ready
values, the protocol included, which a fit file keeps) with the constructor
from them (``from_description``), the fit read back from a file's arrays
(``restored_fit``), and its status wording (``impossible_outputs``, in the
warnings a fit gives once). The entry adds its fit's file format and, for
the methods of ``dipy_fit_spinverse``, the command's parts: the function
that turns the flags the method owns into the model's keywords, the one
that fits a dataset and writes its outputs (maps, status, report, state),
and what an interrupted run keeps.

Whatever saves, reads, selects or runs a fit looks its method up here
(:func:`method_of`, :func:`method_of_fit`, :func:`method_of_format`,
:func:`method_named`) instead
of asking its name: a new method is one model class and one
:func:`register` call, and :func:`register` refuses one without every part
(:func:`missing_parts`). The command's parts live in the command's own
package, above this one: the entry names them as ``"module:function"``
(as a package's entry points do), and the command imports them when it
runs them.

The compartment models' fits are a kind of saved fit too (no command):
:mod:`dipy_spinverse.io.specs` registers them, with the functions that
describe and rebuild them, so that ``import dipy_spinverse.reconst`` does
not load the compartment models.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .fit import SpinverseFit
from .posterior import PosteriorFit
from .posterior_model import SpinversePosteriorModel
from .protocol_free_model import ProtocolFreeFit, SpinverseProtocolFreeModel
from .search_model import SpinverseSearchModel

__all__ = [
    "FitFormat",
    "Command",
    "FitMethod",
    "FIT_METHODS",
    "SAVED_KINDS",
    "DEFAULT_METHOD",
    "register",
    "missing_parts",
    "method_of",
    "method_of_fit",
    "method_of_format",
    "method_named",
]

#: The method of fit files written before a model's description named its
#: kind (the label search, the only method then).
DEFAULT_METHOD = "search"

#: An entry point of the command: ``"package.module:function"``.
_ENTRY_POINT = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class FitFormat:
    """How a kind of fit is saved (:func:`dipy_spinverse.io.save_fit`).

    Parameters
    ----------
    name : str
        The file header's ``format``.
    version : int
        The newest version of it this package writes (a file of a newer
        one is refused, naming the fix).
    arrays : tuple of str
        The arrays every file of it holds (``mask`` and ``status`` among
        them); a file without one is refused as damaged.
    header : tuple of str
        The fit's attributes its header keeps (the fitted data's
        ``fingerprint``, ...).
    """

    name: str
    version: int
    arrays: tuple
    header: tuple = ()


@dataclass(frozen=True)
class Command:
    """A method's parts in ``dipy_fit_spinverse``.

    Parameters
    ----------
    flags : str
        Entry point (``"module:function"``) of ``flags(args, *, noise,
        metrics, mesh_options)``: the model's keywords and the fit's options
        from the flags the method owns, ``(model, fit_options)``; it refuses
        the flags it does not own, naming them.
    outputs : str
        Entry point of ``outputs(dataset, out, flags, *, staging)``: the fit
        of one dataset and its outputs (maps, status, report, state), one
        set.
    interrupted : str
        What Ctrl-C during the fit leaves, said on the command's last line:
        a template of ``{folder}`` (the outputs' folder), ``{checkpoint}``
        (the fit's checkpoint store) and ``{cache}`` (the cache folder).
    """

    flags: str
    outputs: str
    interrupted: str


@dataclass(frozen=True)
class FitMethod:
    """One fit method (or kind of saved fit), registered once.

    Parameters
    ----------
    name : str
        Its name: ``SpinverseModel``'s ``fit_method`` for the methods the
        command runs, the ``kind`` of its model's description.
    model : type
        The model's class (its instances are this method's models), with
        ``settings()`` and, for a method of the command,
        ``impossible_outputs`` (the status wording of its warnings).
    fit : type
        The fit's class (a :class:`~dipy_spinverse.masked.MaskedFit`).
    file_format : FitFormat
        How its fits are saved.
    command : Command or None
        Its parts in ``dipy_fit_spinverse``; None for a kind of saved fit
        that the command does not offer (the compartment models').
    describe : callable, optional
        ``describe(model)``: the model's JSON-ready description, its table
        included; default the class's ``description``.
    rebuild : callable, optional
        ``rebuild(description)``: the model described; default the
        class's ``from_description``.
    restore : callable, optional
        ``restore(model, arrays, header)``: the fit of a file's arrays
        (``mask`` and the per-voxel arrays) and header; default the class's
        ``restored_fit``. A ValueError says what is damaged.
    """

    name: str
    model: type
    fit: type
    file_format: FitFormat
    command: Command | None = None
    describe: Callable | None = field(default=None, repr=False)
    rebuild: Callable | None = field(default=None, repr=False)
    restore: Callable | None = field(default=None, repr=False)

    def __post_init__(self):
        # The model class's own parts, where no function is given.
        own = dict(
            describe="description",
            rebuild="from_description",
            restore="restored_fit",
        )
        for part, attribute in own.items():
            if getattr(self, part) is None:
                object.__setattr__(self, part, getattr(self.model, attribute, None))


#: Every registered kind of fit, by name: what ``save_fit`` saves and
#: ``load_fit`` reads.
SAVED_KINDS = {}
#: The methods of ``SpinverseModel(gtab, fit_method=...)`` and of the
#: command, by name.
FIT_METHODS = {}

_POSTERIOR_INTERRUPTED = (
    "no maps were written ({folder} keeps the previous run's outputs, if any); "
    "a posterior being trained keeps its simulations in {cache} "
    "(posterior-<key>.partial) and the same command continues them"
)
_KEPT_AFTER_INTERRUPT = (
    "the voxels fitted so far are kept in {checkpoint}; run the same command "
    "again to continue ({folder} keeps the previous run's outputs, if any)"
)


def missing_parts(method):
    """What a method lacks to be registered.

    Parameters
    ----------
    method : FitMethod

    Returns
    -------
    list of str
        One phrase per missing or malformed part (empty: complete).
    """
    missing = []
    if not isinstance(method.name, str) or not method.name:
        missing.append("a name")
    if not isinstance(method.model, type):
        return [*missing, "a model class"]
    if not callable(getattr(method.model, "settings", None)):
        missing.append(f"{method.model.__name__}.settings()")
    for part, attribute in (
        ("describe", "description"),
        ("rebuild", "from_description"),
        ("restore", "restored_fit"),
    ):
        if not callable(getattr(method, part)):
            missing.append(f"{method.model.__name__}.{attribute}() (or {part})")
    if not isinstance(method.fit, type) or not callable(
        getattr(method.fit, "saved_arrays", None)
    ):
        missing.append("a fit class with saved_arrays()")
    missing += _format_missing(method.file_format)
    if method.command is not None:
        wording = getattr(method.model, "impossible_outputs", None)
        if not isinstance(wording, str) or not wording:
            missing.append(
                f"{method.model.__name__}.impossible_outputs (the status wording)"
            )
        missing += _command_missing(method.command)
    return missing


def _format_missing(file_format):
    if not isinstance(file_format, FitFormat):
        return ["a FitFormat"]
    missing = []
    if not isinstance(file_format.name, str) or not file_format.name:
        missing.append("the file format's name")
    version = file_format.version
    if not (isinstance(version, int) and not isinstance(version, bool) and version):
        missing.append("the file format's version (a whole number of 1 or more)")
    arrays = file_format.arrays
    if not isinstance(arrays, tuple) or not {"mask", "status"} <= set(arrays):
        missing.append("the file format's arrays (a tuple with mask and status)")
    if not isinstance(file_format.header, tuple):
        missing.append("the file format's header fields (a tuple)")
    return missing


def _command_missing(command):
    if not isinstance(command, Command):
        return ["a Command"]
    missing = [
        f"the command's {part} (an entry point 'module:function')"
        for part in ("flags", "outputs")
        if not (
            isinstance(getattr(command, part), str)
            and _ENTRY_POINT.fullmatch(getattr(command, part))
        )
    ]
    if not isinstance(command.interrupted, str) or not command.interrupted:
        missing.append("the command's interrupted wording")
    return missing


def register(method):
    """Add ``method`` to the registry (:data:`SAVED_KINDS`; and, with a
    command, :data:`FIT_METHODS`).

    Parameters
    ----------
    method : FitMethod

    Returns
    -------
    FitMethod
        ``method``.

    Raises
    ------
    ValueError
        A part missing (each named), or a name or file format that another
        method's model class holds already.
    """
    missing = missing_parts(method)
    if missing:
        raise ValueError(
            f"fit method {method.name!r} cannot be registered without "
            f"{', '.join(missing)}; give every part (dipy_spinverse.reconst."
            "methods.FitMethod)."
        )
    for other in SAVED_KINDS.values():
        if other.model is method.model:
            continue  # registered again (its module imported again)
        clash = [
            what
            for what, same in (
                ("name", other.name == method.name),
                ("file format", other.file_format.name == method.file_format.name),
            )
            if same
        ]
        if clash:
            raise ValueError(
                f"fit method {method.name!r}: its {' and '.join(clash)} "
                f"{'are' if len(clash) > 1 else 'is'} {other.name!r}'s "
                f"({other.model.__name__}); give it its own."
            )
    SAVED_KINDS[method.name] = method
    if method.command is not None:
        FIT_METHODS[method.name] = method
    return method


def method_of(model):
    """The registered method whose model class ``model`` is an instance of.

    Parameters
    ----------
    model : object

    Returns
    -------
    FitMethod or None
        None for a model of no registered method.
    """
    for method in SAVED_KINDS.values():
        if isinstance(model, method.model):
            return method
    return None


def method_of_fit(fit):
    """The registered method of ``fit``: its model's, where ``fit`` is of
    that method's fit class.

    Parameters
    ----------
    fit : object

    Returns
    -------
    FitMethod or None
        None for anything else (another object, a fit of a model of another
        method).
    """
    method = method_of(getattr(fit, "model", None))
    if method is None or not isinstance(fit, method.fit):
        return None
    return method


def method_of_format(name):
    """The registered method whose fits are saved in the format ``name``, or
    None."""
    for method in SAVED_KINDS.values():
        if method.file_format.name == name:
            return method
    return None


def method_named(name):
    """The registered method (or kind of saved fit) ``name``.

    Raises
    ------
    ValueError
        An unknown name, naming the registered ones.
    """
    if name not in SAVED_KINDS:
        raise ValueError(
            f"no fit method {name!r}; this dipy_spinverse has "
            f"{', '.join(map(repr, SAVED_KINDS))}"
        )
    return SAVED_KINDS[name]


register(
    FitMethod(
        name="search",
        model=SpinverseSearchModel,
        fit=SpinverseFit,
        # Version 2: one SpinverseFit class, S0_sequences columns in rank
        # order (Protocol.sequences), the label search's options named
        # search_*, no seed. Version 3: the parameters of the voxels in the
        # mask only, (n_mask, ...).
        file_format=FitFormat(
            name="dipy_spinverse.SpinverseFit",
            version=3,
            arrays=(
                "mask",
                "status",
                "permeability",
                "predicted",
                "S0",
                "S0_sequences",
                "loss",
            ),
            header=("fingerprint", "noise_level"),
        ),
        command=Command(
            flags="dipy_spinverse.workflows.flags:search_flags",
            outputs="dipy_spinverse.workflows.spinverse:fit_search",
            interrupted=_KEPT_AFTER_INTERRUPT,
        ),
    )
)
register(
    FitMethod(
        name="posterior",
        model=SpinversePosteriorModel,
        fit=PosteriorFit,
        file_format=FitFormat(
            name="dipy_spinverse.PosteriorFit",
            version=1,
            arrays=("mask", "status", "inputs", "sigma", "S0"),
        ),
        command=Command(
            flags="dipy_spinverse.workflows.flags:posterior_flags",
            outputs="dipy_spinverse.workflows.spinverse:fit_posterior",
            interrupted=_POSTERIOR_INTERRUPTED,
        ),
    )
)
register(
    FitMethod(
        name="protocol_free",
        model=SpinverseProtocolFreeModel,
        fit=ProtocolFreeFit,
        file_format=FitFormat(
            name="dipy_spinverse.ProtocolFreeFit",
            version=1,
            arrays=("mask", "status", "tokens", "sigma", "S0"),
            header=("fingerprint",),
        ),
        command=Command(
            flags="dipy_spinverse.workflows.flags:protocol_free_flags",
            outputs="dipy_spinverse.workflows.spinverse:fit_protocol_free",
            interrupted=_KEPT_AFTER_INTERRUPT,
        ),
    )
)
