"""The CLI end to end with a tiny model: exit codes, output, and the store afterwards."""

import json
import re
import sys

import pytest
from click.testing import CliRunner

from knnstore import KNNSettings, Store
from knnstore.cli import cli

from .conftest import changed, snapshot

SMALL = ["--window", "16", "--stride", "12", "--batch-size", "4"]


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def cli_store(tmp_path, runner, tiny_model_dir):
    path = tmp_path / "store"
    result = runner.invoke(cli, ["init", str(path), "--model", str(tiny_model_dir), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "key = layer 1 ffn_input, dim 32, float32" in result.output
    return path


def test_init_add_list_stats_remove(runner, cli_store, text_dir):
    result = runner.invoke(cli, ["add-corpus", str(cli_store), "docs", str(text_dir), *SMALL])
    assert result.exit_code == 0, result.output
    assert "Corpus docs: 3 documents" in result.output

    listed = json.loads(runner.invoke(cli, ["list", str(cli_store), "--json"]).output)
    assert [(c["name"], c["status"], c["documents"]) for c in listed] == [("docs", "ready", 3)]
    assert listed[0]["pairs"] == listed[0]["tokens"] - 3 and listed[0]["bytes"] > 0

    stats = json.loads(runner.invoke(cli, ["stats", str(cli_store), "--json"]).output)
    assert stats["pairs"] == listed[0]["pairs"] == stats["table_rows"]
    assert (stats["dim"], stats["dtype"], stats["key_site"]) == (32, "float32", "ffn_input")

    table = runner.invoke(cli, ["list", str(cli_store)])
    assert "docs" in table.output and "ready" in table.output
    assert "bytes per pair" in runner.invoke(cli, ["stats", str(cli_store)]).output

    result = runner.invoke(cli, ["remove-corpus", str(cli_store), "docs"])
    assert result.exit_code == 0 and "Removed corpus docs" in result.output
    assert json.loads(runner.invoke(cli, ["list", str(cli_store), "--json"]).output) == []
    assert Store.open(cli_store).table.count() == 0


def test_progress_goes_to_a_log_as_plain_lines_ending_at_100_percent(runner, cli_store, text_dir, monkeypatch):
    monkeypatch.setattr("knnstore.cli.LOG_EVERY_S", 0.0)  # a line at every update
    result = runner.invoke(cli, ["add-corpus", str(cli_store), "docs", str(text_dir), *SMALL])
    assert result.exit_code == 0, result.output
    lines = re.findall(r"^Adding docs: ([\d,]+)/([\d,]+) tokens \((\d+)%\), [\d,]+ tok/s, [\d,]+ s$",
                       result.stderr, re.M)
    done = [int(d.replace(",", "")) for d, _, _ in lines]
    assert len(lines) >= 2 and done == sorted(done)
    assert lines[-1][0] == lines[-1][1] and [pct for _, _, pct in lines].count("100") == 1
    assert "Adding docs" not in result.stdout


def test_skipped_files_are_reported(runner, cli_store, text_dir):
    (text_dir / "x.txt").write_bytes(b"\x00\x00")
    result = runner.invoke(cli, ["add-corpus", str(cli_store), "docs", str(text_dir), *SMALL])
    assert result.exit_code == 0
    assert "skipped 1 file(s)" in result.output and "x.txt (binary)" in result.output


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("args,message", [
    (lambda s, t: ["add-corpus", s, "x", str(t / "missing.txt")], "no such file or directory"),
    (lambda s, t: ["add-corpus", s, "x", _write(t, "e.txt", b"")], "the corpus is empty"),
    (lambda s, t: ["add-corpus", s, "x", _write(t, "b.bin", b"\x00\x01")], "binary"),
    (lambda s, t: ["add-corpus", s, "x", _write(t, "l.txt", b"caf\xe9 au lait")], "not UTF-8"),
    (lambda s, t: ["add-corpus", s, "x", _write(t, "j.jsonl", b'{"body": 1}\n')], "no 'text' field"),
    (lambda s, t: ["add-corpus", s, "dup", _write(t, "ok.txt", b"lobsters are blue")], "already in"),
    (lambda s, t: ["remove-corpus", s, "nope"], "no corpus named 'nope'"),
    (lambda s, t: ["list", str(t / "nowhere")], "no store at"),
    (lambda s, t: ["stats", _write(t, "plain", b"x")], "is not a knnstore store"),
    (lambda s, t: ["init", s], "already a knnstore store"),
    (lambda s, t: ["add-corpus", s, "x", _write(t, "ok2.txt", b"a b c"), "--window", "8", "--stride", "99"], "stride must be"),
])
def test_user_mistakes_get_one_line_a_nonzero_exit_and_change_nothing(runner, cli_store, tmp_path, args, message):
    runner.invoke(cli, ["add-corpus", str(cli_store), "dup", _write(tmp_path, "dup.txt", b"lobsters are blue"), *SMALL])
    before = snapshot(cli_store)
    result = runner.invoke(cli, args(str(cli_store), tmp_path))
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1
    assert changed(cli_store, before) == set()


def test_a_model_that_cannot_be_loaded_is_a_one_line_error(runner, tmp_path):
    result = runner.invoke(cli, ["init", str(tmp_path / "s"), "--model", str(tmp_path / "no-such-model")])
    assert result.exit_code == 1 and "could not load model" in result.output
    assert not (tmp_path / "s").exists()


def test_every_command_has_help_with_an_example(runner):
    for name, command in cli.commands.items():
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0
        assert command.help and "Example" in command.help, f"{name} lacks help or an example"


@pytest.fixture
def filled_store(runner, cli_store, text_dir):
    result = runner.invoke(cli, ["add-corpus", str(cli_store), "docs", str(text_dir), *SMALL])
    assert result.exit_code == 0, result.output
    return cli_store


def test_eval_prints_base_and_knn_perplexity_side_by_side(runner, filled_store, text_dir):
    text = str(text_dir / "b.md")
    result = runner.invoke(cli, ["eval", str(filled_store), "--text", text, "--json",
                                 "--k", "8", "--lambda", "0.5", "--temperature", "1"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert {"base_ppl", "knn_ppl", "knn_only_ppl", "tokens"} <= r.keys()
    assert r["knn_ppl"] < r["base_ppl"] / 5 and r["search"] == "exact"
    assert (r["k"], r["lambda"], r["temperature"], r["retrieved_fraction"]) == (8, 0.5, 1.0, 1.0)
    # the default: adaptive λ, beside the plain kNN-LM at the default fixed λ
    table = runner.invoke(cli, ["eval", str(filled_store), "--text", text, "--max-tokens", "20"])
    assert table.exit_code == 0 and "base LM" in table.output and "20 tokens" in table.output
    assert f"kNN-LM, fixed λ={KNNSettings.lambda_:g} (k={KNNSettings.k}" in table.output
    assert "kNN-LM, adaptive λ" in table.output and "adaptive: " in table.output
    # --fixed-lambda (or --no-adaptive): the plain kNN-LM alone
    for args in (["--fixed-lambda", "0.15"], ["--no-adaptive"]):
        plain = runner.invoke(cli, ["eval", str(filled_store), "--text", text, "--max-tokens", "20", *args])
        assert plain.exit_code == 0 and f"kNN-LM (λ=0.15, k={KNNSettings.k}" in plain.output
        assert "adaptive" not in plain.output
    both = runner.invoke(cli, ["eval", str(filled_store), "--text", text, "--fixed-lambda", "0.2", "--lambda", "0.3"])
    assert both.exit_code != 0 and "either --fixed-lambda or --lambda" in both.output


def test_eval_sweep_writes_a_csv_and_a_plot(runner, filled_store, text_dir, tmp_path):
    prefix = tmp_path / "sweep"
    result = runner.invoke(cli, ["eval", str(filled_store), "--text", str(text_dir / "a.txt"),
                                 "--lambda", "0.1,0.5", "--k", "4,8", "--sweep-out", str(prefix), "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert len(r["sweep"]) == 4 and r["sweep_files"] == [str(prefix) + ".csv", str(prefix) + ".png"]
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert rows[0] == "lambda,k,temperature,knn_ppl,adaptive_ppl,base_ppl,tokens" and len(rows) == 5
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_sweep_without_matplotlib_writes_the_csv_and_says_how_to_get_the_plot(
        runner, filled_store, text_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: import fails
    prefix = tmp_path / "sweep"
    result = runner.invoke(cli, ["eval", str(filled_store), "--text", str(text_dir / "a.txt"),
                                 "--lambda", "0.1,0.5", "--sweep-out", str(prefix)])
    assert result.exit_code == 0, result.output
    assert "knnstore[plot]" in result.stderr and f"Wrote {prefix}.csv" in result.stdout
    assert len((tmp_path / "sweep.csv").read_text().splitlines()) == 3 and not (tmp_path / "sweep.png").exists()


def test_generate_and_explain_show_the_sources(runner, filled_store):
    result = runner.invoke(cli, ["generate", str(filled_store), "To be, or", "--max-new-tokens", "5",
                                 "--lambda", "0.9", "--temperature", "1", "--explain"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("To be, or not to")
    assert "docs: b" in result.output  # the source document of the neighbours
    g = json.loads(runner.invoke(cli, ["generate", str(filled_store), "To be, or", "--max-new-tokens", "3",
                                       "--sample", "--seed", "1", "--json"]).stdout)
    assert len(g["token_ids"]) == 3 and len(g["tokens"]) == 3
    assert {"searches_per_token", "drafted_proposed", "drafted_accepted", "tokens_per_model_call"} <= g.keys()
    greedy = [json.loads(runner.invoke(cli, ["generate", str(filled_store), "To be, or", "--max-new-tokens", "8",
                                             "--json", *flags]).stdout)
              for flags in ((), ("--no-draft",), ("--follow",))]
    assert greedy[0]["token_ids"] == greedy[1]["token_ids"]  # drafts never change greedy output
    assert greedy[1]["drafted_proposed"] == 0 and greedy[2]["followed_tokens"] >= 0
    assert "searches per token" in runner.invoke(cli, ["generate", str(filled_store), "To be",
                                                       "--max-new-tokens", "2"]).stderr
    assert {"corpus", "document", "title", "position", "snippet", "weight", "distance"} <= g["tokens"][0]["sources"][0].keys()
    ex = runner.invoke(cli, ["explain", str(filled_store), "First Citizen: Before we", "--json"])
    assert ex.exit_code == 0, ex.output
    tokens = json.loads(ex.stdout)
    assert tokens[-1]["sources"][0]["document"].endswith("c.txt")
    assert "spans" in g and isinstance(g["spans"], list)
    text = "First Citizen: Before we proceed any further, hear me speak."
    both = json.loads(runner.invoke(cli, ["explain", str(filled_store), text, "--json", "--spans", "--exact",
                                          "--lambda", "0.9", "--temperature", "1"]).stdout)
    assert {"tokens", "spans"} == both.keys() and both["spans"]
    assert {"first", "last", "document", "start_position", "end_position", "passage"} <= both["spans"][0].keys()
    shown = runner.invoke(cli, ["explain", str(filled_store), text, "--exact"])
    flat = " ".join(shown.stdout.split())  # rich wraps long lines
    assert shown.exit_code == 0 and " follow docs: c (" in flat and "c.txt), positions " in flat


def test_index_trains_and_reports_the_ann_index(runner, filled_store, tmp_path):
    status = runner.invoke(cli, ["index", str(filled_store), "--status"])
    assert status.exit_code == 0 and "none (exact search)" in status.output
    # too few rows here for a real index; train a tiny one
    result = runner.invoke(cli, ["index", str(filled_store), "--partitions", "2", "--sub-vectors", "2"])
    assert result.exit_code == 0, result.output
    assert "IvfPq" in result.output or "IVF_PQ" in result.output


@pytest.mark.parametrize("args,message", [
    (lambda s, t: ["eval", s, "--text", _write(t, "bin.txt", b"\x00\x01")], "not UTF-8 text"),
    (lambda s, t: ["eval", s, "--text", _write(t, "empty.txt", b"  ")], "is empty"),
    (lambda s, t: ["eval", s, "--text", _write(t, "one.txt", b"x"), "--lambda", "1.5"], "lambda must be between 0 and 1"),
    (lambda s, t: ["eval", s, "--text", _write(t, "two.txt", b"x"), "--k", "a,b"], "comma-separated"),
    (lambda s, t: ["generate", s, "To be", "--k", "4,8"], "takes one value here"),
    (lambda s, t: ["generate", s, "To be", "--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
    (lambda s, t: ["explain", s, "x", "--temperature", "0"], "temperature must be in (0, 1000000]"),
])
def test_eval_and_generate_mistakes_get_one_line_and_change_nothing(runner, filled_store, tmp_path, args, message):
    before = snapshot(filled_store)
    result = runner.invoke(cli, args(str(filled_store), tmp_path))
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert changed(filled_store, before) == set()
