"""Issue 84, cases 9 and 13: fit files with headers of the wrong types,
and save_fit given a protocol-free fit (kept since issue 83)."""

import json
import re

import numpy as np
import pytest

from dipy_spinverse import Protocol, SpinverseModel
from dipy_spinverse.io.fits import load_fit, save_fit
from dipy_spinverse.posterior import TissuePrior
from dipy_spinverse.sim.sequences import fibonacci_sphere


def _with_header(path, out, **fields):
    """A copy of the fit file ``path`` at ``out``, its header's ``fields``
    replaced (a value of ``...`` removes the field)."""
    with np.load(path) as archive:
        arrays = dict(archive)
    header = json.loads(str(arrays["header"]))
    for name, value in fields.items():
        if value is ...:
            header.pop(name, None)
        else:
            header[name] = value
    arrays["header"] = np.array(json.dumps(header))
    np.savez_compressed(out, **arrays)
    return out


@pytest.mark.parametrize("version", ["1", None, [1], "1.0", 1.5, True, {"v": 1}, -1])
def test_a_header_version_not_a_whole_number_is_refused_naming_the_file(
    volume_fit, tmp_path, version
):
    path = save_fit(volume_fit, tmp_path / "fit.npz")
    bad = _with_header(path, tmp_path / "bad.npz", version=version)
    with pytest.raises(ValueError, match=re.escape(str(bad))) as info:
        load_fit(bad)
    message = str(info.value)
    assert "version" in message and repr(version) in message, message


@pytest.mark.parametrize(
    "fields",
    [
        dict(format=["dipy_spinverse.SpinverseFit"]),
        dict(format={"a": 1}),
        dict(format=None),
        dict(model=[1, 2]),
        dict(noise_level="abc"),
        dict(noise_level=[0.1]),
        dict(noise_level=True),
        dict(fingerprint=[1, 2]),
    ],
    ids=lambda fields: "-".join(f"{k}={v!r}" for k, v in fields.items()),
)
def test_header_fields_of_the_wrong_type_are_refused_naming_the_file(
    volume_fit, tmp_path, fields
):
    path = save_fit(volume_fit, tmp_path / "fit.npz")
    bad = _with_header(path, tmp_path / "bad.npz", **fields)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_fit(bad)


def test_a_header_that_is_not_a_table_is_refused(volume_fit, tmp_path):
    path = save_fit(volume_fit, tmp_path / "fit.npz")
    with np.load(path) as archive:
        arrays = dict(archive)
    for header in ([1, 2], "text", 3):
        arrays["header"] = np.array(json.dumps(header))
        bad = tmp_path / "bad.npz"
        np.savez_compressed(bad, **arrays)
        with pytest.raises(ValueError, match=re.escape(str(bad))):
            load_fit(bad)


def test_valid_headers_still_load(volume_fit, tmp_path):
    """Version absent (the oldest files) or a whole number up to the
    newest; noise_level a number or null."""
    path = save_fit(volume_fit, tmp_path / "fit.npz")
    again = load_fit(_with_header(path, tmp_path / "v3.npz", noise_level=None))
    assert again.noise_level is None
    again = load_fit(_with_header(path, tmp_path / "n.npz", noise_level=0.05))
    assert again.noise_level == 0.05


# -- case 13 --------------------------------------------------------------------
def _protocol_free_fit():
    dirs = fibonacci_sphere(20, hemisphere=True)
    protocol = Protocol.pgse(
        np.r_[np.zeros(4), np.full(20, 1000.0), np.full(20, 2500.0)],
        np.vstack([np.zeros((4, 3)), dirs, dirs]),
        small_delta=0.01,
        big_delta=0.03,
    )
    model = SpinverseModel(protocol, fit_method="protocol_free", sigma=20.0)
    signals, _ = TissuePrior().simulator(protocol).sample(2, seed=0)
    return model.fit(1000.0 * signals.reshape(2, 1, 1, -1))


def test_save_fit_keeps_a_protocol_free_fit(tmp_path):
    """Issue 83 (it was refused): a protocol-free volume fit saves and loads
    whole; one voxel of it is refused as any fit's voxel is."""
    fit = _protocol_free_fit()
    assert fit.shape == (2, 1, 1)
    loaded = load_fit(save_fit(fit, tmp_path / "fit.npz"))
    assert type(loaded) is type(fit)
    for key, value in fit.params.items():
        np.testing.assert_array_equal(loaded.params[key], value, err_msg=key)
    np.testing.assert_array_equal(loaded.cell_diameter, fit.cell_diameter)
    with pytest.raises(
        ValueError, match="ProtocolFreeFit of one voxel.*data\\[None\\]"
    ):
        save_fit(fit[0, 0, 0], tmp_path / "voxel.npz")
    assert not (tmp_path / "voxel.npz").exists()
