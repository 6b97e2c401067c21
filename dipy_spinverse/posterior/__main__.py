"""``python -m dipy_spinverse.posterior``: the shipped estimators and the code
they are accepted for (:func:`.shipped.main`; ``rekey --reason "..."`` after
a change of the code that leaves their training as it was)."""

import sys

from .shipped import main

if __name__ == "__main__":  # not when imported (the docstring checks walk it)
    sys.exit(main())
