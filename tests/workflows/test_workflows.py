"""The demo dataset and the dipy_fit_spinverse workflow (tiny settings)."""

import json
import os
import sys
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SMALL_DEMO
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse.checks import OptionError
from dipy_spinverse.data import (
    AXON_VOXELS,
    DEMO_PRIOR,
    DEMO_SURFACE_PRIOR,
    DEMO_SURFACE_TRAINING,
    DEMO_TRAINING,
    PHANTOM_VOXELS,
    TISSUE_VOXELS,
    demo_phantoms,
    make_phantom_dataset,
)
from dipy_spinverse.geometry.descriptors import DESCRIPTORS
from dipy_spinverse.inverse import resolve_config
from dipy_spinverse.io.camino import read_scheme, write_scheme
from dipy_spinverse.io.fits import load_fit, save_fit
from dipy_spinverse.io.gradients import read_timing
from dipy_spinverse.io.meshes import load_mesh
from dipy_spinverse.posterior import TissuePrior
from dipy_spinverse.reconst import OK, PENDING, UNDERDETERMINED, SpinverseModel
from dipy_spinverse.reconst.search_model import SpinverseSearchModel
from dipy_spinverse.sim.grid import TetGrid
from dipy_spinverse.sim.sequences import Protocol
from dipy_spinverse.workflows.dataset import noise_sigma
from dipy_spinverse.workflows.flags import in_flags, parse_noise, reword
from dipy_spinverse.workflows.spinverse import (
    SpinverseFlow,
    main,
    parse_posterior_options,
)

# A 48-cell grid and 3 directions per shell: 2 x (1 + 2 x 3) = 14 volumes.
N_VOLUMES = 14
MAPS = (
    "restricted_fraction",
    "surface_to_volume",
    "membrane_permeability",
    "n_compartments",
    "residual",
    "status",
    "s0",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_phantom_dataset(tmp_path_factory.mktemp("demo"), **SMALL_DEMO)


def _load(path):
    return np.asanyarray(nib.load(path).dataobj)


def _run(demo, out_dir, **kwargs):
    options = dict(
        timing_file=demo["timing"],
        grid_size=SMALL_DEMO["grid_size"],
        grid_resolution=SMALL_DEMO["grid_resolution"],
        max_iter=2,
        # The face fit alone: the label search has its own tests
        # (tests/test_search.py, and a smoke test in tests/test_reconst.py).
        preset="paper",
        out_dir=str(out_dir),
    )
    options.update(kwargs)
    bvals = options.pop("bvals", demo["bvals"])
    bvecs = options.pop("bvecs", demo["bvecs"])
    flow = SpinverseFlow(force=True)
    flow.run(demo["data"], bvals, bvecs, demo["mask"], **options)
    return flow


def test_phantom_dataset_is_deterministic(demo, tmp_path):
    again = make_phantom_dataset(tmp_path, **SMALL_DEMO)
    assert_array_equal(_load(again["data"]), _load(demo["data"]))
    data = _load(demo["data"])
    assert data.shape == (3, 2, 1, N_VOLUMES)
    assert np.all(data > 0)
    assert_array_equal(_load(demo["mask"]), 1)
    # The images say what their affine is in (mm, "aligned"), as the maps
    # written from them do: DIPY's save_nifti left the unit unknown.
    for name in ("data", "mask"):
        header = nib.load(demo[name]).header
        assert header.get_xyzt_units()[0] == "mm", name
        assert int(header["sform_code"]) == 2, name
    bvals = np.loadtxt(demo["bvals"])
    assert bvals.shape == (N_VOLUMES,) and np.sum(bvals == 0) == 2
    assert np.loadtxt(demo["bvecs"]).shape == (3, N_VOLUMES)
    small_delta, big_delta = read_timing(demo["timing"], n_volumes=N_VOLUMES)
    assert set(big_delta) == {0.06, 0.02} and set(small_delta) == {0.01}
    scheme = read_scheme(demo["scheme"])[0]
    assert_allclose(scheme.bvals, bvals, rtol=1e-6, atol=1e-6)
    truth = np.load(demo["truth"])
    assert truth["permeability"].shape[:3] == (3, 2, 1)
    # Its closed boxes are the published shapes, as demo_phantoms
    # builds them on the dataset's grid.
    grid = TetGrid.bcc(SMALL_DEMO["grid_size"], SMALL_DEMO["grid_resolution"])
    for (index, *_), phantom in zip(PHANTOM_VOXELS, demo_phantoms(grid), strict=True):
        assert_array_equal(truth["labels"][index], phantom.labels)
        assert_array_equal(truth["permeability"][index], phantom.permeability)
    with open(demo["truth_json"]) as f:
        description = json.load(f)
    assert len(description["voxels"]) == len(PHANTOM_VOXELS) == 6
    assert len(os.listdir(demo["truth_meshes"])) == 6
    # Different S0 and T2 weighting per echo time: b=0 differs between sequences.
    b0 = data[..., bvals == 0]
    assert np.all(b0[..., 0] < b0[..., 1])
    other_seed = make_phantom_dataset(tmp_path / "seed1", seed=1, **SMALL_DEMO)
    assert not np.array_equal(_load(other_seed["data"]), data)


def test_phantom_dataset_tissue_voxels(tmp_path):
    """The third row holds tissue of one family of DEMO_PRIOR each, the
    fourth packed axons of the default prior: a voxel's noise-free signal is
    S0 exp(-TE / T2) times the finer patch's simulation, its truth is in
    truth.json (none per face: another grid), and the rows before a row are
    those of the dataset without it."""
    # Coarser patches than the defaults (6 and 12) keep this to seconds.
    resolution, axon_resolution = 4, 7
    options = dict(SMALL_DEMO, snr=np.inf, tissue_voxels=True)
    paths = make_phantom_dataset(
        tmp_path,
        **options,
        tissue_resolution=resolution,
        axon_resolution=axon_resolution,
    )
    without_axons = make_phantom_dataset(
        tmp_path / "no_axons",
        **options,
        tissue_resolution=resolution,
        axon_voxels=False,
    )
    without = make_phantom_dataset(
        tmp_path / "without", **dict(options, tissue_voxels=False)
    )
    data = _load(paths["data"])
    assert data.shape == (3, 4, 1, N_VOLUMES)
    assert np.all(np.isfinite(data)) and np.all(data > 0)
    assert_array_equal(data[:, :2], _load(without["data"]))
    assert_array_equal(data[:, :3], _load(without_axons["data"]))
    assert_array_equal(_load(paths["mask"]), 1)
    with open(paths["truth_json"]) as f:
        truth = json.load(f)
    assert truth["shape"] == [3, 4, 1] and len(truth["voxels"]) == 6
    npz = np.load(paths["truth"])
    protocol = read_scheme(paths["scheme"])[0]
    decay = np.exp(-protocol.echo_times / truth["t2"])
    rows = (
        ("tissue_voxels", TISSUE_VOXELS, DEMO_PRIOR, resolution),
        ("axon_voxels", AXON_VOXELS, TissuePrior(), axon_resolution),
    )
    for key, entries, base, fine_resolution in rows:
        for (index, name, fields, seed), voxel in zip(entries, truth[key], strict=True):
            prior = replace(base, **fields)
            _, fine, described = prior.simulator(protocol).sample_pairs(
                1, reference_resolution=fine_resolution, seed=seed
            )
            assert_allclose(data[index], voxel["S0"] * decay * fine[0], rtol=1e-6)
            assert voxel["index"] == list(index) and voxel["name"] == name
            assert voxel["family"] == prior.families[0] == described["family"][0]
            assert voxel["prior"] == prior.description() and voxel["seed"] == seed
            assert voxel["resolution"] == fine_resolution
            for descriptor in DESCRIPTORS:
                assert_allclose(voxel[descriptor], described[descriptor][0])
            assert np.all(np.isnan(npz["permeability"][index]))
            assert not npz["labels"][index].any()
            assert npz["S0"][index] == voxel["S0"]
    # The axons are of the size their names say.
    for (_, _, fields, _), voxel in zip(AXON_VOXELS, truth["axon_voxels"], strict=True):
        low, high = fields["cell_diameter"]
        assert low <= voxel["cell_diameter"] <= high
    with pytest.raises(ValueError, match="axon_voxels=True needs tissue_voxels"):
        make_phantom_dataset(
            tmp_path / "bad", **dict(options, tissue_voxels=False), axon_voxels=True
        )


def test_phantom_dataset_says_its_posterior(tmp_path):
    """posterior.json (also truth.json's "posterior") is what the command's
    --posterior_options takes: DEMO_PRIOR, its closed box the dataset's
    grid, trained with DEMO_TRAINING; surface_check.json the same for the
    search's surface check: DEMO_SURFACE_PRIOR on the dataset's grid,
    without the grid error model."""
    paths = make_phantom_dataset(tmp_path, **SMALL_DEMO)
    with open(paths["posterior"]) as f:
        text = f.read()
    parsed = parse_posterior_options(text, 2e-3)
    assert parsed["prior"] == replace(DEMO_PRIOR, box_side=SMALL_DEMO["grid_size"])
    assert parsed["posterior_options"] == DEMO_TRAINING
    with open(paths["truth_json"]) as f:
        assert json.load(f)["posterior"] == json.loads(text)
    with open(paths["surface_check"]) as f:
        check = parse_posterior_options(f.read(), 2e-3)
    assert check["prior"] == replace(
        DEMO_SURFACE_PRIOR,
        box_side=SMALL_DEMO["grid_size"],
        resolution=SMALL_DEMO["grid_resolution"],
    )
    # The search's own noise model: no grid error.
    assert check["posterior_options"] == DEMO_SURFACE_TRAINING
    # The search takes it: the prior's box is the grid's.
    model = SpinverseModel(
        read_scheme(paths["scheme"])[0],
        grid=dict(
            size=SMALL_DEMO["grid_size"], resolution=SMALL_DEMO["grid_resolution"]
        ),
        sigma=0.01,
        **check,
    )
    assert model.surface_check


def test_workflow_on_demo_data(demo, tmp_path):
    flow = _run(demo, tmp_path, n_report=2)
    outputs = flow.last_generated_outputs
    for name in MAPS:
        image = nib.load(outputs[f"out_{name}"])
        assert image.shape == (3, 2, 1), name
        # What the map holds and its unit, in the header viewers show.
        assert image.header["descrip"].tobytes().strip(b"\0"), name
        assert_allclose(image.affine, nib.load(demo["data"]).affine)
    status = _load(outputs["out_status"])
    assert_array_equal(status, OK)
    assert _load(outputs["out_predicted"]).shape == (3, 2, 1, N_VOLUMES)
    # The per-face permeability is kept in the fit state, and written as an
    # image only when asked for (test_maps_keep_the_space_codes_of_the_input).
    assert not os.path.exists(outputs["out_permeability"])
    fit = load_fit(outputs["out_state"])
    assert fit.permeability.shape == (3, 2, 1, fit.model.grid.n_faces)
    assert_allclose(_load(outputs["out_predicted"]), fit.predict(), rtol=1e-5)
    # One surface in scanner coordinates, GIFTI and PLY; no per-voxel meshes
    # unless asked for.
    surface = load_mesh(outputs["out_mesh_gifti"])
    assert surface.n_triangles == load_mesh(outputs["out_mesh_ply"]).n_triangles > 0
    assert not os.path.exists(outputs["out_voxel_meshes"])
    assert os.path.getsize(outputs["out_report"]) > 1000
    assert fit.model.n_iterations == 2


def test_maps_keep_the_space_codes_of_the_input(demo, tmp_path):
    """A scanner's image (qform and sform codes 1, mm) gives maps with the
    same codes: nibabel's defaults (no qform, sform "aligned") would not."""
    source = nib.load(demo["data"])
    dwi = nib.Nifti1Image(np.asanyarray(source.dataobj), source.affine)
    dwi.set_qform(source.affine, code=1)
    dwi.set_sform(source.affine, code=1)
    dwi.header.set_xyzt_units("mm", "sec")
    scanner = tmp_path / "scanner.nii.gz"
    nib.save(dwi, scanner)
    outputs = _run(
        dict(demo, data=str(scanner)),
        tmp_path / "out",
        save_metrics=["status", "permeability", "predicted"],
    ).last_generated_outputs
    fit = load_fit(outputs["out_state"])
    assert_allclose(_load(outputs["out_permeability"]), fit.permeability, rtol=1e-6)
    for name in ("out_status", "out_permeability", "out_predicted"):
        header = nib.load(outputs[name]).header
        assert int(header["qform_code"]) == int(header["sform_code"]) == 1, name
        assert header.get_xyzt_units()[0] == "mm", name
        assert_allclose(nib.load(outputs[name]).affine, source.affine)


def test_command_line_with_camino_scheme(demo, tmp_path, monkeypatch):
    argv = [
        "dipy_fit_spinverse",
        demo["data"],
        demo["bvals"],
        demo["bvecs"],
        demo["mask"],
        "--scheme_file", demo["scheme"],
        "--grid_size", "12",
        "--grid_resolution", "2",
        "--max_iter", "2",
        "--preset", "paper",
        "--n_report", "0",
        "--dtype", "float32",
        "--out_dir", str(tmp_path),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    main()
    fit = load_fit(tmp_path / "spinverse_fit.npz")
    assert_array_equal(fit.status, OK)
    assert str(fit.model.dtype) == "torch.float32"
    assert not os.path.exists(tmp_path / "report.png")


def test_resume_finishes_a_partial_fit(demo, tmp_path):
    flow = _run(demo, tmp_path, n_report=0)
    state = flow.last_generated_outputs["out_state"]
    fit = load_fit(state)
    # The voxel's row among the voxels of the mask (a fit holds those only).
    row = (
        np.flatnonzero(fit.mask)
        .tolist()
        .index(np.ravel_multi_index((2, 1, 0), fit.shape))
    )
    fit.params["status"][row] = PENDING
    fit.params["permeability"][row] = np.nan
    save_fit(fit, state)
    _run(demo, tmp_path, n_report=0, resume=True)
    done = load_fit(state)
    assert_array_equal(done.status, OK)
    assert np.all(np.isfinite(done.permeability))
    assert_array_equal(_load(flow.last_generated_outputs["out_status"]), OK)
    # Other options: the command names the file and what to do on the command
    # line, not the Python API.
    with pytest.raises(ValueError, match="--resume: .* without --resume"):
        _run(demo, tmp_path, n_report=0, resume=True, max_iter=3)


def test_option_errors_are_reworded_in_the_flags():
    """The core names options as keywords (issue 73, item 4); the command
    rewords them: a setting as its flag and value, an option without a flag
    as written, and only the fixes a flag sets."""
    err = OptionError(
        "refine_mesh=True needs labels (search_steps=0); max_iter >= 2, not "
        "max_iter=1, in ['max_iter']",
        options=["refine_mesh", "max_iter", "search_steps"],
        fixes=[("preset", "default"), ("parametrisation", "cell")],
    )
    assert str(err).endswith("; e.g. preset='default' or parametrisation='cell'.")
    assert reword(err) == (
        "--refine_mesh needs labels (search_steps=0); --max_iter >= 2, not "
        "--max_iter 1, in ['--max_iter']; e.g. --preset default."
    )
    with pytest.raises(ValueError) as raised, in_flags():
        resolve_config("paper", sigma=0.02)
    assert not isinstance(raised.value, OptionError)
    assert "['--sigma/--snr'] have no effect" in str(raised.value)
    assert "noise='rician'" in str(raised.value.__cause__)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(timing_file=None), "from exactly one source"),
        (dict(big_delta=0.02), "from exactly one source"),
        (dict(timing_file=None, big_delta=0.02), "both --big_delta and --small_delta"),
        (dict(timing_file="BAD_ROWS"), "one 'small_delta big_delta' row per volume"),
        (dict(timing_file="MS"), "timing file .*t.txt: .*milliseconds"),
        (dict(timing_file=None, scheme_file="SHORT"), "acquisitions but the data"),
        (dict(timing_file=None, scheme_file="WRONG_B"), "disagree"),
        (
            dict(timing_file=None, scheme_file="no.scheme"),
            r"--scheme_file: no file matches 'no.scheme'",
        ),
        (dict(engine="spark"), "Invalid engine"),
        (dict(boundary="sticky"), "Invalid --boundary"),
        (dict(sigma=-0.02), "--sigma must be a finite number >= 0"),
        (dict(timing_file=None, scheme_file="TURNED"), "direction differs"),
        (dict(n_report=-1), "n_report must be an integer >= 0"),
        (dict(n_jobs=4), "n_jobs=4 is for the parallel engines"),
        (dict(b0_threshold=-5), "b0_threshold must be"),
        (dict(bvals="MS_UM2"), "the b-values file .*b.bval.* multiply"),
        # The label search's outputs and options, with a preset without it.
        # (checked by the inversion itself, its message in flag names)
        (
            dict(search_bootstrap=2),
            r"\['--search_bootstrap'\] have no effect.*"
            "label search is off",
        ),
        (dict(search_proposal=4000), r"\['--search_proposal'\] have no effect"),
        (dict(sigma=0.02), r"\['--sigma/--snr'\] have no effect.*--preset default"),
        (dict(max_iter=0), "--max_iter must be an integer >= 1"),
        (dict(bvecs_tol=-1), "bvecs_tol must be"),
        (dict(save_metrics=["uncertainty"]), "--save_metrics uncertainty comes"),
        (
            dict(preset="default", posterior_options='{"training": {"epochs": 5}}'),
            'pass --fit_method posterior, or with --fit_method search a "prior" in',
        ),
        (
            dict(preset="default", posterior_options='{"prior": {}}'),
            r"surface check needs the noise level: pass --sigma/--snr \(--sigma: in",
        ),
        (dict(bvecs="LONG"), r"b.bvec: \d+ diffusion-weighted .* Renormalise"),
        (dict(bvecs="B0_ABOVE", b0_threshold=0), "raise --b0_threshold above it"),
    ],
)
def test_workflow_bad_input(demo, tmp_path, kwargs, match):
    if kwargs.get("bvecs") in ("LONG", "B0_ABOVE"):
        bvecs = np.loadtxt(demo["bvecs"])
        bvals = np.loadtxt(demo["bvals"])
        if kwargs["bvecs"] == "LONG":  # 5 % too long
            bvecs = bvecs * 1.05
        else:  # b = 0 volumes stored as b = 5 with zero vectors
            bvals = np.where(bvals == 0, 5.0, bvals)
            np.savetxt(tmp_path / "b.bval", bvals[None])
            kwargs["bvals"] = str(tmp_path / "b.bval")
        np.savetxt(tmp_path / "b.bvec", bvecs)
        kwargs["bvecs"] = str(tmp_path / "b.bvec")
    if kwargs.get("bvals") == "MS_UM2":  # b-values in ms/um^2
        np.savetxt(tmp_path / "b.bval", np.loadtxt(demo["bvals"])[None] / 1000)
        kwargs["bvals"] = str(tmp_path / "b.bval")
    if kwargs.get("scheme_file") == "TURNED":
        # The scheme's directions permuted: its b-values still match the
        # .bval file, its directions not the .bvec file's.
        protocol = read_scheme(demo["scheme"])[0]
        turned = Protocol(
            waveforms=protocol.waveforms,
            bvals=protocol.bvals,
            bvecs=protocol.bvecs[:, [2, 0, 1]],
        )
        write_scheme(turned, tmp_path / "s.scheme")
        kwargs["scheme_file"] = str(tmp_path / "s.scheme")
    if kwargs.get("timing_file") == "BAD_ROWS":
        np.savetxt(tmp_path / "t.txt", np.full((N_VOLUMES - 1, 2), 0.01))
        kwargs["timing_file"] = str(tmp_path / "t.txt")
    if kwargs.get("timing_file") == "MS":  # the demo's timing in milliseconds
        np.savetxt(tmp_path / "t.txt", np.loadtxt(demo["timing"]) * 1000)
        kwargs["timing_file"] = str(tmp_path / "t.txt")
    if kwargs.get("scheme_file") in ("SHORT", "WRONG_B"):
        protocol = read_scheme(demo["scheme"])[0]
        if kwargs["scheme_file"] == "SHORT":
            protocol = protocol[:-1]
        else:
            protocol = Protocol(
                waveforms=protocol.waveforms,
                bvals=protocol.bvals * 1.2,
                bvecs=protocol.bvecs,
            )
        write_scheme(protocol, tmp_path / "s.scheme")
        kwargs["scheme_file"] = str(tmp_path / "s.scheme")
    with pytest.raises(ValueError, match=match):
        _run(demo, tmp_path / "out", **kwargs)


@pytest.mark.parametrize(
    "image, match",
    [
        ("NAN_MASK", "NaN or inf"),
        ("FRACTION_MASK", "fractions"),
        ("EMPTY_MASK", "selects no voxel"),
        ("DWI_3D", "must be 4-D"),
        ("DWI_5D", "must be 4-D.* without the axis of length 1 after x, y, z"),
        ("SHORT_BVEC", "cannot read the gradient files"),
        ("4D_MASK", r"mask file .*mask.nii.gz has shape \(3, 2, 1, 1\)"),
    ],
)
def test_workflow_bad_files(demo, tmp_path, image, match):
    """Masks that are not masks, images that are not 4-D and gradient files
    of different lengths are refused naming the file."""
    data, mask = demo["data"], demo["mask"]
    bvecs = demo["bvecs"]
    reference = nib.load(data)
    values = np.ones(reference.shape[:3])
    if image.endswith("_MASK"):
        values[0, 0, 0] = dict(
            NAN_MASK=np.nan, FRACTION_MASK=0.3, EMPTY_MASK=0, **{"4D_MASK": 1}
        )[image]
        if image == "EMPTY_MASK":
            values[:] = 0
        if image == "4D_MASK":
            values = values[..., None]
        mask = str(tmp_path / "mask.nii.gz")
        nib.save(nib.Nifti1Image(values.astype(np.float32), reference.affine), mask)
    elif image.startswith("DWI"):
        dwi = reference.get_fdata()
        dwi = dwi[..., 0] if image == "DWI_3D" else dwi[..., None, :]
        data = str(tmp_path / "dwi.nii.gz")
        nib.save(nib.Nifti1Image(dwi, reference.affine), data)
    else:
        np.savetxt(tmp_path / "b.bvec", np.loadtxt(bvecs)[:, :-1])
        bvecs = str(tmp_path / "b.bvec")
    with pytest.raises(ValueError, match=match):
        SpinverseFlow(force=True).run(
            data, demo["bvals"], bvecs, mask,
            timing_file=demo["timing"], out_dir=str(tmp_path / "out"),
        )  # fmt: skip


def _command_exit(monkeypatch, capsys, argv):
    """Run ``dipy_fit_spinverse`` with ``argv``; its exit status and stderr."""
    monkeypatch.setattr(sys, "argv", ["dipy_fit_spinverse", *argv])
    with pytest.raises(SystemExit) as stop:
        main()
    return stop.value.code, capsys.readouterr().err


def test_a_user_error_ends_the_command_without_a_traceback(
    demo, tmp_path, monkeypatch, capsys
):
    argv = [demo["data"], demo["bvals"], demo["bvecs"], demo["mask"],
            "--out_dir", str(tmp_path)]  # fmt: skip
    code, err = _command_exit(monkeypatch, capsys, argv)
    assert code == 2
    assert "dipy_fit_spinverse: error: the gradient timing is needed" in err
    assert "Traceback" not in err


def test_ctrl_c_ends_the_command_in_one_line(demo, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the fit: no traceback, the exit status a shell gives an
    interrupt (130), and where the finished voxels are."""
    argv = [demo["data"], demo["bvals"], demo["bvecs"], demo["mask"],
            "--timing_file", demo["timing"], "--grid_size",
            str(SMALL_DEMO["grid_size"]), "--grid_resolution",
            str(SMALL_DEMO["grid_resolution"]), "--out_dir", str(tmp_path)]  # fmt: skip

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SpinverseSearchModel, "fit", interrupted)
    code, err = _command_exit(monkeypatch, capsys, argv)
    assert code == 130
    # The checkpoint file itself is named, not a pattern.
    checkpoint = os.path.join(str(tmp_path), "spinverse_fit.partial.h5")
    assert f"interrupted; the voxels fitted so far are kept in {checkpoint};" in err
    assert "run the same command again to continue" in err
    assert "Traceback" not in err


def test_timing_file_mistakes_name_the_volumes_and_the_fix(demo, tmp_path):
    """b = 0 rows of a converter's 0 0 name their volumes; a single row for
    one diffusion time names the options that take it."""
    bvals = np.loadtxt(demo["bvals"])
    timing = np.loadtxt(demo["timing"])
    timing[bvals == 0] = 0.0
    zeros = tmp_path / "zeros.txt"
    np.savetxt(zeros, timing)
    b0 = ", ".join(str(i) for i in np.flatnonzero(bvals == 0))
    with pytest.raises(
        ValueError, match=rf"volume\(s\) {b0}: .*got 0\.0\b.*b = 0 ones included"
    ):
        read_timing(zeros, n_volumes=N_VOLUMES)
    one = tmp_path / "one.txt"
    np.savetxt(one, [[0.01, 0.06]])
    # The option's name as the argument; the command's flag (issue 83).
    with pytest.raises(ValueError, match="give small_delta and big_delta inst"):
        read_timing(one, n_volumes=N_VOLUMES)
    with pytest.raises(ValueError) as err, in_flags():
        read_timing(one, n_volumes=N_VOLUMES)
    # The file's row format is text of the file, not flags.
    assert "one 'small_delta big_delta' row per volume" in str(err.value)
    assert "give --small_delta and --big_delta instead" in str(err.value)


@pytest.mark.parametrize("mistake", ["missing data", "not an image", "out_dir a file"])
def test_file_mistakes_end_the_command_without_a_traceback(
    demo, tmp_path, monkeypatch, capsys, mistake
):
    data, out_dir = demo["data"], str(tmp_path / "out")
    if mistake == "missing data":
        data = str(tmp_path / "nowhere.nii.gz")
    elif mistake == "not an image":
        data = str(tmp_path / "text.nii.gz")
        (tmp_path / "text.nii.gz").write_text("not an image")
    else:
        out_dir = str(tmp_path / "a file")
        (tmp_path / "a file").write_text("")
    argv = [data, demo["bvals"], demo["bvecs"], demo["mask"],
            "--timing_file", demo["timing"], "--out_dir", out_dir]  # fmt: skip
    code, err = _command_exit(monkeypatch, capsys, argv)
    assert code == 2
    assert "dipy_fit_spinverse: error:" in err and "Traceback" not in err
    if mistake == "out_dir a file":
        # Refused before any voxel is fitted.
        assert "give a writable --out_dir" in err


def test_unreadable_bvals_name_the_file(demo, tmp_path):
    (tmp_path / "b.bval").write_text("0 a 1000")
    with pytest.raises(ValueError, match="cannot read the gradient files .*b.bval"):
        SpinverseFlow(force=True).run(
            demo["data"], str(tmp_path / "b.bval"), demo["bvecs"], demo["mask"],
            timing_file=demo["timing"], out_dir=str(tmp_path / "out"),
        )  # fmt: skip


def test_a_rerun_removes_the_outputs_it_does_not_write(demo, tmp_path):
    """--force with fewer --save_metrics (and no report): the earlier run's
    other maps would describe another fit; they are removed."""
    first = _run(demo, tmp_path, n_report=1).last_generated_outputs
    assert os.path.isfile(first["out_residual"])
    second = _run(demo, tmp_path, n_report=0, save_metrics=["status"])
    outputs = second.last_generated_outputs
    assert os.path.isfile(outputs["out_status"])
    assert os.path.isfile(outputs["out_state"])
    for name in ("out_residual", "out_s0", "out_predicted", "out_report",
                 "out_mesh_gifti"):  # fmt: skip
        assert not os.path.exists(outputs[name]), name


def test_bval_count_mismatch(demo, tmp_path):
    bvals = np.loadtxt(demo["bvals"])[:-1]
    np.savetxt(tmp_path / "b.bval", bvals[None])
    bvecs = np.loadtxt(demo["bvecs"])[:, :-1]
    np.savetxt(tmp_path / "b.bvec", bvecs)
    flow = SpinverseFlow(force=True)
    with pytest.raises(ValueError, match="b-values but the data have"):
        flow.run(
            demo["data"],
            str(tmp_path / "b.bval"),
            str(tmp_path / "b.bvec"),
            demo["mask"],
            timing_file=demo["timing"],
            out_dir=str(tmp_path),
        )


def test_rerun_fits_again_after_an_unfinished_run(demo, tmp_path):
    # What a run that failed after the fit leaves: outputs but no fit state
    # (written last). DIPY alone would skip the rerun, since outputs exist.
    for name in ("restricted_fraction.nii.gz", "status.nii.gz", "s0.nii.gz"):
        (tmp_path / name).write_bytes(b"left by a failed run")
    inputs = (demo["data"], demo["bvals"], demo["bvecs"], demo["mask"])
    options = dict(
        timing_file=demo["timing"],
        grid_size=SMALL_DEMO["grid_size"],
        grid_resolution=SMALL_DEMO["grid_resolution"],
        max_iter=2,
        preset="paper",
        n_report=0,
        out_dir=str(tmp_path),
    )
    flow = SpinverseFlow()  # no --force, as a user's rerun
    flow.run(*inputs, **options)
    outputs = flow.last_generated_outputs
    for name in MAPS:
        assert nib.load(outputs[f"out_{name}"]).shape == (3, 2, 1), name
    assert_array_equal(_load(outputs["out_status"]), OK)
    assert_array_equal(load_fit(outputs["out_state"]).status, OK)
    assert not os.path.exists(tmp_path / "spinverse_fit.partial.h5")
    # A finished run is skipped, as DIPY does without --force.
    finished = os.stat(outputs["out_state"]).st_mtime_ns
    SpinverseFlow().run(*inputs, **options)
    assert os.stat(outputs["out_state"]).st_mtime_ns == finished


def test_one_diffusion_time_from_the_command_line_options(demo, tmp_path):
    """--big_delta/--small_delta: one timing for every volume, one sequence."""
    flow = _run(
        demo, tmp_path, timing_file=None, big_delta=0.06, small_delta=0.01,
        n_report=0,
    )  # fmt: skip
    fit = load_fit(flow.last_generated_outputs["out_state"])
    # One diffusion time cannot determine the membranes: flagged, kept.
    assert_array_equal(fit.status, UNDERDETERMINED)
    assert np.isfinite(fit.restricted_fraction).all()
    assert len(fit.model.sequences) == 1


def test_version_and_citation(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dipy_fit_spinverse", "--version"])
    assert main() == 0
    assert capsys.readouterr().out.startswith("dipy_spinverse 0.")
    monkeypatch.setattr(sys, "argv", ["dipy_fit_spinverse", "--help"])
    with pytest.raises(SystemExit):
        main()
    assert "Spinverse: Differentiable" in capsys.readouterr().out


def test_rerunning_an_interrupted_command_continues_it(demo, tmp_path, monkeypatch):
    import dipy_spinverse.reconst.runner as runner

    real = runner.fit_voxels
    fitted = []

    def interrupted(model, chunk, **kwargs):
        if len(fitted) == 2:
            raise KeyboardInterrupt
        fitted.append(len(chunk))
        return real(model, chunk, **kwargs)

    monkeypatch.setattr(runner, "fit_voxels", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(demo, tmp_path, n_report=0, batch_size=2)
    store = tmp_path / "spinverse_fit.partial.h5"
    assert load_fit(store).n_pending == 2  # 2 chunks of 2 of the 6 voxels kept
    fitted.clear()

    def counted(model, chunk, **kwargs):
        fitted.append(len(chunk))
        return real(model, chunk, **kwargs)

    monkeypatch.setattr(runner, "fit_voxels", counted)
    flow = _run(demo, tmp_path, n_report=0, batch_size=2)  # the same command
    assert fitted == [2]  # only the chunk left
    assert_array_equal(load_fit(flow.last_generated_outputs["out_state"]).status, OK)
    assert not store.exists()
    # Other settings: the store cannot be continued; a new fit, with a warning.
    monkeypatch.setattr(runner, "fit_voxels", interrupted)
    fitted.clear()
    with pytest.raises(KeyboardInterrupt):
        _run(demo, tmp_path, n_report=0, batch_size=2)
    fitted.clear()
    monkeypatch.setattr(runner, "fit_voxels", counted)
    _run(demo, tmp_path, n_report=0, batch_size=2, max_iter=3)
    assert fitted == [2, 2, 2]


def test_refine_mesh_from_the_command_line(demo, tmp_path, monkeypatch):
    """--refine_mesh writes the smooth mesh maps and surfaces (one voxel)."""
    reference = nib.load(demo["mask"])
    one = np.zeros(reference.shape, np.uint8)
    one[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(one, reference.affine), tmp_path / "one.nii.gz")
    argv = [
        "dipy_fit_spinverse",
        demo["data"],
        demo["bvals"],
        demo["bvecs"],
        str(tmp_path / "one.nii.gz"),
        "--timing_file", demo["timing"],
        "--grid_size", "12",
        "--grid_resolution", "2",
        "--max_iter", "2",
        "--preset", "default",
        "--n_report", "0",
        "--refine_mesh",
        "--mesh_options",
        '{"resolution": 2, "n_modes": 1, "max_iter": 3, "surface_iter": 20}',
        "--smooth_mesh_format", "ply",
        "--out_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    main()
    out = tmp_path / "out"
    fit = load_fit(out / "spinverse_fit.npz")
    assert fit.model.refine_mesh and fit.model.mesh_options["n_modes"] == 1
    volume, radius, ratio = (
        _load(out / f"{name}.nii.gz")
        for name in ("mesh_volume", "mesh_radius", "mesh_surface_to_volume")
    )
    assert volume.shape == (3, 2, 1)
    # Outside the mask the maps are 0; inside, the saved fit's own measures.
    assert_array_equal(volume[one == 0], 0)
    assert_allclose(volume, fit.mesh_volume, rtol=1e-6)
    # A ball template: the radius is that of the ball of the same volume, and
    # a polyhedral ball's area is above the sphere's, S/V >= 3 / r (within
    # 15% at resolution 2).
    assert volume[0, 0, 0] > 0
    assert radius[0, 0, 0] == pytest.approx(
        (3 * volume[0, 0, 0] / (4 * np.pi)) ** (1 / 3), rel=1e-5
    )
    assert 1.0 <= ratio[0, 0, 0] * radius[0, 0, 0] / 3 < 1.15
    # The cell fits in the 12 um box, about the label's volume (the label
    # search's restricted fraction of the box, within a factor 2: a 3
    # iteration refinement).
    label_volume = _load(out / "restricted_fraction.nii.gz")[0, 0, 0] * 12.0**3
    assert 0.5 < volume[0, 0, 0] / label_volume < 2.0
    assert os.listdir(out / "smooth_meshes") == ["voxel_0_0_0.ply"]
    surface = load_mesh(out / "smooth_meshes" / "voxel_0_0_0.ply")
    assert surface.n_triangles == len(fit.mesh_faces)
    assert np.all((surface.vertices > -1) & (surface.vertices < 13))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mesh_options='{"modes": 3}'), "--mesh_options: unknown mesh_options"),
        (dict(mesh_options='{"resolution": 1}'), "--mesh_options: .*resolution"),
        (dict(mesh_options="n_modes=3"), "--mesh_options must be a JSON object"),
        (dict(mesh_options="[3]"), "--mesh_options must be a JSON object"),
        (dict(mesh_options='{"n_modes": 3}', refine_mesh=False), "add --refine_mesh"),
        (dict(smooth_mesh_format="stl"), "Invalid --smooth_mesh_format"),
        (dict(preset="paper"), "--refine_mesh starts each mesh .*--preset default"),
    ],
)
def test_refine_mesh_bad_options(demo, tmp_path, kwargs, match):
    kwargs = dict(dict(refine_mesh=True, preset="default"), **kwargs)
    with pytest.raises(ValueError, match=match):
        _run(demo, tmp_path, **kwargs)


def test_uncertainty_map_with_bootstrap_from_the_command_line(demo, tmp_path):
    """The label search's uncertainty is written as a map; --search_bootstrap
    reaches the model (one voxel, a short search)."""
    reference = nib.load(demo["mask"])
    one = np.zeros(reference.shape, np.uint8)
    one[1, 0, 0] = 1
    nib.save(nib.Nifti1Image(one, reference.affine), tmp_path / "one.nii.gz")
    demo = dict(demo, mask=str(tmp_path / "one.nii.gz"))
    flow = _run(demo, tmp_path / "out", preset="default", search_bootstrap=1)
    outputs = flow.last_generated_outputs
    fit = load_fit(outputs["out_state"])
    assert fit.model.config.search.bootstrap == 1
    uncertainty = _load(outputs["out_uncertainty"])
    assert uncertainty.shape == (3, 2, 1)
    assert_allclose(uncertainty[1, 0, 0], fit.uncertainty[1, 0, 0], rtol=1e-6)
    assert 0 <= uncertainty[1, 0, 0] <= 1
    # A face-fit-only run writes no uncertainty map, and removes this one.
    _run(demo, tmp_path / "out")
    assert not os.path.exists(outputs["out_uncertainty"])


def test_search_proposal_reaches_the_model(demo, tmp_path, monkeypatch):
    """--search_proposal N is the model's configuration's search_proposal
    (training a proposal is measured elsewhere: tests/test_proposal.py)."""
    import dipy_spinverse.workflows.spinverse as workflows

    seen = {}

    class Stop(Exception):
        pass

    def model(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(workflows, "SpinverseModel", model)
    with pytest.raises(Stop):
        _run(demo, tmp_path, preset="default", search_proposal=64)
    assert seen["preset"].search.proposal == 64


def test_mesh_options_help_names_every_key():
    from dipy_spinverse.meshfit.refine import REFINE_DEFAULTS

    help_text = " ".join(SpinverseFlow.run.__doc__.split("mesh_options :")[1].split())
    keys = help_text.split("(keys:")[1].split(")")[0]
    assert {k.strip(" ;") for k in keys.split(",")} == set(REFINE_DEFAULTS)


def test_a_mask_of_another_space_is_named(demo, tmp_path, caplog):
    """A mask whose affine is not the data's (another session or space) is
    used voxel for voxel, with a warning naming it."""
    reference = nib.load(demo["data"])
    moved = reference.affine.copy()
    moved[:3, 3] += 30.0
    mask = str(tmp_path / "mask.nii.gz")
    nib.save(nib.Nifti1Image(np.ones(reference.shape[:3], np.uint8), moved), mask)
    with caplog.at_level("WARNING"):
        SpinverseFlow(force=True).run(
            demo["data"], demo["bvals"], demo["bvecs"], mask,
            timing_file=demo["timing"], out_dir=str(tmp_path / "out"),
            preset="paper", max_iter=2, **{k: SMALL_DEMO[k] for k in ("grid_size",
            "grid_resolution")},
        )  # fmt: skip
    assert "has another affine than" in caplog.text and "30 mm" in caplog.text


def test_workflow_memory_grows_with_the_mask_not_the_volume(demo, tmp_path):
    """The six demo voxels in a 96 x 96 x 64 volume (14 volumes: 33 MB as
    float32, 66 MB as float64): the default outputs are written without
    loading the data whole or building any 4-D volume. The peak traced numpy
    and Python memory (tracemalloc; torch's own buffers are not traced)
    exceeds that of the same voxels in their own 3 x 2 x 1 volume by less
    than the data as float32: what grows with the volume is a few 3-D maps
    at a time (4.7 MB each as float64; 13 MB measured in all), where loading
    the data (66 MB as float64) or predicting the 4-D signal (66 MB) would
    exceed it. ``benchmarks/workflow_memory.py`` measures the resident
    memory of the command on an HCP-sized volume."""
    import tracemalloc

    source = nib.load(demo["data"])
    shape = (96, 96, 64)
    data = np.zeros(shape + (N_VOLUMES,), np.float32)
    mask = np.zeros(shape, np.uint8)
    places = [(3, 4, 5), (90, 10, 60), (50, 50, 30), (0, 95, 0), (7, 7, 7), (95, 0, 63)]
    rows = np.asanyarray(source.dataobj).reshape(-1, N_VOLUMES)
    for place, row in zip(places, rows, strict=True):
        data[place] = row
        mask[place] = 1
    nib.save(nib.Nifti1Image(data, source.affine), tmp_path / "big.nii.gz")
    nib.save(nib.Nifti1Image(mask, source.affine), tmp_path / "mask.nii.gz")
    del data
    big = dict(
        demo, data=str(tmp_path / "big.nii.gz"), mask=str(tmp_path / "mask.nii.gz")
    )
    peaks = []
    tracemalloc.start()
    # The small volume first: the modules the run imports count there too.
    for dataset, out in ((demo, "small"), (big, "big")):
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        outputs = _run(dataset, tmp_path / out, n_report=1).last_generated_outputs
        peaks.append(tracemalloc.get_traced_memory()[1] - base)
    tracemalloc.stop()
    volume_bytes = np.prod(shape) * N_VOLUMES * 4
    assert peaks[1] - peaks[0] < volume_bytes, (peaks, volume_bytes)
    predicted = nib.load(outputs["out_predicted"])
    assert predicted.shape == shape + (N_VOLUMES,)
    fit = load_fit(outputs["out_state"])
    assert_array_equal(fit.status[mask.astype(bool)], OK)
    for place in places:
        assert_allclose(
            np.asarray(predicted.dataobj[place]), fit[place].predict(), rtol=1e-5
        )
    assert_array_equal(np.asarray(predicted.dataobj[1, 1, 1]), 0.0)


def test_workflow_posterior_writes_maps_with_units(demo, tmp_path):
    """--fit_method posterior: the median and interval maps (units in each
    header), the status map, the report; a tiny prior trained into a
    temporary cache (DIPY_SPINVERSE_CACHE)."""
    options = json.dumps(
        {
            "prior": {
                "resolution": 2,
                "cell_diameter": [8, 25],
                "n_cells": [1, 2],
                "families": ["packed", "fibre"],
                "min_spacings": 1,
            },
            "training": {
                "n_simulations": 64,
                "epochs": 3,
                "hidden": 16,
                "embedding": 8,
                "transforms": 1,
                "batch_size": 16,
                "n_calibration": 16,
            },
            "n_samples": 50,
        }
    )
    # The options from a file (as the demo writes them).
    options_file = tmp_path / "posterior.json"
    options_file.write_text(options)

    def posterior(n_report):
        os.environ["DIPY_SPINVERSE_CACHE"] = str(tmp_path / "cache")
        try:
            return _run(
                demo,
                tmp_path / "out",
                fit_method="posterior",
                max_iter=None,
                snr=100,
                posterior_options=str(options_file),
                n_report=n_report,
            )
        finally:
            del os.environ["DIPY_SPINVERSE_CACHE"]

    outputs = posterior(n_report=3).last_generated_outputs
    folder = outputs["out_posterior"]
    median = nib.load(os.path.join(folder, "cell_diameter.nii.gz"))
    assert median.shape == (3, 2, 1)
    assert b"(um)" in median.header["descrip"].tobytes()
    bounds = _load(os.path.join(folder, "cell_diameter_ci90.nii.gz"))
    assert bounds.shape == (3, 2, 1, 2)
    values = np.asanyarray(median.dataobj)
    status = _load(outputs["out_status"])
    ok = status == 0
    assert np.all(bounds[ok][:, 0] <= values[ok]) and np.all(
        values[ok] <= bounds[ok][:, 1]
    )
    assert _load(os.path.join(folder, "orientation.nii.gz")).shape == (3, 2, 1, 3)
    assert os.path.getsize(outputs["out_report"]) > 1000
    state = np.load(outputs["out_state"])
    assert state["status"].shape == (6,)
    # The state is a fit file: load_fit reads it, as --help promises.
    loaded = load_fit(outputs["out_state"])
    assert_array_equal(loaded.status, status)
    assert_allclose(loaded.cell_diameter, values, rtol=1e-6)
    # One folder, one fit (probe cases 2 and 3 of issue 73): the label
    # search forced into it removes the posterior's maps; the posterior
    # forced back, without a report, removes the search's maps and report.
    search = _run(demo, tmp_path / "out").last_generated_outputs
    assert os.path.isfile(search["out_restricted_fraction"])
    assert not os.path.exists(os.path.join(folder, "cell_diameter.nii.gz"))
    posterior(n_report=0)
    assert os.path.isfile(os.path.join(folder, "cell_diameter.nii.gz"))
    for left in ("out_restricted_fraction", "out_predicted", "out_report"):
        assert not os.path.exists(search[left]), left
    with pytest.raises(ValueError, match="needs the noise"):
        _run(demo, tmp_path / "again", fit_method="posterior", max_iter=None)
    for bad, match in (
        (dict(posterior_options="{prior"), "not valid JSON"),
        (
            dict(posterior_options=str(tmp_path / "missing.json")),
            "neither a JSON object nor a readable",
        ),
        # The label search's options with the posterior: refused, not ignored.
        (
            dict(search_bootstrap=2),
            r"\['--search_bootstrap'\] are not options of --fit_method posterior",
        ),
    ):
        with pytest.raises(ValueError, match=match):
            _run(
                demo,
                tmp_path / "again",
                fit_method="posterior",
                max_iter=None,
                snr=100,
                **bad,
            )


def test_a_nan_in_the_timing_file_names_its_volumes(tmp_path):
    """A NaN row named an empty list of volumes."""
    timing = np.tile([0.01, 0.03], (6, 1))
    timing[2, 1] = np.nan
    timing[4, 0] = np.nan
    path = tmp_path / "timing.txt"
    np.savetxt(path, timing)
    with pytest.raises(ValueError, match=r"volume\(s\) 2, 4 \(rows, from 0\)"):
        read_timing(path, n_volumes=6)


def test_one_timing_for_b0_levels_of_several_acquisitions_warns(tmp_path, caplog):
    """b = 0 volumes at two levels (2x) fitted with one timing: a warning
    names the groups and timing_file (the command: --timing_file); one
    level: no warning."""
    from dipy_spinverse.io.gradients import read_gradients

    bvals = np.array([0, 1000, 1000, 0, 2000, 2000, 0, 1000])
    bvecs = np.zeros((len(bvals), 3))
    bvecs[bvals > 0] = [1.0, 0.0, 0.0]
    np.savetxt(tmp_path / "b.bval", bvals[None])
    np.savetxt(tmp_path / "b.bvec", bvecs.T)
    rng = np.random.default_rng(0)
    data = rng.normal(1000.0, 30.0, (50, len(bvals)))
    options = dict(
        n_volumes=len(bvals),
        big_delta=0.03,
        small_delta=0.01,
        timing_file=None,
        scheme_file=None,
        b0_threshold=50.0,
        bvecs_tol=0.01,
    )
    files = (tmp_path / "b.bval", tmp_path / "b.bvec")
    with caplog.at_level("WARNING"):
        read_gradients(*files, data=data, **options)
    assert "b = 0 volumes fall into groups" not in caplog.text
    data[:, 6] *= 0.5  # a second echo time
    with caplog.at_level("WARNING"):
        read_gradients(*files, data=data, **options)
    assert "volume(s) 6 at a median" in caplog.text
    assert "volume(s) 0, 3 at" in caplog.text and "with timing_file (" in caplog.text
    assert "--" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"), in_flags():
        read_gradients(*files, data=data, **options)
    assert "one timing (--big_delta, --small_delta) is given" in caplog.text
    assert "with --timing_file (one 'small_delta big_delta' row" in caplog.text


def test_noise_options_take_dipys_meaning(demo):
    """--sigma is in the data's units (as in DIPY's workflows) and is divided
    by the mask's median b=0 signal; --snr is 1/that; --sigma auto is the
    median of DIPY's estimate_sigma over the volumes (64 of the demo's 99,
    evenly spread), not the b=0 volumes alone (whose anatomy it reads as
    noise)."""
    from dipy.core.gradients import gradient_table
    from dipy.denoise.noise_estimate import estimate_sigma
    from dipy.io.gradients import read_bvals_bvecs

    from dipy_spinverse.files import read_voxels

    image = nib.load(demo["data"])
    mask = _load(demo["mask"]).astype(bool)
    data = read_voxels(image, mask)
    bvals, bvecs = read_bvals_bvecs(demo["bvals"], demo["bvecs"])
    table = gradient_table(bvals, bvecs=bvecs)
    s0 = np.median(data[:, table.b0s_mask].mean(-1))
    assert s0 > 100  # the demo is in scanner-like units, not normalised
    noise = parse_noise("15", None)
    assert noise == ("sigma", 15.0)
    # One convention, DIPY's: sigma in the data's units, --snr of the median
    # b=0 signal of the mask.
    assert noise_sigma(noise, image, data, table) == 15.0
    snr = noise_sigma(parse_noise(None, 50), image, data, table)
    assert snr == pytest.approx(s0 / 50)
    assert noise_sigma(None, image, data, table) == 0.0
    auto = noise_sigma(parse_noise("auto", None), image, data, table)
    volumes = np.unique(np.linspace(0, len(bvals) - 1, 64).round()).astype(int)
    expected = np.median(
        [estimate_sigma(np.asarray(image.dataobj[..., i], np.float32)) for i in volumes]
    )
    assert auto == pytest.approx(expected, rel=1e-6)
    assert parse_noise(None, None) is None
    assert parse_noise("0", None) is None
    with pytest.raises(ValueError, match="not both"):
        parse_noise("15", 50)
    with pytest.raises(ValueError, match="'auto'"):
        parse_noise("loud", None)
    with pytest.raises(ValueError, match="not below the median b=0 signal"):
        noise_sigma(("sigma", 10 * s0), image, data, table)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_workflow_posterior_takes_the_device_flag(demo, tmp_path):
    """--device reaches --fit_method posterior (it was ignored): cuda on a
    machine without one is refused in words, before any training."""
    with pytest.raises(ValueError, match="no CUDA device is available here"):
        _run(
            demo,
            tmp_path / "out",
            fit_method="posterior",
            max_iter=None,
            snr=100,
            device="cuda",
        )


def test_workflow_posterior_takes_the_cluster_flags(demo, tmp_path):
    """--engine and --address reach --fit_method posterior: the training's
    simulations run on that cluster (they were ignored); joblib and --n_jobs,
    a label search's, are refused in words, before any training."""
    from dipy_spinverse.workflows.flags import _training_cluster

    args = dict(engine="ray", address="auto", n_jobs=None)
    assert _training_cluster(args) == dict(
        training_engine="ray", training_address="auto"
    )
    with pytest.raises(ValueError, match="--engine joblib spreads"):
        _run(
            demo,
            tmp_path / "a",
            fit_method="posterior",
            max_iter=None,
            snr=100,
            engine="joblib",
        )
    with pytest.raises(ValueError, match="--n_jobs sizes"):
        _run(
            demo,
            tmp_path / "b",
            fit_method="posterior",
            max_iter=None,
            snr=100,
            engine="dask",
            n_jobs=2,
        )


@pytest.mark.parametrize("flag", ["snr", "sigma"])
def test_a_zero_noise_flag_is_named_as_unknown(demo, tmp_path, flag):
    """--snr 0 (or --sigma 0) means unknown: the posterior's refusal says
    so, instead of asking for the flag that was given (probe case 11 of
    issue 73)."""
    with pytest.raises(ValueError, match=rf"\(--{flag} 0 means unknown\): pass"):
        _run(demo, tmp_path / "o", fit_method="posterior", max_iter=None, **{flag: 0})
