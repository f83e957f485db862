"""Routes and their documentation cannot drift: each route table in a module docstring (the
daemon's API, its migration routes, the block and net agents' control APIs) names exactly
the routes its app registers, both ways. A route added without its line fails, and so does a
line whose route went.

A table line is ``    METHOD /path …`` (four spaces in); ``?since=T`` is dropped and
``[/{id}]`` stands for the path with and without it. Lines that start with more spaces
continue the one above.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from types import ModuleType

import pytest
from aiohttp import web

from devagent.agent import control as agent_control
from devagent.daemon import api, libvirt_routes
from devagent.daemon.host import Host
from devagent.daemon.migration import routes as migration_routes
from devagent.net import control as net_control

Route = tuple[str, str]
LINE = re.compile(r"^    (GET|POST|PUT|PATCH|DELETE)\s+(/\S*)", re.MULTILINE)


def documented(module: ModuleType) -> set[Route]:
    """The routes of ``module``'s docstring table."""
    found: set[Route] = set()
    for method, path in LINE.findall(module.__doc__ or ""):
        path = path.split("?")[0]
        if "[" in path:  # /v1/migrations[/{id}]
            head, optional = path.split("[", 1)
            found |= {(method, head), (method, head + optional.rstrip("]"))}
        else:
            found.add((method, path))
    return found


def registered(router: web.UrlDispatcher) -> set[Route]:
    """The routes of ``router`` (aiohttp's implicit HEAD of each GET left out)."""
    return {
        (route.method, route.resource.canonical)
        for route in router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def assert_same(module: ModuleType, routes: set[Route]) -> None:
    table = documented(module)
    undocumented, stale = sorted(routes - table), sorted(table - routes)
    assert not undocumented, f"routes missing from {module.__name__}'s table: {undocumented}"
    assert not stale, f"{module.__name__}'s table names routes that are gone: {stale}"


def host(tmp_path: Path) -> Host:
    return Host(name="a", address="127.0.0.1", port=0, root=tmp_path, shared_dir=tmp_path)


def test_the_daemon_api_table_is_every_route(tmp_path: Path) -> None:
    assert_same(api, registered(api.build_app(host(tmp_path), "t").router))


def test_the_migration_routes_table_is_every_migration_route(tmp_path: Path) -> None:
    router = web.UrlDispatcher()
    migration_routes.MigrationRoutes(host(tmp_path)).add_to(router)
    assert_same(migration_routes, registered(router))


def test_the_libvirt_routes_table_is_every_libvirt_route(tmp_path: Path) -> None:
    router = web.UrlDispatcher()
    libvirt_routes.LibvirtRoutes(host(tmp_path)).add_to(router)
    assert_same(libvirt_routes, registered(router))


def test_the_net_agent_control_table_is_every_route() -> None:
    app = net_control.build_control_app(object(), asyncio.Event())  # type: ignore[arg-type]
    assert_same(net_control, registered(app.router))


def test_the_block_agent_control_table_is_every_route() -> None:
    app = agent_control.build_control_app(object(), asyncio.Event())  # type: ignore[arg-type]
    assert_same(agent_control, registered(app.router))


def test_a_route_without_its_line_fails(tmp_path: Path) -> None:
    app = api.build_app(host(tmp_path), "t")
    app.router.add_get("/v1/undocumented", api.health)
    with pytest.raises(AssertionError, match="undocumented"):
        assert_same(api, registered(app.router))


def test_the_readme_names_only_routes_that_exist(tmp_path: Path) -> None:
    """The README has no table of its own; each ``METHOD /v1/…`` it mentions must exist."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    named = set(re.findall(r"(GET|POST|PUT|PATCH|DELETE) (/v1/[^\s`)]*)", readme))
    routes = registered(api.build_app(host(tmp_path), "t").router)
    patterns = {(m, re.sub(r"\{[^}]+\}", "[^/]+", p)) for m, p in routes}
    unknown = [
        (m, p) for m, p in named if not any(m == rm and re.fullmatch(rp, p) for rm, rp in patterns)
    ]
    assert not unknown, f"README.md names routes that do not exist: {unknown}"
