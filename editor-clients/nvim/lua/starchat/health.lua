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
  local config = require("starchat.config")
  local cmd = config.options.cmd or {}
  if cmd[1] and vim.fn.executable(cmd[1]) == 1 then
    health.ok("server command: " .. table.concat(cmd, " "))
  else
    health.error(("server command not executable: %s"):format(table.concat(cmd, " ")), {
      "pip install starchat-lsp (in the environment with torch), or set `cmd` in setup()",
    })
  end
  local clients = require("starchat.lsp").clients()
  if #clients > 0 then
    health.ok(("%d client(s) running; %s"):format(#clients, require("starchat").status()))
  else
    health.info("no StarChat client running yet (open a file of a configured filetype)")
  end
end

return M
