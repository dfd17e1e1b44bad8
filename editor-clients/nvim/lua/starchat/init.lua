--- starchat.nvim: StarChat (starchat-lsp) in Neovim.
local config = require("starchat.config")
local lsp = require("starchat.lsp")
local chat = require("starchat.chat")
local range_util = require("starchat.range")
local completion = require("starchat.completion")

local M = {}

M.chat = chat
M.completion = completion

local function wants(ft)
  local fts = config.options.filetypes
  if fts == "*" or fts == nil then
    return ft ~= ""
  end
  return vim.tbl_contains(fts, ft)
end

--- For the status line: "StarChat: ready", "StarChat: Fix (12 tokens)", … in the windows of
--- buffers the StarChat client is attached to; after the server exited, in those of the files it
--- serves. "" elsewhere, and when it is not running. " (completion off)" follows where completion
--- as you type is off (:StarChatCompletion, vim.b.starchat_completion) but not disabled in
--- setup(). bufnr: the window's buffer (the status line's window: %{} items are evaluated in
--- it, a "%!" expression gets g:statusline_winid).
function M.status(bufnr)
  if bufnr == nil or bufnr == 0 then
    local win = vim.g.statusline_winid
    bufnr = win and vim.api.nvim_win_is_valid(win) and vim.api.nvim_win_get_buf(win) or vim.api.nvim_get_current_buf()
  end
  if not lsp.clients(bufnr, true)[1] then
    local served = #lsp.clients() == 0 and vim.bo[bufnr].buftype == "" and wants(vim.bo[bufnr].filetype)
    if not served or lsp.unsendable_reason(bufnr) then
      return ""
    end
  end
  local text = lsp.status()
  if text ~= "" and (config.options.completion or {}).enabled ~= false and not completion.auto(bufnr) then
    text = text .. " (completion off)"
  end
  return text
end

--- Start or attach the server for a buffer (what the FileType autocommand does). A buffer left
--- out for its name (none yet, or a secret-looking one) is attached once it gets one that can
--- be sent (:write {file}, :saveas, :file).
function M.attach(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  local id = lsp.start(bufnr)
  local for_name = not id and (vim.api.nvim_buf_get_name(bufnr) == "" or lsp.private_reason(bufnr) ~= nil)
  vim.b[bufnr].starchat_pending = for_name or nil
  return id
end

--- The client, the buffer and the LSP arguments {textDocument, range} for a command's range.
--- The range is taken now (the selection or cursor line) and put in the client's position
--- encoding, which is only known once the server has answered `initialize`: `args.range` is
--- provisional until then, and `finalize(client)` gives the arguments to send.
local function selection_args(opts, bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  if vim.bo[bufnr].buftype ~= "" then
    vim.notify("StarChat: run this in a file buffer", vim.log.levels.WARN)
    return nil
  end
  local private = lsp.unsendable_reason(bufnr)
  if private then -- never sent to the server: say so, rather than "the document is not open"
    vim.notify("StarChat: " .. private, vim.log.levels.WARN)
    return nil
  end
  local client = lsp.ensure(bufnr)
  if not client then
    return nil
  end
  local sel = range_util.capture(opts, bufnr)
  local uri = vim.uri_from_bufnr(bufnr)
  local args = { textDocument = { uri = uri }, range = range_util.to_lsp(bufnr, sel, client.offset_encoding or "utf-16") }
  local function finalize(c)
    return { textDocument = { uri = uri }, range = range_util.to_lsp(bufnr, sel, c.offset_encoding or "utf-16") }
  end
  return client, bufnr, args, finalize
end

local ASK_PROMPT = "Ask StarChat: "
local EDIT_PROMPT = "Edit with StarChat: "
local WRITE_PROMPT = "Write with StarChat: " -- no range, on an empty line: the code goes there

--- fn(text) with `given` (trimmed) when it holds text, else with what the user types at `prompt`
--- (vim.ui.input; nothing happens when that is empty). Returns fn's result for `given`.
local function with_text(prompt, given, fn)
  if given and vim.trim(given) ~= "" then
    return fn(vim.trim(given))
  end
  vim.ui.input({ prompt = prompt }, function(text)
    if text and vim.trim(text) ~= "" then
      fn(vim.trim(text))
    end
  end)
end

--- Ask a question about the command's range (asks for the question when it is empty).
function M.ask(question, opts)
  local client, bufnr, args, finalize = selection_args(opts)
  if client then
    with_text(ASK_PROMPT, question, function(q)
      chat.ask(client, bufnr, args, q, finalize)
    end)
  end
end

function M.explain(opts)
  local client, bufnr, args, finalize = selection_args(opts)
  if client then
    chat.ask(client, bufnr, args, nil, finalize)
  end
end

local TASK_TITLES = { fix = "Fix", optimize = "Optimize", document = "Document", tests = "Write tests", edit = "Edit" }

--- The diagnostics shown on the lines of `range` (LSP), as LSP diagnostics: a Fix is told about
--- them, as when it is picked from the code actions at a diagnostic.
local function diagnostics_in(bufnr, range)
  if not vim.lsp.diagnostic.from then -- Neovim 0.10
    return {}
  end
  local first, last = range.start.line, range_util.last_line(range)
  local shown = vim.tbl_filter(function(d)
    return d.lnum <= last and (d.end_lnum or d.lnum) >= first
  end, vim.diagnostic.get(bufnr))
  return vim.lsp.diagnostic.from(shown)
end

--- A command whose edit the server computes and applies with workspace/applyEdit
--- (starchat.runTask, starchat.edit); :StarChatStop stops it. make_args(client) -> {textDocument,
--- range, …}; `task` names it for :StarChatStop and the messages.
local function request_edit(client, bufnr, command, task, make_args, on_done)
  local title = TASK_TITLES[task] or task
  return lsp.request(client, "workspace/executeCommand", function(c)
    return { command = command, arguments = { make_args(c) } }
  end, function(err, result)
    if err and err.code == lsp.REQUEST_CANCELLED then
      vim.notify("StarChat: " .. title .. " stopped", vim.log.levels.INFO)
    elseif err and not err.exited then -- an exit is reported by Neovim and the status line
      lsp.notify_error(title, err)
    end
    if on_done then
      on_done(err, result)
    end
  end, bufnr, { task = task, title = title, uri = vim.uri_from_bufnr(bufnr) })
end

--- starchat.runTask for `task` (fix, optimize, document, tests).
local function request_task(client, bufnr, task, make_args, on_done)
  return request_edit(client, bufnr, "starchat.runTask", task, function(c)
    local args = make_args(c)
    args.task = task
    return args
  end, on_done)
end

--- starchat.edit: the selection of make_args(client) replaced as `instruction` says.
local function request_instructed(client, bufnr, instruction, make_args, on_done)
  return request_edit(client, bufnr, "starchat.edit", "edit", function(c)
    local args = make_args(c)
    args.instruction, args.mode = vim.trim(instruction), "replace"
    return args
  end, on_done)
end

--- Fix / Optimize / Document / Write tests on the command's range: the server computes the edit
--- and applies it with workspace/applyEdit (starchat.runTask). :StarChatStop stops it.
--- Returns the request record (lsp.request).
function M.run_task(task, opts, on_done)
  local client, bufnr, args, finalize = selection_args(opts)
  if not client then
    return nil
  end
  local problems = task == "fix" and diagnostics_in(bufnr, args.range) or {}
  return request_task(client, bufnr, task, function(c)
    local a = finalize(c)
    a.diagnostics = #problems > 0 and problems or nil
    return a
  end, on_done)
end

--- The command's range changed as `instruction` says ("Add type hints"): the server puts the
--- answer's code in its place with workspace/applyEdit (starchat.edit); asks for the
--- instruction when it is empty. :StarChatStop stops it. Returns the request record.
function M.edit(instruction, opts, on_done)
  local client, bufnr, _, finalize = selection_args(opts)
  if client then
    local at_cursor = not opts or (opts.range or 0) == 0
    local prompt = at_cursor and vim.trim(vim.api.nvim_get_current_line()) == "" and WRITE_PROMPT or EDIT_PROMPT
    return with_text(prompt, instruction, function(text)
      return request_instructed(client, bufnr, text, finalize, on_done)
    end)
  end
end

--- Stop what StarChat is doing: the chat's answer and the running Fix/Optimize/Document/Tests.
--- Returns how many requests were stopped.
function M.stop()
  local n = chat.cancel() and 1 or 0
  for _, req in ipairs(lsp.running(function(what)
    return type(what) == "table" and what.task ~= nil
  end)) do
    if lsp.cancel(req) then
      n = n + 1
    end
  end
  if n == 0 then
    vim.notify("StarChat: nothing to stop", vim.log.levels.INFO)
  end
  return n
end

--- Stop the server and start it again for the buffers it served.
function M.restart(on_done)
  if chat.current then
    chat.cancel()
  end
  local bufs = {}
  for _, buf in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(buf) and vim.bo[buf].buftype == "" and wants(vim.bo[buf].filetype) then
      table.insert(bufs, buf)
    end
  end
  lsp.restart(bufs, on_done)
end

--- Open the chat split; with text, send it.
function M.open_chat(text, opts)
  chat.open({ focus = not text or text == "" })
  if text and vim.trim(text) ~= "" then
    return chat.send(text, opts)
  end
end

--- Change server settings at runtime (sent with workspace/didChangeConfiguration; vim.NIL
--- puts a setting back to the server's default).
function M.configure(settings)
  for k, v in pairs(config.server_settings({ settings = settings })) do
    config.settings[k] = v
  end
  lsp.push_settings()
end

--- A code action's command: its argument ({textDocument, range, …}) and the client that offered
--- it; nil when either is missing.
local function command_target(command, ctx)
  local args = (command.arguments or {})[1]
  local client = ctx and vim.lsp.get_client_by_id(ctx.client_id)
  if type(args) ~= "table" or type(args.textDocument) ~= "table" or not client then
    return nil
  end
  return args, client
end

--- The client-side commands of the "StarChat: Ask…" and "StarChat: Edit…" code actions: ask
--- the user for the question or the instruction, then starchat.ask or starchat.edit on the
--- action's selection (an edit: with the version it was listed on).
local function ask_question_command(command, ctx)
  local args, client = command_target(command, ctx)
  if args then
    with_text(ASK_PROMPT, nil, function(question)
      chat.ask(client, ctx.bufnr or vim.uri_to_bufnr(args.textDocument.uri), args, question)
    end)
  end
end

local function edit_selection_command(command, ctx)
  local args, client = command_target(command, ctx)
  if args then
    with_text(EDIT_PROMPT, nil, function(instruction)
      request_instructed(client, ctx.bufnr or vim.uri_to_bufnr(args.textDocument.uri), instruction, function()
        return vim.deepcopy(args)
      end)
    end)
  end
end

--- The server's commands, run from its code actions: through the plugin, as the :StarChat…
--- commands run them. Explain and Ask answer in the chat (this client declares `showsAnswers`,
--- so the server shows them nowhere else; Neovim drops a command's result); Fix, Optimize,
--- Document and Write tests are requests :StarChatStop can stop.
local function server_command(command, ctx)
  local args, client = command_target(command, ctx)
  if not args then
    return
  end
  local bufnr = vim.uri_to_bufnr(args.textDocument.uri)
  if command.command == "starchat.runTask" then
    return request_task(client, bufnr, args.task, function()
      return vim.deepcopy(args)
    end)
  end
  local question = command.command == "starchat.ask" and args.question or nil
  if command.command == "starchat.ask" and not question then
    return ask_question_command(command, ctx)
  end
  chat.ask(client, bufnr, args, question) -- it sends a copy with `question` set
end

local function define_commands()
  local cmd = vim.api.nvim_create_user_command
  cmd("StarChat", function(o)
    M.ask(o.args, o)
  end, { nargs = "*", range = true, desc = "Ask StarChat about the selection" })
  cmd("StarChatEdit", function(o)
    M.edit(o.args, o)
  end, { nargs = "*", range = true, desc = "StarChat: change the selection as the instruction says" })
  cmd("StarChatExplain", function(o)
    M.explain(o)
  end, { range = true, desc = "StarChat: explain the selection" })
  for name, task in pairs({ Fix = "fix", Doc = "document", Tests = "tests", Optimize = "optimize" }) do
    cmd("StarChat" .. name, function(o)
      M.run_task(task, o)
    end, { range = true, desc = "StarChat: " .. TASK_TITLES[task] })
  end
  cmd("StarChatChat", function(o)
    M.open_chat(o.args)
  end, { nargs = "*", desc = "Open the StarChat chat (and send a message)" })
  cmd("StarChatStop", function()
    M.stop()
  end, { desc = "Stop the StarChat answer and running edits" })
  cmd("StarChatRestart", function()
    M.restart()
  end, { desc = "Restart the StarChat server" })
  cmd("StarChatClear", function()
    chat.clear()
  end, { desc = "Start a new StarChat conversation" })
  cmd("StarChatRetry", function()
    chat.retry()
  end, { desc = "StarChat: send the last message again for a new answer" })
  cmd("StarChatAddFile", function(o)
    chat.add_files(o.fargs)
  end, { nargs = "*", complete = "file", desc = "StarChat: attach files (or this one) to the chat" })
  cmd("StarChatDropFile", function(o)
    chat.drop_files(o.fargs)
  end, {
    nargs = "*",
    complete = function(lead)
      return chat.complete_files(lead)
    end,
    desc = "StarChat: remove files (all without one) from the chat",
  })
  cmd("StarChatComplete", function()
    completion.trigger()
  end, { desc = "StarChat: complete at the cursor (inline, as ghost text)" })
  cmd("StarChatCompletion", function(o)
    completion.set_auto(o.args)
  end, {
    nargs = "?",
    complete = function()
      return { "on", "off", "toggle" }
    end,
    desc = "StarChat: completion as you type on, off, or toggled",
  })
end

local function define_menu()
  pcall(vim.cmd, [[silent! aunmenu PopUp.Ask\ StarChat]])
  pcall(vim.cmd, [[silent! aunmenu PopUp.StarChat]])
  pcall(vim.cmd, [[silent! aunmenu PopUp.-starchat-]])
  if not config.options.popup_menu then
    return
  end
  vim.cmd([[
    nnoremenu <silent> .1 PopUp.Ask\ StarChat <Cmd>StarChat<CR>
    inoremenu <silent> .1 PopUp.Ask\ StarChat <Cmd>StarChat<CR>
    vnoremenu <silent> .1 PopUp.Ask\ StarChat :StarChat<CR>
  ]])
  local items = {
    { "Explain", "StarChatExplain" },
    { "Edit…", "StarChatEdit" },
    { "Fix", "StarChatFix" },
    { "Optimize", "StarChatOptimize" },
    { "Document", "StarChatDoc" },
    { "Write\\ tests", "StarChatTests" },
  }
  for i, item in ipairs(items) do
    local prio = ".2." .. i
    vim.cmd(("nnoremenu <silent> %s PopUp.StarChat.%s <Cmd>%s<CR>"):format(prio, item[1], item[2]))
    vim.cmd(("vnoremenu <silent> %s PopUp.StarChat.%s :%s<CR>"):format(prio, item[1], item[2]))
  end
  vim.cmd([[anoremenu .3 PopUp.-starchat- <Nop>]])
end

M._setup_done = false

--- Configure the plugin: see `:help starchat-setup`.
function M.setup(opts)
  local before = { cmd = config.options.cmd, settings = vim.deepcopy(config.settings) }
  config.set(opts)
  vim.lsp.commands["starchat.askQuestion"] = ask_question_command
  vim.lsp.commands["starchat.editSelection"] = edit_selection_command
  for _, name in ipairs({ "starchat.explain", "starchat.ask", "starchat.runTask" }) do
    vim.lsp.commands[name] = server_command
  end
  define_commands()
  define_menu()
  completion.setup()
  local group = vim.api.nvim_create_augroup("starchat", { clear = true })
  local function on(events, callback)
    vim.api.nvim_create_autocmd(events, { group = group, callback = callback })
  end
  on("FileType", function(ev)
    if wants(vim.bo[ev.buf].filetype) and vim.bo[ev.buf].buftype == "" then
      M.attach(ev.buf)
    end
  end)
  -- A renamed buffer (:file, :saveas) is detached first and attached again only when its new
  -- name does not look like secrets (lsp.before_rename). A buffer left out for its name is
  -- attached when it gets a name that can be sent (M.attach): an unnamed buffer written to a
  -- file (:write {file} renames it without BufFilePost), a .env saved as app.py.
  on("BufFilePre", function(ev)
    lsp.before_rename(ev.buf)
  end)
  on({ "BufFilePost", "BufWritePost" }, function(ev)
    if ev.event == "BufFilePost" then
      lsp.after_rename(ev.buf)
    end
    if vim.b[ev.buf].starchat_pending and not lsp.clients(ev.buf)[1] then
      M.attach(ev.buf)
    end
  end)
  on("BufWipeout", function(ev)
    lsp.renamed[ev.buf] = nil
  end)
  on("SessionLoadPost", function()
    chat.adopt()
  end)
  chat.adopt() -- set up after a session was loaded (lazy loading)
  for _, buf in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(buf) and vim.bo[buf].buftype == "" and wants(vim.bo[buf].filetype) then
      M.attach(buf)
    end
  end
  -- Called again (a re-sourced config): the running server gets the new settings, or is
  -- restarted when its command changed.
  if #lsp.clients(nil, true) > 0 then
    if not vim.deep_equal(before.cmd, config.options.cmd) then
      M.restart()
    elseif not vim.deep_equal(before.settings, config.settings) then
      lsp.push_settings()
    end
  end
  M._setup_done = true
  return M
end

return M
