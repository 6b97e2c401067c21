"""ZCD: zeppelin, cylinder and dot as a DIPY ReconstModel."""

import functools

import torch
from dipy.testing.decorators import warning_for_keywords

from . import blocks
from .base import CompartmentFit, CompartmentModel, canonical_directions, nnls_fractions
from .fibres import fic_plus_fee, fill_absent, per_fibre_submodel, sorted_fibres
from .fitting import Bound
from .options import (
    DIAMETER_BOUNDS,
    check_bounds,
    check_diffusivity_bounds,
    check_response,
    fibre_options,
    init_kwargs,
    log_grid,
    with_common_parameters,
)

__all__ = ["ZcdModel", "ZcdFit"]


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

    __doc__ = with_common_parameters(__doc__)
    _per_fibre_params = 8
    _fibre_weights = fic_plus_fee
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
        self.diameter_bounds = check_bounds(
            diameter_bounds, "diameter_bounds", lower=1e-3
        )
        self.d_par_bounds = check_diffusivity_bounds(
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
            "diameter": tuple(log_grid(lo, hi, n=5)),
            "d_par": tuple(torch.linspace(dlo, dhi, 5)[1:-1].tolist()),
            "perp_ratio": (0.2, 0.45, 0.7),
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

        return per_fibre_submodel(self, n_fibres, build)

    def _n_free(self, n_fibres):
        # fdot, then per fibre: two fractions, diameter, d_par, d_perp and
        # two direction angles.
        return 1 + 7 * n_fibres

    # No free-water compartment: "no fibre" is never chosen (an isotropic
    # zeppelin is a fibre of this model).
    _may_be_empty = False

    def _fill_padding(self, params):
        absent = (0.0, 0.0, 1.0, 1.0e-3, 0.5e-3, 0.0, 0.0, 1.0)
        return fill_absent(params, self, head=2, absent_fibre=absent)

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

    @functools.cached_property
    def _gpa_table(self):
        # The cylinders' GPA sum tabulated on the model's own acquisitions,
        # as ActiveAx's (blocks.GpaTable): most of a cylinder's cost.
        return blocks.GpaTable(self._acq)

    def _shared_columns(self, acq, shared, B):
        return blocks.dot(acq, shape=(B,))[..., None]

    def _to_params(self, shared, fibre, dirs, c, scale):
        if self._multi:
            return self._to_params_per_fibre(fibre, dirs, c, scale)
        fractions, total = nnls_fractions(c)
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
        fractions, total = nnls_fractions(c)
        # Columns are fibre-major: (cylinder, zeppelin) per fibre, then dot.
        fic, fee = fractions[:, 0 : 2 * F : 2], fractions[:, 1 : 2 * F : 2]
        d_par = fibre["d_par"]
        per = torch.stack(
            [fic, fee, fibre["diameter"], d_par, d_par * fibre["perp_ratio"]], -1
        )
        head = torch.stack([scale * total, fractions[:, 2 * F]], dim=-1)
        return torch.cat([head, sorted_fibres(per, dirs, fic + fee)], dim=-1)

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
