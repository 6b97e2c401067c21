"""Command line: ``dipy_fit_spinverse``, a DIPY workflow.

Usage (the demo data of :func:`dipy_spinverse.data.make_phantom_dataset`)::

    dipy_fit_spinverse dwi.nii.gz dwi.bval dwi.bvec mask.nii.gz \\
        --timing_file timing.txt --max_iter 40 --out_dir spinverse_out

As every DIPY workflow, the ``run`` docstring defines the command-line
options; positional inputs may contain wildcards to process several datasets.
A run is four steps a dataset: its flags checked once (:mod:`.flags`), the
dataset read (:mod:`.dataset`), the fit (here), the outputs written
(:mod:`.outputs`).
"""

import contextlib
import glob
import os
import time

import numpy as np
from dipy.utils.logging import logger
from dipy.workflows.workflow import Workflow

from ..files import (
    LOCK_NAME,
    STAGING_PREFIX,
    StagedOutputs,
    WriteError,
    cache_root,
    describe_cause,
    output_lock,
    recover_staged,
    writable_folder,
)
from ..io.checkpoint import Checkpoint, checkpoint_for
from ..io.fits import load_fit
from ..io.gradients import B0_THRESHOLD, BVECS_TOL
from ..reconst import SpinverseModel
from ..reconst.model import FIT_METHODS
from ..reconst.resume import check_resume
from .cli import run_command
from .dataset import read_dataset
from .flags import (
    check_flags,
    command_part,
    in_flags,
    parse_mesh_options,
    parse_posterior_options,
)
from .outputs import (
    DEFAULT_METRICS,
    METRICS,
    SMOOTH_MESH_FORMATS,
    check_output_paths,
    state_path,
    write_posterior_outputs,
    write_search_outputs,
)

__all__ = [
    "SpinverseFlow",
    "main",
    "parse_mesh_options",
    "parse_posterior_options",
    "METRICS",
    "DEFAULT_METRICS",
    "SMOOTH_MESH_FORMATS",
]

_NEW_OUTPUTS = "{folder} holds this run's new outputs, complete"


class SpinverseFlow(Workflow):
    """The ``dipy_fit_spinverse`` command (:meth:`run`)."""

    #: What ``cli.run_command`` says after Ctrl-C: the checkpoint keeps every
    #: finished chunk, and the same command continues from it. Once the fit
    #: starts, :meth:`run` names the checkpoint file itself.
    #: What an interrupted run kept (set when a fit starts: before, nothing).
    on_interrupt = ""

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
        out_* path. A dataset's outputs and fit state are one set: written
        into a staging folder in the output folder (.spinverse-staging-<pid>),
        then swapped in by renames for the earlier run's, so that Ctrl-C
        or a failure leaves the earlier outputs or the new ones, never a
        mix (a run killed during the swap is finished by the next run).

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
            evenly spread; logged). Each voxel's relative noise is it over
            the voxel's own b=0 signal (the median SNR is logged). Leave it
            and --snr out if unknown. With it the loss is Rician-aware, and
            the label search ranks shapes and accepts moves only beyond the
            noise.
        snr : float, optional
            Signal-to-noise ratio of the median b=0 signal of the mask,
            instead of --sigma (sigma = that signal / snr).
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
            pip install "dipy_spinverse[parallel]". With --fit_method
            posterior, ray or dask simulate the training set on the cluster
            when the posterior must be trained (the same estimator as a
            serial training).
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
            cpu or cuda: where the label search simulates, or where the
            posterior draws (and simulates its training set, when it trains).
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
            --sigma and trains once per protocol (cached). protocol_free: the
            default prior's posterior of the same descriptors but orientation,
            from the package's estimator, for any protocol of its design,
            without training; needs --snr or --sigma, names the shells it does
            not read and refuses a protocol of none, and continues an
            interrupted fit from its checkpoint, as the search does. Both
            posteriors write out_posterior, out_status, out_report and
            out_state only.
        posterior_options : string, optional
            JSON object with the posterior's settings, or a file holding one
            (the demo writes demo/posterior.json): "prior" (fields of
            dipy_spinverse.posterior.TissuePrior, e.g. {"cell_diameter": [1,
            5], "families": ["fibre"]}), "training" (fields of
            TrainingOptions, e.g. {"n_simulations": 5000}) and "n_samples"
            (posterior draws per voxel; the only one of --fit_method
            protocol_free). With --fit_method search a "prior"
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
            dipy_spinverse.io.load_fit; swapped in with the other outputs,
            one set. During the fit, each finished chunk of voxels is written
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
            Folder of the posterior's maps (--fit_method posterior or
            protocol_free): per descriptor the median and the 50 % and 90 %
            interval bounds, units in each header's description.

        References
        ----------
        .. [1] Khole, P. P., Brenes, et al. (2026). Spinverse: Differentiable
           Physics for Permeability-Aware Microstructure Reconstruction from
           Diffusion MRI.
        """
        # run's arguments by name, before any other local: DIPY builds the
        # command's flags from this signature, check_flags reads them.
        flags = check_flags(dict(locals()))
        if flags.resume:
            self._force_overwrite = True
        # Before any output folder is made: a missing input is named as one.
        check_inputs(
            {
                "input_files": input_files,
                "bvalues_files": bvalues_files,
                "bvectors_files": bvectors_files,
                "mask_files": mask_files,
                "--timing_file": timing_file,
                "--scheme_file": scheme_file,
            }
        )
        # A run refused before its fit leaves no folder it made.
        with _no_empty_folders_left(out_dir or "."):
            writable_folder(out_dir or ".", "outputs", fix="give a writable --out_dir")
            try:
                # DIPY reads run's arguments from this frame, and creates the
                # output folders.
                io_it = self.get_io_iterator()
            except OSError as err:
                raise _folder_error(out_dir, err) from err
            refuse_shared_outputs(io_it)
            # The core's refusals (files, gradients, models) in the flags.
            with in_flags(*getattr(io_it, "out_keys", ())):
                for dwi, bval, bvec, maskfile, *paths in io_it:
                    self._run_one(dwi, bval, bvec, maskfile, paths, io_it, flags)

    def _run_one(self, dwi, bval, bvec, maskfile, paths, io_it, flags):
        """One dataset of :meth:`run`: its outputs checked, its folder held,
        the dataset read and fitted, its outputs written."""
        # Outputs by name: every one has its own path (out_dir joined).
        out = dict(zip(io_it.out_keys, paths, strict=True))
        # Checked before the fit: an output that clashes or cannot be
        # written would fail after the voxels' work, or overwrite another.
        folder = check_output_paths(out)
        with output_lock(folder, command="dipy_fit_spinverse", option="out_dir"):
            logger.info(f"Spinverse fit of {dwi}")
            dataset = read_dataset(
                dwi,
                bval,
                bvec,
                maskfile,
                gradients=flags.gradients,
                noise=flags.noise,
            )
            self._fit(dataset, out, flags, StagedOutputs(folder))

    def _fit(self, dataset, out, flags, staging):
        """The fit of one dataset and its outputs (one set, ``staging``), by
        its method's part (:func:`~.flags.command_part`), saying on Ctrl-C
        what is kept (its method's wording: the checkpoint, or a training's
        simulations) and the output folder's set, earlier or new."""
        folder = staging.folder
        command = FIT_METHODS[flags.fit_method].command
        self.on_interrupt = command.interrupted.format(
            folder=folder,
            checkpoint=checkpoint_for(state_path(out["out_state"])),
            cache=cache_root(),
        )
        try:
            command_part(flags.fit_method, "outputs")(
                dataset, out, flags, staging=staging
            )
        finally:
            if staging.committed:
                self.on_interrupt = _NEW_OUTPUTS.format(folder=folder)

    def manage_output_overwrite(self):
        """DIPY's check, except that an unfinished run's outputs are redone.

        DIPY skips the whole run when any output file exists, unless --force.
        What a killed run left half swapped in is first finished (or its
        staged outputs removed), so that the check sees one whole set. The
        fit state is part of every finished set, so outputs without it are
        what an older failed run left: those are overwritten, with a
        warning, instead of the rerun silently doing nothing.
        """
        keys = list(self.last_generated_outputs)
        states = self.flat_outputs[keys.index("out_state") :: len(keys)]
        for folder in {os.path.dirname(os.path.abspath(p)) for p in states}:
            _recover(folder)
        if not self._force_overwrite:
            unfinished = [
                path for path in states if not os.path.isfile(state_path(path))
            ]
            left = [path for path in self.flat_outputs if os.path.isfile(path)]
            if unfinished and left:
                logger.warning(
                    f"No fit state at {', '.join(map(state_path, unfinished))}: the "
                    f"{len(left)} output files there are from a run that did not "
                    "finish; running again (from its checkpoint, if it left one) "
                    "and overwriting them."
                )
                return True
        return super().manage_output_overwrite()


@contextlib.contextmanager
def _no_empty_folders_left(out_dir):
    """On an error or interrupt in the block, remove the folders of
    ``out_dir`` that it made and left empty: a refused run leaves no empty
    output folder behind. Folders there before, and any holding a file,
    stay."""
    made = _first_missing(out_dir)
    try:
        yield
    except BaseException:
        if made is not None:
            _remove_empty(made)
        raise


def _first_missing(path):
    """The outermost folder of ``path`` (``path`` itself or one of its
    parents) that does not exist: the one that making ``path`` creates; None
    when ``path`` exists."""
    path = os.path.abspath(path)
    missing = None
    while not os.path.lexists(path):
        missing = path
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_empty(folder):
    """Remove ``folder`` and the folders under it that hold no file but an
    output lock, bottom up (a folder that holds any other file stays)."""
    for root, _, files in os.walk(folder, topdown=False):
        if files == [LOCK_NAME]:
            _remove_lock(root)
        with contextlib.suppress(OSError):  # not empty, or gone
            os.rmdir(root)


def _remove_lock(folder):
    """Remove ``folder``'s output lock file while holding it (a run that asks
    for it meanwhile is refused, as while the fit held it); left to a run
    that holds it."""
    from filelock import FileLock, Timeout

    path = os.path.join(folder, LOCK_NAME)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except (Timeout, OSError):
        return
    try:
        with contextlib.suppress(OSError):
            os.unlink(path)
    finally:
        lock.release()


def _recover(folder):
    """:func:`~dipy_spinverse.files.recover_staged` in ``folder``, if a killed
    run left a staging folder there (holding its lock; a folder that another
    run holds is left to it: this run is refused there later)."""
    if not glob.glob(os.path.join(glob.escape(folder), STAGING_PREFIX + "*")):
        return
    try:
        with output_lock(folder, command="dipy_fit_spinverse", option="out_dir"):
            recover_staged(folder)
    except WriteError as err:  # said as it is, not as a folder not made
        raise ValueError(str(err)) from err
    except ValueError:
        pass


def refuse_shared_outputs(io_it):
    """Refuse inputs whose outputs would land on the same paths.

    Several data files (a glob such as ``subj*/dwi.nii.gz``) into one
    ``--out_dir`` get the same output names: the last would overwrite the
    others, and ``--mix_names`` names them after the inputs' file names,
    which such subjects share.

    Parameters
    ----------
    io_it : dipy.workflows.multi_io.IOIterator or list
        The command's input-output iterator (an empty list when DIPY skips
        the run).

    Raises
    ------
    ValueError
        Naming the shared output and two of its inputs.
    """
    outputs = getattr(io_it, "outputs", [])
    inputs = np.array(getattr(io_it, "inputs", [[]])).T  # a row per input set
    owner = {}
    for sources, paths in zip(inputs, outputs, strict=False):
        for path in paths:
            first = owner.setdefault(os.path.abspath(path), sources[0])
            if first != sources[0]:
                raise ValueError(
                    f"{first} and {sources[0]} would both be written to {path}: "
                    "their outputs share their names in --out_dir (--mix_names "
                    "names them after the files, which are named alike). Fit "
                    "one input per call, each with its own --out_dir, e.g. "
                    "for s in subj*; do dipy_fit_spinverse $s/dwi.nii.gz ... "
                    "--out_dir $s/fit; done."
                )


def check_inputs(inputs):
    """Refuse input paths (or glob patterns) that match no file, naming the
    argument and the path.

    Parameters
    ----------
    inputs : dict of str or None
        The command's input arguments, by their names in the command
        (None: not given).

    Raises
    ------
    ValueError
        An input that matches no file.
    """
    for name, pattern in inputs.items():
        if pattern is not None and not glob.glob(os.fspath(pattern)):
            raise ValueError(
                f"{name}: no file matches {pattern!r} (from {os.getcwd()}); check "
                "the path and its spelling."
            )


def _folder_error(out_dir, err):
    """The error of output folders that cannot be created."""
    return ValueError(
        f"cannot create the output folders under --out_dir "
        f"{out_dir or '.'} ({describe_cause(err)}: {err.filename}); give a "
        "writable --out_dir and out_* names that are file names."
    )


def fit_search(dataset, out, flags, *, staging):
    """``--fit_method search``: the fit (continuing an interrupted one), then
    its outputs and state, one set.

    Parameters
    ----------
    dataset : Dataset
        The dataset read (:func:`~dipy_spinverse.workflows.dataset.read_dataset`).
    out : dict
        The ``out_*`` paths by flag name.
    flags : Flags
        The checked flags (:func:`~dipy_spinverse.workflows.flags.check_flags`).
    staging : StagedOutputs
        The staging of the output folder
        (:func:`~dipy_spinverse.workflows.outputs.write_output_set`).
    """
    fit = fit_resumed(dataset, out, flags)
    write_search_outputs(
        fit,
        dataset.data,
        out,
        staging=staging,
        space=dataset.space,
        metrics=flags.metrics,
        voxel_meshes=flags.voxel_meshes,
        mesh_ext=flags.mesh_ext,
        n_report=flags.n_report,
    )


def fit_protocol_free(dataset, out, flags, *, staging):
    """``--fit_method protocol_free``: the fit (continuing an interrupted
    one), then its maps, status, report and state, one set.

    Parameters
    ----------
    dataset : Dataset
        The dataset read, with its noise level.
    out : dict
        The ``out_*`` paths by flag name.
    flags : Flags
        The checked flags.
    staging : StagedOutputs
        The staging of the output folder.
    """
    fit = fit_resumed(dataset, out, flags)
    write_posterior_outputs(
        fit,
        out,
        staging=staging,
        space=dataset.space,
        n_report=flags.n_report,
        discard=[checkpoint_for(state_path(out["out_state"]))],
    )


def fit_resumed(dataset, out, flags):
    """The fit of a method that resumes: an interrupted fit of the same
    data, mask and settings continued from its checkpoint (or, with
    ``--resume``, the state), every chunk kept in the checkpoint beside the
    state as it is fitted.

    Parameters
    ----------
    dataset : Dataset
        The dataset read, with its noise level.
    out : dict
        The ``out_*`` paths by flag name.
    flags : Flags
        The checked flags.

    Returns
    -------
    SpinverseFit or ProtocolFreeFit
    """
    model = dataset_model(dataset, flags)
    logger.info(f"{model}; {int(dataset.mask.sum())} voxels in the mask")
    state = state_path(out["out_state"])
    if state != os.fspath(out["out_state"]):
        logger.info(f"The fit state is an .npz archive: writing {state}.")
    previous = previous_fit(
        model, dataset.data, dataset.mask, state, resume=flags.resume
    )
    return model.fit(
        dataset.data,
        mask=dataset.mask,
        checkpoint=Checkpoint(checkpoint_for(state)),
        resume=previous,
        **flags.fit_options,
    )


def dataset_model(dataset, flags):
    """The model of one dataset: the method's keywords and the data's noise.

    Parameters
    ----------
    dataset : Dataset
        The dataset read, with its noise level.
    flags : Flags
        The checked flags.

    Returns
    -------
    ReconstModel
        The model of ``flags.fit_method``.

    Raises
    ------
    ValueError
        A noise level the configuration would ignore (``--sigma`` with
        ``--preset paper``), or a protocol the model cannot read, named as
        the flags: the model's own checks, the option checks that need the
        data.
    """
    options = dict(flags.model)
    if dataset.sigma:  # 0: unknown, left out (a preset without noise takes none)
        options["sigma"] = dataset.sigma
    with in_flags():
        return SpinverseModel(dataset.table, **options)


def fit_posterior(dataset, out, flags, *, staging):
    """``--fit_method posterior``: the fit, then its maps, status, report and
    state, one set.

    Parameters
    ----------
    dataset : Dataset
        The dataset read, with its noise level.
    out : dict
        The ``out_*`` paths by flag name.
    flags : Flags
        The checked flags.
    staging : StagedOutputs
        The staging of the output folder.
    """
    model = dataset_model(dataset, flags)
    logger.info(f"{model}; {int(dataset.mask.sum())} voxels in the mask")
    fit = model.fit(dataset.data, mask=dataset.mask, **flags.fit_options)
    write_posterior_outputs(
        fit, out, staging=staging, space=dataset.space, n_report=flags.n_report
    )


def _set_aside(checkpoint):
    """Rename a checkpoint that this run cannot continue, so that starting a
    new fit does not destroy the voxels it holds; the new name."""
    stem = checkpoint[: -len(".h5")] if checkpoint.endswith(".h5") else checkpoint
    kept = f"{stem}.{time.strftime('%Y%m%d-%H%M%S')}.h5"
    os.replace(checkpoint, kept)
    return kept


def previous_fit(model, data, mask, state, *, resume):
    """The fit to continue: an interrupted one, or with --resume the state.

    With --resume: the checkpoint store, else the finished state, else none
    (a new fit). Without: the checkpoint store when it holds a fit of the
    same data, mask and settings, so that rerunning an interrupted command
    continues it; otherwise a new fit over it, with a warning (the store is
    kept under another name).

    Parameters
    ----------
    model : SpinverseSearchModel or SpinverseProtocolFreeModel
        The model of this run (of a method whose fits resume).
    data : ndarray (n_mask, n_volumes)
        The mask's voxels.
    mask : ndarray of bool
        The mask.
    state : str
        The fit state's path (its checkpoint store beside it).
    resume : bool
        Whether ``--resume`` was given.

    Returns
    -------
    SpinverseFit, ProtocolFreeFit or None
        The partial (or finished) fit to continue, or None: a new fit.
    """
    checkpoint = checkpoint_for(state)
    if resume:
        saved = [path for path in (checkpoint, state) if os.path.isfile(path)]
        if not saved:
            logger.info(f"No saved state at {state}; starting a new fit.")
            return None
        logger.info(f"Resuming the fit saved in {saved[0]}.")
        try:
            previous = load_fit(saved[0])
        except ValueError as err:
            # A damaged store (its checksums): without --resume the run sets
            # it aside and fits afresh.
            raise ValueError(
                f"--resume: {saved[0]} cannot be read ({err}); run without "
                "--resume to fit afresh."
            ) from err
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


def main():
    """Console-script entry point of ``dipy_fit_spinverse``
    (:func:`dipy_spinverse.workflows.cli.run_command`)."""
    return run_command(SpinverseFlow())


if __name__ == "__main__":
    main()
