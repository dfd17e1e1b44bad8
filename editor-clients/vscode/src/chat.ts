// The chat view: a webview in the panel with the conversation, answers streamed from
// `starchat/chat` ($/progress {delta} on the request's partialResultToken), a Stop button that
// cancels the request, and Insert / Replace on code blocks. Ask and Explain answers land here too.
import * as vscode from "vscode";
import {
  CancellationTokenSource as LspCancellationTokenSource,
  ExecuteCommandRequest,
  LanguageClient,
  ProgressType,
  Range as LspRange,
  WorkDoneProgress,
  WorkDoneProgressBegin,
  WorkDoneProgressReport,
  WorkDoneProgressEnd,
} from "vscode-languageclient/node";

export const VIEW_ID = "starchat.chat";

type Role = "user" | "assistant";
type TurnStatus = "done" | "streaming" | "stopped" | "error";

export interface Turn {
  id: number;
  role: Role;
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
  private readonly disposables: vscode.Disposable[] = [];

  constructor(
    private readonly extensionUri: vscode.Uri,
    private readonly getClient: () => LanguageClient | undefined,
    private readonly log: vscode.LogOutputChannel,
  ) {
    this.lastEditor = vscode.window.activeTextEditor;
    this.disposables.push(
      vscode.window.onDidChangeActiveTextEditor((editor) => {
        if (editor) this.lastEditor = editor;
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
    view.webview.onDidReceiveMessage((message: FromWebview) => this.onMessage(message), undefined, this.disposables);
    view.onDidDispose(() => {
      if (this.view === view) this.view = undefined;
    });
  }

  private html(webview: vscode.Webview): string {
    const nonce = Array.from({ length: 32 }, () => Math.floor(Math.random() * 36).toString(36)).join("");
    const script = webview.asWebviewUri(vscode.Uri.joinPath(this.extensionUri, "out", "webview.js"));
    const style = webview.asWebviewUri(vscode.Uri.joinPath(this.extensionUri, "media", "chat.css"));
    const csp = [
      "default-src 'none'",
      `style-src ${webview.cspSource} 'unsafe-inline'`,
      `script-src 'nonce-${nonce}'`,
      `img-src ${webview.cspSource} https: data:`,
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
    const editor = vscode.window.visibleTextEditors.find((e) => e === this.lastEditor) ?? this.lastEditor ?? vscode.window.activeTextEditor;
    if (!editor || editor.document.isClosed) {
      void vscode.window.showWarningMessage("StarChat: open an editor to put the code in.");
      return;
    }
    const shown = await vscode.window.showTextDocument(editor.document, { viewColumn: editor.viewColumn, preserveFocus: false });
    const selection = shown.selection;
    await shown.edit((builder) => {
      if (how === "replace") builder.replace(selection, code);
      else builder.insert(selection.active, code);
    });
  }

  // ---- conversations -------------------------------------------------------------------------
  private addTurn(role: Role, content: string, status: TurnStatus, title?: string): Turn {
    const turn: Turn = { id: this.nextId++, role, content, status, title };
    this.turns.push(turn);
    return turn;
  }

  /** The history as `starchat/chat` messages: finished user/assistant pairs, then `last`. */
  private history(last: string): { role: Role; content: string }[] {
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
    const name = vscode.workspace.asRelativePath(editor.document.uri);
    if (editor.selection.isEmpty) return { uri: editor.document.uri.toString(), label: name };
    return {
      uri: editor.document.uri.toString(),
      range: client.code2ProtocolConverter.asRange(editor.selection),
      label: `${name}:${rangeLabel(editor.selection)}`,
    };
  }

  /** A chat message typed in the view, answered with streaming. */
  async send(text: string, includeSelection = false): Promise<void> {
    text = text.trim();
    if (!text) return;
    const client = await this.readyClient();
    if (!client) return;
    if (includeSelection) this.context = this.selectionContext() ?? this.context;
    const messages = this.history(text);
    this.addTurn("user", text, "done");
    const context = this.context;
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
    const label = `${vscode.workspace.asRelativePath(uri)}:${rangeLabel(client.protocol2CodeConverter.asRange(args.range))}`;
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
    const client = this.getClient();
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
        turn.error = error instanceof Error ? error.message : String(error);
        this.log.error(`chat request failed: ${turn.error}`);
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
    this.stop();
    for (const d of this.disposables) d.dispose();
  }
}

function rangeLabel(range: vscode.Range): string {
  let end = range.end.line;
  if (end > range.start.line && range.end.character === 0) end--; // a selection of whole lines
  return end === range.start.line ? `${range.start.line + 1}` : `${range.start.line + 1}-${end + 1}`;
}
