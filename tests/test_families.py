"""The families past llama (GPT-NeoX/Pythia, GPT-J, Phi-3, Gemma, Qwen3) as transformers builds them, at odd
shapes (tests/helpers.FAMILY_CASES): logits, greedy decoding against generate() with plain and chunked prefill,
saving back to what transformers loads, and serving. Fine-tuning is in test_finetune_families.py, weight
formats in test_quant.py."""
from __future__ import annotations

import httpx
import pytest
import torch

from gpt_engine import LLM, ModelConfig, SamplingParams, load_model, save_model
from gpt_engine.tokenizer import Tokenizer

from .helpers import CORPUS, FAMILY_CASES, assert_greedy_matches, make_family_model, serving

pytestmark = pytest.mark.usefixtures("torch_cpu_path")


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(FAMILY_CASES))
def test_logits_and_save_round_trip(name, tmp_path):
    import transformers
    hf = make_family_model(name, tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        _close(ours(ids), want)
        save_model(ours, tmp_path / "out")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        _close(back(ids).logits, want)
    assert ModelConfig.load(tmp_path / "out") == ModelConfig.load(tmp_path / "hf")


@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("name", list(FAMILY_CASES))
def test_greedy_matches_generate(name, chunk, tmp_path):
    hf = make_family_model(name, tmp_path, initializer_range=0.1)
    assert_greedy_matches(tmp_path, hf, [3, 17, 40], **({"max_num_batched_tokens": chunk} if chunk else {}))


# Phi-4-mini's kind: longrope over a partial rotary (0.75 of a head of 40: 30 dims, 15 factors each)
PHI3_LONGROPE = dict(d_model=160, n_head=4, n_kv_head=2, d_ff=96, rotary_fraction=0.75, max_seq_len=128,
                     rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 32,
                                   "short_factor": [1.0 + i / 20 for i in range(15)],
                                   "long_factor": [1.5 + i / 4 for i in range(15)]})


@pytest.mark.parametrize("chunk", [None, 16])
def test_phi3_longrope_partial_rotary(chunk, tmp_path):
    """Past original_max_position_embeddings (32) the long factors rotate: logits of 45 tokens, and greedy
    prompts below and above it (transformers' Phi-3 recomputes its cache when a generation crosses it,
    which no prompt here does)."""
    from .helpers import make_hf_model
    hf = make_hf_model("phi3-untied", tmp_path, shape=PHI3_LONGROPE, initializer_range=0.1)
    ids = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _close(load_model(tmp_path)(ids), hf(ids).logits)
    assert_greedy_matches(tmp_path, hf, [3, 17, 40], **({"max_num_batched_tokens": chunk} if chunk else {}))


@pytest.mark.parametrize("name", ["gpt_neox", "gptj", "phi3", "gemma", "qwen3"])
def test_served(name, tmp_path):
    make_family_model(name, tmp_path)
    Tokenizer.train([CORPUS], vocab_size=256, show_progress=False).save(tmp_path)
    want = LLM(str(tmp_path), device="cpu").generate("hello world", SamplingParams(max_tokens=6, temperature=0,
                                                                                     ignore_eos=True))[0].text
    with serving(tmp_path) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hello world", "max_tokens": 6,
                                                          "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want


def test_training_loss_counts_the_head_bias():
    """GPT-J's head has a bias: the training loss (the chunked head) is the cross-entropy of the model's logits,
    and the bias gets its gradient."""
    import torch.nn.functional as F

    from gpt_engine.models.gpt import GPT
    from gpt_engine.train.model import LMLoss
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(model_type="gptj", n_layer=1, n_head=2, d_model=64, vocab_size=64, max_seq_len=16,
                          tie_embeddings=False, rotary_fraction=0.5))
    with torch.no_grad():
        gpt.lm_head.bias.normal_(0, 1.0)
    x, y = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9))
    loss = LMLoss(gpt)(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(gpt(x).flatten(0, 1), y.flatten(), reduction="sum"))
    loss.backward()
    assert gpt.lm_head.bias.grad is not None and gpt.lm_head.bias.grad.abs().sum() > 0
