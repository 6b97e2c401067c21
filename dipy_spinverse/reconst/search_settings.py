"""What the label search's voxels need of their model, frozen once a fit.

DIPY's shape: the model holds settings, the fit holds arrays. The voxel
loop (:mod:`.runner`) and the steps it calls (statuses, surfaces, meshes,
progress) read one :class:`SearchSettings`, made by the model once a fit
(:meth:`SpinverseSearchModel.search_settings
<dipy_spinverse.reconst.search_model.SpinverseSearchModel.search_settings>`),
and never the model itself: a voxel's search is a function of its signals,
its noise and these settings, and returns arrays. A cluster worker on
another device gets a copy of the settings on its own device
(:meth:`SearchSettings.on_device`), not a copy of the model.
"""

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["SearchSettings", "SurfaceCheck", "knows_noise"]


def knows_noise(sigma, config):
    """Whether a fit knows the noise: ``sigma`` (the data's units), or the
    configuration's own relative noise.

    Parameters
    ----------
    sigma : float
        The noise in the data's units (0: not given).
    config : InversionConfig

    Returns
    -------
    bool
    """
    return sigma > 0 or config.loss.sigma > 0


@dataclass(frozen=True, eq=False)
class SurfaceCheck:
    """The surface check of a search (``prior=``): its trained posterior.

    Attributes
    ----------
    estimator : PosteriorEstimator
        The posterior trained on the check's prior and the fit's protocol.
    prior : TissuePrior
        That prior (named in the log of voxels outside it).
    n_samples : int
        Posterior draws per voxel.
    snr_range : (float, float)
        The SNR the estimator was trained on.
    """

    estimator: object
    prior: object
    n_samples: int
    snr_range: tuple


@dataclass(frozen=True, eq=False)
class SearchSettings:
    """The settings one label-search fit runs under (read-only).

    Attributes
    ----------
    grid : TetGrid
        The fixed grid of every voxel.
    protocol : Protocol
        The acquisitions, in the data's volume order.
    n_sequences : int
        The protocol's sequences (one S0 each).
    sigma : float or ndarray
        The noise in the data's units (0: not given).
    config : InversionConfig
        The inversion's configuration on this protocol.
    diffusivity : float
        Free diffusivity, mm^2/s.
    dtype : torch.dtype
    device : torch.device
    batch_size : int
        Voxels per batched inversion.
    protocol_problems : tuple of str
        Why the protocol cannot determine the membranes (empty when none).
    mesh_options : RefineOptions or None
        The smooth-mesh refinement's options (None: no refinement).
    mesh_tets : ndarray or None
        The smooth meshes' shared tetrahedra (None: no refinement).
    surface_check : SurfaceCheck or None
        The surface check (None: the search has none).
    """

    grid: object
    protocol: object
    n_sequences: int
    sigma: object
    config: object
    diffusivity: float
    dtype: torch.dtype
    device: torch.device
    batch_size: int
    protocol_problems: tuple = ()
    mesh_options: object = None
    mesh_tets: object = None
    surface_check: SurfaceCheck = None

    @property
    def refine_mesh(self):
        """Whether each fitted voxel's largest cell is refined into a smooth
        mesh."""
        return self.mesh_options is not None

    @property
    def has_labels(self):
        """Whether the inversion returns cell labels."""
        return self.config.returns_labels

    @property
    def noise_known(self):
        """Whether the fit knows the noise (``sigma``, or the configuration's
        own relative noise)."""
        return knows_noise(self.sigma, self.config)

    def on_device(self, device):
        """These settings on ``device`` (a cluster worker's own GPU).

        Parameters
        ----------
        device : str or torch.device

        Returns
        -------
        SearchSettings
        """
        return dataclasses.replace(self, device=torch.device(device))
