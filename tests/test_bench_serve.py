"""`gpt-engine bench serve` against the real server (uvicorn in a thread, a small random-init model):
the report's counts match the requests sent, each request's latencies are ordered, failures are
counted and reported without a traceback, and bad flags are argparse errors."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

from gpt_engine.cli import _parser, main
from gpt_engine.cli.bench_serve import get_model, send
from tests.helpers import make_chat_model, serving

KEY = "bench-key"
METRICS = ("ttft", "tpot", "itl", "e2el")


@pytest.fixture(scope="module")
def srv(torch_path, tmp_path_factory):
    with serving(make_chat_model(tmp_path_factory.mktemp("bench-serve-model")), api_key=KEY) as server:
        yield server


def bench(srv, tmp_path, *flags) -> tuple[int, dict | None]:
    out = tmp_path / "r.json"
    rc = main(["bench", "serve", "--base-url", srv.url, "--api-key", KEY, "--disable-tqdm", "--out", str(out),
               *flags])
    return rc, json.loads(out.read_text()) if out.exists() else None


def check_report(r: dict, n: int, output_len: int) -> None:
    assert (r["completed"], r["failed"], r["errors"]) == (n, 0, [""] * n)
    assert r["output_lens"] == [output_len] * n and r["total_output_tokens"] == n * output_len
    assert r["total_input_tokens"] == sum(r["input_lens"]) and min(r["input_lens"]) > 0
    assert r["request_throughput"] == pytest.approx(n / r["duration"])
    assert r["output_throughput"] == pytest.approx(n * output_len / r["duration"])
    for ttft, e2el, itl in zip(r["ttfts"], r["e2els"], r["itls"]):
        assert 0 < ttft <= e2el <= r["duration"]
        # one gap between each two text chunks: at most output_len - 1 of them, within the request
        assert len(itl) <= output_len - 1 and ttft + sum(itl) <= e2el
    for m in METRICS:
        assert r[f"median_{m}_ms"] <= r[f"p90_{m}_ms"] <= r[f"p99_{m}_ms"]
        assert r[f"std_{m}_ms"] >= 0 and r[f"mean_{m}_ms"] > 0
    assert r["mean_ttft_ms"] == pytest.approx(1000 * sum(r["ttfts"]) / n)


@pytest.mark.parametrize("load", [["--max-concurrency", "2"], ["--request-rate", "20"]], ids=["concurrency", "rate"])
def test_synthetic_load(srv, tmp_path, capsys, load):
    png = tmp_path / "r.png"
    rc, r = bench(srv, tmp_path, "--num-prompts", "8", "--input-len", "8", "--output-len", "6", "--plot", str(png),
                  *load)
    assert rc == 0
    check_report(r, 8, 6)
    assert r["model"] == srv.engine.model_name and r["endpoint"] == "completions"
    if load[0] == "--max-concurrency":
        # at most 2 requests in flight at any time
        assert sum(r["e2els"]) <= 2 * r["duration"] and r["request_rate"] == "inf"
    else:
        assert r["request_rate"] == 20.0 and r["max_concurrency"] is None
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_synthetic_prompts_follow_seed_and_range(srv, tmp_path):
    rc, r = bench(srv, tmp_path, "--num-prompts", "6", "--input-len", "8", "--output-len", "4",
                  "--range-ratio", "0.5", "--seed", "3")
    assert rc == 0 and r["completed"] == 6
    assert all(2 <= n <= 6 for n in r["output_lens"]) and len(set(r["output_lens"])) > 1
    assert r["total_output_tokens"] == sum(r["output_lens"])
    _, again = bench(srv, tmp_path, "--num-prompts", "6", "--input-len", "8", "--output-len", "4",
                     "--range-ratio", "0.5", "--seed", "3")
    assert (again["input_lens"], again["output_lens"]) == (r["input_lens"], r["output_lens"])


def test_chat_dataset(srv, tmp_path, monkeypatch):
    data = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "hello server"}, {"messages": [{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "the quick brown fox"}]},
             {"prompt": "def f(x):"}]
    data.write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # --api-key's default
    out = tmp_path / "r.json"
    assert main(["bench", "serve", "--base-url", srv.url + "/v1", "--endpoint", "chat", "--dataset", str(data),
                 "--num-prompts", "5", "--output-len", "4", "--max-concurrency", "3", "--disable-tqdm",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    check_report(r, 5, 4)
    # the file repeats when shorter than --num-prompts; prompt tokens come from the server's usage
    tok, template = srv.engine.tokenizer, srv.engine.llm.chat_template
    assert r["input_lens"][:3] == [len(tok.encode(template.render(
        line.get("messages") or [{"role": "user", "content": line["prompt"]}]))) for line in lines]
    assert r["input_lens"][3:] == r["input_lens"][:2]


def test_failed_requests_are_counted(srv, tmp_path, capsys):
    # the second prompt is longer than the model's context: a 400 each time it is sent, the run goes on
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"prompt": "hello " * 300}) + "\n")
    rc, r = bench(srv, tmp_path, "--dataset", str(data), "--num-prompts", "4", "--output-len", "3")
    err = capsys.readouterr().err
    assert rc == 1 and (r["completed"], r["failed"]) == (2, 2)
    assert r["errors"][0] == r["errors"][2] == "" and r["errors"][1].startswith("HTTP 400")
    assert r["ttfts"][1] is None and r["total_output_tokens"] == 6
    assert "2 of 4 requests failed" in err and "HTTP 400" in err and "Traceback" not in err


def test_bad_key_and_bad_dataset_are_clear_errors(srv, tmp_path, capsys):
    assert main(["bench", "serve", "--base-url", srv.url, "--api-key", "wrong", "--disable-tqdm"]) == 2
    err = capsys.readouterr().err
    assert "/v1/models: HTTP 401" in err and "Traceback" not in err
    # a model given: the first request finds the bad key
    assert main(["bench", "serve", "--base-url", srv.url, "--api-key", "wrong", "--model", "m"]) == 2
    assert "the first request" in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert bench(srv, tmp_path, "--dataset", str(data))[0] == 2
    assert f"{data}:2: a `messages` line needs --endpoint chat" in capsys.readouterr().err
    data.write_text('{"text": "hi"}\n')
    assert bench(srv, tmp_path, "--dataset", str(data))[0] == 2
    assert f"{data}:1: each line needs" in capsys.readouterr().err


def test_unreachable_server_exits_without_traceback(tmp_path):
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "gpt_engine", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and "cannot reach" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("flags", [["--request-rate", "-1"], ["--request-rate", "0"], ["--num-prompts", "0"],
                                   ["--max-concurrency", "0"], ["--range-ratio", "1"], ["--output-len", "x"],
                                   ["--endpoint", "embeddings"], []])
def test_bad_flags_are_argparse_errors(capsys, flags):
    base = ["--base-url", "http://127.0.0.1:1"] if flags else []  # [] : --base-url is required
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", *base, *flags])
    assert e.value.code == 2 and "gpt-engine bench serve: error:" in capsys.readouterr().err


def test_offline_bench_keeps_its_positional_model():
    args = _parser(["bench", "gpt2-tiny", "--no-hf"]).parse_args(["bench", "gpt2-tiny", "--no-hf"])
    assert (args.command, args.model, args.no_hf) == ("bench", "gpt2-tiny", True)


def _sse(*chunks) -> bytes:
    return b"".join(b"data: " + (c if isinstance(c, bytes) else json.dumps(c).encode()) + b"\n\n" for c in chunks)


def _send(body: bytes, status=200):
    async def go():
        transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
        async with httpx.AsyncClient(transport=transport) as client:
            return await send(client, "http://x/v1/chat/completions", {"messages": [{"role": "user", "content": "a b"}]})
    return asyncio.run(go())


def test_arrivals_of_a_stream_without_usage():
    # llama.cpp's shape: a role header, then text, a held-back token (empty text), a closing chunk
    role = {"choices": [{"delta": {"role": "assistant", "content": None}, "finish_reason": None}]}
    text = {"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]}
    held = {"choices": [{"delta": {"content": ""}, "finish_reason": None}]}
    close = {"choices": [{"delta": {}, "finish_reason": "length"}]}
    r = _send(_sse(role, text, held, text, close, b"[DONE]"))
    assert r.ok and r.output_tokens == 3 and len(r.itl) == 2 and r.input_tokens == 2  # words, without usage
    usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}}
    r = _send(_sse(role, text, usage, b"[DONE]"))
    assert r.ok and (r.input_tokens, r.output_tokens, r.itl) == (7, 5, [])


@pytest.mark.parametrize("body, status, error", [
    (_sse({"choices": [{"text": "a"}]}, {"error": {"message": "engine died"}}), 200, "error in the stream: engine died"),
    (_sse(b"{not json"), 200, "JSONDecodeError"),
    (_sse({"choices": [{"delta": {"role": "assistant"}}]}, b"[DONE]"), 200, "no output in the stream"),
    (json.dumps({"error": {"message": "bad model"}}).encode(), 404, "HTTP 404: bad model"),
    (b"<html>oops</html>", 502, "HTTP 502: <html>oops</html>"),
])
def test_a_broken_response_is_one_failed_request(body, status, error):
    r = _send(body, status)
    assert not r.ok and error in r.error


@pytest.mark.parametrize("body", [b'{"data": []}', b"not json", b'{"object": "list"}'])
def test_models_list_without_a_model_asks_for_one(body):
    async def go():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
        async with httpx.AsyncClient(transport=transport) as client:
            return await get_model(client, "http://x")
    with pytest.raises(ConnectionError, match="names no model: pass --model"):
        asyncio.run(go())
