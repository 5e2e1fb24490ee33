"""The user documentation against the code.

- README.md stays a page for users: at most 10,000 characters;
- every relative link in README.md, docs/*.md, launch/README.md and tools/README.md points to
  an existing file inside the repository (and, for a `#fragment` into a Markdown file, to
  one of its headings);
- every `--flag` written after `tools/X.py`, `launch/train.py`,
  `python -m megatron_dynamoe.cli.demo` or `python -m megatron_dynamoe.cli.topk`
  in a code block of those files exists in that entry point's argument parser (read from the
  parser objects themselves, so the check follows the code);
- docs/testing.md names every entry point those code blocks run (its command table);
- no internal issue numbers or machine load averages in user docs.

Cheap: no model is built; the tools' modules are imported and their parsers captured at the
moment they would parse (nothing after that runs).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import importlib
import os
import re
import shlex
from typing import Dict, Iterator, List, NamedTuple, Optional, Set, Tuple

import pytest

from tests.tool_runner import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
TESTING = os.path.join(REPO, "docs", "testing.md")
README_LIMIT = 10_000


def user_docs() -> List[str]:
    """The Markdown pages this test holds to its rules (absolute paths)."""
    docs = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
    extra = [os.path.join(REPO, p) for p in ("launch/README.md", "tools/README.md")]
    return [README, *docs, *[p for p in extra if os.path.exists(p)]]


def _rel(path: str) -> str:
    return os.path.relpath(path, REPO)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# ------------------------------------------------------------------------ Markdown reading

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")


class Block(NamedTuple):
    lang: str           # the fence's info string ('' for none or an indented block)
    lines: List[str]
    first_line: int     # 1-based line number of the block's first content line


def split_markdown(text: str) -> Tuple[List[Block], List[Tuple[int, str]]]:
    """(code blocks, prose lines with their numbers). Fenced blocks (``` / ~~~) and indented
    blocks (4+ spaces after a blank line, outside a fence) are code; the rest is prose."""
    blocks: List[Block] = []
    prose: List[Tuple[int, str]] = []
    lines = text.split("\n")
    i = 0
    previous_blank = True
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            marker, lang = fence.group(1), fence.group(2).lower()
            body, j = [], i + 1
            while j < len(lines) and not (lines[j].lstrip().startswith(marker[0] * len(marker))
                                           and lines[j].strip().strip(marker[0]) == ""):
                body.append(lines[j])
                j += 1
            blocks.append(Block(lang, body, i + 2))
            i, previous_blank = j + 1, False
            continue
        if previous_blank and line.startswith("    ") and line.strip():
            body, j = [], i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                body.append(lines[j][4:])
                j += 1
            while body and not body[-1].strip():
                body.pop()
            blocks.append(Block("", body, i + 1))
            i, previous_blank = j, True
            continue
        prose.append((i + 1, line))
        previous_blank = not line.strip()
        i += 1
    return blocks, prose


def headings_slugs(text: str) -> Set[str]:
    """GitHub's anchors of a page's ATX headings (lowercase, punctuation dropped, spaces to
    hyphens, -1 / -2 for repeats)."""
    _, prose = split_markdown(text)
    seen: Dict[str, int] = {}
    slugs = set()
    for _, line in prose:
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


LINK = re.compile(r"\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")


def relative_links(text: str) -> Iterator[Tuple[int, str]]:
    """(line number, target) of every link outside code, external ones (scheme://, mailto:)
    left out."""
    _, prose = split_markdown(text)
    for number, line in prose:
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        targets = [m.group(1) for m in LINK.finditer(line)]
        ref = REFERENCE.match(line)
        if ref:
            targets.append(ref.group(1))
        for target in targets:
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                continue
            yield number, target


# ------------------------------------------------------------------------ shell commands

ENTRY = re.compile(r"(?:^|/)((?:tools/[\w-]+|launch/train)\.py)$")
SCRIPT = re.compile(r"(?:^|/)((?:tools|launch|bench)/[\w.-]+\.(?:py|sh)|slurm/[\w.-]+\.sh|"
                    r"\.ci/run)$")
MODULES = ("megatron_dynamoe.cli.demo", "megatron_dynamoe.cli.topk")
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")"}
SHELL_LANGS = ("", "bash", "sh", "shell", "console", "zsh")


class Command(NamedTuple):
    doc: str            # repository-relative path of the page
    line: int
    words: List[str]    # one simple command, environment assignments dropped


def shell_words(line: str) -> List[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # unbalanced quotes in a sketch: words are good enough
        return line.split("#")[0].split()


def commands(path: str) -> Iterator[Command]:
    """Every simple shell command in the page's shell code blocks (continuation lines joined,
    comments dropped, `a && b` split, leading VAR=value assignments dropped)."""
    blocks, _ = split_markdown(_read(path))
    for block in blocks:
        if block.lang not in SHELL_LANGS:
            continue
        logical, start = "", None
        for offset, raw in enumerate(block.lines + [""]):
            if start is None:
                start = block.first_line + offset
            if raw.rstrip().endswith("\\"):
                logical += raw.rstrip()[:-1] + " "
                continue
            logical += raw
            words = shell_words(logical.strip()) if logical.strip() else []
            logical, line_number, start = "", start, None
            current: List[str] = []
            for word in words + [";"]:
                if word in SEPARATORS:
                    while current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0]):
                        current.pop(0)
                    if current:
                        yield Command(_rel(path), line_number, current)
                    current = []
                else:
                    current.append(word)


def entry_point(words: List[str]) -> Optional[Tuple[str, int]]:
    """(entry point, index of its word) of a command that runs one with known flags:
    'tools/X.py', 'launch/train.py' or a module of MODULES; None otherwise."""
    for i, word in enumerate(words):
        m = ENTRY.search(word)
        if m:
            return m.group(1), i
        if word == "-m" and i + 1 < len(words) and words[i + 1] in MODULES:
            return words[i + 1], i + 1
    return None


def command_key(words: List[str]) -> Optional[str]:
    """What docs/testing.md must name for this command: the repository script it runs, the
    `make` target, or the `-m` module; None for other programs (docker, enroot, ...)."""
    for i, word in enumerate(words):
        m = SCRIPT.search(word)
        if m:
            return m.group(1)
        if word == "-m" and i + 1 < len(words):
            return f"-m {words[i + 1]}"
    if words[0] == "make":
        target = next((w for w in words[1:] if "=" not in w and not w.startswith("-")), "")
        return f"make {target}".strip()
    return None


def flags_after(words: List[str], start: int) -> List[str]:
    """The `--flag` words after index `start` (`--flag=value` -> `--flag`)."""
    out = []
    for word in words[start + 1:]:
        word = word.strip("[]")
        if word.startswith("--") and len(word) > 2 and word[2].isalpha():
            out.append(word.split("=", 1)[0])
    return out


def first_positional(words: List[str], start: int) -> Optional[str]:
    for word in words[start + 1:]:
        if not word.startswith("-"):
            return word
    return None


# ------------------------------------------------------------------------ parsers

class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__("parser captured")
        self.parser = parser


@contextlib.contextmanager
def _parsers_raise_when_used():
    """Within the block, the first `parse_args` / `parse_known_args` raises _Captured with
    its parser, so a tool's `parse_args(argv)` returns its parser and runs nothing else."""
    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

    def grab(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = grab
    argparse.ArgumentParser.parse_known_args = grab
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved


def _capture(call) -> argparse.ArgumentParser:
    with _parsers_raise_when_used():
        try:
            call()
        except _Captured as captured:
            return captured.parser
    raise AssertionError(f"{call} parsed no arguments")


def _train_parser() -> argparse.ArgumentParser:
    from megatron_dynamoe.training.config import build_parser

    return build_parser()


def _flag_sets(parser: argparse.ArgumentParser) -> Tuple[Set[str], Dict[str, Set[str]]]:
    """(the parser's option strings, {subcommand: its option strings})."""
    flags = set(parser._option_string_actions)
    subcommands: Dict[str, Set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                subcommands[name] = _flag_sets(sub)[0]
    return flags, subcommands


@functools.lru_cache(maxsize=None)
def known_flags(entry: str) -> Tuple[Set[str], Dict[str, Set[str]]]:
    """Option strings of an entry point's parser, and of each of its subcommands."""
    if entry == "launch/train.py":
        return _flag_sets(_train_parser())
    if entry == "megatron_dynamoe.cli.demo":
        from megatron_dynamoe.cli import demo

        return _flag_sets(_capture(lambda: demo.parse_args([])))
    if entry == "megatron_dynamoe.cli.topk":
        from megatron_dynamoe.cli import topk

        flags, subcommands = _flag_sets(_capture(lambda: topk.main(["init"])))
        # `train` hands its arguments to launch/train.py's parser.
        subcommands["train"] = _flag_sets(_train_parser())[0]
        return flags, subcommands
    if not os.path.exists(os.path.join(REPO, entry)):
        raise AssertionError(f"{entry} does not exist")
    module = load_script(entry)
    if hasattr(module, "entry") and not hasattr(module, "parse_args"):
        # A thin wrapper of a command of megatron_dynamoe.cli: its parser lives there.
        module = importlib.import_module(module.main.__module__)
    if hasattr(module, "build_parser"):
        return _flag_sets(module.build_parser())
    return _flag_sets(_capture(lambda: module.parse_args([])))


def unknown_flags(command: Command) -> List[str]:
    found = entry_point(command.words)
    if found is None:
        return []
    entry, index = found
    flags, subcommands = known_flags(entry)
    sub = first_positional(command.words, index)
    if subcommands and sub in subcommands:
        flags = flags | subcommands[sub]
    elif subcommands:
        flags = flags.union(*subcommands.values())
    return [f for f in flags_after(command.words, index) if f not in flags]


# ------------------------------------------------------------------------ the tests

def test_readme_is_at_most_ten_thousand_characters():
    size = len(_read(README))
    assert size <= README_LIMIT, (
        f"README.md has {size} characters, over {README_LIMIT}: move detail into docs/")


@pytest.mark.parametrize("path", user_docs(), ids=_rel)
def test_relative_links_point_to_existing_files(path):
    text, broken = _read(path), []
    for line, target in relative_links(text):
        file_part, _, fragment = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) \
            if file_part else path
        if not resolved.startswith(REPO + os.sep) and resolved != REPO:
            broken.append(f"line {line}: {target} leaves the repository")
        elif not os.path.exists(resolved):
            broken.append(f"line {line}: {target} does not exist")
        elif fragment and resolved.endswith(".md") and \
                fragment.lower() not in headings_slugs(_read(resolved)):
            broken.append(f"line {line}: {target}: no heading #{fragment} in {_rel(resolved)}")
    assert not broken, f"{_rel(path)}:\n" + "\n".join(broken)


@pytest.mark.parametrize("path", user_docs(), ids=_rel)
def test_documented_flags_exist_in_the_parsers(path):
    wrong = [f"line {c.line}: {entry_point(c.words)[0]}: {', '.join(bad)}"
             for c in commands(path) for bad in [unknown_flags(c)] if bad]
    assert not wrong, (f"{_rel(path)} passes flags the entry point's parser does not have "
                       f"(python tools/X.py --help):\n" + "\n".join(wrong))


def test_the_quickstart_tools_are_documented_with_flags():
    """The extraction really sees the commands (a broken reader would pass the flag test)."""
    seen = {entry_point(c.words)[0] for path in user_docs() for c in commands(path)
            if entry_point(c.words) and flags_after(c.words, entry_point(c.words)[1])}
    for entry in ("tools/convert_checkpoint.py", "tools/moefy.py", "tools/preprocess_data.py",
                  "launch/train.py", "tools/evaluate.py", "tools/export.py"):
        assert entry in seen, f"no documented command runs {entry} with flags"


def test_testing_page_names_every_documented_entry_point():
    listed = _read(TESTING)
    missing = sorted({f"{c.doc}:{c.line}: {key}" for path in user_docs() for c in commands(path)
                      for key in [command_key(c.words)] if key and key not in listed})
    assert not missing, ("add these commands to the table in docs/testing.md (with the test "
                         "that runs them, or under 'not run by a test'):\n" + "\n".join(missing))


FORBIDDEN = (
    (re.compile(r"\bissues?\s*#\s*\d*", re.IGNORECASE), "an internal issue number"),
    (re.compile(r"#\d+\s+item", re.IGNORECASE), "an internal issue number"),
    (re.compile(r"\bload\s+average", re.IGNORECASE), "a machine load average"),
)


@pytest.mark.parametrize("path", user_docs(), ids=_rel)
def test_no_internal_issue_numbers_or_load_averages(path):
    found = [f"line {n}: {kind}: {line.strip()[:100]}"
             for n, line in enumerate(_read(path).split("\n"), start=1)
             for pattern, kind in FORBIDDEN if pattern.search(line)]
    assert not found, f"{_rel(path)}:\n" + "\n".join(found)


def test_the_checker_reads_commands_and_catches_a_wrong_flag(tmp_path):
    """The reader itself: continuation lines, comments, environment assignments, a launcher's
    own flags before the script, `&&`, a subcommand, an indented block; and a misspelt flag
    is reported."""
    page = tmp_path / "page.md"
    page.write_text(
        "Text with `python tools/moefy.py --not-checked` inline.\n\n"
        "```bash\n"
        "# a comment with tools/moefy.py --nope\n"
        "OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 launch/train.py --lr 1e-4 \\\n"
        "    --dynamoe-sensitivity-min 0.3   # trailing --comment-flag\n"
        "make install && python tools/convert_checkpoint.py megatron-to-hf --load a --output b\n"
        "python -m megatron_dynamoe.cli.topk train --train-iters 2\n"
        "python tools/moefy.py --load x --outptu y\n"
        "```\n\n"
        "    python tools/export.py --load a --output b --level 2\n")
    found = list(commands(str(page)))
    assert [c.words[:2] for c in found] == [
        ["torchrun", "--nproc-per-node"], ["make", "install"],
        ["python", "tools/convert_checkpoint.py"], ["python", "-m"],
        ["python", "tools/moefy.py"], ["python", "tools/export.py"]]
    assert [c.line for c in found] == [5, 7, 7, 8, 9, 12]
    assert [command_key(c.words) for c in found] == [
        "launch/train.py", "make install", "tools/convert_checkpoint.py",
        "-m megatron_dynamoe.cli.topk", "tools/moefy.py", "tools/export.py"]
    assert [unknown_flags(c) for c in found] == [[], [], [], [], ["--outptu"], []]
