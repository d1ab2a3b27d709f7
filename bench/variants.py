"""hsmscep variants for a same-run comparison: another revision of this repository, maybe patched.

`--variant NAME=REV[:PATCH]` (driver) names one: REV is any git revision of this repository,
exported with `git archive` into the run's work directory, PATCH (optional) a `git apply`
patch applied on top, and the result installed into a venv of its own. That venv borrows its
dependencies from the driver's venv by a path entry, so building one needs no network.
"""

from __future__ import annotations

import io
import subprocess
import sys
import sysconfig
import tarfile
import venv
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 300.0  # seconds for one step (archive, venv, pip install)


@dataclass(frozen=True, slots=True)
class VariantSpec:
    """What the user asked for: a name for the series, a revision, an optional patch."""

    name: str
    rev: str
    patch: Path | None = None


@dataclass(frozen=True, slots=True)
class Variant:
    """A built variant: its `hsmscep` executable and what it was built from."""

    spec: VariantSpec
    commit: str
    binary: Path
    package_dir: str  # where the variant's `hsmscep` package is imported from

    def describe(self) -> dict[str, str | None]:
        """The variant's provenance, for the results file."""
        patch = self.spec.patch
        if patch is not None and patch.is_relative_to(REPO):
            patch = patch.relative_to(REPO)
        return {
            "rev": self.spec.rev,
            "commit": self.commit,
            "patch": str(patch) if patch else None,
            "package_dir": self.package_dir,
        }


def parse_spec(text: str) -> VariantSpec:
    """`NAME=REV[:PATCH]`, e.g. `before=40de9d7` or `nobalance=HEAD:bench/patches/x.patch`."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--variant {text!r}: expected NAME=REV[:PATCH]")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"--variant {text!r}: NAME may hold letters, digits, - and _ only")
    rev, _, patch = rest.partition(":")
    if not patch:
        return VariantSpec(name, rev)
    path = Path(patch)
    path = path if path.is_absolute() else (Path.cwd() / path)
    if not path.exists() and (REPO / patch).exists():
        path = REPO / patch  # relative to the repository when not to the current directory
    if not path.is_file():
        raise ValueError(f"--variant {text!r}: patch {patch} not found")
    return VariantSpec(name, rev, path.resolve())


def build(spec: VariantSpec, workdir: Path) -> Variant:
    """Export, patch and install the variant under `workdir/variant-NAME/`."""
    commit = _git("rev-parse", "--verify", f"{spec.rev}^{{commit}}").decode().strip()
    root = workdir / f"variant-{spec.name}"
    src, env_dir = root / "src", root / "venv"
    src.mkdir(parents=True)
    # git archive, not a worktree: the repository's worktree list stays untouched.
    with tarfile.open(fileobj=io.BytesIO(_git("archive", "--format=tar", commit))) as tar:
        tar.extractall(src, filter="data")
    if spec.patch is not None:
        _run(["git", "apply", "--whitespace=nowarn", str(spec.patch)], cwd=src)
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = _purelib(python)
    # Dependencies come from the driver's venv: its site-packages as a plain path entry, after
    # the variant's own site-packages (its .pth files, the editable hsmscep among them, are
    # not read, so the variant's hsmscep is the only one importable).
    (Path(purelib) / "_bench_driver_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(src)],
        cwd=root,
    )
    where = "import hsmscep, pathlib; print(pathlib.Path(hsmscep.__file__).parent)"
    found = _run([str(python), "-c", where], cwd=root).strip()
    if not Path(found).is_relative_to(env_dir):
        raise RuntimeError(f"variant {spec.name}: hsmscep imported from {found}, not its venv")
    return Variant(spec, commit, env_dir / "bin" / "hsmscep", found)


def _purelib(python: Path) -> str:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return _run([str(python), "-c", code], cwd=python.parent).strip()


def _git(*args: str) -> bytes:
    out = subprocess.run(
        ["git", "-C", str(REPO), *args], check=True, capture_output=True, timeout=BUILD_TIMEOUT
    )
    return out.stdout


def _run(cmd: list[str], *, cwd: Path) -> str:
    try:
        out = subprocess.run(
            cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=BUILD_TIMEOUT
        )
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{exc.stdout}{exc.stderr}") from exc
    return out.stdout


if __name__ == "__main__":  # `python -m bench.variants NAME=REV[:PATCH] DIR`: build one, say where
    built = build(parse_spec(sys.argv[1]), Path(sys.argv[2]))
    print(built.binary, built.describe())
