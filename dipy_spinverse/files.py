"""Files: atomic output, NIfTI images, and the package's one cache folder.

Atomic output: write a temporary file beside the target, then rename. A
reader (or a later run) then sees either the previous file or the complete
new one, never a half-written one: ``os.replace`` within one folder is
atomic on POSIX and Windows.
"""

import contextlib
import os
import pathlib
import secrets
import tempfile

import nibabel as nib

from .checks import check_affine

__all__ = ["atomic_write", "cache_root", "save_image", "writable_folder", "CACHE_ENV"]

#: Environment variable naming the cache folder.
CACHE_ENV = "DIPY_SPINVERSE_CACHE"


def cache_root(path=None):
    """The folder of everything the package trains or estimates once and reuses.

    ``path`` if given, else ``$DIPY_SPINVERSE_CACHE``, else
    ``$XDG_CACHE_HOME/dipy_spinverse`` (``~/.cache/dipy_spinverse``). Learned
    proposals, approximation-error estimates, compartment networks and
    shape autoencoders live in subfolders or under their own hashes there.
    """
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(
                f"cache_dir must be a folder (a str or path), got {path!r}; "
                f"or leave it out to use {CACHE_ENV} or ~/.cache/dipy_spinverse"
            )
        return pathlib.Path(path).expanduser()
    root = os.environ.get(CACHE_ENV)
    if root:
        return pathlib.Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(xdg) / "dipy_spinverse"


def writable_folder(folder, what, fix=None):
    """``folder`` as a Path, created if needed, after checking that a file
    can be written there: a cache or output folder that cannot be written is
    reported before minutes of work, not after (``what`` names the product,
    ``fix`` says how to choose another folder; default: the cache's way).

    Raises
    ------
    ValueError
        Naming the folder and how to choose another.
    """
    if fix is None:
        fix = f"give a writable cache_dir, or set {CACHE_ENV} to a writable folder"
    folder = pathlib.Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as err:
        raise ValueError(
            f"cannot write the {what} to {folder} ({err.strerror or err}); {fix}"
        ) from err
    return folder


@contextlib.contextmanager
def atomic_write(path):
    """Context manager: a temporary path to write to, renamed to ``path``.

    The temporary file lies in ``path``'s folder (created if needed), so the
    rename never crosses file systems, and its name ends with ``path``'s own
    name, so that writers that choose the format from the extension
    (nibabel's ``.nii.gz``, matplotlib's ``.png``) write the right one. If
    the block raises, the temporary file is removed and ``path`` is left as
    it was.

    Parameters
    ----------
    path : str or os.PathLike

    Yields
    ------
    str
        The temporary path; write the whole file there.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "x.npy")
    >>> with atomic_write(target) as tmp:
    ...     np.save(tmp, np.arange(3))
    >>> np.load(target).tolist()
    [0, 1, 2]
    """
    path = os.fspath(path)
    folder, name = os.path.split(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{secrets.token_hex(4)}-{name}")
    try:
        yield tmp
        if not os.path.isfile(tmp):
            raise OSError(f"nothing was written for {path}.")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_image(path, data, affine=None, reference=None):
    """Write ``data`` as a NIfTI image, atomically.

    Through a temporary file beside ``path``, then a rename: an interrupted
    run never leaves a half-written image.

    Parameters
    ----------
    path : str or os.PathLike
    data : ndarray
    affine : ndarray (4, 4), optional
        Voxel-to-world affine (default identity).
    reference : nibabel image or Nifti1Header, optional
        The image the data came from: the output keeps its qform and sform
        codes and its spatial unit (default: sform code 2, "aligned", no
        qform, mm).

    Returns
    -------
    str
        The path written.
    """
    affine = check_affine(affine)
    image = nib.Nifti1Image(data, affine)
    qform, sform, units = _space_of(reference)
    # The codes say what the affine maps to (1 scanner, 2 aligned, ...):
    # a map of the DWI lives where the DWI does, so it keeps the input's
    # codes (registration tools that read the qform need it set).
    image.set_qform(affine, code=qform)
    image.set_sform(affine, code=sform)
    image.header.set_xyzt_units(xyz=units)
    with atomic_write(path) as tmp:
        image.to_filename(tmp)
    return os.fspath(path)


def _space_of(reference):
    """(qform code, sform code, spatial unit) of a reference image or header:
    the reference's, or nibabel's default codes (0, 2) and mm (the unit of
    the affines this package writes) where it has none."""
    if reference is None:
        return 0, 2, "mm"
    header = getattr(reference, "header", reference)
    if not isinstance(header, nib.Nifti1Header):
        raise TypeError(
            "reference must be a NIfTI image or header (nibabel), got "
            f"{type(reference).__name__}; pass the image the data came from."
        )
    qform, sform = int(header["qform_code"]), int(header["sform_code"])
    if qform == 0 and sform == 0:  # no code to keep: the affine is aligned
        qform, sform = 0, 2
    unit = header.get_xyzt_units()[0]
    return qform, sform, "mm" if unit == "unknown" else unit
