"""lm-evaluation-harness names that lm-eval does not publish, written against lm-eval 0.4.13.

    special_tokens_kwargs   how lm-eval's `hf` model decides `add_special_tokens` for one encode
                            (lm_eval.models.utils._add_special_kwargs): the `tidar` model encodes exactly as
                            `hf` does, so the two give the same log-likelihoods on one checkpoint

Check these when lm-eval is upgraded (tests/test_lm_eval.py compares the two models).
"""

from lm_eval.models.utils import _add_special_kwargs as special_tokens_kwargs

__all__ = ["special_tokens_kwargs"]
