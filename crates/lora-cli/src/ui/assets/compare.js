// lorakit ui: the Compare section of a job's page (prompts × checkpoints at a fixed seed and strength,
// click a cell to enlarge it with its parameters, mark the step that is "the one", export it).
"use strict";

function compareForm(name, checkpoints, trigger) {
  const base = `/api/jobs/${enc(name)}`;
  const t = trigger || "[trigger]";
  return `<h2>Compare</h2>
    <form id="compare-form" class="inline">
      ${checkpoints.map(c => `<label><input type="checkbox" name="ckpt" value="${esc(c.file)}" checked> step ${c.step}</label>`).join("")}
    </form>
    <form id="compare-settings" class="inline">
      <textarea name="prompts" rows="3" cols="60" aria-label="prompts, one per line">${esc(`${t}, standing, outdoors\n${t}, sitting, indoors`)}</textarea>
      <label>seed <input name="seed" value="42" size="6"></label>
      <label>strength <input name="strength" value="0.8" size="4"></label>
      <label>steps <input name="steps" value="25" size="4"></label>
      <label>size <input name="size" value="" size="5" placeholder="job's"></label>
      <button type="submit">Render grid</button>
    </form>
    <div id="compare-out"></div>
    <div id="enlarged" class="modal" hidden></div>`;
}

async function showCompare(name) {
  const base = `/api/jobs/${enc(name)}`;
  const out = document.getElementById("compare-out");
  if (!out) return;
  const g = await api("GET", `${base}/compare`);
  if (g.state === "running" || g.state === "queued") {
    // grids share the queue with training runs: one thing on the GPU at a time
    const what = g.state === "queued" ? "queued: it renders when the running job ends…" : "rendering…";
    out.innerHTML = `<p class="state">${what}</p><pre class="report">${esc(g.log)}</pre>`;
    setTimeout(() => document.getElementById("compare-out") && showCompare(name), 1000);
    return;
  }
  if (g.state === "failed") { out.innerHTML = `<pre class="report problem error">${esc(g.log)}</pre>`; return; }
  if (g.state !== "done") { out.innerHTML = ""; return; }
  const cols = [...new Set(g.cells.map(c => c.col))].sort((a, b) => a - b);
  const rows = [...new Set(g.cells.map(c => c.row))].sort((a, b) => a - b);
  const at = (r, c) => g.cells.find(x => x.row === r && x.col === c);
  // The column's checkpoint is the <lora:NAME:…> of its cells' parameters.
  const colFile = c => ((at(rows[0], c) || {}).parameters || "").match(/<lora:([^:>]+):/);
  const picked = g.picked ? g.picked.file : null;
  out.innerHTML = `<table class="grid-table"><thead><tr><th></th>${cols.map(c => {
      const m = colFile(c), file = m ? `${m[1]}.safetensors` : "";
      return `<th>${esc(m ? m[1] : "")}<br><button class="plain pick" data-file="${esc(file)}">${file === picked ? "★ the one" : "Mark as the one"}</button></th>`;
    }).join("")}</tr></thead><tbody>
    ${rows.map(r => `<tr><th>${esc(g.prompts[r] || `prompt ${r + 1}`)}</th>${cols.map(c => {
      const cell = at(r, c);
      return `<td>${cell ? `<img class="cell" src="${base}/compare/${enc(cell.file)}" data-params="${esc(cell.parameters || "")}" alt="${esc(cell.file)}">` : ""}</td>`;
    }).join("")}</tr>`).join("")}</tbody></table>
    ${picked ? `<p>The one: <b>${esc(picked)}</b> <button id="export">Export as the final LoRA</button></p>` : ""}`;
  out.querySelectorAll("img.cell").forEach(img => (img.onclick = () => {
    const m = document.getElementById("enlarged");
    m.innerHTML = `<div class="modal-body"><img src="${img.src}" alt="enlarged"><pre class="params">${esc(img.dataset.params)}</pre>
      <button class="plain" id="close-enlarged">Close</button></div>`;
    m.hidden = false;
    m.onclick = e => { if (e.target === m || e.target.id === "close-enlarged") m.hidden = true; };
  }));
  out.querySelectorAll("button.pick").forEach(b => (b.onclick = async () => {
    try { await api("POST", `${base}/pick`, { file: b.dataset.file }); showCompare(name); } catch (err) { toast(err.message); }
  }));
  const ex = document.getElementById("export");
  if (ex) ex.onclick = async () => {
    try { const r = await api("POST", `${base}/export`); toast(`exported to ${r.exported}`); } catch (err) { toast(err.message); }
  };
}

function wireCompare(name) {
  const settings = document.getElementById("compare-settings");
  if (!settings) return;
  settings.onsubmit = async e => {
    e.preventDefault();
    const f = e.target;
    const checkpoints = [...document.querySelectorAll('#compare-form input[name="ckpt"]:checked')].map(i => i.value);
    const body = { checkpoints, prompts: f.prompts.value.split("\n"), seed: parseInt(f.seed.value, 10),
      strength: parseFloat(f.strength.value), steps: parseInt(f.steps.value, 10) };
    if (f.size.value.trim()) body.size = parseInt(f.size.value, 10);
    try { await api("POST", `/api/jobs/${enc(name)}/compare`, body); showCompare(name); } catch (err) { toast(err.message); }
  };
  showCompare(name);
}
