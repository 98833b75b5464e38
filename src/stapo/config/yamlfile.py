"""YAML read as a config: aliases bounded, duplicate keys refused, every fault one line naming the source.

PyYAML builds an alias as a shared reference, so nine nested aliases of nine items each (1.6 KB, a
"billion laughs") load at once and explode later, when the config is copied or saved. The document
is therefore composed to nodes first and its size *after* alias expansion is counted, each node
once (memoised), before anything is constructed. The same pass refuses a key given twice in one
mapping (PyYAML keeps the last one silently) and names both lines; ``<<`` merge keys are not
duplicates, since a key written beside a merge is meant to override it.
"""

from __future__ import annotations

from typing import Any

import yaml

from .schema import ConfigError

# values after alias expansion: a real config has a few hundred; 100,000 is far above any sane use
MAX_VALUES = 100_000
_MERGE = "tag:yaml.org,2002:merge"


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` with the checks above; ``source`` names the file or the override."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _ExpansionCheck(source).size(node, "")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    finally:
        loader.dispose()


class _ExpansionCheck:
    def __init__(self, source: str):
        self.source, self.sizes, self.open = source, {}, set()

    def size(self, node: yaml.Node, path: str) -> int:
        """Values under ``node`` once every alias is expanded (``path``: where it is, for messages)."""
        key = id(node)
        if key in self.sizes:  # an alias to a node already counted: its size, without walking it again
            return self.sizes[key]
        if key in self.open:
            raise ConfigError(f"{self.source}: line {node.start_mark.line + 1}: an alias refers to itself"
                              f"{f' (under {path})' if path else ''}")
        self.open.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for k, v in node.value:
                if k.tag == _MERGE:
                    total += self.size(v, path)
                    continue
                name = k.value if isinstance(k, yaml.ScalarNode) else "?"
                where = f"{path}.{name}" if path else name
                if isinstance(k, yaml.ScalarNode):
                    line = k.start_mark.line + 1
                    if (k.tag, k.value) in seen:
                        raise ConfigError(f"{self.source}: line {line}: duplicate key {where!r} "
                                          f"(first given on line {seen[k.tag, k.value]})")
                    seen[k.tag, k.value] = line
                total += self.size(k, where) + self.size(v, where)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                total += self.size(v, f"{path}[{i}]")
        self.open.discard(key)
        if total > MAX_VALUES:
            raise ConfigError(f"{self.source}: YAML aliases expand to more than {MAX_VALUES:,} values"
                              f"{f' under {path!r}' if path else ''}; write the values out instead")
        self.sizes[key] = total
        return total
