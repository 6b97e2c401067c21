"""The example scripts run end to end (tiny settings)."""

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


@pytest.mark.slow
def test_compare_tutorial_runs(tmp_path):
    script = os.path.join(EXAMPLES, "compare_compartment_models.py")
    run = subprocess.run(
        [sys.executable, script, "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| voxel | quantity | truth | NODDI | ActiveAx | Karger | Spinverse |" in (
        run.stdout
    )
    for name in ("estimates_vs_truth.png", "interfaces.png", "signal_fits.png"):
        assert (tmp_path / name).stat().st_size > 0
    table = (tmp_path / "table.md").read_text()
    for voxel in ("capsule", "bent tube", "two touching cells"):
        assert f"| {voxel} | face F1 | 1 |" in table
    # Held-out substrates: the touching pair has one permeability per cell.
    assert "| two touching cells | permeability, cell 2 (m/s) |" in table


def _run_cached(name, tmp_path, timeout=300):
    """Run an example that trains a network: --quick, its cache in tmp_path."""
    script = os.path.join(EXAMPLES, name)
    out, cache = str(tmp_path), str(tmp_path / "cache")
    command = [sys.executable, script, "--quick", "--out", out, "--cache", cache]
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_learned_noddi_example_runs(tmp_path):
    run = _run_cached("learned_noddi.py", tmp_path)
    assert "| fitted |" in run.stdout and "| learned |" in run.stdout
    assert (tmp_path / "learned_noddi.png").stat().st_size > 0
    for name in ("odi_fitted.nii.gz", "odi_learned.nii.gz"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_posterior_tissue_example_runs(tmp_path):
    """Posterior intervals of voxels no dictionary holds and of small_101D
    (a tiny, uncalibrated network: the script's path, not its numbers)."""
    run = _run_cached("posterior_tissue.py", tmp_path)
    for voxel in ("ellipsoid", "two touching cells", "blob"):
        assert f"| {voxel} | cell_diameter |" in run.stdout
    assert "small_101D:" in run.stdout and "voxels in the mask" in run.stdout
    assert (tmp_path / "posterior_tissue.md").stat().st_size > 0


@pytest.mark.slow
def test_white_matter_example_runs(tmp_path):
    """The HCP white-matter slice: maps, the determination table and the
    resolution limit (a tiny network: the script's path, not its numbers)."""
    run = _run_cached("white_matter_hcp.py", tmp_path)
    assert "| cell_diameter | single |" in run.stdout
    assert "resolution limit (Nilsson et al. 2017)" in run.stdout
    for name in ("white_matter_hcp.png", "cell_diameter_ci90_width.nii.gz"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_cat_spinal_cord_example_runs(tmp_path):
    """The cord against histology (a tiny network on a strip of voxels: the
    script's path, not its numbers); skipped without the dmipy 1.0.5 files."""
    from dipy_spinverse.io.datasets import dmipy_data_folder

    try:
        dmipy_data_folder()
    except FileNotFoundError:
        pytest.skip("the dmipy 1.0.5 files are not here")
    run = _run_cached("cat_spinal_cord.py", tmp_path, timeout=900)
    assert "| posterior median | white matter" in run.stdout
    assert "inside the posterior's 90 % interval" in run.stdout
    assert (tmp_path / "cat_spinal_cord.png").stat().st_size > 0


@pytest.mark.slow
def test_isbi_example_runs(tmp_path):
    """The ISBI voxels' held-out prediction (ActiveAx alone); skipped
    without the dmipy 1.0.5 files."""
    from dipy_spinverse.io.datasets import dmipy_data_folder

    try:
        dmipy_data_folder()
    except FileNotFoundError:
        pytest.skip("the dmipy 1.0.5 files are not here")
    script = os.path.join(EXAMPLES, "isbi_white_matter.py")
    command = [sys.executable, script, "--quick", "--out", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| ActiveAx |" in run.stdout
    assert (tmp_path / "isbi_white_matter.png").stat().st_size > 0
