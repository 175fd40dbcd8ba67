"""The review page: one static HTML document with inline vanilla JavaScript, no build step.

Served by ``cai review`` (``cai.review.app``). One pair at a time: the conversation, the two
responses side by side (the order fixed per pair and annotator by the server), keys ``1`` /
``2`` (left / right better), ``t`` tie, ``s`` skip, ``u`` undo, and buttons for the same; a
progress bar and count. Every prompt and response goes in with ``textContent``, never
``innerHTML``: a response holding ``<script>`` shows those characters. After an answer the
page asks ``/api/reveal`` for the judge's label of the pair just answered and shows it.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cai review</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em; }
header { display: flex; gap: 1em; align-items: center; }
#bar { flex: 1; height: 8px; background: #eee; border-radius: 4px; overflow: hidden; }
#fill { height: 100%; background: #2a7; width: 0; }
.turn { white-space: pre-wrap; margin: .4em 0; padding: .5em; background: #f5f5f5; }
.role { font-weight: 600; margin-right: .4em; }
#pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; margin: 1em 0; }
.response { white-space: pre-wrap; border: 1px solid #ccc; padding: .7em; min-height: 4em; }
#buttons { position: sticky; bottom: 0; background: #fff; padding: .6em 0; border-top: 1px solid #eee; }
#buttons button { margin-right: .5em; padding: .4em .9em; }
#status, #reveal { color: #555; min-height: 1.4em; }
</style></head>
<body>
<header><strong>cai review</strong><span id="who"></span><div id="bar"><div id="fill"></div></div>
<span id="count"></span></header>
<section id="conversation"></section>
<section id="pair"><div><h3>1 (left)</h3><div class="response" id="left"></div></div>
<div><h3>2 (right)</h3><div class="response" id="right"></div></div></section>
<div id="buttons">
<button data-choice="left">1: left better</button><button data-choice="right">2: right better</button>
<button data-choice="tie">t: tie</button><button data-choice="skip">s: skip</button>
<button id="undo">u: undo</button></div>
<p id="reveal"></p><p id="status"></p>
<script>
"use strict";
const apiKey = new URLSearchParams(location.search).get("key");
const headers = apiKey ? {"Authorization": "Bearer " + apiKey} : {};
let state = null;
let busy = false;
const $ = (id) => document.getElementById(id);

async function call(method, path, body) {
  const init = {method, headers: {...headers}};
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({error: "not JSON"}));
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function render(next) {
  state = next;
  $("who").textContent = next.annotator;
  $("count").textContent = next.done + " / " + next.total;
  $("fill").style.width = (next.total ? 100 * next.done / next.total : 0) + "%";
  const conversation = $("conversation");
  conversation.replaceChildren();
  const item = next.item;
  if (!item) {
    conversation.textContent = "Every pair is labelled. Thank you.";
    $("left").textContent = "";
    $("right").textContent = "";
    return;
  }
  conversation.dataset.key = item.key;
  for (const message of item.prompt) {
    const turn = document.createElement("div");
    turn.className = "turn";
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = message.role + ":";
    turn.append(role, document.createTextNode(message.content));
    conversation.append(turn);
  }
  $("left").textContent = item.left;
  $("right").textContent = item.right;
}

async function act(work) {
  if (busy) return;
  busy = true;
  document.body.classList.add("busy");
  try {
    await work();
    $("status").textContent = "";
  } catch (error) {
    $("status").textContent = "error: " + error.message;
  } finally {
    busy = false;
    document.body.classList.remove("busy");
  }
}

function answer(choice) {
  return act(async () => {
    if (!state || !state.item) return;
    const key = state.item.key;
    render(await call("POST", "/api/answer", {key, choice}));
    const shown = await call("GET", "/api/reveal/" + encodeURIComponent(key));
    $("reveal").textContent = shown.judge === null ? "That pair has no judge label."
      : "The judge preferred " + shown.judge + " on that pair (margin "
        + shown.margin.toFixed(2) + "); you said " + choice + ".";
  });
}

function undo() {
  return act(async () => {
    render(await call("POST", "/api/undo"));
    $("reveal").textContent = "Undone.";
  });
}

const KEYS = {"1": "left", "2": "right", "t": "tie", "s": "skip"};
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "u") undo();
  else if (KEYS[event.key]) answer(KEYS[event.key]);
});
for (const button of document.querySelectorAll("button[data-choice]")) {
  button.addEventListener("click", () => answer(button.dataset.choice));
}
$("undo").addEventListener("click", undo);
act(async () => render(await call("GET", "/api/state")));
</script></body></html>
"""
