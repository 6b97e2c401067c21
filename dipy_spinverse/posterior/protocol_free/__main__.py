"""``python -m dipy_spinverse.posterior.protocol_free train --out DIR``: make
the shipped protocol-free estimator again (:func:`.shipped.train_shipped`)
and write ``DIR/posterior-<key>-<code>.pt`` for ``python -m
dipy_spinverse.posterior ship``."""

import argparse
import pathlib
import sys

from .shipped import train_shipped


def main(argv=None):
    """The command line: ``train --out DIR``; exit status 0."""
    parser = argparse.ArgumentParser(
        prog="python -m dipy_spinverse.posterior.protocol_free",
        description="Train the shipped protocol-free posterior estimator.",
    )
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--out", required=True, type=pathlib.Path)
    args = parser.parse_args(argv)
    print(f"wrote {train_shipped(args.out)}")
    return 0


if __name__ == "__main__":  # not when imported (the docstring checks walk it)
    sys.exit(main())
