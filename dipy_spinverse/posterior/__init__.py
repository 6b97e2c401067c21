"""Amortised posteriors of tissue descriptors (``fit_method="posterior"``).

One module a step, in the order of simulation-based inference (as sbi
names them):

- :mod:`.prior`: :class:`TissuePrior`, what tissue a voxel may hold, and its
  draws;
- :mod:`.simulator`: :class:`PriorSimulator`, the draws' noise-free signals
  and their true descriptors (:mod:`.checkpoint` keeps them as they are
  made);
- :mod:`.training`: :class:`TrainingOptions`, :func:`train_estimator` and
  :func:`~.training.simulate_and_train`, on inputs noisy as a fit sees them
  (:mod:`.noise`);
- :mod:`.cache`: :func:`load_or_train`, each estimator trained once per
  protocol, prior, options and code and cached (or read shipped with the
  package, :mod:`.shipped`);
- :mod:`.estimator`: :class:`PosteriorEstimator`, the flow from a voxel's
  signal to the posterior of its descriptors (:mod:`.targets`: their flow
  coordinates), with its credible bounds' recalibration
  (:mod:`.calibration`) and the prior's support, its out-of-prior test
  (:mod:`.support`).

Also :mod:`.predictive` (posterior predictive signals) and
:mod:`.white_matter` (a prior of myelinated bundles), and
:mod:`.mixture_prior` (:class:`MixturePrior`: voxels mixed from a library of
simulated bundles, :mod:`.library`, with free water and dots,
:mod:`.mixture`).
"""

# _load (load_estimator_file's name when this module held the cache),
# _partial_folder, SHIPPED and estimator_code stay readable here (tests and
# benchmarks read them), but load_or_train reads .cache's own: point the
# cache elsewhere there.
from ..lazy import attach
from .cache import _partial_folder as _partial_folder
from .cache import estimator_key, load_estimator_file, load_or_train
from .estimator import PosteriorEstimator
from .prior import ALL_FAMILIES, FAMILIES, WHITE_MATTER, TissuePrior
from .shipped import SHIPPED as SHIPPED
from .shipped import estimator_code as estimator_code
from .simulator import PriorSimulator
from .targets import TARGETS, decode, encode, shape_descriptors
from .training import (
    WHITE_MATTER_TRAINING,
    TrainingOptions,
    default_training,
    train_estimator,
)

_load = load_estimator_file

# The white-matter priors import the compartments' zonal harmonics: read on
# first use, so that importing the package loads none of them.
__getattr__, _dir = attach(
    __name__,
    {"MixturePrior": "mixture_prior", "WhiteMatterPrior": "white_matter"},
)

__all__ = [
    "WHITE_MATTER_TRAINING",
    "default_training",
    "ALL_FAMILIES",
    "FAMILIES",
    "WHITE_MATTER",
    "TARGETS",
    "MixturePrior",
    "PosteriorEstimator",
    "PriorSimulator",
    "TissuePrior",
    "TrainingOptions",
    "WhiteMatterPrior",
    "decode",
    "encode",
    "estimator_key",
    "load_estimator_file",
    "load_or_train",
    "shape_descriptors",
    "train_estimator",
]
