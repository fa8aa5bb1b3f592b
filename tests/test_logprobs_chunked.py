"""Chunked log-probs and entropy: same values and gradients as the simple path, less memory.

The simple path (``chunk_size=None``) is the handout's: full (B, T, V) logits. The chunked
path computes logits C rows at a time and recomputes them in the backward; these tests
check it against the simple path (values and gradients of every parameter, several chunk
sizes, masks, bf16, autocast), against float64 finite differences, and that it never
creates or saves a tensor as large as the micro-batch's logits.
"""

from __future__ import annotations

import inspect
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cs336_alignment.logprobs import chunked_log_probs_from_hidden, get_response_log_probs

B, T = 3, 37  # N = 111 rows: not a multiple of most chunk sizes below


@pytest.fixture(autouse=True)
def _one_thread():
    """These are many tiny ops: on shared, busy cores one thread is 100x faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def batch(tiny_model):
    g = torch.Generator().manual_seed(0)
    V = tiny_model.config.vocab_size
    input_ids = torch.randint(0, V, (B, T), generator=g)  # (B, T)
    labels = torch.randint(0, V, (B, T), generator=g)  # (B, T)
    mask = torch.rand(B, T, generator=g) > 0.4  # (B, T)
    weights = torch.randn(2, B, T, generator=g)  # loss weights of log-probs and entropy
    return input_ids, labels, mask, weights


def _score(model, input_ids, labels, weights, entropy: bool, loss_on: str = "both", **kw):
    """Outputs and d(loss)/d(parameter) for every parameter; the loss mixes both outputs."""
    model.zero_grad(set_to_none=True)
    out = get_response_log_probs(model, input_ids, labels, entropy, **kw)
    loss = torch.zeros(())
    if loss_on in ("both", "log_probs"):
        loss = loss + (weights[0] * out["log_probs"]).sum()
    if entropy and loss_on in ("both", "entropy"):
        loss = loss + (weights[1] * out["token_entropy"]).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def _assert_same(got, want, rtol=1e-5, atol=1e-5):
    (out_g, grads_g), (out_w, grads_w) = got, want
    assert out_g.keys() == out_w.keys()
    for k in out_w:
        assert out_g[k].dtype == torch.float32 and out_g[k].shape == (B, T)
        torch.testing.assert_close(out_g[k], out_w[k], rtol=rtol, atol=atol)
    assert grads_g.keys() == grads_w.keys() and grads_w
    for name in grads_w:
        scale = grads_w[name].abs().max().item()
        torch.testing.assert_close(grads_g[name], grads_w[name], rtol=rtol, atol=atol * max(1.0, scale), msg=name)


@pytest.mark.parametrize("chunk_size", [1, 16, 50, 111, 4096])
@pytest.mark.parametrize("entropy", [True, False])
def test_chunked_equals_simple_path_values_and_gradients(tiny_model, batch, chunk_size, entropy):
    input_ids, labels, _, weights = batch
    want = _score(tiny_model, input_ids, labels, weights, entropy)
    got = _score(tiny_model, input_ids, labels, weights, entropy, chunk_size=chunk_size)
    _assert_same(got, want)
    # the tied embedding / lm_head weight gets both its uses' gradients
    assert got[1]["model.embed_tokens.weight"].abs().sum() > 0


@pytest.mark.parametrize("loss_on", ["log_probs", "entropy"])
def test_gradient_through_one_output_only(tiny_model, batch, loss_on):
    input_ids, labels, _, weights = batch
    want = _score(tiny_model, input_ids, labels, weights, True, loss_on)
    got = _score(tiny_model, input_ids, labels, weights, True, loss_on, chunk_size=20)
    _assert_same(got, want)


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_positions_mask_scores_only_masked_positions(tiny_model, batch, chunk_size):
    input_ids, labels, mask, weights = batch
    full = _score(tiny_model, input_ids, labels, weights, True)
    simple = _score(tiny_model, input_ids, labels, weights, True, positions_mask=mask)
    chunked = _score(tiny_model, input_ids, labels, weights, True, chunk_size=chunk_size, positions_mask=mask)
    _assert_same(chunked, simple)
    for k in ("log_probs", "token_entropy"):
        assert (chunked[0][k][~mask] == 0).all()
        torch.testing.assert_close(chunked[0][k][mask], full[0][k][mask], rtol=1e-5, atol=1e-5)
    # masked-out positions contribute no gradient: the full path's gradient differs
    assert not torch.allclose(chunked[1]["model.embed_tokens.weight"], full[1]["model.embed_tokens.weight"])


def test_empty_positions_mask_gives_zeros_and_zero_head_gradient(tiny_model, batch):
    input_ids, labels, _, weights = batch
    mask = torch.zeros(B, T, dtype=torch.bool)
    out, grads = _score(tiny_model, input_ids, labels, weights, True, chunk_size=8, positions_mask=mask)
    assert (out["log_probs"] == 0).all() and (out["token_entropy"] == 0).all()
    assert all((g == 0).all() for g in grads.values())


def test_backward_matches_float64_finite_differences():
    """gradcheck of the autograd Function itself: hidden, weight and bias, with a row mask."""
    g = torch.Generator().manual_seed(1)
    N, D, V = 7, 4, 9
    hidden = torch.randn(1, N, D, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(V, D, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (1, N), generator=g)
    mask = torch.tensor([[True, False, True, True, False, True, True]])

    def f(h, w, b):
        out = chunked_log_probs_from_hidden(h, w, labels, True, bias=b, chunk_size=3, positions_mask=mask)
        return out["log_probs"], out["token_entropy"]

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))
    # and the values match a direct float64 computation
    lp, h = f(hidden, weight, bias)
    z = hidden @ weight.T + bias  # (1, N, V)
    want_lp = torch.log_softmax(z, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    want_h = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(lp, torch.where(mask, want_lp, 0.0))
    torch.testing.assert_close(h, torch.where(mask, want_h, 0.0))


def test_bf16_model_gives_fp32_outputs_close_to_fp32_path(tiny_model, batch):
    input_ids, labels, mask, weights = batch
    ref = _score(tiny_model, input_ids, labels, weights, True)
    bf16_model = tiny_model.to(torch.bfloat16)
    simple = _score(bf16_model, input_ids, labels, weights, True)
    chunked = _score(bf16_model, input_ids, labels, weights, True, chunk_size=32)
    for k in ("log_probs", "token_entropy"):
        assert chunked[0][k].dtype == torch.float32
        assert (chunked[0][k] - ref[0][k]).abs().mean().item() < 0.1
        # bf16 logits are rounded identically in both bf16 paths: far closer than to fp32
        assert (chunked[0][k] - simple[0][k]).abs().max().item() < 0.05
    for name, g in simple[1].items():
        assert chunked[1][name].dtype == torch.bfloat16
        cos = torch.nn.functional.cosine_similarity(chunked[1][name].float().flatten(), g.float().flatten(), dim=0)
        assert cos > 0.99, name


def test_autocast_matmul_runs_in_autocast_dtype(tiny_model, batch):
    """fp32 master weights under bf16 autocast (the recipes' GPU setting), on CPU."""
    input_ids, labels, _, weights = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        simple = _score(tiny_model, input_ids, labels, weights, True)
        chunked = _score(tiny_model, input_ids, labels, weights, True, chunk_size=32)
    fp32 = _score(tiny_model, input_ids, labels, weights, True, chunk_size=32)
    for k in ("log_probs", "token_entropy"):
        gap_autocast = (chunked[0][k] - simple[0][k]).abs().max().item()
        gap_fp32 = (chunked[0][k] - fp32[0][k]).abs().max().item()
        assert gap_autocast < 0.05 and gap_autocast < gap_fp32  # bf16-rounded logits, like nn.Linear's
    for name, g in simple[1].items():
        assert chunked[1][name].dtype == torch.float32  # master weights keep fp32 gradients
        cos = torch.nn.functional.cosine_similarity(chunked[1][name].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, name


def test_inference_mode_scoring_matches(tiny_model, batch):
    """Old log-probs are scored under inference_mode: the Function must work without autograd."""
    input_ids, labels, mask, _ = batch
    with torch.inference_mode():
        a = get_response_log_probs(tiny_model, input_ids, labels, chunk_size=10, positions_mask=mask)
        b = get_response_log_probs(tiny_model, input_ids, labels, positions_mask=mask)
    assert "token_entropy" not in a
    torch.testing.assert_close(a["log_probs"], b["log_probs"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Memory: counted in elements, not measured in time or bytes of a noisy process
# ---------------------------------------------------------------------------------------


def _largest_saved_numel(fn) -> tuple[int, list[tuple[int, ...]]]:
    """Run fn() recording every tensor autograd saves for backward: (largest numel, shapes)."""
    shapes: list[tuple[int, ...]] = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(torch.Size(s).numel() for s in shapes), shapes


class _LargestOutputs(TorchDispatchMode):
    """Records the shape of every new tensor any op creates (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # views (W^T, slices) and in-place ops allocate nothing
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _train_once(model, input_ids, labels, weights, **kw) -> None:
    out = get_response_log_probs(model, input_ids, labels, True, **kw)
    ((weights[0] * out["log_probs"]).sum() + (weights[1] * out["token_entropy"]).sum()).backward()


def test_chunked_path_saves_no_logit_sized_tensor(tiny_model, batch):
    input_ids, labels, _, weights = batch
    V, D = tiny_model.config.vocab_size, tiny_model.config.hidden_size
    N = B * T
    assert N * V > V * D  # so the weight itself cannot be mistaken for logits
    simple_max, simple_shapes = _largest_saved_numel(lambda: _train_once(tiny_model, input_ids, labels, weights))
    chunked_max, chunked_shapes = _largest_saved_numel(
        lambda: _train_once(tiny_model, input_ids, labels, weights, chunk_size=16)
    )
    assert simple_max >= N * V and any(s[-1] == V and torch.Size(s).numel() == N * V for s in simple_shapes)
    assert chunked_max < N * V
    assert not any(s and s[-1] == V and s[0] != V for s in chunked_shapes)  # nothing (rows, V) is kept


def test_chunked_path_never_creates_more_than_chunk_rows_of_logits(tiny_model, batch):
    input_ids, labels, mask, weights = batch
    V, N, C = tiny_model.config.vocab_size, B * T, 16

    def logit_rows(**kw) -> int:
        """Most rows of any (..., V) tensor created, forward or backward (the weight excepted)."""
        with _LargestOutputs() as rec:
            _train_once(tiny_model, input_ids, labels, weights, **kw)
        sizes = [torch.Size(s[:-1]).numel() for s in rec.shapes if len(s) >= 2 and s[-1] == V and s != (V, V)]
        backward_seen = any(s == tuple(tiny_model.lm_head.weight.shape) for s in rec.shapes)
        assert backward_seen
        return max(sizes)

    assert logit_rows() == N  # the simple path materialises all N rows of logits
    assert logit_rows(chunk_size=C) == C
    # with a positions mask and a large chunk, only the masked rows ever get logits
    assert logit_rows(chunk_size=4096, positions_mask=mask) == int(mask.sum())


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors created inside the mode and still referenced (forward and backward).

    Each new tensor adds its storage size; a finalizer subtracts it when the tensor dies.
    It sees only tensors created while the mode is active, which is all we compare.
    """

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                nbytes = t.untyped_storage().nbytes()
                self.now += nbytes
                self.peak = max(self.peak, self.now)
                weakref.finalize(t, self._free, nbytes)
        return out


def test_chunked_path_peak_live_memory_is_bounded_by_the_chunk(tiny_model, batch):
    input_ids, labels, _, weights = batch
    V, D, N, C = tiny_model.config.vocab_size, tiny_model.config.hidden_size, B * T, 16

    def peak(fn) -> int:
        tiny_model.zero_grad(set_to_none=True)
        with _LiveBytes() as live:
            fn()
        return live.peak

    def body_only() -> None:  # the transformer body's own forward and backward: the baseline
        tiny_model.model(input_ids=input_ids, use_cache=False).last_hidden_state.sum().backward()

    base = peak(body_only)
    simple_extra = peak(lambda: _train_once(tiny_model, input_ids, labels, weights)) - base
    chunked_extra = peak(lambda: _train_once(tiny_model, input_ids, labels, weights, chunk_size=C)) - base
    assert simple_extra >= N * V * 4  # at least one copy of the fp32 logits is alive at once
    # the fp32 weight-gradient buffer (and a cast of it) plus a few (C, V) fp32 temporaries
    assert chunked_extra <= 2 * V * D * 4 + 4 * C * V * 4 < simple_extra


# ---------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------


def test_handout_signature_is_kept_and_new_options_are_keyword_only():
    params = inspect.signature(get_response_log_probs).parameters
    assert list(params)[:4] == ["model", "input_ids", "labels", "return_token_entropy"]
    assert params["return_token_entropy"].default is False
    for name in ("chunk_size", "positions_mask"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is None


def test_bad_chunk_size_and_mask_shape_are_refused(tiny_model, batch):
    input_ids, labels, mask, _ = batch
    with pytest.raises(ValueError, match="chunk_size"):
        get_response_log_probs(tiny_model, input_ids, labels, chunk_size=0)
    with pytest.raises(ValueError, match="positions_mask"):
        get_response_log_probs(tiny_model, input_ids, labels, chunk_size=4, positions_mask=mask[:, :-1])


def test_models_that_rescale_logits_are_refused(tiny_model, batch):
    input_ids, labels, _, _ = batch
    tiny_model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        get_response_log_probs(tiny_model, input_ids, labels, chunk_size=4)
