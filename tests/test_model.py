import json

import pytest
import torch

from gpt_engine import ModelConfig, load_model, save_model
from gpt_engine.models.gpt import GPT

from .helpers import make_hf_model

pytestmark = pytest.mark.usefixtures("torch_cpu_path")
KINDS = ["gpt2", "llama", "llama-untied"]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, tmp_path):
    hf = make_hf_model(kind, tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 256, (3, 37))
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(ours(ids), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_saved_checkpoint_loads_in_transformers(kind, tmp_path):
    import transformers
    make_hf_model(kind, tmp_path / "hf")
    cfg = load_model(tmp_path / "hf").config
    torch.manual_seed(1)
    ours = GPT(cfg).eval()
    with torch.no_grad():  # perturb norms too, so a mis-saved norm would show
        for n, p in ours.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    save_model(ours, tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    assert not list((tmp_path / "ours").glob("*.tmp"))


def test_config_roundtrip():
    for cfg in (ModelConfig(model_type="gpt2", n_layer=2, n_head=2, d_model=64, vocab_size=100),
                ModelConfig(model_type="llama", n_layer=2, n_head=8, n_kv_head=2, d_model=64, vocab_size=100,
                            tie_embeddings=False, bias=False, activation="silu")):
        assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


def test_family_traits_fill_what_the_caller_left_unset():
    neo = ModelConfig(model_type="gpt_neo", n_layer=2, n_head=2, d_model=64)
    assert (neo.norm, neo.mlp, neo.positions, neo.qkv_bias, neo.bias, neo.softmax_scale) == (
        "layernorm", "plain", "learned", False, True, 1.0)
    qwen = ModelConfig(model_type="qwen2", n_layer=2, n_head=2, d_model=64)
    assert (qwen.norm, qwen.mlp, qwen.activation, qwen.positions, qwen.qkv_bias, qwen.bias) == (
        "rmsnorm", "gated", "silu", "rotary", True, False)


@pytest.mark.parametrize("field,value", [("norm", "batchnorm"), ("mlp", "moe"), ("positions", "alibi"),
                                         ("rotary_layout", "zigzag"), ("rotary_fraction", 1.5),
                                         ("rotary_fraction", 0.0), ("parallel_residual", "yes"),
                                         ("shared_norm", True), ("qk_norm", 1), ("embed_scale", -8.0),
                                         ("norm_offset", float("nan")), ("attn_scale", -1.0), ("qkv_bias", "yes"),
                                         ("activation", "relu"), ("head_bias", True)])
def test_unsupported_traits_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(model_type="llama", n_layer=1, n_head=2, d_model=32, **{field: value})


@pytest.mark.parametrize("model_type,field,value", [("llama", "parallel_residual", True), ("llama", "qk_norm", True),
                                                    ("gpt2", "rotary_layout", "interleaved"),
                                                    ("qwen2", "qkv_bias", False), ("gemma", "embed_scale", 2.0),
                                                    ("gptj", "shared_norm", False), ("phi3", "norm_offset", 1.0)])
def test_traits_a_family_config_cannot_state_refuse_to_save(model_type, field, value):
    """Built with any traits, a model is saved only as a family whose config.json states them: else transformers
    would build another model from the file."""
    cfg = ModelConfig(model_type=model_type, n_layer=1, n_head=2, d_model=64, tie_embeddings=False,
                      **{field: value})
    with pytest.raises(ValueError, match=field):
        cfg.to_hf()


def test_bad_configs_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig(model_type="bert")
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(model_type="llama", n_head=6, n_kv_head=4, d_model=96)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="model_type"):
        load_model(tmp_path / "m")
    make_hf_model("gpt2", tmp_path / "g")
    (tmp_path / "g" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path / "g")


def test_position_past_context_raises():
    m = GPT(ModelConfig(model_type="gpt2", n_layer=1, n_head=2, d_model=64, vocab_size=50, max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 9, dtype=torch.long))
