"""The chat page ``vlp serve`` shows at ``/``: one self-contained HTML file (no external scripts, styles or fonts)
that talks to the same server's ``/v1`` API. Pick an image or a video, ask, watch the answer stream in; later
questions continue the conversation (the media belong to its first question, as in ``vlp chat``). The key field is
only needed when the server has an API key; the key stays in the page.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vlp chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
  header { display: flex; gap: 1rem; align-items: baseline; flex-wrap: wrap; }
  h1 { font-size: 1.3rem; margin: 0; }
  #log { border: 1px solid #ccc; border-radius: 6px; min-height: 12rem; padding: .5rem; margin: 1rem 0; }
  .turn { margin: .4rem 0; white-space: pre-wrap; overflow-wrap: anywhere; }
  .user { color: #124; } .user::before { content: "you> "; font-weight: bold; }
  .answer::before { content: "vlp> "; font-weight: bold; }
  .error { color: #a00; }
  #preview img, #preview video { max-height: 8rem; margin-top: .3rem; }
  textarea { width: 100%; box-sizing: border-box; }
</style>
</head>
<body>
<header>
  <h1>vlp chat</h1>
  <span>model <b id="model">?</b></span>
  <label>API key <input id="key" type="password" autocomplete="off" placeholder="if the server has one"></label>
</header>
<p>
  <label>Image or video <input id="media" type="file" accept="image/*,video/*"></label>
  <button id="reset" type="button">New conversation</button>
</p>
<div id="preview"></div>
<div id="log"></div>
<textarea id="question" rows="3" placeholder="Ask about the image or video (Enter sends, Shift+Enter: new line)">
</textarea>
<button id="send" type="button">Send</button>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let messages = [], model = null, busy = false;

function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}

function line(cls, text) {
  const d = document.createElement("div");
  d.className = "turn " + cls;
  d.textContent = text;
  $("log").appendChild(d);
  return d;
}

// as Python's str.strip(): what vlp chat keeps of an answer in the conversation
const strip = (s) => s.replace(/^[\\s\\x1c-\\x1f\\x85]+|[\\s\\x1c-\\x1f\\x85]+$/g, "");

async function loadModel() {
  const r = await fetch("v1/models", {headers: headers()});
  const body = await r.json();
  if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
  model = body.data[0].id;
  $("model").textContent = model;
}

function readFile(file) {
  return new Promise((ok, fail) => {
    const fr = new FileReader();
    fr.onload = () => ok(fr.result);
    fr.onerror = () => fail(fr.error);
    fr.readAsDataURL(file);
  });
}

async function userContent(question) {
  const file = $("media").files[0];
  if (messages.length || !file) return question;  // media go with the first question only
  const url = await readFile(file);
  const kind = file.type.startsWith("video/") ? "video_url" : "image_url";
  return [{type: kind, [kind]: {url: url}}, {type: "text", text: question}];
}

async function stream(resp, out) {
  const reader = resp.body.getReader(), dec = new TextDecoder();
  let buf = "", text = "", pieces = 0;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let cut;
    while ((cut = buf.indexOf("\\n\\n")) >= 0) {
      const ev = buf.slice(0, cut); buf = buf.slice(cut + 2);
      if (!ev.startsWith("data: ")) continue;
      const data = ev.slice(6);
      if (data === "[DONE]") return text;
      const delta = (JSON.parse(data).choices[0] || {}).delta || {};
      if (delta.content) {
        text += delta.content; out.textContent = text; out.dataset.pieces = ++pieces;
      }
    }
  }
  return text;
}

async function send() {
  const question = $("question").value.trim();
  if (!question || busy) return;
  busy = true; $("send").disabled = true;
  try {
    if (!model) await loadModel();
    const content = await userContent(question);
    line("user", question);
    $("question").value = "";
    const out = line("answer", "");
    const resp = await fetch("v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(
      {model: model, stream: true, messages: messages.concat([{role: "user", content: content}])})});
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      out.remove();
      throw new Error(body.error ? body.error.message : resp.status + " " + resp.statusText);
    }
    const answer = await stream(resp, out);
    messages.push({role: "user", content: content}, {role: "assistant", content: strip(answer)});
    out.dataset.done = "1";
  } catch (e) {
    line("error", String(e.message || e));
  } finally {
    busy = false; $("send").disabled = false;
  }
}

function reset() {
  messages = []; $("log").textContent = ""; $("media").value = ""; $("preview").textContent = "";
}

$("media").addEventListener("change", () => {
  const file = $("media").files[0];
  messages = []; $("log").textContent = ""; $("preview").textContent = "";
  if (!file) return;
  const el = document.createElement(file.type.startsWith("video/") ? "video" : "img");
  el.src = URL.createObjectURL(file);
  if (el.tagName === "VIDEO") el.controls = true;
  $("preview").appendChild(el);
});
$("send").addEventListener("click", send);
$("reset").addEventListener("click", reset);
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
loadModel().catch(() => {});  // shown once a key is given, if the server wants one
</script>
</body>
</html>
"""
