"""What a user's clone has is all the product and its tests may use: nothing beside the repository.

This workplace keeps reference material in a folder next to the checkout; a user's clone (and CI's, which
``.ci/run`` places in an empty folder) has nothing there. Any tracked file naming it is a hidden dependency
that would break the demo or the tests elsewhere, so it fails here, naming the file and line.
"""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO_ROOT

# Spelled in two pieces so this file does not name it.
OUTSIDE = re.compile(r"\.\./" + r"shared\b|\bshared/" + r"(data|PAPER|DESIGN|STACK-NOTES|STYLE)\b")


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f]


def test_no_tracked_file_names_the_folder_beside_the_repository():
    hits = []
    for rel in tracked_files():
        path = REPO_ROOT / rel
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # parquet and other binary data
        hits += [
            f"{rel}:{n}: {line.strip()[:120]}" for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)
        ]
    assert not hits, "tracked files depend on a folder outside the repository:\n" + "\n".join(hits)


def test_the_data_samples_are_package_data():
    """The demo evaluates on the samples inside the installed package (a wheel, an image), not a repo folder."""
    from dcgrpo.data.benchmarks import BENCHMARKS, samples_dir

    d = samples_dir()
    assert d.is_relative_to(REPO_ROOT / "src" / "dcgrpo") or "site-packages" in d.parts
    tracked = set(tracked_files())
    for spec in BENCHMARKS.values():
        assert f"src/dcgrpo/data/samples/{spec.file}" in tracked
    assert "src/dcgrpo/data/samples/PROVENANCE.md" in tracked
