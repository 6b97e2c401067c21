"""What a protocol can resolve: the diameter resolution limit of axons.

A cylinder of diameter ``d`` across a PGSE gradient of rate ``g = gamma G``
and pulse duration ``delta``, with ``delta D / r^2`` large (the long-pulse
regime of axons), attenuates the signal by
``1 - S ~ (7 / 768) g^2 delta d^4 / D`` (Neuman 1974). Nilsson et al. (2017,
NMR Biomed 30:e3711) set this equal to the smallest attenuation that noise
lets one tell from zero, ``sigma_bar = z_alpha / (SNR sqrt(n))`` over ``n``
measurements: diameters below

    d_min = (768 / 7 * sigma_bar * D / (g^2 delta))^(1/4)

give signals that cannot be told from those of a line (``d = 0``). The limit
grows only as the fourth root of the noise: four times the SNR lowers it by
a factor sqrt(2).
"""

import math

import numpy as np
from scipy.stats import norm

from ..checks import check_number, check_positive
from .sequences import as_protocol
from .waveforms import PGSE

__all__ = ["diameter_resolution_limit"]


def diameter_resolution_limit(protocol, *, snr, diffusivity=2e-3, alpha=0.05):
    """Smallest axon diameter a PGSE protocol tells from zero (um).

    Nilsson et al. (2017): the module documentation gives the formula. The
    most sensitive acquisitions of the protocol (largest ``g^2 delta``) set
    it; ``n`` is their number, every direction counted (Nilsson et al. count
    the measurements perpendicular to the axon: with directions spread over
    the sphere about two thirds of them weigh, so the limit here is about
    10 % too optimistic for one fibre direction).

    Parameters
    ----------
    protocol : Protocol or GradientTable
        PGSE acquisitions (other waveforms are ignored).
    snr : float
        b = 0 signal over the noise's standard deviation.
    diffusivity : float
        Intra-axonal diffusivity, mm^2/s.
    alpha : float
        False-positive rate of the one-sided test: ``z_alpha`` is the normal
        quantile at ``1 - alpha`` (1.64 for the default 0.05).

    Returns
    -------
    float
        The diameter, um.

    Raises
    ------
    ValueError
        When the protocol has no diffusion-weighted PGSE acquisition, or an
        argument is out of range.

    Examples
    --------
    >>> from dipy_spinverse.sim.sequences import hcp_protocol
    >>> round(diameter_resolution_limit(hcp_protocol(), snr=40), 1)
    3.4
    """
    protocol = as_protocol(protocol)
    snr = check_positive(snr, "snr", example="40")
    diffusivity = check_positive(diffusivity, "diffusivity", "mm^2/s", "2e-3")
    if not 0 < check_number(alpha, "alpha") < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}.")
    pulses = np.array(
        [
            w.small_delta * 1e6 if isinstance(getattr(w, "encoding", w), PGSE) else 0.0
            for w in protocol.waveforms  # a PGSE in a longer spin echo too
        ]
    )
    rate = np.linalg.norm(protocol.gradient_rate, axis=1)  # rad / (um us)
    sensitivity = rate**2 * pulses
    if not sensitivity.max() > 0:
        raise ValueError(
            "protocol has no diffusion-weighted PGSE acquisition: the diameter "
            "limit of Nilsson et al. (2017) is for pulsed gradients."
        )
    strongest = sensitivity >= sensitivity.max() * (1 - 1e-6)
    n = int(strongest.sum())
    noise = norm.isf(alpha) / (snr * math.sqrt(n))
    # mm^2/s is um^2/us.
    d4 = 768.0 / 7.0 * noise * diffusivity / sensitivity.max()
    return float(d4**0.25)
