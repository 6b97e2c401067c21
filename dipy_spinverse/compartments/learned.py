"""Learned estimators: a small torch MLP trained on simulated signals.

The machine-learning paradigm beside model fitting (as in MicroLearn): a
regressor from normalised signals to a model's parameters, trained on signals
simulated from the same model, for the user's gradient table and a noise
level, then applied to every voxel in one batched forward pass. Trained
networks are cached on disk under a hash of everything that defines them
(like AMICO's kernels), the code that simulates and trains them included
(:func:`~dipy_spinverse.provenance.code_digest`), so a table is trained for
once, and again when that code changes.

The model-specific parts (drawing parameters, simulating, turning network
outputs into public parameters) live in the models; this module only knows
arrays: a training set, a network, the cache.
"""

import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..checks import check_device, check_int, check_options, check_positive
from ..files import StaleCacheError, cache_root, load_or_build

__all__ = [
    "LearnedOptions",
    "Regressor",
    "cache_dir",
    "set_loss",
    "train",
    "load_or_train",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnedOptions:
    """Training options of a learned estimator.

    Parameters
    ----------
    n_train : int
        Simulated training voxels.
    epochs : int
        Passes over the training set.
    hidden : tuple of int
        Widths of the hidden layers.
    batch_size : int
    lr : float
        Initial Adam learning rate (cosine decay to 1 % of it).
    seed : int
        Seed of the simulated parameters, noise and initial weights.
    polish : int or None
        Levenberg-Marquardt iterations of variable projection on the model's
        own signal after the network (0: the network's estimates as they
        are). None (default): the model's ``default_polish``, 1 (2 for
        :class:`~.zcd.ZcdModel`; 0 for :class:`~.exchange.ExchangeModel`,
        and for :class:`~.noddi.NoddiModel` when it has a signal frame).
        Applied to the estimates, not in training: not part of the cache key
        (:meth:`training_description`).
    frame : bool
        For models with fibre directions: the network sees each voxel's
        signals resampled in the voxel's own frame and predicts directions
        in it (:mod:`.frames`; default True). False: the lab-frame signals.
        Protocols without a shell of 20 or more directions have no frame.
    device : str
        Torch device the network is trained on (``"cpu"``, default, or
        ``"cuda"``); it is then used on the CPU. Not part of the cache key:
        the device changes the rounding and the random stream of the
        training, not what is trained, so a network trained on a GPU serves
        the CPU fits of the same model.
    """

    n_train: int = 100_000
    epochs: int = 30
    hidden: tuple = (256, 256, 256)
    batch_size: int = 512
    lr: float = 2e-3
    seed: int = 0
    polish: int | None = None
    frame: bool = True
    device: str = "cpu"

    #: Fields that change how or where, not what, is trained or applied
    #: (not in :meth:`training_description`, so not in the cache key).
    _AFTER_TRAINING = ("polish", "device")

    @classmethod
    def from_dict(cls, options):
        """Options from a dict (None: defaults); unknown keys are refused."""
        options = check_options(
            options, "learned_options", "e.g. learned_options={'n_train': 20000}"
        )
        known = set(cls.__dataclass_fields__)
        unknown = set(options) - known
        if unknown:
            raise ValueError(
                f"unknown learned_options {sorted(unknown)}; valid keys: "
                f"{sorted(known)}"
            )
        out = cls(**options)
        # The checked values are kept as plain Python numbers: torch refuses
        # a float epoch count or layer width (2.0), and the cache key is their
        # repr (np.int64(64) and 64 must name the same network).
        plain = dict(
            n_train=check_int(out.n_train, "learned_options['n_train']", 16),
            epochs=check_int(out.epochs, "learned_options['epochs']", 1),
            batch_size=check_int(out.batch_size, "learned_options['batch_size']", 1),
            seed=check_int(out.seed, "learned_options['seed']", 0),
            lr=float(check_positive(out.lr, "learned_options['lr']")),
        )
        if out.polish is not None:
            plain["polish"] = check_int(out.polish, "learned_options['polish']", 0)
        if not isinstance(out.frame, (bool, np.bool_)):
            raise ValueError(
                f"learned_options['frame'] must be True or False, got {out.frame!r}"
            )
        try:
            check_device(out.device)
        except ValueError as err:
            raise ValueError(f"learned_options['device']: {err}") from None
        if isinstance(out.hidden, str) or not np.iterable(out.hidden):
            raise ValueError(
                "learned_options['hidden'] must be a sequence of layer widths, "
                f"e.g. (64, 64), got {out.hidden!r}"
            )
        hidden = tuple(
            check_int(width, "learned_options['hidden']", 1) for width in out.hidden
        )
        return cls(
            **{**asdict(out), **plain, "hidden": hidden, "frame": bool(out.frame)}
        )

    def training_description(self):
        """The options that define a trained network, as the dataclass repr
        of those fields (the text of the cache key): options applied after
        training (``polish``) leave cached networks valid."""
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in self.__dataclass_fields__
            if name not in self._AFTER_TRAINING
        )
        return f"{type(self).__name__}({fields})"


def cache_dir(path=None):
    """The cache folder (:func:`dipy_spinverse.files.cache_root`)."""
    return cache_root(path)


class Regressor(torch.nn.Module):
    """MLP with standardised inputs and outputs (statistics as buffers)."""

    def __init__(self, n_in, n_out, hidden):
        super().__init__()
        layers, width = [], n_in
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.SiLU()]
            width = h
        layers.append(torch.nn.Linear(width, n_out))
        self.net = torch.nn.Sequential(*layers)
        for name, size in (("x_mean", n_in), ("x_std", n_in)):
            self.register_buffer(name, torch.zeros(size))
        for name, size in (("y_mean", n_out), ("y_std", n_out)):
            self.register_buffer(name, torch.ones(size))
        self.register_buffer("y_min", torch.zeros(n_out))
        self.register_buffer("y_max", torch.zeros(n_out))

    def forward(self, x):
        z = self.net((x - self.x_mean) / self.x_std)
        return z * self.y_std + self.y_mean

    @torch.no_grad()
    def predict(self, x, *, chunk=65536):
        """Outputs for inputs (V, n_in) (numpy), clamped to the range seen in
        training (a network extrapolates badly; the clamp never moves a
        value inside that range)."""
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        out = [self(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
        y = torch.cat(out) if out else torch.zeros(0, self.y_min.numel())
        return torch.maximum(torch.minimum(y, self.y_max), self.y_min).numpy()


def _pool_groups(stat, groups, reduce):
    """Per-column statistics (n_out,) made equal across the matching columns
    of exchangeable groups (fibres), so that a permutation of the groups
    leaves the standardised targets permuted, not changed."""
    if groups is None:
        return stat
    stat = stat.clone()
    stat[groups] = reduce(stat[groups])[None].expand(groups.shape[0], -1)
    return stat


def set_loss(z, y, groups):
    """Mean squared error (per sample) between outputs z and targets y, both
    (B, n_out), invariant to the order of exchangeable groups of columns.

    ``groups`` (F, W) indexes F groups of W columns (one per fibre
    population): the error of the grouped columns is the least over the F!
    assignments of output groups to target groups, so that a network is never
    asked to guess an arbitrary order (label switching), as in set prediction.
    Columns in no group are compared as they are.

    Parameters
    ----------
    z : torch.Tensor, shape (B, n_out)
        The network's outputs.
    y : torch.Tensor, shape (B, n_out)
        The targets.
    groups : torch.Tensor of int, shape (F, W), or None
        Column indices of the exchangeable groups; None: no groups.

    Returns
    -------
    torch.Tensor, shape (B,)
        The mean squared error of every sample.
    """
    if groups is None:
        return ((z - y) ** 2).mean(-1)
    F, W = groups.shape
    free = torch.ones(z.shape[-1], dtype=torch.bool, device=z.device)
    free[groups.flatten()] = False
    loss = ((z[:, free] - y[:, free]) ** 2).sum(-1)
    zg, yg = z[:, groups], y[:, groups]  # (B, F, W)
    pair = ((zg[:, :, None] - yg[:, None]) ** 2).sum(-1)  # (B, F out, F true)
    perms = torch.tensor(list(itertools.permutations(range(F))), device=z.device)
    cost = pair[:, torch.arange(F, device=z.device), perms].sum(-1)  # (B, F!)
    return (loss + cost.amin(-1)) / z.shape[-1]


def train(inputs, targets, options, *, label="regressor", groups=None, augment=None):
    """Train a :class:`Regressor` on (V, n_in) inputs and (V, n_out) targets.

    Adam on the mean squared error of standardised targets (:func:`set_loss`
    when ``groups`` (F, W) of exchangeable columns are given), cosine
    learning rate, a tqdm bar over epochs; the training time is logged and
    printed.

    ``augment(inputs, targets, generator) -> (inputs, targets)``, if given,
    is applied to every batch (and once to the whole set for the
    standardisation statistics): e.g. ``inputs`` are noiseless signals and
    every epoch sees a new noise draw, so the network never fits one noise
    realisation.

    Parameters
    ----------
    inputs : array_like, shape (V, n_in)
        The training inputs (e.g. simulated signals).
    targets : array_like, shape (V, n_out)
        The training targets.
    options : LearnedOptions
        Device, seed, width, batch size, epochs and learning rate.
    label : str, optional
        What is trained, named in the progress bar and the log.
    groups : array_like of int, shape (F, W), optional
        Columns of exchangeable groups (see :func:`set_loss`).
    augment : callable, optional
        ``augment(inputs, targets, generator) -> (inputs, targets)`` applied
        to every batch.

    Returns
    -------
    net : Regressor
        The trained network, on the CPU in eval mode.
    seconds : float
        The training time, s.
    """
    from tqdm.auto import tqdm

    device = check_device(options.device)
    x = torch.as_tensor(inputs, dtype=torch.float32, device=device)
    y = torch.as_tensor(targets, dtype=torch.float32, device=device)
    gen = torch.Generator(device=device).manual_seed(options.seed)
    if augment is None:

        def augment(xb, yb, _):
            return xb, yb

    if groups is not None:
        groups = torch.as_tensor(groups, dtype=torch.long, device=device)
    x_seen, y_seen = augment(x, y, gen)
    # The network's widths are those of the augmented batches (an augment
    # may turn signals into other features).
    # Seeded weights without reseeding the user's global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        net = Regressor(x_seen.shape[1], y_seen.shape[1], options.hidden)
    net = net.to(device)
    net.x_mean.copy_(x_seen.mean(0))
    net.x_std.copy_(x_seen.std(0).clamp_min(1e-6))
    net.y_mean.copy_(_pool_groups(y_seen.mean(0), groups, lambda v: v.mean(0)))
    net.y_std.copy_(
        _pool_groups(
            y_seen.std(0), groups, lambda v: v.pow(2).mean(0).sqrt()
        ).clamp_min(1e-6)
    )
    net.y_min.copy_(_pool_groups(y_seen.amin(0), groups, lambda v: v.amin(0)))
    net.y_max.copy_(_pool_groups(y_seen.amax(0), groups, lambda v: v.amax(0)))
    steps_per_epoch = math.ceil(x.shape[0] / options.batch_size)
    total = steps_per_epoch * options.epochs
    opt = torch.optim.Adam(net.parameters(), lr=options.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, total, eta_min=options.lr * 0.01
    )
    start = time.perf_counter()
    bar = tqdm(range(options.epochs), desc=f"training {label}", leave=False)
    for _ in bar:
        order = torch.randperm(x.shape[0], generator=gen, device=device)
        running = 0.0
        for i in range(0, x.shape[0], options.batch_size):
            idx = order[i : i + options.batch_size]
            xb, yb = augment(x[idx], y[idx], gen)
            z = net.net((xb - net.x_mean) / net.x_std)
            loss = set_loss(z, (yb - net.y_mean) / net.y_std, groups).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            # Summed on the device: .item() every step would wait for it.
            running = running + loss.detach() * idx.numel()
        bar.set_postfix(loss=f"{float(running) / x.shape[0]:.4f}")
    seconds = time.perf_counter() - start
    _report(
        f"trained the {label} on {x.shape[0]} simulated voxels in {seconds:.1f} s "
        f"on {device}"
    )
    net.cpu().eval()
    return net, seconds


def _load(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = Regressor(state["n_in"], state["n_out"], tuple(state["hidden"]))
    net.load_state_dict(state["weights"])
    net.eval()
    return net


def _report(message):
    """Logged and printed: training happens once per protocol, and a user
    waiting on it should see why without configuring logging."""
    message = f"dipy_spinverse: {message}"
    logger.info(message)
    print(message)


def load_or_train(
    key,
    make_training_set,
    options,
    *,
    directory=None,
    label="",
    groups=None,
    augment=None,
    n_inputs=None,
):
    """The cached regressor for ``key``, trained (and saved) if absent.

    Parameters
    ----------
    key : str
        Hash of everything the network depends on
        (:func:`~dipy_spinverse.files.cache_key`).
    make_training_set : callable
        ``() -> (inputs, targets)`` numpy arrays, called only when training.
    options : LearnedOptions
    directory : path-like, optional
        Cache folder (default :func:`cache_dir`).
    label : str, optional
        Prefix of the cache file's name (default ``"regressor"``).
    groups : array_like of int, shape (F, W), optional
        Exchangeable groups of target columns (:func:`set_loss`).
    augment : callable, optional
        Applied to every training batch (:func:`train`).
    n_inputs : int, optional
        The network's input width: a cached file of another width or other
        hidden layers than ``options`` (a file copied in by hand) is trained
        again, as an unreadable one is.

    Returns
    -------
    net : Regressor
    path : Path
        The cache file.
    """
    path = cache_dir(directory) / f"{label or 'regressor'}-{key}.pt"

    def load(path):
        net = _load(path)
        widths = [m.out_features for m in net.net if hasattr(m, "out_features")]
        n_in = net.x_mean.numel()
        if tuple(widths[:-1]) != tuple(options.hidden) or n_inputs not in (None, n_in):
            raise StaleCacheError(
                f"it is not this model's ({n_in} inputs, hidden layers "
                f"{tuple(widths[:-1])}; expected {n_inputs} and "
                f"{tuple(options.hidden)})"
            )
        return net

    def build():
        start = time.perf_counter()
        inputs, targets = make_training_set()
        simulated = time.perf_counter() - start
        # Reported apart from the training's own line: the simulation can take
        # longer than the training (ActiveAx, 2 fibres: 1.7 s against 0.1 s).
        _report(
            f"simulated {len(inputs)} training voxels for the "
            f"{label or 'regressor'} in {simulated:.1f} s"
        )
        net, seconds = train(
            inputs,
            targets,
            options,
            label=label or "regressor",
            groups=groups,
            augment=augment,
        )
        net.timings = dict(train_seconds=seconds, simulate_seconds=simulated)
        return net

    def save(net, tmp):
        torch.save(
            {
                "n_in": net.x_mean.numel(),
                "n_out": net.y_mean.numel(),
                "hidden": list(options.hidden),
                "weights": net.state_dict(),
                **net.timings,
            },
            tmp,
        )

    net = load_or_build(
        path, load=load, build=build, save=save, what="learned estimator"
    )
    return net, path
