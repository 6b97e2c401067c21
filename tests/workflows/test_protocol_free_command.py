"""``dipy_fit_spinverse --fit_method protocol_free`` (issue 83, item 1).

A dataset of six voxels of the default prior's tissue on a protocol of the
protocol-free estimator's design (two timings, two shells of 7 directions:
30 volumes), at SNR 50. The prior's simulations on this protocol (the
``OUT_OF_PRIOR`` test's predictive region) are made once, in a cache
folder shared by the session's tests.
"""

import os
import sys

import nibabel as nib
import numpy as np
import pytest
from numpy.testing import assert_array_equal

import dipy_spinverse.reconst.protocol_free_model as free
from dipy_spinverse.data import make_phantom_dataset
from dipy_spinverse.io.checkpoint import Checkpoint
from dipy_spinverse.io.fits import load_fit
from dipy_spinverse.io.gradients import read_gradients
from dipy_spinverse.posterior import TissuePrior
from dipy_spinverse.posterior.protocol_free import FREE_SCALARS
from dipy_spinverse.reconst import OK, PENDING, ProtocolFreeFit, SpinverseModel
from dipy_spinverse.workflows.spinverse import SpinverseFlow, main

S0, SIGMA = 300.0, 6.0
#: The dataset's protocol: within the estimator's design (at least 6
#: directions a shell, 30 volumes), small enough that the prior's 200
#: simulations on it take seconds.
PROTOCOL = dict(
    timings=((0.010, 0.020), (0.010, 0.060)),
    bvals=(1000.0, 2500.0),
    n_directions=7,
    n_b0=1,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The files of the dataset: the phantom dataset's gradients and mask,
    its voxels replaced by draws of the default prior (Rician noise)."""
    folder = tmp_path_factory.mktemp("free")
    paths = make_phantom_dataset(
        folder, grid_size=12.0, grid_resolution=2, tissue_voxels=False, **PROTOCOL
    )
    table = read_gradients(
        paths["bvals"], paths["bvecs"], n_volumes=30, timing_file=paths["timing"]
    )
    image = nib.load(paths["data"])
    shape = image.shape[:-1]
    signals, _ = TissuePrior().simulator(table).sample(int(np.prod(shape)), seed=3)
    rng = np.random.default_rng(0)
    noisy = np.hypot(
        S0 * signals + SIGMA * rng.standard_normal(signals.shape),
        SIGMA * rng.standard_normal(signals.shape),
    )
    data = noisy.reshape(shape + (-1,)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, image.affine), paths["data"])
    return paths


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    """The cache of the prior's simulations, one for the session."""
    folder = tmp_path_factory.getbasetemp() / "protocol-free-cache"
    folder.mkdir(exist_ok=True)
    monkeypatch.setenv("DIPY_SPINVERSE_CACHE", str(folder))
    return folder


def _run(dataset, out_dir, **options):
    options = {
        **dict(
            timing_file=dataset["timing"],
            fit_method="protocol_free",
            sigma=str(SIGMA),
            n_report=0,
            out_dir=str(out_dir),
        ),
        **options,
    }
    flow = SpinverseFlow(force=True)
    flow.run(
        dataset["data"], dataset["bvals"], dataset["bvecs"], dataset["mask"], **options
    )
    return flow


def _load(path):
    return np.asanyarray(nib.load(path).dataobj)


def test_the_command_writes_maps_status_report_and_state(dataset, cache, tmp_path):
    outputs = _run(dataset, tmp_path, n_report=2).last_generated_outputs
    folder = outputs["out_posterior"]
    status = _load(outputs["out_status"])
    assert status.shape == (3, 2, 1) and (status == OK).all(), status
    for name in FREE_SCALARS:
        median = _load(os.path.join(folder, f"{name}.nii.gz"))
        low, high = np.moveaxis(
            _load(os.path.join(folder, f"{name}_ci90.nii.gz")), -1, 0
        )
        assert np.all((low <= median) & (median <= high)), name
    # The estimator reads no orientation: no map of it.
    assert not os.path.exists(os.path.join(folder, "orientation.nii.gz"))
    assert _load(os.path.join(folder, "posterior_status.nii.gz")).shape == (3, 2, 1)
    if _has_matplotlib():
        assert os.path.getsize(outputs["out_report"]) > 1000
    # The state is the fit: load_fit reads it back; the checkpoint is gone.
    fit = load_fit(outputs["out_state"])
    assert isinstance(fit, ProtocolFreeFit) and fit.fingerprint is not None
    assert_array_equal(fit.status, status)
    np.testing.assert_allclose(
        fit.cell_diameter,
        _load(os.path.join(folder, "cell_diameter.nii.gz")),
        rtol=1e-6,
    )
    assert not (tmp_path / "spinverse_fit.partial.h5").exists()


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_an_interrupted_fit_resumes_from_its_checkpoint(
    dataset, cache, tmp_path, monkeypatch
):
    """Ctrl-C after the first chunk keeps it in the checkpoint; the same
    command fits only the voxels left, and gives the maps of a fit never
    interrupted."""
    whole = load_fit(
        _run(dataset, tmp_path / "whole").last_generated_outputs["out_state"]
    )
    monkeypatch.setattr(free, "VOXELS_PER_CHUNK", 2)
    real = free.SpinverseProtocolFreeModel._params
    fitted = []

    def interrupted(model, rows):
        if len(fitted) == 1:
            raise KeyboardInterrupt
        fitted.append(len(rows))
        return real(model, rows)

    monkeypatch.setattr(free.SpinverseProtocolFreeModel, "_params", interrupted)
    flow = SpinverseFlow(force=True)
    with pytest.raises(KeyboardInterrupt):
        flow.run(
            dataset["data"], dataset["bvals"], dataset["bvecs"], dataset["mask"],
            timing_file=dataset["timing"], fit_method="protocol_free",
            sigma=str(SIGMA), n_report=0, out_dir=str(tmp_path / "out"),
        )  # fmt: skip
    store = tmp_path / "out" / "spinverse_fit.partial.h5"
    assert str(store) in flow.on_interrupt, flow.on_interrupt
    partial = load_fit(store)
    assert isinstance(partial, ProtocolFreeFit) and partial.n_pending == 4
    assert (partial.params["status"] == PENDING).sum() == 4
    fitted.clear()

    def counted(model, rows):
        fitted.append(len(rows))
        return real(model, rows)

    monkeypatch.setattr(free.SpinverseProtocolFreeModel, "_params", counted)
    state = _run(dataset, tmp_path / "out").last_generated_outputs["out_state"]
    assert fitted == [2, 2]  # the two chunks left
    assert not store.exists()
    resumed = load_fit(state)
    assert resumed.n_pending == 0
    for name in ("status", *FREE_SCALARS):
        np.testing.assert_allclose(
            resumed.params[name], whole.params[name], rtol=1e-4, err_msg=name
        )
    # --resume of a finished fit fits nothing again.
    fitted.clear()
    _run(dataset, tmp_path / "out", resume=True)
    assert fitted == []


def test_ctrl_c_names_the_checkpoint(dataset, cache, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(free.SpinverseProtocolFreeModel, "_params", interrupted)
    argv = [
        dataset["data"], dataset["bvals"], dataset["bvecs"], dataset["mask"],
        "--timing_file", dataset["timing"], "--fit_method", "protocol_free",
        "--snr", "50", "--out_dir", str(tmp_path),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["dipy_fit_spinverse", *argv])
    with pytest.raises(SystemExit) as stop:
        main()
    err = capsys.readouterr().err
    assert stop.value.code == 130, err
    assert "spinverse_fit.partial.h5" in err and "run the same command" in err


def test_what_it_cannot_read_is_refused_by_name(dataset, cache, tmp_path):
    # Its estimator's prior is the package's: the posterior's options are
    # not its own, nor the label search's.
    for options, match in (
        (dict(max_iter=3), r"\['--max_iter'\] are not options of --fit_method "
         "protocol_free.*--fit_method search"),
        (dict(posterior_options='{"prior": {"cell_diameter": [1, 5]}}'),
         r"\"prior\" in --posterior_options.*--fit_method posterior"),
        (dict(diffusivity=0.003), r"--diffusivity 0.003.*--fit_method posterior"),
        (dict(engine="ray", n_jobs=2), r"\['--engine ray', '--n_jobs 2'\]"),
        (dict(sigma=None), "--fit_method protocol_free needs the noise level"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            _run(dataset, tmp_path / "refused", **options)
    # A protocol of no shell it reads (every diffusion time below 10 ms).
    timing = tmp_path / "short.txt"
    np.savetxt(timing, np.tile([0.004, 0.006], (30, 1)))
    with pytest.raises(ValueError, match="reads no shell of this protocol"):
        _run(dataset, tmp_path / "short", timing_file=str(timing))
    # A damaged checkpoint with --resume: named, not continued.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "spinverse_fit.partial.h5").write_bytes(b"not a store" * 10)
    with pytest.raises(ValueError, match="spinverse_fit.partial.h5"):
        _run(dataset, damaged, resume=True)


def test_another_methods_checkpoint_is_set_aside(dataset, cache, tmp_path, caplog):
    """A label search's checkpoint in the folder is not continued by the
    protocol-free fit: kept under another name, with a warning."""
    table = read_gradients(
        dataset["bvals"], dataset["bvecs"], n_volumes=30, timing_file=dataset["timing"]
    )
    data = _load(dataset["data"]).astype(float)
    model = SpinverseModel(
        table, grid=dict(size=12.0, resolution=2), preset="paper", max_iter=1
    )
    model.fit(
        data[:1, :1], checkpoint=Checkpoint(tmp_path / "spinverse_fit.partial.h5")
    )
    _run(dataset, tmp_path)
    assert "cannot be continued here" in caplog.text
    assert list(tmp_path.glob("spinverse_fit.partial.*.h5"))


def test_a_chunked_fit_is_the_fit_of_one_call(dataset, cache, monkeypatch):
    """Voxels are drawn from by their own data: chunks change nothing."""
    table = read_gradients(
        dataset["bvals"], dataset["bvecs"], n_volumes=30, timing_file=dataset["timing"]
    )
    data = _load(dataset["data"]).astype(float)
    model = SpinverseModel(table, fit_method="protocol_free", sigma=SIGMA)
    one = model.fit(data)
    monkeypatch.setattr(free, "VOXELS_PER_CHUNK", 4)
    chunked = model.fit(data)
    for name in ("status", *FREE_SCALARS):
        np.testing.assert_allclose(
            chunked.params[name], one.params[name], rtol=1e-4, err_msg=name
        )
