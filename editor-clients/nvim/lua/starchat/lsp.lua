--- The StarChat language client: starting/attaching, handlers, progress and status.
local config = require("starchat.config")

local M = {}

local has_011 = vim.fn.has("nvim-0.11") == 1

--- Client methods are called with `:` on 0.11 and with `.` on 0.10.
function M.call(client, method, ...)
  if has_011 then
    return client[method](client, ...)
  end
  return client[method](...)
end

--- Prefix of the partialResultTokens this plugin creates; `$/progress` for them comes here.
M.TOKEN_PREFIX = "starchat-partial-"
local token_seq = 0

--- Streams: partialResultToken -> function(delta). Late pieces for a finished stream are counted.
M.streams = {}
M.late_pieces = {}

function M.new_token()
  token_seq = token_seq + 1
  return M.TOKEN_PREFIX .. token_seq
end

--- What the status line shows.
M.state = {
  state = nil, -- "loading" | "ready" | "generating" | "error" (starchat/status)
  message = "",
  progress = {}, -- work-done token -> {title, message, percentage}
  progress_order = {},
}

local function changed()
  vim.schedule(function()
    pcall(vim.cmd, "redrawstatus!")
    pcall(vim.api.nvim_exec_autocmds, "User", { pattern = "StarChatStatus", modeline = false })
  end)
end

local function track_progress(token, value)
  if type(value) ~= "table" or not value.kind then
    return
  end
  local key = tostring(token)
  local p = M.state.progress
  if value.kind == "begin" then
    p[key] = { title = value.title or "StarChat", message = value.message, percentage = value.percentage }
    table.insert(M.state.progress_order, key)
  elseif value.kind == "report" and p[key] then
    p[key].message = value.message or p[key].message
    p[key].percentage = value.percentage or p[key].percentage
  elseif value.kind == "end" then
    p[key] = nil
    for i, k in ipairs(M.state.progress_order) do
      if k == key then
        table.remove(M.state.progress_order, i)
        break
      end
    end
  end
  changed()
end

--- A status line string: "" when the server is not running.
function M.status()
  if #M.clients() == 0 then
    return ""
  end
  local order = M.state.progress_order
  for i = #order, 1, -1 do
    local p = M.state.progress[order[i]]
    if p then
      local title = p.title:gsub("^StarChat: ", "")
      local text = "StarChat: " .. title
      if p.message and p.message ~= "" then
        text = text .. " (" .. p.message .. ")"
      end
      return text
    end
  end
  local labels = { loading = "loading…", ready = "ready", generating = "generating…", error = "error" }
  return "StarChat: " .. (labels[M.state.state] or "starting…")
end

function M.notify_error(what, err)
  local message = type(err) == "table" and (err.message or vim.inspect(err)) or tostring(err)
  vim.notify("StarChat: " .. what .. ": " .. message, vim.log.levels.ERROR)
end

M.handlers = {
  ["$/progress"] = function(err, result, ctx, conf)
    local token = result and result.token
    if type(token) == "string" and vim.startswith(token, M.TOKEN_PREFIX) then
      local value = result.value
      local delta = type(value) == "table" and value.delta or nil
      local stream = M.streams[token]
      if stream and delta then
        stream(delta)
      elseif delta then
        M.late_pieces[token] = (M.late_pieces[token] or 0) + 1
      end
      return
    end
    if result then
      track_progress(token, result.value)
    end
    return vim.lsp.handlers["$/progress"](err, result, ctx, conf)
  end,
  ["starchat/status"] = function(_, result)
    if type(result) == "table" then
      M.state.state = result.state
      M.state.message = result.message or ""
      changed()
    end
  end,
  -- Neovim's own handler also prints "Workspace edit <label>" for every edit; two edits in a
  -- row then stop the editor at a hit-enter prompt. The edit is the same; the status line
  -- already tells what StarChat is doing.
  ["workspace/applyEdit"] = function(_, params, ctx)
    local client = vim.lsp.get_client_by_id(ctx.client_id)
    local ok, err = pcall(vim.lsp.util.apply_workspace_edit, params.edit, client and client.offset_encoding or "utf-16")
    return { applied = ok, failureReason = (not ok) and tostring(err) or nil }
  end,
}

function M.clients(bufnr)
  local get = vim.lsp.get_clients or vim.lsp.get_active_clients
  return get({ name = config.options.name, bufnr = bufnr })
end

local function root_for(bufnr)
  local opts = config.options
  if type(opts.root_dir) == "function" then
    return opts.root_dir(bufnr)
  elseif type(opts.root_dir) == "string" then
    return opts.root_dir
  end
  local name = vim.api.nvim_buf_get_name(bufnr)
  local root = vim.fs.root and vim.fs.root(bufnr, opts.root_markers) or nil
  if not root and name ~= "" then
    root = vim.fs.dirname(name)
  end
  return root or vim.fn.getcwd()
end

function M.client_config(root)
  local opts = config.options
  local capabilities = vim.tbl_deep_extend(
    "force",
    vim.lsp.protocol.make_client_capabilities(),
    opts.capabilities or {},
    { experimental = { starchat = { askQuestion = true, showsAnswers = true } } }
  )
  return {
    name = opts.name,
    cmd = opts.cmd,
    root_dir = root,
    capabilities = capabilities,
    init_options = vim.deepcopy(config.settings),
    settings = { starchat = vim.deepcopy(config.settings) },
    handlers = M.handlers,
    on_attach = opts.on_attach,
    on_exit = function(code, signal)
      vim.schedule(function()
        if #M.clients() == 0 then
          M.state.state, M.state.progress, M.state.progress_order = nil, {}, {}
          changed()
        end
      end)
      if code ~= 0 and signal ~= 15 then
        vim.schedule(function()
          vim.notify(("StarChat: the server exited (code %s); see :LspLog"):format(code), vim.log.levels.ERROR)
        end)
      end
    end,
  }
end

--- The StarChat client attached to `bufnr`, started when needed (any file buffer, whatever its
--- filetype, so that commands work everywhere). Without a file buffer: any running client, else
--- a client started without a buffer.
function M.ensure(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  local attached = M.clients(bufnr)[1]
  if attached then
    return attached
  end
  local file = vim.bo[bufnr].buftype == "" and vim.api.nvim_buf_get_name(bufnr) ~= ""
  if file then
    local id = M.start(bufnr)
    return id and vim.lsp.get_client_by_id(id) or nil
  end
  local any = M.clients()[1]
  if any then
    return any
  end
  local ok, id
  if has_011 then
    ok, id = pcall(vim.lsp.start, M.client_config(vim.fn.getcwd()), { attach = false })
  else
    ok, id = pcall(vim.lsp.start_client, M.client_config(vim.fn.getcwd()))
  end
  if not ok or not id then
    M.notify_error("could not start " .. table.concat(config.options.cmd, " "), id or "no client")
    return nil
  end
  return vim.lsp.get_client_by_id(id)
end

--- Start (or reuse) the client for a file buffer and attach it. Returns the client id.
function M.start(bufnr)
  if vim.bo[bufnr].buftype ~= "" then
    return nil
  end
  local cmd = config.options.cmd
  if type(cmd) == "table" and vim.fn.executable(cmd[1]) ~= 1 then
    vim.notify_once(
      ("StarChat: %s is not executable; install starchat-lsp or set `cmd` in require('starchat').setup()"):format(cmd[1]),
      vim.log.levels.ERROR
    )
    return nil
  end
  local ok, id = pcall(vim.lsp.start, M.client_config(root_for(bufnr)), { bufnr = bufnr })
  if not ok then
    M.notify_error("could not start the server", id)
    return nil
  end
  return id
end

--- Send new settings to running clients (workspace/didChangeConfiguration; the server pulls).
function M.push_settings()
  for _, client in ipairs(M.clients()) do
    client.settings = { starchat = vim.deepcopy(config.settings) }
    M.call(client, "notify", "workspace/didChangeConfiguration", { settings = client.settings })
  end
end

return M
