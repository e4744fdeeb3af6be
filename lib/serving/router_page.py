"""The page of the one-port server (07_serve.py --all): every installed model, and a picker per kind to try one —
chat (streamed), embeddings, classification, reranking, transcription — through the same API apps use. One HTML file
with a little script of its own: nothing loads from elsewhere, and every request is a same-origin JSON (or
multipart, for audio) POST to /v1, with the API key the user types when the server asks for one.

    html = router_page(models, models_dir, needs_key)    # models: /v1/models' cards

Not here: the router itself (lib.serving.router); the single-model pages (lib.serving.ui, lib.serving.task_ui).
"""

from __future__ import annotations

import html
import json

# kind -> (section title, what the user gives, the button)
KINDS = {
    "chat": ("Chat", "a message", "Send"),
    "embedding": ("Embeddings", "a text", "Embed"),
    "classifier": ("Classify", "a text", "Classify"),
    "reranker": ("Rerank", "a query, then one document per line", "Rerank"),
    "speech": ("Transcribe", "an audio file", "Transcribe"),
}

STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
section{border:1px solid #ddd;border-radius:8px;padding:.8rem 1rem;margin:1rem 0}
textarea{width:100%;min-height:4rem}pre{white-space:pre-wrap;background:#f6f6f6;padding:.5rem;min-height:1.5rem}
table{border-collapse:collapse}td,th{padding:.2rem .8rem;text-align:left;border-bottom:1px solid #eee}"""

SCRIPT = """
const key = () => document.getElementById("key").value;
const headers = (json) => Object.assign(json ? {"Content-Type": "application/json"} : {},
  key() ? {"Authorization": "Bearer " + key()} : {});
async function post(path, body) {
  const r = await fetch(path, {method: "POST", headers: headers(!(body instanceof FormData)),
                               body: body instanceof FormData ? body : JSON.stringify(body)});
  const data = await r.json();
  if (!r.ok) throw new Error((data.error && data.error.message) || r.statusText);
  return data;
}
async function run(kind) {
  const model = document.getElementById("pick-" + kind).value;
  const input = document.getElementById(kind + "-in");
  const out = document.getElementById(kind + "-out");
  out.textContent = "…";
  try {
    if (kind === "chat") {
      const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(true), body: JSON.stringify(
        {model, stream: true, messages: [{role: "user", content: input.value}]})});
      if (!r.ok) { const e = await r.json(); throw new Error(e.error ? e.error.message : r.statusText); }
      out.textContent = "";
      const reader = r.body.getReader(), dec = new TextDecoder();
      let rest = "";
      for (;;) {
        const {done, value} = await reader.read();
        if (done) break;
        rest += dec.decode(value, {stream: true});
        const events = rest.split("\\n\\n"); rest = events.pop();
        for (const ev of events) {
          const data = ev.replace(/^data: /, "");
          if (data === "[DONE]") continue;
          const delta = JSON.parse(data).choices?.[0]?.delta?.content;
          if (delta) out.textContent += delta;
        }
      }
    } else if (kind === "embedding") {
      const v = (await post("/v1/embeddings", {model, input: input.value})).data[0].embedding;
      out.textContent = v.length + " dimensions: [" + v.slice(0, 6).map(x => x.toFixed(4)).join(", ") + ", …]";
    } else if (kind === "classifier") {
      const d = await post("/v1/classify", {model, input: input.value});
      out.textContent = JSON.stringify(d.data[0], null, 1);
    } else if (kind === "reranker") {
      const [query, ...documents] = input.value.split("\\n").filter(s => s.trim());
      const d = await post("/v1/rerank", {model, query, documents});
      out.textContent = d.results.map(x => x.relevance_score.toFixed(3) + "  " + documents[x.index]).join("\\n");
    } else {
      const form = new FormData();
      form.append("model", model); form.append("file", input.files[0]);
      out.textContent = (await post("/v1/audio/transcriptions", form)).text;
    }
  } catch (e) { out.textContent = "error: " + e.message; }
}
"""


def router_page(models: list[dict], models_dir: str, needs_key: bool) -> str:
    """The page: a section per kind that has installed models (a picker, an input, a button, the answer), then the
    table of every model."""
    esc = html.escape
    sections = []
    for kind, (title, what, button) in KINDS.items():
        names = [m["id"] for m in models if m["kind"] == kind]
        if not names:
            continue
        options = "".join(f'<option value="{esc(n)}">{esc(n)}</option>' for n in names)
        field = (f'<input type="file" id="{kind}-in" accept="audio/*">' if kind == "speech" else
                 f'<textarea id="{kind}-in" placeholder="{esc(what)}"></textarea>')
        sections.append(f'<section id="{kind}"><h2>{esc(title)}</h2><label>model <select id="pick-{kind}">{options}'
                        f'</select></label>{field}<button id="{kind}-go" onclick=\'run({json.dumps(kind)})\'>'
                        f'{esc(button)}</button><pre id="{kind}-out"></pre></section>')
    rows = "".join(f"<tr><td>{esc(m['id'])}</td><td>{esc(str(m['kind']))}</td><td>{esc(str(m.get('engine')))}</td>"
                   f"<td>{'loaded' if m.get('loaded') else ''}</td></tr>" for m in models)
    key = ('<p><label>API key <input type="password" id="key" autocomplete="off"></label></p>' if needs_key
           else '<input type="hidden" id="key" value="">')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Models at Home</title><style>{STYLE}</style>"
            f"</head><body><h1>Models at Home</h1><p>Every model installed in {esc(str(models_dir))}, on OpenAI's API "
            f"at <code>/v1</code> and Ollama's at <code>/api</code>; a model loads on its first request.</p>{key}"
            f"{''.join(sections)}<h2>Installed</h2><table><tr><th>model</th><th>kind</th><th>engine</th><th></th></tr>"
            f"{rows}</table><script>{SCRIPT}</script></body></html>")
