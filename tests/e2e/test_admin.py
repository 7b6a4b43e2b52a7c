"""The admin pages of a real ``qpgevent`` process, with live SMTP sessions held open by the test.

/status.json lists the sessions with the right fields as they move; /metrics counts what
was sent and refused; a token, when set, is required; a non-loopback listen address
without a token does not start. Also: the summary line, JSON logs, AUTH secrets, and the
terminal scoreboard (tools/scoreboard.py).
"""

from __future__ import annotations

import base64
import json
import os
import re
import smtplib
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import gevent
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qpgevent.server import admin

from qpgevent.backends import metrics
from qpgevent.testing import DEFAULT_PLUGINS, wait_until, write_ini

REPO = Path(__file__).resolve().parents[2]
MESSAGE = b"Subject: admin test\r\n\r\nHello.\r\n"
SLOW_HELO = '''
"""slow_helo: holds HELO/EHLO for a while when the client calls itself slow.*."""
import time
from qpgevent.plugin import DECLINED, Plugin


class SlowHelo(Plugin):
    def hook_ehlo(self, session, host):
        if host.startswith("slow."):
            time.sleep(3)
        return DECLINED
'''


def get(url: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def status(server) -> dict:
    code, _, body = get(server.admin_url + "/status.json")
    assert code == 200, body
    return json.loads(body)


def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, _, body = get(server.admin_url + "/metrics")
    assert code == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def client(server, source: str, helo: str) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", server.port, local_hostname=helo, source_address=(source, 0), timeout=30)
    smtp.ehlo()
    return smtp


@pytest.fixture
def admin_server(server_process, tmp_path):
    """A real server with the admin pages on a loopback port the OS picked."""
    def start(plugins: str = DEFAULT_PLUGINS, **settings):
        settings.setdefault("admin_listen", "127.0.0.1:0")
        server = server_process(plugins, **settings)
        assert server.admin_url, server.log()
        return server
    return start


def test_status_json_lists_every_live_session_with_its_fields(admin_server):
    server = admin_server()
    greeted = client(server, "127.0.0.2", "greeted.client.test")
    sending = client(server, "127.0.0.3", "sending.client.test")
    assert sending.mail("alice@client.test")[0] == 250
    assert sending.rcpt("bob@example.test")[0] == 250
    assert sending.rcpt("carol@example.test")[0] == 250
    in_data = client(server, "127.0.0.4", "data.client.test")
    in_data.mail("dave@client.test")
    in_data.rcpt("erin@example.test")
    assert in_data.docmd("DATA")[0] == 354
    in_data.send(b"Subject: half a message\r\n\r\n" + b"x" * 5000 + b"\r\n")  # no final dot: still in DATA
    try:
        data = wait_until(lambda: (lambda d: d if d["totals"]["by_state"] == {"data": 1, "rcpt": 1, "ready": 1}
                                   and any(r["bytes"] > 5000 for r in d["sessions"]) else None)(status(server)),
                          10, "three sessions in their states")
        rows = {row["remote_ip"]: row for row in data["sessions"]}
        assert set(rows) == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}
        workers = server.worker_pids()
        assert sorted(p["pid"] for p in data["processes"]) == sorted(workers)  # not the master
        for row in rows.values():
            assert row["pid"] in workers
            assert row["rdns"] is None  # reverse look-ups are off in tests
            assert row["tls"] is False and row["auth"] is None
            assert 0 <= row["age"] < 60 and row["id"]
        assert (rows["127.0.0.2"]["helo"], rows["127.0.0.2"]["state"], rows["127.0.0.2"]["doing"],
                rows["127.0.0.2"]["sender"], rows["127.0.0.2"]["recipients"]) == (
                    "greeted.client.test", "ready", "waiting", None, 0)
        assert (rows["127.0.0.3"]["state"], rows["127.0.0.3"]["sender"], rows["127.0.0.3"]["recipients"]) == (
            "rcpt", "<alice@client.test>", 2)
        assert (rows["127.0.0.4"]["state"], rows["127.0.0.4"]["doing"], rows["127.0.0.4"]["recipients"]) == (
            "data", "DATA (receiving)", 1)
        assert data["totals"]["sessions"] == 3
        assert sum(p["sessions"] for p in data["processes"]) == 3
        assert data["since_start"]["connections"] == 3
        # The rows move with the sessions.
        assert sending.docmd("RSET")[0] == 250
        wait_until(lambda: status(server)["totals"]["by_state"].get("rcpt") is None, 10, "RSET to show")
    finally:
        for smtp in (greeted, sending, in_data):
            smtp.close()
    wait_until(lambda: status(server)["totals"]["sessions"] == 0, 10, "the sessions to leave the board")


def test_the_board_shows_the_hook_and_plugin_a_session_is_in(admin_server, tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "slow_helo.py").write_text(SLOW_HELO, encoding="utf-8")
    server = admin_server("[[slow_helo]]\n" + DEFAULT_PLUGINS)
    slow = gevent.spawn(client, server, "127.0.0.5", "slow.client.test")
    try:
        row = wait_until(lambda: next(iter(status(server)["sessions"]), None), 10, "the slow session")
        row = wait_until(lambda: next((r for r in status(server)["sessions"] if r["doing"] != "waiting"
                                       and r["doing"] != "connect"), None), 10, "the EHLO hook")
        assert row["doing"] == "ehlo (slow_helo)"
    finally:
        slow.join(10)
        if slow.value is not None:
            slow.value.close()


def test_metrics_count_what_is_sent_and_refused(admin_server):
    server = admin_server()
    before = scrape(server)
    assert before[("qpgevent_connections_open", ())] == 0
    with client(server, "127.0.0.6", "metrics.client.test") as smtp:
        assert smtp.sendmail("a@client.test", ["bob@example.test"], MESSAGE) == {}
        refused = smtp.sendmail("a@client.test", ["bob@example.test", "eve@elsewhere.test"], MESSAGE)
        assert refused == {"eve@elsewhere.test": (550, b"5.7.1 Relaying denied")}
        assert smtp.docmd("RCPT TO:<bob@example.test>")[0] == 503  # out of sequence: the core refuses
        during = scrape(server)
        assert during[("qpgevent_connections_open", ())] == 1
    wait_until(lambda: scrape(server)[("qpgevent_connections_open", ())] == 0, 10, "the session to end")
    after = scrape(server)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("qpgevent_connections_total") == 1
    assert moved("qpgevent_transactions_total") == 2
    assert moved("qpgevent_messages_queued_total", plugin="queue/maildir") == 2
    assert moved("qpgevent_recipients_total", outcome="accepted") == 2
    assert moved("qpgevent_recipients_total", outcome="rejected") == 2  # eve, and the RCPT out of sequence
    assert moved("qpgevent_rejections_total", hook="rcpt", plugin="rcpt_ok", reason="deny") == 1
    assert moved("qpgevent_rejections_total", hook="rcpt", plugin="core", reason="503") == 1
    assert moved("qpgevent_received_bytes_total") > 2 * len(MESSAGE)
    assert moved("qpgevent_hook_duration_seconds_count", hook="rcpt", plugin="rcpt_ok") == 3
    assert moved("qpgevent_hook_duration_seconds_count", hook="queue", plugin="queue/maildir") == 2
    assert moved("qpgevent_hook_duration_seconds_bucket", hook="queue", plugin="queue/maildir", le="+Inf") == 2
    assert after[("qpgevent_worker_restarts_total", ())] == 0  # the master counts these
    assert after[("qpgevent_dns_timeouts_total", ())] == 0
    page = get(server.admin_url + "/status")[2].decode()
    assert re.search(r"Since start: 1 connections, 2 transactions,\s+2 messages queued, 2 refusals", page), page


def test_metrics_count_connections_refused_over_the_limit(admin_server):
    server = admin_server(max_connections=1)
    held = client(server, "127.0.0.8", "held.client.test")
    try:
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP("127.0.0.1", server.port, timeout=30)
        assert refused.value.smtp_code == 421
        counts = wait_until(lambda: (lambda c: c if c.get(("qpgevent_connections_refused_total",
                                                             (("reason", "max_connections"),))) else None)(
            scrape(server)), 10, "the refusal to be counted")
        assert counts[("qpgevent_connections_refused_total", (("reason", "max_connections"),))] == 1
        assert counts[("qpgevent_connections_total", ())] == 1  # a refused client is no session
    finally:
        held.close()


def test_a_token_is_required_when_set(admin_server):
    server = admin_server(token="s3cret-token")
    for path in ("/status", "/status.json", "/metrics"):
        url = server.admin_url + path
        code, headers, _ = get(url)
        assert (code, headers["WWW-Authenticate"]) == (401, 'Bearer realm="qpgevent"')
        assert get(url, token="wrong")[0] == 401
        assert get(url, token="s3cret-token")[0] == 200
        assert get(url + "?token=s3cret-token")[0] == 200
    assert "refused GET /status from 127.0.0.1: token required" in server.log()


def test_with_a_token_the_admin_pages_may_listen_beyond_loopback(admin_server):
    server = admin_server(admin_listen="0.0.0.0:0", token="s3cret-token")
    assert server.admin_url.startswith("http://0.0.0.0:")
    local = server.admin_url.replace("0.0.0.0", "127.0.0.1")
    assert get(local + "/status.json")[0] == 401
    assert get(local + "/status.json", token="s3cret-token")[0] == 200


@pytest.mark.parametrize("listen", ["0.0.0.0:8025", "[::]:8025", "192.0.2.1:8025", ":8025"])
@pytest.mark.parametrize("check", [True, False], ids=["check-config", "run"])
def test_a_non_loopback_listen_address_without_a_token_is_refused(tmp_path, listen, check):
    ini = write_ini(tmp_path, admin_listen=listen)
    result = subprocess.run([sys.executable, "-m", "qpgevent", "-c", str(ini), *(["--check-config"] * check)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert re.search(r"qpsmtpd.ini:\d+: \[admin\] listen: .* is not a loopback address; set \[admin\] token",
                     line), line


def test_check_config_names_the_admin_pages(tmp_path):
    ini = write_ini(tmp_path, admin_listen="127.0.0.1:8025", token="x")
    result = subprocess.run([sys.executable, "-m", "qpgevent", "-c", str(ini), "--check-config"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "admin: http://127.0.0.1:8025/status (token required)" in result.stdout


def test_the_run_folder_is_emptied_at_start(admin_server, tmp_path):
    run = tmp_path / "spool" / "run"  # the default [admin] run_dir
    (run / "scoreboard").mkdir(parents=True)
    (run / "scoreboard" / "1.json").write_text(json.dumps({"pid": 1, "started": 0, "sessions": [{"id": "old"}]}))
    (run / "metrics").mkdir()
    (run / "metrics" / "counter_1.db").write_bytes(b"\0" * 8)
    server = admin_server()
    assert status(server)["sessions"] == []  # pid 1 is alive: only the clearing removed its row
    assert not (run / "metrics" / "counter_1.db").exists()


def test_one_process_serving_both_reads_its_own_board_from_memory(make_server):
    server = make_server(admin_listen="127.0.0.1:0")  # the real server, in this process
    pages = admin.start_single_process(server.settings)
    assert pages is not None
    try:
        with server.smtp() as smtp:
            smtp.ehlo()
            smtp.mail("a@client.test")
            # No waiting: this process's own sessions are read from memory, not from its file.
            code, _, body = get(pages.url + "/status.json")
            data = json.loads(body)
            assert data["totals"]["by_state"] == {"mail": 1}
            assert [row["pid"] for row in data["sessions"]] == [os.getpid()]
            assert data["sessions"][0]["sender"] == "<a@client.test>"
        wait_until(lambda: json.loads(get(pages.url + "/status.json")[2])["totals"]["sessions"] == 0, 10,
                   "the session to leave")
        metrics_text = get(pages.url + "/metrics")[2].decode()
        assert "qpgevent_connections_total 1.0" in metrics_text
        assert "qpgevent_transactions_total 1.0" in metrics_text
    finally:
        pages.stop()
        metrics.stop()  # this test process goes back to no metrics


# -- logging ------------------------------------------------------------------------------
def test_one_summary_line_per_connection(server_process):
    server = server_process()
    with server.smtp() as smtp:
        smtp.sendmail("a@client.test", ["bob@example.test", "eve@elsewhere.test"], MESSAGE)
    wait_until(lambda: " disconnect: " in server.log(), 10, "the summary line")
    (line,) = [line for line in server.log().splitlines() if " disconnect: " in line]
    assert re.search(r"INFO qpgevent.session: conn=[0-9a-f]+\.[0-9a-f]+ disconnect: ip=127.0.0.1 rdns=- "
                     r"helo=client.example.test tls=no auth=- transactions=1 rcpts_accepted=1 rcpts_rejected=1 "
                     r"messages=1 bytes=\d+ bad_commands=0 seconds=\d+\.\d+ last_reply=221$", line), line


def test_json_logs_every_line_an_object_with_the_summary_fields(server_process):
    server = server_process(format="json")
    with server.smtp() as smtp:
        smtp.sendmail("a@client.test", ["bob@example.test", "eve@elsewhere.test"], MESSAGE)
    wait_until(lambda: "disconnect:" in server.log(), 10, "the summary line")
    lines = [json.loads(line) for line in server.log().splitlines()]  # every line is JSON
    (summary,) = [line for line in lines if line["msg"].startswith("disconnect:")]
    assert summary["conn"] and "txn" not in summary
    assert {key: summary[key] for key in ("ip", "rdns", "helo", "tls", "auth", "transactions", "rcpts_accepted",
                                          "rcpts_rejected", "messages", "last_reply")} == {
        "ip": "127.0.0.1", "rdns": None, "helo": "client.example.test", "tls": False, "auth": None,
        "transactions": 1, "rcpts_accepted": 1, "rcpts_rejected": 1, "messages": 1, "last_reply": 221}
    assert summary["bytes"] > len(MESSAGE) and summary["seconds"] >= 0
    decision = next(line for line in lines if line["msg"].startswith("hook=rcpt plugin=rcpt_ok code=DENY"))
    assert decision["conn"] == summary["conn"] and decision["txn"]
    assert any(line["msg"].startswith("listening on 127.0.0.1:") for line in lines)


@pytest.mark.parametrize("format", ["text", "json"])
def test_auth_secrets_never_reach_the_log(server_process, format):
    server = server_process(format=format, level="debug")
    secret = base64.b64encode(b"\0bob\0correct horse battery staple").decode()
    with server.smtp() as smtp:
        smtp.ehlo()
        smtp.docmd("AUTH", f"PLAIN {secret}")
        smtp.docmd("AUTH", "LOGIN")
        smtp.docmd(base64.b64encode(b"correct horse battery staple").decode())
        smtp.docmd("MAIL", f"FROM:<a@client.test> AUTH PLAIN {secret}")  # refused by the core: logged
    wait_until(lambda: "disconnect:" in server.log(), 10, "the summary line")
    log = server.log()
    assert "refused" in log  # the refused MAIL line was logged...
    assert secret not in log and "Y29ycmVjdCBob3JzZSBiYXR0ZXJ5IHN0YXBsZQ" not in log  # ...never a secret


# -- the terminal scoreboard -----------------------------------------------------------------
def scoreboard_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "scoreboard.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_the_terminal_scoreboard_prints_the_live_sessions(admin_server):
    server = admin_server()
    smtp = client(server, "127.0.0.7", "terminal.client.test")
    smtp.mail("frank@client.test")
    try:
        wait_until(lambda: status(server)["totals"]["by_state"] == {"mail": 1}, 10, "the session")
        result = scoreboard_tool("--url", server.admin_url)
        assert result.returncode == 0, result.stderr
        header, since, titles, row = result.stdout.splitlines()
        assert re.match(r"qpgevent \S+ on mx.example.test: 1 sessions in \d+ processes \(1 mail\)", header)
        assert since.startswith("since start: 1 connections, 0 messages queued")
        assert titles.split() == ["PID", "REMOTE", "IP", "RDNS", "HELO", "STATE", "DOING", "SENDER", "RCPTS",
                                  "BYTES", "AGE"]
        assert row.split()[0] in map(str, server.worker_pids())
        assert row.split()[1:8] == ["127.0.0.7", "-", "terminal.client.test", "mail",
                                   "waiting", "<frank@client.test>", "0"]
        watched = scoreboard_tool("--url", server.admin_url, "--watch", "0.2", "--count", "3")
        assert watched.returncode == 0, watched.stderr
        assert watched.stdout.count("terminal.client.test") == 3
    finally:
        smtp.close()


def test_the_terminal_scoreboard_says_what_is_wrong(admin_server):
    server = admin_server(token="s3cret-token")
    refused = scoreboard_tool("--url", server.admin_url)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"scoreboard: {server.admin_url}: HTTP 401 Unauthorized (give --token)"
    assert scoreboard_tool("--url", server.admin_url, "--token", "s3cret-token").returncode == 0
    nobody = scoreboard_tool("--url", "http://127.0.0.1:9")
    assert nobody.returncode == 1 and "cannot read http://127.0.0.1:9/status.json" in nobody.stderr


def test_a_syslog_socket_that_is_not_there_stops_the_start_with_one_line(tmp_path):
    ini = write_ini(tmp_path, syslog="yes", syslog_address=str(tmp_path / "no-syslog-here"))
    result = subprocess.run([sys.executable, "-m", "qpgevent", "-c", str(ini)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"qpgevent: {ini}: [logging] syslog_address: cannot open: "
                                     "No such file or directory")


def test_dns_lookups_are_measured(admin_server):
    """Reverse look-ups at connect that go to the network are measured, cache hits are not."""
    from qpgevent.testing.dns import LoopbackDns, ptr_zone_for

    zones = {"example.test": {"mail": [("A", "127.0.0.1")]},
             **ptr_zone_for("127.0.0.0/8", {"127.0.0.1": "mail.example.test."})}
    with LoopbackDns(zones) as nameserver:
        # One worker, one DNS cache: the second client from 127.0.0.11 is answered from it.
        server = admin_server(dns_nameservers="127.0.0.1", dns_port=nameserver.port,
                              dns_reverse_lookup="yes", workers=1)
        before = scrape(server)
        with client(server, "127.0.0.1", "named.client.test") as smtp:
            assert smtp.noop()[0] == 250
        for _ in range(2):  # no PTR for 127.0.0.11: NXDOMAIN, measured once (then cached)
            with client(server, "127.0.0.11", "anonymous.client.test") as smtp:
                assert smtp.noop()[0] == 250
        after = scrape(server)

    def moved(outcome):
        key = ("qpgevent_dns_lookup_duration_seconds_count", (("outcome", outcome),))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("answer") >= 2  # the PTR of 127.0.0.1 and the A that confirms it
    assert moved("nxdomain") == 1
    assert after[("qpgevent_dns_timeouts_total", ())] == 0
