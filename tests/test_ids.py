"""Fast unique ids for requests, attempts, events and reservations."""

from __future__ import annotations

import os

from asgi_llm._ids import new_id


class TestIds:
    def test_unique_and_shaped(self) -> None:
        """Ids are 32 lowercase hex digits and never repeat."""
        ids = [new_id() for _ in range(50_000)]
        assert len(set(ids)) == len(ids)
        assert all(len(i) == 32 and int(i, 16) >= 0 and i == i.lower() for i in ids[:100])

    def test_forked_child_does_not_repeat_parent(self) -> None:
        """A forked worker draws a new prefix, so it never hands out the parent's next ids."""
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read)
            os.write(write, "".join(new_id() for _ in range(100)).encode())
            os._exit(0)
        os.close(write)
        child = b""
        while chunk := os.read(read, 65536):
            child += chunk
        os.close(read)
        os.waitpid(pid, 0)
        child_ids = {child[i:i + 32].decode() for i in range(0, len(child), 32)}
        parent_ids = {new_id() for _ in range(100)}
        assert len(child_ids) == 100 and not child_ids & parent_ids
        assert {c[:16] for c in child_ids} != {p[:16] for p in parent_ids}
