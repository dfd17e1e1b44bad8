// The chat view: a webview in the panel with the conversation, answers streamed from
// `starchat/chat` ($/progress {delta} on the request's partialResultToken), a Stop button that
// cancels the request, and Insert / Replace on code blocks. Ask and Explain answers land here too.
// The conversation is kept in the workspace's state: it comes back after a window reload.
import * as vscode from "vscode";
import {
  CancellationTokenSource as LspCancellationTokenSource,
  ErrorCodes,
  ExecuteCommandRequest,
  LanguageClient,
  ProgressType,
  Range as LspRange,
  ResponseError,
  State,
  WorkDoneProgress,
  WorkDoneProgressBegin,
  WorkDoneProgressReport,
  WorkDoneProgressEnd,
} from "vscode-languageclient/node";
import { privateDocument } from "./server";
import { fitCode } from "./fit";

export const VIEW_ID = "starchat.chat";

/** The documents the language client opens for the server (its document selector): files,
 * untitled documents and notebook cells (their notebooks go whole, by notebook sync). The others
 * (the Output panel, settings.json, diff views, …) the server cannot answer about or edit. */
export const SYNCED_SCHEMES = ["file", "untitled", "vscode-notebook-cell"];
const synced = (editor: vscode.TextEditor | undefined) => editor !== undefined && SYNCED_SCHEMES.includes(editor.document.uri.scheme);

/** A document's name for the user: its path in the workspace; a notebook cell's, its notebook's
 * and its number ("analysis.ipynb, cell 3"). */
export function documentName(uri: vscode.Uri): string {
  if (uri.scheme === "vscode-notebook-cell") {
    for (const notebook of vscode.workspace.notebookDocuments) {
      const cell = notebook.getCells().find((c) => c.document.uri.toString() === uri.toString());
      if (cell) return `${vscode.workspace.asRelativePath(notebook.uri)}, cell ${cell.index + 1}`;
    }
    return vscode.workspace.asRelativePath(uri.with({ scheme: "file", fragment: "" }));
  }
  return vscode.workspace.asRelativePath(uri);
}

type Role = "user" | "assistant";
/** "interrupted": the window closed or reloaded while the answer was coming (a restored chat). */
type TurnStatus = "done" | "streaming" | "stopped" | "error" | "interrupted";

export interface Turn {
  id: number;
  /** "notice": a note from the extension in the conversation (e.g. the context was dropped), not
   * sent to the model. */
  role: Role | "notice";
  content: string;
  status: TurnStatus;
  /** Shown above a user turn instead of its content's first words (e.g. "Explain calc.py:4-5"). */
  title?: string;
  error?: string;
  finishReason?: string;
  progress?: string;
}

interface Answer {
  text: string;
  finishReason: "stop" | "length" | "cancelled";
  promptTokens: number;
  completionTokens: number;
  /** Of promptTokens: not computed again, the engine's cache held them (docs/protocol.md). */
  cachedTokens: number;
}

/** The document and range a conversation is about. */
export interface ChatContext {
  uri: string;
  range?: LspRange;
  label: string;
}

type FromWebview =
  | { type: "ready" }
  | { type: "send"; text: string; includeSelection: boolean }
  | { type: "stop" }
  | { type: "newChat" }
  | { type: "clearContext" }
  | { type: "insert"; code: string }
  | { type: "replace"; code: string }
  | { type: "copy"; code: string };

/** The conversation in the workspace's state (Memento): its last turns, at most this many and
 * this big (JSON), and the context (a reference: the document's URI, a range and a label, never
 * its text). Saved on every change, and every SAVE_MS while an answer streams. */
const SAVED_CHAT = "starchat.chat";
const SAVED_TURNS = 50;
const SAVED_BYTES = 200_000;
const SAVE_MS = 500;
interface SavedChat {
  turns: Turn[];
  context?: ChatContext;
}

const ChatPartial = new ProgressType<{ delta: string }>();
let tokens = 0;
const newToken = (kind: string) => `starchat-${kind}-${Date.now().toString(36)}-${++tokens}`;

export class ChatView implements vscode.WebviewViewProvider, vscode.Disposable {
  private view?: vscode.WebviewView;
  private turns: Turn[] = [];
  private nextId = 1;
  private context?: ChatContext;
  private running?: { source: LspCancellationTokenSource; turn: Turn; stopped: boolean };
  private lastEditor?: vscode.TextEditor;
  private saveTimer?: ReturnType<typeof setTimeout>;
  private closed = false;
  private readonly disposables: vscode.Disposable[] = [];

  constructor(
    private readonly extensionUri: vscode.Uri,
    private readonly memory: vscode.Memento,
    private readonly getClient: () => LanguageClient | undefined,
    private readonly log: vscode.LogOutputChannel,
  ) {
    this.restore();
    // The editor code goes into and the selection comes from: the last file the user was in,
    // not the Output panel (an editor too) nor other documents the server does not have.
    if (synced(vscode.window.activeTextEditor)) this.lastEditor = vscode.window.activeTextEditor;
    this.disposables.push(
      vscode.window.onDidChangeActiveTextEditor((editor) => {
        if (editor && synced(editor)) this.lastEditor = editor;
      }),
      // An untitled document closed is gone for good (a file is opened again when needed, see
      // usableContext): the conversation goes on without it, and says so. Checked a moment later:
      // a change of language closes and reopens a document at once.
      vscode.workspace.onDidCloseTextDocument((document) => {
        if (document.uri.scheme === "file" || !this.context || !sameDocument(document.uri, this.context.uri)) return;
        const context = this.context;
        setTimeout(() => {
          if (this.context === context && !openDocument(context.uri)) this.dropContext(`${context.label} was closed: the chat goes on without it.`);
        }, 300);
      }),
    );
  }

  get generating(): boolean {
    return this.running !== undefined;
  }

  // ---- the webview ---------------------------------------------------------------------------
  resolveWebviewView(view: vscode.WebviewView): void {
    this.view = view;
    const media = vscode.Uri.joinPath(this.extensionUri, "media");
    const out = vscode.Uri.joinPath(this.extensionUri, "out");
    view.webview.options = { enableScripts: true, localResourceRoots: [media, out] };
    view.webview.html = this.html(view.webview);
    // The view is created again when it moves or is closed and opened: each one's listeners go with it.
    const listeners = [view.webview.onDidReceiveMessage((message: FromWebview) => this.onMessage(message))];
    listeners.push(
      view.onDidDispose(() => {
        if (this.view === view) this.view = undefined;
        for (const listener of listeners) listener.dispose();
      }),
    );
  }

  private html(webview: vscode.Webview): string {
    const nonce = Array.from({ length: 32 }, () => Math.floor(Math.random() * 36).toString(36)).join("");
    const script = webview.asWebviewUri(vscode.Uri.joinPath(this.extensionUri, "out", "webview.js"));
    const style = webview.asWebviewUri(vscode.Uri.joinPath(this.extensionUri, "media", "chat.css"));
    const csp = [
      "default-src 'none'",
      `style-src ${webview.cspSource} 'unsafe-inline'`,
      `script-src 'nonce-${nonce}'`,
      // No remote images: an answer's ![](https://…?q=your code) would send the code away.
      `img-src ${webview.cspSource} data:`,
      `font-src ${webview.cspSource}`,
    ].join("; ");
    return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<meta http-equiv="Content-Security-Policy" content="${csp}">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<link rel="stylesheet" href="${style}">
<title>StarChat</title>
</head>
<body>
<main id="transcript" aria-live="polite"></main>
<footer id="composer">
  <div id="context" hidden><span id="context-label"></span><button id="context-clear" title="Forget this context" aria-label="Forget this context">×</button></div>
  <textarea id="input" rows="3" placeholder="Ask StarChat… (Enter to send, Shift+Enter for a new line)" aria-label="Message"></textarea>
  <div id="buttons">
    <label id="selection-label" title="Send the active editor's selection (or file) with the message"><input type="checkbox" id="include-selection"> Include editor selection</label>
    <span class="spacer"></span>
    <button id="stop" hidden title="Stop generating">■ Stop</button>
    <button id="send" title="Send (Enter)">Send</button>
  </div>
</footer>
<script nonce="${nonce}" src="${script}"></script>
</body>
</html>`;
  }

  private post(message: unknown): void {
    void this.view?.webview.postMessage(message);
  }

  private pushState(): void {
    this.post({ type: "state", turns: this.turns, generating: this.generating, context: this.context?.label ?? null });
    void vscode.commands.executeCommand("setContext", "starchat.generating", this.generating);
    this.save();
  }

  // ---- the conversation kept across window reloads ---------------------------------------------
  /** The conversation of the last session in this workspace; an answer that was still coming
   * (the window reloaded) as far as it had come, marked interrupted. */
  private restore(): void {
    const saved = this.memory.get<SavedChat>(SAVED_CHAT);
    if (!saved || !Array.isArray(saved.turns)) return;
    this.turns = saved.turns
      .filter((turn) => turn && typeof turn.id === "number" && typeof turn.content === "string" && ["user", "assistant", "notice"].includes(turn.role))
      .map((turn) => (turn.status === "streaming" ? { ...turn, status: "interrupted" as const } : turn));
    this.nextId = Math.max(0, ...this.turns.map((turn) => turn.id)) + 1;
    const context = saved.context;
    if (context && typeof context.uri === "string" && typeof context.label === "string" && !privateDocument(vscode.Uri.parse(context.uri))) this.context = context;
    if (this.turns.length) this.log.info(`chat: ${this.turns.length} turns restored from this workspace's last session`);
  }

  /** Saves the conversation now (`soon`: within SAVE_MS, for streamed pieces). */
  private save(soon = false): void {
    if (this.closed) return;
    if (soon) {
      this.saveTimer ??= setTimeout(() => this.save(), SAVE_MS);
      return;
    }
    if (this.saveTimer) clearTimeout(this.saveTimer);
    this.saveTimer = undefined;
    const context = this.context && !privateDocument(vscode.Uri.parse(this.context.uri)) ? this.context : undefined;
    const chat: SavedChat = { turns: savedTurns(this.turns), context };
    this.memory.update(SAVED_CHAT, chat).then(undefined, (error) => this.log.warn(`saving the chat: ${error}`));
  }

  /** The window closes or reloads (deactivate): an answer still coming is saved as received,
   * marked interrupted, and nothing after that (its request failing as the server stops) is. */
  close(): void {
    if (this.closed) return;
    if (this.running) this.running.turn.status = "interrupted";
    this.save();
    this.closed = true;
    this.stop();
  }

  private async onMessage(message: FromWebview): Promise<void> {
    switch (message.type) {
      case "ready":
        this.pushState();
        break;
      case "send":
        await this.send(message.text, message.includeSelection);
        break;
      case "stop":
        this.stop();
        break;
      case "newChat":
        this.newChat();
        break;
      case "clearContext":
        this.context = undefined;
        this.pushState();
        break;
      case "insert":
      case "replace":
        await this.putCode(message.code, message.type);
        break;
      case "copy":
        await vscode.env.clipboard.writeText(message.code);
        void vscode.window.setStatusBarMessage("StarChat: code copied", 2000);
        break;
    }
  }

  async reveal(): Promise<void> {
    await vscode.commands.executeCommand(`${VIEW_ID}.focus`);
  }

  newChat(): void {
    this.stop();
    this.turns = [];
    this.context = undefined;
    this.pushState();
  }

  stop(): void {
    if (!this.running) return;
    this.running.stopped = true;
    this.running.source.cancel();
  }

  // ---- code blocks into the editor -----------------------------------------------------------
  private async putCode(code: string, how: "insert" | "replace"): Promise<void> {
    const active = vscode.window.activeTextEditor;
    const editor = this.lastEditor ?? (synced(active) ? active : undefined);
    if (!editor || editor.document.isClosed) {
      void vscode.window.showWarningMessage("StarChat: open a file to put the code in.");
      return;
    }
    const shown = await vscode.window.showTextDocument(editor.document, { viewColumn: editor.viewColumn, preserveFocus: false });
    const { range, text } = fitCode(code, shown.document, shown.selection, how);
    const done = await shown.edit((builder) => builder.replace(range, text));
    if (!done) void vscode.window.showWarningMessage(`StarChat: ${documentName(shown.document.uri)} did not take the code (read-only?).`);
  }

  // ---- conversations -------------------------------------------------------------------------
  private addTurn(role: Turn["role"], content: string, status: TurnStatus, title?: string): Turn {
    const turn: Turn = { id: this.nextId++, role, content, status, title };
    this.turns.push(turn);
    return turn;
  }

  /** The history as `starchat/chat` messages: finished user/assistant pairs, then `last`. */
  private history(last: string): { role: Role; content: string }[] {
    // Notices are the extension's, not the conversation's: left out.
    const messages: { role: Role; content: string }[] = [];
    for (let i = 0; i + 1 < this.turns.length; i++) {
      const [user, assistant] = [this.turns[i], this.turns[i + 1]];
      if (user.role === "user" && assistant.role === "assistant" && assistant.content && assistant.status !== "error") {
        messages.push({ role: "user", content: user.content }, { role: "assistant", content: assistant.content });
        i++;
      }
    }
    messages.push({ role: "user", content: last });
    return messages;
  }

  private selectionContext(): ChatContext | undefined {
    const editor = this.lastEditor;
    const client = this.getClient();
    if (!editor || editor.document.isClosed || !client) return undefined;
    const name = documentName(editor.document.uri);
    const reason = privateDocument(editor.document.uri);
    if (reason) {
      // never sent to the server (see the language client's middleware)
      this.dropContext(`${name} ${reason}; StarChat does not send it: this message goes without it.`);
      return undefined;
    }
    if (editor.selection.isEmpty) return { uri: editor.document.uri.toString(), label: name };
    return {
      uri: editor.document.uri.toString(),
      range: client.code2ProtocolConverter.asRange(editor.selection),
      label: `${name}:${rangeLabel(editor.selection)}`,
    };
  }

  /** Forgets the context, with a note in the conversation saying why. */
  private dropContext(note: string): void {
    this.log.info(`chat context dropped: ${note}`);
    this.context = undefined;
    this.addTurn("notice", note, "done");
    this.pushState();
  }

  /** The context, ready to be sent: the server reads only the documents open in the editor, so a
   * file closed since (its tab closed) is opened again, unseen (the language client sends it to
   * the server), and the conversation stays about it. A file that cannot be opened (deleted), an
   * untitled document closed, or a range now past the end of the document: the context is
   * dropped, with a note, and the message goes without it. Never "the document is not open". */
  private async usableContext(client: LanguageClient): Promise<ChatContext | undefined> {
    const context = this.context;
    if (!context) return undefined;
    const uri = vscode.Uri.parse(context.uri);
    let document = openDocument(context.uri);
    let why = "is no longer open";
    if (!document && uri.scheme === "file") {
      try {
        document = await vscode.workspace.openTextDocument(uri);
        this.log.info(`chat context ${context.label}: the file was closed; opened it again`);
      } catch (error) {
        why = "could not be opened again (deleted?)";
        this.log.warn(`chat context ${context.label}: ${error instanceof Error ? error.message : String(error)}`);
      }
    }
    if (this.context !== context) return this.context; // changed meanwhile (× or another request)
    if (!document) {
      this.dropContext(`${context.label} ${why}: this message goes without it.`);
      return undefined;
    }
    if (context.range) {
      const range = client.protocol2CodeConverter.asRange(context.range);
      if (!document.validateRange(range).isEqual(range)) {
        this.dropContext(`${context.label} is past the end of the file now: this message goes without it.`);
        return undefined;
      }
    }
    return context;
  }

  /** A chat message typed in the view, answered with streaming. */
  async send(text: string, includeSelection = false): Promise<void> {
    text = text.trim();
    if (!text) return;
    const client = await this.readyClient();
    if (!client) {
      this.post({ type: "draft", text }); // the webview cleared its input: give the message back
      return;
    }
    if (includeSelection) this.context = this.selectionContext() ?? this.context;
    const context = await this.usableContext(client);
    const messages = this.history(text);
    this.addTurn("user", text, "done");
    const params: Record<string, unknown> = { messages };
    if (context) {
      params.textDocument = { uri: context.uri };
      if (context.range) params.range = context.range;
    }
    await this.generate(client, (token, onDelta) => {
      const partialResultToken = newToken("chat");
      params.partialResultToken = partialResultToken;
      const listener = client.onProgress(ChatPartial, partialResultToken, (value) => onDelta(value.delta));
      return client.sendRequest<Answer>("starchat/chat", params, token).finally(() => listener.dispose());
    });
  }

  /** Ask or Explain (server commands) about a selection; the answer shows in the chat. */
  async runCommand(command: "starchat.ask" | "starchat.explain", args: { textDocument: { uri: string }; range: LspRange; question?: string }): Promise<Answer | undefined> {
    const client = await this.readyClient();
    if (!client) return undefined;
    const uri = vscode.Uri.parse(args.textDocument.uri);
    const label = `${documentName(uri)}:${rangeLabel(client.protocol2CodeConverter.asRange(args.range))}`;
    this.context = { uri: args.textDocument.uri, range: args.range, label };
    if (command === "starchat.ask") this.addTurn("user", args.question ?? "", "done", `Ask about ${label}`);
    else this.addTurn("user", "Explain the selected code.", "done", `Explain ${label}`);
    return this.generate(client, (token, _onDelta, onProgress) => {
      const workDoneToken = newToken("command");
      const listener = client.onProgress(WorkDoneProgress.type, workDoneToken, (value: WorkDoneProgressBegin | WorkDoneProgressReport | WorkDoneProgressEnd) => {
        if (value.kind !== "end" && value.message) onProgress(value.message);
      });
      return client
        .sendRequest(ExecuteCommandRequest.type, { command, arguments: [args], workDoneToken }, token)
        .finally(() => listener.dispose()) as Promise<Answer>;
    });
  }

  private async readyClient(): Promise<LanguageClient | undefined> {
    let client = this.getClient();
    // Starting (just restarted, or again after a crash): the server answers in a moment.
    if (client && client.state === State.Starting) client = (await whenRunning(client, 30000)) ? client : undefined;
    if (!client || !client.isRunning()) {
      void vscode.window.showErrorMessage("StarChat: the language server is not running.", "Show Log").then((choice) => {
        if (choice) this.log.show();
      });
      return undefined;
    }
    await this.reveal();
    return client;
  }

  private async generate(
    client: LanguageClient,
    request: (token: import("vscode-languageclient/node").CancellationToken, onDelta: (delta: string) => void, onProgress: (message: string) => void) => Promise<Answer>,
  ): Promise<Answer | undefined> {
    this.stop();
    const turn = this.addTurn("assistant", "", "streaming");
    const running = { source: new LspCancellationTokenSource(), turn, stopped: false };
    this.running = running;
    this.pushState();
    const onDelta = (delta: string) => {
      if (running.stopped || turn.status !== "streaming") return;
      turn.content += delta;
      this.post({ type: "delta", id: turn.id, delta });
      this.save(true);
    };
    const onProgress = (message: string) => {
      if (running.stopped) return;
      turn.progress = message;
      this.post({ type: "progress", id: turn.id, progress: message });
    };
    try {
      const answer = await request(running.source.token, onDelta, onProgress);
      if (running.stopped) {
        turn.status = "stopped";
      } else {
        // The streamed pieces add up to the answer; the final text wins (commands stream nothing).
        turn.content = answer?.text ?? turn.content;
        turn.finishReason = answer?.finishReason;
        turn.status = answer?.finishReason === "cancelled" ? "stopped" : "done";
      }
      return answer;
    } catch (error) {
      if (running.stopped) {
        turn.status = "stopped";
      } else {
        turn.status = "error";
        turn.error = describeError(error);
        this.log.error(`chat request failed: ${error instanceof Error ? error.message : String(error)}`);
      }
      return undefined;
    } finally {
      turn.progress = undefined;
      running.source.dispose();
      if (this.running === running) this.running = undefined;
      this.pushState();
    }
  }

  dispose(): void {
    this.close();
    for (const d of this.disposables) d.dispose();
  }
}

/** The turns to save: the last SAVED_TURNS, older ones left out until they fit in SAVED_BYTES
 * (the last one alone too big keeps its end). */
function savedTurns(turns: Turn[]): Turn[] {
  const kept = turns.slice(-SAVED_TURNS).map(({ progress: _progress, ...turn }) => turn);
  const sizes = kept.map((turn) => Buffer.byteLength(JSON.stringify(turn)) + 1);
  let total = sizes.reduce((a, b) => a + b, 0);
  while (kept.length > 1 && total > SAVED_BYTES) {
    total -= sizes.shift()!;
    kept.shift();
  }
  if (total > SAVED_BYTES) kept[0] = { ...kept[0], content: kept[0].content.slice(-SAVED_BYTES / 4) };
  return kept;
}

/** What the user reads when a request fails: the server's message, or what happened to the server. */
export function describeError(error: unknown): string {
  if (error instanceof ResponseError && (error.code === ErrorCodes.PendingResponseRejected || error.code === ErrorCodes.ConnectionInactive)) {
    return "The StarChat server stopped before answering (see StarChat: Show Log).";
  }
  return error instanceof Error ? error.message : String(error);
}

function whenRunning(client: LanguageClient, timeoutMs: number): Promise<boolean> {
  if (client.isRunning()) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => finish(false), timeoutMs);
    const listener = client.onDidChangeState((event) => {
      if (event.newState !== State.Starting) finish(event.newState === State.Running);
    });
    function finish(running: boolean) {
      clearTimeout(timer);
      listener.dispose();
      resolve(running);
    }
  });
}

/** Whether `uri` (a vscode.Uri) is the document of `contextUri` (a string from the client or
 * the editor: compared parsed, the two may spell it differently). */
function sameDocument(uri: vscode.Uri, contextUri: string): boolean {
  return uri.toString() === vscode.Uri.parse(contextUri).toString();
}

/** The document of `uri` if the editor has it open (and so the server has it). */
function openDocument(uri: string): vscode.TextDocument | undefined {
  return vscode.workspace.textDocuments.find((document) => !document.isClosed && sameDocument(document.uri, uri));
}

function rangeLabel(range: vscode.Range): string {
  let end = range.end.line;
  if (end > range.start.line && range.end.character === 0) end--; // a selection of whole lines
  return end === range.start.line ? `${range.start.line + 1}` : `${range.start.line + 1}-${end + 1}`;
}
