"""NIfTI images read and written voxel by voxel (dipy_spinverse.files)."""

import gzip
import pathlib
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from dipy_spinverse.files import load_image, read_voxels, save_image, save_voxels

AFFINE = np.diag([2.0, 2.5, 3.0, 1.0])


@pytest.mark.parametrize("extra", [(), (3,), (2, 3)])
def test_save_voxels_writes_the_image_save_image_would(tmp_path, extra):
    """Same values, shape, affine and space codes as the whole array written
    by save_image, with ``fill`` outside the mask; extra axes in NIfTI's
    (Fortran) order."""
    rng = np.random.default_rng(1)
    shape = (4, 5, 6)
    volume = rng.random(shape + extra).astype(np.float32)
    mask = rng.random(shape) > 0.6
    volume[~mask] = np.nan
    reference = nib.Nifti1Image(np.zeros(shape, np.float32), AFFINE)
    reference.set_qform(AFFINE, code=1)
    reference.set_sform(AFFINE, code=1)
    streamed = save_voxels(
        tmp_path / "a.nii.gz", volume[mask], mask, AFFINE, reference, fill=np.nan
    )
    whole = save_image(tmp_path / "b.nii.gz", volume, AFFINE, reference)
    a, b = nib.load(streamed), nib.load(whole)
    assert a.shape == shape + extra
    assert_array_equal(a.get_fdata(dtype=np.float32), volume)
    assert_array_equal(a.affine, b.affine)
    for key in ("qform_code", "sform_code", "xyzt_units", "datatype"):
        assert a.header[key] == b.header[key], key


def test_save_voxels_memory_grows_with_the_mask(tmp_path):
    """Two voxels of 64 values in a 100^3 volume: the 4-D volume (256 MB as
    float32) is never built; one 3-D volume (4 MB) is."""
    shape = (100, 100, 100)
    mask = np.zeros(shape, bool)
    mask[3, 4, 5] = mask[90, 10, 50] = True
    rows = np.ones((2, 64), np.float32)
    tracemalloc.start()
    save_voxels(tmp_path / "big.nii.gz", rows, mask)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 40e6, peak  # 4 MB volume + its bytes + gzip buffers
    back = nib.load(tmp_path / "big.nii.gz")
    assert back.shape == shape + (64,)
    assert_array_equal(np.asarray(back.dataobj[3, 4, 5]), 1.0)


def test_save_voxels_checks_the_rows_against_the_mask(tmp_path):
    mask = np.zeros((2, 2, 2), bool)
    mask[0, 0, 0] = True
    with pytest.raises(ValueError, match="mask selects 1"):
        save_voxels(tmp_path / "x.nii.gz", np.zeros((2, 3)), mask)


def test_read_voxels_reads_the_mask_of_a_scaled_image(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 1000, size=(5, 4, 3, 7)).astype(np.int16)
    mask = rng.random(data.shape[:3]) > 0.5
    image = nib.Nifti1Image(data, AFFINE)
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, tmp_path / "dwi.nii.gz")
    rows = read_voxels(tmp_path / "dwi.nii.gz", mask)
    assert_array_equal(rows, 0.5 * data[mask] + 10.0)
    plain = tmp_path / "plain.nii"
    nib.save(nib.Nifti1Image(data, AFFINE), plain)
    rows = read_voxels(plain, mask)
    assert rows.dtype == np.int16
    assert_array_equal(rows, data[mask])


def test_damaged_images_get_a_clean_error(tmp_path):
    data = np.random.default_rng(3).random((6, 6, 6, 8)).astype(np.float32)
    path = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    blob = path.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(blob[: len(blob) // 2])
    mask = np.ones((6, 6, 6), bool)
    with pytest.raises(ValueError, match="truncated.nii.gz is damaged or truncated"):
        read_voxels(truncated, mask, "input_files")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not an image" * 10))
    with pytest.raises(ValueError, match="garbage.nii.gz cannot be read as a NIfTI"):
        load_image(garbage, "mask file")
    with pytest.raises(ValueError, match="missing.nii.gz does not exist"):
        load_image(tmp_path / "missing.nii.gz", "input_files")
    with pytest.raises(ValueError, match="first three axes"):
        read_voxels(path, np.ones((6, 6, 5), bool))


def test_load_or_build_reads_rebuilds_and_refuses_unwritable(tmp_path):
    """The one cache path: built once and read after; a damaged or stale file
    is built again with a warning that names it (the reason only when the
    loader gives one); an unwritable folder is refused before any work."""
    from dipy_spinverse.files import StaleCacheError, load_or_build

    built = []

    def build():
        built.append(1)
        return {"value": len(built)}

    def load(path):
        text = path.read_text()
        if text == "stale":
            raise StaleCacheError("made for another protocol")
        return {"value": int(text)}

    kwargs = dict(
        load=load,
        build=build,
        save=lambda a, tmp: pathlib.Path(tmp).write_text(str(a["value"])),
    )
    path = tmp_path / "thing-key.txt"
    assert load_or_build(path, what="thing", **kwargs) == {"value": 1}
    assert load_or_build(path, what="thing", **kwargs) == {"value": 1}
    assert len(built) == 1 and path.read_text() == "1"
    path.write_text("garbage")
    with pytest.warns(
        UserWarning,
        match=r"thing .*thing-key.txt cannot be read "
        r"\(ValueError\); training it again",
    ):
        assert load_or_build(path, what="thing", **kwargs) == {"value": 2}
    path.write_text("stale")
    with pytest.warns(UserWarning, match="StaleCacheError: made for another"):
        load_or_build(path, what="thing", **kwargs)
    blocked = tmp_path / "a file"
    blocked.write_text("")
    with pytest.raises(ValueError, match="cannot write the thing"):
        load_or_build(blocked / "sub" / "x.txt", what="thing", **kwargs)
    assert len(built) == 3


# A process that asks for one artefact through load_or_build: its build
# notes itself in the counter file, then waits for the test's go-ahead (so
# that the second process surely asks while the first builds).
_BUILDER = """
import os, pathlib, sys, time
from dipy_spinverse.files import load_or_build

path, counter, go = map(pathlib.Path, sys.argv[1:])


def build():
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\\n")
    for _ in range(600):
        if go.exists():
            break
        time.sleep(0.1)
    return f"built by {os.getpid()}"


value = load_or_build(
    path,
    load=lambda p: p.read_text(),
    build=build,
    save=lambda value, tmp: pathlib.Path(tmp).write_text(value),
    what="test artefact",
)
print("RESULT", value, flush=True)
"""


def test_two_processes_building_one_key_build_it_once(tmp_path):
    """The second process waits for the first (saying so), then reads its
    artefact (saying so): one build, one artefact, the same result in both."""
    import subprocess
    import sys
    import time

    path, counter, go = tmp_path / "artefact.txt", tmp_path / "builds", tmp_path / "go"
    command = [sys.executable, "-c", _BUILDER, str(path), str(counter), str(go)]
    run = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, second = subprocess.Popen(command, **run), None
    try:
        deadline = time.monotonic() + 120
        while not counter.exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.Popen(command, **run)
        # Let the second process reach the lock before the first finishes.
        waiting = ""
        while "waiting for it" not in waiting:
            line = second.stdout.readline()
            assert line, f"the second process ended without waiting: {waiting}"
            waiting += line
        go.touch()
        out_first, _ = first.communicate(timeout=120)
        out_second, _ = second.communicate(timeout=120)
    finally:
        go.touch()
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
    assert first.returncode == 0 and second.returncode == 0, out_first + out_second
    builders = counter.read_text().split()
    assert builders == [str(first.pid)]
    result = f"RESULT built by {first.pid}"
    assert result in out_first and result in out_second
    assert "another process built" in out_second
    assert path.read_text() == f"built by {first.pid}"


# -- the outputs' refusals: Python's words, a command's flags (issue 83) -----


def test_outputs_that_clash_are_named_as_the_arguments(tmp_path):
    """check_outputs names each output as the argument that gives it; a
    command rewords the same refusal in its flags (a path holding an
    option's name stays as it is)."""
    from dipy_spinverse.checks import OptionError
    from dipy_spinverse.files import check_outputs
    from dipy_spinverse.workflows.cli import flag_names, reword_options

    folder = tmp_path / "out_s0"  # a folder named as an option
    folder.mkdir()
    same = folder / "status.nii.gz"
    with pytest.raises(OptionError) as err:
        check_outputs([("out_status", same), ("out_s0", same)])
    assert str(err.value) == (
        f"out_status and out_s0 both write {str(same)!r}: one output would "
        "overwrite the other; give each its own name."
    )
    flags = flag_names("out_status", "out_s0")
    assert reword_options(err.value, flags) == (
        f"--out_status and --out_s0 both write {str(same)!r}: one output would "
        "overwrite the other; give each its own name."
    )
    with pytest.raises(OptionError) as err:
        check_outputs([("out_s0", folder)])
    assert str(err.value).startswith(f"out_s0={str(folder)!r} is a folder")
    assert reword_options(err.value, flags).startswith(f"--out_s0 {folder} is a")


def test_a_folder_in_use_names_the_argument_that_gave_it(tmp_path):
    from dipy_spinverse.checks import OptionError
    from dipy_spinverse.files import output_lock
    from dipy_spinverse.workflows.cli import flag_names, options_as_flags

    with output_lock(tmp_path, command="test"):
        with pytest.raises(OptionError, match="give this test run another folder"):
            with output_lock(tmp_path, command="test"):
                pass
        with pytest.raises(ValueError, match="another --out_dir") as err:
            with options_as_flags(flag_names("out_dir")):
                with output_lock(tmp_path, command="test", option="out_dir"):
                    pass
        assert not isinstance(err.value, OptionError)
