"""Errors the domain raises; outer layers map them to HTTP statuses and CLI messages."""


class DomainError(Exception):
    """Base class for rule violations the caller must handle."""


class IllegalTransition(DomainError):
    def __init__(self, kind: str, current: str, target: str):
        super().__init__(f"illegal {kind} transition: {current} -> {target}")
        self.kind = kind
        self.current = current
        self.target = target


class StaleToken(DomainError):
    """A fenced update carried a token that is not the job's current one."""


class IncomparableVersions(DomainError):
    """Two versions of different schemes (or a dev version) were compared."""
