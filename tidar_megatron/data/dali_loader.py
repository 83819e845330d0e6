"""Optional NVIDIA DALI loader (`data.loader: dali`): the same TiDAR batches as `TiDARBatches`.

Samples come from the same megatron-core dataset in the same order (`ResumableBatchSampler`); DALI moves
them through its pipeline (prefetching, and onto the GPU when CUDA is there: a CPU pipeline otherwise),
and the doubled sequence is then built by the shared `ResumableTiDARBatches`, exactly as in the default loader.
"""

from __future__ import annotations

import numpy as np
import torch

from tidar_megatron.data.dataset import ResumableTiDARBatches

_KEYS = ("tokens", "labels", "loss_mask")


def require_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise ImportError("data.loader is 'dali' but NVIDIA DALI is not installed: pip install "
                          "'tidar_megatron[dali]' (nvidia-dali-cuda120), or set data.loader: megatron") from None


class DaliTiDARBatches(ResumableTiDARBatches):
    """TiDAR micro-batches through a DALI pipeline (CPU or GPU); position and state as in every
    `ResumableTiDARBatches`."""

    def __init__(self, *args, device: str | None = None, prefetch: int = 2, **kwargs):
        require_dali()
        super().__init__(*args, **kwargs)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.prefetch = prefetch

    def _samples(self):
        for indices in self.sampler():
            samples = [self.dataset[i] for i in indices]
            yield tuple([s[k].numpy() for s in samples] for k in _KEYS)

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types
        on_gpu = self.device == "cuda"

        @pipeline_def(batch_size=self.mb, num_threads=1, device_id=torch.cuda.current_device() if on_gpu else None,
                      prefetch_queue_depth=self.prefetch, exec_dynamic=True)
        def pipe():
            outs = fn.external_source(source=self._samples, num_outputs=3, batch=True, cycle="raise",
                                      dtype=[types.INT64, types.INT64, types.FLOAT])
            return tuple(o.gpu() for o in outs) if on_gpu else tuple(outs)

        built = pipe()
        built.build()
        return built

    def _clean_batches(self):
        pipe = self._build()
        while True:
            try:
                outs = pipe.run()
            except StopIteration:  # the sampler is exhausted; DALI's own traceback adds nothing
                return
            yield {k: _to_torch(o, self.device) for k, o in zip(_KEYS, outs)}


def _to_torch(tensor_list, device: str) -> torch.Tensor:
    if device == "cuda":  # copy on the GPU, straight into a torch tensor
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device="cuda")
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(tensor_list.as_array()))  # a copy: DALI reuses its buffers
