"""Command line: ``starchat-lsp`` serves LSP (stdio or TCP); ``starchat-lsp ask`` answers once."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .config import DEVICES, DTYPES, ENGINES, QUANTIZATIONS, Settings, describe, merge

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _model_flags(parser: argparse.ArgumentParser) -> None:
    """The same flags before or after ``ask``; after it they must not reset what came before."""
    add = parser.add_argument
    add("--model", help="hub id or local folder (default: HuggingFaceH4/starchat-beta)")
    add("--revision", help="model revision")
    add("--device", help=f"{' | '.join(DEVICES)} | cuda:N (default: auto)")
    add("--dtype", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    add("--quantization", choices=QUANTIZATIONS, help="default: none; 8bit or 4bit need bitsandbytes")
    add("--engine", choices=ENGINES, help="default: auto (fast on one GPU, else generate)")
    add("--max-new-tokens", type=int)
    add("--temperature", type=float)
    add("--trust-remote-code", action="store_true", default=None)
    add("--allow-unsafe-weights", action="store_true", default=None, help="also load pickled .bin weights")
    add("--log-file", type=Path, help="write logs here instead of stderr")
    add("-v", "--verbose", action="count", default=0, help="-v: info, -vv: debug (includes protocol traffic)")


def build_parser() -> argparse.ArgumentParser:
    settings_help = "\n".join(f"  {key} (default {default!r}): {doc}" for key, default, doc in describe())
    parser = argparse.ArgumentParser(
        prog="starchat-lsp",
        description="StarChat-beta language server. Serves LSP on stdio unless --tcp is given.",
        epilog="Settings (initializationOptions / workspace/configuration section 'starchat'):\n" + settings_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"starchat-lsp {__version__}")
    parser.add_argument("--stdio", action="store_true", help="serve on stdin/stdout (the default)")
    parser.add_argument("--tcp", metavar="[HOST:]PORT", help="serve on TCP instead (host defaults to 127.0.0.1)")
    parser.add_argument(
        "--token-env",
        metavar="VAR",
        default="STARCHAT_LSP_TOKEN",
        help="environment variable holding the token a TCP client must send as initializationOptions.token; "
        "required to bind anything but loopback (default: STARCHAT_LSP_TOKEN)",
    )
    _model_flags(parser)
    sub = parser.add_subparsers(dest="command")
    ask = sub.add_parser("ask", help="answer a question about a file from the terminal, streamed to stdout")
    ask.add_argument("target", metavar="FILE[:START-END]", help="file, optionally with 1-based inclusive line numbers")
    ask.add_argument("question", nargs="?", default="", help="the question (or use --task)")
    ask.add_argument("--task", choices=["ask", "explain", "fix", "document", "tests", "optimize"], default=None)
    ask.add_argument("--with", dest="with_files", metavar="FILE[:START-END]", action="append", default=[],
                     help="another file (or its lines) to show the model, after FILE; repeatable")
    _model_flags(ask)
    for action in ask._actions:  # after the subcommand, an absent flag keeps the value given before it
        if action.dest not in ("help", "target", "question", "task", "with_files"):
            action.default = argparse.SUPPRESS
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    raw = {
        "model": args.model,
        "revision": args.revision,
        "device": args.device,
        "dtype": args.dtype,
        "engine": args.engine,
        "quantization": args.quantization,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "trust_remote_code": args.trust_remote_code,
        "allow_unsafe_weights": args.allow_unsafe_weights,
    }
    settings, problems = merge(Settings(), raw)
    if problems:
        raise SystemExit("\n".join(problems))
    return settings


def setup_logging(verbose: int, log_file: Path | None) -> None:
    """Logs never go to stdout: in stdio mode it carries JSON-RPC."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("lsp_server").setLevel(max(level, logging.INFO) if verbose else logging.WARNING)
    # pygls logs whole messages (document text, prompts) at INFO: only with -vv.
    logging.getLogger("pygls").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)


def parse_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return (host or "127.0.0.1").strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_file)
    settings = settings_from(args)
    if args.command == "ask":
        from .ask import run_ask

        return run_ask(args, settings)
    from .setup import create_server

    server = create_server(settings)
    if args.tcp:
        host, port = parse_address(args.tcp)
        token = os.environ.get(args.token_env) or None
        if token is None and not _is_loopback(host):
            print(f"starchat-lsp: binding {host} exposes the model to the network; set {args.token_env} to a token clients must send", file=sys.stderr)
            return 2
        server.protocol.required_token = token
        server.start_tcp(host, port)
    else:
        server.start_io()
    return 0
