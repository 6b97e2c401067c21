"""Simulations kept as they are made, so that an interrupted training resumes.

A posterior's training set takes minutes to hours of simulation. A
:class:`SimulationCheckpoint` holds the signals simulated so far (and the
time steps measured per patch, on which the remaining signals depend) in one
``.npz`` file, rewritten every :data:`SAVE_SECONDS` and when the simulation
stops on an exception (Ctrl-C included; a killed process loses at most the
last :data:`SAVE_SECONDS`). A rerun on the same draws reads it
and simulates only what is missing; a file of other draws is ignored with a
log line, never mixed in.
"""

import hashlib
import pathlib
import time
import zipfile

import numpy as np
from dipy.utils.logging import logger

from ..files import atomic_write

__all__ = ["SimulationCheckpoint", "SAVE_SECONDS"]

#: Seconds between two writes of a checkpoint: a minute of simulation is the
#: most an interruption loses, and a 10,000 x 288 signal table (23 MB) is
#: written in well under a second.
SAVE_SECONDS = 60.0


class SimulationCheckpoint:
    """The signals of a list of draws, saved as they are simulated.

    Parameters
    ----------
    path : path-like
        The ``.npz`` file (its folder is created when first written).
    draws : sequence of Draw
        The draws being simulated (:meth:`TissuePrior.draw`); the file
        records a fingerprint of them and is only read back for the same
        draws.
    n_acquisitions : int
    fingerprint : str, optional
        What the draws' signals depend on, as a hash, for draws of another
        prior than :class:`~.prior.TissuePrior` (default: computed from its
        draws).
    """

    def __init__(self, path, draws, n_acquisitions, *, fingerprint=None):
        self.path = pathlib.Path(path)
        if fingerprint is None:
            fingerprint = _fingerprint(draws, n_acquisitions)
        self.fingerprint = fingerprint
        self._last_save = time.monotonic()

    def restore(self, signals, done, measured_substeps):
        """Fill ``signals`` and ``done`` (in place) and the simulator's
        ``measured_substeps`` from the file, if it holds these draws.

        Returns
        -------
        int
            The number of draws restored.
        """
        if not self.path.exists():
            return 0
        try:
            with np.load(self.path, allow_pickle=False) as saved:
                if str(saved["fingerprint"]) != self.fingerprint:
                    logger.info(
                        f"Checkpoint {self.path} holds other draws; simulating "
                        "from the start."
                    )
                    return 0
                signals[:] = saved["signals"]
                done[:] = saved["done"]
                for side, boundary, section, multiple, error in zip(
                    saved["box_side"],
                    saved["box_boundary"],
                    saved["box_section"],
                    saved["substeps"],
                    saved["substep_error"],
                    strict=True,
                ):
                    box = (float(side), str(boundary), bool(section))
                    measured_substeps[box] = (int(multiple), float(error))
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
            # A file cut short (a full disk, a killed copy) is a damaged zip
            # archive: set aside like any unreadable one, never a traceback.
            logger.warning(
                f"Checkpoint {self.path} cannot be read ({type(err).__name__}); "
                "simulating from the start."
            )
            done[:] = False
            return 0
        restored = int(done.sum())
        logger.info(f"Resuming from {self.path}: {restored} draws already simulated.")
        return restored

    def save(self, signals, done, measured_substeps, *, force=False):
        """Write the file if :data:`SAVE_SECONDS` have passed (or ``force``)."""
        if not force and time.monotonic() - self._last_save < SAVE_SECONDS:
            return
        boxes = list(measured_substeps.items())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                fingerprint=np.array(self.fingerprint),
                signals=signals,
                done=done,
                box_side=np.array([box[0] for box, _ in boxes], dtype=np.float64),
                box_boundary=np.array([box[1] for box, _ in boxes], dtype=str),
                box_section=np.array([box[2] for box, _ in boxes], dtype=bool),
                substeps=np.array([m for _, (m, _) in boxes], dtype=np.int64),
                substep_error=np.array([e for _, (_, e) in boxes], dtype=float),
            )
        self._last_save = time.monotonic()


def _fingerprint(draws, n_acquisitions):
    """A hash of what the draws' signals depend on: patch, diffusivity,
    fibre axis and every face's permeability."""
    digest = hashlib.sha256(str(n_acquisitions).encode())
    for draw in draws:
        digest.update(np.array([draw.side, draw.diffusivity]).tobytes())
        digest.update(draw.boundary.encode())
        if draw.axis is not None:
            digest.update(np.asarray(draw.axis, dtype=np.float64).tobytes())
        digest.update(np.asarray(draw.substrate.face_permeability).tobytes())
    return digest.hexdigest()
