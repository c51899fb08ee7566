// Markdown as models write it (fenced code, inline code, bold, italics, headings, lists,
// tables, links), rendered into DOM nodes. Safe by construction: every piece of the model's
// text goes in through textContent, never as HTML, so an answer holding "<img onerror=…>"
// shows those characters and runs nothing. Half-written markdown (a stream in progress)
// renders as far as it goes: an open code fence is a code block up to the end.

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*\d+[.)]\s+(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/;
// Inline: `code`, **bold**, *italic* or _italic_, [text](http…); first match wins.
const INLINE = /(`+)([^`]|[^`][\s\S]*?[^`])\1|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*|\b_([^_]+)_\b|\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/;

function node(tag, className) {
  const n = document.createElement(tag);
  if (className) n.className = className;
  return n;
}

export function renderInline(text, parent) {
  let rest = text;
  while (rest) {
    const m = INLINE.exec(rest);
    if (!m) {
      parent.append(rest);
      return parent;
    }
    if (m.index) parent.append(rest.slice(0, m.index));
    if (m[1]) {
      const code = node("code");
      code.textContent = m[2];
      parent.append(code);
    } else if (m[3]) {
      parent.append(renderInline(m[3], node("strong")));
    } else if (m[4] || m[5]) {
      parent.append(renderInline(m[4] || m[5], node("em")));
    } else {
      const a = node("a");
      a.href = m[7];  // http(s) only, by the pattern: no javascript: links
      a.rel = "noopener noreferrer";
      a.target = "_blank";
      a.textContent = m[6];
      parent.append(a);
    }
    rest = rest.slice(m.index + m[0].length);
  }
  return parent;
}

function cells(line) {
  return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
}

function table(lines) {
  const t = node("table");
  const head = node("thead");
  const row = node("tr");
  for (const c of cells(lines[0])) row.append(renderInline(c, node("th")));
  head.append(row);
  const body = node("tbody");
  for (const line of lines.slice(2)) {
    const tr = node("tr");
    for (const c of cells(line)) tr.append(renderInline(c, node("td")));
    body.append(tr);
  }
  t.append(head, body);
  const wrap = node("div", "table-scroll");
  wrap.append(t);
  return wrap;
}

function codeBlock(lang, lines) {
  const pre = node("pre");
  const code = node("code");
  if (lang) code.dataset.lang = lang;
  code.textContent = lines.join("\n");
  highlight(code, lang);
  pre.append(code);
  return pre;
}

// Colours a code block with highlight.js (vendor/, loaded beside this module; without it the
// block stays plain). It reads the element's text and writes its own escaped markup, so the
// model's text is never parsed as HTML. A named language it knows is used; a block with no
// name is guessed; a name it does not know stays plain rather than guessed wrong.
function highlight(code, lang) {
  const hljs = globalThis.hljs;
  if (!hljs) return;
  if (lang) {
    if (!hljs.getLanguage(lang)) return;
    code.classList.add(`language-${lang}`);
  }
  hljs.highlightElement(code);
}

function list(ordered, items, start) {
  const l = node(ordered ? "ol" : "ul");
  if (ordered && start !== 1) l.start = start;
  for (const item of items) l.append(renderInline(item, node("li")));
  return l;
}

// A list's items from line i on; blank lines between items (a "loose" list, as models
// write them) do not end it. Returns [items, the next index].
function listItems(lines, i, pattern) {
  const items = [];
  while (i < lines.length) {
    const m = pattern.exec(lines[i]);
    if (m) {
      items.push(m[1]);
      i += 1;
    } else if (!lines[i].trim() && i + 1 < lines.length && lines.slice(i + 1).find((l) => l.trim())?.match(pattern)) {
      i += 1;
    } else {
      break;
    }
  }
  return [items, i];
}

// Consumes lines from `i` while `test` holds; returns [the matches, the next index].
function run(lines, i, test) {
  const out = [];
  while (i < lines.length) {
    const m = test(lines[i]);
    if (m === null) break;  // "" is a match: an empty list item ("- ") while it streams in
    out.push(m);
    i += 1;
  }
  return [out, i];
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || BULLET.test(line) || NUMBERED.test(line);
}

// The block that starts at line i, and the index after it (null for a blank line).
function block(lines, i) {
  const line = lines[i];
  const fence = FENCE.exec(line);
  if (fence) {
    const end = lines.findIndex((l, j) => j > i && l.trim().startsWith(fence[1]));
    const stop = end < 0 ? lines.length : end;
    return [codeBlock(fence[2], lines.slice(i + 1, stop)), stop + 1];
  }
  const heading = HEADING.exec(line);
  if (heading) return [renderInline(heading[2], node(`h${Math.min(6, heading[1].length + 2)}`)), i + 1];
  if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])) {
    const [rows, next] = run(lines, i, (l) => (l.includes("|") ? l : null));
    return [table(rows), next];
  }
  for (const [pattern, ordered] of [[BULLET, false], [NUMBERED, true]]) {
    if (pattern.test(line)) {
      const [items, next] = listItems(lines, i, pattern);
      return [list(ordered, items, ordered ? parseInt(line, 10) : 1), next];
    }
  }
  if (!line.trim()) return [null, i + 1];
  const [para, next] = run(lines, i, (l) => (l.trim() && (l === line || !startsBlock(l)) ? l : null));
  return [renderInline(para.join("\n"), node("p")), next];
}

export function renderMarkdown(text) {
  const frag = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const [element, next] = block(lines, i);
    if (element) frag.append(element);
    i = Math.max(next, i + 1);  // always onward, whatever a half-written line looks like
  }
  return frag;
}
