"""Finite-volume Bloch-Torrey operators on a :class:`~dipy_spinverse.sim.grid.TetGrid`.

One unknown per cell: the magnetisation at the cell's circumcentre. The flux
through a face between cells ``a`` and ``b`` is the two-point flux through the
circumcentres with the membrane as a series resistance::

    w_f = A_f / (d_a / D_a + d_b / D_b + 1 / kappa_f)

``d_a``, ``d_b`` are the circumcentre-to-face distances. On a well-centred grid
the circumcentre segment is normal to the face, so this is consistent; for the
membrane condition ``D dM/dn = kappa [M]`` it is exact in 1-D. An absorbing
outer face adds the sink ``A / (d / D + 1 / kappa_wall)`` to its cell.

Water density. Compartments may hold different amounts of water per unit
volume (myelin holds about half of what the axon and the space between
axons hold): a density ``rho`` per cell, relative to free water. The unknown
is then the magnetisation per unit of water, ``m = M / rho``, which is
uniform at rest: water crosses a membrane down differences of ``m``, not of
``M`` (detailed balance: at equilibrium the one-way fluxes ``kappa_12
rho_1`` and ``kappa_21 rho_2`` are equal). A cell's "volume" becomes its
water, ``rho V``, its conductance ``rho D``, and a membrane's ``kappa`` is
the one-way permeability of the water-richer side: the flux is ``kappa
max(rho_a, rho_b) (m_a - m_b)`` (for equal densities the usual ``kappa [M]``).
With ``rho = 1`` everywhere every formula above is unchanged.

The operators are kept *symmetrised*: with ``u = sqrt(V) M`` the diffusion
operator ``V^-1/2 L V^-1/2`` is real symmetric positive semi-definite, so
``exp(-t A)`` is complex symmetric in the laboratory frame and Hermitian in
the phase-unwrapped frame used for periodic cells; the solvers exploit both.
All quantities are torch tensors, differentiable with respect to the
permeability and the diffusivity.

Units: um, us, permeability in um/us (= m/s), diffusivity um^2/us (= mm^2/s).
"""

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["face_conductance", "DiffusionOperator", "diffusion_operator"]


def face_conductance(grid, permeability, diffusivity, density=None):
    """Conductance ``w_f`` (um^3/us) of every interior face.

    Parameters
    ----------
    grid : TetGrid
    permeability : Tensor (B, n_faces)
        Membrane permeability in m/s; ``inf`` is no membrane, 0 impermeable.
    diffusivity : Tensor (B, n_cells)
        Diffusivity of each cell in mm^2/s.
    density : Tensor (B, n_cells), optional
        Water density of each cell relative to free water (default 1; see
        the module documentation).

    Returns
    -------
    Tensor (B, n_faces)
    """
    like = permeability
    area = _const(grid.face_areas, like)
    dist = _const(grid.face_distances, like)
    cells = torch.tensor(grid.face_cells, device=like.device)
    # Written as A kappa / (kappa R + 1) so that kappa = 0 is exact with a
    # finite derivative; kappa = inf takes the membrane-free branch. The
    # placeholder keeps the unused branch finite so no NaN leaks into grads.
    open_face = torch.isinf(permeability)
    kappa = torch.where(open_face, torch.zeros_like(permeability), permeability)
    if density is not None:
        # Water moves down differences of m = M / rho: a cell conducts rho D,
        # a membrane passes kappa times its water-richer side's density.
        diffusivity = diffusivity * density
        kappa = kappa * torch.maximum(density[:, cells[:, 0]], density[:, cells[:, 1]])
    resistance = dist[:, 0] / diffusivity[:, cells[:, 0]] + (
        dist[:, 1] / diffusivity[:, cells[:, 1]]
    )
    with_membrane = area * kappa / (kappa * resistance + 1.0)
    return torch.where(open_face, area / resistance, with_membrane)


@dataclass
class DiffusionOperator:
    """Symmetrised diffusion-relaxation operator in cell-neighbour (ELL) form.

    ``(A u)_i = diag_i u_i - sum_k weights_ik u_{neighbours_ik}``, with
    ``weights_ik = w_f / sqrt(V_i V_j)`` and ``diag_i = (sum_k w_f + sink_i) /
    V_i + relaxation_i``. Padding slots have zero weight.

    Attributes
    ----------
    diag : Tensor (B, N)
    weights : Tensor (B, N, K)
    neighbours : LongTensor (N, K)
    displacement : Tensor (N, K, 3)
        Circumcentre-to-circumcentre vector across each slot (um).
    positions : Tensor (N, 3)
        Circumcentres relative to the mean circumcentre (laboratory frame).
    sqrt_volumes : Tensor (N,) or (B, N)
        ``sqrt(V)``, or ``sqrt(rho V)`` per batch element with a water
        density per cell: ``u = sqrt_volumes m``, and the signal of ``u`` is
        ``sum(sqrt_volumes * u)``.
    """

    diag: torch.Tensor
    weights: torch.Tensor
    neighbours: torch.Tensor
    displacement: torch.Tensor
    positions: torch.Tensor
    sqrt_volumes: torch.Tensor

    def spectral_bounds(self, offdiag_scale=1.0):
        """Gershgorin interval of the Hermitian part, per batch: (lo, hi).

        ``offdiag_scale`` bounds the modulus of any factor multiplying the
        off-diagonal entries (1 for the plain operator).
        """
        radius = offdiag_scale * self.weights.abs().sum(-1)
        lo = (self.diag - radius).amin(-1)
        hi = (self.diag + radius).amax(-1)
        return lo.detach(), hi.detach()


def diffusion_operator(
    grid, permeability, diffusivity, relaxation=None, *, density=None
):
    """Assemble the :class:`DiffusionOperator` of a permeability field.

    Parameters
    ----------
    grid : TetGrid
    permeability : Tensor (B, n_faces)
        m/s, in [0, inf].
    diffusivity : Tensor (B, n_cells)
        mm^2/s.
    relaxation : Tensor (B, n_cells), optional
        Relaxation rate 1/T2 per cell in 1/us.
    density : Tensor (B, n_cells), optional
        Water density per cell relative to free water, > 0 (default 1):
        a cell's water is ``density V`` (module documentation).

    Returns
    -------
    DiffusionOperator
    """
    like = permeability
    w = face_conductance(grid, permeability, diffusivity, density)
    volumes = _const(grid.cell_volumes, like)
    if density is not None:
        volumes = volumes * density  # a cell's water: the mass of its m
    slot_face = torch.tensor(grid.cell_faces, device=like.device)
    pad = slot_face < 0
    w_slot = w[:, slot_face.clamp(min=0)].masked_fill(pad, 0.0)
    neighbours = torch.tensor(grid.cell_neighbours, device=like.device)
    sqrt_v = volumes.sqrt()
    weights = w_slot / (sqrt_v[..., None] * sqrt_v[..., neighbours])
    diag = w_slot.sum(-1) / volumes
    if grid.boundary == "absorbing":
        sink = _wall_sink(grid, diffusivity)
        diag = diag + (sink if density is None else sink * density) / volumes
    if relaxation is not None:
        diag = diag + relaxation
    return DiffusionOperator(
        diag=diag,
        weights=weights,
        neighbours=neighbours,
        displacement=_const(_slot_displacement(grid), like),
        positions=_const(_centred_positions(grid), like),
        sqrt_volumes=sqrt_v,
    )


def _wall_sink(grid, diffusivity):
    like = diffusivity
    cells = torch.tensor(grid.boundary_cells, device=like.device)
    area = _const(grid.boundary_areas, like)
    dist = _const(grid.boundary_distances, like)
    sink = area / (dist / diffusivity[:, cells] + 1.0 / grid.wall_permeability)
    out = torch.zeros_like(diffusivity)
    return out.index_add(1, cells, sink)


def _slot_displacement(grid):
    faces = grid.cell_faces
    f = np.maximum(faces, 0)
    length = grid.face_distances[f].sum(-1)
    # Normals point from face_cells[:, 0] to face_cells[:, 1].
    sign = np.where(grid.face_cells[f, 0] == np.arange(grid.n_cells)[:, None], 1, -1)
    disp = (sign * length)[..., None] * grid.face_normals[f]
    disp[faces < 0] = 0.0
    return disp


def _centred_positions(grid):
    x = grid.cell_circumcentres
    return x - x.mean(axis=0)


def _const(array, like):
    return torch.tensor(array, dtype=like.dtype, device=like.device)
