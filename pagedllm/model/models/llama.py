"""Llama-family decoders: Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm), SmolLM2.

The model sees one flat batch of tokens, their positions, one KV cache tensor
per layer and an AttentionMetadata; it knows nothing of requests. q/k/v and
gate/up projections are fused into single matmuls; `load_weights` takes
Hugging Face parameter names and fills the fused slices.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.model.attention.metadata import AttentionMetadata, per_layer
from pagedllm.model.attention.torch_backend import TorchPagedAttention
from pagedllm.model.arch_config import ArchConfig
from pagedllm.kernels.cpu import ops as cpu_ops
from pagedllm.kernels.cpu.packed_linear import PAIR_ROWS, PackedLinear
from pagedllm.model.layer_kernels import LayerKernels
from pagedllm.model.layers import RMSNorm, RotaryEmbedding, rotary_embedding, silu_and_mul
from pagedllm.model.tensor_parallel import TPShard, row_parallel


class LlamaAttention(nn.Module):
    norm_class = RMSNorm  # of the per-head q/k norms (Gemma's subclass has its own)

    def __init__(self, cfg: ArchConfig, rotary: RotaryEmbedding, attn_backend: type = TorchPagedAttention,
                 sliding_window: int | None = None, scale: float | None = None, soft_cap: float | None = None,
                 qk_norm: bool | None = None, tp: TPShard | None = None) -> None:
        """scale: of the scores (default head_dim ** -0.5); soft_cap: the backend's logits_soft_cap;
        qk_norm: default cfg.qk_norm; tp: this rank's share of the heads (model/tensor_parallel.py), None for all."""
        super().__init__()
        self.tp = tp
        self.num_heads = cfg.num_attention_heads if tp is None else tp.split(cfg.num_attention_heads)[1]
        self.num_kv_heads = cfg.num_key_value_heads if tp is None else tp.kv_heads(cfg.num_key_value_heads)[1]
        self.head_dim = head_dim = cfg.head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        # Row-parallel: the bias is added once, by rank 0, to the partial products that the ranks then sum.
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias and (tp is None or tp.rank == 0))
        self.qk_norm = cfg.qk_norm if qk_norm is None else qk_norm
        if self.qk_norm:
            self.q_norm = self.norm_class(head_dim, cfg.rms_norm_eps)
            self.k_norm = self.norm_class(head_dim, cfg.rms_norm_eps)
        self.rotary = rotary
        scale = head_dim**-0.5 if scale is None else scale
        self.attn = attn_backend(self.num_heads, self.num_kv_heads, head_dim, scale, sliding_window, soft_cap)
        self.attend = self._rope_then_attend  # rotary, then attention (which stores the keys and values)
        self.fused_rope = False  # rotary + KV store in one kernel: set by finish_load where it runs
        self.project_out = row_parallel(self.o_proj.__call__, tp)

    def finish_load(self, kernels: LayerKernels) -> bool:
        """Pick this layer's projections and its rotary + KV store (one fused kernel where it runs) for the loaded
        weights; returns whether qkv_proj takes float32 inputs (a widened projection)."""
        fused_rope = kernels.fused_rope(self.head_dim, self.rotary.rotary_dim, self.qk_norm)
        self.qkv_proj = kernels.linear(self.qkv_proj)
        self.o_proj = kernels.linear(self.o_proj)
        # A widened o_proj after the fused kernel hands its float32 product unrounded to the next norm, which rounds it.
        self.project_out = row_parallel(kernels.call(self.o_proj, float_out=fused_rope), self.tp)
        if fused_rope:
            self.attend = self._fused_rope_store_then_attend
        self.fused_rope = fused_rope
        return kernels.float_activations

    def forward_normed(self, positions, x, norm: tuple, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """forward of RMSNorm(x), the norm (residual or None, weight, eps) computed by the qkv product of the pair
        kernel as it packs x (LlamaDecoderLayer.norms_in_products), and where the rotary + KV store is fused and the
        pool bf16, the rotation and the store too, as it writes its output."""
        product = self.qkv_proj.pair_weight
        if self.fused_rope and kv_cache.dtype == torch.bfloat16 and product.fuses_qkv_rope(self.head_dim):
            qkv = product.qkv_rope(x, positions, self.rotary.cos, self.rotary.sin, self.num_heads, self.num_kv_heads,
                                   self.head_dim, meta.slot_mapping, kv_cache, norm)
            return self.project_out(self._attend_stored(qkv, kv_cache, meta))
        return self.project_out(self.attend(positions, product(x, norm=norm), kv_cache, meta))

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        return self.project_out(self.attend(positions, self.qkv_proj(x), kv_cache, meta))

    def _fused_rope_store_then_attend(self, positions, qkv, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """Rotary + KV store in one CPU kernel (kernels/cpu/ops.py), then attention over the stored pool."""
        cpu_ops.rope_and_store(qkv, positions, self.rotary.cos, self.rotary.sin, self.num_heads, self.num_kv_heads,
                               self.head_dim, meta.slot_mapping, kv_cache)
        return self._attend_stored(qkv, kv_cache, meta)

    def _attend_stored(self, qkv, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """Attention over the pool, the step's keys and values already in it and qkv's queries rotated."""
        t = qkv.shape[0]
        q = qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        return self.attn.forward(q, k, v, kv_cache, meta, kv_stored=True)

    def _rope_then_attend(self, positions, qkv, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        t = qkv.shape[0]
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = qkv[:, : self.q_size], qkv[:, self.q_size : self.q_size + self.kv_size]
            q = self.q_norm(q.view(t, self.num_heads, self.head_dim))
            k = self.k_norm(k.view(t, self.num_kv_heads, self.head_dim))
            q, k = self.rotary(positions, q, k)
        else:
            # Queries and keys are adjacent in the fused projection: rotate them in one pass.
            qk = qkv[:, : self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim)
            qk = self.rotary.rotate(positions, qk)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        return self.attn.forward(q, k, v.contiguous(), kv_cache, meta)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ArchConfig, tp: TPShard | None = None) -> None:
        """tp: this rank's share of the intermediate features (model/tensor_parallel.py), None for all."""
        super().__init__()
        self.tp = tp
        inter = cfg.intermediate_size if tp is None else tp.split(cfg.intermediate_size)[1]
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * inter, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=cfg.mlp_bias and (tp is None or tp.rank == 0))
        self.act = silu_and_mul
        self.project_gate_up, self.project_down = self.gate_up_proj.__call__, row_parallel(self.down_proj.__call__, tp)
        self.gate_up_act = lambda x: self.act(self.project_gate_up(x))  # finish_load may fuse the two

    def finish_load(self, kernels: LayerKernels) -> bool:
        """Pick the projections and SiLU-and-mul for the loaded weights; returns whether the block takes float32
        inputs. Widened projections (model/layer_kernels.py) keep the activations around them in float32, rounded
        where bf16 code rounds by the kernels that read them (SiLU-and-mul, the next norm)."""
        self.gate_up_proj = kernels.linear(self.gate_up_proj)
        self.down_proj = kernels.linear(self.down_proj)
        self.project_gate_up = kernels.call(self.gate_up_proj, float_out=True)
        self.project_down = row_parallel(kernels.call(self.down_proj, float_out=True), self.tp)
        self.act = kernels.silu_and_mul(float_in=True)
        self.gate_up_act = kernels.gate_up_act(self.gate_up_proj, self.project_gate_up, self.act)
        return kernels.float_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_down(self.gate_up_act(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, rotary: RotaryEmbedding, attn_backend: type = TorchPagedAttention,
                 sliding_window: int | None = None, mlp: nn.Module | None = None, tp: TPShard | None = None) -> None:
        """mlp: the feed-forward block (default LlamaMLP; a mixture of experts in models/moe.py);
        tp: this rank's share of the layer (model/tensor_parallel.py), None for all of it."""
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, rotary, attn_backend, sliding_window, tp=tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, tp) if mlp is None else mlp
        self.norms_in_products = False  # finish_load decides

    def finish_load(self, kernels: LayerKernels) -> None:
        """Each block picks its implementation; a norm in front of a block that takes float32 hands it float32."""
        attn_float_in = self.self_attn.finish_load(kernels)
        mlp_float_in = self.mlp.finish_load(kernels)
        self.input_layernorm = kernels.norm(self.input_layernorm, float_out=attn_float_in)
        self.post_attention_layernorm = kernels.norm(self.post_attention_layernorm, float_out=mlp_float_in)
        # Decode-sized steps may run each norm inside the pair-kernel product that reads its output
        # (kernels/cpu/skinny_gemm.py): the same bits, two fewer passes and calls per layer.
        self.norms_in_products = (kernels.fused and isinstance(self.mlp, LlamaMLP)
                                  and kernels.norm_in_product(self.self_attn.qkv_proj, silu=False)
                                  and kernels.norm_in_product(self.mlp.gate_up_proj, silu=True))

    def forward(self, positions, x, residual, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output, not yet added to the residual stream (None before the first layer)."""
        if self.norms_in_products and x.shape[0] <= PAIR_ROWS:
            return self._forward_norms_in_products(positions, x, residual, kv_cache, meta)
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def _forward_norms_in_products(self, positions, x, residual, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """forward, with input_layernorm computed by the qkv product as it packs its rows (and the rotary + KV store
        as it stores them: LlamaAttention.forward_normed), and post_attention_layernorm by the gate/up + SiLU-and-mul
        product (each norm writes x + residual to residual)."""
        mlp, norm1, norm2 = self.mlp, self.input_layernorm, self.post_attention_layernorm
        h = self.self_attn.forward_normed(positions, x, (residual, norm1.weight, norm1.eps), kv_cache, meta)
        if residual is None:
            residual = x
        return mlp.project_down(mlp.gate_up_proj.pair_weight.silu(h, norm=(residual, norm2.weight, norm2.eps))), residual


class LlamaForCausalLM(nn.Module):
    fused_final_norm = True  # the final norm takes the fused CPU kernel where the layers' norms do
    supports_tensor_parallel = True  # built with a TPShard, it holds one rank's share (model/tensor_parallel.py)

    def __init__(self, cfg: ArchConfig, attn_backend: type = TorchPagedAttention, tp: TPShard | None = None) -> None:
        """attn_backend: the paged-attention class every layer uses (see model/attention/selector.py);
        tp: this rank's share of a tensor-parallel model, None for the whole model."""
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.head_dim = cfg.head_dim
        self.num_kv_heads = cfg.num_key_value_heads if tp is None else tp.kv_heads(cfg.num_key_value_heads)[1]
        self.rotary = rotary_embedding(self.head_dim, cfg.max_position_embeddings, cfg.rope_parameters)
        # An uninitialised table: weights are loaded next anyway, and nn.Embedding's own
        # random init on the meta device costs a one-time import of over a second.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        windows = cfg.layer_windows or (None,) * cfg.num_hidden_layers
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, self.rotary, attn_backend, w, self._mlp(cfg, i), tp)
                                    for i, w in enumerate(windows))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.tie_word_embeddings = cfg.tie_word_embeddings
        # Only rank 0 computes logits (it samples): the other ranks hold no LM head of their own.
        self.has_lm_head = tp is None or tp.rank == 0
        if not self.tie_word_embeddings and self.has_lm_head:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.packed_lm_head: PackedLinear | None = None

    def _mlp(self, cfg: ArchConfig, layer: int) -> nn.Module:
        """Layer `layer`'s feed-forward block: subclasses with other MLPs (mixtures of experts) override this."""
        return LlamaMLP(cfg, self.tp)

    def forward(self, input_ids, positions, kv_caches: list[torch.Tensor], meta) -> torch.Tensor:
        """meta: one AttentionMetadata, or one per layer (layers in different KV cache groups)."""
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache, m in zip(self.layers, kv_caches, per_layer(meta, len(self.layers))):
            x, residual = layer(positions, x, residual, kv_cache, m)
        return self.norm(x, residual)[0]

    def build_tables(self, device: torch.device, dtype: torch.dtype) -> None:
        """The rope cos/sin tables, on the device, once the weights are there."""
        self.rotary.build(device, dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed_lm_head is not None:
            return self.packed_lm_head.logits(hidden)
        weight = self.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight).float()

    def pack_for_cpu(self) -> int:
        """The last step of loading: every layer picks its implementation for this device and dtype
        (model/layer_kernels.py: bf16 and float32 projection weights laid out once for oneDNN, the fused CPU
        kernels where they built). Returns how many weights were packed."""
        weight = self.lm_head.weight if hasattr(self, "lm_head") else self.embed_tokens.weight
        kernels = LayerKernels.choose(weight)
        if kernels.packed and getattr(self, "has_lm_head", True):
            # A tied head keeps its table for the embedding lookup and gets a packed copy.
            self.packed_lm_head = PackedLinear(weight, None)
            if not self.tie_word_embeddings:
                del self.lm_head
        for layer in self.layers:
            layer.finish_load(kernels)
        if self.fused_final_norm:
            self.norm = kernels.norm(self.norm)
        return sum(isinstance(m, PackedLinear) for m in self.modules())

    # --- weights ----------------------------------------------------------
    def _fused_slices(self) -> dict[str, tuple[str, int, int]]:
        """HF name suffix -> (our suffix, start row, row count) inside a fused projection (this rank's share of it)."""
        cfg = self.config
        tp = getattr(self, "tp", None)  # Gemma borrows this method and has no tensor parallelism
        q = (cfg.num_attention_heads if tp is None else tp.split(cfg.num_attention_heads)[1]) * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        inter = cfg.intermediate_size if tp is None else tp.split(cfg.intermediate_size)[1]
        return {
            "self_attn.q_proj": ("self_attn.qkv_proj", 0, q),
            "self_attn.k_proj": ("self_attn.qkv_proj", q, kv),
            "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, kv),
            "mlp.gate_proj": ("mlp.gate_up_proj", 0, inter),
            "mlp.up_proj": ("mlp.gate_up_proj", inter, inter),
        }

    def _weight_slot(self, name: str, params: dict[str, nn.Parameter]) -> tuple[str, torch.Tensor]:
        """Where a checkpoint weight (HF name, "model." dropped) goes: our parameter's name and the part of it to fill.
        Subclasses with other layouts (stacked experts) override this."""
        target, rows = name, None
        for hf_part, (our_part, start, count) in self._fused_slices().items():
            if f".{hf_part}." in name:
                target, rows = name.replace(hf_part, our_part), (start, count)
                break
        if target not in params:
            raise ValueError(f"checkpoint has a weight {name!r} that this model has no place for")
        param = params[target]
        return target, param if rows is None else param.narrow(0, rows[0], rows[1])

    def weight_shard(self, name: str) -> tuple[int, int, int] | None:
        """The part of checkpoint weight `name` (HF name) this rank holds: (dim, start, count), or None for all of it.

        The loader (model/loader.py: iter_weights) reads only that part of the file, so no rank ever holds a
        whole projection; weights handed over whole are narrowed here instead."""
        tp = getattr(self, "tp", None)
        if tp is None or tp.size == 1:
            return None
        cfg, d = self.config, self.head_dim
        q0, nq = tp.split(cfg.num_attention_heads)
        kv0, nkv = tp.kv_heads(cfg.num_key_value_heads)
        i0, ni = tp.split(cfg.intermediate_size)
        for part, shard in ((".self_attn.q_proj.", (0, q0 * d, nq * d)),
                            (".self_attn.k_proj.", (0, kv0 * d, nkv * d)),
                            (".self_attn.v_proj.", (0, kv0 * d, nkv * d)),
                            (".self_attn.o_proj.weight", (1, q0 * d, nq * d)),
                            (".mlp.gate_proj.", (0, i0, ni)),
                            (".mlp.up_proj.", (0, i0, ni)),
                            (".mlp.down_proj.weight", (1, i0, ni))):
            if part in name:
                return shard
        return None

    def _skipped_weight(self, name: str) -> bool:
        """Checkpoint weights this model has no place for by design: a tied LM head; on ranks other than 0 the LM head
        and the biases of row-parallel projections (rank 0 adds them once)."""
        if name == "lm_head.weight":
            return self.tie_word_embeddings or not getattr(self, "has_lm_head", True)
        tp = getattr(self, "tp", None)
        return tp is not None and tp.rank != 0 and name.endswith((".o_proj.bias", ".down_proj.bias"))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        filled: dict[str, int] = {}  # elements of each parameter filled so far
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name.startswith("model."):
                name = name[len("model.") :]
            if self._skipped_weight(name):
                continue
            shard = self.weight_shard(name)
            if shard is not None and tensor.shape[shard[0]] != shard[2]:  # a whole weight: this rank's part of it
                tensor = tensor.narrow(*shard)
            target, dest = self._weight_slot(name, params)
            with torch.no_grad():
                if dest.shape != tensor.shape:
                    raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
                dest.copy_(tensor)
            filled[target] = filled.get(target, 0) + dest.numel()
        missing = [n for n, p in params.items() if filled.get(n, 0) != p.numel()]
        if missing:
            raise ValueError(f"checkpoint is missing weights for: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights with sane scales, for benchmarks on machines without a checkpoint.

        A tensor-parallel rank draws each whole weight and keeps its part, so that every tensor_parallel_size
        runs the same model."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    part = self._dummy_part(name)
                    if part is None:
                        w = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                    else:
                        dim, full, index = part
                        shape = list(p.shape)
                        shape[dim] = full
                        w = torch.randn(shape, generator=gen, dtype=torch.float32).index_select(dim, index)
                    p.copy_(w.mul_(0.02).to(p.dtype))

    def _dummy_part(self, name: str) -> tuple[int, int, torch.Tensor] | None:
        """A tensor-parallel rank's part of a fused parameter: (dim, its size in the whole model, this rank's indices)."""
        tp = getattr(self, "tp", None)
        if tp is None or tp.size == 1:
            return None
        cfg, d = self.config, self.head_dim
        (q0, nq), (kv0, nkv), (i0, ni) = (tp.split(cfg.num_attention_heads), tp.kv_heads(cfg.num_key_value_heads),
                                          tp.split(cfg.intermediate_size))
        q, kv, inter = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
        r = torch.arange
        if name.endswith("self_attn.qkv_proj.weight"):
            rows = torch.cat((r(q0 * d, (q0 + nq) * d), q + r(kv0 * d, (kv0 + nkv) * d), q + kv + r(kv0 * d, (kv0 + nkv) * d)))
            return 0, q + 2 * kv, rows
        if name.endswith("self_attn.o_proj.weight"):
            return 1, q, r(q0 * d, (q0 + nq) * d)
        if name.endswith("mlp.gate_up_proj.weight"):
            return 0, 2 * inter, torch.cat((r(i0, i0 + ni), inter + r(i0, i0 + ni)))
        if name.endswith("mlp.down_proj.weight"):
            return 1, inter, r(i0, i0 + ni)
        return None
