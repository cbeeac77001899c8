// The chat page: plain script over the API's own /v1 routes (no build step).
// It keeps the conversation in memory, streams each answer with server-sent events, and can stop
// one (the request is aborted; the API then closes its inference session).
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];
let controller = null;

function setState(state, text) {
  document.body.dataset.state = state;
  $("status").textContent = text || "";
  const busy = state === "streaming";
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error && body.error.message ? body.error.message : response.statusText;
  } catch (e) {
    return response.statusText;
  }
}

async function loadModels() {
  setState("loading", "Loading models…");
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    setState("error", "Cannot list models: " + (await errorText(response)));
    return;
  }
  const models = (await response.json()).data;
  const select = $("model");
  const previous = select.value || localStorage.getItem("swarm-model");
  select.replaceChildren();
  for (const m of models) {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id + (m.complete ? "" : " (incomplete)");
    select.appendChild(option);
  }
  if (previous && models.some((m) => m.id === previous)) select.value = previous;
  setState(models.length ? "idle" : "error", models.length ? "" : "The swarm serves no model now.");
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// Reads server-sent events from a fetch response; calls onData with each parsed JSON event.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  const model = $("model").value;
  if (!model) return;
  localStorage.setItem("swarm-model", model);
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  controller = new AbortController();
  setState("streaming", "Generating…");
  const started = performance.now();
  let answer = "", usage = null, finish = null, first = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.content) {
          if (first === null) first = performance.now();
          answer += delta.content;
          bubble.textContent = answer;
          bubble.scrollIntoView({ block: "end" });
        }
        for (const call of delta.tool_calls || []) {
          const line = document.createElement("span");
          line.className = "tool-call";
          line.textContent = "tool call: " + call.function.name + "(" + call.function.arguments + ")";
          bubble.appendChild(line);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
    conversation.push({ role: "assistant", content: answer });
    const meta = document.createElement("span");
    meta.className = "meta";
    const seconds = (performance.now() - started) / 1000;
    meta.textContent = (usage ? usage.completion_tokens + " tokens, " : "") + seconds.toFixed(1) + " s" +
      (first !== null ? ", first token after " + ((first - started) / 1000).toFixed(2) + " s" : "") +
      (finish ? ", " + finish : "");
    bubble.appendChild(meta);
    bubble.dataset.finish = finish || "";
    setState("idle", "");
  } catch (e) {
    conversation.pop();
    if (e.name === "AbortError") {
      bubble.dataset.finish = "stopped";
      setState("idle", "Stopped.");
    } else {
      bubble.remove();
      setState("error", "Error: " + e.message);
    }
  } finally {
    bubble.classList.remove("streaming");
    controller = null;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").replaceChildren();
  setState("idle", "");
});
$("api-key").value = localStorage.getItem("swarm-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("swarm-api-key", $("api-key").value.trim());
  loadModels();
});
loadModels().catch((e) => setState("error", "Cannot list models: " + e.message));
