"""NODDI's Watson stick tabulated (:class:`WatsonStickTable`, Catmull-Rom
interpolation) and the neurite signal's derivatives from it: what the
NODDI fits evaluate instead of the Watson integrals.
"""

import functools

import torch

from .gaussian import cosines
from .watson import (
    odi_to_kappa,
    watson_stick_from_beta,
    watson_tau,
    watson_tau_slope,
)

__all__ = [
    "WatsonStickTable",
    "noddi_neurite_derivatives",
]

# Coefficients of the Catmull-Rom weights (rows) and of their slopes in the
# powers 1, f, f^2, f^3 (columns): one small product per evaluation instead
# of a dozen elementwise passes.
_CATMULL_ROM = (
    torch.tensor(
        [[0, -1, 2, -1], [2, 0, -5, 3], [0, 1, 4, -3], [0, 0, -1, 1]],
        dtype=torch.float64,
    )
    / 2.0
)


_CATMULL_ROM_SLOPES = (
    torch.tensor(
        [[-1, 4, -3, 0], [0, -10, 9, 0], [1, 8, -9, 0], [0, -2, 3, 0]],
        dtype=torch.float64,
    )
    / 2.0
)


_CATMULL_ROM_BOTH = torch.cat([_CATMULL_ROM, _CATMULL_ROM_SLOPES]).T.contiguous()


def _powers(f):
    return torch.stack([torch.ones_like(f), f, f * f, f * f * f], dim=-1)


def _catmull_rom(f):
    """Weights (..., 4) of the cubic convolution (Catmull-Rom) interpolant at
    the fraction f in [0, 1] between the 2nd and 3rd of 4 equispaced nodes.

    C1 and exact for quadratics; its derivative is that of a C1 piecewise
    cubic, so Levenberg-Marquardt sees a smooth model.
    """
    return _powers(f) @ _CATMULL_ROM.to(f.dtype).T


def _catmull_rom_with_slopes(f):
    """:func:`_catmull_rom` weights and their derivatives with respect to f,
    (..., 4) each, from one product."""
    both = _powers(f) @ _CATMULL_ROM_BOTH.to(f.dtype)
    return both[..., :4], both[..., 4:]


def _ghost_nodes(values, dim):
    """Pad ``values`` by one node at both ends of ``dim``, extrapolated by
    the cubic through the 4 nearest nodes (exact for cubics)."""
    v = values.movedim(dim, -1)
    lo = 4.0 * v[..., 0] - 6.0 * v[..., 1] + 4.0 * v[..., 2] - v[..., 3]
    hi = 4.0 * v[..., -1] - 6.0 * v[..., -2] + 4.0 * v[..., -3] - v[..., -4]
    return torch.cat([lo[..., None], v, hi[..., None]], dim=-1).movedim(-1, dim)


@functools.lru_cache(maxsize=8)
def _stick_table_values(beta, odi, n_t, n_nodes):
    """Exact Watson-stick signals on the table's nodes, (n_odi + 2,
    n_b (n_t + 2)), ODI-major (one row per ODI node, ghosts included).

    Cached per process, as AMICO keeps its kernels: models on the same
    b-values and d_par (the submodels of ``fibres="auto"``, repeated fits)
    share one table."""
    t = torch.linspace(0.0, 1.0, n_t, dtype=torch.float64)
    beta = torch.tensor(beta, dtype=torch.float64)
    odi = torch.tensor(odi, dtype=torch.float64)
    with torch.no_grad():
        exact = watson_stick_from_beta(
            beta[:, None, None],
            torch.sqrt(t)[None, None, :],
            odi_to_kappa(odi)[None, :, None],
            n_nodes,
        )  # (n_b, n_odi + 2, n_t)
    values = _ghost_nodes(exact, 2).permute(1, 0, 2)
    return values.reshape(len(odi), -1).contiguous()


class WatsonStickTable:
    """:func:`watson_stick` for a fixed ``d_par``, tabulated per b-value.

    For one acquisition and one stick diffusivity the signal depends only on
    the measurement's b-value, the dispersion and ``t = (g . mu)^2``. As
    AMICO does with its rotated kernels, the exact signal is computed once on
    a grid (distinct b-values x ``n_odi`` ODI values x ``n_t`` values of t,
    uniform in ODI and in t, where it is smooth) and interpolated by
    separable cubic convolution: first in ODI per fibre (a (n_b, n_t) slice),
    then in t per measurement, four table entries each. The interpolant is a
    C1 piecewise cubic in both variables, differentiable by autograd and
    forward mode. Its error against the exact signal is below 1e-5 for the
    default grid on b d_par <= 10 (measured 8.3e-6 at b = 6000, 3.5e-6 for
    b <= 3000 s/mm^2 with d_par = 1.7e-3; ``tests/test_compartments.py``).
    The node values are cached per process for each set of b-values and
    d_par.

    Parameters
    ----------
    acq : Acquisition
    d_par : float
        Stick diffusivity in um^2/us.
    odi_range : (float, float)
        ODI range of the table (the model's bounds); ODI is clamped to it.
    n_odi, n_t : int
        Grid nodes in ODI and in t (ghost nodes are added at both ends).
    n_nodes : int
        Quadrature nodes of the exact signal at the grid nodes.
    """

    def __init__(
        self, acq, *, d_par, odi_range=(0.01, 0.99), n_odi=160, n_t=96, n_nodes=48
    ):
        self.bvals, self.shell_index = torch.unique(acq.bvals, return_inverse=True)
        self.bvecs_t = acq.bvecs.T
        self.odi_lo, self.odi_hi = (float(v) for v in odi_range)
        self.n_odi, self.n_t = int(n_odi), int(n_t)
        self.h_odi = (self.odi_hi - self.odi_lo) / (self.n_odi - 1)
        # One ghost node below and above the range in ODI (computed exactly:
        # ODI stays inside (0, 1) there), in t extrapolated (t is a cosine
        # squared: nothing exists beyond [0, 1]).
        odi = self.odi_lo + self.h_odi * torch.arange(
            -1, self.n_odi + 1, dtype=acq.dtype
        )
        if odi[0] <= 0 or odi[-1] >= 1:
            raise ValueError(
                f"odi_range {odi_range} leaves no room for the table's ghost "
                "nodes inside (0, 1); use a finer n_odi or a narrower range"
            )
        beta = tuple((self.bvals * float(d_par)).tolist())
        self.values = _stick_table_values(
            beta, tuple(odi.tolist()), self.n_t, int(n_nodes)
        ).to(acq.dtype)

    def _odi_interpolated(self, i, w):
        """Table rows interpolated in ODI: ``sum_a w[..., a] values[i + a]``
        for cell ``i`` (...) and cubic weights ``w`` (..., S, 4) of S
        stencils, shape (..., S, n_b (n_t + 2)). Nodes i - 1 .. i + 2 are
        rows i .. i + 3 (the ghost row first). Four row gathers per fibre:
        the dense product of a scattered stencil with the whole table costs
        n_odi + 2 rows (2.6x slower, measured for 2,048 fibres)."""
        n = i.numel()
        cells = (i.reshape(n, 1) + torch.arange(4, device=i.device)).reshape(-1)
        rows = self.values.index_select(0, cells).reshape(n, 4, -1)
        out = torch.bmm(w.reshape(n, -1, 4), rows)  # one small product per fibre
        return out.reshape(w.shape[:-1] + (-1,))

    def __call__(self, direction, odi):
        """Signals (..., M) for unit axes (..., 3) and ODI (...)."""
        odi = torch.as_tensor(odi, dtype=self.values.dtype)
        u = ((odi - self.odi_lo) / self.h_odi).clamp(0.0, self.n_odi - 1.0)
        i = u.detach().floor().clamp(max=self.n_odi - 2).long()
        w = _catmull_rom(u - i)  # (..., 4)
        flat = self._odi_interpolated(i, w[..., None, :]).squeeze(-2)
        c = direction @ self.bvecs_t
        v = (c * c).clamp(0.0, 1.0) * (self.n_t - 1)
        j = v.detach().floor().clamp(max=self.n_t - 2).long()
        wt = _catmull_rom(v - j)  # (..., M, 4)
        width = self.n_t + 2
        base = self.shell_index * width + j  # (..., M); node j is column j + 1
        index = (base[..., None] + torch.arange(4)).flatten(-2)
        picked = torch.gather(flat, -1, index).unflatten(-1, (-1, 4))
        return (picked * wt).sum(-1)

    def with_derivatives(self, direction, odi):
        """Signals E (..., M) and their derivatives dE/dODI (..., M) and
        dE/dt (..., M), t = (g . mu)^2, in closed form: the derivatives of
        the cubic-convolution weights (:func:`_catmull_rom_with_slopes`) on the
        same four table entries. Zero where ODI or t is clamped to the
        table's range (the interpolant is constant there)."""
        odi = torch.as_tensor(odi, dtype=self.values.dtype)
        u_raw = (odi - self.odi_lo) / self.h_odi
        u = u_raw.clamp(0.0, self.n_odi - 1.0)
        i = u.floor().clamp(max=self.n_odi - 2).long()
        inside = (u == u_raw).to(u.dtype)
        # Value and ODI-slope weights as two stencil rows: one interpolation.
        w, dw = _catmull_rom_with_slopes(u - i)
        w = torch.stack([w, dw * inside[..., None]], dim=-2)  # (..., 2, 4)
        flat = self._odi_interpolated(i, w)  # (..., 2, n_b (n_t + 2))
        c = direction @ self.bvecs_t
        v_raw = c * c * (self.n_t - 1)
        v = v_raw.clamp(0.0, self.n_t - 1.0)
        j = v.floor().clamp(max=self.n_t - 2).long()
        wt, dwt = _catmull_rom_with_slopes(v - j)  # (..., M, 4) each
        dwt = dwt * (v == v_raw).to(v.dtype)[..., None]
        width = self.n_t + 2
        base = self.shell_index * width + j
        index = (base[..., None] + torch.arange(4)).flatten(-2)
        index = index[..., None, :].expand(index.shape[:-1] + (2, index.shape[-1]))
        picked = torch.gather(flat, -1, index).unflatten(-1, (-1, 4))
        # Value and dE/dODI share the t weights: one pass over both rows.
        value, d_odi = (picked * wt[..., None, :, :]).sum(-1).unbind(-2)
        d_t = (picked[..., 0, :, :] * dwt).sum(-1) * (self.n_t - 1)
        return value, d_odi / self.h_odi, d_t


def noddi_neurite_derivatives(acq, table, *, direction, odi, ndi, d_par):
    """NODDI's neurite signal and its derivatives in closed form.

    ``N = ndi E + (1 - ndi) X``: ``E`` the Watson sticks from a
    :class:`WatsonStickTable` (``table``, built for ``acq`` and ``d_par``),
    ``X`` the zeppelin of the Watson-averaged tensor
    (:func:`watson_hindered`) with the tortuosity ``d_perp = d_par (1 -
    ndi)``. With ``t = (g . mu)^2`` and ``tau = <(mu . n)^2>``, ``X =
    exp(-b A)``, ``A = d_par (1 - ndi) + d_par ndi ((1 - tau) / 2 + t (3 tau
    - 1) / 2)``, so every derivative is elementary; the table's come from
    its interpolant (:meth:`WatsonStickTable.with_derivatives`). One
    evaluation instead of one per parameter for forward differences.

    Parameters
    ----------
    acq : Acquisition
    table : WatsonStickTable
    direction : torch.Tensor, shape (..., 3)
        Unit axes mu.
    odi, ndi : torch.Tensor, shape (...)
    d_par : float
        Intrinsic diffusivity in um^2/us (the table's).

    Returns
    -------
    value, d_odi, d_ndi : torch.Tensor, shape (..., M)
    d_mu : torch.Tensor, shape (..., M, 3)
        Gradient with respect to the (unnormalised) components of mu, at
        unit mu.
    """
    intra, intra_odi, intra_t = table.with_derivatives(direction, odi)
    kappa = odi_to_kappa(odi)
    tau = watson_tau(kappa)
    # d kappa / d ODI for kappa = 1 / tan(pi ODI / 2).
    kappa_odi = -(torch.pi / 2.0) / torch.sin(torch.pi * odi / 2.0) ** 2
    tau_odi = (watson_tau_slope(kappa) * kappa_odi)[..., None]
    c = cosines(acq, direction)
    t = c * c
    b = acq.bvals
    tau, ndi = tau[..., None], ndi[..., None]
    shape = (1.0 - tau) / 2.0 + t * (3.0 * tau - 1.0) / 2.0
    extra = torch.exp(-b * d_par * ((1.0 - ndi) + ndi * shape))
    # d(-b A)/d(parameter), times X below.
    rate_ndi = -b * d_par * (shape - 1.0)
    rate_tau = -b * d_par * ndi * (3.0 * t - 1.0) / 2.0
    rate_t = -b * d_par * ndi * (3.0 * tau - 1.0) / 2.0
    value = ndi * intra + (1.0 - ndi) * extra
    d_odi = ndi * intra_odi + (1.0 - ndi) * extra * rate_tau * tau_odi
    d_ndi = intra - extra + (1.0 - ndi) * extra * rate_ndi
    d_t = ndi * intra_t + (1.0 - ndi) * extra * rate_t
    d_mu = (2.0 * d_t * c)[..., None] * acq.bvecs
    return value, d_odi, d_ndi, d_mu
