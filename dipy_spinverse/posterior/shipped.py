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
"""

import argparse
import datetime
import json
import pathlib
import re
import shutil

from ..files import atomic_write
from ..provenance import code_digest, source_digests

__all__ = [
    "SHIPPED",
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
    ValueError
        Naming the file when it is not a manifest.
    """
    path = pathlib.Path(folder) / MANIFEST_NAME
    if not path.exists():
        return {"estimators": {}, "sources": {}}
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("estimators"), dict):
            raise ValueError("no 'estimators' table")
    except ValueError as err:
        raise ValueError(
            f"the shipped estimators' manifest {path} cannot be read ({err}); "
            "restore it from the package's repository."
        ) from err
    manifest.setdefault("sources", {})
    return manifest


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
    ValueError
        When ``reason`` is empty or several lines, or a name is not shipped.
    """
    reason = str(reason).strip()
    if not reason or "\n" in reason:
        raise ValueError(
            "a re-key needs a one-line reason: what changed and why the "
            "shipped estimators' simulations and training did not."
        )
    reason = " ".join(reason.split())
    code = estimator_code() if code is None else code
    manifest = read_manifest(folder)
    estimators = manifest["estimators"]
    names = sorted(estimators) if names is None else list(names)
    unknown = [n for n in names if n not in estimators]
    if unknown:
        raise ValueError(
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

    Parameters
    ----------
    path : path-like
        ``posterior-<settings>-<code>.pt``, as
        :func:`~dipy_spinverse.posterior.load_or_train` caches it.
    about : str
        What it is, in words (its prior, options and protocol).
    folder : path-like

    Returns
    -------
    pathlib.Path
        The shipped file.
    """
    path = pathlib.Path(path)
    match = _CACHED.fullmatch(path.name)
    if match is None:
        raise ValueError(
            f"{path} is not a cached posterior estimator "
            "(posterior-<settings>-<code>.pt); train it with the command in "
            "doc/validation/posterior.md and pass the file it writes."
        )
    target = pathlib.Path(folder) / shipped_name(match["settings"])
    with atomic_write(target) as tmp:
        shutil.copyfile(path, tmp)
    manifest = read_manifest(folder)
    manifest["estimators"][target.name] = {
        "about": " ".join(str(about).split()),
        "trained_under": match["code"],
        "accepted": [],
    }
    if match["code"] == estimator_code():
        manifest["sources"] = _estimator_sources()
    _write(folder, manifest)
    return target


def main(argv=None):
    """``python -m dipy_spinverse.posterior [check | sources | rekey
    --reason TEXT [NAME ...] | ship PATH --about TEXT]``; see the module's
    documentation. Returns the exit status (1: a shipped estimator is not
    accepted by this code)."""
    parser = argparse.ArgumentParser(
        prog="python -m dipy_spinverse.posterior",
        description="The shipped posterior estimators and the code they accept.",
    )
    parser.add_argument(
        "--folder",
        default=SHIPPED,
        type=pathlib.Path,
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
    code = estimator_code()
    if args.command == "sources":
        for relative, digest in _estimator_sources().items():
            print(f"{digest}  {relative}")
        return 0
    if args.command == "rekey":
        try:
            done = rekey(args.reason, names=args.names or None, folder=args.folder)
        except ValueError as err:
            parser.error(str(err))
        print(f"code {code} accepted for: {', '.join(done) or 'none (already)'}")
        return 0
    if args.command == "ship":
        print(f"shipped {ship(args.path, about=args.about, folder=args.folder)}")
    print(f"code digest {code}")
    status = 0
    for name in sorted(read_manifest(args.folder)["estimators"]):
        why = refusal(name, code, folder=args.folder)
        print(f"{name}: {'accepted' if why is None else 'NOT ACCEPTED'}")
        if why is not None:
            print(f"  {why}")
            status = 1
    return status
