#!/bin/bash
# What clients see when a serving worker shuts its listener down (shutdown(2) closes it for
# every holder): one site of two demo workers on a TCP port, 4 client threads making one
# request per connection for 4 s, and at t = 0 a worker told to shut the listener down (the
# demo's `shut-when-told`; it looks every 100 ms). Prints the requests, the failures and when
# they came, and the answers by generation; the agent deploys the release again as gen-2.
#   bench/shut-listener.sh [BIN] [PORT]
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${1:-$HERE/../target/release/hatchery}
PORT=${2:-18555}
d=$(mktemp -d /tmp/shut-listener-XXXX)
mkdir -p "$d/sites.d" "$d/releases/r1"
echo shut-when-told > "$d/releases/r1/behaviour"
ln -s "$d/releases/r1" "$d/current"
printf 'control_socket = "%s/control.sock"\nstate_dir = "%s/state"\nsites_dir = "%s/sites.d"\n' "$d" "$d" "$d" > "$d/hatchery.toml"
cat > "$d/sites.d/web.toml" <<TOML
name = "web"
command = ["$BIN", "__demo-worker", "--behaviour-from", "{release}"]
workers = 2
release = "$d/current"
[[listen]]
name = "http"
tcp = "127.0.0.1:$PORT"
[ready]
check = "notify"
[deploy]
probation = "300ms"
TOML
"$BIN" agent --config "$d/hatchery.toml" 2> "$d/agent.log" & agent=$!
trap 'kill $agent 2>/dev/null; wait $agent 2>/dev/null; rm -rf "$d"' EXIT
# Until the site answers (at most 30 s).
for _ in $(seq 300); do
  curl -sf -m 1 "http://127.0.0.1:$PORT/" > /dev/null && break
  sleep 0.1
done
python3 - "$PORT" "$d/releases/r1/shut" <<'P'
import socket, sys, threading, time
port, shut = int(sys.argv[1]), sys.argv[2]
res, stop = [], False
def client():
    while not stop:
        t = time.time()
        try:
            s = socket.create_connection(('127.0.0.1', port), timeout=5)
            s.sendall(b'GET / HTTP/1.0\r\n\r\n')
            d = b''
            while True:
                c = s.recv(4096)
                if not c:
                    break
                d += c
            ok = b'200 OK' in d
            res.append((t, time.time(), ok, d.split(b'generation ')[1].split(b',')[0].decode() if ok else '?'))
        except OSError as e:
            res.append((t, time.time(), False, str(e)[:40]))
threads = [threading.Thread(target=client) for _ in range(4)]
[t.start() for t in threads]
time.sleep(1)
t0 = time.time()
open(shut, 'w').close()
time.sleep(3)
stop = True
[t.join() for t in threads]
fails = [r for r in res if not r[2]]
print(f"requests {len(res)}, failed {len(fails)}")
if fails:
    print(f"failures from {1000 * (min(f[0] for f in fails) - t0):.1f} to {1000 * (max(f[1] for f in fails) - t0):.1f} ms after the worker was told; {sorted(set(f[3] for f in fails))}")
slow = max(res, key=lambda r: r[1] - r[0])
print(f"slowest request {1000 * (slow[1] - slow[0]):.1f} ms")
gens = {}
for r in res:
    if r[2]:
        gens[r[3]] = gens.get(r[3], 0) + 1
print("answers by generation", gens)
P
grep -E "shut down|deploy done" "$d/agent.log" | cut -c1-160
