"""Acquisition protocols: waveforms paired with b-values and directions.

Public API units follow DIPY: b-values in s/mm^2, gradient directions as
unit vectors, times in seconds (the waveforms of :mod:`.waveforms`). Internally
b in us/um^2 is numerically equal to b in s/mm^2. :class:`Protocol` is the
simulator's acquisition; :func:`published_protocol` and :func:`hcp_protocol`
are the named ones.
"""

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from dipy.core.gradients import GradientTable

from ..checks import check_int
from .waveforms import (
    GAMMA_UM_US,
    PGSE,
    UNIT_ATOL,
    Waveform,
    broadcast_waveforms,
    pgse_waveforms,
    readonly,
    with_echo_times,
)

__all__ = [
    "Protocol",
    "as_protocol",
    "check_bvals",
    "check_linear_encoding",
    "unit_rows",
    "BVALUE_RANGE",
    "fibonacci_sphere",
    "published_protocol",
    "hcp_protocol",
]


def check_linear_encoding(btens, bvals):
    """Reject b-tensors that a single gradient direction cannot produce.

    Parameters
    ----------
    btens : ndarray, shape (N, 3, 3) or None
        ``gtab.btens``; None (DIPY's default, linear encoding) passes.
    bvals : ndarray, shape (N,)
        b-values, 0 for the b = 0 volumes (their b-tensor is not checked).
    """
    if btens is None:
        return
    btens = np.asarray(btens, dtype=np.float64)
    eigvals = np.linalg.eigvalsh(btens[bvals > 0])
    # A linear (rank-1) b-tensor has a single non-zero eigenvalue.
    if np.any(eigvals[:, 1] > 1e-3 * eigvals[:, 2]):
        raise ValueError(
            "gtab has planar or spherical b-tensors (btens); only linear "
            "encoding is supported (gradient_table(..., btens=None or 'LTE')). "
            "Protocol.from_gtab also takes waveform= with a suitable waveform "
            "per volume"
        )


def unit_rows(bvecs):
    """``bvecs`` (N, 3) with its non-zero rows normalised to unit length.

    DIPY accepts gradient directions within ``atol`` of unit length, as
    scanners write them; the simulator and the fits need unit vectors.
    """
    bvecs = np.array(bvecs, dtype=np.float64)
    norms = np.linalg.norm(bvecs, axis=1, keepdims=True)
    return np.divide(bvecs, norms, out=np.zeros_like(bvecs), where=norms > 0)


#: b-values (s/mm^2) of plausible diffusion-weighted shells: clinical shells
#: are 300-3,000, preclinical and ex vivo ones up to 20,000-30,000. A table
#: whose weighted shells all lie outside has its b-values in another unit:
#: s/m^2 (1 s/mm^2 = 1e6 s/m^2) above, ms/um^2 (1 ms/um^2 = 1,000 s/mm^2)
#: below.
BVALUE_RANGE = (50.0, 30_000.0)

#: Above this no b-value is in s/mm^2 (the strongest ex vivo gradients reach
#: about 1e5): a table with such volumes among plausible ones mixes units
#: (two acquisitions joined, one of them in s/m^2).
BVALUE_MAX = 1e6


def check_bvals(bvals, *, b0_threshold=0.0, name="gtab.bvals"):
    """b-values (s/mm^2) that can be fitted, as a float64 array.

    Parameters
    ----------
    bvals : array_like, shape (n,)
        b-values in s/mm^2.
    b0_threshold : float, optional
        b-values at or below it count as b = 0 (DIPY's ``gtab.b0_threshold``).
    name : str, optional
        Argument name used in error messages.

    Returns
    -------
    bvals : ndarray, shape (n,)

    Raises
    ------
    ValueError
        A negative or non-finite b-value, no diffusion-weighted volume
        (b > ``b0_threshold``), no diffusion-weighted shell within
        :data:`BVALUE_RANGE` (b-values in s/m^2 or ms/um^2), or b-values
        above :data:`BVALUE_MAX` beside plausible ones (mixed units), with
        the fix.
    """
    try:
        bvals = np.asarray(bvals, dtype=np.float64).ravel()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numbers in s/mm^2, got {bvals!r}") from err
    bad = ~np.isfinite(bvals) | (bvals < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} has a negative or non-finite b-value ({bvals[i]:g} at volume "
            f"{i}); b-values are >= 0 in s/mm^2. Fix the b-value file (DIPY would "
            "silently count a negative b as b = 0)."
        )
    low, high = BVALUE_RANGE
    weighted = bvals[bvals > b0_threshold]
    if weighted.size == 0:
        largest = float(bvals.max()) if bvals.size else 0.0
        hint = (
            " If your b-values are in ms/um^2 (1 ms/um^2 = 1,000 s/mm^2), multiply "
            "them by 1,000."
            if 0 < largest <= low
            else " Pass a table with at least one diffusion-weighted shell."
        )
        raise ValueError(
            f"{name} has no diffusion-weighted volume: every b-value is <= "
            f"b0_threshold {b0_threshold:g} s/mm^2 (largest {largest:g}); the "
            f"signal decay of diffusion-weighted volumes is what is fitted.{hint}"
        )
    if not np.any((weighted >= low) & (weighted <= high)):
        if weighted.min() > high:
            unit = (
                "these look like s/m^2 (1 s/mm^2 = 1e6 s/m^2): divide them by 1e6, "
                f"e.g. {weighted.min():g} s/m^2 = {weighted.min() * 1e-6:g} s/mm^2"
            )
        elif weighted.max() < low:
            unit = (
                "these look like ms/um^2 (1 ms/um^2 = 1,000 s/mm^2): multiply them "
                f"by 1,000, e.g. {weighted.max():g} ms/um^2 = "
                f"{weighted.max() * 1e3:g} s/mm^2"
            )
        else:
            unit = "check the unit of the b-value file"
        raise ValueError(
            f"{name} has no diffusion-weighted shell between {low:g} and {high:g} "
            f"s/mm^2 (weighted b-values {weighted.min():g} to {weighted.max():g}); "
            f"b-values must be in s/mm^2 (DIPY's unit): {unit}."
        )
    if weighted.max() > BVALUE_MAX:
        i = int(np.argmax(bvals))
        raise ValueError(
            f"{name} has b-values above {BVALUE_MAX:g} s/mm^2, which no scanner "
            f"reaches ({bvals[i]:g} at volume {i}), beside plausible ones: the "
            "table mixes units. Volumes in s/m^2 must be divided by 1e6 "
            f"(e.g. {bvals[i]:g} s/m^2 = {bvals[i] * 1e-6:g} s/mm^2)."
        )
    return bvals


_MISSING_TIMING = (
    "gtab.{name} is None: the simulator needs the gradient timing. Build the "
    "table with gradient_table(bvals, bvecs=bvecs, big_delta=..., "
    "small_delta=...) with times in seconds (e.g. big_delta=0.02, "
    "small_delta=0.01; scalars or one value per volume), or pass waveform= to "
    "Protocol.from_gtab"
)


@dataclass(frozen=True, eq=False)
class Protocol:
    """Ordered set of acquisitions (waveform, unit direction, b-value).

    Parameters
    ----------
    waveforms : sequence of Waveform
        One waveform per acquisition (length n).
    bvals : array_like, shape (n,)
        b-values in s/mm^2 (>= 0).
    bvecs : array_like, shape (n, 3)
        Gradient directions. Rows with b > 0 must have unit length within
        1e-3 (they are then normalised exactly); rows with b = 0 are ignored
        and stored as zeros.

    Notes
    -----
    The gradient amplitude of each acquisition follows from its b-value and
    its waveform's b-factor, see :attr:`gradient_rate`. Unlike DIPY's
    ``GradientTable``, slicing a Protocol also slices the timing.
    """

    waveforms: tuple
    bvals: np.ndarray
    bvecs: np.ndarray

    def __post_init__(self):
        waveforms = tuple(self.waveforms)
        for i, waveform in enumerate(waveforms):
            if not isinstance(waveform, Waveform):
                raise TypeError(
                    f"waveforms[{i}] is a {type(waveform).__name__}; expected a "
                    "Waveform such as PGSE(small_delta=..., big_delta=...)"
                )
        n = len(waveforms)
        bvals = self._checked_bvals(self.bvals, n)
        bvecs = self._checked_bvecs(self.bvecs, bvals)
        object.__setattr__(self, "waveforms", waveforms)
        object.__setattr__(self, "bvals", readonly(bvals))
        object.__setattr__(self, "bvecs", readonly(bvecs))
        for waveform, idx in self.groups():
            if waveform.bfactor_us3 <= 0 and np.any(bvals[idx] > 0):
                raise ValueError(
                    f"{waveform!r} has zero b-factor but is used with b > 0 "
                    f"(acquisitions {idx[bvals[idx] > 0].tolist()})"
                )

    @staticmethod
    def _checked_bvals(bvals, n):
        bvals = np.array(bvals, dtype=np.float64)
        if bvals.shape != (n,):
            raise ValueError(
                f"bvals has shape {bvals.shape} but there are {n} waveforms; "
                "give one b-value per acquisition"
            )
        if not np.all(np.isfinite(bvals) & (bvals >= 0)):
            raise ValueError("bvals must be finite and >= 0 (in s/mm^2)")
        return bvals

    @staticmethod
    def _checked_bvecs(bvecs, bvals):
        n = bvals.size
        bvecs = np.array(bvecs, dtype=np.float64)
        if bvecs.size == 0 and n == 0:
            bvecs = bvecs.reshape(0, 3)
        if bvecs.shape != (n, 3):
            hint = "; transpose it (bvecs.T)" if bvecs.shape == (3, n) else ""
            raise ValueError(f"bvecs must have shape ({n}, 3), got {bvecs.shape}{hint}")
        weighted = bvals > 0
        norms = np.linalg.norm(bvecs[weighted], axis=1)
        bad = ~(np.abs(norms - 1.0) <= UNIT_ATOL)
        if bad.any():
            i = int(np.flatnonzero(weighted)[bad][0])
            raise ValueError(
                f"bvecs[{i}] has length {norms[bad][0]:.6g}, but directions with "
                "b > 0 must be unit vectors (within 1e-3); normalise them with "
                "bvecs / np.linalg.norm(bvecs, axis=1, keepdims=True)"
            )
        out = np.zeros_like(bvecs)
        out[weighted] = bvecs[weighted] / norms[:, None]
        return out

    # -- constructors -------------------------------------------------------

    @classmethod
    def from_arrays(cls, bvals, bvecs, waveforms):
        """Build a protocol from b-values, directions and waveform(s).

        Parameters
        ----------
        bvals : array_like, shape (n,)
            b-values in s/mm^2.
        bvecs : array_like, shape (n, 3)
            Unit directions (ignored where b = 0).
        waveforms : Waveform or sequence of Waveform
            One waveform for all acquisitions, or one per acquisition.

        Returns
        -------
        protocol : Protocol
        """
        n = np.size(bvals)
        return cls(
            waveforms=broadcast_waveforms(waveforms, n), bvals=bvals, bvecs=bvecs
        )

    @classmethod
    def pgse(cls, bvals, bvecs, *, small_delta, big_delta):
        """Build a PGSE protocol.

        Parameters
        ----------
        bvals : array_like, shape (n,)
            b-values in s/mm^2.
        bvecs : array_like, shape (n, 3)
            Unit directions (ignored where b = 0).
        small_delta, big_delta : float or array_like, shape (n,)
            Pulse duration and separation in seconds, scalars or one value per
            acquisition.

        Returns
        -------
        protocol : Protocol
        """
        n = np.size(bvals)
        return cls(
            waveforms=pgse_waveforms(small_delta, big_delta, n),
            bvals=bvals,
            bvecs=bvecs,
        )

    @classmethod
    def from_gtab(cls, gtab, *, waveform=None, echo_time=None):
        """Build a protocol from a DIPY gradient table.

        Parameters
        ----------
        gtab : dipy.core.gradients.GradientTable
            Table with ``big_delta`` and ``small_delta`` in seconds (scalars or
            one value per volume), unless ``waveform`` is given.
        waveform : Waveform or sequence of Waveform, optional
            Overrides the table's timing: one waveform for all volumes or one
            per volume.
        echo_time : float or array_like (n_volumes,), optional
            The echo time in seconds (one, or one per volume, e.g. a Camino
            scheme's TE column): DIPY's table has none. Each volume's
            encoding then sits in a spin echo of that time
            (:class:`~dipy_spinverse.sim.waveforms.SpinEcho`), so that a T2
            per compartment weighs the compartments as the scanner's echo
            time does. Default: the echo ends with the encoding.

        Returns
        -------
        protocol : Protocol
            One PGSE acquisition per volume (or the given waveforms).

        Notes
        -----
        b-values at or below ``gtab.b0_threshold`` are treated as b = 0, as
        DIPY does for ``gtab.b0s_mask``. Directions with b > 0 are renormalised,
        since DIPY accepts directions within ``atol`` of unit length. The
        b-values are checked by :func:`check_bvals`: none negative, at least
        one diffusion-weighted volume, and a shell in s/mm^2.
        """
        threshold = 0.0 if gtab.b0_threshold is None else gtab.b0_threshold
        bvals = check_bvals(gtab.bvals, b0_threshold=threshold)
        bvals = np.where(bvals <= threshold, 0.0, bvals)
        check_linear_encoding(gtab.btens, bvals)
        n = bvals.size
        if waveform is None:
            for name in ("big_delta", "small_delta"):
                if getattr(gtab, name) is None:
                    raise ValueError(_MISSING_TIMING.format(name=name))
            waveforms = pgse_waveforms(gtab.small_delta, gtab.big_delta, n)
        else:
            waveforms = broadcast_waveforms(waveform, n)
        # DIPY checked the directions against the table's own tolerance
        # (gradient_table's atol) when it built the table; only rows that
        # cannot be normalised are refused here.
        norms = np.linalg.norm(np.asarray(gtab.bvecs, dtype=np.float64), axis=1)
        bad = (bvals > 0) & ~(norms > 0)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"gtab.bvecs has no direction (|bvec| = {norms[first]:g}) for volume "
                f"{first}, whose b-value {bvals[first]:g} s/mm^2 is above "
                f"b0_threshold {threshold:g}; fix the b-vectors or the b-values."
            )
        bvecs = unit_rows(gtab.bvecs)
        waveforms = with_echo_times(waveforms, echo_time)
        return cls(waveforms=waveforms, bvals=bvals, bvecs=bvecs)

    @classmethod
    def concatenate(cls, *protocols):
        """Join protocols, in order, into one.

        Parameters
        ----------
        *protocols : Protocol
            At least one protocol.

        Returns
        -------
        protocol : Protocol
        """
        if not protocols:
            raise ValueError("concatenate needs at least one Protocol")
        for p in protocols:
            if not isinstance(p, Protocol):
                raise TypeError(
                    f"concatenate takes Protocol objects, got {type(p).__name__}"
                )
        return cls(
            waveforms=sum((p.waveforms for p in protocols), ()),
            bvals=np.concatenate([p.bvals for p in protocols]),
            bvecs=np.concatenate([p.bvecs for p in protocols]),
        )

    def __add__(self, other):
        if not isinstance(other, Protocol):
            return NotImplemented
        return Protocol.concatenate(self, other)

    # -- views --------------------------------------------------------------

    def __len__(self):
        return len(self.waveforms)

    @property
    def n_acquisitions(self):
        """Number of acquisitions."""
        return len(self.waveforms)

    def __getitem__(self, key):
        """Sub-protocol from an int, slice, index array or boolean mask.

        An int gives a protocol with one acquisition.
        """
        idx = np.atleast_1d(np.arange(len(self))[key])
        return Protocol(
            waveforms=tuple(self.waveforms[i] for i in idx),
            bvals=self.bvals[idx],
            bvecs=self.bvecs[idx],
        )

    def __repr__(self):
        if len(self) == 0:
            return "Protocol(n_acquisitions=0)"
        return (
            f"Protocol(n_acquisitions={len(self)}, "
            f"n_waveforms={len(self.groups())}, "
            f"b={self.bvals.min():g}..{self.bvals.max():g} s/mm^2)"
        )

    def groups(self):
        """Group acquisitions that share a waveform.

        Returns
        -------
        groups : list of (Waveform, ndarray of int)
            Each distinct waveform (by equality) with the indices of its
            acquisitions, in order of first appearance.
        """
        index = {}
        for i, waveform in enumerate(self.waveforms):
            index.setdefault(waveform, []).append(i)
        return [(w, np.asarray(idx, dtype=np.intp)) for w, idx in index.items()]

    def sequences(self):
        """The protocol's sequences in the package's one order.

        A sequence is the set of acquisitions sharing a waveform
        (:meth:`groups`). They are ranked by decreasing diffusion time (echo
        time for waveforms without one), ties in order of first appearance:
        rank 0 is the longest diffusion time. Curriculum stages, per-sequence
        S0 and reports all use this order.

        Returns
        -------
        sequences : list of (Waveform, ndarray of int)
        """

        def diffusion_time(group):
            waveform = group[0]
            t = waveform.diffusion_time
            return t if t is not None else waveform.echo_time

        return sorted(self.groups(), key=diffusion_time, reverse=True)

    @cached_property
    def _bfactors_us3(self):
        bfactors = np.empty(len(self))
        for waveform, idx in self.groups():
            bfactors[idx] = waveform.bfactor_us3
        return bfactors

    @cached_property
    def gradient_rate(self):
        """gamma G times the direction, in rad/(um us), shape (n, 3).

        Chosen so that ``|rate|^2 * waveform.bfactor_us3`` equals b (us/um^2,
        numerically s/mm^2) for the simulated, piecewise-constant waveform.
        """
        bfactors = self._bfactors_us3
        magnitude = np.sqrt(
            np.divide(
                self.bvals,
                bfactors,
                out=np.zeros(len(self)),
                where=self.bvals > 0,
            )
        )
        return readonly(magnitude[:, None] * self.bvecs)

    @property
    def gradient_strength(self):
        """Gradient amplitude G in T/m, shape (n,)."""
        return np.linalg.norm(self.gradient_rate, axis=1) / GAMMA_UM_US

    @property
    def echo_times(self):
        """Echo time of each acquisition in seconds, shape (n,)."""
        return np.array([w.echo_time for w in self.waveforms], dtype=np.float64)


def as_protocol(protocol):
    """Return ``protocol`` as a :class:`Protocol`.

    Parameters
    ----------
    protocol : Protocol or dipy.core.gradients.GradientTable
        A protocol (returned as is) or a gradient table with timing
        (converted with :meth:`Protocol.from_gtab`).

    Returns
    -------
    protocol : Protocol
    """
    if isinstance(protocol, Protocol):
        return protocol
    if isinstance(protocol, GradientTable):
        return Protocol.from_gtab(protocol)
    raise TypeError(
        f"protocol must be a Protocol or a dipy GradientTable, got "
        f"{type(protocol).__name__}"
    )


def fibonacci_sphere(n, *, hemisphere=False):
    """Deterministic, evenly spread unit vectors (golden-angle spiral).

    Parameters
    ----------
    n : int
        Number of directions (>= 1).
    hemisphere : bool, optional
        Place all points on the z >= 0 hemisphere. Diffusion signal magnitudes
        are symmetric under g -> -g, so this spreads n directions better.

    Returns
    -------
    directions : ndarray, shape (n, 3)
    """
    n = check_int(n, "n", 1)
    i = np.arange(n) + 0.5
    z = 1.0 - i / n if hemisphere else 1.0 - 2.0 * i / n
    radius = np.sqrt(1.0 - z * z)
    golden_angle = np.pi * (3.0 - np.sqrt(5.0))
    phi = golden_angle * np.arange(n)
    return np.column_stack([radius * np.cos(phi), radius * np.sin(phi), z])


#: (small_delta, big_delta) in seconds of the published Spinverse protocol.
_PUBLISHED_TIMINGS = ((0.005, 0.006), (0.010, 0.020), (0.010, 0.060))
_PUBLISHED_BVALS = (0.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0)


def published_protocol(*, b0_per_direction=True, n_directions=30):
    """The PGSE protocol of the Spinverse paper.

    PGSE (delta, Delta) = (5, 6), (10, 20), (10, 60) ms; b = 0, 1000, ...,
    5000 s/mm^2; ``n_directions`` directions from :func:`fibonacci_sphere`
    per shell. Acquisitions are ordered by sequence, then b, then direction.

    Parameters
    ----------
    b0_per_direction : bool, optional
        Repeat the b = 0 acquisition once per direction, as in the paper
        (3 x 6 x 30 = 540 acquisitions). If False, one b = 0 per sequence
        (3 x (1 + 5 x 30) = 453).
    n_directions : int, optional
        Directions per shell.

    Returns
    -------
    protocol : Protocol
    """
    directions = fibonacci_sphere(n_directions)
    waveforms, bvals, bvecs = [], [], []
    for small_delta, big_delta in _PUBLISHED_TIMINGS:
        waveform = PGSE(small_delta=small_delta, big_delta=big_delta)
        for bval in _PUBLISHED_BVALS:
            dirs = directions if bval > 0 or b0_per_direction else np.zeros((1, 3))
            waveforms.extend([waveform] * len(dirs))
            bvals.extend([bval] * len(dirs))
            bvecs.append(dirs)
    return Protocol(waveforms=tuple(waveforms), bvals=bvals, bvecs=np.vstack(bvecs))


#: PGSE timing (small_delta, big_delta) in seconds of the WU-Minn HCP
#: diffusion protocol (Sotiropoulos et al. 2013, NeuroImage 80:125).
_HCP_TIMING = (0.0106, 0.0431)
_HCP_BVALS = (1000.0, 2000.0, 3000.0)


def _rotation_z(angle):
    """Rotation matrix by ``angle`` (radians) about the z axis."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def hcp_protocol(*, n_directions=90, n_b0=18):
    """The WU-Minn Human Connectome Project's diffusion protocol (PGSE).

    PGSE with the published timing of the HCP (Sotiropoulos et al. 2013,
    NeuroImage 80:125): delta = 10.6 ms, Delta = 43.1 ms (diffusion time
    Delta - delta / 3 = 39.6 ms); shells b = 1000, 2000, 3000 s/mm^2 of
    ``n_directions`` directions each and ``n_b0`` b = 0 volumes: 18 + 3 x 90
    = 288 acquisitions by default, the volumes of the HCP's released
    diffusion data.

    Parameters
    ----------
    n_directions : int, optional
        Directions per shell (>= 1).
    n_b0 : int, optional
        Number of b = 0 acquisitions (>= 0).

    Returns
    -------
    protocol : Protocol
        One :class:`PGSE` waveform for every acquisition. The weighted
        acquisitions come shell by shell (b = 1000, then 2000, then 3000),
        and the b = 0 ones are interspersed evenly among them: acquisition
        ``k * n // n_b0`` is the k-th b = 0 (n acquisitions in all), which
        is the first of every 16 by default (0, 16, ..., 272), as the HCP
        spread 6 b = 0 volumes over each run of 96.

    Notes
    -----
    What is reproduced: the nominal b-values, the number of volumes per
    shell and of b = 0 volumes, and the published PGSE timing, so that the
    simulated diffusion time and b-values are the HCP's. At b = 3000 the
    implied gradient amplitude is 97 mT/m, within the 100 mT/m of the HCP's
    Connectome Skyra.

    What is not: the scanner's gradient tables (the HCP's directions, with
    the three shells interleaved within each run, and b-values that differ
    slightly from the nominal ones), the order of its volumes, the
    acquisition of each table twice with opposite phase encoding (RL and
    LR; the 288 volumes here are one copy), and the details of its
    monopolar encoding: the lobes here are rectangular (no gradient ramps),
    and the echo time of the waveform is Delta + delta = 53.7 ms, not the
    scanner's 89.5 ms (which matters only for a T2 given to the simulator).

    The directions of each shell are :func:`fibonacci_sphere` ``(n_directions,
    hemisphere=True)``, evenly spread with g and -g counted as one (which
    the signal cannot tell apart), rotated about z by 0, 120 and 240
    degrees for the three shells: every shell has its own set, and together
    they cover the sphere more finely than one set repeated. The protocol is
    deterministic.

    All weighted acquisitions share one diffusion time, so
    :func:`~dipy_spinverse.reconst.plausibility.protocol_problems` reports
    that restriction, permeability and cell size trade off at it: with
    ``fit_method="search"``, :class:`~dipy_spinverse.reconst.SpinverseModel`
    warns and every fitted voxel has status ``UNDERDETERMINED``.
    ``fit_method="posterior"`` is the method for such a protocol: its
    calibrated intervals say what one diffusion time leaves open.

    Examples
    --------
    As a DIPY gradient table (:meth:`Protocol.from_gtab` reads it back):

    >>> from dipy.core.gradients import gradient_table
    >>> protocol = hcp_protocol()
    >>> len(protocol)
    288
    >>> gtab = gradient_table(protocol.bvals, bvecs=protocol.bvecs,
    ...                       small_delta=0.0106, big_delta=0.0431)
    """
    n_directions = check_int(n_directions, "n_directions", 1)
    n_b0 = check_int(n_b0, "n_b0", 0)
    base = fibonacci_sphere(n_directions, hemisphere=True)
    turns = np.arange(len(_HCP_BVALS)) * (2.0 * np.pi / len(_HCP_BVALS))
    weighted_bvecs = np.vstack([base @ _rotation_z(angle).T for angle in turns])
    weighted_bvals = np.repeat(_HCP_BVALS, n_directions)
    n = n_b0 + weighted_bvals.size
    is_b0 = np.zeros(n, dtype=bool)
    is_b0[np.arange(n_b0) * n // max(n_b0, 1)] = True
    bvals = np.zeros(n)
    bvals[~is_b0] = weighted_bvals
    bvecs = np.zeros((n, 3))
    bvecs[~is_b0] = weighted_bvecs
    small_delta, big_delta = _HCP_TIMING
    waveform = PGSE(small_delta=small_delta, big_delta=big_delta)
    return Protocol(waveforms=(waveform,) * n, bvals=bvals, bvecs=bvecs)
