"""The ``devagent`` command line: one click group, one module per command family."""

from __future__ import annotations

import click

from devagent import __version__


class _Commands(click.Group):
    """The command families are imported when a command is looked up, not with this
    package: an agent started as ``python -m devagent.cli.agent_cmd`` then loads its own
    module only, not the whole CLI (about 0.2 s less on every agent's start)."""

    _loaded = False

    def _load(self) -> None:
        if not _Commands._loaded:
            _Commands._loaded = True
            _register()

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="devagent")
def main() -> None:
    """devagent: live-migrate QEMU VMs between hosts without shared storage,
    with device agents that never fail or lose a guest I/O request."""


def _register() -> None:
    from devagent.cli.agent_cmd import agent_group, bench_cmd
    from devagent.cli.bench_cmd import migrate_bench_cmd
    from devagent.cli.chaos_cmd import chaos_cmd
    from devagent.cli.demo_cmd import demo_cmd
    from devagent.cli.device_cmd import device_group
    from devagent.cli.guest_cmd import guest_group
    from devagent.cli.lab_cmd import lab_group
    from devagent.cli.libvirt_cmd import libvirt_bench_cmd, libvirt_group
    from devagent.cli.migrate_cmd import migrate_cmd
    from devagent.cli.net_cmd import net_agent_cmd
    from devagent.cli.pki_cmd import pki_group
    from devagent.cli.vm_cmd import vm_group

    for command in (
        agent_group,
        guest_group,
        lab_group,
        vm_group,
        device_group,
        migrate_cmd,
        demo_cmd,
        chaos_cmd,
        pki_group,
        libvirt_group,
    ):
        main.add_command(command)
    agent_group.add_command(net_agent_cmd)

    @main.group("bench")
    def bench_group() -> None:
        """Benchmarks: devagent measured against QEMU's own tools in the same run."""

    bench_group.add_command(bench_cmd, name="agent")
    bench_group.add_command(migrate_bench_cmd, name="migrate")
    bench_group.add_command(libvirt_bench_cmd, name="libvirt")
