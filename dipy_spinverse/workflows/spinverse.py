"""Command line: ``dipy_fit_spinverse``, a DIPY workflow.

Usage (the demo data of :func:`dipy_spinverse.data.make_phantom_dataset`)::

    dipy_fit_spinverse dwi.nii.gz dwi.bval dwi.bvec mask.nii.gz \\
        --timing_file timing.txt --max_iter 40 --out_dir spinverse_out

As every DIPY workflow, the ``run`` docstring defines the command-line
options; positional inputs may contain wildcards to process several datasets.
"""

import json
import os
import pathlib
import re
import time

import numpy as np
from dipy.utils.logging import logger
from dipy.workflows.workflow import Workflow

from ..checks import (
    check_choice,
    check_int,
    check_mask_values,
    check_number,
    check_same_space,
)
from ..files import (
    atomic_write,
    check_outputs,
    describe_cause,
    load_image,
    output_lock,
    read_voxels,
    save_image,
    writable_folder,
)
from ..io.checkpoint import Checkpoint, checkpoint_for
from ..io.fits import load_fit, save_fit
from ..io.gradients import B0_THRESHOLD, BVECS_TOL, read_gradients
from ..io.maps import (
    MESH_MAPS,
    describe_status,
    save_map,
    save_permeability,
    save_posterior,
    save_predicted,
)
from ..io.surfaces import (
    remove_voxel_meshes,
    save_smooth_mesh,
    save_voxel_meshes,
    surface_slabs,
    volume_surface,
)
from ..meshfit.refine import check_refine_options
from ..posterior import TissuePrior, TrainingOptions
from ..reconst import FLAGGED, STATUS_CODES, SpinverseModel
from ..reconst.model import FIT_METHODS
from ..reconst.posterior_model import NOISE_HINT
from ..reconst.resume import check_resume
from ..reconst.search_model import check_search_options
from .cli import run_command
from .report import write_posterior_report, write_report

__all__ = [
    "SpinverseFlow",
    "main",
    "parse_mesh_options",
    "METRICS",
    "DEFAULT_METRICS",
    "SMOOTH_MESH_FORMATS",
]

#: What ``--save_metrics`` chooses from: the scalar maps (named as the
#: ``SpinverseFit`` attributes, ``s0`` as in DIPY's workflows), the predicted
#: signal, the per-face permeability and the barrier surfaces (``mesh``: GIFTI
#: and PLY). All but ``permeability`` are written by default
#: (:data:`DEFAULT_METRICS`).
METRICS = (
    "restricted_fraction",
    "surface_to_volume",
    "membrane_permeability",
    "n_compartments",
    "residual",
    "uncertainty",
    "status",
    "s0",
    "predicted",
    "permeability",
    "mesh",
)

#: The outputs written without ``--save_metrics``. The per-face
#: permeability (1,008 values a voxel on the default grid) is kept per mask
#: voxel in the fit state (``out_state``; ``load_fit(path).permeability``)
#: and written as a 4-D image only when asked for.
DEFAULT_METRICS = tuple(name for name in METRICS if name != "permeability")

#: File formats of the smooth meshes (``--refine_mesh``), one file per voxel.
SMOOTH_MESH_FORMATS = ("vtp", "ply", "vtk", "gii")


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


_KEPT_AFTER_INTERRUPT = (
    "the voxels fitted so far are kept in {}; run the same command again to continue"
)


class SpinverseFlow(Workflow):
    #: What ``cli.run_command`` says after Ctrl-C: the checkpoint keeps every
    #: finished chunk, and the same command continues from it. Once the fit
    #: starts, :meth:`run` names the checkpoint file itself.
    on_interrupt = _KEPT_AFTER_INTERRUPT.format("<out_state>.partial.h5")

    @classmethod
    def get_short_name(cls):
        return "spinverse"

    def run(
        self,
        input_files,
        bvalues_files,
        bvectors_files,
        mask_files,
        *,
        big_delta=None,
        small_delta=None,
        timing_file=None,
        scheme_file=None,
        b0_threshold=B0_THRESHOLD,
        bvecs_tol=BVECS_TOL,
        grid_size=None,
        grid_resolution=4,
        boundary="reflecting",
        diffusivity=0.002,
        sigma=None,
        snr=None,
        preset="default",
        max_iter=None,
        search_bootstrap=0,
        search_proposal=0,
        batch_size=32,
        engine="serial",
        address=None,
        n_jobs=None,
        device="cpu",
        dtype="float32",
        n_report=4,
        save_metrics=None,
        voxel_meshes=False,
        refine_mesh=False,
        mesh_options=None,
        smooth_mesh_format="vtp",
        resume=False,
        fit_method="search",
        posterior_options=None,
        out_dir="",
        out_restricted_fraction="restricted_fraction.nii.gz",
        out_surface_to_volume="surface_to_volume.nii.gz",
        out_membrane_permeability="membrane_permeability.nii.gz",
        out_n_compartments="n_compartments.nii.gz",
        out_residual="residual.nii.gz",
        out_uncertainty="uncertainty.nii.gz",
        out_status="status.nii.gz",
        out_s0="s0.nii.gz",
        out_predicted="predicted.nii.gz",
        out_permeability="permeability.nii.gz",
        out_state="spinverse_fit.npz",
        out_mesh_gifti="barriers.gii",
        out_mesh_ply="barriers.ply",
        out_voxel_meshes="voxel_meshes",
        out_mesh_volume="mesh_volume.nii.gz",
        out_mesh_surface_to_volume="mesh_surface_to_volume.nii.gz",
        out_mesh_radius="mesh_radius.nii.gz",
        out_smooth_meshes="smooth_meshes",
        out_report="report.png",
        out_posterior="posterior",
    ):
        """Fit Spinverse membranes and permeabilities voxel by voxel.

        Each voxel is represented by a tetrahedral grid whose faces carry a
        membrane permeability, fitted to the voxel's signal through a
        differentiable Bloch-Torrey simulator. Needs the gradient timing:
        --big_delta and --small_delta, a --timing_file or a Camino
        --scheme_file. Saves NIfTI maps, the predicted signal, the per-face
        permeability, the barrier surfaces of the whole volume in scanner
        coordinates (GIFTI and PLY; per-voxel micrometre meshes with
        --voxel_meshes), the full fit state (.npz, resumable with --resume)
        and a PNG report (with matplotlib): the slice of the maps with the
        most fitted voxels and a few voxels. Each output goes to its own
        out_* path, written atomically (a temporary file, then a rename).
        The fit state is written last: the outputs of a run that failed
        before it are overwritten by the next run, not skipped.

        Parameters
        ----------
        input_files : string or Path
            Path to the diffusion data (4-D NIfTI). This path may contain
            wildcards to process multiple inputs at once.
        bvalues_files : string or Path
            Path to the b-values files (FSL format). This path may contain
            wildcards to use multiple bvalues files at once.
        bvectors_files : string or Path
            Path to the b-vectors files (FSL format). This path may contain
            wildcards to use multiple bvectors files at once.
        mask_files : string or Path
            Path to the masks of the voxels to fit. This path may contain
            wildcards to use multiple masks at once.
        big_delta : float, optional
            Time between the starts of the gradient pulses, in seconds (the
            same for every volume).
        small_delta : float, optional
            Gradient pulse duration, in seconds (the same for every volume).
        timing_file : string or Path, optional
            Text file with one row "small_delta big_delta" (seconds) per
            volume; lines starting with # are ignored.
        scheme_file : string or Path, optional
            Camino STEJSKALTANNER scheme file with the full protocol (its
            b-values must agree with the b-values file).
        b0_threshold : float, optional
            b-values at or below this are b=0 volumes.
        bvecs_tol : float, optional
            Tolerance on the unit length of the b-vectors.
        grid_size : float, optional
            Side of the simulated box in um (default 80/3, the published
            576-tetrahedron grid with grid_resolution 4).
        grid_resolution : int, optional
            BCC cubes per side of the grid.
        boundary : string, optional
            Outer boundary of the box: reflecting, periodic or absorbing.
        diffusivity : float, optional
            Intrinsic diffusivity in mm^2/s.
        sigma : string, optional
            Noise standard deviation in the units of the data, as in DIPY's
            workflows, or ``auto`` to estimate it with DIPY's
            ``estimate_sigma``, the median over the volumes (up to 64,
            evenly spread; logged). The fit uses it over the median b=0
            signal of the mask (1/SNR; logged). Leave it and --snr out if
            unknown. With it the loss is Rician-aware, and the label search
            ranks shapes and accepts moves only beyond the noise.
        snr : float, optional
            Signal-to-noise ratio of the b=0 signal, instead of --sigma.
        preset : string, optional
            Inversion configuration (default or paper).
        max_iter : int, optional
            Total iterations per voxel; the preset's curriculum is scaled to
            it (default: the preset's, 200 for default and 400 for paper).
        search_bootstrap : int, optional
            Repeat the label search on this many wild-bootstrap replicates
            of each voxel (its fit plus its residuals with random signs) and
            fold how far their answers move into the uncertainty map: an
            answer that fits only by the accident of one noise draw, or one
            local minimum among many, then reads as uncertain. Each
            replicate costs about one more search (0: off; 3 was measured,
            doc/validation/generalisation.md).
        search_proposal : int, optional
            Start the label search also from samples of a learned proposal
            trained on this many random substrates simulated for this grid,
            protocol and diffusivity (0: off; 4000 was measured, about 30
            minutes on 2 CPU cores the first time, then read from the cache,
            doc/validation/generalisation.md).
        batch_size : int, optional
            Voxels fitted together in one batched call.
        engine : string, optional
            serial (batched on one device), joblib (local processes), ray or
            dask (a cluster: see --address). ray and dask need
            pip install "dipy_spinverse[parallel]".
        address : string, optional
            The cluster: for ray a running cluster's address (host:port), auto
            (the cluster on this machine) or local (a new local instance;
            default: RAY_ADDRESS when set, else a local instance); for dask a
            scheduler address, tcp://host:port (default: a local cluster of
            n_jobs processes). On a cluster with GPUs and --device cuda, each
            worker fits on its own GPU.
        n_jobs : int, optional
            Workers of a parallel engine started here (default all cores).
        device : string, optional
            cpu or cuda.
        dtype : string, optional
            float32 (default, fast) or float64.
        n_report : int, optional
            Voxels shown in the PNG report beside the maps (0 for no report).
        save_metrics : variable string, optional
            List of outputs to save (default all but permeability). Possible
            values: restricted_fraction, surface_to_volume,
            membrane_permeability, n_compartments, residual, uncertainty
            (label search only), status, s0, predicted, permeability (the
            per-face permeability as a 4-D image, one volume per grid face;
            always kept per mask voxel in out_state), mesh (the barrier
            surfaces, GIFTI and PLY).
        voxel_meshes : bool, optional
            Also write each voxel's barrier surface in micrometres, one .vtp
            file (VTK XML PolyData) per voxel with a barrier, in
            out_voxel_meshes.
        refine_mesh : bool, optional
            After the label search, refine each fitted voxel's largest cell
            into a smooth tetrahedral mesh fitted to the voxel's signal
            (about a minute per voxel on one core). Writes the mesh maps
            (out_mesh_volume, out_mesh_surface_to_volume, out_mesh_radius;
            NaN where a voxel's mesh was not refined) and one surface file
            per refined voxel (um, the voxel's box) in out_smooth_meshes.
            Needs the label search (--preset default).
        mesh_options : string, optional
            Options of the refinement as a JSON object, e.g.
            '{"template": "tube", "n_modes": 8, "max_iter": 30}' (keys:
            template, resolution, layers, n_modes, directions, surface_iter,
            max_iter, learning_rate, penalty, length_scale, basis_every,
            code, axon_periods); only with --refine_mesh.
        smooth_mesh_format : string, optional
            File format of the smooth meshes: vtp (VTK XML PolyData), ply,
            vtk (legacy VTK) or gii (GIFTI).
        resume : bool, optional
            Continue the fit from the checkpoint an interrupted run left
            beside out_state (name.partial.h5), or a finished one from
            out_state; implies overwriting the other outputs. Without it a
            rerun also continues an interrupted fit of the same data, mask and
            settings (delete name.partial.h5 to start over).
        fit_method : string, optional
            search (default): the face fit and label search, with membranes
            and meshes. posterior: the amortised posterior of the tissue
            descriptors (restricted fraction, cell count, volume and
            diameter, surface-to-volume, permeability, exchange time,
            anisotropy, orientation), with 50 % and 90 % credible intervals
            and an out-of-prior status, in out_posterior; needs --snr or
            --sigma and trains once per protocol (cached). Writes out_posterior,
            out_status, out_report and out_state only.
        posterior_options : string, optional
            JSON object with the posterior's settings, or a file holding one
            (the demo writes demo/posterior.json): "prior" (fields of
            dipy_spinverse.posterior.TissuePrior, e.g. {"cell_diameter": [1,
            5], "families": ["fibre"]}), "training" (fields of
            TrainingOptions, e.g. {"n_simulations": 5000}) and "n_samples"
            (posterior draws per voxel). With --fit_method search a "prior"
            turns on the surface check: each voxel's surface is held against
            the posterior of that prior (its box must be the grid's: e.g.
            {"boundary": "reflecting", "box_side": 26.67}, or the demo's
            surface_check.json), its uncertainty raised to the bound the restricted
            volume implies, and voxels of uncertainty 0.1 or more get status
            7 (UNCERTAIN_SURFACE); the barriers of voxels of a warning
            status (5, 7, 8 or 9) are written apart (to out_mesh_gifti and
            out_mesh_ply with _uncertain before the extension). Needs --snr
            or --sigma.
        out_dir : string or Path, optional
            Output directory.
        out_restricted_fraction : string, optional
            Name of the restricted (enclosed) volume fraction map.
        out_surface_to_volume : string, optional
            Name of the membrane surface-to-volume map (1/um).
        out_membrane_permeability : string, optional
            Name of the mean membrane permeability map (m/s).
        out_n_compartments : string, optional
            Name of the map of the number of enclosed compartments.
        out_residual : string, optional
            Name of the RMS misfit map (fraction of S0).
        out_uncertainty : string, optional
            Name of the label search's uncertainty map: expected 1 - IoU of
            the surfaces the data allow against the one fitted (0: no other
            surface fits; near 1: a guess). Not written with --preset paper.
        out_status : string, optional
            Name of the per-voxel status map (0 = ok).
        out_s0 : string, optional
            Name of the fitted S0 map.
        out_predicted : string, optional
            Name of the predicted signal (4-D).
        out_permeability : string, optional
            Name of the per-face permeability (4-D, m/s).
        out_state : string, optional
            Name of the saved fit (.npz), loadable with
            dipy_spinverse.io.load_fit; written last, when every other output
            is. During the fit, each finished chunk of voxels is written
            once to the checkpoint store name.partial.h5 (HDF5).
        out_mesh_gifti : string, optional
            Name of the barrier surfaces of the volume in scanner coordinates
            (mm), GIFTI: each voxel's surfaces scaled into that voxel through
            the affine, as ODF glyphs are. Not written when no voxel has a
            barrier (nor is out_mesh_ply).
        out_mesh_ply : string, optional
            Name of the same surfaces as binary PLY, with the voxel (flat
            index) and the membrane permeability of each vertex.
        out_voxel_meshes : string, optional
            Name of the folder of per-voxel meshes (with --voxel_meshes).
            Mesh files a previous run left there (voxel_*.vtp, .ply, .vtk)
            are removed.
        out_mesh_volume : string, optional
            Name of the smooth cell volume map (um^3; with --refine_mesh).
        out_mesh_surface_to_volume : string, optional
            Name of the map of the smooth cell's own membrane area over its
            volume (1/um; with --refine_mesh).
        out_mesh_radius : string, optional
            Name of the smooth cell radius map (um; with --refine_mesh).
        out_smooth_meshes : string, optional
            Name of the folder of smooth cell surfaces, one
            voxel_<i>_<j>_<k> file per refined voxel (with --refine_mesh).
            Mesh files a previous run left there are removed.
        out_report : string, optional
            Name of the PNG report (needs matplotlib: without it the report is
            skipped with a warning).
        out_posterior : string, optional
            Folder of the posterior's maps (--fit_method posterior): per
            descriptor the median and the 50 % and 90 % interval bounds,
            units in each header's description.

        References
        ----------
        .. [1] Khole, P. P., Brenes, et al. (2026). Spinverse: Differentiable
           Physics for Permeability-Aware Microstructure Reconstruction from
           Diffusion MRI.
        """
        if resume:
            self._force_overwrite = True
        metrics = _check_metrics(save_metrics)
        n_report = check_int(n_report, "n_report", 0)
        mesh_options = parse_mesh_options(mesh_options, refine_mesh=refine_mesh)
        noise = _noise_option(sigma, snr)
        fit_method = check_choice(fit_method, "fit_method", tuple(FIT_METHODS))
        posterior = parse_posterior_options(posterior_options, diffusivity)
        # The chosen model's options are checked by the model's own check
        # before any data is read; only its messages are put in flag names.
        if fit_method == "posterior":
            _refuse_search_flags(
                max_iter=max_iter,
                refine_mesh=refine_mesh,
                search_bootstrap=search_bootstrap,
                search_proposal=search_proposal,
            )
            config = None
        else:
            config = _checked_options(
                preset=preset,
                max_iter=max_iter,
                refine_mesh=bool(refine_mesh),
                prior=posterior.get("prior"),
                posterior_options=posterior.get("posterior_options"),
                **_given(
                    search_bootstrap=search_bootstrap,
                    search_proposal=search_proposal,
                ),
            )
        needs_noise = fit_method == "posterior" or "prior" in posterior
        if needs_noise and noise is None:
            what = (
                "--fit_method posterior"
                if fit_method == "posterior"
                else 'The surface check (a "prior" in --posterior_options)'
            )
            raise ValueError(f"{what} needs the noise level: {_FLAGS[NOISE_HINT]}.")
        if (
            bool(save_metrics)
            and "uncertainty" in metrics
            and not (config and config.searches_labels)
        ):
            raise ValueError(
                "--save_metrics uncertainty comes from the label search, which "
                f"--preset {preset} does not run; use --preset default."
            )
        check_number(bvecs_tol, "bvecs_tol", minimum=0.0)
        smooth_mesh_format = check_choice(
            smooth_mesh_format, "smooth_mesh_format", SMOOTH_MESH_FORMATS
        )
        writable_folder(out_dir or ".", "outputs", fix="give a writable --out_dir")
        try:
            io_it = self.get_io_iterator()  # DIPY creates the output folders
        except OSError as err:
            raise ValueError(
                f"cannot create the output folders under --out_dir "
                f"{out_dir or '.'} ({describe_cause(err)}: {err.filename}); give a "
                "writable --out_dir and out_* names that are file names."
            ) from err
        for dwi, bval, bvec, maskfile, *outputs in io_it:
            # Outputs by name: every one has its own path (out_dir joined).
            out = dict(zip(io_it.out_keys, outputs, strict=True))
            ostate = out["out_state"]
            # Before the fit: an output that clashes or cannot be written
            # would fail after the voxels' work, or overwrite another.
            check_outputs(_written_paths(out), folders=FOLDER_OUTPUTS)
            folder = writable_folder(
                os.path.dirname(os.path.abspath(ostate)),
                "outputs",
                fix="give a writable --out_dir",
            )
            with output_lock(folder, command="dipy_fit_spinverse"):
                logger.info(f"Spinverse fit of {dwi}")
                image = load_image(dwi, "input_files")
                affine = image.affine
                if image.ndim != 4:
                    squeeze = (
                        " Save it without the axis of length 1 after x, y, z."
                        if image.ndim == 5 and 1 in image.shape[3:]
                        else ""
                    )
                    raise ValueError(
                        f"{dwi} has {image.ndim} dimensions (shape {image.shape}); "
                        "input_files must be 4-D diffusion images (x, y, z, volumes)."
                        + squeeze
                    )
                mask_image = load_image(maskfile, "mask file")
                _check_same_space(mask_image.affine, affine, maskfile, dwi)
                try:
                    mask_values = np.asanyarray(mask_image.dataobj)
                except (EOFError, OSError, ValueError) as err:
                    raise ValueError(
                        f"mask file {maskfile} is damaged or truncated ({err}); "
                        "write it again."
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
                # The mask's voxels only, one volume at a time: memory grows
                # with the mask, not with the image.
                data = read_voxels(image, mask, "input_files")
                table = read_gradients(
                    bval,
                    bvec,
                    n_volumes=data.shape[-1],
                    big_delta=big_delta,
                    small_delta=small_delta,
                    timing_file=timing_file,
                    scheme_file=scheme_file,
                    b0_threshold=b0_threshold,
                    bvecs_tol=bvecs_tol,
                    data=data,
                )
                space = dict(affine=affine, reference=image)
                sigma = relative_sigma(noise, image, data, table)
                if fit_method == "posterior":
                    _run_posterior(
                        table,
                        data,
                        mask,
                        out,
                        space=space,
                        sigma=sigma,
                        diffusivity=diffusivity,
                        n_report=n_report,
                        options=posterior,
                    )
                    continue
                model = SpinverseModel(
                    table,
                    grid_size=grid_size,
                    grid_resolution=grid_resolution,
                    boundary=boundary,
                    diffusivity=diffusivity,
                    preset=preset,
                    max_iter=max_iter,
                    batch_size=batch_size,
                    device=device,
                    dtype=dtype,
                    refine_mesh=bool(refine_mesh),
                    mesh_options=mesh_options,
                    **posterior,
                    **_given(
                        sigma=sigma,
                        search_bootstrap=search_bootstrap,
                        search_proposal=search_proposal,
                    ),
                )
                logger.info(f"{model}; {int(mask.sum())} voxels in the mask")
                state = _npz(ostate)
                if state != os.fspath(ostate):
                    logger.info(f"The fit state is an .npz archive: writing {state}.")
                checkpoint = checkpoint_for(state)
                previous = _previous_fit(model, data, mask, state, resume=resume)
                self.on_interrupt = _KEPT_AFTER_INTERRUPT.format(checkpoint)
                fit = model.fit(
                    data,
                    mask=mask,
                    engine=engine,
                    address=address,
                    n_jobs=n_jobs,
                    verbose=True,
                    checkpoint=Checkpoint(checkpoint),
                    resume=previous,
                )
                written = _save_outputs(
                    fit, out, space=space, metrics=metrics, voxel_meshes=voxel_meshes
                )
                written += _save_smooth_meshes(
                    fit, out, space=space, ext="." + smooth_mesh_format
                )
                if n_report:
                    report = write_report(
                        fit, data, out["out_report"], n_voxels=n_report
                    )
                    written += [report] if report else []
                _remove_stale_outputs(out, written)
                # Last: the state's presence tells manage_output_overwrite that
                # this run finished.
                save_fit(fit, state)
                if os.path.isfile(checkpoint):
                    os.remove(checkpoint)
                logger.info(f"Voxel status: {describe_status(fit.status[fit.mask])}")
                folder = os.path.commonpath(
                    [os.path.abspath(p) for p in written + [state]]
                )
                logger.info(
                    f"Spinverse outputs: {len(written)} files and the fit state "
                    f"{state}, in {folder}"
                )

    def manage_output_overwrite(self):
        """DIPY's check, except that an unfinished run's outputs are redone.

        DIPY skips the whole run when any output file exists, unless --force.
        The fit state is written after every other output, so outputs without
        it are what a failed or interrupted run left: those are overwritten,
        with a warning, instead of the rerun silently doing nothing.
        """
        if not self._force_overwrite:
            keys = list(self.last_generated_outputs)
            states = self.flat_outputs[keys.index("out_state") :: len(keys)]
            unfinished = [path for path in states if not os.path.isfile(_npz(path))]
            left = [path for path in self.flat_outputs if os.path.isfile(path)]
            if unfinished and left:
                logger.warning(
                    f"No fit state at {', '.join(map(_npz, unfinished))}: the "
                    f"{len(left)} output files there are from a run that did not "
                    "finish; running again (from its checkpoint, if it left one) "
                    "and overwriting them."
                )
                return True
        return super().manage_output_overwrite()


#: The model's words for its options, and the command's flags for them, in
#: the order they are put in (a phrase before the words inside it).
_FLAGS = {
    NOISE_HINT: "(--snr: of the b=0 signal, e.g. 50; --sigma: in the data's "
    "units, or auto)",
    "sigma": "--sigma/--snr",
    "search_bootstrap": "--search_bootstrap",
    "search_proposal": "--search_proposal",
    "max_iter": "--max_iter",
    "preset='default'": "--preset default",
    "preset": "--preset",
    "posterior_options": "--posterior_options",
    "a prior": 'a "prior" in --posterior_options',
    "leave prior out": 'leave "prior" out',
    "refine_mesh=True": "--refine_mesh",
    "refine_mesh": "--refine_mesh",
    " or use parametrisation='cell'": "",
}


def _given(**options):
    """The options set (0 means unknown or off: left out, so that presets
    without a noise model or a label search accept the defaults)."""
    return {name: value for name, value in options.items() if value}


def _refuse_search_flags(**flags):
    """Refuse the label search's flags with ``--fit_method posterior``."""
    given = [f"--{name}" for name, value in flags.items() if value]
    if given:
        raise ValueError(
            f"{', '.join(given)} set the label search, which --fit_method "
            "posterior does not run; leave them out or use --fit_method search."
        )


def _checked_options(**options):
    """Check these flags with the search model's own check
    (:func:`~dipy_spinverse.reconst.search_model.check_search_options`), which
    returns the inversion's configuration; its message, if it refuses them,
    names the flags."""
    try:
        return check_search_options(**options)
    except ValueError as err:
        message = str(err)
        for option, flag in _FLAGS.items():
            message = re.sub(rf"(?<![\w-]){re.escape(option)}(?![\w])", flag, message)
        raise ValueError(message) from err


def parse_posterior_options(text, diffusivity):
    """``--posterior_options`` (a JSON object, or a file holding one) as
    SpinverseModel keywords (dict)."""
    if not text:
        return {}
    if not text.lstrip().startswith("{"):
        try:
            text = pathlib.Path(text).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(
                f"--posterior_options {text!r} is neither a JSON object nor a "
                f"readable JSON file ({err}); pass e.g. "
                '\'{"prior": {"cell_diameter": [1, 5]}}\' or demo/posterior.json.'
            ) from err
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--posterior_options is not valid JSON ({err}); e.g. "
            '\'{"prior": {"cell_diameter": [1, 5]}, "training": '
            '{"n_simulations": 5000}}\'.'
        ) from err
    known = {"prior", "training", "n_samples"}
    if not isinstance(options, dict) or set(options) - known:
        raise ValueError(
            f"--posterior_options must be a JSON object with keys among "
            f"{sorted(known)}, got {text!r}."
        )
    out = {}
    try:
        if "prior" in options:
            prior = {"diffusivity": diffusivity, **options["prior"]}
            out["prior"] = TissuePrior(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in prior.items()}
            )
        if "training" in options:
            training = options["training"]
            out["posterior_options"] = TrainingOptions(
                **{
                    k: tuple(v) if isinstance(v, list) else v
                    for k, v in training.items()
                }
            )
    except TypeError as err:
        raise ValueError(f"--posterior_options: {err}.") from err
    if "n_samples" in options:
        out["n_posterior_samples"] = options["n_samples"]
    return out


def _noise_option(sigma, snr):
    """The noise options as ``None`` (unknown), ``("snr", value)``,
    ``("sigma", value)`` or ``("auto", None)``; 0 means unknown."""
    if sigma is not None and snr is not None:
        raise ValueError("Give the noise once: --sigma or --snr, not both.")
    if snr is not None:
        snr = check_number(snr, "snr", minimum=0.0)
        if snr == 0:
            return None
        if snr <= 1:
            raise ValueError(
                f"--snr {snr:g}: the SNR is the b=0 signal over the noise, and at "
                "or below 1 the noise is as large as the signal; pass the SNR of "
                "the b=0 images (e.g. 20 to 100), or leave --snr out if unknown."
            )
        return "snr", snr
    if sigma is None:
        return None
    if isinstance(sigma, str) and sigma.strip().lower() == "auto":
        return "auto", None
    try:
        value = float(sigma)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"--sigma must be a noise standard deviation in the data's units "
            f"(e.g. 20) or 'auto', got {sigma!r}."
        ) from err
    value = check_number(value, "sigma", minimum=0.0)
    return None if value == 0 else ("sigma", value)


def relative_sigma(noise, image, data, table):
    """The noise over the median b=0 signal of the mask (1/SNR), as the model
    takes it; 0 when unknown.

    Parameters
    ----------
    noise : tuple or None
        From the options: ``("snr", snr)``, ``("sigma", sigma)`` in the data's
        units, or ``("auto", None)``: DIPY's
        :func:`~dipy.denoise.noise_estimate.estimate_sigma` on the b=0
        volumes (read one at a time), the median over them.
    image : nibabel image
        The diffusion image (for ``auto``).
    data : ndarray (n_mask, n_volumes)
        The mask's voxels.
    table : GradientTable
    """
    if noise is None:
        return 0.0
    kind, value = noise
    if kind == "snr":
        return 1.0 / value
    b0 = np.asarray(table.b0s_mask)
    if not b0.any():
        raise ValueError(
            "--sigma needs b=0 volumes to scale the noise by; these data have "
            "none: pass --snr instead."
        )
    s0 = float(np.median(data[:, b0].astype(np.float64).mean(-1)))
    if not s0 > 0:
        raise ValueError(
            f"The median b=0 signal of the mask is {s0:g}; --sigma cannot be "
            "scaled by it. Check the mask, or pass --snr."
        )
    if kind == "auto":
        from dipy.denoise.noise_estimate import estimate_sigma

        # Every volume (or SIGMA_AUTO_MAX_VOLUMES spread over them), as the
        # package's examples do: the b = 0 volume has the most anatomical
        # contrast, which estimate_sigma reads as noise (small_101D: SNR 23.5
        # from the b = 0 alone, 10.9 from every volume).
        chosen = np.unique(
            np.linspace(0, len(b0) - 1, min(len(b0), SIGMA_AUTO_MAX_VOLUMES)).round()
        ).astype(int)
        volumes = [
            float(
                estimate_sigma(np.asarray(image.dataobj[..., i], dtype=np.float32))[0]
            )
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
    relative = value / s0
    logger.info(
        f"Noise: sigma {value:.4g} over the median b=0 signal {s0:.4g} of the "
        f"mask = 1/SNR {relative:.4g} (SNR {1 / relative:.3g})"
        if relative > 0
        else "Noise: sigma 0"
    )
    if relative >= 1:
        raise ValueError(
            f"--sigma {value:.4g} is above the median b=0 signal {s0:.4g}: give "
            "the noise standard deviation in the data's units (or --snr)."
        )
    return relative


def _run_posterior(
    table, data, mask, out, *, space, sigma, diffusivity, n_report, options
):
    """``--fit_method posterior``: fit, maps, status, report and state."""
    model = SpinverseModel(
        table, fit_method="posterior", diffusivity=diffusivity, sigma=sigma, **options
    )
    logger.info(f"Posterior of {model.prior.prior!r}; {int(mask.sum())} voxels")
    fit = model.fit(data, mask=mask)
    written = list(save_posterior(fit, out["out_posterior"], **space).values())
    written.append(save_map_values(fit.status, out["out_status"], **space))
    if n_report:
        report = write_posterior_report(fit, out["out_report"], n_voxels=n_report)
        written += [report] if report else []
    logger.info(f"Voxel status: {fit.status_counts()}")
    with atomic_write(_npz(out["out_state"])) as tmp:
        np.savez(tmp, mask=fit.mask, **fit.params)
    logger.info(f"Spinverse posterior: {len(written)} files in {out['out_posterior']}")


def save_map_values(values, path, *, affine, reference):
    """A status map (int16) of the whole volume, atomically."""
    return save_image(path, np.asarray(values, np.int16), affine, reference)


def _remove_stale_outputs(out, written):
    """Delete output files of an earlier run that this run did not write.

    With --force or --resume and fewer --save_metrics (or no report), an
    earlier run's maps would stay beside the new state and describe
    another fit. The state and the mesh folders are left to the run.
    """
    kept = {os.path.abspath(path) for path in written}
    stale = [
        path
        for key, path in out.items()
        if key not in _FOLDERS_AND_STATE
        and os.path.isfile(path)
        and os.path.abspath(path) not in kept
    ]
    for path in stale:
        os.remove(path)
    if stale:
        logger.info(
            f"Removed {len(stale)} output files of an earlier run that this run "
            f"does not write: {', '.join(map(os.path.basename, stale))}."
        )


#: Outputs that are not one file written by the run's savers.
_FOLDERS_AND_STATE = ("out_state", "out_voxel_meshes", "out_smooth_meshes")


def _npz(path):
    """The state file's path, as save_fit writes it."""
    path = os.fspath(path)
    return path if path.endswith(".npz") else path + ".npz"


#: Outputs that are folders; the other ``out_*`` are files.
FOLDER_OUTPUTS = ("out_voxel_meshes", "out_smooth_meshes", "out_posterior")


def _written_paths(out):
    """``(flag, path)`` of every file or folder a run may write: the outputs
    as given, the state as ``save_fit`` names it, its checkpoint store and
    the ``_uncertain`` barrier files."""
    for key, path in out.items():
        path = os.fspath(path)
        if key == "out_state":
            yield key, _npz(path)
            yield key, checkpoint_for(_npz(path))
            continue
        yield key, path
        if key in ("out_mesh_gifti", "out_mesh_ply"):
            yield key, _suffixed(path, UNCERTAIN_SUFFIX)


def _set_aside(checkpoint):
    """Rename a checkpoint that this run cannot continue, so that starting a
    new fit does not destroy the voxels it holds; the new name."""
    stem = checkpoint[: -len(".h5")] if checkpoint.endswith(".h5") else checkpoint
    kept = f"{stem}.{time.strftime('%Y%m%d-%H%M%S')}.h5"
    os.replace(checkpoint, kept)
    return kept


def _previous_fit(model, data, mask, state, *, resume):
    """The fit to continue: an interrupted one, or with --resume the state.

    With --resume: the checkpoint store, else the finished state, else none
    (a new fit). Without: the checkpoint store when it holds a fit of the
    same data, mask and settings, so that rerunning an interrupted command
    continues it; otherwise a new fit over it, with a warning.
    """
    checkpoint = checkpoint_for(state)
    if resume:
        saved = [path for path in (checkpoint, state) if os.path.isfile(path)]
        if not saved:
            logger.info(f"No saved state at {state}; starting a new fit.")
            return None
        logger.info(f"Resuming the fit saved in {saved[0]}.")
        previous = load_fit(saved[0])
        try:
            check_resume(model, previous, data, mask)
        except ValueError as err:
            raise ValueError(
                f"--resume: {saved[0]} cannot be continued with these inputs "
                f"({err}). Rerun with the files and options it was started with, "
                "or without --resume (and with --force) to fit afresh."
            ) from err
        return previous
    if not os.path.isfile(checkpoint):
        return None
    try:
        previous = load_fit(checkpoint)
        check_resume(model, previous, data, mask)
    except ValueError as err:
        kept = _set_aside(checkpoint)
        logger.warning(
            f"{checkpoint} holds an interrupted fit that cannot be continued "
            f"here ({err}); it is kept as {kept} (delete it if not needed), and "
            "a new fit starts."
        )
        return None
    logger.info(
        f"Continuing the interrupted fit in {checkpoint}: {previous.n_pending} of "
        f"{int(previous.mask.sum())} voxels left (delete it to start over)."
    )
    return previous


def parse_mesh_options(mesh_options, *, refine_mesh=True):
    """The ``--mesh_options`` JSON object as checked refinement options.

    Parameters
    ----------
    mesh_options : str, dict or None
        A JSON object (or a dict) of
        :data:`dipy_spinverse.meshfit.refine.REFINE_DEFAULTS` keys.
    refine_mesh : bool
        Whether ``--refine_mesh`` was given: options without it are refused.

    Returns
    -------
    dict or None
        The options as given (the model fills in and keeps the defaults), or
        None when there are none.

    Raises
    ------
    ValueError
        Naming ``--mesh_options``: not JSON, not an object, an unknown key or
        a value out of range.
    """
    if mesh_options is None or mesh_options == "":
        return None
    if not refine_mesh:
        raise ValueError(
            "--mesh_options are the options of the smooth-mesh refinement; add "
            "--refine_mesh, or leave --mesh_options out."
        )
    example = "'{\"n_modes\": 8}'"
    if isinstance(mesh_options, str):
        try:
            mesh_options = json.loads(mesh_options)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"--mesh_options must be a JSON object such as {example}, got "
                f"{mesh_options!r} ({err})."
            ) from err
    if not isinstance(mesh_options, dict):
        raise ValueError(
            f"--mesh_options must be a JSON object such as {example}, got "
            f"{mesh_options!r}."
        )
    try:
        check_refine_options(mesh_options)
    except ValueError as err:
        raise ValueError(f"--mesh_options: {err}") from err
    return mesh_options


def _save_smooth_meshes(fit, out, *, space, ext):
    """Mesh maps and per-voxel smooth surfaces (``--refine_mesh``); paths."""
    folder = out["out_smooth_meshes"]
    stale = remove_voxel_meshes(folder)
    if stale:
        logger.info(f"Removed {len(stale)} smooth meshes of an old run from {folder}.")
    if not fit.model.refine_mesh:
        return []
    written = [save_map(fit, name, out[f"out_{name}"], **space) for name in MESH_MAPS]
    paths = save_smooth_mesh(fit, folder, ext=ext)
    logger.info(f"{len(paths)} smooth cell meshes (um) in {folder}.")
    return written + list(paths.values())


def _check_metrics(save_metrics):
    """The outputs ``--save_metrics`` asks for (:data:`DEFAULT_METRICS` if none)."""
    if not save_metrics:
        return list(DEFAULT_METRICS)
    if isinstance(save_metrics, str):
        save_metrics = [save_metrics]
    return [check_choice(name, "save_metrics entry", METRICS) for name in save_metrics]


def _save_outputs(fit, out, *, space, metrics, voxel_meshes):
    """Write the chosen outputs, each to its own out_* path; the paths written."""
    written = []
    for metric in metrics:
        if metric == "uncertainty" and fit.uncertainty is None:
            continue  # no label search (refused above when asked for)
        if metric in _MAPS:
            path = out[f"out_{metric}"]
            written.append(save_map(fit, _MAPS[metric], path, **space))
    if "predicted" in metrics:
        written.append(save_predicted(fit, out["out_predicted"], **space))
    if "permeability" in metrics:
        written.append(save_permeability(fit, out["out_permeability"], **space))
    folder = out["out_voxel_meshes"]
    stale = remove_voxel_meshes(folder)
    if stale:
        logger.info(f"Removed {len(stale)} mesh files of a previous run from {folder}.")
    if "mesh" in metrics:
        written += _save_surface(fit, out, affine=space["affine"])
    if voxel_meshes:
        paths = save_voxel_meshes(fit, folder)
        logger.info(f"{len(paths)} voxel meshes (um) in {folder}.")
        written += list(paths.values())
    return written


#: Scalar maps: the --save_metrics name and the io.MAPS name (DIPY's ``s0``).
_MAPS = {
    name: "S0" if name == "s0" else name
    for name in METRICS
    if name not in ("predicted", "permeability", "mesh")
}


#: Fitted voxels per mesh file at most: beyond, the barrier surfaces are
#: written in slabs of whole slices, with an index (a brain's barriers in
#: one file would take gigabytes and no viewer opens them).
MESH_SLAB_VOXELS = 2000


def _save_surface(fit, out, *, affine, max_voxels=MESH_SLAB_VOXELS):
    """The barrier surfaces in scanner coordinates, GIFTI and PLY, if any.

    The trusted voxels' barriers (status ``OK``) go to out_mesh_gifti and
    out_mesh_ply; those of voxels with a warning status
    (:data:`~dipy_spinverse.reconst.FLAGGED`: ``POOR_FIT``,
    ``UNCERTAIN_SURFACE``, ``IMPOSSIBLE_SIGNAL``, ``UNDERDETERMINED``) to
    ``<name>_uncertain.<ext>`` beside them, so that a viewer
    opening the main files shows only surfaces the data determine. One file
    each when the fitted voxels fit in one slab of ``max_voxels``; otherwise
    one file per slab of slices,
    ``<name>_z<first>-<last>.<ext>``, listed in ``<gifti name>.json``.
    """
    status = np.asarray(fit.status)
    uncertain = np.isin(status, FLAGGED)
    written = []
    for suffix, voxels in (("", ~uncertain), (UNCERTAIN_SUFFIX, uncertain)):
        paths = [
            _suffixed(out["out_mesh_gifti"], suffix),
            _suffixed(out["out_mesh_ply"], suffix),
        ]
        written += _save_barriers(fit, paths, voxels, affine, max_voxels)
    if uncertain.any():
        codes = ", ".join(
            f"{int(np.sum(status == code))} {code} ({STATUS_CODES[code]})"
            for code in FLAGGED
            if np.any(status == code)
        )
        logger.warning(
            f"{int(uncertain.sum())} voxels have a warning status ({codes}); "
            f"their barriers are in the *{UNCERTAIN_SUFFIX} mesh files only."
        )
    return written


#: Suffix of the barrier files of the voxels whose surface is uncertain.
UNCERTAIN_SUFFIX = "_uncertain"


def _suffixed(path, suffix):
    stem, ext = os.path.splitext(path)
    return stem + suffix + ext


def _save_barriers(fit, paths, voxels, affine, max_voxels):
    """The barriers of ``voxels`` (a mask of the fit's shape) to ``paths``."""
    index_path = os.path.splitext(paths[0])[0] + ".json"
    stale = [index_path, *paths] + [p for path in paths for p in _slab_files(path)]
    for path in stale:  # a previous run's surfaces are not this run's
        if os.path.isfile(path):
            os.remove(path)
    slabs = surface_slabs(fit, max_voxels)
    if len(slabs) > 1:
        return _save_surface_slabs(
            fit, paths, index_path, slabs, affine=affine, voxels=voxels
        )
    surface = volume_surface(fit, affine=affine, within=voxels)
    if surface.n_triangles:
        return [surface.save(path) for path in paths]
    logger.info(
        f"No voxel for {os.path.basename(paths[0])} has a barrier: no mesh file "
        "written (an empty mesh file would break mesh readers)."
    )
    return []


def _slab_name(path, first, last):
    stem, ext = os.path.splitext(path)
    return f"{stem}_z{first:03d}-{last:03d}{ext}"


def _slab_files(path):
    """Slab files of ``path`` left by an earlier run."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    pattern = re.compile(re.escape(stem) + r"_z\d{3,}-\d{3,}" + re.escape(ext))
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, f) for f in os.listdir(folder) if pattern.fullmatch(f)]


def _save_surface_slabs(fit, paths, index_path, slabs, *, affine, voxels):
    """One surface file per slab and format, and the JSON index of them."""
    along = np.arange(fit.shape[-1]) if len(fit.shape) == 3 else np.zeros(1, int)
    written, entries = [], []
    for first, last in slabs:
        within = voxels & np.broadcast_to((along >= first) & (along <= last), fit.shape)
        surface = volume_surface(fit, affine=affine, within=within)
        if not surface.n_triangles:
            continue
        files = [surface.save(_slab_name(path, first, last)) for path in paths]
        written += files
        entries.append(
            dict(
                slices=[int(first), int(last)],
                files=[os.path.basename(f) for f in files],
                voxels=int(np.sum(fit.fitted & within)),
                triangles=int(surface.n_triangles),
            )
        )
    if not entries:
        return []
    index = dict(
        description="dipy_spinverse barrier surfaces in slabs of slices along "
        "the last voxel axis, scanner coordinates (mm)",
        slabs=entries,
    )
    with atomic_write(index_path) as tmp, open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    logger.info(f"Barrier surfaces in {len(entries)} slabs, listed in {index_path}.")
    return written + [index_path]


def _check_same_space(mask_affine, affine, maskfile, dwi):
    """:func:`~dipy_spinverse.checks.check_same_space` (kept for callers of
    this name)."""
    check_same_space(mask_affine, affine, maskfile, dwi)


def main():
    """Console-script entry point of ``dipy_fit_spinverse``
    (:func:`dipy_spinverse.workflows.cli.run_command`)."""
    return run_command(SpinverseFlow())


if __name__ == "__main__":
    main()
