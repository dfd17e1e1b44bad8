-- Drives the real starchat.nvim plugin against the real server in headless Neovim:
--   nvim --headless --clean -l run.lua CONFIG.json
-- CONFIG: {plugin_dir, server_cmd, workspace, results, screenshots, steps, sc = scenario values}
-- Each step runs in pcall; results (JSON) are rewritten after every step for pytest to assert on.
local conf = vim.json.decode(table.concat(vim.fn.readfile(arg[1]), "\n"))
local sc = conf.sc
local here = vim.fs.dirname(debug.getinfo(1, "S").source:sub(2))
package.path = here .. "/?.lua;" .. package.path
local screen = require("screen")

vim.opt.rtp:prepend(conf.plugin_dir)
-- Headless Neovim has an 80x24 screen (resizing it without a UI upsets its grid); an attached
-- TUI sets its own size.
vim.o.cmdheight = 1
-- No hit-enter prompt: nobody is there to press Enter (0.11's 'messagesopt').
pcall(function()
  vim.o.messagesopt = "wait:0,history:500"
end)
vim.o.laststatus = 2
vim.o.shortmess = vim.o.shortmess .. "I"
vim.o.statusline = "%f %m%=%{v:lua.require'starchat'.status()}  %l,%c "

local results = { steps = {}, notifications = {}, statuses = {}, screenshots = {} }
local function save()
  vim.fn.writefile({ vim.json.encode(results) }, conf.results)
end

local last_message = ""
local current_step = nil
local real_notify = vim.notify
vim.notify = function(msg, level, o)
  table.insert(results.notifications, { msg = tostring(msg), level = level or vim.log.levels.INFO, step = current_step })
  last_message = tostring(msg):gsub("\n.*", "")
  return real_notify(msg, level, o)
end

local status_buf -- calc.py: the statuses recorded are those of its status line
vim.api.nvim_create_autocmd("User", {
  pattern = "StarChatStatus",
  callback = function()
    local s = require("starchat").status(status_buf)
    if results.statuses[#results.statuses] ~= s then
      table.insert(results.statuses, s)
    end
  end,
})

-- Screenshots: the real screen when the test attached a TUI (nvim --remote-ui in tmux), else a
-- text rebuild of the windows (screen.lua).
local ui = false
if conf.tmux then
  ui = vim.wait(15000, function()
    return #vim.api.nvim_list_uis() > 0
  end, 20)
  if ui then
    vim.wait(2000, function()
      return vim.o.columns == conf.tmux.width
    end, 20)
  end
end
results.ui = ui

local function capture()
  if not ui then
    return screen.capture(last_message)
  end
  vim.cmd("redraw!")
  -- let the loop send the screen to the TUI process, which draws it into tmux
  vim.wait(300, function()
    return false
  end, 10)
  return vim.fn.system({ "tmux", "-S", conf.tmux.socket, "capture-pane", "-p", "-t", conf.tmux.target })
end

local shot_no = 0
local function shot(name, overlay)
  vim.cmd("redraw")
  shot_no = shot_no + 1
  local text = capture()
  if overlay then
    text = text .. "\n--- on screen above the text (vim.ui.select / vim.ui.input) ---\n" .. overlay .. "\n"
  end
  local file = ("%s/nvim-%02d-%s.txt"):format(conf.screenshots, shot_no, name)
  vim.fn.writefile(vim.split(text, "\n", { plain = true }), file)
  table.insert(results.screenshots, file)
end

local function wait(ms, cond, what)
  if not vim.wait(ms, cond, 20) then
    error("timed out after " .. ms .. " ms waiting for " .. what)
  end
end

local function buf_text(buf)
  local lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false)
  return table.concat(lines, "\n") .. (vim.bo[buf].eol and "\n" or "")
end

local starchat = require("starchat")
local chat = require("starchat.chat")
local lsp = require("starchat.lsp")

local setup_opts = { cmd = conf.server_cmd, filetypes = { "python" }, temperature = 0, chat = { size = 44 } }
starchat.setup(setup_opts)
local autocmds_first = #vim.api.nvim_get_autocmds({ group = "starchat" })

-- Every workspace/configuration pull the server makes (it pulls after didChangeConfiguration).
local config_pulls, last_pull = 0, nil
local real_configuration = vim.lsp.handlers["workspace/configuration"]
vim.lsp.handlers["workspace/configuration"] = function(...)
  config_pulls = config_pulls + 1
  local res = real_configuration(...)
  last_pull = vim.deepcopy(res)
  return res
end

local function notifications_of(step_name)
  return vim.tbl_filter(function(n)
    return n.step == step_name
  end, results.notifications)
end

--- The messages of the notifications after the first `n`.
local function messages_since(n)
  return vim.tbl_map(function(note)
    return note.msg
  end, vim.list_slice(results.notifications, n + 1))
end

vim.cmd.cd(conf.workspace)
vim.cmd.edit(conf.workspace .. "/calc.py")
local code_buf = vim.api.nvim_get_current_buf()
status_buf = code_buf
local code_win = vim.api.nvim_get_current_win()

local function client()
  return lsp.clients(code_buf)[1]
end

local function select_lines(first, last)
  vim.api.nvim_set_current_win(code_win)
  vim.cmd(("normal! %dGV%dG"):format(first, last))
  vim.cmd("normal! \27") -- leave visual mode: '< and '> are set, as after a selection
end

local function wait_turn(turn, ms)
  wait(ms or 60000, function()
    return turn.done or turn.error or turn.cancelled
  end, "the answer")
end

local function last_turn()
  return chat.turns[#chat.turns]
end

--- Records every message the client sends (its rpc): returns the list ({method, uri, json}) and a
--- function that stops recording.
local function record_sent(c)
  local sent = {}
  local rpc = c.rpc
  local real_notify, real_request = rpc.notify, rpc.request
  local function record(method, params)
    local uri = type(params) == "table" and type(params.textDocument) == "table" and params.textDocument.uri or nil
    table.insert(sent, { method = method, uri = uri, json = vim.json.encode(params or {}) })
  end
  rpc.notify = function(method, params, ...)
    record(method, params)
    return real_notify(method, params, ...)
  end
  rpc.request = function(method, params, ...)
    record(method, params)
    return real_request(method, params, ...)
  end
  return sent, function()
    rpc.notify, rpc.request = real_notify, real_request
  end
end

--- The starchat/chat requests among `sent` (record_sent), as the tests compare them: their
--- messages, range and whether they stream.
local function chat_requests(sent)
  local out = {}
  for _, m in ipairs(sent) do
    if m.method == "starchat/chat" then
      local p = vim.json.decode(m.json)
      table.insert(out, { messages = p.messages, range = p.range, streamed = p.partialResultToken ~= nil })
    end
  end
  return out
end

local steps = {}

function steps.start()
  wait(60000, function()
    return client() ~= nil and client().initialized
  end, "the client to initialize")
  wait(120000, function()
    return lsp.state.state == "ready"
  end, "the model (starchat/status ready)")
  local c = client()
  shot("opened")
  return {
    root_dir = c.config.root_dir,
    experimental = c.config.capabilities.experimental,
    init_options = c.config.init_options,
    status = starchat.status(),
    commands = vim.tbl_keys(vim.api.nvim_get_commands({})),
  }
end

-- Ranges on a line with multibyte characters, in each position encoding, and the encoding the
-- client negotiated.
function steps.encoding()
  local range_util = require("starchat.range")
  local buf = vim.api.nvim_create_buf(false, true)
  vim.api.nvim_set_current_win(code_win)
  vim.api.nvim_win_set_buf(code_win, buf)
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, { 's = "héllo wörld" # 😀 ok', "second" })
  -- select from "w" of "wörld" through the emoji (characterwise)
  vim.cmd("normal! gg0fwvf#ll\27")
  local opts = { range = 2, line1 = 1, line2 = 1 }
  local out = { negotiated = client().offset_encoding }
  for _, enc in ipairs({ "utf-8", "utf-16", "utf-32" }) do
    out[enc] = range_util.from_command(opts, buf, enc)
  end
  -- 'selection' exclusive (:behave mswin): the character under the cursor is not selected
  vim.o.selection = "exclusive"
  vim.cmd("normal! gg0fwv4l\27") -- "wörl" on screen: the cursor's "d" is not in it
  out.exclusive = range_util.from_command(opts, buf, "utf-8")
  vim.o.selection = "inclusive"
  vim.api.nvim_win_set_buf(code_win, code_buf)
  vim.api.nvim_buf_delete(buf, { force = true })
  return out
end

function steps.code_actions()
  chat.clear()
  local titles, overlay = {}, nil
  local orig_select, orig_input = vim.ui.select, vim.ui.input
  local asked = {}
  vim.ui.select = function(items, opts, on_choice)
    local lines = { opts.prompt or "Code actions:" }
    for i, item in ipairs(items) do
      local title = item.action and item.action.title or tostring(item)
      table.insert(titles, title)
      table.insert(lines, ("%d: %s"):format(i, title))
    end
    overlay = table.concat(lines, "\n")
    shot("code-action-menu", overlay)
    for i, item in ipairs(items) do
      if item.action and item.action.title == "StarChat: Ask…" then
        return on_choice(item, i)
      end
    end
    on_choice(nil)
  end
  vim.ui.input = function(opts, on_confirm)
    table.insert(asked, opts.prompt)
    on_confirm(sc.ASK_QUESTION)
  end
  local ok, err = pcall(function()
    vim.api.nvim_set_current_win(code_win)
    local line5 = vim.api.nvim_buf_get_lines(code_buf, 4, 5, false)[1]
    -- lines 4-5 selected (1-based): the range ends at the end of line 5
    vim.lsp.buf.code_action({ range = { start = { 4, 0 }, ["end"] = { 5, #line5 - 1 } } })
    wait(10000, function()
      return #chat.turns > 0 or chat.current ~= nil
    end, "the Ask… action to run")
    wait_turn(chat.current or last_turn())
  end)
  vim.ui.select, vim.ui.input = orig_select, orig_input
  if not ok then
    error(err)
  end
  local turn = last_turn()
  shot("code-action-ask-answer")
  return { titles = titles, prompts = asked, answer = turn.answer, kind = turn.kind, chat_text = buf_text(chat.buf) }
end

function steps.popup()
  chat.clear()
  local info = vim.fn.menu_info("PopUp.Ask StarChat", "v")
  local info_n = vim.fn.menu_info("PopUp.Ask StarChat", "n")
  local menu = vim.fn.menu_get("PopUp")
  local names = {}
  for _, m in ipairs(menu[1] and menu[1].submenus or {}) do
    table.insert(names, m.name)
  end
  local orig_input = vim.ui.input
  local asked = {}
  vim.ui.input = function(opts, on_confirm)
    table.insert(asked, opts.prompt)
    shot("popup-question", (opts.prompt or "") .. sc.ASK_QUESTION)
    on_confirm(sc.ASK_QUESTION)
  end
  local sent, stop = record_sent(client())
  local ok, err = pcall(function()
    select_lines(4, 5)
    -- What a right-click on the selection and a click on the entry run: the Visual-mode menu.
    -- (Neovim's :emenu takes line numbers, not marks, for the Visual-mode menu.)
    vim.cmd([[4,5emenu PopUp.Ask\ StarChat]])
    wait(10000, function()
      return #chat.turns > 0 or chat.current ~= nil
    end, "the question to be sent")
    wait_turn(chat.current or last_turn())
  end)
  stop()
  vim.ui.input = orig_input
  if not ok then
    error(err)
  end
  local turn = last_turn()
  shot("popup-ask-answer")
  return {
    visual_rhs = info.rhs,
    normal_rhs = info_n.rhs,
    entries = names,
    prompts = asked,
    answer = turn.answer,
    kind = turn.kind,
    pieces = turn.pieces,
    requests = chat_requests(sent),
    chat_text = buf_text(chat.buf),
    context = chat.context and chat.context.range,
  }
end

function steps.chat()
  chat.clear()
  vim.cmd("StarChatChat")
  local chat_win = vim.api.nvim_get_current_win()
  local in_chat = vim.api.nvim_win_get_buf(chat_win) == chat.buf
  vim.api.nvim_feedkeys(vim.keycode("GA" .. sc.CHAT_QUESTION .. "<Esc>"), "nx", false)
  shot("chat-typed")
  vim.api.nvim_feedkeys(vim.keycode("<CR>"), "mx", false)
  local turn = chat.current or last_turn()
  wait(30000, function()
    return turn.pieces >= 3 or turn.done or turn.error
  end, "the first pieces")
  local mid = not turn.done and turn.answer or nil
  shot("chat-streaming")
  wait_turn(turn)
  shot("chat-answered")
  -- a follow-up turn keeps the history
  vim.api.nvim_feedkeys(vim.keycode("GA" .. sc.CHAT_FOLLOW_UP .. "<Esc><CR>"), "mx", false)
  local follow = chat.current or last_turn()
  wait_turn(follow)
  shot("chat-follow-up")
  local chat_text = buf_text(chat.buf)
  -- :StarChatRetry: the follow-up again, with the history before it; its answer replaced (a
  -- draft being typed stays)
  vim.api.nvim_buf_set_lines(chat.buf, -1, -1, false, { "a draft" })
  local sent, stop = record_sent(client())
  vim.cmd("StarChatRetry")
  local again = chat.current or last_turn()
  wait_turn(again)
  stop()
  return {
    in_chat_window = in_chat,
    answer = turn.answer,
    pieces = turn.pieces,
    finish = turn.finish,
    mid = mid,
    follow_up = follow.answer,
    history = chat.history,
    chat_text = chat_text,
    retry = { answer = again.answer, new_turn = again ~= follow, requests = chat_requests(sent), history = #chat.history,
      turns = #chat.turns, chat_text = buf_text(chat.buf) },
  }
end

--- Sends the never-ending question in the chat buffer; the turn once `pieces` have streamed.
local function long_turn(pieces, what)
  vim.api.nvim_feedkeys(vim.keycode("GA" .. sc.LONG_QUESTION .. "<Esc><CR>"), "mx", false)
  local turn = chat.current
  assert(turn, "no turn started")
  wait(60000, function()
    return turn.pieces >= pieces
  end, what)
  return turn
end

function steps.cancel()
  chat.clear()
  require("starchat.config").options.chat.max_new_tokens = 1500
  vim.cmd("StarChatChat")
  local turn = long_turn(8, "the long answer to stream")
  -- <C-c> at once: the whole answer can take well under a second (the streaming itself is in
  -- the chat-streaming screenshot)
  local c = turn.client
  vim.api.nvim_set_current_win(vim.fn.win_findbuf(chat.buf)[1])
  vim.api.nvim_feedkeys(vim.keycode("<C-c>"), "mx", false)
  local at_cancel = { text = buf_text(chat.buf), pieces = turn.pieces }
  local text_after
  -- the server acknowledges with RequestCancelled: the request leaves client.requests
  local acked = vim.wait(10000, function()
    return c.requests[turn.id] == nil
  end, 10)
  local late_at_ack = lsp.late_pieces[turn.token] or 0
  vim.wait(800, function()
    return false
  end)
  local late_after = lsp.late_pieces[turn.token] or 0
  local ready = vim.wait(10000, function()
    return lsp.state.state == "ready"
  end, 20)
  shot("cancel-stopped")
  text_after = buf_text(chat.buf)
  local history = vim.deepcopy(chat.history)
  -- wiping out the chat buffer mid-answer stops the answer too; a new conversation, so that the
  -- question is the trained one (after a stopped turn the model's answer is anyone's guess)
  chat.clear()
  local turn2 = long_turn(3, "the second long answer to stream")
  local wiped_buf = chat.buf
  vim.cmd("bwipeout! " .. wiped_buf)
  local wipe_acked = vim.wait(10000, function()
    return c.requests[turn2.id] == nil
  end, 10)
  local wipe_ready = vim.wait(10000, function()
    return lsp.state.state == "ready"
  end, 20)
  require("starchat.config").options.chat.max_new_tokens = nil
  return {
    wipe = {
      cancelled = turn2.cancelled == true,
      acked = wipe_acked,
      ready = wipe_ready,
      current = chat.current ~= nil,
      buf_gone = not vim.api.nvim_buf_is_valid(wiped_buf),
    },
    cancelled = turn.cancelled == true,
    pieces_at_cancel = at_cancel.pieces,
    text_at_cancel = at_cancel.text,
    text_after = text_after,
    acked = acked,
    late_at_ack = late_at_ack,
    late_after = late_after,
    ready_after = ready,
    answer = turn.answer,
    history = history,
  }
end

function steps.tasks()
  chat.clear()
  -- Explain: the answer goes to the chat buffer
  select_lines(4, 5)
  local sent, stop = record_sent(client())
  vim.cmd([['<,'>StarChatExplain]])
  local turn = chat.current or last_turn()
  wait_turn(turn)
  stop()
  shot("explain-answer")
  local explain = { answer = turn.answer, kind = turn.kind }
  local explain_sent = { pieces = turn.pieces, requests = chat_requests(sent) }
  -- :StarChatRetry: Explain again about the same lines
  sent, stop = record_sent(client())
  vim.cmd("StarChatRetry")
  local again = chat.current or last_turn()
  wait_turn(again)
  stop()
  explain_sent.retry = { answer = again.answer, kind = again.kind, requests = chat_requests(sent), turns = #chat.turns }
  -- Write tests: a new test_calc.py beside calc.py
  select_lines(4, 5)
  vim.cmd([['<,'>StarChatTests]])
  local test_file = conf.workspace .. "/test_calc.py"
  wait(60000, function()
    local b = vim.fn.bufnr(test_file)
    return b ~= -1 and vim.api.nvim_buf_is_loaded(b) and buf_text(b):find("def test_average", 1, true) ~= nil
  end, "the test file")
  local tests_text = buf_text(vim.fn.bufnr(test_file))
  -- Document: a comment above area() (lines 8-9)
  vim.api.nvim_set_current_win(code_win)
  local before = buf_text(code_buf)
  select_lines(8, 9)
  vim.cmd([['<,'>StarChatDoc]])
  wait(60000, function()
    return buf_text(code_buf) ~= before
  end, "the comment")
  shot("document-applied")
  local documented = buf_text(code_buf)
  vim.cmd("silent edit!") -- back to calc.py as on disk
  return { explain = explain, explain_sent = explain_sent, tests_text = tests_text, documented = documented,
    reverted = buf_text(code_buf) }
end

function steps.fix()
  vim.api.nvim_set_current_win(code_win)
  local before = buf_text(code_buf)
  for _, win in ipairs(vim.fn.win_findbuf(chat.buf or -1)) do
    vim.api.nvim_win_close(win, false) -- the code full width for the screenshots
  end
  select_lines(4, 5)
  shot("fix-selected")
  vim.cmd([['<,'>StarChatFix]])
  wait(60000, function()
    return buf_text(code_buf) ~= before
  end, "the fix to be applied")
  vim.wait(300, function()
    return false
  end)
  shot("fix-applied")
  return { before = before, after = buf_text(code_buf), modified = vim.bo[code_buf].modified }
end

-- :StarChatStop also stops a running Fix (before, it only stopped the chat: the Fix could not
-- be stopped and its edit arrived later).
function steps.stop_task()
  vim.api.nvim_set_current_win(code_win)
  vim.cmd("silent edit!") -- calc.py as on disk
  local before = buf_text(code_buf)
  local c = client()
  select_lines(4, 5)
  local req = starchat.run_task("fix", { range = 2, line1 = 4, line2 = 5 })
  local id = req and req.id
  vim.cmd("StarChatStop")
  local acked = vim.wait(10000, function()
    return id ~= nil and c.requests[id] == nil
  end, 10)
  vim.wait(1000, function()
    return false
  end)
  local ready = vim.wait(10000, function()
    return lsp.state.state == "ready"
  end, 20)
  return {
    sent = id ~= nil,
    acked = acked,
    cancelled = req and req.cancelled == true,
    unchanged = buf_text(code_buf) == before,
    running = #lsp.running(),
    late_edits_refused = lsp.late_edits or 0,
    ready = ready,
    notifications = notifications_of("stop_task"),
  }
end

-- Edit… on average(): from the right-click StarChat submenu, then from the code actions (the
-- client command starchat.editSelection). The instruction is asked for (vim.ui.input), the
-- server's edit (starchat.edit) replaces the lines; one `u` takes it back.
function steps.edit()
  vim.api.nvim_set_current_win(code_win)
  vim.cmd("silent edit!")
  local before = buf_text(code_buf)
  local function edit(run, instruction)
    local orig_input, orig_select = vim.ui.input, vim.ui.select
    local asked = {}
    vim.ui.input = function(opts, on_confirm)
      table.insert(asked, opts.prompt)
      on_confirm(instruction or sc.CHAT_FIX_QUESTION)
    end
    vim.ui.select = function(items, _, on_choice)
      for i, item in ipairs(items) do
        if item.action and item.action.title == "StarChat: Edit…" then
          return on_choice(item, i)
        end
      end
      on_choice(nil)
    end
    local ok, err = pcall(function()
      run()
      wait(60000, function()
        return buf_text(code_buf) ~= before
      end, "the edit to be applied")
    end)
    vim.ui.input, vim.ui.select = orig_input, orig_select
    if not ok then
      error(err)
    end
    local out = { prompts = asked, after = buf_text(code_buf) }
    -- the request ends once the editor has applied the edit (it answers workspace/applyEdit first)
    vim.wait(10000, function()
      return #lsp.running() == 0
    end, 20)
    out.running = #lsp.running()
    vim.cmd("normal! u")
    out.undone = buf_text(code_buf)
    return out
  end
  local out = {}
  out.menu = edit(function()
    select_lines(4, 5)
    vim.cmd([[4,5emenu PopUp.StarChat.Edit…]])
  end)
  shot("edit-undone")
  out.code_action = edit(function()
    vim.api.nvim_set_current_win(code_win)
    local line5 = vim.api.nvim_buf_get_lines(code_buf, 4, 5, false)[1]
    vim.lsp.buf.code_action({ range = { start = { 4, 0 }, ["end"] = { 5, #line5 - 1 } } }) -- as in code_actions
  end)
  -- :StarChatEdit with no range, the cursor on the empty line above `def area`: the code asked
  -- for is written on that line
  out.cursor = edit(function()
    vim.api.nvim_set_current_win(code_win)
    vim.api.nvim_win_set_cursor(code_win, { sc.EMPTY_LINE_LINE + 1, 0 })
    vim.cmd("StarChatEdit")
  end, sc.CHAT_CODE_QUESTION)
  vim.cmd("silent edit!")
  return out
end

-- workspace/applyEdit for an older version of the buffer is refused (Neovim alone would skip it
-- silently and answer "applied").
function steps.apply_edit()
  local c = client()
  vim.api.nvim_buf_set_lines(code_buf, 0, 0, false, { "# typed by the user" })
  local before = buf_text(code_buf)
  local version = vim.lsp.util.buf_versions[code_buf]
  local function edit(v)
    return {
      edit = {
        documentChanges = {
          {
            textDocument = { uri = vim.uri_from_bufnr(code_buf), version = v },
            edits = { { range = { start = { line = 0, character = 0 }, ["end"] = { line = 0, character = 0 } }, newText = "# edit\n" } },
          },
        },
      },
    }
  end
  local handler = lsp.handlers["workspace/applyEdit"]
  local old = handler(nil, edit(version - 1), { client_id = c.id, method = "workspace/applyEdit" })
  local old_text = buf_text(code_buf)
  local current = handler(nil, edit(version), { client_id = c.id, method = "workspace/applyEdit" })
  local current_text = buf_text(code_buf)
  vim.cmd("silent edit!")
  return {
    old = old,
    old_unchanged = old_text == before,
    current = current,
    current_applied = current_text == "# edit\n" .. before,
  }
end

-- setup() called again (a re-sourced config) keeps one FileType autocommand, keeps the running
-- server and sends it the new settings; configure() changes one at runtime.
function steps.settings()
  local c0 = client()
  local pulled = {}
  local function chat_finish(question)
    chat.clear()
    local pulls = config_pulls
    wait(10000, function()
      return config_pulls > pulls
    end, "the server to pull the settings (workspace/configuration)")
    table.insert(pulled, last_pull and last_pull[1])
    -- the server applies what it pulled a moment after it has the answer: a request sent at once
    -- can still run with the old settings (see the report: a server-side race)
    vim.wait(300, function()
      return false
    end)
    local turn = chat.send(question)
    assert(turn, "no turn started")
    wait_turn(turn)
    return turn.finish
  end
  local opts = vim.deepcopy(setup_opts)
  opts.max_new_tokens = 3
  starchat.setup(opts)
  local out = {
    autocmds = #vim.api.nvim_get_autocmds({ group = "starchat", event = "FileType" }),
    autocmds_all_first = autocmds_first,
    autocmds_all = #vim.api.nvim_get_autocmds({ group = "starchat" }),
    same_client = client() ~= nil and client().id == c0.id,
    pushed = vim.deepcopy(client().settings.starchat),
  }
  out.finish_short = chat_finish(sc.LONG_QUESTION)
  out.note = buf_text(chat.buf):find("[stopped at maxNewTokens]", 1, true) ~= nil
  starchat.setup(setup_opts)
  out.finish_back = chat_finish(sc.CHAT_QUESTION)
  starchat.configure({ max_new_tokens = 2 })
  out.finish_configured = chat_finish(sc.CHAT_QUESTION)
  starchat.configure({ max_new_tokens = vim.NIL })
  out.finish_reset = chat_finish(sc.CHAT_QUESTION)
  out.autocmds_after = #vim.api.nvim_get_autocmds({ group = "starchat", event = "FileType" })
  out.autocmds_all_after = #vim.api.nvim_get_autocmds({ group = "starchat" })
  out.pulled = pulled
  return out
end

-- The chat opens once per tab page: a second :StarChatChat in a tab that shows it opens nothing.
function steps.tabs()
  chat.open() -- shown in the first tab page
  vim.cmd("tabnew")
  local tab = vim.api.nvim_get_current_tabpage()
  vim.cmd("StarChatChat")
  vim.cmd("StarChatChat")
  local in_tab = 0
  for _, w in ipairs(vim.api.nvim_tabpage_list_wins(tab)) do
    if vim.api.nvim_win_get_buf(w) == chat.buf then
      in_tab = in_tab + 1
    end
  end
  local total = #vim.fn.win_findbuf(chat.buf)
  vim.cmd("tabclose")
  vim.api.nvim_set_current_win(code_win)
  return { in_tab = in_tab, total = total }
end

-- Streamed text comes out the same however it is split into pieces: a "\r\n" split between two
-- pieces ("…\r", then "\n…") leaves no "^M". The server's pieces of a chat answer reach the
-- plugin's $/progress handler with each space sent as a "\r\n" cut after its "\r".
function steps.split_crlf()
  chat.clear()
  local real = lsp.handlers["$/progress"]
  local snapshots, pieces = {}, 0
  local turn
  lsp.handlers["$/progress"] = function(err, result, ctx, conf)
    local value = result and result.value
    if not (turn and result.token == turn.token and type(value) == "table" and type(value.delta) == "string") then
      return real(err, result, ctx, conf)
    end
    local text, from = value.delta:gsub(" ", "\r\n"), 1
    while from <= #text do
      local cr = text:find("\r", from, true) or #text
      local piece = vim.tbl_extend("force", value, { delta = text:sub(from, cr) })
      real(err, { token = result.token, value = piece }, ctx, conf)
      pieces, from = pieces + 1, cr + 1
      local lines = vim.api.nvim_buf_get_lines(chat.buf, turn.answer_line, -1, false)
      table.insert(snapshots, table.concat(lines, "\n"))
    end
  end
  local ok, err = pcall(function()
    turn = chat.send(sc.CHAT_QUESTION)
    assert(turn, "no turn started")
    wait_turn(turn)
  end)
  lsp.handlers["$/progress"] = real
  if not ok then
    error(err)
  end
  shot("split-crlf")
  return {
    pieces = pieces,
    streamed = snapshots[#snapshots],
    with_cr = #vim.tbl_filter(function(t)
      return t:find("\r", 1, true) ~= nil
    end, snapshots),
    answer = turn.answer,
    chat_text = buf_text(chat.buf),
  }
end

-- The chat buffer deleted (:bdelete, :bwipeout): the next one has the same name. Also when the
-- deleted one is shown again before the plugin wipes it out (it does so once Neovim is idle:
-- here in one go, as a mapping or a script would run `:bdelete | buffer #`).
function steps.chat_name()
  chat.clear()
  local names = { first = vim.api.nvim_buf_get_name((chat.open())) }
  for _, cmd in ipairs({ "bdelete", "bwipeout" }) do
    local buf = chat.open({ focus = true })
    vim.cmd(cmd)
    names[cmd .. "_gone"] = not vim.api.nvim_buf_is_loaded(buf)
    names[cmd] = vim.api.nvim_buf_get_name((chat.open()))
    vim.api.nvim_set_current_win(code_win)
  end
  local old = chat.open({ focus = true })
  vim.cmd("bdelete")
  vim.cmd("buffer " .. old)
  names.shown_again = vim.api.nvim_buf_get_name((chat.open()))
  vim.api.nvim_set_current_win(code_win)
  vim.cmd("buffer " .. code_buf)
  vim.wait(100, function()
    return false
  end)
  names.old_gone = not vim.api.nvim_buf_is_valid(old)
  for _, w in ipairs(vim.fn.win_findbuf(chat.buf)) do
    vim.api.nvim_win_close(w, false)
  end
  return names
end

--- A new conversation in the chat, focused, whose first question (CHAT_QUESTION unless given)
--- has been answered: buf, win.
local function answered_chat(question)
  chat.clear()
  local buf, win = chat.open({ focus = true })
  wait_turn(chat.send(question or sc.CHAT_QUESTION))
  return buf, win
end

-- The chat buffer has no file: :edit! would empty it. Its text comes back, the conversation goes
-- on (the follow-up is answered as after the first turn), and an answer streaming meanwhile
-- keeps streaming into it. :bunload ends the conversation, as :bdelete does.
function steps.chat_reload()
  local buf, win = answered_chat()
  vim.api.nvim_feedkeys(vim.keycode("GA" .. "a draft<Esc>"), "nx", false)
  local before = buf_text(buf)
  vim.api.nvim_set_current_win(win)
  local filetype_events = 0
  vim.api.nvim_create_autocmd("FileType", {
    buffer = buf,
    once = true,
    callback = function()
      filetype_events = filetype_events + 1
    end,
  })
  vim.cmd("edit!")
  local hint_ns = vim.api.nvim_get_namespaces().starchat_chat_hint
  local out = {
    filetype = vim.bo[buf].filetype,
    filetype_events = filetype_events,
    same_after_edit = buf_text(buf) == before,
    same_buffer = chat.buf == buf,
    listed = vim.bo[buf].buflisted,
    mapped = vim.fn.maparg("<CR>", "n", false, true).buffer == 1,
    hint = #vim.api.nvim_buf_get_extmarks(buf, hint_ns, 0, -1, {}),
    history = #chat.history,
  }
  -- :w {file} saves a copy of the conversation; the chat stays the chat
  local copy = vim.fn.tempname() .. ".md"
  vim.cmd("write " .. vim.fn.fnameescape(copy))
  out.copy_same = table.concat(vim.fn.readfile(copy), "\n") == table.concat(vim.api.nvim_buf_get_lines(buf, 0, -1, false), "\n")
  out.name_after_write = vim.api.nvim_buf_get_name(buf)
  local follow = chat.send(sc.CHAT_FOLLOW_UP)
  wait_turn(follow)
  out.follow_up = follow.answer
  -- mid-answer
  chat.clear()
  require("starchat.config").options.chat.max_new_tokens = 1500
  local turn = chat.send(sc.LONG_QUESTION)
  assert(turn, "no turn started")
  wait(60000, function()
    return turn.pieces >= 3
  end, "the long answer to stream")
  vim.api.nvim_set_current_win(win)
  vim.cmd("edit!")
  local at = turn.pieces
  wait(60000, function()
    return turn.pieces >= at + 5
  end, "more of the answer after :edit!")
  out.streaming = chat.current == turn and not vim.bo[buf].modifiable
  chat.cancel()
  require("starchat.config").options.chat.max_new_tokens = nil
  out.long_kept = buf_text(buf):find("## StarChat\n" .. turn.answer .. "\n\n[cancelled]", 1, true) ~= nil
  out.long_text = buf_text(buf):sub(1, 300)
  vim.cmd("bunload " .. buf)
  vim.wait(100, function()
    return false
  end)
  out.unload_forgot = chat.buf == nil and #chat.history == 0 and not vim.api.nvim_buf_is_valid(buf)
  vim.api.nvim_set_current_win(code_win)
  return out
end

-- Typing in the chat: `u` undoes what the user typed, never the plugin's text; a draft is kept
-- when something else is sent (here a message given as an argument, as :StarChatChat {msg});
-- <C-c> in Insert mode with no answer running leaves Insert mode. Then a conversation about a
-- file deleted with :bdelete (loaded no more) goes on without it.
function steps.chat_editing()
  local buf, win = answered_chat()
  local answered = buf_text(buf)
  vim.api.nvim_set_current_win(win)
  vim.api.nvim_feedkeys(vim.keycode("GAone<Esc>"), "nx", false)
  vim.api.nvim_feedkeys(vim.keycode("otwo<Esc>"), "nx", false)
  for _ = 1, 5 do
    vim.cmd("silent! undo")
  end
  local out = { undone = buf_text(buf) == answered }
  vim.api.nvim_feedkeys(vim.keycode("GAmy draft<Esc>"), "nx", false)
  local second = chat.send(sc.CHAT_FOLLOW_UP)
  wait_turn(second)
  local lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false)
  out.draft_kept = lines[#lines - 1] == "## You" and lines[#lines] == "my draft"
  out.follow_up = second.answer
  vim.api.nvim_set_current_win(win)
  vim.api.nvim_feedkeys(vim.keycode("A<C-c>"), "x!", false) -- (!: Insert mode is not ended for it)
  out.mode = vim.api.nvim_get_mode().mode
  vim.cmd("stopinsert")

  -- the conversation's file deleted (:bdelete: valid, not loaded)
  local file = conf.workspace .. "/gone.py"
  vim.fn.writefile({ "def gone():", "    return 1" }, file)
  vim.api.nvim_set_current_win(code_win)
  vim.cmd.edit(vim.fn.fnameescape(file))
  local gone = vim.api.nvim_get_current_buf()
  wait(60000, function()
    return lsp.clients(gone)[1] ~= nil
  end, "gone.py to be attached")
  chat.clear()
  require("starchat.config").options.chat.max_new_tokens = 8
  vim.cmd("1,2StarChatExplain")
  local explain = chat.current or last_turn()
  wait_turn(explain)
  vim.api.nvim_set_current_win(code_win)
  vim.cmd("buffer " .. code_buf) -- (:bdelete would close the window showing it)
  vim.cmd("bdelete " .. gone)
  local notes = #results.notifications
  local after = chat.send(sc.CHAT_QUESTION)
  out.sent_after_delete = after ~= nil
  if after then
    wait_turn(after)
    out.after = { done = after.done == true, error = after.error }
  end
  out.new_notes = messages_since(notes)
  require("starchat.config").options.chat.max_new_tokens = nil
  return out
end

-- A session restored where the chat was on screen: the session shows an empty buffer named
-- "starchat://chat" there (sessionoptions "blank": `enew` then `file starchat://chat`). After
-- SessionLoadPost that window holds a working chat, and :StarChatChat opens no second one.
-- gy in the chat yanks a real answer's code block (the one under the cursor, else the nearest
-- above it) without its fences, linewise, into the register given ("agy) or the unnamed one;
-- ]p then puts it into code, indented like the line. Above every block nothing is yanked, and
-- the user is told.
function steps.chat_yank()
  local buf, win = answered_chat(sc.CHAT_CODE_QUESTION)
  local out = { answer = last_turn().answer }
  local function gy(row, keys)
    vim.api.nvim_set_current_win(win)
    vim.api.nvim_win_set_cursor(win, { row, 0 })
    vim.api.nvim_feedkeys(keys or "gy", "mx", false)
  end
  local lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false)
  vim.fn.setreg('"', "untouched", "c")
  gy(1) -- the first "## You": no block at or above it
  out.above = vim.fn.getreg('"')
  gy(#lines) -- where the next message is typed: the answer's block
  out.unnamed = { text = vim.fn.getreg('"'), type = vim.fn.getregtype('"'), zero = vim.fn.getreg("0") }
  local inside = vim.fn.index(lines, "    return x * x") + 1
  gy(inside, '"agy')
  out.named = { text = vim.fn.getreg("a"), type = vim.fn.getregtype("a"), row = inside }
  out.notes = vim.tbl_map(function(n)
    return { msg = n.msg, level = n.level }
  end, notifications_of("chat_yank"))
  local target = vim.api.nvim_create_buf(false, true)
  vim.bo[target].expandtab, vim.bo[target].shiftwidth = true, 4 -- as for Python ("]p" re-indents)
  vim.api.nvim_set_current_win(code_win)
  vim.api.nvim_win_set_buf(code_win, target)
  vim.api.nvim_buf_set_lines(target, 0, -1, false, { "class Shapes:", "    pass" })
  vim.api.nvim_win_set_cursor(code_win, { 2, 0 })
  vim.api.nvim_feedkeys('"a]p', "nx", false)
  out.put = vim.api.nvim_buf_get_lines(target, 0, -1, false)
  vim.api.nvim_win_set_buf(code_win, code_buf)
  vim.api.nvim_buf_delete(target, { force = true })
  return out
end

-- `ga` in the chat: the answer's code in place of the selection asked about, where that
-- selection is after a line typed above it meanwhile; `u` in the code takes it back. Whole
-- lines (V), then the expression alone (v).
function steps.chat_apply()
  chat.clear()
  local out = { without_selection = chat.apply() }
  vim.api.nvim_set_current_win(code_win)
  vim.cmd("silent edit!")
  local function ask_and_apply(keys, follow_up)
    vim.api.nvim_set_current_win(code_win)
    vim.cmd("normal! " .. keys .. "\27") -- the selection, then Normal mode ('< and '> set)
    vim.cmd("'<,'>StarChat " .. sc.CHAT_FIX_QUESTION)
    local turn = chat.current or last_turn()
    wait_turn(turn)
    vim.api.nvim_buf_set_lines(code_buf, 0, 0, false, { "# typed while the answer was read" })
    local asked_about
    if follow_up then -- the range a follow-up is about (sent, then stopped at once)
      local sent, stop = record_sent(client())
      chat.send(follow_up)
      chat.cancel()
      stop()
      for _, m in ipairs(sent) do
        if m.method == "starchat/chat" then
          asked_about = vim.json.decode(m.json).range
        end
      end
    end
    local _, win = chat.open()
    vim.api.nvim_set_current_win(win)
    vim.api.nvim_win_set_cursor(win, { vim.api.nvim_buf_line_count(chat.buf), 0 })
    vim.api.nvim_feedkeys("ga", "mx", false)
    local r = {
      answer = turn.answer,
      text = buf_text(code_buf),
      range = chat.context.range,
      label = chat.context.label,
      cursor = vim.api.nvim_win_get_cursor(code_win),
      in_chat = vim.api.nvim_get_current_win() == win,
      follow_up = asked_about,
    }
    vim.api.nvim_set_current_win(code_win)
    vim.cmd("normal! u")
    r.undone = buf_text(code_buf)
    vim.cmd("silent edit!")
    chat.clear()
    return r
  end
  out.lines = ask_and_apply("4GVj", sc.ASK_QUESTION)
  out.expression = ask_and_apply("5G011lv28l")
  out.notes = vim.tbl_map(function(n)
    return { msg = n.msg, level = n.level }
  end, notifications_of("chat_apply"))
  return out
end

function steps.session()
  chat.clear()
  local old = chat.buf
  for _, w in ipairs(vim.fn.win_findbuf(old)) do
    vim.api.nvim_win_close(w, true)
  end
  vim.cmd("bwipeout! " .. old)
  vim.api.nvim_set_current_win(code_win)
  vim.cmd("botright vsplit | enew | file starchat://chat")
  local win = vim.api.nvim_get_current_win()
  local restored = vim.api.nvim_win_get_buf(win)
  vim.cmd("doautocmd SessionLoadPost")
  local buf = vim.api.nvim_win_get_buf(win)
  local out = {
    adopted = chat.buf == buf and buf == restored,
    buftype = vim.bo[buf].buftype,
    listed = vim.bo[buf].buflisted,
    mapped = vim.fn.maparg("<CR>", "n", false, true).buffer == 1,
    winbar = vim.wo[win].winbar ~= "",
    text = buf_text(buf),
  }
  local windows = #vim.api.nvim_tabpage_list_wins(0)
  local _, shown = chat.open()
  out.same_window = shown == win and #vim.api.nvim_tabpage_list_wins(0) == windows
  local turn = chat.send(sc.CHAT_QUESTION)
  wait_turn(turn)
  out.answer = turn.answer
  vim.api.nvim_set_current_win(code_win)
  return out
end

-- The chat window's options (no line numbers, wrap, its winbar) are the chat buffer's there: a
-- file shown in that window afterwards has the window's usual ones.
function steps.chat_window()
  vim.api.nvim_set_current_win(code_win)
  for _, w in ipairs(vim.api.nvim_tabpage_list_wins(0)) do
    if vim.api.nvim_win_get_buf(w) == chat.buf then
      vim.api.nvim_win_close(w, false)
    end
  end
  local saved = { number = vim.wo[code_win].number, wrap = vim.wo[code_win].wrap }
  -- the split starts with the code window's options
  vim.wo[code_win].number, vim.wo[code_win].wrap = true, false
  local _, win = chat.open()
  local function options()
    local wo = vim.wo[win]
    return { number = wo.number, wrap = wo.wrap, linebreak = wo.linebreak, winbar = wo.winbar ~= "" }
  end
  local out = { chat = options() }
  -- a file not shown anywhere yet (a buffer shown before takes the options it had there)
  local file = conf.workspace .. "/window.txt"
  vim.fn.writefile({ "text" }, file)
  vim.api.nvim_win_call(win, function()
    vim.cmd.edit(vim.fn.fnameescape(file))
  end)
  out.file = options()
  local file_buf = vim.api.nvim_win_get_buf(win)
  vim.api.nvim_win_call(win, function()
    vim.cmd("buffer " .. chat.buf)
  end)
  out.chat_again = options()
  vim.api.nvim_win_close(win, false)
  vim.cmd("bwipeout " .. file_buf)
  vim.wo[code_win].number, vim.wo[code_win].wrap = saved.number, saved.wrap
  return out
end

-- require("starchat").status() in the status line: in windows of buffers the client is attached
-- to, not in the chat's or in those of other files.
function steps.status_line()
  vim.api.nvim_set_current_win(code_win)
  local notes = conf.workspace .. "/notes.txt"
  vim.fn.writefile({ "notes" }, notes)
  vim.cmd("botright split " .. vim.fn.fnameescape(notes))
  local notes_win = vim.api.nvim_get_current_win()
  local _, chat_win = chat.open()
  vim.api.nvim_set_current_win(code_win)
  local function line(win)
    return vim.api.nvim_eval_statusline(vim.o.statusline, { winid = win }).str
  end
  local out = { code = line(code_win), chat = line(chat_win), notes = line(notes_win) }
  vim.api.nvim_set_current_win(notes_win) -- the current window does not matter
  out.code_from_notes = line(code_win)
  out.notes_current = line(notes_win)
  out.arg = { code = starchat.status(code_buf), notes = starchat.status(vim.api.nvim_win_get_buf(notes_win)) }
  shot("status-lines")
  vim.api.nvim_win_close(chat_win, false)
  vim.cmd("bwipeout " .. vim.api.nvim_win_get_buf(notes_win))
  vim.api.nvim_set_current_win(code_win)
  return out
end

-- A file outside the first file's root joins the running server (one model in memory) as a
-- workspace folder, instead of starting a second server.
function steps.folders()
  local other_dir = vim.fs.dirname(conf.workspace) .. "/other"
  vim.fn.mkdir(other_dir, "p")
  local other = other_dir .. "/other.py"
  vim.fn.writefile({ "def other():", "    return 1" }, other)
  vim.api.nvim_set_current_win(code_win)
  vim.cmd.edit(other)
  local buf = vim.api.nvim_get_current_buf()
  wait(10000, function()
    return lsp.clients(buf)[1] ~= nil
  end, "the server to attach to other.py")
  local c = lsp.clients(buf)[1]
  local folders = {}
  for _, f in ipairs(c.workspace_folders or {}) do
    table.insert(folders, f.name)
  end
  local out = { clients = #lsp.clients(), same = c.id == client().id, folders = folders }
  vim.cmd("buffer " .. code_buf)
  vim.cmd("bwipeout " .. buf)
  return out
end

--- Runs body(I) in Insert mode as a user types there: `start` (e.g. "i", "A") starts Insert mode,
--- and Neovim then waits for keys, running its event loop (timers, the server's answers) as it
--- does for a user. body runs in a coroutine resumed from that loop: I.type(keys) types (through
--- mappings, as typed keys: Insert mode takes them, and fires its autocommands, once body
--- yields; `taken()`, when given, tells it has: the cursor moved, the line changed), I.sleep(ms),
--- I.wait(ms, cond, what). Insert mode ends when body returns (<Esc>).
local function in_insert(start, body)
  -- a script run with -l (silent mode, as `nvim -es`) ends Neovim when, waiting for keys, nothing
  -- comes within 'updatetime' (its end of input)
  local updatetime = vim.o.updatetime
  vim.o.updatetime = 600000
  local co, failure
  local function leave()
    if vim.api.nvim_get_mode().mode:sub(1, 1) == "i" then
      vim.api.nvim_input("<Esc>")
    end
  end
  local function resume()
    if coroutine.status(co) ~= "suspended" then
      return
    end
    local ok, err = coroutine.resume(co)
    if not ok then
      failure = debug.traceback(co, err)
    end
    if coroutine.status(co) == "dead" then
      leave()
    end
  end
  local I = {}
  function I.sleep(ms)
    vim.defer_fn(resume, ms)
    coroutine.yield()
  end
  function I.wait(ms, cond, what)
    local deadline = vim.uv.now() + ms
    while not cond() do
      if vim.uv.now() > deadline then
        error("timed out after " .. ms .. " ms waiting for " .. what)
      end
      I.sleep(20)
    end
  end
  function I.type(keys, taken)
    vim.api.nvim_input(keys)
    if taken then -- (Insert mode runs its autocommands for a key before it waits for the next one)
      I.wait(10000, taken, "Insert mode to take " .. keys)
    else
      I.sleep(40)
    end
  end

  --- For I.type: the cursor is at byte `col` (0-based).
  function I.at(col)
    return function()
      return vim.api.nvim_win_get_cursor(0)[2] == col
    end
  end
  co = coroutine.create(function()
    body(I)
  end)
  local watchdog = vim.defer_fn(function() -- never left in Insert mode for good
    failure = failure or "still in Insert mode after 120 s"
    vim.api.nvim_input("<C-\\><C-n>")
  end, 120000)
  vim.defer_fn(resume, 0)
  vim.api.nvim_feedkeys(vim.keycode(start), "x!", false) -- returns once Insert mode has ended
  if not watchdog:is_closing() then
    watchdog:stop()
    watchdog:close()
  end
  vim.o.updatetime = updatetime
  if failure then
    error(failure, 0)
  end
  if coroutine.status(co) ~= "dead" then
    error("Insert mode ended before the step did", 0)
  end
end

local completion = require("starchat.completion")

--- The ghost text in `buf`: {row, col, inline = the text at the cursor, lines = the lines below}
--- from the plugin's extmarks, or nil.
local function ghost(buf)
  local marks = vim.api.nvim_buf_get_extmarks(buf, completion.ns, 0, -1, { details = true })
  if #marks == 0 then
    return nil
  end
  local _, row, col, d = unpack(marks[1])
  local function text(chunks)
    return table.concat(vim.tbl_map(function(chunk)
      return chunk[1]
    end, chunks or {}))
  end
  local lines = vim.tbl_map(text, d.virt_lines or {})
  return {
    row = row,
    col = col,
    inline = text(d.virt_text),
    pos = d.virt_text_pos,
    hl = d.virt_text and d.virt_text[1][2] or (d.virt_lines and d.virt_lines[1][1][2]),
    lines = lines,
    marks = #marks,
  }
end

--- Records the client's inline completion requests ({id, params, answered, err, result}), the
--- ids it sent $/cancelRequest for, and the server's $/logTrace messages (trace on). Returns the
--- record and a function that stops recording.
local function record_completions(c)
  local rec = { requests = {}, cancels = {}, traces = {} }
  local rpc = c.rpc
  local real_request, real_notify = rpc.request, rpc.notify
  rpc.request = function(method, params, callback, ...)
    if method ~= "textDocument/inlineCompletion" then
      return real_request(method, params, callback, ...)
    end
    local r = { params = vim.deepcopy(params) }
    table.insert(rec.requests, r)
    local ok, id = real_request(method, params, function(err, result)
      r.answered, r.err, r.result = true, err, result
      return callback(err, result)
    end, ...)
    r.id = id
    return ok, id
  end
  rpc.notify = function(method, params, ...)
    if method == "$/cancelRequest" then
      table.insert(rec.cancels, params.id)
    end
    return real_notify(method, params, ...)
  end
  local real_trace = vim.lsp.handlers["$/logTrace"]
  vim.lsp.handlers["$/logTrace"] = function(_, params)
    table.insert(rec.traces, params.message)
  end
  real_notify("$/setTrace", { value = "messages" })
  return rec, function()
    real_notify("$/setTrace", { value = "off" })
    rpc.request, rpc.notify = real_request, real_notify
    vim.lsp.handlers["$/logTrace"] = real_trace
  end
end

--- The server's trace lines of completions the model generated ("StarChat: completion: prompt …")
--- or stopped ("… stopped after …").
local function generations(rec, kind)
  return #vim.tbl_filter(function(t)
    return vim.startswith(t, "StarChat: completion: " .. kind)
  end, rec.traces)
end

--- Opens `name` (in the workspace) holding `text`, attached; its buffer.
local function open_fill(name, text)
  local file = conf.workspace .. "/" .. name
  vim.fn.writefile(vim.split(text:gsub("\n$", ""), "\n", { plain = true }), file)
  vim.api.nvim_set_current_win(code_win)
  vim.cmd.edit(vim.fn.fnameescape(file))
  local buf = vim.api.nvim_get_current_buf()
  wait(10000, function()
    return lsp.clients(buf)[1] ~= nil and lsp.clients(buf)[1].initialized
  end, "the server to attach to " .. name)
  return buf
end

local function close_fill(buf)
  vim.api.nvim_set_current_win(code_win)
  vim.cmd("buffer " .. code_buf)
  pcall(vim.cmd, "bwipeout! " .. buf)
end

--- Opens `name` holding `text` and runs body(buf, client, rec, out) with its completions
--- recorded (rec: record_completions). Whatever happens, then stops recording, calls
--- `finally(out)` if given and closes the buffer. Returns out, or raises body's error.
local function with_fill(name, text, body, finally)
  local buf = open_fill(name, text)
  local c = lsp.clients(buf)[1]
  local rec, stop = record_completions(c)
  local out = {}
  local ok, err = pcall(body, buf, c, rec, out)
  stop()
  if finally then
    finally(out)
  end
  close_fill(buf)
  if not ok then
    error(err, 0)
  end
  return out
end

local function mode()
  return vim.api.nvim_get_mode().mode
end

--- Insert mode at `row`, `col` (0-based), a pause, "v" typed, a pause: as a user typing (what
--- completion as you type asks for, if it is on).
local function type_v_at(row, col)
  vim.api.nvim_win_set_cursor(0, { row + 1, col })
  in_insert("i", function(I)
    I.sleep(600)
    I.type("v")
    I.sleep(600)
  end)
end

-- Inline completion as ghost text: in Insert mode on the empty line of area() the server's
-- proposal (two lines) shows at the cursor; <C-]> dismisses it, leaving Insert mode clears it,
-- and <Tab> inserts it.
function steps.completion()
  return with_fill("area.py", sc.FILL_AREA_TEXT, function(buf, c, rec, out)
    out.provider = c.server_capabilities.inlineCompletionProvider ~= nil
    out.declared = vim.tbl_get(c.config.capabilities, "textDocument", "inlineCompletion")
    local before = buf_text(buf)
    vim.api.nvim_win_set_cursor(0, { sc.FILL_AREA_CURSOR_LINE + 1, 0 })
    -- shown, then dismissed with <C-]>: not asked again until something changes
    in_insert("A", function(I)
      I.wait(60000, function()
        return ghost(buf) ~= nil
      end, "the ghost text")
      out.shown = ghost(buf)
      out.first_request = rec.requests[1] and rec.requests[1].params
      shot("completion-ghost-text")
      local asked = #rec.requests
      I.type("<C-]>", function()
        return ghost(buf) == nil
      end)
      out.dismissed = { ghost = ghost(buf) or vim.NIL, mode = mode(), unchanged = buf_text(buf) == before }
      I.sleep(600) -- well past the debounce
      out.dismissed.later = ghost(buf) or vim.NIL
      out.dismissed.asked_again = #rec.requests - asked
    end)
    -- shown again on entering Insert mode; leaving it clears it
    in_insert("A", function(I)
      I.wait(60000, function()
        return ghost(buf) ~= nil
      end, "the ghost text again")
    end)
    out.left = { ghost = ghost(buf) or vim.NIL, suggestion = completion.suggestion ~= nil, mode = mode() }
    -- accepted with <Tab>
    in_insert("A", function(I)
      I.wait(60000, function()
        return ghost(buf) ~= nil
      end, "the ghost text to accept")
      I.type("<Tab>")
      I.wait(5000, function()
        return buf_text(buf) ~= before
      end, "the completion to be inserted")
      out.accepted = { mode = mode(), cursor = vim.api.nvim_win_get_cursor(0), text = buf_text(buf) }
      shot("completion-accepted")
    end)
  end)
end

-- Typing what is proposed keeps the rest on screen at once, and the server answers the next
-- request from its last completion, without the model; <Tab> then inserts the whole proposal.
-- A key that does not match, or moving the cursor, clears it.
function steps.completion_typing()
  local row, col = sc.FILL_SUM_CURSOR_LINE, sc.FILL_SUM_CURSOR_CHARACTER
  return with_fill("sum.py", sc.FILL_SUM_TEXT, function(buf, _, rec, out)
    out.typed = {}
    vim.api.nvim_win_set_cursor(0, { row + 1, col })
    in_insert("i", function(I)
      I.wait(60000, function()
        return ghost(buf) ~= nil
      end, "the ghost text")
      out.shown = ghost(buf)
      out.generated_before = generations(rec, "prompt")
      for i, key in ipairs({ "v", "a", "l" }) do
        I.type(key, I.at(col + i))
        table.insert(out.typed, ghost(buf) or vim.NIL)
      end
      -- the request for the cursor after "val", answered by the server
      I.wait(30000, function()
        local last = rec.requests[#rec.requests]
        return last and last.params.position.character == col + 3 and last.answered
      end, "the answer after typing val")
      local last = rec.requests[#rec.requests]
      out.after_val = {
        ghost = ghost(buf) or vim.NIL,
        answer = last.result and last.result.items and last.result.items[1] or vim.NIL,
        generated = generations(rec, "prompt"),
      }
      shot("completion-typed-through")
      I.type("<Tab>")
      I.wait(5000, function()
        return ghost(buf) == nil and vim.api.nvim_get_current_line() ~= sc.FILL_SUM_TEXT_LINE:sub(1, col) .. "val)"
      end, "the completion to be inserted")
      out.accepted = { line = vim.api.nvim_get_current_line(), cursor = vim.api.nvim_win_get_cursor(0) }
    end)
    -- a key that does not match, and a cursor move, clear the ghost text
    vim.api.nvim_buf_set_lines(buf, row, row + 1, false, { sc.FILL_SUM_TEXT_LINE })
    vim.api.nvim_win_set_cursor(0, { row + 1, col })
    in_insert("i", function(I)
      I.wait(60000, function()
        return ghost(buf) ~= nil
      end, "the ghost text before z")
      out.before_z = ghost(buf)
      I.type("z", I.at(col + 1))
      out.after_z = ghost(buf) or vim.NIL
      I.type("<BS>", I.at(col))
      I.wait(30000, function()
        return ghost(buf) ~= nil and ghost(buf).col == col
      end, "the ghost text after <BS>")
      out.before_left = ghost(buf)
      I.type("<Left>", I.at(col - 1))
      out.after_left = ghost(buf) or vim.NIL
    end)
  end)
end

-- Part by part: <M-Right> inserts the proposal's next word, <M-C-Right> the rest of its line,
-- then its next line; the rest stays on screen, and the server answers the requests at the new
-- places from its last completion, without the model.
function steps.completion_partial()
  return with_fill("partial.py", sc.FILL_AREA_TEXT, function(buf, _, rec, out)
    local row = sc.FILL_AREA_CURSOR_LINE
    local function state()
      return {
        line = vim.api.nvim_buf_get_lines(buf, row, row + 1, false)[1],
        cursor = vim.api.nvim_win_get_cursor(0),
        ghost = ghost(buf) or vim.NIL,
      }
    end
    out.steps = {}
    vim.api.nvim_win_set_cursor(0, { row + 1, 0 })
    in_insert("A", function(I)
      I.wait(60000, function()
        return ghost(buf) ~= nil
      end, "the ghost text")
      out.generated_before = generations(rec, "prompt")
      for _, key in ipairs({ "<M-Right>", "<M-Right>", "<M-C-Right>", "<M-C-Right>" }) do
        local tick = vim.api.nvim_buf_get_changedtick(buf)
        I.type(key, function()
          return vim.api.nvim_buf_get_changedtick(buf) ~= tick
        end)
        table.insert(out.steps, state())
        if key == "<M-C-Right>" and #out.steps == 3 then
          -- the request at the new place, answered by the server
          local at = vim.api.nvim_win_get_cursor(0)[2]
          I.wait(30000, function()
            local last = rec.requests[#rec.requests]
            return last and last.params.position.character == at and last.answered
          end, "the answer after the line")
          local last = rec.requests[#rec.requests]
          out.answer = last.result and last.result.items and last.result.items[1] or vim.NIL
          out.after_answer = state()
        end
      end
      out.generated = generations(rec, "prompt")
      out.text = buf_text(buf)
    end)
  end)
end

-- A keystroke while a long completion is being generated sends $/cancelRequest for it: the
-- server answers RequestCancelled and stops the model ("stopped after N tokens").
function steps.completion_cancel()
  local pulls = config_pulls
  starchat.configure({ completion_max_new_tokens = 1500 })
  wait(10000, function()
    return config_pulls > pulls
  end, "the server to pull the settings")
  vim.wait(300, function()
    return false
  end)
  local out = with_fill("long.py", sc.FILL_LONG_TEXT, function(buf, c, rec, out)
    vim.api.nvim_win_set_cursor(0, { sc.FILL_LONG_CURSOR_LINE + 1, 0 })
    in_insert("i", function(I)
      I.wait(30000, function()
        return rec.requests[1] ~= nil and rec.requests[1].id ~= nil
      end, "the completion request")
      I.sleep(300) -- the model is at work (1500 tokens take seconds)
      local first = rec.requests[1]
      out.in_flight = not first.answered and c.requests[first.id] ~= nil
      out.id = first.id
      I.type("x", I.at(1))
      out.cancelled_at_once = vim.tbl_contains(rec.cancels, first.id)
      out.ghost = ghost(buf) or vim.NIL
    end)
    local first = rec.requests[1]
    -- the server acknowledged (Neovim hands a RequestCancelled answer to no handler: it only
    -- drops the request from client.requests)
    out.acked = vim.wait(10000, function()
      return c.requests[first.id] == nil
    end, 10)
    out.answered = first.answered == true
    out.stopped = vim.wait(10000, function()
      return generations(rec, "stopped") > 0
    end, 20)
    out.traces = rec.traces
    out.running = #lsp.running()
  end, function()
    starchat.configure({ completion_max_new_tokens = vim.NIL })
  end)
  out.ready = vim.wait(10000, function()
    return lsp.state.state == "ready"
  end, 20)
  return out
end

-- completion = { enabled = false }: nothing asked, no keys; auto = false: nothing asked while
-- typing, the request key (<M-\>) asks (Invoked), and <Tab> with nothing shown is a Tab.
function steps.completion_off()
  local function setup_with(completion_opts)
    starchat.setup(vim.tbl_deep_extend("force", vim.deepcopy(setup_opts), { completion = completion_opts }))
  end
  local row, col = sc.FILL_SUM_CURSOR_LINE, sc.FILL_SUM_CURSOR_CHARACTER
  return with_fill("off.py", sc.FILL_SUM_TEXT, function(buf, _, rec, out)
    setup_with({ enabled = false })
    -- (Neovim 0.11 maps <Tab> itself, for snippets: that mapping is back)
    out.off = {
      tab = vim.fn.maparg("<Tab>", "i", false, true).desc or vim.NIL,
      request_key = vim.fn.maparg("<M-\\>", "i"),
    }
    type_v_at(row, col)
    out.off.requests = #rec.requests
    out.off.ghost = ghost(buf) or vim.NIL
    local notes = #results.notifications
    vim.cmd("StarChatComplete")
    out.off.told = messages_since(notes)
    vim.api.nvim_buf_set_lines(buf, row, row + 1, false, { sc.FILL_SUM_TEXT_LINE })

    setup_with({ auto = false })
    vim.bo[buf].expandtab, vim.bo[buf].softtabstop = false, 0 -- <Tab> inserts a "\t" (not Python's spaces)
    out.manual = { tab = vim.fn.maparg("<Tab>", "i", false, true).desc or vim.NIL }
    vim.api.nvim_win_set_cursor(0, { row + 1, col })
    in_insert("i", function(I)
      I.sleep(600)
      out.manual.while_typing = #rec.requests
      I.type("<M-\\>")
      I.wait(60000, function()
        return ghost(buf) ~= nil
      end, "the ghost text asked for")
      out.manual.asked = rec.requests[#rec.requests].params.context
      out.manual.ghost = ghost(buf)
      I.type("<C-]>", function()
        return ghost(buf) == nil
      end)
      I.type("<Tab>", I.at(col + 1)) -- nothing shown: a Tab
      out.manual.line = vim.api.nvim_get_current_line()
      I.sleep(600)
      out.manual.requests = #rec.requests
    end)
    vim.api.nvim_buf_set_lines(buf, row, row + 1, false, { sc.FILL_SUM_TEXT_LINE })
    -- :StarChatComplete from Normal mode starts Insert mode at the cursor and asks
    vim.api.nvim_win_set_cursor(0, { row + 1, col })
    local asked_before_command = #rec.requests
    in_insert(":StarChatComplete<CR>", function(I)
      I.wait(60000, function()
        return ghost(buf) ~= nil
      end, "the ghost text of :StarChatComplete")
      out.command = { ghost = ghost(buf), asked = rec.requests[#rec.requests].params.context, mode = mode() }
      out.command.requests = #rec.requests - asked_before_command
    end)
  end, function(out)
    setup_with({})
    out.restored = vim.fn.maparg("<Tab>", "i", false, true).desc or vim.NIL
  end)
end

-- :StarChatCompletion off: typing asks for nothing; :StarChatCompletion (toggled) on again: the
-- ghost text shows, and turned off from Insert mode it goes at once; vim.b.starchat_completion =
-- false turns it off in that buffer only, where <M-\> still asks.
function steps.completion_toggle()
  local row, col = sc.FILL_SUM_CURSOR_LINE, sc.FILL_SUM_CURSOR_CHARACTER
  return with_fill("toggle.py", sc.FILL_SUM_TEXT, function(buf, _, rec, out)
    local function typing() -- Insert mode at the cursor, "v" typed: how many requests
      local before = #rec.requests
      type_v_at(row, col)
      vim.api.nvim_buf_set_lines(buf, row, row + 1, false, { sc.FILL_SUM_TEXT_LINE })
      return #rec.requests - before
    end
    local notes = #results.notifications
    local status_events = 0
    local counting = vim.api.nvim_create_autocmd("User", {
      pattern = "StarChatStatus",
      callback = function()
        status_events = status_events + 1
      end,
    })
    vim.cmd("StarChatCompletion off")
    vim.wait(200, function()
      return status_events > 0
    end)
    vim.api.nvim_del_autocmd(counting)
    out.off = { status = starchat.status(buf), status_events = status_events, code_status = starchat.status(code_buf) }
    out.off.requests, out.off.told = typing(), messages_since(notes)
    notes = #results.notifications
    vim.cmd("StarChatCompletion")
    out.on = { told = messages_since(notes), status = starchat.status(buf) }
    vim.api.nvim_win_set_cursor(0, { row + 1, col })
    in_insert("i", function(I)
      I.wait(60000, function()
        return ghost(buf) ~= nil
      end, "the ghost text, toggled on")
      out.on.ghost = ghost(buf)
      I.type("<Cmd>StarChatCompletion off<CR>", function()
        return ghost(buf) == nil
      end)
      out.on.gone_in_insert = ghost(buf) == nil and mode() == "i"
    end)
    vim.cmd("StarChatCompletion on")
    vim.b[buf].starchat_completion = false
    out.buffer = { status = starchat.status(buf), code_status = starchat.status(code_buf) }
    out.buffer.requests = typing()
    vim.api.nvim_win_set_cursor(0, { row + 1, col })
    in_insert("i", function(I)
      I.type("<M-\\>")
      I.wait(60000, function()
        return ghost(buf) ~= nil
      end, "the ghost text asked for")
      out.buffer.asked = ghost(buf)
    end)
    out.buffer.asked_context = rec.requests[#rec.requests].params.context
    notes = #results.notifications
    out.bad_raised = not pcall(vim.cmd, "StarChatCompletion maybe") -- an error, as for any command
    out.bad = messages_since(notes)
  end, function(out)
    vim.cmd("StarChatCompletion on")
    out.auto_after = require("starchat.config").options.completion.auto
  end)
end

--- The recorded messages (record_sent) as "method [file name]", and those about a file named as
--- in `names` or holding one of `markers` (with the start of their JSON).
local function sent_about(sent, names, markers)
  local methods, leaked = {}, {}
  for _, m in ipairs(sent) do
    local name = m.uri and (m.uri:gsub("^.*/", "")) or nil
    table.insert(methods, m.method .. (name and " " .. name or ""))
    local found = name ~= nil and vim.tbl_contains(names, name)
    for _, marker in ipairs(markers) do
      found = found or m.json:find(marker, 1, true) ~= nil
    end
    if found then
      table.insert(leaked, m.method .. " " .. (m.uri or "") .. " " .. m.json:sub(1, 200))
    end
  end
  return methods, leaked
end

-- Files attached to the chat (:StarChatAddFile, like Copilot Chat's "#file"): a .env is refused
-- and nothing of it is sent; shapes.py, not loaded, is loaded and opened on the server, and every
-- starchat/chat request of the conversation names it in `references`: the trained answers that
-- need shapes.py in the prompt come back, about no selection (in the chat) and about area()
-- (:'<,'>StarChat). :StarChatDropFile empties the list; a file wiped out leaves it with a warning.
--- An Ex command as the user gives it: the screen is redrawn afterwards (so that two commands'
--- messages do not pile up into a hit-enter prompt, as they would in one go).
local function command(cmdline)
  vim.cmd(cmdline)
  vim.cmd("redraw")
end

function steps.chat_files()
  chat.clear()
  vim.api.nvim_set_current_win(code_win)
  vim.cmd("buffer " .. code_buf)
  vim.cmd("silent edit!")
  local shapes_path = conf.workspace .. "/shapes.py"
  local c = client()
  local sent, stop = record_sent(c)
  local out = { loaded_before = vim.fn.bufloaded(shapes_path) == 1 }
  local function winbar()
    local _, win = chat.open()
    return vim.api.nvim_eval_statusline(vim.wo[win].winbar, { winid = win, use_winbar = true }).str
  end
  local ok, err = pcall(function()
    command("StarChatAddFile .env")
    out.secret = { files = chat.file_names(), buffer = vim.fn.bufexists(conf.secret_file) == 1 }
    command("StarChatAddFile shapes.py")
    local shapes = vim.fn.bufnr(shapes_path)
    local attached = lsp.clients(shapes)[1]
    out.added = {
      files = chat.file_names(),
      loaded = vim.api.nvim_buf_is_loaded(shapes),
      attached = attached ~= nil and attached.id == c.id,
      winbar = winbar(),
    }
    -- about no selection, in the chat
    command("StarChatChat " .. sc.RING_QUESTION)
    local ring = chat.current or last_turn()
    wait_turn(ring)
    out.ring = { answer = ring.answer, references = ring.references, seen = ring.seen }
    shot("chat-files-ring")
    -- about area()'s lines: :'<,'>StarChat with a question
    select_lines(sc.AREA_FIRST_LINE, sc.AREA_LAST_LINE)
    command("'<,'>StarChat " .. sc.CALLERS_QUESTION)
    local callers = chat.current or last_turn()
    wait_turn(callers)
    out.callers = { answer = callers.answer, kind = callers.kind, pieces = callers.pieces, references = callers.references,
      seen = callers.seen }
    out.chat_text = buf_text(chat.buf)
    -- what each answer saw, as shown beside its "## StarChat"
    out.seen_partial = chat.seen_text({
      shown = { { uri = vim.uri_from_bufnr(code_buf), range = { start = { line = 2, character = 0 }, ["end"] = { line = 5, character = 0 } } } },
      historyDropped = 2,
    })
    out.code_lines = vim.api.nvim_buf_line_count(code_buf)
    out.seen_marks = {}
    local seen_ns = vim.api.nvim_get_namespaces().starchat_chat_seen
    for _, mark in ipairs(vim.api.nvim_buf_get_extmarks(chat.buf, seen_ns, 0, -1, { details = true })) do
      local line = vim.api.nvim_buf_get_lines(chat.buf, mark[2], mark[2] + 1, false)[1]
      table.insert(out.seen_marks, { line = line, text = mark[4].virt_text[1][1] })
    end
    shot("chat-files-callers")
    -- a follow-up names it too (a short answer: the model was not trained for it)
    require("starchat.config").options.chat.max_new_tokens = 4
    local follow = chat.send(sc.CHAT_FOLLOW_UP)
    wait_turn(follow)
    require("starchat.config").options.chat.max_new_tokens = nil
    out.follow_up = { references = follow.references, done = follow.done == true }
    -- the current buffer (no argument), completion, then :StarChatDropFile by name and all
    vim.api.nvim_set_current_win(code_win)
    command("StarChatAddFile")
    out.both = chat.file_names()
    out.completion = vim.fn.getcompletion("StarChatDropFile ", "cmdline")
    command("StarChatDropFile calc.py")
    out.after_drop_one = chat.file_names()
    command("StarChatDropFile")
    local function state(buf)
      return { exists = vim.fn.bufexists(buf) == 1, loaded = vim.api.nvim_buf_is_loaded(buf), listed = vim.fn.buflisted(buf) == 1 }
    end
    -- shapes.py had no buffer before it was attached: gone again; calc.py, open in a window, stays
    out.after_drop_all = { files = chat.file_names(), winbar = winbar(), shapes = state(vim.fn.bufnr(shapes_path)),
      calc = state(code_buf) }
    -- attached again and shown in a window, which makes it the user's: dropped, it stays loaded
    command("StarChatAddFile shapes.py")
    shapes = vim.fn.bufnr(shapes_path)
    vim.cmd("split")
    vim.cmd("buffer " .. shapes)
    vim.cmd("close")
    command("StarChatDropFile shapes.py")
    out.shown_then_dropped = state(shapes)
    -- attached again, then wiped out: it leaves the chat, with a warning, and is not sent
    command("StarChatAddFile shapes.py")
    out.again = chat.file_names()
    command("bwipeout " .. shapes)
    vim.wait(1000, function()
      return #chat.files == 0
    end, 10)
    vim.cmd("redraw")
    out.wiped = chat.file_names()
    require("starchat.config").options.chat.max_new_tokens = 4
    local after = chat.send(sc.CHAT_QUESTION)
    wait_turn(after)
    require("starchat.config").options.chat.max_new_tokens = nil
    out.after_wipe = { references = after.references, done = after.done == true }
    -- a new conversation starts without files
    command("StarChatAddFile shapes.py")
    command("StarChatClear")
    out.cleared = chat.file_names()
    out.cleared_shapes = state(vim.fn.bufnr(shapes_path))
  end)
  stop()
  require("starchat.config").options.chat.max_new_tokens = nil
  vim.api.nvim_set_current_win(code_win)
  vim.cmd("buffer " .. code_buf)
  vim.cmd("silent edit!")
  local shapes = vim.fn.bufnr(shapes_path)
  if shapes ~= -1 then
    pcall(vim.cmd, "bwipeout " .. shapes)
  end
  if not ok then
    error(err)
  end
  out.methods, out.leaked = sent_about(sent, { ".env" }, { conf.secret_marker })
  out.requests = {}
  for _, m in ipairs(sent) do
    if m.method == "starchat/chat" then
      local names = vim.tbl_map(function(r)
        return (r.textDocument.uri:gsub("^.*/", ""))
      end, vim.json.decode(m.json).references or {})
      table.insert(out.requests, names)
    end
  end
  out.notes = vim.tbl_map(function(n)
    return { msg = n.msg, level = n.level }
  end, notifications_of("chat_files"))
  return out
end

-- :StarChatFix where Neovim shows a diagnostic: the server is told about it, and the model's
-- answer is the one trained for the prompt with that problem.
function steps.fix_with_problems()
  vim.api.nvim_set_current_win(code_win)
  vim.cmd("silent edit!") -- calc.py as on disk
  local ns = vim.api.nvim_create_namespace("starchat-test-problems")
  vim.diagnostic.set(ns, code_buf, {
    { lnum = 4, col = 4, end_col = 40, message = "average([2, 4]) returned 4, expected 3", source = "pytest", severity = vim.diagnostic.severity.ERROR },
  })
  local c = client()
  local sent, stop = record_sent(c)
  local done, answer
  select_lines(4, 5)
  vim.cmd("normal! \27")
  require("starchat").run_task("fix", { range = 2, line1 = 4, line2 = 5 }, function(err, result)
    done, answer = true, result and result.text or (err and err.message)
  end)
  wait(60000, function()
    return done
  end, "the fix with the problem")
  stop()
  vim.diagnostic.reset(ns, code_buf)
  local request
  for _, m in ipairs(sent) do
    if m.method == "workspace/executeCommand" then
      request = vim.json.decode(m.json)
    end
  end
  local after = buf_text(code_buf)
  vim.cmd("silent edit!")
  return { answer = answer, args = request and request.arguments[1] or vim.NIL, after = after }
end

-- A file that looks like secrets (.env) never reaches the server: the client is not attached to
-- it (even with a filetype the plugin starts for), so neither its text nor its changes are sent;
-- :StarChatFix there says why nothing happens; the chat from it goes to the running server,
-- without the file. Every message the client sends meanwhile is recorded (its rpc).
function steps.secrets()
  local sent, stop_recording = record_sent(client())
  local ok, res = pcall(function()
    vim.api.nvim_set_current_win(code_win)
    vim.cmd.edit(conf.secret_file)
    local buf = vim.api.nvim_get_current_buf()
    vim.bo[buf].filetype = "python" -- a filetype the plugin starts for (FileType)
    vim.api.nvim_buf_set_lines(buf, -1, -1, false, { conf.secret_typed })
    vim.cmd("silent write")
    vim.wait(300, function()
      return false
    end)
    local attached = #lsp.clients(buf)
    vim.cmd("StarChatFix")
    chat.clear()
    local turn = chat.send(sc.CHAT_QUESTION)
    assert(turn, "no chat turn started from the .env buffer")
    wait_turn(turn)
    vim.api.nvim_set_current_win(code_win)
    vim.cmd("buffer " .. code_buf)
    vim.cmd("bwipeout " .. buf)
    return { attached = attached, answer = turn.answer, turn_error = turn.error }
  end)
  stop_recording()
  if not ok then
    error(res)
  end
  res.methods, res.leaked = sent_about(sent, { ".env" }, { conf.secret_marker, conf.secret_typed })
  res.notifications = notifications_of("secrets")
  return res
end

-- An attached buffer renamed to a secret-looking name: Neovim itself would send it under its new
-- name (didChange at once; on the next write didClose, then didOpen with the whole text). The
-- client is detached before the rename instead (didClose under the old name): neither its text
-- (it holds a marker from the disk, sent while its name was harmless) nor what is typed there
-- afterwards, nor its new name reach the server, through :file and through :saveas. Renamed back
-- to a normal name without a change, it is attached again and its changes are sent; renamed back
-- after a change, it is not (Neovim no longer tracks its changes then) and the user is told. A
-- secret-looking file (never attached) saved under a normal name is attached then.
function steps.rename_secret()
  local dir = conf.workspace .. "/keys"
  vim.fn.mkdir(dir, "p")
  local marker, typed = conf.rename_marker, conf.rename_typed
  vim.api.nvim_set_current_win(code_win)
  local function open(name, lines)
    local file = dir .. "/" .. name
    vim.fn.writefile(lines or { "# " .. marker, "x = 1" }, file)
    vim.cmd.edit(vim.fn.fnameescape(file))
    local buf = vim.api.nvim_get_current_buf()
    wait(10000, function()
      return lsp.clients(buf)[1] ~= nil
    end, "the server to attach to " .. name)
    return buf
  end
  local function type_line(text) -- typed in the current window, as a user does
    vim.api.nvim_feedkeys(vim.keycode("Go" .. text .. "<Esc>"), "nx", false)
  end
  local a, b, c3 = open("a.py"), open("b.py"), open("c.py", { "x = 1" })
  local sent, stop_recording = record_sent(client())
  local out, extra = {}, {}
  local ok, err = pcall(function()
    -- :file .env, type, :write
    vim.cmd("buffer " .. a)
    vim.cmd("file " .. vim.fn.fnameescape(dir .. "/.env"))
    type_line(typed .. "-file")
    vim.cmd("silent write")
    -- :saveas id_rsa, type, :write
    vim.cmd("buffer " .. b)
    vim.cmd("silent saveas " .. vim.fn.fnameescape(dir .. "/id_rsa"))
    type_line(typed .. "-saveas")
    vim.cmd("silent write")
    vim.wait(400, function() -- longer than Neovim's didChange debounce (150 ms)
      return false
    end)
    out.attached = { file = #lsp.clients(a), saveas = #lsp.clients(b) }
    -- renamed away and back without a change: attached again, its changes go under the new name
    vim.cmd("buffer " .. c3)
    vim.cmd("file " .. vim.fn.fnameescape(dir .. "/credentials.json"))
    out.away = #lsp.clients(c3)
    vim.cmd("file " .. vim.fn.fnameescape(dir .. "/c2.py"))
    out.back = #lsp.clients(c3)
    type_line("RESUMED = 1")
    out.resumed = vim.wait(5000, function()
      for _, m in ipairs(sent) do
        if m.method == "textDocument/didChange" and vim.endswith(m.uri or "", "/keys/c2.py") then
          return true
        end
      end
      return false
    end, 20)
    -- renamed back after a change: not attached; the user is told why
    vim.cmd("buffer " .. a)
    vim.cmd("file " .. vim.fn.fnameescape(dir .. "/a2.py"))
    out.lost = #lsp.clients(a)
    -- a secret-looking file (never attached) saved under a normal name: attached then
    vim.cmd.edit(vim.fn.fnameescape(dir .. "/token.pem"))
    vim.bo.filetype = "python"
    out.pem = #lsp.clients(0)
    vim.cmd("silent saveas " .. vim.fn.fnameescape(dir .. "/token.py"))
    out.pem_saved_as_py = vim.wait(10000, function()
      return lsp.clients(0)[1] ~= nil
    end, 20)
    table.insert(extra, vim.api.nvim_get_current_buf())
  end)
  stop_recording()
  vim.api.nvim_set_current_win(code_win)
  vim.cmd("buffer " .. code_buf)
  for _, buf in ipairs(vim.list_extend({ a, b, c3 }, extra)) do
    pcall(vim.cmd, "bwipeout! " .. buf)
  end
  if not ok then
    error(err)
  end
  out.methods, out.leaked = sent_about(sent, { ".env", "id_rsa", "credentials.json", "token.pem" }, { marker, typed })
  out.notifications = notifications_of("rename_secret")
  return out
end

-- An unnamed buffer is not sent to the server: Neovim would send every one as "file://", and the
-- server's edit for that URI would go to a buffer for the folder "/". Commands there say to write
-- it to a file first; once written to one it is attached, and :StarChatFix changes it.
function steps.unnamed()
  vim.api.nvim_set_current_win(code_win)
  vim.cmd("enew")
  local buf = vim.api.nvim_get_current_buf()
  local out = {}
  local ok, err = pcall(function()
    vim.bo[buf].filetype = "python" -- FileType: a filetype the plugin starts for
    local text = sc.CALC_PY:gsub("\n$", "")
    vim.api.nvim_buf_set_lines(buf, 0, -1, false, vim.split(text, "\n", { plain = true }))
    vim.wait(300, function()
      return false
    end)
    out.attached = #lsp.clients(buf)
    local before = buf_text(buf)
    select_lines(4, 5)
    vim.cmd([['<,'>StarChatFix]])
    vim.wait(3000, function() -- an edit would have come by now (a Fix takes well under a second)
      return buf_text(buf) ~= before or (#lsp.running() == 0 and #notifications_of("unnamed") > 0)
    end, 50)
    out.unchanged = buf_text(buf) == before
    out.root_buffer = vim.fn.bufexists("/") == 1 -- where an edit for "file://" goes
    out.told = vim.tbl_map(function(n)
      return n.msg
    end, notifications_of("unnamed"))
    -- written to a file: attached, and the Fix works (calc.py in a folder of its own: the path
    -- in the prompt is then the one the test model knows)
    local file = vim.fs.dirname(conf.workspace) .. "/unnamed/calc.py"
    vim.fn.mkdir(vim.fs.dirname(file), "p")
    vim.cmd("silent write " .. vim.fn.fnameescape(file))
    out.written_attached = vim.wait(10000, function()
      return lsp.clients(buf)[1] ~= nil
    end, 20)
    select_lines(4, 5)
    vim.cmd([['<,'>StarChatFix]])
    wait(60000, function()
      return buf_text(buf) ~= before
    end, "the fix in the written buffer")
    out.after = buf_text(buf)
  end)
  vim.api.nvim_set_current_win(code_win)
  vim.cmd("buffer " .. code_buf)
  pcall(vim.cmd, "bwipeout! " .. buf)
  if vim.fn.bufexists("/") == 1 then
    pcall(vim.cmd, "bwipeout! /")
  end
  if not ok then
    error(err)
  end
  return out
end

-- Code actions run the server's commands through the plugin: "StarChat: Explain" answers in the
-- chat (the client declares showsAnswers, so the server shows the answer nowhere else, and Neovim
-- drops a command's result); "StarChat: Fix" applies the fix, and :StarChatStop stops it.
function steps.code_action_commands()
  chat.clear()
  local orig_select = vim.ui.select
  local pick
  vim.ui.select = function(items, _, on_choice)
    for i, item in ipairs(items) do
      if item.action and item.action.title == pick then
        return on_choice(item, i)
      end
    end
    on_choice(nil)
  end
  local out = {}
  local function code_action(title)
    pick = title
    vim.api.nvim_set_current_win(code_win)
    -- lines 4-5 with their line breaks, as :'<,'>StarChatExplain takes them (the tiny test model
    -- answers as trained only for that text): up to the start of line 6, exclusive
    local selection = vim.o.selection
    vim.o.selection = "exclusive"
    local ok, err = pcall(vim.lsp.buf.code_action, { range = { start = { 4, 0 }, ["end"] = { 6, 0 } } })
    vim.o.selection = selection
    assert(ok, err)
  end
  local ok, err = pcall(function()
    vim.api.nvim_set_current_win(code_win)
    vim.cmd("silent edit!")
    code_action("StarChat: Explain")
    local started = vim.wait(10000, function()
      return chat.current ~= nil or #chat.turns > 0
    end, 20)
    if started then
      wait_turn(chat.current or last_turn())
      out.explain = { kind = last_turn().kind, answer = last_turn().answer }
    else
      out.explain = { statuses = results.statuses[#results.statuses] }
    end
    -- Fix from the code action, to the end
    local before = buf_text(code_buf)
    code_action("StarChat: Fix")
    out.fixed = vim.wait(60000, function()
      return buf_text(code_buf) ~= before
    end, 20) and buf_text(code_buf) or nil
    wait(10000, function() -- the server answers the request after its edit was applied
      return #lsp.running() == 0
    end, "the Fix request to end")
    vim.cmd("silent edit!")
    -- and stopped with :StarChatStop
    code_action("StarChat: Fix")
    out.running = vim.wait(10000, function()
      return #lsp.running() > 0
    end, 5)
    local c = client()
    local req = lsp.running()[1]
    vim.cmd("StarChatStop")
    out.acked = vim.wait(10000, function()
      return req ~= nil and req.id ~= nil and c.requests[req.id] == nil
    end, 10)
    vim.wait(1000, function()
      return false
    end)
    out.unchanged = buf_text(code_buf) == before
    out.ready = vim.wait(10000, function()
      return lsp.state.state == "ready"
    end, 20)
  end)
  vim.ui.select = orig_select
  vim.cmd("silent edit!")
  if not ok then
    error(err)
  end
  out.notifications = notifications_of("code_action_commands")
  return out
end

-- :StarChatRestart while the user types in a file: the new server's copy of the file (its didOpen
-- and the didChanges after it, replayed here) is the buffer's text, edits made while the old
-- server stopped and the new one started included.
function steps.restart_typing()
  vim.api.nvim_set_current_win(code_win)
  local uri = vim.uri_from_bufnr(code_buf)
  local sent = {}
  local real_start = vim.lsp.rpc.start
  vim.lsp.rpc.start = function(...)
    local rpc = real_start(...)
    local notify = rpc.notify
    rpc.notify = function(method, params, ...)
      if method:find("^textDocument/did") and params.textDocument.uri == uri then
        table.insert(sent, { method = method, params = vim.deepcopy(params) })
      end
      return notify(method, params, ...)
    end
    return rpc
  end
  local old = client()
  local lines = vim.api.nvim_buf_line_count(code_buf)
  local restarted
  local ok, err = pcall(function()
    starchat.restart(function(id)
      restarted = id
    end)
    for i = 1, 40 do -- typing, one line every 20 ms, until the new server is up and after
      vim.api.nvim_buf_set_lines(code_buf, -1, -1, false, { "# typed " .. i })
      vim.wait(20, function()
        return false
      end)
      if i == 20 then
        wait(60000, function()
          return restarted ~= nil and client() ~= nil and client().initialized
        end, "the new server")
      end
    end
  end)
  vim.lsp.rpc.start = real_start
  assert(ok, err)
  vim.wait(300, function()
    return false
  end)
  local function offset(text, pos)
    local at = 1
    for _ = 1, pos.line do
      at = text:find("\n", at, true) + 1
    end
    return at + pos.character
  end
  local text, in_open
  for _, m in ipairs(sent) do
    if m.method == "textDocument/didOpen" then
      text = m.params.textDocument.text
      in_open = select(2, text:gsub("# typed", ""))
    elseif m.method == "textDocument/didChange" and text then
      for _, change in ipairs(m.params.contentChanges) do
        if change.range then
          text = text:sub(1, offset(text, change.range.start) - 1) .. change.text .. text:sub(offset(text, change.range["end"]))
        else
          text = change.text
        end
      end
    end
  end
  local out = {
    new_client = client() ~= nil and client().id ~= old.id and client().id == restarted,
    opened = #vim.tbl_filter(function(m)
      return m.method == "textDocument/didOpen"
    end, sent),
    changes = #sent,
    same = text == buf_text(code_buf),
    typed = select(2, (text or ""):gsub("# typed", "")),
    typed_before_open = in_open,
  }
  vim.api.nvim_buf_set_lines(code_buf, lines, -1, false, {})
  wait(60000, function()
    return lsp.state.state == "ready"
  end, "the new server's model")
  return out
end

-- :checkhealth starchat
function steps.health()
  local tabs = #vim.api.nvim_list_tabpages()
  vim.cmd("checkhealth starchat")
  local text = buf_text(vim.api.nvim_get_current_buf())
  shot("checkhealth")
  if #vim.api.nvim_list_tabpages() > tabs then
    vim.cmd("tabclose")
  elseif vim.api.nvim_get_current_win() ~= code_win then
    vim.api.nvim_win_close(0, true)
  end
  vim.api.nvim_set_current_win(code_win)
  -- a function as cmd (vim.lsp.rpc.connect() for a TCP server) does not break it
  local config = require("starchat.config")
  local cmd = config.options.cmd
  config.options.cmd = function() end
  local ok, err = pcall(require("starchat.health").check)
  config.options.cmd = cmd
  return { text = text, function_cmd = ok and "ok" or tostring(err) }
end

-- The server dies mid-answer (as when the out-of-memory killer sends SIGKILL): the chat turn
-- ends with an error instead of "thinking" for ever, the user is told, and the next command
-- starts the server again and waits for it (a request sent before `initialize` is answered
-- would reach the server before the document is opened there).
function steps.crash()
  vim.api.nvim_set_current_win(code_win)
  vim.cmd("silent edit!")
  chat.clear()
  require("starchat.config").options.chat.max_new_tokens = 1500
  local turn = chat.send(sc.LONG_QUESTION)
  assert(turn, "no turn started")
  wait(60000, function()
    return turn.pieces >= 3
  end, "the long answer to stream")
  local old = client()
  local pid
  for _, child in ipairs(vim.api.nvim_get_proc_children(vim.fn.getpid())) do
    local info = vim.api.nvim_get_proc(child)
    if info and info.name and info.name:find("python") then
      pid = child
    end
  end
  assert(pid, "server process not found")
  vim.uv.kill(pid, "sigkill")
  local ended = vim.wait(10000, function()
    return chat.current == nil
  end, 20)
  wait(10000, function()
    return #lsp.clients() == 0 and vim.lsp.get_client_by_id(old.id) == nil
  end, "the client to go")
  require("starchat.config").options.chat.max_new_tokens = nil
  local out = {
    ended = ended,
    turn_error = turn.error,
    chat_text = buf_text(chat.buf),
    status = starchat.status(),
  }
  shot("server-killed")
  -- the next command starts the server again; the request waits for it to be ready
  chat.clear()
  select_lines(4, 5)
  vim.cmd([['<,'>StarChatExplain]])
  local t = chat.current or last_turn()
  assert(t, "no explain turn")
  wait_turn(t, 120000)
  local c = client()
  out.restarted = c ~= nil and c.id ~= old.id
  out.explain = { answer = t.answer, turn_error = t.error }
  out.context = chat.context and chat.context.range
  out.notifications = notifications_of("crash")
  return out
end

-- A server that never answers `initialize` (a hung start): :StarChatRestart stops it and starts
-- a new one; setup() with another `cmd` replaces it too.
function steps.hung_start()
  local function sleepers()
    local pids = {}
    for _, child in ipairs(vim.api.nvim_get_proc_children(vim.fn.getpid())) do
      local info = vim.api.nvim_get_proc(child)
      if info and info.name == "sleep" then
        table.insert(pids, child)
      end
    end
    return pids
  end
  vim.api.nvim_set_current_win(code_win)
  vim.cmd("buffer " .. code_buf)
  starchat.setup(vim.tbl_extend("force", setup_opts, { cmd = { "sleep", "600" } }))
  wait(10000, function()
    return #sleepers() == 1
  end, "the hung server to start")
  local first = sleepers()[1]
  vim.cmd("StarChatRestart")
  wait(15000, function()
    local now = sleepers()
    return #now == 1 and now[1] ~= first
  end, "a new server after :StarChatRestart")
  local out = { restarted = true }
  starchat.setup(setup_opts)
  wait(15000, function()
    return #sleepers() == 0
  end, "the hung server to go after setup() with the real command")
  wait(120000, function()
    return client() ~= nil and client().initialized and lsp.state.state == "ready"
  end, "the real server again")
  out.replaced = true
  return out
end

for _, name in ipairs(conf.steps) do
  current_step = name
  local started = vim.uv.hrtime()
  local ok, res = pcall(steps[name])
  results.steps[name] = ok and res or { error = tostring(res) }
  results.steps[name].seconds = (vim.uv.hrtime() - started) / 1e9
  save()
end

for _, c in ipairs(lsp.clients()) do
  lsp.call(c, "stop")
end
vim.wait(3000, function()
  return #lsp.clients() == 0
end, 50)
results.messages = vim.fn.execute("messages")
results.done = true
save()
