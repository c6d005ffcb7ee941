"""The user docs stay usable: a short README, relative links that resolve, commands the CLI accepts.

Markdown is read with markdown-it-py (rich's parser, already installed), so links inside code spans
or fenced blocks are not mistaken for links, and link targets in tables are found like any other.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
from markdown_it import MarkdownIt
from markdown_it.token import Token

from fspo.cli import app

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted([README, *(REPO / "docs").rglob("*.md")])
README_MAX_LINES = 120

_MD = MarkdownIt("commonmark").enable("table")


def _tokens(path: Path) -> list[Token]:
    return _MD.parse(path.read_text(encoding="utf-8"))


def _inline_children(tokens: list[Token]) -> list[Token]:
    return [child for t in tokens if t.type == "inline" for child in t.children or []]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    tokens = _tokens(path)
    seen: dict[str, int] = {}
    out = set()
    for opening, inline in zip(tokens, tokens[1:], strict=False):
        if opening.type != "heading_open":
            continue
        text = "".join(c.content for c in inline.children or [] if c.type in ("text", "code_inline"))
        slug = _slug(text)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")  # GitHub numbers repeated headings
    return out


def _relative_links(path: Path) -> list[str]:
    targets = []
    for child in _inline_children(_tokens(path)):
        target = child.attrs.get("href") if child.type == "link_open" else child.attrs.get("src")
        if child.type in ("link_open", "image") and not re.match(r"^[a-z][a-z0-9+.-]*:", str(target)):
            targets.append(str(target))
    return targets


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (limit {README_MAX_LINES}): move detail to docs/"
    )


def _broken_links(doc: Path) -> list[str]:
    """Each relative link of `doc` whose file does not exist, or whose `#anchor` no heading makes."""
    broken = []
    for target in _relative_links(doc):
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading '#{anchor}' in {linked.name}")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = _broken_links(doc)
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)


def test_link_check_sees_links_in_tables_and_skips_code(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text(
        "# Serve it to people: `fspo serve`\n## Twice\n## Twice\n", encoding="utf-8"
    )
    doc = tmp_path / "x.md"
    doc.write_text(
        "| a | [b](b.md#twice-1) |\n|---|---|\n\n`[c](c.md)`\n\n```\n[d](d.md)\n```\n"
        "![e](e.png) [f](https://x.org) [g](b.md#serve-it-to-people-fspo-serve) [h](b.md#nope)\n",
        encoding="utf-8",
    )
    assert _relative_links(doc) == [
        "b.md#twice-1",
        "e.png",
        "b.md#serve-it-to-people-fspo-serve",
        "b.md#nope",
    ]
    assert _broken_links(doc) == ["e.png: no such file", "b.md#nope: no heading '#nope' in b.md"]


def _code_snippets(path: Path) -> list[str]:
    """Inline code and the lines of fenced blocks (a trailing backslash joins the next line)."""
    tokens = _tokens(path)
    snippets = [c.content for c in _inline_children(tokens) if c.type == "code_inline"]
    for fence in (t for t in tokens if t.type == "fence"):
        snippets += fence.content.replace("\\\n", " ").splitlines()
    return snippets


def _fspo_commands(snippet: str) -> list[list[str]]:
    """Each `fspo ...` command in a snippet, as its words after `fspo`, up to a shell separator."""
    try:
        words = shlex.split(snippet, comments=True)
    except ValueError:  # an unbalanced quote: prose in backticks, not a command
        return []
    commands, current = [], None
    for word in words:
        if word in ("|", "||", "&&", ";"):
            current = None
        elif current is not None:
            current.append(word)
        elif word == "fspo":
            current = []
            commands.append(current)
    return commands


def _check_command(root: Any, words: list[str]) -> str | None:
    """Why `fspo WORDS` is not a command the CLI accepts, or None.

    `root` is the click group typer builds (typer vendors its own click, so groups are told apart
    from commands by their `commands` mapping)."""
    command, path = root, ["fspo"]
    for word in words:
        subcommands = getattr(command, "commands", {})
        if word in subcommands:
            command = subcommands[word]
            path.append(word)
            continue
        if command is root and not word.startswith(("-", "<")):
            return f"fspo has no command {word!r}"
        break
    known = {"--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    unknown = [w.split("=")[0] for w in words if w.startswith("-") and w.split("=")[0] not in known]
    return f"`{' '.join(path)}` has no option(s) {', '.join(unknown)}" if unknown else None


def test_readme_commands_exist() -> None:
    root = typer.main.get_command(app)
    problems = [
        f"`fspo {' '.join(words)}`: {why}"
        for snippet in _code_snippets(README)
        for words in _fspo_commands(snippet)
        if (why := _check_command(root, words))
    ]
    assert not problems, "README.md names commands the CLI lacks:\n" + "\n".join(problems)
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.M))
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", README.read_text(encoding="utf-8")))
    assert named <= targets, f"README.md names make targets the Makefile lacks: {sorted(named - targets)}"


def test_command_check_catches_unknown_commands_and_options() -> None:
    root = typer.main.get_command(app)
    assert _fspo_commands("python -m fspo train sft --out x && fspo report y  # --nope") == [
        ["train", "sft", "--out", "x"],
        ["report", "y"],
    ]
    assert _check_command(root, ["train", "sft", "--model", "m", "--out=o"]) is None
    assert _check_command(root, ["<command>", "--help"]) is None
    assert "no command 'trian'" in str(_check_command(root, ["trian", "sft"]))
    assert "--no-such-flag" in str(_check_command(root, ["generate", "--no-such-flag", "1"]))
