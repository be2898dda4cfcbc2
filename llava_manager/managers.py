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


def init_manager_weights(module: nn.Module, init=nn.init) -> bool:
    """Give `module`'s own parameters their initial values if it is one of the Manager modules; True if it was.

    The one place that knows the initial values (zero Manager weights and gates: identity at init; the tower's
    scores 1/N and temperature 1; the layer embedding drawn from N(0, 1/D)). `init`: a namespace of init functions
    (`zeros_`, `ones_`, `constant_`, `normal_`): the modules call it from `__init__` with `torch.nn.init`; the
    registered model classes call it from `_init_weights` with `transformers.initialization`, whose functions skip
    tensors already loaded. Child modules (`nn.Linear` in the adaptive Managers, the tower's LayerNorms) are not
    touched: they keep their framework's initialisation.
    """
    if isinstance(module, StaticManager):
        init.zeros_(module.layer_scores)
    elif isinstance(module, AdaptiveManager):
        init.zeros_(module.zero_gate)
    elif isinstance(module, BridgeManager):
        init.zeros_(module.layer_scale)
    elif isinstance(module, TowerManager):
        init.constant_(module.layer_scores, 1 / module.num_layers)
        init.ones_(module.temperature)
        init.zeros_(module.gate)
    elif isinstance(module, LayerEmbedding):
        init.normal_(module.weight, mean=0.0, std=1 / math.sqrt(module.width))
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


class BridgeManager(nn.Module):
    """BridgeTower-style (one-to-one) Manager: `w * X[..., k, :]`, one selected vision layer `k` scaled per channel.

    BridgeTower (arXiv 2206.08657) bridges unimodal layer `k` into cross-modal layer `l` with `LayerNorm(x + y)`;
    that LayerNorm is left out here: the Manager paper (arXiv 2506.11515) found LayerNorm, softmax and their extra
    weights harmful inside a pre-trained LLM and adds a zero-initialised residual instead. So this is the static
    Manager with its weights restricted to one layer (the paper's Appendix B-A: BridgeTower as a special case of
    ManagerTower with one-hot layer weights). `layer_scale` is zero-initialised (identity at init) and jittered in
    training like the static weights.

    Args:
        num_layers (`int`): N, the selected vision layers in the features this Manager is given.
        width (`int`): D.
        layer (`int`): which of the N (a position in `ManagerConfig.vision_layers`) this Manager reads.
    """

    def __init__(self, num_layers: int, width: int, layer: int, jitter: float = 0.0):
        super().__init__()
        if not 0 <= layer < num_layers:
            raise ValueError(f"BridgeManager: layer {layer} is not one of the {num_layers} selected layers")
        self.jitter = jitter
        self.num_layers, self.width, self.layer = num_layers, width, layer  # plain ints (ZeRO-3)
        self.layer_scale = nn.Parameter(torch.empty(width))
        with torch.no_grad():
            init_manager_weights(self)

    def forward(self, features: torch.Tensor, **_context) -> torch.Tensor:
        # features: (..., N, D) -> (..., D)
        scale = _jittered(self.layer_scale, self.jitter, self.training).to(features.dtype)
        return features[..., self.layer, :] * scale

    def extra_repr(self) -> str:
        return f"layer={self.layer} of {self.num_layers}, width={self.width}, jitter={self.jitter}"


class _CastLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` that runs in its input's dtype (the Managers' weights may be fp32 beside bf16 features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class TowerManager(nn.Module):
    """ManagerTower's static Manager (SAUM, arXiv 2306.00103 Eq. 5), gated into a pre-trained LLM.

    `gate * sum_n softmax_n((W + noise) / tau)[n] * LN_n(X[..., n, :])`:

    - `LN_n`: a LayerNorm per selected layer (`norms[n]`, weight 1 and bias 0 at init);
    - `W` (`layer_scores`, `(N, D)`): one score per layer and channel (the original's `manager_weight_type="vector"`),
      initialised to 1/N and softmax-normalised over the layers with a learnable temperature `tau` (`temperature`,
      initialised to 1);
    - `noise`: in training only, fresh `N(0, (1/N)^2)` per token, layer and channel, added to the scores before the
      softmax, as the original's `aggregate_reps`;
    - `gate` (`(D,)`): zero-initialised per-channel gate (identity at init; jittered in training like the static
      weights). It replaces the original's `W_C * LN(C_{l-1})` term: the Manager's output is added to the LLM state
      (the cross-modal `C_{l-1}`) as a residual instead of being normalised with it.

    The original's class is `SAUE` in `src/modules/heads.py` of LooperXX/ManagerTower. Rows whose features are all
    zero (the tokens outside the `grid` span, see features.py) stay zero: LayerNorm would turn them into its bias.
    """

    def __init__(self, num_layers: int, width: int, jitter: float = 0.0):
        super().__init__()
        self.jitter = jitter
        self.num_layers, self.width = num_layers, width  # plain ints: ZeRO-3 empties partitioned parameters
        self.norms = nn.ModuleList(_CastLayerNorm(width) for _ in range(num_layers))
        self.layer_scores = nn.Parameter(torch.empty(num_layers, width))
        self.temperature = nn.Parameter(torch.empty(1))
        self.gate = nn.Parameter(torch.empty(width))
        with torch.no_grad():
            init_manager_weights(self)

    def layer_weights(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax weights over the layers: `(N, D)`, or in training (with noise) the shape of `like` (..., N, D)."""
        scores = self.layer_scores.float()
        if self.training and like is not None:
            noise = torch.randn(like.shape, device=scores.device, dtype=torch.float32) / self.num_layers
            scores = scores + noise
        return torch.softmax(scores / self.temperature.float(), dim=-2)

    def forward(self, features: torch.Tensor, **_context) -> torch.Tensor:
        # features: (..., N, D) -> (..., D)
        normed = torch.stack([norm(features[..., n, :]) for n, norm in enumerate(self.norms)], dim=-2)  # (..., N, D)
        weights = self.layer_weights(like=normed).to(features.dtype)
        gate = _jittered(self.gate, self.jitter, self.training).to(features.dtype)
        output = (weights * normed).sum(-2) * gate  # (..., D)
        is_managed = features.flatten(-2).ne(0).any(-1, keepdim=True)  # (..., 1): False outside the grid span
        return output * is_managed.to(output.dtype)

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, width={self.width}, jitter={self.jitter}"


_QUERY_OF_TYPE = {"adaptive": None, "adaptive_last": "last", "adaptive_average": "average", "adaptive_cross": "cross"}


class ManagerStack(nn.Module):
    """All parameters llava-manager adds to a model, under one submodule (`model.model.manager`).

    `managers[i]` serves decoder layer `config.llm_layers[i]` (`injection="llm"`), or is the single vision-space
    Manager (`injection="projector"`). The static and adaptive Manager at LLM layer 0 uses the first N-1 vision
    layers (as released); bridge and tower Managers read their layers at every injection point.
    """

    def __init__(self, config: ManagerConfig, width: int):
        super().__init__()
        self.config = config
        num_layers = len(config.vision_layers)
        self.layer_embedding = LayerEmbedding(num_layers, width) if config.layer_embedding else None
        if config.injection == "projector":
            managers = [self._make_manager(config, num_layers, width, index=0, llm_layer=None)]
        else:
            managers = [
                self._make_manager(config, num_layers, width, index, llm_layer)
                for index, llm_layer in enumerate(config.llm_layers)
            ]
        self.managers = nn.ModuleList(managers)

    @staticmethod
    def _make_manager(config: ManagerConfig, num_layers: int, width: int, index: int, llm_layer: int | None):
        """The Manager serving `llm_layer` (None: the vision-space one), the `index`-th of the stack."""
        if config.manager_type == "bridge":
            layer = config.vision_layers.index(config.bridge_layers[index])
            return BridgeManager(num_layers, width, layer, config.jitter)
        if config.manager_type == "tower":
            return TowerManager(num_layers, width, config.jitter)
        if llm_layer == 0:  # the released static and adaptive types: all selected layers but the last at layer 0
            return StaticManager(num_layers - 1, width, config.jitter)
        if config.is_adaptive:
            return AdaptiveManager(num_layers, width, _QUERY_OF_TYPE[config.manager_type], config.jitter)
        return StaticManager(num_layers, width, config.jitter)

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
