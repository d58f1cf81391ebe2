"""The reference run on a CPU: the SmolLM2-135M-Instruct target (`target`), its on-policy prompt pool
(`onpolicy`), `dspark quickstart` (`quickstart`) and the interleaved measurement helpers (`benchmarking`)."""
