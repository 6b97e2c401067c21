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
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import SMALL_DEMO
from numpy.testing import assert_array_equal

import dipy_spinverse.reconst.runner as runner
from dipy_spinverse.data import make_phantom_dataset
from dipy_spinverse.files import LOCK_NAME, output_lock
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
    assert "restricted_fraction.nii.gz" in line
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


@pytest.mark.parametrize("when", ["before", "during"])
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
