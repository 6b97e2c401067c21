"""The mixing prior (posterior.mixture_prior) and the bundle tables it reads:
shells interpolated between simulated b-values, voxels drawn and mixed,
bad settings named, and the prior predictive check holding its own draws."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import Protocol
from dipy_spinverse.posterior.mixture import (
    MAX_RUNGS,
    BundleResponse,
    b_rungs,
    bundle_water,
    shell_keys,
)
from dipy_spinverse.posterior.mixture_prior import (
    MIXTURE_DESCRIPTORS,
    MixturePrior,
)
from dipy_spinverse.posterior.noise import add_noise
from dipy_spinverse.posterior.white_matter import WhiteMatterPrior

#: Coarse, small bundles: cheap sections (as the library's tests).
SMALL = WhiteMatterPrior.fixed(
    n_axons=(4, 6), mean_diameter=(2.0, 4.0), fibre_fraction=(0.5, 0.7)
)
SUBSTEPS = 2


def _pgse(bvals, bvecs):
    return Protocol.pgse(bvals, bvecs, small_delta=0.01, big_delta=0.03)


# -- the tables: b-values simulated and interpolated ---------------------------
def test_jittered_b_values_are_simulated_at_their_ends():
    """Scanner jitter about one b is one group, simulated at its lowest and
    highest value; b = 0 where the protocol has it."""
    bvals = [0.0, 995.0, 1000.0, 1004.0, 3000.0, 3010.0]
    protocol = _pgse(bvals, np.r_[[[0, 0, 0]], np.eye(3), np.eye(3)[:2]])
    (rungs,) = b_rungs(shell_keys(protocol)[0]).values()
    assert rungs == [0.0, 995.0, 1004.0, 3000.0, 3010.0]


def test_many_gradient_strengths_are_simulated_on_a_ladder():
    """Fifty strengths of one waveform: a geometric ladder of MAX_RUNGS from
    the lowest b to the highest, both exact."""
    bvals = np.linspace(5.0, 9000.0, 50)
    protocol = _pgse(bvals, np.tile([1.0, 0, 0], (50, 1)))
    (rungs,) = b_rungs(shell_keys(protocol)[0]).values()
    assert len(rungs) == MAX_RUNGS
    assert rungs[0] == 5.0 and rungs[-1] == 9000.0
    assert_allclose(np.diff(np.log(rungs)), np.log(9000.0 / 5.0) / (MAX_RUNGS - 1))


def test_interpolated_shells_match_their_own_tables():
    """A waveform of 14 strengths (300-9000 s/mm^2) is simulated on the
    ladder and interpolated; a shell between rungs reads as the table of that
    shell simulated alone, along and across the fibres and dispersed.
    Measured 2.6e-4 at most (b = 0 of this echo time is ~0.5); 1e-3 is a
    tenth of the noise at SNR 100. The rest of the difference is each
    table's own Legendre truncation (``tol`` 1e-4)."""
    draw = SMALL.draw(np.random.default_rng(2))
    bvals = np.r_[0.0, np.linspace(300.0, 9000.0, 14)]
    bvecs = np.r_[[[0, 0, 0]], np.tile([1.0, 0, 0], (14, 1))]
    protocol = _pgse(bvals, bvecs)
    assert len(next(iter(b_rungs(shell_keys(protocol)[0]).values()))) < 15
    table = BundleResponse.tabulate(SMALL, draw, protocol, substeps=SUBSTEPS)
    for i in (3, 8):  # b 1931, 5276: between rungs
        alone_protocol = _pgse([bvals[i]], [[1.0, 0, 0]])
        alone = BundleResponse.tabulate(SMALL, draw, alone_protocol, substeps=SUBSTEPS)
        for axis, kappa in (
            ([0, 0, 1.0], np.inf),
            ([1.0, 0, 0], np.inf),
            ([0.6, 0, 0.8], np.inf),
            ([0.6, 0, 0.8], 5.0),
        ):
            assert_allclose(
                table.signals(protocol, axis, kappa)[i],
                alone.signals(alone_protocol, axis, kappa)[0],
                atol=1e-3,
            )


# -- the prior -------------------------------------------------------------------
PROTOCOL = _pgse(
    np.r_[0.0, [1000.0] * 6, [3000.0] * 6],
    np.r_[[[0, 0, 0]], np.tile(np.eye(3), (4, 1))],
)


def _prior(**changes):
    return MixturePrior.fixed(**{"bundles": SMALL, "n_library": 3, **changes})


@pytest.fixture(scope="module")
def simulator(tmp_path_factory):
    """The small prior bound to PROTOCOL, its library simulated once."""
    cache = tmp_path_factory.mktemp("cache")
    return _prior().simulator(PROTOCOL, cache_dir=cache, substeps=SUBSTEPS)


def test_a_voxel_is_drawn_within_the_ranges():
    prior = _prior()
    rng = np.random.default_rng(0)
    for _ in range(50):
        draw = prior.draw(rng)
        low, high = prior.bundles_per_voxel
        assert low <= len(draw.bundles) <= high
        assert np.all((draw.bundles >= 0) & (draw.bundles < prior.n_library))
        total = draw.shares.sum() + draw.free_water + draw.dot
        assert_allclose(total, 1.0, atol=1e-12)
        assert prior.free_water_fraction[0] <= draw.free_water
        assert draw.free_water <= prior.free_water_fraction[1]
        assert prior.dot_fraction[0] <= draw.dot <= prior.dot_fraction[1]
        assert prior.free_t2[0] <= draw.free_t2 <= prior.free_t2[1]
        low, high = prior.orientation_dispersion
        assert low <= draw.odi <= high
        assert_allclose(np.linalg.norm(draw.axis), 1.0)
    # The Watson concentration is NODDI's: ODI = (2 / pi) arctan(1 / kappa).
    assert_allclose(2 / np.pi * np.arctan(1 / draw.kappa), draw.odi)
    assert _prior(orientation_dispersion=(0.0, 0.0)).draw(1).kappa == np.inf


def test_voxels_depend_on_their_seed_alone(simulator):
    a, truth = simulator.sample(6, seed=3)
    b, _ = simulator.sample(3, seed=3)
    assert_array_equal(a[:3], b)
    assert set(MIXTURE_DESCRIPTORS) <= set(truth)
    for name in MIXTURE_DESCRIPTORS:
        assert np.isfinite(truth[name]).all(), name


def test_b0_is_the_water_weighted_relaxation(simulator):
    """At b = 0 a voxel's signal is sum_k W_k exp(-TE / T2_k) / sum_k W_k over
    its domains: the bundles' own b = 0 (their compartments' relaxation), free
    water's and the dots' exp(-TE / T2), by water."""
    prior, protocol = simulator.prior, simulator.protocol
    te = protocol.echo_times[0]
    responses = simulator.library.responses
    for seed in range(5):
        draw = prior.draw(seed)
        bundles = [responses[b].signals(protocol, draw.axis)[0] for b in draw.bundles]
        waters = [
            v * bundle_water(simulator.library.draws[b])
            for v, b in zip(draw.shares, draw.bundles, strict=True)
        ]
        expected = (
            np.dot(waters, bundles)
            + draw.free_water * np.exp(-te / draw.free_t2)
            + draw.dot * np.exp(-te / draw.dot_t2)
        ) / (sum(waters) + draw.free_water + draw.dot)
        assert_allclose(simulator.signals(draw)[0], expected, rtol=1e-12)


def test_only_free_water_and_dots_and_bundles_are_mixed(simulator):
    """With no free water and no dots a voxel of one bundle is that bundle:
    the mixture adds nothing of its own."""
    prior = _prior(
        free_water_fraction=(0.0, 0.0),
        dot_fraction=(0.0, 0.0),
        bundles_per_voxel=(1, 1),
        orientation_dispersion=(0.0, 0.0),
    )
    draw = prior.draw(4)
    (b,) = draw.bundles
    bundle = simulator.library.responses[b].signals(simulator.protocol, draw.axis)
    assert_allclose(simulator.signals(draw), bundle, rtol=1e-12)


def test_the_library_is_shared_by_priors_of_one_bundle_prior(tmp_path):
    """Free water, dots and orientations do not key the library: priors that
    differ only there read one library."""
    a = _prior().simulator(PROTOCOL, cache_dir=tmp_path)
    b = _prior(free_water_fraction=(0.1, 0.2), fibre_axis=(0, 0, 1)).simulator(
        PROTOCOL, cache_dir=tmp_path
    )
    c = _prior(n_library=4).simulator(PROTOCOL, cache_dir=tmp_path)
    assert a.library.path == b.library.path != c.library.path


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(bundles=object()), "bundles must be a WhiteMatterPrior"),
        (dict(n_library=0), "n_library"),
        (dict(bundles_per_voxel=(0, 2)), "bundles_per_voxel"),
        (dict(bundles_per_voxel=(1.5, 2)), "bundles_per_voxel"),
        (dict(free_water_fraction=(0.2, 1.0)), "free_water_fraction"),
        (dict(dot_fraction=(-0.1, 0.1)), "dot_fraction"),
        (
            dict(free_water_fraction=(0.0, 0.6), dot_fraction=(0.0, 0.5)),
            "sum to 1.1",
        ),
        (dict(free_diffusivity=(0.0, 2e-3)), "free_diffusivity"),
        (dict(orientation_dispersion=(0.2, 0.1)), "orientation_dispersion"),
        (dict(fibre_axis=(0, 0, 0)), "fibre_axis"),
    ],
)
def test_bad_settings_are_named(changes, match):
    with pytest.raises(ValueError, match=match):
        MixturePrior.fixed(**changes)


@pytest.mark.slow  # its library with measured time steps: ~20 s
def test_the_check_holds_its_own_draws(simulator, tmp_path):
    """Held-out voxels of the prior, with Rician noise at SNR 50, lie inside
    its 95 % predictive region at about that rate (200 draws build it; 40
    voxels: at least 85 % inside, a binomial 2.5 % lower bound)."""
    signals, _ = simulator.sample(40, seed=99)
    sigma = torch.full((40,), 0.02)
    noisy = add_noise(torch.as_tensor(signals), sigma, torch.Generator().manual_seed(1))
    prior = simulator.prior
    check = prior.check(
        noisy.numpy() * 1000,
        PROTOCOL,
        sigma=20.0,
        n_draws=200,
        cache_dir=simulator.library.cache_dir,
    )
    assert check.share_inside >= 0.85
    assert check.inside.shape == (40,)
