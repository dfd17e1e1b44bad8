// How the extension reaches starchat-lsp: a command it starts (stdio) or a TCP address, and the
// settings it forwards.
import * as net from "net";
import * as os from "os";
import * as vscode from "vscode";
import { ServerOptions, StreamInfo, TransportKind } from "vscode-languageclient/node";

/** The server's settings (docs/protocol.md); `starchat.<key>` in VS Code. */
export const SERVER_SETTINGS = [
  "model",
  "revision",
  "device",
  "dtype",
  "quantization",
  "engine",
  "fastMaxBatch",
  "speculativeTokens",
  "trustRemoteCode",
  "allowUnsafeWeights",
  "maxNewTokens",
  "temperature",
  "topK",
  "topP",
  "repetitionPenalty",
  "seed",
  "systemPrompt",
  "contextWindow",
  "hoverEnabled",
  "hoverMaxNewTokens",
  "hoverContextTokens",
  "completionEnabled",
  "completionModel",
  "completionMaxNewTokens",
  "completionContextTokens",
  "warmCache",
  "loadTimeout",
  "queueSize",
  "requestTimeout",
  "maxMessageBytes",
] as const;

/** The settings that decide which program runs as the server and what it runs (a command line,
 * a Python, its environment, an address to send the documents to, a model and whether its code
 * or pickles run). A workspace's .vscode/settings.json cannot set them in Restricted Mode: they
 * are package.json's `capabilities.untrustedWorkspaces.restrictedConfigurations`, and VS Code's
 * `WorkspaceConfiguration.get` then gives the user's values only (read them with get, not from
 * `inspect()`'s workspace values). */
export const RESTRICTED_SETTINGS = [
  "starchat.server.command",
  "starchat.server.pythonPath",
  "starchat.server.env",
  "starchat.server.tcp",
  "starchat.model",
  "starchat.revision",
  "starchat.completionModel",
  "starchat.trustRemoteCode",
  "starchat.allowUnsafeWeights",
] as const;

/** Files that look like secrets: the same regular expression as the server's `_SECRET_NAMES`
 * (lsp_server/server.py, `looks_secret`), matched the same way: on the URI as sent to the server,
 * lower-cased, without its query. Keep the two the same (tests/editors/test_vscode.py compares
 * them). The server refuses such files; the client does not even send them (privateDocument). */
export const SECRET_NAMES = /(^|\/)(\.env(\..*)?|\.netrc|\.pgpass|id_(rsa|dsa|ecdsa|ed25519)(\.pub)?|credentials(\.json)?)$|\.(pem|key|p12|pfx|jks|keystore)$/;

/** A workspace's own editor settings, which travel with a repository: `.vscode/settings.json` and
 * `.code-workspace` files. Matched on the URI's path. */
export const WORKSPACE_SETTINGS = /\/\.vscode\/settings\.json$|\.code-workspace$/;

/** The editor's own folders, where its configuration lives (it can hold tokens:
 * `starchat.server.env`): `User/` (user and profile settings, keybindings, tasks, snippets, MCP
 * servers, global storage, local history) and `Machine/` (a remote machine's settings) in the
 * user data folder of the machine the extension runs on. Found from where VS Code keeps this
 * extension's files (findEditorFolders), so that a project's own `User/settings.json` is sent
 * like any other file. */
let editorFolders: string[] | undefined;
/** The same files by name, only while the folders are unknown (an unexpected layout). */
const EDITOR_FILES_BY_NAME = /\/User\/(settings\.json|keybindings\.json|tasks\.json|mcp\.json|profiles\/.*|snippets\/.*|globalStorage\/.*)$|\/Machine\/settings\.json$/;
// Paths are compared as the file system does: without case on Windows and macOS.
const pathKey = (path: string) => (process.platform === "win32" || process.platform === "darwin" ? path.toLowerCase() : path);

/** Finds the editor's folders from the extension's global storage,
 * `<user data>/User[/profiles/<id>]/globalStorage/<extension>`; returns them, for the log. */
export function findEditorFolders(globalStorage: vscode.Uri): string[] | undefined {
  const data = /^(.*)\/User(\/profiles\/[^/]+)?\/globalStorage\/[^/]+\/?$/.exec(globalStorage.path)?.[1];
  editorFolders = data === undefined ? undefined : [`${data}/User/`, `${data}/Machine/`];
  return editorFolders;
}

/** Whether `uri` is the editor's own configuration: a `vscode-userdata:` document (how VS Code
 * opens the user settings), a file in its folders, or a workspace's settings. */
function editorConfiguration(uri: vscode.Uri): boolean {
  if (uri.scheme === "vscode-userdata") return true;
  if (WORKSPACE_SETTINGS.test(uri.path)) return true;
  if (!editorFolders) return EDITOR_FILES_BY_NAME.test(uri.path);
  const path = pathKey(uri.path);
  return editorFolders.some((folder) => path.startsWith(pathKey(folder)));
}

/** Why a document is never sent to the server (no didOpen/didChange/didSave/didClose, no hover
 * or code action requests), or undefined when it is sent. */
export function privateDocument(uri: vscode.Uri): string | undefined {
  if (SECRET_NAMES.test(uri.toString().split("?")[0].toLowerCase())) return "looks like it holds secrets (keys, .env)";
  if (editorConfiguration(uri)) return "is the editor's own configuration (it can hold tokens)";
  return undefined;
}

/** The settings the user set (null and "" mean "server default" and are left out), so that they
 * do not override the server's command line. */
function serverSettings(config = vscode.workspace.getConfiguration("starchat")): Record<string, unknown> {
  const settings: Record<string, unknown> = {};
  for (const key of SERVER_SETTINGS) {
    const value = config.get<unknown>(key);
    if (value !== null && value !== undefined && value !== "") settings[key] = value;
  }
  return settings;
}

/** `initializationOptions` for the server: the settings the user set and, over TCP, the token a
 * server started with `STARCHAT_LSP_TOKEN` asks for (from `starchat.server.env`, else from VS
 * Code's own environment; only sent to a server VS Code connects to, never to one it starts). */
export function initializationOptions(config = vscode.workspace.getConfiguration("starchat")): Record<string, unknown> {
  const options = serverSettings(config);
  if (config.get<string | null>("server.tcp")) {
    const token = config.get<Record<string, string> | null>("server.env")?.STARCHAT_LSP_TOKEN ?? process.env.STARCHAT_LSP_TOKEN;
    if (token) options.token = token;
  }
  return options;
}

/** Section `starchat` as the server sees it (workspace/configuration, didChangeConfiguration):
 * every server setting, null where unset (so that removing a setting restores the default), and
 * none of the client's own (`starchat.server.*`: the command line and `env`, which may hold
 * tokens; `starchat.trace.*`). */
export function serverSettingsSection(scopeUri?: string): Record<string, unknown> {
  let scope: vscode.Uri | undefined;
  try {
    scope = scopeUri ? vscode.Uri.parse(scopeUri) : undefined;
  } catch {
    scope = undefined;
  }
  const config = vscode.workspace.getConfiguration("starchat", scope);
  const settings: Record<string, unknown> = {};
  for (const key of SERVER_SETTINGS) settings[key] = config.get<unknown>(key) ?? null;
  return settings;
}

function expand(value: string): string {
  const folder = vscode.workspace.workspaceFolders?.[0]?.uri.fsPath ?? "";
  return value
    .replace(/\$\{workspaceFolder\}/g, folder)
    .replace(/\$\{userHome\}/g, os.homedir())
    .replace(/^~(?=$|\/)/, os.homedir());
}

export function parseAddress(address: string): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(address.trim()) ?? /^()()(\d+)$/.exec(address.trim());
  if (!match) throw new Error(`starchat.server.tcp must be "host:port", not ${JSON.stringify(address)}`);
  const port = Number(match[3]);
  if (!(port > 0 && port < 65536)) throw new Error(`starchat.server.tcp: bad port in ${JSON.stringify(address)}`);
  return { host: match[1] || match[2] || "127.0.0.1", port };
}

/** A human-readable description, for the log. */
export function describeServer(config = vscode.workspace.getConfiguration("starchat")): string {
  const tcp = config.get<string | null>("server.tcp");
  if (tcp) return `tcp ${tcp}`;
  const { command, args } = serverCommand(config);
  return [command, ...args].join(" ");
}

function serverCommand(config: vscode.WorkspaceConfiguration): { command: string; args: string[] } {
  const command = config.get<string[] | null>("server.command");
  if (Array.isArray(command) && command.length > 0) {
    const [exe, ...args] = command.map(expand);
    return { command: exe, args };
  }
  const python = config.get<string | null>("server.pythonPath");
  if (python) return { command: expand(python), args: ["-m", "lsp_server"] };
  return { command: "starchat-lsp", args: [] };
}

export function serverOptions(config = vscode.workspace.getConfiguration("starchat")): ServerOptions {
  const tcp = config.get<string | null>("server.tcp");
  if (tcp) {
    const { host, port } = parseAddress(tcp);
    return () =>
      new Promise<StreamInfo>((resolve, reject) => {
        const socket = net.connect({ host, port });
        socket.once("connect", () => {
          socket.removeListener("error", reject);
          resolve({ reader: socket, writer: socket });
        });
        socket.once("error", reject);
      });
  }
  const { command, args } = serverCommand(config);
  const env = { ...process.env, ...(config.get<Record<string, string>>("server.env") ?? {}) };
  const cwd = vscode.workspace.workspaceFolders?.[0]?.uri.scheme === "file" ? vscode.workspace.workspaceFolders[0].uri.fsPath : undefined;
  return { command, args, transport: TransportKind.stdio, options: { env, cwd } };
}
