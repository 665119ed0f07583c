// The ForgeLLM console: the server's state, polled, and a playground over the OpenAI-compatible API.
// Everything the server or the model says is put into the page as text (textContent), never as HTML.
"use strict";

const KEY_STORAGE = "forgellm-console-key";
const POLL_MS = 2000;
// The console lives at <root>/console; the API is under the same root (a reverse proxy's --root-path).
const ROOT = location.pathname.replace(/\/console\/?$/, "");
const $ = (id) => document.getElementById(id);

let pollTimer = null;
let running = null; // the AbortController of the playground's request in flight

function key() {
  return sessionStorage.getItem(KEY_STORAGE);
}

function headers(extra = {}) {
  const found = key();
  return found ? { ...extra, Authorization: `Bearer ${found}` } : extra;
}

class Unauthenticated extends Error {}

async function api(path, options = {}) {
  const response = await fetch(ROOT + path, { ...options, headers: headers(options.headers || {}) });
  if (response.status === 401) throw new Unauthenticated();
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = typeof body.error === "string" ? body.error : body.error?.message;
    throw new Error(message || `HTTP ${response.status}`);
  }
  return body;
}

function element(tag, text, className) {
  const made = document.createElement(tag);
  if (text !== undefined && text !== null) made.textContent = String(text);
  if (className) made.className = className;
  return made;
}

function bytes(value) {
  if (!value) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let size = value;
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return `${size.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

// -- sign-in -------------------------------------------------------------------------------------

function showLogin(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("forget-key").hidden = true;
  $("login-error").textContent = message || "";
  $("summary").textContent = "sign in to continue";
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("key").value.trim());
  $("key").value = "";
  refresh();
});

$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  showLogin("");
});

// -- state ---------------------------------------------------------------------------------------

function modelState(model) {
  if (model.state === "loading") return ["loading" + (model.progress ? `: ${model.progress}` : ""), "state-loading"];
  if (model.state === "loaded") return ["loaded", "state-loaded"];
  if (model.state === "failed") return [`failed: ${model.error}`, "state-failed"];
  return ["no model", ""];
}

function kvCache(kv) {
  if (!kv.bytes_per_token) return "–";
  const rate = (tier) => (tier.hit_rate === null ? "no lookups" : `${Math.round(100 * tier.hit_rate)}% hits`);
  const tier = (name, t) => `${name} ${bytes(t.bytes)} in ${t.entries}, ${rate(t)}`;
  return [
    `${bytes(kv.bytes_per_token)}/token, ${bytes(kv.in_use)} in use of ${bytes(kv.reserved)} reserved`,
    `prompt cache: ${tier("memory", kv.memory_tier)}; ${tier("disk", kv.disk_tier)}`,
  ].join("; ");
}

function renderModels(state) {
  const body = $("models").querySelector("tbody");
  body.replaceChildren();
  for (const model of state.models) {
    const row = document.createElement("tr");
    const [label, className] = modelState(model);
    const name = model.name + (model.default ? " (default)" : "") + (model.pinned ? ", pinned" : "");
    row.append(element("td", name), element("td", model.model_name || "–"), element("td", label, className));
    const batch = `${model.active_sequences} active, ${model.queued_sequences} queued`;
    row.append(element("td", bytes(model.memory_bytes)), element("td", batch), element("td", kvCache(model.kv_cache)));
    const sampling = Object.entries(model.sampling_defaults).map(([field, value]) => `${field} ${value}`);
    row.append(element("td", sampling.join(", ") || "the API's"));
    const actions = element("td");
    if (state.can_load && (model.state === "loaded" || model.state === "loading")) {
      const unload = element("button", "Unload", "secondary");
      unload.type = "button";
      unload.addEventListener("click", () => unloadModel(model.name));
      actions.append(unload);
    }
    row.append(actions);
    body.append(row);
  }
  const budget = state.memory_budget ? ` of ${bytes(state.memory_budget)}` : "";
  $("memory").textContent = `Memory in use: ${bytes(state.memory_in_use)}${budget}`;
  renderRanks(state);
  $("load-form").hidden = !state.can_load;

  const select = $("chat-model");
  const chosen = select.value;
  const names = state.models.filter((model) => model.state === "loaded").map((model) => model.name);
  if (names.join("\n") !== [...select.options].map((option) => option.value).join("\n")) {
    select.replaceChildren(...names.map((name) => element("option", name)));
    if (names.includes(chosen)) select.value = chosen;
  }
  const loaded = names.length;
  $("summary").textContent = `${loaded} model${loaded === 1 ? "" : "s"} loaded`;
}

function renderRanks(state) {
  // A model sharded over mlx.launch's ranks: each rank's host and what it holds, or why the group broke.
  const ranks = $("ranks");
  ranks.hidden = state.ranks.length === 0;
  const each = state.ranks.map(
    (rank) => `rank ${rank.rank} on ${rank.host}: ${bytes(rank.weights_bytes)} of weights, ${bytes(rank.memory_bytes)} in use`,
  );
  ranks.textContent = `${state.ranks.length} ranks: ${each.join("; ")}` + (state.ranks_error ? ` (broken: ${state.ranks_error})` : "");
  ranks.className = state.ranks_error ? "error" : "muted";
}

function renderPlugins(state) {
  $("plugins").replaceChildren(
    ...state.plugins.map((plugin) =>
      element("li", `${plugin.name} ${plugin.version}${plugin.enabled ? "" : " (off)"}`, plugin.enabled ? "" : "muted"),
    ),
  );
  $("config").textContent =
    state.config === null ? "Shown to administrators only (the admin scope)." : JSON.stringify(state.config, null, 2);
}

function drawChart(canvas, points, value) {
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  const values = points.map(value);
  const finite = values.filter((v) => v !== null && v !== undefined);
  const top = Math.max(1, ...finite);
  context.fillStyle = "#888";
  context.font = "10px sans-serif";
  context.fillText(top.toFixed(top < 10 ? 1 : 0), 2, 10);
  context.strokeStyle = "#3867d6";
  context.lineWidth = 2;
  context.beginPath();
  let started = false;
  values.forEach((v, index) => {
    if (v === null || v === undefined) return;
    const x = values.length > 1 ? (index / (values.length - 1)) * (width - 4) + 2 : width / 2;
    const y = height - 2 - (v / top) * (height - 14);
    if (started) context.lineTo(x, y);
    else context.moveTo(x, y);
    started = true;
  });
  context.stroke();
}

function renderCharts(state) {
  const points = state.series;
  drawChart($("chart-tokens"), points, (p) => p.tokens_per_second);
  drawChart($("chart-ttft"), points, (p) => p.ttft_ms);
  drawChart($("chart-active"), points, (p) => p.active);
  drawChart($("chart-queued"), points, (p) => p.queued);
  drawChart($("chart-drafts"), points, (p) => (p.draft_acceptance === null ? null : 100 * p.draft_acceptance));
}

async function refresh() {
  clearTimeout(pollTimer);
  try {
    const state = await api("/console/api/state");
    $("login").hidden = true;
    $("main").hidden = false;
    $("forget-key").hidden = !key();
    renderModels(state);
    renderPlugins(state);
    renderCharts(state);
  } catch (error) {
    if (error instanceof Unauthenticated) {
      showLogin(key() ? "That key was not accepted." : "");
      return; // no polling until a key is given
    }
    $("summary").textContent = `cannot reach the server: ${error.message}`;
  }
  pollTimer = setTimeout(refresh, POLL_MS);
}

async function unloadModel(name) {
  try {
    await api("/api/models/unload", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name }),
    });
    $("load-message").textContent = `${name} unloaded`;
  } catch (error) {
    $("load-message").textContent = error.message;
  }
  refresh();
}

$("load-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = { model_name: $("load-model").value.trim() };
  if ($("load-name").value.trim()) body.name = $("load-name").value.trim();
  try {
    const answer = await api("/api/models/load", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    $("load-message").textContent = answer.message;
  } catch (error) {
    $("load-message").textContent = error instanceof Unauthenticated ? "Not signed in" : error.message;
  }
  refresh();
});

// -- playground ----------------------------------------------------------------------------------

function chatRequest() {
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
  messages.push({ role: "user", content: $("message").value });
  const extra = $("extra").value.trim() ? JSON.parse($("extra").value) : {};
  return {
    model: $("chat-model").value || undefined,
    messages,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
    ...extra,
    stream: true,
    stream_options: { include_usage: true },
  };
}

function showSnippets(body) {
  const url = `${location.origin}${ROOT}/v1/chat/completions`;
  const auth = key() ? ` \\\n  -H "Authorization: Bearer $FORGELLM_API_KEY"` : "";
  $("snippet-curl").textContent =
    `curl ${url} \\\n  -H "Content-Type: application/json"${auth} \\\n  -d '${JSON.stringify(body).replaceAll("'", "'\\''")}'`;
  const { stream, stream_options, model, messages, ...rest } = body;
  const fields = Object.entries(rest).map(([name, value]) => `    ${name}=${JSON.stringify(value)},`);
  $("snippet-python").textContent = [
    "import os",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${location.origin}${ROOT}/v1", api_key=os.environ.get("FORGELLM_API_KEY", "unused"))`,
    "stream = client.chat.completions.create(",
    `    model=${JSON.stringify(model ?? null)},`,
    `    messages=${JSON.stringify(messages)},`,
    ...fields,
    "    stream=True,",
    ")",
    "for chunk in stream:",
    '    print(chunk.choices[0].delta.content or "", end="", flush=True)',
  ].join("\n");
}

function finishChat(text) {
  running = null;
  $("send").disabled = false;
  $("stop").disabled = true;
  if (text) $("chat-stats").textContent = text;
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  let body;
  try {
    body = chatRequest();
  } catch (error) {
    $("chat-error").textContent = `Extra request fields: ${error.message}`;
    return;
  }
  $("answer").textContent = "";
  $("chat-error").textContent = "";
  $("chat-stats").textContent = "generating…";
  $("send").disabled = true;
  $("stop").disabled = false;
  showSnippets(body);
  running = new AbortController();
  const sent = performance.now();
  let firstToken = null;
  let usage = null;
  try {
    const response = await fetch(`${ROOT}/v1/chat/completions`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
      signal: running.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error(error.error?.message || `HTTP ${response.status}`);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices?.[0]?.delta;
        const text = (delta?.reasoning_content || "") + (delta?.content || "");
        if (text) {
          firstToken ??= performance.now();
          $("answer").textContent += text;
        }
      }
    }
    const seconds = (performance.now() - (firstToken ?? sent)) / 1000;
    const tokens = usage ? usage.completion_tokens : 0;
    const rate = seconds > 0 ? (tokens / seconds).toFixed(1) : "–";
    const ttft = firstToken ? Math.round(firstToken - sent) : "–";
    finishChat(`${usage?.prompt_tokens ?? "?"} prompt + ${tokens} generated tokens, ${rate} tokens/s, first token after ${ttft} ms`);
  } catch (error) {
    if (error.name === "AbortError") {
      finishChat("stopped");
    } else {
      $("chat-error").textContent = error.message;
      finishChat("failed");
    }
  }
});

$("stop").addEventListener("click", () => {
  if (running) running.abort(); // closes the connection: the server frees the batch slot at its next step
});

refresh();
