"""Faults while writing: a disk that fills up at any write call of save_model or of the trainer's
checkpoint and final export (ENOSPC injected at each call in turn: a writer leaves half its file, an
fsync or a rename fails), and a training process SIGKILLed at several points, leave the previous model
or checkpoint loadable, no temporary file behind, and `--resume` continuing bit-exactly."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt_engine.models import save
from gpt_engine.models.config import ModelConfig
from gpt_engine.models.gpt import GPT
from gpt_engine.models.loader import load_model
from gpt_engine.tokenizer import Tokenizer
from gpt_engine.train import checkpoint as ck
from gpt_engine.train.config import TrainConfig
from gpt_engine.train.metrics import read_log
from gpt_engine.train.trainer import train

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(300))


def _half(path) -> None:
    p = Path(path)
    if p.is_file():
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 2)


class Faults:
    """Counts the write calls (the writers of every file a save makes, os.fsync, os.replace) from now on;
    the call numbered `at` fails with ENOSPC: a writer after writing half its file, fsync and replace
    before doing anything."""

    def __init__(self, monkeypatch, at: int | None = None):
        self.calls, self.at, self.names = 0, at, []
        mp = monkeypatch
        mp.setattr(save, "save_file", self._writer(save.save_file, lambda a: a[1]))
        mp.setattr(torch, "save", self._writer(torch.save, lambda a: a[1]))
        mp.setattr(Path, "write_text", self._writer(Path.write_text, lambda a: a[0]))
        mp.setattr(os, "fsync", self._plain(os.fsync))
        mp.setattr(os, "replace", self._plain(os.replace))
        import matplotlib.figure
        mp.setattr(matplotlib.figure.Figure, "savefig", self._writer(matplotlib.figure.Figure.savefig, lambda a: a[1]))
        from gpt_engine import tokenizer
        mp.setattr(tokenizer, "_read_tokenizer_json", lambda p, real=tokenizer._read_tokenizer_json: self.wrap(real(p)))

    def wrap(self, tok):
        """A tokenizers.Tokenizer whose save is a counted writer (the type itself cannot be patched)."""
        faults, real = self, tok

        class Proxy:
            def __getattr__(self, name):
                return getattr(real, name)

            def save(self, path, *a, **kw):
                return faults._writer(real.save, lambda args: args[0])(path, *a, **kw)
        return Proxy()

    def _hit(self, name) -> bool:
        self.names.append(name)
        self.calls += 1
        return self.calls - 1 == self.at

    def _writer(self, real, path_of):
        def write(*args, **kw):
            hit = self._hit(getattr(real, "__name__", "write"))
            out = real(*args, **kw)
            if hit:
                _half(path_of(args))
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return out
        return write

    def _plain(self, real):
        def call(*args, **kw):
            if self._hit(real.__name__):
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return real(*args, **kw)
        return call


def _temps(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.name.endswith(".tmp")]


def _tiny_model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(model_type="gpt2", n_layer=1, n_head=2, d_model=32, vocab_size=300, max_seq_len=32))


def test_save_model_fails_at_every_write_and_leaves_the_old_model(tmp_path, monkeypatch):
    tok = Tokenizer.train([TEXT], vocab_size=280, show_progress=False)
    old, new = _tiny_model(0), _tiny_model(1)
    base = tmp_path / "base"
    save.save_model(old, base, tok)
    backend = tok._tok
    with monkeypatch.context() as mp:
        counter = Faults(mp)
        mp.setattr(tok, "_tok", counter.wrap(backend))
        save.save_model(new, tmp_path / "count", tok)
    assert counter.calls >= 16, counter.names  # 4 files, each written, fsynced, renamed, its directory fsynced
    assert not _temps(tmp_path)
    for at in range(counter.calls):
        d = tmp_path / f"at{at}"
        shutil.copytree(base, d)
        with monkeypatch.context() as mp:
            faults = Faults(mp, at)
            mp.setattr(tok, "_tok", faults.wrap(backend))
            with pytest.raises(OSError) as e:
                save.save_model(new, d, tok)
        assert e.value.errno == errno.ENOSPC, counter.names[at]
        assert not _temps(d), (counter.names[at], _temps(d))
        got = load_model(d).state_dict()
        # the old model or the new one, whole
        assert any(all(torch.equal(got[k], v) for k, v in m.state_dict().items()) for m in (old, new)), faults.names

        assert Tokenizer.load(d).encode(TEXT[:200]) == tok.encode(TEXT[:200])
        save.save_model(new, d, tok)  # the disk has room again
        assert torch.equal(load_model(d).state_dict()["tok_emb.weight"], new.state_dict()["tok_emb.weight"])
        assert not _temps(d)


# --- the trainer -------------------------------------------------------------------------------

def _model_json(tmp_path) -> str:
    p = tmp_path / "model.json"
    p.write_text(json.dumps(dict(model_type="gpt2", n_layer=1, n_head=2, d_model=32, max_seq_len=32, vocab_size=300)))
    return str(p)


def _cfg(tmp_path, out, **kw) -> TrainConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    return TrainConfig(out=str(out), data=str(corpus), model=_model_json(tmp_path), steps=4, batch_size=2,
                       seq_len=16, lr=3e-3, warmup=1, eval_every=2, eval_iters=1, sample_tokens=2, save_every=2,
                       log_every=1, progress=False, device="cpu", **kw)


def _losses(out: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def _same_model(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_checkpoint_and_export_fail_at_every_write_then_resume_bit_exactly(tmp_path, monkeypatch):
    ref = train(_cfg(tmp_path, tmp_path / "ref"))
    base = tmp_path / "base"
    train(_cfg(tmp_path, base, stop_after=2))  # preempted after the step-2 checkpoint
    shutil.copytree(base, tmp_path / "count")
    with monkeypatch.context() as mp:
        counter = Faults(mp)
        train(_cfg(tmp_path, tmp_path / "count", resume=True))
    names = counter.names
    assert names.count("save") >= 2 and "save_file" in names, names  # the checkpoint, the tokenizer, the weights
    for at in range(counter.calls):
        out = tmp_path / f"at{at}"
        shutil.copytree(base, out)
        with monkeypatch.context() as mp:
            Faults(mp, at)
            with pytest.raises(OSError):
                train(_cfg(tmp_path, out, resume=True))
        assert not _temps(out), (names[at], _temps(out))
        step = ck.load_checkpoint(out, _Dd())["step"]
        assert step in (2, 4), names[at]
        train(_cfg(tmp_path, out, resume=True))
        _same_model(out, ref)
        assert _losses(out) == _losses(ref), names[at]
        assert not _temps(out)


class _Dd:
    master, world, rank = True, 1, 0

    def log(self, *a):
        pass


def test_sigkill_at_random_points_then_resume_bit_exactly(tmp_path):
    """`gpt-engine train` killed (SIGKILL) at several points, each time restarted with --resume (afresh while
    it has no checkpoint yet), ends with the weights and losses of a run never killed."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    steps = 8
    args = ["--data", str(corpus), "--model", _model_json(tmp_path), "--steps", str(steps), "--batch-size", "2",
            "--seq-len", "16", "--lr", "3e-3", "--warmup", "1", "--eval-every", "4", "--eval-iters", "1",
            "--sample-tokens", "2", "--save-every", "1", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}

    errors = tmp_path / "stderr.txt"

    def start(out, resume):
        with open(errors, "w") as err:
            return subprocess.Popen([sys.executable, "-m", "gpt_engine", "train", "--out", str(out), *args,
                                     *(["--resume"] if resume else [])], env=env, stdout=subprocess.DEVNULL,
                                    stderr=err)

    ref = tmp_path / "ref"
    p = start(ref, False)
    assert p.wait(300) == 0, errors.read_text()[-3000:]
    out, rng, kills = tmp_path / "killed", random.Random(0), 0

    def logged(step):
        return any(r["step"] >= step for r in read_log(out / "log.jsonl"))
    # kill while the data cache is built (no checkpoint yet: the next start is afresh), then at a random
    # moment after the log reaches a step (in a step, a checkpoint write or an evaluation)
    points = [lambda: (out / "data").is_dir()] + [lambda s=s: logged(s) for s in (2, 5)]
    for reached in points:
        p = start(out, bool(ck.checkpoints(out)))
        deadline = time.time() + 300
        while p.poll() is None and time.time() < deadline and not reached():
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.02))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait(60)
    assert kills >= 3
    p = start(out, True)
    assert p.wait(300) == 0, errors.read_text()[-3000:]
    _same_model(out, ref)
    assert _losses(out) == _losses(ref)
    assert not _temps(out)
