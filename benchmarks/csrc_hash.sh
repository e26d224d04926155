#!/usr/bin/env bash
# One hash over csrc/ and setup.py: what a built gpt_engine.kernels._C was compiled from.
cd "$(dirname "$0")/.." && cat setup.py csrc/* | sha256sum | cut -d' ' -f1
