"""Training: pretraining and fine-tuning of the GPT, one process or a torchrun job.

    config.py       TrainConfig (every setting, and the `gpt-engine train` flags), its resolved
                    defaults, the learning-rate schedule
    trainer.py      train(): set-up, data, build, then train_step / evaluate / sample in a loop
    model.py        the model config, the GPT under its loss (LMLoss), the optimizer
    distributed.py  the process's place in a torchrun job; cast, DDP, FSDP2 and compile wrapping
    checkpoint.py   RNG states, save / load / restore, the resume checks, the final HF directory
    metrics.py      loss, tokens/s and MFU to the progress bar and OUT/log.jsonl; the loss plot
    data.py         text and jsonl -> cached token shards, windows and example batches
    losses.py       the chunked linear + cross-entropy op (the full logits never exist)
    lora.py         LoRA adapters on a frozen base (--lora-rank): targets, LoRALinear, PEFT adapter files, merge
"""
