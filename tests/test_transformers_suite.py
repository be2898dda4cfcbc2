"""transformers' own generic model tests (`ModelTesterMixin`, from the installed version's sdist) as a peer check:
every test that passes on a vanilla tiny LLaVA-OV must pass with Managers attached (llm and projector injection),
for `LlavaOnevisionForConditionalGeneration` and the bare `LlavaOnevisionModel`.

Runs three pytest processes (about 40 s each); the sdist is downloaded once with pip and cached
(tests/transformers_suite/sdist.py). Alone: `python tests/transformers_suite/run.py`.
"""

import os

import pytest
from transformers_suite.run import lost, run_mode, summary
from transformers_suite.sdist import SuiteUnavailable, transformers_tests_root


@pytest.fixture(scope="module")
def vanilla():
    try:
        transformers_tests_root()
    except SuiteUnavailable as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"transformers' generic tests unavailable here (no PyPI?): {error}")
    return run_mode("vanilla")


@pytest.mark.parametrize("mode", ["llm", "projector"])
def test_managers_lose_no_generic_transformers_test(vanilla, mode):
    patched = run_mode(mode)
    per_class = summary(vanilla)
    assert len(per_class) == 2 and all(counts["passed"] >= 50 for counts in per_class.values()), per_class
    assert lost(vanilla, patched) == [], summary(patched)
