"""The worked example of docs/algorithms.md runs as a user would run it, and says what it prints."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(path):
    with open(path) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_writing_your_own_method_example(tmp_path):
    module, script = python_blocks(os.path.join(ROOT, "docs", "algorithms.md"))
    assert module.startswith("# my_methods.py")
    (tmp_path / "my_methods.py").write_text(module)
    (tmp_path / "run.py").write_text(script)
    out = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["16.0"]
    # the doc's claim about cap 3
    (tmp_path / "run3.py").write_text(script.replace('"cap": 2', '"cap": 3').replace("runs/capped", "runs/capped3"))
    out = subprocess.run([sys.executable, "run3.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["4.0"], out.stderr
