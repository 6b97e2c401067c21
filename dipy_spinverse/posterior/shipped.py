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

- the estimators' simulations and training are unchanged (an optional
  argument whose default keeps every signal, a refactor; say which test
  shows it; docstrings and comments are not hashed): re-key them on
  purpose::

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

This module holds what reading a shipped estimator needs (the manifest, the
code digest, :func:`refusal`) and :func:`rekey`, low in the posterior so
that :mod:`.cache` and :mod:`.protocol_free` import it. The commands, and
``ship`` (which loads the estimator it installs, and so imports them), are
in :mod:`.shipping`, with their exit statuses.
"""

import datetime
import json
import pathlib

from ..files import atomic_write
from ..provenance import code_digest, source_digests

__all__ = [
    "ShippedError",
    "SHIPPED",
    "MANIFEST_NAME",
    "ESTIMATOR_ROOTS",
    "DEFAULT_KIND",
    "TRAINING_ROOTS",
    "estimator_kind",
    "NOT_FOLLOWED",
    "REKEY_COMMAND",
    "estimator_code",
    "estimator_sources",
    "one_line",
    "read_manifest",
    "refusal",
    "rekey",
    "shipped_name",
    "write_manifest",
]

#: The folder of the shipped estimators: the README demo's (its posterior
#: fit's, its search's surface check's, and the default prior's, on the
#: demo's protocol), made by the commands in doc/validation/posterior.md and
#: sections.md and retrained by slow tests.
SHIPPED = pathlib.Path(__file__).resolve().parent / "trained"

#: The manifest in :data:`SHIPPED`: for each shipped file, the code it was
#: trained under and the later code accepted for it.
MANIFEST_NAME = "manifest.json"

#: What makes each kind of estimator: its roots, and every module of the
#: package they import follows. A per-protocol posterior estimator
#: (:func:`~dipy_spinverse.posterior.load_or_train`) is made by the prior,
#: its simulator, the training and the cache (the flow, its calibration and
#: support test, the targets, ``sim/``, ``geometry/`` follow); the
#: protocol-free estimator by :mod:`.protocol_free` and what it imports. A
#: change to one kind's code moves no other kind's key. Not the package's
#: ``__init__``: it only re-exports them.
_PER_PROTOCOL = (
    "posterior.prior",
    "posterior.simulator",
    "posterior.training",
    "posterior.cache",
)
ESTIMATOR_ROOTS = {
    "per_protocol": _PER_PROTOCOL,
    # The white-matter priors' per-protocol estimators follow their own
    # prior's module too: a change there moves no estimator of the cells.
    "white_matter": (*_PER_PROTOCOL, "posterior.white_matter"),
    "mixture": (*_PER_PROTOCOL, "posterior.mixture_prior"),
    "protocol_free": ("posterior.protocol_free",),
}
#: The kind of a shipped estimator whose manifest entry names none.
DEFAULT_KIND = "per_protocol"
#: Every kind's roots together (the files any shipped estimator hashes).
TRAINING_ROOTS = tuple(dict.fromkeys(r for v in ESTIMATOR_ROOTS.values() for r in v))

#: Modules of the posterior that shape no estimator: this one, the
#: checkpoint of simulations (it stores them; it does not make them), and
#: the prior predictive check (it reads simulations; the priors import it
#: for their ``check``). The commands of :mod:`.shipping` need no entry:
#: nothing hashed imports them.
NOT_FOLLOWED = ("posterior.shipped", "posterior.checkpoint", "posterior.envelope")

#: The command that re-keys the shipped estimators for the current code.
REKEY_COMMAND = 'python -m dipy_spinverse.posterior rekey --reason "..."'


class ShippedError(ValueError):
    """A refusal of the shipped estimators' tools: a damaged manifest, a file
    that is not an estimator of its name, a folder that does not exist, a
    re-key without a reason. Its message names what was given and the fix;
    the command line (:mod:`.shipping`) prints it in one line and exits with
    status 2."""


def estimator_code(kind=DEFAULT_KIND):
    """The digest of the code that makes an estimator of ``kind``.

    Parameters
    ----------
    kind : {"per_protocol", "white_matter", "mixture", "protocol_free"}
        A prior's ``estimator_kind``, or the protocol-free estimator's.

    Returns
    -------
    str
        :func:`~dipy_spinverse.provenance.code_digest` of the kind's
        :data:`ESTIMATOR_ROOTS` without :data:`NOT_FOLLOWED`.
    """
    return code_digest(*_roots(kind), exclude=NOT_FOLLOWED)


def estimator_sources(kind=None):
    """The files an estimator's code digest hashes, each with its digest.

    Parameters
    ----------
    kind : str, optional
        One of :data:`ESTIMATOR_ROOTS`.
        Default: every kind's files together.

    Returns
    -------
    dict
        ``{path relative to the package: digest}``
        (:func:`~dipy_spinverse.provenance.source_digests`).
    """
    roots = TRAINING_ROOTS if kind is None else _roots(kind)
    return source_digests(*roots, exclude=NOT_FOLLOWED)


def _roots(kind):
    if kind not in ESTIMATOR_ROOTS:
        raise ValueError(
            f"kind must be one of {sorted(ESTIMATOR_ROOTS)}, got {kind!r}."
        )
    return ESTIMATOR_ROOTS[kind]


def estimator_kind(entry):
    """The kind of a manifest entry's estimator (:data:`DEFAULT_KIND` when it
    names none)."""
    return entry.get("kind", DEFAULT_KIND)


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
            f"({one_line(err, 160)}); restore it from the package's repository (or "
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
        if entry.get("kind", DEFAULT_KIND) not in ESTIMATOR_ROOTS:
            raise ValueError(
                f"its entry {name!r} has the kind {entry['kind']!r}, not one of "
                f"{sorted(ESTIMATOR_ROOTS)}"
            )
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


def one_line(err, limit=None):
    """An exception's message on one line, as a :class:`ShippedError` quotes
    it (a manifest's JSON error, torch's multi-line load_state_dict report).

    Parameters
    ----------
    err : BaseException
    limit : int, optional
        Characters kept (then ``...``); default the whole message.

    Returns
    -------
    str
        Its words joined by single spaces (its type's name when it has no
        message).
    """
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
        The code digest (default :func:`estimator_code` of its kind).
    folder : path-like

    Returns
    -------
    str or None
        None when the manifest accepts ``code`` for it; else a message
        naming the file, the digests, the files that changed since the last
        re-key and the command to run.
    """
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
    code = estimator_code(estimator_kind(entry)) if code is None else code
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
    now = estimator_sources()
    changed = sorted(p for p in now.keys() & recorded.keys() if now[p] != recorded[p])
    changed += [f"{p} (new)" for p in sorted(now.keys() - recorded.keys())]
    changed += [f"{p} (gone)" for p in sorted(recorded.keys() - now.keys())]
    if not recorded:
        return "not recorded"
    return ", ".join(changed) or "none of its files"


def write_manifest(folder, manifest):
    """Write ``manifest`` (:func:`read_manifest`'s layout) into ``folder``,
    atomically (the old manifest stays until the new one is whole).

    Parameters
    ----------
    folder : path-like
    manifest : dict

    Returns
    -------
    pathlib.Path
        The manifest file.
    """
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
        Default :func:`estimator_code` of each one's kind.
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
        own = estimator_code(estimator_kind(estimators[name])) if code is None else code
        if own in _accepted(estimators[name]):
            continue
        estimators[name].setdefault("accepted", []).append(
            {"code": own, "reason": reason, "date": str(datetime.date.today())}
        )
        done.append(name)
    manifest["sources"] = estimator_sources()
    write_manifest(folder, manifest)
    return done
