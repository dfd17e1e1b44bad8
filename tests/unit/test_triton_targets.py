"""Every Triton kernel the fast engine launches compiles for the GPUs StarChat fits on, at its
real shapes, without spilling registers (lsp_server/testing/triton_targets.py). The other
kernel tests run in Triton's interpreter, which never lowers a kernel to PTX: this is where a
kernel that the backend or ptxas rejects fails before it reaches a GPU."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
KERNEL_FILES = sorted((ROOT / "lsp_server/engine").glob("*_triton.py"))
HELPERS = {"_mix32"}  # @triton.jit functions called from kernels, never launched


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lsp_server.testing.triton_targets", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_launch_compiles_for_every_architecture(rows):
    from lsp_server.testing.triton_targets import ARCHS

    errors = [f"{r['arch']} {r['launch']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    labels = {r["launch"] for r in rows}
    for cap in ARCHS:
        assert {r["launch"] for r in rows if r["arch"] == f"sm_{cap}"} == labels
    assert all(r.get("kernel") for r in rows)


def test_every_kernel_in_the_engine_is_covered(rows):
    jitted = set()
    for path in KERNEL_FILES:
        jitted |= set(re.findall(r"@triton\.jit\b[^\n]*\n\s*def (\w+)", path.read_text()))
    assert jitted - HELPERS == {r["kernel"] for r in rows}


def test_no_spills_and_shared_memory_fits(rows):
    for r in rows:
        where = f"{r['arch']} {r['launch']} {r['kernel']}"
        assert r["local"] == 0 and r["stack"] == 0, f"{where} spills: {r}"
        assert r["shared_dynamic"] + r["shared_static"] <= r["shared_limit"], where
        assert 0 < r["reg"] <= 255, where


def test_the_l2_prefetch_reaches_the_hardware_as_evict_last(rows):
    by_launch = {(r["arch"], r["launch"]): r for r in rows}
    for cap in ("sm_80", "sm_90"):
        assert by_launch[(cap, "l2 prefetch load")]["l2_evict_last"] > 0  # ld ... L2::cache_hint, evict-last policy
        assert by_launch[(cap, "l2 prefetch prefetch")]["l2_evict_last"] > 0  # prefetch.global.L2::evict_last
        assert by_launch[(cap, "attention L2048 B8")]["l2_evict_last"] == 0
