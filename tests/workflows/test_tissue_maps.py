"""The ``dipy_fit_tissue_maps`` command (dipy_spinverse.workflows.tissue):
its files, messages and outputs."""

import sys

import nibabel as nib
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse.tissue import (
    Flash,
    InversionRecovery,
    Mprage,
    TissueMapModel,
)
from dipy_spinverse.tissue.data import simulate_scans
from dipy_spinverse.workflows.tissue import TissueMapsFlow

PROTOCOL = [
    Mprage(ti=0.9, tr=2.3, te=0.003),
    InversionRecovery(ti=2.5, tr=9.0, te=0.1),
    Flash(tr=0.02, te=0.004, flip_angle=30),
]


def _phantom(shape=(9, 8, 6), seed=0):
    """Tissue proportions, one pure voxel of each tissue at the corner."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet([0.7, 0.7, 0.7], size=shape)
    p[0, 0, 0] = [1, 0, 0]
    p[0, 0, 1] = [0, 1, 0]
    p[0, 0, 2] = [0, 0, 1]
    return p


def test_command_version(monkeypatch, capsys):
    from dipy_spinverse.workflows.tissue import main

    monkeypatch.setattr(sys, "argv", ["dipy_fit_tissue_maps", "--version"])
    assert main() == 0
    assert capsys.readouterr().out.startswith("dipy_spinverse ")


@pytest.mark.parametrize(
    "case, match",
    [
        ("tissues_json", "tissues_file .* is not valid JSON"),
        ("tissues_binary", "cannot read the tissues_file file"),
        ("sequences_binary", "cannot read the sequences file"),
        ("image_5d", "must be 4-D"),
        ("mask_nan", "mask file .* holds NaN"),
        ("out_dir_file", "cannot write the outputs"),
    ],
)
def test_workflow_bad_files_name_the_file(tmp_path, case, match):
    images = np.ones((3, 2, 2, 3), np.float32)
    image_file = tmp_path / "images.nii.gz"
    nib.save(
        nib.Nifti1Image(images[..., None, :] if case == "image_5d" else images,
                        np.eye(4)),
        image_file,
    )  # fmt: skip
    sequences = tmp_path / "sequences.txt"
    sequences.write_text(
        "Mprage ti=0.9 tr=2.3 te=0.003\nInversionRecovery ti=2.5 tr=9.0 te=0.1\n"
        "Flash tr=0.02 te=0.004 flip_angle=30\n"
    )
    options = dict(out_dir=str(tmp_path / "out"))
    if case == "tissues_json":
        (tmp_path / "t.json").write_text('{"wm": {"t1": 0.8\n')
        options["tissues_file"] = str(tmp_path / "t.json")
    elif case == "tissues_binary":
        options["tissues_file"] = str(image_file)
    elif case == "sequences_binary":
        sequences = image_file
    elif case == "mask_nan":
        mask = np.ones(images.shape[:3], np.float32)
        mask[0, 0, 0] = np.nan
        nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "mask.nii.gz")
        options["mask_files"] = str(tmp_path / "mask.nii.gz")
    elif case == "out_dir_file":
        (tmp_path / "afile").write_text("")
        options["out_dir"] = str(tmp_path / "afile")
    with pytest.raises(ValueError, match=match):
        TissueMapsFlow(force=True).run(str(image_file), str(sequences), **options)


def test_workflow_writes_maps(tmp_path):
    model = TissueMapModel(PROTOCOL[:3])
    truth = _phantom(shape=(6, 5, 4))
    images = simulate_scans(model, truth, np.ones((6, 5, 4), bool), snr=np.inf)
    scanner = nib.Nifti1Image(images.astype(np.float32), np.eye(4))
    scanner.set_qform(np.eye(4), code=1)
    scanner.set_sform(np.eye(4), code=1)
    nib.save(scanner, tmp_path / "images.nii.gz")
    mask = np.ones((6, 5, 4), np.uint8)
    mask[0] = 0
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "mask.nii.gz")
    (tmp_path / "sequences.txt").write_text(
        "# MPRAGE, FLAIR, FLASH\n"
        "Mprage ti=0.9 tr=2.3 te=0.003\n"
        "InversionRecovery ti=2.5 tr=9.0 te=0.1\n"
        "Flash tr=0.02 te=0.004 flip_angle=30  # T1w\n"
    )
    out = tmp_path / "out"
    TissueMapsFlow().run(
        str(tmp_path / "images.nii.gz"),
        str(tmp_path / "sequences.txt"),
        mask_files=str(tmp_path / "mask.nii.gz"),
        out_dir=str(out),
    )
    probabilities = nib.load(out / "tissue_probabilities.nii.gz").get_fdata()
    assert_allclose(probabilities[1:], truth[1:], atol=1e-4)
    assert_array_equal(probabilities[0], 0)
    labels = nib.load(out / "tissue_labels.nii.gz").get_fdata()
    assert_array_equal(labels[1:], truth[1:].argmax(axis=-1) + 1)
    for name in ("t1", "t2", "pd", "predicted"):
        assert (out / f"{name}.nii.gz").exists()
    # Every map in the scanner space of its input (qform and sform codes 1).
    for path in out.glob("*.nii.gz"):
        header = nib.load(path).header
        assert int(header["qform_code"]) == int(header["sform_code"]) == 1, path


def _write_workflow_inputs(tmp_path, order=(0, 1, 2)):
    model = TissueMapModel(PROTOCOL[:3])
    truth = _phantom(shape=(6, 5, 4))
    images = simulate_scans(model, truth, np.ones((6, 5, 4), bool), snr=np.inf)
    nib.save(
        nib.Nifti1Image(images.astype(np.float32), np.eye(4)),
        tmp_path / "images.nii.gz",
    )
    lines = [
        "Mprage ti=0.9 tr=2.3 te=0.003",
        "InversionRecovery ti=2.5 tr=9.0 te=0.1",
        "Flash tr=0.02 te=0.004 flip_angle=30",
    ]
    (tmp_path / "sequences.txt").write_text("\n".join(lines[i] for i in order))
    return str(tmp_path / "images.nii.gz"), str(tmp_path / "sequences.txt")


def test_workflow_refuses_sequences_in_another_order(tmp_path):
    image_file, sequences = _write_workflow_inputs(tmp_path, order=(2, 0, 1))
    with pytest.raises(ValueError, match="do not follow the order of the sequences"):
        TissueMapsFlow().run(image_file, sequences, out_dir=str(tmp_path / "out"))


def test_workflow_writes_the_status_and_checks_the_mask_space(tmp_path, caplog):
    image_file, sequences = _write_workflow_inputs(tmp_path)
    shifted = np.eye(4)
    shifted[0, 3] = 12.0
    mask = np.ones((6, 5, 4), np.uint8)
    nib.save(nib.Nifti1Image(mask, shifted), tmp_path / "mask.nii.gz")
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        TissueMapsFlow().run(
            image_file,
            sequences,
            mask_files=str(tmp_path / "mask.nii.gz"),
            out_dir=str(out),
        )
    assert "has another affine than" in caplog.text and "12 mm" in caplog.text
    status = nib.load(out / "tissue_status.nii.gz").get_fdata()
    assert_array_equal(status, 0)


@pytest.mark.parametrize("which", ["images", "mask"])
def test_workflow_names_a_truncated_file(tmp_path, which):
    """A truncated .nii.gz gave a raw EOFError traceback."""
    image_file, sequences = _write_workflow_inputs(tmp_path)
    mask_file = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4), np.float32), np.eye(4)), mask_file)
    damaged = tmp_path / f"{which}.nii.gz"
    content = damaged.read_bytes()
    damaged.write_bytes(content[: len(content) // 2])
    with pytest.raises(ValueError, match=rf"{damaged}.*(damaged|cannot be read)"):
        TissueMapsFlow().run(
            image_file,
            sequences,
            mask_files=str(mask_file),
            out_dir=str(tmp_path / "out"),
        )


def test_workflow_refuses_clashing_outputs_and_a_folder_in_use(tmp_path):
    """The faults of dipy_fit_spinverse's outputs (issue 59) in this
    command too: two outputs on one path, a second run into a folder in
    use; both refused before the fit."""
    from dipy_spinverse.files import output_lock

    model = TissueMapModel(PROTOCOL[:3])
    truth = _phantom(shape=(6, 5, 4))
    images = simulate_scans(model, truth, np.ones((6, 5, 4), bool), snr=np.inf)
    nib.save(nib.Nifti1Image(images.astype(np.float32), np.eye(4)), tmp_path / "i.nii")
    (tmp_path / "s.txt").write_text(
        "Mprage ti=0.9 tr=2.3 te=0.003\n"
        "InversionRecovery ti=2.5 tr=9.0 te=0.1\n"
        "Flash tr=0.02 te=0.004 flip_angle=30\n"
    )
    inputs = (str(tmp_path / "i.nii"), str(tmp_path / "s.txt"))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--out_labels and --out_t1 both write"):
        TissueMapsFlow(force=True).run(
            *inputs, out_dir=str(out), out_t1="tissue_labels.nii.gz"
        )
    out.mkdir(exist_ok=True)
    with output_lock(out, command="test"):
        with pytest.raises(ValueError, match="another dipy_spinverse run"):
            TissueMapsFlow(force=True).run(*inputs, out_dir=str(out))
    assert not (out / "tissue_labels.nii.gz").exists()
    TissueMapsFlow(force=True).run(*inputs, out_dir=str(out))
    assert (out / "tissue_labels.nii.gz").exists()
