"""The JIT build compiles exactly the translation units under csrc/ (a new .cu/.cpp left out of
the loader's list would fail only at link or first use, on a GPU machine)."""
from __future__ import annotations

from pathlib import Path

from deep_ep_ops.cuda import loader

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def test_loader_builds_every_translation_unit() -> None:
    on_disk = sorted(str(p.relative_to(CSRC)) for p in CSRC.rglob("*")
                     if p.suffix in (".cu", ".cpp"))
    listed = sorted(loader._SOURCES)
    assert len(listed) == len(set(listed)), f"duplicate entries in loader._SOURCES: {listed}"
    assert listed == on_disk, (f"csrc translation units {on_disk} != loader._SOURCES {listed}")
