"""Where the user's default signing key lives, made on first use like ssh-keygen's default.

``$EDGECTL_CONFIG_DIR`` (else ``~/.config/edgectl``) holds ``keys/default.pem`` (0600) and
``keys/default.pub.pem``; ``trusted/`` may hold more public keys this user trusts.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgectl.artifact.errors import KeyFileError
from edgectl.artifact.signing import SigningKey, TrustStore, load_public_key, public_key_path

CONFIG_ENV = "EDGECTL_CONFIG_DIR"


def config_dir() -> Path:
    """edgectl's per-user config directory."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "edgectl"


def default_key_path() -> Path:
    """Path of the default private signing key."""
    return config_dir() / "keys" / "default.pem"


def trusted_keys_dir() -> Path:
    """Directory of extra public keys the local user trusts."""
    return config_dir() / "trusted"


def default_signing_key(*, create: bool = True) -> SigningKey:
    """Load the default key, generating it on first use (``create``); KeyFileError if absent and not created."""
    path = default_key_path()
    if not path.exists() and create:
        key = SigningKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        try:
            key.save(path)
        except KeyFileError:
            pass  # another process made it between our check and create (O_EXCL): use theirs
        else:
            return key
    return SigningKey.load(path)


def default_trust_store() -> TrustStore:
    """The local user's trust: the default key's public half and every key in ``trusted/``."""
    store = TrustStore()
    pub = public_key_path(default_key_path())
    if pub.is_file():
        store.add(load_public_key(pub.read_bytes(), str(pub)))
    tdir = trusted_keys_dir()
    if tdir.is_dir() and any(tdir.iterdir()):
        store.add_path(tdir)
    return store
