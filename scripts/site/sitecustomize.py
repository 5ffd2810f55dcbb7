"""Source-tree runs without installing: map ``deep_ep_ops.meta`` to the top-level ``meta/``
folder (what setup.py's package_dir does for an install). Used by scripts/gpu_run.sh only."""
import importlib.abc
import importlib.util
import os
import sys

_ROOT = os.environ.get("DEEP_EP_OPS_ROOT", "")


class _MetaFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if not _ROOT or not (name == "deep_ep_ops.meta" or name.startswith("deep_ep_ops.meta.")):
            return None
        rel = name.split(".")[2:]
        base = os.path.join(_ROOT, "meta", *rel)
        if os.path.isdir(base):
            return importlib.util.spec_from_file_location(
                name, os.path.join(base, "__init__.py"), submodule_search_locations=[base])
        if os.path.isfile(base + ".py"):
            return importlib.util.spec_from_file_location(name, base + ".py")
        return None


sys.meta_path.insert(0, _MetaFinder())
