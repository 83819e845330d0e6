"""Likelihood of tokenized documents under an exported model, scored the way the paper scores it.

AR mode (the paper's likelihood evaluation, Table 3): the pure causal mask, one pass.  Every document is
scored on its own, in consecutive non-overlapping windows of at most `seq_length` tokens; every token after
a window's first is predicted from the window's earlier tokens.  The same windows in the training layout
give the diffusion loss (each mask token predicting the token at its position, from the clean tokens
before its block) and the draft accuracy at every offset r = 0..B-1 inside a block.

Documents are a Megatron .bin/.idx prefix (what `tidar-megatron tokenize` writes); its token ids must fit
the model's vocabulary.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from tidar_megatron.data.prefix_check import DataError, check_prefix, indexed_dataset
from tidar_megatron.data.tokenizer import Tokenizer
from tidar_megatron.inference.model import Transformer
from tidar_megatron.layout import TiDARLayout


def read_documents(prefix: str, vocab_size: int, tokenizer: Tokenizer | None = None) -> list[np.ndarray]:
    """The documents of `prefix`.bin/.idx as int64 arrays, checked against the vocabulary, and, given the
    model's `tokenizer`, the pair checked whole and made by it (prefix_check.check_prefix); a prefix
    without a sidecar gets a note on stderr."""
    for ext in (".bin", ".idx"):
        if not os.path.exists(prefix + ext):
            raise DataError(f"--data {prefix}: {prefix}{ext} not found; give the prefix of a .bin/.idx pair "
                            "made by `tidar-megatron tokenize`")
    info = check_prefix(prefix, tokenizer, "the model's tokenizer", what="--data")
    dataset = indexed_dataset(prefix)
    bounds = dataset.document_indices
    documents = []
    for d in range(len(bounds) - 1):
        parts = [np.asarray(dataset[i], dtype=np.int64) for i in range(bounds[d], bounds[d + 1])]
        if parts:
            documents.append(np.concatenate(parts))
    if not documents:
        raise DataError(f"--data {prefix}: holds no documents")
    top = max(int(doc.max()) for doc in documents if len(doc))
    if top >= vocab_size:
        raise DataError(f"--data {prefix}: token id {top} is outside the model's vocabulary ({vocab_size} ids); "
                        "was it tokenized with this model's tokenizer?")
    if info.note:
        print(f"note: {info.note}", file=sys.stderr)
    return documents


def windows(documents: list[np.ndarray], seq_length: int) -> list[np.ndarray]:
    """Consecutive non-overlapping windows of at most seq_length tokens, each inside one document; windows
    of one token predict nothing and are left out."""
    out = []
    for doc in documents:
        for start in range(0, len(doc), seq_length):
            window = doc[start:start + seq_length]
            if len(window) > 1:
                out.append(window)
    return out


@torch.inference_mode()
def score(model: Transformer, documents: list[np.ndarray], seq_length: int, block_size: int | None,
          mask_token_id: int | None, batch_size: int = 8, progress=None) -> dict:
    """AR-mode NLL / perplexity and, with a block size and mask token, the diffusion loss and per-offset
    draft accuracy, over every window of `documents`.  `progress(done, total)` is called per batch."""
    device = model.lm_head.weight.device
    ws = windows(documents, seq_length)
    by_length = defaultdict(list)
    for w in ws:
        by_length[len(w)].append(w)
    ar_nll, ar_count = 0.0, 0
    diff_nll, diff_count = 0.0, 0
    hits = torch.zeros(block_size or 1, dtype=torch.float64)
    counts = torch.zeros(block_size or 1, dtype=torch.float64)
    done, started = 0, time.perf_counter()
    for length, group in sorted(by_length.items()):
        causal = TiDARLayout.causal(length)
        draft = TiDARLayout.for_training(length, block_size) if block_size and mask_token_id is not None else None
        for i in range(0, len(group), batch_size):
            tokens = torch.from_numpy(np.stack(group[i:i + batch_size])).to(device)
            logits = _forward(model, causal, tokens)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
            ar_nll += nll.item()
            ar_count += tokens[:, 1:].numel()
            if draft is not None:
                inputs = draft.training_inputs(tokens, mask_token_id)
                logits = _forward(model, draft, inputs)[:, length:]
                targets = tokens[:, draft.source_index[length:].to(device)]
                diff_nll += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
                diff_count += targets.numel()
                correct = (logits.argmax(-1) == targets).double().sum(0).cpu()
                offsets = draft.draft_offsets[length:]
                hits.index_add_(0, offsets, correct)
                counts.index_add_(0, offsets, torch.full_like(correct, len(tokens)))
            done += len(tokens)
            if progress is not None:
                progress(done, len(ws))
    result = {"tokens_scored": ar_count, "documents": len(documents), "windows": len(ws),
              "ar_nll": ar_nll / max(ar_count, 1), "seconds": time.perf_counter() - started}
    result["ar_perplexity"] = math.exp(result["ar_nll"])
    if diff_count:
        result.update(diff_loss=diff_nll / diff_count, draft_accuracy=(hits / counts.clamp(min=1)).tolist())
    return result


def _forward(model: Transformer, layout: TiDARLayout, tokens: torch.Tensor) -> torch.Tensor:
    device = tokens.device
    positions = layout.position_ids.to(device).expand(len(tokens), -1)
    return model(tokens, positions, layout.dense_mask(device)[None])
