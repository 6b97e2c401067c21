"""Files a fit is kept in and read from.

:mod:`.store` (save, load and resume a fit; its NIfTI maps), :mod:`.surfaces`
(the barrier surfaces of a volume in scanner coordinates), :mod:`.meshes`
(mesh file formats), :mod:`.gradients` (b-values, b-vectors and pulse
timings of a dataset) and :mod:`.datasets` (public real data with histology,
from the dmipy 1.0.5 files). Their public names (each module's ``__all__``) are
imported on first use, so that the low layers that write meshes need not
import the DIPY layer the store depends on.
"""

from ..lazy import attach_all

__all__, __getattr__, __dir__ = attach_all(
    __name__, ["store", "surfaces", "meshes", "gradients", "datasets"]
)
