"""Rank 0's engine: continuous batching over a paged KV cache, sampling, streaming."""
