"""CURVE key files and password hashes: the secrets a secured mesh runs on.

Keys are ZeroMQ certificate files in the format of ``zmq.auth.create_certificates``
(``NAME.key`` public, ``NAME.key_secret`` secret), so they work with other
ZeroMQ tools.  A secret file that its group or others can read is refused
with an error naming it: a leaked secret key lets anyone pose as its owner.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from typing import Optional, Tuple

import zmq
import zmq.auth

from mesh.errors import InvalidArgument

SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "maxmem": 64 * 1024 * 1024, "dklen": 32}


def generate(directory: str, name: str) -> Tuple[str, str]:
    """Write DIR/NAME.key and DIR/NAME.key_secret (mode 0600); returns both paths."""
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


def check_private(path: str) -> None:
    """Refuse a secret file that is readable by its group or by others."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InvalidArgument(f"cannot read secret file {path}: {exc.strerror}", path=path) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidArgument(f"secret file {path} is readable by group or others (mode {stat.S_IMODE(mode):o}); "
                              f"run: chmod 600 {path}", path=path)


def load_secret(path: str) -> Tuple[bytes, bytes]:
    """(public, secret) z85 keys from a ``.key_secret`` file, after the permission check.

    The content is checked first: a public ``.key`` file given by mistake is world-readable by
    design, and advice to ``chmod 600`` it would send the operator the wrong way."""
    public, secret = _load(path)
    if not secret:
        raise InvalidArgument(f"{path} holds no secret key (is it the public .key file? "
                              f"the secret one is {_secret_name(path)})", path=path)
    check_private(path)
    return public, secret


def _secret_name(path: str) -> str:
    return path + "_secret" if path.endswith(".key") else "NAME.key_secret"


def load_public(path: str) -> bytes:
    """The z85 public key from a ``.key`` (or ``.key_secret``) file."""
    return _load(path)[0]


def _load(path: str) -> Tuple[bytes, Optional[bytes]]:
    if not os.path.exists(path):
        raise InvalidArgument(f"{path}: no such key file (copy the manager's public key there, or give its path)",
                              path=path)
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{path} is not a ZeroMQ certificate file: {exc}", path=path) from None


def ephemeral() -> Tuple[bytes, bytes]:
    """A fresh keypair for a client that has none: it is identified by its credentials instead."""
    return zmq.curve_keypair()


def hash_secret(secret: str) -> str:
    """scrypt, memory-hard: ``salt$hash`` in hex."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, **SCRYPT)
    return f"{salt.hex()}${digest.hex()}"


def verify_secret(secret: str, stored: str) -> bool:
    try:
        salt_hex, digest_hex = stored.split("$", 1)
        digest = hashlib.scrypt(secret.encode(), salt=bytes.fromhex(salt_hex), **SCRYPT)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest.hex(), digest_hex)
