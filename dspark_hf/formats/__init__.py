"""Checkpoint layouts: native, DeepSpec's and speculators'; conversion between them and the engine commands
that serve them."""
