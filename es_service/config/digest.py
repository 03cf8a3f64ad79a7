"""A config's digest: the hash of what decides theta's path, which checkpoints and run.json record."""

from __future__ import annotations

import hashlib
import json
from typing import Any

ADDED_FIELDS = {
    "es.w3.kind": "full",
    "network.layer_sizes": [784, 512, 512, 10],
    "network.scale_exponent": 125,
}
"""Trajectory fields added after runs were recorded, with the value those runs had: hashed only when
set to another."""


def digest_of(data: dict[str, Any]) -> str:
    """``Config.digest`` of a config dict as it was written. A checkpoint from before a field existed
    holds a dict without it, and its digest was taken without it: hashing the dict as stored (not
    the Config it loads into, which fills in the new field's default) keeps old checkpoints loadable.
    Where a run executes (workers, data_dir) and how often it reports (eval, checkpoint) are left out."""
    data = json.loads(json.dumps(data))
    data.pop("workers", None)
    data.pop("data_dir", None)
    data["eval"] = None
    data["checkpoint"] = None
    for name, default in ADDED_FIELDS.items():  # runs that leave a newer field at its default keep their digest
        *sections, field = name.split(".")
        parent = data
        for section in sections:
            parent = parent.get(section, {}) if isinstance(parent, dict) else {}
        if isinstance(parent, dict) and parent.get(field, default) == default:
            parent.pop(field, None)
    es = data.get("es", {})
    if all(es.get(name) is None for name in ("noise_std_final", "learning_rate_final", "batch_size_final")):
        data.pop("generations", None)  # schedules stretch over `generations`; otherwise it only says when to stop
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
