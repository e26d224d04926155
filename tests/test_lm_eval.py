"""lm-evaluation-harness against the server: `local-completions` (loglikelihood, loglikelihood_rolling,
generate_until) and `local-chat-completions` (generate_until) give what lm-eval's own transformers
backend (`hf`) gives on the same model directory. Small local tasks (a .jsonl and task YAMLs written
here), the server in a thread on loopback; nothing is downloaded."""
from __future__ import annotations

import json

import pytest

from tests.helpers import CORPUS, make_chat_model, serving

lm_eval = pytest.importorskip("lm_eval")

# lm-eval's API backends keep max_length - 1 tokens (one for generation) and roll windows of one less
# again; hf rolls windows of max_length: these give both the same windows, and the server's context
# (128) holds every request
HF_MAX_LENGTH, API_MAX_LENGTH = 64, 66

MC = [{"question": "the quick brown", "choices": [" fox", " dog", " hello"], "answer": 0},
      {"question": "hello world,", "choices": [" hello", " server", " def"], "answer": 1},
      {"question": "def f(x):", "choices": ["\n    return", " the lazy", " x"], "answer": 0}]
DOCS = [CORPUS[:300], CORPUS[2000:2600]]   # longer than one window: rolling windows

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
TASKS = {
    "tiny_mc": ("mc.jsonl", """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""),
    "tiny_ppl": ("ppl.jsonl", """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""),
    "tiny_gen": ("mc.jsonl", """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: " fox"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model dir, task manager). A larger init spread than the default makes a random model's
    distributions peaked, so its greedy outputs differ from prompt to prompt."""
    from lm_eval.tasks import TaskManager
    root = tmp_path_factory.mktemp("lm-eval")
    model = make_chat_model(root / "model", initializer_range=0.5)
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC))
    (root / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    for name, (data, body) in TASKS.items():
        (root / f"{name}.yaml").write_text(TASK.format(name=name, data=root / data) + body)
    return model, TaskManager(include_path=str(root))


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def _evaluate(model, model_args, tasks, tm, **kw):
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=tm,
                                   log_samples=True, **kw)


def _same(a, b):
    """Two simple_evaluate results: equal metrics, and per request the same scores (within fp32's
    rounding: the server sums token logprobs the backend computed in another order) and texts."""
    for task, res in a["results"].items():
        for k, v in res.items():
            if isinstance(v, float):
                assert b["results"][task][k] == pytest.approx(v, rel=1e-4), (task, k)
    for task, samples in a["samples"].items():
        other = sorted(b["samples"][task], key=lambda s: s["doc_id"])
        for x, y in zip(sorted(samples, key=lambda s: s["doc_id"]), other, strict=True):
            for rx, ry in zip(x["resps"], y["resps"], strict=True):
                rx, ry = rx[0], ry[0]
                if isinstance(rx, str):
                    assert rx == ry, (task, x["doc_id"])
                elif isinstance(rx, tuple):   # loglikelihood: (logprob, is_greedy)
                    assert ry[0] == pytest.approx(rx[0], rel=1e-5, abs=1e-4) and ry[1] == rx[1], (task, rx, ry)
                else:                          # loglikelihood_rolling: the summed logprob
                    assert ry == pytest.approx(rx, rel=1e-5), (task, rx, ry)


def test_local_completions_and_chat_match_hf(torch_path, setup):
    model, tm = setup
    hf_args = dict(pretrained=str(model), max_length=HF_MAX_LENGTH, dtype="float32")
    hf = _evaluate("hf", hf_args, list(TASKS), tm, device="cpu", batch_size=4)
    hf_chat = _evaluate("hf", hf_args, ["tiny_gen"], tm, device="cpu", apply_chat_template=True)
    with serving(model) as srv:
        name = srv.engine.llm.model_name
        common = dict(model=name, max_length=API_MAX_LENGTH, num_concurrent=1, max_retries=1)
        api = _evaluate("local-completions", dict(base_url=srv.url + "/v1/completions", tokenizer=str(model),
                                                  tokenizer_backend="huggingface", tokenized_requests=True,
                                                  **common), list(TASKS), tm, batch_size=4)
        chat = _evaluate("local-chat-completions", dict(base_url=srv.url + "/v1/chat/completions", **common),
                         ["tiny_gen"], tm, apply_chat_template=True)
    assert set(api["results"]) == set(TASKS)
    _same(hf, api)
    _same(hf_chat, chat)
    # the generations are the model's, not one degenerate string for every prompt
    assert len({s["resps"][0][0] for s in api["samples"]["tiny_gen"]}) > 1
