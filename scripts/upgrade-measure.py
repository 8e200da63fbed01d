# Usage: python3 scripts/upgrade-measure.py SPLICED N: N live relays (mostly idle,
# 1 in 10 echoing during the upgrade), then `spliced upgrade`; prints its answer.
import os, socket, selectors, subprocess, sys, threading, time
spliced, n = sys.argv[1], int(sys.argv[2])
run = "/tmp/upgm/run"; os.makedirs(run, exist_ok=True); os.chmod(run, 0o700)
env = dict(os.environ, RUNTIME_DIRECTORY=run)
# Upstream: an echo server in its own process (selectors, no threads).
up = socket.socket(); up.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
up.bind(("127.0.0.1", 0)); up.listen(4096); up_port = up.getsockname()[1]
pid = os.fork()
if pid == 0:
    sel = selectors.DefaultSelector(); up.setblocking(False); sel.register(up, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is up:
                try:
                    c, _ = up.accept(); c.setblocking(False); sel.register(c, selectors.EVENT_READ)
                except BlockingIOError: pass
            else:
                try: d = key.fileobj.recv(65536)
                except ConnectionError: d = b""
                if d: key.fileobj.send(d)
                else: sel.unregister(key.fileobj); key.fileobj.close()
up.close()
log = open("/tmp/upgm/log", "w")
p = subprocess.Popen([spliced, "run", "--name", "m", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{up_port}", "--workers", "2"], env=env, stderr=log, stdout=log)
addr = None
for _ in range(200):
    time.sleep(0.05)
    for line in open("/tmp/upgm/log"):
        if "listening on" in line: addr = line.split("listening on ")[1].split()[0]
    if addr: break
host, port = addr.rsplit(":", 1); port = int(port)
conns = []
for i in range(n):
    c = socket.create_connection((host, port)); conns.append(c)
for i, c in enumerate(conns):
    c.sendall(b"x"); assert c.recv(1) == b"x"
stop = False; errors = []
def active(cs):
    while not stop:
        for c in cs:
            try:
                c.sendall(b"ping"); got = b""
                while len(got) < 4: got += c.recv(4 - len(got))
                assert got == b"ping"
            except Exception as e: errors.append(e); return
t = threading.Thread(target=active, args=(conns[::10],)); t.start()
time.sleep(0.3)
t0 = time.monotonic()
r = subprocess.run([spliced, "upgrade", "--name", "m"], env=env, capture_output=True, text=True)
wall = time.monotonic() - t0
time.sleep(0.3); stop = True; t.join()
print(f"relays={n} rc={r.returncode} wall_ms={wall*1000:.1f} active_errors={len(errors)}")
print(r.stdout.strip() or r.stderr.strip())
c = socket.create_connection((host, port)); c.sendall(b"new"); assert c.recv(3) == b"new"; c.close()
for c in conns: c.close()
new = int(open(f"{run}/spliced-m.pid").read())
p.wait(timeout=30)
os.kill(new, 15); os.kill(pid, 9)
