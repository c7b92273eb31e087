"""Every CLI command, every option and argument, a set of bad values each: generated from
the click definitions, so a new option is covered (or this test names it) automatically.

Each case must end with a non-zero exit, no traceback, the store exactly as it was and
nothing written in the working directory. The bad values come from the parameter's type:
numbers outside the range their ``Num`` type declares (and not numbers at all, NaN, inf),
a choice that is not one, paths that are missing, devices, or inside the store.
"""

import os
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from knnstore.cli import Num, cli

from .conftest import changed, snapshot
from .servers import free_port

SMALL = ["--window", "16", "--stride", "12", "--batch-size", "4"]


def _numbers(kind: Num) -> list[str]:
    bad = ["abc", "nan", "inf", "-inf", ""]
    if kind.integer:
        bad.append("1.5")
        if kind.lo is None and kind.hi is None:  # a range only the model knows (--key-layer)
            bad.append("99999999999999999999")
    if kind.lo is not None:
        bad.append(str(kind.lo if kind.lo_open else (kind.lo - 1)))
    if kind.hi is not None:
        bad.append(str(kind.hi + 1))
    return bad


# Values for parameters whose type says too little (strings, paths), by command and name.
NAMED = {
    ("init", "store"): ["{store}", "{file}/below", "/proc/knnstore-bad/s", "{dir}/odd?x",
                        "s3://bucket/needs-a-catalog-url", "s3://", "ftp://host/store"],
    ("init", "model"): ["no/such-model-anywhere", "", "{file}"],
    ("init", "catalog_url"): ["", "nope://u:pw@h/db", "sqlite://", "::bad", "{store}/catalog.db"],
    ("add-corpus", "name"): ["", "   ", "keep", "bad\x1b[31mname", "x" * 300],
    ("add-corpus", "paths"): ["/nonexistent/path", "/dev/zero", "{empty}", "{store}/catalog.db"],
    ("add-corpus", "text_field"): ["", "  "],
    ("add-corpus", "ray_address"): ["", "   ", "127.0.0.1:1", "ray://:x"],
    ("resume-corpus", "ray_address"): ["", "   "],
    ("resume-corpus", "name"): ["", "nope", "keep"],
    ("remove-corpus", "name"): ["", "nope", "bad\x1b]0;x\x07"],
    ("remove-documents", "where"): ["", "  ", "not sql at all", "document_id = -1", "1=1; DELETE FROM documents",
                                    "no_such_column = 1"],
    ("remove-documents", "corpus"): ["", "nope"],
    ("forget", "text"): ["", "   ", "no such text anywhere 4711"],
    ("prune", "corpus"): ["", "nope", "bad\x1b[31mname"],
    ("eval", "text_path"): ["/nonexistent/t.txt", "/dev/zero", "{empty}", "{dir}"],
    ("eval", "sweep_out"): ["/nonexistent/dir/sweep", "{store}/sweep", "{store}/vectors/x"],
    ("calibrate", "text_path"): ["/nonexistent/t.txt", "/dev/zero", "{empty}"],
    ("generate", "prompt"): ["", "   "],
    ("explain", "text"): ["", " "],
    ("serve", "host"): ["", "0.0.0.0", "192.0.2.1", "no such host!"],
    ("serve", "api_key"): ["", "   "],
    ("lm-eval", "args"): ["--no-such-option", "--model"],
    ("sql", "query"): ["", "DELETE FROM pairs", "EXPLAIN ANALYZE DROP VIEW pairs", "SELECT 1; SELECT 2"],
    ("sql", "memory"): ["", "lots", "-1GB", "12"],
    ("sql", "output"): ["{store}/catalog.db", "{store}/vectors/x.csv", "/nonexistent/dir/x.csv", "/dev/zero",
                        "{dir}"],
}
# A store argument is the same everywhere.
STORE_BAD = ["/nonexistent/store", "{file}", "{dir}", "/dev/zero", "{dir}/odd?x", "ftp://host/store"]
# And --storage-option (KEY=VALUE).
STORAGE_OPTION_BAD = ["", "no-equals-sign", "=value"]
# So is --device (on a machine with a GPU, "cuda" is no bad value).
DEVICE_BAD = ["", "gpu", "cuda:-1", "cuda:99", "tpu", *([] if torch.cuda.is_available() else ["cuda"])]

# A valid invocation of each command, by parameter name; each case changes one of them.
BASE = {
    "init": {"store": "{new}", "model": "{model}"},
    "add-corpus": {"store": "{store}", "name": "new", "paths": "{text}", "window": "16", "stride": "12",
                   "batch_size": "4"},
    "resume-corpus": {"store": "{store}", "name": "keep"},
    "remove-corpus": {"store": "{store}", "name": "keep"},
    "remove-documents": {"store": "{store}", "where": "n_pairs > 0", "dry_run": True},
    "purge": {"store": "{store}"},
    "forget": {"store": "{store}", "text": "lobster", "dry_run": True},
    "prune": {"store": "{store}", "dry_run": True},
    "compact": {"store": "{store}", "key_dim": "8"},
    "list": {"store": "{store}"},
    "stats": {"store": "{store}"},
    "check": {"store": "{store}"},
    "eval": {"store": "{store}", "text_path": "{text}"},
    "generate": {"store": "{store}", "prompt": "To be", "max_new_tokens": "2"},
    "explain": {"store": "{store}", "text": "To be or not"},
    "calibrate": {"store": "{store}", "text_path": "{text}"},
    "index": {"store": "{store}", "status_only": True},
    "sql": {"store": "{store}", "query": "SELECT 1 AS one"},
    "serve": {"store": "{store}", "port": "{port}"},  # any case that passed would serve (and hang)
    "lm-eval": {"args": "--tasks-dir"},  # lm_eval's own arguments, passed through
}


def _bad_values(command: str, param: click.Parameter) -> list[str]:
    if isinstance(param.type, Num):
        return _numbers(param.type)
    if isinstance(param.type, click.Choice):
        return ["nope", ""]
    if param.name == "store" and command != "init":
        return STORE_BAD
    if param.name == "device":  # the same on every command that loads the model
        return DEVICE_BAD
    if param.name == "storage_option":
        return STORAGE_OPTION_BAD
    if (command, param.name) in NAMED:
        return NAMED[(command, param.name)]
    raise AssertionError(f"no bad values known for {param.name!r} of `knnstore {command}`: add them to "
                         "NAMED in tests/test_bad_values.py")


def _cases():
    for command_name, command in sorted(cli.commands.items()):
        assert command_name in BASE, f"add a valid invocation of `knnstore {command_name}` to BASE"
        for param in command.params:
            if getattr(param, "is_flag", False) or param.name == "help":
                continue
            for value in _bad_values(command_name, param):
                yield pytest.param(command_name, param.name, value, id=f"{command_name}-{param.name}-{value[:24]!r}")


def _invocation(command: click.Command, name: str, param_name: str, value: str) -> list[str]:
    """The arguments of BASE[name] with ``param_name`` set to ``value``: options first,
    then ``--`` and the arguments in order (so a value such as "-1" stays a value)."""
    values = {**BASE[name], param_name: value}
    options, arguments = [], []
    for param in command.params:
        if param.name not in values:
            continue
        v = values[param.name]
        if isinstance(param, click.Argument):
            arguments.append(v)
        elif v is True:
            options.append(param.opts[0])
        else:
            options += [param.opts[0], v]
    return [*options, "--", *arguments]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, request):
    root = tmp_path_factory.mktemp("bad")
    store = root / "store"
    runner = CliRunner()
    assert runner.invoke(cli, ["init", str(store), "--model", str(tiny_model_dir)]).exit_code == 0
    text = root / "text.txt"
    text.write_text("The European lobster is a species of clawed lobster from the eastern Atlantic. " * 30)
    added = runner.invoke(cli, ["add-corpus", str(store), "keep", str(text), *SMALL])
    assert added.exit_code == 0, added.output
    (root / "empty.txt").write_text("   ")
    (root / "a-file").write_text("x")
    (root / "a-dir").mkdir()
    (root / "cwd").mkdir()
    return {"store": str(store), "text": str(text), "model": str(tiny_model_dir), "new": str(root / "new"),
            "port": str(free_port()),
            "empty": str(root / "empty.txt"), "file": str(root / "a-file"), "dir": str(root / "a-dir"),
            "cwd": root / "cwd"}


@pytest.mark.parametrize("command_name,param_name,value", list(_cases()))
def test_a_bad_value_fails_cleanly_and_changes_nothing(world, monkeypatch, command_name, param_name, value):
    monkeypatch.chdir(world["cwd"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    command = cli.commands[command_name]
    fill = lambda a: a.format(**{k: v for k, v in world.items() if k != "cwd"})  # noqa: E731
    args = [command_name, *(fill(a) for a in _invocation(command, command_name, param_name, value))]
    before = snapshot(Path(world["store"]))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0, (args, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert "Traceback" not in result.output, result.output
    assert changed(Path(world["store"]), before) == set(), args
    assert os.listdir(world["cwd"]) == [] and not os.path.exists(world["new"]), args


@pytest.mark.parametrize("args,message", [
    (["--sub-vectors", "7"], "sub_vectors must divide the key dimension 32"),
    (["--sub-vectors", "1000"], "sub_vectors must be at least 1 and at most 32"),
    (["--partitions", "60000"], "partitions (the table has"),
])
def test_index_parameters_are_checked_against_the_store(world, args, message):
    before = snapshot(Path(world["store"]))
    result = CliRunner().invoke(cli, ["index", world["store"], *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert changed(Path(world["store"]), before) == set()
