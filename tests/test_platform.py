"""rapm imports where POSIX-only modules do not exist (native Windows, where many A1111 / ComfyUI users run)."""

import subprocess
import sys
from pathlib import Path

import rapm

POSIX_ONLY = ("fcntl", "resource", "termios", "pwd", "grp")


def test_every_module_imports_without_posix_only_modules():
    modules = sorted("rapm." + ".".join(p.relative_to(Path(rapm.__file__).parent).with_suffix("").parts)
                     for p in Path(rapm.__file__).parent.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    code = ("import sys\n"
            f"for name in {POSIX_ONLY!r}:\n    sys.modules[name] = None  # import raises ImportError\n"
            "import importlib\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
