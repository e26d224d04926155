"""engine bench on a tiny workload: both engines run the same requests, in turns, and the result
holds what the README and benchmarks/results report."""
from __future__ import annotations

import pytest

from gpt_engine.cli.bench import _best_times, _range, format_result, run_bench


@pytest.mark.usefixtures("torch_cpu_path")
def test_run_bench_small():
    r = run_bench("gpt2-tiny", num_prompts=3, input_len=(4, 9), output_len=(2, 5), device="cpu", repeat=2)
    assert 3 * 2 <= r["output_tokens"] <= 3 * 5 and 3 * 4 <= r["prompt_tokens"] <= 3 * 9
    for name in ("ours", "hf"):
        assert r[name]["seconds"] > 0
        assert r[name]["output_tok_per_s"] == pytest.approx(r["output_tokens"] / r[name]["seconds"])
    assert r["ratio_output_tok_per_s"] == pytest.approx(r["hf"]["seconds"] / r["ours"]["seconds"])
    assert "ours / HF generate" in format_result(r)


def test_best_times_alternate_and_keep_the_best():
    calls = []
    best = _best_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, "cpu")
    assert calls == ["a", "b"] * 3
    assert set(best) == {"a", "b"} and all(t >= 0 for t in best.values())


def test_bad_ranges():
    assert _range("8,128") == (8, 128) and _range("64") == (64, 64)
    for bad in ("0", "9,3"):
        with pytest.raises(ValueError):
            _range(bad)
