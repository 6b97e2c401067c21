"""The benchmarks' shared harness, so that each script holds only its
experiment: the command line every script takes (``--seed`` with the seed
its page was measured with, ``--quick`` for the tests' smoke run and, for
the scripts that keep results, ``--out``), results kept on disk so that a
stopped run resumes, and markdown tables.

A script's ``main`` reads::

    parser = harness.parser(__doc__, seed=0)
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args(argv)
    ...
    print(harness.head(["n", "seconds"], "rr"))
    print(harness.row([n, f"{seconds:.1f}"]), flush=True)

Python puts a script's own folder on the path (``python
benchmarks/<name>.py``), so this module imports as ``harness``.
"""

import argparse
import pathlib

import numpy as np

#: Markdown rule cells: ``-`` as the renderer likes, ``l``/``r``/``c`` aligned.
_RULES = {"-": "---", "l": ":---", "r": "---:", "c": ":---:"}


def parser(
    doc,
    *,
    seed,
    quick="a smoke test, not a measurement",
    seed_help=None,
    out=None,
    out_help="folder of the results kept to resume a run",
):
    """An argument parser described by the first line of ``doc``, with the
    suite's flags.

    Parameters
    ----------
    doc : str
        The script's docstring; its first line describes the command.
    seed : int
        The default of ``--seed``: the seed the page's numbers were measured
        with (keyword-only, so that every script states it).
    quick : str, optional
        The help of ``--quick``, the smoke run the tests make.
    seed_help : str, optional
        The help of ``--seed``.
    out : str, optional
        With it, ``--out`` too, defaulting to it: the folder of the results
        :func:`cached` keeps.
    out_help : str, optional
        The help of ``--out``.

    Returns
    -------
    argparse.ArgumentParser
    """
    made = argparse.ArgumentParser(description=doc.splitlines()[0])
    made.add_argument("--seed", type=int, default=seed, help=seed_help)
    made.add_argument("--quick", action="store_true", help=quick)
    if out is not None:
        made.add_argument("--out", default=out, help=out_help)
    return made


def cached(path, build):
    """The arrays kept at ``path`` (an ``.npz``), or those ``build()``
    returns (a dict of arrays), kept there first, so that a stopped run
    resumes where it stopped.

    The file names what made it (its settings and seed); a file of other
    settings must be another path.
    """
    path = pathlib.Path(path)
    if path.exists():
        with np.load(path) as saved:
            return {name: saved[name] for name in saved.files}
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def row(cells):
    """One markdown table row of ``cells`` (each as ``str`` gives it)."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def rule(align, *, spaced=False):
    """A markdown table's rule, one cell per character of ``align`` (``-``
    plain, ``l``, ``r`` or ``c`` aligned); ``spaced`` as ``| --- |``."""
    try:
        cells = [_RULES[a] for a in align]
    except KeyError:
        raise ValueError(
            f"align={align!r}: use one of {''.join(_RULES)} per column"
        ) from None
    if spaced:
        return row(cells)
    return "|" + "|".join(cells) + "|"


def head(titles, align=None, *, spaced=False):
    """A markdown table's title row and rule, as two lines (``align``: one
    character per column, as :func:`rule`; default all plain)."""
    if align is None:
        align = "-" * len(titles)
    if len(align) != len(titles):
        raise ValueError(
            f"align={align!r} has {len(align)} columns for {len(titles)} titles"
        )
    return row(titles) + "\n" + rule(align, spaced=spaced)


def table(titles, rows, align=None, *, spaced=False):
    """A whole markdown table: :func:`head`, then one :func:`row` a row."""
    return "\n".join([head(titles, align, spaced=spaced)] + [row(r) for r in rows])
