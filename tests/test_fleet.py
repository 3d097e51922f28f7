"""A plant of many boxes (deploy/edge/fleet/, pipelines/fleet*.py) on a small simulated fleet: real `Sync` clients
(acceptance, manifests, reports) and real fleet deciders against a stateful fake MLflow REST server
(tests/support/fleet.py), cameras simulated with known per-version error rates (benchmarks/fleet_cameras.py), and a
clock the test moves. The slow test races two deciders on a real `mlflow server`.

Each test's assertions would fail on a wrong rule: a box outside the wave that served the challenger, a decision
applied twice, a box that lands on an intermediate champion, a local rollback that moved the registry.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from support.fleet import FleetRegistry

from benchmarks.fleet_cameras import Behaviour, Cameras, versioned
from deploy.edge.fleet import Decider, Plan, Wave, box_bucket, claim_name, report_key, start
from deploy.edge.fleet.plan import PLAN_TAG, POOLED_TAG, FleetError
from deploy.edge.mlflow_rest import RegistryError, RestRegistry
from deploy.edge.rollout import Decision, DecisionRule, apply_decision, load_config
from deploy.edge.rollout.decision import PROMOTE, ROLLBACK
from deploy.edge.service import create_app
from deploy.edge.sync import BoxConfig, Sync

NAME = "sensitune-fleet-test"
T0 = 1_800_000_000.0
CAMS = [f"cam-{i}" for i in range(10)]
RULE = DecisionRule(min_samples=20, min_gain=0.0, max_latency_increase=0.5, max_error_rate=0.05)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Fleet:
    """Boxes (box.yaml + `Sync`) on one fake registry, one clock, and simulated cameras."""

    def __init__(self, root: Path, fake: FleetRegistry, names: list[str], behaviours: dict[str, Behaviour],
                 fleet: dict[str, bool] | None = None) -> None:  # fmt: skip
        self.root, self.fake, self.clock = root, fake, Clock(T0)
        self.reg = RestRegistry(fake.url, NAME, timeout_s=5)
        self.cameras, self.frame = Cameras(behaviours), dict.fromkeys(names, 0)
        self.boxes: dict[str, Sync] = {}
        for n in names:
            d = {"box": n, "line": "line-1", "store": "store", "registry": {"url": fake.url, "model_name": NAME},
                 "sync": {"interval_s": 60, "stale_after_s": 300, "challenger_share": 0.5,
                          "fleet": (fleet or {}).get(n, True)}}  # fmt: skip
            (root / n).mkdir(parents=True)
            (root / n / "box.yaml").write_text(yaml.safe_dump(d))
            self.boxes[n] = Sync(BoxConfig.load(root / n / "box.yaml"))
            self.boxes[n].fleet.clock = self.clock

    def sync(self, *names: str) -> dict[str, dict[str, Any]]:
        out = {n: self.boxes[n].run_once() for n in names or self.boxes}
        assert not [o for n, o in out.items() if "error" in o and n not in names], out
        return out

    def serve(self, frames: int = 40, *names: str) -> None:
        for n in names or self.boxes:
            self.frame[n] = self.cameras.serve(self.root / n / "rollout.yaml", n, CAMS, frames, self.frame[n])

    def manifest(self, name: str) -> Any:
        return load_config(self.root / name / "rollout.yaml")

    def challenger(self, name: str) -> str | None:
        c = self.manifest(name).challenger
        return None if c is None else c.version

    def decider(self, who: str = "test") -> Decider:
        return Decider(RestRegistry(self.fake.url, NAME, timeout_s=5), who, self.clock)

    def plan(self, version: str) -> Plan:
        return Plan.of(self.reg.model_version(version))

    def start(self, version: str, *specs: str, floor: int = 20, hours: float = 1.0, **kw: Any) -> Plan:
        waves = [Wave.parse(s, floor, hours) for s in specs]
        return start(self.reg, version, waves, who="qa", why="test", rule=RULE, at=self.clock.t, **kw)


@pytest.fixture
def fake() -> Iterator[FleetRegistry]:
    reg = FleetRegistry()
    yield reg
    reg.server.shutdown()


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory, edge_world: Any) -> dict[str, Path]:
    """v1..v4: the always-ok statistic model sealed as each version (compatible; the cameras decide the answers)."""
    root = tmp_path_factory.mktemp("fleet-arts")
    return {v: versioned(edge_world.art["1"], root / f"v{v}", v) for v in "1234"}


def publish(fake: FleetRegistry, arts: dict[str, Path], *versions: str) -> None:
    for v in versions:
        fake.publish(NAME, arts[v], v, "champion" if v == "1" else None)


def test_waves_parse_and_membership_is_a_stable_hash_that_only_grows() -> None:
    w = Wave.parse("box-7, cam:line3-cam2,10%", 50, 2.0)
    assert (w.boxes, w.cameras, w.share, w.min_labelled, w.min_hours) == (("box-7",), ("line3-cam2",), 0.1, 50, 2.0)
    assert Wave.parse("all").share == 1.0
    with pytest.raises(FleetError, match="--wave ''"):
        Wave.parse("")
    plan = Plan("p", "2", "1", (Wave(("box-b",)), Wave(share=0.5), Wave(share=1.0)), started="x")
    assert Plan.from_json(plan.to_json()) == plan
    names = ["box-b"] + [f"box-{i}" for i in range(200)]
    inside = [[n for n in names if Plan(**{**vars(plan), "wave": k}).membership(n)] for k in range(3)]
    assert inside[0] == ["box-b"] and len(inside[2]) == 201
    assert set(inside[0]) < set(inside[1]) < set(inside[2])
    assert 70 < len(inside[1]) < 130 and all(box_bucket(n) < 0.5 for n in inside[1] if n != "box-b")
    with pytest.raises(FleetError, match="not a fleet plan"):
        Plan.from_json('{"waves": []}')


def test_a_plan_moves_wave_by_wave_on_pooled_evidence_and_floors_then_promotes(
    fake: FleetRegistry, arts: dict[str, Path], tmp_path: Path
) -> None:
    publish(fake, arts, "1", "2")
    # buckets: box-e 0.33 < 0.5 < box-a 0.62; box-b is named
    fl = Fleet(tmp_path, fake, ["box-a", "box-b", "box-e"], {"1": Behaviour(wrong=0.3), "2": Behaviour(wrong=0.0)})
    fl.sync()
    fl.start("2", "box-b,cam:cam-9", "50%", "all")
    fl.sync()
    assert {n: fl.challenger(n) for n in fl.boxes} == {"box-a": "2", "box-b": "2", "box-e": "2"}
    for n in ("box-a", "box-e"):  # in wave 1 by camera only: cam-9 pinned to the challenger, no share
        m = fl.manifest(n)
        assert (m.pinned, m.challenger_share) == ({"cam-9": "challenger"}, 0.0)
    assert (fl.manifest("box-b").pinned, fl.manifest("box-b").challenger_share) == ({}, 0.5)
    fl.serve()
    assert fl.cameras.served.get(("box-a", "challenger", "2")) == 4  # cam-9's frames only
    fl.sync()
    fl.clock.t = T0 + 1800
    out = fl.decider().round()
    assert out["outcome"] == "hold" and out["reasons"] == ["0.50 h in wave 1; need 1.0"]
    fl.clock.t = T0 + 4000
    assert fl.decider().round()["action"] == "advance"
    assert (fl.plan("2").wave, fl.plan("2").revision) == (1, 1)
    fl.sync()
    assert (fl.manifest("box-e").pinned, fl.manifest("box-e").challenger_share) == ({}, 0.5)  # now by its bucket
    assert fl.manifest("box-a").pinned == {"cam-9": "challenger"}
    out = fl.decider().round()  # the wave's own floors: frames gathered in it, time in it
    assert out["outcome"] == "hold" and "0 labelled challenger frames in wave 2; need 20" in out["reasons"]
    fl.serve()
    fl.sync()
    fl.clock.t = T0 + 8000
    assert fl.decider().round()["action"] == "advance"
    fl.sync()
    assert (fl.manifest("box-a").pinned, fl.manifest("box-a").challenger_share) == ({}, 0.5)
    fl.serve()
    fl.sync()
    fl.clock.t = T0 + 12000
    out = fl.decider().round()
    assert out["action"] == "promote", out
    assert (fake.alias(NAME, "champion"), fake.alias(NAME, "challenger")) == ("2", None)
    assert sorted(fake.claims(NAME)) == [claim_name(NAME, fl.plan("2")).replace("r3", f"r{r}") for r in range(3)]
    pooled = json.loads(fl.reg.model_version("2")["tags"][POOLED_TAG])
    assert pooled["boxes"]["serving"] == 3 and pooled["arms"]["challenger"]["accuracy"] > 0.9
    fl.sync()
    assert {(fl.manifest(n).champion.version, fl.challenger(n)) for n in fl.boxes} == {("2", None)}


@pytest.mark.parametrize("bad, why", [(Behaviour(wrong=0.5), "above the ceiling"),
                                      (Behaviour(errors=0.5), "challenger errors")])  # fmt: skip
def test_a_bad_challenger_is_withdrawn_from_every_box_within_one_sync(
    fake: FleetRegistry, arts: dict[str, Path], tmp_path: Path, bad: Behaviour, why: str
) -> None:
    publish(fake, arts, "1", "2")
    fl = Fleet(tmp_path, fake, ["box-a", "box-b", "box-e"], {"1": Behaviour(wrong=0.05), "2": bad})
    fl.sync()
    fl.start("2", "all", floor=10_000, hours=100.0, max_escape_rate=0.02)  # floors far off: an abort does not wait
    fl.sync()
    fl.serve()
    fl.sync()
    out = fl.decider().round()
    assert out["action"] == "abort" and why in out["reasons"][0], out
    assert fake.alias(NAME, "challenger") is None and fl.plan("2").status == "aborted"
    assert all(fl.challenger(n) == "2" for n in fl.boxes)  # until their next sync ...
    fl.sync()
    assert all(fl.challenger(n) is None for n in fl.boxes)  # ... which withdraws it everywhere
    served = sum(fl.cameras.served.get((n, "challenger", "2"), 0) for n in fl.boxes)
    pooled = json.loads(fl.reg.model_version("2")["tags"][POOLED_TAG])  # the frames served stay counted
    assert pooled["arms"]["challenger"]["requests"] + pooled["arms"]["challenger"]["errors"] >= served > 0
    assert fl.decider().round()["outcome"] == "no plan"


def test_two_deciders_racing_apply_exactly_one_decision_per_revision(
    fake: FleetRegistry, arts: dict[str, Path], tmp_path: Path
) -> None:
    publish(fake, arts, "1", "2")
    fl = Fleet(tmp_path, fake, ["box-a", "box-b"], {"1": Behaviour(wrong=0.3), "2": Behaviour(wrong=0.0)})
    fl.sync()
    fl.start("2", "box-b", "all")
    fl.sync()
    fl.serve(60)
    fl.sync()
    fl.clock.t = T0 + 7200  # floors met: the scheduled round advances while a person stops the plan
    fake.create_barrier = threading.Barrier(2)  # both have judged before either claims
    out: dict[str, Any] = {}
    threads = [threading.Thread(target=lambda: out.update(round=fl.decider("cron").round())),
               threading.Thread(target=lambda: out.update(stop=fl.decider("qa").stop("qa", "swapped")))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    claims = {
        int(k.rsplit(".r", 1)[1]): json.loads(v["sensitune.fleet.decision"]) for k, v in fake.claims(NAME).items()
    }
    final = fl.plan("2")
    assert sorted(claims) == list(range(final.revision)) and final.status == "aborted"
    if claims[0]["by"] == "cron":  # the advance won revision 0; the stop lost it and aborted at revision 1
        assert out["round"]["outcome"] == "applied" and claims[1]["by"] == "qa" and final.wave == 1
    else:  # the stop won revision 0: the advance was never applied
        assert out["round"]["outcome"] == "lost" and final.revision == 1 and final.wave == 0
    assert out["stop"]["outcome"] == "applied" and fake.alias(NAME, "challenger") is None


def test_a_claimed_decision_whose_decider_died_is_finished_by_the_next_one(
    fake: FleetRegistry, arts: dict[str, Path], tmp_path: Path
) -> None:
    publish(fake, arts, "1", "2")
    fl = Fleet(tmp_path, fake, ["box-b"], {"1": Behaviour(wrong=0.3), "2": Behaviour(wrong=0.0)})
    fl.sync()
    fl.start("2", "box-b", "all")
    fl.sync()
    fl.serve(60)
    fl.sync()
    fl.clock.t = T0 + 7200
    fake.fail_once = ("model-versions/set-tag", PLAN_TAG)  # claimed, then gone before writing the plan
    with pytest.raises(RegistryError, match="HTTP 500"):
        fl.decider("dies").round()
    assert len(fake.claims(NAME)) == 1 and fl.plan("2").revision == 0
    fl.clock.t = T0 + 60  # this decider alone would hold (time floor), yet it finishes the recorded advance
    out = fl.decider("next").round()
    assert out["outcome"] == "hold" and (fl.plan("2").revision, fl.plan("2").wave) == (1, 1)
    assert fl.plan("2").last["by"] == "dies"


def test_an_offline_box_lands_on_the_current_champion_and_never_serves_a_withdrawn_challenger(
    fake: FleetRegistry, arts: dict[str, Path], tmp_path: Path
) -> None:
    publish(fake, arts, "1", "2", "3", "4")
    behave = {"1": Behaviour(wrong=0.3), "2": Behaviour(wrong=0.6), "3": Behaviour(0.0), "4": Behaviour(0.0)}
    fl = Fleet(tmp_path, fake, ["box-a", "box-b", "box-e"], behave)
    fl.sync()
    fl.start("2", "all", floor=0, hours=0.0, max_escape_rate=0.05)
    fl.sync()
    assert fl.challenger("box-e") == "2"
    fl.boxes["box-e"].reg.url = "http://127.0.0.1:9"  # offline: nothing listens there
    fl.clock.t += 301  # longer than stale_after_s without the registry: the plan's challenger is dropped
    assert "error" in fl.boxes["box-e"].run_once() and fl.challenger("box-e") is None
    online = ("box-a", "box-b")
    fl.serve(40, *online)
    fl.sync(*online)
    assert fl.decider().round()["action"] == "abort"
    for v in ("3", "4"):  # two promotions while box-e is away
        fl.sync(*online)
        fl.start(v, "all", floor=0, hours=0.0)
        fl.sync(*online)
        fl.serve(100, *online)
        fl.sync(*online)
        out = fl.decider().round()
        assert out.get("action") == "promote", out
    fl.boxes["box-e"].reg.url = fake.url
    fl.sync("box-e")
    assert (fl.manifest("box-e").champion.version, fl.challenger("box-e")) == ("4", None)
    assert sorted(p.name for p in (tmp_path / "box-e/store").glob("[!.]*") if p.is_dir()) == ["1", "2", "4"]
    assert fl.cameras.served.get(("box-e", "challenger", "3"), 0) == 0


def test_a_box_decision_stays_local_and_is_reported_to_the_fleet(
    fake: FleetRegistry, arts: dict[str, Path], tmp_path: Path
) -> None:
    publish(fake, arts, "1", "2")
    fl = Fleet(tmp_path, fake, ["box-a", "box-b"], {}, fleet={"box-b": False})  # box-b: a lone box's box.yaml
    fl.sync()
    fl.start("2", "all", floor=10_000, hours=100.0)
    fl.sync()
    fl.serve(20)
    versions = {"champion_version": "1", "challenger_version": "2"}
    apply_decision(tmp_path / "box-a/rollout.yaml", Decision(ROLLBACK, ["error rate"], versions), source="auto:x")
    apply_decision(tmp_path / "box-b/rollout.yaml", Decision(PROMOTE, ["looks good"], versions), actor="op")
    fl.sync()
    assert (fake.alias(NAME, "champion"), fake.alias(NAME, "challenger")) == ("1", "2")  # the registry did not move
    assert not [k for k in fake.models[NAME]["tags"] if k.startswith("audit.")][1:]  # only the start's
    assert fl.challenger("box-a") is None  # the rollback holds on box-a for the rest of the plan
    assert (fl.manifest("box-b").champion.version, fl.challenger("box-b")) == ("1", "2")  # the fleet's, again
    report = json.loads(fake.models[NAME]["tags"][report_key("box-a")])
    assert (report["local"]["action"], report["local"]["source"]) == ("rollback", "auto:x")
    assert report["arms"]["challenger"]["requests"] > 0  # its frames stay in the fleet's evidence
    fl.clock.t = T0 + 60
    pooled = fl.decider().round()
    assert pooled["outcome"] == "hold"
    told = json.loads(fl.reg.model_version("2")["tags"][POOLED_TAG])
    assert told["boxes"]["local"]["box-a"]["action"] == "rollback"
    fl.sync("box-a")  # the box's rollout page shows the fleet's wave and pooled numbers as its last sync read them
    app = create_app(tmp_path / "box-a/rollout.yaml")
    app.state.service.sync = fl.boxes["box-a"]
    page = TestClient(app, base_url="http://127.0.0.1").get("/ui/f/rollout").text
    assert "wave 1 of 1 (all boxes). This box: outside the wave (champion only); rolled back here (auto:x)" in page
    assert "pooled over 2 box(es)" in page and '<b class="action hold">hold</b>' in page


def test_cli_starts_watches_and_stops_a_plan(
    fake: FleetRegistry, arts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from pipelines.cli import main
    from pipelines.fleet import build_deployment, fleet_decide

    publish(fake, arts, "1", "2")
    monkeypatch.chdir(tmp_path)
    common = ["--tracking-uri", fake.url, "--set", f"publish.model_name={NAME}"]
    assert main(["fleet", "start", "2", "--wave", "box-7", "--wave", "all", *common]) == 2  # no --why
    assert "give VERSION --wave" in capsys.readouterr().err
    assert main(["fleet", "start", "2", "--wave", "box-7", "--wave", "all", "--why", "QA 12", "--min-labelled", "30",
                 "--final-labelled", "800", *common]) == 0  # fmt: skip
    plan = Plan.of(RestRegistry(fake.url, NAME).alias("challenger"))
    assert fake.alias(NAME, "challenger") == "2" and plan.active
    assert [w.min_labelled for w in plan.waves] == [30, 800]  # the last wave's floor is its own
    assert main(["fleet", "start", "2", "--wave", "all", "--why", "again", *common]) == 2
    assert "is rolling out" in capsys.readouterr().err
    assert fleet_decide.fn(fake.url, NAME, "test")["outcome"] == "hold"  # the Prefect flow's body
    deployment = build_deployment(fake.url, NAME, 30)  # `fleet serve`: that body every 30 s, one run at a time
    assert deployment.schedules[0].schedule.interval.total_seconds() == 30
    assert deployment.entrypoint.endswith("pipelines/fleet.py:fleet_decide")
    assert main(["fleet", "watch", *common]) == 0
    text = capsys.readouterr().out
    assert "wave 1 of 2 (box-7)" in text and "waves: box-7 -> all boxes" in text and "now: hold" in text
    assert main(["fleet", "stop", "--why", "camera swapped", *common]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "abort" and fake.alias(NAME, "challenger") is None


class RacingRegistry(RestRegistry):
    """The REST client whose creates wait until every racer has arrived, then go to the server together."""

    barrier: threading.Barrier | None = None

    def create_model(self, name: str, tags: dict[str, str], description: str = "") -> bool:
        if self.barrier is not None:
            self.barrier.wait(timeout=60)
        return super().create_model(name, tags, description)


def race(n: int, fn: Any) -> list[Any]:
    """`fn(i)` in `n` threads at once; their results."""
    out: list[Any] = []
    threads = [threading.Thread(target=lambda i=i: out.append(fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


@pytest.mark.slow
def test_mlflow_keeps_a_claim_to_exactly_one_of_many_racing_deciders(mlflow_uri: str) -> None:
    """The atomic step the decider rests on, on a real `mlflow server`: of 8 concurrent creates of one name exactly
    one succeeds; then two deciders judging the same revision at the same moment apply one decision."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri, mlflow_uri)
    client.create_registered_model(NAME)
    run = client.create_run(client.create_experiment("fleet-race")).info.run_id
    for v in ("1", "2"):
        assert client.create_model_version(NAME, f"runs:/{run}/export", run_id=run).version == v
    client.set_registered_model_alias(NAME, "champion", "1")
    racing = RacingRegistry(mlflow_uri, NAME)
    for trial in range(3):
        RacingRegistry.barrier = threading.Barrier(8)
        won = race(8, lambda _, name=f"{NAME}.race-{trial}": racing.create_model(name, {"by": "x"}))
        assert sorted(won) == [False] * 7 + [True]
    reg = RestRegistry(mlflow_uri, NAME)
    start(reg, "2", [Wave(("box-b",)), Wave(share=1.0)], who="qa", why="race", rule=RULE, at=T0)
    RacingRegistry.barrier = threading.Barrier(2)
    outs = race(2, lambda i: Decider(RacingRegistry(mlflow_uri, NAME), f"d{i}", Clock(T0 + 60)).round())
    assert sorted(o["outcome"] for o in outs) == ["applied", "lost"]
    plan = Plan.of(reg.model_version("2"))
    assert (plan.revision, plan.wave) == (1, 1)  # one advance, not two
    claims = [m.name for m in client.search_registered_models(f"name LIKE '{NAME}.fleet-%'")]
    assert claims == [f"{NAME}.fleet-{plan.id}.r0"]
