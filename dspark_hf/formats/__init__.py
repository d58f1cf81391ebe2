"""Checkpoint layouts: one module per layout (`native`, `deepspec`, `speculators`), each a `CheckpointFormat`
(`base`) listed in `registry.FORMATS`; the tensors the layouts store (`weights`); conversion between them
(`convert`)."""
