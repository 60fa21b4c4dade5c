// LoRA Land: the adapters with their scores, an adapter's answer beside the base model's (both streamed from
// /v1/completions), and a live panel from /metrics. Plain JavaScript, no build step, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { base: null, adapters: [], selected: null, lastMetrics: null };

$("api-key").value = localStorage.getItem("lorax-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("lorax-api-key", $("api-key").value);
  refresh();
});

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `Error ${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (_) {
    return `Error ${response.status}: ${response.statusText}`;
  }
}

function showPageError(message) {
  $("page-error").textContent = message || "";
  $("page-error").hidden = !message;
}

// --- the adapter list -----------------------------------------------------------------------------------------
let refreshes = 0;  // refreshes started; an answer to an older one than the last is dropped (it may be stale)

async function refresh() {
  const ticket = ++refreshes;
  const response = await fetch("/ui/adapters", { headers: headers() });
  const data = response.ok ? await response.json() : null;
  const message = response.ok ? "" : await errorMessage(response);
  if (ticket !== refreshes) return;
  showPageError(message);
  if (!data) return;
  state.base = data.base;
  state.adapters = data.adapters;
  $("base-name").textContent = data.base;
  renderAdapters();
}

function score(value, better) {
  if (value === null || value === undefined) return "–";
  return `<span class="${better ? "better" : ""}">${value.toFixed(1)}</span>`;
}

// Rows are kept and updated in place, keyed by adapter name: the list refreshes every few seconds, and a row that
// was rebuilt under the pointer would lose the click a person (or a browser test) was making on it.
function renderAdapters() {
  const body = $("adapters").querySelector("tbody");
  const old = new Map([...body.children].map((row) => [row.dataset.name, row]));
  state.adapters.forEach((a, i) => {
    let row = old.get(a.name);
    old.delete(a.name);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.name = a.name;
      for (let c = 0; c < 6; c++) row.appendChild(document.createElement("td"));
      row.addEventListener("click", () => select(a.name));
    }
    row.classList.toggle("selected", a.name === state.selected);
    const better = a.adapter_score !== null && a.base_score !== null && a.adapter_score > a.base_score;
    const cells = row.children;
    cells[0].textContent = a.name;
    cells[1].textContent = a.task || "";
    cells[2].textContent = a.rank;
    cells[3].innerHTML = `<span class="state state-${a.state}">${a.state}</span>`;
    cells[4].innerHTML = score(a.adapter_score, better);
    cells[5].innerHTML = score(a.base_score, false);
    if (body.children[i] !== row) body.insertBefore(row, body.children[i] || null);
  });
  for (const row of old.values()) row.remove();  // adapters that are no longer served
}

function select(name) {
  state.selected = name;
  const adapter = state.adapters.find((a) => a.name === name);
  $("selected-name").textContent = name;
  $("adapter-caption").textContent = name;
  $("send").disabled = false;
  const examples = $("examples");
  examples.replaceChildren();
  for (const prompt of (adapter && adapter.examples) || []) {
    const button = document.createElement("button");
    button.className = "example";
    button.textContent = prompt;
    button.title = "use this example prompt";
    button.addEventListener("click", () => { $("prompt").value = prompt; });
    examples.appendChild(button);
  }
  renderAdapters();
}

// --- asking: the adapter and the base, streamed side by side -----------------------------------------------------
function settings() {
  const params = {
    max_tokens: parseInt($("max-tokens").value, 10),
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top-p").value),
  };
  if ($("seed").value !== "") params.seed = parseInt($("seed").value, 10);
  return params;
}

async function stream(model, prompt, pane, finish) {
  pane.textContent = "";
  pane.dataset.state = "streaming";
  pane.dataset.chunks = "0";
  finish.textContent = "";
  let response;
  try {
    response = await fetch("/v1/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model, prompt, stream: true, ...settings() }),
    });
  } catch (err) {
    pane.textContent = `Error: the server cannot be reached (${err.message})`;
    pane.dataset.state = "error";
    return;
  }
  if (!response.ok) {
    pane.textContent = await errorMessage(response);
    pane.dataset.state = "error";
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut).replace(/^data: /, "");
      buffer = buffer.slice(cut + 2);
      if (event === "[DONE]") {
        if (pane.dataset.state === "streaming") pane.dataset.state = "done";
        return;
      }
      const chunk = JSON.parse(event);
      if (chunk.error) {
        pane.textContent += `\nError: ${chunk.error.message}`;
        pane.dataset.state = "error";
        continue;
      }
      const choice = chunk.choices[0];
      if (!choice) continue;
      pane.textContent += choice.text;
      pane.dataset.chunks = String(Number(pane.dataset.chunks) + 1);
      if (choice.finish_reason) finish.textContent = `(${choice.finish_reason})`;
    }
  }
  if (pane.dataset.state === "streaming") pane.dataset.state = "done";
}

$("send").addEventListener("click", async () => {
  const prompt = $("prompt").value;
  $("send").disabled = true;
  try {
    await Promise.all([
      stream(state.selected, prompt, $("adapter-answer"), $("adapter-finish")),
      stream(state.base, prompt, $("base-answer"), $("base-finish")),
    ]);
  } finally {
    $("send").disabled = false;
    refresh();  // the adapter's state changed (loaded to the device)
  }
});

// --- the live panel ---------------------------------------------------------------------------------------------
function parseMetrics(text) {
  // Prometheus text format: `name{label="value",...} number`; returns [{name, labels, value}]
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    samples.push({ name: match[1], labels, value: parseFloat(match[3]) });
  }
  return samples;
}

async function pollMetrics() {
  const response = await fetch("/metrics", { headers: headers() });
  if (!response.ok) return;
  const samples = parseMetrics(await response.text());
  const now = performance.now() / 1000;
  const perModel = {};
  const model = (name) => (perModel[name] ??= { requests: 0, tokens: 0, queueSum: 0, queueCount: 0 });
  const gauges = {};
  for (const s of samples) {
    const m = s.labels.model;
    if (s.name === "lorax_requests_total") model(m).requests += s.value;
    else if (s.name === "lorax_generation_tokens_total") model(m).tokens = s.value;
    else if (s.name === "lorax_queue_seconds_sum") model(m).queueSum = s.value;
    else if (s.name === "lorax_queue_seconds_count") model(m).queueCount = s.value;
    else if (!m) gauges[s.name] = s.value;
  }
  $("m-running").textContent = gauges.lorax_requests_running ?? 0;
  $("m-waiting").textContent = gauges.lorax_requests_waiting ?? 0;
  $("m-device").textContent = gauges.lorax_adapters_on_device ?? 0;
  const last = state.lastMetrics;
  const body = $("metrics").querySelector("tbody");
  body.replaceChildren();
  for (const [name, m] of Object.entries(perModel).sort()) {
    const before = last && last.perModel[name];
    const rate = before ? (m.tokens - before.tokens) / Math.max(now - last.time, 1e-3) : 0;
    const row = document.createElement("tr");
    row.innerHTML = `<td></td><td>${m.requests}</td><td>${rate.toFixed(1)}</td>` +
      `<td>${m.queueCount ? ((1000 * m.queueSum) / m.queueCount).toFixed(1) : "–"}</td><td>${m.tokens}</td>`;
    row.children[0].textContent = name;
    body.appendChild(row);
  }
  state.lastMetrics = { time: now, perModel };
}

refresh();
pollMetrics();
setInterval(pollMetrics, 2000);
setInterval(refresh, 5000);  // adapter states change as requests come and go
