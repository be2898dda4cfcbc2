"""LLaVA's modality-length grouped sampler (`group_by_modality_length`).

Samples with images (positive lengths) and text-only samples (negative lengths) are shuffled
separately into "megabatches" of `world_size x batch_size` (world_size here already includes
gradient accumulation, as in LLaVA), each sorted by length and split evenly over the ranks; the
megabatches are then shuffled together, and the two leftovers form one mixed megabatch at the end.
So almost every global step is one modality with similar lengths. The order depends only on the
seed and the epoch, so every rank (and a resumed run) computes the same one.
"""

from __future__ import annotations

import torch


def _split_to_even_chunks(indices: list[int], lengths: list[int], num_chunks: int) -> list[list[int]]:
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def _length_grouped(lengths: list[int], batch_size: int, world_size: int, generator) -> list[int]:
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    size = world_size * batch_size
    megabatches = [indices[i : i + size] for i in range(0, len(lengths), size)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    megabatches = [_split_to_even_chunks(m, lengths, world_size) for m in megabatches]
    return [i for megabatch in megabatches for chunk in megabatch for i in chunk]


def modality_length_grouped_indices(lengths: list[int], batch_size: int, world_size: int, generator=None) -> list[int]:
    assert all(length != 0 for length in lengths), "lengths must be non-zero (sign = modality)"
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return _length_grouped([abs(x) for x in lengths], batch_size, world_size, generator)
    mm_indices, mm_lengths = zip(*[(i, x) for i, x in enumerate(lengths) if x > 0])
    lang_indices, lang_lengths = zip(*[(i, -x) for i, x in enumerate(lengths) if x < 0])
    mm_shuffle = [mm_indices[i] for i in _length_grouped(list(mm_lengths), batch_size, world_size, generator)]
    lang_shuffle = [lang_indices[i] for i in _length_grouped(list(lang_lengths), batch_size, world_size, generator)]
    size = world_size * batch_size
    mm_mega = [mm_shuffle[i : i + size] for i in range(0, len(mm_shuffle), size)]
    lang_mega = [lang_shuffle[i : i + size] for i in range(0, len(lang_shuffle), size)]
    last_mm, last_lang = mm_mega[-1], lang_mega[-1]
    additional = last_mm + last_lang
    megabatches = mm_mega[:-1] + lang_mega[:-1]
    order = torch.randperm(len(megabatches), generator=generator).tolist()
    megabatches = [megabatches[i] for i in order]
    if additional:
        megabatches.append(sorted(additional))
    return [i for megabatch in megabatches for i in megabatch]


class ModalityLengthGroupedSampler(torch.utils.data.Sampler):
    """Yields all indices once per epoch in modality-grouped order (see the module docstring)."""

    def __init__(self, batch_size: int, world_size: int, lengths: list[int], seed: int = 0):
        self.batch_size = batch_size
        self.world_size = world_size
        self.lengths = list(lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))
