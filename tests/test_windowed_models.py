"""Sliding-window families against transformers: GPT-Neo (global/local layers, unscaled scores), Mistral
(every layer windowed) and Qwen2 with use_sliding_window (the layers from max_window_layers on). Sequences are
several windows long, so a window off by one key, or a layer windowed that should not be, changes the logits;
greedy generation crosses the window in prefill, in chunked prefill and during decode. The GPT-3 presets are
GPT-Neo models: a tiny one trains and loads in transformers."""
from __future__ import annotations

import json

import pytest
import torch

from gpt_engine import ModelConfig, load_model, save_model
from gpt_engine.models.presets import PRESETS, resolve_config
from gpt_engine.llm import LLM
from gpt_engine.models.gpt import GPT
from gpt_engine import SamplingParams

from .helpers import hf_greedy, make_hf_model

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

W = 8  # window: 8 keys, the query's own included
# large weights (initializer_range 0.1), so that the logits depend on which keys each query sees
KINDS = {
    "gpt_neo": ("gpt_neo", dict(window_size=W, initializer_range=0.1)),
    "gpt_neo-local-first": ("gpt_neo", dict(window_size=W, initializer_range=0.1, num_layers=3,
                                            attention_types=[[["local"], 2], [["global"], 1]])),
    "mistral": ("mistral", dict(sliding_window=W, initializer_range=0.1)),
    "mistral-untied": ("mistral-untied", dict(sliding_window=W, initializer_range=0.1)),
    "qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=W, max_window_layers=1, initializer_range=0.1)),
}
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, (kind, kw) in KINDS.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = (d, make_hf_model(kind, d, **kw))
    return out


def _windows_off(model: GPT) -> GPT:
    """The same weights with every layer attending causally to all keys."""
    for layer in model.layers:
        layer.attn.window = (-1, -1)
    return model


@pytest.mark.parametrize("name", list(KINDS))
def test_logits_match_transformers(models, name):
    d, hf = models[name]
    ours = load_model(d)
    hf_windows = [t == "sliding_attention" for t in getattr(hf.config, "layer_types", None) or []]
    if name == "qwen2":
        assert ours.config.windowed == hf_windows == [False, True]
    ids = torch.randint(0, 256, (2, 5 * W + 3))
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(ours(ids), ref, atol=1e-4, rtol=1e-4)
        # the inputs reach past the window: without it the logits differ
        assert (_windows_off(ours)(ids) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["gpt_neo-local-first", "mistral", "qwen2"])
def test_greedy_matches_hf_generate(models, name):
    """Prompts shorter than the window that decode past it, and prompts several windows long; with a small
    step budget the long prompts prefill in chunks on top of their cached first chunks."""
    d, hf = models[name]
    prompts = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (1, 5, W, 3 * W + 1, 45)]
    want = [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]
    llm = LLM(str(d), device="cpu", enable_prefix_caching=False)
    assert all(layer.packed is not None for layer in llm.runner.model.layers)  # decode: the fused CPU layer
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == want
    chunked = LLM(str(d), device="cpu", max_num_batched_tokens=12, block_size=4, enable_prefix_caching=False)
    assert [o.token_ids for o in chunked.generate(prompts, GREEDY, use_tqdm=False)] == want


@pytest.mark.parametrize("name", ["gpt_neo", "gpt_neo-local-first", "mistral-untied", "qwen2"])
def test_saved_checkpoint_loads_in_transformers(models, name, tmp_path):
    import transformers
    cfg = load_model(models[name][0]).config
    assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg
    torch.manual_seed(1)
    ours = GPT(cfg).eval()
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    save_model(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (2, 4 * W + 1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


def test_gpt_neo_hub_checkpoint_with_mask_buffers(models, tmp_path):
    """The hub's GPT-Neo files carry each layer's causal-mask buffers (attn.attention.bias, masked_bias)."""
    from .helpers import save_bin
    d, hf = models["gpt_neo"]
    save_bin(hf, tmp_path, shards=2)
    for f in tmp_path.glob("pytorch_model-*.bin"):
        sd = torch.load(f, weights_only=True)
        for i in range(hf.config.num_layers):
            sd[f"transformer.h.{i}.attn.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
            sd[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
        torch.save(sd, f)
    ids = torch.randint(0, 256, (1, 3 * W))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [
    dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
    dict(use_sliding_window=True, sliding_window=4, max_window_layers=0),
    dict(use_sliding_window=False, sliding_window=4, max_window_layers=0),
    dict(use_sliding_window=True, sliding_window=None, max_window_layers=0),
    dict(use_sliding_window=True, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2),
])
def test_qwen2_windowed_layers_as_transformers_picks_them(kw):
    import transformers
    base = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=96, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=100)
    hf = transformers.Qwen2Config(**base, **kw)
    cfg = ModelConfig.from_hf(json.loads(hf.to_json_string()))
    assert cfg.windowed == [t == "sliding_attention" for t in hf.layer_types]
    assert cfg.sliding_window == (hf.sliding_window if any(cfg.windowed) else 0)


@pytest.mark.parametrize("n_layer,types", [(24, None), (4, [[["global", "local"], 2]]),
                                           (4, [[["local"], 3], [["global"], 1]])])
def test_gpt_neo_layer_types_as_transformers_expands_them(n_layer, types):
    import transformers
    hf = transformers.GPTNeoConfig(num_layers=n_layer, hidden_size=64, num_heads=2, window_size=16, vocab_size=100,
                                   **({} if types is None else {"attention_types": types}))
    d = json.loads(hf.to_json_string())
    if types is None:  # a config.json without attention_types: transformers' default pattern
        del d["attention_types"], d["attention_layers"]
    cfg = ModelConfig.from_hf(d)
    assert cfg.windowed == [t == "local" for t in hf.attention_layers]
    assert cfg.window_sizes[cfg.windowed.index(True)] == (15, 0) and cfg.softmax_scale == 1.0


@pytest.mark.parametrize("d,field", [
    (dict(model_type="gpt_neo", attention_types=[[["global", "sparse"], 1]]), "attention_types"),
    (dict(model_type="gpt_neo", attention_types="global"), "attention_types"),
    (dict(model_type="gpt_neo", window_size=0), "window_size"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=0), "sliding_window"),
    (dict(model_type="qwen2", layer_types=["sliding_attention"] * 2), "layer_types"),
    (dict(model_type="mistral", sliding_window=-1), "sliding_window"),
])
def test_bad_window_configs_name_the_field(d, field):
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]])
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf({**base, **d})
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig(model_type="llama", n_layer=2, n_head=2, d_model=64, bias=False, sliding_window=4)


def test_gpt3_presets_follow_the_paper():
    # (name, layers, d_model, heads, millions of parameters in GPT-3's table)
    table = [("gpt3-small", 12, 768, 12, 125), ("gpt3-medium", 24, 1024, 16, 350), ("gpt3-large", 24, 1536, 16, 760),
             ("gpt3-xl", 24, 2048, 16, 1300), ("gpt3-2.7b", 32, 2560, 32, 2700), ("gpt3-6.7b", 32, 4096, 32, 6700),
             ("gpt3-13b", 40, 5120, 40, 13000), ("gpt3-175b", 96, 12288, 96, 175000)]
    for name, n_layer, d_model, n_head, millions in table:
        cfg = resolve_config(name)
        assert (cfg.model_type, cfg.n_layer, cfg.d_model, cfg.n_head) == ("gpt_neo", n_layer, d_model, n_head)
        assert cfg.max_seq_len == 2048 and cfg.sliding_window == 256 and cfg.d_ff == 4 * d_model
        assert cfg.windowed == [False, True] * (n_layer // 2)  # dense and banded layers alternate
        assert abs(cfg.n_params / 1e6 - millions) / millions < 0.05, name
    assert "gpt3-tiny" in PRESETS


def test_train_gpt3_tiny_and_load_in_transformers(tmp_path):
    import transformers

    from gpt_engine.train.config import TrainConfig
    from gpt_engine.train.trainer import train
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: {i * 7 % 13} apples and {i % 5} pears.\n" for i in range(300)))
    out = train(TrainConfig(out=str(tmp_path / "run"), data=str(corpus), model="gpt3-tiny", vocab_size=300,
                            steps=2, batch_size=2, seq_len=80, lr=1e-3, warmup=1, eval_every=2, eval_iters=1,
                            sample_tokens=4, progress=False, device="cpu"))
    ours = load_model(out)
    assert ours.config.model_type == "gpt_neo" and any(ours.config.windowed)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 300, (1, 100))  # past gpt3-tiny's window of 64
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
