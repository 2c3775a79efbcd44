// The form, built from generate's own options (/api/config "fields"): each option gets a human label with its
// flag shown small beside it. A known option may get a select (instruments, key, time signature, levels, tags);
// an option this page does not know yet still appears, under "advanced", as a text field named by its flag.
// The server's parser stays the one judge of every value.
"use strict";

import { el } from "./dom.js";

// dest → [label, section]. Sections: "music" (shown), "edit" (shown when there is a prompt), "advanced" (folded).
const LABELS = {
  max_tokens: ["Length (new tokens)", "music"],
  num_samples: ["Samples", "music"],
  seed: ["Seed (empty: random)", "music"],
  temperature: ["Temperature (lower: safer)", "music"],
  instruments: ["Instruments", "music"],
  key: ["Key", "music"],
  time_sig: ["Time signature", "music"],
  tempo: ["Tempo (bpm)", "music"],
  density: ["Notes per bar", "music"],
  polyphony: ["Notes at once", "music"],
  tag: ["Style tag", "music"],
  infill: ["Rewrite bars (drag on the piano roll)", "edit"],
  replace_track: ["Rewrite track (click it on the piano roll)", "edit"],
  add_track: ["Add a track (instrument)", "edit"],
  harmonize: ["Harmonize the melody", "edit"],
  prompt_bars: ["Use only the first bars of the prompt", "edit"],
  voice_ranges: ["Voice ranges, top voice first", "advanced"],
  free_harmony: ["Free harmony (no chord rule)", "advanced"],
  max_seconds: ["Stop after seconds of music", "advanced"],
  top_k: ["Top-k", "advanced"],
  top_p: ["Top-p (nucleus)", "advanced"],
  ignore_eos: ["Never end early", "advanced"],
  min_new_tokens: ["At least this many tokens", "advanced"],
  min_seconds: ["At least this many seconds", "advanced"],
  grid_mask: ["Onset grid", "advanced"],
  beat_strength: ["Chords on the beat (strength)", "advanced"],
  key_strength: ["Pull of the key on the notes", "advanced"],
  check_copies: ["Check for copies of the training set", "advanced"],
  copy_threshold: ["Copy threshold (notes)", "advanced"],
  dtype: ["Precision", "advanced"],
  compile: ["Compile (CUDA)", "advanced"],
};
const SECTIONS = { music: "music", edit: "edit the prompt", advanced: "advanced" };

function nameOf(f) {
  const [label] = LABELS[f.dest] || [f.flag];
  return el("span", { class: "name" }, label, " ", el("small", { class: "flag", text: f.flag }));
}

function selectOf(f, id, values, empty = "(any)") {
  const s = el("select", { id, "data-dest": f.dest }, el("option", { value: "", text: empty }));
  for (const v of values) s.append(el("option", { value: v, text: v }));
  return s;
}

// Instruments: a search box over the General MIDI names and a multi-select; the value is "name,name".
function instrumentPicker(f, id, names) {
  const list = el("select", { id, multiple: "", size: "6", "data-dest": f.dest, "data-multi": "," });
  names.forEach((n) => list.append(el("option", { value: n, text: n })));
  const chosen = el("div", { class: "chosen", text: "any" });
  const search = el("input", { type: "search", placeholder: "search instruments", "aria-label": "search instruments" });
  search.addEventListener("input", () => {
    const q = search.value.trim().toLowerCase();
    for (const o of list.options) o.hidden = q !== "" && !o.value.includes(q);
  });
  const update = () => {
    const names = Array.from(list.selectedOptions, (o) => o.value);
    chosen.textContent = names.length ? names.join(", ") : "any";
  };
  list.addEventListener("change", update);
  list.refresh = update;
  return el("div", { class: "picker" }, search, list, chosen);
}

function control(f, id, config) {
  const ch = config.choices;
  if (f.dest === "instruments") return instrumentPicker(f, id, ch.instruments);
  if (f.dest === "key") return selectOf(f, id, ch.keys);
  if (f.dest === "density" || f.dest === "polyphony") return selectOf(f, id, ch.levels);
  if (f.dest === "time_sig" || f.dest === "tag") return selectOf(f, id, []);  // per checkpoint: fillCheckpoint
  if (f.dest === "add_track") return selectOf(f, id, ch.instruments, "(none)");
  if (f.kind === "choice") return selectOf(f, id, f.choices, `default (${f.default})`);
  // Text, not number inputs: the server's parser judges a value (and says why in one line).
  const shown = f.default != null && f.default !== false ? `default ${f.default}` : "";
  return el("input", { type: "text", id, "data-dest": f.dest, placeholder: shown });
}

function fieldRow(f, config) {
  const id = `opt-${f.dest}`;
  if (f.kind === "flag") {
    const box = el("input", { type: "checkbox", id, "data-dest": f.dest });
    return el("label", { class: "flag", for: id, title: f.help }, box, nameOf(f));
  }
  const row = el("div", { class: "field", title: f.help });
  row.append(el("label", { for: id }, nameOf(f)));
  if (f.alone) {
    // An option that may stand alone (nargs "?", e.g. --harmonize [VOICES]): a labelled box turns it on, the
    // text field gives its value.
    const on = el("input", { type: "checkbox", id: `${id}-on`, "data-alone": f.dest });
    row.append(el("label", { class: "flag", for: `${id}-on` }, on, `on (${f.flag} alone)`));
  }
  row.append(control(f, id, config));
  row.append(el("div", { class: "help", text: f.help }));
  return row;
}

export function buildForm(config, root) {
  const sections = {};
  for (const [key, title] of Object.entries(SECTIONS)) {
    const box = key === "advanced"
      ? el("details", { id: "advanced" }, el("summary", { text: title }))
      : el("fieldset", { id: `section-${key}` }, el("legend", { text: title }));
    sections[key] = box;
    root.append(box);
  }
  for (const f of config.fields) {
    const section = (LABELS[f.dest] || [null, "advanced"])[1];
    sections[section].append(fieldRow(f, config));
  }
}

// The parts of the form that depend on the checkpoint: its tags (hidden when none), its time signatures,
// whether --check-copies can run (greyed out with the reason when not) and whether it can edit a prompt.
export function fillCheckpoint(info) {
  const refill = (dest, values, hideEmpty) => {
    const s = document.querySelector(`[data-dest="${dest}"]`);
    if (!s) return;
    const keep = s.value;
    s.replaceChildren(el("option", { value: "", text: "(any)" }), ...values.map((v) => el("option", { value: v, text: v })));
    s.value = values.includes(keep) ? keep : "";
    if (hideEmpty) s.closest(".field").hidden = values.length === 0;
  };
  refill("tag", info.tags, true);
  refill("time_sig", info.time_sigs, true);
  const copies = document.querySelector('[data-dest="check_copies"]');
  if (copies) {
    copies.disabled = Boolean(info.copies_off);
    if (info.copies_off) copies.checked = false;
    const label = copies.closest("label");
    label.classList.toggle("off", Boolean(info.copies_off));
    label.title = info.copies_off || "";
    let why = label.querySelector(".why");
    if (!why) { why = el("div", { class: "why help" }); label.append(why); }
    why.textContent = info.copies_off ? `unavailable: ${info.copies_off}` : "";
  }
}

export function readOptions(config) {
  const options = {};
  for (const f of config.fields) {
    const input = document.querySelector(`[data-dest="${f.dest}"]`);
    if (!input || input.disabled) continue;
    if (f.kind === "flag") { if (input.checked) options[f.dest] = true; continue; }
    if (input.multiple) {
      const v = Array.from(input.selectedOptions, (o) => o.value);
      if (v.length) options[f.dest] = v.join(input.dataset.multi || ",");
      continue;
    }
    const v = input.value.trim();
    const alone = document.querySelector(`[data-alone="${f.dest}"]`);
    if (!v && alone && alone.checked) { options[f.dest] = true; continue; }
    if (!v) continue;
    options[f.dest] = f.kind === "multi" ? v.split(";").map((s) => s.trim()).filter(Boolean) : v;
  }
  return options;
}

export function restoreForm(config, request) {
  document.querySelector("#checkpoint").value = request.checkpoint ?? 0;
  const options = request.options || {};
  for (const f of config.fields) {
    const input = document.querySelector(`[data-dest="${f.dest}"]`);
    if (!input) continue;
    const v = options[f.dest];
    const alone = document.querySelector(`[data-alone="${f.dest}"]`);
    if (alone) alone.checked = v === true;
    if (f.kind === "flag") input.checked = v === true;
    else if (input.multiple) {
      const chosen = new Set(String(v || "").split(",").map((s) => s.trim()));
      for (const o of input.options) o.selected = chosen.has(o.value);
      if (input.refresh) input.refresh();
    } else input.value = v == null || v === true ? "" : Array.isArray(v) ? v.join("; ") : String(v);
  }
}

export function setField(dest, value) {
  const input = document.querySelector(`[data-dest="${dest}"]`);
  if (!input) return;
  input.value = value;
  input.dispatchEvent(new Event("input", { bubbles: true }));
}
