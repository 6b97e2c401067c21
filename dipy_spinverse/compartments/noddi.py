"""NODDI: neurite orientation dispersion and density imaging as a DIPY ReconstModel."""

import functools
import math

import numpy as np
import torch
from dipy.testing.decorators import warning_for_keywords

from ..checks import check_choice, check_diffusivity
from . import blocks
from .base import CompartmentFit, CompartmentModel, canonical_directions, nnls_fractions
from .fibres import built_once
from .fitting import Bound
from .options import (
    D_ISO,
    D_PAR_INVIVO,
    check_response,
    fibre_options,
    with_common_parameters,
)

__all__ = ["NoddiModel", "NoddiFit"]

# ODI bounds: 0.01 is kappa = 64, where the Watson quadrature is still exact to
# 2e-9; 0.99 is nearly isotropic.
_ODI_BOUNDS = (0.01, 0.99)


class NoddiModel(CompartmentModel):
    """Neurite orientation dispersion and density imaging (Zhang et al. 2012).

    ``S = S0 [fiso exp(-b d_iso) + (1 - fiso) sum_k w_k (ndi_k E_ic,k +
    (1 - ndi_k) E_ec,k)]`` with ``E_ic`` sticks (``d_par``) Watson-dispersed
    around ``mu_k`` with concentration ``kappa_k``
    (:func:`~.blocks.watson_stick`), and ``E_ec`` the zeppelin of the
    Watson-averaged tensor with the tortuosity ``d_perp = d_par (1 - ndi)``
    (:func:`~.blocks.watson_hindered`), as in the NODDI toolbox.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable
        b-values and directions (timing not needed).
    n_fibres : int, optional
        Fibre populations (0, 1, 2 or 3), each with its own direction, ODI,
        NDI and weight ``w_k``; 0 is free water alone. Default 1; with
        ``fibres="auto"`` the largest count per voxel, default 3.
    fibres : "auto", optional
        A fibre count per voxel (0 to ``n_fibres``): chosen from DIPY's CSD
        peaks and an information criterion, or given to :meth:`fit` as a
        map. The parameters then have the layout of ``n_fibres`` fibres, NaN
        for the fibres a voxel does not have (``fit.n_fibres`` holds the
        counts).
    response : tuple, optional
        CSD single-fibre response (``(evals, S0)``, for the highest shell)
        for ``fibres="auto"``; default estimated from the voxels of FA > 0.7
        (a generic fibre's where there is none, with a warning).
    d_par : float, optional
        Intrinsic parallel diffusivity in mm^2/s (1.7e-3 in vivo).
    d_iso : float, optional
        Free-water diffusivity in mm^2/s.
    extra_average : {"tensor", "signal"}, optional
        Extra-neurite compartment: the zeppelin of the Watson-averaged tensor
        as in the NODDI toolbox ("tensor", :func:`~.blocks.watson_hindered`)
        or the Watson average of zeppelin signals as in dmipy ("signal",
        :func:`~.blocks.watson_zeppelin`).
    kernels : {"table", "exact"}, optional
        Intra-neurite signal on the model's own gradient table: interpolated
        in a table of the exact Watson-stick signal per b-value over ODI and
        the gradient-fibre cosine, as AMICO precomputes its kernels
        (:class:`~.blocks.WatsonStickTable`, within 1e-5 of the exact signal,
        about ten times faster; built once per process for a gradient
        table and d_par), or "exact" (the
        quadrature at every evaluation). Predictions for another gradient
        table are always exact.

    Notes
    -----
    ``n_starts`` defaults to 1 for one fibre and 3 for several.
    """

    __doc__ = with_common_parameters(__doc__)
    _needs_timing = False

    # The learned prior draws ODI log-uniformly: a uniform ODI puts half the
    # training voxels' populations above 0.5, nearly isotropic, their
    # directions undefined; with three fibres such voxels dominated the loss
    # and the network split one tight population into dispersed ones
    # (doc/compartments.md, "Learned estimators": 3-fibre directions 22.5
    # -> 15.8 degrees on 45-degree crossings with the weights below).
    _log_prior = ("odi",)

    @property
    def _log_targets(self):
        # With three fibres the network regresses log ODI: over a prior of two
        # decades a squared error on ODI itself is mostly about the widest
        # populations, and the estimate of a weak, poorly determined one is
        # pulled towards them (3 mutually perpendicular fibres: the two weaker
        # overestimated by 0.14-0.23, ODI 1.55x the fitted error; 0.77x with
        # log targets). With one or two, ODI is well determined and the linear
        # target is the better one (1.07x and 0.61x against 1.18x and 0.94x;
        # doc/compartments.md).
        return ("odi",) if self.n_fibres >= 3 else ()

    def _sample_weights(self, n, K, rng):
        """Free water as in a flat Dirichlet over the K = F + 1 columns (a
        Beta(1, F) fraction); with several fibres the tissue is shared by
        a Dirichlet(2), not a flat one (the flat Dirichlet's own split),
        so that a voxel of an F-fibre model mostly has F populations: a
        flat split gives one of three fibres less than 10 % of the tissue
        in 51 % of voxels, Dirichlet(2) in 24 %."""
        if self.n_fibres < 2:
            return super()._sample_weights(n, K, rng)
        fiso = rng.beta(1.0, self.n_fibres, n)[:, None]
        tissue = rng.dirichlet(np.full(self.n_fibres, 2.0), n)
        return np.concatenate([tissue * (1.0 - fiso), fiso], axis=1)

    @property
    def default_polish(self):
        # In the voxels' frames the network alone is within 1.1x of the
        # fitted errors at 1 and 2 fibres, at 35,000-43,000 voxels/s against
        # 10,300-13,500 with one iteration (doc/compartments.md, measured); a
        # lab-frame network (no shell of 20 directions, or frame=False)
        # still needs the iteration (one-fibre ODI 1.55x -> 1.11x).
        return 0 if self._signal_frame is not None else 1

    @property
    def _forward_mode(self):
        # The exact Watson integral has hand-written derivatives: forward
        # mode costs about 3 model evaluations per Jacobian instead of 6
        # (measured). The table is cheap, and torch's forward mode runs its
        # gathers and polynomial weights through slow Python decompositions:
        # forward differences are faster there (measured).
        return self.kernels == "exact"

    @property
    def _closed_form_jacobian(self):
        # Table kernels with the tensor-averaged extra-neurite compartment:
        # the Jacobian in closed form (blocks.noddi_neurite_derivatives), one
        # table pass instead of 5 per fibre for forward differences.
        return self.kernels == "table" and self.extra_average == "tensor"

    def _fibre_columns_and_jacobian(self, x):
        B, F = x.shape[0], self.n_fibres
        per = x.view(B, F, 5)  # per fibre: u_odi, u_ndi, v (3)
        _, fibre, dirs = self._unpack(x)
        value, d_odi, d_ndi, d_mu = blocks.noddi_neurite_derivatives(
            self._acq,
            self._stick_table,
            direction=dirs,
            odi=fibre["odi"],
            ndi=fibre["ndi"],
            d_par=self.d_par,
        )
        odi_bound, ndi_bound = self._fibre
        d_u_odi = d_odi * odi_bound.slope(per[..., 0])[..., None]
        d_u_ndi = d_ndi * ndi_bound.slope(per[..., 1])[..., None]
        # mu = v / |v|: d mu / d v = (I - mu mu^T) / |v|.
        norm = per[..., 2:].norm(dim=-1)[..., None, None]
        radial = (d_mu * dirs[..., None, :]).sum(-1, keepdim=True)
        d_v = (d_mu - radial * dirs[..., None, :]) / norm
        J = torch.cat([d_u_odi[..., None], d_u_ndi[..., None], d_v], dim=-1)

        def jacobian(c):
            Jc = J * c[:, :F, None, None]  # (B, F, M, 5)
            return Jc.permute(0, 2, 1, 3).reshape(B, J.shape[2], F * 5)

        return value[..., None], jacobian

    # Per fibre: w, ndi, odi, x, y, z.
    _per_fibre_params = 6
    # One fibre: start at the tensor's direction, scoring only the 20 scalar
    # grid combinations there instead of 2000 grid atoms. The direction of a
    # Watson fibre is the tensor's (by symmetry), and on the benchmark's
    # 1000 voxels (ODI up to 0.6) the errors were those of the 100-direction
    # grid to 3 digits at half the time (measured).
    _direction_starts = "tensor"

    _needs_b0 = True
    # n_starts as given (None: chosen by the fibre count), as its siblings
    # of other fibre counts take it.
    _setting_attributes = {"n_starts": "_n_starts_given"}

    @warning_for_keywords()
    def __init__(
        self,
        gtab,
        *,
        n_fibres=None,
        fibres=None,
        response=None,
        d_par=D_PAR_INVIVO,
        d_iso=D_ISO,
        extra_average="tensor",
        kernels="table",
        n_starts=None,
        max_iter=200,
        n_grid_directions=100,
        chunk_size=1024,
        fit_method="varpro",
        snr=50.0,
        learned_options=None,
        cache_dir=None,
    ):
        self.n_fibres, self.fibres = fibre_options(n_fibres, fibres)
        self.response = check_response(response)
        self._n_starts_given = n_starts
        if n_starts is None:
            # One fibre: the grid start is already in the right basin (extra
            # starts changed no fit in tests at SNR 50); several fibres: the
            # matching-pursuit completions of different first atoms differ.
            n_starts = 1 if self.n_fibres <= 1 else 3
        self.d_par = check_diffusivity(d_par, "d_par")
        self.d_iso = check_diffusivity(d_iso, "d_iso")
        self.extra_average = check_choice(
            extra_average, "extra_average", ("tensor", "signal")
        )
        self.kernels = check_choice(kernels, "kernels", ("table", "exact"))
        self._shared = ()
        self._fibre = (Bound("odi", *_ODI_BOUNDS), Bound("ndi", 0.0, 1.0))
        self._grid = {"odi": (0.05, 0.15, 0.3, 0.5, 0.75), "ndi": (0.2, 0.4, 0.6, 0.8)}
        names = ["S0", "fiso"]
        for k in range(self.n_fibres):
            names += [f"{p}_{k}" for p in ("w", "ndi", "odi", "x", "y", "z")]
        self.param_names = tuple(names)
        self._setup(
            gtab,
            n_starts=n_starts,
            max_iter=max_iter,
            n_grid_directions=n_grid_directions,
            chunk_size=chunk_size,
            fit_method=fit_method,
            snr=snr,
            learned_options=learned_options,
            cache_dir=cache_dir,
        )

    def _with_fibres(self, n_fibres):
        return built_once(self, "_submodels", n_fibres, lambda: self._sibling(n_fibres))

    def _sibling(self, n_fibres):
        """The same fitted NODDI model with ``n_fibres`` fibres."""
        return NoddiModel(
            self.gtab,
            n_fibres=n_fibres,
            d_par=self.d_par,
            d_iso=self.d_iso,
            extra_average=self.extra_average,
            kernels=self.kernels,
            n_starts=self._n_starts_given,
            max_iter=self.max_iter,
            n_grid_directions=self.n_grid_directions,
            chunk_size=self.chunk_size,
        )

    def _n_free(self, n_fibres):
        # fiso, then per fibre: weight, ndi, odi and two direction angles
        # (the tissue weights sum to 1 - fiso: one of them is not free).
        return 1 + 5 * n_fibres

    def _fill_padding(self, params):
        params = params.copy()
        fitted = np.isfinite(params[..., 0])
        for k in range(self.n_fibres):
            block = params[..., 2 + 6 * k : 8 + 6 * k]
            absent = fitted & np.isnan(block[..., 0])
            block[absent] = (0.0, 0.5, 0.5, 0.0, 0.0, 1.0)
        return params

    def _fibre_columns(self, acq, shared, fibre, dirs):
        if self.kernels == "table" and acq is self._acq and self._tabulated(fibre):
            intra = self._stick_table(dirs, fibre["odi"])
        else:
            kappa = blocks.odi_to_kappa(fibre["odi"])
            intra = blocks.watson_stick(
                acq, direction=dirs, kappa=kappa, d_par=self.d_par
            )
        return self._neurite_column(acq, dirs, fibre["odi"], fibre["ndi"], intra)

    def _start_columns(self, u, dirs):
        # The intra-neurite signal depends on ODI, not NDI: one table lookup
        # per distinct grid ODI (5) instead of per combination (20).
        if self.kernels != "table":
            return super()._start_columns(u, dirs)
        B, C = dirs.shape[0], u.shape[0]
        odi = self._fibre[0].value(u[:, 0])
        ndi = self._fibre[1].value(u[:, 1])
        distinct, inverse = torch.unique(odi, return_inverse=True)
        each = dirs[:, None].expand(B, C, 3)
        intra = self._stick_table(
            dirs[:, None].expand(B, len(distinct), 3), distinct.expand(B, -1)
        )[:, inverse]
        fibre = self._neurite_column(
            self._acq, each, odi.expand(B, -1), ndi.expand(B, -1), intra
        )  # (B, C, M, 1)
        iso = self._shared_columns(self._acq, {}, B * C)
        return torch.cat([fibre.reshape(B * C, -1, 1), iso], dim=-1)

    def _neurite_column(self, acq, dirs, odi, ndi, intra):
        """``ndi intra + (1 - ndi) extra`` (..., M, 1) given the intra-neurite
        signals (..., M)."""
        kappa = blocks.odi_to_kappa(odi)
        average = (
            blocks.watson_hindered
            if self.extra_average == "tensor"
            else blocks.watson_zeppelin
        )
        extra = average(
            acq,
            direction=dirs,
            kappa=kappa,
            d_par=self.d_par,
            d_perp=self.d_par * (1.0 - ndi),
        )
        ndi = ndi[..., None]
        return (ndi * intra + (1.0 - ndi) * extra)[..., None]  # (B, F, M, 1)

    def _tabulated(self, fibre):
        """Whether the table holds every ODI of ``fibre``: fits stay within
        its range (the model's bounds), but parameters given to ``predict``
        (another tool's maps, ODI = 0) need not, and the table clamps."""
        odi = fibre["odi"]
        odi = odi[~torch.isnan(odi)]
        low, high = _ODI_BOUNDS
        return bool(((odi >= low) & (odi <= high)).all())

    @functools.cached_property
    def _stick_table(self):
        return blocks.WatsonStickTable(
            self._acq, d_par=self.d_par, odi_range=_ODI_BOUNDS
        )

    #: A constant column beside free water (only in the fits that count
    #: fibres, :meth:`_counting_model`).
    _floor_column = False

    def _shared_columns(self, acq, shared, B):
        iso = blocks.ball(acq, diffusivity=self.d_iso).expand(B, -1)[..., None]
        if not self._floor_column:
            return iso
        return torch.cat([iso, blocks.dot(acq, shape=(B,))[..., None]], dim=-1)

    def _counting_model(self, n_fibres):
        # As ActiveAx's: the Rician noise floor of the high shells (sigma
        # sqrt(pi / 2) where the signal vanishes, e.g. along a fibre at b =
        # 3000) is a constant the model has no column for; a least-squares
        # fit without one fits it with extra, dispersed fibres. The counting
        # fits get a constant column (its fraction is dropped from their
        # parameters); the voxels are then refitted with the counts found
        # and the model's own compartments.
        def build():
            counting = self._sibling(n_fibres)
            counting._floor_column = True
            return counting

        return built_once(self, "_counting_models", n_fibres, build)

    def _to_params(self, shared, fibre, dirs, c, scale):
        F = self.n_fibres
        fractions, total = nnls_fractions(c)
        tissue = fractions[:, :F]
        tissue_sum = tissue.sum(-1, keepdim=True)
        # Pure free water leaves the fibre weights undefined: share equally.
        w = torch.where(
            tissue_sum > 0, tissue / tissue_sum.clamp_min(1e-300), 1.0 / max(F, 1)
        )
        order = w.argsort(dim=-1, descending=True)

        def sort(t):
            return torch.take_along_dim(t, order, dim=1)

        dirs = torch.take_along_dim(canonical_directions(dirs), order[..., None], 1)
        per = torch.stack(
            [sort(w), sort(fibre["ndi"]), sort(fibre["odi"])], dim=-1
        )  # (B, F, 3)
        per = torch.cat([per, dirs], dim=-1).reshape(c.shape[0], -1)
        head = torch.stack([scale * total, fractions[:, F]], dim=-1)
        return torch.cat([head, per], dim=-1)

    def _from_params(self, params):
        if self._floor_column:
            raise NotImplementedError("the counting fits have no public layout")
        F = self.n_fibres
        per = params[:, 2:].reshape(len(params), F, 6)
        fiso = params[:, 1:2]
        fibre = {"ndi": per[..., 1], "odi": per[..., 2]}
        fractions = torch.cat([(1.0 - fiso) * per[..., 0], fiso], dim=-1)
        return {}, fibre, per[..., 3:], fractions, params[:, 0]


class NoddiFit(CompartmentFit):
    """NODDI parameter maps. Per-fibre maps have a trailing fibre axis when
    the model has ``n_fibres != 1`` or ``fibres="auto"`` (fibres sorted by
    weight, NaN beyond each voxel's count), as ActiveAx's and ZCD's."""

    @property
    def _single(self):
        """One fibre and no count selection: maps without a fibre axis."""
        return self.model.fibres is None and self.model.n_fibres == 1

    def _per_fibre(self, name):
        if self._single:
            return self._param(f"{name}_0")
        return super()._per_fibre(name)

    @property
    def fiso(self):
        """Free-water (isotropic) signal fraction."""
        return self._param("fiso")

    @property
    def ndi(self):
        """Neurite density index: intra-neurite fraction of the tissue part."""
        return self._per_fibre("ndi")

    @property
    def odi(self):
        """Orientation dispersion index ``(2 / pi) arctan(1 / kappa)``."""
        return self._per_fibre("odi")

    @property
    def tissue_ndi(self):
        """Neurite density of the tissue part as a whole, ``sum_k w_k ndi_k``
        (``w`` the fibre fractions): the one NDI that single-population NODDI
        (and AMICO) reports, (...) in every layout; 0 where there is no fibre,
        NaN where the voxel could not be fitted (as the other maps). In
        crossings it is much better determined than each population's NDI
        (``doc/compartments.md``, AMICO section)."""
        if self._single:
            return self.ndi
        terms = self.fibre_fractions * self.ndi
        # Absent fibres are NaN in both maps; they hold no neurites.
        total = np.where(np.isnan(terms), 0.0, terms).sum(axis=-1)
        return np.where(np.isnan(self.S0), np.nan, total)

    @property
    def kappa(self):
        """Watson concentration (0 outside the mask, as the other maps)."""
        odi = self.odi
        with np.errstate(divide="ignore"):
            kappa = 1.0 / np.tan(math.pi * odi / 2.0)
        return np.where(odi == 0, 0.0, kappa)

    @property
    def fibre_fractions(self):
        """Weight of each fibre population in the tissue part, (..., F)."""
        return super()._per_fibre("w")

    @property
    def direction(self):
        """Mean fibre direction(s): (..., 3) for one fibre, else (..., F, 3)."""
        dirs = self._direction_stack()
        return dirs[..., 0, :] if self._single else dirs


NoddiModel._fit_class = NoddiFit
