"""knnstore as a model of EleutherAI's lm-evaluation-harness (``pip install 'knnstore[eval]'``).

``KNNStoreLM`` answers the harness's three kinds of request through the kNN-LM, with the
adaptive default or a fixed λ exactly as ``knnstore eval`` and ``generate`` mix:

* ``loglikelihood``: log p(continuation | context), and whether greedy decoding of the
  kNN-LM gives the continuation (multiple-choice tasks, the fact tasks);
* ``loglikelihood_rolling``: a whole text scored in sliding windows (perplexity tasks);
* ``generate_until``: greedy or sampled continuations, batched as the server decodes them,
  cut at the task's stop strings.

Results are cached in an SQLite file (``cache``: default ``$KNNSTORE_CACHE/lm-eval.sqlite``,
``cache=none`` for no cache) under a key made of the request and everything that decides
its answer: knnstore's version and mixing constants, the model's weights, the store's
pairs-table version and content, the kNN settings and the adaptive policy in use. A store changed by add-corpus, remove-documents,
forget or a new calibration gives new keys, so old results are never reused.

From the command line (the harness has no plugin entry point; ``knnstore lm-eval`` is its
own ``lm_eval`` command with this model registered)::

    knnstore lm-eval --model knnstore --model_args store=wiki-store,k=128 --tasks knnstore_facts \\
        --include_path "$(python -m knnstore.lm_eval --tasks-dir)"

From Python::

    >>> import lm_eval                                                       # doctest: +SKIP
    >>> from knnstore.lm_eval import KNNStoreLM, task_dir                   # doctest: +SKIP
    >>> lm_eval.simple_evaluate(model=KNNStoreLM(store="wiki-store"), tasks=["knnstore_facts"],
    ...                         task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir())))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError("knnstore.lm_eval needs the lm-eval package: pip install 'knnstore[eval]'") from exc
from tqdm import tqdm

from . import adaptive
from .adapter import KNNLM
from .config import MAX_NEW_TOKENS, SCORE_STRIDE, SCORE_WINDOW, KNNSettings, cache_root
from .decoding import Row, decode
from .errors import InputError
from .scoring import scored_windows
from .windows import right_padded

CACHE_FORMAT = 1  # bump when what a cached answer means changes
SETTINGS = {f.name: f.name for f in dataclasses.fields(KNNSettings)} | {"lambda": "lambda_"}


def task_dir() -> Path:
    """The task files shipped with knnstore (``--include_path`` for the harness): the fact
    benchmark's probes (``knnstore_facts``) and perplexity over a local text file
    (``knnstore_text_ppl``)."""
    return Path(__file__).resolve().parent / "lm_eval_tasks"


@register_model("knnstore")
class KNNStoreLM(TemplateLM):
    """The kNN-LM of a store as an lm-eval model.

    Args:
        store: the store's path (or ``s3://`` URI).
        k, lambda / lambda_, temperature, exact, adaptive, nprobes, refine_factor,
            skip_above_prob, skip_below_entropy, read: kNN settings, as ``KNNSettings.resolve``
            takes them (a λ given without ``adaptive`` asks for the plain kNN-LM). ``read``
            acts on generate_until (the passages a prompt names are read before it);
            loglikelihood scores the text as given.
        batch_size: sequences per forward pass (the harness's ``--batch_size``; "auto" is 4).
        device, dtype: where and in what precision the model runs ("auto").
        cache: the SQLite file of cached answers; "none" for no cache.
        knnlm: an adapter already built (instead of ``store`` and the settings).
    """

    def __init__(self, store: str | os.PathLike | None = None, *, batch_size: int | str = 4,
                 device: str | None = "auto", dtype: str = "auto", cache: str | os.PathLike | None = "auto",
                 knnlm: KNNLM | None = None, max_batch_size: Any = None, **settings) -> None:
        super().__init__()
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise InputError(f"unknown knnstore model argument(s) {', '.join(unknown)}: use store, "
                             f"{', '.join(sorted(SETTINGS))}, batch_size, device, dtype or cache")
        given = {SETTINGS[name]: value for name, value in settings.items()}
        try:  # (max_batch_size: the harness's, for "auto" batch sizes; not used)
            self.batch_size = 4 if batch_size is None or str(batch_size).startswith("auto") else int(batch_size)
        except ValueError:
            raise InputError(f"batch_size must be a whole number or 'auto', got {batch_size!r}") from None
        if self.batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {self.batch_size}")
        if knnlm is None:
            if store is None:
                raise InputError("the knnstore model needs a store: --model_args store=PATH")
            knnlm = KNNLM.from_store(str(store), KNNSettings.resolve(**given), device=_device(device),
                                     compute_dtype=dtype)
        elif given:
            knnlm = knnlm.with_settings(**given)
        self.knnlm = knnlm
        self.tokenizer = knnlm.tokenizer
        if knnlm.needs_calibration():
            print("knnstore: calibrating adaptive λ on the store's own text first (once per store content)",
                  file=sys.stderr)
        knnlm.resolve_policy()
        self.state = self._state()
        self.cache = _open_cache(cache)

    # --- what the harness asks of a TemplateLM ------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else 0

    @property
    def max_length(self) -> int:
        return self.knnlm.encoder.max_length or SCORE_WINDOW

    @property
    def device(self):
        return self.knnlm.encoder.device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens), verbose=False)["input_ids"]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        s = self.knnlm.settings
        policy = self.knnlm.policy
        return {"knnstore_store": str(self.knnlm.store.path), "knnstore_settings": dataclasses.asdict(s),
                "knnstore_policy": policy.name if policy is not None else "fixed",
                "knnstore_state": self.state}

    # --- the three kinds of request ------------------------------------------------------

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        keys = [self._key("loglikelihood", [ctx, cont]) for _, ctx, cont in requests]
        answers: list[tuple[float, bool] | None] = [self._cached(key) for key in keys]
        todo = sorted((i for i, a in enumerate(answers) if a is None),
                      key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        bar = tqdm(total=len(todo), desc="knnstore loglikelihood", disable=disable_tqdm or not todo)
        for lo in range(0, len(todo), self.batch_size):
            group = todo[lo:lo + self.batch_size]
            rows, conts = [], []
            for i in group:
                _, ctx, cont = requests[i]
                if not cont:
                    raise InputError("a loglikelihood request has an empty continuation: nothing to score")
                whole = (ctx + cont)[-(self.max_length + 1):]  # the last max_length + 1 tokens
                rows.append(whole[:-1])
                conts.append(cont[-(len(whole) - 1):])  # the continuation's tokens the window predicts
            batch, mask = right_padded(rows)
            found_keys, logits = self.knnlm.encoder.forward(batch, mask, with_logits=True)
            for row, i in enumerate(group):
                n, m = len(rows[row]), len(conts[row])
                at = torch.arange(n - m, n)
                targets = torch.tensor(conts[row])
                # the continuation scored as the kNN-LM decodes it: following the store from its first token
                step, _ = self.knnlm.text_step(found_keys[row, at], logits[row, at], targets,
                                               pointers=self.knnlm.follower())
                chosen = step.log_probs[torch.arange(m), targets]
                answers[i] = (float(chosen.sum()), bool((step.log_probs.argmax(dim=-1) == targets).all()))
                self._store(keys[i], answers[i])
            bar.update(len(group))
        bar.close()
        return answers  # type: ignore[return-value]

    @torch.inference_mode()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        out = []
        window = min(self.max_length, SCORE_WINDOW)
        stride = min(SCORE_STRIDE, window * 3 // 4)
        for text in tqdm(texts, desc="knnstore loglikelihood_rolling", disable=disable_tqdm):
            key = self._key("loglikelihood_rolling", text)
            cached = self._cached(key)
            if cached is None:
                ids = [self.prefix_token_id] + self.tok_encode(text)
                total, previous, pointers = 0.0, None, self.knnlm.follower()
                if len(ids) > 1:
                    for win in scored_windows(self.knnlm.encoder, ids, window=window, stride=stride,
                                              batch_size=self.batch_size):
                        step, previous = self.knnlm.text_step(win.keys, win.logits, win.targets, previous,
                                                              pointers)
                        total += float(step.log_probs[torch.arange(len(win.targets)), win.targets].sum())
                cached = total
                self._store(key, cached)
            out.append(float(cached))
        return out

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        todo = [(i, *req.args) for i, req in enumerate(requests)]
        out: list[str | None] = [None] * len(todo)
        rows: list[tuple[int, Row, str | None]] = []
        for i, context, gen_kwargs in todo:
            row, deterministic = self._row(context, dict(gen_kwargs or {}))
            key = self._key("generate_until", [context, _jsonable(gen_kwargs)]) if deterministic else None
            cached = self._cached(key) if key else None
            if cached is not None:
                out[i] = cached
            else:
                rows.append((i, row, key))
        bar = tqdm(total=len(rows), desc="knnstore generate_until", disable=disable_tqdm or not rows)
        for lo in range(0, len(rows), self.batch_size):
            group = rows[lo:lo + self.batch_size]
            decode(self.knnlm, [row for _, row, _ in group])
            for i, row, key in group:
                out[i] = row.text
                if key:
                    self._store(key, row.text)
            bar.update(len(group))
        bar.close()
        return [text or "" for text in out]

    def _row(self, context: str, gen_kwargs: dict) -> tuple[Row, bool]:
        """The decoding row of one generate_until request, and whether its answer is
        deterministic (greedy), so cacheable."""
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(gen_kwargs.pop("max_gen_toks", 256))
        max_tokens = max(1, min(max_tokens, MAX_NEW_TOKENS, self.max_length - 1))
        do_sample = bool(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        greedy = not do_sample or temperature == 0.0
        ids = self.tok_encode(context, add_special_tokens=True) or [self.prefix_token_id]
        ids = ids[-(self.max_length - max_tokens):]
        row = Row(prompt_ids=ids, max_tokens=max_tokens, temperature=0.0 if greedy else min(temperature, 2.0),
                  top_p=float(gen_kwargs.pop("top_p", 1.0) or 1.0), stop=tuple(s for s in until if s))
        return row, greedy

    # --- the cache -----------------------------------------------------------------------

    def _state(self) -> str:
        """What decides every answer besides the request: the model, the store's version and
        content, the settings and the policy (hashed)."""
        lm = self.knnlm
        policy = lm.policy
        if policy is None:
            described = None
        elif hasattr(policy, "to_dict"):
            described = policy.to_dict()
        else:
            described = dataclasses.asdict(policy)
        mixing = {"sharp": adaptive.SHARP, "recognised": [adaptive.RECOGNISED_SPREAD, adaptive.RECOGNISED_LAMBDA]}
        state = {"format": CACHE_FORMAT, "knnstore": _version(), "mixing": mixing,
                 "model": lm.encoder.model_fingerprint(),
                 "store": str(lm.store.path), "version": lm.store.table.version, "content": lm.store.content(),
                 "settings": dataclasses.asdict(lm.settings), "policy": described}
        return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()

    def _key(self, kind: str, request) -> str:
        return hashlib.sha256(json.dumps([self.state, kind, request], default=str).encode()).hexdigest()

    def _cached(self, key: str | None):
        if self.cache is None or key is None:
            return None
        found = self.cache.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        if found is None:
            return None
        value = json.loads(found[0])
        return tuple(value) if isinstance(value, list) else value

    def _store(self, key: str, value) -> None:
        if self.cache is not None:
            with self.cache:
                self.cache.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (key, json.dumps(value)))


def _open_cache(cache: str | os.PathLike | None) -> sqlite3.Connection | None:
    if cache is None or str(cache).lower() in ("none", "false", "off", ""):
        return None
    path = cache_root() / "lm-eval.sqlite" if str(cache) == "auto" else Path(cache).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30)
        conn.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        return conn
    except (OSError, sqlite3.Error) as exc:
        raise InputError(f"cannot use {path} as the lm-eval cache ({exc}): give cache=PATH or cache=none") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("knnstore")
    except PackageNotFoundError:  # run from a checkout
        return "unknown"


def _device(device: str | None) -> str:
    """The harness's --device, where this machine has it: its default is "cuda:0" even where
    there is no GPU, so a CUDA device without one means "auto" here (said on stderr)."""
    if not device:
        return "auto"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        print(f"knnstore: no CUDA GPU here: running on the CPU instead of {device}", file=sys.stderr)
        return "auto"
    return str(device)


def _jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def main(argv: Sequence[str] | None = None) -> None:
    """``lm_eval``'s own command line with the ``knnstore`` model registered (importing this
    module registered it); ``--tasks-dir`` prints where knnstore's task files are."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--tasks-dir"]:
        print(task_dir())
        return
    from lm_eval.__main__ import cli_evaluate

    saved, sys.argv = sys.argv, ["lm_eval", *args]  # the harness parses sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
