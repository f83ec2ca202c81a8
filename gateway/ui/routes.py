"""Serves the dashboard: one HTML page for every /ui path (the script picks the view) and its two assets.

The page holds no data: the script reads /v1 with the API key the user typed (kept in localStorage), so these
routes need no key themselves.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from gateway.errors import NotFound

router = APIRouter(prefix="/ui", include_in_schema=False)

STATIC = Path(__file__).parent / "static"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}  # served by name only: no path ever reaches disk

# Everything the page needs comes from this origin; nothing inline, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded gateway serves its own script
}


@router.get("/static/{name}")
def asset(name: str) -> FileResponse:
    """The dashboard's script or stylesheet."""
    if name not in ASSETS:
        raise NotFound(f"no asset {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=SECURITY_HEADERS)


@router.get("")
def root() -> RedirectResponse:
    """/ui -> /ui/jobs, the first view."""
    return RedirectResponse("/ui/jobs")


@router.get("/{view:path}")
def page(view: str) -> FileResponse:
    """The dashboard page; its script shows the view the path names (jobs, fine-tunes, playground...)."""
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=SECURITY_HEADERS)
