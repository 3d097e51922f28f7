"""Issue 29: a red team on the plant network, against the edge box's pages, front door, tokens and probes. One test
per finding; each failed on the code before the fix.

Real uvicorn servers on 127.0.0.1 and the tiny line of support/edge.py (v1 always "ok", v2 fitted); the browser
test drives Debian's chromium through Playwright, as tests/test_ui.py does. The inputs side of the issue (decode
memory, class names, import) is in tests/test_hostile_inputs.py.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from support.edge import AS, HTTP, STORE, EdgeWorld, post_frame, rollout
from support.servers import serve

import deploy.edge.ui.views as views
from deploy.edge.api import redact
from deploy.edge.auth import TokenStore, token_digest
from deploy.edge.rollout import read_jsonl
from deploy.edge.service import create_app
from deploy.edge.ui.router import LineUI

PAYLOAD = '<img src=x onerror="document.body.dataset.pwned=1">'


@pytest.fixture()
def rollout_with_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Rollout view with a hostile ``ok_class``, as a manifest from before the class-name check could carry."""
    real = views.rollout_view
    monkeypatch.setattr(views, "rollout_view", lambda service: {**real(service), "ok_class": PAYLOAD})


# ---------------------------------------------------------------------------------------- 1. stored XSS, CSP
def test_a_hostile_class_name_is_text_on_the_rollout_page_under_a_csp(
    edge_world: EdgeWorld, tmp_path: Path, rollout_with_payload: None
) -> None:
    cfg = rollout(tmp_path, edge_world, "1", "2")
    with serve(create_app(cfg, STORE)) as base:
        r = HTTP.get(f"{base}/ui/f/rollout", headers=AS["panel"])
        shell = HTTP.get(f"{base}/ui/rollout")
    assert r.status_code == 200 and "defects passed as &lt;img src=x onerror=" in r.text
    assert "<img src=x" not in r.text  # escaped, not markup
    for page in (r, shell):
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "frame-ancestors 'none'" in csp and page.headers["x-content-type-options"] == "nosniff"
    templates = Path(views.__file__).parent / "templates"
    assert not [p.name for p in templates.glob("*.html") if "|safe" in p.read_text().replace(" ", "")]


def test_the_payload_stays_inert_in_chromium_and_the_pages_work_under_the_csp(
    edge_world: EdgeWorld, tmp_path: Path, rollout_with_payload: None
) -> None:
    from playwright.sync_api import sync_playwright
    from support.ui import launch

    cfg = rollout(tmp_path, edge_world, "1", "2")
    with serve(create_app(cfg, STORE)) as base, sync_playwright() as p:
        browser = launch(p)
        ctx = browser.new_context()
        ctx.add_init_script("sessionStorage.setItem('sensitune-token', 'op-secret')")
        tab = ctx.new_page()
        errors: list[str] = []
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.goto(f"{base}/ui/rollout")
        tab.wait_for_selector("#view #champion-version")
        tab.wait_for_load_state("networkidle")
        assert "defects passed as " + PAYLOAD in tab.locator("table.arms").inner_text()  # shown as text
        assert tab.evaluate("document.body.dataset.pwned") is None
        assert tab.locator('img[src="x"]').count() == 0
        assert not errors, errors  # htmx and ui.js run under the CSP: no eval, no inline script refused
        browser.close()


# ------------------------------------------------------------------------------- 2. Host and Origin, any mode
def test_a_cross_origin_form_cannot_label_and_a_rebound_host_cannot_promote_without_tokens(
    edge_world: EdgeWorld, tmp_path: Path
) -> None:
    cfg = rollout(tmp_path, edge_world, "1", "2")
    before = cfg.read_bytes()
    app = create_app(cfg, None)  # development: no tokens, loopback only
    feedback = tmp_path / "logs" / "feedback.jsonl"
    with serve(app) as base:
        fid = post_frame(base, edge_world.images[0], "cam-a").json()["frame_id"]
        form = {"frame_id": fid, "label": "ok"}
        r = HTTP.post(f"{base}/ui/review/label", data=form, headers={"Origin": "http://evil.plant.local"})
        assert r.status_code == 403 and "another site" in r.json()["error"]
        assert not feedback.exists() or read_jsonl(feedback)[0] == []
        port = base.rsplit(":", 1)[1]
        r = HTTP.post(f"{base}/promote", json={}, headers={"Host": f"evil.example:{port}"})  # DNS rebinding
        assert r.status_code == 421 and "--allow-host" in r.json()["error"]
        assert HTTP.get(f"{base}/healthz", headers={"Host": "evil.example"}).status_code == 421
        assert HTTP.post(f"{base}/ui/review/label", data=form).status_code == 200  # same origin: the route works
    assert cfg.read_bytes() == before and [r["frame_id"] for r in read_jsonl(feedback)[0]] == [fid]
    assert app.state.service.metrics.counts["refused_unauthorized"] == 3
    with serve(create_app(cfg, None, hosts=["Edge-7.plant"])) as base:  # a configured name, any case, any port
        port = base.rsplit(":", 1)[1]
        assert HTTP.get(f"{base}/readyz", headers={"Host": f"edge-7.plant:{port}"}).status_code == 200
        r = HTTP.post(f"{base}/decide", json={}, headers={"Origin": f"http://edge-7.plant:{port}"})
        assert r.status_code == 200
        for origin in ("null", "http://[bad"):  # a sandboxed page; a malformed header is refused, not a 500
            assert HTTP.get(f"{base}/readyz", headers={"Origin": origin}).status_code == 403


def test_refusals_of_the_front_door_are_counted(edge_world: EdgeWorld, tmp_path: Path) -> None:
    app = create_app(rollout(tmp_path, edge_world, "1", None), STORE)
    with serve(app) as base:
        assert HTTP.post(f"{base}/decide", json={}).status_code == 401
        assert HTTP.post(f"{base}/decide", json={}, headers=AS["panel"]).status_code == 403
        assert HTTP.get(f"{base}/ui/f/confirm?action=promote", headers=AS["panel"]).status_code == 403  # the pages
        metrics = HTTP.get(f"{base}/metrics", headers=AS["alice"]).json()
    assert metrics["refused_unauthorized"] == 3


# --------------------------------------------------------------------------------------------- 3. tokens
def test_a_token_taken_out_of_the_file_stops_working_at_reload_and_tokens_expire(
    edge_world: EdgeWorld, tmp_path: Path
) -> None:
    path = tmp_path / "tokens.yaml"

    def write(*entries: dict[str, Any]) -> None:
        path.write_text(json.dumps({"tokens": list(entries)}))

    alice = {"name": "alice", "role": "admin", "sha256": token_digest("admin-secret")}
    bob = {"name": "bob", "role": "operator", "sha256": token_digest("bob-secret")}
    old = {"name": "old", "role": "operator", "sha256": token_digest("old-secret"), "expires": "2020-01-01T00:00:00Z"}
    soon = {"name": "soon", "role": "operator", "sha256": token_digest("soon-secret"), "expires": "2999-01-01"}
    write(alice, bob, old, soon)
    as_ = {t: {"Authorization": f"Bearer {t}-secret"} for t in ("bob", "old", "soon")}
    with serve(create_app(rollout(tmp_path, edge_world, "1", None), TokenStore.from_file(path))) as base:
        assert HTTP.get(f"{base}/report", headers=as_["bob"]).status_code == 200
        assert HTTP.get(f"{base}/report", headers=as_["old"]).status_code == 401  # expired
        assert HTTP.get(f"{base}/report", headers=as_["soon"]).status_code == 200
        write(alice, soon)  # bob is revoked
        assert HTTP.get(f"{base}/report", headers=as_["bob"]).status_code == 200  # until the reload
        assert HTTP.post(f"{base}/reload", json={}, headers=AS["alice"]).status_code == 200
        assert HTTP.get(f"{base}/report", headers=as_["bob"]).status_code == 401
        path.write_text("tokens: [{name: alice}]")  # broken: refused, and the tokens in force stay
        r = HTTP.post(f"{base}/reload", json={}, headers=AS["alice"])
        assert r.status_code == 400 and "previous tokens" in r.json()["error"]
        assert HTTP.get(f"{base}/report", headers=as_["soon"]).status_code == 200
    with pytest.raises(Exception, match="expires='someday'"):
        TokenStore([("x", "admin", token_digest("x"), "someday")], "t")


# ------------------------------------------------------------------------------------ 4. small ones, pages
def test_an_oversized_label_or_frame_id_from_the_page_is_a_4xx(edge_world: EdgeWorld, tmp_path: Path) -> None:
    with serve(create_app(rollout(tmp_path, edge_world, "1", None), STORE)) as base:
        fid = post_frame(base, edge_world.images[0], "cam-a").json()["frame_id"]
        for form in ({"frame_id": fid, "label": "x" * 300}, {"frame_id": "f" * 2000, "label": "ok"}):
            r = HTTP.post(f"{base}/ui/review/label", data=form, headers=AS["panel"])
            assert r.status_code == 422 and "Traceback" not in r.text and "at most" in r.text, r.text[:200]


def test_a_stray_manifest_with_odd_types_is_listed_as_invalid(edge_world: EdgeWorld, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, edge_world, "1", None)
    (tmp_path / "stray").mkdir()
    stray = {"model_version": "9", "precision": 3, "data_version": 5, "created": 7, "class_names": "abc",
             "promotable": "yes", "verification": [1]}  # fmt: skip
    (tmp_path / "stray" / "manifest.json").write_text(json.dumps(stray))
    with serve(create_app(cfg, STORE)) as base:
        r = HTTP.get(f"{base}/ui/f/models", headers=AS["panel"])
    assert r.status_code == 200
    assert re.search(r'data-version="9".*invalid manifest.*precision=3 is not text', r.text, re.S)
    assert 'data-version="1" data-role="champion"' in r.text  # the good one is still shown in full


def test_signed_image_links_expire(edge_world: EdgeWorld, tmp_path: Path) -> None:
    app = create_app(rollout(tmp_path, edge_world, "1", None), STORE)
    with serve(app) as base:
        fid = post_frame(base, edge_world.images[0], "cam-a").json()["frame_id"]
        deadline, line = time.monotonic() + 20, lambda: HTTP.get(f"{base}/ui/f/line", headers=AS["panel"]).text
        while not (found := re.search(r'src="(/ui/img/[^"]+)"', line())):
            assert time.monotonic() < deadline, "the line view never showed the frame"  # recorded after the answer
            time.sleep(0.1)
        link = found[1].replace("&amp;", "&")
        assert fid in link and HTTP.get(f"{base}{link}").status_code == 200
        exp = int(re.search(r"exp=(\d+)", link)[1])
        assert HTTP.get(base + link.replace(f"exp={exp}", f"exp={exp + 10**6}")).status_code == 403  # signed
    ui = LineUI(app.state.service)
    exp, sig = re.search(r"exp=(\d+)&sig=(\w+)", ui.img(fid, now=1000.0)).groups()
    assert 1000 + 3600 <= int(exp) <= 1000 + 4200
    assert ui.signed(fid, int(exp), sig, now=int(exp) - 1) and not ui.signed(fid, int(exp), sig, now=int(exp))


# ---------------------------------------------------------------------------------------- 5. the open probe
def test_the_open_healthz_shows_no_path_and_no_url(edge_world: EdgeWorld, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, edge_world, "1", None)
    shutil.rmtree(tmp_path / "art1")  # the champion cannot load: its error names the absolute path
    with serve(create_app(cfg, STORE)) as base:
        health = HTTP.get(f"{base}/healthz").json()
        metrics = HTTP.get(f"{base}/metrics", headers=AS["alice"]).json()
    assert health["champion"] is None and "<path>" in health["champion_error"]
    assert str(tmp_path) not in json.dumps(health) and str(tmp_path) in metrics["champion_error"]  # token: full
    text = "sync failed: http://mlflow.plant:5000/api/2.0 refused; cache /var/lib/sensitune/x.json, C:\\box\\y"
    assert redact({"sync": {"error": text, "n": 3}}) == {
        "sync": {"error": "sync failed: <url> refused; cache <path>, <path>", "n": 3}
    }
    assert redact("art2/model.bin: sha256 differs") == "art2/model.bin: sha256 differs"  # relative: left alone
