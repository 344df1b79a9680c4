"""Held-out evaluation of policies and reward models, and the pipeline's report."""
