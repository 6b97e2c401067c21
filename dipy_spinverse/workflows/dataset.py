"""One dataset of ``dipy_fit_spinverse``, read and checked: the diffusion
image, its mask, the gradient table and the noise level."""

from dataclasses import dataclass

import numpy as np
from dipy.utils.logging import logger

from ..checks import check_mask_values, check_same_space
from ..files import load_image, read_voxels
from ..io.gradients import read_gradients
from ..reconst.noise import check_below_b0

__all__ = [
    "Dataset",
    "read_dataset",
    "load_dwi",
    "load_mask",
    "noise_sigma",
    "SIGMA_AUTO_MIN_VOXELS",
    "SIGMA_AUTO_MAX_VOLUMES",
]

#: Voxels of an image below which ``--sigma auto`` warns. DIPY's
#: ``estimate_sigma`` averages local variances over 3x3x3 neighbourhoods;
#: with N of them the estimate's relative standard error is of order
#: 1/sqrt(N) only where the image is mostly background or uniform tissue,
#: which a small field of view is not: a 3 x 3 x 1 phantom gave SNR 23.5
#: for data at 67-100. A 10 x 10 x 10 image holds a thousand neighbourhoods.
SIGMA_AUTO_MIN_VOXELS = 1000
#: Volumes ``--sigma auto`` reads at most (evenly spread): the median of
#: their estimates moves by noise only past a few dozen.
SIGMA_AUTO_MAX_VOLUMES = 64
#: How the noise check (:func:`~dipy_spinverse.reconst.noise.check_below_b0`)
#: names the noise of each noise flag, and what the command takes instead.
_NOISE_NAMES = {
    "sigma": "--sigma",
    "auto": "--sigma auto's estimate",
    "snr": "sigma from --snr",
}
_NOISE_FIX = (
    "--sigma, the noise standard deviation in the data's units (e.g. DIPY's "
    "estimate_sigma), or --snr, the SNR of that median b=0 signal (e.g. 50)"
)


@dataclass(frozen=True)
class Dataset:
    """One dataset, read and checked.

    Parameters
    ----------
    image : nibabel image
        The 4-D diffusion image (its voxels are read through ``data``).
    mask : ndarray of bool (x, y, z)
        The voxels to fit.
    data : ndarray (n_mask, n_volumes)
        The mask's voxels, in C order.
    table : GradientTable
        The gradient table, with the pulse timing.
    sigma : float
        The noise standard deviation in the data's units (0: unknown).
    """

    image: object
    mask: np.ndarray
    data: np.ndarray
    table: object
    sigma: float

    @property
    def space(self):
        """The maps' space: ``affine`` and ``reference`` image
        (:func:`~dipy_spinverse.files.save_image`)."""
        return dict(affine=self.image.affine, reference=self.image)


def read_dataset(dwi, bval, bvec, maskfile, *, gradients, noise):
    """Read and check one dataset.

    Parameters
    ----------
    dwi, bval, bvec, maskfile : str
        The diffusion image, its b-values and b-vectors files (FSL format)
        and the mask.
    gradients : dict
        The timing and tolerances, keywords of
        :func:`~dipy_spinverse.io.gradients.read_gradients` (``big_delta``,
        ``small_delta``, ``timing_file``, ``scheme_file``, ``b0_threshold``,
        ``bvecs_tol``).
    noise : tuple or None
        The noise flags (:func:`noise_sigma`).

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        An image that is not 4-D, a mask that is not one of its voxels,
        gradients that do not match it, a noise level it cannot scale.
    """
    image = load_dwi(dwi)
    mask = load_mask(maskfile, image, dwi)
    # The mask's voxels only, one volume at a time: memory grows with the
    # mask, not with the image.
    data = read_voxels(image, mask, "input_files")
    table = read_gradients(bval, bvec, n_volumes=data.shape[-1], data=data, **gradients)
    sigma = noise_sigma(noise, image, data, table)
    return Dataset(image=image, mask=mask, data=data, table=table, sigma=sigma)


def load_dwi(dwi):
    """The diffusion image, which must be 4-D.

    Parameters
    ----------
    dwi : str
        Its path.

    Returns
    -------
    nibabel image
        Its voxels are not read here.
    """
    image = load_image(dwi, "input_files")
    if image.ndim != 4:
        squeeze = (
            " Save it without the axis of length 1 after x, y, z."
            if image.ndim == 5 and 1 in image.shape[3:]
            else ""
        )
        raise ValueError(
            f"{dwi} has {image.ndim} dimensions (shape {image.shape}); "
            "input_files must be 4-D diffusion images (x, y, z, volumes)." + squeeze
        )
    return image


def load_mask(maskfile, image, dwi):
    """The mask of ``image``: 0/1 values, one per voxel, at least one set.

    Parameters
    ----------
    maskfile : str
        Its path.
    image : nibabel image
        The diffusion image (a mask of another affine is used voxel for
        voxel, with a warning).
    dwi : str
        The image's path (for the messages).

    Returns
    -------
    ndarray of bool (x, y, z)
    """
    mask_image = load_image(maskfile, "mask file")
    check_same_space(mask_image.affine, image.affine, maskfile, dwi)
    try:
        mask_values = np.asanyarray(mask_image.dataobj)
    except (EOFError, OSError, ValueError) as err:
        raise ValueError(
            f"mask file {maskfile} is damaged or truncated ({err}); write it again."
        ) from err
    mask = check_mask_values(mask_values, f"mask file {maskfile}")
    if mask.shape != image.shape[:-1]:
        raise ValueError(
            f"mask file {maskfile} has shape {mask.shape}, but {dwi} has "
            f"{image.shape[:-1]} voxels; pass the mask of this dataset "
            "(one value per voxel, 3-D)."
        )
    if not mask.any():
        raise ValueError(
            f"mask file {maskfile} selects no voxel (all zero); pass the "
            "mask of this dataset."
        )
    return mask


def noise_sigma(noise, image, data, table):
    """The noise standard deviation in the data's units, as the model takes
    it; 0 when unknown.

    Parameters
    ----------
    noise : tuple or None
        From the options: ``("snr", snr)`` (the median b=0 signal of the
        mask over it), ``("sigma", sigma)`` in the data's units, or
        ``("auto", None)``: DIPY's
        :func:`~dipy.denoise.noise_estimate.estimate_sigma` on the volumes
        (read one at a time), the median over them.
    image : nibabel image
        The diffusion image (for ``auto``).
    data : ndarray (n_mask, n_volumes)
        The mask's voxels.
    table : GradientTable

    Returns
    -------
    float

    Raises
    ------
    ValueError
        No b = 0 volume, a median b = 0 signal that is not positive, or a
        noise level not below it (the models' check,
        :func:`~dipy_spinverse.reconst.noise.check_below_b0`, in the flags'
        words).
    """
    if noise is None:
        return 0.0
    kind, value = noise
    b0 = np.asarray(table.b0s_mask)
    if not b0.any():
        raise ValueError(
            f"--{kind} needs b=0 volumes to relate the noise to; these data have none."
        )
    s0 = float(np.median(data[:, b0].astype(np.float64).mean(-1)))
    if not s0 > 0:
        raise ValueError(
            f"The median b=0 signal of the mask is {s0:g}; --{kind} cannot be "
            "related to it. Check the mask and the b=0 volumes."
        )
    if kind == "snr":
        value = s0 / value
    elif kind == "auto":
        value = _estimate_sigma(image, b0)
    logger.info(
        f"Noise: sigma {value:.4g} in the data's units; the median b=0 signal "
        f"of the mask is {s0:.4g}, SNR {s0 / value:.3g}"
        if value > 0
        else "Noise: sigma 0"
    )
    check_below_b0(
        value, s0, name=_NOISE_NAMES[kind], voxels="of the mask", hint=_NOISE_FIX
    )
    return value


def _estimate_sigma(image, b0):
    """``--sigma auto``: DIPY's estimate in the data's units (logged)."""
    from dipy.denoise.noise_estimate import estimate_sigma

    # Every volume (or SIGMA_AUTO_MAX_VOLUMES spread over them), as the
    # package's examples do: the b = 0 volume has the most anatomical
    # contrast, which estimate_sigma reads as noise (small_101D: SNR 23.5
    # from the b = 0 alone, 10.9 from every volume).
    chosen = np.unique(
        np.linspace(0, len(b0) - 1, min(len(b0), SIGMA_AUTO_MAX_VOLUMES)).round()
    ).astype(int)
    volumes = [
        float(estimate_sigma(np.asarray(image.dataobj[..., i], dtype=np.float32))[0])
        for i in chosen
    ]
    value = float(np.median(volumes))
    logger.info(
        f"--sigma auto: {value:.4g} in the data's units (DIPY estimate_sigma "
        f"on {len(chosen)} of the {len(b0)} volumes, their median; "
        f"{np.min(volumes):.4g}-{np.max(volumes):.4g} across them)"
    )
    n_voxels = int(np.prod(image.shape[:3]))
    if n_voxels < SIGMA_AUTO_MIN_VOXELS:
        logger.warning(
            f"--sigma auto estimated the noise from an image of {n_voxels} "
            f"voxels (fewer than {SIGMA_AUTO_MIN_VOXELS}): DIPY's estimate_sigma "
            "takes the local variance in 3x3x3 neighbourhoods, and so few "
            "cannot separate noise from tissue contrast; the SNR it gives may "
            "be far off. Pass --snr (the b=0 images' SNR, e.g. from a larger "
            "field of view or the scanner's protocol) instead."
        )
    return value
