"""knnstore serve: the official OpenAI client against the server on 127.0.0.1 (a tiny
random-weight model over a real store), the read-only store endpoints, errors, auth,
concurrency and the bounded queue; the CLI's refusals; the real default model's chat."""

from __future__ import annotations

import concurrent.futures
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from knnstore import Store
from knnstore.decoding import Row, decode
from knnstore.server import Engine, QueueFull, Server

from .conftest import changed, snapshot
from .servers import free_port, serve_app, wait_for_port

PROMPT = "The European lobster"


@pytest.fixture(scope="module")
def server(built):
    lm, path = built
    reader = Store.open(path)
    srv = Server(lm, reader, max_batch=8, max_queue=64)
    for url in serve_app(srv.app):
        srv.url = url
        yield srv
    reader.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def reference(lm, prompt: str, n: int) -> str:
    """The adapter's own greedy continuation (KNNLM.generate), decoded text."""
    return lm.generate(prompt, max_new_tokens=n).text


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model_id]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == server.model_id


def test_completion_matches_the_adapter(server, client, built):
    lm, _ = built
    r = client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == reference(lm, PROMPT, 12)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(lm.tokenizer(PROMPT)["input_ids"])


def test_stream_gives_the_same_text(server, client):
    whole = client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_uses_the_template(server, client, built):
    lm, _ = built
    r = client.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=6, temperature=0)
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                              tokenize=False)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    row = Row(prompt_ids=lm.tokenizer(prompt, add_special_tokens=False)["input_ids"], max_tokens=6, temperature=0)
    decode(lm, [row])
    assert r.choices[0].message.content == row.text
    stream = client.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == row.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_explain_extras(server, client):
    r = client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"explain": True, "sources": 2, "lambda": 0.6, "k": 16})
    knn = r.choices[0].model_extra["knnstore"]
    assert len(knn["tokens"]) == 12
    assert "".join(t["text"] for t in knn["tokens"]) == r.choices[0].text
    t = knn["tokens"][0]
    assert {"p_lm", "p_knn", "p", "knn_weight", "sources", "retrieved"} <= set(t)
    assert t["knn_weight"] == pytest.approx(0.6)
    assert t["p"] == pytest.approx(0.4 * t["p_lm"] + 0.6 * t["p_knn"], rel=1e-4)
    assert 1 <= len(t["sources"]) <= 2 and t["sources"][0]["corpus"] in ("a", "b")
    assert t["sources"][0]["snippet"] and t["sources"][0]["document"]
    assert knn["spans"], "the tiny store's repeated text is copied token after token"
    span = knn["spans"][0]
    assert span["passage"] and span["last"] > span["first"]
    # the stream carries the same explanations, token by token, and the spans at the end
    chunks = list(client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, extra_body={"explain": True, "sources": 2,
                                                                     "lambda": 0.6, "k": 16}))
    streamed = [t for c in chunks for t in (c.choices[0].model_extra.get("knnstore") or {}).get("tokens", [])]
    assert [t["token"] for t in streamed] == [t["token"] for t in knn["tokens"]]
    assert chunks[-1].choices[0].model_extra["knnstore"]["spans"] == knn["spans"]


def test_lambda_zero_is_the_plain_model(server, client, built):
    lm, _ = built
    r = client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"lambda": 0.0, "explain": True})
    assert r.choices[0].text == lm.with_settings(lambda_=0.0).generate(PROMPT, max_new_tokens=8).text
    assert not any(t["retrieved"] for t in r.choices[0].model_extra["knnstore"]["tokens"])


def test_seed_n_and_stop(server, client):
    kwargs = dict(model=server.model_id, prompt=PROMPT, max_tokens=10, temperature=1.0, top_p=0.9, n=3, seed=7)
    a, b = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    greedy = client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=12, temperature=0)
    text = greedy.choices[0].text
    stop = text[4:6]
    r = client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_concurrent_requests_do_not_mix(server, client, built):
    lm, _ = built
    prompts = ["The European lobster", "Other 1: a cat", "Doc 3", "lobsters are"]
    expected = {p: reference(lm, p, 9) for p in prompts}
    before = server.engine.batched_rows_max
    jobs = [prompts[i % len(prompts)] for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: client.completions.create(
            model=server.model_id, prompt=p, max_tokens=9, temperature=0).choices[0].text, jobs))
    assert got == [expected[p] for p in jobs]
    assert max(before, server.engine.batched_rows_max) > 1, "concurrent requests were never batched"


def test_errors_have_openais_shape(server, client):
    def error(status, **kwargs):
        r = httpx.post(server.url + "/v1/completions", **kwargs)
        assert r.status_code == status, r.text
        body = r.json()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["message"]
        assert "Traceback" not in r.text
        return body

    base = {"model": server.model_id, "prompt": PROMPT}
    assert error(404, json={**base, "model": "gpt-4"})["code"] == "model_not_found"
    assert "temperature" in error(400, json={**base, "temperature": 9})["message"]
    assert "k must be" in error(400, json={**base, "k": 0})["message"]
    assert "lambda" in error(400, json={**base, "lambda": 2})["message"]
    assert "empty" in error(400, json={**base, "prompt": ""})["message"]
    assert "max_tokens" in error(400, json={**base, "max_tokens": 0})["message"]
    assert error(400, json={**base, "max_tokens": 10_000})["code"] == "context_length_exceeded"
    assert "JSON" in error(400, content=b"{not json", headers={"content-type": "application/json"})["message"]
    assert error(400, json={"prompt": PROMPT})["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model_id, prompt=PROMPT, n=100)
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_store_endpoints_are_read_only(server, built):
    lm, path = built
    before = snapshot(path)
    info = httpx.get(server.url + "/v1/store").json()
    assert info["stats"]["pairs"] == lm.store.stats().pairs
    assert [c["name"] for c in info["corpora"]] == ["a", "b"]
    docs = httpx.get(server.url + "/v1/store/documents", params={"corpus": "b"}).json()
    assert docs["total"] == 3 and docs["documents"][0]["title"]
    doc = docs["documents"][0]
    pairs = httpx.get(server.url + f"/v1/store/documents/{doc['id']}/pairs", params={"limit": 5}).json()
    assert [p["position"] for p in pairs["pairs"]] == [0, 1, 2, 3, 4]
    assert pairs["document"]["source"] == doc["source"]
    assert httpx.get(server.url + "/v1/store/documents/999999/pairs").status_code == 404
    for params, param in (({"offset": -1}, "offset"), ({"limit": 0}, "limit"), ({"limit": 10**6}, "limit")):
        r = httpx.get(server.url + f"/v1/store/documents/{doc['id']}/pairs", params=params)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert httpx.get(server.url + "/v1/store/documents", params={"corpus": "zzz"}).status_code == 404
    sql = httpx.post(server.url + "/v1/store/sql",
                     json={"query": "SELECT corpus, count(*) AS n FROM pairs GROUP BY corpus ORDER BY corpus"}).json()
    assert sql["columns"] == ["corpus", "n"] and [r[0] for r in sql["rows"]] == ["a", "b"]
    for query in ("DELETE FROM pairs", "DROP VIEW pairs", "COPY pairs TO '/tmp/x.csv'"):
        r = httpx.post(server.url + "/v1/store/sql", json={"query": query})
        assert r.status_code == 400 and r.json()["error"]["message"]
    for method, route in (("POST", "/v1/store"), ("DELETE", "/v1/store/corpora"), ("PUT", "/v1/store/sql")):
        assert httpx.request(method, server.url + route).status_code in (404, 405)
    assert changed(path, before) == set()


def test_page_is_served_whole(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<textarea" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert httpx.get(server.url + f"/static/{name}").status_code == 200
        assert "http://" not in httpx.get(server.url + f"/static/{name}").text.replace("http://127.0.0.1", "")
    assert "https://" not in page.text and "http://" not in page.text  # nothing from elsewhere
    assert httpx.get(server.url + "/static/..%2Fserver.py").status_code == 404


def test_queue_full_is_a_503(built):
    lm, path = built
    engine = Engine(lm, max_queue=2)  # not started: nothing leaves the queue
    job = lambda: type("J", (), {"rows": [], "seed": None, "key": ()})()  # noqa: E731
    engine.submit(job())
    engine.submit(job())
    with pytest.raises(QueueFull) as info:
        engine.submit(job())
    assert info.value.status == 503
    # over HTTP: a long request keeps the worker busy, one waits, the next is refused
    reader = Store.open(path)
    srv = Server(lm, reader, max_queue=1)
    for url in serve_app(srv.app):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        long = threading.Thread(target=lambda: c.completions.create(
            model=srv.model_id, prompt=PROMPT, max_tokens=200, temperature=0))
        long.start()
        while not srv.engine.busy:
            time.sleep(0.005)
        waiting = threading.Thread(target=lambda: c.completions.create(
            model=srv.model_id, prompt=PROMPT, max_tokens=5, temperature=0))
        waiting.start()
        while srv.engine.waiting < 1:
            time.sleep(0.005)
        with pytest.raises(openai.InternalServerError) as refused:
            c.completions.create(model=srv.model_id, prompt=PROMPT, max_tokens=5)
        assert refused.value.status_code == 503 and refused.value.body["code"] == "queue_full"
        long.join()
        waiting.join()
    reader.close()


def test_api_key(built):
    lm, path = built
    reader = Store.open(path)
    srv = Server(lm, reader, api_key="s3cret")
    for url in serve_app(srv.app):
        for route in ("/health", "/v1/models", "/v1/store"):
            r = httpx.get(url + route)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(url + route, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(url + route, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model=srv.model_id, prompt=PROMPT, max_tokens=3).choices[0].text is not None
        assert httpx.get(url + "/").status_code == 200  # the page holds no data; its calls need the key
    reader.close()


def test_cli_refuses_a_public_address_without_a_key_and_a_busy_port(built):
    _, path = built
    r = subprocess.run([sys.executable, "-m", "knnstore", "serve", str(path), "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "--api-key" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "knnstore", "serve", str(path), "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_real_model_served_by_the_cli(tmp_path):
    """`knnstore serve` in its own process with the default model: chat through the
    official client, and the page's completion with sources."""
    store = tmp_path / "store"
    text = tmp_path / "doc.txt"
    text.write_text("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
                    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
                    "from 1887 to 1889. ")
    run = lambda *a: subprocess.run([sys.executable, "-m", "knnstore", *a], check=True,  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    run("init", str(store))
    run("add-corpus", str(store), "eiffel", str(text))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "knnstore", "serve", str(store), "--port", str(port), "--exact"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, timeout_s=300)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        model = c.models.list().data[0].id
        assert model == "smollm2-135m"
        chat = c.chat.completions.create(model=model, max_tokens=12, temperature=0,
                                         messages=[{"role": "user", "content": "Say hello."}])
        assert chat.choices[0].message.content.strip()
        r = c.completions.create(model=model, prompt="The Eiffel Tower is named after the engineer", max_tokens=6,
                                 temperature=0, extra_body={"explain": True})
        knn = r.choices[0].model_extra["knnstore"]
        assert "Gustave" in r.choices[0].text
        assert any(s["corpus"] == "eiffel" for t in knn["tokens"] for s in t["sources"])
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert "Traceback" not in out


# --- generated bad values for every request field (issue 31) ---------------------------

def _bad_values(annotation) -> list:
    """Values of the wrong type, out of any range and huge, from a field's annotation."""
    import typing

    args = set(typing.get_args(annotation)) or {annotation}
    args.discard(type(None))
    huge = "x" * 2_000_000
    if args <= {int}:
        return ["3", 2.5, True, -10**20, 10**20, [1]]
    if args <= {float}:
        return ["0.5", True, -1e308, 1e308, [0.5], {"v": 1}]
    if args <= {bool}:
        return ["true", 2, 0.5, [True]]
    if args <= {str}:
        return [5, ["a"], {"a": 1}, True]
    return [5, True, {"a": 1}, [5], [huge[:10], 3], huge]  # unions of strings and lists (prompt, stop)


def _cases():
    from knnstore.server import ChatRequest, CompletionRequest

    for route, model in (("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatRequest)):
        for name, info in model.model_fields.items():
            key = info.alias or name
            if name in ("logprobs", "top_logprobs"):
                values = [True, 5, "yes"]
            elif name == "messages":
                values = [[], "hi", [{"role": "robot", "content": "x"}], [{"role": "user"}], [5]]
            elif name == "model":
                values = [5, None, "x" * 100_000]
            else:
                values = _bad_values(info.annotation)
            for value in values:
                yield route, key, value


def test_every_request_field_refuses_bad_values_in_openais_shape(server, built):
    _, path = built
    before = snapshot(path)
    base = {"/v1/completions": {"model": server.model_id, "prompt": PROMPT, "max_tokens": 2},
            "/v1/chat/completions": {"model": server.model_id, "messages": [{"role": "user", "content": PROMPT}],
                                     "max_tokens": 2}}
    seen = 0
    for route, key, value in _cases():
        body = {**base[route], key: value}
        r = httpx.post(server.url + route, json=body, timeout=60)
        assert 400 <= r.status_code < 500, (route, key, str(value)[:40], r.status_code, r.text[:200])
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (key, error)
        seen += 1
    for route, body in base.items():  # each required field missing
        for key in body:
            if key != "max_tokens":
                r = httpx.post(server.url + route, json={k: v for k, v in body.items() if k != key})
                assert r.status_code == 400 and r.json()["error"]["param"] == key, (route, key, r.text)
    assert seen > 100
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert changed(path, before) == set()


def test_a_paused_decoding_goes_on_exactly_as_one_call(built):
    """``decode`` paused every few steps and resumed gives the same tokens as one call:
    greedy, and sampling with a seed (the random state carried), on the adaptive default."""
    import torch

    lm, _ = built
    adaptive = lm.with_settings(adaptive=True, lambda_=0.25)
    for temperature, seed in ((0.0, None), (1.0, 7)):
        ids = lm.tokenizer(PROMPT)["input_ids"]
        whole = Row(prompt_ids=list(ids), max_tokens=24, temperature=temperature, explain=True)
        decode(adaptive, [whole], seed=seed)
        parts = Row(prompt_ids=list(ids), max_tokens=24, temperature=temperature, explain=True)
        steps = {"n": 0}

        def pause() -> bool:
            steps["n"] += 1
            return steps["n"] % 5 == 0

        calls, state = 0, None
        while True:
            if state is not None:
                torch.set_rng_state(state)
            paused = decode(adaptive, [parts], seed=seed if calls == 0 else None, pause=pause)
            calls += 1
            state = torch.get_rng_state()
            if not paused:
                break
        assert calls >= 3
        assert parts.token_ids == whole.token_ids and parts.text == whole.text
        assert parts.finish_reason == whole.finish_reason
        assert [t.token for t in parts.tokens] == [t.token for t in whole.tokens]
        # λ, as the resumed step saw the trail (a re-read prompt differs in float rounding only)
        assert max(abs(a.knn_weight - b.knn_weight) for a, b in zip(parts.tokens, whole.tokens)) < 1e-3


def test_a_long_completion_lets_short_ones_through(server, monkeypatch):
    """One long completion no longer holds the engine: a short request sent after it is
    answered long before it ends, and the long one's text is what it would have been alone."""
    import knnstore.server as served

    monkeypatch.setattr(served, "SLICE_S", 0.2)
    body = {"model": server.model_id, "prompt": PROMPT, "temperature": 0}
    alone = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 200}, timeout=120).json()
    done = {}

    def long():
        done["long"] = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 200}, timeout=120)
        done["long_at"] = time.monotonic()

    thread = threading.Thread(target=long)
    thread.start()
    time.sleep(0.5)
    short = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=120)
    short_at = time.monotonic()
    thread.join()
    assert short.status_code == 200 and short_at < done["long_at"]
    assert done["long"].json()["choices"][0]["text"] == alone["choices"][0]["text"]
