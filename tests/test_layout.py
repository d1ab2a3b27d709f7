"""The package layout holds: imports point one way, the pure core does no I/O, no cycles.

Reads the source with `ast` (every import counts: module level, in functions, and under
TYPE_CHECKING), so a change that breaks the architecture fails here, not in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hsmscep"

# What each top-level part of hsmscep may import of hsmscep (itself always).
ALLOWED: dict[str, set[str]] = {
    "errors": {"protocol.codes"},
    "logs": set(),
    "protocol": {"errors"},
    "policy": {"errors", "protocol"},
    "hsm": {"errors", "protocol"},
    "store": {"errors"},
    "service": {"errors", "protocol", "policy", "store.records", "hsm.pool", "webhook"},
    "webhook": {"errors", "protocol", "policy"},
    "config": {"errors", "protocol", "policy", "hsm.refs"},
    "web": {"errors", "logs", "protocol", "policy", "hsm", "store", "service", "webhook", "config"},
    "cli": {"errors", "logs", "protocol", "policy", "hsm", "store", "service", "config", "web"},
    "testing": {"errors", "protocol"},
    "__main__": {"cli"},
}
# Libraries that do I/O or run the process: never in the pure core.
IO_LIBRARIES = {
    "aiosqlite", "anyio", "asyncio", "asyncpg", "httpx", "pkcs11", "socket", "sqlite3", "ssl",
    "starlette", "subprocess", "threading", "uvicorn", "uvloop",
}  # fmt: skip
PURE = (
    "protocol",
    "policy",
    "store.records",
    "store.schema",
    "store.pgschema",
    "store.stats",
    "service.ports",
    "service.refusal",
    "hsm.refs",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, as dotted names (submodules resolved where they exist)."""
    name = _module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: -node.level or None]
                if path.name == "__init__.py":
                    anchor = name.split(".")[: len(name.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            for alias in node.names:
                if _source(f"{base}.{alias.name}") is not None:
                    found.add(f"{base}.{alias.name}")
    return found


def _source(module: str) -> Path | None:
    if not module.startswith("hsmscep"):
        return None
    relative = Path(*module.split("."))
    for candidate in (
        PACKAGE.parent / relative.with_suffix(".py"),
        PACKAGE.parent / relative / "__init__.py",
    ):
        if candidate.is_file():
            return candidate
    return None


GRAPH = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _internal(module: str) -> set[str]:
    return {m for m in GRAPH[module] if m.startswith("hsmscep.") and m in GRAPH}


def _part(module: str) -> str:
    return module.removeprefix("hsmscep.").split(".")[0]


def _matches(module: str, rule: str) -> bool:
    inner = module.removeprefix("hsmscep.")
    return inner == rule or inner.startswith(rule + ".")


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.count(".") >= 1))
def test_imports_point_one_way(module: str) -> None:
    part = _part(module)
    allowed = ALLOWED[part]
    wrong = sorted(
        m
        for m in _internal(module)
        if _part(m) != part and not any(_matches(m, rule) for rule in allowed)
    )
    assert not wrong, f"{module} may not import {wrong}"


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(_internal(current))
    return seen


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if any(_matches(m, p) for p in PURE)))
def test_pure_core_does_no_io(module: str) -> None:
    used = {
        (m, lib) for m in _closure(module) for lib in GRAPH[m] if lib.split(".")[0] in IO_LIBRARIES
    }
    assert not used, f"{module} reaches I/O: {sorted(used)}"


@pytest.mark.parametrize("library", ["pkcs11", "httpx"])
@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _matches(m, "config")))
def test_config_loads_no_pkcs11_module_nor_http_client(module: str, library: str) -> None:
    reached = {m for m in _closure(module) if any(lib.split(".")[0] == library for lib in GRAPH[m])}
    assert not reached, f"{module} reaches {library} through {sorted(reached)}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if not _matches(m, "hsm")))
def test_only_hsm_imports_pkcs11(module: str) -> None:
    # python-pkcs11 loads a native module and holds process-wide state (one C_Initialize, one
    # login per token): one package owns it, and everything else reaches the HSM through it.
    direct = sorted(lib for lib in GRAPH[module] if lib.split(".")[0] == "pkcs11")
    assert not direct, f"{module} imports {direct}; only hsmscep.hsm may"


def test_no_import_cycles() -> None:
    order: list[str] = []
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(_internal(module)):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt] if nxt in stack else [module, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[module] = 2
        order.append(module)

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_is_read() -> None:
    # The rules above are vacuous if the walk finds nothing.
    assert "hsmscep.protocol.errors" not in GRAPH
    assert "hsmscep.errors" in _internal("hsmscep.protocol.message")
    assert "hsmscep.store.records" in _internal("hsmscep.service.ports")
    assert any(lib.split(".")[0] == "pkcs11" for lib in GRAPH["hsmscep.hsm.library"])
