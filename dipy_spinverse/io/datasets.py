"""Public diffusion datasets of real tissue, read from the dmipy 1.0.5 files.

Two datasets with the physics this package models ship inside the ``dmipy``
1.0.5 distribution (``dmipy/data/``), on PyPI:

- the cat spinal cord of Duval et al. (ISMRM 2016; White Matter Microscopy
  Database, doi:10.17605/OSF.IO/YP4QG): a 64 x 64 slice with histology per
  voxel, scanned with a 2-D AxCaliber set (1,791 volumes, gradients across
  the cord, nine timings, G up to 850 mT/m) and a 3-D multi-shell set (796
  volumes); :func:`read_cat_spinal_cord`;
- the ISBI 2015 white-matter challenge's genu and fornix voxels (3,612
  measurements, twelve echo times); :func:`read_isbi2015`.

The files are found by path, without importing dmipy (its imports pull
packages this one does not need), and never downloaded: where they are
missing the error gives the command that brings them. Either of

    pip install --no-deps dmipy==1.0.5
    pip download --no-deps dmipy==1.0.5 -d ~/.cache/dipy_spinverse

serves (the wheel is read in place, its data files extracted once to the
cache).
"""

import importlib.metadata
import os
import pathlib
import zipfile
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from dipy.core.gradients import gradient_table

from ..files import atomic_write, cache_root
from ..sim.sequences import Protocol
from .camino import read_scheme

__all__ = [
    "RealDataset",
    "read_cat_spinal_cord",
    "read_isbi2015",
    "dmipy_data_folder",
    "effective_diameter",
    "thin_qspace",
    "held_out_shells",
    "subset_table",
    "DMIPY_VERSION",
]

#: The dmipy release whose files are read.
DMIPY_VERSION = "1.0.5"
#: Environment variable naming a dmipy installation, data folder or wheel.
ENVIRONMENT = "DIPY_SPINVERSE_DMIPY"

_CORD = "tanguy_cat_spinal_cord"
_ISBI = "isbi2015_white_matter_challenge"
_CORD_SETS = {
    "2d": ("tanguy_spinal_cord_2D.nii.gz", "2D_qspace.scheme"),
    "3d": ("tanguy_spinal_cord_3D.nii.gz", "3D_qspace.scheme"),
}
# The database's maps: file, name here, unit.
_HISTOLOGY = (
    ("1_axonEquivDiameter.nii", "axon_diameter", "um"),
    ("2_axonEquivDiameter_std.nii", "axon_diameter_std", "um"),
    ("3_axonEquivDiameter_axonvolumeCorrected.nii", "axon_diameter_volume", "um"),
    ("4_fr.nii", "axon_fraction", "1"),
    ("5_MyelinVolumeFraction.nii", "myelin_fraction", "1"),
    ("6_gRatio.nii", "g_ratio", "1"),
    ("7_Number_axons.nii", "axon_count", "1"),
)
_CORD_REFERENCE = (
    "Duval T, et al. Validation of quantitative MRI metrics using full slice "
    "histology with automatic axon segmentation. ISMRM 2016; White Matter "
    "Microscopy Database, doi:10.17605/OSF.IO/YP4QG."
)
_ISBI_REFERENCE = (
    "Ferizi U, et al. Diffusion MRI microstructure models with in vivo human "
    "brain Connectome data: results from a multi-group comparison. NMR Biomed "
    "2017;30:e3734 (ISBI 2015 white-matter challenge)."
)


@dataclass(frozen=True)
class RealDataset:
    """A real diffusion dataset, its acquisition and what is known of it.

    Attributes
    ----------
    name : str
    data : ndarray (X, Y, Z, N)
        The measured signals, as stored (not normalised).
    gtab : dipy.core.gradients.GradientTable
        b-values (s/mm^2, none taken for b = 0: ``b0_threshold=0``, since
        AxCaliber sets sample q from b < 1 s/mm^2), directions and per-volume
        ``big_delta``/``small_delta`` (s).
    protocol : Protocol
        The same acquisitions as the package simulates them.
    echo_times : ndarray (N,)
        TE of each volume, s (the scheme's column; the waveforms end at
        DELTA + delta). Volumes of one timing share a TE to within 0.2 ms.
    mask : ndarray (X, Y, Z) of bool
        The voxels to fit.
    affine : ndarray (4, 4)
    histology : dict of ndarray (X, Y, Z)
        Per-voxel ground truth (see the reader), empty without one.
    units : dict of str
        The unit of each histology map.
    reference : str
        What to cite.
    """

    name: str
    data: np.ndarray
    gtab: object
    protocol: Protocol
    echo_times: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    histology: dict
    units: dict
    reference: str

    def repeated_b0_noise(self, mask=None, *, drift=False):
        """Each voxel's noise from its repeated b = 0 volumes, and each
        volume's b = 0 level.

        Every timing (and echo time) of these sets repeats its b = 0 volume:
        their spread about their own mean is noise, pooled over the timings
        (a timing's own T2 weighting is its mean, not noise).

        The scanner's signal also drifts during a session (Vos et al. 2017,
        "The importance of correcting for signal drift in diffusion MRI").
        Where a timing's b = 0 volumes come in runs acquired at different
        times (the cord's 3-D set: four runs of four, one per shell, whose
        means differ by up to 5 %), the spread between runs is drift, not
        noise: with ``drift=True`` the noise is the spread within each run of
        consecutive b = 0 volumes about the run's own mean, and each volume's
        level is its timing's b = 0 at its place in the acquisition,
        interpolated linearly between the runs about it (the nearest run's
        beyond the first and the last).

        Parameters
        ----------
        mask : ndarray of bool (X, Y, Z), optional
            The voxels (default: every voxel).
        drift : bool
            Read the runs as above; default False (the whole timing's spread
            and mean, as the published benchmarks were measured).

        Returns
        -------
        sigma : ndarray (n,)
            The noise standard deviation per voxel, in the data's units.
        levels : ndarray (n, N)
            Each volume's b = 0 level: the mean b = 0 of its timing, or with
            ``drift`` its timing's b = 0 at its place in the acquisition.
        """
        data = self.data.reshape(-1, self.data.shape[-1])
        if mask is not None:
            data = self.data[np.asarray(mask, dtype=bool)]
        data = data.astype(np.float64)
        b0 = np.asarray(self.gtab.b0s_mask)
        levels = np.empty_like(data)
        squares, dof = np.zeros(len(data)), 0
        for _, rows in self.protocol.groups():
            own = rows[b0[rows]]
            runs = _runs(own) if drift else [own]
            means = [data[:, run].mean(-1, keepdims=True) for run in runs]
            for run, mean in zip(runs, means, strict=True):
                squares += ((data[:, run] - mean) ** 2).sum(-1)
                dof += len(run) - 1
            if len(runs) == 1:
                levels[:, rows] = means[0]
                continue
            # Each volume's linear interpolation weights over the runs.
            centres = [run.mean() for run in runs]
            weights = np.stack(
                [np.interp(rows, centres, unit) for unit in np.eye(len(runs))], 1
            )
            levels[:, rows] = np.concatenate(means, axis=1) @ weights.T
        if dof < 1:
            raise ValueError(
                f"{self.name} repeats no b = 0 volume within a timing"
                + (" and a run" if drift else "")
                + ": its noise cannot be measured from them; estimate it otherwise "
                "(e.g. dipy.denoise.noise_estimate.estimate_sigma)."
            )
        return np.sqrt(squares / dof), levels


def _runs(indices):
    """Runs of consecutive volume indices (sorted), as arrays."""
    indices = np.sort(np.asarray(indices))
    breaks = np.flatnonzero(np.diff(indices) > 1) + 1
    return np.split(indices, breaks)


def held_out_shells(dataset, held_out="middle"):
    """The volumes the ISBI 2015 comparison holds out: per timing, its middle
    (interpolation in q) or its strongest (extrapolation) gradient strength.

    Parameters
    ----------
    dataset : RealDataset
        E.g. :func:`read_isbi2015`'s.
    held_out : {"middle", "strongest"}

    Returns
    -------
    ndarray of bool (N,)
        True where a volume is held out; every b = 0 is kept for the fit.
    """
    if held_out not in ("middle", "strongest"):
        raise ValueError(f"held_out must be 'middle' or 'strongest', got {held_out!r}.")
    protocol = dataset.protocol
    strength = np.round(protocol.gradient_strength, 4)
    test = np.zeros(len(protocol), dtype=bool)
    for _, rows in protocol.groups():
        levels = np.unique(strength[rows][strength[rows] > 0])
        chosen = levels[len(levels) // 2] if held_out == "middle" else levels[-1]
        test[rows[strength[rows] == chosen]] = True
    return test


def subset_table(gtab, rows):
    """The gradient table (with timing) of the volumes ``rows`` of ``gtab``.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable
    rows : array_like of int or bool
        The volumes kept.

    Returns
    -------
    dipy.core.gradients.GradientTable
    """
    return gradient_table(
        gtab.bvals[rows],
        bvecs=gtab.bvecs[rows],
        small_delta=np.asarray(gtab.small_delta)[rows],
        big_delta=np.asarray(gtab.big_delta)[rows],
        b0_threshold=0,
    )


def read_cat_spinal_cord(acquisition="2d", *, path=None):
    """The cat spinal cord slice of Duval et al., with its histology.

    A 64 x 64 x 1 slice (0.156 x 0.156 x 1.49 mm) of fixed cat spinal cord,
    its axons along the slice normal (z), and per-voxel histology from the
    full slice's automatic axon segmentation (White Matter Microscopy
    Database).

    Parameters
    ----------
    acquisition : {"2d", "3d"}
        ``"2d"``: the AxCaliber set, 1,791 volumes: gradients in the slice
        (across the axons) along four directions, 50 strengths up to 850
        mT/m, nine timings (DELTA 7-40 ms, delta 3 or 8 ms), four b = 0 per
        timing. ``"3d"``: the multi-shell set, 796 volumes at DELTA 30 ms,
        delta 3 ms, 200 directions.
    path : path-like, optional
        The dmipy installation, its ``dmipy/data`` folder or its wheel
        (:func:`dmipy_data_folder`).

    Returns
    -------
    RealDataset
        ``mask`` holds the 968 voxels whose axon fraction is above 0.
        ``histology``: ``axon_diameter`` (mean equivalent-circle diameter of
        the voxel's axons, um), ``axon_diameter_std`` (their standard
        deviation, um), ``axon_diameter_volume`` (the database's
        volume-corrected diameter, um), ``axon_fraction`` (the database's
        "fr": the area fraction of axons, myelin excluded; below the myelin
        fraction in most voxels), ``myelin_fraction``, ``g_ratio``,
        ``axon_count``, and two derived maps: ``axon_diameter_effective``
        (the diameter diffusion MRI weighs, (<d^6>/<d^2>)^(1/4), from the
        mean and std with a gamma distribution; :func:`effective_diameter`)
        and ``intra_axonal_fraction`` (axons' share of the water the MRI
        sees, ``axon_fraction / (1 - myelin_fraction)``: myelin water,
        T2 ~ 10-20 ms, has decayed by TE 36-62 ms; NaN in the one voxel
        where the two fractions add to more than 1).

    Raises
    ------
    FileNotFoundError
        Without the dmipy files; the message gives the command.
    """
    if acquisition not in _CORD_SETS:
        raise ValueError(
            f"acquisition must be one of {sorted(_CORD_SETS)} (the AxCaliber or "
            f"the multi-shell set), got {acquisition!r}."
        )
    folder = dmipy_data_folder(path) / _CORD
    image_name, scheme_name = _CORD_SETS[acquisition]
    image = nib.load(folder / image_name)
    data = np.asarray(image.dataobj, dtype=np.float64)
    protocol, echo_times, gtab = _read_scheme(folder / scheme_name)
    histology, units = {}, {}
    for file, name, unit in _HISTOLOGY:
        values = np.asarray(nib.load(folder / file).dataobj, dtype=np.float64)
        histology[name] = values.reshape(data.shape[:3])
        units[name] = unit
    histology["axon_diameter_effective"] = effective_diameter(
        histology["axon_diameter"], histology["axon_diameter_std"]
    )
    units["axon_diameter_effective"] = "um"
    axons, visible = histology["axon_fraction"], 1.0 - histology["myelin_fraction"]
    # NaN where the two fractions add to more than 1 (segmentations that
    # overlap: one voxel of the slice, at 1.009), not a value forced below 1.
    histology["intra_axonal_fraction"] = np.divide(
        axons, visible, out=np.full_like(axons, np.nan), where=axons < visible
    )
    units["intra_axonal_fraction"] = "1"
    return RealDataset(
        name=f"cat spinal cord ({acquisition.upper()})",
        data=data,
        gtab=gtab,
        protocol=protocol,
        echo_times=echo_times,
        mask=histology["axon_fraction"] > 0,
        affine=image.affine,
        histology=histology,
        units=units,
        reference=_CORD_REFERENCE,
    )


def read_isbi2015(*, path=None):
    """The ISBI 2015 white-matter challenge's genu and fornix voxels.

    Twelve voxels of one in vivo brain (six in the genu of the corpus
    callosum, six in the fornix), 3,612 measurements each: 36 shells
    (gradient strengths up to 292 mT/m, DELTA 22-120 ms, delta 3 or 8 ms,
    b up to 45,800 s/mm^2) at twelve echo times, each with its own b = 0
    volumes.

    Parameters
    ----------
    path : path-like, optional
        As :func:`read_cat_spinal_cord`.

    Returns
    -------
    RealDataset
        ``data`` is (12, 1, 1, 3612), the genu's voxels first;
        ``histology`` holds ``region`` (0 genu, 1 fornix) only: there is no
        ground truth, the challenge scored prediction of unseen
        measurements.
    """
    folder = dmipy_data_folder(path) / _ISBI
    protocol, echo_times, gtab = _read_scheme(folder / "isbi_schemefile.txt")
    voxels = [
        np.loadtxt(folder / f"{region}.txt", skiprows=1).T
        for region in ("genu", "fornix")
    ]
    data = np.concatenate(voxels)[:, None, None, :]
    region = np.repeat([0.0, 1.0], [len(v) for v in voxels])[:, None, None]
    return RealDataset(
        name="ISBI 2015 white-matter challenge",
        data=data,
        gtab=gtab,
        protocol=protocol,
        echo_times=echo_times,
        mask=np.ones(data.shape[:3], dtype=bool),
        affine=np.eye(4),
        histology={"region": region},
        units={"region": "0 genu, 1 fornix"},
        reference=_ISBI_REFERENCE,
    )


def effective_diameter(mean, std):
    """The axon diameter diffusion MRI measures, from a histology's mean and std.

    Signal attenuation across a bundle weighs each axon by its volume and
    its diameter to the fourth (the wide-pulse limit): the diameter it
    measures is ``d_eff = (<d^6> / <d^2>)^(1/4)`` (Burcaw et al. 2015;
    Veraart et al. 2020), above the mean wherever the diameters spread.
    With the diameters gamma-distributed (shape ``k = (mean / std)^2``,
    scale ``std^2 / mean``; a common model of axon diameters),
    ``d_eff = scale ((k + 2)(k + 3)(k + 4)(k + 5))^(1/4)``. A std of 0 gives
    the mean.

    Parameters
    ----------
    mean, std : array_like
        Mean and standard deviation of the diameters (any one unit).

    Returns
    -------
    ndarray
        ``d_eff``, in the unit of ``mean``; 0 where the mean is 0.
    """
    mean, std = np.broadcast_arrays(np.asarray(mean, float), np.asarray(std, float))
    out = np.array(mean, dtype=float, copy=True)
    spread = (mean > 0) & (std > 0)
    k = (mean[spread] / std[spread]) ** 2
    scale = std[spread] ** 2 / mean[spread]
    out[spread] = scale * ((k + 2) * (k + 3) * (k + 4) * (k + 5)) ** 0.25
    return out


def thin_qspace(dataset, every):
    """A q-space set thinned along its gradient strengths, for a posterior
    whose training cost grows with the volumes.

    Keeps every b = 0 volume and, per timing and direction axis (the sign of
    a direction folded: -g and g attenuate alike), one volume per gradient
    strength, every ``every``-th from the strongest down: the same timings
    and q range, a smooth attenuation curve sampled fewer times.

    Parameters
    ----------
    dataset : RealDataset
        E.g. :func:`read_cat_spinal_cord`'s.
    every : int
        Keep one strength in ``every``.

    Returns
    -------
    rows : ndarray of int
        The volumes kept, in order.
    gtab : dipy.core.gradients.GradientTable
        Their gradient table (with timing).
    """
    protocol = dataset.protocol
    keep = np.zeros(len(protocol), dtype=bool)
    keep[dataset.gtab.b0s_mask] = True
    bvecs = np.round(protocol.bvecs, 3)
    first = bvecs[np.arange(len(bvecs)), np.argmax(bvecs != 0, axis=1)]
    # One number per direction axis, its sign folded.
    axes = (np.where(first < 0, -1, 1)[:, None] * bvecs) @ np.array([1, 10, 100.0])
    strength = protocol.gradient_strength
    for _, rows in protocol.groups():
        for axis in np.unique(axes[rows]):
            weighted = rows[(axes[rows] == axis) & (protocol.bvals[rows] > 0)]
            _, first_of = np.unique(np.round(strength[weighted], 5), return_index=True)
            chosen = weighted[np.sort(first_of)]
            # From the strongest down, so that the q range is kept.
            chosen = chosen[np.argsort(strength[chosen])[::-1]][::every]
            keep[chosen] = True
    rows = np.flatnonzero(keep)
    return rows, subset_table(dataset.gtab, rows)


def dmipy_data_folder(path=None):
    """The ``dmipy/data`` folder of the dmipy 1.0.5 distribution.

    Looked for, in order: ``path``; ``$DIPY_SPINVERSE_DMIPY``; the installed
    ``dmipy`` distribution (found from its metadata, not imported); a
    ``dmipy-1.0.5-*.whl`` in the package's cache folder or the current
    folder. Each of ``path`` and the variable may name the installation's
    ``site-packages``, its ``dmipy`` or ``dmipy/data`` folder, or the wheel
    (whose data files are extracted once into the cache).

    Parameters
    ----------
    path : path-like, optional

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FileNotFoundError
        Naming where it looked and the command that brings the files.
    """
    looked = []
    for candidate in _candidates(path):
        looked.append(str(candidate))
        folder = _data_folder(candidate)
        if folder is not None:
            return folder
    raise FileNotFoundError(
        f"the dmipy {DMIPY_VERSION} data files were not found (looked in: "
        f"{', '.join(looked) or 'no installed dmipy'}). Bring them with\n"
        f"    pip install --no-deps dmipy=={DMIPY_VERSION}\n"
        "or download the wheel to the cache with\n"
        f"    pip download --no-deps dmipy=={DMIPY_VERSION} -d {cache_root()}\n"
        f"or pass path= (or set ${ENVIRONMENT}) to a dmipy installation or wheel."
    )


def _candidates(path):
    if path is not None:
        yield pathlib.Path(path)
        return
    if os.environ.get(ENVIRONMENT):
        yield pathlib.Path(os.environ[ENVIRONMENT])
    try:
        distribution = importlib.metadata.distribution("dmipy")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        yield pathlib.Path(distribution.locate_file("dmipy"))
    for folder in (cache_root(), pathlib.Path.cwd()):
        yield from sorted(folder.glob(f"dmipy-{DMIPY_VERSION}-*.whl"))


def _data_folder(candidate):
    """``dmipy/data`` under (or extracted from) ``candidate``, or None."""
    if candidate.is_file() and zipfile.is_zipfile(candidate):
        return _extracted(candidate)
    for folder in (candidate, candidate / "data", candidate / "dmipy" / "data"):
        if (folder / _CORD).is_dir() or (folder / _ISBI).is_dir():
            return folder
    return None


def _extracted(wheel):
    """The wheel's two datasets extracted into the cache (once)."""
    target = cache_root() / f"dmipy-{DMIPY_VERSION}-data"
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            parts = member.split("/")
            if parts[:2] != ["dmipy", "data"] or len(parts) < 4:
                continue
            if parts[2] not in (_CORD, _ISBI) or member.endswith("/"):
                continue
            out = target.joinpath(*parts[2:])
            if out.exists() and out.stat().st_size == archive.getinfo(member).file_size:
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(out) as tmp, open(tmp, "wb") as f:
                f.write(archive.read(member))
    return target


def _read_scheme(path):
    """(Protocol, echo times, GradientTable) of a Camino scheme file."""
    protocol, echo_times = read_scheme(path)
    small = np.array([w.small_delta for w in protocol.waveforms])
    big = np.array([w.big_delta for w in protocol.waveforms])
    gtab = gradient_table(
        protocol.bvals,
        bvecs=protocol.bvecs,
        small_delta=small,
        big_delta=big,
        b0_threshold=0,
    )
    return protocol, echo_times, gtab
