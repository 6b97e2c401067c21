"""``python -m dipy_spinverse.posterior``: the shipped estimators and the code
they are accepted for (:func:`.shipping.main`; ``rekey --reason "..."`` after
a change of the code that leaves their training as it was). Exit status 0,
1 when a shipped estimator is not accepted, 2 when the command is refused
(one line on stderr: :data:`.shipping.EXIT_STATUSES`)."""

import sys

from .shipping import main

if __name__ == "__main__":  # not when imported (the docstring checks walk it)
    sys.exit(main())
