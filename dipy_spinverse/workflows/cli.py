"""Running the package's DIPY workflows as console scripts.

The core names options as Python keywords (``out_dir=...``,
``b0_threshold``), in its refusals
(:class:`~dipy_spinverse.checks.OptionError`) and in its log lines that
name options (they carry them: ``extra={"options": (...)}``). A command
rewords both in its flags (:func:`options_as_flags`,
:func:`reword_options`).
"""

import ast
import contextlib
import importlib
import importlib.metadata
import logging
import os
import re
import sys

import dipy
from dipy.utils.logging import logger
from dipy.workflows.flow_runner import run_flow
from nibabel.filebasedimages import ImageFileError

__all__ = [
    "run_command",
    "dipy_fit_spinverse",
    "dipy_fit_tissue_maps",
    "flag_names",
    "reword_options",
    "options_as_flags",
]

#: A value as the core's messages write it in a setting (``'default'``,
#: ``0``, ``1e-05``, ``True``).
_VALUE = r"'[^']*'|[\w.+-]*\w"
#: A quoted phrase holding a space or a path separator (``'small_delta
#: big_delta'``, a path's repr): what a file holds or a path, not options,
#: left as it is.
_QUOTED = r"(?<!\w)'[^'\n]*[\s/\\][^'\n]*'(?!\w)"


def flag_names(*options):
    """``{option: "--option"}``: the flags of a DIPY workflow's ``run``
    arguments, which DIPY names as the arguments."""
    return {option: f"--{option}" for option in options}


def reword_options(err, flags):
    """The message of ``err`` in a command's flags.

    Parameters
    ----------
    err : OptionError
        A refusal of the core, naming options as keywords.
    flags : dict
        The command's flag of each option it sets.

    Returns
    -------
    str
        Its message with each option it names that has a flag written as
        the flag, a setting as the flag and its value (``max_iter=0``:
        ``--max_iter 0``; ``refine_mesh=True``: ``--refine_mesh``), and only
        the fixes a flag sets.
    """
    named = {option: flags[option] for option in err.options if option in flags}
    return _in_flags(err.wording(settable=named), named)


def _in_flags(text, named):
    """``text`` with the options of ``named`` (option: flag) as their flags."""
    if not named:
        return text
    names = "|".join(re.escape(o) for o in sorted(named, key=len, reverse=True))
    pattern = rf"({_QUOTED})|(?<![\w-])({names})(?:=({_VALUE}))?(?!\w)"

    def flag(match):
        if match[1]:
            return match[1]
        return _setting(named[match[2]], match[3])

    return re.sub(pattern, flag, text)


def _setting(flag, value):
    """``flag`` set to ``value`` (a Python literal, or None: the flag alone)."""
    if value is None:
        return flag
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    return flag if value is True else f"{flag} {value}"


class _FlagWording(logging.Filter):
    """Rewords the log lines that name options (``extra={"options": ...}``)
    in a command's flags."""

    def __init__(self, flags):
        super().__init__()
        self.flags = flags

    def filter(self, record):
        options = getattr(record, "options", ())
        named = {o: self.flags[o] for o in options if o in self.flags}
        if named:
            record.msg, record.args = _in_flags(record.getMessage(), named), ()
        return True


@contextlib.contextmanager
def options_as_flags(flags):
    """The core's words in a command's flags, within the block: an
    :class:`~dipy_spinverse.checks.OptionError` raised as a ``ValueError``
    worded in ``flags`` (:func:`reword_options`), and the log lines that
    name options worded so.

    Parameters
    ----------
    flags : dict
        The command's flag of each option it sets.
    """
    # Here, not at the top: the commands import this module before torch.
    from ..checks import OptionError

    wording = _FlagWording(flags)
    logger.addFilter(wording)
    try:
        yield
    except OptionError as err:
        raise ValueError(reword_options(err, flags)) from err
    finally:
        logger.removeFilter(wording)


def _passive_threads():
    """Passive OpenMP waiting for the commands (set before torch loads).

    Spin-waiting OpenMP threads (torch's default) starve when another thread
    pool shares the cores -- numpy/scipy's OpenBLAS, or DIPY's joblib/dask/ray
    workers -- and every small torch kernel then costs ~20 ms. Passive
    waiting costs nothing measurable alone. Set for the package's commands
    only, never on ``import dipy_spinverse``; export the variable yourself
    to choose otherwise.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _command(path):
    """Run the workflow class ``"module:Class"`` as this process's command.

    The module is loaded by name after :func:`_passive_threads`, so that the
    setting precedes torch's first import (this module sits below the
    workflows and never imports them itself).
    """
    _passive_threads()
    module, name = path.split(":")
    flow = getattr(importlib.import_module(module), name)
    return run_command(flow())


def dipy_fit_spinverse():
    """Console script ``dipy_fit_spinverse``."""
    return _command("dipy_spinverse.workflows.spinverse:SpinverseFlow")


def dipy_fit_tissue_maps():
    """Console script ``dipy_fit_tissue_maps``."""
    return _command("dipy_spinverse.workflows.tissue:TissueMapsFlow")


def run_command(flow):
    """Run a DIPY workflow from the command line, as ``run_flow`` does.

    Two differences: ``--version`` prints this package's version (DIPY's
    parser alone would print DIPY's), and a user's mistake -- a
    ``ValueError``, whose message names the argument and the fix, a file
    that is missing or cannot be read (``OSError``), or one that is not an
    image nibabel reads -- ends the command with that message and exit
    status 2, as argparse does, instead of a traceback. Ctrl-C ends it with
    one line (and the flow's ``on_interrupt`` text, if it has one) and exit
    status 130.

    Parameters
    ----------
    flow : dipy.workflows.workflow.Workflow

    Returns
    -------
    int or None
        0 after ``--version``, else what ``run_flow`` returns.
    """
    if "--version" in sys.argv[1:]:
        version = importlib.metadata.version("dipy_spinverse")
        print(f"dipy_spinverse {version} (DIPY {dipy.__version__})")
        return 0
    name = os.path.basename(sys.argv[0])
    try:
        return run_flow(flow)
    except (ValueError, OSError, ImageFileError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # Ctrl-C is the user's choice, not a failure to debug: one line
        # (the flow's ``on_interrupt`` says what was kept), the shell's 130.
        hint = getattr(flow, "on_interrupt", "")
        print(f"{name}: interrupted{'; ' + hint if hint else ''}.", file=sys.stderr)
        sys.exit(130)
