"""The fast engine's model math (a mixin of ``FastEngine``): what one step computes.

* ``_rows_forward``: the layer stack for a step's query rows, each row a token at a position of
  a cache slot (K/V written there, attention over that slot's first ``length`` positions);
* ``_decode_step``: batch rows 0..B-1 = slots, one token each (captured as a CUDA graph per
  batch and length bucket); ``_verify_step``: the speculative step, rows grouped by request
  (the last token, then drafts), a graph per length bucket;
* ``_sample``: repetition penalty, greedy or temperature / top-k / top-p and a counter-based
  draw, on the device;
* ``_prefill``: a prompt (or the part after a reused prefix) into a slot's cache.

Everything here is static-shape torch (plus the Triton kernels of ``mqa_triton`` on CUDA): no
host sync inside a step. The state it reads and writes (weights, cache, per-slot buffers) is
set up by ``FastEngine.__init__``.
"""

from __future__ import annotations

_M32 = 0xFFFFFFFF

# a GEMM of at most this many rows is a decode step's (weight-bound, GEMV-like); more: a prefill's
FEW_ROWS = 64
FC_PAD_ROWS = 16  # c_fc's rows in a step of fewer live rows where start-up timing chose it


def _mix32(x):
    """A 32-bit integer hash in int64 arithmetic (every product stays under 2**63)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    x = x ^ (x >> 16)
    return x


def _uniform(h):
    """A uniform number in (0, 1) from a 32-bit hash: 23 bits, so ``+ 0.5`` stays exact in
    float32 and u < 1 (from 24 bits the largest rounded to 1.0: -log(u) = -0, and a candidate
    of probability 0 scored 0 / -0 = NaN, which argmax takes: a token outside top-k / top-p,
    a few times per million draws). ``sample_triton._draw_kernel`` computes the same."""
    return ((h >> 9).float() + 0.5) * (1.0 / 8388608.0)


class StepMath:
    """Model math of ``FastEngine`` (see the module docstring)."""

    def _torch_attention(self, q, kv, lengths, bias):
        """q (B,H,D); kv (B,Lc,2D); every query head is a row against the one K/V head."""
        torch = self._torch
        D = self.head_dim
        Lc = kv.shape[1]
        if bias is None:
            bias = self._length_bias(lengths, Lc, q.dtype)
        k = kv[:, :, :D]
        v = kv[:, :, D:]
        scores = torch.baddbmm(bias[:, None, :], q, k.transpose(1, 2), alpha=self.scale)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs, v)

    def _mlp_out(self, x, layer):
        F = self._torch.nn.functional
        ln2w, ln2b, fcw, fcb, pw, pb = layer[6:]
        h = F.layer_norm(x, (self.n_embd,), ln2w, ln2b, self.eps)
        h = F.gelu(F.linear(h, fcw, fcb), approximate="tanh")
        return x + F.linear(h, pw, pb)

    def _decode_step(self, B: int, Lc: int) -> None:
        """One decoding step for batch rows (= slots) 0..B-1 with attention over at most Lc
        positions. Static shapes, no host sync: capturable as one CUDA graph."""
        torch = self._torch
        maxp = self.max_len
        rows = self._rows[:B]
        tok, pos, active = self.tok[:B], self.pos[:B], self.active[:B]
        live = active & (pos < maxp)
        wpos = torch.where(live, pos, maxp)  # idle rows write the scratch position
        lengths = torch.where(live, (pos + 1).clamp(max=Lc), 1)
        triton_attn = self._triton.get((B, Lc))
        bias = None if triton_attn is not None else self._length_bias(lengths, Lc)
        in_kernel = triton_attn is not None and self.kv_in_attention

        def attend(q, cache, new):
            if in_kernel:  # the kernel takes this step's K/V from the QKV output and writes the cache
                return triton_attn(q, cache[:B, :Lc], lengths, self.scale, new=new, wpos=wpos)
            cache.index_put_((rows, wpos), new)
            if triton_attn is not None:
                return triton_attn(q, cache[:B, :Lc], lengths, self.scale)
            return self._torch_attention(q, cache[:B, :Lc], lengths, bias)
        logits = self._rows_forward(tok, pos.clamp(max=maxp - 1), attend)
        new = self._sample(logits, slice(0, B), pos)
        # idle rows (a slot whose prompt is still going in among them) mark the spare row
        self.seen.index_put_((torch.where(live, rows, self.slots), new), torch.ones_like(new, dtype=torch.bool))
        tok.copy_(new)
        pos.add_(1)

    def _verify_step(self, Lc: int) -> None:
        """The speculative step: R query rows (``spec_*`` buffers, rows ``spec_used``), grouped by
        request: the first row of a group is the request's last token at its position p, the
        next ones its drafted tokens at p + 1, p + 2 … (``spec_off``; ``spec_start`` is the
        group's first row; ``spec_slot`` its slot). Every row attends causally to its slot's
        cache and samples exactly as a plain decode step at that position would (the penalty
        sees the group's drafts before it as seen tokens; the same counter-based draw), so a
        draft is kept iff the row before it sampled it, and the tokens kept are those plain
        decoding gives. The step advances each slot's token, position and seen mask by what it
        kept and writes the samples and the kept flags (``spec_out``). Static shapes, no host
        sync: one graph per length bucket."""
        torch = self._torch
        R, S, maxp = self.spec_tokens, self.slots, self.max_len
        inp, slots, off, start = self.spec_in, self.spec_slot, self.spec_off, self.spec_start
        used = self.spec_used.bool()
        pos = self.pos.index_select(0, slots) + off
        wpos = torch.where(used & (pos < maxp), pos, maxp)  # unused rows write the scratch position
        lengths = torch.where(used, (pos + 1).clamp(max=Lc), 1)
        triton_attn = self._triton.get(("verify", Lc))
        bias = None if triton_attn is not None else self._length_bias(lengths, Lc)

        def attend(q, cache, new):  # rows read each other's new K/V: written first
            cache.index_put_((slots, wpos), new)
            if triton_attn is not None:
                return triton_attn(q, cache, lengths, self.scale, slots=slots)
            return self._torch_attention(q, cache[:, :Lc].index_select(0, slots), lengths, bias)
        logits = self._rows_forward(inp, pos.clamp(max=maxp - 1), attend)
        # row i's context holds the drafts of its group before it
        tr, tc = self._spec_tri_rows, self._spec_tri_cols
        earlier = (start[tr] == start[tc]) & (off[tc] >= 1)
        # every write is True (pairs that do not count go to a spare column): duplicates agree
        extra = torch.zeros((R, self.vocab + 1), device=logits.device, dtype=torch.bool)
        extra.index_put_((tr, torch.where(earlier, inp[tc], self.vocab)), self._spec_tri_true)
        seen = self.seen.index_select(0, slots) | extra[:, : self.vocab]
        out = self._sample(logits, slots, pos, seen)
        # row r + 1 holds the next draft of row r's group
        has_next = torch.cat([(start[1:] == start[:-1]) & used[1:], self._spec_false])
        rejected = (has_next & torch.cat([out[:-1] != inp[1:], self._spec_false])).long()
        before = rejected.cumsum(0) - rejected  # rejections in rows < r
        kept = used & ((off == 0) | (before == before[start]))  # no rejection in the group before r
        last = kept & ~torch.cat([kept[1:] & has_next[:-1], self._spec_false])
        self.pos.index_add_(0, torch.where(kept, slots, S), self._spec_ones)
        self.tok.index_put_((torch.where(last, slots, S),), out)
        self.seen.index_put_((torch.where(kept, slots, S), out), self._spec_true)
        self.spec_out[:R].copy_(out)
        self.spec_out[R:].copy_(kept.long())

    def _length_bias(self, lengths, Lc: int, dtype=None):
        """Additive attention mask (rows, Lc) for the torch attention: -inf past each row's length."""
        torch = self._torch
        return torch.zeros((lengths.shape[0], Lc), device=lengths.device, dtype=dtype or self.dtype).masked_fill(
            self._arange_len[:Lc][None, :] >= lengths[:, None], float("-inf")
        )

    def _rows_forward(self, tok, epos, attend):
        """The layer stack for one step's B query rows: row i is token ``tok[i]`` at position
        ``epos[i]``; ``attend(q, layer_cache, new_kv)`` writes the rows' new K/V to the cache
        (each row's slot and position are the caller's) and gives their attention output.
        Returns the logits (B, V) in float32."""
        torch = self._torch
        F = torch.nn.functional
        E, H, D = self.n_embd, self.n_head, self.head_dim
        B = tok.shape[0]
        x = F.embedding(tok, self.wte) + F.embedding(epos, self.wpe)
        if self.fused:
            from .mqa_triton import bias_add_layer_norm

            h = F.layer_norm(x, (E,), self.layers[0][0], self.layers[0][1], self.eps)
        # one row: PyTorch's addmm takes the cuBLASLt bias epilogue only from 2 rows up, and at
        # one row launches a bias copy before the GEMM: the fused LayerNorm kernel writes the
        # bias into the GEMM's output instead and the GEMM accumulates onto it (beta = 1)
        prebias = self.fused and B == 1 and self.prebias
        # batch 1: Triton one-row GEMVs for the weights where start-up timing chose them
        gv = self._gemv if (self.fused and B == 1) else {}
        qkv_buf = None
        for li, layer in enumerate(self.layers):
            ln1w, ln1b, aw, ab, cw, cb = layer[:6]
            if not self.fused:
                h = F.layer_norm(x, (E,), ln1w, ln1b, self.eps)
            if "qkv" in gv:
                qkv = self._gv("qkv", li, aw)(h, ab)
            elif qkv_buf is not None:
                qkv = qkv_buf.addmm_(h, aw.t())
            else:
                qkv = F.linear(h, aw, ab)
            self._prefetch(cw, 2.5)  # while the cache write and the attention run
            a = attend(qkv[:, :E].view(B, H, D), self.cache[li], qkv[:, E:])
            if self.fused:
                ln2w, ln2b, fcw, fcb, pw, pb = layer[6:]
                if "attn_proj" in gv:
                    self._gv("attn_proj", li, cw)(a.reshape(B, E), out=x, accumulate=True)
                else:
                    x.addmm_(a.reshape(B, E), cw.t())  # residual as the GEMM's C operand (in place: no copy)
                self._prefetch(fcw)  # while the norm runs
                if "fc" in gv:
                    h = bias_add_layer_norm(x, cb, ln2w, ln2b, self.eps)
                    g = self._gv("fc", li, fcw)(h, fcb, gelu=True)
                    self._prefetch(pw)
                elif prebias:
                    g = torch.empty((B, fcw.shape[0]), device=x.device, dtype=x.dtype)
                    h = bias_add_layer_norm(x, cb, ln2w, ln2b, self.eps, fill=(g, fcb))
                    g.addmm_(h, fcw.t())
                    self._prefetch(pw)  # while the GELU runs
                    g = F.gelu(g, approximate="tanh")
                else:
                    # GELU (tanh) in c_fc's epilogue; for FC_PAD_ROWS rows, B of them live, where
                    # start-up timing chose it (cuBLAS serves 8 rows with a slower kernel than 16
                    # on some cards: H200 80 against 73.5 us). A GEMM's output row depends on its
                    # own input row only, so the unwritten rows change nothing
                    h = torch.empty((FC_PAD_ROWS if B in self.fc_padded else B, E), device=x.device, dtype=x.dtype)
                    bias_add_layer_norm(x, cb, ln2w, ln2b, self.eps, out=h[:B])
                    g = self._fc_gelu(h, fcw, fcb)[:B]
                    self._prefetch(pw)
                if "mlp_proj" in gv:
                    self._gv("mlp_proj", li, pw)(g, out=x, accumulate=True)
                else:
                    x.addmm_(g, pw.t())
                self._prefetch(self.layers[li + 1][2] if li + 1 < self.n_layer else self.lm_head)  # while the norm runs
                nw, nb = (self.layers[li + 1][0], self.layers[li + 1][1]) if li + 1 < self.n_layer else self.ln_f
                if prebias and li + 1 < self.n_layer and "qkv" not in gv:
                    nab = self.layers[li + 1][3]
                    qkv_buf = torch.empty((B, nab.shape[0]), device=x.device, dtype=x.dtype)
                    h = bias_add_layer_norm(x, pb, nw, nb, self.eps, fill=(qkv_buf, nab))
                else:
                    h = bias_add_layer_norm(x, pb, nw, nb, self.eps)
            else:
                x = x + F.linear(a.reshape(B, E), cw, cb)
                x = self._mlp_out(x, layer)
        if not self.fused:
            h = F.layer_norm(x, (E,), self.ln_f[0], self.ln_f[1], self.eps)
        if "lm_head" in gv:
            logits = self._gv("lm_head", -1, self.lm_head)(h).float()
        else:
            logits = F.linear(h, self.lm_head).float()
        if self._side is not None and self._l2 is not None:  # the side stream joins the step (a captured graph needs it)
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        return logits

    def _prefetch(self, weight, windows: float = 1.0) -> None:
        """With an L2 prefetch chosen at start (CUDA graphs only): on a side stream, once the
        work launched so far is done, bring the first ``windows`` x ``prefetch_bytes`` of
        ``weight`` (the next GEMM's) into L2, while the main stream's small kernels (norm,
        attention, GELU) leave the memory bus idle. Changes no value; a no-op otherwise."""
        if self._l2 is None:
            return
        nbytes = int(self.prefetch_bytes * windows)
        if self._side is None:  # tests on the CPU: inline
            self._l2(weight, nbytes)
            return
        torch = self._torch
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            self._l2(weight, nbytes)

    def _sample(self, logits, rows, pos, seen=None):
        """Repetition penalty → greedy (temperature 0) or temperature → top-k → top-p → draw.
        ``rows`` (a slice, or an index tensor: one slot per logits row) picks each row's
        sampling parameters; ``seen`` overrides the rows' seen-token masks. The draw is
        exponential-race sampling with a counter-based hash of (seed, position, candidate
        rank), so it needs no generator state. With ``self.sample_kernels`` (CUDA, checked at
        start) the same in three kernels (``sample_triton``)."""
        torch = self._torch
        if self.sample_kernels:
            from .sample_triton import sample

            slots = self._rows[rows] if isinstance(rows, slice) else rows
            if seen is None:
                seen, seen_rows = self.seen, slots
            else:
                seen_rows = self._arange_len[: logits.shape[0]]
            return sample(logits, slots, pos, seen, seen_rows, self._sample_params, self.top_k_cap)
        pen = self.penalty[rows][:, None]
        penalized = torch.where(logits < 0, logits * pen, logits / pen)
        logits = torch.where(self.seen[rows] if seen is None else seen, penalized, logits)
        greedy = logits.argmax(dim=-1)
        temp = self.temp[rows]
        vals, idx = torch.topk(logits, self.top_k_cap, dim=-1)
        vals = vals / temp.clamp(min=1e-4)[:, None]
        k = self.topk[rows]
        vals = vals.masked_fill(self._ranks[None, :] >= k[:, None], float("-inf"))
        probs = torch.softmax(vals, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before > self.topp[rows][:, None], 0.0)
        h = _mix32((self.seed[rows] + 0x632BE5AB) & _M32)
        h = _mix32((h ^ (pos & _M32)) & _M32)
        h = _mix32((h[:, None] ^ ((self._ranks[None, :] * 0x61C88647) & _M32)) & _M32)
        choice = (probs / -torch.log(_uniform(h))).argmax(dim=-1)
        sampled = idx.gather(1, choice[:, None]).squeeze(1)
        return torch.where(temp > 0, sampled, greedy)

    def _prefill(self, slot: int, ids: list[int], start: int, all_logits: bool = False):
        """Run ``ids`` at positions start.. for one slot (its cache holds positions < start);
        writes their K/V and returns the last position's logits (1, V) in float32 (every
        position's with ``all_logits``: the bench's teacher-forced check).

        With ``self.fused`` (CUDA, self-checked) the prefill uses the decode step's fused ops:
        the residual is the C operand of the projection GEMMs (``x.addmm_``: no separate add
        pass over T x E), GELU is the c_fc GEMM's epilogue where timing chose it (no pass over
        T x 24576 in and out), and the projection bias + the next LayerNorm are one Triton
        kernel. A prompt without a reused prefix attends to K/V straight from the QKV output
        (the cache is written in the same pass, one copy of T x 256), a suffix to the cache;
        both through ``_prefill_attn`` (``self.prefill_attention``, chosen at start by timing:
        an SDPA path or the Triton MQA kernel)."""
        torch = self._torch
        F = torch.nn.functional
        E, H, D = self.n_embd, self.n_head, self.head_dim
        T = len(ids)
        S = start + T
        tok = self._ids_on_device(ids)
        x = F.embedding(tok, self.wte) + self.wpe[start:S]
        fused = self.fused
        if fused:
            from .mqa_triton import bias_add_layer_norm

            h = F.layer_norm(x, (E,), self.layers[0][0], self.layers[0][1], self.eps)
        for li, layer in enumerate(self.layers):
            ln1w, ln1b, aw, ab, cw, cb = layer[:6]
            if not fused:
                h = F.layer_norm(x, (E,), ln1w, ln1b, self.eps)
            qkv = F.linear(h, aw, ab)
            cache = self.cache[li, slot]
            cache[start:S].copy_(qkv[:, E:])
            q = qkv[:, :E].view(T, H, D).transpose(0, 1)[None]  # (1, H, T, D)
            if start == 0:
                k = qkv[:, E : E + D][None, None]
                v = qkv[:, E + D :][None, None]
            else:
                k = cache[:S, :D][None, None]
                v = cache[:S, D:][None, None]
            a = self._prefill_attn(q, k, v)[0].transpose(0, 1).reshape(T, E)
            if fused:
                ln2w, ln2b, fcw, fcb, pw, pb = layer[6:]
                x.addmm_(a, cw.t())
                h = bias_add_layer_norm(x, cb, ln2w, ln2b, self.eps)
                g = self._fc_gelu(h, fcw, fcb)
                del h
                x.addmm_(g, pw.t())
                del g
                last = li + 1 == self.n_layer
                nw, nb = self.ln_f if last else (self.layers[li + 1][0], self.layers[li + 1][1])
                if last and not all_logits:  # only the last row's hidden state is needed
                    x[-1:].add_(pb)
                    h = F.layer_norm(x[-1:], (E,), nw, nb, self.eps)
                else:
                    h = bias_add_layer_norm(x, pb, nw, nb, self.eps)
            else:
                x = x + F.linear(a, cw, cb)
                x = self._mlp_out(x, layer)
        if not fused:
            h = F.layer_norm(x if all_logits else x[-1:], (E,), self.ln_f[0], self.ln_f[1], self.eps)
        elif not all_logits:
            h = h[-1:]
        return F.linear(h, self.lm_head).float()

    def _ids_on_device(self, ids: list[int]):
        """Token ids as a device tensor without waiting for the device: from pinned memory the
        copy is queued behind the step in flight (``torch.tensor(..., device=cuda)`` copies
        from pageable memory and synchronises the stream: the host would wait for that step)."""
        torch = self._torch
        host = torch.tensor(ids, dtype=torch.long)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _fc_gelu(self, h, fcw, fcb):
        """GELU(h @ fcw.T + fcb), tanh form: in the GEMM's epilogue where the start-up chose it
        for GEMMs of this many rows (``_choose_gelu_fusion``), else a GELU kernel after it."""
        if self.gelu_epilogue == "tanh" and self.gelu_fused["prefill" if h.shape[0] > FEW_ROWS else "decode"]:
            return self._torch._addmm_activation(fcb, h, fcw.t(), use_gelu=True)
        F = self._torch.nn.functional
        return F.gelu(F.linear(h, fcw, fcb), approximate="tanh")

    def _prefill_attn(self, q, k, v):
        """Causal attention of the last T positions' queries q (1,H,T,D) against one K/V head
        (1,1,S,D) of positions 0..S-1: S = T for a whole prompt, S > T for a suffix after a
        cached prefix (the diagonal at the bottom right). Returns (1,H,T,D), maybe a view."""
        mode = self.prefill_attention
        if mode.startswith("triton"):
            from .prefill_triton import prefill_attention

            return prefill_attention(q[0], k[0, 0], v[0, 0], self.scale, mode).permute(1, 0, 2)[None]
        if mode == "sdpa_gqa" or k.shape[-2] != q.shape[-2]:  # the other SDPA paths: whole prompts
            return _sdpa_mqa(q, k, v, self.scale)
        F = self._torch.nn.functional
        H = q.shape[1]
        if mode.endswith("_gqa"):
            kw = dict(enable_gqa=True)
        else:
            k = k.expand(-1, H, -1, -1)  # stride-0 view: no copy of the single head
            v = v.expand(-1, H, -1, -1)
            kw = {}
        with self._sdpa_backend(mode):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, **kw)

    def _sdpa_backend(self, mode: str):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        name = mode.split("_")[0]
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
        return sdpa_kernel([backend])


def _sdpa_mqa(q, k, v, scale):
    """Prefill attention through SDPA's own choice: q (1,H,T,D), the last T positions, against
    one K/V head (1,1,S,D) of positions 0..S-1, causal with the diagonal at the bottom right."""
    import torch
    import torch.nn.functional as F

    T, S = q.shape[-2], k.shape[-2]
    mask = None
    if S != T:
        try:  # bottom-right causal without a materialised mask (flash / memory-efficient kernels)
            from torch.nn.attention.bias import causal_lower_right

            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S), scale=scale, enable_gqa=True)
        except Exception:
            mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(S - T, S, device=q.device)[:, None]
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
    except (TypeError, RuntimeError):
        H = q.shape[1]
        k = k.expand(-1, H, -1, -1)
        v = v.expand(-1, H, -1, -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
