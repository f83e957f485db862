"""``devagent guest``: build the test guest (Debian kernel, busybox initramfs, ioprobe)."""

from __future__ import annotations

import json
import sys

import click

from devagent.errors import DevagentError, UsageError
from devagent.guest.build import build_guest, cache_dir, needs_build
from devagent.qemu.accel import choose_accel, no_cached_accel


@click.group("guest")
def guest_group() -> None:
    """The test guest that runs ioprobe."""


@guest_group.command("build")
@click.option("--force", is_flag=True, help="Fetch the kernel again and rebuild everything.")
@click.option("--json", "as_json", is_flag=True, help="Print only JSON, for scripts.")
def build(force: bool, as_json: bool) -> None:
    """Put the test guest in $DEVAGENT_CACHE (default ~/.cache/devagent); a second run only
    says where it is."""

    def progress(line: str) -> None:
        click.echo(line, err=True)

    try:
        built = force or needs_build()
        image = build_guest(force=force, log=None if as_json else progress)
        if not as_json and no_cached_accel(image):
            progress("probing KVM with a real boot (once per machine; TCG if it hangs)")
        accel = choose_accel(image, probe=True)
    except UsageError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    except DevagentError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    if as_json:
        record = {
            "cache_dir": str(cache_dir()),
            "kernel": str(image.kernel),
            "initrd": str(image.initrd),
            "kernel_version": image.kernel_version,
            "built": built,
            "accel": accel,
        }
        click.echo(json.dumps(record, indent=2))
    else:
        click.echo(f"kernel {image.kernel}")
        click.echo(f"initrd {image.initrd}")
        click.echo(f"accel  {accel} (KVM only where a probe boot under it reached userspace)")
