"""Measuring TiDAR's promise with the stack itself: AR-level quality at many tokens per pass.

    likelihood.py   AR-mode perplexity, diffusion loss and draft accuracy on tokenized documents
    generation.py   TiDAR vs AR decoding on prompts: tokens per pass, speed, greedy identity, exact match, pass@1
    repetition.py   how much generated text repeats a loop: tokens per pass from degenerate text is no speed-up
    sandbox.py      the code-test runner behind pass@1
    evaluate.py     `tidar-megatron evaluate`
    lm_eval_model.py  the `tidar` model type for lm-evaluation-harness (`tidar-megatron lm-eval`)

Validation during training (tidar_megatron/training/validation.py) reports the draft quality of the same
forward pass and an estimate of tokens per pass.
"""
