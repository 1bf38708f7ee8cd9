"""Every `accelerate launch train_unlearn_sd.py ...` command in the docs uses only flags the script defines.

The commands are read from docs/*.md and docs/families/*.md (continuation lines joined) and parsed with the
script's own argparse parser, captured before `parse_args` runs its checks (those look at files and models the
commands name, which do not exist here): no model is loaded and nothing trains.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "docs" / "families").glob("*.md"))
LAUNCH = "accelerate launch train_unlearn_sd.py"
FAMILY_PAGES = ("sd1.md", "sd2.md", "sdxl.md", "sd3.md", "flux.md")


class _ParserCaptured(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


def script_parser() -> argparse.ArgumentParser:
    """train_unlearn_sd.py's parser, as built by its parse_args, before any of the checks after parsing."""
    spec = importlib.util.spec_from_file_location("train_unlearn_sd_for_docs", ROOT / "train_unlearn_sd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def capture(self, args=None, namespace=None):
        raise _ParserCaptured(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        module.parse_args([])
    except _ParserCaptured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError("train_unlearn_sd.parse_args never called ArgumentParser.parse_args")


def launch_commands(path: Path) -> list[list[str]]:
    """The argument lists of the `accelerate launch train_unlearn_sd.py` commands in one Markdown file."""
    commands = []
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        index += 1
        if not line.startswith(LAUNCH):
            continue
        joined = line
        while joined.endswith("\\") and index < len(lines):
            joined = joined[:-1] + " " + lines[index].strip()
            index += 1
        tokens = shlex.split(joined, comments=True)
        commands.append(tokens[len(LAUNCH.split()):])
    return commands


ALL_COMMANDS = [(path.relative_to(ROOT).as_posix(), argv) for path in DOCS for argv in launch_commands(path)]


@pytest.fixture(scope="module")
def parser():
    return script_parser()


def test_every_family_has_a_page_with_a_command():
    pages = {path.name for path in (ROOT / "docs" / "families").glob("*.md")}
    assert set(FAMILY_PAGES) <= pages
    for name in FAMILY_PAGES:
        assert launch_commands(ROOT / "docs" / "families" / name), f"docs/families/{name} has no {LAUNCH} command"


def test_family_pages_are_linked():
    for page in ("index.md", "stable_diffusion.md"):
        text = (ROOT / "docs" / page).read_text(encoding="utf-8")
        for name in FAMILY_PAGES:
            assert f"families/{name}" in text, f"docs/{page} does not link families/{name}"


def test_commands_were_found():
    assert len(ALL_COMMANDS) >= len(FAMILY_PAGES)


@pytest.mark.parametrize("doc,argv", ALL_COMMANDS, ids=[f"{doc}:{i}" for i, (doc, _) in enumerate(ALL_COMMANDS)])
def test_documented_command_parses(parser, doc, argv):
    known = set(parser._option_string_actions)
    flags = [re.split("=", token, maxsplit=1)[0] for token in argv if token.startswith("--")]
    unknown = [flag for flag in flags if flag not in known]
    assert not unknown, f"{doc}: train_unlearn_sd.py has no {', '.join(unknown)}"
    # The values too (types, choices, numbers of arguments), with the parser alone.
    try:
        parser.parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{doc}: train_unlearn_sd.py's parser rejects {' '.join(argv)} (exit {exit_.code})")
