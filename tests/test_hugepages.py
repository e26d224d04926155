from pathlib import Path

import pytest
import torch
import torch.nn as nn

from gpt_engine.worker import hugepages
from gpt_engine.models.presets import resolve_config
from gpt_engine.models.gpt import GPT


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def _mapping_fields(addr: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding addr."""
    fields, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
            lo, hi = (int(v, 16) for v in head.split("-"))
            if inside:
                break
            inside = lo <= addr < hi
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@pytest.mark.parametrize("shape,dtype", [((3, 5), torch.float32), ((2, 1 << 20), torch.float32),
                                         (((1 << 21) + 3,), torch.float16)])
def test_zeros(shape, dtype):
    t = hugepages.zeros(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    assert not t.any()
    t.fill_(1)  # writable, all of it
    assert bool((t == 1).all())


@pytest.mark.skipif(_thp_mode() in (None, "never") or not hasattr(__import__("mmap"), "MADV_HUGEPAGE"),
                    reason="transparent huge pages are off here")
def test_zeros_is_huge_page_eligible():
    t = hugepages.zeros((8 << 20,), torch.uint8)
    assert t.data_ptr() % hugepages.HUGE == 0
    fields = _mapping_fields(t.data_ptr())
    if "THPeligible" not in fields:
        pytest.skip("this kernel's smaps has no THPeligible field")
    assert fields["THPeligible"] == "1"


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="no madvise here: plain torch.zeros")
def test_zeros_is_backed_before_first_write():
    # left to fault in, the KV cache's fresh blocks slowed the first steps that wrote them ~10x
    t = hugepages.zeros((16 << 20,), torch.uint8)
    rss_kb = int(_mapping_fields(t.data_ptr())["Rss"].split()[0])
    assert rss_kb * 1024 >= t.numel()


def test_adopt_keeps_values_parameters_and_ties():
    torch.manual_seed(0)
    model = GPT(resolve_config("gpt2-tiny")).eval()
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        ref = model(ids)
    hugepages.adopt([*model.parameters(), *model.buffers()])
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.head_weight.data_ptr() == model.tok_emb.weight.data_ptr()  # tied stays tied
    ptrs = sorted(p.data_ptr() for p in model.parameters())
    assert ptrs[-1] - ptrs[0] < sum(p.numel() * p.element_size() + 64 for p in model.parameters())  # one arena
    with torch.no_grad():
        assert torch.equal(model(ids), ref)


def test_adopt_leaves_small_tensors_alone():
    lin = nn.Linear(4, 4)
    ptr = lin.weight.data_ptr()
    hugepages.adopt(lin.parameters())
    assert lin.weight.data_ptr() == ptr
