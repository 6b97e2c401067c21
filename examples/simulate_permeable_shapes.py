"""
Signals of a permeable cylinder and sphere
==========================================

Place a cylinder (radius 6 um, along z) and a sphere (radius 7 um) in a
reflecting voxel, put a membrane of permeability ``kappa`` on the grid faces
between inside and outside, and simulate PGSE signals (delta = 10 ms,
Delta = 40 ms) for several permeabilities with
:func:`dipy_spinverse.simulate`.
"""

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dipy_spinverse import Protocol, TetGrid, simulate  # noqa: E402

# %%
# A reflecting 24 um voxel on an 8^3 BCC lattice (5,376 tetrahedra).
parser = argparse.ArgumentParser(description=__doc__.strip().partition("\n")[0])
parser.add_argument("--out", default=".", help="output directory")
args, _ = parser.parse_known_args()

size = 24.0
grid = TetGrid.bcc(size, 8)
centred = grid.cell_centroids - size / 2
shapes = {
    "cylinder (r = 6 um)": np.linalg.norm(centred[:, :2], axis=1) < 6.0,
    "sphere (r = 7 um)": np.linalg.norm(centred, axis=1) < 7.0,
}

# %%
# PGSE, b = 0 .. 5000 s/mm^2, gradient across the cylinder (x) and along it (z).
bvals = np.linspace(0, 5000, 11)
directions = {"perpendicular (x)": [1.0, 0, 0], "parallel (z)": [0, 0, 1.0]}
kappas = [0.0, 1e-5, 3e-5, 1e-4, 1e-3, np.inf]  # m/s

panels = [
    ("cylinder (r = 6 um)", "perpendicular (x)", True),
    ("cylinder (r = 6 um)", "parallel (z)", True),
    ("sphere (r = 7 um)", "perpendicular (x)", True),
    ("sphere (r = 7 um)", "perpendicular (x)", False),
]
start = time.perf_counter()
fig, axes = plt.subplots(2, 2, figsize=(10, 8), sharex=True)
for ax, (shape, direction, intracellular) in zip(axes.ravel(), panels, strict=True):
    inside = shapes[shape]
    prot = Protocol.pgse(
        bvals, [directions[direction]] * len(bvals), small_delta=0.01, big_delta=0.04
    )
    # One batched call: every permeability is a row of the field.
    field = np.where(grid.interface_faces(inside), np.array(kappas)[:, None], np.inf)
    signal = simulate(grid, field, prot, initial=inside if intracellular else None)
    for kappa, row in zip(kappas, signal.numpy(), strict=True):
        ax.semilogy(bvals, row, marker="o", ms=3, label=f"kappa = {kappa:g} m/s")
    ax.semilogy(bvals, np.exp(-bvals * 2e-3), "k:", label="free, exp(-bD)")
    where = "spins started inside" if intracellular else "whole voxel"
    ax.set_title(f"{shape}, gradient {direction}\n{where}", fontsize=10)
    ax.set_ylim(1e-3, 1.1)
for ax in axes[1]:
    ax.set_xlabel("b (s/mm$^2$)")
for ax in axes[:, 0]:
    ax.set_ylabel("S / S0")
axes[0, 0].legend(fontsize=8)
fig.tight_layout()

# %%
# What the curves show: an impermeable cylinder (kappa = 0) restricts motion
# across its axis, so the perpendicular signal of the spins inside plateaus;
# with a permeable membrane spins escape during Delta and the signal decays
# towards that of hindered extracellular diffusion, faster for larger kappa.
# Along the axis the cylinder does not restrict at all: every permeability
# gives the same curve, which leaves exp(-bD) only because the 24 um voxel
# itself has reflecting walls. The whole-voxel sphere signal mixes the
# restricted inside with the hindered outside. The dips at high b for spins
# started inside a leaky shape are diffraction from the voxel walls.
os.makedirs(args.out, exist_ok=True)
path = os.path.join(args.out, "simulated_signals.png")
fig.savefig(path, dpi=120)
print(
    f"simulated {len(kappas) * len(bvals) * len(panels)} signals on "
    f"{grid.n_cells} cells in {time.perf_counter() - start:.1f} s"
)
print(f"saved {path}")
