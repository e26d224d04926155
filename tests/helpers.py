"""Small random-init HF models saved to disk, shared by the engine tests."""
from __future__ import annotations

import torch


def make_hf_model(kind: str, path, vocab_size: int = 256, seed: int = 0, **kw):
    """Save a random-init transformers model of `kind` (gpt2 | llama | llama-untied) to path."""
    import transformers
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=vocab_size, n_positions=128,
                                      bos_token_id=0, eos_token_id=0, **kw)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=160,
                                       num_attention_heads=4, num_key_value_heads=1, vocab_size=vocab_size,
                                       max_position_embeddings=128, tie_word_embeddings=kind != "llama-untied",
                                       bos_token_id=0, eos_token_id=0, **kw)
        model = transformers.LlamaForCausalLM(cfg)
        with torch.no_grad():  # random norms so a mis-mapped norm weight would show
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.uniform_(0.5, 1.5)
    model.eval().save_pretrained(path)
    return model
