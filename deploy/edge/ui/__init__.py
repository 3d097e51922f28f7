"""The operator pages of the edge service: line, review queue, rollout and models (server-rendered, offline).

    ui = mount_ui(app, service)     # in deploy.edge.service.create_app
    # each answered frame's thumbnail, from its one decode (service.pages.record after the answer): the line view

Jinja2 templates plus a vendored htmx (static/htmx.min.js, BSD-0, with its licence); every asset is served by the
service itself: no CDN, no build step, no Node at run time. See deploy/README.md ("The operator pages").
"""

from deploy.edge.ui.router import OPEN_PATHS, LineUI, mount_ui

__all__ = ["OPEN_PATHS", "LineUI", "mount_ui"]
