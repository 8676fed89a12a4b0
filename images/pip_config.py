"""The host's effective pip configuration as a pip.conf for an image build, and the local paths it names.

`python3 images/pip_config.py OUT ENGINE` writes OUT and prints, one a line, the host paths the build must see
(find-links folders, file:// indexes, constraint files, the CA bundle): podman mounts them read-only at the same
place. Docker builds cannot mount host paths, so for docker the local entries are left out (with a note on
stderr) and pip inside the build uses the remote indexes alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

# The settings that decide what pip installs and from where; everything else stays pip's default.
KEYS = (
    "index-url", "extra-index-url", "find-links", "constraint", "cert", "trusted-host", "default-timeout", "retries",
)  # fmt: skip
LOCATIONS = ("index-url", "extra-index-url", "find-links", "constraint", "cert")


def effective() -> dict[str, str]:
    """Environment over files, as pip itself resolves them (`pip config list` shows both)."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, dict[str, str]] = {"file": {}, "env": {}}
    for line in listing.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if key in KEYS:
            found["env" if section == ":env:" else "file"][key] = value.strip().strip("'\"")
    return {**found["file"], **found["env"]}


def local_path(value: str, key: str) -> Path | None:
    """The host path an entry needs, or None for a remote one. A file:// index's packages may lie beside its
    `simple/` folder (files/ next to simple/), so the folder above the index is the one to mount."""
    parsed = urlparse(value)
    if parsed.scheme == "file":
        path = Path(parsed.path)
        return path.parent if key.endswith("index-url") else path
    if not parsed.scheme and value.startswith("/"):
        return Path(value)
    return None


def main(out: Path, engine: str) -> None:
    lines, mounts = ["[global]"], []
    for key, value in effective().items():
        kept = []
        for item in value.split():
            path = local_path(item, key) if key in LOCATIONS else None
            if path is None:
                kept.append(item)
            elif not path.exists():
                continue
            elif engine == "podman":
                kept.append(item)
                mounts.append(str(path))
            else:
                print(f"pip {key} {item}: a local path, not visible to a {engine} build; left out", file=sys.stderr)
        if kept:
            lines.append(f"{key} = {' '.join(kept)}")
    out.write_text("\n".join(lines) + "\n")
    os.chmod(out, 0o644)
    print("\n".join(dict.fromkeys(mounts)))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
