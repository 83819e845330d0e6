"""TiDARModel: Megatron-core's GPTModel with the TiDAR layout.

Only two things change relative to GPTModel, and only those are overridden:
  * RoPE is applied at the layout's position ids (GPTModel's RoPE would use 0..S-1 and ignore them), so a
    mask token carries the position of the token it drafts (compat/megatron_rope.py's RopeAtPositions); the
    RoPE itself (theta, linear / llama3 / yarn scaling: `rope_arguments`) is megatron-core's;
  * attention follows the layout's rule, through the backend chosen in the layer spec (attention.py).
    The forward is handed the `TiDARLayout` explicitly and passes it down as Megatron's `attention_mask`:
    the dense mask (local), a post-scale bias (te) or the layout's tensor encoding (flex, kernel).
Embeddings, layers, TP/PP/SP, the vocab-parallel output layer and cross-entropy are Megatron's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from tidar_megatron.compat.megatron_rope import RopeAtPositions, set_yarn
from tidar_megatron.config import Config, ModelConfig
from tidar_megatron.model import attention


def rope_arguments(m: ModelConfig) -> dict:
    """GPTModel's RoPE arguments for model.rope_base and model.rope_scaling (hf.rope's normalised form):
    linear scaling is megatron-core's position interpolation, llama3 its `rope_scaling` (whose fixed low /
    high frequency factors and original context hf.rope checks), yarn its YarnRotaryEmbedding."""
    scaling = m.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    args = dict(position_embedding_type="yarn" if kind == "yarn" else "rope", rotary_base=m.rope_base)
    if kind == "linear":
        args["seq_len_interpolation_factor"] = scaling["factor"]
    if kind == "llama3":
        args.update(rope_scaling=True, rope_scaling_factor=scaling["factor"])
    return args


def transformer_config(cfg: Config, on_gpu: bool) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    config = TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        # Interleaved 1F1B with unbatched p2p, as Megatron-LM runs it.  With PP=2 a rank's previous and
        # next stage are the same peer; batched isend/irecv then paired activations with gradients (same
        # shapes, so silently: seen over gloo), while the unbatched path orders sends by rank parity.
        overlap_p2p_comm=bool(p.virtual_pipeline),
        batch_p2p_comm=not p.virtual_pipeline,
        sequence_parallel=p.sequence_parallel,
        bf16=cfg.train.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # Initialise full weights on the CPU, then shard: the same seed gives the same model at any TP.
        use_cpu_initialization=True,
        # Fusions that need apex/TE or CUDA kernels stay off unless those are present.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
        # Activation recompute is Megatron-core's; the layout reaches attention as a tensor argument, which
        # its checkpointing saves and replays (attention.py), so a recomputed forward applies the same mask.
        recompute_granularity=m.recompute_granularity,
        recompute_method=(m.recompute_method or "uniform") if m.recompute_granularity == "full" else None,
        recompute_num_layers=(m.recompute_num_layers or 1) if m.recompute_granularity == "full" else None,
    )
    if m.rope_scaling and m.rope_scaling["rope_type"] == "yarn":
        set_yarn(config, m.rope_scaling)
    return config


class TiDARModel(RopeAtPositions, GPTModel):
    """GPTModel with RoPE at the layout's positions (RopeAtPositions, compat/: it overrides a private
    method) and attention that follows the layout."""

    def __init__(self, cfg: Config, pre_process: bool = True, post_process: bool = True, vp_stage=None,
                 on_gpu: bool | None = None):
        on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
        backend = cfg.model.attention_backend_on(on_gpu)
        attention.check_backend_available(backend, on_gpu)
        super().__init__(
            config=transformer_config(cfg, on_gpu),
            transformer_layer_spec=attention.layer_spec(backend, cfg.model.qk_layernorm, cfg.model.normalization),
            vocab_size=cfg.padded_vocab_size,
            max_sequence_length=cfg.layout.seq_len,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            vp_stage=vp_stage,
            **rope_arguments(cfg.model),
        )
        self.backend = backend
        self.fused_loss = cfg.model.fused_loss
        self.default_layout = cfg.layout
        self._te_backend_checked = False

    # --- attention mask for the chosen backend -------------------------------------------------
    def forward(self, input_ids, position_ids, attention_mask=None, labels=None, layout=None, score=False,
                **kwargs):
        """input_ids [b, S] (clean tokens then mask blocks), position_ids [S] or [b, S] from the layout,
        labels [b, S] (optional) -> per-token cross-entropy [b, S]; without labels -> logits [b, S, V/tp].
        `layout`: the TiDARLayout of the sequence (default: the config's training layout).  `score` (with
        labels): [b, S, 2], the cross-entropy and each row's argmax id (vocab-parallel), for validation."""
        layout = layout or self.default_layout
        if input_ids is not None and layout.batch_size not in (None, input_ids.shape[0]):
            raise ValueError(f"the layout describes {layout.batch_size} samples but the batch has {input_ids.shape[0]}")
        if input_ids is not None and layout.seq_len != input_ids.shape[-1]:
            raise ValueError(f"the layout covers {layout.seq_len} tokens but the batch has {input_ids.shape[-1]}")
        if attention_mask is None:
            attention_mask = attention.layout_as_mask(self.backend, layout, position_ids.device)
        if self.backend == "te":
            kwargs.setdefault("extra_block_kwargs", {})["attention_bias"] = attention.te_attention_bias(
                layout, self.config.params_dtype, position_ids.device)
        if labels is not None and score:
            kwargs["output_processor"] = self._scored_per_token
        elif labels is not None and self.fused_loss:
            kwargs["output_processor"] = self._fused_per_token_loss
        output = super().forward(input_ids, position_ids, attention_mask, labels=labels, **kwargs)
        if self.backend == "te" and not self._te_backend_checked:
            attention.assert_te_fused_backend()
            self._te_backend_checked = True
        return output

    def _scored_per_token(self, hidden_states, output_layer, output_weight, labels, compute_language_model_loss,
                          **_):
        """GPTModel's output hook for validation: [b, S, 2] of (cross-entropy, argmax id) per row."""
        logits, _ = output_layer(hidden_states, weight=output_weight)  # [s, b, V/tp]
        losses = compute_language_model_loss(labels, logits)           # [b, s]
        argmax = vocab_parallel_argmax(logits, self.tp_group).transpose(0, 1)
        return torch.stack([losses.float(), argmax.float()], dim=-1)   # ids < 2^24 are exact in fp32


    def _fused_per_token_loss(self, hidden_states, output_weight, labels, config, **_):
        """GPTModel's output hook: per-token cross-entropy [b, S] without materialising the [b, S, V]
        logits (tidar_kernels.fused_loss), vocab-parallel under TP like Megatron's output layer."""
        from tidar_kernels.fused_loss import linear_cross_entropy

        weight = self.output_layer.weight if output_weight is None else output_weight
        group = self.tp_group
        if config.sequence_parallel:  # [s/tp, b, h] -> [s, b, h]; backward reduce-scatters
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden_states, group=group)
        else:  # identity forward; backward all-reduces the partial input gradients of the vocab shards
            hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden_states, group=group)
        s, b, h = hidden.shape
        tp = group.size() if group is not None else 1
        losses = linear_cross_entropy(hidden.transpose(0, 1).reshape(b * s, h), weight, labels.reshape(-1),
                                      tp_group=group if tp > 1 else None,
                                      vocab_start=weight.shape[0] * (group.rank() if tp > 1 else 0))
        return losses.view(b, s)


def vocab_parallel_argmax(logits: torch.Tensor, group) -> torch.Tensor:
    """[..., V/tp] logits of this rank's vocabulary shard -> [...] global argmax ids (lowest id on ties)."""
    local_max, local_id = logits.float().max(-1)
    tp = group.size() if group is not None else 1
    if tp == 1:
        return local_id
    local_id = local_id + logits.shape[-1] * group.rank()
    best = local_max.clone()
    torch.distributed.all_reduce(best, op=torch.distributed.ReduceOp.MAX, group=group)
    candidate = torch.where(local_max == best, local_id, torch.full_like(local_id, torch.iinfo(local_id.dtype).max))
    torch.distributed.all_reduce(candidate, op=torch.distributed.ReduceOp.MIN, group=group)
    return candidate


def build_model(cfg: Config, on_gpu: bool | None = None) -> list[TiDARModel]:
    """The model chunks of this rank (one, or `virtual_pipeline` chunks for interleaved 1F1B), in bf16 with
    `train.bf16` (the optimizer keeps fp32 main weights)."""
    vp = cfg.parallel.virtual_pipeline
    chunks = []
    for stage in range(vp or 1):
        vp_stage = stage if vp else None
        chunks.append(TiDARModel(
            cfg,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
            on_gpu=on_gpu,
        ))
    if cfg.train.bf16:  # every parameter, as Megatron-LM's Float16Module casts it: the local spec's norms ignore
        chunks = [c.bfloat16() for c in chunks]  # params_dtype, and mixed-dtype buffers break the optimizer's save
    return chunks
