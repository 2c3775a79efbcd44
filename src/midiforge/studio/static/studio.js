// midiforge studio: the page. Every option field comes from /api/config (generate's own parser), every check
// happens on the server (the same code as `midiforge generate`); this file only builds the form, sends it and
// shows what comes back. No library, nothing from another host.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { config: null, prompt: null, promptLabel: null, current: null, polling: null, jobs: [] };

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

// This tab's owner token: the server lists and cancels only the jobs this token submitted. Session storage
// keeps it across a reload of this tab, and a new tab starts with a fresh one (and no jobs).
function ownerToken() {
  let token = sessionStorage.getItem("midiforge-owner");
  if (!token) {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    token = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    sessionStorage.setItem("midiforge-owner", token);
  }
  return token;
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), "X-Studio-Owner": ownerToken() };
  const res = await fetch(path, { ...options, headers });
  let body = null;
  try { body = await res.json(); } catch (e) { body = { error: `${res.status} ${res.statusText}` }; }
  if (!res.ok) throw new Error(body && body.error ? body.error : `${res.status} ${res.statusText}`);
  return body;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

function setPrompt(prompt, label) {
  state.prompt = prompt;
  state.promptLabel = label;
  $("#prompt-now").textContent = prompt ? `prompt: ${label}` : "starting from nothing";
  if (!prompt) $("#upload").value = "";
}

// --- the form, from generate's options ---------------------------------------------------------------------

function fieldInput(f) {
  const id = `opt-${f.dest}`;
  const help = el("div", { class: "help", text: f.help });
  if (f.kind === "flag") {
    const box = el("input", { type: "checkbox", id, "data-dest": f.dest });
    if (f.default === true && f.flag.startsWith("--no-")) box.checked = false;
    return el("label", { class: "flag", title: f.help }, box, el("span", { class: "name", text: f.flag }));
  }
  let input;
  if (f.kind === "choice") {
    input = el("select", { id, "data-dest": f.dest }, el("option", { value: "", text: "(default)" }));
    for (const c of f.choices) input.append(el("option", { value: c, text: c }));
  } else {
    // Text, not number inputs: the server's parser is the one judge of a value (and says why in one line).
    const placeholder = f.default != null && f.default !== false ? `default ${f.default}` : f.metavar;
    input = el("input", { type: "text", id, "data-dest": f.dest, placeholder: placeholder || "" });
    if (f.kind === "multi") input.setAttribute("placeholder", "values separated by ;");
  }
  // An option that may stand alone (nargs "?", e.g. --harmonize [VOICES]): a box to give it without a value.
  const alone = f.alone ? el("input", { type: "checkbox", "data-alone": f.dest, title: `give ${f.flag} alone` }) : null;
  return el("label", { for: id, title: f.help },
    el("span", { class: "name", text: f.flag }, alone ? " " : null, alone), input, help);
}

function buildForm(config) {
  const select = $("#checkpoint");
  for (const c of config.checkpoints) select.append(el("option", { value: c.index, text: c.name }));
  const groups = new Map();
  for (const f of config.fields) {
    if (!groups.has(f.group)) groups.set(f.group, el("fieldset", {}, el("legend", { text: f.group })));
    groups.get(f.group).append(fieldInput(f));
  }
  for (const g of groups.values()) $("#fields").append(g);
}

function readOptions() {
  const options = {};
  for (const f of state.config.fields) {
    const input = document.querySelector(`[data-dest="${f.dest}"]`);
    if (f.kind === "flag") { if (input.checked) options[f.dest] = true; continue; }
    const v = input.value.trim();
    const alone = document.querySelector(`[data-alone="${f.dest}"]`);
    if (!v && alone && alone.checked) { options[f.dest] = true; continue; }
    if (!v) continue;
    options[f.dest] = f.kind === "multi" ? v.split(";").map((s) => s.trim()).filter(Boolean) : v;
  }
  return options;
}

function restoreForm(request) {
  $("#checkpoint").value = request.checkpoint ?? 0;
  const options = request.options || {};
  for (const f of state.config.fields) {
    const input = document.querySelector(`[data-dest="${f.dest}"]`);
    const v = options[f.dest];
    const alone = document.querySelector(`[data-alone="${f.dest}"]`);
    if (alone) alone.checked = v === true;
    if (f.kind === "flag") input.checked = v === true;
    else input.value = v == null || v === true ? "" : Array.isArray(v) ? v.join("; ") : String(v);
  }
}

// --- upload, generate, poll ----------------------------------------------------------------------------------

async function upload(file) {
  showError("");
  if (file.size > state.config.max_upload_bytes) {
    showError(`${file.name} is larger than the upload limit (${state.config.max_upload_bytes} bytes)`);
    $("#upload").value = "";
    return;
  }
  try {
    const info = await api("/api/upload", {
      method: "POST",
      headers: { "Content-Type": "application/octet-stream", "X-Filename": encodeURIComponent(file.name) },
      body: await file.arrayBuffer(),
    });
    setPrompt({ upload: info.id }, `${info.name} (${info.notes} notes, ${info.seconds} s)`);
  } catch (e) {
    showError(e.message);
    setPrompt(null);
  }
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const request = { checkpoint: Number($("#checkpoint").value), prompt: state.prompt, options: readOptions() };
  $("#generate").disabled = true;
  // The new request takes the results area (earlier ones stay in the history).
  $("#results").replaceChildren();
  $("#job-head").replaceChildren();
  try {
    const job = await api("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
    });
    follow(job.id);
  } catch (e) {
    showError(e.message);
    $("#generate").disabled = false;
  }
}

function follow(id) {
  clearTimeout(state.polling);
  const tick = async () => {
    let job;
    try { job = await api(`/api/jobs/${id}`); } catch (e) { showError(e.message); return; }
    if (job.state === "queued" || job.state === "running") {
      $("#progress").hidden = false;
      $("#progress-text").textContent = job.state === "queued"
        ? `queued, position ${job.queue_position}` : `generating… ${job.elapsed.toFixed(1)} s`;
      $("#status").textContent = "working";
      state.polling = setTimeout(tick, 300);
      return;
    }
    $("#progress").hidden = true;
    $("#generate").disabled = false;
    $("#status").textContent = job.state === "done" ? `done in ${job.elapsed.toFixed(1)} s` : "failed";
    if (job.state === "failed") showError(job.error);
    show(job);
    refreshHistory();
  };
  tick();
}

// --- results and history ---------------------------------------------------------------------------------

function show(job) {
  state.current = job.id;
  const head = $("#job-head");
  head.replaceChildren(...[
    el("div", {}, el("strong", { text: `seed ${job.seed}` }), ` · ${job.checkpoint} · `,
      job.prompt ? `prompt: ${job.prompt}` : "from nothing",
      job.state === "failed" ? el("span", { class: "failed", text: ` · failed: ${job.error}` }) : null),
    el("code", { text: job.command, title: "the same generation on the command line" }),
    job.report.length ? el("pre", { class: "job-report", text: job.report.join("\n") }) : null,
  ].filter(Boolean));
  const results = $("#results");
  results.replaceChildren();
  for (const s of job.samples) {
    const card = el("article", { class: "sample", "data-index": s.index });
    card.append(el("h3", { text: `sample ${s.index}` }));
    if (s.files.pianoroll) card.append(el("img", { class: "pianoroll", src: s.files.pianoroll, alt: `piano roll of sample ${s.index}` }));
    if (s.files.audio) card.append(el("audio", { controls: "", preload: "metadata", src: s.files.audio }));
    card.append(el("div", { class: "report", text: s.report }));
    const actions = el("div", { class: "actions" });
    if (s.files.midi) actions.append(el("a", { class: "download", href: s.files.midi, download: `${job.id}_sample_${s.index}.mid`, text: "download MIDI" }));
    actions.append(el("button", {
      type: "button", class: "continue", text: "Continue from this",
      onclick: () => setPrompt({ sample: [job.id, s.index] }, `sample ${s.index} (seed ${job.seed})`),
    }));
    card.append(actions);
    results.append(card);
  }
  for (const li of document.querySelectorAll("#history li")) li.classList.toggle("current", li.dataset.id === job.id);
}

async function refreshHistory() {
  const jobs = await api("/api/jobs");
  state.jobs = jobs;
  const list = $("#history");
  list.replaceChildren();
  jobs.forEach((job, i) => {
    const n = job.samples.length;
    const text = `${job.checkpoint}, seed ${job.seed}, ${job.prompt || "from nothing"}: ` +
      (job.state === "done" ? `${n} sample${n === 1 ? "" : "s"}` : job.state);
    const li = el("li", { "data-id": job.id, class: `state-${job.state}`, text, title: job.command });
    li.addEventListener("click", () => {
      restoreForm(job.request);
      setPrompt(job.request.prompt || null, job.prompt);
      if (job.state === "queued" || job.state === "running") follow(job.id); else show(job);
    });
    if (job.id === state.current) li.classList.add("current");
    list.append(li);
  });
}

async function main() {
  try {
    state.config = await api("/api/config");
  } catch (e) {
    showError(`cannot reach the studio: ${e.message}`);
    return;
  }
  buildForm(state.config);
  $("#form").addEventListener("submit", generate);
  $("#upload").addEventListener("change", (e) => { if (e.target.files[0]) upload(e.target.files[0]); });
  $("#clear-prompt").addEventListener("click", () => setPrompt(null));
  $("#status").textContent = "ready";
  await refreshHistory();
  // After a reload: keep following a request still in the queue, else show the latest results.
  const latest = state.jobs[0];
  if (latest && (latest.state === "queued" || latest.state === "running")) {
    $("#generate").disabled = true;
    follow(latest.id);
  } else if (latest) show(latest);
  document.body.dataset.ready = "1";
}

main();
