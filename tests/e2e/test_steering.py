"""Steering a live ``qpgevent`` process: kick a session, drain a worker, block an address.

Black box: the real server as a child process (two workers), real SMTP clients on
loopback, the real ``qpgevent kick / drain-worker / block / release / blocks`` commands
and the admin server's POST routes. What each test asserts is what a client or the
operator sees: the 421, the session gone from /status.json, the log line, the new
worker, the message delivered.
"""

from __future__ import annotations

import json
import smtplib
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from qpgevent.testing import maildir_messages, wait_until

from test_admin import get

TOKEN = "steer-token"
MESSAGE = b"Subject: steering\r\n\r\nHello.\r\n"


@pytest.fixture
def steered(server_process):
    def start(**settings):
        settings.setdefault("admin_listen", "127.0.0.1:0")
        settings.setdefault("admin_token", TOKEN)
        settings.setdefault("workers", 2)
        server = server_process(**settings)
        assert server.admin_url, server.log()
        return server
    return start


def qpgevent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qpgevent", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def sessions(server) -> list[dict]:
    code, _, body = get(server.admin_url + "/status.json", TOKEN)
    assert code == 200, body
    return json.loads(body)["sessions"]


def row_of(server, source: str) -> dict:
    return wait_until(lambda: next((r for r in sessions(server) if r["remote_ip"] == source
                                    and r["doing"] == "waiting" and r["helo"]), None), 10, f"{source} on the board")


class Raw:
    """A client on a plain socket: what the server says, unasked, is read as it comes."""

    def __init__(self, server, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=30, source_address=(source, 0))
        self.received = b""

    def until(self, ending: bytes) -> bytes:
        while not self.received.endswith(ending):
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.received += chunk
        return self.received

    def hello(self) -> None:
        assert self.until(b"\r\n").startswith(b"220 ")
        self.sock.sendall(b"EHLO steered.client.test\r\n")
        while not any(line.startswith(b"250 ") for line in self.received.split(b"\r\n")[1:]):
            chunk = self.sock.recv(4096)
            assert chunk, self.received
            self.received += chunk

    def rest(self) -> bytes:
        """Everything until the server closes."""
        self.received = b""
        return self.until(b"\0never")

    def close(self) -> None:
        self.sock.close()


def test_a_held_session_kicked_gets_421_and_leaves_the_board(steered):
    server = steered()
    client = Raw(server, "127.0.0.21")
    try:
        client.hello()
        row = row_of(server, "127.0.0.21")
        listed = qpgevent("status", "--url", server.admin_url, "--token", TOKEN, "--sessions")
        assert f"conn={row['id']} pid={row['pid']} 127.0.0.21 ready" in listed.stdout, listed.stdout
        kicked = qpgevent("kick", row["id"], "--url", server.admin_url, "--token", TOKEN)
        assert kicked.returncode == 0, kicked.stderr
        assert f"kicked {row['id']} (worker {row['pid']})" in kicked.stdout
        said = client.rest()
        assert said.startswith(b"421 4.7.0 mx.example.test Closing connection at the operator's request\r\n"), said
    finally:
        client.close()
    assert all(r["id"] != row["id"] for r in sessions(server))
    assert f"conn={row['id']} kicked by the operator" in server.log()
    wait_until(lambda: f"conn={row['id']} disconnect:" in server.log(), 10, "the summary line")
    summary = next(line for line in server.log().splitlines() if f"conn={row['id']} disconnect:" in line)
    assert "last_reply=421" in summary
    # Kicking it again, or a made-up session: no such session, exit 1.
    again = qpgevent("kick", row["id"], "--url", server.admin_url, "--token", TOKEN)
    assert again.returncode == 1 and "no live session" in again.stderr


def test_a_parked_session_is_kicked_too(steered):
    server = steered(park_after=0.05)
    client = Raw(server, "127.0.0.22")
    try:
        client.hello()
        row = row_of(server, "127.0.0.22")
        # Idle 20 times park_after: parked (the log line below says so, or the test fails).
        wait_until(lambda: next(r for r in sessions(server) if r["id"] == row["id"])["age"] >= 1.0, 10, "idle 1s")
        code, _, body = post(server, "/kick", {"id": row["id"]})
        assert code == 200 and json.loads(body) == {"kicked": row["id"], "pid": row["pid"], "gone": True}, body
        assert client.rest().startswith(b"421 4.7.0 ")
    finally:
        client.close()
    assert f"conn={row['id']} kicked by the operator (was parked)" in server.log()


def post(server, path: str, params: dict, token: str | None = TOKEN, form: bool = False,
         headers: dict | None = None) -> tuple[int, dict, bytes]:
    if form:
        from urllib.parse import urlencode
        data, kind = urlencode(params).encode(), "application/x-www-form-urlencoded"
    else:
        data, kind = json.dumps(params).encode(), "application/json"
    request = urllib.request.Request(server.admin_url + path, data=data, method="POST",
                                     headers={"Content-Type": kind, **(headers or {})})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_steering_needs_the_token_in_a_header_or_the_form(steered, server_process):
    server = steered()
    client = Raw(server, "127.0.0.23")
    try:
        client.hello()
        row = row_of(server, "127.0.0.23")
        assert post(server, "/kick", {"id": row["id"]}, token=None)[0] == 401  # loopback is not enough
        assert post(server, "/kick", {"id": row["id"]}, token="wrong")[0] == 401
        # Not in the URL, not in a cookie: a cross-site form cannot carry them.
        assert post(server, f"/kick?token={TOKEN}", {"id": row["id"]}, token=None)[0] == 401
        assert post(server, "/kick", {"id": row["id"]}, token=None, headers={"Cookie": f"token={TOKEN}"})[0] == 401
        assert post(server, "/drain", {"pid": row["pid"]}, token=None, form=True)[0] == 401
        assert post(server, "/block", {"address": "127.0.0.23"}, token=None, form=True)[0] == 401
        assert row["id"] in {r["id"] for r in sessions(server)}  # nothing was done
        no_token = qpgevent("kick", row["id"], "--url", server.admin_url)
        assert no_token.returncode == 2 and "token" in no_token.stderr
        # The page's form: the token as a field; the answer sends the browser back to /status.
        page = get(server.admin_url + f"/status?token={TOKEN}")[2].decode()
        assert f'<input type="hidden" name="id" value="{row["id"]}"><button>kick</button>' in page
        code, headers, _ = post(server, "/kick", {"id": row["id"], "token": TOKEN}, token=None, form=True)
        assert code == 303 and headers["Location"].startswith(f"/status?token={TOKEN}&done="), headers
        assert client.rest().startswith(b"421 4.7.0 ")
    finally:
        client.close()
    # Without a configured token, nothing can be steered over HTTP, even from loopback.
    bare = server_process(admin_listen="127.0.0.1:0")
    code, _, body = post(bare, "/drain", {"pid": bare.worker_pids()[0]}, token=None)
    assert code == 403 and b"set [admin] token" in body


def test_a_drained_worker_is_replaced_and_its_session_finishes_its_message(steered):
    server = steered(shutdown_timeout=60)
    before = set(server.worker_pids())
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="draining.client.test", timeout=30,
                      source_address=("127.0.0.24", 0)) as held:
        held.ehlo()
        assert held.mail("a@client.test")[0] == 250
        assert held.rcpt("bob@example.test")[0] == 250
        row = wait_until(lambda: next((r for r in sessions(server) if r["remote_ip"] == "127.0.0.24"
                                       and r["state"] == "rcpt"), None), 10, "the held session")
        drained = qpgevent("drain-worker", str(row["pid"]), "--url", server.admin_url, "--token", TOKEN)
        assert drained.returncode == 0, drained.stderr
        wait_until(lambda: len(set(server.worker_pids()) - before) == 1, 20, "the new worker")
        assert row["pid"] in server.worker_pids()  # still finishing its session
        # New clients are served meanwhile, none refused.
        for number in range(4):
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as other:
                assert other.sendmail("c@client.test", ["bob@example.test"], MESSAGE) == {}
        assert held.data(MESSAGE)[0] == 250
    wait_until(lambda: f"(pid {row['pid']}) of generation 1 exited with status 0" in server.log(), 30,
               "the drained worker to exit")
    assert row["pid"] not in server.worker_pids() and len(server.worker_pids()) == 2
    assert len(maildir_messages(server.maildir)) == 5
    log = server.log()
    assert f"(pid {row['pid']}) drained by the operator" in log
    assert "respawning" not in log
    # A pid that is no worker: refused, exit 1.
    wrong = qpgevent("drain-worker", "1", "--url", server.admin_url, "--token", TOKEN)
    assert wrong.returncode == 1 and "no worker with pid 1" in wrong.stderr


def refused_at_connect(server, source: str) -> bytes | None:
    """The 421 a blocked client gets at once, or None when greeted."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30, source_address=(source, 0)) as sock:
        first = b""
        while not first.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            first += chunk
        return first if first.startswith(b"421") else None


def test_a_blocked_address_is_refused_at_connect_by_every_worker_until_released(steered, tmp_path):
    server = steered()
    ini = str(tmp_path / "qpsmtpd.ini")
    made = qpgevent("block", "127.0.0.25", "--for", "1h", "--reason", "too many bounces", "-c", ini)
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("127.0.0.25\tuntil ") and "too many bounces" in made.stdout
    refusal = wait_until(lambda: refused_at_connect(server, "127.0.0.25"), 10, "the block to hold")
    assert refusal == b"421 4.7.0 mx.example.test Your address is blocked for a while, try again later\r\n"
    # Every worker refuses it (connections spread over the workers as the kernel hands them
    # out; a worker that had no connection for a while looks at the store when one comes).
    workers = set(server.worker_pids())

    def refusing() -> set[int]:
        return {int(line.split("conn=")[1].split(".")[0], 16) for line in server.log().splitlines()
                if "127.0.0.25 is blocked by the operator (127.0.0.25): too many bounces" in line}

    wait_until(lambda: refused_at_connect(server, "127.0.0.25") is not None and refusing() == workers, 60,
               "a refusal from every worker", 0.01)
    for _ in range(10):  # and from then on, whichever worker takes the connection
        assert refused_at_connect(server, "127.0.0.25")
    # No session began for a refused connection: its one log line is the refusal (no hook ran).
    # (The server writes its log on its own time: wait for the lines of the refusals above.)
    def refused_ids() -> list[str]:
        return [line.split("conn=")[1].split()[0] for line in server.log().splitlines()
                if "is blocked by the operator" in line]
    wait_until(lambda: len(refused_ids()) >= 12, 10, "the refusals in the log")
    log = server.log().splitlines()
    for conn_id in [line.split("conn=")[1].split()[0] for line in log if "is blocked by the operator" in line]:
        assert sum(f"conn={conn_id} " in line for line in log) == 1, conn_id
    # Others are served.
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30, source_address=("127.0.0.26", 0)) as other:
        assert other.sendmail("a@client.test", ["bob@example.test"], MESSAGE) == {}
    listed = qpgevent("blocks", "-c", ini, "--json")
    assert [(b["network"], b["reason"]) for b in json.loads(listed.stdout)] == [("127.0.0.25", "too many bounces")]
    assert json.loads(get(server.admin_url + "/blocks.json", TOKEN)[2])[0]["network"] == "127.0.0.25"
    released = qpgevent("release", "127.0.0.25", "-c", ini)
    assert released.returncode == 0 and released.stdout == "released 127.0.0.25\n"
    wait_until(lambda: all(refused_at_connect(server, "127.0.0.25") is None for _ in range(10)), 30,
               "the release to hold in every worker (ten greetings in a row)")
    assert qpgevent("release", "127.0.0.25", "-c", ini).returncode == 1  # not blocked any more
    assert json.loads(qpgevent("blocks", "-c", ini, "--json").stdout) == []


def test_a_block_lapses_by_itself_and_the_page_blocks_networks(steered):
    server = steered()
    code, _, body = post(server, "/block", {"address": "127.0.0.64/28", "for": "3s", "reason": "a short one"})
    assert code == 200 and json.loads(body)["network"] == "127.0.0.64/28", body
    wait_until(lambda: refused_at_connect(server, "127.0.0.70"), 10, "the network block to hold")
    assert refused_at_connect(server, "127.0.0.80") is None  # outside the /28
    page = get(server.admin_url + f"/status?token={TOKEN}")[2].decode()
    assert "127.0.0.64/28 until" in page and "a short one" in page
    wait_until(lambda: json.loads(get(server.admin_url + "/blocks.json", TOKEN)[2]) == [], 30, "the block to lapse")
    for _ in range(10):  # every worker, whatever it last read from the store, lets it in again
        assert refused_at_connect(server, "127.0.0.70") is None
    # The page's release form, and what the page then says.
    post(server, "/block", {"address": "127.0.0.71", "for": "1h"})
    code, headers, _ = post(server, "/release", {"address": "127.0.0.71", "token": TOKEN}, token=None, form=True)
    assert code == 303
    page = get(server.admin_url + headers["Location"])[2].decode()
    assert "released True" in page
    assert post(server, "/block", {"address": "not-an-address"})[0] == 400


def test_a_hostile_admin_client_meets_the_limits(steered, tmp_path):
    server = steered()
    code, _, body = post(server, "/block", {"address": "127.0.0.30", "reason": "x" * 9000})
    assert code == 413 and b"at most 8192 octets" in body
    assert post(server, "/kick", {"id": "../../etc/passwd"})[0] == 404  # only ids on the board
    assert post(server, "/nothing", {})[0] == 404
    # A worker that takes no requests (here: a process that ignores the signal) gets at most
    # MAX_PENDING of them; then they are refused, not piled up.
    from qpgevent.server import steering
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_dir = str(tmp_path / "run")
        for number in range(steering.MAX_PENDING):
            steering.ask_to_kick(run_dir, idle.pid, f"1.{number:x}")
        try:
            steering.ask_to_kick(run_dir, idle.pid, "1.ffff")
        except ValueError as error:
            assert "requests waiting already" in str(error)
        else:
            raise AssertionError("a request past MAX_PENDING was taken")
        steering.forget_worker(run_dir, idle.pid)
        steering.ask_to_kick(run_dir, idle.pid, "1.ffff")  # the master reaped it: the folder is gone
    finally:
        idle.kill()
        idle.wait()
