"""Prints a fresh constraints.txt: the newest releases that resolve for .[test,bench], pinned.

torch, triton, nvidia-* and cuda-* stay out (a reused system torch pins its own). Run through
`make constraints`, then `make clean test` before committing the result.
"""
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SKIP = re.compile(r"^(torch|triton|nvidia-|cuda-|gpt-engine)")
HEADER = """# The tested versions `make` installs with (pip -c): a fresh machine gets what CI tested, not
# whatever was published since. Refresh on purpose with `make constraints`; run against the newest
# releases with `make clean test CONSTRAINTS=`. torch, triton, nvidia-* and cuda-* stay out: a
# reused system torch pins its own (the Makefile pins triton for a CPU-only torch)."""

with tempfile.TemporaryDirectory() as d:
    report = Path(d) / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                    "--no-build-isolation", "--report", str(report), ".[test,bench]"], check=True)
    pins = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
            for i in json.loads(report.read_text())["install"]}
print(HEADER)
print("\n".join(f"{n}=={v}" for n, v in sorted(pins.items()) if not SKIP.match(n)))
