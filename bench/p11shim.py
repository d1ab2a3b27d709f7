"""Builds bench/p11shim.c (a PKCS#11 pass-through that adds latency, counts logins and injects
return codes) with the system compiler; used by the latency bench and the HSM tests.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("p11shim.c")
HEADERS = Path("/usr/include/p11-kit-1")


def build(directory: Path) -> Path:
    """Compile the shim into `directory` (once per source version) and return its path."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (apt-get install gcc)")
    if not (HEADERS / "p11-kit" / "pkcs11.h").exists():
        raise RuntimeError("no pkcs11.h (apt-get install libp11-kit-dev)")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    target = directory / f"p11shim-{digest}.so"
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".tmp")
        subprocess.run(
            [compiler, "-O2", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{HEADERS}"]
            + ["-o", str(partial), str(SOURCE), "-ldl"],
            check=True,
        )
        partial.rename(target)  # atomic: parallel builders never load a half-written file
    return target
