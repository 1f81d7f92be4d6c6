"""Routing and subscription glue compiled to one straight-line function per route.

A route is a Segment call type and an event name. For each route the mapper knows, once, which
subscriptions of which destinations can match (their triggers pin no other `event`/`type`),
and in what order. This module turns that list into one generated function
`route(event, index, multi, raw) -> EventOutcome` that does, for that route only, what the
interpretive mapper (`Mapper(generated=False)`, the reference) does per event: destination
filters and non-routing triggers, plan evaluation and `contents` once per plan (lazily, so a
filter that fails costs nothing), payload encoding once per (plan, contents, event name,
region), batch keys and `InvalidEvent` de-duplication. Sharing is decided at compile time:
the memo dict, the per-event candidate lookup and the subscription loop are gone.

The generated source contains no text from the config: every config value (names, regions,
predicates, plans) is bound in the function's namespace under a generated name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

__all__ = ["RouteDest", "RouteFn", "RouteSub", "compile_route"]

RouteFn = Callable[[Any, int, bool, bytes], Any]


class RouteSub(Protocol):
    """What a route reads of a subscription (`worker.mapping.mapper._Sub`)."""

    @property
    def name(self) -> str: ...
    @property
    def event(self) -> str: ...
    @property
    def plan(self) -> Any: ...
    @property
    def contents(self) -> Callable[[Any], Any]: ...
    @property
    def routing_only(self) -> bool: ...
    @property
    def finish(self) -> Callable[[Any, Any, str | None], bytes] | None: ...
    @property
    def predicate(self) -> Callable[[Any], bool]: ...


class RouteDest(Protocol):
    """What a route reads of a destination (`worker.mapping.mapper._Destination`)."""

    @property
    def name(self) -> str: ...
    @property
    def region(self) -> str | None: ...
    @property
    def test_event_code(self) -> str | None: ...
    @property
    def when_predicate(self) -> Callable[[Any], bool] | None: ...
    @property
    def web_key(self) -> Any: ...  # key(web, no test code), without the lookup

    def key(self, event_source: str, test_event_code: str | None) -> Any: ...


# The web/crm payload: what `Mapper._map_subscription` encodes (SPEC §3; worker.mapping.body).
_WEB_PAYLOAD: Final = """\
pr = {{"contents": {contents}}}
pr.update({common}.properties)
eid = {common}.event_id
{payload} = _enc(_EventOut({event}, {common}.event_time, eid if eid is not None else _UNSET, \
{common}.user if {common}.region == {region} else {common}.user_for({region}), pr, \
{common}.page, {common}.lead, {common}.limited_data_use))"""


class _Gen:
    def __init__(self, namespace: dict[str, Any]) -> None:
        self.ns = dict(namespace)
        self.consts: dict[tuple[str, Any], str] = {}
        self.lines: list[str] = []
        # Variables holding per-event results: "set" once assigned unconditionally, "maybe"
        # once assigned inside a condition (later uses must test `is None`).
        self.state: dict[str, str] = {}
        self.maybe: set[str] = set()

    def const(self, value: Any) -> str:
        """A namespace name bound to `value` (config text never enters the source)."""
        # Strings and None are shared by value (equal event names and regions share a
        # payload, as in the reference's memo keys); everything else by identity.
        key = ("v", value) if value is None or type(value) is str else ("id", id(value))
        name = self.consts.get(key)
        if name is None:
            name = self.consts[key] = f"_k{len(self.consts)}"
            self.ns[name] = value
        return name

    def var(self, prefix: str, *parts: Any) -> str:
        return prefix + "_".join(self.const(p)[2:] for p in parts)

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def compute(self, depth: int, var: str, conditional: bool, body: list[str]) -> None:
        """Emit `body` (lines assigning `var`, indented relative to `depth`) unless `var` is
        already set; mark it set or maybe-set."""
        state = self.state.get(var)
        if state == "set":
            return
        if state == "maybe":
            self.maybe.add(var)
            self.emit(depth, f"if {var} is None:")
            depth += 1
        for line in body:
            self.emit(depth, line)
        if state is None:
            self.state[var] = "maybe" if conditional else "set"

    def attempt(self, depth: int, var: str, conditional: bool, call: str) -> None:
        """`var = call`, or the FieldError it raises."""
        self.compute(
            depth,
            var,
            conditional,
            ["try:", f"    {var} = {call}", "except _FE as exc:", f"    {var} = exc"],
        )


def compile_route(
    dests: Sequence[tuple[RouteDest, Sequence[RouteSub]]],
    namespace: dict[str, Any],
) -> RouteFn:
    """One function mapping an event of this route, for `dests` in order, each with its
    candidate subscriptions in order. `namespace` supplies `_FE` (FieldError), `_ME`
    (MappedEvent), `_EO` (EventOutcome), `_inv` (record an InvalidEvent once), `_mid` (the
    message id of a non-string messageId), `_NO_MATCH`, `_now`, `_enc`, `_EventOut`,
    and `_UNSET`. A destination's batch keys come from its `key(event_source, code)` and
    `web_key`."""
    gen = _Gen(namespace)
    for dest, subs in dests:
        if not subs:
            continue
        depth = 1
        conditional = False
        dname, region = gen.const(dest.name), gen.const(dest.region)
        if dest.when_predicate is not None:
            gen.emit(depth, f"if {gen.const(dest.when_predicate)}(event):")
            depth, conditional = depth + 1, True
        for sub in subs:
            d, cond = depth, conditional
            if not sub.routing_only:
                gen.emit(d, f"if {gen.const(sub.predicate)}(event):")
                d, cond = d + 1, True
            _map_sub(gen, d, cond, dest, sub, dname, region)
    head = ["def route(event, index, multi, raw):", "    mapped = []", "    invalid = []"]
    head += [f"    {v} = None" for v in sorted(gen.maybe)]
    tail = [
        "    mid = event.message_id",
        "    return _EO(index, multi, raw, mid if type(mid) is str else _mid(event), mapped, "
        "invalid, None if mapped or invalid else _NO_MATCH)",
    ]
    source = "\n".join([*head, *gen.lines, *tail])
    exec(compile(source, "<worker.mapping.routes>", "exec"), gen.ns)
    fn: RouteFn = gen.ns["route"]
    return fn


def _map_sub(
    gen: _Gen, d: int, cond: bool, dest: RouteDest, sub: RouteSub, dname: str, region: str
) -> None:
    names = f"{dname}, {gen.const(sub.name)}, {gen.const(sub.event)}"
    contents = gen.var("n", sub.contents)
    if sub.finish is None:
        # Web and crm: one evaluation per plan whatever the region (`user_for` re-hashes
        # phones for another region), one encoding per (plan, contents, event, region).
        common = gen.var("c", sub.plan)
        gen.attempt(d, common, cond, f"{gen.const(sub.plan.evaluate)}(event, _now, {region})")
        gen.attempt(d, contents, cond, f"{gen.const(sub.contents)}(event)")
        gen.emit(d, f"if isinstance({common}, _FE) or isinstance({contents}, _FE):")
        gen.emit(d + 1, f"_inv(invalid, {common}, {contents}, {dname})")
        gen.emit(d, "else:")
        payload = gen.var("p", sub.plan, sub.contents, sub.event, dest.region)
        body = _WEB_PAYLOAD.format(
            contents=contents, common=common, event=gen.const(sub.event), region=region,
            payload=payload,
        ).splitlines()  # fmt: skip
        gen.compute(d + 1, payload, True, body)
        dobj = gen.const(dest)
        key = (
            f"{dobj}.web_key if {common}.event_source == 'web' and "
            f"{common}.test_event_code is None else "
            f"{dobj}.key({common}.event_source, {common}.test_event_code)"
        )
        gen.emit(d + 1, f"mapped.append(_ME({names}, {key}, {common}.event_id, {payload}))")
        return
    # Offline and app: the plan evaluates per phone region, `finish` encodes (and may refuse).
    common = gen.var("c", sub.plan, dest.region)
    code = gen.const(dest.test_event_code)
    gen.attempt(d, common, cond, f"{gen.const(sub.plan.evaluate)}(event, _now, {region})")
    gen.attempt(d, contents, cond, f"{gen.const(sub.contents)}(event)")
    gen.emit(d, f"if isinstance({common}, _FE) or isinstance({contents}, _FE):")
    gen.emit(d + 1, f"_inv(invalid, {common}, {contents}, {dname})")
    gen.emit(d, "else:")
    payload = gen.var("p", sub.plan, sub.contents, sub.finish, dest.region, dest.test_event_code)
    finish = gen.const(sub.finish)
    gen.attempt(d + 1, payload, True, f"{finish}({common}, {contents}, {code})")
    gen.emit(d + 1, f"if isinstance({payload}, _FE):")
    gen.emit(d + 2, f"_inv(invalid, {payload}, None, {dname})")
    gen.emit(d + 1, "else:")
    key = f"{gen.const(dest)}.key({common}.event_source, {common}.test_event_code)"
    gen.emit(d + 2, f"mapped.append(_ME({names}, {key}, {common}.event_id, {payload}))")
