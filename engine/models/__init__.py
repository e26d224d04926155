"""Models: the architecture config (config.py, to and from HF config.json; rope.py, presets.py,
generation_config.py, hf_json.py), the GPT module (gpt.py) and its layers (layers.py), the GEMM
weight formats (formats.py), and checkpoints (loader.py reads, weight_files.py streams tensors from
files, save.py writes)."""
