"""The README's Python examples run as they are written, each in a fresh interpreter."""
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"^```python\n(.*?)^```$", README.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)


def _framework(example):
    """The framework an example needs besides cynorm (None: NumPy alone)."""
    if "cynorm.adapters.keras" in example:
        return "keras"
    if "import torch" in example:
        return "torch"
    return None


def test_the_readme_shows_the_numpy_api_and_both_adapters():
    assert sorted(map(str, map(_framework, EXAMPLES))) == ["None", "keras", "torch"]


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda example: _framework(example) or "numpy")
def test_readme_example_runs(example, tmp_path):
    framework = _framework(example)
    if framework is not None and importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} is not installed")
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
