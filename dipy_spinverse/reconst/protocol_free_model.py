"""``SpinverseModel(gtab, fit_method="protocol_free", sigma=s)``: no training.

The default prior's posterior for any protocol of the shipped protocol-free
estimator's design (:mod:`dipy_spinverse.posterior.protocol_free`): read
through the protocol's shells, it needs no training for a new protocol and
gives its maps in seconds. Its intervals are calibrated on average over the
design's protocols; a per-protocol estimator (``fit_method="posterior"``,
one training a protocol, cached) is narrower (doc/validation/
protocol_free.md) and also gives ``orientation`` and predictions.

What the design does not cover is named when the model is built (a
``UserWarning`` and :attr:`SpinverseProtocolFreeModel.out_of_design`): such
shells are not read, and a protocol with no shell left is refused.
"""

import warnings

import numpy as np
import torch
from dipy.reconst.base import ReconstModel
from dipy.utils.logging import logger

from ..checks import check_int
from ..masked import MaskedFit, check_mask, is_mask_rows, volume_shape
from ..posterior import TissuePrior
from ..posterior.calibration import calibrated_draws
from ..posterior.envelope import prior_envelope
from ..posterior.protocol_free import (
    FREE_SCALARS,
    N_TOKEN,
    SNR_RANGE,
    ProtocolShells,
    decode_free,
    load_protocol_free,
)
from ..sim.signals import normalise_b0
from .codes import BAD_B0, IMPOSSIBLE_SIGNAL, OK, PENDING
from .descriptions import (
    protocol_description,
    same_protocol,
    table_from_description,
)
from .gate import admit, check_data, gradient_tables, require_b0
from .noise import require_sigma, warn_noise
from .parallel import chunks
from .posterior import (
    KEPT,
    OUT_OF_PRIOR,
    POSTERIOR_STATUS_CODES,
    PREDICTIVE_LEVEL,
    flow_draws,
    interval_rows,
    kept_index,
    noisiest_sequence,
)
from .posterior_model import voxels_to_fit
from .resume import check_resume, fingerprint
from .runner import checkpoint_hook
from .status import count_negative, warn_implausible, warn_negative

__all__ = [
    "SpinverseProtocolFreeModel",
    "ProtocolFreeFit",
    "PROTOCOL_FREE_CODES",
    "PRIOR_DIFFUSIVITY",
    "faster_than_free",
]

#: Status codes of a protocol-free fit and their meaning: the posterior
#: fit's, its out-of-prior test the free-water bound.
PROTOCOL_FREE_CODES = {
    **POSTERIOR_STATUS_CODES,
    OUT_OF_PRIOR: "outside the prior: beyond its predictive region on the "
    "shells read, or a shell decays faster than free water at the prior's "
    "diffusivity, beyond the noise",
}
#: Draws of the prior simulated on a new protocol for its predictive
#: region (once per protocol, kept in the cache: about 15 s on the README
#: demo's 99 volumes on 2 cores).
N_ENVELOPE_DRAWS = 200
#: The prior's intrinsic diffusivity (mm^2/s): ``TissuePrior()``'s, the
#: tissue the shipped estimator was trained on.
PRIOR_DIFFUSIVITY = TissuePrior().diffusivity
#: Standard errors below the free-water bound that flag a shell.
_FREE_WATER_MARGIN = 4.0
# Voxels drawn from together (x the samples: about 16,000 flow draws).
_VOXELS_PER_BATCH = 128
#: Voxels of a volume fitted between two calls of a fit's checkpoint (a
#: few seconds on 2 cores at the default draws).
VOXELS_PER_CHUNK = 2048


class SpinverseProtocolFreeModel(ReconstModel):
    """The protocol-free posterior of the default prior, as a DIPY model.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable or Protocol
        Gradient table whose ``big_delta`` and ``small_delta`` hold the PGSE
        timing in seconds, or a
        :class:`~dipy_spinverse.sim.sequences.Protocol`; at least one b = 0
        volume, and one at each echo time.
    sigma : float or array_like (n_volumes,)
        Noise standard deviation in the data's units (as
        :class:`~dipy_spinverse.reconst.posterior_model.SpinversePosteriorModel`'s).
    n_posterior_samples : int
        Posterior draws per voxel for the maps and stored intervals.
    cache_dir : path-like, optional
        Where the prior's simulations on this protocol are kept (default
        :func:`~dipy_spinverse.files.cache_root`): the ``OUT_OF_PRIOR``
        test's predictive region, simulated on the first fit of a protocol.

    Attributes
    ----------
    shells : ProtocolShells
        The protocol as the estimator reads it.
    out_of_design : list of str
        What of the protocol lies outside the estimator's design (shells not
        read and why, a volume count outside it); empty when it all lies
        inside.

    Notes
    -----
    The tissue is the default prior's
    (:class:`~dipy_spinverse.posterior.TissuePrior` ``()``: straight
    permeable axons of 1-25 um, intrinsic diffusivity 2e-3 mm^2/s).
    """

    #: How the model estimates (the selector's ``fit_method``).
    fit_method = "protocol_free"
    #: What the voxels of status ``IMPOSSIBLE_SIGNAL`` keep, in the warning
    #: a fit gives once (:func:`~dipy_spinverse.reconst.status.warn_implausible`).
    impossible_outputs = "their maps are NaN, as outside the prior"

    def __init__(self, gtab, *, sigma=None, n_posterior_samples=128, cache_dir=None):
        self.gtab, self.protocol = gradient_tables(gtab)
        sigma = require_sigma(
            sigma, fit_method=self.fit_method, n_volumes=len(self.protocol)
        )
        with warnings.catch_warnings():
            # The gate's warning of sequences normalised by every echo
            # time's b = 0 does not apply: each shell read is normalised by
            # the b = 0 volumes at its echo time, and one without them is
            # not read and named (out_of_design).
            warnings.filterwarnings(
                "ignore", message=r"sequence\(s\) of rank", category=UserWarning
            )
            require_b0(self.protocol)
        self.sigma = sigma
        self.sequences = self.protocol.sequences()
        self.shells = ProtocolShells(self.protocol)
        self.out_of_design = [
            f"{what}: {why}" for what, why in self.shells.dropped
        ] + list(self.shells.problems)
        if self.shells.dropped:
            warnings.warn(
                "the protocol-free estimator does not read these shells or "
                "volumes (outside its design): "
                + "; ".join(f"{what}: {why}" for what, why in self.shells.dropped)
                + ". Its intervals rest on the other shells; "
                "fit_method='posterior' reads every volume.",
                UserWarning,
                stacklevel=3,
            )
        if self.shells.problems:
            warnings.warn(
                "the protocol lies outside the protocol-free estimator's design ("
                + "; ".join(self.shells.problems)
                + "): its intervals are not validated there; fit_method="
                "'posterior' trains for this protocol.",
                UserWarning,
                stacklevel=3,
            )
        self.n_posterior_samples = check_int(
            n_posterior_samples, "n_posterior_samples", 10
        )
        self.cache_dir = cache_dir
        self._estimator = None
        self._envelope = None
        # The volumes read: each shell's and its b = 0 volumes.
        self._read = np.unique(
            np.concatenate(
                [np.r_[shell.rows, shell.b0_rows] for shell in self.shells.shells]
            )
        )

    @property
    def predictive_envelope(self):
        """The prior's predictive region on the volumes read
        (:func:`~dipy_spinverse.posterior.envelope.prior_envelope` of
        :data:`N_ENVELOPE_DRAWS` draws of ``TissuePrior()``, at
        :data:`~dipy_spinverse.reconst.posterior.PREDICTIVE_LEVEL`):
        simulated once per protocol, kept in the cache."""
        if self._envelope is None:
            self._envelope = prior_envelope(
                TissuePrior(),
                self.protocol[self._read],
                n_draws=N_ENVELOPE_DRAWS,
                level=PREDICTIVE_LEVEL,
                cache_dir=self.cache_dir,
            )
        return self._envelope

    @property
    def estimator(self):
        """The shipped :class:`~dipy_spinverse.posterior.protocol_free.
        ProtocolFreeEstimator` (read on first use)."""
        if self._estimator is None:
            self._estimator = load_protocol_free()
        return self._estimator

    def fit(self, data, *, mask=None, checkpoint=None, resume=None):
        """Posterior maps of one voxel or a volume.

        A volume's voxels are read a chunk at a time
        (:data:`VOXELS_PER_CHUNK`); after each, ``checkpoint`` sees the fit
        so far, and a fit interrupted then continues from it (``resume``),
        as the label search's does.

        Parameters
        ----------
        data : array_like (..., n_volumes) or (n_mask, n_volumes)
            As :meth:`SpinversePosteriorModel.fit
            <dipy_spinverse.reconst.posterior_model.SpinversePosteriorModel.fit>`
            takes it.
        mask : array_like of bool (data.shape[:-1]), optional
        checkpoint : callable, optional
            ``checkpoint(partial_fit, rows)`` at the start (``rows`` None)
            and after every chunk, with the rows of ``partial_fit.params``
            that chunk fitted: :class:`dipy_spinverse.io.Checkpoint` writes
            each chunk once to an HDF5 store. Volume fits only.
        resume : ProtocolFreeFit, optional
            A partly finished volume fit of the same data and model (its
            voxels still to fit have status ``PENDING``; a store is read
            with :func:`dipy_spinverse.io.load_fit`): only those are fitted.

        Returns
        -------
        ProtocolFreeFit
        """
        data = check_data(data, len(self.protocol))
        if data.ndim == 1:
            if checkpoint is not None or resume is not None:
                raise ValueError(
                    "checkpoint and resume are for volume fits and data is one "
                    "voxel (1-D); fit data[None], a volume of one voxel, to save "
                    "or resume it."
                )
            rows, mask = voxels_to_fit(self, data, mask)
            params, notes = self._params(rows)
            self._report(params["status"], params["sigma"], notes)
            return ProtocolFreeFit(self, params, mask)
        return self._fit_volume(data, mask, checkpoint_hook(checkpoint), resume)

    def _fit_volume(self, data, mask, hook, resume):
        """:meth:`fit` of a volume: its PENDING voxels a chunk at a time."""
        if resume is not None:
            check_resume(self, resume, data, mask)
            mask = resume.mask
            params = {k: v.copy() for k, v in resume.params.items()}
        else:
            mask = check_mask(mask, volume_shape(data, mask))
            params = self._pending(int(mask.sum()))
        partial = ProtocolFreeFit(self, params, mask)
        partial.fingerprint = fingerprint(data, mask)
        # The volume index of each row, or None for the mask's rows given.
        voxels = None if is_mask_rows(data, mask) else np.flatnonzero(mask)
        todo = np.flatnonzero(params["status"] == PENDING)
        if hook is not None:
            hook(partial, None)
        negative, notes = 0, {"fast": 0, "far": 0}
        for rows in chunks(todo, VOXELS_PER_CHUNK):
            if voxels is None:
                chunk = data[rows]
            else:
                chunk = data[np.unravel_index(voxels[rows], mask.shape)]
            negative += count_negative(chunk)
            values, found = self._params(np.asarray(chunk, dtype=np.float64))
            for name, value in values.items():
                params[name][rows] = value
            notes = {key: notes[key] + found[key] for key in notes}
            if hook is not None:
                hook(partial, rows)
        warn_negative(self, negative, len(todo), stacklevel=4)
        self._report(params["status"][todo], params["sigma"][todo], notes)
        return partial

    def _pending(self, n):
        """The parameters of ``n`` voxels not fitted yet (status PENDING)."""
        n_shells = len(self.shells.shells)
        params = dict(
            status=np.full(n, PENDING, dtype=np.int16),
            tokens=np.full((n, n_shells, N_TOKEN), np.nan, dtype=np.float32),
            sigma=np.full(n, np.nan, dtype=np.float32),
            S0=np.full(n, np.nan),
        )
        params.update({name: np.full((n, len(KEPT)), np.nan) for name in FREE_SCALARS})
        return params

    def _report(self, status, sigma, notes):
        """The warnings and log lines a fit gives once, of the voxels it fitted
        (their ``status`` and relative noise ``sigma``; ``notes``: the counts
        of :meth:`_params`)."""
        n, fast, far = len(status), notes["fast"], notes["far"]
        good = status == OK
        warn_noise(sigma[good], snr_range=SNR_RANGE)
        if fast:
            logger.warning(
                f"{fast} of {n} voxels are OUT_OF_PRIOR: a shell's mean signal "
                "decays faster than free water at the prior's diffusivity "
                f"({PRIOR_DIFFUSIVITY} mm^2/s) beyond the noise (free water, CSF, "
                "or a sigma too small); their maps are NaN."
            )
        if far:
            logger.warning(
                f"{far} of {n} voxels are OUT_OF_PRIOR: their signal lies beyond "
                "the predictive region of the prior's simulations on this "
                "protocol, with their noise; their maps are NaN. "
                "TissuePrior().check(data, gtab, sigma=...) says which features "
                "lie outside."
            )
        warn_implausible(self, status)
        logger.info(
            f"protocol-free posterior of {int(good.sum())} of {n} voxels "
            f"({'; '.join(self.shells.report())})"
        )

    def _params(self, rows):
        """The parameters of the voxels ``rows`` (n, n_volumes), and the
        counts of those out of the prior (``fast``: faster than free water;
        ``far``: beyond the predictive region only)."""
        gate = admit(rows, self.protocol, sigma=self.sigma)
        status = gate.status.copy()
        status[gate.impossible] = IMPOSSIBLE_SIGNAL
        sigma = gate.relative.astype(np.float32)
        # Each shell by the b = 0 volumes at its echo time (the gate's
        # per-sequence b = 0 where the sequence has its own, else those of
        # its echo time, not the mean of every echo time's).
        normalised = self.shells.normalised(rows)
        read = np.concatenate([shell.rows for shell in self.shells.shells])
        unread = ~np.isfinite(normalised[:, read]).all(axis=1)
        status[(status == OK) & unread] = BAD_B0
        ok = status == OK
        fast = np.zeros(len(status), bool)
        fast[ok] = faster_than_free(self.shells.shells, normalised[ok], sigma[ok])
        far = self._beyond_the_prior(rows, gate, status == OK)
        status[fast | far] = OUT_OF_PRIOR
        good = np.flatnonzero(status == OK)
        n = len(status)
        tokens = np.full(
            (n, len(self.shells.shells), N_TOKEN),
            np.nan,
            dtype=np.float32,
        )
        tokens[good] = self.shells.tokens(normalised[good])
        params = {name: np.full((n, len(KEPT)), np.nan) for name in FREE_SCALARS}
        for part, values in _draws(
            self.estimator, tokens, sigma, good, self.n_posterior_samples, 0
        ):
            for name in FREE_SCALARS:
                levels = self.estimator.quantile_levels(name, KEPT)
                params[name][part] = np.quantile(values[name], levels, axis=0).T
        notes = {"fast": int(fast.sum()), "far": int((far & ~fast).sum())}
        return (
            dict(status=status, tokens=tokens, sigma=sigma, S0=gate.S0, **params),
            notes,
        )

    def _beyond_the_prior(self, rows, gate, ok):
        """Voxels ``ok`` whose signal on the volumes read lies beyond the
        prior's predictive region (:attr:`predictive_envelope`), at the
        noise of each one's noisiest sequence."""
        far = np.zeros(len(rows), dtype=bool)
        if ok.any():
            protocol = self.protocol[self._read]
            normalised = normalise_b0(rows[ok][:, self._read], protocol)
            sigma = noisiest_sequence(gate, np.flatnonzero(ok))
            distance, limit = self.predictive_envelope.distance(normalised, sigma)
            far[ok] = ~(distance <= limit)  # a NaN distance is outside
        return far

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
            n_posterior_samples=self.n_posterior_samples,
            cache_dir=self.cache_dir,
        )

    def description(self):
        """The model as a fit file keeps it: its noise, draws and protocol
        (the estimator is the package's, read when it is needed).

        Returns
        -------
        dict
            JSON-ready values (numpy arrays aside);
            :meth:`from_description` rebuilds the model.
        """
        return dict(
            sigma=self.sigma,
            n_posterior_samples=self.n_posterior_samples,
            protocol=protocol_description(self.protocol),
        )

    @classmethod
    def from_description(cls, description):
        """The model :meth:`description` described.

        Parameters
        ----------
        description : dict

        Returns
        -------
        SpinverseProtocolFreeModel
        """
        with warnings.catch_warnings():
            # What the design does not read was said when the fit was made.
            warnings.simplefilter("ignore", UserWarning)
            return cls(
                table_from_description(description),
                sigma=description["sigma"],
                n_posterior_samples=description["n_posterior_samples"],
            )

    def restored_fit(self, arrays, header):
        """The fit of this model whose file holds ``arrays``.

        Parameters
        ----------
        arrays : dict of ndarray
            ``mask`` and the per-voxel arrays of a fit (``status``,
            ``tokens``, ``sigma``, ``S0`` and each descriptor's quantiles).
        header : dict
            The file's header: the fitted data's ``fingerprint``.

        Returns
        -------
        ProtocolFreeFit

        Raises
        ------
        ValueError
            An array missing, or of a shape the volume and this model do not
            have.
        """
        mask = np.asarray(arrays["mask"]).astype(bool)
        n = int(mask.sum())
        shapes = dict(
            status=(n,),
            tokens=(n, len(self.shells.shells), N_TOKEN),
            sigma=(n,),
            S0=(n,),
            **{name: (n, len(KEPT)) for name in FREE_SCALARS},
        )
        missing = [name for name in shapes if name not in arrays]
        if missing:
            raise ValueError(f"the arrays {missing} are missing; the file is damaged.")
        for name, shape in shapes.items():
            if np.shape(arrays[name]) != shape:
                raise ValueError(
                    f"{name} has shape {np.shape(arrays[name])} but the saved "
                    f"volume and model need {shape}; the file is damaged."
                )
        fit = ProtocolFreeFit(self, {k: np.asarray(arrays[k]) for k in shapes}, mask)
        fit.fingerprint = header.get("fingerprint")
        return fit

    def differences(self, other):
        """Names of the settings that make ``other``'s fits differ from ours
        (``cache_dir`` aside: where the prior's simulations are kept)."""
        mine, theirs = self.description(), other.description()
        pairs = dict(
            sigma=(mine["sigma"], theirs["sigma"]),
            n_posterior_samples=(
                mine["n_posterior_samples"],
                theirs["n_posterior_samples"],
            ),
            protocol=(True, same_protocol(self.protocol, other.protocol)),
        )
        return [name for name, (a, b) in pairs.items() if a != b]

    def __repr__(self):
        return (
            f"SpinverseProtocolFreeModel(n_volumes={len(self.protocol)}, "
            f"sigma={self.sigma:.4g}, shells={len(self.shells.shells)})"
        )


def faster_than_free(shells, normalised, sigma):
    """Voxels a shell of which decays faster than free water at the prior's
    diffusivity: outside the prior, whatever its tissue.

    Membranes only slow diffusion, so every direction's signal of the
    prior's tissue stays above ``exp(-b D0)`` (``D0`` =
    :data:`PRIOR_DIFFUSIVITY`; restricted diffusion's diffraction minima
    dip below it by far less than any noise), and so does a shell's mean.
    A voxel is flagged when some shell's mean lies below that bound by more
    than :data:`_FREE_WATER_MARGIN` standard errors (the mean's noise,
    ``sigma / sqrt(n)``, and its b = 0 normalisation's, up to ``sigma``
    relative).

    Parameters
    ----------
    shells : list of Shell
        The shells read.
    normalised : ndarray (n, n_acquisitions)
        b0-normalised signals.
    sigma : ndarray (n,)
        Relative noise.

    Returns
    -------
    ndarray of bool (n,)
    """
    flagged = np.zeros(len(normalised), bool)
    for shell in shells:
        bound = np.exp(-shell.b * PRIOR_DIFFUSIVITY)
        mean = normalised[:, shell.rows].mean(axis=1)
        error = sigma * (1 / np.sqrt(len(shell.rows)) + bound)
        flagged |= mean < bound - _FREE_WATER_MARGIN * error
    return flagged


def _draws(estimator, tokens, sigma, rows, n_samples, seed):
    """Batches of ``rows``: ``(rows, decoded flow draws (n_samples, len))``."""

    def sample(t, s):
        # Every shell of every voxel read (the mask of the tokens).
        return estimator.sample(
            t, torch.ones(t.shape[:2]), s, n_samples, generator_seed=seed
        )

    batches = flow_draws(sample, tokens, sigma, rows, per_batch=_VOXELS_PER_BATCH)
    for part, _, draws in batches:
        yield part, decode_free(draws)


class ProtocolFreeFit(MaskedFit):
    """The protocol-free posterior of one voxel or a volume.

    Maps (the posterior median) are attributes named as the descriptors of
    :data:`~dipy_spinverse.posterior.protocol_free.FREE_SCALARS`; 0 outside
    the mask, NaN where the status is not ``OK`` (:data:`PROTOCOL_FREE_CODES`).
    :meth:`credible_interval` and :meth:`posterior_samples` as
    :class:`~dipy_spinverse.reconst.posterior.PosteriorFit`'s. It has no
    ``orientation`` and no ``predict`` (the estimator reads rotation
    invariants; ``fit_method="posterior"`` has both).
    """

    status_codes = PROTOCOL_FREE_CODES
    #: Checksum of the fitted data (:func:`~dipy_spinverse.reconst.resume.
    #: fingerprint`), so that a partial fit resumes on them; a part
    #: (``fit[index]``) has none.
    fingerprint = None

    @property
    def S0(self):
        """Mean b = 0 signal of each voxel."""
        return self._volume(self.params["S0"], 0.0)

    @property
    def n_pending(self):
        """Voxels of the mask still to fit (status ``PENDING``: a fit
        interrupted, read from its checkpoint)."""
        return int(np.count_nonzero(self.params["status"] == PENDING))

    def __getattr__(self, name):
        if not name.startswith("_") and name in FREE_SCALARS:
            return self._volume(self.params[name][:, kept_index(0.5)], 0.0)
        message = f"'ProtocolFreeFit' object has no attribute {name!r}"
        if not name.startswith("_"):
            message += (
                f". It has the maps {', '.join(FREE_SCALARS)}; status, S0, "
                "credible_interval(name, level), posterior_samples(name, n)"
            )
            if name in ("orientation", "predict", "predictive_samples"):
                message += (
                    f"; {name} needs the orientation, which the protocol-free "
                    'estimator does not read: fit_method="posterior"'
                )
        raise AttributeError(message + ".", name=name, obj=self)

    def credible_interval(self, name, level=0.9):
        """The central credible interval of a descriptor: (low, high) maps.

        Parameters
        ----------
        name : str
            One of :data:`~dipy_spinverse.posterior.protocol_free.FREE_SCALARS`.
        level : float
            In (0, 1); 0.5 and 0.9 are stored, others drawn again (seeded).

        Returns
        -------
        low, high : ndarray
        """
        _check_name(name)
        low, high = interval_rows(
            self.params, name, level, lambda: self.model.estimator, self._flow_draws
        )
        return self._volume(low, 0.0), self._volume(high, 0.0)

    def posterior_samples(self, name, n=100, *, seed=0):
        """``n`` draws of the recalibrated posterior of a descriptor per voxel.

        Returns
        -------
        ndarray (n,) + shape
            NaN where the status is not ``OK``, 0 outside the mask.
        """
        _check_name(name)
        n = check_int(n, "n", 1, hint=" (the draws per voxel), e.g. n=100")
        seed = check_int(seed, "seed", 0, hint=" (it seeds the draws), e.g. seed=0")
        draws = self._flow_draws(name, n, seed)
        table = self.model.estimator.level_table(name)
        draws = calibrated_draws(draws, table, np.random.default_rng(seed))
        return np.moveaxis(
            self._volume(np.moveaxis(draws, 0, 1), 0.0), self.mask.ndim, 0
        )

    def _flow_draws(self, name, n, seed=1):
        out = np.full((n, len(self.params["status"])), np.nan)
        ok = np.flatnonzero(self.params["status"] == OK)
        for part, values in _draws(
            self.model.estimator,
            self.params["tokens"],
            self.params["sigma"],
            ok,
            n,
            seed,
        ):
            out[:, part] = values[name]
        return out


def _check_name(name):
    if name not in FREE_SCALARS:
        raise ValueError(
            f"the protocol-free fit has the descriptors {FREE_SCALARS}, got "
            f"{name!r}"
            + (" (fit_method='posterior' has it)" if name == "orientation" else "")
            + "."
        )
