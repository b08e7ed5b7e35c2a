"""Private ``ipc://`` endpoints: a 0700 directory owned by this user, removed at shutdown.

Unix-domain sockets obey the permissions of the directory that holds them, so a
0700 directory keeps every other local user from connecting. The directory lives
under ``$XDG_RUNTIME_DIR`` when it exists (per-user, tmpfs) and the system temp
directory otherwise; its name is random (``tempfile.mkdtemp``). Linux limits a
socket path to 107 bytes, so the names inside stay short.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

_MAX_SOCKET_PATH = 107


class EndpointDir:
    """A private directory of ipc endpoints. ``close()`` removes it; idempotent."""

    def __init__(self) -> None:
        base = os.environ.get("XDG_RUNTIME_DIR")
        if not base or not os.path.isdir(base) or not os.access(base, os.W_OK):
            base = None
        self.path: str = tempfile.mkdtemp(prefix="gpuexec-", dir=base)
        os.chmod(self.path, 0o700)
        st = os.stat(self.path)
        if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != 0o700:
            shutil.rmtree(self.path, ignore_errors=True)
            raise PermissionError(f"cannot make a private endpoint directory at {self.path}")
        if len(self.path) + 8 > _MAX_SOCKET_PATH:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = tempfile.mkdtemp(prefix="gpx-", dir="/tmp")
            os.chmod(self.path, 0o700)

    def endpoint(self, name: str) -> str:
        """``ipc://<dir>/<name>`` for a socket to bind."""
        return f"ipc://{self.path}/{name}"

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
