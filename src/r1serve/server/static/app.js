// The page shell: the API key field and the two pages (playground, usage) behind #hashes,
// so each has a URL to bookmark and the back button works.
import { apiKey, setApiKey } from "./api.js";
import { initPlayground, loadModels } from "./playground.js";
import { initUsage, loadUsage } from "./usage.js";

const $ = (id) => document.getElementById(id);
const PAGES = ["playground", "usage"];

function currentPage() {
  const page = location.hash.slice(1);
  return PAGES.includes(page) ? page : "playground";
}

// moveFocus: after the user picks a page, focus its heading so keyboard and screen-reader
// users land on it; not on first load, where focus belongs at the top of the document.
function showPage(moveFocus) {
  const page = currentPage();
  for (const name of PAGES) {
    $(name).hidden = name !== page;
    const link = $(`nav-${name}`);
    if (name === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = page === "usage" ? "Usage · r1serve" : "Playground · r1serve";
  document.body.dataset.page = page;
  if (page === "usage") loadUsage();
  if (moveFocus) $(`${page}-title`).focus();
}

// The key field says only what the server has said: until it answers, that a key is saved
// (or none is); then whether it took the key (playground.js reports each verdict).
function showKeyState(message) {
  const key = apiKey();
  $("key-state").textContent = message ?? (key ? `key …${key.slice(-4)} saved` : "no key");
}

function showVerdict(accepted, key) {
  if (key !== apiKey()) return;  // an answer to a key no longer in use says nothing of this one
  const tail = key ? `key …${key.slice(-4)}` : "";
  if (accepted) showKeyState(key ? `${tail} accepted` : "no key needed: this server is open");
  else showKeyState(key ? `the server refused ${tail}` : "this server needs an API key");
  $("key-state").dataset.accepted = String(accepted);
}

function initKey() {
  $("api-key").value = apiKey();
  showKeyState();
  document.addEventListener("r1serve:key", (event) => showVerdict(event.detail.accepted, event.detail.key));
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey($("api-key").value);
    showKeyState(apiKey() ? `key …${apiKey().slice(-4)} saved; checking…` : "no key; checking…");
    refresh();
  });
  $("key-forget").addEventListener("click", () => {
    setApiKey("");
    $("api-key").value = "";
    showKeyState("key forgotten; checking…");
    refresh();
  });
}

// A new key can see other models and other usage.
function refresh() {
  loadModels();
  if (currentPage() === "usage") loadUsage();
}

// The skip link works from either page, and without a hash of its own (which would read
// as a page change).
function skipToMessage(event) {
  event.preventDefault();
  if (currentPage() !== "playground") {
    history.pushState(null, "", "#playground");
    showPage(false);
  }
  $("message").focus();
}

initKey();
initPlayground();
initUsage();
showPage(false);
$("skip-link").addEventListener("click", skipToMessage);
window.addEventListener("hashchange", () => showPage(true));
