// The status bar item: starting, model loading (with its progress), ready, generating, error.
import * as vscode from "vscode";

export type State = "starting" | "loading" | "ready" | "generating" | "error" | "stopped";

const ICONS: Record<State, string> = {
  starting: "$(loading~spin)",
  loading: "$(loading~spin)",
  ready: "$(sparkle)",
  generating: "$(sync~spin)",
  error: "$(error)",
  stopped: "$(debug-disconnect)",
};

export class StatusItem implements vscode.Disposable {
  private readonly item = vscode.window.createStatusBarItem("starchat.status", vscode.StatusBarAlignment.Right, 100);
  state: State = "starting";
  message = "Starting the server";
  private progress = ""; // e.g. "42%" or "17 tokens"
  private completion = true; // inline completion on (starchat.completionEnabled)

  constructor() {
    this.item.name = "StarChat";
    this.render();
    this.item.show();
  }

  set(state: State, message?: string): void {
    if (state !== this.state) this.progress = "";
    this.state = state;
    if (message !== undefined) this.message = message;
    void vscode.commands.executeCommand("setContext", "starchat.state", state);
    this.render();
  }

  /** A work-done progress report from the server ($/progress). */
  report(title: string, message?: string, percentage?: number): void {
    const parts = [percentage !== undefined ? `${Math.round(percentage)}%` : "", message ?? ""].filter(Boolean);
    this.progress = parts.join(" ");
    if (this.state === "loading" || this.state === "generating" || this.state === "starting") this.render(title);
  }

  /** Inline completion turned on or off: "(completion off)" shows while it is off. */
  setCompletion(on: boolean): void {
    this.completion = on;
    this.render();
  }

  endProgress(): void {
    this.progress = "";
    this.render();
  }

  private render(title?: string): void {
    const label = { starting: "starting", loading: "loading", ready: "", generating: "generating", error: "error", stopped: "stopped" }[this.state];
    const progress = this.progress && (this.state === "loading" || this.state === "generating" || this.state === "starting") ? ` (${this.progress})` : "";
    const off = this.completion ? "" : " (completion off)";
    this.item.text = `${ICONS[this.state]} StarChat${label ? `: ${label}` : ""}${progress}${off}`;
    const tooltip = new vscode.MarkdownString(undefined, true);
    tooltip.appendMarkdown(`**StarChat** — ${this.state}\n\n`);
    tooltip.appendText(this.message);
    if (title && this.progress) tooltip.appendText(`\n${title}: ${this.progress}`);
    tooltip.appendText(`\nInline completion: ${this.completion ? "on" : "off"}`);
    const error = this.state === "error" || this.state === "stopped";
    tooltip.appendMarkdown(error ? "\n\n_Click for the log and a restart._" : "\n\n_Click for the chat, inline completion on or off, the log._");
    this.item.tooltip = tooltip;
    this.item.command = "starchat.showMenu";
    this.item.backgroundColor = error ? new vscode.ThemeColor("statusBarItem.errorBackground") : undefined;
    this.item.accessibilityInformation = { label: `StarChat ${this.state}: ${this.message}` };
  }

  dispose(): void {
    this.item.dispose();
  }
}
