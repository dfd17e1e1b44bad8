--- A text "screenshot" of what a user would see: every window of the current tab page with its
--- winbar, visible buffer lines and status line, vertical separators, and the last message.
--- (Headless Neovim has no UI grid to read, so the layout is rebuilt from the window API.)
local M = {}

local function put(grid, row, col, text, width)
  local line = grid[row + 1]
  if not line then
    return
  end
  local chars = vim.fn.split(text, "\\zs")
  for i = 1, math.min(#chars, width) do
    line[col + i] = chars[i]
  end
end

local function eval_line(fmt, win, winbar)
  local ok, res = pcall(vim.api.nvim_eval_statusline, fmt, { winid = win, use_winbar = winbar, maxwidth = vim.api.nvim_win_get_width(win) })
  return ok and res.str or ""
end

function M.capture(message)
  local rows, cols = vim.o.lines, vim.o.columns
  local grid = {}
  for r = 1, rows do
    grid[r] = {}
    for c = 1, cols do
      grid[r][c] = " "
    end
  end
  for _, win in ipairs(vim.api.nvim_tabpage_list_wins(0)) do
    local cfg = vim.api.nvim_win_get_config(win)
    if cfg.relative == "" then
      local pos = vim.api.nvim_win_get_position(win)
      local row, col = pos[1], pos[2]
      local height, width = vim.api.nvim_win_get_height(win), vim.api.nvim_win_get_width(win)
      local buf = vim.api.nvim_win_get_buf(win)
      local winbar = vim.wo[win].winbar
      if winbar ~= "" then
        put(grid, row, col, eval_line(winbar, win, true), width)
        row = row + 1
      end
      local info = vim.fn.getwininfo(win)[1]
      local lines = vim.api.nvim_buf_get_lines(buf, info.topline - 1, -1, false)
      local numberwidth = vim.wo[win].number and math.max(vim.wo[win].numberwidth, #tostring(vim.api.nvim_buf_line_count(buf)) + 1) or 0
      local r = 0
      for i, text in ipairs(lines) do
        if r >= height then
          break
        end
        local prefix = numberwidth > 0 and string.format("%" .. (numberwidth - 1) .. "d ", info.topline + i - 1) or ""
        local avail = width - #prefix
        local chars = vim.fn.split(text, "\\zs")
        local first = true
        repeat
          local chunk = table.concat(vim.list_slice(chars, 1, avail))
          chars = vim.list_slice(chars, avail + 1)
          put(grid, row + r, col, (first and prefix or string.rep(" ", #prefix)) .. chunk, width)
          first = false
          r = r + 1
        until #chars == 0 or not vim.wo[win].wrap or r >= height
      end
      for rr = r, height - 1 do
        put(grid, row + rr, col, "~", width)
      end
      local status = vim.o.statusline ~= "" and vim.o.statusline or "%f %h%m%r%=%l,%c"
      local wstatus = vim.wo[win].statusline ~= "" and vim.wo[win].statusline or status
      put(grid, row + height, col, eval_line(wstatus, win, false), width)
      if col + width < cols then
        for rr = row, row + height do
          put(grid, rr, col + width, "│", 1)
        end
      end
    end
  end
  put(grid, rows - 1, 0, message or "", cols)
  local out = {}
  for r = 1, rows do
    out[r] = (table.concat(grid[r]):gsub("%s+$", ""))
  end
  return table.concat(out, "\n") .. "\n"
end

return M
