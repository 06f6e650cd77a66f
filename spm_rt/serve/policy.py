"""Operator policies: which SPMs are always on, as a gate floor per concept, optionally per API key.

A policy file (YAML or JSON)::

    floors:              # every request: these gates never go below these values
      red: 1.0
    keys:                # optional, per API key (sent as "X-API-Key: KEY" or "Authorization: Bearer KEY")
      studio-key:
        floors: {circle: 0.5}   # replaces the default floor for the concepts it names
    require_key: false   # true: requests without a listed key get 401

A request can add erasure (``erase``, higher ``gates``) but never lower a gate below its floor:
the server raises it to the floor and reports the gates it used.

Example::

    >>> p = Policy.from_dict({"floors": {"red": 1.0}}, [["circle"], ["red"]])
    >>> p.floor(None)
    [0.0, 1.0]
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class PolicyError(ValueError):
    """A policy file that cannot be used (names the file and the entry)."""


class KeyRejected(Exception):
    """The request's API key is missing or unknown under ``require_key``."""


@dataclass
class Policy:
    """Gate floors per SPM ([K], in gate order): ``default`` for every request, ``keys`` per key."""

    default: list[float]
    keys: dict[str, list[float]] = field(default_factory=dict)
    require_key: bool = False

    @classmethod
    def none(cls, k: int) -> "Policy":
        return cls([0.0] * k)

    @classmethod
    def from_dict(cls, data: dict, concepts: list[list[str]], where: str = "policy") -> "Policy":
        """Build from the parsed file; ``concepts`` is each SPM's concept names in gate order."""
        if not isinstance(data, dict):
            raise PolicyError(f"{where}: expected a mapping with 'floors' / 'keys' / 'require_key'")
        unknown = sorted(set(data) - {"floors", "keys", "require_key"})
        if unknown:
            raise PolicyError(f"{where}: unknown entries {unknown} (expected floors, keys, require_key)")
        default = _floors(data.get("floors") or {}, concepts, f"{where}: floors", [0.0] * len(concepts))
        keys = {}
        raw_keys = data.get("keys") or {}
        if not isinstance(raw_keys, dict):
            raise PolicyError(f"{where}: keys must map API keys to {{floors: ...}}")
        for key, entry in raw_keys.items():
            if not isinstance(entry, dict) or set(entry) - {"floors"}:
                raise PolicyError(f"{where}: keys.{key} must be {{floors: {{concept: value}}}}")
            keys[str(key)] = _floors(entry.get("floors") or {}, concepts, f"{where}: keys.{key}.floors", default)
        require = data.get("require_key", False)
        if not isinstance(require, bool):
            raise PolicyError(f"{where}: require_key must be true or false")
        return cls(default, keys, require)

    @classmethod
    def load(cls, path: str | Path, concepts: list[list[str]]) -> "Policy":
        """Read a YAML or JSON policy file (a missing file or a bad entry names the file)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"--policy {path}: no such file")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise PolicyError(f"--policy {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({exc})") \
                from exc
        return cls.from_dict(data or {}, concepts, where=f"--policy {path}")

    def floor(self, api_key: str | None) -> list[float]:
        """The floor [K] for a request with this key (raises :class:`KeyRejected` where required)."""
        if api_key is not None and api_key in self.keys:
            return list(self.keys[api_key])
        if self.require_key:
            raise KeyRejected("missing API key" if api_key is None else "unknown API key")
        return list(self.default)


def concept_index(concepts: list[list[str]]) -> dict[str, int]:
    """concept name -> SPM index (gate position)."""
    out = {}
    for i, names in enumerate(concepts):
        for name in names or []:
            out.setdefault(name, i)
    return out


def _floors(raw, concepts, where, base) -> list[float]:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected {{concept: floor}}")
    index = concept_index(concepts)
    out = list(base)
    for name, value in raw.items():
        if name not in index:
            raise PolicyError(f"{where}: unknown concept {name!r} (the SPMs erase {sorted(index)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise PolicyError(f"{where}.{name}: floor must be a number in [0, 1], got {value!r}")
        out[index[name]] = float(value)
    return out
