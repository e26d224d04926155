"""Training: config, the trainer loop, checkpoints, distributed set-up, metrics, data and losses."""
