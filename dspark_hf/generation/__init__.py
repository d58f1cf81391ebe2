"""Drafting inside stock assisted generation: the drafter's `generate()` (`drafting`), the hooks on the target
and the per-round statistics (`target_tap`), and batched decoding for response regeneration
(`batched_decoding`)."""
