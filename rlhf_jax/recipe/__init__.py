"""The whole recipe: pipeline stages, sweeps, comparisons generation."""
