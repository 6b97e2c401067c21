"""Provenance: the digest of the code that makes a trained artefact.

Every estimator the package trains once and keeps (posterior estimators,
learned proposals, approximation-error estimates, shape autoencoders,
learned compartment networks) is cached under a key of what it depends on.
Its settings are in the key; so is :func:`code_digest`, a hash of the source
text of the modules that train it: the modules its training entry point
imports, followed through the package's own imports (relative or absolute,
at module level or inside functions). It is computed, never typed: a change
to the simulator, the prior, the descriptors or the training code gives
another key, and a cache file made by other code is never read.

What is hashed, and why so:

- The code of each file (:func:`code_text`): its text without docstrings
  (every statement that is a bare string), comments, blank lines and
  trailing spaces, its line endings made ``\\n``. Two texts that differ only
  there run the same, so a docstring or comment edit moves no key; any
  other edit (a constant, a name, an argument's default) does. The spans
  are found by Python's parser and tokenizer and cut from the text itself
  (not an AST or token dump, which would change with the Python version),
  so the same checkout gives the same digest on every machine and Python
  version. A key that moves means a cache entry is trained again and a
  shipped estimator must be re-keyed on purpose
  (:mod:`dipy_spinverse.posterior.shipped`): one command.
- Files in the order of their paths relative to the package, each prefixed
  by that path: renaming a module is a change.
- Not followed: modules that shape no trained artefact (:data:`NOT_TRAINING`:
  argument checks, files and caches, clusters, lazy imports, this module),
  and what a caller excludes (a checkpoint of simulations, say). Parent
  packages' ``__init__`` files are not followed either (they re-export
  names) unless a module imports from them.
"""

import ast
import functools
import hashlib
import io
import pathlib
import tokenize

__all__ = [
    "code_digest",
    "code_text",
    "code_sources",
    "source_digests",
    "package_imports",
    "StaleEstimatorWarning",
    "NOT_TRAINING",
    "DIGEST_LENGTH",
]

#: The package's folder; module names are relative to it (``"sim.forward"``).
PACKAGE = pathlib.Path(__file__).resolve().parent

#: Modules whose code shapes no trained artefact: checks of arguments, the
#: cache's files and locks, where simulations run (a cluster gives the same
#: signals), lazy imports, and this digest itself.
NOT_TRAINING = ("lazy", "checks", "files", "clusters", "provenance")

#: Hex digits of a digest (64 bits: no two versions of the code collide).
DIGEST_LENGTH = 16


class StaleEstimatorWarning(UserWarning):
    """A shipped estimator that other code trained, and that no re-key
    accepts for this code: it is not used (the estimator is trained into
    the cache instead). The test suite turns it into an error, so that a
    test fails at once instead of training for minutes."""


def code_sources(*roots, exclude=()):
    """The source files of ``roots`` and of every module they import.

    Parameters
    ----------
    *roots : str
        Modules of the package (``"inverse.approximation"``; a package by its
        name, ``"posterior"``, is its ``__init__``), with or without the
        leading ``"dipy_spinverse."``.
    exclude : iterable of str
        Modules neither hashed nor followed, besides :data:`NOT_TRAINING`.

    Returns
    -------
    tuple of str
        Paths relative to the package folder (``"sim/forward.py"``), sorted.

    Raises
    ------
    ValueError
        When a root is not a module of the package.
    """
    return _closure(tuple(_relative(r) for r in roots), frozenset(exclude))


def code_digest(*roots, exclude=()):
    """Hash of the source text of ``roots`` and of every module they import.

    See the module's documentation for what is hashed. Computed once per
    process and arguments (the code a process runs is the code it imported).

    Parameters
    ----------
    *roots : str
        As :func:`code_sources`.
    exclude : iterable of str
        As :func:`code_sources`.

    Returns
    -------
    str
        :data:`DIGEST_LENGTH` hex digits of a SHA-256 digest.

    Examples
    --------
    >>> len(code_digest("sim.grid"))
    16
    >>> code_digest("sim.grid") == code_digest("dipy_spinverse.sim.grid")
    True
    """
    return _digest(tuple(_relative(r) for r in roots), frozenset(exclude))


def source_digests(*roots, exclude=()):
    """The digest of each file of :func:`code_sources`, to tell which changed.

    Parameters
    ----------
    *roots : str
    exclude : iterable of str
        As :func:`code_sources`.

    Returns
    -------
    dict of str to str
        Path relative to the package -> :data:`DIGEST_LENGTH` hex digits of
        the SHA-256 of its text (line endings made ``\\n``).
    """
    return {
        relative: hashlib.sha256(code_text(relative)).hexdigest()[:DIGEST_LENGTH]
        for relative in code_sources(*roots, exclude=exclude)
    }


@functools.cache
def _digest(roots, exclude):
    digest = hashlib.sha256()
    for relative in _closure(roots, exclude):
        text = code_text(relative)
        digest.update(f"{relative}\0{len(text)}\0".encode())
        digest.update(text)
    return digest.hexdigest()[:DIGEST_LENGTH]


def _text(relative):
    """A source file's bytes, its line endings ``\\n`` (as git may check
    them out as ``\\r\\n`` on another system)."""
    text = (PACKAGE / relative).read_bytes()
    return text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def code_text(relative):
    """The code of a source file of the package, as it is hashed.

    Its text without docstrings (every expression statement that is a
    string constant: it does nothing), comments, blank lines and trailing
    spaces, line endings ``\\n``. Docstrings are found by the parser and
    comments by the tokenizer; their spans are cut from the text itself.

    Parameters
    ----------
    relative : str
        The file's path relative to the package (``"sim/forward.py"``).

    Returns
    -------
    bytes
        UTF-8.

    Examples
    --------
    >>> len(code_text("sim/grid.py")) < len((PACKAGE / "sim/grid.py").read_bytes())
    True
    """
    source = _text(relative).decode("utf-8")
    lines = source.split("\n")
    spans = []  # (first line, first column, last line, end column), 0-based
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            # The parser's columns count UTF-8 bytes; the lines are text.
            first, last = node.lineno - 1, node.end_lineno - 1
            spans.append(
                (
                    first,
                    _characters(lines[first], node.col_offset),
                    last,
                    _characters(lines[last], node.end_col_offset),
                )
            )
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            (first, start), (last, end) = token.start, token.end
            spans.append((first - 1, start, last - 1, end))
    for first, start, last, end in sorted(spans, reverse=True):
        lines[first : last + 1] = [lines[first][:start] + lines[last][end:]]
    kept = [line.rstrip() for line in lines if line.strip()]
    return ("\n".join(kept) + "\n").encode("utf-8")


def _characters(line, n_bytes):
    """The number of characters of ``line`` in its first ``n_bytes`` UTF-8
    bytes."""
    return len(line.encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore"))


def _relative(name):
    """A module name relative to the package."""
    return name.removeprefix(PACKAGE.name + ".")


@functools.cache
def _closure(roots, exclude):
    skip = set(NOT_TRAINING) | set(exclude)
    for name in roots:
        if _path(name) is None:
            raise ValueError(
                f"{name!r} is not a module of {PACKAGE.name} (looked for it "
                f"in {PACKAGE}); name a module such as 'sim.forward'."
            )
    seen, todo = set(), [name for name in roots if name not in skip]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [m for m in _imports(name) if m not in seen and m not in skip]
    files = {_path(name).relative_to(PACKAGE).as_posix() for name in seen}
    return tuple(sorted(files))


def _path(name):
    """The source file of module ``name`` (relative dotted name; ``""`` is
    the package itself), or None."""
    base = PACKAGE.joinpath(*name.split(".")) if name else PACKAGE
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imports(name):
    """The package's modules that module ``name`` imports."""
    return (module for module, _ in package_imports(name))


def package_imports(name):
    """(module, name) pairs of what module ``name`` (relative dotted name)
    imports from the package: every import statement, those inside
    functions too, relative or absolute. ``from .x import y`` is module
    ``x.y`` where that is a module, else ``x`` (``tests/test_layout.py``
    reads the layers with it)."""
    path = _path(name)
    is_package = path.name == "__init__.py"
    here = name.split(".") if name else []
    top = PACKAGE.name
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(top + "."):
                    yield alias.name.removeprefix(top + "."), ""
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if not (node.module or "").startswith(top + "."):
                continue
            target = node.module.removeprefix(top + ".")
        else:
            base = here if is_package else here[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + (node.module.split(".") if node.module else []))
        for alias in node.names:
            full = f"{target}.{alias.name}" if target else alias.name
            yield (full if _path(full) is not None else target), alias.name
