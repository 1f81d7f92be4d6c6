"""`tiktok-worker` with a mapper that raises on one marked message: the stand-in for a bug (or
an offset regression) while processing, which no real input can be made to trigger.

Run as `python -m tests.integration.raising_worker run --config FILE`.
"""

from __future__ import annotations

import sys

from worker.cli import main
from worker.mapping.mapper import EventOutcome, Mapper

MARKER = b"raise-while-processing"

_original = Mapper.map_message


def _map_message(self: Mapper, value: bytes | None) -> list[EventOutcome]:
    if value is not None and MARKER in value:
        raise RuntimeError("injected failure while processing")
    return _original(self, value)


Mapper.map_message = _map_message  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
