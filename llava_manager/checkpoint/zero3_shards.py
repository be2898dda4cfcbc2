"""ZeRO-3 loading one checkpoint shard at a time.

Under ZeRO-3, transformers (5.15 .. 5.25) reads *every* shard of a checkpoint into one merged state dict and only then
copies the values into the partitioned model (`PreTrainedModel._load_pretrained_model`, its ZeRO-3 branch). The
tensors it reads are memory maps of the files, so the process that copies (rank 0; every rank on 5.15) keeps the whole
checkpoint mapped until the load ends: its RSS grows by the whole model even though the partitioned model holds only
its share. transformers' own ZeRO-3 loader (`_load_state_dict_into_zero3_model`) is written to be called shard by
shard ("each shard has only part of the full state_dict"); `shard_by_shard()` makes the ZeRO-3 branch do that:

- while the branch merges, each shard is read as keys and shapes only (meta tensors), and the file and the read's
  arguments are noted;
- the branch's one call of the loader becomes one call per shard, each with that shard read for real (with the
  arguments transformers chose: values on rank 0, meta elsewhere on 5.25) and dropped before the next is read; the
  keys missing from the checkpoint are those that every shard lacks.

Every rank walks the same shards in the same order, so the loader's collective gathers stay paired. Checkpoints
whose conversion merges keys across tensors (transformers' `WeightConverter`, e.g. fused MoE experts; not LLaVA-OV)
are loaded the merged way, as transformers does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field


@dataclass
class _ShardReads:
    """The shards the ZeRO-3 branch asked for, in order, with the arguments of each read."""

    reads: list[tuple[str, dict]] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)


def read_shard(load_state_dict, checkpoint_file: str, kwargs: dict) -> dict:
    """One shard's state dict, as transformers reads it (`load_state_dict(checkpoint_file, **kwargs)`)."""
    return load_state_dict(checkpoint_file, **kwargs)


@contextlib.contextmanager
def shard_by_shard():
    """Inside this context, a ZeRO-3 `from_pretrained` copies a sharded checkpoint into the partitioned model one
    shard at a time (see the module's docstring). Outside ZeRO-3, or for a single-file checkpoint, nothing changes."""
    from transformers import modeling_utils

    load_state_dict = modeling_utils.load_state_dict
    load_into_zero3 = modeling_utils._load_state_dict_into_zero3_model
    noted = _ShardReads()

    def note_shard(checkpoint_file, map_location="cpu", **kwargs):
        """Keys and shapes now; the values when the shard's turn comes."""
        state_dict = load_state_dict(checkpoint_file, map_location="meta", **kwargs)
        noted.reads.append((checkpoint_file, {"map_location": map_location, **kwargs}))
        noted.keys.update(state_dict)
        return state_dict

    def load_each_shard(model, state_dict, load_config=None):
        from_noted_shards = len(noted.reads) > 1 and set(state_dict) == noted.keys
        if not from_noted_shards:
            if noted.reads:  # one shard: read its values (noted as meta) and load it as transformers would
                state_dict = read_shard(load_state_dict, *noted.reads[0])
            return load_into_zero3(model, state_dict, load_config)
        if _merges_across_keys(load_config):
            merged = {}
            for read in noted.reads:
                merged.update(read_shard(load_state_dict, *read))
            return load_into_zero3(model, merged, load_config)
        del state_dict  # the meta tensors of every shard
        error_msgs, missing_keys = [], None
        for read in noted.reads:
            shard = read_shard(load_state_dict, *read)
            shard_errors, shard_missing = load_into_zero3(model, shard, load_config)
            del shard  # unmaps the file before the next one is read
            error_msgs.extend(shard_errors)
            missing_keys = set(shard_missing) if missing_keys is None else missing_keys & set(shard_missing)
        return error_msgs, missing_keys

    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    modeling_utils.load_state_dict = note_shard
    modeling_utils._load_state_dict_into_zero3_model = load_each_shard
    try:
        yield
    finally:
        modeling_utils.load_state_dict = load_state_dict
        modeling_utils._load_state_dict_into_zero3_model = load_into_zero3


def _merges_across_keys(load_config) -> bool:
    """True when the checkpoint's conversion combines several tensors into one (needs them all at once)."""
    mapping = getattr(load_config, "weight_mapping", None) or []
    try:
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # pragma: no cover  (transformers without conversions)
        return False
    return any(isinstance(entry, WeightConverter) for entry in mapping)
