"""The agent's object store: job outputs and other objects, named by sha256, in
DATA_DIR/objects. Files enter only complete and verified (rename from a temp file)."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

CHUNK = 1024 * 1024


class ObjectStore:
    def __init__(self, data_dir: Path):
        self.root = data_dir / "objects"
        self.root.mkdir(parents=True, exist_ok=True)

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

    def add_file(self, src: Path) -> tuple[str, int]:
        """Move a finished file into the store (same filesystem: a rename)."""
        h, size = hashlib.sha256(), 0
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
        sha = h.hexdigest()
        dest = self.path(sha)
        if dest.exists():
            src.unlink()
        else:
            try:
                os.replace(src, dest)
            except OSError:  # another filesystem: copy through a temp file
                tmp = self.temp()
                with open(src, "rb") as fin, open(tmp, "wb") as fout:
                    while chunk := fin.read(CHUNK):
                        fout.write(chunk)
                os.replace(tmp, dest)
                src.unlink()
            os.chmod(dest, 0o444)
        return sha, size

    def accept(self, tmp: Path, sha256: str) -> Path:
        """Adopt a verified temp file as `sha256`."""
        dest = self.path(sha256)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
        return dest
