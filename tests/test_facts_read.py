"""The real default model (SmolLM2-135M) reads the document a prompt names: fictional people
(tools/facts.py) it cannot know, asked in other words than their documents use. Marked slow."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from knnstore import Encoder, Store
from knnstore.adapter import KNNLM, follows
from knnstore.config import KNNSettings

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def facts():
    spec = importlib.util.spec_from_file_location("tools_facts_read", ROOT / "tools" / "facts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def people_store(tmp_path_factory, facts):
    root = tmp_path_factory.mktemp("facts")
    people = facts.make_people(8, seed=3)
    facts.write_documents(people, root / "people.jsonl")
    store = Store.create(root / "store", encoder=Encoder.load("smollm2-135m"))
    store.add_corpus("facts", [root / "people.jsonl"])
    yield store, people
    store.close()


def test_the_default_states_paraphrased_facts_from_the_documents_it_reads_and_cites_them(people_store, facts):
    store, people = people_store
    lm = KNNLM.from_store(store, KNNSettings.resolve(exact=True))
    lm.resolve_policy()
    plain = lm.with_settings(read=0)
    asked = [q for p in people[:6] for q in facts.probes(p, people) if q.kind == "P2" and q.attribute in ("town", "year")]
    stated = unread = cited = 0
    for q in asked:
        g = lm.generate(q.prompt, max_new_tokens=6, explain=True, n_sources=1)
        own = {f"{people[q.person].name} (biography)", f"{people[q.person].name} (record)"}
        assert {p.title for p in g.read} & own, f"{q.prompt!r} read {[p.title for p in g.read]}"
        if facts.states(g.text, q.answer):
            stated += 1
            src = follows(g.tokens[0])
            cited += src is not None and src.title in own
        unread += facts.states(plain.generate(q.prompt, max_new_tokens=6).text, q.answer)
    assert stated >= 0.6 * len(asked) and stated > unread, (stated, unread, len(asked))
    assert cited == stated  # every stated answer cites the person's own document
