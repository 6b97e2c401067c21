"""Exact batched least squares over the probability simplex (and NNLS).

For a handful of tissues the constrained problems are solved exactly by
enumerating active sets: a convex quadratic's minimiser over the simplex
lies in the relative interior of one face, where it is that face's
equality-constrained minimiser (a linear function of the data). So the
feasible face minimiser of least misfit is the global minimiser. With one
design matrix shared by every voxel each face's solution is a precomputed
matrix product: ``2**n - 1`` faces for ``n`` tissues, all voxels at once.
"""

import itertools

import torch

__all__ = [
    "SimplexLstsq",
    "simplex_lstsq",
    "nonneg_lstsq",
    "project_simplex",
    "MAX_TISSUES",
]

#: Enumeration costs ``2**n`` faces; beyond this many tissues it is refused.
MAX_TISSUES = 8

# Face minimisers this far below zero (relative to 1) still count as
# feasible: rounding of the 1-3 dimensional solves, not a constraint.
_FEASIBLE = 1e-9


def _faces(n):
    for size in range(1, n + 1):
        yield from itertools.combinations(range(n), size)


def _affine_solver(design, face):
    """``(matrix, offset)`` with ``p_face = y @ matrix + offset``: the
    least-squares point of the face's affine hull (sum one), the one nearest
    the face's centre where the data do not fix it (pseudo-inverse)."""
    k = len(face)
    columns = design[:, list(face)]
    centre = torch.full((k,), 1.0 / k, dtype=design.dtype, device=design.device)
    if k == 1:
        return torch.zeros(
            design.shape[0], 1, dtype=design.dtype, device=design.device
        ), centre
    # orthonormal basis of {z : sum z = 0}
    steps = torch.eye(k, dtype=design.dtype, device=design.device)[:, 1:] - 1.0 / k
    basis = torch.linalg.qr(steps).Q
    solve = basis @ torch.linalg.pinv(columns @ basis)  # (k, n_seq)
    matrix = solve.T
    offset = centre - (columns @ centre) @ matrix
    return matrix, offset


def _stack(design, solvers):
    """One ``(n_sequences, n_faces * n)`` matrix and offset giving every
    face's solution, embedded in all ``n`` coordinates, in one product."""
    n = design.shape[1]
    matrix = torch.zeros(
        design.shape[0], len(solvers), n, dtype=design.dtype, device=design.device
    )
    offset = torch.zeros(len(solvers), n, dtype=design.dtype, device=design.device)
    for i, (face, face_matrix, face_offset) in enumerate(solvers):
        matrix[:, i, list(face)] = face_matrix
        offset[i, list(face)] = face_offset
    return matrix.reshape(design.shape[0], -1), offset.reshape(-1)


def _best_face(design, matrix, offset, data, tolerance):
    """The feasible face solution of least misfit, for every voxel."""
    n = design.shape[1]
    candidates = (data @ matrix + offset).reshape(data.shape[0], -1, n)
    feasible = (candidates >= -tolerance).all(dim=2)
    rss = ((candidates @ design.T - data[:, None, :]) ** 2).sum(dim=2)
    rss = torch.where(feasible, rss, torch.inf)
    best, index = rss.min(dim=1)
    chosen = candidates[torch.arange(data.shape[0], device=data.device), index]
    return chosen.clamp_min(0), best


class SimplexLstsq:
    """Exact simplex least squares for one design, its face solvers cached.

    ``SimplexLstsq(design)(data)`` equals ``simplex_lstsq(design, data)``;
    build it once to solve many data sets (or scales of one, see ``scale``).
    """

    def __init__(self, design):
        self.design = design
        solvers = [
            (face, *_affine_solver(design, face)) for face in _faces(design.shape[1])
        ]
        self.matrix, self.offset = _stack(design, solvers)

    def __call__(self, data, scale=1.0):
        """``(p, rss)`` for ``scale * design`` (the same faces, data / scale)."""
        data = data / scale
        # the vertices are always feasible, so every voxel has a solution
        p, best = _best_face(self.design, self.matrix, self.offset, data, _FEASIBLE)
        return p / p.sum(dim=1, keepdim=True), best * scale**2


def simplex_lstsq(design, data):
    """``argmin ||design @ p - y||^2`` subject to ``p >= 0, sum(p) = 1``.

    Parameters
    ----------
    design : tensor, (n_sequences, n_tissues)
    data : tensor, (n_voxels, n_sequences)

    Returns
    -------
    p : tensor, (n_voxels, n_tissues)
    rss : tensor, (n_voxels,)
        Residual sum of squares at ``p``.
    """
    return SimplexLstsq(design)(data)


def nonneg_lstsq(design, data):
    """``argmin ||design @ q - y||^2`` subject to ``q >= 0`` (exact NNLS).

    Same shapes and returns as :func:`simplex_lstsq`; ``q`` does not sum to
    one (its sum is the voxel's gain when the columns are unit-gain
    signals).

    Parameters
    ----------
    design : torch.Tensor (n_sequences, n_tissues)
        The design's columns.
    data : torch.Tensor (n_voxels, n_sequences)
        The signals.

    Returns
    -------
    q : torch.Tensor (n_voxels, n_tissues)
        The non-negative weights.
    rss : torch.Tensor (n_voxels,)
        Residual sum of squares at ``q``.
    """
    n = design.shape[1]
    empty = torch.zeros(design.shape[0], 0, dtype=design.dtype, device=design.device)
    solvers = [((), empty, empty[0])]  # q = 0, always feasible
    for face in _faces(n):
        columns = design[:, list(face)]
        solvers.append(
            (face, torch.linalg.pinv(columns).T, torch.zeros_like(columns[0]))
        )
    matrix, offset = _stack(design, solvers)
    scale = data.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    q, best = _best_face(design, matrix, offset, data / scale, _FEASIBLE)
    return q * scale, best * scale[:, 0] ** 2


def project_simplex(v):
    """Euclidean projection of each row of ``v`` onto the probability simplex
    (the sort-based algorithm of Held, Wolfe and Crowder, 1974)."""
    n = v.shape[-1]
    u = torch.sort(v, dim=-1, descending=True).values
    cumulative = u.cumsum(dim=-1) - 1
    index = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    active = (u - cumulative / index) > 0
    rho = active.to(v.dtype).cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    theta = cumulative.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)
