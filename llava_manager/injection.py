"""The LLM injection site: hooks that add each Manager's output before its decoder layer.

Per forward of the `LlavaOnevisionModel`:
1. the `ForwardScope` (forward_state.py) opens this forward's state with its inputs (`input_ids` or
   `inputs_embeds`, `mm_encoder_outputs`, the KV cache);
2. `get_image_features` / `get_video_features` (ours, see features.py, video.py) run inside that forward and leave
   their output in the state, or ran before it in `generate()` and arrive through `mm_encoder_outputs`;
3. a pre-hook on the language model builds the `InjectionPlan`: where the image and video tokens are,
   their multi-layer features, and (adaptive Managers) where each sample's instruction is;
4. a pre-hook on each chosen decoder layer returns `h + delta` (out of place) at those tokens;
5. the scope closes the state when the forward ends (also on errors).
Decode steps (a filled KV cache and no image token) skip all Manager work; every other forward runs
every Manager, on empty tensors for text-only batches, so ZeRO-3 ranks stay in step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint_replay import plan_for_layer
from .errors import ManagerError
from .forward_state import ForwardScope, ForwardState
from .managers import AdaptiveManager, ManagerStack, QueryContext
from .zero3_sync import idle_image_features, in_multi_rank_zero3

_ADAPTIVE_NEEDS_WHOLE_PROMPT = (
    "adaptive Managers read the whole instruction around the image in the forward that holds the image, so the "
    "prompt cannot be split: image tokens arrived after a filled KV cache (chunked prefill, or a cache reused "
    "across turns). Generate with prefill_chunk_size=None and pass the whole conversation without a KV "
    "cache (cache= / past_key_values=), or use static Managers."
)


def check_prefill_chunking(model, prefill_chunk_size) -> None:
    """Raise `ManagerError` before `generate()` starts when adaptive Managers would be fed a chunked prefill."""
    stack = getattr(model.model, "manager", None)
    if prefill_chunk_size is not None and stack is not None and stack.config.is_adaptive:
        raise ManagerError(
            f"prefill_chunk_size={prefill_chunk_size} with {stack.config.manager_type} Managers: "
            + _ADAPTIVE_NEEDS_WHOLE_PROMPT
        )


@dataclass
class InjectionPlan:
    """Everything the decoder-layer hooks need, computed once per forward.

    positions (`(T,)`): flat indices (`batch * seq_len + pos`) of the managed image and video tokens, ascending.
    features (`(T, N, D)`): their multi-layer features (zero rows outside the `grid` span).
    token_sample (`(T,)`): the sample of each image token.
    query (`_QueryPlan`, *optional*): the adaptive Managers' instruction positions.
    span (`tuple[int, int]`, *optional*): `positions` as `range(start, stop)` when they are consecutive.
    """

    positions: torch.Tensor
    features: torch.Tensor
    token_sample: torch.Tensor
    query: _QueryPlan | None = None
    span: tuple[int, int] | None = None  # (start, stop) when `positions` is one run of consecutive indices
    grad_enabled: bool = True  # autograd was on when the plan was built (checkpoint_replay.py)


@dataclass
class _QueryPlan:
    positions: torch.Tensor  # (Q,) flat indices of the instruction tokens of all samples
    query_sample: torch.Tensor  # (Q,)
    query_last: torch.Tensor  # (B,)
    segments: list[tuple[int, int]]


class LLMInjection:
    """Installs and owns the hooks of `injection="llm"` on one `LlavaOnevisionModel`."""

    def __init__(self, llava_model, stack: ManagerStack, scope: ForwardScope):
        self.llava_model = llava_model
        self.stack = stack
        self.scope = scope  # the per-forward state (forward_state.py)
        self.config = stack.config
        self._handles = []
        try:  # a failure part-way removes the hooks already installed
            self._handles.append(llava_model.language_model.register_forward_pre_hook(self._plan, with_kwargs=True))
            layers = llava_model.language_model.layers
            for index, llm_layer in enumerate(self.config.llm_layers):
                hook = self._make_layer_hook(index)
                self._handles.append(layers[llm_layer].register_forward_pre_hook(hook, with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---- 3: the plan ---------------------------------------------------------------------------------
    def _plan(self, module, args, kwargs):
        state = self.scope.current()
        if state is None:  # the language model called on its own: nothing to inject
            return None
        hidden = kwargs.get("inputs_embeds")
        if hidden is None:
            return None
        image = self._media(state, hidden, "image")  # (mask (B, L), per-token features (T_i, N * D) or None)
        video = self._media(state, hidden, "video") if self.config.video else None
        media_mask = image[0] if video is None else image[0] | video[0]  # (B, L) bool
        batch, seq_len = media_mask.shape
        has_media = bool(media_mask.any())
        if not has_media and _cache_length(state.cache) > 0:
            state.plan = None  # a decode step: no Manager work at all
            return None

        if has_media and self.config.is_adaptive and _cache_length(state.cache) > 0:
            raise ManagerError(_ADAPTIVE_NEEDS_WHOLE_PROMPT)

        num_layers = len(self.config.vision_layers)
        width = hidden.shape[-1]
        if has_media:
            positions, features = _merge_media([m for m in (image, video) if m is not None and m[1] is not None])
            features = features.view(-1, num_layers, width).to(hidden.device, hidden.dtype)  # (T, N, D)
        else:  # text-only forward: run every Manager on nothing (keeps ZeRO-3 ranks in step)
            positions = media_mask.reshape(-1).nonzero().squeeze(-1)  # (0,)
            nothing = hidden.new_zeros(0, num_layers, width)
            if not torch.is_grad_enabled() and in_multi_rank_zero3(self.llava_model):
                # inference beside ranks that may have images: run the image path on a blank image where theirs ran
                # (inside generate() already, when it encodes images before the first forward); that run passed
                # the layer embedding, as theirs did
                if state.mm_encoder_outputs is None:
                    idle_image_features(self.llava_model)
                features = nothing
            else:
                features = self.stack.embed_layers(nothing)  # through the module (ZeRO-3)
        token_sample = torch.div(positions, seq_len, rounding_mode="floor")
        query = self._query_plan(state, media_mask, hidden) if self.config.is_adaptive and has_media else None
        span = None
        if has_media:
            first, last = (int(p) for p in positions[[0, -1]].tolist())
            if last - first + 1 == positions.shape[0]:  # one block of consecutive tokens (e.g. one image, one sample)
                span = (first, last + 1)
        state.plan = InjectionPlan(
            positions=positions,
            features=features,
            token_sample=token_sample,
            query=query,
            span=span,
            grad_enabled=torch.is_grad_enabled(),
        )
        return None

    def _media(self, state: ForwardState, hidden: torch.Tensor, kind: str):
        """`(mask (B, L) of this modality's tokens, their (T, N * D) Manager features or None)`.

        Tokens whose features this forward does not have (e.g. a generated `<image>` id) count as plain tokens, as
        transformers treats them."""
        output = getattr(state, f"{kind}_output")
        if output is None and state.mm_encoder_outputs:
            output = state.mm_encoder_outputs.get(kind)
        token_id = getattr(self.llava_model.config, f"{kind}_token_id")
        mask = self._token_mask(state, hidden, token_id)
        if output is None:
            return torch.zeros_like(mask), None
        if not bool(mask.any()):
            return mask, None
        layer_features = getattr(output, "deepstack_features", None)
        if layer_features is None:
            raise RuntimeError(
                f"{kind} tokens reached a patched model without Manager features: pass the pixels, or "
                f"mm_encoder_outputs computed by this patched model's get_{kind}_features"
            )
        width = self.llava_model.config.text_config.hidden_size * len(self.config.vision_layers)
        parts = [f.reshape(-1, width) for f in layer_features[0]]
        features = _join_rows(parts, layer_features[0], getattr(output, "joined_layer_features", None))
        tokens = int(mask.sum())
        if features.shape[0] != tokens:
            raise RuntimeError(
                f"Manager features and {kind} tokens do not match: tokens {tokens}, features {features.shape[0]}"
            )
        return mask, features

    def _image_token_mask(self, state: ForwardState, hidden: torch.Tensor) -> torch.Tensor:
        return self._token_mask(state, hidden, self.llava_model.config.image_token_id)

    def _token_mask(self, state: ForwardState, hidden: torch.Tensor, token_id: int) -> torch.Tensor:
        if state.input_ids is not None:
            return (state.input_ids == token_id).to(hidden.device)
        embeds = state.inputs_embeds
        token_embedding = self.llava_model.get_input_embeddings()(
            torch.tensor(token_id, dtype=torch.long, device=embeds.device)
        )
        return (embeds == token_embedding).all(-1).to(hidden.device)

    def _query_plan(self, state: ForwardState, image_mask: torch.Tensor, hidden: torch.Tensor) -> _QueryPlan:
        """Instruction positions per sample, as the released code finds them from `<|im_start|>` (around the image
        and video tokens: `image_mask` marks both)."""
        batch, seq_len = image_mask.shape
        starts_mask = self._token_mask(state, hidden, self.config.query_token_id)
        if state.attention_mask is not None and state.attention_mask.dim() == 2:
            valid = state.attention_mask.to(torch.bool).to(hidden.device)
        else:
            valid = torch.ones_like(image_mask)
        positions, samples, lasts, segments = [], [], [], []
        image_rows = image_mask.cpu().tolist()
        start_rows = starts_mask.cpu().tolist()
        valid_rows = valid.cpu().tolist()
        for b in range(batch):
            span = instruction_positions(image_rows[b], start_rows[b], valid_rows[b])
            begin = len(positions)
            positions.extend(b * seq_len + p for p in span)
            samples.extend([b] * len(span))
            segments.append((begin, len(positions)))
            lasts.append(len(positions) - 1)
        device = hidden.device
        return _QueryPlan(
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            query_sample=torch.tensor(samples, dtype=torch.long, device=device),
            query_last=torch.tensor(lasts, dtype=torch.long, device=device),
            segments=segments,
        )

    # ---- 4: the decoder-layer hooks ----------------------------------------------------------------------
    def _make_layer_hook(self, index: int):
        manager = self.stack.managers[index]

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            state = self.scope.current()
            plan = state.plan if state is not None else None
            plan = plan_for_layer(module, hidden, plan)
            if plan is None:
                return None
            flat = hidden.reshape(-1, hidden.shape[-1])  # (B * L, D)
            if isinstance(manager, AdaptiveManager):
                delta = manager(plan.features, context=self._query_context(plan, flat))
            else:
                delta = manager(plan.features)  # (T, D)
            updated = _add_rows(flat, plan, delta.to(hidden.dtype)).view_as(hidden)
            if args:
                return (updated, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": updated}

        return hook

    def _query_context(self, plan: InjectionPlan, flat_hidden: torch.Tensor) -> QueryContext:
        visual_hidden = flat_hidden[plan.positions]  # (T, D)
        query = plan.query
        if query is None:  # text-only forward: nothing to attend to
            empty = plan.positions.new_zeros(0)
            return QueryContext(visual_hidden, visual_hidden, plan.token_sample, plan.token_sample, empty, [])
        query_hidden, query_sample = flat_hidden[query.positions], query.query_sample
        segments, lasts = query.segments, query.query_last
        if any(start == end for start, end in segments):
            # a sample without instruction tokens uses its own visual states as the query (as released)
            parts, samples, segments, last_list = [], [], [], []
            for b, (start, end) in enumerate(query.segments):
                own = query_hidden[start:end] if end > start else visual_hidden[plan.token_sample == b]
                begin = sum(p.shape[0] for p in parts)
                parts.append(own)
                samples.append(torch.full((own.shape[0],), b, dtype=torch.long, device=own.device))
                segments.append((begin, begin + own.shape[0]))
                last_list.append(begin + own.shape[0] - 1)
            query_hidden, query_sample = torch.cat(parts), torch.cat(samples)
            lasts = torch.tensor(last_list, dtype=torch.long, device=query_hidden.device)
        return QueryContext(
            hidden=visual_hidden,
            query_hidden=query_hidden,
            token_sample=plan.token_sample,
            query_sample=query_sample,
            query_last=lasts,
            query_segments=segments,
        )


class ProjectorIdleRun:
    """`injection="projector"`: the vision-space Manager runs inside get_image_features, which transformers skips
    on text-only forwards. There, in training, run it on nothing and add the (zero) result to the embeddings, so
    every rank uses every Manager parameter every step (ZeRO-3 gathers them collectively)."""

    def __init__(self, llava_model, stack: ManagerStack, scope: ForwardScope):
        self.stack = stack
        self.scope = scope
        self._handles = [llava_model.language_model.register_forward_pre_hook(self._before_llm, with_kwargs=True)]

    def _before_llm(self, module, args, kwargs):
        hidden = kwargs.get("inputs_embeds")
        state = self.scope.current()
        features_ran = state is not None and (state.image_output is not None or state.video_output is not None)
        if hidden is None or features_ran or not (self.stack.training and torch.is_grad_enabled()):
            return None
        num_layers = len(self.stack.config.vision_layers)
        nothing = hidden.new_zeros(0, num_layers, self.stack.managers[0].width)  # (0, N, C)
        zero = self.stack.managers[0](self.stack.embed_layers(nothing)).sum()
        return args, {**kwargs, "inputs_embeds": hidden + zero.to(hidden.dtype)}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def instruction_positions(is_image: list[bool], is_start: list[bool], is_valid: list[bool]) -> list[int]:
    """Positions of a sample's instruction tokens in its (expanded) sequence, as the released code finds them.

    With `p`/`e` the first / one-past-last image token and `s1`, `s2` the 2nd and 3rd `<|im_start|>` (`s2` = end
    of the sample if absent): `[s1 + 3, p - 1)` (the user text before the image, without `<|im_start|>user\\n`
    and the `\\n` before the image) plus `[e + 1, s2 - 2)` (after the image's `\\n`, before `<|im_end|>\\n`).
    Prompts with fewer than two `<|im_start|>` ("plain"): `[e, end - 1)`. Image tokens are never included.
    """
    valid = [i for i, ok in enumerate(is_valid) if ok]
    if not valid:
        return []
    begin, end = valid[0], valid[-1] + 1
    images = [i for i in range(begin, end) if is_image[i]]
    if not images:
        return []
    first, after = images[0], images[-1] + 1
    starts = [i for i in range(begin, end) if is_start[i]]
    if len(starts) < 2:
        span = list(range(after, end - 1))
    else:
        s1 = starts[1]
        s2 = starts[2] if len(starts) > 2 else end
        span = list(range(s1 + 3, first - 1)) + list(range(after + 1, s2 - 2))
    return [i for i in span if begin <= i < end and not is_image[i]]


def _add_rows(flat: torch.Tensor, plan: InjectionPlan, delta: torch.Tensor) -> torch.Tensor:
    """`flat` (B * L, D) with `delta` (T, D) added at `plan.positions`, out of place.

    Same sums as `flat.index_add(0, positions, delta)` (each row gets exactly one addition), without its scatter:
    a slice when the image tokens are consecutive, otherwise gather, add and copy back.
    """
    if plan.span is not None:
        start, stop = plan.span
        updated = flat.clone()
        updated.narrow(0, start, stop - start).add_(delta)
        return updated
    return flat.index_copy(0, plan.positions, flat.index_select(0, plan.positions) + delta)


def _merge_media(media: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (T,), features (T, N * D)) of every managed token, in sequence order, from per-modality
    `(mask (B, L), features in that modality's token order)`; no copy when one modality has them all."""
    if len(media) == 1:
        mask, features = media[0]
        return mask.reshape(-1).nonzero().squeeze(-1), features
    positions = torch.cat([mask.reshape(-1).nonzero().squeeze(-1) for mask, _ in media])
    features = torch.cat([features.to(media[0][1].device) for _, features in media])
    order = positions.argsort()
    return positions[order], features[order.to(features.device)]


def _join_rows(parts: list[torch.Tensor], received: list, joined: tuple | None) -> torch.Tensor:
    """`torch.cat(parts)` -> (T, N * D), without the copy when `received` (the per-image tensors as handed over)
    are the very tensors features.py split from one tensor (`joined`: (those parts, that tensor)). Generation may
    hand over sliced or re-arranged lists: those are concatenated."""
    if len(parts) == 1:
        return parts[0]
    if joined is not None:
        split_parts, whole = joined
        if len(split_parts) == len(received) and all(a is b for a, b in zip(split_parts, received)):
            return whole
    return torch.cat(parts, dim=0)


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    get_length = getattr(cache, "get_seq_length", None)
    if get_length is not None:
        try:
            return int(get_length())
        except TypeError:  # a cache whose get_seq_length takes the layer index without a default
            return int(get_length(0))
    return 0
