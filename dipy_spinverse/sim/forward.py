"""The differentiable forward model: permeability field -> diffusion signals."""

import json
import warnings
from dataclasses import replace

import numpy as np
import torch

from .grid import TetGrid
from .modes import modal_signals
from .operators import diffusion_operator
from .sections import SectionGrid, fibre_frame
from .sequences import as_protocol
from .solvers import ENGINES, Step, propagate, time_plan

__all__ = ["simulate", "converged_substeps", "update_digest", "METHODS", "TIME_TOL"]

METHODS = ("auto",) + ENGINES + ("modes",)

#: Default error estimate of ``method="modes"`` (signal units): the signals
#: of K and 2K modes agree to this, a hundredth of the noise at SNR 100.
MODES_TOL = 1e-4

# Phase change (rad) across one cell allowed per Magnus sub-step on periodic
# grids. Measured time error of the 4th-order scheme at this step: ~2e-8 for
# PGSE, ~5e-6 for OGSE-like waveforms with many short pieces (tests/); 7e-8 on
# the README demo protocol (768-cell grid, 4 random substrates, against 0.0125
# rad). Not raised: at 0.2 rad the error was 6.5e-6 on that demo but 3.3e-4 on
# the 96-cell 8 um grid of tests/test_forward.py (it grows with the diffusion
# rate across a cell times the sub-step length, not with the phase alone). On
# stiff grids (spacing below ~1 um) a weak pulse needs more sub-steps than the
# phase asks for: ``substeps`` multiplies them, and by default ``simulate``
# measures how many the grid needs (``time_tol``).
_PHASE_STEP = 0.05
#: Default ``time_tol`` of :func:`simulate`: the largest signal change allowed
#: when the Magnus sub-steps of a periodic grid are doubled (a tenth of the
#: 1e-3 that is a tenth of the noise at SNR 100).
TIME_TOL = 1e-4
# Batch elements on which the sub-steps are measured (the grid and protocol
# set the stiffness; the cells' layout changes the error little), and the
# most sub-steps tried per phase step.
_PILOT = 4
# Gradient strengths of each chunk of acquisitions on which the pilot
# measures the sub-steps beyond the first multiple (:func:`_probed`).
_PROBE_LEVELS = 5
_MAX_SUBSTEPS = 64
# Measured sub-step multiples by (grid, protocol, settings): an optimisation's
# repeated simulations of one grid measure once. The entries hold their grid
# and protocol, so that an id is not reused while it is cached.
_MEASURED = {}
_MEASURED_MAX = 64
# Memory budget (bytes) of the backward pass of one Chebyshev step; acquisitions are
# processed in chunks that fit.
_CHUNK_BYTES = 256 * 2**20


def simulate(
    grid,
    permeability,
    protocol,
    *,
    diffusivity=2e-3,
    initial=None,
    method="auto",
    dtype=torch.float64,
    device="cpu",
    t2=None,
    tol=None,
    phase_step=None,
    substeps=None,
    time_tol=TIME_TOL,
    axes=None,
    density=None,
):
    """Simulate normalised diffusion signals of a permeability field.

    Solves the Bloch-Torrey equation with a membrane of the given
    permeability on every interior face of ``grid`` (the outer wall is set by
    ``grid.boundary``) and returns ``S(TE) / S(0)``, the voxel signal at the
    echo time normalised by the initial magnetisation.

    Parameters
    ----------
    grid : TetGrid or SectionGrid
        A :class:`~dipy_spinverse.sim.sections.SectionGrid` is the
        cross-section of straight fibres along ``grid.axis``: the signal is
        the section's, for the gradient's component in its plane, times
        free diffusion along the axis, exactly. With a diffusivity per cell
        (axons, myelin and the space between them apart), each cell also
        decays along the axis at its own rate, ``D_i k_a(t)^2``, inside the
        section's generator.
    permeability : array_like or Tensor (..., grid.n_faces)
        Membrane permeability of every interior face in m/s (= um/us), in
        ``[0, inf]``; ``inf`` means no membrane. Leading dimensions are a
        batch (voxels or candidate fields) evaluated in one call. A tensor
        that requires grad yields a differentiable result.
    protocol : Protocol or dipy.core.gradients.GradientTable
        Acquisitions. A gradient table needs ``big_delta`` and
        ``small_delta`` (seconds).
    diffusivity : float, array_like or Tensor
        Intrinsic diffusivity in mm^2/s (= um^2/us): a scalar, or one value
        per cell (..., n_cells). May require grad.
    initial : array_like of bool (n_cells,) or (..., n_cells), optional
        Cells where the magnetisation starts (compartment-resolved signal);
        the signal is then normalised by their volume. Default: all cells.
    method : {"auto", "dense", "chebyshev", "modes"}
        ``"dense"``: dense matrix exponentials (exact reference, O(N^3)).
        ``"modes"``: the matrix formalism (:mod:`~dipy_spinverse.sim.modes`):
        the slowest Laplace modes, as many as the error estimate ``tol``
        asks for, and one small exponential per gradient piece; its cost
        does not grow with the grid's stiffness. Reflecting and absorbing
        boxes only, forward only (no gradient).
        ``"chebyshev"``: Chebyshev propagation with sparse products (linear
        in the number of cells per product). ``"auto"``: Chebyshev, on every
        grid (on 48 cells with the published protocol it is 13-70x faster
        than the dense reference, forward and gradient; the dense engine
        wins only below about 4 acquisitions, by milliseconds).
    dtype : torch.float64 or torch.float32
    device : str or torch.device
    t2 : float or array_like, optional
        Transverse relaxation time in seconds, scalar or per cell. The b = 0
        signal is then ``exp(-TE / T2)`` for a uniform T2.
    tol : float, optional
        Truncation tolerance of the Chebyshev engine per step (default 1e-11
        in float64, 1e-6 in float32); with ``method="modes"`` the largest
        change of any signal when the modes are doubled (default
        :data:`MODES_TOL`).
    phase_step : float, optional
        Periodic grids: the largest phase change (rad) across one cell within
        a fourth-order Magnus sub-step (default 0.05; time error ~1e-7 for
        PGSE on the README demo). Larger steps are cheaper; their error falls
        as about the fourth power of the step, so measure it against a
        smaller one (``posterior.PriorSimulator`` does, per patch size).
    axes : array_like (..., 3), optional
        :class:`~dipy_spinverse.sim.sections.SectionGrid` only: the fibres'
        direction for each batch element (broadcast against the
        permeability's batch shape), instead of ``grid.axis``: sections of
        one lattice at many orientations, simulated together.
    density : float, array_like or Tensor, optional
        Water density of each cell relative to free water, > 0: scalar or
        (..., n_cells), may require grad (default 1 everywhere). Myelin
        holds about half the water of the axons and the space between them.
        A cell then holds ``density x volume`` of the initial magnetisation
        (which is at rest: water crosses membranes down differences of
        magnetisation per unit of water, :mod:`~dipy_spinverse.sim.
        operators`), and the signal is normalised by the voxel's water.
    substeps : int, optional
        Periodic grids: multiplies the Magnus sub-steps of every gradient
        piece. The phase criterion alone does not see stiffness: on grids
        finer than ~1 um one sub-step multiple errs by up to 6e-2 in the
        signal (a 2 um fibre at 0.19 um spacing, PGSE 10/20 ms, b = 3000),
        and the error falls 5-8x per doubling. Default: measured, on the
        first few batch elements, by doubling from 1 until the signals change
        by at most ``time_tol``; the signals are those of the last multiple
        before that doubling (their time error about ``time_tol``). Pass a
        number to fix it (the measurement costs about twice the run on one
        substrate, little on a batch). With ``dtype=float32`` the probed
        acquisitions are measured against float64 (float32's rounding grows
        with the steps and a doubling in float32 takes it for their error):
        one multiple serves where float32 there is within ``time_tol`` of
        float64 at two; otherwise the multiple is measured in float64, and
        where float32's rounding at it exceeds ``time_tol`` the simulation
        runs in float64 (a RuntimeWarning says so; the signals are returned
        in float32).
    time_tol : float
        Periodic grids with ``substeps=None``: the largest signal change a
        doubling of the sub-steps may make (default :data:`TIME_TOL`).

    Returns
    -------
    Tensor (..., n_acquisitions)
        Normalised signal magnitude, in protocol order.

    Examples
    --------
    >>> import numpy as np
    >>> from dipy_spinverse import TetGrid, simulate
    >>> from dipy_spinverse.sim.sequences import Protocol
    >>> grid = TetGrid.bcc(10.0, 2, boundary="periodic")
    >>> prot = Protocol.pgse([0, 1000], [[1, 0, 0], [1, 0, 0]],
    ...                      small_delta=0.002, big_delta=0.01)
    >>> s = simulate(grid, np.full(grid.n_faces, np.inf), prot)
    >>> float(s[0])  # b = 0
    1.0
    """
    if not isinstance(grid, (TetGrid, SectionGrid)):
        raise TypeError(
            f"grid must be a TetGrid or a SectionGrid, got {type(grid).__name__}."
        )
    if method not in METHODS:
        raise ValueError(f"Invalid method {method!r}. Must be one of {METHODS}.")
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, not {dtype}.")
    protocol = as_protocol(protocol)
    device = torch.device(device)
    kappa = _permeability(grid, permeability, dtype, device)
    batch_shape = kappa.shape[:-1]
    kappa = kappa.reshape(-1, grid.n_faces)
    n_batch = kappa.shape[0]
    diff = _per_cell(grid, diffusivity, "diffusivity", n_batch, batch_shape, kappa)
    if torch.any(~torch.isfinite(diff)) or torch.any(diff <= 0):
        raise ValueError("diffusivity must be finite and > 0 (mm^2/s, e.g. 2e-3).")
    relaxation = None
    if t2 is not None:
        t2_us = _per_cell(grid, t2, "t2", n_batch, batch_shape, kappa) * 1e6
        if torch.any(t2_us <= 0) or torch.any(torch.isnan(t2_us)):
            raise ValueError("t2 must be > 0 seconds (inf for no relaxation).")
        relaxation = 1.0 / t2_us
    water = None
    if density is not None:
        water = _per_cell(grid, density, "density", n_batch, batch_shape, kappa)
        if torch.any(~torch.isfinite(water)) or torch.any(water <= 0):
            raise ValueError(
                "density must be finite and > 0 (water per unit volume relative "
                "to free water, e.g. 0.5 in myelin)."
            )
    start = _initial(grid, initial, n_batch, batch_shape, kappa)
    op = diffusion_operator(grid, kappa, diff, relaxation, density=water)
    planes = None
    if isinstance(grid, SectionGrid):
        planes = _section_planes(grid, axes, n_batch, batch_shape, kappa)
        if axes is not None:
            op = _oriented(op, grid, planes)
    elif axes is not None:
        raise ValueError(
            "axes is the fibres' direction of a SectionGrid; a TetGrid holds "
            "its cells in 3-D: remove axes."
        )
    engine = _engine(method)
    given_tol = tol
    if tol is None and method != "modes":
        tol = 1e-11 if dtype == torch.float64 else 1e-6
    if phase_step is None:
        phase_step = _PHASE_STEP
    elif not (np.isfinite(phase_step) and phase_step > 0):
        raise ValueError(f"phase_step must be > 0 rad (e.g. 0.05), got {phase_step!r}.")
    if substeps is not None and (int(substeps) != substeps or substeps < 1):
        raise ValueError(
            f"substeps must be a whole number >= 1 (or None: measured), got "
            f"{substeps!r}."
        )
    if not (np.isfinite(time_tol) and time_tol > 0):
        raise ValueError(f"time_tol must be > 0 (e.g. 1e-4), got {time_tol!r}.")

    if method == "modes":
        _check_modes(grid, kappa, diff, relaxation, water)
        signals = modal_signals(op, protocol, start, tol=tol or MODES_TOL)
        return signals.reshape(*batch_shape, len(protocol))

    # A section whose cells diffuse at their own rates decays along its
    # fibres cell by cell: in the generator (exact); otherwise by one factor.
    per_cell = planes is not None and bool(torch.any(diff != diff[:, :1]))
    # Without relaxation or a sink, magnetisation that starts everywhere is
    # at rest while no gradient is on: a spin echo's time before its first
    # gradient changes nothing (and diffusion times then share their pulse).
    stationary = relaxation is None and initial is None
    stationary = stationary and grid.boundary != "absorbing"

    def signals(op, start, substeps, rows=slice(None), fill=None):
        """The normalised signals, in the precision of ``op``; with ``fill``,
        only the probed ones (:func:`_probed`), the rest taken from ``fill``."""
        u0 = op.sqrt_volumes * start  # (B, N): u = sqrt(rho V) m
        out, probed = _signals(
            op,
            protocol,
            u0,
            frame="phase" if grid.periodic else "lab",
            engine=engine,
            # A float64 pilot of a float32 simulation: float64's tolerance.
            tol=tol if u0.dtype == dtype or given_tol else 1e-11,
            phase_step=phase_step,
            substeps=substeps,
            along=(diff[rows].to(u0), planes[rows, 2].to(u0)) if per_cell else None,
            still=stationary,
            probe=fill is not None,
        )
        out = out / (u0 * u0).sum(-1)[:, None]  # initial magnetisation: volume
        return out if fill is None else torch.where(probed, out, fill)

    def pilot_signals(precision, first=None):
        """``signals(n)`` of the first batch elements in ``precision``: every
        acquisition at one sub-step multiple, or ``first`` (the pilot's
        signals at one multiple in another precision), and beyond it (with
        ``first``, at every multiple) only a few gradient strengths of each
        chunk (:func:`_probed`; the others share their chunk's plan and
        keep their first values, so that only the probed ones measure)."""
        rows = slice(0, _PILOT)

        def cast(values):
            return None if values is None else values[rows].to(precision)

        with torch.no_grad():
            pilot_op = diffusion_operator(
                grid, cast(kappa), cast(diff), cast(relaxation), density=cast(water)
            )
            if axes is not None:
                pilot_op = _oriented(pilot_op, grid, cast(planes))
        computed = {}

        def at(n):
            if n not in computed:
                with torch.no_grad():
                    if first is None and n == 1:
                        computed[n] = signals(pilot_op, cast(start), 1, rows)
                    else:
                        fill = at(1) if first is None else first.to(precision)
                        computed[n] = signals(pilot_op, cast(start), n, rows, fill=fill)
            return computed[n]

        return at

    def finish(out):
        return out if per_cell else _finish(out, planes, protocol, diff)

    shape = (*batch_shape, len(protocol))
    run_dtype = dtype
    if substeps is None and grid.periodic:
        # The diffusivity to 3 digits: the stiffness scales with it, and a
        # finite difference of it must not measure again.
        stiffness = float(f"{float(diff.max()):.3g}")
        key = (id(grid), id(protocol), dtype, device, engine, tol, phase_step)
        key += (time_tol, stiffness, relaxation is None, axes is None)
        known = _MEASURED.get(key)
        if known is not None and known[0] is grid and known[1] is protocol:
            substeps, run_dtype = known[2:]
        else:
            if dtype == torch.float32:
                substeps, coarse, change, run_dtype = _float32_substeps(
                    pilot_signals, time_tol
                )
            else:
                substeps, coarse, change = converged_substeps(
                    pilot_signals(torch.float64), time_tol
                )
            if change > time_tol:
                warnings.warn(
                    f"simulate: the signals still change by {change:.2g} (above "
                    f"time_tol {time_tol:.2g}) at {_MAX_SUBSTEPS} Magnus sub-step "
                    "multiples; returned at that multiple. Pass a smaller "
                    "phase_step, or a coarser grid.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if len(_MEASURED) >= _MEASURED_MAX:
                _MEASURED.clear()
            _MEASURED[key] = (grid, protocol, substeps, run_dtype)
            graph = torch.is_grad_enabled() and any(
                t.requires_grad
                for t in (kappa, diff, relaxation, water)
                if t is not None
            )
            # The pilot was the batch, and every acquisition of it converged.
            pilot_is_batch = n_batch <= _PILOT and substeps == 1 and not graph
            if pilot_is_batch and run_dtype == dtype:
                return finish(coarse).reshape(shape)
    if run_dtype != dtype:
        return simulate(
            grid,
            permeability,
            protocol,
            diffusivity=diffusivity,
            initial=initial,
            method=method,
            dtype=run_dtype,
            device=device,
            t2=t2,
            tol=given_tol,
            phase_step=phase_step,
            substeps=substeps,
            axes=axes,
            density=density,
        ).to(dtype)
    # The laboratory frame has no Magnus steps: one multiple.
    out = signals(op, start, 1 if substeps is None else int(substeps))
    return finish(out).reshape(shape)


def _finish(out, planes, protocol, diffusivity):
    """A section's signals times free diffusion along its fibres."""
    if planes is None:
        return out
    return out * _along_axis(planes, protocol, diffusivity)


def _signals(op, protocol, u0, *, frame, still=False, probe=False, **options):
    """Unnormalised signals (B, n_acquisitions) of ``u0`` (B, N).

    Work that acquisitions share is done once: waveforms whose echo is
    computed from its first half (:attr:`~dipy_spinverse.sim.waveforms.
    Waveform.is_antisymmetric`) are grouped by that half's gradient pieces
    (:func:`_half_echo_families`), so a PGSE pulse is propagated once for
    every diffusion time it is played at; repeated and opposite gradients are
    propagated once (:func:`_canonical_rates`). ``still``: the start is at
    rest without gradient (no relaxation, no sink, a whole start), so the
    time before a waveform's first gradient is left out.

    Also returns which acquisitions were computed (a boolean tensor): all,
    or with ``probe`` a few strengths of each chunk (:func:`_probed`), each
    under the very plan it has in the whole computation (the others are
    zero).
    """
    out = torch.zeros(u0.shape[0], len(protocol), dtype=u0.dtype, device=u0.device)
    probed = np.zeros(len(protocol), dtype=bool)
    rates = torch.tensor(protocol.gradient_rate, dtype=u0.dtype, device=u0.device)
    families, others = _half_echo_families(protocol, still=still)
    for durations, amplitudes, tails, idx in families:
        signal, kept = _family_signal(
            op,
            durations,
            amplitudes,
            tails,
            rates[idx],
            u0,
            frame=frame,
            probe=probe,
            **options,
        )
        out = out.index_copy(1, torch.as_tensor(idx, device=u0.device), signal)
        probed[idx] = kept
    for waveform, idx in others:
        unique, inverse = _canonical_rates(rates[idx])
        signal, kept = _group_signal(
            op, waveform, unique, u0, frame=frame, probe=probe, **options
        )
        out = out.index_copy(
            1, torch.as_tensor(idx, device=u0.device), signal[:, inverse]
        )
        probed[idx] = kept[inverse.cpu().numpy()]
    return out, torch.as_tensor(probed, device=u0.device)


def _probed(chunk, strength, probe):
    """The rates of ``chunk`` (indices, sorted by ``strength``) to propagate:
    all of them, or with ``probe`` those at :data:`_PROBE_LEVELS` of its
    strengths, spread from the weakest to the strongest (every direction
    at each).

    A chunk's Magnus sub-steps follow its strongest gradient, but its
    strongest rates do not always err most: the error of a sub-step grows
    with the gradient, and the signal it is an error of shrinks with it
    (on a stiff section with sub-grid pools, b = 1000 s/mm^2 erred three
    times more than b = 3000 at the same steps). On 34 random sections
    and protocols (2026-11-28) probing the strongest rates alone chose
    the multiple every acquisition chose in 33; in a pooled section it
    chose half of it. Every chunk is probed, because a weak chunk's few
    long sub-steps can err more than a strong chunk's (stiff grids).
    """
    if not probe or strength[chunk].max() == 0:
        return chunk
    relative = np.round(strength[chunk] / strength[chunk].max(), 9)
    levels = np.unique(relative[relative > 0])
    spread = np.linspace(0, len(levels) - 1, min(len(levels), _PROBE_LEVELS))
    return chunk[np.isin(relative, levels[np.unique(spread.round().astype(int))])]


def _half_echo_families(protocol, *, still=False):
    """Antisymmetric waveforms grouped by their first half's gradient pieces
    (after the time before the first gradient, with ``still``).

    Returns
    -------
    families : list of (durations, amplitudes, tails, idx)
        The first half's pieces up to its last gradient (us, amplitudes),
        the gradient-free time that ends each acquisition's half (us, one per
        acquisition of ``idx``), and the acquisitions' indices.
    others : list of (Waveform, ndarray of int)
        Waveforms simulated over their whole echo.
    """
    families, others = {}, []
    for waveform, idx in protocol.groups():
        if not waveform.is_antisymmetric:
            others.append((waveform, idx))
            continue
        durations, amplitudes = _first_half(*waveform.segments)
        if still and len(amplitudes) > 1 and amplitudes[0] == 0.0:
            durations, amplitudes = durations[1:], amplitudes[1:]
        tail = 0.0
        if amplitudes[-1] == 0.0 and len(amplitudes) > 1:
            tail = float(durations[-1])
            durations, amplitudes = durations[:-1], amplitudes[:-1]
        key = (durations.round(9).tobytes(), amplitudes.round(12).tobytes())
        family = families.setdefault(key, (durations, amplitudes, [], []))
        family[2].append(np.full(len(idx), tail))
        family[3].append(idx)
    out = []
    # A copy: the protocol keeps its arrays read-only, which torch warns of.
    rates = torch.tensor(protocol.gradient_rate)
    for durations, amplitudes, tails, groups in families.values():
        # Waveforms that share no gradient but b = 0 share no pulse: each is
        # its own family, as cheap as it was alone (a family's b = 0 rate
        # needs every tail, and its own propagation costs kernel launches).
        if len(groups) > 1 and not _share_a_gradient(rates, groups):
            split = zip(tails, groups, strict=True)
            out += [(durations, amplitudes, t, i) for t, i in split]
        else:
            out.append(
                (durations, amplitudes, np.concatenate(tails), np.concatenate(groups))
            )
    return out, others


def _share_a_gradient(rates, groups):
    """Whether two of the acquisition ``groups`` share a nonzero gradient
    rate (up to sign)."""
    seen = set()
    for idx in groups:
        unique, _ = _canonical_rates(rates[idx])
        own = {tuple(row) for row in unique.tolist() if any(row)}
        if seen & own:
            return True
        seen |= own
    return False


def _canonical_rates(rates):
    """Distinct gradient rates (M, 3), sorted by strength, and each given
    rate's row among them.

    A rate and its opposite are one: the operator is real
    and the start state real, so ``-g`` propagates the complex conjugate of
    ``g``'s state, whose signal magnitude is the same; each rate is turned so
    that its first nonzero component is positive. Sorting by strength keeps
    each chunk's Chebyshev degree and Magnus sub-steps low.
    """
    first = (rates != 0).to(torch.int8).argmax(dim=1, keepdim=True)
    sign = torch.sign(rates.gather(1, first))
    rates = rates * torch.where(sign == 0, torch.ones_like(sign), sign)
    unique, inverse = torch.unique(rates, dim=0, return_inverse=True)
    order = torch.argsort(unique.norm(dim=-1))
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=rates.device)
    return unique[order], rank[inverse]


def converged_substeps(signals, time_tol, *, max_substeps=_MAX_SUBSTEPS):
    """Double a Magnus sub-step multiple until the signals stop moving.

    The fourth-order scheme's error falls ~16x per doubling, so the change
    between ``n`` and ``2n`` sub-steps bounds the error at ``n``. Shared by
    :func:`simulate` (``substeps=None`` on periodic grids) and the prior's
    simulator, which measures once per patch size.

    Parameters
    ----------
    signals : callable
        ``signals(n)``: the signals (array or tensor) at multiple ``n``.
    time_tol : float
        Largest change accepted.
    max_substeps : int
        The largest multiple tried.

    Returns
    -------
    multiple : int
        The first ``n`` (1, 2, 4, ...) whose signals change by at most
        ``time_tol`` when doubled; where none does up to ``max_substeps``,
        ``max_substeps`` (the finest tried).
    signals : array or tensor
        ``signals(multiple)``.
    change : float
        The last change measured: above ``time_tol`` only when the doubling
        did not converge (the caller says so).
    """
    substeps, coarse = 1, signals(1)
    while True:
        fine = signals(2 * substeps)
        change = float(abs(coarse - fine).max())
        if change <= time_tol:
            return substeps, coarse, change
        if 2 * substeps >= max_substeps:
            return 2 * substeps, fine, change
        substeps, coarse = 2 * substeps, fine


def _float32_substeps(pilot, time_tol):
    """The Magnus sub-step multiple of a float32 simulation, its pilot's
    signals at it, the change its doubling made in float64 (as
    :func:`converged_substeps`), and the precision it runs in.

    Measured against float64: float32's rounding grows with the steps (2e-4
    at two multiples on a stiff cord draw whose one multiple is within 2e-5
    of float64), and a doubling in float32 takes it for their error.
    ``pilot(precision, first=None)``: the pilot's ``signals(n)``, every
    acquisition at one multiple and the probed ones beyond; with ``first``,
    the probed ones only, the others ``first`` (so float64 simulates only
    those). One multiple serves where float32's signals there are within
    ``time_tol`` of float64's at two: that bounds float32's rounding and its
    time error together (up to float64's time error at two multiples, ~16x
    smaller). Otherwise the multiple is measured in float64
    (:func:`converged_substeps`), and the simulation runs in float32 where
    its rounding at that multiple is within ``time_tol``, in float64 (with a
    RuntimeWarning) where not.
    """
    rounded = pilot(torch.float32)
    first = rounded(1)
    precise = pilot(torch.float64, first)
    error = float(abs(first.to(precise(2)) - precise(2)).max())
    if error <= time_tol:
        return 1, first, error, torch.float32
    substeps, coarse, change = converged_substeps(precise, time_tol)
    kept = rounded(substeps)
    rounding = float(abs(kept.to(coarse) - coarse).max())
    if rounding <= time_tol:
        return substeps, kept, change, torch.float32
    warnings.warn(
        f"simulate: float32's rounding moves the signals by {rounding:.2g} "
        f"(above time_tol {time_tol:.2g}) at the measured Magnus sub-steps. "
        "Simulated in float64 instead (returned in float32).",
        RuntimeWarning,
        stacklevel=3,
    )
    return substeps, coarse, change, torch.float64


def _section_planes(grid, axes, n_batch, batch_shape, like):
    """Each batch element's fibre frame (B, 3, 3): the two in-plane axes
    and the fibres' direction (``grid``'s, or ``axes``)."""
    frame = np.concatenate([grid.plane, grid.axis[None]])
    if axes is None:
        frames = np.broadcast_to(frame, (n_batch, 3, 3))
    else:
        axes = np.asarray(axes, dtype=float)
        try:
            axes = np.broadcast_to(axes, (*batch_shape, 3)).reshape(n_batch, 3)
        except ValueError as err:
            raise ValueError(
                f"axes must be (..., 3) fibre directions broadcasting against the "
                f"permeability batch shape {tuple(batch_shape)}, got shape "
                f"{axes.shape}."
            ) from err
        norms = np.linalg.norm(axes, axis=1)
        if not np.all(np.isfinite(norms) & (norms > 0)):
            raise ValueError("axes must be nonzero, finite 3-vectors.")
        frames = np.stack(
            [fibre_frame(a / n) for a, n in zip(axes, norms, strict=True)]
        )
    return torch.tensor(np.array(frames), dtype=like.dtype, device=like.device)


def _oriented(op, grid, planes):
    """``op`` with the section's displacements and positions in each batch
    element's plane (B, N, K, 3) and (B, N, 3)."""
    plane = torch.tensor(grid.plane, dtype=op.diag.dtype, device=op.diag.device)
    local = op.displacement @ plane.T  # (N, K, 2) in the lattice's plane
    where = op.positions @ plane.T
    return replace(
        op,
        displacement=torch.einsum("nkp,bpd->bnkd", local, planes[:, :2]),
        positions=torch.einsum("np,bpd->bnd", where, planes[:, :2]),
    )


def _along_axis(planes, protocol, diffusivity):
    """Free diffusion along a section's fibres, ``exp(-D b (g . a)^2)``
    (B, A), for a diffusivity the same in every cell; ``b`` (s/mm^2 =
    us/um^2) is the simulated waveform's own."""
    uniform = diffusivity[:, :1]
    bvecs = torch.tensor(protocol.bvecs, dtype=uniform.dtype, device=uniform.device)
    bvals = torch.tensor(protocol.bvals, dtype=uniform.dtype, device=uniform.device)
    b_axis = bvals * (bvecs @ planes[:, 2].T).T ** 2  # (B, A)
    return torch.exp(-uniform * b_axis)


def _family_signal(
    op,
    durations,
    amplitudes,
    tails,
    rates,
    u0,
    *,
    frame,
    engine,
    tol,
    phase_step,
    substeps,
    along,
    probe=False,
):
    """Signals (B, A) of antisymmetric acquisitions that share their first
    half's gradient pieces and differ in its gradient-free tail ``tails``
    (A,) and their ``rates`` (A, 3).

    For ``f(TE - t) = -f(t)`` the second half-propagator is the adjoint of
    the first in both frames, so ``S = ||U(TE/2) u0||^2`` when the
    magnetisation starts everywhere (``|<U a, U w>|`` otherwise): half the
    work. Each distinct rate (up to sign) is propagated through the pieces
    once, then through the gradient-free time in increments, from the
    shortest tail it needs to the longest: the generator is constant there,
    so an increment is one exponential, and every diffusion time of the
    pulse costs only its own increment. Also returns which of the A were
    computed (all but with ``probe``, :func:`_probed`).
    """
    unique, inverse = _canonical_rates(rates)
    strength = unique.norm(dim=-1).cpu().numpy()
    times, tail_index = np.unique(tails, return_inverse=True)
    needed = np.zeros((len(unique), len(times)), dtype=bool)
    needed[inverse.cpu().numpy(), tail_index] = True
    dmax = float(op.displacement.norm(dim=-1).max())
    n_batch, n_cells = u0.shape
    partial = bool(torch.any(u0 == 0))
    ctype = torch.complex128 if u0.dtype == torch.float64 else torch.complex64
    F_end = float(np.dot(durations, amplitudes))
    kwargs = dict(frame=frame, engine=engine, tol=tol, along=along)
    # The start (B, N, 1), and with a partial start the read-out vector:
    # S = a^T U^H U w with a = sqrt(V) (integrate everywhere) and w the
    # initial magnetisation: propagate both to TE/2, S = <U a, U w>.
    first = u0.to(ctype)[..., None]
    if partial:
        first = torch.cat(
            [op.sqrt_volumes.to(ctype)[..., None].expand_as(first), first], -1
        )
    if len(amplitudes) > 1 and amplitudes[0] == 0.0:
        # Relaxation before the first gradient (a spin echo longer than its
        # encoding) is the same for every rate: once.
        still = torch.zeros(first.shape[-1], 3, dtype=u0.dtype, device=u0.device)
        step = _gradient_free_step(durations[0], 0.0, frame)
        first = propagate(op, [step], first.contiguous(), still, **kwargs)
        durations, amplitudes = durations[1:], amplitudes[1:]
    full = torch.zeros(
        n_batch, len(unique), len(times), dtype=u0.dtype, device=u0.device
    )
    # Chunks of rates in order of strength (each chunk's Magnus sub-steps
    # follow its strongest gradient), of even sizes.
    most = _chunk_size(n_batch, n_cells, len(unique) * (1 + partial), engine)
    n_chunks = -(-len(unique) // most)
    computed = []
    for chunk in np.array_split(np.arange(len(unique)), n_chunks):
        chunk = _probed(chunk, strength, probe)
        computed.append(chunk)
        cols = torch.as_tensor(chunk, device=u0.device)
        r = unique[cols]
        start = first[..., :1].expand(n_batch, n_cells, len(cols))
        if partial:
            start = torch.cat([start, first[..., 1:].expand_as(start)], dim=-1)
            r = torch.cat([r, r])
        steps = _chunk_plan(durations, amplitudes, r, frame, phase_step, substeps, dmax)
        u = propagate(op, steps, start.contiguous(), r, **kwargs)
        # Rates that need the same tails go on together, each straight from
        # one tail it needs to the next: an exponential's cost grows as the
        # square root of its length, so a rate is not stopped at tails other
        # rates need.
        patterns, which = np.unique(needed[chunk], axis=0, return_inverse=True)
        for pattern, members in zip(
            patterns, _members(which.ravel(), len(patterns)), strict=True
        ):
            index = torch.as_tensor(members, device=u0.device)
            states = torch.cat([index, index + len(cols)]) if partial else index
            v, rv, elapsed = u, r, 0.0
            if len(patterns) > 1:
                v, rv = u[..., states], r[states]
            for j in np.flatnonzero(pattern):
                if times[j] > elapsed:
                    step = _gradient_free_step(times[j] - elapsed, F_end, frame)
                    v = propagate(op, [step], v, rv, **kwargs)
                    elapsed = times[j]
                full[:, cols[index], j] = _half_echo(v, len(members), partial)
    signal = full[:, inverse, torch.as_tensor(tail_index, device=u0.device)]
    return signal, np.isin(inverse.cpu().numpy(), np.concatenate(computed))


def _members(labels, count):
    """Indices of each label ``0 .. count - 1`` in ``labels``."""
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.cumsum(np.bincount(labels, minlength=count))[:-1])


def _chunk_plan(durations, amplitudes, rates, frame, phase_step, substeps, dmax):
    """The time plan of a chunk of acquisitions' pieces. One plan per chunk:
    in the phase frame the Magnus sub-steps follow the chunk's strongest
    gradient (rates are sorted by strength), so b = 0 and weak-gradient
    chunks are not stepped at the strongest gradient's pace."""
    return time_plan(
        durations,
        amplitudes,
        frame=frame,
        phase_step=phase_step,
        substeps=substeps,
        dmax=dmax,
        rate=float(rates.norm(dim=-1).max()),
    )


def _gradient_free_step(tau, F, frame):
    """One exponential over ``tau`` us without gradient, at ``F`` (the
    phase frame's wavevector per unit rate, constant there)."""
    if frame == "lab":
        return Step(float(tau), amplitude=0.0)
    return Step(float(tau), phase_weights=(1.0,), phase_F=(F,))


def _half_echo(u, n_acq, partial):
    """``|<U a, U w>|`` or ``||U u0||^2`` (B, A) of half-echo states."""
    if partial:
        return (u[..., :n_acq].conj() * u[..., n_acq:]).sum(1).abs()
    return (u.real**2 + u.imag**2).sum(1)


def _group_signal(
    op,
    waveform,
    rate,
    u0,
    *,
    frame,
    engine,
    tol,
    phase_step,
    substeps,
    along,
    probe=False,
):
    """Signals (B, A) of acquisitions that share one waveform, propagated
    over the whole echo (waveforms that are not antisymmetric), and which of
    the ``rate`` (A, 3; sorted by strength) were computed (:func:`_probed`)."""
    durations, amplitudes = waveform.segments
    dmax = float(op.displacement.norm(dim=-1).max())
    n_batch, n_cells = u0.shape
    chunk = _chunk_size(n_batch, n_cells, len(rate), engine)
    ctype = torch.complex128 if u0.dtype == torch.float64 else torch.complex64
    strength = rate.norm(dim=-1).cpu().numpy()
    signals = torch.zeros(n_batch, len(rate), dtype=u0.dtype, device=u0.device)
    computed = np.zeros(len(rate), dtype=bool)
    for lo in range(0, len(rate), chunk):
        cols = _probed(np.arange(lo, min(lo + chunk, len(rate))), strength, probe)
        computed[cols] = True
        r = rate[torch.as_tensor(cols, device=rate.device)]
        start = u0.to(ctype)[..., None].expand(n_batch, n_cells, len(r))
        steps = _chunk_plan(durations, amplitudes, r, frame, phase_step, substeps, dmax)
        u = propagate(
            op,
            steps,
            start.contiguous(),
            r,
            frame=frame,
            engine=engine,
            tol=tol,
            along=along,
        )
        signals[:, torch.as_tensor(cols, device=u0.device)] = _full_echo(
            op, u, r, waveform, frame
        ).abs()
    return signals, computed


def _full_echo(op, u, rate, waveform, frame):
    weights = op.sqrt_volumes.to(u.dtype)[..., None]
    if frame == "phase":
        # Back to the laboratory frame: M = m exp(-i k(TE) . x).
        k_te = rate * float(waveform.F_at(np.array([waveform.echo_time_us]))[0])
        phase = -(op.positions @ k_te.T)  # polar: complex exp is slow on CPU
        turn = torch.polar(torch.ones_like(phase), phase)
        weights = weights * (turn if turn.dim() == 3 else turn[None])
    return (weights * u).sum(1)


def _first_half(durations, amplitudes):
    ends = np.cumsum(durations)
    mid = 0.5 * ends[-1]
    keep = ends - durations < mid
    d = durations[keep].copy()
    d[-1] = mid - (ends[keep][-1] - d[-1])
    return d, amplitudes[keep]


def _chunk_size(n_batch, n_cells, n_acq, engine):
    """Acquisitions per chunk within :data:`_CHUNK_BYTES`, counted in
    complex128 in either precision: a chunk's Magnus sub-steps follow its
    strongest gradient, so float32 is chunked, and stepped, as float64 is
    (which measures its sub-steps, :func:`simulate`)."""
    complex_bytes = 16
    if engine == "dense":
        # Generator, propagator and matrix_exp workspace: ~4 dense complex
        # (N, N) matrices per acquisition and batch element.
        per_acq = n_batch * n_cells**2 * complex_bytes * 4
    else:
        # The backward pass of one Chebyshev step holds its ~100 terms of
        # (B, N, chunk) complex states.
        per_acq = n_batch * n_cells * complex_bytes * 100
    return max(1, min(n_acq, _CHUNK_BYTES // max(per_acq, 1)))


def _check_modes(grid, *inputs):
    """Refuse what ``method="modes"`` does not serve, naming the alternative."""
    if grid.periodic:
        raise ValueError(
            "method='modes' serves reflecting and absorbing boxes: on a periodic "
            "grid the modes of the phase-unwrapped frame depend on the "
            "wavevector (doc/validation/modes.md); use method='chebyshev'."
        )
    if any(t is not None and t.requires_grad for t in inputs):
        raise ValueError(
            "method='modes' is forward-only: it does not back-propagate to the "
            "permeability, diffusivity or T2; use method='chebyshev' (or "
            "'auto') for a differentiable signal."
        )


def _engine(method):
    # "auto" once chose the dense reference up to 48 cells, thinking its
    # O(N^3) exponentials cheaper there; per acquisition they are not (48
    # cells, 540 acquisitions, float32: forward 0.50 s against 0.037 s,
    # gradient 1.56 s against 0.021 s; doc/benchmarks_forward.md).
    return "chebyshev" if method == "auto" else method


def _permeability(grid, permeability, dtype, device):
    if isinstance(permeability, np.ndarray) and not permeability.flags.writeable:
        # Phantoms' read-only arrays: torch cannot wrap them without a copy.
        permeability = permeability.copy()
    kappa = torch.as_tensor(permeability, dtype=dtype, device=device)
    if kappa.ndim == 0 or kappa.shape[-1] != grid.n_faces:
        raise ValueError(
            f"permeability must have grid.n_faces = {grid.n_faces} values in its "
            f"last axis (one per interior face), got shape {tuple(kappa.shape)}."
        )
    if torch.any(torch.isnan(kappa)) or torch.any(kappa < 0):
        raise ValueError(
            "permeability must be in [0, inf] m/s (inf = no membrane); found "
            "negative or NaN values."
        )
    return kappa


def _per_cell(grid, value, name, n_batch, batch_shape, like):
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t.expand(n_batch, grid.n_cells)
    if t.shape[-1] != grid.n_cells:
        raise ValueError(
            f"{name} must be a scalar or have grid.n_cells = {grid.n_cells} values "
            f"in its last axis, got shape {tuple(t.shape)}."
        )
    try:
        t = t.expand(*batch_shape, grid.n_cells)
    except RuntimeError as err:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not broadcast against the "
            f"permeability batch shape {tuple(batch_shape)}."
        ) from err
    return t.reshape(n_batch, grid.n_cells)


def _initial(grid, initial, n_batch, batch_shape, like):
    if initial is None:
        return torch.ones(n_batch, grid.n_cells, dtype=like.dtype, device=like.device)
    mask = np.asarray(initial)
    if mask.dtype != bool:
        raise ValueError("initial must be a boolean mask over the cells.")
    start = _per_cell(grid, mask.astype(float), "initial", n_batch, batch_shape, like)
    if torch.any(start.sum(-1) == 0):
        raise ValueError("initial selects no cell; the signal would be undefined.")
    return start


#: Decimals of the b-values (s/mm^2) and unit directions a cache key reads:
#: a gradient table renormalises its directions (changes of ~1e-16), and
#: the same acquisitions must find the same cache; a change of 1e-9 in a
#: direction moves a signal by far less than any tolerance here.
KEY_DECIMALS = 9


def _rounded_acquisitions(protocol):
    """The protocol's b-values and directions as a cache key reads them:
    rounded to :data:`KEY_DECIMALS`, negative zeros made positive."""
    return tuple(
        np.round(np.asarray(a, dtype=np.float64), KEY_DECIMALS) + 0.0
        for a in (protocol.bvals, protocol.bvecs)
    )


def update_digest(digest, grid, protocol, **meta):
    """Feed everything a simulation of ``grid`` and ``protocol`` depends on.

    Updates the ``hashlib`` object ``digest`` with the grid's geometry, the
    protocol's b-values and directions (to :data:`KEY_DECIMALS` decimals)
    and waveforms, then ``meta`` (JSON, with
    the grid's size and wall). Cache keys of simulated results (the learned
    proposal, the label search's signals) are built on it.

    Parameters
    ----------
    digest : hashlib hash object
        The digest to update (in place).
    grid : TetGrid
        The simulation grid.
    protocol : Protocol
        The acquisition.
    **meta
        Further JSON-able settings hashed with it.

    Returns
    -------
    hashlib hash object
        ``digest``, updated.
    """
    for array in (grid.vertices, grid.tets, *_rounded_acquisitions(protocol)):
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    for waveform in protocol.waveforms:
        digest.update(repr(waveform).encode())
        for part in waveform.segments:
            digest.update(np.asarray(part, dtype=np.float64).tobytes())
    # Only an absorbing wall's permeability enters the operators: on another
    # wall it would make two identical simulations look different.
    wall = grid.wall_permeability if grid.boundary == "absorbing" else None
    meta = dict(meta, size=grid.size, boundary=grid.boundary, wall=wall)
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest
