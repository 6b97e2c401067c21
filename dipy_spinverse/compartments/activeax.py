"""ActiveAx: cylinders, zeppelin, ball and dot as a DIPY ReconstModel."""

import functools

import numpy as np
import torch
from dipy.testing.decorators import warning_for_keywords

from ..checks import check_diffusivity
from . import blocks
from .base import CompartmentFit, CompartmentModel, canonical_directions, nnls_fractions
from .fibres import fic_plus_fee, fill_absent, per_fibre_submodel, sorted_fibres
from .fitting import Bound
from .options import (
    D_ISO,
    D_PAR_INVIVO,
    DIAMETER_BOUNDS,
    check_bounds,
    check_response,
    fibre_options,
    init_kwargs,
    log_grid,
    with_common_parameters,
)

__all__ = ["ActiveAxModel", "ActiveAxFit"]


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

    __doc__ = with_common_parameters(__doc__)
    _per_fibre_params = 6
    _fibre_weights = fic_plus_fee

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
        diameter_bounds=DIAMETER_BOUNDS,
        n_starts=3,
        max_iter=100,
        n_grid_directions=100,
        chunk_size=128,
        fit_method="varpro",
        snr=50.0,
        learned_options=None,
        cache_dir=None,
    ):
        self.n_fibres, self.fibres = fibre_options(n_fibres, fibres)
        self.response = check_response(response)
        self.d_par = check_diffusivity(d_par, "d_par")
        self.d_iso = check_diffusivity(d_iso, "d_iso")
        if not isinstance(dot, (bool, np.bool_)):
            raise ValueError(f"dot must be True or False, got {dot!r}")
        self.dot = bool(dot)
        self.diameter_bounds = check_bounds(
            diameter_bounds, "diameter_bounds", lower=1e-3
        )
        lo, hi = self.diameter_bounds
        self._shared = ()
        self._fibre = (Bound("diameter", lo, hi, log=True), Bound("icvf", 0.0, 1.0))
        self._grid = {
            "diameter": tuple(log_grid(lo, hi, n=5)),
            "icvf": (0.3, 0.5, 0.7, 0.85),
        }
        self._set_layout(self.fibres is not None or self.n_fibres != 1)
        self._setup(
            gtab,
            **init_kwargs(
                n_starts=n_starts,
                max_iter=max_iter,
                n_grid_directions=n_grid_directions,
                chunk_size=chunk_size,
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

        return per_fibre_submodel(self, (n_fibres, dot), build)

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
        return fill_absent(
            params, self, head=3, absent_fibre=(0.0, 0.0, 1.0, 0.0, 0.0, 1.0)
        )

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
        fractions, total = nnls_fractions(c)
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
        fractions, total = nnls_fractions(c)
        tissue, icvf = fractions[:, :F], fibre["icvf"]
        per = torch.stack([tissue * icvf, tissue * (1.0 - icvf), fibre["diameter"]], -1)
        fdot = fractions[:, F + 1] if self.dot else torch.zeros_like(total)
        head = torch.stack([scale * total, fractions[:, F], fdot], dim=-1)
        return torch.cat([head, sorted_fibres(per, dirs, tissue)], dim=-1)

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
