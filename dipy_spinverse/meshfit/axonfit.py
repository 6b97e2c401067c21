"""The axon family's fit (``fit_mesh(..., code="axon")``): the family's
eight parameters (:class:`.shape.AxonShape`) by Levenberg-Marquardt, freed in
stages (radius and bend, then beads, then swelling and fanning), beading
periods screened, and each added feature kept only on the evidence of a
chi^2 decrease.
"""

import numpy as np
import torch

from .fem import mesh_basis, mesh_signal
from .result import (
    MeshFit,
)
from .templates import (
    check_box,
    mesh_volume,
)

__all__ = [
    "AXON_START_PERIODS",
    "check_axon_periods",
    "fit_axon",
]

#: Beading periods (um) screened by ``code="axon"``: the loss is multimodal in
#: the period (a fit started at one period stays near an alias of it), so
#: beads of each period at four phases are tried on the unbeaded fit and the
#: best one is refined. A geometric ladder, neighbours 1.3 to 1.4 apart.
AXON_START_PERIODS = (5.0, 6.5, 8.5, 11.0, 14.5, 19.0, 25.0)


# Relative bead amplitude and curvature (1/um) of the screened starts: the
# signal is even in both about a straight, unbeaded tube, so a start at zero
# is a stationary point that the fit never leaves.
_AXON_START_AMPLITUDE = 0.15


_AXON_START_CURVATURE = 0.02


# Levenberg-Marquardt stops when a step lowers the loss by less than this
# fraction: at SNR 100 the loss is ~loss_scale sigma^2 and such a change moves
# no parameter by a tenth of its noise (measured on the bent and beaded
# axons: later iterations change the curvature and period by < 0.1%).
_AXON_TOLERANCE = 1e-4


# Largest bend of the fit (radians over the length): axon_deformation needs
# less than pi (the arc must not close).
_AXON_MAX_TURN = 0.9 * np.pi


# Beads are kept only when they lower chi^2 = n loss / (loss_scale sigma^2)
# by more than this (with sigma > 0): the 99.9% quantile of chi^2 with 3
# degrees of freedom (amplitude, phase, period) is 16.3, raised for the 28
# screened starts. Without it noise is fitted by beads: a held-out bent axon
# at SNR 100 (published protocol) came out with beads of amplitude 0.06 that
# lowered chi^2 by 9.7; true beads of amplitude 0.2 lower it by ~1,000.
_BEADING_EVIDENCE = 20.0


# Swelling and fanning are freed last, and kept only when they lower chi^2 by
# more than this: the 99.9% quantile of chi^2 with 2 degrees of freedom
# (13.8). Free from the start, they trade with the radius: a held-out beaded
# axon at SNR 100 (published protocol, a second noise draw) came out with
# swelling -0.17, its radius 3.7% low and a loss below the truth's.
_PROFILE_EVIDENCE = 14.0


# A bend (curvature and azimuth, 2 degrees of freedom) is kept only when it
# lowers chi^2 by more than this, the same 99.9% quantile. The fit starts
# bent (a straight tube is a stationary point of the bend) and never tested
# it: at SNR 100 a straight beaded axon (held out, published protocol) came
# out bent (curvature 0.023-0.029 1/um) for a chi^2 decrease of ~7, and the
# bend took a tenth of the beads' amplitude (-9 to -11 % in three noise
# draws; -9 to +6 % in four refitted straight).
_BEND_EVIDENCE = 14.0


# Beads longer than the axon (the period's upper bound is twice its length)
# are less than one bead on it: a taper, which fanning and swelling describe
# with one coefficient fewer. The beads are kept over the taper only if they
# lower chi^2 by more than this, Akaike's cost of one coefficient. Without
# it the held-out fanning axon (SNR 100, published protocol) was fitted
# with beads of period 26 and 40 um and no fanning.
_TAPER_EVIDENCE = 2.0


# Screened periods refined (the best phase of each, best first): the best
# start alone can be a local minimum (a 6 um bead screened at 4, 5.5, 7.5
# and 10 um: the 4 um start ranked first and stayed there; 5.5 um, second,
# refines to the truth).
_AXON_REFINED_PERIODS = 3


# Coefficients freed in turn (indices into AXON_CODE): radius and bend; then
# the beads too. Swelling and fanning (_PROFILE) are added to whichever of
# the two the fit ends in.
_AXON_STAGES = (np.arange(3), np.arange(6))


# Indices into AXON_CODE of the bend (bend_x, bend_y), the beads
# (beading_cos, beading_sin, beading_period) and the profile (swelling,
# fanning).
_BEND = np.array([1, 2])


_BEADS = np.array([3, 4, 5])


_PROFILE = np.array([6, 7])


def check_axon_periods(periods):
    """``axon_periods`` as a float array: positive, finite beading periods
    (um); a ValueError naming the argument otherwise."""
    periods = np.asarray(periods, dtype=np.float64).ravel()
    if not np.all(np.isfinite(periods)) or np.any(periods <= 0):
        raise ValueError(
            f"axon_periods must be positive beading periods in um, got {periods}."
        )
    return periods


def _axon_bounds(shape):
    """Lower and upper bounds of the axon code, and the smallest period.

    The period is kept above 2.5 axial edge lengths of the template (shorter
    beads alias on its vertices) and below twice its length (longer ones are
    swelling and fanning); the bend below 0.9 half turns over the length
    (:func:`.mesh.axon_deformation` needs less than one, checked in
    ``valid``); the relative amplitudes as it allows.
    """
    tets = shape.template.vertices[shape.template.tets]
    dz = np.abs(tets[:, :, None, 2] - tets[:, None, :, 2]).max(axis=(1, 2))
    shortest = 2.5 * float(np.median(dz))
    kmax = _AXON_MAX_TURN / shape.length
    lower = np.array([0.1, -kmax, -kmax, -0.8, -0.8, shortest, -0.8, -0.8])
    upper = np.array([np.inf, kmax, kmax, 0.8, 0.8, 2 * shape.length, 5.0, 0.8])
    return lower, upper


class _AxonModel:
    """Residuals of the axon code, basis recomputed at each point."""

    def __init__(
        self,
        shape,
        target,
        protocol,
        loss,
        diffusivity,
        length_scale,
        background,
        box_volume,
    ):
        self.shape, self.target, self.protocol = shape, target, protocol
        self.loss, self.diffusivity = loss, diffusivity
        self.length_scale = length_scale
        self.background, self.box_volume = background, box_volume
        self.lower, self.upper = _axon_bounds(shape)
        self.n_evaluations = 0

    def valid(self, code):
        amplitude = np.hypot(code[3], code[4])
        turn = np.hypot(code[1], code[2]) * self.shape.length
        inside = np.all(code >= self.lower) and np.all(code <= self.upper)
        inside = inside and amplitude <= 0.8 and turn < _AXON_MAX_TURN
        return bool(inside and not self.shape.n_inverted(code))

    def basis(self, code):
        return mesh_basis(self.shape.mesh(code), length_scale=self.length_scale)

    def predicted(self, code, basis):
        vertices = torch.tensor(self.shape.vertices(code))
        with torch.no_grad():
            out = mesh_signal(
                self.shape.template,
                self.protocol,
                vertices=vertices,
                basis=basis,
                diffusivity=self.diffusivity,
            )
            if self.background is not None:
                fraction = float(
                    mesh_volume(vertices, torch.tensor(self.shape.template.tets))
                )
                fraction /= self.box_volume
                out = fraction * out + (1.0 - fraction) * self.background
        self.n_evaluations += 1
        return out

    def residuals(self, code, basis):
        """Residuals r with ``r @ r`` the data loss (each acquisition weighted
        by its noise precision, as
        :func:`~dipy_spinverse.sim.signals.data_loss`), and the prediction."""
        predicted = self.predicted(code, basis)
        expected = predicted
        sigma, precision = self.loss["sigma"], self.loss.get("precision")
        if self.loss["noise"] == "rician" and sigma > 0:
            floor = sigma**2 if precision is None else sigma**2 / precision
            expected = torch.sqrt(predicted**2 + floor)
        scale = np.sqrt(self.loss["loss_scale"] / len(self.target))
        residuals = expected - self.target
        if precision is not None:
            residuals = residuals * torch.sqrt(precision)
        return (scale * residuals).numpy(), predicted

    def jacobian(self, code, basis, residuals, free):
        """Forward differences in the ``free`` coefficients, on the basis of
        ``code`` (held fixed)."""
        steps = 1e-4 * np.maximum(np.abs(code), [1.0, 0.1, 0.1, 1.0, 1.0, 10.0, 1, 1])
        columns = []
        for i in free:
            moved = code.copy()
            # Step inwards at an upper bound.
            step = steps[i] if code[i] + steps[i] <= self.upper[i] else -steps[i]
            moved[i] += step
            moved_residuals = self.residuals(moved, basis)[0]
            columns.append((moved_residuals - residuals) / step)
        return np.stack(columns, axis=1)


def _levenberg_marquardt(model, code, free, max_iter, history, verbose):
    """Damped Gauss-Newton in the ``free`` coefficients of the axon code from
    ``code`` (the others held); the best point."""
    basis = model.basis(code)
    residuals, predicted = model.residuals(code, basis)
    loss = float(residuals @ residuals)
    history.append(loss)
    damping = 1e-3
    for it in range(max_iter):
        jac = model.jacobian(code, basis, residuals, free)
        gradient = jac.T @ residuals
        normal = jac.T @ jac
        # Marquardt's scaling: each coefficient in its own units.
        scaling = np.maximum(np.diag(normal), 1e-12 * np.diag(normal).max() + 1e-30)
        improved = False
        while damping < 1e10:
            step = np.linalg.solve(normal + damping * np.diag(scaling), -gradient)
            trial = code.copy()
            trial[free] += step
            if not model.valid(trial):
                damping *= 10.0
                continue
            trial_basis = model.basis(trial)
            trial_residuals, trial_predicted = model.residuals(trial, trial_basis)
            trial_loss = float(trial_residuals @ trial_residuals)
            if trial_loss < loss:
                improved = loss - trial_loss > _AXON_TOLERANCE * loss
                code, basis, residuals = trial, trial_basis, trial_residuals
                loss, predicted = trial_loss, trial_predicted
                damping = max(damping / 3.0, 1e-7)
                break
            damping *= 4.0
        history.append(loss)
        if verbose:
            print(f"fit_mesh (axon): iteration {it}, loss {loss:.4g}")
        if not improved:
            break
    return code, loss, predicted


def fit_axon(
    shape,
    target,
    protocol,
    *,
    start,
    periods,
    max_iter,
    length_scale,
    loss,
    diffusivity,
    background,
    box_volume,
    verbose,
):
    """``fit_mesh(..., code="axon")``: Levenberg-Marquardt with a period screen.

    1. From ``start`` (default: the template's radius, a small bend, no
       beads) the radius and bend are fitted, the rest held.
    2. Beads of each screened period at four phases added to it
       (:data:`AXON_START_PERIODS`); the best starts of the three best
       periods are refined (radius, bend and beads free); the best is kept
       if it is better by more than the noise explains (``sigma > 0``:
       chi^2 lower by ``_BEADING_EVIDENCE``).
    3. Swelling and fanning are freed too (the beads only if kept), kept
       under the same rule (``_PROFILE_EVIDENCE``).
    4. The result is refitted straight (bend 0 and held); the bend is kept
       only under the same rule (``_BEND_EVIDENCE``).
    5. Beads longer than the axon (less than one bead on it) are refitted
       as a taper (beads 0, swelling and fanning free) and kept only if
       they fit better by more than one coefficient's cost
       (``_TAPER_EVIDENCE``). Noise free, any decrease is kept.

    Parameters
    ----------
    shape : AxonShape
        The tube template's axon family (:func:`.templates.axon_template`).
    target : torch.Tensor
        The voxel's b0-normalised signal.
    protocol : Protocol
        The acquisitions, in the signal's order.
    start : dict or None
        The family member the fit starts from (:func:`.mesh.axon_mesh`'s
        keywords); None for the default start.
    periods : ndarray
        Screened beading periods in um (:func:`check_axon_periods`).
    max_iter : int
        Levenberg-Marquardt iterations of each stage.
    length_scale : float
        Length (um) of the loss's scale.
    loss : dict
        ``loss_scale``, ``sigma`` and ``noise`` of the data loss.
    diffusivity : float
        Intrinsic diffusivity of the cell's water.
    background : torch.Tensor or None
        The rest of the voxel's signal (with ``box_volume``).
    box_volume : float or None
        The voxel's volume in um^3.
    verbose : bool
        Print the stages' losses.

    Returns
    -------
    MeshFit
        The fitted axon, ``axon_parameters`` set.
    """
    model = _AxonModel(
        shape, target, protocol, loss, diffusivity, length_scale, background, box_volume
    )
    if start is None:
        bend = _AXON_START_CURVATURE / np.sqrt(2.0)
        start = shape.code(radius=shape.template_radius)
        start[1:3] = bend
    start = np.asarray(start, dtype=np.float64)
    if start.shape != (shape.n_code,):
        raise ValueError(
            f"start must be an axon code of shape ({shape.n_code},) "
            f"(meshfit.shape.AXON_CODE), got {start.shape}."
        )
    if not model.valid(start):
        raise ValueError(
            "start is outside the axon code's bounds or inverts tetrahedra."
        )
    check_box(shape.mesh(start).volume, box_volume)
    history = []
    best = _levenberg_marquardt(
        model, start, _AXON_STAGES[0], max_iter, history, verbose
    )
    screened = []
    # The screen's starts are ranked on the unbeaded fit's basis (a bead of
    # amplitude 0.15 is a small change of the eigenmodes; the refinement
    # recomputes them).
    unbeaded_basis = model.basis(best[0])
    for period in periods:
        if not model.lower[5] <= period <= model.upper[5]:
            continue
        for phase in np.arange(4) * np.pi / 2:
            trial = best[0].copy()
            trial[3:6] = (
                _AXON_START_AMPLITUDE * np.cos(phase),
                _AXON_START_AMPLITUDE * np.sin(phase),
                period,
            )
            if model.valid(trial):
                residuals, _ = model.residuals(trial, unbeaded_basis)
                screened.append((float(residuals @ residuals), tuple(trial)))
    unbeaded = best
    for trial in _best_per_period(screened, _AXON_REFINED_PERIODS):
        beaded = _levenberg_marquardt(
            model, trial, _AXON_STAGES[1], max_iter, history, verbose
        )
        better = beaded[1] < best[1]
        if better and _significant(
            unbeaded[1] - beaded[1], len(target), loss, _BEADING_EVIDENCE
        ):
            best = beaded
    # Beads the rule dropped stay dropped: freeing them here would let them
    # in by the profile's rule (2 degrees of freedom for 5).
    stage = _AXON_STAGES[1] if best is not unbeaded else _AXON_STAGES[0]
    profile = np.union1d(stage, _PROFILE)
    profiled = _levenberg_marquardt(model, best[0], profile, max_iter, history, verbose)
    if _significant(best[1] - profiled[1], len(target), loss, _PROFILE_EVIDENCE):
        best, stage = profiled, profile
    best, stage = _simpler(
        model, best, stage, _BEND, _BEND_EVIDENCE, max_iter, history, verbose
    )
    if best[0][_BEADS[2]] > shape.length and np.any(best[0][_BEADS[:2]]):
        # Less than one bead on the axon: a taper, which swelling and
        # fanning describe with one coefficient fewer.
        best, stage = _simpler(
            model,
            best,
            np.union1d(stage, _PROFILE),
            _BEADS,
            _TAPER_EVIDENCE,
            max_iter,
            history,
            verbose,
        )
    code, _, predicted = best
    return MeshFit(
        mesh=shape.mesh(code),
        shape_code=code,
        predicted_signal=predicted.numpy(),
        loss_history=np.asarray(history),
        kind="tube",
        n_inverted=0,
        shape=shape,
        axon_parameters=shape.parameters(code),
    )


def _simpler(model, fit, free, dropped, evidence, max_iter, history, verbose):
    """``fit`` refitted with the ``dropped`` coefficients at their values of
    a straight, unbeaded, unswollen tube and held, if they do not lower
    chi^2 by more than ``evidence``; (fit, its free coefficients)."""
    start = fit[0].copy()
    start[dropped] = model.shape.code(radius=start[0])[dropped]
    if not model.valid(start):
        return fit, free
    kept = np.setdiff1d(free, dropped)
    simpler = _levenberg_marquardt(model, start, kept, max_iter, history, verbose)
    if _significant(simpler[1] - fit[1], len(model.target), model.loss, evidence):
        return fit, free
    return simpler, kept


def _best_per_period(screened, n):
    """The ``n`` best screened starts of distinct periods, best first."""
    chosen, periods = [], set()
    for _, trial in sorted(screened):
        if trial[5] not in periods:
            periods.add(trial[5])
            chosen.append(np.array(trial))
    return chosen[:n]


def _significant(decrease, n_acquisitions, loss, evidence):
    """Whether a loss decrease is evidence for more coefficients: chi^2
    lower by more than ``evidence`` (any decrease when noise free)."""
    if loss["sigma"] == 0:
        return decrease > 0  # noise free: any decrease is signal
    chi2 = decrease * n_acquisitions / (loss["loss_scale"] * loss["sigma"] ** 2)
    return chi2 > evidence
