"""Ground-truth tissue maps and simulated scans for evaluation.

:func:`mni152_tissue_maps` builds CSF, GM and WM probability maps from the
MNI152 (2009a) templates that nilearn ships inside its package (no
download; ``pip install dipy_spinverse[tissue]``). :func:`simulate_scans`
turns probability maps into noisy multi-contrast magnitude images.
"""

import numpy as np
import torch

from ..checks import check_choice, check_number

__all__ = ["mni152_tissue_maps", "simulate_scans", "NOISE_MODELS"]

NOISE_MODELS = ("rician", "gaussian")


def mni152_tissue_maps(*, resolution=2):
    """CSF, GM and WM probability maps of the MNI152 2009a template.

    GM and WM are nilearn's bundled probability maps
    (``load_mni152_gm_template``, ``load_mni152_wm_template``); CSF is the
    rest of nilearn's brain mask (``load_mni152_brain_mask``): ``1 - gm -
    wm`` inside it (where ``gm + wm`` exceeds one, by rounding of the
    templates, both are scaled to sum one). Zero outside the mask.

    Parameters
    ----------
    resolution : int
        Voxel size in mm (1 or 2; 2 gives about 235,000 brain voxels).

    Returns
    -------
    probabilities : array, (x, y, z, 3)
        csf, gm, wm; summing to one in the mask.
    mask : array of bool, (x, y, z)
    affine : array, (4, 4)
    """
    check_choice(resolution, "resolution", (1, 2))
    try:
        from nilearn import datasets
    except ImportError as err:  # pragma: no cover - exercised without nilearn
        raise ImportError(
            "mni152_tissue_maps needs nilearn: pip install dipy_spinverse[tissue]"
        ) from err
    gm_image = datasets.load_mni152_gm_template(resolution=resolution)
    gm = np.clip(gm_image.get_fdata(), 0, 1)
    wm = np.clip(
        datasets.load_mni152_wm_template(resolution=resolution).get_fdata(), 0, 1
    )
    mask = datasets.load_mni152_brain_mask(resolution=resolution).get_fdata() > 0
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    # clip only the rounding of 1 - gm - wm where gm + wm == 1 (~1e-16)
    csf = np.clip(1 - gm - wm, 0, 1)
    probabilities = np.stack([csf, gm, wm], axis=-1) * mask[..., None]
    return probabilities, mask, gm_image.affine


def simulate_scans(
    model, probabilities, mask, *, snr, gain=1000.0, noise="rician", rng=None
):
    """Noisy magnitude images of tissue probabilities through ``model``.

    The noise standard deviation of each image is its brightest pure
    tissue's signal divided by ``snr``; outside the mask the signal is zero
    (pure noise, as the background of a real scan).

    Parameters
    ----------
    model : TissueMapModel
        Its sequences, tissues and mixing make the clean images.
    probabilities : array, (..., n_tissues)
    mask : array of bool, (...)
    snr : float
        Signal-to-noise ratio of the brightest tissue of each image
        (``inf`` for noise-free images).
    gain : float
        Receive gain (image units per model unit).
    noise : str
        "rician" (magnitude of complex Gaussian noise) or "gaussian".
    rng : numpy Generator, optional

    Returns
    -------
    images : array, (..., n_sequences)
    """
    snr = check_number(snr, "snr", minimum=1e-6) if snr != np.inf else np.inf
    noise = check_choice(noise, "noise", NOISE_MODELS)
    rng = np.random.default_rng(rng)
    mask = np.asarray(mask, dtype=bool)
    clean = np.zeros(mask.shape + (len(model.sequences),))
    p = torch.as_tensor(np.asarray(probabilities)[mask], device=model.device)
    clean[mask] = model.forward(p, gain).cpu().numpy()
    if snr == np.inf:
        return clean
    sigma = gain * model.design.abs().amax(dim=1).cpu().numpy() / snr
    real = clean + rng.normal(size=clean.shape) * sigma
    if noise == "gaussian":
        return real
    return np.hypot(real, rng.normal(size=clean.shape) * sigma)
