"""One refusal of a noise level not below the median b = 0 signal.

The command's dataset (``noise_sigma``, in its flags' words) and the models
(``reference_noise``, in Python's) refuse it by one check,
:func:`~dipy_spinverse.reconst.noise.check_below_b0`: the same numbers, the
same cause, each naming its own argument and fix (issue 73).
"""

import traceback

import numpy as np
import pytest
from dipy.core.gradients import gradient_table

from dipy_spinverse.checks import OptionError
from dipy_spinverse.reconst.noise import reference_noise
from dipy_spinverse.workflows.dataset import noise_sigma
from dipy_spinverse.workflows.flags import reword

BVALS = np.array([0.0, 1000.0, 0.0, 2000.0])
BVECS = np.array([[1.0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0]])


def _refusal(call):
    """The error ``call`` raises, and the function that raised it."""
    with pytest.raises(OptionError) as err:
        call()
    return err.value, traceback.extract_tb(err.value.__traceback__)[-1].name


def test_the_command_and_the_models_refuse_sigma_by_one_check():
    data = np.array([[400.0, 200.0, 600.0, 100.0], [800.0, 300.0, 1000.0, 50.0]])
    table = gradient_table(BVALS, bvecs=BVECS)
    s0 = data[:, table.b0s_mask].mean(-1)  # 500, 900: median 700
    sigma = 750.0
    command, raised_by = _refusal(
        lambda: noise_sigma(("sigma", sigma), None, data, table)
    )
    assert raised_by == "check_below_b0"
    models, raised_by = _refusal(lambda: reference_noise(sigma, s0))
    assert raised_by == "check_below_b0"
    cause = "750 is not below the median b=0 signal 700 "
    assert cause in command.message and cause in models.message
    # Each names its own argument and the fix in its own words.
    assert command.options == ("--sigma",) and models.options == ("sigma",)
    assert str(command).startswith("--sigma 750 is not below")
    assert "of the mask" in str(command) and "--snr" in str(command)
    assert str(models).startswith("sigma 750 is not below")
    assert "of the voxels" in str(models) and "estimate_sigma" in str(models)
    # A sigma below the median passes both.
    assert noise_sigma(("sigma", 600.0), None, data, table) == 600.0
    assert reference_noise(600.0, s0) == pytest.approx(600.0 / 700.0)


def test_the_models_refusal_reads_in_the_flags_once_reworded():
    """Raised under the models' words, a command rewords it as its flags
    (``FLAGS``: sigma is --sigma/--snr)."""
    err, _ = _refusal(lambda: reference_noise(9.0, [4.0, 5.0, 6.0]))
    text = reword(err)
    assert text.startswith("--sigma/--snr 9 is not below the median b=0 signal 5")
    assert "pass the noise standard deviation in the data's units" in text
