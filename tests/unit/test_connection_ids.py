"""Connection ids: the process's id and a counter, unique across the workers of one host."""

from __future__ import annotations

import os

from qpgevent.connection import Connection


def test_ids_name_the_process_and_count_up():
    first, second = Connection("192.0.2.1", 25).id, Connection("192.0.2.1", 25).id
    assert first.split(".")[0] == second.split(".")[0] == f"{os.getpid():x}"
    assert int(second.split(".")[1], 16) > int(first.split(".")[1], 16)


def test_a_forked_worker_names_itself_not_its_parent():
    # The pid is kept, not asked per connection: a fork must renew it (workers are forks).
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write_end, Connection("192.0.2.1", 25).id.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)  # cooperative (gevent's); its few bytes wait in the pipe meanwhile
    with os.fdopen(read_end, "rb") as pipe:
        child_id = pipe.read().decode()
    assert child_id.split(".")[0] == f"{child:x}"
