"""Regenerates the tables of doc/validation/generalisation.md.

``--quick``: 16 substrates, 2 epochs; about 1.5 minutes on 2 cores, simulating
the published protocol (-m slow).

Training cost and accuracy of the learned proposal on the published problem.

Trains the proposal network (:mod:`dipy_spinverse.inverse.proposal`) for the
published grid (576 cells) and protocol (3 PGSE sequences, 540 volumes), or
loads it from the cache, and prints a table: substrates simulated, time to
simulate them, total training time, and the validation scores (median
twin-aware IoU of the occupancy cut at 0.5, noise-free and at SNR 50; median
absolute error of log10 permeability).

    python benchmarks/proposal_training.py --substrates 4000 --cache /tmp/cache
"""

import argparse
import os
import platform
import time

import torch

from dipy_spinverse import TetGrid, published_protocol
from dipy_spinverse.inverse.proposal import ProposalSettings, load_or_train_proposal


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--substrates", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--cache", default=None, help="cache folder")
    parser.add_argument(
        "--quick", action="store_true", help="16 substrates, 2 epochs (a smoke test)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.substrates, args.epochs = 16, 2

    grid = TetGrid.bcc(80 / 3, 4)
    protocol = published_protocol()
    settings = ProposalSettings(n_substrates=args.substrates, epochs=args.epochs)
    start = time.perf_counter()
    proposal = load_or_train_proposal(
        grid, protocol, settings=settings, cache_dir=args.cache
    )
    wall = time.perf_counter() - start
    meta = proposal.metadata
    print(
        f"published grid and protocol, {platform.machine()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; this call {wall:.1f} s (cache key "
        f"{proposal.key})"
    )
    print(
        "| substrates | epochs | simulate (s) | train total (s) | IoU clean | "
        "IoU SNR 50 | log10 kappa MAE clean | log10 kappa MAE SNR 50 |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {args.substrates} | {args.epochs} | {meta['simulate_s']} | "
        f"{meta['train_s']} | {meta['val_iou_clean']} | {meta['val_iou_snr50']} | "
        f"{meta['val_log_kappa_mae_clean']} | {meta['val_log_kappa_mae_snr50']} |"
    )


if __name__ == "__main__":
    main()
