"""`knnstore prune`: greedy merging of neighbouring pairs with the same next token.

A hand-built case pins the merge and the weighted p_kNN exactly; real LanceDB tables and
the tiny model check that a pruned store keeps every vote (weights add up to the pairs it
had), its catalog agrees with its table, and everything else keeps working.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from knnstore import KNNLM, InputError
from knnstore.errors import CorpusNotFoundError
from knnstore import knn
from knnstore.check import check
from knnstore.cli import cli
from knnstore.pruning import greedy_merge
from knnstore.schema import WEIGHT

from .conftest import changed, snapshot


def test_greedy_merge_of_a_hand_built_case():
    # rows 0..4; values: 0 and 1 and 3 predict 7, 2 predicts 9, 4 predicts 7 but is far
    values = np.array([7, 7, 9, 7, 7])
    near = np.array([[0, 1, 2], [1, 0, 3], [2, 1, 0], [3, 1, 0], [4, -1, -1]])
    kept, weights = greedy_merge(values, np.ones(5, dtype=np.int64), near)
    # row 0 takes 1 (same value); 1 is gone; 2 predicts 9: takes nothing; 3 would take 0,
    # but 0 stands for others now (a centre): it stays; 4 has no neighbour
    assert kept.tolist() == [True, False, True, True, True]
    assert weights[kept].tolist() == [2, 1, 1, 1]
    assert weights[kept].sum() == 5  # every pair's vote is kept
    # a second prune: a row of weight > 1 is a centre from the start; weights add up
    values2, weights2_in = np.array([7, 9, 7, 7]), weights[kept]
    kept2, weights2 = greedy_merge(values2, weights2_in, np.array([[0, 2], [1, 0], [2, 0], [3, 0]]))
    assert kept2.tolist() == [True, True, False, True] and weights2[kept2].tolist() == [3, 1, 1]
    kept3, _ = greedy_merge(values2, weights2_in, np.array([[0, -1], [1, -1], [2, -1], [3, 0]]))
    assert kept3.all()  # 3 cannot take 0 (weight 2)


def test_weighted_pknn_equals_the_unmerged_distribution_exactly():
    # two pairs at the same distance with the same value, merged into one of weight 2,
    # give exactly the distribution the two gave
    d_full = torch.tensor([[1.0, 1.0, 2.5]])
    v_full = torch.tensor([[5, 5, 8]])
    d_merged = torch.tensor([[1.0, 2.5, float("inf")]])
    v_merged = torch.tensor([[5, 8, -1]])
    w_merged = torch.tensor([[2, 1, 1]])
    full = knn.knn_log_probs(d_full, v_full, vocab_size=10, temperature=2.0)
    merged = knn.knn_log_probs(d_merged, v_merged, vocab_size=10, temperature=2.0, weights=w_merged)
    assert torch.equal(full.exp()[0, [5, 8]].round(decimals=6), merged.exp()[0, [5, 8]].round(decimals=6))
    # p(5) = 2 e^{-1/2} / (2 e^{-1/2} + e^{-2.5/2}), by hand
    expected = 2 * np.exp(-0.5) / (2 * np.exp(-0.5) + np.exp(-1.25))
    assert merged.exp()[0, 5].item() == pytest.approx(expected, abs=1e-6)
    # the target-only form and the signals agree with it
    t = knn.knn_target_log_prob(d_merged, v_merged == 5, knn.valid_mask(d_merged, v_merged), 2.0, w_merged)
    assert t.exp().item() == pytest.approx(expected, abs=1e-9)


def _weights_by_corpus(store):
    t = store.table.columns(["corpus_id", WEIGHT] if store.table.weighted else ["corpus_id"])
    ids = t.column("corpus_id").to_numpy()
    w = t.column(WEIGHT).to_numpy() if store.table.weighted else np.ones(len(ids))
    return {int(c): int(w[ids == c].sum()) for c in np.unique(ids)}


def test_prune_keeps_every_vote_and_the_catalog_agrees(two_corpora):
    store = two_corpora
    before = {c.name: c.pairs for c in store.corpora()}
    a_id = store.corpus("a").id
    other = store.sql("SELECT pair_id FROM pairs WHERE corpus = 'b' ORDER BY pair_id").to_pylist()
    done = store.prune("a", neighbours=8)
    assert [c.corpus for c in done.corpora] == ["a"]
    after = {c.name: c.pairs for c in store.corpora()}
    assert after["a"] < before["a"] and after["b"] == before["b"]  # repeated text merges a lot
    assert done.corpora[0].pairs_after == after["a"] == store.table.count(a_id)
    assert _weights_by_corpus(store)[a_id] == before["a"]  # weights add up to the pairs it had
    # SQL shows them (and 1 for corpora never pruned)
    sums = {r["corpus"]: r["w"] for r in store.sql("SELECT corpus, sum(weight) AS w FROM pairs GROUP BY corpus")
            .to_pylist()}
    assert sums == {"a": before["a"], "b": before["b"]}
    assert store.sql("SELECT pair_id FROM pairs WHERE corpus = 'b' ORDER BY pair_id").to_pylist() == other
    report = check(store)
    assert report.ok, report.problems
    assert store.table.pairs_indexed()  # the rewritten rows are found by id through the index again
    # documents' counts are the table's
    docs = store.documents("a")
    assert {d.id: d.n_pairs for d in docs} == store.table.counts_by_document([d.id for d in docs])
    # the search returns the weights, exact and ANN alike; p_kNN uses them
    rows = store.table.columns(["vector", "pair_id", WEIGHT], where=f"corpus_id = {a_id}").to_pydict()
    heavy = int(np.argmax(rows[WEIGHT]))
    key = np.asarray(rows["vector"][heavy], dtype=np.float32)[None]
    for found in (store.search(key, k=4, exact=True), store.table.search(key, 4)):
        assert found.pair_ids[0, 0] == rows["pair_id"][heavy]
        assert found.weights[0, 0] == rows[WEIGHT][heavy] > 1 and (found.weights >= 1).all()


def test_pruned_store_still_scores_explains_and_removes(two_corpora, tmp_path):
    store = two_corpora
    lm = KNNLM.from_store(store)
    text = (tmp_path / "a" / "00.txt").read_text()
    base = lm.evaluate(text)
    store.prune(neighbours=4)
    lm = KNNLM.from_store(store)
    pruned = lm.evaluate(text)
    assert np.isfinite(pruned.knn_ppl) and pruned.base_ppl == pytest.approx(base.base_ppl)
    assert lm.explain(text[:60], n_sources=2)
    store.remove_corpus("b")
    assert {c.name for c in store.corpora()} == {"a"}
    assert check(store).ok


def test_dry_run_and_bad_input_change_nothing(two_corpora):
    store = two_corpora
    path = store.location.path
    before = snapshot(path)
    done = store.prune(dry_run=True)
    assert done.dry_run and done.pairs_after < done.pairs_before
    with pytest.raises(CorpusNotFoundError, match="no corpus"):
        store.prune("nope")
    with pytest.raises(InputError, match="neighbours"):
        store.prune(neighbours=-1)
    assert changed(path, before) == set()


def test_cli_prune_json(two_corpora):
    store = two_corpora
    path = str(store.location.path)
    store.close()
    result = CliRunner().invoke(cli, ["prune", path, "--neighbours", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["pairs_after"] < data["pairs_before"] and {c["corpus"] for c in data["corpora"]} == {"a", "b"}
    bad = CliRunner().invoke(cli, ["prune", path, "--neighbours", "0"])
    assert bad.exit_code != 0 and "neighbours" in bad.output


CHILD = """
import sys
from knnstore import Store
Store.open(sys.argv[1]).prune(neighbours=4)
"""


@pytest.mark.parametrize("finish", ["repair", "next prune"])
def test_a_killed_prune_leaves_a_store_that_opens_and_one_command_finishes_it(two_corpora, finish):
    import os
    import subprocess
    import sys

    store = two_corpora
    before = {c.name: c.pairs for c in store.corpora()}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(store.path)],
                          env={**os.environ, "KNNSTORE_CRASH_AT": "prune.after_table"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    after_crash = type(store).open(store.path)  # it opens
    assert not check(after_crash).ok  # the cut-short prune is reported (its counts)
    if finish == "repair":
        check(after_crash, repair=True)
    else:
        after_crash.prune(neighbours=4)
    after_crash.refresh()
    report = check(after_crash)
    assert report.ok, [p.what for p in report.problems]
    # every vote is still there
    sums = {r["corpus"]: r["w"] for r in after_crash.sql("SELECT corpus, sum(weight) AS w FROM pairs GROUP BY corpus")
            .to_pylist()}
    assert sums == before


def test_removal_after_a_prune_is_exact(store, tmp_path, small_settings):
    """Two identical documents x and y: a prune merges only within a document, so removing
    x leaves every vote of y (its rows and weights as after the prune); and forgetting a
    text after a prune names the pruned corpus instead of saying nothing was removed."""
    root = tmp_path / "twins"
    root.mkdir()
    text = "The lobster sat on the rock and the crab sat on the sand. " * 8
    for name in ("x.txt", "y.txt"):
        (root / name).write_text(text)
    store.add_corpus("twins", [root], settings=small_settings)
    y = next(d for d in store.documents("twins") if d.source.endswith("y.txt"))
    pruned = store.prune("twins", neighbours=8, exact=True)
    assert pruned.pairs_after < pruned.pairs_before  # it merged something (within each document)
    where = f"document_id = {y.id}"
    votes = store.table.columns(["pair_id", "weight"], where=where).sort_by("pair_id").to_pylist()
    assert sum(v["weight"] for v in votes) == y.n_pairs  # y's rows carry exactly y's votes
    store.remove_documents("path LIKE '%x.txt'")
    assert store.table.columns(["pair_id", "weight"], where=where).sort_by("pair_id").to_pylist() == votes
    with pytest.raises(InputError, match="twins was pruned"):
        store.forget("jane.doe@example.com")
