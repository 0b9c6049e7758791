"""A self-contained HTML page that animates a denoising trajectory (``python -m dlm.generate trajectory=true``).

One file, inline CSS and JavaScript, no external asset. Every frame is ``x`` after one sampler step, one line
per sample; masked positions show as ``▒``, EOS / pad as a faint dot (drawn by CSS, so it is not part of the
page's text). The last frame is rendered statically in the HTML, so the final text is visible without
JavaScript; with JavaScript a play / step / slider control walks through the frames.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

__all__ = ["MASK_GLYPH", "frame_cells", "render_trajectory_html", "write_trajectory_html"]

MASK_GLYPH = "▒"

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem;color:#222}
h1{font-size:1.3rem}.meta{color:#555;font-size:.9rem}
#controls{margin:1rem 0;display:flex;gap:.5rem;align-items:center}
#controls button{font-size:1rem;padding:.2rem .7rem}#slider{flex:1}
.frame{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:1.15rem;line-height:1.9;
background:#fafafa;border:1px solid #ddd;border-radius:6px;padding:.8rem;white-space:pre-wrap}
.row{border-bottom:1px dashed #e4e4e4}.row:last-child{border-bottom:none}
.m{color:#9aa3ad}.new{background:#fff3b0;border-radius:2px}.given{color:#1f5fa8}
.eos::after{content:"\\00b7";color:#c0c0c0}
#final pre{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap}
"""

_JS = """
(function(){
  const F = JSON.parse(document.getElementById('frames').textContent);
  const box = document.getElementById('frame'), slider = document.getElementById('slider'),
        label = document.getElementById('label'), play = document.getElementById('play');
  let i = F.length - 1, timer = null;
  function show(k){
    i = Math.max(0, Math.min(F.length - 1, k));
    box.textContent = '';
    for (const row of F[i]) {
      const div = document.createElement('div'); div.className = 'row';
      for (const [text, cls] of row) {
        const s = document.createElement('span'); if (cls) s.className = cls; s.textContent = text; div.appendChild(s);
      }
      box.appendChild(div);
    }
    slider.value = i; label.textContent = 'step ' + i + ' / ' + (F.length - 1);
  }
  function stop(){ if (timer) { clearInterval(timer); timer = null; } play.textContent = '\\u25b6 play'; }
  play.onclick = function(){
    if (timer) { stop(); return; }
    if (i >= F.length - 1) show(0);
    play.textContent = '\\u275a\\u275a pause';
    timer = setInterval(function(){ if (i >= F.length - 1) { stop(); } else { show(i + 1); } }, 250);
  };
  document.getElementById('prev').onclick = function(){ stop(); show(i - 1); };
  document.getElementById('next').onclick = function(){ stop(); show(i + 1); };
  slider.oninput = function(){ stop(); show(parseInt(slider.value, 10)); };
  document.getElementById('controls').hidden = false;
  show(F.length - 1);
})();
"""


def frame_cells(frame: Tensor, previous: Tensor | None, given: Tensor, tokenizer, mask_id: int) -> list[list[list[str]]]:
    """One frame as rows of ``[text, css class]`` cells: masks ``▒``, EOS/pad a CSS dot, tokens committed at
    this step highlighted, given tokens (prompt / context) coloured."""
    special = {int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)}
    rows = []
    for b in range(frame.shape[0]):
        cells = []
        for t, tok in enumerate(frame[b].tolist()):
            if tok == mask_id:
                cells.append([MASK_GLYPH, "m"])
                continue
            cls = "given" if bool(given[b, t]) else ("new" if previous is not None and int(previous[b, t]) == mask_id
                                                       else "")
            if tok in special:
                cells.append(["", ("eos " + cls).strip()])
            else:
                cells.append([tokenizer.decode([tok], skip_special_tokens=False), cls])
        rows.append(cells)
    return rows


def render_trajectory_html(
    trajectory: Sequence[Tensor],
    tokenizer,
    mask_id: int,
    final_texts: Sequence[str],
    title: str = "dlm denoising trajectory",
    meta: str = "",
) -> str:
    """The page as a string. ``trajectory``: ``x`` ([B, T] token ids) before the first step and after each."""
    if not trajectory:
        raise ValueError("the trajectory is empty: record it with sampler.record_trajectory=true")
    given = trajectory[0] != mask_id
    frames = [frame_cells(x, trajectory[k - 1] if k else None, given, tokenizer, mask_id)
              for k, x in enumerate(trajectory)]
    last = frames[-1]
    static = "".join(
        '<div class="row">' + "".join(
            f'<span class="{html.escape(cls)}">{html.escape(text)}</span>' if cls else html.escape(text)
            for text, cls in row) + "</div>"
        for row in last
    )
    data = json.dumps(frames, ensure_ascii=False).replace("</", "<\\/")
    finals = "\n".join(html.escape(t) for t in final_texts)
    n = len(frames) - 1
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">{html.escape(meta)} &mdash; {n} step{'s' if n != 1 else ''}; {MASK_GLYPH} = masked, highlighted = committed at that step</p>
<div id="controls" hidden><button id="play">&#9654; play</button><button id="prev">&#9664;</button>
<button id="next">&#9654;|</button><input id="slider" type="range" min="0" max="{n}" value="{n}"><span id="label">step {n} / {n}</span></div>
<div id="frame" class="frame">{static}</div>
<section id="final"><h2>final text</h2><pre>{finals}</pre></section>
<script type="application/json" id="frames">{data}</script>
<script>{_JS}</script>
</body></html>
"""


def write_trajectory_html(path: str | Path, trajectory: Sequence[Tensor], tokenizer, mask_id: int,
                          final_texts: Sequence[str], title: str = "dlm denoising trajectory", meta: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_trajectory_html(trajectory, tokenizer, mask_id, final_texts, title, meta), encoding="utf-8")
    return path
