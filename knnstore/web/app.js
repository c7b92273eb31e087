// knnstore's page: streams a kNN-LM completion with explanations from the server's own
// OpenAI-compatible API and shows where each token came from. No framework, no build
// step, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, tokens: new Map(), spans: [], selected: null };

function apiKey() { return localStorage.getItem("knnstore-api-key") || ""; }
$("api-key").addEventListener("change", (e) => { localStorage.setItem("knnstore-api-key", e.target.value); loadStore(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

async function api(path, body) {
  const res = await fetch(path, body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (res.status === 401) { $("key-box").hidden = false; }
  if (!res.ok) {
    let message = res.statusText;
    try { message = (await res.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(`${res.status}: ${message}`);
  }
  return res;
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function loadStore() {
  try {
    const info = await (await api("/v1/store")).json();
    const s = info.stats;
    state.model = s.model;
    $("model").textContent = `${s.model} · ${s.path}`;
    $("store").replaceChildren(el("p", { class: "muted" },
      `${s.pairs.toLocaleString()} pairs · ${s.documents.toLocaleString()} documents · ${bytes(s.bytes_on_disk)} · `,
      indexText(s.index)));
    const body = $("corpora").querySelector("tbody");
    body.replaceChildren(...info.corpora.map((c) => el("tr", {},
      el("td", {}, c.name + (c.status === "ready" ? "" : ` (${c.status})`)),
      el("td", { class: "num" }, c.documents.toLocaleString()),
      el("td", { class: "num" }, c.pairs.toLocaleString()),
      el("td", { class: "num" }, bytes(c.bytes)))));
  } catch (err) {
    $("store").replaceChildren(el("p", { class: "error" }, err.message));
  }
}

function indexText(index) {
  const found = index && index.indices ? index.indices.filter((i) => i.columns.includes("vector")) : [];
  if (!found.length) return "exact search (no ANN index)";
  const more = index.unindexed_rows ? `, ${index.unindexed_rows.toLocaleString()} rows not yet indexed` : "";
  return `ANN index ${found[0].type}${more}`;
}

function share(t) {
  // the part of the token's probability that came from the store: λ·p_kNN ÷ p
  if (!t.retrieved || t.p_knn === null || t.p <= 0) return 0;
  return Math.max(0, Math.min(1, (t.knn_weight * t.p_knn) / t.p));
}

function addToken(t) {
  const node = el("span", { class: "tok", "data-index": t.index, title: `p=${t.p.toFixed(3)} store share=${share(t).toFixed(2)}` }, t.text);
  node.style.backgroundColor = `rgba(var(--store), ${(0.55 * share(t)).toFixed(3)})`;
  node.addEventListener("click", () => showToken(t.index));
  state.tokens.set(t.index, { t, node });
  $("generated").append(node);
}

function markSpans(spans) {
  state.spans = spans;
  for (const s of spans) {
    for (let i = s.first; i <= s.last; i++) {
      const entry = state.tokens.get(i);
      if (entry) entry.node.classList.add("copied");
    }
  }
}

function passage(text) {
  // a snippet with its predicted next token marked [[like this]]
  const out = el("div", { class: "passage" });
  text.split(/\[\[([\s\S]*?)\]\]/).forEach((part, i) => out.append(i % 2 ? el("mark", {}, part) : part));
  return out;
}

function pairsLink(documentId) {
  const href = `/v1/store/documents/${documentId}/pairs`;
  return el("a", { href, onclick: (e) => { e.preventDefault(); showPairs(documentId); } }, "the document's pairs");
}

function showToken(index) {
  const entry = state.tokens.get(index);
  if (!entry) return;
  if (state.selected) state.selected.classList.remove("selected");
  state.selected = entry.node;
  entry.node.classList.add("selected");
  const t = entry.t;
  const cards = [];
  const span = state.spans.find((s) => s.first <= index && index <= s.last);
  if (span) {
    cards.push(el("div", { class: "card span-card" },
      el("h3", {}, `Follows ${span.corpus}: ${span.title || span.document} (positions ${span.start_position}–${span.end_position})`),
      passage(span.passage), el("p", { class: "muted" }, `${span.document} · `, pairsLink(span.document_id))));
  }
  const p = (x) => (x === null ? "–" : x.toFixed(3));
  cards.push(el("div", { class: "card" },
    el("h3", {}, `Token ${JSON.stringify(t.text)}`),
    el("p", { class: "muted" }, `p_LM ${p(t.p_lm)} · p_kNN ${p(t.p_knn)} · λ ${t.knn_weight.toFixed(3)} · p ${p(t.p)} · from the store ${(100 * share(t)).toFixed(0)}%`
      + (t.retrieved ? "" : " · the store was not searched here"))));
  for (const s of t.sources) {
    cards.push(el("div", { class: "card source" },
      el("h3", {}, `${s.corpus}: ${s.title || s.document}`),
      el("p", { class: "muted" }, `next token ${JSON.stringify(s.next_token_text)} · weight ${s.weight.toFixed(3)} · distance ${s.distance.toFixed(1)} · position ${s.position}`),
      passage(s.snippet),
      el("p", { class: "muted" }, `${s.document} · `, pairsLink(s.document_id))));
  }
  $("detail").replaceChildren(...cards);
}

async function showPairs(documentId) {
  try {
    const data = await (await api(`/v1/store/documents/${documentId}/pairs?limit=500`)).json();
    const d = data.document;
    const rows = data.pairs.map((r) => el("tr", {}, el("td", { class: "num" }, r.position), el("td", {}, JSON.stringify(r.token_text)), el("td", {}, JSON.stringify(r.next_token_text))));
    $("detail").replaceChildren(el("div", { class: "card pairs" },
      el("h3", {}, `${d.corpus}: ${d.title || d.source}`),
      el("p", { class: "muted" }, `${d.source} · ${d.n_pairs.toLocaleString()} pairs` + (data.pairs.length < d.n_pairs ? ` (first ${data.pairs.length} shown)` : "")),
      el("table", {}, el("thead", {}, el("tr", {}, el("th", { class: "num" }, "position"), el("th", {}, "token"), el("th", {}, "next token"))), el("tbody", {}, ...rows))));
  } catch (err) {
    $("detail").replaceChildren(el("p", { class: "error" }, err.message));
  }
}

function request(prompt) {
  const num = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const body = { model: state.model, stream: true, explain: true, sources: 5,
    max_tokens: num("max-tokens"), temperature: num("temperature"), lambda: num("lambda"), k: num("k") };
  if ($("adaptive").checked) body.adaptive = true;
  if ($("mode").value === "chat") return ["/v1/chat/completions", { ...body, messages: [{ role: "user", content: prompt }] }];
  return ["/v1/completions", { ...body, prompt }];
}

async function generate(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt.trim()) { $("status").textContent = "Write a prompt first."; return; }
  state.tokens.clear(); state.spans = []; state.selected = null;
  $("shown-prompt").textContent = $("mode").value === "chat" ? "" : prompt;
  $("generated").replaceChildren();
  $("detail").replaceChildren();
  $("go").disabled = true;
  $("status").textContent = "Generating…";
  const started = performance.now();
  let count = 0;
  try {
    if (!state.model) await loadStore();
    const [path, body] = request(prompt);
    const res = await api(path, body);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).replace(/^data: /, "");
        buffer = buffer.slice(cut + 2);
        if (line === "[DONE]") continue;
        const chunk = JSON.parse(line);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices[0];
        const knn = choice.knnstore || {};
        for (const t of knn.tokens || []) { addToken(t); count++; }
        if (knn.spans) markSpans(knn.spans);
        if (choice.finish_reason) {
          const secs = (performance.now() - started) / 1000;
          const read = (knn.read || []).map((p) => `${p.corpus}: ${p.title || p.document}`);
          $("status").textContent = `${count} tokens in ${secs.toFixed(1)} s · store searched at ${(100 * (knn.retrieved_fraction || 0)).toFixed(0)}% of steps · ${state.spans.length} copied passage(s)` +
            (read.length ? ` · read first: ${read.join("; ")}` : "") + ` · finish: ${choice.finish_reason}`;
        }
      }
    }
  } catch (err) {
    $("status").replaceChildren(el("span", { class: "error" }, err.message));
  } finally {
    $("go").disabled = false;
  }
}

$("ask").addEventListener("submit", generate);
$("api-key").value = apiKey();
loadStore();
