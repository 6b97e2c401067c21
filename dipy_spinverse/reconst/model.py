"""The DIPY reconstruction model :class:`SpinverseModel`.

``SpinverseModel(gtab, ...)`` is used like DIPY's ``TensorModel`` or
``IvimModel``: build it once from a gradient table (with the gradient timing
in ``gtab.big_delta`` / ``gtab.small_delta``), then call ``fit`` on one voxel
or a whole volume. Every option is checked once, when the model is built.
Each voxel is normalised by its own b = 0 signal and handed to
:func:`dipy_spinverse.inverse.reconstruct`.
"""

import copy
import hashlib
import os
import warnings

import numpy as np
import torch
from dipy.core.gradients import GradientTable, gradient_table
from dipy.reconst.base import ReconstModel
from dipy.reconst.multi_voxel import multi_voxel_fit
from dipy.utils.logging import logger

from ..checks import (
    check_choice,
    check_device,
    check_diffusivity,
    check_dtype,
    check_int,
    check_positive,
    check_s0,
)
from ..inverse import grid_error, prepare, resolve_config
from ..meshfit.refine import check_refine_options, refine_topology
from ..posterior import TissuePrior, TrainingOptions, default_training, load_or_train
from ..sim.forward import simulate
from ..sim.grid import BOUNDARIES, TetGrid
from ..sim.sequences import PGSE, Protocol, check_bvals
from ..sim.signals import normalise_b0
from . import runner
from .fit import MASKED, UNDERDETERMINED, SpinverseFit
from .plausibility import protocol_problems
from .posterior import OUT_OF_PRIOR, PosteriorFit, fit_posterior

__all__ = ["SpinverseModel", "DEFAULT_GRID", "FIT_METHODS", "check_model_options"]


#: How :meth:`SpinverseModel.fit` estimates: the label search and face fit
#: (membranes, meshes) or the amortised posterior (calibrated maps).
FIT_METHODS = ("search", "posterior")

#: What the noise level ``sigma`` of the model is (in its error messages; the
#: workflow, whose flags mean other units, puts its own words here).
NOISE_HINT = (
    "(the noise standard deviation over the b=0 signal, 1/SNR, e.g. 0.02; "
    "estimate it e.g. with dipy.denoise.noise_estimate.estimate_sigma divided "
    "by the mean b=0 signal)"
)


def check_model_options(
    *,
    fit_method="search",
    preset="default",
    max_iter=None,
    refine_mesh=False,
    prior=None,
    posterior_options=None,
    **options,
):
    """Check the options of :class:`SpinverseModel` that need neither data
    nor a gradient table.

    The model calls it first; a command can call it before reading any
    data (``dipy_fit_spinverse`` does, its flags named in the messages).

    Parameters
    ----------
    fit_method, preset, max_iter, refine_mesh, prior, posterior_options
        As in :class:`SpinverseModel`.
    **options
        The inversion's options by name
        (:data:`dipy_spinverse.inverse.config.OPTIONS`).

    Returns
    -------
    config : InversionConfig
        The inversion's configuration (before it is fitted to a protocol).

    Raises
    ------
    ValueError
        An option out of range, or one that the fit would ignore: the label
        search's options with ``fit_method="posterior"``, ``posterior_options``
        with neither the posterior nor a prior, a posterior or a surface check
        without ``sigma``, a surface check or ``refine_mesh`` without a label
        search.
    """
    fit_method = check_choice(fit_method, "fit_method", FIT_METHODS)
    posterior = fit_method == "posterior"
    if posterior:
        # The posterior uses sigma alone of the inversion's options.
        unused = sorted(set(options) - {"sigma"})
        unused += ["max_iter"] if max_iter is not None else []
        unused += ["refine_mesh"] if refine_mesh else []
        if unused:
            raise ValueError(
                f"option(s) {unused} set the label search, which "
                "fit_method='posterior' does not run; leave them out or use "
                "fit_method='search'."
            )
    config = resolve_config(preset, **({} if posterior else options), max_iter=max_iter)
    if posterior:  # the noise is checked as the search's is
        config = config.replace(sigma=options.get("sigma", 0.0))
    if refine_mesh and not config.returns_labels:
        raise ValueError(
            "refine_mesh=True starts each mesh from a labelled cell: turn the "
            "label search on (search_steps > 0, e.g. preset='default') or use "
            "parametrisation='cell'."
        )
    surface_check = not posterior and prior is not None
    if posterior_options is not None and not (posterior or surface_check):
        raise ValueError(
            "posterior_options set how the amortised posterior is trained; "
            "pass fit_method='posterior', or with fit_method='search' a prior "
            "(the surface check), or leave them out."
        )
    if surface_check and not config.searches_labels:
        raise ValueError(
            "prior turns on the surface check of the label search's "
            "answers; turn the search on (search_steps > 0, e.g. "
            "preset='default') or leave prior out."
        )
    if (posterior or surface_check) and not options.get("sigma"):
        what = "fit_method='posterior'" if posterior else "The surface check"
        raise ValueError(f"{what} needs the noise level: pass sigma {NOISE_HINT}.")
    if prior is not None and not isinstance(prior, TissuePrior):
        raise ValueError(
            "prior must be a dipy_spinverse.posterior.TissuePrior, got "
            f"{type(prior).__name__}."
        )
    if posterior_options is not None and not isinstance(
        posterior_options, TrainingOptions
    ):
        raise ValueError(
            "posterior_options must be a dipy_spinverse.posterior."
            f"TrainingOptions, got {type(posterior_options).__name__}."
        )
    return config


#: The default grid: the published BCC grid of 576 tetrahedra, 26.7 um across.
DEFAULT_GRID = dict(size=80 / 3, n=4, boundary="reflecting", wall_permeability=0.1)


class SpinverseModel(ReconstModel):
    """Spinverse: membranes and their permeability from diffusion MRI.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable or Protocol
        Gradient table whose ``big_delta`` and ``small_delta`` hold the pulse
        timing in seconds (scalars or one value per volume; several
        diffusion times are the normal case: with one, or with
        diffusion-weighted directions that do not span 3-D, the label
        search warns and its voxels have status ``UNDERDETERMINED``,
        :func:`~dipy_spinverse.reconst.plausibility.protocol_problems`), or
        an explicit :class:`~dipy_spinverse.sim.sequences.Protocol`. It
        needs at least one b = 0 volume (``b <= gtab.b0_threshold``).
    grid : TetGrid, optional
        The grid of one voxel. Default: ``TetGrid.bcc(grid_size,
        grid_resolution, boundary=boundary)``. Exclusive with the next four.
    grid_size : float, optional
        Side of the simulated box in um (default 80/3, the published grid).
    grid_resolution : int, optional
        BCC cubes per side, at least 2 (default 4: 576 tetrahedra, 1,008 faces).
    boundary : {"reflecting", "periodic", "absorbing"}, optional
        Outer boundary of the box (default ``"reflecting"``).
    wall_permeability : float, optional
        Wall permeability in m/s for ``boundary="absorbing"`` (default 0.1).
    diffusivity : float
        Intrinsic diffusivity in mm^2/s, within
        :data:`~dipy_spinverse.checks.DIFFUSIVITY_RANGE` (1e-5 to 0.1; a
        value outside is refused as another unit: 2e-9 m^2/s = 2e-3 mm^2/s).
    preset : str or InversionConfig
        Inversion configuration, a key of
        :data:`dipy_spinverse.inverse.PRESETS` or a configuration.
    max_iter : int, optional
        Total face-fit iterations: the preset's curriculum stages (and its
        learning-rate warm-up, unless ``warmup`` is given) are scaled to this
        total, each stage keeping at least one iteration. Default: the
        preset's own total.
    batch_size : int
        Voxels fitted together in one batched call (memory grows linearly).
    device : str or torch.device
        ``"cpu"`` or ``"cuda"`` (``"cuda:1"``, ...).
    dtype : {"float32", "float64"} or torch.dtype
        Floating-point precision of the simulator (float32, the published
        precision, is 3-4 times faster).
    refine_mesh : bool
        After the label search, refine each fitted voxel's largest cell into
        a smooth mesh fitted to the voxel's signal
        (:func:`dipy_spinverse.meshfit.refine_cell`): the fit then has
        ``smooth_mesh``, ``mesh_vertices``, ``mesh_volume``,
        ``mesh_surface_to_volume``, ``mesh_radius``, ``mesh_status`` and
        ``save_smooth_mesh``. Needs cell labels (the label search,
        ``search_steps > 0``, or ``parametrisation="cell"``). About a minute
        per voxel on one core with the default ``mesh_options``.
    mesh_options : dict, optional
        Options of the refinement
        (:data:`dipy_spinverse.meshfit.refine.REFINE_DEFAULTS`: ``template``
        ``"ball"`` or ``"tube"``, ``resolution``, ``n_modes``, ``max_iter``,
        ``code`` (``"spectral"``, or ``"axon"`` with a tube: the axon
        family's parameters), ...); only with ``refine_mesh=True``.
    fit_method : {"search", "posterior"}
        ``"search"``: the face fit and label search (membranes, meshes and
        per-face permeabilities; :class:`SpinverseFit`). ``"posterior"``:
        the amortised posterior of the tissue descriptors
        (:data:`~dipy_spinverse.geometry.DESCRIPTORS`), with credible
        intervals and an ``OUT_OF_PRIOR`` status
        (:class:`~dipy_spinverse.reconst.posterior.PosteriorFit`); it needs
        ``sigma`` (noise over the b = 0 signal) and trains, once per protocol
        and prior, a network cached on disk.
    prior : TissuePrior, optional
        The posterior's prior (default ``TissuePrior(diffusivity=diffusivity)``).
        With ``fit_method="search"`` it turns on the surface check: each
        voxel's answer is held against the posterior of this prior, and its
        ``uncertainty`` is at least the expected ``1 - IoU`` that the
        posterior of the restricted volume implies
        (:func:`~dipy_spinverse.reconst.posterior.volume_iou_bound`). The
        prior must simulate the search's own box: ``boundary="periodic"`` on
        a periodic grid, ``"reflecting"`` with ``box_side`` the grid's size
        on a reflecting one. Needs ``sigma``.
    posterior_options : TrainingOptions, optional
        How the posterior is trained (simulations, network, epochs);
        default :func:`~dipy_spinverse.posterior.default_training` of the
        prior (the default prior's: 10,000 simulations, its grid error
        modelled).
    n_posterior_samples : int
        Posterior draws per voxel for the maps and stored intervals. They
        are quasi-random (:func:`~dipy_spinverse.posterior.estimator.normal_points`):
        the default 128 place a median as accurately as 500 independent
        draws would.
    cache_dir : path-like, optional
        Where the trained posterior is kept (default
        :func:`dipy_spinverse.files.cache_root`).
    **options
        The inversion's options by name
        (:data:`dipy_spinverse.inverse.config.OPTIONS`), the fields of the
        parts of :class:`~dipy_spinverse.inverse.InversionConfig`: priors
        (``continuity``, ``manifold``, ``binarise``, ``area``), curriculum
        (``stages``, ``blend``, ``sequence_weights``), optimiser (``lr``,
        ``lr_final``, ``warmup``, ``clip``), ``threshold``,
        ``parametrisation``, ``noise``, ``sigma``, the label search's
        ``search_*``. An option the configuration would ignore is an error.

    Raises
    ------
    ValueError
        Missing gradient timing, negative b-values, no b = 0 or no
        diffusion-weighted volume, b-values in another unit than s/mm^2
        (:func:`~dipy_spinverse.sim.sequences.check_bvals`), unknown options,
        options the configuration ignores, or out-of-range values (a device
        torch cannot use, a diffusivity in another unit than mm^2/s).

    Notes
    -----
    Each voxel is divided by its own b = 0 signal, sequence by sequence (a
    sequence's own mean b = 0 signal when it has b = 0 volumes, else the mean
    of all b = 0 volumes; :func:`dipy_spinverse.sim.signals.b0_scale`), so that
    T2 weighting that differs between echo times cancels.

    Examples
    --------
    Two diffusion times, gradients along three axes (fewer leave the
    membranes undetermined: status ``UNDERDETERMINED``):

    >>> import numpy as np
    >>> from dipy.core.gradients import gradient_table
    >>> bvals = np.array([0, 1000, 1000, 1000] * 2)
    >>> bvecs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]] * 2)
    >>> gtab = gradient_table(bvals, bvecs=bvecs, small_delta=0.01,
    ...                       big_delta=np.repeat([0.03, 0.015], 4))
    >>> model = SpinverseModel(gtab, grid_resolution=2, preset="paper",
    ...                        stages=[dict(iterations=5)])
    >>> model.grid.n_cells
    48
    >>> fit = model.fit(np.array([1000.0, 600, 610, 590, 1000, 800, 810, 790]))
    >>> fit.status, fit.permeability.shape, fit.predict().shape
    (0, (72,), (8,))
    """

    def __init__(
        self,
        gtab,
        *,
        grid=None,
        grid_size=None,
        grid_resolution=None,
        boundary=None,
        wall_permeability=None,
        diffusivity=2e-3,
        preset="default",
        max_iter=None,
        batch_size=32,
        device="cpu",
        dtype="float32",
        refine_mesh=False,
        mesh_options=None,
        fit_method="search",
        prior=None,
        posterior_options=None,
        n_posterior_samples=128,
        cache_dir=None,
        **options,
    ):
        self.gtab, self.protocol = gradient_tables(gtab)
        config = check_model_options(
            fit_method=fit_method,
            preset=preset,
            max_iter=max_iter,
            refine_mesh=refine_mesh,
            prior=prior,
            posterior_options=posterior_options,
            **options,
        )
        #: ``"search"`` (the inversion) or ``"posterior"`` (amortised maps).
        self.fit_method = fit_method
        self.grid = _make_grid(
            grid, grid_size, grid_resolution, boundary, wall_permeability
        )
        self.diffusivity = check_diffusivity(diffusivity)
        self.preset = preset
        self.max_iter = None if max_iter is None else check_int(max_iter, "max_iter", 1)
        self.batch_size = check_int(batch_size, "batch_size", 1)
        self.device = check_device(device)
        self.dtype = check_dtype(dtype)
        self.options = copy.deepcopy(options)
        #: The protocol's sequences in rank order (:meth:`Protocol.sequences`).
        self.sequences = self.protocol.sequences()
        #: The inversion's configuration on this protocol (stages adapted).
        self.config = config.for_protocol(len(self.sequences))
        b0 = self.protocol.bvals == 0
        if not b0.any():
            raise ValueError(
                "gtab has no b=0 volume (b <= gtab.b0_threshold); Spinverse "
                "normalises each voxel by its b=0 signal. Acquire at least one "
                "b=0 volume, or raise b0_threshold in gradient_table(...) if your "
                "b=0 volumes have small nominal b-values."
            )
        missing = [r for r, (_, idx) in enumerate(self.sequences) if not b0[idx].any()]
        if missing:
            warnings.warn(
                f"sequence(s) of rank {missing} (0 = longest diffusion time) have "
                "no b=0 volume of their own; they are normalised by the mean of all "
                "b=0 volumes, which assumes the same T2 weighting (echo time).",
                UserWarning,
                stacklevel=2,
            )
        searches = self.fit_method == "search" and self.config.searches_labels
        if searches and not self.config.loss.sigma > 0:
            warnings.warn(
                "sigma is not given: the label search cannot test whether its "
                "answers fit the data within the noise, so it vouches for no "
                "surface (uncertainty 1, status UNCERTAIN_SURFACE; "
                f"reconst.runner.vouch_for_surfaces). Pass sigma {NOISE_HINT}.",
                UserWarning,
                stacklevel=2,
            )
        # Known from the protocol alone: said before any voxel is fitted
        # (each fit says it again, with its voxels' status).
        #: Why the protocol cannot determine the membranes (one sentence a
        #: problem; empty when none): found once, reused by every fit.
        self.protocol_problems = protocol_problems(self.protocol)
        if self.fit_method == "search" and self.protocol_problems:
            warnings.warn(
                "the protocol cannot determine the membranes: "
                + "; ".join(self.protocol_problems)
                + f". Every fitted voxel will have status {UNDERDETERMINED} "
                "(UNDERDETERMINED).",
                UserWarning,
                stacklevel=2,
            )
        self._set_refinement(refine_mesh, mesh_options)
        self._set_posterior(prior, posterior_options, n_posterior_samples, cache_dir)
        self._pid = os.getpid()

    def _set_posterior(self, prior, options, n_samples, cache_dir):
        """Check and keep the posterior's settings (``fit_method="posterior"``,
        or the search's surface check)."""
        posterior = self.fit_method == "posterior"
        self.cache_dir = cache_dir
        #: Whether the search's surfaces are checked against a posterior.
        self.surface_check = not posterior and prior is not None
        if not (posterior or self.surface_check):
            return
        if self.surface_check:
            self._check_surface_prior(prior)
        prior = TissuePrior(diffusivity=self.diffusivity) if prior is None else prior
        options = default_training(prior) if options is None else options
        #: The noise level of the posterior's input, relative to S0.
        self.posterior_sigma = self.config.loss.sigma
        _warn_outside_training_noise(self.posterior_sigma, options)
        #: The prior bound to this protocol: ``model.prior.sample(n, seed=s)``.
        self.prior = prior.simulator(self.protocol)
        self.posterior_options = options
        self.n_posterior_samples = check_int(n_samples, "n_posterior_samples", 10)

    def _check_surface_prior(self, prior):
        """The surface check's prior must simulate the search's own box."""
        grid = self.grid
        # The search's own physics only: a prior that also holds other boxes
        # ("either") widens the posterior with answers the search cannot
        # give, and exact answers would be called uncertain.
        if grid.boundary == "periodic":
            same = prior.boundary == "periodic"
            want = "boundary='periodic'"
        else:
            same = prior.boundary == "reflecting" and np.isclose(
                prior.box_side, grid.size, rtol=1e-9
            )
            want = f"boundary='reflecting' and box_side={grid.size!r}, the grid's size"
        if grid.boundary == "absorbing":
            want = "no absorbing walls: the prior models reflecting ones"
        if grid.boundary == "absorbing" or not same:
            raise ValueError(
                "prior of the surface check must simulate the search's box "
                f"({grid.boundary} walls of {grid.size:.4g} um): give a "
                f"TissuePrior with {want}."
            )

    @property
    def estimator(self):
        """The trained posterior (trained on first use, then cached on disk)."""
        if self.fit_method != "posterior" and not self.surface_check:
            raise AttributeError(
                "estimator: only fit_method='posterior' and the search's surface "
                "check (prior=) have one."
            )
        if getattr(self, "_estimator", None) is None:
            self._estimator, self.estimator_path = load_or_train(
                self.prior.prior,
                self.protocol,
                self.posterior_options,
                cache_dir=self.cache_dir,
            )
        return self._estimator

    def _set_refinement(self, refine_mesh, mesh_options):
        """Check and keep the smooth-mesh refinement's settings."""
        if not isinstance(refine_mesh, (bool, np.bool_)):
            raise ValueError(f"refine_mesh must be True or False, got {refine_mesh!r}.")
        #: Whether each fitted voxel's largest cell is refined into a smooth mesh.
        self.refine_mesh = bool(refine_mesh)
        if mesh_options is not None and not self.refine_mesh:
            raise ValueError(
                "mesh_options are the options of the smooth-mesh refinement; "
                "pass refine_mesh=True with them, or leave them out."
            )
        #: The refinement's options (None without refine_mesh).
        self.mesh_options = (
            check_refine_options(mesh_options) if self.refine_mesh else None
        )
        #: Tetrahedra shared by every voxel's smooth mesh (None without it).
        self.mesh_tets = (
            refine_topology(self.mesh_options) if self.refine_mesh else None
        )

    # -- fitting ---------------------------------------------------------------
    def fit(
        self,
        data,
        *,
        mask=None,
        engine="serial",
        address=None,
        n_jobs=None,
        verbose=False,
        vox_per_chunk=None,
        checkpoint=None,
        resume=None,
    ):
        """Fit one voxel or a volume.

        Parameters
        ----------
        data : array_like (..., n_volumes) or (n_mask, n_volumes)
            One voxel (1-D) or a volume, raw signal in the order of ``gtab``;
            or, with ``mask``, the voxels of the mask only (``volume[mask]``,
            in C order), so that a few voxels of a large volume need not be
            loaded with the rest (:func:`dipy_spinverse.files.read_voxels`
            reads them from a NIfTI file; the fit is of ``mask.shape``).
        mask : array_like of bool (data.shape[:-1]), optional
            Voxels to fit (default: all). For one voxel a single bool:
            ``False`` returns an unfitted fit with status ``MASKED``.
        engine : {"serial", "joblib", "dask", "ray"}
            ``"serial"`` fits ``batch_size`` voxels at a time through the
            batched simulator on ``device``; ``"joblib"`` spreads chunks of
            ``vox_per_chunk`` voxels over ``n_jobs`` local processes (DIPY's
            ``multi_voxel_fit``); ``"ray"`` and ``"dask"`` run one task per
            chunk on a cluster (``address``; by default a local one of
            ``n_jobs`` workers), each worker on its own GPU when the cluster
            has GPUs and the model is on ``cuda``. Dask without the
            ``distributed`` package (and no ``address``) runs on local threads
            through DIPY. Install both with
            ``pip install "dipy_spinverse[parallel]"``. One voxel (1-D data)
            is fitted in this process; the engine options are still checked.
        address : str or distributed.Client, optional
            The cluster of ``engine="ray"`` (a running cluster's address,
            ``"auto"`` for the one on this machine, ``"local"`` for a new
            local instance; default: the ``ray.init`` of this process, else
            ``RAY_ADDRESS``, else a local instance) or ``engine="dask"`` (a
            scheduler address ``"tcp://host:port"`` or a ``Client``; default:
            the current client, else a local cluster of processes).
        n_jobs : int, optional
            Workers of a parallel engine started here (default: all cores;
            negative values count back from all cores, as in DIPY).
        verbose : bool
            Show a progress bar over voxels: it moves through a chunk as the
            face fit iterates and as voxels end their label search, and over
            the workers of a parallel engine as their chunks finish.
        vox_per_chunk : int, optional
            Voxels per batched call (default ``batch_size``; for parallel
            engines at most an equal share per worker).
        checkpoint : callable, optional
            ``checkpoint(partial_fit, rows)`` at the start (``rows`` None)
            and after every chunk, with the rows of ``partial_fit.params``
            that chunk fitted (a callable of one argument gets the partial
            fit alone): :class:`dipy_spinverse.io.Checkpoint` writes each
            chunk once to an HDF5 store. Volume fits only.
        resume : SpinverseFit, optional
            A partly finished volume fit of the same data and model: only its
            voxels with status ``PENDING`` are fitted
            (:func:`dipy_spinverse.io.resume_fit` resumes a saved file).

        Returns
        -------
        SpinverseFit
            Of shape ``data.shape[:-1]`` (``mask.shape`` for the mask's
            voxels; ``()`` for one voxel).
        """
        data = self._check_data(data)
        if self.fit_method == "posterior":
            return self._fit_posterior(data, mask)
        if data.ndim == 1:
            runner.check_engine_options(engine, address, n_jobs, vox_per_chunk)
            if checkpoint is not None or resume is not None:
                raise ValueError(
                    "checkpoint and resume are for volume fits and data is one "
                    "voxel (1-D); fit data[None], a volume of one voxel, to save "
                    "or resume it."
                )
            if mask is not None and not runner.check_mask(mask, ()):
                params = runner.empty_params(self, ())
                params["status"][...] = MASKED
                return SpinverseFit(self, params, False)
            params, history = runner.fit_one(self, data, verbose=verbose)
            return SpinverseFit(self, params, history=history)
        self._prepare(progress=verbose)
        return runner.fit_volume(
            self,
            data,
            mask=mask,
            engine=engine,
            address=address,
            n_jobs=n_jobs,
            verbose=verbose,
            vox_per_chunk=vox_per_chunk,
            checkpoint=checkpoint,
            resume=resume,
        )

    def _fit_posterior(self, data, mask):
        """The posterior fit of one voxel or a volume (or the mask's rows)."""
        if data.ndim == 1:
            mask = np.asarray(True if mask is None else mask, dtype=bool)
            rows = data[None] if mask else data[None][:0]
        else:
            mask = runner.check_mask(mask, runner.volume_shape(data, mask))
            rows = data if runner.is_mask_rows(data, mask) else data[mask]
        params = fit_posterior(self, rows, n_samples=self.n_posterior_samples)
        bad = params["status"] == OUT_OF_PRIOR
        if bad.any():
            logger.warning(
                f"{int(bad.sum())} of {len(bad)} voxels are OUT_OF_PRIOR: no "
                "simulation of the prior explains their signal within the noise "
                f"(prior {self.prior.prior!r}); their maps are NaN. Check the "
                "diffusivity, sigma and timing, or widen the prior."
            )
        runner.warn_implausible(self, params["status"])
        return PosteriorFit(self, params, mask)

    def _prepare(self, *, progress):
        """Train (or read from the cache) the learned proposal and the grid's
        approximation error before voxels are sent to workers, so that they
        read them instead of each computing them (with progress bars if
        ``progress``; :func:`~dipy_spinverse.inverse.prepare`)."""
        prepare(
            self.grid,
            self.protocol,
            self.config,
            diffusivity=self.diffusivity,
            dtype=self.dtype,
            device=self.device,
            progress=progress,
        )
        if self.surface_check:
            self.estimator  # noqa: B018 -- trained or read once, here

    @multi_voxel_fit(batched=True)
    def fit_chunk(self, data, **kwargs):
        """Fit a (n_vox, n_volumes) chunk inside a DIPY ``multi_voxel_fit`` worker.

        The parallel engines' entry point (:func:`runner.fit_volume` calls
        it); use :meth:`fit` instead. DIPY 1.12.1 also passes its engine
        keywords (``engine``, ``n_jobs``, ``vox_per_chunk``, ``verbose``,
        ``_batched``) into this call; only ``n_jobs`` is used, to share the
        cores between worker processes.
        """
        runner.share_cores(kwargs.get("n_jobs"), self._pid)
        params, _ = runner.fit_voxels(self, np.atleast_2d(data))
        fits = np.empty(len(params["status"]), dtype=object)
        for i in range(len(fits)):
            fits[i] = SpinverseFit(
                self, {k: None if v is None else v[i] for k, v in params.items()}
            )
        return fits

    # -- what the model holds ------------------------------------------------------
    @property
    def has_labels(self):
        """Whether the inversion returns cell labels (search or cell occupancy)."""
        return self.config.returns_labels

    @property
    def n_iterations(self):
        """Total iterations of the face fit per voxel."""
        return self.config.face.n_iterations

    def differences(self, other):
        """Names of the settings that make ``other``'s fits differ from ours.

        ``batch_size`` and ``device`` are left out: they change how voxels
        are fitted, not the result. The grid is compared whole (its
        vertices and tetrahedra, not only its size), and the smooth-mesh
        refinement (``refine_mesh``, ``mesh_options``) is a setting: a fit
        resumed without it would miss the meshes of the voxels still to fit.
        """
        pairs = dict(
            grid=(_grid_key(self.grid), _grid_key(other.grid)),
            diffusivity=(self.diffusivity, other.diffusivity),
            config=(self.config, other.config),
            dtype=(self.dtype, other.dtype),
            protocol=(_protocol_key(self.protocol), _protocol_key(other.protocol)),
            refine_mesh=(self.refine_mesh, other.refine_mesh),
            mesh_options=(self.mesh_options, other.mesh_options),
        )
        return [name for name, (a, b) in pairs.items() if a != b]

    # -- prediction ----------------------------------------------------------------
    def protocol_for(self, gtab):
        """The :class:`Protocol` of ``gtab`` (checked as ``gtab`` at build)."""
        return gradient_tables(gtab)[1]

    def s0_for(self, protocol, s0, s0_sequences):
        """Fitted S0 per acquisition of ``protocol``, shape (n, n_acq).

        Sequences with the same waveform as a fitted one use that sequence's
        S0 (its T2 weighting); other waveforms use the mean b = 0 signal.
        """
        out = np.repeat(np.asarray(s0, float)[:, None], len(protocol), axis=1)
        fitted = {w: rank for rank, (w, _) in enumerate(self.sequences)}
        for waveform, idx in protocol.groups():
            if waveform in fitted:
                out[:, idx] = s0_sequences[:, fitted[waveform], None]
        return out

    def predict(self, permeability, gtab=None, *, S0=1.0):
        """Signals of permeability fields on the model's grid, as DIPY's
        ``model.predict(params, S0)``.

        Parameters
        ----------
        permeability : array_like (..., n_faces)
            Per-face membrane permeability in m/s (inf: no membrane), e.g.
            ``fit.permeability`` or a substrate's ``face_permeability`` on
            this model's grid.
        gtab : GradientTable or Protocol, optional
            Acquisitions (default: the model's). A gradient table needs
            ``big_delta`` and ``small_delta``.
        S0 : float or array_like (...), optional
            Unweighted signal (default 1: b0-normalised signals).

        Returns
        -------
        ndarray (..., n_volumes)
            With ``approximation_error``, in the data's terms (the grid's
            mean error added), as :meth:`SpinverseFit.predict`.
        """
        protocol = self.protocol if gtab is None else self.protocol_for(gtab)
        kappa = np.asarray(permeability, dtype=float)
        n_faces = self.grid.n_faces
        if kappa.ndim == 0 or kappa.shape[-1] != n_faces:
            raise ValueError(
                f"permeability must have the grid's {n_faces} faces in its last "
                f"axis (as fit.permeability), got shape {kappa.shape}."
            )
        batch = kappa.shape[:-1]
        scale = check_s0(S0, batch, per="field")
        normalised = self.predict_normalised(kappa.reshape(-1, n_faces), protocol)
        return normalised.reshape(batch + (len(protocol),)) * scale[..., None]

    def predict_normalised(self, permeability, protocol):
        """b0-normalised signals (n, n_acq) of ``permeability`` (n, n_faces).

        One simulated b = 0 acquisition per sequence is added so that every
        sequence is normalised by its own simulated b = 0 signal (below 1
        with absorbing walls). With ``approximation_error``, the grid's mean
        error for ``protocol`` is added (estimated on first use, then read
        from the cache), as the fit's own prediction has it: predictions are
        in the data's terms whatever the acquisitions.
        """
        waveforms = tuple(w for w, _ in protocol.groups())
        b0 = Protocol(
            waveforms=waveforms,
            bvals=np.zeros(len(waveforms)),
            bvecs=np.zeros((len(waveforms), 3)),
        )
        full = protocol + b0
        out = []
        with torch.no_grad():
            for i in range(0, len(permeability), self.batch_size):
                signal = simulate(
                    self.grid,
                    permeability[i : i + self.batch_size],
                    full,
                    diffusivity=self.diffusivity,
                    dtype=self.dtype,
                    device=self.device,
                )
                out.append(signal.cpu().numpy().astype(np.float64))
        if not out:
            return np.zeros((0, len(protocol)))
        normalised = normalise_b0(np.concatenate(out), full)[:, : len(protocol)]
        error = grid_error(
            self.grid,
            protocol,
            self.config,
            diffusivity=self.diffusivity,
            device=self.device,
        )
        return normalised if error is None else normalised + error.mean

    # -- input checks ----------------------------------------------------------
    def _check_data(self, data):
        """``data`` as an array of its own numeric dtype (not copied to float64).

        Chunks of voxels are converted to float64 when they are fitted, so a
        volume is never copied whole.
        """
        data = np.asarray(data)
        if data.dtype.kind == "c":
            raise ValueError(
                "data is complex; the fit takes magnitude signals: pass "
                "np.abs(data) (or the real part, if the phase is corrected)."
            )
        if data.dtype.kind not in "biuf":
            try:
                data = np.asarray(data, dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"data must be a numeric array (..., {len(self.protocol)}), "
                    f"got {type(data).__name__} of {data.dtype}."
                ) from err
        if data.ndim == 0 or data.shape[-1] != len(self.protocol):
            raise ValueError(
                f"data has shape {data.shape} but the gradient table has "
                f"{len(self.protocol)} volumes; the last axis of data must hold "
                f"one value per volume, in the order of gtab (shape (..., "
                f"{len(self.protocol)}))."
            )
        if data.ndim == 1:
            data = data.astype(np.float64)
        return data

    def __repr__(self):
        return (
            f"SpinverseModel(n_volumes={len(self.protocol)}, "
            f"n_sequences={len(self.sequences)}, grid={self.grid!r}, "
            f"preset={self.preset!r}, iterations={self.n_iterations}"
            + (f", surface check: {self.prior.prior!r}" if self.surface_check else "")
            + ")"
        )


def gradient_tables(gtab):
    """(GradientTable, Protocol) from a gradient table or a protocol.

    The one gatekeeper of gradient tables: DIPY has checked the b-vectors
    against the table's own tolerance when it built the table, and
    :meth:`Protocol.from_gtab` checks the timing and the b-values
    (:func:`~dipy_spinverse.sim.sequences.check_bvals`; a protocol's b-values
    are checked by the same function).
    """
    if isinstance(gtab, Protocol):
        timing = {}
        if all(type(w) is PGSE for w in gtab.waveforms):
            timing = dict(
                big_delta=np.array([w.big_delta for w in gtab.waveforms]),
                small_delta=np.array([w.small_delta for w in gtab.waveforms]),
            )
        check_bvals(gtab.bvals)
        table = gradient_table(gtab.bvals, bvecs=gtab.bvecs, b0_threshold=0, **timing)
        return table, gtab
    if not isinstance(gtab, GradientTable):
        raise ValueError(
            "gtab must be a dipy GradientTable (with big_delta and small_delta in "
            f"seconds) or a dipy_spinverse Protocol, got {type(gtab).__name__}."
        )
    return gtab, Protocol.from_gtab(gtab)


def _warn_outside_training_noise(sigma, options):
    """Warn when ``sigma`` lies outside the noise levels the estimator was
    trained on (``options.snr_range``): the network then extrapolates, and
    its intervals are not calibrated there."""
    if not sigma > 0:
        return
    low, high = options.snr_range
    snr = 1.0 / sigma
    if low <= snr <= high:
        return
    edge = "above" if snr > high else "below"
    warnings.warn(
        f"sigma {sigma:.3g} (SNR {snr:.0f}) is {edge} the noise levels the "
        f"posterior is trained on (SNR {low:g}-{high:g}): its intervals are "
        "not calibrated there. On real data whose SNR is higher, pass the "
        "largest noise the model's own errors allow (e.g. sigma = 1 / "
        f"{high:g}); or train with posterior_options=dict(snr_range=...).",
        stacklevel=3,
    )


def _make_grid(grid, size, resolution, boundary, wall_permeability):
    given = dict(
        grid_size=size,
        grid_resolution=resolution,
        boundary=boundary,
        wall_permeability=wall_permeability,
    )
    if grid is not None:
        clash = [k for k, v in given.items() if v is not None]
        if clash:
            raise ValueError(
                f"grid and {', '.join(clash)} are mutually exclusive: pass a TetGrid "
                "or the options to build one, not both."
            )
        if not isinstance(grid, TetGrid):
            raise ValueError(f"grid must be a TetGrid, got {type(grid).__name__}.")
        return grid
    boundary = check_choice(
        DEFAULT_GRID["boundary"] if boundary is None else boundary,
        "boundary",
        BOUNDARIES,
    )
    size = check_positive(
        DEFAULT_GRID["size"] if size is None else size, "grid_size", "um", 26.7
    )
    # A BCC grid needs two cubes per side (TetGrid.bcc).
    resolution = check_int(
        DEFAULT_GRID["n"] if resolution is None else resolution, "grid_resolution", 2
    )
    if wall_permeability is None:
        wall_permeability = DEFAULT_GRID["wall_permeability"]
    elif boundary != "absorbing":
        raise ValueError(
            f"wall_permeability applies to boundary='absorbing' only, and the "
            f"boundary is {boundary!r}; remove it or set boundary='absorbing'."
        )
    wall_permeability = check_positive(
        wall_permeability, "wall_permeability", "m/s", 0.1
    )
    return TetGrid.bcc(
        size, resolution, boundary=boundary, wall_permeability=wall_permeability
    )


def _grid_key(grid):
    """What a grid's fits depend on: its geometry, boundary and wall."""
    geometry = hashlib.sha1()
    for array in (grid.vertices, grid.tets, grid.tet_coords):
        geometry.update(np.ascontiguousarray(array).data)
    return (grid.size, grid.boundary, grid.wall_permeability, geometry.hexdigest())


def _protocol_key(protocol):
    return (
        tuple(protocol.waveforms),
        protocol.bvals.tobytes(),
        protocol.bvecs.tobytes(),
    )
