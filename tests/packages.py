"""Debian packages the tests need (a browser, a Redis server), installed when missing and allowed.

An install waits up to ``LOCK_SECONDS`` for another apt-get or dpkg to let go of its lock. Tests
whose fixtures install should not count that wait against their own time limit: mark them
``pytest.mark.timeout(..., func_only=True)``.
"""

from __future__ import annotations

import os
import shutil
import subprocess

#: How long apt-get waits for dpkg's lock, held by any other apt-get on the machine.
LOCK_SECONDS = 600
#: Longest a single apt-get may take: the wait for the lock, then its download and install.
APT_SECONDS = LOCK_SECONDS + 600


class Unavailable(Exception):
    """A command is missing and could not be installed; the message says why."""


def debian_tool(command: str, package: str) -> str:
    """``command``'s path, installing Debian's ``package`` if it is missing and we may (root, apt-get).

    Raises ``Unavailable`` with the reason when it stays missing: not root, no apt-get, or what
    apt-get said last.
    """
    found = shutil.which(command)
    if found:
        return found
    if os.geteuid() != 0:
        raise Unavailable(f"{command} is not installed, and installing {package} needs root")
    if not shutil.which("apt-get"):
        raise Unavailable(f"{command} is not installed, and there is no apt-get to install {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> str | None:
        """Run apt-get; None when it succeeded, else the last lines it wrote to stderr."""
        line = ["apt-get", "-o", f"DPkg::Lock::Timeout={LOCK_SECONDS}", *args]
        try:
            done = subprocess.run(line, env=env, capture_output=True, text=True, timeout=APT_SECONDS)
        except subprocess.TimeoutExpired:
            return f"apt-get {args[0]} did not finish within {APT_SECONDS} s"
        if done.returncode == 0:
            return None
        said = [text.strip() for text in done.stderr.splitlines() if text.strip()]
        return " / ".join(said[-3:]) or f"apt-get {args[0]} exited with {done.returncode}"

    failed = apt("install", "-y", "-qq", package)
    if failed is not None:  # perhaps the package lists are stale or missing
        updating = apt("update", "-qq")
        failed = apt("install", "-y", "-qq", package)
        if failed is not None and updating is not None:
            failed += f" (apt-get update: {updating})"
    found = shutil.which(command)
    if found is None:
        raise Unavailable(f"apt-get install {package} failed: {failed or f'no {command} afterwards'}")
    return found
