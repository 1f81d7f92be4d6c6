"""The documentation points at things a reader has, and documents what exists (issue 19).

- Every relative Markdown link resolves to a file of the repository (and, with `#anchor`, to a
  heading of that file).
- Every repository path cited in backticks or prose (`docs/...`, `worker/...`, `scripts/...`,
  ...) in our own docs, the chart's docs and the package's docstrings exists.
- Every `SPEC §N` cited anywhere (code, tests, docs) is a section of docs/spec.md, the copy of
  the product contract kept in the repository.
- Every configuration key is documented in docs/configuration.md, and every key documented
  there exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_type_hints

import msgspec
import pytest

from worker.config import Config

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", "node_modules", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
# Research notes about other systems: the paths they cite are in other repositories.
BACKGROUND = {"segment-tiktok-destination.md", "tiktok-events-api.md", "tiktok-offline-app.md"}
TOP_DIRS = ("docs", "worker", "tests", "scripts", "helm", "deploy", "bench", "infra", ".ci")

_LINK_RE = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_PATH_RE = re.compile(
    r"(?<![\w/.-])((?:" + "|".join(re.escape(d) for d in TOP_DIRS) + r")/[A-Za-z0-9_./-]*\w)"
)
_SPEC_RE = re.compile(r"\bSPEC §(\d+)")


def repo_files(pattern: str) -> Iterator[Path]:
    for path in sorted(ROOT.rglob(pattern)):
        if not SKIP_DIRS.intersection(path.relative_to(ROOT).parts):
            yield path


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {github_anchor(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def own_docs() -> list[Path]:
    docs = [p for p in (ROOT / "docs").glob("*.md") if p.name not in BACKGROUND]
    return [
        ROOT / "README.md",
        *sorted(docs),
        ROOT / "deploy" / "README.md",
        ROOT / "helm" / "tiktok-conversions-worker" / "README.md",
        ROOT / "helm" / "tiktok-conversions-worker" / "values.yaml",
        ROOT / "helm" / "tiktok-conversions-worker" / "values.schema.json",
        ROOT / "tests" / "data" / "golden" / "README.md",
        *repo_files("worker/**/*.py"),
    ]


def test_every_relative_markdown_link_resolves() -> None:
    broken = []
    checked = 0
    for md in repo_files("*.md"):
        text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
        for target in _LINK_RE.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            checked += 1
            file_part, _, anchor = target.partition("#")
            dest = (md.parent / file_part).resolve() if file_part else md
            where = f"{md.relative_to(ROOT)} -> {target}"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading with that anchor")
    assert broken == []
    assert checked > 20


def test_every_cited_repository_path_exists() -> None:
    missing = []
    for doc in own_docs():
        text = doc.read_text(encoding="utf-8")
        if doc.suffix == ".md":  # shell examples name kubectl resources: `deploy/<name>`
            text = re.sub(r"```.*?```", "", text, flags=re.S)
        for path in set(_PATH_RE.findall(text)):
            if any(c in path for c in "*{}<>") or (ROOT / path).exists():
                continue
            missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert missing == []


def test_path_check_catches_a_missing_file() -> None:
    assert _PATH_RE.findall("see `docs/no-such-file.md` and docs/spec.md") == [
        "docs/no-such-file.md",
        "docs/spec.md",
    ]
    assert not (ROOT / "docs/no-such-file.md").exists()


def test_every_spec_section_cited_exists() -> None:
    spec = ROOT / "docs" / "spec.md"
    sections = set(re.findall(r"^## (\d+)\.", spec.read_text(encoding="utf-8"), flags=re.M))
    assert {"2", "3", "4", "5", "6", "7"} <= sections
    cited: dict[str, Path] = {}
    for path in [*repo_files("*.py"), *repo_files("*.md"), *repo_files("*.json")]:
        for number in _SPEC_RE.findall(path.read_text(encoding="utf-8", errors="replace")):
            cited.setdefault(number, path.relative_to(ROOT))
    assert cited, "no SPEC reference found: the check would be vacuous"
    assert {n: str(p) for n, p in cited.items() if n not in sections} == {}


def test_the_spec_copy_keeps_the_command_line_and_config_keys() -> None:
    # The contract's interfaces as the code has them: a copy that drifted would mislead.
    spec = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
    for text in (
        "tiktok-worker check-config --config FILE",
        "tiktok-worker dlq redrive  --config FILE [--reason R] [--destination NAME] [--max N]",
        "start_from: earliest",
        "`tiktok_worker_events_skipped_total` | counter | reason",
        "`dlq.reason`",
    ):
        assert text in spec, text


# --------------------------------------------------------------------------- config keys


def config_keys(tp: Any = Config, prefix: str = "") -> set[str]:
    """Every key path of the config file, `destinations`/`subscriptions` items included."""
    keys: set[str] = set()
    for name, hint in get_type_hints(tp, include_extras=True).items():
        path = f"{prefix}{name}"
        inner = _struct_in(hint)
        if inner is None:
            keys.add(path)
        elif inner.__name__ in ("DestinationConfig", "SubscriptionConfig"):
            keys.add(path)
            keys |= {k if ":" in k else f"{inner.__name__}:{k}" for k in config_keys(inner)}
        elif inner.__name__ == "LiteralValue":
            keys.add(path)
        else:
            keys |= config_keys(inner, f"{path}.")
    return keys


def _struct_in(hint: Any) -> type[msgspec.Struct] | None:
    for candidate in [hint, *getattr(hint, "__args__", ())]:
        candidate = getattr(candidate, "__origin__", candidate)
        if isinstance(candidate, type) and issubclass(candidate, msgspec.Struct):
            return candidate
        for arg in getattr(candidate, "__args__", ()) or ():
            found = _struct_in(arg)
            if found is not None:
                return found
    return None


def documented_keys() -> set[str]:
    """Keys in the first column of each section's table of docs/configuration.md."""
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    out: set[str] = set()
    sections = re.split(r"^## ", text, flags=re.M)
    for section in sections:
        title = section.splitlines()[0] if section else ""
        m = re.match(r"`(\w+)`$", title)
        if m:
            prefix = m.group(1)
            owner = "DestinationConfig:" if prefix == "destinations" else f"{prefix}."
        elif title == "Subscriptions":
            owner = "SubscriptionConfig:"
        else:
            continue
        for key in re.findall(r"^\| `([\w.]+)` \|", section, flags=re.M):
            out.add(owner + key)
    return out


def test_every_config_key_is_documented_and_every_documented_key_exists() -> None:
    keys = {k for k in config_keys() if k != "destinations"}
    documented = documented_keys()
    assert len(documented) > 30
    assert sorted(keys - documented) == [], "keys missing from docs/configuration.md"
    assert sorted(documented - keys) == [], "documented keys the config does not have"


@pytest.mark.parametrize("key", ["kafka.start_from", "rate_limit.redis_password"])
def test_issue_19_keys_are_documented(key: str) -> None:
    assert key in documented_keys()


def test_the_readme_minimal_config_is_accepted() -> None:
    from worker.config import parse_config

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Configuration", 1)[1]
    block = section.split("```yaml", 1)[1].split("```", 1)[0]
    config = parse_config(block, environ={"TIKTOK_PIXEL_CODE": "P", "TIKTOK_ACCESS_TOKEN": "t"})
    assert config.kafka.start_from == "earliest"
