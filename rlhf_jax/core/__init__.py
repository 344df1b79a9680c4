"""The run's plumbing: checkpoints, sharding, optimisers, metrics, languages, launch."""
