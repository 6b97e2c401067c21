"""Issue 84 (also noted): a run of ``dipy_fit_spinverse`` refused before its
fit leaves no output folder it made (a refused glob run left an empty
``--out_dir``); a folder that was there before stays, with what it held."""

import shutil
import sys

import pytest
from conftest import SMALL_DEMO

from dipy_spinverse.data import make_phantom_dataset
from dipy_spinverse.workflows.spinverse import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_phantom_dataset(tmp_path_factory.mktemp("demo"), **SMALL_DEMO)


def _argv(demo, out_dir, *extra, data=None, mask=None):
    """The command line of a quick fit (face fit only, 2 iterations)."""
    return [
        str(data or demo["data"]), demo["bvals"], demo["bvecs"],
        str(mask or demo["mask"]), "--timing_file", demo["timing"],
        "--grid_size", str(SMALL_DEMO["grid_size"]),
        "--grid_resolution", str(SMALL_DEMO["grid_resolution"]),
        "--preset", "paper", "--max_iter", "2", "--n_report", "0",
        "--batch_size", "2", "--out_dir", str(out_dir), *extra,
    ]  # fmt: skip


def _command(monkeypatch, capsys, argv):
    """Run ``dipy_fit_spinverse argv``: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["dipy_fit_spinverse", *argv])
    try:
        code = main()
    except SystemExit as stop:
        code = stop.code
    return code or 0, capsys.readouterr().err


def _subjects(demo, tmp_path):
    """Two subjects' data and masks, for one glob."""
    for subject in ("subjA", "subjB"):
        (tmp_path / subject).mkdir()
        shutil.copy(demo["data"], tmp_path / subject / "dwi.nii.gz")
        shutil.copy(demo["mask"], tmp_path / subject / "mask.nii.gz")
    return dict(
        data=tmp_path / "subj*" / "dwi.nii.gz",
        mask=tmp_path / "subj*" / "mask.nii.gz",
    )


@pytest.mark.parametrize("mix", [False, True])
def test_a_refused_glob_run_leaves_no_out_dir(demo, tmp_path, monkeypatch, capsys, mix):
    """Two subjects into one new --out_dir (two levels of new folders) are
    refused before the fit: neither level is left behind."""
    out = tmp_path / "new" / "out"
    argv = _argv(
        demo, out, *(["--mix_names"] if mix else []), **_subjects(demo, tmp_path)
    )
    code, err = _command(monkeypatch, capsys, argv)
    assert code == 2 and "would both be written" in err, err
    assert not (tmp_path / "new").exists()


def test_a_refusal_keeps_an_out_dir_that_was_there(demo, tmp_path, monkeypatch, capsys):
    """An --out_dir that existed before the run stays, empty or not."""
    inputs = _subjects(demo, tmp_path)
    empty, kept = tmp_path / "empty", tmp_path / "kept"
    empty.mkdir()
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    for out in (empty, kept):
        code, err = _command(monkeypatch, capsys, _argv(demo, out, **inputs))
        assert code == 2, err
    assert empty.is_dir() and not list(empty.iterdir())
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


def test_a_damaged_input_leaves_no_out_dir(demo, tmp_path, monkeypatch, capsys):
    """A refusal while reading the data (a truncated image), before the fit."""
    cut = tmp_path / "cut.nii.gz"
    whole = open(demo["data"], "rb").read()
    cut.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "o"
    code, err = _command(monkeypatch, capsys, _argv(demo, out, data=cut))
    assert code == 2 and str(cut) in err, err
    assert not out.exists()
