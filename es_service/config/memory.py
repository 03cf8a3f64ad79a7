"""Whether a run fits in this machine's memory: checked where a run starts, not with the schema."""

from __future__ import annotations

from es_service.config.base import require
from es_service.config.schema import Config

MNIST_BYTES = 300 << 20  # the images as uint8 for the members, the evaluation sets as float32


def check_fits_memory(config: Config) -> None:
    """Refuse a run that cannot fit in this machine's memory, before its noise table exists. Checked
    where a run starts, not by the schema: a checkpoint made on a larger machine must still load here."""
    need, largest = memory_needed(config)
    total = physical_memory()
    section, name = largest.split(".")
    require(
        total is None or need <= total,
        f"{largest}: {getattr(getattr(config, section), name)} would need about {need / 2**30:.1f} GiB of "
        f"memory for this run, and this machine has {total / 2**30 if total else 0:.1f} GiB; lower {largest}",
    )


def memory_needed(config: Config) -> tuple[int, str]:
    """Bytes a run holds at once on the driver (and on each worker): the noise table, the population's
    offsets, scores and (low rank) gathered noise rows, and one member's activations per CPU thread;
    with the field whose share is largest."""
    import os

    from es_workers.members import noise_length

    es, arch = config.es, config.network.architecture()
    inputs, outputs, hidden = arch.inputs, arch.outputs, max(arch.layer_sizes[1:3])
    batch = max(es.batch_size, es.batch_size_final or 0)
    shards = -(-batch // es.shard_size) if es.shard_size else 1
    members = es.pop_size + sum(layer.pop_size for layer in es.layers())
    shares = {
        "noise.table_size": 4 * config.noise.table_size,
        "es.pop_size": members * (8 * (4 + 2 * shards) + (4 * noise_length(es.rank, arch) if es.rank else 0)),
        "es.batch_size": min(members, os.cpu_count() or 1)
        * 4
        * (arch.num_params + batch * (inputs + 4 * hidden + 2 * outputs)),
    }
    return sum(shares.values()) + MNIST_BYTES, max(shares, key=shares.get)


def physical_memory() -> int | None:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
