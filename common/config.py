"""Named configurations shipped in `configs/` (cohorts, profiles) and how to load them."""

from __future__ import annotations

import tomllib
from pathlib import Path

from common.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config(name_or_path: str, kind: str) -> Path:
    """A named config (configs/<kind>/<name>.toml) or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: {kind} file not found")
        return path
    candidate = CONFIG_DIR / kind / f"{name_or_path}.toml"
    if not candidate.is_file():
        available = sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.toml"))
        raise ConfigError(f"unknown {kind[:-1]} {name_or_path!r}; available: {', '.join(available)}")
    return candidate


def load_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err}") from err


def load_profile(name_or_path: str = "cpu") -> dict:
    """A run profile (configs/profiles/<name>.toml): preprocessing and model sizes per stage."""
    path = resolve_config(name_or_path, "profiles")
    profile = load_toml(path)
    profile.setdefault("name", path.stem)
    spacing = profile.get("preprocess", {}).get("spacing")
    if spacing is None or len(spacing) != 3 or min(spacing) <= 0:
        raise ConfigError(f"{path}: preprocess.spacing must be three positive numbers (x, y, z) mm, got {spacing}")
    return profile
