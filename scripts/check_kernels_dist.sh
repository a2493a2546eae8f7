#!/usr/bin/env bash
# The kernels as a product of their own: build the maws-kernels wheel from kernels/, install it
# in a clean virtual environment that holds only CPU torch (no trainer, no Triton), and run the
# smoke test there from outside the repository. Run by .ci/run after the test suite.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "kernels-dist: building the wheel" >&2
# From a copy of the tracked files: pip builds in the source tree, and a build/ left there by an
# earlier install would put stale files into the wheel.
mkdir "$work/src"
git -C "$repo" ls-files -z kernels | (cd "$repo" && xargs -0 cp --parents -t "$work/src")
"$repo/.venv/bin/pip" wheel -q --disable-pip-version-check --no-deps -w "$work/dist" "$work/src/kernels"
wheel=$(ls "$work"/dist/maws_kernels-*.whl)
# What the wheel holds and declares: the package (no trainer), the licence, torch + Linux-only triton.
"$repo/.venv/bin/python" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
meta = zipfile.ZipFile(sys.argv[1]).read(next(n for n in names if n.endswith("METADATA"))).decode()
assert "maws_kernels/__init__.py" in names and "maws_kernels/nn.py" in names, names
assert not any(n.startswith(("maws_fast/", "maws_kernels/setup.py", "maws_kernels/tests")) for n in names), names
assert any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in names), names
reqs = [l for l in meta.splitlines() if l.startswith("Requires-Dist:")]
assert any(l.startswith("Requires-Dist: torch") for l in reqs), reqs
assert any("triton" in l and "platform_system" in l for l in reqs), reqs
assert "BSD-3-Clause" in meta, "no licence in the metadata"
print(f"kernels-dist: {sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files; {'; '.join(r[15:] for r in reqs)}")
PY

echo "kernels-dist: a clean venv with torch only" >&2
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check -c "$repo/requirements/cpu.txt" torch
# --no-deps: the wheel would pull triton on Linux; the point here is a machine without it.
"$work/venv/bin/pip" install -q --disable-pip-version-check --no-deps "$wheel"
cd "$work"
if "$work/venv/bin/python" -c "import maws_fast" 2>/dev/null; then
  echo "kernels-dist: maws_fast is importable in the clean venv" >&2; exit 1
fi
if "$work/venv/bin/python" -c "import triton" 2>/dev/null; then
  echo "kernels-dist: triton is importable in the clean venv" >&2; exit 1
fi
"$work/venv/bin/python" "$repo/tests/kernels/smoke_dist.py" --expect-no-triton
