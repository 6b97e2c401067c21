"""Geometry of labelled grids: per-voxel tissue descriptors.

:mod:`.descriptors` is the single definition of the numbers a voxel's cells
are summarised by (restricted fraction, cell size, smooth surface-to-volume,
permeability, exchange time, anisotropy and orientation), shared by fits,
benchmarks, tests and the amortised posterior.
"""

from .descriptors import (
    DESCRIPTORS,
    SMOOTHING,
    UNITS,
    WHITE_MATTER_UNITS,
    cell_covariances,
    describe,
    describe_substrate,
    membrane_areas,
)

__all__ = [
    "DESCRIPTORS",
    "UNITS",
    "WHITE_MATTER_UNITS",
    "SMOOTHING",
    "describe",
    "describe_substrate",
    "membrane_areas",
    "cell_covariances",
]
