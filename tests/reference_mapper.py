"""A Mapper that checks every message against the reference mapper (issue 18).

The worker decodes first and maps through generated route functions (worker.mapping.routes);
`Mapper(..., generated=False)` keeps the mapper as it was (the `"batch"` byte scan before the
decode, the interpretive routing) as the reference. `CheckedMapper` runs both
on every value and asserts equal outcomes: the same mapped events with byte-identical
payloads and batch keys, the same invalid events and skip reasons. The golden, source and
property tests build their mappers with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from worker.mapping.mapper import EventOutcome, Mapper, MappingConfig


class CheckedMapper(Mapper):
    def __init__(self, config: MappingConfig, *, now: Callable[[], float], **kw: Any) -> None:
        super().__init__(config, now=now, **kw)
        self.reference = Mapper(config, now=now, generated=False, **kw)

    def map_message(self, value: bytes | None) -> list[EventOutcome]:
        got = super().map_message(value)
        want = self.reference.map_message(value)
        assert got == want, (got, want)
        for g, w in zip(got, want, strict=True):
            assert [m.payload for m in g.mapped] == [m.payload for m in w.mapped]
        return got
