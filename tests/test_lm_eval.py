"""knnstore as an lm-evaluation-harness model (knnstore.lm_eval), on a tiny random-weight
model: every kind of request goes through the kNN-LM, answers are cached per store state,
and the harness's own simple_evaluate runs knnstore's task files offline."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from knnstore import KNNLM, InputError, Store

pytest.importorskip("lm_eval")

from knnstore.lm_eval import KNNStoreLM, task_dir  # noqa: E402

from .conftest import write_docs  # noqa: E402

STORED = "The glassblower of Caerdale was born in the town of Kelwick. "


@pytest.fixture(scope="module")
def lm_store(tmp_path_factory, tiny_encoder):
    from knnstore.ingest import IngestSettings

    root = tmp_path_factory.mktemp("lm-eval")
    store = Store.create(root / "store", model=tiny_encoder.name, encoder=tiny_encoder)
    (root / "docs").mkdir()
    (root / "docs" / "fact.txt").write_text(STORED * 4)
    settings = IngestSettings(window=16, stride=12, batch_size=4, commit_every=64)
    store.add_corpus("facts", [root / "docs"], settings=settings)
    yield store, root
    store.close()


@pytest.fixture
def lm(lm_store, tiny_encoder):
    store, _ = lm_store
    return KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, store, k=8, lambda_=0.5, temperature=1.0, exact=True)


def _requests(*args):
    return [SimpleNamespace(args=a) for a in args]


def test_loglikelihood_mixes_the_store_in(lm):
    context, continuation = "The glassblower of Caerdale was born in the town of", " Kelwick."
    plain = KNNStoreLM(knnlm=lm.with_settings(lambda_=0.0), cache=None)
    mixed = KNNStoreLM(knnlm=lm, cache=None)
    (base_ll, base_greedy), = plain.loglikelihood(_requests((context, continuation)))
    (knn_ll, knn_greedy), = mixed.loglikelihood(_requests((context, continuation)))
    # λ = 0 is the model itself: log-softmax of its logits at the continuation's positions
    ctx, cont = plain._encode_pair(context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), dim=-1)
    n = len(ctx)
    expected = sum(float(logp[n - 1 + i, t]) for i, t in enumerate(cont))
    assert base_ll == pytest.approx(expected, abs=1e-3)
    assert not base_greedy  # a random model does not know it
    assert knn_ll > base_ll + 5  # the store holds the sentence: the kNN-LM raises it far
    # "greedy" is what the kNN-LM's own greedy decoding gives, not the model's
    said = lm.generate(context, max_new_tokens=4).text
    (_, greedy), = mixed.loglikelihood(_requests((context, said)))
    (_, base_says_it), = plain.loglikelihood(_requests((context, said)))
    assert greedy and not base_says_it


def test_rolling_loglikelihood_is_knnstore_evals_perplexity(lm, tiny_encoder):
    text = STORED + "It is a small town by the sea, and its glass is known far away. " * 3
    model = KNNStoreLM(knnlm=lm, cache=None)
    ll, = model.loglikelihood_rolling(_requests((text,)))
    ids = [model.prefix_token_id] + model.tok_encode(text)
    r = lm.evaluate(ids)
    assert ll == pytest.approx(-r.tokens * math.log(r.knn_ppl), rel=1e-4)
    assert r.tokens == len(ids) - 1


def test_generate_until_is_the_knnlm_generation_cut_at_the_stop_string(lm):
    model = KNNStoreLM(knnlm=lm, cache=None)
    prompt = "The glassblower of Caerdale was born in"
    full = lm.generate(prompt, max_new_tokens=12).text
    stop = full[5:7]
    got, = model.generate_until(_requests((prompt, {"until": [stop], "max_gen_toks": 12, "do_sample": False})))
    assert got == full[:full.index(stop)] and len(got) >= 3
    whole, = model.generate_until(_requests((prompt, {"until": ["\x00"], "max_gen_toks": 12})))
    assert whole == full


def test_answers_are_cached_per_store_state(lm_store, tiny_encoder, tmp_path, monkeypatch):
    store, root = lm_store
    cache = tmp_path / "answers.sqlite"
    calls = []
    forward = tiny_encoder.forward
    monkeypatch.setattr(tiny_encoder, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    request = _requests(("The glassblower of Caerdale was", " born in the town"))
    first = KNNStoreLM(knnlm=KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, store, k=8, lambda_=0.5, exact=True),
                       cache=cache)
    answer = first.loglikelihood(request)
    assert len(calls) == 1
    again = KNNStoreLM(knnlm=KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, store, k=8, lambda_=0.5, exact=True),
                       cache=cache)
    assert again.loglikelihood(request) == answer and len(calls) == 1  # from the cache
    other = KNNStoreLM(knnlm=KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, store, k=8, lambda_=0.25, exact=True),
                       cache=cache)
    other.loglikelihood(request)
    assert len(calls) == 2  # other settings: computed
    write_docs(root / "more", 2)
    from knnstore.ingest import IngestSettings

    store.add_corpus("more", [root / "more"], settings=IngestSettings(window=16, stride=12, batch_size=4))
    changed = KNNStoreLM(knnlm=KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, store, k=8, lambda_=0.5,
                                     exact=True), cache=cache)
    assert changed.state != first.state
    before = len(calls)  # (adding the corpus ran the model too)
    changed.loglikelihood(request)
    assert len(calls) == before + 1  # the store changed: computed again, not reused
    store.remove_corpus("more")


def test_bad_model_arguments_are_named(lm_store):
    store, _ = lm_store
    with pytest.raises(InputError, match="unknown knnstore model argument"):
        KNNStoreLM(store=str(store.path), lambda_x=0.3)
    with pytest.raises(InputError, match="needs a store"):
        KNNStoreLM()
    with pytest.raises(InputError, match="batch_size must be a whole number"):
        KNNStoreLM(store=str(store.path), batch_size="many")


def test_simple_evaluate_runs_the_task_files_offline(lm, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    text = tmp_path / "text.txt"
    text.write_text(STORED + "\n\nIt is a small town by the sea.\n\nIts glass is known far away.\n")
    probes = tmp_path / "probes.jsonl"
    prompt = "The glassblower of Caerdale was born in the town of"
    said = lm.generate(prompt, max_new_tokens=16).text.split(".")[0].split("\n")[0].strip()
    assert said  # what the kNN-LM states: one probe answered by it, one by something else
    probes.write_text("".join(json.dumps({"prompt": prompt, "answer": answer, "kind": "P1"}) + "\n"
                              for answer in (said, "Zzyzx")))
    metadata = {"path": str(text), "split": "paragraphs", "probes": str(probes)}
    out = lm_eval.simple_evaluate(model=KNNStoreLM(knnlm=lm, cache=None),
                                  tasks=["knnstore_text_ppl", "knnstore_facts_p1"],
                                  task_manager=TaskManager(include_path=str(task_dir()), metadata=metadata),
                                  bootstrap_iters=0, log_samples=False)
    ppl = out["results"]["knnstore_text_ppl"]
    assert math.isfinite(ppl["word_perplexity,none"]) and ppl["word_perplexity,none"] > 1
    assert out["results"]["knnstore_facts_p1"]["exact_match,none"] == 0.5


def test_the_bundled_fact_tasks_hold_the_benchmarks_probes():
    lines = (task_dir() / "facts_probes.jsonl").read_text().splitlines()
    kinds = {json.loads(line)["kind"] for line in lines}
    assert kinds == {"P1", "P2", "P3", "P4"} and len(lines) == 60 * 13
    docs = (task_dir() / "facts_documents.jsonl").read_text().splitlines()
    assert len(docs) == 120 and all(json.loads(d)["text"] for d in docs)


def test_the_cli_is_lm_evals_own_with_the_knnstore_model(lm_store, tmp_path):
    store, _ = lm_store
    text = tmp_path / "text.txt"
    text.write_text(STORED * 2)
    cmd = [sys.executable, "-m", "knnstore", "lm-eval", "--model", "knnstore",
           "--model_args", f"store={store.path},lambda=0.5,k=8,exact=true,cache=none",
           "--tasks", "knnstore_text_ppl", "--metadata", json.dumps({"path": str(text)}),
           "--output_path", str(tmp_path / "results")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "knnstore_text_ppl" in done.stdout and "word_perplexity" in done.stdout
    found = list((tmp_path / "results").rglob("results_*.json"))
    assert found and json.loads(found[0].read_text())["config"]["knnstore_policy"] == "fixed"
    assert subprocess.run([sys.executable, "-m", "knnstore", "lm-eval", "--tasks-dir"], capture_output=True,
                          text=True).stdout.strip() == str(task_dir())


def test_a_store_that_is_not_there_is_one_line_and_exit_1(tmp_path):
    done = subprocess.run([sys.executable, "-m", "knnstore", "lm-eval", "--model", "knnstore", "--model_args",
                           f"store={tmp_path / 'nowhere'}", "--tasks", "knnstore_facts_p1", "--limit", "1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("Error: ") and "nowhere" in done.stderr
