"""Per-voxel signal frames: the learned estimators' inputs, rotated.

A network that maps lab-frame signals to fibre directions has to learn the
rotation group from examples; on the NODDI benchmark's protocol a two-fibre
network trained on 100,000 voxels x 30 epochs missed the directions by 10
degrees (median). Here the rotation is taken out before the network: each
shell's signals are fitted by an even spherical polynomial of low degree,
the voxel's frame is the eigenframe of the second moment of those
polynomials (the axis of least signal first: along the fibres), and the
network sees the polynomials resampled at fixed points of that frame. The
directions it predicts are then near the frame's axes, and are rotated back
to the lab frame afterwards. The frame is computed from the noisy signal the
same way in training and in use, so the network learns what the frame is
for noisy data, not for the truth.

Measurements outside any shell with enough directions (b = 0, shells of
fewer than :data:`MIN_SHELL_DIRECTIONS`) are passed to the network as they
are; a protocol without such a shell has no frame (:meth:`SignalFrame.from_gtab`
returns None) and its networks see the lab-frame signals.
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from dipy.core.gradients import get_bval_indices, unique_bvals_tolerance

from ..sim.sequences import fibonacci_sphere

__all__ = ["SignalFrame", "rotate_outer"]

#: A shell is resampled if a degree-4 polynomial (15 coefficients) fits it
#: with at most 3/4 as many coefficients as directions. Degree 2 (a tensor)
#: cannot hold a crossing: on shells of 20 directions fitted at degree 2 the
#: 2-fibre NODDI network missed directions by 25 degrees, at degree 4 by 7.9
#: (fit: 5.1; measured). Smaller shells stay raw.
MIN_SHELL_DIRECTIONS = 20
#: Highest polynomial degree (28 coefficients): enough to place fibres
#: crossing at 45 degrees or more. Degree 8 on 90-direction shells made the
#: 2-fibre NODDI network worse (ODI 1.91x the fitted error against 1.73x,
#: half the speed; measured).
MAX_DEGREE = 6
#: b-values closer than this (s/mm^2) belong to one shell, as in DIPY.
SHELL_TOLERANCE = 20
#: Relative ridge of the fits (of the orthonormalised basis): keeps a fit
#: with nearly as many coefficients as directions from amplifying noise.
RIDGE = 1e-3
DTYPE = torch.float64


def _exponents(degree):
    """Exponents (K, 3) of the monomials x^a y^b z^c with a + b + c = degree:
    on the unit sphere they span every even spherical harmonic of order <=
    degree (x^2 + y^2 + z^2 = 1 lifts the lower ones)."""
    pairs = [(a, b) for a in range(degree + 1) for b in range(degree + 1 - a)]
    return torch.tensor([(a, b, degree - a - b) for a, b in pairs])


def _monomials(points, exponents):
    """Monomials (K, ...) of the points (..., 3), monomial-major: powers of
    each coordinate by repeated products, then whole rows picked per
    exponent (float powers, or gathers along the last axis, cost 10x
    more)."""
    degree = int(exponents.max())
    coords = points.movedim(-1, 0)  # (3, ...)
    powers = [torch.ones_like(coords), coords]
    for _ in range(degree - 1):
        powers.append(powers[-1] * coords)
    powers = torch.stack(powers[: degree + 1], dim=1)  # (3, degree + 1, ...)
    out = powers[0].index_select(0, exponents[:, 0])
    for axis in (1, 2):
        out = out * powers[axis].index_select(0, exponents[:, axis])
    return out


def _sphere_integrals(exponents):
    """Integrals over the unit sphere of the monomials with exponents
    (..., 3): zero unless every exponent is even, else ``2 G(a') G(b')
    G(c') / G(a' + b' + c')`` with ``a' = (a + 1) / 2`` (G: gamma)."""
    e = np.asarray(exponents)
    lgamma = np.vectorize(math.lgamma)
    half = (e + 1) / 2.0
    value = 2.0 * np.exp(lgamma(half).sum(-1) - lgamma(half.sum(-1)))
    return torch.tensor(np.where((e % 2 == 0).all(-1), value, 0.0))


def _moments(exponents, order):
    """(K, 3**order): integrals over the sphere of each monomial times the
    coordinates p_i p_j ... (``order`` of them, row-major). A fit's moment
    tensor is its coefficients times this, exactly: a quadrature would
    make the frame depend on the tissue's orientation (by 1-3 degrees with
    100 Fibonacci points, measured)."""
    axes = np.array(list(itertools.product(range(3), repeat=order)))
    extra = np.zeros((max(len(axes), 1), 3), dtype=int)
    for k in range(order):
        extra[np.arange(len(axes)), axes[:, k]] += 1
    return _sphere_integrals(np.asarray(exponents)[:, None, :] + extra[None])


def _degree(n_directions):
    """Largest even degree <= MAX_DEGREE with at most 3/4 as many
    coefficients as directions (the ridge keeps the rest of the noise)."""
    degree = 0
    while (
        degree < MAX_DEGREE
        and (degree + 3) * (degree + 4) // 2 <= (3 * n_directions) // 4
    ):
        degree += 2
    return degree


@dataclass(frozen=True, eq=False)
class _Shell:
    index: torch.Tensor  # (n,) measurements of the shell
    exponents: torch.Tensor  # (K, 3)
    fit: torch.Tensor  # (K, n): signals -> monomial coefficients
    mean: torch.Tensor  # (K,): coefficients -> mean over the sphere
    moment2: torch.Tensor  # (K, 9): coefficients -> second moment
    moment4: torch.Tensor  # (K, 81): coefficients -> fourth moment
    points: torch.Tensor  # (K, 3) resampling points in the voxel's frame

    def to(self, device):
        """The same shell with its tensors on ``device``."""
        moved = {k: v.to(device) for k, v in vars(self).items()}
        return type(self)(**moved)

    @classmethod
    def build(cls, index, directions):
        exponents = _exponents(_degree(len(index)))
        # Orthonormalise the monomials over the sphere (they are far from
        # orthogonal) so that one ridge weight suits every coefficient:
        # with G = L L^T their Gram matrix, m L^-T is orthonormal.
        gram = _sphere_integrals(exponents[:, None, :] + exponents[None, :, :])
        to_monomial = torch.linalg.inv(torch.linalg.cholesky(gram)).T
        phi = _monomials(directions, exponents).T @ to_monomial
        normal = phi.T @ phi
        ridge = RIDGE * torch.trace(normal) / normal.shape[0]
        fit = to_monomial @ torch.linalg.solve(
            normal + ridge * torch.eye(normal.shape[0], dtype=DTYPE), phi.T
        )
        # As many points as coefficients: the resampled values are the
        # rotated fit itself, nothing lost and nothing redundant.
        points = torch.tensor(fibonacci_sphere(len(exponents), hemisphere=True))
        return cls(
            torch.as_tensor(index),
            exponents,
            fit,
            _moments(exponents, 0)[:, 0] / (4.0 * math.pi),
            _moments(exponents, 2),
            _moments(exponents, 4),
            points,
        )


class SignalFrame:
    """Resampling of a protocol's signals in each voxel's own frame.

    Build with :meth:`from_gtab`; :meth:`features` maps normalised signals
    (V, M) to the network's inputs (V, :attr:`n_features`) and the voxels'
    frames (V, 3, 3), whose columns are the frame's axes in lab coordinates
    (the axis of least signal first; a rotation).
    """

    def __init__(self, shells, raw):
        self.shells = shells
        self.raw = torch.as_tensor(raw)
        self._on_device = {torch.device("cpu"): (self.shells, self.raw)}

    def _constants(self, device):
        """Shells and raw indices on ``device`` (a network trained on a GPU
        gets its batches' features there), moved once."""
        if device not in self._on_device:
            shells = [s.to(device) for s in self.shells]
            self._on_device[device] = (shells, self.raw.to(device))
        return self._on_device[device]

    @classmethod
    def from_gtab(cls, gtab, *, b0s_mask=None):
        """The frame of a DIPY gradient table, or None if no shell (b-values
        within :data:`SHELL_TOLERANCE` of each other, for one diffusion
        time) has :data:`MIN_SHELL_DIRECTIONS` directions."""
        bvals = np.asarray(gtab.bvals, dtype=float)
        bvecs = np.asarray(gtab.bvecs, dtype=float)
        b0s = np.asarray(gtab.b0s_mask if b0s_mask is None else b0s_mask, bool)
        timing = [
            np.broadcast_to(np.asarray(t, dtype=float), bvals.shape)
            for t in (gtab.small_delta, gtab.big_delta)
            if t is not None
        ]
        keys = np.stack(timing, axis=1) if timing else np.zeros((bvals.size, 0))
        shells, used = [], np.zeros(bvals.size, dtype=bool)
        for b in unique_bvals_tolerance(bvals[~b0s], tol=SHELL_TOLERANCE):
            near = np.zeros(bvals.size, dtype=bool)
            near[get_bval_indices(bvals, b, tol=SHELL_TOLERANCE)] = True
            near &= ~b0s & ~used
            # One shell per diffusion time: the signal of b = 1000 at 20 ms
            # is not that at 50 ms.
            for key in np.unique(keys[near], axis=0):
                index = np.nonzero(near & (keys == key).all(axis=1))[0]
                if index.size >= MIN_SHELL_DIRECTIONS:
                    directions = torch.tensor(bvecs[index], dtype=DTYPE)
                    shells.append(_Shell.build(index, directions))
                    used[index] = True
        if not shells:
            return None
        return cls(shells, np.nonzero(~used)[0])

    def description(self):
        """What defines the inputs (part of the learned networks' cache
        key): each shell's size and degree, the raw measurements and the
        module's constants."""
        return {
            "shells": [[len(s.index), int(s.exponents.sum(1)[0])] for s in self.shells],
            "raw": len(self.raw),
            "ridge": RIDGE,
            "tolerance": SHELL_TOLERANCE,
            "min_directions": MIN_SHELL_DIRECTIONS,
            "max_degree": MAX_DEGREE,
        }

    @property
    def n_features(self):
        return len(self.raw) + sum(len(s.points) for s in self.shells) + 3

    def features(self, signals, *, chunk=512):
        """Network inputs (V, n_features) and frames (V, 3, 3) of normalised
        signals (V, M): the signals outside the shells, each shell's fit
        resampled at fixed points of the frame, and the second moment's
        eigenvalues divided by their sum. Computed in float64 in chunks
        small enough to stay in cache; the inputs are returned in the
        signals' dtype."""
        signals = torch.as_tensor(signals)
        out, frames = [], []
        for i in range(0, signals.shape[0], chunk):
            f, r = self._features(signals[i : i + chunk].to(DTYPE))
            out.append(f.to(signals.dtype))
            frames.append(r)
        if not out:
            return signals.new_zeros(0, self.n_features), torch.zeros(0, 3, 3)
        return torch.cat(out), torch.cat(frames)

    def _features(self, y):
        shells, raw = self._constants(y.device)
        coefficients = [y[:, s.index] @ s.fit.T for s in shells]  # (V, K)
        eigenvalues, frame = self._frames(shells, coefficients)
        parts = [y[:, raw]]
        for shell, c in zip(shells, coefficients, strict=True):
            lab = shell.points @ frame.mT  # (V, K, 3): frame points in the lab
            monomials = _monomials(lab, shell.exponents)  # (K, V, K)
            parts.append((monomials * c.T[..., None]).sum(0))
        total = eigenvalues.sum(-1, keepdim=True)
        parts.append(eigenvalues / torch.where(total.abs() > 0, total, 1.0))
        return torch.cat(parts, dim=1), frame

    def _frames(self, shells, coefficients):
        """Eigenvalues (V, 3) and frames (V, 3, 3) of the second moment of
        the shells' fits, each divided by its mean (a shell counts by its
        shape, not its signal level), with the axes' signs of
        :meth:`_axis_signs`."""
        second = fourth = 0.0
        for shell, c in zip(shells, coefficients, strict=True):
            scale = (c @ shell.mean).abs().clamp_min(1e-12)[:, None]
            second = second + (c @ shell.moment2) / scale
            fourth = fourth + (c @ shell.moment4) / scale
        eigenvalues, frame = torch.linalg.eigh(second.view(-1, 3, 3))
        signs = self._axis_signs(fourth.view(-1, 3, 3, 3, 3), frame)
        return eigenvalues, frame * signs[:, None, :]

    @staticmethod
    def _axis_signs(fourth, frame):
        """Signs (V, 3) of the frame's axes. An eigenframe's axes have no
        sign, and an even function seen through the frame's four rotations
        by 180 degrees is itself or its mirror image in one of the frame's
        planes: a network would have to learn all four. With T the fourth
        moment and r_k the axes, the signs make ``T(r_0, r_0, r_0, r_1)``
        and ``T(r_0, r_0, r_0, r_2)`` >= 0 and the frame a rotation."""
        r0, r1, r2 = frame.unbind(-1)
        cube = torch.einsum("vabcd,va,vb,vc->vd", fourth, r0, r0, r0)
        s_xy = torch.where((cube * r1).sum(-1) < 0, -1.0, 1.0).to(frame.dtype)
        s_xz = torch.where((cube * r2).sum(-1) < 0, -1.0, 1.0).to(frame.dtype)
        # Axis signs d change the two statistics by d_x d_y and d_x d_z and
        # the determinant by d_x d_y d_z.
        d_x = s_xy * s_xz * torch.sign(torch.linalg.det(frame))
        return torch.stack([d_x, d_x * s_xy, d_x * s_xz], dim=-1)


def rotate_outer(entries, frames, *, to_frame):
    """Outer products n n^T given by their 6 upper entries (..., 6) (rows of
    ``numpy.triu_indices(3)``), written in the voxels' frames (``to_frame``:
    R^T m R) or back in the lab (R m R^T); ``frames`` (..., 3, 3).

    Parameters
    ----------
    entries : torch.Tensor, shape (..., 6)
        The upper-triangle entries of the outer products.
    frames : torch.Tensor, shape (..., 3, 3)
        The voxels' rotations R.
    to_frame : bool
        True: write in the voxels' frames (R^T m R); False: back in the lab
        (R m R^T).

    Returns
    -------
    torch.Tensor, shape (..., 6)
        The rotated products' upper-triangle entries.
    """
    iu = np.triu_indices(3)
    m = entries.new_zeros(entries.shape[:-1] + (3, 3))
    m[..., iu[0], iu[1]] = entries
    m[..., iu[1], iu[0]] = entries
    r = frames.to(entries.dtype)
    m = r.mT @ m @ r if to_frame else r @ m @ r.mT
    return m[..., iu[0], iu[1]]
