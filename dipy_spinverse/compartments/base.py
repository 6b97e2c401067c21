"""Shared machinery of the compartment models: DIPY contract and batched fitting.

A model describes its signal as columns ``Phi`` (one per compartment, built
from the building blocks) weighted by non-negative volume fractions, and its
nonlinear parameters as :class:`~.fitting.Bound` s: some shared by the voxel,
some per fibre population, plus one unit direction per fibre. Everything else
-- input checks, S0 normalisation, masks, NaN voxels, chunking, grid
initialisation, multi-start variable-projection Levenberg-Marquardt, greedy
initialisation of several fibres, prediction -- lives here.
"""

import functools
import itertools
import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from dipy.reconst.base import ReconstFit, ReconstModel
from dipy.testing.decorators import warning_for_keywords
from scipy.spatial.transform import Rotation
from tqdm.auto import tqdm

from ..checks import (
    check_choice,
    check_int,
    check_mask_values,
    check_positive,
    check_s0,
)
from ..files import cache_root, fingerprint
from ..sim.sequences import fibonacci_sphere
from .acquisition import Acquisition
from .fitting import (
    fd_steps,
    forward_differences,
    forward_mode,
    joint_levenberg_marquardt,
    levenberg_marquardt,
    nnls,
    nnls_gram,
    projected,
)
from .frames import SignalFrame, rotate_outer
from .learned import TRAINER_VERSION, LearnedOptions, load_or_train
from .peaks import CSDUnavailableError, csd_peaks

__all__ = ["CompartmentModel", "CompartmentFit", "FIT_METHODS"]

#: Estimators of every compartment model: variable-projection fitting or a
#: regressor trained on simulated signals (:mod:`.learned`).
FIT_METHODS = ("varpro", "learned")

DTYPE = torch.float64
# Elements of the largest temporary of dictionary scoring (voxels x atoms x
# supports x K^2), in float64 about 0.3 GB.
_SCORE_ELEMENTS = 4e7
# Atoms evaluated per call when building the dictionary.
_ATOM_CHUNK = 256
# Greedy multi-fibre initialisation: a new population must lie at least this
# far (degrees) from those already chosen.
_MIN_SEPARATION_DEG = 20.0
# Levenberg-Marquardt iterations every start gets before all but the best are
# dropped.
_SCREEN_ITERATIONS = 3
# Largest |u| of the sigmoid reparametrisation: sigmoid'(8) = 3e-4, so a
# parameter stays within 3e-4 of the width of its range from each bound.
_SIGMOID_CAP = 8.0
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
_MIN_CROSSING_DEG = 30.0
# Learned prior of three fibres: this share of the draws are three nearly
# perpendicular populations (each axis of a random frame tilted by up to
# _ORTHOGONAL_TILT_DEG). Their signal's second moment is nearly isotropic, so
# the per-voxel frame (frames.py) is arbitrary for them and the network must
# learn their rotations from examples, yet uniform draws put only 0.5 % of
# separated triples within 10 degrees of perpendicular: trained on those
# alone, the network merged two perpendicular fibres (direction error 29.8
# degrees against the fit's 12.9; with the mixture 8.1; doc/compartments.md).
_ORTHOGONAL_SHARE = 0.5
_ORTHOGONAL_TILT_DEG = 20.0
# Voxels polished together at least (the model's chunk_size if larger). The
# polish has no dictionary: a voxel holds a few (M, K) and (M, P) arrays,
# ~40 kB at M = 186, so 1024 voxels take ~40 MB; ActiveAx's and ZCD's
# fitting chunks of 128 spent a third of the polish in per-call overhead
# (1 iteration, measured: 3,100 voxels per CPU-second at 128, 5,300 at
# 512-1024, 5,100 at 2048-4096).
_POLISH_CHUNK = 1024
# Initial Levenberg-Marquardt damping of the polishing of learned estimates
# (relative to the diagonal of J^T J), as the fits': 1e-4 changed no error
# ratio by more than 0.15 and 0 (Gauss-Newton) made one-fibre ODI 1.4x the
# fitted error and broke 2-fibre fits (measured, doc/compartments.md).
_POLISH_DAMPING = 1e-2


def canonical_directions(dirs):
    """Flip unit vectors (..., 3) into the z >= 0 hemisphere (axes are +-);
    on its rim (z = 0) into y >= 0, and (1, 0, 0) on the x axis: one
    representative per axis, as noiseless fits along the equator need."""
    z, y, x = dirs[..., 2:3], dirs[..., 1:2], dirs[..., 0:1]
    first = torch.where(z != 0, z, torch.where(y != 0, y, x))
    return dirs * torch.where(first < 0, -1.0, 1.0).to(dirs.dtype)


def _axes(bvecs, b0s):
    """Gradient directions (M, 3) as the signals see them: axes, each with
    its first non-zero coordinate positive, and none for b = 0 volumes (the
    models' signals and the frames' even harmonics do not depend on either,
    so a table differing only there reuses a cached network)."""
    axes = torch.where(torch.as_tensor(b0s)[:, None], 0.0, bvecs.to(DTYPE))
    first = axes.gather(1, (axes != 0).to(torch.int64).argmax(1, keepdim=True))
    # + 0.0 turns -0.0 into 0.0, whose bytes (hashed) differ.
    return axes * torch.where(first < 0, -1.0, 1.0).to(DTYPE) + 0.0


def _atom_gains(atoms, r):
    """Decrease of |r|^2 (B, N) when each atom's columns (N, M, Kf) are
    added to the residuals r (B, M) with non-negative weights."""
    if atoms.shape[-1] == 1:
        a = atoms[..., 0]
        return (r @ a.T).clamp_min(0.0) ** 2 / (a**2).sum(-1)
    G = atoms.mT @ atoms  # (N, Kf, Kf)
    N, _, Kf = atoms.shape
    step = max(1, int(_SCORE_ELEMENTS // (N * 2**Kf * Kf * Kf)))
    gains = []
    for i in range(0, r.shape[0], step):
        h = torch.einsum("nmk,bm->bnk", atoms, r[i : i + step])
        # At the NNLS optimum c^T G c = c^T h, so the decrease is c^T h.
        gains.append((nnls_gram(G, h) * h).sum(-1))
    return torch.cat(gains)


def _separated(dirs, rng, min_deg=_MIN_CROSSING_DEG):
    """Unit vectors (n, k, 3) with every pair at least ``min_deg`` degrees
    apart (as axes: n and -n are one), each vector closer than that to an
    earlier one redrawn uniformly on the sphere until none is."""
    dirs = dirs.copy()
    cos_max = math.cos(math.radians(min_deg))
    for j in range(1, dirs.shape[1]):
        while True:
            cos = np.abs(np.einsum("nkc,nc->nk", dirs[:, :j], dirs[:, j]))
            close = cos.max(-1) > cos_max
            if not close.any():
                break
            v = rng.standard_normal((int(close.sum()), 3))
            dirs[close, j] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return dirs


def _near_orthogonal(n, rng, tilt_deg=_ORTHOGONAL_TILT_DEG):
    """Unit vectors (n, 3, 3): the axes of uniformly random frames, each
    tilted by an angle of density proportional to its value up to
    ``tilt_deg`` (uniform over the cap's area) towards a random
    perpendicular direction."""
    frames = Rotation.random(n, random_state=rng).as_matrix()
    axes = np.swapaxes(frames, 1, 2)  # rows: the frames' axes
    tilt = math.radians(tilt_deg) * np.sqrt(rng.random((n, 3)))
    towards = rng.standard_normal((n, 3, 3))
    towards -= np.sum(towards * axes, -1, keepdims=True) * axes
    towards /= np.linalg.norm(towards, axis=-1, keepdims=True)
    return np.cos(tilt)[..., None] * axes + np.sin(tilt)[..., None] * towards


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


# Smallest chunk fitted beside others on threads (see _map_chunks). Below
# it the iterations' Python work dominates and threads contend for the GIL:
# 2-fibre NODDI on 100 voxels in two threads of 50 ran at 40-44 voxels/s
# against 68-75 in one, and on 512 voxels (threads of 256) at 109-156
# against 167-176; on 2,048 (1,024 each) threads won, 297 against 210.
_MIN_THREADED_CHUNK = 512
# Chunks in flight at once (with at least 2 torch threads). Two fill the
# gaps that one chunk's Python leaves; each chunk's torch calls use all of
# torch's intra-op threads, so more would multiply the threads on the
# cores (64 x 64 on a 64-core node) rather than fill them. Setting
# torch's thread count inside the workers is not an option: it changes
# the process-wide default that later threads start with.
_CHUNKS_IN_FLIGHT = 2


def _map_chunks(fit_chunk, n, step, *, desc):
    """``[fit_chunk(start, stop), ...]`` over consecutive chunks of at most
    ``step`` of ``n`` voxels, in order, with a progress bar in voxels (shown
    on a terminal, for several chunks).

    Several chunks of at least ``_MIN_THREADED_CHUNK`` voxels are fitted
    ``_CHUNKS_IN_FLIGHT`` at a time on threads (if torch has more than one
    thread). Why: a Levenberg-Marquardt iteration is many torch calls with
    Python between them, during which torch's own threads wait. One-fibre
    NODDI on 10,000 voxels, one chunk at a time, kept 1.4 of 2 cores busy
    (4,000 voxels/s); two at a time keep 1.8 busy (5,700-6,000 voxels/s),
    with the same estimates (each voxel's fit is its own). Grad mode is per
    thread, so ``fit_chunk`` sets its own.
    """
    bounds = [(i, min(i + step, n)) for i in range(0, n, step)]
    workers = min(_CHUNKS_IN_FLIGHT, torch.get_num_threads(), len(bounds))
    # A bar only for several chunks (a fit long enough to watch), and only
    # on a terminal (disable=None).
    quiet = True if len(bounds) < 2 else None
    with tqdm(total=n, desc=desc, unit="voxel", disable=quiet, leave=False) as bar:

        def one(bound):
            out = fit_chunk(*bound)
            bar.update(bound[1] - bound[0])
            return out

        if workers < 2 or step < _MIN_THREADED_CHUNK:
            return [one(b) for b in bounds]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, bounds))


def _no_b0_message(model, gtab):
    """Why ``model`` refuses the table ``gtab`` without b = 0 volume, and the
    fixes."""
    threshold = 0.0 if gtab.b0_threshold is None else float(gtab.b0_threshold)
    lowest = float(np.min(gtab.bvals))
    return (
        f"gtab has no b = 0 volume (no b-value <= gtab.b0_threshold = "
        f"{threshold:g} s/mm^2; the lowest is {lowest:g}): {model} takes S0 "
        "from the b = 0 volumes, and extrapolated from the weighted shells it "
        "trades off against the fast-decaying compartments (ActiveAx "
        "diameters go to their lower bound with S0 about doubled, NODDI's ndi "
        "drops). Include the b = 0 volumes of the acquisition in data and "
        "gtab; if the lowest shell is the b = 0 one stored as b = "
        f"{lowest:g}, build gtab with gradient_table(..., b0_threshold="
        f"{lowest:g})."
    )


class CompartmentModel(ReconstModel):
    """Base class: a multi-compartment model fitted by variable projection.

    Subclasses set, in ``__init__`` before calling :meth:`_setup`:
    ``_shared`` and ``_fibre`` (tuples of :class:`~.fitting.Bound`),
    ``_grid`` (name -> initial values, natural internal units),
    ``n_fibres`` and ``param_names``; and implement ``_shared_columns``
    (plus ``_fibre_columns`` when they have fibres), ``_to_params`` (fitted
    x and c -> public parameters) and ``_from_params`` (the inverse, for
    prediction).

    The options every model shares (``n_starts``, ``max_iter``,
    ``n_grid_directions``, ``chunk_size``, ``fit_method``, ``snr``,
    ``learned_options``, ``cache_dir``) are keywords of :meth:`_setup` and
    documented on each model.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable
    """

    #: Whether the model needs gradient timing (restricted or exchange blocks).
    _needs_timing = True
    #: Whether the model needs b = 0 volumes: its S0 is the sum of the
    #: fitted fractions times the mean b = 0 signal, and without a b = 0
    #: volume it is extrapolated from the weighted shells, where it trades
    #: off against the fast-decaying compartments (free water, small
    #: diameters): the fit converges, to the wrong tissue.
    _needs_b0 = False
    #: Columns per fibre population (Kf).
    _fibre_width = 1
    #: Jacobians by forward-mode autodiff instead of forward differences.
    _forward_mode = False
    #: Directions of single-fibre starts: "grid" (every grid direction scored
    #: against the data) or "tensor" (the tensor's principal direction, only
    #: the scalar grid values scored).
    _direction_starts = "grid"
    #: Polish iterations of learned estimates when ``learned_options`` leaves
    #: ``polish`` unset. One iteration brings the network's errors within
    #: 1.5x of the fitted ones (ActiveAx diameter 1.86x -> 1.26x) at >= 10,000
    #: voxels/s on 2 cores (doc/compartments.md, measured); ZCD takes 2.
    default_polish = 1
    _fit_class = None
    param_names = ()

    def _setup(
        self,
        gtab,
        *,
        n_starts,
        max_iter,
        n_grid_directions,
        chunk_size,
        fit_method="varpro",
        snr=50.0,
        learned_options=None,
        cache_dir=None,
    ):
        ReconstModel.__init__(self, gtab)
        self._acq = Acquisition.from_gtab(gtab, timing=self._needs_timing)
        self.n_starts = check_int(n_starts, "n_starts", 1)
        self.max_iter = check_int(max_iter, "max_iter", 1)
        self.n_grid_directions = check_int(n_grid_directions, "n_grid_directions", 1)
        self.chunk_size = check_int(chunk_size, "chunk_size", 1)
        self._b0s = np.asarray(gtab.b0s_mask, dtype=bool)
        if self._needs_b0 and not self._b0s.any():
            raise ValueError(_no_b0_message(type(self).__name__, gtab))
        self.fit_method = check_choice(fit_method, "fit_method", FIT_METHODS)
        self.snr = check_positive(snr, "snr")
        self.learned_options = LearnedOptions.from_dict(learned_options)
        cache_root(cache_dir)  # a folder or None, checked before any fit
        self.cache_dir = cache_dir
        if self.fit_method == "learned" and self.fibres == "auto":
            raise ValueError(
                "fit_method='learned' needs a fixed n_fibres; fibres='auto' "
                "is fitted (fit_method='varpro')"
            )

    # -- parameter layout ---------------------------------------------------
    @property
    def _n_shared(self):
        return len(self._shared)

    def _unpack(self, x):
        """Unconstrained (B, P) -> shared {name: (B,)}, fibre {name: (B, F)},
        unit directions (B, F, 3). F follows from P."""
        S, Fs = self._n_shared, len(self._fibre)
        shared = {b.name: b.value(x[:, i]) for i, b in enumerate(self._shared)}
        per = x[:, S:].reshape(x.shape[0], -1, Fs + 3)
        fibre = {b.name: b.value(per[..., i]) for i, b in enumerate(self._fibre)}
        v = per[..., Fs:]
        dirs = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return shared, fibre, dirs

    def _renormalise(self, x):
        """Unit-length direction vectors (the columns do not see their norm)
        and bounded sigmoid arguments.

        A sigmoid that has run far into saturation has no gradient left, so
        a parameter pushed against a bound early on could never come back;
        capping its argument at +-_SIGMOID_CAP keeps a usable slope."""
        S, Fs = self._n_shared, len(self._fibre)
        per = x[:, S:].reshape(x.shape[0], -1, Fs + 3)
        v = per[..., Fs:]
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scalars = per[..., :Fs].clamp(-_SIGMOID_CAP, _SIGMOID_CAP)
        per = torch.cat([scalars, v], dim=-1)
        shared = x[:, :S].clamp(-_SIGMOID_CAP, _SIGMOID_CAP)
        return torch.cat([shared, per.reshape(x.shape[0], -1)], dim=1)

    def _columns_x(self, x, acq=None):
        shared, fibre, dirs = self._unpack(x)
        return self._columns(self._acq if acq is None else acq, shared, fibre, dirs)

    def _columns(self, acq, shared, fibre, dirs):
        """All columns (B, M, K): fibre columns, fibre-major, then shared ones.

        Subclasses with fibres implement ``_fibre_columns(acq, shared, fibre,
        dirs)`` -> (B, F, M, Kf); all implement ``_shared_columns(acq, shared,
        B)`` -> (B, M, Ke).
        """
        blk = self._fibre_columns(acq, shared, fibre, dirs) if dirs.shape[1] else None
        return self._assembled(acq, blk, shared, dirs.shape[0])

    def _assembled(self, acq, blk, shared, B):
        """Columns (B, M, K) from fibre columns (B, F, M, Kf) (or None)."""
        parts = []
        if blk is not None:
            parts.append(blk.permute(0, 2, 1, 3).reshape(B, len(acq), -1))
        parts.append(self._shared_columns(acq, shared, B))
        return torch.cat(parts, dim=-1)

    #: Whether the model implements ``_fibre_columns_and_jacobian(x)`` ->
    #: (fibre columns (B, F, M, Kf), ``jacobian(c)`` -> ``d(Phi c)/dx``):
    #: closed-form derivatives that evaluate the fibre columns on the way.
    _closed_form_jacobian = False

    def _columns_and_jacobian(self, x):
        """Columns (B, M, K) at x and ``jacobian(c)`` -> ``d(Phi c)/dx``
        there, from one evaluation of the fibre compartments (models with
        ``_closed_form_jacobian``; no shared nonlinear parameters)."""
        blk, jacobian = self._fibre_columns_and_jacobian(x)
        return self._assembled(self._acq, blk, {}, x.shape[0]), jacobian

    def _derivatives(self, x, Phi, c):
        """``d(Phi c)/dx`` (B, M, P): in closed form where the model has it
        (``_closed_form_jacobian``), by forward-mode autodiff where it asks
        for it (``_forward_mode``), else by forward differences.

        Without shared parameters, a fibre's parameters move only that fibre's
        columns: each parameter is perturbed in every fibre at once and only
        the fibre columns are recomputed, F times cheaper than perturbing the
        F (Fs + 3) parameters one by one.
        """
        if self._closed_form_jacobian:
            return self._fibre_columns_and_jacobian(x)[1](c)
        if self._forward_mode:
            return forward_mode(self._columns_x, x, Phi, c)
        S, Fs = self._n_shared, len(self._fibre)
        B, P = x.shape
        F = (P - S) // (Fs + 3)
        if S or not F:
            return forward_differences(self._columns_x, x, Phi, c)
        J = Fs + 3
        M, Kf = Phi.shape[1], self._fibre_width
        per = x.view(B, F, J)
        h = fd_steps(per)  # (B, F, J)
        # pert[b, j, k] = per[b, k] + h[b, k, j] e_j
        pert = per[:, None] + torch.diag_embed(h).permute(0, 2, 1, 3)
        _, fibre, dirs = self._unpack(pert.reshape(B * J, P))
        blk = self._fibre_columns(self._acq, {}, fibre, dirs).view(B, J, F, M, Kf)
        base = Phi[..., : F * Kf].reshape(B, M, F, Kf).permute(0, 2, 1, 3)
        cf = c[:, : F * Kf].reshape(B, F, Kf)
        d = ((blk - base[:, None]) @ cf[:, None, :, :, None])[..., 0]  # (B,J,F,M)
        d = d / h.permute(0, 2, 1)[..., None]
        return d.permute(0, 3, 2, 1).reshape(B, M, F * J)

    def _fibre_jacobian(self, x, d_scalars, d_cos):
        """``d(Phi c)/dx`` (B, M, P) from closed-form fibre derivatives.

        For models without shared nonlinear parameters. ``d_scalars`` is a
        sequence of Fs tensors (B, F, M): the derivatives of each fibre's
        weighted signal (its columns times their coefficients) in the values
        of its bounded parameters, in the order of ``_fibre``; ``d_cos``
        (B, F, M) those in ``g . mu`` for its unit axis mu. The bounds'
        slopes (:meth:`~.fitting.Bound.slope`) and the axis normalisation
        mu = v / |v| (``d(g . mu)/dv = (g - (g . mu) mu) / |v|``) are chained
        on here, each column written once into the layout of x.
        """
        B, P = x.shape
        Fs = len(self._fibre)
        per = x.view(B, -1, Fs + 3)
        F, M = per.shape[1], d_cos.shape[-1]
        # Filled row by row in (B, P, M) (contiguous writes) and returned
        # as its transposed view: the matrix products downstream take
        # either layout, and no copy is made.
        J = x.new_empty(B, F, Fs + 3, M)
        for i, (bound, d) in enumerate(zip(self._fibre, d_scalars, strict=True)):
            torch.mul(d, bound.slope(per[..., i])[..., None], out=J[:, :, i])
        v = per[..., Fs:]
        norm = v.norm(dim=-1, keepdim=True)
        mu = v / norm
        cos = mu @ self._acq.bvecs.T  # (B, F, M)
        scaled = d_cos / norm
        radial = scaled * cos
        for k in range(3):
            J[:, :, Fs + k] = (
                scaled * self._acq.bvecs[:, k] - radial * mu[..., k : k + 1]
            )
        return J.view(B, P, M).mT

    # -- initialisation -----------------------------------------------------
    @functools.cached_property
    def _dictionary(self):
        """Grid atoms for one fibre (or none): internal x (N, P1), columns
        (N, M, K1), their Gram matrices, and the number of directions per
        combination of scalar values (atoms are ordered combination-major)."""
        bounds = self._shared + self._fibre
        values = [self._grid[b.name] for b in bounds]
        combos = torch.tensor(list(itertools.product(*values)), dtype=DTYPE)
        u = torch.stack(
            [b.unconstrained(combos[:, i]) for i, b in enumerate(bounds)], dim=1
        )
        n_fibres = min(self.n_fibres, 1)
        if n_fibres:
            dirs = torch.tensor(
                fibonacci_sphere(self.n_grid_directions, hemisphere=True), dtype=DTYPE
            )
            n_dirs = dirs.shape[0]
            u = u.repeat_interleave(n_dirs, dim=0)
            dirs = dirs.repeat(combos.shape[0], 1)
            x = torch.cat([u, dirs], dim=1)
        else:
            n_dirs = 1
            x = u
        Phi = torch.cat(
            [
                self._columns_x(x[i : i + _ATOM_CHUNK])
                for i in range(0, x.shape[0], _ATOM_CHUNK)
            ]
        )
        return x, Phi, Phi.mT @ Phi, n_dirs

    def _atom_costs(self, y):
        """Projected cost of every grid atom for every voxel, (B, N)."""
        _, Phi, G, _ = self._dictionary
        N, _, K = Phi.shape
        per_voxel = N * 2**K * K * K
        step = max(1, int(_SCORE_ELEMENTS // per_voxel))
        costs = []
        for i in range(0, y.shape[0], step):
            yi = y[i : i + step]
            h = torch.einsum("nmk,bm->bnk", Phi, yi)
            c = nnls_gram(G, h)
            quad = (c[..., None, :] @ G @ c[..., :, None])[..., 0, 0]
            costs.append((yi**2).sum(-1, keepdim=True) - 2 * (c * h).sum(-1) + quad)
        return torch.cat(costs)

    def _grid_starts(self, y):
        """(B, S, P) starts: per scalar combination the best grid direction,
        then the ``n_starts`` best combinations."""
        x_atoms, _, _, n_dirs = self._dictionary
        cost = self._atom_costs(y)
        B = y.shape[0]
        cost = cost.view(B, -1, n_dirs)
        best_dir = cost.argmin(-1)  # (B, C)
        best_cost = torch.take_along_dim(cost, best_dir[..., None], -1)[..., 0]
        n = min(self.n_starts, best_cost.shape[1])
        combo = best_cost.topk(n, dim=1, largest=False).indices  # (B, S)
        atom = combo * n_dirs + torch.take_along_dim(best_dir, combo, 1)
        return x_atoms[atom]

    @functools.cached_property
    def _tensor_design(self):
        """Design matrix (M, 7) of the log-linear diffusion-tensor fit:
        log S = log S0 - b g^T D g."""
        b, g = self._acq.bvals, self._acq.bvecs
        x, y, z = g.unbind(-1)
        return torch.stack(
            [
                torch.ones_like(b),
                -b * x * x,
                -b * y * y,
                -b * z * z,
                -2.0 * b * x * y,
                -2.0 * b * x * z,
                -2.0 * b * y * z,
            ],
            dim=-1,
        )

    def _tensor_directions(self, y):
        """Principal eigenvectors (B, 3) of weighted log-linear tensor fits to
        the normalised signals y (B, M). The weights y^2 undo the log's noise
        amplification at low signal (Salvador et al. 2005, as DIPY's WLS)."""
        X = self._tensor_design
        y = y.clamp_min(1e-3)
        # Each voxel's weights scaled to a maximum of 1 (the solution does not
        # change): signals whose squares overflow (b = 0 near 1e-160) stay finite.
        w = (y / y.amax(-1, keepdim=True)) ** 2
        logy = torch.log(y)
        A = torch.einsum("mi,bm,mj->bij", X, w, X)
        rhs = torch.einsum("mi,bm->bi", X, w * logy)
        ridge = 1e-12 * torch.diagonal(A, dim1=-2, dim2=-1).amax(-1)
        A = A + ridge[:, None, None] * torch.eye(7, dtype=y.dtype)
        d = torch.linalg.solve(A, rhs)
        D = torch.stack(
            [
                torch.stack([d[:, 1], d[:, 4], d[:, 5]], -1),
                torch.stack([d[:, 4], d[:, 2], d[:, 6]], -1),
                torch.stack([d[:, 5], d[:, 6], d[:, 3]], -1),
            ],
            dim=-2,
        )
        return torch.linalg.eigh(D).eigenvectors[..., -1]

    @functools.cached_property
    def _scalar_grid(self):
        """Unconstrained values (C, P1 - 3) of every combination of scalar
        grid values (one fibre)."""
        bounds = self._shared + self._fibre
        values = [self._grid[b.name] for b in bounds]
        combos = torch.tensor(list(itertools.product(*values)), dtype=DTYPE)
        return torch.stack(
            [b.unconstrained(combos[:, i]) for i, b in enumerate(bounds)], dim=1
        )

    @staticmethod
    def _start_points(u, dirs):
        """Unconstrained points (B C, P): every scalar combination u (C, Q)
        at every direction dirs (B, 3), combination-minor."""
        B, C = dirs.shape[0], u.shape[0]
        return torch.cat(
            [u.expand(B, -1, -1), dirs[:, None].expand(-1, C, -1)], dim=-1
        ).reshape(B * C, -1)

    def _start_columns(self, u, dirs):
        """Columns (B C, M, K) at :meth:`_start_points`; models may share work
        between combinations."""
        return self._columns_x(self._start_points(u, dirs))

    def _tensor_starts(self, y):
        """(B, S, P) single-fibre starts at the voxel's tensor direction: every
        combination of scalar grid values there, the ``n_starts`` of least
        projected cost. As AMICO's NODDI, the direction comes from the
        tensor; unlike it, Levenberg-Marquardt then refines it."""
        u = self._scalar_grid  # (C, Q)
        B, C = y.shape[0], u.shape[0]
        dirs = self._tensor_directions(y)
        x = self._start_points(u, dirs)
        yy = y.repeat_interleave(C, dim=0)
        _, _, cost = projected(self._start_columns(u, dirs), yy)
        n = min(self.n_starts, C)
        best = cost.view(B, C).topk(n, dim=1, largest=False).indices
        return torch.take_along_dim(x.view(B, C, -1), best[..., None], 1)

    def _greedy_starts(self, y):
        """(B, S, P) starts for several fibres by matching pursuit.

        Assumes no shared nonlinear parameters (the multi-fibre models), so
        that the atoms' non-fibre columns are fixed.

        Each of the ``n_starts`` single-fibre grid starts is completed by the
        grid atoms that best match the remaining residual, one fibre at a
        time, each at least 20 degrees from those already chosen.
        """
        x_atoms, Phi, _, _ = self._dictionary
        S, Fs, Kf = self._n_shared, len(self._fibre), self._fibre_width
        firsts = self._grid_starts(y)  # (B, S, P1)
        B, n_starts, _ = firsts.shape
        first = firsts.reshape(B * n_starts, -1)
        yy = y.repeat_interleave(n_starts, dim=0)
        atoms = Phi[..., :Kf]  # (N, M, Kf): the fibre columns
        extra = Phi[0, :, Kf:]  # (M, Ke): columns without fibre parameters
        atom_dirs = x_atoms[:, S + Fs :]
        cos_min = math.cos(math.radians(_MIN_SEPARATION_DEG))
        parts = [first[:, S:]]
        columns = [self._columns_x(first)[..., :Kf]]  # (B S, M, Kf)
        for _ in range(1, self.n_fibres):
            fixed = extra.expand(yy.shape[0], -1, -1)
            C = torch.cat(columns + [fixed], -1)
            c = nnls(C, yy)
            r = yy - (C @ c[..., None])[..., 0]
            score = _atom_gains(atoms, r)
            for part in parts:
                close = (part[:, None, Fs:] * atom_dirs).sum(-1).abs() > cos_min
                score = torch.where(close, -math.inf, score)
            pick = score.argmax(-1)
            parts.append(x_atoms[pick, S:])
            columns.append(atoms[pick])
        x = torch.cat([first[:, :S]] + parts, dim=1)
        return x.view(B, n_starts, -1)

    # -- fitting --------------------------------------------------------------
    def _directed_start(self, x, directions):
        """Start ``x`` (B, P) with its fibre directions replaced by the given
        ones (B, D, 3), strongest first; zero rows (no peak) keep the start's
        own direction."""
        S, Fs = self._n_shared, len(self._fibre)
        B = x.shape[0]
        per = x[:, S:].reshape(B, self.n_fibres, Fs + 3).clone()
        n = min(self.n_fibres, directions.shape[1])
        given = directions[:, :n]
        has = given.norm(dim=-1, keepdim=True) > 0
        per[:, :n, Fs:] = torch.where(has, given, per[:, :n, Fs:])
        return torch.cat([x[:, :S], per.reshape(B, -1)], dim=1)

    def _fit_normalised(self, y, *, directions=None):
        """Unconstrained parameters and NNLS coefficients for signals / S0.

        All starts take a few Levenberg-Marquardt iterations; only the best
        of each voxel is then iterated to convergence (starts rarely change
        rank once they have settled into their basins, and this divides the
        cost by about ``n_starts``). ``directions`` (B, D, 3), e.g. CSD peaks,
        add one start: the first grid start with those fibre directions.
        """
        if not self.n_fibres and not self._shared:
            # Nothing nonlinear (NODDI without fibres): one NNLS.
            x = y.new_zeros(y.shape[0], 0)
            return x, nnls(self._columns_x(x), y)
        if self.n_fibres > 1:
            starts = self._greedy_starts(y)
        elif self.n_fibres == 1 and self._direction_starts == "tensor":
            starts = self._tensor_starts(y)
        else:
            starts = self._grid_starts(y)
        if directions is not None:
            directed = self._directed_start(starts[:, 0], directions)
            starts = torch.cat([starts, directed[:, None]], dim=1)
        B, S, P = starts.shape
        x = starts.reshape(B * S, P)
        if S > 1:
            yy = y[:, None].expand(B, S, -1).reshape(B * S, -1)
            x, _, cost = levenberg_marquardt(
                self._columns_x,
                yy,
                x,
                max_iter=min(_SCREEN_ITERATIONS, self.max_iter),
                renormalise=self._renormalise,
                derivatives=self._derivatives,
            )
            x = x[torch.arange(B) * S + cost.view(B, S).argmin(1)]
        x, c, _ = levenberg_marquardt(
            self._columns_x,
            y,
            x,
            max_iter=self.max_iter,
            renormalise=self._renormalise,
            derivatives=self._derivatives,
        )
        return x, c

    def _check_data(self, data, mask):
        data = np.asarray(data)
        if np.iscomplexobj(data):
            raise ValueError(
                "data must be real: magnitude signals (np.abs(data)), or the real "
                "part of phase-corrected data (data.real)"
            )
        if data.dtype.kind not in "iuf":
            raise ValueError(
                f"data must hold numbers (signal magnitudes), got dtype "
                f"{data.dtype}; convert it, e.g. np.asarray(data, dtype=float)"
            )
        data = data.astype(np.float64, copy=False)
        n = len(self._acq)
        if data.ndim < 1 or data.shape[-1] != n:
            raise ValueError(
                f"data has shape {data.shape}, but gtab has {n} volumes; the last "
                "axis of data must hold one value per gradient-table volume"
            )
        spatial = data.shape[:-1]
        if mask is None:
            return data, np.ones(spatial, dtype=bool)
        mask = np.asarray(mask)
        if mask.shape != spatial:
            raise ValueError(
                f"mask has shape {mask.shape}, but data has spatial shape "
                f"{spatial}; give one mask value per voxel (data.shape[:-1])"
            )
        return data, check_mask_values(mask)

    def _s0_estimate(self, signals):
        """Mean b = 0 signal per voxel (the largest signal without b = 0)."""
        if self._b0s.any():
            return signals[:, self._b0s].mean(-1)
        return signals.max(-1)

    @warning_for_keywords()
    def fit(self, data, *, mask=None, fibres=None):
        """Fit the model to every voxel in ``mask``.

        Parameters
        ----------
        data : array_like, shape (..., N)
            Signals; the last axis follows the gradient table.
        mask : array_like of bool, shape data.shape[:-1], optional
            Voxels to fit (default all). Parameters outside are 0.
        fibres : "auto" or array_like of int, shape data.shape[:-1], optional
            Only for models built with ``fibres="auto"``: the number of fibre
            populations of every voxel (0 to ``model.n_fibres``), or "auto"
            (the default of such models) to choose it from CSD peaks and a
            model-selection test.

        Returns
        -------
        fit : CompartmentFit subclass
            Voxels whose signals are not finite, or whose b = 0 signal is not
            positive (or so small that the signals divided by it overflow),
            get NaN parameters; the others are fitted regardless.
        """
        data, mask = self._check_data(data, mask)
        counts = self._check_fibres(fibres, mask)
        n_params = len(self.param_names)
        params = np.zeros(mask.shape + (n_params,))
        signals = data[mask]  # (V, N)
        s0 = self._s0_estimate(signals)
        ok = np.isfinite(signals).all(-1) & np.isfinite(s0) & (s0 > 0)
        with np.errstate(over="ignore"):
            y = signals / np.where(ok, s0, 1.0)[:, None]
        # A b = 0 signal so small (e.g. denormal) that the normalised signals
        # overflow is no signal either: NaN for that voxel alone.
        ok &= np.isfinite(y).all(-1)
        out = np.full((signals.shape[0], n_params), np.nan)
        y_ok = y[ok]
        s0_ok = s0[ok]
        if ok.any():
            if self.fit_method == "learned":
                out[ok] = self._fit_learned(y_ok, s0_ok)
            elif self.fibres == "auto":
                counts_ok = None if counts is None else counts[mask][ok]
                out[ok] = self._fit_variable(signals[ok], y_ok, s0_ok, counts_ok)
            else:
                out[ok] = self._fit_fixed(y_ok, s0_ok)
        params[mask] = out
        return self._fit_class(self, params, mask=mask)

    #: "auto" for models whose fibre count varies per voxel (set by
    #: subclasses that support it), else None.
    fibres = None
    #: "varpro" (variable-projection fitting) or "learned".
    fit_method = "varpro"

    def _check_fibres(self, fibres, mask):
        if isinstance(fibres, str):
            check_choice(fibres, "fibres", ("auto",))
        if fibres is None or isinstance(fibres, str):
            if fibres is not None and self.fibres != "auto":
                raise ValueError("fibres='auto' needs a model built with fibres='auto'")
            return None
        if self.fibres != "auto":
            raise ValueError(
                "a per-voxel fibre count map needs a model built with "
                "fibres='auto' (this one has a fixed n_fibres)"
            )
        counts = np.asarray(fibres)
        if counts.shape != mask.shape:
            raise ValueError(
                f"fibres has shape {counts.shape}, but data has spatial shape "
                f"{mask.shape}; give one count per voxel"
            )
        if not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(
                f"fibres must hold integers, got dtype {counts.dtype}; convert a "
                "count map read as floats with np.rint(counts).astype(int)"
            )
        inside = counts[mask]
        if inside.size and (inside.min() < 0 or inside.max() > self.n_fibres):
            raise ValueError(
                f"fibres must lie in 0..{self.n_fibres} inside the mask, got "
                f"{inside.min()}..{inside.max()}"
            )
        return counts.astype(np.int64)

    def _fit_fixed(self, y, s0, *, directions=None, with_cost=False):
        """Public parameters (V, n_params) of normalised signals ``y`` (V, M)
        with S0 ``s0`` (V,), at most ``chunk_size`` voxels at a time; with
        ``with_cost`` also the residual sums of squares (V,)."""

        def fit_chunk(start, stop):
            with torch.no_grad():
                yi = torch.tensor(y[start:stop], dtype=DTYPE)
                scale = torch.tensor(s0[start:stop], dtype=DTYPE)
                di = None
                if directions is not None:
                    di = torch.tensor(directions[start:stop], dtype=DTYPE)
                x, c = self._fit_normalised(yi, directions=di)
                shared, fibre, dirs = self._unpack(x)
                params = self._to_params(shared, fibre, dirs, c, scale).numpy()
                if not with_cost:
                    return params, None
                r = yi - (self._columns_x(x) @ c[..., None])[..., 0]
                return params, (r**2).sum(-1).numpy()

        parts = _map_chunks(
            fit_chunk, y.shape[0], self.chunk_size, desc=f"{type(self).__name__} fit"
        )
        params = np.concatenate([p for p, _ in parts])
        return (params, np.concatenate([c for _, c in parts])) if with_cost else params

    # -- learned estimator -------------------------------------------------------
    #: Options that change how, not what, the model fits (not in the cache key).
    _NOT_IN_KEY = (
        "n_starts",
        "max_iter",
        "n_grid_directions",
        "chunk_size",
        "fit_method",
        "cache_dir",
    )

    def _learned_key(self):
        """Hash of the model, its acquisitions, the noise and the options."""
        described = {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_")
            and k not in self._NOT_IN_KEY
            and isinstance(v, (bool, int, float, str))
        }
        described.update(
            model=type(self).__name__,
            params=list(self.param_names),
            bounds=[repr(b) for b in self._shared + self._fibre],
            options=self.learned_options.training_description(),
            trainer=TRAINER_VERSION,
            # How the outputs are read back (a network trained on log targets
            # must not be loaded by a model that reads them linearly).
            log_targets=sorted(self._log_targets),
        )
        if self._signal_frame is not None:
            described["frame"] = self._signal_frame.description()
        acq = self._acq
        # The b = 0 mask (the table's b0_threshold) sets how the network's
        # inputs and S0 target are normalised: part of the trained map.
        arrays = [acq.bvals, _axes(acq.bvecs, self._b0s), torch.as_tensor(self._b0s)]
        if acq.has_timing:
            arrays += [acq.g2, acq.waveform_index, acq.durations, acq.amplitudes]
        return fingerprint(described, [a.numpy() for a in arrays])

    def _direction_slots(self):
        """Indices of the first of every (x, y, z) triple in param_names."""
        names = self.param_names
        return [i for i, n in enumerate(names) if n == "x" or n.startswith("x_")]

    #: Fibre parameters that the learned estimator's prior draws
    #: log-uniformly although the fit bounds them on a linear scale
    #: (:meth:`_sample_training`).
    _log_prior = ()

    def _sample_training(self, n, rng):
        """Unconstrained parameters (n, P) and linear weights (n, K) drawn
        from the prior of the learned estimator: every bounded parameter
        uniform in its range (log-uniform on a log scale or if named in
        ``_log_prior``), directions uniform on the sphere and, with several
        fibres, pairwise at least ``_MIN_CROSSING_DEG`` apart (closer ones
        are one population, as in the fibre count) and, with three, a share
        ``_ORTHOGONAL_SHARE`` of them nearly perpendicular
        (:func:`_near_orthogonal`), the weights from
        :meth:`_sample_weights`."""
        F = self.n_fibres

        def draw(bound, size):
            lo, hi = bound.lower, bound.upper
            if bound.log or bound.name in self._log_prior:
                v = np.exp(rng.uniform(math.log(lo), math.log(hi), size))
            else:
                v = rng.uniform(lo, hi, size)
            return bound.unconstrained(torch.tensor(v, dtype=DTYPE))

        cols = [draw(b, n)[:, None] for b in self._shared]
        for _ in range(F):
            cols += [draw(b, n)[:, None] for b in self._fibre]
            v = rng.standard_normal((n, 3))
            cols.append(torch.tensor(v / np.linalg.norm(v, axis=1, keepdims=True)))
        x = torch.cat(cols, dim=1) if cols else torch.zeros(n, 0, dtype=DTYPE)
        if F > 1:
            # Each fibre's direction is its last 3 columns (:meth:`_unpack`).
            dirs = x[:, self._n_shared :].view(n, F, -1)[..., -3:]
            dirs.copy_(torch.from_numpy(_separated(dirs.numpy(), rng)))
            if F == 3:
                share = rng.random(n) < _ORTHOGONAL_SHARE
                rows = torch.from_numpy(np.flatnonzero(share))
                dirs[rows] = torch.from_numpy(_near_orthogonal(len(rows), rng))
        K = self._columns_x(x[:1]).shape[-1]
        return x, torch.tensor(self._sample_weights(n, K, rng), dtype=DTYPE)

    def _sample_weights(self, n, K, rng):
        """Linear weights (n, K) of the learned prior: a flat Dirichlet
        (volume fractions summing to 1)."""
        return rng.dirichlet(np.ones(K), n)

    #: Public parameters the learned estimator regresses on a log scale
    #: (:meth:`_log_target_columns`).
    _log_targets = ()

    def _log_target_columns(self):
        """Indices of the public parameters regressed on a log scale: those
        named in ``_log_targets``, with or without a fibre suffix ``_k``.
        For parameters whose error is relative and whose prior spans decades
        (exchange times): a squared error on the values themselves would be
        all about the largest ones. Not for diameters, whose error is judged
        in um: on the benchmark's 2-10 um axons log targets doubled the
        learned ActiveAx and ZCD diameter errors (measured)."""
        logs = set(self._log_targets)
        out = []
        for i, name in enumerate(self.param_names):
            stem, _, suffix = name.rpartition("_")
            if name in logs or (suffix.isdigit() and stem in logs):
                out.append(i)
        return out

    def _to_targets(self, params):
        """Public parameters (V, n_params) -> regression targets: S0 / b0 mean
        and scalars as they are (log-scaled ones as their logarithm,
        :meth:`_log_target_columns`), each direction as the 6 entries of its
        outer product (sign-free)."""
        slots = self._direction_slots()
        keep = [
            i
            for i in range(len(self.param_names))
            if not any(s <= i < s + 3 for s in slots)
        ]
        params = params.copy()
        logs = self._log_target_columns()
        with np.errstate(divide="ignore"):
            params[:, logs] = np.log(params[:, logs])
        parts = [params[:, keep]]
        iu = np.triu_indices(3)
        for s in slots:
            d = params[:, s : s + 3]
            parts.append((d[:, :, None] * d[:, None, :])[:, iu[0], iu[1]])
        return np.concatenate(parts, axis=1), keep

    def _from_targets(self, targets, s0):
        """Regression outputs -> public parameters (V, n_params)."""
        slots = self._direction_slots()
        _, keep = self._to_targets(np.zeros((1, len(self.param_names))))
        out = np.empty((targets.shape[0], len(self.param_names)))
        out[:, keep] = targets[:, : len(keep)]
        logs = self._log_target_columns()
        out[:, logs] = np.exp(out[:, logs])
        out[:, 0] *= s0
        iu = np.triu_indices(3)
        for j, s in enumerate(slots):
            t = targets[:, len(keep) + 6 * j : len(keep) + 6 * (j + 1)]
            m = np.zeros((t.shape[0], 3, 3))
            m[:, iu[0], iu[1]] = t
            m[:, iu[1], iu[0]] = t
            _, vecs = np.linalg.eigh(m)
            d = vecs[..., -1]
            out[:, s : s + 3] = d * np.where(d[:, 2:3] < 0, -1.0, 1.0)
        return out

    def _training_set(self):
        """Simulated noiseless signals (V, M), S0 = 1, and their targets;
        the noise is drawn anew for every batch (:meth:`_noisy_batch`)."""
        opts = self.learned_options
        rng = np.random.default_rng(opts.seed)
        inputs, targets = [], []
        chunk = 4096
        with torch.no_grad():
            for i in range(0, opts.n_train, chunk):
                n = min(chunk, opts.n_train - i)
                x, c = self._sample_training(n, rng)
                inputs.append((self._columns_x(x) @ c[..., None])[..., 0].numpy())
                shared, fibre, dirs = self._unpack(x)
                params = self._to_params(
                    shared, fibre, dirs, c, torch.ones(n, dtype=DTYPE)
                ).numpy()
                targets.append(self._to_targets(params)[0])
        return np.concatenate(inputs), np.concatenate(targets)

    @functools.cached_property
    def _signal_frame(self):
        """The :class:`~.frames.SignalFrame` of the learned estimator's
        inputs, or None (a model without fibre directions, a protocol
        without a shell of 20 directions, ``learned_options["frame"]``
        False)."""
        if not (self.learned_options.frame and self._direction_slots()):
            return None
        return SignalFrame.from_gtab(self.gtab, b0s_mask=self._b0s)

    def _direction_target_columns(self):
        """The 6 target columns of each direction's outer product."""
        _, keep = self._to_targets(np.zeros((1, len(self.param_names))))
        n = len(self._direction_slots())
        first = len(keep)
        return [list(range(first + 6 * j, first + 6 * j + 6)) for j in range(n)]

    def _network_inputs(self, y, targets=None):
        """Normalised signals (B, M) -> the network's inputs, and targets
        (lab frame) -> the targets it is trained on: in each voxel's frame
        where the model has one (:attr:`_signal_frame`). Also returns the
        frames (None without), to rotate predictions back."""
        frame = self._signal_frame
        if frame is None:
            return y, targets, None
        inputs, frames = frame.features(y)
        if targets is not None:
            targets = self._rotated_targets(targets, frames, to_frame=True)
        return inputs, targets, frames

    def _rotated_targets(self, targets, frames, *, to_frame):
        """A copy of targets (B, n_out) with every direction's outer product
        written in the voxels' frames (``to_frame``) or back in the lab
        (:func:`~.frames.rotate_outer`)."""
        targets = targets.clone()
        for cols in self._direction_target_columns():
            targets[:, cols] = rotate_outer(targets[:, cols], frames, to_frame=to_frame)
        return targets

    def _noisy_batch(self, clean, targets, generator):
        """Rician noise at ``snr`` on noiseless signals (B, M) (S0 = 1), then
        the normalisation of :meth:`fit`: inputs divided by their b = 0 mean,
        the S0 target (column 0) by the same mean. A new draw per batch: the
        network sees every training voxel with many noise realisations."""
        sigma = 1.0 / self.snr
        like = {"generator": generator, "dtype": clean.dtype, "device": clean.device}
        real = clean + sigma * torch.randn(clean.shape, **like)
        imag = sigma * torch.randn(clean.shape, **like)
        noisy = torch.sqrt(real**2 + imag**2)
        b0s = torch.as_tensor(self._b0s, device=clean.device)
        s0 = noisy[:, b0s].mean(-1) if b0s.any() else noisy.amax(-1)
        s0 = torch.where(s0 > 0, s0, torch.ones_like(s0))
        targets = targets.clone()
        targets[:, 0] = targets[:, 0] / s0
        return noisy / s0[:, None], targets

    def _training_batch(self, clean, targets, generator):
        """A training batch as the network sees it: :meth:`_noisy_batch`,
        then the voxels' frames (:meth:`_network_inputs`)."""
        inputs, targets, _ = self._network_inputs(
            *self._noisy_batch(clean, targets, generator)
        )
        return inputs, targets

    @functools.cached_property
    def regressor(self):
        """The trained network of ``fit_method="learned"`` (loaded from the
        cache, or trained on first use)."""
        net, _ = load_or_train(
            self._learned_key(),
            self._training_set,
            self.learned_options,
            directory=self.cache_dir,
            label=type(self).__name__,
            groups=self._fibre_target_groups(),
            augment=self._training_batch,
            n_inputs=self._n_network_inputs(),
        )
        return net

    def _n_network_inputs(self):
        """The width of the network's inputs (one voxel of ones through
        :meth:`_network_inputs`)."""
        ones = torch.ones((1, len(self._acq.bvals)), dtype=DTYPE)
        return int(self._network_inputs(ones)[0].shape[1])

    def _fibre_weights(self, targets, groups):
        """Each fibre's signal weight (V, F) from regression outputs, which
        orders the fibres as the fits do: its first target (NODDI's weight)."""
        return targets[:, groups[:, 0]]

    def _fibre_target_groups(self):
        """(F, W) target columns of each fibre population, exchangeable in
        training (:func:`~.learned.set_loss`), or None for fewer than 2
        fibres. Per fibre: its scalar parameters (weight first), then the 6
        entries of its direction's outer product."""
        F = self.n_fibres
        if F < 2:
            return None
        _, keep = self._to_targets(np.zeros((1, len(self.param_names))))
        head = len(self.param_names) - F * self._per_fibre_params
        n_scalar = self._per_fibre_params - 3
        groups = []
        for k in range(F):
            first = head + k * self._per_fibre_params
            scalars = [keep.index(first + j) for j in range(n_scalar)]
            dirs = [len(keep) + 6 * k + j for j in range(6)]
            groups.append(scalars + dirs)
        return np.array(groups)

    def _fit_learned(self, y, s0):
        inputs, _, frames = self._network_inputs(torch.as_tensor(y, dtype=DTYPE))
        inputs = inputs.to(torch.float32)
        # The network runs in float32: a voxel whose normalised signals
        # overflow it (a b = 0 mean near 1e-37 against signals near 1) gets
        # NaN, as fit gives one that overflows float64, and the rest are kept.
        usable = torch.isfinite(inputs).all(-1)
        out = np.full((len(y), len(self.param_names)), np.nan)
        if not usable.any():
            return out
        keep = usable.numpy()
        y, s0, inputs = y[keep], s0[keep], inputs[usable]
        frames = None if frames is None else frames[usable]
        targets = self.regressor.predict(inputs.numpy())
        targets = torch.as_tensor(targets, dtype=DTYPE)
        if frames is not None:
            targets = self._rotated_targets(targets, frames, to_frame=False)
        targets = targets.numpy()
        groups = self._fibre_target_groups()
        if groups is not None:
            # Outputs come in no particular fibre order: strongest first, as
            # the fits sort them.
            order = np.argsort(-self._fibre_weights(targets, groups), axis=1)
            targets[:, groups.ravel()] = np.take_along_axis(
                targets[:, groups], order[..., None], axis=1
            ).reshape(len(targets), -1)
        params = self._from_targets(targets, s0)
        n_polish = self.learned_options.polish
        if n_polish is None:
            n_polish = self.default_polish
        if n_polish:
            params = self._polished(y, s0, params, n_polish)
        out[keep] = params
        return out

    def _pack(self, shared, fibre, dirs):
        """Inverse of :meth:`_unpack`: unconstrained parameters (B, P) from
        shared {name: (B,)}, fibre {name: (B, F)} and directions (B, F, 3)
        (values are clipped just inside their bounds)."""
        B = dirs.shape[0]
        cols = [b.unconstrained(shared[b.name])[:, None] for b in self._shared]
        per = [b.unconstrained(fibre[b.name])[..., None] for b in self._fibre]
        per = torch.cat(per + [dirs.to(DTYPE)], dim=-1)  # (B, F, Fs + 3)
        return torch.cat(cols + [per.reshape(B, -1)], dim=1)

    def _polished(self, y, s0, params, n_iter):
        """Public parameters (V, n_params) after ``n_iter`` Levenberg-Marquardt
        iterations of variable projection (:func:`~.fitting.levenberg_marquardt`,
        the fitting's own solver, Jacobians and bounds) started from the
        learned estimates ``params``, all voxels of a chunk at once.

        The network does the global search (no grid, no multi-start); the
        iterations only refine within its basin. With one fibre the volume
        fractions are re-solved by NNLS at the network's nonlinear
        parameters (variable projection); with several, the network's
        fractions are refined with them (:func:`~.fitting.joint_levenberg_
        marquardt`). A step is accepted only if it lowers the residual, so a
        polished voxel never fits its signal worse than the network's
        estimate (with one fibre: than the network's nonlinear parameters
        with their least-squares fractions). Chunks of at least
        ``_POLISH_CHUNK`` voxels.
        """
        at_start = self._columns_and_jacobian if self._closed_form_jacobian else None

        def polish_chunk(start, stop):
            with torch.no_grad():
                yi = torch.tensor(y[start:stop], dtype=DTYPE)
                scale = torch.tensor(s0[start:stop], dtype=DTYPE)
                initial = torch.tensor(params[start:stop], dtype=DTYPE)
                shared, fibre, dirs, fractions, total = self._from_params(initial)
                x0 = self._renormalise(self._pack(shared, fibre, dirs))
                if x0.shape[1] and self.n_fibres >= 2:
                    # Several fibres: the network's directions are still
                    # off (12 degrees median for 2-fibre NODDI), and the
                    # weights re-solved there absorb the misfit (free water
                    # 0.023 -> 0.051 after one projected iteration); moving
                    # the network's own weights with the nonlinear
                    # parameters keeps them (0.025, measured).
                    c0 = fractions * (total / scale)[:, None]
                    x, c, _ = joint_levenberg_marquardt(
                        self._columns_x,
                        yi,
                        x0,
                        torch.nan_to_num(c0),
                        max_iter=n_iter,
                        renormalise=self._renormalise,
                        derivatives=self._derivatives,
                        columns_and_jacobian=at_start,
                    )
                elif x0.shape[1]:
                    x, c, _ = levenberg_marquardt(
                        self._columns_x,
                        yi,
                        x0,
                        max_iter=n_iter,
                        renormalise=self._renormalise,
                        derivatives=self._derivatives,
                        lam0=_POLISH_DAMPING,
                        columns_and_jacobian=at_start,
                    )
                else:
                    # Nothing nonlinear (NODDI without fibres): one NNLS.
                    x, c = x0, nnls(self._columns_x(x0), yi)
                shared, fibre, dirs = self._unpack(x)
                return self._to_params(shared, fibre, dirs, c, scale).numpy()

        step = max(self.chunk_size, _POLISH_CHUNK)
        parts = _map_chunks(
            polish_chunk, y.shape[0], step, desc=f"{type(self).__name__} polish"
        )
        return np.concatenate(parts)

    # -- fibre counts per voxel --------------------------------------------------
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
        at least ``_MIN_CROSSING_DEG`` apart.
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
            separated = _min_separation_deg(p, sub) >= _MIN_CROSSING_DEG
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

    # -- prediction -----------------------------------------------------------
    def _fill_padding(self, params):
        """Parameters with the NaN of absent fibres (per-voxel counts)
        replaced by a fibre of weight 0, so that only unfitted voxels stay
        NaN."""
        return params

    def _predict_params(self, params, acq, S0=None, mask=None):
        """Signals (..., M) from public parameters (..., n_params).

        0 outside ``mask`` (default: where any parameter is non-zero; ``fit``
        writes zeros outside its mask), NaN where a parameter is not finite
        (voxels that could not be fitted); only the other voxels are
        simulated, ``chunk_size`` at a time.
        """
        params = self._fill_padding(np.asarray(params, dtype=np.float64))
        shape = params.shape[:-1]
        if mask is None:
            mask = np.any(params != 0, axis=-1)
        mask = np.broadcast_to(np.asarray(mask, dtype=bool), shape)
        finite = np.isfinite(params).all(-1)
        signal = np.zeros(shape + (len(acq),))
        signal[mask & ~finite] = np.nan
        todo = mask & finite
        flat = torch.tensor(params[todo], dtype=DTYPE)
        out = []
        with torch.no_grad():
            for i in range(0, flat.shape[0], self.chunk_size):
                shared, fibre, dirs, fractions, s0 = self._from_params(
                    flat[i : i + self.chunk_size]
                )
                Phi = self._columns(acq, shared, fibre, dirs)
                out.append(((Phi @ fractions[..., None])[..., 0] * s0[:, None]).numpy())
        if out:
            signal[todo] = np.concatenate(out)
        if S0 is not None:
            # The fitted S0 is replaced: divide it out, multiply by the new one.
            fitted = params[..., 0]
            new = check_s0(S0, shape, where=todo)
            with np.errstate(invalid="ignore", divide="ignore"):
                scaled = signal / fitted[..., None] * new[..., None]
            signal = np.where(todo[..., None], scaled, signal)
        return signal


class CompartmentFit(ReconstFit):
    """Fit of a :class:`CompartmentModel`: a view over one parameter array.

    Parameters
    ----------
    model : CompartmentModel
    model_params : ndarray, shape (..., n_params)
        Layout given by ``model.param_names``; ``model_params[..., 0]`` is S0.
        All zeros outside the mask, NaN where a voxel could not be fitted.
    mask : array_like of bool, shape (...), optional
        Voxels of the fit (default: those with any non-zero parameter).
    """

    def __init__(self, model, model_params, *, mask=None):
        ReconstFit.__init__(self, model, None)
        self.model_params = model_params
        if mask is None:
            mask = np.any(np.asarray(model_params) != 0, axis=-1)
        self.mask = np.broadcast_to(np.asarray(mask, dtype=bool), self.shape)

    @property
    def shape(self):
        return self.model_params.shape[:-1]

    def __getitem__(self, index):
        # Index the voxels' positions, then take their rows: the parameter
        # axis is never indexed (``fit[..., 0]`` is the first slice of the
        # last spatial axis, as for DIPY's TensorFit).
        voxels = np.arange(self.mask.size).reshape(self.mask.shape)[index]
        rows = self.model_params.reshape(self.mask.size, -1)[voxels]
        return type(self)(self.model, rows, mask=self.mask.reshape(-1)[voxels])

    def _param(self, name):
        return self.model_params[..., self.model.param_names.index(name)]

    @property
    def S0(self):
        """Fitted signal without diffusion weighting (same units as data)."""
        return self.model_params[..., 0]

    def _per_fibre(self, name):
        """Map of ``name``: (...) where the layout has one value per voxel,
        (..., F) where it has one per fibre (``name_0``, ``name_1``, ...)."""
        names = self.model.param_names
        if name in names:
            return self._param(name)
        F = self.model.n_fibres
        if F == 0:
            return np.zeros(self.shape + (0,))
        return np.stack([self._param(f"{name}_{k}") for k in range(F)], axis=-1)

    def _direction_stack(self):
        slots = self.model._direction_slots()
        if not slots:
            return np.zeros(self.shape + (0, 3))
        return np.stack([self.model_params[..., s : s + 3] for s in slots], axis=-2)

    @property
    def n_fibres(self):
        """Fibre populations of every voxel (int array, 0 outside the mask
        and where the voxel could not be fitted)."""
        dirs = self._direction_stack()
        present = np.isfinite(dirs).all(-1).sum(-1)
        fitted = self.mask & np.isfinite(self.S0)
        return np.where(fitted, present, 0).astype(np.int64)

    @property
    def directions(self):
        """Fibre directions (..., F, 3), strongest first, as DIPY's
        ``TensorFit.directions`` (F = 1) and ``peak_dirs``: unit vectors,
        zero rows for absent fibres, outside the mask and in unfitted voxels,
        so they can seed and drive DIPY's tractography."""
        dirs = self._direction_stack()
        keep = np.isfinite(dirs).all(-1, keepdims=True) & self.mask[..., None, None]
        return np.where(keep, dirs, 0.0)

    @warning_for_keywords()
    def predict(self, gtab=None, *, S0=None):
        """Predict signals from the fitted parameters.

        Parameters
        ----------
        gtab : dipy.core.gradients.GradientTable, optional
            Acquisitions to predict (with timing where the model needs it);
            default the model's own table.
        S0 : float or array_like of shape ``self.shape``, optional
            Signal without diffusion weighting; default the fitted S0.

        Returns
        -------
        signal : ndarray, shape self.shape + (N,)
            0 outside the mask (as DIPY's fits), NaN in voxels that could not
            be fitted (non-finite data or b = 0 signal <= 0).
        """
        model = self.model
        acq = (
            model._acq
            if gtab is None
            else Acquisition.from_gtab(gtab, timing=model._needs_timing)
        )
        return model._predict_params(self.model_params, acq, S0, self.mask)
