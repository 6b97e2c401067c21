"""Faults and misuse of ``dipy_fit_spinverse``: what a user sees.

One class of fault a section: interruption and resume, a write that fails
and the rerun, corrupt and truncated inputs, concurrent runs, outputs that
clash, and impossible data. Every case runs the command as a user does
(``main()`` with its arguments) and checks the exit status, that the
message is one line naming the file or flag, that no traceback is printed,
and that nothing fitted before the fault is lost.
"""

import errno
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import SMALL_DEMO
from numpy.testing import assert_array_equal

import dipy_spinverse.reconst.runner as runner
from dipy_spinverse.data import make_phantom_dataset
from dipy_spinverse.files import (
    JOURNAL_NAME,
    LOCK_NAME,
    STAGING_PREFIX,
    output_lock,
)
from dipy_spinverse.io.fits import load_fit
from dipy_spinverse.reconst import IMPOSSIBLE_SIGNAL, UNDERDETERMINED
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


def _one_error_line(err):
    """The command's error: one line, no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


#: The runner's own voxel fit, before any test patches it.
_FIT_VOXELS = runner.fit_voxels


def _counting_fits(monkeypatch):
    """Count the voxels the runner fits from now on."""
    real = _FIT_VOXELS
    fitted = []

    def counted(model, chunk, **kwargs):
        fitted.append(len(chunk))
        return real(model, chunk, **kwargs)

    monkeypatch.setattr(runner, "fit_voxels", counted)
    return fitted


def _interrupt_after(monkeypatch, n_chunks):
    """Ctrl-C after ``n_chunks`` chunks of voxels are fitted."""
    real = _FIT_VOXELS
    fitted = []

    def interrupted(model, chunk, **kwargs):
        if len(fitted) == n_chunks:
            raise KeyboardInterrupt
        fitted.append(len(chunk))
        return real(model, chunk, **kwargs)

    monkeypatch.setattr(runner, "fit_voxels", interrupted)


def _maps(folder):
    return {
        name: np.asanyarray(nib.load(folder / name).dataobj)
        for name in ("status.nii.gz", "restricted_fraction.nii.gz", "s0.nii.gz")
    }


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory):
    """The maps of one uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["dipy_fit_spinverse", *_argv(demo, out)])
        assert not main()
    return _maps(out)


# -- interruption and resume -------------------------------------------------


def test_an_interrupted_fit_continues_to_the_same_outputs(
    demo, reference, tmp_path, monkeypatch, capsys
):
    _interrupt_after(monkeypatch, 1)
    code, err = _command(monkeypatch, capsys, _argv(demo, tmp_path))
    assert code == 130 and "Traceback" not in err
    fitted = _counting_fits(monkeypatch)
    code, err = _command(monkeypatch, capsys, _argv(demo, tmp_path))
    assert code == 0, err
    assert sum(fitted) == 4  # the 2 voxels stored before are not fitted again
    for name, values in _maps(tmp_path).items():
        assert_array_equal(values, reference[name], err_msg=name)


def test_resume_with_another_mask_starts_anew_and_keeps_the_old_store(
    demo, tmp_path, monkeypatch, capsys, caplog
):
    """It ended in an IndexError from resume.fingerprint."""
    _interrupt_after(monkeypatch, 1)
    _command(monkeypatch, capsys, _argv(demo, tmp_path))
    mask = nib.load(demo["mask"])
    smaller = np.asanyarray(mask.dataobj).copy()
    smaller[0] = 0
    other = tmp_path / "other_mask.nii.gz"
    nib.save(nib.Nifti1Image(smaller, mask.affine), other)
    fitted = _counting_fits(monkeypatch)
    code, err = _command(monkeypatch, capsys, _argv(demo, tmp_path, mask=other))
    assert code == 0, err
    assert sum(fitted) == int(smaller.sum())
    assert "mask differs" in caplog.text and "is kept as" in caplog.text
    kept = [p for p in os.listdir(tmp_path) if p.startswith("spinverse_fit.partial.")]
    assert len(kept) == 1 and load_fit(tmp_path / kept[0]).n_pending == 4
    # --resume with another mask: one line, no traceback.
    _interrupt_after(monkeypatch, 1)
    _command(monkeypatch, capsys, _argv(demo, tmp_path, "--force"))
    code, err = _command(
        monkeypatch, capsys, _argv(demo, tmp_path, "--resume", mask=other)
    )
    assert code == 2
    assert "mask differs" in _one_error_line(err)


# -- a write that fails, and the rerun ---------------------------------------


def test_a_full_disk_while_checkpointing_keeps_the_voxels_before(
    demo, reference, tmp_path, monkeypatch, capsys
):
    import dipy_spinverse.io.checkpoint as store

    real = store._write_block

    def full_after_the_first_chunk(f, entry, first, values):
        if first >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, entry, first, values)

    monkeypatch.setattr(store, "_write_block", full_after_the_first_chunk)
    code, err = _command(monkeypatch, capsys, _argv(demo, tmp_path))
    assert code == 2
    line = _one_error_line(err)
    assert "spinverse_fit.partial.h5" in line and "the disk is full" in line
    checkpoint = load_fit(tmp_path / "spinverse_fit.partial.h5")
    assert checkpoint.n_pending == 4
    monkeypatch.setattr(store, "_write_block", real)
    fitted = _counting_fits(monkeypatch)
    code, err = _command(monkeypatch, capsys, _argv(demo, tmp_path))
    assert code == 0, err
    assert sum(fitted) == 4
    for name, values in _maps(tmp_path).items():
        assert_array_equal(values, reference[name], err_msg=name)


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        PermissionError(errno.EACCES, "Permission denied"),
    ],
)
def test_a_failed_output_write_is_one_line_and_the_rerun_fits_nothing(
    demo, reference, tmp_path, monkeypatch, capsys, failure
):
    """The maps come after the fit: a failure there names the map, leaves
    no temporary file, and the checkpoint gives the rerun every voxel."""
    real = os.replace

    def failing(src, dst, *args, **kwargs):
        if str(dst).endswith("restricted_fraction.nii.gz"):
            raise failure
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    code, err = _command(monkeypatch, capsys, _argv(demo, tmp_path))
    assert code == 2
    line = _one_error_line(err)
    # The output is named, not its path in the staging folder (removed).
    assert str(tmp_path / "restricted_fraction.nii.gz") in line
    assert STAGING_PREFIX not in line and STAGING_PREFIX not in str(
        os.listdir(tmp_path)
    )
    assert ("disk is full" if failure.errno == errno.ENOSPC else "permission") in line
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    assert load_fit(tmp_path / "spinverse_fit.partial.h5").n_pending == 0
    monkeypatch.setattr(os, "replace", real)
    fitted = _counting_fits(monkeypatch)
    code, err = _command(monkeypatch, capsys, _argv(demo, tmp_path))
    assert code == 0, err
    assert fitted == []
    for name, values in _maps(tmp_path).items():
        assert_array_equal(values, reference[name], err_msg=name)


def _small_tmpfs(path, size):
    """Mount a tmpfs of ``size`` at ``path`` (root only); False if it cannot."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
    )
    return done.returncode == 0


#: A run of the command in a process of its own, whose disk fills up after
#: the first chunk of voxels when ``FILL`` names a file to fill it with.
_FILLING_RUN = """
import os, sys
import dipy_spinverse.reconst.runner as runner
from dipy_spinverse.workflows.spinverse import main
real, seen = runner.fit_voxels, []
def fill_after_one_chunk(model, chunk, **kwargs):
    if seen and os.environ.get("FILL"):
        with open(os.environ["FILL"], "wb", buffering=0) as f:
            try:
                while True:
                    f.write(bytes(4096))
            except OSError:  # full
                pass
    seen.append(len(chunk))
    return real(model, chunk, **kwargs)
runner.fit_voxels = fill_after_one_chunk
sys.argv[0] = "dipy_fit_spinverse"
main()
"""


@pytest.mark.parametrize(
    "when", ["before", pytest.param("during", marks=pytest.mark.slow)]
)
def test_a_real_full_disk_ends_cleanly_and_the_rerun_finishes(
    demo, reference, tmp_path, when
):
    """On a real small file system (root only), the fault that ended in a
    segmentation fault: exit 2 and one line; with the disk freed, the rerun
    finishes with the maps of an uninterrupted run. Full before the run,
    the checkpoint cannot be made; full during it, the checkpoint (made
    whole at the start) takes every chunk and a map cannot be written."""
    disk = tmp_path / "disk"
    if not _small_tmpfs(disk, "2m"):
        pytest.skip("needs root to mount a small tmpfs")
    filler = disk / "filler"
    try:
        env = dict(os.environ)
        if when == "before":
            filler.write_bytes(bytes(shutil.disk_usage(disk).free - 60 * 1024))
        else:
            env["FILL"] = str(filler)
        run = [sys.executable, "-c", _FILLING_RUN, *_argv(demo, disk / "out")]
        done = subprocess.run(run, capture_output=True, text=True, env=env)
        assert done.returncode == 2, done.stderr[-2000:]
        line = _one_error_line(done.stderr)
        assert "the disk is full" in line and str(disk / "out") in line
        if when == "during":
            store = load_fit(disk / "out" / "spinverse_fit.partial.h5")
            assert store.n_pending == 0
        filler.unlink()
        env.pop("FILL", None)
        done = subprocess.run(run, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        for name, values in _maps(disk / "out").items():
            assert_array_equal(values, reference[name], err_msg=name)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# -- corrupt and truncated inputs --------------------------------------------


def test_flipped_bytes_inside_a_gzipped_image_are_refused(
    demo, tmp_path, monkeypatch, capsys
):
    """nibabel stops before the gzip trailer: flipped bytes were fitted."""
    raw = gzip.decompress(open(demo["data"], "rb").read())
    # The same length and a valid deflate stream: only the CRC can tell.
    stream = bytearray(gzip.compress(raw))
    damaged = gzip.compress(raw[:-200] + bytes(b ^ 0xFF for b in raw[-200:]))
    stream[-8:-4] = damaged[-8:-4]  # the CRC of other bytes
    bad = tmp_path / "dwi.nii.gz"
    bad.write_bytes(bytes(stream))
    code, err = _command(monkeypatch, capsys, _argv(demo, tmp_path / "o", data=bad))
    assert code == 2
    line = _one_error_line(err)
    assert str(bad) in line and "damaged" in line and "CRC" in line


def test_a_truncated_image_is_refused(demo, tmp_path, monkeypatch, capsys):
    for name in ("data", "mask"):
        cut = tmp_path / f"cut_{name}.nii.gz"
        whole = open(demo[name], "rb").read()
        cut.write_bytes(whole[: len(whole) // 2])
        argv = _argv(demo, tmp_path / "o", **{name: cut})
        code, err = _command(monkeypatch, capsys, argv)
        assert code == 2
        assert str(cut) in _one_error_line(err)


def test_a_missing_input_is_named_before_any_folder_is_made(
    demo, tmp_path, monkeypatch, capsys
):
    """A path that matches no file is named with its argument, and no
    output folder is left behind (probe case 10 of issue 73: it was called
    an --out_dir problem, with an empty folder made)."""
    out = tmp_path / "new"
    for name, flag in (("data", "input_files"), ("mask", "mask_files")):
        argv = _argv(demo, out, **{name: tmp_path / "absent.nii.gz"})
        code, err = _command(monkeypatch, capsys, argv)
        assert code == 2
        line = _one_error_line(err)
        assert flag in line and "absent.nii.gz" in line and "out_dir" not in line
        assert not out.exists()
    argv = _argv(demo, out, "--timing_file", str(tmp_path / "absent.txt"))
    code, err = _command(monkeypatch, capsys, argv)
    assert "--timing_file" in _one_error_line(err) and not out.exists()


@pytest.mark.parametrize("mix", [False, True])
def test_inputs_written_to_the_same_outputs_are_refused(
    demo, tmp_path, monkeypatch, capsys, mix
):
    """Two subjects' data by one glob into one --out_dir (with or without
    --mix_names) would share their output names: refused before any fit,
    naming both inputs and the path (probe case 1 of issue 73: the second
    overwrote the first, exit 0)."""
    for subject in ("subjA", "subjB"):
        (tmp_path / subject).mkdir()
        shutil.copy(demo["data"], tmp_path / subject / "dwi.nii.gz")
        shutil.copy(demo["mask"], tmp_path / subject / "mask.nii.gz")
    argv = _argv(
        demo,
        tmp_path / "out",
        *(["--mix_names"] if mix else []),
        data=tmp_path / "subj*" / "dwi.nii.gz",
        mask=tmp_path / "subj*" / "mask.nii.gz",
    )
    code, err = _command(monkeypatch, capsys, argv)
    assert code == 2
    line = _one_error_line(err)
    assert "subjA" in line and "subjB" in line and "would both be written" in line
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_ctrl_c_in_a_posterior_fit_names_what_is_kept(
    demo, tmp_path, monkeypatch, capsys
):
    """Ctrl-C during --fit_method posterior says that no maps were written
    and where a training's simulations are kept, not a literal
    <out_state>.partial.h5, a file the posterior never writes (probe case 8
    of issue 73)."""
    import dipy_spinverse.workflows.spinverse as workflow

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "fit_posterior", interrupted)
    monkeypatch.setenv("DIPY_SPINVERSE_CACHE", str(tmp_path / "cache"))
    argv = _argv(demo, tmp_path / "out", "--fit_method", "posterior", "--snr", "50")
    at = argv.index("--max_iter")  # the search's flag
    del argv[at : at + 2]
    code, err = _command(monkeypatch, capsys, argv)
    assert code == 130, err
    assert "no maps were written" in err and str(tmp_path / "cache") in err
    assert "<out_state>" not in err and ".partial.h5" not in err


# -- concurrent runs ---------------------------------------------------------


def test_a_second_run_into_a_folder_in_use_is_refused(
    demo, tmp_path, monkeypatch, capsys
):
    with output_lock(tmp_path, command="test"):
        code, err = _command(monkeypatch, capsys, _argv(demo, tmp_path))
    assert code == 2
    line = _one_error_line(err)
    assert "another dipy_spinverse run is writing to" in line
    assert not (tmp_path / "spinverse_fit.partial.h5").exists()
    # Released (as when the other run ends or is killed): this one runs.
    code, err = _command(monkeypatch, capsys, _argv(demo, tmp_path))
    assert code == 0, err
    assert (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_held_across_processes(demo, tmp_path):
    """Another process holding the folder (a second terminal) is seen."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from dipy_spinverse.files import output_lock\n"
         f"with output_lock({str(tmp_path)!r}, command='x'):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match="another dipy_spinverse run"):
            with output_lock(tmp_path, command="test"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(tmp_path, command="test"):  # released when it died
        pass


# -- outputs that clash or cannot be written ----------------------------------


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--out_s0", "status.nii.gz"], "--out_status and --out_s0 both write"),
        (["--out_state", "fit"], "--out_state and --out_state|is a folder"),
        (["--out_report", "sub"], "--out_report .* is a folder"),
    ],
)
def test_outputs_that_clash_are_refused_before_the_fit(
    demo, tmp_path, monkeypatch, capsys, extra, match
):
    (tmp_path / "sub").mkdir()
    (tmp_path / "fit.npz").mkdir()
    fitted = _counting_fits(monkeypatch)
    code, err = _command(monkeypatch, capsys, _argv(demo, tmp_path, *extra))
    assert code == 2
    assert pytest.importorskip("re").search(match, _one_error_line(err))
    assert fitted == []


def test_an_out_dir_below_a_file_is_named(demo, tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out"
    code, err = _command(monkeypatch, capsys, _argv(demo, out))
    assert code == 2
    line = _one_error_line(err)
    assert "--out_dir" in line and "not a folder" in line


def test_a_read_only_out_dir_is_refused_before_the_fit(
    demo, tmp_path, monkeypatch, capsys
):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only folders")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, err = _command(monkeypatch, capsys, _argv(demo, out))
    finally:
        out.chmod(0o700)
    assert code == 2
    assert "--out_dir" in _one_error_line(err)


# -- impossible data -----------------------------------------------------------


def test_impossible_data_is_flagged_without_a_noise_model(
    demo, tmp_path, monkeypatch, capsys, recwarn
):
    """With the paper preset (no noise model) these had status 0, exit 0."""
    image = nib.load(demo["data"])
    data = np.asanyarray(image.dataobj).astype(np.float64)
    bvals = np.loadtxt(demo["bvals"])
    doubled = data.copy()
    doubled[..., bvals > 0] = 2 * data[..., bvals == 0].mean(-1, keepdims=True)
    path = tmp_path / "doubled.nii.gz"
    nib.save(nib.Nifti1Image(doubled, image.affine, image.header), path)
    code, err = _command(monkeypatch, capsys, _argv(demo, tmp_path / "a", data=path))
    assert code == 0, err
    status = np.asanyarray(nib.load(tmp_path / "a" / "status.nii.gz").dataobj)
    assert_array_equal(status, IMPOSSIBLE_SIGNAL)
    assert any("attenuation above 1" in str(w.message) for w in recwarn)
    # Every direction the same: the protocol cannot determine the membranes.
    bvecs = np.loadtxt(demo["bvecs"])
    bvecs[:, bvals > 0] = [[1.0], [0.0], [0.0]]
    same = tmp_path / "same.bvec"
    np.savetxt(same, bvecs)
    argv = _argv(demo, tmp_path / "b")
    argv[2] = str(same)
    code, err = _command(monkeypatch, capsys, argv)
    assert code == 0, err
    status = np.asanyarray(nib.load(tmp_path / "b" / "status.nii.gz").dataobj)
    assert_array_equal(status, UNDERDETERMINED)
    assert any("lie along one axis" in str(w.message) for w in recwarn)


# -- noise options in the user's words ----------------------------------------


def test_an_snr_below_one_names_the_flag(demo, tmp_path, monkeypatch, capsys):
    code, err = _command(monkeypatch, capsys, _argv(demo, tmp_path, "--snr", "0.5"))
    assert code == 2
    line = _one_error_line(err)
    assert "--snr 0.5" in line and "sigma" not in line


def test_sigma_auto_on_a_few_voxels_warns(demo, caplog):
    """estimate_sigma gave SNR 23.5 on 9 voxels of data at 67-100."""
    from dipy.core.gradients import gradient_table
    from dipy.io.gradients import read_bvals_bvecs

    from dipy_spinverse.files import read_voxels
    from dipy_spinverse.workflows.dataset import noise_sigma

    image = nib.load(demo["data"])
    mask = np.asanyarray(nib.load(demo["mask"]).dataobj).astype(bool)
    bvals, bvecs = read_bvals_bvecs(demo["bvals"], demo["bvecs"])
    table = gradient_table(bvals, bvecs=bvecs)
    noise_sigma(("auto", None), image, read_voxels(image, mask), table)
    assert "--sigma auto estimated the noise from an image of 6 voxels" in caplog.text
    assert "Pass --snr" in caplog.text


# -- interrupted writes: the old set of outputs or the new set ----------------


def _digest(path):
    """What a file holds: a .npz's arrays and a gzip's bytes unpacked (both
    headers hold the time they were written)."""
    digest = hashlib.sha256()
    if path.endswith(".npz"):
        with np.load(path) as arrays:
            for name in sorted(arrays.files):
                digest.update(name.encode() + arrays[name].tobytes())
    else:
        data = open(path, "rb").read()
        digest.update(gzip.decompress(data) if path.endswith(".gz") else data)
    return digest.hexdigest()


def _outputs(folder):
    """{file: digest} of a folder's files but the lock and the checkpoint
    (the fit's progress, not an output; a staging folder is counted)."""
    found = {}
    for top, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(top, name)
            if name != LOCK_NAME and not name.endswith(".partial.h5"):
                found[os.path.relpath(path, folder)] = _digest(path)
    return found


class _Killed(BaseException):
    """The process died: nothing after it touches the disk."""


def _renames_in_staging(monkeypatch, at=None, how="raise"):
    """Count the renames into, in or out of a staging folder (each staged
    file, the journal, the swap); at the rename ``at``: Ctrl-C in its place
    (``"raise"``), a SIGINT before it (``"signal"``, a real Ctrl-C), or
    the process killed (``"kill"``: that and every later change to the
    disk fails). The renames seen (None at ``at``)."""
    calls, dead = [], []
    real = {name: getattr(os, name) for name in ("replace", "rename")}

    def rename(name):
        def renamed(src, dst, *args, **kwargs):
            if dead:
                raise _Killed
            if STAGING_PREFIX in os.fspath(src) + os.fspath(dst):
                if len(calls) == at:
                    calls.append(None)  # fired once
                    if how == "signal":
                        signal.raise_signal(signal.SIGINT)
                    elif how == "kill":
                        dead.append(True)
                        raise _Killed
                    else:
                        raise KeyboardInterrupt
                calls.append((os.fspath(src), os.fspath(dst)))
            return real[name](src, dst, *args, **kwargs)

        return renamed

    def killed(real_function):
        def removed(*args, **kwargs):
            if dead:
                raise _Killed
            return real_function(*args, **kwargs)

        return removed

    for name in real:
        monkeypatch.setattr(os, name, rename(name))
    for name in ("remove", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, killed(getattr(os, name)))
    return calls


def _sets(demo, tmp_path, monkeypatch, capsys, old_argv, new_argv):
    """The old set (run into ``old``), the new set (``new_argv`` run into a
    fresh folder) and the renames of writing the new over the old."""
    old = tmp_path / "old"
    code, err = _command(monkeypatch, capsys, old_argv(old))
    assert code == 0, err
    code, err = _command(monkeypatch, capsys, new_argv(tmp_path / "new"))
    assert code == 0, err
    work = tmp_path / "count"
    shutil.copytree(old, work)
    with pytest.MonkeyPatch.context() as patch:
        renames = _renames_in_staging(patch)
        code, err = _command(patch, capsys, new_argv(work))
    assert code == 0, err
    new = _outputs(tmp_path / "new")
    assert _outputs(work) == new and _outputs(old) != new
    commit = next(i for i, (_, dst) in enumerate(renames) if dst.endswith(JOURNAL_NAME))
    return old, new, renames, commit


def _interrupted_at(at, how, old, new_argv, folder, monkeypatch, capsys):
    """Run ``new_argv`` over a copy of ``old`` into ``folder``, interrupted
    at the rename ``at``: (exit status, stderr)."""
    shutil.copytree(old, folder)
    with pytest.MonkeyPatch.context() as patch:
        _renames_in_staging(patch, at=at, how=how)
        return _command(patch, capsys, new_argv(folder))


@pytest.fixture
def forced_rerun(demo, tmp_path, monkeypatch, capsys):
    """``forced_rerun(*old_flags)``: ``new_argv`` and the sets of
    :func:`_sets` (``old, new, renames, commit``) of a ``--force`` rerun
    with the default settings over a run with other settings
    (``--max_iter 3 --n_report 1`` and ``old_flags``: more files)."""

    def new_argv(out):
        return _argv(demo, out, "--force")

    def sets(*old_flags):
        def old_argv(out):
            return _argv(demo, out, "--max_iter", "3", "--n_report", "1", *old_flags)

        return new_argv, *_sets(demo, tmp_path, monkeypatch, capsys, old_argv, new_argv)

    return sets


@pytest.mark.parametrize(
    "how", ["raise", pytest.param("signal", marks=pytest.mark.slow)]
)
def test_ctrl_c_while_a_forced_rerun_writes_leaves_the_old_set_or_the_new(
    demo, tmp_path, monkeypatch, capsys, how, request, forced_rerun
):
    """Ctrl-C at every file of a --force rerun (maps, state, swap) leaves
    exactly the earlier run's outputs (other settings, more files: a report
    and voxel meshes) or exactly the new run's, and says which (probe case
    8 of issue 73: the folder mixed old and new maps). Before the journal
    the staging folder is removed; from it on, the swap is finished (a
    SIGINT waits for it)."""
    if how == "signal":
        # A shell that starts a job in the background makes it ignore SIGINT
        # (CI may run so): this test is about Python's Ctrl-C, so restore it.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    new_argv, old, new, renames, commit = forced_rerun("--voxel_meshes")
    before = _outputs(old)
    # The SIGINT at the journal's rename is held: the swap goes on.
    last_old = commit - 1 if how == "signal" else commit
    for at in range(len(renames)):
        folder = tmp_path / f"at{at}"
        code, err = _interrupted_at(at, how, old, new_argv, folder, monkeypatch, capsys)
        assert code == 130, (at, err)
        assert "Traceback" not in err
        kept = _outputs(folder)
        if at <= last_old:
            assert kept == before, at
            assert f"{folder} keeps the previous run's outputs" in err
            assert "the voxels fitted so far are kept in" in err
        else:
            assert kept == new, at
            assert f"{folder} holds this run's new outputs, complete" in err
            assert not (folder / "spinverse_fit.partial.h5").exists()


@pytest.mark.slow
def test_a_killed_rerun_is_finished_or_undone_by_the_next_run(
    demo, tmp_path, monkeypatch, capsys, caplog, forced_rerun
):
    """A run killed at any rename (no handler runs) leaves its staging
    folder; the next run, a plain rerun, removes it when its set was not
    complete (the folder keeps the old set), or finishes the swap, and says
    which in a warning naming the folder."""

    new_argv, old, new, renames, commit = forced_rerun()
    before = _outputs(old)
    for at in range(len(renames)):
        folder = tmp_path / f"at{at}"
        with pytest.raises(_Killed):
            _interrupted_at(at, "kill", old, new_argv, folder, monkeypatch, capsys)
        assert [p for p in os.listdir(folder) if p.startswith(STAGING_PREFIX)], at
        caplog.clear()
        code, err = _command(monkeypatch, capsys, _argv(demo, folder))
        assert code == 0, err
        assert not [p for p in os.listdir(folder) if p.startswith(".spinverse-")]
        if at <= commit:
            assert _outputs(folder) == before, at
            assert f"{folder} keeps the outputs it had before that run" in caplog.text
        else:
            assert _outputs(folder) == new, at
            assert f"interrupted run began in {folder}" in caplog.text


#: A run of the command that dies (os._exit, as a kill -9) at the rename
#: ``AT`` into, in or out of its staging folder.
_KILLED_RUN = """
import os, sys
from dipy_spinverse.files import STAGING_PREFIX
from dipy_spinverse.workflows.spinverse import main
real, seen = os.replace, []
def replace(src, dst, *args, **kwargs):
    if STAGING_PREFIX in os.fspath(src) + os.fspath(dst):
        if len(seen) == int(os.environ["AT"]):
            os._exit(137)
        seen.append(dst)
    return real(src, dst, *args, **kwargs)
os.replace = os.rename = replace
sys.argv[0] = "dipy_fit_spinverse"
main()
"""


def test_a_run_killed_in_its_swap_is_finished_by_the_next(
    demo, tmp_path, monkeypatch, capsys, caplog, forced_rerun
):
    """A real kill (a process of its own ends in the middle of the swap):
    the next run finishes the swap, with a warning naming the folder."""

    new_argv, old, new, renames, commit = forced_rerun()
    folder = tmp_path / "killed"
    shutil.copytree(old, folder)
    at = (commit + len(renames)) // 2  # old files in the trash, new ones not all in
    run = [sys.executable, "-c", _KILLED_RUN, *new_argv(folder)]
    done = subprocess.run(
        run, capture_output=True, text=True, env=dict(os.environ, AT=str(at))
    )
    assert done.returncode == 137, done.stderr[-2000:]
    mixed = _outputs(folder)
    assert mixed != new and mixed != _outputs(old)
    code, err = _command(monkeypatch, capsys, _argv(demo, folder))
    assert code == 0, err
    assert _outputs(folder) == new
    assert f"interrupted run began in {folder}" in caplog.text


def _failing_move(real, path, times):
    """``real`` (shutil.move) failing with EACCES the first ``times`` times
    a file is moved to ``path``."""
    failures = []

    def move(source, target, *args, **kwargs):
        if target == path and len(failures) < times:
            failures.append(target)
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return real(source, target, *args, **kwargs)

    return move


def test_a_rename_that_fails_in_the_swap_puts_the_old_set_back(
    demo, tmp_path, monkeypatch, capsys, caplog, forced_rerun
):
    """A failure while the new set is moved in (a permission on one map)
    puts the old set back, says so in one line naming the file, and keeps
    the checkpoint: the rerun writes the new set without fitting. A failure
    that stays (the old map cannot go back either) is named so, and the
    next run finishes the swap."""

    new_argv, old, new, _, _ = forced_rerun()
    real = shutil.move
    for times in (1, 2):
        folder = tmp_path / f"failed{times}"
        shutil.copytree(old, folder)
        failing = _failing_move(real, str(folder / "status.nii.gz"), times)
        monkeypatch.setattr(shutil, "move", failing)
        code, err = _command(monkeypatch, capsys, new_argv(folder))
        assert code == 2
        line = _one_error_line(err)
        assert str(folder / "status.nii.gz") in line and "permission denied" in line
        if times == 1:
            assert f"{folder} keeps the previous run's outputs" in line
            assert _outputs(folder) == _outputs(old)
        else:
            assert f"The next run into {folder} finishes the swap" in line
        monkeypatch.setattr(shutil, "move", real)
        fitted = _counting_fits(monkeypatch)
        # The same command, or (after a half swap) a plain rerun.
        rerun = new_argv(folder) if times == 1 else _argv(demo, folder)
        code, err = _command(monkeypatch, capsys, rerun)
        assert code == 0, err
        assert fitted == [] and _outputs(folder) == new
    assert f"interrupted run began in {folder}" in caplog.text


@pytest.fixture(scope="module")
def posterior_options(tmp_path_factory):
    """A tiny prior's options (trained in seconds into a module's cache)."""
    path = tmp_path_factory.mktemp("posterior") / "posterior.json"
    prior = dict(resolution=2, cell_diameter=[8, 25], n_cells=[1, 2])
    prior.update(families=["packed", "fibre"], min_spacings=1)
    training = dict(n_simulations=64, epochs=3, hidden=16, embedding=8)
    training.update(transforms=1, batch_size=16, n_calibration=16)
    path.write_text(json.dumps(dict(prior=prior, training=training, n_samples=50)))
    return path


def test_ctrl_c_while_a_posterior_replaces_a_search_leaves_one_set(
    demo, tmp_path, monkeypatch, capsys, posterior_options
):
    """A posterior --force into a label search's folder, interrupted at
    some of its files: the search's set whole, or the posterior's whole
    (none of the search's maps beside the posterior's, probe case 2)."""
    monkeypatch.setenv("DIPY_SPINVERSE_CACHE", str(tmp_path / "cache"))

    def old_argv(out):
        return _argv(demo, out)

    def new_argv(out):
        argv = _argv(demo, out, "--fit_method", "posterior", "--snr", "100")
        at = argv.index("--max_iter")  # the search's flag
        del argv[at : at + 2]
        return argv + ["--posterior_options", str(posterior_options), "--force"]

    old, new, renames, commit = _sets(
        demo, tmp_path, monkeypatch, capsys, old_argv, new_argv
    )
    assert "posterior/cell_diameter.nii.gz" in new and "s0.nii.gz" not in new
    before = _outputs(old)
    for at in sorted({0, commit - 1, commit, commit + 1, commit + 5, len(renames) - 1}):
        folder = tmp_path / f"at{at}"
        code, err = _interrupted_at(
            at, "raise", old, new_argv, folder, monkeypatch, capsys
        )
        assert code == 130, (at, err)
        if at <= commit:
            assert _outputs(folder) == before, at
            assert "no maps were written" in err
            assert f"{folder} keeps the previous run's outputs" in err
        else:
            assert _outputs(folder) == new, at
            assert f"{folder} holds this run's new outputs, complete" in err


def test_several_inputs_are_each_one_set(demo, tmp_path, monkeypatch, capsys):
    """Two inputs in one run, each into its own folder (beside it,
    --out_strat append): Ctrl-C in the second's writes leaves the first's
    new set whole and the second's old one."""
    inputs = _subjects(demo, tmp_path)

    def argv(*extra):
        extra = ("--out_strat", "append", *extra)
        return _argv(demo, "fit", *extra, **inputs)

    code, err = _command(monkeypatch, capsys, argv("--max_iter", "3"))
    assert code == 0, err
    folders = [tmp_path / subject / "fit" for subject in ("subjA", "subjB")]
    assert all((folder / "spinverse_fit.npz").is_file() for folder in folders)
    before = [_outputs(f) for f in folders]
    with pytest.MonkeyPatch.context() as patch:
        renames = _renames_in_staging(patch)
        code, err = _command(patch, capsys, argv("--force"))
    assert code == 0, err
    after = [_outputs(f) for f in folders]
    first = sum(1 for _, dst in renames if str(folders[0]) in dst)
    # Back to the old sets, then Ctrl-C at the second input's first file.
    code, err = _command(monkeypatch, capsys, argv("--max_iter", "3", "--force"))
    assert code == 0, err
    assert [_outputs(f) for f in folders] == before
    with pytest.MonkeyPatch.context() as patch:
        _renames_in_staging(patch, at=first)
        code, err = _command(patch, capsys, argv("--force"))
    assert code == 130, err
    assert [_outputs(f) for f in folders] == [after[0], before[1]] != before
    assert f"{folders[1]} keeps the previous run's outputs" in err


# -- a refused run leaves no output folder it made (issue 84, also noted) -----
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
