"""`llava_manager.from_pretrained` on a local stand-in of the Hub repo `LooperXX/LLaVA-OV-Manager` (its four
subfolders, made from the oracle's tiny original-format checkpoints), through huggingface_hub's real cache
code path with the network off (HF_HUB_OFFLINE=1): logits equal the oracle's, a second load converts
nothing, and every bad input is a clear error that leaves nothing behind."""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hub_stand_in import (
    IMAGE_ID,
    ORACLE_DIR,
    REPO_ID,
    SUBFOLDERS,
    files_under,
    make_repo,
    oracle_prompt,
    oracle_tokenizer,
    populate_hub_cache,
    zero_managers,
)
from oracle_cases import load_case, max_logit_diff
from PIL import Image
from safetensors.torch import load_file

from llava_manager.checkpoint import conversion, files, formats, from_pretrained, source
from llava_manager.errors import ConversionError, HubError
from llava_manager.modeling import LlavaOnevisionManagerForConditionalGeneration
from llava_manager.processor import LlavaOnevisionManagerProcessor


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    repo = make_repo(root / "repo")
    cache = root / "hf-cache"
    return SimpleNamespace(repo=repo, cache=cache, commit=populate_hub_cache(cache, repo))


@pytest.fixture
def converted_dir(tmp_path):
    return tmp_path / "converted"


def load(stand_in, converted_dir, subfolder, **kwargs):
    return from_pretrained(
        REPO_ID, subfolder=subfolder, cache_dir=stand_in.cache, conversion_cache_dir=converted_dir, **kwargs
    )


def oracle_inputs(processor, case_name):
    case = load_case(case_name)
    image = Image.open(ORACLE_DIR / case_name / case.meta["image_files"][0]).convert("RGB")
    return case, processor(images=image, text=oracle_prompt(case.meta["input_ids"][0]), return_tensors="pt")


def assert_nothing_left(folder: Path):
    left = [p for p in files_under(folder) if (Path(folder) / p).is_file() or ".tmp-" in p]
    assert left == [], f"left behind: {left}"


def test_the_network_is_off():
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE


@pytest.mark.parametrize("subfolder", ["Baseline + Grid + Manager", "Baseline + Manager"])
def test_released_checkpoints_give_the_oracle_logits(stand_in, converted_dir, subfolder):
    """Raw image + prompt text -> processor -> converted model: the original code's logits (<= 1e-4, fp32)."""
    model, processor = load(stand_in, converted_dir, subfolder)
    assert isinstance(model, LlavaOnevisionManagerForConditionalGeneration) and not model.training
    assert isinstance(processor, LlavaOnevisionManagerProcessor)
    case, inputs = oracle_inputs(processor, SUBFOLDERS[subfolder][0])
    expected_ids = []
    for token in case.meta["input_ids"][0]:
        expected_ids += [IMAGE_ID] * case.meta["samples"][0]["visual_length_main"] if token == -200 else [token]
    assert inputs["input_ids"][0].tolist() == expected_ids
    with torch.no_grad():
        logits = model(**inputs).logits
    assert max_logit_diff(case, logits) <= 1e-4


@pytest.mark.parametrize("subfolder", ["Baseline + Grid + Manager", "Baseline + Manager"])
def test_generate_answers_like_the_original(stand_in, converted_dir, subfolder):
    """`model.generate(**processor(images=..., text=...))`: the first new token is the original model's greedy one."""
    model, processor = load(stand_in, converted_dir, subfolder)
    case, inputs = oracle_inputs(processor, SUBFOLDERS[subfolder][0])
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    reference = case.outputs["logits"][0, prompt_length - 1]  # the original's logits at the last prompt position
    assert (out.logits[0][0] - reference).abs().max() <= 1e-4
    assert out.sequences[0, prompt_length] == reference.argmax()
    assert isinstance(processor.decode(out.sequences[0, prompt_length:], skip_special_tokens=True), str)


@pytest.mark.parametrize("grid", [" + Grid", ""])
def test_baseline_folders_load_as_plain_llava_ov(stand_in, converted_dir, grid):
    """`Baseline*` (no Managers) equals its Manager sibling with the Managers switched off."""
    baseline, processor = load(stand_in, converted_dir, f"Baseline{grid}")
    managed, _ = load(stand_in, converted_dir, f"Baseline{grid} + Manager")
    assert baseline.config.manager is None and not hasattr(baseline.model, "manager")
    assert baseline.config.image_layout == managed.config.image_layout
    _, inputs = oracle_inputs(processor, SUBFOLDERS[f"Baseline{grid}"][0])
    zero_managers(managed)
    with torch.no_grad():
        assert torch.allclose(baseline(**inputs).logits, managed(**inputs).logits, atol=1e-5, rtol=0)


def test_a_second_load_converts_nothing(stand_in, converted_dir, monkeypatch):
    first, _ = load(stand_in, converted_dir, "Baseline + Grid + Manager")
    entries = [p for p in files_under(converted_dir) if p.endswith(files.MARKER)]
    assert len(entries) == 1 and stand_in.commit in entries[0]

    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(conversion, "convert_checkpoint", fail)
    for revision in (None, stand_in.commit):  # the branch and its commit hash share the entry
        again, _ = load(stand_in, converted_dir, "Baseline + Grid + Manager", revision=revision)
        for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    assert [p for p in files_under(converted_dir) if p.endswith(files.MARKER)] == entries


def test_revisions(stand_in, converted_dir, tmp_path):
    """A tag pointing at another commit gives another conversion; an unknown revision is a clear error."""
    old = make_repo(tmp_path / "old")
    config_file = old / "Baseline" / "config.json"
    config = json.loads(config_file.read_text())
    config["rms_norm_eps"] = 1e-5
    config_file.write_text(json.dumps(config))
    cache = tmp_path / "hf-cache"
    shutil.copytree(stand_in.cache, cache, symlinks=True)
    old_commit = populate_hub_cache(cache, old, revision="v0.9")
    assert old_commit != stand_in.commit
    now, _ = from_pretrained(REPO_ID, "Baseline", cache_dir=cache, conversion_cache_dir=converted_dir)
    then, _ = from_pretrained(REPO_ID, "Baseline", "v0.9", cache_dir=cache, conversion_cache_dir=converted_dir)
    assert now.config.text_config.rms_norm_eps == 1e-6 and then.config.text_config.rms_norm_eps == 1e-5
    with pytest.raises(HubError, match=r"revision 'v2'.*not in the local cache.*offline"):
        from_pretrained(REPO_ID, "Baseline", "v2", cache_dir=cache, conversion_cache_dir=converted_dir)


def test_local_folders_are_converted_and_cached_too(stand_in, converted_dir, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(stand_in.repo, repo)
    model, processor = from_pretrained(repo, subfolder="Baseline + Grid + Manager", conversion_cache_dir=converted_dir)
    case, inputs = oracle_inputs(processor, "static_all_anyres")
    with torch.no_grad():
        assert max_logit_diff(case, model(**inputs).logits) <= 1e-4
    calls = []
    real = conversion.convert_checkpoint
    monkeypatch.setattr(conversion, "convert_checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    from_pretrained(repo / "Baseline + Grid + Manager", conversion_cache_dir=converted_dir)
    assert calls == []  # same folder, same files: cached
    weights = repo / "Baseline + Grid + Manager" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    from_pretrained(repo / "Baseline + Grid + Manager", conversion_cache_dir=converted_dir)
    assert calls == [1]  # the weights changed: converted again


def test_a_tokenizer_from_the_caller(stand_in, converted_dir, tmp_path):
    """Checkpoints without tokenizer files take one from `tokenizer=`; another tokenizer is another conversion."""
    folder = tmp_path / "repo" / "Baseline + Manager"
    shutil.copytree(stand_in.repo / "Baseline + Manager", folder)
    shutil.copytree(stand_in.repo / "tiny-siglip-patch14-384", tmp_path / "repo" / "tiny-siglip-patch14-384")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ConversionError, match=r"no tokenizer files.*pass tokenizer="):
        from_pretrained(folder, conversion_cache_dir=converted_dir)
    assert_nothing_left(converted_dir)
    model, processor = from_pretrained(folder, conversion_cache_dir=converted_dir, tokenizer=oracle_tokenizer())
    case, inputs = oracle_inputs(processor, "static_square")
    with torch.no_grad():
        assert max_logit_diff(case, model(**inputs).logits) <= 1e-4
    other = oracle_tokenizer()
    other.add_tokens(["<extra>"])
    from_pretrained(folder, conversion_cache_dir=converted_dir, tokenizer=other)
    assert len([p for p in files_under(converted_dir) if p.endswith(files.MARKER)]) == 2


def test_hf_format_folders_load_directly(stand_in, converted_dir, tmp_path, monkeypatch):
    resolved = source.resolve(REPO_ID, "Baseline + Manager", cache_dir=stand_in.cache)
    out = conversion.convert_checkpoint(resolved, tmp_path / "hf-format")
    assert formats.detect_format(out).kind == "hf"
    monkeypatch.setattr(
        conversion, "convert_checkpoint", lambda *a, **k: pytest.fail("an HF-format folder was converted")
    )
    model, processor = from_pretrained(out, conversion_cache_dir=converted_dir)
    assert isinstance(model, LlavaOnevisionManagerForConditionalGeneration) and model.config.manager is not None
    assert processor.image_layout == {"mode": "square", "unpad": "truncate"}
    assert files_under(converted_dir) == []


def test_only_the_needed_files_are_downloaded():
    from huggingface_hub.utils import filter_repo_objects

    sub = "Baseline + Grid + Manager"
    listing = [
        ".gitattributes",
        "README.md",
        "Baseline/config.json",
        "Baseline/model.safetensors",
        *(
            f"{sub}/{name}"
            for name in (
                "config.json",
                "generation_config.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "tokenizer_config.json",
                "vocab.json",
                "merges.txt",
                "added_tokens.json",
                "special_tokens_map.json",
                "trainer_state.json",
                "training_args.bin",
                "pytorch_model.bin",
                "optimizer.pt",
                "rng_state.pth",
                "global_step100/mp_rank_00_model_states.pt",
            )
        ),
    ]
    wanted = {
        f"{sub}/{name}"
        for name in (
            "config.json",
            "generation_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer_config.json",
            "vocab.json",
            "merges.txt",
            "added_tokens.json",
            "special_tokens_map.json",
        )
    }
    assert set(filter_repo_objects(listing, allow_patterns=source.allow_patterns(sub))) == wanted
    with_pickle = set(filter_repo_objects(listing, allow_patterns=source.allow_patterns(sub, pickle=True)))
    assert with_pickle == wanted | {f"{sub}/pytorch_model.bin"}
    odd = "v2 [final] *"  # glob characters in a folder name are matched literally
    assert list(
        filter_repo_objects([f"{odd}/config.json", "v2 f */config.json"], allow_patterns=source.allow_patterns(odd))
    ) == [f"{odd}/config.json"]


# ---- bad input: a clear error, nothing left behind ------------------------------------------------------------


def test_unknown_repo_offline(converted_dir, tmp_path):
    with pytest.raises(
        HubError, match=r"'someone/nothing-here' \(revision 'main'\) is not in the local cache.*offline"
    ):
        from_pretrained("someone/nothing-here", cache_dir=tmp_path / "empty-cache", conversion_cache_dir=converted_dir)
    assert_nothing_left(converted_dir)


@pytest.mark.parametrize(
    "error, message",
    [
        ("RepositoryNotFoundError", r"Hub repo 'LooperXX/LLaVA-OV-Manager' not found.*LooperXX/LLaVA-OV-Manager"),
        ("RevisionNotFoundError", r"revision 'v9' does not exist.*branch, tag or commit"),
        ("GatedRepoError", r"is gated: accept its terms"),
    ],
)
def test_hub_errors_when_online(converted_dir, monkeypatch, error, message):
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))

    def snapshot_download(*args, **kwargs):
        raise getattr(errors, error)("from the Hub", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(HubError, match=message):
        from_pretrained(REPO_ID, "Baseline", "v9", conversion_cache_dir=converted_dir)
    assert_nothing_left(converted_dir)


def test_unknown_subfolder(stand_in, converted_dir):
    with pytest.raises(
        HubError, match=r"no config.json in subfolder 'Baseline \+ Grid \+ Managers'.*'Baseline \+ Grid \+ Manager'"
    ):
        load(stand_in, converted_dir, "Baseline + Grid + Managers")
    with pytest.raises(HubError, match=r"has no subfolder 'Grid'; checkpoints found in: \['Baseline'"):
        from_pretrained(stand_in.repo, "Grid", conversion_cache_dir=converted_dir)
    with pytest.raises(HubError, match=r"subfolder='../Baseline' is invalid"):
        load(stand_in, converted_dir, "../Baseline")
    assert_nothing_left(converted_dir)


def test_wrong_paths_and_arguments(stand_in, converted_dir, tmp_path):
    with pytest.raises(HubError, match=r"local folder './no/such/folder' does not exist"):
        from_pretrained("./no/such/folder", conversion_cache_dir=converted_dir)
    with pytest.raises(HubError, match="revision='main' applies to Hub repos"):
        from_pretrained(stand_in.repo, "Baseline", "main", conversion_cache_dir=converted_dir)
    with pytest.raises(ConversionError, match=r"no config.json.*checkpoints are in its subfolders \['Baseline'"):
        from_pretrained(stand_in.repo, conversion_cache_dir=converted_dir)
    assert_nothing_left(converted_dir)


def broken_copy(stand_in, tmp_path, subfolder="Baseline + Grid + Manager") -> Path:
    folder = tmp_path / "broken" / subfolder
    shutil.copytree(stand_in.repo / subfolder, folder)
    shutil.copytree(stand_in.repo / "tiny-siglip-patch14-384", tmp_path / "broken" / "tiny-siglip-patch14-384")
    return folder


def test_neither_format(stand_in, converted_dir, tmp_path):
    folder = broken_copy(stand_in, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    plain = {k: v for k, v in config.items() if not k.startswith("mm_")}
    (folder / "config.json").write_text(json.dumps({**plain, "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(ConversionError, match=r"neither an original LLaVA-OV.*model_type='qwen2'.*Qwen2ForCausalLM"):
        from_pretrained(folder, conversion_cache_dir=converted_dir)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="not valid JSON"):
        from_pretrained(folder, conversion_cache_dir=converted_dir)
    assert_nothing_left(converted_dir)


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "missing shard"])
def test_missing_or_corrupt_weights(stand_in, converted_dir, tmp_path, damage):
    folder = broken_copy(stand_in, tmp_path)
    weights = folder / "model.safetensors"
    if damage == "missing":
        weights.unlink()
        message = "has no weights"
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        message = "model.safetensors is not a readable safetensors file, probably truncated or corrupt"
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
        message = "probably truncated or corrupt"
    else:
        keys = list(load_file(str(weights)))
        (folder / "model.safetensors.index.json").write_text(
            json.dumps(
                {
                    "weight_map": {
                        k: "model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors"
                        for i, k in enumerate(keys)
                    }
                }
            )
        )
        weights.rename(folder / "model-00001-of-00002.safetensors")
        message = r"lists shards that are missing.*model-00002-of-00002.safetensors"
    with pytest.raises(ConversionError, match=message):
        from_pretrained(folder, conversion_cache_dir=converted_dir)
    assert_nothing_left(converted_dir)


def test_shapes_that_disagree_with_the_config_name_the_first_bad_key(stand_in, converted_dir, tmp_path):
    folder = broken_copy(stand_in, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 80  # the weights say 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConversionError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \(64, 96\).*\(64, 80\)"
    ):
        from_pretrained(folder, conversion_cache_dir=converted_dir)
    assert_nothing_left(converted_dir)


def test_pickle_weights_are_refused_unless_opted_in(stand_in, converted_dir, tmp_path):
    folder = broken_copy(stand_in, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle=True"):
        from_pretrained(folder, conversion_cache_dir=converted_dir)
    assert_nothing_left(converted_dir)

    model, processor = from_pretrained(folder, conversion_cache_dir=converted_dir, allow_pickle=True)
    case, inputs = oracle_inputs(processor, "static_all_anyres")
    with torch.no_grad():
        assert max_logit_diff(case, model(**inputs).logits) <= 1e-4


def test_pickle_only_hub_folders(stand_in, converted_dir, tmp_path, monkeypatch):
    repo = make_repo(tmp_path / "repo")
    weights = repo / "Baseline" / "model.safetensors"
    torch.save(load_file(str(weights)), weights.with_name("pytorch_model.bin"))
    weights.unlink()
    cache = tmp_path / "hf-cache"
    commit = populate_hub_cache(cache, repo)
    with pytest.raises(ConversionError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle=True"):
        from_pretrained(REPO_ID, "Baseline", cache_dir=cache, conversion_cache_dir=converted_dir)
    model, _ = from_pretrained(
        REPO_ID, "Baseline", cache_dir=cache, conversion_cache_dir=converted_dir, allow_pickle=True
    )
    assert model.config.manager is None
    shutil.rmtree(converted_dir)
    # online, the Hub's listing tells about the pickle file before it is downloaded (it is not, by default)
    monkeypatch.setattr(source, "_repo_listing", lambda *args: ["Baseline/config.json", "Baseline/pytorch_model.bin"])
    (cache / "models--LooperXX--LLaVA-OV-Manager" / "snapshots" / commit / "Baseline" / "pytorch_model.bin").unlink()
    with pytest.raises(ConversionError, match=r"only pickle weights \(pytorch_model.bin\)"):
        from_pretrained(REPO_ID, "Baseline", cache_dir=cache, conversion_cache_dir=converted_dir)
    assert_nothing_left(converted_dir)


def test_incomplete_cache_offline(converted_dir, tmp_path):
    repo = make_repo(tmp_path / "repo")
    (repo / "Baseline" / "model.safetensors").unlink()  # as if only config.json had been fetched
    cache = tmp_path / "hf-cache"
    populate_hub_cache(cache, repo)
    with pytest.raises(HubError, match=r"has no weights in .*Baseline: the cache is incomplete"):
        from_pretrained(REPO_ID, "Baseline", cache_dir=cache, conversion_cache_dir=converted_dir)
    assert_nothing_left(converted_dir)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_opt_in_still_refuses_code(stand_in, converted_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = broken_copy(stand_in, tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"weights_only=True"):
        from_pretrained(folder, conversion_cache_dir=converted_dir, allow_pickle=True)
    assert not (tmp_path / "PWNED").exists()
    assert_nothing_left(converted_dir)


@pytest.mark.parametrize("interruption", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failure_while_writing_leaves_no_cache_entry(stand_in, converted_dir, monkeypatch, interruption):
    def save_pretrained(self, *args, **kwargs):  # the model is already written when the processor fails
        raise interruption

    monkeypatch.setattr(LlavaOnevisionManagerProcessor, "save_pretrained", save_pretrained)
    with pytest.raises(type(interruption)):
        load(stand_in, converted_dir, "Baseline + Manager")
    assert_nothing_left(converted_dir)
    monkeypatch.undo()
    model, _ = load(stand_in, converted_dir, "Baseline + Manager")  # and the next call converts cleanly
    assert model.config.manager is not None


def test_hf_format_folders_with_pickle_weights_or_without_a_processor(stand_in, converted_dir, tmp_path):
    out = conversion.convert_checkpoint(source.resolve(stand_in.repo, "Baseline"), tmp_path / "hf-format")
    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    torch.save(state, out / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"only pickle weights \(pytorch_model.bin\)"):
        from_pretrained(out, conversion_cache_dir=converted_dir)
    model, _ = from_pretrained(out, conversion_cache_dir=converted_dir, allow_pickle=True)
    assert torch.equal(model.state_dict()["model.image_newline"], state["image_newline"])
    (out / "processor_config.json").unlink()
    with pytest.raises(ConversionError, match="holds a model but no processor"):
        from_pretrained(out, conversion_cache_dir=converted_dir, allow_pickle=True)
    assert files_under(converted_dir) == []
