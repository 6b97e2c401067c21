"""Regenerates the tables of doc/validation/sections.md.

``--quick``: a training of 64 simulations and one epoch on the demo's protocol;
its time means nothing, and a real measurement is the training itself (-m
slow).

How long the posterior estimator takes to train, per protocol (issues 44, 58).

Trains, with ``--prior demo``, the README demo's estimator
(``data.DEMO_PRIOR``, cells of 8-25 um, periodic tissue or a closed box,
with ``data.DEMO_TRAINING``: 4,000 simulations at resolution 3, 1,000 more
to calibrate on, 64 pairs at resolution 6 for the grid-error model, 40
epochs), or with ``--prior default`` the default one (``TissuePrior()``,
white matter's axons of 1-25 um, with
``posterior.default_training``: 10,000 simulations, 1,000 to calibrate
on, 64 pairs at resolution 12), from scratch on each protocol asked for:

``demo``
    the demo's 99 volumes (three PGSE timings, as ``dipy_fit_spinverse``
    reads them from ``demo/``); target 30 minutes on 2 CPU cores;
``published``
    the Spinverse paper's 540 volumes
    (:func:`~dipy_spinverse.sim.sequences.published_protocol`); target 90
    minutes on 2 CPU cores;
``hcp``
    the HCP-style 288 volumes (:func:`~dipy_spinverse.sim.sequences.hcp_protocol`);
    target 90 minutes on 2 CPU cores.

Where the package ships an estimator of that key (which would be read
instead of trained), the training seed is moved by one: a new key at the same
cost. Prints, per protocol, the time the package announced before it started
and the time it took. ``--cache_dir`` keeps the trained files (a temporary
folder otherwise); the shipped default estimator was made with::

    python benchmarks/posterior_training_time.py --prior default --protocol demo \
        --cache_dir trained
    cp trained/posterior-*.pt dipy_spinverse/posterior/trained/

Run::

    python benchmarks/posterior_training_time.py --protocol published
    python benchmarks/posterior_training_time.py --prior default --protocol hcp
"""

import argparse
import logging
import platform
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
from dipy.core.gradients import gradient_table
from dipy.utils.logging import logger
from surface_check import _demo_protocol

from dipy_spinverse.data import DEMO_PRIOR, DEMO_TRAINING
from dipy_spinverse.posterior import (
    SHIPPED,
    TissuePrior,
    default_training,
    estimator_key,
    load_or_train,
)
from dipy_spinverse.sim.sequences import (
    Protocol,
    as_protocol,
    hcp_protocol,
    published_protocol,
)

TARGET_MINUTES = {"demo": 30, "published": 90, "hcp": 90}


def _as_a_users_table(protocol):
    """``protocol`` as ``SpinverseModel`` reads it from a DIPY gradient
    table: the estimator's key hashes the directions' bytes, and the table
    renormalises them (1e-16 apart), so a Protocol's own key would not be
    the one a user's table looks up."""
    small = np.array([w.small_delta for w in protocol.waveforms])
    big = np.array([w.big_delta for w in protocol.waveforms])
    table = gradient_table(
        protocol.bvals, bvecs=protocol.bvecs, small_delta=small, big_delta=big
    )
    return Protocol.from_gtab(table)


PROTOCOLS = {
    # The demo's protocol as the workflow reads it from its files.
    "demo": lambda: _demo_protocol()[0],
    "published": lambda: _as_a_users_table(published_protocol()),
    "hcp": lambda: _as_a_users_table(hcp_protocol()),
}


class Announced(logging.Handler):
    """Keeps the package's announcement of the training time."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Training the Spinverse posterior"):
            self.messages.append(message)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--protocol", nargs="+", choices=tuple(TARGET_MINUTES), default=["published"]
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prior", choices=("demo", "default"), default="demo")
    parser.add_argument("--cache_dir", default=None, help="keep the estimators here")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test, not a measurement"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    handler = Announced()
    logger.addHandler(handler)  # the package logs through DIPY's logger
    if args.prior == "demo":
        prior, options = DEMO_PRIOR, DEMO_TRAINING
    else:
        prior = TissuePrior()
        options = default_training(prior)
    if args.quick:  # a few simulations and one epoch: times nothing useful
        args.protocol = ["demo"]
        options = replace(
            options, n_simulations=64, epochs=1, n_calibration=16, n_reference=4
        )
    rows = []
    for name in args.protocol:
        protocol = as_protocol(PROTOCOLS[name]())
        trained = options
        if (
            SHIPPED / f"posterior-{estimator_key(prior, protocol, options)}.pt"
        ).exists():
            trained = replace(options, seed=options.seed + 1)
        with tempfile.TemporaryDirectory() as scratch:
            start = time.perf_counter()
            load_or_train(prior, protocol, trained, cache_dir=args.cache_dir or scratch)
            minutes = (time.perf_counter() - start) / 60
        rows.append((name, len(protocol), minutes))
        print(handler.messages[-1] if handler.messages else "(no announcement)")
    print(
        f"\n{platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; prior {prior!r}; {options!r} (seed moved by one "
        "where an estimator of that key ships)"
    )
    print("| protocol | volumes | training (min) | target (min) |")
    print("| --- | ---: | ---: | ---: |")
    for name, volumes, minutes in rows:
        print(f"| {name} | {volumes} | {minutes:.1f} | {TARGET_MINUTES[name]} |")


if __name__ == "__main__":
    main()
