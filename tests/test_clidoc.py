"""The generated command reference: docs/cli.md and the README's table match the parser, laid out the same everywhere."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from neuronmap.cli import build_parser
from neuronmap.cli.doc import README_END, README_START, WIDTH, commands, main, readme_table, render, splice, usage

ROOT = Path(__file__).resolve().parents[1]


def section(text: str, command: str) -> str:
    """The part of docs/cli.md under ``## neuronmap COMMAND``, up to the next command."""
    return text.split(f"\n## neuronmap {command}\n", 1)[1].split("\n## ", 1)[0]


def row(text: str, flag: str) -> str:
    """The argument-table row whose first cell holds ``flag``."""
    found = [line for line in text.splitlines() if re.match(rf"^\| `([^`]*, )?{re.escape(flag)}[ `,]", line)]
    assert len(found) == 1, (flag, found)
    return found[0]


def test_docs_cli_md_is_up_to_date():
    if (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") != render():
        pytest.fail("docs/cli.md is stale (the parser changed): run `make docs`", pytrace=False)


def test_readme_command_table_is_up_to_date():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    if splice(readme, readme_table()) != readme:
        pytest.fail("README.md's command table is stale (the parser changed): run `make docs`", pytrace=False)


def test_reference_holds_the_options_the_old_readme_table_lacked():
    text = render()
    wanted = {"show": ["--stored", "--weights", "--tokens"], "compare": ["--layers", "--min-prob", "--top"],
              "verify": ["--sweep", "--min-ratio"]}
    for command, flags in wanted.items():
        sec = section(text, command)
        usage_block = sec.split("```")[1]
        for flag in flags:
            assert re.search(rf"\[{re.escape(flag)}[ \]]", usage_block), (command, flag)
            row(sec, flag)
    assert row(section(text, "compare"), "--top") == "| `--top TOP` | `15` | rows listed per ranking; 0 lists all (default 15) |"
    assert row(section(text, "verify"), "--min-ratio").startswith("| `--min-ratio MIN_RATIO` | `2.0` | ")


def test_every_command_argument_and_default_of_the_parser_is_listed():
    text = render()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert [c.name for c in commands()] == list(sub.choices)
    assert re.findall(r"^## neuronmap (\S+)$", text, re.M) == list(sub.choices)
    for name, parser in sub.choices.items():
        sec = section(text, name)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            line = row(sec, action.option_strings[0] if action.option_strings else
                       f"[{action.metavar or action.dest.upper()}" if action.nargs == "*" else  # [SOURCE ...]
                       (action.metavar or action.dest.upper()) if action.nargs != "?" else f"[{action.dest.upper()}]")
            said = parser._get_formatter()._expand_help(action)  # the text `--help` prints
            assert line.endswith(f" | {said.replace('|', chr(92) + '|').replace('*', chr(92) + '*')} |"), line
            if action.required:
                assert "| required |" in line
            elif action.default not in (None, False, [], argparse.SUPPRESS):
                assert f"| `{action.default}` |" in line


def test_layout_does_not_depend_on_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "30")
    narrow = render()
    monkeypatch.setenv("COLUMNS", "400")
    assert render() == narrow
    blocks = narrow.split("```")[1::2]
    assert max(len(line) for block in blocks for line in block.splitlines()) <= WIDTH


def toy() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tool", description="A toy.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("go", help="go somewhere | anywhere")
    p.add_argument("where", help="the place")
    p.add_argument("-o", "--out", required=True, help="output")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--fast", action="store_true", help="quickly")
    what.add_argument("--slow", action="store_true", help="slowly")
    p.add_argument("--tags", nargs="+", default=["a"], help="labels *here*")
    p.add_argument("--mode", choices=["x", "y"], default="x", help="`x|y` mode")
    p.add_argument("--level", type=int, default=3, help="how hard (default %(default)s), 100%% sure")
    return parser


def test_usage_writes_groups_nargs_and_choices_and_wraps_at_the_width():
    go = next(a for a in toy()._actions if isinstance(a, argparse._SubParsersAction)).choices["go"]
    assert usage("tool go", go) == ("tool go WHERE --out OUT (--fast | --slow) [--tags TAGS [TAGS ...]] [--mode {x,y}] "
                                         "[--level LEVEL]")
    # 41 characters would fit the group on the first line; at 40 it moves to the next, under WHERE.
    assert usage("tool go", go, width=41).splitlines()[0] == "tool go WHERE --out OUT (--fast | --slow)"
    assert usage("tool go", go, width=40) == ("tool go WHERE --out OUT\n"
                                             "        (--fast | --slow)\n"
                                             "        [--tags TAGS [TAGS ...]]\n"
                                             "        [--mode {x,y}] [--level LEVEL]")


def test_argument_rows_defaults_and_escapes():
    text = render(toy())
    assert "| [`tool go`](#tool-go) | go somewhere \\| anywhere |" in text
    assert row(text, "WHERE") == "| `WHERE` | required | the place |"
    assert row(text, "-o") == "| `-o OUT, --out OUT` | required | output |"
    assert row(text, "--fast") == "| `--fast` | `off` | quickly |"
    assert row(text, "--tags") == "| `--tags TAGS [TAGS ...]` | `['a']` | labels \\*here\\* |"
    assert row(text, "--mode") == "| `--mode {x,y}` | `x` | `x\\|y` mode |"
    assert row(text, "--level") == "| `--level LEVEL` | `3` | how hard (default 3), 100% sure |"  # as --help says it
    assert "Guide:" not in text  # no guide page is known for a toy command


def test_make_docs_writes_both_files_atomically(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{README_START}\n| stale | row |\n{README_END}\n\nafter\n", encoding="utf-8")
    out = tmp_path / "docs" / "cli.md"
    assert main([str(out), "--readme", str(readme)]) == 0
    assert out.read_text(encoding="utf-8") == render()
    written = readme.read_text(encoding="utf-8")
    assert written == f"# title\n\n{README_START}\n{readme_table()}{README_END}\n\nafter\n"
    assert "stale" not in written
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["README.md", "cli.md", "docs"]  # no temporary left


def test_readme_without_markers_is_refused_before_anything_is_written(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nno table here\n", encoding="utf-8")
    out = tmp_path / "cli.md"
    assert main([str(out), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: the README has 0 start and 0 end markers of the command table: expected one {README_START!r} "
                   f"line before one {README_END!r} line; put them back where the table goes\n")
    assert not out.exists() and readme.read_text(encoding="utf-8") == "# title\n\nno table here\n"
