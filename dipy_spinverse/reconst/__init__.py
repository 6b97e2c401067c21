"""The DIPY reconstruction layer: :class:`SpinverseModel` and :class:`SpinverseFit`.

``model``
    :func:`SpinverseModel`, the selector: ``fit_method="search"`` returns a
    :class:`SpinverseSearchModel` (``search_model``: options checked once,
    prediction helpers), ``fit_method="posterior"`` a
    :class:`SpinversePosteriorModel` (``posterior_model``),
    ``fit_method="protocol_free"`` a :class:`SpinverseProtocolFreeModel`
    (``protocol_free_model``: no training, protocols of its design).
``methods``
    The fit methods, each registered once (``FIT_METHODS``): its model
    class (settings, description, the fit read back, status wording), its
    fit's file format and its parts in the command; saving, reading and the
    command look a method up there (``descriptions``: the models' inputs as
    JSON-ready values).
``gate``
    The one gate of the data: gradient tables to protocols, and each
    voxel's signal checked, cast, normalised and given its status once,
    for both methods.
``runner``
    The voxel loop: each chunk through the gate and the inversion, retries,
    the checkpoint hook; spread by ``parallel`` (engine options) over
    ``engines`` (Ray and Dask clusters), shown by ``progress``.
``status``, ``surfaces``, ``refinement``
    The fitted voxels' warning statuses, the trust in their surfaces, and
    their smooth meshes.
``resume``
    The data's fingerprint and the checks that a partial fit resumes.
``fit``
    :class:`SpinverseFit`, one voxel or a volume: a thin view over its
    per-voxel parameters (``voxels``), whose maps, meshes and predictions
    ``fit_metrics``, ``fit_meshes`` and ``fit_prediction`` compute.
``codes``
    The status codes.
``plausibility``
    Data no tissue produces (``IMPOSSIBLE_SIGNAL``) and protocols that
    cannot determine the membranes (``UNDERDETERMINED``).

Problems of single voxels never stop a volume: the voxel gets a status code
(:data:`STATUS_CODES`) and NaN outputs, and the rest of the volume is kept.
A fit whose residual is far above the noise is kept, with the warning status
``POOR_FIT``; one whose surface the data do not determine, with
``UNCERTAIN_SURFACE``; one whose attenuation is above 1 beyond the noise,
with ``IMPOSSIBLE_SIGNAL``; with a protocol that cannot determine the
membranes (one diffusion time, directions that do not span 3-D), every
fitted voxel of the label search has ``UNDERDETERMINED``. A smooth mesh
refinement (``refine_mesh=True``) that fails flags the voxel's mesh
(:data:`MESH_STATUS_CODES`), not its fit.
"""

from .codes import (
    BAD_B0,
    DIVERGED,
    FAILED,
    FITTED,
    FLAGGED,
    IMPOSSIBLE_SIGNAL,
    MASKED,
    MESH_FAILED,
    MESH_NO_CELL,
    MESH_NOT_REFINED,
    MESH_OK,
    MESH_STATUS_CODES,
    NONFINITE,
    OK,
    PENDING,
    POOR_FIT,
    STATUS_CODES,
    UNCERTAIN_SURFACE,
    UNCERTAIN_SURFACE_LEVEL,
    UNDERDETERMINED,
)
from .fit import SpinverseFit
from .model import SpinverseModel
from .parallel import PARALLEL_ENGINES
from .posterior import PosteriorFit
from .posterior_model import SpinversePosteriorModel
from .protocol_free_model import ProtocolFreeFit, SpinverseProtocolFreeModel
from .search_model import SpinverseSearchModel
from .voxels import MESH_PARAMETERS, OPTIONAL_PARAMETERS

__all__ = [
    "SpinverseModel",
    "SpinverseSearchModel",
    "SpinversePosteriorModel",
    "PosteriorFit",
    "SpinverseProtocolFreeModel",
    "ProtocolFreeFit",
    "SpinverseFit",
    "STATUS_CODES",
    "PARALLEL_ENGINES",
    "OK",
    "NONFINITE",
    "BAD_B0",
    "FAILED",
    "DIVERGED",
    "POOR_FIT",
    "UNCERTAIN_SURFACE",
    "UNCERTAIN_SURFACE_LEVEL",
    "IMPOSSIBLE_SIGNAL",
    "UNDERDETERMINED",
    "PENDING",
    "MASKED",
    "FITTED",
    "FLAGGED",
    "OPTIONAL_PARAMETERS",
    "MESH_STATUS_CODES",
    "MESH_PARAMETERS",
    "MESH_OK",
    "MESH_NO_CELL",
    "MESH_FAILED",
    "MESH_NOT_REFINED",
]
