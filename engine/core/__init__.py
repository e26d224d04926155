"""The engine core, no torch: request intake and checks, sequences, the scheduler, the block
manager (paged KV bookkeeping, prefix cache), the incremental detokenizer and the stop check."""
