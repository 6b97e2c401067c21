"""Training one key: reproducible from its seed, cached under the code that
trained it, and shipped only for code that the manifest accepts
(dipy_spinverse.posterior.load_or_train, .shipped, .shipping)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import SMALL_PRIOR
from numpy.testing import assert_allclose

import dipy_spinverse.posterior as posterior
from dipy_spinverse.data import _protocol
from dipy_spinverse.files import StaleCacheError
from dipy_spinverse.posterior import TrainingOptions, calibration, shipped, shipping
from dipy_spinverse.provenance import StaleEstimatorWarning

PROTOCOL = _protocol(((0.010, 0.020), (0.010, 0.060)), (1000.0, 2500.0), 6, 2)
# The smallest training: 48 + 16 simulations of the small prior, a network
# of width 8, 3 epochs (seconds).
TINY = TrainingOptions(
    n_simulations=48,
    n_calibration=16,
    epochs=3,
    hidden=8,
    embedding=4,
    transforms=1,
    batch_size=16,
)


def _train(cache, options=TINY):
    # 3,000 rank transforms recalibrate the bounds (a minute of flow draws
    # for a network this small); 64 are plumbing enough.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(calibration, "_N_TRANSFORMS", 64)
        return posterior.load_or_train(
            SMALL_PRIOR, PROTOCOL, options, cache_dir=cache, progress=False
        )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("cache"))


def _state(net):
    return {k: v.double().numpy() for k, v in net.state_dict().items()}


def _draws(net):
    signals, _ = SMALL_PRIOR.simulator(PROTOCOL).sample(3, seed=5)
    x = torch.as_tensor(signals, dtype=torch.float32)
    return net.sample(x, torch.full((3,), 0.02), 32, generator_seed=0).numpy()


def test_one_key_and_seed_train_one_estimator(trained, tmp_path):
    """Trained again in another state of the global generators (as in
    another process, or after a fit drew from them), the same key and seed
    give the same network to float tolerance, and the same posterior draws;
    another seed gives another network. (The network's initial weights were
    drawn from torch's global generator: three trainings of one key gave
    restricted fractions 0.5097, 0.5078 and 0.5160 on one voxel.)"""
    net, path = trained
    torch.manual_seed(12345)
    torch.rand(7)
    again, again_path = _train(tmp_path / "again")
    assert again_path.name == path.name
    first, second = _state(net), _state(again)
    assert first.keys() == second.keys()
    for name in first:
        assert_allclose(second[name], first[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert_allclose(_draws(again), _draws(net), rtol=1e-5, atol=1e-5)
    other, _ = _train(tmp_path / "other", dataclasses.replace(TINY, seed=1))
    differ = _state(other)
    assert (
        max(np.abs(differ[k] - first[k]).max() for k in first if first[k].size) > 1e-3
    )


def test_a_cached_estimator_of_other_code_is_trained_again(
    trained, tmp_path, monkeypatch
):
    """The code's digest is in the cache file's name and inside it: a file
    that other code wrote (copied or renamed by hand) is never served."""
    _, path = trained
    assert path.name.endswith(f"-{shipped.estimator_code()}.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["code"] == shipped.estimator_code()
    foreign = tmp_path / path.name
    torch.save({**saved, "code": "0" * 16}, foreign)
    with pytest.raises(StaleCacheError, match="trained by other code"):
        posterior._load(foreign, len(PROTOCOL), TINY, code=shipped.estimator_code())
    monkeypatch.setattr(posterior.cache, "_train", lambda *a, **k: 1 / 0)
    with pytest.warns(UserWarning, match="trained by other code"):
        with pytest.raises(ZeroDivisionError):
            posterior.load_or_train(SMALL_PRIOR, PROTOCOL, TINY, cache_dir=tmp_path)


def test_a_shipped_estimator_serves_only_code_its_manifest_accepts(
    trained, tmp_path, monkeypatch
):
    """Shipped (``ship``) it serves the code that trained it; after a code
    change it is not used (a StaleEstimatorWarning naming the re-key
    command; the estimator is trained into the cache) until that code is
    re-keyed on purpose, with a reason."""
    _, path = trained
    folder = tmp_path / "trained"
    monkeypatch.setattr(posterior.cache, "SHIPPED", folder)
    monkeypatch.setattr(posterior.cache, "_train", lambda *a, **k: 1 / 0)
    code = shipped.estimator_code()
    target = shipping.ship(path, about="the tests' tiny estimator", folder=folder)
    settings = path.name.split("-")[1]
    assert target == folder / f"posterior-{settings}.pt"
    entry = shipped.read_manifest(folder)["estimators"][target.name]
    assert entry == dict(
        about="the tests' tiny estimator",
        kind="per_protocol",
        trained_under=code,
        accepted=[],
    )
    empty = tmp_path / "empty_cache"

    def load():
        return posterior.load_or_train(SMALL_PRIOR, PROTOCOL, TINY, cache_dir=empty)

    assert load()[1] == target
    # The code changes (as an edit of sim/ would change its digest).
    for module in (posterior.cache, shipped, shipping):
        monkeypatch.setattr(module, "estimator_code", lambda kind=None: "f" * 16)
    with pytest.warns(StaleEstimatorWarning, match="posterior rekey --reason"):
        with pytest.raises(ZeroDivisionError):  # it would train
            load()
    assert shipping.main(["--folder", str(folder)]) == 1
    with pytest.raises(ValueError, match="one-line reason"):
        shipped.rekey("  ", code="f" * 16, folder=folder)
    with pytest.raises(ValueError, match="not in the manifest"):
        shipped.rekey("why", names=["posterior-x.pt"], folder=folder)
    reason = "sim/operators.py: an optional argument; signals unchanged"
    assert shipped.rekey(reason, code="f" * 16, folder=folder) == [target.name]
    assert shipped.rekey(reason, code="f" * 16, folder=folder) == []
    assert load()[1] == target
    accepted = json.loads((folder / "manifest.json").read_text())["estimators"]
    assert [a["code"] for a in accepted[target.name]["accepted"]] == ["f" * 16]
    assert accepted[target.name]["accepted"][0]["reason"] == reason
    # Not in the manifest: never served.
    (folder / "manifest.json").unlink()
    with pytest.warns(StaleEstimatorWarning, match="not in its manifest"):
        with pytest.raises(ZeroDivisionError):
            load()


def test_the_rekey_command_records_the_current_code(trained, tmp_path, capsys):
    _, path = trained
    folder = tmp_path / "trained"
    shipping.ship(path, about="tiny", folder=folder)
    manifest = shipped.read_manifest(folder)
    name = next(iter(manifest["estimators"]))
    manifest["estimators"][name]["trained_under"] = "0" * 16
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert shipping.main(["--folder", str(folder)]) == 1
    assert "NOT ACCEPTED" in capsys.readouterr().out
    argv = ["--folder", str(folder), "rekey", "--reason", "a comment in sim/"]
    assert shipping.main(argv) == 0
    assert shipping.main(["--folder", str(folder), "check"]) == 0
    out = capsys.readouterr().out
    assert f"code {shipped.estimator_code()} (per_protocol), " in out
    assert f"accepted for: {name}" in out
    assert f"{name}: accepted" in out
