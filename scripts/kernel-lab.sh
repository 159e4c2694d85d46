#!/bin/sh
# The kernel lab: a Debian 6.12 guest kernel with the mtty and vdpa_sim_net
# simulator drivers, booted under QEMU (TCG) with this machine's filesystem
# as its root, where the real backends are tested against real drivers.
# Facts and costs: ../shared/KERNEL-LAB.md.
#
#   scripts/kernel-lab.sh prepare   install and build what the lab needs
#                                   (idempotent; about 2.5 min the first time)
#   scripts/kernel-lab.sh test      prepare, then boot the guest once and run
#                                   tests/kernel/ inside it (pytest arguments
#                                   after "test" are passed on)
#   scripts/kernel-lab.sh shell CMD boot the guest and run CMD in it
#
# Exit status: 0 passed, 1 failed, 3 the lab cannot be prepared here (the
# reason is printed on the last line, prefixed "kernel-lab: skipped:").
set -eu
cd "$(dirname "$0")/.."
root=$(pwd)
lab="$root/.lab"
mkdir -p "$lab"

skip() {
    echo "kernel-lab: skipped: $*" >&2
    exit 3
}

say() { echo "kernel-lab: $*" >&2; }

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        >"$lab/apt.log" 2>&1 || { tail -n 20 "$lab/apt.log" >&2; return 1; }
}

# The backports suite, on the mirror this machine already uses: the URI is
# read from its own sources, never written here.
enable_backports() {
    if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 0
    fi
    uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri=$(awk '
            /^URIs:/ { u = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") { print u; exit } }
            /^$/ { u = "" }' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || return 1
    cat >/etc/apt/sources.list.d/orchestrator-kernel-lab.sources <<EOF
# Added by the orchestrator's scripts/kernel-lab.sh: the 6.12 kernel for its lab.
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
}

# The newest generic 6.12 kernel the configured suites offer now: it came
# with bookworm-backports and later also with bookworm-security, and its
# version moves on, so it is resolved, never pinned.
resolve_kernel() {
    apt-cache search --names-only '^linux-image-6\.12\.[0-9.]+\+deb12-amd64-unsigned$' 2>/dev/null \
        | awk '{ print $1 }' \
        | sed -n 's/^linux-image-\(6\.12\..*-amd64\)-unsigned$/\1/p' \
        | sort -V | tail -n 1
}

prepare() {
    if [ -f "$lab/ready" ] && [ -f "/boot/vmlinuz-$(cat "$lab/ready")" ] \
        && [ -x "$root/.venv/bin/vng" ] && [ -f "$lab/build/mtty/mtty.ko" ] \
        && [ -f "$lab/build/vdpa/vdpa_sim_net.ko" ]; then
        return 0
    fi
    [ "$(uname -m)" = x86_64 ] || skip "needs an x86_64 host (this is $(uname -m))"
    [ "$(id -u)" = 0 ] || skip "preparing needs root (apt-get and the kernel's files); run as root"
    command -v apt-get >/dev/null 2>&1 || skip "needs apt-get (a Debian host)"
    grep -qs 'bookworm' /etc/os-release || skip "the lab's kernel comes from Debian 12 (bookworm) backports; this host is not bookworm"

    say "enabling bookworm-backports on the configured mirror"
    enable_backports || skip "no bookworm entry in the apt sources to reuse for bookworm-backports"
    apt-get update -qq >"$lab/apt.log" 2>&1 || { tail -n 20 "$lab/apt.log" >&2; skip "apt-get update failed"; }

    kver=$(resolve_kernel)
    [ -n "$kver" ] || skip "bookworm-backports offers no linux-image-6.12.*-amd64-unsigned now"
    # The source package of exactly the image's version.  Packages are named
    # one by one (never a blanket -t, which would also upgrade systemd).
    kdeb=$(apt-cache policy "linux-image-$kver-unsigned" | awk '/Candidate:/ { print $2 }')
    [ -n "$kdeb" ] && [ "$kdeb" != "(none)" ] || skip "no installable linux-image-$kver-unsigned"
    say "installing kernel $kver ($kdeb), its headers and source, qemu, busybox (about 2.5 min once)"
    apt_install "linux-image-$kver-unsigned" "linux-headers-$kver" "linux-source-6.12=$kdeb" \
        qemu-system-x86 busybox-static gcc make bc kmod xz-utils \
        || skip "installing the lab's Debian packages failed (see above)"
    [ -f "/boot/vmlinuz-$kver" ] || skip "/boot/vmlinuz-$kver missing after install"

    say "installing virtme-ng into .venv"
    [ -x "$root/.venv/bin/python" ] || scripts/bootstrap.sh test
    "$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test,lab]" \
        || skip "pip could not install virtme-ng"

    say "extracting the driver sources from linux-source"
    tarball=$(ls /usr/src/linux-source-6.12.tar.* 2>/dev/null | head -n 1)
    [ -n "$tarball" ] || skip "linux-source-6.12 tarball not found in /usr/src"
    rm -rf "$lab/src" && mkdir -p "$lab/src"
    tar -C "$lab/src" --strip-components=1 -xf "$tarball" --wildcards \
        '*/samples/vfio-mdev/mtty.c' '*/drivers/vdpa/vdpa_sim/*' '*/drivers/vhost/vringh.c'

    say "building mtty, vringh, vdpa_sim, vdpa_sim_net against $kver"
    rm -rf "$lab/build" && mkdir -p "$lab/build/mtty" "$lab/build/vdpa"
    cp "$lab/src/samples/vfio-mdev/mtty.c" "$lab/build/mtty/"
    echo 'obj-m := mtty.o' >"$lab/build/mtty/Makefile"
    cp "$lab/src/drivers/vdpa/vdpa_sim/"*.[ch] "$lab/src/drivers/vhost/vringh.c" "$lab/build/vdpa/"
    echo 'obj-m := vringh.o vdpa_sim.o vdpa_sim_net.o' >"$lab/build/vdpa/Makefile"
    for d in mtty vdpa; do
        make -C "/lib/modules/$kver/build" M="$lab/build/$d" modules >"$lab/build/$d.log" 2>&1 \
            || { tail -n 20 "$lab/build/$d.log" >&2; skip "building the $d modules failed"; }
    done
    echo "$kver" >"$lab/ready"
    say "ready: kernel $kver"
}

# Boot the lab kernel once and run "$@" in it as root, with .lab/results
# writable and the lab's facts in the environment.
boot() {
    kver=$(cat "$lab/ready")
    [ -r "/boot/vmlinuz-$kver" ] \
        || skip "cannot read /boot/vmlinuz-$kver (Debian makes it readable by root only); run as root"
    command -v qemu-system-x86_64 >/dev/null 2>&1 || skip "qemu-system-x86_64 is missing"
    mkdir -p "$lab/results"
    blacklist="kvm_amd,kvm_intel,kvm,ccp,sr_mod,cdrom,ahci,libahci,ata_piix,psmouse,serio_raw"
    blacklist="$blacklist,pcspkr,floppy,e1000,e1000e,snd_pcsp,bochs,drm,i2c_piix4,intel_rapl_msr"
    cat >"$lab/results/guest.sh" <<EOF
#!/bin/sh
export ORCHESTRATOR_KERNEL_LAB="$lab"
export ORCHESTRATOR_LAB_KERNEL="$kver"
export PATH="$root/.venv/bin:\$PATH"
cd "$root"
exec "\$@"
EOF
    chmod +x "$lab/results/guest.sh"
    cmd="$lab/results/guest.sh"
    for arg in "$@"; do
        cmd="$cmd '$(printf '%s' "$arg" | sed "s/'/'\\\\''/g")'"
    done
    # vng runs its helpers (virtme-run) by name: they live beside it in .venv.
    # QEMU opens the guest's stdout and stderr as files (/proc/self/fd/1, 2),
    # truncating them: through a pipe, a log this script's output goes to (CI's)
    # keeps what came before.  The exit status goes round the pipe in a file.
    {
        status=0
        PATH="$root/.venv/bin:$PATH" "$root/.venv/bin/vng" --run "/boot/vmlinuz-$kver" \
            --disable-kvm --force-9p --cpus 2 --memory 2G --rwdir="$lab/results" \
            --append "modprobe.blacklist=$blacklist" \
            --exec "$cmd" || status=$?
        echo "$status" >"$lab/results/boot-status"
    } 2>&1 | cat
    return "$(cat "$lab/results/boot-status")"
}

case "${1:-}" in
    prepare)
        prepare
        ;;
    test)
        shift
        prepare
        say "booting $(cat "$lab/ready") under TCG and running tests/kernel in it"
        rc=0
        boot python -m pytest -p no:cacheprovider tests/kernel --lab-guest \
            --junitxml="$lab/results/junit.xml" "$@" || rc=$?
        if [ "$rc" -eq 3 ]; then
            # pytest's "internal error" (or vng's own 3) is a failure, never a skip.
            say "the guest run exited 3: reported as a failure"
            rc=1
        fi
        exit "$rc"
        ;;
    shell)
        shift
        prepare
        boot "$@"
        ;;
    *)
        echo "usage: scripts/kernel-lab.sh prepare | test [pytest args] | shell CMD..." >&2
        exit 2
        ;;
esac
