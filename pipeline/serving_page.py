"""The page a server shows at ``/``: choose an image and a direction, see input and output
side by side (plain HTML and a little script, nothing loaded from elsewhere)."""

from __future__ import annotations


def page_html(directions: tuple[str, ...]) -> str:
    """A page to try the model: choose an image and a direction, see both side by side."""
    options = "".join(f'<option value="{d}">{d}</option>' for d in directions)
    return PAGE.replace("{options}", options)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CycleGAN</title>
<style>
body{font:15px sans-serif;margin:2em;color:#222}
.pair{display:flex;gap:1em;margin-top:1em}
figure{margin:0}
img{max-width:45vw;border:1px solid #ccc;min-width:64px;min-height:64px}
#status{margin-left:1em}
.error{color:#b00}
</style></head>
<body>
<h1>CycleGAN</h1>
<p>POST an image to <code>/translate/{AtoB|BtoA}</code> (query: <code>size</code>,
<code>format</code>); see <a href="info">/info</a>, <a href="stats">/stats</a>,
<a href="healthz">/healthz</a>.</p>
<input type="file" id="file" accept="image/*">
<select id="direction">{options}</select>
<button id="go">Translate</button><span id="status"></span>
<div class="pair">
<figure><img id="input" alt="input"><figcaption>input</figcaption></figure>
<figure><img id="output" alt="output"><figcaption>output</figcaption></figure>
</div>
<script>
const $ = (id) => document.getElementById(id);
const base = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
$("file").addEventListener("change", () => {
  const f = $("file").files[0];
  if (f) $("input").src = URL.createObjectURL(f);
});
$("go").addEventListener("click", async () => {
  const f = $("file").files[0], status = $("status");
  status.className = "";
  if (!f) { status.textContent = "choose an image first"; return; }
  status.textContent = "translating...";
  const started = performance.now();
  const r = await fetch(base + "translate/" + $("direction").value, {method: "POST", body: f});
  if (!r.ok) {
    const e = await r.json().catch(() => ({error: r.statusText}));
    status.className = "error";
    status.textContent = r.status + ": " + e.error;
    return;
  }
  $("output").src = URL.createObjectURL(await r.blob());
  status.textContent = "done in " + Math.round(performance.now() - started) + " ms";
});
</script>
</body></html>
"""
