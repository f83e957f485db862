"""devagent's test guest: Debian's kernel, a busybox initramfs and ioprobe, an in-guest I/O
prober whose console lines the host parses (:mod:`devagent.guest.probe`)."""
