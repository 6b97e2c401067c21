"""dipy_spinverse: permeability-aware microstructure imaging for DIPY."""

__version__ = "0.1.0.dev0"
