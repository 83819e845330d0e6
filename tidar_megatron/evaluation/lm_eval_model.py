"""A `tidar` model type for lm-evaluation-harness: likelihoods from the causal pass, generation by TiDAR.

    tidar-megatron lm-eval --model tidar --model_args pretrained=<exported dir>,mode=tidar,block_size=16 \\
        --tasks <tasks> [--include_path <local task YAMLs>] --output_path results/ --log_samples
    # or from Python:
    import tidar_megatron.evaluation.lm_eval_model  # registers "tidar"
    lm_eval.simple_evaluate(model="tidar", model_args="pretrained=<dir>", tasks=[...])

Model args: pretrained, mode (tidar | ar), block_size, beta, dtype (float32 | bfloat16 | float16), device,
batch_size, max_length (default: config.json's max_position_embeddings, as lm-eval's `hf` model),
max_gen_toks, add_bos_token.  A device the machine lacks falls back as in lm-eval's `hf` model (so the
command line's default "cuda:0" runs on a CPU-only machine); `device` and `batch_size` in the model args win
over lm-eval's --device and --batch_size.  `loglikelihood` and `loglikelihood_rolling` score with the pure causal mask
in one pass (the paper's likelihood setting), tokenized exactly as lm-eval's `hf` model tokenizes (the same
`transformers` tokenizer and lm-eval's own pair / rolling-window encoding), so the two give the same
numbers on an exported checkpoint.  `generate_until` decodes greedily (or samples, with do_sample) in
batches of equal generation settings with the stack's decoder, stops at the task's `until` strings and EOS,
and counts forward passes: tokens per pass, the acceptance histogram and the repetition of the generated text
(repetition.py) are recorded in the results under config.tidar_decoding.  Every answer goes to lm-eval's
cache hook as it is made (--use_cache).

Code tasks: lm-eval's built-in HumanEval / MBPP metrics download `code_eval` from a hub; point a task's
`process_results` at `code_pass_at_1` (from a utils.py beside the task YAML) to score completions with the
project's sandboxed runner instead.
"""

from __future__ import annotations

import logging
import sys

import torch
import torch.nn.functional as F
from lm_eval.__main__ import cli_evaluate  # the `lm-eval` console script
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string

from tidar_megatron.compat.lm_eval_harness import special_tokens_kwargs
from tidar_megatron.console import entry_point
from tidar_megatron.evaluation import repetition
from tidar_megatron.evaluation.sandbox import run_tests
from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.inference.generate import DTYPES, check_exported
from tidar_megatron.inference.sampling import SamplingConfig
from tidar_megatron.inference.step import check_context, fit_context

log = logging.getLogger(__name__)


def resolve_device(requested: str | None) -> str:
    """lm-eval's `hf` rule: a device this machine has is used; any other (lm-eval's command line hands
    "cuda:0" when --device is not given) falls back to CUDA where there is some, else to the CPU."""
    fallback = "cuda" if torch.cuda.is_available() else "cpu"
    present = {"cpu"} | ({"cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))}
                         if torch.cuda.is_available() else set())
    if requested in present:
        return requested
    if requested is not None:
        log.info("device %s is not available here: using %s", requested, fallback)
    return fallback


@register_model("tidar")
class TiDARLM(TemplateLM):
    def __init__(self, pretrained: str, mode: str = "tidar", block_size: int | None = None, beta: float = 1.0,
                 dtype: str = "float32", device: str | None = None, batch_size: int | str = 1,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 **_ignored):
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer

        if mode not in ("tidar", "ar"):
            raise ValueError(f"mode must be tidar or ar, got {mode!r}")
        check_exported(pretrained, f"pretrained={pretrained}")
        device = resolve_device(device)
        self.decoder = Decoder.from_pretrained(pretrained, DTYPES[dtype], device,
                                               block_size=int(block_size) if block_size else None, beta=float(beta))
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained, local_files_only=True)
        self.mode, self._device = mode, device
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self._max_length = int(max_length) if max_length else resolve_max_length(
            AutoConfig.from_pretrained(pretrained, local_files_only=True), self.tokenizer)
        self.max_gen_toks, self.add_bos_token = int(max_gen_toks), add_bos_token
        self.pretrained = pretrained
        self._passes = self._tokens = 0
        self._histogram: list[int] = []
        self._generated: list[list[int]] = []   # every completion's tokens, for the repetition figures

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "TiDARLM":
        """lm-eval hands its own --device and --batch_size (default "cuda:0" and 1) beside --model_args; a value
        in --model_args wins (lm-eval's `hf` model stops with "got multiple values for keyword argument")."""
        args = dict(arg_dict)
        for key, value in (additional_config or {}).items():
            if value is None:
                continue
            if key not in args:
                args[key] = value
            elif str(args[key]) != str(value):
                log.info("%s=%s from --model_args wins over lm-eval's --%s %s", key, args[key], key, value)
        return cls(**args)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "TiDARLM":
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # --- tokenization, as lm-eval's `hf` model does it --------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        special = special_tokens_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # --- likelihoods: one causal pass ----------------------------------------------------------------
    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, **kwargs):
        """Each answer also goes to lm-eval's cache hook (--use_cache) as it is made, as in its `hf` model;
        rolling windows (key None) are cached per document by loglikelihood_rolling."""
        results = []
        step = override_bs or self.batch_size_per_gpu
        for i in range(0, len(requests), step):
            batch = requests[i:i + step]
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in batch]
            logprobs = self._causal_logprobs(inputs)
            for (key, _, cont), inp, lp in zip(batch, inputs, logprobs):
                scores = lp[len(inp) - len(cont):len(inp)]         # [len(cont), V]
                target = torch.tensor(cont, device=scores.device)
                answer = (scores.gather(-1, target[:, None]).sum().item(), bool((scores.argmax(-1) == target).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def _causal_logprobs(self, inputs: list[list[int]]) -> torch.Tensor:
        """[b, longest, V] fp32 log-probabilities of right-padded inputs under the causal mask (padding at
        the end cannot change earlier positions)."""
        longest = max(map(len, inputs))
        tokens = torch.tensor([x + [x[-1]] * (longest - len(x)) for x in inputs], device=self.decoder.device)
        positions = torch.arange(longest, device=tokens.device).expand(len(inputs), -1)
        causal = torch.ones(longest, longest, dtype=torch.bool, device=tokens.device).tril()[None]
        return F.log_softmax(self.decoder.model(tokens, positions, causal).float(), dim=-1)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in (r.args for r in requests):
            windows = [(None, *make_disjoint_window(w)) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            out.append(sum(score for score, _ in self._loglikelihood_tokens(windows)))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), out[-1])
        return out

    # --- generation: TiDAR (or AR) decoding ------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of requests with the same generation settings, longest prompt first, as lm-eval's `hf` model
        makes them (lm-eval pools the requests of every task, so one call mixes settings); each answer goes to
        lm-eval's cache hook (--use_cache) as it is made."""
        order = Collator([r.args for r in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                         group_fn=lambda a: a[1], group_by="gen_kwargs")
        out = []
        for batch in order.get_batched(n=self.batch_size_per_gpu):
            contexts = [context for context, _ in batch]
            settings = batch[0][1]  # the same for the whole batch
            for context, text in zip(contexts, self._generate(contexts, settings)):
                self.cache_hook.add_partial("generate_until", (context, settings), text)
                out.append(text)
        return order.get_original(out)

    def _generate(self, contexts: list[str], settings: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(settings, self.max_gen_toks)
        until, max_new = kwargs["until"], kwargs["max_gen_toks"]
        sampling = SamplingConfig(float(kwargs.get("temperature", 0.0)) if kwargs["do_sample"] else 0.0,
                                  float(kwargs.get("top_p") or 1.0))
        # Contexts are left-truncated to max_length - max_gen_toks (as lm-eval's `hf` model does); the context
        # rule (inference/step.py) refuses a max_gen_toks that leaves no room for a prompt.
        check_context(1, max_new, self.max_length, "lm-eval: even ", "max_gen_toks")
        prompts = [self.tok_encode(c, add_special_tokens=bool(self.add_bos_token),
                                   left_truncate_len=self.max_length - max_new) for c in contexts]
        rooms = []  # max_length past the model's positions: clamped, and said
        for prompt in prompts:
            room, note = fit_context(len(prompt), max_new, self.decoder.max_positions, "lm-eval: ", "max_gen_toks")
            rooms.append(room)
            if note:
                log.warning("%s", note)
        generated = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in self.decoder.stream(prompts, rooms, mode=self.mode, sampling=sampling, seed=0):
            for j, new in enumerate(step.new_tokens):
                generated[j] += new
                done[j] = done[j] or (until and any(s in self.tok_decode(generated[j]) for s in until if s))
            if all(done):
                break
        self._record(step.stats, generated)
        return [postprocess_generated_text(self.tok_decode(tokens), until, None) for tokens in generated]

    def _record(self, stats, generated: list[list[int]]):
        self._passes += stats.sequence_passes
        self._tokens += stats.new_tokens
        hist = stats.acceptance_histogram
        self._histogram = [a + b for a, b in zip(self._histogram, hist)] if self._histogram else list(hist)
        self._generated += generated

    def decoding_stats(self) -> dict:
        """Tokens per forward pass (per sequence), the acceptance histogram and the repetition of the generated
        text (evaluation/repetition.py) over every generate_until; `note` says in words when the tokens per
        pass come from degenerate output (None otherwise)."""
        tokens_per_pass = self._tokens / self._passes if self._passes else 0.0
        rep = repetition.measure(self._generated)
        return {"mode": self.mode, "block_size": self.decoder.block_size, "beta": self.decoder.beta,
                "new_tokens": self._tokens, "sequence_passes": self._passes, "tokens_per_pass": tokens_per_pass,
                "acceptance_histogram": self._histogram, "repetition": rep,
                "note": repetition.degenerate_note(rep, tokens_per_pass, f"{self.mode} decoding")}

    def get_model_info(self) -> dict:
        """Added by lm-eval to results["config"] after the evaluation."""
        stats = self.decoding_stats()
        if stats["note"]:
            log.warning("%s", stats["note"])
        return {"model_name": str(self.pretrained), "tidar_decoding": stats}


def code_pass_at_1(doc: dict, results: list[str]) -> dict:
    """An lm-eval `process_results` for code tasks: the completion, then the doc's `test` (or `tests`) code,
    run by the sandboxed runner (evaluation/sandbox.py).  The doc's `prompt` is prepended when it is the
    code the completion continues."""
    tests = doc.get("test") or doc.get("tests") or ""
    program = doc.get("prompt", "") + results[0] + "\n\n" + tests + "\n"
    return {"pass@1": float(run_tests(program).passed)}


@entry_point("tidar-megatron lm-eval")
def main(argv: list[str] | None = None) -> int:
    """`tidar-megatron lm-eval <lm_eval's arguments>`: lm-eval's own command line with `tidar` registered."""
    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
