"""The commands that ship and check the posterior estimators:
``python -m dipy_spinverse.posterior [--folder DIR] [check | sources |
rekey --reason TEXT [NAME ...] | ship PATH --about TEXT]`` (:func:`main`).

What they read and write, the manifest and the code digest, is
:mod:`.shipped`'s (when to re-key and when to ship: its documentation).
This module sits above the estimators, since :func:`ship` loads the file it
installs as the estimator its name gives (:mod:`.cache`'s per-protocol one,
or :mod:`.protocol_free`'s); it shapes no estimator, and nothing hashed by
:func:`~.shipped.estimator_code` imports it.

``ship`` loads the file it is given (an estimator of the settings and code
its name gives) before it replaces anything, and installs it whole or not at
all. Exit status: 0 when every shipped estimator is accepted (or the
command did its work); 1 when a shipped estimator is not accepted by this
code, or is missing; 2 when the command is refused (its arguments, a
``--folder`` that does not exist, a damaged manifest, a file that is not
an estimator): one line on stderr, ``python -m dipy_spinverse.posterior:
error: ...``, as argparse refuses its arguments, and nothing is changed.
"""

import argparse
import pathlib
import re
import shutil
import types
import zipfile

import torch

from ..files import atomic_write
from .cache import load_estimator_file
from .protocol_free import ProtocolFreeEstimator, shipped_key
from .shipped import (
    DEFAULT_KIND,
    ESTIMATOR_ROOTS,
    MANIFEST_NAME,
    SHIPPED,
    ShippedError,
    estimator_code,
    estimator_sources,
    one_line,
    read_manifest,
    refusal,
    rekey,
    shipped_name,
    write_manifest,
)

__all__ = ["EXIT_STATUSES", "ship", "main"]

# A cache file's name: the settings' key and the code digest.
_CACHED = re.compile(r"posterior-(?P<settings>[0-9a-f]+)-(?P<code>[0-9a-f]+)\.pt")

# The flow's spline transforms in a saved per-protocol estimator (one level
# deeper when it samples fast: estimator.PosteriorEstimator).
_TRANSFORM = re.compile(r"flow\.transform\.(?:transform\.)?transforms\.(\d+)\.")

# What to ship instead of a file that is not an estimator of its name.
_SHIP_FIX = (
    "ship the file its training wrote, unchanged (`python -m "
    "dipy_spinverse.posterior.protocol_free train` or load_or_train's cache; "
    "doc/validation/posterior.md)"
)

#: The command line's exit statuses (its ``--help``).
EXIT_STATUSES = (
    "exit status: 0 every shipped estimator accepted (or the command done); "
    "1 a shipped estimator not accepted by this code, or missing; 2 the "
    "command refused (its arguments, a --folder that does not exist, a "
    "damaged manifest, a file that is not an estimator), in one line on "
    "stderr, with nothing changed."
)


def ship(path, *, about, folder=SHIPPED):
    """Ship an estimator trained into a cache: copy it into ``folder`` under
    its settings' name, recorded as trained under the code its name holds.

    The file is first copied beside its target and loaded there: only an
    estimator of the settings key and code its name gives is installed, and
    it replaces the shipped file in one rename (the old file stays until the
    new one is whole). Anything else is refused and nothing is changed.

    Parameters
    ----------
    path : path-like
        ``posterior-<settings>-<code>.pt``, as
        :func:`~dipy_spinverse.posterior.load_or_train` caches it (its
        ``state``, ``key`` and ``code``), or as ``python -m
        dipy_spinverse.posterior.protocol_free train`` writes the
        protocol-free estimator (its tensors alone: its code is its name's).
    about : str
        What it is, in words (its prior, options and protocol).
    folder : path-like

    Returns
    -------
    pathlib.Path
        The shipped file.

    Raises
    ------
    ShippedError
        Naming ``path`` and why, when it is not such a file, ``about`` is
        empty, or the manifest in ``folder`` is damaged.
    """
    given = path
    path = pathlib.Path(path)
    match = _CACHED.fullmatch(path.name)
    if match is None:
        raise ShippedError(
            f"{given} is not a cached posterior estimator "
            "(posterior-<settings>-<code>.pt); train it with the command in "
            "doc/validation/posterior.md and pass the file it writes."
        )
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ShippedError(f"{given} {what}; {_SHIP_FIX}.")
    about = " ".join(str(about).split())
    if not about:
        raise ShippedError(
            "about (--about) is empty: say what the estimator is (its prior, "
            "training options and protocol)."
        )
    # A damaged manifest is refused before the estimator is replaced.
    manifest = read_manifest(folder)
    target = pathlib.Path(folder) / shipped_name(match["settings"])
    with atomic_write(target) as tmp:
        shutil.copyfile(path, tmp)
        # The copy is checked, so that the bytes loaded are those installed;
        # a refusal removes it and leaves the shipped file as it was.
        _check_estimator(
            pathlib.Path(tmp), given, settings=match["settings"], code=match["code"]
        )
    kind = "protocol_free" if match["settings"] == shipped_key() else DEFAULT_KIND
    manifest["estimators"][target.name] = {
        "about": about,
        "kind": kind,
        "trained_under": match["code"],
        "accepted": [],
    }
    if match["code"] == estimator_code(kind):
        manifest["sources"] = estimator_sources()
    write_manifest(folder, manifest)
    return target


def _check_estimator(copy, given, *, settings, code):
    """Load ``copy`` (of the file ``given``) as the estimator of ``settings``
    trained under ``code``; else :class:`ShippedError` naming ``given``."""
    if copy.stat().st_size == 0:
        raise ShippedError(f"{given} is empty (0 bytes); {_SHIP_FIX}.")
    # torch.save writes a zip archive: other bytes (or a cut one) are named
    # as such, not by torch's advice on weights_only.
    if not zipfile.is_zipfile(copy):
        raise ShippedError(
            f"{given} is not a whole torch file ({copy.stat().st_size} bytes, "
            f"not a zip archive as torch.save writes; cut short?); {_SHIP_FIX}."
        )
    try:
        saved = torch.load(copy, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch's errors on foreign bytes vary
        raise ShippedError(
            f"{given} cannot be read as a torch file ({type(err).__name__}: "
            f"{one_line(err, 160)}); {_SHIP_FIX}."
        ) from err
    if settings == shipped_key():
        _check_protocol_free(saved, given)
    else:
        _check_per_protocol(copy, saved, given, settings=settings, code=code)


def _check_protocol_free(saved, given):
    """``saved`` loads into the protocol-free estimator (its tensors alone),
    else :class:`ShippedError` naming ``given``."""
    try:
        ProtocolFreeEstimator().load_state_dict(saved)
    except Exception as err:  # noqa: BLE001 - any mismatch refuses the file
        raise ShippedError(
            f"{given} is named as the protocol-free estimator, but its tensors "
            f"do not load into one ({type(err).__name__}: {one_line(err, 160)}); "
            f"{_SHIP_FIX}."
        ) from err


def _check_per_protocol(copy, saved, given, *, settings, code):
    """``saved`` is a per-protocol estimator cached for ``settings`` and
    ``code`` (its ``key`` and ``code``) and its tensors load into one (of
    the widths they have), else :class:`ShippedError` naming ``given``."""
    if not isinstance(saved, dict) or not {"state", "key", "code"} <= saved.keys():
        held = sorted(saved)[:5] if isinstance(saved, dict) else type(saved).__name__
        raise ShippedError(
            f"{given} is not a posterior estimator cached by load_or_train "
            f"(it holds {held}, not its 'state', 'key' and 'code'); {_SHIP_FIX}."
        )
    if saved["code"] != code:
        raise ShippedError(
            f"{given} was trained under code {saved['code']}, but its name says "
            f"{code} (renamed by hand?); {_SHIP_FIX}."
        )
    if saved["key"] != f"{settings}-{code}":
        raise ShippedError(
            f"{given} holds the estimator of key {saved['key']}, but its name "
            f"says {settings}-{code} (renamed by hand?); {_SHIP_FIX}."
        )
    try:
        state = saved["state"]
        transforms = {m[1] for key in state if (m := _TRANSFORM.match(key))}
        widths = types.SimpleNamespace(
            hidden=state["embed.2.weight"].shape[0],
            embedding=state["embed.4.weight"].shape[0],
            transforms=len(transforms),
        )
        load_estimator_file(copy, state["x_mean"].numel() - 1, widths, code=code)
    except Exception as err:  # noqa: BLE001 - any mismatch refuses the file
        why = (
            f"it has no tensor {err}"
            if isinstance(err, KeyError)
            else f"{type(err).__name__}: {one_line(err, 160)}"
        )
        raise ShippedError(
            f"{given} is not a posterior estimator: its tensors do not load "
            f"into one ({why}); {_SHIP_FIX}."
        ) from err


def main(argv=None):
    """``python -m dipy_spinverse.posterior [--folder DIR] [check | sources |
    rekey --reason TEXT [NAME ...] | ship PATH --about TEXT]``; see the
    module's documentation.

    Returns
    -------
    int
        The exit status: 0, or 1 when a shipped estimator is not accepted by
        this code (or missing).

    Raises
    ------
    SystemExit
        With status 2 when the command is refused (:class:`ShippedError`,
        or a file that cannot be written): one line on stderr, as argparse
        refuses its arguments; nothing is changed.
    """
    parser = argparse.ArgumentParser(
        prog="python -m dipy_spinverse.posterior",
        description="The shipped posterior estimators and the code they accept.",
        epilog=EXIT_STATUSES,
    )
    parser.add_argument(
        "--folder",
        default=str(SHIPPED),
        help="the shipped estimators' folder (default: this package's)",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("check", help="which shipped estimators this code accepts")
    commands.add_parser("sources", help="the files the code digest hashes")
    re_key = commands.add_parser("rekey", help="accept this code, on purpose")
    re_key.add_argument("--reason", required=True, help="one line: why")
    re_key.add_argument("names", nargs="*", help="files (default: every one)")
    to_ship = commands.add_parser("ship", help="ship a newly trained estimator")
    to_ship.add_argument("path")
    to_ship.add_argument("--about", required=True, help="what it is, in words")
    args = parser.parse_args(argv)
    try:
        return _command(args)
    except (ShippedError, OSError) as err:
        # The one way a command is refused: one line and status 2, as
        # argparse refuses its arguments (status 1 is a refused estimator).
        parser.exit(2, f"{parser.prog}: error: {one_line(err)}\n")


def _command(args):
    """Run the parsed command line ``args`` (:func:`main`); its exit status."""
    folder = _folder(args.folder)
    if args.command == "sources":
        for relative, digest in estimator_sources().items():
            print(f"{digest}  {relative}")
        return 0
    if args.command == "rekey":
        done = rekey(args.reason, names=args.names or None, folder=folder)
        print(f"code {_codes()} accepted for: {', '.join(done) or 'none (already)'}")
        return 0
    if args.command == "ship":
        print(f"shipped {ship(args.path, about=args.about, folder=folder)}")
    return _check(folder, args.folder)


def _codes():
    """Each kind's code digest, in words."""
    return ", ".join(f"{estimator_code(k)} ({k})" for k in ESTIMATOR_ROOTS)


def _folder(given):
    """``--folder`` as a path, if it is a folder; else :class:`ShippedError`
    naming the value given."""
    folder = pathlib.Path(given)
    if not folder.exists():
        raise ShippedError(
            f"--folder {given} does not exist; give the shipped estimators' "
            f"folder (default {SHIPPED}), or create it first to ship into a "
            "new one."
        )
    if not folder.is_dir():
        raise ShippedError(
            f"--folder {given} is not a folder; give the shipped estimators' "
            f"folder (default {SHIPPED})."
        )
    return folder


def _check(folder, given):
    """Print whether this code is accepted for each estimator in the manifest
    of ``folder`` and each ``posterior-*.pt`` there; the exit status."""
    estimators = read_manifest(folder)["estimators"]
    # A file the manifest does not list is named too: it is never served.
    names = sorted(set(estimators) | {p.name for p in folder.glob("posterior-*.pt")})
    if not names:
        raise ShippedError(
            f"--folder {given} holds no shipped estimators (no {MANIFEST_NAME}, "
            f"no posterior-*.pt); give the shipped estimators' folder (default "
            f"{SHIPPED})."
        )
    print(f"code digests {_codes()}")
    status = 0
    for name in names:
        if not (folder / name).is_file():
            print(f"{name}: MISSING")
            print(
                f"  its manifest lists it, but {folder / name} is not there; "
                "restore it from the package's repository."
            )
            status = 1
            continue
        why = refusal(name, folder=folder)
        print(f"{name}: {'accepted' if why is None else 'NOT ACCEPTED'}")
        if why is not None:
            print(f"  {why}")
            status = 1
    return status
