// The chat view's page: renders the conversation (markdown-it + highlight.js), streams deltas
// into the last answer, and sends the user's actions to the extension.
import MarkdownIt from "markdown-it";
import hljs from "highlight.js/lib/core";
import bash from "highlight.js/lib/languages/bash";
import c from "highlight.js/lib/languages/c";
import cpp from "highlight.js/lib/languages/cpp";
import csharp from "highlight.js/lib/languages/csharp";
import css from "highlight.js/lib/languages/css";
import diff from "highlight.js/lib/languages/diff";
import go from "highlight.js/lib/languages/go";
import java from "highlight.js/lib/languages/java";
import javascript from "highlight.js/lib/languages/javascript";
import json from "highlight.js/lib/languages/json";
import kotlin from "highlight.js/lib/languages/kotlin";
import lua from "highlight.js/lib/languages/lua";
import markdown from "highlight.js/lib/languages/markdown";
import php from "highlight.js/lib/languages/php";
import python from "highlight.js/lib/languages/python";
import ruby from "highlight.js/lib/languages/ruby";
import rust from "highlight.js/lib/languages/rust";
import shell from "highlight.js/lib/languages/shell";
import sql from "highlight.js/lib/languages/sql";
import typescript from "highlight.js/lib/languages/typescript";
import xml from "highlight.js/lib/languages/xml";
import yaml from "highlight.js/lib/languages/yaml";

declare function acquireVsCodeApi(): { postMessage(message: unknown): void; getState(): any; setState(state: unknown): void };

const languages = { bash, c, cpp, csharp, css, diff, go, java, javascript, json, kotlin, lua, markdown, php, python, ruby, rust, shell, sql, typescript, xml, yaml };
for (const [name, language] of Object.entries(languages)) hljs.registerLanguage(name, language);
hljs.registerAliases(["sh", "zsh"], { languageName: "bash" });
hljs.registerAliases(["py"], { languageName: "python" });
hljs.registerAliases(["js", "jsx"], { languageName: "javascript" });
hljs.registerAliases(["ts", "tsx"], { languageName: "typescript" });
hljs.registerAliases(["html", "svg"], { languageName: "xml" });
hljs.registerAliases(["rs"], { languageName: "rust" });
hljs.registerAliases(["yml"], { languageName: "yaml" });

interface Turn {
  id: number;
  role: "user" | "assistant" | "notice";
  content: string;
  status: "done" | "streaming" | "stopped" | "error" | "interrupted";
  title?: string;
  error?: string;
  finishReason?: string;
  progress?: string;
  seen?: { uri: string; label: string; line: number; lines: string }[];
  historyDropped?: number;
}

/** A file attached to the conversation: its URI, and its name for the user. */
interface Reference {
  uri: string;
  label: string;
}

type FromExtension =
  | { type: "state"; turns: Turn[]; generating: boolean; context: string | null; references?: Reference[] }
  | { type: "delta"; id: number; delta: string }
  | { type: "progress"; id: number; progress: string }
  | { type: "draft"; text: string };

const vscode = acquireVsCodeApi();
const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const transcript = $<HTMLElement>("transcript");
const input = $<HTMLTextAreaElement>("input");
const send = $<HTMLButtonElement>("send");
const stop = $<HTMLButtonElement>("stop");
const includeSelection = $<HTMLInputElement>("include-selection");
const contextBox = $<HTMLElement>("context");
const contextLabel = $<HTMLElement>("context-label");
const chips = $<HTMLElement>("chips");
const referencesBox = $<HTMLElement>("references");

// Each answer's code blocks keep their source here (by turn id); the buttons refer to them by index.
const codeBlocks = new Map<number, string[]>();
interface RenderEnv {
  blocks: string[];
}

const md: MarkdownIt = new MarkdownIt({
  html: false,
  linkify: true,
  breaks: false,
  highlight(code: string, lang: string): string {
    const language = lang && hljs.getLanguage(lang) ? lang : "";
    try {
      return language ? hljs.highlight(code, { language, ignoreIllegals: true }).value : hljs.highlightAuto(code).value;
    } catch {
      return md.utils.escapeHtml(code);
    }
  },
});
// Links only where written as links or URLs: "calc.py" or "README.md" in an answer is a file
// name, not the web domain linkify-it would make of it (a click would send it to that host).
md.linkify.set({ fuzzyLink: false });
const defaultFence = md.renderer.rules.fence!;
md.renderer.rules.fence = (tokens, idx, options, env: RenderEnv, self) => {
  const index = env.blocks.push(tokens[idx].content) - 1;
  const lang = tokens[idx].info.trim().split(/\s+/)[0] ?? "";
  const html = defaultFence(tokens, idx, options, env, self);
  return `<div class="code-block" data-code-index="${index}">
<div class="code-toolbar"><span class="code-lang">${md.utils.escapeHtml(lang)}</span>
<button class="code-action" data-action="insert" title="Insert at the cursor of the active editor">Insert at cursor</button>
<button class="code-action" data-action="replace" title="Replace the selection of the active editor">Replace selection</button>
<button class="code-action" data-action="copy" title="Copy">Copy</button></div>
${html}</div>`;
};
// Answers never load images: a model's ![](https://host/?q=…) would send what it read (your
// code) to that host. An image shows as a link to it instead (the CSP blocks remote images too).
md.renderer.rules.image = (tokens, idx) => {
  const token = tokens[idx];
  const src = token.attrGet("src") ?? "";
  const alt = token.children ? md.renderer.renderInlineAsText(token.children, md.options, {}) : token.content;
  return `<a href="${md.utils.escapeHtml(src)}" class="image-link">${md.utils.escapeHtml(alt || src)}</a>`;
};

let turns: Turn[] = [];
let generating = false;

/** The turn's element: the one on the page, updated, or a new one. */
function render(turn: Turn): HTMLElement {
  let element = transcript.querySelector<HTMLElement>(`.turn[data-id="${turn.id}"]`);
  if (!element) {
    element = document.createElement("section");
    element.dataset.id = String(turn.id);
  }
  element.className = `turn ${turn.role}`;
  update(element, turn);
  return element;
}

// How many streamed pieces each answer received (kept across re-renders; tests read it).
const updates = new Map<number, number>();

function update(element: HTMLElement, turn: Turn): void {
  element.dataset.status = turn.status;
  if (turn.role === "notice") {
    // A note from the extension (e.g. the context was dropped): plain text, not from the model.
    element.innerHTML = `<div class="content note">${md.utils.escapeHtml(turn.content)}</div>`;
    return;
  }
  element.dataset.updates = String(updates.get(turn.id) ?? 0);
  const header = turn.role === "user" ? turn.title ?? "You" : "StarChat";
  let body: string;
  if (turn.role === "user") {
    body = `<div class="content">${md.utils.escapeHtml(turn.content).replace(/\n/g, "<br>")}</div>`;
  } else {
    const env: RenderEnv = { blocks: [] };
    body = `<div class="content markdown">${md.render(turn.content, env)}</div>`;
    codeBlocks.set(turn.id, env.blocks);
  }
  let footer = "";
  if (turn.status === "streaming") footer = `<div class="note working"><span class="dots"></span> ${turn.content ? "generating" : md.utils.escapeHtml(turn.progress ?? "thinking")}…</div>`;
  else if (turn.status === "stopped") footer = `<div class="note stopped">Stopped.</div>`;
  else if (turn.status === "interrupted") footer = `<div class="note stopped">Interrupted: the window was closed or reloaded before the answer was finished.</div>`;
  else if (turn.status === "error") footer = `<div class="note error">${md.utils.escapeHtml(turn.error ?? "The request failed.")}</div>`;
  else if (turn.finishReason === "length") footer = `<div class="note">The answer reached the token limit (setting starchat.maxNewTokens).</div>`;
  if (turn.status === "done") footer += seenNote(turn);
  // the last answer, once over: Retry sends its message again
  if (turn.role === "assistant" && turn.status !== "streaming" && !generating && turn === turns[turns.length - 1]) {
    footer += `<div class="turn-actions"><button class="retry" title="Send the last message again for a new answer">↻ Retry</button></div>`;
  }
  morph(element, `<div class="who">${md.utils.escapeHtml(header)}</div>${body}${footer}`);
}

/** Under an answer: the files the model saw (each a link to it, with its lines when not all of it),
 * and the earlier exchanges it did not see. */
function seenNote(turn: Turn): string {
  const parts = (turn.seen ?? []).map((seen) => {
    const link = `<a href="#" class="seen-file" data-uri="${md.utils.escapeHtml(seen.uri)}" data-line="${seen.line}" title="Open ${md.utils.escapeHtml(seen.label)}">${md.utils.escapeHtml(seen.label)}</a>`;
    return seen.lines ? `${link} (${md.utils.escapeHtml(seen.lines)})` : link;
  });
  const dropped = turn.historyDropped ?? 0;
  const notes = [];
  if (parts.length) notes.push(`Saw ${parts.join(", ")}`);
  if (dropped) notes.push(`left out ${dropped === 1 ? "the earliest exchange" : `the ${dropped} earliest exchanges`} to fit`);
  return notes.length ? `<div class="note seen">${notes.join("; ")}.</div>` : "";
}

/** Makes `target`'s content `html`, keeping every node that stays the same: a streaming answer
 * grows in place, so a selection in it, or a click on a code block's button, survives the next
 * piece (replacing the whole answer each frame lost both). */
function morph(target: Element, html: string): void {
  const template = document.createElement("template");
  template.innerHTML = html;
  morphChildren(target, template.content);
}

function morphChildren(target: Node, source: Node): void {
  const olds = Array.from(target.childNodes);
  const news = Array.from(source.childNodes);
  news.forEach((fresh, i) => {
    const old = olds[i];
    if (!old) target.appendChild(fresh);
    else if (old.isEqualNode(fresh)) return;
    else if (old instanceof Text && fresh instanceof Text) {
      // appended text keeps the ranges in the old text (a new value would reset them)
      if (fresh.data.startsWith(old.data)) old.appendData(fresh.data.slice(old.data.length));
      else old.data = fresh.data;
    } else if (old instanceof Element && fresh instanceof Element && old.tagName === fresh.tagName) {
      for (const name of old.getAttributeNames()) if (!fresh.hasAttribute(name)) old.removeAttribute(name);
      for (const name of fresh.getAttributeNames()) if (old.getAttribute(name) !== fresh.getAttribute(name)) old.setAttribute(name, fresh.getAttribute(name)!);
      morphChildren(old, fresh);
    } else target.replaceChild(fresh, old);
  });
  for (const old of olds.slice(news.length)) old.remove();
}

/** Everything again; ``follow``: scrolled to the end, else where the reader was. */
function renderAll(follow = true): void {
  const top = transcript.scrollTop;
  codeBlocks.clear();
  const elements = turns.map(render);
  // Turns already in place stay (moving a node would lose a selection in it).
  elements.forEach((element, i) => {
    const here = transcript.children[i] ?? null;
    if (here !== element) transcript.insertBefore(element, here);
  });
  while (transcript.children.length > elements.length) transcript.lastElementChild!.remove();
  if (turns.length === 0) {
    transcript.innerHTML = `<div class="empty"><p><b>StarChat</b></p><p>Ask a question below, or select code in an editor and use <i>Ask StarChat</i> from the right-click menu.</p></div>`;
  }
  if (follow) scrollToEnd();
  else transcript.scrollTop = top;
}

function atEnd(): boolean {
  return transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 40;
}

function scrollToEnd(): void {
  transcript.scrollTop = transcript.scrollHeight;
}

// Deltas arrive often; re-render the streaming answer at most once per frame. The first words
// of an answer are shown at once: a frame can be late (a busy or throttled webview), and the
// user should see that the answer has started.
const dirty = new Set<number>();
let frame = 0;
function renderNow(ids: Iterable<number>): void {
  const follow = atEnd();
  for (const id of ids) {
    const turn = turns.find((t) => t.id === id);
    const element = transcript.querySelector<HTMLElement>(`.turn[data-id="${id}"]`);
    if (turn && element) update(element, turn);
  }
  if (follow) scrollToEnd();
}
function scheduleRender(id: number): void {
  dirty.add(id);
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    renderNow(dirty);
    dirty.clear();
  });
}

/** The attached files, as chips: the name, and an × that removes it from the chat. Built as
 * nodes (the names are never parsed as HTML). */
function renderReferences(references: Reference[]): void {
  referencesBox.replaceChildren(
    ...references.map(({ uri, label }) => {
      const chip = document.createElement("span");
      chip.className = "reference";
      chip.dataset.uri = uri;
      chip.setAttribute("role", "listitem");
      chip.title = `${label}: the model sees this file with every message of this chat`;
      const name = document.createElement("span");
      name.className = "reference-label";
      name.textContent = label;
      const remove = document.createElement("button");
      remove.className = "reference-remove";
      remove.textContent = "×";
      remove.title = `Remove ${label} from the chat`;
      remove.setAttribute("aria-label", remove.title);
      remove.addEventListener("click", () => vscode.postMessage({ type: "removeReference", uri }));
      chip.append(name, remove);
      return chip;
    }),
  );
  referencesBox.hidden = references.length === 0;
}

function setGenerating(value: boolean): void {
  generating = value;
  stop.hidden = !value;
  send.disabled = value;
  document.body.classList.toggle("generating", value);
}

window.addEventListener("message", (event: MessageEvent<FromExtension>) => {
  const message = event.data;
  if (message.type === "state") {
    // a reader scrolled up stays where they read, unless a turn was added (a message sent)
    const follow = atEnd() || message.turns.length > turns.length;
    turns = message.turns;
    setGenerating(message.generating);
    contextBox.hidden = !message.context;
    contextLabel.textContent = message.context ? `About ${message.context}` : "";
    const references = message.references ?? [];
    renderReferences(references);
    chips.hidden = !message.context && references.length === 0;
    renderAll(follow);
  } else if (message.type === "delta") {
    const turn = turns.find((t) => t.id === message.id);
    if (!turn || turn.status !== "streaming") return;
    const first = turn.content === "";
    turn.content += message.delta;
    updates.set(message.id, (updates.get(message.id) ?? 0) + 1);
    if (first) renderNow([message.id]);
    else scheduleRender(message.id);
  } else if (message.type === "progress") {
    const turn = turns.find((t) => t.id === message.id);
    if (!turn) return;
    turn.progress = message.progress;
    scheduleRender(message.id);
  } else if (message.type === "draft") {
    // A message the extension could not send (no server): back into the input, unless the user
    // has typed something else meanwhile.
    if (!input.value.trim()) {
      input.value = message.text;
      saveDraft();
    }
  }
});

// The message being typed and the checkbox outlive the page (the view moved, Reload Webviews).
function saveDraft(): void {
  vscode.setState({ draft: input.value, includeSelection: includeSelection.checked });
}
const saved = vscode.getState() as { draft?: string; includeSelection?: boolean } | undefined;
if (saved) {
  input.value = saved.draft ?? "";
  includeSelection.checked = saved.includeSelection ?? false;
}
input.addEventListener("input", saveDraft);
includeSelection.addEventListener("change", saveDraft);

function submit(): void {
  const text = input.value.trim();
  if (!text || generating) return;
  vscode.postMessage({ type: "send", text, includeSelection: includeSelection.checked });
  input.value = "";
  saveDraft();
}

send.addEventListener("click", submit);
stop.addEventListener("click", () => vscode.postMessage({ type: "stop" }));
$<HTMLButtonElement>("context-clear").addEventListener("click", () => vscode.postMessage({ type: "clearContext" }));
$<HTMLButtonElement>("add-file").addEventListener("click", () => vscode.postMessage({ type: "addFile" }));
input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  } else if (event.key === "Escape" && generating) {
    vscode.postMessage({ type: "stop" });
  }
});
transcript.addEventListener("click", (event) => {
  if ((event.target as HTMLElement).closest("button.retry")) {
    vscode.postMessage({ type: "retry" });
    return;
  }
  const seen = (event.target as HTMLElement).closest<HTMLAnchorElement>("a.seen-file");
  if (seen) {
    event.preventDefault();
    vscode.postMessage({ type: "open", uri: seen.dataset.uri, line: Number(seen.dataset.line) });
    return;
  }
  const button = (event.target as HTMLElement).closest<HTMLButtonElement>("button.code-action");
  if (!button) return;
  const block = button.closest<HTMLElement>(".code-block");
  const turn = button.closest<HTMLElement>(".turn");
  const code = codeBlocks.get(Number(turn?.dataset.id))?.[Number(block?.dataset.codeIndex)];
  if (code !== undefined) vscode.postMessage({ type: button.dataset.action, code });
});

setGenerating(false);
renderAll();
vscode.postMessage({ type: "ready" });
