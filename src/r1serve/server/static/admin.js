// The usage page's admin part, shown to admin keys only: every key with its limits, its
// usage over the period and its last request; keys made and revoked here, as the DeepSeek
// and OpenAI platforms' consoles do. Everything goes through /v1/admin/* (platform_routes.py).
import { explain, getJSON, request } from "./api.js";

const $ = (id) => document.getElementById(id);
const count = new Intl.NumberFormat("en");

function el(tag, text, className) {
  const n = document.createElement(tag);
  if (text !== undefined) n.textContent = text;
  if (className) n.className = className;
  return n;
}

const limit = (v) => (v === null || v === undefined ? "unlimited" : count.format(v));

function keyRow(k, used, since) {
  const tr = el("tr");
  tr.dataset.key = k.id;
  const lastUse = k.last_used_at ? k.last_used_at.replace("T", " ").replace("+00:00", " UTC") : "never";
  const who = el("td");
  who.append(el("span", k.name + (k.is_admin ? " (admin)" : ""), "key-name"), el("span", k.id, "key-id"));
  tr.append(who);
  const cells = [limit(k.quota_tokens), count.format(k.used_tokens), limit(k.rpm), limit(k.tpm),
    count.format(used?.requests ?? 0), count.format(used?.total_tokens ?? 0), lastUse, k.revoked ? "revoked" : "live"];
  for (const c of cells) tr.append(el("td", c));
  const action = el("td");
  if (!k.revoked) {
    const revoke = el("button", "Revoke", "revoke");
    revoke.type = "button";
    revoke.setAttribute("aria-label", `Revoke ${k.name} (${k.id})`);
    revoke.addEventListener("click", () => revokeKey(k, since));
    action.append(revoke);
  }
  tr.append(action);
  return tr;
}

const HEAD = ["Key", "Quota", "Used (all time)", "RPM", "TPM", "Requests", "Tokens", "Last use", "State", ""];

export async function loadAdmin(since) {
  $("admin").hidden = false;
  const query = since ? `&since=${since}` : "";
  try {
    const [keys, usage] = await Promise.all([getJSON("/v1/admin/keys?include_revoked=true"),
      getJSON(`/v1/admin/usage?by=key${query}`)]);
    const byKey = new Map(usage.data.map((r) => [r.key, r]));
    const head = el("tr");
    for (const h of HEAD) head.append(el("th", h));
    const thead = el("thead");
    thead.append(head);
    const tbody = el("tbody");
    for (const k of keys.data) tbody.append(keyRow(k, byKey.get(k.id), since));
    $("admin-keys").replaceChildren(thead, tbody);
    $("admin-status").textContent = `${keys.data.length} keys; requests and tokens over the period shown.`;
  } catch (err) {
    $("admin-status").textContent = explain(err);
  }
}

export function hideAdmin() {
  $("admin").hidden = true;
}

async function revokeKey(k, since) {
  try {
    await request(`/v1/admin/keys/${encodeURIComponent(k.id)}`, { method: "DELETE" });
    $("admin-status").textContent = `Revoked ${k.name} (${k.id}): every server refuses it from its next request.`;
  } catch (err) {
    $("admin-status").textContent = explain(err);
  }
  await loadAdmin(since);
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

async function createKey(event, since) {
  event.preventDefault();
  const body = { name: $("new-key-name").value.trim(), quota_tokens: numberOrNull("new-key-quota"),
    rpm: numberOrNull("new-key-rpm"), tpm: numberOrNull("new-key-tpm"), admin: $("new-key-admin").checked };
  try {
    const made = await (await request("/v1/admin/keys", { method: "POST", body })).json();
    $("new-key-secret").textContent = made.key;
    $("new-key-made").hidden = false;
    $("new-key-form").reset();
    $("admin-status").textContent = `Created ${made.name} (${made.id}).`;
  } catch (err) {
    $("admin-status").textContent = explain(err);
  }
  await loadAdmin(since());
}

export function initAdmin(since) {
  $("new-key-form").addEventListener("submit", (event) => createKey(event, since));
}
