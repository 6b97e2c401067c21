"""Built-in demo data: a small multi-voxel phantom dataset, made on the fly.

:func:`make_phantom_dataset` writes a deterministic 3 x 4 x 1 voxel diffusion
dataset (no download) for a PGSE protocol of three diffusion times, with T2
weighting that differs between the echo times, a different S0 per voxel and
Rician noise.

The first two rows (:data:`PHANTOM_VOXELS`) are the label search's demo: each
voxel is one substrate from :mod:`dipy_spinverse.geometry.phantoms` on the
default grid of :class:`~dipy_spinverse.reconst.SpinverseModel` -- cylinders
of different radii, orientations and permeabilities and a sphere --
simulated with :func:`dipy_spinverse.simulate`.

The third row (:data:`TISSUE_VOXELS`) is the posterior's demo (issue 44):
tissue that no dictionary holds -- an ellipsoid, two touching cells, a blob.
Each is drawn from one family of :data:`DEMO_PRIOR` (cells of 8-25 um) and
simulated for the dataset's own protocol on a periodic patch of resolution 6,
twice as fine as the prior's training grid
(:meth:`~dipy_spinverse.posterior.PriorSimulator.sample_pairs`): neither the
label search's grid nor the posterior's training grid holds them, so a
posterior fit (``posterior.json``: :data:`DEMO_PRIOR` trained with
:data:`DEMO_TRAINING`) shows its intervals widen where the data cannot tell.

The fourth row (:data:`AXON_VOXELS`) is white matter: packed axons of 1.5-2.5,
3-4 and 4.5-5.5 um, each drawn from the default prior (``TissuePrior()``)
and simulated as a section on a patch of resolution 12 (its training's
reference grid), for the default posterior (``dipy_fit_spinverse
--fit_method posterior`` without options; its estimator ships with the
package).

Real tissue: :func:`read_cat_spinal_cord` (a slice with per-voxel histology)
and :func:`read_isbi2015` (the ISBI 2015 challenge's voxels) read public
datasets from the files of the dmipy 1.0.5 distribution
(:mod:`dipy_spinverse.io.datasets`; never downloaded by the package).
"""

import json
import os
from dataclasses import replace

import numpy as np

from .files import save_image
from .geometry.descriptors import DESCRIPTORS
from .geometry.phantoms import cylinder, sphere
from .geometry.topology import barrier_mesh
from .io.camino import write_scheme
from .io.datasets import RealDataset, read_cat_spinal_cord, read_isbi2015
from .io.meshes import save_mesh
from .posterior import (
    FAMILIES,
    WHITE_MATTER_TRAINING,
    TissuePrior,
    TrainingOptions,
)
from .sim.forward import simulate
from .sim.grid import TetGrid
from .sim.sequences import Protocol, fibonacci_sphere

__all__ = [
    "make_phantom_dataset",
    "demo_phantoms",
    "read_cat_spinal_cord",
    "read_isbi2015",
    "RealDataset",
    "PHANTOM_VOXELS",
    "TISSUE_VOXELS",
    "AXON_VOXELS",
    "DEMO_PRIOR",
    "DEMO_SURFACE_PRIOR",
    "DEMO_TRAINING",
    "DEMO_SURFACE_TRAINING",
]

#: Substrate of each voxel: (index, shape, parameters, membrane kappa in m/s).
#: Radii are fractions of the box side (26.7 um on the default grid).
PHANTOM_VOXELS = (
    ((0, 0, 0), "cylinder", dict(radius=0.30, axis=(0, 0, 1)), 1e-5),
    ((1, 0, 0), "cylinder", dict(radius=0.30, axis=(1, 0, 0)), 1e-5),
    ((2, 0, 0), "cylinder", dict(radius=0.20, axis=(0, 0, 1)), 1e-5),
    ((0, 1, 0), "sphere", dict(radius=0.34), 1e-5),
    ((1, 1, 0), "cylinder", dict(radius=0.30, axis=(0, 0, 1)), 1e-4),
    ((2, 1, 0), "cylinder", dict(radius=0.26, axis=(1, 0, 1)), 2e-5),
)
_S0 = (1000.0, 900.0, 1100.0, 950.0, 1050.0, 1000.0)

#: The posterior prior the demo is made for: cells of 8-25 um at resolution 3
#: (``fit_method="posterior"``; the README's trained posterior), half in
#: periodic tissue and half in the closed 26.7 um box of the first two rows
#: (``boundary="either"``): the demo holds both physics, and a posterior of
#: one alone reads the other's voxels wrong with confidence.
DEMO_PRIOR = TissuePrior(
    cell_diameter=(8.0, 25.0),
    families=FAMILIES,
    resolution=3,
    min_spacings=1.0,
    boundary="either",
    box_side=80 / 3,
)
#: The prior of the label search's surface check on the demo
#: (``dipy_fit_spinverse --posterior_options surface_check.json`` with the
#: search): the search's own physics, cells of 8-25 um in the closed box of
#: its grid (26.7 um, resolution 4). A check must not weigh physics the
#: search does not model: with :data:`DEMO_PRIOR`'s periodic half, the
#: posterior of a closed box's restricted fraction is wide and would call
#: exact answers uncertain.
DEMO_SURFACE_PRIOR = replace(DEMO_PRIOR, resolution=4, boundary="reflecting")
#: How :data:`DEMO_PRIOR`'s posterior is trained: its grid's error is
#: modelled against resolution 6, the grid of the tissue voxels.
DEMO_TRAINING = TrainingOptions(n_simulations=4000, epochs=40, reference_resolution=6)
#: How the surface check's is: the same without the error model (the
#: search's own noise model, data as its grid simulates them).
DEMO_SURFACE_TRAINING = replace(DEMO_TRAINING, reference_resolution=None)

#: Periodic tissue of one family of :data:`DEMO_PRIOR` each: (index, name,
#: :class:`~dipy_spinverse.posterior.TissuePrior` fields replaced, seed of
#: the draw).
_PERIODIC = dict(boundary="periodic", box_side=None)
TISSUE_VOXELS = (
    (
        (0, 2, 0),
        "ellipsoid",
        dict(families=("ellipsoid",), n_cells=(1, 1), **_PERIODIC),
        0,
    ),
    (
        (1, 2, 0),
        "two touching cells",
        dict(
            families=("packed",),
            n_cells=(2, 2),
            restricted_fraction=(0.6, 0.85),
            **_PERIODIC,
        ),
        1,
    ),
    ((2, 2, 0), "blob", dict(families=("blob",), n_cells=(1, 1), **_PERIODIC), 2),
)
# Their mean is the phantom voxels' (1000): one sigma gives both the same SNR.
_TISSUE_S0 = (1000.0, 950.0, 1050.0)

#: White matter of the default prior (``TissuePrior()``), one size class each:
#: (index, name, fields replaced, seed of the draw). Packing fractions of
#: 0.45-0.75, as in histology of the corpus callosum (Aboitiz et al. 1992).
_PACKED_AXONS = dict(restricted_fraction=(0.45, 0.75))
AXON_VOXELS = (
    (
        (0, 3, 0),
        "axons of 1.5-2.5 um",
        dict(cell_diameter=(1.5, 2.5), **_PACKED_AXONS),
        0,
    ),
    ((1, 3, 0), "axons of 3-4 um", dict(cell_diameter=(3.0, 4.0), **_PACKED_AXONS), 1),
    (
        (2, 3, 0),
        "axons of 4.5-5.5 um",
        dict(cell_diameter=(4.5, 5.5), **_PACKED_AXONS),
        2,
    ),
)
_AXON_S0 = (1000.0, 1050.0, 950.0)
_VOXEL_MM = 2.0


def make_phantom_dataset(
    out_dir,
    *,
    timings=((0.005, 0.006), (0.010, 0.020), (0.010, 0.060)),
    bvals=(1000.0, 2500.0, 4000.0),
    n_directions=10,
    n_b0=3,
    snr=100.0,
    t2=0.08,
    diffusivity=2e-3,
    grid_size=80 / 3,
    grid_resolution=4,
    boundary="reflecting",
    seed=0,
    tissue_voxels=True,
    tissue_resolution=DEMO_TRAINING.reference_resolution,
    axon_voxels=None,
    axon_resolution=WHITE_MATTER_TRAINING.reference_resolution,
):
    """Write a small phantom diffusion dataset and return its paths.

    Twelve voxels (3 x 4 x 1, all inside the mask). The first two rows, six
    voxels, are each one substrate of :data:`PHANTOM_VOXELS` on
    ``TetGrid.bcc(grid_size, grid_resolution)``: cylinders of radius 0.30,
    0.20 and 0.26 box sides along z, x and (1, 0, 1), a sphere, and a leakier
    (1e-4 m/s) copy of the first cylinder. The third row holds the tissue of
    :data:`TISSUE_VOXELS` (an ellipsoid, two touching cells, a blob), for
    the posterior's demo: each drawn from one family of :data:`DEMO_PRIOR`
    (cells of 8-25 um) and simulated on a periodic patch of
    ``tissue_resolution`` cubes per side (6: twice as fine as the prior's
    training grid), with the same protocol, diffusivity, T2 weighting and
    noise level as the others; ``posterior.json`` says how to fit it. The
    fourth row holds the white matter of :data:`AXON_VOXELS` (packed axons
    of three size classes, along drawn directions), drawn from the default
    prior and simulated on sections of ``axon_resolution`` edges across
    (12: its training's reference), for the default posterior. The data
    are deterministic given ``seed``.

    The default protocol (99 volumes) is the published one thinned: its three
    PGSE timings (5/6, 10/20 and 10/60 ms: the curriculum's three stages and
    the diffusion times that separate restriction from hindrance), shells
    up to 4000 s/mm^2 (the cells' size shows above about 2500), 10
    directions per shell (orientation of the cylinders) and 3 b = 0 volumes
    per sequence (each sequence is normalised by its own b = 0 mean, whose
    noise would otherwise bias a whole sequence). On the 26-volume protocol
    it replaces (two timings, b up to 2500, 6 directions, one b = 0) the
    label search returned shapes that fit the data within the noise but
    were not the cells (measured per-voxel IoU 0.00-0.79). The noise is at
    SNR 100 by default: at SNR 50 the labellings the search returned fitted
    these 99 volumes as well as the truth in four of six voxels (README).

    Parameters
    ----------
    out_dir : str or os.PathLike
        Created if needed.
    timings : sequence of (small_delta, big_delta)
        PGSE timing of each sequence, in seconds.
    bvals : sequence of float
        Shells (s/mm^2) of every sequence.
    n_directions : int
        Directions per shell (a Fibonacci half-sphere).
    n_b0 : int
        b = 0 volumes per sequence.
    snr : float
        S0 / sigma of the Rician noise for the mean S0 (``inf`` for none).
    t2 : float
        T2 in seconds (the same everywhere): sequences with a longer echo
        time have a smaller b = 0 signal.
    diffusivity : float
        Intrinsic diffusivity, mm^2/s.
    grid_size, grid_resolution, boundary
        The grid of the first six voxels (pass the same to
        ``SpinverseModel``).
    seed : int
        Seed of the noise. The tissue voxels draw theirs from a stream of
        their own: the first six voxels do not depend on ``tissue_voxels``.
    tissue_voxels : bool
        Write the tissue voxels (about 20 s on 2 CPU cores with the default
        protocol). False: the 3 x 2 x 1 volume of the first six alone.
    tissue_resolution : int
        Cubes per side of the tissue voxels' patches, above
        ``DEMO_PRIOR.resolution`` (3); also the reference resolution of
        the training options in ``posterior.json``.
    axon_voxels : bool, optional
        Write the axon voxels (a few seconds); default ``tissue_voxels``.
        They need the tissue voxels' row before them.
    axon_resolution : int
        Edges across the axon voxels' sections, above the default prior's
        resolution (6).

    Returns
    -------
    dict
        Paths: ``data`` (NIfTI, float32), ``bvals`` and ``bvecs`` (FSL text),
        ``timing`` (text: one ``small_delta big_delta`` row per volume, in
        seconds), ``scheme`` (the same protocol as a Camino scheme file),
        ``mask`` (NIfTI), ``truth`` (.npz: per-voxel ``permeability``
        (3, 3, 1, n_faces) and ``labels`` (3, 3, 1, n_cells) on the grid
        of the first six voxels -- NaN and 0 at the tissue voxels, whose
        patches are other grids -- and ``S0``), ``truth_json``
        (the settings; substrate and true maps of each of the first six
        voxels in ``voxels``; family, prior fields, seed and true
        descriptors of each tissue voxel in ``tissue_voxels``; the
        ``posterior`` options), ``truth_meshes`` (a folder of the first six
        voxels' .ply surfaces), ``posterior`` (JSON: what
        ``dipy_fit_spinverse --posterior_options`` takes, :data:`DEMO_PRIOR`
        and :data:`DEMO_TRAINING`) and ``surface_check`` (the same for the
        label search's surface check: :data:`DEMO_SURFACE_PRIOR` on the
        grid of the first six voxels).

    Examples
    --------
    >>> import tempfile
    >>> paths = make_phantom_dataset(tempfile.mkdtemp(), grid_size=12.0,
    ...                              grid_resolution=2, n_directions=3,
    ...                              tissue_voxels=False)
    >>> sorted(paths)[:3]
    ['bvals', 'bvecs', 'data']
    """
    if not snr > 0:
        raise ValueError(f"snr must be > 0 (inf for no noise), got {snr!r}.")
    axon_voxels = tissue_voxels if axon_voxels is None else axon_voxels
    if axon_voxels and not tissue_voxels:
        raise ValueError(
            "axon_voxels=True needs tissue_voxels=True (the axons are the fourth "
            "row, after the tissue voxels'); pass axon_voxels=False."
        )
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    grid = TetGrid.bcc(grid_size, grid_resolution, boundary=boundary)
    protocol = _protocol(timings, bvals, n_directions, n_b0)
    phantoms = demo_phantoms(grid)
    permeability = np.stack([p.permeability for p in phantoms])
    signal = simulate(grid, permeability, protocol, diffusivity=diffusivity).numpy()
    decay = np.exp(-protocol.echo_times / t2)
    s0 = np.asarray(_S0)
    sigma = 0.0 if np.isinf(snr) else float(np.mean(s0)) / snr
    rows = _rician(s0[:, None] * decay * signal, sigma, np.random.default_rng(seed))
    indexes = [index for index, *_ in PHANTOM_VOXELS]
    rows_of = {
        "tissue_voxels": (
            tissue_voxels,
            TISSUE_VOXELS,
            DEMO_PRIOR,
            _TISSUE_S0,
            tissue_resolution,
        ),
        "axon_voxels": (
            axon_voxels,
            AXON_VOXELS,
            TissuePrior(),
            _AXON_S0,
            axon_resolution,
        ),
    }
    tissue = {key: [] for key in rows_of}
    for stream, (key, row) in enumerate(rows_of.items(), start=1):
        wanted, entries, base, s0s, resolution = row
        if not wanted:
            continue
        fine, tissue[key] = _tissue(
            entries, base, s0s, protocol, diffusivity, resolution
        )
        clean = np.asarray(s0s)[:, None] * decay * fine
        # A noise stream per row: the rows before do not depend on it.
        noise = np.random.default_rng([seed, stream])
        rows = np.concatenate([rows, _rician(clean, sigma, noise)])
        indexes += [index for index, *_ in entries]
    shape = tuple(int(n) + 1 for n in np.max(indexes, axis=0))

    affine = np.diag([_VOXEL_MM] * 3 + [1.0])
    volume = np.zeros(shape + (len(protocol),), dtype=np.float32)
    for index, row in zip(indexes, rows, strict=True):
        volume[index] = row
    paths = dict(
        data=os.path.join(out_dir, "dwi.nii.gz"),
        bvals=os.path.join(out_dir, "dwi.bval"),
        bvecs=os.path.join(out_dir, "dwi.bvec"),
        timing=os.path.join(out_dir, "timing.txt"),
        scheme=os.path.join(out_dir, "dwi.scheme"),
        mask=os.path.join(out_dir, "mask.nii.gz"),
        truth=os.path.join(out_dir, "truth.npz"),
        truth_json=os.path.join(out_dir, "truth.json"),
        truth_meshes=os.path.join(out_dir, "truth_meshes"),
        posterior=os.path.join(out_dir, "posterior.json"),
        surface_check=os.path.join(out_dir, "surface_check.json"),
    )
    save_image(paths["data"], volume, affine)
    save_image(paths["mask"], np.ones(shape, dtype=np.uint8), affine)
    np.savetxt(paths["bvals"], protocol.bvals[None], fmt="%.6g")
    np.savetxt(paths["bvecs"], protocol.bvecs.T, fmt="%.8f")
    timing = np.array([[w.small_delta, w.big_delta] for w in protocol.waveforms])
    np.savetxt(
        paths["timing"],
        timing,
        fmt="%.6g",
        header="small_delta big_delta (seconds), one row per volume",
    )
    write_scheme(protocol, paths["scheme"])
    posterior = _posterior_options(diffusivity, tissue_resolution, grid)
    with open(paths["posterior"], "w") as f:
        json.dump(posterior, f, indent=1)
    surface_check = _surface_check_options(diffusivity, grid, grid_resolution)
    with open(paths["surface_check"], "w") as f:
        json.dump(surface_check, f, indent=1)
    _write_truth(
        paths,
        grid,
        phantoms,
        shape,
        tissue,
        dict(
            grid_size=grid.size,
            grid_resolution=int(grid_resolution),
            boundary=boundary,
            diffusivity=diffusivity,
            t2=t2,
            snr=snr,
            sigma=sigma,
            seed=seed,
            posterior=posterior,
        ),
    )
    return paths


def _rician(clean, sigma, rng):
    """``clean`` with Rician noise of ``sigma`` (real, then imaginary part)."""
    return np.abs(
        clean
        + sigma
        * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape))
    )


def _tissue(entries, base, s0s, protocol, diffusivity, resolution):
    """The b0-normalised signals (n, n_volumes) of ``entries`` (as
    :data:`TISSUE_VOXELS`, fields of the prior ``base``), on patch grids of
    ``resolution``, and their truth (truth.json's ``tissue_voxels`` or
    ``axon_voxels``)."""
    signals, truth = [], []
    for (index, name, fields, seed), s0 in zip(entries, s0s, strict=True):
        prior = replace(base, diffusivity=diffusivity, **fields)
        # The tissue of a draw on the prior's grid, rasterised finer: tissue of
        # the prior that its training grid does not resolve.
        _, fine, described = prior.simulator(protocol).sample_pairs(
            1, reference_resolution=resolution, seed=seed
        )
        signals.append(fine[0])
        truth.append(
            dict(
                index=list(index),
                name=name,
                family=str(described["family"][0]),
                prior=prior.description(),
                seed=seed,
                resolution=int(resolution),
                box_size=float(described["box_size"][0]),
                S0=s0,
                **{k: described[k][0].tolist() for k in DESCRIPTORS},
            )
        )
    return np.stack(signals), truth


def _changed(options, defaults):
    """The fields of ``options`` that differ from ``defaults``, as JSON."""
    given, default = options.description(), defaults.description()
    return {name: value for name, value in given.items() if value != default[name]}


def _posterior_options(diffusivity, resolution, grid):
    """``dipy_fit_spinverse --posterior_options`` of the demo's posterior: its
    closed box is the first six voxels' (the prior models reflecting walls
    only; on other walls it keeps to periodic tissue)."""
    box = dict(box_side=grid.size)
    if grid.boundary != "reflecting":
        box = dict(boundary="periodic", box_side=None)
    prior = replace(DEMO_PRIOR, diffusivity=diffusivity, **box)
    training = replace(DEMO_TRAINING, reference_resolution=resolution)
    return dict(
        prior=_changed(prior, TissuePrior()),
        training=_changed(training, TrainingOptions()),
    )


def _surface_check_options(diffusivity, grid, resolution):
    """``--posterior_options`` of the label search's surface check on the
    demo: :data:`DEMO_SURFACE_PRIOR` on the first six voxels' grid (its
    box, walls and resolution), trained with :data:`DEMO_SURFACE_TRAINING`:
    the search's own noise model, data as its grid simulates them. (With
    the grid's error modelled, a Gaussian of 0.02-0.04 of b = 0, several
    times the noise, the posterior of the demo's cylinders was wider still:
    90 % restricted-fraction intervals [0.11, 0.61] against [0.19, 0.54].)"""
    box = dict(box_side=grid.size, boundary=grid.boundary)
    if grid.boundary != "reflecting":
        box = dict(boundary="periodic", box_side=None)
    prior = replace(
        DEMO_SURFACE_PRIOR, diffusivity=diffusivity, resolution=resolution, **box
    )
    return dict(
        prior=_changed(prior, TissuePrior()),
        training=_changed(DEMO_SURFACE_TRAINING, TrainingOptions()),
    )


def _protocol(timings, bvals, n_directions, n_b0):
    bvals = [float(b) for b in bvals]
    if not bvals or min(bvals) <= 0:
        raise ValueError(f"bvals must be positive shells in s/mm^2, got {bvals!r}.")
    if int(n_b0) < 1:
        raise ValueError(f"n_b0 must be >= 1 (one b=0 per sequence), got {n_b0!r}.")
    directions = fibonacci_sphere(n_directions, hemisphere=True)
    parts = []
    for small_delta, big_delta in timings:
        b = np.concatenate([np.zeros(int(n_b0)), np.repeat(bvals, len(directions))])
        v = np.vstack([np.zeros((int(n_b0), 3))] + [directions] * len(bvals))
        parts.append(Protocol.pgse(b, v, small_delta=small_delta, big_delta=big_delta))
    if not parts:
        raise ValueError("timings must list at least one (small_delta, big_delta).")
    return Protocol.concatenate(*parts)


def demo_phantoms(grid):
    """The demo's closed boxes (:data:`PHANTOM_VOXELS`) on ``grid``.

    Parameters
    ----------
    grid : TetGrid
        Radii are fractions of its side.

    Returns
    -------
    list of Phantom
        One per entry of :data:`PHANTOM_VOXELS`, in its order.
    """
    phantoms = []
    for _, shape, params, kappa in PHANTOM_VOXELS:
        params = dict(params, radius=params["radius"] * grid.size)
        make = {"cylinder": cylinder, "sphere": sphere}[shape]
        phantoms.append(make(grid, kappa=kappa, **params))
    return phantoms


def _write_truth(paths, grid, phantoms, shape, tissue, settings):
    # The tissue voxels' patches are other grids: no per-face truth there.
    permeability = np.full(shape + (grid.n_faces,), np.nan)
    labels = np.zeros(shape + (grid.n_cells,), dtype=np.int16)
    s0_map = np.zeros(shape)
    voxels = []
    os.makedirs(paths["truth_meshes"], exist_ok=True)
    for (index, kind, _, kappa), phantom, s in zip(
        PHANTOM_VOXELS, phantoms, _S0, strict=True
    ):
        permeability[index] = phantom.permeability
        labels[index] = phantom.labels
        s0_map[index] = s
        barrier = phantom.barrier
        inside = phantom.inside
        mesh = barrier_mesh(grid, barrier, labels=phantom.labels, cap_wall=True)
        name = "voxel_" + "_".join(map(str, index)) + ".ply"
        save_mesh(mesh, os.path.join(paths["truth_meshes"], name))
        voxels.append(
            dict(
                index=list(index),
                shape=kind,
                params={
                    k: list(v) if isinstance(v, tuple) else v
                    for k, v in phantom.params.items()
                },
                kappa=kappa,
                S0=s,
                restricted_fraction=float(
                    grid.cell_volumes[inside].sum() / grid.volume
                ),
                surface_to_volume=float(grid.face_areas[barrier].sum() / grid.volume),
                membrane_permeability=kappa,
                n_compartments=phantom.n_labels,
                mesh=os.path.join("truth_meshes", name),
            )
        )
    for voxel in (v for voxels in tissue.values() for v in voxels):
        s0_map[tuple(voxel["index"])] = voxel["S0"]
    np.savez_compressed(
        paths["truth"], permeability=permeability, labels=labels, S0=s0_map
    )
    with open(paths["truth_json"], "w") as f:
        json.dump(
            dict(settings, shape=list(shape), voxels=voxels, **tissue),
            f,
            indent=1,
        )


def main(argv=None):
    """``python -m dipy_spinverse.data OUT_DIR``: write the demo dataset."""
    import argparse

    parser = argparse.ArgumentParser(
        description=make_phantom_dataset.__doc__.split("\n")[0]
    )
    parser.add_argument("out_dir", help="folder to write the dataset to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument(
        "--snr", type=float, default=100.0, help="S0 / sigma of the Rician noise"
    )
    args = parser.parse_args(argv)
    paths = make_phantom_dataset(args.out_dir, seed=args.seed, snr=args.snr)
    for key, path in paths.items():
        print(f"{key:12s} {path}")
    return paths


if __name__ == "__main__":
    main()
