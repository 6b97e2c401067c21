"""Batched variable-projection fitting of multi-compartment signals.

A model's signal is ``Phi(x) c``: columns ``Phi`` (one per compartment, each 1
at b = 0) that depend nonlinearly on parameters ``x``, weighted by linear
volume fractions ``c >= 0`` (times S0). For every voxel at once:

1. ``c`` is eliminated: given ``x``, it is the exact non-negative least
   squares (NNLS) solution, found by enumerating the 2^K supports of the K
   (<= 8) columns and solving each small normal-equation system with an
   unrolled Cholesky factorisation (vectorised over voxels and supports).
2. ``x`` is refined by Levenberg-Marquardt on the projected residual
   ``y - Phi(x) c(x)`` with Kaufman's Jacobian ``(I - P_A) dPhi/dx c``
   (``P_A`` the projector on the active columns), ``dPhi/dx`` by forward
   differences of one batched evaluation. Each voxel keeps its own damping
   and stops on its own.

Bounds are enforced by reparametrisation (``lower + (upper - lower)
sigmoid(u)``, on a log scale where asked) and directions are unconstrained
3-vectors normalised inside the model, so the optimiser is unconstrained.

References
----------
Golub and Pereyra, SIAM J. Numer. Anal. 10, 413 (1973) (variable projection).
Kaufman, BIT 15, 49 (1975) (the simplified Jacobian).
Lawson and Hanson, Solving Least Squares Problems (1974) (NNLS).
"""

import functools
import math
import threading
import warnings
from dataclasses import dataclass

import torch

__all__ = [
    "Bound",
    "nnls",
    "nnls_gram",
    "projected",
    "levenberg_marquardt",
    "joint_levenberg_marquardt",
]

#: The precision of every compartment fit (the solvers, starts and learned
#: polish): variable projection's normal equations need double precision.
DTYPE = torch.float64
# Supports are enumerated, so the number of linear columns is capped.
MAX_COLUMNS = 8
# Relative ridge on the normal equations: columns of a model can coincide
# (e.g. a zeppelin with d_perp = d_par is a ball), which would make them
# singular; 1e-12 of the Gram diagonal changes no fraction measurably.
_RIDGE = 1e-12
# Relative forward-difference step in the unconstrained parameters, ~sqrt(eps)
# of double precision.
_FD_STEP = 1e-7
_TINY = 1e-300


@dataclass(frozen=True)
class Bound:
    """A bounded nonlinear parameter, in internal units.

    Parameters
    ----------
    name : str
    lower, upper : float
        The open interval the parameter lives in.
    log : bool, optional
        Map on a log scale (for parameters spanning decades; lower > 0).
    """

    name: str
    lower: float
    upper: float
    log: bool = False

    def __post_init__(self):
        if not self.lower < self.upper:
            raise ValueError(
                f"bounds of {self.name}: need lower < upper, got "
                f"({self.lower}, {self.upper})"
            )
        if self.log and self.lower <= 0:
            raise ValueError(f"bounds of {self.name}: a log scale needs lower > 0")

    def _ends(self):
        if self.log:
            return math.log(self.lower), math.log(self.upper)
        return self.lower, self.upper

    def value(self, u):
        """Parameter from the unconstrained variable u."""
        lo, hi = self._ends()
        v = lo + (hi - lo) * torch.sigmoid(u)
        return torch.exp(v) if self.log else v

    def slope(self, u):
        """Derivative of :meth:`value` with respect to u."""
        lo, hi = self._ends()
        s = torch.sigmoid(u)
        d = (hi - lo) * s * (1.0 - s)
        return d * self.value(u) if self.log else d

    def unconstrained(self, value):
        """Inverse of :meth:`value` (values are clipped inside the bounds)."""
        lo, hi = self._ends()
        # Clipped before the log: a value <= 0 of a log-scale parameter
        # (e.g. a start from outside the model) maps to the lower bound.
        value = torch.as_tensor(value, dtype=torch.float64)
        value = value.clamp(self.lower, self.upper)
        v = torch.log(value) if self.log else value
        p = ((v - lo) / (hi - lo)).clamp(1e-6, 1.0 - 1e-6)
        return torch.logit(p)


# --------------------------------------------------------------------------
# Small batched linear algebra
# --------------------------------------------------------------------------
def solve_spd(A, b):
    """Solve ``A x = b`` for many tiny symmetric positive definite systems.

    An unrolled Cholesky factorisation: K^3 / 6 elementwise tensor operations,
    each over the whole batch, which for K <= 8 is far faster than a batched
    LAPACK call on millions of 2 x 2 or 3 x 3 systems.

    Parameters
    ----------
    A : torch.Tensor, shape (..., K, K)
    b : torch.Tensor, shape (..., K)
        Broadcast against A's batch shape.

    Returns
    -------
    x : torch.Tensor, shape (..., K)
    """
    K = A.shape[-1]
    L = {}
    for j in range(K):
        s = A[..., j, j] - sum((L[j, k] ** 2 for k in range(j)), 0.0)
        L[j, j] = torch.sqrt(s.clamp_min(_TINY))
        for i in range(j + 1, K):
            s = A[..., i, j] - sum((L[i, k] * L[j, k] for k in range(j)), 0.0)
            L[i, j] = s / L[j, j]
    z = []
    for i in range(K):
        s = b[..., i] - sum((L[i, k] * z[k] for k in range(i)), 0.0)
        z.append(s / L[i, i])
    x = [None] * K
    for i in reversed(range(K)):
        s = z[i] - sum((L[k, i] * x[k] for k in range(i + 1, K)), 0.0)
        x[i] = s / L[i, i]
    return torch.stack(torch.broadcast_tensors(*x), dim=-1)


@functools.lru_cache(maxsize=16)
def _supports(K):
    """All 2^K subsets of K columns as a (2^K, K) 0/1 float64 tensor."""
    idx = torch.arange(2**K)[:, None]
    return ((idx >> torch.arange(K)) & 1).to(torch.float64)


def nnls_gram(G, h):
    """Non-negative least squares from the normal equations, exactly.

    Minimises ``c^T G c - 2 c^T h`` over ``c >= 0`` by trying every support:
    the optimum is the unconstrained solution on its own support, so it is the
    feasible support solution of least cost.

    Parameters
    ----------
    G : torch.Tensor, shape (..., K, K)
        Gram matrices ``Phi^T Phi`` (positive semi-definite).
    h : torch.Tensor, shape (..., K)
        ``Phi^T y``; broadcast against G.

    Returns
    -------
    c : torch.Tensor, shape (..., K)
        Non-negative coefficients.
    """
    K = G.shape[-1]
    if K > MAX_COLUMNS:
        raise ValueError(f"nnls supports at most {MAX_COLUMNS} columns, got {K}")
    S = _supports(K).to(G.dtype)
    scale = torch.diagonal(G, dim1=-2, dim2=-1).amax(-1, keepdim=True)
    ridge = _RIDGE * scale[..., None, :] * torch.eye(K, dtype=G.dtype)
    Gs = (G + ridge)[..., None, :, :] * S[:, :, None] * S[:, None, :]
    Gs = Gs + torch.diag_embed(1.0 - S)
    hs = h[..., None, :] * S
    c = solve_spd(Gs, hs)  # (..., 2^K, K)
    # c on the support minimises the quadratic there, where its value is -c.h.
    value = -(c * hs).sum(-1)
    tol = 1e-10 * c.abs().amax(-1, keepdim=True)
    feasible = (c >= -tol).all(-1)
    value = torch.where(feasible, value, torch.full_like(value, math.inf))
    best = value.argmin(-1, keepdim=True)
    c = torch.take_along_dim(c, best[..., None], dim=-2)[..., 0, :]
    return c.clamp_min(0.0)


def nnls(Phi, y):
    """Batched NNLS, ``argmin_{c >= 0} |y - Phi c|``.

    Parameters
    ----------
    Phi : torch.Tensor, shape (..., M, K)
    y : torch.Tensor, shape (..., M)

    Returns
    -------
    c : torch.Tensor, shape (..., K)
    """
    G = Phi.mT @ Phi
    h = (Phi.mT @ y[..., None])[..., 0]
    return nnls_gram(G, h)


def projected(Phi, y):
    """NNLS coefficients, residuals and costs (sums of squares) of the
    variable projection.

    Parameters
    ----------
    Phi : torch.Tensor, shape (..., M, K)
        The design: K compartment signals at M acquisitions.
    y : torch.Tensor, shape (..., M)
        The measured signals.

    Returns
    -------
    c : torch.Tensor, shape (..., K)
        The non-negative coefficients.
    r : torch.Tensor, shape (..., M)
        The residuals ``y - Phi c``.
    cost : torch.Tensor, shape (...)
        The residual sums of squares.
    """
    c = nnls(Phi, y)
    r = y - (Phi @ c[..., None])[..., 0]
    return c, r, (r**2).sum(-1)


# --------------------------------------------------------------------------
# Levenberg-Marquardt on the projected residual
# --------------------------------------------------------------------------
def forward_differences(columns, x, Phi, c):
    """``d(Phi c)/dx`` with c fixed, by forward differences, shape (B, M, P).

    All P perturbed parameter vectors of all voxels go through ``columns`` in
    one batch.
    """
    B, P = x.shape
    M, K = Phi.shape[-2:]
    h = fd_steps(x)
    xs = x[:, None, :] + torch.diag_embed(h)
    Phis = columns(xs.reshape(B * P, P)).reshape(B, P, M, K)
    dmodel = ((Phis - Phi[:, None]) @ c[:, None, :, None])[..., 0] / h[..., None]
    return dmodel.mT


# Set once torch's forward mode has been set up in this process (see
# forward_mode); the lock serialises its calls.
_FORWARD_MODE_READY = threading.Event()
_FORWARD_MODE_LOCK = threading.Lock()


def _tangents(model, x, basis):
    return torch.func.vmap(lambda v: torch.func.jvp(model, (x,), (v,))[1])(basis)


def forward_mode(columns, x, Phi, c):
    """``d(Phi c)/dx`` with c fixed, by forward-mode autodiff, shape (B, M, P).

    One ``torch.func.jvp`` per parameter, vectorised over the P tangents with
    ``vmap``: the primal computation runs once and only the (cheap)
    tangent arithmetic is repeated, which pays off when the columns contain
    an expensive primitive with a hand-written derivative (the Watson
    integral).
    """
    B, P = x.shape
    c = c[..., None]

    def model(x):
        return (columns(x) @ c)[..., 0]

    basis = torch.eye(P, dtype=x.dtype)[:, None, :].expand(P, B, P)

    # torch's forward-mode levels are process-wide: two threads (the chunks
    # of one fit) inside jvp at once fail ("invalid forward AD level"), so
    # one at a time; the rest of their iterations still overlaps.
    with _FORWARD_MODE_LOCK:
        if _FORWARD_MODE_READY.is_set():
            out = _tangents(model, x, basis)
        else:
            with warnings.catch_warnings():
                # torch's forward-mode setup calls its own deprecated
                # torch.jit.script on first use; nothing the caller can act
                # on. Only the first call filters (under the lock):
                # catch_warnings swaps the process's filter list.
                warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated")
                out = _tangents(model, x, basis)
            _FORWARD_MODE_READY.set()
    return out.permute(1, 2, 0)


def fd_steps(x):
    """Forward-difference steps for unconstrained parameters x."""
    return _FD_STEP * (1.0 + x.abs())


def _kaufman_jacobian(D, Phi, c):
    """``((I - P_A) D)^T``: Kaufman's variable-projection Jacobian,
    transposed, shape (B, P, M).

    ``D = d(Phi c)/dx`` at fixed c; ``P_A`` projects on the active columns
    (those with c > 0), which the linear solve re-fits anyway. Built in the
    (B, P, M) layout the models' derivatives come in (rows of M contiguous
    values): the products and the subtraction then stream through
    contiguous memory instead of (B, M, P) views (a third of the cost of the
    Jacobian at B = 1024, measured).
    """
    K = Phi.shape[-1]
    active = (c > 0).to(Phi.dtype)
    PhiA = Phi * active[:, None, :]
    G = PhiA.mT @ PhiA + torch.diag_embed(1.0 - active)
    ridge = _RIDGE * torch.diagonal(G, dim1=-2, dim2=-1).amax(-1)
    G = G + ridge[:, None, None] * torch.eye(K, dtype=Phi.dtype)
    Dt = D.mT
    coef = solve_spd(G[:, None], Dt @ PhiA)  # (B, P, K)
    # Dt - coef PhiA^T in one pass (the product has an inner size of K).
    return torch.baddbmm(Dt, coef, PhiA.mT, alpha=-1.0)


def _rows(t, idx, every):
    """Rows ``idx`` of t; t itself when they are all of them (no copy)."""
    return t if every else t[idx]


def _keep_accepted(accept, new, old, idx, every):
    """``old`` with the rows ``idx[accept]`` replaced by ``new[accept]``.

    With every voxel active (the first iterations, and all of a short
    polish) one ``torch.where`` pass replaces the boolean gather and
    scatter."""
    if every:
        return torch.where(accept.view(-1, *([1] * (new.dim() - 1))), new, old)
    old[idx[accept]] = new[accept]
    return old


def _keep_steps(accept, idx, every, new, old):
    """:func:`_keep_accepted` for each pair of ``new`` and ``old`` tensors."""
    return [
        _keep_accepted(accept, n, o, idx, every) for n, o in zip(new, old, strict=True)
    ]


def levenberg_marquardt(
    columns,
    y,
    x0,
    *,
    max_iter=60,
    ftol=1e-7,
    renormalise=None,
    derivatives=None,
    lam0=1e-2,
    columns_and_jacobian=None,
):
    """Fit ``y ~ Phi(x) c`` for a batch of voxels; c by NNLS, x by LM.

    Parameters
    ----------
    columns : callable
        ``columns(x)`` maps unconstrained parameters (B, P) to columns
        (B, M, K).
    y : torch.Tensor, shape (B, M)
        Signals (normalised by S0 so that ``c`` are about fractions).
    x0 : torch.Tensor, shape (B, P)
        Starting points.
    max_iter : int, optional
        Iterations (each voxel stops earlier when converged).
    ftol : float, optional
        A voxel stops when an accepted step lowers its cost by less than
        ``ftol`` relative, or when its damping exceeds 1e10.
    renormalise : callable, optional
        Applied to every trial point (e.g. to rescale direction vectors, on
        which ``columns`` does not depend, or to cap parameters).
    derivatives : callable, optional
        ``derivatives(x, Phi, c)`` -> ``d(Phi c)/dx`` at fixed c, (B, M, P);
        default :func:`forward_differences` of ``columns``.
    lam0 : float, optional
        Initial damping (relative to the diagonal of J^T J).
    columns_and_jacobian : callable, optional
        ``columns_and_jacobian(x)`` -> ``(columns(x), jacobian)`` with
        ``jacobian(c)`` = ``derivatives(x, columns(x), c)``, for models whose
        derivatives evaluate the columns anyway: used at the start, where
        both are needed at the same point (one evaluation of the model
        instead of two, of three in all for a one-iteration polish).

    Returns
    -------
    x : torch.Tensor, shape (B, P)
    c : torch.Tensor, shape (B, K)
    cost : torch.Tensor, shape (B,)
        Sum of squared residuals.
    """
    if derivatives is None:

        def derivatives(x, Phi, c):
            return forward_differences(columns, x, Phi, c)

    x = x0.clone()
    start_jacobian = None
    if columns_and_jacobian is None:
        Phi = columns(x)
    else:
        Phi, start_jacobian = columns_and_jacobian(x)
    c, r, cost = projected(Phi, y)
    B, P = x.shape
    # Transposed Jacobians (B, P, M), made at the first iteration.
    Jt = None
    lam = torch.full((B,), float(lam0), dtype=y.dtype)
    stale = torch.ones(B, dtype=torch.bool)  # Jacobian to (re)compute
    active = torch.isfinite(cost)
    for it in range(max_iter):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        every = idx.numel() == B
        redo = idx[stale[idx]]
        if redo.numel() == B:
            D = derivatives(x, Phi, c) if start_jacobian is None else start_jacobian(c)
            Jt = _kaufman_jacobian(D, Phi, c)
        elif redo.numel():
            if Jt is None:
                Jt = torch.zeros(B, P, y.shape[-1], dtype=y.dtype)
            D = derivatives(x[redo], Phi[redo], c[redo])
            Jt[redo] = _kaufman_jacobian(D, Phi[redo], c[redo])
        stale[redo] = False
        start_jacobian = None  # x has moved on
        Ji = _rows(Jt, idx, every)
        A = Ji @ Ji.mT
        g = (Ji @ _rows(r, idx, every)[..., None])[..., 0]
        x_new = _rows(x, idx, every) + _marquardt_step(A, g, _rows(lam, idx, every))
        if renormalise is not None:
            x_new = renormalise(x_new)
        Phi_new = columns(x_new)
        c_new, r_new, cost_new = projected(Phi_new, _rows(y, idx, every))
        accept = _judge_steps(idx, cost_new, cost, lam, active, ftol)
        x, c, cost = _keep_steps(
            accept, idx, every, (x_new, c_new, cost_new), (x, c, cost)
        )
        if it < max_iter - 1:
            # Columns and residuals are read by later iterations only.
            Phi, r = _keep_steps(accept, idx, every, (Phi_new, r_new), (Phi, r))
            stale[idx[accept]] = True
    return x, c, cost


def _marquardt_step(A, g, lam):
    """Solve ``(A + lam (diag A + floor)) dx = g`` per voxel.

    Marquardt scaling plus a floor, so that a parameter the data do not
    constrain (zero column) still gets a finite, small step.
    """
    diag = torch.diagonal(A, dim1=-2, dim2=-1)
    floor = 1e-9 * diag.amax(-1, keepdim=True) + _TINY
    return solve_spd(A + torch.diag_embed(lam[:, None] * (diag + floor)), g)


def _judge_steps(idx, cost_new, cost, lam, active, ftol):
    """Steps that lower the cost (mask over ``idx``); updates the damping.

    Accepted steps relax ``lam`` by 5, rejected ones raise it by 10; a voxel
    stops when an accepted step gains less than ``ftol`` (relative) or its
    damping passes 1e10. ``lam`` and ``active`` change in place; the
    caller stores the accepted values.
    """
    accept = cost_new < cost[idx]
    gain = (cost[idx] - cost_new) / cost[idx].clamp_min(_TINY)
    lam[idx[accept]] = (lam[idx[accept]] * 0.2).clamp_min(1e-12)
    lam[idx[~accept]] *= 10.0
    done = (accept & (gain < ftol)) | (lam[idx] > 1e10)
    active[idx[done]] = False
    return accept


def joint_levenberg_marquardt(
    columns,
    y,
    x0,
    c0,
    *,
    max_iter=3,
    ftol=1e-7,
    renormalise=None,
    derivatives=None,
    lam0=1e-2,
    columns_and_jacobian=None,
):
    """Levenberg-Marquardt on ``x`` and ``c`` together, ``c >= 0``.

    Unlike :func:`levenberg_marquardt`, the linear weights are not
    re-solved at every ``x`` but move with it from a given start: the full
    Jacobian is ``[d(Phi c)/dx, Phi]``, and a step's weights are clipped at
    0. For refining a start whose weights are better than the least-squares
    ones at its nonlinear parameters (a learned estimate whose directions
    are still off: the projected weights there absorb the misfit). Same
    damping, acceptance and stopping as :func:`levenberg_marquardt`.

    Parameters
    ----------
    columns, y, x0, max_iter, ftol, renormalise, derivatives, lam0
    columns_and_jacobian
        As :func:`levenberg_marquardt`.
    c0 : torch.Tensor, shape (B, K)
        Starting weights (>= 0).

    Returns
    -------
    x : torch.Tensor, shape (B, P)
    c : torch.Tensor, shape (B, K)
    cost : torch.Tensor, shape (B,)
    """
    if derivatives is None:

        def derivatives(x, Phi, c):
            return forward_differences(columns, x, Phi, c)

    x, c = x0.clone(), c0.clamp_min(0.0)
    start_jacobian = None
    if columns_and_jacobian is None:
        Phi = columns(x)
    else:
        Phi, start_jacobian = columns_and_jacobian(x)
    r = y - (Phi @ c[..., None])[..., 0]
    cost = (r**2).sum(-1)
    B, P = x.shape
    lam = torch.full((B,), float(lam0), dtype=y.dtype)
    active = torch.isfinite(cost)
    J = None
    stale = torch.ones_like(active)
    for it in range(max_iter):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        every = idx.numel() == B
        redo = idx[stale[idx]]
        if redo.numel() == B:
            D = derivatives(x, Phi, c) if start_jacobian is None else start_jacobian(c)
            J = torch.cat([D, Phi], dim=-1)
        elif redo.numel():
            if J is None:
                J = torch.zeros(B, y.shape[-1], P + c.shape[1], dtype=y.dtype)
            D = derivatives(x[redo], Phi[redo], c[redo])
            J[redo] = torch.cat([D, Phi[redo]], dim=-1)
        stale[redo] = False
        start_jacobian = None  # x has moved on
        Ji = _rows(J, idx, every)
        A = Ji.mT @ Ji
        g = (Ji.mT @ _rows(r, idx, every)[..., None])[..., 0]
        step = _marquardt_step(A, g, _rows(lam, idx, every))
        x_new = _rows(x, idx, every) + step[:, :P]
        if renormalise is not None:
            x_new = renormalise(x_new)
        c_new = (_rows(c, idx, every) + step[:, P:]).clamp_min(0.0)
        Phi_new = columns(x_new)
        r_new = _rows(y, idx, every) - (Phi_new @ c_new[..., None])[..., 0]
        cost_new = (r_new**2).sum(-1)
        accept = _judge_steps(idx, cost_new, cost, lam, active, ftol)
        x, c, cost = _keep_steps(
            accept, idx, every, (x_new, c_new, cost_new), (x, c, cost)
        )
        if it < max_iter - 1:
            # Columns and residuals are read by later iterations only.
            Phi, r = _keep_steps(accept, idx, every, (Phi_new, r_new), (Phi, r))
            stale[idx[accept]] = True
    return x, c, cost
