"""Start points of the compartment models' fits: a grid of atoms scored
against the data, the tensor's direction, and greedy starts of several
fibres (:class:`StartsMixin`, a part of
:class:`~dipy_spinverse.compartments.base.CompartmentModel`)."""

import functools
import itertools
import math

import torch

from ..sim.sequences import fibonacci_sphere
from .fitting import DTYPE, nnls, nnls_gram, projected

__all__ = ["StartsMixin"]

# Elements of the largest temporary of dictionary scoring (voxels x atoms x
# supports x K^2), in float64 about 0.3 GB.
_SCORE_ELEMENTS = 4e7
# Atoms evaluated per call when building the dictionary.
_ATOM_CHUNK = 256
# Greedy multi-fibre initialisation: a new population must lie at least this
# far (degrees) from those already chosen.
_MIN_SEPARATION_DEG = 20.0


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


class StartsMixin:
    """Where the fits start: the grid dictionary, its scores, the tensor and
    greedy starts. Uses the model's columns, bounds and options."""

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
