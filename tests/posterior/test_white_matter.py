"""WhiteMatterPrior: myelinated bundles with a diffusivity, a T2 and a water
density per compartment, drawn from literature ranges."""

from dataclasses import replace

import numpy as np
import pytest
from numpy.testing import assert_allclose

from dipy_spinverse import Protocol
from dipy_spinverse.posterior.prior import section_grid
from dipy_spinverse.posterior.white_matter import (
    DESCRIPTORS,
    WhiteMatterPrior,
)

#: A coarse, small prior: cheap sections for the tests.
SMALL = WhiteMatterPrior(
    n_axons=(4, 6), mean_diameter=(2.0, 4.0), fibre_fraction=(0.5, 0.7)
)


def test_draws_are_seeded_and_described_within_their_ranges():
    draws = [SMALL.draw(np.random.default_rng(s)) for s in range(8)]
    again = SMALL.draw(np.random.default_rng(3))
    assert_allclose(again.bundle.face_permeability, draws[3].bundle.face_permeability)
    for draw in draws:
        got = draw.descriptors
        assert set(got) == set(DESCRIPTORS)
        assert got["effective_diameter"] >= got["mean_diameter"]
        assert got["cell_diameter"] == got["effective_diameter"]
        assert 0.6 - 0.05 <= got["g_ratio"] <= 0.8 + 0.05  # rasterised
        assert 0 < got["myelin_fraction"] < 0.7  # below the fibre fraction
        assert 0 < got["intra_axonal_fraction"] < 1
        lo, hi = SMALL.intra_diffusivity
        assert lo <= got["intra_diffusivity"] <= hi
        assert got["exchange_time"] > 0
        assert 4 <= draw.bundle.n_axons <= 6
        assert_allclose(np.linalg.norm(draw.axis), 1.0)


def test_exchange_time_follows_the_permeability():
    """Tighter membranes keep the axons' water longer: the exchange time
    scales as 1 / kappa where the membranes, not the sheath's diffusion,
    limit it (here within 1 %: ln(r_o / r_i) / D_m is small against
    1 / (r kappa) at kappa = 1e-6 m/s)."""
    tight = replace(SMALL, permeability=(1e-6, 1e-6))
    loose = replace(SMALL, permeability=(2e-6, 2e-6))
    a = tight.draw(np.random.default_rng(1)).descriptors["exchange_time"]
    b = loose.draw(np.random.default_rng(1)).descriptors["exchange_time"]
    assert_allclose(a / b, 2.0, rtol=0.01)


def test_presets_differ_where_fixed_tissue_differs():
    vivo, fixed = WhiteMatterPrior.in_vivo(), WhiteMatterPrior.fixed()
    for name in ("intra_diffusivity", "extra_diffusivity", "intra_t2", "myelin_t2"):
        assert getattr(fixed, name)[1] < getattr(vivo, name)[1]
    assert WhiteMatterPrior.fixed(n_axons=(3, 5)).n_axons == (3, 5)


def test_b0_is_the_relaxation_of_each_compartments_water():
    """Closed membranes (1e-15 m/s): at b = 0 the signal is sum_c W_c
    exp(-TE / T2_c) / sum_c W_c, W_c = rho_c V_c over the rasterised
    compartments (1e-9: the Chebyshev truncation; the exchange, ~1e-11 at
    1e-15 m/s, was 7.6e-9 at 1e-12)."""
    prior = replace(SMALL, permeability=(1e-15, 1e-15))
    draw = prior.draw(np.random.default_rng(5))
    prot = Protocol.pgse(
        [0, 0, 2000], [[1, 0, 0]] * 3, small_delta=0.005, big_delta=[0.02, 0.05, 0.02]
    )
    signal = prior.simulate([draw], prot, substeps=2)[0]
    bundle = draw.bundle
    volumes = section_grid(draw.side, draw.resolution).cell_volumes
    expected = []
    for te in prot.echo_times[:2]:
        water = [
            draw.tissue[c]["density"] * volumes[bundle.compartment == i].sum()
            for i, c in enumerate(("extra", "intra", "myelin"))
        ]
        decay = [
            np.exp(-te / draw.tissue[c]["t2"]) for c in ("extra", "intra", "myelin")
        ]
        expected.append(np.dot(water, decay) / np.sum(water))
    assert_allclose(signal[:2], expected, rtol=0, atol=1e-9)
    assert 0 < signal[2] < signal[0]


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(g_ratio=(0.6, 1.2)), "g_ratio"),
        (dict(fibre_fraction=(0.5, 0.95)), "fibre_fraction"),
        (dict(n_axons=(0, 4)), "n_axons"),
        (dict(intra_t2=(0.1, 0.05)), "intra_t2"),
        (dict(cells_per_sheath=0), "cells_per_sheath"),
        (dict(fibre_axis=(0, 0, 0)), "fibre_axis"),
        (dict(resolve_above=-1.0), "resolve_above"),
    ],
)
def test_bad_settings_are_named(changes, match):
    with pytest.raises(ValueError, match=match):
        WhiteMatterPrior(**changes)


def test_subgrid_axons_keep_each_compartments_water():
    """resolve_above: the axons thinner than it are sub-grid pools, every
    draw on its own pooled grid; closed membranes (1e-15 m/s), b = 0: the
    signal is sum_c W_c exp(-TE / T2_c) / sum_c W_c over the pooled grid's
    compartments (pools included), whose water is the section's (1e-12);
    1e-9 as test_b0_is_the_relaxation_of_each_compartments_water."""
    prior = replace(SMALL, permeability=(1e-15, 1e-15), resolve_above=3.0)
    rng = np.random.default_rng(2)
    draws = [prior.draw(rng) for _ in range(2)]
    assert all(d.bundle.subgrid.any() for d in draws)
    prot = Protocol.pgse(
        [0, 0, 2000], [[1, 0, 0]] * 3, small_delta=0.005, big_delta=[0.02, 0.05, 0.02]
    )
    signals = prior.simulate(draws, prot, substeps=2)
    for draw, signal in zip(draws, signals, strict=True):
        bundle = draw.bundle
        volumes = bundle.grid.cell_volumes
        assert_allclose(volumes.sum(), draw.side**2, rtol=1e-12)
        names = ("extra", "intra", "myelin")
        water = [
            draw.tissue[c]["density"] * volumes[bundle.compartment == i].sum()
            for i, c in enumerate(names)
        ]
        expected = [
            np.dot(water, [np.exp(-te / draw.tissue[c]["t2"]) for c in names])
            / np.sum(water)
            for te in prot.echo_times[:2]
        ]
        assert_allclose(signal[:2], expected, rtol=0, atol=1e-9)
        assert 0 < signal[2] < signal[0]
