"""The label search's DIPY model :class:`SpinverseSearchModel`.

``SpinverseModel(gtab, fit_method="search", ...)`` returns it
(:func:`~dipy_spinverse.reconst.model.SpinverseModel`). It is used like
DIPY's ``TensorModel``: build it once from a gradient table (with the
gradient timing in ``gtab.big_delta`` / ``gtab.small_delta``), then call
``fit`` on one voxel or a whole volume. Every option is checked once, when
the model is built; each voxel passes the gate (:mod:`.gate`) once and is
handed to :func:`dipy_spinverse.inverse.reconstruct`.
"""

import hashlib
import os
import warnings

import numpy as np
import torch
from dipy.reconst.base import ReconstModel
from dipy.reconst.multi_voxel import multi_voxel_fit

from ..checks import (
    OptionError,
    about,
    check_choice,
    check_device,
    check_diffusivity,
    check_dtype,
    check_int,
    check_positive,
    check_s0,
    readable_device,
)
from ..inverse import InversionConfig, grid_error, prepare, resolve_config
from ..inverse.config import OPTIONS, refuse_unused
from ..inverse.prediction import predict_signal
from ..masked import check_mask
from ..meshfit.refine import check_refine_options, refine_topology
from ..posterior import default_training, load_or_train
from ..sim.grid import BOUNDARIES, TetGrid
from ..sim.sequences import Protocol
from . import runner
from .codes import MASKED, UNDERDETERMINED
from .descriptions import (
    grid_description,
    grid_from_description,
    protocol_description,
    same_protocol,
    table_from_description,
)
from .fit import SpinverseFit
from .gate import check_data, gradient_tables, require_b0
from .noise import NOISE_HINT, check_sigma
from .parallel import check_engine_options, share_cores
from .plausibility import protocol_problems
from .posterior_model import N_POSTERIOR_SAMPLES, check_prior
from .search_settings import SearchSettings, SurfaceCheck, knows_noise
from .voxels import MESH_PARAMETERS, OPTIONAL_PARAMETERS

__all__ = [
    "SpinverseSearchModel",
    "DEFAULT_GRID",
    "GRID_SETTINGS",
    "check_search_options",
    "make_grid",
    "misplaced_options",
]


def check_search_options(
    *,
    preset="default",
    max_iter=None,
    sigma=None,
    refine_mesh=False,
    prior=None,
    posterior_options=None,
):
    """Check the options of :class:`SpinverseSearchModel` that need neither
    data nor a gradient table.

    A command can call it before reading any data (``dipy_fit_spinverse``
    does, and rewords its messages in flags); the model checks ``sigma``
    once itself and then the rest as this does.

    Parameters
    ----------
    preset, max_iter, sigma, refine_mesh, prior, posterior_options
        As in :class:`SpinverseSearchModel`.

    Returns
    -------
    config : InversionConfig
        The inversion's configuration (before it is fitted to a protocol).

    Raises
    ------
    OptionError
        An option out of range, or one that the fit would ignore:
        ``sigma`` with a configuration without a noise model,
        ``posterior_options`` without a prior, a surface check without a
        label search, ``refine_mesh`` without cell labels. (The surface
        check's need of ``sigma`` is checked by the model, which has the
        configuration's own.)
    """
    with about("sigma"):
        sigma = check_sigma(sigma)
    return _search_config(
        preset=preset,
        max_iter=max_iter,
        noise_known=sigma > 0,
        refine_mesh=refine_mesh,
        prior=prior,
        posterior_options=posterior_options,
    )


def _search_config(
    *, preset, max_iter, noise_known, refine_mesh, prior, posterior_options
):
    """:func:`check_search_options` once ``sigma`` is checked (its
    ``noise_known``: ``sigma > 0``)."""
    config = resolve_config(preset, max_iter=max_iter)
    if noise_known:
        # Each fit gives the loss its data's noise (runner.fit_voxels): a
        # configuration whose loss would ignore it is refused now.
        refuse_unused(config, ["sigma"])
    if refine_mesh and not config.returns_labels:
        raise OptionError(
            "refine_mesh=True starts each mesh from a labelled cell, which the "
            "label search (search_steps > 0) or the cell parametrisation gives",
            options=["refine_mesh"],
            fixes=[("preset", "default"), ("parametrisation", "cell")],
        )
    if posterior_options is not None and prior is None:
        raise OptionError(
            "posterior_options set how the surface check's posterior is trained; "
            "pass a prior with them (prior, the surface check), or pass "
            "fit_method='posterior' if they are the posterior's own, or leave "
            "them out",
            options=["posterior_options", "prior", "fit_method"],
        )
    if prior is None:
        return config
    if not config.searches_labels:
        raise OptionError(
            "prior turns on the surface check of the label search's answers, and "
            "the search is off (search_steps=0): leave out prior, or turn the "
            "search on",
            options=["prior"],
            fixes=[("preset", "default")],
        )
    check_prior(prior, posterior_options)
    return config


#: The default grid: the published BCC grid of 576 tetrahedra, 26.7 um across.
DEFAULT_GRID = dict(
    size=80 / 3, resolution=4, boundary="reflecting", wall_permeability=0.1
)


class SpinverseSearchModel(ReconstModel):
    """Spinverse's label search: membranes and their permeability from
    diffusion MRI.

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
    grid : TetGrid or dict, optional
        The grid of one voxel: a :class:`~dipy_spinverse.sim.grid.TetGrid`,
        or the settings of the BCC grid (``TetGrid.bcc``) by name, those
        left out from :data:`DEFAULT_GRID`: ``size`` (side of the simulated
        box in um, default 80/3, the published grid), ``resolution`` (BCC
        cubes per side, at least 2; default 4: 576 tetrahedra, 1,008 faces),
        ``boundary`` (``"reflecting"``, ``"periodic"`` or ``"absorbing"``;
        default ``"reflecting"``) and ``wall_permeability`` (m/s, for
        ``boundary="absorbing"`` only; default 0.1). Default: the published
        grid, e.g. ``grid=dict(resolution=2)`` for a coarse one.
    diffusivity : float
        Intrinsic diffusivity in mm^2/s, within
        :data:`~dipy_spinverse.checks.DIFFUSIVITY_RANGE` (1e-5 to 0.1; a
        value outside is refused as another unit: 2e-9 m^2/s = 2e-3 mm^2/s).
    sigma : float or array_like (n_volumes,), optional
        Noise standard deviation in the data's units, as DIPY's noise
        estimates give it (e.g.
        ``np.median(dipy.denoise.noise_estimate.estimate_sigma(data))``; one
        value per volume is taken as their root mean square): the label
        search tests its answers against it, and the surface check
        (``prior``) needs it. Each voxel's relative noise is ``sigma`` over
        its own mean b = 0 signal. Default: none (the search then vouches
        for no surface), or the configuration's own ``loss.sigma``, which is
        relative to each voxel's b = 0 signal (the inversion's units).
    preset : str or InversionConfig
        The inversion's configuration: a key of
        :data:`dipy_spinverse.inverse.PRESETS`, or an
        :class:`~dipy_spinverse.inverse.InversionConfig` holding every
        advanced setting, built with
        :func:`~dipy_spinverse.inverse.resolve_config` from a preset and the
        options by name (:data:`dipy_spinverse.inverse.config.OPTIONS`:
        priors ``continuity``, ``manifold``; curriculum ``stages``;
        optimiser ``lr``, ``warmup``; ``threshold``, ``parametrisation``,
        ``noise``, the label search's ``search_*``), e.g.
        ``preset=resolve_config("default", search_steps=0)``.
    max_iter : int, optional
        Total face-fit iterations: the configuration's curriculum stages (and
        its learning-rate warm-up) are scaled to this total, each stage
        keeping at least one iteration. Default: the configuration's own
        total. (To keep a warm-up of your own, give both to the
        configuration: ``resolve_config("default", max_iter=100, warmup=5)``.)
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
        ``mesh_surface_to_volume``, ``mesh_radius`` and ``mesh_status``
        (:func:`dipy_spinverse.io.surfaces.save_smooth_mesh` writes them).
        Needs cell labels (the label search,
        ``search_steps > 0``, or ``parametrisation="cell"``). About a minute
        per voxel on one core with the default ``mesh_options``.
    mesh_options : dict, optional
        Options of the refinement
        (:data:`dipy_spinverse.meshfit.refine.REFINE_DEFAULTS`: ``template``
        ``"ball"`` or ``"tube"``, ``resolution``, ``n_modes``, ``max_iter``,
        ``code`` (``"spectral"``, or ``"axon"`` with a tube: the axon
        family's parameters), ...); only with ``refine_mesh=True``.
    prior : TissuePrior, optional
        Turns on the surface check: each voxel's answer is held against the
        amortised posterior of this prior, and its ``uncertainty`` is at
        least the expected ``1 - IoU`` that the posterior of the restricted
        volume implies
        (:func:`~dipy_spinverse.reconst.posterior.volume_iou_bound`). The
        prior must simulate the search's own box: ``boundary="periodic"`` on
        a periodic grid, ``"reflecting"`` with ``box_side`` the grid's size
        on a reflecting one. Needs ``sigma``.
    posterior_options : TrainingOptions, optional
        How the surface check's posterior is trained; default
        :func:`~dipy_spinverse.posterior.default_training` of the prior.
    cache_dir : path-like, optional
        Where the trained posterior is kept (default
        :func:`dipy_spinverse.files.cache_root`).

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
    >>> from dipy_spinverse.inverse import resolve_config
    >>> config = resolve_config("paper", stages=[dict(iterations=5)])
    >>> model = SpinverseSearchModel(gtab, grid=dict(resolution=2), preset=config)
    >>> model.grid.n_cells
    48
    >>> fit = model.fit(np.array([1000.0, 600, 610, 590, 1000, 800, 810, 790]))
    >>> fit.status, fit.permeability.shape, fit.predict().shape
    (0, (72,), (8,))
    """

    #: How the model estimates (the selector's ``fit_method``).
    fit_method = "search"
    #: What the voxels of status ``IMPOSSIBLE_SIGNAL`` keep, in the warning
    #: a fit gives once (:func:`~dipy_spinverse.reconst.status.warn_implausible`).
    impossible_outputs = "their outputs are kept, fitted to data no membranes made"

    def __init__(
        self,
        gtab,
        *,
        grid=None,
        diffusivity=2e-3,
        sigma=None,
        preset="default",
        max_iter=None,
        refine_mesh=False,
        mesh_options=None,
        prior=None,
        posterior_options=None,
        batch_size=32,
        device="cpu",
        dtype="float32",
        cache_dir=None,
    ):
        self.gtab, self.protocol = gradient_tables(gtab)
        #: The noise standard deviation in the data's units (0: not given).
        self.sigma = check_sigma(sigma, n_volumes=len(self.protocol))
        config = _search_config(
            preset=preset,
            max_iter=max_iter,
            noise_known=self.sigma > 0,
            refine_mesh=refine_mesh,
            prior=prior,
            posterior_options=posterior_options,
        )
        self.grid = make_grid(grid)
        self.diffusivity = check_diffusivity(diffusivity)
        #: The preset as given: its name, or an InversionConfig.
        self.preset = preset
        self.max_iter = None if max_iter is None else check_int(max_iter, "max_iter", 1)
        self.batch_size = check_int(batch_size, "batch_size", 1)
        self.device = check_device(device)
        self.dtype = check_dtype(dtype)
        #: The protocol's sequences in rank order (:meth:`Protocol.sequences`).
        self.sequences = self.protocol.sequences()
        #: The inversion's configuration on this protocol (stages adapted).
        self.config = config.for_protocol(len(self.sequences))
        require_b0(self.protocol)
        searches = self.config.searches_labels
        if searches and not self.noise_known:
            warnings.warn(
                "sigma is not given: the label search cannot test whether its "
                "answers fit the data within the noise, so it vouches for no "
                "surface (uncertainty 1, status UNCERTAIN_SURFACE; "
                f"reconst.surfaces.vouch_for_surfaces). Pass sigma {NOISE_HINT}.",
                UserWarning,
                stacklevel=3,  # the user's SpinverseModel(...) call
            )
        # Known from the protocol alone: said before any voxel is fitted
        # (each fit says it again, with its voxels' status).
        #: Why the protocol cannot determine the membranes (one sentence a
        #: problem; empty when none): found once, reused by every fit.
        self.protocol_problems = protocol_problems(self.protocol)
        if self.protocol_problems:
            warnings.warn(
                "the protocol cannot determine the membranes: "
                + "; ".join(self.protocol_problems)
                + f". Every fitted voxel will have status {UNDERDETERMINED} "
                "(UNDERDETERMINED).",
                UserWarning,
                stacklevel=3,  # the user's SpinverseModel(...) call
            )
        self._set_refinement(refine_mesh, mesh_options)
        self._set_surface_check(prior, posterior_options, cache_dir)
        self._pid = os.getpid()

    def _set_surface_check(self, prior, options, cache_dir):
        """Check and keep the surface check's posterior (with ``prior``)."""
        self.cache_dir = cache_dir
        #: Whether the search's surfaces are checked against a posterior.
        self.surface_check = prior is not None
        if not self.surface_check:
            return
        if not self.sigma > 0:
            raise ValueError(
                f"The surface check needs the noise level: pass sigma {NOISE_HINT}."
            )
        self._check_surface_prior(prior)
        options = default_training(prior) if options is None else options
        #: The prior bound to this protocol: ``model.prior.sample(n, seed=s)``.
        self.prior = prior.simulator(self.protocol)
        self.posterior_options = options
        self.n_posterior_samples = N_POSTERIOR_SAMPLES

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
        if not self.surface_check:
            raise AttributeError(
                "estimator: only the surface check (prior=) has one; the "
                "posterior's is fit_method='posterior'."
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
        data = check_data(data, len(self.protocol))
        if data.ndim == 1:
            check_engine_options(engine, address, n_jobs, vox_per_chunk)
            if checkpoint is not None or resume is not None:
                raise ValueError(
                    "checkpoint and resume are for volume fits and data is one "
                    "voxel (1-D); fit data[None], a volume of one voxel, to save "
                    "or resume it."
                )
            if mask is not None and not check_mask(mask, ()):
                params = runner.empty_params(self.search_settings(check=False), ())
                params["status"][...] = MASKED
                return SpinverseFit(self, params, False)
            params, history, noise = runner.fit_one(self, data, verbose=verbose)
            return SpinverseFit(self, params, history=history, noise_level=noise)
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

    @property
    def noise_known(self):
        """Whether the fit knows the noise (``sigma``, or the configuration's
        own relative noise)."""
        return knows_noise(self.sigma, self.config)

    def search_settings(self, *, check=True):
        """The settings a fit of this model runs under, frozen
        (:class:`~dipy_spinverse.reconst.search_settings.SearchSettings`).

        The voxel loop (:mod:`~dipy_spinverse.reconst.runner`) reads these,
        never the model: each fit makes them once.

        Parameters
        ----------
        check : bool, optional
            Include the surface check's posterior (trained on first use);
            False leaves it out, for what needs only the parameters' layout.

        Returns
        -------
        SearchSettings
        """
        surface = None
        if check and self.surface_check:
            surface = SurfaceCheck(
                estimator=self.estimator,
                prior=self.prior.prior,
                n_samples=self.n_posterior_samples,
                snr_range=self.posterior_options.snr_range,
            )
        return SearchSettings(
            grid=self.grid,
            protocol=self.protocol,
            n_sequences=len(self.sequences),
            sigma=self.sigma,
            config=self.config,
            diffusivity=self.diffusivity,
            dtype=self.dtype,
            device=self.device,
            batch_size=self.batch_size,
            protocol_problems=tuple(self.protocol_problems),
            mesh_options=self.mesh_options,
            mesh_tets=self.mesh_tets,
            surface_check=surface,
        )

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
    def fit_chunk(self, data, *, noise=None, **kwargs):
        """Fit a (n_vox, n_volumes) chunk inside a DIPY ``multi_voxel_fit`` worker.

        The parallel engines' entry point (:func:`runner.fit_volume` calls
        it, with the fit's ``noise``,
        :func:`~dipy_spinverse.reconst.noise.reference_noise`); use
        :meth:`fit` instead. Without ``noise`` the chunk is a fit of its
        own (its voxels' median b = 0 signal sets the level). DIPY 1.12.1
        also passes its engine keywords (``engine``, ``n_jobs``,
        ``vox_per_chunk``, ``verbose``, ``_batched``) into this call; only
        ``n_jobs`` is used, to share the cores between worker processes.
        """
        share_cores(kwargs.get("n_jobs"), self._pid)
        data = np.atleast_2d(data)
        settings = self.search_settings()
        if noise is None:
            noise = runner.fit_noise(settings, data)
        params, _ = runner.fit_voxels(settings, data, noise=noise)
        fits = np.empty(len(params["status"]), dtype=object)
        for i in range(len(fits)):
            fits[i] = SpinverseFit(
                self,
                {k: None if v is None else v[i] for k, v in params.items()},
                noise_level=noise,
            )
        return fits

    # -- settings and saved fits ---------------------------------------------------
    def settings(self):
        """The constructor's keywords that rebuild this model, ``gtab`` aside.

        ``type(model)(model.protocol, **model.settings())`` is the same
        model: its configuration is kept whole, as adapted to the protocol.

        Returns
        -------
        dict
        """
        check = self.surface_check
        return dict(
            grid=self.grid,
            diffusivity=self.diffusivity,
            sigma=self.sigma,
            preset=self.config,
            max_iter=None,
            refine_mesh=self.refine_mesh,
            mesh_options=self.mesh_options,
            prior=self.prior.prior if check else None,
            posterior_options=self.posterior_options if check else None,
            batch_size=self.batch_size,
            device=self.device,
            dtype=self.dtype,
            cache_dir=self.cache_dir,
        )

    def description(self):
        """The model as a fit file keeps it: its grid, protocol and options.

        The configuration is described whole, as options (``preset`` None),
        so that the model reloads with the same one, whatever preset it was
        built from. The surface check's prior is not kept.

        Returns
        -------
        dict
            JSON-ready values (numpy arrays aside);
            :meth:`from_description` rebuilds the model.
        """
        return dict(
            grid=grid_description(self.grid),
            diffusivity=self.diffusivity,
            preset=None,
            max_iter=None,
            batch_size=self.batch_size,
            device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
            options=self.config.as_dict(),
            sigma=self.sigma,
            refine_mesh=self.refine_mesh,
            mesh_options=self.mesh_options,
            protocol=protocol_description(self.protocol),
        )

    @classmethod
    def from_description(cls, description):
        """The model :meth:`description` described (on ``cpu`` where it was
        saved on ``cuda`` and this machine has none).

        Files of earlier versions hold a preset, its options and
        ``max_iter``; files before the noise convention of issue 61 hold
        the relative noise in the configuration alone (no ``sigma``).

        Parameters
        ----------
        description : dict

        Returns
        -------
        SpinverseSearchModel
        """
        d = description
        if d["preset"] is None:  # a whole configuration was saved
            config = InversionConfig.from_options(**d["options"])
        else:
            config = resolve_config(d["preset"], max_iter=d["max_iter"], **d["options"])
        return cls(
            table_from_description(d),
            sigma=d.get("sigma") or None,
            grid=grid_from_description(d["grid"]),
            diffusivity=d["diffusivity"],
            preset=config,
            batch_size=d["batch_size"],
            device=readable_device(d["device"]),
            dtype=d["dtype"],
            refine_mesh=d.get("refine_mesh", False),
            mesh_options=d.get("mesh_options"),
        )

    def restored_fit(self, arrays, header):
        """The fit of this model whose file holds ``arrays``.

        Parameters
        ----------
        arrays : dict of ndarray
            ``mask`` and the per-voxel parameters
            (:data:`~dipy_spinverse.reconst.voxels.PARAMETERS`, the optional
            ones where the fit holds them).
        header : dict
            The file's header: its ``version`` (up to 2 the parameters of
            the whole volume were saved), ``fingerprint``, ``noise_level``
            and the model's saved ``device``.

        Returns
        -------
        SpinverseFit

        Raises
        ------
        ValueError
            An array of a shape the volume and this model do not have.
        """
        params = {name: arrays[name] for name in _SAVED}
        for name in OPTIONAL_PARAMETERS + MESH_PARAMETERS:
            params[name] = arrays.get(name)
        mask = np.asarray(arrays["mask"]).astype(bool)
        rows = mask.shape if header.get("version", 0) < 3 else (int(mask.sum()),)
        self._check_arrays(rows, params)
        return SpinverseFit(
            self,
            params,
            mask,
            fingerprint=header.get("fingerprint"),
            saved_device=str(header["model"].get("device", self.device)),
            # Files before it have none: not recorded (None).
            noise_level=header.get("noise_level"),
        )

    def _check_arrays(self, rows, params):
        """Refuse arrays whose shapes do not fit ``rows`` (voxels) and the model."""
        trailing = dict(
            permeability=(self.grid.n_faces,),
            labels=(self.grid.n_cells,),
            predicted=(len(self.protocol),),
            S0=(),
            S0_sequences=(len(self.sequences),),
            loss=(),
            status=(),
            inside_probability=(self.grid.n_cells,),
            uncertainty=(),
            proposal_probability=(self.grid.n_cells,),
            mesh_loss=(),
            mesh_status=(),
        )
        if self.mesh_tets is not None:
            trailing["mesh_vertices"] = (int(self.mesh_tets.max()) + 1, 3)
        for name, tail in trailing.items():
            if params.get(name) is None:
                continue
            if params[name].shape != tuple(rows) + tail:
                raise ValueError(
                    f"{name} has shape {params[name].shape} but the saved volume "
                    f"and model need {tuple(rows) + tail}; the file is damaged."
                )

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
            sigma=(self.sigma, other.sigma),
            config=(_without_noise(self), _without_noise(other)),
            dtype=(self.dtype, other.dtype),
            protocol=(True, same_protocol(self.protocol, other.protocol)),
            refine_mesh=(self.refine_mesh, other.refine_mesh),
            mesh_options=(self.mesh_options, other.mesh_options),
        )
        return [name for name, (a, b) in pairs.items() if a != b]

    # -- prediction ----------------------------------------------------------------
    def protocol_for(self, gtab):
        """The :class:`Protocol` of ``gtab`` (checked as ``gtab`` at build)."""
        return gradient_tables(gtab)[1]

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
                signal = predict_signal(
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
        normalised = np.concatenate(out)[:, : len(protocol)]
        error = grid_error(
            self.grid,
            protocol,
            self.config,
            diffusivity=self.diffusivity,
            device=self.device,
        )
        return normalised if error is None else normalised + error.mean

    def _preset_name(self):
        """The preset's name, or ``"custom"`` for a configuration."""
        return self.preset if isinstance(self.preset, str) else "custom"

    def __repr__(self):
        return (
            f"SpinverseSearchModel(n_volumes={len(self.protocol)}, "
            f"n_sequences={len(self.sequences)}, grid={self.grid!r}, "
            f"preset={self._preset_name()!r}, iterations={self.n_iterations}"
            + (f", surface check: {self.prior.prior!r}" if self.surface_check else "")
            + ")"
        )


#: The per-voxel parameters every saved search fit holds (the optional
#: ones and the smooth meshes' where the fit has them).
_SAVED = ("status", "permeability", "predicted", "S0", "S0_sequences", "loss")

#: The name of each grid setting in the messages' ``names``
#: How messages name each of the grid's settings (the options of
#: :func:`make_grid`'s :class:`~dipy_spinverse.checks.OptionError`).
GRID_SETTINGS = {key: f"grid {key}" for key in DEFAULT_GRID}

#: The grid's keywords of earlier versions, now keys of ``grid``.
_GRID_KEYWORDS = {f"grid_{key}": key for key in ("size", "resolution")} | {
    key: key for key in ("boundary", "wall_permeability")
}


def misplaced_options(keywords, *, searching):
    """Where keywords that no model takes belong, if the search's: its
    configuration or its grid.

    Parameters
    ----------
    keywords : list of str
        Keywords the chosen model does not take.
    searching : bool
        Whether the chosen model is :class:`SpinverseSearchModel`.

    Returns
    -------
    hints : list of str
        What to pass instead, one sentence for each group.
    rest : list of str
        The keywords that are neither.
    """
    hints = []
    inversion = [k for k in keywords if k in OPTIONS]
    if inversion:
        example = ", ".join(f"{k}=..." for k in inversion)
        where = "" if searching else "fit_method='search' with "
        hints.append(
            f"{inversion} are settings of the label search's configuration: pass "
            f"{where}preset=resolve_config('default', {example}) "
            "(dipy_spinverse.inverse.resolve_config)"
        )
    grid = [k for k in keywords if searching and k in _GRID_KEYWORDS]
    if grid:
        example = ", ".join(f"{_GRID_KEYWORDS[k]}=..." for k in grid)
        hints.append(f"{grid} are settings of the grid: pass grid=dict({example})")
    rest = [k for k in keywords if k not in inversion and k not in grid]
    return hints, rest


def _without_noise(model):
    """``model``'s configuration with its relative noise left out when the
    model's ``sigma`` holds the noise (compared apart); models of earlier
    fits held their fit's level there."""
    return model.config.replace(sigma=0.0) if model.sigma > 0 else model.config


def make_grid(grid=None):
    """The grid of :class:`SpinverseSearchModel`'s ``grid``.

    Parameters
    ----------
    grid : TetGrid, dict or None
        A grid, or the BCC grid's settings by name (keys of
        :data:`DEFAULT_GRID`; those left out take its values).

    Returns
    -------
    TetGrid

    Raises
    ------
    OptionError
        Not a grid or a dict, unknown keys, values out of range, or a
        ``wall_permeability`` without ``boundary="absorbing"``; the messages
        name each setting as :data:`GRID_SETTINGS` does.
    """
    if isinstance(grid, TetGrid):
        return grid
    if grid is None:
        grid = {}
    if not isinstance(grid, dict):
        raise ValueError(
            "grid must be a TetGrid or a dict of the BCC grid's settings "
            f"({', '.join(DEFAULT_GRID)}), got {type(grid).__name__}."
        )
    unknown = sorted(set(grid) - set(DEFAULT_GRID))
    if unknown:
        raise ValueError(
            f"grid: unknown setting(s) {unknown}; the BCC grid's settings are "
            f"{list(DEFAULT_GRID)} (or pass a TetGrid)."
        )
    settings = {**DEFAULT_GRID, **grid}
    name = GRID_SETTINGS
    with about(*name.values()):
        boundary = check_choice(settings["boundary"], name["boundary"], BOUNDARIES)
        size = check_positive(settings["size"], name["size"], "um", 26.7)
        # A BCC grid needs two cubes per side (TetGrid.bcc).
        resolution = check_int(settings["resolution"], name["resolution"], 2)
        wall_permeability = grid.get("wall_permeability")
        if wall_permeability is None:
            wall_permeability = DEFAULT_GRID["wall_permeability"]
        elif boundary != "absorbing":
            raise ValueError(
                f"{name['wall_permeability']} applies to boundary='absorbing' "
                f"only, and the boundary is {boundary!r}; remove it or set "
                "boundary='absorbing'."
            )
        wall_permeability = check_positive(
            wall_permeability, name["wall_permeability"], "m/s", 0.1
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
