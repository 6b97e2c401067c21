"""Tissue probability maps from multi-contrast images (BMapEst-style).

A voxel holds tissues (csf, gm, wm by default) in proportions ``p`` (non-
negative, summing to one). Each tissue has known T1, T2 and proton density;
the known sequences turn them into images, and the proportions are fitted
to the measured images.

``mixing="signal"`` (default): a voxel's signal is the proportion-weighted
sum of its tissues' signals, as partial volumes add. The model is then
linear in ``p`` (up to the magnitude a scanner takes), and each voxel's fit
is a least-squares problem over the simplex, solved exactly for all voxels
at once (:mod:`.simplex`). ``mixing="parameters"``: BMapEst's choice, the
voxel's T1, T2 and PD are the proportion-weighted means of the tissues',
the signal is nonlinear in ``p``, and the proportions are fitted from the
best point of a simplex lattice by projected Levenberg-Marquardt (Adam
through the signal formulas when ``smoothness > 0``).

References
----------
.. [1] Gupta U., Nikolakakis E., Zaiss M., Marinescu R. BMapEst: Estimation
   of Brain Tissue Probability Maps using a Differentiable MRI Simulator.
   https://github.com/BioMedAI-UCSC/BMapEst
"""

import itertools
import math
import numbers
import warnings

import numpy as np
import torch

from ..checks import (
    check_choice,
    check_device,
    check_int,
    check_mask_values,
    check_number,
    check_positive,
    check_seconds,
)
from .simplex import MAX_TISSUES, SimplexLstsq, nonneg_lstsq, project_simplex

__all__ = [
    "TISSUE_DEFAULTS",
    "TissueMapModel",
    "TissueMapFit",
    "GAINS",
    "MIXINGS",
    "STATUS_CODES",
    "MISFIT_THRESHOLD",
    "OK",
    "NONFINITE",
    "POOR_FIT",
    "MASKED",
]

#: Literature relaxation times (seconds) and relative proton density of
#: brain tissue at 1.5 T and 3 T, in the order csf, gm, wm. GM and WM T1 and
#: T2: Stanisz G. J. et al., "T1, T2 relaxation and magnetization transfer in
#: tissue at 3T", Magn. Reson. Med. 54:507-512 (2005), Table 1 (1.5 T and
#: 3 T). CSF T1: about 4.3 s at 3 T (Lu H. et al., "Routine clinical brain
#: MRI sequences for use at 3.0 Tesla", J. Magn. Reson. Imaging 22:13-22,
#: 2005), taken as 4.2 s at 1.5 T (CSF T1 depends little on the field);
#: CSF T2 about 2 s (water-like; e.g. Spijkerman J. M. et al., MAGMA
#: 31:415-424, 2018). Proton density: water content relative to CSF, GM 0.8
#: and WM 0.7 (e.g. Neeb H. et al., NeuroImage 31:1156-1168, 2006).
#: Published values spread by 10-30 % with the method; pass ``tissues=``
#: with your own.
TISSUE_DEFAULTS = {
    1.5: {
        "csf": dict(t1=4.2, t2=2.0, pd=1.0),
        "gm": dict(t1=1.124, t2=0.095, pd=0.8),
        "wm": dict(t1=0.884, t2=0.072, pd=0.7),
    },
    3.0: {
        "csf": dict(t1=4.3, t2=2.0, pd=1.0),
        "gm": dict(t1=1.820, t2=0.099, pd=0.8),
        "wm": dict(t1=1.084, t2=0.069, pd=0.7),
    },
}

MIXINGS = ("signal", "parameters")
#: Receive gain models: one unknown scale for all images ("global"), one per
#: voxel ("voxel", a receive-bias field; needs as many contrasts as
#: tissues), or a known number.
GAINS = ("global", "voxel")

_PROPERTIES = ("t1", "t2", "pd")

#: Per-voxel status of a tissue map fit (the codes of
#: :data:`dipy_spinverse.reconst.STATUS_CODES` where they mean the same).
OK, NONFINITE, POOR_FIT, MASKED = 0, 1, 5, -2
STATUS_CODES = {
    OK: "ok",
    NONFINITE: "images hold NaN, inf or negative values: not fitted",
    POOR_FIT: "the predicted images miss the measured ones by more than "
    "misfit_threshold (relative): the sequences, tissues or order of the "
    "images do not explain the data",
    MASKED: "outside the mask",
}

#: Default ``misfit_threshold``: the largest relative RMS misfit
#: ``|predicted - measured| / |measured|`` of a voxel fitted as OK. Noise at
#: SNR 20 gives about 5 %, literature tissue values off by 10-30 % about
#: 5-15 %; a misordered or mislabelled contrast gives 30-100 %.
MISFIT_THRESHOLD = 0.25

# Voxels darker than this fraction of the median are compared to it.
_DARK = 0.25
# A given order of the images is refused when another order of its
# sequences fits the median voxel this many times better (and well).
_ORDER_RATIO = 3.0
# Voxels of the order check (evenly strided over the mask), and the most
# orders it tries (5 sequences; more are not checked).
_ORDER_VOXELS = 500
_ORDER_MAX = 120


# Longest plausible relaxation times (s): CSF's T1 is about 4 s and its T2
# about 2 s, at any field strength.
_MAX_RELAXATION = {"t1": 15.0, "t2": 5.0}


def _check_tissues(tissues):
    if not isinstance(tissues, dict) or not 2 <= len(tissues) <= MAX_TISSUES:
        raise ValueError(
            f"tissues must be a dict of 2 to {MAX_TISSUES} names -> "
            f"dict(t1=..., t2=..., pd=...), got {tissues!r}."
        )
    table = {}
    for name, values in tissues.items():
        if not isinstance(values, dict) or set(values) != set(_PROPERTIES):
            raise ValueError(
                f"tissues[{name!r}] must be dict(t1=..., t2=..., pd=...) (seconds), "
                f"got {values!r}."
            )
        table[str(name)] = {
            key: check_positive(values[key], f"tissues[{name!r}][{key!r}]")
            if key == "pd"
            else check_seconds(
                values[key], f"tissues[{name!r}][{key!r}]", 1.0, _MAX_RELAXATION[key]
            )
            for key in _PROPERTIES
        }
        if table[str(name)]["t2"] > table[str(name)]["t1"]:
            raise ValueError(
                f"tissues[{name!r}] has t2={table[str(name)]['t2']:g} s longer "
                f"than t1={table[str(name)]['t1']:g} s; T2 <= T1 always holds "
                "(the transverse magnetisation cannot outlive the longitudinal "
                "recovery): check the values, or whether t1 and t2 are swapped."
            )
    names = list(table)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if all(
                math.isclose(table[a][k], table[b][k], rel_tol=1e-6)
                for k in _PROPERTIES
            ):
                raise ValueError(
                    f"tissues {a!r} and {b!r} have the same t1, t2 and pd: no "
                    "image can tell them apart, and their probability would be "
                    "split between them arbitrarily. Merge them, or give each "
                    "its own values."
                )
    return table


def _check_sequences(sequences):
    sequences = [sequences] if hasattr(sequences, "signal") else list(sequences or [])
    if not sequences or not all(
        callable(getattr(s, "signal", None)) for s in sequences
    ):
        raise ValueError(
            "sequences must be a non-empty list of sequences with a "
            "signal(t1, t2, pd) method, e.g. [Flash(tr=0.02, te=0.004, "
            f"flip_angle=30)], got {sequences!r}."
        )
    return tuple(sequences)


def _check_gain(gain):
    if isinstance(gain, str):
        return check_choice(gain, "gain", GAINS)
    if isinstance(gain, numbers.Real) and not isinstance(gain, bool):
        return check_positive(gain, "gain")
    raise ValueError(f"gain must be one of {GAINS} or a positive number, got {gain!r}.")


def _relative_misfit(predicted, data):
    """``|predicted - data| / |data|`` of each row, ``|data|`` floored at
    ``_DARK`` times its median (dark voxels: noise is no misfit)."""
    residual = torch.linalg.vector_norm(predicted - data, dim=-1)
    norm = torch.linalg.vector_norm(data, dim=-1)
    norm = norm.clamp_min(_DARK * norm.median())
    ratio = torch.where(norm > 0, residual / norm.clamp_min(1e-300), residual * np.inf)
    ratio = torch.where(residual == 0, torch.zeros_like(ratio), ratio)
    return ratio.cpu().numpy()


def _neighbour_pairs(mask):
    """Index pairs of face-adjacent voxels both in ``mask`` (numbering the
    mask's voxels in C order)."""
    index = np.full(mask.shape, -1, dtype=np.int64)
    index[mask] = np.arange(int(mask.sum()))
    pairs = []
    for axis in range(mask.ndim):
        a = np.moveaxis(index, axis, 0)[:-1].ravel()
        b = np.moveaxis(index, axis, 0)[1:].ravel()
        both = (a >= 0) & (b >= 0)
        pairs.append(np.stack([a[both], b[both]], axis=1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)


class TissueMapModel:
    """Tissue probability maps through a differentiable signal model.

    Parameters
    ----------
    sequences : list
        The sequences of the images, in the order of their last axis:
        :class:`Flash`, :class:`SpinEcho`, :class:`InversionRecovery`,
        :class:`Mprage` (or any object with ``signal(t1, t2, pd)``).
    tissues : dict, optional
        ``name -> dict(t1=..., t2=..., pd=...)`` (seconds; the proton density
        relative). Default: :data:`TISSUE_DEFAULTS` at ``field_strength``
        (csf, gm, wm).
    field_strength : float
        1.5 or 3.0 (tesla): the default tissue values used when ``tissues``
        is not given.
    mixing : str
        "signal" (partial volumes: signals add, exact per-voxel solve) or
        "parameters" (BMapEst: T1, T2, PD are probability-weighted means;
        a lattice search, then projected Levenberg-Marquardt, or Adam
        through the formulas when ``smoothness > 0``).
    gain : str or float
        The receive gain, the unknown scale between the model's signals
        (proton density 1 = CSF) and the image intensities. "global": one
        scale for all images and voxels (images from one scanner session,
        stored on one intensity scale), found by a 1-D search that
        minimises the total misfit, as pure-tissue voxels pin the corners of
        the simplex of possible signals. "voxel": one per voxel (a smooth
        receive-bias field or unknown PD); the voxel's probabilities are
        then its non-negative tissue amounts normalised to sum one, which
        needs at least as many contrasts as tissues. A number: the gain is
        known (1 when the images are in model units).
    smoothness : float
        Weight of the sum of squared differences of neighbouring voxels'
        probabilities against the squared misfit, the images in units of
        their 99th-percentile intensity (0: independent voxels; about 0.01
        at SNR 30). A Gaussian prior: it lowers the noise of partial-volume
        voxels but blurs edges between pure tissues. Refined by projected
        FISTA (``max_iter`` steps) from the exact independent fit.
    max_iter : int
        Iterations of the gradient refinement (mixing="parameters" or
        smoothness > 0).
    noise_weighting : bool or None
        Weight each image by ``1 / sigma``, its noise estimated by the RMS
        residual of a first, unweighted fit (images differ in noise
        relative to their signal). It helps when there are more contrasts
        than tissues (measured on the MNI152 benchmark); with fewer residual
        degrees of freedom the residuals misjudge the noise. None (default):
        on exactly then.
    device : str
        "cpu" or "cuda".
    misfit_threshold : float
        Largest relative RMS misfit ``|predicted - measured| / |measured|``
        of a voxel fitted as OK (``|measured|`` at least a quarter of the
        mask's median: in dark voxels noise is no misfit; default
        :data:`MISFIT_THRESHOLD`). Voxels above it get status ``POOR_FIT``
        (``fit.status``) and a warning counts them. When most voxels are
        above it, the fit tries the other orders of the sequences on a
        sample of the voxels and refuses the images (ValueError naming the
        order) when one fits far better: the images are not in the order of
        ``sequences``.

    Notes
    -----
    Images are magnitudes: the model takes ``|sum of signed signals|`` (the
    signals of an inversion are signed), and the signal-mixing fit stays
    exact by trying both signs of every sequence whose tissues straddle
    their inversion null. With one contrast the probabilities of three
    tissues are not identifiable (a GM value is also a CSF-WM mixture); two
    contrasts identify them if the tissues' signal vectors are not
    collinear; three or more average the noise (and "voxel" gain needs
    three).
    """

    def __init__(
        self,
        sequences,
        *,
        tissues=None,
        field_strength=3.0,
        mixing="signal",
        gain="global",
        smoothness=0.0,
        max_iter=200,
        noise_weighting=None,
        device="cpu",
        misfit_threshold=MISFIT_THRESHOLD,
    ):
        self.sequences = _check_sequences(sequences)
        if tissues is None:
            field_strength = check_choice(
                field_strength, "field_strength", tuple(TISSUE_DEFAULTS)
            )
            tissues = TISSUE_DEFAULTS[float(field_strength)]
        self.field_strength = check_positive(field_strength, "field_strength", "T")
        self.tissues = _check_tissues(tissues)
        self.mixing = check_choice(mixing, "mixing", MIXINGS)
        self.gain = _check_gain(gain)
        self.smoothness = check_number(smoothness, "smoothness", minimum=0)
        self.max_iter = check_int(max_iter, "max_iter", 1)
        if noise_weighting is not None and not isinstance(noise_weighting, bool):
            raise ValueError(
                "noise_weighting must be True, False or None (automatic), got "
                f"{noise_weighting!r}."
            )
        self.noise_weighting = noise_weighting
        self.device = check_device(device)
        self.misfit_threshold = check_positive(misfit_threshold, "misfit_threshold")
        if self.gain == "voxel" and len(self.sequences) < len(self.tissues):
            raise ValueError(
                f"gain='voxel' needs at least as many sequences as tissues "
                f"({len(self.tissues)}), got {len(self.sequences)}; use "
                "gain='global' or add contrasts."
            )
        if len(self.sequences) < 2:
            warnings.warn(
                f"One contrast cannot identify {len(self.tissues)} tissue "
                "probabilities (a mixture of two tissues mimics a third); "
                "expect ill-posed maps.",
                stacklevel=2,
            )
        self.design = self.signals(*self.tissue_properties()).T

    @property
    def uses_noise_weighting(self):
        """Whether fits weight the images by their estimated noise."""
        if self.noise_weighting is None:
            return len(self.sequences) > len(self.tissues)
        return self.noise_weighting

    @property
    def tissue_names(self):
        """Tissue names, in the order of the probabilities' last axis."""
        return tuple(self.tissues)

    def tissue_properties(self):
        """``(t1, t2, pd)`` of the tissues as float64 tensors on the device."""
        return tuple(
            torch.tensor(
                [self.tissues[n][key] for n in self.tissues],
                dtype=torch.float64,
                device=self.device,
            )
            for key in _PROPERTIES
        )

    def signals(self, t1, t2, pd):
        """Signed signals (..., n_sequences) of tissue properties (...)."""
        return torch.stack([s.signal(t1, t2, pd) for s in self.sequences], dim=-1)

    def __repr__(self):
        return (
            f"TissueMapModel({len(self.sequences)} sequences, tissues="
            f"{self.tissue_names}, mixing={self.mixing!r}, gain={self.gain!r})"
        )

    # -- forward model -------------------------------------------------------

    def forward(self, probabilities, gain=1.0):
        """Magnitude images (..., n_sequences) of probabilities (..., n_tissues)."""
        p = torch.as_tensor(probabilities, dtype=torch.float64, device=self.device)
        gain = torch.as_tensor(gain, dtype=torch.float64, device=self.device)
        if self.mixing == "signal":
            signed = p @ self.design.T
        else:
            t1, t2, pd = (p @ v for v in self.tissue_properties())
            signed = self.signals(t1, t2, pd)
        if gain.ndim:
            gain = gain[..., None]
        return gain * signed.abs()

    # -- fitting -------------------------------------------------------------

    def _check_images(self, images, mask):
        images = np.asarray(images, dtype=np.float64)
        n = len(self.sequences)
        if images.ndim < 1 or images.shape[-1] != n:
            raise ValueError(
                f"images must have shape (..., {n}) (one image per sequence on "
                f"the last axis), got shape {images.shape}."
            )
        if mask is None:
            mask = np.ones(images.shape[:-1], dtype=bool)
        else:
            mask = np.asarray(mask)
            if mask.shape != images.shape[:-1]:
                raise ValueError(
                    f"mask must have the images' spatial shape {images.shape[:-1]}, "
                    f"got {mask.shape}."
                )
            mask = check_mask_values(mask)
        if not mask.any():
            raise ValueError("mask selects no voxel.")
        # One bad voxel must not stop the fit: voxels whose images are not
        # finite magnitudes are left out, flagged, and the rest is fitted.
        with np.errstate(invalid="ignore"):
            bad = mask & ~(np.isfinite(images) & (images >= 0)).all(axis=-1)
        if bad.any():
            warnings.warn(
                f"{int(bad.sum())} voxel(s) of the mask have NaN, inf or negative "
                "image values (images are magnitudes >= 0): they are left out of "
                "the fit, NaN in the maps and listed in fit.excluded.",
                RuntimeWarning,
                stacklevel=3,
            )
            mask = mask & ~bad
            if not mask.any():
                raise ValueError(
                    "images have NaN, inf or negative values in every voxel of the "
                    "mask; pass magnitude images (>= 0)."
                )
        return images, mask, images[mask], bad

    def _designs(self):
        """Row-signed copies of the design: magnitudes of every sign choice
        of the sequences whose tissue signals straddle zero."""
        signs = torch.sign(self.design)
        fixed = torch.where((signs <= 0).all(dim=1), -1.0, 1.0).to(self.design)
        mixed = [
            j
            for j in range(signs.shape[0])
            if (signs[j] > 0).any() and (signs[j] < 0).any()
        ]
        designs = []
        for choice in np.ndindex(*(2,) * len(mixed)):
            row_signs = fixed.clone()
            for j, c in zip(mixed, choice, strict=True):
                row_signs[j] = 1.0 if c == 0 else -1.0
            designs.append(row_signs[:, None] * self.design)
        return designs

    def _solvers_for(self, weights):
        """Exact solvers of the row-weighted designs (one per sign choice)."""
        return [SimplexLstsq(weights[:, None] * d) for d in self._designs()]

    def _solve(self, data, gain, solvers):
        """Exact signal-mixing fit at a known global ``gain``: (p, rss)."""
        best_p, best_rss = None, None
        for solver in solvers:
            p, rss = solver(data, gain)
            if best_p is None:
                best_p, best_rss = p, rss
            else:
                better = rss < best_rss
                best_p = torch.where(better[:, None], p, best_p)
                best_rss = torch.where(better, rss, best_rss)
        return best_p, best_rss

    def _solve_voxel_gain(self, data, weights):
        best_q, best_rss = None, None
        for design in self._designs():
            q, rss = nonneg_lstsq(weights[:, None] * design, data)
            if best_q is None:
                best_q, best_rss = q, rss
            else:
                better = rss < best_rss
                best_q = torch.where(better[:, None], q, best_q)
                best_rss = torch.where(better, rss, best_rss)
        gain = best_q.sum(dim=1)
        n = best_q.shape[1]
        p = torch.where(
            gain[:, None] > 0,
            best_q / gain.clamp_min(1e-300)[:, None],
            torch.full_like(best_q, 1.0 / n),
        )
        return p, gain

    def _search_gain(self, data, solve, peak):
        """The global gain minimising the total misfit ``solve(data, gain)``
        (log-grid, then golden-section search), on about 10,000 evenly
        strided voxels; ``peak``: the brightest unit-gain signal of each
        image, for the first guess."""
        sample = data[:: max(1, data.shape[0] // 10000)]
        top = torch.quantile(sample, 0.99, dim=0)
        empty = torch.nonzero(top <= 0).flatten().tolist()
        if empty:
            # No scale to start from (log 0), and nothing to fit there.
            raise ValueError(
                f"image(s) {empty} of data are zero in at least 99 % of the "
                "mask's voxels: check the mask, or leave those contrasts out."
            )
        guess = torch.median(top / peak.clamp_min(1e-300)).item()

        def misfit(log_gain):
            return solve(sample, math.exp(log_gain))[1].mean().item()

        grid = np.linspace(
            math.log(guess) - math.log(10), math.log(guess) + math.log(10), 25
        )
        values = [misfit(g) for g in grid]
        i = int(np.argmin(values))
        low, high = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        ratio = (math.sqrt(5) - 1) / 2
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        fa, fb = misfit(a), misfit(b)
        for _ in range(40):
            if fa < fb:
                high, b, fb = b, a, fa
                a = high - ratio * (high - low)
                fa = misfit(a)
            else:
                low, a, fa = a, b, fb
                b = low + ratio * (high - low)
                fb = misfit(b)
        return math.exp((low + high) / 2)

    def _levenberg_marquardt(self, data, weights, p, gain):
        """Parameter mixing's refinement; with a global gain and enough
        contrasts, a per-voxel-gain pass first (it converges fast; the
        alternation of one gain with all voxels is slow), then the median
        gain held, then the alternation."""
        n_images, n_tissues = data.shape[1], len(self.tissues)
        if self.gain != "global" or n_images < n_tissues:
            return self._lm(data, weights, p, gain, self.gain)
        per_voxel = torch.full(p.shape[:1], float(gain), dtype=p.dtype, device=p.device)
        p, per_voxel = self._lm(data, weights, p, per_voxel, "voxel")
        gain = per_voxel.median().item()
        p, _ = self._lm(data, weights, p, gain, gain)
        return self._lm(data, weights, p, gain, "global")

    def _lm(self, data, weights, p, gain, mode):
        """Batched projected Levenberg-Marquardt on the simplex (the
        Jacobian along the simplex's tangent directions by central
        differences of the signal formulas).
        A per-voxel gain is a further LM unknown (its log); a global one is
        updated in closed form (least squares) after every step."""
        n = p.shape[1]
        steps = torch.eye(n, dtype=p.dtype, device=p.device)[:, 1:] - 1.0 / n
        basis = torch.linalg.qr(steps).Q  # (n, n - 1), orthonormal, sum zero
        per_voxel = mode == "voxel"
        fixed_gain = not isinstance(mode, str)
        gain = torch.as_tensor(gain, dtype=p.dtype, device=p.device)
        n_unknowns = n if per_voxel else n - 1

        def residual(q, g):
            return self.forward(q, g) * weights - data

        damping = torch.full(p.shape[:1], 1e-3, dtype=p.dtype, device=p.device)
        eye = torch.eye(n_unknowns, dtype=p.dtype, device=p.device)
        cost = (residual(p, gain) ** 2).sum(dim=1)
        for _ in range(self.max_iter):
            # central differences along the tangent directions: elementwise
            # formulas, so the error is ~1e-10 relative in float64
            columns = [
                (residual(p + 1e-6 * d, gain) - residual(p - 1e-6 * d, gain)) / 2e-6
                for d in basis.T
            ]
            r = residual(p, gain)
            if per_voxel:
                columns.append(r + data)  # d r / d log(gain)
            jacobian = torch.stack(columns, dim=-1)
            normal = jacobian.transpose(1, 2) @ jacobian
            diagonal = torch.diag_embed(torch.diagonal(normal, dim1=1, dim2=2))
            system = normal + damping[:, None, None] * (diagonal + 1e-12 * eye)
            rhs = -(jacobian.transpose(1, 2) @ r[..., None])
            delta = torch.linalg.solve(system, rhs)[..., 0]
            trial = project_simplex(p + delta[:, : n - 1] @ basis.T)
            trial_gain = gain * torch.exp(delta[:, -1]) if per_voxel else gain
            trial_cost = (residual(trial, trial_gain) ** 2).sum(dim=1)
            accept = trial_cost < cost
            p = torch.where(accept[:, None], trial, p)
            if per_voxel:
                gain = torch.where(accept, trial_gain, gain)
            cost = torch.where(accept, trial_cost, cost)
            damping = torch.where(accept, damping / 3, damping * 4).clamp(1e-9, 1e9)
            if not fixed_gain and not per_voxel:
                unit_signal = self.forward(p, 1.0) * weights
                gain = (unit_signal * data).sum() / (unit_signal**2).sum()
                cost = (residual(p, gain) ** 2).sum(dim=1)
        return p, (gain if per_voxel else gain.item())

    def _refine(self, data, weights, p, gain, pairs, n_dims):
        """Gradient refinement: BMapEst's back-propagation (parameters
        mixing; Adam on softmax logits and the log gain) or projected FISTA
        (signal mixing with smoothness)."""
        weight = self.smoothness
        pairs = torch.as_tensor(pairs, device=self.device)

        def penalty(p):
            if weight == 0 or pairs.shape[0] == 0:
                return 0.0
            diff = p[pairs[:, 0]] - p[pairs[:, 1]]
            return weight * (diff**2).sum()

        def loss(p, gain):
            misfit = (self.forward(p, gain) * weights - data) ** 2
            return misfit.sum() + penalty(p)

        per_voxel = self.gain == "voxel"
        fixed_gain = not isinstance(self.gain, str)
        if self.mixing == "signal":
            # the objective is quadratic in p: fixed step 1 / Lipschitz
            weighted = weights[:, None] * self.design
            spectral = torch.linalg.matrix_norm(weighted, ord=2).item()
            g_max = float(torch.as_tensor(gain).max())
            lipschitz = 2 * (g_max**2 * spectral**2 + weight * 4 * n_dims)
            x, y, t = p.clone(), p.clone(), 1.0
            for _ in range(self.max_iter):
                y = y.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(loss(y, gain), y)
                x_new = project_simplex(y.detach() - grad / lipschitz)
                t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
                y = x_new + (t - 1) / t_new * (x_new - x)
                x, t = x_new, t_new
            return x, gain
        logits = torch.log(p.clamp_min(1e-6)).requires_grad_(True)
        log_gain = torch.log(
            torch.as_tensor(gain, dtype=torch.float64, device=self.device)
        ).clone()
        variables = [logits]
        if not fixed_gain:
            log_gain.requires_grad_(True)
            variables.append(log_gain)
        optimiser = torch.optim.Adam(variables, lr=0.05)
        # cosine decay to 1 % of the step: Adam's fixed step would leave the
        # probabilities oscillating at about the step size
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimiser, T_max=self.max_iter, eta_min=5e-4
        )
        scale = data.shape[0]
        for _ in range(self.max_iter):
            optimiser.zero_grad()
            value = loss(torch.softmax(logits, dim=1), torch.exp(log_gain)) / scale
            value.backward()
            optimiser.step()
            schedule.step()
        p = torch.softmax(logits.detach(), dim=1)
        gain = torch.exp(log_gain.detach())
        return p, (gain if per_voxel else gain.item())

    def _exact_fit(self, data, weights, unit):
        """The exact signal-mixing fit of (weighted) data: (p, gain)."""
        if self.gain == "voxel":
            return self._solve_voxel_gain(data, weights)
        solvers = self._solvers_for(weights)

        def solve(sample, gain):
            return self._solve(sample, gain, solvers)

        if self.gain == "global":
            peak = solvers[0].design.abs().amax(dim=1)
            gain = self._search_gain(data, solve, peak)
        else:
            gain = self.gain / unit
        return solve(data, gain)[0], gain

    def _lattice(self, max_points=5000):
        """Points of the simplex on a regular lattice (step 1/20 for three
        tissues; coarser when there are more)."""
        n = len(self.tissues)
        for divisions in range(20, 0, -1):
            if math.comb(divisions + n - 1, n - 1) <= max_points:
                break
        points = [
            np.array(c) / divisions
            for c in itertools.product(range(divisions + 1), repeat=n)
            if sum(c) == divisions
        ]
        return torch.tensor(np.array(points), dtype=torch.float64, device=self.device)

    def _lattice_fit(self, data, weights, unit):
        """Parameter mixing's start: each voxel's best simplex-lattice point
        (a global search: the nonlinear misfit may have local minima), at
        the gain of least total misfit (or per voxel, in closed form)."""
        points = self._lattice()
        signals = self.forward(points, 1.0) * weights  # (n_points, n_seq)
        norms = (signals**2).sum(dim=1)

        def solve(sample, gain):
            best = torch.empty(
                sample.shape[0], dtype=sample.dtype, device=sample.device
            )
            index = torch.empty(sample.shape[0], dtype=torch.long, device=sample.device)
            voxel_gain = torch.empty_like(best)
            for start in range(0, sample.shape[0], 20000):
                chunk = sample[start : start + 20000]
                cross = chunk @ signals.T  # (chunk, n_points)
                if gain is None:  # per voxel: g = s.y / s.s
                    rss = (chunk**2).sum(dim=1, keepdim=True) - cross**2 / norms
                else:
                    rss = (
                        (chunk**2).sum(dim=1, keepdim=True)
                        - 2 * gain * cross
                        + gain**2 * norms
                    )
                value, at = rss.min(dim=1)
                best[start : start + 20000] = value
                index[start : start + 20000] = at
                voxel_gain[start : start + 20000] = (
                    cross.gather(1, at[:, None])[:, 0] / norms[at]
                )
            return points[index], best.clamp_min(0), voxel_gain

        if self.gain == "voxel":
            p, _, gain = solve(data, None)
            return p, gain
        if self.gain == "global":
            gain = self._search_gain(data, solve, signals.amax(dim=0))
        else:
            gain = self.gain / unit
        return solve(data, gain)[0], gain

    def _noise_weights(self, data, p, gain):
        """``1 / sigma`` of each image, its noise estimated by the RMS
        residual of an unweighted fit (floored at 1 % of the largest, so
        that an image the model fits exactly does not take all the
        weight; equal weights when nothing is left to estimate from)."""
        residual = self.forward(p, gain) - data
        sigma = residual.pow(2).mean(dim=0).sqrt()
        if not (sigma.max() > 0):
            return torch.ones_like(sigma)
        return 1 / sigma.clamp_min(0.01 * sigma.max())

    def fit(self, images, mask=None):
        """Fit the tissue probabilities of every voxel in ``mask``.

        Parameters
        ----------
        images : array, (..., n_sequences)
            Magnitude images, one per sequence on the last axis.
        mask : array of bool, (...), optional
            Voxels to fit (default all).

        Returns
        -------
        TissueMapFit
            ``fit.status`` flags the voxels the model does not explain
            (``POOR_FIT``, with a warning counting them).

        Raises
        ------
        ValueError
            Most voxels are poorly fitted and another order of the
            sequences explains the images far better (the message names
            it): the images are not in the order of ``sequences``.
        """
        return self._fit(images, mask, check_order=True)

    def _fit(self, images, mask, *, check_order):
        images, mask, values, excluded = self._check_images(images, mask)
        # Work in units of the 99th percentile so that tolerances and
        # step sizes do not depend on the scanner's intensity scale.
        unit = float(np.quantile(values, 0.99)) or 1.0
        data = torch.as_tensor(values / unit, device=self.device)
        weights = torch.ones(data.shape[1], dtype=data.dtype, device=self.device)
        if self.mixing == "signal":
            p, gain = self._exact_fit(data, weights, unit)
        else:
            p, gain = self._lattice_fit(data, weights, unit)
            if self.smoothness == 0:
                p, gain = self._levenberg_marquardt(data, weights, p, gain)
        if self.uses_noise_weighting:
            weights = self._noise_weights(data, p, gain)
            if self.mixing == "signal":
                p, gain = self._exact_fit(data * weights, weights, unit)
            elif self.smoothness == 0:
                p, gain = self._levenberg_marquardt(data * weights, weights, p, gain)
        if self.smoothness > 0:
            pairs = _neighbour_pairs(mask) if self.smoothness > 0 else np.zeros((0, 2))
            p, gain = self._refine(
                data * weights, weights, p, gain, pairs.astype(np.int64), mask.ndim
            )
        if torch.is_tensor(gain):
            gain_map = np.zeros(mask.shape)
            gain_map[mask] = gain.cpu().numpy() * unit
            gain_map[excluded] = np.nan
            gain = gain_map
        else:
            gain = float(gain) * unit
        probabilities = np.zeros(mask.shape + (len(self.tissues),))
        probabilities[mask] = p.cpu().numpy()
        probabilities[excluded] = np.nan
        misfit = np.zeros(mask.shape)
        misfit[mask] = _relative_misfit(
            self.forward(
                p,
                gain / unit
                if np.ndim(gain) == 0
                else torch.as_tensor(gain[mask] / unit, device=self.device),
            ),
            data,
        )
        misfit[excluded] = np.nan
        fit = TissueMapFit(
            self, probabilities, gain, mask, excluded=excluded, misfit=misfit
        )
        poor = int((fit.status == POOR_FIT).sum())
        if poor and check_order and poor > 0.5 * mask.sum():
            self._check_order(values, misfit[mask])
        if poor:
            warnings.warn(
                f"{poor} of {int(mask.sum())} voxel(s) are fitted poorly (status "
                f"POOR_FIT): their predicted images miss the measured ones by "
                f"more than misfit_threshold={self.misfit_threshold:g} (median "
                f"{np.median(misfit[mask]):.0%}); the sequences, the tissue values "
                "or the order of the images do not explain the data there.",
                RuntimeWarning,
                stacklevel=3,
            )
        return fit

    def _check_order(self, values, misfit):
        """Refuse images whose volumes follow another order of the sequences:
        each distinct order is fitted (signal mixing, no smoothness) on up to
        ``_ORDER_VOXELS`` voxels, and the best is named when its median
        misfit is ``_ORDER_RATIO`` times below the given order's."""
        n = len(self.sequences)
        if math.factorial(n) > _ORDER_MAX:
            return
        orders = {}  # distinct orders: identical sequences swap to the same
        for order in itertools.permutations(range(n)):
            orders.setdefault(tuple(self.sequences[i] for i in order), order)
        sample = values[:: max(1, len(values) // _ORDER_VOXELS)]
        given = float(np.median(misfit))
        best, best_order = given, None
        for sequences, order in orders.items():
            if sequences == self.sequences:
                continue
            trial = TissueMapModel(
                # image j of the data holds sequence order[j]
                sequences,
                tissues=self.tissues,
                mixing="signal",
                gain=self.gain,
                noise_weighting=False,
                device=self.device,
                misfit_threshold=self.misfit_threshold,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    fitted = trial._fit(sample, None, check_order=False)
                except ValueError:  # e.g. an image zero in that order's fit
                    continue
            value = float(np.nanmedian(fitted.misfit))
            if value < best:
                best, best_order = value, order
        if (
            best_order is not None
            and best * _ORDER_RATIO < given
            and best <= self.misfit_threshold
        ):
            named = ", ".join(
                f"image {j}: {self.sequences[i]}" for j, i in enumerate(best_order)
            )
            raise ValueError(
                f"the images do not follow the order of the sequences: fitted in "
                f"the given order they miss by {given:.0%} (median voxel), in the "
                f"order {list(best_order)} of the sequences by {best:.0%} "
                f"({named}). List the sequences in the order of the images' "
                "volumes."
            )


class TissueMapFit:
    """Fitted tissue probabilities, a thin view over one array.

    Attributes
    ----------
    probabilities : array, (..., n_tissues)
        Non-negative, summing to one inside the mask; zero outside; NaN in
        the ``excluded`` voxels.
    gain : float or array
        The fitted receive gain (a map for ``gain="voxel"``).
    mask : array of bool
        The fitted voxels.
    excluded : array of bool
        Voxels of the given mask left out of the fit because their images
        hold NaN, inf or negative values (NaN in every map, label 0).
    misfit : array
        Relative RMS misfit ``|predicted - measured| / |measured|`` of each
        voxel (``|measured|`` at least a quarter of the mask's median; 0
        outside the mask, NaN in the ``excluded`` voxels).
    """

    def __init__(self, model, probabilities, gain, mask, *, excluded=None, misfit=None):
        self.model = model
        self.probabilities = probabilities
        self.gain = gain
        self.mask = mask
        self.excluded = np.zeros_like(mask) if excluded is None else excluded
        self.misfit = np.zeros(mask.shape) if misfit is None else misfit

    @property
    def status(self):
        """Status of each voxel (:data:`STATUS_CODES`): ``OK``, ``POOR_FIT``
        (misfit above ``model.misfit_threshold``), ``NONFINITE`` (the
        ``excluded`` voxels) or ``MASKED``."""
        status = np.full(self.mask.shape, MASKED, dtype=np.int16)
        status[self.mask] = OK
        with np.errstate(invalid="ignore"):
            status[self.mask & (self.misfit > self.model.misfit_threshold)] = POOR_FIT
        status[self.excluded] = NONFINITE
        return status

    def _weighted(self, key):
        values = np.array([self.model.tissues[n][key] for n in self.model.tissues])
        return self.probabilities @ values

    @property
    def t1(self):
        """Probability-weighted T1 (seconds; 0 outside the mask)."""
        return self._weighted("t1")

    @property
    def t2(self):
        """Probability-weighted T2 (seconds; 0 outside the mask)."""
        return self._weighted("t2")

    @property
    def pd(self):
        """Probability-weighted proton density (0 outside the mask)."""
        return self._weighted("pd")

    @property
    def labels(self):
        """Most probable tissue, 1..n_tissues in the order of
        ``model.tissue_names``, 0 outside the mask (DIPY's HMRF convention)
        and in the ``excluded`` voxels."""
        return np.where(self.mask, self.probabilities.argmax(axis=-1) + 1, 0)

    def predict(self):
        """Predicted magnitude images (..., n_sequences), gain included; 0
        outside the mask, NaN in the ``excluded`` voxels."""
        p = torch.as_tensor(self.probabilities[self.mask], device=self.model.device)
        gain = self.gain[self.mask] if np.ndim(self.gain) else self.gain
        out = np.zeros(self.mask.shape + (len(self.model.sequences),))
        out[self.mask] = self.model.forward(p, gain).cpu().numpy()
        out[self.excluded] = np.nan
        return out
