"""Trainers: host loops over pure, jitted steps. `lm` covers pretraining and SFT."""
