"""The files ``dipy_fit_spinverse`` writes for one dataset.

Every output has its own ``out_*`` path, checked before the fit
(:func:`check_output_paths`). A dataset's outputs and its fit state are one
set (:func:`write_output_set`): written into a staging folder, then swapped
in for the files an earlier run left there (:func:`existing_outputs`), so
that an interrupted run leaves the earlier set or the new one, never a mix.
"""

import json
import os
import re

import numpy as np
from dipy.utils.logging import logger

from ..files import atomic_write, check_outputs, save_image, writable_folder
from ..io.checkpoint import checkpoint_for
from ..io.fits import save_fit
from ..io.maps import (
    MESH_MAPS,
    describe_status,
    posterior_map_files,
    save_map,
    save_permeability,
    save_posterior,
    save_predicted,
)
from ..io.surfaces import (
    VOXEL_MESH,
    remove_voxel_meshes,
    save_smooth_mesh,
    save_voxel_meshes,
    surface_slabs,
    volume_surface,
)
from ..reconst import FLAGGED, STATUS_CODES
from .report import write_posterior_report, write_report

__all__ = [
    "METRICS",
    "DEFAULT_METRICS",
    "SMOOTH_MESH_FORMATS",
    "FOLDER_OUTPUTS",
    "UNCERTAIN_SUFFIX",
    "MESH_SLAB_VOXELS",
    "state_path",
    "check_output_paths",
    "write_output_set",
    "existing_outputs",
    "write_search_outputs",
    "write_posterior_outputs",
    "save_outputs",
    "save_smooth_meshes",
    "save_surface",
    "save_map_values",
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

#: Outputs that are folders; the other ``out_*`` are files.
FOLDER_OUTPUTS = ("out_voxel_meshes", "out_smooth_meshes", "out_posterior")

#: Suffix of the barrier files of the voxels whose surface is uncertain.
UNCERTAIN_SUFFIX = "_uncertain"

#: Fitted voxels per mesh file at most: beyond, the barrier surfaces are
#: written in slabs of whole slices, with an index (a brain's barriers in
#: one file would take gigabytes and no viewer opens them).
MESH_SLAB_VOXELS = 2000

#: Scalar maps: the --save_metrics name and the io.MAPS name (DIPY's ``s0``).
_MAPS = {
    name: "S0" if name == "s0" else name
    for name in METRICS
    if name not in ("predicted", "permeability", "mesh")
}


def state_path(path):
    """The fit state's path, as :func:`~dipy_spinverse.io.fits.save_fit`
    writes it.

    Parameters
    ----------
    path : str or os.PathLike
        The ``out_state`` path given.

    Returns
    -------
    str
        ``path``, with ``.npz`` added unless it ends so.
    """
    path = os.fspath(path)
    return path if path.endswith(".npz") else path + ".npz"


def check_output_paths(out):
    """Refuse outputs that clash or cannot be written, before any fit.

    Parameters
    ----------
    out : dict
        The run's ``out_*`` paths by flag name.

    Returns
    -------
    str
        The folder of the fit state (the run locks it).

    Raises
    ------
    ValueError
        Two outputs at one path, a file where a folder goes (or the reverse)
        or a folder that cannot be written.
    """
    check_outputs(_written_paths(out), folders=FOLDER_OUTPUTS)
    return writable_folder(
        os.path.dirname(os.path.abspath(out["out_state"])),
        "outputs",
        fix="give a writable --out_dir",
    )


def _written_paths(out):
    """``(flag, path)`` of every file or folder a run may write: the outputs
    as given, the state as ``save_fit`` names it, its checkpoint store and
    the ``_uncertain`` barrier files."""
    for key, path in out.items():
        path = os.fspath(path)
        if key == "out_state":
            yield key, state_path(path)
            yield key, checkpoint_for(state_path(path))
            continue
        yield key, path
        if key in ("out_mesh_gifti", "out_mesh_ply"):
            yield key, _suffixed(path, UNCERTAIN_SUFFIX)


def write_output_set(out, write, *, staging, discard=()):
    """Write one dataset's outputs as a set that replaces the earlier one whole.

    ``write(staged)`` writes every output to the ``out_*`` paths of
    ``staged``, which lie in ``staging``'s folder; the complete set is then
    swapped in for the output files an earlier run left at the paths of
    ``out`` (:func:`existing_outputs`: those this run does not write go
    too, so that one folder never holds two fits). Interrupted anywhere,
    ``out``'s folder keeps the earlier set or holds the new one
    (:class:`~dipy_spinverse.files.StagedOutputs`).

    Parameters
    ----------
    out : dict
        The ``out_*`` paths by flag name.
    write : callable
        ``write(staged)``, ``staged`` a dict like ``out``.
    staging : dipy_spinverse.files.StagedOutputs
        The staging of ``out``'s folder (``staging.committed`` says whether
        the new set is in place).
    discard : sequence of path
        Files removed with the swap (the checkpoint of the fit written).

    Returns
    -------
    list of str
        The files written, in place.
    """
    with staging:
        write({key: staging.stage(path) for key, path in out.items()})
        written, removed = staging.commit(existing_outputs(out), discard)
    if removed:
        logger.info(
            f"Removed {len(removed)} output files of an earlier run that this run "
            f"does not write: {', '.join(map(os.path.basename, removed))}."
        )
    return written


def existing_outputs(out):
    """The output files at the paths of ``out`` now: an earlier run's set.

    Every file that a run writes there: the ``out_*`` files and the fit
    state, the barrier files' ``_uncertain``, slab and index files, and in
    the output folders the per-voxel and smooth meshes and posterior maps
    (only files named as the package names them: other files stay).

    Parameters
    ----------
    out : dict
        The ``out_*`` paths by flag name.

    Returns
    -------
    list of str
        Their absolute paths.
    """
    checkpoint = checkpoint_for(state_path(out["out_state"]))
    paths = [
        path
        for key, path in _written_paths(out)
        if key not in FOLDER_OUTPUTS and path != checkpoint
    ]
    for key in ("out_mesh_gifti", "out_mesh_ply"):
        for path in (out[key], _suffixed(out[key], UNCERTAIN_SUFFIX)):
            paths += _slab_files(path) + [os.path.splitext(path)[0] + ".json"]
    for key in ("out_voxel_meshes", "out_smooth_meshes"):
        folder = os.fspath(out[key])
        names = os.listdir(folder) if os.path.isdir(folder) else []
        paths += [os.path.join(folder, n) for n in names if VOXEL_MESH.fullmatch(n)]
    paths += posterior_map_files(out["out_posterior"])
    return sorted({os.path.abspath(p) for p in paths if os.path.isfile(p)})


def write_search_outputs(
    fit, data, out, *, staging, space, metrics, voxel_meshes, mesh_ext, n_report
):
    """Every output of a label-search fit and its state, as one set.

    The state (``load_fit`` reads it; ``--resume`` continues it) is part of
    the set, and the fit's checkpoint store goes when the set is in place.

    Parameters
    ----------
    fit : SpinverseFit
        The volume's fit.
    data : ndarray (n_mask, n_volumes)
        The mask's voxels (for the report's signals).
    out : dict
        The ``out_*`` paths by flag name.
    staging : dipy_spinverse.files.StagedOutputs
        The staging of the output folder (:func:`write_output_set`).
    space : dict
        ``affine`` and ``reference`` image of the maps
        (:func:`~dipy_spinverse.files.save_image`).
    metrics : sequence of str
        The ``--save_metrics`` chosen (:data:`METRICS`).
    voxel_meshes : bool
        Whether each voxel's mesh is written too (``--voxel_meshes``).
    mesh_ext : str
        The smooth meshes' file extension, e.g. ``".vtp"``.
    n_report : int
        Voxels in the PNG report (0: no report).

    Returns
    -------
    list of str
        The files written, the state last. Output files of an earlier run
        that this run does not write are removed.
    """

    def write(staged):
        save_outputs(
            fit, staged, space=space, metrics=metrics, voxel_meshes=voxel_meshes
        )
        save_smooth_meshes(fit, staged, space=space, ext=mesh_ext)
        if n_report:
            write_report(fit, data, staged["out_report"], n_voxels=n_report)
        save_fit(fit, state_path(staged["out_state"]))

    state = state_path(out["out_state"])
    written = write_output_set(
        out, write, staging=staging, discard=[checkpoint_for(state)]
    )
    logger.info(f"Voxel status: {describe_status(fit.status[fit.mask])}")
    written = [p for p in written if p != os.path.abspath(state)] + [state]
    logger.info(
        f"Spinverse outputs: {len(written) - 1} files and the fit state {state}, "
        f"in {os.path.commonpath([os.path.abspath(p) for p in written])}"
    )
    return written


def write_posterior_outputs(fit, out, *, staging, space, n_report, discard=()):
    """Every output of a posterior fit: maps, status, report and state, as
    one set (:func:`write_output_set`).

    Parameters
    ----------
    fit : PosteriorFit or ProtocolFreeFit
        The volume's fit.
    out : dict
        The ``out_*`` paths by flag name.
    staging : dipy_spinverse.files.StagedOutputs
        The staging of the output folder.
    space : dict
        ``affine`` and ``reference`` image of the maps.
    n_report : int
        Voxels in the PNG report (0: no report).
    discard : sequence of path
        Files removed with the swap (the checkpoint of the fit written).

    Returns
    -------
    list of str
        The files written.
    """

    def write(staged):
        save_posterior(fit, staged["out_posterior"], **space)
        save_map_values(fit.status, staged["out_status"], **space)
        if n_report:
            write_posterior_report(fit, staged["out_report"], n_voxels=n_report)
        save_fit(fit, state_path(staged["out_state"]))  # load_fit reads it back

    written = write_output_set(out, write, staging=staging, discard=discard)
    logger.info(f"Voxel status: {fit.status_counts()}")
    logger.info(f"Spinverse posterior: {len(written)} files in {out['out_posterior']}")
    return written


def save_map_values(values, path, *, affine, reference):
    """A status map (int16) of the whole volume, atomically.

    Parameters
    ----------
    values : array_like
        The map, of the volume's shape.
    path : str or os.PathLike
    affine : ndarray (4, 4)
    reference : nibabel image
        The image whose space (qform/sform codes, unit) the map takes.

    Returns
    -------
    str
        The path written.
    """
    return save_image(path, np.asarray(values, np.int16), affine, reference)


def save_smooth_meshes(fit, out, *, space, ext):
    """Mesh maps and per-voxel smooth surfaces (``--refine_mesh``).

    Parameters
    ----------
    fit : SpinverseFit
    out : dict
        The ``out_*`` paths by flag name.
    space : dict
        ``affine`` and ``reference`` image of the maps.
    ext : str
        The surfaces' file extension, e.g. ``".vtp"``.

    Returns
    -------
    list of str
        The files written (none without ``refine_mesh``; an earlier run's
        smooth meshes are removed either way).
    """
    folder = out["out_smooth_meshes"]
    stale = remove_voxel_meshes(folder)
    if stale:
        logger.info(f"Removed {len(stale)} smooth meshes of an old run from {folder}.")
    if not fit.model.refine_mesh:
        return []
    written = [save_map(fit, name, out[f"out_{name}"], **space) for name in MESH_MAPS]
    paths = save_smooth_mesh(fit, folder, ext=ext)
    # Named by the folder's name: the command writes it in a staging folder.
    name = os.path.basename(folder)
    logger.info(f"{len(paths)} smooth cell meshes (um) in {name}.")
    return written + list(paths.values())


def save_outputs(fit, out, *, space, metrics, voxel_meshes):
    """Write the chosen outputs, each to its own out_* path.

    Parameters
    ----------
    fit : SpinverseFit
    out : dict
        The ``out_*`` paths by flag name.
    space : dict
        ``affine`` and ``reference`` image of the maps.
    metrics : sequence of str
        The outputs chosen (:data:`METRICS`).
    voxel_meshes : bool
        Whether each voxel's mesh is written too, in ``out_voxel_meshes``.

    Returns
    -------
    list of str
        The files written.
    """
    written = []
    for metric in metrics:
        if metric == "uncertainty" and fit.uncertainty is None:
            continue  # no label search (refused with the flags when asked for)
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
        written += save_surface(fit, out, affine=space["affine"])
    if voxel_meshes:
        paths = save_voxel_meshes(fit, folder)
        logger.info(f"{len(paths)} voxel meshes (um) in {os.path.basename(folder)}.")
        written += list(paths.values())
    return written


def save_surface(fit, out, *, affine, max_voxels=MESH_SLAB_VOXELS):
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

    Parameters
    ----------
    fit : SpinverseFit
    out : dict
        The paths ``out_mesh_gifti`` and ``out_mesh_ply``.
    affine : ndarray (4, 4)
        The voxel-to-scanner affine.
    max_voxels : int
        Fitted voxels of one file at most.

    Returns
    -------
    list of str
        The files written (none for voxels without a barrier).
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
    name = os.path.basename(index_path)  # beside the GIFTI file (staged)
    logger.info(f"Barrier surfaces in {len(entries)} slabs, listed in {name}.")
    return written + [index_path]
