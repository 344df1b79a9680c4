"""The host loop every trainer shares, the train state, and the supervised steps."""
