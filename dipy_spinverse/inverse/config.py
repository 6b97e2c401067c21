"""Configuration of the inversion: presets as frozen, validated dataclasses.

An :class:`InversionConfig` has four parts, each a dataclass that checks
its own values: the face fit (:class:`FaceFitConfig`), the data loss
(:class:`LossConfig`), the label search (:class:`SearchConfig`) and the
grid's approximation error (:class:`ApproximationConfig`). It is checked
once, when it is built; everything downstream trusts it. Users name the
options flat (:data:`OPTIONS`; the label search's with a ``search_`` prefix):
:func:`resolve_config` builds a configuration from a preset and those
options, refuses options the configuration would ignore, and scales the
curriculum to a total number of iterations.
"""

import dataclasses
import numbers
from dataclasses import dataclass

import numpy as np

from ..checks import OptionError, about, check_choice, check_int, check_number

__all__ = [
    "Stage",
    "InversionConfig",
    "FaceFitConfig",
    "LossConfig",
    "SearchConfig",
    "ApproximationConfig",
    "OPTIONS",
    "PRESETS",
    "resolve_config",
    "refuse_unused",
    "check_proposal",
]

#: A learned proposal needs some variety to learn from (ProposalSettings
#: refuses fewer).
MIN_PROPOSAL_SUBSTRATES = 10


def check_proposal(value):
    """The learned proposal's training substrates (``search_proposal``): 0
    (off) or at least ``MIN_PROPOSAL_SUBSTRATES``.

    Parameters
    ----------
    value : int
        The number of random substrates the proposal is trained on.

    Returns
    -------
    int

    Raises
    ------
    OptionError
        Not 0 or at least ``MIN_PROPOSAL_SUBSTRATES``.
    """
    with about("search_proposal"):
        proposal = check_int(value, "search_proposal", 0)
    if 0 < proposal < MIN_PROPOSAL_SUBSTRATES:
        raise OptionError(
            "search_proposal is the number of training substrates of the learned "
            f"proposal: 0 (off) or at least {MIN_PROPOSAL_SUBSTRATES}, got "
            f"{proposal}",
            options=["search_proposal"],
            fixes=[("search_proposal", 4000)],
        )
    return proposal


@dataclass(frozen=True)
class Stage:
    """One stage of the curriculum.

    Parameters
    ----------
    iterations : int
        Adam steps of the stage (>= 1).
    sequences : tuple of int or "all"
        Sequence ranks fitted in the stage (rank 0 = the longest diffusion
        time, see :meth:`Protocol.sequences`), or ``"all"``.
    """

    iterations: int
    sequences: tuple | str = "all"

    def __post_init__(self):
        object.__setattr__(
            self, "iterations", check_int(self.iterations, "stage iterations", 1)
        )
        sequences = self.sequences
        if sequences != "all":
            try:
                sequences = tuple(
                    check_int(r, "stage sequence rank", 0) for r in sequences
                )
            except TypeError as err:
                raise ValueError(
                    "stage sequences must be 'all' or a tuple of sequence ranks "
                    f"(0 = longest diffusion time), got {self.sequences!r}."
                ) from err
            if not sequences:
                raise ValueError("stage sequences must name at least one rank.")
        object.__setattr__(self, "sequences", sequences)

    def ranks(self, n_sequences):
        """The ranks of this stage for a protocol of ``n_sequences``."""
        if self.sequences == "all":
            return tuple(range(n_sequences))
        return self.sequences

    @classmethod
    def coerce(cls, stage):
        """A :class:`Stage` from a Stage or a dict of its fields."""
        if isinstance(stage, cls):
            return stage
        if not isinstance(stage, dict) or "iterations" not in stage:
            raise ValueError(
                "each stage must be a Stage or a dict(iterations=..., sequences=...), "
                f"got {stage!r}."
            )
        unknown = set(stage) - {"iterations", "sequences"}
        if unknown:
            raise ValueError(
                f"stage has unknown key(s) {sorted(unknown)}; a stage is "
                "dict(iterations=..., sequences=...)."
            )
        return cls(**stage)


def _stages(stages):
    """A non-empty tuple of :class:`Stage` from Stages or dicts."""
    if isinstance(stages, Stage | dict) or not isinstance(stages, tuple | list):
        raise ValueError(
            "stages must be a list of stages, e.g. [dict(iterations=200, "
            f"sequences=(0,)), dict(iterations=200, sequences=(1,))], got {stages!r}."
        )
    if not stages:
        raise ValueError("stages must list at least one stage.")
    return tuple(Stage.coerce(s) for s in stages)


def _pair(value):
    try:
        low, high = value
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"log_kappa_bounds must be (low, high) in log10 m/s, got {value!r}."
        ) from err
    return low, high


def _flag(value, name):
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def _positive(part, name):
    value = getattr(part, name)
    if value <= 0:
        raise ValueError(
            f"{name} must be > 0, got {value!r} (the paper preset uses "
            f"{getattr(type(part), name)!r})."
        )


@dataclass(frozen=True)
class FaceFitConfig:
    """The face fit (the published method).

    Parameters
    ----------
    parametrisation : {"face", "cell"}
        ``"face"``: per-face logits; ``"cell"``: per-cell occupancy whose
        jumps set the faces.
    log_kappa_bounds : tuple of float
        (low, high) permeability bounds, log10 m/s.
    init_log_kappa : float
        Initial permeability (log10 m/s), strictly inside the bounds.
    threshold : float
        Faces below it (m/s) are membranes.
    lr, warmup
        Adam's rate with a linear ``warmup`` and cosine decay to the
        published final rate, restarted per stage
        (:func:`~dipy_spinverse.inverse.facefit.schedule`).
    stages, adapt_stages
        The curriculum (:class:`Stage`); ``adapt_stages``: see
        :meth:`InversionConfig.for_protocol`.
    continuity, continuity_delta, manifold, manifold_ramp
        The priors' weights: continuity (Huber width ``continuity_delta``)
        and manifold (``manifold_ramp``-ed in).
    """

    parametrisation: str = "face"
    log_kappa_bounds: tuple = (-5.0, -1.0)
    init_log_kappa: float = -3.0
    threshold: float = 1e-3
    lr: float = 0.6
    warmup: int = 50
    stages: tuple = (Stage(200, (0,)), Stage(200, (1,)))
    adapt_stages: bool = True
    continuity: float = 2.0
    continuity_delta: float = 5.0
    manifold: float = 2.0
    manifold_ramp: bool = True

    def __post_init__(self):
        set_ = object.__setattr__
        check_choice(self.parametrisation, "parametrisation", ("face", "cell"))
        bounds = tuple(
            check_number(b, "log_kappa_bounds") for b in _pair(self.log_kappa_bounds)
        )
        lo, hi = bounds
        if not lo < hi:
            raise ValueError("log_kappa_bounds must be (low, high) with low < high.")
        set_(self, "log_kappa_bounds", bounds)
        set_(
            self,
            "init_log_kappa",
            check_number(self.init_log_kappa, "init_log_kappa", hint=" (log10 m/s)"),
        )
        if self.parametrisation == "face" and not lo < self.init_log_kappa < hi:
            raise ValueError(
                f"init_log_kappa must lie strictly inside log_kappa_bounds {bounds}, "
                f"got {self.init_log_kappa!r}."
            )
        for name in ("lr", "continuity", "continuity_delta", "manifold"):
            set_(self, name, check_number(getattr(self, name), name, minimum=0))
        for name in ("adapt_stages", "manifold_ramp"):
            set_(self, name, _flag(getattr(self, name), name))
        # A Huber width of 0 is no loss at all (torch refuses it at fit time).
        for name in ("lr", "continuity_delta"):
            _positive(self, name)
        set_(self, "warmup", check_int(self.warmup, "warmup", 0))
        threshold = check_number(self.threshold, "threshold", hint=" (m/s)")
        if not 10.0**lo < threshold < 10.0**hi:
            raise ValueError(
                f"threshold must lie between the permeability bounds {10.0**lo:g} "
                f"and {10.0**hi:g} m/s, got {threshold!r}."
            )
        set_(self, "threshold", threshold)
        set_(self, "stages", _stages(self.stages))

    @property
    def n_iterations(self):
        """Total iterations of the face fit."""
        return sum(stage.iterations for stage in self.stages)


@dataclass(frozen=True)
class LossConfig:
    """The data loss, of the face fit and the label search alike.

    ``loss_scale`` x mean squared misfit, with a Rician floor when
    ``noise="rician"`` and ``sigma`` (noise relative to the voxel's mean
    b = 0 signal) > 0; sequences of different echo times are weighted by
    their own noise (:func:`dipy_spinverse.sim.signals.noise_precision`).
    See :func:`dipy_spinverse.sim.signals.data_loss`. The noise reaches the
    loss in one form, a :class:`~dipy_spinverse.inverse.noise.Noise` (a
    level and each acquisition's precision relative to it), which
    :func:`~dipy_spinverse.inverse.reconstruct` is given (the DIPY model
    gives each fit its data's) or makes from ``sigma``, the setting of a
    call not given one; nothing below it reads ``sigma``.
    """

    loss_scale: float = 100.0
    noise: str = "gaussian"
    sigma: float = 0.0

    def __post_init__(self):
        check_choice(self.noise, "noise", ("gaussian", "rician"))
        object.__setattr__(
            self,
            "loss_scale",
            check_number(self.loss_scale, "loss_scale", minimum=0),
        )
        _positive(self, "loss_scale")
        object.__setattr__(
            self,
            "sigma",
            check_number(
                self.sigma,
                "sigma",
                minimum=0,
                maximum=1,
                hint=" (noise relative to the b = 0 signal, 1/SNR; 0 if unknown)",
            ),
        )


@dataclass(frozen=True)
class SearchConfig:
    """The label search (off when ``steps`` is 0).

    Options are given with a ``search_`` prefix (``search_steps=300``).

    At most ``steps`` greedy moves over closed cell labellings, scored
    ``batch`` at a time on ``directions`` directions per sequence (None:
    all), in the order of their last known loss (``ranking="lazy"``) or half
    of each batch by their first-order gain from one gradient of the loss
    per step (``"gradient"``), each cell's membrane moved with them (from the
    best of ``kappas``, m/s, in steps of 0.25 and 0.05 decades within the
    face fit's ``log_kappa_bounds``) and refined at the end; ``starts``
    generic shapes kept after screening, ``restarts`` descents, each kicked
    out of its local minimum ``kicks`` times (iterated local search); a move
    must lower chi-square by ``min_gain`` (needs ``sigma``). Starts: the face
    field's regions, the generic-shape dictionary (``dictionary``) and, when
    ``proposal`` > 0, labellings drawn from a learned proposal trained on
    that many random substrates (cached on disk; see
    :mod:`dipy_spinverse.inverse.proposal`). With ``bootstrap`` > 0 the
    search is repeated on that many wild-bootstrap replicates of each voxel
    (the fit's prediction plus its residuals with random signs), and the
    uncertainty and inside probability take in how far their answers move
    (:func:`~dipy_spinverse.inverse.bootstrap.bootstrap_search`; each replicate
    costs about one more search). See :mod:`dipy_spinverse.inverse.search`.
    """

    steps: int = 0
    batch: int = 16
    ranking: str = "lazy"
    directions: int | None = None
    kappas: tuple = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4)
    starts: int = 16
    restarts: int = 1
    kicks: int = 0
    min_gain: float = 0.0
    dictionary: bool = True
    proposal: int = 0
    bootstrap: int = 0

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "steps", check_int(self.steps, "search_steps", 0))
        check_choice(self.ranking, "search_ranking", ("gradient", "lazy"))
        for name in ("batch", "starts", "restarts"):
            set_(self, name, check_int(getattr(self, name), f"search_{name}", 1))
        for name in ("kicks", "bootstrap"):
            set_(self, name, check_int(getattr(self, name), f"search_{name}", 0))
        if self.directions is not None:
            set_(
                self,
                "directions",
                check_int(self.directions, "search_directions", 1),
            )
        set_(self, "dictionary", _flag(self.dictionary, "search_dictionary"))
        given = self.kappas
        if np.ndim(given) != 1 or not all(
            isinstance(k, numbers.Real) and not isinstance(k, bool) for k in given
        ):
            raise ValueError(
                "search_kappas must be a flat sequence of membrane permeabilities "
                f"(m/s), e.g. (1e-5, 5e-5), got {given!r}."
            )
        set_(self, "kappas", tuple(float(k) for k in given))
        set_(
            self,
            "min_gain",
            check_number(
                self.min_gain,
                "search_min_gain",
                minimum=0,
                hint=" (chi-square units; 0 accepts every move that lowers the loss)",
            ),
        )
        set_(self, "proposal", check_proposal(self.proposal))


@dataclass(frozen=True)
class ApproximationConfig:
    """The grid's approximation error (off when ``n_substrates`` is 0).

    Given as the option ``approximation_error``. The data are compared with
    the grid's signals after removing the mean difference between a grid
    twice as fine and the fit's grid, and each acquisition's noise grows by
    its spread; both drawn over ``n_substrates`` random substrates (cached
    on disk; see :mod:`dipy_spinverse.inverse.approximation`).
    """

    n_substrates: int = 0

    def __post_init__(self):
        n = check_int(self.n_substrates, "approximation_error", 0)
        if n == 1:
            raise ValueError(
                "approximation_error is the number of random substrates its mean "
                "and spread are drawn over: 0 (off) or at least 2, got 1; e.g. "
                "approximation_error=32."
            )
        object.__setattr__(self, "n_substrates", n)


#: The parts of an :class:`InversionConfig`.
_PARTS = {
    "face": FaceFitConfig,
    "loss": LossConfig,
    "search": SearchConfig,
    "approximation": ApproximationConfig,
}


def _option_name(part, field_name):
    """The option (keyword of :func:`resolve_config`) of a part's field: the
    names options had before the grouping."""
    if part == "search":
        return "search_" + field_name
    if part == "approximation":  # its one field
        return "approximation_error"
    return field_name


#: Each option, as (part, field).
OPTIONS = {
    _option_name(part, f.name): (part, f.name)
    for part, cls in _PARTS.items()
    for f in dataclasses.fields(cls)
}


@dataclass(frozen=True)
class InversionConfig:
    """Everything that sets the result of :func:`reconstruct`, in four parts.

    Parameters
    ----------
    face : FaceFitConfig
        The face fit (the published method).
    loss : LossConfig
        The data loss (face fit and label search alike).
    search : SearchConfig
        The label search.
    approximation : ApproximationConfig
        The grid's approximation error.

    Notes
    -----
    Users give the options flat, by name (:data:`OPTIONS`: ``lr``,
    ``sigma``, ``search_steps``, ``approximation_error``, ...), to
    :func:`resolve_config`, :meth:`replace` or :class:`SpinverseModel`;
    :meth:`as_dict` gives them back flat. Each part checks its own values;
    this class checks what spans parts (the search's permeabilities within
    the face fit's bounds).
    """

    face: FaceFitConfig = FaceFitConfig()
    loss: LossConfig = LossConfig()
    search: SearchConfig = SearchConfig()
    approximation: ApproximationConfig = ApproximationConfig()

    def __post_init__(self):
        for part, cls in _PARTS.items():
            if not isinstance(getattr(self, part), cls):
                raise ValueError(
                    f"InversionConfig.{part} must be a {cls.__name__}, got "
                    f"{type(getattr(self, part)).__name__}; give options by "
                    "name with InversionConfig.from_options(...)."
                )
        lo, _ = self.face.log_kappa_bounds
        threshold = self.face.threshold
        kappas = np.asarray(self.search.kappas)
        if kappas.size == 0 or np.any(
            ~np.isfinite(kappas) | (kappas < 10.0**lo) | (kappas >= threshold)
        ):
            raise ValueError(
                "search_kappas must list membrane permeabilities (m/s) between the "
                f"lower bound {10.0**lo:g} and the threshold {threshold:g}."
            )

    @classmethod
    def from_options(cls, **options):
        """A configuration from options by name (the defaults elsewhere)."""
        return cls().replace(**options)

    def replace(self, **options):
        """This configuration with options (by name, :data:`OPTIONS`) changed.

        Raises
        ------
        OptionError
            An unknown option, or a value out of range.
        """
        _check_names(options)
        changes = {}
        for name, value in options.items():
            part, field_name = OPTIONS[name]
            changes.setdefault(part, {})[field_name] = value
        with about(*options):
            return dataclasses.replace(
                self,
                **{
                    part: dataclasses.replace(getattr(self, part), **fields)
                    for part, fields in changes.items()
                },
            )

    @property
    def searches_labels(self):
        """Whether the label search runs (``search_steps > 0``)."""
        return self.search.steps > 0

    @property
    def returns_labels(self):
        """Whether the inversion returns cell labels: the label search's, or
        the cell parametrisation's occupancy."""
        return self.searches_labels or self.face.parametrisation == "cell"

    @property
    def uses_proposal(self):
        """Whether the label search starts from the learned proposal: the
        search runs, a proposal is asked for, and the search starts from the
        face field (the cell parametrisation starts from its own labels)."""
        return bool(
            self.searches_labels
            and self.search.proposal
            and self.face.parametrisation == "face"
        )

    def for_protocol(self, n_sequences):
        """This configuration on a protocol of ``n_sequences`` sequences.

        The curriculum's stages name sequences by rank (0 = the longest
        diffusion time). With ``adapt_stages`` (the presets' curricula) and
        fewer sequences than the stages name -- one diffusion time, as most
        DIPY datasets have -- the stages merge into a single stage over all
        acquisitions with the same total iterations. Stages you give are
        used as given (``adapt_stages`` is then off), and ranks the protocol
        lacks are an error.

        Returns
        -------
        InversionConfig

        Raises
        ------
        ValueError
            Stages that the protocol cannot meet.
        """
        face = self.face
        needed = max(max(stage.ranks(n_sequences)) for stage in face.stages)
        config = self
        if face.adapt_stages and needed >= n_sequences:
            config = self.replace(
                stages=(Stage(face.n_iterations, "all"),), adapt_stages=False
            )
        _check_protocol(config.face, n_sequences)
        return config

    def as_dict(self):
        """The options by name as plain Python values (stages as dicts)."""
        out = {
            name: getattr(getattr(self, part), field_name)
            for name, (part, field_name) in OPTIONS.items()
        }
        out["stages"] = tuple(dataclasses.asdict(s) for s in self.face.stages)
        return out


def _check_protocol(face, n_sequences):
    for s, stage in enumerate(face.stages):
        ranks = stage.ranks(n_sequences)
        if max(ranks) >= n_sequences:
            raise ValueError(
                f"curriculum stage {s} uses sequence rank {max(ranks)}, but the "
                f"protocol has only {n_sequences} sequence(s) (distinct timings; "
                "rank 0 = the longest diffusion time). Pass stages= that use "
                f"ranks < {n_sequences}, stages=[dict(iterations=..., "
                "sequences='all')], or acquire more diffusion times."
            )


def _check_names(options):
    """Refuse unknown options, naming the valid ones."""
    unknown = sorted(set(options) - set(OPTIONS))
    if not unknown:
        return
    raise OptionError(
        f"Unknown option(s) {unknown}; valid options are {sorted(OPTIONS)}",
        options=unknown,
    )


def _ignored_options(config):
    """Options that have no effect in ``config``: ``{option: (reason,
    fixes)}``, the fixes as :class:`~dipy_spinverse.checks.OptionError`'s."""
    face, loss, search = config.face, config.loss, config.search
    search_off = "the label search is off (search_steps=0)"
    ignored = {}
    if search.steps == 0:
        for name, (part, _) in OPTIONS.items():
            if part == "search" and name != "search_steps":
                ignored[name] = (search_off, ())
    if loss.noise != "rician" and search.steps == 0:
        ignored["sigma"] = (
            f"the loss is Gaussian (noise='gaussian') and {search_off}",
            (("preset", "default"), ("noise", "rician")),
        )
    if loss.sigma == 0:
        ignored.setdefault(
            "search_min_gain",
            ("it is in units of the noise, and sigma is not given; give sigma", ()),
        )
    if face.parametrisation != "face":
        cell = "parametrisation='cell'"
        ignored["init_log_kappa"] = (f"{cell} starts from occupancy 0.5", ())
        for name in ("search_dictionary", "search_proposal"):
            reason = f"{cell} starts the label search from its labels"
            ignored.setdefault(name, (reason, ()))
    if face.continuity == 0:
        reason = "the continuity prior is off (continuity=0)"
        ignored["continuity_delta"] = (reason, ())
    if face.manifold == 0:
        ignored["manifold_ramp"] = ("the manifold prior is off (manifold=0)", ())
    return ignored


#: Named configurations. ``"paper"``: the published configuration
#: (Spinverse 2026, public code): per-face logits, log10 kappa in [-5, -1],
#: initial kappa 1e-3 (exactly at the threshold), Adam with a 50-iteration
#: warm-up to 0.6 then cosine decay to 0.06 restarted per stage, gradient-norm
#: clip 1, loss 100 x MSE, the ablation's curriculum (200 iterations on the
#: longest diffusion time, then 200 on the second longest) and the priors of
#: the ablation's "both" arm. ``"default"``: realistic voxels (reflecting or
#: periodic boxes, extracellular water, noise): the face fit with a
#: Rician-aware loss proposes starts for the label search, which gives closed
#: surfaces and one membrane permeability per cell.
PRESETS = {"paper": InversionConfig()}
PRESETS["default"] = PRESETS["paper"].replace(
    noise="rician",
    # The face fit only proposes starts here, and its regions rarely win
    # against the shape search (same result on 9 of 9 realistic shapes with
    # no face field at all), so half the published iterations buy the time
    # the search needs.
    stages=(Stage(100, (0,)), Stage(100, (1,))),
    warmup=25,
    # Membranes down to 1e-7 m/s: cells' permeabilities reach 1e-6 m/s (the
    # held-out substrates' range), and a search bounded at 1e-5 offsets a
    # slower membrane by moving labels. Below 1e-7 a membrane is a wall on
    # these time scales (exchange time V / (S kappa) > 10 s for V / S > 1 um).
    log_kappa_bounds=(-7.0, -1.0),
    search_steps=300,
    search_directions=10,
    # A label move must lower chi-square by 8: a likelihood-ratio test at
    # about the 0.5 % level for one degree of freedom (chi2_1 quantile 7.9),
    # strict because each step takes the best of many moves. Needs sigma;
    # noise-free data (sigma 0) accept every decrease.
    search_min_gain=8.0,
)


def resolve_config(preset="default", *, max_iter=None, **options):
    """The configuration of ``preset`` with ``options`` applied.

    Parameters
    ----------
    preset : str or InversionConfig
        A key of :data:`PRESETS`, or a configuration to start from.
    max_iter : int, optional
        Total face-fit iterations: the stages are scaled to this total (each
        keeps at least one iteration), and so is the warm-up unless
        ``warmup`` is among ``options``. Fewer iterations than a preset's
        stages make its curriculum one stage over all acquisitions (as a
        protocol of one diffusion time does); stages given in ``options``
        need at least one iteration each.
    **options
        Options by name (:data:`OPTIONS`: the fields of the parts of
        :class:`InversionConfig`, the label search's with a ``search_``
        prefix).

    Returns
    -------
    InversionConfig

    Raises
    ------
    OptionError
        An unknown preset or option, a value out of range, or an option that
        the resulting configuration does not use (e.g. ``sigma`` with
        ``preset="paper"``), which would otherwise be silently ignored. The
        message names the options as keywords
        (:class:`~dipy_spinverse.checks.OptionError`).
    """
    if isinstance(preset, InversionConfig):
        base = preset
    elif isinstance(preset, str) and preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise OptionError(
            f"Invalid preset {preset!r}. Must be one of {tuple(PRESETS)} or an "
            "InversionConfig",
            options=["preset"],
        )
    _check_names(options)
    if "stages" in options:  # stages given are used as given
        options = {"adapt_stages": False, **options}
    if max_iter is not None:
        with about("max_iter"):
            max_iter = check_int(max_iter, "max_iter", 1)
            options = _scale_iterations(base, options, max_iter)
    config = base.replace(**options)
    refuse_unused(config, options)
    return config


def refuse_unused(config, names):
    """Refuse options that ``config`` does not use.

    :func:`resolve_config` calls it on the options it is given; a caller
    that will set an option later calls it first, e.g. the DIPY model,
    whose fits give the loss their data's ``sigma``.

    Parameters
    ----------
    config : InversionConfig
    names : iterable of str
        Options by name (:data:`OPTIONS`).

    Raises
    ------
    OptionError
        Some of ``names`` have no effect in ``config``.
    """
    ignored = _ignored_options(config)
    useless = sorted(set(names) & set(ignored))
    if useless:
        reasons = "; ".join(f"{k}: {ignored[k][0]}" for k in useless)
        raise OptionError(
            f"option(s) {useless} have no effect in this configuration ({reasons}). "
            "Remove them, or change the options they depend on",
            options=["preset", *OPTIONS],
            fixes=[fix for k in useless for fix in ignored[k][1]],
        )


def _scale_iterations(base, options, max_iter):
    face = base.face
    stages = list(_stages(options.get("stages", face.stages)))
    if max_iter < len(stages):
        if not options.get("adapt_stages", face.adapt_stages):
            raise ValueError(
                f"max_iter={max_iter} is fewer than the {len(stages)} curriculum "
                f"stages given; use max_iter >= {len(stages)} or give fewer stages."
            )
        # Too few iterations for a preset's curriculum: one stage over all
        # acquisitions, as on a protocol of one diffusion time
        # (InversionConfig.for_protocol).
        stages = [Stage(1, "all")]
    counts = [s.iterations for s in stages]
    options = dict(options)
    options["stages"] = tuple(
        dataclasses.replace(s, iterations=k)
        for s, k in zip(stages, _split(max_iter, counts), strict=True)
    )
    if "warmup" not in options:
        options["warmup"] = max(1, round(face.warmup * max_iter / sum(counts)))
    return options


def _split(total, weights):
    """Integers >= 1 proportional to ``weights`` summing to ``total``."""
    raw = np.asarray(weights, float) * (total - len(weights)) / sum(weights)
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - len(weights) - counts.sum()]] += 1
    return [int(c) + 1 for c in counts]
