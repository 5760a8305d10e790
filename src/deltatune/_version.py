"""The package version, in one place (imported by the package, the config writer and packaging), and where
it came from: whether it is a development version and the commit an install was made from."""

from __future__ import annotations

import functools

__version__ = "0.2.0.dev0"

#: The distribution name deltatune is installed under (its metadata says where it was installed from).
DISTRIBUTION = "deltatune"


def is_dev_version(version: str) -> bool:
    """Whether ``version`` (PEP 440, optionally after a ``deltatune-`` prefix) is a development release
    (``0.2.0.dev0``); False for a string that is no version at all."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version.removeprefix(f"{DISTRIBUTION}-")).dev is not None
    except InvalidVersion:
        return False


@functools.cache
def installed_commit_hash(dist_name: str) -> str | None:
    """The commit an installed distribution was built from, or None when its metadata does not say.

    pip records it in the distribution's ``direct_url.json`` (``vcs_info.commit_id``) for an install from a
    version-control URL (``pip install git+https://...@<commit>``); a release from an index, a local folder
    and an editable install carry none. Reads files only (no ``git`` process); looked up once per process.
    """
    import importlib.metadata
    import json

    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    vcs_info = json.loads(text).get("vcs_info")
    commit = vcs_info.get("commit_id") if isinstance(vcs_info, dict) else None
    return commit if isinstance(commit, str) and commit else None
