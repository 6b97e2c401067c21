"""The report figure of a fit: maps, then signals and meshes of a few voxels
(search) or each descriptor's intervals (posterior)."""

import os

import numpy as np
from dipy.utils.logging import logger

from ..files import atomic_write
from ..geometry import DESCRIPTORS
from ..io.maps import DESCRIPTOR_UNITS
from ..reconst import OK, STATUS_CODES
from ..sim.signals import sequence_index

__all__ = ["write_report", "write_posterior_report"]


def write_posterior_report(fit, path, *, n_voxels=8):
    """PNG: each descriptor's median and 50 % / 90 % intervals, voxel by voxel.

    Parameters
    ----------
    fit : PosteriorFit or ProtocolFreeFit
        Its descriptors' stored quantiles (``fit.params``).
    path : str or os.PathLike
    n_voxels : int
        The first voxels of the mask with status ok (in index order).

    Returns
    -------
    str or None
        The path, or None without matplotlib (with a warning).
    """
    try:
        import matplotlib
    except ImportError:
        logger.warning(
            f"matplotlib is not installed: no PNG report {os.fspath(path)}; "
            'install it with pip install "dipy_spinverse[plot]".'
        )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    names = [n for n in getattr(fit, "descriptors", DESCRIPTORS) if n != "orientation"]
    names = [n for n in names if n in fit.params]
    rows = np.flatnonzero(fit.params["status"] == OK)[:n_voxels]
    fig, axes = plt.subplots(1, len(names), figsize=(2.1 * len(names), 2.8), dpi=80)
    for ax, name in zip(axes, names, strict=True):
        q = fit.params[name][rows]
        y = np.arange(len(rows))
        ax.hlines(y, q[:, 0], q[:, 4], color="C0", lw=1, label="90 %")
        ax.hlines(y, q[:, 1], q[:, 3], color="C0", lw=3, label="50 %")
        ax.plot(q[:, 2], y, "k|", ms=8, label="median")
        if name in ("permeability", "exchange_time", "cell_volume"):
            ax.set_xscale("log")
            # Decades only: labelled minor ticks overlap within one decade.
            ax.xaxis.set_minor_formatter(NullFormatter())
        unit = DESCRIPTOR_UNITS[name]
        unit = f" ({unit})" if unit else ""
        ax.set_title(name.replace("_", " ") + unit, fontsize=7)
        ax.set_yticks(y)
        ax.set_yticklabels([str(int(r)) for r in rows] if ax is axes[0] else [])
        ax.tick_params(labelsize=6)
    axes[0].set_ylabel("voxel (mask order)", fontsize=7)
    axes[-1].legend(fontsize=6)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return os.fspath(path)


def write_report(fit, data, path, *, n_voxels=4):
    """PNG: a slice of the maps, then the signals and meshes of a few voxels.

    The top row shows the slice (along the last spatial axis) with the most
    fitted voxels of the restricted fraction, surface-to-volume, membrane
    permeability and residual maps and of the status map (whose legend
    names the codes in that slice); below, for each of the first
    ``n_voxels`` fitted voxels, the measured and predicted signals and the
    barrier mesh.

    Parameters
    ----------
    fit : SpinverseFit
    data : ndarray (..., n_volumes) or (n_mask, n_volumes)
        The fitted data: the volume, or the voxels of the fit's mask
        (``volume[fit.mask]``).
    path : str or os.PathLike
        Written atomically (a temporary file, then a rename).
    n_voxels : int
        Voxels shown (the first fitted ones, in index order; 0 for the maps
        only).

    Returns
    -------
    str or None
        The path, or None when matplotlib is not installed (a warning names
        the fix).
    """
    try:
        import matplotlib
    except ImportError:
        logger.warning(
            f"matplotlib is not installed: no PNG report {os.fspath(path)} (the "
            "other outputs are written); for the report, install it with "
            'pip install "dipy_spinverse[plot]".'
        )
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    voxels = list(zip(*np.nonzero(fit.status == OK), strict=True))[:n_voxels]
    fig = plt.figure(figsize=(11, 2.6 * (1 + len(voxels))), dpi=80)
    layout = fig.add_gridspec(1 + len(voxels), 10)
    _plot_maps(fig, layout, fit)
    for row, index in enumerate(voxels, start=1):
        _plot_voxel(fig, layout, row, fit, data, index, last=row == len(voxels))
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return os.fspath(path)


#: The maps of the report's top row: (attribute, title).
_REPORT_MAPS = (
    ("restricted_fraction", "restricted\nfraction"),
    ("surface_to_volume", "surface / volume\n(1/um)"),
    ("membrane_permeability", "membrane\npermeability (m/s)"),
    ("residual", "residual\n(fraction of S0)"),
)


def _shown_slice(fit):
    """Indices along the axes after the second (the last first) of the slice
    the report shows: the one with the most fitted voxels (a mid slice of a
    whole-brain mask can hold none), the middle one where none is fitted."""
    fitted = np.asarray(fit.fitted, dtype=bool)
    picks = []
    while fitted.ndim > 2:
        counts = fitted.reshape(-1, fitted.shape[-1]).sum(0)
        pick = int(np.argmax(counts)) if counts.any() else fitted.shape[-1] // 2
        picks.append(pick)
        fitted = fitted[..., pick]
    return picks


def _slice(volume, picks):
    """``volume`` at :func:`_shown_slice`'s indices, 2-D (1-D as a column)."""
    volume = np.asarray(volume, dtype=float)
    for pick in picks:
        volume = volume[..., pick]
    return volume[:, None] if volume.ndim == 1 else volume


def _plot_maps(fig, layout, fit):
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm, ListedColormap

    picks = _shown_slice(fit)
    inside = _slice(fit.mask, picks)
    for col, (name, title) in enumerate(_REPORT_MAPS):
        ax = fig.add_subplot(layout[0, 2 * col : 2 * col + 2])
        values = np.where(inside, _slice(getattr(fit, name), picks), np.nan)
        image = ax.imshow(values.T, origin="lower", cmap="viridis")
        fig.colorbar(image, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=6)
        if col == 0 and picks:
            ax.set_ylabel(f"slice {picks[-1]}", fontsize=7)
    # Status: one colour per code, only those present named.
    codes = sorted(STATUS_CODES)
    # tab20: a colour per code (the 10 of the default cycle would repeat).
    palette = [colormaps["tab20"](i) for i in range(len(codes))]
    colours = ListedColormap(palette)
    norm = BoundaryNorm(np.arange(len(codes) + 1) - 0.5, len(codes))
    status = _slice(fit.status, picks).astype(int)
    ax = fig.add_subplot(layout[0, 8:10])
    ax.imshow(np.searchsorted(codes, status).T, origin="lower", cmap=colours, norm=norm)
    present = [c for c in codes if np.any(status == c)]
    for code in present:
        ax.plot([], [], "s", color=palette[codes.index(code)], label=STATUS_CODES[code])
    ax.legend(fontsize=5, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("status", fontsize=8)
    ax.tick_params(labelsize=6)


def _plot_voxel(fig, layout, row, fit, data, index, *, last):
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    model = fit.model
    protocol = model.protocol
    voxel = fit[index]
    scale = voxel.params["S0_sequences"][sequence_index(protocol)]
    measured = fit.voxel_data(data, index) / scale
    predicted = voxel.predict() / scale
    ax = fig.add_subplot(layout[row, 0:5])
    for g, (waveform, idx) in enumerate(model.sequences):
        label = _waveform_label(waveform)
        ax.plot(
            protocol.bvals[idx],
            measured[idx],
            "o",
            ms=3,
            color=f"C{g}",
            label=f"data {label}",
        )
        ax.plot(
            protocol.bvals[idx] + 40.0,  # beside the data, not hidden by them
            predicted[idx],
            "x",
            ms=4,
            color="k" if g == 0 else "0.45",
            label=f"fit {label}",
        )
    ax.set_ylabel("S / S0")
    ax.set_title(
        f"voxel {tuple(int(i) for i in index)}: residual {voxel.residual:.3f}",
        fontsize=9,
    )
    if last:
        ax.set_xlabel("b (s/mm^2)")
    ax.legend(fontsize=6)
    ax3 = fig.add_subplot(layout[row, 5:10], projection="3d")
    mesh = voxel.interface_mesh
    if mesh is not None and mesh.n_triangles:
        tris = mesh.vertices[mesh.triangles]
        ax3.add_collection3d(
            Poly3DCollection(
                tris, alpha=0.5, facecolor="C1", edgecolor="k", linewidths=0.2
            )
        )
    size = model.grid.size
    for setter in (ax3.set_xlim, ax3.set_ylim, ax3.set_zlim):
        setter(0, size)
    ax3.set_title(
        f"restricted {voxel.restricted_fraction:.2f}, "
        f"{voxel.n_compartments:.0f} compartment(s)",
        fontsize=9,
    )
    ax3.tick_params(labelsize=6)


def _waveform_label(waveform):
    small = getattr(waveform, "small_delta", None)
    big = getattr(waveform, "big_delta", None)
    if small is None or big is None:
        return type(waveform).__name__
    return f"{small * 1e3:g}/{big * 1e3:g} ms"
