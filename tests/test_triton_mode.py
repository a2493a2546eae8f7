"""The test session's Triton mode (tests/conftest.py): the interpreter only where CUDA is absent, so on a GPU
the gpu-marked tests run compiled kernels; tests that run Triton on CPU tensors carry the ``interpreter``
marker and skip there, saying why. Checked with conftest's own choice under a patched
``torch.cuda.is_available``, in fresh interpreters (the choice is made once, before kernels import)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHOICE = """
import os, sys, torch
torch.cuda.is_available = lambda: {cuda}
sys.path.insert(0, {tests!r})
import conftest
print(repr(os.environ.get("TRITON_INTERPRET")), conftest.INTERPRETED)
"""


def _choice(cuda: bool, env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if env_value is not None:
        env["TRITON_INTERPRET"] = env_value
    code = CHOICE.format(cuda=cuda, tests=str(REPO / "tests"))
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


@pytest.mark.parametrize("cuda, env_value, expect", [
    (False, None, ["'1'", "True"]),      # no GPU: the interpreter
    (True, None, ["None", "False"]),     # a GPU: compiled Triton, the variable left unset
    (True, "1", ["'1'", "True"]),        # asked for by name: kept
    (False, "0", ["'0'", "False"]),      # switched off by name: kept
])
def test_conftest_chooses_the_interpreter_only_without_cuda(cuda, env_value, expect):
    assert _choice(cuda, env_value) == expect


RUN_WITH_CUDA = """
import sys, torch
torch.cuda.is_available = lambda: True
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_with_cuda_the_interpreter_tests_skip_and_say_why():
    """A session that believes it has CUDA: the CPU-tensor Triton tests of an interpreter-marked module are
    skipped with the reason, none of them runs (or fails on CPU tensors without the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", RUN_WITH_CUDA, "-q", "-rs", "-p", "no:cacheprovider",
                          "-m", "interpreter and not gpu", "tests/kernels/test_patch.py"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "passed" not in out and "failed" not in out, out
    assert "skipped" in out and "needs TRITON_INTERPRET=1" in out, out
