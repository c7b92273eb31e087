"""``knnstore serve``: a kNN-LM behind an OpenAI-compatible HTTP API, and a web page.

One process loads the model once and serves:

* ``POST /v1/completions`` and ``POST /v1/chat/completions`` (the model's chat template),
  with ``stream`` (server-sent events), ``max_tokens``, ``temperature``, ``top_p``,
  ``seed``, ``n`` and ``stop``; the kNN-LM's settings ride along as extra body fields
  (``lambda``, ``k``, ``knn_temperature``, ``adaptive``, ``exact``, ``explain``,
  ``sources``): a plain OpenAI client that sends none of them gets the server's defaults.
  With ``explain`` each choice carries ``knnstore.tokens`` (per token p_LM, p_kNN, λ and
  sources) and ``knnstore.spans`` (the stored passages the text follows).
* ``GET /v1/models``, ``GET /health``.
* Read-only store endpoints: ``GET /v1/store`` (stats and corpora), ``GET /v1/store/corpora``,
  ``GET /v1/store/documents?corpus=NAME``, ``GET /v1/store/documents/{id}/pairs``,
  ``POST /v1/store/sql`` (the same read-only sandbox as ``knnstore sql``). Nothing here
  writes to the store.
* ``GET /``: the page (``knnstore/web``), plain HTML/CSS/JS, nothing fetched from elsewhere.

The model runs on one worker thread (``Engine``): the key hook and the search are never
used by two requests at once. Requests wait in a bounded queue (full: 503) and those
with the same kNN settings are decoded together as one batch (``decoding.decode``).
Errors come back in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
with a 4xx status for anything the request got wrong.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime
import hmac
import json
import keyword
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import policies
from .adapter import KNNLM
from .config import KNNSettings, Setting, check_number, settings_of, value_type
from .decoding import Row, decode
from .errors import (
    CorpusNotFoundError,
    InputError,
    KnnstoreError,
    StoreChangedError,
    StoreDamagedError,
    first_line,
)
from .sql import SQLLimits, SQLSession
from .store import Store

log = logging.getLogger("knnstore.serve")

WEB = Path(__file__).parent / "web"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_CHOICES = 16  # n per request
MAX_ROWS = 64  # prompts × n per request
MAX_SQL_ROWS = 10_000
MAX_STOP_CHARS = 256  # a stop string (the text held back while streaming is as long)
MAX_BODY_BYTES = 4 * 2**20  # a request body (a prompt of ~1M characters)
MAX_REQUEST_TOKENS = 32_768  # tokens generated per request: max_tokens × prompts × n
REQUEST_TIMEOUT_S = 600.0  # a completion still decoding after this ends with an error
SERVED_SQL_TIMEOUT_S = 30.0  # a /v1/store/sql statement (then interrupted): tighter than `knnstore sql`'s
SERVED_SQL_MEMORY = "512MB"
SHUTDOWN_S = 5  # SIGTERM / SIGINT: open requests get this long, then are cut
REFRESH_S = 1.0  # how stale the served snapshot of the store may get
SLICE_S = 2.0  # a completion decodes this long before it pauses for a waiting request


# --- errors --------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def api_error(exc: BaseException) -> APIError:
    """What a failure of a request's work is answered with: the user's mistakes (a
    ``KnnstoreError``) are 400s; anything else is logged with its traceback and
    answered as a 500 with one line, never the traceback."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, CorpusNotFoundError):
        return APIError(404, str(exc), code="not_found")
    if isinstance(exc, StoreChangedError):
        return APIError(503, str(exc), "server_busy", code="store_changed")
    if isinstance(exc, KnnstoreError):
        return APIError(400, str(exc))
    log.exception("request failed", exc_info=exc)
    return APIError(500, f"internal error: {first_line(exc)}", "server_error")


# --- requests ------------------------------------------------------------------------


def _request_attribute(declared: Setting) -> str:
    """The Python name of a request field (``lambda`` is a keyword: ``lambda_``)."""
    return declared.request + "_" if keyword.iskeyword(declared.request) else declared.request


class _RequestFields(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)

    explain: bool = False
    sources: int = Field(3, ge=0, le=32)

    def overrides(self) -> dict:
        """The kNN settings the request gives (``KNNSettings`` field: value)."""
        given = {f.name: getattr(self, _request_attribute(declared))
                 for f, declared in settings_of(KNNSettings) if declared.request is not None}
        return {key: value for key, value in given.items() if value is not None}


# The kNN-LM's settings, as extra body fields of a completion request (unset: the server's
# defaults), one per ``KNNSettings`` field that declares a ``request`` name. ``temperature``
# is OpenAI's sampling temperature; the kNN distribution's is ``knn_temperature``. Types
# are strict: ``true`` is not a number, ``"5"`` not an integer.
KNNFields = create_model("KNNFields", __base__=_RequestFields, **{
    _request_attribute(declared): (value_type(f) | None, Field(None, alias=declared.request))
    for f, declared in settings_of(KNNSettings) if declared.request is not None})


class Sampling(KNNFields):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: str | list[str] | None = None
    logprobs: Any = None
    top_logprobs: Any = None

    def unsupported(self) -> None:
        """A 400 for OpenAI fields this server does not implement, rather than ignoring them."""
        for name in ("logprobs", "top_logprobs"):
            if getattr(self, name) not in (None, False, 0):
                raise APIError(400, f"{name} is not supported by knnstore serve: set \"explain\": true for each "
                                    "token's p_LM, p_kNN and λ (knnstore.tokens)", param=name, code="unsupported")

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop takes at most 4 non-empty strings of at most {MAX_STOP_CHARS} characters",
                           param="stop")
        return tuple(stops)


class CompletionRequest(Sampling):
    prompt: str | list[str]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class SQLRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    query: str
    max_rows: int = Field(1000, ge=1, le=MAX_SQL_ROWS)


# --- the model's worker ----------------------------------------------------------------


@dataclass
class Job:
    """One request's rows, decoded together (and with other jobs of the same settings)."""

    rows: list[Row]
    overrides: dict
    seed: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    deadline: float = field(default_factory=lambda: time.monotonic() + REQUEST_TIMEOUT_S)
    rng_state: Any = None  # a paused job with a seed: the random state it goes on from
    turns: int = 0  # turns on the engine so far (more than one: it was paused for others)

    @property
    def resumed(self) -> bool:
        """Whether it was paused to let others run (then it is decoded alone)."""
        return self.turns > 0

    @property
    def over(self) -> bool:
        """Whether it should stop decoding: its client left, or it ran past its deadline."""
        return self.cancelled or time.monotonic() > self.deadline

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.overrides.items()))

    def send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class QueueFull(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(503, f"the server is busy: {limit} requests are already waiting; retry shortly",
                         "server_busy", code="queue_full")


class Engine:
    """The model's one worker thread: jobs wait in a bounded queue; each turn takes the
    oldest and every waiting job with the same kNN settings (up to ``max_batch`` rows,
    jobs with a seed alone) and decodes them as one batch."""

    def __init__(self, lm: KNNLM, max_batch: int = 8, max_queue: int = 64) -> None:
        self.lm, self.max_batch, self.max_queue = lm, max_batch, max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="knnstore-engine", daemon=True)
        self._refreshed = 0.0
        self._policy_watch = policies.Watch(lm)  # whether the policy must be worked out again
        self.busy = False
        self.served_tokens = 0
        self.batched_rows_max = 0  # the most rows decoded together so far
        self._running: list[Job] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop taking work: waiting requests are answered 503, running ones end at their
        next step (as if their clients had gone)."""
        with self._cond:
            self._stopping = True
            waiting, self._pending = list(self._pending), collections.deque()
            self._cond.notify_all()
        for job in waiting + self._running:
            job.cancelled = True
        for job in waiting:
            job.send("error", APIError(503, "the server is shutting down", "server_busy", code="shutting_down"))
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(self.max_queue)
            self._pending.append(job)
            self._cond.notify()

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._pending.popleft()
            batch, rows = [first], len(first.rows)
            if first.seed is None and not first.resumed:
                for job in list(self._pending):
                    if (job.seed is None and not job.resumed and job.key == first.key
                            and rows + len(job.rows) <= self.max_batch):
                        self._pending.remove(job)
                        batch.append(job)
                        rows += len(job.rows)
            return batch

    def _requeue(self, jobs: list[Job]) -> None:
        """Paused jobs go back in line, after those that were waiting (sampling ones with
        their random state, so that a seed gives the same text however often it paused)."""
        state = torch.get_rng_state()
        with self._cond:
            for job in jobs:
                job.rng_state = state if job.seed is not None else None
                self._pending.append(job)
            self._cond.notify()

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            self.busy = True
            try:
                self._decode(batch)
            finally:
                self.busy = False

    def _decode(self, batch: list[Job]) -> None:
        live = [job for job in batch if not job.cancelled]
        if not live:
            return
        self._running = live
        try:
            if time.monotonic() - self._refreshed > REFRESH_S:  # corpora added, removed, compacted meanwhile
                self.lm.store.refresh()
                self._policy_watch.look()  # or calibrated by `knnstore calibrate`
                self._refreshed = time.monotonic()
            self._policy_watch.stale()  # its calibration may no longer fit: worked out again at the next step
            lm = self.lm.with_settings(**live[0].overrides) if live[0].overrides else self.lm
            owner = [(job, j) for job in live for j, r in enumerate(job.rows) if not r.done]
            rows = [job.rows[j] for job, j in owner]
            self.batched_rows_max = max(self.batched_rows_max, len(rows))
            before = sum(len(r.token_ids) for r in rows)

            def on_token(i: int, text: str, explained) -> None:
                job, j = owner[i]
                job.send("token", j, text, explained)

            seed = live[0].seed if not live[0].resumed else None
            if live[0].rng_state is not None:
                torch.set_rng_state(live[0].rng_state)
            started = time.monotonic()
            # another request waiting gets its turn after SLICE_S: this one goes on after it
            paused = decode(lm, rows, on_token, cancelled=lambda i: owner[i][0].over, seed=seed,
                            pause=lambda: bool(self._pending) and time.monotonic() - started > SLICE_S)
            self.served_tokens += sum(len(r.token_ids) for r in rows) - before
            for job in live:
                job.turns += 1
            if paused:
                self._requeue([job for job in live if not all(r.done for r in job.rows)])
            for job in live:
                if paused and not all(r.done for r in job.rows):
                    continue
                if job.over and not job.cancelled:
                    job.send("error", APIError(504, f"the completion ran past the server's limit of "
                                                    f"{REQUEST_TIMEOUT_S:g} s: ask for fewer tokens",
                                               "server_error", code="timeout"))
                else:
                    job.send("done")
        except BaseException as exc:  # noqa: BLE001  (every waiting request hears of it)
            if isinstance(exc, StoreChangedError):
                self._refreshed = 0.0  # follow the store before the next turn
            error = api_error(exc)
            for job in live:
                job.send("error", error)
        finally:
            self._running = []


# --- the app ----------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """A SQL result's values as JSON: bytes as hex, times as ISO 8601."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (datetime.date, datetime.time, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class BodyTooLarge(APIError):
    def __init__(self) -> None:
        super().__init__(413, f"the request body is over {MAX_BODY_BYTES // 2**20} MiB: send a shorter prompt",
                         code="body_too_large")


class BodyLimit:
    """ASGI middleware: a request body over ``MAX_BODY_BYTES`` is refused with a 413 before
    it is read (by its Content-Length) or as soon as it grows past it (a chunked one)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            response = BodyTooLarge().response() if length.isdigit() else APIError(
                400, "the Content-Length header is not a number").response()
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY_BYTES:
                    raise BodyTooLarge()
            return message

        await self.app(scope, counted, send)


def _read(row: Row) -> list[dict]:
    """The passages the model read before a row's prompt (``KNNLM.read``)."""
    return [p.to_dict() for p in row.reading.passages] if row.reading is not None else []


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Server:
    """The served model and store (``app`` is the ASGI application)."""

    def __init__(self, lm: KNNLM, reader: Store, *, api_key: str | None = None, max_batch: int = 8,
                 max_queue: int = 64, sql_timeout_s: float = SERVED_SQL_TIMEOUT_S) -> None:
        self.lm, self.reader, self.api_key = lm, reader, api_key
        self.sql_timeout_s = sql_timeout_s
        lm.calibrates = False  # no request writes: calibrations are made by `knnstore calibrate` or at start-up
        self.engine = Engine(lm, max_batch=max_batch, max_queue=max_queue)
        # prompts are tokenised here, off the event loop, one at a time (a tokenizer is not
        # safe to call from several threads at once)
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="knnstore-tokenize")
        self._sql_sessions: set[SQLSession] = set()  # running statements, interrupted at shutdown
        self.model_id = lm.store.identity.model
        self.store_name = Path(str(lm.store.path)).name
        self.created = int(time.time())
        self._read_lock = threading.Lock()  # the reader handle is one snapshot at a time
        self.app = self._build()

    # --- helpers ----------------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model not in (self.model_id, self.store_name):
            raise APIError(404, f"the model {model!r} is not served here: use {self.model_id!r} "
                                f"(GET /v1/models)", param="model", code="model_not_found")

    def _rows(self, prompts: list[list[int]], req: Sampling, max_tokens: int) -> list[Row]:
        rows, stop = [], req.stops()
        limit = getattr(self.lm.model.config, "max_position_embeddings", None)
        for ids in prompts:
            if limit and len(ids) + max_tokens > limit:
                raise APIError(400, f"the prompt ({len(ids):,} tokens) and max_tokens ({max_tokens:,}) exceed "
                                    f"the model's context of {limit:,} tokens: shorten one", param="max_tokens",
                               code="context_length_exceeded")
            for _ in range(req.n):
                rows.append(Row(prompt_ids=list(ids), max_tokens=max_tokens, temperature=req.temperature,
                                top_p=req.top_p, stop=stop, explain=req.explain, n_sources=req.sources))
        if len(rows) > MAX_ROWS:
            raise APIError(400, f"{len(rows)} choices asked for at once (prompts × n): at most {MAX_ROWS}", param="n")
        if len(rows) * max_tokens > MAX_REQUEST_TOKENS:
            raise APIError(400, f"max_tokens × prompts × n is {len(rows) * max_tokens:,} tokens: at most "
                                f"{MAX_REQUEST_TOKENS:,} per request; ask for fewer", param="max_tokens")
        return rows

    async def _tokenize(self, fn):
        """``fn()`` (tokenizing a prompt) on the tokenizer's thread: the event loop keeps
        answering (``/health`` above all) while a long prompt is tokenised."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn)

    def _job(self, rows: list[Row], req: Sampling) -> Job:
        overrides = req.overrides()
        if overrides:
            self.lm.with_settings(**overrides)  # checks the values now: a bad one is a 400
        job = Job(rows, overrides, req.seed, asyncio.get_running_loop())
        self.engine.submit(job)
        return job

    def _knn_info(self, row: Row, req: Sampling) -> dict:
        info: dict[str, Any] = {"retrieved_fraction": round(row.retrieved_fraction, 4), "read": _read(row)}
        if req.explain:
            info["tokens"] = [t.to_dict() for t in row.tokens]
            info["spans"] = [s.to_dict() for s in row.spans]
        return info

    async def _finish(self, job: Job) -> None:
        """Wait until the job is decoded (its token events are not needed: the rows hold it all)."""
        try:
            while True:
                event = await job.events.get()
                if event[0] == "done":
                    return
                if event[0] == "error":
                    raise event[1]
        finally:
            job.cancelled = True  # a client gone mid-way frees its rows

    def _stream(self, job: Job, chunk, req: Sampling, head: list[dict] | None = None) -> StreamingResponse:
        """Server-sent events: ``chunk(index, text, knn_info, finish_reason)`` per token and
        one per finished choice, then ``[DONE]``."""

        async def events():
            try:
                for item in head or []:
                    yield _sse(item)
                while True:
                    event = await job.events.get()
                    if event[0] == "token":
                        _, j, text, explained = event
                        info = {"tokens": [t.to_dict() for t in explained]} if explained else None
                        yield _sse(chunk(j, text, info, None))
                    elif event[0] == "done":
                        for j, row in enumerate(job.rows):
                            info = {"retrieved_fraction": round(row.retrieved_fraction, 4), "read": _read(row)}
                            if req.explain:
                                info["spans"] = [s.to_dict() for s in row.spans]
                            yield _sse(chunk(j, "", info, row.finish_reason))
                        break
                    else:
                        yield _sse(event[1].body())
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _usage(self, prompts: list[list[int]], rows: list[Row]) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion = sum(len(r.token_ids) for r in rows)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    # --- endpoints ----------------------------------------------------------------------

    async def completions(self, req: CompletionRequest):
        self.check_model(req.model)
        req.unsupported()
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts or any(not t for t in texts):
            raise APIError(400, "the prompt is empty: give at least one word", param="prompt")
        prompts = await self._tokenize(lambda: [self.lm.tokenizer(t)["input_ids"] for t in texts])
        rows = self._rows(prompts, req, req.max_tokens if req.max_tokens is not None else 16)
        job = self._job(rows, req)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def choice(j: int, text: str, info: dict | None, finish: str | None) -> dict:
            c = {"index": j, "text": text, "logprobs": None, "finish_reason": finish}
            if info is not None:
                c["knnstore"] = info
            return c

        if req.stream:
            return self._stream(job, lambda j, t, i, f: {
                "id": rid, "object": "text_completion", "created": created, "model": self.model_id,
                "choices": [choice(j, t, i, f)]}, req)
        await self._finish(job)
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_id,
                "choices": [choice(j, r.text, self._knn_info(r, req), r.finish_reason) for j, r in enumerate(rows)],
                "usage": self._usage(prompts, rows)}

    async def chat(self, req: ChatRequest):
        self.check_model(req.model)
        req.unsupported()
        tok = self.lm.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"{self.model_id} has no chat template: use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        ids = await self._tokenize(lambda: tok(tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"])
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        rows = self._rows([ids], req, limit if limit is not None else 256)
        job = self._job(rows, req)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(j: int, text: str, info: dict | None, finish: str | None) -> dict:
            c = {"index": j, "delta": {"content": text} if text or finish is None else {},
                 "logprobs": None, "finish_reason": finish}
            if info is not None:
                c["knnstore"] = info
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": self.model_id, "choices": [c]}

        if req.stream:
            head = [{"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_id,
                     "choices": [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]} for j in range(len(rows))]
            return self._stream(job, chunk, req, head)
        await self._finish(job)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_id,
                "choices": [{"index": j, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                             "finish_reason": r.finish_reason, "knnstore": self._knn_info(r, req)}
                            for j, r in enumerate(rows)],
                "usage": self._usage([ids], rows)}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": "knnstore", "store": str(self.lm.store.path)}]}

    def health(self):
        """``ok`` only while the store can be read (its catalog and the table it names, at
        their latest state); else a 503 whose ``error`` says why."""
        body = {"status": "ok", "model": self.model_id, "store": str(self.lm.store.path),
                "waiting": self.engine.waiting, "busy": self.engine.busy,
                "served_tokens": self.engine.served_tokens}
        try:
            self._read(lambda s: s.table.count())
        except Exception as exc:  # noqa: BLE001  (whatever it is, the store cannot be served)
            return JSONResponse({**body, "status": "unavailable", "error": first_line(exc)}, status_code=503)
        return body

    def _read(self, fn):
        with self._read_lock:
            self.reader.refresh()
            return fn(self.reader)

    def store_info(self) -> dict:
        return self._read(lambda s: {"stats": s.stats().to_dict(), "corpora": [c.to_dict() for c in s.corpora()],
                                     "settings": _jsonable(vars(self.lm.settings))})

    def corpora(self) -> list:
        return self._read(lambda s: [c.to_dict() for c in s.corpora()])

    def documents(self, corpus: str, offset: int, limit: int) -> dict:
        def read(s: Store) -> dict:
            docs = s.documents(corpus)
            return {"corpus": s.corpus(corpus).name, "total": len(docs), "documents": [
                {"id": d.id, "source": d.source, "title": d.title, "tokens": d.n_tokens, "pairs": d.n_pairs,
                 "sha256": d.sha256, "metadata": d.meta} for d in docs[offset:offset + limit]]}
        return self._read(read)

    def pairs(self, document_id: int, offset: int, limit: int) -> dict:
        query = ("SELECT pair_id, position, token, token_text, next_token, next_token_text FROM pairs "
                 f"WHERE document_id = {int(document_id)} ORDER BY position LIMIT {int(limit)} OFFSET {int(offset)}")
        doc_query = f"SELECT * FROM documents WHERE document_id = {int(document_id)}"

        def read(s: Store) -> dict:
            with s.sql_session() as session:
                doc = session.execute(doc_query).to_pylist()
                if not doc:
                    raise APIError(404, f"no ready document with id {document_id} in this store",
                                   param="document_id", code="document_not_found")
                rows = session.execute(query).to_pylist()
            return {"document": _jsonable(doc[0]), "offset": offset, "pairs": _jsonable(rows)}
        return self._read(read)

    async def sql(self, req: SQLRequest, request: Request) -> dict:
        """One statement on its own snapshot and thread, within ``sql_timeout_s``,
        ``req.max_rows`` and ``SERVED_SQL_MEMORY``; interrupted when its client leaves. Other
        endpoints never wait for it."""
        limits = SQLLimits(timeout_s=self.sql_timeout_s, max_rows=req.max_rows, memory=SERVED_SQL_MEMORY)
        try:
            result = await self._sql(req.query, limits, request)
        except StoreDamagedError:  # files replaced under it (a compaction, purge): once more, on the new state
            try:
                result = await self._sql(req.query, limits, request)
            except StoreDamagedError as exc:
                with self._read_lock:  # moved on since the snapshot it read: not damage
                    moved = self.reader.moved_on()
                raise StoreChangedError(str(exc)) if moved else exc from None
        rows = result.table.to_pylist()
        return {"columns": result.table.schema.names, "rows": [_jsonable(list(r.values())) for r in rows],
                "row_count": len(rows), "truncated": result.truncated}

    async def _sql(self, query: str, limits: SQLLimits, request: Request):
        views = await asyncio.to_thread(self._read, lambda s: s.sql_views())
        session = await asyncio.to_thread(SQLSession, views, limits)
        self._sql_sessions.add(session)
        try:
            task = asyncio.ensure_future(asyncio.to_thread(session.run, query))
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    session.interrupt(timed_out=False)
            return task.result()
        finally:
            self._sql_sessions.discard(session)
            session.close()

    def interrupt_sql(self) -> None:
        """Stop every SQL statement running now (their requests answer 400 "cancelled")."""
        for session in list(self._sql_sessions):
            session.interrupt(timed_out=False)

    def _shutdown(self) -> None:
        """Stop everything running: decoding (``Engine.stop``), SQL statements, tokenizing."""
        self.interrupt_sql()
        self.engine.stop()
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    # --- wiring ---------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lifespan(_app):
            self.engine.start()
            try:
                yield
            finally:
                self._shutdown()

        app = FastAPI(title="knnstore", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(BodyLimit)

        @app.middleware("http")
        async def guard(request: Request, call_next):
            if self.api_key and not (request.url.path == "/" or request.url.path.startswith("/static/")):
                given = request.headers.get("authorization", "")
                token = given[7:] if given.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                    return APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the "
                                         "key the server was started with", code="invalid_api_key").response()
            response = await call_next(request)
            response.headers["Content-Security-Policy"] = "default-src 'self'; img-src 'self' data:"
            response.headers["X-Content-Type-Options"] = "nosniff"
            return response

        @app.exception_handler(APIError)
        async def on_api_error(_request, exc: APIError):
            return exc.response()

        @app.exception_handler(KnnstoreError)
        async def on_knnstore_error(_request, exc: KnnstoreError):
            return api_error(exc).response()

        @app.exception_handler(RequestValidationError)
        async def on_invalid(_request, exc: RequestValidationError):
            first = exc.errors()[0] if exc.errors() else {}
            if first.get("type") == "json_invalid":
                return APIError(400, "the body is not valid JSON: send a JSON object").response()
            where = [str(p) for p in first.get("loc", ()) if p != "body"]
            message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid request')}"
            return APIError(400, message, param=".".join(where) or None).response()

        @app.exception_handler(StarletteHTTPException)
        async def on_http(_request, exc: StarletteHTTPException):
            if isinstance(exc.__cause__, APIError):  # raised while the body was read (BodyTooLarge)
                return exc.__cause__.response()
            return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
                            ).response()

        @app.exception_handler(Exception)
        async def on_other(_request, exc: Exception):
            return api_error(exc).response()

        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat)
        app.get("/v1/models")(self.models)
        app.get("/health")(self.health)
        app.get("/v1/store")(self.store_info)
        app.get("/v1/store/corpora")(self.corpora)

        @app.get("/v1/store/documents")
        def documents(corpus: str, offset: int = 0, limit: int = 100):
            _page(offset, limit)
            return self.documents(corpus, offset, limit)

        @app.get("/v1/store/documents/{document_id}/pairs")
        def pairs(document_id: int, offset: int = 0, limit: int = 200):
            _page(offset, limit)
            return self.pairs(document_id, offset, limit)

        app.post("/v1/store/sql")(self.sql)

        @app.get("/")
        def page():
            return FileResponse(WEB / "index.html")

        @app.get("/static/{name}")
        def static(name: str):
            path = WEB / name
            if "/" in name or name.startswith(".") or not path.is_file():
                raise APIError(404, f"no file {name!r}", code="not_found")
            return FileResponse(path)

        return app


def _page(offset: int, limit: int) -> None:
    """A page of rows asked for, checked like every other number (``check_number``): a 400
    naming the parameter where it is out of range."""
    for name, value, lo, hi in (("offset", offset, 0, None), ("limit", limit, 1, MAX_SQL_ROWS)):
        try:
            check_number(name, value, lo, hi, integer=True)
        except InputError as exc:
            raise APIError(400, str(exc), param=name) from None


def check_address(host: str, port: int, api_key: str | None) -> None:
    """Before the model loads: only loopback without an API key (anything else could be
    reached from outside), a key that is not blank, and an address this process can
    listen on now (a port in use or an address not of this machine is refused in one line)."""
    import socket

    if api_key is not None and not api_key.strip():
        raise InputError("the API key is empty: give a secret string with --api-key (or KNNSTORE_API_KEY)")
    if host not in LOOPBACK and not api_key:
        raise InputError(f"refusing to serve on {host or '(empty)'} without an API key: give --api-key KEY (or set "
                         f"KNNSTORE_API_KEY), or bind to 127.0.0.1")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port} ({first_line(exc)}): choose another --port or --host") from None


def serve(lm: KNNLM, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_queue: int = 64, log_level: str = "info") -> None:
    """Serve ``lm`` until interrupted (``knnstore serve``)."""
    import uvicorn

    check_address(host, port, api_key)
    reader = Store.open(lm.store.location)  # the read-only endpoints' own handle: no model, own snapshot
    server = Server(lm, reader, api_key=api_key, max_batch=max_batch, max_queue=max_queue)
    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM / SIGINT: running SQL stops now, not after the grace
            server.interrupt_sql()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(server.app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=SHUTDOWN_S)
    try:
        Uvicorn(config).run()
    finally:
        reader.close()
