"""Write a copy of a checkpoint whose theta is multiplied by C (for ``es-service train --init-from``).

    python scaled_checkpoint.py CHECKPOINT C OUT_CHECKPOINT
"""

import sys
from pathlib import Path

import torch

from es_service import checkpoint

source, scale, out = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
if out.exists():
    sys.exit(f"{out} exists; choose another path (nothing was written)")
checkpoint.load(source)  # checks it, and names the problem if it is not a checkpoint
state = torch.load(source, map_location="cpu", weights_only=True)  # the config dict as written (its digest)
state["theta"] = state["theta"] * scale
checkpoint.save(state, out)
print(f"wrote {out}: theta of {source} times {scale}")
