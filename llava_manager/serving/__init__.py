"""Serving Manager checkpoints with vLLM (`pip install "llava-manager[vllm]"`).

- `vllm_plugin.register`: the `vllm.general_plugins` entry point; registers the architecture and the config.
- `vllm_model`: `LlavaOnevisionManagerForConditionalGeneration` for vLLM (imported by vLLM only, lazily).

Nothing here is imported by `import llava_manager`: vLLM is an optional dependency.
"""
