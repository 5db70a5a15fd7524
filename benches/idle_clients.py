#!/usr/bin/env python3
"""Memory cost of idle client connections in pglifeguard.

Starts pglifeguard (trust auth) in front of a running PostgreSQL, opens N client connections that
each finish startup (StartupMessage user=postgres database=postgres, read until ReadyForQuery) and
then stay idle, and reports the growth of the proxy's VmRSS per client in KiB.

Idle clients in session pooling hold no backend: once the pool has seen a set of startup
parameters it answers the next client with the same parameters itself. So one warm-up client
connects first, runs `select 1` and leaves; the RSS baseline is taken after it.

Usage: benches/idle_clients.py            (python3 standard library only; run as root or with a
                                           hard RLIMIT_NOFILE of at least N + 1000)
Environment (defaults):
  N=10000                  idle clients to open
  PG_HOST=127.0.0.1
  PG_PORTS="55432 55433 55434"   backends, primary first (the shared bench cluster); a single port
                           is enough, e.g. PG_PORTS=5432
  LISTEN_PORT=6435         port the proxy listens on
  PGLIFEGUARD_BIN=<repo>/target/release/pglifeguard
  BATCH=200                connections whose handshakes are in flight at once
  SETTLE=2                 seconds to wait before sampling RSS
  OUT=/tmp/pglifeguard-bench/idle   config and proxy log go here
  PROXY_PID=, PROXY_PORT=  measure an already running proxy instead (e.g. PgBouncer: its PID and
                           port); nothing is started then, and its client limit must exceed N

Exit status 0 when every client reached ReadyForQuery.
"""
import os
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = int(os.environ.get("N", "10000"))
PG_HOST = os.environ.get("PG_HOST", "127.0.0.1")
PG_PORTS = [int(p) for p in os.environ.get("PG_PORTS", "55432 55433 55434").split()]
LISTEN_PORT = int(os.environ.get("LISTEN_PORT", "6435"))
BIN = os.environ.get("PGLIFEGUARD_BIN", os.path.join(REPO, "target", "release", "pglifeguard"))
BATCH = int(os.environ.get("BATCH", "200"))
SETTLE = float(os.environ.get("SETTLE", "2"))
OUT = os.environ.get("OUT", "/tmp/pglifeguard-bench/idle")
EXT_PID = os.environ.get("PROXY_PID")
EXT_PORT = os.environ.get("PROXY_PORT")
NOFILE = max(N + 1000, 20000)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def startup_message(user="postgres", database="postgres"):
    body = struct.pack("!I", 196608)  # protocol 3.0
    for k, v in (("user", user), ("database", database), ("application_name", "idle_clients")):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


STARTUP = startup_message()


def query_message(sql):
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


TERMINATE = b"X\0\0\0\4"


class Reader:
    """Accumulates backend messages until ReadyForQuery; remembers the first error."""

    def __init__(self):
        self.buf = b""
        self.error = None

    def feed(self, data):
        """Returns True once a ReadyForQuery has been seen."""
        self.buf += data
        while len(self.buf) >= 5:
            tag = self.buf[0:1]
            (length,) = struct.unpack("!I", self.buf[1:5])
            if len(self.buf) < 1 + length:
                return False
            body = self.buf[5 : 1 + length]
            self.buf = self.buf[1 + length :]
            if tag == b"E" and self.error is None:
                fields = {f[:1]: f[1:].decode(errors="replace") for f in body.split(b"\0") if f}
                self.error = f"{fields.get(b'C', '?')}: {fields.get(b'M', '?')}"
            if tag == b"R":
                (code,) = struct.unpack("!I", body[:4])
                if code != 0:
                    self.error = self.error or f"authentication request {code} (trust expected)"
            if tag == b"Z":
                return True
        return False


def read_until_ready(sock, timeout=10.0):
    sock.settimeout(timeout)
    r = Reader()
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(r.error or "connection closed before ReadyForQuery")
        if r.feed(data):
            if r.error:
                raise ConnectionError(r.error)
            return


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_field(pid, name):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return "?"


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
        except (ValueError, OSError):
            want = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < N + 100:
        sys.exit(f"RLIMIT_NOFILE hard limit {hard} is below N+100 = {N + 100}; run as root or lower N")


def proxy_preexec():
    # The proxy needs one descriptor per client plus its listeners and backends.
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def start_proxy():
    os.makedirs(OUT, exist_ok=True)
    cfg = os.path.join(OUT, "pglifeguard-idle.yaml")
    backends = "\n".join(
        f"  - {{name: pg{i}, host: {PG_HOST}, port: {p}}}" for i, p in enumerate(PG_PORTS)
    )
    with open(cfg, "w") as f:
        f.write(
            f"""listen: 127.0.0.1:{LISTEN_PORT}
backends:
{backends}
pool:
  pool_size: 10
  max_client_connections: {max(20000, N + 1000)}
  client_idle_timeout: 0s
auth:
  method: trust
health_check:
  user: postgres
  period: 2s
"""
        )
    logpath = os.path.join(OUT, "pglifeguard-idle.log")
    logf = open(logpath, "ab")
    proc = subprocess.Popen(
        [BIN, "run", "--config", cfg],
        stdin=subprocess.DEVNULL,
        stdout=logf,
        stderr=logf,
        preexec_fn=proxy_preexec,
    )
    log(f"pglifeguard pid {proc.pid} on 127.0.0.1:{LISTEN_PORT}, config {cfg}, log {logpath}")
    return proc, logpath


def warm_up(port, proc, deadline_s=30.0):
    """One client through startup and a query, retried until the proxy has found the primary."""
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"proxy exited with status {proc.returncode} during warm-up")
        try:
            s = connect(port)
            try:
                s.sendall(STARTUP)
                read_until_ready(s)
                s.sendall(query_message("select 1"))
                read_until_ready(s)
                s.sendall(TERMINATE)
            finally:
                s.close()
            return
        except (OSError, ConnectionError) as e:
            last = e
            time.sleep(0.2)
    raise RuntimeError(f"warm-up failed for {deadline_s} s: {last}")


def open_idle_clients(port, n):
    """Opens n clients, BATCH handshakes in flight at a time. Returns (sockets, errors)."""
    sel = selectors.DefaultSelector()
    done, errors = [], {}
    pending = 0
    started = 0
    next_report = 2000
    t0 = time.monotonic()
    while len(done) + sum(errors.values()) < n:
        while pending < BATCH and started < n:
            try:
                s = connect(port)
                s.sendall(STARTUP)
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ, Reader())
                pending += 1
            except OSError as e:
                errors[str(e)] = errors.get(str(e), 0) + 1
            started += 1
        if pending == 0:
            continue
        events = sel.select(timeout=15)
        if not events:
            for key in list(sel.get_map().values()):
                sel.unregister(key.fileobj)
                key.fileobj.close()
                errors["timeout waiting for ReadyForQuery"] = errors.get("timeout waiting for ReadyForQuery", 0) + 1
            pending = 0
            continue
        for key, _ in events:
            s, r = key.fileobj, key.data
            try:
                data = s.recv(65536)
            except OSError as e:
                data, r.error = b"", r.error or str(e)
            finished = bool(data) and r.feed(data)
            if not data or finished:
                sel.unregister(s)
                pending -= 1
                if finished and not r.error:
                    done.append(s)
                else:
                    err = r.error or "closed before ReadyForQuery"
                    errors[err] = errors.get(err, 0) + 1
                    s.close()
        if len(done) >= next_report:
            log(f"  {len(done)} clients ready")
            next_report += 2000
    log(f"opened {len(done)} idle clients in {time.monotonic() - t0:.1f} s")
    return done, errors


def main():
    raise_nofile()
    proc = None
    if EXT_PID and EXT_PORT:
        pid, port, logpath = int(EXT_PID), int(EXT_PORT), None
        log(f"measuring running proxy pid {pid} on port {port}")
    else:
        if not os.access(BIN, os.X_OK):
            sys.exit(f"{BIN} not found; build it with `cargo build --release`")
        proc, logpath = start_proxy()
        pid, port = proc.pid, LISTEN_PORT
    clients = []
    try:
        warm_up(port, proc)
        time.sleep(SETTLE)
        before = rss_kib(pid)
        fds_before = fd_count(pid)
        log(f"after warm-up: VmRSS {before} KiB, threads {proc_field(pid, 'Threads')}, fds {fds_before}")
        clients, errors = open_idle_clients(port, N)
        time.sleep(SETTLE)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"proxy exited with status {proc.returncode}")
        after = rss_kib(pid)
        hwm = proc_field(pid, "VmHWM")
        fds_after = fd_count(pid)
        ok = len(clients)
        per = (after - before) / ok if ok else float("nan")
        # Check that the idle clients still work: run a query on a few of them.
        probe_ok = 0
        for s in clients[:: max(1, ok // 5)][:5]:
            s.setblocking(True)
            s.sendall(query_message("select 1"))
            read_until_ready(s)
            probe_ok += 1
        for s in clients:
            try:
                s.sendall(TERMINATE)
            except OSError:
                pass
            s.close()
        n_closed = len(clients)
        clients = []
        time.sleep(SETTLE)
        after_close = rss_kib(pid)
        print(f"idle clients requested      {N}")
        print(f"reached ReadyForQuery       {ok}")
        for e, c in errors.items():
            print(f"failed                      {c}: {e}")
        print(f"proxy pid                   {pid}")
        print(f"VmRSS before / with clients {before} KiB / {after} KiB (VmHWM {hwm})")
        print(f"proxy fds before / with     {fds_before} / {fds_after}")
        print(f"queries on sampled clients  {probe_ok} ok")
        print(f"VmRSS after closing {n_closed}   {after_close} KiB")
        print(f"KiB per idle client         {per:.2f}")
        return 0 if ok == N else 1
    finally:
        for s in clients:
            s.close()
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log(f"pglifeguard pid {proc.pid} did not stop after SIGINT; sending SIGKILL")
                proc.kill()
                proc.wait()
            log(f"pglifeguard stopped (status {proc.returncode}); log {logpath}")


if __name__ == "__main__":
    sys.exit(main())
