"""Chat fine-tuning: {"messages"} lines rendered by the model's template (or the default ChatML one written
with the result), loss on assistant turns only, batch rows inside one example, {"text"} lines, bad lines."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gpt_engine.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, assistant_spans
from gpt_engine.train.data import (IGNORE_INDEX, build_dataset, encode_examples, example_batch, example_windows,
                             read_jsonl)
from gpt_engine.tokenizer import EOS, Tokenizer

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

TEXT = "".join(f"user asks question {i}? the assistant answers {i * 7} politely. system says hi.\n"
               for i in range(200))
CONV = [{"role": "system", "content": "You answer with numbers."},
        {"role": "user", "content": "what is 6 times 7?"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "and 2 plus 2?"},
        {"role": "assistant", "content": "4, of course"}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], vocab_size=300, show_progress=False)


def default_template():
    return ChatTemplate(DEFAULT_CHAT_TEMPLATE, {"eos_token": EOS})


def test_assistant_spans_cover_replies_and_end_of_turn():
    text, spans = assistant_spans(default_template(), CONV)
    assert [text[a:b] for a, b in spans] == ["42" + EOS, "4, of course" + EOS]
    rewriting = ChatTemplate("{% for m in messages %}{{ m['content'] }}|{{ messages | length }}{% endfor %}")
    with pytest.raises(ValueError, match="rewrites earlier turns"):
        assistant_spans(rewriting, CONV)


def test_loss_only_on_assistant_tokens(tok):
    toks, mask, bounds = encode_examples([{"messages": CONV}], tok, default_template())
    assert bounds == [0, len(toks)] and len(mask) == len(toks)
    text = default_template().render(CONV, add_generation_prompt=False)
    assert toks == tok.encode(text)  # tokenized whole, as the engine tokenizes a rendered prompt
    trained = [t for t, m in zip(toks, mask) if m]
    assert tok.decode(trained, skip_special_tokens=False) == "42" + EOS + "4, of course" + EOS
    untrained = tok.decode([t for t, m in zip(toks, mask) if not m], skip_special_tokens=False)
    for m in CONV:
        if m["role"] != "assistant":
            assert m["content"] in untrained
    # labels: IGNORE_INDEX exactly where the predicted token is not an assistant token
    wins = np.array([[0, len(toks)]])
    x, y = example_batch(np.array(toks), np.array(mask, dtype=np.uint8), wins)
    assert x[0].tolist() == toks[:-1]
    assert [int(t) for t in y[0] if t != IGNORE_INDEX] == trained
    assert ((y[0] == IGNORE_INDEX) == (np.array(mask[1:]) == 0)).all()


def test_text_and_pair_examples(tok):
    toks, mask, bounds = encode_examples([{"text": "system says hi."}, {"prompt": "user asks", "completion": " 7"}],
                                         tok)
    n = len(tok.encode("system says hi.")) + 1
    assert bounds == [0, n, len(toks)] and toks[n - 1] == tok.eos_token_id
    assert mask[:n] == [1] * n and mask[n:] == [0] * len(tok.encode("user asks")) + [1] * (len(tok.encode(" 7")) + 1)
    with pytest.raises(ValueError, match="need a chat template"):
        encode_examples([{"messages": CONV}], tok)


def test_windows_stay_inside_one_example():
    bounds = np.array([0, 5, 30, 33])
    mask = np.ones(33, dtype=np.uint8)
    mask[30:33] = 0  # the third example has no loss token: never drawn
    wins = example_windows(bounds, mask, seq_len=8)
    assert wins.tolist() == [[0, 5], [5, 14], [13, 22], [21, 30]]  # a long example cut in windows of T + 1
    tokens = np.arange(33)
    x, y = example_batch(tokens, mask, wins[:2])
    assert x.shape == (2, 8) and x[0].tolist() == [0, 1, 2, 3, 0, 0, 0, 0]
    assert y[0].tolist() == [1, 2, 3, 4] + [IGNORE_INDEX] * 4  # padding carries no loss
    assert x[1].tolist() == list(range(5, 13))
    with pytest.raises(ValueError, match="carries loss"):
        example_windows(bounds[2:], mask, 8)


def test_bad_lines_name_file_and_line(tmp_path):
    p = tmp_path / "chats.jsonl"
    cases = [('{"messages": "hi"}', "non-empty list"),
             ('{"messages": [{"role": "user", "content": "a"}]}', "assistant"),
             ('{"messages": [{"role": "user", "content": 3}]}', r"messages\[0\]"),
             ('{"text": 5}', '"text" must be a string'),
             ('[1, 2]', "JSON object")]
    good = json.dumps({"messages": CONV})
    for line, what in cases:
        p.write_text(good + "\n\n" + line + "\n")
        with pytest.raises(ValueError, match=rf"chats.jsonl:3: .*{what}"):
            read_jsonl(p)
    p.write_text(good + "\n" + json.dumps({"text": "t"}) + "\n")
    assert [list(r) for r in read_jsonl(p)] == [["messages"], ["text"]]


def chats_file(path, n=40):
    lines = []
    for i in range(n):
        lines.append({"messages": [{"role": "user", "content": f"what is {i} times 7?"},
                                   {"role": "assistant", "content": f"{i * 7}"}]})
        if i % 10 == 0:
            lines.append({"text": f"user asks question {i}? the assistant answers {i * 7} politely."})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_build_dataset_gives_a_template_and_bounds(tmp_path, tok):
    data = chats_file(tmp_path / "chats.jsonl")
    own = Tokenizer.train([TEXT], vocab_size=300, show_progress=False)
    assert own.chat_template is None
    t, tr, va = build_dataset(data, tmp_path / "d", own, 320)
    assert t.chat_template == DEFAULT_CHAT_TEMPLATE
    # 44 examples (40 chats, 4 texts), every 20th of them validating
    assert tr.bounds[0] == 0 and tr.bounds[-1] == len(tr.tokens) and len(tr.bounds) == 44 - 3 + 1
    assert json.loads((tmp_path / "d" / "tokenizer_config.json").read_text())["chat_template"] == DEFAULT_CHAT_TEMPLATE
    # a model's own template is kept and used
    mine = Tokenizer.train([TEXT], vocab_size=300, show_progress=False)
    mine.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] + eos_token }}{% endfor %}"
    t2, tr2, _ = build_dataset(data, tmp_path / "d2", mine, 320)
    assert t2.chat_template == mine.chat_template and len(tr2.tokens) != len(tr.tokens)
    # the cache is reused only for the same template
    _, again, _ = build_dataset(data, tmp_path / "d", t, 320)
    assert np.array_equal(again.bounds, tr.bounds) and np.array_equal(again.mask, tr.mask)


def test_chat_finetune_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gpt_engine.llm import LLM
    from gpt_engine import SamplingParams
    from gpt_engine.train.config import TrainConfig
    from gpt_engine.train.trainer import train
    from tests.helpers import make_hf_model
    init = tmp_path / "base"
    make_hf_model("gpt2", init, vocab_size=320)
    Tokenizer.train([TEXT], vocab_size=300, show_progress=False).save(init)
    out = train(TrainConfig(out=str(tmp_path / "ft"), init=str(init), data=str(chats_file(tmp_path / "c.jsonl")),
                            steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_every=4, eval_iters=1,
                            sample_tokens=4, progress=False, device="cpu"))
    losses = [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses[-1] < losses[0]
    # the result carries the template it was taught with: transformers and the engine render it alike
    at = transformers.AutoTokenizer.from_pretrained(str(out))
    conv = [{"role": "user", "content": "what is 3 times 7?"}]
    text = at.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nwhat is 3 times 7?" + EOS + "\n<|im_start|>assistant\n"
    o = LLM(str(out), device="cpu").chat(conv, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert o.prompt == text and o.prompt_token_ids == at(text, add_special_tokens=False)["input_ids"]
