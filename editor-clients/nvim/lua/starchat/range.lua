--- From a command's range (or the last visual selection) to an LSP Range.
local M = {}

local function line_text(bufnr, row) -- row 0-based
  return vim.api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ""
end

--- Column of byte `col` of 0-based `row` in the client's position encoding.
local function column(bufnr, row, col, encoding)
  if col <= 0 then
    return 0
  end
  return vim.lsp.util.character_offset(bufnr, row, col, encoding)
end
M.column = column

--- Byte column of the LSP `character` (in the position encoding) on the line `text`, at most
--- the line's end.
function M.byte_col(text, character, encoding)
  if character <= 0 then
    return 0
  end
  local col
  if encoding == "utf-8" then
    col = character
  elseif vim.fn.has("nvim-0.11") == 1 then
    col = vim.str_byteindex(text, encoding, character, false)
  else -- 0.10: vim.str_byteindex(s, index, use_utf16) errors past the end
    local ok, b = pcall(vim.str_byteindex, text, character, encoding == "utf-16")
    col = ok and b or #text
  end
  return math.min(col, #text)
end

--- Whole lines line1..line2 (1-based): from the start of line1 to the start of the next line
--- (to the end of the last line when the buffer has no final line break).
function M.lines(bufnr, line1, line2, encoding)
  local count = vim.api.nvim_buf_line_count(bufnr)
  local finish
  if line2 < count or vim.bo[bufnr].eol or vim.bo[bufnr].fixeol then
    finish = { line = line2, character = 0 }
  else
    local text = line_text(bufnr, line2 - 1)
    finish = { line = line2 - 1, character = column(bufnr, line2 - 1, #text, encoding) }
  end
  return { start = { line = line1 - 1, character = 0 }, ["end"] = finish }
end

--- What a user command runs on, in bytes (independent of the position encoding, which the
--- client only knows once the server has answered `initialize`). A characterwise visual
--- selection ("v") that matches the command's lines is taken exactly; anything else is whole
--- lines; no range means the cursor line.
--- Returns {lines = {line1, line2}} or {chars = {row1, col1, row2, col2 | "eol"}} (0-based rows,
--- byte columns, col2 exclusive; "eol": through the line break).
function M.capture(opts, bufnr)
  if not opts or (opts.range or 0) == 0 then
    local row = vim.api.nvim_win_get_cursor(0)[1]
    return { lines = { row, row } }
  end
  local line1, line2 = opts.line1, opts.line2
  local vs = vim.api.nvim_buf_get_mark(bufnr, "<")
  local ve = vim.api.nvim_buf_get_mark(bufnr, ">")
  if opts.range == 2 and vim.fn.visualmode() == "v" and vs[1] == line1 and ve[1] == line2 then
    local text = line_text(bufnr, ve[1] - 1)
    local finish
    if vim.o.selection == "exclusive" then -- '> is just past the selection
      finish = math.min(ve[2], #text)
    elseif ve[2] >= #text then -- the selection takes the line break
      finish = "eol"
    else -- '> is the first byte of the last character: take the whole character
      local last = vim.str_utf_end and vim.str_utf_end(text, ve[2] + 1) or 0
      finish = ve[2] + 1 + last
    end
    return { chars = { vs[1] - 1, vs[2], ve[1] - 1, finish } }
  end
  return { lines = { line1, line2 } }
end

--- A captured range (M.capture) as an LSP Range in the position encoding.
function M.to_lsp(bufnr, cap, encoding)
  if cap.lines then
    return M.lines(bufnr, cap.lines[1], cap.lines[2], encoding)
  end
  local r1, c1, r2, c2 = unpack(cap.chars)
  local start = { line = r1, character = column(bufnr, r1, c1, encoding) }
  local finish
  if c2 == "eol" then
    finish = M.lines(bufnr, r2 + 1, r2 + 1, encoding)["end"]
  else
    finish = { line = r2, character = column(bufnr, r2, c2, encoding) }
  end
  return { start = start, ["end"] = finish }
end

--- The range a user command runs on (M.capture, then M.to_lsp).
function M.from_command(opts, bufnr, encoding)
  return M.to_lsp(bufnr, M.capture(opts, bufnr), encoding)
end

--- The last line (0-based) an LSP range covers: an end at the start of a later line does not count.
function M.last_line(range)
  local last = range["end"].line
  if range["end"].character == 0 and last > range.start.line then
    return last - 1
  end
  return last
end

--- "calc.py:4-5" for headers.
function M.label(bufnr, range)
  local name = vim.fn.fnamemodify(vim.api.nvim_buf_get_name(bufnr), ":t")
  local first = range.start.line + 1
  local last = M.last_line(range) + 1
  if last <= first then
    return ("%s:%d"):format(name, first)
  end
  return ("%s:%d-%d"):format(name, first, last)
end

return M
