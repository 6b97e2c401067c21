"""io: model spec, save, load, checkpoint and resume of fits."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import dipy_spinverse.reconst.runner as runner
from dipy_spinverse import SpinverseModel
from dipy_spinverse.io import (
    Checkpoint,
    load_fit,
    model_spec,
    resume_fit,
    save_fit,
    save_maps,
    save_permeability,
    save_predicted,
)
from dipy_spinverse.reconst import MASKED, OK, PENDING


# -- save, load, resume ---------------------------------------------------------------
def test_save_load_round_trip(volume_fit, tmp_path):
    path = save_fit(volume_fit, tmp_path / "fit.npz")
    loaded = load_fit(path)
    assert loaded.shape == volume_fit.shape
    assert_array_equal(loaded.mask, volume_fit.mask)
    for key in ("permeability", "predicted", "S0", "S0_sequences", "loss", "status"):
        assert_array_equal(loaded.params[key], volume_fit.params[key])
    assert model_spec(loaded.model) == model_spec(volume_fit.model)
    assert loaded.model.config == volume_fit.model.config
    assert_array_equal(loaded.restricted_fraction, volume_fit.restricted_fraction)
    assert_allclose(loaded.predict(), volume_fit.predict())


def test_save_maps_and_images(volume_fit, tmp_path):
    import nibabel as nib

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = save_maps(volume_fit, tmp_path / "maps", affine=affine)
    assert set(paths) == {
        "restricted_fraction",
        "surface_to_volume",
        "membrane_permeability",
        "n_compartments",
        "residual",
        "status",
        "S0",
    }
    image = nib.load(paths["status"])
    assert_allclose(image.affine, affine)
    assert_array_equal(np.asanyarray(image.dataobj), volume_fit.status)
    perm = nib.load(save_permeability(volume_fit, tmp_path / "perm.nii.gz"))
    assert perm.shape == volume_fit.permeability.shape
    pred = nib.load(save_predicted(volume_fit, tmp_path / "pred.nii.gz"))
    assert pred.shape == volume_fit.shape + (6,)
    with pytest.raises(ValueError, match="Unknown map"):
        save_maps(volume_fit, tmp_path, names=["fa"])
    with pytest.raises(ValueError, match="volume fits"):
        save_fit(volume_fit[0, 0, 0], tmp_path / "one.npz")


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_fit(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a Spinverse fit"):
        load_fit(tmp_path / "other.npz")


def test_checkpoint_and_resume(model, volume, volume_fit, tmp_path, monkeypatch):
    data, mask = volume
    path = tmp_path / "state.npz"
    real = runner.fit_voxels
    calls = []

    def interrupted(model, chunk, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(chunk))
        return real(model, chunk, **kwargs)

    monkeypatch.setattr(runner, "fit_voxels", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.fit(data, mask=mask, vox_per_chunk=1, checkpoint=Checkpoint(path))
    monkeypatch.setattr(runner, "fit_voxels", real)
    partial = load_fit(path)
    assert partial.n_pending == 1
    assert_array_equal(partial.status[..., 0], [[OK, OK], [PENDING, MASKED]])
    assert np.isnan(partial.restricted_fraction[1, 0, 0])
    done = resume_fit(path, data)
    assert done.n_pending == 0
    assert_array_equal(done.status, volume_fit.status)
    assert_allclose(done.permeability, volume_fit.permeability, rtol=1e-7)
    assert load_fit(path).n_pending == 0
    # Resuming a finished fit fits nothing and changes nothing.
    again = model.fit(data, mask=mask, resume=done)
    assert_array_equal(again.permeability, done.permeability)


def test_resume_checks(model, volume, volume_fit, gtab, grid):
    data, mask = volume
    with pytest.raises(ValueError, match="shape"):
        model.fit(data[:1], resume=volume_fit)
    with pytest.raises(ValueError, match="data differ"):
        model.fit(data * 2, resume=volume_fit)
    with pytest.raises(ValueError, match="mask differs"):
        model.fit(data, mask=np.ones((2, 2, 1), bool), resume=volume_fit)
    other = SpinverseModel(gtab, grid=grid, preset="paper", max_iter=5, dtype="float64")
    with pytest.raises(ValueError, match="different model settings.*config"):
        other.fit(data, resume=volume_fit)
    with pytest.raises(ValueError, match="resume must be"):
        model.fit(data, resume=42)
