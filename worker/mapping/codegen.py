"""Field extraction compiled to one straight-line Python function per mapping plan.

Resolving ~35 fields through closures costs ~4 Python calls per field per event; this module
instead generates, once per plan, a function `extract(event) -> tuple` that reads every
field's candidate paths with shared prefix lookups (`context`, `context.traits`, ... are
looked up once) and plain `dict.get` calls, and only calls out to a checker for values that
are present and need coercion. The generated source contains no text from the config: keys
are embedded with `repr()`, and names are generated counters.

`Checker`s implement the remove-empty-values + Ajv semantics for one field (see
worker.mapping.coerce); they return None for an absent value and raise the caller's error type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from worker.mapping.paths import compile_getter
from worker.mapping.segment import EVENT_TYPES, ROOT_ATTRS, SegmentEvent

__all__ = ["Checker", "Spec", "compile_extractor", "compile_function"]

Checker = Callable[[Any], Any]
_EMPTY: Final[dict[str, Any]] = {}  # stands for "not an object"; never mutated


class _Gen:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ns: dict[str, Any] = {"_EMPTY": _EMPTY, "_types": EVENT_TYPES}
        self.prefixes: dict[tuple[str, ...], str] = {}

    def name(self, prefix: str, value: Any) -> str:
        n = f"{prefix}{len(self.ns)}"
        self.ns[n] = value
        return n

    def prefix(self, keys: tuple[str, ...]) -> str:
        """A variable holding the dict at `keys` (or _EMPTY if it is not an object)."""
        var = self.prefixes.get(keys)
        if var is not None:
            return var
        if len(keys) == 1:
            var = f"p{len(self.prefixes)}"
            self.lines.append(f"    {var} = event.{ROOT_ATTRS[keys[0]]}")
        else:
            parent = self.prefix(keys[:-1])  # registers the parent first: fresh name below
            var = f"p{len(self.prefixes)}"
            self.lines.append(f"    {var} = {parent}.get({keys[-1]!r})")
        self.lines.append(f"    if type({var}) is not dict: {var} = _EMPTY")
        self.prefixes[keys] = var
        return var

    def leaf(self, keys: tuple[str, ...]) -> str:
        """An expression for the value at `keys` (None when missing)."""
        root = keys[0]
        if root == "type":
            return "_types[type(event)]" if len(keys) == 1 else "None"
        attr = ROOT_ATTRS.get(root)
        if attr is None:
            return "None"
        if len(keys) == 1:
            return f"event.{attr}"
        if any(k.isdigit() for k in keys[1:]):
            return f"{self.name('_g', compile_getter(keys))}(event)"
        return f"{self.prefix(keys[:-1])}.get({keys[-1]!r})"


# (candidates, constant, checker, mode); mode: "plain" (top-level string: present non-empty
# strings skip the checker, "" is absent), "nested" (string sub-field: strings skip it, ""
# is kept), "multi_string" (a top-level string of a "multiple" string field becomes a
# one-item list without the checker, "" is absent), "check" (every present value goes
# through the checker), "raw" (no checker at all: the value as found).
Spec = tuple[Sequence[tuple[str, ...]] | None, Any, Checker | None, str]


def compile_function(
    specs: Sequence[Spec],
    names: Sequence[str],
    *,
    signature: str = "event",
    tail: Sequence[str] = (),
    namespace: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """Compile `def fn(<signature>)` whose body reads each spec into the variable of the same
    position in `names` (None if absent), then runs `tail` (lines indented by 4 spaces that
    use those variables and the given `namespace`). `signature` must name `event`.

    A spec is `(candidates, constant, checker, mode)`: candidate key paths (first non-null
    wins), or None to use the already-checked `constant` (None: the field is unmapped).
    """
    gen = _Gen()
    body: list[str] = []
    for v, (candidates, constant, checker, mode) in zip(names, specs, strict=True):
        if candidates is not None and mode == "raw":
            exprs = [gen.leaf(tuple(c)) for c in candidates]
            body.append(f"    {v} = {exprs[0]}")
            body.extend(f"    if {v} is None: {v} = {expr}" for expr in exprs[1:])
            continue
        if candidates is None or checker is None:
            value = gen.name("_k", constant) if constant is not None else "None"
            body.append(f"    {v} = {value}")
            continue
        exprs = [gen.leaf(tuple(c)) for c in candidates]
        body.append(f"    {v} = {exprs[0]}")
        for expr in exprs[1:]:
            body.append(f"    if {v} is None: {v} = {expr}")
        check = gen.name("_c", checker)
        # Absent values (the common case for most fields) cost one `is not None` test.
        body.append(f"    if {v} is not None:")
        if mode == "plain":
            body.append(f"        if type({v}) is str:")
            body.append(f"            if not {v}: {v} = None")
            body.append(f"        else: {v} = {check}({v})")
        elif mode == "multi_string":
            body.append(f"        if type({v}) is str:")
            body.append(f"            {v} = [{v}] if {v} else None")
            body.append(f"        else: {v} = {check}({v})")
        elif mode == "nested":
            body.append(f"        if type({v}) is not str: {v} = {check}({v})")
        else:
            body.append(f"        {v} = {check}({v})")
    source = "\n".join([f"def fn({signature}):", *gen.lines, *body, *tail, "    pass"])
    ns = {**(namespace or {}), **gen.ns}
    exec(compile(source, "<worker.mapping.codegen>", "exec"), ns)
    fn: Callable[..., Any] = ns["fn"]
    return fn


def compile_extractor(specs: Sequence[Spec]) -> Callable[[SegmentEvent], tuple[Any, ...]]:
    """`extract(event) -> tuple`: one value per spec, None when absent."""
    names = [f"v{i}" for i in range(len(specs))]
    returned = f"({', '.join(names)},)" if names else "()"
    fn: Callable[[SegmentEvent], tuple[Any, ...]] = compile_function(
        specs, names, tail=[f"    return {returned}"]
    )
    return fn
