"""What runs a scheduled batch on a device: the model runner (inputs, KV cache, CUDA graphs)
and the batched sampler. It sees only what the scheduler hands it."""
