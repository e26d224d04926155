"""Training settings: TrainConfig, how its unset fields resolve, and the learning-rate schedule.

TrainConfig is the one source of the training settings: each field's default, help text and
CPU/GPU default live on the field (`setting`), and `gpt-engine train`'s flags are generated from
it (engine/cli/flags.py). A None default is resolved once, by resolve_defaults, when the run
knows its device; every other module reads the resolved values.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields

# the defaults resolve_defaults derives from other settings, named once so the help texts quote them
LR_NEW, LR_FINE_TUNE = 2e-3, 1e-4
WARMUP_MAX, WARMUP_SHARE = 100, 10  # warmup: min(WARMUP_MAX, steps / WARMUP_SHARE)
EVALS_PER_RUN = 5                   # eval_every: steps / EVALS_PER_RUN
VOCAB_MULTIPLE = 64                 # a new model's embedding rows: a multiple of this, for aligned GEMMs


def setting(default=MISSING, help="", cpu=None, gpu=None, choices=None, hidden=False):
    """A TrainConfig field. help: its flag's help text; cpu/gpu: what a None default becomes on
    that device; choices: the allowed values; hidden: a flag left out of --help."""
    return field(default=default, metadata=dict(help=help, cpu=cpu, gpu=gpu, choices=choices, hidden=hidden))


@dataclass
class TrainConfig:
    out: str = setting(help="output directory (ends up an HF model directory)")
    data: str | None = setting(None, 'text file, folder of text files, or .jsonl of {"text"}, {"prompt","completion"} '
                                     'or {"messages"} (chat fine-tuning) lines (default: the default corpus)')
    model: str = setting("gpt2-tiny", "preset name or config.json (ignored with --init)")
    init: str | None = setting(None, "HF model directory to fine-tune from")
    steps: int | None = setting(None, "optimizer steps", cpu=300, gpu=1500)
    batch_size: int | None = setting(None, "sequences per rank and micro-step", cpu=16, gpu=32)
    seq_len: int | None = setting(None, "tokens per sequence; the default is capped at the model's max_seq_len",
                                  cpu=128, gpu=256)
    grad_accum: int = setting(1, "micro-steps per optimizer step")
    lr: float | None = setting(None, f"peak learning rate (default: {LR_NEW:g} from scratch, "
                                     f"{LR_FINE_TUNE:g} fine-tuning)")
    min_lr_ratio: float = setting(0.1, "the cosine schedule ends at this fraction of the peak learning rate")
    warmup: int | None = setting(None, f"linear warmup steps (default: min({WARMUP_MAX}, steps / {WARMUP_SHARE}))")
    weight_decay: float = setting(0.1, "AdamW weight decay of the matrices (biases and norms get none)")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this; 0: no clipping")
    seed: int = setting(0, "seed of the initial weights and of the data order")
    save_every: int | None = setting(None, "steps between checkpoints (default: the evaluation interval)")
    keep: int = setting(2, "checkpoints kept under OUT/checkpoint")
    resume: bool = setting(False, "continue from the latest checkpoint under OUT")
    eval_every: int | None = setting(None, f"steps between evaluations (default: steps / {EVALS_PER_RUN})")
    eval_iters: int = setting(4, "validation batches per evaluation")
    log_every: int | None = setting(None, "steps between log lines", cpu=1, gpu=10)
    device: str | None = setting(None, "torch device (default: cuda when available, else cpu)")
    dtype: str | None = setting(None, "compute dtype over fp32 master weights", cpu="fp32", gpu="bf16",
                                choices=("fp32", "bf16"))
    compile: bool = setting(False, "torch.compile the model")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in the backward")
    fsdp: bool = setting(False, "FSDP2 (fully_shard) instead of DDP")
    vocab_size: int | None = setting(None, "tokenizer vocabulary for a new model (default: the model config's); "
                                           f"the embedding pads it to a multiple of {VOCAB_MULTIPLE}")
    # the GPU default is above the corpus' size: a GPU run takes all of it
    corpus_mb: float | None = setting(None, "cap on the default corpus, in MB", cpu=8.0, gpu=64.0)
    peak_tflops: float | None = setting(None, "per-device peak TFLOP/s for MFU (default: known GPUs; none on CPU)")
    sample_tokens: int = setting(24, "tokens sampled greedily at each evaluation")
    lora_rank: int | None = setting(None, "LoRA: train rank-R adapters on the frozen --init model; OUT gets a PEFT "
                                          "adapter directory (adapter_config.json, adapter_model.safetensors)")
    lora_alpha: float | None = setting(None, "LoRA scaling numerator: adapters add (alpha / rank) B A x "
                                             "(default: the rank)")
    lora_targets: str = setting("q,v", "LoRA: comma-separated projections to adapt, of q,k,v,o,gate,up,down "
                                       "(a fused HF module, GPT-2's c_attn, is adapted whole if any part is named)")
    lora_dropout: float = setting(0.0, "LoRA: dropout on the adapters' input")
    lora_base_dtype: str = setting("float32", "LoRA: how the frozen base's layer weights are held",
                                   choices=("float32", "bfloat16", "int8"))
    merge: bool = setting(False, "LoRA: write OUT as the merged HF model (base + adapters) instead of the adapter")
    stop_after: int | None = setting(None, "stop (with a checkpoint) after this step, as if preempted", hidden=True)
    progress: bool = setting(True, "the progress bar")


def resolve_defaults(cfg: TrainConfig, cuda: bool) -> TrainConfig:
    """Fill cfg's None settings in place: the device's values from the fields, then those derived
    from other settings; check what no flag type can."""
    for f in fields(cfg):
        value = f.metadata["gpu" if cuda else "cpu"]
        if value is not None and getattr(cfg, f.name) is None:
            setattr(cfg, f.name, value)
    if cfg.lr is None:
        cfg.lr = LR_FINE_TUNE if cfg.init else LR_NEW
    if cfg.warmup is None:
        cfg.warmup = min(WARMUP_MAX, cfg.steps // WARMUP_SHARE)
    if cfg.eval_every is None:
        cfg.eval_every = max(1, cfg.steps // EVALS_PER_RUN)
    if cfg.save_every is None:
        cfg.save_every = cfg.eval_every
    # the flags check choices too, but a TrainConfig built in code never meets argparse
    for f in fields(cfg):
        choices = f.metadata["choices"]
        if choices and getattr(cfg, f.name) not in choices:
            raise ValueError(f"{f.name} must be {' or '.join(choices)}, got {getattr(cfg, f.name)!r}")
    for k in ("steps", "batch_size", "seq_len", "grad_accum"):
        if getattr(cfg, k) <= 0:
            raise ValueError(f"{k} must be positive, got {getattr(cfg, k)}")
    check_lora(cfg)
    return cfg


def check_lora(cfg: TrainConfig) -> None:
    """The LoRA flags' rules no flag type checks (the targets are checked against the model's family later)."""
    if cfg.lora_rank is None:
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        given = [k for k in ("lora_alpha", "lora_targets", "lora_dropout", "lora_base_dtype", "merge")
                 if getattr(cfg, k) != defaults[k]]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --lora-rank")
        return
    if cfg.lora_rank <= 0:
        raise ValueError(f"--lora-rank must be positive, got {cfg.lora_rank}")
    if not cfg.init:
        raise ValueError("--lora-rank needs --init (the HF model directory the adapters train on)")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        raise ValueError(f"--lora-alpha must be positive, got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    from .lora import parse_targets  # ValueError naming --lora-targets
    parse_targets(cfg.lora_targets)


def global_batch(cfg: TrainConfig, world: int) -> int:
    """Sequences per optimizer step, over all ranks and micro-steps."""
    return cfg.batch_size * cfg.grad_accum * world


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine down to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))
