"""Public docstrings document the parameters their signatures take, no more.

Every name in a module's ``__all__`` that has a numpydoc Parameters section
(a class's own docstring documents its constructor) lists exactly the
signature's parameters; ``self``, ``*args`` and ``**kwargs`` aside.
"""

import importlib
import inspect
import pkgutil
import re

import pytest

import dipy_spinverse

_SECTION = re.compile(r"^(\w[\w ]*)\n-{3,}$", re.M)
_ENTRY = re.compile(r"^(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*(?::|$)", re.M)


def _public_objects():
    names = ["dipy_spinverse"] + [
        m.name
        for m in pkgutil.walk_packages(dipy_spinverse.__path__, "dipy_spinverse.")
    ]
    seen = {}
    for name in sorted(names):
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", ()):
            obj = getattr(module, attr)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                seen.setdefault(id(obj), (f"{name}.{attr}", obj))
    return sorted(seen.values(), key=lambda item: item[0])


def _documented(doc):
    """Names in the Parameters section, or None without one."""
    doc = inspect.cleandoc(doc or "")
    sections = list(_SECTION.finditer(doc))
    for i, match in enumerate(sections):
        if match.group(1) == "Parameters":
            end = sections[i + 1].start() if i + 1 < len(sections) else len(doc)
            body = doc[match.end() : end]
            names = []
            for entry in _ENTRY.findall(body):
                names += [n.strip().lstrip("*") for n in entry.split(",")]
            return names
    return None


def _signature(obj):
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    named = {p.name for p in parameters if p.name not in ("self", "cls")}
    variadic = {
        p.name for p in parameters if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    return named - variadic, variadic


_CASES = [
    (qualname, obj)
    for qualname, obj in _public_objects()
    if _documented(obj.__doc__) is not None and _signature(obj) is not None
]


@pytest.mark.parametrize("qualname, obj", _CASES, ids=[q for q, _ in _CASES])
def test_parameters_section_matches_the_signature(qualname, obj):
    named, variadic = _signature(obj)
    documented = set(_documented(obj.__doc__)) - variadic
    assert sorted(documented) == sorted(named), qualname


def _public_functions():
    """Module-level public functions: those a module defines and lists in
    ``__all__`` (every non-underscore one where it has no ``__all__``)."""
    names = ["dipy_spinverse"] + [
        m.name
        for m in pkgutil.walk_packages(dipy_spinverse.__path__, "dipy_spinverse.")
    ]
    for name in sorted(names):
        module = importlib.import_module(name)
        public = getattr(module, "__all__", None)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or not inspect.isfunction(obj):
                continue
            if obj.__module__ != name or (public is not None and attr not in public):
                continue
            yield f"{name}.{attr}", obj


def _n_arguments(obj):
    """Arguments of ``obj``'s signature, ``self`` and ``cls`` aside."""
    parameters = inspect.signature(obj).parameters
    return len([p for p in parameters if p not in ("self", "cls")])


def test_every_public_function_of_two_arguments_has_a_parameters_section():
    missing = [
        qualname
        for qualname, obj in _public_functions()
        if _n_arguments(obj) >= 2 and _documented(obj.__doc__) is None
    ]
    assert not missing, f"no numpydoc Parameters section: {missing}"
