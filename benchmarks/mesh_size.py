"""Regenerates the tables of doc/validation/mesh_inversion.md.

``--quick``: one radius per template, 3 noise draws (minutes: every fit screens
the size; -m slow).

Size of a cell far from the template, against the Cramer-Rao bound (issue 46).

Issue 46: :func:`dipy_spinverse.meshfit.fit_mesh` with the ``"ball"`` or
``"tube"`` template (4 um and 3 um) must recover spheres of radius 3-12 um and
cylinders of radius 1-8 um within 2 % from exact signals, and at SNR 100
within two sigma of the Cramer-Rao bound; radii drawn at random.

Measured, for each drawn radius (``--n`` spheres uniform in 3-12 um, ``--n``
tubes uniform in 1-8 um, seeded by ``--seed``):

1. The "exact" signal: the true cell on a finer mesh than the fit's template
   (ball resolution 5 against 3; tube of the same 20 um length, resolution 4
   against 3), simulated with a finer eigenbasis (1 um cut-off against the
   fit's 2 um) -- as ``tests/meshfit/test_meshfit_fit.py`` does.
2. :func:`fit_mesh` (public API, ``size="auto"``: the size screen then the
   12-mode spectral code, ``max_iter`` Adam steps, 15 as in the tests) on the
   exact signal: the relative error of :attr:`MeshFit.radius` (target 2 %).
3. The same fit (told ``sigma = 1 / snr`` and ``noise="rician"``) on
   ``--noise_draws`` Rician draws: ``|S + sigma (n1 + i n2)|``, ``S`` the
   exact signal with S0 = 1, ``sigma = 1 / snr`` of the b = 0 signal; the
   mean, bias and standard deviation of the fitted radii.
4. The Cramer-Rao bound of the radius, from the fit's own forward model
   (:func:`~dipy_spinverse.meshfit.templates.scaled_template` of the built-in
   template at the true radius, eigenbasis cut at 2 um and held fixed, as
   the fit holds it between recomputations), ``J = dS/dr`` by central
   differences (step 0.1 % of r). The headline bound (``CRB sigma``) has the
   radius as the only free parameter, S0 known and Gaussian noise of
   ``sigma`` (Fisher information ``J^T J / sigma^2``): the most optimistic
   (smallest) bound, so the strictest criterion. A second table gives the
   bound as more of the fit's unknowns are added, each step no smaller than
   the one before: the exact Rician Fisher information of each acquisition
   instead of the Gaussian ``1 / sigma^2``; then one S0 per sequence free
   (the fit divides each sequence by its own b = 0 volume); then the 12
   normal Laplace-Beltrami modes of the scaled template that the fit frees,
   the radius being :attr:`MeshFit.radius` of the deformed mesh (the fit's
   smoothness penalty, a weak prior, left out).

Criterion at SNR ``snr``: ``|mean error| <= 2 CRB sigma (1 + 1 / sqrt(N))``,
N the number of draws: the bias must be within the bound's two sigma, plus
two standard errors of an N-draw mean of an efficient estimator (the mean
of N draws is itself uncertain by ``CRB sigma / sqrt(N)`` at best). The
table also counts the single draws within ``2 CRB sigma`` of the truth (an
efficient unbiased estimator: about 95 %).

Protocol: three PGSE timings (delta / Delta 5/6, 10/20, 10/60 ms), b 1000,
2500, 4000 s/mm^2 on three directions (hemisphere Fibonacci) and one b = 0
per timing: 30 acquisitions, the protocol of the size tests in
``tests/meshfit/test_meshfit_fit.py``. Diffusivity 2e-3 mm^2/s.

The true radius is the nominal one of the finer mesh (its volume, or its
section's area, is the sphere's or the disc's); :attr:`MeshFit.radius` of a
tube is the mean distance of its side vertices from the axis, which on the
resolution-3 template is 0.76 % above the section's area-equivalent radius
(0.41 % at resolution 4).

Usage (one thread: next to another job on a shared 2-core machine, two
threads made one forward simulation 30-50 times slower, 3 s against
0.09 s; the full run is 9-10 minutes there)::

    OMP_NUM_THREADS=1 python benchmarks/mesh_size.py [--n 4] [--seed 0] \
        [--snr 100] [--noise_draws 8] [--max_iter 15] [--quick]
"""

import argparse
import platform
import time

import numpy as np
import torch
from scipy import integrate, special

from dipy_spinverse.meshfit import (
    ball_mesh,
    fit_mesh,
    mesh_basis,
    mesh_signal,
    spectral_shape,
    tube_mesh,
)
from dipy_spinverse.meshfit.templates import TEMPLATES, scaled_template, template_radius
from dipy_spinverse.sim.sequences import Protocol, fibonacci_sphere

#: Radius ranges (um) of the issue, per template.
RANGES = {"ball": (3.0, 12.0), "tube": (1.0, 8.0)}
TIMINGS = ((0.005, 0.006), (0.010, 0.020), (0.010, 0.060))
BVALS = (1000.0, 2500.0, 4000.0)
TUBE_LENGTH = 20.0  # um, the template's
FIT_LENGTH_SCALE = 2.0  # um, fit_mesh's default eigenbasis cut-off
N_MODES = 12  # fit_mesh's default shape code
DIFFERENCE_STEP = 1e-3  # central differences, relative to the radius


def three_timings():
    """The 30-acquisition protocol of the size tests (see the module notes)."""
    directions = fibonacci_sphere(3, hemisphere=True)
    parts = []
    for small_delta, big_delta in TIMINGS:
        bvals = np.r_[0.0, np.repeat(BVALS, len(directions))]
        bvecs = np.vstack([np.zeros((1, 3))] + [directions] * len(BVALS))
        parts.append(
            Protocol.pgse(bvals, bvecs, small_delta=small_delta, big_delta=big_delta)
        )
    return Protocol.concatenate(*parts)


def truth_mesh(kind, radius):
    """The true cell, finer than the fit's template."""
    if kind == "ball":
        return ball_mesh(radius, resolution=5)
    return tube_mesh(radius, TUBE_LENGTH, resolution=4, layers=10)


def rician(signal, sigma, rng):
    """Magnitude of the signal plus complex Gaussian noise of level sigma."""
    real = signal + sigma * rng.standard_normal(signal.shape)
    imaginary = sigma * rng.standard_normal(signal.shape)
    return np.hypot(real, imaginary)


def rician_information(amplitude, sigma):
    """Fisher information of a Rician magnitude about its amplitude, in units
    of the Gaussian ``1 / sigma^2`` (-> 1 far above the floor, 0 at it)."""
    a = amplitude / sigma

    def integrand(x):
        # Rice density with sigma = 1, written with i0e for large x a.
        density = x * np.exp(-0.5 * (x - a) ** 2) * special.i0e(x * a)
        score = x * special.i1e(x * a) / special.i0e(x * a) - a
        return density * score**2

    value, _ = integrate.quad(integrand, 0.0, a + 40.0, limit=200, points=[a])
    return value


def _signal(mesh, protocol, basis, vertices):
    with torch.no_grad():
        return mesh_signal(
            mesh, protocol, vertices=torch.tensor(np.array(vertices)), basis=basis
        ).numpy()


def cramer_rao(kind, radius, protocol, sigma):
    """One-sigma Cramer-Rao bounds (um) of the radius, from the fit's model.

    Returns a dict: ``radius_only`` (Gaussian, S0 known), ``rician``
    (radius only, exact Rician information), ``s0_free`` (and one S0 per
    sequence free), ``modes_free`` (and the 12 normal modes free).
    """
    template = TEMPLATES[kind]()
    mesh, _ = scaled_template(template, kind, radius)
    basis = mesh_basis(mesh, length_scale=FIT_LENGTH_SCALE)
    step = DIFFERENCE_STEP * radius

    def scaled(r):
        return scaled_template(template, kind, r)[0].vertices

    centre = _signal(mesh, protocol, basis, mesh.vertices)
    d_radius = (
        _signal(mesh, protocol, basis, scaled(radius + step))
        - _signal(mesh, protocol, basis, scaled(radius - step))
    ) / (2.0 * step)
    bounds = {"radius_only": sigma / np.sqrt(d_radius @ d_radius)}
    weights = np.array([rician_information(s, sigma) for s in centre]) / sigma**2
    bounds["rician"] = 1.0 / np.sqrt(d_radius @ (weights * d_radius))
    # One S0 per sequence: the model is S0_s S(r) on sequence s.
    d_s0 = np.zeros((len(protocol), len(protocol.sequences())))
    for column, (_, rows) in enumerate(protocol.sequences()):
        d_s0[rows, column] = centre[rows]
    jacobian = np.column_stack([d_radius, d_s0])
    covariance = np.linalg.inv(jacobian.T @ (weights[:, None] * jacobian))
    bounds["s0_free"] = np.sqrt(covariance[0, 0])
    # The fit's shape code on the scaled template; the radius is a function
    # of it (template_radius of the deformed mesh). Translations (and other
    # modes the signal cannot see) are null directions of the information,
    # along which the radius does not move: a pseudo-inverse.
    shape = spectral_shape(mesh, n_modes=N_MODES, directions="normal")
    d_code, d_g = [], []
    for k in range(shape.n_code):
        code = np.zeros(shape.n_code)
        code[k] = step
        d_code.append(
            (
                _signal(mesh, protocol, basis, shape.vertices(code))
                - _signal(mesh, protocol, basis, shape.vertices(-code))
            )
            / (2.0 * step)
        )
        d_g.append(
            (
                template_radius(shape.mesh(code), kind)
                - template_radius(shape.mesh(-code), kind)
            )
            / (2.0 * step)
        )
    jacobian = np.column_stack([np.array(d_code).T, d_s0])
    information = jacobian.T @ (weights[:, None] * jacobian)
    gradient = np.r_[np.array(d_g), np.zeros(d_s0.shape[1])]
    covariance = np.linalg.pinv(information, rcond=1e-10, hermitian=True)
    bounds["modes_free"] = np.sqrt(gradient @ covariance @ gradient)
    return bounds


def run_case(kind, radius, protocol, args, rng):
    """Noise-free and noisy fits of one cell, and its bounds."""
    t0 = time.perf_counter()
    exact = mesh_signal(truth_mesh(kind, radius), protocol).numpy()
    fit_options = dict(template=kind, max_iter=args.max_iter)
    clean = fit_mesh(exact, protocol, **fit_options)
    sigma = 1.0 / args.snr
    noisy = []
    for _ in range(args.noise_draws):
        fit = fit_mesh(
            rician(exact, sigma, rng),
            protocol,
            sigma=sigma,
            noise="rician",
            **fit_options,
        )
        noisy.append(fit.radius)
    bounds = cramer_rao(kind, radius, protocol, sigma)
    return dict(
        kind=kind,
        radius=radius,
        clean=clean.radius,
        clean_inverted=clean.n_inverted,
        noisy=np.array(noisy),
        bounds=bounds,
        seconds=time.perf_counter() - t0,
    )


def draw_radii(n, seed):
    """``n`` radii per template, uniform in its range, seeded."""
    rng = np.random.default_rng(seed)
    return [
        (kind, float(r))
        for kind, (low, high) in RANGES.items()
        for r in np.sort(rng.uniform(low, high, n))
    ]


def print_tables(rows, args):
    n = args.noise_draws
    slack = 2.0 * (1.0 + 1.0 / np.sqrt(n))
    print(
        f"| shape | true r (um) | noise-free fit (um) | error | "
        f"SNR {args.snr:g} mean (um) | bias (um) | std (um) | CRB sigma (um) | "
        f"abs(bias) / CRB sigma | draws within 2 CRB sigma | 2 % noise-free | "
        f"bias <= {slack:.2f} CRB sigma | time (s) |"
    )
    print("| --- " * 13 + "|")
    for row in rows:
        r, crb = row["radius"], row["bounds"]["radius_only"]
        error = row["clean"] / r - 1.0
        bias = row["noisy"].mean() - r
        within = int(np.sum(np.abs(row["noisy"] - r) <= 2.0 * crb))
        print(
            f"| {row['kind']} | {r:.3f} | {row['clean']:.3f} | "
            f"{100 * error:+.2f} % | {row['noisy'].mean():.3f} | {bias:+.4f} | "
            f"{row['noisy'].std(ddof=1) if n > 1 else 0.0:.4f} | {crb:.4f} | "
            f"{abs(bias) / crb:.2f} | {within}/{n} | "
            f"{'yes' if abs(error) < 0.02 else 'no'} | "
            f"{'yes' if abs(bias) <= slack * crb else 'no'} | "
            f"{row['seconds']:.0f} |"
        )
    print()
    print(
        "Bound of the radius (one sigma, um, and % of r) as the fit's unknowns "
        "are added:"
    )
    print(
        "| shape | true r (um) | radius only, Gaussian | + Rician information | "
        "+ S0 per sequence | + 12 shape modes | fitted std / last bound |"
    )
    print("| --- " * 7 + "|")
    for row in rows:
        r, b = row["radius"], row["bounds"]
        cells = " | ".join(
            f"{b[key]:.4f} ({100 * b[key] / r:.2f} %)"
            for key in ("radius_only", "rician", "s0_free", "modes_free")
        )
        std = row["noisy"].std(ddof=1) if n > 1 else 0.0
        print(f"| {row['kind']} | {r:.3f} | {cells} | {std / b['modes_free']:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="radii per template")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--snr", type=float, default=100.0)
    parser.add_argument("--noise_draws", type=int, default=8)
    parser.add_argument("--max_iter", type=int, default=15)
    parser.add_argument(
        "--quick", action="store_true", help="one radius per template, 3 draws"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.noise_draws = 1, 3
    t0 = time.perf_counter()
    protocol = three_timings()
    cases = draw_radii(args.n, args.seed)
    print(
        f"{len(protocol)} acquisitions, SNR {args.snr:g}, {args.noise_draws} "
        f"Rician draws, seed {args.seed}, max_iter {args.max_iter}, "
        f"torch threads {torch.get_num_threads()}, {platform.machine()}"
    )
    rows = []
    for index, (kind, radius) in enumerate(cases):
        rng = np.random.default_rng([args.seed, index])
        rows.append(run_case(kind, radius, protocol, args, rng))
        row = rows[-1]
        print(
            f"  {kind} r {radius:.3f}: noise-free {row['clean']:.3f}, "
            f"noisy {np.array2string(row['noisy'], precision=3)}, "
            f"{row['seconds']:.0f} s",
            flush=True,
        )
    print()
    print_tables(rows, args)
    print()
    print(f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
