"""Time integration of the semi-discrete Bloch-Torrey system.

A waveform is piecewise constant in time. Its time plan is a list of
:class:`Step` objects, each an interval over which the magnetisation is
advanced by one exponential ``u <- exp(-tau G) u`` of a generator ``G`` that
is constant over the step. Two frames are used:

* laboratory frame (reflecting and absorbing voxels): ``G = A + i f P`` with
  ``A`` the symmetrised diffusion operator and ``P_ia = g_a . x_i`` the phase
  rate of acquisition ``a`` at cell ``i``. ``G`` is constant on every piece of
  the waveform, so the plan is exact (no splitting error).
* phase-unwrapped frame (periodic cells): ``M = m exp(-i k(t) . x)`` turns the
  quasi-periodic condition into a periodic one, the gradient moves into phase
  factors ``exp(-i k . d)`` on the off-diagonal couplings, and ``G(k(t))`` is
  Hermitian but varies while a gradient is on. Those pieces are integrated
  with the fourth-order commutator-free Magnus scheme of Blanes and Moan
  (2006), with sub-steps sized by the phase change across one cell.

Two engines apply the exponentials:

* ``"dense"``: ``torch.linalg.matrix_exp`` of the dense generator (Pade with
  scaling and squaring; exact to rounding). Cost O(N^3) per acquisition: the
  reference for validation and tiny grids.
* ``"chebyshev"``: a Chebyshev expansion of ``exp`` applied to the state
  through sparse matrix-vector products (cost linear in the number of cells
  per product), with the degree and the number of sub-steps chosen from a
  rigorous bound on the truncation error over an ellipse containing the field
  of values of the generator (Crouzeix's (1 + sqrt 2) factor for non-normal
  generators). Back-propagation is memory bounded by checkpointing each step.

Both are differentiated exactly by torch autograd.
"""

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special

__all__ = ["Step", "time_plan", "propagate", "ENGINES"]

ENGINES = ("dense", "chebyshev")

# Blanes & Moan (2006) commutator-free 4th-order Magnus: Gauss nodes c1, c2 and
# the weights of the two exponentials (each written so its weights sum to 1
# over a half step).
_GAUSS = (0.5 - math.sqrt(3) / 6, 0.5 + math.sqrt(3) / 6)
_CF4_FIRST = (0.5 + math.sqrt(3) / 3, 0.5 - math.sqrt(3) / 3)


@dataclass(frozen=True)
class Step:
    """One exponential of a time plan.

    Attributes
    ----------
    tau : float
        Duration (us) multiplying the generator.
    amplitude : float
        Normalised gradient amplitude ``f`` (laboratory frame).
    phase_weights, phase_F : tuple of float
        Phase-unwrapped frame: the generator is ``sum_j w_j G(k_j)`` with
        ``k_j = rate * F_j`` (``F`` in us, weights summing to 1).
    """

    tau: float
    amplitude: float = 0.0
    phase_weights: tuple = ()
    phase_F: tuple = ()


def time_plan(
    durations, amplitudes, *, frame, phase_step=None, dmax=None, rate=None, substeps=1
):
    """Split a piecewise-constant waveform into exponential steps.

    Parameters
    ----------
    durations, amplitudes : ndarray
        Pieces of the waveform (us, normalised amplitude).
    frame : {"lab", "phase"}
    phase_step : float
        Phase frame only: the largest phase change (rad) across one cell
        allowed within a Magnus sub-step.
    dmax : float
        Phase frame only: longest circumcentre displacement (um).
    rate : float
        Phase frame only: largest gradient rate ``|gamma G|`` (rad/(um us)).
    substeps : int
        Phase frame only: multiplies every gradient piece's sub-step count.
        The phase criterion alone misses stiffness: on fine grids (cells
        narrower than ~3 um) one sub-step of a weak pulse erred by 0.15 in
        the signal, falling ~8x per doubling.

    Returns
    -------
    list of Step
    """
    steps = []
    F = 0.0
    for tau, f in zip(durations, amplitudes, strict=True):
        if tau <= 0:
            continue
        if frame == "lab":
            steps.append(Step(float(tau), amplitude=float(f)))
        elif f == 0.0 or rate == 0.0:
            steps.append(Step(float(tau), phase_weights=(1.0,), phase_F=(F,)))
        else:
            dphase = abs(f) * tau * rate * dmax
            n_sub = substeps * max(1, math.ceil(dphase / phase_step))
            h = tau / n_sub
            for s in range(n_sub):
                F0 = F + f * h * s
                F1, F2 = (F0 + f * h * c for c in _GAUSS)
                a, b = _CF4_FIRST
                # exp(-h(a1 G1 + a2 G2)) exp(-h(a2 G1 + a1 G2)): rightmost first.
                steps.append(Step(h / 2, phase_weights=(a, b), phase_F=(F1, F2)))
                steps.append(Step(h / 2, phase_weights=(b, a), phase_F=(F1, F2)))
        F += f * tau
    return steps


def propagate(op, steps, u, rate, *, frame, engine, tol, along=None):
    """Advance states ``u`` (B, N, A) through ``steps``.

    Parameters
    ----------
    op : DiffusionOperator
    steps : list of Step
    u : complex Tensor (B, N, A)
    rate : Tensor (A, 3)
        gamma G direction per acquisition, rad/(um us).
    frame : {"lab", "phase"}
    engine : {"dense", "chebyshev"}
    tol : float
        Truncation tolerance of the Chebyshev engine (per unit of ``|u|``).
    along : (Tensor (B, N), Tensor (B, 3)), optional
        Phase frame, cross-sections of straight fibres whose cells diffuse
        at their own rate: each cell's diffusivity (um^2/us) and each batch
        element's fibre direction. Along the fibres the magnetisation is
        ``exp(-i k_a(t) s)`` times the section's, so each cell decays at
        ``D_i k_a(t)^2`` besides its section's generator, ``k_a = (g . a) F``
        (exact for straight fibres): a diagonal that varies with the
        acquisition and, while a gradient is on, with time.
    """
    if along is not None:
        if frame != "phase":
            raise ValueError("along: cross-sections are periodic (phase frame).")
        cells, axes = along
        # D_i (rate . a)^2 (B, N, A): the decay rate per unit F^2.
        along = cells[..., None] * ((axes @ rate.T) ** 2)[:, None, :]
    if frame == "lab":
        phase_rate = op.positions @ rate.T  # (N, A)
    else:
        # (N, K, A), or (B, N, K, A) for sections at several orientations.
        proj = torch.einsum("...nkd,ad->...nka", op.displacement, rate)
        ones = torch.ones_like(proj)
        largest_proj = float(proj.abs().max()) if proj.numel() else 0.0
    plans = {}  # sub-steps of one piece share their Chebyshev plan
    for step in steps:
        spread = 0.0
        if frame == "lab":
            imag = step.amplitude * phase_rate
            factor = None
        else:
            imag = None
            # Largest phase difference between the step's nodes on any face.
            spread = (max(step.phase_F) - min(step.phase_F)) * largest_proj
            # exp(-i F proj) through torch.polar: torch.exp of a complex
            # tensor was ~100x slower on CPU (72 ms against 0.7 ms for
            # 768 x 4 x 30 phases, measured) and dominated periodic runs.
            factor = sum(
                w * torch.polar(ones, -F * proj)
                for w, F in zip(step.phase_weights, step.phase_F, strict=True)
            )
        extra = None
        if along is not None:
            # The step's generator is sum_j w_j G(F_j): its along-axis part
            # sum_j w_j F_j^2 (Gauss nodes: exact for F^2 over a piece).
            moment = sum(
                w * F * F for w, F in zip(step.phase_weights, step.phase_F, strict=True)
            )
            extra = (along * moment, along.amax((-2, -1)) * _square_spread(step))
        if engine == "dense":
            u = _dense_step(op, step.tau, imag, factor, u, extra and extra[0])
        else:
            u = _chebyshev_step(op, step, imag, factor, u, tol, spread, plans, extra)
    return u


# -- dense engine --------------------------------------------------------------
def _dense_generator(op, imag, factor):
    b, n, k = op.weights.shape
    ctype = _complex(op.diag.dtype)
    a_count = (imag if imag is not None else factor).shape[-1]
    gen = torch.diag_embed(op.diag.to(ctype))[:, None].expand(b, a_count, n, n)
    if imag is not None:
        gen = gen + 1j * torch.diag_embed(imag.T.to(ctype))[None]
    coupling = op.weights.to(ctype)[..., None]  # (B, N, K, 1)
    if factor is not None:
        coupling = coupling * factor  # (B, N, K, A)
    else:
        coupling = coupling.expand(b, n, k, a_count)
    rows = torch.arange(n, device=op.diag.device)[:, None].expand(n, k)
    off = torch.zeros(b, a_count, n, n, dtype=ctype, device=op.diag.device)
    off = off.index_put(
        (
            torch.arange(b, device=off.device)[:, None, None, None],
            torch.arange(a_count, device=off.device)[None, None, None, :],
            rows[None, :, :, None],
            op.neighbours[None, :, :, None],
        ),
        coupling,
        accumulate=True,
    )
    return gen - off


def _dense_step(op, tau, imag, factor, u, extra=None):
    gen = _dense_generator(op, imag, factor)  # (B, A, N, N)
    if extra is not None:  # (B, N, A): a diagonal per acquisition
        gen = gen + torch.diag_embed(extra.transpose(1, 2).to(gen.dtype))
    prop = torch.linalg.matrix_exp(-tau * gen)
    return torch.einsum("bamn,bna->bma", prop, u)


# -- Chebyshev engine --------------------------------------------------------------
# Largest sub-step ``tau * r`` and largest intermediate amplification allowed:
# both bound the rounding error of the three-term recurrence and the memory a
# checkpointed step needs during back-propagation. Without back-propagation
# the sub-step may be longer: the degree grows as sqrt(x) (e^-x I_k(x) ~
# exp(-k^2 / 2x)), so one long sub-step costs fewer products than many short
# ones (x = 4000: ~500 terms, against 20 x ~110 at x = 200), and its terms
# stay bounded by 1 on a real field of values.
_MAX_X = 200.0
_MAX_X_FORWARD = 4000.0
_MAX_PEAK = {torch.float64: 1e4, torch.float32: 10.0}


def _chebyshev_step(op, step, imag, factor, u, tol, spread=0.0, plans=None, extra=None):
    if extra is not None:
        # A diagonal per acquisition (B, N, A) moves the field of values by
        # its range; the plan is this step's own.
        op = _Diagonal(op, extra)
        plans = None
    n_sub, r_t, zdiag, zweights, coeffs = _cached_plan(
        op, step, imag, u, tol, spread, {} if plans is None else plans
    )
    if imag is not None:
        z = _LabZ(imag[None] / r_t[..., None], op.neighbours)
    else:
        z = _PhaseZ(factor, op.neighbours)
    for _ in range(n_sub):
        u = _ChebyshevExp.apply(u, zdiag, zweights, z, coeffs)
    return u


def _square_spread(step):
    """``|F_1^2 - F_2^2|`` of a two-node step (0 for one node): how much the
    along-axis diagonals of its two generators differ per unit rate."""
    if len(step.phase_F) != 2:
        return 0.0
    first, second = step.phase_F
    return abs(first * first - second * second)


class _Diagonal:
    """``op`` whose diagonal holds a part per acquisition: ``diag`` is
    (B, N, A); the Gershgorin bounds take its range over the acquisitions.
    ``spread`` (B,) bounds the difference of that part between a Magnus
    step's two generators (:func:`_field_of_values`)."""

    def __init__(self, op, extra):
        extra, spread = extra
        self.spread = spread.detach()
        self.op = op
        self.diag = op.diag[..., None] + extra
        self.weights = op.weights

    def __getattr__(self, name):  # neighbours, displacement, ...: the op's
        return getattr(self.op, name)

    def spectral_bounds(self, offdiag_scale=1.0):
        radius = offdiag_scale * self.weights.abs().sum(-1)[..., None]
        lo = (self.diag - radius).amin((-2, -1))
        hi = (self.diag + radius).amax((-2, -1))
        return lo.detach(), hi.detach()


def _cached_plan(op, step, imag, u, tol, spread, plans):
    """Sub-steps, radius (B, 1), scaled generator parts and Chebyshev
    coefficients of a step; the sub-steps of one piece (same length, weights
    and node spread) share them, built once."""
    grad = torch.is_grad_enabled() and (
        u.requires_grad or op.weights.requires_grad or op.diag.requires_grad
    )
    key = (step.tau, step.phase_weights, spread, step.amplitude, grad)
    if imag is None and key in plans:
        return plans[key]
    lo, hi = _field_of_values(op, step, imag, spread)
    imag_extent = 0.0 if imag is None else float(imag.abs().max())
    # Z = (G - centre) / radius maps the field of values [lo, hi] x i[-s, s]
    # into [-1, 1] x i[-s/r, s/r]; the plan expands about centre = lo + r.
    # The radius is at least the gradient term's extent s: with impermeable
    # membranes and a reflecting wall the real extent hi - lo is 0, and a
    # radius of 0 would overflow the recurrence (it hung, then gave NaN).
    half = 0.5 * (hi - lo)
    radius = np.maximum(np.maximum(half, imag_extent), 1e-300)
    centre = np.where(radius > half, lo + radius, 0.5 * (lo + hi))
    n_sub, coeffs = _chebyshev_plan(
        step.tau,
        lo,
        radius,
        imag_extent,
        tol,
        _MAX_PEAK[op.diag.dtype],
        max_x=_MAX_X if grad else _MAX_X_FORWARD,
    )
    rdt = op.diag.dtype
    r_t = torch.as_tensor(radius, dtype=rdt, device=u.device)[:, None]
    c_t = torch.as_tensor(centre, dtype=rdt, device=u.device)[:, None]
    coeffs = tuple(
        torch.as_tensor(c, dtype=u.dtype, device=u.device)[:, None, None]
        for c in coeffs
    )
    # zdiag (B, N) or (B, N, A) and zweights (B, N, K): the generator scaled
    # to [-1, 1].
    scale = r_t if op.diag.dim() == 2 else r_t[..., None]
    centre_t = c_t if op.diag.dim() == 2 else c_t[..., None]
    zdiag = (op.diag - centre_t) / scale
    plan = (n_sub, r_t, zdiag, op.weights / r_t[..., None], coeffs)
    if imag is None:
        plans[key] = plan
    return plan


def _field_of_values(op, step, imag, spread):
    """Interval (lo, hi) per batch holding the real part of the field of values.

    Gershgorin's discs of ``G = sum_j w_j G(k_j)`` with the off-diagonal
    moduli scaled by ``sum |w_j|``. For the Magnus exponentials (two weights
    summing to 1, one negative) that lower bound is far below the truth,
    ``-(sum |w_j| - 1)`` times a row sum, and its growth factor ``e^{-tau lo}``
    forced thousands of sub-steps on stiff grids (small cells, long pieces).
    Weyl's inequality gives a sharper one: with ``G(k) >= 0``,
    ``G = (G1 + G2) / 2 + (w1 - w2) / 2 (G1 - G2)``, and ``G1 - G2`` has
    off-diagonal entries ``W_ij (e^{-i phi1} - e^{-i phi2})`` of modulus at most
    ``W_ij min(2, spread)``, so ``lo >= -|w1 - w2| / 2 min(2, spread) max_i
    sum_j |W_ij|``.
    """
    offdiag_scale = 1.0
    if imag is None:
        offdiag_scale = float(sum(abs(w) for w in step.phase_weights))
    lo, hi = op.spectral_bounds(offdiag_scale=offdiag_scale)
    if imag is None and len(step.phase_weights) == 2:
        w1, w2 = step.phase_weights
        rows = op.weights.detach().abs().sum(-1).amax(-1)
        weyl = -0.5 * abs(w1 - w2) * min(2.0, spread) * rows
        if isinstance(op, _Diagonal):
            # The along-axis diagonals of G1 and G2 differ too.
            weyl = weyl - 0.5 * abs(w1 - w2) * op.spread
        lo = torch.maximum(lo, weyl.to(lo.dtype))
    return lo.cpu().numpy().astype(float), hi.cpu().numpy().astype(float)


class _ChebyshevExp(torch.autograd.Function):
    """``y = sum_k c_k T_k(Z) u`` with an exact adjoint (no stored graph).

    Backward, with ``ybar`` the incoming gradient: ``beta_j = sum_{n > j} c_n
    U_{n-1-j}(Z^H) ybar`` by a Clenshaw recurrence; then ``grad u = c_0 ybar
    + Z^H beta_0 - beta_1`` and, from ``dT_n[E] = sum_{j<n} g_j U_{n-1-j}(Z)
    E T_j(Z)`` (g_0 = 1, g_j = 2), the parameter gradient is ``Re sum_j g_j
    <beta_j, dZ t_j>``. The forward terms ``t_j`` are recomputed during the
    backward pass, so memory holds one step's terms only while it runs.

    ``coeffs`` are complex tensors (B, 1, 1), one per degree.
    """

    @staticmethod
    def forward(ctx, u, zdiag, zweights, z, coeffs):
        ctx.z, ctx.coeffs = z, coeffs
        ctx.save_for_backward(u)
        z.bind(zdiag, zweights)
        out = coeffs[0] * u
        for c, t in zip(coeffs[1:], _chebyshev_terms(z, u, len(coeffs)), strict=False):
            out.addcmul_(c, t)
        return out

    @staticmethod
    def backward(ctx, ybar):
        (u,) = ctx.saved_tensors
        z, coeffs = ctx.z, ctx.coeffs
        m = len(coeffs) - 1
        terms = [u] + list(_chebyshev_terms(z, u, m + 1))
        z.start_gradients()
        beta_next2 = torch.zeros_like(ybar)
        beta_next = coeffs[m] * ybar  # beta_{m-1}
        for j in range(m - 1, -1, -1):
            if j < m - 1:
                beta = z.recur(beta_next, beta_next2, adjoint=True)
                beta.addcmul_(coeffs[j + 1], ybar)
                beta_next2, beta_next = beta_next, beta
            z.accumulate(beta_next, terms[j], 1.0 if j == 0 else 2.0)
        # grad u = c_0 ybar + Z^H beta_0 - beta_1
        grad_u = z.apply(beta_next, adjoint=True).sub_(beta_next2)
        grad_u.addcmul_(coeffs[0], ybar)
        grad_d, grad_w = z.gradients()
        return grad_u, grad_d, grad_w, None, None


def _chebyshev_terms(z, u, count):
    """Yield ``T_1(Z) u, ..., T_{count-1}(Z) u``."""
    if count < 2:
        return
    t_prev, t_cur = u, z.apply(u)
    yield t_cur
    for _ in range(count - 2):
        t_prev, t_cur = t_cur, z.recur(t_cur, t_prev)
        yield t_cur


def _real_rows(v):
    """(B, N, A) complex -> (B N, 2A) real view (no copy)."""
    b, n, a = v.shape
    return torch.view_as_real(v).reshape(b * n, 2 * a)


class _PhaseZ:
    """``Z v = zdiag v - sum_k W_k Phi_k v[nbr_k]`` with complex phases (Hermitian).

    The coupling is applied one neighbour slot at a time (``index_select``
    then ``addcmul_`` on (B, N, A) arrays): gathering all K slots into one
    (B, N, K, A) array and summing over K was 3-10x slower (strided
    reduction, 2 cores, 768 cells, measured).
    """

    def __init__(self, factor, neighbours):
        # factor (N, K, A) or (B, N, K, A) -> one (.., N, A) array per slot.
        self.factor = [factor[..., k, :] for k in range(factor.shape[-2])]
        self.slots = [neighbours[:, k].contiguous() for k in range(len(self.factor))]

    def bind(self, zdiag, zweights):
        # (B, N) -> (B, N, 1); a diagonal per acquisition stays (B, N, A).
        self.per_acquisition = zdiag.dim() == 3
        self.zdiag = (
            zdiag.detach() if self.per_acquisition else zdiag.detach()[..., None]
        )
        self.zweights = zweights.detach()
        self.coupling = [
            (self.zweights[..., k, None] * f).contiguous()
            for k, f in enumerate(self.factor)
        ]  # K x (B, N, A)

    def _combine(self, out, v, alpha):
        # out + alpha * sum_k W_k Phi_k v[nbr_k], in place.
        for c, idx in zip(self.coupling, self.slots, strict=True):
            out.addcmul_(c, v.index_select(1, idx), value=alpha)
        return out

    def apply(self, v, adjoint=False):  # Hermitian: Z^H = Z
        return self._combine(self.zdiag * v, v, -1.0)

    def recur(self, t, t_prev, adjoint=False):
        return self._combine((2.0 * self.zdiag) * t - t_prev, t, -2.0)

    def start_gradients(self):
        like = self.zdiag if self.per_acquisition else self.zweights[..., 0]
        self.grad_d = torch.zeros_like(like)
        self.grad_w = torch.zeros_like(self.zweights)

    def accumulate(self, beta, t, weight):
        # Re <beta, dZ t>: dZ = d(zdiag) on the diagonal, -d(W) Phi off it.
        b, n, a = t.shape
        conj = beta.conj()
        if self.per_acquisition:
            self.grad_d += weight * (conj * t).real
        else:
            rows = (_real_rows(beta) * _real_rows(t)).sum(-1)
            self.grad_d += weight * rows.view(b, n)
        for k, (f, idx) in enumerate(zip(self.factor, self.slots, strict=True)):
            prod = (conj * f * t.index_select(1, idx)).real.sum(-1)
            self.grad_w[..., k] -= weight * prod

    def gradients(self):
        return self.grad_d, self.grad_w


class _LabZ:
    """``Z v = (zdiag + i zimag) v - W v[nbr]`` with the coupling as one CSR product.

    ``v`` is complex (B, N, A). The coupling is real and symmetric, so it acts
    alike on the real and imaginary parts: one sparse product of the
    (B N, 2A) real view, block diagonal over the batch, fused with the
    diagonal part through ``addmm``.
    """

    def __init__(self, zimag, neighbours):
        self.zimag = zimag  # (B or 1, N, A), constant
        self.neighbours = neighbours
        # CSR wants sorted columns within a row; padding repeats the cell
        # itself with zero weight, which the sort keeps harmless.
        self.order = torch.argsort(neighbours, dim=1, stable=True)
        self.sorted_nbr = torch.gather(neighbours, 1, self.order)

    def bind(self, zdiag, zweights):
        self.zdiag = zdiag.detach()
        self.zweights = zweights.detach()
        b, n, k = self.zweights.shape
        dev = zdiag.device
        offset = (torch.arange(b, device=dev) * n)[:, None, None]
        cols = (self.sorted_nbr[None] + offset).reshape(-1)
        values = torch.gather(self.zweights, 2, self.order.expand(b, n, k))
        crow = torch.arange(0, b * n * k + 1, k, device=dev)
        with warnings.catch_warnings():
            # Beta-API and invariant-check notices, once per step: not for users.
            warnings.filterwarnings("ignore", "Sparse CSR tensor support")
            warnings.filterwarnings("ignore", "Sparse invariant checks")
            self.csr = torch.sparse_csr_tensor(
                crow, cols, values.reshape(-1), size=(b * n, b * n)
            )
        zc = self.zdiag[..., None] + 1j * self.zimag
        self.diag = {False: zc, True: zc.conj()}
        self.diag2 = {False: 2.0 * zc, True: 2.0 * zc.conj()}

    def _finish(self, partial, v, alpha):
        # partial + alpha * W v, computed in place on partial's real view.
        rows = _real_rows(partial)
        torch.addmm(rows, self.csr, _real_rows(v), alpha=alpha, out=rows)
        return partial

    def apply(self, v, adjoint=False):
        return self._finish(self.diag[adjoint] * v, v, -1.0)

    def recur(self, t, t_prev, adjoint=False):
        """``2 Z t - t_prev`` in three kernels and one new array (negating
        ``t_prev`` first for one ``addcmul`` made two: 15-25 % slower)."""
        partial = torch.mul(self.diag2[adjoint], t).sub_(t_prev)
        return self._finish(partial, t, -2.0)

    def start_gradients(self):
        b, n, k = self.zweights.shape
        self.grad_d = torch.zeros(
            b * n, dtype=self.zdiag.dtype, device=self.zdiag.device
        )
        self.pairs = None

    def accumulate(self, beta, t, weight):
        # Re <beta, dZ t>: dZ = d(zdiag) on the diagonal, -dW off it.
        beta_r, t_r = _real_rows(beta), _real_rows(t)
        self.grad_d.add_((beta_r * t_r).sum(-1), alpha=weight)
        # Sampled dense-dense product on the coupling pattern: the dot products
        # beta_i . t_j for coupled (i, j) only, accumulated in the CSR values.
        base = self.csr if self.pairs is None else self.pairs
        self.pairs = torch.sparse.sampled_addmm(
            base,
            beta_r,
            t_r.T,
            beta=0.0 if self.pairs is None else 1.0,
            alpha=-weight,
        )

    def gradients(self):
        b, n, k = self.zweights.shape
        grad_w = torch.zeros_like(self.zweights)
        values = self.pairs.values().view(b, n, k)
        grad_w.scatter_(2, self.order.expand(b, n, k), values)
        return self.grad_d.view(b, n), grad_w


def _chebyshev_plan(tau, lo, radius, imag_extent, tol, max_peak, max_x=_MAX_X):
    """Sub-steps and coefficients (degree + 1, B) for ``exp(-tau G)``.

    The generator's field of values lies in ``[lo, lo + 2r] x i[-s, s]``. In
    ``Z = (G - c) / r`` that is the rectangle ``[-1, 1] x i[-s/r, s/r]``,
    inside the Bernstein ellipse ``E_rho`` through its corners. With
    ``exp(-x z) = I_0(x) + 2 sum_k (-1)^k I_k(x) T_k(z)`` and
    ``|T_k| <= rho^k`` on ``E_rho``, the truncation error of one sub-step is
    bounded by ``(1 + sqrt 2) e^{-tau lo} sum_{k > m} 2 I_k(x) e^{-x} rho^k``.
    """
    b_rel = float(np.max(imag_extent / radius))
    rho = _bernstein_rho(b_rel)
    crouzeix = 1.0 if b_rel == 0 else 1.0 + math.sqrt(2.0)
    x_total = tau * radius
    n_sub = max(1, math.ceil(float(x_total.max()) / max_x))
    while True:
        x = x_total / n_sub  # (B,)
        growth = np.exp(-tau / n_sub * lo)  # e^{-tau lo}, > 1 if lo < 0
        allowed = tol / n_sub / crouzeix
        terms, remainder = _bessel_terms(x, growth, rho, 1e-3 * allowed)
        k = np.arange(len(terms))
        weighted = _weights(terms, k, rho)
        if weighted.max() <= max_peak or n_sub >= 4096:
            break
        n_sub *= 2
    # tail[k] = sum_{j >= k} of the weights, the uncomputed remainder included.
    tail = np.cumsum(weighted[::-1], axis=0)[::-1] + remainder
    ok = np.all(tail <= allowed, axis=1)
    degree = int(np.argmax(ok)) if ok.any() else len(terms) - 1
    degree = max(degree - 1, 1)  # last kept index: terms beyond are below tol
    sign = (-1.0) ** k[: degree + 1, None]
    coeffs = sign * terms[: degree + 1] * np.where(k[: degree + 1, None] > 0, 2.0, 1.0)
    return n_sub, coeffs


def _bessel_terms(x, growth, rho, negligible):
    """``I_k(x) e^{-x} growth`` (K, B) for k = 0 .. K - 1 and a bound (B,) on
    the rest of the plan's weights, ``sum_{k >= K} 2 I_k(x) e^{-x} growth
    rho^k``, with K just large enough for that bound to be below
    ``negligible`` (or 4000 terms).

    The bound is rigorous: ``I_{k+1}(x) / I_k(x) < x / (2 (k + 1))`` (from
    ``I_k - I_{k+2} = 2 (k + 1) I_{k+1} / x`` and ``I_{k+2} > 0``), so beyond
    K the weights fall faster than a geometric series of ratio
    ``q = rho x / (2 K)``. Bessel functions of high order are the plan's
    cost (``scipy.special.ive``, about 0.5 us each); the fixed order
    ``60 + 3 rho x + 40 sqrt(x)`` used before was about three times more
    than the steps of a label search need, and the plan took 11 % of the
    search's time (profiled).
    """
    x_max = float(x.max())
    count = int(30 + rho * x_max + 10 * math.sqrt(x_max))
    parts, start = [], 0
    while True:
        k = np.arange(start, count)
        parts.append(special.ive(k[:, None], x[None]) * growth)
        q = rho * x / (2.0 * count)
        last = _weights(parts[-1][-1:], np.array([count - 1]), rho)[0]
        with np.errstate(divide="ignore", invalid="ignore"):  # q >= 1: no bound
            remainder = np.where(q < 1, last * q / (1 - q), np.inf)
        if np.all(remainder <= negligible) or count >= 4000:
            return np.concatenate(parts), remainder
        start, count = count, min(4000, count + count // 2)


def _weights(terms, k, rho):
    """``2 terms rho^k`` (K, B) for orders ``k`` (K,), in logarithms: rho^k
    overflows at k of a few hundred where the terms have underflowed to 0
    (0 x inf would be NaN)."""
    with np.errstate(divide="ignore"):
        return 2.0 * np.exp(np.log(terms) + k[:, None] * math.log(rho))


def _bernstein_rho(b):
    """Smallest rho whose Bernstein ellipse contains [-1, 1] x i[-b, b]."""
    if b == 0:
        return 1.0
    z = complex(1.0, b)
    w = z + np.sqrt(z * z - 1.0)
    return max(abs(w), 1.0 / abs(w))


def _complex(dtype):
    return torch.complex128 if dtype == torch.float64 else torch.complex64
