"""The one exception type of devkit/infra.

Kept free of pytest so the same classes serve `scripts/local-kafka` and friends; the pytest
fixtures turn an InfraError into a test failure (never a skip) with the same message.
"""

from __future__ import annotations


class InfraError(RuntimeError):
    """Infrastructure is missing, did not start, or cannot do what was asked.

    The message says what happened and, when something is missing, how to provide it.
    """
