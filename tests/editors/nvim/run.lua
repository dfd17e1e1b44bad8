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
local real_notify = vim.notify
vim.notify = function(msg, level, o)
  table.insert(results.notifications, { msg = tostring(msg), level = level or vim.log.levels.INFO })
  last_message = tostring(msg):gsub("\n.*", "")
  return real_notify(msg, level, o)
end

vim.api.nvim_create_autocmd("User", {
  pattern = "StarChatStatus",
  callback = function()
    local s = require("starchat").status()
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

starchat.setup({ cmd = conf.server_cmd, filetypes = { "python" }, temperature = 0, chat = { size = 44 } })

vim.cmd.cd(conf.workspace)
vim.cmd.edit(conf.workspace .. "/calc.py")
local code_buf = vim.api.nvim_get_current_buf()
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
  return {
    in_chat_window = in_chat,
    answer = turn.answer,
    pieces = turn.pieces,
    finish = turn.finish,
    mid = mid,
    follow_up = follow.answer,
    history = chat.history,
    chat_text = buf_text(chat.buf),
  }
end

function steps.cancel()
  chat.clear()
  require("starchat.config").options.chat.max_new_tokens = 1500
  vim.cmd("StarChatChat")
  vim.api.nvim_feedkeys(vim.keycode("GA" .. sc.LONG_QUESTION .. "<Esc><CR>"), "mx", false)
  local turn = chat.current
  assert(turn, "no turn started")
  wait(60000, function()
    return turn.pieces >= 8
  end, "the long answer to stream")
  -- <C-c> at once: the whole answer can take well under a second (the streaming itself is in
  -- the chat-streaming screenshot)
  local c = turn.client
  vim.api.nvim_set_current_win(vim.fn.win_findbuf(chat.buf)[1])
  vim.api.nvim_feedkeys(vim.keycode("<C-c>"), "mx", false)
  local at_cancel = { text = buf_text(chat.buf), pieces = turn.pieces }
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
  require("starchat.config").options.chat.max_new_tokens = nil
  return {
    cancelled = turn.cancelled == true,
    pieces_at_cancel = at_cancel.pieces,
    text_at_cancel = at_cancel.text,
    text_after = buf_text(chat.buf),
    acked = acked,
    late_at_ack = late_at_ack,
    late_after = late_after,
    ready_after = ready,
    answer = turn.answer,
    history = chat.history,
  }
end

function steps.tasks()
  chat.clear()
  -- Explain: the answer goes to the chat buffer
  select_lines(4, 5)
  vim.cmd([['<,'>StarChatExplain]])
  local turn = chat.current or last_turn()
  wait_turn(turn)
  shot("explain-answer")
  local explain = { answer = turn.answer, kind = turn.kind }
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
  return { explain = explain, tests_text = tests_text, documented = documented, reverted = buf_text(code_buf) }
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

for _, name in ipairs(conf.steps) do
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
