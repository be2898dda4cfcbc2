"""Helpers for tests, the demo and the benchmarks, apart from the library: tiny random models and a tiny tokenizer
built in code (`tiny.py`), drawn shapes (`shapes.py`) and a synthetic LLaVA-format dataset (`synthetic.py`).
Nothing here downloads anything."""
