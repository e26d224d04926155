"""gpt-engine eval: sliding-window perplexity through the engine's prompt logprobs, against
transformers (the perplexity guide's loop) and against the trainer's own validation loss."""
from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch

from gpt_engine.cli import main
from gpt_engine.cli.eval import windows
from tests.helpers import CORPUS, make_chat_model

DOCS = [CORPUS[:400], "hello world, hello server! " * 3, "def f(x):\n    return x * 2\n" * 6, "x"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("eval-model"))


def test_windows_score_each_token_once():
    for n in (1, 2, 5, 17, 40):
        for window, stride in ((8, 7), (8, 3), (2, 1), (64, 63)):
            ws = windows(n, window, stride)
            scored = [t for b, e, first in ws for t in range(first, e)]
            assert scored == list(range(1, n))
            assert all(e - b <= window and b < first for b, e, first in ws)
    with pytest.raises(ValueError, match="stride"):
        windows(10, 8, 8)


def _run(tmp_path, model_dir, data, *flags):
    out = tmp_path / "result.json"
    assert main(["eval", str(model_dir), "--data", str(data), "--json", str(out), "--no-progress", *flags]) == 0
    return json.loads(out.read_text())


@torch.no_grad()
def _hf_nll(model_dir, docs, window, stride):
    """transformers' perplexity guide, per document: the summed nll of the scored targets and their count."""
    import transformers

    from gpt_engine.tokenizer import Tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = Tokenizer.load(model_dir)
    nll, count = 0.0, 0
    for d in docs:
        ids = torch.tensor(tok.encode(d) + [tok.eos_token_id])
        for b, e, first in windows(len(ids), window, stride):
            lp = hf(ids[None, b:e]).logits[0].float().log_softmax(-1)
            t = torch.arange(first, e)
            nll -= lp[t - b - 1, ids[t]].double().sum().item()
            count += len(t)
    return nll, count


@pytest.mark.parametrize("window,stride", [(16, 15), (16, 5)])
def test_eval_matches_transformers(tmp_path, model_dir, window, stride):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    r = _run(tmp_path, model_dir, data, "--window", str(window), "--stride", str(stride), "--batch", "3",
             "--max-num-batched-tokens", "8")
    nll, count = _hf_nll(model_dir, DOCS, window, stride)
    assert r["tokens"] == count and r["documents"] == len(DOCS)
    assert r["nll"] == pytest.approx(nll, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert r["bytes"] == sum(len(d.encode()) for d in DOCS)
    assert r["bits_per_byte"] == pytest.approx(nll / r["bytes"] / math.log(2), rel=1e-5)


def test_text_file_is_one_document(tmp_path, model_dir):
    data = tmp_path / "doc.txt"
    data.write_text(DOCS[0])
    r = _run(tmp_path, model_dir, data, "--window", "32")
    nll, count = _hf_nll(model_dir, DOCS[:1], 32, 31)
    assert r["documents"] == 1 and r["tokens"] == count and r["stride"] == 31
    assert r["nll"] == pytest.approx(nll, rel=1e-5)


def test_eval_equals_the_trainers_val_loss(tmp_path, model_dir, monkeypatch):
    """The trainer's evaluate() over every range of a .jsonl split (its own tokenization and windows:
    seq_len + 1 tokens every seq_len) is eval's nll_per_token with --window seq_len+1 --stride seq_len."""
    from gpt_engine import load_model
    from gpt_engine.tokenizer import Tokenizer
    from gpt_engine.train import trainer
    from gpt_engine.train.config import TrainConfig
    from gpt_engine.train.data import Split, encode_examples, example_windows
    from gpt_engine.train.distributed import Dist
    from gpt_engine.train.model import LMLoss
    T = 12
    records = [{"text": d} for d in DOCS]
    toks, mask, bounds = encode_examples(records, Tokenizer.load(model_dir))
    split = Split(np.asarray(toks, dtype=np.int64), np.asarray(mask, dtype=np.uint8), np.asarray(bounds))
    split.windows = example_windows(split.bounds, split.mask, T)
    n = len(split.windows)

    class EveryRange:  # the trainer draws ranges at random: here each once, in order
        def __init__(self, seed):
            pass

        def integers(self, lo, hi, size):
            return np.arange(size) % hi
    monkeypatch.setattr(trainer.np.random, "default_rng", EveryRange)
    lm = LMLoss(load_model(model_dir))
    m = types.SimpleNamespace(model=lm, infer=lm)
    cfg = TrainConfig(out=str(tmp_path / "run"), eval_iters=1, batch_size=n, seq_len=T)
    val = trainer.evaluate(m, split, cfg, Dist("cpu"))
    monkeypatch.undo()

    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    r = _run(tmp_path, model_dir, data, "--window", str(T + 1), "--stride", str(T))
    assert r["tokens"] == int(sum(split.mask[s + 1:e].sum() for s, e in split.windows.tolist()))
    assert r["nll_per_token"] == pytest.approx(val, rel=1e-5)


def test_bad_data_is_a_clear_error(tmp_path, model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n')
    assert main(["eval", str(model_dir), "--data", str(bad)]) == 2
    assert '"text"' in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--data", str(tmp_path / "missing.txt")]) == 2
