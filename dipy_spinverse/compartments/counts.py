"""Fibre counts per voxel: forward selection by an information criterion,
CSD peaks as starts, and fits with a given count map (:class:`CountsMixin`,
a part of :class:`~dipy_spinverse.compartments.base.CompartmentModel`)."""

import itertools
import math
import warnings

import numpy as np

from .peaks import CSDUnavailableError, csd_peaks

__all__ = ["CountsMixin", "MIN_CROSSING_DEG"]

# Fibre-count selection (fibres="auto"): weights of the parameter penalty of
# the Bayesian information criterion (1 is BIC) for the second fibre and for
# each further one. Tuned on seed 0 of the benchmark's simulated NODDI voxels
# (0-3 fibres, SNR 30, crossings >= 45 degrees) on two protocols (30 and 90
# directions per shell) jointly; reported on seed 1 (doc/compartments.md).
# A third fibre lowers the residual less than a second one, and its null
# distribution (the drop an extra fibre buys from noise alone) is narrower,
# so it is penalised less.
_COUNT_PENALTY = 0.5
_EXTRA_FIBRE_PENALTY = 0.275
# A fit with one more fibre is kept only if all its populations are at
# least this far apart (degrees): closer ones are one dispersed population
# split in two, not a crossing (tuned with the penalties: 20-40 degrees were
# within a voxel of each other, 0 worse).
MIN_CROSSING_DEG = 30.0


def _min_separation_deg(params, model):
    """Smallest angle (degrees) between the fibre directions of each voxel
    (V,), from parameters (V, n_params) of ``model``; 180 with one fibre."""
    slots = model._direction_slots()
    dirs = np.stack([params[:, s : s + 3] for s in slots], axis=1)
    smallest = np.full(len(params), 180.0)
    for i, j in itertools.combinations(range(len(slots)), 2):
        cos = np.abs(np.sum(dirs[:, i] * dirs[:, j], axis=-1))
        smallest = np.minimum(smallest, np.degrees(np.arccos(np.clip(cos, 0, 1))))
    return smallest


class CountsMixin:
    """The fibre count of each voxel (``fibres="auto"``) or a given count map."""

    def _with_fibres(self, n_fibres):
        """The same model with a fixed number of fibres (0 included)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-voxel fibre count")

    def _padded(self, params, n_fibres):
        """Parameters of the ``n_fibres`` model in this model's layout, NaN
        for the fibres it does not have."""
        head = len(self.param_names) - self.n_fibres * self._per_fibre_params
        out = np.full((params.shape[0], len(self.param_names)), np.nan)
        out[:, : head + n_fibres * self._per_fibre_params] = params
        return out

    def _fit_variable(self, signals, y, s0, counts):
        """Parameters (V, n_params) with a fibre count per voxel.

        Every fit with k >= 1 fibres gets one extra start: the voxel's CSD
        peaks. Given counts, each voxel is fitted with its own. Otherwise
        (``counts`` None) the count is chosen by forward selection: one
        fibre first (none where the fit without fibres has the lower
        information criterion, :meth:`_criterion`), then k + 1 fibres
        replace k while the criterion decreases and the k + 1 populations are
        at least ``MIN_CROSSING_DEG`` apart.
        """
        directions = self._csd_directions(signals, counts)
        if counts is not None:
            return self._fit_counts(y, s0, directions, counts)
        V, M = y.shape
        out = np.full((V, len(self.param_names)), np.nan)
        one = self._counting_model(1)
        params, cost = one._fit_fixed(y, s0, directions=directions, with_cost=True)
        chosen = np.ones(V, dtype=np.int64)
        best = self._criterion(cost, 1, M)
        out[:] = self._padded(params, 1)
        if self._may_be_empty:
            # The same test as for every further fibre. It replaced a test
            # of the one-fibre fit's tissue fraction (>= 0.2), which took
            # pure noise for a fibre (20 of 20 background voxels) and could
            # take a crossing whose one-fibre fit failed for none; the count
            # tables were the same voxel for voxel (doc/compartments.md).
            zero, cost0 = self._counting_model(0)._fit_fixed(y, s0, with_cost=True)
            empty = self._criterion(cost0, 0, M) <= best
            out[empty] = self._padded(zero[empty], 0)
            chosen[empty] = 0
        for k in range(2, self.n_fibres + 1):
            # Forward selection: only voxels whose count rose to k - 1 try k.
            # Trying every count for every voxel (best subset) found the same
            # counts but one of 200 (measured, doc/compartments.md) at twice
            # the cost.
            idx = np.flatnonzero(chosen == k - 1)
            if not idx.size:
                break
            sub = self._counting_model(k)
            p, c = sub._fit_fixed(
                y[idx], s0[idx], directions=directions[idx], with_cost=True
            )
            crit = self._criterion(c, k, M)
            separated = _min_separation_deg(p, sub) >= MIN_CROSSING_DEG
            better = (crit < best[idx]) & separated
            win = idx[better]
            out[win] = self._padded(p[better], k)
            best[win] = crit[better]
            chosen[win] = k
        if self._counting_model(1) is not self._with_fibres(1):
            return self._fit_counts(y, s0, directions, chosen)
        return out

    def _csd_directions(self, signals, counts):
        """CSD peaks (V, n_fibres, 3) of the voxels' signals (V, N).

        The count selection needs them; with a count map they are only one
        extra start per fit, so a table or data CSD cannot use (no b = 0
        volume or shell of 15 directions, no voxel to estimate the response
        from) leaves zero rows (the fits' own starts) with a warning instead
        of stopping the fit, and a map without fibres does not run CSD."""
        no_peaks = np.zeros((len(signals), self.n_fibres, 3))
        if counts is not None and not counts.any():
            return no_peaks
        try:
            directions, _ = csd_peaks(
                self.gtab, signals, response=self.response, max_peaks=self.n_fibres
            )
        except CSDUnavailableError as err:
            if counts is None:
                raise
            warnings.warn(
                f"{err}. The fibre count map is fitted without CSD starts.",
                stacklevel=6,
            )
            return no_peaks
        return directions

    def _fit_counts(self, y, s0, directions, counts):
        """Parameters (V, n_params) of every voxel fitted with its own fibre
        count (V,), CSD directions (V, D, 3) as an extra start."""
        out = np.full((y.shape[0], len(self.param_names)), np.nan)
        for k in np.unique(counts):
            idx = np.flatnonzero(counts == k)
            sub = self._with_fibres(int(k))
            p = sub._fit_fixed(y[idx], s0[idx], directions=directions[idx])
            out[idx] = self._padded(p, int(k))
        return out

    #: Whether the count selection may find no fibre (a model without a
    #: free-water compartment fits an isotropic voxel with a fibre).
    _may_be_empty = True

    def _counting_model(self, n_fibres):
        """The model with ``n_fibres`` fibres whose fits choose the count
        (default: the fitted one; a model may add a compartment there, e.g.
        one that absorbs the Rician noise floor, and is then refitted with
        the counts found)."""
        return self._with_fibres(n_fibres)

    def _criterion(self, cost, n_fibres, n_meas):
        """``M log(RSS / M) + log(M) sum_j w_j dP_j``: -2 times the Gaussian
        log-likelihood profiled over the noise variance, plus BIC's penalty
        on the free parameters dP_j each fibre adds, weighted by
        ``_COUNT_PENALTY`` up to the second fibre and by
        ``_EXTRA_FIBRE_PENALTY`` beyond."""
        base = self._n_free(min(n_fibres, 2))
        penalty = _COUNT_PENALTY * base + _EXTRA_FIBRE_PENALTY * (
            self._n_free(n_fibres) - base
        )
        cost = np.maximum(cost, 1e-300)
        return n_meas * np.log(cost / n_meas) + penalty * math.log(n_meas)
