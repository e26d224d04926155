"""EngineConfig: every setting of the inference engine in one dataclass. LLM, the model
runner, the scheduler and the block manager read it; the generate/serve/bench flags are
generated from its fields (cli/flags.py)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace

from .core.spec_decode import SpeculativeConfig

DTYPES = ("float32", "float16", "bfloat16")


def json_object(text: str) -> dict:
    """A flag's JSON object (argparse shows the ValueError as the flag's error)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value

QUANTIZATIONS = ("int8", "w8a8")
KV_CACHE_DTYPES = ("auto", "bfloat16", "int8", "fp8")


@dataclass
class EngineConfig:
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ... (default: cuda if present)"})
    dtype: str | None = field(default=None, metadata={
        "help": "weight dtype (default: bfloat16 on GPU, the checkpoint's on CPU); on GPU also the compute dtype, "
                "on CPU bfloat16/float16 are the weights' storage and compute stays float32", "choices": DTYPES})
    quantization: str | None = field(default=None, metadata={
        "help": "quantization at load: int8 (weight-only, symmetric, per output channel or per group); w8a8 (CPU: "
                "int8 weights as int8, activations quantised per 32 values, integer dot products as llama.cpp's q8_0; "
                "fast on CPUs with AVX-512 VNNI, a plain loop elsewhere)",
        "choices": QUANTIZATIONS})
    quantization_group_size: int | None = field(default=None, metadata={
        "help": "int8 scales per group of this many inputs (e.g. 32-128; must divide every GEMM's input "
                "features) instead of one per output channel"})
    max_num_seqs: int = field(default=256, metadata={"help": "most sequences in one running batch"})
    max_num_batched_tokens: int | None = field(default=None, metadata={
        "help": "token budget of one step (default: 8192 on GPU, 2048 on CPU)"})
    max_model_len: int | None = field(default=None, metadata={"help": "context length (default: the model's)"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    num_kv_blocks: int | None = field(default=None, metadata={"help": "KV-cache blocks (default: sized to memory)"})
    kv_cache_tokens: int | None = field(default=None, metadata={"help": "KV-cache size in tokens (instead of blocks)"})
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "KV-cache storage: auto (the compute dtype), bfloat16, or int8 / fp8 (e4m3, GPU only, compute "
                "capability 8.9+) with an fp32 scale per token and KV head; a smaller cache is read faster and, "
                "where the pool is sized from memory, holds more tokens", "choices": KV_CACHE_DTYPES})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "share of GPU memory for weights, activations and the KV cache"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "reuse the KV of shared prompt prefixes", "flag": "--prefix-caching"})
    enforce_eager: bool | None = field(default=None, metadata={"help": "no CUDA graphs"})
    seed: int | None = field(default=None, metadata={"help": "seed of unseeded requests' sampling"})
    max_waiting_seqs: int | None = field(default=None, metadata={
        "help": "the server's room for requests waiting for a batch slot, beside max_num_seqs running: the "
                "default of max_inflight_requests (default: max_num_seqs or the KV pool's block count, whichever "
                "is larger)"})
    max_inflight_requests: int | None = field(default=None, metadata={
        "help": "most requests the server holds at once, the one admission bound: past it 429 "
                "(default: max_num_seqs + max_waiting_seqs)"})
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "ranks the model is split over (Megatron-style tensor parallelism on torch.distributed): the "
                "engine starts the other ranks itself; across nodes run the same command on each with "
                "MASTER_ADDR, MASTER_PORT, NNODES and NODE_RANK (or under torchrun)"})
    enable_lora: bool = field(default=False, metadata={
        "help": "serve LoRA adapters (PEFT directories) over the model: a request names one (LLM.generate's "
                "lora_request, the server's --lora-modules), and requests of different adapters share a batch"})
    max_loras: int = field(default=1, metadata={
        "help": "LoRA adapters held at once (their slots); a request for one more waits until a running "
                "request's adapter is no longer in use"})
    max_lora_rank: int = field(default=16, metadata={"help": "largest LoRA rank served (the slots' size)"})
    speculative_config: dict | None = field(default=None, metadata={
        "help": "speculative decoding, as vLLM configures it: {\"method\": \"ngram\", \"num_speculative_tokens\": "
                "4, \"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2} (drafts from the request's own tokens) or "
                "{\"model\": DIR, \"num_speculative_tokens\": 4} (a small draft model with the same tokenizer); "
                "\"disable_by_batch_size\": N turns it off while N or more sequences run", "parse": json_object})
    step_timeout: float = field(default=600.0, metadata={
        "help": "seconds one engine step may take before the watchdog fails the engine (0: no watchdog)"})

    def __post_init__(self):
        if self.dtype is not None and not isinstance(self.dtype, str):
            self.dtype = str(self.dtype).removeprefix("torch.")  # a torch.dtype
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be None or one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.quantization_group_size is not None and self.quantization is None:
            raise ValueError("quantization_group_size needs quantization (int8)")
        for name in ("tensor_parallel_size", "quantization_group_size", "max_num_seqs", "block_size", "max_num_batched_tokens",
                     "max_model_len", "num_kv_blocks", "kv_cache_tokens", "max_waiting_seqs", "max_inflight_requests",
                     "max_loras", "max_lora_rank"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if isinstance(self.step_timeout, bool) or not isinstance(self.step_timeout, (int, float)) \
                or not 0 <= self.step_timeout < float("inf"):
            raise ValueError(f"step_timeout must be a finite number of seconds >= 0, got {self.step_timeout!r}")
        SpeculativeConfig.of(self.speculative_config)  # checked now, kept as given
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def resolved(self, device_type: str) -> "EngineConfig":
        """The settings whose defaults depend on the device, decided here once."""
        return replace(self, max_num_batched_tokens=self.max_num_batched_tokens or
                       (8192 if device_type == "cuda" else 2048))

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}
