// lorakit ui: the Jobs pages (list, New Job form, a job's live page). Uses api/esc/toast/view from app.js.
"use strict";

async function jobsPage() {
  const jobs = await api("GET", "/api/jobs");
  view.innerHTML = `<h1>Jobs</h1><p><a href="#/jobs/new"><button>New Job</button></a></p>
    <table><thead><tr><th>Name</th><th>State</th></tr></thead><tbody>
    ${jobs.map(j => `<tr><td><a href="#/jobs/${enc(j.name)}">${esc(j.name)}</a></td><td class="state">${esc(j.state || "new")}</td></tr>`).join("")
      || `<tr><td colspan="2">No jobs yet.</td></tr>`}</tbody></table>`;
}

// The form's fields come from the server (GET /api/job-fields: the trainer's
// own defaults, choices, ranges and help); none are copied here.
async function newJobPage() {
  const [models, datasets, form] = await Promise.all([api("GET", "/api/models"), api("GET", "/api/datasets"), api("GET", "/api/job-fields")]);
  const opt = list => list.map(v => `<option value="${esc(v)}">${esc(v)}</option>`).join("");
  const shown = d => Array.isArray(d) ? d.join(", ") : d;
  const input = f => `<label class="field" data-field="${esc(f.key)}" title="${esc(f.help)}${f.range ? ` (${esc(f.range)})` : ""}">${esc(f.label)}
      ${f.kind === "bool" ? `<input type="checkbox" name="${esc(f.key)}" ${f.default ? "checked" : ""}>`
        : f.kind === "select" ? `<select name="${esc(f.key)}">${f.choices.map(o =>
            `<option value="${esc(o)}" ${o === f.default ? "selected" : ""}>${esc(o || "auto (CUDA when available)")}</option>`).join("")}</select>`
        : `<input name="${esc(f.key)}" value="${esc(shown(f.default))}">`}
      <span class="field-error"></span></label>`;
  view.innerHTML = `<h1>New Job</h1>
    <form id="job-form" class="job-form">
      <label class="field" data-field="name">Name <input name="name" required><span class="field-error"></span></label>
      <label class="field" data-field="model.name_or_path">Model (in the root's models/ folder)
        <select name="model">${opt(models)}</select><span class="field-error"></span></label>
      <label class="field" data-field="datasets.folder_path">Dataset
        <select name="dataset">${opt(datasets.map(d => d.name))}</select><span class="field-error"></span></label>
      ${form.map(input).join("")}
      <details><summary>Advanced: the whole job file (TOML; leave empty for the defaults)</summary>
        <textarea name="toml" rows="16" spellcheck="false"></textarea></details>
      <p class="field-error" data-field="other"></p>
      <button type="submit">Create Job</button>
    </form>`;
  const f0 = document.getElementById("job-form");
  // An alpha follows its rank (alpha = rank: scale 1) until the user sets it.
  for (const f of form.filter(f => f.follows)) {
    const alpha = f0.elements[f.key], rank = f0.elements[f.follows];
    let own = false;
    alpha.addEventListener("input", () => (own = true));
    rank.addEventListener("input", () => { if (!own) alpha.value = rank.value; });
  }
  f0.onsubmit = async e => {
    e.preventDefault();
    const f = e.target, fields = {};
    for (const { key, kind } of form) {
      const el = f.elements[key];
      if (kind === "bool") fields[key] = el.checked;
      else if (kind === "int") fields[key] = parseInt(el.value, 10);
      else if (kind === "float") fields[key] = parseFloat(el.value);
      else if (kind === "ints") fields[key] = el.value.split(",").map(s => parseInt(s, 10)).filter(n => !isNaN(n));
      else if (el.value.trim()) fields[key] = el.value.trim();
    }
    const body = { name: f.name.value.trim(), model: f.model.value, dataset: f.dataset.value, fields };
    if (f.toml.value.trim()) body.toml = f.toml.value;
    view.querySelectorAll(".field-error").forEach(s => (s.textContent = ""));
    const r = await fetch("/api/jobs", { method: "POST", headers: { "X-Lorakit-Token": TOKEN, "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const data = await r.json().catch(() => ({}));
    if (r.ok) { location.hash = `#/jobs/${enc(body.name)}`; return; }
    // datasets[0].resolution → datasets.resolution: the form shows the first dataset.
    const key = (data.field || "").replace(/^datasets\[\d+\]/, "datasets");
    const slot = view.querySelector(`.field[data-field="${CSS.escape(key)}"] .field-error`) || view.querySelector('[data-field="other"]');
    slot.textContent = data.field ? `${data.field}: ${data.error}` : data.error;
  };
}

// Training and validation loss by step, as an SVG line chart.
function lossChart(loss, val) {
  const all = loss.concat(val);
  if (!all.length) return "<p>No loss yet.</p>";
  const W = 640, H = 220, P = 30;
  const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const pt = p => `${P + ((p[0] - x0) / (x1 - x0)) * (W - 2 * P)},${H - P - ((p[1] - y0) / (y1 - y0)) * (H - 2 * P)}`;
  const line = (pts, cls) => pts.length ? `<polyline class="${cls}" fill="none" points="${pts.map(pt).join(" ")}"/>` : "";
  return `<svg class="chart" viewBox="0 0 ${W} ${H}" role="img" aria-label="loss by step">
    <text x="${P}" y="14">${y1.toFixed(4)}</text><text x="${P}" y="${H - 8}">${y0.toFixed(4)} · steps ${x0}–${x1}</text>
    ${line(loss, "train")}${line(val, "val")}</svg>
    <p class="legend"><span class="train">training loss</span> · <span class="val">validation loss (fixed seed)</span></p>`;
}

async function jobPage(name) {
  clearTimeout(route.poll); // one refresh chain, however the page was reached
  const j = await api("GET", `/api/jobs/${enc(name)}`);
  const p = j.progress, base = `/api/jobs/${enc(name)}`;
  const state = j.state || "new";
  const eta = p.steps_per_second && state === "running" ? Math.round((p.total_steps - p.step) / p.steps_per_second) : null;
  const last = p.loss.slice(-10), smooth = last.length ? last.reduce((a, b) => a + b[1], 0) / last.length : null;
  const kb = b => `${(b / 1024).toFixed(0)} KiB`;
  const comparable = !["running", "queued"].includes(state) && p.checkpoints.length > 0;
  const trigger = ((j.toml.match(/^trigger_word\s*=\s*"([^"]*)"/m) || [])[1]) || "";
  view.innerHTML = `<h1>${esc(name)} <span class="state">${esc(state)}</span></h1>
    <p class="actions">
      <button data-act="start" ${["running", "queued", "done"].includes(state) ? "disabled" : ""}>▶ Start</button>
      <button data-act="stop" class="plain" ${["running", "queued"].includes(state) ? "" : "disabled"}>■ Stop</button>
      <button data-act="resume" class="plain" ${["stopped", "interrupted", "failed"].includes(state) ? "" : "disabled"}>Resume</button>
      <button data-act="extend" class="plain">Extend…</button>
      <button data-act="delete" class="plain">Delete…</button></p>
    ${j.error ? `<pre class="report problem error">${esc(j.error)}</pre>` : ""}
    <p class="progress">step <b>${p.step}</b> / ${p.total_steps || "?"}
      ${p.steps_per_second ? ` · ${p.steps_per_second.toFixed(2)} steps/s` : ""}${eta !== null ? ` · ETA ${eta} s` : ""}
      ${smooth !== null ? ` · loss ${smooth.toFixed(4)}` : ""}</p>
    <progress max="${p.total_steps || 1}" value="${p.step}"></progress>
    ${lossChart(p.loss, p.validation)}
    ${p.samples_step != null ? `<h2>Samples (prompts × steps, up to step ${p.samples_step})</h2>
      <img class="samples" alt="in-training samples" src="${base}/samples/grid.png?step=${p.samples_step}">` : ""}
    <h2>Checkpoints</h2><table><thead><tr><th>File</th><th>Step</th><th>Size</th><th>Validation loss</th></tr></thead><tbody>
    ${p.checkpoints.map(c => `<tr><td><a href="${base}/files/${enc(c.file)}" download>${esc(c.file)}</a></td><td>${c.step}</td>
      <td>${kb(c.bytes)}</td><td>${c.val_loss == null ? "" : c.val_loss.toFixed(5)}</td></tr>`).join("") || `<tr><td colspan="4">None yet.</td></tr>`}
    </tbody></table>
    ${comparable ? compareForm(name, p.checkpoints, trigger) : ""}
    <h2>Log</h2><pre class="report log">${esc(j.log)}</pre>
    <details><summary>Job file</summary><pre class="report">${esc(j.toml)}</pre></details>`;
  view.querySelectorAll("button[data-act]").forEach(b => (b.onclick = () => act(name, b.dataset.act)));
  if (comparable) wireCompare(name);
  if (["running", "queued"].includes(state)) route.poll = setTimeout(() => location.hash === `#/jobs/${enc(name)}` && jobPage(name), 2000);
}

async function act(name, what) {
  const base = `/api/jobs/${enc(name)}`;
  try {
    if (what === "delete") {
      if (!confirm(`Delete the job ${name}? Its checkpoints are kept.`)) return;
      await api("DELETE", `${base}?confirm=true`);
      location.hash = "#/jobs";
      return;
    }
    let body;
    if (what === "extend") {
      const steps = parseInt(prompt("New total number of steps:"), 10);
      if (!steps) return;
      body = { steps };
    }
    const r = await api("POST", `${base}/${what}`, body);
    if (r.done) toast(`${name}: ${r.done}`); // a Stop says what it did; pressed again it escalates
    jobPage(name);
  } catch (err) { toast(err.message); }
}

pages.jobs = p => (p[1] === "new" ? newJobPage() : p[1] ? jobPage(p[1]) : jobsPage());
