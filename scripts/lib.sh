# Shell helpers shared by scripts/test and scripts/demo (sourced, not run).

say() { printf '\n==> %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
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
