"""Checkpoints as users bring them: hub GPT-2 names, shards, pytorch_model.bin, rope scaling, qwen2,
generation_config.json; config validation. Logits against transformers in fp32."""
from __future__ import annotations

import json

import pytest
import torch

from gpt_engine import ModelConfig, load_model, save_model
from gpt_engine.models.generation_config import load_generation_config
from gpt_engine.models.gpt import GPT

from .helpers import GREEDY_TOKENS, assert_greedy_matches, make_hf_model, save_bin, save_hub_gpt2

pytestmark = pytest.mark.usefixtures("torch_cpu_path")


def _close(ours, hf, ids):
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_gpt2_hub_layout_with_mask_buffers(tmp_path):
    import transformers
    hf = make_hf_model("gpt2", None, save=False)
    save_hub_gpt2(hf, tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 256, (2, 41))
    _close(ours, hf, ids)
    # the layout is what transformers itself reads
    _close(ours, transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval(), ids)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-untied", "qwen2"])
def test_sharded_safetensors(kind, tmp_path):
    hf = make_hf_model(kind, tmp_path, save=False)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    _close(load_model(tmp_path), hf, torch.randint(0, 256, (2, 23)))


@pytest.mark.parametrize("kind", ["gpt2", "llama-untied", "qwen2"])
@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_model_bin(kind, shards, tmp_path):
    hf = make_hf_model(kind, None, save=False)
    save_bin(hf, tmp_path, shards=shards)
    _close(load_model(tmp_path), hf, torch.randint(0, 256, (2, 23)))


ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-params": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 40,
                    "attention_factor": 1.3, "beta_fast": 16.0, "beta_slow": 2.0},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 32,
                 "short_factor": [1.0 + 0.05 * i for i in range(16)], "long_factor": [1.0 + 0.4 * i for i in range(16)]},
}


@pytest.mark.parametrize("name", list(ROPE))
def test_rope_scaling_matches_transformers(name, tmp_path):
    hf = make_hf_model("llama", tmp_path, rope_scaling=dict(ROPE[name]))
    ours = load_model(tmp_path)
    assert ours.config.rope_scaling["rope_type"] == ROPE[name]["rope_type"]
    # short, past original_max_position_embeddings (32), past max_position_embeddings (128) where the type
    # serves more; then short again (transformers' dynamic/longrope state switches back)
    lengths = [20, 90, 128]
    if ours.config.max_seq_len > 128:
        lengths.append(ours.config.max_seq_len - 3)
    for t in lengths + [20]:
        _close(ours, hf, torch.randint(0, 256, (1, t)))


@pytest.mark.parametrize("name", ["llama3", "linear", "yarn", "dynamic", "longrope"])
def test_rope_scaling_saved_checkpoint_loads_in_transformers(name, tmp_path):
    import transformers
    make_hf_model("llama", tmp_path / "hf", rope_scaling=dict(ROPE[name]))
    cfg = load_model(tmp_path / "hf").config
    torch.manual_seed(1)
    ours = GPT(cfg).eval()
    save_model(ours, tmp_path / "ours")
    assert ModelConfig.load(tmp_path / "ours") == cfg
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    _close(ours, hf, torch.randint(0, 256, (1, 100)))


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-untied"])
def test_qwen2_qkv_bias(kind, tmp_path):
    import transformers
    hf = make_hf_model(kind, tmp_path, rope_theta=1e6)
    ours = load_model(tmp_path)
    assert ours.config.qkv_bias and not ours.config.bias and ours.layers[0].attn.qkv.bias is not None
    assert ours.layers[0].attn.proj.bias is None
    _close(ours, hf, torch.randint(0, 256, (3, 37)))
    # and back: our save loads in transformers as a Qwen2 model with the same logits
    torch.manual_seed(2)
    mine = GPT(ours.config).eval()
    with torch.no_grad():
        for n, p in mine.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    save_model(mine, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    _close(mine, back, torch.randint(0, 256, (2, 19)))


def test_qwen2_yarn(tmp_path):
    hf = make_hf_model("qwen2", tmp_path, rope_scaling=dict(ROPE["yarn"]))
    _close(load_model(tmp_path), hf, torch.randint(0, 256, (1, 120)))


def test_dtype_and_device_arguments(tmp_path):
    make_hf_model("llama", tmp_path)
    m = load_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert load_model(tmp_path, dtype="float16").tok_emb.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path, dtype=torch.int8)


# --- broken checkpoints -----------------------------------------------------------------------
def test_broken_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file
    hf = make_hf_model("llama", tmp_path, save=False)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shard = load_file(tmp_path / first)
    name = next(iter(shard))
    save_file({**shard, name: torch.zeros(3, 3)}, tmp_path / first)
    with pytest.raises(ValueError, match="shape"):
        load_model(tmp_path)
    save_file({k: v for k, v in shard.items() if k != name}, tmp_path / first)
    with pytest.raises(ValueError, match="missing"):
        load_model(tmp_path)
    save_file({**shard, "model.layers.0.mystery.weight": torch.zeros(2)}, tmp_path / first)
    with pytest.raises(ValueError, match="unexpected tensor"):
        load_model(tmp_path)
    (tmp_path / first).unlink()
    with pytest.raises(FileNotFoundError, match=first):
        load_model(tmp_path)


# --- config validation ------------------------------------------------------------------------
def _hf_llama(**over):
    d = dict(model_type="llama", vocab_size=100, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             hidden_size=64, intermediate_size=96, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1e4)
    d.update(over)
    return d


@pytest.mark.parametrize("over,field", [
    (dict(vocab_size="100"), "vocab_size"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(hidden_size=True), "hidden_size"),
    (dict(num_attention_heads=3), "multiple"),
    (dict(max_position_embeddings=10**12), "max_position_embeddings"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    (dict(rope_theta="big"), "rope_theta"),
    (dict(eos_token_id=[1, "2"]), "eos_token_id"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "su-per"}), "rope_type"),
    (dict(rope_scaling={"rope_type": "linear"}), "factor"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": -2}), "factor"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}), "low_freq_factor"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
     "high_freq_factor"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": "32"}),
     "original_max_position_embeddings"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}), "short_factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 1e9}), "factor"),
    (dict(rope_scaling=[1, 2]), "rope_scaling"),
    (dict(use_sliding_window="yes", model_type="qwen2"), "use_sliding_window"),
    (dict(head_dim=20), "head_dim"),
    (dict(head_dim=264), "head_dim"),
    (dict(model_type="gemma", attention_bias=True), "attention_bias"),
    (dict(model_type="gemma", hidden_act="silu"), "hidden_act"),
    (dict(model_type="qwen3", partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(model_type="phi3", partial_rotary_factor=1.5), "partial_rotary_factor"),
    (dict(model_type="phi3", rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                            "long_factor": [1.0] * 8}, partial_rotary_factor=0.5), "short_factor"),
])
def test_config_validation_names_the_field(over, field, tmp_path):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf(_hf_llama(**over))
    # load_model checks the config before it looks for (or allocates) any weights
    (tmp_path / "config.json").write_text(json.dumps(_hf_llama(**over)))
    with pytest.raises(ValueError, match=field):
        load_model(tmp_path)


@pytest.mark.parametrize("d,field", [
    (dict(model_type="gptj", n_embd=64, n_head=2, rotary_dim=15), "rotary_dim"),
    (dict(model_type="gptj", n_embd=64, n_head=2, rotary_dim=64), "rotary_dim"),
    (dict(model_type="gptj", n_embd=64, n_head=2, rotary_dim=16, activation_function="swish"), "activation_function"),
    (dict(model_type="gpt_neox", hidden_size=64, num_attention_heads=2, intermediate_size=96, hidden_act="swish"),
     "hidden_act"),
    (dict(model_type="gpt_neox", hidden_size=64, num_attention_heads=2, intermediate_size=96, rotary_pct=0.0),
     "partial_rotary_factor"),
])
def test_family_config_validation_names_the_field(d, field, tmp_path):
    d = dict(vocab_size=100, n_layer=2, num_hidden_layers=2, **d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=field):
        load_model(tmp_path)


@pytest.mark.parametrize("kind,shape", [("gpt2", dict(d_model=96, n_head=4)), ("llama", dict(d_model=128, n_head=8))])
def test_tiny_hub_shapes_load(kind, shape, tmp_path):
    """The shapes of the tiny test checkpoints hub libraries publish: GPT-2 with 4 heads of 24, llama with 8 heads
    of 16."""
    hf = make_hf_model(kind, tmp_path, shape=shape, **SHARP)
    _close(load_model(tmp_path), hf, torch.randint(0, 256, (2, 23)))
    assert_greedy_matches(tmp_path, hf, [3, 17, 40])


def test_gpt2_config_validation():
    base = dict(model_type="gpt2", vocab_size=100, n_layer=2, n_head=2, n_embd=64, n_positions=64)
    ModelConfig.from_hf(base)
    for over, field in [(dict(n_embd=65), "divisible"), (dict(n_positions=0), "n_positions"),
                        (dict(activation_function="swish"), "activation_function"),
                        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
                        (dict(layer_norm_epsilon=float("nan")), "layer_norm_epsilon")]:
        with pytest.raises(ValueError, match=field):
            ModelConfig.from_hf({**base, **over})


def test_rope_context_length():
    load = ModelConfig.from_hf
    assert load(_hf_llama()).max_seq_len == 64
    assert load(_hf_llama(rope_scaling={"type": "linear", "factor": 4.0})).max_seq_len == 256  # legacy "type" key
    assert load(_hf_llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0})).max_seq_len == 128
    y = load(_hf_llama(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                        "rope_theta": 5e5}))
    assert y.max_seq_len == 128 and y.rope_theta == 5e5 and y.max_position_embeddings == 64
    l3 = load(_hf_llama(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))
    assert l3.max_seq_len == 64


# --- generation_config.json ---------------------------------------------------------------------
def test_generation_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_hf_llama(eos_token_id=[7, 9], bos_token_id=1)))
    g = load_generation_config(tmp_path)
    assert g.eos_token_ids == [7, 9] and g.bos_token_id == 1 and g.sampling == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [9, 11], "temperature": 0.6, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1,
         "max_new_tokens": 64, "do_sample": True}))
    g = load_generation_config(tmp_path)
    assert g.eos_token_ids == [7, 9, 11]
    assert g.sampling == dict(temperature=0.6, top_p=0.9, top_k=-1, repetition_penalty=1.1, max_tokens=64)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 11, "do_sample": False,
                                                                 "temperature": 0.7}))
    g = load_generation_config(tmp_path)
    assert g.eos_token_ids == [7, 9, 11] and g.sampling == {"temperature": 0.0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="temperature"):
        load_generation_config(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="eos_token_id"):
        load_generation_config(tmp_path)
    # config.json keeps the first EOS (engine code that wants one id); the list is in GenerationDefaults
    assert ModelConfig.load(tmp_path).eos_token_id == 7


def test_generation_defaults_from_transformers_save(tmp_path):
    import transformers
    hf = make_hf_model("llama", tmp_path, save=False)
    hf.generation_config = transformers.GenerationConfig(eos_token_id=[0, 5], bos_token_id=0, do_sample=True,
                                                          temperature=0.6, top_p=0.9)
    hf.save_pretrained(tmp_path)
    g = load_generation_config(tmp_path, vocab_size=256)
    assert g.eos_token_ids == [0, 5] and g.sampling["temperature"] == 0.6 and g.sampling["top_p"] == 0.9


def test_eos_outside_the_vocabulary_loads_with_a_warning(tmp_path):
    # GPT2Config()'s bos/eos 50256 on a small vocabulary: transformers loads it, so does the engine
    from gpt_engine import LLM, SamplingParams
    make_hf_model("gpt2", tmp_path, bos_token_id=50256, eos_token_id=50256)
    with pytest.warns(UserWarning, match=r"eos_token_id \[50256\] is out of range for vocab_size 256"):
        llm = LLM(str(tmp_path), device="cpu")
    assert llm.eos_token_ids == frozenset()
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    with pytest.warns(UserWarning):
        assert load_generation_config(tmp_path, vocab_size=256).eos_token_ids == []
    assert load_generation_config(tmp_path, vocab_size=60000).eos_token_ids == [50256]


def test_shards_are_read_one_at_a_time(tmp_path, monkeypatch):
    import gpt_engine.models.weight_files as W
    hf = make_hf_model("llama-untied", tmp_path, save=False)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    real, open_now, opened = W.iter_tensors, [0], []

    def spy(path):
        open_now[0] += 1
        opened.append(path.name)
        assert open_now[0] == 1, "two shards open at once"
        try:
            yield from real(path)
        finally:
            open_now[0] -= 1
    monkeypatch.setattr(W, "iter_tensors", spy)
    _close(load_model(tmp_path), hf, torch.randint(0, 256, (1, 9)))
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert sorted(set(opened)) == shards and len(opened) == len(shards) + 1  # + the dtype peek


# --- LLM greedy == transformers generate, per family ---------------------------------------------
# LLM runs its own CPU paths (packed GEMMs, the C++ decode layer rotating q/k in place): the rope scaling
# must reach those as well as the dense forward the logits tests cover.
# transformers' default init (std 0.02) gives near-uniform attention whose greedy tokens barely depend on
# positions: a wider init makes a wrong rotation change the tokens
SHARP = {"initializer_range": 0.1}


def test_gpt2_hub_layout_greedy(tmp_path):
    hf = make_hf_model("gpt2", None, save=False, **SHARP)
    save_hub_gpt2(hf, tmp_path)
    assert_greedy_matches(tmp_path, hf, [3, 17, 40])


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-untied"])
def test_qwen2_greedy(kind, tmp_path):
    hf = make_hf_model(kind, tmp_path, rope_theta=1e6, **SHARP)
    assert_greedy_matches(tmp_path, hf, [3, 17, 40])


# Contexts run past original_max_position_embeddings (32; max_position_embeddings for linear and dynamic).
# dynamic and longrope rotate a generated token by the sequence's length when it is the newest, as
# transformers' incremental decoding does, and a prompt's tokens by the whole prompt's length, as its
# prefill does: prompts under the threshold (30, the generated tokens cross it) and over it (40), in
# one prefill and in chunks of 16. (transformers keeps dynamic's grown table across generate calls
# until a call starts under the threshold, so the 40-token prompt goes before the 30-token one.)
@pytest.mark.parametrize("name,lengths", [
    ("llama3", [3, 17, 40]), ("linear", [3, 17, 40]), ("yarn", [3, 17, 40]),
    ("dynamic", [3, 40, 30]), ("longrope", [3, 40, 30]),
])
@pytest.mark.parametrize("chunk", [None, 16])
def test_rope_scaling_greedy(name, lengths, chunk, tmp_path):
    kw = {"max_position_embeddings": 32} if name in ("linear", "dynamic") else {}
    hf = make_hf_model("llama", tmp_path, rope_scaling=dict(ROPE[name]), **SHARP, **kw)
    assert max(lengths) + GREEDY_TOKENS > 32
    assert_greedy_matches(tmp_path, hf, lengths, **({"max_num_batched_tokens": chunk} if chunk else {}))


# --- loading memory ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["hub-gpt2", "bin-gpt2", "llama-fp16", "bin-llama-fp16"])
def test_tensors_copied_in_row_blocks(layout, tmp_path, monkeypatch):
    """Tiny blocks, so that a transposed (GPT-2 Conv1D), converted or fused tensor crosses many block edges."""
    import gpt_engine.models.weight_files as W
    monkeypatch.setattr(W, "_CHUNK_BYTES", 1000)
    kind = layout.split("-")[-2] if layout.endswith("fp16") else layout.split("-")[-1]
    hf = make_hf_model(kind, None, save=False)
    if layout == "hub-gpt2":
        save_hub_gpt2(hf, tmp_path)
    elif layout.startswith("bin"):
        save_bin(hf, tmp_path)
    else:
        hf.save_pretrained(tmp_path)
    if layout.endswith("fp16"):
        want = load_model(tmp_path).half()  # fp32 is read whole, straight into the parameters
        got = load_model(tmp_path, dtype=torch.float16)
        for (n, a), b in zip(want.state_dict().items(), got.state_dict().values()):
            assert torch.equal(a, b), n
    else:
        _close(load_model(tmp_path), hf, torch.randint(0, 256, (2, 23)))


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_peak_memory_while_loading(layout, tmp_path):
    """A ~80 MB checkpoint loaded in a fresh process (benchmarks/load_memory.py measures): the load's peak
    resident memory stays under 1.3x the file, so the file is never resident beside the parameters."""
    import subprocess
    import sys
    from pathlib import Path
    hf = make_hf_model("llama-untied", None, save=False, vocab_size=8000,
                       shape=dict(d_model=512, d_ff=1408, n_layer=4, n_head=8, n_kv_head=2))
    if layout == "bin":
        save_bin(hf, tmp_path)
    else:
        hf.save_pretrained(tmp_path)
    del hf
    size = sum(p.stat().st_size for p in tmp_path.iterdir() if p.suffix in (".safetensors", ".bin"))
    assert size > 70e6
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "load_memory.py"
    r = subprocess.run([sys.executable, str(script), "--measure", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["param_bytes"] > 0.95 * size
    assert m["peak_extra_rss"] < 1.3 * size, (m, size)


def test_malformed_safetensors_files(tmp_path):
    make_hf_model("llama", tmp_path)
    f = tmp_path / "model.safetensors"
    good = f.read_bytes()
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    a, b = header[name]["data_offsets"]

    def write_header(h):
        raw = json.dumps(h).encode()
        f.write_bytes(len(raw).to_bytes(8, "little") + raw + good[8 + n:])

    for data, match in [(good[:-100], "truncated"),
                        ((10**12).to_bytes(8, "little") + good[8:], "header length"),
                        (good[:8] + b"{" * n + good[8 + n:], "not valid JSON")]:
        f.write_bytes(data)
        with pytest.raises(ValueError, match=match):
            load_model(tmp_path)
    write_header({**header, name: {**header[name], "data_offsets": [a, b + 4]}})
    with pytest.raises(ValueError, match="bad safetensors header entry"):
        load_model(tmp_path)
    write_header({**header, name: {**header[name], "dtype": "I32"}})
    with pytest.raises(ValueError, match="floating"):
        load_model(tmp_path)
