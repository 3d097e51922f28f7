"""The operator pages on a demo line: screenshots of each view, and the weight and render time of each page.

    .venv/bin/python benchmarks/ui_pages.py [--runs 5] [--shots docs/ui]
    .venv/bin/python benchmarks/ui_pages.py --bit-depth 12      # Mono12 frames: ui-{line,review}-16bit.png only

Builds two OpenVINO artifacts fitted to the demo defect images (`benchmarks/demo_line.py`: champion v1 at 32 px,
challenger v2 at 48 px, with their verification records), starts the edge service on loopback with a camera, an
operator and an admin token, and plays the demo line: 12 cameras, 25 % of them on the challenger (cam-3 pinned),
20 frames each, about half of them labelled by "operators" through /feedback. Then Debian's chromium (Playwright):

- screenshots of each view at panel-PC size (1280 x 900) and the line and review views at tablet size (768 x 1024)
  into ``--shots``;
- per view, ``--runs`` cold loads (fresh browser context, empty cache): bytes transferred (every request,
  headers included) and the time from navigation start until the view's data is on screen, without and with
  chromium's 4x CPU throttling (a slow panel PC). Written to benchmarks/results/ui_pages.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.demo_line import build_line, create_app_with_tokens, label_of, launch, send
from benchmarks.edge_box import serve

ROOT = Path(__file__).resolve().parents[1]

VIEWS = {"line": "section.cam", "review": "article.review", "rollout": "#champion-version", "models": "section.model"}
CAMS = [f"cam-{i}" for i in range(12)]
# the first time the view's data is swapped in and painted (the next animation frame), in ms since navigation start
SETTLED = """document.addEventListener("htmx:afterSettle", function (e) {
  if (e.target.id === "view" && window.__viewAt === undefined)
    requestAnimationFrame(function () { window.__viewAt = window.__viewAt || performance.now(); });
});"""


def play_line(base: str, line: Any, frames_per_camera: int) -> int:
    """Every camera sends frames, 80 % of them good parts; every other frame gets the operator's true label.
    Returns the number of frames sent."""
    client = httpx.Client(timeout=30)
    good = [i for i, c in enumerate(line.labels) if c == 0]
    bad = [i for i, c in enumerate(line.labels) if c != 0]
    n = 0
    for k in range(frames_per_camera):
        for j, cam in enumerate(CAMS):
            pool = bad if (3 * j + 7 * k) % 5 == 0 else good
            i = pool[(7 * j + 3 * k) % len(pool)]
            body = send(client, base, line, cam, i)
            n += 1
            if (j + k) % 2 == 0:
                r = client.post(f"{base}/feedback", json={"frame_id": body["frame_id"], "label": label_of(line, i)},
                                headers={"Authorization": "Bearer op-token"})  # fmt: skip
                assert r.status_code == 200, r.text
    time.sleep(0.5)  # the line view's ring is filled after each answer
    return n


def open_view(browser: Any, base: str, view: str, token: str, size: tuple[int, int], throttle: float = 1) -> Any:
    ctx = browser.new_context(viewport={"width": size[0], "height": size[1]})
    ctx.add_init_script(f"sessionStorage.setItem('sensitune-token', {token!r})")
    ctx.add_init_script(SETTLED)
    tab = ctx.new_page()
    tab.set_default_timeout(30_000)
    if throttle > 1:
        ctx.new_cdp_session(tab).send("Emulation.setCPUThrottlingRate", {"rate": throttle})
    return tab


def measure(browser: Any, base: str, view: str, throttle: float) -> tuple[int, float, int]:
    """One cold load: (bytes transferred, ms until the view's data is rendered, requests)."""
    tab = open_view(browser, base, view, "admin-token", (1280, 900), throttle)
    done: list[Any] = []
    tab.on("requestfinished", lambda r: done.append(r))
    tab.goto(f"{base}/ui/{view}")
    tab.wait_for_selector(f"#view {VIEWS[view]}")
    tab.wait_for_function("window.__viewAt !== undefined")
    ms = tab.evaluate("window.__viewAt")
    tab.wait_for_load_state("networkidle")
    total = 0
    for r in done:
        s = r.sizes()
        total += s["responseBodySize"] + s["responseHeadersSize"] + s["requestHeadersSize"] + s["requestBodySize"]
    tab.context.close()
    return total, ms, len(done)


def shrink_png(path: Path) -> None:
    """256 colours: a committed screenshot of a few hundred KB instead of half a MB (text stays sharp)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256)
    small.save(path, optimize=True)


def screenshots(browser: Any, base: str, out: Path, suffix: str = "") -> list[Path]:
    """Every view at panel size, line and review at tablet size too; with a ``suffix`` (a 16-bit line: "-16bit")
    only line and review at panel size, named ``ui-<view><suffix>.png``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    sizes = (("panel", (1280, 900)),) + ((("tablet", (768, 1024)),) if not suffix else ())
    for view, ready in VIEWS.items():
        for name, size in sizes:
            if (name == "tablet" or suffix) and view not in ("line", "review"):
                continue
            tab = open_view(browser, base, view, "admin-token", size)
            tab.goto(f"{base}/ui/{view}")
            tab.wait_for_selector(f"#view {ready}")
            tab.wait_for_load_state("networkidle")
            path = out / f"ui-{view}{'' if name == 'panel' else '-tablet'}{suffix}.png"
            if view == "rollout":  # a full-page shot: the sticky header would be drawn mid-page
                tab.add_style_tag(content="header.top { position: static; }")
            tab.screenshot(path=str(path), full_page=view == "rollout")
            paths.append(path)
            if view == "rollout" and name == "panel":
                tab.click("#promote")  # the confirmation step, open
                tab.wait_for_selector("#dialog #confirm")
                tab.evaluate("window.scrollTo(0, document.body.scrollHeight)")
                paths.append(out / "ui-rollout-confirm.png")
                tab.screenshot(path=str(paths[-1]))
            tab.context.close()
    for path in paths:
        shrink_png(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--frames", type=int, default=20, help="frames per camera")
    ap.add_argument("--shots", type=Path, default=ROOT / "docs" / "ui")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ui_pages.md")
    ap.add_argument("--bit-depth", type=int, choices=(10, 12, 16), default=None,
                    help="cameras send MonoN 16-bit PNG frames: screenshots of line and review only, no timings")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="ui-demo-"))
    line = build_line(work, n_per_class=16, size=96, bit_depth=args.bit_depth, decision={"min_samples": 50,
                      "min_gain": 0.0, "max_latency_increase": 0.5, "max_error_rate": 0.05})  # fmt: skip
    app = create_app_with_tokens(line.manifest)
    rows = []
    with serve(app) as base, sync_playwright() as p:
        n = play_line(base, line, args.frames)
        browser = launch(p)
        if args.bit_depth:
            for path in screenshots(browser, base, args.shots, "-16bit"):
                print(f"wrote {path}")
            return 0
        shots = screenshots(browser, base, args.shots)
        for view in VIEWS:
            for throttle in (1, 4):
                runs = [measure(browser, base, view, throttle) for _ in range(args.runs)]
                kb = statistics.median(r[0] for r in runs) / 1024
                ms = [r[1] for r in runs]
                rows.append((view, throttle, kb, statistics.median(ms), max(ms), runs[0][2]))
        version = browser.version
        browser.close()
    cmd = ".venv/bin/python benchmarks/ui_pages.py " + shlex.join(argv or sys.argv[1:])
    lines = [
        "# Operator pages: weight and render time per view",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Demo line: 12 cameras, 25 % on the challenger, {n} frames sent, about half labelled. Chromium {version} "
        f"headless, {platform.machine()} {platform.processor() or ''}, Python {platform.python_version()}, "
        f"{args.runs} cold loads per row (fresh context, empty cache); loaded with an admin token. Load average "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1 / 5 / 15 min) on {os.cpu_count()} CPUs, shared "
        "with other jobs: the times measure that machine too.",
        "Weight: every request of the load (page, htmx, CSS, JS, fragment, thumbnails), headers included. Render: "
        "navigation start until the view's data is on screen (the fragment swapped in). 4x: chromium's CPU "
        "throttling, a slow panel PC. Budget: under ~300 KB and 1 s per view.",
        "",
        "| view | CPU | weight (KB) | requests | render p50 (ms) | render max (ms) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {v} | {t}x | {kb:.1f} | {req} | {p50:.0f} | {mx:.0f} |" for v, t, kb, p50, mx, req in rows]
    lines += ["", "Screenshots: " + ", ".join(f"`{os.path.relpath(Path(s).resolve(), ROOT)}`" for s in shots), ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
