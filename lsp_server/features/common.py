"""What several features share: from a document and range to an answer, and answers to edits."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.uris import from_fs_path, to_fs_path

from .. import answers
from ..documents import Document
from ..engine import Generation, Priority
from ..prompts import Prompt, PromptTooLong, Reference, Task
from ..prompts.requests import code_prompt, prompt_budget
from ..prompts.tasks import MAX_PROBLEMS
from ..protocol import ChatReference
from ..server import RequestFailed, StarChatServer
from ..text import Pos, Span, detect_eol, indent_unit, indentation_of, line_of


def to_span(value: types.Range) -> Span:
    return Span(Pos(value.start.line, value.start.character), Pos(value.end.line, value.end.character))


def to_position(pos: Pos) -> types.Position:
    return types.Position(line=pos.line, character=pos.character)


def to_range(span: Span) -> types.Range:
    return types.Range(start=to_position(span.start), end=to_position(span.end))


@dataclass(frozen=True)
class Selection:
    """A document's text as it was when the request arrived, and the span the request is about
    (an empty range widened to the cursor's line)."""

    uri: str
    version: int | None
    text: str
    span: Span
    start: int
    end: int
    language: str
    path: str
    first_line: str  # the selection's first line, whole
    line_count: int
    text_end: Pos  # the position after the last character

    @property
    def selected(self) -> str:
        return self.text[self.start : self.end]

    @property
    def indent_unit(self) -> str | None:
        """One level of the document's indentation (``text.indent_unit``)."""
        return indent_unit(self.text)


def offsets(server: StarChatServer, document: Any, range_: types.Range) -> tuple[int, int]:
    """String offsets of ``range_`` in ``document`` (an empty range: its line)."""
    try:
        return document.selection(to_span(range_), server.position_encoding)
    except ValueError as exc:
        raise RequestFailed(f"Invalid range: {exc}") from None


def selection(server: StarChatServer, uri: str, value: types.Range) -> Selection:
    """The document as it is now and the range's text: a range that starts inside its first
    line's indentation (an editor's "select from the first non-blank") takes the whole
    indentation, so the model sees, and the edit replaces, whole lines."""
    document = server.open_document(uri)
    return _selection_at(server, document, *offsets(server, document, value))


def _selection_at(server: StarChatServer, document: Any, start: int, end: int) -> Selection:
    encoding = server.position_encoding
    line_start = document.line_start(document.position_at(start, encoding).line)
    if start > line_start and not document.text[line_start:start].strip(" \t"):
        start = line_start
    span = Span(document.position_at(start, encoding), document.position_at(end, encoding))
    return Selection(
        document.uri,
        document.version,
        document.text,
        span,
        start,
        end,
        document.language_id or "",
        server.relative_path(document.uri),
        first_line=document.line_text(span.start.line),
        line_count=document.line_count,
        text_end=document.position_at(len(document.text), encoding),
    )


def current(server: StarChatServer, sel: Selection) -> Selection | None:
    """``sel`` in the document as it is now, for an edit computed while the user typed: the
    same selection when nothing changed, moved when the edits were only before its first line
    or only after it, None when they touched it (an edit computed on the old text would then
    corrupt the new one)."""
    document = server.open_document(sel.uri)
    if document.version == sel.version:
        return sel
    old, new = sel.text, document.text
    first = sel.start - len(_line_prefix(sel))  # the first line's start
    if sel.end == first or old[sel.end - 1] in "\r\n":  # the selection ends at a line's start
        after = new.startswith(old[: sel.end])
    else:  # inside a line: the rest of that line, up to its break, must be unchanged too
        last = min([i for i in (old.find("\n", sel.end), old.find("\r", sel.end)) if i >= 0], default=len(old))
        after = new.startswith(old[:last]) and new[last : last + 1] == old[last : last + 1]
    if after:
        shift = 0  # changed only after the selection's lines
    elif new.endswith(old[first:]):
        shift = len(new) - len(old)  # changed only before them
    else:
        return None
    return _selection_at(server, document, sel.start + shift, sel.end + shift)


async def answer_about(
    server: StarChatServer,
    sel: Selection,
    task: Task,
    *,
    question: str = "",
    problems: Sequence[str] = (),
    references: Sequence[Reference] = (),
    priority: Priority = Priority.USER,
    work_done_token: Any = None,
    on_text: Callable[[str], None] | None = None,
) -> tuple[Generation, list[types.Location]]:
    """The answer about ``sel``, and what of the documents its prompt showed (``shown_locations``)."""
    engine = await server.ready_engine()
    settings = server.settings
    source, offset = server.surrounding(sel.uri, sel.text)
    try:
        # counted with the tokenizer, files attached included: off the event loop
        prompt = await asyncio.to_thread(
            code_prompt,
            server.prompt_format(engine),
            system=settings.system_prompt,
            budget=prompt_budget(settings.context_window, engine.context_window, settings.max_new_tokens),
            text=source,
            start=offset + sel.start,
            end=offset + sel.end,
            task=task,
            question=question,
            path=sel.path,
            language=sel.language,
            problems=problems,
            references=references,
        )
    except (PromptTooLong, ValueError) as exc:
        raise RequestFailed(str(exc)) from None
    title = f"StarChat: {task.title}" + (f" — {question[:40]}" if question else "")
    generation = await server.generate(prompt.ids, title=title, priority=priority, work_done_token=work_done_token,
                                       on_text=on_text)
    return generation, shown_locations(prompt, references, (sel.uri, sel.line_count, source, offset))


def shown_locations(prompt: Prompt, references: Sequence[Reference],
                    about: tuple[str, int, str, int] | None = None) -> list[types.Location]:
    """What of the documents ``prompt`` showed the model, as whole lines (from the first line's
    start to the start of the line after the last): the lines of the document it is ``about``
    (its URI and line count, and the code shown around it with where the document starts in it:
    a notebook cell's notebook), then each attached file shown, whole or its first lines."""

    def lines(uri: str, first: int, stop: int) -> types.Location:
        return types.Location(uri, types.Range(types.Position(first, 0), types.Position(stop, 0)))

    shown = []
    if about is not None and prompt.context_lines is not None:
        uri, line_count, source, offset = about
        at = line_of(source, offset)  # where the document starts in the code shown (0 but in a notebook)
        first, stop = (max(0, min(n - at, line_count)) for n in prompt.context_lines)
        if stop > first:
            shown.append(lines(uri, first, stop))
    for ref, n in zip(references, prompt.reference_lines):
        if n:
            shown.append(lines(ref.uri, ref.first_line, ref.first_line + n))
    return shown


MAX_REFERENCES = 16  # other files one request may show


def attached_files(server: StarChatServer, references: Sequence[ChatReference], about: str | None) -> list[Reference]:
    """The other open documents the user attached (``references`` of a chat or an ask), in
    order: each once, the document the request is ``about`` only for a part of it."""
    if len(references) > MAX_REFERENCES:
        raise JsonRpcInvalidParams(f"At most {MAX_REFERENCES} other files may be attached.")
    seen: set[tuple] = set()
    attached = []
    for ref in references:
        uri, span = ref.text_document.uri, None if ref.range is None else to_span(ref.range)
        if (uri, span) in seen or (uri == about and span is None):
            continue
        seen.add((uri, span))
        document = server.open_document(uri)
        text, path, language = document.source, server.relative_path(uri), document.language_id or ""
        if ref.range is None:
            attached.append(Reference(text, path, language, uri=uri))
        else:
            start, end = offsets(server, document, ref.range)
            attached.append(Reference(text[start:end], path, language, first_line=line_of(text, start), whole=False, uri=uri))
    return attached


def problems_in(document: Any, diagnostics: list[types.Diagnostic]) -> list[str]:
    """The editor's diagnostics for the range, for the Fix prompt: errors first, each with where
    it is (its line's code) and who reports it."""
    ranked = sorted(diagnostics, key=lambda d: d.severity or types.DiagnosticSeverity.Error)
    problems = []
    for diagnostic in ranked[:MAX_PROBLEMS]:
        origin = " ".join(str(part) for part in (diagnostic.source, diagnostic.code) if part not in (None, ""))
        line = diagnostic.range.start.line
        code = document.line_text(line).strip() if line < document.line_count else ""
        problems.append(diagnostic.message + (f" ({origin})" if origin else "") + (f" at `{code}`" if code else ""))
    return problems


_CHANGED = "The selected code changed while StarChat was answering, so nothing was changed; ask again."


async def answer_for_edit(
    server: StarChatServer,
    sel: Selection,
    task: Task,
    *,
    question: str = "",
    problems: Sequence[str] = (),
    changed: type[Exception] = RequestFailed,
) -> tuple[Generation, Selection]:
    """``answer_about`` for an answer that becomes an edit of ``sel``, and where that edit goes
    now (``current``: moved by typing above or below it). Typing that touches the selection,
    or closing the document, stops the model at once (its answer could no longer be applied)
    and raises ``changed``; typing elsewhere lets it go on."""
    task_ = asyncio.current_task()
    assert task_ is not None
    stale = False

    def check() -> None:
        nonlocal stale
        try:
            moved = current(server, sel)
        except RequestFailed:  # closed
            moved = None
        if moved is None and not stale:
            stale = True
            task_.cancel()

    unwatch = server.protocol.watch(sel.uri, check)
    try:
        generation, _ = await answer_about(server, sel, task, question=question, problems=problems)
    except asyncio.CancelledError:
        if not stale:
            raise
        task_.uncancel()
    finally:
        unwatch()
    now = None if stale else current(server, sel)
    if now is None:
        raise changed(_CHANGED)
    return generation, now


def workspace_edit(server: StarChatServer, uri: str, version: int | None, edits: list[types.TextEdit]) -> types.WorkspaceEdit:
    """A ``TextDocumentEdit`` pinned to the version the answer was computed on, when the client
    takes ``documentChanges`` (Neovim does without saying so: it lists resource operations)."""
    if _document_changes(server):
        identifier = types.OptionalVersionedTextDocumentIdentifier(uri=uri, version=version)
        return types.WorkspaceEdit(document_changes=[types.TextDocumentEdit(text_document=identifier, edits=edits)])
    return types.WorkspaceEdit(changes={uri: edits})


def _document_changes(server: StarChatServer) -> bool:
    workspace = server.client_capabilities.workspace
    edit = workspace.workspace_edit if workspace else None
    return bool(edit and (edit.document_changes or edit.resource_operations))


def _can_create_files(server: StarChatServer) -> bool:
    workspace = server.client_capabilities.workspace
    edit = workspace.workspace_edit if workspace else None
    return bool(edit and edit.resource_operations and types.ResourceOperationKind.Create in edit.resource_operations)


def code_indent(sel: Selection) -> str:
    """The indentation of the selection's first line that holds code (a selection may start
    with blank lines)."""
    line_start = sel.start - len(_line_prefix(sel))
    for line in sel.text[line_start : max(sel.end, line_start + len(sel.first_line))].splitlines():
        if line.strip():
            return indentation_of(line)
    return indentation_of(sel.first_line)


def _line_prefix(sel: Selection) -> str:
    before = sel.text[: sel.start]
    return before[max(before.rfind("\n"), before.rfind("\r")) + 1 :]


def proposed_code(generation: Generation, language: str, *, first: bool = False) -> str:
    """The answer's code (``answers.extract_code``; an answer cut at its token limit counts as
    cut), or RequestFailed saying why there is none to use."""
    try:
        return answers.extract_code(generation.text, language, cut=generation.finish_reason == "length", first=first)
    except answers.NoCode as exc:
        raise RequestFailed(str(exc)) from None


def task_edit(server: StarChatServer, sel: Selection, task: Task, generation: Generation) -> types.WorkspaceEdit:
    """The edit a code action applies: Fix/Optimize replace the selection, Document inserts above
    it, Write tests creates the test file (or appends to the document)."""
    eol = detect_eol(sel.text)
    indent = code_indent(sel)
    unit = sel.indent_unit
    code = proposed_code(generation, sel.language, first=task is Task.DOCUMENT)
    if task in (Task.FIX, Task.OPTIMIZE):
        new_text = answers.replacement_for_selection(
            code,
            sel.selected,
            indent=indent,
            starts_line=_line_prefix(sel) == "",  # else the document already holds the first line's indent
            eol=eol,
            unit=unit,
        )
        return workspace_edit(server, sel.uri, sel.version, [types.TextEdit(range=to_range(sel.span), new_text=new_text)])
    if task is Task.DOCUMENT:
        comment = answers.comment_only(code, sel.selected)
        if comment is None:
            raise RequestFailed("StarChat's answer repeats the selected code without a comment on it, so nothing was changed.")
        code = comment
        line, indent = _docstring_place(sel, code, unit) or (sel.span.start.line, indent)
        new_text = answers.insertion_above(code, indent=indent, eol=eol, unit=unit)
        at = types.Position(line=line, character=0)
        return workspace_edit(server, sel.uri, sel.version, [types.TextEdit(range=types.Range(start=at, end=at), new_text=new_text)])
    if task is Task.TESTS:
        return _tests_edit(server, sel, code, eol, unit)
    raise ValueError(f"{task.value} does not edit code")


def _docstring_place(sel: Selection, code: str, unit: str | None) -> tuple[int, str] | None:
    """Where a Python docstring goes: the line after the selected def's or class's signature
    (which may span lines), at its body's indentation. None when ``code`` is no docstring or
    the selection holds no def or class (the comment then goes above the selection)."""
    if sel.language != "python" or not code.lstrip().startswith(('"""', "'''")):
        return None
    line_start = sel.start - len(_line_prefix(sel))
    lines = sel.text[line_start : sel.end].splitlines()
    for i, line in enumerate(lines):
        if not line.lstrip().startswith(("def ", "async def ", "class ")):
            continue
        depth = 0
        for j in range(i, len(lines)):
            text = lines[j].split("#", 1)[0].rstrip()
            depth += sum(text.count(c) for c in "([{") - sum(text.count(c) for c in ")]}")
            if depth <= 0 and text.endswith(":"):
                body = next((b for b in lines[j + 1 :] if b.strip()), "")
                outer, inner = indentation_of(line), indentation_of(body)
                return sel.span.start.line + j + 1, inner if len(inner) > len(outer) else outer + (unit or "    ")
        return None
    return None


def _tests_edit(server: StarChatServer, sel: Selection, code: str, eol: str, unit: str | None) -> types.WorkspaceEdit:
    code = answers.fit_code(code, indent="", first_line_indented=True, keep_trailing_newline=True, eol=eol, unit=unit)
    source = to_fs_path(sel.uri)
    if source and sel.path and _can_create_files(server) and _document_changes(server):
        target = Path(source).parent / Path(answers.test_file_path(sel.path, sel.language)).name
        target_uri = from_fs_path(str(target)) or ""
        opened = server.protocol.documents.get(target_uri)
        if opened is None and not target.exists():
            create = types.CreateFile(uri=target_uri, options=types.CreateFileOptions(overwrite=False, ignore_if_exists=True))
            at = types.Position(line=0, character=0)
            insert = types.TextDocumentEdit(
                text_document=types.OptionalVersionedTextDocumentIdentifier(uri=target_uri, version=None),
                edits=[types.TextEdit(range=types.Range(start=at, end=at), new_text=code)],
            )
            return types.WorkspaceEdit(document_changes=[create, insert])
        if opened is None:  # on disk, not open: appended to (the editor opens it to apply the edit)
            opened = _read_document(target_uri, target)
        if opened is not None:
            end = to_position(opened.position_at(len(opened.text), server.position_encoding))
            gap = eol if not opened.text or opened.text.endswith(("\n", "\r")) else eol + eol
            return workspace_edit(server, target_uri, opened.version, [types.TextEdit(range=types.Range(start=end, end=end), new_text=gap + code)])
    end = to_position(sel.text_end)
    prefix = "" if sel.text.endswith(("\n", "\r")) or not sel.text else eol
    return workspace_edit(server, sel.uri, sel.version, [types.TextEdit(range=types.Range(start=end, end=end), new_text=prefix + eol + code)])


def _read_document(uri: str, path: Path) -> Document | None:
    """A file that is not open, as the editor would open it (None if it cannot be read as text)."""
    try:
        return Document(uri, path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError):
        return None
