"""Optional NVIDIA DALI loader (`data.loader: dali`): the same TiDAR batches as `TiDARBatches`.

Samples come from the same megatron-core dataset in the same order (`ResumableBatchSampler`); DALI moves
them through its pipeline (prefetching, and onto the GPU when CUDA is there: a CPU pipeline otherwise),
and the doubled sequence is then built by `batch.from_gpt_batch` exactly as in the default loader.
"""

from __future__ import annotations

import numpy as np
import torch

from tidar_megatron.batch import from_gpt_batch
from tidar_megatron.data.dataset import ResumableBatchSampler
from tidar_megatron.layout import TiDARLayout

_KEYS = ("tokens", "labels", "loss_mask")


def require_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise ImportError("data.loader is 'dali' but NVIDIA DALI is not installed: pip install "
                          "'tidar_megatron[dali]' (nvidia-dali-cuda120), or set data.loader: megatron") from None


class DaliTiDARBatches:
    """Iterator of TiDAR micro-batches through a DALI pipeline; `state_dict` / `load_state_dict` as in
    `TiDARBatches` (the count advances only when a batch is handed out, whatever DALI prefetched)."""

    def __init__(self, dataset, micro_batch_size: int, block_size: int, mask_token_id: int,
                 consumed_samples: int = 0, dp_rank: int = 0, dp_size: int = 1, device: str | None = None,
                 prefetch: int = 2):
        require_dali()
        self.dataset, self.mb, self.block_size, self.mask_token_id = dataset, micro_batch_size, block_size, mask_token_id
        self.dp_rank, self.dp_size, self.prefetch = dp_rank, dp_size, prefetch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.consumed_samples = consumed_samples
        self._pipe = None
        self._layout: TiDARLayout | None = None

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
        self._pipe = None

    def _batches(self):
        sampler = ResumableBatchSampler(len(self.dataset), self.mb, self.consumed_samples, self.dp_rank, self.dp_size)
        for indices in sampler:
            samples = [self.dataset[i] for i in indices]
            yield tuple([s[k].numpy() for s in samples] for k in _KEYS)

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types
        on_gpu = self.device == "cuda"

        @pipeline_def(batch_size=self.mb, num_threads=1, device_id=torch.cuda.current_device() if on_gpu else None,
                      prefetch_queue_depth=self.prefetch, exec_dynamic=True)
        def pipe():
            outs = fn.external_source(source=self._batches, num_outputs=3, batch=True, cycle="raise",
                                      dtype=[types.INT64, types.INT64, types.FLOAT])
            return tuple(o.gpu() for o in outs) if on_gpu else tuple(outs)

        self._pipe = pipe()
        self._pipe.build()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._pipe is None:
            self._build()
        try:
            outs = self._pipe.run()
        except StopIteration:
            raise StopIteration from None
        batch = {k: _to_torch(o, self.device) for k, o in zip(_KEYS, outs)}
        self.consumed_samples += self.mb * self.dp_size
        if self._layout is None:
            self._layout = TiDARLayout.for_training(batch["tokens"].shape[1], self.block_size)
        return from_gpt_batch(self._layout, batch, self.mask_token_id)


def _to_torch(tensor_list, device: str) -> torch.Tensor:
    if device == "cuda":  # copy on the GPU, straight into a torch tensor
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device="cuda")
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(tensor_list.as_array()))  # a copy: DALI reuses its buffers
