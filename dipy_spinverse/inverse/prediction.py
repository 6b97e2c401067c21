"""The inversion's prediction: a permeability field's signal in the data's terms.

:func:`~dipy_spinverse.sim.forward.simulate` returns ``S(TE) / S(0)``, the
signal over the initial magnetisation. The data are each sequence over its
own measured b = 0 signal (:func:`~dipy_spinverse.sim.signals.normalise_b0`),
so a prediction is each sequence over its own *simulated* b = 0 signal. The
two agree to the solver's tolerance in a reflecting or periodic box (about
1e-11 in float64, 1e-5 in float32), where no magnetisation is lost; an
absorbing wall (the published physics) loses magnetisation during each
sequence's echo time, and its b = 0 signals fall far below 1 (0.01-0.4 on
the test grid), so the division is the model, not a repeat. Every fit of
this package predicts through :func:`predict_signal`, once.
"""

from ..sim.forward import simulate
from ..sim.signals import normalise_b0

__all__ = ["predict_signal"]


def predict_signal(grid, permeability, protocol, **sim):
    """b0-normalised signals of permeability fields, as the data are normalised.

    Parameters
    ----------
    grid : TetGrid
    permeability : array_like or torch.Tensor (..., n_faces)
        Membrane permeability of every interior face, m/s; a tensor that
        requires grad gives a differentiable result.
    protocol : Protocol
        The data's acquisitions, in their order.
    **sim
        Keywords of :func:`~dipy_spinverse.sim.forward.simulate`
        (``diffusivity``, ``dtype``, ``device``, ...).

    Returns
    -------
    torch.Tensor (..., n_acquisitions)
        Each sequence divided by its own simulated b = 0 signal.
    """
    return normalise_b0(simulate(grid, permeability, protocol, **sim), protocol)
