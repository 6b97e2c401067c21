"""Tests of the learned estimators (``fit_method="learned"``).

Networks are trained on small simulated sets in ``tmp_path`` (a few seconds
each): the checks are of the machinery (cache, keys, layout, clamping,
options) and of a recovery far better than chance, not of the accuracy
reached with the default training (measured in benchmarks/compartments.py).
"""

import numpy as np
import pytest
import torch
from dipy.core.gradients import gradient_table
from numpy.testing import assert_allclose

from dipy_spinverse.compartments import (
    ActiveAxModel,
    ExchangeModel,
    IvimCompartmentModel,
    NoddiModel,
    ZcdModel,
)
from dipy_spinverse.compartments.learned import LearnedOptions, cache_dir
from dipy_spinverse.files import CACHE_ENV

TINY = {"n_train": 2000, "epochs": 2, "hidden": (32, 32), "batch_size": 256}


MODELS = [
    (NoddiModel, {}),
    (NoddiModel, {"n_fibres": 2}),
    (ActiveAxModel, {}),
    (ZcdModel, {}),
    (ExchangeModel, {}),
]


@pytest.mark.parametrize(("cls", "kwargs"), MODELS)
def test_every_model_learns_and_caches(gtab_shells, tmp_path, capsys, cls, kwargs):
    model = cls(
        gtab_shells,
        fit_method="learned",
        learned_options=TINY,
        cache_dir=tmp_path,
        **kwargs,
    )
    truth = cls(gtab_shells, **kwargs)
    rng = np.random.default_rng(0)
    x, c = truth._sample_training(6, rng)
    with torch.no_grad():
        shared, fibre, dirs = truth._unpack(x)
        params = truth._to_params(shared, fibre, dirs, c, torch.full((6,), 50.0))
    data = truth._fit_class(truth, params.numpy()).predict()
    fit = model.fit(data.reshape(2, 3, -1))
    printed = capsys.readouterr().out
    assert "trained the" in printed and "simulated " in printed
    assert fit.model_params.shape == (2, 3, len(model.param_names))
    assert np.isfinite(fit.model_params).all()
    # S0 is the b = 0 mean times a ratio near 1; directions are unit, z >= 0.
    assert_allclose(fit.S0, 50.0, rtol=0.3)
    dirs = fit.directions
    assert_allclose(np.linalg.norm(dirs, axis=-1), 1.0, rtol=1e-10)
    assert np.all(dirs[..., 2] >= 0)
    files = list(tmp_path.glob(f"{cls.__name__}-*.pt"))
    assert len(files) == 1
    # A second model with the same definition loads the network: no training,
    # the same estimates.
    again = cls(
        gtab_shells,
        fit_method="learned",
        learned_options=TINY,
        cache_dir=tmp_path,
        **kwargs,
    )
    assert_allclose(again.fit(data).model_params, fit.model_params.reshape(6, -1))
    assert "trained the" not in capsys.readouterr().out


def test_cache_key(gtab_shells, gtab_ivim, tmp_path):
    base = IvimCompartmentModel(gtab_ivim, fit_method="learned", learned_options=TINY)
    key = base._learned_key()
    assert IvimCompartmentModel(gtab_ivim, learned_options=TINY)._learned_key() == key
    # Fitting options do not change what is learned.
    assert (
        IvimCompartmentModel(gtab_ivim, learned_options=TINY, max_iter=7)._learned_key()
        == key
    )
    # Noise, training options, the table and the model all do.
    assert (
        IvimCompartmentModel(gtab_ivim, learned_options=TINY, snr=20)._learned_key()
        != key
    )
    other = {**TINY, "seed": 1}
    assert IvimCompartmentModel(gtab_ivim, learned_options=other)._learned_key() != key
    b = gtab_ivim.bvals.copy()
    b[-1] = 900.0
    g2 = gradient_table(b, bvecs=gtab_ivim.bvecs, b0_threshold=0)
    assert IvimCompartmentModel(g2, learned_options=TINY)._learned_key() != key
    # The b = 0 mask normalises the inputs and the S0 target: the same
    # b-values with another b0_threshold are another network.
    g3 = gradient_table(gtab_ivim.bvals, bvecs=gtab_ivim.bvecs, b0_threshold=50)
    assert IvimCompartmentModel(g3, learned_options=TINY)._learned_key() != key
    noddi = NoddiModel(gtab_shells, learned_options=TINY)
    signal = NoddiModel(gtab_shells, learned_options=TINY, extra_average="signal")
    assert noddi._learned_key() != signal._learned_key()
    # How the outputs are read back does too.
    linear = IvimCompartmentModel(gtab_ivim, learned_options=TINY)
    linear._log_targets = ("f",)
    assert linear._learned_key() != key
    # The signals depend on each gradient axis, not its sign, nor on a b = 0
    # volume's vector: such tables reuse the network; another axis does not.
    bvecs = gtab_shells.bvecs.copy()
    bvecs[1::2] *= -1
    bvecs[gtab_shells.b0s_mask] = [0.0, 0.0, 1.0]
    timing = dict(big_delta=gtab_shells.big_delta, small_delta=gtab_shells.small_delta)
    flipped = gradient_table(gtab_shells.bvals, bvecs=bvecs, **timing)
    same = NoddiModel(flipped, learned_options=TINY)
    assert same._learned_key() == noddi._learned_key()
    moved = bvecs.copy()
    moved[np.flatnonzero(~gtab_shells.b0s_mask)[0]] = [0.0, 0.6, 0.8]
    moved_gtab = gradient_table(gtab_shells.bvals, bvecs=moved, **timing)
    other_axis = NoddiModel(moved_gtab, learned_options=TINY)
    assert other_axis._learned_key() != noddi._learned_key()


def test_another_models_cache_file_is_trained_again(gtab_ivim, tmp_path):
    """A readable network of other widths under this model's key (a file
    copied by hand) is trained again with a warning; it failed the fit with
    "The size of tensor a (13) must match ..."."""
    options = dict(fit_method="learned", cache_dir=tmp_path)
    wide = IvimCompartmentModel(
        gtab_ivim, learned_options={**TINY, "hidden": (16,)}, **options
    )
    model = IvimCompartmentModel(gtab_ivim, learned_options=TINY, **options)
    assert wide.regressor is not None
    foreign = tmp_path / f"IvimCompartmentModel-{wide._learned_key()}.pt"
    path = tmp_path / f"IvimCompartmentModel-{model._learned_key()}.pt"
    path.write_bytes(foreign.read_bytes())
    with pytest.warns(UserWarning, match=r"is not this model's.*training it again"):
        net = model.regressor
    assert net.x_mean.numel() == model._n_network_inputs()
    data = 100 * np.exp(-gtab_ivim.bvals * 1e-3)[None]
    assert np.isfinite(model.fit(data).model_params).all()


def test_unreadable_cache_file_is_trained_again(gtab_ivim, tmp_path):
    model = IvimCompartmentModel(
        gtab_ivim, fit_method="learned", learned_options=TINY, cache_dir=tmp_path
    )
    path = tmp_path / f"IvimCompartmentModel-{model._learned_key()}.pt"
    path.write_bytes(b"cut short")
    with pytest.warns(UserWarning, match="cannot be read.*training it again"):
        assert model.regressor is not None
    fresh = IvimCompartmentModel(
        gtab_ivim, fit_method="learned", learned_options=TINY, cache_dir=tmp_path
    )
    assert fresh.regressor is not None  # the file was replaced by a whole one
    assert path.stat().st_size > 1000
    # A cache folder that cannot be written is refused before training.
    blocked = tmp_path / "a file"
    blocked.write_text("")
    model = IvimCompartmentModel(
        gtab_ivim, fit_method="learned", learned_options=TINY, cache_dir=blocked
    )
    with pytest.raises(ValueError, match="cannot write the learned estimator"):
        model.regressor  # noqa: B018


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "given") == tmp_path / "given"
    # "~" is the user's home, not a folder named "~" (as for every path).
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir("~/given") == tmp_path / "given"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_dir().parts[-2:] == (".cache", "dipy_spinverse")


def test_learned_ivim_recovers_far_better_than_chance(gtab_ivim, tmp_path):
    options = {"n_train": 20000, "epochs": 8, "hidden": (64, 64), "seed": 3}
    model = IvimCompartmentModel(
        gtab_ivim,
        fit_method="learned",
        snr=50,
        learned_options=options,
        cache_dir=tmp_path,
    )
    rng = np.random.default_rng(1)
    V = 400
    f = rng.uniform(0.05, 0.3, V)
    d_star = rng.uniform(0.01, 0.05, V)
    D = rng.uniform(0.5e-3, 1.5e-3, V)
    params = np.column_stack([np.full(V, 100.0), f, d_star, D])
    clean = model._fit_class(model, params).predict()
    noisy = np.abs(
        clean + rng.normal(0, 2, clean.shape) + 1j * rng.normal(0, 2, clean.shape)
    )
    fit = model.fit(noisy)
    # Chance (the prior's spread: f uniform in (0, 1), D in (0, 4e-3)) gives
    # median errors ~0.3 and ~1.5e-3; measured here 0.030 and 8e-5 (the
    # fitted IVIM: 0.015 and 5e-5); bounds at twice the measured.
    assert np.median(np.abs(fit.perfusion_fraction - f)) < 0.06
    assert np.median(np.abs(fit.D - D)) < 1.6e-4


def test_learned_bad_input(gtab_shells, gtab_ivim):
    with pytest.raises(ValueError, match="fit_method"):
        IvimCompartmentModel(gtab_ivim, fit_method="nn")
    with pytest.raises(ValueError, match="unknown learned_options"):
        IvimCompartmentModel(gtab_ivim, learned_options={"layers": 3})
    with pytest.raises(ValueError, match="snr"):
        IvimCompartmentModel(gtab_ivim, snr=0)
    with pytest.raises(ValueError, match="n_train"):
        LearnedOptions.from_dict({"n_train": 1})
    for hidden in (32, "32"):
        with pytest.raises(
            ValueError, match=r"learned_options\['hidden'\].*\(64, 64\)"
        ):
            LearnedOptions.from_dict({"hidden": hidden})
    with pytest.raises(ValueError, match="fibres='auto'"):
        NoddiModel(gtab_shells, fibres="auto", fit_method="learned")
    with pytest.raises(ValueError, match=r"learned_options\['device'\].*'cpu'"):
        LearnedOptions.from_dict({"device": "tpu"})
    assert IvimCompartmentModel(gtab_ivim).fit_method == "varpro"


def test_training_device_is_not_in_the_cache_key(gtab_ivim):
    on_cpu = IvimCompartmentModel(gtab_ivim, learned_options={**TINY, "device": "cpu"})
    assert (
        on_cpu._learned_key()
        == IvimCompartmentModel(gtab_ivim, learned_options=TINY)._learned_key()
    )
    assert "device" not in on_cpu.learned_options.training_description()


def test_whole_number_options_are_kept_as_ints(gtab_ivim):
    """1e5, 64.0, np.int64(0), (8.0,): accepted as the integers they are and
    stored as such (torch refused them at training time), with the cache key
    of the plain values (np.int64(64) trained a second network before)."""
    plain = LearnedOptions.from_dict(
        {"n_train": 100000, "epochs": 2, "batch_size": 64, "hidden": (8,), "seed": 0}
    )
    written = LearnedOptions.from_dict(
        {
            "n_train": 1e5,
            "epochs": 2.0,
            "batch_size": np.int64(64),
            "hidden": (8.0,),
            "seed": np.int64(0),
            "lr": np.float64(2e-3),
            "frame": np.bool_(True),
        }
    )
    assert written == plain
    for name in ("n_train", "epochs", "batch_size", "seed"):
        assert type(getattr(written, name)) is int
    assert type(written.hidden[0]) is int and type(written.lr) is float
    assert written.training_description() == plain.training_description()
    keys = [
        IvimCompartmentModel(
            gtab_ivim, learned_options={**TINY, "n_train": n}
        )._learned_key()
        for n in (64, np.int64(64), 64.0)
    ]
    assert len(set(keys)) == 1


@pytest.mark.gpu
def test_network_trained_on_cuda_serves_cpu_fits(gtab_shells, tmp_path):
    """Trained on the GPU, the network is saved and used on the CPU; its
    training loss follows the CPU's (same data and schedule; only the
    rounding and the random stream differ), so the two networks' estimates
    of the same voxels agree to the spread of tiny networks: both start from
    the same weights (seeded on the CPU), so after 16 steps their median
    ODIs differ by far less than the prior's spread (0.3), bound 0.1."""
    fits = []
    for device in ("cpu", "cuda"):
        model = NoddiModel(
            gtab_shells,
            fit_method="learned",
            learned_options={**TINY, "device": device, "polish": 0},
            cache_dir=tmp_path / device,
        )
        assert next(model.regressor.parameters()).device.type == "cpu"
        rng = np.random.default_rng(0)
        x, c = model._sample_training(20, rng)
        with torch.no_grad():
            shared, fibre, dirs = model._unpack(x)
            params = model._to_params(shared, fibre, dirs, c, torch.ones(20))
        fits.append(model.fit(model._fit_class(model, params.numpy()).predict()))
    assert np.isfinite(fits[1].model_params).all()
    assert np.median(np.abs(fits[1].odi - fits[0].odi)) < 0.1


def test_set_loss_is_invariant_to_the_order_of_fibres():
    from dipy_spinverse.compartments.learned import set_loss

    rng = np.random.default_rng(3)
    groups = torch.tensor([[1, 2, 5], [3, 4, 6]])
    z = torch.tensor(rng.standard_normal((4, 8)))
    y = torch.tensor(rng.standard_normal((4, 8)))
    swapped = y.clone()
    swapped[:, groups[0]], swapped[:, groups[1]] = y[:, groups[1]], y[:, groups[0]]
    assert_allclose(set_loss(z, y, groups), set_loss(z, swapped, groups), rtol=1e-12)
    # The least over the two orders, each the plain squared error.
    plain = ((z - y) ** 2).mean(-1)
    assert torch.all(set_loss(z, y, groups) <= plain + 1e-12)
    assert_allclose(set_loss(y, y, groups), 0.0, atol=0)
    assert_allclose(set_loss(z, y, None), plain, rtol=1e-12)


def test_two_fibre_groups_cover_each_fibre(gtab_shells):
    model = NoddiModel(gtab_shells, n_fibres=2)
    groups = model._fibre_target_groups()
    # Per fibre: w, ndi, odi and the 6 outer-product entries; S0 and fiso in
    # no group; every target column at most once.
    assert groups.shape == (2, 9)
    assert len(set(groups.ravel())) == 18
    assert {0, 1}.isdisjoint(groups.ravel())
    assert NoddiModel(gtab_shells)._fibre_target_groups() is None


def test_noisy_batches_are_rician_and_normalised(gtab_shells):
    # Rician noise at SNR 50 on signals 0.5 (b = 0: 1): at this SNR the
    # magnitude's spread is the Gaussian sigma to O(sigma^2 / S) (2 %); the
    # sample std over 4000 x 100 values is within 1 % of it.
    model = ZcdModel(gtab_shells, snr=50)
    b0s = torch.as_tensor(model._b0s)
    clean = torch.full((4000, len(model._b0s)), 0.5, dtype=torch.float32)
    clean[:, b0s] = 1.0
    targets = torch.ones(4000, 3, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    inputs, out = model._noisy_batch(clean, targets, gen)
    s0 = 1.0 / out[:, 0]
    # The S0 target is divided by the b = 0 mean the inputs are divided by.
    assert_allclose(inputs[:, b0s].mean(-1), 1.0, rtol=1e-5)
    noisy = inputs * s0[:, None]
    assert_allclose(noisy[:, ~b0s].std(), 1 / 50, rtol=0.03)
    assert_allclose(out[:, 1:], 1.0)
    # A new draw each call.
    again, _ = model._noisy_batch(clean, targets, gen)
    assert not torch.equal(again, inputs)


def test_exchange_time_targets_are_logarithms(gtab_shells):
    model = ExchangeModel(gtab_shells)
    params = np.array([[1.0, 0.5, 0.5e-3, 2e-3, 0.05], [1.0, 0.3, 1e-3, 2.5e-3, 1.5]])
    targets, keep = model._to_targets(params)
    assert_allclose(targets[:, keep.index(4)], np.log(params[:, 4]), rtol=1e-14)
    assert_allclose(targets[:, keep.index(3)], params[:, 3])
    back = model._from_targets(targets, np.ones(2))
    assert_allclose(back, params, rtol=1e-14)
    # Diameters stay linear (their error is judged in um).
    assert ActiveAxModel(gtab_shells)._log_target_columns() == []
    # 3-fibre NODDI's ODI of every fibre (suffixed names), and nothing else;
    # with fewer fibres none.
    assert NoddiModel(gtab_shells, n_fibres=2)._log_target_columns() == []
    noddi = NoddiModel(gtab_shells, n_fibres=3)
    logs = noddi._log_target_columns()
    assert [noddi.param_names[i] for i in logs] == ["odi_0", "odi_1", "odi_2"]
    fibres = [[0.3, 0.6, 0.03, 1, 0, 0], [0.3, 0.7, 0.4, 0, 1, 0]]
    params = np.array([[1.0, 0.1, *fibres[0], *fibres[1], 0.3, 0.5, 0.2, 0, 0, 1]])
    targets, keep = noddi._to_targets(params)
    assert_allclose(targets[:, keep.index(logs[0])], np.log(0.03), rtol=1e-14)
    assert_allclose(noddi._from_targets(targets, np.ones(1)), params, atol=1e-12)


def test_training_prior_of_several_fibres(gtab_shells):
    # 3-fibre NODDI's prior: fibres pairwise >= 30 degrees apart (the fibre
    # count's rule), ODI log-uniform, free water Beta(1, 3) (mean 1/4, as a
    # flat Dirichlet over 4 columns), the tissue split Dirichlet(2) (each
    # share's mean 1/3, variance 2/63). 20,000 draws: the sample means are
    # within 3 standard errors (<= 0.006) of the stated values.
    model = NoddiModel(gtab_shells, n_fibres=3)
    x, c = model._sample_training(20_000, np.random.default_rng(0))
    _, fibre, dirs = model._unpack(x)
    cos = torch.einsum("nkc,njc->nkj", dirs, dirs).abs()
    off = cos[:, ~torch.eye(3, dtype=torch.bool)]
    assert off.max() <= np.cos(np.radians(30.0)) + 1e-12
    log_odi = torch.log(fibre["odi"]).numpy().ravel()
    lo, hi = np.log(0.01), np.log(0.99)
    assert_allclose(log_odi.mean(), (lo + hi) / 2, atol=0.03)
    assert_allclose(log_odi.std(), (hi - lo) / np.sqrt(12), rtol=0.01)
    c = c.numpy()
    assert_allclose(c.sum(1), 1.0, rtol=1e-12)
    assert_allclose(c[:, 3].mean(), 0.25, atol=0.006)
    share = c[:, :3] / c[:, :3].sum(1, keepdims=True)
    assert_allclose(share.var(0), 2 / 63, rtol=0.05)


def _smallest_angle_deg(dirs):
    cos = np.abs(np.einsum("nkc,njc->nkj", dirs, dirs))
    cos = cos[:, ~np.eye(dirs.shape[1], dtype=bool)]
    return np.degrees(np.arccos(np.clip(cos.max(-1), 0.0, 1.0)))


def test_near_orthogonal_triples():
    from dipy_spinverse.compartments.amortised import _near_orthogonal

    # Axes of random frames, each tilted by at most 20 degrees: unit
    # vectors, pairwise at least 90 - 2 x 20 = 50 degrees apart; the frame
    # nearest to them (the polar factor of the three vectors) is at most as
    # far, in summed squared distance, as the frame they were drawn from,
    # so that sum is <= 3 (2 sin 10 deg)^2; and isotropic overall: the mean
    # of v v^T over 60,000 vectors is I / 3 within 0.01 (about 5 standard
    # errors of 0.0016).
    v = _near_orthogonal(20_000, np.random.default_rng(2))
    assert_allclose(np.linalg.norm(v, axis=-1), 1.0, rtol=1e-12)
    assert _smallest_angle_deg(v).min() >= 50.0 - 1e-9
    u, _, wt = np.linalg.svd(v)
    nearest = u @ wt
    assert np.all(
        np.sum((v - nearest) ** 2, axis=(1, 2))
        <= 3 * (2 * np.sin(np.radians(10))) ** 2 + 1e-12
    )
    second = np.einsum("nkc,nkd->cd", v, v) / (3 * len(v))
    assert_allclose(second, np.eye(3) / 3, atol=0.01)


def test_three_fibre_prior_holds_perpendicular_triples(gtab_shells):
    # Half of 3-fibre NODDI's draws are nearly perpendicular triples (every
    # pair >= 50 degrees apart), the rest separated uniform draws, of which
    # a share q is that wide too; q is measured here on _separated's own
    # draws. 20,000 draws: within 4 standard errors (0.014) of 1/2 + q/2.
    from dipy_spinverse.compartments.amortised import _separated

    rng = np.random.default_rng(3)
    model = NoddiModel(gtab_shells, n_fibres=3)
    x, _ = model._sample_training(20_000, rng)
    smallest = _smallest_angle_deg(model._unpack(x)[2].numpy())
    uniform = rng.standard_normal((20_000, 3, 3))
    uniform /= np.linalg.norm(uniform, axis=-1, keepdims=True)
    uniform = _smallest_angle_deg(_separated(uniform, rng))
    q = np.mean(uniform >= 50.0)
    assert_allclose(np.mean(smallest >= 50.0), 0.5 + 0.5 * q, atol=0.014)
    # Triples within 10 degrees of perpendicular, which the network failed
    # on: about 0.5 % of separated uniform draws, over ten times that here.
    assert np.mean(smallest >= 80.0) > 10 * np.mean(uniform >= 80.0)


def test_separation_redraws_only_close_directions():
    from dipy_spinverse.compartments.amortised import _separated

    rng = np.random.default_rng(1)
    dirs = np.array([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]] * 3)
    dirs[1, 1] = [np.cos(0.1), np.sin(0.1), 0.0]  # 5.7 degrees from the first
    dirs[2, 2] = [0.0, -1.0, 0.0]  # the second one's axis
    out = _separated(dirs, rng)
    assert_allclose(out[0], dirs[0])
    assert_allclose(out[1, [0, 2]], dirs[1, [0, 2]])
    assert_allclose(out[2, :2], dirs[2, :2])
    for v in out:
        cos = np.abs(v @ v.T)[~np.eye(3, dtype=bool)]
        assert cos.max() <= np.cos(np.radians(30.0))
        assert_allclose(np.linalg.norm(v, axis=1), 1.0)


def test_concurrent_writers_of_one_key_both_succeed(tmp_path, monkeypatch):
    # Two processes training the same key (two subjects, one protocol): the
    # second one saves and renames between the first one's save and rename.
    # With one shared temporary name the first rename then found no file
    # (FileNotFoundError in 2 of 4 real trials); each writer now has its own.
    from dipy_spinverse.compartments import learned
    from dipy_spinverse.files import BUILD_LOCK_SUFFIX

    x = np.random.default_rng(0).normal(size=(64, 3))
    options = LearnedOptions(**{**TINY, "n_train": 64, "epochs": 1})
    save = torch.save
    other = []

    def save_then_let_the_other_finish(obj, f):
        save(obj, f)
        if not other:
            other.append(1)
            learned.load_or_train(
                "k", lambda: (x, x[:, :2]), options, directory=tmp_path
            )

    monkeypatch.setattr(learned.torch, "save", save_then_let_the_other_finish)
    net, path = learned.load_or_train(
        "k", lambda: (x, x[:, :2]), options, directory=tmp_path
    )
    assert other and path.exists()
    # No temporary file left; the build's lock file stays (files.load_or_build).
    names = [p.name for p in tmp_path.iterdir()]
    assert sorted(names) == [path.name, path.name + BUILD_LOCK_SUFFIX]


class _FixedRegressor:
    """A stand-in network that predicts the same targets for every voxel."""

    def __init__(self, targets):
        self.targets = np.asarray(targets, np.float32)

    def predict(self, inputs):
        return np.tile(self.targets, (len(inputs), 1))


@pytest.mark.parametrize("cls", [NoddiModel, ActiveAxModel, ZcdModel])
def test_learned_fibres_come_strongest_first(gtab_shells, cls):
    """The network's fibres come in no order; the fit sorts them as the
    fitted estimates are sorted: by weight (NODDI) or fic_k + fee_k
    (ActiveAx, ZCD), not by the first target alone (fic_k)."""
    model = cls(
        gtab_shells,
        n_fibres=2,
        fit_method="learned",
        learned_options={"polish": 0, "frame": False},
    )
    values = {
        "S0": 1.0, "fiso": 0.05, "fdot": 0.0, "d_par": 1.7e-3, "d_perp": 0.5e-3,
        "ndi": 0.6, "odi": 0.1, "diameter": 4.0,
    }  # fmt: skip
    # Fibre 0 is the weaker (0.35 against 0.6) but has the larger fic.
    per_fibre = [
        {"w": 0.35, "fic": 0.30, "fee": 0.05, "x": 1.0, "y": 0.0, "z": 0.0},
        {"w": 0.60, "fic": 0.20, "fee": 0.40, "x": 0.0, "y": 1.0, "z": 0.0},
    ]
    params = []
    for name in model.param_names:
        stem, _, k = name.rpartition("_")
        params.append(
            per_fibre[int(k)].get(stem, values.get(stem)) if stem else values[name]
        )
    targets = model._to_targets(np.array([params], float))[0][0]
    model.__dict__["regressor"] = _FixedRegressor(targets)
    fit = model.fit(np.ones((1, len(gtab_shells.bvals))))
    weight = fit.fibre_fractions if cls is NoddiModel else fit.fic + fit.fee
    assert weight[0, 0] > weight[0, 1]
    assert_allclose(np.abs(fit.directions[0, 0]), [0.0, 1.0, 0.0], atol=1e-6)


def test_learned_voxel_beyond_float32_is_nan_alone(gtab_shells):
    """A b = 0 signal of 1e-39 leaves normalised signals finite in float64
    but beyond the float32 network's range: that voxel gets NaN, the other
    is estimated (before, NaN outputs stopped the whole fit in eigh)."""
    model = NoddiModel(gtab_shells, fit_method="learned", learned_options={"polish": 0})
    params = np.array([[1.0, 0.1, 1.0, 0.6, 0.1, 0.0, 0.0, 1.0]])
    targets = model._to_targets(params)[0][0]
    model.__dict__["regressor"] = _FixedRegressor(targets)
    data = np.ones((2, len(gtab_shells.bvals)))
    data[1, gtab_shells.b0s_mask] = 1e-39
    fit = model.fit(data)
    assert np.isfinite(fit.odi[0]) and np.isnan(fit.odi[1])
    assert_allclose(fit.odi[0], 0.1, rtol=1e-5)


def test_training_leaves_the_global_torch_generator_alone(gtab_ivim, tmp_path):
    """The network's weights are seeded (the same training, the same net)
    without reseeding the user's torch generator."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first, second = (
        IvimCompartmentModel(
            gtab_ivim, learned_options=TINY, cache_dir=tmp_path / name
        ).regressor
        for name in "ab"
    )
    assert torch.equal(torch.rand(3), expected)
    for a, b in zip(*(n.state_dict().values() for n in (first, second)), strict=True):
        assert torch.equal(a, b)
