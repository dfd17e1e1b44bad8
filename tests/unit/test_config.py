"""Settings: typed, documented defaults, bad values fall back with a message."""

import re

from lsp_server.config import DEFAULT_MODEL, Settings, describe, merge, reloads_model


def test_defaults_are_the_seed_sampling():
    s = Settings()
    assert (s.model, s.max_new_tokens, s.temperature, s.top_k, s.top_p) == (DEFAULT_MODEL, 256, 0.2, 50, 0.95)
    assert s.trust_remote_code is False and s.hover_enabled is True


def test_camel_and_snake_case_and_the_starchat_section():
    s, problems = merge(Settings(), {"starchat": {"maxNewTokens": 64, "top_k": 0, "hoverEnabled": False}})
    assert problems == []
    assert (s.max_new_tokens, s.top_k, s.hover_enabled) == (64, 0, False)


def test_bad_values_keep_the_previous_value_and_say_so():
    base = Settings().replace(temperature=0.5)
    s, problems = merge(base, {"temperature": "hot", "maxNewTokens": -3, "device": "tpu", "topP": 0.9, "hoverEnabled": "yes"})
    assert s.temperature == 0.5 and s.max_new_tokens == 256 and s.device == "auto" and s.hover_enabled is True
    assert s.top_p == 0.9
    assert len(problems) == 4
    assert any("temperature='hot'" in p and "0.5" in p for p in problems)
    assert any("maxNewTokens=-3" in p for p in problems)


def test_null_empty_and_unknown_keys_are_ignored():
    s, problems = merge(Settings(), {"model": "", "revision": None, "serverCommand": ["x"]})
    assert s == Settings() and problems == []


def test_not_an_object():
    s, problems = merge(Settings(), ["model"])  # type: ignore[arg-type]
    assert s == Settings() and problems


def test_types_are_checked():
    s, problems = merge(Settings(), {"maxNewTokens": 1.5, "topK": True, "seed": 7, "temperature": 0})
    assert s.max_new_tokens == 256 and s.top_k == 50 and s.seed == 7 and s.temperature == 0.0
    assert len(problems) == 2


def test_which_changes_reload_the_model():
    assert reloads_model(Settings(), Settings().replace(model="x"))
    assert reloads_model(Settings(), Settings().replace(dtype="float16"))
    assert not reloads_model(Settings(), Settings().replace(temperature=0.9))


def test_every_setting_is_documented():
    for key, _default, doc in describe():
        assert doc and key[0].islower() and "_" not in key


def test_the_vscode_extension_knows_every_setting():
    """Each server setting is a `starchat.<key>` VS Code setting that the extension forwards."""
    import json
    import re
    from pathlib import Path

    ext = Path(__file__).resolve().parents[2] / "editor-clients" / "vscode"
    forwarded = set(re.findall(r'^\s+"(\w+)",$', (ext / "src" / "server.ts").read_text().split("SERVER_SETTINGS")[1].split("] as const")[0], re.M))
    package = json.loads((ext / "package.json").read_text())
    contributed = set()
    for section in package["contributes"]["configuration"] if isinstance(package["contributes"]["configuration"], list) else [package["contributes"]["configuration"]]:
        contributed |= {k.removeprefix("starchat.") for k in section["properties"]}
    keys = {key for key, _default, _doc in describe()}
    assert keys == forwarded
    assert keys <= contributed


def test_command_line_flags_reach_the_settings():
    from lsp_server.cli import build_parser, settings_from

    settings = settings_from(build_parser().parse_args(["--allow-unsafe-weights", "--trust-remote-code", "--temperature", "0",
                                                        "--quantization", "4bit"]))
    assert settings.allow_unsafe_weights is True and settings.trust_remote_code is True and settings.temperature == 0
    assert settings.quantization == "4bit" and reloads_model(Settings(), settings)
    after_ask = settings_from(build_parser().parse_args(["--temperature", "0", "ask", "calc.py", "--allow-unsafe-weights"]))
    assert after_ask.allow_unsafe_weights is True and after_ask.temperature == 0
    assert settings_from(build_parser().parse_args([])).allow_unsafe_weights is False


def test_a_hub_model_without_safetensors_says_how_to_allow_pickled_weights(test_model, monkeypatch):
    """A hub repository with only pickled .bin weights (and no converted copy): the error says
    which setting loads them, not transformers' "do not set use_safetensors=True"."""
    import pytest
    import transformers

    from lsp_server.engine import EngineError
    from lsp_server.engine.local import TransformersEngine

    def refuse(source, **kwargs):
        raise OSError(f"{source} does not appear to have a file named model.safetensors or model.safetensors.index.json "
                      "and thus cannot be loaded with `safetensors`. Please do not set `use_safetensors=True`.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    settings = Settings(model=str(test_model), device="cpu")
    with pytest.raises(EngineError, match="allowUnsafeWeights \\(--allow-unsafe-weights\\)"):
        TransformersEngine.load(settings)


def test_docs_name_every_method_command_and_setting():
    """docs/protocol.md is the editors' reference: every method the server answers, every
    command it executes and every setting, with its default, is in it."""
    import json
    from pathlib import Path

    from lsp_server.setup import create_server

    docs = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    server = create_server()
    try:
        names = [*server.protocol.fm.features, *server.protocol.fm.commands]
    finally:
        server.close()
    assert {"textDocument/hover", "starchat/chat", "starchat.runTask"} <= set(names)
    assert [n for n in names if f"`{n}`" not in docs] == []
    import attrs

    from lsp_server.protocol import Answer, ChatParams

    chat = docs.split("\n## Chat", 1)[1].split("\n## ", 1)[0]

    def camel(cls) -> list[str]:
        return [re.sub(r"_(\w)", lambda m: m[1].upper(), f.name) for f in attrs.fields(cls)]

    assert "references" in camel(ChatParams) and [name for name in camel(ChatParams) if f"| `{name}` |" not in chat] == []
    result = chat.split("Result (`Answer`): `{", 1)[1].split("}`", 1)[0]
    assert [name for name in camel(Answer) if not re.search(rf"\b{name}\b", result)] == []
    table = docs.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    cells = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
    documented = {key.strip().strip("`"): default.strip().strip("`") for key, default in cells}

    def value(cell: str):  # JSON, or a bare string
        try:
            return json.loads(cell)
        except ValueError:
            return cell

    assert {key: value(documented[key]) if key in documented else "missing" for key, _, _ in describe()} == {
        key: default for key, default, _ in describe()}
