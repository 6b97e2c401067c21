"""Regenerates the tables of doc/validation/mesh_inversion.md.

``--quick``: one coarse mesh, timed once.

Speed of the mesh-shape inversion's simulator (issue 14): the forward +
gradient time of :func:`dipy_spinverse.meshfit.mesh_signal` on a ball mesh
of about 5,000 tetrahedra with the 540-acquisition published protocol
(target <= 2 s on 2 cores), with the eigenbasis time apart, at the
published eigenmode length scale (2 um) and at 1 um. Nothing is drawn at
random; ``--seed`` seeds torch's global generator all the same.

    OMP_NUM_THREADS=1 python benchmarks/meshfit.py --repeats 3
"""

import time

import harness
import numpy as np
import torch

from dipy_spinverse.meshfit import ball_mesh, mesh_basis, mesh_signal
from dipy_spinverse.sim.sequences import published_protocol


def time_forward(resolution, length_scale, repeats):
    """Tetrahedra, modes, eigenbasis seconds and the best forward + gradient
    seconds of ``repeats``."""
    mesh = ball_mesh(5.0, resolution=resolution)
    protocol = published_protocol()
    t0 = time.perf_counter()
    basis = mesh_basis(mesh, length_scale=length_scale)
    t_basis = time.perf_counter() - t0
    best = np.inf
    for _ in range(repeats):
        vertices = torch.tensor(mesh.vertices, requires_grad=True)
        t0 = time.perf_counter()
        signal = mesh_signal(mesh, protocol, vertices=vertices, basis=basis)
        signal.sum().backward()
        best = min(best, time.perf_counter() - t0)
    return mesh.n_tets, basis.n_modes, t_basis, best


def main(argv=None):
    parser = harness.parser(
        __doc__, seed=0, quick="one coarse mesh, once (a smoke test)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    sizes = ((5, 2.0), (5, 1.0))
    if args.quick:
        args.repeats, sizes = 1, ((3, 2.0),)
    print(f"torch threads: {torch.get_num_threads()}")
    titles = ["mesh tets", "modes", "length scale (um)", "basis (s)"]
    print(harness.head([*titles, "forward+grad (s)"], spaced=True))
    for resolution, length_scale in sizes:
        n_tets, n_modes, t_basis, t_fb = time_forward(
            resolution, length_scale, args.repeats
        )
        cells = [n_tets, n_modes, f"{length_scale:g}", f"{t_basis:.2f}"]
        print(harness.row([*cells, f"{t_fb:.2f}"]))


if __name__ == "__main__":
    main()
