"""initialize / initialized / configuration / shutdown."""

from __future__ import annotations

import asyncio
import logging

from lsprotocol import types

from ..server import StarChatServer

log = logging.getLogger(__name__)

PULL_TIMEOUT = 10.0  # seconds an editor has to answer workspace/configuration


def _supports_configuration(server: StarChatServer) -> bool:
    workspace = server.client_capabilities.workspace
    return bool(workspace and workspace.configuration)


async def _pull_configuration(server: StarChatServer) -> object:
    if not _supports_configuration(server):
        return None
    try:
        result = await asyncio.wait_for(
            server.workspace_configuration_async(types.ConfigurationParams(items=[types.ConfigurationItem(section="starchat")])),
            PULL_TIMEOUT,
        )
    except Exception as exc:  # a client that fails this request still gets a working server
        log.warning("workspace/configuration failed: %s", exc)
        return None
    return result[0] if result else None


def register(server: StarChatServer) -> None:
    @server.feature(types.INITIALIZE)
    def initialize(ls: StarChatServer, params: types.InitializeParams) -> None:
        ls.init_options = params.initialization_options
        ls.protocol.trace = params.trace or types.TraceValue.Off  # pygls takes it from $/setTrace only
        ls.apply_settings(ls.init_options)
        if params.process_id and not ls.serving_tcp:  # over TCP the editor may be on another machine
            ls.run_in_background(ls.watch_editor(params.process_id))

    @server.feature(types.INITIALIZED)
    async def initialized(ls: StarChatServer, params: types.InitializedParams) -> None:
        ls.apply_settings(ls.init_options, await _pull_configuration(ls))
        if ls.needs_load():  # a TCP editor connecting again keeps the loaded model, if it can
            ls.start_loading()
        elif ls.last_status is not None:  # and hears where it stands (ready, still loading, failed)
            ls.status(*ls.last_status)
        ls.completion_model.update()
        ls.configured.set()

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    async def configuration_changed(ls: StarChatServer, params: types.DidChangeConfigurationParams) -> None:
        async def pull_and_apply() -> None:
            pulled = await _pull_configuration(ls)
            if pulled is None and isinstance(params.settings, dict):
                pulled = params.settings
            ls.hover_cache.clear()
            ls.apply_settings(ls.init_options, pulled)
            if ls.engine_ready is not None and ls.needs_load():
                ls.start_loading()

        await ls.pulling_settings(pull_and_apply)

    @server.feature(types.SHUTDOWN)
    def shutdown(ls: StarChatServer, params: None) -> None:
        if ls.serving_tcp:
            # The server outlives the editors that connect to it (an editor's restart or reload
            # ends its session, not the model): this editor's requests stop (pygls cancels them
            # after this handler), nothing else.
            return
        # Not waiting for the engine's threads: generations stop before their next step, a
        # model load cannot be stopped part-way (minutes for a 16B model), and `exit` ends the
        # process without finalizing the interpreter (StarChatServer.leave).
        ls.close(wait=0)

    @server.feature(types.EXIT)
    def exit(ls: StarChatServer, params: None) -> None:
        if ls.serving_tcp:
            ls.protocol.writer.close()  # the session ends; the next editor may connect
            return
        ls.leave(0 if ls.protocol._shutdown else 1)
