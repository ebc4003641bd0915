#!/usr/bin/env bash
# make demo: the default configuration (two SoftHSM2 tokens, one virtual token), the
# daemon, pkcs11-tool through the proxy, then a signing loop during which one member
# fails and comes back. Everything it starts, it stops (by PID).
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENT=$PWD/build/p11p-client.so
STATE=${P11P_DEMO_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/p11p}
PIN=1234   # the default configuration's demo PIN (demo tokens only)
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "default configuration in $STATE (two SoftHSM2 tokens holding the same demo key)"
CONFIG=$(p11p init-default --state-dir "$STATE" --faultsim "$PWD/build/p11p-faultsim.so")
p11p check-config "$CONFIG"

say "starting the daemon"
LOG=$STATE/daemon.log
p11p daemon --config "$CONFIG" >"$LOG" 2>&1 &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null; wait $DAEMON 2>/dev/null || true' EXIT
export P11P_SOCKET=$STATE/run/p11p.sock
for _ in $(seq 100); do grep -q "listening on" "$LOG" && break; sleep 0.1; done
grep "listening on" "$LOG" | sed 's/^/  /'

say "pkcs11-tool through p11p: slots and the demo key"
pkcs11-tool --module "$CLIENT" --list-slots
pkcs11-tool --module "$CLIENT" --token-label p11p-demo --login --pin $PIN --list-objects --type privkey

say "pkcs11-tool through p11p: a new key pair and a signature (written to the primary member)"
LABEL=demo-$(date +%s)
ID=$(printf '%x' "$(date +%s)")   # pkcs11-tool picks keys for --verify reliably by id
pkcs11-tool --module "$CLIENT" --token-label p11p-demo --login --pin $PIN \
  --keypairgen --key-type EC:prime256v1 --label "$LABEL" --id "$ID"
echo "p11p says hello" | openssl dgst -sha256 -binary > "$STATE/message.sha256"
pkcs11-tool --module "$CLIENT" --token-label p11p-demo --login --pin $PIN --sign \
  --mechanism ECDSA --id "$ID" --input-file "$STATE/message.sha256" --output-file "$STATE/message.sig"
pkcs11-tool --module "$CLIENT" --token-label p11p-demo --login --pin $PIN --verify \
  --mechanism ECDSA --id "$ID" --input-file "$STATE/message.sha256" --signature-file "$STATE/message.sig"

say "p11p status"
p11p status --config "$CONFIG"

say "failover: a client signs in a loop; member softhsm-a fails after 3 s and comes back after 7 s"
python3 demo/sign_loop.py "$CLIENT" p11p-demo $PIN 12 "$STATE/demo-key.pub.pem" &
LOOP=$!
sleep 3
echo '*  error  rv=CKR_DEVICE_ERROR' > "$STATE/softhsm-a.rules"
echo "  -- softhsm-a now answers CKR_DEVICE_ERROR to every call"
sleep 2
p11p status --config "$CONFIG" | sed 's/^/  /'
sleep 2
: > "$STATE/softhsm-a.rules"
echo "  -- softhsm-a is healthy again"
sleep 2
p11p status --config "$CONFIG" | sed 's/^/  /'
wait $LOOP && RESULT=0 || RESULT=$?

say "what the daemon logged about it"
grep -E "member failure|failed over|recovered|out of service|restored" "$LOG" | sed 's/^/  /' || true
exit $RESULT
