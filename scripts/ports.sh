# Sourced by scripts/compare.sh and scripts/profile-bulk.sh: loopback ports
# for the relays they start.

# free_port VAR: sets VAR to a loopback port nobody listens on, below the
# ephemeral range (so that no outgoing connection takes it meanwhile) and
# not handed out before in this run. (It sets a variable rather than print
# the port because `$(free_port)` would run in a subshell, which would
# forget the ports it handed out.)
USED_PORTS=" "
free_port() {
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 12000))
        case "$USED_PORTS" in *" $p "*) continue ;; esac
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS="$USED_PORTS$p "
            printf -v "$1" '%s' "$p"
            return
        fi
    done
    echo "no free loopback port found" >&2
    exit 1
}

# wait_listen PORT: waits up to 10 s for something to listen on PORT.
wait_listen() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
