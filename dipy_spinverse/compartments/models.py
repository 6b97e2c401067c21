"""NODDI, ActiveAx, ZCD, IVIM and Karger exchange models as DIPY ReconstModels.

Public units follow DIPY: diffusivities in mm^2/s, times in s, b in s/mm^2;
diameters in um. Internally (um, us) diffusivities and b-values have the same
numbers; only times are scaled (x 1e6).

All models are fitted by variable projection (:mod:`.fitting`): volume
fractions by exact non-negative least squares, everything else by a
multi-start, grid-initialised, bounded Levenberg-Marquardt, for all voxels of
a chunk at once.
"""

import functools
import math

import numpy as np
import torch
from dipy.reconst.csdeconv import AxSymShResponse
from dipy.testing.decorators import warning_for_keywords

from ..checks import check_choice, check_diffusivity, check_seconds
from . import blocks
from .base import CompartmentFit, CompartmentModel, canonical_directions
from .fitting import Bound

__all__ = [
    "NoddiModel",
    "NoddiFit",
    "ActiveAxModel",
    "ActiveAxFit",
    "ZcdModel",
    "ZcdFit",
    "IvimModel",
    "IvimFit",
    "ExchangeModel",
    "ExchangeFit",
]

_S_TO_US = 1e6
# Most fibre populations per voxel (fibres="auto").
MAX_FIBRES = 3
# Zhang et al. (2012): in vivo intrinsic and free-water diffusivities (mm^2/s).
D_PAR_INVIVO = 1.7e-3
D_ISO = 3.0e-3
# ODI bounds: 0.01 is kappa = 64, where the Watson quadrature is still exact to
# 2e-9; 0.99 is nearly isotropic.
_ODI_BOUNDS = (0.01, 0.99)
# Cylinder diameters (um) the fits may return. Below ~0.2 um the signal of any
# clinical or preclinical protocol is that of a stick.
_DIAMETER_BOUNDS = (0.2, 20.0)
_COMMON_DOC = """
    n_starts : int, optional
        Levenberg-Marquardt starts per voxel, from the best grid points of the
        ``n_starts`` best combinations of scalar grid values.
    max_iter : int, optional
        Levenberg-Marquardt iterations per voxel.
    chunk_size : int, optional
        Voxels fitted together; memory grows linearly with it. Chunks of at
        least 512 voxels are fitted two at a time, on two threads, when
        torch has more than one (the memory of two chunks).
    fit_method : {"varpro", "learned"}, optional
        "varpro": variable-projection fitting (the default); "learned": a
        small MLP trained on signals simulated from this model for ``gtab``
        with Rician noise at ``snr`` (:mod:`.learned`), cached on disk and
        trained on first use (the training time is printed).
    snr : float, optional
        Signal-to-noise ratio (S0 / sigma) of the learned estimator's
        training signals.
    learned_options : dict, optional
        Training options (:class:`~.learned.LearnedOptions`: n_train,
        epochs, hidden, batch_size, lr, seed, polish, frame, device).
    cache_dir : path-like, optional
        Folder of the trained networks; default ``$DIPY_SPINVERSE_CACHE`` or
        ``~/.cache/dipy_spinverse``."""
_GRID_DIRECTIONS_DOC = """
    n_grid_directions : int, optional
        Directions on a half sphere in the initialisation grid."""


def _with_common_parameters(doc, *, grid_directions=True):
    """``doc`` with the options every compartment model shares added at the
    end of its Parameters section (before Notes, where numpydoc reads them).
    """
    common = (_GRID_DIRECTIONS_DOC if grid_directions else "") + _COMMON_DOC
    parameters, notes, rest = doc.partition("\n\n    Notes\n    -----\n")
    return parameters.rstrip() + common + (notes + rest if notes else "\n    ")


def _check_bounds(bounds, name, *, lower=0.0):
    try:
        lo, hi = (float(v) for v in bounds)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} must be a (lower, upper) pair, got {bounds!r}"
        ) from err
    if not (lower <= lo < hi and math.isfinite(hi)):
        raise ValueError(
            f"{name} must satisfy {lower} <= lower < upper < inf, got {bounds!r}"
        )
    return lo, hi


def _check_diffusivity_bounds(bounds, name, *, lower=0.0):
    """``_check_bounds`` of a diffusivity range in mm^2/s: its upper end is
    checked for the unit too (2 um^2/ms given as 2 would fit every voxel as
    free water without a word)."""
    lo, hi = _check_bounds(bounds, name, lower=lower)
    check_diffusivity(hi, f"the upper end of {name}")
    return lo, hi


# Longest plausible residence time (s): far beyond T1, so nothing of it is
# left to measure; a larger bound is a time in ms given as s.
_MAX_EXCHANGE_TIME = 60.0


def _check_response(response):
    """The CSD response of ``fibres="auto"`` as given (None, DIPY's
    ``AxSymShResponse`` or an ``(evals, S0)`` pair), refused here rather
    than by DIPY in the middle of a fit."""
    if response is None or isinstance(response, AxSymShResponse):
        return response
    message = (
        "response must be (evals, S0): the three eigenvalues (mm^2/s, > 0) "
        "of the single-fibre tensor and its b = 0 signal (> 0), e.g. "
        f"((1.7e-3, 3e-4, 3e-4), 100.0), got {response!r}"
    )
    try:
        evals, s0 = response
        evals, s0 = np.asarray(evals, dtype=np.float64), float(s0)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    good = evals.shape == (3,) and np.all(np.isfinite(evals) & (evals > 0))
    if not (good and math.isfinite(s0) and s0 > 0):
        raise ValueError(message)
    return response


def _fractions(c):
    """Normalise NNLS coefficients (B, K) to fractions and their sum."""
    total = c.sum(-1)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return c / safe[:, None], total


# --------------------------------------------------------------------------
# NODDI
# --------------------------------------------------------------------------
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

    __doc__ = _with_common_parameters(__doc__)
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
        self.n_fibres, self.fibres = _fibre_options(n_fibres, fibres)
        self.response = _check_response(response)
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
        return _built_once(
            self, "_submodels", n_fibres, lambda: self._sibling(n_fibres)
        )

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

        return _built_once(self, "_counting_models", n_fibres, build)

    def _to_params(self, shared, fibre, dirs, c, scale):
        F = self.n_fibres
        fractions, total = _fractions(c)
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


def _fibre_options(n_fibres, fibres, *, default=1):
    """Checked ``(n_fibres, fibres)`` of a multi-fibre model: ``fibres`` None
    or "auto"; ``n_fibres`` 0-3, default ``default`` (``MAX_FIBRES`` with
    ``fibres="auto"``, where it is the largest count and must be >= 1)."""
    if fibres is not None and np.ndim(fibres) > 0:
        raise ValueError(
            "fibres of the model must be None or 'auto'; a per-voxel count map "
            "is given to fit: model.fit(data, fibres=counts)."
        )
    if fibres is not None:
        check_choice(fibres, "fibres", ("auto",))
    if n_fibres is None:
        n_fibres = default if fibres is None else MAX_FIBRES
    if isinstance(n_fibres, bool) or np.ndim(n_fibres) or n_fibres not in (0, 1, 2, 3):
        raise ValueError(f"n_fibres must be 0, 1, 2 or 3, got {n_fibres!r}")
    if fibres is not None and n_fibres < 1:
        raise ValueError("fibres='auto' needs n_fibres (the largest count) >= 1")
    return int(n_fibres), fibres


def _built_once(model, store, key, build):
    """``build()``, made once per ``key`` and kept on ``model`` (in the dict
    ``model.<store>``): the sub-models a fit uses per fibre count."""
    cache = model.__dict__.setdefault(store, {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _submodel(model, n_fibres, build):
    """``model`` with ``n_fibres`` fibres in the per-fibre layout (built
    once by ``build()`` and kept on the model): the fits that
    ``fibres="auto"`` compares."""

    def per_fibre():
        sub = build()
        sub._set_layout(True)
        return sub

    return _built_once(model, "_submodels", n_fibres, per_fibre)


def _fic_plus_fee(model, targets, groups):
    """Each fibre's weight ``fic_k + fee_k`` (V, F) from regression outputs
    (its first two targets): ActiveAx's and ZCD's learned fibre order."""
    return targets[:, groups[:, 0]] + targets[:, groups[:, 1]]


def _sorted_fibres(per, dirs, weight):
    """Per-fibre scalars (B, F, W) and directions (B, F, 3), fibres sorted by
    decreasing ``weight`` (B, F), flattened to (B, F (W + 3))."""
    order = weight.argsort(dim=-1, descending=True)[..., None]
    per = torch.take_along_dim(per, order, 1)
    dirs = torch.take_along_dim(canonical_directions(dirs), order, 1)
    return torch.cat([per, dirs], dim=-1).reshape(per.shape[0], -1)


def _fill_absent(params, model, head, absent_fibre):
    """Parameters (..., P) with the NaN blocks of absent fibres (per-voxel
    counts) replaced by ``absent_fibre``, a fibre of weight 0."""
    if not model._multi:
        return params
    params = params.copy()
    fitted = np.isfinite(params[..., 0])
    W = model._per_fibre_params
    for k in range(model.n_fibres):
        block = params[..., head + W * k : head + W * (k + 1)]
        absent = fitted & np.isnan(block[..., 0])
        block[absent] = absent_fibre
    return params


def _init_kwargs(n_starts, max_iter, n_grid_directions, chunk_size, **learned):
    return {
        "n_starts": n_starts,
        "max_iter": max_iter,
        "n_grid_directions": n_grid_directions,
        "chunk_size": chunk_size,
        **learned,
    }


# --------------------------------------------------------------------------
# ActiveAx
# --------------------------------------------------------------------------
class ActiveAxModel(CompartmentModel):
    """ActiveAx: cylinders + zeppelin + ball (+ dot) (Alexander et al. 2010).

    ``S = S0 [fic E_cyl + fee E_zep + fiso exp(-b d_iso) + fdot]``: impermeable
    cylinders of diameter ``2R`` along ``mu`` (finite-pulse Gaussian phase
    approximation, :func:`~.blocks.cylinder`, intrinsic diffusivity ``d_par``),
    a zeppelin along ``mu`` with ``d_par`` and the tortuosity
    ``d_perp = d_par (1 - fic / (fic + fee))``, free water, and (``dot=True``)
    stationary water. Fractions sum to 1. With several fibre populations
    each has its own direction, diameter and ``fic_k``, ``fee_k`` (fractions
    of the voxel; tortuosity per population).

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable
        With ``big_delta`` and ``small_delta`` (s), scalars or per volume.
    n_fibres : int, optional
        Fibre populations (0 to 3). Default 1; with ``fibres="auto"`` the
        largest count per voxel, default 3.
    fibres : "auto", optional
        A fibre count per voxel (0 to ``n_fibres``), chosen from DIPY's CSD
        peaks and a model-selection test, or given to :meth:`fit` as a map
        (see :class:`NoddiModel`).
    response : tuple, optional
        CSD single-fibre response (``(evals, S0)``, for the highest shell)
        for ``fibres="auto"``; default estimated from the voxels of FA > 0.7
        (a generic fibre's where there is none, with a warning).
    d_par : float, optional
        Intrinsic diffusivity in mm^2/s (1.7e-3 in vivo; ~0.6e-3 fixed tissue).
    d_iso : float, optional
        Free-water diffusivity in mm^2/s.
    dot : bool, optional
        Add a stationary (dot) compartment (ex vivo).
    diameter_bounds : (float, float), optional
        Range of the fitted diameter in um.

    Notes
    -----
    With one fibre (the default) the parameters are ``param_names = (S0, fic,
    fee, fiso, fdot, diameter, x, y, z)``; with ``n_fibres != 1`` or
    ``fibres="auto"`` they are ``(S0, fiso, fdot)`` followed, per fibre
    (sorted by ``fic_k + fee_k``), by ``(fic_k, fee_k, diameter_k, x_k, y_k,
    z_k)``, NaN for the fibres a voxel does not have, and the per-fibre maps
    (``fic``, ``fee``, ``diameter``, ``direction``) get a fibre axis.
    """

    __doc__ = _with_common_parameters(__doc__)
    _per_fibre_params = 6
    _fibre_weights = _fic_plus_fee

    _needs_b0 = True

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
        dot=False,
        diameter_bounds=_DIAMETER_BOUNDS,
        n_starts=3,
        max_iter=100,
        n_grid_directions=100,
        chunk_size=128,
        fit_method="varpro",
        snr=50.0,
        learned_options=None,
        cache_dir=None,
    ):
        self.n_fibres, self.fibres = _fibre_options(n_fibres, fibres)
        self.response = _check_response(response)
        self.d_par = check_diffusivity(d_par, "d_par")
        self.d_iso = check_diffusivity(d_iso, "d_iso")
        if not isinstance(dot, (bool, np.bool_)):
            raise ValueError(f"dot must be True or False, got {dot!r}")
        self.dot = bool(dot)
        self.diameter_bounds = _check_bounds(
            diameter_bounds, "diameter_bounds", lower=1e-3
        )
        lo, hi = self.diameter_bounds
        self._shared = ()
        self._fibre = (Bound("diameter", lo, hi, log=True), Bound("icvf", 0.0, 1.0))
        self._grid = {
            "diameter": tuple(_log_grid(lo, hi, 5)),
            "icvf": (0.3, 0.5, 0.7, 0.85),
        }
        self._set_layout(self.fibres is not None or self.n_fibres != 1)
        self._setup(
            gtab,
            **_init_kwargs(
                n_starts,
                max_iter,
                n_grid_directions,
                chunk_size,
                fit_method=fit_method,
                snr=snr,
                learned_options=learned_options,
                cache_dir=cache_dir,
            ),
        )

    def _set_layout(self, per_fibre):
        """One parameter per voxel (the single-fibre layout) or per fibre."""
        self._multi = per_fibre
        if not per_fibre:
            self.param_names = _ACTIVEAX_SINGLE
            return
        names = ["S0", "fiso", "fdot"]
        for k in range(self.n_fibres):
            names += [f"{p}_{k}" for p in ("fic", "fee", "diameter", "x", "y", "z")]
        self.param_names = tuple(names)

    def _with_fibres(self, n_fibres, *, dot=None):
        dot = self.dot if dot is None else dot

        def build():
            return ActiveAxModel(
                self.gtab,
                n_fibres=n_fibres,
                d_par=self.d_par,
                d_iso=self.d_iso,
                dot=dot,
                diameter_bounds=self.diameter_bounds,
                n_starts=self.n_starts,
                max_iter=self.max_iter,
                n_grid_directions=self.n_grid_directions,
                chunk_size=self.chunk_size,
            )

        return _submodel(self, (n_fibres, dot), build)

    def _counting_model(self, n_fibres):
        # At high b the signal along the fibres is below the Rician noise
        # floor (sigma sqrt(pi / 2) at 0 signal), which the Gaussian least
        # squares cannot fit without a constant column: extra fibres
        # perpendicular to the true ones then fit it. On the benchmark's
        # axon protocol at SNR 30 every one-fibre voxel got 2 or 3 fibres;
        # with a dot compartment in the counting fits, or Gaussian noise,
        # the counts were right (measured, doc/compartments.md). The dot
        # absorbs the floor during counting only; the fit is then redone
        # with the counts found and the model's own compartments.
        return self._with_fibres(n_fibres, dot=True)

    def _n_free(self, n_fibres):
        # fiso (and fdot), then per fibre: weight, icvf, diameter and two
        # direction angles.
        return 1 + self.dot + 5 * n_fibres

    def _fill_padding(self, params):
        return _fill_absent(params, self, 3, (0.0, 0.0, 1.0, 0.0, 0.0, 1.0))

    def _fibre_columns(self, acq, shared, fibre, dirs):
        icvf = fibre["icvf"]
        cyl = blocks.cylinder(
            acq,
            direction=dirs,
            radius=fibre["diameter"] / 2.0,
            diffusivity=self.d_par,
            table=self._gpa_table if acq is self._acq else None,
        )
        zep = blocks.zeppelin(
            acq, direction=dirs, d_par=self.d_par, d_perp=self.d_par * (1.0 - icvf)
        )
        icvf = icvf[..., None]
        return (icvf * cyl + (1.0 - icvf) * zep)[..., None]

    # In closed form (blocks.cylinder_derivatives and the zeppelin's): one
    # evaluation of the GPA series per Jacobian instead of one per fibre
    # parameter for forward differences.
    _closed_form_jacobian = True

    def _fibre_columns_and_jacobian(self, x):
        F = x.shape[1] // 5
        _, fibre, dirs = self._unpack(x)
        icvf, radius = fibre["icvf"], fibre["diameter"] / 2.0
        cyl, cyl_r, _, cyl_cos = blocks.cylinder_derivatives(
            self._acq,
            direction=dirs,
            radius=radius,
            diffusivity=self.d_par,
            table=self._gpa_table,
        )
        d_perp = self.d_par * (1.0 - icvf)
        zep, _, zep_perp, zep_cos = blocks.zeppelin_derivatives(
            self._acq, direction=dirs, d_par=self.d_par, d_perp=d_perp
        )
        icvf = icvf[..., None]
        d_diameter = icvf * cyl_r / 2.0
        d_icvf = cyl - zep - (1.0 - icvf) * self.d_par * zep_perp
        d_cos = icvf * cyl_cos + (1.0 - icvf) * zep_cos

        def jacobian(c):
            weight = c[:, :F, None]  # (B, F, 1): the fibre column's coefficient
            return self._fibre_jacobian(
                x, (d_diameter * weight, d_icvf * weight), d_cos * weight
            )

        return (icvf * cyl + (1.0 - icvf) * zep)[..., None], jacobian

    @functools.cached_property
    def _gpa_table(self):
        # The cylinders' GPA sum on the model's own acquisitions, tabulated
        # (blocks.GpaTable, within 1e-10 relative of the exact sum): the
        # mode sum over the waveform pieces is most of a cylinder's cost.
        return blocks.GpaTable(self._acq)

    def _shared_columns(self, acq, shared, B):
        cols = [blocks.ball(acq, diffusivity=self.d_iso).expand(B, -1)]
        if self.dot:
            cols.append(blocks.dot(acq, shape=(B,)))
        return torch.stack(cols, dim=-1)

    def _to_params(self, shared, fibre, dirs, c, scale):
        if self._multi:
            return self._to_params_per_fibre(fibre, dirs, c, scale)
        fractions, total = _fractions(c)
        tissue, icvf = fractions[:, 0], fibre["icvf"][:, 0]
        fdot = fractions[:, 2] if self.dot else torch.zeros_like(tissue)
        return torch.cat(
            [
                torch.stack(
                    [
                        scale * total,
                        tissue * icvf,
                        tissue * (1.0 - icvf),
                        fractions[:, 1],
                        fdot,
                        fibre["diameter"][:, 0],
                    ],
                    dim=-1,
                ),
                canonical_directions(dirs[:, 0]),
            ],
            dim=-1,
        )

    def _to_params_per_fibre(self, fibre, dirs, c, scale):
        F = self.n_fibres
        fractions, total = _fractions(c)
        tissue, icvf = fractions[:, :F], fibre["icvf"]
        per = torch.stack([tissue * icvf, tissue * (1.0 - icvf), fibre["diameter"]], -1)
        fdot = fractions[:, F + 1] if self.dot else torch.zeros_like(total)
        head = torch.stack([scale * total, fractions[:, F], fdot], dim=-1)
        return torch.cat([head, _sorted_fibres(per, dirs, tissue)], dim=-1)

    def _from_params(self, params):
        if self._multi:
            per = params[:, 3:].reshape(len(params), self.n_fibres, 6)
            fic, fee = per[..., 0], per[..., 1]
            fiso, fdot = params[:, 1:2], params[:, 2:3]
            diameter, dirs = per[..., 2], per[..., 3:]
        else:
            fic, fee = params[:, 1:2], params[:, 2:3]
            fiso, fdot = params[:, 3:4], params[:, 4:5]
            diameter, dirs = params[:, 5:6], params[:, None, 6:9]
        tissue = fic + fee
        safe = torch.where(tissue > 0, tissue, torch.ones_like(tissue))
        fibre = {"diameter": diameter, "icvf": fic / safe}
        cols = [tissue, fiso] + ([fdot] if self.dot else [])
        return {}, fibre, dirs, torch.cat(cols, -1), params[:, 0]


_ACTIVEAX_SINGLE = ("S0", "fic", "fee", "fiso", "fdot", "diameter", "x", "y", "z")


class ActiveAxFit(CompartmentFit):
    """ActiveAx parameter maps; per-fibre maps have a trailing fibre axis when
    the model has several fibres or ``fibres="auto"`` (fibres sorted by
    ``fic + fee``, NaN beyond each voxel's count)."""

    @property
    def fic(self):
        """Intra-axonal (cylinder) signal fraction of the whole voxel (per
        fibre)."""
        return self._per_fibre("fic")

    @property
    def fee(self):
        """Extra-axonal (zeppelin) signal fraction (per fibre)."""
        return self._per_fibre("fee")

    @property
    def fiso(self):
        """Free-water (ball) signal fraction."""
        return self._param("fiso")

    @property
    def fdot(self):
        """Stationary-water (dot) fraction; 0 unless the model has ``dot=True``."""
        return self._param("fdot")

    @property
    def diameter(self):
        """Axon diameter in um (2 R of the cylinders; per fibre)."""
        return self._per_fibre("diameter")

    @property
    def direction(self):
        """Fibre direction, (..., 3), z >= 0; (..., F, 3) per fibre."""
        if self.model._multi:
            return self._direction_stack()
        return self.model_params[..., 6:9]


ActiveAxModel._fit_class = ActiveAxFit


def _log_grid(lo, hi, n):
    """n values log-spaced strictly inside (lo, hi)."""
    return torch.logspace(math.log10(lo), math.log10(hi), n + 2)[1:-1].tolist()


# --------------------------------------------------------------------------
# ZCD
# --------------------------------------------------------------------------
class ZcdModel(CompartmentModel):
    """Zeppelin-Cylinder-Dot (Panagiotaki et al. 2012).

    ``S = S0 [fic E_cyl + fee E_zep + fdot]``: impermeable cylinders (GPA,
    finite pulses) along ``mu`` with intrinsic diffusivity ``d_par``, a
    zeppelin along ``mu`` with ``d_par`` and a free ``d_perp <= d_par``, and
    stationary water. No tortuosity constraint: the three fractions are linear.
    With several fibre populations each has its own direction, diameter,
    ``d_par``, ``d_perp``, ``fic_k`` and ``fee_k``.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable
        With ``big_delta`` and ``small_delta`` (s), scalars or per volume.
    n_fibres : int, optional
        Fibre populations (0 to 3; 0 is the dot alone). Default 1; with
        ``fibres="auto"`` the largest count per voxel, default 3.
    fibres : "auto", optional
        A fibre count per voxel (1 to ``n_fibres`` when chosen: ZCD has no
        free-water compartment, so a voxel without fibres cannot be told
        from an isotropic zeppelin; 0 to ``n_fibres`` in a count map given
        to :meth:`fit`). See :class:`NoddiModel`.
    response : tuple, optional
        CSD single-fibre response (``(evals, S0)``, for the highest shell)
        for ``fibres="auto"``; default estimated from the voxels of FA > 0.7
        (a generic fibre's where there is none, with a warning).
    d_par_bounds : (float, float), optional
        Range of d_par in mm^2/s.
    diameter_bounds : (float, float), optional
        Range of the fitted diameter in um.

    Notes
    -----
    With one fibre (the default) the parameters are ``param_names = (S0, fic,
    fee, fdot, diameter, d_par, d_perp, x, y, z)``; with ``n_fibres != 1`` or
    ``fibres="auto"`` they are ``(S0, fdot)`` followed, per fibre (sorted by
    ``fic_k + fee_k``), by ``(fic_k, fee_k, diameter_k, d_par_k, d_perp_k,
    x_k, y_k, z_k)``, NaN for the fibres a voxel does not have, and the
    per-fibre maps get a fibre axis.
    """

    __doc__ = _with_common_parameters(__doc__)
    _per_fibre_params = 8
    _fibre_weights = _fic_plus_fee
    # Two polish iterations: with one, the network's diameter stayed 1.85x
    # the fitted error (fic 1.42x); with two 1.43x (fic 1.33x, every other
    # parameter within 1.25x) at 12,200 voxels/s on 2 cores
    # (benchmarks/compartments.py --learned, doc/compartments.md).
    default_polish = 2

    _needs_b0 = True

    @warning_for_keywords()
    def __init__(
        self,
        gtab,
        *,
        n_fibres=None,
        fibres=None,
        response=None,
        d_par_bounds=(0.1e-3, 3.0e-3),
        diameter_bounds=_DIAMETER_BOUNDS,
        n_starts=3,
        max_iter=100,
        n_grid_directions=100,
        chunk_size=128,
        fit_method="varpro",
        snr=50.0,
        learned_options=None,
        cache_dir=None,
    ):
        self.n_fibres, self.fibres = _fibre_options(n_fibres, fibres)
        self.response = _check_response(response)
        self.diameter_bounds = _check_bounds(
            diameter_bounds, "diameter_bounds", lower=1e-3
        )
        self.d_par_bounds = _check_diffusivity_bounds(
            d_par_bounds, "d_par_bounds", lower=1e-9
        )
        lo, hi = self.diameter_bounds
        dlo, dhi = self.d_par_bounds
        self._shared = ()
        self._fibre = (
            Bound("diameter", lo, hi, log=True),
            Bound("d_par", dlo, dhi),
            Bound("perp_ratio", 0.0, 1.0),
        )
        self._grid = {
            "diameter": tuple(_log_grid(lo, hi, 5)),
            "d_par": tuple(torch.linspace(dlo, dhi, 5)[1:-1].tolist()),
            "perp_ratio": (0.2, 0.45, 0.7),
        }
        self._set_layout(self.fibres is not None or self.n_fibres != 1)
        self._setup(
            gtab,
            **_init_kwargs(
                n_starts,
                max_iter,
                n_grid_directions,
                chunk_size,
                fit_method=fit_method,
                snr=snr,
                learned_options=learned_options,
                cache_dir=cache_dir,
            ),
        )

    _fibre_width = 2

    def _set_layout(self, per_fibre):
        """One parameter per voxel (the single-fibre layout) or per fibre."""
        self._multi = per_fibre
        if not per_fibre:
            self.param_names = _ZCD_SINGLE
            return
        names = ["S0", "fdot"]
        for k in range(self.n_fibres):
            names += [
                f"{p}_{k}"
                for p in ("fic", "fee", "diameter", "d_par", "d_perp", "x", "y", "z")
            ]
        self.param_names = tuple(names)

    def _with_fibres(self, n_fibres):
        def build():
            return ZcdModel(
                self.gtab,
                n_fibres=n_fibres,
                d_par_bounds=self.d_par_bounds,
                diameter_bounds=self.diameter_bounds,
                n_starts=self.n_starts,
                max_iter=self.max_iter,
                n_grid_directions=self.n_grid_directions,
                chunk_size=self.chunk_size,
            )

        return _submodel(self, n_fibres, build)

    def _n_free(self, n_fibres):
        # fdot, then per fibre: two fractions, diameter, d_par, d_perp and
        # two direction angles.
        return 1 + 7 * n_fibres

    # No free-water compartment: "no fibre" is never chosen (an isotropic
    # zeppelin is a fibre of this model).
    _may_be_empty = False

    def _fill_padding(self, params):
        absent = (0.0, 0.0, 1.0, 1.0e-3, 0.5e-3, 0.0, 0.0, 1.0)
        return _fill_absent(params, self, 2, absent)

    def _fibre_columns(self, acq, shared, fibre, dirs):
        d_par = fibre["d_par"]
        cyl = blocks.cylinder(
            acq,
            direction=dirs,
            radius=fibre["diameter"] / 2.0,
            diffusivity=d_par,
            table=self._gpa_table if acq is self._acq else None,
        )
        zep = blocks.zeppelin(
            acq, direction=dirs, d_par=d_par, d_perp=d_par * fibre["perp_ratio"]
        )
        return torch.stack([cyl, zep], dim=-1)

    # In closed form, as ActiveAx's (blocks.cylinder_derivatives).
    _closed_form_jacobian = True

    def _fibre_columns_and_jacobian(self, x):
        F = x.shape[1] // 6
        _, fibre, dirs = self._unpack(x)
        d_par, ratio = fibre["d_par"], fibre["perp_ratio"]
        cyl, cyl_r, cyl_d, cyl_cos = blocks.cylinder_derivatives(
            self._acq,
            direction=dirs,
            radius=fibre["diameter"] / 2.0,
            diffusivity=d_par,
            table=self._gpa_table,
        )
        zep, zep_par, zep_perp, zep_cos = blocks.zeppelin_derivatives(
            self._acq, direction=dirs, d_par=d_par, d_perp=d_par * ratio
        )
        ratio, d_par = ratio[..., None], d_par[..., None]

        def jacobian(c):
            fic = c[:, 0 : 2 * F : 2, None]  # (B, F, 1)
            fee = c[:, 1 : 2 * F : 2, None]
            d_scalars = (
                fic * cyl_r / 2.0,
                fic * cyl_d + fee * (zep_par + ratio * zep_perp),
                fee * d_par * zep_perp,
            )
            return self._fibre_jacobian(x, d_scalars, fic * cyl_cos + fee * zep_cos)

        return torch.stack([cyl, zep], dim=-1), jacobian

    _gpa_table = ActiveAxModel._gpa_table

    def _shared_columns(self, acq, shared, B):
        return blocks.dot(acq, shape=(B,))[..., None]

    def _to_params(self, shared, fibre, dirs, c, scale):
        if self._multi:
            return self._to_params_per_fibre(fibre, dirs, c, scale)
        fractions, total = _fractions(c)
        d_par = fibre["d_par"][:, 0]
        scalars = [
            scale * total,
            fractions[:, 0],
            fractions[:, 1],
            fractions[:, 2],
            fibre["diameter"][:, 0],
            d_par,
            d_par * fibre["perp_ratio"][:, 0],
        ]
        return torch.cat(
            [torch.stack(scalars, -1), canonical_directions(dirs[:, 0])], dim=-1
        )

    def _to_params_per_fibre(self, fibre, dirs, c, scale):
        F = self.n_fibres
        fractions, total = _fractions(c)
        # Columns are fibre-major: (cylinder, zeppelin) per fibre, then dot.
        fic, fee = fractions[:, 0 : 2 * F : 2], fractions[:, 1 : 2 * F : 2]
        d_par = fibre["d_par"]
        per = torch.stack(
            [fic, fee, fibre["diameter"], d_par, d_par * fibre["perp_ratio"]], -1
        )
        head = torch.stack([scale * total, fractions[:, 2 * F]], dim=-1)
        return torch.cat([head, _sorted_fibres(per, dirs, fic + fee)], dim=-1)

    def _from_params(self, params):
        B = len(params)
        if self._multi:
            per = params[:, 2:].reshape(B, self.n_fibres, 8)
            fractions = torch.cat([per[..., :2].reshape(B, -1), params[:, 1:2]], -1)
            diameter, d_par, d_perp = per[..., 2], per[..., 3], per[..., 4]
            dirs = per[..., 5:]
        else:
            fractions = params[:, 1:4]
            diameter, d_par, d_perp = params[:, 4:5], params[:, 5:6], params[:, 6:7]
            dirs = params[:, None, 7:10]
        safe = torch.where(d_par > 0, d_par, torch.ones_like(d_par))
        fibre = {"diameter": diameter, "d_par": d_par, "perp_ratio": d_perp / safe}
        return {}, fibre, dirs, fractions, params[:, 0]


_ZCD_SINGLE = (
    "S0",
    "fic",
    "fee",
    "fdot",
    "diameter",
    "d_par",
    "d_perp",
    "x",
    "y",
    "z",
)


class ZcdFit(CompartmentFit):
    """ZCD parameter maps; per-fibre maps have a trailing fibre axis when the
    model has several fibres or ``fibres="auto"``."""

    @property
    def fic(self):
        """Intra-axonal (cylinder) signal fraction (per fibre)."""
        return self._per_fibre("fic")

    @property
    def fee(self):
        """Extra-axonal (zeppelin) signal fraction (per fibre)."""
        return self._per_fibre("fee")

    @property
    def fdot(self):
        """Stationary-water (dot) signal fraction."""
        return self._param("fdot")

    @property
    def diameter(self):
        """Axon diameter in um (per fibre)."""
        return self._per_fibre("diameter")

    @property
    def d_par(self):
        """Intrinsic (and parallel) diffusivity in mm^2/s (per fibre)."""
        return self._per_fibre("d_par")

    @property
    def d_perp(self):
        """Perpendicular diffusivity of the zeppelin in mm^2/s (per fibre)."""
        return self._per_fibre("d_perp")

    @property
    def direction(self):
        """Fibre direction, (..., 3), z >= 0; (..., F, 3) per fibre."""
        if self.model._multi:
            return self._direction_stack()
        return self.model_params[..., 7:10]


ZcdModel._fit_class = ZcdFit


# --------------------------------------------------------------------------
# IVIM
# --------------------------------------------------------------------------
class IvimModel(CompartmentModel):
    """Intravoxel incoherent motion, bi-exponential (Le Bihan et al. 1988).

    ``S = S0 [f exp(-b D*) + (1 - f) exp(-b D)]``: the model, parameter layout
    ``[S0, f, D*, D]`` and attribute names of DIPY's
    :class:`dipy.reconst.ivim.IvimModelTRR` / ``IvimFit``, so the maps are
    interchangeable; the fit is this package's own (variable projection on
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

    __doc__ = _with_common_parameters(__doc__, grid_directions=False)
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
        lo, hi = _check_diffusivity_bounds(d_bounds, "d_bounds")
        slo, shi = _check_bounds(d_star_bounds, "d_star_bounds", lower=1e-9)
        if slo < hi:
            raise ValueError(
                f"d_star_bounds starts at {slo}, below the top of d_bounds ({hi}): "
                "D* and D could swap; make d_star_bounds[0] >= d_bounds[1]"
            )
        self._shared = (Bound("D_star", slo, shi, log=True), Bound("D", lo, hi))
        self._fibre = ()
        self._grid = {
            "D_star": tuple(_log_grid(slo, shi, 6)),
            "D": tuple(torch.linspace(lo, hi, 7)[1:-1].tolist()),
        }
        self._setup(
            gtab,
            **_init_kwargs(
                n_starts,
                max_iter,
                1,
                chunk_size,
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
        fractions, total = _fractions(c)
        return torch.stack(
            [scale * total, fractions[:, 0], shared["D_star"], shared["D"]], -1
        )

    def _from_params(self, params):
        shared = {"D_star": params[:, 2], "D": params[:, 3]}
        f = params[:, 1]
        fractions = torch.stack([f, 1.0 - f], -1)
        return shared, {}, params.new_zeros(len(params), 0, 3), fractions, params[:, 0]


class IvimFit(CompartmentFit):
    """IVIM maps, named as in :class:`dipy.reconst.ivim.IvimFit`."""

    @property
    def S0_predicted(self):
        """Fitted S0 (DIPY's name)."""
        return self.model_params[..., 0]

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


IvimModel._fit_class = IvimFit


# --------------------------------------------------------------------------
# Karger exchange
# --------------------------------------------------------------------------
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

    __doc__ = _with_common_parameters(__doc__, grid_directions=False)
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
        tlo, thi = _check_bounds(
            exchange_time_bounds, "exchange_time_bounds", lower=1e-9
        )
        check_seconds(
            thi, "the upper end of exchange_time_bounds", 2.0, _MAX_EXCHANGE_TIME
        )
        dlo, dhi = _check_diffusivity_bounds(d_bounds, "d_bounds", lower=1e-9)
        flo, fhi = _check_bounds(f_bounds, "f_bounds")
        if fhi >= 1.0:
            raise ValueError(f"f_bounds must end below 1, got {f_bounds!r}")
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
            "exchange_time": tuple(_log_grid(tlo * _S_TO_US, thi * _S_TO_US, 5)),
        }
        self._setup(
            gtab,
            **_init_kwargs(
                n_starts,
                max_iter,
                1,
                chunk_size,
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
