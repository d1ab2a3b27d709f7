"""The CA rollover state file ([rollover] state, rollover.json): read and written here only.

`read_rollover` validates it for the settings; `hsmscep rollover prepare|import-ca|activate`
record their steps through `record_awaiting`, `record_next` and `record_activated`. Paths in
the file are relative to the config file; writes go through a temporary file and a rename.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from hsmscep.errors import ConfigError
from hsmscep.hsm.refs import KeyRef, TokenRef

ROLLOVER_STATE = "rollover.json"
_TOP_KEYS = {"generation", "current", "next", "awaiting_cert", "previous_ra"}
_GENERATION_KEYS = {"ca_key_label", "ca_cert", "ra_key_label", "ra_cert", "ca_chain", "cross_cert"}


@dataclass(frozen=True, slots=True)
class Generation:
    """The CA and RA keys and certificates of one rollover generation."""

    ca_key: KeyRef
    ca_cert: Path
    ra_key: KeyRef
    ra_cert: Path
    ca_chain: Path | None = None  # issuers of a next CA signed by an external root
    # NewWithOld: the CA's key and subject certified by the previous (self-signed) CA, so that
    # clients trusting only the previous root can still build a path to the new CA.
    cross_cert: Path | None = None


@dataclass(frozen=True, slots=True)
class RolloverState:
    """[rollover] and the state file it names:

    {"generation": 2,
     "current": {"ca_key_label": L, "ca_cert": P, "ra_key_label": L, "ra_cert": P} | null,
     "next": {...the same keys...} | null,
     "awaiting_cert": {...the same keys...} | null,
     "previous_ra": [{"key_label": L, "key_id": HEX | null, "cert": P}, ...]}

    Generations may also name "ca_chain" (a PEM file of external issuers) and "cross_cert" (a
    PEM file: the generation's CA key and subject certified by the previous self-signed CA,
    which must exist and be readable). `awaiting_cert` is a generation whose keys exist but
    whose CA certificate the external root has yet to sign.

    `current` (when set) replaces [ca] key/cert/chain and [ra] key/cert; keys live on the
    [ca] and [ra] tokens. Paths are relative to `base`, the config file's directory.
    """

    KEYS: ClassVar[frozenset[str]] = frozenset({"state"})

    path: Path | None = None  # None: no rollover (a [cas.<name>] CA)
    base: Path = Path()
    generation: int = 1  # of the current CA and RA keys
    current: Generation | None = None
    next: Generation | None = None  # prepared, served by GetNextCACert
    awaiting_cert: Generation | None = None  # keys made, CA CSR out at the external root
    previous_ra: tuple[tuple[KeyRef, Path], ...] = ()  # old RA keys, still decrypting

    @property
    def in_progress(self) -> bool:
        """Whether a rollover has happened or is under way."""
        return self.current is not None or self.next is not None or self.awaiting_cert is not None


def read_rollover(path: Path, base: Path, ca: TokenRef, ra: TokenRef) -> RolloverState:
    """Read and check the state file at `path`; an absent file is generation 1."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return RolloverState(path, base)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"rollover.state: cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"rollover.state: {path} must hold a JSON object")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    generation = raw.get("generation", 1)
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
        raise ConfigError(f"{path}: generation must be a positive integer")

    def text(entry: dict[str, Any], where: str, key: str) -> str:
        value = entry.get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: {where}.{key} must be a non-empty string")
        return value

    def gen(where: str) -> Generation | None:
        entry = raw.get(where)
        if entry is None:
            return None
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: {where} must be an object or null")
        unknown = set(entry) - _GENERATION_KEYS
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} in {where}")
        chain = text(entry, where, "ca_chain") if entry.get("ca_chain") is not None else None
        cross: Path | None = None
        if entry.get("cross_cert") is not None:
            cross = base / text(entry, where, "cross_cert")
            try:
                cross.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"{path}: {where}.cross_cert: cannot read {cross}: {exc.strerror or exc}"
                ) from None
        return Generation(
            ca_key=KeyRef(ca, text(entry, where, "ca_key_label")),
            ca_cert=base / text(entry, where, "ca_cert"),
            ra_key=KeyRef(ra, text(entry, where, "ra_key_label")),
            ra_cert=base / text(entry, where, "ra_cert"),
            ca_chain=base / chain if chain is not None else None,
            cross_cert=cross,
        )

    previous_raw = raw.get("previous_ra", [])
    if not isinstance(previous_raw, list):
        raise ConfigError(f"{path}: previous_ra must be a list")
    previous = []
    for index, entry in enumerate(previous_raw):
        where = f"previous_ra[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: {where} must be an object")
        label = entry.get("key_label")
        key_id = entry.get("key_id")
        if not isinstance(label, str | None) or not isinstance(key_id, str | None):
            raise ConfigError(f"{path}: {where}.key_label and key_id must be strings")
        if label is None and key_id is None:
            raise ConfigError(f"{path}: {where}.key_label or {where}.key_id is required")
        try:
            raw_id = bytes.fromhex(key_id) if key_id is not None else None
        except ValueError:
            raise ConfigError(f"{path}: {where}.key_id must be hex") from None
        previous.append((KeyRef(ra, label, raw_id), base / text(entry, where, "cert")))
    return RolloverState(
        path=path,
        base=base,
        generation=generation,
        current=gen("current"),
        next=gen("next"),
        awaiting_cert=gen("awaiting_cert"),
        previous_ra=tuple(previous),
    )


def record_awaiting(state: RolloverState, generation: Generation) -> None:
    """`rollover prepare --csr`: the next keys exist, their CA certificate is being signed."""
    raw = _load(state)
    raw["generation"] = state.generation
    raw["awaiting_cert"] = _entry(generation, state.base)
    _save(state, raw)


def record_next(state: RolloverState, generation: Generation) -> None:
    """`rollover prepare` or `rollover import-ca`: the next generation is ready to serve."""
    raw = _load(state)
    raw["generation"] = state.generation
    raw["next"], raw["awaiting_cert"] = _entry(generation, state.base), None
    _save(state, raw)


def record_activated(state: RolloverState, old_ra: tuple[KeyRef, Path]) -> int:
    """`rollover activate`: next becomes current, the old RA key keeps decrypting.

    Returns the generation now current.
    """
    raw = _load(state)
    key, cert = old_ra
    previous = {
        "key_label": key.label,
        "key_id": key.id.hex() if key.id is not None else None,
        "cert": os.path.relpath(cert, state.base),
    }
    raw["previous_ra"] = [previous, *raw.get("previous_ra", [])]
    raw["current"], raw["next"] = raw.get("next"), None
    raw["generation"] = state.generation + 1
    _save(state, raw)
    return state.generation + 1


def _entry(generation: Generation, base: Path) -> dict[str, str]:
    entry = {
        "ca_key_label": _label(generation.ca_key),
        "ca_cert": os.path.relpath(generation.ca_cert, base),
        "ra_key_label": _label(generation.ra_key),
        "ra_cert": os.path.relpath(generation.ra_cert, base),
    }
    if generation.ca_chain is not None:
        entry["ca_chain"] = os.path.relpath(generation.ca_chain, base)
    if generation.cross_cert is not None:
        entry["cross_cert"] = os.path.relpath(generation.cross_cert, base)
    return entry


def _label(key: KeyRef) -> str:
    # Rollover keys are found by label (the state file has no key ids for generations).
    assert key.label is not None
    return key.label


def _path(state: RolloverState) -> Path:
    if state.path is None:
        raise ConfigError("CA rollover covers the default CA ([ca]/[ra]) only")
    return state.path


def _load(state: RolloverState) -> dict[str, Any]:
    try:
        raw = json.loads(_path(state).read_text())
    except FileNotFoundError:
        return {"generation": 1, "current": None, "next": None, "previous_ra": []}
    assert isinstance(raw, dict)  # read_rollover has validated it
    return raw


def _save(state: RolloverState, raw: dict[str, Any]) -> None:
    path = _path(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(json.dumps(raw, indent=2).encode() + b"\n")
    tmp.replace(path)
