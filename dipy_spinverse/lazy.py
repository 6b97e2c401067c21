"""Names imported on first use.

Packages re-export their public names lazily (PEP 562), so that
``import dipy_spinverse`` loads neither torch nor the compartment models nor
the tissue maps until they are asked for.
"""

import ast
import importlib
import importlib.util
import sys

__all__ = ["attach", "attach_all"]


def attach(package, names):
    """Module ``__getattr__`` and ``__dir__`` that import public names lazily.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    names : dict of str to str
        Each public name and the module, relative to ``package``, that
        defines it.

    Returns
    -------
    __getattr__, __dir__ : callable
        To be assigned to the package's module globals.
    """
    module = sys.modules[package]

    def __getattr__(name):
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
            setattr(module, name, value)  # later look-ups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(module)) | set(names))

    return __getattr__, __dir__


def attach_all(package, submodules):
    """Lazy re-export of every public name of some submodules.

    Each submodule's ``__all__`` is read from its source, without importing
    it, so that the package lists no name twice.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    submodules : sequence of str
        Modules of the package (relative names) whose ``__all__`` the
        package re-exports.

    Returns
    -------
    names : list of str
        The re-exported names (the package's ``__all__``).
    __getattr__, __dir__ : callable
        As :func:`attach` returns them.
    """
    names = {
        name: sub for sub in submodules for name in _static_all(f"{package}.{sub}")
    }
    return (list(names), *attach(package, names))


def _static_all(module):
    """The literal ``__all__`` of ``module``, from its source file."""
    path = importlib.util.find_spec(module).origin
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise ImportError(f"{module} has no literal __all__ to re-export.")
