--- :checkhealth starchat
local M = {}

function M.check()
  local health = vim.health
  health.start("starchat.nvim")
  if vim.fn.has("nvim-0.10") == 1 then
    health.ok("Neovim " .. tostring(vim.version()))
  else
    health.error("Neovim 0.10 or newer is needed")
  end
  local starchat = require("starchat")
  local config = require("starchat.config")
  local lsp = require("starchat.lsp")
  if not starchat._setup_done then
    health.warn("require('starchat').setup() has not been called: no commands, no automatic start", {
      "call require('starchat').setup({ ... }) in your config (lazy.nvim: `opts = {}`)",
    })
  end
  local cmd = config.options.cmd
  if type(cmd) == "function" then
    health.ok("server command: a function (e.g. vim.lsp.rpc.connect() to a server started with --tcp)")
  elseif type(cmd) == "table" and cmd[1] and vim.fn.executable(cmd[1]) == 1 then
    health.ok("server command: " .. lsp.describe_cmd(cmd))
  else
    health.error(("server command not executable: %s"):format(lsp.describe_cmd(cmd)), {
      "pip install starchat-lsp (in the environment with torch), or set `cmd` in setup()",
    })
  end
  local clients = lsp.clients()
  if #clients == 0 then
    health.info("no StarChat server running yet (open a file of a configured filetype, or run :StarChatChat)")
    return
  end
  for _, client in ipairs(clients) do
    health.ok(
      ("server running (client %d, %s, position encoding %s, root %s)"):format(
        client.id,
        client.server_info and client.server_info.name or "starchat-lsp",
        client.offset_encoding or "?",
        client.config.root_dir or "none"
      )
    )
  end
  local completion = config.options.completion or {}
  if completion.enabled == false then
    health.info("inline completion: off (completion.enabled = false)")
  elseif not (clients[1].server_capabilities or {}).inlineCompletionProvider then
    health.warn("inline completion: the server does not offer it (textDocument/inlineCompletion)", {
      "update starchat-lsp",
    })
  else
    health.ok(
      completion.auto == false and "inline completion: when asked (completion.auto = false)"
        or ("inline completion: as you type (after %d ms)"):format(completion.debounce_ms or 150)
    )
  end
  local state, message = lsp.state.state, lsp.state.message
  if state == "error" then
    health.error("the model did not load: " .. (message or ""), {
      "check `model`, `device` and `dtype` in setup(); require('starchat').configure{...} retries",
    })
  elseif state == "ready" or state == "generating" then
    health.ok(("model %s: %s"):format(state, message or ""))
  else
    health.info(("model: %s"):format(lsp.status()))
  end
end

return M
