"""Data and scoring of knnstore's lm-eval tasks (loaded by the harness from the task files
beside this one; ``knnstore.lm_eval.task_dir()`` is this folder).

* ``knnstore_facts`` (a tag: ``knnstore_facts_p1`` ... ``_p4``): the fact benchmark's probes
  (``tools/facts.py``; bundled: 60 people, ``facts_probes.jsonl``, whose documents are
  ``facts_documents.jsonl``); greedy generation, exact match of the answer stated first.
  Another probe file: ``--metadata '{"probes": "PATH.jsonl"}'`` (lines with prompt, answer, kind).
* ``knnstore_text_ppl``: perplexity over a local text file,
  ``--metadata '{"path": "FILE", "split": "file" | "paragraphs"}'``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _probes(kind: str, probes: str | None = None, **_) -> dict:
    path = Path(probes).expanduser() if probes else HERE / "facts_probes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no probe file {path}: give --metadata '{{\"probes\": \"PATH.jsonl\"}}'")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [{"prompt": r["prompt"], "answer": str(r["answer"]), "kind": r.get("kind", kind)} for r in rows]
    return _split([r for r in rows if r["kind"] == kind])


def _split(rows: list[dict]) -> dict:
    import datasets  # lm-eval's dependency: imported here so that ``states`` needs nothing

    return {"test": datasets.Dataset.from_list(rows)}


def facts_p1(**kwargs) -> dict:
    return _probes("P1", **kwargs)


def facts_p2(**kwargs) -> dict:
    return _probes("P2", **kwargs)


def facts_p3(**kwargs) -> dict:
    return _probes("P3", **kwargs)


def facts_p4(**kwargs) -> dict:
    return _probes("P4", **kwargs)


def normalise(text: str) -> str:
    """Lower case, no leading space or article: how answers are compared."""
    t = text.strip().lower()
    for article in ("a ", "an ", "the "):
        if t.startswith(article):
            t = t[len(article):]
    return t


def states(generated: str, answer: str) -> bool:
    """Whether a greedy continuation states ``answer`` first (exact match of the answer as a
    whole word, after ``normalise``): the fact benchmark's measure."""
    g, a = normalise(generated), normalise(answer)
    return g.startswith(a) and (len(g) == len(a) or not g[len(a)].isalnum())


def process_facts(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(states(results[0], doc["answer"]))}


def text_documents(path: str | None = None, split: str = "file", **_) -> dict:
    if not path:
        raise ValueError("knnstore_text_ppl needs a text file: --metadata '{\"path\": \"FILE\"}'")
    text = Path(path).expanduser().read_text(encoding="utf-8")
    if split == "paragraphs":
        parts = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    elif split == "file":
        parts = [text]
    else:
        raise ValueError(f"split must be 'file' or 'paragraphs', not {split!r}")
    return _split([{"text": p} for p in parts])


def process_ppl(doc: dict, results: list[float]) -> dict:
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
