r"""The protocol-free posterior: one estimator for every protocol of its design.

A per-protocol estimator (:class:`~dipy_spinverse.posterior.PosteriorEstimator`)
embeds every acquisition's signal and so serves one protocol: a new
protocol costs a training. This estimator is conditioned on the acquisition
itself and trained once on protocols drawn from a stated design
(:data:`DESIGN`), so a new protocol in that design needs none (issue 72;
measured in doc/validation/protocol_free.md).

One module a step, as the per-protocol posterior's:

- :mod:`.design`: :data:`DESIGN`, the shells trained on and read; the
  protocols drawn from it (:func:`random_union`); the flow's coordinates
  (:data:`FREE_TARGETS`: the rotation-invariant descriptors, encoded by
  :mod:`dipy_spinverse.posterior.targets`);
- :mod:`.shells`: a protocol read as *shells* (:class:`ProtocolShells`):
  the acquisitions of one PGSE timing (and echo time) and one b-value; what
  lies outside the design is dropped and named, and a protocol left without
  shells is refused;
- :mod:`.tokens`: each shell's token (:func:`shell_token_features`): its b,
  delta and Delta, the rotation invariants of its b0-normalised signal's
  even spherical harmonics and its Legendre coefficients about the voxel's
  common axis. None depends on the tissue's orientation, so neither does
  anything estimated here: ``orientation`` is not;
- :mod:`.estimator`: :class:`ProtocolFreeEstimator`, a small Set
  Transformer over any number of tokens, in any order, and a neural spline
  flow over :data:`FREE_TARGETS`;
- :mod:`.training`: :func:`train_protocol_free`, on unions of 16 random
  shells seen through random subsets of their shells and directions, in
  the per-protocol estimator's loop and recalibration
  (:mod:`dipy_spinverse.posterior.training`,
  :mod:`dipy_spinverse.posterior.calibration`);
- :mod:`.shipped`: the shipped estimator's settings
  (:data:`SHIPPED_SETTINGS`), its simulations (:func:`simulated_unions`)
  and :func:`load_protocol_free`; ``python -m
  dipy_spinverse.posterior.protocol_free train --out DIR`` makes it again.

A PGSE inside a longer spin echo (``Protocol.from_gtab(gtab,
echo_time=TE)``) is read as PGSE, normalised by the b = 0 volumes at its
echo time. More than 16 shells are thinned to 16 spread over b and Delta
(named too); more than 20 directions read as 20 (the trained most; on the
HCP-style 90 directions the 90 % intervals held 0.83-0.89 of the truths,
doc/validation/protocol_free.md).
"""

from .design import (
    B_TOLERANCE,
    DESIGN,
    DIRECTIONS,
    FREE_SCALARS,
    FREE_TARGETS,
    L4_DIRECTIONS,
    MAX_SHELLS,
    SNR_RANGE,
    decode_free,
    encode_free,
    random_union,
)
from .estimator import ProtocolFreeEstimator
from .shells import ProtocolShells, Shell, make_shell
from .shipped import (
    SHIPPED_SETTINGS,
    load_protocol_free,
    settings_key,
    shipped_key,
    simulated_unions,
    train_shipped,
    union_protocols,
)
from .tokens import N_TOKEN, shell_token_features
from .training import train_protocol_free

__all__ = [
    "DESIGN",
    "FREE_TARGETS",
    "FREE_SCALARS",
    "MAX_SHELLS",
    "DIRECTIONS",
    "L4_DIRECTIONS",
    "B_TOLERANCE",
    "SNR_RANGE",
    "N_TOKEN",
    "Shell",
    "ProtocolShells",
    "ProtocolFreeEstimator",
    "SHIPPED_SETTINGS",
    "encode_free",
    "decode_free",
    "make_shell",
    "shell_token_features",
    "random_union",
    "train_protocol_free",
    "settings_key",
    "shipped_key",
    "union_protocols",
    "simulated_unions",
    "load_protocol_free",
    "train_shipped",
]
