"""Write docs/reference.md from the command line's own argparse help, so that the reference cannot drift.

    python docs/gen_reference.py          # rewrite docs/reference.md
    python docs/gen_reference.py --check  # exit 1 if docs/reference.md differs (tests/test_reference.py does this)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "reference.md"
WIDTH = "100"  # argparse wraps help at $COLUMNS - 2


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(words, parser) of every command and subcommand under `parser`, depth first, in declaration order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*prefix, name), child
                yield from subcommands(child, (*prefix, name))


def render() -> str:
    """The reference page: the top-level help, then each command's full help (as `effcifar CMD --help` prints it)."""
    saved = dict(os.environ)
    os.environ.update(COLUMNS=WIDTH, NO_COLOR="1", PYTHON_COLORS="0")  # the same text on every terminal
    try:
        return render_help()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def render_help() -> str:
    from effcifar.cli import build_parser

    top = build_parser()
    lines = ["# Command reference", "",
             "Generated from the command line's own help by `python docs/gen_reference.py`; "
             "`tests/test_reference.py` fails when this page and the help differ. "
             "The same text is printed by `effcifar COMMAND --help`.", "",
             "```text", top.format_help().rstrip(), "```", ""]
    for words, _ in subcommands(top):
        parser = build_parser(words[0])  # as `effcifar WORD ...` builds it: every option of that command
        for word in words:
            parser = dict(subcommands(parser))[(word,)]
        lines += [f"## effcifar {' '.join(words)}", "", "```text", parser.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


def main() -> int:
    check = "--check" in sys.argv[1:]
    text = render()
    if check:
        if not REFERENCE.is_file() or REFERENCE.read_text() != text:
            print(f"{REFERENCE} is out of date: run python docs/gen_reference.py", file=sys.stderr)
            return 1
        return 0
    REFERENCE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
