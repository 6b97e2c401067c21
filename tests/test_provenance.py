"""The digest of the code that trains an artefact (dipy_spinverse.provenance),
and every cached estimator's key holding it."""

import numpy as np
import pytest

from dipy_spinverse import provenance
from dipy_spinverse.provenance import code_digest, code_sources


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A small package named as ours: ``a`` imports ``b`` (relatively, at
    module level), ``b`` imports ``c.d`` (absolutely, in a function) and
    ``checks`` (not followed); ``e`` is imported by nobody."""
    root = tmp_path / provenance.PACKAGE.name
    (root / "c").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from .b import f\n",
        "b.py": (
            "from .checks import check\n\n\ndef f():\n"
            f"    from {root.name}.c.d import g\n    return g\n"
        ),
        "checks.py": "def check(): ...\n",
        "c/__init__.py": "",
        "c/d.py": "g = 1  # the physics\n",
        "e.py": "h = 2\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    monkeypatch.setattr(provenance, "PACKAGE", root)
    provenance._digest.cache_clear()
    provenance._closure.cache_clear()
    yield root
    provenance._digest.cache_clear()
    provenance._closure.cache_clear()


def _edit(package, name, text):
    (package / name).write_bytes(text)
    provenance._digest.cache_clear()


def test_the_sources_are_the_roots_and_what_they_import(package):
    """Relative and absolute imports, inside functions too; not the checks
    (NOT_TRAINING), not what the caller excludes, not parent packages."""
    assert code_sources("a") == ("a.py", "b.py", "c/d.py")
    assert code_sources(f"{package.name}.a") == code_sources("a")
    assert code_sources("a", exclude=["c.d"]) == ("a.py", "b.py")
    assert code_sources("b", "e") == ("b.py", "c/d.py", "e.py")
    with pytest.raises(ValueError, match="'nothing' is not a module"):
        code_sources("nothing")


def test_the_digest_changes_with_the_code_it_covers_only(package):
    """An edit of a covered file's code (a constant) changes it; an edit
    elsewhere, line endings made CRLF, a comment, a docstring, blank lines
    or trailing spaces do not (issue 83 item 3: keys move only when the
    numbers can)."""
    before = code_digest("a")
    assert len(before) == provenance.DIGEST_LENGTH
    _edit(package, "e.py", b"h = 3\n")
    _edit(package, "checks.py", b"def check(): return 1\n")
    assert code_digest("a") == before
    _edit(package, "a.py", b"from .b import f\r\n")
    assert code_digest("a") == before
    _edit(package, "c/d.py", b"g = 1  # the physics, again\n")
    assert code_digest("a") == before
    _edit(package, "c/d.py", b'"""The module, documented."""\n\n\ng = 1   \n')
    _edit(
        package,
        "b.py",
        (package / "b.py")
        .read_bytes()
        .replace(
            b"def f():\n", b'def f():\n    """Say what f does \xc3\xa9."""  # and why\n'
        ),
    )
    assert code_digest("a") == before
    _edit(package, "c/d.py", b"g = 2\n")
    assert code_digest("a") != before
    assert code_digest("a") == code_digest("a", "a")


def test_the_hashed_code_is_the_text_without_docstrings_and_comments(package):
    """What is hashed: the statements as written (a string inside code
    stays), without docstrings, comments, blank lines and trailing spaces;
    columns after a non-ASCII docstring are cut right."""
    _edit(
        package,
        "c/d.py",
        '"""Módulo."""\n# a comment\n\ng = "# not a comment"  # one\n'
        'def f():\n    """Doc \u00e9t\u00e9."""; return 1\n'.encode(),
    )
    assert provenance.code_text("c/d.py") == (
        b'g = "# not a comment"\ndef f():\n    ; return 1\n'
    )


def test_the_posterior_covers_the_simulator_prior_descriptors_and_training():
    """What trains a posterior estimator is hashed (its prior, simulator,
    training and cache, and what they import); its shipped manifest's code,
    the checkpoint of simulations and the posterior predictive are not."""
    from dipy_spinverse.posterior import shipped

    files = code_sources(*shipped.TRAINING_ROOTS, exclude=shipped.NOT_FOLLOWED)
    for name in (
        "posterior/prior.py",
        "posterior/simulator.py",
        "posterior/training.py",
        "posterior/noise.py",
        "posterior/cache.py",
        "posterior/targets.py",
        "posterior/estimator.py",
        "posterior/calibration.py",
        "posterior/support.py",
        "geometry/descriptors.py",
        "geometry/substrates/packed.py",
        "sim/forward.py",
        "sim/operators.py",
        "sim/signals.py",
    ):
        assert name in files, name
    for name in (
        "posterior/shipped.py",
        "posterior/checkpoint.py",
        "posterior/predictive.py",
        "checks.py",
    ):
        assert name not in files, name
    assert len(shipped.estimator_code()) == provenance.DIGEST_LENGTH


def test_each_kind_of_estimator_hashes_its_own_code():
    """A per-protocol estimator's key does not cover the protocol-free
    estimator's module, which covers its own; every kind's digest differs,
    and the manifest names each shipped file's kind."""
    from dipy_spinverse.posterior import shipped

    per_protocol = shipped.estimator_sources("per_protocol")
    protocol_free = shipped.estimator_sources("protocol_free")
    package = "posterior/protocol_free/"
    assert not [name for name in per_protocol if name.startswith(package)]
    # Every module of the protocol-free package but its command line, whose
    # settings are the shipped module's.
    assert {name for name in protocol_free if name.startswith(package)} == {
        package + name
        for name in (
            "__init__.py",
            "design.py",
            "estimator.py",
            "shells.py",
            "shipped.py",
            "tokens.py",
            "training.py",
        )
    }
    assert "posterior/training.py" in per_protocol
    assert shipped.estimator_code("per_protocol") != shipped.estimator_code(
        "protocol_free"
    )
    assert shipped.estimator_code() == shipped.estimator_code("per_protocol")
    with pytest.raises(ValueError, match="kind must be one of"):
        shipped.estimator_code("other")
    kinds = {
        shipped.estimator_kind(entry)
        for entry in shipped.read_manifest()["estimators"].values()
    }
    assert kinds <= set(shipped.ESTIMATOR_ROOTS)
    # Every prior names a kind of its own code (the white-matter priors').
    from dipy_spinverse.posterior import MixturePrior, TissuePrior, WhiteMatterPrior

    priors = {p.estimator_kind for p in (TissuePrior, WhiteMatterPrior, MixturePrior)}
    assert priors | {"protocol_free"} == set(shipped.ESTIMATOR_ROOTS)


def _keys(monkeypatch, module, key):
    """``key()`` under two code digests of ``module``'s."""
    out = []
    for code in ("0" * 16, "1" * 16):
        monkeypatch.setattr(module, "code_digest", lambda *a, c=code, **k: c)
        out.append(key())
    return out


def test_every_cached_estimator_is_keyed_by_its_code(monkeypatch, gtab_shells):
    """The learned proposal, the approximation error, the shape autoencoder,
    the learned compartment networks and the posterior: another code
    digest, another key (no version constant bumped by hand)."""
    import dipy_spinverse.posterior as posterior
    from dipy_spinverse import Protocol, TetGrid
    from dipy_spinverse.compartments import NoddiModel, amortised
    from dipy_spinverse.inverse import approximation, proposal
    from dipy_spinverse.meshfit import autoencoder
    from dipy_spinverse.meshfit.mesh import tube_mesh
    from dipy_spinverse.meshfit.shape import spectral_shape
    from dipy_spinverse.posterior import TissuePrior, TrainingOptions, estimator_key

    grid = TetGrid.bcc(8.0, 2)
    protocol = Protocol.pgse(
        np.array([0.0, 1000.0]), np.eye(3)[:2], small_delta=0.005, big_delta=0.02
    )
    shape = spectral_shape(
        tube_mesh(radius=3.0, length=20.0, resolution=2, layers=6), n_modes=4
    )
    model = NoddiModel(gtab_shells, fit_method="learned")
    keys = {
        "proposal": (
            proposal,
            lambda: proposal.proposal_key(
                grid, protocol, 2e-3, proposal.ProposalSettings()
            ),
        ),
        "approximation": (
            approximation,
            lambda: approximation.approximation_key(
                grid,
                protocol,
                diffusivity=2e-3,
                open_kappa=1.0,
                n_substrates=4,
                refine=2,
            ),
        ),
        "autoencoder": (
            autoencoder,
            lambda: autoencoder.autoencoder_key(
                shape, autoencoder.AutoencoderSettings()
            ),
        ),
        "learned": (amortised, model._learned_key),
        "posterior": (
            posterior,
            lambda: estimator_key(TissuePrior(), protocol, TrainingOptions()),
        ),
    }
    for name, (module, key) in keys.items():
        if module is posterior:
            # The posterior's digest is its shipped module's (estimator_code).
            first, second = [], []
            for code, out in (("0" * 16, first), ("1" * 16, second)):
                monkeypatch.setattr(
                    posterior.cache,
                    "estimator_code",
                    lambda kind="per_protocol", c=code: c,
                )
                out.append(key())
            assert first != second, name
            assert first[0].endswith("-" + "0" * 16), first
            continue
        first, second = _keys(monkeypatch, module, key)
        assert first != second, name
