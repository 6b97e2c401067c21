"""Compartment signals in torch: differentiable, batched over voxels.

Every block takes an :class:`~..acquisition.Acquisition` of M measurements and
parameters with any common leading shape ``(...)`` (voxels, atoms of a
dictionary, fibre populations); it returns normalised signals of shape
``(..., M)`` (1 at b = 0). Directions have shape ``(..., 3)`` and unit length.

Units (internal, as everywhere in ``dipy_spinverse``): lengths in um, times in
us, diffusivities in um^2/us (numerically mm^2/s), b in us/um^2 (numerically
s/mm^2), exchange rates in 1/us.

One module per family of blocks, re-exported here:

- :mod:`.gaussian`: ball, dot, stick, zeppelin;
- :mod:`.restricted`: cylinders and spheres in the Gaussian phase
  approximation, any piecewise-constant waveform (:class:`GpaTable`);
- :mod:`.watson`: Watson-dispersed sticks and zeppelins;
- :mod:`.watson_table`: NODDI's tabulated Watson stick and its derivatives;
- :mod:`.zonal`: any axially symmetric response tabulated against the cosine
  to its axis, in zonal harmonics, and its Watson dispersion (Funk-Hecke);
- :mod:`.karger`: two-compartment exchange.
"""

from .gaussian import ball, cosines, dot, stick, zeppelin, zeppelin_derivatives
from .karger import N_MAGNUS_STEPS, karger
from .restricted import N_ROOTS, GpaTable, cylinder, cylinder_derivatives, sphere
from .watson import (
    N_WATSON_NODES,
    WATSON_WINDOW,
    kappa_to_odi,
    odi_to_kappa,
    watson_hindered,
    watson_stick,
    watson_tau,
    watson_tau_slope,
    watson_zeppelin,
)
from .watson_table import WatsonStickTable, noddi_neurite_derivatives
from .zonal import (
    axial_nodes,
    dispersed_response,
    watson_dispersed,
    zonal_coefficients,
)

__all__ = [
    "ball",
    "dot",
    "stick",
    "zeppelin",
    "cylinder",
    "cylinder_derivatives",
    "zeppelin_derivatives",
    "GpaTable",
    "sphere",
    "watson_stick",
    "watson_zeppelin",
    "watson_hindered",
    "watson_tau",
    "WatsonStickTable",
    "odi_to_kappa",
    "kappa_to_odi",
    "karger",
    "cosines",
    "watson_tau_slope",
    "noddi_neurite_derivatives",
    "axial_nodes",
    "zonal_coefficients",
    "dispersed_response",
    "watson_dispersed",
    "N_ROOTS",
    "N_WATSON_NODES",
    "WATSON_WINDOW",
    "N_MAGNUS_STEPS",
]
