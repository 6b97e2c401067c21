"""The protocol-free estimator: a set encoder over shell tokens and a flow.

A small Set Transformer (Lee et al. 2019) turns any number of tokens
(:mod:`.tokens`), in any order, into the context of a neural spline flow
(zuko) over the rotation-invariant descriptors
(:data:`~.design.FREE_TARGETS`): one network per token (with the voxel's
noise level), one self-attention layer across the shells, two learned
queries attending over them, with the log of the number of shells, then a
second network. It carries, as buffers, the tokens' and coordinates'
standardisation and the credible bounds' recalibration (a level table per
descriptor, :mod:`~dipy_spinverse.posterior.calibration`), as the
per-protocol :class:`~dipy_spinverse.posterior.PosteriorEstimator` does.
"""

import numpy as np
import torch

from ..calibration import LEVELS, calibrated_levels
from ..estimator import flushed_denormals, normal_points
from .design import FREE_SCALARS, FREE_TARGETS
from .tokens import N_TOKEN

__all__ = ["ProtocolFreeEstimator"]


class ProtocolFreeEstimator(torch.nn.Module):
    """Set encoder over shell tokens and conditional flow; see the module
    documentation.

    Parameters
    ----------
    width : int
        Hidden units of every network.
    context : int
        The flow's context size.
    transforms : int
        The flow's spline transforms.
    """

    def __init__(self, *, width=96, context=32, transforms=4):
        import zuko

        super().__init__()
        self.phi = _mlp(N_TOKEN + 1, width, width)
        self.mix = torch.nn.TransformerEncoderLayer(
            width, 4, 2 * width, dropout=0.0, batch_first=True
        )
        self.queries = torch.nn.Parameter(0.1 * torch.randn(2, width))
        self.attend = torch.nn.MultiheadAttention(width, 4, batch_first=True)
        self.rho = _mlp(2 * width + 2, width, context)
        self.flow = zuko.flows.NSF(
            len(FREE_TARGETS),
            context=context,
            transforms=transforms,
            hidden_features=(width, width),
            passes=2,
        )
        self.register_buffer("token_mean", torch.zeros(N_TOKEN))
        self.register_buffer("token_std", torch.ones(N_TOKEN))
        self.register_buffer("y_mean", torch.zeros(len(FREE_TARGETS)))
        self.register_buffer("y_std", torch.ones(len(FREE_TARGETS)))
        self.register_buffer(
            "level_tables",
            torch.as_tensor(
                np.tile(LEVELS, (len(FREE_SCALARS), 1)), dtype=torch.float32
            ),
        )

    def context(self, tokens, mask, sigma):
        """The flow's context of ``tokens`` (B, S, N_TOKEN) with ``mask``
        (B, S) of the shells present and relative noise ``sigma`` (B,)."""
        log_sigma = torch.log(sigma)
        x = (tokens - self.token_mean) / self.token_std
        noise = log_sigma[:, None, None].expand(*x.shape[:2], 1)
        present = mask > 0.5
        h = self.phi(torch.cat([x, noise], -1)) * mask[..., None]
        h = self.mix(h, src_key_padding_mask=~present) * mask[..., None]
        queries = self.queries.expand(len(h), -1, -1)
        pooled, _ = self.attend(queries, h, h, key_padding_mask=~present)
        count = torch.log(mask.sum(1, keepdim=True))
        return self.rho(torch.cat([pooled.flatten(1), count, log_sigma[:, None]], -1))

    def log_prob(self, tokens, mask, sigma, coordinates):
        """Log density of flow coordinates (standardised inside)."""
        y = (coordinates - self.y_mean) / self.y_std
        return (
            self.flow(self.context(tokens, mask, sigma)).log_prob(y)
            - torch.log(self.y_std).sum()
        )

    @torch.no_grad()
    def sample(self, tokens, mask, sigma, n, *, generator_seed=None):
        """``n`` posterior draws of the flow coordinates, (n, n_voxels, 8),
        randomised quasi-Monte Carlo as
        :meth:`~dipy_spinverse.posterior.PosteriorEstimator.sample`
        draws them."""
        base = normal_points(
            n,
            len(tokens),
            len(FREE_TARGETS),
            seed=generator_seed,
            voxel_data=(tokens, mask, sigma),
        )
        with flushed_denormals():
            flow = self.flow(self.context(tokens, mask, sigma))
            y = flow.transform.inv(base)
        return y * self.y_std + self.y_mean

    def level_table(self, name):
        """``name``'s recalibration table
        (:mod:`~dipy_spinverse.posterior.calibration`)."""
        return self.level_tables[FREE_SCALARS.index(name)].cpu().numpy()

    def quantile_levels(self, name, levels):
        """The flow's levels that give ``name``'s calibrated bounds."""
        return calibrated_levels(levels, self.level_table(name))


def _mlp(n_in, width, n_out):
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, width),
        torch.nn.SiLU(),
        torch.nn.Linear(width, width),
        torch.nn.SiLU(),
        torch.nn.Linear(width, n_out),
    )
