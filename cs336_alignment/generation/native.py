"""The native generation engine: batched sampling on a transformers model, no vLLM needed.

How one ``generate`` call runs:

1. Admit: prompts wait in a queue; whenever enough cache slots are free, a batch of prompts
   is prefilled once each (one forward over the padded prompts) and its key/value states
   are copied into one slot per sample (n samples of a prompt share one prefill).
2. Decode: every step runs one token for each active sequence. Keys and values go into a
   preallocated cache of shape (slots, kv_heads, capacity, head_dim) per layer, sized from
   a memory budget; attention reads only the filled prefix (rounded up to a bucket).
3. Finish: a sequence stops at EOS, at a stop string (matched on bytes across token
   boundaries), or at max_tokens; it then leaves the batch: the last active sequences
   move into the freed slots, so the active batch is always rows [0, A) of the cache.

The engine runs the model's own modules (embeddings, norms, projections, MLP, rotary
embedding) in its own decode loop, so it supports the Qwen2 / Llama / Qwen3 family of
decoder-only models. It keeps its own copy of the weights: bf16 on GPU, fp32 on CPU;
``load_weights(policy)`` refreshes it with a device-side copy.

Glossary: A active sequences, S new tokens in a forward, C cache capacity per sequence,
H query heads, K key/value heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..console import bars_enabled
from .sampling import sample_tokens, stream_keys, stream_uniforms
from .text import find_new_stop, token_bytes_table
from .types import Completion, GenerationResult, SamplingParams

__all__ = [
    "NativeEngine",
]

_BUCKET = 32  # attention reads the cache up to a multiple of this many positions


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, H, S, D), k (N, K, S, D), cos/sin (N, S, D) -> rotated q, k."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (N, 1, S, D)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@dataclass
class _Row:
    """Host-side state of one active sequence (one cache slot)."""

    prompt_index: int
    sample_index: int
    prompt_len: int
    key: int  # random stream key
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)

    @property
    def position(self) -> int:
        """Cache position of the last sampled token (the next decode input)."""
        return self.prompt_len + len(self.tokens) - 1


class NativeEngine:
    """Batched sampling with a preallocated KV cache and per-sample random streams.

    Args:
        model: a transformers causal LM of the Qwen2 / Llama / Qwen3 family.
        tokenizer: its tokenizer.
        device: where to run (default: the model's device).
        dtype: engine weights dtype (default: bf16 on CUDA, fp32 on CPU).
        copy_weights: keep a private copy of the weights (default) so training the
            policy does not change the engine until ``load_weights``; False uses ``model``
            itself (e.g. evaluation of a model loaded only for this).
        max_num_seqs: at most this many sequences decode together.
        kv_cache_tokens: cache budget in tokens (slots x capacity); default: a share
            ``kv_cache_memory_fraction`` of free GPU memory, or 2**18 tokens on CPU.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        copy_weights: bool = True,
        max_num_seqs: int = 256,
        kv_cache_tokens: int | None = None,
        kv_cache_memory_fraction: float = 0.5,
    ):
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if copy_weights:
            from transformers import AutoModelForCausalLM

            with torch.device(self.device):
                engine_model = AutoModelForCausalLM.from_config(model.config, dtype=self.dtype)
            self.model = engine_model.eval().requires_grad_(False)
            self.load_weights(model)
        else:
            self.model = model.to(self.device, self.dtype).eval()
        self._check_architecture()
        cfg = self.model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.max_num_seqs = max_num_seqs
        self.kv_cache_tokens = kv_cache_tokens
        self.kv_cache_memory_fraction = kv_cache_memory_fraction
        self.eos_ids = self._eos_ids()
        self._token_bytes = token_bytes_table(tokenizer, self.vocab_size)

    # ------------------------------------------------------------------ weights

    def load_weights(self, policy: Any) -> None:
        """Copy ``policy``'s current weights into the engine (cast to the engine dtype on device).

        A policy sharded over several processes (FSDP2) is gathered parameter by parameter, in
        buckets (:func:`~cs336_alignment.distributed.full_weights`): every rank must call this
        together, and each rank's engine gets the whole model."""
        from ..distributed import full_weights

        own = self.model.state_dict()
        copied = set()
        with torch.no_grad():
            for bucket in full_weights(policy):
                for name, tensor in bucket:
                    if name in own:
                        own[name].copy_(tensor, non_blocking=True)
                        copied.add(name)
        missing = [name for name in own if name not in copied]
        if missing:
            raise KeyError(f"policy has no weight {missing[0]!r}; is it the same architecture as the engine's model?")

    def _check_architecture(self) -> None:
        inner = getattr(self.model, "model", None)
        layers = getattr(inner, "layers", None)
        ok = layers is not None and hasattr(inner, "rotary_emb") and hasattr(inner, "norm")
        ok = ok and all(hasattr(layers[0].self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if not ok:
            raise TypeError(
                f"the native engine supports Qwen2 / Llama / Qwen3-style decoder models; got {type(self.model).__name__}"
            )

    def _eos_ids(self) -> list[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        if ids is None:
            ids = self.model.config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        return sorted(set(int(i) for i in ids))

    # ------------------------------------------------------------------ model forward

    def _layers(self):
        return self.model.model.layers

    def _qkv(self, layer: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h (N, S, hidden) -> q (N, H, S, D), k and v (N, K, S, D) with rotary applied."""
        N, S, _ = h.shape
        attn = layer.self_attn
        q = attn.q_proj(h).view(N, S, self.num_heads, self.head_dim)  # (N, S, H, D)
        k = attn.k_proj(h).view(N, S, self.num_kv_heads, self.head_dim)  # (N, S, K, D)
        v = attn.v_proj(h).view(N, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (N, K, S, D)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = _apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (N, H, S, D), (N, K, S, D)
        return q, k, v

    def _block_tail(self, layer: Any, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP. attn_out (N, H, S, D) -> new residual stream (N, S, hidden)."""
        N, _, S, _ = attn_out.shape
        x = x + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(N, S, self.num_heads * self.head_dim))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _scale(self, layer: Any) -> float:
        return getattr(layer.self_attn, "scaling", self.head_dim**-0.5)

    @torch.inference_mode()
    def _prefill(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run right-padded prompts. ids (B, S), lengths (B,) -> last-token logits (B, V), per-layer (k, v) (B, K, S, D)."""
        B, S = ids.shape
        positions = torch.arange(S, device=self.device).expand(B, S)  # (B, S)
        x = self.model.model.embed_tokens(ids)  # (B, S, hidden)
        cos, sin = self.model.model.rotary_emb(x, positions)  # (B, S, D)
        kv = []
        for layer in self._layers():
            q, k, v = self._qkv(layer, layer.input_layernorm(x), cos, sin)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self._scale(layer), enable_gqa=True)
            x = self._block_tail(layer, x, out)  # right padding: real tokens never attend to pads
            kv.append((k, v))
        last = x[torch.arange(B, device=self.device), lengths - 1]  # (B, hidden)
        logits = self.model.lm_head(self.model.model.norm(last))  # (B, V)
        return logits, kv

    @torch.inference_mode()
    def _decode(self, cache: list[tuple[torch.Tensor, torch.Tensor]], tokens: torch.Tensor, positions: torch.Tensor, span: int) -> torch.Tensor:
        """One token per active row. tokens, positions (A,); span: cache positions to read. -> logits (A, V)."""
        A = tokens.shape[0]
        rows = torch.arange(A, device=self.device)  # (A,)
        x = self.model.model.embed_tokens(tokens.unsqueeze(1))  # (A, 1, hidden)
        cos, sin = self.model.model.rotary_emb(x, positions.unsqueeze(1))  # (A, 1, D)
        visible = torch.arange(span, device=self.device).unsqueeze(0) <= positions.unsqueeze(1)  # (A, span)
        mask = visible[:, None, None, :]  # (A, 1, 1, span)
        group = self.num_heads // self.num_kv_heads  # query heads per key/value head
        for layer, (k_cache, v_cache) in zip(self._layers(), cache):
            q, k, v = self._qkv(layer, layer.input_layernorm(x), cos, sin)  # q (A, H, 1, D); k, v (A, K, 1, D)
            k_cache[rows, :, positions] = k[:, :, 0]  # (A, K, D) into (slots, K, C, D)
            v_cache[rows, :, positions] = v[:, :, 0]
            # Grouped-query attention without repeating the cache: the `group` query heads that
            # share a key/value head act as `group` query rows against it (heads h = j * group + i).
            out = F.scaled_dot_product_attention(
                q.reshape(A, self.num_kv_heads, group, self.head_dim),  # (A, K, group, D)
                k_cache[:A, :, :span], v_cache[:A, :, :span],  # (A, K, span, D)
                attn_mask=mask, scale=self._scale(layer),
            ).reshape(A, self.num_heads, 1, self.head_dim)  # (A, H, 1, D)
            x = self._block_tail(layer, x, out)
        return self.model.lm_head(self.model.model.norm(x[:, 0]))  # (A, V)

    # ------------------------------------------------------------------ cache

    def _bytes_per_token(self) -> int:
        return 2 * len(self._layers()) * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def _num_slots(self, capacity: int, wanted: int) -> int:
        budget = self.kv_cache_tokens
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                # blocks PyTorch holds in its cache (e.g. from the last training phase) are free to us too
                free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
                budget = int(free * self.kv_cache_memory_fraction) // self._bytes_per_token()
            else:
                budget = 2**18
        slots = min(wanted, self.max_num_seqs, budget // capacity)
        if slots < 1:
            raise RuntimeError(
                f"the KV-cache budget of {budget} tokens cannot hold one sequence of {capacity} tokens "
                "(prompt + max_tokens); raise kv_cache_tokens / kv_cache_memory_fraction or lower max_tokens"
            )
        return slots

    # ------------------------------------------------------------------ generate

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        sampling: SamplingParams,
        progress: bool = False,
    ) -> list[GenerationResult]:
        """Sample ``sampling.n`` completions for every prompt (strings, or lists of token ids).

        Prompt strings are tokenized without special tokens (no BOS, no chat template).
        Returns one :class:`GenerationResult` per prompt, completions in sample order.
        """
        if len(prompts) == 0:
            return []
        texts = [p if isinstance(p, str) else None for p in prompts]
        prompt_ids = [
            self.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else [int(t) for t in p] for p in prompts
        ]
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise ValueError(f"prompt {i} is empty: the engine needs at least one prompt token")
        capacity = max(len(p) for p in prompt_ids) + sampling.max_tokens
        if self.max_positions is not None and capacity > self.max_positions:
            raise ValueError(
                f"longest prompt ({capacity - sampling.max_tokens} tokens) + max_tokens ({sampling.max_tokens}) "
                f"exceeds the model's {self.max_positions} positions"
            )
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        n_total = len(prompts) * sampling.n
        slots = self._num_slots(capacity, n_total)
        # Work units: (prompt index, sample indices), at most `slots` samples each.
        pending = [
            (p, list(range(s, min(s + slots, sampling.n)))) for p in range(len(prompts)) for s in range(0, sampling.n, slots)
        ]
        pending.reverse()  # pop() from the end = first prompt first

        shape = (slots, self.num_kv_heads, capacity, self.head_dim)
        # Zeros, not empty: masked-out positions still enter the attention product (0 * NaN = NaN).
        cache = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in self._layers()
        ]
        done: dict[tuple[int, int], Completion] = {}
        rows: list[_Row] = []
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=self.device)
        stops = [s.encode("utf-8") for s in sampling.stop]
        last_stop_bytes = {s[-1] for s in stops}
        # leave=None: a bar below a run's step bar (validation) vanishes when done; the eval command's stays
        bar = tqdm(total=n_total, desc="generate", unit="seq", dynamic_ncols=True, disable=not bars_enabled(progress), leave=None)
        admit_at = max(1, slots // 4)  # refill once a quarter of the slots are free
        waiting = n_total  # samples not admitted yet

        try:
            while pending or rows:
                # ---- admit: prefill waiting prompts into free slots
                free = slots - len(rows)
                batch = []
                if pending and (not rows or free >= min(admit_at, waiting)):
                    while pending and len(pending[-1][1]) <= free:
                        unit = pending.pop()
                        batch.append(unit)
                        free -= len(unit[1])
                        waiting -= len(unit[1])
                if batch:
                    new_rows, first_logits = self._admit(batch, prompt_ids, cache, first_row=len(rows), seed=seed,
                                                          offset=sampling.prompt_offset)
                    rows.extend(new_rows)
                    self._step(rows, len(rows) - len(new_rows), first_logits, sampling=sampling, eos=eos, stops=stops,
                               last_stop_bytes=last_stop_bytes, done=done, bar=bar)
                    rows = self._compact(rows, cache, done)
                    continue
                # ---- decode one token for every active row
                tokens = torch.tensor([r.tokens[-1] for r in rows], dtype=torch.long, device=self.device)
                positions = torch.tensor([r.position for r in rows], dtype=torch.long, device=self.device)
                span = min(capacity, math.ceil((max(r.position for r in rows) + 1) / _BUCKET) * _BUCKET)
                logits = self._decode(cache, tokens, positions=positions, span=span)  # (A, V)
                self._step(rows, 0, logits, sampling=sampling, eos=eos, stops=stops, last_stop_bytes=last_stop_bytes,
                           done=done, bar=bar)
                rows = self._compact(rows, cache, done)
        finally:
            bar.close()
            del cache

        return [
            GenerationResult(
                prompt=texts[p],
                prompt_token_ids=prompt_ids[p],
                completions=[done[(p, s)] for s in range(sampling.n)],
            )
            for p in range(len(prompts))
        ]

    def _admit(self, batch, prompt_ids, cache, first_row: int, seed: int, offset: int) -> tuple[list[_Row], torch.Tensor]:
        """Prefill each prompt of ``batch`` once and copy its keys/values into its samples' slots."""
        lengths = [len(prompt_ids[p]) for p, _ in batch]
        S = max(lengths)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        ids = torch.full((len(batch), S), pad, dtype=torch.long)
        for i, (p, _) in enumerate(batch):
            ids[i, : lengths[i]] = torch.tensor(prompt_ids[p])
        logits, kv = self._prefill(ids.to(self.device), torch.tensor(lengths, device=self.device))
        repeat = torch.tensor([len(samples) for _, samples in batch], device=self.device)  # samples per prompt
        end = first_row + int(repeat.sum())
        for (k_cache, v_cache), (k, v) in zip(cache, kv):
            k_cache[first_row:end, :, :S] = k.repeat_interleave(repeat, dim=0)
            v_cache[first_row:end, :, :S] = v.repeat_interleave(repeat, dim=0)
        p_idx = torch.tensor([p for p, samples in batch for _ in samples])
        s_idx = torch.tensor([s for _, samples in batch for s in samples])
        keys = stream_keys(seed, p_idx + offset, s_idx).tolist()  # keyed on the prompt's index in the whole batch
        new_rows = [
            _Row(prompt_index=int(p), sample_index=int(s), prompt_len=len(prompt_ids[int(p)]), key=int(k))
            for p, s, k in zip(p_idx.tolist(), s_idx.tolist(), keys)
        ]
        return new_rows, logits.repeat_interleave(repeat, dim=0)  # (new rows, V)

    def _step(self, rows, start, logits, sampling, eos, stops, last_stop_bytes, done, bar) -> None:
        """Sample the next token of rows[start:] from logits, append it, and finish rows that end."""
        active = rows[start:]
        keys = torch.tensor([r.key for r in active], dtype=torch.int64)
        counts = torch.tensor([len(r.tokens) for r in active], dtype=torch.int64)
        suppress = None
        if sampling.min_tokens > 0 and not sampling.ignore_eos:
            suppress = (counts < sampling.min_tokens).to(self.device)
        tokens, logprobs = sample_tokens(
            logits,
            stream_uniforms(keys, counts).to(self.device),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            suppress=suppress,
            suppress_ids=eos,
        )
        eos_set = set(self.eos_ids)
        for row, tok, lp in zip(active, tokens.tolist(), logprobs.tolist()):
            row.tokens.append(tok)
            row.logprobs.append(lp)
            piece = self._token_bytes[tok]
            row.text.extend(piece)
            n = len(row.tokens)
            reason, stop_str, cut = None, None, len(row.text)
            if tok in eos_set and not sampling.ignore_eos and n > sampling.min_tokens:
                reason = "eos"
            elif stops and n >= sampling.min_tokens and any(b in piece for b in last_stop_bytes):
                hit = find_new_stop(row.text, len(piece), stops)
                if hit is not None:
                    start_at, stop = hit
                    reason, stop_str = "stop", stop.decode("utf-8")
                    cut = start_at + len(stop) if sampling.include_stop_str_in_output else start_at
            if reason is None and n >= sampling.max_tokens:
                reason = "length"
            if reason is not None:
                done[(row.prompt_index, row.sample_index)] = Completion(
                    text=bytes(row.text[:cut]).decode("utf-8", errors="replace"),
                    token_ids=row.tokens,
                    finish_reason=reason,
                    logprobs=row.logprobs,
                    stop_str=stop_str,
                )
                bar.update(1)

    def _compact(self, rows: list[_Row], cache, done) -> list[_Row]:
        """Drop finished rows; move the last active rows into the freed slots so rows stay [0, A)."""
        finished = [i for i, r in enumerate(rows) if (r.prompt_index, r.sample_index) in done]
        if not finished:
            return rows
        keep = len(rows) - len(finished)
        holes = [i for i in finished if i < keep]
        movers = [i for i in range(keep, len(rows)) if (rows[i].prompt_index, rows[i].sample_index) not in done]
        if holes:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            upto = max(rows[m].position for m in movers) + 1  # positions written so far by the movers
            for k_cache, v_cache in cache:
                k_cache[dst, :, :upto] = k_cache[src, :, :upto]
                v_cache[dst, :, :upto] = v_cache[src, :, :upto]
            for h, m in zip(holes, movers):
                rows[h] = rows[m]
        return rows[:keep]
