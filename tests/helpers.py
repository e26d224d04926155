"""Small random-init HF models saved to disk, and the server in a thread, shared by the engine tests."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

CORPUS = ("the quick brown fox jumps over the lazy dog. " * 40 + "hello world, hello server! " * 40
          + "def f(x):\n    return x * 2\n" * 20)
TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


# the shapes the tests were first written for; another family gets the default of its kind of positions
_SHAPES = {"learned": dict(d_model=64, n_head=2), "rotary": dict(d_model=128, n_head=4, d_ff=160)}
_FAMILY_SHAPES = {"gpt_neo": dict(sliding_window=8, layer_types=["full_attention", "sliding_attention"]),
                  "llama": dict(n_kv_head=1), "mistral": dict(n_kv_head=2), "qwen2": dict(n_kv_head=2)}


def make_hf_model(kind: str, path, vocab_size: int = 256, seed: int = 0, save: bool = True, shape=None,
                  randomize: bool = True, **kw):
    """Save a random-init transformers model of `kind` (a model_type, with "-untied" for an untied head) to
    path, with random norms and biases unless randomize=False. Its config.json is the one our ModelConfig writes for the family
    (2 layers, a small shape), with `shape` (ModelConfig fields: d_model, n_head, head_dim, rotary_fraction,
    ...) applied before and kw (transformers' config fields: rope_scaling, sliding_window, ...) after."""
    import transformers

    from gpt_engine import ModelConfig
    from gpt_engine.models.families import FAMILIES
    family, _, variant = kind.partition("-")
    traits = FAMILIES[family].TRAITS
    fields = dict(model_type=family, n_layer=2, vocab_size=vocab_size, max_seq_len=128, bos_token_id=0,
                  eos_token_id=0, tie_embeddings=variant != "untied" and not traits.get("head_bias"),
                  **_SHAPES[traits["positions"]])
    fields.update(_FAMILY_SHAPES.get(family, {}), **(shape or {}))
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**{**ModelConfig(**fields).to_hf(), **kw})
    model = transformers.AutoModelForCausalLM.from_config(config)
    if randomize:
        _randomize_norms_and_biases(model)
    model.eval()
    if save:
        model.save_pretrained(path)
    return model


# The families past llama at odd shapes: head dims not a power of two (24, 40, 72, 256), rotary on a part of the
# head, GQA ratios 1, 2 and H. name -> (make_hf_model kind, ModelConfig shape fields)
FAMILY_CASES = {
    "gpt_neox": ("gpt_neox-untied", dict(d_model=96, n_head=4, d_ff=160, rotary_fraction=0.25)),
    "gpt_neox-sequential": ("gpt_neox", dict(d_model=96, n_head=4, d_ff=160, rotary_fraction=0.5,
                                             parallel_residual=False)),
    "gptj": ("gptj", dict(d_model=96, n_head=4, d_ff=128, rotary_fraction=2 / 3)),
    "phi3": ("phi3-untied", dict(d_model=160, n_head=4, n_kv_head=2, d_ff=96, rotary_fraction=0.5)),
    "gemma": ("gemma", dict(d_model=64, n_head=4, n_kv_head=1, head_dim=72, d_ff=96)),
    "gemma-256": ("gemma", dict(d_model=64, n_head=2, n_kv_head=1, head_dim=256, d_ff=96)),
    "qwen3": ("qwen3-untied", dict(d_model=64, n_head=4, n_kv_head=2, head_dim=40, d_ff=96)),
}


def make_family_model(name: str, path, **kw):
    """make_hf_model of a FAMILY_CASES entry (kw as make_hf_model's)."""
    kind, shape = FAMILY_CASES[name]
    return make_hf_model(kind, path, shape=shape, **kw)


GREEDY_TOKENS = 12


def assert_greedy_matches(path, hf, lengths, **llm_kw):
    """LLM's greedy tokens for prompts of `lengths` (one batch, the CPU fast path) are transformers' generate()."""
    from gpt_engine import SamplingParams
    from gpt_engine.llm import LLM
    llm = LLM(str(path), device="cpu", **llm_kw)
    model = llm.runner.model
    assert model.head.packed is not None and all(layer.packed is not None for layer in model.layers)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in lengths]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, GREEDY_TOKENS), f"prompt of {len(p)} tokens"


def hf_greedy(hf, prompt, n: int) -> list[int]:
    """transformers' greedy continuation of prompt (a list of ids): n new ids, EOS off (as ignore_eos)."""
    hf.generation_config.eos_token_id = None
    ids = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return ids[0, len(prompt):].tolist()


def _randomize_norms_and_biases(model) -> None:
    """Random norms and biases, so that a mis-mapped one would show."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or ".ln_" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.normal_(0, 0.5)


def save_hub_gpt2(model, path) -> None:
    """A GPT-2 checkpoint in the hub's original layout: tensors without the `transformer.` prefix, the
    attn.bias / attn.masked_bias mask buffers, no lm_head (tied)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n = model.config.n_positions
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}
    for i in range(model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    model.config.to_json_file(path / "config.json")


def save_bin(model, path, shards: int = 1) -> None:
    """pytorch_model.bin as transformers 4 saved it (safe_serialization=False), or `shards` shards with
    pytorch_model.bin.index.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    model.config.to_json_file(path / "config.json")
    if shards == 1:
        torch.save(sd, path / "pytorch_model.bin")
        return
    names = list(sd)
    weight_map = {}
    for s in range(shards):
        fname = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = names[s::shards]
        torch.save({k: sd[k] for k in part}, path / fname)
        weight_map.update({k: fname for k in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def train_bpe(texts, vocab_size: int = 300, special_tokens=("<|endoftext|>",)):
    """A byte-level BPE (GPT-2 style) trained with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def wait_healthy(proc, port: int, timeout: float = 120.0) -> str:
    """The URL of a `gpt-engine serve` subprocess on port, once /health answers 200."""
    import httpx
    url, deadline = f"http://127.0.0.1:{port}", time.time() + timeout
    while True:
        assert proc.poll() is None and time.time() < deadline, "server did not come up"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            time.sleep(0.2)


def layer_weights(C, H, Hkv, D, ff, bias, swiglu, g):
    """One decoder layer's 12 tensors in kernels.decode's order (norm1, qkv, proj, norm2, fc, fc2:
    weight, bias), random from generator g; biases None without bias."""
    def w(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    def b(n):
        return w(n) if bias else None
    return (1 + w(C), b(C), w((H + 2 * Hkv) * D, C), b((H + 2 * Hkv) * D), w(C, H * D), b(C),
            1 + w(C), b(C), w(2 * ff if swiglu else ff, C), b(2 * ff if swiglu else ff), w(C, ff), b(C))


def scattered_table(lens, bs, nblk, g, device="cpu"):
    """A block table for sequences of lens tokens, their blocks scattered over a pool of nblk (one spare
    column of padding, block 0), and seq_lens."""
    need = [-(-n // bs) for n in lens]
    perm = torch.randperm(nblk, generator=g)
    table = torch.zeros(len(lens), max(need) + 1, dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[i:i + n]
        i += n
    return table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def paged_batch(lens, Hkv, D, g, bs: int = 16, pad_last: bool = False):
    """KV caches with each sequence's blocks scattered, the block table, seq_lens and the slot of
    each sequence's last token (-1 for the last sequence with pad_last: a padded row stores nothing)."""
    nblk = [-(-n // bs) for n in lens]
    total = sum(nblk) + 3
    kc, vc = torch.randn(total, bs, Hkv, D, generator=g), torch.randn(total, bs, Hkv, D, generator=g)
    perm = torch.randperm(total, generator=g)
    table = torch.zeros(len(lens), max(nblk), dtype=torch.int32)
    slots, i = [], 0
    for s, n in enumerate(lens):
        table[s, :nblk[s]] = perm[i:i + nblk[s]]
        i += nblk[s]
        slots.append(int(table[s, (n - 1) // bs]) * bs + (n - 1) % bs)
    if pad_last:
        slots[-1] = -1
    return kc, vc, table, torch.tensor(lens, dtype=torch.int32), torch.tensor(slots)


def make_chat_model(path, **kw):
    """A random-init GPT-2 (vocab 384; kw go to its transformers config) with a BPE tokenizer trained on
    CORPUS and TEMPLATE as its chat template, saved to path. Its norms and biases keep transformers'
    init: the streaming tests want its greedy answers to be text that decodes as it grows, which the
    answers of this seed's randomized norms are not (byte fragments, held back until the end)."""
    from gpt_engine.tokenizer import Tokenizer
    tok = Tokenizer.train([CORPUS], vocab_size=320, show_progress=False)
    make_hf_model("gpt2", path, vocab_size=384, randomize=False, **kw)
    (Path(path) / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    tok.save(path)
    return path


class ServerThread:
    """uvicorn serving `app` on a pre-bound loopback socket, in a thread with its own loop."""

    def __init__(self, app):
        import uvicorn
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete,
                                       args=(self.server.serve(sockets=[self.sock]),), daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def call(self, fn, timeout=30):
        """Run fn() (sync or async) on the server's loop, where the engine lives."""
        async def wrap():
            r = fn()
            return await r if asyncio.iscoroutine(r) else r
        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)


@contextmanager
def serving(model_dir, api_key=None, template=True, **llm_kw):
    """A ServerThread over an AsyncLLM of model_dir on the CPU (llm_kw go to LLM), the engine as server.engine;
    template=False serves without the model's chat template."""
    from gpt_engine.async_llm import AsyncLLM
    from gpt_engine.llm import LLM
    from gpt_engine.cli.serve import build_app
    engine = AsyncLLM(LLM(str(model_dir), device="cpu", **llm_kw))
    app = build_app(engine, api_key=api_key, chat_template=engine.llm.chat_template if template else None)
    with ServerThread(app) as server:
        server.engine = engine
        yield server


@contextmanager
def slow_engine_steps(srv, seconds: float = 0.02):
    """Each engine step of the served LLM takes >= seconds longer; yields the list of steps taken
    (one entry per step), so a test can tell where generation ended."""
    llm, calls = srv.engine.llm, []
    step = llm.step

    def slow():
        calls.append(1)
        time.sleep(seconds)
        return step()
    llm.step = slow
    try:
        yield calls
    finally:
        del llm.step  # the instance attribute shadowed the method


def wait_pool_empty(srv, timeout=30.0):
    """Wait until srv's engine runs and queues nothing and every KV block is free; -> its stats."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = srv.call(srv.engine.stats)
        if s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_total_blocks"]:
            return s
        time.sleep(0.05)
    raise AssertionError(f"KV pool not released: {s}")
