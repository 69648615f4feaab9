"""The owner's workspace settings, ``.forgellm/settings.json``: the extra host names the app answers to, the
server folders that browsers on other devices may import datasets from, the webhooks run events go to, the
OpenAI-compatible endpoint (:mod:`services.serving`), and how long a run may be estimated before the Train page
asks first (``confirm_minutes``).

``{"allowed_hosts": ["forge.lan"], "import_roots": ["/data/corpora"],
"webhooks": [{"url": "https://ntfy.sh/my-runs", "format": "ntfy"}],
"serving": {"enabled": false, "port": 8090, "lan": false}}``; every key optional. A bad file is a
:class:`SettingsError` naming the file and the field, never a silent default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from services.errors import ForgeError
from services.workspace import Workspace, write_atomic

KEYS = ("allowed_hosts", "import_roots", "webhooks", "serving", "confirm_minutes")
CONFIRM_MINUTES = 30.0  # the Train page asks before starting a run estimated longer than this
WEBHOOK_FORMATS = ("json", "ntfy", "slack", "discord")
SERVE_PORT = 8090  # the OpenAI-compatible endpoint's default port (the app's is 8080)


class SettingsError(ForgeError):
    """``.forgellm/settings.json`` is not what it should be; the message names the file and the field."""


@dataclass(frozen=True)
class Webhook:
    """Where run events are POSTed, and in which message format (generic JSON, ntfy, Slack or Discord)."""

    url: str
    format: str = "json"


@dataclass(frozen=True)
class Serving:
    """The OpenAI-compatible endpoint: started with the app (``enabled``), its port, and LAN access (token-gated)."""

    enabled: bool = False
    port: int = SERVE_PORT
    lan: bool = False


@dataclass(frozen=True)
class Settings:
    allowed_hosts: tuple[str, ...] = ()
    import_roots: tuple[Path, ...] = ()
    webhooks: tuple[Webhook, ...] = ()
    serving: Serving = Serving()
    confirm_minutes: float | None = CONFIRM_MINUTES  # None: never ask


def settings_path(ws: Workspace) -> Path:
    return ws.root / ".forgellm" / "settings.json"


def _strings(path: Path, data: dict, key: str) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise SettingsError(f"{path}: {key}: expected a list of non-empty strings, got {json.dumps(value)[:80]}")
    return [v.strip() for v in value]


def load_settings(ws: Workspace) -> Settings:
    """The workspace's settings (empty when there is no file)."""
    path = settings_path(ws)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Settings()
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path}: cannot be read ({e})") from None
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError as e:
        raise SettingsError(f"{path}:{getattr(e, 'lineno', '?')}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a JSON object with {' and/or '.join(KEYS)}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise SettingsError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    hosts = [h.lower() for h in _strings(path, data, "allowed_hosts")]
    roots = []
    for i, value in enumerate(_strings(path, data, "import_roots")):
        root = Path(value).expanduser()
        if not root.is_absolute():
            raise SettingsError(f"{path}: import_roots[{i}]: {value!r} is not an absolute folder path")
        roots.append(root.resolve())
    return Settings(tuple(hosts), tuple(roots), tuple(_webhooks(path, data.get("webhooks", []))),
                    _serving(path, data.get("serving", {})),
                    check_confirm_minutes(data.get("confirm_minutes", CONFIRM_MINUTES), f"{path}: confirm_minutes"))


def check_port(value: object, where: str = "port") -> int:
    """A TCP port to listen on (1024-65535), or :class:`SettingsError` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1024 <= value <= 65535:
        raise SettingsError(f"{where}: {value!r}: give a port number from 1024 to 65535")
    return value


def _serving(path: Path, value: object) -> Serving:
    if not isinstance(value, dict):
        raise SettingsError(f"{path}: serving: expected an object like {{\"enabled\": false, \"port\": {SERVE_PORT}, "
                            "\"lan\": false}")
    unknown = sorted(set(value) - {"enabled", "port", "lan"})
    if unknown:
        raise SettingsError(f"{path}: serving: unknown key(s) {', '.join(unknown)}; known: enabled, port, lan")
    for key in ("enabled", "lan"):
        if not isinstance(value.get(key, False), bool):
            raise SettingsError(f"{path}: serving.{key}: expected true or false, got {json.dumps(value[key])[:40]}")
    return Serving(value.get("enabled", False), check_port(value.get("port", SERVE_PORT), f"{path}: serving.port"),
                   value.get("lan", False))


def check_confirm_minutes(value: object, where: str = "confirm_minutes") -> float | None:
    """The Train page's "ask before a run longer than" threshold in minutes (``None``: never ask), or
    :class:`SettingsError` saying what is wrong with it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100_000:
        raise SettingsError(f"{where}: {json.dumps(value)[:40]}: give minutes above 0 (or null: never ask)")
    return float(value)


def check_webhook(url: str, fmt: str = "json", where: str = "webhook") -> Webhook:
    """A webhook, or :class:`SettingsError` saying what is wrong with its URL or format."""
    url = (url or "").strip()
    if not url.startswith(("http://", "https://")) or len(url) < 10 or any(c.isspace() for c in url):
        raise SettingsError(f"{where}: url {url!r}: give an http:// or https:// address")
    if fmt not in WEBHOOK_FORMATS:
        raise SettingsError(f"{where}: format {fmt!r}: choose one of {', '.join(WEBHOOK_FORMATS)}")
    return Webhook(url, fmt)


def _webhooks(path: Path, value: object) -> list[Webhook]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise SettingsError(f"{path}: webhooks: expected a list of {{\"url\": ..., \"format\": ...}} objects")
    return [check_webhook(str(v.get("url", "")), str(v.get("format", "json")), f"{path}: webhooks[{i}]")
            for i, v in enumerate(value)]


def _write(ws: Workspace, settings: Settings) -> Settings:
    """Write ``settings`` as the workspace's settings file; returns them as read back."""
    data = {"allowed_hosts": list(settings.allowed_hosts), "import_roots": [str(r) for r in settings.import_roots],
            "webhooks": [{"url": h.url, "format": h.format} for h in settings.webhooks],
            "serving": {"enabled": settings.serving.enabled, "port": settings.serving.port,
                        "lan": settings.serving.lan},
            "confirm_minutes": settings.confirm_minutes}
    write_atomic(settings_path(ws), json.dumps(data, indent=2) + "\n")
    return load_settings(ws)


def set_webhooks(ws: Workspace, hooks: list[Webhook]) -> Settings:
    """Replace the webhooks (each checked); the other settings stay."""
    return _write(ws, replace(load_settings(ws), webhooks=tuple(check_webhook(h.url, h.format) for h in hooks)))


def set_serving(ws: Workspace, enabled: bool, port: int, lan: bool) -> Settings:
    """Keep the endpoint's settings (the port checked); the other settings stay."""
    return _write(ws, replace(load_settings(ws), serving=Serving(bool(enabled), check_port(port), bool(lan))))


def add_settings(ws: Workspace, allowed_hosts: list[str] = (), import_roots: list[str | os.PathLike] = ()) -> Settings:
    """Add host names and import folders to the settings file (kept for later starts); returns the new settings."""
    current = load_settings(ws)
    hosts = list(current.allowed_hosts)
    for h in allowed_hosts:
        h = h.strip().lower()
        if not h or "/" in h:
            raise SettingsError(f"allowed host {h!r}: give a host name or address, without scheme or path")
        if h not in hosts:
            hosts.append(h)
    roots = [str(r) for r in current.import_roots]
    for r in import_roots:
        root = Path(r).expanduser().resolve()
        if not root.is_dir():
            raise SettingsError(f"import root {str(r)!r}: no such folder")
        if str(root) not in roots:
            roots.append(str(root))
    return _write(ws, replace(current, allowed_hosts=tuple(hosts), import_roots=tuple(Path(r) for r in roots)))


def set_confirm_minutes(ws: Workspace, minutes: float | None) -> Settings:
    """Set the threshold above which the Train page asks before starting a run (``None``: never ask)."""
    return _write(ws, replace(load_settings(ws), confirm_minutes=check_confirm_minutes(minutes)))
