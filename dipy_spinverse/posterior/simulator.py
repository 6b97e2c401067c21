"""The simulator of the amortised posterior: a prior's draws, simulated.

A :class:`PriorSimulator` binds a prior to an acquisition protocol
(:meth:`TissuePrior.simulator <dipy_spinverse.posterior.TissuePrior.simulator>`):
it draws substrates from the prior, simulates their noise-free signals with
:func:`dipy_spinverse.simulate` (patch side by patch side, the Magnus
sub-steps of each measured on its first draws; here or on the workers of a
Ray or Dask cluster; kept in a checkpoint as they are made) and returns them
with the descriptors of the tissue: the training set of the posterior and
anyone's calibration check.

It does not say what tissue: the prior draws it (``draw_pair``) and gives
each patch its grid (``grid``), and the simulator turns draws into signals,
as sbi's simulator maps parameters to data. So the prior's module binds
itself here (``TissuePrior.simulator``) and this one never imports it.
"""

import copy
import inspect
import pathlib
import time
from dataclasses import replace

import numpy as np
import torch
from dipy.utils.logging import logger
from tqdm.auto import tqdm

from ..checks import check_device, check_int, check_number
from ..clusters import CLUSTER_ENGINES, checked_engine, open_cluster, run_chunks
from ..geometry.descriptors import DESCRIPTORS
from ..sim.forward import converged_substeps, simulate
from ..sim.sections import SectionGrid
from ..sim.sequences import as_protocol
from .checkpoint import SimulationCheckpoint

__all__ = [
    "PriorSimulator",
    "SIMULATION_ENGINES",
    "bound_simulator",
    "simulate_batch",
    "draws_truth",
]

#: Where a :class:`PriorSimulator` simulates: this process or a cluster.
SIMULATION_ENGINES = ("serial", *CLUSTER_ENGINES)


#: The options a posterior model binds every prior with, and their defaults.
BINDING_DEFAULTS = dict(device="cpu", engine="serial", address=None, cache_dir=None)


def bound_simulator(prior, protocol, **options):
    """``prior.simulator(protocol, ...)`` with those of ``options`` (of
    :data:`BINDING_DEFAULTS`) that its simulator takes: one prior binding for
    every prior a posterior model trains on.

    A :class:`PriorSimulator` simulates on ``device`` and on the cluster of
    ``engine``; a :class:`WhiteMatterPrior`'s simulator in this process on
    the CPU (a device is then the network's alone); the mixing prior's
    simulator its library's bundles on the cluster of ``engine``, kept in
    ``cache_dir``.

    Parameters
    ----------
    prior : TissuePrior, WhiteMatterPrior or MixturePrior
        Its ``simulator_class`` says what its simulator takes.
    protocol : Protocol
    **options
        ``device``, ``engine``, ``address``, ``cache_dir``.

    Returns
    -------
    PriorSimulator, WhiteMatterSimulator or MixtureSimulator

    Raises
    ------
    ValueError
        For an ``engine`` or ``address`` the prior's simulator cannot use.
    """
    unknown = sorted(set(options) - set(BINDING_DEFAULTS))
    if unknown:
        raise TypeError(
            f"bound_simulator takes {sorted(BINDING_DEFAULTS)}, not {unknown}."
        )
    taken = inspect.signature(prior.simulator_class).parameters
    for name in ("engine", "address"):
        value = options.get(name, BINDING_DEFAULTS[name])
        if name not in taken and value != BINDING_DEFAULTS[name]:
            raise ValueError(
                f"{type(prior).__name__} simulates in this process: {name}="
                f"{value!r} cannot be used; leave {name} at "
                f"{BINDING_DEFAULTS[name]!r} (training_{name} of the model)."
            )
    return prior.simulator(protocol, **{k: v for k, v in options.items() if k in taken})


class PriorSimulator:
    """Signals and descriptors of tissue drawn from a prior
    (:class:`~dipy_spinverse.posterior.TissuePrior`).

    Parameters
    ----------
    prior : TissuePrior
    protocol : Protocol or GradientTable
        The acquisitions (with timing), in the order of the data.
    dtype : torch.dtype
        Of the simulation (float64 default).
    method : str
        The simulator's engine (:func:`dipy_spinverse.simulate`).
    batch_size : int
        Substrates simulated in one call.
    time_tolerance : float or None
        Largest time-discretisation error allowed in a signal (a fraction of
        the b = 0 signal). On periodic patches the Magnus sub-steps are then
        chosen per patch side by measurement: the first substrates of a side
        are simulated with the sub-steps of a coarse phase step (3.2 rad),
        then with twice, four times, ... as many, and the first count whose
        signals differ from the next one's by less than ``time_tolerance`` is
        kept (the error falls ~8x per doubling, so the difference bounds it).
        The phase criterion alone cannot do this: it does not see stiffness,
        and on patches of 1-2 um cells its default erred by ~1e-2. Default
        1e-3, a tenth of the noise at SNR 100. ``None``: the simulator's
        default sub-steps everywhere.
    device : str or torch.device
        Where the simulations run: ``"cpu"`` (default) or ``"cuda"``
        (``"cuda:1"``, ...). The signals come back as numpy arrays either
        way, and do not depend on the device beyond rounding.
    engine : {"serial", "ray", "dask"}
        ``"serial"`` simulates in this process. ``"ray"`` and ``"dask"``
        send each batch of ``batch_size`` draws to a worker of a cluster
        (:func:`~dipy_spinverse.clusters.open_cluster`): the time steps of
        each patch side are measured here first, on its first draws, then
        the batches run on the workers, the same batches a serial run
        simulates, so the signals are identical to a serial run's with the
        same draws; the checkpoint of :meth:`simulate_draws` takes each batch
        as it comes back. A training too large for one machine runs so on a
        multi-node cluster (``ray start --head`` on one node, ``ray start
        --address=<head>:6379`` on the others, then ``address``).
    address : str or distributed.Client, optional
        The cluster of ``engine`` (as
        :func:`~dipy_spinverse.clusters.open_cluster`: a Ray address,
        ``"auto"`` or ``"local"``; a Dask scheduler address or ``Client``);
        default: the one of this process, else ``RAY_ADDRESS`` (Ray), else a
        local one of ``n_workers``.
    n_workers : int, optional
        Workers of a local cluster started here (default: every core).
    """

    # The coarse phase step (rad) whose sub-steps are doubled until converged.
    PHASE_STEP = 3.2
    MAX_SUBSTEPS = 256
    # Substrates of a patch side simulated twice to measure the error.
    _PILOT = 2

    def __init__(
        self,
        prior,
        protocol,
        *,
        dtype=torch.float64,
        method="auto",
        batch_size=64,
        time_tolerance=1e-3,
        device="cpu",
        engine="serial",
        address=None,
        n_workers=None,
    ):
        if not callable(getattr(prior, "draw_pair", None)):
            # What a TissuePrior does, not its class: the prior's module
            # imports this one (TissuePrior.simulator), never the reverse.
            raise TypeError(f"prior must be a TissuePrior, got {type(prior).__name__}.")
        self.prior = prior
        self.protocol = as_protocol(protocol)
        self.dtype = dtype
        self.method = method
        self.batch_size = check_int(batch_size, "batch_size", 1)
        if time_tolerance is not None:
            time_tolerance = check_number(time_tolerance, "time_tolerance", minimum=0.0)
        self.time_tolerance = time_tolerance
        self.device = check_device(device)
        self.engine, self.address, self.n_workers = checked_engine(
            engine, address, n_workers
        )
        #: Per box (side, boundary, section): (Magnus sub-step multiplier,
        #: measured time error).
        self.measured_substeps = {}

    def sample(
        self, n, *, seed, progress=False, reference_resolution=None, checkpoint=None
    ):
        """``n`` noise-free signals and their true descriptors.

        Draw ``i`` depends only on ``seed`` and ``i`` (the ``i``-th child of
        ``numpy.random.SeedSequence(seed)``), not on ``n``. Its signal does
        too, to within ``time_tolerance``: the sub-steps of a patch side are
        measured on the first draws of that side and then kept by this
        simulator (``measured_substeps``).

        Parameters
        ----------
        n : int
        seed : int
        progress : bool
            A progress bar over the draws and the simulations.
        reference_resolution : int, optional
            Describe the tissue as a grid of this many cubes per side
            rasterises it
            (:meth:`~dipy_spinverse.posterior.TissuePrior.draw_pair`), closer
            to the tissue the cells were drawn as than the prior's own grid;
            the signals stay the prior grid's.
        checkpoint : path-like, optional
            Keep the signals in this ``.npz`` file as they are simulated, and
            resume from it (:meth:`simulate_draws`).

        Returns
        -------
        signals : ndarray (n, n_acquisitions)
            Normalised to the signal at time 0 (1 at b = 0), in protocol
            order.
        truth : dict of ndarray
            Each of :data:`~dipy_spinverse.geometry.DESCRIPTORS` (length
            ``n``; ``orientation`` (n, 3)), ``shape_tensor`` (n, 3, 3),
            ``diffusivity`` (mm^2/s), ``box_size`` (um), ``boundary`` and
            ``family``.
        """
        draws, references = self._draws(n, seed, reference_resolution, progress)
        signals = self.simulate_draws(draws, progress=progress, checkpoint=checkpoint)
        return signals, draws_truth(draws if references is None else references)

    def sample_pairs(
        self, n, *, reference_resolution, seed, progress=False, checkpoint=None
    ):
        """Draws simulated on the prior's grid and on a finer one.

        Each draw is rasterised on its patch's grid and on a grid of
        ``reference_resolution`` cubes per side
        (:meth:`~dipy_spinverse.posterior.TissuePrior.draw_pair`) and
        simulated on both (each grid with its own measured time steps). The
        difference of the signals is the prior grid's approximation error
        (Kaipio and Somersalo), which
        :class:`~dipy_spinverse.posterior.TrainingOptions` can model; the
        finer signals are held-out data closer to tissue than the training
        set's.

        Parameters
        ----------
        n : int
        reference_resolution : int
            Cubes per side of the reference grid, above the prior's.
        seed : int
        progress : bool
        checkpoint : path-like, optional
            Keep the prior grid's signals in this ``.npz`` file as they are
            simulated (the reference grid's beside it, ``<stem>-reference.npz``),
            and resume from them (:meth:`simulate_draws`).

        Returns
        -------
        signals : ndarray (n, n_acquisitions)
            On the prior's grid.
        reference_signals : ndarray (n, n_acquisitions)
            The same tissue on the reference grid.
        reference_truth : dict of ndarray
            Its descriptors on the reference grid (as :meth:`sample`).
        """
        draws, references = self._draws(n, seed, reference_resolution, progress)
        reference = PriorSimulator(
            replace(self.prior, resolution=reference_resolution),
            self.protocol,
            dtype=self.dtype,
            method=self.method,
            batch_size=self.batch_size,
            time_tolerance=self.time_tolerance,
            device=self.device,
        )
        fine_checkpoint = None
        if checkpoint is not None:
            checkpoint = pathlib.Path(checkpoint)
            fine_checkpoint = checkpoint.with_name(f"{checkpoint.stem}-reference.npz")
        signals = self.simulate_draws(draws, progress=progress, checkpoint=checkpoint)
        fine = reference.simulate_draws(
            references, progress=progress, checkpoint=fine_checkpoint
        )
        return signals, fine, draws_truth(references)

    def draws(self, n, *, seed):
        """The prior's first ``n`` draws of ``seed``, not simulated (the
        tissue :meth:`sample` simulates; :func:`draws_truth` describes them).

        Returns
        -------
        list of Draw
        """
        return self._draws(n, seed, None, False)[0]

    def _draws(self, n, seed, reference_resolution, progress):
        """Draws of the prior, and of the same tissue at a finer resolution."""
        n = check_int(n, "n", 1)
        if reference_resolution is not None:
            reference_resolution = check_int(
                reference_resolution,
                "reference_resolution",
                self.prior.resolution + 1,
            )
        children = np.random.SeedSequence(int(seed)).spawn(n)
        pairs = [
            self.prior.draw_pair(np.random.default_rng(child), reference_resolution)
            for child in tqdm(children, desc="Drawing substrates", disable=not progress)
        ]
        draws = [p[0] for p in pairs]
        if reference_resolution is None:
            return draws, None
        return draws, [p[1] for p in pairs]

    def seconds_per_draw(self, *, seed, n_draws=200, per_box=2):
        """The mean simulation time of a draw of the prior, in seconds.

        A draw's cost depends on its patch (small patches are stiff: up to
        ~50x a large one's), so a few timed draws say little. ``n_draws``
        draws (no simulation) count how often each patch comes; each patch
        is timed on ``per_box`` of its draws, after its sub-steps are
        measured (kept by this simulator, as a training would measure them
        on its first draws). On a GPU a batch costs about as much whatever
        its size up to ``batch_size`` (its kernels are launch-bound), so
        there each patch is timed on all its draws up to ``batch_size``:
        timed on 2 draws a patch, the default prior's training set was
        announced at 23.9 min on an H200 and simulated in 2 min; timed so,
        11.8 ms a draw are announced for 6.3 measured.

        Parameters
        ----------
        seed : int
        n_draws, per_box : int

        Returns
        -------
        float
        """
        draws, _ = self._draws(n_draws, seed, None, False)
        if self.device.type == "cuda":
            per_box = max(per_box, self.batch_size)
        total = 0.0
        for rows in _boxes(draws).values():
            timed = [draws[i] for i in rows[:per_box]]
            if self.time_tolerance is not None:
                self.simulate_draws(timed)  # measures the box's sub-steps
            start = time.perf_counter()
            self.simulate_draws(timed)
            total += (time.perf_counter() - start) / len(timed) * len(rows)
        return total / len(draws)

    def simulate_draws(self, draws, *, progress=False, checkpoint=None):
        """Noise-free signals (n, n_acquisitions) of draws of the prior
        (:meth:`~dipy_spinverse.posterior.TissuePrior.draw`), patch side by
        patch side.

        The time steps of each patch side are measured on its first draws
        (:attr:`time_tolerance`), then its draws are simulated in batches of
        ``batch_size``, here or on the workers of ``engine``.

        Parameters
        ----------
        draws : sequence of Draw
        progress : bool
        checkpoint : path-like, optional
            An ``.npz`` file that keeps the signals as they are simulated
            (:class:`~dipy_spinverse.posterior.checkpoint.SimulationCheckpoint`,
            written every minute, when interrupted and when done); a later
            call on the same draws resumes from it.
        """
        n = len(draws)
        signals = np.empty((n, len(self.protocol)))
        done = np.zeros(n, dtype=bool)
        kept, n_restored = None, 0
        if checkpoint is not None:
            kept = SimulationCheckpoint(checkpoint, draws, len(self.protocol))
            n_restored = kept.restore(signals, done, self.measured_substeps)
        bar = tqdm(total=n, initial=n_restored, desc="Simulating", disable=not progress)

        def finished(rows, result):
            signals[rows] = result
            done[rows] = True
            bar.update(len(rows))
            if kept is not None:
                kept.save(signals, done, self.measured_substeps)

        try:
            batches = []
            for box, rows in _boxes(draws).items():
                rows = [i for i in rows if not done[i]]
                if (
                    rows
                    and self.time_tolerance is not None
                    and box not in self.measured_substeps
                ):
                    grid = self.prior.grid(box[0], box[1], section=box[2])
                    pilot = rows[: self._PILOT]
                    finished(pilot, self._measure_substeps(box, grid, draws, pilot))
                    rows = rows[len(pilot) :]
                for start in range(0, len(rows), self.batch_size):
                    batches.append((box, rows[start : start + self.batch_size]))
            self._run(batches, draws, finished)
        finally:
            bar.close()
            if kept is not None and n_restored < n:
                # Also when complete: a training that fails after its
                # simulations reruns without them.
                kept.save(signals, done, self.measured_substeps, force=True)
        return signals

    def _run(self, batches, draws, finished):
        """Simulate ``batches`` of (box, rows) here or on the cluster,
        calling ``finished(rows, signals)`` as each comes back."""
        if self.engine == "serial":
            for box, rows in batches:
                finished(rows, simulate_batch(self, self._task(box, draws, rows)))
            return
        with open_cluster(
            self.engine, self.address, n_workers=self.n_workers
        ) as cluster:
            run_chunks(
                cluster,
                simulate_batch,
                self,
                batches,
                load=lambda batch: self._task(batch[0], draws, batch[1]),
                done=lambda batch, result: finished(batch[1], result),
                gpu=self.device.type == "cuda",
            )

    def _task(self, box, draws, rows):
        """What a worker needs to simulate ``rows``: the box, their draws
        and the box's sub-steps."""
        substeps = self.measured_substeps.get(box, (1, None))[0]
        return box, [draws[i] for i in rows], substeps

    def _simulate(self, grid, draws, rows, box=None, *, substeps=None, dtype=None):
        if substeps is None:
            substeps = self.measured_substeps.get(box, (1, None))[0]
        kappa = np.stack([draws[i].substrate.face_permeability for i in rows])
        diffusivity = np.array([draws[i].diffusivity for i in rows])[:, None]
        axes = None
        if isinstance(grid, SectionGrid):
            axes = np.stack([draws[i].axis for i in rows])
        with torch.no_grad():
            out = simulate(
                grid,
                kappa,
                self.protocol,
                diffusivity=np.repeat(diffusivity, grid.n_cells, axis=1),
                dtype=self.dtype if dtype is None else dtype,
                method=self.method,
                phase_step=None if self.time_tolerance is None else self.PHASE_STEP,
                substeps=substeps,
                axes=axes,
                device=self.device,
            )
        return out.cpu().numpy()

    def _measure_substeps(self, box, grid, draws, rows):
        """Double the Magnus sub-steps of ``rows`` until their signals change
        by less than ``time_tolerance`` (:func:`~dipy_spinverse.sim.forward.
        converged_substeps`); keep that count for the box (side, boundary)
        and return the rows' signals at it (as every other row of the box).
        Measured in float64 whatever ``dtype``: float32's rounding grows with
        the steps, and a doubling in float32 takes it for their error
        (:func:`~dipy_spinverse.simulate` measures so too)."""
        substeps, signals, error = converged_substeps(
            lambda n: self._simulate(
                grid, draws, rows, substeps=n, dtype=torch.float64
            ),
            self.time_tolerance,
            max_substeps=self.MAX_SUBSTEPS,
        )
        self.measured_substeps[box] = (substeps, error)
        if error > self.time_tolerance:
            logger.warning(
                "Prior boxes of side %.3g um (%s): time steps still change the "
                "signals by %.2g at %d Magnus sub-steps, above time_tolerance "
                "%.2g; raise cell_diameter's lower bound (its finest cells set the "
                "stiffness).",
                box[0],
                box[1],
                error,
                substeps,
                self.time_tolerance,
            )
        return signals

    def __repr__(self):
        return f"PriorSimulator({self.prior!r}, n_acquisitions={len(self.protocol)})"


def simulate_batch(simulator, task, device=None):
    """Signals of one batch of draws (a task of :meth:`PriorSimulator.
    simulate_draws`, run in this process or on a cluster's worker).

    Parameters
    ----------
    simulator : PriorSimulator
    task : tuple
        The patch (side, boundary, section), the draws, and the Magnus
        sub-step multiple of that patch.
    device : torch.device, optional
        A worker's own GPU (Dask); default the simulator's device.

    Returns
    -------
    ndarray (len(draws), n_acquisitions)
    """
    box, draws, substeps = task
    if device is not None:
        simulator = copy.copy(simulator)
        simulator.device = torch.device(device)
    grid = simulator.prior.grid(box[0], box[1], section=box[2])
    return simulator._simulate(grid, draws, range(len(draws)), box, substeps=substeps)


def _boxes(draws):
    """Indices of ``draws`` by patch (side, boundary, section): the draws one
    grid simulates."""
    by_box = {}
    for i, draw in enumerate(draws):
        by_box.setdefault((draw.side, draw.boundary, draw.axis is not None), []).append(
            i
        )
    return by_box


def draws_truth(draws):
    """The descriptors of draws, stacked, with what else a draw holds."""
    truth = _stack([d.descriptors for d in draws])
    truth["diffusivity"] = np.array([d.diffusivity for d in draws])
    truth["box_size"] = np.array([d.side for d in draws])
    truth["boundary"] = np.array([d.boundary for d in draws])
    truth["family"] = np.array(
        ["axon" if d.axis is not None else d.substrate.kinds[0] for d in draws]
    )
    return truth


def _stack(rows):
    keys = [k for k in rows[0] if k in DESCRIPTORS or k == "shape_tensor"]
    return {k: np.array([r[k] for r in rows]) for k in keys}
