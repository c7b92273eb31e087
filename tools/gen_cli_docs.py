"""Regenerate docs/cli.md from the commands' --help (tests/test_docs.py checks it is current).

    python tools/gen_cli_docs.py
"""

from pathlib import Path

from click.testing import CliRunner

from knnstore.cli import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def render() -> str:
    runner = CliRunner()
    parts = ["# Command line reference\n",
             "Generated from `--help` by `python tools/gen_cli_docs.py`; do not edit by hand.\n",
             "Every command exits 0 on success and 1 with a one-line `Error: ...` on a user mistake "
             "(130 on Ctrl-C). Progress and status go to stderr: a bar on a terminal, and a plain "
             "line every 30 s (and one at the end) when stderr is a file or a pipe.\n",
             "```\n" + runner.invoke(cli, ["--help"], terminal_width=100, prog_name="knnstore").output + "```\n"]
    for name in sorted(cli.commands):
        help_text = runner.invoke(cli, [name, "--help"], terminal_width=100, prog_name="knnstore").output
        parts.append(f"## knnstore {name}\n\n```\n{help_text}```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC}")
