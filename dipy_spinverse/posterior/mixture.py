"""A voxel mixed from domains that exchange no water within the experiment.

Bundles some tens of um apart, free water and stationary water ("dots")
exchange no water during a diffusion experiment, so a voxel's signal is
the water- and T2-weighted sum of theirs (the premise of SANDI, NODDI and
microstructure fingerprinting). Only a bundle, with its myelin and its
exchange, needs the Bloch-Torrey solver; the rest is closed form:

- free water of diffusivity ``D`` and relaxation ``T2``:
  ``exp(-TE / T2) exp(-b D)``;
- a dot: ``exp(-TE / T2)``.

Each is normalised to its own water at zero echo time, as
:meth:`~dipy_spinverse.posterior.white_matter.WhiteMatterPrior.simulate`'s
bundles are, so that the mixture of waters ``W_k`` is
``sum_k W_k S_k / sum_k W_k``.

A bundle's response depends on the gradient through the cosine to its
axis alone once its cross-section is averaged over in-plane orientations
(:class:`BundleResponse`: simulated once per shell at the cosines of
:func:`~dipy_spinverse.compartments.blocks.zonal.axial_nodes`, each the
mean over ``n_azimuths`` in-plane directions). In zonal harmonics it then
gives the bundle along any axis and under any Watson dispersion
(:func:`~dipy_spinverse.compartments.blocks.zonal.watson_dispersed`)
without another simulation.
"""

from dataclasses import dataclass

import numpy as np
import torch
from scipy.interpolate import PchipInterpolator

from ..checks import check_int, check_positive
from ..compartments.blocks.watson import even_legendre, watson_legendre_moments
from ..compartments.blocks.zonal import axial_nodes, zonal_coefficients
from ..sim.sequences import Protocol, as_protocol

__all__ = [
    "free_water_signal",
    "dot_signal",
    "mixed_signal",
    "nodes_for_decay",
    "BundleResponse",
    "shell_keys",
    "b_rungs",
    "bundle_water",
    "voxel_descriptors",
]

#: Largest node count of a shell's table (Legendre degree 2 * (n - 1)).
MAX_NODES = 64


def free_water_signal(protocol, *, diffusivity, t2):
    """``exp(-TE / T2) exp(-b D)`` of every acquisition.

    Parameters
    ----------
    protocol : Protocol or GradientTable
    diffusivity : float or array_like (n,)
        mm^2/s.
    t2 : float or array_like (n,)
        Seconds (inf: no relaxation).

    Returns
    -------
    ndarray (n_acquisitions,) or (n, n_acquisitions)
    """
    protocol = as_protocol(protocol)
    d = np.asarray(diffusivity, dtype=np.float64)[..., None]
    return _relaxation(protocol, t2) * np.exp(-protocol.bvals * d)


def dot_signal(protocol, *, t2):
    """``exp(-TE / T2)``: water that does not move (a "dot").

    Parameters
    ----------
    protocol : Protocol or GradientTable
    t2 : float or array_like (n,)
        Seconds (inf: no relaxation).

    Returns
    -------
    ndarray (n_acquisitions,) or (n, n_acquisitions)
    """
    return _relaxation(as_protocol(protocol), t2)


def _relaxation(protocol, t2):
    t2 = np.asarray(t2, dtype=np.float64)[..., None]
    if np.any(~(t2 > 0)):
        raise ValueError(f"t2 must be > 0 seconds (inf: none), got {t2.ravel()}.")
    return np.exp(-protocol.echo_times / t2)


def mixed_signal(signals, waters):
    """The water-weighted mixture of domains that exchange no water.

    Parameters
    ----------
    signals : array_like (..., n_domains, n_acquisitions)
        Each normalised to its own water at zero echo time.
    waters : array_like (..., n_domains)
        Each domain's water (any common unit), >= 0, not all 0.

    Returns
    -------
    ndarray (..., n_acquisitions)
        ``sum_k W_k S_k / sum_k W_k``: 1 at b = 0 without relaxation.
    """
    signals = np.asarray(signals, dtype=np.float64)
    waters = np.asarray(waters, dtype=np.float64)
    if np.any(~(waters >= 0)) or np.any(waters.sum(-1) <= 0):
        raise ValueError("waters must be >= 0 with a positive sum per voxel.")
    return np.einsum("...k,...kn->...n", waters, signals) / waters.sum(-1)[..., None]


def nodes_for_decay(rate, *, tol=1e-4):
    """Nodes that tabulate ``exp(-rate x^2)`` to ``tol`` everywhere in [0, 1].

    Along a fibre the signal decays at most as free water's does, so the
    node count of a shell follows from ``b`` times the largest diffusivity
    of its domains.

    Parameters
    ----------
    rate : float
        ``b D`` (dimensionless), >= 0.
    tol : float

    Returns
    -------
    int
        At most :data:`MAX_NODES`.

    Raises
    ------
    ValueError
        When :data:`MAX_NODES` nodes do not reach ``tol``.
    """
    x = np.linspace(0.0, 1.0, 201)
    for n in range(2, MAX_NODES + 1):
        e = zonal_coefficients(np.exp(-rate * axial_nodes(n) ** 2))
        back = (e * even_legendre(torch.as_tensor(x), n)).sum(-1).numpy()
        if np.max(np.abs(back - np.exp(-rate * x**2))) <= tol:
            return n
    raise ValueError(
        f"b D = {rate:g} needs more than {MAX_NODES} nodes for {tol:g}: the "
        "signal along the fibres is gone at such b; leave those volumes out."
    )


def shell_keys(protocol):
    """The shells a bundle is tabulated at, and each acquisition's.

    Parameters
    ----------
    protocol : Protocol

    Returns
    -------
    keys : list of (Waveform, float)
        Each distinct waveform and b-value (to 1e-3 s/mm^2), in order of
        first appearance.
    index : ndarray of int (n_acquisitions,)
        Each acquisition's key.
    """
    keys, index = [], np.empty(len(protocol), dtype=np.intp)
    lookup = {}
    for i, (waveform, b) in enumerate(
        zip(protocol.waveforms, protocol.bvals, strict=True)
    ):
        key = (waveform, round(float(b), 3))
        if key not in lookup:
            lookup[key] = len(keys)
            keys.append(key)
        index[i] = lookup[key]
    return keys, index


@dataclass(frozen=True)
class BundleResponse:
    """A bundle's signal by shell and cosine to its axis, in zonal harmonics.

    Attributes
    ----------
    shells : tuple of (Waveform, float)
        Each shell's waveform and b-value (s/mm^2).
    coefficients : ndarray (n_shells, n_terms)
        Even Legendre coefficients of each shell's response (zero beyond
        its own node count).
    n_azimuths : int
        In-plane directions averaged at each node.
    """

    shells: tuple
    coefficients: np.ndarray
    n_azimuths: int

    @classmethod
    def tabulate(cls, prior, draw, protocol, *, n_azimuths=4, tol=1e-4, substeps=None):
        """Simulate a bundle on ``protocol``'s waveforms and tabulate it.

        Each waveform is simulated at a few b-values (its rungs,
        :func:`b_rungs`) and, at each, on the cosines of one node set (enough
        for free decay along the fibres at the largest b and the draw's
        largest diffusivity, :func:`nodes_for_decay`). Every shell of the
        protocol then takes its values at the nodes interpolated between the
        rungs around its b (the logarithm, piecewise cubic and monotone in
        b: exact for a Gaussian compartment's ``exp(-b D)``), so that
        scanner jitter or fifty gradient strengths of one waveform cost a
        few rungs, not a simulation each.

        Parameters
        ----------
        prior : WhiteMatterPrior
            Simulates the draw (:meth:`WhiteMatterPrior.simulate`).
        draw : WhiteMatterDraw
            Its axis is ignored: the table is about the fibres' own axis.
        protocol : Protocol or GradientTable
            The shells tabulated (each waveform and b-value).
        n_azimuths : int
            In-plane directions over [0, pi) averaged at each node: the
            bundle's in-plane anisotropy at harmonics below ``2
            n_azimuths`` is averaged out.
        tol : float
            Each waveform's nodes interpolate free decay along the fibres at
            the draw's largest diffusivity to this (:func:`nodes_for_decay`).
        substeps : int, optional
            Magnus sub-step multiple of the simulations (default: measured,
            :func:`~dipy_spinverse.simulate`).

        Returns
        -------
        BundleResponse
        """
        protocol = as_protocol(protocol)
        n_azimuths = check_int(n_azimuths, "n_azimuths", 1)
        tol = check_positive(tol, "tol")
        keys, _ = shell_keys(protocol)
        fastest = max(c["diffusivity"] for c in draw.tissue.values())
        rungs = b_rungs(keys)
        counts = {
            w: nodes_for_decay(max(bs) * fastest, tol=tol) for w, bs in rungs.items()
        }
        simulated = [(w, b) for w, bs in rungs.items() for b in bs]
        sizes = [counts[w] if b > 0 else 1 for w, b in simulated]
        table = _table_protocol(simulated, sizes, n_azimuths)
        along_z = draw._replace(axis=np.array([0.0, 0.0, 1.0]))
        raw = prior.simulate([along_z], table, substeps=substeps)[0]
        values, start = {}, 0
        for key, n in zip(simulated, sizes, strict=True):
            block = raw[start : start + n * n_azimuths].reshape(n, n_azimuths)
            values[key] = block.mean(1)
            start += n * n_azimuths
        coefficients = np.zeros((len(keys), max(counts.values(), default=1)))
        for s, (waveform, b) in enumerate(keys):
            at_nodes = (
                values[(waveform, b)]
                if (waveform, b) in values
                else _between_rungs(rungs[waveform], values, waveform, b)
            )
            coefficients[s, : len(at_nodes)] = zonal_coefficients(at_nodes).numpy()
        return cls(tuple(keys), coefficients, n_azimuths)

    def signals(self, protocol, axis, kappa=np.inf, *, rows=None):
        """The bundle's signals along ``axis``, Watson-dispersed by ``kappa``.

        Parameters
        ----------
        protocol : Protocol or GradientTable
            Every acquisition's shell must be tabulated.
        axis : array_like (3,) or (n, 3)
            Mean fibre directions (unit).
        kappa : float or array_like (n,)
            Watson concentrations (inf: no dispersion).
        rows : ndarray of int, optional
            ``shell_rows(protocol)``, found once where many calls share the
            protocol and the shells (a library's bundles); default found here.

        Returns
        -------
        ndarray (n_acquisitions,) or (n, n_acquisitions)
            Normalised to the bundle's water at zero echo time.
        """
        protocol = as_protocol(protocol)
        rows = self.shell_rows(protocol) if rows is None else rows
        axis = np.asarray(axis, dtype=np.float64)
        cosines = torch.as_tensor(axis @ protocol.bvecs.T)  # (..., n_acq)
        moments = watson_legendre_moments(kappa, self.coefficients.shape[1])
        legendre = even_legendre(cosines, self.coefficients.shape[1])
        weighted = torch.as_tensor(self.coefficients[rows]) * moments[..., None, :]
        return (weighted * legendre).sum(-1).numpy()

    def shell_rows(self, protocol):
        """Each acquisition's row of :attr:`coefficients` (ndarray of int);
        a ``ValueError`` naming a shell that is not tabulated."""
        lookup = {key: s for s, key in enumerate(self.shells)}
        keys, index = shell_keys(protocol)
        missing = [k for k in keys if k not in lookup]
        if missing:
            waveform, b = missing[0]
            raise ValueError(
                f"the bundle was not tabulated at b = {b:g} s/mm^2 with {waveform!r} "
                f"({len(missing)} such shells); tabulate it on this protocol."
            )
        return np.array([lookup[k] for k in keys])[index]


def _table_protocol(keys, counts, n_azimuths):
    """The acquisitions of a table: per shell, its nodes (cosines to z) times
    the azimuths, in that order."""
    waveforms, bvals, bvecs = [], [], []
    psi = np.pi * np.arange(n_azimuths) / n_azimuths
    for (waveform, b), n in zip(keys, counts, strict=True):
        x = axial_nodes(n) if b > 0 else np.zeros(1)
        for cosine in x:
            sine = np.sqrt(1 - cosine**2)
            for angle in psi:
                waveforms.append(waveform)
                bvals.append(b)
                bvecs.append(
                    [sine * np.cos(angle), sine * np.sin(angle), cosine]
                    if b > 0
                    else [0.0, 0.0, 0.0]
                )
    return Protocol(waveforms=tuple(waveforms), bvals=bvals, bvecs=bvecs)


#: Most b-values simulated per waveform: a waveform of more distinct shells
#: is simulated on a geometric ladder of this many and interpolated.
MAX_RUNGS = 12
#: b-values within this fraction (plus 5 s/mm^2) of a group's lowest are one
#: group (scanner jitter), simulated at the group's ends.
RUNG_SPREAD = 0.05


def b_rungs(keys):
    """The b-values simulated for each waveform of a protocol's shells.

    A waveform's positive b-values are grouped (each group within
    :data:`RUNG_SPREAD` of its lowest, plus 5 s/mm^2: jitter about one
    nominal b) and simulated at each group's lowest and highest value; a
    waveform of more than :data:`MAX_RUNGS` such values is simulated on a
    geometric ladder of :data:`MAX_RUNGS` from its lowest to its highest
    b. b = 0 is simulated where the protocol has it.

    Parameters
    ----------
    keys : list of (Waveform, float)
        :func:`shell_keys`.

    Returns
    -------
    dict
        Waveform -> sorted b-values (s/mm^2).
    """
    by_waveform = {}
    for waveform, b in keys:
        by_waveform.setdefault(waveform, []).append(b)
    out = {}
    for waveform, bs in by_waveform.items():
        positive = np.sort([b for b in bs if b > 0])
        groups = []  # [lowest, highest] of each group
        for b in positive:
            if groups and b <= groups[-1][0] * (1 + RUNG_SPREAD) + 5:
                groups[-1][1] = b
            else:
                groups.append([b, b])
        ends = sorted({b for group in groups for b in group})
        if len(ends) > MAX_RUNGS:
            ends = list(np.geomspace(positive[0], positive[-1], MAX_RUNGS))
            ends[0], ends[-1] = positive[0], positive[-1]
        zero = [0.0] if min(bs) == 0 else []
        out[waveform] = zero + [float(b) for b in ends]
    return out


def _between_rungs(rungs, values, waveform, b):
    """The values at a waveform's nodes at ``b``, interpolated between its
    positive rungs: the logarithm, monotone piecewise cubic in b (linear
    between two), where every value is positive; the values themselves
    otherwise (a diffraction dip below 0)."""
    positive = [r for r in rungs if r > 0]
    table = np.stack([values[(waveform, r)] for r in positive])
    if len(positive) == 1:
        return table[0]
    logs = np.all(table > 0)
    y = np.log(table) if logs else table
    if len(positive) == 2:
        weight = (b - positive[0]) / (positive[1] - positive[0])
        out = (1 - weight) * y[0] + weight * y[1]
    else:
        out = PchipInterpolator(positive, y, axis=0)(b)
    return np.exp(out) if logs else out


def bundle_water(draw):
    """A bundle's water per unit of its section's area (free water: 1).

    Only myelin holds water at another density than 1 (its ``density``).

    Parameters
    ----------
    draw : WhiteMatterDraw

    Returns
    -------
    float
    """
    area = draw.bundle.grid.volume
    myelin = draw.bundle.sheath_areas.sum()
    return float((area - myelin * (1 - draw.tissue["myelin"]["density"])) / area)


def voxel_descriptors(draws, fractions, *, free_water=0.0, dot=0.0):
    """The descriptors of a voxel of several bundles, free water and dots,
    from every axon it holds.

    Bundle ``k`` fills a share ``v_k`` of the voxel; its section of area
    ``A_k`` stands for ``v_k / A_k`` copies per unit of the voxel's
    cross-section, so the voxel's axons are the bundles' axons with those
    weights: ``d_eff = (sum w d^6 / sum w d^2)^(1/4)`` over all of them, the
    areas and conductances summed likewise.

    Parameters
    ----------
    draws : sequence of WhiteMatterDraw
    fractions : array_like (n_bundles,)
        Each bundle's share of the voxel's volume.
    free_water, dot : float
        The free water's and the dots' shares of the voxel's volume; the
        shares sum to 1.

    Returns
    -------
    dict
        ``effective_diameter`` and ``mean_diameter`` (um, over every axon),
        ``intra_axonal_fraction`` (the axons' share of the bundles' space
        outside myelin, histology's ``fr / (1 - MVF)`` of the tissue),
        ``myelin_fraction`` (of the bundles' space), ``g_ratio``
        (aggregate), ``exchange_time`` (s, the axons' water over their
        sheaths' conductance), ``free_water_fraction`` and ``dot_fraction``
        (of the voxel's water), and the aliases ``cell_diameter`` and
        ``restricted_fraction``.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (len(draws),) or np.any(~(fractions >= 0)):
        raise ValueError(
            f"fractions must be one share >= 0 per bundle ({len(draws)}), got "
            f"{fractions!r}."
        )
    total = fractions.sum() + free_water + dot
    if not (free_water >= 0 and dot >= 0 and abs(total - 1) <= 1e-9):
        raise ValueError(
            "the bundles' fractions, free_water and dot are shares of the voxel "
            f">= 0 that sum to 1, got a sum of {total:.6g}."
        )
    weights = [v / d.bundle.grid.volume for v, d in zip(fractions, draws, strict=True)]
    diameters = np.concatenate([d.bundle.diameters for d in draws])
    copies = np.concatenate(
        [np.full(d.bundle.n_axons, w) for w, d in zip(weights, draws, strict=True)]
    )
    axons = sum(
        w * d.bundle.axon_areas.sum() for w, d in zip(weights, draws, strict=True)
    )
    myelin = sum(
        w * d.bundle.sheath_areas.sum() for w, d in zip(weights, draws, strict=True)
    )
    conductance = sum(
        w
        * d.bundle.sheath_conductance(
            myelin_diffusivity=d.tissue["myelin"]["diffusivity"],
            myelin_density=d.tissue["myelin"]["density"],
        ).sum()
        for w, d in zip(weights, draws, strict=True)
    )
    tissue = fractions.sum()
    water = [v * bundle_water(d) for v, d in zip(fractions, draws, strict=True)]
    all_water = sum(water) + free_water + dot
    moment = lambda p: np.sum(copies * diameters**p)  # noqa: E731
    out = dict(
        effective_diameter=float((moment(6) / moment(2)) ** 0.25),
        mean_diameter=float(moment(1) / copies.sum()),
        intra_axonal_fraction=float(axons / (tissue - myelin)) if tissue else np.nan,
        myelin_fraction=float(myelin / tissue) if tissue else np.nan,
        g_ratio=float(np.sqrt(1 - myelin / (axons + myelin))) if tissue else np.nan,
        exchange_time=float(axons / conductance) * 1e-6 if tissue else np.nan,
        free_water_fraction=float(free_water / all_water),
        dot_fraction=float(dot / all_water),
    )
    out["cell_diameter"] = out["effective_diameter"]
    out["restricted_fraction"] = out["intra_axonal_fraction"]
    return out
