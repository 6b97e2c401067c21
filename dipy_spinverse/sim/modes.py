"""The matrix formalism: signals from the slowest Laplace modes of a voxel.

The signal of a restricted voxel lives in its slowest diffusion modes: the
fast ones decay long before the echo (motional narrowing). With the K
lowest eigenpairs ``A phi_m = lambda_m phi_m`` of the symmetrised diffusion
operator (:mod:`~dipy_spinverse.sim.operators`: membranes, relaxation and
an absorbing wall included) and the gradient coupling projected onto them,
``X_d = Phi^T diag(x_d) Phi``, the laboratory-frame Bloch-Torrey system on
a piece of constant gradient ``f g`` is the K-dimensional

    dc/dt = -(Lambda + i f (gamma g) . X) c,

solved exactly by one K x K exponential per piece and acquisition (Grebenkov
2007, 2008; SpinDoctor's numerical matrix formalism, Li et al. 2019). Once
the modes are known an acquisition costs microseconds, whatever the
stiffness of the grid: the cost is the eigenproblem (a sparse shift-invert
Lanczos, :func:`scipy.sparse.linalg.eigsh`) and K.

K is chosen by a stated error estimate: starting from ``modes`` it is
doubled until the signals of K and 2K modes differ by at most ``tol``; the
2K signals are returned (their error is below the difference where the
modal expansion converges, as it does geometrically once K passes the
modes the gradients couple).

Only the laboratory frame (reflecting and absorbing boxes) is served. On a
periodic patch the phase-unwrapped frame's operator depends on the
wavevector, and its k = 0 modes represent restricted water badly at the
wavevectors of a diffusion protocol (doc/validation/modes.md); those grids
keep the Chebyshev engine. The engine is forward-only: it does not
back-propagate, and asks for a gradient raise.
"""

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

__all__ = ["modal_signals", "lowest_modes", "project", "MODES_START", "DENSE_BELOW"]

#: Modes of the first estimate (then doubled until converged).
MODES_START = 32

#: Grids with fewer cells, or asked for more than a quarter of their modes,
#: are decomposed densely (LAPACK's ``eigh``: faster there than Lanczos).
DENSE_BELOW = 800


def lowest_modes(op, index, n_modes):
    """The ``n_modes`` lowest eigenpairs of batch element ``index`` of ``op``.

    Parameters
    ----------
    op : DiffusionOperator
    index : int
        Batch element.
    n_modes : int

    Returns
    -------
    eigenvalues : ndarray (K,)
        Ascending, 1/us.
    vectors : ndarray (N, K)
        Orthonormal columns.
    """
    matrix = _sparse_operator(op, index)
    n = matrix.shape[0]
    if n <= DENSE_BELOW or 4 * n_modes >= n:
        values, vectors = np.linalg.eigh(matrix.toarray())
        return values[:n_modes], vectors[:, :n_modes]
    # Shift-invert about a point just below the spectrum (A is positive
    # semi-definite): the lowest modes converge first, in a few iterations.
    shift = -1e-3 * float(np.abs(matrix.diagonal()).min() + 1e-12)
    try:
        values, vectors = eigsh(matrix, k=n_modes, sigma=shift, which="LM")
    except ArpackNoConvergence:
        values, vectors = np.linalg.eigh(matrix.toarray())
        return values[:n_modes], vectors[:, :n_modes]
    order = np.argsort(values)
    return values[order], vectors[:, order]


def _sparse_operator(op, index):
    """Batch element ``index`` of ``op`` as a scipy CSR matrix (float64)."""
    diag = op.diag[index].detach().cpu().double().numpy()
    weights = op.weights[index].detach().cpu().double().numpy()
    neighbours = op.neighbours.cpu().numpy()
    n, k = weights.shape
    rows = np.repeat(np.arange(n), k)
    values = weights.reshape(-1)
    keep = values != 0
    coupling = sp.csr_matrix(
        (values[keep], (rows[keep], neighbours.reshape(-1)[keep])), shape=(n, n)
    )
    return (sp.diags(diag) - coupling).tocsr()


def modal_signals(op, protocol, start, *, tol, modes=MODES_START):
    """Laboratory-frame signals ``S(TE) / S(0)`` of every batch element.

    Parameters
    ----------
    op : DiffusionOperator
    protocol : Protocol
    start : Tensor (B, N)
        Where the magnetisation starts (1 in the cells it starts in).
    tol : float
        Largest difference between the signals of K and 2K modes at which K
        is accepted (the error estimate).
    modes : int
        Modes of the first estimate.

    Returns
    -------
    Tensor (B, n_acquisitions)
        In ``op``'s real dtype and device.
    """
    n_batch, n_cells = start.shape
    out = np.empty((n_batch, len(protocol)))
    for b in range(n_batch):
        u0 = (_read_out(op, b) * start[b]).detach().cpu().double().numpy()
        out[b] = _converged(op, b, protocol, u0, tol, min(modes, n_cells))
    return torch.as_tensor(out, dtype=op.diag.dtype, device=op.diag.device)


def _converged(op, index, protocol, u0, tol, n_modes):
    """Signals of batch element ``index`` with modes doubled until stable."""
    n_cells = len(u0)
    positions = op.positions.detach().cpu().double().numpy()
    weights = _read_out(op, index).detach().cpu().double().numpy()
    norm = float(u0 @ weights)
    previous = None
    while True:
        values, vectors = lowest_modes(op, index, min(2 * n_modes, n_cells))
        # The K modes' projections are the 2K modes' leading block.
        projected = project(vectors, positions, weights, u0)
        if previous is None:
            previous = _signals(values, projected, norm, protocol, n_modes)
        current = _signals(values, projected, norm, protocol, len(values))
        if np.max(np.abs(current - previous)) <= tol or len(values) >= n_cells:
            return current
        n_modes = len(values)
        previous = current


def project(vectors, positions, weights, u0):
    """The voxel's quantities in the basis ``vectors`` (N, K): the positions
    ``X_d = Phi^T diag(x_d) Phi`` (3, K, K), the initial state and the read
    weights (K,). Those of the first k modes are the leading blocks.

    Parameters
    ----------
    vectors : ndarray (N, K)
        The basis: K modes over N cells.
    positions : ndarray (N, 3)
        The cells' (centred) positions.
    weights : ndarray (N,)
        The read weights (square roots of the cell volumes).
    u0 : ndarray (N,)
        The initial state.

    Returns
    -------
    coupling : ndarray (3, K, K)
        The positions ``X_d`` in the basis.
    start : ndarray (K,)
        The initial state in the basis.
    read : ndarray (K,)
        The read weights in the basis.
    """
    coupling = np.einsum("nk,nd,nl->dkl", vectors, positions, vectors)
    return coupling, vectors.T @ u0, vectors.T @ weights


def _signals(values, projected, norm, protocol, n_modes):
    """Signals of one voxel from its first ``n_modes`` modes (eigenvalues
    ``values``, projections :func:`project`)."""
    coupling, c0, read = projected
    coupling = coupling[:, :n_modes, :n_modes]
    c0, read = c0[:n_modes], read[:n_modes]
    lam = torch.as_tensor(values[:n_modes], dtype=torch.complex128)
    xs = torch.as_tensor(coupling, dtype=torch.complex128)
    rates = torch.as_tensor(np.array(protocol.gradient_rate), dtype=torch.complex128)
    out = np.empty(len(protocol))
    for waveform, idx in protocol.groups():
        durations, amplitudes = waveform.segments
        phase = torch.einsum("ad,dkl->akl", rates[idx], xs)  # (A, K, K)
        c = torch.as_tensor(c0, dtype=torch.complex128).expand(len(idx), -1)
        pieces = {}
        for tau, f in zip(durations, amplitudes, strict=True):
            if tau <= 0:
                continue
            if f == 0:
                c = c * torch.exp(-tau * lam)
                continue
            key = (float(tau), abs(float(f)))
            if key not in pieces:
                generator = torch.diag(lam) + 1j * abs(f) * phase
                pieces[key] = torch.linalg.matrix_exp(-tau * generator)
            # Lambda and X are real: the piece of -f is the conjugate.
            step = pieces[key] if f > 0 else pieces[key].conj()
            c = torch.einsum("akl,al->ak", step, c)
        read_out = torch.as_tensor(read, dtype=torch.complex128)
        out[idx] = (c @ read_out).abs().numpy() / norm
    return out


def _read_out(op, index):
    """Batch element ``index``'s read-out weights ``sqrt(rho V)`` (N,)."""
    weights = op.sqrt_volumes
    return weights[index] if weights.ndim == 2 else weights
