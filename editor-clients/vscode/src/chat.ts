// The chat view: a webview in the panel with the conversation, answers streamed from
// `starchat/chat` ($/progress {delta} on the request's partialResultToken), a Stop button that
// cancels the request, and Insert / Replace on code blocks. Ask and Explain answers land here too.
// Other files can be attached to the conversation (Add File to Chat): they go with every message.
// The conversation is kept in the workspace's state: it comes back after a window reload.
import * as vscode from "vscode";
import {
  CancellationTokenSource as LspCancellationTokenSource,
  ErrorCodes,
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
  /** A user turn of Ask a Question… or Explain: the first message of a conversation about the
   * selection (sent without the turns before it). */
  asked?: "ask" | "explain";
  error?: string;
  finishReason?: string;
  progress?: string;
  /** What of the documents the model saw for this answer (the answer's `shown`). */
  seen?: Seen[];
  /** Earlier exchanges left out of the prompt to fit (the answer's `historyDropped`). */
  historyDropped?: number;
}

/** A document the model saw: its name, the line to open it at, and which lines it saw ("" when
 * all of it). */
interface Seen {
  uri: string;
  label: string;
  line: number;
  lines: string;
}

interface Answer {
  text: string;
  finishReason: "stop" | "length" | "cancelled";
  promptTokens: number;
  completionTokens: number;
  /** Of promptTokens: not computed again, the engine's cache held them (docs/protocol.md). */
  cachedTokens: number;
  /** The lines of each document the prompt held (whole lines; left out when none). */
  shown?: { uri: string; range: LspRange }[];
  historyDropped?: number;
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
  | { type: "retry" }
  | { type: "clearContext" }
  | { type: "addFile" }
  | { type: "removeReference"; uri: string }
  | { type: "insert"; code: string }
  | { type: "replace"; code: string }
  | { type: "copy"; code: string }
  | { type: "open"; uri: string; line: number };

/** The conversation in the workspace's state (Memento): its last turns, at most this many and
 * this big (JSON), the context (a reference: the document's URI, a range and a label, never its
 * text) and the attached files (their URIs only). Saved on every change, and every SAVE_MS while
 * an answer streams. */
const SAVED_CHAT = "starchat.chat";
const SAVED_TURNS = 50;
const SAVED_BYTES = 200_000;
const SAVE_MS = 500;
interface SavedChat {
  turns: Turn[];
  context?: ChatContext;
  references?: string[];
}

/** Files attached to one conversation, at most: the server's limit (MAX_REFERENCES in
 * lsp_server/features/common.py). */
export const MAX_REFERENCES = 16;

const ChatPartial = new ProgressType<{ delta: string }>();
/** The server's Explain instruction (lsp_server/prompts/tasks.py): Explain asked as a chat
 * message gets the prompt of the server's starchat.explain. */
export const EXPLAIN_INSTRUCTION = "Explain what the selected code does.";
let tokens = 0;
const newToken = (kind: string) => `starchat-${kind}-${Date.now().toString(36)}-${++tokens}`;

export class ChatView implements vscode.WebviewViewProvider, vscode.Disposable {
  private view?: vscode.WebviewView;
  private turns: Turn[] = [];
  private nextId = 1;
  private context?: ChatContext;
  /** The files attached to the conversation (URIs, in the order added): sent with every message. */
  private references: string[] = [];
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
      // openForServer): the conversation goes on without it, and says so. Checked a moment later:
      // a change of language closes and reopens a document at once.
      vscode.workspace.onDidCloseTextDocument((document) => {
        if (document.uri.scheme === "file") return;
        const context = this.context && sameDocument(document.uri, this.context.uri) ? this.context : undefined;
        const reference = this.references.find((uri) => sameDocument(document.uri, uri));
        if (!context && !reference) return;
        setTimeout(() => {
          if (context && this.context === context && !openDocument(context.uri)) this.dropContext(`${context.label} was closed: the chat goes on without it.`);
          if (reference && this.references.includes(reference) && !openDocument(reference)) {
            this.references = this.references.filter((uri) => uri !== reference);
            this.note(`${referenceLabel(reference)} was closed: it was removed from the chat.`);
            this.pushState();
          }
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
  <div id="chips" hidden>
    <div id="context" hidden><span id="context-label"></span><button id="context-clear" title="Forget this context" aria-label="Forget this context">×</button></div>
    <div id="references" role="list" aria-label="Files attached to the chat"></div>
  </div>
  <textarea id="input" rows="3" placeholder="Ask StarChat… (Enter to send, Shift+Enter for a new line)" aria-label="Message"></textarea>
  <div id="buttons">
    <button id="add-file" title="Add File to Chat" aria-label="Add File to Chat">+ File…</button>
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
    const references = this.references.map((uri) => ({ uri, label: referenceLabel(uri) }));
    this.post({ type: "state", turns: this.turns, generating: this.generating, context: this.context?.label ?? null, references });
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
    if (Array.isArray(saved.references)) {
      const uris = saved.references.filter((uri): uri is string => typeof uri === "string").map((uri) => vscode.Uri.parse(uri));
      this.references = [...new Set(uris.filter((uri) => !whyNotAttachable(uri)).map((uri) => uri.toString()))].slice(0, MAX_REFERENCES);
    }
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
    const references = this.references.filter((uri) => !privateDocument(vscode.Uri.parse(uri)));
    const chat: SavedChat = { turns: savedTurns(this.turns), context, references };
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
      case "retry":
        await this.retry();
        break;
      case "clearContext":
        this.context = undefined;
        this.pushState();
        break;
      case "addFile":
        await vscode.commands.executeCommand("starchat.addFileToChat");
        break;
      case "removeReference":
        this.references = this.references.filter((uri) => uri !== message.uri);
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
      case "open": {
        // a file the answer saw, at the first line it saw (beside the chat, in the last editor's column)
        const at = new vscode.Position(message.line, 0);
        await vscode.window.showTextDocument(vscode.Uri.parse(message.uri), {
          viewColumn: this.lastEditor?.viewColumn, selection: new vscode.Range(at, at), preview: true,
        }).then(undefined, (error) => vscode.window.showWarningMessage(`StarChat: ${describeError(error)}`));
        break;
      }
    }
  }

  async reveal(): Promise<void> {
    await vscode.commands.executeCommand(`${VIEW_ID}.focus`);
  }

  newChat(): void {
    this.stop();
    this.turns = [];
    this.context = undefined;
    this.references = [];
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

  /** A note from the extension in the conversation (not sent to the model), and in the log. */
  private note(text: string): void {
    this.log.info(`chat: ${text}`);
    this.addTurn("notice", text, "done");
  }

  /** Forgets the context, with a note in the conversation saying why. */
  private dropContext(note: string): void {
    this.context = undefined;
    this.note(note);
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
    const { document, why } = await this.openForServer(context.uri, `chat context ${context.label}`);
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

  /** The attached files, ready to be sent (as the context is, usableContext): each open in the
   * editor, a file closed since opened again, unseen. One that cannot be (deleted, an untitled
   * document closed) leaves the chat, with a note; the message goes with the others. */
  private async usableReferences(): Promise<string[]> {
    const attached = this.references;
    const opened = await Promise.all(attached.map((uri) => this.openForServer(uri, `chat file ${referenceLabel(uri)}`)));
    const gone = attached.filter((_, i) => !opened[i].document);
    if (gone.length) {
      attached.forEach((uri, i) => {
        if (!opened[i].document && this.references.includes(uri)) this.note(`${referenceLabel(uri)} ${opened[i].why}: it was removed from the chat; this message goes without it.`);
      });
      this.references = this.references.filter((uri) => !gone.includes(uri));
      this.pushState();
    }
    // (one removed meanwhile with its × stays out)
    return attached.filter((uri) => !gone.includes(uri) && this.references.includes(uri));
  }

  /** The document of `uri` open in the editor, so that the server has it (it reads only those):
   * open already, or a file opened now, unseen (the language client sends it to the server).
   * Else why it is not (an untitled document closed, a file deleted). */
  private async openForServer(uri: string, what: string): Promise<{ document?: vscode.TextDocument; why: string }> {
    const document = openDocument(uri);
    if (document) return { document, why: "" };
    if (vscode.Uri.parse(uri).scheme !== "file") return { why: "is no longer open" };
    try {
      const opened = await vscode.workspace.openTextDocument(vscode.Uri.parse(uri));
      this.log.info(`${what}: the file was closed; opened it again`);
      return { document: opened, why: "" };
    } catch (error) {
      this.log.warn(`${what}: ${error instanceof Error ? error.message : String(error)}`);
      return { why: "could not be opened again (deleted?)" };
    }
  }

  /** The files attached to the conversation. */
  get attached(): readonly string[] {
    return this.references;
  }

  /** Add File to Chat: attaches files to the conversation (each once, at most MAX_REFERENCES),
   * and shows the chat. Each is opened now, so that the server has it and a file that is not
   * text or is gone says so at once; those that cannot be attached (not a file the server is
   * sent, one that looks like secrets, a notebook) are named in a warning. */
  async attach(uris: readonly vscode.Uri[]): Promise<void> {
    const refused: string[] = [];
    let full = false;
    for (const uri of uris) {
      const name = documentName(uri);
      const why = whyNotAttachable(uri);
      if (why) {
        refused.push(`${name} ${why}`);
        continue;
      }
      if (this.references.some((attached) => sameDocument(uri, attached))) continue;
      if (this.references.length >= MAX_REFERENCES) {
        full = true;
        continue;
      }
      if (!openDocument(uri.toString())) {
        try {
          if (uri.scheme === "file" && (await vscode.workspace.fs.stat(uri)).type & vscode.FileType.Directory) {
            refused.push(`${name} is a folder`);
            continue;
          }
          await vscode.workspace.openTextDocument(uri);
        } catch (error) {
          this.log.warn(`attaching ${name}: ${error instanceof Error ? error.message : String(error)}`);
          refused.push(`${name} could not be opened as text`);
          continue;
        }
      }
      if (!this.references.some((attached) => sameDocument(uri, attached))) this.references.push(uri.toString());
    }
    if (full) refused.push(`a chat shows at most ${MAX_REFERENCES} files (remove one with its ×)`);
    if (refused.length) void vscode.window.showWarningMessage(`StarChat: not added to the chat: ${refused.join("; ")}.`);
    this.pushState();
    await this.reveal();
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
    const references = await this.usableReferences();
    const messages = this.history(text);
    this.addTurn("user", text, "done");
    const params: Record<string, unknown> = { messages };
    if (context) {
      params.textDocument = { uri: context.uri };
      if (context.range) params.range = context.range;
    }
    await this.chat(client, params, references);
  }

  /** Ask a Question… and Explain about a selection (from the menus, and the server's Explain
   * code action): the question, or Explain's instruction, as the first message of a conversation
   * about the selection, streamed into the chat. Its prompt is the one the server's starchat.ask
   * and starchat.explain build (which cannot stream: executeCommand has no partial results). */
  async askAbout(
    kind: "ask" | "explain",
    args: { textDocument: { uri: string }; range: LspRange; question?: string },
  ): Promise<Answer | undefined> {
    const client = await this.readyClient();
    if (!client) return undefined;
    const uri = vscode.Uri.parse(args.textDocument.uri);
    const label = `${documentName(uri)}:${rangeLabel(client.protocol2CodeConverter.asRange(args.range))}`;
    this.context = { uri: args.textDocument.uri, range: args.range, label };
    const references = await this.usableReferences();
    const text = kind === "ask" ? (args.question ?? "").trim() : EXPLAIN_INSTRUCTION;
    this.addTurn("user", text, "done", kind === "ask" ? `Ask about ${label}` : `Explain ${label}`).asked = kind;
    const messages = [{ role: "user", content: text }];
    return this.chat(client, { messages, textDocument: args.textDocument, range: args.range }, references);
  }

  /** Retry (under the last answer): the last message sent again, its answer replaced, with the
   * chat's context and files as they are now; an Ask or Explain again about its selection. */
  async retry(): Promise<void> {
    if (this.running) return;
    const at = this.turns.map((turn) => turn.role).lastIndexOf("user");
    if (at < 0) return;
    const user = this.turns[at];
    this.turns = this.turns.slice(0, at); // its answer and the notes after it go too
    const context = this.context;
    if (user.asked && context?.range) {
      await this.askAbout(user.asked, { textDocument: { uri: context.uri }, range: context.range, question: user.content });
    } else {
      await this.send(user.content);
    }
  }

  /** A `starchat/chat` request, its answer streamed into a new turn; progress (the model
   * loading, the wait for the engine) shows until the first piece. */
  private chat(client: LanguageClient, params: Record<string, unknown>, references: string[]): Promise<Answer | undefined> {
    // In the prompt's first turn, like the context: sent with every message of the conversation.
    if (references.length) params.references = references.map((uri) => ({ textDocument: { uri } }));
    return this.generate(client, (token, onDelta, onProgress) => {
      const partialResultToken = newToken("chat");
      const workDoneToken = newToken("progress");
      const listeners = [
        client.onProgress(ChatPartial, partialResultToken, (value) => onDelta(value.delta)),
        client.onProgress(WorkDoneProgress.type, workDoneToken, (value: WorkDoneProgressBegin | WorkDoneProgressReport | WorkDoneProgressEnd) => {
          if (value.kind !== "end" && value.message) onProgress(value.message);
        }),
      ];
      return client
        .sendRequest<Answer>("starchat/chat", { ...params, partialResultToken, workDoneToken }, token)
        .finally(() => listeners.forEach((listener) => listener.dispose()));
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
        // The streamed pieces add up to the answer; the final text wins.
        turn.content = answer?.text ?? turn.content;
        turn.finishReason = answer?.finishReason;
        turn.status = answer?.finishReason === "cancelled" ? "stopped" : "done";
        turn.seen = seenDocuments(answer?.shown);
        turn.historyDropped = answer?.historyDropped;
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

/** Why `uri` cannot be attached to a chat, or undefined when it can: the server has only the
 * documents the client syncs, never those that look like secrets; a notebook goes by its cells
 * (the .ipynb's JSON would be a second document of the same URI on the server). */
export function whyNotAttachable(uri: vscode.Uri): string | undefined {
  if (!SYNCED_SCHEMES.includes(uri.scheme)) return `is not a file StarChat can read (${uri.scheme}:)`;
  const reason = privateDocument(uri);
  if (reason) return `${reason}; StarChat does not send it`;
  if (uri.scheme === "file" && /\.ipynb$/i.test(uri.path)) return "is a notebook: select code in a cell and tick Include editor selection";
  return undefined;
}

/** An attached file's name in the chat. */
function referenceLabel(uri: string): string {
  return documentName(vscode.Uri.parse(uri));
}

/** The document of `uri` if the editor has it open (and so the server has it). */
function openDocument(uri: string): vscode.TextDocument | undefined {
  return vscode.workspace.textDocuments.find((document) => !document.isClosed && sameDocument(document.uri, uri));
}

/** The answer's `shown`, for the user: each document's name, and its lines when the model did not
 * see all of it ("lines 1-120 of 400"). */
function seenDocuments(shown: Answer["shown"]): Seen[] | undefined {
  if (!shown?.length) return undefined;
  return shown.map(({ uri, range }) => {
    const first = range.start.line;
    const stop = range.end.character === 0 ? range.end.line : range.end.line + 1; // past the last line seen
    const document = openDocument(uri);
    // lines with text: a last empty line (after a final line break) is not one
    const total = document && document.lineCount - (document.lineAt(document.lineCount - 1).text === "" ? 1 : 0);
    const lines = first === 0 && total !== undefined && stop >= total ? "" : `lines ${first + 1}-${stop}${total ? ` of ${total}` : ""}`;
    return { uri, label: referenceLabel(uri), line: first, lines };
  });
}

function rangeLabel(range: vscode.Range): string {
  let end = range.end.line;
  if (end > range.start.line && range.end.character === 0) end--; // a selection of whole lines
  return end === range.start.line ? `${range.start.line + 1}` : `${range.start.line + 1}-${end + 1}`;
}

/** Not offered by Add File to Chat's list of the workspace's files: folders of dependencies,
 * caches and build output, and files that are not text. (Besides the files.exclude setting.) */
const NOT_OFFERED = [
  "**/node_modules/**",
  "**/bower_components/**",
  "**/.git/**",
  "**/.hg/**",
  "**/.svn/**",
  "**/__pycache__/**",
  "**/.venv/**",
  "**/venv/**",
  "**/.tox/**",
  "**/.mypy_cache/**",
  "**/.pytest_cache/**",
  "**/.ruff_cache/**",
  "**/dist/**",
  "**/build/**",
  "**/out/**",
  "**/target/**",
  ..."png jpg jpeg gif bmp ico webp pdf zip gz tgz bz2 xz 7z tar whl jar class pyc pyo so dylib dll exe o a bin pt pth safetensors onnx gguf npy npz pkl woff woff2 ttf otf mp3 mp4 wav vsix"
    .split(" ")
    .map((extension) => `**/*.${extension}`),
];
/** The workspace's files listed, at most. */
const FILES_LISTED = 300;

type FileItem = vscode.QuickPickItem & { uri?: vscode.Uri };

/** Add File to Chat with no file given: a list to pick files from (several at once), the open
 * editors' documents first, then the workspace's files; none already attached, none that cannot
 * be (whyNotAttachable). */
export async function pickFiles(attached: readonly string[]): Promise<vscode.Uri[] | undefined> {
  const seen = new Set(attached.map((uri) => vscode.Uri.parse(uri).toString()));
  const item = (uri: vscode.Uri): FileItem | undefined => {
    const key = uri.toString();
    if (seen.has(key) || whyNotAttachable(uri)) return undefined;
    seen.add(key);
    const name = documentName(uri);
    const slash = name.lastIndexOf("/");
    return { label: slash < 0 ? name : name.slice(slash + 1), description: slash < 0 ? undefined : name.slice(0, slash), uri };
  };
  const tabs = vscode.window.tabGroups.all.flatMap((group) => group.tabs.map((tab) => tab.input));
  const open = tabs.flatMap((input) => (input instanceof vscode.TabInputText ? [item(input.uri)] : [])).filter((i): i is FileItem => i !== undefined);
  const excluded = Object.entries(vscode.workspace.getConfiguration("files").get<Record<string, unknown>>("exclude") ?? {})
    .filter(([glob, on]) => on === true && !/[{}]/.test(glob))
    .map(([glob]) => glob);
  const found = vscode.workspace.workspaceFolders?.length
    ? await vscode.workspace.findFiles("**/*", `{${[...NOT_OFFERED, ...excluded].join(",")}}`, FILES_LISTED)
    : [];
  const workspace = found
    .sort((a, b) => documentName(a).localeCompare(documentName(b)))
    .map(item)
    .filter((i): i is FileItem => i !== undefined);
  const items: FileItem[] = [
    ...(open.length ? [{ label: "open editors", kind: vscode.QuickPickItemKind.Separator }, ...open] : []),
    ...(workspace.length ? [{ label: "workspace", kind: vscode.QuickPickItemKind.Separator }, ...workspace] : []),
  ];
  if (!items.length) {
    void vscode.window.showInformationMessage("StarChat: no files to add to the chat (open one, or open a folder).");
    return undefined;
  }
  const picked = await vscode.window.showQuickPick(items, {
    title: "Add File to Chat",
    placeHolder: "Files the model sees with every message of this chat",
    canPickMany: true,
    matchOnDescription: true,
  });
  return picked?.flatMap((i) => (i.uri ? [i.uri] : []));
}
