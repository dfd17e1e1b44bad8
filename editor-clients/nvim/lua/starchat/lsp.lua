--- The StarChat language client: starting/attaching, handlers, progress and status.
local config = require("starchat.config")

local M = {}

local has_011 = vim.fn.has("nvim-0.11") == 1
local get_clients = vim.lsp.get_clients or vim.lsp.get_active_clients

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

--- The status line's text changed: redraw it and fire `User StarChatStatus`.
local function changed()
  vim.schedule(function()
    pcall(vim.cmd, "redrawstatus!")
    pcall(vim.api.nvim_exec_autocmds, "User", { pattern = "StarChatStatus", modeline = false })
  end)
end
M.status_changed = changed

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
    if M.state.exited then
      return ("StarChat: the server exited (%s); :StarChatRestart"):format(M.state.exited)
    end
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

--- Files that look like secrets (.env, keys, id_rsa, .netrc, credentials.json, …) are never sent
--- to the server (which may be on another machine: a function `cmd` such as
--- vim.lsp.rpc.connect()): the client is not attached to their buffers, and commands there say
--- why. The same regular expression as the server's `_SECRET_NAMES` (lsp_server/server.py,
--- looks_secret), in Vim's very-magic syntax, matched the same way (on the buffer's URI,
--- lower-cased, without a query). Keep the two the same (tests/editors/test_neovim.py compares
--- them).
M.SECRET_NAMES = [[\v(^|/)(\.env(\..*)?|\.netrc|\.pgpass|id_(rsa|dsa|ecdsa|ed25519)(\.pub)?|credentials(\.json)?)$|\.(pem|key|p12|pfx|jks|keystore)$]]
local secret_regex

--- Whether a URI (or a file name) looks like a file holding secrets.
function M.looks_secret(uri)
  secret_regex = secret_regex or vim.regex(M.SECRET_NAMES)
  local target = (uri:match("^[^?]*") or uri):lower()
  return secret_regex:match_str(target) ~= nil
end

--- Why the buffer is never sent to the server, or nil when it is.
function M.private_reason(bufnr)
  local name = vim.api.nvim_buf_get_name(bufnr)
  if name ~= "" and M.looks_secret(vim.uri_from_bufnr(bufnr)) then
    return ("%s looks like it holds secrets (keys, .env); StarChat does not send it to the server"):format(
      vim.fn.fnamemodify(name, ":~:.")
    )
  end
  return nil
end

--- Buffers renamed away from a name they were sent under: bufnr -> {lost = bool}. Neovim sends
--- an attached buffer under its new name whatever that is (didChange at once, didClose +
--- didOpen with the whole text on the next write), so the client is detached before every
--- rename (BufFilePre: didClose under the old name, which the server knows) and attached again
--- after it (BufFilePost) only when the new name does not look like secrets. `lost`: the buffer
--- changed while no language client was attached, and Neovim then stops tracking its changes
--- for good (its on_lines listener detaches, yet it still counts the buffer as tracked): a
--- client attached again would get the text once and never an edit, so none is.
M.renamed = {}

--- BufFilePre: detach the StarChat clients from a buffer about to be renamed.
function M.before_rename(bufnr)
  local attached = get_clients({ name = config.options.name, bufnr = bufnr, _uninitialized = true })
  if #attached == 0 then
    return
  end
  for _, c in ipairs(attached) do
    if c.initialized then
      vim.lsp.buf_detach_client(bufnr, c.id) -- didClose, under the old name
    else -- not opened on the server yet (that happens once it is initialized, under the new name)
      c.attached_buffers[bufnr] = nil
    end
  end
  if M.renamed[bufnr] then
    return
  end
  local rec = { lost = false }
  M.renamed[bufnr] = rec
  -- Neovim's listener drops out at the first change seen with no client attached; so does this one
  pcall(vim.api.nvim_buf_attach, bufnr, false, {
    on_lines = function()
      if M.renamed[bufnr] ~= rec then
        return true
      end
      if #get_clients({ bufnr = bufnr, _uninitialized = true }) == 0 then
        rec.lost = true
        return true
      end
    end,
  })
end

--- BufFilePost: attach again a buffer detached by before_rename, unless its new name looks like
--- secrets (it then stays detached, and is attached again when renamed back).
function M.after_rename(bufnr)
  local rec = M.renamed[bufnr]
  if not rec or M.private_reason(bufnr) then
    return
  end
  if rec.lost then
    vim.notify("StarChat: " .. M.unsendable_reason(bufnr), vim.log.levels.WARN)
    return
  end
  M.renamed[bufnr] = nil
  M.start(bufnr)
end

--- Why the server is not given the buffer (it looks like secrets, has no file name, or Neovim
--- no longer tracks its changes: see M.renamed), or nil.
function M.unsendable_reason(bufnr)
  local private = M.private_reason(bufnr)
  if private then
    return private
  end
  if vim.api.nvim_buf_get_name(bufnr) == "" then
    -- Neovim would send every unnamed buffer as "file://", and an edit for that URI to the
    -- folder "/" (vim.uri_to_bufnr)
    return "this buffer has no file name; write it to a file (:write {file}) to use StarChat on it"
  end
  if M.renamed[bufnr] and M.renamed[bufnr].lost then
    return ("%s changed while its name looked like secrets, and Neovim no longer sends its changes to language servers; open it again (:bwipeout, :edit) to use StarChat there"):format(
      vim.fn.fnamemodify(vim.api.nvim_buf_get_name(bufnr), ":t")
    )
  end
  return nil
end

--- LSP error codes the user hears about more softly than a failure.
M.REQUEST_CANCELLED = -32800
M.CONTENT_MODIFIED = -32801

function M.notify_error(what, err)
  local message = type(err) == "table" and (err.message or vim.inspect(err)) or tostring(err)
  local code = type(err) == "table" and err.code or nil
  local level = vim.log.levels.ERROR
  if code == M.REQUEST_CANCELLED then
    level = vim.log.levels.INFO -- stopped (by the user, or the server shutting down)
  elseif code == M.CONTENT_MODIFIED then
    level = vim.log.levels.WARN -- the user typed meanwhile: run it again
  end
  vim.notify("StarChat: " .. what .. ": " .. message, level)
end

--- The server command as text (it may be a function, e.g. vim.lsp.rpc.connect() for TCP).
function M.describe_cmd(cmd)
  if type(cmd) == "table" then
    return table.concat(vim.tbl_map(tostring, cmd), " ")
  end
  return tostring(cmd)
end

--- Whether the client has stopped or is gone.
function M.is_stopped(client)
  if not client or not vim.lsp.get_client_by_id(client.id) then
    return true
  end
  local ok, stopped = pcall(M.call, client, "is_stopped")
  return ok and stopped or false
end

--- Run fn() once the client has answered `initialize` (its position encoding is known then and
--- the buffers attached to it have been opened on the server); fn(err) if it stops first.
--- Right away when it is initialized already.
function M.when_ready(client, fn)
  if client.initialized and not M.is_stopped(client) then
    return fn()
  end
  local timer = assert(vim.uv.new_timer())
  timer:start(
    20,
    20,
    vim.schedule_wrap(function()
      if timer:is_closing() then
        return
      end
      local stopped = M.is_stopped(client)
      if client.initialized or stopped then
        timer:stop()
        timer:close()
        if stopped then
          fn("the server stopped before it was ready (see :LspLog)")
        else
          fn()
        end
      end
    end)
  )
end

--- Requests in flight that this plugin sent: key -> {client, id, what, handler, …}. Their
--- handler gets an error when the server exits without answering (Neovim drops them then).
M.inflight = {}
local request_seq = 0

--- Send a request once the client is ready. `params` may be a function(client) -> params,
--- evaluated then (for ranges in the negotiated position encoding). handler(err, result) is
--- called exactly once: with the answer, an error, {code = -32800} when cancelled with
--- M.cancel(), or an error when the server exits first. Returns the request record (its `id`
--- is set once sent: at once when the client is ready).
function M.request(client, method, params, handler, bufnr, what)
  request_seq = request_seq + 1
  local req = { key = request_seq, client = client, client_id = client.id, method = method, what = what }
  local function finish(err, result, ctx)
    if req.done then
      return
    end
    req.done = true
    M.inflight[req.key] = nil
    handler(err, result, ctx)
  end
  req.finish = finish
  M.inflight[req.key] = req
  M.when_ready(client, function(err)
    if req.done then
      return
    end
    if err then
      return finish({ code = -32803, message = err })
    end
    local p = type(params) == "function" and params(client) or params
    local ok, id = M.call(client, "request", method, p, finish, bufnr)
    if not ok or not id then
      return finish({ code = -32803, message = "the server is not running" })
    end
    req.id = id
    if req.on_sent then
      req.on_sent(id)
    end
  end)
  return req
end

--- Stop a request: $/cancelRequest (the server stops generating), and its handler gets
--- RequestCancelled at once. False when it had finished already.
function M.cancel(req)
  if not req or req.done then
    return false
  end
  if req.id then
    pcall(M.call, req.client, "cancel_request", req.id)
  end
  req.cancelled = true
  if req.id and type(req.what) == "table" and req.what.uri then
    -- an edit of this task already on its way when the server read $/cancelRequest is refused
    -- in workspace/applyEdit, until the server has answered the request (see stopped_edit)
    M.stopped_edits[req.key] = req
  end
  req.finish({ code = M.REQUEST_CANCELLED, message = "stopped" })
  return true
end

--- request key -> request: edit tasks the user stopped (see M.cancel).
M.stopped_edits = {}

--- Whether workspace/applyEdit for these URIs is the edit of a task the user stopped: a stopped
--- task for one of them, and no task running for any of them (a running task's edit is wanted).
local function stopped_edit(uris)
  for _, req in pairs(M.inflight) do
    if type(req.what) == "table" and req.what.uri and vim.tbl_contains(uris, req.what.uri) then
      return false
    end
  end
  for key, req in pairs(M.stopped_edits) do
    -- Neovim forgets a request once the server has answered it (its cancellation reply
    -- included); the server sends a task's workspace/applyEdit before that answer, so none of
    -- a stopped task can come after it
    local answered = M.is_stopped(req.client) or (req.client.requests or {})[req.id] == nil
    if answered then
      M.stopped_edits[key] = nil
    elseif vim.tbl_contains(uris, req.what.uri) then
      M.stopped_edits[key] = nil
      return true
    end
  end
  return false
end

--- The requests in flight, optionally only those whose `what` passes filter(what).
function M.running(filter)
  local out = {}
  for _, req in pairs(M.inflight) do
    if not filter or filter(req.what) then
      table.insert(out, req)
    end
  end
  table.sort(out, function(a, b)
    return a.key < b.key
  end)
  return out
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
  -- An edit made for an older version of a buffer (the user typed after the server computed it)
  -- is refused here: Neovim itself would skip it with a message and still answer "applied".
  ["workspace/applyEdit"] = function(_, params, ctx)
    local client = vim.lsp.get_client_by_id(ctx.client_id)
    local edit = params and params.edit or {}
    local uris = vim.tbl_keys(edit.changes or {})
    for _, change in ipairs(edit.documentChanges or {}) do
      if change.textDocument then
        table.insert(uris, change.textDocument.uri)
      end
    end
    if stopped_edit(uris) then
      M.late_edits = (M.late_edits or 0) + 1
      return { applied = false, failureReason = "The user stopped this request." }
    end
    for _, change in ipairs(edit.documentChanges or {}) do
      local doc = change.textDocument
      if doc and change.edits and type(doc.version) == "number" and doc.version > 0 then
        local bufnr = vim.uri_to_bufnr(doc.uri)
        local current = vim.lsp.util.buf_versions[bufnr]
        if vim.api.nvim_buf_is_loaded(bufnr) and type(current) == "number" and current > doc.version then
          return {
            applied = false,
            failureReason = ("%s changed while StarChat was answering (version %d, the edit is for %d)"):format(
              vim.fn.fnamemodify(vim.uri_to_fname(doc.uri), ":t"),
              current,
              doc.version
            ),
          }
        end
      end
    end
    local ok, err = pcall(vim.lsp.util.apply_workspace_edit, edit, client and client.offset_encoding or "utf-16")
    return { applied = ok, failureReason = (not ok) and tostring(err) or nil }
  end,
}

--- The running StarChat clients (attached to bufnr when given; with `starting`, those still
--- starting too); stopping ones are left out.
function M.clients(bufnr, starting)
  return vim.tbl_filter(function(c)
    return not M.is_stopped(c)
  end, get_clients({ name = config.options.name, bufnr = bufnr, _uninitialized = starting }))
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
    { experimental = { starchat = { askQuestion = true, editSelection = true, showsAnswers = true } } }
  )
  -- LSP 3.18: the plugin shows inline completions (completion.lua); Neovim 0.11 does not
  if (opts.completion or {}).enabled ~= false then
    capabilities.textDocument = capabilities.textDocument or {}
    capabilities.textDocument.inlineCompletion = { dynamicRegistration = false }
  end
  -- The Fix/Optimize/Document/Write tests code actions then come with the starchat.runTask
  -- command, which the plugin runs (init.lua) as it runs :StarChatFix, so that :StarChatStop
  -- stops them: Neovim's own codeAction/resolve of their edit could not be stopped.
  local resolve = vim.tbl_get(capabilities, "textDocument", "codeAction", "resolveSupport")
  if resolve and type(resolve.properties) == "table" then
    resolve.properties = vim.tbl_filter(function(p)
      return p ~= "edit"
    end, resolve.properties)
  end
  return {
    name = opts.name,
    cmd = opts.cmd,
    root_dir = root,
    capabilities = capabilities,
    init_options = vim.deepcopy(config.settings),
    settings = { starchat = vim.deepcopy(config.settings) },
    handlers = M.handlers,
    on_attach = opts.on_attach,
    on_exit = function(code, signal, client_id)
      vim.schedule(function()
        M.on_exit(code, signal, client_id)
      end)
    end,
  }
end

--- Clients this plugin is stopping itself (restart, re-setup): their exit is no surprise.
M.stopping = {}

--- A client went away: the requests it left unanswered fail (Neovim drops them, and the chat
--- would wait forever), and the status line says the server exited when it was not stopped on
--- purpose, also when a signal ended it (the kernel's out-of-memory killer sends SIGKILL, exit
--- code 0), until a server starts again.
function M.on_exit(code, signal, client_id)
  for _, req in ipairs(M.running()) do
    if req.client_id == client_id then
      req.finish({ code = -32803, message = "the server exited before answering", exited = true })
    end
  end
  local others = vim.tbl_filter(function(c)
    return c.id ~= client_id and not M.is_stopped(c)
  end, M.clients())
  if #others == 0 then
    M.state.state, M.state.message, M.state.progress, M.state.progress_order = nil, "", {}, {}
    changed()
  end
  local expected = M.stopping[client_id]
  M.stopping[client_id] = nil
  if not expected and ((code or 0) ~= 0 or ((signal or 0) ~= 0 and signal ~= 15)) then
    -- Neovim itself warns ("Client starchat quit with exit code …"); a second message would
    -- stop the editor at a hit-enter prompt, so the status line says it instead, until a
    -- server starts again.
    M.state.exited = (signal or 0) ~= 0
        and ("killed by signal %d%s"):format(signal, signal == 9 and ", out of memory?" or "")
      or ("exit code %s"):format(code)
    changed()
  end
end

--- One server per Neovim: a StarChat server holds the model in (GPU) memory, so files from
--- another root join the running server as a workspace folder instead of starting a second one.
local function reuse_client(client, conf)
  return client.name == conf.name and not M.is_stopped(client)
end

local function add_folder(client, root)
  if not root or root == "" then
    return
  end
  local uri = vim.uri_from_fname(root)
  for _, f in ipairs(client.workspace_folders or {}) do
    if f.uri == uri then
      return
    end
  end
  if client.initialized then
    M.call(client, "notify", "workspace/didChangeWorkspaceFolders", {
      event = { added = { { uri = uri, name = root } }, removed = {} },
    })
  end
  client.workspace_folders = client.workspace_folders or {}
  table.insert(client.workspace_folders, { uri = uri, name = root })
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
  -- a file that looks like secrets is never attached: a client for another buffer serves (the chat)
  local file = vim.bo[bufnr].buftype == "" and not M.unsendable_reason(bufnr)
  if file then
    local id = M.start(bufnr, { explicit = true })
    return id and vim.lsp.get_client_by_id(id) or nil
  end
  local any = M.clients()[1]
  if any then
    return any
  end
  local ok, id
  if has_011 then
    ok, id = pcall(vim.lsp.start, M.client_config(vim.fn.getcwd()), { attach = false, reuse_client = reuse_client })
  else
    ok, id = pcall(vim.lsp.start_client, M.client_config(vim.fn.getcwd()))
  end
  if not ok or not id then
    M.notify_error("could not start " .. M.describe_cmd(config.options.cmd), id or "no client")
    return nil
  end
  M.state.exited = nil
  return vim.lsp.get_client_by_id(id)
end

--- Start (or reuse) the client for a file buffer and attach it. Returns the client id; nil for
--- a buffer that is not a file (or has no name yet), or a file that looks like secrets (never
--- sent to the server).
--- opts.explicit: a command asked for it (a missing server is reported every time then, not
--- only once as for the automatic start on FileType).
function M.start(bufnr, opts)
  opts = opts or {}
  if vim.bo[bufnr].buftype ~= "" then
    return nil
  end
  local private = M.unsendable_reason(bufnr)
  if private then
    if opts.explicit then
      vim.notify("StarChat: " .. private, vim.log.levels.WARN)
    end
    return nil
  end
  local cmd = config.options.cmd
  if type(cmd) == "table" and vim.fn.executable(cmd[1] or "") ~= 1 then
    local notify = opts.explicit and vim.notify or vim.notify_once
    notify(
      ("StarChat: %s is not executable; install starchat-lsp or set `cmd` in require('starchat').setup()"):format(
        tostring(cmd[1])
      ),
      vim.log.levels.ERROR
    )
    return nil
  end
  local root = root_for(bufnr)
  local ok, id = pcall(vim.lsp.start, M.client_config(root), { bufnr = bufnr, reuse_client = reuse_client })
  if not ok or not id then
    M.notify_error("could not start the server", id or "vim.lsp.start failed (see :LspLog)")
    return nil
  end
  M.state.exited = nil
  local client = vim.lsp.get_client_by_id(id)
  if client and client.config.root_dir ~= root then
    add_folder(client, root)
  end
  return id
end

--- Stop the running clients and start one again for the buffers they served (and, with
--- filetypes, every loaded buffer the plugin wants). on_done(client_id?) afterwards.
function M.restart(buffers, on_done)
  local bufs = {}
  for _, b in ipairs(buffers or {}) do
    bufs[b] = true
  end
  local old = M.clients(nil, true) -- also one that has not answered `initialize` (a hung start)
  for _, c in ipairs(old) do
    for b in pairs(c.attached_buffers or {}) do
      bufs[b] = true
    end
    M.stopping[c.id] = true
    M.call(c, "stop")
  end
  M.state.state, M.state.message, M.state.progress, M.state.progress_order = nil, "", {}, {}
  changed()
  local started = vim.uv.now()
  local forced = false
  local function again()
    local left = vim.tbl_filter(function(c)
      return not M.is_stopped(c)
    end, old)
    if #left > 0 then
      if not forced and vim.uv.now() - started > 3000 then
        forced = true
        for _, c in ipairs(left) do
          M.call(c, "stop", true)
        end
      end
      return vim.defer_fn(again, 50)
    end
    local id
    for b in pairs(bufs) do
      if vim.api.nvim_buf_is_valid(b) and vim.api.nvim_buf_is_loaded(b) and vim.bo[b].buftype == "" and not M.unsendable_reason(b) then
        id = M.start(b, { explicit = true }) or id
      end
    end
    if on_done then
      on_done(id)
    end
  end
  vim.defer_fn(again, 20)
end

--- Send new settings to running clients (workspace/didChangeConfiguration; the server pulls).
function M.push_settings()
  for _, client in ipairs(M.clients(nil, true)) do
    client.settings = { starchat = vim.deepcopy(config.settings) }
    if client.initialized then -- one still starting pulls them after `initialized`
      M.call(client, "notify", "workspace/didChangeConfiguration", { settings = client.settings })
    end
  end
end

return M
