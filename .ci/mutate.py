#!/usr/bin/env python3
"""Mutation run over the core modules: `make mutate` (or .ci/mutate.py [--list] [--dry-run] [NAME...]).

Each mutation below is (name, file, exact source snippet, replacement, pytest targets, must-kill).
The snippet must occur exactly once in the file: one that is missing (the code moved or changed)
or ambiguous is an error ("stale mutation"), never silently skipped; `--dry-run` checks them all,
and names the files where a missing snippet now lives. To update after a refactor: fix `file`
(and the snippet if the code changed) in the table; keep the targets to the few tests that
should catch the change, so a run stays well under 30 minutes on 2 cores.

The working tree is never modified. The repository (git ls-files --cached --others
--exclude-standard, plus the built extension kernels/_C*.so) is copied once into a temporary
directory, where the package is laid out as it is installed (pkgroot/gpt_engine = engine/,
pkgroot/gpt_engine/kernels = kernels/). Each mutation is applied to that copy, pytest runs from
the copy with PYTHONPATH=pkgroot (checked: gpt_engine resolves into the copy, not the editable
install), and the file is restored before the next one. Mutations run one after another, each
with -x. A mutation is killed when its targets fail; it survives when they pass.

Prints the score (killed/total) and the survivors; exits 1 if a must-kill mutation survived,
2 on a stale mutation, a failing baseline or an unusable copy.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KV, SCHED, SAMP = "tests/test_kv_cache.py", "tests/test_scheduler.py", "tests/test_sampling.py"
AUTH = "tests/test_auth_errors.py"
NORM, ATTN, LLM_T = "tests/test_norm.py", "tests/test_attention.py", "tests/test_llm.py"

# name, file, snippet (exact, once), replacement, pytest targets, must-kill
MUTATIONS = [
    # ---- kv_cache: prefix hashes, ref counts, free lists
    ("kv-hash-ignores-parent", "engine/core/block_manager.py",
     "h = hashlib.sha256(parent or b\"\")", "h = hashlib.sha256()", [KV], True),
    ("kv-commit-no-chain", "engine/core/block_manager.py",
     "            parent = b.hash\n", "            pass\n", [KV], True),
    ("kv-lookup-no-chain", "engine/core/block_manager.py",
     "                parent = h\n", "                pass\n", [KV], True),
    ("kv-hit-last-token", "engine/core/block_manager.py",
     "range((n - 1) // bs)", "range(n // bs)", [KV], True),
    ("kv-hit-no-ref", "engine/core/block_manager.py",
     "                b.ref_count += 1\n", "                b.ref_count = 1\n", [KV], True),
    ("kv-release-all-refs", "engine/core/block_manager.py",
     "        b.ref_count -= 1\n", "        b.ref_count = 0\n", [KV], True),
    ("kv-no-double-free", "engine/core/block_manager.py",
     "if b.ref_count <= 0:", "if b.ref_count < 0:", [KV], True),
    ("kv-evict-mru", "engine/core/block_manager.py",
     "self.free_cached.popitem(last=False)", "self.free_cached.popitem(last=True)", [KV], False),
    # ---- scheduler: limits, budget, preemption, the pool check
    ("sched-max-seqs", "engine/core/scheduler.py",
     "len(self.running) < self.max_num_seqs", "len(self.running) <= self.max_num_seqs", [SCHED], True),
    ("sched-no-budget", "engine/core/scheduler.py",
     "n = total - done if total - done <= budget else budget", "n = total - done", [SCHED], True),
    ("sched-preempt-keeps-computed", "engine/core/scheduler.py",
     "seq.status, seq.num_computed_tokens, seq.num_hashed_blocks = Status.WAITING, 0, 0",
     "seq.status, seq.num_hashed_blocks = Status.WAITING, 0", [SCHED], True),
    ("sched-preempt-oldest", "engine/core/scheduler.py",
     "for s in reversed(self.running) if s is not seq", "for s in self.running if s is not seq", [SCHED], True),
    ("pool-check-off", "engine/core/intake.py",
     "if -(-num_tokens // block_size) > num_blocks:", "if -(-num_tokens // block_size) > num_blocks + 1000:",
     [f"{SCHED}::test_request_that_could_outgrow_the_pool_is_refused_at_intake"], True),
    # ---- sampling
    ("sample-greedy-rows-sampled", "engine/worker/sampler.py",
     "tokens = torch.where(torch.tensor(greedy, device=dev), _argmax(logits), sampled)", "tokens = sampled",
     [SAMP], True),
    ("sample-top-k-off-by-one", "engine/worker/sampler.py",
     ">= top_k[:, None]", "> top_k[:, None]", [SAMP], True),
    ("sample-top-p-drops-crossing", "engine/worker/sampler.py",
     "(probs.cumsum(-1) - probs) >= top_p[:, None]", "probs.cumsum(-1) >= top_p[:, None]", [SAMP], True),
    ("sample-min-p-absolute", "engine/worker/sampler.py",
     "probs < min_p[:, None] * probs.amax(-1, keepdim=True)", "probs < min_p[:, None]", [SAMP], True),
    ("sample-rep-penalty-sign", "engine/worker/sampler.py",
     "torch.where(logits > 0, logits / pen, logits * pen)", "logits / pen", [SAMP], True),
    ("sample-presence-as-frequency", "engine/worker/sampler.py",
     "freq * counts + pres * (counts > 0).to(logits.dtype)", "freq * counts + pres * counts", [SAMP], True),
    ("sample-frequency-as-presence", "engine/worker/sampler.py",
     "freq * counts + pres * (counts > 0).to(logits.dtype)", "(freq + pres) * (counts > 0).to(logits.dtype)",
     [SAMP], True),
    ("sample-temperature-inverted", "engine/worker/sampler.py",
     "x = (logits / temp.clamp_max(_FMAX)[:, None])", "x = (logits * temp.clamp_max(_FMAX)[:, None])",
     [SAMP], True),
    # ---- the stop check (engine/core/request.py)
    ("stop-ignore-eos-ignored", "engine/core/request.py",
     "(frozenset() if p.ignore_eos else frozenset(eos_token_ids))", "frozenset(eos_token_ids)",
     [f"{SCHED}::test_eos_and_stop_tokens_finish", f"{LLM_T}::test_greedy_batch_matches_transformers"], True),
    ("stop-no-stop-token-ids", "engine/core/request.py",
     "self.stop_ids = frozenset(p.stop_token_ids) | ", "self.stop_ids = ",
     [f"{SCHED}::test_eos_and_stop_tokens_finish", f"{LLM_T}::test_stop_strings_and_stop_tokens"], True),
    ("stop-string-not-ending", "engine/core/request.py",
     "if req.detok is not None and req.detok.push([tok]):\n        return \"stop\"",
     "if req.detok is not None and req.detok.push([tok]):\n        pass", [f"{LLM_T}::test_stop_strings_and_stop_tokens"],
     True),
    ("stop-string-across-tokens", "engine/core/detokenizer.py",
     "k, n = self.state[j], len(s)", "k, n = 0, len(s)", [f"{LLM_T}::test_stop_strings_and_stop_tokens"],
     True),
    ("stop-max-tokens-off-by-one", "engine/core/request.py",
     "total - seq.num_prompt_tokens >= seq.params.max_tokens", "total - seq.num_prompt_tokens > seq.params.max_tokens",
     [f"{SCHED}::test_eos_and_stop_tokens_finish", f"{LLM_T}::test_greedy_batch_matches_transformers"], True),
    # ---- server (engine/api/): API-key comparison, engine errors -> 4xx
    ("auth-prefix-of-key", "engine/api/middleware.py",
     "hmac.compare_digest(key.strip().encode(), self.api_key.encode())", "self.api_key.startswith(key.strip())",
     [AUTH], True),
    ("auth-key-prefix", "engine/api/middleware.py",
     "hmac.compare_digest(key.strip().encode(), self.api_key.encode())", "key.strip().startswith(self.api_key)",
     [AUTH], True),
    ("auth-any-scheme", "engine/api/middleware.py",
     "scheme.lower() == \"bearer\" and ", "", [AUTH], True),
    ("auth-scheme-case-sensitive", "engine/api/middleware.py",
     "scheme.lower() == \"bearer\"", "scheme == \"Bearer\"", [AUTH], False),
    ("request-error-500", "engine/api/errors.py",
     "return JSONResponse(error_body(str(e), param=e.param, code=e.code), status_code=400)",
     "return JSONResponse(error_body(str(e), param=e.param, code=e.code), status_code=500)", [AUTH], True),
    # engine_error's branches: reached only by an error raised inside the engine loop (the server
    # now runs the engine's checks first), which no CPU test provokes yet
    ("engine-error-500", "engine/api/errors.py",
     "return APIError(400, str(e), param=e.param, code=e.code)", "return APIError(500, str(e), \"server_error\")",
     [AUTH], False),
    ("engine-valueerror-500", "engine/api/errors.py",
     "return APIError(400, str(e))\n", "return APIError(500, str(e), \"server_error\")\n", [AUTH], False),
    # ---- attention: bottom-right causal alignment
    ("ref-causal-top-left", "kernels/reference.py",
     "i = torch.arange(sq, device=device)[:, None] + (sk - sq)", "i = torch.arange(sq, device=device)[:, None]",
     [ATTN], True),
    ("sdpa-causal-top-left", "kernels/attention.py",
     "i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)", "i = torch.arange(sq, device=q.device)[:, None]",
     [ATTN, f"{LLM_T}::test_prefix_cache_hits_give_identical_outputs",
      f"{LLM_T}::test_chunked_prefill_and_preemption_equal_plain_runs"], True),
    # ---- norms
    ("ref-rms-eps", "kernels/reference.py",
     "torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)", "torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-2)",
     [NORM], True),
    ("ref-layer-norm-uncentered", "kernels/reference.py",
     "y = F.layer_norm(h, h.shape[-1:], _acc(weight), None if bias is None else _acc(bias), eps)",
     "y = h * torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + eps) * _acc(weight) "
     "+ (0 if bias is None else _acc(bias))", [NORM], True),
    ("layer-norm-default-eps", "kernels/norm.py",
     "def layer_norm(x, weight, bias, eps=1e-5", "def layer_norm(x, weight, bias, eps=1e-3", [NORM], True),
    ("rms-norm-default-eps", "kernels/norm.py",
     "def rms_norm(x, weight, eps=1e-6", "def rms_norm(x, weight, eps=1e-3", [NORM], True),
    # ---- debug index checks, resume, rope for prompts, w8a8
    # (the index rules themselves are C++, csrc/checks.cpp: these mutate what the debug path gives them)
    ("debug-block-id-upper", "kernels/_checks.py",
     "_host(seq_lens), k_cache.shape[0],", "_host(seq_lens), k_cache.shape[0] + 1,", ["tests/test_debug_checks.py"],
     True),
    ("debug-slot-upper", "kernels/_checks.py",
     "k_cache.shape[0] * k_cache.shape[1])", "k_cache.shape[0] * k_cache.shape[1] + 1)",
     ["tests/test_debug_checks.py"], True),
    ("resume-any-world", "engine/train/checkpoint.py",
     "and ckpt[\"world\"] != world:", "and False:", ["tests/test_train_safety.py"], True),
    ("rope-prompt-per-position", "engine/worker/model_runner.py",
     "rope_lens = [max(p + 1, n) for p, n in zip(pos, plen)]", "rope_lens = [p + 1 for p, n in zip(pos, plen)]",
     ["tests/test_checkpoints.py::test_rope_scaling_greedy"], True),
    ("w8a8-act-scale", "kernels/reference.py",
     "sx = b.abs().amax(-1) / 127.0", "sx = b.abs().amax(-1) / 127.5", ["tests/test_quant.py::test_quantize_act32"],
     True),
    ("int8-head-unquantized", "engine/models/gpt.py",
     "self.head = weight_format(self._head_owner, weight_dtype, quantization, group_size, release, int8_gemm=False)",
     "self.head = weight_format(self._head_owner, weight_dtype, None, group_size, release, int8_gemm=False)",
     ["tests/test_quant.py::test_low_formats_release_float32_gemm_weights"], True),
]

ROOT = Path(__file__).resolve().parent.parent
PER_MUTATION_TIMEOUT = 600


def copy_repo(dst: Path) -> Path:
    """The repository's files (tracked and untracked, not ignored) plus the built extension,
    into dst/src; the package as installed under dst/src/build/pkgroot. Returns pkgroot."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout
    src = dst / "src"
    for rel in filter(None, out.decode().split("\0")):
        p = ROOT / rel
        if p.is_file():  # listed but deleted in the working tree: skip
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, src / rel)
    for so in (ROOT / "kernels").glob("_C*.so"):
        shutil.copy2(so, src / "kernels" / so.name)
    pkg = src / "build" / "pkgroot" / "gpt_engine"
    shutil.copytree(src / "engine", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(src / "kernels", pkg / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    return pkg.parent


def in_pkg(pkgroot: Path, rel: str) -> Path:
    """A repository path -> the file the tests import in the copy."""
    top, _, rest = rel.partition("/")
    base = {"engine": pkgroot / "gpt_engine", "kernels": pkgroot / "gpt_engine" / "kernels"}.get(top)
    if base is None:
        raise SystemExit(f"mutation file {rel}: only engine/ and kernels/ files can be mutated")
    return base / rest


def env_for(pkgroot: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pkgroot), "PYTHONSAFEPATH": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONHOME", None)
    return env


def check_imports(src: Path, pkgroot: Path) -> None:
    code = ("import torch, gpt_engine, gpt_engine.kernels, gpt_engine.kernels._C as c, gpt_engine.core.block_manager as k;"
            "print(gpt_engine.__file__); print(gpt_engine.kernels.__file__); print(c.__file__); print(k.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=src, env=env_for(pkgroot), capture_output=True, text=True)
    files = r.stdout.split()
    print("imports from the copy:", *files, sep="\n  ")
    if r.returncode or len(files) != 4 or not all(Path(f).resolve().is_relative_to(pkgroot.resolve()) for f in files):
        print(r.stderr[-3000:])
        raise SystemExit("the copy's code is not what gets imported: refusing to run")


def find(snippet: str) -> list[str]:
    return [str(p.relative_to(ROOT)) for d in ("engine", "kernels") for p in sorted((ROOT / d).rglob("*.py"))
            if snippet in p.read_text()]


def validate(pkgroot: Path, muts) -> list[str]:
    errors = []
    for name, rel, snippet, repl, targets, _ in muts:
        f = in_pkg(pkgroot, rel)
        n = f.read_text().count(snippet) if f.is_file() else 0
        if n != 1:
            where = find(snippet) if n == 0 else [rel]
            errors.append(f"stale mutation {name}: snippet found {n} times in {rel}"
                          + (f" (now in: {', '.join(where)})" if where else ""))
        if snippet == repl:
            errors.append(f"mutation {name}: the replacement equals the snippet")
    return errors


def pytest(src: Path, pkgroot: Path, targets: list[str], timeout: int) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not gpu", *targets]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=src, env=env_for(pkgroot), capture_output=True, text=True, timeout=timeout)
        lines = (r.stdout + r.stderr).strip().splitlines()
        return r.returncode, time.time() - t0, lines[-1] if lines else ""
    except subprocess.TimeoutExpired:
        return 124, time.time() - t0, f"timed out after {timeout}s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="run only these mutations (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--dry-run", action="store_true", help="copy, check imports and snippets; run nothing")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the targets")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    a = ap.parse_args()
    muts = [m for m in MUTATIONS if not a.names or m[0] in a.names]
    if a.names and len(muts) != len(set(a.names)):
        raise SystemExit(f"unknown mutation names: {sorted(set(a.names) - {m[0] for m in MUTATIONS})}")
    if a.list:
        for name, rel, *_, targets, must in muts:
            print(f"{name:32} {'must ' if must else '     '} {rel:22} {' '.join(targets)}")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="gpt-engine-mutate-"))
    try:
        pkgroot = copy_repo(tmp)
        src = pkgroot.parent.parent
        print(f"copy: {src}")
        check_imports(src, pkgroot)
        errors = validate(pkgroot, muts)
        for e in errors:
            print("ERROR", e)
        if errors:
            return 2
        if a.dry_run:
            print(f"{len(muts)} mutations apply cleanly")
            return 0
        targets = sorted({t for m in muts for t in m[4]})
        if not a.no_baseline:  # the unmutated copy must pass, or every mutation would look killed
            rc, dt, last = pytest(src, pkgroot, targets, PER_MUTATION_TIMEOUT * 2)
            print(f"baseline: rc={rc} in {dt:.0f}s  {last}")
            if rc != 0:
                print("ERROR the targets fail without any mutation")
                return 2
        killed, survivors, t_all = [], [], time.time()
        for i, (name, rel, snippet, repl, targets, must) in enumerate(muts, 1):
            f = in_pkg(pkgroot, rel)
            orig = f.read_text()
            f.write_text(orig.replace(snippet, repl, 1))
            try:
                rc, dt, last = pytest(src, pkgroot, targets, PER_MUTATION_TIMEOUT)
            finally:
                f.write_text(orig)
            if rc in (4, 5):  # a usage error (a target that does not exist) or nothing collected
                print(f"ERROR mutation {name}: pytest rc={rc} on its targets: {last}")
                return 2
            status = "killed" if rc != 0 else "SURVIVED"
            (killed if rc != 0 else survivors).append((name, must))
            print(f"[{i:2}/{len(muts)}] {status:8} {name:32} {dt:5.0f}s  {last}", flush=True)
        print(f"\nscore: {len(killed)}/{len(muts)} killed in {time.time() - t_all:.0f}s")
        for name, must in survivors:
            print(f"  survivor: {name}{'  (MUST-KILL)' if must else ''}")
        return 1 if any(must for _, must in survivors) else 0
    finally:
        if a.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
