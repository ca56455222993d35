# Sourced by scripts/compare.sh and scripts/rtt.sh (after scripts/ports.sh):
# a throwaway sshd on loopback, and ssh -D through it, as a user of ssh -D
# runs them. Both append their PIDs to the caller's PIDS array.

# sshd_start DIR: host and user keys made in DIR, sshd -f with a config of
# our own on a free port, key login only, the default cipher (what users
# get). Sets SSHD_PORT and SSHD_PID, or SSH_SKIP to why it could not.
sshd_start() {
    local dir=$1
    SSH_SKIP=""
    if ! [ -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null 2>&1; then
        SSH_SKIP="sshd or ssh is not installed"
        return 1
    fi
    SSHDIR=$dir
    mkdir -p "$SSHDIR"
    mkdir -p /run/sshd 2>/dev/null || true  # sshd's privilege separation directory
    chmod 700 "$SSHDIR"
    ssh-keygen -q -t ed25519 -N '' -f "$SSHDIR/host_key" <<<y >/dev/null
    ssh-keygen -q -t ed25519 -N '' -f "$SSHDIR/user_key" <<<y >/dev/null
    cp "$SSHDIR/user_key.pub" "$SSHDIR/authorized_keys"
    free_port SSHD_PORT
    cat >"$SSHDIR/sshd_config" <<CONF
Port $SSHD_PORT
ListenAddress 127.0.0.1
HostKey $SSHDIR/host_key
PidFile $SSHDIR/sshd.pid
AuthorizedKeysFile $SSHDIR/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
MaxStartups 100:30:200
LogLevel ERROR
CONF
    if ! /usr/sbin/sshd -t -f "$SSHDIR/sshd_config" 2>"$SSHDIR/check.log"; then
        SSH_SKIP="sshd rejects the config: $(tr '\n' ' ' <"$SSHDIR/check.log")"
        return 1
    fi
    /usr/sbin/sshd -D -e -f "$SSHDIR/sshd_config" 2>"$SSHDIR/sshd.log" &
    PIDS+=($!); SSHD_PID=$!
    if ! wait_listen "$SSHD_PORT"; then
        SSH_SKIP="sshd did not start: $(tr '\n' ' ' <"$SSHDIR/sshd.log")"
        return 1
    fi
}

# ssh_socks PORT SOCKS: ssh -D on 127.0.0.1:SOCKS, logged in to the sshd
# reached at 127.0.0.1:PORT (sshd_start's, or a relay in front of it). Sets
# SSH_PID, or SSH_SKIP.
ssh_socks() {
    ssh -N -D "127.0.0.1:$2" -p "$1" -i "$SSHDIR/user_key" \
        -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o BatchMode=yes -o ExitOnForwardFailure=yes -o LogLevel=ERROR \
        "$(id -un)@127.0.0.1" 2>"$SSHDIR/ssh.log" &
    PIDS+=($!); SSH_PID=$!
    if ! wait_listen "$2"; then
        SSH_SKIP="ssh did not open its SOCKS port: $(tr '\n' ' ' <"$SSHDIR/ssh.log")"
        return 1
    fi
}
