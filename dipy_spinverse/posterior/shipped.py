r"""The posterior estimators shipped with the package, and the code that trained them.

A posterior estimator depends on its prior, protocol and training options
and on the code that simulates and trains it: the modules
:func:`estimator_code` hashes (:mod:`dipy_spinverse.provenance`: the
prior, its simulator, the training and its cache, the flow with its
calibration and support test, the descriptors, and everything of ``sim/``
and ``geometry/`` they import). A cached estimator is named by both
(``posterior-<settings>-<code>.pt``), so other code never reads it.

A shipped estimator (``trained/posterior-<settings>.pt``) is named by its
settings alone and served only when ``trained/manifest.json`` accepts the
current code: the code it was trained under, or a later one re-keyed on
purpose, each with its one-line reason. Otherwise it is not used (a
:class:`~dipy_spinverse.provenance.StaleEstimatorWarning`; the estimator is
trained into the user's cache), and ``tests/posterior/test_shipped.py``
fails with the command to run.

After a change to that code, either

- the estimators' simulations and training are unchanged (a comment, an
  optional argument whose default keeps every signal; say which test shows
  it): re-key them on purpose::

      python -m dipy_spinverse.posterior rekey --reason \
          "sim/operators.py: an optional argument; signals unchanged (tests/sim/...)"

  and commit ``trained/manifest.json``;
- or they changed: train each again (doc/validation/posterior.md, into a
  cache folder) and ship the new file::

      python -m dipy_spinverse.posterior ship \
          CACHE/posterior-<settings>-<code>.pt --about "DEMO_PRIOR, DEMO_TRAINING"

``python -m dipy_spinverse.posterior`` (or ``check``) says which
shipped estimators the current code accepts and which of the hashed files
changed since the last re-key; ``sources`` lists the hashed files.

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
import datetime
import json
import pathlib
import re
import shutil
import types
import zipfile

from ..files import atomic_write
from ..provenance import code_digest, source_digests

__all__ = [
    "ShippedError",
    "SHIPPED",
    "EXIT_STATUSES",
    "MANIFEST_NAME",
    "TRAINING_ROOTS",
    "NOT_FOLLOWED",
    "REKEY_COMMAND",
    "estimator_code",
    "read_manifest",
    "refusal",
    "rekey",
    "ship",
    "shipped_name",
    "main",
]

#: The folder of the shipped estimators: the README demo's (its posterior
#: fit's, its search's surface check's, and the default prior's, on the
#: demo's protocol), made by the commands in doc/validation/posterior.md and
#: sections.md and retrained by slow tests.
SHIPPED = pathlib.Path(__file__).resolve().parent / "trained"

#: The manifest in :data:`SHIPPED`: for each shipped file, the code it was
#: trained under and the later code accepted for it.
MANIFEST_NAME = "manifest.json"

#: What makes a posterior estimator, in the order of its steps: the prior,
#: its simulator, the training and the cache
#: (:func:`~dipy_spinverse.posterior.load_or_train`); every module of the
#: package they import follows (the flow, its calibration and support test,
#: the targets, ``sim/``, ``geometry/``). Not the package's ``__init__``: it
#: only re-exports them.
TRAINING_ROOTS = (
    "posterior.prior",
    "posterior.simulator",
    "posterior.training",
    "posterior.cache",
    "posterior.protocol_free",
)

#: Modules of the posterior that shape no estimator: this one, and the
#: checkpoint of simulations (it stores them; it does not make them).
NOT_FOLLOWED = ("posterior.shipped", "posterior.checkpoint")

#: The command that re-keys the shipped estimators for the current code.
REKEY_COMMAND = 'python -m dipy_spinverse.posterior rekey --reason "..."'

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


class ShippedError(ValueError):
    """A refusal of the shipped estimators' tools: a damaged manifest, a file
    that is not an estimator of its name, a folder that does not exist, a
    re-key without a reason. Its message names what was given and the fix;
    the command line prints it in one line and exits with status 2."""


def estimator_code():
    """The digest of the code that trains a posterior estimator.

    Returns
    -------
    str
        :func:`~dipy_spinverse.provenance.code_digest` of
        :data:`TRAINING_ROOTS` without :data:`NOT_FOLLOWED`.
    """
    return code_digest(*TRAINING_ROOTS, exclude=NOT_FOLLOWED)


def _estimator_sources():
    return source_digests(*TRAINING_ROOTS, exclude=NOT_FOLLOWED)


def shipped_name(settings):
    """The file name of the shipped estimator of a settings key."""
    return f"posterior-{settings}.pt"


def read_manifest(folder=SHIPPED):
    """The manifest of the shipped estimators in ``folder``.

    Parameters
    ----------
    folder : path-like

    Returns
    -------
    dict
        ``{"estimators": {file name: {"about", "trained_under", "accepted":
        [{"code", "reason", "date"}, ...]}}, "sources": {path: digest}}``
        (``sources``: the hashed files' digests at the last re-key or ship);
        empty entries when there is no manifest.

    Raises
    ------
    ShippedError
        Naming the file when it is not a manifest (unreadable, not JSON, or
        not of the layout above).
    """
    path = pathlib.Path(folder) / MANIFEST_NAME
    if not path.exists():
        return {"estimators": {}, "sources": {}}
    try:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError("it is empty")
        manifest = json.loads(text)
        _check_layout(manifest)
    except (OSError, ValueError) as err:
        raise ShippedError(
            f"the shipped estimators' manifest {path} cannot be read "
            f"({_brief(err, 160)}); restore it from the package's repository (or "
            "reinstall dipy_spinverse)."
        ) from err
    manifest.setdefault("sources", {})
    return manifest


def _check_layout(manifest):
    """ValueError saying how ``manifest`` (parsed JSON) is not a manifest's
    layout (:func:`read_manifest`); what the other functions read of it."""
    if not isinstance(manifest, dict):
        raise ValueError(f"it holds a JSON {type(manifest).__name__}, not a table")
    estimators = manifest.get("estimators")
    if not isinstance(estimators, dict):
        raise ValueError("no 'estimators' table")
    if not isinstance(manifest.get("sources", {}), dict):
        raise ValueError("its 'sources' is not a table")
    for name, entry in estimators.items():
        if not isinstance(entry, dict):
            raise ValueError(f"its entry {name!r} is not a table")
        under = entry.get("trained_under")
        accepted = entry.get("accepted", [])
        codes = accepted if isinstance(accepted, list) else [None]
        if not isinstance(under, (str, type(None))) or not all(
            isinstance(item, dict) and isinstance(item.get("code"), str)
            for item in codes
        ):
            raise ValueError(
                f"its entry {name!r} has no 'trained_under' digest (or null) "
                "and list of 'accepted' codes"
            )


def _brief(err, limit=None):
    """An exception's message on one line (a manifest's JSON error, torch's
    multi-line load_state_dict report), cut after ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if limit is None or len(text) <= limit else f"{text[:limit]}..."


def _accepted(entry):
    """The code digests a manifest entry accepts."""
    codes = {item["code"] for item in entry.get("accepted", ())}
    return codes | {entry.get("trained_under")} - {None}


def refusal(name, code=None, *, folder=SHIPPED):
    """Why the shipped estimator ``name`` is not served by this code, or None.

    Parameters
    ----------
    name : str
        Its file name in ``folder`` (:func:`shipped_name`).
    code : str, optional
        The code digest (default :func:`estimator_code`).
    folder : path-like

    Returns
    -------
    str or None
        None when the manifest accepts ``code`` for it; else a message
        naming the file, the digests, the files that changed since the last
        re-key and the command to run.
    """
    code = estimator_code() if code is None else code
    folder = pathlib.Path(folder)
    try:
        manifest = read_manifest(folder)
    except ValueError as err:
        return str(err)
    entry = manifest["estimators"].get(name)
    if entry is None:
        return (
            f"the shipped posterior estimator {folder / name} is not in its "
            f"manifest {folder / MANIFEST_NAME}, so nothing says which code "
            "trained it; ship it with `python -m dipy_spinverse.posterior ship "
            "PATH --about ...`."
        )
    if code in _accepted(entry):
        return None
    under = entry.get("trained_under")
    under = f"under code {under}" if under else "before code digests were kept"
    return (
        f"the shipped posterior estimator {folder / name} was trained {under}, "
        f"and its manifest ({folder / MANIFEST_NAME}) does not accept the "
        f"current code ({code}; changed since the last re-key: "
        f"{_changed(manifest['sources'])}). Retrain it (doc/validation/"
        "posterior.md, then `python -m dipy_spinverse.posterior ship`) or, if "
        "the change leaves its simulations and training as they were, re-key "
        f"it on purpose: {REKEY_COMMAND}."
    )


def _changed(recorded):
    """The hashed files that differ from ``recorded`` ({path: digest}), in
    words."""
    now = _estimator_sources()
    changed = sorted(p for p in now.keys() & recorded.keys() if now[p] != recorded[p])
    changed += [f"{p} (new)" for p in sorted(now.keys() - recorded.keys())]
    changed += [f"{p} (gone)" for p in sorted(recorded.keys() - now.keys())]
    if not recorded:
        return "not recorded"
    return ", ".join(changed) or "none of its files"


def _write(folder, manifest):
    path = pathlib.Path(folder) / MANIFEST_NAME
    with atomic_write(path) as tmp:
        text = json.dumps(manifest, indent=2, sort_keys=True)
        pathlib.Path(tmp).write_text(text + "\n")
    return path


def rekey(reason, *, names=None, code=None, folder=SHIPPED):
    """Accept the current code for shipped estimators, on purpose.

    Appends ``code`` with ``reason`` and today's date to each estimator's
    accepted list in the manifest (those that do not accept it yet), and
    records the hashed files' digests (so that a later refusal says which
    changed).

    Parameters
    ----------
    reason : str
        One line: what changed in the code and why the estimators' simulations
        and training did not (the test that shows it).
    names : iterable of str, optional
        Files to re-key (default every one in the manifest).
    code : str, optional
        Default :func:`estimator_code`.
    folder : path-like

    Returns
    -------
    list of str
        The files re-keyed (those that already accepted ``code`` are left).

    Raises
    ------
    ShippedError
        When ``reason`` is empty or several lines, ``folder`` has no manifest
        or a damaged one, or a name is not shipped.
    """
    reason = str(reason).strip()
    if not reason or "\n" in reason:
        raise ShippedError(
            "a re-key needs a one-line reason: what changed and why the "
            "shipped estimators' simulations and training did not."
        )
    reason = " ".join(reason.split())
    code = estimator_code() if code is None else code
    path = pathlib.Path(folder) / MANIFEST_NAME
    if not path.exists():
        # A re-key accepts code for estimators already shipped: it never
        # starts a manifest.
        raise ShippedError(
            f"{path} does not exist: nothing is shipped in {folder} to re-key; "
            "give the shipped estimators' folder (--folder, default "
            f"{SHIPPED}) or ship an estimator there first."
        )
    manifest = read_manifest(folder)
    estimators = manifest["estimators"]
    names = sorted(estimators) if names is None else list(names)
    unknown = [n for n in names if n not in estimators]
    if unknown:
        raise ShippedError(
            f"{unknown} are not in the manifest of {folder}; shipped: "
            f"{sorted(estimators)}."
        )
    done = []
    for name in names:
        if code in _accepted(estimators[name]):
            continue
        estimators[name].setdefault("accepted", []).append(
            {"code": code, "reason": reason, "date": str(datetime.date.today())}
        )
        done.append(name)
    manifest["sources"] = _estimator_sources()
    _write(folder, manifest)
    return done


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
    manifest["estimators"][target.name] = {
        "about": about,
        "trained_under": match["code"],
        "accepted": [],
    }
    if match["code"] == estimator_code():
        manifest["sources"] = _estimator_sources()
    _write(folder, manifest)
    return target


def _check_estimator(copy, given, *, settings, code):
    """Load ``copy`` (of the file ``given``) as the estimator of ``settings``
    trained under ``code``; else :class:`ShippedError` naming ``given``."""
    import torch

    from .protocol_free import shipped_key

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
            f"{_brief(err, 160)}); {_SHIP_FIX}."
        ) from err
    if settings == shipped_key():
        _check_protocol_free(saved, given)
    else:
        _check_per_protocol(copy, saved, given, settings=settings, code=code)


def _check_protocol_free(saved, given):
    """``saved`` loads into the protocol-free estimator (its tensors alone),
    else :class:`ShippedError` naming ``given``."""
    from .protocol_free import ProtocolFreeEstimator

    try:
        ProtocolFreeEstimator().load_state_dict(saved)
    except Exception as err:  # noqa: BLE001 - any mismatch refuses the file
        raise ShippedError(
            f"{given} is named as the protocol-free estimator, but its tensors "
            f"do not load into one ({type(err).__name__}: {_brief(err, 160)}); "
            f"{_SHIP_FIX}."
        ) from err


def _check_per_protocol(copy, saved, given, *, settings, code):
    """``saved`` is a per-protocol estimator cached for ``settings`` and
    ``code`` (its ``key`` and ``code``) and its tensors load into one (of
    the widths they have), else :class:`ShippedError` naming ``given``."""
    from .cache import _load

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
        _load(copy, state["x_mean"].numel() - 1, widths, code=code)
    except Exception as err:  # noqa: BLE001 - any mismatch refuses the file
        why = (
            f"it has no tensor {err}"
            if isinstance(err, KeyError)
            else f"{type(err).__name__}: {_brief(err, 160)}"
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
        parser.exit(2, f"{parser.prog}: error: {_brief(err)}\n")


def _command(args):
    """Run the parsed command line ``args`` (:func:`main`); its exit status."""
    folder = _folder(args.folder)
    code = estimator_code()
    if args.command == "sources":
        for relative, digest in _estimator_sources().items():
            print(f"{digest}  {relative}")
        return 0
    if args.command == "rekey":
        done = rekey(args.reason, names=args.names or None, folder=folder)
        print(f"code {code} accepted for: {', '.join(done) or 'none (already)'}")
        return 0
    if args.command == "ship":
        print(f"shipped {ship(args.path, about=args.about, folder=folder)}")
    return _check(folder, args.folder, code)


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


def _check(folder, given, code):
    """Print whether ``code`` is accepted for each estimator in the manifest
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
    print(f"code digest {code}")
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
        why = refusal(name, code, folder=folder)
        print(f"{name}: {'accepted' if why is None else 'NOT ACCEPTED'}")
        if why is not None:
            print(f"  {why}")
            status = 1
    return status
