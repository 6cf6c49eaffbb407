"""The mutation check stays applicable: every planted bug still has its anchor, once, in the code it targets,
and every test it names exists (a renamed test would otherwise make the mutation 'caught' by an error)."""

import subprocess
import sys

import pytest

from benchmarks.mutations import MUTATIONS, ROOT


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_mutation_anchor_occurs_once(mutation):
    assert (ROOT / mutation.file).is_file(), f"{mutation.file}: name the module file, not its folder"
    assert (ROOT / mutation.file).read_text().count(mutation.old) == 1
    assert mutation.old != mutation.new


@pytest.mark.slow
def test_every_named_test_exists():
    tests = sorted({t for m in MUTATIONS for t in m.tests})
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *tests], cwd=ROOT, capture_output=True, text=True)
    assert collected.returncode == 0, collected.stdout[-2000:]
