"""Learned proposals, several cells per voxel, and the search's uncertainty."""

import dataclasses

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import Protocol, TetGrid, simulate
from dipy_spinverse.geometry.metrics import cell_inversion
from dipy_spinverse.geometry.substrates import random_substrate
from dipy_spinverse.inverse import proposal as proposal_module
from dipy_spinverse.inverse import reconstruct, resolve_config
from dipy_spinverse.inverse import search as search_module
from dipy_spinverse.inverse.fields import OPEN_KAPPA, cell_labels, label_field
from dipy_spinverse.inverse.moves import label_moves
from dipy_spinverse.inverse.proposal import (
    ProposalSettings,
    load_or_train_proposal,
    proposal_key,
    proposal_starts,
)
from dipy_spinverse.inverse.search import search_labels
from dipy_spinverse.inverse.uncertainty import Recorder
from dipy_spinverse.sim.signals import normalise_b0

# A tiny proposal: enough to exercise training, caching and sampling on the
# 48-cell test grid in a few seconds (not to be accurate).
TINY = ProposalSettings(n_substrates=32, epochs=2, hidden=16)


def _two_cells(grid):
    """Two touching cells: the lower and upper halves of a ball."""
    inside = np.linalg.norm(grid.cell_centroids - 4.0, axis=1) < 3.2
    labels = np.where(inside, np.where(grid.cell_centroids[:, 2] < 4.0, 1, 2), 0)
    assert set(np.unique(labels)) == {0, 1, 2}
    return labels


def test_label_field_matches_the_substrates_membranes():
    """Per-cell permeabilities, two membranes in series between touching
    cells: the same field :mod:`dipy_spinverse.geometry.substrates` builds."""
    grid = TetGrid.bcc(80 / 3, 4)
    sub = random_substrate(grid, rng=3, n_cells=3, touching=True)
    field = label_field(grid, sub.labels, sub.permeability, np.inf)
    assert_allclose(field, sub.face_permeability, rtol=1e-12)


def _two_balls(grid):
    """Inside two separate balls, the first larger."""
    centres = np.array([[8.0, 13.3, 13.3], [20.0, 13.3, 13.3]])
    d = np.linalg.norm(grid.cell_centroids[:, None] - centres, axis=2)
    return (d[:, 0] < 7.0) | (d[:, 1] < 5.0)


def test_cell_labels_split_pieces_and_order_by_volume():
    grid = TetGrid.bcc(80 / 3, 4)
    labels = _two_balls(grid).astype(int)  # one label, two pieces
    cells = cell_labels(grid, labels)
    assert cells.max() == 2
    volumes = [grid.cell_volumes[cells == k].sum() for k in (1, 2)]
    assert volumes[0] >= volumes[1]
    assert_array_equal(cells > 0, labels > 0)


def test_label_moves_of_several_cells():
    """Merge and delete moves appear with two cells, not with one."""
    grid = TetGrid.bcc(8.0, 2)
    labels = _two_cells(grid)
    moves = label_moves(grid, labels)
    cell2 = tuple(np.flatnonzero(labels == 2).tolist())
    assert (cell2, 1) in moves and (cell2, 0) in moves
    binary = label_moves(grid, (labels > 0).astype(int))
    assert all(label in (0, 1, 2) for _, label in binary)  # 2: splits only
    assert all(len(cells) > 0 for cells, _ in moves)


def test_split_moves_cut_a_cell_across_its_principal_axes():
    """A slab long along x: one split cuts it at its mean x, with a new label.

    Nothing else creates a label, so two touching cells that a start merged
    are separated only by such a move.
    """
    grid = TetGrid.bcc(80 / 3, 4)
    centroids = grid.cell_centroids
    inside = np.all(np.abs(centroids - grid.size / 2) < [9.0, 5.0, 5.0], axis=1)
    labels = inside.astype(int)
    splits = [set(cells) for cells, label in label_moves(grid, labels) if label == 2]
    assert len(splits) == 3  # one per principal axis
    cells = np.flatnonzero(inside)
    x = centroids[cells, 0]
    x = x - x.mean()  # cells on the cut stay with the original label
    halves = set(cells[x > 1e-6].tolist()), set(cells[x < -1e-6].tolist())
    assert any(half in splits for half in halves)
    assert label_moves(grid, np.zeros(grid.n_cells, int)) == []


def test_inversion_twin_gives_the_same_signal(problem):
    """The point inversion of a labelling gives the same signal magnitude
    (float64, to round-off): the ambiguity the proposal's loss allows."""
    grid, prot, _ = problem
    twin = cell_inversion(grid)
    assert_array_equal(twin[twin], np.arange(grid.n_cells))
    labels = (grid.cell_centroids[:, 0] + 0.5 * grid.cell_centroids[:, 1] < 5).astype(
        int
    )
    assert not np.array_equal(labels, labels[twin])
    fields = [
        np.where(grid.interface_faces(lab), 2e-5, np.inf)
        for lab in (labels, labels[twin])
    ]
    signal = simulate(grid, np.stack(fields), prot, dtype=torch.float64).numpy()
    assert_allclose(signal[0], signal[1], rtol=1e-9, atol=1e-12)


def test_search_fits_one_permeability_per_cell():
    """Two touching cells, 2e-5 and 6e-5 m/s, labels given: the joint
    refinement (L-BFGS through the simulator, float64, noise-free) finds
    both within 3 %. Three diffusion times, three b-values, three axes: the
    two permeabilities trade along a shallow valley that the 6-volume test
    protocol cannot resolve."""
    grid = TetGrid.bcc(8.0, 2)
    bvals = np.array([0] + [500, 1500, 3000] * 3, float)
    dirs = np.array([[1, 0, 0]] + [[1, 0, 0]] * 3 + [[0, 1, 0]] * 3 + [[0, 0, 1]] * 3)
    prot = Protocol.pgse(bvals, dirs, small_delta=0.005, big_delta=0.01)
    for big in (0.03, 0.06):
        prot = prot + Protocol.pgse(bvals, dirs, small_delta=0.005, big_delta=big)
    labels = _two_cells(grid)
    truth = label_field(grid, labels, [2e-5, 6e-5], OPEN_KAPPA)
    data = normalise_b0(simulate(grid, truth, prot, dtype=torch.float64)[None], prot)
    config = resolve_config("default", search_directions=None).replace(search_steps=0)
    sim = dict(diffusivity=2e-3, dtype=torch.float64, device="cpu")
    found = search_labels(
        grid, data, prot, config, sim=sim, face_kappa=None, labels=labels[None]
    )
    assert_array_equal(found.labels[0] > 0, labels > 0)
    cell = found.labels[0]
    kappa = {
        k: found.permeability[0][
            grid.interface_faces(cell == k)
            & ((cell[grid.face_cells[:, 0]] == 0) | (cell[grid.face_cells[:, 1]] == 0))
        ]
        for k in (1, 2)
    }
    got = sorted(float(np.median(v)) for v in kappa.values())
    assert_allclose(got, [2e-5, 6e-5], rtol=0.03)


@pytest.mark.parametrize("misfit", [0.8, 2.0])
def test_recorder_weighs_labellings_by_likelihood(misfit):
    """Two labellings 2 ln 3 apart in chi-square: weights 3 : 1 where the
    best fit is within the noise (chi-square per acquisition ``misfit``
    0.8); where it is not (2.0), the variance is scaled by the misfit and
    the same gap weighs 3 ** (1 / 2) : 1."""
    grid = TetGrid.bcc(8.0, 2)
    a = np.zeros(grid.n_cells, int)
    a[:10] = 1
    b = a.copy()
    b[10:15] = 1
    far = a.copy()
    far[20:30] = 1

    n, noise = 100, 0.5  # loss per unit chi-square: noise / n
    best = misfit * noise
    losses = {a.tobytes(): best, b.tobytes(): best + 2 * np.log(3) * noise / n}
    # Beyond KEEP_CHI2 either way, and beyond the noise's 95 % quantile (124
    # for 100 acquisitions), which keeps rivals that fit within the noise.
    losses[far.tobytes()] = best + 50 * max(noise, best) / n

    def scorer(owners, candidates, membranes):
        return np.array([losses[c.tobytes()] for c in candidates])

    recorder = Recorder(scorer, 1, noise, n)
    recorder(np.zeros(3, int), np.stack([a, b, far]), np.full(3, 1e-5))
    assert len(recorder.kept[0]) == 2
    inside, spread = recorder.posterior(grid, a[None])
    ratio = 3.0 ** (1 / max(misfit, 1.0))
    weight_b = 1 / (1 + ratio)
    assert_allclose(inside[0, :10], 1.0)
    assert_allclose(inside[0, 10:15], weight_b)
    assert_allclose(inside[0, 15:], 0.0)
    # IoU of b against a is 10 / 15 (its inversion overlaps a less here).
    twin = cell_inversion(grid)
    iou_twin = np.sum((b[twin] > 0) & (a > 0)) / np.sum((b[twin] > 0) | (a > 0))
    assert_allclose(spread[0], weight_b * (1 - max(10 / 15, iou_twin)))


def test_proposal_is_trained_once_then_read_from_the_cache(
    problem, tmp_path, monkeypatch
):
    grid, prot, _ = problem
    first = load_or_train_proposal(
        grid, prot, settings=TINY, cache_dir=tmp_path, progress=False
    )
    assert list(tmp_path.glob("*.pt")) == [tmp_path / f"{first.key}.pt"]
    assert first.metadata["train_s"] > 0

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of reading the cache")

    monkeypatch.setattr(proposal_module, "train_proposal", no_training)
    again = load_or_train_proposal(grid, prot, settings=TINY, cache_dir=tmp_path)
    x = np.random.default_rng(0).uniform(0.3, 1.0, (3, len(prot)))
    assert_allclose(again.predict(x)[0], first.predict(x)[0], rtol=1e-6)
    occupancy, kappa = again.predict(x)
    assert occupancy.shape == (3, grid.n_cells)
    assert np.all((occupancy >= 0) & (occupancy <= 1)) and np.all(kappa > 0)
    # Anything the proposal depends on changes the key.
    assert proposal_key(grid, prot, 2e-3, TINY) == first.key
    assert proposal_key(grid, prot, 1e-3, TINY) != first.key
    assert proposal_key(grid, prot[:-1], 2e-3, TINY) != first.key
    other = dataclasses.replace(TINY, seed=1)
    assert proposal_key(grid, prot, 2e-3, other) != first.key
    # ... and nothing else does: a reflecting wall's unused permeability.
    unused = TetGrid.bcc(grid.size, 2, wall_permeability=0.5)
    assert unused.boundary == grid.boundary == "reflecting"
    assert proposal_key(unused, prot, 2e-3, TINY) == first.key
    absorbing = [
        TetGrid.bcc(grid.size, 2, boundary="absorbing", wall_permeability=w)
        for w in (0.1, 0.5)
    ]
    assert len({proposal_key(g, prot, 2e-3, TINY) for g in absorbing}) == 2
    # A corrupted cache entry is trained again, with a warning naming the
    # file (files.load_or_build, as every cache), not a crash deep in torch.
    monkeypatch.undo()  # training allowed again
    path = tmp_path / f"{first.key}.pt"
    path.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match=f"{path.name} cannot be read.*again"):
        again = load_or_train_proposal(grid, prot, settings=TINY, cache_dir=tmp_path)
    assert again.key == first.key
    # A readable file of the wrong content: the same.
    torch.save({"foo": 1}, path)
    with pytest.warns(UserWarning, match="KeyError.*training it again"):
        load_or_train_proposal(grid, prot, settings=TINY, cache_dir=tmp_path)
    assert torch.load(path, weights_only=True).keys() == {"state", "metadata"}
    # A cache that cannot be written is refused before training, not after.
    blocked = tmp_path / "a file"
    blocked.write_text("")
    with pytest.raises(ValueError, match="cannot write the learned proposal.*"):
        load_or_train_proposal(grid, prot, settings=TINY, cache_dir=blocked / "sub")


def test_proposal_starts_are_closed_separate_cells():
    grid = TetGrid.bcc(80 / 3, 4)
    occupancy = np.where(_two_balls(grid), 0.9, 0.1)
    starts = proposal_starts(grid, occupancy, 8, np.random.default_rng(0))
    assert 1 <= len(starts) <= 8
    # The cut at 0.5 comes first: the two slabs, as two separate cells.
    assert_array_equal(starts[0] > 0, occupancy > 0.5)
    assert starts[0].max() == 2
    assert np.all((starts > 0).sum(1) > 0) and np.all(
        (starts > 0).sum(1) < grid.n_cells
    )


def test_settings_and_options_are_checked():
    with pytest.raises(ValueError, match="snr_range"):
        ProposalSettings(snr_range=(100, 20))
    with pytest.raises(ValueError, match="n_substrates"):
        ProposalSettings(n_substrates=3)
    with pytest.raises(ValueError, match="high < inf"):
        ProposalSettings(snr_range=(20, np.inf))
    with pytest.raises(ValueError, match="search_proposal"):
        resolve_config("default", search_proposal=5)
    with pytest.raises(ValueError, match="search_dictionary"):
        resolve_config("default", search_dictionary="yes")
    # The cell parametrisation starts the search from its own labels.
    for option in (dict(search_proposal=64), dict(search_dictionary=False)):
        with pytest.raises(ValueError, match="starts the label search from its"):
            resolve_config("default", parametrisation="cell", **option)


def test_reconstruct_reports_the_proposal_and_the_uncertainty(
    problem, monkeypatch, tmp_path
):
    """End to end on the test grid: proposal starts only (no dictionary)."""
    monkeypatch.setenv("DIPY_SPINVERSE_CACHE", str(tmp_path))
    monkeypatch.setattr(search_module, "ProposalSettings", lambda **kw: TINY)
    grid, prot, signal = problem
    done = []

    def progress(iteration, permeability, losses):
        if "voxel_done" in losses:
            done.append(losses["voxel_done"])

    result = reconstruct(
        grid,
        np.stack([signal, signal]),
        prot,
        preset="default",
        max_iter=2,
        search_steps=5,
        search_directions=None,
        search_dictionary=False,
        search_proposal=32,
        callback=progress,
    )
    assert sorted(done) == [0, 1]  # each voxel's end reaches progress bars
    assert list((tmp_path / "proposals").glob("*.pt"))
    assert result.labels.shape == (2, grid.n_cells)
    assert result.proposal_probability.shape == (2, grid.n_cells)
    assert result.inside_probability.shape == (2, grid.n_cells)
    assert np.all((result.uncertainty >= 0) & (result.uncertainty <= 1))
    # The result itself is among the labellings within the noise.
    inside = result.labels > 0
    assert np.all(result.inside_probability[inside] > 0)
