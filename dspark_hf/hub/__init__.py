"""The Hugging Face Hub: model cards and the drafter's `push_to_hub` (`model_card`), publishing a saved folder
(`push`)."""
