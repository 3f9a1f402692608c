// lorakit ui: a small single-page app over the JSON API (no framework, no build step).
"use strict";
const TOKEN = document.querySelector('meta[name="lorakit-token"]').content;
const view = document.getElementById("view");

function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function toast(msg) {
  const t = document.getElementById("toast");
  t.textContent = msg; t.style.display = "block";
  clearTimeout(toast.timer); toast.timer = setTimeout(() => (t.style.display = "none"), 4000);
}
// Every request carries the token header (mutating ones need it).
async function api(method, path, body, raw) {
  const opts = { method, headers: { "X-Lorakit-Token": TOKEN } };
  if (raw !== undefined) { opts.body = raw; }
  else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}
const enc = encodeURIComponent;

async function datasetsPage() {
  const list = await api("GET", "/api/datasets");
  view.innerHTML = `<h1>Datasets</h1>
    <form class="inline" id="new-dataset"><input name="name" id="new-dataset-name" placeholder="new dataset name" required>
    <button type="submit">New Dataset</button></form>
    <table><thead><tr><th>Name</th><th>Images</th><th>Captioned</th></tr></thead><tbody>
    ${list.map(d => `<tr><td><a href="#/datasets/${enc(d.name)}">${esc(d.name)}</a></td><td>${d.images}</td><td>${d.captioned}</td></tr>`).join("")
      || `<tr><td colspan="3">No datasets yet.</td></tr>`}
    </tbody></table>`;
  document.getElementById("new-dataset").onsubmit = async e => {
    e.preventDefault();
    const name = e.target.name.value.trim();
    try { await api("POST", "/api/datasets", { name }); location.hash = `#/datasets/${enc(name)}`; }
    catch (err) { toast(err.message); }
  };
}

async function datasetPage(name) {
  const d = await api("GET", `/api/datasets/${enc(name)}`);
  const base = `/api/datasets/${enc(name)}`;
  view.innerHTML = `<h1>${esc(name)}</h1>
    <form class="inline" id="upload"><input type="file" id="files" multiple accept=".png,.jpg,.jpeg,.webp,.bmp">
      <label>into <select id="upload-folder">${d.folders.map(f => `<option value="${esc(f.name)}">${f.name === "." ? "this folder" : `${esc(f.name)} (${f.repeats} repeats)`}</option>`).join("")}</select></label>
      <input id="upload-new-folder" placeholder="or a new repeat folder: 10_name" size="28">
      <button type="submit">Add Images</button></form>
    <form class="inline" id="bulk">
      <select name="op"><option value="add_trigger">Add trigger</option><option value="remove_tags">Remove tags</option>
        <option value="replace_tag">Replace tag</option></select>
      <input name="a" placeholder="trigger word / tags (comma-separated) / old tag"><input name="b" placeholder="new tag (replace)">
      <button type="submit">Apply</button>
      <button type="button" class="plain" id="check">Check dataset</button></form>
    <details id="autocaption"><summary>Auto-caption with a vision model (any OpenAI-compatible endpoint)</summary>
      <form class="inline" id="autocaption-form">
        <select name="endpoint" id="autocaption-endpoint" required></select>
        <input name="model" placeholder="model (default: the endpoint's)">
        <input name="trigger" placeholder="trigger word">
        <input name="remove" placeholder="tags to remove (comma-separated)" size="30">
        <input name="character" placeholder="character description (optional)" size="30">
        <label><input type="checkbox" name="natural"> sentences</label>
        <label><input type="checkbox" name="overwrite"> replace existing captions</label>
        <button type="submit">Caption</button><button type="button" class="plain" id="autocaption-stop">Stop</button>
      </form><div id="autocaption-out"></div></details>
    <div id="check-out"></div>
    ${d.problems.map(p => `<p class="problem ${p.severity}">${esc(p.file)}: ${esc(p.message)}</p>`).join("")}
    ${d.images.length ? d.folders.filter(f => f.images).map(f => folderSection(f, d.images, base)).join("")
      : "<p>No images yet: add some above.</p>"}`;
  view.querySelectorAll(".card").forEach(card => {
    const ta = card.querySelector("textarea"), mark = card.querySelector(".saved");
    let last = ta.value;
    const save = async () => {
      if (ta.value === last) return;
      try {
        const r = await api("PUT", `${base}/captions/${enc(card.dataset.file)}`, { caption: ta.value });
        last = ta.value = r.caption; mark.textContent = "saved";
      } catch (err) { toast(err.message); }
    };
    ta.addEventListener("blur", save);
    ta.addEventListener("keydown", e => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); save(); } });
  });
  document.getElementById("upload").onsubmit = async e => {
    e.preventDefault();
    const files = [...document.getElementById("files").files];
    const folder = document.getElementById("upload-new-folder").value.trim() || document.getElementById("upload-folder").value;
    let ok = 0;
    for (const f of files) {
      try { await api("PUT", `${base}/images/${enc(f.name)}?folder=${enc(folder)}`, undefined, f); ok++; }
      catch (err) { toast(`${f.name}: ${err.message}`); }
    }
    if (ok) { toast(`added ${ok} image(s)`); datasetPage(name); }
  };
  document.getElementById("bulk").onsubmit = async e => {
    e.preventDefault();
    const f = e.target, op = f.op.value, a = f.a.value, b = f.b.value;
    const body = op === "add_trigger" ? { op, word: a.trim() }
      : op === "remove_tags" ? { op, tags: a.split(",").map(s => s.trim()).filter(Boolean) }
      : { op, old: a.trim(), new: b.trim() };
    try { const r = await api("POST", `${base}/edit`, body); toast(`changed ${r.changes.length} caption(s)`); datasetPage(name); }
    catch (err) { toast(err.message); }
  };
  wireAutocaption(name);
  document.getElementById("check").onclick = async () => {
    try {
      const r = await api("GET", `${base}/check`);
      document.getElementById("check-out").innerHTML = `<pre class="report">${esc(r.report)}</pre>`;
      // Each problem also beside its image.
      view.querySelectorAll(".card .check-problem").forEach(e => e.remove());
      for (const p of r.problems) {
        const card = [...view.querySelectorAll(".card")].find(c => c.dataset.file === p.file);
        if (card) card.querySelector(".name").insertAdjacentHTML("afterend",
          `<div class="problem check-problem ${p.severity}">${esc(p.message)}</div>`);
      }
    } catch (err) { toast(err.message); }
  };
}

// One folder of a dataset: the dataset's own, or a kohya repeat folder (10_name: seen 10 times per epoch).
function folderSection(f, images, base) {
  const title = f.name === "." ? "" : `<h2 class="folder">${esc(f.name)} · ${f.repeats} repeats · ${f.images} image(s)</h2>`;
  return `${title}<div class="grid">${images.filter(i => i.folder === f.name).map(i => `<div class="card" data-file="${esc(i.file)}">
      <img loading="lazy" src="${base}/images/${enc(i.file)}" alt="${esc(i.file)}">
      <div class="name">${esc(i.file)} · ${i.width}×${i.height}</div>
      ${i.problems.map(p => `<div class="problem ${p.severity}">${esc(p.message)}</div>`).join("")}
      <textarea aria-label="caption of ${esc(i.file)}">${esc(i.caption)}</textarea><span class="saved"></span></div>`).join("")}</div>`;
}

// Pages by the first part of the address (#/datasets/NAME, #/jobs/NAME); jobs.js adds its own.
const pages = { datasets: p => (p[1] ? datasetPage(p[1]) : datasetsPage()) };
// Auto-captioning: start, then poll the run until it finishes.
function wireAutocaption(name) {
  const base = `/api/datasets/${enc(name)}/autocaption`;
  const out = document.getElementById("autocaption-out");
  let sawRunning = false; // reload the grid once, when a run seen running has finished
  const poll = async () => {
    const st = await api("GET", base);
    if (st.state === "none") return;
    const failed = st.results.filter(r => r.error);
    out.innerHTML = `<p>${st.state === "running" ? "captioning…" : "finished"}: ${st.done} / ${st.total}
      ${st.error ? `<span class="problem error">${esc(st.error)}</span>` : ""}</p>
      ${failed.map(r => `<p class="problem error">${esc(r.file)}: ${esc(r.error)}</p>`).join("")}`;
    if (st.state === "running") {
      sawRunning = true;
      setTimeout(() => document.getElementById("autocaption-out") && poll(), 1000);
    } else if (sawRunning) {
      datasetPage(name).then(() => (document.getElementById("autocaption").open = true));
    }
  };
  document.getElementById("autocaption-form").onsubmit = async e => {
    e.preventDefault();
    const f = e.target;
    const body = { endpoint: f.endpoint.value, model: f.model.value.trim() || null,
      trigger: f.trigger.value.trim() || null,
      remove: f.remove.value.split(",").map(s => s.trim()).filter(Boolean), character: f.character.value.trim() || null,
      natural: f.natural.checked, overwrite: f.overwrite.checked };
    try { await api("POST", base, body); poll(); } catch (err) { toast(err.message); }
  };
  // The endpoints lorakit ui was started with (--caption-endpoint); keys stay in its environment.
  api("GET", "/api/caption-endpoints").then(list => {
    const sel = document.getElementById("autocaption-endpoint");
    if (!sel) return;
    sel.innerHTML = list.length
      ? list.map(e => `<option value="${esc(e.id)}">${esc(e.url)}${e.key_env ? ` (key: $${esc(e.key_env)})` : ""}</option>`).join("")
      : `<option value="">none: start lorakit ui with --caption-endpoint URL</option>`;
  }).catch(err => toast(err.message));
  document.getElementById("autocaption-stop").onclick = () => api("POST", `${base}/stop`).catch(err => toast(err.message));
  poll();
}

async function route() {
  clearInterval(route.poll);
  // a bug the job queue's runner hit (it carries on): said on every page
  api("GET", "/api/status").then(s => {
    document.getElementById("fault").innerHTML = s.queue_fault
      ? `<p class="problem error">The job queue hit an internal error (a bug in lorakit; please report it), and carries on: ${esc(s.queue_fault)}</p>` : "";
  }).catch(() => {});
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  try { await (pages[parts[0]] || pages.datasets)(parts); }
  catch (err) { view.innerHTML = `<p class="problem error">${esc(err.message)}</p>`; }
}
window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);
