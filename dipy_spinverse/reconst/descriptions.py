"""The models' inputs as JSON-ready values: protocols, gradient tables, grids.

A model describes itself (``model.description()``) in these values, from
which its class rebuilds it (``from_description``): what a fit file keeps of
its model (:func:`dipy_spinverse.io.specs.model_spec`). A protocol is kept
as its waveforms, b-values and directions, which is all a fit depends on; a
grid as the BCC grid's parameters, or as its geometry when it was built by
hand.
"""

from dataclasses import asdict

import numpy as np
from dipy.core.gradients import gradient_table

from ..sim import sequences, waveforms
from ..sim.grid import TetGrid

__all__ = [
    "protocol_description",
    "gtab_description",
    "table_from_description",
    "grid_description",
    "grid_from_description",
    "same_protocol",
]


def protocol_description(protocol):
    """A protocol's waveforms, b-values and directions.

    Parameters
    ----------
    protocol : Protocol

    Returns
    -------
    dict
        ``bvals``, ``bvecs`` (arrays) and ``waveforms`` (one dict each).
    """
    return dict(
        bvals=protocol.bvals,
        bvecs=protocol.bvecs,
        waveforms=[_waveform_description(w) for w in protocol.waveforms],
    )


def same_protocol(a, b):
    """Whether two protocols acquire the same volumes: the same waveforms
    and b-values, and directions the same to rounding.

    A protocol read back from its description normalises its directions
    again (:class:`~dipy_spinverse.sim.sequences.Protocol`), which may move
    them by a unit in the last place: that is no other protocol.

    Parameters
    ----------
    a, b : Protocol

    Returns
    -------
    bool
    """
    return (
        tuple(a.waveforms) == tuple(b.waveforms)
        and np.array_equal(a.bvals, b.bvals)
        and a.bvecs.shape == b.bvecs.shape
        and np.allclose(a.bvecs, b.bvecs, rtol=0.0, atol=1e-12)
    )


def gtab_description(gtab):
    """A gradient table's b-values, directions, timing and b = 0 threshold.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable

    Returns
    -------
    dict
    """
    return dict(
        bvals=gtab.bvals,
        bvecs=gtab.bvecs,
        big_delta=gtab.big_delta,
        small_delta=gtab.small_delta,
        b0_threshold=gtab.b0_threshold,
    )


def table_from_description(description):
    """The acquisitions of a model's description: its ``protocol``, or (files
    of models built from a gradient table before protocols were kept) its
    ``gtab``.

    Parameters
    ----------
    description : dict
        A model's description.

    Returns
    -------
    Protocol or GradientTable
    """
    if "protocol" not in description:
        g = description["gtab"]
        return gradient_table(
            np.asarray(g["bvals"], float),
            bvecs=np.asarray(g["bvecs"], float).reshape(-1, 3),
            big_delta=_array_or_scalar(g["big_delta"]),
            small_delta=_array_or_scalar(g["small_delta"]),
            b0_threshold=g["b0_threshold"],
        )
    p = description["protocol"]
    return sequences.Protocol(
        waveforms=tuple(_waveform_from_description(w) for w in p["waveforms"]),
        bvals=np.asarray(p["bvals"], float),
        bvecs=np.asarray(p["bvecs"], float).reshape(-1, 3),
    )


def grid_description(grid):
    """A grid's description: the BCC grid's parameters, and the geometry
    itself (vertices, tetrahedra, unwrapped corners) when ``grid`` is not
    the BCC grid of those parameters (a grid built by hand).

    Parameters
    ----------
    grid : TetGrid

    Returns
    -------
    dict
    """
    spec = dict(
        size=grid.size,
        n=int(round(grid.size / grid.spacing)),
        boundary=grid.boundary,
        wall_permeability=grid.wall_permeability,
    )
    try:
        bcc = TetGrid.bcc(
            grid.size,
            spec["n"],
            boundary=grid.boundary,
            wall_permeability=grid.wall_permeability,
        )
    except ValueError:  # parameters no BCC grid has
        bcc = None
    same = bcc is not None and all(
        np.array_equal(getattr(bcc, name), getattr(grid, name))
        for name in ("vertices", "tets", "tet_coords")
    )
    if not same:
        spec.update(
            spacing=grid.spacing,
            vertices=grid.vertices,
            tets=grid.tets,
            tet_coords=grid.tet_coords,
        )
    return spec


def grid_from_description(spec):
    """The grid :func:`grid_description` described.

    Parameters
    ----------
    spec : dict

    Returns
    -------
    TetGrid
    """
    if "vertices" not in spec:
        return TetGrid.bcc(
            spec["size"],
            spec["n"],
            boundary=spec["boundary"],
            wall_permeability=spec["wall_permeability"],
        )
    return TetGrid(
        vertices=np.asarray(spec["vertices"], float).reshape(-1, 3),
        tets=np.asarray(spec["tets"], np.int64).reshape(-1, 4),
        size=float(spec["size"]),
        boundary=spec["boundary"],
        wall_permeability=float(spec["wall_permeability"]),
        spacing=float(spec["spacing"]),
        tet_coords=np.asarray(spec["tet_coords"], float).reshape(-1, 4, 3),
    )


def _array_or_scalar(value):
    if value is None:
        return None
    return np.asarray(value, float) if isinstance(value, list) else float(value)


def _waveform_description(waveform):
    if isinstance(waveform, waveforms.SpinEcho):  # a waveform inside: its own
        return dict(
            type="SpinEcho",
            encoding=_waveform_description(waveform.encoding),
            echo_time=waveform.echo_time,
        )
    return dict(type=type(waveform).__name__, **asdict(waveform))


def _waveform_from_description(spec):
    spec = dict(spec)
    cls = getattr(waveforms, spec.pop("type"))
    if cls is waveforms.SpinEcho:
        spec["encoding"] = _waveform_from_description(spec["encoding"])
    return cls(**spec)
