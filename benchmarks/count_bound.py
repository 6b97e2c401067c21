"""How well can any rule count NODDI fibres on the benchmark's voxels?

``compartments.py --fibres`` scores ``NoddiModel(fibres="auto")`` (forward
selection by a penalised likelihood) on voxels with 0-3 fibres at SNR 30.
This script measures what the data allow, whatever the rule: a classifier
trained on signals drawn from the *benchmark's own* voxel distribution (the
same weights, dispersions, free water and crossing angles as
``compartments.crossing_voxels``, noise at SNR 30 drawn anew for every
batch) approximates the Bayes classifier of that distribution, the best
accuracy any count rule can reach on it. It is an oracle: a model fitted to
real data does not know the distribution its voxels come from, so it is a
bound, not a method.

The classifier sees each voxel's signals in its own frame (the inputs of
the learned NODDI estimator, ``compartments.frames``), three hidden layers
of 256, 240,000 training voxels (60,000 per count, seeds 10-13) and 30
epochs; it is scored on the benchmark's voxels of seeds 0, 1 (the count
rule's tuning and report seeds) and 2.

    PYTHONPATH=. python benchmarks/count_bound.py                  # 93 vol
    PYTHONPATH=. python benchmarks/count_bound.py --protocol hcp   # 276 vol
    PYTHONPATH=. python benchmarks/count_bound.py --protocol multishell  # 366
"""

import argparse
import os
import time

# Passive OpenMP waiting must be set before torch is imported (see
# compartments.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from compartments import (  # noqa: E402
    MIN_CROSSING_DEG,
    count_table,
    crossing_voxels,
    describe,
    fibre_protocol,
)

from dipy_spinverse.compartments import NoddiModel  # noqa: E402

SNR = 30.0
N_COUNTS = 4
HIDDEN = 256


def training_signals(gtab, n_per_count, seed):
    """Noiseless b0-normalised signals (4 n, M) and their counts, drawn as the
    benchmark draws its voxels (``crossing_voxels`` with no noise)."""
    signals, counts = [], []
    for k in range(N_COUNTS):
        rng = np.random.default_rng(seed + k)
        clean, _, _ = crossing_voxels(gtab, np.full(n_per_count, k), rng, np.inf)
        signals.append(clean / clean[:, gtab.b0s_mask].mean(-1, keepdims=True))
        counts.append(np.full(n_per_count, k))
    return torch.as_tensor(np.concatenate(signals)), torch.as_tensor(
        np.concatenate(counts)
    )


def rician(clean, generator):
    """Rician noise at SNR 30 of the b = 0 signal (clean signals have b0 1);
    :meth:`Classifier.features` then divides by the noisy b = 0 mean, as a
    fit normalises data."""
    like = {"generator": generator, "dtype": clean.dtype}
    real = clean + torch.randn(clean.shape, **like) / SNR
    return torch.hypot(real, torch.randn(clean.shape, **like) / SNR)


class Classifier:
    """An MLP on the voxels' frame features (standardised), 4 classes."""

    def __init__(self, gtab):
        self.frame = NoddiModel(gtab, n_fibres=3)._signal_frame
        self.b0s = torch.as_tensor(np.asarray(gtab.b0s_mask, dtype=bool))
        self.mu = self.sd = self.net = None

    def features(self, signals):
        y = torch.as_tensor(signals, dtype=torch.float64)
        y = y / y[:, self.b0s].mean(-1, keepdim=True)
        inputs = self.frame.features(y)[0].float()
        return inputs if self.mu is None else (inputs - self.mu) / self.sd

    def train(self, signals, counts, *, epochs, batch=512, seed=0):
        generator = torch.Generator().manual_seed(seed)
        sample = signals[torch.randperm(len(signals), generator=generator)[:20000]]
        raw = self.features(rician(sample, generator))
        self.mu, self.sd = raw.mean(0), raw.std(0) + 1e-6
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(raw.shape[1], HIDDEN),
            torch.nn.SiLU(),
            torch.nn.Linear(HIDDEN, HIDDEN),
            torch.nn.SiLU(),
            torch.nn.Linear(HIDDEN, HIDDEN),
            torch.nn.SiLU(),
            torch.nn.Linear(HIDDEN, N_COUNTS),
        )
        opt = torch.optim.Adam(self.net.parameters(), 2e-3)
        steps = epochs * (len(signals) // batch)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, 2e-5)
        for epoch in range(epochs):
            order = torch.randperm(len(signals), generator=generator)
            total = 0.0
            for i in range(0, len(signals) - batch + 1, batch):
                idx = order[i : i + batch]
                with torch.no_grad():
                    x = self.features(rician(signals[idx], generator))
                loss = torch.nn.functional.cross_entropy(self.net(x), counts[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
                total += loss.item()
            print(f"epoch {epoch + 1}: loss {total / (len(signals) // batch):.4f}")

    def counts(self, data):
        with torch.no_grad():
            return self.net(self.features(data)).argmax(-1).numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--protocol", choices=("noddi", "hcp", "multishell"), default="noddi"
    )
    parser.add_argument("--n-train", type=int, default=60_000, help="per count")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gtab = fibre_protocol(args.protocol)
    start = time.perf_counter()
    signals, counts = training_signals(gtab, args.n_train, seed=10)
    simulated = time.perf_counter() - start
    classifier = Classifier(gtab)
    classifier.train(signals, counts, epochs=args.epochs)
    trained = time.perf_counter() - start - simulated
    print(
        f"\nOracle count classifier, protocol {args.protocol} ({describe(gtab)}), "
        f"SNR {SNR:g}, crossings >= {MIN_CROSSING_DEG:g} degrees; "
        f"{4 * args.n_train} training voxels, {args.epochs} epochs "
        f"(simulate {simulated:.0f} s, train {trained:.0f} s)\n"
    )
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        truth = np.repeat(np.arange(N_COUNTS), 50)
        data, _, _ = crossing_voxels(gtab, truth, rng, SNR)
        tic = time.perf_counter()
        found = classifier.counts(data)
        wall = time.perf_counter() - tic
        label = f"Oracle classifier, protocol {args.protocol}"
        print("\n".join(count_table(label, gtab, truth, found, wall, seed)) + "\n")


if __name__ == "__main__":
    main()
