"""io: model spec, save, load, checkpoint and resume of fits."""

import json
import os
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import FAST, jittered_grid  # noqa: E402
from numpy.testing import assert_allclose, assert_array_equal

import dipy_spinverse.reconst.resume as resume
import dipy_spinverse.reconst.runner as runner
from dipy_spinverse import SpinverseModel, TetGrid
from dipy_spinverse.files import WriteError
from dipy_spinverse.inverse import resolve_config
from dipy_spinverse.io.checkpoint import Checkpoint, resume_fit
from dipy_spinverse.io.fits import load_fit, save_fit
from dipy_spinverse.io.maps import (
    MAPS,
    save_map,
    save_maps,
    save_permeability,
    save_predicted,
)
from dipy_spinverse.io.specs import model_from_spec, model_spec
from dipy_spinverse.posterior.calibration import SCALARS
from dipy_spinverse.reconst import (
    MASKED,
    NONFINITE,
    OK,
    PENDING,
    PosteriorFit,
    SpinverseFit,
)


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
    # The level its losses (and residual) are measured in: 0, no sigma.
    assert volume_fit.noise_level == 0.0 and loaded.noise_level == 0.0


def test_the_fits_noise_level_is_kept(gtab, grid, volume, tmp_path):
    """A search fit records the relative noise its losses are measured in
    (sigma over the median b = 0), its parts and its saved state too; a file
    saved before the field loads with the level not recorded (None)."""
    import json

    from dipy_spinverse import SpinverseModel
    from dipy_spinverse.reconst import runner

    data, mask = volume
    preset = resolve_config("default", search_steps=2, search_starts=2)
    model = SpinverseModel(
        gtab, grid=grid, sigma=0.01, preset=preset, max_iter=3, dtype="float64"
    )
    fit = model.fit(data, mask=mask)
    level = runner.fit_noise(model.search_settings(), data, mask=mask)
    assert level > 0 and fit.noise_level == level
    index = tuple(np.argwhere(mask)[0])
    assert fit[index].noise_level == level
    assert model.fit(data[index]).noise_level > 0  # one voxel, its own level
    loaded = load_fit(save_fit(fit, tmp_path / "fit.npz"))
    assert loaded.noise_level == level
    with np.load(tmp_path / "fit.npz") as archive:
        arrays = dict(archive)
    header = json.loads(str(arrays["header"]))
    del header["noise_level"]
    arrays["header"] = np.array(json.dumps(header))
    np.savez(tmp_path / "old.npz", **arrays)
    assert load_fit(tmp_path / "old.npz").noise_level is None


def test_search_outputs_survive_save_load_and_the_store(gtab, grid, volume, tmp_path):
    """Labels, inside probability and uncertainty of the label search are
    saved (npz) and checkpointed (HDF5 store) like the other parameters."""
    data, mask = volume
    model = SpinverseModel(
        gtab,
        grid=grid,
        max_iter=4,
        preset=resolve_config("default", search_steps=2, search_starts=2),
    )
    fit = model.fit(data, mask=mask, checkpoint=Checkpoint(tmp_path / "state.h5"))
    assert fit.inside_probability.shape == mask.shape + (grid.n_cells,)
    for loaded in (
        load_fit(save_fit(fit, tmp_path / "fit.npz")),
        load_fit(tmp_path / "state.h5"),
    ):
        for key in ("labels", "inside_probability", "uncertainty"):
            assert_array_equal(loaded.params[key], fit.params[key])
        assert loaded.params["proposal_probability"] is None
        assert_array_equal(loaded.n_cells, fit.n_cells)
        assert_array_equal(loaded.cell_volumes, fit.cell_volumes)
    # The uncertainty is a map among the fit's maps.
    paths = save_maps(fit, tmp_path / "maps")
    assert set(paths) == set(MAPS) | {"uncertainty"}
    assert_allclose(nib.load(paths["uncertainty"]).get_fdata(), fit.uncertainty)


def _posterior_volume_fit(gtab):
    """A posterior volume fit of made-up summaries: saving and loading read
    no estimator (it is found again by the model's key when needed)."""
    model = SpinverseModel(gtab, fit_method="posterior", sigma=0.02)
    mask = np.array([[True, False], [True, True]])[..., None]
    n, rng = int(mask.sum()), np.random.default_rng(0)
    status = np.array([OK, NONFINITE, OK])
    params = dict(
        status=status,
        inputs=rng.random((n, len(model.protocol))).astype(np.float32),
        sigma=np.full(n, 0.02, np.float32),
        S0=np.array([500.0, np.nan, 700.0]),
        S0_sequences=rng.random((n, len(model.sequences))) + 1,
        orientation=np.tile([0.0, 0.0, 1.0], (n, 1)),
    )
    for name in SCALARS:
        # Sorted quantiles at 5, 25, 50, 75, 95 %, NaN where not OK.
        quantiles = np.sort(rng.random((n, 5)), axis=1)
        params[name] = np.where((status == OK)[:, None], quantiles, np.nan)
    return PosteriorFit(model, params, mask)


def test_a_posterior_fit_saves_and_loads_as_a_search_fit(gtab, tmp_path):
    """save_fit / load_fit keep a posterior volume fit whole (issue 73, item
    2): every per-voxel array, the mask, the model's settings; the loaded fit
    reads, indexes and saves again as the one saved."""
    fit = _posterior_volume_fit(gtab)
    loaded = load_fit(save_fit(fit, tmp_path / "posterior"))
    assert isinstance(loaded, PosteriorFit) and loaded.shape == fit.shape
    assert_array_equal(loaded.mask, fit.mask)
    assert set(loaded.params) == set(fit.params)
    for key, value in fit.params.items():
        assert_array_equal(loaded.params[key], value)
        assert loaded.params[key].dtype == value.dtype, key
    assert model_spec(loaded.model) == model_spec(fit.model)
    assert_array_equal(loaded.status, fit.status)
    assert loaded.status[0, 1, 0] == MASKED
    assert loaded.status_counts() == fit.status_counts()
    for name in SCALARS:
        assert_array_equal(getattr(loaded, name), getattr(fit, name))
        for level in (0.5, 0.9):  # the stored intervals: no draws
            for got, saved in zip(
                loaded.credible_interval(name, level),
                fit.credible_interval(name, level),
                strict=True,
            ):
                assert_array_equal(got, saved)
    assert_array_equal(loaded.S0, fit.S0)
    assert_array_equal(loaded.orientation, fit.orientation)
    # Parts of the loaded fit are the saved fit's parts.
    assert loaded[1, 1, 0].restricted_fraction == fit[1, 1, 0].restricted_fraction
    assert loaded[0, 1, 0].status == MASKED
    assert_array_equal(loaded[1].S0, fit.S0[1])
    # Saved again, the same file.
    again = load_fit(save_fit(loaded, tmp_path / "again.npz"))
    for key, value in fit.params.items():
        assert_array_equal(again.params[key], value)
    # One voxel is no volume: refused naming the fix, as a search voxel is.
    with pytest.raises(ValueError, match="PosteriorFit of one voxel"):
        save_fit(fit[0, 0, 0], tmp_path / "voxel.npz")


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
    with pytest.raises(ValueError, match="no mesh_volume map.*refine_mesh=True"):
        save_map(volume_fit, "mesh_volume", tmp_path / "v.nii.gz")
    with pytest.raises(ValueError, match="no uncertainty map: .*label search"):
        save_map(volume_fit, "uncertainty", tmp_path / "u.nii.gz")
    with pytest.raises(ValueError, match="no mesh_radius map"):
        save_maps(volume_fit, tmp_path, names=["mesh_radius"])
    with pytest.raises(ValueError, match="volume fits"):
        save_fit(volume_fit[0, 0, 0], tmp_path / "one.npz")
    for bad in (np.eye(3), [[1, 2], [3]], np.diag([1.0, 0, 1, 1]), "eye"):
        with pytest.raises(ValueError, match="affine"):
            save_map(volume_fit, "S0", tmp_path / "bad.nii.gz", affine=bad)


def test_images_keep_the_space_of_their_reference(volume_fit, tmp_path):
    """Maps carry the input image's qform and sform codes and spatial unit
    (a registration tool reading the qform needs it); without a reference,
    sform "aligned" (2), no qform, mm."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-90.0, -126.0, -72.0]
    dwi = nib.Nifti1Image(np.zeros(volume_fit.shape + (6,), np.int16), affine)
    dwi.set_qform(affine, code=1)
    dwi.set_sform(affine, code=4)
    dwi.header.set_xyzt_units("micron", "sec")
    savers = {
        "map": lambda path, **kw: save_map(volume_fit, "S0", path, **kw),
        "permeability": lambda path, **kw: save_permeability(volume_fit, path, **kw),
        "predicted": lambda path, **kw: save_predicted(volume_fit, path, **kw),
    }
    for name, save in savers.items():
        for reference in (dwi, dwi.header):
            image = nib.load(
                save(tmp_path / f"{name}.nii.gz", affine=affine, reference=reference)
            )
            assert int(image.header["qform_code"]) == 1
            assert int(image.header["sform_code"]) == 4
            assert image.header.get_xyzt_units()[0] == "micron"
            assert_allclose(image.affine, affine)
        image = nib.load(save(tmp_path / f"{name}_plain.nii.gz", affine=affine))
        assert int(image.header["qform_code"]) == 0
        assert int(image.header["sform_code"]) == 2
        assert image.header.get_xyzt_units()[0] == "mm"
    paths = save_maps(volume_fit, tmp_path / "maps", affine=affine, reference=dwi)
    assert {int(nib.load(p).header["sform_code"]) for p in paths.values()} == {4}
    with pytest.raises(TypeError, match="reference must be a NIfTI image"):
        save_map(volume_fit, "S0", tmp_path / "bad.nii.gz", reference=affine)


def test_images_of_one_voxel(volume_fit, tmp_path):
    """A fit of one voxel is written as a 1 x 1 x 1 volume, its values kept."""
    import nibabel as nib

    one = volume_fit[0, 0, 0]
    image = nib.load(save_map(one, "S0", tmp_path / "s0.nii.gz"))
    assert image.shape == (1, 1, 1)
    assert_allclose(np.asanyarray(image.dataobj)[0, 0, 0], one.S0, rtol=1e-6)
    perm = nib.load(save_permeability(one, tmp_path / "perm.nii.gz"))
    assert perm.shape == (1, 1, 1, one.model.grid.n_faces)
    pred = nib.load(save_predicted(one, tmp_path / "pred.nii.gz"))
    assert_allclose(pred.get_fdata()[0, 0, 0], one.predict(), rtol=1e-6)


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_fit(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a Spinverse fit"):
        load_fit(tmp_path / "other.npz")


def test_checkpoint_and_resume(model, volume, volume_fit, tmp_path, monkeypatch):
    data, mask = volume
    path = tmp_path / "state.h5"
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


def test_store_writes_each_chunk_once(model, volume, volume_fit, tmp_path, monkeypatch):
    import dipy_spinverse.io.checkpoint as io

    data, mask = volume
    written = []
    real = io._write_rows

    def spy(fit, path, rows, layout):
        written.append(list(rows))
        return real(fit, path, rows, layout)

    monkeypatch.setattr(io, "_write_rows", spy)
    path = tmp_path / "store.h5"
    fit = model.fit(data, mask=mask, vox_per_chunk=2, checkpoint=Checkpoint(path))
    # Chunks of 2 rows of the 3 voxels of the mask, each written once.
    assert written == [[0, 1], [2]]
    # The fit and the store hold the voxels of the mask only.
    assert fit.params["permeability"].shape == (3, model.grid.n_faces)
    stored = load_fit(path)
    assert_array_equal(stored.status, volume_fit.status)
    assert_array_equal(stored.permeability, fit.permeability)
    assert stored.fingerprint == resume.fingerprint(data, mask)


def test_store_does_not_grow_with_the_volume(model, volume, tmp_path):
    """A store holds the mask's voxels only: 3 voxels of a 300,000-voxel
    volume cost their rows and the (compressed) mask, not the volume."""
    params = runner.empty_params(model.search_settings(), 3)
    sizes = []
    for n_voxels in (3, 300_000):
        big = np.zeros(n_voxels, bool)
        big[:3] = True
        partial = SpinverseFit(model, params, big)
        path = tmp_path / f"empty_{n_voxels}.h5"
        Checkpoint(path)(partial)
        sizes.append(os.path.getsize(path))
        assert load_fit(path).n_pending == 3
    # The mask compresses to about a kilobyte; the rows are the same.
    assert sizes[1] - sizes[0] < 10_000


def test_one_argument_checkpoint_gets_the_partial_fit(model, volume):
    data, mask = volume
    seen = []
    model.fit(data, mask=mask, vox_per_chunk=2, checkpoint=lambda f: seen.append(f))
    assert len(seen) == 3  # the start, then two chunks
    assert seen[-1].n_pending == 0


def test_resume_a_saved_npz_checkpoints_beside_it(model, volume, volume_fit, tmp_path):
    data, mask = volume
    params = {k: None if v is None else v.copy() for k, v in volume_fit.params.items()}
    params["status"][1] = runner.PENDING
    partial = SpinverseFit(model, params, mask, fingerprint=volume_fit.fingerprint)
    path = save_fit(partial, tmp_path / "fit.npz")
    done = resume_fit(path, data)
    assert_array_equal(done.status, volume_fit.status)
    assert load_fit(tmp_path / "fit.partial.h5").n_pending == 0


def test_fingerprint_hashes_in_slabs(volume, monkeypatch):
    import hashlib

    data, _ = volume
    whole = hashlib.sha1(np.ascontiguousarray(data, dtype=np.float64).tobytes())
    whole.update(str(data.shape).encode())
    monkeypatch.setattr(resume, "FINGERPRINT_BYTES", 8)  # one row at a time
    assert resume.fingerprint(data) == whole.hexdigest()
    assert resume.fingerprint(data.astype(np.float32)) != whole.hexdigest()
    transposed = np.asfortranarray(data)
    assert resume.fingerprint(transposed) == whole.hexdigest()


def test_fingerprint_is_that_of_the_mask_voxels(volume, monkeypatch):
    """A volume and the rows of its mask hash alike (so a fit started on one
    resumes on the other); other voxels do not count; the mask does."""
    import hashlib

    data, mask = volume
    rows = data[mask]
    expected = hashlib.sha1(np.ascontiguousarray(rows, dtype=np.float64).tobytes())
    expected.update(str(data.shape).encode())
    monkeypatch.setattr(resume, "FINGERPRINT_BYTES", 8)  # one row at a time
    assert resume.fingerprint(data, mask) == expected.hexdigest()
    assert resume.fingerprint(rows, mask) == expected.hexdigest()
    changed = data.copy()
    changed[~mask] += 1.0
    assert resume.fingerprint(changed, mask) == expected.hexdigest()
    changed[mask] += 1.0
    assert resume.fingerprint(changed, mask) != expected.hexdigest()
    # With every voxel in the mask it is the digest of the whole array.
    everything = np.ones(mask.shape, bool)
    assert resume.fingerprint(data, everything) == resume.fingerprint(data)


def test_fit_of_the_mask_rows_equals_the_volume_fit(model, volume, volume_fit):
    data, mask = volume
    fit = model.fit(data[mask], mask=mask)
    assert fit.shape == mask.shape
    assert fit.fingerprint == volume_fit.fingerprint
    assert_array_equal(fit.status, volume_fit.status)
    assert_allclose(fit.permeability, volume_fit.permeability, rtol=1e-6)
    assert_allclose(fit.predict(), volume_fit.predict(), rtol=1e-6)
    assert_allclose(fit.predict_mask(), volume_fit.predict()[mask], rtol=1e-6)
    index = tuple(int(i) for i in np.argwhere(mask)[-1])
    assert_array_equal(fit.voxel_data(data[mask], index), data[index])
    assert_array_equal(volume_fit.voxel_data(data, index), data[index])


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
    # A part of a fit has no fingerprint of its own data: it is not resumed
    # on data that cannot be checked.
    part = volume_fit[:1]
    assert part.fingerprint is None
    with pytest.raises(ValueError, match="no record of the data"):
        model.fit(data[:1], resume=part)


def test_the_configuration_is_saved_whole(gtab, grid):
    """A model reloads with its configuration, whatever preset, options and
    max_iter built it; files of earlier versions (a preset and its options)
    still load."""
    config = resolve_config("default", search_steps=2, search_starts=1, sigma=0.02)
    model = SpinverseModel(gtab, grid=grid, preset=config, max_iter=5)
    spec = model_spec(model)
    assert spec["preset"] is None and spec["max_iter"] is None
    assert spec["options"]["search_steps"] == 2 and spec["options"]["sigma"] == 0.02
    reloaded = model_from_spec(spec)
    assert reloaded.differences(model) == [] and reloaded.n_iterations == 5
    old = dict(
        spec,
        preset="default",
        max_iter=5,
        options=dict(search_steps=2, search_starts=1, sigma=0.02),
    )
    assert model_from_spec(old).differences(model) == []


def test_a_protocol_of_echo_times_is_saved_whole(gtab, grid):
    """Waveforms in spin echoes (Protocol.from_gtab(..., echo_time=))
    describe their encoding and echo time, and reload as they were."""
    from dipy_spinverse.sim.sequences import Protocol

    echo_times = 0.08 + 0.01 * (np.arange(len(gtab.bvals)) % 2)
    protocol = Protocol.from_gtab(gtab, echo_time=echo_times)
    model = SpinverseModel(protocol, grid=grid)
    reloaded = model_from_spec(model_spec(model))
    assert reloaded.protocol.waveforms == protocol.waveforms
    np.testing.assert_allclose(reloaded.protocol.echo_times, echo_times)


def test_a_grid_built_by_hand_is_saved_whole(gtab, volume, tmp_path):
    """A grid that is not the BCC grid of its size (jittered vertices) is
    saved with its geometry and compared whole between models."""
    grid = jittered_grid()
    bcc = TetGrid.bcc(grid.size, 2, boundary=grid.boundary, wall_permeability=0.05)
    model = SpinverseModel(gtab, grid=grid, dtype="float64", **FAST)
    assert model.differences(SpinverseModel(gtab, grid=bcc, dtype="float64", **FAST))
    fit = model.fit(volume[0][:1, :1])
    loaded = load_fit(save_fit(fit, tmp_path / "jittered.npz"))
    assert loaded.model.differences(model) == []
    assert_array_equal(loaded.model.grid.vertices, grid.vertices)
    assert_array_equal(loaded.model.grid.tet_coords, grid.tet_coords)
    assert_allclose(loaded.predict(), fit.predict(), rtol=1e-12)
    # The BCC grid is saved as its parameters alone.
    assert "vertices" not in model_spec(SpinverseModel(gtab, grid=bcc))["grid"]


# -- damaged files, devices ------------------------------------------------------------
def test_damaged_fit_files_are_refused_naming_the_file(volume_fit, tmp_path):
    path = save_fit(volume_fit, tmp_path / "fit.npz")
    raw = open(path, "rb").read()
    middle = len(raw) // 2

    def flipped(start, stop):
        return raw[:start] + bytes(b ^ 0xFF for b in raw[start:stop]) + raw[stop:]

    damaged = dict(
        truncated=raw[:middle],
        cut_end=raw[:-10],
        empty=b"",
        garbage=b"not a fit file " * 20,
        corrupted_data=flipped(middle, middle + 64),
        corrupted_start=flipped(10, 40),
    )
    for name, content in damaged.items():
        bad = tmp_path / f"{name}.npz"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(str(bad))):
            load_fit(bad)
    # Intact archive, damaged content: arrays that do not fit the volume.
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["status"] = arrays["status"][:1]
    np.savez_compressed(tmp_path / "shapes.npz", **arrays)
    with pytest.raises(ValueError, match="shapes.npz: status has shape"):
        load_fit(tmp_path / "shapes.npz")


def _saved_on(path, device):
    """Rewrite a fit file as if it had been saved with ``device``."""
    with np.load(path) as archive:
        arrays = dict(archive)
    header = json.loads(str(arrays["header"]))
    header["model"]["device"] = device
    arrays["header"] = np.array(json.dumps(header))
    np.savez_compressed(path, **arrays)


def test_resume_on_cuda_without_cuda_is_refused(model, volume, tmp_path, monkeypatch):
    data, mask = volume
    params = runner.empty_params(model.search_settings(), mask.shape)
    params["status"][~mask] = MASKED
    digest = resume.fingerprint(data, mask)
    partial = SpinverseFit(model, params, mask, fingerprint=digest)
    path = save_fit(partial, tmp_path / "state.npz")
    _saved_on(path, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Loading for inspection works on the CPU and keeps the saved device ...
    loaded = load_fit(path)
    assert loaded.model.device.type == "cpu" and loaded.saved_device == "cuda"
    assert loaded.n_pending == 3
    # ... but a fit is not continued on the CPU unless asked for.
    with pytest.raises(ValueError, match="saved with device='cuda'.*device='cpu'"):
        resume_fit(path, data)
    with pytest.raises(ValueError, match="no CUDA device.*use device 'cpu'"):
        resume_fit(path, data, device="cuda")
    done = resume_fit(path, data, device="cpu")
    assert done.n_pending == 0 and done.model.device.type == "cpu"
    assert_array_equal(done.status[mask], OK)


def test_a_tampered_checkpoint_is_refused(model, volume, tmp_path):
    """Values overwritten in a store that stays valid HDF5 (12345 m/s
    permeabilities) reached the outputs of a resumed fit: each row is
    checked against its CRC32."""
    import h5py

    data, mask = volume
    path = tmp_path / "state.h5"
    model.fit(data, mask=mask, vox_per_chunk=2, checkpoint=Checkpoint(path))
    assert load_fit(path).n_pending == 0  # an intact store reads
    with h5py.File(path, "r+") as store:
        assert json.loads(store.attrs["header"])["checksum"]
        store["permeability"][1, :5] = 12345.0
    message = (
        r"state\.h5: permeability of 1 stored voxel\(s\) does not match its "
        r"checksum \(rows 1 of the mask's voxels.*Delete the checkpoint to fit those "
        "voxels again"
    )
    with pytest.raises(ValueError, match=message):
        load_fit(path)
    with pytest.raises(ValueError, match=message):
        resume_fit(path, data)
    # A voxel still PENDING is fitted again, whatever it holds.
    with h5py.File(path, "r+") as store:
        store["status"][1] = PENDING
    assert load_fit(path).n_pending == 1


def test_a_full_disk_while_checkpointing_is_a_clean_error(
    model, volume, tmp_path, monkeypatch
):
    """A full disk ended in a segmentation fault after an h5py traceback, and
    the rerun found the store corrupted: a WriteError names the store, which
    keeps the chunks written before, and the rerun continues them."""
    import errno

    import dipy_spinverse.io.checkpoint as io

    data, mask = volume
    path = tmp_path / "state.h5"
    real = io._write_block
    calls = []

    def full_after_the_first_chunk(f, entry, first, values):
        calls.append(first)
        if first >= 1:  # the first chunk (row 0) is in
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, entry, first, values)

    monkeypatch.setattr(io, "_write_block", full_after_the_first_chunk)
    with pytest.raises(WriteError, match=r"state\.h5 \(rows 1-1 .*the disk is full"):
        model.fit(data, mask=mask, vox_per_chunk=1, checkpoint=Checkpoint(path))
    monkeypatch.setattr(io, "_write_block", real)
    partial = load_fit(path)
    assert_array_equal(partial.params["status"][1:], [PENDING, PENDING])
    assert partial.params["status"][0] != PENDING
    done = resume_fit(path, data)
    assert done.n_pending == 0


def test_a_failing_hdf5_library_cannot_lose_a_store(
    model, volume, tmp_path, monkeypatch
):
    """h5py raised RuntimeError ("Slist already enabled?") on a full disk,
    which the store did not catch. At creation such an error is one clean
    WriteError, the temporary file is removed and the store there before is
    unchanged; the rows are never written through HDF5."""
    import h5py

    data, mask = volume
    path = tmp_path / "state.h5"
    model.fit(data, mask=mask, vox_per_chunk=2, checkpoint=Checkpoint(path))
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("Slist already enabled? (slist already enabled?)")

    monkeypatch.setattr(h5py, "File", broken)
    partial = SpinverseFit(
        model,
        runner.empty_params(model.search_settings(), 3),
        mask,
        fingerprint="another fit",
    )
    with pytest.raises(WriteError, match=r"state\.h5 \(creating it\).*Slist"):
        Checkpoint(path)(partial)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.h5"]
