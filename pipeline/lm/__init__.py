"""The 5 Hz LM half of ACE-Step 1.5: prompts and parsing (`prompts`, `planner`), the constrained
decoder (`constrained`) and the backends that run the model (`pt_backend`, `vllm_backend`)."""
