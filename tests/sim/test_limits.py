"""The diameter resolution limit (Nilsson et al. 2017) against the cylinder's
Gaussian-phase signal (van Gelderen et al. 1994), an independent series."""

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy.stats import norm

from dipy_spinverse.sim.analytic import cylinder_gpa_pgse
from dipy_spinverse.sim.limits import diameter_resolution_limit
from dipy_spinverse.sim.sequences import Protocol, hcp_protocol

D = 2e-3  # mm^2/s = um^2/us


def _one_shell(small_delta, big_delta, b, n=30):
    bvals = np.r_[0.0, np.full(n, b)]
    bvecs = np.vstack([[0.0, 0.0, 0.0], np.tile([1.0, 0.0, 0.0], (n, 1))])
    return Protocol.pgse(bvals, bvecs, small_delta=small_delta, big_delta=big_delta)


@pytest.mark.parametrize(
    "protocol, snr",
    [
        (hcp_protocol(), 40.0),
        (hcp_protocol(), 200.0),
        (_one_shell(0.020, 0.030, 3000.0), 50.0),
        (_one_shell(0.040, 0.050, 6000.0), 50.0),
    ],
)
def test_limit_is_where_the_cylinder_attenuates_by_the_noise(protocol, snr):
    """At d_min, a cylinder across the strongest gradient attenuates the
    signal by sigma_bar = z_alpha / (SNR sqrt(n)): the limit's definition,
    checked against the GPA series. Neuman's long-pulse formula that the
    limit rests on is the first term in r^2 / (D delta); the GPA's next
    term lowers the attenuation by 0.30-0.36 r^2 / (D delta) on these
    protocols (measured), so the tolerance is 0.45 r^2 / (D delta)."""
    d_min = diameter_resolution_limit(protocol, snr=snr, diffusivity=D)
    rate = np.linalg.norm(protocol.gradient_rate, axis=1)
    strongest = int(np.argmax(rate))
    pulse = protocol.waveforms[strongest]
    delta, Delta = pulse.small_delta * 1e6, pulse.big_delta * 1e6
    attenuation = 1 - cylinder_gpa_pgse(rate[strongest], delta, Delta, d_min / 2, D)
    n = int(np.sum(rate >= rate.max() * (1 - 1e-6)))
    sigma_bar = norm.isf(0.05) / (snr * np.sqrt(n))
    long_pulse = (d_min / 2) ** 2 / (D * delta)
    assert long_pulse < 0.15  # the long-pulse regime the formula is for
    assert_allclose(attenuation / sigma_bar, 1.0, atol=0.45 * long_pulse)


def test_limit_scales_as_the_fourth_root():
    """d_min ~ (D / SNR)^(1/4): sixteen times the SNR halves it; the HCP at
    SNR 40 gives 3.4 um (b = 3000 s/mm^2, 97 mT/m, 90 directions)."""
    hcp = hcp_protocol()
    base = diameter_resolution_limit(hcp, snr=40)
    assert_allclose(base, 3.396, atol=1e-3)
    assert_allclose(diameter_resolution_limit(hcp, snr=640), base / 2, rtol=1e-12)
    assert_allclose(
        diameter_resolution_limit(hcp, snr=40, diffusivity=16 * D), 2 * base, rtol=1e-12
    )
    # A stricter test (smaller alpha) needs a larger diameter.
    assert diameter_resolution_limit(hcp, snr=40, alpha=0.01) > base


def test_limit_refuses_what_it_cannot_judge():
    b0_only = Protocol.pgse(
        np.zeros(3), np.zeros((3, 3)), small_delta=0.01, big_delta=0.02
    )
    with pytest.raises(ValueError, match="no diffusion-weighted PGSE"):
        diameter_resolution_limit(b0_only, snr=40)
    for bad in (0, -1, np.nan, "40"):
        with pytest.raises(ValueError, match="snr must be"):
            diameter_resolution_limit(hcp_protocol(n_directions=3), snr=bad)
    with pytest.raises(ValueError, match="alpha must be in"):
        diameter_resolution_limit(hcp_protocol(n_directions=3), snr=40, alpha=1.5)
