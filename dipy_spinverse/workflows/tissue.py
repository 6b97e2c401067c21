"""Command line: ``dipy_fit_tissue_maps``, a DIPY workflow.

Usage::

    dipy_fit_tissue_maps images.nii.gz sequences.txt --mask_files mask.nii.gz \\
        --field_strength 3 --out_dir tissue_out

``images.nii.gz`` is 4-D, one volume per sequence; ``sequences.txt`` has one
sequence per line in that order, e.g. ``Flash tr=0.02 te=0.004
flip_angle=30`` or ``InversionRecovery ti=0.9 tr=2.3 te=0.003`` (seconds,
degrees; lines starting with # are ignored).
"""

import json
import os
import zlib

import numpy as np
from dipy.utils.logging import logger
from dipy.workflows.workflow import Workflow

from ..checks import check_mask_values, check_same_space
from ..files import (
    check_outputs,
    load_image,
    output_lock,
    save_image,
    writable_folder,
)
from ..tissue.model import POOR_FIT, TissueMapModel
from ..tissue.sequences import sequence_from_string
from .cli import flag_names, options_as_flags, run_command

__all__ = ["TissueMapsFlow", "read_sequences", "main"]


def read_sequences(path):
    """The sequences of a text file, one ``Name key=value ...`` per line."""
    lines = [line.split("#")[0].strip() for line in _read_text(path, "sequences")]
    sequences = [sequence_from_string(line) for line in lines if line]
    if not sequences:
        raise ValueError(f"sequences file {path} lists no sequence.")
    return sequences


def _read_tissues(path):
    """The ``--tissues_file`` JSON object (None when not given)."""
    if not path:
        return None
    try:
        return json.loads("".join(_read_text(path, "tissues_file")))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"tissues_file {path} is not valid JSON ({err}); write one object "
            'of tissues, e.g. {"wm": {"t1": 0.83, "t2": 0.08, "pd": 0.7}}.'
        ) from err


#: What a damaged or truncated image raises while its data are read.
_DAMAGED = (EOFError, OSError, ValueError, zlib.error)


def _read_data(image, what):
    """The data of a nibabel ``image`` (float64), a ValueError naming the
    file where it is damaged or truncated."""
    try:
        return np.asarray(image.get_fdata(dtype=np.float64))
    except _DAMAGED as err:
        raise ValueError(
            f"{what} {image.get_filename()} is damaged or truncated: reading its "
            f"data failed ({type(err).__name__}: {err}); copy or write the file "
            "again."
        ) from err


def _read_text(path, what):
    """The lines of the text file ``path`` given as ``what``."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(
            f"cannot read the {what} file {path} as text ({type(err).__name__}: "
            f"{err}); pass the text file the option describes."
        ) from err


class TissueMapsFlow(Workflow):
    @classmethod
    def get_short_name(cls):
        return "tissue_maps"

    def run(
        self,
        input_files,
        sequences_files,
        *,
        mask_files=None,
        tissues_file=None,
        field_strength=3.0,
        mixing="signal",
        gain="global",
        smoothness=0.0,
        max_iter=200,
        noise_weighting="auto",
        device="cpu",
        out_dir="",
        out_probabilities="tissue_probabilities.nii.gz",
        out_labels="tissue_labels.nii.gz",
        out_t1="t1.nii.gz",
        out_t2="t2.nii.gz",
        out_pd="pd.nii.gz",
        out_predicted="predicted.nii.gz",
        out_status="tissue_status.nii.gz",
    ):
        """Fit grey matter, white matter and CSF probability maps.

        A BMapEst-style fit: each tissue's T1, T2 and proton density (the
        literature values at the field strength, or a tissues file) give
        its signal in each known sequence; the tissue proportions of each
        voxel are fitted to the images.

        Parameters
        ----------
        input_files : string or Path
            Path to the images (4-D NIfTI, one volume per sequence). This
            path may contain wildcards to process multiple inputs at once.
        sequences_files : string or Path
            Text file, one sequence per line in the order of the volumes,
            e.g. "Flash tr=0.02 te=0.004 flip_angle=30" (seconds, degrees;
            Flash, SpinEcho, InversionRecovery or Mprage).
        mask_files : string or Path, optional
            Path to the brain mask, used for every input (default: every
            voxel).
        tissues_file : string or Path, optional
            JSON file {"csf": {"t1": 4.3, "t2": 2.0, "pd": 1.0}, ...}
            (seconds) replacing the literature values.
        field_strength : float, optional
            1.5 or 3 (tesla), for the literature tissue values.
        mixing : string, optional
            signal (partial volumes add; exact) or parameters (BMapEst:
            T1, T2, PD are mixed; lattice search, then Levenberg-Marquardt,
            or back-propagation with --smoothness).
        gain : string, optional
            global (one unknown intensity scale), voxel (one per voxel;
            needs as many sequences as tissues) or a number (known).
        smoothness : float, optional
            Weight of the spatial smoothness of the probabilities (0: none).
        max_iter : int, optional
            Iterations of the gradient refinement.
        noise_weighting : string, optional
            auto (on when there are more sequences than tissues), on or off:
            weight each image by its noise, estimated from the residuals.
        device : string, optional
            cpu or cuda.
        out_dir : string or Path, optional
            Output directory.
        out_probabilities : string, optional
            Name of the 4-D probability maps (tissue order of the model:
            csf, gm, wm by default).
        out_labels : string, optional
            Name of the label map (1..n_tissues, 0 outside the mask).
        out_t1 : string, optional
            Name of the probability-weighted T1 map (seconds).
        out_t2 : string, optional
            Name of the probability-weighted T2 map (seconds).
        out_pd : string, optional
            Name of the probability-weighted proton density map.
        out_predicted : string, optional
            Name of the predicted images (4-D).
        out_status : string, optional
            Name of the status map: 0 fitted, 5 poorly fitted (the images
            miss the prediction by more than 25 %), 1 not fitted (NaN, inf
            or negative images), -2 outside the mask.

        References
        ----------
        .. [1] Gupta U., Nikolakakis E., Zaiss M., Marinescu R. BMapEst:
           Estimation of Brain Tissue Probability Maps using a
           Differentiable MRI Simulator.
        """
        try:
            gain = float(gain)
        except ValueError:
            pass
        weighting = {"auto": None, "on": True, "off": False}
        if noise_weighting not in weighting:
            raise ValueError(
                f"noise_weighting must be auto, on or off, got {noise_weighting!r}."
            )
        options = dict(
            tissues=_read_tissues(tissues_file),
            field_strength=field_strength,
            mixing=mixing,
            gain=gain,
            smoothness=smoothness,
            max_iter=max_iter,
            noise_weighting=weighting[noise_weighting],
            device=device,
        )
        io_it = self.get_io_iterator()
        # The core's refusals (its files) in the command's flags.
        flags = flag_names("out_dir", *getattr(io_it, "out_keys", ()))
        with options_as_flags(flags):
            for inputs in io_it:
                image_file, sequence_file = inputs[0], inputs[1]
                outputs = inputs[-7:]
                # Before the fit: outputs that clash, or a folder that cannot
                # hold them, are refused before the work, not after it.
                check_outputs(zip(io_it.out_keys, outputs, strict=True))
                folder = writable_folder(
                    os.path.dirname(os.path.abspath(outputs[0])),
                    "outputs",
                    fix="pass an --out_dir that is a folder you can write to.",
                )
                with output_lock(
                    folder, command="dipy_fit_tissue_maps", option="out_dir"
                ):
                    self._fit_and_save(
                        image_file, sequence_file, mask_files, outputs, options
                    )

    def _fit_and_save(self, image_file, sequence_file, mask_file, outputs, options):
        """Fit one dataset and write its maps (the output folder is held)."""
        oprob, olab, ot1, ot2, opd, opred, ostatus = outputs
        logger.info(f"Tissue maps of {image_file}")
        image = load_image(image_file, "input_files")
        affine = image.affine
        images = _read_data(image, "input_files")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(
                f"{image_file} has {images.ndim} dimensions (shape "
                f"{images.shape}); input_files must be 4-D, one 3-D image "
                "per sequence on the last axis."
            )
        mask = None
        if mask_file:
            mask_image = load_image(mask_file, "mask file")
            check_same_space(mask_image.affine, affine, mask_file, image_file)
            mask = check_mask_values(
                _read_data(mask_image, "mask file"), f"mask file {mask_file}"
            )
        model = TissueMapModel(read_sequences(sequence_file), **options)
        logger.info(f"{model}")
        fit = model.fit(images, mask=mask)
        logger.info(f"Fitted gain {np.median(fit.gain):.4g}")
        # Written atomically, in the input's space (its header's codes).
        space = dict(affine=affine, reference=image)
        save_image(oprob, fit.probabilities.astype(np.float32), **space)
        save_image(olab, fit.labels.astype(np.uint8), **space)
        for path, values in ((ot1, fit.t1), (ot2, fit.t2), (opd, fit.pd)):
            save_image(path, values.astype(np.float32), **space)
        save_image(opred, fit.predict().astype(np.float32), **space)
        save_image(ostatus, fit.status, **space)
        poor = int((fit.status == POOR_FIT).sum())
        if poor:
            logger.warning(
                f"{poor} of {int(fit.mask.sum())} voxel(s) are fitted poorly "
                f"(status {POOR_FIT} in {ostatus}): the images miss the "
                "prediction by more than "
                f"{model.misfit_threshold:.0%}; check the sequences file "
                "(order, timings) and the tissue values."
            )
        logger.info(f"Tissue maps saved to {oprob}")


def main():
    """Console-script entry point of ``dipy_fit_tissue_maps``
    (:func:`dipy_spinverse.workflows.cli.run_command`)."""
    return run_command(TissueMapsFlow())


if __name__ == "__main__":
    main()
