"""What init, import-ca and rollover owe the operator: each step printed as it completes, a
confirmation before HSM keys are destroyed, and after a failure the command that resumes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from hsmscep.cli.certificates import open_rw
from hsmscep.errors import ConfigError
from hsmscep.hsm.login import TokenLogin
from hsmscep.hsm.refs import KeyRef, KeySpec
from hsmscep.hsm.tokenkeys import destroy_key, generate_key, private_key_exists

Confirm = Callable[[list[str]], bool]


def refuse(labels: list[str]) -> bool:
    """The confirmation of callers that asked for none: never destroy."""
    return False


def confirm_destroy(yes: bool) -> Confirm:
    """`--yes`, or a "destroy" typed at a terminal; without a terminal, refuse (ConfigError)."""

    def confirm(labels: list[str]) -> bool:
        if yes:
            return True
        names = ", ".join(labels)
        if not sys.stdin.isatty():
            raise ConfigError(
                f"--force would destroy these keys in the HSM: {names}; nothing was changed."
                " Pass --yes to confirm without a terminal"
            )
        print(f"--force destroys these keys in the HSM, for good: {names}", file=sys.stderr)
        try:
            answer = input("type 'destroy' to go on: ")
        except EOFError:
            return False
        return answer.strip() == "destroy"

    return confirm


def settle_existing(
    existing: list[KeyRef],
    *,
    resume: bool,
    force: bool,
    confirm: Confirm,
    destroy: Callable[[KeyRef], None],
    step: Callable[[str], None],
    adjective: str,
) -> list[KeyRef]:
    """Keys already under the labels about to be generated: kept (resume; returned), destroyed
    (force, once confirmed), or a refusal that changes nothing."""
    if not existing:
        return []
    labels = [ref.describe() for ref in existing]
    if resume:
        step(f"kept existing keys {', '.join(labels)}")
        return existing
    if not force:
        raise ConfigError(
            f"keys already exist in the token ({', '.join(labels)}); pass --resume to keep"
            " them and finish an interrupted run, or --force to destroy and replace them"
        )
    if not confirm(labels):
        raise ConfigError(f"not confirmed: the keys {', '.join(labels)} were left as they are")
    for ref in existing:
        destroy(ref)
        step(f"destroyed {adjective} key {ref.describe()}")
    return []


@dataclass(frozen=True, slots=True)
class WantedKey:
    """A key a command makes in the token: where, what kind, for what, and how it is named in
    the step lines ("CA key", "next RA key", ...)."""

    ref: KeyRef
    spec: KeySpec
    usage: str
    what: str


def generate_missing(
    logins: TokenLogin,
    wanted: Sequence[WantedKey],
    *,
    resume: bool,
    force: bool,
    confirm: Confirm,
    step: Callable[[str], None],
    adjective: str,
) -> None:
    """Generate the `wanted` keys; keys already under their labels are first settled as
    settle_existing says (kept, destroyed once confirmed, or a refusal that changes nothing)."""
    refs = list(dict.fromkeys(w.ref for w in wanted))
    existing = settle_existing(
        [ref for ref in refs if private_key_exists(open_rw(logins, ref), ref)],
        resume=resume,
        force=force,
        confirm=confirm,
        destroy=lambda ref: destroy_key(open_rw(logins, ref), ref),
        step=step,
        adjective=adjective,
    )
    made: set[KeyRef] = set(existing)
    for key in wanted:
        if key.ref not in made:
            generate_key(open_rw(logins, key.ref), key.ref, key.spec, usage=key.usage)
            made.add(key.ref)
            step(f"generated {key.what} {key.ref.describe()} ({key.spec})")


def key_flags(args: argparse.Namespace) -> list[str]:
    """The key and certificate flags init and rollover prepare share, for a resume command."""
    return [
        *flag("--ca-key", args.ca_key),
        *flag("--ra-key-size", args.ra_key_size),
        *flag("--subject", args.subject),
        *flag("--validity-days", args.validity_days),
        *flag("--ra-validity-days", args.ra_validity_days),
        *flag("--csr", args.csr),
    ]


class Steps:
    """Prints each completed step at once (flushed) and keeps the list."""

    def __init__(self, echo: bool = True) -> None:
        self.done: list[str] = []
        self._echo = echo

    def __call__(self, line: str) -> None:
        self.done.append(line)
        if self._echo:
            print(line, flush=True)

    @contextmanager
    def resumable(self, command: Sequence[str]) -> Iterator[None]:
        """On failure after some steps, add a note: what exists now, the command to resume."""
        try:
            yield
        except Exception as exc:
            if self.done:
                exc.add_note(
                    f"{len(self.done)} step(s) completed (listed above; they stay as they are);"
                    f" after fixing the cause, resume with: {shlex.join(command)}"
                )
            raise


def flag(name: str, value: object, default: object = None) -> list[str]:
    """["--name", "value"] when the value is not the default, for a resume command."""
    return [] if value is None or value == default else [name, str(value)]
