"""Incremental edits on a large document: the server's document store against pygls's own.

    python bench/documents_bench.py [--mb 50] [--edits 1000] [--out FILE]

Prints a table and writes JSON (bench/results/documents-<date>.json by default).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lsprotocol import types  # noqa: E402
from pygls.workspace import Workspace  # noqa: E402

from lsp_server.documents import Document  # noqa: E402
from lsp_server.text import Pos  # noqa: E402

LINE = "x = 'a reasonably long line of python code here' + str(12345)\n"


def edit_positions(lines: int, count: int) -> list[Pos]:
    """Alternate between the top and the bottom of the file: the worst case for caches."""
    return [Pos(lines - 10 if i % 2 else 50, i % 10) for i in range(count)]


def ours(text: str, positions: list[Pos]) -> tuple[float, float]:
    doc = Document("file:///big.py", text)
    started = time.perf_counter()
    for at in positions:
        doc.apply("y", at, at)
    per_edit = (time.perf_counter() - started) / len(positions)
    started = time.perf_counter()
    _ = doc.offset_at(Pos(doc.line_count - 5, 3)), doc.line_text(doc.line_count // 2)
    return per_edit, time.perf_counter() - started


def pygls(text: str, positions: list[Pos]) -> float:
    workspace = Workspace("file:///tmp", types.TextDocumentSyncKind.Incremental)
    workspace.put_text_document(types.TextDocumentItem(uri="file:///big.py", language_id="python", version=1, text=text))
    started = time.perf_counter()
    for version, at in enumerate(positions, 2):
        change = types.TextDocumentContentChangePartial(
            range=types.Range(start=types.Position(line=at.line, character=at.character), end=types.Position(line=at.line, character=at.character)),
            text="y",
        )
        workspace.update_text_document(types.VersionedTextDocumentIdentifier(uri="file:///big.py", version=version), change)
    return (time.perf_counter() - started) / len(positions)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50)
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--pygls-edits", type=int, default=10, help="pygls is slow: time fewer of its edits")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = LINE * int(args.mb * 1e6 / len(LINE))
    lines = text.count("\n") + 1
    per_edit, lookup = ours(text, edit_positions(lines, args.edits))
    pygls_per_edit = pygls(text, edit_positions(lines, args.pygls_edits))
    result = {
        "date": datetime.date.today().isoformat(),
        "document_mb": round(len(text) / 1e6, 1),
        "edits": args.edits,
        "ours_ms_per_edit": per_edit * 1000,
        "ours_total_s": per_edit * args.edits,
        "ours_lookup_ms": lookup * 1000,
        "pygls_ms_per_edit": pygls_per_edit * 1000,
        "pygls_total_s_estimated": pygls_per_edit * args.edits,
    }
    print("| measure | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    out = args.out or REPO / "bench" / "results" / f"documents-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
