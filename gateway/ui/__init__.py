"""The web dashboard at /ui: static HTML, vanilla JS and CSS that read the public API (no build step)."""
