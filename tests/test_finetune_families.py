"""Fine-tuning (--init) every RoPE family as users bring it: qwen2 (qkv bias, tied and untied), a
llama-3-style checkpoint (llama3 rope scaling, GQA, untied head), and the families of
tests/helpers.FAMILY_CASES. The output directory must load in transformers with the logits our loader gives
it, rope scaling included."""
from __future__ import annotations

import json
import math

import pytest
import torch

from gpt_engine import ModelConfig, load_model
from gpt_engine.tokenizer import Tokenizer
from gpt_engine.train.config import TrainConfig
from gpt_engine.train.trainer import train

from .helpers import FAMILY_CASES, make_hf_model

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

TEXT = "".join(f"The {i}th line says {i * 7 % 13} apples and {i % 5} pears.\n" for i in range(300))
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
# name -> (make_hf_model kind, its transformers config fields, its shape)
FAMILIES = {
    "qwen2": ("qwen2", dict(rope_theta=1e6), None),
    "qwen2-untied": ("qwen2-untied", dict(rope_theta=1e6), None),
    "llama3": ("llama-untied", dict(rope_scaling=dict(LLAMA3), rope_theta=5e5), None),
    **{name: (kind, {}, shape) for name, (kind, shape) in FAMILY_CASES.items() if name != "gemma-256"},
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_finetune_from_hf_dir(name, tmp_path):
    import transformers
    kind, kw, shape = FAMILIES[name]
    init = tmp_path / "init"
    make_hf_model(kind, init, vocab_size=320, shape=shape, **kw)
    Tokenizer.train([TEXT], vocab_size=300, show_progress=False).save(init)
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    out = train(TrainConfig(init=str(init), data=str(data), out=str(tmp_path / "ft"), steps=2, batch_size=2,
                            seq_len=16, lr=1e-3, warmup=1, eval_every=2, eval_iters=1, sample_tokens=4,
                            progress=False, device="cpu"))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in log if "loss" in r] + [r["val_loss"] for r in log if "val_loss" in r]
    assert len(losses) >= 3 and all(math.isfinite(x) for x in losses)

    before, after = ModelConfig.load(init), ModelConfig.load(out)
    assert (after.model_type, after.qkv_bias, after.tie_embeddings) == (before.model_type, before.qkv_bias,
                                                                        before.tie_embeddings)
    assert after.rope_scaling == before.rope_scaling and after.rope_theta == before.rope_theta
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.model_type == kind.split("-")[0]
    ours = load_model(out)
    # 40 tokens: past original_max_position_embeddings (32), where llama3 scaling changes the rotation most
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(ids)
        torch.testing.assert_close(logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
        # the steps moved the weights: the output is not the init saved back
        assert (logits - load_model(init)(ids)).abs().max() > 1e-3
