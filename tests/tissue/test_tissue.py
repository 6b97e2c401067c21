"""Tissue probability maps (dipy_spinverse.tissue): signals against a Bloch
simulation, the exact simplex solver, the model (the command:
tests/workflows/test_tissue_maps.py)."""

import sys
import warnings

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from scipy.linalg import expm
from scipy.optimize import minimize, nnls

from dipy_spinverse.tissue import (
    TISSUE_DEFAULTS,
    Flash,
    InversionRecovery,
    Mprage,
    SpinEcho,
    TissueMapModel,
    kspace_sample,
    nonneg_lstsq,
    project_simplex,
    sequence_from_string,
    simplex_lstsq,
)
from dipy_spinverse.tissue.data import simulate_scans

TISSUES_3T = TISSUE_DEFAULTS[3.0]
PROTOCOL = [
    Mprage(ti=0.9, tr=2.3, te=0.003),
    InversionRecovery(ti=2.5, tr=9.0, te=0.1),
    Flash(tr=0.02, te=0.004, flip_angle=30),
    SpinEcho(tr=4.0, te=0.1),
]


# -- an independent Bloch simulation ------------------------------------------
# One isochromat, magnetisation (Mx, My, Mz, 1) in homogeneous coordinates.
# RF pulses are rotations; free relaxation is the matrix exponential of the
# Bloch equation's generator (no closed form of the sequence is used);
# "ideal spoiling" zeroes the transverse components. The sequence is
# repeated until the steady state. The signed signal is the transverse
# component along the direction an excitation turns +z into (-y for pulses
# about x).


def _rf(angle_deg, axis):
    a = np.radians(angle_deg)
    c, s = np.cos(a), np.sin(a)
    out = np.eye(4)
    if axis == "x":
        out[1:3, 1:3] = [[c, -s], [s, c]]
    else:
        out[0, 0], out[0, 2], out[2, 0], out[2, 2] = c, s, -s, c
    return out


def _relax(duration, t1, t2):
    generator = np.zeros((4, 4))
    generator[0, 0] = generator[1, 1] = -1 / t2
    generator[2, 2] = -1 / t1
    generator[2, 3] = 1 / t1  # recovery towards M0 = 1
    return expm(generator * duration)


_SPOIL = np.diag([0.0, 0.0, 1.0, 1.0])


def bloch_steady_state(events, t1, t2, n_repeats):
    """Signal recorded at the 'record' event of the last repetition."""
    m = np.array([0.0, 0.0, 1.0, 1.0])
    ops = []
    for event in events:
        if event[0] == "rf":
            ops.append(("op", _rf(event[1], event[2])))
        elif event[0] == "relax":
            ops.append(("op", _relax(event[1], t1, t2)))
        elif event[0] == "spoil":
            ops.append(("op", _SPOIL))
        else:
            ops.append(("record", None))
    signal = None
    for _ in range(n_repeats):
        for kind, op in ops:
            if kind == "op":
                m = op @ m
            else:
                signal = -m[1]
    return signal


def _flash_events(seq):
    return [
        ("spoil",),
        ("rf", seq.flip_angle, "x"),
        ("relax", seq.te),
        ("record",),
        ("relax", seq.tr - seq.te),
    ]


def _spin_echo_events(seq):
    return [
        ("spoil",),
        ("rf", 90, "x"),
        ("relax", seq.te / 2),
        ("rf", 180, "y"),
        ("relax", seq.te / 2),
        ("record",),
        ("relax", seq.tr - seq.te),
    ]


def _inversion_events(seq):
    return [
        ("spoil",),
        ("rf", 180, "x"),
        ("relax", seq.ti),
        ("rf", 90, "x"),
        ("relax", seq.te),
        ("record",),
        ("relax", seq.tr - seq.ti - seq.te),
    ]


def _mprage_events(seq):
    events = [("spoil",), ("rf", 180, "x"), ("relax", seq.delay_before_train)]
    for i in range(seq.n_echoes):
        events += [("spoil",), ("rf", seq.flip_angle, "x"), ("relax", seq.te)]
        if i == seq.n_echoes // 2:
            events.append(("record",))
        events.append(("relax", seq.echo_spacing - seq.te))
    return events + [("spoil",), ("relax", seq.delay_after_train)]


# Steady state within (cos(a) E1)^n of the start: 3000 FLASH repetitions
# leave < 1e-10 even for a = 5 deg, TR = 20 ms and CSF (T1 = 4.3 s); a 90 or
# an inversion train reaches it after 1 (spin echo) or ~20 (MPRAGE) cycles.
BLOCH_CASES = [
    (Flash(tr=0.02, te=0.004, flip_angle=30), _flash_events, 3000),
    (Flash(tr=0.02, te=0.004, flip_angle=5), _flash_events, 3000),
    (Flash(tr=0.5, te=0.01, flip_angle=90), _flash_events, 300),
    (SpinEcho(tr=4.0, te=0.1), _spin_echo_events, 10),
    (SpinEcho(tr=0.5, te=0.015), _spin_echo_events, 10),
    (InversionRecovery(ti=0.9, tr=2.3, te=0.003), _inversion_events, 10),
    (InversionRecovery(ti=2.5, tr=9.0, te=0.1), _inversion_events, 10),
    (
        Mprage(ti=0.9, tr=2.3, te=0.003, n_echoes=40, echo_spacing=0.007),
        _mprage_events,
        30,
    ),
]


@pytest.mark.parametrize("seq, events, n_repeats", BLOCH_CASES)
@pytest.mark.parametrize("tissue", ["csf", "gm", "wm"])
def test_signal_matches_bloch_simulation(seq, events, n_repeats, tissue):
    t1, t2, pd = (TISSUES_3T[tissue][k] for k in ("t1", "t2", "pd"))
    reference = pd * bloch_steady_state(events(seq), t1, t2, n_repeats)
    # Both are exact for ideal pulses and spoiling; what separates them is
    # rounding over thousands of 4x4 products and the distance to the
    # steady state (< 1e-10): 1e-8 relative leaves a margin of 100.
    assert_allclose(seq.signal(t1, t2, pd).item(), reference, rtol=1e-8, atol=1e-12)


def test_flash_is_the_issue_formula():
    t1, t2, pd = 1.084, 0.069, 0.7
    a = np.radians(30)
    e1 = np.exp(-0.02 / t1)
    expected = pd * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1) * np.exp(-0.004 / t2)
    seq = Flash(tr=0.02, te=0.004, flip_angle=30)
    assert_allclose(seq.signal(t1, t2, pd).item(), expected, rtol=1e-14)


@pytest.mark.parametrize("seq", PROTOCOL, ids=lambda s: type(s).__name__)
def test_signal_gradients_match_finite_differences(seq):
    t1 = torch.tensor([0.9, 1.8, 4.3], dtype=torch.float64, requires_grad=True)
    t2 = torch.tensor([0.07, 0.1, 2.0], dtype=torch.float64, requires_grad=True)
    pd = torch.tensor([0.7, 0.8, 1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(seq.signal, (t1, t2, pd))


def test_inversion_signal_is_signed():
    seq = InversionRecovery(ti=0.1, tr=5.0, te=0.003)
    assert seq.signal(4.3, 2.0, 1.0).item() < 0 < seq.signal(0.1, 0.05, 1.0).item()


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: Flash(tr=-0.02, te=0.004, flip_angle=30), "tr"),
        (lambda: Flash(tr=0.02, te=0.03, flip_angle=30), "te"),
        (lambda: Flash(tr=0.02, te=0.004, flip_angle=200), "flip_angle"),
        (lambda: SpinEcho(tr=3.0, te="long"), "te"),
        (lambda: InversionRecovery(ti=3.0, tr=2.3, te=0.003), "ti"),
        (lambda: Mprage(ti=0.3, tr=2.3, te=0.003), "ti"),
        (lambda: Mprage(ti=0.9, tr=1.2, te=0.003), "tr"),
        (lambda: Mprage(ti=0.9, tr=2.3, te=0.003, n_echoes=0), "n_echoes"),
        (lambda: sequence_from_string("Rare tr=1"), "sequence"),
        (lambda: sequence_from_string("Flash tr=0.02 te=0.004"), "flip_angle"),
        (lambda: sequence_from_string("Flash tr=0.02 te=x flip_angle=3"), "te"),
        (lambda: sequence_from_string("SpinEcho tr=3 te=0.1 ti=1"), "ti"),
        (lambda: sequence_from_string("SpinEcho tr=3 te=0.1 te=0.2"), "twice"),
        # Timings in ms are refused with the conversion.
        (lambda: Flash(tr=20, te=0.004, flip_angle=30), "tr=20 s .* looks like ms"),
        (lambda: InversionRecovery(ti=2500, tr=9, te=0.1), "ti=2500 s"),
    ],
)
def test_bad_sequences_name_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_sequence_from_string():
    seq = sequence_from_string("mprage ti=0.9 tr=2.3 te=0.003 n_echoes=100")
    assert seq == Mprage(ti=0.9, tr=2.3, te=0.003, n_echoes=100)


# -- k-space sampling ---------------------------------------------------------


def test_kspace_sample_full_is_identity():
    image = torch.rand(12, 10, 3, dtype=torch.float64)
    assert_allclose(kspace_sample(image).numpy(), image.numpy(), atol=1e-12)


def test_kspace_truncation_keeps_band_limited_image():
    # frequencies 1 and 2 of 32 survive keeping the central quarter (|k| <= 4)
    x = np.arange(32)
    image = 2 + np.cos(2 * np.pi * x / 32)[:, None] * np.sin(4 * np.pi * x / 32)
    out = kspace_sample(image, axes=(0, 1), resolution=0.25, magnitude=False)
    assert_allclose(out.numpy(), image, atol=1e-12)
    blocky = np.zeros((32, 32))
    blocky[8:24, 8:24] = 1
    ringing = kspace_sample(blocky, resolution=0.25).numpy()
    assert ringing.max() > 1.05  # Gibbs overshoot at the edges


def test_partial_fourier_zero_fills_one_side():
    rng = np.random.default_rng(0)
    image = rng.random((16, 8))
    out = kspace_sample(image, axes=(0, 1), partial_fourier=0.75, magnitude=False)
    k_in = np.fft.fftshift(np.fft.fft2(image))
    k_out = np.fft.fftshift(np.fft.fft2(out.numpy()))
    frequency = np.arange(16) - 8
    kept = frequency <= 7 - 4  # 12 of 16 lines, the highest 4 zero-filled
    assert_allclose(k_out[kept], k_in[kept], atol=1e-10)
    assert_allclose(k_out[~kept], 0, atol=1e-10)


def test_kspace_sample_bad_input():
    with pytest.raises(ValueError, match="partial_fourier"):
        kspace_sample(np.ones((4, 4)), partial_fourier=0.3)
    with pytest.raises(ValueError, match="resolution"):
        kspace_sample(np.ones((4, 4)), resolution=2)


# -- exact solvers ------------------------------------------------------------


def test_simplex_lstsq_is_exact():
    rng = np.random.default_rng(1)
    design = rng.random((4, 3))
    data = rng.random((60, 4)) * 1.5
    p, rss = simplex_lstsq(torch.tensor(design), torch.tensor(data))
    p, rss = p.numpy(), rss.numpy()
    assert (p >= 0).all()
    assert_allclose(p.sum(axis=1), 1, atol=1e-12)
    assert_allclose(((p @ design.T - data) ** 2).sum(axis=1), rss, atol=1e-12)
    for y, value in zip(data, rss, strict=True):
        reference = minimize(
            lambda x, y=y: ((design @ x - y) ** 2).sum(),
            np.full(3, 1 / 3),
            bounds=[(0, 1)] * 3,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 500},
        )
        # the enumeration is exact: never worse than SLSQP beyond rounding
        assert value <= reference.fun + 1e-12


def test_nonneg_lstsq_matches_scipy_nnls():
    rng = np.random.default_rng(2)
    design = rng.normal(size=(5, 3))
    data = rng.normal(size=(40, 5))
    q, rss = nonneg_lstsq(torch.tensor(design), torch.tensor(data))
    for y, qv, value in zip(data, q.numpy(), rss.numpy(), strict=True):
        reference, norm = nnls(design, y)
        assert_allclose(value, norm**2, rtol=1e-9, atol=1e-12)
        assert_allclose(qv, reference, atol=1e-8)


def test_project_simplex_matches_bisection():
    rng = np.random.default_rng(3)
    v = rng.normal(size=(50, 4)) * 2
    p = project_simplex(torch.tensor(v)).numpy()
    for row, out in zip(v, p, strict=True):
        low, high = row.min() - 1, row.max()
        for _ in range(200):  # theta with sum(max(v - theta, 0)) = 1
            mid = (low + high) / 2
            low, high = (
                (mid, high) if np.maximum(row - mid, 0).sum() > 1 else (low, mid)
            )
        assert_allclose(out, np.maximum(row - low, 0), atol=1e-12)


# -- the model ----------------------------------------------------------------


def _phantom(shape=(9, 8, 6), seed=0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet([0.7, 0.7, 0.7], size=shape)
    p[0, 0, 0] = [1, 0, 0]
    p[0, 0, 1] = [0, 1, 0]
    p[0, 0, 2] = [0, 0, 1]
    return p


@pytest.mark.parametrize("n_sequences", [2, 3, 4])
@pytest.mark.parametrize("gain", ["global", 250.0])
def test_noise_free_signal_fit_is_exact(n_sequences, gain):
    model = TissueMapModel(PROTOCOL[:n_sequences], gain=gain)
    truth = _phantom()
    images = simulate_scans(
        model, truth, np.ones(truth.shape[:-1], bool), snr=np.inf, gain=250.0
    )
    fit = model.fit(images)
    assert_allclose(fit.probabilities, truth, atol=1e-6)
    assert_allclose(fit.gain, 250.0, rtol=1e-5)
    assert_allclose(fit.predict(), images, rtol=1e-5, atol=1e-8)


def test_voxel_gain_recovers_a_bias_field():
    model = TissueMapModel(PROTOCOL, gain="voxel")
    truth = _phantom()
    bias = np.linspace(50, 150, truth[..., 0].size).reshape(truth.shape[:-1])
    clean = model.forward(torch.tensor(truth), torch.tensor(bias)).numpy()
    fit = model.fit(clean)
    assert_allclose(fit.probabilities, truth, atol=1e-8)
    assert_allclose(fit.gain, bias, rtol=1e-8)


def test_magnitude_of_straddling_inversion_is_fitted_exactly():
    # TI = 1 s: CSF is still negative, GM and WM past their nulls
    sequences = [InversionRecovery(ti=1.0, tr=3.0, te=0.01), *PROTOCOL[2:]]
    model = TissueMapModel(sequences, gain=1.0)
    assert (model.design[0] < 0).any() and (model.design[0] > 0).any()
    truth = _phantom()
    fit = model.fit(model.forward(torch.tensor(truth)).numpy())
    assert_allclose(fit.probabilities, truth, atol=1e-8)


@pytest.mark.parametrize(
    "gain, max_iter",
    [pytest.param("global", 400, marks=pytest.mark.slow), ("voxel", 100)],
)
def test_parameter_mixing_fits_its_own_data(gain, max_iter):
    model = TissueMapModel(PROTOCOL, mixing="parameters", gain=gain, max_iter=max_iter)
    truth = _phantom(shape=(6, 5, 4))
    images = model.forward(torch.tensor(truth), 100.0).numpy()
    fit = model.fit(images)
    # Levenberg-Marquardt from the signal-mixing start, noise-free data: a
    # gain per voxel is an LM unknown and converges to rounding (1e-13); a
    # global gain alternates with the probabilities, linearly: 1e-6 after
    # 400 steps (measured 1e-6 on p, 3e-9 on the images).
    assert_allclose(fit.predict(), images, rtol=1e-6, atol=1e-9)
    assert_allclose(fit.probabilities, truth, atol=1e-5)
    assert_allclose(fit.gain, 100.0, rtol=1e-6)


def test_parameter_mixing_with_smoothness_runs_adam():
    truth = _phantom(shape=(6, 5, 4))
    model = TissueMapModel(PROTOCOL, mixing="parameters", smoothness=1e-3, max_iter=50)
    images = model.forward(torch.tensor(truth), 100.0).numpy()
    fit = model.fit(images)
    assert_allclose(fit.probabilities.sum(axis=-1), 1, atol=1e-12)
    start = TissueMapModel(PROTOCOL, mixing="signal").fit(images).predict()
    # back-propagation lowers the misfit of the signal-mixing start
    assert np.abs(fit.predict() - images).mean() < np.abs(start - images).mean()


def test_noisy_fit_accuracy_and_smoothness():
    # a smooth partial-volume ramp from mostly GM to mostly WM
    x = np.linspace(0, 1, 16)[:, None, None] * np.ones((16, 16, 4))
    truth = np.stack([0.2 + 0 * x, 0.7 - 0.5 * x, 0.1 + 0.5 * x], axis=-1)
    mask = np.ones(truth.shape[:-1], bool)
    plain = TissueMapModel(PROTOCOL[:3])
    images = simulate_scans(plain, truth, mask, snr=30, rng=0)
    error = np.abs(plain.fit(images).probabilities - truth).mean()
    # about 1 / CNR of the weakest (GM-WM) direction at SNR 30: 0.05
    assert error < 0.07
    smooth = TissueMapModel(PROTOCOL[:3], smoothness=0.01, max_iter=100)
    smooth_error = np.abs(smooth.fit(images).probabilities - truth).mean()
    # 16 x 16 x 4 voxels of one smooth ramp: the prior halves the error
    # (measured 0.053 -> 0.022); ask for a third off
    assert smooth_error < 0.67 * error


def test_noise_weighting_estimates_the_noise():
    truth = _phantom(shape=(12, 12, 8))
    mask = np.ones(truth.shape[:-1], bool)
    model = TissueMapModel(PROTOCOL)
    assert model.uses_noise_weighting  # 4 contrasts, 3 tissues
    assert not TissueMapModel(PROTOCOL[:3]).uses_noise_weighting
    images = simulate_scans(model, truth, mask, snr=40, rng=2, noise="gaussian")
    fit = model.fit(images)
    assert np.abs(fit.probabilities - truth).mean() < 0.06
    assert_allclose(fit.gain, 1000.0, rtol=0.05)


def test_fit_shapes_mask_and_labels():
    model = TissueMapModel(PROTOCOL[:3])
    truth = _phantom()
    mask = np.zeros(truth.shape[:-1], bool)
    mask[2:7, 2:6, 1:5] = True
    images = simulate_scans(model, truth, mask, snr=100, rng=1)
    fit = model.fit(images, mask=mask)
    assert fit.probabilities.shape == truth.shape
    assert_array_equal(fit.probabilities[~mask], 0)
    assert_allclose(fit.probabilities[mask].sum(axis=-1), 1, atol=1e-12)
    assert (fit.probabilities >= 0).all()
    assert_array_equal(fit.labels[~mask], 0)
    assert set(np.unique(fit.labels[mask])) <= {1, 2, 3}
    for name in ("t1", "t2", "pd"):
        assert getattr(fit, name).shape == mask.shape
    weights = np.array([TISSUES_3T[n]["t1"] for n in ("csf", "gm", "wm")])
    assert_allclose(fit.t1[mask], fit.probabilities[mask] @ weights)
    assert fit.predict().shape == images.shape


def test_single_voxel_and_default_tissues():
    model = TissueMapModel(PROTOCOL[:3], gain=1.0, field_strength=1.5)
    assert model.tissue_names == ("csf", "gm", "wm")
    assert model.tissues == TISSUE_DEFAULTS[1.5]
    p = np.array([0.2, 0.5, 0.3])
    fit = model.fit(model.forward(torch.tensor(p)).numpy())
    assert_allclose(fit.probabilities, p, atol=1e-10)


def test_one_contrast_warns():
    with pytest.warns(UserWarning, match="identify"):
        TissueMapModel(PROTOCOL[0])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sequences=[]), "sequences"),
        (dict(sequences=["flash"]), "sequences"),
        (dict(field_strength=7.0), "field_strength"),
        (dict(mixing="average"), "mixing"),
        (dict(gain="auto"), "gain"),
        (dict(gain=-1.0), "gain"),
        (dict(smoothness=-1), "smoothness"),
        (dict(max_iter=0), "max_iter"),
        (dict(device="tpu"), "device"),
        (dict(noise_weighting="yes"), "noise_weighting"),
        (dict(tissues={"gm": dict(t1=1.0, t2=0.1)}), "tissues"),
        (
            dict(tissues={"a": dict(t1=1, t2=0.1, pd=1), "b": dict(t1=-1, t2=1, pd=1)}),
            "t1",
        ),
        (dict(sequences=PROTOCOL[:2], gain="voxel"), "gain='voxel'"),
        # Relaxation times in ms are refused with the conversion.
        (
            dict(
                tissues={"a": dict(t1=1820, t2=0.1, pd=1), "b": dict(t1=1, t2=1, pd=1)}
            ),
            r"\['t1'\]=1820 s .* looks like ms",
        ),
    ],
)
def test_bad_model_options_name_the_argument(kwargs, name):
    kwargs = dict(dict(sequences=PROTOCOL[:3]), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=name):
            TissueMapModel(kwargs.pop("sequences"), **kwargs)


def test_bad_images_name_the_argument():
    model = TissueMapModel(PROTOCOL[:3])
    with pytest.raises(ValueError, match="images"):
        model.fit(np.ones((4, 4, 2)))
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="images"):
        model.fit(-np.ones((4, 4, 3)))
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="images"):
        model.fit(np.full((4, 4, 3), np.nan))
    with pytest.raises(ValueError, match="mask"):
        model.fit(np.ones((4, 4, 3)), mask=np.ones((4, 3), bool))
    with pytest.raises(ValueError, match="mask"):
        model.fit(np.ones((4, 4, 3)), mask=np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="mask holds NaN"):
        model.fit(np.ones((4, 4, 3)), mask=np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="mask holds fractions"):
        model.fit(np.ones((4, 4, 3)), mask=np.full((4, 4), 0.3))
    # An image that is zero throughout the mask has nothing to fit (it
    # raised a bare "math domain error" from the gain search).
    empty = np.ones((4, 4, 3))
    empty[..., 0] = 0.0
    with pytest.raises(ValueError, match=r"image\(s\) \[0\] of data are zero"):
        model.fit(empty)


def test_a_bad_voxel_is_left_out_and_the_rest_fitted():
    """NaN, inf or negative values in a voxel flag that voxel (NaN maps,
    ``fit.excluded``); the others are fitted as without it."""
    model = TissueMapModel(PROTOCOL[:3])
    truth = _phantom(shape=(6, 5, 4))
    mask = np.ones(truth.shape[:-1], bool)
    images = simulate_scans(model, truth, mask, snr=np.inf, gain=250.0)
    bad = images.copy()
    bad[1, 1, 1, 0] = np.nan
    bad[2, 2, 2, 1] = -3.0
    with pytest.warns(RuntimeWarning, match="2 voxel"):
        fit = model.fit(bad)
    excluded = np.zeros(mask.shape, bool)
    excluded[1, 1, 1] = excluded[2, 2, 2] = True
    assert_array_equal(fit.excluded, excluded)
    assert np.isnan(fit.probabilities[excluded]).all()
    assert_array_equal(fit.labels[excluded], 0)
    assert np.isnan(fit.predict()[excluded]).all()
    assert_allclose(fit.probabilities[~excluded], truth[~excluded], atol=1e-6)


# -- the MNI152 evaluation data ------------------------------------


@pytest.mark.slow  # importing nilearn takes ~15 s
def test_mni152_tissue_maps():
    pytest.importorskip("nilearn")
    from dipy_spinverse.tissue.data import mni152_tissue_maps

    probabilities, mask, affine = mni152_tissue_maps(resolution=2)
    assert probabilities.shape == mask.shape + (3,)
    assert 200_000 < mask.sum() < 260_000
    assert_allclose(probabilities[mask].sum(axis=-1), 1, atol=1e-9)
    assert (probabilities >= 0).all() and (probabilities <= 1).all()
    assert_array_equal(probabilities[~mask], 0)
    assert_allclose(np.abs(np.diag(affine)[:3]), 2)


def test_example_runs(tmp_path):
    pytest.importorskip("matplotlib")
    import pathlib
    import subprocess

    script = pathlib.Path(__file__).parents[2] / "examples" / "tissue_maps.py"
    run = subprocess.run(
        [sys.executable, str(script), "--phantom", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mean absolute probability error" in run.stdout
    assert (tmp_path / "tissue_maps.png").stat().st_size > 0


# -- bad input is refused or flagged (issue 45) ---------------------------------


def test_poor_fits_are_flagged_and_counted():
    """Images the model cannot explain get status POOR_FIT and a warning
    counting them, instead of confident labels."""
    from dipy_spinverse.tissue.model import MASKED, OK, POOR_FIT, STATUS_CODES

    model = TissueMapModel(PROTOCOL[:3])
    truth = _phantom(shape=(6, 5, 4))
    mask = np.ones(truth.shape[:-1], bool)
    images = simulate_scans(model, truth, mask, snr=np.inf, gain=250.0)
    mask[0] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = model.fit(images, mask=mask)
    assert_array_equal(fit.status[mask], OK)
    assert_array_equal(fit.status[~mask], MASKED)
    assert fit.misfit[mask].max() < 1e-6
    # A voxel whose images no mixture of the tissues gives.
    images[1, 1, 1] = images[mask].max(axis=0) * [1.0, 0.02, 1.0]
    with pytest.warns(RuntimeWarning, match="1 of 100 voxel.*POOR_FIT"):
        fit = model.fit(images, mask=mask)
    poor = np.zeros(mask.shape, bool)
    poor[1, 1, 1] = True
    assert_array_equal(fit.status == POOR_FIT, poor)
    assert (fit.misfit[poor] > model.misfit_threshold).all()
    assert POOR_FIT in STATUS_CODES


def test_images_in_another_order_than_the_sequences_are_refused():
    """Images listed in another order than their sequences gave a 98 %
    misfit and every voxel one label, silently: the order that fits is
    named."""
    model = TissueMapModel(PROTOCOL[:3])
    truth = _phantom(shape=(6, 5, 4))
    mask = np.ones(truth.shape[:-1], bool)
    images = simulate_scans(
        model, truth, mask, snr=30.0, gain=250.0, rng=np.random.default_rng(1)
    )
    # image j of the data holds sequence order[j]
    with pytest.raises(ValueError, match=r"order \[1, 2, 0\] of the sequences"):
        model.fit(images[..., [1, 2, 0]])
    # Identical sequences have no other order: the voxels are flagged.
    same = TissueMapModel([PROTOCOL[2]] * 3)
    with pytest.warns(RuntimeWarning, match="POOR_FIT"):
        same.fit(images)


@pytest.mark.parametrize(
    "tissues, match",
    [
        (
            {"a": dict(t1=1.0, t2=1.5, pd=1.0), "b": dict(t1=2, t2=0.1, pd=1)},
            r"tissues\['a'\] has t2=1.5 s longer than t1=1 s",
        ),
        (
            {
                "gm": dict(t1=1.8, t2=0.1, pd=0.8),
                "wm": dict(t1=1.0, t2=0.07, pd=0.7),
                "gm2": dict(t1=1.8, t2=0.1, pd=0.8),
            },
            "tissues 'gm' and 'gm2' have the same",
        ),
    ],
)
def test_impossible_or_duplicate_tissues_are_refused(tissues, match):
    with pytest.raises(ValueError, match=match):
        TissueMapModel(PROTOCOL[:3], tissues=tissues)
