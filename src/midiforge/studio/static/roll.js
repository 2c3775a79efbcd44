// The piano roll, drawn on a canvas from the notes the server sends (/api/roll, or an upload's answer):
// numbered bar lines (the numbers --infill takes), tracks by name and colour (the numbers --replace-track takes),
// and a playhead that follows the audio. Dragging across bars selects them; clicking a track (in the legend or
// a note of it) selects that track.
"use strict";

import { el } from "./dom.js";

const COLOURS = ["#f2a93b", "#5fb8f2", "#7ed38f", "#e76f8a", "#b48cf2", "#f2e25f", "#5fe0d0", "#f28c5f",
  "#9fb3c8", "#d9a7e8"];
const HEAD = 18; // px: the strip with the bar numbers
const HEIGHT = 220;

export function trackColour(number) {
  return COLOURS[(number - 1) % COLOURS.length];
}

// data: {seconds, bars: [s...], tracks: [{number, name, notes: [[t0, t1, pitch, vel]...]}]}
// opts: {onBars(a, b), onTrack(number), audio, label}
export function pianoRoll(data, opts = {}) {
  const canvas = el("canvas", { class: "roll-canvas", role: "img", "aria-label": opts.label || "piano roll" });
  canvas.style.height = `${HEIGHT}px`;
  const legend = el("div", { class: "legend" });
  const box = el("div", { class: "roll" }, legend, canvas);
  const state = { sel: null, track: null, drag: null, time: null };
  const notes = data.tracks.flatMap((t) => t.notes.map((n) => [...n, t.number]));
  const pitches = notes.map((n) => n[2]);
  const lo = (pitches.length ? Math.min(...pitches) : 60) - 2;
  const hi = (pitches.length ? Math.max(...pitches) : 72) + 2;
  const bars = data.bars.length > 1 ? data.bars : [0, Math.max(data.seconds, 1)];
  const total = Math.max(data.seconds, bars[bars.length - 1], 1e-3);
  const nBars = bars.length - 1;

  for (const t of data.tracks) {
    const b = el("button", { type: "button", class: "track", "data-track": t.number,
      title: `track ${t.number}: ${t.notes.length} notes${opts.onTrack ? " (click: rewrite this track)" : ""}` },
    el("span", { class: "swatch" }), `${t.number} ${t.name}`);
    b.querySelector(".swatch").style.background = trackColour(t.number);
    if (opts.onTrack) b.addEventListener("click", () => pickTrack(t.number));
    else b.disabled = true;
    legend.append(b);
  }

  const width = () => canvas.clientWidth || 600;
  const xOf = (t) => (t / total) * width();
  const tOf = (x) => (Math.max(0, Math.min(x, width())) / width()) * total;
  const barAt = (t) => {
    let i = 0;
    while (i + 1 < nBars && bars[i + 1] <= t) i++;
    return i + 1;
  };
  const yOf = (p) => HEAD + ((hi - p) / (hi - lo + 1)) * (HEIGHT - HEAD);

  function draw() {
    const w = width();
    const dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(w * dpr)) canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(HEIGHT * dpr);
    const g = canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.fillStyle = "#0c0f13";
    g.fillRect(0, 0, w, HEIGHT);
    const step = Math.max(1, Math.ceil(22 / Math.max(xOf(bars[1] - bars[0]), 1)));  // numbers ≥ 22 px apart
    g.font = "11px system-ui, sans-serif";
    g.textBaseline = "top";
    for (let i = 0; i < nBars; i++) {
      const x0 = xOf(bars[i]), x1 = xOf(bars[i + 1]);
      if (i % 2) { g.fillStyle = "#12161c"; g.fillRect(x0, HEAD, x1 - x0, HEIGHT - HEAD); }
      g.fillStyle = "#2c3340";
      g.fillRect(Math.round(x0), 0, 1, HEIGHT);
      if (i % step === 0) { g.fillStyle = "#8b94a5"; g.fillText(String(i + 1), x0 + 3, 3); }
    }
    if (state.sel) {
      const [a, b] = state.sel;
      const x0 = xOf(bars[a - 1]), x1 = xOf(bars[b]);
      g.fillStyle = "rgba(242, 169, 59, 0.18)";
      g.fillRect(x0, 0, x1 - x0, HEIGHT);
      g.fillStyle = "#f2a93b";
      g.fillRect(x0, 0, x1 - x0, 3);
    }
    const h = Math.max(2, (HEIGHT - HEAD) / (hi - lo + 1));
    for (const [t0, t1, pitch, vel, number] of notes) {
      g.globalAlpha = (state.track && state.track !== number ? 0.25 : 0.55) + (0.45 * vel) / 127;
      g.fillStyle = trackColour(number);
      g.fillRect(xOf(t0), yOf(pitch) - h / 2, Math.max(1.5, xOf(t1) - xOf(t0) - 0.5), h);
    }
    g.globalAlpha = 1;
    if (state.time != null) {
      g.fillStyle = "#ffffff";
      g.fillRect(Math.round(xOf(state.time)), 0, 2, HEIGHT);
    }
  }

  function pickTrack(number) {
    state.track = number;
    for (const b of legend.querySelectorAll(".track")) b.classList.toggle("picked", Number(b.dataset.track) === number);
    draw();
    if (opts.onTrack) opts.onTrack(number);
  }

  if (opts.onBars || opts.onTrack) {
    canvas.classList.add("selectable");
    const pos = (e) => e.clientX - canvas.getBoundingClientRect().left;
    canvas.addEventListener("pointerdown", (e) => {
      canvas.setPointerCapture(e.pointerId);
      state.drag = { x: pos(e), a: barAt(tOf(pos(e))), moved: false };
    });
    canvas.addEventListener("pointermove", (e) => {
      if (!state.drag || !opts.onBars) return;
      if (Math.abs(pos(e) - state.drag.x) > 4) state.drag.moved = true;
      const b = barAt(tOf(pos(e)));
      state.sel = [Math.min(state.drag.a, b), Math.max(state.drag.a, b)];
      draw();
    });
    canvas.addEventListener("pointerup", (e) => {
      const d = state.drag;
      state.drag = null;
      if (!d) return;
      if (!d.moved && opts.onTrack) {  // a click on a note: its track
        const t = tOf(pos(e)), y = e.clientY - canvas.getBoundingClientRect().top;
        const hit = notes.find((n) => n[0] <= t && t <= n[1] && Math.abs(yOf(n[2]) - y) <= 4);
        if (hit) { state.sel = null; pickTrack(hit[4]); return; }
      }
      if (!opts.onBars) return;
      const b = barAt(tOf(pos(e)));
      state.sel = [Math.min(d.a, b), Math.max(d.a, b)];
      draw();
      opts.onBars(state.sel[0], state.sel[1]);
    });
  }

  if (opts.audio) {
    const audio = opts.audio;
    const follow = () => {
      state.time = audio.currentTime;
      draw();
      if (!audio.paused && !audio.ended) requestAnimationFrame(follow);
    };
    for (const ev of ["play", "seeked", "timeupdate"]) audio.addEventListener(ev, follow);
    audio.addEventListener("ended", () => { state.time = null; draw(); });
  }

  // For the page's tests and for keyboard users' code: where bar n lies, in CSS pixels from the canvas' left.
  canvas.roll = {
    bars: nBars,
    barX: (n) => [xOf(bars[n - 1]), xOf(bars[n])],
    selection: () => state.sel,
    playhead: () => state.time,
    select: (a, b) => { state.sel = [a, b]; draw(); },
  };
  new ResizeObserver(draw).observe(canvas);
  requestAnimationFrame(draw);
  return box;
}
