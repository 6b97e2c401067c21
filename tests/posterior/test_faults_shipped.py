"""Faults of ``python -m dipy_spinverse.posterior`` (issue 84, cases 1, 7, 8
and 16, and their neighbours): ``ship`` installs only an estimator of the
key and code its name gives, whole, or nothing; a damaged manifest, a file
that is not an estimator and a folder that does not exist are refused in one
line on stderr with exit status 2, as argparse refuses its arguments.

Every test works on a copy of the shipped folder (``tmp_path``); the
package's own is never written.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from dipy_spinverse.posterior import protocol_free, shipped, shipping

PROG = "python -m dipy_spinverse.posterior"
# A per-protocol shipped estimator (the README demo's posterior fit) and
# the protocol-free one.
DEMO = "posterior-d665cab0cb1ae9cf0d0f.pt"
DEMO_SETTINGS = "d665cab0cb1ae9cf0d0f"


@pytest.fixture
def folder(tmp_path):
    """A copy of the package's shipped estimators."""
    copy = tmp_path / "trained"
    shutil.copytree(shipped.SHIPPED, copy)
    return copy


def _digests(folder):
    """Every file of ``folder`` by name: its SHA-256 digest."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
    }


def _run(capsys, *argv):
    """``main(argv)``: (exit status, stdout, stderr)."""
    try:
        status = shipping.main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def _refused(capsys, *argv):
    """The one line a refusal prints on stderr (status 2, nothing else)."""
    status, out, err = _run(capsys, *argv)
    assert status == 2, (status, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{PROG}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _cache_file(tmp_path, settings, code, payload):
    """``payload`` saved as a cache file named for ``settings`` and ``code``."""
    path = tmp_path / "cache" / f"posterior-{settings}-{code}.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save(payload, path)
    return path


def _demo_state():
    saved = torch.load(shipped.SHIPPED / DEMO, map_location="cpu", weights_only=True)
    return saved["state"]


def _demo_cache_file(tmp_path, **changes):
    """The demo's estimator saved as ``load_or_train`` caches one (its
    ``state``, ``key`` and ``code``, named for this code), with ``changes``
    to that payload."""
    code = shipped.estimator_code()
    payload = {"state": _demo_state(), "key": f"{DEMO_SETTINGS}-{code}", "code": code}
    return _cache_file(tmp_path, DEMO_SETTINGS, code, {**payload, **changes})


# -- case 1: ship installs only an estimator, whole ---------------------------------
def _random_bytes(tmp_path):
    path = tmp_path / f"posterior-{DEMO_SETTINGS}-{shipped.estimator_code()}.pt"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    return path


def _zero_bytes(tmp_path):
    path = tmp_path / f"posterior-{DEMO_SETTINGS}-{shipped.estimator_code()}.pt"
    path.write_bytes(b"")
    return path


def _not_an_estimator(tmp_path):
    # A valid torch file, but of a tensor table, not an estimator's.
    code = shipped.estimator_code()
    return _cache_file(tmp_path, DEMO_SETTINGS, code, {"weights": torch.ones(3)})


def _other_code_inside(tmp_path):
    # Renamed by hand: the name says this code, the file says another.
    return _demo_cache_file(tmp_path, code="0" * 16)


def _other_key_inside(tmp_path):
    code = shipped.estimator_code()
    return _demo_cache_file(tmp_path, key=f"{'1' * 20}-{code}")


def _damaged_state(tmp_path):
    state = dict(_demo_state())
    del state["embed.2.weight"]
    return _demo_cache_file(tmp_path, state=state)


def _protocol_free_state_as_demo(tmp_path):
    # The protocol-free estimator's tensors under a per-protocol key.
    state = torch.load(
        shipped.SHIPPED / shipped.shipped_name(protocol_free.shipped_key()),
        weights_only=True,
    )
    return _demo_cache_file(tmp_path, state=state)


def _demo_as_protocol_free(tmp_path):
    # A per-protocol estimator under the protocol-free key.
    code = shipped.estimator_code()
    return _cache_file(tmp_path, protocol_free.shipped_key(), code, _demo_state())


def _cut_short(tmp_path):
    # A real cache file, half copied.
    path = _demo_cache_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _damaged_inside(tmp_path):
    # A whole zip archive whose tensor data are not torch's.
    path = _demo_cache_file(tmp_path)
    with zipfile.ZipFile(path) as archive:
        members = [(i, archive.read(i)) for i in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in members:
            archive.writestr(info, data[: len(data) // 3])
    return path


BAD_FILES = {
    "random bytes": (_random_bytes, "is not a whole torch file"),
    "cut short": (_cut_short, "is not a whole torch file"),
    "damaged inside": (_damaged_inside, "cannot be read as a torch file"),
    "zero bytes": (_zero_bytes, "is empty"),
    "not an estimator": (_not_an_estimator, "not a posterior estimator"),
    "other code inside": (_other_code_inside, "trained under code 0000"),
    "other key inside": (_other_key_inside, "holds the estimator of key 1111"),
    "damaged tensors": (_damaged_state, "not a posterior estimator"),
    "protocol-free tensors": (_protocol_free_state_as_demo, "not a posterior est"),
    "per-protocol as protocol-free": (_demo_as_protocol_free, "protocol-free"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_ship_refuses_a_file_that_is_not_the_estimator_its_name_gives(
    case, folder, tmp_path, capsys
):
    """Case 1: 1,000 random bytes were installed over the demo's 5 MB
    estimator and ``check`` said "accepted". Now the file is loaded first;
    one that is not an estimator of its name's key and code is refused,
    named, and the shipped folder stays byte for byte as it was."""
    make, why = BAD_FILES[case]
    path = make(tmp_path)
    before = _digests(folder)
    line = _refused(capsys, "--folder", folder, "ship", path, "--about", "why")
    assert str(path) in line and why in line
    assert _digests(folder) == before


def test_ship_installs_a_cached_estimator_whole(folder, tmp_path, capsys):
    """A real cache file is installed byte for byte, recorded under the code
    its name gives; no temporary file is left beside it."""
    path = _demo_cache_file(tmp_path)
    status, out, err = _run(
        capsys, "--folder", folder, "ship", path, "--about", "the demo, again"
    )
    # Status 1 when an edit of the hashed code awaits its re-key (the other
    # estimators); the one shipped is of this code.
    assert status in (0, 1) and not err, err
    assert f"shipped {folder / DEMO}" in out
    assert f"{DEMO}: accepted" in out
    assert (folder / DEMO).read_bytes() == path.read_bytes()
    entry = shipped.read_manifest(folder)["estimators"][DEMO]
    assert entry["trained_under"] == shipped.estimator_code()
    assert entry["about"] == "the demo, again"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in shipped.SHIPPED.iterdir()
    )


def test_ship_installs_the_protocol_free_estimator(folder, tmp_path, capsys):
    """The protocol-free estimator is saved as its bare tensors (``python -m
    dipy_spinverse.posterior.protocol_free train``): loaded as one, shipped."""
    name = shipped.shipped_name(protocol_free.shipped_key())
    state = torch.load(shipped.SHIPPED / name, weights_only=True)
    code = shipped.estimator_code("protocol_free")
    path = _cache_file(tmp_path, protocol_free.shipped_key(), code, state)
    status, out, err = _run(capsys, "--folder", folder, "ship", path, "--about", "pf")
    assert status in (0, 1) and not err, err
    assert f"{name}: accepted" in out
    assert (folder / name).read_bytes() == path.read_bytes()
    # Recorded as the protocol-free kind: its own code serves it.
    assert shipped.read_manifest(folder)["estimators"][name]["kind"] == "protocol_free"


@pytest.mark.parametrize(
    "name, why",
    [
        ("some_fit.npz", "posterior-<settings>-<code>.pt"),
        ("posterior-d665cab0cb1ae9cf0d0f.pt", "posterior-<settings>-<code>.pt"),
        ("posterior-XYZ-abc.pt", "posterior-<settings>-<code>.pt"),
    ],
)
def test_ship_refuses_a_name_that_is_not_a_cache_file(
    name, why, folder, tmp_path, capsys
):
    """Case 8: ``ship some_fit.npz`` ended in a traceback (status 1)."""
    path = tmp_path / name
    path.write_bytes(b"x")
    before = _digests(folder)
    line = _refused(capsys, "--folder", folder, "ship", path, "--about", "x")
    assert str(path) in line and why in line
    assert _digests(folder) == before


def test_ship_refuses_a_missing_file_and_an_empty_about(folder, tmp_path, capsys):
    before = _digests(folder)
    missing = tmp_path / f"posterior-{DEMO_SETTINGS}-{shipped.estimator_code()}.pt"
    line = _refused(capsys, "--folder", folder, "ship", missing, "--about", "x")
    assert str(missing) in line and "does not exist" in line
    path = _demo_cache_file(tmp_path)
    line = _refused(capsys, "--folder", folder, "ship", path, "--about", "  ")
    assert "--about" in line
    assert _digests(folder) == before


# -- case 7: a damaged manifest ------------------------------------------------------
def _truncated(text):
    return text[: len(text) // 2]


MANIFESTS = {
    "truncated": _truncated,
    "empty": lambda text: "",
    "a list": lambda text: "[]",
    "a number": lambda text: "3",
    "no estimators": lambda text: '{"sources": {}}',
    "estimators a list": lambda text: '{"estimators": []}',
    "an entry not a table": lambda text: json.dumps({"estimators": {DEMO: 3}}),
    "accepted without code": lambda text: json.dumps(
        {"estimators": {DEMO: {"trained_under": None, "accepted": [{"x": 1}]}}}
    ),
    "sources a list": lambda text: json.dumps({"estimators": {}, "sources": []}),
    "not UTF-8": lambda text: b"\xff\xfe{".decode("latin-1"),
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
@pytest.mark.parametrize(
    "command",
    [(), ("check",), ("rekey", "--reason", "why"), ("ship", "CACHE", "--about", "x")],
    ids=["default", "check", "rekey", "ship"],
)
def test_a_damaged_manifest_is_refused_in_one_line(
    case, command, folder, tmp_path, capsys
):
    """Case 7: a truncated manifest.json made ``check`` end in a traceback.
    Every command now refuses it in one line naming it and the fix, and
    changes nothing."""
    manifest = folder / shipped.MANIFEST_NAME
    text = MANIFESTS[case](manifest.read_text())
    manifest.write_bytes(text.encode("latin-1"))
    before = _digests(folder)
    cache = str(_demo_cache_file(tmp_path))
    argv = [cache if a == "CACHE" else a for a in command]
    line = _refused(capsys, "--folder", folder, *argv)
    assert str(manifest) in line and "restore it from" in line
    assert _digests(folder) == before


def test_the_command_line_refuses_a_truncated_manifest(folder):
    """The same through ``python -m`` (its exit status and stderr)."""
    manifest = folder / shipped.MANIFEST_NAME
    manifest.write_text(_truncated(manifest.read_text()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "dipy_spinverse.posterior", "--folder", folder]
    done = subprocess.run(
        [str(a) for a in argv] + ["check"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"{PROG}: error: the shipped estimators' manifest")
    assert str(manifest) in line and "restore it from" in line


# -- case 8: one error path ---------------------------------------------------------
def test_rekey_refusals_take_the_one_error_path(folder, capsys):
    """Case 8: rekey's refusals went through ``parser.error`` (status 2, with
    the usage), ship's through a traceback (status 1). Both now print one
    line and exit 2, and status 1 keeps its one meaning (an estimator the
    code does not accept)."""
    before = _digests(folder)
    line = _refused(capsys, "--folder", folder, "rekey", "--reason", "  ")
    assert "one-line reason" in line
    line = _refused(
        capsys, "--folder", folder, "rekey", "--reason", "why", "posterior-x.pt"
    )
    assert "posterior-x.pt" in line and "not in the manifest" in line
    assert _digests(folder) == before


def test_rekey_refuses_a_folder_without_a_manifest(tmp_path, capsys):
    """It used to write a manifest of nothing into any folder."""
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _refused(capsys, "--folder", empty, "rekey", "--reason", "why")
    assert str(empty / shipped.MANIFEST_NAME) in line
    assert not any(empty.iterdir())


def test_the_help_documents_the_exit_statuses(capsys):
    status, out, _ = _run(capsys, "--help")
    assert status == 0
    assert "exit status" in out.lower() and "2" in out
    assert "exit status" in shipping.__doc__.lower()


# -- case 16: the folder ------------------------------------------------------------
@pytest.mark.parametrize(
    "command",
    [(), ("check",), ("rekey", "--reason", "why"), ("ship", "CACHE", "--about", "x")],
    ids=["default", "check", "rekey", "ship"],
)
def test_a_folder_that_does_not_exist_is_refused(command, tmp_path, capsys):
    """Case 16: ``--folder /no/such/dir`` printed the code digest, status 0."""
    cache = str(_demo_cache_file(tmp_path))
    argv = [cache if a == "CACHE" else a for a in command]
    missing = tmp_path / "no" / "such" / "dir"
    line = _refused(capsys, "--folder", missing, *argv)
    assert f"--folder {missing}" in line and "does not exist" in line
    assert not (tmp_path / "no").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    line = _refused(capsys, "--folder", a_file, *argv)
    assert f"--folder {a_file}" in line and "not a folder" in line


def test_the_command_line_refuses_a_missing_folder(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    missing = tmp_path / "no_such_dir"
    done = subprocess.run(
        [sys.executable, "-m", "dipy_spinverse.posterior", "--folder", str(missing)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"{PROG}: error: --folder {missing} does not exist; ")


def test_check_names_files_the_manifest_does_not_list_or_lacks(folder, capsys):
    """``check`` read only the manifest: a shipped file missing from it, or
    an entry whose file is gone, passed unnoticed."""
    shutil.copyfile(folder / DEMO, folder / "posterior-0123456789abcdef0123.pt")
    (folder / "posterior-26ae19c213289660a953.pt").unlink()
    status, out, _ = _run(capsys, "--folder", folder, "check")
    assert status == 1
    assert "posterior-0123456789abcdef0123.pt: NOT ACCEPTED" in out
    assert "not in its manifest" in out
    assert "posterior-26ae19c213289660a953.pt: MISSING" in out


def test_check_refuses_a_folder_with_nothing_shipped(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _refused(capsys, "--folder", empty, "check")
    assert str(empty) in line and "no shipped estimators" in line
