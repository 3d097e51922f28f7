"""The operator pages in a real browser: Debian's chromium driven by Playwright against a real uvicorn server.

One line for the module: champion v1, challenger v2 on 25 % of the cameras (cam-3 pinned to it), tokens for a
camera, an operator and an admin, 12 cameras sending demo frames. The promotion test changes the rollout and runs
last.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support.artifacts import CLASSES
from support.servers import serve
from support.ui import Line, build_line, create_app_with_tokens, launch, send

from deploy.edge.decoding import View, view_image
from deploy.edge.rollout import load_config, read_jsonl
from deploy.edge.rollout.stats import wilson_interval
from deploy.edge.service import create_app
from deploy.edge.ui.recent import RecentFrames
from deploy.edge.ui.views import arm_rates, with_age
from spt_core.portable.operating_point import OperatingPoint

CAMS = [f"cam-{i}" for i in range(12)]
PAGES = {"line": "section.cam", "review": "article.review", "rollout": "#champion-version", "models": "section.model"}
HTTP = httpx.Client(timeout=30)


class Box:
    def __init__(self, line: Line, base: str, service: Any) -> None:
        self.line, self.base, self.service = line, base, service


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    line = build_line(tmp_path_factory.mktemp("ui"), n_per_class=6)
    app = create_app_with_tokens(line.manifest)
    with serve(app) as base:
        for k in range(3):
            for j, cam in enumerate(CAMS):
                send(HTTP, base, line, cam, 5 * j + k)
        yield Box(line, base, app.state.service)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


def open_page(browser: Any, box: Box, page: str, token: str | None, requests: list[str] | None = None) -> Any:
    """A fresh tab on /ui/<page> with ``token`` in its sessionStorage (as pasted once by the operator)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    if token:
        ctx.add_init_script(f"sessionStorage.setItem('sensitune-token', {token!r})")
    tab = ctx.new_page()
    tab.set_default_timeout(15_000)
    if requests is not None:
        tab.on("request", lambda r: requests.append(r.url))
    tab.goto(f"{box.base}/ui/{page}")
    return tab


def test_every_page_loads_with_no_request_leaving_loopback(browser: Any, box: Box) -> None:
    seen: list[str] = []
    errors: list[str] = []
    for page, ready in PAGES.items():
        tab = open_page(browser, box, page, "op-token", seen)
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.wait_for_selector(f"#view {ready}")
        tab.wait_for_load_state("networkidle")
        assert tab.locator("#whoami").inner_text().strip() == "olga · operator"
        tab.context.close()
    assert seen and all(u.startswith(f"{box.base}/") or u.startswith("data:") for u in seen), [
        u for u in seen if not u.startswith(box.base)
    ]
    assert any("/ui/static/htmx.min.js" in u for u in seen) and any("/ui/img/" in u for u in seen)
    assert not errors, errors
    # GET / is the line view; without a token the page asks for one instead of showing data
    tab = open_page(browser, box, "line", None)
    tab.goto(box.base)
    assert tab.url.endswith("/ui/line")
    tab.locator("#view", has_text="Sign in with your operator token").wait_for()  # rendered after its script runs
    tab.locator("#whoami", has_text="not signed in").wait_for()
    assert "Sign in with your operator token to label frames" in tab.locator("#view h2").inner_text()
    body = tab.locator("body").inner_text()
    assert body.count("Sign in") == 1 and "Bearer" not in body  # once, in an operator's words
    ink, paper = tab.locator("#view .denied").evaluate(
        "e => [getComputedStyle(e).color, getComputedStyle(e).backgroundColor]"
    )
    assert ink != "rgb(255, 255, 255)" and ink != paper  # readable: dark text on the notice's cream
    tab.context.close()


def test_label_a_frame_with_the_keyboard_lands_in_the_feedback_log(browser: Any, box: Box) -> None:
    tab = open_page(browser, box, "review", "op-token")
    card = tab.wait_for_selector("#view article.review")
    frame_id = card.get_attribute("data-frame")
    predicted = tab.locator("#view .review .cls").inner_text().strip()
    truth = next(c for c in CLASSES if c != predicted)  # "wrong -> class": its number is its place in the list
    tab.keyboard.press(str(CLASSES.index(truth) + 1))
    tab.wait_for_selector("#view .flash.ok")
    assert f"labelled {truth}" in tab.locator("#view .flash").inner_text()
    assert tab.locator(f'#view article.review[data-frame="{frame_id}"]').count() == 0  # off the queue
    feedback, _ = read_jsonl(box.line.root / "logs" / "feedback.jsonl")
    assert {"frame_id": frame_id, "label": truth} in [{k: r[k] for k in ("frame_id", "label")} for r in feedback]
    # and "correct" (C) confirms the next one's verdict
    nxt = tab.wait_for_selector("#view article.review").get_attribute("data-frame")
    served = tab.locator("#view .review .cls").inner_text().strip()
    tab.keyboard.press("c")
    tab.wait_for_selector(f'#view .flash.ok:has-text("labelled {served}")')
    feedback, _ = read_jsonl(box.line.root / "logs" / "feedback.jsonl")
    assert (nxt, served) in [(r["frame_id"], r["label"]) for r in feedback]
    tab.context.close()


def test_a_challenger_frame_appears_under_its_camera(browser: Any, box: Box) -> None:
    tab = open_page(browser, box, "line", "op-token")
    tab.wait_for_selector('#view section.cam[data-camera="cam-3"]')
    assert "challenger v2" in tab.locator('section.cam[data-camera="cam-3"] .arm').inner_text()
    body = send(HTTP, box.base, box.line, "cam-3", 7)  # cam-3 is pinned to the challenger
    assert body["role"] == "challenger"
    shot = f'section.cam[data-camera="cam-3"] figure.shot[data-frame="{body["frame_id"]}"][data-role="challenger"]'
    tab.wait_for_selector(shot)  # the page polls: no reload
    assert tab.locator(f'figure.shot[data-frame="{body["frame_id"]}"]').count() == 1  # under no other camera
    caption = tab.locator(shot + " figcaption").inner_text()
    p_good = tab.locator(shot + " .pg").inner_text()  # the served class's score is P(good) only for a good verdict
    assert body["class"] in caption and p_good == (
        f"{body['score']:.2f}" if body["class"] == "ok" else f"≤ {1 - body['score']:.2f}"
    )
    champ = send(HTTP, box.base, box.line, "cam-0", 7)  # pinned to the champion
    tab.wait_for_selector(
        f'section.cam[data-camera="cam-0"] figure[data-frame="{champ["frame_id"]}"][data-role="champion"]'
    )
    tab.context.close()


def test_promote_without_admin_rights_is_refused_in_the_page_and_by_the_api(browser: Any, box: Box) -> None:
    tab = open_page(browser, box, "rollout", "op-token")
    tab.wait_for_selector("#view #promote")
    assert tab.locator("#promote").is_disabled() and tab.locator("#rollback").is_disabled()
    assert "need an admin token" in tab.locator("#promote-note").inner_text()
    tab.context.close()
    form = {"version": "2", "reason": "try", "confirm": "promote"}
    for token, status in (("op-token", 403), ("cam-token", 403), ("nope", 401), (None, 401)):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        assert HTTP.post(f"{box.base}/ui/rollout/promote", data=form, headers=headers).status_code == status
        assert HTTP.get(f"{box.base}/ui/f/confirm?action=promote", headers=headers).status_code == status
    # a box without tokens: nobody can prove the admin role, so the page disables it and says why
    with serve(create_app(box.line.manifest)) as open_base:
        tab = open_page(browser, Box(box.line, open_base, None), "rollout", None)
        tab.wait_for_selector("#view #promote")
        assert tab.locator("#promote").is_disabled()
        assert "runs without tokens" in tab.locator("#promote-note").inner_text()
        tab.context.close()
        assert HTTP.post(f"{open_base}/ui/rollout/promote", data=form).status_code == 403
    assert load_config(box.line.manifest).challenger.version == "2"  # nothing changed


def test_promote_with_admin_rights_updates_the_manifest_and_the_rollout_view(browser: Any, box: Box) -> None:
    tab = open_page(browser, box, "rollout", "admin-token")
    tab.wait_for_selector("#view #promote:not([disabled])")
    assert tab.locator("#challenger-version").inner_text() == "v2"
    tab.click("#promote")
    tab.wait_for_selector("#dialog #confirm")
    time.sleep(5.5)  # one poll of the rollout view (every 5 s) must not close the open dialog
    assert tab.locator("#dialog #confirm").is_visible()
    tab.fill("#dialog #reason", "signed off by QA")
    tab.click("#dialog #confirm")
    tab.wait_for_selector("#view .flash.ok")
    assert tab.locator("#champion-version").inner_text() == "v2"
    assert tab.locator("#challenger-version").inner_text() == "none"
    assert tab.locator("#dialog").inner_html().strip() == ""
    row = tab.locator("table.audit tbody tr").first.inner_text()
    assert "promote" in row and "ada" in row and "signed off by QA" in row
    cfg = load_config(box.line.manifest)
    assert cfg.champion.version == "2" and cfg.challenger is None
    assert box.service.runtime.state()["champion"] == "2"  # reloaded: the line runs on it now
    tab.context.close()
    tab = open_page(browser, box, "models", "op-token")
    tab.wait_for_selector('#view section.model[data-version="2"][data-role="champion"]')
    assert tab.locator('section.model[data-version="1"]').get_attribute("data-role") == ""
    tab.context.close()


def test_recent_frames_are_bounded_and_count_the_last_hour() -> None:
    import io

    from PIL import Image

    frame = view_image(Image.new("RGB", (640, 480), (200, 10, 10)), View(64))  # as a frame's decode makes it
    ring = RecentFrames(per_camera=3, max_cameras=2, thumb_px=64)
    t0 = 1_000_000.0
    op = OperatingPoint("ok", 0.95)
    for i in range(5):
        body = {"frame_id": f"a{i}", "camera_id": "a", "class": "ok" if i % 2 else "spot", "score": 0.9}
        if i == 3:  # served with its decision: an "ok" verdict under the threshold is rejected all the same
            body |= {"p_good": 0.9, "decision": "reject"}
        ring.add(frame, body, op, now=t0 + 60 * 20 * i)  # every 20 minutes
    shots, counts, rejected = ring.cameras(now=t0 + 60 * 20 * 4)["a"]
    assert [s.frame_id for s in shots] == ["a4", "a3", "a2"]  # newest first, at most 3
    assert max(Image.open(io.BytesIO(shots[0].thumb)).size) == 64
    assert shots[0].p_good is None and shots[1].p_good == 0.9  # P(good) is the score of a good verdict only
    assert dict(counts) == {"spot": 2, "ok": 1}  # minutes 40, 60, 80: the last hour
    assert rejected == 3 and [s.rejected for s in shots] == [True, True, True]  # by decision, not by class
    for cam in ("b", "c"):
        ring.add(frame, {"frame_id": cam, "camera_id": cam, "class": "ok", "score": 1.0}, op)
    assert set(ring.cameras()) == {"b", "c"} and ring.get("a4") is None  # the least recent camera is forgotten


def test_sync_times_show_their_age() -> None:
    assert with_age("2026-01-01T10:00:00+00:00", now=1767261600.0 + 90) == "2026-01-01 10:00:00 (90 s ago)"
    assert with_age("2026-01-01T10:00:00Z", now=1767261600.0 + 3 * 3600) == "2026-01-01 10:00:00 (3.0 h ago)"
    assert with_age("ok") == "ok" and with_age(3) == 3


def test_escape_rate_and_overkill_are_the_reports_counts() -> None:
    stats = {"labelled": 50, "correct": 40, "defects": 20, "escaped": 3, "goods": 30, "overkilled": 3}
    r = arm_rates(stats)
    assert (r["escape"]["k"], r["escape"]["n"]) == (3, 20) and r["escape"]["ci"] == wilson_interval(3, 20)
    assert (r["overkill"]["k"], r["overkill"]["n"]) == (3, 30) and r["overkill"]["ci"] == wilson_interval(3, 30)
    assert r["accuracy"]["p"] == 0.8 and r["accuracy"]["ci"] == wilson_interval(40, 50)
