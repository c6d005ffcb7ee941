"""Per-user prefix KV cache: a user's shots are prefilled once and reused by all their questions.

Why: an FSPO prompt is the user's shots (hundreds to thousands of tokens) followed by a short
question, and the shots only change when the user's preferences do. Keeping the key/value tensors
of that shared prefix (a transformers `DynamicCache`) turns each later request's prefill into the
question's few tokens.

Entries are keyed on (model id, template options, the exact prefix token ids), so a different
model, layout or shot set can never hit another's entry; the server also drops a user's entries
when their preferences change (`forget`). The cache is a least-recently-used map bounded by the
bytes of its key/value tensors. `get` hands out a deep copy, because `model.generate` extends the
cache it is given in place and the stored prefix must stay exactly the prefix.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

CacheKey = tuple[str, str, tuple[int, ...]]  # (model id, template options as JSON, prefix ids)


def kv_bytes(cache: Any) -> int:
    """Bytes held by the key and value tensors of a transformers cache (all layers)."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class _Entry:
    kv: Any
    nbytes: int
    owners: set[str] = field(default_factory=set)


class PrefixCache:
    """A bounded LRU of prefilled prefixes; thread-safe (the server forgets from request threads
    while another request generates)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (got {max_bytes})")
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._bytes = 0
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Any | None:
        """A private copy of the stored cache for `key` (then most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            kv = entry.kv
        return copy.deepcopy(kv)  # outside the lock: a copy of a long prefix takes a while

    def put(self, key: Hashable, kv: Any, owner: str | None = None) -> bool:
        """Store `kv` (the caller must not change it afterwards) under `key` for `owner`, evicting
        the least recently used entries beyond `max_bytes`. An entry larger than the whole budget
        is not stored (returns False)."""
        nbytes = kv_bytes(kv)
        with self._lock:
            old = self._entries.pop(key, None)
            owners = set() if old is None else old.owners
            if old is not None:
                self._bytes -= old.nbytes
            if owner is not None:
                owners.add(owner)
            if nbytes > self.max_bytes:
                return False
            self._entries[key] = _Entry(kv, nbytes, owners)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.evictions += 1
            return True

    def forget(self, owner: str) -> int:
        """Drop every entry `owner` stored (their shots changed); returns how many were dropped."""
        with self._lock:
            keys = [k for k, e in self._entries.items() if owner in e.owners]
            for key in keys:
                self._bytes -= self._entries.pop(key).nbytes
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict[str, int]:
        """The counters at one moment (benchmarks/serve_load.py reports them per served system)."""
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
