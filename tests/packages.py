"""Debian packages the tests need (a browser, a Redis server), installed when missing and allowed."""

from __future__ import annotations

import os
import shutil
import subprocess


def debian_tool(command: str, package: str) -> str | None:
    """``command``'s path, installing Debian's ``package`` if it is missing and we may (root, apt-get)."""
    found = shutil.which(command)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> int:
        done = subprocess.run(["apt-get", *args], env=env, capture_output=True, timeout=600)
        return done.returncode

    if apt("install", "-y", "-qq", package):
        apt("update", "-qq")
        apt("install", "-y", "-qq", package)
    return shutil.which(command)
