"""HTML pieces of the report: escaped text, embedded images, tables, the page's CSS."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["CSS", "e", "data_uri", "img_tag", "note", "cell", "fmt", "fmt_bytes", "pct", "card", "kv_table", "table",
           "weights_caption", "stat"]

e = html.escape
_THUMB = 128  # displayed thumbnail size in px: small images are upscaled (nearest) to about this


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _thumbnail(img: Image.Image, size: int = _THUMB) -> Image.Image:
    """Small images scaled up by a whole factor (nearest: pixels stay crisp), large ones down."""
    img = img.convert("RGB")
    w, h = img.size
    longest = max(w, h)
    if longest < size:
        f = max(1, size // longest)
        return img.resize((w * f, h * f), Image.NEAREST)
    if longest > 2 * size:
        img = img.copy()
        img.thumbnail((2 * size, 2 * size), Image.LANCZOS)  # 2x: sharp on high-DPI screens
    return img


def img_tag(img: Image.Image, alt: str) -> str:
    return f'<img src="{data_uri(_png(_thumbnail(img)))}" alt="{e(alt)}">'


CSS = """
*{box-sizing:border-box}
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Helvetica,Arial,sans-serif;margin:0;
     background:#f4f5f7;color:#1d2330;font-size:14px;line-height:1.4}
main{max-width:1160px;margin:0 auto;padding:18px 20px 40px}
header{background:#1d2330;color:#fff;padding:18px 20px}
header .inner{max-width:1160px;margin:0 auto}
header h1{margin:0;font-size:22px}
header .sub{color:#b8c0cc;font-size:13px;margin-top:4px;word-break:break-all}
h2{font-size:19px;margin:0 0 8px}
h3{font-size:14px;margin:16px 0 6px;color:#3b4658;text-transform:uppercase;letter-spacing:.04em}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:16px 18px;margin:14px 0}
nav{font-size:13px;margin:8px 0 0}
nav a{margin-right:12px;color:#1971c2;text-decoration:none}
.meta{color:#5b6577;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #dde1e7;border-radius:6px;padding:8px 12px;min-width:130px;background:#fafbfc}
.card .v{font-size:20px;font-weight:600}
.card .k{color:#5b6577;font-size:12px}
.card.bad .v{color:#c92a2a}
.grid{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:138px;background:#fafbfc;border:1px solid #e6e9ee;border-radius:4px;padding:4px}
figure img{display:block;width:128px;height:128px;object-fit:contain;image-rendering:pixelated;
           image-rendering:crisp-edges;background:#eee}
figcaption{font-size:11px;color:#3b4658;margin-top:3px;overflow-wrap:anywhere}
figcaption .w{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:10px;color:#5b6577}
img.plot{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;font-size:12.5px}
th,td{border-bottom:1px solid #e6e9ee;padding:3px 8px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
th{background:#f4f5f7;white-space:normal;vertical-align:bottom;max-width:90px}
table.kv td{text-align:left;white-space:normal;max-width:560px;overflow-wrap:anywhere}
table.kv td:first-child{color:#5b6577;white-space:nowrap}
tr.mean td{font-weight:600;border-top:2px solid #c5ccd6}
.scroll{overflow-x:auto}
.note{background:#fff8e6;border-left:4px solid #f08c00;padding:6px 10px;margin:6px 0;font-size:13px}
.hint{color:#5b6577;font-size:12.5px;margin:2px 0 6px}
.tag{display:inline-block;padding:0 6px;border-radius:3px;font-size:11px;background:#e7f5ff;color:#1864ab}
.tag.tail{background:#fff0e6;color:#d9480f}
.tag.bad{background:#ffe3e3;color:#c92a2a}
details{margin:6px 0}
summary{cursor:pointer;color:#3b4658}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;background:#f1f3f5;padding:0 3px;border-radius:3px}
"""


def note(text: str) -> str:
    return f'<div class="note">{e(text)}</div>'


def cell(img_html: str, caption_html: str) -> str:
    return f"<figure>{img_html}<figcaption>{caption_html}</figcaption></figure>"


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def pct(v: Any) -> str:
    return f"{100 * float(v):.1f} %" if isinstance(v, (int, float)) else "–"


def card(value: str, key: str, bad: bool = False) -> str:
    return f'<div class="card{" bad" if bad else ""}"><div class="v">{e(value)}</div><div class="k">{e(key)}</div></div>'


def kv_table(items: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{e(str(k))}</td><td>{e(fmt(v))}</td></tr>" for k, v in items)
    return f'<div class="scroll"><table class="kv">{rows}</table></div>'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], mean_last: bool = False) -> str:
    head = "".join(f"<th>{e(h.replace('_', ' '))}</th>" for h in header)
    body = []
    for i, r in enumerate(rows):
        cls = ' class="mean"' if mean_last and i == len(rows) - 1 else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{e(fmt(v))}</td>" for v in r) + "</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def weights_caption(w: Sequence[float]) -> str:
    if not len(w):
        return ""
    top = int(np.argmax(w))
    parts = [f"<b>{x:.2f}</b>" if i == top else f"{x:.2f}" for i, x in enumerate(w)]
    return f'<span class="w">w=[{", ".join(parts)}]</span>'


def stat(entry: Any, field: str) -> float | None:
    if isinstance(entry, dict):
        v = entry.get(field)
    elif field == "mean" and isinstance(entry, (int, float)):
        v = entry
    else:
        v = None
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
