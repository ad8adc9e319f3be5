// The page of `minignext serve`: one conversation per tab, talking to minignext/serve.py.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { config: null, conversation: null, uploads: [], uploading: 0, busy: false, source: null };
const PHASES = {
  encode: (m) => `reading the ${m} (ImageBind, then the input projection)`,
  generate: () => "writing the answer (the LLM)",
  decode: (m) => `making the ${m} (the ${m} diffusion decoder)`,
};

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

async function api(method, url, body, type) {
  const response = await fetch(url, { method, body, headers: type ? { "Content-Type": type } : {} });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function notify(text, isError = false) {
  const notice = $("#notice");
  notice.textContent = text;
  notice.classList.toggle("error", isError);
}

function setBusy(busy) {
  state.busy = busy;
  refreshSend();
}

function refreshSend() {
  $("#send").disabled = state.busy || state.uploading > 0 || !state.conversation;
}

// ---------------------------------------------------------------- conversations

async function newConversation() {
  if (state.source) state.source.close();
  state.source = null;
  state.conversation = null;
  refreshSend();
  const { id } = await api("POST", "/api/conversations");
  state.conversation = id;
  state.uploads = [];
  renderAttachments();
  $("#messages").replaceChildren($("#empty-template").content.cloneNode(true));
  notify("");
  setBusy(false);
  document.body.dataset.conversation = id;
  $("#prompt").focus();
}

// ---------------------------------------------------------------- attachments

function mb(bytes) {
  return `${(bytes / 1e6).toFixed(1)} MB`;
}

async function attach(file, kind) {
  notify("");
  const limit = state.config.max_upload_bytes;
  if (file.size > limit) {
    notify(`${file.name} is ${mb(file.size)}; files up to ${mb(limit)} can be attached`, true);
    return;
  }
  const conversation = state.conversation;
  const chip = el("span", { className: "chip uploading", textContent: `${file.name} (uploading)` });
  $("#attachments").append(chip);
  state.uploading += 1;
  refreshSend();
  try {
    const query = `kind=${kind}&name=${encodeURIComponent(file.name)}`;
    const upload = await api("POST", `/api/conversations/${conversation}/uploads?${query}`, file,
                             "application/octet-stream");
    if (conversation === state.conversation) state.uploads.push(upload);
  } catch (error) {
    notify(`${file.name}: ${error.message}`, true);
  } finally {
    chip.remove();
    state.uploading -= 1;
    renderAttachments();
    refreshSend();
  }
}

function renderAttachments() {
  const chips = state.uploads.map((upload) => {
    const remove = el("button", { type: "button", title: "remove", textContent: "\u00d7" });
    remove.onclick = () => { state.uploads = state.uploads.filter((u) => u !== upload); renderAttachments(); };
    return el("span", { className: `chip ready ${upload.kind}` }, `${upload.kind}: ${upload.name}`, remove);
  });
  $("#attachments").querySelectorAll(".chip:not(.uploading)").forEach((c) => c.remove());
  $("#attachments").prepend(...chips);
}

// ---------------------------------------------------------------- turns

function mediaNode(kind, url) {
  if (kind === "audio") return el("audio", { controls: true, preload: "metadata", src: url });
  return el("img", { src: url, alt: `${kind}`, className: kind });   // a video is an animated GIF
}

function addTurn(role) {
  const turn = el("section", { className: `turn ${role}` }, el("div", { className: "who", textContent: role }));
  $("#empty")?.remove();
  $("#messages").append(turn);
  return turn;
}

function showUserTurn(text, uploads) {
  const turn = addTurn("user");
  turn.append(el("div", { className: "text", textContent: text }));
  if (uploads.length) turn.append(el("div", { className: "media" }, ...uploads.map((u) => mediaNode(u.kind, u.url))));
  turn.scrollIntoView({ block: "end" });
}

function phaseLabel(phase) {
  const [verb, modality] = phase.split(" ");
  return (PHASES[verb] || (() => phase))(modality);
}

class AssistantTurn {
  constructor() {
    this.node = addTurn("assistant");
    this.node.classList.add("pending");
    this.bar = el("progress");
    this.label = el("span", { textContent: "sending" });
    this.status = el("div", { className: "status" }, this.bar, this.label);
    this.node.append(this.status);
    this.phases = new Map();                       // phase -> [done, total], for the routing view
    this.node.scrollIntoView({ block: "end" });
  }

  queued({ position }) {
    this.label.textContent = position ? `waiting: ${position} request${position > 1 ? "s" : ""} ahead` : "starting";
  }

  progress({ phase, done, total }) {
    this.phases.set(phase, [done, total]);
    this.bar.max = total;
    this.bar.value = done;
    this.label.textContent = `${phaseLabel(phase)}: ${done}/${total}`;
  }

  fail(message) {
    this.status.remove();
    this.node.classList.replace("pending", "failed");
    this.node.append(el("div", { className: "error", textContent: message }));
  }

  fill(reply) {
    this.status.remove();
    this.node.classList.replace("pending", "done");
    this.node.dataset.turn = reply.turn;
    this.node.append(el("div", { className: "text answer-text", textContent: reply.text || "(no text)" }));
    if (reply.media.length) {
      this.node.append(el("div", { className: "media" }, ...reply.media.map((m) => mediaNode(m.kind, m.url))));
    }
    if (reply.notices.length) {
      this.node.append(el("ul", { className: "notices" }, ...reply.notices.map((n) => el("li", { textContent: n }))));
    }
    this.node.append(routing(reply, this.phases));
    this.node.scrollIntoView({ block: "end" });
  }
}

// What a teacher opens up: the answer with its signal tokens, and where each one went.
function routing(reply, phases) {
  const raw = el("div", { className: "raw" });
  for (const piece of reply.raw_text.split(/(\[(?:IMG|AUD|VID)\d+\])/)) {
    raw.append(/^\[(IMG|AUD|VID)\d+\]$/.test(piece) ? el("span", { className: "signal", textContent: piece }) : piece);
  }
  const steps = [];
  for (const input of reply.inputs) {
    const when = input.new ? "this turn's" : "an earlier turn's";
    steps.push(el("li", {}, `${when} ${input.modality} \u2192 ImageBind (${input.modality === "audio" ? "audio" : "vision"})`
      + ` \u2192 llama_proj \u2192 one soft token at prompt position ${input.position}`));
  }
  steps.push(el("li", {}, `the LLM read ${reply.prompt_tokens} positions and wrote ${reply.answer_tokens} tokens`));
  for (const s of reply.signals) {
    const names = s.tokens.length > 1 ? `${s.tokens[0]}\u2026${s.tokens[s.tokens.length - 1]}` : s.tokens[0];
    const sampling = s.steps === undefined ? "" : ` (${s.steps} steps, guidance ${s.guidance})`;
    const item = el("li", {},
      el("span", { className: "signal", textContent: names }),
      ` at positions ${s.position}\u2013${s.position + s.tokens.length - 1} \u2192 `,
      el("code", { textContent: s.projection }),
      ` \u2192 conditioning (${s.conditioning.join(", ")}) \u2192 ${s.modality} decoder${sampling}`);
    if (s.output) item.append(" \u2192 ", el("a", { href: s.output, target: "_blank", textContent: s.output.split("/").pop() }));
    else item.append(" \u2192 no output (see the notes)");
    steps.push(item);
  }
  const timing = [...phases].map(([phase, [done, total]]) =>
    phase === "generate" ? `generate: ${done} tokens` : `${phase}: ${done}/${total}`);
  timing.push(`${reply.seconds} s in all`);
  return el("div", { className: "routing" },
    el("div", { className: "who", textContent: "raw answer (as kept in the conversation)" }), raw,
    el("div", { className: "who", textContent: "routing" }), el("ol", {}, ...steps),
    el("div", { className: "timing", textContent: timing.join(" \u00b7 ") }));
}

// ---------------------------------------------------------------- sending

async function send(event) {
  event.preventDefault();
  const text = $("#prompt").value.trim();
  if (!text || $("#send").disabled) return;
  const uploads = state.uploads;
  let job;
  setBusy(true);
  try {
    job = await api("POST", `/api/conversations/${state.conversation}/messages`,
                    JSON.stringify({ text, uploads: uploads.map((u) => u.upload) }), "application/json");
  } catch (error) {
    notify(error.message, true);
    setBusy(false);
    return;
  }
  notify("");
  $("#prompt").value = "";
  state.uploads = [];
  renderAttachments();
  showUserTurn(text, uploads);
  follow(job.job, new AssistantTurn());
}

function follow(jobId, turn) {
  const source = new EventSource(`/api/jobs/${jobId}/events`);
  state.source = source;
  const finish = () => {
    source.close();
    if (state.source === source) {
      state.source = null;
      setBusy(false);
    }
  };
  const on = (name, handle) => source.addEventListener(name, (e) => handle(JSON.parse(e.data)));
  on("queued", (data) => turn.queued(data));
  on("started", () => { turn.label.textContent = "starting"; });
  on("progress", (data) => turn.progress(data));
  on("reply", (data) => { turn.fill(data); finish(); });
  on("failed", (data) => { turn.fail(data.message); finish(); });
  source.onerror = () => {                     // the browser retries by itself unless the stream is closed
    if (source.readyState === EventSource.CLOSED) {
      turn.fail("lost the connection to the server");
      finish();
    }
  };
}

// ---------------------------------------------------------------- wiring

function wire() {
  $("#composer").addEventListener("submit", send);
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  $("#new-conversation").addEventListener("click", () => newConversation().catch((e) => notify(e.message, true)));
  const toggle = $("#show-routing");
  toggle.checked = localStorage.getItem("minignext-routing") === "1";
  document.body.classList.toggle("show-routing", toggle.checked);
  toggle.addEventListener("change", () => {
    document.body.classList.toggle("show-routing", toggle.checked);
    localStorage.setItem("minignext-routing", toggle.checked ? "1" : "0");
  });
  for (const input of document.querySelectorAll("input[type=file]")) {
    input.addEventListener("change", () => {
      for (const file of input.files) attach(file, input.dataset.kind);
      input.value = "";
    });
  }
  let depth = 0;                                  // dragenter / dragleave fire for every child element
  window.addEventListener("dragenter", (e) => { e.preventDefault(); depth += 1; document.body.classList.add("dragging"); });
  window.addEventListener("dragleave", () => { depth -= 1; if (depth <= 0) document.body.classList.remove("dragging"); });
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    document.body.classList.remove("dragging");
    for (const file of e.dataTransfer.files) attach(file, "auto");   // the server tells a still GIF from a video
  });
}

async function start() {
  wire();
  try {
    state.config = await api("GET", "/api/config");
    $("#preset").textContent = `preset ${state.config.preset}`;
    await newConversation();
    document.body.dataset.ready = "1";
  } catch (error) {
    notify(`cannot reach the server: ${error.message}`, true);
  }
}

start();
