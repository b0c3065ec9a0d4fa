# Shell helpers shared by scripts/test and scripts/demo (sourced, not run).

say() { printf '\n==> %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# free_port [N]: N (default 1) distinct ports nothing listens on, one per line,
# below the kernel's ephemeral range like shopstream_tests::free_port: a port
# from that range (what binding port 0 gives) can be taken before the service
# binds it, by a listener on port 0 (the embedded broker's) or as the source
# port of an outgoing connection; the demo once lost its analytics job so.
free_port() {
  python3 - "${1:-1}" <<'EOF'
import random, socket, sys
lowest = 10000
with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
    ephemeral = int(f.read().split()[0])
candidates = list(range(lowest, max(ephemeral, lowest + 1000)))
random.shuffle(candidates)
found = []
for port in candidates:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    found.append(port)
    if len(found) == int(sys.argv[1]):
        break
else:
    sys.exit("no free port below the ephemeral range")
print("\n".join(map(str, found)))
EOF
}
# apt_install PACKAGE...: from the distribution, quietly.
apt_install() {
  say "Installing $* from the distribution"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
# wait_for WHAT SECONDS COMMAND...: until COMMAND succeeds; says so and fails after SECONDS.
wait_for() {
  local what=$1 limit=$2; shift 2
  for _ in $(seq $((limit * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "$what did not come up within ${limit}s" >&2; return 1
}
# interruptible COMMAND...: runs COMMAND and waits for it, in a way that lets
# the caller's INT/TERM trap fire at once. Bash defers a trap while a
# foreground child runs, and runs it afterwards only if the child died of the
# signal; a child that handles ctrl-c and exits 0 (shopstream-publish drains)
# would let the script carry on. A background child is waited on instead:
# `wait` returns as soon as a trapped signal arrives. Without job control the
# child ignores SIGINT, so the trap's cleanup must stop it: its pid is in
# $interruptible_pid while it runs.
interruptible_pid=
interruptible() {
  "$@" &
  interruptible_pid=$!
  local code=0
  wait "$interruptible_pid" || code=$?
  interruptible_pid=
  return "$code"
}
