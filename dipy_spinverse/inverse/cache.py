"""The process-wide store of simulated signals shared by the label searches.

Every voxel of a volume (every chunk) screens the same generic shapes, and
a descent asks again for fields it has scored: :class:`SignalCache` keeps
each simulated field once, least recently used first out.
"""

import threading
from collections import OrderedDict

__all__ = ["SIGNAL_CACHE_BYTES", "SignalCache", "SIGNAL_CACHE"]

# Memory for simulated signals shared between voxels (SignalCache): at 540
# acquisitions in float64 this holds about 60,000 labellings, more than the
# generic-shape screen and the descents of a chunk of voxels request.
SIGNAL_CACHE_BYTES = 256 * 2**20


class SignalCache:
    """Least-recently-used store of simulated signals, thread-safe.

    Keys are bytes (:meth:`~dipy_spinverse.inverse.scorer.BatchScorer.signals` builds
    them from a digest of the grid, protocol and simulation settings, the barrier faces
    and the membrane), values tensors.

    Parameters
    ----------
    max_bytes : int
        The most bytes of tensors held.
    """

    def __init__(self, *, max_bytes=SIGNAL_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.n_bytes = 0
        self._store = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._store)

    def get_many(self, keys):
        """The stored values of ``keys`` (a dict; absent keys are left out)."""
        with self._lock:
            found = {}
            for key in keys:
                if key in self._store and key not in found:
                    self._store.move_to_end(key)
                    found[key] = self._store[key]
            return found

    def put_many(self, items):
        """Store ``(key, tensor)`` pairs, dropping the least recently used."""
        with self._lock:
            for key, value in items:
                if key in self._store:
                    continue
                self._store[key] = value
                self.n_bytes += value.element_size() * value.nelement()
            while self.n_bytes > self.max_bytes and self._store:
                _, old = self._store.popitem(last=False)
                self.n_bytes -= old.element_size() * old.nelement()

    def clear(self):
        with self._lock:
            self._store.clear()
            self.n_bytes = 0


#: The process's shared store: the generic-shape screen asks every voxel of a
#: volume (every chunk) for the same ~1,000 shapes.
SIGNAL_CACHE = SignalCache()
