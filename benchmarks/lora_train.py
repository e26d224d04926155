"""LoRA training on CPU: step time and memory of our LoRA against our full fine-tuning and against peft +
transformers on the same model, in one run.

A random-init llama (untied, GQA) is saved once; each case then trains in a fresh process on the same random
token batches (fp32 compute, AdamW, gradient clipping), so one process's allocator does not flatter another:

    full         gpt_engine's trainer modules, every parameter trained
    lora         gpt_engine --lora-rank R over q,k,v,o,gate,up,down, frozen float32 base
    lora-bf16    the same, the frozen layer weights held in bf16 (--lora-base-dtype bfloat16)
    lora-int8    the same, in int8 (--lora-base-dtype int8)
    peft         transformers + peft.get_peft_model with the same LoraConfig, torch AdamW

Each reports the median step seconds over the timed steps (wall, and the process's CPU time: all its
threads, which other jobs on a shared machine disturb less), the bytes of parameters + gradients + optimizer
state, and the peak resident memory the model and training add to the process (VmHWM reset after the
imports). Timings on a shared machine vary; the ratios are taken within one run.

    python -m benchmarks.lora_train [--steps 6] [--out benchmarks/results/cpu/lora_train.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("full", "lora", "lora-bf16", "lora-int8", "peft")
MODEL = dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
RANK, ALPHA, TARGETS = 16, 32, "q,k,v,o,gate,up,down"
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ, LR = 4, 256, 1e-4


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _state_bytes(params, opt) -> int:
    """Parameters (frozen ones too, each once), their gradients and the optimizer's state tensors."""
    import torch
    seen, n = set(), 0
    for p in params:
        for t in (p, p.grad):
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                n += t.numel() * t.element_size()
    for s in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in s.values() if isinstance(v, torch.Tensor))
    return n


def _ours(case: str, model: str):
    """(step function, params to count, optimizer, extra bytes held outside parameters)."""
    import torch

    from gpt_engine.models.config import ModelConfig
    from gpt_engine.train.config import TrainConfig, resolve_defaults
    from gpt_engine.train.distributed import Dist
    from gpt_engine.train.model import build
    lora = dict(lora_rank=RANK, lora_alpha=ALPHA, lora_targets=TARGETS,
                lora_base_dtype={"lora": "float32", "lora-bf16": "bfloat16", "lora-int8": "int8"}.get(case, "float32"))
    cfg = TrainConfig(out=tempfile.mkdtemp(), init=model, steps=10, batch_size=BATCH, seq_len=SEQ, lr=LR,
                      progress=False, device="cpu", **(lora if case != "full" else {}))
    cfg = resolve_defaults(cfg, cuda=False)
    dd = Dist("cpu")
    m = build(cfg, dd, ModelConfig.load(model), fine_tune=True)

    def step(x, y):
        loss = m.model(x, y) / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.params, cfg.grad_clip)
        m.opt.step()
        m.opt.zero_grad(set_to_none=True)
    held = sum(t.numel() * t.element_size() for lin in m.lm.gpt.linears() for t in lin.format.held())
    return step, list(m.lm.parameters()), m.opt, held


def _peft(model: str):
    import peft
    import torch
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=HF_TARGETS,
                                                 lora_dropout=0.0, task_type="CAUSAL_LM")).train()
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def step(x, y):
        hf(input_ids=x, labels=y).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, list(hf.parameters()), opt, 0


def measure(case: str, model: str, steps: int) -> dict:
    """In the child process: train `steps` steps after one warm-up step; times, bytes, peak RSS."""
    import torch
    import gpt_engine  # noqa: F401  (imported before the memory baseline)
    import peft  # noqa: F401
    torch.manual_seed(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the resident size now
    rss0 = _status("VmRSS")
    step, params, opt, held = _peft(model) if case == "peft" else _ours(case, model)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ + 1), generator=g) for _ in range(steps + 1)]
    wall, cpu = [], []
    for b in batches:
        t, c = time.perf_counter(), time.process_time()
        step(b[:, :-1], b[:, 1:] if case != "peft" else b[:, :-1])  # peft's labels shift inside the model
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return dict(case=case, step_s=round(statistics.median(wall[1:]), 4),
                step_cpu_s=round(statistics.median(cpu[1:]), 4),
                trainable=sum(p.numel() for p in params if p.requires_grad),
                state_bytes=_state_bytes(params, opt) + held, peak_extra_rss=_status("VmHWM") - rss0)


def build_model(d: Path) -> None:
    import torch
    import transformers
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL)).save_pretrained(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu" / "lora_train.json"))
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # the child's side
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(measure(a.case, a.model, a.steps)))
        return
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp))
        rows = []
        for case in CASES:
            r = subprocess.run([sys.executable, "-m", "benchmarks.lora_train", "--case", case, "--model", tmp,
                                "--steps", str(a.steps)], env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    by = {r["case"]: r for r in rows}

    def ratio(a_, b_, k):
        return round(by[a_][k] / by[b_][k], 3)
    ratios = {f"{c} / {ref} {k}": ratio(c, ref, k) for c in ("lora", "lora-bf16", "lora-int8")
              for ref in ("full", "peft") for k in ("step_s", "step_cpu_s", "state_bytes", "peak_extra_rss")}
    import peft
    import torch
    import transformers
    result = dict(config=dict(model="llama (random init)", **MODEL, rank=RANK, alpha=ALPHA, targets=TARGETS,
                              batch=BATCH, seq_len=SEQ, timed_steps=a.steps, dtype="float32",
                              cpu_count=os.cpu_count(), torch=torch.__version__, transformers=transformers.__version__,
                              peft=peft.__version__, python=platform.python_version(),
                              date=time.strftime("%Y-%m-%d %H:%M:%S"),
                              note="a shared 2-core machine under load from other jobs: wall step times vary "
                                   "between runs (step_cpu_s less so); ratios are within one run"),
                  results=rows, ratios=ratios)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
