"""The noise the inversion's losses read, in one form.

A :class:`Noise` is the relative noise level a fit's losses are measured in
(noise over the b = 0 signal, 1/SNR) and each acquisition's precision
relative to it: acquisition ``j`` of voxel ``i`` has variance ``level^2 /
precision[i, j]``. :func:`~dipy_spinverse.inverse.reconstruct.reconstruct`
takes one as ``data_noise`` (the DIPY layer gives each fit's:
:attr:`dipy_spinverse.reconst.gate.Admitted.noise`), or makes it from its
``sigma`` option and the sequences' b = 0 scales
(:func:`~dipy_spinverse.sim.signals.noise_precision`), once
(:func:`voxel_noise`); below it every loss -- the face fit, the label
search's scorers and its bootstrap, the fit's own data term -- reads this
object and nothing else of the noise.
"""

from dataclasses import dataclass

import torch

from ..checks import check_number
from ..sim.signals import data_loss

__all__ = ["Noise", "UNKNOWN", "voxel_noise"]


@dataclass(frozen=True)
class Noise:
    """The fitted voxels' noise, as the losses read it.

    Attributes
    ----------
    level : float
        The relative noise (1/SNR) the losses are measured in; 0: unknown
        (the loss is then the plain misfit, with no Rician floor and no
        noise bound on the label search's moves).
    precision : torch.Tensor or ndarray (n_voxels, n_acquisitions) or None
        Each acquisition's precision in units of ``1 / level^2`` (None: 1
        for every acquisition).
    """

    level: float = 0.0
    precision: object = None

    def __post_init__(self):
        level = check_number(
            self.level,
            "noise level",
            minimum=0,
            maximum=1,
            hint=" (noise relative to the b = 0 signal, 1/SNR; 0 if unknown)",
        )
        object.__setattr__(self, "level", level)

    @property
    def known(self):
        """Whether the level is known (> 0)."""
        return self.level > 0

    def pure_noise_loss(self, loss_scale):
        """The expected data term of the truth under this noise, ``loss_scale *
        level^2`` (mean squared residual; 0 when the level is unknown)."""
        return loss_scale * self.level**2

    def voxels(self, index):
        """This noise of the voxels ``index`` only."""
        if self.precision is None:
            return self
        return Noise(self.level, self.precision[index])

    def columns(self, index):
        """This noise on the acquisitions ``index`` only."""
        if self.precision is None:
            return self
        return Noise(self.level, self.precision[:, index])

    def repeat(self, k):
        """This noise for ``k`` copies of its voxels, stacked (``k * n``)."""
        if self.precision is None:
            return self
        return Noise(self.level, self.precision.repeat(k, 1))

    def data_loss(self, predicted, measured, loss, rows=slice(None)):
        """The data term of ``predicted`` against ``measured`` under this noise.

        Parameters
        ----------
        predicted, measured : torch.Tensor (..., n_acquisitions)
            b0-normalised signals.
        loss : LossConfig
            The loss's settings (``loss_scale``, ``noise``).
        rows : index, optional
            The voxels of :attr:`precision` that ``measured``'s rows are.

        Returns
        -------
        torch.Tensor (...)
            :func:`~dipy_spinverse.sim.signals.data_loss`.
        """
        return data_loss(
            predicted,
            measured,
            loss_scale=loss.loss_scale,
            sigma=self.level,
            noise=loss.noise,
            precision=None if self.precision is None else self.precision[rows],
        )


#: The noise of a fit that does not know it: level 0, every precision 1 (the
#: loss is the plain misfit).
UNKNOWN = Noise()


def voxel_noise(data_noise, signals, config, *, dtype, device):
    """The noise of :func:`~dipy_spinverse.inverse.reconstruct.reconstruct`'s
    voxels, its precisions a tensor of ``dtype`` on ``device``.

    Parameters
    ----------
    data_noise : Noise or float or None
        The fit's noise; a float is its level; None: the configuration's
        ``sigma``. Where its precisions are not given, the sequences' own
        (``signals.precision``).
    signals : VoxelSignals
        The voxels, normalised.
    config : InversionConfig
        The fit's settings (``config.loss.sigma``, read only when
        ``data_noise`` is None).
    dtype : torch.dtype
    device : str or torch.device

    Returns
    -------
    Noise

    Raises
    ------
    ValueError
        The precisions are not one per voxel and acquisition.
    """
    if data_noise is None:
        noise = Noise(config.loss.sigma)
    elif isinstance(data_noise, Noise):
        noise = data_noise
    else:
        noise = Noise(data_noise)
    own = noise.precision is None
    precision = torch.as_tensor(signals.precision if own else noise.precision)
    if tuple(precision.shape) != tuple(signals.normalised.shape):
        raise ValueError(
            f"noise.precision must have one value per voxel and acquisition "
            f"{tuple(signals.normalised.shape)}, got {tuple(precision.shape)}."
        )
    # Per-sequence noise weights belong to the noise model: with the level
    # unknown (0) the loss stays the published unweighted misfit, whose search
    # paths the presets were validated on (weighting noise-free paper-physics
    # data by the absorbing wall's b = 0 decay lost the bent axon's exact shape).
    if not noise.known:
        precision = torch.ones_like(precision)
    return Noise(noise.level, precision.to(dtype=dtype, device=device))
