// midiforge studio: the page. Every option field comes from /api/config (generate's own parser), every check
// happens on the server (the same code as `midiforge generate`); these modules build the form, send it, and
// show what comes back. No library, nothing from another host.
//
// Each tab follows only its own jobs: it keeps an owner token in session storage (a reload keeps it, a new tab
// gets a new one) and sends it with every request. An error shows beside the results and in the status line
// until the next action. When the studio stops answering, the page says so, retries, and keeps the form usable.
"use strict";

import { $, el } from "./dom.js";
import { buildForm, fillCheckpoint, readOptions, restoreForm, setField } from "./form.js";
import { pianoRoll } from "./roll.js";

const RETRY_MS = 2000;
const HEARTBEAT_MS = 5000;  // while idle, how often the page checks that the studio still answers
const state = { config: null, prompt: null, following: null, polling: null, lost: false, jobs: [], busy: false };

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
  let res;
  try {
    res = await fetch(path, { ...options, headers });
  } catch (e) {
    const lost = new Error("the studio stopped");
    lost.lost = true;  // no answer at all: the server is gone (or restarting)
    throw lost;
  }
  let body = null;
  try { body = await res.json(); } catch (e) { body = { error: `${res.status} ${res.statusText}` }; }
  if (!res.ok) {
    const err = new Error(body && body.error ? body.error : `${res.status} ${res.statusText}`);
    err.status = res.status;
    throw err;
  }
  return body;
}

// --- what the page says: status line, error box, busy and lost states ---------------------------------------

function status(text, kind = "") {
  const s = $("#status");
  s.textContent = text;
  s.className = kind;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
  if (message) status(`error: ${message}`, "bad");
}

function setBusy(busy) {
  state.busy = busy;
  $("#generate").disabled = busy;
  $("#cancel").hidden = !busy;
  $("#progress").hidden = !busy;
}

function setLost(lost, retry) {
  state.lost = lost;
  $("#reconnect").hidden = !lost;
  if (lost) {
    setBusy(false);  // never stuck: the form stays usable while the studio is away
    $("#progress").hidden = true;
    status("the studio stopped (reconnect?)", "bad");
    clearTimeout(state.polling);
    state.retry = retry;
    state.polling = setTimeout(retry, RETRY_MS);
  }
}

async function reconnect() {
  clearTimeout(state.polling);
  if (state.retry) state.retry();
}

// --- the prompt ------------------------------------------------------------------------------------------------

function editHandlers(makePrompt) {
  return {
    onBars: (a, b) => {
      if (makePrompt) makePrompt();
      setField("replace_track", "");
      setField("infill", a === b ? String(a) : `${a}-${b}`);
      status(`bars ${a === b ? a : `${a}-${b}`} selected: Generate rewrites them and keeps the rest`);
    },
    onTrack: (n) => {
      if (makePrompt) makePrompt();
      setField("infill", "");
      setField("replace_track", String(n));
      status(`track ${n} selected: Generate rewrites it from the others`);
    },
  };
}

function setPrompt(prompt, label, roll) {
  state.prompt = prompt;
  $("#prompt-now").textContent = prompt ? `prompt: ${label}` : "starting from nothing";
  if (!prompt) $("#upload").value = "";
  const view = $("#prompt-view");
  view.hidden = !roll;
  if (roll) $("#prompt-roll").replaceChildren(pianoRoll(roll, { ...editHandlers(null), label: `piano roll of ${label}` }));
  else $("#prompt-roll").replaceChildren();
}

async function upload(file) {
  showError("");
  if (file.size > state.config.max_upload_bytes) {
    showError(`${file.name} is larger than the upload limit (${state.config.max_upload_bytes} bytes)`);
    $("#upload").value = "";
    return;
  }
  status(`reading ${file.name}…`);
  try {
    const info = await api("/api/upload", {
      method: "POST",
      headers: { "Content-Type": "application/octet-stream", "X-Filename": encodeURIComponent(file.name) },
      body: await file.arrayBuffer(),
    });
    setPrompt({ upload: info.id }, `${info.name} (${info.notes} notes, ${info.seconds} s)`, info.roll);
    status(`prompt: ${info.name}, ${info.roll.bars.length - 1} bars; drag across bars to rewrite them`);
  } catch (e) {
    if (e.lost) { setLost(true, () => upload(file)); return; }
    setPrompt(null);
    showError(e.message);
  }
}

async function sampleAsPrompt(job, s) {
  let roll = null;
  try { roll = s.roll ? await api(s.roll) : null; } catch (e) { roll = null; }
  setPrompt({ sample: [job.id, s.index] }, `sample ${s.index} (seed ${job.seed})`, roll);
}

// A job's prompt back in the form (history, reload), drawn again when the studio still has it.
async function restorePrompt(job) {
  const p = job.request.prompt;
  if (!p) { setPrompt(null); return; }
  let url = p.upload ? `/api/roll/${p.upload}/prompt.mid` : null;
  if (p.sample) {
    const from = state.jobs.find((j) => j.id === p.sample[0]);
    const s = from && from.samples.find((x) => x.index === p.sample[1]);
    url = s ? s.roll : null;
  }
  let roll = null;
  try { roll = url ? await api(url) : null; } catch (e) { roll = null; }
  setPrompt(p, job.prompt, roll);
}

// --- generate, follow, cancel ---------------------------------------------------------------------------------

async function generate(event) {
  if (event) event.preventDefault();
  showError("");
  const request = { checkpoint: Number($("#checkpoint").value), prompt: state.prompt, options: readOptions(state.config) };
  setBusy(true);
  status("sending…");
  try {
    const job = await api("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
    });
    $("#results").replaceChildren();  // the new request takes the results area; earlier ones stay in the history
    $("#job-head").replaceChildren();
    follow(job.id);
  } catch (e) {
    setBusy(false);
    if (e.lost) setLost(true, () => main());
    else showError(e.message);
  }
}

async function cancel() {
  if (!state.following) return;
  try {
    await api(`/api/jobs/${state.following}/cancel`, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    status("cancelling…");
  } catch (e) {
    if (e.lost) setLost(true, () => follow(state.following));
    else showError(e.message);
  }
}

function follow(id) {
  clearTimeout(state.polling);
  state.following = id;
  const tick = async () => {
    let job;
    try {
      job = await api(`/api/jobs/${id}`);
    } catch (e) {
      if (e.lost) { setLost(true, tick); return; }
      setLost(false);
      setBusy(false);
      state.following = null;
      showError(e.status === 404 ? "that job is gone (the studio restarted); press Generate again" : e.message);
      refreshHistory();
      return;
    }
    setLost(false);
    if (state.following !== id) return;
    if (job.state === "queued" || job.state === "running") {
      setBusy(true);
      const text = job.state === "queued" ? `queued, position ${job.queue_position}` : `generating… ${job.elapsed.toFixed(1)} s`;
      $("#progress-text").textContent = text;
      status(text);
      state.polling = setTimeout(tick, 300);
      return;
    }
    state.following = null;
    setBusy(false);
    show(job);
    if (job.state === "done") status(`done in ${job.elapsed.toFixed(1)} s`, "good");
    else if (job.state === "cancelled") status("cancelled");
    else showError(job.error);
    refreshHistory();
  };
  tick();
}

// --- results and history --------------------------------------------------------------------------------------

function sampleCard(job, s) {
  const card = el("article", { class: "sample", "data-index": s.index });
  card.append(el("h3", { text: `sample ${s.index}` }));
  const audio = s.files.audio ? el("audio", { controls: "", preload: "metadata", src: s.files.audio }) : null;
  const rollBox = el("div", { class: "roll-slot" });
  card.append(rollBox);
  if (s.roll) {
    api(s.roll).then((data) => {
      const edits = editHandlers(() => sampleAsPrompt(job, s));
      rollBox.replaceChildren(pianoRoll(data, { ...edits, audio, label: `piano roll of sample ${s.index}` }));
    }).catch((e) => rollBox.replaceChildren(el("div", { class: "help", text: `no piano roll: ${e.message}` })));
  }
  if (audio) card.append(audio);
  card.append(el("div", { class: "report", text: s.report }));
  const actions = el("div", { class: "actions" });
  if (s.files.midi) actions.append(el("a", { class: "download", href: s.files.midi, download: `${job.id}_sample_${s.index}.mid`, text: "download MIDI" }));
  actions.append(el("button", { type: "button", class: "continue", text: "Continue from this", onclick: () => sampleAsPrompt(job, s) }));
  card.append(actions);
  return card;
}

function show(job) {
  state.current = job.id;
  $("#job-head").replaceChildren(...[
    el("div", {}, el("strong", { text: job.label || "generation" }), ` · seed ${job.seed} · ${job.checkpoint}`,
      job.state === "failed" || job.state === "cancelled" ? el("span", { class: "failed", text: ` · ${job.state}: ${job.error}` }) : null),
    el("code", { text: job.command, title: "the same generation on the command line (shell-quoted)" }),
    job.report.length ? el("pre", { class: "job-report", text: job.report.join("\n") }) : null,
  ].filter(Boolean));
  $("#results").replaceChildren(...job.samples.map((s) => sampleCard(job, s)));
  for (const b of document.querySelectorAll("#history button")) b.classList.toggle("current", b.dataset.id === job.id);
}

async function refreshHistory() {
  let jobs;
  try { jobs = await api("/api/jobs"); } catch (e) { return; }
  state.jobs = jobs;
  $("#history").replaceChildren(...jobs.map((job) => {
    const n = job.samples.length;
    const what = job.state === "done" ? `${n} sample${n === 1 ? "" : "s"}` : job.state;
    const b = el("button", { type: "button", "data-id": job.id, class: `hist state-${job.state}`, title: job.command,
      text: `${job.label} · seed ${job.seed} · ${what}` });
    b.addEventListener("click", () => {
      restoreForm(state.config, job.request);
      restorePrompt(job);
      if (job.state === "queued" || job.state === "running") follow(job.id); else show(job);
    });
    if (job.id === state.current) b.classList.add("current");
    return el("li", {}, b);
  }));
}

// While no job is followed, a light request now and then: a studio that stopped shows at once, not at the next click.
async function heartbeat() {
  if (state.following || state.lost || !state.config) return;
  try { await api("/api/jobs"); } catch (e) { if (e.lost) setLost(true, main); }
}

async function main() {
  try {
    state.config = await api("/api/config");
  } catch (e) {
    if (e.lost) { setLost(true, main); return; }
    showError(`cannot read the studio's settings: ${e.message}`);
    return;
  }
  setLost(false);
  if (!$("#fields").childElementCount) {
    const select = $("#checkpoint");
    for (const c of state.config.checkpoints) select.append(el("option", { value: c.index, text: c.name }));
    buildForm(state.config, $("#fields"));
    select.addEventListener("change", () => fillCheckpoint(state.config.checkpoints[Number(select.value)]));
    $("#form").addEventListener("submit", generate);
    $("#upload").addEventListener("change", (e) => { if (e.target.files[0]) upload(e.target.files[0]); });
    $("#clear-prompt").addEventListener("click", () => setPrompt(null));
    $("#cancel").addEventListener("click", cancel);
    $("#reconnect").addEventListener("click", reconnect);
  }
  fillCheckpoint(state.config.checkpoints[Number($("#checkpoint").value) || 0]);
  status("ready");
  await refreshHistory();
  if (state.started) return;  // back after the studio was away: the form stays as the person left it
  state.started = true;
  setInterval(heartbeat, HEARTBEAT_MS);
  // After a reload: this tab's own latest job, followed while it runs; a new tab has none and starts idle.
  const latest = state.jobs[0];
  if (latest && !state.busy) {
    restoreForm(state.config, latest.request);
    restorePrompt(latest);
  }
  if (latest && (latest.state === "queued" || latest.state === "running")) follow(latest.id);
  else if (latest && !state.busy) show(latest);
  document.body.dataset.ready = "1";
}

main();
