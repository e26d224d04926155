"""What a run reports: loss, tokens/s and MFU on the progress bar and in OUT/log.jsonl, and the loss plot.

MFU is model FLOPs per token (flops_per_token) x tokens/s over the devices' dense bf16 peak:
a known GPU's from PEAK_TFLOPS, or --peak-tflops; none on CPU.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..atomic import atomic_write, write_text
from ..models.config import ModelConfig
from .config import TrainConfig, global_batch
from .distributed import Dist

# the files beside the model in OUT
LOG_FILE, PLOT_FILE = "log.jsonl", "loss.png"

# dense bf16 tensor-core peak per GPU (vendor specs), for MFU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0, "4090": 165.0}


def flops_per_token(mcfg: ModelConfig, n_params: int, seq_len: int, n_adapter: int | None = None) -> float:
    """6N for the matmuls (PaLM appendix B) + 12 L H D T for attention scores and values. With LoRA adapters
    (n_adapter parameters) the N base parameters are frozen: no weight gradients, 4N, plus 6 per adapter one."""
    matmuls = 6 * n_params if n_adapter is None else 4 * n_params + 6 * n_adapter
    return matmuls + 12 * mcfg.n_layer * mcfg.n_head * mcfg.head_dim * seq_len


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


class Meter:
    """The progress bar and OUT/log.jsonl: train loss, tokens/s and MFU since the last log line."""

    def __init__(self, cfg: TrainConfig, dd: Dist, start: int, flops_per_tok: float):
        from tqdm import tqdm
        self.dd = dd
        self.path = Path(cfg.out) / LOG_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if dd.master:  # a resumed run logs on from its checkpoint: what a killed run logged after it goes
            write_text(self.path, "".join(f"{json.dumps(r)}\n" for r in read_log(self.path) if r["step"] <= start)
                       if start else "")
        self.tokens_per_step = global_batch(cfg, dd.world) * cfg.seq_len
        self.flops_per_tok, self.peak = flops_per_tok, peak_flops(cfg, dd.device)
        self.bar = tqdm(total=cfg.steps, initial=start, disable=not (dd.master and cfg.progress), dynamic_ncols=True)
        self.loss = torch.zeros((), dtype=torch.float64, device=dd.device)
        self.count, self.t, self.step, self.train_loss = 0, time.time(), start, float("nan")

    def add(self, losses: list[torch.Tensor], count: int) -> None:
        for loss in losses:
            self.loss += loss
        self.count += count
        self.bar.update(1)

    def log_train(self, done: int, lr: float) -> None:
        self.train_loss = self.dd.sum(self.loss).item() / self.count  # .item() syncs: the time is honest
        tok_s = (done - self.step) * self.tokens_per_step / (time.time() - self.t)
        mfu = tok_s * self.flops_per_tok / (self.peak * self.dd.world) if self.peak else None
        self.bar.set_postfix_str(f"loss {self.train_loss:.3f} lr {lr:.1e} tok/s {tok_s:,.0f} "
                                 f"mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")
        self.write(dict(step=done, loss=self.train_loss, lr=lr, tok_s=tok_s, mfu=mfu, time=time.time()))
        self.loss.zero_()
        self.count, self.t, self.step = 0, time.time(), done

    def log_eval(self, done: int, val: float, prompt: str, text: str) -> None:
        if self.dd.master:
            self.bar.write(f"step {done}: train loss {self.train_loss:.3f}, val loss {val:.3f} | "
                           f"{prompt!r} -> {text!r}")
        self.write(dict(step=done, val_loss=val, sample=prompt + text))
        self.restart_clock()

    def restart_clock(self) -> None:
        """Evaluation and checkpoint time is not training throughput."""
        self.t = time.time()

    def write(self, rec: dict) -> None:
        if self.dd.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self.bar.close()


def read_log(path: Path) -> list[dict]:
    """A log.jsonl's records; none when it is absent, and without a line a kill cut short."""
    recs = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in recs if isinstance(r, dict) and "step" in r]


def plot_loss(log_path: Path, png: Path) -> None:
    """The train and validation loss of a log.jsonl, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = read_log(Path(log_path))
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=png.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
