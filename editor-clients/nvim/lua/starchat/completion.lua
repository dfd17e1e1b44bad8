--- Inline completion: what the server proposes at the cursor (LSP 3.18
--- textDocument/inlineCompletion), shown as ghost text while typing in Insert mode. Neovim 0.11
--- has no client for it (0.12 adds vim.lsp.inline_completion), so the plugin asks, shows, accepts
--- and dismisses itself, as Copilot.vim does.
local config = require("starchat.config")
local lsp = require("starchat.lsp")
local range_util = require("starchat.range")

local M = {}

M.ns = vim.api.nvim_create_namespace("starchat_completion")
M.HL = "StarChatSuggestion"
M.INVOKED, M.AUTOMATIC = 1, 2 -- InlineCompletionTriggerKind

--- The suggestion shown: {bufnr, row, col (the cursor, bytes), before/after (the cursor's line
--- around it), lines (line count), start_col/end_col (the item's range, bytes), text (the item's
--- insertText, "\n" line breaks), rest (what is still to come after the cursor), item, client}.
M.suggestion = nil
--- The request in flight (an lsp.request record, its `what` = {completion = trigger kind}).
M.request = nil
--- Where the cursor and the text were when the plugin last looked (see on_change).
local last_seen = nil
local timer = nil
--- Ask explicitly once Insert mode has started (:StarChatComplete from Normal mode).
local invoke_on_enter = false

local function opts()
  return config.options.completion or {}
end

--- The cursor and the text there: {bufnr, row, col (bytes), line, tick, lines}.
local function here()
  local bufnr = vim.api.nvim_get_current_buf()
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  row = row - 1
  return {
    bufnr = bufnr,
    row = row,
    col = col,
    line = vim.api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or "",
    tick = vim.api.nvim_buf_get_changedtick(bufnr),
    lines = vim.api.nvim_buf_line_count(bufnr),
  }
end

local function same_place(a, b)
  return a ~= nil and b ~= nil and a.bufnr == b.bufnr and a.row == b.row and a.col == b.col and a.tick == b.tick
end

local function in_insert_mode()
  return vim.api.nvim_get_mode().mode:sub(1, 1) == "i"
end

--- The StarChat client that answers inline completions for the buffer (attached, initialized,
--- advertising inlineCompletionProvider), or nil.
function M.client(bufnr)
  for _, c in ipairs(lsp.clients(bufnr)) do
    if c.initialized and (c.server_capabilities or {}).inlineCompletionProvider then
      return c
    end
  end
  return nil
end

local function stop_timer()
  if timer and not timer:is_closing() then
    timer:stop()
  end
end

--- Stop the request in flight ($/cancelRequest: the server stops the model before its next step).
local function cancel_request()
  local req = M.request
  M.request = nil
  if req then
    lsp.cancel(req)
  end
end

local function hide()
  local s = M.suggestion
  M.suggestion = nil
  if s and vim.api.nvim_buf_is_valid(s.bufnr) then
    vim.api.nvim_buf_clear_namespace(s.bufnr, M.ns, 0, -1)
  end
end

--- Tabs as spaces: virtual text shows a tab as "^I".
local function expand_tabs(text, bufnr)
  return (text:gsub("\t", string.rep(" ", vim.bo[bufnr].tabstop)))
end

--- Draw `s.rest` at the cursor: its first line inline, the others as virtual lines below.
local function draw(s)
  vim.api.nvim_buf_clear_namespace(s.bufnr, M.ns, 0, -1)
  local lines = vim.split(s.rest, "\n", { plain = true })
  local mark = { hl_mode = "combine" }
  if lines[1] ~= "" then
    mark.virt_text = { { expand_tabs(lines[1], s.bufnr), M.HL } }
    mark.virt_text_pos = "inline"
  end
  if #lines > 1 then
    mark.virt_lines = {}
    for i = 2, #lines do
      table.insert(mark.virt_lines, { { expand_tabs(lines[i], s.bufnr), M.HL } })
    end
  end
  vim.api.nvim_buf_set_extmark(s.bufnr, M.ns, s.row, s.col, mark)
end

--- Whether a suggestion is shown (for the accept and dismiss keys; with the popup menu of
--- Insert-mode completion open, the keys are the menu's).
function M.visible()
  return M.suggestion ~= nil and vim.fn.pumvisible() == 0
end

--- Hide the suggestion and stop asking for one.
function M.dismiss()
  stop_timer()
  cancel_request()
  hide()
end

--- The suggestion for an answer's first item at place `at` (the cursor when it was asked), or
--- nil when it cannot be shown there: the item's range (one line, LSP 3.18) must hold the
--- cursor, and its insertText start with the text of the range before the cursor.
local function suggestion_for(client, item, at)
  local text = item.insertText
  if type(text) == "table" then -- a StringValue (snippet): its text
    text = text.value
  end
  if type(text) ~= "string" then
    return nil
  end
  text = text:gsub("\r\n?", "\n")
  local enc = client.offset_encoding or "utf-16"
  local start_col, end_col = at.col, at.col
  if item.range then
    local r = item.range
    if r.start.line ~= at.row or r["end"].line ~= at.row then
      return nil
    end
    start_col = range_util.byte_col(at.line, r.start.character, enc)
    end_col = range_util.byte_col(at.line, r["end"].character, enc)
  end
  if start_col > at.col or end_col < at.col then
    return nil
  end
  local typed = at.line:sub(start_col + 1, at.col)
  if not vim.startswith(text, typed) or #text == #typed then
    return nil
  end
  return {
    bufnr = at.bufnr,
    row = at.row,
    col = at.col,
    before = at.line:sub(1, at.col),
    after = at.line:sub(at.col + 1),
    lines = at.lines,
    start_col = start_col,
    end_col = end_col,
    text = text,
    rest = text:sub(#typed + 1),
    item = item,
    client = client,
  }
end

--- The suggestion once `typed`, the start of its rest, is in the buffer at its cursor and the
--- cursor after it, at (row, col): it proposes the rest of the rest, replacing from there what
--- the item's range held after the old cursor (an auto-closed ")", say).
local function moved_on(s, typed, row, col)
  local lines = vim.split(typed, "\n", { plain = true })
  local tail = s.end_col - s.col
  s.before = (#lines == 1 and s.before or "") .. lines[#lines]
  s.row, s.col, s.lines = row, col, s.lines + #lines - 1
  s.rest = s.rest:sub(#typed + 1)
  s.start_col, s.end_col, s.text = col, col + tail, s.rest
  draw(s)
end

--- The suggestion still fits what the user did since it was shown: the same line, with text
--- typed at the cursor that starts what is proposed ("typing through"): the rest is shown at
--- once. False when it no longer fits.
local function follow(s, now)
  if now.bufnr ~= s.bufnr or now.row ~= s.row or now.lines ~= s.lines or now.col < s.col then
    return false
  end
  local typed = now.line:sub(s.col + 1, now.col)
  if now.line ~= s.before .. typed .. s.after or not vim.startswith(s.rest, typed) or #typed == #s.rest then
    return false
  end
  if typed ~= "" then
    moved_on(s, typed, now.row, now.col)
  end
  return true
end

local function on_answer(req, at, kind, err, result)
  if M.request == req then
    M.request = nil
  end
  local invoked = kind == M.INVOKED
  if err then
    -- a request stopped by a keystroke, or by the server exiting (Neovim reports that), says nothing;
    -- one asked for as the user types fails silently (the server answers null itself)
    if invoked and err.code ~= lsp.REQUEST_CANCELLED and not err.exited then
      lsp.notify_error("completion", err)
    end
    return
  end
  if req.cancelled or not in_insert_mode() or not same_place(here(), at) then
    return -- the user typed meanwhile: the next request is on its way
  end
  local items = type(result) == "table" and (result.items or result) or {}
  local s = items[1] and suggestion_for(req.client, items[1], at)
  if not s then
    if invoked then
      vim.notify("StarChat: no completion here", vim.log.levels.INFO)
    end
    return
  end
  hide()
  M.suggestion = s
  draw(s)
end

--- Send textDocument/inlineCompletion for the cursor (kind: M.AUTOMATIC or M.INVOKED), with
--- the position in the client's encoding (computed once it is initialized).
local function send(client, kind)
  cancel_request()
  local at = here()
  local uri = vim.uri_from_bufnr(at.bufnr)
  local req
  req = lsp.request(client, "textDocument/inlineCompletion", function(c)
    return {
      textDocument = { uri = uri },
      position = { line = at.row, character = range_util.column(at.bufnr, at.row, at.col, c.offset_encoding or "utf-16") },
      context = { triggerKind = kind },
    }
  end, function(err, result)
    on_answer(req, at, kind, err, result)
  end, at.bufnr, { completion = kind })
  M.request = req
  return req
end

--- Whether completions are asked for as you type in buffer `bufnr`: the `auto` option
--- (:StarChatCompletion), unless the buffer's `vim.b.starchat_completion` is false.
function M.auto(bufnr)
  return opts().enabled ~= false and opts().auto ~= false and vim.b[bufnr].starchat_completion ~= false
end

--- :StarChatCompletion [on|off|toggle]: completion as you type, in every buffer (the `auto`
--- option; toggled without an argument). Turned off, a suggestion shown goes; asking for one
--- (keys.request, :StarChatComplete) still works. Returns whether it is on, or nil for a bad
--- argument.
function M.set_auto(how)
  local on
  if how == "on" then
    on = true
  elseif how == "off" then
    on = false
  elseif how == nil or how == "" or how == "toggle" then
    on = opts().auto == false
  else
    vim.notify(("StarChat: :StarChatCompletion takes on, off or toggle, not %q"):format(how), vim.log.levels.ERROR)
    return nil
  end
  config.options.completion = config.options.completion or {}
  config.options.completion.auto = on
  if not on then
    M.dismiss()
  end
  lsp.status_changed() -- "(completion off)" in the status line
  if opts().enabled == false then
    vim.notify("StarChat: inline completion is off (completion = { enabled = false } in setup())", vim.log.levels.WARN)
  else
    vim.notify("StarChat: completion as you type " .. (on and "on" or "off"))
  end
  return on
end

--- After typing pauses (debounce_ms), ask for a completion where the cursor is then, if nothing
--- moved meanwhile.
local function schedule(at)
  if not M.auto(at.bufnr) or not M.client(at.bufnr) then
    return
  end
  timer = timer or assert(vim.uv.new_timer())
  timer:stop()
  timer:start(
    math.max(0, opts().debounce_ms or 150),
    0,
    vim.schedule_wrap(function()
      local now = here()
      if not in_insert_mode() or not same_place(now, at) or vim.fn.pumvisible() == 1 then
        return
      end
      local client = M.client(now.bufnr)
      if client then
        send(client, M.AUTOMATIC)
      end
    end)
  )
end

--- Insert mode: the cursor moved or the text changed (InsertEnter, CursorMovedI, TextChangedI;
--- both of the last two fire for one keystroke). A newer keystroke stops the request in flight;
--- the suggestion stays while what is typed matches it, and a new one is asked for.
local function on_change()
  local now = here()
  if same_place(now, last_seen) then
    return
  end
  last_seen = now
  stop_timer()
  cancel_request()
  if M.suggestion and not follow(M.suggestion, now) then
    hide()
  end
  schedule(now)
end

--- Insert the suggestion: its item's range and insertText as an LSP text edit in the client's
--- position encoding, the cursor at the end of the inserted text. False when none is shown.
function M.accept()
  local s = M.suggestion
  if not s or not vim.api.nvim_buf_is_valid(s.bufnr) then
    return false
  end
  M.dismiss()
  local enc = s.client.offset_encoding or "utf-16"
  local edit = {
    range = {
      start = { line = s.row, character = range_util.column(s.bufnr, s.row, s.start_col, enc) },
      ["end"] = { line = s.row, character = range_util.column(s.bufnr, s.row, s.end_col, enc) },
    },
    newText = s.text,
  }
  vim.lsp.util.apply_text_edits({ edit }, s.bufnr, enc)
  local lines = vim.split(s.text, "\n", { plain = true })
  local row = s.row + #lines - 1
  local col = #lines == 1 and s.start_col + #s.text or #lines[#lines]
  if vim.api.nvim_get_current_buf() == s.bufnr then
    vim.api.nvim_win_set_cursor(0, { row + 1, col })
  end
  local command = s.item.command -- run after inserting (LSP: InlineCompletionItem.command)
  if type(command) == "table" and s.client.exec_cmd then
    s.client:exec_cmd(command, { bufnr = s.bufnr })
  elseif type(command) == "table" then -- Neovim 0.10
    lsp.call(s.client, "request", "workspace/executeCommand", command, function() end, s.bufnr)
  end
  return true
end

--- Insert the start `part` of what is proposed at the cursor, as if typed, and show the rest (the
--- server answers the next request from its last completion, without the model). All of it:
--- accept().
local function accept_part(part)
  local s = M.suggestion
  if not s or not vim.api.nvim_buf_is_valid(s.bufnr) or vim.api.nvim_get_current_buf() ~= s.bufnr then
    return false
  end
  if #part >= #s.rest then
    return M.accept()
  end
  local lines = vim.split(part, "\n", { plain = true })
  vim.api.nvim_buf_set_text(s.bufnr, s.row, s.col, s.row, s.col, lines)
  local row = s.row + #lines - 1
  local col = (#lines == 1 and s.col or 0) + #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { row + 1, col })
  moved_on(s, part, row, col)
  return true
end

--- Insert the next word of the suggestion (the spaces before it included; a run of other
--- characters counts as a word). False when nothing is shown.
function M.accept_word()
  local rest = M.suggestion and M.suggestion.rest or ""
  return accept_part(rest:match("^%s*[%w_]+") or rest:match("^%s*[^%w_%s]+") or rest)
end

--- Insert the rest of the suggestion's line at the cursor, or, at its end, its next line. False
--- when nothing is shown.
function M.accept_line()
  local rest = M.suggestion and M.suggestion.rest or ""
  return accept_part(rest:match("^[^\n]+") or rest:match("^\n[^\n]*") or rest)
end

--- Ask for a completion at the cursor in Insert mode now (Invoked), starting the server if needed.
local function invoke(bufnr)
  local client = lsp.ensure(bufnr)
  if not client then
    return nil
  end
  stop_timer()
  hide()
  last_seen = here()
  return send(client, M.INVOKED)
end

--- Ask for a completion at the cursor explicitly (trigger kind Invoked: the server's errors are
--- shown, and it waits for the model to load). From Normal mode, Insert mode starts at the
--- cursor first (as `i`), and the request goes once it has.
function M.trigger()
  local bufnr = vim.api.nvim_get_current_buf()
  if opts().enabled == false then
    vim.notify("StarChat: inline completion is off (completion.enabled = false)", vim.log.levels.WARN)
    return nil
  end
  if vim.bo[bufnr].buftype ~= "" then
    vim.notify("StarChat: run this in a file buffer", vim.log.levels.WARN)
    return nil
  end
  local private = lsp.unsendable_reason(bufnr)
  if private then
    vim.notify("StarChat: " .. private, vim.log.levels.WARN)
    return nil
  end
  if not in_insert_mode() then
    invoke_on_enter = true
    vim.cmd("startinsert")
    return nil
  end
  return invoke(bufnr)
end

local function on_insert_enter(ev)
  last_seen = nil
  if invoke_on_enter then -- (InsertEnter comes before the mode is Insert)
    invoke_on_enter = false
    return invoke(ev.buf)
  end
  on_change()
end

local function on_leave()
  M.dismiss()
  last_seen = nil
  invoke_on_enter = false
end

--- Keys this plugin mapped: lhs -> the global Insert-mode mapping it replaced (or false).
local mapped = {}

local function ours(mapping)
  return mapping ~= nil and vim.startswith(mapping.desc or "", "StarChat")
end

--- The global Insert-mode mapping of `lhs` (not a buffer's own), as maparg() gives it, or nil.
local function global_mapping(lhs)
  local raw = vim.keycode(lhs)
  for _, m in ipairs(vim.api.nvim_get_keymap("i")) do
    if m.lhsraw == raw or vim.keycode(m.lhs) == raw then
      return m
    end
  end
  return nil
end

--- Remember what `lhs` did before the plugin maps it (to put it back): the user's mapping,
--- another plugin's, or Neovim's own (0.11 maps <Tab> for snippets).
local function remember(lhs)
  local previous = global_mapping(lhs)
  mapped[lhs] = previous and not ours(previous) and previous or false
  return mapped[lhs]
end

--- A <Plug> mapping that does what `lhs` did before the plugin mapped it: the mapping it replaces
--- (moved there), else the key itself.
local function fallback(name, lhs)
  local plug = "<Plug>(starchat-" .. name .. "-fallback)"
  local previous = remember(lhs)
  if previous then
    local moved = vim.deepcopy(previous)
    moved.lhs, moved.lhsraw, moved.lhsrawalt = plug, vim.keycode(plug), nil
    vim.fn.mapset("i", false, moved)
  else
    vim.keymap.set("i", plug, lhs, { desc = "StarChat: " .. lhs })
  end
  return plug
end

--- Map `lhs` in Insert mode to `action` while a suggestion is shown, else to what it did before:
--- an expression mapping (the text cannot change inside one: it returns a <Cmd> that does).
local function map_when_visible(name, lhs, desc)
  local plug = fallback(name, lhs)
  vim.keymap.set("i", lhs, function()
    if M.visible() then
      return "<Cmd>lua require('starchat.completion')." .. name .. "()<CR>"
    end
    return plug
  end, { expr = true, remap = true, silent = true, desc = desc })
end

--- The keys (config keys and M's functions) that act while a suggestion is shown, and their
--- descriptions.
local WHEN_VISIBLE = {
  { "accept", "StarChat: accept the completion" },
  { "accept_word", "StarChat: accept the completion's next word" },
  { "accept_line", "StarChat: accept the completion's next line" },
  { "dismiss", "StarChat: dismiss the completion" },
}

--- Put back the keys mapped by an earlier setup(), and the mappings they replaced.
local function unmap()
  for lhs, previous in pairs(mapped) do
    if ours(global_mapping(lhs)) then
      pcall(vim.keymap.del, "i", lhs)
    end
    if previous then
      vim.fn.mapset("i", false, previous)
    end
  end
  mapped = {}
  for _, key in ipairs(WHEN_VISIBLE) do
    pcall(vim.keymap.del, "i", "<Plug>(starchat-" .. key[1] .. "-fallback)")
  end
end

local function map_keys(keys)
  for _, key in ipairs(WHEN_VISIBLE) do
    if keys[key[1]] then
      map_when_visible(key[1], keys[key[1]], key[2])
    end
  end
  if keys.request then
    remember(keys.request)
    vim.keymap.set("i", keys.request, function()
      M.trigger()
    end, { silent = true, desc = "StarChat: ask for a completion" })
  end
end

--- (Re)configure from config.options.completion: autocommands, keys and the highlight group.
--- Called by setup(); called again, it replaces what it set up before.
function M.setup()
  local group = vim.api.nvim_create_augroup("starchat_completion", { clear = true })
  M.dismiss()
  unmap()
  vim.api.nvim_set_hl(0, M.HL, { link = "Comment", default = true })
  vim.api.nvim_create_autocmd("ColorScheme", { -- a color scheme clears the default link
    group = group,
    callback = function()
      vim.api.nvim_set_hl(0, M.HL, { link = "Comment", default = true })
    end,
  })
  if opts().enabled == false then
    return
  end
  local function on(events, callback)
    vim.api.nvim_create_autocmd(events, { group = group, callback = callback })
  end
  on("InsertEnter", on_insert_enter)
  on({ "CursorMovedI", "TextChangedI" }, on_change)
  -- the popup menu (Insert-mode completion) is open: its text is not typed yet
  on("TextChangedP", function()
    M.dismiss()
    last_seen = nil
  end)
  on({ "InsertLeave", "BufLeave", "WinLeave" }, on_leave)
  map_keys(opts().keys or {})
end

return M
