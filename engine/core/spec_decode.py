"""Speculative decoding's host side (no torch here): the configuration (vLLM's speculative_config
shape), the n-gram proposer (prompt lookup) and the counters.

Each step a decoding sequence may carry draft tokens (Sequence.spec_token_ids). The scheduler
computes them with its last token in one target forward (the chunked-prefill path), the sampler
accepts a prefix of them and draws one more token (worker/sampler.py: Sampler.verify), and
postprocess keeps the KV of the accepted tokens only. Drafts are deterministic proposals, so
rejection sampling with a one-hot proposal keeps the target's distribution exactly: a draft d is
accepted with probability p(d), else a token is drawn from p with d removed; greedy requests accept
while the draft is the argmax, so their output is plain decoding's token for token.
"""
from __future__ import annotations

from dataclasses import dataclass

METHODS = ("ngram", "draft_model")


@dataclass
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4          # ngram: the longest suffix matched against the earlier tokens
    prompt_lookup_min: int = 2          # ngram: the shortest (1: any recurring token drafts)
    model: str | None = None            # draft_model: a model directory with the target's tokenizer
    disable_by_batch_size: int | None = None  # no drafts while this many sequences or more run

    @classmethod
    def of(cls, spec) -> "SpeculativeConfig | None":
        """From a SpeculativeConfig, a dict as vLLM takes it (a "model" without a "method" is a draft
        model), or None."""
        if spec is None or isinstance(spec, cls):
            return spec
        if not isinstance(spec, dict):
            raise TypeError(f"speculative_config must be a dict, got {type(spec).__name__}")
        spec = dict(spec)
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model",
                 "disable_by_batch_size"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        spec.setdefault("method", "draft_model" if spec.get("model") else "ngram")
        if spec["method"] == "draft":
            spec["method"] = "draft_model"
        return cls(**spec)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative_config: method must be one of {METHODS}, got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"speculative_config: {name} must be an integer >= 1, got {v!r}")
        if self.num_speculative_tokens > 32:
            raise ValueError(f"speculative_config: num_speculative_tokens must be <= 32, got "
                             f"{self.num_speculative_tokens}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config: prompt_lookup_min ({self.prompt_lookup_min}) is more than "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError("speculative_config: a draft model needs \"model\" (its directory), and \"model\" "
                             "goes with the draft_model method")


def ngram_propose(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Prompt lookup: the k tokens that followed an earlier occurrence of the longest suffix of tokens
    (n_max down to n_min tokens long) -> up to k drafts, [] where no suffix recurs. Among the
    occurrences of that suffix, the latest with k tokens after it (a run repeating itself overlaps its
    suffix), else the earliest. Runs every step for every decoding sequence: it walks only the
    earlier occurrences of the last token (list.index, in C), and most steps have few or none."""
    L = len(tokens)
    if L < n_min + 1 or k < 1:
        return []
    last, best, latest_full, earliest = tokens[-1], 0, -1, -1
    i = -1
    while True:
        try:
            i = tokens.index(last, i + 1, L - 1)
        except ValueError:
            break
        n = 1  # the suffix length that ends at i too
        while n < n_max and n <= i and tokens[i - n] == tokens[L - 1 - n]:
            n += 1
        if n > best:
            best, latest_full, earliest = n, -1, i
        if n == best and i + 1 + k <= L:
            latest_full = i
    if best < n_min:
        return []
    start = (latest_full if latest_full >= 0 else earliest) + 1
    return tokens[start:start + k]


@dataclass
class SpecStats:
    num_drafts: int = 0        # verification steps that carried drafts
    num_draft_tokens: int = 0  # tokens proposed (and verified)
    num_accepted_tokens: int = 0

    def add(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted

    def as_dict(self) -> dict:
        rate = self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0
        # tokens a verification step emits on average: the accepted drafts and the target's own
        mean = 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
        return dict(spec_num_drafts=self.num_drafts, spec_num_draft_tokens=self.num_draft_tokens,
                    spec_num_accepted_tokens=self.num_accepted_tokens, spec_acceptance_rate=rate,
                    spec_mean_accepted_length=mean)
