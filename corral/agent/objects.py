"""The agent's object store: job outputs and other objects, named by sha256, in
DATA_DIR/objects (0700). Files enter only complete and hashed by the agent's own code
(rename from a temp file); a file's name is the sha256 of the bytes stored."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

CHUNK = 1024 * 1024


class ObjectStore:
    def __init__(self, data_dir: Path):
        self.root = data_dir / "objects"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def list(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if len(p.name) == 64 and not p.name.startswith(".")
        )

    def temp(self) -> Path:
        return self.root / f".incoming-{secrets.token_hex(6)}"

    def add_from_fd(self, fd: int, rename: tuple[int, str] | None = None) -> tuple[str, int]:
        """Store the regular file open at `fd`, hashing what is stored. A copy, unless
        `rename` (the directory fd and name it was opened by) is given: then that
        directory entry is moved into the store when it is the same file on the same
        filesystem, and made the store's own (owner, mode) through `fd`, never by
        path. A failed write (a full disk) leaves nothing behind and raises."""
        if rename is not None and (taken := self._take(fd, *rename)) is not None:
            return self._finish_taken(fd, taken)
        tmp = self.temp()
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        h, size, offset = hashlib.sha256(), 0, 0
        try:
            while chunk := os.pread(fd, CHUNK, offset):
                offset += len(chunk)
                h.update(chunk)
                size += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
            os.fchmod(out, 0o444)
        except BaseException:
            os.close(out)
            tmp.unlink(missing_ok=True)
            raise
        os.close(out)
        return self._publish(tmp, h.hexdigest(), size)

    def _take(self, fd: int, dir_fd: int, name: str) -> Path | None:
        st = os.fstat(fd)
        if st.st_nlink != 1 or st.st_dev != os.stat(self.root).st_dev:
            return None
        taken = self.temp()
        try:
            os.rename(name, taken, src_dir_fd=dir_fd)
        except OSError:
            return None
        moved = os.stat(taken, follow_symlinks=False)
        if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
            os.rename(taken, name, dst_dir_fd=dir_fd)  # not what was checked: put it back
            return None
        return taken

    def _finish_taken(self, fd: int, tmp: Path) -> tuple[str, int]:
        try:
            os.fchown(fd, os.getuid(), os.getgid())
            os.fchmod(fd, 0o444)
            h, size, offset = hashlib.sha256(), 0, 0
            while chunk := os.pread(fd, CHUNK, offset):
                offset += len(chunk)
                h.update(chunk)
                size += len(chunk)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self._publish(tmp, h.hexdigest(), size)

    def _publish(self, tmp: Path, sha: str, size: int) -> tuple[str, int]:
        dest = self.path(sha)
        if dest.exists():
            tmp.unlink()
        else:
            os.replace(tmp, dest)
        return sha, size

    def accept(self, tmp: Path, sha256: str) -> Path:
        """Adopt a verified temp file as `sha256`."""
        dest = self.path(sha256)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
        return dest
