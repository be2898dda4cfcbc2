"""`llava_manager`: LLaVA-OV(-Manager) models in lmms-eval, evaluated like the paper.

Loads a checkpoint with `llava_manager.from_pretrained` (our HF format, or the released
LLaVA-NeXT-format ones, converted), builds the authors' `qwen_1_5` prompt (see `prompt.py`),
generates greedily unless the task asks otherwise, and returns only the new tokens.
Data parallel over processes through lmms-eval's `Accelerator` handling
(`accelerate launch --num_processes N -m lmms_eval ...`): every process holds a full replica
and lmms-eval shards the requests by `rank` / `world_size`.

Model args (`--model_args k=v,...`):
    pretrained       local dir or Hub id (required)
    subfolder        e.g. "Baseline + Grid + Manager" (quote the whole --model_args)
    revision         Hub revision
    conv_template    qwen_1_5 (default; also qwen_2, the same template)
    model_name       accepted for the authors' command lines (llava_qwen_manager, llava_qwen);
                     the architecture is read from the checkpoint
    dtype            float16 | bfloat16 | float32 | auto (the checkpoint's); alias torch_dtype.
                     Default: float16 on CUDA, as the authors' evaluation (LLaVA-NeXT's loader
                     defaults to fp16 and their lmms-eval model casts images to fp16), else float32
    device, device_map, attn_implementation, use_cache
    batch_size       requests per generate() call, left-padded (--batch_size sets it too)
    max_new_tokens   default when the task sets none (1024, as the authors' model)
    apply_until      cut answers at the task's `until` strings (default False: the authors'
                     model ignored `until` and stopped at the end-of-turn token)
    log_every        log the prompt of every N-th document at DEBUG (default 100; doc 0 always)
    max_frames_num   frames per video (default 32, as lmms-eval's llava_onevision model)
    zero3            true: partition the weights across the processes with DeepSpeed ZeRO-3 (a model too
                     large for one device; see `eval/zero3.py`). Scored (loglikelihood) video tasks are
                     refused with several processes

Video tasks: a visual that is a path (a video file, decoded with PyAV: the `video` extra, or a folder of
frame images) is one video, sampled as lmms-eval's `llava_onevision` model samples it: exactly
`max_frames_num` frames at `np.linspace(0, total - 1, max_frames_num, dtype=int)`. Its placeholder is
`<video>` (LLaVA-NeXT wrote `<image>` with `modalities=["video"]`; the HF processor needs `<video>`).
A task whose metadata says `task_type: video` with `sample_frames: N` and gives frames as images gets them
as one video of N frames, sampled the same way. A video that cannot be read is an error naming the document.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from accelerate import Accelerator, DistributedType
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from tqdm import tqdm

from ..chat import context_limit, fit_answer_length
from ..errors import VideoError
from ..media import VIDEO_FRAMES, frame_indices, load_video
from . import zero3 as zero3_sharding
from .prompt import CONV_TEMPLATES, build_prompt, get_template, with_image_placeholders

# Arguments of lmms-eval's `llava_onevision` model that the authors' scripts could pass; they
# configure LLaVA-NeXT's own loader or video path and mean nothing here.
_LEGACY_IGNORED_ARGS = {
    "truncation",
    "truncate_context",
    "customized_config",
    "mm_spatial_pool_stride",
    "mm_spatial_pool_mode",
    "token_strategy",
    "video_decode_backend",
}
# generate() keyword arguments a task YAML may set that we pass through as they are.
_PASSTHROUGH_GEN_KWARGS = {"top_k", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "min_new_tokens"}
# Task keys that configure other models' preprocessing (LLaVA-1.5's image_aspect_ratio, ...).
_IGNORED_GEN_KWARGS = {"image_aspect_ratio", "modalities"}

_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "", "none"):
        return False
    raise ValueError(f"llava_manager: {name}={value!r}: use true or false")


def _as_str(value: Any) -> str | None:
    """lmms-eval turns numeric-looking model args into numbers; names are strings."""
    if value is None:
        return None
    text = str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text or None


def _parse_dtype(value: Any):
    if value is None or isinstance(value, torch.dtype):
        return value
    text = str(value).lower()
    if text == "auto":
        return "auto"
    try:
        return _DTYPES[text]
    except KeyError:
        raise ValueError(f"dtype={value!r}: use auto, bfloat16, float16 or float32") from None


def load_model_and_processor(pretrained: str, subfolder: str | None = None, revision: str | None = None, **hf_kwargs):
    """`llava_manager.from_pretrained`: an HF-format directory (`save_pretrained` of a patched model and its
    processor) or Hub repo, or a released LLaVA-NeXT-format checkpoint (converted once and cached)."""
    from llava_manager import from_pretrained

    return from_pretrained(pretrained, subfolder=subfolder, revision=revision, **hf_kwargs)


class LlavaManager(lmms):
    """lmms-eval model for LLaVA-OneVision with or without Managers (arXiv 2506.11515)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        subfolder: str | None = None,
        revision: str | None = None,
        conv_template: str = "qwen_1_5",
        model_name: str | None = None,
        dtype: Any = None,
        torch_dtype: Any = None,
        device: str | None = None,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        use_cache: bool = True,
        max_new_tokens: int = 1024,
        apply_until: bool = False,
        log_every: int = 100,
        max_frames_num: int = VIDEO_FRAMES,
        zero3: bool | str = False,
        **kwargs,
    ) -> None:
        super().__init__()
        ignored = sorted(set(kwargs) & _LEGACY_IGNORED_ARGS)
        unknown = sorted(set(kwargs) - _LEGACY_IGNORED_ARGS)
        if unknown:
            raise ValueError(f"llava_manager: unknown model args {unknown}; see `help(llava_manager.eval.model)`")
        if ignored:
            eval_logger.warning(f"llava_manager: ignoring {ignored} (options of LLaVA-NeXT's loader, not used here)")

        self.conv_template = _as_str(conv_template) or "qwen_1_5"
        get_template(self.conv_template)  # fail early on an unknown template
        self.model_name = _as_str(model_name)
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"llava_manager: batch_size must be an integer, got {batch_size!r}") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError("llava_manager: batch_size must be >= 1")
        self.use_cache = bool(use_cache)
        self.max_new_tokens = int(max_new_tokens)
        self.apply_until = bool(apply_until)
        self.log_every = max(int(log_every), 1)
        self.max_frames_num = int(max_frames_num)
        if self.max_frames_num < 1:
            raise ValueError(f"llava_manager: max_frames_num must be >= 1, got {max_frames_num!r}")

        # Data parallel: one full replica per process; lmms-eval shards requests by rank.
        # `accelerate launch` sets up the Accelerator; under `torchrun` on CPU it may report a
        # single process, so the launcher's RANK / WORLD_SIZE / LOCAL_RANK count too.
        accelerator = Accelerator()
        self.accelerator = accelerator
        if accelerator.num_processes > 1:
            rank, local_rank, world_size = (
                accelerator.process_index,
                accelerator.local_process_index,
                accelerator.num_processes,
            )
        else:
            rank, local_rank, world_size = (
                int(os.environ.get(key, default))
                for key, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1))
            )
        if world_size > 1:
            self._device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
            if device_map not in (None, ""):
                eval_logger.warning(
                    "llava_manager: device_map is ignored with several processes (one replica per process)"
                )
            device_map = None
            if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
                eval_logger.warning(
                    "llava_manager: evaluation replicates the model on every process; DeepSpeed/FSDP sharding is not used"
                )
            self._rank, self._world_size = rank, world_size
        else:
            self._device = (
                torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
            )
            self._rank, self._world_size = 0, 1

        dtype = _parse_dtype(torch_dtype if torch_dtype is not None else dtype)
        if dtype is None:
            dtype = torch.float16 if self._device.type == "cuda" else torch.float32
        self.zero3 = _as_bool(zero3, "zero3")
        self._zero3_config = None
        if self.zero3:
            if device_map not in (None, ""):
                raise ValueError("llava_manager: zero3=true partitions the weights; drop device_map")
            if dtype is None or isinstance(dtype, str):
                raise ValueError("llava_manager: zero3=true needs a dtype (float32, bfloat16 or float16), not auto")
            self._zero3_config = zero3_sharding.start(dtype)  # transformers loads partitioned while it is alive
        hf_kwargs: dict[str, Any] = {"dtype": dtype}
        if attn_implementation:
            hf_kwargs["attn_implementation"] = _as_str(attn_implementation)
        if device_map not in (None, ""):
            hf_kwargs["device_map"] = _as_str(device_map)

        self.pretrained = _as_str(pretrained)
        if not self.pretrained:
            raise ValueError("llava_manager: pretrained=PATH_OR_HUB_ID is required")
        self._model, self._processor = load_model_and_processor(
            self.pretrained, subfolder=_as_str(subfolder), revision=_as_str(revision), **hf_kwargs
        )
        self._model.eval()
        if self.zero3:
            self._model = zero3_sharding.partition(self._model, self._zero3_config)
        elif "device_map" not in hf_kwargs:
            self._model.to(self._device)
        self._config = self._model.config

        tokenizer = self._processor.tokenizer
        tokenizer.padding_side = "left"  # batched generation: the new tokens all start at the same column
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._tokenizer = tokenizer
        self._eos_token_ids = self._stop_token_ids()

        self.cut_answers = 0  # answers cut short to fit the context (counted, logged at the end of each call)
        self._report_model()

    # ---- lmms-eval's expected properties ---------------------------------------------------------

    @property
    def model(self):
        return self._model

    @property
    def processor(self):
        return self._processor

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def config(self):
        return self._config

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_token_id

    # ---- setup helpers -------------------------------------------------------------------------

    def _stop_token_ids(self) -> list[int]:
        """End of turn (`<|im_end|>`), the tokenizer's EOS and the checkpoint's generation EOS."""
        ids: list[int] = []
        configured = getattr(self._model.generation_config, "eos_token_id", None)
        for value in ([configured] if isinstance(configured, int) else list(configured or [])) + [
            self._tokenizer.eos_token_id
        ]:
            if value is not None and value not in ids:
                ids.append(int(value))
        unk = self._tokenizer.unk_token_id
        for token in ("<|im_end|>",):
            token_id = self._tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != unk and token_id not in ids:
                ids.append(token_id)
        return ids

    def _report_model(self) -> None:
        from llava_manager import is_patched

        has_managers = bool(is_patched(self._model))
        if self.rank == 0:
            eval_logger.info(
                f"llava_manager: {type(self._model).__name__} from {self.pretrained} "
                f"(managers: {has_managers}, dtype: {self._model.dtype}, device: {self._device}, "
                f"processes: {self._world_size}, conv_template: {self.conv_template})"
            )
        if self.zero3:
            partitioned = all(p.numel() == 0 or hasattr(p, "ds_id") for p in self._model.parameters())
            eval_logger.info(
                f"llava_manager: rank {self.rank}: ZeRO-3, weights partitioned over {self._world_size} process(es): "
                f"{partitioned}"
            )
        if self.model_name and "manager" in self.model_name.lower() and not has_managers:
            warnings.warn(
                f"model_name={self.model_name!r} names a Manager model but {self.pretrained} has no Managers",
                stacklevel=2,
            )

    # ---- requests ------------------------------------------------------------------------------

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int, metadata: dict | None = None):
        """(images, videos) of one document: PIL images, and `(F, H, W, 3)` frame arrays. `metadata` is the
        request's (lmms-eval copies the task's `metadata` into it)."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        if visuals is None:
            return [], []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        metadata = metadata or {}
        if metadata.get("task_type") == "video" and "sample_frames" in metadata:  # frames given as images
            import numpy as np

            frames = [visual.convert("RGB") for visual in visuals]
            picks = frame_indices(len(frames), int(metadata["sample_frames"]), exact=True, floor=True)
            return [], [np.stack([np.asarray(frames[i]) for i in picks])]
        images, videos = [], []
        for visual in visuals:
            if isinstance(visual, (str, os.PathLike)):
                try:
                    videos.append(load_video(visual, self.max_frames_num, exact=True, floor=True))
                except VideoError as error:
                    raise VideoError(f"{task} doc {doc_id}: {error}") from None
            elif hasattr(visual, "convert"):
                images.append(visual.convert("RGB"))
            else:
                raise NotImplementedError(
                    f"llava_manager evaluates image and video tasks; {task} gives {type(visual).__name__} visuals"
                )
        return images, videos

    def _inputs(self, prompts: list[str], images: list, videos: list | None = None):
        if videos and getattr(self._processor, "video_processor", None) is None:
            raise VideoError("video tasks need the processor's video processor: pip install 'llava-manager[video]'")
        inputs = self._processor(
            text=prompts, images=images or None, videos=videos or None, return_tensors="pt", padding=True
        )
        device = self._model.device if self._model.device.type != "meta" else self._device
        inputs = inputs.to(device)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(self._model.dtype)
        return inputs

    # ---- ZeRO-3 across processes: every rank makes the same model calls (eval/zero3.py) -------------------

    @property
    def _in_lockstep(self) -> bool:
        return self.zero3 and self._world_size > 1

    def _no_grad(self):
        """inference_mode, or no_grad under ZeRO-3 (its gathered weights must stay ordinary tensors)."""
        return torch.no_grad() if self.zero3 else torch.inference_mode()

    def _refuse_videos_in_lockstep(self, media, tasks, doc_ids) -> None:
        """Scored (loglikelihood) requests run plain forwards, which keep only images in step across ranks."""
        if not self._in_lockstep:
            return
        for (_, videos), task, doc_id in zip(media, tasks, doc_ids):
            if videos:
                raise VideoError(
                    f"{task} doc {doc_id}: loglikelihood video tasks are not supported with zero3=true on several "
                    "processes (ranks with and without videos fall out of step in a forward); evaluate them without "
                    "zero3 (one replica per process) or on one process"
                )

    def _idle_generate(self) -> None:
        """A one-token generate() on a text-only prompt (its answer is dropped), to keep the ranks in step."""
        inputs = self._inputs([build_prompt("Hi", 0, self.conv_template)], [])
        with self._no_grad():
            self._model.generate(
                **inputs, max_new_tokens=1, do_sample=False, pad_token_id=self._tokenizer.pad_token_id
            )

    def _idle_forward(self) -> None:
        inputs = self._inputs([build_prompt("Hi", 0, self.conv_template)], [])
        with self._no_grad():
            self._model(**inputs)

    def _log(self, task: str, doc_id: int, what: str, text: str) -> None:
        if self.rank == 0 and doc_id % self.log_every == 0:
            eval_logger.debug(f"{what} for {task} doc {doc_id}:\n{text}")

    def _generation_kwargs(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        gen_kwargs = dict(gen_kwargs or {})  # the task's dict is shared by all its requests
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        do_sample = bool(gen_kwargs.pop("do_sample", False))
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens)),
            "num_beams": int(gen_kwargs.pop("num_beams", 1) or 1),
            "do_sample": do_sample,
            "use_cache": self.use_cache,
            "pad_token_id": self._tokenizer.pad_token_id,
            "eos_token_id": self._eos_token_ids,
        }
        temperature, top_p = gen_kwargs.pop("temperature", None), gen_kwargs.pop("top_p", None)
        if do_sample:  # greedy otherwise, whatever temperature the task names (as the authors' model)
            if temperature:
                kwargs["temperature"] = float(temperature)
            if top_p:
                kwargs["top_p"] = float(top_p)
        for key in list(gen_kwargs):
            if key in _PASSTHROUGH_GEN_KWARGS:
                kwargs[key] = gen_kwargs.pop(key)
            elif key in _IGNORED_GEN_KWARGS:
                gen_kwargs.pop(key)
        if gen_kwargs:
            eval_logger.debug(f"llava_manager: ignoring generation kwargs {sorted(gen_kwargs)}")
        return kwargs, until

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        def _sort_key(args):  # longest first: a batch pads to its first prompt, OOMs show early
            return -len(self._tokenizer.encode(args[0])), args[0]

        task_metadata = {request.metadata.get("task"): request.metadata for request in requests}  # sample_frames
        collator = utils.Collator([request.args for request in requests], _sort_key, grouping=True)
        progress = tqdm(total=len(requests), disable=(self.rank != 0), desc="Model Responding")
        results: list[GenerationResult] = []
        chunks = list(collator.get_batched(n=self.batch_size, batch_fn=None))
        if self._in_lockstep:  # one generate() per chunk (checked below); every rank must make as many
            most = zero3_sharding.most_calls(len(chunks), self._device)
        calls = 0
        for chunk in chunks:
            contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
            media = [
                self._visuals(fn, task, split, doc_id, task_metadata.get(task))
                for fn, task, split, doc_id in zip(doc_to_visuals, tasks, splits, doc_ids)
            ]
            groups = _same_frame_count(media, tasks, doc_ids)  # one pixel_values_videos tensor per generate()
            if self._in_lockstep and len(groups) > 1:  # every rank agreed on one generate() per chunk
                raise VideoError(
                    f"{', '.join(f'{t} doc {d}' for t, d in zip(tasks, doc_ids))}: videos of different frame counts "
                    "in one batch; with zero3=true on several processes use batch_size=1"
                )
            answers: dict[int, GenerationResult] = {}
            for rows in groups:
                batch = [(contexts[r], media[r], tasks[r], doc_ids[r]) for r in rows]
                answers.update(zip(rows, self._answer(batch, all_gen_kwargs[0])))  # grouped: the same kwargs
                calls += 1
            for row in range(len(chunk)):
                results.append(answers[row])
                self.cache_hook.add_partial("generate_until", (contexts[row], all_gen_kwargs[0]), answers[row].text)
            progress.update(len(chunk))
        progress.close()
        if self._in_lockstep:
            idle = zero3_sharding.catch_up(calls, most, self._idle_generate)
            eval_logger.debug(f"llava_manager: rank {self.rank}: {calls} generate calls, {idle} idle")
        if self.cut_answers:
            eval_logger.warning(
                f"llava_manager: {self.cut_answers} answer(s) so far were cut short to fit the model's context "
                f"({context_limit(self._model)} positions)"
            )
        return collator.get_original(results)

    def _answer(
        self, batch: list[tuple[str, tuple[list, list], str, int]], gen_kwargs: dict
    ) -> list[GenerationResult]:
        """Generate for `batch` = [(context, (images, videos), task, doc_id)] in one left-padded generate() call."""
        contexts, media, tasks, doc_ids = zip(*batch)
        prompts = [
            build_prompt(context, len(images), self.conv_template, num_videos=len(videos))
            for context, (images, videos) in zip(contexts, media)
        ]
        for prompt, task, doc_id in zip(prompts, tasks, doc_ids):
            self._log(task, doc_id, "Prompt", prompt)
        generate_kwargs, until = self._generation_kwargs(gen_kwargs)
        inputs = self._inputs(
            prompts,
            [image for images, _ in media for image in images],
            [video for _, videos in media for video in videos],
        )
        generate_kwargs["max_new_tokens"] = self._fit_answer(inputs, generate_kwargs["max_new_tokens"], tasks, doc_ids)
        with self._no_grad():
            output_ids = self._model.generate(**inputs, **generate_kwargs)
        new_tokens = output_ids[:, inputs["input_ids"].shape[1] :]  # decode only what the model added
        texts = self._tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        answers = []
        for row, (text, task, doc_id) in enumerate(zip(texts, tasks, doc_ids)):
            if self.apply_until:
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
            text = text.strip()
            self._log(task, doc_id, "Answer", text)
            counts = TokenCounts(
                input_tokens=int(inputs["attention_mask"][row].sum()),
                output_tokens=self._count_generated(new_tokens[row]),
            )
            answers.append(GenerationResult(text=text, token_counts=counts))
        return answers

    def _fit_answer(self, inputs, max_new_tokens: int, tasks, doc_ids) -> int:
        """The batch's answer length, cut (counted in `cut_answers`, logged) so the longest prompt plus its answer
        fit the context; a prompt that fills the context alone is a `RequestError` naming the documents."""
        limit = context_limit(self._model)
        prompt_tokens = int(inputs["attention_mask"].sum(dim=1).max())
        where = ", ".join(f"{task} doc {doc_id}" for task, doc_id in zip(tasks, doc_ids))
        fitted = fit_answer_length(prompt_tokens, max_new_tokens, limit, what=f"the prompt of {where}")
        if fitted < max_new_tokens:
            self.cut_answers += len(doc_ids)
        return fitted

    def _count_generated(self, tokens: torch.Tensor) -> int:
        """Generated tokens up to and including the first stop token (the rest is padding)."""
        stops = torch.isin(tokens, torch.tensor(self._eos_token_ids, device=tokens.device))
        if stops.any():
            return int(stops.nonzero()[0, 0]) + 1
        return int(tokens.numel())

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of the continuation's log-probabilities after the qwen_1_5 prompt, and whether
        greedy decoding would produce it. The continuation is scored as the assistant turn,
        closed by `<|im_end|>\\n`, like the authors' model (which returned the mean loss instead)."""
        template = get_template(self.conv_template)
        results = []
        if self._in_lockstep:  # one forward per request; every rank must make as many
            most = zero3_sharding.most_calls(len(requests), self._device)
        for request in tqdm(requests, disable=(self.rank != 0), desc="Model Responding"):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            images, videos = self._visuals(doc_to_visual, task, split, doc_id, request.metadata)
            self._refuse_videos_in_lockstep([(images, videos)], [task], [doc_id])
            question = with_image_placeholders(context, len(images), len(videos))
            prompt = template.render([(0, question)])
            full = template.render([(0, question), (1, str(continuation))], add_generation_prompt=False)
            self._log(task, doc_id, "Prompt", full)
            context_length = self._inputs([prompt], images, videos)["input_ids"].shape[1]
            inputs = self._inputs([full], images, videos)
            labels = inputs["input_ids"].clone()
            labels[:, :context_length] = -100
            with self._no_grad():
                logits = self._model(**inputs).logits.float()
            # position t predicts token t+1
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = labels[:, 1:]
            mask = targets != -100
            token_log_probs = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            total = float((token_log_probs * mask).sum())
            greedy = bool((log_probs.argmax(-1)[mask] == targets[mask]).all())
            results.append((total, greedy))
        if self._in_lockstep:
            idle = zero3_sharding.catch_up(len(requests), most, self._idle_forward)
            eval_logger.debug(f"llava_manager: rank {self.rank}: {len(requests)} forwards, {idle} idle")
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("llava_manager does not implement multi-round generation")


def _same_frame_count(media: list[tuple[list, list]], tasks, doc_ids) -> list[list[int]]:
    """Rows of a batch split so that every group's videos have one frame count (`pixel_values_videos` is one
    tensor); rows without a video join the first group. Order is kept within each group."""
    groups: dict[int | None, list[int]] = {}
    for row, (_, videos) in enumerate(media):
        counts = {len(video) for video in videos}
        if len(counts) > 1:
            raise VideoError(
                f"{tasks[row]} doc {doc_ids[row]}: its videos have {sorted(counts)} frames; one request's videos "
                "must share a frame count (pixel_values_videos is one tensor)"
            )
        groups.setdefault(counts.pop() if counts else None, []).append(row)
    without_video = groups.pop(None, [])
    ordered = list(groups.values()) or [[]]
    ordered[0] = sorted(ordered[0] + without_video)
    return ordered


__all__ = ["CONV_TEMPLATES", "LlavaManager", "load_model_and_processor"]
