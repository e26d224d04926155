"""The trainer survives crashes: checkpoints load with weights_only=True, writes are fsynced and
atomic, a truncated newest checkpoint falls back to the previous one, stale temp files go, and
--resume refuses a run whose settings or data differ from the checkpoint's."""
from __future__ import annotations

import os
import random
import types

import numpy as np
import pytest
import torch

from gpt_engine.atomic import atomic_write, remove_stale_temps
from gpt_engine.train import checkpoint as ck
from gpt_engine.train.config import TrainConfig
from gpt_engine.train.trainer import train


def _dd():
    return types.SimpleNamespace(log=lambda *a: None, master=True, world=1, rank=0)


def _ckpt(step, **extra):
    return dict(model={"w": torch.ones(2)}, optimizer={}, step=step, rng=[ck._rng_states()],
                model_config={}, train_config={"model": "gpt2-tiny", "data": None, "vocab_size": 512}, world=1,
                **extra)


def test_rng_states_load_weights_only_and_restore(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    path = tmp_path / "rng.pt"
    torch.save(ck._rng_states(), path)
    want = (torch.rand(3), np.random.standard_normal(3), random.random())
    ck._set_rng_states(torch.load(path, weights_only=True))
    got = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_atomic_write_fsyncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(tmp_path / "f.bin", lambda p: open(p, "wb").write(b"data"))
    assert (tmp_path / "f.bin").read_bytes() == b"data"
    assert any(s.endswith(".tmp") for s in synced), synced  # the data, before the rename
    assert str(tmp_path) in synced  # the directory entry, after it
    assert not list(tmp_path.glob(".*.tmp"))


def test_truncated_newest_checkpoint_falls_back(tmp_path):
    d = tmp_path / "checkpoint"
    d.mkdir()
    torch.save(_ckpt(10), d / "step_00000010.pt")
    torch.save(_ckpt(20), d / "step_00000020.pt")
    data = (d / "step_00000020.pt").read_bytes()
    (d / "step_00000020.pt").write_bytes(data[:len(data) // 2])  # a crash mid-write (no atomic rename)
    with pytest.warns(UserWarning, match="step_00000020.pt is unreadable"):
        ckpt = ck.load_checkpoint(tmp_path, _dd())
    assert ckpt["step"] == 10
    (d / "step_00000010.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no readable checkpoint"):
        ck.load_checkpoint(tmp_path, _dd())


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    d = tmp_path / "checkpoint"
    d.mkdir()
    torch.save(_ckpt(10), d / "step_00000010.pt")
    torch.save({**_ckpt(20), "evil": types.SimpleNamespace(x=1)}, d / "step_00000020.pt")  # needs pickle's globals
    with pytest.warns(UserWarning, match="unreadable"):
        assert ck.load_checkpoint(tmp_path, _dd())["step"] == 10


def test_stale_temp_files_removed(tmp_path):
    d = tmp_path / "checkpoint"
    d.mkdir()
    (d / ".step_00000010.pt.abc.tmp").write_bytes(b"half")
    (d / "step_00000005.pt").write_bytes(b"kept")
    remove_stale_temps(d)
    assert sorted(p.name for p in d.iterdir()) == ["step_00000005.pt"]


def _cfg(tmp_path, **kw):
    return TrainConfig(out=str(tmp_path), **kw)


@pytest.mark.parametrize("field,value", [("model", "gpt2-small"), ("vocab_size", 1024)])
def test_resume_with_other_settings_refused(tmp_path, field, value):
    ckpt = _ckpt(10)
    ck.check_resume(_cfg(tmp_path), ckpt, tmp_path)  # the same run: fine
    with pytest.raises(ValueError, match=field):
        ck.check_resume(_cfg(tmp_path, **{field: value}), ckpt, tmp_path)


def test_resume_with_other_world_size_refused(tmp_path):
    ckpt = {**_ckpt(10), "world": 2}
    ck.check_resume(_cfg(tmp_path), ckpt, tmp_path, world=2)  # the same world size: fine
    with pytest.raises(ValueError, match="world size is 4 but the checkpoint .* was trained with 2"):
        ck.check_resume(_cfg(tmp_path), ckpt, tmp_path, world=4)
    del ckpt["world"]  # a checkpoint that did not record it: accepted, as before
    ck.check_resume(_cfg(tmp_path), ckpt, tmp_path, world=4)


def test_load_checkpoint_checks_world_size(tmp_path):
    # the path --resume takes: load_checkpoint with the run's config checks this process's world size
    d = tmp_path / "checkpoint"
    d.mkdir()
    torch.save(_ckpt(10), d / "step_00000010.pt")  # saved by one process
    assert ck.load_checkpoint(tmp_path, _dd(), _cfg(tmp_path))["step"] == 10
    with pytest.raises(ValueError, match="world size is 2 .* trained with 1"):
        ck.load_checkpoint(tmp_path, types.SimpleNamespace(**{**vars(_dd()), "world": 2}), _cfg(tmp_path))


def test_resume_with_changed_data_refused(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("hello world\n" * 100)
    ckpt = _ckpt(10, data_fingerprint=ck.data_fingerprint(str(data)))
    ckpt["train_config"]["data"] = str(data)
    ck.check_resume(_cfg(tmp_path, data=str(data)), ckpt, tmp_path)
    data.write_text("other text\n" * 120)
    with pytest.raises(ValueError, match="data"):
        ck.check_resume(_cfg(tmp_path, data=str(data)), ckpt, tmp_path)
    with pytest.raises(ValueError, match="data"):
        ck.check_resume(_cfg(tmp_path, data=str(tmp_path / "other.txt")), ckpt, tmp_path)


def _tokenizer(text, size):
    from gpt_engine.tokenizer import Tokenizer
    return Tokenizer.train([text] * 20, size, show_progress=False)


def test_resume_with_other_tokenizer_refused(tmp_path):
    a = _tokenizer("def f(x):\n    return x * 2\n", 300)
    ckpt = _ckpt(10, tokenizer_fingerprint=ck.tokenizer_fingerprint(a))
    ck.check_resume_tokenizer(ckpt, _tokenizer("def f(x):\n    return x * 2\n", 300), tmp_path)  # same: fine
    ck.check_resume_tokenizer(_ckpt(10), a, tmp_path)  # a checkpoint from before fingerprints: not checked
    with pytest.raises(ValueError, match=r"tokenizer differs.*\(\d+ tokens, the checkpoint's \d+"):
        ck.check_resume_tokenizer(ckpt, _tokenizer("SELECT name FROM users WHERE id = 1;\n", 280), tmp_path)
    other = _tokenizer("SELECT name FROM users WHERE id = 1;\n" * 3 + "def g(y): pass\n", 300)
    if other.vocab_size == a.vocab_size:
        with pytest.raises(ValueError, match=r"tokenizer differs.*same size"):
            ck.check_resume_tokenizer(ckpt, other, tmp_path)


def test_train_resume_with_replaced_tokenizer_refused(tmp_path, monkeypatch):
    """End to end: the checkpoint records the tokenizer, and a resumed run whose cached
    OUT/data/tokenizer.json was replaced stops before training on ids it was not trained with."""
    import json
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(300)))
    mcfg = tmp_path / "cfg.json"
    mcfg.write_text(json.dumps(dict(model_type="gpt2", n_layer=1, n_head=2, d_model=64, max_seq_len=32,
                                    vocab_size=300)))
    cfg = dict(out=str(tmp_path / "run"), data=str(corpus), model=str(mcfg), steps=4, batch_size=2, seq_len=16,
               warmup=1, eval_every=2, eval_iters=1, sample_tokens=2, progress=False, device="cpu")
    train(TrainConfig(**cfg, stop_after=2))
    assert torch.load(ck.latest_checkpoint(tmp_path / "run"), weights_only=True)["tokenizer_fingerprint"]
    _tokenizer("SELECT name FROM users;\n" * 50, 300).save(tmp_path / "run" / "data")
    with pytest.raises(ValueError, match="tokenizer differs"):
        train(TrainConfig(**cfg, resume=True))
    # the original tokenizer back: the run resumes
    (tmp_path / "run" / "data" / "meta.json").unlink()
    train(TrainConfig(**cfg, resume=True))


@pytest.mark.parametrize("family,bias,qkv_bias", [("gpt2", True, False), ("llama", False, False), ("qwen2", False, True)])
def test_checkpoint_config_written_before_the_trait_fields_resumes(family, bias, qkv_bias):
    # such a checkpoint's qkv_bias meant "a q/k/v bias beyond `bias`"
    from gpt_engine.models.presets import resolve_config
    from gpt_engine.train.model import model_config
    new = resolve_config("llama-tiny" if family != "gpt2" else "gpt2-tiny").to_dict()
    traits = ("norm", "norm_offset", "mlp", "positions", "rotary_fraction", "rotary_layout", "parallel_residual",
              "attn_scale", "qk_norm", "embed_scale", "mlp_bias")
    old = {k: v for k, v in new.items() if k not in traits}
    old.update(model_type=family, bias=bias, qkv_bias=qkv_bias)
    mcfg, _ = model_config(TrainConfig(out="unused"), {"model_config": old, "train_config": {}})
    assert mcfg.qkv_bias == (bias or qkv_bias) and mcfg.bias == bias
