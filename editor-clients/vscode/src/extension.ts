// StarChat for VS Code: a client of starchat-lsp (docs/protocol.md).
import * as vscode from "vscode";
import {
  ClientCapabilities,
  CodeActionResolveRequest,
  DidChangeConfigurationNotification,
  DocumentSelector,
  ExecuteCommandRequest,
  FeatureState,
  InlineCompletionRequest,
  InlineCompletionTriggerKind,
  LanguageClient,
  LanguageClientOptions,
  ProgressToken,
  ProposedFeatures,
  RevealOutputChannelOn,
  State,
  StaticFeature,
  WorkDoneProgress,
  WorkDoneProgressBegin,
  WorkDoneProgressCreateRequest,
  WorkDoneProgressEnd,
  WorkDoneProgressReport,
} from "vscode-languageclient/node";
import { ChatView, SYNCED_SCHEMES, VIEW_ID, describeError, documentName, pickFiles } from "./chat";
import { RESTRICTED_SETTINGS, SERVER_SETTINGS, describeServer, findEditorFolders, initializationOptions, privateDocument, serverOptions, serverSettingsSection } from "./server";
import { StatusItem } from "./status";

type Task = "fix" | "optimize" | "document" | "tests";
const TASK_TITLES: Record<Task, string> = { fix: "Fix", optimize: "Optimize", document: "Document", tests: "Write tests" };

/** Tells the server what this client does itself: ask the user for a question or an instruction
 * (the "Ask…" and "Edit…" code actions run the client commands starchat.askQuestion and
 * starchat.editSelection) and show answers (in the chat view). */
class StarChatCapabilities implements StaticFeature {
  fillClientCapabilities(capabilities: ClientCapabilities): void {
    capabilities.experimental = { ...(capabilities.experimental ?? {}), starchat: { askQuestion: true, editSelection: true, showsAnswers: true } };
  }
  initialize(): void {}
  getState(): FeatureState {
    return { kind: "static" };
  }
  clear(): void {}
}

/** LSP 3.18's InlineCompletionTriggerKind for VS Code's: Invoked 1 (Trigger Inline Suggestion),
 * Automatic 2 (as the user types). */
function lspTriggerKind(kind: vscode.InlineCompletionTriggerKind): 1 | 2 {
  return kind === vscode.InlineCompletionTriggerKind.Invoke ? 1 : 2;
}

/** Inline completion (textDocument/inlineCompletion: ghost text as the user types, Tab accepts)
 * is a proposed feature in vscode-languageclient 9: without this, the client neither announces
 * the capability nor asks the server, whatever the server advertises. Only that feature is taken
 * from the proposed ones, and only when the client does not have it already (later versions
 * build it in). */
function registerInlineCompletion(lc: LanguageClient): void {
  if (lc.getFeature(InlineCompletionRequest.method)) return;
  for (const feature of ProposedFeatures.createAll(lc)) {
    if ("registrationType" in feature && feature.registrationType.method === InlineCompletionRequest.method) lc.registerFeature(feature);
  }
}

interface StatusParams {
  state: "loading" | "ready" | "generating" | "error";
  message: string;
}

let client: LanguageClient | undefined;
let log: vscode.LogOutputChannel;
let status: StatusItem;
let chat: ChatView;

export async function activate(context: vscode.ExtensionContext): Promise<{ client: () => LanguageClient | undefined }> {
  log = vscode.window.createOutputChannel("StarChat", { log: true });
  status = new StatusItem();
  // The editor's own configuration is never sent to the server: where it is, on this machine.
  const folders = findEditorFolders(context.globalStorageUri);
  log.info(folders ? `the editor's own folders (never sent to the server): ${folders.join(", ")}` : `the editor's folders are not where expected (${context.globalStorageUri.path}): files named like its settings are never sent`);
  chat = new ChatView(context.extensionUri, context.workspaceState, () => client, log);
  context.subscriptions.push(log, status, chat);
  context.subscriptions.push(vscode.window.registerWebviewViewProvider(VIEW_ID, chat, { webviewOptions: { retainContextWhenHidden: true } }));

  const command = (id: string, run: (...args: any[]) => unknown) => context.subscriptions.push(vscode.commands.registerCommand(id, run));
  command("starchat.askQuestion", askQuestion);
  command("starchat.editSelection", editSelection);
  command("starchat.explainSelection", () => explainSelection());
  command("starchat.fixSelection", () => runTask("fix"));
  command("starchat.optimizeSelection", () => runTask("optimize"));
  command("starchat.documentSelection", () => runTask("document"));
  command("starchat.testSelection", () => runTask("tests"));
  command("starchat.openChat", () => chat.reveal());
  command("starchat.newChat", () => chat.newChat());
  command("starchat.addFileToChat", addFileToChat);
  command("starchat.stop", () => chat.stop());
  command("starchat.showLog", () => log.show());
  command("starchat.restartServer", () => restart());
  command("starchat.toggleCompletion", toggleCompletion);
  command("starchat.showMenu", showMenu);
  status.setCompletion(completionEnabled());

  context.subscriptions.push(
    vscode.workspace.onDidChangeConfiguration((event) => {
      // How the server is reached: a new server. The trace setting is the language client's own
      // (it follows it without a restart, which would reload the model).
      if (event.affectsConfiguration("starchat.server")) void restart();
      else if (SERVER_SETTINGS.some((key) => event.affectsConfiguration(`starchat.${key}`))) void sendSettings();
      if (event.affectsConfiguration("starchat.completionEnabled")) status.setCompletion(completionEnabled());
    }),
    { dispose: () => void deactivate() },
  );
  lifecycle = start();
  await lifecycle;
  return { client: () => client };
}

export async function deactivate(): Promise<void> {
  deactivated = true;
  // Before the server goes: an answer still coming is kept as received, not as an error.
  chat?.close();
  await lifecycle.catch(() => undefined);
  const running = client;
  client = undefined;
  await running?.stop();
}

/** Whether inline completion is on: `starchat.completionEnabled`, where null is the server's
 * default (on). */
function completionEnabled(): boolean {
  return vscode.workspace.getConfiguration("starchat").get<boolean | null>("completionEnabled") !== false;
}

/** StarChat: Toggle Inline Completion. Flips `starchat.completionEnabled` where it takes effect:
 * in the workspace's settings when they set it (a user setting would not win over them), else
 * in the user's; the server follows (workspace/didChangeConfiguration). */
async function toggleCompletion(): Promise<void> {
  const config = vscode.workspace.getConfiguration("starchat");
  const inWorkspace = config.inspect<boolean | null>("completionEnabled")?.workspaceValue !== undefined; // null too
  const on = !completionEnabled();
  await config.update("completionEnabled", on, inWorkspace ? vscode.ConfigurationTarget.Workspace : vscode.ConfigurationTarget.Global);
  if (completionEnabled() !== on) {
    // set where a toggle does not write (a folder's or the remote machine's settings)
    void vscode.window.showWarningMessage(`StarChat: inline completion stays ${on ? "off" : "on"}: starchat.completionEnabled is set in other settings that win (a folder's, or the remote machine's).`);
    return;
  }
  void vscode.window.setStatusBarMessage(`StarChat: inline completion ${on ? "on" : "off"}`, 3000);
}

/** StarChat: Show Menu (a click on the status bar item): what the user may want from there, for
 * the state the server is in. The first item is what a click did before the menu: the log after
 * an error, else the chat. */
async function showMenu(): Promise<void> {
  type Item = vscode.QuickPickItem & { command?: string };
  const failed = status.state === "error" || status.state === "stopped";
  const completion = completionEnabled();
  const items: Item[] = [
    ...(failed ? [{ label: "$(output) Show Log", command: "starchat.showLog" }, { label: "$(debug-restart) Restart Server", command: "starchat.restartServer" }] : []),
    { label: "$(comment-discussion) Open Chat", command: "starchat.openChat" },
    ...(chat.generating ? [{ label: "$(debug-stop) Stop Generating", command: "starchat.stop" }] : []),
    {
      label: completion ? "$(circle-slash) Turn Inline Completion Off" : "$(check) Turn Inline Completion On",
      description: `inline completion is ${completion ? "on" : "off"}`,
      command: "starchat.toggleCompletion",
    },
    ...(failed ? [] : [{ label: "", kind: vscode.QuickPickItemKind.Separator }, { label: "$(output) Show Log", command: "starchat.showLog" }, { label: "$(debug-restart) Restart Server", command: "starchat.restartServer" }]),
  ];
  const picked = await vscode.window.showQuickPick(items, { title: `StarChat: ${status.state}`, placeHolder: status.message });
  if (picked?.command) await vscode.commands.executeCommand(picked.command);
}

// ---- the language client ----------------------------------------------------------------------
async function start(): Promise<void> {
  const config = vscode.workspace.getConfiguration("starchat");
  const documentSelector: DocumentSelector = SYNCED_SCHEMES.map((scheme) => ({ scheme }));
  const clientOptions: LanguageClientOptions = {
    documentSelector,
    outputChannel: log,
    revealOutputChannelOn: RevealOutputChannelOn.Never,
    initializationOptions: initializationOptions(config),
    // No `synchronize.configurationSection`: it would send the whole `starchat` section, with
    // `starchat.server.env` (tokens) and the command line, to the server (see sendSettings).
    middleware: {
      workspace: {
        // The server pulls section `starchat`: it gets its own settings, not the client's.
        configuration: async (params, token, next) => {
          const result = await next(params, token);
          if (!Array.isArray(result)) return result;
          return result.map((value, i) => {
            const section = params.items[i]?.section;
            if (section === "starchat") return serverSettingsSection(params.items[i].scopeUri);
            if (section?.startsWith("starchat.server") || section?.startsWith("starchat.trace")) return null;
            return value;
          });
        },
      },
      // Files that look like secrets (.env, keys, …) and the editor's own settings never go to
      // the server (which may be on another machine, starchat.server.tcp): not their text
      // (didOpen/didChange), nor that they were saved or closed, nor hover and code-action
      // requests about them. Commands on them say why (selectionArgs).
      didOpen: (document, next) => {
        const reason = privateDocument(document.uri);
        if (!reason) return next(document);
        log.info(`not sending ${documentName(document.uri)} to the server: it ${reason}`);
        return Promise.resolve();
      },
      didChange: (event, next) => (privateDocument(event.document.uri) ? Promise.resolve() : next(event)),
      willSave: (event, next) => (privateDocument(event.document.uri) ? Promise.resolve() : next(event)),
      willSaveWaitUntil: (event, next) => (privateDocument(event.document.uri) ? Promise.resolve([]) : next(event)),
      didSave: (document, next) => (privateDocument(document.uri) ? Promise.resolve() : next(document)),
      didClose: (document, next) => (privateDocument(document.uri) ? Promise.resolve() : next(document)),
      // the same for notebooks (named like secrets) and their cells
      notebooks: {
        didOpen: (notebook, cells, next) => (privateDocument(notebook.uri) ? Promise.resolve() : next(notebook, cells)),
        didChange: (event, next) => (privateDocument(event.notebook.uri) ? Promise.resolve() : next(event)),
        didSave: (notebook, next) => (privateDocument(notebook.uri) ? Promise.resolve() : next(notebook)),
        didClose: (notebook, cells, next) => (privateDocument(notebook.uri) ? Promise.resolve() : next(notebook, cells)),
      },
      provideHover: (document, position, token, next) => (privateDocument(document.uri) ? undefined : next(document, position, token)),
      provideCodeActions: (document, range, context, token, next) => (privateDocument(document.uri) ? [] : next(document, range, context, token)),
      // Inline completion, asked by VS Code as the user types (and by Trigger Inline Suggestion):
      // sent here rather than by the language client, whose version 9 sends VS Code's own trigger
      // kinds (Invoke 0, Automatic 1: an early draft of LSP 3.18), which a 3.18 server refuses (0)
      // or reads as the other kind (1: Invoked). Never about a document the server was not sent.
      provideInlineCompletionItems: async (document, position, context, token) => {
        if (privateDocument(document.uri)) return undefined;
        const params = created.code2ProtocolConverter.asInlineCompletionParams(document, position, context);
        params.context = { ...params.context, triggerKind: lspTriggerKind(context.triggerKind) as InlineCompletionTriggerKind };
        try {
          const result = await created.sendRequest(InlineCompletionRequest.type, params, token);
          return token.isCancellationRequested ? null : created.protocol2CodeConverter.asInlineCompletionResult(result, token);
        } catch (error) {
          return created.handleFailedRequest(InlineCompletionRequest.type, token, error, null);
        }
      },
      // Fix, Optimize, Document and Write tests picked from the light bulb run in
      // codeAction/resolve: a notification with Cancel (which stops the model) while they run.
      // Explain and Ask carry a command instead and resolve at once.
      resolveCodeAction: async (item, token, next) => {
        const running = client;
        if (item.command || item.edit || !running) return next(item, token);
        const resolved = await withCancellableProgress(item.title, (cancel) =>
          whileNeither(token, cancel, async (either) => {
            const sent = running.code2ProtocolConverter.asCodeActionSync(item);
            try {
              return await running.protocol2CodeConverter.asCodeAction(await running.sendRequest(CodeActionResolveRequest.type, sent, either), either);
            } catch (error) {
              if (either.isCancellationRequested) return undefined; // stopped: nothing to apply
              throw error;
            }
          }),
        );
        return resolved ?? item;
      },
      // Ask and Explain (from the code actions) answer in the chat view, streamed; edits show progress.
      executeCommand: async (command, args, next) => {
        if (command === "starchat.ask" || command === "starchat.explain") return chat.askAbout(command === "starchat.ask" ? "ask" : "explain", args[0]);
        if (command === "starchat.runTask" || command === "starchat.edit") {
          const title = command === "starchat.runTask" ? `StarChat: ${TASK_TITLES[args[0]?.task as Task] ?? args[0]?.task}` : "StarChat: Edit";
          return withCancellableProgress(title, (token) => sendCommand(command, args, token));
        }
        return next(command, args);
      },
    },
  };
  log.info(`starting the server: ${describeServer(config)}`);
  // Restricted Mode (package.json, untrustedWorkspaces): the workspace cannot choose the program.
  // When the user trusts the workspace, VS Code reports those settings changed (onDidChangeConfiguration).
  if (!vscode.workspace.isTrusted) log.info(`Restricted Mode: ${RESTRICTED_SETTINGS.join(", ")} come from the user settings only (the workspace's are used once it is trusted)`);
  let options;
  try {
    options = serverOptions(config);
  } catch (error) {
    status.set("error", String(error instanceof Error ? error.message : error));
    log.error(String(error));
    return;
  }
  const created = new LanguageClient("starchat", "StarChat", options, clientOptions);
  created.registerFeature(new StarChatCapabilities());
  registerInlineCompletion(created);
  created.onDidChangeState((event) => {
    if (event.newState === State.Starting) status.set("starting", "Starting the server");
    else if (event.newState === State.Stopped && client === created) status.set("stopped", "The server stopped; see the log.");
    // The language client installs its own window/workDoneProgress/create handler each time it
    // (re)starts the server, e.g. after a crash; ours goes back on top of it.
    else if (event.newState === State.Running) watchServerProgress(created);
  });
  client = created;
  status.set("starting", `Starting ${describeServer(config)}`);
  try {
    await created.start();
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    log.error(`could not start the server: ${message}`);
    status.set("error", `Could not start the server: ${message}`);
    return;
  }
  created.onNotification("starchat/status", (params: StatusParams) => {
    log.info(`status: ${params.state}: ${params.message}`);
    status.set(params.state, params.message);
  });
  watchServerProgress(created);
  if (status.state === "starting") status.set("loading", "Waiting for the model");
}

// Starting and stopping are serialized: a restart asked for while another runs (two settings
// changes in a row, Restart Server twice) waits for it, and restarts asked for meanwhile are
// one. Unserialized, both would start a server and one (with the model in GPU memory) would be
// left running with no client.
let lifecycle: Promise<void> = Promise.resolve();
let restartQueued: Promise<void> | undefined;
let deactivated = false;

function restart(): Promise<void> {
  if (restartQueued) return restartQueued;
  const queued = lifecycle.then(async () => {
    restartQueued = undefined;
    if (deactivated) return;
    const old = client;
    client = undefined;
    chat.stop();
    try {
      await old?.stop();
    } catch (error) {
      log.warn(`stopping the server: ${error}`);
    }
    if (!deactivated) await start();
  });
  restartQueued = queued;
  lifecycle = queued.catch((error) => log.error(`restarting the server: ${error}`));
  return lifecycle;
}

/** workspace/didChangeConfiguration with the server's settings only; the server then pulls
 * section `starchat` (docs/protocol.md). */
async function sendSettings(): Promise<void> {
  const running = client;
  if (!running?.isRunning()) return;
  try {
    await running.sendNotification(DidChangeConfigurationNotification.type, { settings: { starchat: serverSettingsSection() } });
  } catch (error) {
    log.warn(`sending the changed settings: ${error}`);
  }
}

/** Server-created work-done progress (model loading, hover, …) goes to the status bar item
 * instead of a notification per request. */
function watchServerProgress(lc: LanguageClient): void {
  const titles = new Map<ProgressToken, string>();
  lc.onRequest(WorkDoneProgressCreateRequest.type, ({ token }) => {
    const listener = lc.onProgress(WorkDoneProgress.type, token, (value: WorkDoneProgressBegin | WorkDoneProgressReport | WorkDoneProgressEnd) => {
      if (value.kind === "begin") {
        titles.set(token, value.title);
        status.report(value.title, value.message, value.percentage);
      } else if (value.kind === "report") {
        status.report(titles.get(token) ?? "StarChat", value.message, value.percentage);
      } else {
        titles.delete(token);
        listener.dispose();
        status.endProgress();
      }
    });
    return null;
  });
}

function sendCommand(command: string, args: unknown[], token?: vscode.CancellationToken): Promise<unknown> {
  if (!client) throw new Error("The StarChat server is not running.");
  return client.sendRequest(ExecuteCommandRequest.type, { command, arguments: args }, token);
}

/** `work` under a notification with a Cancel button; its errors are shown as notifications. */
function withCancellableProgress<T>(title: string, work: (token: vscode.CancellationToken) => Promise<T>): Thenable<T | undefined> {
  return vscode.window.withProgress({ location: vscode.ProgressLocation.Notification, title, cancellable: true }, async (_progress, token) => {
    try {
      return await work(token);
    } catch (error) {
      if (token.isCancellationRequested) return undefined;
      const message = describeError(error);
      log.error(`${title}: ${message}`);
      void vscode.window.showErrorMessage(`${title}: ${message}`, "Show Log").then((choice) => choice && log.show());
      return undefined;
    }
  });
}

/** `work` with a token cancelled as soon as either `a` or `b` is. */
async function whileNeither<T>(a: vscode.CancellationToken, b: vscode.CancellationToken, work: (either: vscode.CancellationToken) => Promise<T>): Promise<T> {
  const source = new vscode.CancellationTokenSource();
  const subscriptions = [a, b].map((token) => token.onCancellationRequested(() => source.cancel()));
  if (a.isCancellationRequested || b.isCancellationRequested) source.cancel();
  try {
    return await work(source.token);
  } finally {
    subscriptions.forEach((d) => d.dispose());
    source.dispose();
  }
}

// ---- commands on the selection ----------------------------------------------------------------
interface SelectionArgs {
  textDocument: { uri: string };
  range: { start: { line: number; character: number }; end: { line: number; character: number } };
}

function selectionArgs(): (SelectionArgs & { version: number }) | undefined {
  const editor = vscode.window.activeTextEditor;
  if (!editor) {
    void vscode.window.showInformationMessage("StarChat: select some code in an editor first.");
    return undefined;
  }
  if (!SYNCED_SCHEMES.includes(editor.document.uri.scheme)) {
    // The server only knows the documents the client opened for it (files and untitled ones).
    void vscode.window.showInformationMessage(`StarChat: works on files and untitled documents, not on ${editor.document.uri.scheme}: documents.`);
    return undefined;
  }
  const reason = privateDocument(editor.document.uri);
  if (reason) {
    void vscode.window.showInformationMessage(`StarChat: ${documentName(editor.document.uri)} ${reason}; StarChat does not send it to the server.`);
    return undefined;
  }
  if (!client?.isRunning()) {
    void vscode.window.showErrorMessage("StarChat: the language server is not running.", "Show Log").then((choice) => choice && log.show());
    return undefined;
  }
  return {
    textDocument: { uri: client.code2ProtocolConverter.asUri(editor.document.uri) },
    range: client.code2ProtocolConverter.asRange(editor.selection),
    version: editor.document.version,
  };
}

/** What the user types in an input box, trimmed; undefined when it is empty or dismissed. */
async function inputText(title: string, prompt: string, placeHolder: string): Promise<string | undefined> {
  const text = await vscode.window.showInputBox({ title, prompt, placeHolder, ignoreFocusOut: true });
  return text?.trim() || undefined;
}

/** A code action's argument ({textDocument, range, version?}) when the command came from one,
 * else the active editor's selection (undefined, with a message, when there is none). */
function givenOrSelection(arg: unknown): (SelectionArgs & { version?: number }) | undefined {
  if (arg && typeof arg === "object" && "textDocument" in arg && "range" in arg) return arg as SelectionArgs & { version?: number };
  return selectionArgs();
}

/** `starchat.askQuestion`: from the context menu (no arguments, or the editor's URI) or from the
 * server's "StarChat: Ask…" code action ({textDocument, range}). */
async function askQuestion(arg?: unknown): Promise<void> {
  const args = givenOrSelection(arg);
  if (!args) return;
  const question = await inputText("Ask StarChat", "A question about the selected code", "e.g. Does this handle an empty list?");
  if (question) await chat.askAbout("ask", { textDocument: args.textDocument, range: args.range, question });
}

/** StarChat: Edit…: an instruction for the selected code ("Add type hints"); the server puts the
 * answer's code in its place with workspace/applyEdit (one undo takes it back; refused if the
 * document changed meanwhile). Without a selection, for the cursor's line: on an empty line, the
 * code asked for is written there ("Write a function that…"). From the context menu, Ctrl+I, or
 * the server's "StarChat: Edit…" code action ({textDocument, range, version}). */
async function editSelection(arg?: unknown): Promise<void> {
  const args = givenOrSelection(arg);
  if (!args) return;
  const { start, end } = args.range;
  const document = vscode.window.activeTextEditor?.document;
  const atCursor = start.line === end.line && start.character === end.character && document
    && document.uri.toString() === vscode.Uri.parse(args.textDocument.uri).toString() && start.line < document.lineCount;
  const cursorLine = atCursor ? document.lineAt(start.line) : undefined;
  const [prompt, example] = !cursorLine
    ? ["How should the selected code change?", "e.g. Add type hints"]
    : cursorLine.isEmptyOrWhitespace
      ? ["What should StarChat write here?", "e.g. Write a function that parses a date"]
      : ["How should this line change?", "e.g. Use a list comprehension"];
  const instruction = await inputText("Edit with StarChat", prompt, example);
  if (!instruction) return;
  await withCancellableProgress("StarChat: Edit", (token) => sendCommand("starchat.edit", [{ ...args, instruction, mode: "replace" }], token));
}

/** StarChat: Add File to Chat: from the Explorer's context menu (the file right-clicked, or all
 * the files selected with it), from an editor tab's context menu (its file), or else a list to
 * pick from (the open editors' documents, then the workspace's files). */
async function addFileToChat(arg?: unknown, selected?: unknown): Promise<void> {
  const isUri = (value: unknown): value is vscode.Uri => value instanceof vscode.Uri;
  let uris: vscode.Uri[] | undefined;
  if (Array.isArray(selected) && selected.length > 0 && selected.every(isUri)) uris = selected;
  else if (isUri(arg)) uris = [arg];
  else uris = await pickFiles(chat.attached);
  if (uris?.length) await chat.attach(uris);
}

async function explainSelection(): Promise<void> {
  const args = selectionArgs();
  if (args) await chat.askAbout("explain", { textDocument: args.textDocument, range: args.range });
}

/** Fix, Optimize, Document, Write tests: the server computes the edit and applies it with
 * workspace/applyEdit (refused if the document changed meanwhile). */
async function runTask(task: Task): Promise<void> {
  const args = selectionArgs();
  if (!args) return;
  const diagnostics = task === "fix" ? diagnosticsInSelection() : undefined; // undefined: not sent
  await withCancellableProgress(`StarChat: ${TASK_TITLES[task]}`, (token) =>
    sendCommand("starchat.runTask", [{ ...args, task, diagnostics }], token),
  );
}

/** The problems the editor shows in the selection (on the cursor's line when nothing is
 * selected): a Fix is told about them, as when it is picked as a quick fix on them. */
function diagnosticsInSelection(): unknown[] {
  const editor = vscode.window.activeTextEditor;
  if (!editor || !client) return [];
  const selection = editor.selection;
  const area = selection.isEmpty ? editor.document.lineAt(selection.active.line).range : selection;
  const shown = vscode.languages.getDiagnostics(editor.document.uri).filter((d) => d.range.intersection(area) !== undefined);
  return client.code2ProtocolConverter.asDiagnosticsSync(shown);
}
