"""Resuming a volume fit: the data's fingerprint and the checks that a
partial fit continues on the same data, mask and model settings.

``data`` is a volume ``shape + (n_volumes,)`` or the rows of its mask only
(``volume[mask]``, :func:`~dipy_spinverse.masked.is_mask_rows`); both have
the same :func:`fingerprint`.
"""

import hashlib

import numpy as np

from ..masked import check_mask, is_mask_rows, volume_shape

__all__ = [
    "FINGERPRINT_BYTES",
    "fingerprint",
    "check_resume",
]

#: Bytes of float64 hashed at a time by :func:`fingerprint`.
FINGERPRINT_BYTES = 1 << 24


def fingerprint(data, mask=None):
    """SHA-1 of the voxels of ``mask`` (float64, C order) and the volume's shape.

    ``data`` is a volume or the rows of the mask
    (:func:`~dipy_spinverse.masked.is_mask_rows`);
    both give the same digest, which is that of ``data[mask]``'s bytes, so
    a fit started on a volume resumes on the mask's rows read from its file.
    Without a mask every voxel counts (the digest of the whole array).
    Hashed a slab of the first axis at a time (about ``FINGERPRINT_BYTES``
    as float64), so that the data are never copied whole to float64.

    Parameters
    ----------
    data : array_like
        A volume (..., n_volumes) or the mask's rows (n_mask, n_volumes).
    mask : array_like of bool, optional
        The voxels that count; None: all.

    Returns
    -------
    str
        The SHA-1 hex digest.
    """
    data = np.asarray(data)
    digest = hashlib.sha1()
    if data.ndim == 0:
        digest.update(np.float64(data).tobytes())
        return digest.hexdigest()
    rows = is_mask_rows(data, mask)
    shape = tuple(np.shape(mask)) + data.shape[-1:] if rows else data.shape
    whole = rows or mask is None
    if not whole:
        mask = np.asarray(mask, dtype=bool)
    per_row = max(1, data[:1].size * 8)
    step = max(1, FINGERPRINT_BYTES // per_row)
    for start in range(0, len(data), step):
        slab = data[start : start + step]
        if not whole:
            slab = slab[mask[start : start + step]]
        # The array's own buffer: no second copy of the slab as bytes.
        digest.update(np.ascontiguousarray(slab, dtype=np.float64).data)
    digest.update(str(shape).encode())
    return digest.hexdigest()


def check_resume(model, resume, data, mask=None, *, digest=None):
    """Raise a ValueError unless ``model`` can continue ``resume`` on ``data``.

    ``resume`` must be a partial volume fit of a model of ``model``'s class
    (a method's fits continue only with that method), of the same data
    (shape and :func:`fingerprint`), mask (when given) and model settings
    (the model's ``differences``).

    Parameters
    ----------
    model : ReconstModel
        A model whose fits resume (the label search's, the protocol-free
        posterior's).
    resume : SpinverseFit or ProtocolFreeFit
    data : ndarray (..., n_volumes) or (n_mask, n_volumes)
        The volume, or the rows of its mask
        (:func:`~dipy_spinverse.masked.is_mask_rows`).
    mask : array_like of bool, optional
    digest : str, optional
        ``fingerprint(data, resume.mask)`` when already known.
    """
    if type(getattr(resume, "model", None)) is not type(model) or resume.shape == ():
        got = type(resume).__name__
        if hasattr(resume, "model"):
            got += f" of a {type(resume.model).__name__}"
        raise ValueError(
            f"resume must be a partly finished volume fit of a "
            f"{type(model).__name__} (load a saved one with dipy_spinverse.io."
            f"load_fit, or use dipy_spinverse.io.resume_fit), got {got}."
        )
    shape = volume_shape(data, resume.mask if mask is None else mask)
    if resume.shape != shape:
        raise ValueError(
            f"resume is a fit of shape {resume.shape} but data has {shape} "
            "voxels; resume with the same data the fit was started on."
        )
    if resume.fingerprint is None:
        raise ValueError(
            "resume holds no record of the data it was fitted on (a part of a "
            "fit, fit[...], or a SpinverseFit built without fingerprint), so "
            "its data cannot be checked; resume the whole fit that "
            "dipy_spinverse.io.load_fit reads, or fit these voxels afresh."
        )
    # The mask first: data given as the rows of another mask cannot even be
    # hashed as the saved mask's voxels.
    if mask is not None and not np.array_equal(check_mask(mask, shape), resume.mask):
        raise ValueError(
            "mask differs from the mask of the fit being resumed; pass the "
            "same mask, or mask=None to reuse the saved one."
        )
    if np.ndim(data) == 2 and np.shape(data)[:-1] != shape:
        if not is_mask_rows(data, resume.mask):
            raise ValueError(
                f"data hold {len(data)} voxels, but the mask of the fit being "
                f"resumed selects {int(resume.mask.sum())}; resume with the same "
                "data and mask the fit was started on."
            )
    if digest is None:
        digest = fingerprint(data, resume.mask)
    if resume.fingerprint != digest:
        raise ValueError(
            "data differ from the data the fit being resumed was started on; "
            "resume with the same data (same values, same order)."
        )
    differ = model.differences(resume.model)
    if differ:
        raise ValueError(
            f"the fit being resumed was made with different model settings "
            f"({', '.join(differ)}); resume with the model it was started with "
            "(dipy_spinverse.io.resume_fit rebuilds it from the saved file)."
        )
