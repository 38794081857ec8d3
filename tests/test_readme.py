"""Every ```python block of README.md runs as written (the public imports and calls it shows), with
the tensors it leaves to the reader (q, k, v, keep, idx, prompt) defined at tiny sizes."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def namespace() -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g) for _ in range(3))  # (B, H, L, E)
    idx = torch.randint(0, 256, (2, 16), generator=g)  # (B, T) token ids
    return {"q": q, "k": k, "v": v, "keep": torch.rand(16, 16, generator=g) > 0.3, "idx": idx, "prompt": idx[:, :4]}


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code):
    if "transformers" in code:
        pytest.importorskip("transformers")  # the [hf] extra, installed by `make test`
    exec(compile(code, str(README), "exec"), namespace())
