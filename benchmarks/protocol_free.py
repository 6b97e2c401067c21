"""Regenerates the tables of doc/validation/protocol_free.md.

Can one estimator serve protocols it was not trained on? A first
measurement of issue 72's protocol-free estimator, before any is shipped.

Design: a protocol is a set of *shells*, each one timing (delta, Delta)
and one b-value played along several directions. A shell is summarised by
what does not depend on the tissue's orientation: the rotation invariants
of its signal's even spherical harmonics, ``p_l = sum_m c_lm^2`` for
l = 0, 2, 4 (as ``sqrt``), with its b, delta and Delta. A set encoder
(one network per shell, with the noise level; one self-attention layer
across the shells; two learned queries attending over them, with the log
of the number of shells; another network: a small Set Transformer, Lee et
al. 2019) turns any number of shells, in any order, into the context of a
neural spline flow (zuko) over the tissue's orientation-free descriptors.
``--pooling`` picks another way to pool the shells (``mean``: the first
design's DeepSets mean, Zaheer et al. 2017; see :class:`SetEstimator`).

Training data: ``--unions`` random protocols ("unions") of ``--shells``
shells, each drawn from the design distribution (b 200-10,000 s/mm^2,
delta 3-40 ms, Delta 10-120 ms and at least delta + 1 ms, ``--directions``
directions a shell), each with ``--n`` draws of the default prior
(``TissuePrior()``); each training example is one draw seen through a
random subset of its union's shells (2 up to all), with Rician noise at a
b = 0 SNR drawn log-uniformly from 20-200.

Test: one more union, held out (its shells and its draws never seen in
training), read through its first 4, 8 and all of its shells. The
reference for each subset is a *per-protocol* estimator of the same
architecture trained on that fixed protocol with as many draws as the
protocol-free one saw (``--unions`` times ``--n``, simulated on it).
Reported on ``--test`` further draws: the coverage of the 90 % intervals
and their median width (in the flow's coordinates: log or logit), for
each descriptor, for both estimators, and the ratio of the widths.
``--train_seed`` reseeds the networks, the noise and the shell subsets
only (the protocols and the simulations, kept in ``--out``, follow
``--seed``).

Run (simulations are kept in ``--out`` and resumed)::

    OPENBLAS_NUM_THREADS=1 python benchmarks/protocol_free.py

``--quick``: 2 unions of 5 shells, a few draws, no meaning.
"""

import copy
import pathlib
import time

import harness
import numpy as np
import torch
from dipy.core.sphere import cart2sphere
from dipy.reconst.shm import real_sh_descoteaux

from dipy_spinverse.posterior import TissuePrior
from dipy_spinverse.posterior.protocol_free import random_union

#: The orientation-free descriptors the flow models, and their transforms.
DESCRIPTORS = {
    "restricted_fraction": "logit",
    "cell_diameter": "log",
    "permeability": "log",
    "exchange_time": "log",
    "surface_to_volume": "log",
}
SH_ORDER = 4
SNR = (20.0, 200.0)


# -- protocols ----------------------------------------------------------------
# random_union: the package's (the shipped estimator's training unions are
# these, drawn from the same seeds).


def shell_tokens(protocol, shell, signals):
    """Per shell: (b / 1000, delta / 10 ms, Delta / 100 ms, sqrt p_0, sqrt
    p_2, sqrt p_4) of ``signals`` (n, n_acquisitions): (n, n_shells, 6)."""
    tokens = []
    for s in np.unique(shell):
        rows = np.flatnonzero(shell == s)
        _, theta, phi = cart2sphere(*protocol.bvecs[rows].T)
        basis, _, n = real_sh_descoteaux(SH_ORDER, theta, phi, legacy=False)
        coef = np.linalg.lstsq(basis, signals[:, rows].T, rcond=None)[0].T
        power = [np.sqrt((coef[:, n == order] ** 2).sum(1)) for order in (0, 2, 4)]
        w = protocol.waveforms[rows[0]]
        timing = [protocol.bvals[rows[0]] / 1e3, w.small_delta / 1e-2]
        timing.append(w.big_delta / 1e-1)
        tokens.append(np.column_stack([np.tile(timing, (len(signals), 1)), *power]))
    return np.stack(tokens, axis=1)


def rician(signals, rng):
    """Rician magnitudes at a b = 0 SNR drawn log-uniformly from ``SNR``,
    and each row's relative noise level."""
    sigma = 1.0 / np.exp(rng.uniform(*np.log(SNR), size=(len(signals), 1)))
    real = signals + sigma * rng.standard_normal(signals.shape)
    imag = sigma * rng.standard_normal(signals.shape)
    return np.hypot(real, imag), sigma[:, 0]


def coordinates(truth):
    """The flow's coordinates of :data:`DESCRIPTORS` (n, k)."""
    out = []
    for name, transform in DESCRIPTORS.items():
        v = np.asarray(truth[name], dtype=float)
        out.append(np.log(v / (1 - v)) if transform == "logit" else np.log(v))
    return np.column_stack(out)


# -- estimators ---------------------------------------------------------------
class _Flow(torch.nn.Module):
    """A neural spline flow (zuko) over the targets, conditioned on
    :meth:`context`."""

    def __init__(self, n_targets, width, context):
        import zuko

        super().__init__()
        self.flow = zuko.flows.NSF(
            n_targets, context=context, transforms=4, hidden_features=(width, width)
        )

    def distribution(self, *inputs):
        return self.flow(self.context(*inputs))


class SetEstimator(_Flow):
    """The protocol-free estimator: a set encoder over shell tokens.

    ``pooling`` is how the shells' features (one network per shell) become
    one vector: ``mean`` (DeepSets; it hides how many shells there are),
    ``count`` (the mean and the log of the number of shells), ``sum`` (the
    sum over 16 shells), ``mean+sum`` (both), ``attention`` (two learned
    queries attending over the shells, 4 heads, with the log count: a
    Set Transformer's pooling by multi-head attention, Lee et al. 2019) or
    ``transformer`` (one self-attention layer across the shells first,
    then that pooling)."""

    POOLINGS = ("mean", "count", "sum", "mean+sum", "attention", "transformer")

    def __init__(self, n_token, n_targets, width=96, context=32, pooling="transformer"):
        super().__init__(n_targets, width, context)
        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling {pooling!r} not in {self.POOLINGS}")
        self.pooling = pooling
        self.phi = _mlp(n_token + 1, width, width)
        pooled = {
            "mean": width,
            "count": width + 1,
            "sum": width,
            "mean+sum": 2 * width,
            "attention": 2 * width + 1,
            "transformer": 2 * width + 1,
        }
        if pooling in ("attention", "transformer"):
            self.queries = torch.nn.Parameter(0.1 * torch.randn(2, width))
            self.attend = torch.nn.MultiheadAttention(width, 4, batch_first=True)
        if pooling == "transformer":
            self.mix = torch.nn.TransformerEncoderLayer(
                width, 4, 2 * width, dropout=0.0, batch_first=True
            )
        self.rho = _mlp(pooled[pooling] + 1, width, context)

    def context(self, tokens, mask, log_sigma):
        """``tokens`` (B, S, T) with ``mask`` (B, S) of shells present."""
        noise = log_sigma[:, None, None].expand(*tokens.shape[:2], 1)
        h = self.phi(torch.cat([tokens, noise], -1)) * mask[..., None]
        count = mask.sum(1, keepdim=True)
        total = h.sum(1)
        if self.pooling == "mean":
            pooled = [total / count]
        elif self.pooling == "count":
            pooled = [total / count, torch.log(count)]
        elif self.pooling == "sum":
            pooled = [total / 16]
        elif self.pooling == "mean+sum":
            pooled = [total / count, total / 16]
        else:
            if self.pooling == "transformer":
                h = self.mix(h, src_key_padding_mask=mask < 0.5) * mask[..., None]
            queries = self.queries.expand(len(h), -1, -1)
            attended, _ = self.attend(queries, h, h, key_padding_mask=mask < 0.5)
            pooled = [attended.flatten(1), torch.log(count)]
        return self.rho(torch.cat([*pooled, log_sigma[:, None]], -1))


class SignalEstimator(_Flow):
    """The per-protocol reference: every acquisition's signal, as the
    package's :class:`~dipy_spinverse.posterior.estimator.
    PosteriorEstimator` embeds them (orientation included)."""

    def __init__(self, n_inputs, n_targets, width=96, context=32):
        super().__init__(n_targets, width, context)
        self.embed = _mlp(n_inputs + 1, 2 * width, context)

    def context(self, signals, log_sigma):
        return self.embed(torch.cat([signals, log_sigma[:, None]], -1))


def _mlp(n_in, width, n_out):
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, width),
        torch.nn.SiLU(),
        torch.nn.Linear(width, width),
        torch.nn.SiLU(),
        torch.nn.Linear(width, n_out),
    )


def fit(model, inputs, y, *, epochs, seed, random_mask=None, batch=256, lr=2e-3):
    """Adam on the flow's negative log-likelihood of ``y`` given ``inputs``
    (arrays of one length), stopped early: a tenth of the draws is held
    out and the state of least held-out loss kept (as the package's
    training does; a flow trained on a few thousand draws past it grows
    overconfident). ``random_mask(rng, n)`` replaces the second input of
    every batch (the shells a set estimator sees; fixed per held-out draw).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    held, kept = order[: len(y) // 10], order[len(y) // 10 :]
    check = [a[held] for a in inputs]
    if random_mask is not None:
        check[1] = random_mask(rng, len(held))
    check, check_y = _tensors(check), _tensors([y[held]])[0]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    best, state = np.inf, None
    for _ in range(epochs):
        model.train()
        order = rng.permutation(kept)
        for lo in range(0, len(order), batch):
            rows = order[lo : lo + batch]
            xs = [a[rows] for a in inputs]
            if random_mask is not None:
                xs[1] = random_mask(rng, len(rows))
            loss = -model.distribution(*_tensors(xs)).log_prob(_tensors([y[rows]])[0])
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            loss = -float(model.distribution(*check).log_prob(check_y).mean())
        if loss < best:
            best, state = loss, copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    return model


def _tensors(arrays):
    return [torch.as_tensor(a, dtype=torch.float32) for a in arrays]


def intervals(model, inputs, n=400, level=0.9):
    """Each target's central ``level`` interval (n_voxels, k) twice."""
    with torch.no_grad():
        draws = model.distribution(*_tensors(inputs)).sample((n,))
    lo, hi = np.quantile(draws.numpy(), [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


# -- the measurement ----------------------------------------------------------
def simulated(out, u, protocol, n, seed):
    def build():
        start = time.perf_counter()
        signals, truth = TissuePrior().simulator(protocol).sample(n, seed=seed)
        seconds = time.perf_counter() - start
        print(f"union {u}: {n} draws in {seconds:.0f} s", flush=True)
        return dict(signals=signals, y=coordinates(truth))

    saved = harness.cached(pathlib.Path(out) / f"union{u}-{n}-{seed}.npz", build)
    return saved["signals"], saved["y"]


def standardised(tokens, y, stats=None):
    if stats is None:
        flat = tokens.reshape(-1, tokens.shape[-1])
        stats = (flat.mean(0), flat.std(0) + 1e-8, y.mean(0), y.std(0))
    tm, ts, ym, ys = stats
    return (tokens - tm) / ts, (y - ym) / ys, stats


def main(argv=None):
    parser = harness.parser(
        __doc__,
        seed=0,
        quick="2 unions of 5 shells, a few draws, no meaning",
        out="protocol_free",
    )
    parser.add_argument("--unions", type=int, default=6)
    parser.add_argument("--shells", type=int, default=16)
    parser.add_argument("--directions", type=int, default=20)
    parser.add_argument("--n", type=int, default=400, help="draws a union")
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument(
        "--train_seed",
        type=int,
        default=None,
        help="seeds the networks, the noise and the shell subsets "
        "(default --seed); the protocols and simulations keep --seed",
    )
    parser.add_argument(
        "--pooling", default="transformer", choices=SetEstimator.POOLINGS
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.unions, args.shells, args.n, args.test, args.epochs = 2, 5, 16, 8, 2
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    unions = [
        random_union(rng, args.shells, args.directions) for _ in range(args.unions + 1)
    ]
    seed = args.seed if args.train_seed is None else args.train_seed
    noise_rng = rng if seed == args.seed else np.random.default_rng([seed, args.seed])
    sizes = [args.n] * args.unions + [args.n * args.unions + args.test]
    data = []
    for u, ((protocol, shell), n) in enumerate(zip(unions, sizes, strict=True)):
        signals, y = simulated(args.out, u, protocol, n, args.seed + 1 + u)
        noisy, sigma = rician(signals, noise_rng)
        tokens = shell_tokens(protocol, shell, noisy)
        data.append((tokens, np.log(sigma), y, noisy))
    # The last union is held out: its first draws train the per-protocol
    # references, the last ``--test`` test both estimators.
    tokens, log_sigma, y = (np.concatenate([d[i] for d in data[:-1]]) for i in range(3))
    tokens, y, stats = standardised(tokens, y)
    n_shells = tokens.shape[1]

    def random_mask(rng, n):
        k = rng.integers(2, n_shells + 1, size=n)
        return rng.random((n, n_shells)).argsort(1) < k[:, None]

    start = time.perf_counter()
    free = fit(
        SetEstimator(tokens.shape[-1], y.shape[1], pooling=args.pooling),
        (tokens, np.ones(tokens.shape[:2]), log_sigma),
        y,
        epochs=args.epochs,
        seed=seed,
        random_mask=random_mask,
    )
    print(f"protocol-free estimator trained in {time.perf_counter() - start:.0f} s")

    held_tokens, held_sigma, held_y, held_signals = data[-1]
    held_tokens, held_y, _ = standardised(held_tokens, held_y, stats)
    train, test = (
        slice(0, len(held_y) - args.test),
        slice(len(held_y) - args.test, None),
    )
    shell = unions[-1][1]
    titles = ["shells", "volumes", "estimator"]
    titles += [t for d in DESCRIPTORS for t in (f"{d} coverage", "width")]
    print(harness.head(titles, "rr-" + "rr" * len(DESCRIPTORS)))
    ratios = {}
    for k in sorted({min(k, n_shells) for k in (4, 8, n_shells)}):
        seen = np.arange(n_shells) < k
        mask = np.tile(seen, (len(held_y), 1)).astype(float)
        volumes = shell < k
        signals = held_signals[:, volumes]
        mean, std = signals[train].mean(0), signals[train].std(0) + 1e-8
        signals = (signals - mean) / std
        start = time.perf_counter()
        own = fit(
            SignalEstimator(volumes.sum(), y.shape[1]),
            (signals[train], held_sigma[train]),
            held_y[train],
            epochs=args.epochs,
            seed=seed,
        )
        seconds = time.perf_counter() - start
        print(f"per-protocol estimator ({k} shells) in {seconds:.0f} s")
        truth = held_y[test]
        widths = []
        for name, model, inputs in (
            ("protocol-free", free, (held_tokens[test], mask[test], held_sigma[test])),
            ("per-protocol", own, (signals[test], held_sigma[test])),
        ):
            lo, hi = intervals(model, inputs)
            inside = ((truth >= lo) & (truth <= hi)).mean(0)
            width = np.median(hi - lo, axis=0) * stats[3]
            pairs = zip(inside, width, strict=True)
            cells = [f"{v:.2f}" for pair in pairs for v in pair]
            print(harness.row([k, volumes.sum(), name, *cells]), flush=True)
            widths.append(width)
        ratios[k] = widths[0] / widths[1]
    print("\nWidth ratio, protocol-free / per-protocol:\n")
    print(harness.head(["shells", *DESCRIPTORS], "r" * (len(DESCRIPTORS) + 1)))
    for k, ratio in ratios.items():
        print(harness.row([k, *(f"{r:.2f}" for r in ratio)]))


if __name__ == "__main__":
    main()
