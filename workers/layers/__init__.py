"""Parallel building blocks. Each layer allocates only its rank's shard and cuts that shard
out of a checkpoint tensor itself (its parameters carry a `weight_loader`)."""
