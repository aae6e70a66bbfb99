"""The agent's configuration: a TOML file, then command-line flags on top.

Core sections are validated strictly here; each plugin validates its own
section with its own model (see ``agent.plugin.Plugin.config_model``).  A bad
value is refused at start with the key and the reason.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from . import paths


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(7070, ge=1, le=65535)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    max_body_bytes: int = Field(16 << 20, ge=1024)
    max_wait_seconds: float = Field(60.0, gt=0, le=600)
    # asyncio's own loop by default; "uvloop" (or "auto": uvloop when installed) spends
    # about 10% less CPU per request under load but adds ~2.3 MB of RSS.
    event_loop: str = "asyncio"

    @field_validator("event_loop")
    @classmethod
    def _known_loop(cls, v: str) -> str:
        if v not in ("auto", "uvloop", "asyncio"):
            raise ValueError("must be 'auto', 'uvloop' or 'asyncio'")
        if v == "uvloop":
            try:
                import uvloop  # noqa: F401
            except ImportError:
                raise ValueError("uvloop is not installed (pip install uvloop), "
                                 "use 'auto' or 'asyncio'") from None
        return v


class AuthConfig(_Section):
    token_file: Path | None = None   # default: <state dir>/token


class StateConfig(_Section):
    dir: Path | None = None          # default: /var/lib/node-agent as root
    result_ttl_seconds: int = Field(2 * 24 * 3600, ge=1)


class LogConfig(_Section):
    format: str = "text"
    level: str = "INFO"

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in ("text", "json"):
            raise ValueError("must be 'text' or 'json'")
        return v

    @field_validator("level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        if v.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return v.upper()


class LibvirtConfig(_Section):
    uri: str = "qemu:///system"
    call_timeout_seconds: float = Field(30.0, gt=0, le=3600)


class StorageConfig(_Section):
    """The core's keys of the [storage] table (the storage plugin reads the others)."""
    # Every storage url, mount path, image store url and VM disk must lie under one of
    # these (after symlinks are resolved); see agent/paths.py and README, Configuration.
    allowed_roots: list[str] = Field(list(paths.DEFAULT_ROOTS), max_length=64)


class Config(_Section):
    server: ServerConfig = ServerConfig()
    libvirt: LibvirtConfig = LibvirtConfig()
    auth: AuthConfig = AuthConfig()
    state: StateConfig = StateConfig()
    log: LogConfig = LogConfig()
    storage: StorageConfig = StorageConfig()
    # Plugin sections ([host], [libvirt], ...) are kept raw and validated by
    # the plugin that owns them.
    plugins: dict[str, dict[str, Any]] = {}

    @property
    def state_dir(self) -> Path:
        return self.state.dir or default_state_dir()

    @property
    def token_file(self) -> Path:
        return self.auth.token_file or self.state_dir / "token"

    _roots: paths.Roots | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _resolve_roots(self) -> "Config":
        # Resolved once, at start: a root that is (or is in, or holds) a system directory
        # is refused here, so the agent never starts with an unsafe rule.
        try:
            self._roots = paths.Roots.build(self.storage.allowed_roots, state_dir=self.state_dir,
                                            token_file=self.token_file)
        except ValueError as e:
            raise ValueError(f"storage.allowed_roots: {e}") from None
        return self

    @property
    def roots(self) -> paths.Roots:
        """The path rule of every plugin (agent.paths.confine)."""
        return self._roots


CORE_SECTIONS = ("server", "auth", "state", "log", "libvirt")
# Keys of a plugin's table that the core owns: [storage] allowed_roots is the core's path
# rule (every plugin confines paths with it); the storage plugin reads the rest of [storage].
CORE_KEYS = {"storage": ("allowed_roots",)}


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/node-agent")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "node-agent"


def _describe(err: ValidationError, prefix: str = "") -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{prefix}{key}: {msg}" if key else msg)   # no key: a whole-config rule
    return "; ".join(parts)


def load_config(path: str | os.PathLike | None = None,
                overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read the TOML file (if any) and apply flag overrides, section by key."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            if value is not None:
                raw.setdefault(section, {})[key] = value
    core = {k: raw[k] for k in CORE_SECTIONS if k in raw}
    plugins = {k: v for k, v in raw.items() if k not in CORE_SECTIONS}
    for name, section in plugins.items():
        if not isinstance(section, dict):
            raise ConfigError(f"config key '{name}' must be a [section] table")
    for name, keys in CORE_KEYS.items():
        section = plugins.get(name)
        if section is None:
            continue
        core[name] = {k: section[k] for k in keys if k in section}
        plugins[name] = {k: v for k, v in section.items() if k not in keys}
        if not plugins[name]:
            del plugins[name]
    try:
        return Config(**core, plugins=plugins)
    except ValidationError as e:
        raise ConfigError(f"invalid configuration: {_describe(e)}") from None


def validate_section(name: str, model: type[BaseModel], raw: dict[str, Any]) -> BaseModel:
    try:
        return model(**raw)
    except ValidationError as e:
        raise ConfigError(f"invalid configuration: {_describe(e, name + '.')}") from None
