r"""A shell's token: what the set encoder reads of it, whatever the orientation.

Each shell (:class:`~.shells.Shell`) becomes a token: its b, delta and
Delta, the rotation invariants ``sqrt(p_l)``, ``p_l = sum_m c_lm^2``, of its
b0-normalised signal's even spherical harmonics (l = 0, 2, and 4 where it
has 15 directions or more), how many directions they rest on, and the
signal's Legendre coefficients ``a_2``, ``a_4`` about the voxel's common
axis (the most distinct axis of the sum of the shells' l = 2 parts: the
fibres' direction, which every shell shares). None of these depends on the
tissue's orientation.
"""

import functools
import math

import numpy as np
from dipy.core.sphere import cart2sphere
from dipy.reconst.shm import real_sh_descoteaux

from ...sim.sequences import fibonacci_sphere
from .design import DIRECTIONS

__all__ = ["N_TOKEN", "shell_token_features"]

#: Token features: b / 1000, delta / 10 ms, Delta / 100 ms, sqrt p_0,
#: sqrt p_2, sqrt p_4, directions read (0 at 6, 1 at 20, log scale), l = 4
#: estimated (0 or 1), and the signal's Legendre coefficients a_2, a_4 about
#: the voxel's common axis (estimated from all the shells read).
N_TOKEN = 10


def shell_token_features(shells, signals, present=None):
    """The shells' tokens of b0-normalised signals.

    Parameters
    ----------
    shells : sequence of Shell
    signals : ndarray (n, n_acquisitions)
        b0-normalised.
    present : ndarray of bool (n, len(shells)), optional
        Which shells each voxel is read through (default all): the common
        axis is estimated from those alone.

    Returns
    -------
    ndarray of float32 (n, len(shells), N_TOKEN)
    """
    n = len(signals)
    present = np.ones((n, len(shells)), bool) if present is None else present
    coefs = [signals[:, shell.rows] @ shell.pinv.T for shell in shells]
    axis_sh = _axis_harmonics(shells, coefs, present)
    out = np.zeros((n, len(shells), N_TOKEN), dtype=np.float32)
    lo, hi = DIRECTIONS
    for s, (shell, coef) in enumerate(zip(shells, coefs, strict=True)):
        power = [np.sqrt((coef[:, shell.order == lv] ** 2).sum(1)) for lv in (0, 2, 4)]
        along = coef * axis_sh[:, : coef.shape[1]]
        read = min(len(shell.rows), hi)
        out[:, s, 0] = shell.b / 1e3
        out[:, s, 1] = shell.small_delta / 1e-2
        out[:, s, 2] = shell.big_delta / 1e-1
        out[:, s, 3:6] = np.column_stack(power)
        out[:, s, 6] = math.log(read / lo) / math.log(hi / lo)
        out[:, s, 7] = float((shell.order == 4).any())
        out[:, s, 8] = along[:, shell.order == 2].sum(1)
        out[:, s, 9] = along[:, shell.order == 4].sum(1)
    return out


def _axis_harmonics(shells, coefs, present):
    """The spherical harmonics (n, 15) at each voxel's common axis: the
    most distinct eigenvector of the sum of its shells' l = 2 parts (as
    traceless quadratic forms), over the shells ``present``."""
    total = np.zeros((len(present), 5))
    for s, (shell, coef) in enumerate(zip(shells, coefs, strict=True)):
        total += coef[:, shell.order == 2] * present[:, s, None]
    entries = total @ _quadratic_map().T
    xx, yy, zz, xy, xz, yz = entries.T
    forms = np.stack(
        [
            np.stack([xx, xy, xz], -1),
            np.stack([xy, yy, yz], -1),
            np.stack([xz, yz, zz], -1),
        ],
        -2,
    )
    values, vectors = np.linalg.eigh(forms)
    pick = np.argmax(np.abs(values), axis=1)
    axis = np.take_along_axis(vectors, pick[:, None, None], axis=2)[..., 0]
    _, theta, phi = cart2sphere(*axis.T)
    return real_sh_descoteaux(4, theta, phi, legacy=False)[0]


@functools.cache
def _quadratic_map():
    """The linear map (6, 5) from l = 2 coefficients to the entries (xx, yy,
    zz, xy, xz, yz) of the traceless quadratic form they are."""
    g = fibonacci_sphere(60)
    _, theta, phi = cart2sphere(*g.T)
    basis, _, order = real_sh_descoteaux(2, theta, phi, legacy=False)
    x, y, z = g.T
    design = np.column_stack([x * x, y * y, z * z, 2 * x * y, 2 * x * z, 2 * y * z])
    return np.linalg.pinv(design) @ basis[:, order == 2]
