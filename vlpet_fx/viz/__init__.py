"""Pictures of site tables and plans."""

from .svg import render_html, render_svg

__all__ = ["render_svg", "render_html"]
