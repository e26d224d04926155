"""Registers, spills and shared memory of the Triton attention kernels on sm_90, without a GPU.

Compiles each kernel ahead of time for Hopper (Triton bundles ptxas and cuobjdump) with the
16-byte pointer and stride alignment the launcher gets at run time, and reads the cubin's
resource usage. A config that spills (STACK > 0) or needs more than 227 KB of shared memory is
a poor autotune candidate whatever the GPU says; this is how the dk/dv kernel's spills in every
config were found in a session without a GPU.

    python -m benchmarks.triton_regs                          # the autotune configs
    python -m benchmarks.triton_regs --kernels dkdv --sweep   # every tile/warps/stages combination
    python -m benchmarks.triton_regs --kernels fwd --page 16 --kv fp8   # paged prefill over an fp8 cache
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpt_engine.kernels import triton_attention as ta

KERNELS = {"fwd": (ta._fwd_kernel, ta._FWD_CONFIGS), "dq": (ta._dq_kernel, ta._DQ_CONFIGS),
           "dkdv": (ta._dkdv_kernel, ta._DKDV_CONFIGS)}
SMEM_LIMIT = 232448  # bytes of shared memory a block may use on sm_90
_FP32_PTRS, _FLOATS, _INTS = {"LSE", "DELTA", "KS", "VS"}, {"qk_scale", "scale"}, {"H", "HKV", "GROUP"}
_KV_TYPES = {"bf16": "*bf16", "int8": "*i8", "fp8": "*fp8e4nv"}  # a paged cache's formats (kv_cache_dtype)
_I32_PTRS = {"CU_Q", "CU_K", "BT"}  # offsets and block table (unused, and then any pointer, when dense)


def _cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise SystemExit(f"no cuobjdump at {path}: this Triton build has no bundled CUDA tools")
    return path


def compile_sm90(fn, constexprs: dict, num_warps: int, num_stages: int, kv: str = "bf16"):
    """fn compiled for sm_90a, bf16 tensors (K and V in the cache format kv). As at run time, where Triton
    specializes pointers and ints divisible by 16, pointers and strides are marked so: true of the shapes
    that matter (sequence lengths and H*D multiples of 16)."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name in _I32_PTRS:
            sig[name] = "*i32"
        elif name in ("K", "V"):
            sig[name] = _KV_TYPES[kv]
        elif name in _FLOATS:
            sig[name] = "fp32"
        elif name[0].isupper() and name not in _INTS:
            sig[name] = "*bf16"
        else:
            sig[name] = "i32"
        if sig[name].startswith("*") or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, {k: v for k, v in constexprs.items() if k in fn.arg_names}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 128),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def usage(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return dict(regs=int(m.group(1)), spill_bytes=int(m.group(2)), smem=compiled.metadata.shared)


def rows(kernels, head_dims, sweep, causal=True, varlen=False, page=0, kv="bf16"):
    for name in kernels:
        fn, configs = KERNELS[name]
        for d in head_dims:
            consts = dict(HEAD_D=d, BLOCK_D=triton.next_power_of_2(d), CAUSAL=causal, VARLEN=varlen or page > 0,
                          PAGED=page > 0, PREC="tf32", PAGE=max(page, 1), SCALED=kv != "bf16")
            if sweep:
                cands = itertools.product((16, 32, 64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
            else:
                cands = ((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs)
            for m, n, w, s in cands:
                row = dict(kernel=name, D=d, BLOCK_M=m, BLOCK_N=n, warps=w, stages=s)
                try:
                    row.update(usage(compile_sm90(fn, dict(consts, BLOCK_M=m, BLOCK_N=n), w, s, kv)))
                    row["ok"] = row["spill_bytes"] == 0 and row["smem"] <= SMEM_LIMIT
                except Exception as e:  # a config the compiler rejects is a finding, not a crash
                    row.update(error=f"{type(e).__name__}: {str(e)[:80]}", ok=False)
                print(row, flush=True)
                yield row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default="fwd,dq,dkdv")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--sweep", action="store_true", help="all tile/warps/stages combinations, not the autotune list")
    ap.add_argument("--varlen", action="store_true", help="packed sequences (cu_seqlens)")
    ap.add_argument("--page", type=int, default=0, help="paged K/V with this block size (forward only)")
    ap.add_argument("--kv", choices=list(_KV_TYPES), default="bf16",
                    help="the paged cache's format (int8 / fp8 with their row scales; needs --page)")
    args = ap.parse_args()
    if args.kv != "bf16" and (args.page <= 0 or args.kernels != "fwd"):
        ap.error("--kv int8/fp8 is a paged cache's format: --kernels fwd --page N")
    from benchmarks.common import md_table
    out = list(rows(args.kernels.split(","), [int(d) for d in args.head_dims.split(",")], args.sweep,
                    varlen=args.varlen, page=args.page, kv=args.kv))
    print(f"\ntriton {triton.__version__}, sm_90a\n")
    print(md_table(out, ["kernel", "D", "BLOCK_M", "BLOCK_N", "warps", "stages", "regs", "spill_bytes", "smem", "ok"]))


if __name__ == "__main__":
    main()
