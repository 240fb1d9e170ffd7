"""`list_all` and `destroy_all` (DELETE /v1/vms) of py-arrakis, and the
unprefixed DELETE /vms. This module uses no shared sandbox: destroy_all
takes every VM of the server."""

from __future__ import annotations

from arrakis_server import http


def test_list_all_then_destroy_all(mgr, names, server):
    started = [mgr.start_sandbox(names.unique(f"all{k}")) for k in range(3)]
    listed = mgr.list_all()
    assert {sb.name for sb in started} <= {sb.name for sb in listed}
    # The listed Sandbox objects are usable as they are.
    by_name = {sb.name: sb for sb in listed}
    assert by_name[started[0].name].run_cmd("echo listed") == {"output": "listed\n", "error": ""}
    started[1].update_state("paused")
    started[2].update_state("stopped")

    mgr.destroy_all()
    assert mgr.list_all() == []
    assert server.vm_names() == []
    for sb in started:
        assert http("GET", server.url(f"/v1/vms/{sb.name}")).status_code == 404
    # Destroying nothing is fine too.
    mgr.destroy_all()
    assert server.healthy()


def test_unprefixed_delete_all(mgr, names, server):
    for k in range(2):
        mgr.start_sandbox(names.unique(f"bare{k}"))
    r = http("DELETE", server.url("/vms"))
    assert (r.status_code, r.json()) == (200, {"success": True})
    r = http("GET", server.url("/vms"))
    assert r.status_code == 200 and r.json().get("vms", []) == []
