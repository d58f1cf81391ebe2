"""Training a drafter: `DSparkTrainingArguments` (`arguments`), the DSpark loss (`loss`), `DSparkTrainer`
(`trainer`), the wall-clock budget (`time_budget`), named recipes (`recipes`), chat data (`data`), draft
sub-vocabularies (`draft_vocab`) and the `dspark train` / `dspark calibrate` workflows (`workflow`)."""
