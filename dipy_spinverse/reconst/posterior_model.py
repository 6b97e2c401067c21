"""The amortised posterior's DIPY model :class:`SpinversePosteriorModel`.

``SpinverseModel(gtab, fit_method="posterior", sigma=s)`` returns it
(:func:`~dipy_spinverse.reconst.model.SpinverseModel`): calibrated maps of
tissue descriptors with credible intervals, from a network trained once per
protocol and prior and cached on disk.
"""

import numpy as np
from dipy.reconst.base import ReconstModel
from dipy.utils.logging import logger

from ..checks import check_device, check_diffusivity, check_int, readable_device
from ..masked import masked_rows
from ..posterior import TissuePrior, TrainingOptions, default_training, load_or_train
from ..posterior.envelope import PredictiveEnvelope
from ..posterior.simulator import bound_simulator
from .descriptions import protocol_description, table_from_description
from .gate import check_data, gradient_tables, require_b0
from .noise import require_sigma
from .posterior import OUT_OF_PRIOR, PREDICTIVE_LEVEL, PosteriorFit, fit_posterior
from .status import count_negative, warn_implausible, warn_negative

__all__ = [
    "SpinversePosteriorModel",
    "check_prior",
    "prior_from_description",
    "prior_types",
    "voxels_to_fit",
]

#: Posterior draws per voxel for the maps and stored intervals.
N_POSTERIOR_SAMPLES = 128


class SpinversePosteriorModel(ReconstModel):
    """The amortised posterior of tissue descriptors, as a DIPY model.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable or Protocol
        Gradient table whose ``big_delta`` and ``small_delta`` hold the pulse
        timing in seconds (scalars or one value per volume), or an explicit
        :class:`~dipy_spinverse.sim.sequences.Protocol`. It needs at least
        one b = 0 volume (``b <= gtab.b0_threshold``).
    sigma : float or array_like (n_volumes,)
        Noise standard deviation in the data's units, as DIPY's noise
        estimates give it (e.g.
        ``np.median(dipy.denoise.noise_estimate.estimate_sigma(data))``; one
        value per volume is taken as their root mean square). Each voxel's
        relative noise is ``sigma`` over its own mean b = 0 signal.
    prior : TissuePrior, WhiteMatterPrior or MixturePrior, optional
        The tissue the posterior is trained on (default
        ``TissuePrior(diffusivity=diffusivity)``: white matter, straight
        permeable axons of 1-25 um). Its descriptors are the fit's maps
        (``prior.targets.scalars``); a prior of bundles
        (:class:`~dipy_spinverse.posterior.WhiteMatterPrior`, or voxels mixed
        of them, :class:`~dipy_spinverse.posterior.MixturePrior`) gives
        myelinated-axon descriptors (diameters, fractions, g-ratio, exchange
        time) and no orientation. Check it on the data first
        (``prior.check(data, gtab, sigma=...)``): a training costs hours for
        them.
    diffusivity : float
        Intrinsic diffusivity in mm^2/s of the default prior, within
        :data:`~dipy_spinverse.checks.DIFFUSIVITY_RANGE`; ignored when
        ``prior`` is given (it holds its own).
    posterior_options : TrainingOptions, optional
        How the posterior is trained (simulations, network, epochs);
        default :func:`~dipy_spinverse.posterior.default_training` of the
        prior (the default prior's: 10,000 simulations, its grid error
        modelled).
    n_posterior_samples : int
        Posterior draws per voxel for the maps and stored intervals. They
        are quasi-random
        (:func:`~dipy_spinverse.posterior.estimator.normal_points`): the
        default 128 place a median as accurately as 500 independent draws
        would.
    cache_dir : path-like, optional
        Where the trained posterior is kept (default
        :func:`dipy_spinverse.files.cache_root`).
    device : str or torch.device
        Where the network draws from the posterior and, when it must be
        trained first, where the training set is simulated: ``"cpu"``
        (default) or ``"cuda"`` (``"cuda:1"``, ...). The network itself is
        trained on the CPU, with the same seeds on every device (its
        simulations differ between devices by rounding); the maps of one
        estimator differ between devices by rounding only.
    training_engine : {"serial", "ray", "dask"}
        Where the training set is simulated, when the estimator must be
        trained: this process, or the workers of a Ray or Dask cluster, a
        batch of draws each (:class:`~dipy_spinverse.posterior.PriorSimulator`;
        the signals, and so the estimator, are identical to a serial run's).
        A local Dask cluster's workers run the main script again as they
        start: a script must train from under ``if __name__ == "__main__":``
        (else a RuntimeError says so, before any worker starts).
    training_address : str or distributed.Client, optional
        The cluster of ``training_engine``: a running Ray cluster's address
        (``ray start --head`` prints it), ``"auto"`` for the one on this
        machine, a Dask scheduler address or ``Client``; default: this
        process's, else ``RAY_ADDRESS``, else a local one of every core.

    Notes
    -----
    Each voxel is divided by its own b = 0 signal, sequence by sequence
    (:func:`dipy_spinverse.sim.signals.b0_scale`), by the gate
    (:func:`~dipy_spinverse.reconst.gate.admit`) the label search's voxels
    pass too. The estimator is trained on first use (its time announced
    before it starts) and read from ``cache_dir`` afterwards.
    """

    #: How the model estimates (the selector's ``fit_method``).
    fit_method = "posterior"
    #: What the voxels of status ``IMPOSSIBLE_SIGNAL`` keep, in the warning
    #: a fit gives once (:func:`~dipy_spinverse.reconst.status.warn_implausible`).
    impossible_outputs = "their maps are NaN, as outside the prior"

    def __init__(
        self,
        gtab,
        *,
        sigma=None,
        prior=None,
        diffusivity=2e-3,
        posterior_options=None,
        n_posterior_samples=N_POSTERIOR_SAMPLES,
        cache_dir=None,
        device="cpu",
        training_engine="serial",
        training_address=None,
    ):
        self.gtab, self.protocol = gradient_tables(gtab)
        sigma = require_sigma(
            sigma, fit_method=self.fit_method, n_volumes=len(self.protocol)
        )
        check_prior(prior, posterior_options)
        require_b0(self.protocol)
        #: The protocol's sequences in rank order (:meth:`Protocol.sequences`).
        self.sequences = self.protocol.sequences()
        self.diffusivity = check_diffusivity(diffusivity)
        prior = TissuePrior(diffusivity=self.diffusivity) if prior is None else prior
        options = (
            default_training(prior)
            if posterior_options is None
            else (posterior_options)
        )
        #: The noise standard deviation in the data's units.
        self.sigma = sigma
        self.device = check_device(device)
        self.training_engine = training_engine
        self.training_address = training_address
        #: The prior bound to this protocol, simulating on ``device``:
        #: ``model.prior.sample(n, seed=s)``.
        self.prior = bound_simulator(
            prior,
            self.protocol,
            device=self.device,
            engine=training_engine,
            address=training_address,
            cache_dir=cache_dir,
        )
        self.posterior_options = options
        self.n_posterior_samples = check_int(
            n_posterior_samples, "n_posterior_samples", 10
        )
        self.cache_dir = cache_dir
        #: A posterior model does not determine membranes: no protocol
        #: problem makes its intervals wrong, only wide.
        self.protocol_problems = []
        self._estimator = None
        self._envelope = None

    @property
    def estimator(self):
        """The trained posterior (trained on first use, then cached on disk)."""
        if self._estimator is None:
            self._estimator, self.estimator_path = load_or_train(
                self.prior.prior,
                self.protocol,
                self.posterior_options,
                cache_dir=self.cache_dir,
                device=self.device,
                engine=self.training_engine,
                address=self.training_address,
            )
            self._estimator.to(self.device)
        return self._estimator

    @property
    def predictive_envelope(self):
        """Where the training signals lie with noise: the prior predictive
        region of ``OUT_OF_PRIOR``
        (:class:`~dipy_spinverse.posterior.envelope.PredictiveEnvelope` at
        :data:`~dipy_spinverse.reconst.posterior.PREDICTIVE_LEVEL`), built
        once."""
        if self._envelope is None:
            signals = self.estimator.support_signals.detach().cpu().numpy()
            self._envelope = PredictiveEnvelope(
                signals, self.protocol, level=PREDICTIVE_LEVEL
            )
        return self._envelope

    def fit(self, data, *, mask=None):
        """Posterior maps of one voxel or a volume.

        Parameters
        ----------
        data : array_like (..., n_volumes) or (n_mask, n_volumes)
            One voxel (1-D) or a volume, raw signal in the order of ``gtab``;
            or, with ``mask``, the voxels of the mask only
            (``volume[mask]``, in C order).
        mask : array_like of bool (data.shape[:-1]), optional
            Voxels to fit (default: all). For one voxel a single bool.

        Returns
        -------
        PosteriorFit
            Of shape ``data.shape[:-1]`` (``mask.shape`` for the mask's
            voxels; ``()`` for one voxel).
        """
        rows, mask = voxels_to_fit(self, data, mask)
        params = fit_posterior(self, rows, n_samples=self.n_posterior_samples)
        bad = params["status"] == OUT_OF_PRIOR
        if bad.any():
            logger.warning(
                f"{int(bad.sum())} of {len(bad)} voxels are OUT_OF_PRIOR: their "
                "signal lies outside what the prior simulates, with their noise "
                f"(prior {self.prior.prior!r}); their maps are NaN. Check the "
                "diffusivity, sigma and timing, or another prior "
                "(prior.check(data, gtab, sigma=...) says which features lie "
                "outside)."
            )
        warn_implausible(self, params["status"])
        return PosteriorFit(self, params, mask)

    # -- settings and saved fits ---------------------------------------------------
    def settings(self):
        """The constructor's keywords that rebuild this model, ``gtab`` aside.

        ``type(model)(model.protocol, **model.settings())`` is the same model.

        Returns
        -------
        dict
        """
        return dict(
            sigma=self.sigma,
            prior=self.prior.prior,
            diffusivity=self.diffusivity,
            posterior_options=self.posterior_options,
            n_posterior_samples=self.n_posterior_samples,
            cache_dir=self.cache_dir,
            device=self.device,
            training_engine=self.training_engine,
            training_address=self.training_address,
        )

    def description(self):
        """The model as a fit file keeps it: its prior, training options,
        noise, draws and protocol; its estimator is found again by their
        key, in the cache or the package, when it is needed.

        Returns
        -------
        dict
            JSON-ready values (numpy arrays aside);
            :meth:`from_description` rebuilds the model.
        """
        return dict(
            sigma=self.sigma,
            diffusivity=self.diffusivity,
            prior=self.prior.prior.description(),
            prior_type=type(self.prior.prior).__name__,
            posterior_options=self.posterior_options.description(),
            n_posterior_samples=self.n_posterior_samples,
            device=str(self.device),
            protocol=protocol_description(self.protocol),
        )

    @classmethod
    def from_description(cls, description):
        """The model :meth:`description` described (its estimator is read, or
        trained, when first needed; on ``cpu`` where it was saved on
        ``cuda`` and this machine has none).

        Parameters
        ----------
        description : dict

        Returns
        -------
        SpinversePosteriorModel
        """
        d = description
        return cls(
            table_from_description(d),
            sigma=d["sigma"],
            diffusivity=d["diffusivity"],
            prior=prior_from_description(d["prior"], d.get("prior_type")),
            posterior_options=TrainingOptions(**d["posterior_options"]),
            n_posterior_samples=d["n_posterior_samples"],
            device=readable_device(d["device"]),
        )

    def restored_fit(self, arrays, header):
        """The fit of this model whose file holds ``arrays``.

        Parameters
        ----------
        arrays : dict of ndarray
            ``mask`` and the per-voxel arrays of :func:`fit_posterior`.
        header : dict
            The file's header (nothing of it is the fit's own).

        Returns
        -------
        PosteriorFit
        """
        params = {k: v for k, v in arrays.items() if k != "mask"}
        return PosteriorFit(self, params, np.asarray(arrays["mask"]).astype(bool))

    def __repr__(self):
        return (
            f"SpinversePosteriorModel(n_volumes={len(self.protocol)}, "
            f"sigma={self.sigma:.4g}, prior={self.prior.prior!r})"
        )


def voxels_to_fit(model, data, mask):
    """The voxels of ``data`` that ``model`` fits, and the mask: where the
    ``fit`` of the posterior models starts.

    ``data`` is checked (:func:`~dipy_spinverse.reconst.gate.check_data`),
    its voxels in the mask taken (:func:`~dipy_spinverse.masked.masked_rows`),
    and those with negative samples counted in a warning at the user's
    ``fit`` call: magnitudes cannot be negative, denoised data can, and they
    are fitted as given.

    Parameters
    ----------
    model : SpinversePosteriorModel or SpinverseProtocolFreeModel
        The model (its ``protocol``).
    data : array_like (..., n_volumes) or (n_mask, n_volumes)
        As the models' ``fit`` takes it.
    mask : array_like of bool, optional
        As the models' ``fit`` takes it.

    Returns
    -------
    rows : ndarray (n, n_volumes)
        The voxels to fit.
    mask : ndarray of bool
        The checked mask (shape ``()`` for one voxel).
    """
    data = check_data(data, len(model.protocol))
    rows, mask = masked_rows(data, mask)
    # The frames: here, the model's fit, the user's call.
    warn_negative(model, count_negative(rows), len(rows), stacklevel=4)
    return rows, mask


def prior_types():
    """The priors a posterior model trains on, by class name (the white
    matter's imported when first asked for)."""
    from ..posterior import MixturePrior, WhiteMatterPrior

    return {cls.__name__: cls for cls in (TissuePrior, WhiteMatterPrior, MixturePrior)}


def prior_from_description(description, prior_type=None):
    """The prior a model's :meth:`~SpinversePosteriorModel.description` keeps.

    Parameters
    ----------
    description : dict
        The prior's ``description()``.
    prior_type : str, optional
        Its class name (default ``"TissuePrior"``: fit files written before
        other priors were trainable name none).

    Returns
    -------
    TissuePrior, WhiteMatterPrior or MixturePrior
    """
    types = prior_types()
    name = "TissuePrior" if prior_type is None else prior_type
    if name not in types:
        raise ValueError(
            f"prior_type must be one of {sorted(types)}, got {prior_type!r}: the "
            "file was written by another version of dipy_spinverse."
        )
    return types[name].from_description(description)


def check_prior(prior, posterior_options):
    """Refuse a prior or training options of another type, naming it.

    Parameters
    ----------
    prior : TissuePrior, WhiteMatterPrior, MixturePrior or None
        The prior given.
    posterior_options : TrainingOptions or None
        The training options given.

    Returns
    -------
    None

    Raises
    ------
    ValueError
        If either is neither None nor of its type.
    """
    types = prior_types()
    if prior is not None and not isinstance(prior, tuple(types.values())):
        raise ValueError(
            f"prior must be one of dipy_spinverse.posterior's {', '.join(types)}, "
            f"got {type(prior).__name__}."
        )
    if posterior_options is not None and not isinstance(
        posterior_options, TrainingOptions
    ):
        raise ValueError(
            "posterior_options must be a dipy_spinverse.posterior."
            f"TrainingOptions, got {type(posterior_options).__name__}."
        )
