--- The chat buffer: a markdown scratch buffer in a split. "## You" sections are the user's turns
--- (the last one is where you type), "## StarChat" sections the answers, streamed as they come.
local lsp = require("starchat.lsp")
local config = require("starchat.config")
local range_util = require("starchat.range")

local M = {
  buf = nil,
  history = {}, -- {role = "user" | "assistant", content = string}
  context = nil, -- {bufnr, uri, range, label}: the selection the conversation is about
  files = {}, -- {bufnr, name, ours}: other files attached to the conversation (sent as `references`)
  current = nil, -- the turn being answered
  turns = {}, -- finished turns, for inspection: {kind, question, answer, pieces, finish, ...}
}

local USER = "## You"
local BOT = "## StarChat"
local ns = vim.api.nvim_create_namespace("starchat_chat")
local hint_ns = vim.api.nvim_create_namespace("starchat_chat_hint")
local seen_ns = vim.api.nvim_create_namespace("starchat_chat_seen")
local turn_ns = vim.api.nvim_create_namespace("starchat_chat_turns") -- each turn's first line

--- At most this many files attached to a conversation (the server's limit).
M.MAX_FILES = 16

--- How a file attached to the chat is named to the user: its path relative to the current
--- directory (or the home folder).
local function file_label(buf)
  return vim.fn.fnamemodify(vim.api.nvim_buf_get_name(buf), ":~:.")
end

--- The names of the files attached to the conversation, in the order they were attached.
function M.file_names()
  return vim.tbl_map(function(entry)
    return vim.api.nvim_buf_is_valid(entry.bufnr) and file_label(entry.bufnr) or entry.name
  end, M.files)
end

--- The chat window's winbar: what the server is doing, without the "StarChat: " prefix, then
--- the files attached to the conversation.
function M.winbar()
  local status = (lsp.status():gsub("^StarChat: ", ""))
  local names = M.file_names()
  if #names == 0 then
    return status
  end
  local files = "files: " .. table.concat(names, ", ")
  return status == "" and files or (status .. " · " .. files)
end

--- False while the chat buffer is unloaded (:bdelete, :bunload) and about to be forgotten (see
--- create()): writing to it then would load it again.
local function loaded()
  return M.buf ~= nil and vim.api.nvim_buf_is_loaded(M.buf)
end

--- Key hints beside the last "## You" (the input section).
local function hint()
  if not loaded() then
    return
  end
  vim.api.nvim_buf_clear_namespace(M.buf, hint_ns, 0, -1)
  local lines = vim.api.nvim_buf_get_lines(M.buf, 0, -1, false)
  for i = #lines, 1, -1 do
    if vim.startswith(lines[i], USER) then
      vim.api.nvim_buf_set_extmark(M.buf, hint_ns, i - 1, 0, {
        virt_text = { { "  type below · <CR> send · <C-c> stop · gy yank code · ga apply it", "Comment" } },
        virt_text_pos = "eol",
      })
      return
    end
  end
end

local function valid(buf)
  return buf and vim.api.nvim_buf_is_valid(buf)
end

--- Writes by the plugin: not undoable (`u` undoes what the user typed, never a heading or an
--- answer; 'undolevels' -1 for a change clears the undo history).
local function unrecorded(buf, fn)
  local levels = vim.bo[buf].undolevels
  vim.bo[buf].undolevels = -1
  local ok, err = pcall(fn, buf)
  vim.bo[buf].undolevels = levels
  if not ok then
    error(err)
  end
end

local function with_modifiable(fn)
  if not loaded() then
    return
  end
  local buf = M.buf
  vim.bo[buf].modifiable = true
  local ok, err = pcall(unrecorded, buf, fn)
  vim.bo[buf].modifiable = M.current == nil
  if not ok then
    error(err)
  end
end

local function windows()
  return vim.fn.win_findbuf(M.buf or -1)
end

--- Keep windows that show the end of the chat following the text.
local function follow(force)
  local last = vim.api.nvim_buf_line_count(M.buf)
  for _, win in ipairs(windows()) do
    local row = vim.api.nvim_win_get_cursor(win)[1]
    if force or win ~= vim.api.nvim_get_current_win() or row >= last - 2 then
      pcall(vim.api.nvim_win_set_cursor, win, { last, 0 })
    end
  end
end

local function set_thinking(on)
  if not loaded() then
    return
  end
  vim.api.nvim_buf_clear_namespace(M.buf, ns, 0, -1)
  if on then
    local last = vim.api.nvim_buf_line_count(M.buf) - 1
    vim.api.nvim_buf_set_extmark(M.buf, ns, last, 0, {
      virt_text = { { "… thinking (<C-c> stops)", "Comment" } },
      virt_text_pos = "eol",
    })
  end
end

--- The lines of a text, "\r\n" taken as a line break.
local function lines_of(text)
  return vim.split((text:gsub("\r\n", "\n")), "\n", { plain = true })
end

local function write_at_end(text)
  with_modifiable(function(buf)
    local last = vim.api.nvim_buf_line_count(buf) - 1
    local line = vim.api.nvim_buf_get_lines(buf, last, last + 1, false)[1]
    vim.api.nvim_buf_set_text(buf, last, #line, last, #line, lines_of(text))
  end)
end

--- Streamed text, the same however it is split into pieces: a "\r" that ends a piece waits for
--- the next one (a "\r\n" split between two); flush() writes it when the answer ends there.
local function append(turn, text)
  text = (turn.cr or "") .. text
  turn.cr = nil
  if text:sub(-1) == "\r" then
    turn.cr, text = "\r", text:sub(1, -2)
  end
  if text ~= "" then
    write_at_end(text)
  end
end

local function flush(turn)
  if turn.cr then
    turn.cr = nil
    write_at_end("\r")
  end
end

local function append_lines(lines)
  with_modifiable(function(buf)
    vim.api.nvim_buf_set_lines(buf, -1, -1, false, lines)
  end)
end

local NAME = "starchat://chat"

--- Stop a turn's request ($/cancelRequest: the server stops decoding); its pieces are dropped.
local function stop_request(turn)
  turn.cancelled = true
  turn.cancelled_at_pieces = turn.pieces
  if turn.token then
    lsp.streams[turn.token] = nil
  end
  lsp.cancel(turn.req)
  turn.id = turn.id or (turn.req and turn.req.id)
end

--- The chat buffer: new, or `buf` made the chat (see M.adopt).
local function create(buf)
  buf = buf or vim.api.nvim_create_buf(false, true)
  vim.bo[buf].buflisted = false
  vim.bo[buf].buftype = "nofile"
  vim.bo[buf].bufhidden = "hide"
  vim.bo[buf].swapfile = false
  -- a chat buffer deleted before (:bdelete, :bwipeout) but not wiped out yet (see below) would
  -- keep the name: the new one would be unnamed
  for _, old in ipairs(vim.api.nvim_list_bufs()) do
    if old ~= buf and vim.api.nvim_buf_get_name(old) == NAME then
      pcall(vim.api.nvim_buf_delete, old, { force = true })
    end
  end
  pcall(vim.api.nvim_buf_set_name, buf, NAME)
  vim.bo[buf].filetype = "markdown"
  unrecorded(buf, function()
    vim.api.nvim_buf_set_lines(buf, 0, -1, false, { USER, "" })
  end)
  M.buf = buf
  hint()
  vim.b[buf].starchat_chat = true -- :bdelete clears it (and the mappings); :edit keeps it
  -- The chat has no file behind it: :edit and :edit! unload the buffer and Neovim would load it
  -- empty. Its text is kept at the unload and put back when Neovim loads it again at once
  -- (BufReadCmd); an answer goes on streaming. Unloaded and not loaded again at once (:bdelete,
  -- :bunload), or wiped out, the chat buffer goes, and its conversation with it.
  local kept
  local function forget()
    if M.buf ~= buf then
      return
    end
    if M.current then -- stop its answer
      local turn = M.current
      M.current = nil
      stop_request(turn)
      table.insert(M.turns, turn)
    end
    M.buf, M.history, M.context = nil, {}, nil -- a new chat buffer starts a new conversation
    M.forget_files()
    vim.schedule(function()
      if vim.api.nvim_buf_is_valid(buf) then
        pcall(vim.api.nvim_buf_delete, buf, { force = true })
      end
    end)
  end
  vim.api.nvim_create_autocmd("BufUnload", {
    buffer = buf,
    callback = function()
      kept = vim.api.nvim_buf_get_lines(buf, 0, -1, false)
      vim.schedule(function()
        if vim.api.nvim_buf_is_valid(buf) and not vim.api.nvim_buf_is_loaded(buf) then
          forget()
        end
      end)
    end,
  })
  vim.api.nvim_create_autocmd("BufReadCmd", {
    buffer = buf,
    callback = function()
      if M.buf ~= buf or not kept or not vim.b[buf].starchat_chat then
        return forget() -- deleted, and shown again before it was wiped out
      end
      with_modifiable(function()
        vim.api.nvim_buf_set_lines(buf, 0, -1, false, kept)
      end)
      vim.bo[buf].modified = false
      vim.bo[buf].buflisted = false -- :edit lists it
      vim.bo[buf].filetype = "markdown" -- FileType again: the unload ended its highlighting
      kept = nil
      hint()
      set_thinking(M.current ~= nil and M.current.pieces == 0)
    end,
  })
  vim.api.nvim_create_autocmd("BufWipeout", { buffer = buf, once = true, callback = forget })
  local map = function(modes, lhs, fn, desc)
    vim.keymap.set(modes, lhs, fn, { buffer = buf, desc = desc, silent = true })
  end
  map("n", "<CR>", function()
    M.submit()
  end, "StarChat: send the message under the last \"## You\"")
  map("i", "<C-s>", function()
    vim.cmd("stopinsert")
    M.submit()
  end, "StarChat: send")
  map({ "n", "i" }, "<C-c>", function()
    if not M.cancel() and vim.fn.mode():match("^[iR]") then
      vim.cmd("stopinsert") -- what <C-c> does in Insert (or Replace) mode, with no answer to stop
    end
  end, "StarChat: stop the answer")
  map("n", "gy", function()
    M.yank()
  end, "StarChat: yank the code block at or above the cursor")
  map("n", "ga", function()
    M.apply()
  end, "StarChat: put the code block at or above the cursor in place of the selection asked about")
  return buf
end

--- A window showing the chat: its options, for the chat buffer in this window only (:setlocal),
--- not for buffers shown there later.
local function style(win)
  local wo = vim.wo[win][0]
  wo.wrap = true
  wo.linebreak = true
  wo.number = false
  wo.relativenumber = false
  wo.winbar = "%#Title# StarChat %* %<%{v:lua.require'starchat.chat'.winbar()}"
end

--- A session restored (:mksession, session plugins) where the chat was on screen shows an empty
--- buffer named "starchat://chat" there, with none of the chat's options or mappings: the chat
--- takes its windows (a new conversation: conversations are not saved in sessions).
function M.adopt()
  for _, buf in ipairs(vim.api.nvim_list_bufs()) do
    if buf ~= M.buf and vim.api.nvim_buf_get_name(buf) == NAME and vim.bo[buf].buftype == "" then
      local wins = vim.fn.win_findbuf(buf)
      if #wins == 0 or valid(M.buf) then
        for _, win in ipairs(wins) do
          vim.api.nvim_win_set_buf(win, M.buf)
        end
        pcall(vim.api.nvim_buf_delete, buf, { force = true })
      else
        create(buf)
      end
      for _, win in ipairs(wins) do
        style(win)
      end
    end
  end
end

--- The chat buffer, shown in a split when it is not on screen. Returns buf, win.
function M.open(opts)
  opts = opts or {}
  if valid(M.buf) and not loaded() then -- :bdelete or :bunload a moment ago: it goes now
    pcall(vim.api.nvim_buf_delete, M.buf, { force = true })
  end
  if not valid(M.buf) then
    M.buf = create()
  end
  local win
  for _, w in ipairs(windows()) do -- a window of this tab page showing the chat
    if vim.api.nvim_win_get_tabpage(w) == vim.api.nvim_get_current_tabpage() then
      win = w
      break
    end
  end
  if not win then
    local from = vim.api.nvim_get_current_win()
    local chat = config.options.chat or {}
    vim.cmd(chat.split or "botright vsplit")
    win = vim.api.nvim_get_current_win()
    vim.api.nvim_win_set_buf(win, M.buf)
    if chat.size then
      if (chat.split or ""):find("vsplit") or (chat.split or ""):find("vert") then
        vim.api.nvim_win_set_width(win, chat.size)
      else
        vim.api.nvim_win_set_height(win, chat.size)
      end
    end
    style(win)
    if not opts.focus then
      vim.api.nvim_set_current_win(from)
    end
  elseif opts.focus then
    vim.api.nvim_set_current_win(win)
  end
  follow(true)
  return M.buf, win
end

--- Replace the input section (after the last "## You") with the user's turn and open an answer.
local function begin_turn(turn, header, text)
  local lines = vim.api.nvim_buf_get_lines(M.buf, 0, -1, false)
  local at = #lines
  for i = #lines, 1, -1 do
    if vim.startswith(lines[i], USER) then
      at = i - 1
      break
    end
  end
  -- a draft under "## You" that is not what is sent (:StarChatExplain, :StarChatChat {msg}) comes
  -- back under the next "## You"
  local draft = vim.list_slice(lines, at + 2)
  local drafted = vim.trim(table.concat(draft, "\n"))
  if drafted ~= "" and drafted ~= vim.trim(text) then
    turn.draft = draft
  end
  local new = { header }
  vim.list_extend(new, vim.split(text, "\n", { plain = true }))
  vim.list_extend(new, { "", BOT, "" })
  with_modifiable(function(buf)
    vim.api.nvim_buf_set_lines(buf, at, -1, false, new)
  end)
  turn.mark = vim.api.nvim_buf_set_extmark(M.buf, turn_ns, at, 0, {})
  vim.api.nvim_buf_clear_namespace(M.buf, hint_ns, 0, -1)
  turn.answer_line = vim.api.nvim_buf_line_count(M.buf) - 1 -- 0-based first line of the answer
  M.current = turn
  vim.bo[M.buf].modifiable = false
  set_thinking(true)
  follow(true)
end

local function end_turn(turn, note)
  if M.current ~= turn then
    return
  end
  flush(turn)
  M.current = nil
  set_thinking(false)
  local tail = {}
  if note then
    local last = vim.api.nvim_buf_get_lines(M.buf, -2, -1, false)[1]
    if last ~= "" then
      table.insert(tail, "")
    end
    table.insert(tail, note)
  end
  vim.list_extend(tail, { "", USER })
  vim.list_extend(tail, turn.draft or { "" })
  append_lines(tail)
  hint()
  vim.bo[M.buf].modifiable = true
  table.insert(M.turns, turn)
  if turn.answer ~= "" then
    table.insert(M.history, { role = "user", content = turn.user_content })
    table.insert(M.history, { role = "assistant", content = turn.answer })
  end
  follow(true)
  pcall(vim.api.nvim_exec_autocmds, "User", { pattern = "StarChatAnswer", modeline = false, data = turn })
end

--- The answer's final text, when it differs from what was streamed (or nothing was).
local function settle(turn, text)
  if text == nil or text == turn.answer then
    return
  end
  with_modifiable(function(buf)
    vim.api.nvim_buf_set_lines(buf, turn.answer_line, -1, false, lines_of(text))
  end)
  turn.answer, turn.cr = text, nil
end

--- What the model saw for an answer (its `shown` and `historyDropped`), for the user: each file's
--- name, with the lines it saw when not all of them ("calc.py (lines 1-40 of 600)"); nil for none.
function M.seen_text(result)
  local parts = {}
  for _, location in ipairs(result.shown or {}) do
    local first, last = location.range.start, location.range["end"]
    local stop = last.character == 0 and last.line or last.line + 1 -- past the last line seen
    local fname = vim.uri_to_fname(location.uri)
    local buf = vim.fn.bufnr(fname)
    local total = buf ~= -1 and vim.api.nvim_buf_is_loaded(buf) and vim.api.nvim_buf_line_count(buf) or nil
    local name = vim.fn.fnamemodify(fname, ":~:.")
    if first.line == 0 and total and stop >= total then
      table.insert(parts, name)
    else
      table.insert(parts, ("%s (lines %d-%d%s)"):format(name, first.line + 1, stop, total and (" of " .. total) or ""))
    end
  end
  local notes = {}
  if #parts > 0 then
    table.insert(notes, "saw " .. table.concat(parts, ", "))
  end
  local dropped = result.historyDropped or 0
  if dropped > 0 then
    table.insert(notes, dropped == 1 and "left out the earliest exchange to fit"
      or ("left out the %d earliest exchanges to fit"):format(dropped))
  end
  return #notes > 0 and table.concat(notes, "; ") or nil
end

--- Beside the answer's "## StarChat": what the model saw (M.seen_text).
local function show_seen(turn, result)
  turn.seen = M.seen_text(result)
  if turn.seen and loaded() and turn.answer_line > 0 then
    pcall(vim.api.nvim_buf_set_extmark, M.buf, seen_ns, turn.answer_line - 1, 0, {
      virt_text = { { "  " .. turn.seen, "Comment" } },
      virt_text_pos = "eol",
    })
  end
end

local function on_result(turn)
  return function(err, result)
    if turn.cancelled or M.current ~= turn then
      return
    end
    lsp.streams[turn.token or ""] = nil
    if err then
      turn.error = err.message or vim.inspect(err)
      if not err.exited then -- a server that exits is reported by Neovim and the status line
        lsp.notify_error(turn.kind, err)
      end
      end_turn(turn, "[error: " .. turn.error .. "]")
      return
    end
    result = result or {}
    settle(turn, result.text)
    show_seen(turn, result)
    turn.finish = result.finishReason
    turn.done = true
    end_turn(turn, result.finishReason == "length" and "[stopped at maxNewTokens]" or nil)
  end
end

local function busy()
  if M.current then
    vim.notify("StarChat is still answering (<C-c> in the chat stops it)", vim.log.levels.WARN)
    return true
  end
  return false
end

local context_ns = vim.api.nvim_create_namespace("starchat_chat_context")

--- The byte position of LSP position `pos` in `bufnr`, and whether it is the end of a range that
--- takes the line break before it (an end at the start of a later line is kept at the end of
--- the line before, so that typing at the start of the next line does not join the selection).
local function byte_pos(bufnr, pos, encoding, is_end, start_line)
  local count = vim.api.nvim_buf_line_count(bufnr)
  if is_end and pos.character == 0 and pos.line > start_line then
    local row = math.min(pos.line, count) - 1
    return row, #(vim.api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ""), true
  end
  local row = math.min(pos.line, count - 1)
  local text = vim.api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ""
  return row, pos.line < count and range_util.byte_col(text, pos.character, encoding) or #text, false
end

--- The marks of the context before (a new one replaces it, or the conversation is cleared).
local function unpin()
  for _, buf in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(buf) then
      vim.api.nvim_buf_clear_namespace(buf, context_ns, 0, -1)
    end
  end
end

--- The context's selection marked from (r1, c1) to (r2, c2) (bytes; its marks moved when it has
--- them): text typed at its start stays out of it, at its end goes into it.
local function mark(ctx, r1, c1, r2, c2)
  local ids = ctx.marks or {}
  ctx.marks = {
    vim.api.nvim_buf_set_extmark(ctx.bufnr, context_ns, r1, c1, { id = ids[1], right_gravity = false }),
    vim.api.nvim_buf_set_extmark(ctx.bufnr, context_ns, r2, c2, { id = ids[2], right_gravity = true }),
  }
end

--- Extmarks on the context's selection, so that it follows edits to its buffer (the user's,
--- or code put in from the chat: see M.apply).
local function pin(ctx, encoding)
  unpin()
  if ctx ~= M.context or not vim.api.nvim_buf_is_loaded(ctx.bufnr) then
    return
  end
  local r1, c1 = byte_pos(ctx.bufnr, ctx.range.start, encoding, false)
  local r2, c2, eol = byte_pos(ctx.bufnr, ctx.range["end"], encoding, true, ctx.range.start.line)
  ctx.encoding, ctx.eol = encoding, eol
  mark(ctx, r1, c1, r2, c2)
end

--- The context's selection where its marks are now: {r1, c1, r2, c2} in bytes (0-based, c2
--- exclusive), nil without marks or once the selection is gone.
local function pinned(ctx)
  if not ctx.marks or not vim.api.nvim_buf_is_loaded(ctx.bufnr) then
    return nil
  end
  local a = vim.api.nvim_buf_get_extmark_by_id(ctx.bufnr, context_ns, ctx.marks[1], {})
  local b = vim.api.nvim_buf_get_extmark_by_id(ctx.bufnr, context_ns, ctx.marks[2], {})
  if not a[1] or not b[1] or a[1] > b[1] or (a[1] == b[1] and a[2] >= b[2]) then -- deleted
    return nil
  end
  return { a[1], a[2], b[1], b[2] }
end

--- The context's selection now, as an LSP range in its encoding.
local function pinned_range(ctx)
  local at = pinned(ctx)
  if not at then
    return nil
  end
  local r1, c1, r2, c2 = unpack(at)
  local finish
  if ctx.eol then -- through the line break (as the selection was): the start of the next line
    finish = range_util.lines(ctx.bufnr, r2 + 1, r2 + 1, ctx.encoding)["end"]
  else
    finish = { line = r2, character = range_util.column(ctx.bufnr, r2, c2, ctx.encoding) }
  end
  return { start = { line = r1, character = range_util.column(ctx.bufnr, r1, c1, ctx.encoding) }, ["end"] = finish }
end

--- The context selection, while its buffer is still open and attached.
local function live_context(client)
  local ctx = M.context
  if ctx and vim.api.nvim_buf_is_valid(ctx.bufnr) and vim.api.nvim_buf_is_loaded(ctx.bufnr) then
    if lsp.clients(ctx.bufnr)[1] == client then
      ctx.uri = vim.uri_from_bufnr(ctx.bufnr) -- renamed meanwhile: opened again under its new name
      ctx.range = pinned_range(ctx) or ctx.range -- edited meanwhile: where the selection is now
      return ctx
    end
  end
  return nil
end

--- Files attached to the conversation ------------------------------------------------------
--- Like Copilot Chat's "#file": other files the model is shown beside the conversation's own
--- (starchat/chat `references`). Each must be open on the server (the server never reads the
--- disk): attached to the StarChat client, which sends it with didOpen and its changes after.
--- They are conversation state, sent with every request of the conversation (it puts them in
--- the first user turn, as the context), until :StarChatDropFile or a new conversation.

local files_group = vim.api.nvim_create_augroup("starchat_chat_files", { clear = true })

local function files_changed()
  vim.schedule(function()
    pcall(vim.cmd, "redrawstatus!") -- the chat's winbar lists them
  end)
end

local function unwatch(entry)
  for _, id in ipairs(entry.autocmds or {}) do
    pcall(vim.api.nvim_del_autocmd, id)
  end
  entry.autocmds = nil
end

--- A file that was not loaded until it was attached, and that no window has shown since, goes
--- back to how it was when it leaves the conversation: unloaded (the server is told it is
--- closed), its buffer wiped out when attaching made it. Not when it is modified or shown in a
--- window.
local function release(entry)
  local buf = entry.bufnr
  if not entry.ours or not vim.api.nvim_buf_is_loaded(buf) or vim.bo[buf].modified or #vim.fn.win_findbuf(buf) > 0 then
    return
  end
  pcall(vim.api.nvim_buf_delete, buf, { unload = entry.ours ~= "created" })
end

local function remove_file(entry)
  for i, e in ipairs(M.files) do
    if e == entry then
      table.remove(M.files, i)
      unwatch(entry)
      release(entry)
      files_changed()
      return true
    end
  end
  return false
end

--- Why an attached file can no longer be sent (closed, or renamed to a name that looks like
--- secrets), or nil.
local function file_gone(entry)
  local buf = entry.bufnr
  if not vim.api.nvim_buf_is_valid(buf) or not vim.api.nvim_buf_is_loaded(buf) then
    return ("%s was closed"):format(entry.name)
  end
  return lsp.unsendable_reason(buf)
end

local function drop_gone(entry, why)
  if remove_file(entry) then
    vim.notify(("StarChat: %s; it is no longer attached to the chat"):format(why), vim.log.levels.WARN)
  end
end

--- A file closed (:bdelete, :bunload, :bwipeout) leaves the conversation at once, with a
--- warning; :edit! (unloaded and loaded again at once) keeps it. One shown in a window is the
--- user's from then on: leaving the conversation leaves it loaded.
local function watch(entry)
  entry.autocmds = {
    vim.api.nvim_create_autocmd("BufUnload", {
      group = files_group,
      buffer = entry.bufnr,
      callback = function()
        vim.schedule(function()
          local why = file_gone(entry)
          if why then
            drop_gone(entry, why)
          end
        end)
      end,
    }),
    vim.api.nvim_create_autocmd("BufWinEnter", {
      group = files_group,
      buffer = entry.bufnr,
      callback = function()
        entry.ours = nil
      end,
    }),
  }
end

--- Forget the attached files (a new conversation).
function M.forget_files()
  local files = M.files
  M.files = {}
  for _, entry in ipairs(files) do
    unwatch(entry)
    release(entry)
  end
  files_changed()
end

--- Attached files that can no longer be sent are dropped, with a warning each.
local function prune_files()
  for _, entry in ipairs(vim.list_slice(M.files)) do
    local why = file_gone(entry)
    if why then
      drop_gone(entry, why)
    end
  end
end

--- The `references` of a request to `client`: the attached files open on it (one not attached
--- to it is attached first; one that cannot be is left out, with a warning). Their URIs are
--- kept in turn.references.
local function references(client, turn)
  prune_files()
  local refs, uris = {}, {}
  for _, entry in ipairs(M.files) do
    local buf = entry.bufnr
    local on = function()
      local c = lsp.clients(buf)[1]
      return c ~= nil and c.id == client.id
    end
    if not on() then
      lsp.start(buf, { explicit = true })
    end
    if on() then
      local uri = vim.uri_from_bufnr(buf)
      table.insert(refs, { textDocument = { uri = uri } })
      table.insert(uris, uri)
    else
      vim.notify(("StarChat: %s is not open on the server; not sent"):format(file_label(buf)), vim.log.levels.WARN)
    end
  end
  if turn then
    turn.references = uris
  end
  return refs
end

local function find_file(entry_buf)
  for _, entry in ipairs(M.files) do
    if entry.bufnr == entry_buf then
      return entry
    end
  end
  return nil
end

--- The loaded buffer of an existing file, or nil.
local function buffer_of(path)
  for _, buf in ipairs(vim.api.nvim_list_bufs()) do
    local name = vim.api.nvim_buf_get_name(buf)
    if name ~= "" and vim.fn.fnamemodify(name, ":p") == path then
      return buf
    end
  end
  return nil
end

--- The buffers for the files `names` (as typed on the command line: wildcards, ~ and % are
--- expanded), loaded (as with :badd, then loaded) and attached to the StarChat client; the
--- ones that cannot be (no such file, a folder, a file that looks like secrets) are refused:
--- why goes into `refused`, and nothing of them is sent. Also the set of the buffers made here.
local function file_buffers(names, refused)
  local bufs, made = {}, {}
  local function refuse(msg)
    table.insert(refused, msg)
  end
  for _, name in ipairs(names) do
    local paths = vim.fn.expand(name, false, true)
    if #paths == 0 then
      paths = { name }
    end
    for _, path in ipairs(paths) do
      local full = vim.fn.fnamemodify(path, ":p")
      local buf = buffer_of(full)
      if vim.fn.isdirectory(full) == 1 then
        refuse(("%s is a folder; attach files"):format(path))
      elseif lsp.looks_secret(vim.uri_from_fname(full)) then
        -- refused before a buffer is made for it: nothing of it is read or sent
        refuse(("%s looks like it holds secrets (keys, .env); StarChat does not send it to the server"):format(
          vim.fn.fnamemodify(full, ":~:.")
        ))
      elseif not buf and vim.fn.filereadable(full) ~= 1 then
        refuse(("no file %s"):format(path))
      else
        if not buf then
          buf = vim.fn.bufadd(full)
          vim.bo[buf].buflisted = true -- as :badd does
          made[buf] = true
        end
        table.insert(bufs, buf)
      end
    end
  end
  return bufs, made
end

--- One message for a command: what was done, and what was refused (a warning then).
local function report(done, refused)
  local parts = vim.list_extend({}, refused)
  if done then
    table.insert(parts, done)
  end
  if #parts > 0 then
    vim.notify("StarChat: " .. table.concat(parts, "; "), #refused > 0 and vim.log.levels.WARN or vim.log.levels.INFO)
  end
end

--- Attach files to the conversation: the buffers of `names` (file names), or the current buffer
--- without any. Returns the names of the files attached.
function M.add_files(names)
  local bufs, made, refused = {}, {}, {}
  if not names or #names == 0 then
    local buf = vim.api.nvim_get_current_buf()
    if buf == M.buf or vim.bo[buf].buftype ~= "" then
      table.insert(refused, ":StarChatAddFile attaches a file: run it in the file's window, or name the files")
    else
      bufs = { buf }
    end
  else
    bufs, made = file_buffers(names, refused)
  end
  local added = {}
  for _, buf in ipairs(bufs) do
    local why = lsp.unsendable_reason(buf) -- an open buffer's name, or one Neovim stopped tracking
    if why then
      table.insert(refused, why)
    elseif find_file(buf) then
      table.insert(refused, ("%s is attached already"):format(file_label(buf)))
    elseif #M.files >= M.MAX_FILES then
      table.insert(refused, ("at most %d files can be attached to the chat"):format(M.MAX_FILES))
      break
    else
      local ours = nil -- loaded here: unloaded again when it leaves the conversation (release)
      if not vim.api.nvim_buf_is_loaded(buf) then
        ours = made[buf] and "created" or "loaded"
        vim.fn.bufload(buf) -- (FileType then attaches it, when the plugin starts for its filetype)
      end
      local attached = lsp.clients(buf, true)[1] ~= nil or lsp.start(buf, { explicit = true }) ~= nil
      if attached then
        local entry = { bufnr = buf, name = file_label(buf), ours = ours }
        table.insert(M.files, entry)
        watch(entry)
        table.insert(added, entry.name)
      else
        release({ bufnr = buf, ours = ours })
      end
    end
  end
  if #added > 0 then
    files_changed()
  end
  report(#added > 0 and ("attached to the chat: %s"):format(table.concat(added, ", ")) or nil, refused)
  return added
end

--- Detach files from the conversation: those named (as attached, or as file names), or all of
--- them without any. Returns the names of the files removed.
function M.drop_files(names)
  local dropped, refused = {}, {}
  if not names or #names == 0 then
    dropped = M.file_names()
    M.forget_files()
    if #dropped == 0 then
      vim.notify("StarChat: no files are attached to the chat", vim.log.levels.INFO)
    end
  else
    for _, name in ipairs(names) do
      local full = vim.fn.fnamemodify(vim.fn.expand(name), ":p")
      local found
      for _, entry in ipairs(M.files) do
        local valid = vim.api.nvim_buf_is_valid(entry.bufnr)
        local label = valid and file_label(entry.bufnr) or entry.name
        if label == name or (valid and vim.fn.fnamemodify(vim.api.nvim_buf_get_name(entry.bufnr), ":p") == full) then
          found = entry
          table.insert(dropped, label)
          break
        end
      end
      if found then
        remove_file(found)
      else
        table.insert(refused, ("%s is not attached to the chat"):format(name))
      end
    end
  end
  report(#dropped > 0 and ("removed from the chat: %s"):format(table.concat(dropped, ", ")) or nil, refused)
  return dropped
end

--- :StarChatDropFile's completion: the attached files.
function M.complete_files(lead)
  local out = {}
  for _, name in ipairs(M.file_names()) do
    if vim.startswith(name, lead or "") then
      table.insert(out, vim.fn.fnameescape(name))
    end
  end
  return out
end

--- A partialResultToken whose pieces ($/progress {delta}) stream into `turn`'s answer.
local function stream(turn)
  turn.token = lsp.new_token()
  lsp.streams[turn.token] = function(delta)
    if M.current ~= turn then
      return
    end
    if turn.pieces == 0 then
      set_thinking(false)
    end
    turn.pieces = turn.pieces + 1
    turn.answer = turn.answer .. delta
    append(turn, delta)
    follow(false)
  end
  return turn.token
end

--- Send a chat message; the answer streams into the chat buffer.
--- opts: max_new_tokens, bufnr (whose client to use)
function M.send(text, opts)
  opts = opts or {}
  text = vim.trim(text or "")
  if text == "" or busy() then
    return nil
  end
  local ctx_buf = M.context and M.context.bufnr
  local ctx_open = ctx_buf and vim.api.nvim_buf_is_valid(ctx_buf) and vim.api.nvim_buf_is_loaded(ctx_buf)
  local client = lsp.ensure(opts.bufnr or (ctx_open and ctx_buf) or nil)
  if not client then
    return nil
  end
  M.open()
  prune_files()
  local turn = { kind = "chat", question = text, user_content = text, answer = "", pieces = 0, client = client }
  begin_turn(turn, USER, text)
  local messages = vim.deepcopy(M.history)
  table.insert(messages, { role = "user", content = text })
  local params = {
    messages = messages,
    partialResultToken = stream(turn),
    maxNewTokens = opts.max_new_tokens or (config.options.chat or {}).max_new_tokens,
  }
  local ctx = live_context(client)
  if ctx then
    params.textDocument = { uri = ctx.uri }
    params.range = ctx.range
  end
  turn.req = lsp.request(client, "starchat/chat", function(c)
    local refs = references(c, turn)
    params.references = #refs > 0 and refs or nil
    return params
  end, on_result(turn), ctx and ctx.bufnr or nil, "chat")
  turn.id = turn.req.id
  turn.req.on_sent = function(id)
    turn.id = id
  end
  return turn
end

--- The server's Explain instruction (lsp_server/prompts/tasks.py): Explain asked as a chat
--- message gets the prompt of the server's starchat.explain.
M.EXPLAIN_INSTRUCTION = "Explain what the selected code does."

--- Ask about a selection (Explain without a question): the question, or Explain's instruction,
--- as the first message of a chat about the selection (the prompt of the server's starchat.ask
--- and starchat.explain, which cannot stream: executeCommand has no partial results), with the
--- files attached to the conversation, streamed into the chat buffer; follow-up chat messages
--- keep the selection as context.
--- finalize(client) -> args: the arguments in the client's position encoding once it is ready
--- (see init.lua); `args` is used as it is without it.
function M.ask(client, bufnr, args, question, finalize)
  if busy() then
    return nil
  end
  M.open()
  local label = range_util.label(bufnr, args.range)
  local explain = question == nil
  local shown = explain and "Explain this code." or question
  local turn = {
    kind = explain and "explain" or "ask",
    question = shown,
    user_content = explain and M.EXPLAIN_INSTRUCTION or vim.trim(question),
    answer = "",
    pieces = 0,
    client = client,
  }
  begin_turn(turn, USER .. " · " .. label, shown)
  local context = { bufnr = bufnr, uri = args.textDocument.uri, range = args.range, label = label }
  M.context = context
  prune_files()
  local token = stream(turn)
  turn.req = lsp.request(client, "starchat/chat", function(c)
    local arguments = finalize and finalize(c) or vim.deepcopy(args)
    context.range = arguments.range
    pin(context, c.offset_encoding)
    local refs = references(c, turn)
    return {
      messages = { { role = "user", content = turn.user_content } },
      textDocument = arguments.textDocument,
      range = arguments.range,
      references = #refs > 0 and refs or nil,
      partialResultToken = token,
      maxNewTokens = (config.options.chat or {}).max_new_tokens,
    }
  end, on_result(turn), bufnr, turn.kind)
  turn.id = turn.req.id
  turn.req.on_sent = function(id)
    turn.id = id
  end
  return turn
end

--- Send the last message again for a new answer, which replaces the last one in the chat and the
--- history: a chat message with the history before it; :StarChat or :StarChatExplain again about
--- their selection (where it is now). Returns the new turn.
function M.retry()
  if busy() then
    return nil
  end
  local turn = M.turns[#M.turns]
  local at = turn and loaded() and turn.mark and vim.api.nvim_buf_get_extmark_by_id(M.buf, turn_ns, turn.mark, {})[1]
  if not at then
    vim.notify("StarChat: no answer to retry", vim.log.levels.INFO)
    return nil
  end
  local client, ctx
  if turn.kind ~= "chat" then
    client = M.context and lsp.ensure(M.context.bufnr)
    ctx = client and live_context(client)
    if not ctx then
      vim.notify("StarChat: the code it was asked about is no longer open; ask again", vim.log.levels.WARN)
      return nil
    end
  end
  -- out of the chat: its lines up to the "## You" being typed in (kept), its answer's history
  local lines = vim.api.nvim_buf_get_lines(M.buf, 0, -1, false)
  local input = #lines - 1
  while input > at and not vim.startswith(lines[input + 1], USER) do
    input = input - 1
  end
  with_modifiable(function(buf)
    vim.api.nvim_buf_set_lines(buf, at, input, false, {})
  end)
  table.remove(M.turns)
  if turn.answer ~= "" then -- end_turn kept the question and the answer
    table.remove(M.history)
    table.remove(M.history)
  end
  if turn.kind == "chat" then
    return M.send(turn.question)
  end
  local question = turn.kind == "ask" and turn.question or nil
  return M.ask(client, ctx.bufnr, { textDocument = { uri = ctx.uri }, range = ctx.range }, question)
end

--- Stop the answer being generated ($/cancelRequest: the server stops decoding).
function M.cancel()
  local turn = M.current
  if not turn then
    return false
  end
  stop_request(turn)
  end_turn(turn, "[cancelled]")
  return true
end

--- The text typed under the last "## You", sent as a chat message (or asked for when empty).
function M.submit()
  if busy() or not valid(M.buf) then
    return
  end
  local lines = vim.api.nvim_buf_get_lines(M.buf, 0, -1, false)
  local at
  for i = #lines, 1, -1 do
    if vim.startswith(lines[i], USER) then
      at = i
      break
    end
  end
  local text = at and vim.trim(table.concat(vim.list_slice(lines, at + 1), "\n")) or ""
  if text ~= "" then
    return M.send(text)
  end
  vim.ui.input({ prompt = "Ask StarChat: " }, function(input)
    if input and vim.trim(input) ~= "" then
      M.send(input)
    end
  end)
end

--- The fenced code blocks of markdown `lines`: {first, last (the fences' rows, 1-based; last is
--- past the end while the block still streams), lines (without the fences, less the opening
--- fence's indentation)}.
local function code_blocks(lines)
  local blocks, open = {}, nil
  for i, line in ipairs(lines) do
    local indent, fence = line:match("^(%s*)(```+)")
    if not fence then
      indent, fence = line:match("^(%s*)(~~~+)")
    end
    if open then
      if fence and fence:sub(1, 1) == open.char and #fence >= open.width and line:match("^%s*[`~]+%s*$") then
        open.last = i
        table.insert(blocks, open)
        open = nil
      else
        local spaces = #line:match("^ *")
        table.insert(open.lines, line:sub(math.min(spaces, open.indent) + 1))
      end
    elseif fence and not (fence:sub(1, 1) == "`" and line:find("`", #indent + #fence + 1, true)) then
      open = { first = i, char = fence:sub(1, 1), width = #fence, indent = #indent, lines = {} }
    end
  end
  if open then
    open.last = #lines + 1
    table.insert(blocks, open)
  end
  return blocks
end

local flash_ns = vim.api.nvim_create_namespace("starchat_chat_flash")

--- Lines first..last (0-based, inclusive) of `buf` highlighted for a moment, as a yank is.
local function flash(buf, first, last)
  local width = #(vim.api.nvim_buf_get_lines(buf, last, last + 1, false)[1] or "")
  pcall(vim.api.nvim_buf_set_extmark, buf, flash_ns, first, 0, { end_row = last, end_col = width, hl_group = "IncSearch", hl_eol = true })
  vim.defer_fn(function()
    if vim.api.nvim_buf_is_valid(buf) then
      vim.api.nvim_buf_clear_namespace(buf, flash_ns, 0, -1)
    end
  end, 300)
end

--- The code block under the cursor of the chat buffer, or the nearest one above it (the answer
--- just read); nil (and a warning) when there is none.
local function block_at_cursor()
  local buf = vim.api.nvim_get_current_buf()
  local row = vim.api.nvim_win_get_cursor(0)[1]
  local chosen
  for _, block in ipairs(code_blocks(vim.api.nvim_buf_get_lines(buf, 0, -1, false))) do
    if block.first <= row and row <= block.last then
      chosen = block
      break
    elseif block.last < row then
      chosen = block
    end
  end
  if not chosen or #chosen.lines == 0 then
    vim.notify("StarChat: no code block at or above the cursor", vim.log.levels.WARN)
    return nil
  end
  return buf, chosen
end

--- Yank the code block under the cursor, or the nearest one above it (the answer just read),
--- without its fences, linewise into `register` (default: v:register, so "agy and
--- 'clipboard' work as with y): `p`, `]p` or `gv` `p` in the code then put it in.
function M.yank(register)
  register = register or vim.v.register
  local buf, chosen = block_at_cursor()
  if not chosen then
    return false
  end
  vim.fn.setreg(register, chosen.lines, "l")
  if register == '"' then
    vim.fn.setreg("0", chosen.lines, "l") -- as y does
  end
  flash(buf, chosen.first, chosen.first + #chosen.lines - 1)
  vim.notify(("StarChat: %d line%s of code yanked"):format(#chosen.lines, #chosen.lines == 1 and "" or "s"))
  return true
end

--- The lines without the indentation they all share (blank lines aside).
local function dedent(lines)
  local common
  for _, line in ipairs(lines) do
    if line:find("%S") then
      local width = #line:match("^%s*")
      common = common and math.min(common, width) or width
    end
  end
  return vim.tbl_map(function(line)
    return line:sub(math.min(common or 0, #line:match("^%s*")) + 1)
  end, lines)
end

--- Put the code block under the cursor (or the nearest one above it) in place of the selection
--- the conversation is about (an Ask or Explain; where that selection is now, after any edits),
--- indented like its first line: whole lines for whole lines, else just the selected text (the
--- block's later lines indented like the line). One change: `u` in that buffer takes it back.
--- A follow-up question is then about the new code.
function M.apply()
  local ctx = M.context
  local at = ctx and pinned(ctx)
  if not ctx or not ctx.marks then
    vim.notify("StarChat: this conversation is not about a selection (gy yanks the code instead)", vim.log.levels.WARN)
    return false
  elseif not at then
    vim.notify(("StarChat: %s is closed, or the selection is gone (gy yanks the code instead)"):format(ctx.label), vim.log.levels.WARN)
    return false
  end
  local _, chosen = block_at_cursor()
  if not chosen then
    return false
  elseif M.current and chosen.last > vim.api.nvim_buf_line_count(M.buf) then
    vim.notify("StarChat: that code block is still being written", vim.log.levels.WARN)
    return false
  end
  local buf = ctx.bufnr
  if not vim.bo[buf].modifiable then
    vim.notify(("StarChat: %s is not modifiable"):format(ctx.label), vim.log.levels.WARN)
    return false
  end
  local r1, c1, r2, c2 = unpack(at)
  local first = vim.api.nvim_buf_get_lines(buf, r1, r1 + 1, false)[1] or ""
  local indent = first:match("^%s*")
  local code = dedent(chosen.lines)
  local whole = c1 <= #indent and ctx.eol
  local last_row, last_col
  if whole then -- whole lines, indented like the first
    local lines = vim.tbl_map(function(line)
      return line ~= "" and indent .. line or line
    end, code)
    vim.api.nvim_buf_set_lines(buf, r1, r2 + 1, false, lines)
    c1, last_row, last_col = 0, r1 + #lines - 1, #lines[#lines]
  else -- the selected text: its later lines indented like the line
    local prefix = first:find("%S") and indent or first:sub(1, c1)
    local lines = {}
    for i, line in ipairs(code) do
      lines[i] = (i > 1 and line ~= "") and prefix .. line or line
    end
    vim.api.nvim_buf_set_text(buf, r1, c1, r2, c2, lines)
    last_row = r1 + #lines - 1
    last_col = (#lines == 1 and c1 or 0) + #lines[#lines]
  end
  mark(ctx, r1, c1, last_row, last_col) -- the conversation is now about the code put in
  ctx.range = pinned_range(ctx) or ctx.range
  ctx.label = range_util.label(buf, ctx.range)
  for _, win in ipairs(vim.fn.win_findbuf(buf)) do
    if vim.api.nvim_win_get_tabpage(win) == vim.api.nvim_get_current_tabpage() then
      vim.api.nvim_win_set_cursor(win, { r1 + 1, 0 })
    end
  end
  flash(buf, r1, last_row)
  vim.notify(("StarChat: %d line%s of code put in %s"):format(#code, #code == 1 and "" or "s", ctx.label))
  return true
end

--- Forget the conversation, its context and the files attached to it.
function M.clear()
  if M.current then
    M.cancel()
  end
  M.history, M.context, M.turns = {}, nil, {}
  unpin()
  M.forget_files()
  if valid(M.buf) then
    vim.api.nvim_buf_clear_namespace(M.buf, seen_ns, 0, -1)
    vim.api.nvim_buf_clear_namespace(M.buf, turn_ns, 0, -1)
    with_modifiable(function(buf)
      vim.api.nvim_buf_set_lines(buf, 0, -1, false, { USER, "" })
    end)
    set_thinking(false)
    hint()
  end
end

return M
