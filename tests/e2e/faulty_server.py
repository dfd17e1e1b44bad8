"""The real server with one fault injected where it would really happen, for tests.

    python tests/e2e/faulty_server.py oom SERVER-ARGS...

``oom``: the first ``model.generate`` call raises CUDA's OutOfMemoryError, as the allocator
would mid-request; later calls run normally.
"""

import sys

import torch
from transformers import GenerationMixin

from lsp_server.cli import main

fault, args = sys.argv[1], sys.argv[2:]
if fault == "oom":
    original = GenerationMixin.generate
    calls = []

    def generate(self, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *a, **k)

    GenerationMixin.generate = generate
sys.exit(main(args))
