"""The IPFS driver end to end: the HTTP API, a real worker (and beat), Postgres, Redis, the
S3 peer and two real IPFS nodes (tests/fixtures/ipfsnode.py).

An object migrated from S3 into IPFS keeps the CID the catalog computed; a node that makes
another CID of the same bytes fails the item loudly and keeps nothing; a replicate job to
two IPFS backends pins on both (IPFS Cluster's replication, as one job); a pin removed
behind Ferry's back is found missing by verification and healed by the reconcile loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from ferry.catalog.db import transaction
from ferry.catalog.models import Replica, StoredObject
from ferry.settings import get_settings
from tests.e2e.test_cli import ferry
from tests.e2e.test_policies import wait_for
from tests.fixtures.cluster import Cluster, auth, free_port, running_cluster, wait_job
from tests.fixtures.gateway import GatewayFront
from tests.fixtures.ipfsnode import IpfsNode, start_node
from workers.cid import digest_bytes, normalize_cid

pytestmark = pytest.mark.e2e

SIZES = [0, 1, 262_143, 262_144, 262_145, 3 * 2**20 + 7]


class AddRewriter:
    """A proxy in front of a real node's RPC API that turns raw leaves off on `add`, as a
    node (or proxy) that ignores Ferry's add options would: it then makes other CIDs."""

    def __init__(self, node: IpfsNode):
        self.node = node
        self.port = free_port()
        self.server = make_server("127.0.0.1", self.port, self.app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def app(self, environ, start_response):
        request = Request(environ)
        params = dict(request.args)
        if request.path == "/api/v0/add":
            params["raw-leaves"] = "false"
        body = request.stream.read()  # werkzeug decodes the chunked upload
        r = httpx.post(self.node.api_url + request.path, params=params, content=body,
                       headers={"Content-Type": request.headers.get("Content-Type", "")}, timeout=60)
        return Response(r.content, status=r.status_code, content_type=r.headers.get("content-type"))(
            environ, start_response)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _own_node(tmp_path_factory, name: str) -> Iterator[IpfsNode]:
    node, group = start_node(tmp_path_factory.mktemp(name))
    try:
        yield node
    finally:
        group.stop()


@pytest.fixture(scope="module")
def ipfs_node(tmp_path_factory) -> Iterator[IpfsNode]:
    """This module's own first node: what it pins stays out of the session node, whose pins
    the backend contract suite counts."""
    yield from _own_node(tmp_path_factory, "ipfs1")


@pytest.fixture(scope="module")
def second_node(tmp_path_factory) -> Iterator[IpfsNode]:
    yield from _own_node(tmp_path_factory, "ipfs2")


@pytest.fixture(scope="module")
def cluster(test_env, s3_backend, ipfs_node, second_node) -> Iterator[Cluster]:
    """The session's backends plus `ipfs` and `ipfs2` (two nodes, one failure domain each)
    and `ipfs-lax`, the first node behind AddRewriter; beat passes every second."""
    rewriter = AddRewriter(ipfs_node)
    rewriter.thread.start()
    # Trustless gateways over the first node: one that lies (flips a byte of a block), then
    # an honest one; and a pair that both lie.
    fronts = [GatewayFront(ipfs_node, mode=m).start() for m in ("corrupt", "ok", "corrupt", "missing")]
    path = Path(test_env["tmp"]) / "backends-ipfs.yaml"
    backends = yaml.safe_load(Path(os.environ["FERRY_BACKENDS_FILE"]).read_text())["backends"]
    backends += [
        {"name": "ipfs", "driver": "ipfs", "labels": {"kind": "ipfs", "node": "1"},
         "settings": {"api_url": ipfs_node.api_url, "timeout": 20}},
        {"name": "ipfs2", "driver": "ipfs", "labels": {"kind": "ipfs", "node": "2"},
         "settings": {"api_url": second_node.api_url, "timeout": 20}},
        {"name": "ipfs-lax", "driver": "ipfs", "labels": {"kind": "lax"},
         "settings": {"api_url": rewriter.url, "timeout": 20}},
        {"name": "gateway", "driver": "gateway", "labels": {"kind": "gateway"},
         "settings": {"gateways": [fronts[0].url, fronts[1].url], "timeout": 10}},
        {"name": "liars", "driver": "gateway", "labels": {"kind": "gateway"},
         "settings": {"gateways": [fronts[2].url, fronts[3].url], "timeout": 10}},
    ]
    path.write_text(yaml.safe_dump({"backends": backends}))
    # This process too (it lists the queues the worker consumes), for this module only.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERRY_BACKENDS_FILE", str(path))
        get_settings.cache_clear()
        try:
            with running_cluster(test_env, "ipfs", {"FERRY_MAX_ATTEMPTS": "2",
                                                    "FERRY_RECONCILE_INTERVAL_SECONDS": "1"}, beat=True) as c:
                yield c
        finally:
            rewriter.server.shutdown()
            for front in fronts:
                front.close()
    get_settings.cache_clear()


def put_local(disks: Path, prefix: str, sizes: list[int]) -> dict[str, bytes]:
    objects = {}
    for i, size in enumerate(sizes):
        data = hashlib.sha256(f"{prefix}{i}".encode()).digest() * (size // 32 + 1)
        key = f"{prefix}o{i}.bin"
        (disks / "local" / key).parent.mkdir(parents=True, exist_ok=True)
        (disks / "local" / key).write_bytes(data[:size])
        objects[key] = data[:size]
    return objects


def pinned(node: IpfsNode, cid: str) -> bool:
    try:
        node.rpc("pin/ls", params={"arg": cid, "type": "recursive"}, timeout=10)
    except httpx.HTTPStatusError:
        return False
    return True


def replicas(backend: str, cids: list[str]) -> dict[str, tuple[str, str]]:
    """cid -> (key, state) of the objects' replicas on `backend`."""
    with transaction() as s:
        rows = s.execute(select(StoredObject.cid, Replica.key, Replica.state)
                         .join(Replica, Replica.object_id == StoredObject.id)
                         .where(Replica.backend == backend, StoredObject.cid.in_(cids))).all()
    return {cid: (key, state.value) for cid, key, state in rows}


def run(api: httpx.Client, body: dict) -> dict:
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return wait_job(api, r.json()["id"], timeout=180)


def test_an_object_migrated_from_s3_into_ipfs_keeps_its_cid(api, disks, ipfs_node):
    objects = put_local(disks, "ipfs-mig/", SIZES)
    cids = {key: digest_bytes(data).cid for key, data in objects.items()}
    job = run(api, {"kind": "migrate", "source": {"backend": "local", "prefix": "ipfs-mig/"},
                    "targets": [{"backend": "s3", "prefix": "stage-ipfs/"}]})
    assert job["state"] == "succeeded", job
    job = run(api, {"kind": "migrate", "source": {"backend": "s3", "prefix": "stage-ipfs/"},
                    "targets": [{"backend": "ipfs"}]})
    assert job["state"] == "succeeded", job

    on_ipfs = replicas("ipfs", list(cids.values()))
    assert on_ipfs == {cid: (cid, "present") for cid in cids.values()}  # keyed by CID, pinned, verified
    assert sorted(replicas("s3", list(cids.values())).values()) == sorted((f"stage-ipfs/{k.removeprefix('ipfs-mig/')}", "gone")
                                                                      for k in cids)
    for key, data in objects.items():
        assert pinned(ipfs_node, cids[key])
        assert ipfs_node.rpc("cat", params={"arg": cids[key], "timeout": "10s"}).content == data
    items = api.get(f"/v1/jobs/{job['id']}/items").json()["items"]
    assert sorted(it["dest_key"] for it in items) == sorted(cids.values())  # the item names where it went

    # A target prefix means nothing where keys are CIDs.
    r = api.post("/v1/jobs", json={"kind": "replicate", "source": {"backend": "local", "prefix": "x/"},
                                   "targets": [{"backend": "ipfs", "prefix": "dir/"}]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "targets[0].prefix", r.text


def test_a_node_that_makes_another_cid_fails_the_item_loudly(api, disks, ipfs_node):
    objects = put_local(disks, "ipfs-lax/", [262_145 + 11])  # two leaves: raw or not changes the CID
    (key, data), = objects.items()
    cid = digest_bytes(data).cid
    job = run(api, {"kind": "migrate", "source": {"backend": "local", "keys": [key]},
                    "targets": [{"backend": "ipfs-lax"}]})
    assert job["state"] == "failed", job
    item, = api.get(f"/v1/jobs/{job['id']}/items").json()["items"]
    assert item["state"] == "failed"
    assert f"expected {cid}" in item["error"] and "not pinned" in item["error"], item
    node_cid = item["error"].split("made CID ")[1].split()[0]
    assert node_cid != cid and not pinned(ipfs_node, node_cid) and not pinned(ipfs_node, cid)
    assert (disks / "local" / key).read_bytes() == data  # the source stays
    assert replicas("ipfs-lax", [cid]) == {}


def test_replicate_to_two_ipfs_nodes_pins_on_both(api, disks, ipfs_node, second_node):
    objects = put_local(disks, "ipfs-two/", [5, 700_000])
    cids = [digest_bytes(d).cid for d in objects.values()]
    job = run(api, {"kind": "replicate", "source": {"backend": "local", "prefix": "ipfs-two/"},
                    "targets": [{"backend": "ipfs"}, {"backend": "ipfs2"}]})
    assert job["state"] == "succeeded", job
    for node, name in ((ipfs_node, "ipfs"), (second_node, "ipfs2")):
        assert all(pinned(node, cid) for cid in cids)
        assert replicas(name, cids) == {cid: (cid, "present") for cid in cids}
    # From IPFS onward: the CID is the key at both ends, and is checked as the bytes go.
    job = run(api, {"kind": "replicate", "source": {"backend": "ipfs2", "keys": cids},
                    "targets": [{"backend": "archive", "prefix": "from-ipfs/"}]})
    assert job["state"] == "succeeded", job
    for cid, data in zip(cids, objects.values(), strict=True):
        assert (disks / "archive" / "from-ipfs" / cid).read_bytes() == data


def test_a_pin_removed_behind_our_back_is_found_missing_and_healed(api, disks, ipfs_node, second_node):
    objects = put_local(disks, "ipfs-heal/", [4000, 300_000])
    cids = [digest_bytes(d).cid for d in objects.values()]
    doc = {"name": "ipfs-heal", "selector": {"backend": "local", "prefix": "ipfs-heal/"},
           "placement": {"backends": "kind=ipfs", "replicas": 2}}
    r = api.post("/v1/policies", json={"yaml": yaml.safe_dump(doc)})
    assert r.status_code == 201, r.text
    try:
        run(api, {"kind": "replicate", "source": {"backend": "local", "prefix": "ipfs-heal/"},
                  "targets": [{"backend": "mirror"}]})  # into the catalog; the policy places them
        wait_for("both nodes pin every object",
                 lambda: all(replicas(n, cids) == {c: (c, "present") for c in cids} for n in ("ipfs", "ipfs2")))
        victim = cids[1]
        second_node.rpc("pin/rm", params={"arg": victim})
        assert not pinned(second_node, victim)
        # Verification reads what the catalog says is there: the pin is gone, so is the replica
        # (even while its blocks linger unpinned in the node's blockstore).
        r = api.post("/v1/jobs", json={"kind": "verify", "source": {"backend": "ipfs2", "prefix": ""}})
        assert r.status_code == 202, r.text
        wait_job(api, r.json()["id"])
        report = api.get(f"/v1/jobs/{r.json()['id']}/report").json()
        found = {(f["cid"], f["key"], f["result"]) for f in report["findings"]}
        assert (victim, victim, "missing") in found and report["missing"] >= 1, report
        # The loop repairs it from the good replica on the other node.
        wait_for("the pin is back", lambda: pinned(second_node, victim) and
                 replicas("ipfs2", [victim]) == {victim: (victim, "present")})
        assert second_node.rpc("cat", params={"arg": victim, "timeout": "10s"}).content == objects["ipfs-heal/o1.bin"]
    finally:
        api.delete("/v1/policies/ipfs-heal")


def test_capacity_and_car_export_through_the_driver(ipfs_node):
    from ferry.settings import BackendSpec
    from workers import registry
    from workers.car import CarReader, content

    backend = registry.build(BackendSpec(name="ipfs", driver="ipfs", settings={"api_url": ipfs_node.api_url}))
    data = os.urandom(600_000)
    cid = digest_bytes(data).cid
    backend.write(cid, [data])
    cap = backend.capacity()
    assert cap.used > len(data) and cap.limit is None  # the test repo has no StorageMax set
    reader = CarReader(backend.export_car(cid))
    assert [normalize_cid(r) for r in reader.roots] == [cid]
    blocks = {c: (codec, block) for c, codec, block in reader.blocks()}
    assert b"".join(content(cid, blocks.__getitem__)) == data
    backend.delete(cid)


def test_migrate_from_a_gateway_by_cid_skips_the_lying_one(cluster, ipfs_node, s3_server):
    from tests.fixtures.s3peer import s3_client

    data = hashlib.sha256(b"gateway").digest() * 40_000  # 1.28 MB: five leaves under a dag-pb root
    cid = ipfs_node.rpc("add", params={"cid-version": "1", "raw-leaves": "true", "chunker": "size-262144"},
                        files={"file": ("f", data)}).json()["Hash"]
    cid = normalize_cid(cid)
    assert cid == digest_bytes(data).cid
    r = ferry(cluster, "migrate", f"gateway:{cid}", "s3:from-gateway/", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    job = json.loads(r.stdout)
    assert job["state"] == "succeeded", job
    body = s3_client(s3_server).get_object(Bucket="ferry-e2e", Key=f"from-gateway/{cid}")["Body"].read()
    assert body == data
    assert replicas("s3", [cid]) == {cid: (f"from-gateway/{cid}", "present")}
    assert replicas("gateway", [cid]) == {}  # what a gateway serves is not a replica Ferry keeps
    assert f"of {cid} (lied)" in cluster.logs("w1")  # the liar was named, then the next gateway used

    # Only liars: the item fails, nothing is stored; a gateway is never a target.
    other = hashlib.sha256(b"liars").digest() * 20_000
    cid2 = normalize_cid(ipfs_node.rpc("add", params={"cid-version": "1", "raw-leaves": "true",
                                                      "chunker": "size-262144"},
                                       files={"file": ("f", other)}).json()["Hash"])
    r = ferry(cluster, "migrate", f"liars:{cid2}", "s3:from-liars/", "--json")
    assert r.returncode != 0
    job = json.loads(r.stdout)
    assert job["state"] == "failed", job
    item, = cluster_items(cluster, job["id"])
    assert "does not hash to its CID" in item["error"] and cid2 in item["error"], item
    with pytest.raises(Exception, match="NoSuchKey"):
        s3_client(s3_server).get_object(Bucket="ferry-e2e", Key=f"from-liars/{cid2}")
    r = ferry(cluster, "replicate", "local:x/", "gateway:")
    assert r.returncode != 0 and "read-only" in (r.stdout + r.stderr)


def cluster_items(cluster: Cluster, job_id: str) -> list[dict]:
    return httpx.get(f"{cluster.api_url}/v1/jobs/{job_id}/items", timeout=30, headers=auth()).json()["items"]
