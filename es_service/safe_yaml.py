"""YAML read with bounds, for configs and ``--set`` values: everything else sees only what this returns.

A few hundred bytes of nested aliases (``a1: [*a0, *a0, ...]``) stand for billions of nodes: PyYAML
builds them as shared objects, and the first deep copy or validation expands them. So the node graph
is composed first, with every alias counted as the nodes it stands for, and refused past
``MAX_NODES`` (or ``MAX_DEPTH`` levels, or an alias inside the node it names) before any Python
value is built from it. Safe loading otherwise: no tag runs code. A key given twice in one mapping
is an error (PyYAML keeps the last), and so is a key that is a list or a mapping.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml

MAX_BYTES = 1 << 20
"""Largest config file read (a full config is about 3 KB)."""
MAX_NODES = 10_000
"""Most YAML nodes (scalars, lists, mappings) a config may stand for once its aliases are expanded;
a full config has about 100."""
MAX_INT_DIGITS = 100
"""Longest integer read; the largest any field takes (a seed) has 19 digits."""
MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_DEPTH = 16
"""Deepest nesting of lists and mappings (a config nests three deep); also keeps PyYAML's recursive
composer and constructor far from Python's recursion limit."""


class TooLarge(yaml.YAMLError):
    """The text stands for more than a config could hold; ``str`` says which bound and where."""

    def __init__(self, problem: str, mark: yaml.Mark):
        super().__init__(f"at line {mark.line + 1}, column {mark.column + 1}: {problem}")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes ``node`` stands for with every alias in it expanded; memoised in ``sizes`` (by id), so a
    graph of n nodes costs O(n) however large its expansion. The node is complete and acyclic: an
    alias into an unfinished node is refused before it gets here."""
    stack = [node]
    while stack:
        top = stack[-1]
        if id(top) in sizes:
            stack.pop()
            continue
        pending = [child for child in _children(top) if id(child) not in sizes]
        if pending:
            stack.extend(pending)
            continue
        sizes[id(top)] = 1 + sum(sizes[id(child)] for child in _children(top))
        stack.pop()
    return sizes[id(node)]


class _Loader(yaml.SafeLoader):
    def __init__(self, text: str):
        super().__init__(text)
        self.nodes = 0
        self.depth = 0
        self.open_anchors: list[str] = []  # anchors of the collections being composed
        self.sizes: dict[int, int] = {}

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.open_anchors:
                raise TooLarge(
                    f"the alias *{event.anchor} lies inside the node it names; write that value out", event.start_mark
                )
            target = self.anchors.get(event.anchor)  # an undefined one: PyYAML's own error below
            self._count(_expanded_size(target, self.sizes) if target is not None else 0, event)
            return super().compose_node(parent, index)
        self._count(1, event)
        collection = isinstance(event, yaml.CollectionStartEvent)
        if collection and self.depth >= MAX_DEPTH:
            raise TooLarge(
                f"lists and mappings nest more than {MAX_DEPTH} deep; a config nests three deep", event.start_mark
            )
        self.depth += collection
        anchor = event.anchor if collection else None
        self.open_anchors.append(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self.open_anchors.pop()
            self.depth -= collection

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        # a scalar no plain type holds: a 13th month, `!!float x`; AttributeError: `!!timestamp x`
        except (ValueError, OverflowError, AttributeError) as err:
            raise yaml.constructor.ConstructorError(None, None, str(err), node.start_mark) from None

    def _count(self, nodes: int, event: yaml.Event) -> None:
        self.nodes += nodes
        if self.nodes > MAX_NODES:
            raise TooLarge(
                f"more than {MAX_NODES:,} values, aliases expanded (a config holds about 100); "
                "write the fields out, without nested aliases",
                event.start_mark,
            )


def _mapping(loader: _Loader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == MERGE_TAG:  # `<<: *base`: merged keys may be overridden, PyYAML merges them
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, f"a {type(key).__name__} used as a key; keys are field names", key_node.start_mark
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


def _int(loader: _Loader, node: yaml.ScalarNode) -> int:
    digits = sum(char.isdigit() for char in node.value) if isinstance(node, yaml.ScalarNode) else 0
    if digits > MAX_INT_DIGITS:  # else Python's own limit speaks, suggesting sys.set_int_max_str_digits
        raise yaml.constructor.ConstructorError(
            None, None, f"an integer of {digits} digits; no field takes one that large", node.start_mark
        )
    return loader.construct_yaml_int(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor("tag:yaml.org,2002:int", _int)


def load(text: str) -> Any:
    """The one YAML document in ``text`` (None when empty). Raises ``TooLarge`` past a bound, and
    yaml.YAMLError for text that is not YAML or a value no plain type holds (a 13th month, an integer
    of 200 digits)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        return loader.construct_document(node)
    finally:
        loader.dispose()
