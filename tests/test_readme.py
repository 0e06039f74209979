"""Every Python code block of README.md runs as written (on the CPU)."""

import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
  assert BLOCKS


def test_readme_python_blocks_run():
  for i, block in enumerate(BLOCKS):
    exec(compile(block, f"README.md python block {i}", "exec"), {})
