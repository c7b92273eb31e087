"""The fact benchmark's data (tools/facts.py): seeded fictional people whose documents hold
every answer a probe asks for, and the answer matching the benchmark scores with."""

from __future__ import annotations

import doctest
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def facts():
    spec = importlib.util.spec_from_file_location("tools_facts", ROOT / "tools" / "facts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_the_same_seed_makes_the_same_people_and_another_seed_others(facts):
    assert facts.make_people(30, seed=4) == facts.make_people(30, seed=4)
    assert facts.make_people(30, seed=4) != facts.make_people(30, seed=5)
    people = facts.make_people(60)
    assert len({p.name for p in people}) == 60
    assert all(p.teacher != p.name for p in people)
    assert {p.teacher for p in people} == {p.name for p in people}  # everyone teaches someone


def test_every_probe_answer_is_stated_by_the_documents_it_should_come_from(facts):
    people = facts.make_people(40, seed=1)
    for p in people:
        bio, rec = facts.biography(p), facts.record(p)
        assert bio.kind != rec.kind and bio.text != rec.text
        for probe in facts.probes(p, people):
            source = people[probe.source_person]
            for doc in (facts.biography(source), facts.record(source)):
                assert probe.answer in doc.text
            if probe.kind == "P1":  # the stored wording: the biography goes on with the answer
                assert f"{probe.prompt} {probe.answer}" in bio.text
            else:
                assert probe.prompt not in bio.text and probe.prompt not in rec.text
        assert [q.kind for q in facts.probes(p, people)].count("P4") == 1


def test_an_answer_counts_only_as_a_whole_word_at_the_start(facts):
    assert facts.states(" Yarmoor in 1813.", "Yarmoor")
    assert facts.states(" A lacemaker, like", "lacemaker")
    assert facts.states("\nYarmoor", "Yarmoor")
    assert not facts.states(" Yarmoorshire", "Yarmoor")
    assert not facts.states(" the town of Yarmoor", "Yarmoor")
    assert not facts.states(" 181", "1813")


def test_the_module_examples_run(facts):
    assert doctest.testmod(facts).failed == 0


def test_real_fact_candidates_are_distinct_prompts(facts):
    prompts = [p for p, _ in facts.real_facts()]
    assert len(prompts) == len(set(prompts)) >= 100
