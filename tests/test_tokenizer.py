"""Byte-level BPE: exact round trips (unicode, whitespace), save/load, incremental decoding."""
from __future__ import annotations

import pytest

from gpt_engine.core.detokenizer import Detokenizer
from gpt_engine.tokenizer import EOS, Tokenizer

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

TRAIN = ["def main():\n    print('hello, world')\n\tx = 1\n", "naïve café — 日本語 🙂\n"] * 50
CASES = ["", " ", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n", "def f(x):\n    return x",
         "naïve café", "日本語のテキスト", "emoji 🙂🚀 zwj 👩‍💻", "unseen: Ωμέγα ж ק", "\x00\x7f control"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TRAIN, vocab_size=300, show_progress=False)


@pytest.mark.parametrize("text", CASES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_vocab_and_eos(tok):
    assert tok.vocab_size <= 300 and tok.eos_token_id == 0 and tok.id_to_token(0) == EOS
    assert tok.decode(tok.encode("a") + [tok.eos_token_id]) == "a"  # special tokens skipped
    assert len(tok.encode("def main():")) < len("def main():")  # merges learned


def test_save_load(tok, tmp_path):
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer_config.json").is_file()
    again = Tokenizer.load(tmp_path)
    for text in CASES:
        assert again.encode(text) == tok.encode(text)
    assert again.encode_batch(CASES) == [tok.encode(t) for t in CASES]
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing")


def test_incremental_detokenizer(tok):
    """Byte-level tokens end mid-character: the stream never splits or repeats one."""
    text = "日本語 🙂 café"
    dec = Detokenizer(tok, [])
    deltas = []
    for i in tok.encode(text):
        dec.push([i])
        deltas.append(dec.delta(False))
    dec.flush()
    deltas.append(dec.delta(True))
    assert "".join(deltas) == text and "\ufffd" not in "".join(deltas)


# --- hub directories: vocab.json + merges.txt, tokenizer_config.json -----------------------------------
HUB_TEXTS = CASES + ["hello <|endoftext|> world</s><s>", "<s> starts", "def main():\n    print('hello, world')"]


def _bpe():
    from .helpers import train_bpe
    return train_bpe(TRAIN, vocab_size=320, special_tokens=("<|endoftext|>", "<s>", "</s>"))


def _auto_ids(d, texts):
    import transformers
    at = transformers.AutoTokenizer.from_pretrained(d)
    return [at(t)["input_ids"] for t in texts], at


@pytest.mark.parametrize("cfg", [
    None,                                                       # GPT-2-era: vocab + merges only
    {"tokenizer_class": "GPT2Tokenizer"},
    {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True},  # bos defaults to <|endoftext|>
    {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"},
    {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_eos_token": True,
     "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "rstrip": False,
                                                  "normalized": False, "single_word": False, "special": True}, "eos_token": "</s>", "add_prefix_space": True},
])
def test_vocab_merges_directory_matches_autotokenizer(cfg, tmp_path):
    import json
    _bpe().model.save(str(tmp_path))
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    if cfg is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = Tokenizer.load(tmp_path)
    theirs, at = _auto_ids(tmp_path, HUB_TEXTS)
    assert [ours.encode(t, add_special_tokens=True) for t in HUB_TEXTS] == theirs
    assert ours.encode_batch(HUB_TEXTS, add_special_tokens=True) == theirs
    assert (ours.bos_token, ours.eos_token) == (at.bos_token, at.eos_token)
    assert (ours.bos_token_id, ours.eos_token_id) == (at.bos_token_id, at.eos_token_id)
    assert ours.eos_token_ids == [at.eos_token_id]
    assert ours.add_bos_token == bool((cfg or {}).get("add_bos_token"))
    assert ours.encode("a b") == [i for i in ours.encode("a b", add_special_tokens=True)
                                  if i not in (ours.bos_token_id, ours.eos_token_id)]
    # saved as tokenizer.json, the BOS rule travels with it
    (tmp_path / "saved").mkdir()
    ours.save(tmp_path / "saved")
    again = Tokenizer.load(tmp_path / "saved")
    assert [again.encode(t, add_special_tokens=True) for t in HUB_TEXTS] == theirs


def test_tokenizer_json_post_processor_decides_bos(tmp_path):
    import json

    from tokenizers import processors
    tok = _bpe()
    tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 $B:1",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    ours = Tokenizer.load(tmp_path)
    theirs, at = _auto_ids(tmp_path, HUB_TEXTS)
    assert [ours.encode(t, add_special_tokens=True) for t in HUB_TEXTS] == theirs
    assert ours.add_bos_token and ours.bos_token_id == tok.token_to_id("<s>") == at.bos_token_id
    assert ours.eos_token == "</s>" and ours.eos_token_id == tok.token_to_id("</s>")
    assert ours.chat_template == at.chat_template
    assert ours.decode(ours.encode("hi", add_special_tokens=True)) == "hi"
    # chat_template.jinja wins over tokenizer_config.json, as in transformers
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer.load(tmp_path).chat_template == _auto_ids(tmp_path, [])[1].chat_template


def test_named_special_tokens_and_bad_configs(tmp_path):
    import json
    tok = _bpe()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<s>"}))
    ours = Tokenizer.load(tmp_path)
    assert ours.eos_token_id == tok.token_to_id("</s>") and ours.pad_token_id == tok.token_to_id("<s>")
    assert not ours.add_bos_token
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": 5}))
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="JSON"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="merges"):
        Tokenizer.load(tmp_path)
