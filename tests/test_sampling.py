import math

import pytest
import torch

from gpt_engine import SamplingParams
from gpt_engine.worker.sampler import Sampler, _argmax, apply_min_p, apply_penalties, apply_top_k_top_p


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0),
                                dict(top_k=-2), dict(max_tokens=0), dict(min_p=1.5), dict(repetition_penalty=0.0),
                                dict(presence_penalty=3.0), dict(frequency_penalty=-2.5), dict(logprobs=-1),
                                dict(stop=[""]), dict(stop_token_ids=[-1]), dict(temperature=float("nan")),
                                dict(presence_penalty=1e300), dict(frequency_penalty=-1e300),
                                dict(repetition_penalty=float("nan")), dict(min_p=float("nan")),
                                dict(top_p=None), dict(temperature="0.5"), dict(repetition_penalty=True)])
def test_params_reject_impossible_values(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


@pytest.mark.parametrize("kw", [dict(top_p=1e-300), dict(temperature=1e-300), dict(temperature=1e300),
                                dict(repetition_penalty=1e-300), dict(repetition_penalty=1e300),
                                dict(min_p=1e-300), dict(presence_penalty=1e-300), dict(top_p=5e-324)])
def test_params_accept_tiny_and_huge_valid_values(kw):
    assert getattr(SamplingParams(**kw), next(iter(kw))) == next(iter(kw.values()))


def test_params_defaults_and_normalisation():
    p = SamplingParams(stop="x")
    assert p.max_tokens == 16 and p.temperature == 1.0 and p.top_k == -1 and p.stop == ["x"]
    assert p.stop_token_ids == [] and not p.greedy and SamplingParams(temperature=0).greedy


def test_top_k_top_p_masks():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    out = apply_top_k_top_p(logits, torch.tensor([2, 4]), None)
    assert torch.isinf(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all() and torch.isfinite(out[1]).all()
    # top_p 0.6: keep tokens until the mass before them reaches 0.6 -> {0.4, 0.3}; top_p 1: all
    out = apply_top_k_top_p(logits, None, torch.tensor([0.6, 1.0]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    assert torch.isfinite(out[1]).all()
    # the most likely token always survives
    out = apply_top_k_top_p(logits, None, torch.tensor([1e-6, 1e-6]))
    assert torch.isfinite(out).sum(-1).tolist() == [1, 1] and torch.isfinite(out[1, 3])
    out = apply_top_k_top_p(logits, None, torch.tensor([0.0, 1e-300]))  # 0 in fp32: greedy, not all masked
    assert torch.isfinite(out).sum(-1).tolist() == [1, 1] and torch.isfinite(out[1, 3])


def _edge_logits():
    """The argmax is token 7, never 0: a NaN row would come out as token 0 (argmax takes NaN as
    the maximum). Token 0's logit is exactly 0 (0 * inf = NaN); then 7 > 3 > 5 > 0 > the rest."""
    logits = torch.linspace(-3, -1, 20)
    logits[0], logits[3], logits[5], logits[7] = 0.0, 2.0, 1.0, 4.0
    return logits[None].expand(3, 20).clone()


# (params, the only token it may give): all but the last rows are certain draws
@pytest.mark.parametrize("kw,want", [
    (dict(top_p=1e-300), 7), (dict(top_p=5e-324, temperature=2.0), 7), (dict(top_p=1e-300, min_p=1e-300), 7),
    (dict(temperature=1e-300), 7), (dict(temperature=1e-300, top_p=1e-300), 7),
    # seen {0, 3, 5, 7}: a tiny penalty makes the largest seen positive logit (7) certain
    (dict(repetition_penalty=1e-300), 7), (dict(repetition_penalty=1e-40, temperature=1e-4), 7),
    (dict(repetition_penalty=1e-300, temperature=1e300), None), (dict(repetition_penalty=1e-300, min_p=1.0), 7),
    (dict(repetition_penalty=1e-300, temperature=0), 7),
    # seen {0, 3, 7}: a huge penalty takes them to ~0, so unseen 5 (logit 1) is the greedy token, certain
    # under a small temperature
    (dict(repetition_penalty=1e300, temperature=1e-3), 5), (dict(repetition_penalty=float("inf"), temperature=0), 5),
    (dict(repetition_penalty=1e300, temperature=1e300), None), (dict(repetition_penalty=1e300, min_p=1.0), 5),
])
def test_tiny_and_huge_values_give_finite_scores_not_nan(kw, want):
    logits = _edge_logits()
    rep = kw.get("repetition_penalty", 1.0)
    seen = [0, 3, 7] if rep > 1 else [0, 3, 5, 7] if rep < 1 else []
    p = SamplingParams(**kw)
    if p.has_penalties:
        pen = apply_penalties(logits.clone(), [p] * 3, [seen] * 3, [[]] * 3)
        assert torch.isfinite(pen).all()
    # with a greedy row and a default row beside it: the batch neither changes it nor is changed
    ps = [p, SamplingParams(temperature=0), SamplingParams()]
    for seed in range(10):
        toks, _ = Sampler(seed=seed)(logits.clone(), ps, [seen, [], []], [[]] * 3)  # the sampler writes its input
        assert toks[1] == 7
        if want is not None:
            assert toks[0] == want, (kw, toks)
    if want is None:  # the huge temperature is about uniform: draws spread, not one NaN-made token 0
        toks, _ = Sampler(seed=0)(logits[:1].expand(400, 20), [p] * 400, [seen] * 400, [[]] * 400)
        assert len(set(toks)) > 10


def test_min_p_mask():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = apply_min_p(logits, torch.tensor([0.4]))  # threshold 0.2
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits.clone(), [p], [[0, 1]], [[2, 2, 1]])
    exp = [2.0 / 2, -1.0 * 2, 0.5 / 2, -0.5, 1.0]      # repetition over prompt+output {0, 1, 2}
    exp[2] -= 0.5 + 0.25 * 2                           # output counts: token 2 twice, token 1 once
    exp[1] -= 0.5 + 0.25 * 1
    torch.testing.assert_close(out[0], torch.tensor(exp))
    # a row without penalties is untouched
    out = apply_penalties(torch.cat([logits, logits]), [SamplingParams(), p], [[0], [0, 1]], [[2], [2, 2, 1]])
    torch.testing.assert_close(out[0], logits[0])


def test_greedy_rows_ignore_the_rest_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    s = Sampler(seed=0)
    ps = [SamplingParams(temperature=0), SamplingParams(temperature=1.5, top_k=5),
          SamplingParams(temperature=0), SamplingParams(top_p=0.5)]
    toks, _ = s(logits, ps, generators=[None] * 4)
    assert toks[0] == logits[0].argmax() and toks[2] == logits[2].argmax()
    toks2, _ = s(logits, [SamplingParams(temperature=0)] * 4)
    assert toks2 == logits.argmax(-1).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_argmax_matches_torch_on_ties_nan_and_inf(dtype):
    nan, inf = float("nan"), float("inf")
    rows = [[1, 3, 3, 0], [nan, 1, nan, 2], [-inf] * 4, [0, inf, inf, 5], [2, 2, 2, 2]]
    x = torch.tensor(rows, dtype=dtype)
    x = torch.cat([x, torch.randn(7, 4, dtype=dtype)])
    assert _argmax(x).dtype == torch.long
    assert _argmax(x).tolist() == x.argmax(-1).tolist()
    assert _argmax(x.t().contiguous().t()).tolist() == x.argmax(-1).tolist()  # non-contiguous rows


def test_seeded_rows_reproduce_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    p = SamplingParams(seed=7, temperature=1.0)

    def draw(batch_logits, row, n_other):
        s = Sampler()
        g = Sampler.request_generator(7, "cpu")
        gens = [None] * n_other + [g]
        ps = [SamplingParams(temperature=0.8)] * n_other + [p]
        return [s(torch.cat([batch_logits[:n_other], logits[row:row + 1]]), ps, generators=gens)[0][-1]
                for _ in range(20)]

    a = draw(logits, 1, 0)
    b = draw(torch.randn(5, 100), 1, 5)
    assert a == b and len(set(a)) > 1


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = probs.clamp_min(1e-30).log().expand(4000, 4)
    toks, _ = Sampler(seed=0)(logits, [SamplingParams()] * 4000)
    freq = torch.bincount(torch.tensor(toks), minlength=4).float() / 4000
    assert (freq - probs).abs().max() < 0.04 and freq[3] == 0
    toks, _ = Sampler(seed=0)(logits, [SamplingParams(top_k=1)] * 4000)
    assert set(toks) == {0}


def test_logprobs_are_raw_log_softmax_with_top_n():
    torch.manual_seed(0)
    logits = torch.randn(3, 30)
    ps = [SamplingParams(temperature=0, logprobs=3), SamplingParams(), SamplingParams(temperature=0, logprobs=0)]
    toks, lps = Sampler(seed=0)(logits, ps)
    ref = logits.log_softmax(-1)
    assert lps[1] is None
    assert len(lps[0]) == 3 and toks[0] in lps[0]   # greedy: the chosen token is also the top-1
    for t, v in lps[0].items():
        assert math.isclose(v, ref[0, t].item(), rel_tol=1e-5)
    assert set(lps[0]) == set(ref[0].topk(3).indices.tolist())
    assert list(lps[2]) == [toks[2]]


@pytest.mark.parametrize("kw,param", [
    (dict(logit_bias={"5": 101}), "logit_bias"), (dict(logit_bias={"5": float("nan")}), "logit_bias"),
    (dict(logit_bias={"x": 1}), "logit_bias"), (dict(logit_bias={" 5": 1}), "logit_bias"),
    (dict(logit_bias={"5": True}), "logit_bias"), (dict(logit_bias=[5]), "logit_bias"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(min_tokens=1.5), "min_tokens")])
def test_params_check_logit_bias_and_min_tokens(kw, param):
    with pytest.raises(ValueError, match=param) as e:
        SamplingParams(**kw)
    assert e.value.param == param


def test_logit_bias_keys_become_ids():
    assert SamplingParams(logit_bias={"7": -100, 3: 2.5}).logit_bias == {7: -100.0, 3: 2.5}
    assert SamplingParams(logit_bias={}).logit_bias is None


def test_logit_bias_bans_and_forces_only_its_rows():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    top = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0, logit_bias={str(top[0]): -100}),
              SamplingParams(temperature=0, logit_bias={"11": 100}), SamplingParams(temperature=0)]
    toks, _ = Sampler()(logits.clone(), params)
    assert toks[0] != top[0] and toks[0] == logits[0].topk(2).indices[1].item()
    assert toks[1] == 11 and toks[2] == top[2]
    # sampled rows too: a -100 bias leaves a token practically never drawn
    hot = [SamplingParams(temperature=1.0, seed=i, logit_bias={str(top[0]): -100}) for i in range(64)]
    toks, _ = Sampler()(logits[:1].expand(64, -1).clone(), hot, generators=[Sampler.request_generator(i, "cpu")
                                                                            for i in range(64)])
    assert top[0] not in toks


def test_min_tokens_ban_beats_a_forcing_bias():
    logits = torch.zeros(2, 20)
    params = [SamplingParams(temperature=0, logit_bias={"3": 100}, min_tokens=2)] * 2
    # row 0 is under its min_tokens (its stop ids banned), row 1 is past it
    toks, _ = Sampler()(logits, params, banned=[[3, 4], []])
    assert toks[0] not in (3, 4) and toks[1] == 3
