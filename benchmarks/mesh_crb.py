"""Cramer-Rao bounds of the axon code on the published protocol (issue 14).

The smallest standard deviation an unbiased estimator of the axon's radius,
beading amplitude and beading period can reach at a given SNR: the inverse
Fisher information of the fit's own forward model (``meshfit``'s axon code
on its tube template, eigenbasis cut at 2 um, the 540 acquisitions of
:func:`~dipy_spinverse.sim.sequences.published_protocol`), Gaussian noise of
``1 / snr`` of the b = 0 signal, its Jacobian by the fit's own forward
differences. Free: radius, the beading's two components and its period
(bend, swelling and fanning held at the truth's 0, as the fit holds them
unless the data ask). Cases are the nominal beaded axons of
``mesh_experiments.py``.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/mesh_crb.py [--snr 100]
"""

import argparse

import numpy as np
import torch

# The fit's own residual model (private: this script measures the fit).
from dipy_spinverse.meshfit.axonfit import _AxonModel
from dipy_spinverse.meshfit.templates import axon_template
from dipy_spinverse.sim.sequences import published_protocol

CASES = {
    "beaded": dict(radius=3.4, beading_amplitude=0.2, beading_period=10.0),
    "beaded-2": dict(
        radius=4.0, beading_amplitude=0.15, beading_period=7.0, beading_phase=1.0
    ),
    "beaded-3": dict(
        radius=3.0, beading_amplitude=0.25, beading_period=14.0, beading_phase=2.5
    ),
}
FREE = [0, 3, 4, 5]  # radius, beading_cos, beading_sin, beading_period


def bounds(params, snr, protocol, shape):
    """One-sigma bounds (relative) of radius, amplitude and period."""
    code = shape.code(**params)
    n = len(protocol)
    loss = dict(loss_scale=1.0, sigma=0.0, noise="gaussian")
    model = _AxonModel(
        shape,
        torch.zeros(n, dtype=torch.float64),
        protocol,
        loss,
        2e-3,
        2.0,
        None,
        None,
    )
    basis = model.basis(code)
    model.target = model.residuals(code, basis)[1]
    residuals = model.residuals(code, basis)[0]
    # residuals are scaled by sqrt(loss_scale / n): undo it.
    jacobian = model.jacobian(code, basis, residuals, FREE) * np.sqrt(n)
    covariance = np.linalg.inv(jacobian.T @ jacobian * snr**2)
    c, s = code[3], code[4]
    amplitude = np.hypot(c, s)
    grad = np.array([0.0, c / amplitude, s / amplitude, 0.0])
    return (
        np.sqrt(covariance[0, 0]) / code[0],
        np.sqrt(grad @ covariance @ grad) / amplitude,
        np.sqrt(covariance[3, 3]) / code[5],
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snr", type=float, default=100.0)
    args = parser.parse_args()
    protocol, shape = published_protocol(), axon_template("tube")
    print(f"One-sigma Cramer-Rao bounds at SNR {args.snr:g}, relative to the value:")
    print("| case | radius | beading amplitude | beading period |")
    print("| --- | --- | --- | --- |")
    for name, params in CASES.items():
        r, a, p = bounds(params, args.snr, protocol, shape)
        print(f"| {name} | {100 * r:.2f} % | {100 * a:.1f} % | {100 * p:.1f} % |")


if __name__ == "__main__":
    main()
