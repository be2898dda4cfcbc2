"""llava-manager: Managers (arXiv 2506.11515) for Hugging Face LLaVA-OneVision."""

__version__ = "0.1.0"
