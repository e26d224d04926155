"""The installed package as a user meets it: from a directory outside the repository, with
transformers (and Hugging Face's own `kernels` package, a dependency of transformers 5) imported in
the same process, and through the `gpt-engine` script."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args, cwd, timeout=300):
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_import_root_from_outside_the_repository(tmp_path):
    script = textwrap.dedent("""
        import importlib.util, pathlib, sys
        import torch, transformers
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
        import gpt_engine
        from gpt_engine import LLM, SamplingParams, load_model
        from gpt_engine.kernels import flash_attention, rms_norm, reference
        import gpt_engine.kernels._C
        q = torch.randn(1, 17, 2, 32)
        torch.testing.assert_close(flash_attention(q, q, q), reference.flash_attention(q, q, q), atol=1e-5, rtol=1e-5)
        x, w = torch.randn(3, 16), torch.rand(16)
        torch.testing.assert_close(rms_norm(x, w), reference.rms_norm(x, w), atol=1e-5, rtol=1e-5)
        # no top-level module of ours under the names users' files and other packages take
        for name in ("engine", "kernels"):
            spec = importlib.util.find_spec(name)
            assert spec is None or pathlib.Path(spec.origin).parent != pathlib.Path(sys.argv[1]) / name, spec
        print(gpt_engine.__version__)
    """)
    (tmp_path / "check.py").write_text(script)
    out = _run([sys.executable, "check.py", str(REPO)], tmp_path)
    assert out.strip() and out.strip()[0].isdigit()


def test_cli_generate_and_version_from_outside_the_repository(tmp_path):
    from gpt_engine import __version__
    from gpt_engine.tokenizer import Tokenizer

    from .helpers import make_hf_model
    model = tmp_path / "model"
    model.mkdir()
    tok = Tokenizer.train(["def f(x):\n    return x + 1\n" * 50], vocab_size=300, show_progress=False)
    tok.save(model)
    make_hf_model("gpt2", model, vocab_size=tok.vocab_size)
    exe = Path(sys.executable).with_name("gpt-engine")
    if not exe.exists():
        pytest.skip("no gpt-engine script beside this python (package not installed)")
    assert _run([str(exe), "--version"], tmp_path).split() == ["gpt-engine", __version__]
    out = _run([str(exe), "generate", str(model), "--prompt", "def ", "--max-tokens", "8", "--temperature", "0"],
               tmp_path)
    assert "def " in out
    out = _run([sys.executable, "-m", "gpt_engine", "--version"], tmp_path)
    assert __version__ in out


def test_every_package_ships():
    """pyproject.toml lists the packages a wheel carries: every folder of engine/ and kernels/ that is a
    package must be there, or a (non-editable) install lacks it."""
    import tomllib
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in cfg["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            if not any(p == "__pycache__" or p.startswith(".") for p in parts):
                found.add(".".join((name, *parts)))
    missing = found - set(cfg["packages"])
    assert not missing, f"packages missing from pyproject.toml: {sorted(missing)}"
