"""The Manager modules: pure tensor math, no knowledge of transformers.

Shapes used below: `T` visual tokens (all images of the batch, flattened), `N` selected vision
layers, `D` width (LLM hidden size for `injection="llm"`, SigLIP width for `"projector"`).
Every Manager is zero-initialised, so a freshly patched model is the unpatched model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import ManagerConfig


def _jittered(weight: torch.Tensor, jitter: float, training: bool) -> torch.Tensor:
    """`weight * U(1 - jitter, 1 + jitter)` in training (fresh noise every call), `weight` otherwise."""
    if not training or jitter == 0:
        return weight
    noise = torch.empty_like(weight).uniform_(1 - jitter, 1 + jitter)
    return weight * noise


_BLOCK_ELEMENTS = 1 << 20  # 4 MiB of fp32 per block product


def _token_block(features: torch.Tensor, used: int) -> int:
    """Tokens per block so that one `(..., block, used, D)` product holds about `_BLOCK_ELEMENTS` elements."""
    *lead, _tokens, _num_layers, width = features.shape
    return max(1, _BLOCK_ELEMENTS // max(1, math.prod(lead) * used * width))


def _blockwise_layer_sum(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`(features[..., :n, :] * weights).sum(-2)` (`n = len(weights)`) without autograd, a block of tokens at a time.

    features: (..., T, N, D), weights: (n, D) -> (..., T, D). The same products and the same sums per token, so
    the same bits; but each `(..., block, n, D)` product stays small (in cache, reused by the allocator) instead of
    a fresh temporary the size of `features`.
    """
    *lead, tokens, _num_layers, width = features.shape
    used = weights.shape[0]
    block = _token_block(features, used)
    out = features.new_empty(*lead, tokens, width)  # (..., T, D)
    for start in range(0, tokens, block):
        part = features[..., start : start + block, :used, :]
        torch.sum(part * weights, dim=-2, out=out[..., start : start + block, :])
    return out


class _WeightedLayerSum(torch.autograd.Function):
    """`_blockwise_layer_sum` with a backward that is blockwise too.

    Autograd through the plain expression would keep a features-sized product alive in the forward, and in the
    backward build a features-sized temporary for the weights' gradient plus a zero-padded copy when `n < N`.
    Here the features' gradient is written once, in place, and the weights' gradient is summed block by block
    (in float32).
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(features, weights)
        return _blockwise_layer_sum(features, weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        features, weights = ctx.saved_tensors
        used = weights.shape[0]
        grad_features = grad_weights = None
        grad_rows = grad_out.unsqueeze(-2)  # (..., T, 1, D)
        if ctx.needs_input_grad[0]:
            grad_features = features.new_empty(features.shape)  # (..., T, N, D)
            torch.mul(grad_rows, weights, out=grad_features[..., :used, :])
            grad_features[..., used:, :].zero_()  # layers this Manager does not read
        if ctx.needs_input_grad[1]:
            block = _token_block(features, used)
            reduce_dims = tuple(range(features.dim() - 2))  # every dimension but (n, D)
            grad_weights = torch.zeros(weights.shape, dtype=torch.float32, device=weights.device)
            for start in range(0, features.shape[-3], block):
                part = features[..., start : start + block, :used, :]
                grad_weights += (grad_rows[..., start : start + block, :, :] * part).sum(
                    reduce_dims, dtype=torch.float32
                )
            grad_weights = grad_weights.to(weights.dtype)
        return grad_features, grad_weights


def weighted_layer_sum(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`(features[..., :n, :] * weights).sum(-2)`, `n = len(weights)`: features (..., T, N, D), weights (n, D)."""
    if features.dim() < 3:  # a single token: nothing to block
        return (features[..., : weights.shape[0], :] * weights).sum(-2)
    if torch.is_grad_enabled() and (features.requires_grad or weights.requires_grad):
        return _WeightedLayerSum.apply(features, weights)
    return _blockwise_layer_sum(features, weights)


def init_manager_weights(module: nn.Module, zeros_=nn.init.zeros_, normal_=nn.init.normal_) -> bool:
    """Give `module`'s own parameters their initial values if it is one of the Manager modules; True if it was.

    The one place that knows the initial values (zero Manager weights: identity at init; the layer embedding drawn
    from N(0, 1/D)). The modules call it from `__init__` with torch's init functions; the registered model classes call
    it from `_init_weights` with `transformers.initialization`'s, which skip tensors already loaded. Child modules
    (`nn.Linear` in the adaptive Managers) are not touched: they keep their framework's initialisation.
    """
    if isinstance(module, StaticManager):
        zeros_(module.layer_scores)
    elif isinstance(module, AdaptiveManager):
        zeros_(module.zero_gate)
    elif isinstance(module, LayerEmbedding):
        normal_(module.weight, mean=0.0, std=1 / math.sqrt(module.width))
    else:
        return False
    return True


class LayerEmbedding(nn.Module):
    """A learned vector per selected vision layer, added to that layer's (projected) features."""

    def __init__(self, num_layers: int, width: int):
        super().__init__()
        self.num_layers, self.width = num_layers, width  # plain ints: ZeRO-3 empties partitioned parameters
        self.weight = nn.Parameter(torch.empty(num_layers, width))
        with torch.no_grad():
            init_manager_weights(self)

    def forward(self, layer_features: torch.Tensor, reuse_input: bool = False) -> torch.Tensor:
        # layer_features: (..., N, D) -> same shape
        embedding = self.weight.to(layer_features.dtype)
        recording = torch.is_grad_enabled() and (layer_features.requires_grad or embedding.requires_grad)
        if reuse_input and not recording:  # inference: add in place (under autograd, in-place costs more backward)
            return layer_features.add_(embedding)
        return layer_features + embedding

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, width={self.width}"


class StaticManager(nn.Module):
    """The released `static_zerouni` Manager: `sum_n w[n] * X[..., n, :]`, one weight per layer and channel.

    With `num_layers` smaller than the number of features given (the Manager at LLM layer 0), only the
    first `num_layers` vision layers are used, as in the released code.
    """

    def __init__(self, num_layers: int, width: int, jitter: float = 0.0):
        super().__init__()
        self.jitter = jitter
        self.num_layers, self.width = num_layers, width  # plain ints: ZeRO-3 empties partitioned parameters
        self.layer_scores = nn.Parameter(torch.empty(num_layers, width))
        with torch.no_grad():
            init_manager_weights(self)

    def layer_weights(self) -> torch.Tensor:
        """(num_layers, D) weights as used in this forward (jittered in training)."""
        return _jittered(self.layer_scores, self.jitter, self.training)

    def forward(self, features: torch.Tensor, **_context) -> torch.Tensor:
        # features: (..., N, D) -> (..., D)
        return weighted_layer_sum(features, self.layer_weights().to(features.dtype))

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, width={self.width}, jitter={self.jitter}"


@dataclass
class QueryContext:
    """What the adaptive Managers read besides the features, for the `T` visual tokens of a forward.

    Attributes:
        hidden (`(T, D)`): the LLM hidden state at the visual tokens (input of the decoder layer).
        query_hidden (`(Q, D)`): the hidden state at the instruction tokens of all samples, concatenated.
        token_sample (`(T,)`): sample index of each visual token.
        query_sample (`(Q,)`): sample index of each instruction token.
        query_last (`(B,)`): index into `query_hidden` of each sample's last instruction token.
        query_segments (`list[tuple[int, int]]`): `[start, end)` of each sample's tokens in `query_hidden`.
    """

    hidden: torch.Tensor
    query_hidden: torch.Tensor
    token_sample: torch.Tensor
    query_sample: torch.Tensor
    query_last: torch.Tensor
    query_segments: list[tuple[int, int]]


class CrossQuery(nn.Module):
    """Scaled dot-product attention from each visual state over its sample's instruction tokens (no value proj)."""

    def __init__(self, width: int):
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)

    def forward(self, context: QueryContext) -> torch.Tensor:
        queries = self.q_proj(context.hidden)  # (T, D)
        keys = self.k_proj(context.query_hidden)  # (Q, D)
        scores = queries @ keys.transpose(0, 1) / math.sqrt(queries.shape[-1])  # (T, Q)
        same_sample = context.token_sample[:, None] == context.query_sample[None, :]
        scores = scores.masked_fill(~same_sample, float("-inf"))
        return torch.softmax(scores, dim=-1) @ context.query_hidden  # (T, D)


class AdaptiveManager(nn.Module):
    """Per-token layer scores from the LLM state (and the instruction), gated by a zero-init `zero_gate`.

    `query`: `None` (scores from the visual state only), `"last"` / `"average"` (the instruction's last token /
    mean, concatenated before the visual state) or `"cross"` (attention over the instruction tokens).
    Output: `sum_n S[:, n] * zero_gate[n] * X[:, n]`, no softmax.
    """

    def __init__(self, num_layers: int, width: int, query: str | None, jitter: float = 0.0):
        super().__init__()
        self.query = query
        self.jitter = jitter
        self.num_layers, self.width = num_layers, width  # plain ints: ZeRO-3 empties partitioned parameters
        self.zero_gate = nn.Parameter(torch.empty(num_layers, width))
        in_features = width if query is None else 2 * width
        self.linear_controller = nn.Linear(in_features, num_layers, bias=False)
        self.fusion_attention = CrossQuery(width) if query == "cross" else None
        with torch.no_grad():
            init_manager_weights(self)

    def layer_weights(self) -> torch.Tensor:
        return _jittered(self.zero_gate, self.jitter, self.training)

    def _query_vectors(self, context: QueryContext) -> torch.Tensor:
        """(T, D) query vector of each visual token."""
        if self.query == "cross":
            return self.fusion_attention(context)
        if self.query == "last":
            per_sample = context.query_hidden[context.query_last]  # (B, D)
        elif not context.query_segments:  # no visual token in this forward
            return context.hidden.new_zeros(context.hidden.shape)
        else:  # average, per sample, as `Q.mean(0)` in the original
            per_sample = torch.stack(
                [context.query_hidden[start:end].mean(0) for start, end in context.query_segments]
            )  # (B, D)
        return per_sample[context.token_sample]

    def forward(self, features: torch.Tensor, context: QueryContext | None = None) -> torch.Tensor:
        # features: (T, N, D); context.hidden: (T, D) -> (T, D)
        if context is None:
            raise ValueError("AdaptiveManager needs the LLM hidden state (a QueryContext)")
        controller_input = context.hidden
        if self.query is not None:
            controller_input = torch.cat([self._query_vectors(context), context.hidden], dim=-1)
        scores = self.linear_controller(controller_input.to(self.linear_controller.weight.dtype))  # (T, N)
        gate = self.layer_weights()  # (N, D)
        # layer by layer: (T, D) temporaries, never a (T, N, D) one (the static path's weighted_layer_sum avoids it too)
        output = None
        for n in range(self.num_layers):
            term = (scores[:, n, None] * gate[n]).to(features.dtype) * features[..., n, :]  # (T, D)
            output = term if output is None else output + term
        return output

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, query={self.query}, jitter={self.jitter}"


_QUERY_OF_TYPE = {"adaptive": None, "adaptive_last": "last", "adaptive_average": "average", "adaptive_cross": "cross"}


class ManagerStack(nn.Module):
    """All parameters llava-manager adds to a model, under one submodule (`model.model.manager`).

    `managers[i]` serves decoder layer `config.llm_layers[i]` (`injection="llm"`), or is the single vision-space
    Manager (`injection="projector"`). The Manager at LLM layer 0 uses the first N-1 vision layers.
    """

    def __init__(self, config: ManagerConfig, width: int):
        super().__init__()
        self.config = config
        num_layers = len(config.vision_layers)
        self.layer_embedding = LayerEmbedding(num_layers, width) if config.layer_embedding else None
        managers = []
        if config.injection == "projector":
            managers.append(StaticManager(num_layers, width, config.jitter))
        else:
            for llm_layer in config.llm_layers:
                if llm_layer == 0:
                    managers.append(StaticManager(num_layers - 1, width, config.jitter))
                elif config.is_adaptive:
                    query = _QUERY_OF_TYPE[config.manager_type]
                    managers.append(AdaptiveManager(num_layers, width, query, config.jitter))
                else:
                    managers.append(StaticManager(num_layers, width, config.jitter))
        self.managers = nn.ModuleList(managers)

    def embed_layers(self, layer_features: torch.Tensor, reuse_input: bool = False) -> torch.Tensor:
        """Add the layer embedding (if any) to `(..., N, D)` features. `reuse_input`: the caller owns
        `layer_features`, so without autograd the sum may be written into them."""
        if self.layer_embedding is None:
            return layer_features
        return self.layer_embedding(layer_features, reuse_input=reuse_input)

    def extra_repr(self) -> str:
        c = self.config
        where = f"llm_layers={c.llm_layers}" if c.injection == "llm" else "injection=projector"
        return f"type={c.manager_type}, vision_layers={c.vision_layers}, {where}, grid={c.grid}"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero every Manager weight (identity) and redraw the layer embedding, as at patch time."""
        for module in self.modules():
            init_manager_weights(module)
