import * as vscode from "vscode";

/**
 * Where a chat code block goes, and as what text, for "Insert at cursor" and "Replace selection":
 * - at the start of a line of code (the cursor in its indentation), or over whole lines: whole
 *   lines, indented like that line (inserted: above it);
 * - after the code of a line (the cursor at its end): the lines below it, indented like it;
 * - elsewhere (an empty line, inside a line): as it is, its later lines indented like the line.
 * The block's own common indentation goes first, and its last line break (the one that ends
 * every Markdown code block) only stays where it ends a line of its own.
 */
export function fitCode(code: string, document: vscode.TextDocument, selection: vscode.Selection, how: "insert" | "replace"): { range: vscode.Range; text: string } {
  const eol = document.eol === vscode.EndOfLine.CRLF ? "\r\n" : "\n";
  const lines = dedent(code.replace(/\r\n/g, "\n").replace(/\n$/, "").split("\n"));
  if (selection.isEmpty) how = "insert"; // nothing selected to replace
  const start = how === "insert" ? selection.active : selection.start;
  let end = how === "insert" ? selection.active : selection.end;
  // lines selected the usual way (Shift+Down, the line numbers, Ctrl+L) end at the start of the
  // next line: they end at the end of the last selected line, whose line break stays
  if (how === "replace" && end.character === 0 && end.line > start.line) end = document.lineAt(end.line - 1).range.end;
  const line = document.lineAt(start.line).text;
  const indent = /^\s*/.exec(line)![0];
  const before = line.slice(0, start.character);
  const after = document.lineAt(end.line).text.slice(end.character);
  const indented = (prefix: string) => lines.map((text) => (text ? prefix + text : text)).join(eol);
  if (line.trim() && !before.trim() && (how === "insert" || !after.trim())) {
    const from = new vscode.Position(start.line, 0);
    if (how === "insert") return { range: new vscode.Range(from, from), text: indented(indent) + eol };
    return { range: new vscode.Range(from, end), text: indented(indent) };
  }
  if (how === "insert" && before.trim() && !after.trim()) return { range: new vscode.Range(start, start), text: eol + indented(indent) };
  const prefix = line.trim() ? indent : before;
  return { range: new vscode.Range(start, end), text: lines.map((text, i) => (i && text ? prefix + text : text)).join(eol) };
}

/** The lines without the leading whitespace they all share (blank lines aside). */
function dedent(lines: string[]): string[] {
  const widths = lines.filter((text) => text.trim()).map((text) => /^\s*/.exec(text)![0].length);
  const common = widths.length ? Math.min(...widths) : 0;
  return lines.map((text) => text.slice(Math.min(common, /^\s*/.exec(text)![0].length)));
}
