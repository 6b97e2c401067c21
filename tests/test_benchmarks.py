"""The benchmark suite: every script names its validation page, takes
``--seed`` and has a ``--quick`` smoke run (run here; the long ones with
``-m slow``), and the helpers of the scripts that score, split or write."""

import argparse
import importlib.util
import json
import pathlib
import re
import sys

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import TetGrid
from dipy_spinverse.geometry.metrics import cell_inversion
from dipy_spinverse.geometry.substrates import random_substrates

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "generalisation.py"
_ROOT = _PATH.parents[1]
#: benchmarks/harness.py: the scripts' shared arguments, results and tables.
_HARNESS = "harness"
_SCRIPTS = sorted(p.stem for p in _PATH.parent.glob("*.py") if p.stem != _HARNESS)

#: Scripts whose ``--quick`` run takes more than about a minute on 2 shared
#: cores (a label search, a training or a whole-brain fit): run with -m slow.
_SLOW = {
    "bundle_cost",
    "cluster_training",
    "compartments",
    "cord_histology",
    "cord_white_matter",
    "forward",
    "generalisation",
    "isbi_prediction",
    "library_size",
    "mixture_reader",
    "mixture_span",
    "posterior_peers",
    "prior_check",
    "protocol_free",
    "protocol_free_shipped",
    "protocols",
    "surface_check",
    "tissue_maps",
    "volume",
    "workflow_memory",
}
#: Scripts that read the dmipy 1.0.5 distribution's files (skipped without).
_DMIPY = {
    "cord_fluid",
    "cord_histology",
    "cord_white_matter",
    "isbi_prediction",
    "library_size",
    "mixture_reader",
    "mixture_span",
    "prior_check",
}
#: Packages of the ``benchmark`` and ``tissue`` extras some scripts import.
_NEEDS = {"tissue_maps": ("skimage", "nilearn", "sklearn")}
#: Scripts run as a command (their child processes import them by name).
_COMMAND = {"workflow_memory"}


def _load_benchmark(name, monkeypatch=None):
    """The script benchmarks/<name>.py as a module: benchmarks/ is on the
    path while it loads (for the harness), and after it too when
    ``monkeypatch`` is given (for scripts that import each other)."""
    if monkeypatch is not None:
        monkeypatch.syspath_prepend(str(_PATH.parent))
    spec = importlib.util.spec_from_file_location(
        f"{name}_bench", _PATH.parent / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(_PATH.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(_PATH.parent))
    return module


def test_every_script_names_its_page_and_the_index_lists_it():
    """Each script's docstring opens with the validation page whose tables
    it regenerates, the page exists, benchmarks/README.md lists it, and it
    takes --quick and an explicit --seed."""
    index = (_PATH.parent / "README.md").read_text()
    for name in _SCRIPTS:
        text = (_PATH.parent / f"{name}.py").read_text()
        first = text.splitlines()[0]
        assert first.startswith('"""Regenerates the tables of doc/validation/'), name
        page = first.split("of ", 1)[1].rstrip(".")
        assert (_ROOT / page).exists(), (name, page)
        assert f"`{name}.py` | `{pathlib.Path(page).name}`" in index, name
        # The harness's parser adds both and takes the seed by keyword.
        shared = re.search(r"harness\.parser\(\s*__doc__,\s*seed=", text)
        assert '"--quick"' in text or shared, name
        assert '"--seed"' in text or shared, name
    listed = re.findall(r"^\| `(\w+)\.py` \|", index, flags=re.MULTILINE)
    assert sorted(listed) == _SCRIPTS  # one row per script, none of a dropped one


def _quick_params():
    for name in _SCRIPTS:
        marks = [pytest.mark.slow] if name in _SLOW else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_quick_params()))
def test_quick_run(name, monkeypatch, tmp_path, capsys):
    """``python benchmarks/<name>.py --quick`` runs to its table, writing
    only into the working folder and a fresh cache (shipped estimators
    serve the posterior's scripts)."""
    if name in _DMIPY:
        from dipy_spinverse.data import read_isbi2015

        try:
            read_isbi2015()
        except FileNotFoundError:
            pytest.skip("the dmipy 1.0.5 files are not here")
    else:  # (the dmipy files are found in the cache folder)
        monkeypatch.setenv("DIPY_SPINVERSE_CACHE", str(tmp_path / "cache"))
    for package in _NEEDS.get(name, ()):
        pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)
    if name in _COMMAND:
        import os
        import subprocess
        import sys

        path = os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")])
        monkeypatch.setenv("PYTHONPATH", path)
        script = str(_PATH.parent / f"{name}.py")
        done = subprocess.run(
            [sys.executable, script, "--quick"], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip()
        return
    module = _load_benchmark(name, monkeypatch)
    module.main(["--quick"])
    assert capsys.readouterr().out.strip()


def test_harness_keeps_results_and_writes_tables(tmp_path):
    """benchmarks/harness.py: every parser takes --quick and the seed its
    script states; a result is built once, then read back; tables are
    written as the pages hold them, and a wrong alignment is named."""
    harness = _load_benchmark(_HARNESS)
    made = harness.parser("Title.\n\nBody.", seed=4, out="kept")
    args = made.parse_args(["--quick"])
    assert (args.seed, args.quick, args.out) == (4, True, "kept")
    assert made.description == "Title."
    built = []

    def build():
        built.append(1)
        return {"x": np.arange(3.0), "n": np.array(7)}

    path = tmp_path / "results" / "run-7.npz"
    first = harness.cached(path, build)
    again = harness.cached(path, build)
    assert len(built) == 1
    assert_allclose(again["x"], first["x"], rtol=0, atol=0)
    assert int(again["n"]) == 7
    assert harness.head(["a", "b"], "-r") == "| a | b |\n|---|---:|"
    assert harness.head(["a", "b"], "lc", spaced=True) == "| a | b |\n| :--- | :---: |"
    assert harness.table(["a"], [[1], ["x"]]) == "| a |\n|---|\n| 1 |\n| x |"
    with pytest.raises(ValueError, match="align='x'"):
        harness.rule("x")
    with pytest.raises(ValueError, match="2 columns for 1 titles"):
        harness.head(["a"], "rr")


@pytest.fixture(scope="module")
def bench():
    return _load_benchmark("generalisation")


@pytest.mark.parametrize("boundary", ["absorbing", "reflecting"])
def test_a_perfect_answer_scores_perfectly(bench, boundary):
    """IoU 1, F1 1, Chamfer 0 and no permeability error for the truth itself
    and for its point inversion, touching cells and cells against the wall
    included (the enclosure of the barrier scored 0.84-1.00 here)."""
    grid = TetGrid.bcc(80 / 3, 4, boundary=boundary)
    for sub in random_substrates(grid, 12, seed=3):
        labels = np.asarray(sub.labels)
        for found in (labels, labels[cell_inversion(grid)]):
            field = sub.face_permeability
            if found is not labels:
                field = field[_face_inversion(grid)]
            got = bench.score(grid, labels, sub.permeability, found, field)
            assert got["iou"] == pytest.approx(1.0)
            assert got["f1"] == pytest.approx(1.0)
            assert got["chamfer"] == pytest.approx(0.0, abs=1e-9)
            assert_allclose(got["kappa_errors"], 0.0, atol=1e-9)
            assert len(got["kappa_errors"]) == sub.n_cells


def _face_inversion(grid):
    """Face of each face's point inversion through the voxel centre."""
    from scipy.spatial import cKDTree

    centroids = grid.vertices[grid.faces].mean(1)
    _, index = cKDTree(centroids).query(grid.size - centroids)
    return index


def test_summaries_survive_a_voxel_without_cells(bench, tmp_path):
    rows = [
        dict(iou=0.9, f1=0.8, chamfer=1.0, kappa_errors=[0.1, 0.4], kind="multi"),
        dict(iou=0.0, f1=0.0, chamfer=np.inf, kappa_errors=[], kind="torus"),
        dict(iou=0.5, f1=0.4, chamfer=2.0, kappa_errors=[], kind="multi"),
    ]
    for row in rows:
        row.update(uncertainty=0.3, chi2_gap=np.nan, poor_fit=False)
    summaries = bench.families(rows, 30.0)
    assert list(summaries) == ["multi", "torus", "all"]
    every = summaries["all"]
    assert every["chamfer_median_um"] == 2.0  # the median, not NaN
    assert every["kappa_within_25_percent"] == 0.5
    assert every["voxels_per_minute"] == 2.0
    assert np.isnan(every["chi2_gap_median"])  # no noise, no chi-square
    assert (every["wrong"], every["wrong_flagged"]) == (1, 1)
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(bench._finite_or_none(rows), allow_nan=False))
    assert json.loads(path.read_text())[1]["chamfer"] is None


def test_rows_file_resumes_and_refuses_other_settings(bench, tmp_path):
    """--rows: voxels appended per batch are read back as they were scored
    (infinite Chamfer and NaN chi-square included), voxels beyond --n are
    left out, and rows of other settings for the same physics are refused."""
    args = argparse.Namespace(seed=7, batch=8, approximation=0)
    key = bench._settings("paper", args)
    path = str(tmp_path / "rows.jsonl")
    assert bench._stored_rows(path, key, 10) == {}  # no file yet
    rows = [
        dict(
            iou=0.5,
            f1=0.4,
            chamfer=np.inf,
            kappa_errors=[],
            kind="multi",
            uncertainty=0.1,
            chi2_gap=np.nan,
            poor_fit=False,
            index=i,
            seconds=60.0,
        )
        for i in (0, 1, 5)
    ]
    bench._append_rows(path, key, rows[:2])
    bench._append_rows(path, key, rows[2:])
    back = bench._stored_rows(path, key, 3)
    assert sorted(back) == [0, 1]  # index 5 is beyond n = 3
    assert back[1]["chamfer"] == np.inf and np.isnan(back[1]["chi2_gap"])
    other = bench._settings("snr100", args)  # another physics: ignored
    assert bench._stored_rows(path, other, 10) == {}
    args.seed = 8
    with pytest.raises(SystemExit, match="give another file"):
        bench._stored_rows(path, bench._settings("paper", args), 10)


def test_simulated_targets_are_read_back_from_the_cache(bench, tmp_path, monkeypatch):
    """The targets' signals are simulated once per grid, protocol and field
    and read from the disk cache after that (a resumed --rows run skips the
    18-minute simulation); another field is simulated afresh."""
    from dipy_spinverse import simulate

    monkeypatch.setenv("DIPY_SPINVERSE_CACHE", str(tmp_path))
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return simulate(*args, **kwargs)

    monkeypatch.setattr(bench, "simulate", counted)
    grid = TetGrid.bcc(80 / 3, 2)
    protocol = bench.published_protocol()
    field = np.stack([s.face_permeability for s in random_substrates(grid, 2, seed=3)])
    first = bench.simulated(grid, field, protocol)
    again = bench.simulated(grid, field, protocol)
    assert len(calls) == 1
    assert_allclose(again, first, rtol=0, atol=0)
    assert first.shape == (2, len(protocol.bvals))
    other = bench.simulated(grid, field[::-1], protocol)
    assert len(calls) == 2
    assert_allclose(other, first[::-1], rtol=1e-12)


def test_forward_doc_keeps_its_hand_written_sections(tmp_path):
    """--write-doc replaced the whole file, losing the engine comparison."""
    module = _load_benchmark("forward")
    doc = tmp_path / "doc" / "benchmarks_forward.md"
    module.write_doc(doc, "# Table\n\nold rows\n")
    assert doc.read_text() == "# Table\n\nold rows\n"
    section = "\n## Which engine\n\nmeasured apart\n"
    doc.write_text(doc.read_text() + section)
    module.write_doc(doc, "# Table\n\nnew rows\n")
    assert doc.read_text() == "# Table\n\nnew rows\n" + section


def test_every_fibre_protocol_has_its_doc_blocks(monkeypatch):
    """benchmarks/compartments.py --fibres --write-doc on each protocol
    writes the block named for it; the protocols have the stated volumes."""
    module = _load_benchmark("compartments", monkeypatch)
    doc = module.DOC.read_text()
    volumes = {"noddi": (93, 3000), "hcp": (276, 3000), "multishell": (366, 5000)}
    for name, (n, b_max) in volumes.items():
        gtab = module.fibre_protocol(name)
        assert len(gtab.bvals) == n and gtab.bvals.max() == b_max
        block = "fibres" + ("" if name == "noddi" else f"-{name}")
        assert f"<!-- {block}:start -->" in doc and f"<!-- {block}:end -->" in doc


def test_peers_score_every_method_on_the_searchs_voxels(monkeypatch):
    """benchmarks/posterior_peers.py: with ``common`` a descriptor is scored
    only where that method has a finite estimate and the posterior's status
    is 0, so every method meets the same voxels; a method that failed (no
    estimates) leaves none."""
    module = _load_benchmark("posterior_peers", monkeypatch)
    status = np.array([0, 0, 0, 5])
    estimates = {"search": {"exchange_time": np.array([0.1, np.nan, 0.2, 0.3])}}
    voxels = np.array([True, True, True, True])
    picked = module.scored_voxels(status, estimates, "exchange_time", voxels, "search")
    np.testing.assert_array_equal(picked, [True, False, True, False])
    every = module.scored_voxels(status, estimates, "exchange_time", voxels, None)
    np.testing.assert_array_equal(every, [True, True, True, False])
    failed = module.scored_voxels(status, {}, "exchange_time", voxels, "search")
    assert not failed.any()


@pytest.fixture(scope="module")
def cord_bench():
    return _load_benchmark("cord_histology")


def test_cord_oracle_blocked_folds_keep_neighbours_apart(cord_bench):
    """benchmarks/cord_histology.py --oracle: every voxel is tested once, and
    no training voxel lies within ``gap`` rows of a test voxel of its fold."""
    rows = np.random.default_rng(0).integers(10, 55, size=400)
    for block, gap in ((5, 2), (4, 1), (9, 0)):
        folds = cord_bench.blocked_folds(rows, 5, block, gap)
        tested = np.concatenate([test for _, test in folds])
        np.testing.assert_array_equal(np.sort(tested), np.arange(len(rows)))
        for train, test in folds:
            assert len(train) and not np.intersect1d(train, test).size
            distance = np.abs(rows[train][:, None] - rows[test][None, :])
            assert distance.min() > gap
    folds = cord_bench.random_folds(103, 5, np.random.default_rng(1))
    tested = np.concatenate([test for _, test in folds])
    np.testing.assert_array_equal(np.sort(tested), np.arange(103))
    for train, test in folds:
        np.testing.assert_array_equal(
            np.sort(np.concatenate([train, test])), np.arange(103)
        )


def test_cord_oracle_regressors(cord_bench):
    """The oracle's ridge (dual form) is the primal ridge on standardised
    features; kNN with one neighbour returns a training label; the partial
    correlation removes a shared covariate."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 30)) * rng.uniform(0.5, 3, size=30)
    y = x[:, 0] - 0.5 * x[:, 3] + 0.1 * rng.normal(size=120)
    x_test = rng.normal(size=(17, 30))
    guess = cord_bench.ridge_predictions(x, y, x_test, alphas=[0.5, 50.0])
    mean, std = x.mean(0), x.std(0)
    z, z_test = (x - mean) / std, (x_test - mean) / std
    for column, alpha in enumerate((0.5, 50.0)):
        weights = np.linalg.solve(z.T @ z + alpha * np.eye(30), z.T @ (y - y.mean()))
        assert_allclose(guess[:, column], y.mean() + z_test @ weights, atol=1e-10)
    nearest = cord_bench.knn_predictions(x, y, x[:5], neighbours=(1,))
    assert_allclose(nearest[:, 0], y[:5])
    shared = rng.normal(size=500)
    a, b = shared + 0.3 * rng.normal(size=500), shared + 0.3 * rng.normal(size=500)
    assert abs(cord_bench.partial_spearman(a, b, shared[None])) < 0.15


def test_cord_oracle_label_resampling(cord_bench):
    """The label redrawn from many axons of its own gamma comes back near
    itself; from two axons it scatters."""
    from dipy_spinverse.io.datasets import effective_diameter

    mean, std = np.array([3.0, 2.0, 0.0]), np.array([1.2, 0.5, 0.0])
    label = effective_diameter(mean, std)
    rng = np.random.default_rng(0)
    many = cord_bench.label_resampled(mean, std, np.array([2e5, 2e5, 5]), rng)
    assert_allclose(many, label, rtol=0.02)
    few = [
        cord_bench.label_resampled(mean, std, np.array([2, 2, 2]), rng)[0]
        for _ in range(50)
    ]
    assert np.std(few) > 0.1
    assert_allclose(
        cord_bench.lognormal_effective_diameter(np.array([3.0]), np.array([1e-6])),
        [3.0],
        rtol=1e-6,
    )


@pytest.mark.slow
def test_cord_oracle_quick_run(cord_bench, tmp_path, monkeypatch, capsys):
    """``cord_histology.py --oracle --quick`` prints the oracle's tables
    (about a minute and a half on 2 cores; skipped without the dmipy files)."""
    from dipy_spinverse.data import read_cat_spinal_cord

    try:
        read_cat_spinal_cord()
    except FileNotFoundError:
        pytest.skip("the dmipy 1.0.5 files are not here")
    monkeypatch.chdir(tmp_path)
    cord_bench.main(["--oracle", "--quick"])
    out = capsys.readouterr().out
    assert "Supervised oracle" in out and "| white matter | signals | blocked |" in out
    assert not (tmp_path / "cord_histology").exists() or not any(
        (tmp_path / "cord_histology").iterdir()
    )


def test_cord_white_matter_reading_checks(monkeypatch):
    """``cord_white_matter.py``'s checks: features drawn like the
    simulations' fall inside their 95 % region about 95 % of the time and
    shifted ones not at all; the two-compartment reading recovers the
    parameters a signal was made of (the cord's b-values and gradients
    across 0.1-0.8 T/m, two timings)."""
    module = _load_benchmark("cord_white_matter", monkeypatch)
    from dipy_spinverse.sim.waveforms import GAMMA_UM_US

    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(12, 24))
    simulated = rng.normal(size=(4000, 12)) @ mixing
    alike = rng.normal(size=(500, 12)) @ mixing
    labels = [f"feature {i}" for i in range(12)]
    inside, own, theirs, worst = module.prior_predictive(simulated, alike, labels)
    assert 0.9 < inside < 0.99 and abs(own - theirs) < 0.3
    shifted = alike + 8 * simulated.std(0)
    inside, _, _, worst = module.prior_predictive(simulated, shifted, labels)
    assert inside == 0 and "100% outside" in worst

    strength = np.tile(np.linspace(0.1, 0.8, 15), 2)  # T/m
    delta = np.repeat([3e3, 8e3], 15)  # us
    big_delta = np.repeat([20e3, 40e3], 15)
    g = GAMMA_UM_US * strength  # rad/(um us), as protocol.gradient_rate
    b = g**2 * delta**2 * (big_delta - delta / 3) * 1e-3  # ms/um^2
    truth = dict(f_i=0.35, R=2.5, D_i=1.2, D_e=0.6, f_dot=0.05)
    inside = module.cylinder_gpa_pgse(g, delta, big_delta, 2.5, 1.2e-3)
    signal = 0.35 * inside + 0.05 + 0.6 * np.exp(-b * 0.6)
    read = module.two_compartment_reading(signal, (g, delta, big_delta, b))
    assert read["rms"] < 1e-4
    for name, value in truth.items():
        assert_allclose(read[name], value, rtol=0.05, atol=0.01)


def test_prior_check_run_gains_scale_each_runs_weighted_volumes(monkeypatch):
    """benchmarks/prior_check.py --run_gains: a volume's run is its timing's
    last run of b = 0 volumes before it; each run's weighted volumes of a
    draw share one gain within the bound, and b = 0 keeps its scale."""
    from dipy_spinverse import Protocol

    bench = _load_benchmark("prior_check", monkeypatch)
    bvals = [0, 0, 1000, 2000, 0, 1000, 2000, 2000]
    bvecs = [[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]] + [[0, 0, 0]]
    bvecs += [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    protocol = Protocol.pgse(bvals, bvecs, small_delta=0.01, big_delta=0.03)
    runs = bench.acquisition_runs(protocol)
    assert_array_equal(runs, [0, 0, 0, 0, 1, 1, 1, 1])
    signals = np.ones((50, len(bvals)))
    weighted = protocol.bvals > 0
    scaled = bench.with_run_gains(signals, runs, weighted, 0.05, seed=3)
    assert_array_equal(scaled[:, ~weighted], 1.0)
    assert np.all(np.abs(scaled - 1) <= 0.05)
    assert np.ptp(scaled[:, 2:4], axis=1).max() == 0  # one gain a run
    assert np.ptp(scaled[:, [2, 5]], axis=1).max() > 0  # runs apart
