// The page's chat box and pool panel: plain JavaScript, no build step.
// Chat: POST /v1/chat/completions with stream: true, read as server-sent events; Stop aborts the
// fetch, which closes the connection, which the router treats as a cancel.
// Pool: GET /pool/status once a second; tokens/s from the change of tokens_relayed.
// API key: when the pool has keys (security.api_keys_file) both calls need one; the page sends the
// key typed in its field as `Authorization: Bearer`, and keeps it in sessionStorage only (this tab,
// gone when the tab closes; never localStorage, never a cookie, never in a URL).
"use strict";

const $ = (id) => document.getElementById(id);
const turns = []; // {role, content} turns of this conversation
let controller = null; // the AbortController of the answer being streamed
let model = null;
const KEY_STORAGE = "bm-pool-api-key";
const KEY_NEEDED = "this pool needs an API key: enter it in the API key field";

// The request headers, with the API key when one is set.
function headers(extra = {}) {
  const key = $("api_key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function number(id) {
  const value = parseFloat($(id).value);
  return Number.isFinite(value) ? value : undefined;
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  turns.push({ role: "user", content: text });
  addTurn("user", text);
  const answer = addTurn("assistant", "");
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...turns);
  const body = {
    model: model || undefined,
    messages,
    stream: true,
    temperature: number("temperature"),
    top_p: number("top_p"),
    max_tokens: number("max_tokens"),
  };
  controller = new AbortController();
  setBusy(true, "streaming...");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (response.status === 401) throw new Error(`401: ${KEY_NEEDED}`);
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error(`${response.status}: ${(error.error || {}).message || response.statusText}`);
    }
    const finish = await readStream(response, answer);
    turns.push({ role: "assistant", content: answer.textContent });
    setBusy(false, `done (${finish})`);
  } catch (error) {
    if (error.name === "AbortError") {
      if (answer.textContent) turns.push({ role: "assistant", content: answer.textContent });
      else turns.pop(); // nothing answered: forget the question
      setBusy(false, "stopped");
    } else {
      turns.pop();
      answer.className = "turn error";
      answer.textContent = String(error.message || error);
      setBusy(false, "error");
    }
  }
}

// Appends the streamed text to `answer`; returns the finish reason.
async function readStream(response, answer) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = "?";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finish;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return finish;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) answer.textContent += choice.delta.content;
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      $("log").scrollTop = $("log").scrollHeight;
    }
  }
}

function setBusy(busy, status) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("status").textContent = status;
  if (!busy) controller = null;
}

let previous = null; // the last status reading, for tokens/s

async function refreshPool() {
  try {
    const response = await fetch("/pool/status", { headers: headers() });
    if (response.status === 401) {
      previous = null;
      $("devices").textContent = KEY_NEEDED;
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const status = await response.json();
    model = status.model;
    $("model").textContent = status.model;
    $("queue").textContent = status.queue_length;
    $("running").textContent = status.running;
    if (previous && status.time > previous.time) {
      const rate = (status.tokens_relayed - previous.tokens_relayed) / (status.time - previous.time);
      $("rate").textContent = rate.toFixed(1);
    }
    previous = status;
    showDevices(status.workers, status.draining);
  } catch (error) {
    $("devices").textContent = `the router does not answer (${error.message})`;
  }
}

function showDevices(workers, draining) {
  const byDevice = new Map();
  for (const worker of workers) {
    if (!byDevice.has(worker.device_id)) byDevice.set(worker.device_id, []);
    byDevice.get(worker.device_id).push(worker);
  }
  const panel = $("devices");
  panel.replaceChildren();
  if (draining) panel.appendChild(Object.assign(document.createElement("p"), { textContent: "draining" }));
  if (!workers.length) panel.appendChild(Object.assign(document.createElement("p"), { textContent: "no worker" }));
  for (const [device, list] of [...byDevice.entries()].sort((a, b) => a[0] - b[0])) {
    const box = document.createElement("div");
    box.className = "device";
    box.appendChild(Object.assign(document.createElement("strong"), { textContent: `device ${device}` }));
    for (const worker of list) {
      const line = document.createElement("div");
      line.className = `worker state-${worker.state}`;
      line.textContent = `${worker.worker_id}: ${worker.state}`;
      box.appendChild(line);
    }
    panel.appendChild(box);
  }
}

$("api_key").value = sessionStorage.getItem(KEY_STORAGE) || "";
$("api_key").addEventListener("change", () => {
  sessionStorage.setItem(KEY_STORAGE, $("api_key").value.trim());
  refreshPool();
});
$("send").addEventListener("click", send);
$("stop").addEventListener("click", () => controller && controller.abort());
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    send();
  }
});
refreshPool();
setInterval(refreshPool, 1000);
