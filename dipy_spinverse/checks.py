"""Validators shared by every public entry point.

Each raises a ``ValueError`` that names the argument, what it must be and the
value it got, so a bad option is reported where it is given, not as a failed
fit later. Messages name options as Python keywords; a check of options
raises an :class:`OptionError`, which a command rewords in its flags.
"""

import contextlib
import math
import numbers
from collections.abc import Mapping

import numpy as np
import torch
from dipy.utils.logging import logger

__all__ = [
    "check_int",
    "check_number",
    "check_positive",
    "check_range",
    "check_generator",
    "check_choice",
    "check_device",
    "readable_device",
    "check_dtype",
    "check_diffusivity",
    "check_affine",
    "check_mask_values",
    "check_s0",
    "check_options",
    "check_same_space",
    "OptionError",
    "about",
    "DTYPES",
    "DIFFUSIVITY_RANGE",
]

#: Floating-point precisions of the simulator, by name.
DTYPES = {"float64": torch.float64, "float32": torch.float32}

#: Plausible intrinsic diffusivities of water in tissue, mm^2/s: free water
#: at body temperature is 3e-3, fixed tissue at room temperature about 1e-4;
#: the range leaves a decade either side. Values outside are another unit
#: (2e-9 m^2/s = 2e-3 mm^2/s = 2 um^2/ms).
DIFFUSIVITY_RANGE = (1e-5, 1e-1)


class OptionError(ValueError):
    """A ``ValueError`` about options, its message naming them as keywords.

    A caller that names the options otherwise (a command, by its flags)
    rewords it from ``message``, ``options`` and ``fixes``; ``str(err)``
    is the message with every fix.

    Parameters
    ----------
    message : str
        The cause, each option named as its keyword and a setting written
        ``keyword=value`` (``max_iter=0``, ``preset='default'``).
    options : iterable of str
        The options the message may name, as it names them.
    fixes : iterable of (str, object), optional
        Settings that would each fix it, offered after the message
        (``; e.g. preset='default' or noise='rician'``); their options are
        added to ``options``.
    """

    def __init__(self, message, *, options, fixes=()):
        self.message = message.rstrip(".")
        self.fixes = tuple(fixes)
        self.options = tuple(dict.fromkeys([*options, *dict(self.fixes)]))
        super().__init__(self.wording())

    def wording(self, settable=None):
        """The message with the fixes whose option is in ``settable``.

        Parameters
        ----------
        settable : collection of str, optional
            The options the caller can set (default all).

        Returns
        -------
        str
        """
        fixes = [
            f"{option}={value!r}"
            for option, value in self.fixes
            if settable is None or option in settable
        ]
        return self.message + (f"; e.g. {' or '.join(fixes)}" if fixes else "") + "."


@contextlib.contextmanager
def about(*options):
    """Raise a ``ValueError`` of the block as an :class:`OptionError`.

    Parameters
    ----------
    *options : str
        The options its message may name (an ``OptionError`` passes as is).
    """
    try:
        yield
    except OptionError:
        raise
    except ValueError as err:
        raise OptionError(str(err), options=options) from err


def check_int(value, name, minimum, *, hint=""):
    """``value`` as an int, which must be an integer ``>= minimum``; ``hint``
    follows the requirement in the error (what it is, an example).

    Parameters
    ----------
    value : int or float
        The value to check; a whole float such as ``3.0`` is accepted.
    name : str
        The argument's name, used in the error message.
    minimum : int
        The smallest value allowed.
    hint : str, optional
        Text put after the requirement in the error (what it is, an example).

    Returns
    -------
    int
        ``value`` as an int.

    Raises
    ------
    ValueError
        If ``value`` is not a finite whole number ``>= minimum`` (a bool is
        refused).
    """
    # bool is an int, but n=True is a mistake, not one.
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or int(value) != value or value < minimum:
        raise ValueError(
            f"{name} must be an integer >= {minimum}{hint}, got {value!r}."
        )
    return int(value)


def check_number(value, name, *, minimum=None, maximum=None, hint=""):
    """``value`` as a finite float within ``[minimum, maximum]`` (if given).

    Parameters
    ----------
    value : float
        The value to check (a real number, not a bool).
    name : str
        The argument's name, used in the error message.
    minimum, maximum : float, optional
        The inclusive bounds; None: unbounded on that side.
    hint : str, optional
        Text put after the requirement in the error.

    Returns
    -------
    float
        ``value`` as a float.

    Raises
    ------
    ValueError
        If ``value`` is not a finite real number within the bounds.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        value = float(value)
    if (
        not ok
        or not math.isfinite(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        bounds = []
        if minimum is not None:
            bounds.append(f">= {minimum:g}")
        if maximum is not None:
            bounds.append(f"<= {maximum:g}")
        what = " and ".join(["a finite number", *bounds])
        raise ValueError(f"{name} must be {what}{hint}, got {value!r}.")
    return value


def check_positive(value, name, unit="", example=None):
    """``value`` as a finite float > 0 (in ``unit``, e.g. ``example``).

    Parameters
    ----------
    value : float
        The value to check (not a string or bool).
    name : str
        The argument's name, used in the error message.
    unit : str, optional
        The unit ``value`` is in, named in the error; "" names none.
    example : object, optional
        An example value shown in the error; None shows none.

    Returns
    -------
    float
        ``value`` as a float.

    Raises
    ------
    ValueError
        If ``value`` is not a number, or not finite and > 0.
    """
    where = f" in {unit}" if unit else ""
    if isinstance(value, str | bytes | bool | np.bool_):
        # float() would read "10" and True as numbers.
        raise ValueError(f"{name} must be a number{where}, got {value!r}.")
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number{where}, got {value!r}.") from err
    if not math.isfinite(value) or value <= 0:
        hint = f" (e.g. {example})" if example is not None else ""
        raise ValueError(f"{name} must be finite and > 0{where}{hint}, got {value!r}.")
    return value


def check_range(value, name, minimum=0.0):
    """A ``(low, high)`` range of positive numbers, as floats.

    Parameters
    ----------
    value : pair of numbers
    name : str
        The argument's name, in errors.
    minimum : float
        The smallest ``low`` allowed (``low`` is > 0 in any case).

    Returns
    -------
    low, high : float

    Raises
    ------
    ValueError
        Not a pair of numbers, or not ``0 < low <= high`` (finite, ``low``
        at least ``minimum``).
    """
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a (low, high) range, got {value!r}.") from err
    if not (minimum <= low <= high) or not math.isfinite(high) or low <= 0:
        raise ValueError(
            f"{name} must be a range (low, high) with 0 < low <= high, got {value!r}."
        )
    return low, high


def check_generator(rng, name="rng"):
    """A numpy ``Generator`` from anything :func:`numpy.random.default_rng`
    takes: None (fresh entropy), a non-negative int seed or a sequence of
    them, a ``SeedSequence``, a ``BitGenerator``, or a ``Generator``, which
    is returned unchanged (drawing from it advances it).

    Parameters
    ----------
    rng : None, int, array_like of int, SeedSequence, BitGenerator or Generator
    name : str
        The argument's name, used in the error message.

    Returns
    -------
    numpy.random.Generator

    Raises
    ------
    ValueError
        If numpy cannot seed a generator from ``rng``, or it is a bool
        (which numpy would read as the seed 0 or 1).
    """
    if not isinstance(rng, bool | np.bool_):
        try:
            return np.random.default_rng(rng)
        except (TypeError, ValueError) as err:
            reason = err
    else:
        reason = None
    raise ValueError(
        f"{name} must be what numpy.random.default_rng takes: None, a "
        "non-negative int seed (or a sequence of them), a SeedSequence, a "
        f"BitGenerator or a Generator; got {rng!r}."
    ) from reason


def check_choice(value, name, choices):
    """``value``, which must be one of ``choices``.

    Parameters
    ----------
    value : object
        The value to check.
    name : str
        What ``value`` is, used in the error message.
    choices : collection
        The values allowed.

    Returns
    -------
    object
        ``value`` unchanged.

    Raises
    ------
    ValueError
        If ``value`` is not in ``choices``.
    """
    try:
        known = bool(value in choices)
    except (TypeError, ValueError):  # an array: its == has no single truth
        known = False
    if not known:
        raise ValueError(f"Invalid {name} {value!r}. Must be one of {tuple(choices)}.")
    return value


def check_device(device):
    """A torch device this machine can use: ``"cpu"`` or an available CUDA one."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}.") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"device {str(device)!r} is not supported; use device 'cpu' or 'cuda'."
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} cannot be used: no CUDA device is available "
            "here; use device 'cpu'."
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(device)!r} cannot be used: this machine has "
            f"{torch.cuda.device_count()} CUDA device(s); use device 'cuda' (the "
            f"first) or 'cuda:<i>' with i < {torch.cuda.device_count()}."
        )
    return device


def readable_device(device):
    """Where a model saved on ``device`` is rebuilt here: ``device``, or
    ``"cpu"`` where it is a CUDA device and this machine has no CUDA (a
    saved fit is read anywhere; continuing it on another device is asked
    for by name).

    Parameters
    ----------
    device : str
        The saved device, e.g. ``"cuda:0"``.

    Returns
    -------
    str
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return "cpu"
    return device


def check_seconds(value, name, example, maximum):
    """A time in seconds, > 0 and at most ``maximum`` (s), a bound far above
    the MR times of tissue: a larger value is refused as milliseconds given
    as seconds, with the conversion."""
    value = check_positive(value, name, "seconds", example)
    if value > maximum:
        raise ValueError(
            f"{name}={value:g} s is longer than any plausible value ({maximum:g} s); "
            f"it looks like ms: pass {name}={value / 1000:g} (seconds)."
        )
    return value


def check_diffusivity(value, name="diffusivity"):
    """A diffusivity in mm^2/s within :data:`DIFFUSIVITY_RANGE`, as a float.

    Values outside the range are refused with the conversion from the unit
    they were probably given in (m^2/s, um^2/ms or um^2/s).

    Parameters
    ----------
    value : float
        The diffusivity to check, in mm^2/s.
    name : str, optional
        The argument's name, used in the error message.

    Returns
    -------
    float
        ``value`` as a float, in mm^2/s.

    Raises
    ------
    ValueError
        If ``value`` is not a positive finite number, or is outside
        :data:`DIFFUSIVITY_RANGE` (naming the unit it was probably given in).
    """
    low, high = DIFFUSIVITY_RANGE
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(
            f"{name} must be a number in mm^2/s (e.g. 2e-3), got {value!r}."
        )
    value = check_positive(value, name, "mm^2/s", 2e-3)
    if low <= value <= high:
        return value
    if value < low:
        hint = (
            f"it looks like m^2/s: pass {name}={value * 1e6:g} (mm^2/s = 1e6 x "
            "m^2/s; 2e-9 m^2/s = 2e-3 mm^2/s)"
        )
    elif high < value <= 100:
        hint = (
            f"it looks like um^2/ms: pass {name}={value * 1e-3:g} (mm^2/s = 1e-3 x "
            "um^2/ms; 2 um^2/ms = 2e-3 mm^2/s)"
        )
    else:
        hint = (
            f"it looks like um^2/s: pass {name}={value * 1e-6:g} (mm^2/s = 1e-6 x "
            "um^2/s; 2000 um^2/s = 2e-3 mm^2/s)"
        )
    raise ValueError(
        f"{name}={value:g} is outside the plausible range {low:g} to {high:g} "
        f"mm^2/s of water in tissue; {hint}."
    )


def check_dtype(dtype):
    """A torch floating dtype from a name, a numpy dtype or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    if dtype is None:  # numpy would read it as float64
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got None.")
    if not isinstance(dtype, str):
        try:
            dtype = np.dtype(dtype).name
        except TypeError:
            pass
    if dtype not in DTYPES:
        raise ValueError(
            f"dtype must be one of {tuple(DTYPES)} (or the torch dtypes), got "
            f"{dtype!r}."
        )
    return DTYPES[dtype]


def check_affine(affine):
    """A voxel-to-world ``affine`` as a finite (4, 4) array (identity if None).

    Raises
    ------
    ValueError
        Naming ``affine``: another shape, values that are not finite
        numbers, or a singular matrix (no voxel size).
    """
    if affine is None:
        return np.eye(4)
    try:
        out = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"affine must be a (4, 4) array of numbers, got {affine!r}; pass "
            "the image's affine (nib.load(path).affine) or None for identity."
        ) from err
    if out.shape != (4, 4):
        raise ValueError(
            f"affine has shape {out.shape}; pass the (4, 4) voxel-to-world "
            "matrix of the image (nib.load(path).affine), or None for identity."
        )
    if not np.isfinite(out).all() or abs(np.linalg.det(out[:3, :3])) == 0:
        raise ValueError(
            "affine has non-finite values or a singular 3 x 3 part (no voxel "
            "size); pass the image's affine (nib.load(path).affine), or None "
            "for identity."
        )
    return out


def check_mask_values(mask, name="mask"):
    """``mask`` as booleans, nonzero inside (DIPY's rule for label images).

    Parameters
    ----------
    mask : array_like
        The mask: booleans, or numbers nonzero inside.
    name : str, optional
        What the mask is, used in the error message.

    Returns
    -------
    ndarray of bool
        ``mask`` as booleans, True inside (same shape).

    Raises
    ------
    ValueError
        Naming ``name``: values that are not numbers, NaN or inf (not a
        mask value), or fractions (a probability map, whose threshold is the
        user's choice).
    """
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if mask.dtype.kind not in "biuf":
        raise ValueError(
            f"{name} must hold booleans or numbers (nonzero inside), got {mask.dtype}."
        )
    if mask.dtype.kind == "f":
        if not np.isfinite(mask).all():
            raise ValueError(
                f"{name} holds NaN or inf, which is neither inside nor outside; "
                "set those voxels to 0 or 1."
            )
        # Whole numbers up to float rounding: a 0/255 mask stored with a
        # scale factor of 1/255 reads back as 1.00000006, a resampled one as
        # 0.99999994; a probability map holds real fractions.
        rounded = np.round(mask)
        if (np.abs(mask - rounded) > 1e-5 * np.maximum(1.0, np.abs(rounded))).any():
            raise ValueError(
                f"{name} holds fractions (a probability map?); threshold it into "
                "a binary mask first, e.g. mask > 0.5."
            )
    return mask != 0


def check_s0(S0, shape, where=None, *, per="voxel"):
    """A prediction's unweighted signal ``S0`` broadcast to ``shape`` (the
    fit's, or the batch of predicted fields'): a scalar or one per ``per``,
    finite and >= 0 wherever ``where`` (the voxels predicted; default all) is
    true. Elsewhere (masked or failed voxels, which are not predicted)
    anything goes, e.g. the NaN of a fitted S0 map.

    Parameters
    ----------
    S0 : float or array_like
        The unweighted signal (arbitrary units): a scalar or an array that
        broadcasts to ``shape``.
    shape : tuple of int
        The shape to broadcast ``S0`` to.
    where : array_like of bool, optional
        Where ``S0`` must be finite and >= 0, of shape ``shape``; None: all.
    per : str, optional
        What one element of ``shape`` is (e.g. "voxel"), used in errors.

    Returns
    -------
    ndarray
        ``S0`` as float64, broadcast to ``shape`` (a read-only view).

    Raises
    ------
    ValueError
        If ``S0`` is not numeric, does not broadcast to ``shape``, or is
        negative or not finite where ``where`` is true.
    """
    S0 = np.asarray(S0)
    if S0.dtype.kind not in "iuf":
        raise ValueError(f"S0 must be numbers, got {S0!r}; give a float or an array")
    try:
        out = np.broadcast_to(S0.astype(np.float64), shape)
    except ValueError:
        raise ValueError(
            f"S0 has shape {S0.shape}, but the {per}s have shape {shape}: S0 must "
            f"be a number or one per {per}"
        ) from None
    used = np.ones(shape, dtype=bool) if where is None else np.asarray(where)
    bad = used & ~(np.isfinite(out) & (out >= 0))
    if bad.any():
        first = np.argwhere(bad)[0]
        voxel = f" at voxel {tuple(int(i) for i in first)}" if len(shape) else ""
        raise ValueError(
            f"S0 must be finite and >= 0 (a signal without diffusion weighting) "
            f"where a voxel is predicted, got {out[tuple(first)]:g}{voxel}"
        )
    return out


def check_options(options, name, hint):
    """A mapping of options (or None: none) as a new dict; anything else is
    refused naming ``name``, with ``hint`` (how to write it).

    Parameters
    ----------
    options : Mapping or None
        The options; None means none.
    name : str
        The argument's name, used in the error message.
    hint : str
        How to write the options, appended to the error.

    Returns
    -------
    dict
        A new dict of ``options`` (empty for None).

    Raises
    ------
    ValueError
        If ``options`` is neither None nor a Mapping.
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{name} must be a dict, got {options!r}; {hint}")
    return dict(options)


def check_same_space(mask_affine, affine, maskfile, image_file):
    """Warn (log) where the mask's voxel-to-scanner affine is not the
    image's (a mask of another session or space): it is used voxel for
    voxel.

    Parameters
    ----------
    mask_affine : array_like, shape (4, 4)
        The mask's voxel-to-scanner affine (mm).
    affine : array_like, shape (4, 4)
        The image's voxel-to-scanner affine (mm).
    maskfile : str or path-like
        The mask's file, named in the warning.
    image_file : str or path-like
        The image's file, named in the warning.

    Returns
    -------
    None
        A warning is logged when the affines differ by more than 1e-3.
    """
    mask_affine, affine = np.asarray(mask_affine), np.asarray(affine)
    if not np.allclose(mask_affine, affine, atol=1e-3):
        logger.warning(
            f"mask file {maskfile} has another affine than {image_file} (largest "
            f"difference {np.abs(mask_affine - affine).max():.3g} mm); it is used "
            "voxel for voxel. Resample the mask to the data if they are not "
            "already aligned."
        )
