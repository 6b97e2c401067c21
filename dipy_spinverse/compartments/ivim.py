"""IVIM: the bi-exponential intravoxel incoherent motion model (DIPY model)."""

import torch
from dipy.testing.decorators import warning_for_keywords

from . import blocks
from .base import CompartmentFit, CompartmentModel, nnls_fractions
from .fitting import Bound
from .options import (
    check_bounds,
    check_diffusivity_bounds,
    init_kwargs,
    log_grid,
    with_common_parameters,
)

__all__ = ["IvimCompartmentModel", "IvimCompartmentFit"]


class IvimCompartmentModel(CompartmentModel):
    """Intravoxel incoherent motion, bi-exponential (Le Bihan et al. 1988).

    ``S = S0 [f exp(-b D*) + (1 - f) exp(-b D)]``: the model, parameter layout
    ``[S0, f, D*, D]`` and attribute names of DIPY's
    :class:`dipy.reconst.ivim.IvimModelTRR` / ``IvimFit``, so the maps are
    interchangeable; named apart from DIPY's ``IvimModel`` so that both can
    be imported side by side. The fit is this package's own (variable projection on
    ``S0 f`` and ``S0 (1 - f)``, a grid over (D, D*), Levenberg-Marquardt),
    vectorised over voxels instead of DIPY's per-voxel two-stage fit.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable
        b-values (timing not needed; b-values are used as given, including
        those below ``gtab.b0_threshold``).
    d_bounds : (float, float), optional
        Range of the tissue diffusivity D in mm^2/s.
    d_star_bounds : (float, float), optional
        Range of the pseudo-diffusion coefficient D* in mm^2/s; its lower end
        must be >= the upper end of ``d_bounds`` so that the two exponentials
        cannot swap.
    """

    __doc__ = with_common_parameters(__doc__, grid_directions=False)
    _needs_timing = False
    param_names = ("S0", "f", "D_star", "D")

    @warning_for_keywords()
    def __init__(
        self,
        gtab,
        *,
        d_bounds=(0.0, 4.0e-3),
        d_star_bounds=(4.0e-3, 0.3),
        n_starts=3,
        max_iter=100,
        chunk_size=1024,
        fit_method="varpro",
        snr=50.0,
        learned_options=None,
        cache_dir=None,
    ):
        self.n_fibres = 0
        lo, hi = check_diffusivity_bounds(d_bounds, "d_bounds")
        slo, shi = check_bounds(d_star_bounds, "d_star_bounds", lower=1e-9)
        if slo < hi:
            raise ValueError(
                f"d_star_bounds starts at {slo}, below the top of d_bounds ({hi}): "
                "D* and D could swap; make d_star_bounds[0] >= d_bounds[1]"
            )
        # Kept as checked: the model's settings (:meth:`settings`).
        self.d_bounds, self.d_star_bounds = (lo, hi), (slo, shi)
        self._shared = (Bound("D_star", slo, shi, log=True), Bound("D", lo, hi))
        self._fibre = ()
        self._grid = {
            "D_star": tuple(log_grid(slo, shi, n=6)),
            "D": tuple(torch.linspace(lo, hi, 7)[1:-1].tolist()),
        }
        self._setup(
            gtab,
            **init_kwargs(
                n_starts=n_starts,
                max_iter=max_iter,
                n_grid_directions=1,
                chunk_size=chunk_size,
                fit_method=fit_method,
                snr=snr,
                learned_options=learned_options,
                cache_dir=cache_dir,
            ),
        )

    def _shared_columns(self, acq, shared, B):
        return torch.stack(
            [
                blocks.ball(acq, diffusivity=shared["D_star"]),
                blocks.ball(acq, diffusivity=shared["D"]),
            ],
            dim=-1,
        )

    def _to_params(self, shared, fibre, dirs, c, scale):
        fractions, total = nnls_fractions(c)
        return torch.stack(
            [scale * total, fractions[:, 0], shared["D_star"], shared["D"]], -1
        )

    def _from_params(self, params):
        shared = {"D_star": params[:, 2], "D": params[:, 3]}
        f = params[:, 1]
        fractions = torch.stack([f, 1.0 - f], -1)
        return shared, {}, params.new_zeros(len(params), 0, 3), fractions, params[:, 0]


class IvimCompartmentFit(CompartmentFit):
    """IVIM maps, named as in :class:`dipy.reconst.ivim.IvimFit`."""

    @property
    def S0_predicted(self):
        """Fitted S0 (DIPY's name)."""
        return self.S0

    @property
    def perfusion_fraction(self):
        """Perfusion fraction f."""
        return self._param("f")

    @property
    def D_star(self):
        """Pseudo-diffusion coefficient D* in mm^2/s."""
        return self._param("D_star")

    @property
    def D(self):
        """Tissue diffusivity D in mm^2/s."""
        return self._param("D")


IvimCompartmentModel._fit_class = IvimCompartmentFit
