"""``python -m mongoengine_lockable``: the command line (see :mod:`mongoengine_lockable._cli`)."""

from __future__ import annotations

import sys

from mongoengine_lockable._cli import main

if __name__ == "__main__":
    sys.exit(main())
