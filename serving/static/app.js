"use strict";
const $ = id => document.getElementById(id);
let records = [];
let limits = {};

function place() {
  const la = $("latitude").value.trim(), lo = $("longitude").value.trim();
  return { lat: la === "" ? null : Number(la), lon: lo === "" ? null : Number(lo) };
}
function redraw() { drawWorld($("map"), place()); }
function setStatus(text) { $("status").textContent = text; }
function showError(text) { const e = $("error"); e.textContent = text; e.hidden = !text; }

function figure(src, caption, cls) {
  const f = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src; img.alt = caption; if (cls) img.className = cls;
  const c = document.createElement("figcaption"); c.textContent = caption;
  f.append(img, c); return f;
}
const fmt = s => (s === null || s === undefined) ? "no judge" : "score " + Number(s).toFixed(3);

function body(extra) {
  const p = place();
  const b = { barcode: $("barcode").value, latitude: p.lat, longitude: p.lon, seed: Number($("seed").value || 0) };
  if ($("steps").value) b.steps = Number($("steps").value);
  if ($("guidance").value) b.aligner_guidance_scale = Number($("guidance").value);
  if ($("cfg").value) b.guidance_scale = Number($("cfg").value);
  if ($("scheduler").value) b.scheduler = $("scheduler").value;
  return Object.assign(b, extra || {});
}

async function post(url, payload) {
  const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload) });
  const data = await r.json();
  if (!r.ok) throw new Error(`${r.status}: ${data.detail || JSON.stringify(data)}`);
  return data;
}

async function generate(ev) {
  ev.preventDefault(); showError(""); setStatus("generating…"); $("generate").disabled = true;
  const t0 = performance.now();
  try {
    const d = await post("/v1/phenotypes", body({ n: Number($("n").value || 4) }));
    const g = $("generated"); g.replaceChildren();
    d.images.forEach((b64, i) => g.append(figure("data:image/png;base64," + b64, `#${i + 1} · ${fmt(d.scores && d.scores[i])}`, "generated")));
    $("versions").textContent = `model ${d.model_version} · data ${d.data_version} · ${d.steps} steps · ${d.scheduler} · w ${d.aligner_guidance_scale} · cfg ${d.guidance_scale} · seed ${d.seed}`;
    $("generated-wrap").hidden = false;
    setStatus(`${d.images.length} images in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  } catch (e) { showError(String(e.message || e)); setStatus(""); }
  finally { $("generate").disabled = false; }
}

async function vary() {
  showError(""); setStatus("sweeping…"); $("vary").disabled = true;
  try {
    const d = await post("/v1/vary", body());
    const m = $("mutation"); m.replaceChildren();
    d.mutation.forEach(v => m.append(figure("data:image/png;base64," + v.image, `${Math.round(v.rate * 100)}% mutated · ${fmt(v.score)}`, "sweep")));
    const l = $("latsweep"); l.replaceChildren();
    d.latitude.forEach(v => l.append(figure("data:image/png;base64," + v.image, `lat ${v.latitude}° · ${fmt(v.score)}`, "sweep")));
    $("sweeps").hidden = false; setStatus("sweeps done");
  } catch (e) { showError(String(e.message || e)); setStatus(""); }
  finally { $("vary").disabled = false; }
}

function pickRecord() {
  const r = records.find(x => x.processid === $("record").value);
  if (!r) { $("real").hidden = true; return; }
  $("barcode").value = r.barcode;
  $("latitude").value = r.latitude === null ? "" : r.latitude;
  $("longitude").value = r.longitude === null ? "" : r.longitude;
  redraw();
  if (r.has_image) {
    $("real-img").src = `/v1/records/${encodeURIComponent(r.processid)}/image`;
    $("real-caption").textContent = `${r.species} (${r.processid}, ${r.split})`;
    $("real").hidden = false;
  } else { $("real").hidden = true; }
}

async function init() {
  redraw();
  $("map").addEventListener("click", ev => { const p = mapToPlace($("map"), ev); $("latitude").value = p.lat; $("longitude").value = p.lon; redraw(); });
  $("latitude").addEventListener("input", redraw); $("longitude").addEventListener("input", redraw);
  $("clear-place").addEventListener("click", () => { $("latitude").value = ""; $("longitude").value = ""; redraw(); });
  $("form").addEventListener("submit", generate);
  $("vary").addEventListener("click", vary);
  $("record").addEventListener("change", pickRecord);
  try {
    const info = await (await fetch("/v1/model")).json();
    limits = info.limits || {};
    $("n").max = limits.max_n; $("n").value = limits.default_n || 4; $("steps").max = limits.max_steps;
    $("steps").placeholder = limits.default_steps || info.sampling.steps; $("guidance").placeholder = info.sampling.aligner_guidance_scale;
    $("cfg").placeholder = info.sampling.guidance_scale; $("scheduler-default").textContent = `model default (${info.sampling.scheduler})`;
    $("model-info").textContent = `Model ${info.model_version}, data ${info.data_version}, ${info.image_size} px, judge: ${info.has_judge ? "yes" : "no"}.`;
  } catch (e) { $("model-info").textContent = "model info unavailable"; }
  try {
    records = await (await fetch("/v1/records")).json();
    for (const r of records) {
      const o = document.createElement("option"); o.value = r.processid;
      o.textContent = `${r.species} — ${r.processid} (${r.split}${r.has_image ? ", image" : ""})`;
      $("record").append(o);
    }
  } catch (e) { /* no records: paste a barcode */ }
  document.body.dataset.ready = "1";
}
init();
