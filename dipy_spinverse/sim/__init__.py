"""The physics: a tetrahedral grid, its Bloch-Torrey operators, their time
integration and the b0-normalised signal of an acquisition.

Data flows one way: :mod:`.grid` -> :mod:`.operators` -> :mod:`.solvers` ->
:mod:`.forward` (:func:`~.forward.simulate`), with the acquisitions in
:mod:`.waveforms` and :mod:`.sequences`, the one b0 normalisation and data
loss in :mod:`.signals` and closed-form references in :mod:`.analytic`.
This package is the ground floor: it imports only
:mod:`dipy_spinverse.checks`.
"""
