"""Karger exchange: two Gaussian compartments exchanging water (DIPY model)."""

import torch
from dipy.testing.decorators import warning_for_keywords

from ..checks import check_seconds
from . import blocks
from .base import CompartmentFit, CompartmentModel
from .fitting import Bound
from .options import (
    check_bounds,
    check_diffusivity_bounds,
    init_kwargs,
    log_grid,
    with_common_parameters,
)

__all__ = ["ExchangeModel", "ExchangeFit"]

_S_TO_US = 1e6
# Longest plausible residence time (s): far beyond T1, so nothing of it is
# left to measure; a larger bound is a time in ms given as s.
_MAX_EXCHANGE_TIME = 60.0


class ExchangeModel(CompartmentModel):
    """Two isotropic Gaussian compartments exchanging water (Karger 1985).

    The signal of :func:`~.blocks.karger` for the actual (finite-pulse)
    waveforms: ``dM/dt = -(bdot(t) diag(D_i, D_e) + K) M`` with
    ``M(0) = S0 (f_intra, 1 - f_intra)``, exchange rates ``k_ie = 1 /
    exchange_time`` and ``k_ei = k_ie f_intra / (1 - f_intra)`` (detailed
    balance). ``D_intra <= D_extra`` labels the compartments.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable
        With ``big_delta`` and ``small_delta`` (s); several diffusion times
        are needed to see exchange.
    exchange_time_bounds : (float, float), optional
        Range of the intra-compartment residence time in s.
    d_bounds : (float, float), optional
        Range of D_extra in mm^2/s (D_intra lies between 0 and D_extra).
    f_bounds : (float, float), optional
        Range of f_intra.

    Notes
    -----
    ``f_intra`` sets both the initial magnetisation and, through detailed
    balance, ``k_ei``, so it is nonlinear here; only S0 is solved linearly.
    Karger's model assumes each compartment is well mixed (no restriction):
    restricted intracellular diffusion shows up as a low ``D_intra`` that
    depends on the diffusion time, which the model then partly attributes to
    exchange.
    """

    __doc__ = with_common_parameters(__doc__, grid_directions=False)
    _needs_timing = True
    # The network alone is within 1.5x of the fitted errors here (exchange
    # time 1.5x with log targets), and the polish's Jacobian would be forward
    # differences of the Karger ODE: not worth its cost by default.
    default_polish = 0
    param_names = ("S0", "f_intra", "d_intra", "d_extra", "exchange_time")
    # Exchange times span 3 decades and their error is relative: the learned
    # estimator regresses their logarithm.
    _log_targets = ("exchange_time",)

    @warning_for_keywords()
    def __init__(
        self,
        gtab,
        *,
        exchange_time_bounds=(2e-3, 2.0),
        d_bounds=(0.1e-3, 3.5e-3),
        f_bounds=(0.02, 0.98),
        n_starts=3,
        max_iter=100,
        chunk_size=256,
        fit_method="varpro",
        snr=50.0,
        learned_options=None,
        cache_dir=None,
    ):
        self.n_fibres = 0
        tlo, thi = check_bounds(
            exchange_time_bounds, "exchange_time_bounds", lower=1e-9
        )
        check_seconds(
            thi, "the upper end of exchange_time_bounds", 2.0, _MAX_EXCHANGE_TIME
        )
        dlo, dhi = check_diffusivity_bounds(d_bounds, "d_bounds", lower=1e-9)
        flo, fhi = check_bounds(f_bounds, "f_bounds")
        if fhi >= 1.0:
            raise ValueError(f"f_bounds must end below 1, got {f_bounds!r}")
        # Kept as checked: the model's settings (:meth:`settings`).
        self.exchange_time_bounds = (tlo, thi)
        self.d_bounds, self.f_bounds = (dlo, dhi), (flo, fhi)
        self._shared = (
            Bound("f_intra", flo, fhi),
            Bound("d_extra", dlo, dhi),
            Bound("d_ratio", 0.0, 1.0),
            Bound("exchange_time", tlo * _S_TO_US, thi * _S_TO_US, log=True),
        )
        self._fibre = ()
        self._grid = {
            "f_intra": (0.2, 0.4, 0.6, 0.8),
            "d_extra": tuple(torch.linspace(dlo, dhi, 5)[1:-1].tolist()),
            "d_ratio": (0.1, 0.3, 0.6),
            "exchange_time": tuple(log_grid(tlo * _S_TO_US, thi * _S_TO_US, n=5)),
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
        d_extra = shared["d_extra"]
        signal = blocks.karger(
            acq,
            d1=shared["d_ratio"] * d_extra,
            d2=d_extra,
            f1=shared["f_intra"],
            k12=1.0 / shared["exchange_time"],
        )
        return signal[..., None]

    def _to_params(self, shared, fibre, dirs, c, scale):
        d_extra = shared["d_extra"]
        return torch.stack(
            [
                scale * c[:, 0],
                shared["f_intra"],
                shared["d_ratio"] * d_extra,
                d_extra,
                shared["exchange_time"] / _S_TO_US,
            ],
            -1,
        )

    def _from_params(self, params):
        d_extra = params[:, 3]
        safe = torch.where(d_extra > 0, d_extra, torch.ones_like(d_extra))
        shared = {
            "f_intra": params[:, 1],
            "d_extra": d_extra,
            "d_ratio": params[:, 2] / safe,
            "exchange_time": params[:, 4] * _S_TO_US,
        }
        ones = torch.ones_like(params[:, :1])
        return shared, {}, params.new_zeros(len(params), 0, 3), ones, params[:, 0]


class ExchangeFit(CompartmentFit):
    """Karger exchange maps."""

    @property
    def f_intra(self):
        """Signal fraction of the slow (intracellular) compartment."""
        return self._param("f_intra")

    @property
    def d_intra(self):
        """Diffusivity of the slow compartment in mm^2/s."""
        return self._param("d_intra")

    @property
    def d_extra(self):
        """Diffusivity of the fast compartment in mm^2/s."""
        return self._param("d_extra")

    @property
    def exchange_time(self):
        """Mean residence time in the intra compartment, 1 / k_ie, in s."""
        return self._param("exchange_time")

    @property
    def exchange_rate(self):
        """``k_ie = 1 / exchange_time`` in 1/s."""
        return 1.0 / self.exchange_time


ExchangeModel._fit_class = ExchangeFit
