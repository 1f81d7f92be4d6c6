"""The trigger language: a subset of Segment's FQL, parsed once and compiled to closures.

Grammar (lowest precedence first; `and` binds tighter than `or`, `!` tighter than both):

    expr       := and_expr ("or" and_expr)*
    and_expr   := unary ("and" unary)*
    unary      := "!" unary | primary
    primary    := "(" expr ")"
                | ("contains" | "match") "(" path "," string ")"
                | operand [("=" | "!=" | "<" | "<=" | ">" | ">=") operand]
    operand    := path | string | number | "true" | "false" | "null"
    path       := key ("." (key | string | digits))*      e.g. context.page.url,
                  integrations."TikTok Conversions".ttclid, properties.my\\ key

Semantics (a missing key and an explicit null are the same):
- a bare path is true when the value exists (present and not null); a bare true/false is
  itself; any other bare literal is a syntax error;
- `=` compares JSON values without type conversion (`"1" = 1` is false; `x = null` is true
  when x is missing or null); `!=` is its negation;
- `<`, `<=`, `>`, `>=` compare two numbers or two strings, and are false otherwise;
- `contains(path, "s")`: substring of a string value, or an element equal to "s" of a list;
- `match(path, "glob")`: the whole string value matches the glob (`*`, `?`, `[abc]`).

Errors raise `TriggerSyntaxError` whose text names the 1-based character position.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from worker.mapping.paths import Getter, compile_getter
from worker.mapping.segment import SegmentEvent

__all__ = ["Trigger", "TriggerSyntaxError", "parse_trigger"]

Predicate = Callable[[SegmentEvent], bool]


class TriggerSyntaxError(ValueError):
    """A trigger that does not parse; the message names the position (1-based)."""

    def __init__(self, reason: str, position: int) -> None:
        super().__init__(f"{reason} at position {position}")
        self.reason = reason
        self.position = position


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # op, not, and, or, lparen, rparen, comma, str, num, lit, path, func, end
    value: Any
    pos: int  # 1-based
    text: str


_OPS: Final = ("!=", "<=", ">=", "=", "<", ">")
_KEY_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$@-")
_NUM_RE: Final = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_WORDS: Final = {"and": "and", "or": "or", "true": "lit", "false": "lit", "null": "lit"}
_WORD_VALUES: Final = {"true": True, "false": False, "null": None}


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        pos = i + 1
        if c == "(":
            toks.append(_Tok("lparen", None, pos, c))
            i += 1
        elif c == ")":
            toks.append(_Tok("rparen", None, pos, c))
            i += 1
        elif c == ",":
            toks.append(_Tok("comma", None, pos, c))
            i += 1
        elif c == '"':
            value, i = _read_string(text, i)
            toks.append(_Tok("str", value, pos, text[pos - 1 : i]))
        elif c == "!" and not text.startswith("!=", i):
            toks.append(_Tok("not", None, pos, c))
            i += 1
        elif any(text.startswith(op, i) for op in _OPS):
            op = next(op for op in _OPS if text.startswith(op, i))
            toks.append(_Tok("op", op, pos, op))
            i += len(op)
        elif (m := _NUM_RE.match(text, i)) and (c.isdigit() or c in "-."):
            number = m.group(0)
            num: Any = float(number) if any(x in number for x in ".eE") else int(number)
            toks.append(_Tok("num", num, pos, number))
            i = m.end()
        elif c in _KEY_CHARS or c == "\\":
            keys, i = _read_path(text, i)
            word = text[pos - 1 : i]
            if len(keys) == 1 and word in _WORDS:
                kind = _WORDS[word]
                toks.append(_Tok(kind, _WORD_VALUES.get(word), pos, word))
            elif len(keys) == 1 and word in ("contains", "match") and _next_is_paren(text, i):
                toks.append(_Tok("func", word, pos, word))
            else:
                toks.append(_Tok("path", keys, pos, word))
        else:
            raise TriggerSyntaxError(f"unexpected character {c!r}", pos)
    toks.append(_Tok("end", None, n + 1, "end of trigger"))
    return toks


def _next_is_paren(text: str, i: int) -> bool:
    rest = text[i:].lstrip()
    return rest.startswith("(")


def _read_string(text: str, i: int) -> tuple[str, int]:
    start = i
    i += 1
    out: list[str] = []
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    raise TriggerSyntaxError("unterminated string", start + 1)


def _read_key(text: str, i: int) -> tuple[str, int]:
    out: list[str] = []
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif c in _KEY_CHARS:
            out.append(c)
            i += 1
        else:
            break
    return "".join(out), i


def _read_path(text: str, i: int) -> tuple[tuple[str, ...], int]:
    key, i = _read_key(text, i)
    keys = [key]
    if key == "$" and i < len(text) and text[i] == ".":
        keys = []  # `$.event` is accepted as a spelling of `event`
    while i < len(text) and text[i] == ".":
        i += 1
        if i < len(text) and text[i] == '"':
            key, i = _read_string(text, i)
        else:
            start = i
            key, i = _read_key(text, i)
            if not key:
                raise TriggerSyntaxError("expected a key after '.'", start + 1)
        keys.append(key)
    return tuple(keys), i


# --------------------------------------------------------------------------- AST


@dataclass(frozen=True, slots=True)
class _Path:
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Lit:
    value: Any


@dataclass(frozen=True, slots=True)
class _Cmp:
    op: str
    left: _Path | _Lit
    right: _Path | _Lit


@dataclass(frozen=True, slots=True)
class _Exists:
    path: _Path


@dataclass(frozen=True, slots=True)
class _Bool:
    value: bool


@dataclass(frozen=True, slots=True)
class _Not:
    arg: _Node


@dataclass(frozen=True, slots=True)
class _And:
    left: _Node
    right: _Node


@dataclass(frozen=True, slots=True)
class _Or:
    left: _Node
    right: _Node


@dataclass(frozen=True, slots=True)
class _Func:
    name: str
    path: _Path
    arg: str


_Node = _Cmp | _Exists | _Bool | _Not | _And | _Or | _Func


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokenize(text)
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, kind: str, what: str) -> _Tok:
        tok = self.peek()
        if tok.kind != kind:
            raise TriggerSyntaxError(f"expected {what}, found {_describe(tok)}", tok.pos)
        return self.take()

    def parse(self) -> _Node:
        if self.peek().kind == "end":
            raise TriggerSyntaxError("empty trigger", 1)
        node = self.expr()
        tok = self.peek()
        if tok.kind != "end":
            raise TriggerSyntaxError(f"unexpected {_describe(tok)}", tok.pos)
        return node

    def expr(self) -> _Node:
        node = self.and_expr()
        while self.peek().kind == "or":
            self.take()
            node = _Or(node, self.and_expr())
        return node

    def and_expr(self) -> _Node:
        node = self.unary()
        while self.peek().kind == "and":
            self.take()
            node = _And(node, self.unary())
        return node

    def unary(self) -> _Node:
        if self.peek().kind == "not":
            self.take()
            return _Not(self.unary())
        return self.primary()

    def primary(self) -> _Node:
        tok = self.peek()
        if tok.kind == "lparen":
            self.take()
            node = self.expr()
            self.expect("rparen", "')'")
            return node
        if tok.kind == "func":
            self.take()
            self.expect("lparen", "'('")
            ptok = self.expect("path", f"a path as the first argument of {tok.value}()")
            self.expect("comma", "','")
            stok = self.expect("str", f"a string as the second argument of {tok.value}()")
            self.expect("rparen", "')'")
            return _Func(tok.value, _Path(ptok.value), stok.value)
        left = self.operand(None)
        nxt = self.peek()
        if nxt.kind == "op":
            self.take()
            right = self.operand(nxt)
            return _Cmp(nxt.value, left, right)
        if isinstance(left, _Path):
            return _Exists(left)
        if isinstance(left.value, bool):
            return _Bool(left.value)
        raise TriggerSyntaxError(f"expected a comparison after {tok.text}", nxt.pos)

    def operand(self, after: _Tok | None) -> _Path | _Lit:
        tok = self.peek()
        if tok.kind == "path":
            self.take()
            return _Path(tok.value)
        if tok.kind in ("str", "num", "lit"):
            self.take()
            return _Lit(tok.value)
        what = f"a value after '{after.text}'" if after else "a path, a value or '('"
        raise TriggerSyntaxError(f"expected {what}, found {_describe(tok)}", tok.pos)


def _describe(tok: _Tok) -> str:
    if tok.kind == "end":
        return "end of trigger"
    return repr(tok.text)


# --------------------------------------------------------------------------- compile


def _is_num(v: Any) -> bool:
    return type(v) is int or type(v) is float


def _eq(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    ta, tb = type(a), type(b)
    if ta is bool or tb is bool:
        return ta is tb and a == b
    if _is_num(a) and _is_num(b):
        return bool(a == b)
    return ta is tb and bool(a == b)


def _order(op: str, a: Any, b: Any) -> bool:
    if not ((_is_num(a) and _is_num(b)) or (type(a) is str and type(b) is str)):
        return False
    if op == "<":
        return bool(a < b)
    if op == "<=":
        return bool(a <= b)
    if op == ">":
        return bool(a > b)
    return bool(a >= b)


def _operand_fn(node: _Path | _Lit) -> Getter:
    if isinstance(node, _Path):
        return compile_getter(node.keys)
    value = node.value
    return lambda event: value


def _compile_cmp(node: _Cmp) -> Predicate:
    op = node.op
    if isinstance(node.left, _Lit) and isinstance(node.right, _Path):
        # Normalise `"x" = path` to `path = "x"`, flipping order comparisons.
        flipped = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op, op)
        return _compile_cmp(_Cmp(flipped, node.right, node.left))
    if isinstance(node.left, _Path) and isinstance(node.right, _Lit):
        get = compile_getter(node.left.keys)
        lit = node.right.value
        if op in ("=", "!="):
            want = op == "="
            if lit is None:
                return lambda e: (get(e) is None) is want
            if type(lit) is str:
                return lambda e: (get(e) == lit) is want
            if type(lit) is bool:
                return lambda e: (get(e) is lit) is want
            return lambda e: _eq(get(e), lit) is want
        if type(lit) is str:
            return {
                "<": lambda e: type(v := get(e)) is str and v < lit,
                "<=": lambda e: type(v := get(e)) is str and v <= lit,
                ">": lambda e: type(v := get(e)) is str and v > lit,
                ">=": lambda e: type(v := get(e)) is str and v >= lit,
            }[op]
        if _is_num(lit):
            return lambda e: _order(op, get(e), lit)
        return lambda e: False  # ordering against true/false/null never holds
    left, right = _operand_fn(node.left), _operand_fn(node.right)
    if op == "=":
        return lambda e: _eq(left(e), right(e))
    if op == "!=":
        return lambda e: not _eq(left(e), right(e))
    return lambda e: _order(op, left(e), right(e))


def _contains(value: Any, needle: str) -> bool:
    if type(value) is str:
        return needle in value
    if type(value) is list:
        return any(type(v) is str and v == needle for v in value)
    return False


def _compile(node: _Node) -> Predicate:
    if isinstance(node, _Cmp):
        return _compile_cmp(node)
    if isinstance(node, _Exists):
        get = compile_getter(node.path.keys)
        return lambda e: get(e) is not None
    if isinstance(node, _Bool):
        value = node.value
        return lambda e: value
    if isinstance(node, _Not):
        arg = _compile(node.arg)
        return lambda e: not arg(e)
    if isinstance(node, _And):
        a, b = _compile(node.left), _compile(node.right)
        return lambda e: a(e) and b(e)
    if isinstance(node, _Or):
        a, b = _compile(node.left), _compile(node.right)
        return lambda e: a(e) or b(e)
    get = compile_getter(node.path.keys)
    needle = node.arg
    if node.name == "contains":
        return lambda e: _contains(get(e), needle)
    regex = re.compile(fnmatch.translate(needle), re.S)
    return lambda e: type(v := get(e)) is str and regex.match(v) is not None


def _required(node: _Node, key: str) -> str | None:
    """A string literal `key` must equal for `node` to hold (from `key = "x"` in an and-chain)."""
    if isinstance(node, _Cmp) and node.op == "=":
        pairs = ((node.left, node.right), (node.right, node.left))
        for p, lit in pairs:
            if (
                isinstance(p, _Path)
                and p.keys == (key,)
                and isinstance(lit, _Lit)
                and type(lit.value) is str
            ):
                return lit.value
        return None
    if isinstance(node, _And):
        return _required(node.left, key) or _required(node.right, key)
    return None


def _only_routing(node: _Node, event_name: str | None, event_type: str | None) -> bool:
    """True when `node` holds exactly when `event = event_name` and `type = event_type`:
    it is nothing but such equalities, and-ed, all naming the same values."""
    if isinstance(node, _And):
        return _only_routing(node.left, event_name, event_type) and _only_routing(
            node.right, event_name, event_type
        )
    name, etype = _required(node, "event"), _required(node, "type")
    return (name is not None and name == event_name) or (etype is not None and etype == event_type)


@dataclass(frozen=True, slots=True)
class Trigger:
    """A compiled trigger. Call it with a decoded event.

    `event_name` / `event_type` are set when the trigger can only hold for that Segment
    `event` / `type` (it contains `event = "X"` at its top level, possibly and-ed), which
    lets the mapper skip it with one dict lookup. `routing_only` is true when those
    equalities are the whole trigger: an event routed by them needs no further evaluation.
    """

    source: str
    predicate: Predicate
    event_name: str | None
    event_type: str | None
    routing_only: bool = False

    def __call__(self, event: SegmentEvent) -> bool:
        return bool(self.predicate(event))


@lru_cache(maxsize=1024)
def parse_trigger(text: str) -> Trigger:
    """Parse and compile `text`; raises `TriggerSyntaxError`. Results are cached by text."""
    node = _Parser(text).parse()
    event_name, event_type = _required(node, "event"), _required(node, "type")
    return Trigger(
        source=text,
        predicate=_compile(node),
        event_name=event_name,
        event_type=event_type,
        routing_only=_only_routing(node, event_name, event_type),
    )
