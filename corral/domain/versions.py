"""Versions with explicit schemes, so "newer" always means something.

- release: semantic versions, `1.4.2`, `v2.0.0-rc.1` (pre-releases order before their
  release, per semver 2.0.0 precedence). Build metadata (`+sha.abc`) has no order, so
  it is refused: use a channel build for CI builds.
- channel: `<channel>.<build number>`, e.g. `main.27305`, `nightly.12`: ordered by build
  number within one channel; two channels are not comparable.
- dev: `dev` or `dev-<anything>`: never ordered, only equal to itself.

Comparing versions of different schemes (or channels, or any dev version with a
different one) raises IncomparableVersions: the caller must decide, never a silent
True/False. A bare build number like `27305` is refused outright, because under other
rules it would outrank every release.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from corral.domain.errors import DomainError, IncomparableVersions


class InvalidVersion(DomainError, ValueError):
    pass


class Scheme(StrEnum):
    RELEASE = "release"
    CHANNEL = "channel"
    DEV = "dev"


_NUM = r"0|[1-9]\d*"
_IDENT = r"[0-9A-Za-z-]+"
_RELEASE = re.compile(
    rf"^v?(?P<major>{_NUM})\.(?P<minor>{_NUM})\.(?P<patch>{_NUM})"
    rf"(?:-(?P<pre>{_IDENT}(?:\.{_IDENT})*))?(?P<build>\+.*)?$"
)
_CHANNEL = re.compile(r"^(?P<channel>[a-z][a-z0-9-]{0,31})\.(?P<build>\d{1,18})$")
_DEV = re.compile(r"^dev(?:-[0-9A-Za-z.+_-]{1,100})?$")


@dataclass(frozen=True)
class Version:
    text: str
    scheme: Scheme
    channel: str | None = None
    key: tuple[object, ...] = ()

    def __str__(self) -> str:
        return self.text


def _pre_key(pre: str | None) -> tuple[object, ...]:
    # a release without pre-release outranks any pre-release of it
    if pre is None:
        return (1,)
    parts = []
    for ident in pre.split("."):
        if ident.isdigit():
            if len(ident) > 1 and ident.startswith("0"):
                raise InvalidVersion(f"numeric pre-release identifier {ident!r} has a leading zero")
            parts.append((0, int(ident), ""))  # numeric identifiers sort before alphanumeric
        else:
            parts.append((1, 0, ident))
    return (0, tuple(parts))


def parse_version(text: str) -> Version:
    if not isinstance(text, str) or not text or len(text) > 128:
        raise InvalidVersion(f"{text!r} is not a version")
    if m := _RELEASE.match(text):
        if m.group("build"):
            raise InvalidVersion(
                f"{text!r}: build metadata (+...) has no order; drop it, or use a channel "
                f"build such as main.1234"
            )
        key = (
            int(m.group("major")),
            int(m.group("minor")),
            int(m.group("patch")),
            _pre_key(m.group("pre")),
        )
        return Version(text, Scheme.RELEASE, None, key)
    if m := _CHANNEL.match(text):
        return Version(text, Scheme.CHANNEL, m.group("channel"), (int(m.group("build")),))
    if _DEV.match(text):
        return Version(text, Scheme.DEV, None, (text,))
    if text.isdigit():
        raise InvalidVersion(
            f"{text!r} is a bare build number: it has no order against releases; "
            f"write it as a channel build such as main.{text}"
        )
    raise InvalidVersion(
        f"{text!r} is not a version: use a release (1.2.3, 1.2.3-rc.1), a channel build "
        f"(main.1234) or a dev build (dev, dev-mybranch)"
    )


def comparable(a: Version, b: Version) -> bool:
    if a.scheme is not b.scheme:
        return False
    if a.scheme is Scheme.DEV:
        return a.text == b.text
    if a.scheme is Scheme.CHANNEL:
        return a.channel == b.channel
    return True


def compare(a: Version | str, b: Version | str) -> int:
    """-1, 0 or 1. Raises IncomparableVersions across schemes, channels, dev builds."""
    a = parse_version(a) if isinstance(a, str) else a
    b = parse_version(b) if isinstance(b, str) else b
    if not comparable(a, b):
        why = (
            f"different schemes ({a.scheme} vs {b.scheme})"
            if a.scheme is not b.scheme
            else f"different channels ({a.channel} vs {b.channel})"
            if a.scheme is Scheme.CHANNEL
            else "dev builds have no order"
        )
        raise IncomparableVersions(f"cannot compare {a.text!r} with {b.text!r}: {why}")
    return (a.key > b.key) - (a.key < b.key)


def is_downgrade(current: str | None, target: str) -> bool:
    """Would moving from `current` to `target` go backwards? Raises when the two
    cannot be compared; nothing installed (`None`) is never a downgrade."""
    if current is None:
        return False
    return compare(current, target) > 0
