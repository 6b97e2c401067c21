"""Faults of the white-matter prior and its bundles, as a user meets them
(issue 84, cases 4, 10, 11, 14 and 15): every bad setting is refused up
front, naming the argument and the value given (never a transformed one),
and every seed numpy's ``default_rng`` takes is taken."""

import re
import warnings

import numpy as np
import pytest
from conftest import BUNDLE_SETTINGS as SETTINGS
from numpy.testing import assert_array_equal

import dipy_spinverse.posterior.white_matter as white_matter
from dipy_spinverse import TetGrid
from dipy_spinverse.geometry.substrates import bundle as bundle_module
from dipy_spinverse.geometry.substrates.bundle import axon_bundle, bundle_side
from dipy_spinverse.posterior.white_matter import WhiteMatterPrior
from dipy_spinverse.sim.pools import PooledSection
from dipy_spinverse.sim.sections import SectionGrid

#: A coarse, small prior: cheap sections.
SMALL = dict(n_axons=(4, 6), mean_diameter=(2.0, 4.0), fibre_fraction=(0.5, 0.7))


def _section(n=24):
    side = bundle_side(12, 2.0, 4.0, (0.6, 0.8), 0.7)
    return SectionGrid.triangular(side, n)


def _same_draw(a, b):
    assert (a.side, a.resolution) == (b.side, b.resolution)
    assert_array_equal(a.bundle.centres, b.bundle.centres)
    assert_array_equal(a.bundle.face_permeability, b.bundle.face_permeability)
    assert a.descriptors == b.descriptors
    assert a.tissue == b.tissue
    assert_array_equal(a.axis, b.axis)


# -- case 4: both bounds of n_axons whole ------------------------------------------


@pytest.mark.parametrize(
    "n_axons",
    [
        (8, 24.7),
        (8.5, 24),
        (0, 4),
        (-2, 4),
        (6, 4),
        (True, 4),
        (4, np.inf),
        (4, np.nan),
        ("4", 6),
        (4,),
        (4, 5, 6),
        4,
    ],
)
def test_n_axons_must_be_two_whole_counts(n_axons):
    with pytest.raises(ValueError, match="n_axons") as err:
        WhiteMatterPrior(n_axons=n_axons)
    assert f"got {n_axons!r}" in str(err.value)


@pytest.mark.parametrize("n_axons", [(8, 24), (8.0, 24.0), (np.int64(3), 3)])
def test_whole_n_axons_are_kept_as_ints(n_axons):
    prior = WhiteMatterPrior(n_axons=n_axons)
    assert prior.n_axons == (int(n_axons[0]), int(n_axons[1]))
    assert all(type(v) is int for v in prior.n_axons)


# -- case 10: every seed default_rng takes ---------------------------------------


@pytest.mark.parametrize(
    "seed",
    [
        3,
        np.int64(3),
        [3, 1],
        np.random.SeedSequence(3),
    ],
    ids=["int", "np.int64", "list", "SeedSequence"],
)
def test_a_draw_takes_any_seed_default_rng_takes(seed):
    prior = WhiteMatterPrior(**SMALL)
    _same_draw(prior.draw(seed), prior.draw(np.random.default_rng(seed)))


def test_a_draw_takes_a_bit_generator_and_none():
    prior = WhiteMatterPrior(**SMALL)
    _same_draw(
        prior.draw(np.random.PCG64(5)),
        prior.draw(np.random.default_rng(np.random.PCG64(5))),
    )
    assert prior.draw(None).descriptors["g_ratio"] > 0


def test_a_generator_is_used_not_copied():
    """A Generator is drawn from (it advances), as before."""
    prior = WhiteMatterPrior(**SMALL)
    rng = np.random.default_rng(2)
    first, second = prior.draw(rng), prior.draw(rng)
    again = np.random.default_rng(2)
    _same_draw(first, prior.draw(again))
    _same_draw(second, prior.draw(again))


@pytest.mark.parametrize(
    "seed", [np.random.SeedSequence(4), np.random.PCG64(4), 4, [4, 1]]
)
def test_axon_bundle_takes_any_seed_default_rng_takes(seed):
    grid = _section()
    reference = np.random.default_rng(
        np.random.PCG64(4) if isinstance(seed, np.random.PCG64) else seed
    )
    a = axon_bundle(grid, rng=seed, **SETTINGS)
    b = axon_bundle(grid, rng=reference, **SETTINGS)
    assert_array_equal(a.centres, b.centres)
    assert_array_equal(a.permeability, b.permeability)


@pytest.mark.parametrize("seed", [-1, 1.5, "seed", True, np.array([1.5])])
def test_a_bad_seed_is_named(seed):
    with pytest.raises(ValueError, match=r"rng.*default_rng"):
        WhiteMatterPrior(**SMALL).draw(seed)
    with pytest.raises(ValueError, match=r"rng.*default_rng"):
        axon_bundle(_section(), rng=seed, **SETTINGS)


# -- case 11: a bundle is drawn in a periodic section only -----------------------


def test_a_tetrahedral_grid_is_refused_with_the_section_to_build():
    grid = TetGrid.bcc(10.0, 3, boundary="periodic")
    with pytest.raises(ValueError, match="grid") as err:
        axon_bundle(grid, rng=0, **SETTINGS)
    message = str(err.value)
    assert "TetGrid" in message
    assert "SectionGrid.triangular(" in message


@pytest.mark.parametrize("grid", [None, "section", np.zeros((3, 3))])
def test_a_grid_that_is_not_a_section_is_refused(grid):
    with pytest.raises(ValueError, match=r"grid must be .*SectionGrid") as err:
        axon_bundle(grid, rng=0, **SETTINGS)
    assert type(grid).__name__ in str(err.value)


def test_a_pooled_section_is_refused():
    """A section with pools already attached cannot take more axons."""
    grid = _section()
    pooled = axon_bundle(grid, rng=0, resolve_above=2.0, **SETTINGS).grid
    assert isinstance(pooled, PooledSection)
    with pytest.raises(ValueError, match="PooledSection"):
        axon_bundle(pooled, rng=0, **SETTINGS)


# -- case 14: the fibre fraction's limit, checked once ---------------------------


@pytest.mark.parametrize(
    "fibre_fraction", [(0.851, 0.859), (0.5, 0.855), (0.86, 0.9), (0.5, 1.0)]
)
def test_a_fibre_fraction_above_the_bundles_limit_is_refused(fibre_fraction):
    limit = bundle_module.MAX_FIBRE_FRACTION
    with pytest.raises(ValueError, match="fibre_fraction") as err:
        WhiteMatterPrior(fibre_fraction=fibre_fraction)
    assert f"{limit:g}" in str(err.value)
    assert f"got {fibre_fraction!r}" in str(err.value)


def test_the_limit_is_the_bundles_and_the_docs_say_it():
    limit = bundle_module.MAX_FIBRE_FRACTION
    prior = WhiteMatterPrior(**{**SMALL, "fibre_fraction": (0.5, limit)})
    draw = prior.draw(0)
    assert draw.descriptors["g_ratio"] > 0
    grid = _section()
    try:  # the limit is taken; a draw at it may not pack (and says so)
        axon_bundle(grid, rng=0, **{**SETTINGS, "fibre_fraction": limit})
    except bundle_module.UnheldBundleError as err:
        assert "lower fibre_fraction" in str(err)
    with pytest.raises(ValueError, match=re.escape(f"{limit:g}")):
        axon_bundle(grid, rng=0, **{**SETTINGS, "fibre_fraction": limit + 1e-3})
    assert f"(0, {limit:g}]" in WhiteMatterPrior.__doc__
    assert f"(0, {limit:g}]" in axon_bundle.__doc__


def test_an_argument_refusal_is_not_redrawn(monkeypatch):
    """A refusal of the arguments propagates at once; only a bundle the grid
    cannot hold is drawn again."""
    calls = []

    def refuse(grid, **kwargs):
        calls.append(1)
        raise ValueError("g_ratio must lie in (0.0, 1.0) (exclusive)")

    monkeypatch.setattr(white_matter, "axon_bundle", refuse)
    with pytest.raises(ValueError, match="g_ratio must lie in"):
        WhiteMatterPrior(**SMALL).draw(0)
    assert len(calls) == 1


def test_when_no_draw_is_held_the_last_reason_is_given(monkeypatch):
    calls = []

    def unheld(grid, **kwargs):
        calls.append(1)
        raise bundle_module.UnheldBundleError("3 of the 5 axons hold no cell")

    monkeypatch.setattr(white_matter, "axon_bundle", unheld)
    with pytest.raises(ValueError, match="hold no cell"):
        WhiteMatterPrior(**SMALL).draw(0)
    assert len(calls) > 1


# -- case 15: the value given, checked before any logarithm -----------------------


@pytest.mark.parametrize(
    "changes",
    [
        dict(permeability=0.0),
        dict(permeability=-1e-5),
        dict(permeability=(1e-4, 1e-5)),
        dict(permeability=(0.0, 1e-4)),
        dict(permeability=(-1e-5, 1e-4)),
        dict(permeability=np.nan),
        dict(permeability=np.inf),
        dict(permeability=(1e-5, np.inf)),
        dict(permeability="1e-5"),
        dict(permeability=(1e-5, 2e-5, 3e-5)),
        dict(permeability=None),
        dict(g_ratio=0.0),
        dict(g_ratio=(0.6, 1.0)),
        dict(g_ratio="0.7"),
        dict(g_ratio=(0.6, 0.7, 0.8)),
        dict(mean_diameter=0.0),
        dict(mean_diameter=-2.0),
        dict(shape=0.0),
        dict(shape=np.nan),
        dict(fibre_fraction=0.0),
        dict(fibre_fraction=np.nan),
    ],
    ids=repr,
)
def test_bundle_arguments_are_refused_as_given(changes):
    ((name, value),) = changes.items()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no log(0) or log(-x) on the way
        with pytest.raises(ValueError, match=name) as err:
            axon_bundle(_section(), rng=0, **{**SETTINGS, **changes})
    assert f"got {value!r}" in str(err.value)


@pytest.mark.parametrize(
    "name",
    [
        "permeability",
        "mean_diameter",
        "intra_diffusivity",
        "extra_diffusivity",
        "myelin_diffusivity",
        "intra_t2",
        "extra_t2",
        "myelin_t2",
    ],
)
@pytest.mark.parametrize("value", [(0.0, 1e-3), (-1e-3, 1e-3), (2e-3, 1e-3)])
def test_log_uniform_ranges_are_refused_as_given(name, value):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=name) as err:
            WhiteMatterPrior(**{name: value})
    assert f"got {value!r}" in str(err.value)


def test_resolve_above_below_every_axon_rasterises_them_all():
    """No axon thinner than resolve_above: the bundle is the rasterised one
    (axon_bundle crashed in np.concatenate, and the prior, which swallowed
    that, silently redrew every such draw)."""
    grid = _section()
    plain = axon_bundle(grid, rng=0, **SETTINGS)
    none_thin = axon_bundle(grid, rng=0, resolve_above=0.01, **SETTINGS)
    assert none_thin.grid is grid
    assert not none_thin.subgrid.any()
    for name in ("centres", "axon", "compartment", "face_permeability", "axon_areas"):
        assert_array_equal(getattr(none_thin, name), getattr(plain, name))
    prior = WhiteMatterPrior(**{**SMALL, "resolve_above": 0.01})
    draw = prior.draw(0)
    assert not draw.bundle.subgrid.any()


@pytest.mark.parametrize(
    "make_seed",
    [lambda: np.random.SeedSequence(3), lambda: np.random.PCG64(3), lambda: [3, 1]],
)
def test_random_and_packed_substrates_take_any_seed_default_rng_takes(make_seed):
    """Issue 84 case 10's neighbours: every seeded substrate builder takes
    what numpy's default_rng takes (they refused a SeedSequence, a
    BitGenerator and a list)."""
    from dipy_spinverse.geometry.substrates import packed_substrate, random_substrate

    grid = TetGrid.bcc(12.0, 2, boundary="periodic")
    first = random_substrate(grid, rng=make_seed()).labels
    assert_array_equal(first, random_substrate(grid, rng=make_seed()).labels)
    assert packed_substrate(grid, rng=make_seed()) is not None
    with pytest.raises(ValueError, match="rng must be what numpy.random.default_rng"):
        random_substrate(grid, rng="seven")
