"""Models: the architecture config (to and from HF config.json), the GPT module and its layers,
weight formats, and the checkpoint loader/writer."""
