--- Options of starchat.nvim: what belongs to the plugin, and what goes to the server.
local M = {}

--- Programming languages the server starts for by default (`filetypes = "*"` means every file).
M.default_filetypes = {
  "c", "cpp", "cs", "css", "dart", "elixir", "erlang", "go", "haskell", "html", "java",
  "javascript", "javascriptreact", "julia", "kotlin", "lua", "ocaml", "perl", "php", "python",
  "r", "ruby", "rust", "scala", "sh", "bash", "zsh", "sql", "swift", "typescript",
  "typescriptreact", "vim", "zig",
}

M.defaults = {
  --- The server command, as in vim.lsp.start(): a list, or (Neovim 0.11) a function such as
  --- vim.lsp.rpc.connect("127.0.0.1", 2087) for a server started with --tcp.
  cmd = { "starchat-lsp" },
  --- Filetypes the server starts for, or "*" for every file buffer.
  filetypes = M.default_filetypes,
  --- Files or folders that mark the workspace root; the file's folder when none is found.
  root_markers = { ".git", ".hg", "pyproject.toml", "setup.py", "package.json", "Cargo.toml", "go.mod" },
  --- A folder, or a function(bufnr) -> folder, that overrides root_markers.
  root_dir = nil,
  --- The LSP client name.
  name = "starchat",
  --- The chat buffer.
  chat = {
    --- Ex command that opens the split for the chat buffer.
    split = "botright vsplit",
    --- Width of a vertical split (columns) or height of a horizontal one (lines); nil keeps Vim's.
    size = nil,
    --- Longest chat answer in tokens (nil: the server's maxNewTokens).
    max_new_tokens = nil,
  },
  --- Inline completion: the server's proposal at the cursor as ghost text in Insert mode
  --- (textDocument/inlineCompletion). `completion = false` is `enabled = false`.
  completion = {
    --- false: no inline completion at all (no autocommands, no keys).
    enabled = true,
    --- Ask as you type; false: only when asked (keys.request, :StarChatComplete).
    auto = true,
    --- Ask once typing has paused this long (milliseconds).
    debounce_ms = 150,
    --- Insert-mode keys; false leaves one unmapped. All but request act only while a
    --- suggestion is shown, and otherwise do what the key did before.
    keys = {
      accept = "<Tab>",
      accept_word = "<M-Right>",
      accept_line = "<M-C-Right>",
      dismiss = "<C-]>",
      request = "<M-\\>",
    },
  },
  --- Add "Ask StarChat" and a "StarChat" submenu to the right-click menu.
  popup_menu = true,
  --- Called with (client, bufnr) when the server attaches to a buffer.
  on_attach = nil,
  --- Server settings (see docs/protocol.md), merged with the top-level server keys below.
  settings = {},
}

--- Keys that configure the plugin; every other top-level key is a server setting.
M.plugin_keys = {
  cmd = true, filetypes = true, root_markers = true, root_dir = true, name = true, chat = true,
  completion = true, popup_menu = true, on_attach = true, settings = true, capabilities = true,
}

M.options = vim.deepcopy(M.defaults)

--- snake_case -> camelCase, so `max_new_tokens` and `maxNewTokens` both work.
local function camel(key)
  return (key:gsub("_(%l)", function(c)
    return c:upper()
  end))
end

--- The server settings from user options: `settings` plus every top-level non-plugin key.
function M.server_settings(opts)
  local out = {}
  for k, v in pairs(opts.settings or {}) do
    out[camel(k)] = v
  end
  for k, v in pairs(opts) do
    if not M.plugin_keys[k] then
      out[camel(k)] = v
    end
  end
  return out
end

function M.set(user)
  user = user or {}
  if type(user.completion) == "boolean" then -- completion = false
    user = vim.tbl_extend("force", user, { completion = { enabled = user.completion } })
  end
  local opts = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), user)
  -- Lists replace, never merge.
  for _, key in ipairs({ "cmd", "filetypes", "root_markers" }) do
    if user[key] ~= nil then
      opts[key] = user[key]
    end
  end
  if type(opts.cmd) == "string" then -- cmd = "starchat-lsp"
    opts.cmd = { opts.cmd }
  end
  M.options = opts
  M.settings = M.server_settings(opts)
  return opts
end

M.settings = M.server_settings(M.options)

return M
